"""Run colorize commands as Ray jobs on a remote cluster, through its job server.

``colorize submit --address http://HEAD:8265 -- train ...`` checks the command line here, then
hands ``python -m jobs.train ...`` to Ray's :class:`JobSubmissionClient` with a runtime env: the
project folder (code only), the S3 settings of this shell, and AWS keys only when asked for.
``colorize jobs`` lists, inspects, follows and stops jobs.

The job server is the head node's dashboard (port 8265). Secrets never go into the entrypoint,
and their values are replaced by ``***`` in everything printed here, job logs included.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import logging
import math
import os
import re
import secrets
import shlex
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import aiohttp
import requests
from ray._private.runtime_env.packaging import _get_excludes, get_excludes_from_ignore_files
from ray._raylet import Config
from ray.exceptions import AuthenticationError
from ray.job_submission import JobDetails, JobStatus, JobSubmissionClient

from colorize import errors, raycluster, storage

# colorize command -> the module a cluster runs for it (see jobs/).
JOB_MODULES = {"train": "jobs.train", "run": "jobs.colorize", "evaluate": "jobs.evaluate"}
# The job flags that name something to read (a relative one is read from the uploaded working dir).
INPUT_FLAGS = ("--data", "--val", "--init", "--input", "--weights")

# What stays behind when the project folder is uploaded (gitignore syntax, relative to it):
# environments, VCS, caches and data or outputs that belong in S3. Ray's own defaults (.git,
# .venv, venv, __pycache__) are repeated so the upload does not depend on them.
WORKING_DIR_EXCLUDES = (
    ".git/", ".venv/", "venv/", "__pycache__/", "*.egg-info/", ".pytest_cache/", ".hypothesis/",
    ".ray/", ".tmp/", "build/", "/data/", "/runs/", "/out/",
)
# The job server refuses a request body over this (Ray's DASHBOARD_CLIENT_MAX_SIZE), and the
# working dir goes up zipped in one request.
UPLOAD_LIMIT_BYTES = 100 * 1024**2
_ZIP_ENTRY_BYTES = 128  # a file's zip headers (and data descriptor, zip64 extras) beside its name; Ray stores files uncompressed

# Where S3 lives, passed to every job when set here. Keys are not: clusters should use IAM
# roles, and --aws-credentials is the explicit opt-in.
S3_SETTINGS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")
AWS_CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")

EXIT_JOB_FAILED = 1  # the job failed without an exit status of its own (e.g. runtime env setup)
EXIT_JOB_STOPPED = 130  # the job was stopped, as `colorize` returns when interrupted

# A name is secret-looking if it contains one of these, or has KEY, AUTH or PASS as a word
# (LICENSE_KEY, KEYFILE_PASS, DB_PASS...; not MONKEY, AUTHOR or PASSENGERS).
_SECRET_NAME = re.compile(
    r"SECRET|TOKEN|PASSWORD|PASSWD|PASSPHRASE|CREDENTIAL|PRIVATE|(?:^|_)(?:KEY|AUTH|PASS)S?(?:_|$)", re.IGNORECASE
)
# Settings that only mention one (RAY_AUTH_MODE, TOKENIZERS_PARALLELISM), and switch values,
# are not secrets: hiding "false" or "disabled" would blank those words out of every log line.
_PLAIN_NAME = re.compile(r"_MODE$|^TOKENIZERS_", re.IGNORECASE)
_PLAIN_VALUES = frozenset({"true", "false", "yes", "no", "on", "off", "enabled", "disabled", "none", "null"})
_MIN_SECRET_CHARS = 4  # shorter values ("1", "yes") would blank out unrelated text
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_CONNECT_TIMEOUT_S = 10.0
_POLL_S = 2.0
_SETTLE_TIMEOUT_S = 30.0  # a job whose log stream ended reaches its final status within this
# Following a job rides out a job server that stops answering for this long: the tunnel that
# `ray dashboard` or `kubectl port-forward` keeps open drops and is started again.
_RECONNECT_S = 300.0
_NETWORK_ERRORS = (requests.RequestException, ConnectionError, aiohttp.ClientError)
# What a proxy or ingress in front of a head that restarts answers in its place.
_PROXY_BETWEEN = re.compile(r"Request failed with status code (502|503|504)\b")
_ERRNO_TEXT = re.compile(r"\[Errno -?\d+\] ([^'\")]+)")
_HTTP_ERROR = re.compile(r"Request failed with status code \d+: (.*)", re.DOTALL)
_NO_MODULE = re.compile(r"No module named '((?:colorize|jobs|ray|torch|torchvision|pyarrow|PIL|boto3)\b[\w.]*)'")
_RAISED = re.compile(r"[\w.]*(Error|Exception): ")  # a traceback's last line: "OSError: [Errno 2] ..."
_T = TypeVar("_T")


class ClusterError(ValueError):
    """One-line, user-facing problem with a job or with reaching the cluster's job server."""


