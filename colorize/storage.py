"""Paths and URIs -> pyarrow filesystems, for training, evaluation and the bulk job.

A user names data as a local path or an ``s3://bucket/key`` URI. :func:`resolve` turns either
into a ``(filesystem, path)`` pair; everything else here takes that pair. pyarrow ignores
``AWS_ENDPOINT_URL``, so the endpoint is read once into :class:`S3Settings` and one
``S3FileSystem`` per settings is built and shared (it pickles to Ray workers, which then find
credentials through their own AWS environment).

Failures that a user can fix (missing path, unreachable endpoint, wrong keys) surface as
:class:`StorageError` with one readable line that starts with the URI.
"""

from __future__ import annotations

import abc
import contextlib
import datetime
import email.utils
import fcntl
import functools
import io
import json
import os
import posixpath
import re
import socket
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from colorize import errors

TEMP_PREFIX = ".tmp-"  # a local file being written, renamed into place when whole

# A refused port must fail in seconds, not after the AWS SDK's default ten attempts with
# exponential backoff; a slow but live endpoint still gets a few tries.
_CONNECT_TIMEOUT_S = 5.0
# The AWS SDK applies this to a stalled transfer, not to the whole request, so large objects
# are unaffected.
_REQUEST_TIMEOUT_S = 30.0
_MAX_ATTEMPTS = 3

_CREDENTIALS_HINT = "check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
_DENIED_CODES = {
    "ACCESS_DENIED": "access denied",
    "SIGNATURE_DOES_NOT_MATCH": "access denied, wrong secret key",
    "INVALID_ACCESS_KEY_ID": "access denied, unknown access key",
    "EXPIRED_TOKEN": "access denied, expired session token",
    "INVALID_CLIENT_TOKEN_ID": "access denied, invalid session token",
}
_NOT_FOUND_CODES = {"RESOURCE_NOT_FOUND", "NO_SUCH_KEY"}
# pyarrow formats S3 failures as "... AWS Error <CODE> during <Op> operation: <message>".
_AWS_ERROR = re.compile(r"AWS Error (\w+)(?: \(HTTP status (\d+)\))? during")
_CURL_ERROR = re.compile(r"curlCode: \d+, ([^;]+)")
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


class StorageError(Exception):
    """One-line, user-facing storage problem (missing path, unreachable S3, bad credentials)."""


class InUse(StorageError):
    """Another run holds the output folder's lock."""


@dataclass(frozen=True)
class S3Settings:
    """Where S3 lives; credentials come from the standard AWS chain, not from here.

    ``endpoint`` is a URL such as ``"http://127.0.0.1:8333"`` for an S3-compatible server, or
    None for AWS itself.
    """

    endpoint: str | None = None
    region: str | None = None

    def __post_init__(self) -> None:
        if self.endpoint is None:
            return
        parts = urlsplit(self.endpoint)
        if parts.username or parts.password:  # never echoed: it would be a key and its secret
            raise StorageError(
                f"{parts.scheme}://...@{parts.hostname}: an S3 endpoint URL takes no user or password; "
                "credentials come from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or the AWS config)"
            )
        if (
            parts.scheme not in ("http", "https")
            or not parts.netloc
            or parts.path not in ("", "/")
            or parts.query
            or parts.fragment
        ):
            raise StorageError(
                f"{self.endpoint!r}: expected an S3 endpoint URL like http://host:port"
            )

    @classmethod
    def from_env(cls, endpoint: str | None = None) -> S3Settings:
        """Settings from a command-line ``endpoint`` (which wins) and the AWS environment."""
        env = os.environ
        # AWS tools give the S3-specific variable precedence over the global one.
        endpoint = endpoint or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
        region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
        return cls(endpoint=endpoint or None, region=region or None)


def is_s3(uri: str) -> bool:
    """True for ``s3://`` URIs (scheme matched case-insensitively)."""
    return uri[:5].lower() == "s3://"


