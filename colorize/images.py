"""Decoding inputs and composing outputs for the bulk job; numpy and Pillow, no Ray, no I/O.

An input becomes its full-resolution CIE lightness L (and its alpha, if any); the model's
chroma, predicted at a small working size, is upsampled and merged with that L, so the
output keeps the input's exact size and lightness.
"""

from __future__ import annotations

import contextlib
import functools
import io
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageCms, ImageOps, PngImagePlugin, UnidentifiedImageError

from colorize import color, errors
from colorize.options import MAX_PIXELS

# Pixels converted at a time, to bound the temporaries on huge images of any shape: 512 rows a
# block took 860 MB for a 1 x 20 M pixel image, against 300 MB for one of 4000 x 5000.
_GAMUT_PIXELS = 2**21


def _luminance_tables() -> np.ndarray:
    """(3, 256) float32: the CIE luminance Y each sRGB channel value contributes.

    L depends on Y alone, and Y is a weighted sum of the three linearised channels, so a
    table per channel replaces the per-pixel gamma curve. The weights are the Y row of
    :mod:`colorize.color`'s sRGB matrix, read from there to keep one copy of the constants.
    """
    linear = color.srgb_to_linear(torch.arange(256, dtype=torch.float64) / 255.0)
    weights = torch.tensor(color.RGB_TO_XYZ[1], dtype=torch.float64)[:, None]
    return (weights * linear).float().numpy()


_Y_TABLES = _luminance_tables()


METADATA_BYTES = 16 * 2**20  # an image's EXIF, XMP, ICC profile and thumbnails together
# Pillow refused a PNG with a text or ICC chunk that unpacks to over 1 MB as corrupt; Photoshop's
# XMP history and large printer profiles pass that. This module reads every image there is.
PngImagePlugin.MAX_TEXT_CHUNK = METADATA_BYTES


def max_encoded_bytes(max_pixels: int) -> int:
    """The most bytes an input of at most ``max_pixels`` can take, encoded: 8 a pixel (16-bit
    RGBA, uncompressed, the largest form any supported format stores) and METADATA_BYTES.
    Larger files and archive members are refused unread, so that a 20 GB file named .jpg
    fails alone instead of exhausting a worker's memory."""
    return 8 * max_pixels + METADATA_BYTES


class ImageError(ValueError):
    """An input that cannot be coloured, with a reason a person can act on."""


@dataclass(frozen=True)
class Decoded:
    """An input image: lightness L (H, W) float32 in [0, 100] and optional alpha (H, W) uint8."""

    L: np.ndarray
    alpha: np.ndarray | None


def decode(data: bytes, *, max_pixels: int) -> Decoded:
    """Encoded image bytes -> :class:`Decoded`, with EXIF orientation applied.

    Handles modes 1, L, LA, La, P, PA, RGB, RGBA, RGBa, CMYK, YCbCr and 16-bit grey (I;16, and
    I holding 16-bit values, as 16-bit PNGs used to open).
    Raises :class:`ImageError` for empty, non-image, corrupt, truncated, unsupported or
    oversized input.
    """
    if not data:
        raise ImageError("empty file (0 bytes)")
    with _pillow_limit(max_pixels):
        try:
            img = Image.open(io.BytesIO(data))  # reads the header only
        except UnidentifiedImageError:
            raise ImageError(_unreadable_format(data)) from None
        except Image.DecompressionBombError:
            raise ImageError(f"over --max-pixels {max_pixels:,}: refused before decoding, as a decompression bomb") from None
        except Exception as error:  # noqa: BLE001 - format plugins raise OSError, ValueError, SyntaxError, struct.error...
            raise ImageError(f"corrupt or truncated image: {errors.one_line(error, with_type=False)}") from None
        width, height = img.size
        if width * height > max_pixels:
            raise ImageError(f"image is {width}x{height} = {width * height:,} pixels, over --max-pixels {max_pixels:,}")
        try:
            _scale_low_bit_transparency(img)
            img.load()
            if img.format == "PNG":
                _check_png_checksums(data)
            img = ImageOps.exif_transpose(img)
            return _lightness_and_alpha(img)
        except ImageError:
            raise
        except Exception as error:  # noqa: BLE001 - as above, while decoding the pixels
            raise ImageError(f"corrupt or truncated image: {errors.one_line(error, with_type=False)}") from None


# Formats Pillow has no decoder for, by their first bytes: an ISO-BMFF ``ftyp`` brand (HEIF, as
# phones store photos) or JPEG XL's codestream and container signatures.
_HEIF_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1")
_JPEG_XL = (b"\xff\x0a", b"\x00\x00\x00\x0cJXL \r\n\x87\n")