@dataclass(frozen=True)
class SubmitConfig:
    """One colorize command to run as a Ray job.

    ``job`` is the command line as typed after ``colorize``, e.g. ``("train", "--data", "s3://...")``.
    ``working_dir`` is the project folder uploaded with the job; None runs the colorize
    installed on the cluster. ``env`` adds environment variables; ``aws_credentials`` copies
    this shell's AWS keys into the job. ``num_cpus`` and ``num_gpus`` are reserved for the job's
    driver process only: training workers and bulk GPU actors reserve their own.
    """

    address: str
    job: tuple[str, ...]
    working_dir: str | None = "."
    pip: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    aws_credentials: bool = False
    num_cpus: float | None = None
    num_gpus: float | None = None
    wait: bool = False

    def __post_init__(self) -> None:
        check_job(self.job)
        for name, _ in self.env:
            if not _ENV_NAME.fullmatch(name):
                raise ValueError(f"--env {name!r}: expected NAME or NAME=VALUE with NAME like AWS_REGION")
        for flag, value in (("--num-cpus", self.num_cpus), ("--num-gpus", self.num_gpus)):
            if value is not None and not 0 <= value < math.inf:  # NaN too: the job server refused it as bad JSON
                raise ValueError(f"{flag} must be a finite number of at least 0, got {value}")


def check_job(job: Sequence[str]) -> None:
    """Fail with a one-line ValueError unless ``job`` is a valid train, run or evaluate command line.

    Parses it with the real ``colorize`` parser and builds the command's config, whose checks
    (a learning rate, a loss that fits the head) then fail here rather than on the cluster.
    """
    if not job:
        raise ValueError(f"no command to run: add -- and one of {', '.join(JOB_MODULES)} with its arguments")
    command = job[0]
    if command not in JOB_MODULES:
        raise ValueError(f"cannot submit {command!r}: expected one of {', '.join(JOB_MODULES)} after --")
    # Imported here because colorize.cli imports this module to register `submit` and `jobs`.
    from colorize import cli

    messages = io.StringIO()
    try:
        with contextlib.redirect_stderr(messages):
            args = cli.build_parser().parse_args(list(job))
    except SystemExit as stop:
        if stop.code == 0:  # `-- train --help` printed the job's help, which is all that was asked
            raise
        error = messages.getvalue().strip().splitlines()[-1]
        error = error.split(": error: ", 1)[-1]
        raise ValueError(f"{command}: {error} (see colorize {command} --help)") from None
    try:
        args.build_config(args)
    except ValueError as error:
        raise ValueError(f"{command}: {error} (see colorize {command} --help)") from None
    for flag in ("--out", "--output"):
        where = getattr(args, flag[2:], None)
        if where and not storage.is_s3(where) and not where.startswith(("/", "~")):
            raise ValueError(f"{command} {flag} {where}: a relative path, which the cluster takes inside the job's unpacked "
                             "copy of the working dir, where Ray deletes it; use s3:// or an absolute path")


def entrypoint(job: Sequence[str]) -> str:
    """The shell command a cluster runs for ``job``: ``python -m jobs.MODULE ARGS``, shell-quoted."""
    return shlex.join(["python", "-m", JOB_MODULES[job[0]], *job[1:]])


def new_submission_id(command: str, now: datetime | None = None) -> str:
    """A readable, unique job id such as ``colorize-train-20261126-063512-ab12`` (UTC)."""
    now = now or datetime.now(timezone.utc)
    return f"colorize-{command}-{now:%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def runtime_env(config: SubmitConfig, environ: Mapping[str, str] = os.environ) -> dict:
    """The Ray runtime env for ``config``: working dir and excludes, pip, env vars.

    S3 settings are taken from ``environ``; AWS keys too when ``config.aws_credentials``.
    """
    env_vars = {name: environ[name] for name in S3_SETTINGS if environ.get(name)}
    if config.aws_credentials:
        passed = {name: environ[name] for name in AWS_CREDENTIALS if environ.get(name)}
        if not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(passed):
            raise ValueError("--aws-credentials: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must both be set here")
        env_vars.update(passed)
    # Progress lines reach `--wait` and the dashboard as they are printed, not at exit.
    env_vars["PYTHONUNBUFFERED"] = "1"
    env_vars.update(config.env)
    result: dict = {"env_vars": env_vars}
    if config.working_dir is None and (relative := _relative_inputs(config.job)):
        flag, where = relative[0]
        raise ValueError(f"{config.job[0]} {flag} {where}: a relative path, but --no-working-dir uploads nothing for it "
                         "to name; use s3:// or an absolute path that the cluster's nodes can read")
    if config.working_dir is not None:
        folder = Path(config.working_dir).expanduser().resolve()
        if not (folder / "colorize").is_dir() or not (folder / "jobs").is_dir():
            raise ValueError(
                f"--working-dir {folder}: expected the colorize project folder (with colorize/ and jobs/), "
                "or --no-working-dir to run the colorize installed on the cluster"
            )
        check_upload_size(folder, environ)
        _check_inputs_uploaded(config.job, folder, environ)
        result.update(working_dir=str(folder), excludes=list(WORKING_DIR_EXCLUDES))
    if config.pip:
        result["pip"] = list(config.pip)
    return result