def not_local(flag: str, uri: str) -> str | None:
    """Why ``uri`` cannot be ``flag``'s folder in a job that writes only locally (an S3 URI,
    which would become a local folder named ``s3:``), or None."""
    if uri[:4].lower() == "s3:/":
        return f"{flag} {uri}: an S3 URI, but this job writes to a local folder; write there and copy it up (aws s3 sync)"
    return None


def resolve(uri: str, settings: S3Settings | None = None) -> tuple[pafs.FileSystem, str]:
    """A local path or ``s3://bucket/key`` -> (filesystem, path within it).

    Local paths come back absolute with ``~`` expanded; S3 paths as ``"bucket/key"``. Without
    ``settings``, S3 settings are read from the environment.
    """
    if is_s3(uri):
        bucket, _, key = uri[5:].partition("/")
        if not bucket:
            raise StorageError(f"{uri}: expected s3://bucket/key, got no bucket name")
        if settings is None:
            settings = S3Settings.from_env()
        return s3_filesystem(settings), join(bucket, key)
    if uri.lower().startswith("s3:"):  # s3:/bucket/key, s3:bucket: a typo, not a local folder named "s3:"
        raise StorageError(f"{uri}: expected s3://bucket/key")
    scheme = _SCHEME.match(uri)
    if scheme:
        raise StorageError(
            f"{uri}: unsupported scheme {scheme.group(1)!r}; use a local path or s3://bucket/key"
        )
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


@functools.lru_cache(maxsize=None)
def s3_filesystem(settings: S3Settings) -> pafs.S3FileSystem:
    """The shared S3 filesystem for ``settings`` (built once per settings value)."""
    options: dict[str, str] = {}
    if settings.endpoint is not None:
        parts = urlsplit(settings.endpoint)
        options.update(endpoint_override=parts.netloc, scheme=parts.scheme)
    return pafs.S3FileSystem(
        region=settings.region,
        allow_bucket_creation=True,
        # An object is put when its stream closes, in one PUT below Arrow's 10 MiB part size: the
        # default opened a multipart upload for every object, two requests more for each PNG,
        # and a process killed mid-write left an incomplete upload (billed until aborted).
        allow_delayed_open=True,
        connect_timeout=_CONNECT_TIMEOUT_S,
        request_timeout=_REQUEST_TIMEOUT_S,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=_MAX_ATTEMPTS),
        **options,
    )


def join(base: str, *parts: str) -> str:
    """Join filesystem path pieces with "/", collapsing repeated and trailing slashes."""
    joined = re.sub(r"/{2,}", "/", "/".join(p for p in (base, *parts) if p))
    return joined.rstrip("/") or joined[:1]


def to_uri(fs: pafs.FileSystem, path: str) -> str:
    """The inverse of :func:`resolve`, for messages: ``s3://bucket/key`` or the local path."""
    return f"s3://{path}" if fs.type_name == "s3" else path


def list_files(fs: pafs.FileSystem, path: str, *, unlistable_as_files: bool = False) -> list[str]:
    """Every file under directory ``path``, recursively and sorted; a file -> [path].

    A local folder below ``path`` that cannot be listed (no permission) is a StorageError
    naming it, or with ``unlistable_as_files`` is listed itself, as a file would be, for a
    caller that reports each input it cannot read and goes on (the bulk job).

    Locally, symbolic links to folders are followed unless they point back up the tree (a
    loop), and a dangling link, a named pipe or a device is listed like a file, so that the
    caller can report it (reading a pipe would block: see ``sources.discover``). A
    local name that is not valid UTF-8 comes back as Python holds it, with surrogate escapes
    (see :func:`is_utf8`).
    """
    uri = to_uri(fs, path)
    kind = stat(fs, path, uri).type
    if kind == pafs.FileType.File:
        return [path]
    if kind != pafs.FileType.Directory:  # given by name: reading a pipe would block (see above)
        raise StorageError(f"{uri}: neither a file nor a folder (a named pipe, a device or a socket)")
    with _errors(fs, uri):
        if fs.type_name == "local":
            return _walk_local(path, unlistable_as_files)
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File)


