"""The command line as a user meets it: one clear error line for bad input, real exit codes."""

from __future__ import annotations

import argparse
import http.server
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from colorize import cli, errors, storage
from colorize.cli import build_parser
from tests.helpers import free_ports, output_held_elsewhere, write_images

REPO = Path(__file__).resolve().parent.parent
COLORIZE = [sys.executable, "-m", "colorize.cli"]
UNREACHABLE = "http://127.0.0.1:9"  # the discard port: nothing listens there


def colorize(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*COLORIZE, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)


def assert_one_error_line(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


@pytest.mark.parametrize("command", ["run", "train", "evaluate", "probe"])
def test_help_explains_every_flag(command: str) -> None:
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser = subparsers.choices[command]
    undocumented = [a.option_strings for a in parser._actions if a.option_strings and not a.help]
    assert not undocumented
    result = colorize(command, "--help")
    assert result.returncode == 0 and f"colorize {command}" in result.stdout


def test_the_readmes_name_every_flag_of_every_command() -> None:
    docs = (REPO / "README.md").read_text() + (REPO / "cluster" / "README.md").read_text()
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    unnamed = {
        command: [flag for action in parser._actions for flag in action.option_strings
                  if flag.startswith("--") and flag != "--help" and not re.search(re.escape(flag) + r"(?![\w-])", docs)]
        for command, parser in subparsers.choices.items()
    }
    assert not any(unnamed.values()), unnamed


@pytest.mark.parametrize(
    ("argv", "error"),
    [(["run", "--input", "a", "--output", "o", "--weigths", "w.pt"],
      "colorize run: error: unrecognized arguments: --weigths w.pt (--weigths: did you mean --weights?)"),
     (["run", "--input", "a", "--ouptut", "o"],
      "colorize run: error: the following arguments are required: --output (--ouptut: did you mean --output?)"),
     (["evaluate", "--data", "d", "--output", "o"], "colorize evaluate: error: unrecognized arguments: --output o (--output: did you mean --out?)"),
     (["run", "--input", "a", "--out", "o", "--flurb"], "colorize run: error: unrecognized arguments: --flurb (--flurb is not one of its flags)")],
)
def test_a_mistyped_flag_is_named_by_the_command_it_was_given_to(argv: list[str], error: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[-1] == error and lines[0].startswith(f"usage: colorize {argv[0]} ")


def test_jobs_entrypoints_are_the_same_commands() -> None:
    for module, flag in (("jobs.train", "--epochs"), ("jobs.colorize", "--max-pixels"), ("jobs.evaluate", "--weights")):
        result = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=REPO, timeout=120)
        assert result.returncode == 0 and flag in result.stdout, module


def test_the_command_line_imports_no_torch() -> None:
    """`submit` and `jobs` parse a job's command before sending it: torch made that 5 s of 8."""
    code = "import sys, colorize.cli; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert (result.returncode, result.stdout.strip()) == (0, "[]"), result.stderr[-2000:]


def test_train_on_a_missing_path(tmp_path: Path) -> None:
    assert_one_error_line(colorize("train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")), "nope", "no such")


def test_train_on_an_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert_one_error_line(colorize("train", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "o")), "no image files")


def test_train_with_an_unknown_model(tmp_path: Path) -> None:
    result = colorize("train", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--model", "gan")
    assert_one_error_line(result, "--model", "gan")


def test_train_with_a_model_size_that_does_not_divide(tmp_path: Path) -> None:
    write_images(tmp_path / "d", 2)
    result = colorize("train", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "o"), "--image-size", "20")
    assert_one_error_line(result, "--image-size 20", "--depth 3")


def test_train_init_refuses_flags_that_change_the_models_shape(tmp_path: Path) -> None:
    write_images(tmp_path / "d", 2)
    result = colorize("train", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "o"), "--init", "bundled", "--depth", "3")
    assert_one_error_line(result, "--init bundled fixes the model's architecture; leave out --depth 3 (it has 4)")
    picture = next((tmp_path / "d").rglob("*.jpg"))
    result = colorize("train", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "o"), "--init", str(picture))
    assert_one_error_line(result, str(picture), "not a colorize weights file")


def test_train_refuses_workers_the_ray_it_starts_can_never_place(tmp_path: Path) -> None:
    write_images(tmp_path / "d", 4)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # no cluster to join: train starts its own
    result = subprocess.run(
        [*COLORIZE, "train", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "o"), "--num-workers", "2",
         "--cpus-per-worker", "64"],
        capture_output=True, text=True, timeout=240, env=env, cwd=REPO,
    )
    assert_one_error_line(result, "need 129 CPUs")
    assert not (tmp_path / "o").exists()


