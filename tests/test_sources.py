"""What the bulk job reads, without Ray: listing, output names, archives, manifests, decoding.

Each case is an input that once aborted a run or vanished from its accounting.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import lzma
import os
import posixpath
import re
import struct
import subprocess
import sys
import tarfile
import unicodedata
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from colorize import images, imagesets, pipeline, sources, storage
from colorize.models import ModelConfig, build_model
from tests.helpers import encode, scene

LOCAL = pafs.LocalFileSystem()


def _batch(items: list[sources.Item]) -> dict[str, np.ndarray]:
    """``items`` as the columns a read task gets, with nothing done before."""
    rows = pipeline.task_rows(items, pipeline.Done(("png",)))
    batch = {key: np.empty(len(rows), dtype=object) for key in rows[0]}
    for i, row in enumerate(rows):
        for key, value in row.items():
            batch[key][i] = value
    return batch


def test_output_names_are_distinct_even_where_a_stem_is_another_input_s_name() -> None:
    relpaths = ["b.jpg", "b.png", "b.png.jpg", "c.jpg", "d", "sub/b.jpg"]
    names = list(sources.output_names(relpaths))
    assert names == ["b.jpg.png", "b.png.png", "b.png.jpg.png", "c.png", "d.png", "sub/b.png"]
    assert len(set(names)) == len(names)


def test_output_names_stay_apart_on_case_blind_filesystems_and_never_need_a_file_as_a_folder() -> None:
    """C.jpg and c.gif both wrote C.png/c.png, one over the other on macOS, Windows or SMB; p.jpg
    beside p.png/q.jpg wrote images/p.png and needed images/p.png/ as a folder: one failed."""
    relpaths = ["C.jpg", "c.gif", "Same.jpg", "same.jpg", "D/x.jpg", "d/x.jpg", "p.jpg", "p.png/q.jpg"]
    names = list(sources.output_names(relpaths))
    assert names[:2] == ["C.jpg.png", "c.gif.png"]
    for name, relpath in zip(names[2:6], relpaths[2:6]):  # whole names the same up to case: hashed
        assert re.fullmatch(re.escape(relpath) + r"-[0-9a-f]{8}\.png", name), name
    assert names[6:] == ["p.jpg.png", "p.png/q.png"]
    assert len({n.lower() for n in names}) == len(names)
    assert not {n.lower() for n in names} & sources._folders(n.lower() for n in names)
    # A resumed run, a new process (Python's own hash() differs from one to the next), finds them again.
    code = f"from colorize import sources; print(list(sources.output_names({relpaths!r})))"
    for seed in ("1", "2"):
        other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                               env={**os.environ, "PYTHONHASHSEED": seed}, cwd=Path(__file__).parents[1])
        assert other.stdout.strip() == repr(names)


def test_names_spelled_with_composed_and_decomposed_accents_get_outputs_apart() -> None:
    """café.jpg from Linux (é) and from a Mac (e + U+0301) both wrote café.png: one file on macOS."""
    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    relpaths = [f"{nfc}.jpg", f"{nfd}.jpg", f"{nfd}.tar/{nfc}.png"]
    names = list(sources.output_names(relpaths))
    keys = {unicodedata.normalize("NFC", n).lower() for n in names}
    assert len(keys) == 3 and not keys & sources._folders(keys)
    for name, relpath in zip(names[:2], relpaths[:2]):  # the same up to accents and case: hashed
        assert re.fullmatch(re.escape(relpath) + r"-[0-9a-f]{8}\.png", name), name


def test_archives_named_alike_up_to_accents_write_to_folders_apart(tmp_path: Path) -> None:
    for form in ("NFC", "NFD"):
        (tmp_path / unicodedata.normalize(form, "café.tar")).write_bytes(_tar_of([("p.png", _good_png(0))]))
    outputs = [item.relpath for item in sources.discover(str(tmp_path), storage.S3Settings())]
    assert len(outputs) == 2 and len({unicodedata.normalize("NFC", o).lower() for o in outputs}) == 2, outputs


def test_an_output_name_over_255_bytes_is_cut_short_and_kept_distinct() -> None:
    """Two 253-byte names sharing a stem each took their whole name plus .png, 257 bytes:
    'File name too long' for both."""
    long = "M" * 249
    relpaths = [f"{long}.jpg", f"{long}.gif", "sub/" + "日" * 90 + ".jpg", "short.jpg"]
    names = list(sources.output_names(relpaths))
    assert all(len(posixpath.basename(n).encode()) <= 255 for n in names), [len(n.encode()) for n in names]
    assert len(set(names)) == 4 and names[0].startswith(long[:200]) and names[2].startswith("sub/日")
    assert names[3] == "short.png"

    # A folder over 255 bytes (an archive member's, an S3 key's) failed its files: "File name too long".
    folder, other = "F" * 300, "F" * 299 + "G"
    names = list(sources.output_names([f"pack.tar/{folder}/a.jpg", f"pack.tar/{folder}/b.jpg", f"pack.tar/{other}/a.jpg"]))
    assert all(len(part.encode()) <= 255 for name in names for part in name.split("/")), names
    assert names[0].rsplit("/", 1)[0] == names[1].rsplit("/", 1)[0] != names[2].rsplit("/", 1)[0]  # kept together, apart
    assert [n.rsplit("/", 1)[1] for n in names] == ["a.png", "b.png", "a.png"]


def test_listing_follows_folder_links_but_not_loops_and_keeps_dangling_links(tmp_path: Path) -> None:
    root, elsewhere = tmp_path / "in", tmp_path / "elsewhere"
    (root / "a" / "b").mkdir(parents=True)
    (root / "c").mkdir()
    elsewhere.mkdir()
    for path in (root / "a/b/x.jpg", root / "c/y.jpg", elsewhere / "z.jpg"):
        path.touch()
    os.symlink(".", root / "self")  # each of these three would never end if followed
    os.symlink("..", root / "a" / "up")
    os.symlink("../a", root / "c" / "to-a")
    os.symlink("../c", root / "a" / "to-c")
    os.symlink(elsewhere, root / "linked")
    os.symlink(tmp_path / "missing.jpg", root / "dangling.jpg")
    os.symlink("loop.jpg", root / "loop.jpg")  # a loop of links ended the whole listing (ELOOP)
    os.symlink("ping.jpg", root / "pong.jpg")
    os.symlink("pong.jpg", root / "ping.jpg")

    found = [os.path.relpath(p, root) for p in storage.list_files(LOCAL, str(root))]

    assert found == sorted(["a/b/x.jpg", "a/to-c/y.jpg", "c/to-a/b/x.jpg", "c/y.jpg", "dangling.jpg", "linked/z.jpg",
                            "loop.jpg", "ping.jpg", "pong.jpg"])
    with pytest.raises(storage.StorageError, match="loop.jpg: .*Too many levels of symbolic links"):
        storage.read_bytes(LOCAL, str(root / "loop.jpg"))  # so the input fails alone, saying why


def test_a_folder_that_cannot_be_listed_fails_alone_and_the_rest_is_read(tmp_path: Path, monkeypatch) -> None:
    """One such folder used to stop the whole listing, the error naming the input root."""
    root = tmp_path / "in"
    (root / "ok").mkdir(parents=True)
    (root / "locked").mkdir()
    (root / "ok" / "a.png").write_bytes(_good_png(0))
    (root / "locked" / "b.png").write_bytes(_good_png(1))
    os.symlink(tmp_path / "missing.png", root / "dangling.png")
    (root / "locked").chmod(0)
    if os.access(root / "locked", os.R_OK):  # root, whom modes do not stop: the kernel's refusal, stood in for
        scandir = os.scandir

        def refusing(path):  # noqa: ANN001, ANN202
            if os.fspath(path) == str(root / "locked"):
                raise PermissionError(13, "Permission denied", os.fspath(path))
            return scandir(path)

        monkeypatch.setattr(os, "scandir", refusing)
    try:
        items = sources.discover(str(root), storage.S3Settings())
        assert [(i.relpath, i.error) for i in items] == [
            ("dangling.png", ""), ("locked.png", "a folder that cannot be listed: permission denied"), ("ok/a.png", "")]
        # Where one unread folder would leave out a class (training, evaluate, probe), it is named.
        with pytest.raises(storage.StorageError, match="in/locked: cannot list this folder: permission denied"):
            storage.list_files(LOCAL, str(root))
        with pytest.raises(storage.StorageError, match="in: permission denied"):  # the root itself: nothing to run
            monkeypatch.setattr(os, "scandir", lambda path: (_ for _ in ()).throw(PermissionError(13, "denied", path)))
            storage.list_files(LOCAL, str(root), unlistable_as_files=True)
    finally:
        (root / "locked").chmod(0o755)
        monkeypatch.undo()

    (rows,) = pipeline.read_and_decode(_batch(items), settings=storage.S3Settings(), size=8, max_pixels=10**6, chunk=8)
    outcome = {str(r): (str(s), str(e)) for r, s, e in zip(rows["relpath"], rows["status"], rows["error"])}
    assert outcome["ok/a.png"][0] == "ok"
    # The row names the input; its reason does not repeat the path (it said "PATH: PATH: no such file ...").
    assert outcome["dangling.png"] == ("failed", "no such file or directory")


def test_a_file_name_that_is_not_utf8_fails_alone_under_a_printable_name(tmp_path: Path) -> None:
    payload = _good_png(0)
    (tmp_path / "fine.png").write_bytes(payload)
    for name in (b"/caf\xe9.png", b"/d\xfcr/x.png"):  # Latin-1 names, as old archives and shares have
        path = Path(os.fsdecode(os.fsencode(tmp_path) + name))
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(payload)

    items = sources.discover(str(tmp_path), storage.S3Settings())
    assert [(i.relpath, bool(i.error)) for i in items] == [("caf%E9.png", True), ("d%FCr/x.png", True), ("fine.png", False)]
    assert items[0].uri == f"{tmp_path}/caf%E9.png" and "not valid UTF-8" in items[0].error

    batch = _batch(items)
    (rows,) = pipeline.read_and_decode(
        batch, settings=storage.S3Settings(), size=32, max_pixels=10**6, chunk=8
    )
    assert list(rows["status"]) == ["failed", "failed", "ok"]
    assert pa.array(list(rows["source"])).to_pylist() == [i.uri for i in items]  # Parquet can hold every name


def test_a_tar_member_name_that_is_not_utf8_is_read_under_a_printable_name(tmp_path: Path) -> None:
    path, payload = tmp_path / "old.tar", _good_png(0)
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tar:
        info = tarfile.TarInfo("caf\xe9.png")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))

    (member,) = sources.archive_members(LOCAL, str(path), "old.tar")

    assert (member.name, storage.safe_relpath(member.relpath), member.data) == ("caf%E9.png", "old.tar/caf%E9.png", payload)


def test_two_tar_members_spelled_alike_in_utf8_do_not_share_an_output(tmp_path: Path) -> None:
    path = tmp_path / "both.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tar:
        for name, seed in (("caf%E9.png", 0), ("caf\xe9.png", 1)):  # the second is written "caf%E9.png" in UTF-8
            payload = _good_png(seed)
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))

    first, second = sources.archive_members(LOCAL, str(path), "both.tar")

    assert (first.name, first.data, first.error) == ("caf%E9.png", _good_png(0), "")
    assert second.data is None and "is that of another member ('caf%E9.png')" in second.error


@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_members_spelled_alike_but_for_dot_components_do_not_share_an_output(tmp_path: Path, kind: str) -> None:
    path = tmp_path / f"dots.{kind}"
    entries = (("./x.png", 0), ("x.png", 1))  # `tar -C d -cf dots.tar .`, then `tar -rf dots.tar x.png`
    if kind == "tar":
        with tarfile.open(path, "w") as tar:
            for name, seed in entries:
                info = tarfile.TarInfo(name)
                info.size = len(_good_png(seed))
                tar.addfile(info, io.BytesIO(_good_png(seed)))
    else:
        with zipfile.ZipFile(path, "w") as archive:
            for name, seed in entries:
                archive.writestr(name, _good_png(seed))

    first, second = sources.archive_members(LOCAL, str(path), path.name)

    assert first.data == _good_png(0) and not first.error
    assert storage.safe_relpath(first.relpath) == storage.safe_relpath(second.relpath)
    assert second.data is None and "is that of another member ('./x.png')" in second.error


def test_a_tar_whose_listing_broke_off_once_is_listed_as_failed_after_its_members(tmp_path: Path) -> None:
    """An S3 connection reset in the first of a tar's two reads: the second reads it whole, but the
    members after the break were never listed, so the archive must not end as if complete."""
    whole = io.BytesIO()
    with tarfile.open(fileobj=whole, mode="w") as tar:
        for i in range(4):
            payload = _good_png(i) + bytes(20_000)
            info = tarfile.TarInfo(f"m{i}.png")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    blob, reads = whole.getvalue(), []

    class ResetOnce(io.BytesIO):
        def read(self, n: int = -1) -> bytes:
            if len(reads) == 1 and self.tell() > 45_000:
                raise OSError("connection reset")
            return super().read(n)

    class FlakyStore:
        def open_input_stream(self, path: str, compression: str | None = None, buffer_size: int | None = None) -> io.BytesIO:
            reads.append(path)
            return ResetOnce(blob)

    names = []
    with pytest.raises(OSError, match="connection reset"):
        for member in sources.archive_members(FlakyStore(), "shard.tar", "shard.tar"):
            names.append(member.name)
    assert names == ["m0.png", "m1.png", "m2.png"] and len(reads) == 2  # m3 was never listed


def _tar_of(entries: list[tuple[str, bytes]]) -> bytes:
    whole = io.BytesIO()
    with tarfile.open(fileobj=whole, mode="w") as tar:
        for name, payload in entries:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return whole.getvalue()


def test_a_gzipped_tar_of_several_gzip_members_is_read_whole_and_one_cut_off_never_ends_quietly(tmp_path: Path) -> None:
    """tarfile's r|gz read only the first gzip member of a bgzip or appended .tar.gz (5 of 10
    members, then 'unexpected end of data'), and took a gzip cut inside a tar header for the
    archive's end: 6 of 10 members written, exit 0."""
    blob = _tar_of([(f"m{i}.png", _good_png(i)) for i in range(10)])
    half = len(blob) // 2
    (tmp_path / "multi.tar.gz").write_bytes(gzip.compress(blob[:half]) + gzip.compress(blob[half:]))
    members = list(sources.archive_members(LOCAL, str(tmp_path / "multi.tar.gz"), "multi.tar.gz"))
    assert [m.name for m in members] == [f"m{i}.png" for i in range(10)] and all(m.data for m in members)

    blob = _tar_of([(f"m{i}.png", _good_png(i)) for i in range(40)])  # 40 KiB: a cut can fall in any of tarfile's reads
    packed = gzip.compress(blob)
    ends = [m.offset_data + m.size for m in tarfile.open(fileobj=io.BytesIO(blob)).getmembers()]
    for cut in range(len(packed) // 8, len(packed) - 8, max(1, len(packed) // 60)):
        (tmp_path / "cut.tar.gz").write_bytes(packed[:cut])
        before_the_cut = _gunzipped_until_cut(packed[:cut])
        read = []
        with pytest.raises(EOFError, match="Compressed file ended before the end-of-stream marker"):
            for member in sources.archive_members(LOCAL, str(tmp_path / "cut.tar.gz"), "cut.tar.gz"):
                read.append(member.name)
        # Every member whole before the cut: tarfile's reads of 10 KiB lost those in the last one.
        assert read == [f"m{i}.png" for i, end in enumerate(ends) if end <= len(before_the_cut)]


def test_a_tar_is_gunzipped_by_its_content_not_its_name(tmp_path: Path) -> None:
    """A gzipped .tar failed as 'invalid header'; a .tar.gz that a download already unpacked, as
    'not a gzipped file'."""
    blob = _tar_of([(f"m{i}.png", _good_png(i)) for i in range(3)])
    (tmp_path / "gzipped.tar").write_bytes(gzip.compress(blob))
    (tmp_path / "unpacked.tar.gz").write_bytes(blob)
    for name in ("gzipped.tar", "unpacked.tar.gz"):
        members = list(sources.archive_members(LOCAL, str(tmp_path / name), name))
        assert [m.name for m in members] == ["m0.png", "m1.png", "m2.png"] and all(m.data for m in members)
    # Another format under a tar's name says what it is ("invalid header" did not); a tar whose
    # first member's name starts as a zip's magic does is still a tar.
    with zipfile.ZipFile(tmp_path / "zipped.tar.gz", "w") as archive:
        archive.writestr("m0.png", _good_png(0))
    (tmp_path / "xz.tar").write_bytes(lzma.compress(blob))
    for name, what in (("zipped.tar.gz", "a zip archive"), ("xz.tar", "xz-compressed")):
        with pytest.raises(tarfile.ReadError, match=f"^{what}, not a tar or a gzipped tar"):
            list(sources.archive_members(LOCAL, str(tmp_path / name), name))
    (tmp_path / "pk.tar").write_bytes(_tar_of([("PK.png", _good_png(0))]))
    assert [m.name for m in sources.archive_members(LOCAL, str(tmp_path / "pk.tar"), "pk.tar")] == ["PK.png"]


def _gunzipped_until_cut(packed: bytes) -> bytes:
    stream, out = gzip.GzipFile(fileobj=io.BytesIO(packed)), []
    with contextlib.suppress(EOFError):
        while piece := stream.read1(1024):
            out.append(piece)
    return b"".join(out)


def test_a_name_appended_to_a_tar_again_is_read_from_its_last_copy_as_tar_extracts_it(tmp_path: Path) -> None:
    """`tar -rf` appends a newer copy under the same name: the first, stale one was read, and a
    link replaced by a file failed as a link."""
    link = tarfile.TarInfo("q.png")
    link.type, link.linkname = tarfile.SYMTYPE, "gone.png"
    whole = io.BytesIO()
    with tarfile.open(fileobj=whole, mode="w") as tar:
        for name, payload in (("p.png", _good_png(0)), ("p.png", _good_png(1))):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        tar.addfile(link)
        info = tarfile.TarInfo("q.png")
        info.size = len(_good_png(2))
        tar.addfile(info, io.BytesIO(_good_png(2)))
    (tmp_path / "updated.tar").write_bytes(whole.getvalue())
    members = {m.name: m for m in sources.archive_members(LOCAL, str(tmp_path / "updated.tar"), "updated.tar")}
    assert members["p.png"].data == _good_png(1) and members["q.png"].data == _good_png(2) and len(members) == 2


def test_archives_named_alike_up_to_case_write_to_folders_apart(tmp_path: Path) -> None:
    """Case.tar and case.tar wrote Case.tar/p.png and case.tar/p.png: one file on macOS or Windows."""
    for name in ("Case.tar", "case.tar", "other.tar"):
        (tmp_path / name).write_bytes(_tar_of([("p.png", _good_png(0))]))
    outputs = {Path(item.uri).name: item.relpath for item in sources.discover(str(tmp_path), storage.S3Settings())}
    assert outputs["other.tar"] == "other.tar"
    assert re.fullmatch(r"Case\.tar-[0-9a-f]{8}", outputs["Case.tar"]) and re.fullmatch(r"case\.tar-[0-9a-f]{8}", outputs["case.tar"])
    assert outputs["Case.tar"].lower() != outputs["case.tar"].lower()


def test_an_input_whose_output_lies_in_an_archives_fails_naming_the_archive(tmp_path: Path) -> None:
    """S3 can hold an archive x.tar and a key x.tar/a.jpg: both wrote x.tar/a.png, one over the other."""
    (tmp_path / "x.tar").write_bytes(_tar_of([("a.png", _good_png(0))]))
    (tmp_path / "list.txt").write_text(f"{tmp_path}/x.tar\ns3:/{tmp_path}/x.tar/a.jpg\n")
    items = sources.discover(str(tmp_path / "list.txt"), storage.S3Settings(endpoint="http://127.0.0.1:9"))
    assert items[0].kind == "archive" and not items[0].error
    assert items[1].relpath == f"{items[0].relpath}/a.png"
    assert items[1].error == f"its output {items[1].relpath!r} lies in that of archive {tmp_path}/x.tar, whose members are written there"


def test_a_manifest_names_each_output_once_and_says_why_an_entry_is_not_read(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.jpg").touch()
    (tmp_path / "list.txt").write_text(
        f"{tmp_path}/data/x.jpg\n  # an indented comment\nhttps://example.com/y.jpg\ns3:/{tmp_path}/data/x.jpg\n"
    )

    items = sources.discover(str(tmp_path / "list.txt"), storage.S3Settings(endpoint="http://127.0.0.1:9"))

    assert [i.uri for i in items] == [f"{tmp_path}/data/x.jpg", "https://example.com/y.jpg", f"s3:/{tmp_path}/data/x.jpg"]
    assert items[0].error == ""
    assert items[1].error == "a https URL: only local paths and s3:// URIs are read"
    # The local file and the S3 object would both be written as images/<tmp>/data/x.png.
    assert items[2].relpath == items[0].relpath == f"{tmp_path.relative_to('/')}/data/x.png"
    assert f"is that of {tmp_path}/data/x.jpg, listed before it" in items[2].error


def test_a_manifest_resolves_parent_folders_and_lists_a_path_once(tmp_path: Path) -> None:
    (tmp_path / "lists").mkdir()
    (tmp_path / "img.png").touch()
    (tmp_path / "lists" / "list.txt").write_text("../img.png\n../img.png\n./../lists/../img.png\n")
    manifest = str(tmp_path / "lists" / "list.txt")
    assert sources.read_manifest(LOCAL, manifest, manifest) == [str(tmp_path / "img.png")]


def test_a_manifest_saved_with_a_byte_order_mark_reads_its_first_line(tmp_path: Path) -> None:
    """Windows Notepad starts UTF-8 with U+FEFF, which made the first line a path that never exists."""
    (tmp_path / "img.png").touch()
    (tmp_path / "list.txt").write_bytes("# my images\r\nimg.png\r\n".encode("utf-8-sig"))
    (tmp_path / "first.txt").write_bytes("img.png\n".encode("utf-8-sig"))
    for name in ("list.txt", "first.txt"):
        assert sources.read_manifest(LOCAL, str(tmp_path / name), name) == [str(tmp_path / "img.png")]


def test_a_parquet_manifest_that_is_not_parquet_is_one_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "list.parquet").write_bytes(b"PAR1 cut")
    with pytest.raises(storage.StorageError, match=r"^list.parquet: not a readable Parquet manifest \(.*Parquet"):
        sources.read_manifest(LOCAL, str(tmp_path / "list.parquet"), "list.parquet")


def test_a_parquet_manifest_is_read_for_its_paths_alone(tmp_path: Path) -> None:
    """A table of paths may hold the images' bytes too (gigabytes): only the path column is read.
    Here the image column's pages are garbage, which reading the whole table fails on."""
    manifest = tmp_path / "list.parquet"
    pq.write_table(pa.table({"path": ["a.png", "b.png"], "image": [os.urandom(4096), os.urandom(4096)]}), manifest)
    chunk = pq.ParquetFile(manifest).metadata.row_group(0).column(1)
    with open(manifest, "r+b") as f:
        f.seek(chunk.data_page_offset)
        f.write(b"\xff" * 64)
    with pytest.raises(OSError):
        pq.read_table(manifest)
    assert sources.read_manifest(LOCAL, str(manifest), "list.parquet") == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]


