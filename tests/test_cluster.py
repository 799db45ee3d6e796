"""Jobs on a real two-node Ray cluster through its job server, and the cluster configs.

The module's cluster is two ``ray start`` nodes on this machine, a head with the job server
and a worker node, which is all ``colorize submit`` ever sees of a VM or KubeRay cluster: a URL.
Jobs run the uploaded working dir in processes of their own. The configs under cluster/ cannot
be launched here; they are checked against Ray's cluster-launcher schema, the KubeRay fields a
cluster needs, the pinned versions and the real command-line parser.
"""

from __future__ import annotations

import contextlib
import copy
import http.server
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import pyarrow.parquet as pq
import pytest
import ray.autoscaler
import requests
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from ray._private.ray_constants import DASHBOARD_CLIENT_MAX_SIZE
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.job_submission import JobDetails, JobStatus

from colorize import cli, submit
from tests.helpers import free_ports, write_images

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
MANIFESTS = sorted((CLUSTER / "kuberay").glob("*.yaml"))
_BIN = Path(sys.executable).parent
_START_TIMEOUT_S = 240.0  # two `ray start`s on two busy cores
_STOP_TIMEOUT_S = 10.0
_JOB_TIMEOUT_S = 400
_JOB_ID = re.compile(r"colorize-(?:train|run|evaluate)-\d{8}-\d{6}-[0-9a-f]{4}")
TINY_MODEL = ["--batch-size", "8", "--width", "8", "--depth", "2", "--image-size", "16", "--limit", "16",
              "--cpus-per-worker", "0.5"]
TINY_TRAIN = ["--epochs", "1", *TINY_MODEL]

def colorize(*args: str, env: dict[str, str] | None = None, timeout: float = _JOB_TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run the ``colorize`` command as a user would, from the project folder."""
    return subprocess.run(
        [str(_BIN / "colorize"), *args], cwd=ROOT, env=env or _client_env(), capture_output=True, text=True,
        timeout=timeout,
    )


def _client_env(**extra: str) -> dict[str, str]:
    """The submitting shell: this process's environment (AWS keys included) without Ray's address."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    return {**env, **extra}


# --- a two-node cluster on this machine --------------------------------------------------------


@dataclass(frozen=True)
class Cluster:
    """A running cluster: its job server URL and the temp dir all its nodes share."""

    url: str
    temp_dir: Path
    gcs_port: int


def _ours(sessions: set[int], temp_dir: Path | None = None) -> list[int]:
    """Live processes in one of ``sessions``, or working inside ``temp_dir``.

    Job drivers run in sessions of their own, with their working dir under the temp dir.
    """
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state, _, _, session = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:4]
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if state != "Z" and (int(session) in sessions or (temp_dir and cwd.startswith(f"{temp_dir}/"))):
            pids.append(int(entry.name))
    return pids


def _kill(sessions: set[int], temp_dir: Path | None = None) -> None:
    """SIGKILL those processes, never another cluster's, and wait until they are gone."""
    deadline = time.monotonic() + _STOP_TIMEOUT_S
    while pids := _ours(sessions, temp_dir):
        if time.monotonic() > deadline:
            raise RuntimeError(f"Ray processes {pids} survived SIGKILL")
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


def _ray_start(args: list[str], env: dict[str, str], sessions: set[int], attempts: int = 3) -> None:
    """Run ``ray start ARGS``, again if its node timed out, and record the session of each try."""
    for attempt in range(1, attempts + 1):
        # `ray start` leads a new session that its daemons and workers inherit, so teardown can
        # kill exactly this cluster; `ray stop` would stop every Ray on the machine.
        proc = subprocess.Popen([str(_BIN / "ray"), "start", *args], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        sessions.add(proc.pid)
        try:
            output, _ = proc.communicate(timeout=_START_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"ray start {args[0]} did not finish in {_START_TIMEOUT_S:.0f} s") from None
        if proc.returncode == 0:
            return
        # A node gets 30 s to appear in the GCS, which an overloaded GCS on two busy cores can
        # miss; the try's processes are killed so that the next one reuses its ports.
        if "timed out during startup" not in output or attempt == attempts:
            raise RuntimeError(f"ray start exited with {proc.returncode} (try {attempt}):\n{output[-3000:]}")
        _kill({proc.pid})


def _wait_for_nodes(url: str, n: int) -> None:
    """Block until the job server answers and the cluster has ``n`` live nodes."""
    deadline = time.monotonic() + _START_TIMEOUT_S
    alive = 0
    while time.monotonic() < deadline:
        try:
            nodes = requests.get(f"{url}/api/v0/nodes", timeout=5).json()["data"]["result"]["result"]
            alive = sum(node["state"] == "ALIVE" for node in nodes)
            if alive == n:
                return
        except (requests.RequestException, KeyError, ValueError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url}: {alive} of {n} nodes alive after {_START_TIMEOUT_S:.0f} s")


_NODE_PORTS = ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
               "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port")
_HEAD_PORTS = ("port", "ray-client-server-port", "dashboard-port")


