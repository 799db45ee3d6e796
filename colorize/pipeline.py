"""The bulk job: colourise every image under an input, streaming, with Ray Data.

The work per image, in three steps:

1. ``read_and_decode``: bytes from disk, S3 or an archive; decode; full-size lightness and
   alpha; lightness resized to the model's working resolution.
2. the model (:func:`predict`): chroma for a whole batch at the working resolution.
3. ``compose_and_write``: chroma upsampled and merged with the full-resolution lightness,
   PNGs and one Parquet file per batch written atomically; a status row per input.

On CPUs all three run inside each task (:func:`colorize_items`), the model loaded once per
worker process: an image never leaves the process that decoded it, and only status rows
reach the object store. With GPUs (or ``--actors``) step 2 is a pool of model actors
(:class:`Colorizer`) between CPU tasks for steps 1 and 3, so that the GPU sees whole batches
from every decoder. Either way the driver only sees status rows, so memory stays flat
however many images pass, and an input that fails at any step is carried through as a
status row with its reason, never dropped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import shutil
import sys
import time
from collections import defaultdict
from collections.abc import Container, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import ray.data
import torch
from torch.nn.utils.fusion import fuse_conv_bn_eval

from colorize import colorizer, errors, images, raycluster, sources, storage

FORMATS = ("png", "parquet")
PARQUET_ROW_GROUP_BYTES = 64 * 2**20  # keeps binary columns far below Arrow's 2 GiB limits
_PLACEHOLDER = np.zeros((1, 1), dtype=np.float32)
# What a task declares. Each is single-threaded and busy, so one uses a whole core. Tasks
# that do everything (the CPU path) declare a whole CPU when they read local files: one
# task per core, measured 10-25% faster than two half-CPU tasks per core. Tasks that wait
# on something, S3 or the model actors, declare half, so a core stays busy while one waits.
TASK_CPUS = 0.5
FUSED_TASK_CPUS = 1.0
FILES_PER_READ = 32
# A chunk (a model batch, a Parquet part) stops short of --batch-size at this many full-size
# pixels: about 9 bytes of a task's memory each (decoded lightness 4, composing and writing
# 5, measured on 12 MP photos), so about 300 MB, where 64 such photos took 5.6 GB.
CHUNK_PIXELS = 32_000_000
SHOWN_FAILURES = 5  # failures printed after the summary line; failed/failed.parquet lists them all
PROGRESS_S = 10.0  # seconds between a run's progress lines
OVERWRITE_UNFINISHED = "overwrite_unfinished"  # in _CONFIG.json while an --overwrite over another run's outputs runs
MAX_INPUT_BLOCKS = 4096


@dataclass(frozen=True)
class BulkConfig:
    """A bulk colourisation run; written as ``OUTPUT/_CONFIG.json``."""

    input: str
    output: str
    weights: str | None = None
    formats: tuple[str, ...] = FORMATS
    batch_size: int = 64
    num_gpus: int = 0
    actors: int | None = None
    limit: int | None = None
    max_pixels: int = images.MAX_PIXELS
    png_level: int = 1
    temperature: float | None = None
    saturation: float | None = None
    flip_average: bool = False
    overwrite: bool = False
    s3_endpoint: str | None = None

    def __post_init__(self) -> None:
        unknown = set(self.formats) - set(FORMATS)
        if unknown or not self.formats:
            raise ValueError(f"--format takes a comma-separated subset of {FORMATS}, got {','.join(self.formats)!r}")
        for flag, value in (("--batch-size", self.batch_size), ("--max-pixels", self.max_pixels)):
            if value < 1:
                raise ValueError(f"{flag} must be at least 1, got {value}")
        if not 0 <= self.png_level <= 9:
            raise ValueError(f"--png-level must be 0-9, got {self.png_level}")
        if self.num_gpus and self.actors is not None:
            raise ValueError("--actors sets CPU model actors; with --gpu or --num-gpus N there is one actor a GPU")


@dataclass(frozen=True)
class Done:
    """What earlier runs finished: the output relpaths with a PNG, and those with a Parquet row.

    An input counts as done only when every requested format has it, so a run cut off
    between an input's PNG and its Parquet row redoes that input. Inputs are matched by their
    output name, not their full path: a relative ``--input`` resumed from another working
    folder (a new Ray job upload) names the same inputs.
    """

    formats: tuple[str, ...]
    pngs: frozenset[str] = frozenset()
    rows: frozenset[str] = frozenset()
    unfinished: tuple[str, ...] = ()  # files a stopped run was writing (storage.TEMP_PREFIX), never renamed into place

    def contains(self, relpath: str) -> bool:
        return ("png" not in self.formats or relpath in self.pngs) and ("parquet" not in self.formats or relpath in self.rows)


def task_rows(todo: list[sources.Item], done: Done) -> list[dict[str, Any]]:
    """The rows the tasks map over: each input with its own part of ``done``.

    ``written``: the outputs inside an archive that earlier runs finished, whose members are
    skipped unread; ``in_parquet``: the outputs of an input that already have their Parquet
    row, and get only a PNG (an input redone for a missing PNG). Each task gets only its own
    inputs' entries: handed to every task whole, the entries of a million images resumed
    were unpickled again by each of them (0.3 s a set, three sets).
    """
    archives: dict[str, tuple[list[str], list[str]]] = {i.relpath: ([], []) for i in todo if i.kind == "archive"}
    by_folder: dict[str, list[str]] = defaultdict(list)
    for relpath in (done.pngs | done.rows) if archives else ():
        by_folder[relpath.rpartition("/")[0]].append(relpath)
    for folder, entries in by_folder.items():  # a few folders an archive: each looked up once
        archive = folder if folder in archives else _archive_of(folder, archives)
        if archive is not None:
            written, in_parquet = archives[archive]
            written.extend(r for r in entries if done.contains(r))
            in_parquet.extend(r for r in entries if r in done.rows)
    rows = []
    for item in todo:
        if item.kind == "archive":
            written, in_parquet = (sorted(entries) for entries in archives[item.relpath])
        else:
            written, in_parquet = [], [item.relpath] if item.relpath in done.rows else []
        rows.append({**asdict(item), "written": written, "in_parquet": in_parquet})
    return rows


def _archive_of(relpath: str, archives: Container[str]) -> str | None:
    """The folder above ``relpath`` that is one of ``archives``, if any."""
    end = relpath.find("/")
    while end != -1:
        if relpath[:end] in archives:
            return relpath[:end]
        end = relpath.find("/", end + 1)
    return None


# --- stage 1: read and decode (CPU) ----------------------------------------------------------


def read_and_decode(
    batch: dict[str, np.ndarray],
    *,
    settings: storage.S3Settings,
    size: int,
    max_pixels: int,
    chunk: int,
    packed: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
    """:func:`task_rows` -> decoded rows, ``chunk`` at a time, or fewer where more would pass
    ``CHUNK_PIXELS`` (a chunk of large photos is as much memory as one of thumbnails; a
    single photo over it is a chunk alone).

    Archive members already ``written`` come out as ``skipped`` rows, their bytes unread.
    ``packed``: full-resolution L as :func:`images.pack_lightness` uint16, for rows that go
    through the object store to model actors, which hold whole batches of them.
    """
    rows: list[dict[str, Any]] = []
    pixels = 0
    columns = (batch[key] for key in ("kind", "uri", "relpath", "error", "written", "in_parquet"))
    for kind, uri, relpath, error, written, in_parquet in zip(*columns):
        item = sources.Item(str(kind), str(uri), str(relpath), str(error))
        for row in _read_item(item, settings, size, max_pixels, frozenset(written), frozenset(in_parquet)):
            if packed:
                row["L"] = images.pack_lightness(row["L"])
            if rows and pixels + row["L"].size > CHUNK_PIXELS:  # a photo that would take the chunk past its budget starts the next
                yield _stack(rows, size)
                rows, pixels = [], 0
            rows.append(row)
            pixels += row["L"].size
            if len(rows) == chunk:
                yield _stack(rows, size)
                rows, pixels = [], 0
    if rows:
        yield _stack(rows, size)


def _read_item(
    item: sources.Item, settings: storage.S3Settings, size: int, max_pixels: int,
    written: frozenset[str], in_parquet: frozenset[str],
) -> Iterator[dict[str, Any]]:
    kind, uri, relpath = item.kind, item.uri, item.relpath
    if item.error:
        yield _status_row(uri, relpath, "failed", item.error)
        return
    members = 0
    try:
        fs, path = storage.resolve(uri, settings)
        limit = images.max_encoded_bytes(max_pixels)
        if kind == "file":
            yield _decode_row(uri, relpath, lambda: storage.read_bytes(fs, path, limit=limit), size, max_pixels,
                              in_parquet=relpath in in_parquet)
            return
        # Outputs are written under safe relpaths only, so an unsafe one is never ``written``.
        for member in sources.archive_members(fs, path, relpath, limit=limit, skip=written.__contains__):
            members += 1
            source = f"{uri}/{member.name}"
            if member.error:
                yield _status_row(source, member.relpath, "failed", member.error)
            elif member.skipped:
                yield _status_row(source, member.relpath, "skipped")
            else:
                yield _decode_row(source, member.relpath, lambda data=member.data: data, size, max_pixels,
                                  in_parquet=member.relpath in in_parquet)
        if not members:  # an input that came to nothing is listed, as every input is
            yield _status_row(uri, relpath, "failed", "no image members in this archive (members are read by their "
                              "extension, as files are)")
    except Exception as error:  # noqa: BLE001 - untrusted bytes: whatever breaks, the input is listed, the run goes on
        # Members streamed before the archive broke off were already yielded and are kept.
        where = f" after {members} member(s)" if members else ""
        yield _status_row(uri, relpath, "failed", f"cannot read{where}: {errors.one_line(error)}")


def _decode_row(  # noqa: ANN001
    source: str, relpath: str, read, size: int, max_pixels: int, *, in_parquet: bool = False
) -> dict[str, Any]:
    try:
        relpath = storage.safe_relpath(relpath)
        decoded = images.decode(read(), max_pixels=max_pixels)
    except (images.ImageError, storage.StorageError) as error:
        message = str(error)  # without the input's path in front (as given, or made absolute): the row names it
        for named in (source, source if storage.is_s3(source) else os.path.abspath(source)):
            message = message.removeprefix(f"{named}: ")
        return _status_row(source, relpath, "failed", message)
    except Exception as error:  # noqa: BLE001 - one input must never take its group down with it
        return _status_row(source, relpath, "failed", f"cannot read: {errors.one_line(error)}")
    return {
        "source": source,
        "relpath": relpath,
        "status": "ok",
        "error": "",
        "L": decoded.L,
        "alpha": decoded.alpha if decoded.alpha is not None else _PLACEHOLDER.astype(np.uint8),
        "has_alpha": decoded.alpha is not None,
        "in_parquet": in_parquet,
        "small": images.resize_lightness(decoded.L, size),
    }


def _status_row(source: str, relpath: str, status: str, error: str = "") -> dict[str, Any]:
    return {
        "source": source,
        "relpath": relpath,
        "status": status,
        "error": error,
        "L": _PLACEHOLDER,
        "alpha": _PLACEHOLDER.astype(np.uint8),
        "has_alpha": False,
        "in_parquet": False,
        "small": None,
    }


def _stack(rows: list[dict[str, Any]], size: int) -> dict[str, np.ndarray]:
    def objects(key: str) -> np.ndarray:
        column = np.empty(len(rows), dtype=object)
        column[:] = [r[key] for r in rows]
        return column

    small = np.zeros((len(rows), size, size), dtype=np.float32)
    for i, row in enumerate(rows):
        if row["small"] is not None:
            small[i] = row["small"]
    return {
        "source": np.array([r["source"] for r in rows], dtype=object),
        "relpath": np.array([r["relpath"] for r in rows], dtype=object),
        "status": np.array([r["status"] for r in rows], dtype=object),
        "error": np.array([r["error"] for r in rows], dtype=object),
        "L": objects("L"),
        "alpha": objects("alpha"),
        "has_alpha": np.array([r["has_alpha"] for r in rows], dtype=bool),
        "in_parquet": np.array([r["in_parquet"] for r in rows], dtype=bool),
        "small": small,
    }


# --- stage 2: the model (actor pool) ---------------------------------------------------------


class Colorizer:
    """Loads the model once per actor; predicts chroma for whole batches."""

    def __init__(self, weights: bytes, device: str, threads: int, flip: bool = False) -> None:
        torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.model = inference_model(weights, self.device)
        self.flip = flip

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return predict(self.model, batch, self.device, flip=self.flip)


@torch.inference_mode()
def predict(
    model: torch.nn.Module, batch: dict[str, np.ndarray], device: torch.device, *, flip: bool = False
) -> dict[str, np.ndarray]:
    """Adds ``ab`` (B, 2, S, S), the chroma of every ``ok`` row (with ``flip``, averaged with
    its mirror image's), and drops ``small``."""
    ok = batch["status"] == "ok"
    size = batch["small"].shape[-1]
    ab = np.zeros((len(ok), 2, size, size), dtype=np.float32)
    if ok.any():
        L = torch.from_numpy(batch["small"][ok]).unsqueeze(1).to(device)  # (B,1,S,S), L in [0,100]
        ab[ok] = colorizer.predict_ab(model, L, flip=flip).cpu().numpy()
    batch["ab"] = ab
    del batch["small"]
    return batch


_MODELS: dict[str, torch.nn.Module] = {}  # weights id -> inference model, per worker process


def _cached_model(weights: bytes) -> torch.nn.Module:
    key = colorizer.weights_id(weights)
    if key not in _MODELS:
        _MODELS.clear()  # one job's model at a time
        _MODELS[key] = inference_model(weights, torch.device("cpu"))
    return _MODELS[key]


def inference_model(weights: bytes, device: torch.device) -> torch.nn.Module:
    """The model in :func:`weights_bytes <colorize.colorizer.weights_bytes>` form, ready to
    predict: BatchNorm folded, channels-last, on ``device``."""
    return for_inference(colorizer.model_from_bytes(weights)).to(device, memory_format=torch.channels_last)


def colorize_items(
    batch: dict[str, np.ndarray], *, weights: bytes, read: dict[str, Any], write: dict[str, Any], flip: bool = False
) -> Iterator[dict[str, np.ndarray]]:
    """Items -> status rows, with every step in this task: the CPU path.

    ``read`` and ``write`` are the keyword arguments of :func:`read_and_decode` and
    :func:`compose_and_write`. One torch thread: a task is one core's worth of work, and
    Ray runs one per CPU (two, for S3, where each also waits on the network).
    """
    torch.set_num_threads(1)
    model = _cached_model(weights)
    for decoded in read_and_decode(batch, **read):
        yield compose_and_write(predict(model, decoded, torch.device("cpu"), flip=flip), **write)


def for_inference(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` (in eval mode) with each Conv2d -> BatchNorm2d pair of a Sequential folded into one conv.

    The same function with one layer fewer per pair: about a tenth off the U-Net's CPU time
    (and channels-last memory, set by the caller, another sixth).
    """
    for module in model.modules():
        if not isinstance(module, torch.nn.Sequential):
            continue
        for i in range(len(module) - 1):
            conv, norm = module[i], module[i + 1]
            if isinstance(conv, torch.nn.Conv2d) and isinstance(norm, torch.nn.BatchNorm2d):
                module[i] = fuse_conv_bn_eval(conv, norm)
                module[i + 1] = torch.nn.Identity()
    return model


# --- stage 3: compose and write (CPU) --------------------------------------------------------


def compose_and_write(
    batch: dict[str, np.ndarray],
    *,
    output: str,
    settings: storage.S3Settings,
    formats: tuple[str, ...],
    png_level: int,
    weights_id: str,
    overwrite: bool = False,
) -> dict[str, np.ndarray]:
    """Full-size outputs for the batch's good rows; a status row for every row.

    Rows ``in_parquet`` already have their Parquet row and get only a PNG. With ``overwrite``,
    what an earlier run left where a PNG goes is cleared first (:func:`_clear_the_way`).
    """
    fs, root = storage.resolve(output, settings)
    status, reasons = list(batch["status"]), list(batch["error"])
    widths, heights = np.zeros(len(status), dtype=np.int64), np.zeros(len(status), dtype=np.int64)
    records: list[dict[str, Any]] = []
    for i in range(len(status)):
        if status[i] != "ok":
            continue
        try:
            L = images.unpack_lightness(batch["L"][i])
            rgb = images.compose(L, batch["ab"][i])
            png = images.encode_png(rgb, batch["alpha"][i] if batch["has_alpha"][i] else None, level=png_level)
            if "png" in formats:
                if overwrite:
                    _clear_the_way(fs, root, str(batch["relpath"][i]))
                storage.write_bytes_atomic(fs, storage.join(root, sources.IMAGES_FOLDER, batch["relpath"][i]), png)
        except (OSError, ValueError, RuntimeError, storage.StorageError) as error:
            status[i], reasons[i] = "failed", f"cannot write output: {errors.one_line(error, with_type=False)}"
            continue
        heights[i], widths[i] = L.shape
        status[i] = "written"
        if batch["in_parquet"][i]:
            continue
        records.append(
            {"source": batch["source"][i], "relpath": batch["relpath"][i], "width": int(widths[i]),
             "height": int(heights[i]), "png": png, "weights": weights_id, "row": i}
        )
    if records and "parquet" in formats:
        # PNGs first, then the Parquet file: a crash in between leaves inputs that a resumed
        # run redoes (they are not in Parquet yet), never Parquet rows without their PNG.
        name = hashlib.sha256("\n".join(sorted(r["source"] for r in records)).encode()).hexdigest()[:20]
        try:
            storage.write_bytes_atomic(fs, storage.join(root, sources.PARQUET_FOLDER, f"part-{name}.parquet"), _parquet_bytes(records))
        except storage.StorageError as error:  # the batch's inputs fail, with the reason; the run goes on
            for record in records:
                status[record["row"]] = "failed"
                reasons[record["row"]] = f"cannot write its Parquet part: {errors.one_line(error, with_type=False)}"
    return {
        "source": batch["source"],
        "relpath": batch["relpath"],
        "status": np.array(status, dtype=object),
        "error": np.array(reasons, dtype=object),
        "width": widths,
        "height": heights,
    }


OUTPUT_SCHEMA = pa.schema(
    [("source", pa.string()), ("relpath", pa.string()), ("width", pa.int64()), ("height", pa.int64()),
     ("png", pa.binary()), ("weights", pa.string())]
)


FAILED_SCHEMA = pa.schema([("source", pa.string()), ("relpath", pa.string()), ("error", pa.string())])


def _parquet_bytes(records: list[dict[str, Any]], schema: pa.Schema = OUTPUT_SCHEMA) -> pa.Buffer:
    """A Parquet file of ``records``. The ``png`` column is stored as it is: PNGs neither
    compress nor repeat, and dictionary encoding, statistics and snappy over them took 10x a
    part's bytes of memory to write, against 4x without them (one 100 MB PNG)."""
    table = pa.Table.from_pylist(records, schema=schema)
    mean_row = max(1, table.nbytes // max(1, table.num_rows))
    small = [name for name in schema.names if name != "png"]
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=max(1, PARQUET_ROW_GROUP_BYTES // mean_row), use_dictionary=small,
                   write_statistics=small, compression={name: "snappy" if name in small else "none" for name in schema.names})
    return sink.getvalue()


# --- the driver ------------------------------------------------------------------------------


def _input_uri(uri: str, settings: storage.S3Settings) -> str:
    """``uri`` spelled one way: a local path absolute with links resolved, an S3 prefix without a trailing slash."""
    fs, path = storage.resolve(uri, settings)
    return storage.to_uri(fs, os.path.realpath(path) if isinstance(fs, pafs.LocalFileSystem) else path.rstrip("/"))


def _run_id(config: BulkConfig, settings: storage.S3Settings, model: torch.nn.Module, weights_id: str) -> dict[str, Any]:
    """What a run's colours depend on, for ``_CONFIG.json``: the input (as given, and as a full
    path), the weights, the temperature a classification head decodes at (None for regression),
    the factor on the chroma, and whether each prediction is averaged with its mirror image's."""
    classification = model.config.head == "classification"
    return {"input": config.input, "input_uri": _input_uri(config.input, settings), "weights_id": weights_id,
            "temperature_used": model.config.temperature if classification else None,
            "saturation_used": model.config.saturation, "flip_average": config.flip_average}


def _earlier_config(fs: pafs.FileSystem, path: str) -> dict[str, Any] | None:
    """The ``_CONFIG.json`` at ``path`` that an earlier run left, or None."""
    if not storage.exists(fs, path):
        return None
    try:
        return json.loads(storage.read_bytes(fs, path))
    except ValueError as error:
        raise storage.StorageError(
            f"{storage.to_uri(fs, path)}: cannot read this earlier run's configuration ({error}); "
            "move it away, or pass --overwrite"
        ) from None


def _changes(earlier: dict[str, Any], run_id: dict[str, Any]) -> list[str]:
    """What makes this run's colours differ from the earlier run's: input, weights, temperature,
    saturation, flip averaging.

    The input matches if either its spelling or its full path does: a relative path inside a
    Ray job resolves into a working folder that is new for every upload.
    """
    changed = []
    if "input_uri" in earlier and earlier["input"] != run_id["input"] and earlier["input_uri"] != run_id["input_uri"]:
        changed.append(f"input ({earlier['input_uri']}, now {run_id['input_uri']})")
    for key, name in (("weights_id", "weights"), ("temperature_used", "decoding temperature")):
        if key in earlier and earlier[key] != run_id[key]:
            changed.append(f"{name} ({earlier[key]}, now {run_id[key]})")
    # Runs from before --saturation existed, like those from before --flip-average, used the defaults.
    if earlier.get("saturation_used", 1.0) != run_id["saturation_used"]:
        changed.append(f"saturation ({earlier.get('saturation_used', 1.0):g}, now {run_id['saturation_used']:g})")
    # Runs from before --flip-average existed did not average.
    if earlier.get("flip_average", False) != run_id["flip_average"]:
        on_off = {False: "off", True: "on"}
        changed.append(f"flip averaging ({on_off[earlier.get('flip_average', False)]}, now {on_off[run_id['flip_average']]})")
    return changed


def _check_resume(earlier: dict[str, Any] | None, output: str, run_id: dict[str, Any]) -> None:
    """Refuse to resume into an output that an earlier run filled from another input, with other
    weights, at another temperature, saturation or flip averaging, or that an unfinished ``--overwrite``
    left holding the colours of two runs: a resumed run skips inputs whose outputs exist by
    name, so it would keep colours this run would not have made."""
    if earlier is None:
        return
    if earlier.get(OVERWRITE_UNFINISHED):
        raise storage.StorageError(
            f"{output}: an --overwrite run into it did not finish, so it holds outputs of two runs; "
            "pass --overwrite again to redo every input"
        )
    if changed := _changes(earlier, run_id):
        raise storage.StorageError(
            f"{output}: holds an earlier run with another {' and another '.join(changed)}; a resumed run would "
            "keep its outputs: choose another --output, or pass --overwrite to redo every input"
        )


def _would_mix(fs: pafs.FileSystem, root: str, config_path: str, run_id: dict[str, Any]) -> bool:
    """Whether an ``--overwrite`` into ``root`` cut off part-way would leave the colours of two
    runs: earlier outputs are there, and were made from another input or model, or by an
    ``--overwrite`` that itself did not finish, or by a run whose configuration cannot be read."""
    if not storage.exists(fs, storage.join(root, sources.IMAGES_FOLDER)) and not storage.exists(fs, config_path):
        return False
    try:
        earlier = _earlier_config(fs, config_path)
    except storage.StorageError:
        return True
    return earlier is None or bool(earlier.get(OVERWRITE_UNFINISHED)) or bool(_changes(earlier, run_id))


def _start_over(fs: pafs.FileSystem, root: str) -> None:
    """For ``--overwrite``: remove the Parquet parts and the failure list of earlier runs. Parts
    are named by the inputs they hold, so rows grouped otherwise this time would sit beside the
    old ones; PNGs are replaced in place, name by name."""
    parquet = storage.join(root, sources.PARQUET_FOLDER)
    if storage.exists(fs, parquet):
        for path in storage.list_files(fs, parquet):
            if posixpath.dirname(path) == parquet and posixpath.basename(path).startswith(("part-", storage.TEMP_PREFIX)):
                storage.delete(fs, path)
    storage.delete(fs, storage.join(root, sources.FAILED_FOLDER, "failed.parquet"))


def _clear_the_way(fs: pafs.FileSystem, root: str, relpath: str) -> None:
    """For ``--overwrite``, in a local folder: delete what an earlier run left where this one's
    PNG ``relpath`` goes, a PNG where a folder is now needed (``p.png``, once an input folder
    ``p.png/`` appeared) or a folder where the PNG goes (``x.png/``, once that input folder
    became ``x.jpg``; in an archive alike). Output names never nest within one run
    (:func:`sources.output_names`), so both are stale. They were removed only after the run,
    which had already failed those inputs ("File exists", "Is a directory"). S3 keys do not
    block each other."""
    if fs.type_name != "local":
        return
    images_dir = os.path.join(root, sources.IMAGES_FOLDER)
    parts = relpath.split("/")
    for depth in range(1, len(parts)):  # the folders above it, top down
        above = os.path.join(images_dir, *parts[:depth])
        if not os.path.isdir(above):
            with contextlib.suppress(FileNotFoundError):  # a folder to come, or another task removed it
                os.remove(above)
            return  # nothing deeper exists
    target = os.path.join(images_dir, relpath)
    if os.path.isdir(target) and not os.path.islink(target):
        shutil.rmtree(target, ignore_errors=True)


def _remove_other_pngs(fs: pafs.FileSystem, root: str, written: set[str]) -> None:
    """For a whole ``--overwrite``: delete the PNGs of earlier runs that it did not write over
    (all of them where it writes none), of another input, of inputs since gone, of inputs that
    failed this time, as :func:`_start_over` deleted their rows. Without this, the folder held
    two runs' colours with nothing to say so, and a resumed run took an input whose PNG was
    another's as done. Names that are not UTF-8 are no run's (outputs are named in UTF-8) and
    are left alone."""
    images_dir = storage.join(root, sources.IMAGES_FOLDER)
    if not storage.exists(fs, images_dir):
        return
    others = [p for p in storage.list_files(fs, images_dir)  # and files a stopped run was writing
              if (p.endswith(".png") or storage.is_unfinished(fs, p)) and storage.is_utf8(p)
              and posixpath.relpath(p, images_dir) not in written]
    with ThreadPoolExecutor(max_workers=16) as pool:  # on S3, a request each
        list(pool.map(lambda path: storage.delete(fs, path), others))
    if fs.type_name == "local":  # and the folders that held only those: an input folder x.png/ gone left x.png/ here
        for folder in sorted({posixpath.dirname(p) for p in others}, key=len, reverse=True):
            while folder.startswith(images_dir + "/"):
                try:
                    os.rmdir(folder)
                except OSError:  # not empty, or gone
                    break
                folder = posixpath.dirname(folder)
    if others:
        print(f"removed {len(others)} PNG(s) of earlier runs that this run did not write over, such as "
              f"{storage.to_uri(fs, others[0])}", file=sys.stderr, flush=True)


def _earlier_failures(fs: pafs.FileSystem, path: str, beyond: list[sources.Item]) -> list[dict[str, str]]:
    """Rows of an earlier failure list for the inputs ``beyond`` this run's --limit: they failed
    and were never written, and stay listed."""
    if not beyond or not storage.exists(fs, path):
        return []
    try:
        with fs.open_input_file(path) as f:
            rows = pq.read_table(f, columns=FAILED_SCHEMA.names).to_pylist()
    except (OSError, ValueError, KeyError) as error:  # pyarrow's ArrowInvalid is a ValueError
        print(f"{storage.to_uri(fs, path)}: cannot read the earlier failure list ({error}); it now lists this run's only",
              file=sys.stderr, flush=True)
        return []
    uris = {i.uri for i in beyond}
    archives = tuple(i.uri + "/" for i in beyond if i.kind == "archive")  # a member's source is <archive>/<member>
    return [r for r in rows if r["source"] in uris or r["source"].startswith(archives)]


def _orphans(pngs: frozenset[str], found: list[sources.Item]) -> list[str]:
    """The earlier PNGs (relpaths under images/) that no input ``found`` now makes: a rerun
    after inputs were renamed or removed kept them without a word, beside the new ones."""
    files = {item.relpath for item in found if item.kind == "file"}
    archives = {item.relpath for item in found if item.kind == "archive"}  # their members are not listed yet

    def in_an_archive(png: str) -> bool:  # its folders looked up, not every archive compared (1,000 tars, 1.28 M PNGs)
        parts = png.split("/")
        return any("/".join(parts[:depth]) in archives for depth in range(1, len(parts)))

    return sorted(p for p in pngs if p not in files and not in_an_archive(p))


def _already_done(fs: pafs.FileSystem, root: str, formats: tuple[str, ...]) -> Done:
    """What earlier runs into ``root`` wrote, from the PNG listing and Parquet ``relpath`` column."""
    pngs: set[str] = set()
    rows: set[str] = set()
    unfinished: list[str] = []
    images_dir = storage.join(root, sources.IMAGES_FOLDER)
    if "png" in formats and storage.exists(fs, images_dir):
        listed = storage.list_files(fs, images_dir)
        pngs = {posixpath.relpath(p, images_dir) for p in listed if p.endswith(".png")}
        unfinished += [p for p in listed if storage.is_unfinished(fs, p)]
    parquet_dir = storage.join(root, sources.PARQUET_FOLDER)
    if "parquet" in formats and storage.exists(fs, parquet_dir):
        listed = storage.list_files(fs, parquet_dir)
        parts = [p for p in listed if p.endswith(".parquet")]
        unfinished += [p for p in listed if storage.is_unfinished(fs, p)]
        # Many at once: one after another, a million images' 31,000 parts are 94,000 S3 requests in a row.
        with ThreadPoolExecutor(max_workers=16) as pool:
            for relpaths in pool.map(lambda path: _relpaths(fs, path), parts):
                rows.update(relpaths)
    if fs.type_name == "local":  # the driver's records too (_SUMMARY.json, failed/failed.parquet); S3 leaves no temporaries
        for folder in (root, storage.join(root, sources.FAILED_FOLDER)):
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                unfinished += [e.path for e in os.scandir(folder) if e.is_file() and storage.is_unfinished(fs, e.path)]
    return Done(formats, frozenset(pngs), frozenset(rows), tuple(unfinished))


def _relpaths(fs: pafs.FileSystem, path: str) -> list[str]:
    """The ``relpath`` column of an earlier run's Parquet part."""
    try:
        with fs.open_input_file(path) as f:
            return pq.read_table(f, columns=["relpath"]).column("relpath").to_pylist()
    except (OSError, ValueError, KeyError) as error:  # pyarrow's ArrowInvalid is a ValueError
        raise storage.StorageError(
            f"{storage.to_uri(fs, path)}: cannot read this earlier output to resume ({error}); move it away, or pass --overwrite"
        ) from None


def actor_pool(num_gpus: int, actors: int | None) -> tuple[int, float]:
    """How many model actors, and the CPUs each declares, for the actor path.

    On GPUs, one actor per GPU and a CPU to feed it. CPU actors (``--actors N``) declare a
    quarter CPU: the model is a small part of an image's work (decoding, chroma upsampling
    and PNG encoding dominate; see docs/performance.md), and a whole CPU would sit mostly
    idle while Ray Data, counting it as busy, held back the decode and write tasks.
    """
    if num_gpus:
        return num_gpus, 1.0
    return actors or 1, 0.25


def _check_resources(config: BulkConfig) -> None:
    """Refuse model actors that this machine's Ray can never place: the run would wait forever.

    Only for a Ray this process started; a cluster found through RAY_ADDRESS may add nodes.
    """
    if not config.num_gpus and config.actors is None:
        return  # CPU tasks only: they run one at a time on a machine of any size
    have = ray.cluster_resources()
    actors, cpus = actor_pool(config.num_gpus, config.actors)
    if config.num_gpus and actors > have.get("GPU", 0):  # each GPU actor takes a whole GPU
        raise ValueError(f"{actors} GPU actor(s) need as many GPUs; this machine has {int(have.get('GPU', 0))}")
    if actors * cpus + TASK_CPUS > have.get("CPU", 0):
        raise ValueError(
            f"{actors} model actor(s) x {cpus:g} CPU and one {TASK_CPUS:g}-CPU read task need {actors * cpus + TASK_CPUS:g} "
            f"CPUs; this machine's Ray has {have.get('CPU', 0):g} (lower --actors)"
        )


def _plan(
    tasks: list[dict[str, Any]], config: BulkConfig, weights: bytes, read: dict[str, Any], write: dict[str, Any]
) -> ray.data.Dataset:
    """The dataset of status rows over :func:`task_rows`: fused CPU tasks, or CPU tasks around model actors."""
    actor_path = config.num_gpus > 0 or config.actors is not None
    if not actor_path:
        remote = storage.is_s3(config.output) or any(storage.is_s3(t["uri"]) for t in tasks)
        ds = _per_call(tasks, colorize_items, num_cpus=TASK_CPUS if remote else FUSED_TASK_CPUS,
                       fn_kwargs={"weights": weights, "read": read, "write": write, "flip": config.flip_average})
        # Ray Data reserves part of the cluster for each operator's outputs and for operators
        # downstream; with one operator whose outputs are status rows, that held one of two
        # cores idle for much of a run (2,000 images: 24-27 s with it, 19-20 s without).
        ds.context.op_resource_reservation_enabled = False
        return ds
    ds = _per_call(tasks, read_and_decode, num_cpus=TASK_CPUS, fn_kwargs={**read, "packed": True})
    use_gpu = config.num_gpus > 0
    actors, actor_cpus = actor_pool(config.num_gpus, config.actors)
    if not any(t["kind"] == "archive" for t in tasks):  # an archive's members come in blocks unknown here
        actors = min(actors, _blocks(len(tasks), FILES_PER_READ))  # an actor per block at most: more would idle
    ds = ds.map_batches(
        Colorizer,
        fn_constructor_kwargs={"weights": weights, "device": "cuda" if use_gpu else "cpu",
                               "threads": max(1, round(actor_cpus)), "flip": config.flip_average},
        batch_size=config.batch_size,
        batch_format="numpy",
        zero_copy_batch=True,  # read-only views of the block: full-size L is never copied here
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=1 if use_gpu else None,
        num_cpus=actor_cpus,
    )
    return ds.map_batches(compose_and_write, fn_kwargs=write, batch_size=config.batch_size, batch_format="numpy",
                          zero_copy_batch=True, num_cpus=TASK_CPUS)


def _per_call(tasks: list[dict[str, Any]], fn, **options: Any) -> ray.data.Dataset:  # noqa: ANN001
    """``fn`` mapped over ``tasks``: archives one per call, so that one slow archive never holds
    up the rest; plain files in groups, so that each call's output (a model batch, a Parquet
    part) is many rows, not one. A block of inputs is one task, one call each, so the cores
    share the work out to the end."""
    parts = []
    for group, per_call in (([t for t in tasks if t["kind"] != "archive"], FILES_PER_READ),
                            ([t for t in tasks if t["kind"] == "archive"], 1)):
        if group:
            ds = ray.data.from_items(group, override_num_blocks=_blocks(len(group), per_call))
            parts.append(ds.map_batches(fn, batch_size=per_call, batch_format="numpy", **options))
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def _blocks(tasks: int, per_call: int) -> int:
    """How many blocks :func:`_per_call` spreads ``tasks`` inputs over."""
    return min(MAX_INPUT_BLOCKS, -(-tasks // per_call))


def run(config: BulkConfig) -> dict[str, Any]:
    """Colourise everything under ``config.input``; returns the summary written to ``_SUMMARY.json``."""
    started = time.perf_counter()
    settings = storage.S3Settings.from_env(config.s3_endpoint)
    out_fs, out_root = storage.resolve(config.output, settings)
    storage.check_output(out_fs, out_root, config.output, "--output", settings)
    with storage.output_lock(out_fs, out_root, config.output, "--output", settings) as lock:
        return _run(config, settings, out_fs, out_root, lock, started)


def _run(config: BulkConfig, settings: storage.S3Settings, out_fs: pafs.FileSystem, out_root: str,
         lock: storage.OutputLock, started: float) -> dict[str, Any]:
    lock.acquire_if_there()  # before reading what an earlier run wrote, and deleting what it left unfinished
    # Fail here, not in every actor; the workers get the model with any --temperature and
    # --saturation applied, in its config.
    model, weights_id = colorizer.load_weights(
        config.weights, settings, temperature=config.temperature, saturation=config.saturation
    )
    run_id = _run_id(config, settings, model, weights_id)
    config_path = storage.join(out_root, sources.CONFIG_FILE)
    if config.overwrite:
        unfinished = _would_mix(out_fs, out_root, config_path, run_id)
    else:
        _check_resume(_earlier_config(out_fs, config_path), config.output, run_id)
        unfinished = False
    found, items, done, todo = _take_stock(config, settings, out_fs, out_root, lock)

    # A Ray of our own never grows: its resources are checked. With nothing to do, no Ray is
    # needed (starting one took 12-40 s of a rerun that only counts what is done).
    if todo and raycluster.connect(log_to_driver=False):
        _check_resources(config)
    record = {**asdict(config), **run_id}
    lock.acquire()  # a new --output: before its first write
    storage.write_json(out_fs, config_path, {**record, OVERWRITE_UNFINISHED: True} if unfinished else record)
    if config.overwrite:
        _start_over(out_fs, out_root)
    storage.delete(out_fs, storage.join(out_root, sources.SUMMARY_FILE))  # a summary says a run finished
    skipped = len(items) - len(todo)  # files done; archive members done come out of the pipeline as skipped rows
    archives = sum(i.kind == "archive" for i in todo)
    what = f"{len(todo) - archives} file(s)" + (f" and {archives} archive(s), whose members are counted as they are read"
                                               if archives else "")
    print(f"colourising {what} from {config.input} ({skipped} already done) with {weights_id} into {config.output}",
          file=sys.stderr, flush=True)
    try:
        counts, failures, written = _colourise(todo, done, config, settings, model, weights_id)
    except KeyboardInterrupt:
        goes_on = "starts over" if config.overwrite else "goes on with the rest"
        raise KeyboardInterrupt(f"what is written is kept, and the same command {goes_on}") from None

    failed_path = storage.join(out_root, sources.FAILED_FOLDER, "failed.parquet")
    listed = failures + _earlier_failures(out_fs, failed_path, found[len(items):])
    if listed or storage.exists(out_fs, failed_path):
        storage.write_bytes_atomic(out_fs, failed_path, _parquet_bytes(listed, FAILED_SCHEMA))
    if config.overwrite and len(items) == len(found):  # past a --limit, earlier outputs are still there
        # Without PNGs this time, those there are all another model's or input's colours where
        # the run was marked; left, a plain rerun took them for done beside this run's rows.
        if "png" in config.formats or unfinished:
            _remove_other_pngs(out_fs, out_root, written if "png" in config.formats else set())
        if unfinished:
            storage.write_json(out_fs, config_path, record)
    seconds = time.perf_counter() - started
    summary = {
        "inputs": counts["written"] + counts["failed"] + counts["skipped"] + skipped,
        **counts,
        "skipped": counts["skipped"] + skipped,
        "weights": weights_id,
        "seconds": round(seconds, 2),
        "images_per_second": round(counts["written"] / seconds, 2) if seconds > 0 else 0.0,
        "input": config.input,
        "output": config.output,
    }
    storage.write_json(out_fs, storage.join(out_root, sources.SUMMARY_FILE), summary)
    _report(summary, failures, storage.to_uri(out_fs, failed_path))
    return summary


def _take_stock(config: BulkConfig, settings: storage.S3Settings, out_fs: pafs.FileSystem, out_root: str,
                lock: storage.OutputLock) -> tuple[list[sources.Item], list[sources.Item], Done, list[sources.Item]]:
    """The inputs ``found``, the ``items`` this run takes (``--limit``), what is ``done`` and what is left ``todo``.

    Removes the files a stopped run left unfinished, and warns of PNGs that no input found now makes.
    """
    found = sources.discover(config.input, settings, exclude=storage.to_uri(out_fs, out_root))
    # Again: a listing can take minutes, and a run that made --output meanwhile is writing there
    # (its files in flight are not a stopped run's to delete).
    lock.acquire_if_there()
    items = found[: config.limit] if config.limit else found
    done = Done(config.formats) if config.overwrite else _already_done(out_fs, out_root, config.formats)
    todo = [i for i in items if i.kind == "archive" or i.error or not done.contains(i.relpath)]
    for path in done.unfinished:  # the lock: no other run is writing them
        storage.delete(out_fs, path)
    if done.unfinished:
        print(f"removed {len(done.unfinished)} unfinished file(s) that a stopped run was writing, such as "
              f"{storage.to_uri(out_fs, done.unfinished[0])}", file=sys.stderr, flush=True)
    orphans = _orphans(done.pngs, found)
    if orphans:
        print(f"{len(orphans)} PNG(s) under images/ come from no input found now (renamed or removed since), such as "
              f"{orphans[0]}; they stay beside this run's, and --overwrite removes them", file=sys.stderr, flush=True)
    return found, items, done, todo


def _colourise(todo: list[sources.Item], done: Done, config: BulkConfig, settings: storage.S3Settings,
               model: torch.nn.Module, weights_id: str) -> tuple[dict[str, int], list[dict[str, str]], set[str]]:
    """Runs the pipeline over ``todo``: the rows by status, the failures, and the PNGs written.

    Archive members that an earlier run wrote come out ``skipped``, their bytes unread.
    """
    counts = {"written": 0, "failed": 0, "skipped": 0}
    failures: list[dict[str, str]] = []
    written: set[str] = set()  # archive members' included
    if not todo:
        return counts, failures, written
    read = {"settings": settings, "size": model.config.image_size, "max_pixels": config.max_pixels,
            "chunk": config.batch_size}
    write = {"output": config.output, "settings": settings, "formats": config.formats,
             "png_level": config.png_level, "weights_id": weights_id, "overwrite": config.overwrite}
    # Ray Data's bar counted blocks of 32 files, its total changing as they came (0% for the first
    # 13 s of a 21 s run); lines of _progress say what a user asks, how many and how long, in its
    # place and that of its plans. (A dataset takes the context as it is when made.)
    ray.data.DataContext.get_current().enable_progress_bars = False
    raycluster.quiet_ray_data()
    ds = _plan(task_rows(todo, done), config, colorizer.weights_bytes(model), read, write)
    files = None if any(item.kind == "archive" for item in todo) else len(todo)  # members are counted as they come
    started = last = time.monotonic()
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for source, relpath, status, error in zip(batch["source"], batch["relpath"], batch["status"], batch["error"]):
            counts[str(status)] += 1
            if status == "written":
                written.add(str(relpath))
            if status == "failed":
                failures.append({"source": str(source), "relpath": str(relpath), "error": str(error)})
        if time.monotonic() - last >= PROGRESS_S:
            last = time.monotonic()
            print(_progress(counts, files, last - started), file=sys.stderr, flush=True)
    return counts, failures, written


def _progress(counts: dict[str, int], files: int | None, seconds: float) -> str:
    """``1,200/5,000 files (1,180 written, 20 failed) in 60 s, 19.7 images/s, about 3 min left``;
    where archives make the total unknown, the count so far and the rate."""
    n = sum(counts.values())
    rate = n / seconds if seconds > 0 else 0.0
    line = (f"{n:,}/{files:,} files" if files is not None else f"{n:,} images") + (
        f" ({counts['written']:,} written, {counts['failed']:,} failed"
        + (f", {counts['skipped']:,} done before" if counts["skipped"] else "")
        + f") in {seconds:.0f} s, {rate:.1f} images/s"
    )
    if files is not None and rate > 0 and n < files:
        left = (files - n) / rate
        line += f", about {left / 60:.0f} min left" if left >= 120 else f", about {left:.0f} s left"
    return line


def _report(summary: dict[str, Any], failures: list[dict[str, str]], failed_uri: str) -> None:
    """Prints the run's last lines: the counts, and the first failures."""
    print(
        f"{summary['inputs']} inputs: {summary['written']} written, {summary['failed']} failed, "
        f"{summary['skipped']} skipped in {summary['seconds']:.1f} s ({summary['images_per_second']:.1f} images/s)"
        + (f"; failures listed in {failed_uri}" if failures else ""),
        file=sys.stderr, flush=True,
    )
    for failure in failures[:SHOWN_FAILURES]:  # the rest are a Parquet read away
        print(f"  failed: {failure['source']}: {failure['error']}", file=sys.stderr)
    if len(failures) > SHOWN_FAILURES:
        print(f"  ... and {len(failures) - SHOWN_FAILURES} more", file=sys.stderr)