def stat(fs: pafs.FileSystem, path: str, uri: str, *, missing: str = "no such file or directory") -> pafs.FileInfo:
    """``path``'s info; a StorageError naming ``uri`` if it cannot be reached, is forbidden, or
    does not exist (``missing``, or "no such bucket" where that is what is missing)."""
    with _errors(fs, uri):
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise StorageError(f"{uri}: {_no_such_bucket(fs) if _bucket_missing(fs, path) else missing}")
    return info


def _bucket_missing(fs: pafs.FileSystem, path: str) -> bool:
    return fs.type_name == "s3" and fs.get_file_info(path.split("/", 1)[0]).type == pafs.FileType.NotFound


def _walk_local(root: str, unlistable_as_files: bool) -> list[str]:
    """:func:`list_files` of a local folder."""
    found: list[str] = []
    folders = [(root, frozenset([os.path.realpath(root)]))]  # each with the real folders above it
    while folders:
        folder, above = folders.pop()
        try:
            with os.scandir(folder) as listing:
                entries = list(listing)
        except OSError as error:
            if folder == root:
                raise
            if not unlistable_as_files:
                raise StorageError(f"{folder}: cannot list this folder: {reason(error)}") from error
            found.append(folder)
            continue
        for entry in entries:
            if _is_folder(entry):
                real = os.path.realpath(entry.path)
                if real not in above:  # a link back up the tree would never end
                    folders.append((entry.path, above | {real}))
            else:  # files, dangling links, and pipes and devices (which the bulk job lists as failed)
                found.append(entry.path)
    return sorted(found)


def _is_folder(entry: os.DirEntry) -> bool:
    """Whether ``entry`` is a folder or a link to one; a loop of links (``a -> b -> a``) is
    not, so that it is listed and fails as an input rather than ending the listing."""
    try:
        return entry.is_dir()  # follows links
    except OSError:  # ELOOP
        return False


def is_unfinished(fs: pafs.FileSystem, path: str) -> bool:
    """Whether ``path`` is a local file :func:`write_bytes_atomic` was writing when its process
    stopped: exactly its temporary name, which no output (named after an input, with an
    extension) can have."""
    return fs.type_name == "local" and re.fullmatch(rf"{re.escape(TEMP_PREFIX)}[0-9a-f]{{32}}", os.path.basename(path)) is not None


def is_hidden(path: str, root: str) -> bool:
    """Whether ``path``, under folder ``root``, is a dot file or lies in a dot folder below it
    (``.ipynb_checkpoints/``, macOS's ``._photo.jpg``): copies and metadata, not data."""
    relpath = posixpath.relpath(path, root)
    return relpath != "." and any(part.startswith(".") for part in relpath.split("/"))


def is_utf8(name: str) -> bool:
    """Whether ``name`` can be written as UTF-8, as Arrow, Parquet and S3 need.

    A local file name whose bytes are not UTF-8 reaches Python with surrogate escapes
    (PEP 383), and so does such a name inside a tar archive.
    """
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def utf8_name(name: str) -> str:
    """``name`` with each byte that is not UTF-8 written as ``%E9``: valid UTF-8, safe in a
    file name or S3 key, and the same on every run, so an output named after it is found again."""
    return "".join(f"%{ord(c) - 0xDC00:02X}" if 0xDC80 <= ord(c) <= 0xDCFF else c for c in name)


def open_stream(fs: pafs.FileSystem, path: str) -> pafs.NativeFile:
    """``path``'s raw bytes (even for *.gz) to read front to back, 8 MiB a request: unbuffered,
    each of tarfile's 10 KiB reads was an S3 GET (a 3 MiB tar took 602 of them, and 11 s)."""
    return fs.open_input_stream(path, compression=None, buffer_size=8 * 2**20)


