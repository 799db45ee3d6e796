"""Bringing out-of-gamut colour inside sRGB: the first exit from grey at the yellow corner,
against plain bisection.

    .venv/bin/python -m benchmarks.bench_gamut [--repeats 5]

:func:`colorize.images.compose` sends each pixel outside sRGB through
:func:`colorize.color.lab_to_rgb`, which keeps the fraction of its chroma at which it meets the
gamut's edge on its way out from grey. The baseline is the rule it replaced: bisection over
[0, 1] alone, 12 halvings, which assumed the fractions that fit form one interval; near the
yellow corner they do not, and yellows landed in either band as the chroma changed. The rule
now (``first exit``) tries fractions up from grey in 16ths for colours near that corner,
refines the first exit, and clips a colour that clipping moves by at most 0.3 Delta E
(:func:`colorize.color._fitting_chroma`). Timed on the repository's sample photos
(samples/photos), with the bundled model's chroma (as ``colorize run`` makes them) and with
their own chroma multiplied (as ``--saturation`` does), composing whole images (the in-gamut
fast path included) with each rule in turn. ``pale`` counts the out-of-gamut pixels left with
more than 0.1 less of their chroma than a 1/256 scan along their ray finds to fit: where that
lies in a band beyond the first exit, the new rule leaves it on purpose, so that a smooth ramp
changes colour once, not back and forth.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from benchmarks.common import add_results_flag, print_table, write_results
from colorize import color, colorizer, images
from colorize.cli import positive_int

PHOTOS = Path(__file__).resolve().parent.parent / "samples" / "photos"


def bisection(lab: torch.Tensor, *, keep_lightness: bool = True, steps: int = 12) -> torch.Tensor:
    """The baseline: :func:`colorize.color.lab_to_rgb` before the top-down search."""
    L, ab = lab[..., :1, :, :].clamp(0.0, 100.0), lab[..., 1:, :, :]
    linear = color._lab_to_linear(torch.cat((L, ab), dim=-3))
    outside = ~color._in_gamut(linear)
    lo, hi = torch.zeros_like(L), torch.ones_like(L)
    for _ in range(steps):
        mid = (lo + hi) / 2
        fits = color._in_gamut(color._lab_to_linear(torch.cat((L, ab * mid), dim=-3)))
        lo, hi = torch.where(fits, mid, lo), torch.where(fits, hi, mid)
    scale = torch.where(outside, lo, torch.ones_like(lo))
    return color.linear_to_srgb(color._lab_to_linear(torch.cat((L, ab * scale), dim=-3)))


def _pale(rule, lab: np.ndarray) -> int:  # noqa: ANN001
    """Out-of-gamut pixels of ``lab`` (H, W, 3) to which ``rule`` leaves more than 0.1 less of
    their chroma than fits (before 8-bit rounding, which blurs dark pixels' chroma)."""
    pixels = np.ascontiguousarray(lab.reshape(-1, 3))
    pixels = pixels[~color._in_gamut(color._lab_to_linear(torch.from_numpy(pixels.T[:, None, :].copy())))[0, 0].numpy()]
    back = color.rgb_to_lab(rule(torch.from_numpy(pixels.T[:, None, :].copy())))[:, 0, :].T.numpy()
    kept = np.hypot(back[:, 1], back[:, 2]) / np.maximum(np.hypot(pixels[:, 1], pixels[:, 2]), 1e-6)
    fractions = np.linspace(0.0, 1.0, 257, dtype=np.float32)
    best = np.zeros(len(pixels), dtype=np.float32)
    for start in range(0, len(pixels), 2000):
        chunk = torch.from_numpy(pixels[start:start + 2000])
        rays = torch.cat((chunk[:, None, :1].expand(-1, len(fractions), 1),
                          chunk[:, None, 1:] * torch.from_numpy(fractions)[None, :, None]), dim=-1)
        fits = color._in_gamut(color._lab_to_linear(rays.movedim(-1, -3)))[0].numpy()
        best[start:start + 2000] = np.where(fits, fractions, 0.0).max(axis=1)
    return int((best - kept > 0.1).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=positive_int, default=5, help="timed rounds, each rule once a round (default: 5)")
    add_results_flag(parser)
    args = parser.parse_args()
    torch.set_num_threads(1)
    photos = [color.rgb_to_lab_np(np.asarray(Image.open(path).convert("RGB"))) for path in sorted(PHOTOS.glob("*.jpg"))]
    model, _ = colorizer.load_weights(None)
    predicted = []
    for lab in photos:  # the bundled model's chroma, upsampled as compose does it
        L = torch.from_numpy(np.array(images.resize_lightness(lab[..., 0], model.config.image_size)))[None, None]
        with torch.inference_mode():
            ab = colorizer.predict_ab(model, L)
        ab = F.interpolate(ab, size=lab.shape[:2], mode="bilinear", align_corners=False)[0].permute(1, 2, 0).numpy()
        predicted.append(np.concatenate((lab[..., :1], ab), axis=-1))
    rows = []
    cases = [("bundled model", predicted)] + [
        (f"truth, chroma x{saturation}", [lab * np.array([1.0, saturation, saturation], dtype=np.float32) for lab in photos])
        for saturation in (1.5, 3.0)]
    for case, labs in cases:
        pixels = sum(lab.shape[0] * lab.shape[1] for lab in labs)
        outside = sum(int((~color._in_gamut(color._lab_to_linear(torch.from_numpy(lab).movedim(-1, -3)))).sum())
                      for lab in labs)
        seconds = {"bisection": [], "first exit": []}
        for _ in range(args.repeats):  # taking turns: a spell of contention falls on both
            for name, rule in (("bisection", bisection), ("first exit", color.lab_to_rgb)):
                with mock.patch.object(color, "lab_to_rgb", rule):
                    started = time.perf_counter()
                    for lab in labs:
                        images.compose(lab[..., 0], lab[..., 1:].transpose(2, 0, 1))
                    seconds[name].append(time.perf_counter() - started)
        for name, rule in (("bisection", bisection), ("first exit", color.lab_to_rgb)):
            pale = sum(_pale(rule, lab) for lab in labs)
            best = min(seconds[name])
            rows.append({"chroma": case, "rule": name, "outside_pct": round(100 * outside / pixels, 2),
                         "ms_per_image": round(1000 * best / len(labs), 2), "pale": pale,
                         "x bisection": round(best / min(seconds["bisection"]), 3)})
    print(f"{len(photos)} sample photos, compose on one torch thread, best of {args.repeats}")
    print_table(rows, list(rows[0]))
    write_results("bench_gamut", {"photos": len(photos), "repeats": args.repeats, "rows": rows}, folder=args.results)


if __name__ == "__main__":
    main()
