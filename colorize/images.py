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
        rgb = np.repeat(np.clip(grey, 0.0, 1.0)[..., None], 3, axis=-1)
    elif img.mode in ("1", "L"):
        rgb = np.repeat(np.asarray(img.convert("L"), dtype=np.uint8)[..., None], 3, axis=-1)
    elif img.mode in ("RGB", "CMYK", "YCbCr"):
        rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
    else:
        raise ImageError(f"unsupported image mode {img.mode!r}")
    L = color.rgb_to_lab_np(rgb)[..., 0]
    return Decoded(L=np.ascontiguousarray(L, dtype=np.float32), alpha=alpha)


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
    lightness = torch.from_numpy(np.ascontiguousarray(L, dtype=np.float32))[None, None]
    out = np.empty((height, width, 3), dtype=np.uint8)
    for top in range(0, height, _GAMUT_ROWS):
        rows = slice(top, top + _GAMUT_ROWS)
        lab = torch.cat((lightness[..., rows, :], ab[..., rows, :]), dim=1)
        out[rows] = color.to_uint8(color.lab_to_rgb(lab)[0].permute(1, 2, 0).numpy())
    return out


def encode_png(rgb: np.ndarray, alpha: np.ndarray | None, *, level: int = 6) -> bytes:
    """uint8 (H, W, 3) and optional alpha (H, W) -> PNG bytes (RGB or RGBA, 8 bits)."""
    img = Image.fromarray(rgb, mode="RGB")
    if alpha is not None:
        img.putalpha(Image.fromarray(alpha, mode="L"))
    buffer = io.BytesIO()
    img.save(buffer, format="PNG", compress_level=level)
    return buffer.getvalue()