def keys_left_here(job: Sequence[str], env_vars: Mapping[str, str], environ: Mapping[str, str] = os.environ) -> bool:
    """Whether ``job`` reads or writes S3 while this shell holds AWS keys that the job is not sent.
    A job that worked here then failed on the cluster with "access denied (check AWS_ACCESS_KEY_ID ...)",
    which pointed at keys that were set, only not on the cluster."""
    uses_s3 = any(arg.startswith("s3://") or "=s3://" in arg for arg in job)
    return uses_s3 and bool(environ.get("AWS_ACCESS_KEY_ID")) and "AWS_ACCESS_KEY_ID" not in env_vars


def _relative_inputs(job: Sequence[str]) -> list[tuple[str, str]]:
    """(flag, path) for each input of ``job`` given as a relative local path (``--init bundled`` is none)."""
    from colorize import cli  # see check_job

    args = vars(cli.build_parser().parse_args(list(job)))  # check_job has parsed it once already
    return [(flag, where) for flag in INPUT_FLAGS if (where := args.get(flag[2:].replace("-", "_")))
            and not storage.is_s3(where) and not where.startswith(("/", "~")) and where != "bundled"]


def _check_inputs_uploaded(job: Sequence[str], folder: Path, environ: Mapping[str, str]) -> None:
    """Refuse a relative input path that names nothing uploaded from ``folder``: the job, run
    in its unpacked copy of ``folder``, would fail there after its upload and start-up. A
    Parquet pattern (``DIR/train-*.parquet``) must have every file it matches uploaded, or the
    job would train on some of them without a word."""
    relative = _relative_inputs(job)
    if not relative:
        return
    uploaded = {path for path, _ in _upload_files(folder, environ)}
    left_behind = ("not uploaded with the job (data/, runs/, out/ and what .gitignore or .rayignore lists stay "
                   "behind, as does an empty folder)")
    for flag, where in relative:
        target = Path(os.path.normpath(folder / where))
        # On the cluster the copy's folder has another name: ../project/x from inside project/ finds nothing.
        if Path(where).parts[0] == ".." or not target.is_relative_to(folder):
            why = f"outside --working-dir {folder}, which is all the job gets"
        elif "*" in target.name:
            from colorize import data  # here: it imports Ray Data, which the other commands need not wait for

            files = [str(p) for p in target.parent.rglob("*") if p.is_file()] if target.parent.is_dir() else []
            matched = [Path(p) for p in data.matching(files, str(target.parent), target.name)]
            missing = [p for p in matched if p not in uploaded]
            if matched and not missing:
                continue
            if missing:
                why = f"{len(missing)} of the {len(matched)} files it matches, such as {missing[0].relative_to(folder)}, are {left_behind}"
            else:
                why = f"no file that matches it in --working-dir {folder}, where the job runs"
        elif any(path == target or target in path.parents for path in uploaded):
            continue
        elif not target.exists():
            why = f"no such file or folder in --working-dir {folder}, where the job runs"
        else:
            why = left_behind
        raise ValueError(f"{job[0]} {flag} {where}: {why}; use s3:// or an absolute path that the cluster's nodes can read")


def check_upload_size(
    folder: Path, environ: Mapping[str, str] = os.environ, limit: int = UPLOAD_LIMIT_BYTES
) -> None:
    """Fail with a one-line ValueError if the files uploaded from ``folder`` add up to over ``limit`` bytes.

    Counts what Ray would pack, before it packs it, and stops counting once over the limit.
    """
    total = 0
    per_entry: dict[str, int] = {}  # bytes counted under each top-level file or folder
    for path, size in _upload_files(folder, environ):
        relative = path.relative_to(folder)
        size += _ZIP_ENTRY_BYTES + 2 * len(os.fsencode(relative))  # the name twice: local header, central directory
        total += size
        per_entry[relative.parts[0]] = per_entry.get(relative.parts[0], 0) + size
        if total > limit:
            biggest = max(per_entry, key=per_entry.__getitem__)
            shown = f"{biggest}/" if (folder / biggest).is_dir() else biggest
            raise ValueError(
                f"--working-dir {folder}: at least {total / 2**20:.1f} MiB to upload, over the job server's "
                f"{limit / 2**20:.0f} MiB limit, {per_entry[biggest] / 2**20:.1f} MiB of it in {shown}; move that "
                "into data/, list it in .rayignore, or pass --working-dir a folder without it"
            )


