"""What every benchmark shares: generated images, a process-tree memory sampler, tables, JSON.

Plain numpy, Pillow and /proc, so that the model-only GPU benchmark can import it on a
machine without Ray (that benchmark itself also needs torch and pyarrow, through colorize).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

RESULTS = Path(__file__).resolve().parent / "results"


def scene(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A uint8 (height, width, 3) photo stand-in: smooth random colour fields plus sensor noise.

    Smooth fields compress and colourise like photographs; pure noise would make every codec
    look slower and every PNG larger than real inputs do.
    """
    coarse = rng.uniform(0, 255, (4, 5, 3)).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)
    noisy = smooth + rng.normal(0.0, 3.0, smooth.shape).astype(np.float32)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def jpeg_bytes(rgb: np.ndarray, quality: int = 90, icc_profile: bytes | None = None) -> bytes:
    """``rgb`` (or grey, (H, W)) as a JPEG, with ``icc_profile`` embedded if given."""
    from io import BytesIO

    buffer = BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=quality, **({"icc_profile": icc_profile} if icc_profile else {}))
    return buffer.getvalue()


def write_jpegs(folder: Path, n: int, height: int, width: int, *, seed: int = 0) -> list[Path]:
    """``n`` deterministic JPEG scenes (quality 90) in ``folder``; reused when already there."""
    paths = [folder / f"{i:07d}.jpg" for i in range(n)]
    marker = folder.with_name(f"{folder.name}.complete-{n}-{width}x{height}-{seed}")  # outside: not an input
    if marker.exists():
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for path in paths:
        path.write_bytes(jpeg_bytes(scene(rng, height, width)))
    marker.touch()
    return paths


# --- memory of the whole process tree ------------------------------------------------------


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                # The command name may hold spaces and parentheses: fields start after the last ')'.
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def tree_pids(root: int) -> list[int]:
    """``root`` and all its descendants (Ray's raylet, GCS and workers all descend from the driver)."""
    tree, pids, stack = _children(), [], [root]
    while stack:
        pid = stack.pop()
        pids.append(pid)
        stack.extend(tree.get(pid, []))
    return pids


def tree_memory(root: int) -> tuple[int, int]:
    """(RSS, PSS) of the process tree in bytes.

    RSS counts a shared page (the object store, shared libraries) once per process that maps
    it; PSS splits it between them, so the PSS sum is what the tree really holds.
    """
    rss = pss = 0
    for pid in tree_pids(root):
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1]) * 1024
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1]) * 1024
        except OSError:  # the process ended while we looked
            continue
    return rss, pss


class MemorySampler:
    """Samples the memory of this process's tree in a thread; keeps the peaks and a time series.

    Use as a context manager; ``progress`` (a callable returning a count, e.g. images done)
    is sampled with it, so throughput can be read off the same series.
    """

    def __init__(self, interval_s: float = 0.5, progress=None) -> None:  # noqa: ANN001
        self.interval_s = interval_s
        self.progress = progress
        self.samples: list[dict[str, float]] = []
        self.peak_rss = self.peak_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._started = 0.0

    def __enter__(self) -> MemorySampler:
        self._started = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _sample(self) -> None:
        rss, pss = tree_memory(os.getpid())
        self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
        row = {"t": round(time.perf_counter() - self._started, 2), "rss_mb": rss / 2**20, "pss_mb": pss / 2**20}
        if self.progress is not None:
            row["done"] = self.progress()
        self.samples.append(row)

    def _run(self) -> None:
        # On a schedule, not a wait after each sample: a scan of /proc takes 0.25-0.5 s on two
        # busy cores, so "every 0.25 s" was every 0.5-0.7 s. One that overruns is followed at once.
        due = self._started + self.interval_s
        while not self._stop.wait(max(0.0, due - time.perf_counter())):
            self._sample()
            due = max(due + self.interval_s, time.perf_counter())


# --- reporting ------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal"))
    info: dict[str, Any] = {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(mem_kb / 2**20, 1),
                            "python": platform.python_version(),
                            "load_average_1min": os.getloadavg()[0]}
    for name in ("torch", "ray", "PIL", "numpy"):
        module = sys.modules.get(name)
        if module is not None:
            info[name] = module.__version__
    return info


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    """A plain-text table of ``rows`` (dicts), one line each, in ``columns`` order."""
    cells = [[_cell(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)))


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def add_results_flag(parser: argparse.ArgumentParser) -> None:
    """``--results DIR``: where the results JSON goes; the committed ones the docs quote are the
    default's, so a smoke run points elsewhere."""
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help="folder for the results JSON (default: benchmarks/results, which the docs quote)")


def write_results(name: str, payload: dict[str, Any], folder: Path = RESULTS) -> Path:
    """``payload`` with the command line, time and machine, as ``folder/name.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    record = {"command": " ".join(sys.argv), "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "machine": machine(), **payload}
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")
    return path


def write_parquet_shards(folder: Path, n: int, size: int, *, rows_per_shard: int = 5000, seed: int = 0) -> Path:
    """``n`` JPEG scenes of ``size`` x ``size`` as Parquet shards with an ``image`` bytes column
    (the layout ``colorize train`` reads for ImageNet-size sets); reused when already there."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    # The shard size is part of what is made: benchmarks share the folder with other sizes.
    marker = folder.with_name(f"{folder.name}.complete-{n}-{size}-{seed}-{rows_per_shard}")
    if marker.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("shard-*.parquet"):  # another size's shards would add to these rows
        stale.unlink()
    for other in folder.parent.glob(f"{folder.name}.complete-*"):
        other.unlink()
    rng = np.random.default_rng(seed)
    for shard, start in enumerate(range(0, n, rows_per_shard)):
        blobs = [jpeg_bytes(scene(rng, size, size)) for _ in range(min(rows_per_shard, n - start))]
        pq.write_table(pa.table({"image": pa.array(blobs, type=pa.binary())}), folder / f"shard-{shard:05d}.parquet")
    marker.touch()
    return folder


def start_ray() -> float:
    """Start a local Ray as ``colorize run`` would; returns the seconds it took.

    Ray lowers its workers' priority (nice +15) below the driver's; on a machine shared with
    other work that alone would slow every Ray row against the plain-Python rows it is
    compared with, so the workers keep the driver's priority here.
    """
    import ray

    os.environ.setdefault("RAY_worker_niceness", "0")
    started = time.perf_counter()
    ray.init(log_to_driver=False)
    return time.perf_counter() - started


def warm_ray_data() -> float:
    """Run a trivial Ray Data job; returns its seconds.

    The first Ray Data job on a cluster starts Ray Data's own cluster-wide actors (execution
    statistics, autoscaling requests) and a worker: 3-4 s on two cores that a cluster that is
    already up has paid once, long before any one job.
    """
    import ray.data

    started = time.perf_counter()
    ray.data.range(8).map_batches(lambda batch: batch).materialize()
    return time.perf_counter() - started