def open_seekable(fs: pafs.FileSystem, path: str) -> io.BufferedReader:
    """``path`` for readers that seek (zipfile), 1 MiB a request: unbuffered, each read of a
    member's header or data was an S3 GET (a zip of 500 images took 1,503, and 18 s)."""
    return io.BufferedReader(fs.open_input_file(path), 2**20)


def read_bytes(fs: pafs.FileSystem, path: str, *, limit: int | None = None) -> bytes:
    """The whole content of file ``path``; with ``limit``, a StorageError instead for a file of
    more bytes than that, having read no more than one byte past it."""
    with _errors(fs, to_uri(fs, path)):
        # One read: on S3 a HEAD (for the size) and one GET.
        with fs.open_input_stream(path, compression=None) as f:  # raw bytes, even for *.gz
            data = f.read() if limit is None else f.read(limit + 1)
    if limit is not None and len(data) > limit:
        raise StorageError(f"{to_uri(fs, path)}: {too_large(limit)}")
    return data


def parquet_file(fs: pafs.FileSystem, path: str) -> pq.ParquetFile:
    """``path`` as a Parquet file whose columns can be read one by one (its footer read now):
    a StorageError if it cannot be opened, pyarrow's ArrowInvalid if it is not Parquet."""
    with _errors(fs, to_uri(fs, path)):
        return pq.ParquetFile(path, filesystem=fs)


def of_one_file(error: StorageError) -> bool:
    """Whether ``error`` is about one file (gone, not readable here, over a read's limit), not
    about the storage behind it (unreachable, refusing these credentials), where every other
    file would fail the same way."""
    return error.__cause__ is None or isinstance(error.__cause__, (FileNotFoundError, PermissionError))


def too_large(limit: int) -> str:
    return f"over {limit:,} bytes, more than an image of --max-pixels can be: not read into memory"


