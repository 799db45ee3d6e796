"""What the bulk job reads: input discovery, output naming, and streaming archive members.

``--input`` may be a folder (walked recursively), one file, an ``s3://`` prefix, an archive
(``.tar``, ``.tar.gz``, ``.tgz``, ``.zip``, WebDataset-style tar shards) or a manifest
(``.txt`` with one path or URI per line, or ``.parquet`` with a ``path``/``uri``/``source``
column). Every file found is an input, so a stray non-image ends up in ``failed/`` rather
than vanishing; inside archives only members with an image extension count, since
WebDataset shards carry ``.json``/``.cls`` metadata beside each image.
"""

from __future__ import annotations

import bisect
import contextlib
import gzip
import hashlib
import json
import os
import posixpath
import re
import stat
import sys
import tarfile
import unicodedata
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs

from colorize import errors, storage

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")
# Archives of other kinds, named as such rather than as "not an image".
_UNREAD_ARCHIVES = (".tar.xz", ".txz", ".tar.bz2", ".tbz2", ".tbz", ".tar.zst", ".tzst", ".tar.lz", ".tar.lzma", ".7z", ".rar")
MANIFEST_SUFFIXES = (".txt", ".parquet")
MANIFEST_COLUMNS = ("path", "uri", "source")
MAX_NAME_BYTES = 255  # the longest file name ext4, APFS, NTFS and others take
# What a run (colorize.pipeline) writes under its output folder, and, locally, its files being written.
IMAGES_FOLDER, PARQUET_FOLDER, FAILED_FOLDER = "images", "parquet", "failed"
CONFIG_FILE, SUMMARY_FILE = "_CONFIG.json", "_SUMMARY.json"
OUTPUT_FOLDERS = (IMAGES_FOLDER, PARQUET_FOLDER, FAILED_FOLDER)
OUTPUT_FILES = (CONFIG_FILE, SUMMARY_FILE, storage.TEMP_PREFIX, storage.LOCK_FILE)
URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")  # a manifest entry with a scheme is not a path
# What training reads from folders and the bulk job from archives (where .json/.cls sit beside
# the images); every format here is one the pinned Pillow decodes.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".avif", ".bmp", ".tif", ".tiff", ".gif",
                  ".ppm", ".pgm", ".pbm", ".pnm", ".jp2", ".tga")


@dataclass(frozen=True)
class Item:
    """One unit of reading: a single file, or an archive whose members are the inputs.

    ``relpath`` is where the output goes under ``images/`` (with ``.png``) for a file, or the
    folder the members go under for an archive. An item with an ``error`` is not read: it is
    listed as failed with that reason.
    """

    kind: str  # "file" or "archive"
    uri: str
    relpath: str
    error: str = ""


# ImageNet's training tarball holds a tar per class: streamed, an archive's members are read
# once, with no going back for a member's own members.
NESTED_ARCHIVE = ("an archive inside an archive, which is not read: extract the outer one and pass its folder as "
                  "--input, whose archives are read")
NOT_UTF8 = "the file name is not valid UTF-8, so it cannot be read through Arrow; rename it (convmv does)"


def is_archive(name: str) -> bool:
    return name.lower().endswith(ARCHIVE_SUFFIXES)


@dataclass(frozen=True)
class Member:
    """An image member of an archive: its bytes, or why they cannot be read, or that they
    were not read (``skipped``)."""

    name: str
    relpath: str  # where the output goes under images/ (with .png)
    data: bytes | None
    error: str = ""
    skipped: bool = False


