"""Evaluation: the numbers are finite, and a model that outputs grey scores exactly as the baseline."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from colorize import colorizer
from colorize.evaluate import EvaluateConfig, colorize_rgb, evaluate, gray_baseline, score
from colorize.models import ModelConfig, build_model
from tests.helpers import scene, write_images


class GreyModel(nn.Module):
    """Returns its grey input on R, G and B: the grey baseline, as a model."""

    def __init__(self) -> None:
        super().__init__()
        self.config = ModelConfig(arch="autoencoder", width=1, depth=1, image_size=16)

    def forward(self, gray: torch.Tensor) -> torch.Tensor:
        return gray.repeat(1, 3, 1, 1)


def test_a_grey_model_scores_exactly_the_grey_baseline() -> None:
    rng = np.random.default_rng(0)
    batches = [np.stack([scene(rng, 16) for _ in range(5)]) for _ in range(3)]
    model_metrics, gray_metrics, examples = score(GreyModel(), iter(batches))
    assert model_metrics == gray_metrics
    assert model_metrics["images"] == 15
    assert [title for title, _ in examples] == ["gray", "prediction", "truth"]
    # The grid's rows are the first images, however they were batched.
    np.testing.assert_array_equal(dict(examples)["truth"], np.concatenate(batches)[:8])
    # Scored again and again (a learning curve), the grey baseline's part can be left out.
    alone, no_gray, _ = score(GreyModel(), iter(batches), with_gray=False)
    assert alone == model_metrics and no_gray is None


def test_gray_baseline_is_601_luma_on_every_channel() -> None:
    truth = np.array([[[[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30]]]], dtype=np.uint8)
    gray = gray_baseline(truth)
    assert gray[0, 0, :, 0].tolist() == [76, 150, 29, 18]
    assert (gray == gray[..., :1]).all()


def test_flip_averaging_colours_mirrored_images_as_the_mirror_images() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(width=4, depth=2, image_size=16)).eval()
    with torch.no_grad():
        model.head.weight.mul_(20)  # vivid enough for its asymmetry to show in 8-bit colour
    rng = np.random.default_rng(0)
    images = np.stack([scene(rng, 16) for _ in range(6)])
    images[:, :, :4] //= 2  # darker on the left: no image is its own mirror
    mirrored = np.ascontiguousarray(images[:, :, ::-1])

    def mirror_gap(flip: bool) -> int:
        pair = colorize_rgb(model, images, flip=flip), colorize_rgb(model, mirrored, flip=flip)
        return int(np.abs(pair[0].astype(np.int16) - pair[1][:, :, ::-1]).max())

    assert mirror_gap(flip=False) > 3
    assert mirror_gap(flip=True) <= 1  # the same up to rounding to 8 bits
    flipped, _, _ = score(model, iter([images]), flip=True)
    assert flipped["psnr"] != score(model, iter([images]))[0]["psnr"]


@pytest.mark.timeout(600)
def test_evaluate_on_a_tiny_set(ray_cluster: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_images(tmp_path / "data", 12)
    (tmp_path / "data" / "broken.jpg").write_bytes(b"\xff\xd8 nope")
    (tmp_path / "data" / "empty.png").write_bytes(b"")
    (tmp_path / "data" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    torch.manual_seed(0)
    weights = tmp_path / "w.pt"
    weights.write_bytes(colorizer.weights_bytes(build_model(ModelConfig(width=4, depth=2, image_size=16))))

    report = evaluate(EvaluateConfig(data=str(tmp_path / "data"), weights=str(weights), out=str(tmp_path / "out")))

    assert report["images"] == 12 and report["unreadable"] == 2  # skipped and counted, not scored as black
    assert report["unreadable_files"] == [str(tmp_path / "data" / name) for name in ("broken.jpg", "empty.png")]
    assert (report["left_out"], report["left_out_files"]) == (1, [str(tmp_path / "data" / "gone.png")])
    assert report["flip_average"] is False
    for group in ("model", "gray"):
        for key in ("mse", "psnr", "ssim"):
            assert math.isfinite(report[group][key]), (group, key)
    assert report["gray"]["colourfulness"] == 0
    assert report["model"]["psnr"] != report["gray"]["psnr"] and report["model"]["colourfulness"] > 0
    flipped = evaluate(EvaluateConfig(data=str(tmp_path / "data"), weights=str(weights), flip_average=True))
    assert flipped["flip_average"] is True and flipped["model"]["psnr"] != report["model"]["psnr"]
    assert flipped["gray"] == report["gray"]
    assert report["model"]["colourfulness_truth"] > 10
    assert json.loads((tmp_path / "out/metrics.json").read_text()) == report
    assert (tmp_path / "out/grid.png").stat().st_size > 0
    for split in ("train", "test"):  # beside the training images, the test split is named
        write_images(tmp_path / "splits" / split, 2)
    assert evaluate(EvaluateConfig(data=str(tmp_path / "splits"), weights=str(weights)))["images"] == 4
    assert f"pass --data '{tmp_path}/splits/test' for the test images alone" in capsys.readouterr().err

    small = tmp_path / "small.pt"  # a model too small to score: refused before Ray reads anything
    small.write_bytes(colorizer.weights_bytes(build_model(ModelConfig(width=4, depth=2, image_size=8))))
    with pytest.raises(ValueError, match="works at 8 px, below SSIM's 11 px window"):
        evaluate(EvaluateConfig(data=str(tmp_path / "data"), weights=str(small)))
