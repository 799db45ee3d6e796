"""Listing a local input folder: ``storage.list_files`` against pyarrow's recursive listing.

    .venv/bin/python -m benchmarks.bench_listing --n 100000

``list_files`` walks local folders itself (``os.scandir``), so that it can stop at link
loops and keep dangling links as inputs; the baseline is the pyarrow ``FileSelector`` it
replaced, measured in the same run over the same ``n`` empty files in 100 x 7 folders. Best
of ``--repeat`` rounds each, alternating.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pyarrow.fs as pafs

from benchmarks.common import add_results_flag, print_table, write_results
from colorize import storage
from colorize.cli import positive_int


def make_tree(root: Path, n: int) -> None:
    for i in range(n):
        folder = root / f"c{i % 100:03d}" / f"s{i % 7}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:07d}.jpg").touch()


def pyarrow_listing(fs: pafs.FileSystem, root: str) -> list[str]:
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=positive_int, default=100_000, help="files to list (default: 100000)")
    parser.add_argument("--repeat", type=positive_int, default=3, help="timed listings of each kind, taking turns (default: 3)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/colorize-bench"))
    add_results_flag(parser)
    args = parser.parse_args()

    root = args.workdir / f"listing-{args.n}"
    marker = root.with_name(f"{root.name}.complete")  # a tree cut off while being made is made again
    if not marker.exists():
        make_tree(root, args.n)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    fs, path = pafs.LocalFileSystem(), str(root)
    best = {"pyarrow FileSelector (baseline)": float("inf"), "storage.list_files": float("inf")}
    for _ in range(args.repeat):
        for name, listing in (("pyarrow FileSelector (baseline)", pyarrow_listing), ("storage.list_files", storage.list_files)):
            started = time.perf_counter()
            files = listing(fs, path)
            best[name] = min(best[name], time.perf_counter() - started)
            assert len(files) == args.n, (name, len(files))
    baseline = best["pyarrow FileSelector (baseline)"]
    rows = [{"what": name, "seconds": round(s, 3), "files_per_s": round(args.n / s), "x baseline": round(baseline / s, 2)}
            for name, s in best.items()]
    print_table(rows, ["what", "seconds", "files_per_s", "x baseline"])
    write_results("bench_listing", {"n": args.n, "repeat": args.repeat, "rows": rows}, folder=args.results)


if __name__ == "__main__":
    main()
