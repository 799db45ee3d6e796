"""The pretext-task probe and the ablation study, on small real images."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from colorize import ablation, colorizer, imagesets, storage
from colorize.models import ModelConfig, build_model
from colorize.probe import ProbeConfig, encoder_features, linear_probe, probe
from tests.helpers import scene


def write_classes(root: Path, n: int, seed: int) -> None:
    """Two classes a linear probe can tell apart: daylight scenes and the same scenes at dusk."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        img = scene(rng, 16)
        name = "day" if i % 2 else "dusk"
        if name == "dusk":
            img = (img * 0.35).astype(np.uint8)
        path = root / name / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("labelled")
    write_classes(root / "train", 64, seed=0)
    write_classes(root / "test", 96, seed=1)
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "model.pt"
    torch.manual_seed(0)  # not whatever state the tests before it left
    path.write_bytes(colorizer.weights_bytes(build_model(ModelConfig(width=4, depth=2, image_size=16))))
    return path


def test_the_probe_reports_both_encoders_and_separates_easy_classes(labelled: Path, weights: Path, tmp_path: Path) -> None:
    report = probe(ProbeConfig(data=str(labelled), weights=str(weights), epochs=20, out=str(tmp_path)))
    assert report["train_images"] == 64 and report["test_images"] == 96 and report["classes"] == 2
    assert report["features"] == 4 + 8 + 16
    assert report["chance"] == 0.5 and report["test_images_in_train"] == 0
    assert report["seed"] == 0 and report["epochs"] == 20  # what the numbers depend on, beside the data and weights
    assert report["accuracy_colourisation"] > 0.9 and report["accuracy_random_init"] > 0.9
    for name in ("accuracy_colourisation", "accuracy_random_init"):  # exact fractions, not float32's 0.8799999952316284
        assert report[name] == round(report[name] * 96) / 96
    assert json.loads((tmp_path / "probe.json").read_text()) == report


