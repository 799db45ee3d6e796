"""Training and evaluation data as streaming Ray Datasets of Lab tensors.

Sources, local or ``s3://``:

- the official CIFAR-10 python release: ``cifar-10-python.tar.gz`` or its extracted
  ``cifar-10-batches-py/`` (``split="train"`` reads ``data_batch_*``, ``"test"`` ``test_batch``);
- Parquet shards with an image-bytes column (``image``, or a struct with a ``bytes`` field as
  Hugging Face writes it): the way to store ImageNet-size sets, one listing per shard;
- any folder of images, nested to any depth (ImageNet's class-folder layout included).

Every source becomes rows of encoded ``bytes`` or decoded ``rgb``; :func:`prepare_batch` then
decodes, crops, flips and converts to Lab in Ray Data CPU tasks. A row that cannot be decoded
is kept with ``ok = False`` so the trainer can skip it and count it.

Image classes, for a model with a semantic branch (:func:`class_names`, ``class_index``): the
CIFAR-10 labels, a Parquet ``label`` column of integers, or the top-level folder of each image.
"""

from __future__ import annotations

import fnmatch
import functools
import io
import math
import os
import pickle
import posixpath
import random
import re
import sys
import tarfile
import unicodedata
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import NoReturn

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import ray.data
from PIL import Image, ImageOps

from colorize import color, errors, images, storage
from colorize.sources import ARCHIVE_SUFFIXES, IMAGE_SUFFIXES

CIFAR_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
MIN_CROP = 0.6  # the smallest random crop, as a share of the image's short side
_CIFAR_ROWS_PER_BLOCK = 1000  # a CIFAR batch file (10,000 images) is yielded in slices so blocks stay small
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class DataError(ValueError):
    """A training source that cannot be used, with the reason in one line."""


@dataclass(frozen=True)
class Source:
    """A located, checked training source; building its Dataset needs no further listing."""

    uri: str
    kind: str  # "cifar", "parquet" or "files"
    fs: pafs.FileSystem
    path: str
    files: tuple[str, ...] = ()  # the images to read (the first --limit of those listed), or the Parquet shards
    listed: tuple[str, ...] = ()  # every image found, whatever the limit: where a folder's classes come from
    left_out: tuple[str, ...] = ()  # image files found but not listed: hidden, names not UTF-8, not regular files


