"""colorize.storage against the local filesystem and a real S3 server (no mocks)."""

from __future__ import annotations

import errno
import gzip
import http.server
import os
import pickle
import re
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import ray

from colorize import storage
from colorize.storage import S3Settings, StorageError
from tests.conftest import S3Server, free_ports
from tests.helpers import output_held_elsewhere
from tests.s3server import S3_READ_ONLY_KEY, S3_SECRET_KEY

NESTED = {
    "top.txt": b"top",
    "a/x.bin": bytes(range(256)),
    "a/b c/ü.png": b"\x89PNG not really",
    "a/b c/d/deep name é.jpg": b"deep",
    "a/shard.tar.gz": gzip.compress(b"members"),  # stored as given: pyarrow's default would gzip it again on S3
}


@pytest.fixture(scope="module")
def bucket(s3: S3Server) -> str:
    return s3.bucket("storage-tests")


@pytest.fixture(params=["local", "s3"])
def root(request: pytest.FixtureRequest, tmp_path) -> tuple[pafs.FileSystem, str]:
    """(filesystem, empty directory) on each backend."""
    if request.param == "local":
        return storage.resolve(str(tmp_path / "root"))
    s3 = request.getfixturevalue("s3")
    bucket = request.getfixturevalue("bucket")
    return storage.resolve(f"{bucket}/{request.node.originalname}", s3.settings)


def test_resolve_local(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    fs, path = storage.resolve("rel/dir/")
    assert isinstance(fs, pafs.LocalFileSystem)
    assert path == str(tmp_path / "rel" / "dir")
    assert storage.resolve("~/x")[1] == str(tmp_path / "home" / "x")
    assert storage.resolve("/abs//y")[1] == "/abs/y"


def test_resolve_s3_shares_one_filesystem(s3: S3Server) -> None:
    fs, path = storage.resolve("s3://bkt/a//b/", s3.settings)
    assert isinstance(fs, pafs.S3FileSystem)
    assert path == "bkt/a/b"
    assert storage.resolve("S3://bkt", s3.settings) == (fs, "bkt")
    assert storage.resolve("s3://other/k", s3.settings)[0] is fs
    assert storage.s3_filesystem(S3Settings(s3.endpoint, s3.settings.region)) is fs
    assert storage.to_uri(fs, path) == "s3://bkt/a/b"


@pytest.mark.parametrize("uri", ["gs://bucket/key", "s3://", "s3:///key"])
def test_resolve_rejects(uri: str) -> None:
    with pytest.raises(StorageError, match=uri):
        storage.resolve(uri, S3Settings())


def test_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    assert S3Settings.from_env() == S3Settings(None, None)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://global:1")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    assert S3Settings.from_env() == S3Settings("http://global:1", "eu-west-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3only:2")
    monkeypatch.setenv("AWS_REGION", "us-west-2")
    assert S3Settings.from_env() == S3Settings("http://s3only:2", "us-west-2")
    assert S3Settings.from_env("https://flag:3").endpoint == "https://flag:3"


@pytest.mark.parametrize("endpoint", ["127.0.0.1:8333", "ftp://host:1", "http://host:1/path"])
def test_settings_reject_bad_endpoint(endpoint: str) -> None:
    with pytest.raises(StorageError, match=endpoint):
        S3Settings(endpoint=endpoint)


def test_an_endpoint_with_credentials_is_refused_without_echoing_them() -> None:
    with pytest.raises(StorageError, match="takes no user or password") as refused:
        S3Settings(endpoint="http://AKIAEXAMPLE:wJalrSECRET@minio.local:9000/x")
    assert "AKIAEXAMPLE" not in str(refused.value) and "wJalrSECRET" not in str(refused.value)


@pytest.mark.parametrize("uri", ["s3:/bucket/key", "s3:bucket/key", "S3:/b"])
def test_a_mistyped_s3_uri_is_refused_not_taken_as_a_local_path(uri: str) -> None:
    with pytest.raises(StorageError, match="expected s3://bucket/key"):
        storage.resolve(uri, S3Settings())


def test_join() -> None:
    assert storage.join("bkt", "a", "b.png") == "bkt/a/b.png"
    assert storage.join("bkt/", "/a/", "b") == "bkt/a/b"
    assert storage.join("/", "x") == "/x"
    assert storage.join("/base", "") == "/base"
    assert storage.join("", "rel") == "rel"


def test_round_trip(root: tuple[pafs.FileSystem, str]) -> None:
    fs, base = root
    assert not storage.exists(fs, base)
    for rel, data in NESTED.items():
        storage.write_bytes_atomic(fs, storage.join(base, rel), data)
    expected = sorted(storage.join(base, rel) for rel in NESTED)
    assert storage.list_files(fs, base) == expected
    assert storage.list_files(fs, storage.join(base, "a/b c")) == [
        p for p in expected if "/a/b c/" in p
    ]
    single = storage.join(base, "a/b c/ü.png")
    assert storage.list_files(fs, single) == [single]
    for rel, data in NESTED.items():
        assert storage.read_bytes(fs, storage.join(base, rel)) == data
    assert storage.exists(fs, storage.join(base, "a"))
    assert not storage.exists(fs, storage.join(base, "nope"))


def test_a_local_write_cut_short_leaves_the_old_content_whole(tmp_path: Path) -> None:
    """A disk that fills up mid-write (here a file-size limit: EFBIG) must not leave half a file."""
    path = tmp_path / "out.png"
    path.write_bytes(b"old" * 10)
    code = ("import resource, signal, sys, pyarrow.fs as fs; from colorize import storage; "
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000)); "
            "storage.write_bytes_atomic(fs.LocalFileSystem(), sys.argv[1], b'n' * 5000)")
    cut = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                         cwd=Path(__file__).parents[1])
    assert cut.returncode == 1 and "File too large" in cut.stderr, cut.stderr
    assert path.read_bytes() == b"old" * 10
    assert list(tmp_path.iterdir()) == [path]  # and no temporary left beside it