def _unreadable_format(data: bytes) -> str:
    """Why Pillow found no image in ``data``: a format it cannot read, named, or none at all."""
    if data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS:
        name = "HEIF/HEIC"
    elif data.startswith(_JPEG_XL):
        name = "JPEG XL"
    else:
        return "not an image (unrecognised format)"
    return f"a {name} image, a format this Pillow cannot decode: convert it to JPEG or PNG"


def _check_png_checksums(data: bytes) -> None:
    """Pillow decodes a PNG's rows and stops, without checking the checksums of the chunks it
    read: a file whose image data was damaged, or zero-filled as a preallocated download left
    unfinished, decoded with wrong rows and was coloured. The chunks' CRCs catch that. A file
    cut off after its image data (no end chunk) decoded whole, and passes, as does one whose
    bad checksum is an ancillary chunk's (text, time: a lower-case first letter), which libpng
    only warns of. The pass costs about 6% of decoding a 3000x2000 PNG."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
    except SyntaxError as error:  # Pillow's "broken PNG file (bad header checksum in b'IDAT')"
        chunk = re.search(r"in b'(.)", str(error))
        if chunk is None or chunk.group(1).isupper():  # a critical chunk's: IDAT, PLTE, IHDR
            raise ImageError(f"corrupt PNG data: {errors.one_line(error, with_type=False)}") from None
    except Exception:  # noqa: BLE001, S110 - past the image data (a missing end chunk): what was decoded is whole
        pass


@contextlib.contextmanager
def _pillow_limit(max_pixels: int) -> Iterator[None]:
    """Pillow's decompression-bomb limit set to ``max_pixels`` while one image is decoded: its
    own (179 M pixels, checked on opening and again by TIFF and GIF while loading) would
    override a larger ``--max-pixels``. Pillow refuses only at twice its limit, so ``decode``
    checks the exact number itself. The limit is process-wide: images are not decoded in threads.
    """
    pillows = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = pillows


def _scale_low_bit_transparency(img: Image.Image) -> None:
    """Put a 2- or 4-bit grey PNG's transparent value on the 8-bit scale of its pixels.

    Pillow scales such pixels to 0-255 but leaves the tRNS value as written (0-3, 0-15), so no
    pixel would match it. Called before loading, while the tile still names the bit depth.
    """
    if img.mode != "L" or "transparency" not in img.info or not img.tile:
        return
    bits = {"L;2": 2, "L;4": 4}.get(img.tile[0].args) if isinstance(img.tile[0].args, str) else None
    if bits is not None:
        img.info["transparency"] *= 255 // (2**bits - 1)


def _lightness_and_alpha(img: Image.Image) -> Decoded:
    alpha = None
    if img.mode in ("La", "RGBa"):
        # Premultiplied alpha (grey TIFFs with associated alpha open as La): its alpha band
        # is "a", and Pillow converts La to nothing but LA.
        img = img.convert(img.mode.upper())
    if img.mode in ("P", "L", "RGB") and "transparency" in img.info:
        # One palette entry or one grey or RGB value marked transparent (a PNG tRNS chunk).
        img = img.convert("LA" if img.mode == "L" else "RGBA")
    elif img.mode in ("1", "I", "I;16") and "transparency" in img.info:
        # The same in 1-bit and 16-bit grey, which Pillow has no mode with alpha for; a 1-bit
        # image's transparent value is given on the 8-bit scale (0 or 255).
        values = np.asarray(img.convert("L") if img.mode == "1" else img)
        alpha = np.where(values == img.info["transparency"], 0, 255).astype(np.uint8)
    elif img.mode == "P":
        img = img.convert("RGB")
    elif img.mode == "PA":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):
        alpha = np.asarray(img.getchannel("A"), dtype=np.uint8)
        img = img.convert("RGB" if img.mode == "RGBA" else "L")
    if img.mode == "YCbCr":  # uncompressed YCbCr TIFFs: to RGB first, so that an RGB profile applies
        img = img.convert("RGB")
    img = to_srgb(img)
    if img.mode.startswith("I"):
        L = _grey16_lightness()[_grey16(img)]
    elif img.mode in ("1", "L"):
        L = lightness(np.asarray(img.convert("L"), dtype=np.uint8))
    elif img.mode in ("RGB", "CMYK", "YCbCr"):
        L = lightness(np.asarray(img.convert("RGB"), dtype=np.uint8))
    else:
        raise ImageError(f"unsupported image mode {img.mode!r}")
    return Decoded(L=np.ascontiguousarray(L, dtype=np.float32), alpha=alpha)


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` in 8-bit sRGB, for training and evaluation, its colour profile applied.

    PIL's ``convert("RGB")`` clips 16-bit grey ("I;16", and "I" as such PNGs used to open) at
    255, which turns nearly every pixel white; those are scaled to 8 bits first. Modes that
    :func:`decode` refuses (32-bit float "F", whose 0..1 values would come out black; "LAB",
    "HSV") raise :class:`ImageError` here too, so training and evaluation count such an image
    as unreadable rather than learn from or score a black one.
    """
    if not (img.mode in _DECODED_MODES or img.mode.startswith("I")):
        raise ImageError(f"unsupported image mode {img.mode!r}")
    if img.mode.startswith("I"):
        grey = _grey16(img).astype(np.float32) / 257.0  # 65535 -> 255
        img = Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), mode="L")
    elif img.mode in ("La", "RGBa"):
        img = img.convert(img.mode.upper())  # premultiplied alpha; Pillow converts La to LA only
    if img.mode in ("1", "LA"):
        img = img.convert("L")  # grey, so that a grey profile still applies
    elif img.mode not in _PROFILE_SPACES.values():
        img = img.convert("RGB")
    return to_srgb(img).convert("RGB")