def locate(uri: str, *, settings: storage.S3Settings | None = None, limit: int | None = None, split: str = "train",
           output: str | None = None) -> Source:
    """Find out what ``uri`` holds, raising a one-line error for anything unusable.

    Runs on the driver before Ray starts, so bad input fails fast. ``split`` is what the
    caller reads the source for ("train"; "test" to score or validate on): a folder that holds
    the training split beside a held-out one is read whole, with a warning that says how to
    pass that split alone. The images in ``output``, the caller's own output folder, are left
    out where it lies inside ``uri``: a rerun would read its ``grid.png`` back as data.
    """
    fs, path = storage.resolve(uri, settings)
    name = posixpath.basename(path.rstrip("/"))
    if "*" in name:
        return _parquet_source(uri, fs, posixpath.dirname(path), _matching(uri, fs, path))
    info = storage.stat(fs, path, uri)
    if name == CIFAR_ARCHIVE:
        if fs.type_name == "local":  # on S3 it is read once, by the tasks
            _check_cifar_archive(uri, fs, path, split)
        return Source(uri, "cifar", fs, path)
    if _is_cifar_dir(fs, path, info):  # checked here: a task that finds a batch missing fails in a traceback
        missing = [b for b in _CIFAR_BATCHES.get(split, []) if not storage.exists(fs, storage.join(path, b))]
        if missing:
            raise DataError(f"{uri}: no {', '.join(missing)} in this CIFAR-10 folder, which the {split} split reads; "
                            "is the python release extracted whole?")
        return Source(uri, "cifar", fs, path)
    if path.endswith(".parquet") and info.type == pafs.FileType.File:  # Spark writes x.parquet/ as a folder
        return _parquet_source(uri, fs, path, [path])
    found = storage.list_files(fs, path)
    files = _outside_output(uri, fs, path, [p for p in found if p.lower().endswith(IMAGE_SUFFIXES)], output, settings)
    shards = _shards(found, path)
    if shards and (not files or _holds_images(fs, shards[0])):
        if files:  # such as a README's banner.png beside the data/ shards
            _warn(uri, f"reading its Parquet shards, not the {len(files)} image file(s) beside them", storage.to_uri(fs, files[0]))
        # Hugging Face's data/{train,validation,test}-*.parquet, or default/{train,...}/
        _warn_mixed_splits(uri, fs, path, {s: _split_named(posixpath.relpath(s, path)) for s in shards}, split, "shards")
        return _parquet_source(uri, fs, path, shards)
    if shards:  # such as the metadata.parquet of Hugging Face's image-folder layout
        _warn(uri, f"reading its image files, not the {len(shards)} Parquet file(s) without an 'image' column beside them",
              storage.to_uri(fs, shards[0]))
    files, left_out = _skipping(files, lambda p: not storage.is_hidden(p, path), uri, fs,
                                "that are dot files or lie in dot folders (copies such as .ipynb_checkpoints/, macOS's ._ files)")
    files, not_utf8 = _skipping(files, storage.is_utf8, uri, fs, "whose file names are not valid UTF-8",
                                "; rename them (convmv does) to use them")
    left_out += not_utf8
    if fs.type_name == "local":  # a named pipe would block its read task forever
        files, not_files = _skipping(files, os.path.isfile, uri, fs, "that are not regular files (dangling links, pipes, devices)")
        left_out += not_files
    # CIFAR-10 as JPEG folders, ImageNet's train/ and val/: the split is the first folder level.
    root = len(path.rstrip("/")) + 1
    top_splits = {top: _split_folder(top) for top in {p[root:].partition("/")[0] for p in files if "/" in p[root:]}}
    if len({name for name, _ in top_splits.values()} - {None}) > 1:
        named = {p: top_splits.get(p[root:].partition("/")[0], (None, -1)) for p in files}
        _warn_mixed_splits(uri, fs, path, named, split, "images")
    if not files:
        archive = " (training does not read archives: extract it, or pack it as Parquet shards)" if any(
            p.lower().endswith(ARCHIVE_SUFFIXES) for p in found) else ""
        raise DataError(f"{uri}: no image files found ({', '.join(IMAGE_SUFFIXES)}){archive}")
    # Class folders list class by class: shuffle once (seeded, so every run reads the same order) so that
    # every block, and any --limit subset, mixes the classes.
    random.Random(0).shuffle(files)
    return Source(uri, "files", fs, path, tuple(files[:limit] if limit else files), listed=tuple(files),
                  left_out=tuple(left_out))


def _outside_output(uri: str, fs: pafs.FileSystem, path: str, files: list[str], output: str | None,
                    settings: storage.S3Settings | None) -> list[str]:
    """``files`` (under folder ``path``) less those under ``output``: see :func:`locate`."""
    if not output:
        return files
    out_fs, out_path = storage.resolve(output, settings)
    if out_fs.type_name != fs.type_name:
        return files
    if fs.type_name == "local":  # where folders lead: the data, the output or a folder in the data may be a link
        path, out_path = os.path.realpath(path), os.path.realpath(out_path)
        leads_to = functools.lru_cache(maxsize=None)(os.path.realpath)  # once a folder, not once a file

        def is_output(file: str) -> bool:
            return (leads_to(os.path.dirname(file)) + "/").startswith(out_path + "/")
    else:
        path, out_path = path.rstrip("/"), out_path.rstrip("/")

        def is_output(file: str) -> bool:
            return file.startswith(out_path + "/")
    if out_path == path:
        raise DataError(f"{uri}: --out is the data folder itself, so a rerun would read its pictures as data; "
                        "choose a folder inside it or beside it")
    if path.startswith(out_path + "/"):  # the data inside the output: what it writes lies beside the data
        return files
    kept = [p for p in files if not is_output(p)]
    if len(kept) < len(files):
        _warn(uri, f"left out {len(files) - len(kept)} image(s) in the --out folder inside it",
              storage.to_uri(fs, next(p for p in files if is_output(p))))
    return kept