def _node_flags(temp_dir: Path, cpus: int) -> list[str]:
    return [f"--num-cpus={cpus}", f"--temp-dir={temp_dir}", "--disable-usage-stats", "--object-store-memory=200000000",
            # 0 and 0: each worker binds a port the kernel picks, instead of Ray's fixed range.
            "--min-worker-port=0", "--max-worker-port=0"]


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """A head node (2 CPUs, job server on loopback) joined by a worker node (2 CPUs)."""
    temp_dir = Path(tempfile.mkdtemp(prefix="colorize-jobs-", dir="/tmp"))
    # The cluster gets no S3 settings or keys of its own: jobs reach S3 only with what
    # `colorize submit` passes. `python` is this virtualenv's, as on a node of the image.
    hidden = {"RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", *submit.S3_SETTINGS, *submit.AWS_CREDENTIALS}
    env = {k: v for k, v in os.environ.items() if k not in hidden}
    env.update(RAY_TMPDIR=str(temp_dir), PATH=f"{_BIN}{os.pathsep}{os.environ['PATH']}")
    common = _node_flags(temp_dir, cpus=2)
    head = dict(zip(_HEAD_PORTS + _NODE_PORTS, free_ports(len(_HEAD_PORTS + _NODE_PORTS))))
    worker = dict(zip(_NODE_PORTS, free_ports(len(_NODE_PORTS))))
    url = f"http://127.0.0.1:{head['dashboard-port']}"
    sessions: set[int] = set()
    try:
        _ray_start(["--head", "--include-dashboard=true", "--dashboard-host=127.0.0.1", *common,
                    *(f"--{flag}={port}" for flag, port in head.items())], env, sessions)
        # The head's dashboard modules start after `ray start` returns; a second node started
        # in that rush often misses its 30 s to register.
        _wait_for_nodes(url, 1)
        _ray_start([f"--address=127.0.0.1:{head['port']}", *common,
                    *(f"--{flag}={port}" for flag, port in worker.items())], env, sessions)
        _wait_for_nodes(url, 2)
        yield Cluster(url=url, temp_dir=temp_dir, gcs_port=head["port"])
    finally:
        _kill(sessions, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    write_images(folder, 16, size=32)
    return folder


@pytest.fixture(scope="module")
def trained(cluster: Cluster, images: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    """`colorize submit --wait -- train ...` on the cluster: its result and its --out."""
    out = tmp_path_factory.mktemp("train") / "run"
    result = colorize("submit", "--address", cluster.url, "--working-dir", str(ROOT), "--wait", "--",
                      "train", "--data", str(images), "--out", str(out), *TINY_TRAIN)
    return result, out


# --- jobs on the cluster -----------------------------------------------------------------------


@pytest.mark.timeout(900)
def test_a_train_job_succeeds_and_writes_its_checkpoints(cluster: Cluster, trained: tuple) -> None:
    result, out = trained
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(rf"{_JOB_ID.pattern} SUCCEEDED", result.stderr), result.stderr
    assert "epoch 1/1" in result.stdout  # the job's log, followed live
    assert list((out / "train").glob("checkpoint_*/model.pt")), sorted(out.rglob("*"))
    assert (out / "model.pt").stat().st_size > 0

    # The job ran the uploaded project folder: code, and none of .venv, .git or caches.
    uploads = [p for p in cluster.temp_dir.glob("session_2*/runtime_resources/working_dir_files/_ray_pkg_*") if p.is_dir()]
    assert uploads
    for upload in uploads:
        assert (upload / "colorize" / "submit.py").exists() and (upload / "jobs" / "train.py").exists()
        assert not {".venv", ".git", "__pycache__", ".pytest_cache"} & {p.name for p in upload.rglob("*")}


@pytest.mark.timeout(600)
def test_a_bulk_job_colourises_into_s3_with_the_keys_it_was_given(cluster: Cluster, trained: tuple, images: Path, s3) -> None:
    _, out = trained
    bucket = s3.bucket("cluster-jobs")
    result = colorize(
        "submit", "--address", cluster.url, "--working-dir", str(ROOT), "--aws-credentials", "--wait", "--",
        "run", "--input", str(images), "--output", f"{bucket}/colour", "--weights", str(out / "model.pt"),
        env=_client_env(AWS_ENDPOINT_URL=s3.endpoint),
    )

    assert result.returncode == 0, result.stderr[-3000:]
    keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket="cluster-jobs", Prefix="colour/")["Contents"]]
    assert len([k for k in keys if k.startswith("colour/images/") and k.endswith(".png")]) == 16
    assert any(k.startswith("colour/parquet/") and k.endswith(".parquet") for k in keys)
    summary = json.loads(s3.client().get_object(Bucket="cluster-jobs", Key="colour/_SUMMARY.json")["Body"].read())
    assert (summary["written"], summary["failed"]) == (16, 0)
    # The secret went to the job and nowhere visible: not in the entrypoint, not printed.
    assert "AWS_SECRET_ACCESS_KEY=***" in result.stderr
    assert s3.secret_key not in result.stdout + result.stderr
    job_id = _JOB_ID.search(result.stderr).group()
    details = submit.connect(cluster.url).get_job_info(job_id)
    assert s3.secret_key not in details.entrypoint


@pytest.mark.timeout(600)
def test_a_failing_job_reports_failed_and_its_log_says_why(cluster: Cluster, tmp_path: Path, capsys) -> None:
    result = colorize("submit", "--address", cluster.url, "--working-dir", str(ROOT), "--wait", "--",
                      "train", "--data", "/nonexistent/photos", "--out", str(tmp_path / "run"), *TINY_TRAIN)

    assert result.returncode == cli.EXIT_USAGE, result.stderr[-3000:]  # the job's own exit status
    assert re.search(rf"{_JOB_ID.pattern} FAILED after \d+ s: Job entrypoint command failed with exit code 2$",
                     result.stderr, re.MULTILINE), result.stderr
    assert "colorize train: error: /nonexistent/photos" in result.stdout  # the job's log, followed live
    job_id = _JOB_ID.search(result.stderr).group()
    capsys.readouterr()

    assert submit.jobs_logs(cluster.url, job_id) == 0
    assert "colorize train: error: /nonexistent/photos" in capsys.readouterr().out
    # Followed, the log ends in the job's outcome and exit status, as with --wait (it said nothing, exit 0).
    assert submit.jobs_logs(cluster.url, job_id, follow_log=True) == cli.EXIT_USAGE
    assert re.search(rf"^colorize jobs logs: {job_id} FAILED after \d+ s: Job entrypoint command failed with exit code 2$",
                     capsys.readouterr().err, re.MULTILINE)
    submit.jobs_status(cluster.url, job_id)
    status = capsys.readouterr().out
    assert status.splitlines()[:2] == [f"{job_id}: FAILED", "  message:    Job entrypoint command failed with exit code 2"]
    assert "  exit code:  2" in status.splitlines()
    submit.jobs_list(cluster.url)
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["ID", "STATUS", "START", "(UTC)", "ENTRYPOINT"]
    row = next(line for line in table if line.startswith(job_id))
    assert row.split()[1] == "FAILED" and row.endswith(f"--data /nonexistent/photos --out {tmp_path / 'run'} {' '.join(TINY_TRAIN)}")


@pytest.mark.timeout(300)
def test_a_command_on_a_node_joins_the_cluster_that_ray_start_left_there(cluster: Cluster, tmp_path: Path) -> None:
    """As in a shell on a head node (`ray attach`), where RAY_ADDRESS is unset.

    Told it had started a Ray of its own, `train` and `run` measured the head alone and refused
    workers or GPU actors that the autoscaler would have added nodes for.
    """
    # A `ray start` without --temp-dir records its address in $RAY_TMPDIR/ray/ray_current_cluster.
    (tmp_path / "ray").mkdir()
    shutil.copy(cluster.temp_dir / "ray_current_cluster", tmp_path / "ray")
    env = _client_env(RAY_TMPDIR=str(tmp_path))
    script = "from colorize import raycluster; import ray; print(raycluster.connect(log_to_driver=False), len(ray.nodes()))"
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)

    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["False", "2"]  # joined both nodes; not "a Ray of its own"


def test_a_command_refuses_in_one_line_a_cluster_that_ray_start_recorded_but_is_gone(tmp_path: Path) -> None:
    """With RAY_ADDRESS unset, ray.init joins the address a `ray start` recorded; where that head
    is gone (killed, out of memory), it retried for ever."""
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_ports(1)[0]}")
    script = "from colorize import raycluster; raycluster.connect(log_to_driver=False)"
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=_client_env(RAY_TMPDIR=str(tmp_path)),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert re.search(r"NoCluster: the Ray that a `ray start` on this machine recorded \([\d.]+:\d+\): no Ray cluster "
                     r"answers there \(Connection refused\); start it again, or set RAY_ADDRESS=local", result.stderr)


def test_a_ray_that_fails_to_start_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """ray.init raises a bare Exception where the node it starts times out (on a loaded machine);
    it ended `colorize run` in a traceback, exit 1. Ray itself is replaced: that cannot be made to happen."""
    import ray

    def timed_out(**_: object) -> None:
        raise Exception("The current node timed out during startup. This could happen because some of the Ray processes failed.")  # noqa: TRY002

    def mismatched(**_: object) -> None:
        raise RuntimeError("Version mismatch: The cluster was started with:\n    Ray: 2.59.0\nThis process on node 10.0.0.2 "
                           "was started with:\n    Ray: 2.60.0\n")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    for init, address, line in (
        (timed_out, "local", "colorize evaluate: error: Ray could not start in this process: The current node timed out during "
         "startup. This could happen because some of the Ray processes failed (a loaded machine); run it again"),
        (mismatched, "auto", "colorize evaluate: error: RAY_ADDRESS=auto: Version mismatch: The cluster was started with: "
         "Ray: 2.59.0 This process on node 10.0.0.2 was started with: Ray: 2.60.0"),
    ):
        monkeypatch.setattr(ray, "init", init)
        monkeypatch.setenv("RAY_ADDRESS", address)
        assert cli.main(["evaluate", "--data", str(ROOT / "samples")]) == 2
        assert capsys.readouterr().err.strip().splitlines() == [line]


