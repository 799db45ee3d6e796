"""Streaming archives from S3: buffered reads against the unbuffered ones they replaced.

    .venv/bin/python -m benchmarks.bench_archives [--members 500] [--side 64] [--repeat 3]

A real S3 server (SeaweedFS, from the test extra) on loopback holds a tar, a tar.gz and a zip
of the same ``--members`` JPEGs. Each is read with :func:`colorize.sources.archive_members`,
as the bulk job reads it, twice: as it is (``storage.open_stream``: 8 MiB a request;
``storage.open_seekable``: 1 MiB), and with those two swapped for pyarrow's unbuffered files
(the baseline: every read of tarfile's 10 KiB records, or of a zip member's header or data,
a GET). The two take turns, round by round; each one's best round is reported. On loopback a
GET costs about a millisecond; on AWS, tens.
"""

from __future__ import annotations

import argparse
import io
import os
import tarfile
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pyarrow.fs as pafs

from benchmarks.common import add_results_flag, jpeg_bytes, print_table, scene, write_results
from colorize import sources, storage
from tests.s3server import S3_ACCESS_KEY, S3_REGION, S3_SECRET_KEY, seaweedfs


def archives(members: int, side: int) -> dict[str, bytes]:
    """A tar, a tar.gz and a zip holding the same ``members`` JPEGs of ``side`` px."""
    rng = np.random.default_rng(0)
    payloads = {f"img/{i:05d}.jpg": jpeg_bytes(scene(rng, side, side)) for i in range(members)}
    made = {}
    for name, mode in (("shard.tar", "w"), ("shard.tar.gz", "w:gz")):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode=mode) as tar:
            for member, data in payloads.items():
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        made[name] = buffer.getvalue()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for member, data in payloads.items():
            archive.writestr(member, data)
    made["shard.zip"] = buffer.getvalue()
    return made


@contextmanager
def unbuffered() -> Iterator[None]:
    """``storage``'s archive readers as they were: pyarrow's files, unbuffered."""
    kept = storage.open_stream, storage.open_seekable
    storage.open_stream = lambda fs, path: fs.open_input_stream(path, compression=None)
    storage.open_seekable = lambda fs, path: fs.open_input_file(path)
    try:
        yield
    finally:
        storage.open_stream, storage.open_seekable = kept


def read_all(fs: pafs.FileSystem, path: str, expected: int) -> float:
    started = time.perf_counter()
    members = sum(1 for m in sources.archive_members(fs, path, "shard") if m.data is not None)
    seconds = time.perf_counter() - started
    assert members == expected, (path, members)
    return seconds


def _mib(size: int) -> float:
    """``size`` bytes in MiB: to 0.1 from 1 MiB up; below, to two significant figures (a small archive is not 0)."""
    mib = size / 2**20
    return round(mib, 1) if mib >= 1 else float(f"{mib:.2g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=500, help="JPEGs in each archive (default: 500)")
    parser.add_argument("--side", type=int, default=64, help="their width and height in px (default: 64)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds, each arm once a round (default: 3)")
    add_results_flag(parser)
    args = parser.parse_args()
    if args.members < 1 or args.repeat < 1:
        parser.error("--members and --repeat must be at least 1")

    made = archives(args.members, args.side)
    os.environ.update(AWS_ACCESS_KEY_ID=S3_ACCESS_KEY, AWS_SECRET_ACCESS_KEY=S3_SECRET_KEY, AWS_REGION=S3_REGION)
    with seaweedfs() as server:
        fs, _ = storage.resolve(server.bucket("bench-archives"), server.settings)
        for name, data in made.items():
            storage.write_bytes_atomic(fs, f"bench-archives/{name}", data)
        arms = ("unbuffered (baseline)", "buffered")
        best = {(name, arm): float("inf") for name in made for arm in arms}
        for _ in range(args.repeat):
            for name in made:
                path = f"bench-archives/{name}"
                with unbuffered():
                    best[name, arms[0]] = min(best[name, arms[0]], read_all(fs, path, args.members))
                best[name, arms[1]] = min(best[name, arms[1]], read_all(fs, path, args.members))
    rows = [
        {"archive": name, "MiB": _mib(len(made[name])),
         "reader": arm, "seconds": round(best[name, arm], 3),
         "x baseline": round(best[name, arms[0]] / best[name, arm], 1)}
        for name in made for arm in arms
    ]
    print_table(rows, ["archive", "MiB", "reader", "seconds", "x baseline"])
    write_results("bench_archives", {"members": args.members, "side": args.side, "repeat": args.repeat, "rows": rows},
                  folder=args.results)


if __name__ == "__main__":
    main()