def _matching(uri: str, fs: pafs.FileSystem, pattern: str) -> list[str]:
    """The Parquet shards that ``pattern``'s last component (a glob: ``train-*.parquet``)
    matches in its folder (and below: ``*`` matches ``/`` too)."""
    folder, glob = posixpath.split(pattern)
    matches = matching(storage.list_files(fs, folder), folder, glob)
    if not matches:
        raise DataError(f"{uri}: no file matches {glob!r} in {storage.to_uri(fs, folder)}")
    if not all(p.endswith(".parquet") for p in matches):
        odd = next(p for p in matches if not p.endswith(".parquet"))
        raise DataError(f"{uri}: a pattern selects Parquet shards, and it matches {storage.to_uri(fs, odd)}")
    return matches


def matching(paths: Iterable[str], folder: str, glob: str) -> list[str]:
    """The ``paths`` below ``folder`` that ``glob`` matches relative to it (``*`` takes ``/`` too),
    less hidden ones, as ``--data DIR/GLOB`` selects shards (``submit`` checks them so too)."""
    return [p for p in paths if not _hidden(rel := posixpath.relpath(p, folder)) and fnmatch.fnmatchcase(rel, glob)]


def _parquet_source(uri: str, fs: pafs.FileSystem, path: str, shards: list[str]) -> Source:
    """Parquet ``shards`` under ``path``, refusing names that Ray Data's reader would drop."""
    queried = next((s for s in shards if "?" in s), None)
    if queried is not None:  # Ray parses the rest of a path after "?" as a URL's query
        raise DataError(f"{storage.to_uri(fs, queried)}: a '?' in a shard's name makes Ray Data skip it; rename it")
    columns = _columns(fs, shards[0])  # here, not once Ray has started
    if columns is not None and "image" not in columns:
        _no_image_column(fs, shards[0], columns)
    return Source(uri, "parquet", fs, path, tuple(shards))


def _no_image_column(fs: pafs.FileSystem, shard: str, columns: list[str]) -> NoReturn:
    hint = ("; these are `colorize run`'s output, colourised PNGs in 'png', not training data"
            if {"png", "source"} <= set(columns) else "")
    raise DataError(f"{storage.to_uri(fs, shard)}: Parquet shards need an 'image' column of bytes, found {columns}{hint}")


def _shards(found: list[str], folder: str) -> list[str]:
    """The Parquet files among ``found`` (listed under ``folder``), less hidden ones, as Ray's
    reader of a folder leaves them out: ``.part-0.parquet``, Spark's ``_temporary/``."""
    return [p for p in found if p.endswith(".parquet") and not _hidden(posixpath.relpath(p, folder))]


def _hidden(relpath: str) -> bool:
    return any(part.startswith((".", "_")) for part in relpath.split("/"))


def _split_named(relpath: str) -> tuple[str | None, int]:
    """("train", "val" or "test", the index of the path component naming it) where a shard's
    path names a split (``validation-00000-of-00001.parquet``, ``default/train/0000.parquet``)."""
    for index, part in enumerate(relpath.lower().split("/")):
        for split in ("train", "val", "test"):
            if part.startswith(split):
                return split, index
    return None, -1


_SPLIT_FOLDER = re.compile(r"(train|training|val|valid|validation|test|testing)([-_]?\d+)?", re.IGNORECASE)


def _split_folder(name: str) -> tuple[str | None, int]:
    """:func:`_split_named` for a folder of images: whole names only (``train``, ``val``,
    ``validation``, ``test2017``), as class folders such as ``valley/`` or ``train_station/`` are no split."""
    return _split_named(name) if _SPLIT_FOLDER.fullmatch(name) else (None, -1)


def _skipping(
    files: list[str], keep, uri: str, fs: pafs.FileSystem, why: str, hint: str = ""  # noqa: ANN001
) -> tuple[list[str], list[str]]:
    """``files`` for which ``keep`` holds and those it left out, with one warning line naming how
    many were left out, and why."""
    kept, dropped = [], []
    for p in files:  # one call a file: a stat each, 1.28 M of them for ImageNet
        (kept if keep(p) else dropped).append(p)
    if dropped:
        _warn(uri, f"skipping {len(dropped)} image(s) {why}", storage.to_uri(fs, dropped[0]), hint)
    return kept, dropped


_SPLIT_NAMES = {"train": "training", "val": "validation", "test": "test"}