@pytest.mark.timeout(600)
def test_a_running_job_can_be_stopped(cluster: Cluster, images: Path, tmp_path: Path, capsys) -> None:
    config = submit.SubmitConfig(
        address=cluster.url, working_dir=str(ROOT),
        job=("train", "--data", str(images), "--out", str(tmp_path / "run"), "--epochs", "1000", *TINY_MODEL),
    )
    assert submit.submit(config) == 0
    job_id = capsys.readouterr().out.strip()  # without --wait, stdout is just the id
    assert _JOB_ID.fullmatch(job_id)
    client = submit.connect(cluster.url)
    deadline = time.monotonic() + 300
    while client.get_job_status(job_id) == JobStatus.PENDING and time.monotonic() < deadline:
        time.sleep(0.5)
    assert client.get_job_status(job_id) == JobStatus.RUNNING

    assert submit.jobs_stop(cluster.url, job_id) == 0
    assert capsys.readouterr().out == f"{job_id}: stopping\n"
    assert submit.jobs_logs(cluster.url, job_id, follow_log=True) == submit.EXIT_JOB_STOPPED  # once the job has ended
    followed = capsys.readouterr()
    assert f"Running entrypoint for job {job_id}" in followed.out
    assert re.search(rf"^colorize jobs logs: {job_id} STOPPED", followed.err, re.MULTILINE)
    assert client.get_job_status(job_id) == JobStatus.STOPPED
    assert submit.exit_status(client.get_job_info(job_id)) == submit.EXIT_JOB_STOPPED


class _Tunnel:
    """A TCP forwarder to a local port that can be cut and opened again, as the SSH tunnel of
    `ray dashboard` or a `kubectl port-forward` drops and is started again."""

    def __init__(self, target_port: int) -> None:
        self.port = free_ports(1)[0]
        self._target = target_port
        self._open = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()

    def open(self) -> None:
        server = socket.create_server(("127.0.0.1", self.port))  # SO_REUSEADDR: the same port again
        server.settimeout(0.1)
        self._open.set()
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def cut(self) -> None:
        """Refuse new connections and break every open one."""
        self._open.clear()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def _accept(self, server: socket.socket) -> None:
        with server:
            while self._open.is_set():
                try:
                    near, _ = server.accept()
                except TimeoutError:
                    continue
                far = socket.create_connection(("127.0.0.1", self._target))
                with self._lock:
                    self._sockets += [near, far]
                for source, sink in ((near, far), (far, near)):
                    threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)