def test_a_manifest_lists_an_absolute_path_once_however_many_slashes_lead_it(tmp_path: Path) -> None:
    (tmp_path / "img.png").touch()
    (tmp_path / "list.txt").write_text(f"{tmp_path}/img.png\n/{tmp_path}/img.png\n")
    manifest = str(tmp_path / "list.txt")
    assert sources.read_manifest(LOCAL, manifest, manifest) == [str(tmp_path / "img.png")]


def test_pipes_devices_and_listed_folders_fail_alone_without_being_opened(tmp_path: Path) -> None:
    """Opening a named pipe blocks until someone writes to it: a run would hang there."""
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    (folder / "fine.png").write_bytes(_good_png(0))
    os.mkfifo(folder / "pipe.png")
    os.symlink(folder / "pipe.png", folder / "link-to-pipe.jpg")
    os.symlink("/dev/null", folder / "null.png")
    (folder / "sub" / "x.png").write_bytes(_good_png(1))

    items = {i.relpath: i.error for i in sources.discover(str(folder), storage.S3Settings())}
    assert items == {"fine.png": "", "sub/x.png": "", "pipe.png": items["pipe.png"], "link-to-pipe.png": items["link-to-pipe.png"],
                     "null.png": items["null.png"]}
    assert "named pipe (FIFO)" in items["pipe.png"] and "named pipe (FIFO)" in items["link-to-pipe.png"]
    assert "device or socket" in items["null.png"]

    (tmp_path / "list.txt").write_text(f"{folder}/fine.png\n{folder}/sub\n{folder}/pipe.png\n")
    listed = [(i.relpath, i.error) for i in sources.discover(str(tmp_path / "list.txt"), storage.S3Settings())]
    assert [r for r, _ in listed] == [f"{folder}/{name}.png"[1:] for name in ("fine", "sub", "pipe")]
    assert listed[0][1] == "" and listed[1][1].startswith("a folder, not a file") and "FIFO" in listed[2][1]