def test_an_s3_write_cut_short_leaves_no_incomplete_upload(s3: S3Server, bucket: str) -> None:
    """Every object began as a multipart upload: a process killed mid-write (a job killed, a
    worker lost) left an incomplete one, billed on AWS until aborted, that no rerun removed."""
    code = ("import os, sys; from colorize import storage; "
            "fs, path = storage.resolve(sys.argv[1], storage.S3Settings.from_env(sys.argv[2])); "
            "stream = fs.open_output_stream(path); stream.write(b'half a PNG'); os._exit(0)")
    subprocess.run([sys.executable, "-c", code, f"{bucket}/cut/x.png", s3.endpoint], check=True, cwd=Path(__file__).parents[1])
    assert s3.client().list_multipart_uploads(Bucket=bucket.removeprefix("s3://")).get("Uploads", []) == []
    fs, path = storage.resolve(f"{bucket}/cut/x.png", s3.settings)
    assert not storage.exists(fs, path)


def test_overwrite_leaves_no_temporaries(root: tuple[pafs.FileSystem, str]) -> None:
    fs, base = root
    path = storage.join(base, "same.bin")
    storage.write_bytes_atomic(fs, path, b"first")
    storage.write_bytes_atomic(fs, path, b"second")
    assert storage.read_bytes(fs, path) == b"second"
    assert storage.list_files(fs, base) == [path]


def test_missing_path_names_uri(root: tuple[pafs.FileSystem, str]) -> None:
    fs, base = root
    expected = re.escape(storage.to_uri(fs, storage.join(base, "missing")))
    with pytest.raises(StorageError, match=f"^{expected}: no such file or directory$"):
        storage.list_files(fs, storage.join(base, "missing"))
    with pytest.raises(StorageError, match=f"^{expected}: no such file or directory$"):
        storage.read_bytes(fs, storage.join(base, "missing"))


def test_an_s3_output_that_may_be_read_but_not_written_is_refused_before_the_work(s3: S3Server) -> None:
    """evaluate --out s3://... with read-only keys scored every image, then lost the report."""
    bucket = s3.bucket("read-only")
    read_only = pafs.S3FileSystem(access_key=S3_READ_ONLY_KEY, secret_key=S3_SECRET_KEY, region=s3.settings.region,
                                  endpoint_override=s3.endpoint, scheme="http")
    fs, path = storage.resolve(f"{bucket}/out", s3.settings)
    storage.check_output(fs, path, f"{bucket}/out", "--out", s3.settings)  # full access: fine, and leaves nothing behind,
    # not even the empty folder marker (out/) that Arrow's delete made: a run refused after the check wrote nothing
    assert s3.client().list_objects_v2(Bucket=bucket.removeprefix("s3://"), Prefix="out").get("Contents", []) == []
    with pytest.raises(StorageError, match=f"^{bucket}/out: access denied"):
        storage.check_output(read_only, path, f"{bucket}/out", "--out")