@pytest.mark.timeout(300)
def test_following_a_job_rides_out_a_dropped_tunnel(cluster: Cluster, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """One refused request ended the follow ("lost the Ray job server"), though the job ran on."""
    monkeypatch.setattr(submit, "_POLL_S", 0.5)
    client = submit.connect(cluster.url)
    job_id = client.submit_job(
        entrypoint="""python -c "import time; [(print(f'line {i}', flush=True), time.sleep(0.5)) for i in range(16)]" """
    )
    tunnel = _Tunnel(int(urlsplit(cluster.url).port))
    tunnel.open()

    def drop_while_running() -> None:
        deadline = time.monotonic() + 120
        while "line 2" not in client.get_job_logs(job_id) and time.monotonic() < deadline:
            time.sleep(0.2)
        tunnel.cut()
        time.sleep(3)  # six lines go by
        tunnel.open()

    dropper = threading.Thread(target=drop_while_running)
    dropper.start()
    info = submit.follow(submit.connect(f"http://127.0.0.1:{tunnel.port}"), job_id, "http://tunnel", submit.Redactor(()))
    dropper.join()
    tunnel.cut()

    out, err = capsys.readouterr()
    assert info.status == JobStatus.SUCCEEDED
    assert re.findall(r"^line \d+$", out, re.MULTILINE) == [f"line {i}" for i in range(16)]  # none lost, none twice
    assert "colorize: lost the Ray job server at http://tunnel" in err
    assert "colorize: reached the job server again" in err


@pytest.mark.timeout(300)
def test_a_job_waiting_for_resources_is_not_said_to_be_stopping(cluster: Cluster, capsys) -> None:
    """It printed 'stopping', and the job stayed PENDING until Ray failed it 15 minutes later."""
    config = submit.SubmitConfig(address=cluster.url, working_dir=None, num_cpus=64, job=("evaluate", "--data", "s3://b/d"))
    assert submit.submit(config) == 0
    job_id = capsys.readouterr().out.strip()
    assert submit.connect(cluster.url).get_job_status(job_id) == JobStatus.PENDING  # 64 CPUs on a cluster of 4
    assert submit.jobs_stop(cluster.url, job_id) == 0
    assert capsys.readouterr().out.startswith(f"{job_id}: still waiting for resources to start (PENDING)")


def test_the_ray_port_given_for_the_job_server_is_named(cluster: Cluster) -> None:
    """It was 'cannot reach the Ray job server (ConnectionError)', though a Ray answered there."""
    with pytest.raises(submit.ClusterError, match=r"a Ray cluster's own port \(its GCS, 6379 by default\), not its job server"):
        submit.connect(f"http://127.0.0.1:{cluster.gcs_port}")


@contextlib.contextmanager
def _serving(answer: Callable[[str, str | None], tuple[int, bytes]]) -> Iterator[str]:
    """An HTTP server on a free local port that answers each GET with ``answer(path, Authorization header)``."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
            status, body = answer(self.path, self.headers.get("Authorization"))
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def _answering(status: int, body: bytes) -> contextlib.AbstractContextManager[str]:
    """A server that answers every GET with ``status`` and ``body``."""
    return _serving(lambda path, authorization: (status, body))


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("status", "body", "fragment"),
    [(401, b"Unauthorized", "Authentication required: Unauthorized: set RAY_AUTH_TOKEN"),
     (200, b"<html>Grafana</html>", "answered, but not as a Ray job server (JSONDecodeError)"),
     (500, b"oops", "answered, but not as a Ray job server (HTTPError)"),
     (404, b"Not Found", "answered, but not as a Ray job server (HTTP 404)")],  # not "running Ray 1.9 or higher"
    ids=["token-auth", "another-service", "server-error", "not-found"],
)
def test_a_server_that_is_not_an_open_ray_job_server_is_one_error_line(status: int, body: bytes, fragment: str) -> None:
    with _answering(status, body) as url:
        result = colorize("jobs", "list", "--address", url, timeout=90)

    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"colorize jobs: error: {url}") and fragment in line, line


@pytest.mark.timeout(120)
def test_a_job_list_cut_short_by_its_reader_ends_quietly() -> None:
    """`colorize jobs list | head -2` ended in a BrokenPipeError traceback."""
    jobs = [{"type": "SUBMISSION", "submission_id": f"colorize-run-{i:05d}", "status": "SUCCEEDED",
             "entrypoint": "python -m jobs.colorize --input s3://bucket/in --output s3://bucket/out"} for i in range(5000)]
    listing = json.dumps(jobs).encode()  # about 600 kB of table: past any pipe's buffer

    def answer(path: str, authorization: str | None) -> tuple[int, bytes]:
        if path == "/api/version":
            return 200, json.dumps({"version": "4", "ray_version": "2.60.0", "ray_commit": "x"}).encode()
        return 200, listing

    with _serving(answer) as url:
        reader = subprocess.Popen([str(_BIN / "colorize"), "jobs", "list", "--address", url], cwd=ROOT, env=_client_env(),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert reader.stdout.readline().startswith(b"ID ")
        reader.stdout.close()  # as head does after its lines
        stderr = reader.stderr.read().decode()
        assert reader.wait(timeout=90) == 141, stderr
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr


_TOKEN = "colorize-test-token-0123456789abcdef0123456789"


@pytest.fixture(scope="module")
def token_cluster() -> Iterator[str]:
    """A one-node cluster with token auth (RAY_AUTH_MODE=token): its job server's URL, which
    answers only requests that carry ``_TOKEN``."""
    temp_dir = Path(tempfile.mkdtemp(prefix="colorize-token-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(RAY_TMPDIR=str(temp_dir), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=_TOKEN,
               PATH=f"{_BIN}{os.pathsep}{os.environ['PATH']}")
    ports = dict(zip(_HEAD_PORTS + _NODE_PORTS, free_ports(len(_HEAD_PORTS + _NODE_PORTS))))
    url = f"http://127.0.0.1:{ports['dashboard-port']}"
    sessions: set[int] = set()
    try:
        _ray_start(["--head", "--include-dashboard=true", "--dashboard-host=127.0.0.1", *_node_flags(temp_dir, cpus=1),
                    *(f"--{flag}={port}" for flag, port in ports.items())], env, sessions)
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{url}/api/jobs/", headers={"Authorization": f"Bearer {_TOKEN}"}, timeout=5).ok:
                    break
            time.sleep(0.5)
        else:
            raise RuntimeError(f"{url}: the job server did not answer in {_START_TIMEOUT_S:.0f} s")
        yield url
    finally:
        _kill(sessions, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("variable", ["RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"])
def test_a_token_in_the_environment_alone_reaches_a_cluster_with_token_auth(
    token_cluster: str, variable: str, tmp_path: Path
) -> None:
    (tmp_path / "token").write_text(_TOKEN)
    env = {k: v for k, v in _client_env().items() if k != "RAY_AUTH_MODE"}  # as in a shell that never set it
    without = colorize("jobs", "list", "--address", token_cluster, env=env, timeout=90)
    env[variable] = _TOKEN if variable == "RAY_AUTH_TOKEN" else str(tmp_path / "token")
    result = colorize("jobs", "list", "--address", token_cluster, env=env, timeout=90)

    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ID", "STATUS", "START", "(UTC)", "ENTRYPOINT"]
    assert without.returncode == 2 and "Authentication required" in without.stderr, without.stderr


@pytest.mark.timeout(300)
def test_a_token_with_auth_mode_disabled_is_one_error_line_that_says_so(token_cluster: str) -> None:
    result = colorize("jobs", "list", "--address", token_cluster, timeout=90,
                      env=_client_env(RAY_AUTH_MODE="disabled", RAY_AUTH_TOKEN=_TOKEN))

    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"colorize jobs: error: {token_cluster}: Authentication required: Unauthorized: Missing authentication token: "
        "set RAY_AUTH_TOKEN to the cluster's token, or RAY_AUTH_TOKEN_PATH to a file holding it; "
        "RAY_AUTH_MODE=disabled sends no token: unset it"
    ]


@pytest.mark.timeout(120)
def test_an_unreachable_address_is_one_error_line_and_exit_2() -> None:
    port = free_ports(1)[0]
    result = colorize("jobs", "list", "--address", f"http://127.0.0.1:{port}")

    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"colorize jobs: error: cannot reach the Ray job server at http://127.0.0.1:{port} (connection refused); "
        "expected the head node's dashboard address, port 8265 unless changed"
    ]


# --- submit without a cluster ------------------------------------------------------------------


def test_entrypoints_run_the_job_modules_with_shell_quoted_arguments() -> None:
    job = ("run", "--input", "s3://bucket/my photos/", "--output", "s3://bucket/out; rm -rf /")

    command = submit.entrypoint(job)

    assert command.startswith("python -m jobs.colorize ")
    assert shlex.split(command) == ["python", "-m", "jobs.colorize", *job[1:]]
    assert submit.entrypoint(("train", "--data", "d", "--out", "o")) == "python -m jobs.train --data d --out o"
    assert submit.entrypoint(("evaluate", "--data", "d")) == "python -m jobs.evaluate --data d"


@pytest.mark.parametrize("job, message", [
    ((), "no command to run"),
    (("serve", "--data", "d"), "cannot submit 'serve': expected one of train, run, evaluate"),
    (("train", "--data", "d", "--out", "o", "--epohcs", "3"), "train: unrecognized arguments: --epohcs 3"),
    (("train", "--data", "d"), "train: the following arguments are required: --out"),
    (("run", "--input", "i", "--output", "o", "--num-gpus", "0"), "run: argument --num-gpus: must be at least 1, got 0 (see colorize run --help)"),
    (("run", "--input", "samples/photos", "--output", "out"), "run --output out: a relative path, which the cluster takes inside"),
    (("train", "--data", "d", "--out", "./runs/x"), "train --out ./runs/x: a relative path"),
    (("evaluate", "--data", "d", "--out", "eval"), "evaluate --out eval: a relative path"),
])
def test_job_command_lines_are_checked_before_anything_is_sent(job: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        submit.SubmitConfig(address="http://127.0.0.1:1", job=job)


@pytest.mark.parametrize("flag", ["num_cpus", "num_gpus"])
@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf")])
def test_a_driver_reservation_must_be_a_finite_number_of_at_least_0(flag: str, value: float) -> None:
    """NaN and inf passed the check, uploaded the project and were then 'lost the Ray job server (InvalidJSONError)'."""
    with pytest.raises(ValueError, match=f"--{flag.replace('_', '-')} must be a finite number of at least 0, got {value}"):
        submit.SubmitConfig(address="http://127.0.0.1:1", job=("evaluate", "--data", "s3://b/d"), **{flag: value})


def test_the_runtime_env_passes_s3_settings_and_keys_only_when_asked() -> None:
    environ = {"AWS_ENDPOINT_URL": "http://minio:9000", "AWS_REGION": "eu-west-1", "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE",
               "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI", "AWS_EC2_METADATA_DISABLED": "true", "HOME": "/root"}
    job = ("train", "--data", "s3://b/d", "--out", "s3://b/o")

    plain = submit.runtime_env(submit.SubmitConfig(address="h:1", job=job, working_dir=str(ROOT)), environ)
    keys = submit.runtime_env(submit.SubmitConfig(address="h:1", job=job, working_dir=None, aws_credentials=True,
                                                  env=(("MY_FLAG", "1"),), pip=("rich==14.0.0",)), environ)

    assert plain["env_vars"] == {"AWS_ENDPOINT_URL": "http://minio:9000", "AWS_REGION": "eu-west-1", "PYTHONUNBUFFERED": "1"}
    assert plain["working_dir"] == str(ROOT)
    assert {".venv/", ".git/", "/data/", "/runs/", "/out/"} <= set(plain["excludes"])
    assert keys["env_vars"]["AWS_SECRET_ACCESS_KEY"] == "wJalrXUtnFEMI" and keys["env_vars"]["MY_FLAG"] == "1"
    assert "working_dir" not in keys and keys["pip"] == ["rich==14.0.0"]
    with pytest.raises(ValueError, match="AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must both be set"):
        submit.runtime_env(submit.SubmitConfig(address="h:1", job=job, aws_credentials=True), {"AWS_REGION": "x"})
    with pytest.raises(ValueError, match="expected the colorize project folder"):
        submit.runtime_env(submit.SubmitConfig(address="h:1", job=job, working_dir=str(ROOT / "cluster")), environ)


def _project(folder: Path, big: dict[str, int]) -> Path:
    """A project folder (colorize/, jobs/) with sparse files of ``big[relpath]`` MiB each."""
    for name in ("colorize/__init__.py", "jobs/__init__.py", *big):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        os.truncate(path, big.get(name, 0) * 2**20)  # sparse: takes no disk
    return folder


def test_a_working_dir_over_the_upload_limit_is_refused_before_anything_is_sent(tmp_path: Path) -> None:
    folder = _project(tmp_path, {f"ILSVRC/train/{i}.JPEG": 60 for i in range(3)} | {"notes.txt": 1})
    config = submit.SubmitConfig(address="http://127.0.0.1:1", job=("train", "--data", "s3://b/d", "--out", "s3://b/o"),
                                 working_dir=str(folder))

    # Refused before connecting (the address is unreachable), having counted 120 of ILSVRC/'s 180 MiB.
    with pytest.raises(ValueError) as refused:
        submit.submit(config)

    assert str(refused.value) == (
        f"--working-dir {folder}: at least 121.0 MiB to upload, over the job server's 100 MiB limit, 120.0 MiB of it "
        "in ILSVRC/; move that into data/, list it in .rayignore, or pass --working-dir a folder without it"
    )
    assert submit.UPLOAD_LIMIT_BYTES == DASHBOARD_CLIENT_MAX_SIZE


@pytest.mark.parametrize(("layout", "environ", "refused"), [
    ({"data/imagenet-parquet/part-0.parquet": 200}, {}, False),
    ({"scans/a.tif": 200, ".rayignore": 0}, {}, False),
    ({"scans/a.tif": 200, ".gitignore": 0}, {}, False),
    ({"scans/a.tif": 200, ".gitignore": 0}, {"RAY_RUNTIME_ENV_IGNORE_GITIGNORE": "1"}, True),
    ({"scans/a.tif": 200, "scans/.rayignore": 0}, {}, False),
    ({"model.pt": 101}, {}, True),
], ids=["data", "rayignore", "gitignore", "gitignore-ignored", "nested-rayignore", "one-big-file"])
def test_the_upload_size_counts_only_what_ray_uploads(tmp_path: Path, layout: dict, environ: dict,
                                                      refused: bool) -> None:
    folder = _project(tmp_path, layout)
    for ignore in folder.rglob(".*ignore"):
        ignore.write_text("*.tif\n" if ignore.parent.name == "scans" else "scans/\n")
    config = submit.SubmitConfig(address="h:1", job=("train", "--data", "s3://b/d", "--out", "s3://b/o"),
                                 working_dir=str(folder))

    if refused:
        with pytest.raises(ValueError, match=r"over the job server's 100 MiB limit, [\d.]+ MiB of it in (scans/|model\.pt);"):
            submit.runtime_env(config, environ)
    else:
        submit.runtime_env(config, environ)


def test_the_upload_size_counts_the_zip_headers_too(tmp_path: Path) -> None:
    """Bytes 2,000 under the limit in 30 files pack to more than it: the job server would refuse them."""
    folder = _project(tmp_path, {f"notes/{i:02d}.txt": 0 for i in range(29)} | {"blob.bin": 0})
    os.truncate(folder / "blob.bin", submit.UPLOAD_LIMIT_BYTES - 2000)
    config = submit.SubmitConfig(address="h:1", job=("train", "--data", "s3://b/d", "--out", "s3://b/o"),
                                 working_dir=str(folder))
    with pytest.raises(ValueError, match=r"over the job server's 100 MiB limit, 100.0 MiB of it in blob\.bin;"):
        submit.runtime_env(config, {})
    (folder / "blob.bin").unlink()
    submit.runtime_env(config, {})


@pytest.mark.parametrize(("job", "working_dir", "message"), [
    (("run", "--input", "samples", "--output", "/o"), True, None),
    (("train", "--data", "samples/a.png", "--out", "/o", "--init", "bundled"), True, None),
    (("run", "--input", "samples", "--output", "/o", "--weights", "bundled"), True, None),
    (("run", "--input", "data/photos", "--output", "/o"), True, "run --input data/photos: not uploaded with the job"),
    (("train", "--data", "samples", "--val", "scans", "--out", "/o"), True, "train --val scans: not uploaded with the job"),
    (("train", "--data", "photos", "--out", "/o"), True, "train --data photos: no such file or folder in --working-dir"),
    (("evaluate", "--data", "samples", "--weights", "../m.pt"), True, "evaluate --weights ../m.pt: outside --working-dir"),
    (("run", "--input", "samples", "--output", "/o"), False, "run --input samples: a relative path, but --no-working-dir"),
    (("train", "--data", "shards/train-*.parquet", "--out", "/o"), True, None),
    (("train", "--data", "data/train-*.parquet", "--out", "/o"), True,
     "train --data data/train-*.parquet: 1 of the 1 files it matches, such as data/train-0.parquet, are not uploaded"),
    # The job would have trained on the shards that went up alone, without a word.
    (("train", "--data", "shards/*.parquet", "--out", "/o"), True,
     "train --data shards/*.parquet: 1 of the 2 files it matches, such as shards/valid-9.parquet, are not uploaded"),
    (("train", "--data", "shards/val-*.parquet", "--out", "/o"), True, "shards/val-*.parquet: no file that matches it in"),
    (("run", "--input", "../project/samples", "--output", "/o"), True, "run --input ../project/samples: outside --working-dir"),
], ids=["uploaded", "uploaded-file", "bundled", "data-excluded", "rayignored", "missing", "outside", "no-working-dir", "pattern",
        "pattern-excluded", "pattern-partly-excluded", "pattern-unmatched", "back-in-by-name"])
def test_a_relative_input_must_name_something_uploaded(tmp_path: Path, job: tuple, working_dir: bool,
                                                        message: str | None) -> None:
    """Such a job was accepted, then failed on the cluster after its upload and start-up."""
    folder = _project(tmp_path / "project", {"samples/a.png": 0, "data/photos/b.png": 0, "scans/c.tif": 0, ".rayignore": 0,
                                             "shards/train-0.parquet": 0, "shards/valid-9.parquet": 0,
                                             "shards/_SUCCESS.parquet": 0, "data/train-0.parquet": 0})
    (folder / ".rayignore").write_text("scans/\nvalid-*\n")
    (tmp_path / "m.pt").touch()
    config = submit.SubmitConfig(address="h:1", job=job, working_dir=str(folder) if working_dir else None)

    if message is None:
        submit.runtime_env(config, {})
    else:
        with pytest.raises(ValueError, match=re.escape(message)):
            submit.runtime_env(config, {})


def test_a_job_on_s3_is_told_when_this_shells_aws_keys_stay_behind() -> None:
    """The job failed on the cluster with "access denied (check AWS_ACCESS_KEY_ID ...)", keys that were set here."""
    job = ("run", "--input", "s3://photos/in", "--output", "s3://photos/out")
    keys = {"AWS_ACCESS_KEY_ID": "AKIA1234", "AWS_SECRET_ACCESS_KEY": "secret"}
    assert submit.keys_left_here(job, {}, keys)
    assert submit.keys_left_here(("train", "--data=s3://b/d", "--out", "/tmp/o"), {}, keys)
    assert not submit.keys_left_here(job, {"AWS_ACCESS_KEY_ID": "AKIA1234"}, keys)  # --aws-credentials or --env sent them
    assert not submit.keys_left_here(job, {}, {})  # no keys here: the cluster's, as meant
    assert not submit.keys_left_here(("run", "--input", "/data/in", "--output", "/data/out"), {}, keys)


def test_secrets_are_redacted_in_messages_and_in_logs_that_arrive_in_pieces() -> None:
    env = {"AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI", "DB_PASSWORD": "hunter22", "AWS_REGION": "eu-west-1"}
    assert submit.describe_env(env) == "AWS_SECRET_ACCESS_KEY=*** DB_PASSWORD=*** AWS_REGION=eu-west-1"
    named = {"LICENSE_KEY": "abcd1234", "WANDB_API_KEY": "abcd1234", "KEY_FILE_PASS": "abcd1234",
             "HF_AUTH": "abcd1234", "DB_PASS": "abcd1234", "MONKEY_COUNT": "12345", "AUTHOR": "someone",
             "KEYBOARD": "qwerty", "PASSENGERS": "12345"}
    assert submit.describe_env(named) == ("LICENSE_KEY=*** WANDB_API_KEY=*** KEY_FILE_PASS=*** HF_AUTH=*** DB_PASS=*** "
                                          "MONKEY_COUNT=12345 AUTHOR=someone KEYBOARD=qwerty PASSENGERS=12345")

    redact = submit.Redactor(submit.secret_values(env))
    pieces = ["key wJalrX", "UtnFEMI ok\nprogress 50%\r", "tail hunter", "22"]
    assert "".join(redact.feed(p) for p in pieces) + redact.flush() == "key *** ok\nprogress 50%\rtail ***"


def test_settings_that_only_mention_tokens_or_auth_are_not_redacted() -> None:
    env = {"TOKENIZERS_PARALLELISM": "false", "RAY_AUTH_MODE": "token", "HF_HUB_TOKEN_CHECK": "disabled",
           "AWS_SESSION_TOKEN": "FwoGZXIvYXdz", "HF_TOKEN": "hf_abcdef", "GITHUB_TOKEN": "ghp_1234",
           "NPM_AUTH": "abcd1234"}

    assert submit.describe_env(env) == ("TOKENIZERS_PARALLELISM=false RAY_AUTH_MODE=token HF_HUB_TOKEN_CHECK=disabled "
                                        "AWS_SESSION_TOKEN=*** HF_TOKEN=*** GITHUB_TOKEN=*** NPM_AUTH=***")
    redact = submit.Redactor(submit.secret_values(env))
    line = "--out s3://b/token-tests/ (auth disabled, verbose false) ghp_1234"
    assert redact(line) == "--out s3://b/token-tests/ (auth disabled, verbose false) ***"


def test_submission_ids_are_readable_and_unique() -> None:
    now = datetime(2026, 11, 26, 6, 35, 12, tzinfo=timezone.utc)
    ids = {submit.new_submission_id("train", now) for _ in range(20)}
    assert all(re.fullmatch(r"colorize-train-20261126-063512-[0-9a-f]{4}", i) for i in ids)
    assert len(ids) > 1


def test_a_runtime_env_that_failed_to_set_up_says_why() -> None:
    """Ray's message puts pip's reason after a traceback: the one line shown must carry it."""
    message = ("runtime_env setup failed: Failed to set up runtime environment.\nTraceback (most recent call last):\n"
               '  File "ray/_private/runtime_env/pip.py", line 1, in _install_pip_packages\n'
               "RuntimeError: Failed to execute command: pip install ...\n"
               "ERROR: Could not install packages due to an OSError: [Errno 2] No such file or directory: '/x.whl'\n")
    failed = JobDetails(type="SUBMISSION", entrypoint="e", status=JobStatus.FAILED, message=message, submission_id="j")
    assert submit._outcome(failed) == ("j FAILED: runtime_env setup failed: Failed to set up runtime environment: ERROR: "
                                       "Could not install packages due to an OSError: [Errno 2] No such file or directory: '/x.whl'")
    without_pip = message.rsplit("ERROR:", 1)[0]
    assert submit._message(JobDetails(type="SUBMISSION", entrypoint="e", status=JobStatus.FAILED, message=without_pip)).endswith(
        "environment: RuntimeError: Failed to execute command: pip install ...")


def test_a_job_that_cannot_import_the_project_says_the_cluster_lacks_it() -> None:
    """A `ray start` from a Python without colorize: the job failed with "exit code 1" and no more."""
    message = ("Job entrypoint command failed with exit code 1, last available logs (truncated to 20,000 chars):\n"
               "/usr/bin/python3: Error while finding module specification for 'jobs.colorize' "
               "(ModuleNotFoundError: No module named 'jobs')\n")
    failed = JobDetails(type="SUBMISSION", entrypoint="e", status=JobStatus.FAILED, message=message, submission_id="j")
    assert submit._outcome(failed) == (
        "j FAILED: Job entrypoint command failed with exit code 1; the cluster's Python has no module 'jobs': start its "
        "Ray from the environment colorize is installed in, or use the image that cluster/Dockerfile builds")
    own = message.replace("No module named 'jobs'", "No module named 'mylib'")  # the user's own code's: not ours to explain
    assert submit._outcome(JobDetails(type="SUBMISSION", entrypoint="e", status=JobStatus.FAILED, message=own,
                                      submission_id="j")) == "j FAILED: Job entrypoint command failed with exit code 1"


def test_a_job_server_error_sent_as_a_traceback_is_told_by_its_last_line() -> None:
    answer = ("Request failed with status code 400: Traceback (most recent call last):\n"
              '  File "ray/dashboard/modules/job/job_head.py", line 1, in submit_job\n'
              "ValueError: Job with submission_id j already exists. Please use a different submission_id.\n")
    with pytest.raises(submit.ClusterError) as raised, submit._errors("http://h:8265", submit.Redactor(())):
        raise RuntimeError(answer)
    assert str(raised.value) == ("http://h:8265: ValueError: Job with submission_id j already exists. "
                                 "Please use a different submission_id")


def test_a_reader_that_leaves_is_not_a_lost_server() -> None:
    """`colorize jobs logs ID | head` printed "lost the Ray job server (broken pipe)", exit 2, not a quiet 141."""
    with pytest.raises(BrokenPipeError), submit._errors("http://h:8265", submit.Redactor(())):
        raise BrokenPipeError(32, "Broken pipe")
    with pytest.raises(submit.ClusterError, match="lost the Ray job server at http://h:8265"), \
            submit._errors("http://h:8265", submit.Redactor(())):
        raise ConnectionResetError(104, "Connection reset by peer")


def test_the_exit_status_is_the_jobs_own() -> None:
    def details(status: JobStatus, code: int | None = None) -> JobDetails:
        return JobDetails(type="SUBMISSION", entrypoint="python -m jobs.train", status=status, driver_exit_code=code)

    assert submit.exit_status(details(JobStatus.SUCCEEDED, 0)) == 0
    assert submit.exit_status(details(JobStatus.FAILED, 3)) == 3
    assert submit.exit_status(details(JobStatus.FAILED, None)) == submit.EXIT_JOB_FAILED
    assert submit.exit_status(details(JobStatus.STOPPED, -15)) == submit.EXIT_JOB_STOPPED


class _NoStreamClient:
    """A job server whose log websocket fails, as behind a proxy without websocket support."""

    def __init__(self, logs: list[str], on_poll: Callable[[], None] = lambda: None) -> None:
        self._logs = logs  # the whole log at each poll; the last one is final
        self._polls = 0
        self._on_poll = on_poll

    async def tail_job_logs(self, job_id: str):  # noqa: ANN201 - an async generator, like the SDK's
        raise RuntimeError("WebSocket connection closed unexpectedly with close code 1006")
        yield  # pragma: no cover - makes this an async generator

    def get_job_status(self, job_id: str) -> JobStatus:
        self._on_poll()
        self._polls += 1
        return JobStatus.SUCCEEDED if self._polls >= len(self._logs) else JobStatus.RUNNING

    def get_job_logs(self, job_id: str) -> str:
        return self._logs[min(self._polls, len(self._logs)) - 1]

    def get_job_info(self, job_id: str) -> JobDetails:
        return JobDetails(type="SUBMISSION", entrypoint="e", status=self.get_job_status(job_id), driver_exit_code=0)


def test_a_broken_log_stream_falls_back_to_polling(monkeypatch, capsys) -> None:
    monkeypatch.setattr(submit, "_POLL_S", 0.0)
    printed: list[tuple[str, str]] = []  # (stdout, stderr) since the poll before, at each poll
    client = _NoStreamClient(["epoch 1\n", "epoch 1\nepoch 2\n", "epoch 1\nepoch 2\ndone\n"],
                             on_poll=lambda: printed.append(capsys.readouterr()))

    info = submit.follow(client, "job", "http://h:8265", submit.Redactor(()))

    printed.append(capsys.readouterr())
    assert info.status == JobStatus.SUCCEEDED
    outs = [out for out, _ in printed]
    assert "".join(outs) == "epoch 1\nepoch 2\ndone\n"
    # Printed as the job ran: before the poll that saw it end and the final get_job_info.
    assert "epoch 2\n" in "".join(outs[:-2])
    assert "polling" in "".join(err for _, err in printed)


class _ShortStreamClient(_NoStreamClient):
    """A job server whose log websocket closes cleanly while the job still runs."""

    async def tail_job_logs(self, job_id: str):  # noqa: ANN201
        yield self._logs[0]


def test_a_log_stream_that_ends_before_the_job_is_followed_by_polling(monkeypatch, capsys) -> None:
    monkeypatch.setattr(submit, "_POLL_S", 0.0)
    monkeypatch.setattr(submit, "_SETTLE_TIMEOUT_S", 0.0)
    client = _ShortStreamClient(["epoch 1\n", "epoch 1\n", "epoch 1\nepoch 2\n", "epoch 1\nepoch 2\ndone\n"])

    info = submit.follow(client, "job", "http://h:8265", submit.Redactor(()))

    out, err = capsys.readouterr()
    assert info.status == JobStatus.SUCCEEDED and submit.exit_status(info) == 0  # not "failed" while running
    assert out == "epoch 1\nepoch 2\ndone\n"
    assert "ended before the job did" in err


def test_a_log_stream_that_ends_just_before_the_job_loses_none_of_its_last_lines(capsys) -> None:
    """The job ended within the wait for its status, and what it printed after the stream closed went unseen."""
    client = _ShortStreamClient(["epoch 1\n", "epoch 1\nepoch 2\ndone\n"])

    info = submit.follow(client, "job", "http://h:8265", submit.Redactor(()))

    assert info.status == JobStatus.SUCCEEDED
    assert capsys.readouterr() == ("epoch 1\nepoch 2\ndone\n", "")


class _ProxiedClient(_NoStreamClient):
    """A job server behind a proxy that answers 502 for a while as the head restarts, then 404 for a job it lost."""

    def __init__(self, logs: list[str], failures: list[str]) -> None:
        super().__init__(logs)
        self._failures = failures  # the SDK's error for each poll that fails, in turn

    def get_job_status(self, job_id: str) -> JobStatus:
        if self._polls and self._failures:
            raise RuntimeError(f"Request failed with status code {self._failures.pop(0)}.")
        return super().get_job_status(job_id)


def test_following_rides_out_a_proxy_s_bad_gateway_but_not_the_servers_own_errors(monkeypatch, capsys) -> None:
    monkeypatch.setattr(submit, "_POLL_S", 0.0)
    logs = ["epoch 1\n", "epoch 1\nepoch 2\n", "epoch 1\nepoch 2\ndone\n"]
    info = submit.follow(_ProxiedClient(logs, ["502: Bad Gateway", "503: "]), "job", "http://h:8265", submit.Redactor(()))
    assert info.status == JobStatus.SUCCEEDED
    out, err = capsys.readouterr()
    assert out == "epoch 1\nepoch 2\ndone\n" and "(HTTP 502 from a proxy in front of it)" in err

    with pytest.raises(submit.ClusterError, match=r"^http://h:8265: Job job does not exist$"):
        submit.follow(_ProxiedClient(logs, ["404: Job job does not exist"]), "job", "http://h:8265", submit.Redactor(()))


def test_a_job_that_ended_is_not_failed_for_a_server_gone_after(monkeypatch, capsys) -> None:
    """Its last lines were fetched through the retries: a SUCCEEDED job ended the command with 2, 5 minutes on."""
    monkeypatch.setattr(submit, "_RECONNECT_S", 0.0)
    client = _ShortStreamClient(["epoch 1\n", "epoch 1\ndone\n"])
    client.get_job_logs = lambda job_id: requests.get(f"http://127.0.0.1:{free_ports(1)[0]}", timeout=5)

    assert submit.follow(client, "job", "http://h:8265", submit.Redactor(())).status == JobStatus.SUCCEEDED
    assert capsys.readouterr().out == "epoch 1\n"


def test_following_gives_up_on_a_job_server_gone_for_good(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(submit, "_POLL_S", 0.0)
    monkeypatch.setattr(submit, "_RECONNECT_S", 0.5)
    client = _NoStreamClient(["epoch 1\n", "epoch 1\nepoch 2\n"])
    answered = client.get_job_status
    # Answers the check for an unknown id, then is gone.
    client.get_job_status = lambda job_id: (answered(job_id) if client._polls == 0 else
                                            requests.get(f"http://127.0.0.1:{free_ports(1)[0]}", timeout=5))

    with pytest.raises(submit.ClusterError, match=r"^lost the Ray job server at http://h:8265 \(connection refused\) "
                       r"for 0 s; job may still be running: colorize jobs logs job --follow --address http://h:8265$"):
        submit.follow(client, "job", "http://h:8265", submit.Redactor(()))
    assert capsys.readouterr().err.count("lost the Ray job server") == 1  # said once, not at every try


# --- the configs under cluster/ ----------------------------------------------------------------


def _pyproject(pattern: str) -> str:
    """The first group of ``pattern`` in pyproject.toml."""
    return re.search(pattern, (ROOT / "pyproject.toml").read_text()).group(1)


def _pinned_ray() -> str:
    return _pyproject(r'"ray\[[\w,]+\]==([\d.]+)"')


def _readme_blocks(section: str, language: str) -> list[str]:
    """The ``language`` code blocks under the ``## section`` heading of cluster/README.md."""
    text = (CLUSTER / "README.md").read_text().split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{language}\n(.*?)```", text, re.DOTALL)


def test_the_imagenet_recipe_writes_its_shards_where_submit_leaves_them_behind(tmp_path: Path) -> None:
    folder = _project(tmp_path, {})
    for split in ("train", "val"):
        for name in ("n01440764/a.JPEG", "b.JPEG"):
            path = folder / "data/ILSVRC/Data/CLS-LOC" / split / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"jpeg bytes")
    (recipe,) = _readme_blocks("ImageNet as Parquet shards in S3", "python")

    subprocess.run([sys.executable, "-c", recipe], cwd=folder, check=True, timeout=120)

    for split in ("train", "val"):
        assert pq.read_table(folder / f"data/imagenet-parquet/{split}/part-00000.parquet").num_rows == 2
    synced = re.search(r"aws s3 sync (\S+) ", _readme_blocks("ImageNet as Parquet shards in S3", "bash")[0]).group(1)
    assert (folder / synced / "train").is_dir()
    # Nothing the recipe reads or writes goes up with the job.
    assert sorted(p.relative_to(folder).as_posix() for p, _ in submit._upload_files(folder, {})) == [
        "colorize/__init__.py", "jobs/__init__.py"]


def test_the_documented_upload_limit_is_the_job_servers() -> None:
    limits = re.findall(r"(\d+) MiB in one upload", (CLUSTER / "README.md").read_text())
    assert limits == [str(DASHBOARD_CLIENT_MAX_SIZE // 2**20)]


def test_the_aws_config_is_a_valid_cluster_launcher_config() -> None:
    config = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())

    jsonschema.validate(config, schema)
    validate_config(prepare_config(copy.deepcopy(config)))  # with Ray's AWS defaults filled in, as `ray up` does
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    assert {t["node_config"]["InstanceType"].split(".")[0] for t in workers.values()} == {"g5", "c6i"}
    for node_type in types.values():
        assert node_type["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::")
    for name, node_type in workers.items():
        assert 0 <= node_type["min_workers"] < node_type["max_workers"] <= config["max_workers"], name
    # The schema has teeth: a misspelt key fails.
    types["ray.worker.gpu"]["min_worker"] = 0
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        jsonschema.validate(config, schema)


def test_every_ray_and_python_version_under_cluster_matches_the_project() -> None:
    ray_version = _pinned_ray()
    requires_python = SpecifierSet(_pyproject(r'requires-python\s*=\s*"([^"]+)"'))
    found_ray: set[str] = set()
    found_python: set[str] = set()
    for path in [CLUSTER / "Dockerfile", CLUSTER / "aws.yaml", *MANIFESTS]:
        text = path.read_text()
        rays = re.findall(r"rayproject/ray:(\d+\.\d+\.\d+)|-ray(\d+\.\d+\.\d+)-|rayVersion: \"?(\d+\.\d+\.\d+)", text)
        pythons = re.findall(r"-py3(\d+)\b", text)
        assert rays and pythons, f"{path.name}: names no Ray or Python version"
        found_ray.update(v for match in rays for v in match if v)
        found_python.update(f"3.{minor}" for minor in pythons)
    assert found_ray == {ray_version}
    assert len(found_python) == 1 and next(iter(found_python)) in requires_python
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc["kind"] in ("RayCluster", "RayJob"):
                spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
                assert spec["rayVersion"] == ray_version, path.name


def test_the_oldest_python_the_project_allows_can_install_every_pinned_dependency() -> None:
    """numpy, pyarrow and pillow at their pins need Python 3.11: a 3.10 floor let pip fail to resolve."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    oldest = min(SpecifierSet(project["requires-python"]).filter(f"3.{minor}" for minor in range(8, 20)))
    too_new = {}
    for line in project["dependencies"]:
        name = Requirement(line).name
        needs = importlib.metadata.metadata(name).get("Requires-Python")
        if needs and oldest not in SpecifierSet(needs):
            too_new[name] = needs
    assert not too_new, f"requires-python allows {oldest}, which these pins do not: {too_new}"


def _ray_specs(path: Path) -> list[tuple[str, dict]]:
    """(kind, document) for the RayCluster and RayJob documents in a manifest."""
    return [(d["kind"], d) for d in yaml.safe_load_all(path.read_text()) if d["kind"] in ("RayCluster", "RayJob")]


def _check_cluster_spec(spec: dict, where: str) -> None:
    """The fields KubeRay needs to build a cluster, with GPU limits and autoscaling."""
    assert re.fullmatch(r"\d+\.\d+\.\d+", spec["rayVersion"]), where
    assert spec["enableInTreeAutoscaling"] is True, where
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict), where
    assert head["template"]["spec"]["containers"][0]["image"], where
    images = {head["template"]["spec"]["containers"][0]["image"]}
    gpu_groups = 0
    for group in spec["workerGroupSpecs"]:
        name = f"{where} group {group.get('groupName')}"
        assert group["groupName"] and isinstance(group["rayStartParams"], dict), name
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], name
        container = group["template"]["spec"]["containers"][0]
        images.add(container["image"])
        limits = container["resources"]["limits"]
        gpu_groups += "nvidia.com/gpu" in limits
        if "nvidia.com/gpu" in limits:
            assert int(limits["nvidia.com/gpu"]) >= 1, name
        for pod in [head["template"]["spec"], group["template"]["spec"]]:
            assert pod["serviceAccountName"] == "colorize-s3", name
    assert gpu_groups >= 1 and len(spec["workerGroupSpecs"]) > gpu_groups, f"{where}: needs GPU and CPU groups"
    assert len(images) == 1, f"{where}: one image for every node, got {images}"


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_the_kuberay_manifests_carry_what_kuberay_needs(path: Path) -> None:
    docs = list(yaml.safe_load_all(path.read_text()))
    accounts = [d for d in docs if d["kind"] == "ServiceAccount"]
    assert [a["metadata"]["name"] for a in accounts] == ["colorize-s3"]
    assert accounts[0]["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    specs = _ray_specs(path)
    assert len(specs) == 1
    kind, doc = specs[0]
    assert doc["apiVersion"] == "ray.io/v1" and doc["metadata"]["name"]
    if kind == "RayCluster":
        _check_cluster_spec(doc["spec"], path.name)
    else:
        assert doc["spec"]["entrypoint"] and doc["spec"]["shutdownAfterJobFinishes"] is True
        assert "clusterSelector" not in doc["spec"]  # it brings a cluster of its own, to shut down
        _check_cluster_spec(doc["spec"]["rayClusterSpec"], path.name)


def test_the_rayjob_entrypoints_are_real_colorize_command_lines() -> None:
    commands = {module: command for command, module in submit.JOB_MODULES.items()}
    seen = set()
    for path in MANIFESTS:
        for kind, doc in _ray_specs(path):
            if kind != "RayJob":
                continue
            python, flag, module, *args = shlex.split(doc["spec"]["entrypoint"])
            assert (python, flag) == ("python", "-m") and module in commands, path.name
            parsed = cli.build_parser().parse_args([commands[module], *args])
            assert all(v.startswith("s3://") for k, v in vars(parsed).items() if k in ("data", "val", "out", "input", "output", "weights") and v)
            parsed.build_config(parsed)  # the config checks too: batch per worker, size per depth, formats
            seen.add(module)
    assert seen == {"jobs.train", "jobs.colorize"}


def test_the_job_modules_are_runnable_entrypoints() -> None:
    result = subprocess.run([sys.executable, "-m", "jobs.train", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: colorize train")