def _upload_files(folder: Path, environ: Mapping[str, str]) -> Iterator[tuple[Path, int]]:
    """(path, bytes) of each file Ray would upload from ``folder``.

    Skips what Ray skips: WORKING_DIR_EXCLUDES, and what a .rayignore or .gitignore in any folder on
    the way lists (.gitignore not with RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1).
    """
    # Ray's own matchers, so that this skips exactly what its packing skips.
    include_gitignore = environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1"
    stack = [(folder, [_get_excludes(folder, list(WORKING_DIR_EXCLUDES))])]
    while stack:
        parent, excludes = stack.pop()
        excludes = excludes + get_excludes_from_ignore_files(
            parent, include_gitignore=include_gitignore, logger=logging.getLogger(__name__)
        )
        for path in parent.iterdir():
            if any(excluded(path) for excluded in excludes):
                continue
            if path.is_dir():
                stack.append((path, excludes))
            elif path.is_file():
                yield path, path.stat().st_size


def secret_values(*environments: Mapping[str, str]) -> set[str]:
    """Values of secret-looking variables (keys, tokens, passwords) in ``environments``."""
    return {
        value
        for env in environments
        for name, value in env.items()
        if ((_SECRET_NAME.search(name) and not _PLAIN_NAME.search(name)) or name in AWS_CREDENTIALS)
        and len(value) >= _MIN_SECRET_CHARS
        and value.lower() not in _PLAIN_VALUES
    }


class Redactor:
    """Replaces known secret values with ``***`` in text, also in text that arrives in pieces."""

    def __init__(self, values: Iterable[str]) -> None:
        self._values = sorted(set(values), key=len, reverse=True)  # longest first: no partial leftovers
        self._pending = ""

    def __call__(self, text: str) -> str:
        for value in self._values:
            text = text.replace(value, "***")
        return text

    def feed(self, chunk: str) -> str:
        """Redacted text up to the last line break in what has arrived; the rest waits.

        A secret split across two chunks would otherwise slip through. Secrets hold no line
        breaks, and progress bars end theirs with a carriage return, so nothing waits for long.
        """
        text = self._pending + chunk
        cut = max(text.rfind("\n"), text.rfind("\r")) + 1
        self._pending = text[cut:]
        return self(text[:cut])

    def flush(self) -> str:
        text, self._pending = self._pending, ""
        return self(text)


def describe_env(env_vars: Mapping[str, str]) -> str:
    """``NAME=value`` pairs for messages, with secret values shown as ``***``."""
    redact = Redactor(secret_values(env_vars))
    return " ".join(f"{name}={redact(value)}" for name, value in env_vars.items())


def dashboard_url(address: str) -> str:
    """``http://HEAD:8265`` for a job server address; a bare ``HOST:PORT`` means http."""
    url = address.strip().rstrip("/")
    if "://" not in url:
        url = f"http://{url}"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ClusterError(
            f"--address {address!r}: expected the job server (dashboard) URL of the head node, like http://HEAD:8265"
        )
    return url


@contextlib.contextmanager
def _environ(**values: str | None) -> Iterator[None]:
    """Set (a string) or unset (None) environment variables within the block."""
    saved = {name: os.environ.get(name) for name in values}
    try:
        for name, value in values.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def connect(address: str) -> JobSubmissionClient:
    """A client for the job server at ``address``; a ClusterError in seconds if it cannot be reached.

    Sends the token in RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, if set, unless RAY_AUTH_MODE says otherwise.
    """
    url = dashboard_url(address)
    _use_token_if_given()
    try:
        # The SDK's own check waits for the TCP timeout on a silent host; any HTTP answer,
        # even 401 from a cluster with token auth, shows the server is there.
        requests.get(f"{url}/api/version", timeout=_CONNECT_TIMEOUT_S)
    except requests.RequestException as error:
        parts = urlsplit(url)
        if parts.hostname and parts.port and raycluster.is_ray_port(parts.hostname, parts.port):
            raise ClusterError(f"{url}: a Ray cluster's own port (its GCS, 6379 by default), not its job server; "
                               "use the head node's dashboard address, port 8265 unless changed") from None
        raise ClusterError(
            f"cannot reach the Ray job server at {url} ({_network_reason(error)}); "
            "expected the head node's dashboard address, port 8265 unless changed"
        ) from error
    # The SDK lets RAY_ADDRESS and RAY_API_SERVER_ADDRESS override the address it is given;
    # here the address on the command line wins.
    with _environ(RAY_ADDRESS=None, RAY_API_SERVER_ADDRESS=None), _errors(url, Redactor(())):
        try:
            return JobSubmissionClient(url)
        except (requests.HTTPError, ValueError) as error:  # requests' JSONDecodeError is a ValueError
            raise _not_a_job_server(url, type(error).__name__) from error
        except RuntimeError as error:
            # A 404 from the version check: the SDK blames an old Ray, but a Ray before 1.9
            # is rare beside a web server or a proxy's path on that port.
            if str(error).startswith("Version check returned 404"):
                raise _not_a_job_server(url, "HTTP 404") from error
            raise