def test_train_against_unreachable_s3(tmp_path: Path) -> None:
    result = colorize("train", "--data", "s3://bucket/data", "--out", str(tmp_path / "o"), "--s3-endpoint", UNREACHABLE)
    assert_one_error_line(result, "s3://bucket/data", "cannot reach")


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [(["run", "--input", "a", "--input", "b", "--output", "o"], "--input was given twice"),
     (["train", "--data", "d", "--out", "o", "--lr", "0.1", "--lr", "0.2"], "--lr was given twice"),
     (["run", "--input", "a", "--output", "o", "--batch-size", "abc"], "expected a whole number, got 'abc'"),
     (["run", "--input", "a", "--output", "o", "--temperature", "warm"], "expected a number, got 'warm'"),
     (["run", "--input", "a", "--output", "o", "--saturation", "-1"], "must be in [0, 4], got -1"),
     (["evaluate", "--data", "d", "--saturation", "nan"], "must be in [0, 4], got nan"),
     (["run", "--input", "a", "--output", "o", "--gpu", "--actors", "2"], "argument --actors: not allowed with argument --gpu")],
    ids=["input-twice", "lr-twice", "not-a-number", "temperature-not-a-number", "saturation-negative", "saturation-nan",
         "cpu-actors-with-gpus"],
)
def test_flags_refuse_a_second_value_and_say_what_they_expected(argv: list[str], fragment: str, capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(argv)
    assert exited.value.code == 2
    assert fragment in capsys.readouterr().err


@pytest.mark.parametrize("command", [["run", "--input", "a", "--output", "o"], ["evaluate", "--data", "d"]], ids=["run", "evaluate"])
def test_flip_averaging_is_off_unless_asked_for(command: list[str]) -> None:
    parser = build_parser()
    for extra, expected in (([], False), (["--flip-average"], True)):
        args = parser.parse_args([*command, *extra])
        assert args.build_config(args).flip_average is expected


@pytest.mark.parametrize("command", [["run", "--input", "a", "--output", "o"], ["evaluate", "--data", "d"]], ids=["run", "evaluate"])
def test_saturation_is_the_models_own_unless_asked_for(command: list[str]) -> None:
    parser = build_parser()
    for extra, expected in (([], None), (["--saturation", "1.6"], 1.6), (["--saturation", "0"], 0.0)):
        args = parser.parse_args([*command, *extra])
        assert args.build_config(args).saturation == expected


def test_run_refuses_model_actors_the_ray_it_starts_can_never_place(tmp_path: Path) -> None:
    write_images(tmp_path / "in", 2)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # no cluster to join: run starts its own
    result = subprocess.run(
        [*COLORIZE, "run", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--actors", "10000"],
        capture_output=True, text=True, timeout=240, env=env, cwd=REPO,
    )
    assert_one_error_line(result, "10000 model actor(s) x 0.25 CPU", "lower --actors")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("command", "address", "why"), [
    ("run", "127.0.0.1:9", "no Ray cluster answers there"), ("train", "ray://127.0.0.1:9", "no Ray cluster answers there"),
    ("evaluate", "head-node", "not HOST:PORT"), ("evaluate", "ray://127.0.0.1:9", "a Ray Client address"),
    ("evaluate", "http://127.0.0.1:9", "a job server's URL, to which jobs are sent"),  # was 'no Ray cluster answers there'
])
def test_a_ray_address_where_no_cluster_answers_is_one_error_line(tmp_path: Path, command: str, address: str, why: str) -> None:
    """RAY_ADDRESS=127.0.0.1:9 retried for ever ('Failed to get cluster ID from GCS server'); Ray
    Data's pipelines of run and evaluate failed in a traceback through a Ray Client (ray://)."""
    write_images(tmp_path / "in", 2)
    paths = {"run": ["--input", "--output"], "train": ["--data", "--out"], "evaluate": ["--data", "--out"]}[command]
    argv = [command, paths[0], str(tmp_path / "in"), paths[1], str(tmp_path / "out")]
    result = subprocess.run([*COLORIZE, *argv], capture_output=True, text=True, timeout=120, cwd=REPO,
                            env={**os.environ, "RAY_ADDRESS": address})
    assert_one_error_line(result, f"RAY_ADDRESS={address}: {why}")
    assert not (tmp_path / "out").exists()


def test_a_ray_address_where_another_server_answers_is_one_error_line(tmp_path: Path) -> None:
    """RAY_ADDRESS=HOST:8265 (the dashboard, for `submit`) took connections, and ray.init retried for ever."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        address = f"127.0.0.1:{server.server_address[1]}"
        result = subprocess.run([*COLORIZE, "run", "--input", str(REPO / "samples"), "--output", str(tmp_path / "out")],
                                capture_output=True, text=True, timeout=120, cwd=REPO, env={**os.environ, "RAY_ADDRESS": address})
    finally:
        server.shutdown()
    assert_one_error_line(result, f"RAY_ADDRESS={address}: something answers there, but not Ray")


@pytest.mark.parametrize(("command", "flags"), [("run", ("--input", "--output")), ("train", ("--data", "--out"))])
def test_a_second_job_into_a_folder_in_use_is_refused_and_touches_nothing(tmp_path: Path, command: str, flags: tuple[str, str]) -> None:
    """Two at once deleted each other's unfinished files (run) and checkpoints (train)."""
    write_images(tmp_path / "in", 2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "_CONFIG.json").write_text("{ half written")  # read only under the lock: it is the other run's
    with output_held_elsewhere(out) as holder:
        result = colorize(command, flags[0], str(tmp_path / "in"), flags[1], str(out))
    assert_one_error_line(result, f"{out}: in use by another run (pid {holder.pid} on ", f"one run per {flags[1]} at a time")
    assert sorted(p.name for p in out.iterdir()) == [".colorize-lock", "_CONFIG.json"]


@pytest.mark.parametrize(("command", "flags"), [("run", ("--input", "--output")), ("train", ("--data", "--out"))])
def test_a_second_job_into_an_s3_prefix_in_use_is_refused_and_touches_nothing(
        tmp_path: Path, s3, command: str, flags: tuple[str, str]) -> None:
    """On S3 nothing stopped a second job: one's --overwrite deleted all that the other wrote."""
    write_images(tmp_path / "in", 2)
    out = f"{s3.bucket('in-use')}/{command}"
    fs, path = storage.resolve(out, s3.settings)
    with storage.output_lock(fs, path, out, flags[1], s3.settings) as held:
        held.acquire()
        result = colorize(command, flags[0], str(tmp_path / "in"), flags[1], out, "--s3-endpoint", s3.endpoint)
        assert [i.base_name for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))] == [storage.LOCK_FILE]
    assert_one_error_line(result, f"{out}: in use by another run (pid {os.getpid()} on ", f"one run per {flags[1]} at a time")