def write_bytes_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old content or all of the new."""
    with _errors(fs, to_uri(fs, path)):
        if fs.type_name != "local":
            # S3 makes an object visible only once its upload completes, so a plain PUT
            # (or multipart upload, for large data) is already atomic.
            with fs.open_output_stream(path, compression=None) as f:  # the bytes given, even for *.gz
                f.write(data)
            return
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        # Same directory, so the rename cannot cross filesystems; a fixed short name, so a
        # long file name cannot overflow NAME_MAX. No fsync: this guards against readers and
        # retried tasks seeing partial files, not against power loss.
        tmp = os.path.join(parent, f"{TEMP_PREFIX}{uuid.uuid4().hex}")
        try:
            with open(tmp, "xb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


def write_json(fs: pafs.FileSystem, path: str, value: Any) -> None:
    """``value`` as indented JSON, written atomically."""
    write_bytes_atomic(fs, path, json.dumps(value, indent=2).encode())


def delete(fs: pafs.FileSystem, path: str) -> None:
    """Remove the file ``path`` if there is one."""
    with _errors(fs, to_uri(fs, path)):
        try:
            fs.delete_file(path)
        except FileNotFoundError:
            pass


def exists(fs: pafs.FileSystem, path: str) -> bool:
    """True if ``path`` is a file or directory."""
    with _errors(fs, to_uri(fs, path)):
        return fs.get_file_info(path).type != pafs.FileType.NotFound


LOCK_FILE = ".colorize-lock"


class OutputLock(abc.ABC):
    """One run at a time in an output folder or prefix (:func:`output_lock` makes one).

    Two runs in one folder each deleted files the other was writing (a bulk run's unfinished
    ones; training's checkpoints) and wrote over each other's records; on S3 one run's
    ``--overwrite`` deleted everything the other reported written.

    A run calls :meth:`acquire_if_there` first, before it reads anything an earlier run left,
    and :meth:`acquire` before its first write; each raises :class:`InUse` naming the run that
    holds the lock.
    """

    @abc.abstractmethod
    def acquire(self) -> None: ...

    def acquire_if_there(self) -> None:
        """Take the lock where the folder already exists (on S3 at once: a prefix needs none)."""
        self.acquire()

    @abc.abstractmethod
    def release(self) -> None: ...

    def __enter__(self) -> OutputLock:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def output_lock(fs: pafs.FileSystem, path: str, uri: str, flag: str, settings: S3Settings | None = None) -> OutputLock:
    """The lock of output folder or prefix ``path`` (``uri`` as the user gave it, named by
    ``flag``): locally an exclusive ``flock`` on ``LOCK_FILE`` in it, on S3 that object,
    created only where there is none."""
    if fs.type_name == "s3":
        return _S3Lock(settings or S3Settings.from_env(), path, uri, flag)
    return _FolderLock(fs, path, uri, flag)


class _FolderLock(OutputLock):
    """An exclusive ``flock`` on ``LOCK_FILE`` in a local folder. The kernel releases it when its
    process ends however it ends, so a killed run leaves no stale lock: the file stays, naming
    the last holder, and the next run takes it."""

    def __init__(self, fs: pafs.FileSystem, path: str, uri: str, flag: str) -> None:
        self.fs, self.path, self.uri, self.flag = fs, path, uri, flag
        self._handle: io.TextIOWrapper | None = None
        self._found_absent = self._unlockable = False

    def acquire(self) -> None:
        """Take the lock, or raise :class:`InUse` naming the run that holds it, or saying that
        the folder appeared after :meth:`acquire_if_there` found none (what this run read of
        it then, nothing, is stale)."""
        if self._handle is not None or self._unlockable:
            return
        made_since = self._found_absent and os.path.exists(self.path)
        with _errors(self.fs, self.uri):
            os.makedirs(self.path, exist_ok=True)
            handle = open(os.path.join(self.path, LOCK_FILE), "a+")  # noqa: SIM115 - held until release()
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise InUse(f"{self.uri}: in use by another run ({holder}); one run per {self.flag} at a time") from None
        except OSError as error:  # a filesystem without locks (ENOLCK, EOPNOTSUPP): it worked before there was one
            handle.close()
            self._unlockable = True
            print(f"warning: {self.uri}: cannot be locked ({error.strerror or error}); nothing stops a second run "
                  f"into it, so run one per {self.flag} at a time", file=sys.stderr, flush=True)
            return
        except BaseException:
            handle.close()
            raise
        if made_since:  # and that run has finished, or it would hold the lock
            handle.close()
            raise InUse(f"{self.uri}: another run made it while this one was starting; one run per {self.flag} at a "
                        "time: run this again")
        handle.truncate(0)
        handle.write(_holder())
        handle.flush()
        self._handle = handle

    def acquire_if_there(self) -> None:
        """Take the lock where the folder already exists: an earlier run's files are about to be
        read or deleted. A new folder is made only by :meth:`acquire`, before the first write,
        so that a run refused before it wrote anything leaves none."""
        if os.path.isdir(self.path):
            self.acquire()
        else:
            self._found_absent = True

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closing the last descriptor drops the flock
            self._handle = None


# An S3 lock is renewed every LOCK_RENEW_S by its run; one not renewed for LOCK_LEASE_S (by the
# server's clock) is a stopped run's, and the next run takes it over.
LOCK_RENEW_S = 30.0
LOCK_LEASE_S = 120.0


class _S3Lock(OutputLock):
    """``LOCK_FILE`` under an S3 prefix, put only where there is none (``If-None-Match: *``,
    which AWS S3 and most S3-compatible stores honour) and renewed by a thread while its run
    lasts. A run killed without releasing it holds the prefix until the lease runs out;
    taking a lapsed lock over and renewing are conditional on the holder's ETag
    (``If-Match``), so of two runs only one wins. Where a store ignores the condition, which
    a second conditional put shows, the run goes on unlocked with a warning, as on a local
    filesystem without locks.

    Through boto3: pyarrow's S3 filesystem has no conditional put.
    """

    def __init__(self, settings: S3Settings, path: str, uri: str, flag: str) -> None:
        self.settings, self.uri, self.flag = settings, uri, flag
        self.bucket, _, prefix = path.partition("/")
        self.key = posixpath.join(prefix, LOCK_FILE) if prefix else LOCK_FILE
        self._etag: str | None = None
        self._unlockable = False
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def acquire(self) -> None:
        if self._etag is not None or self._unlockable:
            return
        client, holder = _s3_client(self.settings), _holder()
        with self._errors():
            try:
                self._etag = client.put_object(Bucket=self.bucket, Key=self.key, Body=holder.encode(), IfNoneMatch="*")["ETag"]
            except client.exceptions.ClientError as error:
                if _code(error) != "PreconditionFailed":
                    raise
                self._etag = self._take_over(client, holder)
            try:  # the condition again, now that the lock is there: a store that ignores it puts
                client.put_object(Bucket=self.bucket, Key=self.key, Body=holder.encode(), IfNoneMatch="*")
            except client.exceptions.ClientError as error:
                if _code(error) != "PreconditionFailed":
                    raise
            else:
                self._etag, self._unlockable = None, True
                client.delete_object(Bucket=self.bucket, Key=self.key)
                print(f"warning: {self.uri}: cannot be locked (this S3 store ignores If-None-Match); nothing stops a "
                      f"second run into it, so run one per {self.flag} at a time", file=sys.stderr, flush=True)
                return
        self._stop.clear()
        self._renewer = threading.Thread(target=self._renew, args=(client, holder), name="colorize-lock", daemon=True)
        self._renewer.start()

    def _take_over(self, client: Any, holder: str) -> str:
        """The lock's new ETag once this run has taken over a lapsed one, or :class:`InUse`."""
        try:
            held = client.get_object(Bucket=self.bucket, Key=self.key)
        except client.exceptions.NoSuchKey:  # released since
            return self._put_unless_taken(client, holder, IfNoneMatch="*")
        owner = held["Body"].read().decode(errors="replace").strip() or "another process"
        now = email.utils.parsedate_to_datetime(held["ResponseMetadata"]["HTTPHeaders"]["date"])
        idle = (now - held["LastModified"]).total_seconds()  # both by the server's clock
        if idle < LOCK_LEASE_S:
            raise InUse(f"{self.uri}: in use by another run ({owner}, renewed {max(0, idle):.0f} s ago); one run per "
                        f"{self.flag} at a time (a killed run's lock is taken over {LOCK_LEASE_S:.0f} s after its last renewal)")
        etag = self._put_unless_taken(client, holder, IfMatch=held["ETag"])
        print(f"{self.uri}: took over the lock of a stopped run ({owner}, not renewed for {idle:.0f} s)",
              file=sys.stderr, flush=True)
        return etag

    def _put_unless_taken(self, client: Any, holder: str, **condition: str) -> str:
        """Put the lock on ``condition``; :class:`InUse` where another run got there first."""
        try:
            return client.put_object(Bucket=self.bucket, Key=self.key, Body=holder.encode(), **condition)["ETag"]
        except client.exceptions.ClientError as error:
            if _code(error) != "PreconditionFailed":
                raise
            raise InUse(f"{self.uri}: another run took the lock first; one run per {self.flag} at a time") from None

    def _renew(self, client: Any, holder: str) -> None:
        while not self._stop.wait(LOCK_RENEW_S):
            try:
                self._etag = client.put_object(Bucket=self.bucket, Key=self.key, Body=holder.encode(), IfMatch=self._etag)["ETag"]
            except client.exceptions.ClientError as error:
                if _code(error) == "PreconditionFailed":
                    print(f"warning: {self.uri}: another run took over this run's lock (not renewed for "
                          f"{LOCK_LEASE_S:.0f} s); the two may now write over each other", file=sys.stderr, flush=True)
                    return
            except Exception:  # noqa: BLE001 - a network hiccup: the next renewal may get through
                continue

    def release(self) -> None:
        if self._etag is None:
            return
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        client, etag, self._etag = _s3_client(self.settings), self._etag, None
        with contextlib.suppress(Exception):  # taken over (412), or unreachable: the lease ends it
            client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=etag)

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """boto3's failures as a StorageError naming the lock."""
        import botocore.exceptions

        try:
            yield
        except botocore.exceptions.ClientError as error:
            raise StorageError(f"{self.uri}: cannot take the lock {LOCK_FILE}: {_code(error)}: "
                               f"{error.response.get('Error', {}).get('Message', '')}") from None
        except botocore.exceptions.BotoCoreError as error:
            raise StorageError(f"{self.uri}: cannot take the lock {LOCK_FILE}: {error}") from None