def _not_a_job_server(url: str, why: str) -> ClusterError:
    """Something answered at ``url``, but not Ray's version check: another service on that port."""
    return ClusterError(f"{url} answered, but not as a Ray job server ({why}); "
                        "expected the head node's dashboard address, port 8265 unless changed")


def _use_token_if_given() -> None:
    """Set RAY_AUTH_MODE=token in this process if a token is given and the mode is not set.

    Ray's client sends a token only in that mode, and would ignore a RAY_AUTH_TOKEN set alone.
    """
    given = os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
    if not given or os.environ.get("RAY_AUTH_MODE"):
        return
    os.environ["RAY_AUTH_MODE"] = "token"
    Config.initialize("")  # Ray reads the mode once per process; read it again, as Ray itself does


def _network_reason(error: Exception) -> str:
    if isinstance(error, requests.Timeout):
        return f"no answer in {_CONNECT_TIMEOUT_S:.0f} s"
    match = _ERRNO_TEXT.search(str(error))
    return match.group(1).strip().lower() if match else type(error).__name__


@contextlib.contextmanager
def _errors(url: str, redact: Redactor) -> Iterator[None]:
    """Re-raise the SDK's and the network's failures as one-line ClusterErrors about ``url``."""
    try:
        yield
    except BrokenPipeError:  # stdout's reader left (| head): not the server, and the caller says so quietly
        raise
    except _NETWORK_ERRORS as error:
        raise ClusterError(f"lost the Ray job server at {url} ({_network_reason(error)})") from error
    except AuthenticationError as error:  # HTTP 401 or 403 from a cluster with token auth, or a bad token file
        mode = os.environ.get("RAY_AUTH_MODE", "")
        hint = f"; RAY_AUTH_MODE={mode} sends no token: unset it" if mode and mode.lower() != "token" else ""
        raise ClusterError(
            f"{url}: {errors.first_line(error.message).rstrip(':. ')}: set RAY_AUTH_TOKEN to the cluster's token, "
            f"or RAY_AUTH_TOKEN_PATH to a file holding it{hint}"
        ) from error
    except RuntimeError as error:  # what the SDK raises for an HTTP error answer
        match = _HTTP_ERROR.match(str(error))
        body = match.group(1) if match else str(error)
        if body.lstrip().startswith("Traceback"):  # the server's own exception, formatted: its last line says what
            body = next((line for line in reversed(body.splitlines()) if line.strip()), body)
        message = errors.first_line(body).rstrip(".") or type(error).__name__
        if message.startswith("Maximum request body size"):  # the packed working dir, over the limit all the same
            message += "; leave big files out of --working-dir (.rayignore, or data/)"
        raise ClusterError(redact(f"{url}: {message}")) from error


def submit(config: SubmitConfig) -> int:
    """Submit ``config.job``; with ``config.wait`` follow its log and return its exit status.

    Without waiting, prints the submission id on stdout and returns 0. Waiting, the job's log
    goes to stdout and the status is 0 on success, the job's own exit status on failure (or
    EXIT_JOB_FAILED), EXIT_JOB_STOPPED when it was stopped.
    """
    env = runtime_env(config)
    redact = Redactor(secret_values(os.environ, env["env_vars"]))
    command = entrypoint(config.job)
    job_id = new_submission_id(config.job[0])
    client = connect(config.address)
    url = dashboard_url(config.address)
    where = f"with {env['working_dir']}" if "working_dir" in env else "with the colorize installed there"
    _status(redact(f"submitting {job_id} to {url} {where}: {command}"))
    _status(redact(f"environment: {describe_env(env['env_vars'])}"))
    if keys_left_here(config.job, env["env_vars"]):
        _status("note: this shell's AWS keys stay here; the job reads s3:// with the cluster's own credentials "
                "(an instance profile), or with this shell's if you add --aws-credentials")
    # Ray's default excludes are part of WORKING_DIR_EXCLUDES; clearing them here only stops
    # Ray warning that each is excluded now.
    with _environ(RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES=""), _errors(url, redact):
        client.submit_job(
            entrypoint=command,
            submission_id=job_id,
            runtime_env=env,
            metadata={"colorize_command": config.job[0]},
            entrypoint_num_cpus=config.num_cpus,
            entrypoint_num_gpus=config.num_gpus,
        )
    if not config.wait:
        print(job_id)
        _status(f"follow it with: colorize jobs logs {job_id} --follow --address {url}")
        return 0
    _status(f"following {job_id}; Ctrl-C stops following, not the job")
    return _follow_to_end(client, job_id, url, redact, "submit")