def test_write_to_missing_bucket(s3: S3Server) -> None:
    at = re.escape(f" at {s3.endpoint}")
    fs, path = storage.resolve("s3://no-such-bucket/x.png", s3.settings)
    with pytest.raises(StorageError, match=f"^s3://no-such-bucket/x.png: no such bucket{at}$"):
        storage.write_bytes_atomic(fs, path, b"x")
    # Said before any work starts, for outputs and inputs alike.
    fs, path = storage.resolve("s3://no-such-bucket/out", s3.settings)
    with pytest.raises(StorageError, match=f"^s3://no-such-bucket/out: no such bucket{at}$"):
        storage.check_output(fs, path, "s3://no-such-bucket/out", "--output")
    with pytest.raises(StorageError, match=f"^s3://no-such-bucket/out: no such bucket{at}$"):
        storage.list_files(fs, path)


def test_reading_a_key_of_a_missing_bucket_says_the_bucket_is_missing(s3: S3Server, bucket: str) -> None:
    """A manifest's entry in a mistyped bucket read "no such file or directory": a HEAD's 404 has no body."""
    fs, path = storage.resolve("s3://no-such-bucket/x.jpg", s3.settings)
    with pytest.raises(StorageError, match=f"^s3://no-such-bucket/x.jpg: no such bucket at {re.escape(s3.endpoint)}$") as excinfo:
        storage.read_bytes(fs, path, limit=100)
    assert storage.of_one_file(excinfo.value)  # a failed row of its own: other entries may be in other buckets
    fs, path = storage.resolve(f"{bucket}/missing.jpg", s3.settings)
    with pytest.raises(StorageError, match="/missing.jpg: no such file or directory$"):
        storage.read_bytes(fs, path)


def test_a_web_server_that_is_not_s3_is_named_where_its_404_reads_as_no_bucket(monkeypatch: pytest.MonkeyPatch) -> None:
    """SeaweedFS's filer port (or a console) answered "s3://out/x: no such bucket", naming no endpoint."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        fs, path = storage.resolve("s3://out/x", S3Settings(endpoint=endpoint))
        with pytest.raises(StorageError, match=f"^s3://out/x: no such bucket at {re.escape(endpoint)}$"):
            storage.check_output(fs, path, "s3://out/x", "--output")
    finally:
        server.shutdown()


def test_an_endpoint_spoken_to_in_the_wrong_scheme_keeps_ssl_in_capitals() -> None:
    """https:// against an http port: "sSL connect error"."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        fs, path = storage.resolve("s3://b/x", S3Settings(endpoint=f"https://127.0.0.1:{server.server_address[1]}"))
        with pytest.raises(StorageError) as excinfo:
            storage.stat(fs, path, "s3://b/x")
    finally:
        server.shutdown()
    assert ": SSL" in str(excinfo.value) and "sSL" not in str(excinfo.value), excinfo.value


def test_an_unreachable_endpoint_is_one_error_line() -> None:
    (port,) = free_ports(1)  # nothing listens there
    uri = "s3://bucket/x"
    fs, path = storage.resolve(uri, S3Settings(endpoint=f"http://127.0.0.1:{port}"))
    with pytest.raises(StorageError) as excinfo:
        storage.stat(fs, path, uri)
    message = str(excinfo.value)
    assert message.startswith(f"{uri}: cannot reach S3 endpoint http://127.0.0.1:{port}: ")
    assert "\n" not in message


@pytest.mark.parametrize(("text", "reason"), [
    ("AWS Error SERVICE_UNAVAILABLE during GetObject operation: ", "S3 error SERVICE_UNAVAILABLE: no message"),
    ("AWS Error UNKNOWN (HTTP status 503) during GetObject operation: Slow down\nmore", "S3 error UNKNOWN (HTTP 503): Slow down"),
])
def test_an_s3_error_with_a_status_or_without_a_message_is_one_line(text: str, reason: str) -> None:
    """A GET refused after its HEAD passed (a 503, a KMS denial) once crashed the message (IndexError)."""
    fs, _ = storage.resolve("s3://bucket/x", S3Settings(endpoint="http://127.0.0.1:9"))
    assert storage.reason(OSError(f"When reading information for key 'x' in bucket 'bucket': {text}"), fs) == reason