def test_an_output_inside_the_input_is_not_read_when_either_is_reached_through_a_link(tmp_path: Path) -> None:
    (tmp_path / "in" / "out" / "images").mkdir(parents=True)
    (tmp_path / "in" / "a.png").write_bytes(_good_png(0))
    (tmp_path / "in" / "out" / "images" / "a.png").write_bytes(_good_png(1))  # an earlier run's output
    os.symlink(tmp_path / "in", tmp_path / "link-to-in")

    for given_input, given_output in (("link-to-in", "in/out"), ("in", "link-to-in/out"), ("link-to-in", "link-to-in/out")):
        items = sources.discover(str(tmp_path / given_input), storage.S3Settings(), exclude=str(tmp_path / given_output))
        assert [i.relpath for i in items] == ["a.png"], (given_input, given_output)


def test_an_output_that_holds_the_input_leaves_out_only_the_runs_own_outputs(tmp_path: Path) -> None:
    """--input data/grey --output data was refused: every input lay under the output folder."""
    (tmp_path / "grey").mkdir()
    (tmp_path / "grey" / "a.png").write_bytes(_good_png(0))
    into_parent = sources.discover(str(tmp_path / "grey"), storage.S3Settings(), exclude=str(tmp_path))
    assert [i.relpath for i in into_parent] == ["a.png"]

    (tmp_path / storage.LOCK_FILE).touch()  # a run refused after taking the lock: nothing else of it is there
    into_itself = sources.discover(str(tmp_path), storage.S3Settings(), exclude=str(tmp_path))
    assert [i.relpath for i in into_itself] == ["grey/a.png"]

    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "mine.png").write_bytes(_good_png(1))  # the user's own, where the run would write
    with pytest.raises(storage.StorageError, match="images/mine.png: an input in a folder that this run writes into"):
        sources.discover(str(tmp_path), storage.S3Settings(), exclude=str(tmp_path))
    (tmp_path / "images" / "mine.png").unlink()

    for written in ("_CONFIG.json", "images/grey/a.png", "parquet/part-0.parquet", "failed/failed.parquet", "_SUMMARY.json", ".tmp-0a1b",
                    storage.LOCK_FILE):  # the lock too: a second run listed it as a failed input
        (tmp_path / written).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / written).write_bytes(b"an earlier run's")
    (tmp_path / "images.png").write_bytes(_good_png(1))  # beside the outputs, not in them
    into_itself = sources.discover(str(tmp_path), storage.S3Settings(), exclude=str(tmp_path) + "/")
    assert [i.relpath for i in into_itself] == ["grey/a.png", "images.png"]