def _holder() -> str:
    """How a lock names the run that holds it."""
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"pid {os.getpid()} on {socket.gethostname()}, since {started}\n"


def _code(error: Exception) -> str:
    """The error code of a boto3 ClientError ("PreconditionFailed"), else ""."""
    return getattr(error, "response", {}).get("Error", {}).get("Code", "")


@functools.lru_cache(maxsize=None)
def _s3_client(settings: S3Settings) -> Any:
    """A boto3 S3 client for ``settings``, with the timeouts and attempts of :func:`s3_filesystem`."""
    import boto3
    import botocore.config

    return boto3.client(
        "s3", endpoint_url=settings.endpoint, region_name=settings.region,
        config=botocore.config.Config(
            s3={"addressing_style": "path"} if settings.endpoint else {},
            connect_timeout=_CONNECT_TIMEOUT_S, read_timeout=_REQUEST_TIMEOUT_S,
            retries={"mode": "standard", "total_max_attempts": _MAX_ATTEMPTS},
        ),
    )


# Names a new output folder is refused under: an image's, a model's, a report's.
_FILE_NAMES = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".gif", ".bmp", ".pt", ".json")


def check_output(fs: pafs.FileSystem, path: str, uri: str, flag: str, settings: S3Settings | None = None) -> None:
    """Fail fast with a StorageError if output folder or prefix ``path`` cannot be reached, is
    forbidden, is a file or would be a new folder named as one (``cat.png``), lies in a bucket
    that does not exist, or (locally) in a folder that
    cannot be written to (the first write would fail, after the work had started); ``path``
    itself need not exist yet. On S3 it writes an empty object there and deletes it, through
    boto3 with ``settings`` (Arrow's delete left a new prefix an empty folder marker, ``out/``,
    in a run refused for another reason, which wrote nothing)."""
    with _errors(fs, uri):
        kind = fs.get_file_info(path).type
        if kind == pafs.FileType.File:
            raise StorageError(f"{uri}: is a file; {flag} takes a folder or an s3:// prefix")
        if kind == pafs.FileType.NotFound and path.lower().endswith(_FILE_NAMES) and not uri.endswith("/"):
            # `--output cat_colour.png` made a folder of that name, its one image in images/ inside.
            raise StorageError(f"{uri}: a file's name; {flag} takes a folder or an s3:// prefix, which the command "
                               "fills with its outputs (name one, such as "
                               f"{posixpath.splitext(posixpath.basename(path))[0] or 'out'})")
        if kind == pafs.FileType.NotFound and _bucket_missing(fs, path):
            raise StorageError(f"{uri}: {_no_such_bucket(fs)}")
        if fs.type_name == "local":
            above = path
            while fs.get_file_info(above).type == pafs.FileType.NotFound and above != os.path.dirname(above):
                above = os.path.dirname(above)
            if fs.get_file_info(above).type == pafs.FileType.File:
                raise StorageError(f"{uri}: {above} is a file, so {flag} cannot be made under it")
            try:  # an unnamed file, gone when closed: permissions, a read-only disk, /sys
                tempfile.TemporaryFile(dir=above).close()
            except OSError as error:
                raise StorageError(f"{uri}: cannot write in {above}: {error.strerror or error}") from None
        else:  # keys that may read but not write: evaluate's report was lost after all its work
            probe = join(path, f"{TEMP_PREFIX}write-check-{uuid.uuid4().hex}")
            fs.open_output_stream(probe).close()
            with contextlib.suppress(Exception):  # a store may let one write but not delete
                bucket, _, key = probe.partition("/")
                _s3_client(settings or S3Settings.from_env()).delete_object(Bucket=bucket, Key=key)


