"""Peak memory of the whole process tree (driver, raylet, GCS, every Ray worker) for the bulk
job on 1x and 10x the images: a streaming job's peak does not grow with its input.

    .venv/bin/python -m benchmarks.bench_memory --n 1000 --size 256

Each scale runs on a fresh Ray instance, so both start from the same baseline. Memory is
sampled from /proc every 0.25 s: PSS (shared pages, such as the object store's, split
between the processes that map them: what the tree really holds) and the plain RSS sum.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path
from typing import Any

import ray

from benchmarks.common import MemorySampler, add_results_flag, print_table, start_ray, write_jpegs, write_results
from colorize.pipeline import BulkConfig, run


def measure(folder: Path, out: Path, batch_size: int) -> dict[str, Any]:
    """One bulk run on a fresh Ray instance; peaks and baseline in MB."""
    shutil.rmtree(out, ignore_errors=True)
    with MemorySampler(0.25) as idle:
        start_ray()
        time.sleep(2)  # let the daemons settle before taking the baseline
    with MemorySampler(0.25) as sampler:
        summary = run(BulkConfig(input=str(folder), output=str(out), formats=("png",), batch_size=batch_size))
    ray.shutdown()
    return {"images": summary["written"], "seconds": summary["seconds"],
            "images_per_s": summary["images_per_second"],
            "baseline_pss_mb": round(idle.samples[-1]["pss_mb"]),
            "peak_pss_mb": round(sampler.peak_pss / 2**20), "peak_rss_sum_mb": round(sampler.peak_rss / 2**20),
            "series": sampler.samples}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="images at 1x (default: 1000; 10x is ten times that)")
    parser.add_argument("--size", type=int, default=256, help="side of the square JPEGs (default: 256)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/colorize-bench"))
    add_results_flag(parser)
    args = parser.parse_args()

    rows = []
    for scale in (1, 10):
        n = args.n * scale
        folder = args.workdir / f"jpeg-{args.size}x{args.size}-{n}"
        write_jpegs(folder, n, args.size, args.size)
        row = {"scale": f"{scale}x", **measure(folder, args.workdir / "out-memory", args.batch_size)}
        print({k: v for k, v in row.items() if k != "series"}, flush=True)
        rows.append(row)
    one, ten = rows
    for row in rows:
        row["peak_pss_vs_1x"] = round(row["peak_pss_mb"] / one["peak_pss_mb"], 3)
        row["peak_rss_vs_1x"] = round(row["peak_rss_sum_mb"] / one["peak_rss_sum_mb"], 3)
    print(f"\nbulk job, JPEGs of {args.size}x{args.size}, batch {args.batch_size}; MB of the whole process tree")
    print_table(rows, ["scale", "images", "seconds", "images_per_s", "baseline_pss_mb", "peak_pss_mb",
                       "peak_rss_sum_mb", "peak_pss_vs_1x", "peak_rss_vs_1x"])
    write_results(f"bench_memory-{args.size}", {"n": args.n, "size": args.size, "batch_size": args.batch_size,
                                                 "rows": rows}, folder=args.results)


if __name__ == "__main__":
    main()
