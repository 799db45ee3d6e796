"""The model, training and the bulk job on a GPU: images/s, achieved TFLOP/s, and whether the
bulk job keeps the GPU busy.

    python -m benchmarks.bench_gpu                      # on a GPU machine
    .venv/bin/python -m benchmarks.bench_gpu --device cpu --n 200 --n-train 1024 --results /tmp/r   # smoke check anywhere

Model-only parts need torch, numpy, Pillow and pyarrow (no Ray), so they run on a bare GPU
image:

- inference: the bundled U-Net's forward pass at its working size, bf16 autocast on CUDA,
  at several batch sizes; forward FLOPs counted by ``torch.utils.flop_counter``;
- training: a step of the default U-Net (forward, backward, Adam) as
  ``colorize.objectives.train_step`` takes it for the regression head;
- the host's codec bound: JPEG decode, grey and RGB PNG encode per core, times the cores.

With Ray installed, also the bulk job with one GPU actor (``colorize run --num-gpus 1``) and
Ray Train with one GPU worker, on the same generated images, each as a ratio to a baseline of
the same run: the bulk job to the lower of the model's best rate and the codec bound, Ray Train
to the bare train step at its batch of 256 (on CUDA, where that batch is measured).
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import add_results_flag, print_table, write_jpegs, write_results
from colorize import color
from colorize.colorizer import BUNDLED_WEIGHTS
from colorize.models import ModelConfig, build_model

BUNDLED = Path(__file__).resolve().parent.parent / "colorize" / "weights" / BUNDLED_WEIGHTS


def bundled_model() -> torch.nn.Module:
    """The bundled weights."""
    payload = torch.load(BUNDLED, map_location="cpu", weights_only=True)
    model = build_model(ModelConfig.from_dict(payload["config"]))
    model.load_state_dict(payload["state_dict"])
    return model.eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _rate(work, device: torch.device, images: int, seconds: float) -> float:  # noqa: ANN001
    """Images/s of ``work()`` (``images`` per call), after warm-up, over about ``seconds``."""
    for _ in range(3):
        work()
    _sync(device)
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        work()
        calls += 1
        if calls % 10 == 0:
            _sync(device)
    _sync(device)
    return calls * images / (time.perf_counter() - started)


def _flops(fn) -> int:  # noqa: ANN001
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def inference(device: torch.device, batch_sizes: list[int], seconds: float) -> list[dict[str, Any]]:
    model = bundled_model().to(device, memory_format=torch.channels_last)
    size = model.config.image_size
    per_image = _flops(lambda: bundled_model()(torch.zeros(1, 1, size, size)))  # counted on a CPU copy
    rows = []
    for batch in batch_sizes:
        L = torch.rand(batch, 1, size, size, device=device) * 100

        @torch.inference_mode()
        def work() -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                color.denormalize_ab(model(color.normalize_l(L)).float())

        rate = _rate(work, device, batch, seconds)
        rows.append({"what": f"inference, batch {batch}", "images_per_s": round(rate, 1),
                     "gflop_per_image": round(per_image / 1e9, 4), "tflop_per_s": round(rate * per_image / 1e12, 3)})
    return rows


def training(device: torch.device, batch_sizes: list[int], seconds: float) -> list[dict[str, Any]]:
    rows = []
    for batch in batch_sizes:
        torch.manual_seed(0)
        model = build_model(ModelConfig()).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
        size = model.config.image_size
        L = torch.rand(batch, 1, size, size, device=device) * 100
        ab = torch.randn(batch, 2, size, size, device=device) * 20

        def step() -> None:
            # colorize.objectives.train_step for the regression head, inlined as MSE.
            model.train()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = F.mse_loss(model(color.normalize_l(L)).float(), color.normalize_ab(ab))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        cpu_model = build_model(ModelConfig())
        per_image = _flops(lambda: F.mse_loss(cpu_model(torch.zeros(1, 1, size, size)),
                                              torch.zeros(1, 2, size, size)).backward())
        rate = _rate(step, device, batch, seconds)
        rows.append({"what": f"train step, batch {batch}", "images_per_s": round(rate, 1),
                     "gflop_per_image": round(per_image / 1e9, 4), "tflop_per_s": round(rate * per_image / 1e12, 3)})
    return rows


def codec_bound(paths: list[Path], png_level: int) -> dict[str, Any]:
    started = time.perf_counter()
    for path in paths:
        rgb = Image.open(path).convert("RGB")
        rgb.convert("L")
        rgb.save(io.BytesIO(), format="PNG", compress_level=png_level)
    per_core = len(paths) / (time.perf_counter() - started)
    cores = os.cpu_count() or 1
    return {"what": f"codec bound, {cores} cores", "images_per_s": round(per_core * cores, 1),
            "note": f"{per_core:.1f}/s per core"}


def with_ray(folder: Path, workdir: Path, gpu: bool, n_train: int, png_level: int) -> list[dict[str, Any]]:
    """The bulk job with one model actor (a GPU one with ``gpu``) and Ray Train with one worker."""
    import ray

    from benchmarks.bench_train import ray_train
    from benchmarks.common import start_ray, write_parquet_shards
    from colorize.pipeline import BulkConfig, run

    start_ray()
    summary = run(BulkConfig(input=str(folder), output=str(workdir / "out-gpu"), formats=("png",),
                             num_gpus=1 if gpu else 0, png_level=png_level, overwrite=True))
    shards = write_parquet_shards(workdir / f"parquet-32-{n_train}", n_train, 32, rows_per_shard=512)
    last = ray_train(None, shards, 1, 256, 2, 1, workdir / "ray-train", gpu=gpu)
    ray.shutdown()
    return [{"what": f"bulk job, {'1 GPU actor' if gpu else 'CPU tasks'}", "images_per_s": summary["images_per_second"],
             "note": "end to end, Ray started beforehand"},
            {"what": "Ray Train, 1 worker, Ray Data, batch 256", "images_per_s": round(last["images"] / last["seconds"], 1)}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu",
                        help="default: cuda where there is one, else a smoke check of the same rows on cpu")
    parser.add_argument("--n", type=int, default=2000, help="256x256 JPEGs for the codec bound and the bulk job")
    parser.add_argument("--n-train", type=int, default=20_000, help="32x32 images for Ray Train (default: 20000)")
    parser.add_argument("--seconds", type=float, default=3.0, help="timing window per model measurement")
    parser.add_argument("--png-level", type=int, default=1,
                        help="PNG level of the codec bound and the bulk job alike (default: 1, the job's own)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/colorize-bench"))
    add_results_flag(parser)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    if args.device == "cpu":
        print("bench_gpu on cpu: a smoke check of the GPU rows, inference at batch 64 only (--n and --n-train still apply)",
              file=sys.stderr, flush=True)

    device = torch.device(args.device)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    sizes = [64, 256, 1024] if device.type == "cuda" else [64]
    # Batch 256 on cpu too: Ray Train's row is a ratio to the bare step at its own batch.
    rows = inference(device, sizes, args.seconds) + training(device, sorted({*sizes, 256}), args.seconds)
    folder = args.workdir / f"jpeg-256x256-{args.n}"
    paths = write_jpegs(folder, args.n, 256, 256)
    rows.append(codec_bound(paths[:200], args.png_level))
    if importlib.util.find_spec("ray") is not None:
        rows += with_ray(folder, args.workdir, device.type == "cuda", args.n_train, args.png_level)
        bulk = rows[-2]["images_per_s"]
        ceiling = min(max(r["images_per_s"] for r in rows if r["what"].startswith("inference")),
                      next(r["images_per_s"] for r in rows if r["what"].startswith("codec")))
        rows[-2]["x min(model, codec bound)"] = round(bulk / ceiling, 3)
        step = next((r for r in rows if r["what"] == "train step, batch 256"), None)  # the same model and batch
        if step is not None:
            rows[-1]["x train step alone"] = round(rows[-1]["images_per_s"] / step["images_per_s"], 3)
    print(f"\ndevice: {card}")
    print_table(rows, ["what", "images_per_s", "gflop_per_image", "tflop_per_s", "x min(model, codec bound)",
                       "x train step alone", "note"])
    write_results(f"bench_gpu-{device.type}", {"device": card, "n": args.n, "png_level": args.png_level, "rows": rows},
                  folder=args.results)


if __name__ == "__main__":
    main()