def test_test_images_also_in_train_are_counted_and_warned_about(labelled: Path, weights: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    """Nothing checked that the splits were apart: a copy in both is scored on an image the probe was fitted to."""
    data = tmp_path / "data"
    shutil.copytree(labelled, data)
    for path in sorted((data / "train" / "day").iterdir())[:3]:  # renamed: the same pixels, not the same name
        shutil.copy(path, data / "test" / "day" / f"copy-{path.name}")
    report = probe(ProbeConfig(data=str(data), weights=str(weights), epochs=2))
    assert report["test_images"] == 99 and report["test_images_in_train"] == 3
    assert "warning: 3 of the 99 test/ images are also in train/ (the same pixels at 16 px)" in capsys.readouterr().err


def test_the_probe_reads_its_weights_from_s3_and_writes_its_report_there(labelled: Path, weights: Path, s3) -> None:
    bucket = s3.bucket("probe")
    fs, root = storage.resolve(bucket, s3.settings)
    storage.write_bytes_atomic(fs, storage.join(root, "w.pt"), weights.read_bytes())

    report = probe(ProbeConfig(data=str(labelled), weights=f"{bucket}/w.pt", out=f"{bucket}/report", epochs=5,
                               s3_endpoint=s3.endpoint))

    assert json.loads(storage.read_bytes(fs, storage.join(root, "report", "probe.json"))) == report


def test_the_probe_scores_the_encoder_it_was_given(labelled: Path, tmp_path: Path) -> None:
    """An encoder whose every weight is zero sees nothing: chance, while the random one still separates."""
    blind = build_model(ModelConfig(width=4, depth=2, image_size=16))
    with torch.no_grad():
        for parameter in blind.parameters():
            parameter.zero_()
    (tmp_path / "blind.pt").write_bytes(colorizer.weights_bytes(blind))
    report = probe(ProbeConfig(data=str(labelled), weights=str(tmp_path / "blind.pt"), epochs=20))
    assert report["accuracy_colourisation"] == report["chance"] == 0.5
    assert report["accuracy_random_init"] > 0.9


def test_a_feature_constant_on_the_training_images_cannot_sway_the_test_predictions() -> None:
    """A ReLU that never fires on train: divided by a floor of 1e-6, where it fired a little on
    a test image its value reached ~19,000, times a weight the probe never trained."""
    rng = np.random.default_rng(0)
    train_y, test_y = torch.arange(40) % 2, torch.arange(20) % 2
    train_x = torch.from_numpy(rng.normal(0, 1, (40, 7))).float()  # 4 features of noise, then 3 silent ones
    test_x = torch.from_numpy(rng.normal(0, 1, (20, 7))).float()
    train_x[:, 0], test_x[:, 0] = 4 * train_y, 4 * test_y  # the first tells the classes apart
    train_x[:, 4:], test_x[:, 4:] = 0.0, 0.02  # silent on every training image
    accuracy = [linear_probe(train_x, train_y, test_x, test_y, classes=2, epochs=100, seed=seed) for seed in range(8)]
    assert accuracy == [1.0] * 8
    train_x[0, 4:] = 1e-4  # or firing faintly on a single training image
    accuracy = [linear_probe(train_x, train_y, test_x, test_y, classes=2, epochs=100, seed=seed) for seed in range(8)]
    assert accuracy == [1.0] * 8


@pytest.mark.parametrize(("arch", "features"), [("unet", 4 + 8 + 16), ("autoencoder", 4 + 8)])
def test_the_probe_pools_every_encoder_stage(arch: str, features: int) -> None:
    model = build_model(ModelConfig(arch=arch, width=4, depth=2, image_size=16))
    rgb = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    assert encoder_features(model, rgb).shape == (3, features)


def test_the_probe_refuses_mismatched_class_folders(labelled: Path, weights: Path, tmp_path: Path) -> None:
    write_classes(tmp_path / "train", 8, seed=0)
    (tmp_path / "test" / "other").mkdir(parents=True)
    Image.fromarray(scene(np.random.default_rng(0), 16)).save(tmp_path / "test" / "other" / "x.png")
    with pytest.raises(ValueError, match=r"only in train/: day, dusk; only in test/: other\)"):
        probe(ProbeConfig(data=str(tmp_path), weights=str(weights), epochs=1))


def test_the_probe_refuses_a_single_class(weights: Path, tmp_path: Path) -> None:
    """With one class every probe scores 1.0, which would read as a perfect encoder."""
    for split in ("train", "test"):
        write_classes(tmp_path / split, 4, seed=0)
        shutil.rmtree(tmp_path / split / "dusk")
    with pytest.raises(ValueError, match="at least 2 classes to tell apart, found only 'day'"):
        probe(ProbeConfig(data=str(tmp_path), weights=str(weights), epochs=1))


def test_the_probe_skips_and_counts_unreadable_images(weights: Path, tmp_path: Path) -> None:
    write_classes(tmp_path / "train", 8, seed=0)
    write_classes(tmp_path / "test", 8, seed=1)
    (tmp_path / "train" / "day" / "truncated.png").write_bytes((tmp_path / "train" / "day" / "001.png").read_bytes()[:40])
    (tmp_path / "test" / "dusk" / "garbage.jpg").write_bytes(b"not a picture")
    (tmp_path / "test" / "dusk" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (tmp_path / "test" / "stale.jpg").symlink_to(tmp_path / "nowhere.jpg")  # not a loose image: no image at all
    report = probe(ProbeConfig(data=str(tmp_path), weights=str(weights), epochs=1))
    assert (report["train_images"], report["test_images"], report["unreadable"]) == (8, 8, 4)
    assert report["unreadable_files"] == [str(tmp_path / path) for path in
                                          ("train/day/truncated.png", "test/dusk/garbage.jpg", "test/dusk/gone.jpg", "test/stale.jpg")]


def test_the_ablation_writes_its_table_and_grid(tmp_path: Path, capsys) -> None:
    data = tmp_path / "data"
    write_classes(data / "train", 64, seed=0)
    write_classes(data / "test", 80, seed=1)
    out = tmp_path / "docs"
    ablation.main(["--data", str(data), "--out", str(out), "--weights-dir", str(tmp_path / "w"), "--variants",
                   "unet-class,unet-psnr-semantic", "--width-scale", "0.125", "--epochs", "1", "--batch-size", "16",
                   "--image-size", "16"])
    results = json.loads((out / "ablation.json").read_text())
    assert [r["variant"] for r in results["rows"]] == [
        "unet-psnr-semantic", "unet-class", "unet-class T=0.2", "unet-class T=0.6", "unet-class T=1"]
    assert all(np.isfinite(r["psnr"]) and r["parameters"] > 0 for r in results["rows"])
    table = (out / "ablation.md").read_text()
    assert "gray baseline" in table and "unet-class T=0.6" in table
    assert table.splitlines()[1].startswith("Test images: 80 (16 px, from data/test).")  # not CIFAR-10's
    grid = Image.open(out / "ablation-grid.png")
    assert grid.height >= 6 * 64  # gray, four rows, truth
    model, _ = colorizer.load_weights(str(tmp_path / "w" / "unet-class.pt"))
    assert model.config.head == "classification" and model.config.width == 4
    semantic, _ = colorizer.load_weights(str(tmp_path / "w" / "unet-psnr-semantic.pt"))
    assert semantic.config.classes == 2  # the training folder's classes, not CIFAR-10's ten

    (out / "ablation.md").unlink()
    before = (out / "ablation.json").read_text()
    strip = out / "ablation" / "unet-psnr-semantic.png"
    drawn = strip.read_bytes()
    # A later study writes another model under the same name: not the model this row scored.
    (tmp_path / "w" / "unet-psnr-semantic.pt").write_bytes(colorizer.weights_bytes(build_model(semantic.config)))
    ablation.main(["--data", str(data), "--out", str(out), "--report-only", "--image-size", "16", "--variants", "unet-class"])
    assert "unet-class T=0.6" in (out / "ablation.md").read_text()
    assert (out / "ablation.json").read_text() == before  # a redraw, not a rescoring
    assert strip.read_bytes() == drawn  # its strip is not redrawn from that other model
    assert "1 row(s) keep their drawn strips, such as unet-psnr-semantic" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # another test set would replace the grey row beside rows scored on this one
        ablation.main(["--data", str(data), "--out", str(out), "--report-only", "--image-size", "16", "--test-limit", "3"])
    assert "this run's --data, --test-limit and --image-size give 3 at 16 px of data/test" in capsys.readouterr().err
    assert (out / "ablation.json").read_text() == before
    shutil.copytree(data, tmp_path / "other")  # as many test images, at the same size: another folder all the same
    with pytest.raises(SystemExit):
        ablation.main(["--data", str(tmp_path / "other"), "--out", str(out), "--report-only", "--image-size", "16"])
    assert "80 test images at 16 px of data/test; this run's" in capsys.readouterr().err


def test_the_ablation_reports_a_test_split_all_grey_in_truth_and_names_unreadable_files(tmp_path: Path, capsys) -> None:
    """With no colour image to score the baseline over, its report failed (None:.2f) on every later run."""
    data = tmp_path / "data"
    for i in range(4):
        path = data / "test" / "grey" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((16, 16, 3), 40 * i, dtype=np.uint8)).save(path)
    (data / "test" / "grey" / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "docs"

    ablation.main(["--data", str(data), "--out", str(out), "--report-only", "--image-size", "16"])

    header = (out / "ablation.md").read_text().splitlines()[1]
    assert header.endswith("4 of them are grey in truth: the baseline copies those exactly, at the 100 dB cap.")
    assert f"skipped 1 file(s) that could not be read, such as {data / 'test' / 'grey' / 'broken.jpg'}" in capsys.readouterr().out


def test_the_ablation_on_a_folder_without_splits_exits_with_one_error_line(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        ablation.main(["--data", str(tmp_path), "--out", str(tmp_path / "docs")])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "no such folder; expected a folder of class folders" in errors[0]
    with pytest.raises(SystemExit):
        ablation.main(["--data", "s3://bucket/cifar10", "--out", str(tmp_path / "docs")])
    assert "s3://bucket/cifar10/test: an S3 URI, but this command reads a local folder" in capsys.readouterr().err


def test_the_ablation_refuses_folders_it_cannot_write_and_sizes_too_large_before_any_training(
    labelled: Path, tmp_path: Path, capsys
) -> None:
    """A --weights-dir that was a file failed with a traceback after the first variant had trained."""
    (tmp_path / "a-file").write_bytes(b"")
    for flags, reason in ((["--weights-dir", str(tmp_path / "a-file")], "--weights-dir: cannot write in"),
                          (["--out", str(tmp_path / "a-file")], "--out: cannot write in"),
                          (["--image-size", "100000"], "--image-size 100000 is above 1024")):
        with pytest.raises(SystemExit) as exit_info:
            ablation.main(["--data", str(labelled), "--out", str(tmp_path / "docs"), "--weights-dir", str(tmp_path / "w"),
                           "--variants", "unet-mse", *flags])
        errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert exit_info.value.code == 2 and len(errors) == 1 and reason in errors[0], errors
    assert not list(tmp_path.glob("**/*.pt"))
    # A redraw trains nothing, so it needs no --weights-dir.
    ablation.main(["--data", str(labelled), "--out", str(tmp_path / "docs"), "--weights-dir", str(tmp_path / "a-file"),
                   "--report-only", "--image-size", "16"])
    assert "--weights-dir" not in capsys.readouterr().err


def test_the_ablation_refuses_a_semantic_variant_on_one_class_in_one_line(labelled: Path, tmp_path: Path, capsys) -> None:
    data = tmp_path / "one"
    for split in ("train", "test"):
        shutil.copytree(labelled / "train" / "day", data / split / "day")
    with pytest.raises(SystemExit) as exit_info:
        ablation.main(["--data", str(data), "--out", str(tmp_path / "docs"), "--variants", "unet-psnr-semantic",
                       "--image-size", "16"])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "unet-psnr-semantic learns the classes of" in errors[0] and "only one class folder" in errors[0]


def test_the_ablation_refuses_bad_numbers_in_one_line_before_reading_data(tmp_path: Path, capsys) -> None:
    for argv, reason in ((["--epochs", "0"], "epochs must be at least 1, got 0"),
                         (["--batch-size", "-4"], "batch size must be at least 1, got -4"),
                         (["--lr", "0"], "learning rate must be > 0, got 0.0"),
                         (["--lr", "nan"], "learning rate must be > 0, got nan"),
                         (["--limit", "0"], "--limit must be at least 1, got 0"),
                         (["--test-limit", "-1"], "--test-limit must be at least 1, got -1"),
                         (["--width-scale", "0"], "--width-scale must be a finite number > 0, got 0.0"),
                         (["--width-scale", "inf"], "--width-scale must be a finite number > 0, got inf"),
                         (["--image-size", "8"], "--image-size 8 is below SSIM's 11 px window"),
                         (["--image-size", "20"], "--image-size: image_size 20 must be a positive multiple of 2**depth = 8"),
                         (["--variants", "unet-mse,unet-msee"], "--variants: unknown name 'unet-msee'"),
                         (["--device", "gpu"], "device 'gpu' is not a torch device"),
                         # A rerun would train on the strips it wrote there, the test split's truth among them.
                         (["--out", str(tmp_path / "none" / "train" / "docs")],
                          f"--out {tmp_path / 'none' / 'train' / 'docs'} lies inside {tmp_path / 'none' / 'train'}, which"),
                         # It wrote to a local folder named s3:
                         (["--out", "s3://bucket/docs"], "--out s3://bucket/docs: an S3 URI, but this job writes to a local"),
                         (["--weights-dir", "S3://bucket/w"], "--weights-dir S3://bucket/w: an S3 URI"),
                         *([(["--device", "cuda"], "this machine has no CUDA GPU")] if not torch.cuda.is_available() else [])):
        with pytest.raises(SystemExit) as exit_info:  # --data does not exist: the numbers are checked first
            ablation.main(["--data", str(tmp_path / "none"), "--out", str(tmp_path / "docs"), *argv])
        assert exit_info.value.code == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert len(errors) == 1 and reason in errors[0], errors
    assert not (tmp_path / "docs").exists()
    with pytest.raises(ValueError, match="seconds must be > 0, got 0"):
        ablation.Budget(seconds=0)


def test_the_photo_model_job_refuses_missing_photos_weights_and_bad_flags_in_one_line(
    labelled: Path, weights: Path, tmp_path: Path, capsys
) -> None:
    from jobs import photo_model

    eight = tmp_path / "eight"
    write_classes(eight, 8, seed=2)

    for argv, reason in ((["--data", str(tmp_path / "none")], "none: no such folder; expected a folder of class folders"),
                         (["--data", "s3://bucket/photos"], "an S3 URI, but this command reads a local folder"),
                         (["--data", str(labelled / "train"), "--compare", str(tmp_path / "no.pt")], "no such weights file"),
                         (["--data", str(labelled / "train"), "--cf-weight", "-0.1"], "--cf-weight must be >= 0"),
                         (["--data", str(labelled / "train"), "--gan-weight", "-1"], "--gan-weight must be >= 0"),
                         (["--data", str(labelled / "train"), "--minutes", "0"], "--minutes must be > 0"),
                         (["--data", str(labelled / "train"), "--width", "0"], "--width must be > 0"),
                         (["--data", str(labelled / "train"), "--limit", "-3"], "--limit must be > 0"),
                         (["--data", str(labelled / "train"), "--threads", "0"], "--threads must be > 0"),
                         (["--data", str(labelled / "train"), "--score-every", "-1"], "--score-every must be >= 0"),
                         (["--data", str(labelled / "train"), "--init", str(weights), "--width", "8"],
                          "leave out --width 8 (it has 4)"),
                         (["--data", str(labelled / "train"), "--init", str(weights), "--size", "18"],
                          "--size 18 must be divisible by 2**depth = 4"),
                         (["--data", str(labelled / "train"), "--size", "40"], "--size 40 must be divisible by 2**depth = 16"),
                         (["--data", str(eight)], "8 images leave 0 to train on and 8 to hold out"),
                         # Checked before the photos load (--data names no folder): they failed after, in a traceback.
                         (["--data", str(tmp_path / "none"), "--head", "classification", "--loss", "huber"],
                          "--loss huber does not fit the classification head"),
                         (["--data", str(tmp_path / "none"), "--init", str(weights), "--loss", "ce"],
                          f"--loss ce does not fit the regression head (ce is for classification) of --init {weights}"),
                         (["--data", str(tmp_path / "none"), "--device", "gpu"], "device 'gpu' is not a torch device"),
                         (["--data", str(tmp_path / "none"), "--size", "8", "--depth", "2"], "--size must be from 11 to"),
                         (["--data", str(tmp_path)], f"--out {tmp_path / 'out'} lies inside --data {tmp_path}")):
        with pytest.raises(SystemExit) as exit_info:
            photo_model.main([*argv, "--out", str(tmp_path / "out")])
        assert exit_info.value.code == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert len(errors) == 1 and reason in errors[0], errors
    assert not (tmp_path / "out" / "model.pt").exists()
    with pytest.raises(SystemExit):  # it trained, then wrote to a local folder named s3:
        photo_model.main(["--data", str(labelled / "train"), "--out", "s3://bucket/photo-model"])
    assert "--out s3://bucket/photo-model: an S3 URI, but this job writes to a local folder" in capsys.readouterr().err
    assert not Path("s3:").exists()


def test_a_photo_model_rerun_names_unreadable_photos_and_never_leaves_an_earlier_runs_files_beside_its_model(
    labelled: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    from jobs import photo_model

    photos = tmp_path / "photos"
    shutil.copytree(labelled / "train", photos)
    (photos / "day" / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "out"
    argv = ["--data", str(photos), "--size", "16", "--width", "4", "--depth", "2", "--epochs", "1", "--batch-size", "16",
            "--threads", "1", "--out", str(out)]
    photo_model.main([*argv, "--head", "classification"])  # --loss: ce, which fits that head (huber failed after loading)

    first = json.loads((out / "metrics.json").read_text())
    assert first["loss"] == "ce" and first["unreadable"] == {str(photos): [str(photos / "day" / "broken.jpg")]}
    assert f"{photos}: skipped 1 file(s) that could not be read, such as {photos / 'day' / 'broken.jpg'}" in capsys.readouterr().out

    seen: dict[str, object] = {}
    fit, score = ablation.fit, photo_model.score

    def fit_watched(*args, **kwargs):  # the real training, noting what OUT holds as it starts
        seen["at_training"] = sorted(p.name for p in out.iterdir())
        return fit(*args, **kwargs)

    def score_watched(model, images):  # the real scoring, noting which weights model.pt holds by then
        seen.setdefault("at_scoring", colorizer.weights_id((out / "model.pt").read_bytes()))
        return score(model, images)

    monkeypatch.setattr(ablation, "fit", fit_watched)
    monkeypatch.setattr(photo_model, "score", score_watched)
    # --keep-best with no scoring epoch reached (5 > --epochs 1): no best to have written either.
    photo_model.main([*argv, "--loss", "psnr", "--score-every", "5", "--keep-best"])

    assert seen["at_training"] == ["model.pt"]  # not the first run's metrics.json and holdout.png
    assert seen["at_scoring"] == json.loads((out / "metrics.json").read_text())["weights_id"] != first["weights_id"]


def test_a_photo_model_fine_tune_of_a_shallower_model_takes_a_size_its_depth_allows(
    labelled: Path, weights: Path, tmp_path: Path
) -> None:
    """12 px suits the depth-2 --init; a fresh depth-4 model built first refused it after the photos had loaded."""
    from jobs import photo_model

    photo_model.main(["--data", str(labelled / "train"), "--init", str(weights), "--size", "12", "--epochs", "1",
                      "--batch-size", "16", "--threads", "1", "--out", str(tmp_path / "o")])
    tuned, _ = colorizer.load_weights(str(tmp_path / "o" / "model.pt"))
    assert (tuned.config.depth, tuned.config.image_size) == (2, 12)


def test_a_limited_photo_model_run_holds_out_only_what_a_whole_run_holds_out(labelled: Path) -> None:
    """The seeded 5% is drawn from the whole folder, so runs with and without --limit never train on
    each other's held-out images (the bundled model's stage 2, at --limit, once did)."""
    from jobs import photo_model

    whole = imagesets.load_folder(labelled / "test", size=16)
    held, rest = photo_model.holdout_split(whole)
    assert np.array_equal(held, photo_model.split(96)[0])  # without --limit: the split it always was
    held_out = set(whole.index[held].tolist())
    part = imagesets.load_folder(labelled / "test", size=16, limit=48)
    part_held, part_rest = photo_model.holdout_split(part)
    assert set(part.index[part_held].tolist()) <= held_out
    assert not set(part.index[part_rest].tolist()) & held_out


def test_a_photo_model_fine_tune_takes_the_temperature_asked_for(labelled: Path, tmp_path: Path) -> None:
    from jobs import photo_model

    start = tmp_path / "class.pt"
    model = build_model(ModelConfig(width=4, depth=2, image_size=16, head="classification", temperature=1.0))
    start.write_bytes(colorizer.weights_bytes(model))
    photo_model.main(["--data", str(labelled / "train"), "--init", str(start), "--temperature", "0.3", "--loss", "ce",
                      "--psnr-weight", "1", "--epochs", "1", "--batch-size", "16", "--threads", "1", "--out", str(tmp_path / "o")])
    tuned, _ = colorizer.load_weights(str(tmp_path / "o" / "model.pt"))
    assert (tuned.config.temperature, tuned.config.image_size) == (0.3, 16)


def test_the_photo_model_job_trains_on_two_folders_and_scores_each_holdout(labelled: Path, tmp_path: Path) -> None:
    from jobs import photo_model

    folders = [str(labelled / "train"), str(labelled / "test")]
    out = tmp_path / "photo"
    photo_model.main(["--data", folders[0], "--data", folders[1], "--size", "16", "--width", "4", "--depth", "2",
                      "--loss", "psnr", "--epochs", "1", "--batch-size", "16", "--threads", "1", "--out", str(out)])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"] == folders and set(metrics["holdout"]) == set(folders)
    assert metrics["train_photos"] + metrics["holdout_photos"] == 64 + 96 and metrics["holdout_photos"] == 8 + 8
    for result, gray in metrics["holdout"].values():
        assert result["images"] == gray["images"] == 8 and np.isfinite(result["psnr"])
    model, _ = colorizer.load_weights(str(out / "model.pt"))
    assert model.config.image_size == 16
    assert Image.open(out / "holdout.png").size == (8 * 16, 3 * 16)

    photo_model.main(["--data", folders[0], "--data", folders[1], "--size", "16", "--threads", "1",
                      "--out", str(out), "--compare", str(out / "model.pt")])
    rows = json.loads((out / "compare.json").read_text())["rows"]
    assert rows[folders[1]][str(out / "model.pt")]["psnr"] == pytest.approx(metrics["holdout"][folders[1]][0]["psnr"])


def test_the_photo_model_job_adds_a_semantic_branch_trained_on_every_folders_classes(
    labelled: Path, weights: Path, tmp_path: Path, capsys
) -> None:
    from jobs import photo_model

    folders = [str(labelled / "train"), str(labelled / "test")]  # two classes each: four in all
    # Each image carries its own class folder's label, the second folder's numbered after the first's.
    photos = photo_model.load_photos(folders, 16, None)
    assert photos.classes == 4
    for rgb, labels in ((photos.train, photos.train_labels), *((photos.holdouts[f], photos.holdout_labels[f]) for f in folders)):
        dusk = rgb.mean(axis=(1, 2, 3)) < 63  # day scenes average 76 and above, dusk 51 and below
        assert np.array_equal(labels % 2 == 1, dusk)  # "day" sorts first: 0 and 2
    assert set(photos.train_labels[:56]) == {0, 1} and set(photos.train_labels[56:]) == {2, 3}  # 64 and 96, less 8 held out each
    assert set(photos.holdout_labels[folders[0]]) == {0, 1} and set(photos.holdout_labels[folders[1]]) == {2, 3}
    out = tmp_path / "semantic"
    photo_model.main(["--data", folders[0], "--data", folders[1], "--init", str(weights), "--semantic", "--loss", "psnr",
                      "--epochs", "2", "--batch-size", "16", "--threads", "1", "--out", str(out)])
    metrics = json.loads((out / "metrics.json").read_text())
    model, _ = colorizer.load_weights(str(out / "model.pt"))
    assert metrics["model"]["classes"] == model.config.classes == 4
    assert model.config.width == 4 and model.config.image_size == 16  # the --init model's shape, with the branch
    assert set(metrics["holdout_class_accuracy"]) == set(folders)
    # Fine-tuned on other folders, it gets a fresh class head for their classes and keeps the rest of the branch.
    again = tmp_path / "again"
    photo_model.main(["--data", folders[0], "--init", str(out / "model.pt"), "--epochs", "1", "--batch-size", "16",
                      "--threads", "1", "--out", str(again)])
    tuned, _ = colorizer.load_weights(str(again / "model.pt"))
    assert tuned.config.classes == 2 and set(json.loads((again / "metrics.json").read_text())["holdout_class_accuracy"]) == {folders[0]}
    assert tuned.semantic.net[0].weight.shape == model.semantic.net[0].weight.shape
    # --semantic needs classes to learn: a folder of one class folder is refused, in one line.
    flat = tmp_path / "flat"
    (flat / "photos").mkdir(parents=True)
    for photo in sorted((labelled / "train").rglob("*.png"))[:16]:
        (flat / "photos" / f"{photo.parent.name}-{photo.name}").write_bytes(photo.read_bytes())
    with pytest.raises(SystemExit) as exit_info:
        photo_model.main(["--data", str(flat), "--init", str(weights), "--semantic", "--epochs", "1", "--threads", "1",
                          "--out", str(tmp_path / "refused")])
    assert exit_info.value.code == 2
    assert "--semantic needs at least two class folders in --data, found" in capsys.readouterr().err
    # Without --semantic, a model with the branch fine-tunes on it all the same (the colour loss trains it).
    photo_model.main(["--data", str(flat), "--init", str(out / "model.pt"), "--epochs", "1", "--batch-size", "16",
                      "--threads", "1", "--out", str(tmp_path / "flat-out")])
    assert colorizer.load_weights(str(tmp_path / "flat-out" / "model.pt"))[0].config.classes == 4


class BrightnessClassifier(torch.nn.Module):
    """A semantic branch that knows one thing: class 1 is bright, class 0 dark."""

    def forward(self, L: torch.Tensor, *, with_logits: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        brightness = L.mean(dim=(1, 2, 3))
        return L, torch.stack((-brightness, brightness), dim=1)


def test_the_photo_model_class_accuracy_counts_right_answers_across_batches() -> None:
    from jobs import photo_model

    rgb = np.zeros((601, 8, 8, 3), dtype=np.uint8)  # more than one batch of 500
    rgb[::3] = 230  # every third image bright
    labels = np.zeros(601, dtype=np.int64)
    labels[::3] = 1
    model = BrightnessClassifier()
    assert photo_model.class_accuracy(model, rgb, labels) == 1.0
    assert photo_model.class_accuracy(model, rgb, 1 - labels) == 0.0
    labels[:100] = 1 - labels[:100]
    assert photo_model.class_accuracy(model, rgb, labels) == pytest.approx(501 / 601)


def test_the_photo_model_job_scores_its_holdouts_each_epoch_without_changing_the_training(labelled: Path, tmp_path: Path) -> None:
    from jobs import photo_model

    folder = str(labelled / "train")
    argv = ["--data", folder, "--size", "16", "--width", "4", "--depth", "2", "--loss", "psnr", "--epochs", "2",
            "--batch-size", "16", "--threads", "1"]
    photo_model.main([*argv, "--score-every", "1", "--out", str(tmp_path / "scored")])
    photo_model.main([*argv, "--out", str(tmp_path / "plain")])
    scored, plain = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("scored", "plain"))
    assert [point["epoch"] for point in scored["curve"]] == [1, 2] and plain["curve"] == []
    # Scoring a copy mid-run leaves the run itself alone: the same weights, bit for bit, and the
    # last point of the curve is the final model's score.
    assert scored["weights_id"] == plain["weights_id"]
    assert scored["curve"][-1][folder]["psnr"] == pytest.approx(scored["holdout"][folder][0]["psnr"])
    assert scored["curve"][0][folder]["psnr"] != scored["curve"][1][folder]["psnr"]


def test_the_photo_model_job_trains_for_its_minutes_from_the_bundled_model(
    labelled: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from jobs import photo_model

    ticks = itertools.count(0.0, 0.25)  # a clock that advances a quarter second each time it is read
    monkeypatch.setattr(ablation, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks)))
    out = tmp_path / "timed"
    photo_model.main(["--data", str(labelled / "train"), "--init", "bundled", "--minutes", "0.05", "--batch-size", "8",
                      "--threads", "1", "--epochs", "1", "--out", str(out)])
    metrics = json.loads((out / "metrics.json").read_text())
    # The 3 s budget is spent, past the one epoch asked for (8 steps of 8 images), and no further.
    assert metrics["seconds"] >= 3.0 and 1 < metrics["epochs"] < 2
    assert metrics["init"] == "bundled"
    model, _ = colorizer.load_weights(str(out / "model.pt"))
    bundled = colorizer.load_weights(None)[0].config
    # The bundled model's architecture, fine-tuned; a semantic branch now classifies these folders' two classes.
    assert model.config == dataclasses.replace(bundled, classes=2 if bundled.classes else 0)


def test_the_gpu_script_trains_its_runs_side_by_side_and_writes_half_precision_copies(labelled: Path, tmp_path: Path) -> None:
    # The script as a GPU lease runs it, here on the CPU with one run and a few seconds of training.
    data = tmp_path / "data"
    (data / "cifar10").mkdir(parents=True)
    (data / "photos").symlink_to(labelled / "train")
    (data / "cifar10" / "train").symlink_to(labelled / "test")
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "RUNS": "w16-cf-ft", "DEVICE": "cpu", "THREADS": "1", "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(root / "jobs" / "gpu_models.sh"), str(data), str(tmp_path / "out"), "0.02"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "w16-cf-ft: held out of" in done.stdout
    metrics = json.loads((tmp_path / "out" / "w16-cf-ft" / "metrics.json").read_text())
    assert metrics["loss"] == "psnr" and metrics["cf_weight"] == 0.1 and metrics["init"] == "bundled" and metrics["size"] == 64
    half, _ = colorizer.load_weights(str(tmp_path / "out" / "w16-cf-ft-fp16.pt"))
    full, _ = colorizer.load_weights(str(tmp_path / "out" / "w16-cf-ft" / "model.pt"))
    for a, b in zip(half.state_dict().values(), full.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-4)


def test_training_that_diverges_stops_with_a_clear_error(labelled: Path) -> None:
    from colorize import imagesets

    rgb = imagesets.load_folder(labelled / "train", size=16).rgb
    variant = ablation.Variant("diverging", ModelConfig(width=4, depth=2, image_size=16), loss="huber")
    with pytest.raises(FloatingPointError, match="diverging: the loss is not finite after 1 epochs"):
        ablation.fit(variant, ablation.to_lab(rgb, torch.device("cpu")), ablation.Budget(epochs=2, batch_size=16, lr=1e30))


def test_an_ablation_variant_refuses_a_negative_term_weight() -> None:
    for kw in ({"gan_weight": -0.02}, {"colourfulness_weight": -0.1}):
        with pytest.raises(ValueError, match="bad: term weights must be >= 0"):
            ablation.Variant("bad", ModelConfig(), **kw)


def test_the_photo_model_job_keeps_the_weights_that_score_best_on_its_holdouts(labelled: Path, tmp_path: Path, capsys) -> None:
    from jobs import photo_model

    folders = [str(labelled / "train"), str(labelled / "test")]
    out = tmp_path / "best"
    # A learning rate far too high for this small model: it scores best early, then falls apart.
    photo_model.main(["--data", folders[0], "--data", folders[1], "--size", "16", "--width", "4", "--depth", "2",
                      "--loss", "psnr", "--lr", "1.0", "--epochs", "4", "--batch-size", "16", "--threads", "1",
                      "--score-every", "1", "--keep-best", "--out", str(out)])
    metrics = json.loads((out / "metrics.json").read_text())
    means = {point["epoch"]: np.mean([point[f]["psnr"] for f in folders]) for point in metrics["curve"]}
    best = max(means, key=means.get)
    assert sorted(means) == [1, 2, 3, 4] and best < 4, means
    assert metrics["kept_epoch"] == best
    assert np.mean([metrics["holdout"][f][0]["psnr"] for f in folders]) == pytest.approx(means[best])
    assert f"kept the weights of epoch {best}" in capsys.readouterr().out
    # model.pt is the kept model, and scores so again.
    photo_model.main(["--data", folders[0], "--data", folders[1], "--size", "16", "--threads", "1",
                      "--out", str(out), "--compare", str(out / "model.pt")])
    rows = json.loads((out / "compare.json").read_text())["rows"]
    assert rows[folders[0]][str(out / "model.pt")]["psnr"] == pytest.approx(metrics["holdout"][folders[0]][0]["psnr"])
    assert not list(out.glob(".*partial"))
    with pytest.raises(SystemExit):
        photo_model.main(["--data", folders[0], "--keep-best", "--out", str(tmp_path / "refused")])
    assert "--keep-best needs --score-every N" in capsys.readouterr().err


def test_random_shift_crops_each_image_from_its_reflection_padded_copy() -> None:
    batch = torch.arange(4 * 3 * 6 * 6, dtype=torch.float32).reshape(4, 3, 6, 6)
    shifted = ablation.random_shift(batch, 2, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(batch, (2, 2, 2, 2), mode="reflect")
    offsets = []
    for image, out in zip(padded, shifted):
        (offset,) = [(dy, dx) for dy in range(5) for dx in range(5) if torch.equal(image[:, dy : dy + 6, dx : dx + 6], out)]
        offsets.append(offset)
    assert len(set(offsets)) > 1  # each image its own offset
    again = ablation.random_shift(batch, 2, torch.Generator().manual_seed(0))
    assert torch.equal(shifted, again)  # seeded
    assert torch.equal(ablation.random_shift(batch, 0, torch.Generator()), batch)
    with pytest.raises(ValueError, match="shift must be >= 0"):
        ablation.Budget(shift=-1)


def test_the_photo_model_job_trains_with_shifted_images(labelled: Path, tmp_path: Path, capsys) -> None:
    from jobs import photo_model

    argv = ["--data", str(labelled / "train"), "--size", "16", "--width", "4", "--depth", "2", "--epochs", "1",
            "--batch-size", "16", "--threads", "1"]
    photo_model.main([*argv, "--shift", "2", "--out", str(tmp_path / "shifted")])
    photo_model.main([*argv, "--out", str(tmp_path / "plain")])
    shifted, plain = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("shifted", "plain"))
    assert shifted["shift"] == 2 and plain["shift"] == 0
    assert shifted["weights_id"] != plain["weights_id"]
    with pytest.raises(SystemExit):
        photo_model.main([*argv, "--shift", "8", "--out", str(tmp_path / "refused")])
    assert "--shift must be from 0 to 7 pixels at --size 16, got 8" in capsys.readouterr().err


def test_a_timed_fit_that_runs_out_at_an_epoch_boundary_counts_and_scores_no_empty_epoch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Time up before an epoch's first step: that epoch was scored again on unchanged weights, a
    curve point under the wrong epoch."""
    clock = {"now": 0.0, "jump": ""}

    def perf_counter() -> float:
        if clock["jump"] == "armed":  # the read just after on_epoch: the pause is taken off the clock
            clock["jump"] = "next"
        elif clock["jump"] == "next":  # the next epoch's first step finds the time up
            clock["now"] += 1000.0
        return clock["now"]

    def on_epoch(epoch: int, model: torch.nn.Module) -> None:
        scored.append(epoch)
        clock["jump"] = "armed"

    monkeypatch.setattr(ablation, "time", types.SimpleNamespace(perf_counter=perf_counter))
    scored: list[int] = []
    lab = torch.rand(16, 3, 16, 16) * torch.tensor([100.0, 1.0, 1.0]).view(1, 3, 1, 1)
    variant = ablation.Variant("tiny", ModelConfig(width=4, depth=2, image_size=16))
    _, _, epochs = ablation.fit(variant, lab, ablation.Budget(seconds=60, batch_size=8, device="cpu"), on_epoch=on_epoch)
    assert scored == [1] and epochs == 1