def _grey16(img: Image.Image) -> np.ndarray:
    """The values of a 16-bit grey image: "I;16" and the like, and PIL's 32-bit "I", as 16-bit
    PNGs used to open and signed 16-bit TIFFs open (their values below 0 read as black). An "I"
    image with values past 65535 (a 32-bit TIFF) is refused: clipped, its brighter half came
    out white without a word."""
    values = np.asarray(img)
    if img.mode == "I" and values.size and values.max() > 65535:
        raise ImageError(f"32-bit grey with values up to {values.max()}, past the 16-bit range 0-65535 that is read: "
                         "convert it to 16 or 8 bits")
    return np.clip(values, 0, None) if img.mode == "I" else values


# The modes decode() reads, besides 16-bit grey (I, I;16...).
_DECODED_MODES = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "CMYK", "YCbCr")
# The ICC colour spaces whose profiles are applied, and the Pillow mode each profile serves.
_PROFILE_SPACES = {"RGB": "RGB", "GRAY": "L", "CMYK": "CMYK"}
_SRGB_PROFILE = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


def to_srgb(img: Image.Image) -> Image.Image:
    """``img`` with its embedded ICC colour profile applied: its pixels in sRGB, in mode RGB
    (or L, for a grey profile that maps greys to sRGB greys).

    Camera and phone photos often embed Adobe RGB or Display P3, CMYK prints a press profile,
    grey scans a grey gamma; read as sRGB, their lightness is off (a linear-gamma grey of 128 is
    L 76, not 54). An image without a profile, or whose profile is sRGB, unreadable, or of
    another colour space than its pixels (an RGB profile left on a grey image), comes back
    unchanged: its pixels are taken as sRGB, as browsers take them.
    """
    icc = img.info.get("icc_profile")
    if not icc or img.mode not in _PROFILE_SPACES.values():
        return img
    apply = _profile_transform(_undated(bytes(icc)), img.mode)
    return img if apply is None else apply(img)


def _undated(icc: bytes) -> bytes:
    """``icc`` with its header's creation date and profile ID zeroed (an ID of zeros means
    "not computed"): tools that write a fresh sRGB profile into each file they save differ
    only there, and would otherwise each miss :func:`_profile_transform`'s cache."""
    if len(icc) < 128:  # not even a header: left for the profile reader to refuse
        return icc
    return icc[:24] + bytes(12) + icc[36:84] + bytes(16) + icc[100:]