def test_an_earlier_output_inside_the_input_is_left_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--input data --output data/run2 after --output data/run1 read run1's PNGs as inputs."""
    (tmp_path / "a.png").write_bytes(_good_png(0))
    run1 = tmp_path / "run1"
    for written in ("images/a.png", "parquet/part-0.parquet", "failed/failed.parquet", "_SUMMARY.json", storage.LOCK_FILE):
        (run1 / written).parent.mkdir(parents=True, exist_ok=True)
        (run1 / written).write_bytes(b"an earlier run's")
    (run1 / "notes.png").write_bytes(_good_png(1))  # the user's own, beside the outputs
    (run1 / "images-old").mkdir()
    (run1 / "images-old" / "c.png").write_bytes(_good_png(3))
    (run1 / "_CONFIG.json").write_text(json.dumps({"input_uri": str(tmp_path), "weights_id": "w", "formats": ["png"]}))
    (tmp_path / "other" / "images").mkdir(parents=True)  # another tool's _CONFIG.json: not an output
    (tmp_path / "other" / "_CONFIG.json").write_text("{}")
    (tmp_path / "other" / "images" / "b.png").write_bytes(_good_png(2))

    items = sources.discover(str(tmp_path), storage.S3Settings(), exclude=str(tmp_path / "run2"))
    assert [i.relpath for i in items] == ["a.png", "other/_CONFIG.png", "other/images/b.png", "run1/images-old/c.png",
                                          "run1/notes.png"]
    assert f"left out 6 file(s) in 1 earlier colorize output(s) inside it: {run1}; to colourise one's images again, pass its images/ folder" in capsys.readouterr().err
    assert [i.relpath for i in sources.discover(str(run1 / "images"), storage.S3Settings())] == ["a.png"]


