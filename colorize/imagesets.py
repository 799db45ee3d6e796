"""Labelled image sets held in memory, for studies that fit in RAM (ablation, linear probe).

CIFAR-10's 60,000 thumbnails take 180 MB as uint8, so the ablation can keep a whole split
on the GPU and skip the input pipeline entirely. Folders only, in the ImageNet layout
(``ROOT/<class>/.../<image>``), read with PIL; no Ray, so this runs on a machine without it.
"""

from __future__ import annotations

import os
import random
import re
import sys
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
from PIL import Image, ImageOps

from colorize import images, storage
from colorize.sources import IMAGE_SUFFIXES


@dataclass(frozen=True)
class ImageSet:
    """``rgb`` uint8 (N, S, S, 3), ``labels`` int64 (N,) indexing ``classes``; the
    ``unreadable`` files (paths) were skipped. ``index`` (N,) is each image's place in the
    folder's whole sorted listing of ``listed`` files, whatever subset ``limit`` kept."""

    rgb: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]
    unreadable: tuple[str, ...] = ()
    index: np.ndarray | None = None
    listed: int = 0


def load_folder(root: str | Path, *, size: int, limit: int | None = None, seed: int = 0) -> ImageSet:
    """Every image under ``root`` (class = first folder below it), centre-cropped to ``size``.

    ``limit`` keeps a seeded random subset of the whole listing (not drawn class by class: a
    small one may miss a class). ``classes`` are the class folders with a readable image kept.
    Files that cannot be decoded, and dangling links, pipes and devices, are skipped and named
    in ``unreadable``.
    """
    if str(root).lower().startswith("s3:/"):  # as given, or after Path() made s3://b into s3:/b
        root = re.sub("^s3:/+", "s3://", str(root), flags=re.IGNORECASE)
        raise ValueError(f"{root}: an S3 URI, but this command reads a local folder into memory; copy it down first (aws s3 sync)")
    root = Path(root)
    if not root.exists():
        raise ValueError(f"{root}: no such folder; expected a folder of class folders")
    if not root.is_dir():
        raise ValueError(f"{root}: not a folder of class folders")
    # storage's walk, as training's: class folders that are symbolic links are followed (rglob skips them).
    found = storage.list_files(pafs.LocalFileSystem(), str(root))
    images_found = [Path(p) for p in found if p.lower().endswith(IMAGE_SUFFIXES)]
    hidden = [p for p in images_found if storage.is_hidden(str(p), str(root))]
    if hidden:  # as training's data.locate: copies (.ipynb_checkpoints/) would be classes of their own
        print(f"{root}: skipping {len(hidden)} image(s) that are dot files or lie in dot folders, such as {hidden[0]}",
              file=sys.stderr, flush=True)
        images_found = [p for p in images_found if not storage.is_hidden(str(p), str(root))]
    # Dangling links, pipes, devices: unreadable, but neither loose images nor in the listing
    # (whose order holds photo_model's holdout). A pipe would block its read for ever.
    not_files = tuple(str(p) for p in images_found if not os.path.isfile(p))
    files = sorted(p for p in images_found if os.path.isfile(p))
    if not files:
        raise ValueError(f"{root}: no images found")
    loose = [p for p in files if len(p.relative_to(root).parts) < 2]
    if loose:
        raise ValueError(f"{root}: images must sit in class folders, found {loose[0].name} directly in it")
    listed = {p: i for i, p in enumerate(files)}
    if limit and limit < len(files):
        files = sorted(random.Random(seed).sample(files, limit))
    with ThreadPoolExecutor(max_workers=4) as pool:  # PIL releases the GIL while decoding
        decoded = list(pool.map(lambda p: _square(p, size), files))
    readable = [(p, a) for p, a in zip(files, decoded) if a is not None]
    if not readable:
        raise ValueError(f"{root}: none of its {len(files)} images could be read")
    # NFC: a class folder copied from macOS (NFD) is the same class as its NFC twin elsewhere.
    named = [unicodedata.normalize("NFC", p.relative_to(root).parts[0]) for p, _ in readable]
    classes = tuple(sorted(set(named)))
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index[name] for name in named], dtype=np.int64)
    index = np.array([listed[p] for p, _ in readable], dtype=np.int64)
    unreadable = tuple(sorted([*not_files, *(str(p) for p, a in zip(files, decoded) if a is None)]))
    return ImageSet(np.stack([a for _, a in readable]), labels, classes, unreadable, index=index, listed=len(listed))


def _square(path: Path, size: int) -> np.ndarray | None:
    """The image at ``path`` as :func:`square` makes it, or None if it cannot be decoded."""
    if not os.path.isfile(path):  # gone since the listing, or replaced by a pipe, which would block for ever
        return None
    try:
        with Image.open(path) as img:
            return np.asarray(square(img, size), dtype=np.uint8)
    except Exception:  # noqa: BLE001 - format plugins raise OSError, ValueError, SyntaxError...
        return None


def square(img: Image.Image, size: int) -> Image.Image:
    """An image, upright (EXIF), in RGB, centre-cropped to a square and resized to ``size``."""
    img = images.to_rgb(ImageOps.exif_transpose(img))
    side = min(img.size)
    left, top = (img.width - side) // 2, (img.height - side) // 2
    img = img.crop((left, top, left + side, top + side))
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=3.0)
    return img
