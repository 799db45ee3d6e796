"""Ray Train end to end on a real local cluster: learning, resume, fault tolerance, sources."""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import shutil
import signal
import tarfile
import threading
import time
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from PIL import Image

from colorize import cli, colorizer, data, errors, storage
from colorize import train as train_module
from colorize.images import max_encoded_bytes
from colorize.models import ModelConfig, build_model
from colorize.objectives import resolve_precision
from colorize.train import TrainConfig, train
from tests.helpers import another_run_starts_after, free_ports, output_held_elsewhere, ray_processes, scene, write_images

pytestmark = pytest.mark.timeout(600)

TINY = dict(width=8, depth=2, image_size=16, batch_size=16, lr=1e-2, cpus_per_worker=0.5, val_limit=32)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("scenes")
    write_images(folder, 96)
    return folder


def history(out: Path) -> list[dict]:
    return json.loads((out / "state.json").read_text())["history"]


@pytest.fixture(scope="module")
def trained(ray_cluster: str, images: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """One worker, 3 epochs with --val: its OUT and summary. A fit() is ~25 s of actor startup
    whatever its epochs, so the tests that resume a run start from a copy of this one."""
    out = tmp_path_factory.mktemp("trained") / "run"
    summary = train(TrainConfig(data=str(images), val=str(images), out=str(out), epochs=3, **TINY))
    return out, summary


def copy_of(trained: tuple[Path, dict], tmp_path: Path) -> Path:
    """A copy of the ``trained`` run's OUT (Ray's snapshot names its checkpoints relative to it)."""
    return Path(shutil.copytree(trained[0], tmp_path / "run"))


@pytest.mark.parametrize("workers", [1, 2])
def test_trainer_learns_and_writes_its_outputs(ray_cluster: str, images: Path, tmp_path: Path, workers: int,
                                               request: pytest.FixtureRequest) -> None:
    if workers == 1:
        out, summary = request.getfixturevalue("trained")
    else:
        out = tmp_path / "run"
        summary = train(TrainConfig(data=str(images), val=str(images), out=str(out), epochs=3, num_workers=workers, **TINY))

    rows = history(out)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert sum(r["images"] for r in rows) == 3 * 96
    assert {r["precision"] for r in rows} == {resolve_precision("auto", torch.device("cpu"))} == {summary["precision"]}
    assert summary["val_images"] == 32 and np.isfinite(summary["val_psnr"])
    for name in ("model.pt", "curve.png", "grid.png", "config.json"):
        assert (out / name).stat().st_size > 0, name
    assert len(list((out / "train").glob("checkpoint_*"))) >= 1


def test_a_second_call_with_the_same_out_resumes(trained: tuple[Path, dict], images: Path, tmp_path: Path, capsys) -> None:
    out = str(copy_of(trained, tmp_path))  # 3 epochs with --val
    assert (Path(out) / "grid.png").exists()
    with pytest.raises(ValueError, match=r"another model \(--model unet -> autoencoder; --width 8 -> 16\)"):
        train(TrainConfig(data=str(images), out=out, epochs=5, **{**TINY, "width": 16}, model="autoencoder"))
    first, _ = colorizer.load_weights(str(Path(out) / "model.pt"))
    # At a learning rate too small to move a weight, the model after the resumed epochs is epoch 3's.
    summary = train(TrainConfig(data=str(images), out=out, epochs=5, **{**TINY, "lr": 1e-9}))

    assert summary["resumed_at"] == [3]
    assert [r["epoch"] for r in history(Path(out))] == [1, 2, 3, 4, 5]
    assert f"resuming with settings other than the last run's (--val {images} -> None; --lr 0.01 -> 1e-09)" in capsys.readouterr().out
    resumed = colorizer.load_weights(str(Path(out) / "model.pt"))[0].state_dict()
    assert all(torch.allclose(resumed[name], weight, atol=1e-5) for name, weight in first.state_dict().items()
               if name.endswith("weight"))
    assert not (Path(out) / "grid.png").exists()  # epoch 3's, beside epoch 5's model: no grid without --val
    assert train(TrainConfig(data=str(images), out=out, epochs=4, **TINY)) == summary
    assert "already trained 5 epoch(s), --epochs 4: nothing to do" in capsys.readouterr().out

    # A run stopped after Ray registered a checkpoint, before OUT/ had its model: "nothing to
    # do" went by OUT/state.json (or, with none, retrained to "epoch 3/2"), and OUT/ kept the older model.
    model = (Path(out) / "model.pt").read_bytes()
    for name in ("model.pt", "state.json"):
        (Path(out) / name).unlink()
    assert train(TrainConfig(data=str(images), out=out, epochs=4, **TINY)) == summary
    assert "already trained 5 epoch(s)" in capsys.readouterr().out
    assert (Path(out) / "model.pt").read_bytes() == model and history(Path(out))[-1]["epoch"] == 5


def test_the_seed_fixes_the_initial_weights_and_seeds_each_epoch_and_worker_apart(ray_cluster: str, images: Path, tmp_path: Path) -> None:
    """Nothing was seeded: two runs of the same settings started from other weights."""
    config = TrainConfig(data=str(images), out=str(tmp_path / "run"), epochs=1, seed=7, **{**TINY, "lr": 1e-9})
    train(config)

    trained = colorizer.load_weights(str(tmp_path / "run" / "model.pt"))[0].state_dict()

    def initial(seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(seed)
        return build_model(config.model_config(0)).state_dict()

    # At a learning rate too small to move a weight, the model is the one it started from: seed 7's.
    weights = [name for name in trained if name.endswith("weight")]
    assert all(torch.allclose(trained[name], initial(7)[name], atol=1e-5) for name in weights)
    assert not all(torch.allclose(trained[name], initial(0)[name], atol=1e-5) for name in weights)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["seed"] == 7
    seeds = {train_module._shuffle_seed(seed, epoch, rank) for seed in (0, 7) for epoch in range(3) for rank in range(2)}
    assert len(seeds) == 12 and train_module._shuffle_seed(7, 1, 0) == train_module._shuffle_seed(7, 1, 0)
    with pytest.raises(SystemExit):  # a seed past 32 bits failed in the worker, with a traceback
        cli.build_parser().parse_args(["train", "--data", "d", "--out", "o", "--seed", str(2**32)])


def _registered(out: Path) -> list[str]:
    snapshot = json.loads((out / "train" / train_module.CHECKPOINT_SNAPSHOT).read_text())
    return [c["checkpoint_dir_name"] for c in snapshot["checkpoint_results"]]


def test_a_resume_leaves_out_a_last_checkpoint_that_is_gone_or_cut_short(trained: tuple[Path, dict], images: Path,
                                                                         tmp_path: Path, capsys) -> None:
    """A deleted last checkpoint failed every rerun in a traceback from Ray's controller; a
    model.pt cut short failed each worker restart, then the run, then every rerun alike.
    (An older checkpoint gone: test_checkpoints_ray_never_registered_are_removed.)"""
    out = copy_of(trained, tmp_path)  # 3 epochs: Ray kept the checkpoints of 2 and 3
    first, last = _registered(out)
    model = out / "train" / last / "model.pt"
    model.write_bytes(model.read_bytes()[:1000])

    summary = train(TrainConfig(data=str(images), out=str(out), epochs=4, **TINY))

    assert f"leaving out checkpoint {last} (unreadable: " in capsys.readouterr().out
    assert summary["resumed_at"] == [2] and [r["epoch"] for r in history(out)] == [1, 2, 3, 4]
    assert not (out / "train" / last).exists()  # unregistered now, and deleted once the run ended
    newest = _registered(out)[-1]
    shutil.rmtree(out / "train" / newest)

    summary = train(TrainConfig(data=str(images), out=str(out), epochs=5, **TINY))

    assert f"leaving out checkpoint {newest} (its folder is gone)" in capsys.readouterr().out
    assert summary["resumed_at"] == [2, 3] and [r["epoch"] for r in history(out)] == [1, 2, 3, 4, 5]

    # Without Ray's list, a run would train from epoch 1 and then delete every checkpoint.
    (out / "train" / train_module.CHECKPOINT_SNAPSHOT).unlink()
    with pytest.raises(train_module.CheckpointError, match="holds 2 checkpoint folder\\(s\\) but no checkpoint_manager_snapshot.json"):
        train(TrainConfig(data=str(images), out=str(out), epochs=6, **TINY))
    assert len(list((out / "train").glob("checkpoint_*"))) == 2
    # Unless no epoch reached OUT/: a run stopped before Ray registered its first checkpoint,
    # whose folder the next run deletes.
    (out / "state.json").unlink()
    train_module._drop_unusable_checkpoints(storage.resolve(str(out))[0], str(out))


def test_a_checkpoint_with_flipped_bits_is_not_resumed_from(tmp_path: Path) -> None:
    """torch never checks a zip's checksums: a damaged copy resumed, with wrong weights or optimiser state."""
    model = build_model(ModelConfig(width=4, depth=2, image_size=16))
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.zeros(1, 1, 16, 16)).sum().backward()
    optimizer.step()
    (tmp_path / "state.json").write_text(json.dumps({"history": [{"epoch": 1}]}))
    (tmp_path / "model.pt").write_bytes(colorizer.weights_bytes(model))
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    local = storage.resolve(str(tmp_path))[0]
    assert train_module._unusable(local, str(tmp_path)) is None
    for name in ("optimizer.pt", "model.pt"):
        raw = bytearray((tmp_path / name).read_bytes())
        raw[len(raw) // 2] ^= 0x01
        (tmp_path / name).write_bytes(raw)
        torch.load(tmp_path / name, weights_only=True)  # loads all the same

        assert re.fullmatch(f"unreadable: the checksum of {name}'s part '[^']+' does not match",
                            train_module._unusable(local, str(tmp_path)))


def test_a_run_that_finds_its_out_made_while_loading_init_weights_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run that found no --out took no lock, then read (and would have pruned) the checkpoints
    of another run that made the folder while this one loaded its --init weights."""
    out = tmp_path / "run"
    snapshot = out / train_module.RUN_NAME / train_module.CHECKPOINT_SNAPSHOT
    write_images(tmp_path / "in", 2)

    def checkpoint_list() -> None:  # the other run is writing its list of checkpoints
        (out / train_module.RUN_NAME / "checkpoint_2026-12-07_00-00-00.000000").mkdir(parents=True)
        snapshot.write_text('{"checkpoint_results": [')

    with another_run_starts_after(colorizer, "load_weights", out, checkpoint_list, monkeypatch) as holders, \
            pytest.raises(storage.InUse) as refused:
        train(TrainConfig(data=str(tmp_path / "in"), out=str(out), init="bundled"))
    assert f"run: in use by another run (pid {holders[0].pid} on " in str(refused.value)
    assert snapshot.read_text() == '{"checkpoint_results": ['


@pytest.mark.parametrize(("extra", "val", "height"), [({}, True, 400), ({"psnr_weight": 0.1}, False, 400),
                                                    ({"psnr_weight": 0.1}, True, 500)],
                         ids=["val", "extra-terms", "extra-terms-and-val"])
def test_the_curve_gets_a_panel_of_its_own_for_a_training_loss_with_extra_terms(
    tmp_path: Path, extra: dict, val: bool, height: int
) -> None:
    """Plus a PSNR term, the training loss ran -16 to -18 on the axis of a validation loss of 5.5."""
    model = build_model(ModelConfig(width=4, depth=2, image_size=16))
    history = [{"epoch": e, "train_loss": 5.0 - 10 * bool(extra) - e / 10, **({"val_loss": 5.5 - e / 100} if val else {})}
               for e in (1, 2, 3)]
    config = TrainConfig(data="d", out=str(tmp_path), **extra)
    train_module._write_checkpoint(tmp_path, model, torch.optim.Adam(model.parameters()), None, config, history, [], [])
    assert Image.open(tmp_path / "curve.png").size == (640, height)


def test_checkpoints_ray_never_registered_are_removed(trained: tuple[Path, dict], images: Path, tmp_path: Path,
                                                       capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run stopped within seconds of writing a checkpoint left its folder for ever: Ray's
    retention deletes only the checkpoints it registered. And an older registered checkpoint
    whose folder is gone is left out too: Ray checks every folder its list names, not only the last."""
    out = copy_of(trained, tmp_path)  # 3 epochs: Ray kept the checkpoints of 2 and 3
    older = _registered(out)[0]
    shutil.rmtree(out / "train" / older)
    stray = out / "train" / "checkpoint_2026-01-01_00-00-00.000000"
    stray.mkdir()
    (stray / "model.pt").write_bytes(b"never registered")
    summary = train(TrainConfig(data=str(images), out=str(out), epochs=5, **TINY))

    printed = capsys.readouterr().out
    assert f"leaving out checkpoint {older} (its folder is gone)" in printed
    assert "removed 1 checkpoint folder(s) that Ray Train never registered, left by a stopped run" in printed
    assert summary["resumed_at"] == [3] and [r["epoch"] for r in history(out)] == [1, 2, 3, 4, 5]
    snapshot = json.loads((out / "train" / "checkpoint_manager_snapshot.json").read_text())
    kept = sorted(c["checkpoint_dir_name"] for c in snapshot["checkpoint_results"])
    assert sorted(p.name for p in (out / "train").glob("checkpoint_*") if p.is_dir()) == kept and len(kept) == 2

    # Removed by the next run as it starts: a run stopped again and again (preemptible nodes)
    # left one or two more each time, 23 MB each for the default model, until one ran to its end.
    stray.mkdir()

    def stopped_again(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(train_module, "_fit", stopped_again)
        with pytest.raises(KeyboardInterrupt):
            train(TrainConfig(data=str(images), out=str(out), epochs=6, **TINY))
    assert not stray.exists()
    stray.mkdir()  # then a re-run with nothing to do
    train(TrainConfig(data=str(images), out=str(out), epochs=5, **TINY))
    assert not stray.exists()


def test_a_classification_head_and_a_gan_train_under_ddp_and_resume(ray_cluster: str, images: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    config = dict(data=str(images), val=str(images), out=str(out), num_workers=2, head="classification", gan_weight=0.05,
                  cf_weight=0.02, **TINY)
    train(TrainConfig(epochs=1, **config))
    assert TrainConfig(**config).loss == "ce"
    # The rebalancing weights: unaugmented images in a fixed order give the same ones again
    # (augmented crops taken as blocks came gave 32% apart at this size); a resume reuses them.
    kept = json.loads((out / train_module.CLASS_WEIGHTS).read_text())
    (tmp_path / "again").mkdir()
    again = train_module._class_weights(TrainConfig(epochs=1, **config), data.locate(str(images)),
                                        storage.resolve(str(tmp_path))[0], str(tmp_path / "again"), None)
    assert again == kept["weights"] and len(again) == 262 and kept["images"] == 96
    (out / train_module.CLASS_WEIGHTS).write_text(json.dumps({**kept, "weights": [1.0] * 262}))
    summary = train(TrainConfig(epochs=2, temperature=0.5, **config))  # decoding, not architecture: may change
    assert json.loads((out / train_module.CLASS_WEIGHTS).read_text())["weights"] == [1.0] * 262
    # Weights drawn from other data are not reused, whatever the runs between them changed.
    fs = storage.resolve(str(out))[0]
    other = TrainConfig(epochs=3, **{**config, "limit": 48})
    assert train_module._class_weights(other, data.locate(str(images), limit=48), fs, str(out), {"data": str(images)}) != [1.0] * 262
    assert json.loads((out / train_module.CLASS_WEIGHTS).read_text())["drawn_from"]["images"] == 48

    assert summary["resumed_at"] == [1] and np.isfinite(summary["train_loss"]) and np.isfinite(summary["val_psnr"])
    checkpoint = max(p for p in (out / "train").glob("checkpoint_*") if p.is_dir())
    assert {"model.pt", "optimizer.pt", "discriminator.pt", "discriminator_optimizer.pt"} <= {p.name for p in checkpoint.iterdir()}
    model, _ = colorizer.load_weights(str(out / "model.pt"))
    assert (model.config.head, model.config.temperature) == ("classification", 0.5)
    assert json.loads((out / "config.json").read_text())["temperature"] == 0.5


@pytest.mark.parametrize(
    "bad, match",
    [({"head": "classification", "loss": "mse"}, "does not fit"), ({"loss": "ce"}, "does not fit"),
     ({"model": "autoencoder", "gan_weight": 0.1}, "gan-weight"), ({"gan_weight": -1.0}, "gan-weight"),
     ({"image_size": 2048}, "--image-size 2048 is above 1024"), ({"model": "autoencoder", "cf_weight": 0.1}, "cf-weight"), ({"cf_weight": -1.0}, "cf-weight"), ({"psnr_weight": -0.5}, "psnr-weight"),
     ({"lr": float("nan")}, "--lr"), ({"cf_weight": float("inf")}, "cf-weight"), ({"cpus_per_worker": 0.0}, "cpus-per-worker"),
     ({"max_failures": -2}, "max-failures"), ({"precision": "fp16"}, "--precision must be one of"), ({"width": 0}, "--width"), ({"image_size": 0}, "--image-size"),
     ({"image_size": 24, "depth": 4}, "--image-size 24 must be divisible by 2\\*\\*depth = 16"),
     ({"image_size": 8, "depth": 3}, "--image-size 8 at --depth 3 leaves a 1x1 bottleneck"),
     ({"model": "autoencoder", "semantic": True}, "--semantic needs --model unet"),
     ({"semantic": True, "image_size": 8, "depth": 2}, "--image-size 8 is too small for --semantic"),
     ({"gan_weight": 0.1, "image_size": 8, "depth": 2}, "--image-size 8 is too small for --gan-weight"),
     ({"val": "v", "image_size": 8, "depth": 2}, "--image-size 8 is below SSIM's 11 px window")],
)
def test_training_configs_that_cannot_work_are_refused(bad: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TrainConfig(data="d", out="o", **bad)


def write_day_and_night(folder: Path, n: int, classes: tuple[str, ...] = ("day", "night")) -> None:
    """``n`` scenes over class folders that brightness tells apart: each class darker than the one before."""
    rng = np.random.default_rng(1)
    for i in range(n):
        label = i % len(classes)
        path = folder / classes[label] / f"{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((scene(rng, 16) * 0.35**label).astype(np.uint8)).save(path)


def test_a_semantic_branch_learns_the_class_folders_under_ddp_and_resumes_only_on_them(ray_cluster: str, tmp_path: Path) -> None:
    write_day_and_night(tmp_path / "scenes", 64)
    out = tmp_path / "run"
    config = dict(data=str(tmp_path / "scenes"), val=str(tmp_path / "scenes"), out=str(out), semantic=True, num_workers=2, **TINY)
    train(TrainConfig(epochs=1, **config))
    summary = train(TrainConfig(epochs=3, **config))

    assert summary["resumed_at"] == [1] and summary["images"] == 64
    assert summary["val_class_accuracy"] >= 0.75  # brightness tells the two apart; a wrong label would score ~0.5
    model, _ = colorizer.load_weights(str(out / "model.pt"))
    assert model.config.classes == 2
    assert json.loads((out / "config.json").read_text())["classes"] == ["day", "night"]

    write_day_and_night(tmp_path / "three", 12, ("day", "dusk", "night"))
    with pytest.raises(ValueError, match="a model of 2 classes, but .* has 3 \\(day, dusk, night\\)"):
        train(TrainConfig(**{**config, "data": str(tmp_path / "three"), "val": None, "epochs": 4}))
    with pytest.raises(ValueError, match="another model \\(--semantic True -> False\\)"):
        train(TrainConfig(**{**config, "semantic": False, "epochs": 4}))


def test_fine_tuning_the_bundled_model_keeps_its_architecture_and_starts_from_its_weights(ray_cluster: str, tmp_path: Path) -> None:
    write_day_and_night(tmp_path / "scenes", 32)
    out = tmp_path / "run"
    # A learning rate too small to move a weight by 1e-4 in two steps: what comes out is what went in.
    config = dict(data=str(tmp_path / "scenes"), out=str(out), init="bundled", semantic=True, image_size=32,
                  epochs=1, batch_size=16, lr=1e-7, num_workers=2, cpus_per_worker=0.5)
    train(TrainConfig(**config, val=str(tmp_path / "scenes"), val_limit=16))
    summary = train(TrainConfig(**{**config, "epochs": 2}))

    assert summary["resumed_at"] == [1] and summary["images"] == 32
    # The --init weights were scored before the first epoch (a fine-tune that only hurt said nothing), once.
    first, second = history(out)
    assert np.isfinite(first["init_val_psnr"]) and first["init_val_psnr"] != first["val_psnr"]
    assert {"init_val_ssim", "init_val_delta_colourfulness"} <= set(first) and not any(k.startswith("init_") for k in second)
    bundled, _ = colorizer.load_weights(None)
    tuned, _ = colorizer.load_weights(str(out / "model.pt"))
    # The bundled model's shape, at the resolution asked for, with a class head for the two folders.
    assert (tuned.config.width, tuned.config.depth, tuned.config.image_size, tuned.config.classes) == (16, 4, 32, 2)
    before, after = bundled.state_dict(), tuned.state_dict()
    for name in ("down.0.0.weight", "up.0.weight", "head.weight", "semantic.net.0.weight"):
        assert torch.allclose(after[name], before[name], atol=1e-4), name  # a fresh model would be nowhere near
    assert after["classify.weight"].shape[0] == 2 != before["classify.weight"].shape[0]
    saved = json.loads((out / "config.json").read_text())
    assert (saved["init"], saved["width"], saved["depth"], saved["image_size"]) == ("bundled", 16, 4, 32)

    without_init = {k: v for k, v in config.items() if k != "init"}
    with pytest.raises(ValueError, match="another model .*--width 16 -> 32.* \\(--init bundled\\)"):
        train(TrainConfig(**{**without_init, "epochs": 3}))


def test_a_semantic_model_fine_tunes_under_ddp_without_labels(ray_cluster: str, images: Path, tmp_path: Path) -> None:
    """Without --semantic no labels reach the branch's class head: DDP must not wait for its gradients."""
    torch.manual_seed(0)
    start = build_model(ModelConfig(width=8, depth=2, image_size=16, classes=3))
    (tmp_path / "start.pt").write_bytes(colorizer.weights_bytes(start))
    out = tmp_path / "run"
    config = {k: v for k, v in TINY.items() if k not in ("width", "depth")}
    summary = train(TrainConfig(data=str(images), out=str(out), init=str(tmp_path / "start.pt"), epochs=2, num_workers=2, **config))

    assert summary["images"] == 96 and np.isfinite(summary["train_loss"])
    tuned, _ = colorizer.load_weights(str(out / "model.pt"))
    before, after = start.state_dict(), tuned.state_dict()
    assert torch.equal(after["classify.weight"], before["classify.weight"])  # no labels: left as it was
    assert not torch.equal(after["semantic.net.0.weight"], before["semantic.net.0.weight"])  # the colour loss trains the rest

    with pytest.raises(ValueError, match="has a semantic branch, which needs --image-size 16 or more"):
        train(TrainConfig(data=str(images), out=str(tmp_path / "small"), init=str(tmp_path / "start.pt"), **{**config, "image_size": 8}))


def test_fine_tuning_refuses_a_shape_the_weights_do_not_have(tmp_path: Path) -> None:
    config = dict(data=str(tmp_path), out=str(tmp_path / "run"), init="bundled")
    with pytest.raises(ValueError, match="--init bundled fixes the model's architecture; leave out --width 48 \\(it has 16\\), "
                                         "--head classification \\(it has regression\\)"):
        train(TrainConfig(**config, width=48, head="classification"))
    with pytest.raises(ValueError, match="--image-size 40 must be divisible by 2\\*\\*depth = 16"):
        train(TrainConfig(**config, image_size=40))
    with pytest.raises(storage.StorageError, match="no such weights file"):
        train(TrainConfig(**{**config, "init": str(tmp_path / "missing.pt")}))
    assert not (tmp_path / "run").exists()


def test_a_semantic_run_needs_classes_in_its_data(ray_cluster: str, tmp_path: Path) -> None:
    write_images(tmp_path / "one", 4)
    for path in (tmp_path / "one" / "class1").iterdir():
        path.rename(tmp_path / "one" / "class0" / path.name)
    with pytest.raises(data.DataError, match="--semantic needs images of at least two classes, found \\['class0'\\]"):
        train(TrainConfig(data=str(tmp_path / "one"), out=str(tmp_path / "run"), semantic=True, **TINY))
    write_images(tmp_path / "loose", 2)
    (tmp_path / "loose" / "class0" / "0000.jpg").rename(tmp_path / "loose" / "top.jpg")
    with pytest.raises(data.DataError, match="1 image\\(s\\), such as .*top.jpg, are not in a class folder"):
        train(TrainConfig(data=str(tmp_path / "loose"), out=str(tmp_path / "run"), semantic=True, **TINY))
    # Each epoch splits the images equally among the workers: one image for two left both idle.
    with pytest.raises(data.DataError, match="1 image\\(s\\) for 2 workers: each epoch splits the images equally"):
        train(TrainConfig(data=str(tmp_path / "loose"), out=str(tmp_path / "run"), limit=1,
                          **{**TINY, "num_workers": 2, "batch_size": 2}))
    assert not (tmp_path / "run").exists()


def test_image_classes_come_from_folders_cifar_and_a_parquet_label_column(ray_cluster: str, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_day_and_night(tmp_path / "train", 4)
    write_day_and_night(tmp_path / "val", 6, ("day", "night", "storm"))
    index = {name: label for label, name in enumerate(data.class_names(data.locate(str(tmp_path / "train"))))}
    rows = data.load_dataset(str(tmp_path / "val"), class_index=index).take_all()
    assert "path" not in rows[0]  # it only served the label
    assert sorted(int(r["label"]) for r in rows) == [-1, -1, 0, 0, 1, 1]  # "storm" is no training class

    payloads = [p.read_bytes() for p in sorted((tmp_path / "train").rglob("*.png"))]
    pq.write_table(pa.table({"image": payloads, "label": [2, 0, 1, 2]}), tmp_path / "labelled.parquet")
    source = data.locate(str(tmp_path / "labelled.parquet"))
    assert data.class_names(source) == ("0", "1", "2")
    rows = data.lab_dataset(source, image_size=8, augment=False, class_index={"0": 0, "1": 1, "2": 2}).take_all()
    assert sorted(int(r["label"]) for r in rows) == [0, 1, 2, 2] and all(r["ok"] for r in rows)
    pq.write_table(pa.table({"image": payloads}), tmp_path / "unlabelled.parquet")
    with pytest.raises(data.DataError, match="need an integer 'label' column, found \\['image'\\]"):
        data.class_names(data.locate(str(tmp_path / "unlabelled.parquet")))
    unlabelled = data.load_dataset(str(tmp_path / "unlabelled.parquet"), class_index={"0": 0}).take_all()
    assert [int(r["label"]) for r in unlabelled] == [-1] * 4  # as validation images they still score colour

    cifar = data.Source("cifar-10-python.tar.gz", "cifar", None, "x")
    assert data.class_names(cifar)[:3] == ("airplane", "automobile", "bird") and len(data.class_names(cifar)) == 10

    # One shard cut short among several is named: Arrow's "Parquet magic bytes not found" named none.
    (tmp_path / "shards").mkdir()
    for i in range(3):
        pq.write_table(pa.table({"image": payloads}), tmp_path / "shards" / f"train-{i}.parquet")
    cut = tmp_path / "shards" / "train-1.parquet"
    cut.write_bytes(cut.read_bytes()[:100])
    with pytest.raises(data.DataError, match=rf"^{re.escape(str(cut))}: not a readable Parquet file \(Parquet magic bytes"):
        data.load_dataset(str(tmp_path / "shards"))


@pytest.mark.parametrize("max_failures", [2, 0])
def test_a_killed_worker_is_restarted_from_the_last_checkpoint(
    ray_cluster: str, images: Path, tmp_path: Path, max_failures: int
) -> None:
    out = tmp_path / "run"
    config = TrainConfig(data=str(images), out=str(out), epochs=6, num_workers=2, max_failures=max_failures, **TINY)
    result: dict = {}

    def run() -> None:
        try:
            result.update(train(config))
        except errors.Failed as failure:
            result["failed"] = failure

    runner = threading.Thread(target=run, daemon=True)
    runner.start()

    # Ray Train writes its manager snapshot once a reported checkpoint is registered; a
    # checkpoint_* folder alone may still be an upload in progress.
    deadline = time.monotonic() + 240
    while not (out / "train" / "checkpoint_manager_snapshot.json").exists():
        assert runner.is_alive() and time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.1)
    victims = ray_processes(b"RayTrainWorker")
    assert victims, "no training worker found"
    os.kill(victims[0], signal.SIGKILL)
    runner.join(timeout=300)

    assert result, "training did not finish after the worker was killed"
    if max_failures == 0:  # one line saying why and how to go on, not Ray's 150-line traceback
        message = str(result.pop("failed"))
        assert message.startswith("training failed: ") and "\n" not in message, message
        assert message.endswith(f"the same command resumes from the last checkpoint in {out}, if one was written")
        result.update(train(config))
    assert result["epoch"] == 6
    assert result["resumed_at"], "the run never restarted from a checkpoint"
    assert [r["epoch"] for r in history(out)] == [1, 2, 3, 4, 5, 6]


def test_unreadable_images_are_skipped_and_counted(ray_cluster: str, images: Path, tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    write_images(folder, 16)
    (folder / "class0" / "broken.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    (folder / "class1" / "empty.png").write_bytes(b"")
    for i, path in enumerate(sorted(folder.rglob("*.jpg"))):
        path.write_bytes(b"" if i % 2 else b"\xff\xd8 not a jpeg either")
    out = tmp_path / "unreadable"
    with pytest.raises(data.DataError, match="no readable training images in epoch 1 \\(18 unreadable\\)"):
        train(TrainConfig(data=str(folder), out=str(out), epochs=1, **TINY))
    assert not (out / "model.pt").exists()
    with pytest.raises(data.DataError, match="no readable images among the first 2,048, where the classification head's"):
        train(TrainConfig(data=str(folder), out=str(tmp_path / "classes"), head="classification", epochs=1, **TINY))
    assert not (tmp_path / "classes" / "config.json").exists()

    # Once the data is mended, the same command does that epoch again (it used to fail again on its checkpoint);
    # the two files still broken are skipped and counted, in training and in validation.
    write_images(folder, 16, fmt="JPEG")
    summary = train(TrainConfig(data=str(folder), val=str(folder), out=str(out), epochs=1, **TINY))
    assert [r["epoch"] for r in history(out)] == [1] and summary["images"] == 16 and summary["skipped"] == 2
    assert summary["val_images"] == 16 and summary["val_unreadable"] == 2


def test_a_validation_set_with_nothing_readable_is_reported_not_dropped() -> None:
    model = build_model(ModelConfig(width=4, depth=2, image_size=16))
    batch = {"L": torch.zeros(3, 1, 16, 16), "ab": torch.zeros(3, 2, 16, 16), "ok": torch.zeros(3, dtype=torch.bool)}

    metrics, examples = train_module.validate(model, [batch], limit=32, loss="mse")

    assert metrics == {"val_images": 0, "val_unreadable": 3} and examples == []
    row = {"epoch": 1, "train_loss": 0.1, "images": 8, "seconds": 1.0, "images_per_second": 8.0, "precision": "float32",
           "skipped": 0, **metrics}
    assert train_module._progress_line(row, 1).endswith("val: no readable images (3 unreadable)")


def test_a_training_file_gone_since_the_listing_is_an_unreadable_row(ray_cluster: str, tmp_path: Path) -> None:
    """A run that takes days outlives some of its files; one of them used to fail the whole run."""
    paths = write_images(tmp_path / "scenes", 4)
    source = data.locate(str(tmp_path / "scenes"))
    paths[0].unlink()

    rows = data.lab_dataset(source, image_size=16, augment=False).take_all()

    assert len(rows) == 4 and sum(row["ok"] for row in rows) == 3


def test_a_training_file_larger_than_any_image_can_be_is_not_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("colorize.images.MAX_PIXELS", 64)
    limit = max_encoded_bytes(64)  # 16 MiB and 512 bytes
    for name, size in (("huge.png", limit + 1), ("largest.png", limit)):
        with open(tmp_path / name, "wb") as f:
            f.truncate(size)  # sparse: no disk
    paths = np.array([str(tmp_path / "huge.png"), str(tmp_path / "largest.png")], dtype=object)

    rows = data._read_files({"path": paths}, fs=storage.resolve(str(tmp_path))[0], with_paths=True)

    assert [len(b) for b in rows["bytes"]] == [0, limit] and list(rows["path"]) == list(paths)


def test_workers_step_together_when_one_has_nothing_readable(ray_cluster: str, tmp_path: Path) -> None:
    """A DDP worker that skipped a step alone left the others waiting in its all-reduce forever."""
    folder = tmp_path / "mostly-broken"
    write_images(folder, 24)
    for i in range(40):
        (folder / "class0" / f"broken{i:02d}.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    # 4 images a worker a step: a worker has none readable in 15% of its steps, so 93% of runs
    # drop a step; every step is dropped in 1 run in 25,000 (and a run whose workers skip a step
    # apart hangs until the timeout).
    config = {**TINY, "batch_size": 8, "num_workers": 2}
    summary = train(TrainConfig(data=str(folder), out=str(tmp_path / "run"), epochs=1, **config))
    assert summary["skipped"] == 40 and summary["images"] + summary["dropped"] == 24 and summary["images"] > 0


def test_a_request_the_local_ray_can_never_meet_is_refused(ray_cluster: str) -> None:
    with pytest.raises(ValueError, match="need 13 CPUs; this machine's Ray has 4"):
        train_module._check_resources(TrainConfig(data="d", out="o", num_workers=3), cpus=4.0)
    # Every CPU to the workers left none for the read tasks: the run waited for data for ever.
    with pytest.raises(ValueError, match="2 worker\\(s\\) x 2 CPUs and 1 for Ray Data's read tasks need 5 CPUs"):
        train_module._check_resources(TrainConfig(data="d", out="o", num_workers=2), cpus=2.0)
    train_module._check_resources(TrainConfig(data="d", out="o", num_workers=2), cpus=1.5)
    with pytest.raises(ValueError, match="--gpu with 1 worker"):
        train_module._check_resources(TrainConfig(data="d", out="o", gpu=True), cpus=1.0)


def test_the_default_worker_share_leaves_a_cpu_for_reading(ray_cluster: str) -> None:
    assert ray.cluster_resources()["CPU"] == 4  # 3 left for the workers: whole CPUs up to 3, then quarters
    shares = [train_module.default_cpus_per_worker(workers, gpu=False) for workers in (1, 2, 3, 4, 5, 6, 12, 13)]
    assert shares == [1.0, 1.0, 1.0, 0.75, 0.5, 0.5, 0.25, 0.25]  # 0.25: the floor, past what fits (refused)
    assert train_module.default_cpus_per_worker(2, gpu=True) == 1.0
    # A cluster scaled to zero CPU nodes (its head takes no work) grows them on demand.
    assert train_module.default_cpus_per_worker(4, gpu=False, cluster_cpus=0) == 1.0
    assert train_module.default_cpus_per_worker(4, gpu=False, cluster_cpus=64) == 1.0


def _cifar_batch(n: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    rgb = np.stack([scene(rng, 32) for _ in range(n)])
    entry = {b"data": rgb.transpose(0, 3, 1, 2).reshape(n, -1), b"labels": list(range(n))}
    return pickle.dumps(entry)


def test_official_cifar10_python_release_is_read(ray_cluster: str, tmp_path: Path) -> None:
    archive = tmp_path / data.CIFAR_ARCHIVE
    with tarfile.open(archive, "w:gz") as tar:
        for i, name in enumerate([*(f"data_batch_{k}" for k in range(1, 6)), "test_batch"]):
            payload = _cifar_batch(4, i)
            info = tarfile.TarInfo(f"{data.CIFAR_DIR}/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))

    train_rows = data.load_dataset(str(archive), split="train").take_all()
    test_rows = data.load_dataset(str(archive), split="test").take_all()
    assert len(train_rows) == 20 and len(test_rows) == 4
    assert train_rows[0]["rgb"].shape == (32, 32, 3) and train_rows[0]["rgb"].dtype == np.uint8

    summary = train(TrainConfig(data=str(archive), val=str(archive), out=str(tmp_path / "run"), epochs=1, semantic=True,
                                **{**TINY, "image_size": 32}))
    assert summary["images"] == 20 and summary["val_images"] == 4
    assert 0 <= summary["val_class_accuracy"] <= 1  # the archive's labels reached the branch
    assert json.loads((tmp_path / "run" / "config.json").read_text())["classes"] == list(data.CIFAR_CLASSES)


def test_a_limited_cifar_or_parquet_set_is_the_same_rows_every_time(ray_cluster: str, tmp_path: Path) -> None:
    """--limit (and --val-limit) keep the first rows in order, not those of whichever read task ends first."""
    folder = tmp_path / data.CIFAR_DIR
    folder.mkdir()
    for k in range(1, 6):
        (folder / f"data_batch_{k}").write_bytes(_cifar_batch(4, k))
    rng = np.random.default_rng(1)
    expected = [scene(rng, 32) for _ in range(4)] + [scene(np.random.default_rng(2), 32)]
    for _ in range(2):
        rows = data.load_dataset(str(folder), split="train", limit=5).take_all()
        assert [r["label"] for r in rows] == [0, 1, 2, 3, 0]
        assert all(np.array_equal(r["rgb"], e) for r, e in zip(rows, expected))


def test_a_cifar_archive_without_a_batch_says_which_before_ray_starts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Found missing by a read task, training failed after an epoch (three, restarted) in a line without the reason."""
    archive = tmp_path / data.CIFAR_ARCHIVE
    with tarfile.open(archive, "w:gz") as tar:
        for k in range(1, 6):
            payload = _cifar_batch(2, k)
            info = tarfile.TarInfo(f"{data.CIFAR_DIR}/data_batch_{k}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    with pytest.raises(data.DataError, match="no test_batch in this archive, which the test split reads"):
        data.locate(str(archive), split="test")
    data.locate(str(archive))  # the train split's batches are all there
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / data.CIFAR_ARCHIVE).write_bytes(b"not gzip")
    with pytest.raises(data.DataError, match="not a readable CIFAR-10 archive"):
        data.locate(str(tmp_path / "other" / data.CIFAR_ARCHIVE))
    # The command says it in one line, not in Ray's wrapping of the task's error (its traceback).
    from colorize import cli

    assert cli.main(["evaluate", "--data", str(archive)]) == cli.EXIT_USAGE
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("colorize evaluate: error:")]
    assert said == [f"colorize evaluate: error: {archive}: no test_batch in this archive, which the test split reads; "
                    "is it the CIFAR-10 python release?"]


def test_a_cifar_folder_without_a_splits_batch_says_which_before_ray_starts(tmp_path: Path) -> None:
    folder = tmp_path / data.CIFAR_DIR
    folder.mkdir()
    for k in (1, 2, 4, 5):
        (folder / f"data_batch_{k}").write_bytes(_cifar_batch(2, k))
    with pytest.raises(data.DataError, match="no test_batch in this CIFAR-10 folder, which the test split reads"):
        data.locate(str(folder), split="test")
    with pytest.raises(data.DataError, match="no data_batch_3 in this CIFAR-10 folder, which the train split reads"):
        data.locate(str(folder))


def test_a_row_that_pillow_fails_on_in_any_way_is_skipped() -> None:
    good = io.BytesIO()
    Image.fromarray(scene(np.random.default_rng(0), 16)).save(good, "PNG")
    good = good.getvalue()
    # A Parquet image column of path strings: Pillow's TypeError, not an OSError.
    out = data.prepare_batch({"bytes": np.array([good, "photos/a.jpg"], dtype=object)}, image_size=16, augment=False)
    assert out["ok"].tolist() == [True, False]


def test_a_cifar_batch_that_smuggles_an_object_is_refused(ray_cluster: str, tmp_path: Path) -> None:
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    folder = tmp_path / data.CIFAR_DIR
    folder.mkdir()
    (folder / "data_batch_1").write_bytes(pickle.dumps({b"data": Payload()}))
    for k in range(2, 6):
        (folder / f"data_batch_{k}").write_bytes(_cifar_batch(2, k))
    source = data.locate(str(folder))
    with pytest.raises(Exception, match="refusing to load"):
        data.load_dataset(source, split="train").take_all()


def test_training_images_whose_names_are_not_utf8_are_skipped_with_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = write_images(tmp_path / "scenes", 3)
    os.rename(paths[0], os.fsencode(paths[0].parent) + b"/caf\xe9.png")

    source = data.locate(str(tmp_path / "scenes"))

    assert sorted(source.files) == sorted(str(p) for p in paths[1:])
    assert "skipping 1 image(s) whose file names are not valid UTF-8, such as " in capsys.readouterr().err


def test_training_leaves_out_dot_folders_and_dot_files_which_would_be_classes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Jupyter's .ipynb_checkpoints/ and macOS's ._ metadata files beside the class folders."""
    root = tmp_path / ".data"  # a dot folder given as the data is read
    paths = write_images(root, 2)
    (root / ".ipynb_checkpoints").mkdir()
    shutil.copy(paths[0], root / ".ipynb_checkpoints" / "0-checkpoint.jpg")
    shutil.copy(paths[0], root / "class0" / "._0.jpg")

    source = data.locate(str(root))

    assert sorted(source.files) == sorted(str(p) for p in paths) and data.class_names(source) == ("class0", "class1")
    assert len(source.left_out) == 2
    assert "skipping 2 image(s) that are dot files or lie in dot folders" in capsys.readouterr().err
    assert data.locate(str(root / "class0" / "._0.jpg")).files == (str(root / "class0" / "._0.jpg"),)  # named: read


def test_images_in_the_callers_output_inside_the_data_are_left_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``evaluate --data imgs --out imgs/eval`` run twice must not score its own grid.png."""
    paths = write_images(tmp_path / "imgs", 3)
    write_images(tmp_path / "imgs" / "eval", 2)  # grid.png and the like, from an earlier run
    (tmp_path / "link").symlink_to(tmp_path / "imgs")

    for data_uri, out in [(tmp_path / "imgs", tmp_path / "imgs" / "eval"), (tmp_path / "link", tmp_path / "imgs" / "eval"),
                          (tmp_path / "imgs", tmp_path / "link" / "eval/")]:
        source = data.locate(str(data_uri), output=str(out))
        assert sorted(source.files) == sorted(str(data_uri / p.relative_to(tmp_path / "imgs")) for p in paths)
        assert "left out 2 image(s) in the --out folder inside it" in capsys.readouterr().err
    assert len(data.locate(str(tmp_path / "imgs"), output=str(tmp_path / "elsewhere")).files) == 5
    assert len(data.locate(str(tmp_path / "imgs"), output=str(tmp_path)).files) == 5  # writes beside the data
    # An --out reached through a folder link inside the data, which the listing follows.
    write_images(tmp_path / "results" / "eval", 2, seed=1)
    (tmp_path / "imgs" / "results").symlink_to(tmp_path / "results")
    for out in (tmp_path / "imgs" / "results" / "eval", tmp_path / "results" / "eval"):
        assert len(data.locate(str(tmp_path / "imgs"), output=str(out)).files) == 5
    assert len(data.locate(str(tmp_path / "imgs"), output=str(tmp_path / "results" / "other")).files) == 7
    with pytest.raises(data.DataError, match="--out is the data folder itself"):
        data.locate(str(tmp_path / "imgs"), output=str(tmp_path / "link"))


def test_class_folders_named_alike_up_to_unicode_normalisation_are_one_class(tmp_path: Path) -> None:
    """A val/ copied from macOS (NFD) must label its images with train/'s (NFC) classes, not -1."""
    for split, form in (("train", "NFC"), ("val", "NFD")):
        for name in ("chien ü", "chat"):
            write_images(tmp_path / split / unicodedata.normalize(form, name), 1)
    train_source, val_source = data.locate(str(tmp_path / "train")), data.locate(str(tmp_path / "val"))
    classes = data.class_names(train_source)
    assert classes == data.class_names(val_source) == ("chat", "chien ü")
    batch = {"path": np.array(val_source.files, dtype=object)}
    labels = data._label_rows(batch, kind="files", root=val_source.path, class_index={c: i for i, c in enumerate(classes)})
    assert sorted(labels["label"].tolist()) == [0, 1]


def test_a_folders_classes_are_those_of_every_image_whatever_the_limit(tmp_path: Path) -> None:
    """A --limit smoke test must give the model the classes the full run will have."""
    for name in "abcde":
        write_images(tmp_path / "classes" / name, 4)

    limited = data.locate(str(tmp_path / "classes"), limit=3)

    assert len(limited.files) == 3 and data.class_names(limited) == ("a", "b", "c", "d", "e")


def test_parquet_files_beside_images_are_left_out_with_a_warning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Hugging Face's image-folder layout keeps a metadata.parquet beside the images."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = write_images(tmp_path / "photos", 4)
    pq.write_table(pa.table({"file_name": ["0000.jpg"], "caption": ["a field"]}), tmp_path / "photos" / "metadata.parquet")

    source = data.locate(str(tmp_path / "photos"))

    assert source.kind == "files" and sorted(source.files) == sorted(str(p) for p in paths)
    assert "reading its image files, not the 1 Parquet file(s) without an 'image' column beside them" in capsys.readouterr().err
    (tmp_path / "shards" / "assets").mkdir(parents=True)
    pq.write_table(pa.table({"image": [paths[0].read_bytes()]}), tmp_path / "shards" / "part-0.parquet")
    assert data.locate(str(tmp_path / "shards")).kind == "parquet"
    paths[0].rename(tmp_path / "shards" / "assets" / "banner.jpg")  # a README's picture beside real shards
    assert data.locate(str(tmp_path / "shards")).kind == "parquet"
    assert "reading its Parquet shards, not the 1 image file(s) beside them" in capsys.readouterr().err


def test_parquet_without_an_image_column_is_refused_before_ray_starts(tmp_path: Path) -> None:
    """The bulk job's Parquet output, given as training data, was refused only once Ray had started."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "bulk").mkdir()
    bulk = pa.table({"source": ["a.jpg"], "relpath": ["a.jpg"], "width": [4], "height": [4], "png": [b"png"], "weights": ["w"]})
    pq.write_table(bulk, tmp_path / "bulk" / "part-00000.parquet")
    pq.write_table(pa.table({"pixels": [b"x"]}), tmp_path / "other.parquet")

    with pytest.raises(data.DataError, match=re.escape("part-00000.parquet: Parquet shards need an 'image' column of bytes, "
                                                       "found ['source', 'relpath', 'width', 'height', 'png', 'weights']; "
                                                       "these are `colorize run`'s output")):
        data.locate(str(tmp_path / "bulk"))
    with pytest.raises(data.DataError, match=re.escape("other.parquet: Parquet shards need an 'image' column of bytes, found ['pixels']")):
        data.locate(str(tmp_path / "other.parquet"))


def test_a_folder_of_split_folders_is_read_whole_with_the_split_to_pass(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """CIFAR-10 as JPEG folders (train/, test/) was read whole without a word: evaluate scored
    50,000 training images with the 10,000 test ones, and training learnt from the test split."""
    for split, n in (("train", 6), ("test", 4), ("validation", 2)):
        write_images(tmp_path / "cifar" / split, n)
    (tmp_path / "cifar" / "training-notes.jpg").write_bytes(b"")  # a file at the top names no split

    assert len(data.locate(str(tmp_path / "cifar")).files) == 13
    warning = capsys.readouterr().err
    assert "reading all its images, 6 of them named for a validation or test split" in warning
    assert f"pass --data '{tmp_path}/cifar/train' for the training images alone" in warning
    data.locate(str(tmp_path / "cifar"), split="test")  # as evaluate and --val read it
    warning = capsys.readouterr().err
    assert "8 of them named for a training or validation split, such as " in warning
    assert f"pass --data '{tmp_path}/cifar/test' for the test images alone" in warning

    shutil.rmtree(tmp_path / "cifar" / "test")
    data.locate(str(tmp_path / "cifar"), split="test")
    assert f"pass --data '{tmp_path}/cifar/validation' for the validation images alone" in capsys.readouterr().err
    shutil.rmtree(tmp_path / "cifar" / "validation")
    for name in ("valley", "train_station", "testudo"):  # classes, not splits
        write_images(tmp_path / "classes" / name, 2)
    for quiet in (tmp_path / "cifar", tmp_path / "cifar" / "train", tmp_path / "classes"):  # one split, or class folders alone
        data.locate(str(quiet), split="test")
        assert capsys.readouterr().err == ""


def test_a_hugging_face_parquet_folder_trains_on_the_shards_a_pattern_selects(
    ray_cluster: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Hugging Face keeps README.md beside data/{train,validation,test}-*.parquet: the class
    listing read README.md as Parquet, and training read the test shards, labels -1 and all."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    payloads = [p.read_bytes() for p in write_images(tmp_path / "scenes", 8)]
    (tmp_path / "hf" / "data").mkdir(parents=True)
    (tmp_path / "hf" / "README.md").write_text("---\nlicense: other\n---\n")
    for split, labels in (("train", [0, 1, 2, 0]), ("validation", [1, 2]), ("test", [-1, -1])):
        pq.write_table(pa.table({"image": payloads[: len(labels)], "label": labels}), tmp_path / "hf" / "data" / f"{split}-00000-of-00001.parquet")

    whole = data.locate(str(tmp_path / "hf"))
    assert len(whole.files) == 3
    warning = capsys.readouterr().err
    assert "reading all its shards, 2 of them named for a validation or test split" in warning
    assert f"pass --data '{tmp_path}/hf/data/train*.parquet' for the training shards alone" in warning
    data.locate(str(tmp_path / "hf"), split="test")  # evaluate's advice is the test shards'
    assert f"pass --data '{tmp_path}/hf/data/test*.parquet' for the test shards alone" in capsys.readouterr().err
    train_only = data.locate(f"{tmp_path}/hf/data/train*.parquet")
    assert data.class_names(train_only) == ("0", "1", "2")  # README.md is not read as Parquet
    assert len(data.load_dataset(train_only).take_all()) == 4
    assert len(data.load_dataset(f"{tmp_path}/hf/*validation-*.parquet").take_all()) == 2  # "*" spans folders
    with pytest.raises(data.DataError, match="no file matches 'val-\\*.parquet'"):
        data.locate(f"{tmp_path}/hf/data/val-*.parquet")
    with pytest.raises(data.DataError, match="a pattern selects Parquet shards, and it matches .*README.md"):
        data.locate(f"{tmp_path}/hf/*")

    # Hidden and underscored files are no shards, as Ray's reader of a folder has it (Spark's leftovers).
    for hidden in ("_temporary/0/part-0.parquet", ".train-1.parquet"):
        (tmp_path / "hf" / "data" / hidden).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / "hf" / "data" / "train-00000-of-00001.parquet", tmp_path / "hf" / "data" / hidden)
    assert len(data.locate(str(tmp_path / "hf" / "data")).files) == 3
    assert len(data.locate(f"{tmp_path}/hf/data/*train*.parquet").files) == 1
    # The converted layout keeps a folder a split; Spark writes x.parquet as a folder.
    (tmp_path / "hf" / "data").rename(tmp_path / "hf" / "x.parquet")
    for split in ("train", "test"):
        (tmp_path / "hf" / "default" / split).mkdir(parents=True)
        shutil.copy(tmp_path / "hf" / "x.parquet" / f"{split}-00000-of-00001.parquet", tmp_path / "hf" / "default" / split / "0000.parquet")
    capsys.readouterr()
    data.locate(str(tmp_path / "hf" / "default"))
    assert f"pass --data '{tmp_path}/hf/default/train' for the training shards alone" in capsys.readouterr().err
    spark = data.locate(str(tmp_path / "hf" / "x.parquet"))
    assert spark.kind == "parquet" and [Path(f).name for f in spark.files] == [
        "test-00000-of-00001.parquet", "train-00000-of-00001.parquet", "validation-00000-of-00001.parquet"]

    (tmp_path / "hf" / "x.parquet" / "test-00000-of-00001.parquet").rename(tmp_path / "hf" / "x.parquet" / "test?.parquet")
    with pytest.raises(data.DataError, match="a '\\?' in a shard's name makes Ray Data skip it"):
        data.locate(str(tmp_path / "hf" / "x.parquet"))


def test_an_archive_as_training_data_is_refused_saying_what_to_do(tmp_path: Path) -> None:
    paths = write_images(tmp_path / "scenes", 2)
    with tarfile.open(tmp_path / "scenes.tar.gz", "w:gz") as tar:
        for path in paths:
            tar.add(path, arcname=path.name)
    for given in (tmp_path / "scenes.tar.gz", tmp_path):
        if given == tmp_path:
            shutil.rmtree(tmp_path / "scenes")
        with pytest.raises(data.DataError, match="training does not read archives: extract it, or pack it as Parquet"):
            data.locate(str(given))


def test_training_skips_pipes_and_dangling_links_with_a_warning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A read task opening a named pipe would wait for a writer forever."""
    paths = write_images(tmp_path / "scenes", 2)
    os.mkfifo(tmp_path / "scenes" / "pipe.png")
    os.symlink(tmp_path / "missing.png", tmp_path / "scenes" / "dangling.png")

    source = data.locate(str(tmp_path / "scenes"))

    assert sorted(source.files) == sorted(str(p) for p in paths)
    assert "skipping 2 image(s) that are not regular files (dangling links, pipes, devices), such as " in capsys.readouterr().err


def test_training_from_an_s3_folder(ray_cluster: str, s3, tmp_path: Path) -> None:
    local = tmp_path / "scenes"
    paths = write_images(local, 32)
    bucket = s3.bucket("train-data")
    fs, root = storage.resolve(bucket, s3.settings)
    for path in paths:
        storage.write_bytes_atomic(fs, storage.join(root, "scenes", str(path.relative_to(local))), path.read_bytes())

    summary = train(TrainConfig(data=f"{bucket}/scenes", val=f"{bucket}/scenes", out=str(tmp_path / "run"), epochs=1,
                                semantic=True, s3_endpoint=s3.endpoint, **TINY))
    assert summary["images"] == 32
    assert "val_class_accuracy" in summary  # the class folders were found under the S3 prefix


def test_an_object_gone_is_an_unreadable_row_and_unreachable_storage_says_why(s3, tmp_path: Path) -> None:
    """Every file unreadable, with no reason given, was what a worker that cannot reach S3 got."""
    bucket = s3.bucket("train-reads")
    fs, root = storage.resolve(bucket, s3.settings)
    storage.write_bytes_atomic(fs, storage.join(root, "a.png"), b"some bytes")
    paths = np.array([storage.join(root, "a.png"), storage.join(root, "gone.png")], dtype=object)

    assert [len(b) for b in data._read_files({"path": paths}, fs=fs, with_paths=False)["bytes"]] == [10, 0]

    (port,) = free_ports(1)
    unreachable, _ = storage.resolve(bucket, storage.S3Settings(endpoint=f"http://127.0.0.1:{port}"))
    with pytest.raises(storage.StorageError, match="cannot reach S3 endpoint"):
        data._read_files({"path": paths}, fs=unreachable, with_paths=False)


def test_training_from_parquet_shards(ray_cluster: str, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    payloads = [p.read_bytes() for p in write_images(tmp_path / "scenes", 24)]
    binary, hf = tmp_path / "binary", tmp_path / "hf"
    binary.mkdir()
    hf.mkdir()
    for shard in range(2):
        rows = payloads[6 * shard : 6 * shard + 6]
        pq.write_table(pa.table({"image": rows, "label": list(range(6))}), binary / f"part-{shard}.parquet")
    # The Hugging Face layout: a struct of bytes and path.
    pq.write_table(pa.table({"image": [{"bytes": b, "path": f"{i}.jpg"} for i, b in enumerate(payloads[12:])]}),
                   hf / "train.parquet")

    assert data.locate(str(binary)).kind == "parquet"
    assert train(TrainConfig(data=str(binary), out=str(tmp_path / "run1"), epochs=1, **TINY))["images"] == 12
    # The struct layout differs from the binary one only in how the rows are read, before the
    # workers: its training rows, not a second fit() (~35 s of actors and Parquet read tasks).
    rows = data.lab_dataset(data.locate(str(hf / "train.parquet")), image_size=16, augment=True).take_all()
    assert len(rows) == 12 and all(r["ok"] for r in rows)


def test_a_failed_run_s_line_names_what_the_failing_worker_raised() -> None:
    """It named Ray's wrapping ("RayTaskError(UnpicklingError): <ANSI>ray::SplitCoordinator.get()..."),
    and rank 0's "Connection closed by peer" when rank 1 had died."""
    from ray.exceptions import RayTaskError
    from ray.train.v2.api.exceptions import WorkerGroupError

    raised = data.DataError("cifar-10-python.tar.gz: no test_batch in this archive")
    inner = RayTaskError("MapBatches(_read_cifar_batch)", "\x1b[36mray::MapBatches()\x1b[39m (pid=1)", raised)
    outer = RayTaskError("SplitCoordinator.get", "\x1b[36mray::SplitCoordinator.get()\x1b[39m", inner.as_instanceof_cause())
    line = train_module._why(WorkerGroupError("failed", {0: outer.as_instanceof_cause()}), 2)
    assert line == ("training failed after 2 restart(s) (--max-failures): worker 0: "
                    "DataError: cifar-10-python.tar.gz: no test_batch in this archive")

    peer = RuntimeError("[third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer [10.0.0.2]:8473")
    died = RuntimeError("A worker health check failed")
    assert train_module._why(WorkerGroupError("failed", {0: peer, 1: died}), 0) == (
        "training failed: worker 1: RuntimeError: A worker health check failed")
    assert train_module._why(WorkerGroupError("failed", {0: peer, 1: peer}), 0).startswith("training failed: worker 0: ")
    assert errors.first_line("\x1b[36mray::Task()\x1b[39m (pid=1)") == "ray::Task() (pid=1)"