def discover(input_uri: str, settings: storage.S3Settings, *, exclude: str | None = None) -> list[Item]:
    """Every input under ``input_uri``, in a stable order, with collision-free output names.

    ``exclude`` is the run's output folder. Where it lies inside the input folder, every file
    under it is left out. Where it is the input folder or holds it (``--input data/grey
    --output data``), an earlier run's outputs there (``images/``, ``parquet/``, ``failed/``
    and its ``_*.json``) are; without an earlier run (no ``_CONFIG.json``), an input in one of
    those folders is refused, since the run would write over it.
    """
    if not storage.is_utf8(input_uri):
        raise storage.StorageError(f"{storage.utf8_name(input_uri)}: {NOT_UTF8}")
    fs, path = storage.resolve(input_uri, settings)
    info = storage.stat(fs, path, input_uri)
    if info.type == pafs.FileType.File and path.lower().endswith(MANIFEST_SUFFIXES):
        uris = read_manifest(fs, path, input_uri)
        relpaths = [_manifest_relpath(u) for u in uris]
    elif info.type == pafs.FileType.File:
        uris, relpaths = [input_uri], [posixpath.basename(path)]
    else:
        files = storage.list_files(fs, path, unlistable_as_files=True)  # each fails alone: see _why_not_read
        if not files:
            raise storage.StorageError(f"{input_uri}: no files found")
        if exclude is not None:
            files = _outside_output(fs, path, files, _output_prefix(fs, path, exclude), settings)
        files = _outside_earlier_outputs(fs, path, files)
        if not files:
            raise storage.StorageError(f"{input_uri}: no files found outside "
                                       + (f"the output folder {exclude}" if exclude is not None else "earlier outputs"))
        uris = [storage.to_uri(fs, f) for f in files]
        relpaths = [posixpath.relpath(f, path) for f in files]
    reasons = [_why_not_read(u) for u in uris]
    uris, relpaths = [storage.utf8_name(u) for u in uris], [storage.utf8_name(r) for r in relpaths]
    archives = [is_archive(r) for r in relpaths]
    names = output_names([r for r, a in zip(relpaths, archives) if not a])
    # An archive's members go in a folder of its name; two names the same up to case would be
    # one folder on a case-blind filesystem (macOS, Windows), so each gains a hash of its path.
    folders = Counter(name_key(r) for r, a in zip(relpaths, archives) if a)
    outputs = [(relpath if folders[name_key(relpath)] == 1 else f"{relpath}-{_hash(relpath)}") if archive else next(names)
               for relpath, archive in zip(relpaths, archives)]
    # Only a manifest can name two inputs alike: /data/x.jpg and s3://data/x.jpg.
    shadowed = _shadowed(zip(uris, outputs))
    # Only S3 can hold an archive x.tar and a key x.tar/a.jpg, whose output a member may have.
    archive_at = {name_key(output): uri for uri, output, archive in zip(uris, outputs, archives) if archive}
    items = []
    for uri, output, archive, error in zip(uris, outputs, archives, reasons):
        if uri in shadowed and not error:
            error = (f"its output name {output!r} is that of {shadowed[uri]}, listed before it, "
                     "whose output it would overwrite")
        inside = next((archive_at[f] for f in _folders([name_key(output)]) if f in archive_at), None) if archive_at else None
        if inside is not None and not archive and not error:
            error = f"its output {output!r} lies in that of archive {inside}, whose members are written there"
        items.append(Item("archive" if archive else "file", uri, output, error))
    return items


