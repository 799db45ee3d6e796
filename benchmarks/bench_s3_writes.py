"""Writing outputs to S3: one PUT an object against the multipart upload it replaced.

    .venv/bin/python -m benchmarks.bench_s3_writes [--objects 300] [--sizes 20000,4000000] [--repeat 3]

A real S3 server (SeaweedFS, from the test extra) on loopback takes ``--objects`` objects of
each size through :func:`colorize.storage.write_bytes_atomic`, as the bulk job writes a PNG
or a Parquet part: with the project's filesystem (``allow_delayed_open``: the object is put
when its stream closes, in one PUT below Arrow's 10 MiB part size) and with one built as
before it (the baseline: every object a multipart upload, create, part and complete, three
requests). The two take turns, round by round; each one's best round is reported. On
loopback a request costs about a millisecond; on AWS, tens.
"""

from __future__ import annotations

import argparse
import os
import time
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from benchmarks.common import add_results_flag, print_table, write_results
from colorize import storage
from tests.s3server import S3_ACCESS_KEY, S3_REGION, S3_SECRET_KEY, seaweedfs


def write_all(fs: pafs.FileSystem, prefix: str, objects: int, data: bytes) -> float:
    started = time.perf_counter()
    for i in range(objects):
        storage.write_bytes_atomic(fs, f"{prefix}/{i:05d}.bin", data)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objects", type=int, default=300, help="objects of each size, each arm (default: 300)")
    parser.add_argument("--sizes", default="20000,4000000",
                        help="object sizes in bytes, comma-separated (default: 20000,4000000: a 64 px PNG, a Parquet part)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds, each arm once a round (default: 3)")
    add_results_flag(parser)
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    if args.objects < 1 or args.repeat < 1 or min(sizes) < 1:
        parser.error("--objects, --repeat and each of --sizes must be at least 1")

    os.environ.update(AWS_ACCESS_KEY_ID=S3_ACCESS_KEY, AWS_SECRET_ACCESS_KEY=S3_SECRET_KEY, AWS_REGION=S3_REGION)
    with seaweedfs() as server:
        bucket = server.bucket("bench-writes").removeprefix("s3://")
        endpoint = urlsplit(server.settings.endpoint)
        arms = {
            "multipart (baseline)": pafs.S3FileSystem(region=S3_REGION, endpoint_override=endpoint.netloc,
                                                      scheme=endpoint.scheme, allow_delayed_open=False),
            "one PUT": storage.s3_filesystem(server.settings),
        }
        best = {(size, arm): float("inf") for size in sizes for arm in arms}
        for round_ in range(args.repeat):
            for size in sizes:
                data = os.urandom(size)
                for number, (arm, fs) in enumerate(arms.items()):
                    prefix = f"{bucket}/r{round_}-{size}-{number}"
                    best[size, arm] = min(best[size, arm], write_all(fs, prefix, args.objects, data))
        baseline = next(iter(arms))
    rows = [
        {"bytes": size, "writer": arm, "seconds": round(best[size, arm], 3),
         "objects/s": round(args.objects / best[size, arm], 1),
         "x baseline": round(best[size, baseline] / best[size, arm], 2)}
        for size in sizes for arm in arms
    ]
    print_table(rows, ["bytes", "writer", "seconds", "objects/s", "x baseline"])
    write_results("bench_s3_writes", {"objects": args.objects, "sizes": sizes, "repeat": args.repeat, "rows": rows},
                  folder=args.results)


if __name__ == "__main__":
    main()
