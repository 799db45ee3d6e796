"""Forward-pass speed of weight files as the bulk job runs them, against the first one.

    .venv/bin/python -m benchmarks.bench_models --weights A.pt [--weights bundled ...] [--threads 2] [--bulk N]

Each model is prepared as the bulk job prepares it (``pipeline.for_inference``, channels-last,
float32) and colours the same batch of L at its working size. The models take turns, round by
round, so that a spell of contention on a shared machine falls on all of them; each one's best
round is reported, and every ratio is taken against the first ``--weights`` (the baseline)
measured in the same run. Without ``--weights``: the bundled model alone. The bulk job's CPU
tasks run one torch thread each, hence ``--threads 1`` by default.

``--bulk N`` also times the whole bulk job (:func:`colorize.pipeline.run`, PNG output) with
each weights file on the same N generated JPEGs (``--bulk-size``, default 256 px): Ray is
started first and each file's job runs once untimed, so that the timed runs find warm workers,
as a long job does; then the files take turns for ``--bulk-rounds`` rounds (default 3), and
each one's best is reported. (Timed once each, in a fixed order, the bundled model against
itself came out anywhere from 0.90x to 1.04x.)
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch

from benchmarks.common import add_results_flag, print_table, start_ray, warm_ray_data, write_jpegs, write_results
from colorize import colorizer, storage
from colorize.cli import positive_int
from colorize.models import count_parameters
from colorize.pipeline import for_inference


def images_per_second(models: list[tuple[torch.nn.Module, torch.Tensor]], rounds: int, calls: int) -> list[float]:
    """Each (model, L)'s best rate over ``rounds``, the models taking turns within each round."""
    best = [0.0] * len(models)
    with torch.inference_mode():
        for model, L in models:
            for _ in range(2):
                colorizer.predict_ab(model, L)
        for _ in range(rounds):
            for i, (model, L) in enumerate(models):
                start = time.perf_counter()
                for _ in range(calls):
                    colorizer.predict_ab(model, L)
                best[i] = max(best[i], calls * len(L) / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", action="append", help="a weights file, or 'bundled' (repeatable; the first is the baseline)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1, as each bulk-job task)")
    parser.add_argument("--batch", type=positive_int, default=64, help="images per model call (default: 64)")
    parser.add_argument("--rounds", type=positive_int, default=5, help="timed rounds, the files taking turns (default: 5)")
    parser.add_argument("--calls", type=positive_int, default=5, help="model calls in a round (default: 5)")
    parser.add_argument("--bulk", type=int, metavar="N", help="also time the bulk job on N images with each weights file")
    parser.add_argument("--bulk-size", type=int, default=256, help="side of the --bulk images in px (default: 256)")
    parser.add_argument("--bulk-rounds", type=int, default=3, help="timed --bulk runs of each file, taking turns (default: 3)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/colorize-bench"))
    add_results_flag(parser)
    args = parser.parse_args()
    if args.bulk_rounds < 1:
        parser.error(f"--bulk-rounds must be at least 1, got {args.bulk_rounds}")
    torch.set_num_threads(args.threads)
    rows, models = [], []
    for uri in args.weights or ["bundled"]:
        try:
            model, weights_id = colorizer.load_weights(uri)
        except (ValueError, storage.StorageError) as error:
            parser.error(f"--weights: {error}")
        model = for_inference(model.eval()).to(memory_format=torch.channels_last)
        size = model.config.image_size
        models.append((model, torch.rand(args.batch, 1, size, size, generator=torch.Generator().manual_seed(0)) * 100))
        rows.append({"weights": uri, "weights_id": weights_id, "parameters_m": count_parameters(model) / 1e6, "size": size})
    for row, rate in zip(rows, images_per_second(models, args.rounds, args.calls)):
        row["images_per_s"], row["x_first"] = rate, rate / (rows[0].get("images_per_s") or rate)
    columns = ["weights", "parameters_m", "size", "images_per_s", "x_first"]
    if args.bulk:
        bulk_rates(rows, args.bulk, args.bulk_size, args.workdir, args.bulk_rounds)
        columns += ["bulk_images_per_s", "bulk_x_first"]
    print_table(rows, columns)
    write_results("bench_models", {"threads": args.threads, "batch": args.batch, "bulk": args.bulk,
                                   "bulk_size": args.bulk_size, "bulk_rounds": args.bulk_rounds, "rows": rows},
                  folder=args.results)


def bulk_rates(rows: list[dict], n: int, size: int, workdir: Path, rounds: int) -> None:
    """Add each row's best bulk-job images/s (warm workers, the files taking turns for
    ``rounds`` rounds) on ``n`` JPEGs of ``size`` px, and the ratio to the first."""
    from colorize.pipeline import BulkConfig, run

    folder = workdir / f"jpeg-{size}x{size}-{n}"
    write_jpegs(folder, n, size, size)
    start_ray()
    warm_ray_data()
    out = workdir / "out-bench-models"
    configs = [BulkConfig(input=str(folder), output=str(out), formats=("png",), overwrite=True,
                          weights=None if row["weights"] == "bundled" else row["weights"]) for row in rows]

    def seconds(row: dict, config: BulkConfig) -> float:
        shutil.rmtree(out, ignore_errors=True)
        started = time.perf_counter()
        summary = run(config)
        if summary["written"] != n:
            raise RuntimeError(f"{row['weights']}: the bulk job wrote {summary['written']} of {n} images")
        return time.perf_counter() - started

    for row, config in zip(rows, configs):  # starts the workers and loads each model: untimed
        seconds(row, config)
    best = [float("inf")] * len(rows)
    for _ in range(rounds):  # turn by turn: a spell of contention falls on every file
        best = [min(b, seconds(row, config)) for b, row, config in zip(best, rows, configs)]
    for row, b in zip(rows, best):
        row["bulk_images_per_s"] = n / b
        row["bulk_x_first"] = row["bulk_images_per_s"] / (n / best[0])


if __name__ == "__main__":
    main()