def _good_png(seed: int) -> bytes:
    return encode(Image.fromarray(scene(np.random.default_rng(seed), 8)))


def test_an_input_larger_than_any_image_of_max_pixels_fails_unread(tmp_path: Path) -> None:
    """A 20 GB file named .jpg, or a zip bomb's member, would fill a worker's memory."""
    limit = images.max_encoded_bytes(64)  # 16 MiB and 512 bytes
    folder = tmp_path / "in"
    folder.mkdir()
    with open(folder / "huge.jpg", "wb") as f:
        f.truncate(limit + 1)  # sparse: no disk and, read with the limit, no more memory than it
    (folder / "fine.png").write_bytes(_good_png(0))  # 8x8: 64 pixels
    with zipfile.ZipFile(folder / "bomb.zip", "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("inner.png", bytes(limit + 1))  # 16 KB on disk
        archive.writestr("ok.png", _good_png(1))
    with tarfile.open(folder / "big.tar", "w") as tar:
        info = tarfile.TarInfo("inner.png")
        info.size = limit + 1
        tar.addfile(info, io.BytesIO(bytes(limit + 1)))
        info = tarfile.TarInfo("ok.png")
        info.size = len(_good_png(2))
        tar.addfile(info, io.BytesIO(_good_png(2)))
    items = sources.discover(str(folder), storage.S3Settings())
    batch = _batch(items)
    rows = pipeline.read_and_decode(batch, settings=storage.S3Settings(), size=8, max_pixels=64, chunk=16)
    outcome = {str(r): (str(s), str(e)) for out in rows for r, s, e in zip(out["relpath"], out["status"], out["error"])}
    assert {r: s for r, (s, _) in outcome.items()} == {
        "huge.png": "failed", "fine.png": "ok", "bomb.zip/inner.png": "failed", "bomb.zip/ok.png": "ok",
        "big.tar/inner.png": "failed", "big.tar/ok.png": "ok"}
    for relpath in ("huge.png", "bomb.zip/inner.png", "big.tar/inner.png"):
        assert f"over {limit:,} bytes, more than an image of --max-pixels can be" in outcome[relpath][1]


def test_a_zip_member_that_cannot_be_read_fails_alone(tmp_path: Path) -> None:
    path = tmp_path / "pack.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for i in range(3):
            archive.writestr(f"m{i}.png", _good_png(i))
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        middle = archive.getinfo("m1.png")
        data_at = middle.header_offset + 30 + len(middle.filename)  # local header, then the stored bytes
    raw[data_at + 20] ^= 0xFF  # corrupt the stored bytes: a CRC mismatch on read
    path.write_bytes(bytes(raw))

    members = list(sources.archive_members(LOCAL, str(path), "pack.zip"))

    assert [(m.relpath, m.data is not None) for m in members] == [
        ("pack.zip/m0.png", True), ("pack.zip/m1.png", False), ("pack.zip/m2.png", True)]
    assert "CRC" in members[1].error


def test_a_tar_that_breaks_off_yields_the_members_before_the_break(tmp_path: Path) -> None:
    whole = io.BytesIO()
    with tarfile.open(fileobj=whole, mode="w") as tar:
        for i in range(3):
            payload = _good_png(i) + bytes(20_000)  # padded, so that the cut falls inside the last
            info = tarfile.TarInfo(f"m{i}.png")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    path = tmp_path / "cut.tar"
    path.write_bytes(whole.getvalue()[: 2 * 20_600 + 5_000])

    members = sources.archive_members(LOCAL, str(path), "cut.tar")
    assert [next(members).name, next(members).name] == ["m0.png", "m1.png"]
    with pytest.raises((OSError, EOFError, tarfile.TarError)):
        next(members)


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz"])
def test_a_tar_cut_off_between_members_or_inside_a_header_never_ends_quietly(tmp_path: Path, suffix: str) -> None:
    """tarfile takes a tar that stops at a member's end, inside the next header, or at a corrupt
    header for a whole one: the members after it were lost without a word, and the run exited 0."""
    blob = _tar_of([(f"m{i}.png", _good_png(i)) for i in range(10)])
    sixth = tarfile.open(fileobj=io.BytesIO(blob)).getmembers()[6].offset
    corrupt = bytearray(blob)
    corrupt[sixth + 148] ^= 1  # the seventh header's checksum: tarfile ends there quietly, where GNU tar skips it and fails
    for data in (blob[:sixth], blob[: sixth + 100], bytes(corrupt)):
        (tmp_path / f"cut{suffix}").write_bytes(gzip.compress(data) if suffix == ".tar.gz" else data)
        read = []
        with pytest.raises(tarfile.ReadError, match="ends without its end-of-archive blocks: cut off, or a header is corrupt"):
            for member in sources.archive_members(LOCAL, str(tmp_path / f"cut{suffix}"), f"cut{suffix}"):
                read.append(member.name)
        assert read == [f"m{i}.png" for i in range(6)]
    (tmp_path / f"whole{suffix}").write_bytes(gzip.compress(blob) if suffix == ".tar.gz" else blob)
    assert len(list(sources.archive_members(LOCAL, str(tmp_path / f"whole{suffix}"), f"whole{suffix}"))) == 10


def test_archive_members_count_by_image_extension_in_any_case(tmp_path: Path) -> None:
    path, payload = tmp_path / "shard.tar", _good_png(0)
    with tarfile.open(path, "w") as tar:
        for name in ("a.jpg", "b.JFIF", "c.jpe", "d.avif", "e.png.json", "f.cls", "g.txt"):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))

    assert [m.name for m in sources.archive_members(LOCAL, str(path), "shard.tar")] == ["a.jpg", "b.JFIF", "c.jpe", "d.avif"]


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_the_metadata_macos_packs_beside_each_file_is_not_an_input(tmp_path: Path, kind: str) -> None:
    """A Finder zip holds __MACOSX/._a.jpg for each a.jpg, and macOS's tar ._a.jpg: every one
    was listed as failed ("not an image"), and the run ended with exit status 3."""
    names = ["a.jpg", "__MACOSX/._a.jpg", "sub/b.png", "__MACOSX/sub/._b.png", "./._c.png", "sub/._d.tar"]
    path = tmp_path / f"photos.{kind}"
    if kind == "zip":
        with zipfile.ZipFile(path, "w") as archive:
            for name in names:
                archive.writestr(name, _good_png(0))
    else:
        path.write_bytes(_tar_of([(name, _good_png(0)) for name in names]))

    members = list(sources.archive_members(LOCAL, str(path), path.name))
    assert [(m.name, m.error) for m in members] == [("a.jpg", ""), ("sub/b.png", "")]