def _follow_to_end(client: JobSubmissionClient, job_id: str, url: str, redact: Redactor, command: str) -> int:
    """Print a job's log until it ends, then its outcome; return its exit status (EXIT_JOB_STOPPED on Ctrl-C).

    ``command`` ("submit", "jobs logs") names the command in the status lines."""
    try:
        info = follow(client, job_id, url, redact)
    except KeyboardInterrupt:
        _status(f"stopped following; {job_id} keeps running (colorize jobs stop {job_id} --address {url})", command)
        return EXIT_JOB_STOPPED
    _status(redact(_outcome(info)), command)
    return exit_status(info)


def exit_status(info: JobDetails) -> int:
    """0 for a job that succeeded, its own exit status (or EXIT_JOB_FAILED) for one that failed."""
    if info.status == JobStatus.SUCCEEDED:
        return 0
    if info.status == JobStatus.STOPPED:
        return EXIT_JOB_STOPPED
    code = info.driver_exit_code
    return code if code and code > 0 else EXIT_JOB_FAILED


def follow(client: JobSubmissionClient, job_id: str, url: str, redact: Redactor) -> JobDetails:
    """Print the job's log to stdout as it grows until the job ends; returns its final details.

    Streams over the job server's websocket; where that breaks off (a proxy without websocket
    support, a dropped connection), polls the whole log instead and prints what is new.
    """
    written = 0

    def write(text: str) -> None:
        nonlocal written
        sys.stdout.write(redact.feed(text))
        sys.stdout.flush()
        written += len(text)

    async def stream() -> None:
        async for chunk in client.tail_job_logs(job_id):
            write(chunk)

    def patiently(call: Callable[[str], _T]) -> _T:
        return _reconnecting(lambda: call(job_id), url, job_id)

    def poll(why: str) -> None:
        print(f"colorize: the log stream {why}; polling every {_POLL_S:.0f} s instead", file=sys.stderr, flush=True)
        while not patiently(client.get_job_status).is_terminal():
            write(patiently(client.get_job_logs)[written:])
            time.sleep(_POLL_S)
        write(patiently(client.get_job_logs)[written:])

    with _errors(url, redact):
        client.get_job_info(job_id)  # an unknown id is an error here, not a broken stream
        try:
            asyncio.run(stream())
        except (RuntimeError, aiohttp.ClientError) as error:
            poll(f"broke off ({error})")
        deadline = time.monotonic() + _SETTLE_TIMEOUT_S
        while not (info := patiently(client.get_job_info)).status.is_terminal() and time.monotonic() < deadline:
            time.sleep(0.2)
        if not info.status.is_terminal():
            # The stream closed cleanly before the job ended (the head lost the driver node's log
            # agent): follow the rest by polling rather than report a running job as failed.
            poll("ended before the job did")
            info = patiently(client.get_job_info)
        else:  # what the job printed after a stream that closed cleanly before it ended, if the server still answers
            with contextlib.suppress(*_NETWORK_ERRORS):
                write(client.get_job_logs(job_id)[written:])
        sys.stdout.write(redact.flush())
    return info


def _reconnecting(call: Callable[[], _T], url: str, job_id: str) -> _T:
    """``call()``, tried again every _POLL_S while the job server does not answer, for up to _RECONNECT_S.

    A follower reaches the server through a tunnel (`ray dashboard`'s SSH, `kubectl
    port-forward`) that drops now and then; one refused request ended hours of following, though
    the job ran on. Says on stderr when the server went and when it came back."""
    lost_since = None
    while True:
        try:
            result = call()
        except (*_NETWORK_ERRORS, RuntimeError) as error:  # the SDK's RuntimeError: an HTTP error answer
            proxy = _PROXY_BETWEEN.match(str(error)) if isinstance(error, RuntimeError) else None
            if isinstance(error, RuntimeError) and proxy is None:
                raise  # the job server's own answer: an unknown job, say
            reason = f"HTTP {proxy.group(1)} from a proxy in front of it" if proxy else _network_reason(error)
            if lost_since is None:
                lost_since = time.monotonic()
                print(f"colorize: lost the Ray job server at {url} ({reason}); trying again every {_POLL_S:.0f} s "
                      f"for up to {_RECONNECT_S:.0f} s (the job itself runs on)", file=sys.stderr, flush=True)
            elif time.monotonic() - lost_since >= _RECONNECT_S:
                raise ClusterError(
                    f"lost the Ray job server at {url} ({reason}) for {_RECONNECT_S:.0f} s; {job_id} may still be "
                    f"running: colorize jobs logs {job_id} --follow --address {url}"
                ) from error
            time.sleep(_POLL_S)
            continue
        if lost_since is not None:
            print(f"colorize: reached the job server again after {time.monotonic() - lost_since:.0f} s",
                  file=sys.stderr, flush=True)
        return result