def _warn_mixed_splits(uri: str, fs: pafs.FileSystem, path: str, named: dict[str, tuple[str | None, int]], split: str,
                       what: str) -> None:
    """Warn where ``named`` (each file under ``path`` -> its split, as :func:`_split_named` or,
    for a folder of images, :func:`_split_folder` gives it) holds the training split beside a
    held-out one, naming how to pass ``split``'s ``what`` alone."""
    found = {name for name, _ in named.values()} - {None}
    if "train" not in found or not found & {"val", "test"}:
        return
    wanted = "train" if split == "train" else "test" if "test" in found else "val"
    others = [f for f, (name, _) in named.items() if name not in (None, wanted)]
    keep = next(f for f, (name, _) in named.items() if name == wanted)
    parts, where = posixpath.relpath(keep, path).split("/"), named[keep][1]
    only = (f"{storage.to_uri(fs, posixpath.dirname(keep))}/{wanted}*.parquet" if where == len(parts) - 1
            else storage.to_uri(fs, storage.join(path, *parts[: where + 1])))
    other_names = " or ".join(name for key, name in _SPLIT_NAMES.items() if key in found and key != wanted)
    _warn(uri, f"reading all its {what}, {len(others)} of them named for a {other_names} split", storage.to_uri(fs, others[0]),
          f"; pass --data '{only}' for the {_SPLIT_NAMES[wanted]} {what} alone")


def _warn(uri: str, what: str, example: str, hint: str = "") -> None:
    print(f"{uri}: {what}, such as {storage.utf8_name(example)}{hint}", file=sys.stderr, flush=True)


def _holds_images(fs: pafs.FileSystem, shard: str) -> bool:
    """Whether a Parquet file has the ``image`` column of a training shard (its footer alone is read)."""
    return "image" in (_columns(fs, shard) or [])


def _columns(fs: pafs.FileSystem, shard: str) -> list[str] | None:
    """A Parquet file's column names, from its footer; None where it cannot be read as Parquet
    (reading it as a shard then fails with the reason)."""
    try:
        with fs.open_input_file(shard) as f:
            return pq.read_schema(f).names
    except (OSError, ValueError):
        return None


def class_names(source: Source) -> tuple[str, ...]:
    """The classes of ``source``'s images, in label order, raising a one-line error where it has none.

    CIFAR-10: its ten classes. Parquet: a ``label`` column of integers 0..K-1, named "0".."K-1"
    (read on its own, not the images). A folder: the top-level subfolders of every image
    listed, whatever the limit, sorted (ImageNet's layout); every image must sit in one.
    """
    if source.kind == "cifar":
        return CIFAR_CLASSES
    if source.kind == "parquet":
        return _parquet_classes(source)
    folders = [_class_folder(p, source.path) for p in source.listed]
    loose = [p for p, folder in zip(source.listed, folders) if folder is None]
    if loose:
        raise DataError(f"{source.uri}: {len(loose)} image(s), such as {storage.utf8_name(loose[0])}, are not in a class "
                        "folder; image classes come from the top-level folders (class/image.jpg)")
    return tuple(sorted(set(folders)))


def _class_folder(path: str, root: str) -> str | None:
    """The top-level folder under ``root`` that holds ``path`` (local or bucket/key), None for a
    loose file. In NFC: a val/ copied from macOS (NFD) has the classes of its NFC train/."""
    top, _, rest = posixpath.relpath(path, root).partition("/")
    return unicodedata.normalize("NFC", top) if rest else None


def _parquet_classes(source: Source) -> tuple[str, ...]:
    import pyarrow.dataset as pads

    dataset = pads.dataset(list(source.files), filesystem=source.fs, format="parquet")
    if "label" not in dataset.schema.names or not pa.types.is_integer(dataset.schema.field("label").type):
        raise DataError(f"{source.uri}: image classes need an integer 'label' column, found {dataset.schema.names}")
    column = dataset.to_table(columns=["label"]).column("label")
    low, high = pc.min_max(column).values()
    if column.null_count or low.as_py() is None or low.as_py() < 0:
        raise DataError(f"{source.uri}: the 'label' column must hold integers 0..K-1 with no nulls")
    return tuple(str(i) for i in range(high.as_py() + 1))