def _shadowed(outputs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """For each input whose output name an earlier input already has, that earlier input.

    ``outputs`` pairs each input with its output name, in order. The first input with a name
    keeps it; the rest fail, naming it, rather than overwrite its output.
    """
    first_with: dict[str, str] = {}
    shadowed: dict[str, str] = {}
    for key, output in outputs:
        first = first_with.setdefault(output, key)
        if first != key:
            shadowed[key] = first
    return shadowed


def _outside_output(fs: pafs.FileSystem, path: str, files: list[str], output: str, settings: storage.S3Settings) -> list[str]:
    """``files`` (under input folder ``path``) less those that are the run's output: see :func:`discover`."""
    if output.startswith(storage.to_uri(fs, path).rstrip("/") + "/"):  # the output inside the input
        return [f for f in files if not storage.to_uri(fs, f).startswith(output + "/")]
    # Left by any run that took the lock, even one refused before it wrote anything else.
    files = [f for f in files if storage.to_uri(fs, f) != f"{output}/{storage.LOCK_FILE}"]
    owned = tuple(f"{output}/{folder}/" for folder in OUTPUT_FOLDERS)
    inside_owned = [f for f in files if storage.to_uri(fs, f).startswith(owned)]
    if not inside_owned:
        return files
    out_fs, out_path = storage.resolve(output, settings)
    if not storage.exists(out_fs, storage.join(out_path, CONFIG_FILE)):
        raise storage.StorageError(f"{storage.to_uri(fs, inside_owned[0])}: an input in a folder that this run writes "
                                   f"into its --output {output}; choose another --output")
    owned += tuple(f"{output}/{name}" for name in OUTPUT_FILES)
    return [f for f in files if not storage.to_uri(fs, f).startswith(owned)]


def _outside_earlier_outputs(fs: pafs.FileSystem, path: str, files: list[str]) -> list[str]:
    """``files`` (under input folder ``path``) less the outputs of earlier runs into folders inside it.

    ``--input data --output data/run2`` after ``--output data/run1`` would otherwise colourise
    run1's PNGs again and copy its Parquet rows as inputs that fail. An earlier output is known
    by its ``_CONFIG.json``: the folders and files the run wrote beside it are left out, and
    the run says so.
    """
    marked = [f for f in files if posixpath.basename(f) == CONFIG_FILE and f != storage.join(path, CONFIG_FILE)]
    roots = {posixpath.dirname(f) for f in marked if _written_by_a_run(fs, f)}
    if not roots:
        return files
    written = [*(f"{folder}/" for folder in OUTPUT_FOLDERS), *OUTPUT_FILES]
    kept = _without_prefixes(files, [f"{root}/{name}" for root in roots for name in written])
    shown = ", ".join(storage.utf8_name(storage.to_uri(fs, root)) for root in sorted(roots)[:3])
    print(f"{storage.to_uri(fs, path)}: left out {len(files) - len(kept)} file(s) in {len(roots)} earlier "
          f"colorize output(s) inside it: {shown}{', ...' if len(roots) > 3 else ''}; to colourise one's images "
          "again, pass its images/ folder as --input", file=sys.stderr, flush=True)
    return kept


def _without_prefixes(files: list[str], prefixes: list[str]) -> list[str]:
    """Sorted ``files`` less those that start with one of ``prefixes``: a binary search per
    prefix, not a comparison per file and prefix (1,000 earlier outputs in 1 M files)."""
    dropped: list[tuple[int, int]] = []
    for prefix in prefixes:
        start = bisect.bisect_left(files, prefix)
        dropped.append((start, bisect.bisect_left(files, prefix + "\U0010ffff", lo=start)))
    kept, at = [], 0
    for start, end in sorted(dropped):
        kept.extend(files[at:max(at, start)])
        at = max(at, end)
    return kept + files[at:]


def _written_by_a_run(fs: pafs.FileSystem, config_path: str) -> bool:
    """Whether ``config_path`` is a bulk run's ``_CONFIG.json``, not another tool's file of that name."""
    try:
        config = json.loads(storage.read_bytes(fs, config_path))
    except (storage.StorageError, ValueError):
        return False
    return isinstance(config, dict) and {"input_uri", "weights_id", "formats"} <= config.keys()


def _output_prefix(fs: pafs.FileSystem, path: str, output: str) -> str:
    """The output folder as files listed under input folder ``path`` are spelled, where it lies
    inside it; locally either may be reached through a link (``--input link-to-in --output in/out``)."""
    output = output.rstrip("/")
    if isinstance(fs, pafs.LocalFileSystem):
        real_in, real_out = os.path.realpath(path), os.path.realpath(output)
        if real_out == real_in or real_out.startswith(real_in.rstrip("/") + "/"):
            return path.rstrip("/") + real_out[len(real_in.rstrip("/")):]
    return output


def _why_not_read(uri: str) -> str:
    """Why input ``uri`` fails before it is opened, or "". Opening a local named pipe would
    block the run forever; a local name that is not UTF-8 cannot be opened through Arrow."""
    if not storage.is_utf8(uri):
        return NOT_UTF8
    if uri.lower().endswith(_UNREAD_ARCHIVES):
        return ("an archive of a kind that is not read: extract it, or repack it as "
                f"{', '.join(ARCHIVE_SUFFIXES[:-1])} or {ARCHIVE_SUFFIXES[-1]}")
    if storage.is_s3(uri):
        return ""
    if URL.match(uri):
        return f"a {uri.split(':', 1)[0]} URL: only local paths and s3:// URIs are read"
    try:
        mode = os.stat(uri).st_mode
    except OSError:
        return ""  # missing, or a dangling link: the read says which
    if stat.S_ISREG(mode):
        return ""
    if stat.S_ISDIR(mode):
        try:  # one a folder's listing could not open (see storage.list_files)
            os.scandir(uri).close()
        except OSError as error:
            return f"a folder that cannot be listed: {storage.reason(error)}"
        return "a folder, not a file: a manifest lists files and archives (pass a folder itself as --input)"
    kind = "a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a device or socket"
    return f"{kind}, not a regular file, so it is not read"


def output_names(relpaths: list[str]) -> Iterator[str]:
    """Output names for input relpaths: the extension replaced by ``.png``.

    Names must stay apart on every filesystem an output may land on, so where two would be
    the same up to case and accents' encoding (:func:`name_key`: ``a.jpg`` and ``a.webp``;
    ``b.png`` and ``b.png.jpg``; ``C.jpg`` and ``c.gif``), or one would be a folder another
    needs (``p.jpg`` beside ``p.png/q.jpg``), the inputs concerned keep their whole names plus
    ``.png``; where even those clash (``C.jpg`` and ``c.jpg``), they gain a hash of the relpath. A name or folder of over 255 bytes, which
    no local filesystem takes, is cut short and gains a hash too (:func:`_fit_name`). The same relpaths always get
    the same names, so a resumed run finds its outputs.
    """
    distinct = list(dict.fromkeys(relpaths))  # a relpath listed twice (manifests) has one name
    level = [0] * len(distinct)  # 0: stem; 1: whole name; 2: whole name and hash
    while True:
        names = [_output_name(r, lv) for r, lv in zip(distinct, level)]
        keys = [name_key(name) for name in names]
        counts = Counter(keys)
        whole = Counter(key for key, lv in zip(keys, level) if lv)  # whole names clash only among themselves
        folders = _folders(keys)
        clashing = [i for i, key in enumerate(keys) if level[i] < 2 and (
            (whole if level[i] else counts)[key] > 1 or key in folders)]
        if not clashing:
            fitted = {relpath: _fit_name(name, relpath) for name, relpath in zip(names, distinct)}
            return (fitted[relpath] for relpath in relpaths)
        for i in clashing:
            level[i] += 1


def name_key(name: str) -> str:
    """``name`` as the filesystems that outputs may land on compare names: case-blind (macOS,
    Windows), and on macOS with an accent composed or not (``é`` or ``e`` + U+0301, as Linux
    and Mac tools spell it) the same."""
    return unicodedata.normalize("NFC", name).lower()


def _output_name(relpath: str, level: int) -> str:
    stem, extension = posixpath.splitext(relpath)
    if level == 0:
        return (stem if extension else relpath) + ".png"
    return relpath + (f"-{_hash(relpath)}.png" if level == 2 else ".png")


def _folders(names: Iterable[str]) -> set[str]:
    """The folders that outputs ``names`` lie in: ``a/b/c.png`` -> ``a``, ``a/b``."""
    folders: set[str] = set()
    for parent in {name.rpartition("/")[0] for name in names}:  # few, however many the names
        while parent and parent not in folders:
            folders.add(parent)
            parent = parent.rpartition("/")[0]
    return folders


def _fit_name(name: str, relpath: str) -> str:
    """``name`` with each part of over 255 bytes cut short and given a hash: a folder's of its
    path so far (the files in it stay together), the last one's of ``relpath``."""
    *folders, last = name.split("/")
    for i, part in enumerate(folders):
        if len(part.encode()) > MAX_NAME_BYTES:  # an archive member's or S3 key's: no local folder is named so long
            folders[i] = _cut(part, f"-{_hash('/'.join(folders[: i + 1]))}")
    if len(last.encode()) > MAX_NAME_BYTES:
        last = _cut(last, f"-{_hash(relpath)}.png")
    return "/".join([*folders, last])


def _cut(part: str, suffix: str) -> str:
    """``part`` cut to whole characters that, with ``suffix``, take at most 255 bytes."""
    return part.encode()[: MAX_NAME_BYTES - len(suffix)].decode(errors="ignore") + suffix


def _hash(relpath: str) -> str:
    return hashlib.blake2s(relpath.encode(), digest_size=4).hexdigest()


def read_manifest(fs: pafs.FileSystem, path: str, uri: str) -> list[str]:
    """Paths or URIs listed in a manifest; relative local paths are taken from its folder."""
    if path.lower().endswith(".parquet"):
        try:  # the one column read: a table of paths may hold the images' bytes beside them
            manifest = storage.parquet_file(fs, path)
            names = manifest.schema_arrow.names
            column = next((c for c in MANIFEST_COLUMNS if c in names), None)
            if column is None:
                raise storage.StorageError(f"{uri}: a Parquet manifest needs one of the columns {MANIFEST_COLUMNS}, found {names}")
            values = manifest.read(columns=[column]).column(0).to_pylist()
        except pa.ArrowException as error:  # not Parquet, or cut short
            raise storage.StorageError(f"{uri}: not a readable Parquet manifest ({errors.one_line(error, with_type=False)})") from None
        entries = [str(v) for v in values if v]
    else:
        try:
            text = storage.read_bytes(fs, path).decode("utf-8-sig")  # Notepad starts UTF-8 with a BOM
        except UnicodeDecodeError as error:
            raise storage.StorageError(f"{uri}: a text manifest must be UTF-8 ({error})") from None
        entries = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    if not entries:
        raise storage.StorageError(f"{uri}: the manifest lists no inputs")
    base = posixpath.dirname(path)  # a filesystem path: "bucket/key" on S3, so normpath keeps "s3://"

    def resolve(entry: str) -> str:
        if storage.is_s3(entry) or URL.match(entry):  # another scheme fails as an input, by name
            return entry
        if posixpath.isabs(entry):
            return "/" + posixpath.normpath(entry).lstrip("/")  # normpath keeps a leading "//"
        return storage.to_uri(fs, posixpath.normpath(posixpath.join(base, entry)))

    return list(dict.fromkeys(resolve(e) for e in entries))  # a path listed twice is one input


def _manifest_relpath(uri: str) -> str:
    """``s3://bucket/a/b.jpg`` -> ``bucket/a/b.jpg``; ``/data/a/b.jpg`` -> ``data/a/b.jpg``."""
    return uri[5:] if storage.is_s3(uri) else uri.lstrip("/")


def archive_members(
    fs: pafs.FileSystem, path: str, relpath: str, *, limit: int | None = None,
    skip: Callable[[str], bool] = lambda relpath: False,
) -> Iterator[Member]:
    """Stream every image member of an archive, with a reason for each that cannot be read,
    and each member that is itself an archive, which fails (:data:`NESTED_ARCHIVE`).

    A member whose output relpath ``skip`` accepts (one a resumed run has written) comes out
    ``skipped``, its bytes unread: a zip never reads them, a tar stream passes over them.

    A zip member that cannot be read (bad CRC, encrypted, an unsupported compression) fails
    alone, and so does one of more than ``limit`` bytes uncompressed, unread. Tar archives
    are read twice as streams (names first, for collision-free output names, then the
    bytes), so nothing is unpacked to disk and nothing needs random access;
    one that breaks off yields the members before the break, then raises. Links inside a
    tar are not followed (a stream cannot go back for their target) and fail alone. A tar
    member name that is not UTF-8 is read all the same, under :func:`storage.utf8_name`.
    """
    if path.lower().endswith(".zip"):
        yield from _zip_members(fs, path, relpath, limit, skip)
    else:
        yield from _tar_members(fs, path, relpath, limit, skip)


def _zip_members(
    fs: pafs.FileSystem, path: str, relpath: str, limit: int | None, skip: Callable[[str], bool]
) -> Iterator[Member]:
    """:func:`archive_members` of a zip: its directory lists the members, which it reads at random."""
    with storage.open_seekable(fs, path) as raw, _open_zip(raw, path) as archive:
        listed = list(dict.fromkeys(archive.namelist()))
        for member in filter(_is_nested_archive, listed):
            yield Member(member, f"{relpath}/{member}", None, NESTED_ARCHIVE)
        members = [m for m in listed if _is_image_member(m)]
        names, shadowed = _member_outputs(members)
        for member in members:
            member_relpath = f"{relpath}/{names[member]}"
            if member in shadowed:
                yield Member(member, member_relpath, None, _same_output(shadowed[member]))
                continue
            if skip(member_relpath):
                yield Member(member, member_relpath, None, skipped=True)
                continue
            if limit is not None and archive.getinfo(member).file_size > limit:
                yield Member(member, member_relpath, None, storage.too_large(limit))
                continue
            try:
                data, error = archive.read(member), ""
            except (zipfile.BadZipFile, RuntimeError, NotImplementedError, OSError, EOFError, zlib.error) as e:
                data, error = None, f"cannot read from the zip: {e}"
            yield Member(member, member_relpath, data, error)


def _tar_members(
    fs: pafs.FileSystem, path: str, relpath: str, limit: int | None, skip: Callable[[str], bool]
) -> Iterator[Member]:
    """:func:`archive_members` of a tar (or .tar.gz): two passes over a stream, names then bytes."""
    last: dict[str, int] = {}  # each image member's last entry: a name appended again (tar -r) is its newer copy
    nested: dict[str, int] = {}  # the same for archives inside this one
    listing_broke: Exception | None = None
    try:
        with _tar_stream(fs, path) as archive:
            for index, m in enumerate(archive):
                if (m.isfile() or m.issym() or m.islnk()) and _is_image_member(m.name):
                    last[m.name] = index
                elif m.isfile() and _is_nested_archive(m.name):
                    nested[m.name] = index
    except (OSError, EOFError, tarfile.TarError, zlib.error) as error:
        listing_broke = error  # the second pass streams the members listed so far, then this is raised
    names, shadowed = _member_outputs(list(last))
    with _tar_stream(fs, path) as archive:
        for index, m in enumerate(archive):
            name = storage.utf8_name(m.name)
            if nested.get(m.name) == index:
                yield Member(name, f"{relpath}/{name}", None, NESTED_ARCHIVE)
            if last.get(m.name) != index:
                continue
            output = names[m.name]
            member_relpath = f"{relpath}/{output}"
            if m.name in shadowed:
                yield Member(name, member_relpath, None, _same_output(shadowed[m.name]))
            elif skip(member_relpath):
                yield Member(name, member_relpath, None, skipped=True)
            elif m.isfile() and limit is not None and m.size > limit:
                yield Member(name, member_relpath, None, storage.too_large(limit))  # the stream skips its bytes
            elif m.isfile():
                yield Member(name, member_relpath, archive.extractfile(m).read())
            else:
                target = storage.utf8_name(m.linkname)
                yield Member(name, member_relpath, None, f"a link to {target!r} inside the archive (not followed)")
    if listing_broke is not None:
        # A break that was passing (an S3 connection reset) would otherwise end the archive
        # early without a word: the members after it were never listed.
        raise listing_broke


@contextlib.contextmanager
def _tar_stream(fs: pafs.FileSystem, path: str) -> Iterator[tarfile.TarFile]:
    """Tar archive ``path`` as a stream of members, gunzipped where it starts as gzip does,
    whatever its name: a gzipped .tar, or a .tar.gz that a download has already unpacked.

    Through GzipFile, not tarfile's ``r|gz``: that reads only a file's first gzip member (bgzip
    and appended gzips lost the rest) and takes a gzip cut off inside a tar header for the
    archive's end (6 of 10 members written, exit 0); GzipFile raises EOFError there, after the
    members before the cut. A tar whose members end anywhere but at its end-of-archive blocks
    (cut off between members or inside a header; a header corrupt) raises too: tarfile takes
    that for the end as well.
    """
    with storage.open_stream(fs, path) as raw:
        head = raw.read(_HEAD_BYTES)
        other = next((what for magic, what in _NOT_TAR.items() if re.match(magic, head)), None)
        if other is not None:  # else tarfile's "invalid header" says nothing of what it is
            raise tarfile.ReadError(f"{other}, not a tar or a gzipped tar: name it for what it is")
        raw = _Prefixed(head, raw)
        gzipped = head.startswith(_GZIP_MAGIC)
        with gzip.GzipFile(fileobj=raw, mode="rb") if gzipped else contextlib.nullcontext(raw) as unpacked:
            stream = _UntilBroken(unpacked)
            try:
                with tarfile.open(fileobj=stream, mode="r|") as archive:
                    yield archive
                    last_header = archive.offset  # where the end-of-archive block was read, or found missing
            except tarfile.ReadError:  # "unexpected end of data", where the cut is the reason
                if stream.error is None:
                    raise
            if stream.error is not None:
                raise stream.error
            if stream.block_at(last_header) != bytes(tarfile.BLOCKSIZE):  # cut there, or a header tarfile could not read
                raise tarfile.ReadError("the archive ends without its end-of-archive blocks: cut off, or a header is corrupt")


_GZIP_MAGIC = b"\x1f\x8b"
# Formats a tar is mistaken for, by magic numbers long enough that no member name (a plain
# tar's first bytes) starts with one.
_NOT_TAR = {rb"PK\x03\x04": "a zip archive", rb"BZh[1-9]1AY&SY": "bzip2-compressed", rb"\xfd7zXZ\x00": "xz-compressed",
            rb"7z\xbc\xaf\x27\x1c": "a 7z archive", rb"\x28\xb5\x2f\xfd": "zstd-compressed", rb"Rar!\x1a\x07": "a rar archive"}
_HEAD_BYTES = 10


class _Prefixed:
    """A stream with ``head``, its first bytes, read already (pyarrow's streams cannot peek)."""

    def __init__(self, head: bytes, stream: pafs.NativeFile) -> None:
        self._head, self._stream = head, stream

    def read(self, size: int = -1) -> bytes:
        if not self._head:
            return self._stream.read(size)
        if size is None or size < 0:
            piece, self._head = self._head + self._stream.read(), b""
        else:
            piece, self._head = self._head[:size], self._head[size:]
        return piece


class _UntilBroken:
    """A stream that ends where it breaks off, keeping the error for later, and counts its bytes.

    tarfile reads 10 KiB at a time, and GzipFile raised EOFError for the whole read at a cut,
    dropping the members decompressed before it in that read (52 of 54 whole members kept).
    Read a piece at a time (``read1``), the stream gives every byte before the cut.
    """

    def __init__(self, stream: gzip.GzipFile | _Prefixed) -> None:
        # A piece at a time from GzipFile; a plain stream gives what it has before a cut anyway.
        self._read = stream.read1 if isinstance(stream, gzip.GzipFile) else stream.read
        self.error: Exception | None = None
        self.count = 0
        self._tail = bytearray()  # the last bytes read: tarfile reads ahead of its offset by 10 KiB at most

    def read(self, size: int = -1) -> bytes:
        if self.error is not None:
            return b""
        try:
            piece = self._read(size)
        except (EOFError, OSError, zlib.error) as error:  # cut off, corrupt, or a connection lost
            self.error = error
            return b""
        self.count += len(piece)
        self._tail += piece
        del self._tail[: -_TAIL_BYTES]
        return piece

    def block_at(self, offset: int) -> bytes:
        """The tar block read at ``offset``, if among the last bytes read (short where the stream ended in it)."""
        start = len(self._tail) - (self.count - offset)
        return bytes(self._tail[start : start + tarfile.BLOCKSIZE]) if start >= 0 else b""


_TAIL_BYTES = 64 * 1024


def _member_outputs(members: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """Output names (relative to the archive) of an archive's distinct member names, and the
    members :func:`_shadowed` by an earlier one. Two members can share an output name once
    written in UTF-8 and rid of "." components (``./a.jpg`` and ``a.jpg``)."""
    spelled = ["/".join(part for part in storage.utf8_name(m).split("/") if part != ".") for m in members]
    names = dict(zip(members, output_names(spelled)))
    return names, _shadowed(names.items())


def _same_output(first: str) -> str:
    return (f"its name, written in UTF-8 and without '.' components, is that of another member "
            f"({storage.utf8_name(first)!r}), whose output it would overwrite")


def _open_zip(raw: object, path: str) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(raw)
    except (zipfile.BadZipFile, ValueError, OSError) as error:
        # A file under 22 bytes makes zipfile seek before its start, which pyarrow refuses
        # with ArrowInvalid (a ValueError) rather than the OSError zipfile expects.
        raise zipfile.BadZipFile(f"not a zip file ({posixpath.basename(path)})") from error


def _is_image_member(name: str) -> bool:
    return not name.endswith("/") and name.lower().endswith(IMAGE_SUFFIXES) and not _is_macos_metadata(name)


def _is_nested_archive(name: str) -> bool:
    return not name.endswith("/") and is_archive(name) and not _is_macos_metadata(name)


def _is_macos_metadata(name: str) -> bool:
    """The metadata that macOS packs beside each file (``__MACOSX/._a.jpg`` in a Finder zip,
    ``._a.jpg`` in a tar made with its tar): named as the file, never an image."""
    parts = name.split("/")
    return parts[-1].startswith("._") or "__MACOSX" in parts