def safe_relpath(relpath: str) -> str:
    """Normalise a relative output key, refusing any that could escape the output prefix.

    "." components are dropped; absolute paths, "..", empty components, backslashes and
    control characters raise a :class:`StorageError` naming the value.
    """

    def refuse(reason: str) -> StorageError:
        return StorageError(f"{relpath!r}: unsafe output path ({reason})")

    if not relpath:
        raise refuse("empty")
    if relpath.startswith("/"):
        raise refuse("absolute")
    # Backslashes are separators on Windows and in some archive tools, so "..\\x" could
    # escape there even though it is one harmless name on POSIX and S3.
    if "\\" in relpath:
        raise refuse("backslash")
    if any(ord(c) < 32 or c == "\x7f" for c in relpath):
        raise refuse("control character")
    parts = relpath.split("/")
    if "" in parts:
        raise refuse("empty path component")
    if ".." in parts:
        raise refuse("'..' component")
    kept = [p for p in parts if p != "."]
    if not kept:
        raise refuse("names no file")
    return "/".join(kept)


@contextmanager
def _errors(fs: pafs.FileSystem, uri: str) -> Iterator[None]:
    """Re-raise pyarrow's OSErrors as one-line StorageErrors about ``uri``."""
    try:
        yield
    except OSError as e:
        why = reason(e, fs)
        if isinstance(e, FileNotFoundError) and uri.startswith("s3://"):
            # A HEAD's 404 has no body to tell a missing key from a missing bucket (a manifest's typo).
            with contextlib.suppress(OSError):
                if _bucket_missing(fs, uri.removeprefix("s3://")):
                    why = _no_such_bucket(fs)
        raise StorageError(f"{uri}: {why}") from e


