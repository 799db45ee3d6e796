"""PNG figures drawn with Pillow alone: picture grids and training curves."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

_BACKGROUND = (255, 255, 255)
_INK = (40, 40, 40)
_SERIES = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40))
# Pillow's default FreeType font at its own size 10 draws spaces about a pixel wide
# ("unet on" reads "uneton"); at 12 they read as spaces.
_CHART_FONT_SIZE = 12


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def image_grid(columns: Sequence[tuple[str, np.ndarray]], *, cell: int = 96) -> Image.Image:
    """Images side by side in labelled columns, one row per example.

    Args:
        columns: ``(title, images)`` pairs; every ``images`` is uint8 (N, H, W, 3), same N.
        cell: the side of each cell in pixels; an image a half of it or less is enlarged a
            whole number of times with nearest neighbour, so that CIFAR-sized pixels stay
            visible and all the same size (64 px at 1.5x made every other one two wide);
            a larger one, smoothly to the cell.
    """
    n = len(columns[0][1])
    font = ImageFont.load_default()
    header = 16
    grid = Image.new("RGB", (cell * len(columns), header + cell * n), _BACKGROUND)
    draw = ImageDraw.Draw(grid)
    for c, (title, images) in enumerate(columns):
        draw.text((c * cell + 4, 2), title, fill=_INK, font=font)
        for r, img in enumerate(images):
            tile = Image.fromarray(img)
            if max(tile.size) > cell:
                tile.thumbnail((cell, cell))
            elif max(tile.size) < cell:
                times = cell // max(tile.size)
                if times >= 2:
                    tile = tile.resize((tile.width * times, tile.height * times), Image.Resampling.NEAREST)
                else:
                    scale = cell / max(tile.size)
                    size = (max(1, round(tile.width * scale)), max(1, round(tile.height * scale)))
                    tile = tile.resize(size, Image.Resampling.BICUBIC)
            grid.paste(tile, (c * cell + (cell - tile.width) // 2, header + r * cell + (cell - tile.height) // 2))
    return grid


def line_chart(
    series: dict[str, Sequence[float]], *, title: str, xlabel: str = "epoch", size: tuple[int, int] = (640, 400)
) -> Image.Image:
    """A simple line chart of one or more series over x = 1, 2, ..."""
    width, height = size
    right, top, bottom = 20, 30, 45
    chart = Image.new("RGB", size, _BACKGROUND)
    draw = ImageDraw.Draw(chart)
    font = ImageFont.load_default(size=_CHART_FONT_SIZE)
    values = [v for ys in series.values() for v in ys if math.isfinite(v)]
    n = max((len(ys) for ys in series.values()), default=0)
    if not values or n == 0:
        draw.text((70, 8), title, fill=_INK, font=font)
        return chart
    lo, hi = min(values), max(values)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    pad = (hi - lo) * 0.05
    lo, hi = lo - pad, hi + pad
    ticks = [(lo + (hi - lo) * k / 4, f"{lo + (hi - lo) * k / 4:.4g}") for k in range(5)]
    left = max(70, 12 + max(math.ceil(draw.textlength(label, font=font)) for _, label in ticks))  # -2.675e-05 is wide
    draw.text((left, 8), title, fill=_INK, font=font)

    def xy(i: int, v: float) -> tuple[float, float]:
        x = left + (width - left - right) * (i / max(1, n - 1))
        y = top + (height - top - bottom) * (1 - (v - lo) / (hi - lo))
        return x, y

    draw.rectangle((left, top, width - right, height - bottom), outline=_INK)
    for v, label in ticks:
        _, y = xy(0, v)
        draw.line((left - 4, y, left, y), fill=_INK)
        draw.text((left - 8 - draw.textlength(label, font=font), y - 7), label, fill=_INK, font=font)
    for i in range(n):
        x, _ = xy(i, lo)
        if n <= 20 or i % math.ceil(n / 20) == 0:
            draw.line((x, height - bottom, x, height - bottom + 4), fill=_INK)
            draw.text((x - 3, height - bottom + 6), str(i + 1), fill=_INK, font=font)
    draw.text(((width - draw.textlength(xlabel, font=font)) // 2, height - 18), xlabel, fill=_INK, font=font)
    legend = width - right - 8 - max(draw.textlength(f"- {name}", font=font) for name in series)
    for s, (name, ys) in enumerate(series.items()):
        rgb = _SERIES[s % len(_SERIES)]
        points = [xy(i, v) for i, v in enumerate(ys) if math.isfinite(v)]
        if len(points) > 1:
            draw.line(points, fill=rgb, width=2)
        for x, y in points:
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=rgb)
        draw.text((legend, top + 6 + 16 * s), f"- {name}", fill=rgb, font=font)
    return chart