def load_dataset(
    source: Source | str,
    *,
    split: str = "train",
    settings: storage.S3Settings | None = None,
    limit: int | None = None,
    class_index: dict[str, int] | None = None,
    with_paths: bool = False,
) -> ray.data.Dataset:
    """A Ray Dataset of raw images (``bytes`` or ``rgb`` rows) from any supported source.

    With ``class_index`` (class name -> label, usually from the training source's
    :func:`class_names`) each row also has an int64 ``label``: -1 for a class the index lacks
    (or none at all: an image outside a class folder, Parquet without a ``label`` column).
    ``with_paths``: a folder's rows also have the ``path`` of their file.
    """
    if isinstance(source, str):
        source = locate(source, settings=settings, limit=limit, split=split)
    if source.kind == "cifar":
        ds = _cifar_python(source.fs, source.path, split)
    elif source.kind == "parquet":
        ds = _parquet_images(source.fs, list(source.files), labels=class_index is not None)
    else:
        ds = _files(source, with_paths=with_paths or class_index is not None)
    if class_index is not None:
        # The kind and root, not the Source: its file list would travel with every task.
        ds = ds.map_batches(_label_rows, fn_kwargs={"kind": source.kind, "root": source.path, "class_index": class_index,
                                                    "keep_paths": with_paths}, batch_format="numpy")
    if limit:
        # Ray Data hands blocks on as their tasks finish; in order, the first `limit` rows of
        # CIFAR-10's batches or of Parquet shards are the same subset every epoch and every run.
        ds.context.execution_options.preserve_order = True
        return ds.limit(limit)
    return ds


def _label_rows(
    batch: dict[str, np.ndarray], *, kind: str, root: str, class_index: dict[str, int], keep_paths: bool = False
) -> dict[str, np.ndarray]:
    """Each row's class name (from its folder, or its source's own label) mapped through ``class_index``."""
    if kind == "files":
        names = [_class_folder(str(p), root) for p in (batch["path"] if keep_paths else batch.pop("path"))]
    elif "label" not in batch:  # Parquet shards without labels, such as unlabelled validation images
        names = [None] * len(batch["bytes"])
    else:
        own = CIFAR_CLASSES if kind == "cifar" else None
        names = [own[i] if own else str(i) for i in batch["label"].tolist()]
    batch["label"] = np.array([class_index.get(name, -1) for name in names], dtype=np.int64)
    return batch


def lab_dataset(
    source: Source | str,
    *,
    image_size: int,
    augment: bool,
    split: str = "train",
    settings: storage.S3Settings | None = None,
    limit: int | None = None,
    with_rgb: bool = False,
    class_index: dict[str, int] | None = None,
    with_paths: bool = False,
) -> ray.data.Dataset:
    """Rows of ``L`` (1, S, S), ``ab`` (2, S, S) float32 and ``ok`` (bool), streamed.

    ``with_rgb`` adds the uint8 ``rgb`` (S, S, 3) each row's Lab came from (for scoring);
    ``class_index`` the int64 ``label`` of each row, and ``with_paths`` a folder's ``path``
    (see :func:`load_dataset`).
    """
    raw = load_dataset(source, split=split, settings=settings, limit=limit, class_index=class_index, with_paths=with_paths)
    return raw.map_batches(
        prepare_batch,
        fn_kwargs={"image_size": image_size, "augment": augment, "with_rgb": with_rgb, "with_label": class_index is not None},
        batch_format="numpy",
        batch_size=256,
    )


def prepare_batch(
    batch: dict[str, np.ndarray], *, image_size: int, augment: bool, with_rgb: bool = False, with_label: bool = False
) -> dict[str, np.ndarray]:
    """Decode (if needed), crop to a square, resize to ``image_size``, convert to Lab.

    Undecodable rows come out as zeros with ``ok = False`` rather than failing the task.
    ``with_rgb`` also returns the uint8 ``rgb`` (B, S, S, 3) the Lab values came from;
    ``with_label`` passes the rows' ``label`` through (see ``class_index``); a ``path`` column
    passes through too.
    """
    rows = batch["rgb"] if "rgb" in batch else batch["bytes"]
    n = len(rows)
    rgb = np.zeros((n, image_size, image_size, 3), dtype=np.uint8)
    ok = np.zeros(n, dtype=bool)
    rng = np.random.default_rng()
    for i, item in enumerate(rows):
        try:
            img = Image.fromarray(np.asarray(item, dtype=np.uint8)) if "rgb" in batch else _decode(item, image_size)
            rgb[i] = _crop_resize(img, image_size, rng if augment else None)
            ok[i] = True
        except Exception:  # noqa: BLE001 - Pillow on corrupt bytes also raises struct.error, TypeError, SyntaxError
            continue  # one unreadable image is a row with ok=False, never a failed task
    lab = color.rgb_to_lab_np(rgb).transpose(0, 3, 1, 2)  # (B, 3, S, S)
    out = {"L": np.ascontiguousarray(lab[:, :1]), "ab": np.ascontiguousarray(lab[:, 1:]), "ok": ok}
    if with_rgb:
        out["rgb"] = rgb
    if with_label:
        out["label"] = batch["label"]
    if "path" in batch:
        out["path"] = batch["path"]
    return out