@functools.lru_cache(maxsize=32)
def _profile_transform(icc: bytes, mode: str) -> Callable[[Image.Image], Image.Image] | None:
    """What takes pixels of ``mode`` from profile ``icc`` to sRGB, or None where there is
    nothing to apply. One per distinct profile, as a photo collection holds few.

    A profile is taken as sRGB, and skipped, when it maps a lattice of 32,768 colours (every
    grey, for a grey profile) within one level of themselves: the many profiles named sRGB
    differ by less than that, and applying one costs as much as decoding the JPEG (266 vs 166
    ms for 12 M pixels). A grey pixel's colour depends on its value alone, so a grey profile
    becomes a table of 256 and stays grey where it maps greys to greys: a thirteenth of the
    transform and three-channel lightness it replaces, with the same result.
    """
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if _PROFILE_SPACES.get(profile.profile.xcolor_space.strip()) != mode:
            return None
        transform = ImageCms.buildTransform(profile, _SRGB_PROFILE, mode, "RGB")
        if mode == "L":
            rgb = np.asarray(transform.apply(Image.fromarray(np.arange(256, dtype=np.uint8)[None], mode="L")))[0]
            if (rgb == rgb[:, :1]).all():
                if np.abs(rgb[:, 0].astype(np.int16) - np.arange(256)).max() <= 1:
                    return None
                table = rgb[:, 0].tolist()
                return lambda img: img.point(table)
            tables = [rgb[:, channel].tolist() for channel in range(3)]
            return lambda img: Image.merge("RGB", [img.point(table) for table in tables])
        if mode == "RGB":
            lattice = np.stack(np.meshgrid(*[np.linspace(0, 255, 32).round()] * 3, indexing="ij"), axis=-1)
            lattice = lattice.astype(np.uint8).reshape(1, -1, 3)
            mapped = np.asarray(transform.apply(Image.fromarray(lattice, mode="RGB")), dtype=np.int16)
            if np.abs(mapped - lattice).max() <= 1:
                return None
        return transform.apply
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return None  # an unreadable profile: the pixels are taken as sRGB


@functools.cache
def _grey16_lightness() -> np.ndarray:
    """(65536,) float32: the CIE lightness of each 16-bit grey value. Looked up, a 16-bit
    image's L takes 12 bytes a pixel, where Lab of its grey copied to R, G and B took 70."""
    grey = np.arange(65536, dtype=np.float32) / 65535.0
    return color.rgb_to_lab_np(np.repeat(grey[None, :, None], 3, axis=-1))[0, :, 0].astype(np.float32)


def lightness(pixels: np.ndarray) -> np.ndarray:
    """CIE lightness L (H, W) float32 in [0, 100] of uint8 sRGB (H, W, 3) or grey (H, W).

    Equal to ``color.rgb_to_lab_np(rgb)[..., 0]`` within float32 rounding, and three times
    faster: only luminance is computed, with the sRGB curve looked up in a table.
    """
    if pixels.ndim == 2:
        y = _Y_TABLES.sum(axis=0)[pixels]
    else:
        y = _Y_TABLES[0][pixels[..., 0]]
        y += _Y_TABLES[1][pixels[..., 1]]
        y += _Y_TABLES[2][pixels[..., 2]]
    # The CIE curve, as color.rgb_to_lab applies it to Y (the white point's Y is 1).
    linear_part = y * np.float32(color.CIE_KAPPA)
    return np.where(y > color.CIE_EPSILON, 116.0 * np.cbrt(y) - 16.0, linear_part).astype(np.float32, copy=False)


# Lightness 0-100 as uint16 steps of 1/655.35: half float32's bytes, for L crossing the object
# store to model actors and back. A step is 0.0015 of L, far below an 8-bit sRGB level (about
# 0.4 of L); composed from it, about one channel value in a thousand lands one level off.
_L_STEPS = np.float32(655.35)


def pack_lightness(L: np.ndarray) -> np.ndarray:
    """Lightness (float32, 0-100) -> uint16, half the bytes (see :func:`unpack_lightness`)."""
    return np.rint(np.clip(L, 0.0, 100.0) * _L_STEPS).astype(np.uint16)


def unpack_lightness(L: np.ndarray) -> np.ndarray:
    """:func:`pack_lightness`'s uint16 -> float32 lightness, within 0.00077 of the original;
    float32 lightness comes back as it is."""
    return L.astype(np.float32) / _L_STEPS if L.dtype == np.uint16 else L


def resize_lightness(L: np.ndarray, size: int) -> np.ndarray:
    """(H, W) lightness -> (size, size), antialiased, for the model's working resolution."""
    if L.shape == (size, size):
        return L.astype(np.float32, copy=False)
    small = Image.fromarray(L.astype(np.float32, copy=False), mode="F").resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(small, dtype=np.float32)