def test_an_output_folder_that_cannot_be_written_is_refused_before_the_work(tmp_path: Path) -> None:
    try:  # sysfs takes no new files, even from root; a machine where it did would prove nothing
        tempfile.TemporaryFile(dir="/sys").close()
        pytest.skip("/sys is writable here")
    except OSError:
        pass
    with pytest.raises(StorageError, match="^/sys/out/run: cannot write in /sys: "):
        storage.check_output(pafs.LocalFileSystem(), "/sys/out/run", "/sys/out/run", "--out")
    storage.check_output(pafs.LocalFileSystem(), str(tmp_path / "a" / "b"), str(tmp_path / "a" / "b"), "--out")


def test_a_new_output_named_as_a_file_is_refused_unless_written_as_a_folder(tmp_path: Path) -> None:
    local = pafs.LocalFileSystem()
    with pytest.raises(StorageError, match=r"colour\.png: a file's name; --output takes a folder .* such as colour\)$"):
        storage.check_output(local, str(tmp_path / "colour.png"), str(tmp_path / "colour.png"), "--output")
    storage.check_output(local, str(tmp_path / "colour.png"), f"{tmp_path / 'colour.png'}/", "--output")  # a slash: a folder
    storage.check_output(local, str(tmp_path / "rows.parquet"), str(tmp_path / "rows.parquet"), "--output")  # a dataset's name
    (tmp_path / "old.png").mkdir()  # a folder there already: what it is, whatever its name
    storage.check_output(local, str(tmp_path / "old.png"), str(tmp_path / "old.png"), "--output")


