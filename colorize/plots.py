"""PNG figures drawn with Pillow alone: picture grids and training curves."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

_BACKGROUND = (255, 255, 255)
_INK = (40, 40, 40)
_SERIES = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))
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

    Raises:
        ValueError: for no columns, or columns of different lengths (a row would lack some).
    """
    lengths = [len(images) for _, images in columns]
    if not lengths or len(set(lengths)) > 1:
        raise ValueError(f"image_grid takes one or more columns of as many images each, not {lengths}")
    n = lengths[0]
    font = ImageFont.load_default()
    header = 16
    grid = Image.new("RGB", (cell * len(columns), header + cell * n), _BACKGROUND)
    draw = ImageDraw.Draw(grid)
    for c, (title, images) in enumerate(columns):
        draw.text((c * cell + 4, 2), _fit(draw, title, font, cell - 8), fill=_INK, font=font)
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


def _nice_step(span: float, count: int) -> float:
    """A step of 1, 2, 2.5 or 5 times a power of ten giving about ``count`` intervals over ``span``."""
    raw = span / max(1, count)
    power = 10.0 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw * (1 - 1e-9))


def _tick_labels(values: list[float], step: float) -> list[str]:
    """Labels as short as the step allows, and all different."""
    biggest = max(abs(v) for v in values)
    if biggest and not 1e-4 <= biggest < 1e7:
        digits = max(1, math.floor(math.log10(biggest)) - math.floor(math.log10(step)) + 1)
        return [f"{v:.{digits}g}" if abs(v) > step * 1e-9 else "0" for v in values]
    decimals = 0
    while decimals < 12 and abs(round(step, decimals) - step) > step * 1e-6:
        decimals += 1
    return [f"{0.0 if abs(v) < step * 1e-9 else v:.{decimals}f}" for v in values]


def y_ticks(values: Sequence[float], *, ymin: float | None = None, count: int = 4) -> list[tuple[float, str]]:
    """The y axis for finite ``values``: about ``count`` intervals of a round step, as (value, label).

    The first and last ticks are the axis's ends. Where every value is zero or more the axis
    does not go below zero (a rate of -42 images/s made no sense); ``ymin`` fixes its bottom.
    """
    lo, hi = min(values), max(values)
    if ymin is not None:
        lo = min(lo, ymin)
    if hi - lo <= 1e-12 * max(1.0, abs(hi)):  # flat: a band of 5% either side of it
        half = abs(hi) * 0.05 or 0.5
        lo, hi = lo - half, hi + half
    span = hi - lo
    floor = ymin if ymin is not None else (0.0 if min(values) >= 0 else -math.inf)
    lo, hi = max(lo - span * 0.05, floor), hi + span * 0.05
    step = _nice_step(hi - lo, count)
    lo, hi = max(math.floor(lo / step + 1e-9) * step, floor), math.ceil(hi / step - 1e-9) * step
    ticks = [lo + k * step for k in range(math.ceil((hi - lo) / step - 1e-9) + 1)]
    return list(zip(ticks, _tick_labels(ticks, step)))


def _fit(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, room: float) -> str:
    """``text``, cut short with an ellipsis where it is wider than ``room`` pixels."""
    if draw.textlength(text, font=font) <= room:
        return text
    while text and draw.textlength(text + "...", font=font) > room:
        text = text[:-1]
    return text + "..."