def _outcome(info: JobDetails) -> str:
    seconds = f" after {(info.end_time - info.start_time) / 1000:.0f} s" if info.end_time and info.start_time else ""
    line = f"{info.submission_id or info.job_id} {info.status}{seconds}"
    if info.status == JobStatus.FAILED and info.message:
        line += f": {_message(info)}"
    return line


def _message(info: JobDetails) -> str:
    """The job server's message about a job in one line, without the log tail Ray appends.

    A runtime env that failed to set up (a --pip that would not install) says why only deep in
    its message, after a traceback: that line is added.
    """
    if not info.message:
        return "-"
    line = errors.first_line(info.message).split(", last available logs")[0]
    if line.startswith("runtime_env setup failed"):
        lines = [text.strip() for text in info.message.splitlines()[1:] if text.strip()]
        why = [text for text in lines if text.startswith("ERROR:")] or [text for text in lines if _RAISED.match(text)]
        if why:
            line = f"{line.rstrip('.')}: {why[-1]}"
    missing = _NO_MODULE.search(info.message)
    if missing and line != "-":
        # A `ray start` run from a Python without the project ("No module named 'jobs'"): the
        # job's exit code 1 said nothing of it.
        line = (f"{line.rstrip('.')}; the cluster's Python has no module {missing.group(1)!r}: start its Ray from "
                "the environment colorize is installed in, or use the image that cluster/Dockerfile builds")
    return line or "-"


def _status(message: str, command: str = "submit") -> None:
    print(f"colorize {command}: {message}", file=sys.stderr, flush=True)


def _utc(ms: int | None, suffix: str = "") -> str:
    """A job server time (ms since the epoch) in UTC, or "-" for none yet."""
    if not ms:
        return "-"
    return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M:%S") + suffix


def _session(address: str) -> tuple[JobSubmissionClient, str, Redactor]:
    """A client for the job server at ``address``, its URL, and a redactor of this shell's secrets."""
    return connect(address), dashboard_url(address), Redactor(secret_values(os.environ))


def jobs_list(address: str) -> int:
    """Print a table of the cluster's jobs, oldest first: id, status, start (UTC), entrypoint."""
    client, url, redact = _session(address)
    with _errors(url, redact):
        jobs = sorted(client.list_jobs(), key=lambda j: j.start_time or 0)
    rows = [("ID", "STATUS", "START (UTC)", "ENTRYPOINT")]
    # A driver that connected by itself lists its command line as given, newlines too: one row each all the same.
    rows += [(j.submission_id or j.job_id or "-", str(j.status), _utc(j.start_time), " ".join(j.entrypoint.split()))
             for j in jobs]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print(redact("  ".join([*(cell.ljust(w) for cell, w in zip(row, widths)), row[3]])))
    return 0


def jobs_status(address: str, job_id: str) -> int:
    """Print one job's status, timing, exit status and entrypoint."""
    client, url, redact = _session(address)
    with _errors(url, redact):
        info = client.get_job_info(job_id)
    lines = [
        f"{job_id}: {info.status}",
        f"  message:    {_message(info)}",
        f"  started:    {_utc(info.start_time, ' UTC')}",
        f"  ended:      {_utc(info.end_time, ' UTC')}",
        f"  exit code:  {'-' if info.driver_exit_code is None else info.driver_exit_code}",
        f"  entrypoint: {info.entrypoint}",
    ]
    print(redact("\n".join(lines)))
    return 0


def jobs_logs(address: str, job_id: str, follow_log: bool = False) -> int:
    """Print a job's log so far; with ``follow_log``, keep printing until the job ends."""
    client, url, redact = _session(address)
    if follow_log:  # then the job's outcome and exit status, as `submit --wait`: a script following a job learns how it ended
        return _follow_to_end(client, job_id, url, redact, "jobs logs")
    with _errors(url, redact):
        sys.stdout.write(redact(client.get_job_logs(job_id)))
    return 0


def jobs_stop(address: str, job_id: str) -> int:
    """Ask the cluster to stop a job (SIGTERM, then SIGKILL after Ray's grace period)."""
    client, url, redact = _session(address)
    with _errors(url, redact):
        if client.stop_job(job_id):
            if client.get_job_status(job_id) == JobStatus.PENDING:  # no driver yet, for Ray to stop
                print(f"{job_id}: still waiting for resources to start (PENDING); Ray's stop waits with it, and a job "
                      "that cannot start fails after 15 minutes (RAY_JOB_START_TIMEOUT_SECONDS)")
            else:
                print(f"{job_id}: stopping")
        else:
            print(f"{job_id}: not running ({client.get_job_status(job_id)})")
    return 0


# --- the `submit` and `jobs` commands --------------------------------------------------------


def _env_var(text: str) -> tuple[str, str]:
    """``NAME=VALUE``, or ``NAME`` for this shell's value (so secrets stay off the command line)."""
    name, sep, value = text.partition("=")
    if not sep:
        if name not in os.environ:
            raise argparse.ArgumentTypeError(f"{name} is not set here; pass {name}=VALUE")
        value = os.environ[name]
    return name, value


