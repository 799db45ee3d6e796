"""Per-core costs of each piece of work, at ImageNet's typical image size and others: the
inputs to the cluster arithmetic in docs/scaling.md.

    .venv/bin/python -m benchmarks.per_core

One process, one torch thread, so each figure is the cost on one core:

- ``train decode``: what ``colorize train`` does per image (:func:`colorize.data.prepare_batch`:
  JPEG decode, in draft mode at 1/2, 1/4 or 1/8 scale where the image stays large enough for
  its smallest random crop, ``draft_SIDE_scale``; random crop, resize to the working size,
  Lab), against the same work with every JPEG decoded whole (``train_SIDE_whole_ms``, the
  baseline: how training read its input before session 35), and the ratio of the two
  (``train_SIDE_x``);
- ``bulk``: what ``colorize run`` does per image outside the model (:func:`colorize.images.decode`
  with lightness, :func:`~colorize.images.compose`, PNG encode at levels 6 and 1); and the
  decode of the same picture with an embedded colour profile, as a ratio to it without one:
  Adobe RGB (``decode_adobe_x``), and a grey JPEG with a gamma-2.2 grey profile against the
  same grey JPEG without (``decode_grey_icc_x``);
- ``model``: the bundled U-Net's batched forward pass per image on CPU, as trained (the
  baseline) and as the bulk job runs it, and the ratio of the two.
"""

from __future__ import annotations

import argparse
import io
import time
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from benchmarks.common import add_results_flag, jpeg_bytes, print_table, scene, write_results
from colorize import color, colorizer, data, images
from colorize.cli import positive_int
from colorize.pipeline import for_inference
from tests.helpers import icc_profile

ADOBE_RGB = icc_profile("RGB ", gamma=2.2, primaries={"r": (0.6097, 0.3111, 0.0195), "g": (0.2053, 0.6257, 0.0609),
                                                      "b": (0.1492, 0.0632, 0.7446)})  # D50-adapted, as ICC has it
GREY_GAMMA_22 = icc_profile("GRAY", gamma=2.2)

SIZES = ((500, 375), (256, 256), (1024, 768))  # (width, height); 500x375 is ImageNet's typical photo


def _ms(work, repeat: int) -> float:  # noqa: ANN001
    work()
    started = time.perf_counter()
    for _ in range(repeat):
        work()
    return (time.perf_counter() - started) / repeat * 1000


def _whole_prepare(blobs: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """:func:`colorize.data.prepare_batch`'s work (augmented), each JPEG decoded whole."""
    rgb = np.empty((len(blobs), size, size, 3), dtype=np.uint8)
    for i, blob in enumerate(blobs):
        img = images.to_rgb(ImageOps.exif_transpose(Image.open(io.BytesIO(blob))))
        rgb[i] = data._crop_resize(img, size, rng)
    return color.rgb_to_lab_np(rgb)


def _draft_scale(blob: bytes, size: int) -> float:
    """The scale :func:`colorize.data.prepare_batch` decodes ``blob`` at for ``size`` px."""
    img = Image.open(io.BytesIO(blob))
    width = img.width
    return data.draft(img, size).width / width


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=positive_int, default=20, help="timed repeats of each step (default: 20)")
    add_results_flag(parser)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, weights_id = colorizer.load_weights(None)
    rng = np.random.default_rng(0)
    crops = np.random.default_rng(1)  # its own, so that the pictures are the same whatever --repeat
    rows: list[dict[str, Any]] = []
    for width, height in SIZES:
        pictures = [scene(rng, height, width) for _ in range(8)]
        blobs = np.array([jpeg_bytes(picture) for picture in pictures], dtype=object)
        blob = blobs[0]
        decoded = images.decode(blob, max_pixels=10**9)
        with torch.inference_mode():
            ab = colorizer.predict_ab(model, torch.from_numpy(images.resize_lightness(decoded.L, model.config.image_size))[None, None])[0].numpy()
        rgb = images.compose(decoded.L, ab)
        row = {"image": f"{width}x{height}", "jpeg_kb": round(len(blob) / 1024, 1)}
        for side in (32, 128, 224):
            # Taking turns, best of each: a spell of contention falls on both.
            drafted, whole = float("inf"), float("inf")
            for _ in range(max(1, args.repeat // 8)):
                drafted = min(drafted, _ms(lambda: data.prepare_batch({"bytes": blobs}, image_size=side, augment=True), 1))
                whole = min(whole, _ms(lambda: _whole_prepare(blobs, side, crops), 1))
            row[f"train_{side}_ms"], row[f"train_{side}_whole_ms"] = drafted / len(blobs), whole / len(blobs)
            row[f"train_{side}_x"] = drafted / whole
            row[f"draft_{side}_scale"] = _draft_scale(blob, side)
        row["decode_L_ms"] = _ms(lambda: images.decode(blob, max_pixels=10**9), args.repeat)
        adobe = jpeg_bytes(pictures[0], icc_profile=ADOBE_RGB)
        row["decode_adobe_x"] = _ms(lambda: images.decode(adobe, max_pixels=10**9), args.repeat) / row["decode_L_ms"]
        grey = np.asarray(Image.fromarray(pictures[0]).convert("L"))
        grey_plain, grey_icc = jpeg_bytes(grey), jpeg_bytes(grey, icc_profile=GREY_GAMMA_22)
        row["decode_grey_icc_x"] = (_ms(lambda: images.decode(grey_icc, max_pixels=10**9), args.repeat)
                                    / _ms(lambda: images.decode(grey_plain, max_pixels=10**9), args.repeat))
        row["compose_ms"] = _ms(lambda: images.compose(decoded.L, ab), args.repeat)
        for level in (6, 1):
            row[f"png{level}_ms"] = _ms(lambda: images.encode_png(rgb, None, level=level), args.repeat)
            row[f"png{level}_kb"] = round(len(images.encode_png(rgb, None, level=level)) / 1024, 1)
        rows.append(row)
        print(row, flush=True)
    side = model.config.image_size
    L = torch.rand(64, 1, side, side) * 100
    with torch.inference_mode():
        model_ms = _ms(lambda: colorizer.predict_ab(model, L), args.repeat) / 64
        fast = for_inference(model).to(memory_format=torch.channels_last)
        inference_ms = _ms(lambda: colorizer.predict_ab(fast, L), args.repeat) / 64
    print(f"\nms per image on one core (model, batch 64 at {side}x{side}: {model_ms:.2f} ms/image; "
          f"as the bulk job runs it, BatchNorm folded and channels-last: {inference_ms:.2f}, {inference_ms / model_ms:.2f}x)")
    print_table(rows, list(rows[0]))
    write_results("per_core", {"model_ms_per_image": round(model_ms, 3), "inference_model_ms_per_image": round(inference_ms, 3),
                                "inference_model_x": round(inference_ms / model_ms, 3),
                                "model_image_size": side, "weights_id": weights_id, "rows": rows}, folder=args.results)


if __name__ == "__main__":
    main()