def line_chart(
    series: dict[str, Sequence[float]],
    *,
    title: str,
    xlabel: str = "epoch",
    size: tuple[int, int] = (640, 400),
    ymin: float | None = None,
) -> Image.Image:
    """A simple line chart of one or more series over x = 1, 2, ...

    The legend sits above the plot, under the title, so it never hides a line. The y axis has
    round ticks; where every value is zero or more it does not go below zero (and ``ymin``,
    e.g. 0 for a rate, fixes its bottom). A value that is NaN or infinite leaves a gap.
    """
    width, height = size
    right, bottom = 20, 45
    chart = Image.new("RGB", size, _BACKGROUND)
    draw = ImageDraw.Draw(chart)
    font = ImageFont.load_default(size=_CHART_FONT_SIZE)
    draw.text((8, 8), _fit(draw, title, font, width - 16), fill=_INK, font=font)
    # Legend entries, a short line and the name, in rows under the title.
    entries, x, row = [], 8.0, 0
    for s, name in enumerate(series):
        label = _fit(draw, name, font, width - 16 - 22)
        w = 22 + draw.textlength(label, font=font) + 14
        if x > 8 and x + w > width - 8:
            x, row = 8.0, row + 1
        entries.append((x, row, label, _SERIES[s % len(_SERIES)]))
        x += w
    top = 30 + (16 * (row + 1) + 10 if entries else 0)
    values = [v for ys in series.values() for v in ys if math.isfinite(v)]
    n = max((len(ys) for ys in series.values()), default=0)
    for lx, lrow, label, rgb in entries:
        y = 26 + 16 * lrow
        draw.line((lx, y + 7, lx + 16, y + 7), fill=rgb, width=2)
        draw.text((lx + 22, y), label, fill=rgb, font=font)
    if not values or n == 0:
        draw.rectangle((70, top, width - right, height - bottom), outline=_INK)
        text = "no finite values"
        draw.text(((70 + width - right - draw.textlength(text, font=font)) / 2, (top + height - bottom) / 2 - 7), text,
                  fill=_INK, font=font)
        return chart
    ticks = y_ticks(values, ymin=ymin, count=max(1, min(4, (height - top - bottom) // 40)))
    lo, hi = ticks[0][0], ticks[-1][0]
    left = max(50, 12 + max(math.ceil(draw.textlength(label, font=font)) for _, label in ticks))

    def xy(i: int, v: float) -> tuple[float, float]:
        x = left + (width - left - right) * ((i / (n - 1)) if n > 1 else 0.5)
        y = top + (height - top - bottom) * (1 - (v - lo) / (hi - lo))
        return x, y

    draw.rectangle((left, top, width - right, height - bottom), outline=_INK)
    for v, label in ticks:
        _, y = xy(0, v)
        draw.line((left - 4, y, left, y), fill=_INK)
        draw.text((left - 8 - draw.textlength(label, font=font), y - 7), label, fill=_INK, font=font)
    # x ticks every 1, 2, 5, 10, ... points, as many as fit their labels.
    room = (width - left - right) / max(1, n - 1)
    widest = draw.textlength(str(n), font=font) + 12
    every = 1
    while every * room < widest and every < n:
        every = round(_nice_step(every * 2, 1)) if every > 1 else 2
    for i in range(n):
        if i and ((i + 1) % every or i * room < widest):  # 1 always, then multiples of the step
            continue
        x, _ = xy(i, lo)
        label = str(i + 1)
        draw.line((x, height - bottom, x, height - bottom + 4), fill=_INK)
        tx = min(max(x - draw.textlength(label, font=font) / 2, 0), width - draw.textlength(label, font=font) - 2)
        draw.text((tx, height - bottom + 6), label, fill=_INK, font=font)
    draw.text(((width - draw.textlength(xlabel, font=font)) // 2, height - 18), xlabel, fill=_INK, font=font)
    for s, (name, ys) in enumerate(series.items()):
        rgb = _SERIES[s % len(_SERIES)]
        run: list[tuple[float, float]] = []
        for i, v in enumerate(list(ys) + [math.nan]):
            if math.isfinite(v):
                run.append(xy(i, v))
                continue
            if len(run) > 1:
                draw.line(run, fill=rgb, width=2, joint="curve")
            for x, y in run:
                draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=rgb)
            run = []
    return chart


def stacked(charts: Sequence[Image.Image]) -> Image.Image:
    """Charts one above the other, on one white canvas."""
    both = Image.new("RGB", (max(c.width for c in charts), sum(c.height for c in charts)), _BACKGROUND)
    y = 0
    for c in charts:
        both.paste(c, (0, y))
        y += c.height
    return both