def reason(error: OSError, fs: pafs.FileSystem | None = None) -> str:
    """A short, readable cause for a pyarrow or OS error (``fs``: the filesystem it came from)."""
    if isinstance(error, FileNotFoundError):
        return "no such file or directory"
    if isinstance(error, PermissionError):
        return "permission denied"
    text = str(error)
    match = _AWS_ERROR.search(text)
    if match is None:
        return errors.first_line(text) or type(error).__name__
    code = match.group(1)
    if code == "NETWORK_CONNECTION":
        curl = _CURL_ERROR.search(text)
        detail = curl.group(1).strip() if curl else "network error"
        if not detail[:2].isupper():  # "Couldn't connect", not "SSL connect error"
            detail = detail[:1].lower() + detail[1:]
        return f"cannot reach S3 endpoint {_endpoint(fs)}: {detail}"
    if code in _DENIED_CODES:
        return f"{_DENIED_CODES[code]} ({_CREDENTIALS_HINT})"
    if code == "NO_SUCH_BUCKET":
        return _no_such_bucket(fs)
    if code in _NOT_FOUND_CODES:
        return "no such file or directory"
    status = f" (HTTP {match.group(2)})" if match.group(2) else ""
    detail = errors.first_line(text.split("operation: ", 1)[-1]) or "no message"  # some give none
    return f"S3 error {code}{status}: {detail}"


def _no_such_bucket(fs: pafs.FileSystem | None) -> str:
    """Named with its endpoint: a web server that is not S3 (a filer's port, a console) answers 404 too."""
    return f"no such bucket at {_endpoint(fs)}" if fs is not None and fs.type_name == "s3" else "no such bucket"


def _endpoint(fs: pafs.FileSystem) -> str:
    """The URL ``fs`` talks to, for messages."""
    # S3FileSystem exposes its options only through its pickle state.
    options = fs.__reduce__()[1][0]
    if options["endpoint_override"]:
        return f"{options['scheme']}://{options['endpoint_override']}"
    return f"AWS S3 ({options['region'] or 'default region'})"
