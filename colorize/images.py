"""Decoding inputs and composing outputs for the bulk job; numpy and Pillow, no Ray, no I/O.

An input becomes its full-resolution CIE lightness L (and its alpha, if any); the model's
chroma, predicted at a small working size, is upsampled and merged with that L, so the
output keeps the input's exact size and lightness.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from colorize import color

_GAMUT_ROWS = 512  # rows converted at a time, to bound lab_to_rgb's temporaries on huge images


def _luminance_tables() -> np.ndarray:
    """(3, 256) float32: the CIE luminance Y each sRGB channel value contributes.

    L depends on Y alone, and Y is a weighted sum of the three linearised channels, so a
    table per channel replaces the per-pixel gamma curve. The weights are the Y row of
    :mod:`colorize.color`'s sRGB matrix, read from there to keep one copy of the constants.
    """
    linear = color.srgb_to_linear(torch.arange(256, dtype=torch.float64) / 255.0)
    weights = torch.tensor(color._RGB_TO_XYZ[1], dtype=torch.float64)[:, None]
    return (weights * linear).float().numpy()


_Y_TABLES = _luminance_tables()


class ImageError(ValueError):
    """An input that cannot be coloured, with a reason a person can act on."""


@dataclass(frozen=True)
class Decoded:
    """An input image: lightness L (H, W) float32 in [0, 100] and optional alpha (H, W) uint8."""

    L: np.ndarray
    alpha: np.ndarray | None


def decode(data: bytes, *, max_pixels: int) -> Decoded:
    """Encoded image bytes -> :class:`Decoded`, with EXIF orientation applied.

    Handles modes 1, L, LA, P, PA, RGB, RGBA, CMYK, YCbCr and 16/32-bit grey (I;16, I).
    Raises :class:`ImageError` for empty, non-image, corrupt, truncated, unsupported or
    oversized input.
    """
    if not data:
        raise ImageError("empty file (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError("not an image (unrecognised format)") from None
    except Image.DecompressionBombError as error:
        raise ImageError(f"refused as a decompression bomb: {error}") from None
    except OSError as error:
        raise ImageError(f"corrupt or truncated image: {error}") from None
    width, height = img.size
    if width * height > max_pixels:
        raise ImageError(f"image is {width}x{height} = {width * height:,} pixels, over --max-pixels {max_pixels:,}")
    try:
        img.load()
        img = ImageOps.exif_transpose(img)
        return _lightness_and_alpha(img)
    except ImageError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise ImageError(f"corrupt or truncated image: {error}") from None


def _lightness_and_alpha(img: Image.Image) -> Decoded:
    alpha = None
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode == "PA":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "RGBa", "La"):
        alpha = np.asarray(img.getchannel("A"), dtype=np.uint8)
        img = img.convert("RGB" if img.mode.startswith("RGB") else "L")
    if img.mode.startswith("I"):
        # 16-bit PNG grey (and PIL's 32-bit "I", which 16-bit PNGs used to open as).
        grey = np.asarray(img, dtype=np.float32) / 65535.0
        L = color.rgb_to_lab_np(np.repeat(np.clip(grey, 0.0, 1.0)[..., None], 3, axis=-1))[..., 0]
    elif img.mode in ("1", "L"):
        L = lightness(np.asarray(img.convert("L"), dtype=np.uint8))
    elif img.mode in ("RGB", "CMYK", "YCbCr"):
        L = lightness(np.asarray(img.convert("RGB"), dtype=np.uint8))
    else:
        raise ImageError(f"unsupported image mode {img.mode!r}")
    return Decoded(L=np.ascontiguousarray(L, dtype=np.float32), alpha=alpha)


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
    linear_part = y * np.float32(color._KAPPA)
    return np.where(y > color._EPSILON, 116.0 * np.cbrt(y) - 16.0, linear_part).astype(np.float32, copy=False)


def resize_lightness(L: np.ndarray, size: int) -> np.ndarray:
    """(H, W) lightness -> (size, size), antialiased, for the model's working resolution."""
    if L.shape == (size, size):
        return L.astype(np.float32, copy=False)
    small = Image.fromarray(L.astype(np.float32, copy=False), mode="F").resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(small, dtype=np.float32)


def compose(L: np.ndarray, ab_small: np.ndarray) -> np.ndarray:
    """Full-resolution L (H, W) + predicted chroma (2, h, w) -> uint8 sRGB (H, W, 3).

    Chroma is upsampled bilinearly; lightness is the input's own; out-of-gamut colours are
    desaturated (never darkened or brightened) until they fit sRGB.
    """
    height, width = L.shape
    ab = torch.from_numpy(np.ascontiguousarray(ab_small, dtype=np.float32))[None]
    if ab.shape[-2:] != (height, width):
        ab = F.interpolate(ab, size=(height, width), mode="bilinear", align_corners=False)
    full_l = torch.from_numpy(np.ascontiguousarray(L, dtype=np.float32))[None, None]
    out = np.empty((height, width, 3), dtype=np.uint8)
    for top in range(0, height, _GAMUT_ROWS):
        rows = slice(top, top + _GAMUT_ROWS)
        lab = torch.cat((full_l[..., rows, :], ab[..., rows, :]), dim=1)  # (1,3,h,W)
        out[rows] = color.to_uint8(_lab_to_rgb_in_gamut(lab)[0].permute(1, 2, 0).numpy())
    return out


def _lab_to_rgb_in_gamut(lab: torch.Tensor) -> torch.Tensor:
    """``color.lab_to_rgb(lab)``, exactly, with its chroma search run only where it can matter.

    The search runs over every pixel of a tile as soon as one is out of gamut, which costs
    a dozen conversions. A pixel whose clipped sRGB stays clear of 0 and 1 in every channel
    was never clipped, so it is in gamut and its clipped value is the answer; only the
    others, usually few, go through the search. (Clipping at 1 encodes to 1 - 6e-8 in
    float32, hence the margin.)
    """
    rgb = color.lab_to_rgb(lab, keep_lightness=False)  # (1,3,h,W)
    edge = ((rgb <= 0.0) | (rgb >= 1.0 - 1e-4)).any(dim=1)[0]  # (h,W)
    if bool(edge.any()):
        pixels = lab[0][:, edge]  # (3,N)
        rgb[0][:, edge] = color.lab_to_rgb(pixels[:, None, :])[:, 0, :]
    return rgb


def encode_png(rgb: np.ndarray, alpha: np.ndarray | None, *, level: int = 6) -> bytes:
    """uint8 (H, W, 3) and optional alpha (H, W) -> PNG bytes (RGB or RGBA, 8 bits)."""
    img = Image.fromarray(rgb, mode="RGB")
    if alpha is not None:
        img.putalpha(Image.fromarray(alpha, mode="L"))
    buffer = io.BytesIO()
    img.save(buffer, format="PNG", compress_level=level)
    return buffer.getvalue()