def compose(L: np.ndarray, ab_small: np.ndarray) -> np.ndarray:
    """Full-resolution L (H, W) + predicted chroma (2, h, w) -> uint8 sRGB (H, W, 3).

    Chroma is upsampled bilinearly; lightness is the input's own; out-of-gamut colours are
    desaturated until they fit sRGB, their lightness kept (within :data:`colorize.color.CLIP_DELTA_E`
    at the gamut's yellow corner). Equal to
    ``color.to_uint8(color.lab_to_rgb(...))`` on the upsampled Lab within one level (see
    :func:`_lab_to_srgb8`), three times faster.
    """
    height, width = L.shape
    if not np.isfinite(ab_small).all():
        raise ValueError("the model predicted NaN or infinite chroma (are its weights finite?)")
    ab = torch.from_numpy(np.ascontiguousarray(ab_small, dtype=np.float32))[None]
    if ab.shape[-2:] != (height, width):
        ab = F.interpolate(ab, size=(height, width), mode="bilinear", align_corners=False)
    a, b = (plane.reshape(-1) for plane in ab[0].numpy())
    L = np.asarray(L, dtype=np.float32).reshape(-1)
    out = np.empty((height, width, 3), dtype=np.uint8)
    pixels = out.reshape(-1, 3)
    for start in range(0, L.size, _GAMUT_PIXELS):
        block = slice(start, start + _GAMUT_PIXELS)
        pixels[block] = _lab_to_srgb8(L[block], a[block], b[block])
    return out


def _srgb8_table() -> np.ndarray:
    """(65536,) uint8: the 8-bit sRGB value of each linear value k / 65535.

    A step of the table moves the sRGB value by at most 0.05 of a level (where the curve is
    steepest, near black), so looking up the nearest entry rounds to the same level as
    computing the curve, except within 0.05 of a rounding boundary: one level off, about one
    value in a thousand.
    """
    linear = torch.arange(65536, dtype=torch.float64) / 65535.0
    return color.to_uint8(color.linear_to_srgb(linear).numpy())


_SRGB8 = _srgb8_table()
# Lab's X and Z are relative to the D65 white; folding the white into the inverse matrix
# takes XYZ/white straight to linear sRGB.
_XYZN_TO_LINEAR = (np.linalg.inv(np.array(color.RGB_TO_XYZ, dtype=np.float64)) * np.array(color.WHITE_D65)).astype(np.float32)


def _lab_to_srgb8(L: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Lab values (any shape S) -> uint8 sRGB (*S, 3), with :func:`color.lab_to_rgb`'s gamut rule.

    In-gamut pixels (nearly all, for predicted chroma) take a numpy fast path: CIE's inverse
    curve, a 3x3 matrix, and the sRGB curve as a table lookup. Pixels outside the gamut, the
    only ones whose chroma must be searched, go through ``color.lab_to_rgb`` itself.
    """
    L = np.clip(L, 0.0, 100.0)
    fy = (L + 16.0) / 116.0
    xyz = (_cie_inverse(fy + a / 500.0), np.where(L > color.CIE_KAPPA * color.CIE_EPSILON, fy * fy * fy, L / np.float32(color.CIE_KAPPA)),
           _cie_inverse(fy - b / 200.0))
    out = np.empty((*L.shape, 3), dtype=np.uint8)
    outside = np.zeros(L.shape, dtype=bool)
    for channel, weights in enumerate(_XYZN_TO_LINEAR):
        linear = weights[0] * xyz[0] + weights[1] * xyz[1] + weights[2] * xyz[2]
        outside |= (linear < -color.GAMUT_TOLERANCE) | (linear > 1.0 + color.GAMUT_TOLERANCE)
        np.clip(linear, 0.0, 1.0, out=linear)
        out[..., channel] = _SRGB8[(linear * 65535.0 + 0.5).astype(np.int32)]
    if outside.any():
        lab = torch.from_numpy(np.stack((L[outside], a[outside], b[outside])))[:, None, :]  # (3, 1, N)
        out[outside] = color.to_uint8(color.lab_to_rgb(lab)[:, 0, :].T.numpy())
    return out


def _cie_inverse(f: np.ndarray) -> np.ndarray:
    cube = f * f * f
    return np.where(cube > color.CIE_EPSILON, cube, (116.0 * f - 16.0) / np.float32(color.CIE_KAPPA))


def encode_png(rgb: np.ndarray, alpha: np.ndarray | None, *, level: int = 6) -> bytes:
    """uint8 (H, W, 3) and optional alpha (H, W) -> PNG bytes (RGB or RGBA, 8 bits)."""
    img = Image.fromarray(rgb, mode="RGB")
    if alpha is not None:
        img.putalpha(Image.fromarray(alpha, mode="L"))
    buffer = io.BytesIO()
    img.save(buffer, format="PNG", compress_level=level)
    return buffer.getvalue()