def test_run_on_a_missing_input(tmp_path: Path) -> None:
    result = colorize("run", "--input", str(tmp_path / "nope"), "--output", str(tmp_path / "out"))
    assert_one_error_line(result, "no such file")
    assert not (tmp_path / "out").exists()


def test_run_to_unreachable_s3_writes_nothing(tmp_path: Path) -> None:
    write_images(tmp_path / "in", 2)
    result = colorize("run", "--input", str(tmp_path / "in"), "--output", "s3://out/x", "--s3-endpoint", UNREACHABLE)
    assert_one_error_line(result, "s3://out/x", "cannot reach")


def test_run_from_unreachable_s3_writes_nothing(tmp_path: Path) -> None:
    result = colorize("run", "--input", "s3://in/x", "--output", str(tmp_path / "out"), "--s3-endpoint", UNREACHABLE)
    assert_one_error_line(result, "s3://in/x", "cannot reach")
    assert not (tmp_path / "out").exists()


def test_a_rerun_with_nothing_to_do_needs_no_ray(ray_cluster: str, tmp_path: Path) -> None:
    """It started one (12-40 s) only to count what was done: here RAY_ADDRESS names no Ray at all."""
    from colorize.pipeline import BulkConfig, run

    write_images(tmp_path / "in", 3)
    run(BulkConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out")))
    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{free_ports(1)[0]}"}
    result = subprocess.run([*COLORIZE, "run", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "3 inputs: 0 written, 0 failed, 3 skipped" in result.stderr


def test_run_with_bad_credentials(tmp_path: Path, s3) -> None:
    bucket = s3.bucket("creds")
    env = {**os.environ, "AWS_SECRET_ACCESS_KEY": "wrong"}
    result = subprocess.run(
        [*COLORIZE, "run", "--input", str(REPO / "samples"), "--output", f"{bucket}/out", "--s3-endpoint", s3.endpoint],
        capture_output=True, text=True, timeout=120, env=env, cwd=REPO,
    )
    assert_one_error_line(result, "access denied")


def test_run_with_weights_that_are_not_weights(tmp_path: Path) -> None:
    (tmp_path / "w.pt").write_bytes(b"not a torch file")
    result = colorize("run", "--input", str(REPO / "samples"), "--output", str(tmp_path / "out"), "--weights", str(tmp_path / "w.pt"))
    assert_one_error_line(result, "not a colorize weights file: not a torch zip file (16 bytes; truncated, corrupt")
    assert not (tmp_path / "out").exists()


def test_weights_of_an_unexpected_shape_are_one_error_line(tmp_path: Path) -> None:
    import torch

    torch.save([1, 2, 3], tmp_path / "list.pt")
    torch.save({"config": {"width": "8"}, "state_dict": {}}, tmp_path / "typed.pt")
    for name, why in (("list.pt", "not a colorize weights file"),
                      ("typed.pt", "a colorize weights file that cannot be used: its config: model width must be int, got '8'")):
        result = colorize("evaluate", "--data", str(REPO / "samples"), "--weights", str(tmp_path / name))
        assert_one_error_line(result, why)
    assert not (tmp_path / "out").exists()


def test_an_output_that_is_a_file_is_refused_before_the_work(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    for command in ("evaluate", "probe"):
        result = colorize(command, "--data", str(REPO / "samples"), "--out", str(tmp_path / "afile"))
        assert_one_error_line(result, "is a file; --out takes a folder")
    result = colorize("run", "--input", str(REPO / "samples"), "--output", str(tmp_path / "afile"))
    assert_one_error_line(result, "is a file; --output takes a folder")
    # Not there yet, but named as a file: a folder of that name held the image in images/.
    result = colorize("run", "--input", str(REPO / "samples"), "--output", str(tmp_path / "colour.png"))
    assert_one_error_line(result, "colour.png: a file's name; --output takes a folder", "(name one, such as colour)")
    assert not (tmp_path / "colour.png").exists()
    result = colorize("evaluate", "--data", str(REPO / "samples"), "--out", str(tmp_path / "report.json"))
    assert_one_error_line(result, "report.json: a file's name; --out takes a folder")


def test_submit_checks_the_job_s_settings_too() -> None:
    from colorize import submit

    with pytest.raises(ValueError, match="train: --lr must be"):
        submit.check_job(["train", "--data", "d", "--out", "o", "--lr", "-1"])
    with pytest.raises(ValueError, match="train: --loss ce does not fit --head regression"):
        submit.check_job(["train", "--data", "d", "--out", "o", "--loss", "ce"])
    submit.check_job(["run", "--input", "i", "--output", "/o", "--format", "png"])


def test_run_with_an_unknown_format(tmp_path: Path) -> None:
    result = colorize("run", "--input", str(REPO / "samples"), "--output", str(tmp_path / "out"), "--format", "png,jpeg")
    assert_one_error_line(result, "--format")


def test_evaluate_with_missing_weights(tmp_path: Path) -> None:
    write_images(tmp_path / "d", 2)
    result = colorize("evaluate", "--data", str(tmp_path / "d"), "--weights", str(tmp_path / "none.pt"))
    assert_one_error_line(result, "none.pt")


def test_probe_on_a_folder_without_class_folders(tmp_path: Path) -> None:
    assert_one_error_line(colorize("probe", "--data", str(tmp_path)), "train: no such folder; expected a folder of class folders")


def test_train_with_a_temperature_out_of_range(tmp_path: Path) -> None:
    assert_one_error_line(colorize("train", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--temperature", "0"), "--temperature")


@pytest.mark.timeout(600)
def test_quick_start_on_the_samples_with_the_bundled_model(ray_cluster: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = colorize("run", "--input", str(REPO / "samples"), "--output", str(out), timeout=540)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "_SUMMARY.json").read_text())
    samples = [p for p in (REPO / "samples").rglob("*") if p.is_file()]
    assert summary["inputs"] == summary["written"] == len(samples)
    assert "written" in result.stderr.splitlines()[-1]
    # Ray Data's plans and its "Progress bars disabled" warning: noise beside the run's own lines.
    assert "Execution plan" not in result.stderr and "Progress bars" not in result.stderr, result.stderr


@pytest.mark.timeout(600)
def test_run_exits_3_when_some_inputs_failed(ray_cluster: str, tmp_path: Path) -> None:
    write_images(tmp_path / "in", 2)
    (tmp_path / "in" / "broken.jpg").write_bytes(b"broken")
    result = colorize("run", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), timeout=540)
    assert result.returncode == 3, result.stderr[-3000:]
    assert "1 failed" in result.stderr


def test_sigterm_takes_ctrl_cs_path_even_where_sigint_is_ignored() -> None:
    """A shell starts a background job with SIGINT ignored: SIGTERM must stop it all the same."""
    called = []
    before = signal.signal(signal.SIGINT, lambda signum, frame: called.append(signum))
    try:
        errors._as_ctrl_c(signal.SIGTERM, None)  # Ray Train's handler, say: it is called, and it decides
        assert called == [signal.SIGINT]
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with pytest.raises(KeyboardInterrupt):
            errors._as_ctrl_c(signal.SIGTERM, None)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        with pytest.raises(KeyboardInterrupt):
            errors._as_ctrl_c(signal.SIGTERM, None)
    finally:
        signal.signal(signal.SIGINT, before)


def test_sigterm_before_ray_starts_stops_a_command_as_ctrl_c(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """Before Ray put its handler in (a command listing its input), SIGTERM ended it with no word."""
    from colorize import pipeline

    def listing(config):  # noqa: ANN001, ANN202 - a command a SIGTERM reaches while it reads its input
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
        raise AssertionError("SIGTERM did not stop the command")

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(pipeline, "run", listing)
    try:
        assert cli.main(["run", "--input", "in", "--output", "out"]) == cli.EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGTERM, before)
    assert capsys.readouterr().err == "colorize run: interrupted\n"


def test_sigterm_while_the_command_is_still_importing_stops_it_as_ctrl_c(tmp_path: Path) -> None:
    """The seconds of importing torch and Ray: a kill there ended the command with 143 and no word."""
    process = subprocess.Popen([sys.executable, "-m", "colorize.entry", "run", "--input", str(tmp_path / "none"), "--output",
                                str(tmp_path / "out")],
                               stderr=subprocess.PIPE, text=True, cwd=REPO)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # until SIGTERM (bit 14 of the caught signals) has a handler: the entry point's
        caught = next(line for line in Path(f"/proc/{process.pid}/status").read_text().splitlines() if line.startswith("SigCgt"))
        if int(caught.split()[1], 16) & (1 << (signal.SIGTERM - 1)):
            break
        time.sleep(0.005)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == cli.EXIT_INTERRUPTED, err
    assert err.splitlines()[-1] in ("colorize: interrupted", "colorize run: interrupted"), err


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_after_the_command_has_finished_ends_it_with_its_status_and_no_traceback(stop: int) -> None:
    """Ctrl-C while Ray shut down, after the summary, raised KeyboardInterrupt into the teardown:
    'Exception ignored in ...' and a traceback below the command's last line. Here the signal
    comes from an exit handler, as Ray's shutdown is one, of a command that found 3 inputs failed."""
    code = ("import atexit, os, sys, time; from colorize import cli, entry; "
            "cli.main = lambda argv: print('3 inputs failed', flush=True) or cli.EXIT_SOME_FAILED; "
            f"atexit.register(lambda: (os.kill(os.getpid(), {int(stop)}), time.sleep(30))); "
            "sys.exit(entry.main(['run']))")
    ended = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert (ended.returncode, ended.stdout, ended.stderr) == (cli.EXIT_SOME_FAILED, "3 inputs failed\n", "")


@pytest.mark.timeout(600)
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_during_training_says_how_to_resume_and_exits_130(ray_cluster: str, tmp_path: Path, stop: int) -> None:
    """SIGTERM (kill, a Ray job stopped) as Ctrl-C: Ray's own handler ended training in an abort, exit 134.
    It is sent with SIGINT blocked, as Ray's job supervisor starts a job's driver."""
    write_images(tmp_path / "d", 32)
    out = tmp_path / "out"
    with open(tmp_path / "stderr.txt", "w+") as log:  # a file, not a pipe: a pipe nobody reads fills and stalls
        proc = subprocess.Popen([*COLORIZE, "train", "--data", str(tmp_path / "d"), "--out", str(out), "--epochs", "500",
                                 "--width", "8", "--depth", "2", "--image-size", "16", "--batch-size", "16",
                                 "--cpus-per-worker", "0.5"],
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=log,
                                preexec_fn=(lambda: signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT}))
                                if stop == signal.SIGTERM else None)
        deadline = time.monotonic() + 300
        while not list((out / "train").glob("checkpoint_*")):  # Ray Train's Ctrl-C handler is in place by then
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.2)
        proc.send_signal(stop)
        proc.wait(timeout=120)
        log.seek(0)
        stderr = log.read()

    assert proc.returncode == 130, stderr[-3000:]
    assert f"colorize train: interrupted; the same command resumes from the last checkpoint in {out}" in stderr
    # Ray's noise about a checkpoint reported, and its warning of an option Ray Train itself passes.
    assert "Reporting training result" not in stderr and "exclude_resources" not in stderr, stderr[-3000:]
