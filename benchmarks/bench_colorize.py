"""The bulk job end to end against what a person could do without it, in one run.

    .venv/bin/python -m benchmarks.bench_colorize --n 2000 --size 256

Four ways to turn N generated JPEGs into colour PNGs, on the same images, model and PNG level:

- ``naive``: the sequential loop a notebook user writes (PIL open, lightness, the model on one
  image, chroma upsampled, PNG save), with one torch thread, its fastest setting here (torch's
  default, a thread per core, is also timed on a tenth of the sample: with anything else
  running, its threads wait on each other);
- ``tight``: the same work without Ray, the best a single machine gets by hand: a torch
  DataLoader with one worker process per core decoding, the batched model (in the bulk job's
  inference form) in the main process, a pool of writer processes composing and encoding;
- ``codec bound``: JPEG decode, greyscale and an RGB PNG encode of the same image alone, timed
  in one process and multiplied by the cores: no colouriser can beat it;
- ``bulk``: :func:`colorize.pipeline.run`, the ``colorize run`` job, PNG output only (the others
  write no Parquet), on a Ray instance started beforehand as a cluster would be (with Ray
  Data's cluster-wide actors, which the first Ray Data job on a cluster starts);
- ``bulk, warm workers``: the bulk job again on the worker processes the first run started;
- ``bulk-actors``: the same job with ``--actors 1``, the model in an actor between decode and
  write tasks (the GPU layout, and the CPU default before the fused tasks);
- ``bulk-flip``: the bulk job with ``--flip-average`` (each image's chroma averaged with its
  mirror image's, twice the model's work), on warm workers, against ``bulk, warm workers``.
"""

from __future__ import annotations

import argparse
import copy
import io
import os
import shutil
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from benchmarks.common import add_results_flag, print_table, start_ray, warm_ray_data, write_jpegs, write_results
from colorize import color, colorizer, images
from colorize.pipeline import for_inference

MAX_PIXELS = 80_000_000


def naive(paths: list[Path], out: Path, model: torch.nn.Module, png_level: int, threads: int) -> None:
    """One image at a time, as the seed notebook would: nothing batched, nothing overlapped."""
    torch.set_num_threads(threads)
    size = model.config.image_size
    for path in paths:
        rgb = np.asarray(Image.open(path).convert("RGB"))
        x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255.0  # (1,3,H,W) sRGB in [0,1]
        L = color.rgb_to_lab(x)[:, :1]  # (1,1,H,W) in [0,100]
        small = F.interpolate(L, size=(size, size), mode="bilinear", antialias=True)
        with torch.inference_mode():
            ab = colorizer.predict_ab(model, small)
        ab = F.interpolate(ab, size=L.shape[-2:], mode="bilinear", align_corners=False)
        out_rgb = color.to_uint8(color.lab_to_rgb(torch.cat((L, ab), dim=1))[0].permute(1, 2, 0).numpy())
        Image.fromarray(out_rgb).save(out / f"{path.stem}.png", compress_level=png_level)


class _Decoded(Dataset):
    """Files -> (name, full-resolution L, L at the model's size), decoded in DataLoader workers."""

    def __init__(self, paths: list[Path], size: int) -> None:
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[str, np.ndarray, np.ndarray]:
        decoded = images.decode(self.paths[i].read_bytes(), max_pixels=MAX_PIXELS)
        return self.paths[i].stem, decoded.L, images.resize_lightness(decoded.L, self.size)


def _collate(rows: list[tuple[str, np.ndarray, np.ndarray]]) -> tuple[list[str], list[np.ndarray], torch.Tensor]:
    names, full, small = zip(*rows)
    return list(names), list(full), torch.from_numpy(np.stack(small))[:, None]  # (B,1,S,S)


def _compose_and_write(jobs: list[tuple[str, np.ndarray, np.ndarray]], out: Path, png_level: int) -> int:
    for name, L, ab in jobs:
        png = images.encode_png(images.compose(L, ab), None, level=png_level)
        (out / f"{name}.png").write_bytes(png)
    return len(jobs)


def tight(paths: list[Path], out: Path, model: torch.nn.Module, png_level: int, batch_size: int) -> None:
    """DataLoader workers decode, the main process runs the batched model, a pool writes.

    The model in the form the bulk job runs it (BatchNorm folded, channels-last), so that
    the two differ only in how the work is spread over processes.
    """
    cores = os.cpu_count() or 1
    torch.set_num_threads(1)
    model = for_inference(copy.deepcopy(model)).to(memory_format=torch.channels_last)
    loader = DataLoader(_Decoded(paths, model.config.image_size), batch_size=batch_size, num_workers=cores,
                        collate_fn=_collate, prefetch_factor=4)
    in_flight: set = set()
    with ProcessPoolExecutor(cores, mp_context=get_context("fork")) as writers:
        for names, full, small in loader:
            with torch.inference_mode():
                ab = colorizer.predict_ab(model, small).numpy()
            jobs = list(zip(names, full, ab))
            for start in range(0, len(jobs), 8):  # a few images per IPC round trip
                in_flight.add(writers.submit(_compose_and_write, jobs[start:start + 8], out, png_level))
            while len(in_flight) > 4 * cores:  # backpressure: bounded memory, like the job
                done, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
                for future in done:
                    future.result()
        for future in in_flight:
            future.result()


def codec_seconds_per_image(paths: list[Path], png_level: int) -> float:
    """Decode, grey and RGB PNG encode alone, in this process: the per-core floor."""
    started = time.perf_counter()
    for path in paths:
        rgb = Image.open(path).convert("RGB")
        rgb.convert("L")
        rgb.save(io.BytesIO(), format="PNG", compress_level=png_level)
    return (time.perf_counter() - started) / len(paths)


