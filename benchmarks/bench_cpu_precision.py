"""CPU training and inference speed by precision and memory layout, against float32 NCHW.

    .venv/bin/python -m benchmarks.bench_cpu_precision [--threads 2] [--steps 30] [--size 64]

Times :func:`colorize.objectives.train_step` (the step every trainer here takes) and the
bulk job's forward pass on the bundled model's architecture, four ways in one run: float32
and bf16 autocast, each with NCHW and channels-last tensors. The first rows are the baseline
every ratio is taken against. bf16 on a CPU needs AVX-512 BF16 or AMX to be fast (oneDNN);
without them autocast emulates it and is slower, which this script shows rather than assumes.
Training also reports the loss after the same seeded steps in every mode, so a precision that
is fast but learns differently shows up here.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import print_table, write_results
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


def train_rate(config: ModelConfig, precision: str, layout: str, *, batch_size: int, steps: int, loss: str,
               cf_weight: float) -> dict[str, float]:
    """Images per second over ``steps`` timed steps (after 3 untimed), and the last loss."""
    torch.manual_seed(0)
    model = build_model(config)
    if layout == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    batches = [{k: _layout(v, layout) for k, v in _batch(batch_size, config.image_size, seed).items()} for seed in range(4)]
    values = []
    for step in range(3 + steps):
        if step == 3:
            started = time.perf_counter()
        value = train_step(model, batches[step % len(batches)], optimizer, loss=loss, colourfulness_weight=cf_weight,
                           precision=precision)
        values.append(float(value))
    seconds = time.perf_counter() - started
    return {"images_per_s": steps * batch_size / seconds, "last_loss": values[-1]}


def inference_rate(config: ModelConfig, precision: str, layout: str, *, batch_size: int, repeats: int) -> dict[str, float]:
    """Images per second of the bulk job's forward pass (:func:`colorizer.predict_ab`, BatchNorm
    folded) on one thread, as each of its CPU tasks runs it, and the largest ab difference
    from the same model in float32 on the same batch."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = for_inference(build_model(config).eval())
    if layout == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    L = _layout(_batch(batch_size, config.image_size, 0)["L"], layout)
    with torch.inference_mode():
        reference = colorizer.predict_ab(model, L.contiguous())
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            colorizer.predict_ab(model, L)  # warm-up
            started = time.perf_counter()
            for _ in range(repeats):
                ab = colorizer.predict_ab(model, L)
            seconds = time.perf_counter() - started
    torch.set_num_threads(threads)
    return {"images_per_s": repeats * batch_size / seconds, "ab_max_diff": float((ab.float() - reference).abs().max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30, help="timed training steps per mode")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--size", type=int, default=64, help="working resolution (the bundled model's: 64)")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--loss", default="psnr", choices=colorizer.LOSSES[:-1])
    parser.add_argument("--cf-weight", type=float, default=0.1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = ModelConfig(arch="unet", width=args.width, depth=args.depth, image_size=args.size)

    rows = []
    for precision, layout in MODES:
        train = train_rate(config, precision, layout, batch_size=args.batch_size, steps=args.steps, loss=args.loss,
                           cf_weight=args.cf_weight)
        infer = inference_rate(config, precision, layout, batch_size=args.batch_size, repeats=args.steps)
        rows.append({"precision": precision, "layout": layout,
                     "train_images_per_s": round(train["images_per_s"], 1), "train_last_loss": round(train["last_loss"], 4),
                     "infer_1_thread_images_per_s": round(infer["images_per_s"], 1),
                     "infer_ab_max_diff": round(infer["ab_max_diff"], 3)})
        print(f"{precision} {layout}: train {train['images_per_s']:.1f} images/s, infer {infer['images_per_s']:.1f} images/s",
              flush=True)
    for row in rows:
        row["train x float32 nchw"] = round(row["train_images_per_s"] / rows[0]["train_images_per_s"], 2)
        row["infer x float32 nchw"] = round(row["infer_1_thread_images_per_s"] / rows[0]["infer_1_thread_images_per_s"], 2)
    print_table(rows, list(rows[0]))
    write_results(f"bench_cpu_precision-{args.size}px", {"threads": args.threads, "steps": args.steps, "batch_size": args.batch_size,
                                          "loss": args.loss, "cf_weight": args.cf_weight, "model": config.to_dict(),
                                          "rows": rows})


if __name__ == "__main__":
    main()
