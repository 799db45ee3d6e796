"""Pack the training data of jobs/gpu_models.sh small enough for one GPU lease's carry (64 MiB).

    python -m jobs.gpu_data --cifar ../shared/data/cifar10-jpeg.tar.gz \\
                            --photos ../shared/data/photos-train.tar.gz --out .gpu [--with-test]

Writes ``OUT/cifar10-train.tar.gz``, CIFAR-10's ``cifar10/train/`` members with their bytes
unchanged (the test split stays behind, where training never sees it, unless ``--with-test``
packs it apart as ``OUT/cifar10-test.tar.gz``, 3 MiB, for ``jobs/gpu_lease.sh`` to score
on), and
``OUT/photos64.tar.gz``, every photo under ``photos/`` centre-cropped and resized to ``--size``
exactly as ``imagesets.load_folder`` does it, re-encoded as JPEG (quality 90, no chroma
subsampling: 36 dB from the crops) under its own name, so that ``jobs.photo_model`` holds out the
same 608 photos on either copy. Both archives extract into one folder that
``jobs/gpu_models.sh`` takes as DATA::

    mkdir -p /tmp/d && tar xzf .gpu/cifar10-train.tar.gz -C /tmp/d && tar xzf .gpu/photos64.tar.gz -C /tmp/d
    jobs/gpu_models.sh /tmp/d /tmp/runs MINUTES

Reads the archives as streams; an archive appears under its final name only when whole.
"""

from __future__ import annotations

import argparse
import io
import tarfile
import time
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from colorize.imagesets import square
from colorize.sources import IMAGE_SUFFIXES

JPEG_QUALITY = 90


def repack(source: str | Path, destination: str | Path, prefix: str, *, shrink_to: int | None = None) -> int:
    """Write the files under ``prefix`` of one tar archive to a new .tar.gz; returns how many.

    Bytes are copied unchanged, or with ``shrink_to`` only the images are kept, each re-encoded
    as a square JPEG of that side under its own name.
    """
    try:
        src = tarfile.open(source, "r:*")
    except tarfile.ReadError:
        raise ValueError(f"{source}: not a tar archive (plain, gzip, bzip2 or xz)") from None
    count = 0
    with src, tarfile.open(destination, "w:gz") as dst:
        for member in src:
            if not (member.isfile() and member.name.startswith(prefix)):
                continue
            if shrink_to is None:
                dst.addfile(member, src.extractfile(member))
            elif Path(member.name).suffix.lower() in IMAGE_SUFFIXES:
                data = _square_jpeg(source, member, src, shrink_to)
                info = tarfile.TarInfo(member.name)
                info.size, info.mtime, info.mode = len(data), member.mtime, 0o644
                dst.addfile(info, io.BytesIO(data))
            else:
                continue
            count += 1
    if not count:
        raise ValueError(f"{source}: no {'images' if shrink_to else 'files'} under {prefix}")
    return count


def _square_jpeg(source: str | Path, member: tarfile.TarInfo, src: tarfile.TarFile, size: int) -> bytes:
    try:
        with Image.open(src.extractfile(member)) as img:
            small = square(img, size)
    except (OSError, ValueError) as error:
        # Stop rather than skip: one photo fewer would shift every later photo's place in the
        # seeded holdout split.
        raise ValueError(f"{source}: {member.name}: not a readable image ({error})") from None
    data = io.BytesIO()
    small.save(data, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    return data.getvalue()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cifar", required=True, help="cifar10-jpeg.tar.gz (cifar10/train/<class>/*.jpg inside)")
    parser.add_argument("--photos", required=True, help="photos-train.tar.gz (photos/<class>/*.jpg inside)")
    parser.add_argument("--out", required=True, help="folder for cifar10-train.tar.gz and photos64.tar.gz")
    parser.add_argument("--size", type=int, default=64, help="side of the photo crops (default: 64, the models' working size)")
    parser.add_argument("--with-test", action="store_true",
                        help="also pack CIFAR-10's test split as cifar10-test.tar.gz, which jobs/gpu_lease.sh scores on")
    args = parser.parse_args(argv)
    if args.size < 1:
        parser.error(f"--size must be at least 1, got {args.size}")
    for path in (args.cifar, args.photos):
        if not Path(path).is_file():
            parser.error(f"{path}: no such file")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    packs = [(out / "cifar10-train.tar.gz", args.cifar, "cifar10/train/", None),
             (out / f"photos{args.size}.tar.gz", args.photos, "photos/", args.size),
             *([(out / "cifar10-test.tar.gz", args.cifar, "cifar10/test/", None)] if args.with_test else [])]
    partial = [path.with_name(path.name + ".partial") for path, *_ in packs]
    try:
        counts = [repack(source, scratch, prefix, shrink_to=size) for scratch, (_, source, prefix, size) in zip(partial, packs)]
    except (tarfile.TarError, OSError, ValueError) as error:
        for path in partial:
            path.unlink(missing_ok=True)
        parser.error(str(error))
    for scratch, (path, *_) in zip(partial, packs):
        scratch.replace(path)  # only whole archives under the final names
    print(f"{counts[0]} CIFAR-10 training images{f', {counts[2]} test images' if args.with_test else ''} and {counts[1]} "
          f"photos at {args.size} px in {time.perf_counter() - started:.0f} s: "
          + ", ".join(f"{path} {path.stat().st_size / 2**20:.1f} MiB" for path, *_ in packs))


if __name__ == "__main__":
    main()