def test_an_endpoint_that_drops_every_connection_is_tried_a_bounded_number_of_times() -> None:
    """Fails fast by count, not by clock: the SDK's default would retry ten times with backoff."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[int] = []

    def reset_every_connection() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:  # closed at the end of the test
                return
            accepted.append(1)
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST, not FIN
            connection.close()

    threading.Thread(target=reset_every_connection, daemon=True).start()
    endpoint = f"http://127.0.0.1:{listener.getsockname()[1]}"
    fs, path = storage.resolve("s3://bucket/x", S3Settings(endpoint=endpoint))
    try:
        with pytest.raises(StorageError, match=f"^s3://bucket/x: cannot reach S3 endpoint {endpoint}: "):
            storage.stat(fs, path, "s3://bucket/x")
    finally:
        listener.close()
    assert 1 <= len(accepted) <= 3  # not the SDK's 10 tries with backoff


@pytest.fixture
def wrong_secret(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Credentials with a wrong secret, and no cached filesystem built with the right one."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    storage.s3_filesystem.cache_clear()
    yield
    storage.s3_filesystem.cache_clear()


@pytest.mark.usefixtures("wrong_secret")
def test_bad_credentials(s3: S3Server, bucket: str) -> None:
    uri = f"{bucket}/x"
    fs, path = storage.resolve(uri, s3.settings)
    for attempt in (
        lambda: storage.stat(fs, path, uri),
        lambda: storage.list_files(fs, bucket[5:]),
    ):
        with pytest.raises(StorageError, match="access denied.*AWS_SECRET_ACCESS_KEY") as excinfo:
            attempt()
        assert str(excinfo.value).startswith(bucket)


@pytest.mark.parametrize(
    ("relpath", "reason"),
    [("../x", "'..' component"), ("/abs", "absolute"), ("a/../../b", "'..' component"), ("", "empty"),
     ("a//b", "empty path component"), ("a/", "empty path component"), ("a\\..\\b", "backslash"), (".", "names no file"),
     *((f"a/{c}b", "control character") for c in ("\x00", "\n", "\x1b", "\x7f"))],
)
def test_safe_relpath_rejects(relpath: str, reason: str) -> None:
    with pytest.raises(StorageError, match="unsafe output path") as excinfo:
        storage.safe_relpath(relpath)
    assert str(excinfo.value) == f"{relpath!r}: unsafe output path ({reason})"


@pytest.mark.parametrize(
    ("relpath", "expected"), [("a/b c/ü.png", "a/b c/ü.png"), ("./a/./b.png", "a/b.png")]
)
def test_safe_relpath_accepts(relpath: str, expected: str) -> None:
    assert storage.safe_relpath(relpath) == expected


@ray.remote(num_cpus=0.25)
def _read_remote(fs: pafs.FileSystem, path: str) -> tuple[bytes, int]:
    return storage.read_bytes(fs, path), os.getpid()


def test_filesystem_pickles_to_ray_task(ray_cluster: str, s3: S3Server, bucket: str) -> None:
    fs, path = storage.resolve(f"{bucket}/pickled/ü.bin", s3.settings)
    storage.write_bytes_atomic(fs, path, b"from the driver")
    assert pickle.loads(pickle.dumps(fs)) == fs
    data, pid = ray.get(_read_remote.remote(fs, path), timeout=120)
    assert data == b"from the driver"
    assert pid != os.getpid()


def test_an_output_under_a_file_is_refused_before_any_work(tmp_path: Path) -> None:
    (tmp_path / "afile").touch()
    for given in ("afile/out", "afile/out/deeper"):
        fs, path = storage.resolve(str(tmp_path / given))
        with pytest.raises(StorageError, match=f"{tmp_path}/afile is a file, so --output cannot be made under it"):
            storage.check_output(fs, path, str(tmp_path / given), "--output")
    fs, path = storage.resolve(str(tmp_path / "new" / "out"))
    storage.check_output(fs, path, str(tmp_path / "new" / "out"), "--output")  # folders yet to be made are fine


def test_a_pipe_or_device_given_by_name_is_refused_without_being_opened(tmp_path: Path) -> None:
    """Listing it as a folder said "Not a directory"; opening it as a file would block on the pipe."""
    os.mkfifo(tmp_path / "pipe.png")
    for given in (str(tmp_path / "pipe.png"), "/dev/null"):
        fs, path = storage.resolve(given)
        with pytest.raises(StorageError, match=f"^{re.escape(given)}: neither a file nor a folder"):
            storage.list_files(fs, path)


def test_an_output_folder_takes_one_run_at_a_time_and_a_killed_holder_frees_it(tmp_path: Path) -> None:
    """Two runs in one folder deleted each other's unfinished files and checkpoints."""
    out = tmp_path / "new" / "out"
    local = pafs.LocalFileSystem()
    storage.output_lock(local, str(out), "out", "--output").acquire_if_there()
    assert not out.exists()  # only a run's first write makes the folder
    lock = storage.output_lock(local, str(out), "out", "--output")
    with output_held_elsewhere(out) as holder:
        with pytest.raises(storage.InUse, match=rf"out: in use by another run \(pid {holder.pid} on "
                                                rf"{re.escape(socket.gethostname())}, since 20.* UTC\); one run per --output at a time"):
            lock.acquire_if_there()
    # Killed while holding it: the file stays, naming it, but nothing holds it.
    assert f"pid {holder.pid} " in (out / storage.LOCK_FILE).read_text()
    with lock:
        lock.acquire()
        lock.acquire()  # again: a no-op, not a second lock on the same folder
        assert (out / storage.LOCK_FILE).read_text().startswith(f"pid {os.getpid()} ")
        with pytest.raises(storage.InUse):
            storage.output_lock(local, str(out), "out", "--output").acquire()
    with storage.output_lock(local, str(out), "out", "--output") as again:  # released on leaving the block
        again.acquire()


def test_a_folder_made_by_another_run_after_one_found_none_is_refused(tmp_path: Path) -> None:
    """What a run read of a folder that was not there yet (nothing) is stale once another run made it:
    a train resumed the other's checkpoints into a model of another width, a run relabelled its PNGs."""
    out = tmp_path / "out"
    lock = storage.output_lock(pafs.LocalFileSystem(), str(out), "out", "--out")
    lock.acquire_if_there()
    with output_held_elsewhere(out) as holder:  # another run's, made while this one listed its data
        with pytest.raises(storage.InUse, match=f"out: in use by another run \\(pid {holder.pid} "):
            lock.acquire()
    # Finished: nothing holds the lock, but what this run read of the folder (nothing) is stale.
    with pytest.raises(storage.InUse, match="out: another run made it while this one was starting; one run per --out"):
        lock.acquire()
    assert f"pid {holder.pid} " in (out / storage.LOCK_FILE).read_text()  # the finished run's lock file, untouched