def test_links_inside_a_tar_fail_alone_and_dot_slash_names_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "links.tar"
    payload = _good_png(0)
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("./a.png")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
        for kind, name in ((tarfile.LNKTYPE, "./hard.png"), (tarfile.SYMTYPE, "./soft.png")):
            link = tarfile.TarInfo(name)
            link.type, link.linkname = kind, "./a.png"
            tar.addfile(link)

    members = list(sources.archive_members(LOCAL, str(path), "links.tar"))

    assert [storage.safe_relpath(m.relpath) for m in members] == ["links.tar/a.png", "links.tar/hard.png", "links.tar/soft.png"]
    assert members[0].data == payload
    assert all(m.data is None and "not followed" in m.error for m in members[1:])


@pytest.mark.parametrize(
    "payload",
    [b"P6\n4x 3\n255\n" + bytes(36), b"P6\n4 3\n", b"\x89PNG\r\n\x1a\n\x00\x00\x00\x05IHDR\x00\x00"],
    ids=["ppm-bad-header", "ppm-cut-header", "png-cut-ihdr"],
)
def test_malformed_headers_are_image_errors(payload: bytes) -> None:
    with pytest.raises(images.ImageError, match="corrupt or truncated"):
        images.decode(payload, max_pixels=10_000)


@pytest.mark.parametrize("mode", ["L", "RGB", "I;16", "1"])
def test_one_transparent_value_becomes_alpha(mode: str) -> None:
    img = Image.new(mode, (4, 3))
    img.putpixel((1, 1), {"L": 200, "RGB": (200, 100, 50), "I;16": 40_000, "1": 1}[mode])
    decoded = images.decode(encode(img, transparency=(0, 0, 0) if mode == "RGB" else 0), max_pixels=100)
    expected = np.zeros((3, 4), dtype=np.uint8)
    expected[1, 1] = 255
    np.testing.assert_array_equal(decoded.alpha, expected)


def _grey_png(bits: int, width: int, row: bytes, transparent: int) -> bytes:
    """A one-row grey PNG of ``bits`` per pixel (Pillow writes no 2- or 4-bit grey) with a tRNS value."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, 1, bits, 0, 0, 0, 0))
            + chunk(b"tRNS", struct.pack(">H", transparent)) + chunk(b"IDAT", zlib.compress(b"\0" + row)) + chunk(b"IEND", b""))


@pytest.mark.parametrize(("bits", "width", "row"), [(2, 4, bytes([0b00_01_10_11])), (4, 2, bytes([0x0F]))], ids=["2-bit", "4-bit"])
def test_a_2_or_4_bit_grey_png_keeps_its_transparent_value(bits: int, width: int, row: bytes) -> None:
    # Pillow scales the pixels to 8 bits but not the tRNS value: the brightest pixel is the transparent one.
    decoded = images.decode(_grey_png(bits, width, row, transparent=2**bits - 1), max_pixels=100)
    np.testing.assert_array_equal(decoded.alpha, [[255] * (width - 1) + [0]])
    assert decoded.L[0, 0] == 0 and decoded.L[0, -1] == pytest.approx(100)


def test_a_grey_tiff_with_premultiplied_alpha_is_read() -> None:
    img = Image.new("LA", (2, 1))
    img.putpixel((0, 0), (200, 255))
    img.putpixel((1, 0), (100, 128))
    buffer = io.BytesIO()
    img.save(buffer, "TIFF")
    # ExtraSamples (tag 338, one SHORT) from 2, unassociated alpha, to 1, associated: Pillow opens it as "La".
    data = bytearray(buffer.getvalue())
    at = data.find(struct.pack("<HHIH", 338, 3, 1, 2))
    data[at + 8] = 1
    assert Image.open(io.BytesIO(bytes(data))).mode == "La"
    decoded = images.decode(bytes(data), max_pixels=100)
    np.testing.assert_array_equal(decoded.alpha, [[255, 128]])
    # Un-premultiplied: 100 at alpha 128/255 is a grey of 199.
    np.testing.assert_allclose(decoded.L, images.lightness(np.array([[200, 199]], dtype=np.uint8)), atol=0.5)
    assert imagesets.square(Image.open(io.BytesIO(bytes(data))), 2).mode == "RGB"


@pytest.mark.parametrize("payload", [b"", b"PK\x05\x06"], ids=["empty", "under-22-bytes"])
def test_a_zip_too_small_to_be_one_says_so(tmp_path: Path, payload: bytes) -> None:
    (tmp_path / "tiny.zip").write_bytes(payload)
    with pytest.raises(zipfile.BadZipFile, match=r"not a zip file \(tiny.zip\)"):
        list(sources.archive_members(LOCAL, str(tmp_path / "tiny.zip"), "tiny.zip"))


def _write_three_pngs_once(tmp_path: Path) -> dict[str, np.ndarray]:
    """Runs 0.png, 1.png and 2.png through the bulk job's three stages in-process, into out/."""
    folder = tmp_path / "in"
    folder.mkdir(exist_ok=True)
    for i in range(3):
        (folder / f"{i}.png").write_bytes(_good_png(i))
    items = sources.discover(str(folder), storage.S3Settings())
    batch = _batch(items)
    model = build_model(ModelConfig(width=4, depth=2, image_size=16)).eval()
    (decoded,) = pipeline.read_and_decode(batch, settings=storage.S3Settings(), size=16, max_pixels=10**6, chunk=8)
    return pipeline.compose_and_write(pipeline.predict(model, decoded, torch.device("cpu")), output=str(tmp_path / "out"),
                                      settings=storage.S3Settings(), formats=("png", "parquet"), png_level=1,
                                      weights_id="test")


