"""The classification head's ab-cell encoding and loss, each against the code it replaced.

    .venv/bin/python -m benchmarks.bench_quantize [--batch 256] [--size 64] [--repeats 3]
    .venv/bin/python -m benchmarks.bench_quantize --part loss [--batch 64] [--size 64]

Every ``--loss ce`` step soft-encodes its targets over the 262 gamut cells, and the run's
colour prior hard-encodes 2,048 images first. Each pixel's squared distance to every cell
used to be one ``(B, H, W, Q, 2)`` difference and its square, 3.8 KB a pixel: 4 GB for the
prior's batches of 256 images at 64 px, and 4x that per doubling of the side.
:func:`colorize.quantize._nearest` holds ``CHUNK_PIXELS`` pixels' distances at a time, from two
``(pixels, Q)`` blocks. Both are timed here on the same seeded ab, and each in a child
process of its own so that its peak resident memory is its alone (the peak above what the
process held once its inputs were made); the baseline row is the broadcast, which every ratio
is taken against. Results are checked to be identical.

``--part loss`` times one forward and backward pass of
:func:`colorize.quantize.classification_loss` (rebalanced) on seeded logits, a training
step's share of the head. The baseline builds the dense ``(B, Q, H, W)`` target and multiplies
it by the log probabilities, as the loss did before it gathered each pixel's 5 cells; the loss
and the gradient are checked to agree.
"""

from __future__ import annotations

import argparse
import multiprocessing
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


def _status_kib(field: str) -> int:
    """A ``/proc/self/status`` memory figure (``VmRSS``, ``VmHWM``) in KiB."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(f"{field}:"))


def _from_here() -> int:
    """Resets the process's peak resident memory to what it holds now, and returns that (KiB).

    The setup's own transient peak (``ab_bins()`` briefly takes 400 MB) would otherwise hide the
    work's under it, as ``ru_maxrss`` did: the chunked encoding read 0.16 GB for a real 0.56 GB.
    """
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # the kernel's reset of VmHWM to VmRSS
    return _status_kib("VmRSS")


def _dense_loss(logits: torch.Tensor, ab: torch.Tensor, bins: torch.Tensor, class_weights: torch.Tensor) -> torch.Tensor:
    """The loss before it was sparse: a dense target over every cell, multiplied in."""
    target = quantize.soft_encode(ab, bins)
    per_pixel = -(target * torch.log_softmax(logits.float(), dim=1)).sum(dim=1)
    return (class_weights[target.argmax(dim=1)] * per_pixel).mean()


def _measure_loss(way: str, batch: int, size: int, repeats: int, queue: multiprocessing.Queue) -> None:
    torch.set_num_threads(2)
    generator = torch.Generator().manual_seed(0)
    bins = ab_bins()
    ab = torch.randn(batch, 2, size, size, generator=generator) * 40
    logits = torch.randn(batch, len(bins), size, size, generator=generator) * 3
    class_weights = torch.rand(len(bins), generator=generator) + 0.5
    loss_fn = _dense_loss if way == "dense" else quantize.classification_loss
    before = _from_here()
    times = []
    for _ in range(repeats):
        leaf = logits.detach().requires_grad_()
        started = time.perf_counter()
        loss = loss_fn(leaf, ab, bins, class_weights)
        loss.backward()
        times.append(time.perf_counter() - started)
    peak = _status_kib("VmHWM") - before
    queue.put({"way": way, "seconds": statistics.median(times), "peak_gb": peak / 2**20,
               "checksum": (loss.item(), leaf.grad.double().abs().sum().item())})


def _measure(way: str, batch: int, size: int, repeats: int, queue: multiprocessing.Queue) -> None:
    torch.set_num_threads(2)
    ab = torch.randn(batch, 2, size, size, generator=torch.Generator().manual_seed(0)) * 40
    bins = ab_bins()
    encode = _broadcast if way == "broadcast" else quantize._nearest
    before = _from_here()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        hard = encode(ab, bins, 1)[1]
        soft = encode(ab, bins, quantize.NEIGHBOURS)
        times.append(time.perf_counter() - started)
    peak = _status_kib("VmHWM") - before
    queue.put({"way": way, "seconds": statistics.median(times), "peak_gb": peak / 2**20,
               "checksum": (int(hard.sum()), float(soft[0].sum()), int(soft[1].sum()))})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("encoding", "loss"), default="encoding",
                        help="the cell encoding, or the loss's forward and backward pass (default: encoding)")
    parser.add_argument("--batch", type=int, help="images a batch (default: 256, the prior's, for the encoding; "
                                                   "64, training's, for the loss)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default: 64)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats, median kept (default: 3)")
    add_results_flag(parser)
    args = parser.parse_args()
    encoding = args.part == "encoding"
    batch = args.batch or (256 if encoding else 64)
    ways, measure = (("broadcast", "chunked"), _measure) if encoding else (("dense", "sparse"), _measure_loss)
    context = multiprocessing.get_context("spawn")
    rows = []
    for way in ways:
        queue = context.Queue()
        child = context.Process(target=measure, args=(way, batch, args.size, args.repeats, queue))
        child.start()
        rows.append(queue.get())
        child.join()
    checksums = [row.pop("checksum") for row in rows]
    if encoding and checksums[0] != checksums[1]:
        raise SystemExit("the chunked encoding differs from the broadcast one")
    if not encoding and not all(abs(a - b) <= 1e-5 * abs(a) for a, b in zip(*checksums)):
        raise SystemExit(f"the sparse loss differs from the dense one: {checksums}")
    base = rows[0]
    for row in rows:
        row["time_ratio"] = row["seconds"] / base["seconds"]
        row["memory_ratio"] = row["peak_gb"] / base["peak_gb"] if base["peak_gb"] else None  # too small to raise the peak
    pixels = f"{batch * args.size**2 / 1e6:.2f} M pixels, {len(ab_bins())} cells"
    if encoding:
        print(f"hard and {quantize.NEIGHBOURS}-neighbour encoding of {batch} images at {args.size} px "
              f"({pixels}, chunks of {quantize.CHUNK_PIXELS:,} pixels)")
    else:
        print(f"rebalanced classification loss, forward and backward, {batch} images at {args.size} px ({pixels})")
    print_table(rows, ["way", "seconds", "time_ratio", "peak_gb", "memory_ratio"])
    name = f"bench_quantize-{args.size}px" if encoding else f"bench_quantize-loss-{args.size}px"
    write_results(name, {"part": args.part, "batch": batch, "size": args.size, "rows": rows}, args.results)


if __name__ == "__main__":
    main()
