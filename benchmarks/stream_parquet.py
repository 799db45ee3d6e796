"""A long streaming run: memory stays flat and throughput steady over 100,000+ images.

    .venv/bin/python -m benchmarks.stream_parquet --n 100000

Generates ``n`` 32x32 JPEG scenes into Parquet shards with an ``image`` column (the layout
``colorize train`` reads ImageNet from), then runs one training epoch over them in this
process: :func:`colorize.data.lab_dataset` streams decode, crop, flip and Lab through Ray
Data CPU tasks into ``iter_torch_batches``, and each batch takes a
:func:`colorize.objectives.train_step` on a deliberately tiny U-Net, so that the data path,
not the model, sets the pace. Every few seconds the PSS and RSS of the whole process tree and
the images consumed are sampled; the series goes to JSON and a PNG chart. The baseline is the
run's own first half: the second half's peak PSS and mean rate are printed as ratios to it
(``pss_second_half_x``, ``steady_rate_second_half_x``), near 1 where memory is flat and the
rate steady.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import ray
import torch
from PIL import Image

from benchmarks.common import MemorySampler, add_results_flag, print_table, start_ray, write_parquet_shards, write_results
from colorize import data, plots
from colorize.models import ModelConfig, build_model
from colorize.objectives import train_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="images (default: 100000)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--width", type=int, default=4, help="the tiny U-Net's width (default: 4)")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between samples (default: 5)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/colorize-bench"))
    add_results_flag(parser)
    args = parser.parse_args()

    started = time.perf_counter()
    folder = write_parquet_shards(args.workdir / f"parquet-32-{args.n}", args.n, 32)
    print(f"{args.n} images in {len(list(folder.glob('*.parquet')))} shards ready in {time.perf_counter() - started:.0f} s",
          flush=True)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    config = ModelConfig(width=args.width, depth=2, image_size=32)
    model = build_model(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    start_ray()
    dataset = data.lab_dataset(data.locate(str(folder)), image_size=32, augment=True)
    done = 0
    with MemorySampler(args.interval, progress=lambda: done) as sampler:
        for batch in dataset.iter_torch_batches(batch_size=args.batch_size, local_shuffle_buffer_size=4 * args.batch_size):
            train_step(model, {"L": batch["L"], "ab": batch["ab"]}, optimizer)
            done += len(batch["L"])
    ray.shutdown()

    series = sampler.samples
    for before, after in zip(series, series[1:]):
        after["images_per_s"] = round((after["done"] - before["done"]) / max(after["t"] - before["t"], 1e-9), 1)
    # Steady state: from the interval after the first with images flowing (that one holds the
    # ramp-up: 85 images/s against 630 after it) to the last full interval. A stall after the
    # start stays in: it is what the steady mean and its variation are for.
    flowing = [i for i, s in enumerate(series[1:-1], start=1) if s.get("images_per_s")]
    steady = series[flowing[0] + 1 : len(series) - 1] if flowing else []
    second_half = steady[len(steady) // 2:]
    first_half = steady[: len(steady) // 2]
    if len(first_half) < 1:
        raise SystemExit(f"{done} images streamed in {series[-1]['t']:.1f} s gave {len(steady)} full sampling intervals "
                         "with images flowing; a steady rate needs at least 2: raise --n or lower --interval")
    summary = {
        "images": done, "seconds": series[-1]["t"], "images_per_s": round(done / series[-1]["t"], 1),
        "steady_images_per_s_mean": round(statistics.mean(s["images_per_s"] for s in steady), 1),
        "steady_images_per_s_cv": round(statistics.pstdev(s["images_per_s"] for s in steady)
                                        / statistics.mean(s["images_per_s"] for s in steady), 3),
        "pss_mb_first_half_max": round(max(s["pss_mb"] for s in first_half)),
        "pss_mb_second_half_max": round(max(s["pss_mb"] for s in second_half)),
        "pss_mb_peak": round(sampler.peak_pss / 2**20), "rss_sum_mb_peak": round(sampler.peak_rss / 2**20),
    }
    # The run's own baseline is its first half: flat memory and a steady rate are ratios near 1.
    summary["pss_second_half_x"] = round(summary["pss_mb_second_half_max"] / summary["pss_mb_first_half_max"], 3)
    summary["steady_rate_second_half_x"] = round(statistics.mean(s["images_per_s"] for s in second_half)
                                                 / statistics.mean(s["images_per_s"] for s in first_half), 3)
    print_table([summary], list(summary))
    chart = _chart(series, f"{done} images of 32x32 from Parquet through Ray Data, one epoch", args.interval)
    chart_path = args.results / "stream_parquet.png"
    args.results.mkdir(parents=True, exist_ok=True)
    chart.save(chart_path)
    print(f"wrote {chart_path}")
    write_results("stream_parquet", {"n": args.n, "batch_size": args.batch_size, "model": config.to_dict(),
                                     "interval_s": args.interval, "summary": summary, "series": series}, folder=args.results)


def _chart(series: list[dict], title: str, interval: float) -> Image.Image:
    """Memory above, throughput below, one point per sample."""
    xlabel = f"sample (about every {interval:g} s)"  # the sampler's own timing stretches under load
    memory = plots.line_chart({"PSS of the process tree, MB": [s["pss_mb"] for s in series],
                               "RSS sum, MB": [s["rss_mb"] for s in series]}, title=title, xlabel=xlabel, ymin=0)
    # The last interval ends with the run, cut short: its rate is no rate.
    rates = [s.get("images_per_s", float("nan")) for s in series[:-1]] + [float("nan")]
    speed = plots.line_chart({"images/s": rates}, title="throughput between samples", xlabel=xlabel, ymin=0)
    return plots.stacked([memory, speed])


if __name__ == "__main__":
    main()