def _decode(data: bytes, size: int) -> Image.Image:
    """The image, upright and in RGB, decoded as :func:`draft` says for a ``size`` px crop."""
    return images.to_rgb(ImageOps.exif_transpose(draft(Image.open(io.BytesIO(data)), size)))


def draft(img: Image.Image, size: int) -> Image.Image:
    """``img`` (just opened), set to decode a JPEG at 1/2, 1/4 or 1/8 scale (in libjpeg's DCT)
    where it stays large enough that the smallest crop of :func:`_crop_resize` still has
    ``size`` pixels a side: half the input work of a 32 px crop of a 500x375 photo, 28% of a
    224 px crop of a 1024x768 one (``benchmarks.per_core``). A no-op for other formats, and
    where no scale keeps both sides large enough."""
    side = math.ceil(size / MIN_CROP)
    img.draft(None, (side, side))
    return img


def _crop_resize(img: Image.Image, size: int, rng: np.random.Generator | None) -> np.ndarray:
    """A square crop (random scale MIN_CROP-1 and position, and a flip, when ``rng`` is given)."""
    w, h = img.size
    side = min(w, h)
    if rng is not None:
        side = max(1, int(side * rng.uniform(MIN_CROP, 1.0)))
        left, top = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
    else:
        left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    if rng is not None and rng.random() < 0.5:
        img = ImageOps.mirror(img)
    return np.asarray(img, dtype=np.uint8)