def test_a_batch_written_twice_leaves_one_parquet_part_with_one_row_per_source(tmp_path: Path) -> None:
    """What a retried task does after a killed worker: the same outputs again, not more of them."""
    for _ in range(2):
        rows = _write_three_pngs_once(tmp_path)
        assert list(rows["status"]) == ["written"] * 3

    (part,) = (tmp_path / "out" / "parquet").iterdir()
    assert sorted(pq.read_table(part).column("relpath").to_pylist()) == ["0.png", "1.png", "2.png"]
    assert sorted(p.name for p in (tmp_path / "out" / "images").iterdir()) == ["0.png", "1.png", "2.png"]
    # The PNGs are stored as they are (no dictionary, statistics or snappy: 10x a part's bytes to write).
    png = pq.ParquetFile(part).metadata.row_group(0).column(pipeline.OUTPUT_SCHEMA.names.index("png"))
    assert png.compression == "UNCOMPRESSED" and png.statistics is None and not png.has_dictionary_page
    assert all(p.read_bytes() == stored for p, stored in zip(sorted((tmp_path / "out" / "images").iterdir()),
                                                             pq.read_table(part).sort_by("relpath").column("png").to_pylist()))


def test_an_output_that_cannot_be_written_fails_alone_with_the_reason(tmp_path: Path) -> None:
    (tmp_path / "out" / "images" / "1.png").mkdir(parents=True)  # a folder where 1.png's output goes
    rows = _write_three_pngs_once(tmp_path)

    assert list(rows["status"]) == ["written", "failed", "written"]
    assert rows["error"][1].startswith("cannot write output: ") and "1.png" in rows["error"][1]
    (part,) = (tmp_path / "out" / "parquet").iterdir()
    assert sorted(pq.read_table(part).column("relpath").to_pylist()) == ["0.png", "2.png"]


def test_a_parquet_part_that_cannot_be_written_fails_its_inputs_with_the_reason(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "parquet").write_text("a file where the parts' folder goes")
    rows = _write_three_pngs_once(tmp_path)

    assert list(rows["status"]) == ["failed"] * 3
    assert all(e.startswith("cannot write its Parquet part: ") for e in rows["error"])
    # Their PNGs were written first; a re-run redoes them, as they have no Parquet row.
    assert sorted(p.name for p in (tmp_path / "out" / "images").iterdir()) == ["0.png", "1.png", "2.png"]


class _CountingReads(pafs.FSSpecHandler):
    """Local files, counting the reads that reach them: on S3 each is a GET."""

    def __init__(self) -> None:
        import fsspec.implementations.local

        super().__init__(fsspec.implementations.local.LocalFileSystem())
        self.reads = 0

    def open_input_stream(self, path: str) -> pa.NativeFile:
        return pa.PythonFile(_Counted(open(path, "rb"), self), mode="r")

    def open_input_file(self, path: str) -> pa.NativeFile:
        return pa.PythonFile(_Counted(open(path, "rb"), self), mode="r")


class _Counted:
    def __init__(self, f: io.BufferedReader, counter: _CountingReads) -> None:
        self._f, self._counter = f, counter

    def read(self, n: int = -1) -> bytes:
        self._counter.reads += 1
        return self._f.read(n)

    def __getattr__(self, name: str):  # noqa: ANN204 - seek, tell, close... as the file has them
        return getattr(self._f, name)


@pytest.mark.parametrize("name", ["shard.tar", "shard.tar.gz", "shard.zip"])
def test_archives_are_read_in_large_requests_not_one_per_member(tmp_path: Path, name: str) -> None:
    """On S3 every read is a GET: a 3 MiB tar took 602 of them (11 s), a zip of 500 images 1,503 (18 s)."""
    rng = np.random.default_rng(0)  # incompressible members: the .tar.gz is as large as the .tar
    payloads = {f"img/{i:03d}.png": rng.bytes(4000) for i in range(200)}
    path = tmp_path / name
    if name.endswith(".zip"):
        with zipfile.ZipFile(path, "w") as archive:
            for member, data in payloads.items():
                archive.writestr(member, data)
    else:
        with tarfile.open(path, "w:gz" if name.endswith(".gz") else "w") as tar:
            for member, data in payloads.items():
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    counter = _CountingReads()

    members = list(sources.archive_members(pafs.PyFileSystem(counter), str(path), name))

    assert {m.name: m.data for m in members} == payloads
    assert counter.reads <= 12  # a few per pass over the archive


