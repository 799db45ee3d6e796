"""CPU training and inference speed by precision and memory layout, against float32 NCHW.

    .venv/bin/python -m benchmarks.bench_cpu_precision [--threads 2] [--steps 30] [--size 64]

Times :func:`colorize.objectives.train_step` (the step every trainer here takes) and the
bulk job's forward pass on the U-Net of the bundled model's shape before its semantic branch
(width 16, depth 4, 64 px, 1.94 M parameters; the bundled model's branch adds 1.31 M), four
ways in one run: float32 and bf16 autocast, each with NCHW and channels-last tensors. The four take turns, ``--chunk``
steps at a time, and each reports its median rate over its turns, so that a spell of
contention on a shared machine does not land on one of them. The first rows are the baseline
every ratio is taken against. bf16 on a CPU needs AVX-512 BF16 or AMX to be fast (oneDNN);
without them autocast emulates it and is slower, which this script shows rather than assumes.
Training also reports the loss after the same seeded steps in every mode, so a precision that
is fast but learns differently shows up here.
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import time
from collections.abc import Callable

import torch

from benchmarks.common import add_results_flag, print_table, write_results
from colorize import color, colorizer
from colorize.models import ModelConfig, build_model
from colorize.objectives import train_step
from colorize.pipeline import for_inference

MODES = (("float32", "nchw"), ("float32", "channels_last"), ("bf16", "nchw"), ("bf16", "channels_last"))


def _batch(n: int, size: int, seed: int) -> dict[str, torch.Tensor]:
    """Smooth random colour fields in Lab, (n,1,S,S) and (n,2,S,S): cheap stand-ins for photos."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=generator)
    rgb = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    lab = color.rgb_to_lab(rgb)
    return {"L": lab[:, :1].contiguous(), "ab": lab[:, 1:].contiguous()}


def _layout(tensor: torch.Tensor, layout: str) -> torch.Tensor:
    return tensor.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else tensor


def _trainer(config: ModelConfig, precision: str, layout: str, *, batch_size: int, loss: str,
             cf_weight: float) -> Callable[[], float]:
    """One mode's seeded training: each call takes the next step and returns its loss."""
    torch.manual_seed(0)
    model = build_model(config)
    if layout == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    batches = [{k: _layout(v, layout) for k, v in _batch(batch_size, config.image_size, seed).items()} for seed in range(4)]
    steps = itertools.count()

    def step() -> float:
        return float(train_step(model, batches[next(steps) % len(batches)], optimizer, loss=loss,
                                colourfulness_weight=cf_weight, precision=precision))

    return step


def _predictor(config: ModelConfig, precision: str, layout: str, *, batch_size: int) -> tuple[Callable[[], torch.Tensor], torch.Tensor]:
    """One mode's bulk-job forward pass (:func:`colorizer.predict_ab`, BatchNorm folded) on the
    same batch, and the same model's float32 ab on it."""
    torch.manual_seed(0)
    model = for_inference(build_model(config).eval())
    if layout == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    L = _layout(_batch(batch_size, config.image_size, 0)["L"], layout)
    with torch.inference_mode():
        reference = colorizer.predict_ab(model, L.contiguous())

    def predict() -> torch.Tensor:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            return colorizer.predict_ab(model, L)

    return predict, reference


def _interleaved(calls: list[Callable[[], object]], *, total: int, chunk: int, images: int) -> tuple[list[float], list[object]]:
    """Each call's median images/s over chunks of ``chunk`` calls (``total`` in all, after 3 untimed),
    the calls taking turns chunk by chunk so that a spell of contention falls on all of them;
    and each one's last result."""
    last: list[object] = [None] * len(calls)
    for i, call in enumerate(calls):
        for _ in range(3):
            last[i] = call()
    rates: list[list[float]] = [[] for _ in calls]
    for _ in range(max(1, math.ceil(total / chunk))):
        for i, call in enumerate(calls):
            started = time.perf_counter()
            for _ in range(chunk):
                last[i] = call()
            rates[i].append(chunk * images / (time.perf_counter() - started))
    return [statistics.median(r) for r in rates], last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30, help="timed training steps per mode")
    parser.add_argument("--chunk", type=int, default=5, help="steps a mode takes in its turn (default: 5)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--size", type=int, default=64, help="working resolution (the bundled model's: 64)")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--loss", default="psnr", choices=colorizer.LOSSES[:-1])
    parser.add_argument("--cf-weight", type=float, default=0.1)
    add_results_flag(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = ModelConfig(arch="unet", width=args.width, depth=args.depth, image_size=args.size)

    trainers = [_trainer(config, p, layout, batch_size=args.batch_size, loss=args.loss, cf_weight=args.cf_weight)
                for p, layout in MODES]
    train_rates, losses = _interleaved(trainers, total=args.steps, chunk=args.chunk, images=args.batch_size)
    torch.set_num_threads(1)  # as each of the bulk job's CPU tasks runs it
    predictors = [_predictor(config, p, layout, batch_size=args.batch_size) for p, layout in MODES]
    infer_rates, abs_ = _interleaved([p for p, _ in predictors], total=args.steps, chunk=args.chunk, images=args.batch_size)
    torch.set_num_threads(args.threads)

    rows = []
    for (precision, layout), train_rate, loss, infer_rate, ab, (_, reference) in zip(
            MODES, train_rates, losses, infer_rates, abs_, predictors):
        rows.append({"precision": precision, "layout": layout,
                     "train_images_per_s": round(train_rate, 1), "train_last_loss": round(loss, 4),
                     "infer_1_thread_images_per_s": round(infer_rate, 1),
                     "infer_ab_max_diff": round(float((ab.float() - reference).abs().max()), 3)})
    for row in rows:
        row["train x float32 nchw"] = round(row["train_images_per_s"] / rows[0]["train_images_per_s"], 2)
        row["infer x float32 nchw"] = round(row["infer_1_thread_images_per_s"] / rows[0]["infer_1_thread_images_per_s"], 2)
    print_table(rows, list(rows[0]))
    write_results(f"bench_cpu_precision-{args.size}px", {"threads": args.threads, "steps": args.steps, "chunk": args.chunk,
                                          "batch_size": args.batch_size, "loss": args.loss, "cf_weight": args.cf_weight,
                                          "model": config.to_dict(), "rows": rows}, folder=args.results)


if __name__ == "__main__":
    main()
