"""The classification head's ab-cell encoding: chunked against the one-block broadcast it replaced.

    .venv/bin/python -m benchmarks.bench_quantize [--batch 256] [--size 64] [--repeats 3]

Every ``--loss ce`` step soft-encodes its targets over the 262 gamut cells, and the run's
colour prior hard-encodes 2,048 images first. Each pixel's squared distance to every cell
used to be one ``(B, H, W, Q, 2)`` difference and its square, 3.8 KB a pixel: 4 GB for the
prior's batches of 256 images at 64 px, and 4x that per doubling of the side.
:func:`colorize.quantize._nearest` holds ``CHUNK_PIXELS`` pixels' distances at a time, from two
``(pixels, Q)`` blocks. Both are timed here on the same seeded ab, and each in a child
process of its own so that its peak resident memory is its alone; the baseline row is the
broadcast, which every ratio is taken against. Results are checked to be identical.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import statistics
import time

import torch

from benchmarks.common import add_results_flag, print_table, write_results
from colorize import quantize
from colorize.models import ab_bins


def _broadcast(ab: torch.Tensor, bins: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoding before chunking: every pixel against every cell in one block."""
    points = ab.float().permute(0, 2, 3, 1).unsqueeze(-2)  # (B, H, W, 1, 2)
    return ((points - bins.to(points)) ** 2).sum(dim=-1).topk(k, dim=-1, largest=False)


def _measure(way: str, batch: int, size: int, repeats: int, queue: multiprocessing.Queue) -> None:
    torch.set_num_threads(2)
    ab = torch.randn(batch, 2, size, size, generator=torch.Generator().manual_seed(0)) * 40
    bins = ab_bins()
    encode = _broadcast if way == "broadcast" else quantize._nearest
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        hard = encode(ab, bins, 1)[1]
        soft = encode(ab, bins, quantize.NEIGHBOURS)
        times.append(time.perf_counter() - started)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before  # KiB on Linux
    queue.put({"way": way, "seconds": statistics.median(times), "peak_gb": peak / 2**20,
               "checksum": (int(hard.sum()), float(soft[0].sum()), int(soft[1].sum()))})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256, help="images a batch (default: 256, the prior's)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default: 64)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats, median kept (default: 3)")
    add_results_flag(parser)
    args = parser.parse_args()
    context = multiprocessing.get_context("spawn")
    rows = []
    for way in ("broadcast", "chunked"):
        queue = context.Queue()
        child = context.Process(target=_measure, args=(way, args.batch, args.size, args.repeats, queue))
        child.start()
        rows.append(queue.get())
        child.join()
    if rows[0].pop("checksum") != rows[1].pop("checksum"):
        raise SystemExit("the chunked encoding differs from the broadcast one")
    base = rows[0]
    for row in rows:
        row["time_ratio"] = row["seconds"] / base["seconds"]
        row["memory_ratio"] = row["peak_gb"] / base["peak_gb"] if base["peak_gb"] else None  # too small to raise the peak
    print(f"hard and {quantize.NEIGHBOURS}-neighbour encoding of {args.batch} images at {args.size} px "
          f"({args.batch * args.size**2 / 1e6:.2f} M pixels, {len(ab_bins())} cells, chunks of {quantize.CHUNK_PIXELS:,} pixels)")
    print_table(rows, ["way", "seconds", "time_ratio", "peak_gb", "memory_ratio"])
    write_results(f"bench_quantize-{args.size}px", {"batch": args.batch, "size": args.size, "rows": rows}, args.results)


if __name__ == "__main__":
    main()