def test_a_chunk_of_large_images_stops_at_its_pixel_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """64 photos of 12 MP in one chunk took 5.6 GB of a task's memory; thumbnails still fill a chunk."""
    monkeypatch.setattr(pipeline, "CHUNK_PIXELS", 3 * 64 * 64)
    for i in range(5):
        Image.fromarray(scene(np.random.default_rng(i), 64)).save(tmp_path / f"large{i}.png")
        Image.fromarray(scene(np.random.default_rng(i), 8)).save(tmp_path / f"small{i}.png")
    items = [sources.Item("file", str(tmp_path / f"{name}.png"), f"{name}.png", "")
             for name in ("large0", "large1", "large2", "large3", "large4", "small0", "small1", "small2", "small3", "small4")]
    batch = _batch(items)

    chunks = pipeline.read_and_decode(batch, settings=storage.S3Settings(), size=8, max_pixels=10**6, chunk=8)

    assert [len(c["relpath"]) for c in chunks] == [3, 7]
    # A photo that would take a chunk past its budget starts the next one: no chunk holds more.
    monkeypatch.setattr(pipeline, "CHUNK_PIXELS", 5 * 64 * 64 // 2)
    chunks = pipeline.read_and_decode(batch, settings=storage.S3Settings(), size=8, max_pixels=10**6, chunk=8)
    assert [len(c["relpath"]) for c in chunks] == [2, 2, 6]
    monkeypatch.setattr(pipeline, "CHUNK_PIXELS", 64 * 64 - 1)  # every large photo is over it alone
    chunks = pipeline.read_and_decode(batch, settings=storage.S3Settings(), size=8, max_pixels=10**6, chunk=8)
    assert [len(c["relpath"]) for c in chunks] == [1, 1, 1, 1, 1, 5]


def test_each_task_gets_only_its_own_inputs_part_of_what_is_done() -> None:
    items = [sources.Item("archive", "/in/a.tar", "a.tar", ""), sources.Item("archive", "/in/sub/b.zip", "sub/b.zip", ""),
             sources.Item("file", "/in/c.png", "c.png", ""), sources.Item("file", "/in/d.png", "d.png", "")]
    done = pipeline.Done(("png", "parquet"),
                         pngs=frozenset({"a.tar/x.png", "a.tar/y.png", "sub/b.zip/y/z.png", "a.tar.gz/x.png", "sub/x.png"}),
                         rows=frozenset({"a.tar/x.png", "a.tar/w.png", "sub/b.zip/y/z.png", "c.png"}))

    rows = {r["relpath"]: (r["written"], r["in_parquet"]) for r in pipeline.task_rows(items, done)}

    assert rows == {
        "a.tar": (["a.tar/x.png"], ["a.tar/w.png", "a.tar/x.png"]),  # y has no row and w no PNG: both redone
        "sub/b.zip": (["sub/b.zip/y/z.png"], ["sub/b.zip/y/z.png"]),
        "c.png": ([], ["c.png"]),  # redone for its PNG; its row is kept, not written twice
        "d.png": ([], []),
    }


def test_members_already_written_are_skipped_unread(tmp_path: Path) -> None:
    """Resuming a zip does not read what is done: a member that would fail its CRC is skipped."""
    path = tmp_path / "pack.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("done.png", _good_png(0))
        archive.writestr("todo.png", _good_png(1))
    raw = bytearray(path.read_bytes())
    at = raw.index(_good_png(0))
    raw[at + 40] ^= 0xFF  # done.png's bytes no longer match its CRC
    path.write_bytes(bytes(raw))
    written = {"pack.zip/done.png"}.__contains__

    done, todo = sources.archive_members(LOCAL, str(path), "pack.zip", skip=written)
    assert (done.skipped, done.data, done.error) == (True, None, "")
    assert not todo.skipped and todo.data == _good_png(1)
    assert "CRC" in next(iter(sources.archive_members(LOCAL, str(path), "pack.zip"))).error

    tar = tmp_path / "pack.tar"
    with tarfile.open(tar, "w") as archive:
        for name, payload in (("done.png", _good_png(0)), ("todo.png", _good_png(1))):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    members = list(sources.archive_members(LOCAL, str(tar), "pack.tar", skip={"pack.tar/done.png"}.__contains__))
    assert [(m.name, m.skipped, m.data is None) for m in members] == [("done.png", True, True), ("todo.png", False, False)]

def test_an_overwrite_clears_earlier_outputs_that_stand_where_this_runs_go(tmp_path: Path) -> None:
    """A PNG where a folder is now needed, a folder where a PNG is: both stale, as names never nest
    within one run. They were removed only after the run had failed those inputs ("File exists",
    and "Is a directory" on every later run, --overwrite included)."""
    images = tmp_path / "out" / sources.IMAGES_FOLDER
    (images / "d" / "x.png").mkdir(parents=True)
    (images / "d" / "x.png" / "q.png").write_bytes(_good_png(0))  # from an input folder d/x.png/, now d/x.jpg
    (images / "d" / "p.png").write_bytes(_good_png(1))  # from d/p.jpg, before d/p.png/q.jpg appeared
    (images / "keep.png").write_bytes(_good_png(2))
    (images / "pack.tar" / "a.png").mkdir(parents=True)  # an archive's member a.png/q.jpg, now a.jpg
    (images / "pack.tar" / "a.png" / "q.png").write_bytes(_good_png(3))
    for relpath in ("d/x.png", "d/p.png/q.png", "d/p.jpg.png", "keep.png", "pack.tar/a.png", "new/deep/n.png"):
        pipeline._clear_the_way(LOCAL, str(tmp_path / "out"), relpath)
    assert sorted(str(p.relative_to(images)) for p in images.rglob("*")) == ["d", "keep.png", "pack.tar"]
    # After the run, the PNGs it did not write go, and so do the folders that held only them.
    (images / "d" / "old" / "deeper").mkdir(parents=True)
    (images / "d" / "old" / "deeper" / "o.png").write_bytes(_good_png(4))
    pipeline._remove_other_pngs(LOCAL, str(tmp_path / "out"), {"keep.png"})
    assert sorted(str(p.relative_to(images)) for p in images.rglob("*")) == ["keep.png", "pack.tar"]  # held no PNG


def test_an_archive_of_a_kind_that_is_not_read_is_named_as_one(tmp_path: Path) -> None:
    """It failed as "not an image (unrecognised format)"."""
    for name in ("photos.tar.xz", "more.TAR.BZ2", "old.7z"):
        (tmp_path / name).write_bytes(b"\xfd7zXZ\x00 some compressed bytes")
    (tmp_path / "fine.png").write_bytes(_good_png(0))
    reasons = {item.uri.rsplit("/", 1)[1]: item.error for item in sources.discover(str(tmp_path), storage.S3Settings())}
    assert reasons.pop("fine.png") == ""
    assert set(reasons.values()) == {
        "an archive of a kind that is not read: extract it, or repack it as .tar, .tar.gz, .tgz or .zip"}
    assert len(reasons) == 3


def test_a_relative_input_s_failure_does_not_repeat_its_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Storage errors name the absolute path: 'huge.png' failed with '/abs/huge.png: over ... bytes'."""
    monkeypatch.chdir(tmp_path)
    limit = images.max_encoded_bytes(64)
    with open("huge.png", "wb") as f:
        f.truncate(limit + 1)  # sparse
    items = sources.discover("huge.png", storage.S3Settings())
    (rows,) = pipeline.read_and_decode(_batch(items), settings=storage.S3Settings(), size=8, max_pixels=64, chunk=8)
    assert str(rows["status"][0]) == "failed"
    assert str(rows["error"][0]).startswith(f"over {limit:,} bytes, more than an image of --max-pixels can be")


def test_earlier_pngs_from_no_input_found_now_are_those_outside_every_input_and_archive() -> None:
    found = [sources.Item("file", "in/a.jpg", "a.png", ""), sources.Item("archive", "in/pack.tar", "pack.tar", ""),
             sources.Item("archive", "in/sub/more.zip", "sub/more.zip", "")]
    pngs = frozenset({"a.png", "pack.tar/x.png", "pack.tar/deep/y.png", "sub/more.zip/z.png", "old.png", "sub/gone.png",
                      "pack.tar.png"})
    assert pipeline._orphans(pngs, found) == ["old.png", "pack.tar.png", "sub/gone.png"]
