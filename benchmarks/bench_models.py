"""Forward-pass speed of weight files as the bulk job runs them, against the first one.

    .venv/bin/python -m benchmarks.bench_models --weights A.pt [--weights bundled ...] [--threads 2]

Each model is prepared as the bulk job prepares it (``pipeline.for_inference``, channels-last,
float32) and colours the same batch of L at its working size; the best of several timed rounds
is reported, and every ratio is taken against the first ``--weights`` (the baseline) measured
in the same run. Without ``--weights``: the bundled model alone.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import print_table, write_results
from colorize import colorizer, storage
from colorize.models import count_parameters
from colorize.pipeline import for_inference


def images_per_second(model: torch.nn.Module, L: torch.Tensor, rounds: int, calls: int) -> float:
    with torch.inference_mode():
        for _ in range(2):
            colorizer.predict_ab(model, L)
        best = 0.0
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(calls):
                colorizer.predict_ab(model, L)
            best = max(best, calls * len(L) / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", action="append", help="a weights file, or 'bundled' (repeatable; the first is the baseline)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for uri in args.weights or ["bundled"]:
        try:
            model, weights_id = colorizer.load_weights(None if uri == "bundled" else uri)
        except (ValueError, storage.StorageError) as error:
            parser.error(f"--weights: {error}")
        model = for_inference(model.eval()).to(memory_format=torch.channels_last)
        size = model.config.image_size
        L = torch.rand(args.batch, 1, size, size, generator=torch.Generator().manual_seed(0)) * 100
        rate = images_per_second(model, L, args.rounds, args.calls)
        rows.append({"weights": uri, "weights_id": weights_id, "parameters_m": count_parameters(model) / 1e6,
                     "size": size, "images_per_s": rate, "x_first": rate / rows[0]["images_per_s"] if rows else 1.0})
    print_table(rows, ["weights", "parameters_m", "size", "images_per_s", "x_first"])
    write_results("bench_models", {"threads": args.threads, "batch": args.batch, "rows": rows})


if __name__ == "__main__":
    main()
