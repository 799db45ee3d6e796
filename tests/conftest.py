"""Session fixtures: a real local Ray cluster and a real S3 server (SeaweedFS) on loopback.

Both start only when a test asks for them, on ports the kernel hands out, so parallel runs on
one machine do not collide, and both tear down only the processes they started.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray

from tests.helpers import free_ports
from tests.s3server import S3_ACCESS_KEY, S3_REGION, S3_SECRET_KEY, S3Server, seaweedfs

_BIN = Path(sys.executable).parent
_RAY_START_TIMEOUT_S = 120.0
_STOP_TIMEOUT_S = 10.0

# Ray's Unix socket paths live under its temp dir and must stay under ~100 characters, so use
# a short directory in /tmp rather than $TMPDIR (which may be long, e.g. on macOS).
_RAY_TMP = tempfile.mkdtemp(prefix="colorize-ray-", dir="/tmp")
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ["RAY_TMPDIR"] = _RAY_TMP
os.environ["RAY_DEDUP_LOGS"] = "0"
# Ray Train's controller polls its workers every 2 s: each fit() waited up to 2 s to see its
# workers launched and up to 2 s more to see them finish (tens of fits in the suite). Its
# preemption watcher, an actor process of its own per fit, watches for node drains a local
# cluster never has. Both are read by the controller, which Ray Train hands the driver's values.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
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


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    """A real S3 server (SeaweedFS) for the session."""
    with seaweedfs() as server:
        yield server