def _add_address(p: argparse.ArgumentParser) -> None:
    default = os.environ.get("RAY_API_SERVER_ADDRESS")
    p.add_argument(
        "--address", default=default, required=default is None,
        help="the cluster's job server, the head node's dashboard: http://HEAD:8265 "
        "(default: $RAY_API_SERVER_ADDRESS; wins over $RAY_ADDRESS)",
    )


def _add_submit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "submit",
        help="run train, run or evaluate as a job on a Ray cluster",
        usage="colorize submit --address URL [options] -- {train,run,evaluate} ARGS...",
        description="Run a colorize command on a Ray cluster as a Ray job. Everything after -- is the command, "
        "checked here before anything is sent. The project folder goes with the job, so the cluster runs "
        "this code; paths in the command are read on the cluster, so use s3:// for data and outputs. "
        "Exit status: without --wait 0 once submitted (the id is printed); with --wait the job's: 0 "
        "succeeded, its own non-zero status (1 if it has none) failed, 130 stopped; 2 bad arguments or "
        "unreachable server.",
    )
    _add_address(p)
    p.add_argument("--working-dir", default=".",
                   help="project folder uploaded with the job (default: .); .venv, .git, data/, runs/, out/ and "
                   "caches stay behind")
    p.add_argument("--no-working-dir", dest="working_dir", action="store_const", const=None,
                   help="upload nothing: run the colorize installed in the cluster's image")
    p.add_argument("--pip", action="append", default=[], metavar="REQUIREMENT",
                   help="extra pip requirement installed at job start, repeatable (better: bake it into the image)")
    p.add_argument("--env", action="append", default=[], type=_env_var, metavar="NAME[=VALUE]",
                   help="environment variable for the job, repeatable; NAME alone passes its value here. "
                   "AWS_ENDPOINT_URL(_S3), AWS_REGION and AWS_DEFAULT_REGION are passed when set")
    p.add_argument("--aws-credentials", action="store_true",
                   help="pass AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN from here (they "
                   "show in the job's runtime env on the dashboard; an IAM role on the cluster is better)")
    p.add_argument("--num-cpus", type=float,
                   help="CPUs reserved for the job's driver process (default: 0)")
    p.add_argument("--num-gpus", type=float,
                   help="GPUs reserved for the job's driver process (default: 0); `train --gpu` and "
                   "`run --num-gpus` reserve GPUs for their workers themselves")
    p.add_argument("--wait", action="store_true", help="follow the job's log and exit with its outcome")
    p.add_argument("job", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    p.set_defaults(handler=_submit)


def _submit(args: argparse.Namespace) -> int:
    _quiet_ray()
    job = args.job[1:] if args.job[:1] == ["--"] else args.job
    return submit(
        SubmitConfig(
            address=args.address,
            job=tuple(job),
            working_dir=args.working_dir,
            pip=tuple(args.pip),
            env=tuple(args.env),
            aws_credentials=args.aws_credentials,
            num_cpus=args.num_cpus,
            num_gpus=args.num_gpus,
            wait=args.wait,
        )
    )


def _add_jobs(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("jobs", help="list, inspect, follow and stop jobs on a Ray cluster",
                       description="Jobs on a Ray cluster, submitted with `colorize submit` or otherwise.")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    _add_address(actions.add_parser("list", help="every job: id, status, start time, entrypoint"))
    for action, help_text in (
        ("status", "one job's status, times, exit code and entrypoint"),
        ("logs", "a job's log (stdout and stderr of its driver)"),
        ("stop", "stop a running job"),
    ):
        q = actions.add_parser(action, help=help_text)
        q.add_argument("id", help="submission id, e.g. colorize-train-20261126-063512-ab12")
        if action == "logs":
            q.add_argument("--follow", "-f", action="store_true",
                           help="keep printing until the job ends, then exit with its outcome as `submit --wait` does")
        _add_address(q)
    p.set_defaults(handler=_jobs)


def _jobs(args: argparse.Namespace) -> int:
    _quiet_ray()
    if args.action == "list":
        return jobs_list(args.address)
    if args.action == "status":
        return jobs_status(args.address, args.id)
    if args.action == "logs":
        return jobs_logs(args.address, args.id, follow_log=args.follow)
    return jobs_stop(args.address, args.id)


def _quiet_ray() -> None:
    """Keep Ray's client-side INFO lines (package uploads, websocket closes) out of the output."""
    # The job SDK's modules set their own loggers to INFO, so the parent's level is not enough.
    for name in ("ray", "ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk"):
        logging.getLogger(name).setLevel(logging.WARNING)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register the ``submit`` and ``jobs`` commands on the ``colorize`` parser's subcommands."""
    _add_submit(sub)
    _add_jobs(sub)