def _files(source: Source, *, with_paths: bool) -> ray.data.Dataset:
    """Rows of ``bytes`` (and ``path``) for ``source``'s files, read in Ray tasks."""
    paths = pa.array(source.files, type=pa.string())
    step = -(-len(paths) // _blocks(len(paths)))
    ds = ray.data.from_arrow([pa.table({"path": paths.slice(i, step)}) for i in range(0, len(paths), step)])
    # 64 files a call: a block's worth (500 to 6,400 files) would all be in memory before any went on.
    return ds.map_batches(_read_files, fn_kwargs={"fs": source.fs, "with_paths": with_paths}, batch_format="numpy",
                          batch_size=64)


def _read_files(batch: dict[str, np.ndarray], *, fs: pafs.FileSystem, with_paths: bool) -> dict[str, np.ndarray]:
    """Each file's bytes; none (an unreadable row) for a file that is gone since it was
    listed (a training run that takes days outlives some of its files), that this process may
    not read, or that is larger than any image of ``images.MAX_PIXELS`` can be (never read
    into memory). Storage that cannot be reached, or refuses the worker, fails the task with
    its reason: every file would be unreadable, and the run would not say why."""
    limit = images.max_encoded_bytes(images.MAX_PIXELS)
    contents = np.empty(len(batch["path"]), dtype=object)
    for i, path in enumerate(batch["path"]):
        try:
            contents[i] = storage.read_bytes(fs, str(path), limit=limit)
        except storage.StorageError as error:
            if not storage.of_one_file(error):
                raise
            contents[i] = b""
    return {"bytes": contents, **({"path": batch["path"]} if with_paths else {})}


def _blocks(n_files: int) -> int:
    # Enough blocks to keep every CPU busy, few enough that per-task overhead stays small.
    return max(1, min(200, n_files // 500 + 1))


# --- CIFAR-10, official python release -----------------------------------------------------


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles CIFAR-10 batches (dicts of bytes, lists and numpy arrays) and nothing else."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
    }

    def find_class(self, module: str, name: str):  # noqa: ANN201 - pickle's signature
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR-10 batch")


def _is_cifar_dir(fs: pafs.FileSystem, path: str, info: pafs.FileInfo) -> bool:
    return info.type == pafs.FileType.Directory and storage.exists(fs, storage.join(path, "data_batch_1"))


def _cifar_python(fs: pafs.FileSystem, path: str, split: str) -> ray.data.Dataset:
    if split not in _CIFAR_BATCHES:
        raise DataError(f"split must be one of {sorted(_CIFAR_BATCHES)}, got {split!r}")
    items = [{"path": path, "batch": b} for b in _CIFAR_BATCHES[split]]
    return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        _read_cifar_batch, fn_kwargs={"fs": fs}, batch_size=1, batch_format="numpy"
    )


def _check_cifar_archive(uri: str, fs: pafs.FileSystem, path: str, split: str) -> None:
    """Raise a DataError unless the CIFAR-10 archive holds the batches ``split`` reads. Found
    missing by a read task, one failed training after a whole epoch, twice more when Ray Train
    restarted it, and in a line that did not say why. Listing it reads it through once: about
    1 s for a 186 MB archive as compressible as CIFAR-10's (a reviewer's measurement)."""
    try:
        with storage.open_stream(fs, path) as stream, tarfile.open(fileobj=stream, mode="r|gz") as tar:
            names = {posixpath.basename(member.name) for member in tar}
    except (tarfile.TarError, EOFError, OSError, zlib.error) as error:
        raise DataError(f"{uri}: not a readable CIFAR-10 archive ({errors.one_line(error)})") from None
    missing = [b for b in _CIFAR_BATCHES.get(split, []) if b not in names]
    if missing:
        raise DataError(f"{uri}: no {', '.join(missing)} in this archive, which the {split} split reads; "
                        "is it the CIFAR-10 python release?")


def _read_cifar_batch(items: dict[str, np.ndarray], *, fs: pafs.FileSystem) -> Iterator[dict[str, np.ndarray]]:
    path, batch = str(items["path"][0]), str(items["batch"][0])
    if path.endswith(".tar.gz"):
        with storage.open_stream(fs, path) as stream, tarfile.open(fileobj=stream, mode="r|gz") as tar:
            raw = next((tar.extractfile(m).read() for m in tar if posixpath.basename(m.name) == batch), None)
        if raw is None:
            raise DataError(f"{path}: no {batch} in this archive; is it the CIFAR-10 python release?")
    else:
        raw = storage.read_bytes(fs, storage.join(path, batch))
    entry = _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
    rgb = np.asarray(entry[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    labels = np.asarray(entry[b"labels"], dtype=np.int64)
    for start in range(0, len(rgb), _CIFAR_ROWS_PER_BLOCK):
        end = start + _CIFAR_ROWS_PER_BLOCK
        yield {"rgb": rgb[start:end], "label": labels[start:end]}


# --- Parquet shards ------------------------------------------------------------------------


def _parquet_images(fs: pafs.FileSystem, shards: list[str], *, labels: bool = False) -> ray.data.Dataset:
    try:
        ds = ray.data.read_parquet(shards, filesystem=fs)
        columns = ds.schema().names
    except pa.ArrowInvalid as error:  # which shard: Arrow's message names none
        raise DataError(_unreadable_shard(fs, shards, error)) from None
    if "image" not in columns:
        _no_image_column(fs, shards[0], columns)
    wanted = ["image", "label"] if labels and "label" in columns else ["image"]
    return ds.select_columns(wanted).map_batches(_image_column_to_bytes, batch_format="pyarrow")


def _unreadable_shard(fs: pafs.FileSystem, shards: list[str], error: Exception) -> str:
    """The first of ``shards`` whose footer cannot be read, and why ("Parquet magic bytes not
    found in footer"); looked for only once reading all of them has failed."""
    for shard in shards:
        try:
            storage.parquet_file(fs, shard)
        except pa.ArrowInvalid as bad:
            return f"{storage.to_uri(fs, shard)}: not a readable Parquet file ({errors.one_line(bad, with_type=False)})"
    return errors.one_line(error, with_type=False)


def _image_column_to_bytes(table: pa.Table) -> pa.Table:
    column = table.column("image")
    if pa.types.is_struct(column.type):
        column = pc.struct_field(column, "bytes")
    rest = {"label": table.column("label")} if "label" in table.column_names else {}
    return pa.table({"bytes": column, **rest})