def bulk(
    folder: Path, out: Path, png_level: int, batch_size: int, actors: int | None = None, flip: bool = False
) -> dict[str, Any]:
    from colorize.pipeline import BulkConfig, run

    return run(BulkConfig(input=str(folder), output=str(out), formats=("png",), png_level=png_level,
                          batch_size=batch_size, actors=actors, flip_average=flip, overwrite=True))


def _timed(label: str, work, n: int, out: Path) -> dict[str, Any]:  # noqa: ANN001
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    started = time.perf_counter()
    work(out)
    seconds = time.perf_counter() - started
    written = len(list(out.rglob("*.png")))
    if written != n:
        raise RuntimeError(f"{label}: wrote {written} PNGs for {n} inputs")
    print(f"{label}: {n} images in {seconds:.1f} s", flush=True)
    return {"mode": label, "images": n, "seconds": round(seconds, 2), "images_per_s": round(n / seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="images (default: 2000)")
    parser.add_argument("--size", default="256", help="S for SxS, or WxH, e.g. 1024x768 (default: 256)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per model call (default: 64)")
    parser.add_argument("--png-level", type=int, default=None,
                        help="PNG compression level for every mode (default: the job's default)")
    parser.add_argument("--naive-n", type=int, default=500,
                        help="images for the naive loop and the codec floor, at most --n (default: 500)")
    parser.add_argument("--modes", default="codec,naive,tight,bulk,bulk-actors",
                        help="comma-separated subset to run, of those and bulk-flip (default: %(default)s)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/colorize-bench"))
    parser.add_argument("--name", help="results file name (default: bench_colorize-WxH)")
    add_results_flag(parser)
    args = parser.parse_args()
    if args.n < 1 or args.naive_n < 1:
        parser.error(f"--n and --naive-n must be at least 1, got {args.n} and {args.naive_n}")
    unknown = set(args.modes.split(",")) - {"codec", "naive", "tight", "bulk", "bulk-actors", "bulk-flip"}
    if unknown:
        parser.error(f"--modes: unknown {', '.join(sorted(unknown))}; the modes are codec, naive, tight, bulk, bulk-actors, bulk-flip")

    from colorize.pipeline import BulkConfig

    width, _, height = args.size.partition("x")
    width, height = int(width), int(height or width)
    png_level = BulkConfig.png_level if args.png_level is None else args.png_level
    folder = args.workdir / f"jpeg-{width}x{height}-{args.n}"
    paths = write_jpegs(folder, args.n, height, width)
    model, weights_id = colorizer.load_weights(None)
    sample = paths[: min(args.naive_n, args.n)]
    modes = args.modes.split(",")
    rows: list[dict[str, Any]] = []
    if "codec" in modes:
        per_image = codec_seconds_per_image(sample, png_level)
        cores = os.cpu_count() or 1
        rows.append({"mode": "codec bound", "images": len(sample), "seconds": round(per_image * len(sample), 2),
                     "images_per_s": round(cores / per_image, 2), "note": f"1 process x {cores} cores"})
    if "naive" in modes:
        default_threads = torch.get_num_threads()
        rows.append(_timed("naive", lambda out: naive(sample, out, model, png_level, 1), len(sample),
                           args.workdir / "out-naive") | {"note": "1 torch thread"})
        few = sample[: max(1, len(sample) // 10)]
        rows.append(_timed("naive, default threads", lambda out: naive(few, out, model, png_level, default_threads),
                           len(few), args.workdir / "out-naive") | {"note": f"{default_threads} torch threads"})
    if "tight" in modes:
        rows.append(_timed("tight", lambda out: tight(paths, out, model, png_level, args.batch_size), len(paths),
                           args.workdir / "out-tight"))
    if {"bulk", "bulk-actors", "bulk-flip"} & set(modes):
        import ray

        ray_start = start_ray()  # outside the timed part, as on a cluster that is already up
        ray_start += warm_ray_data()
        # Each job's first run starts its worker processes (each imports torch); a second
        # run in the same job finds them started, as a long job does after its first minute.
        for label, mode, actors, flip in (("bulk", "bulk", None, False), ("bulk, warm workers", "bulk", None, False),
                                          ("bulk-flip", "bulk-flip", None, True), ("bulk-actors", "bulk-actors", 1, False)):
            if mode in modes or (mode == "bulk" and "bulk-flip" in modes):  # flip's baseline: warm workers
                run_bulk = lambda out, a=actors, f=flip: bulk(folder, out, png_level, args.batch_size, a, f)  # noqa: E731
                rows.append(_timed(label, run_bulk, len(paths), args.workdir / f"out-{mode}")
                            | {"note": f"Ray and Ray Data started beforehand in {ray_start:.1f} s"})
        ray.shutdown()

    rate = {row["mode"]: row["images_per_s"] for row in rows}
    for row in rows:
        for base in ("naive", "tight", "codec bound", "bulk, warm workers"):
            if base in rate and row["mode"] != base:
                row[f"x {base}"] = round(row["images_per_s"] / rate[base], 3)
    columns = ["mode", "images", "seconds", "images_per_s", "x naive", "x tight", "x codec bound",
               "x bulk, warm workers", "note"]
    print(f"\n{args.n} JPEGs of {width}x{height}, batch {args.batch_size}, PNG level {png_level}, {weights_id}")
    print_table(rows, columns)
    write_results(args.name or f"bench_colorize-{width}x{height}",
                  {"n": args.n, "width": width, "height": height, "batch_size": args.batch_size,
                   "png_level": png_level, "weights": weights_id, "rows": rows}, folder=args.results)


if __name__ == "__main__":
    main()
