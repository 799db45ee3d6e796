"""Ray Train against a plain PyTorch loop on the same model, batch size, data and threads.

    .venv/bin/python -m benchmarks.bench_train --n 2048 --epochs 2

Each row trains the default U-Net with :func:`colorize.objectives.train_step` (the step
``colorize train`` takes) on ``n`` generated 32x32 JPEGs and reports the images/s of its
last epoch (the first pays for warm-up). Data comes either from memory (decoded and converted
to Lab once, up front) or streamed from Parquet shards through Ray Data with
:func:`colorize.data.lab_dataset` (decode, crop, flip and Lab in CPU tasks), as ``colorize
train`` reads them. Ray Train workers run the loop of ``colorize train`` less its validation
and checkpoints: ``prepare_model``, ``get_dataset_shard``, ``iter_torch_batches``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import ray
import ray.train
import ray.train.torch
import torch
from ray.train import DataConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from benchmarks.common import add_results_flag, print_table, start_ray, write_parquet_shards, write_results
from colorize import data
from colorize.cli import positive_int
from colorize.models import ModelConfig, build_model
from colorize.objectives import train_step
from colorize.train import default_cpus_per_worker


def in_memory(folder: Path) -> dict[str, np.ndarray]:
    """Every shard decoded and converted to Lab once: ``L`` (N,1,32,32), ``ab`` (N,2,32,32)."""
    blobs = np.array(pq.read_table(folder, columns=["image"]).column("image").to_pylist(), dtype=object)
    return data.prepare_batch({"bytes": blobs}, image_size=32, augment=True)


def _epochs(batches, model: torch.nn.Module, optimizer: torch.optim.Optimizer, epochs: int) -> list[dict[str, float]]:  # noqa: ANN001
    """``epochs`` passes over ``batches()`` (a callable giving an iterable of L/ab batches)."""
    rows = []
    for _ in range(epochs):
        started, images = time.perf_counter(), 0
        for batch in batches():
            train_step(model, {"L": batch["L"], "ab": batch["ab"]}, optimizer)
            images += len(batch["L"])
        rows.append({"images": images, "seconds": time.perf_counter() - started})
    return rows


def _memory_batches(arrays: dict[str, torch.Tensor], batch_size: int, rank: int = 0, world: int = 1):  # noqa: ANN202
    L, ab = arrays["L"][rank::world], arrays["ab"][rank::world]

    def batches():  # noqa: ANN202
        order = torch.randperm(len(L), device=L.device)
        for start in range(0, len(L) - batch_size + 1, batch_size):
            index = order[start:start + batch_size]
            yield {"L": L[index], "ab": ab[index]}

    return batches


def plain(arrays: dict[str, np.ndarray] | None, folder: Path, batch_size: int, epochs: int, threads: int) -> list[dict[str, float]]:
    """The loop a person writes without Ray Train, in this process."""
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    model = build_model(ModelConfig()).to(memory_format=torch.channels_last)  # as colorize train's workers
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    if arrays is not None:
        tensors = {k: torch.from_numpy(arrays[k]) for k in ("L", "ab")}
        return _epochs(_memory_batches(tensors, batch_size), model, optimizer, epochs)
    dataset = data.lab_dataset(data.locate(str(folder)), image_size=32, augment=True)
    return _epochs(lambda: dataset.iter_torch_batches(batch_size=batch_size, local_shuffle_buffer_size=4 * batch_size),
                   model, optimizer, epochs)


def _worker(config: dict[str, Any]) -> None:
    """Ray Train's side: the loop of ``colorize train`` without validation and checkpoints."""
    torch.manual_seed(0)
    torch.set_num_threads(config["threads"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    model = ray.train.torch.prepare_model(build_model(ModelConfig()).to(memory_format=torch.channels_last))
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    per_worker = config["batch_size"] // world
    if config["arrays"] is not None:
        arrays = {k: torch.from_numpy(v).to(device) for k, v in ray.get(config["arrays"]).items() if k in ("L", "ab")}
        batches = _memory_batches(arrays, per_worker, rank, world)
    else:
        shard = ray.train.get_dataset_shard("train")
        batches = lambda: shard.iter_torch_batches(  # noqa: E731
            batch_size=per_worker, device=device, local_shuffle_buffer_size=4 * per_worker)
    last = _epochs(batches, model, optimizer, config["epochs"])[-1]
    # DDP keeps the ranks in step, so rank 0's epoch time is the run's. Ray Train hands back
    # the metrics that came with the latest checkpoint, hence a token one.
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = ray.train.Checkpoint.from_directory(directory) if rank == 0 else None
        ray.train.report({"images": last["images"] * world, "seconds": last["seconds"]}, checkpoint=checkpoint)


def ray_train(arrays: dict[str, np.ndarray] | None, folder: Path, workers: int, batch_size: int, epochs: int,
              threads: int, storage: Path, gpu: bool = False) -> dict[str, float]:
    """``workers`` Ray Train workers (a GPU each with ``gpu``; on CPUs, each a share that leaves
    one CPU to Ray Data); the last epoch's images and seconds."""
    datasets = {} if arrays is not None else {"train": data.lab_dataset(data.locate(str(folder)), image_size=32, augment=True)}
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"arrays": None if arrays is None else ray.put(arrays), "batch_size": batch_size,
                           "epochs": epochs, "threads": threads},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpu,
                                     resources_per_worker={"CPU": default_cpus_per_worker(workers, gpu)}),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=["train"]),
        run_config=RunConfig(name=f"bench-{workers}-{'memory' if arrays is not None else 'data'}-{time.time_ns()}",
                             storage_path=str(storage)),
    )
    return trainer.fit().metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=positive_int, default=2048, help="training images (default: 2048)")
    parser.add_argument("--epochs", type=positive_int, default=2, help="epochs per row; the last is reported (default: 2)")
    parser.add_argument("--batch-size", type=int, default=64, help="global batch size (default: 64)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (default: 1)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/colorize-bench"))
    add_results_flag(parser)
    args = parser.parse_args()
    if not 2 <= args.batch_size <= args.n or args.batch_size % 2:
        parser.error(f"--batch-size must be even, between 2 and --n {args.n}, got {args.batch_size}: the 2-worker rows "
                     "split it in halves, and batches drop a partial last batch")

    folder = write_parquet_shards(args.workdir / f"parquet-32-{args.n}", args.n, 32, rows_per_shard=512)
    arrays = in_memory(folder)
    start_ray()
    runs = [("plain loop", 1, True), ("plain loop", 1, False), ("Ray Train", 1, True), ("Ray Train", 1, False),
            ("Ray Train", 2, True), ("Ray Train", 2, False)]
    rows: list[dict[str, Any]] = []
    for name, workers, memory in runs:
        if name == "plain loop":
            last = plain(arrays if memory else None, folder, args.batch_size, args.epochs, args.threads)[-1]
        else:
            last = ray_train(arrays if memory else None, folder, workers, args.batch_size, args.epochs, args.threads,
                             args.workdir / "ray-train")
        row = {"trainer": name, "workers": workers, "data": "memory" if memory else "Ray Data",
               "images": int(last["images"]), "seconds": round(last["seconds"], 2),
               "images_per_s": round(last["images"] / last["seconds"], 1)}
        print(row, flush=True)
        rows.append(row)
    rate = {(r["trainer"], r["workers"], r["data"]): r["images_per_s"] for r in rows}
    for row in rows:
        row["x plain, memory"] = round(row["images_per_s"] / rate[("plain loop", 1, "memory")], 3)
        if row["data"] == "Ray Data":
            row["x same, memory"] = round(row["images_per_s"] / rate[(row["trainer"], row["workers"], "memory")], 3)
    print(f"\n{args.n} images of 32x32, U-Net {ModelConfig()}, global batch {args.batch_size}, "
          f"{args.threads} torch thread(s) per process, epoch {args.epochs} of {args.epochs}")
    print_table(rows, ["trainer", "workers", "data", "images", "seconds", "images_per_s", "x plain, memory", "x same, memory"])
    write_results("bench_train", {"n": args.n, "epochs": args.epochs, "batch_size": args.batch_size,
                                  "threads": args.threads, "model": ModelConfig().to_dict(), "rows": rows}, folder=args.results)


if __name__ == "__main__":
    main()