def test_a_folder_that_cannot_be_locked_is_written_unlocked_with_a_warning(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """flock failing with ENOLCK (some network filesystems) was a traceback, where runs had worked."""
    def no_locks(fd: object, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(storage.fcntl, "flock", no_locks)
    with storage.output_lock(pafs.LocalFileSystem(), str(tmp_path / "out"), "out", "--output") as lock:
        lock.acquire()
        lock.acquire()
    assert capsys.readouterr().err.splitlines() == [
        "warning: out: cannot be locked (No locks available); nothing stops a second run into it, so run one per --output at a time"]


def _s3_lock(s3: S3Server, uri: str) -> tuple[storage.OutputLock, pafs.FileSystem, str]:
    fs, path = storage.resolve(uri, s3.settings)
    return storage.output_lock(fs, path, uri, "--output", s3.settings), fs, storage.join(path, storage.LOCK_FILE)


def test_an_s3_prefix_is_locked_and_a_lapsed_lock_taken_over(
        s3: S3Server, bucket: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Two runs into one prefix each deleted or duplicated what the other wrote: on S3 nothing
    stopped the second."""
    first, fs, lock_key = _s3_lock(s3, f"{bucket}/locked")
    first.acquire_if_there()  # on S3 at once: a prefix needs no folder
    assert storage.read_bytes(fs, lock_key).decode().startswith(f"pid {os.getpid()} on ")
    second = _s3_lock(s3, f"{bucket}/locked")[0]
    with pytest.raises(storage.InUse, match=rf"/locked: in use by another run \(pid {os.getpid()} on .*, renewed \d+ s ago\); "
                                            "one run per --output at a time"):
        second.acquire()
    first.release()
    assert not storage.exists(fs, lock_key)
    second.acquire()

    monkeypatch.setattr(storage, "LOCK_LEASE_S", 1.0)  # and `second` renews only after 30 s
    time.sleep(2.5)
    third, fourth = (_s3_lock(s3, f"{bucket}/locked")[0] for _ in range(2))
    put = storage._S3Lock._put_unless_taken

    def fourth_puts_first(lock: storage._S3Lock, *args: object, **condition: str) -> str:
        if lock is third:  # both found the lock lapsed; `fourth` takes it over between
            fourth.acquire()   # `third`'s look and its put
        return put(lock, *args, **condition)

    monkeypatch.setattr(storage._S3Lock, "_put_unless_taken", fourth_puts_first)
    with pytest.raises(storage.InUse, match="/locked: another run took the lock first; one run per --output at a time"):
        third.acquire()
    assert capsys.readouterr().err.count("locked: took over the lock of a stopped run (pid ") == 1
    taken = storage.read_bytes(fs, lock_key)
    for stale in (second, third):  # neither holds the lock, so each leaves it be
        stale.release()
        assert storage.read_bytes(fs, lock_key) == taken
    fourth.release()
    assert not storage.exists(fs, lock_key)


def test_an_s3_lock_is_renewed_while_its_run_lasts(s3: S3Server, bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(storage, "LOCK_LEASE_S", 2.0)
    monkeypatch.setattr(storage, "LOCK_RENEW_S", 0.2)
    with _s3_lock(s3, f"{bucket}/renewed")[0] as held:
        held.acquire()
        time.sleep(3.5)  # well past the lease
        with pytest.raises(storage.InUse, match="in use by another run"):
            _s3_lock(s3, f"{bucket}/renewed")[0].acquire()


def test_an_s3_store_that_ignores_the_lock_condition_is_written_unlocked_with_a_warning(
        s3: S3Server, bucket: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A store that ignores If-None-Match would let every run take the lock: a false lock."""
    client = storage._s3_client.__wrapped__(s3.settings)

    def without_the_condition(request, **_) -> None:
        del request.headers["If-None-Match"]

    client.meta.events.register("before-sign.s3.PutObject", without_the_condition)
    monkeypatch.setattr(storage, "_s3_client", lambda settings: client)
    first, fs, lock_key = _s3_lock(s3, f"{bucket}/unlockable")
    with first, _s3_lock(s3, f"{bucket}/unlockable")[0] as second:
        first.acquire()
        second.acquire()  # not refused: the store cannot tell them apart
        assert not storage.exists(fs, lock_key)
    assert capsys.readouterr().err.splitlines() == 2 * [
        f"warning: {bucket}/unlockable: cannot be locked (this S3 store ignores If-None-Match); nothing stops a second run "
        "into it, so run one per --output at a time"]
