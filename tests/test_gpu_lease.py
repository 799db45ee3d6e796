"""A GPU lease's script and what brings its models back (jobs/gpu_lease.sh, jobs.gpu_collect), on the CPU."""

from __future__ import annotations

import json
import os
import posixpath
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from colorize import colorizer
from colorize.models import ModelConfig, build_model
from jobs import gpu_collect
from tests.helpers import write_images

REPO = Path(__file__).resolve().parents[1]


def _weights(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(colorizer.weights_bytes(build_model(ModelConfig(width=4, depth=2, image_size=16))))
    return path


def test_collect_copies_each_changed_model_in_checked_parts_and_join_refuses_a_cut_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs, out, back = tmp_path / "runs", tmp_path / "out", tmp_path / "back"
    first = _weights(runs / "a" / "model.pt", seed=0)
    _weights(runs / "b" / "model.pt", seed=1)
    monkeypatch.setattr(gpu_collect, "PART_BYTES", 1000)  # several parts from a small model
    monkeypatch.setattr(gpu_collect, "MAX_FILES", 100)

    assert gpu_collect.collect(runs, out, ["a"]) == ["a"]  # only the runs named
    assert gpu_collect.collect(runs, out, ["a"]) == []  # unchanged since: nothing to copy
    parts = sorted(out.glob("a-fp16.pt.part*"))
    assert len(parts) > 1 and all(p.stat().st_size <= 1000 for p in parts)
    _weights(first, seed=2)  # a --keep-best run wrote a better model
    os.utime(first, ns=(first.stat().st_atime_ns, first.stat().st_mtime_ns + 1))
    assert gpu_collect.collect(runs, out) == ["a", "b"]

    joined = gpu_collect.join(out, back)
    assert sorted(p.name for p in joined) == ["a-fp16.pt", "b-fp16.pt"]
    model, _ = colorizer.load_weights(str(back / "a-fp16.pt"))
    expected, _ = colorizer.load_weights(str(first))
    for name, tensor in model.state_dict().items():
        want = expected.state_dict()[name]
        if want.is_floating_point():  # loaded back as float32, from float16 values
            want = want.half().float()
        assert tensor.dtype == want.dtype and torch.equal(tensor, want), name

    # A part cut short by the lease's time limit does not match the manifest: refused, by name.
    last = sorted(out.glob("b-fp16.pt.part*"))[-1]
    last.write_bytes(last.read_bytes()[:-10])
    with pytest.raises(ValueError, match="cut short for b"):
        gpu_collect.join(out, tmp_path / "again")
    with pytest.raises(ValueError, match="no manifest.json"):
        gpu_collect.join(tmp_path / "runs", tmp_path / "again")


def _archive(path: Path, root: Path, name: str) -> None:
    with tarfile.open(path, "w:gz") as tar:
        tar.add(root / name, arcname=name)


def _lease_env(tmp_path: Path, **settings: str) -> dict[str, str]:
    """The lease's environment on the CPU, with small archives of its data in tmp_path."""
    src, archives = tmp_path / "src", tmp_path / "archives"
    write_images(src / "photos", 24, size=64, seed=1)
    write_images(src / "cifar10" / "train", 24, size=32, seed=2)
    write_images(src / "cifar10" / "test", 6, size=32, seed=3)
    archives.mkdir()
    _archive(archives / "photos64.tar.gz", src, "photos")
    _archive(archives / "cifar10-train.tar.gz", src, "cifar10")
    return {**os.environ, "PYTHON": sys.executable, "DEVICE": "cpu", "THREADS": "1", "SCORE_EVERY": "1",
            "ARCHIVES": str(archives), "DATA_DIR": str(tmp_path / "data"), "RUNS_DIR": str(tmp_path / "runs"), **settings}


@pytest.mark.timeout(300)
def test_the_lease_script_brings_back_the_models_logs_and_test_scores(tmp_path: Path) -> None:
    out, runs = tmp_path / "out", tmp_path / "runs"
    env = _lease_env(tmp_path, RUNS="w16-sem-ft")
    done = subprocess.run(["bash", "jobs/gpu_lease.sh", "0.05", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stdout + done.stderr

    (model,) = gpu_collect.join(out, tmp_path / "back")
    assert colorizer.load_weights(str(model))[0].config.classes == 4  # two class folders in each --data
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = set(tar.getnames())
        scores = [json.loads(line) for line in tar.extractfile("./test.json").read().decode().splitlines()]
    assert {"./w16-sem-ft.log", "./w16-sem-ft/metrics.json", "./w16-sem-ft/holdout.png"} <= names
    assert not [n for n in names if n.endswith(".pt") or posixpath.basename(n).startswith(".tmp-")]
    assert [s["model"] for s in scores] == [str(runs / "w16-sem-ft" / "model.pt"), "bundled"]  # the known score last
    assert all(s["images"] == 6 for s in scores)
    assert [s["size"] for s in scores] == [64, 64]  # each model at its own working size, as `colorize evaluate` scores it
    assert len(list(out.iterdir())) <= 8  # what a lease may bring back


@pytest.mark.timeout(300)
def test_a_lease_killed_mid_training_has_already_brought_back_its_best_model(tmp_path: Path) -> None:
    """What the lease's copier is for: a call killed at its time limit returns only what is in OUT."""
    out = tmp_path / "out"
    env = _lease_env(tmp_path, RUNS="w32-psnr-sem-best", COLLECT_EVERY="1")
    lease = subprocess.Popen(["bash", "jobs/gpu_lease.sh", "2", str(out)], cwd=REPO, env=env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not (out / "manifest.json").exists() and time.monotonic() < deadline and lease.poll() is None:
            time.sleep(0.5)
    finally:
        os.killpg(lease.pid, signal.SIGKILL)  # the time limit, mid-training: no final collect
        lease.wait()
    assert not (tmp_path / "runs" / ".stop").exists(), "the lease's training had ended before the kill"  # touched as it ends
    (model,) = gpu_collect.join(out, tmp_path / "back")
    assert colorizer.load_weights(str(model))[0].config.width == 32


def test_a_lease_refuses_to_fetch_a_run_it_does_not_train(tmp_path: Path) -> None:
    env = {**os.environ, "RUNS": "w32-psnr-sem-best w32-class", "FETCH": "w32-psnr-sem-bset", "RUNS_DIR": str(tmp_path / "r")}
    done = subprocess.run(["bash", "jobs/gpu_lease.sh", "1", str(tmp_path / "out")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "FETCH names w32-psnr-sem-bset, which is not among the runs: w32-psnr-sem-best w32-class" in done.stderr
    assert not (tmp_path / "out").exists()


def test_collect_leaves_out_a_model_that_would_not_fit_in_what_a_lease_brings_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    runs, out = tmp_path / "runs", tmp_path / "out"
    _weights(runs / "a" / "model.pt", seed=0)
    _weights(runs / "b" / "model.pt", seed=1)
    monkeypatch.setattr(gpu_collect, "PART_BYTES", 1000)
    parts = -(-len(gpu_collect.half_bytes(runs / "a" / "model.pt")) // 1000)
    monkeypatch.setattr(gpu_collect, "MAX_FILES", parts + 1)  # room for one model, not two

    assert gpu_collect.collect(runs, out) == ["a"]
    assert "b: not copied: with it the models would take" in capsys.readouterr().err
    assert gpu_collect.collect(runs, out) == [] and capsys.readouterr().err == ""  # said once
    assert [p.name for p in gpu_collect.join(out, tmp_path / "back")] == ["a-fp16.pt"]
    assert gpu_collect.collect(runs, out, ["b"]) == []  # a's parts are still there: b would not fit beside them
