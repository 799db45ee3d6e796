"""Colourisation as a pretext task: how much do the colouriser's features know about objects?

A linear classifier is trained on the frozen encoder's features (every encoder stage
average-pooled over space, concatenated) to predict the image's class, and tested on held-out
images; the same probe on a randomly initialised encoder of the same shape is the reference.
The gap between the two is what learning to colour taught the encoder (Zhang et al. 2016,
"Colorful Image Colorization", section 3.2; Larsson et al. 2017).
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from colorize import color, colorizer, errors, imagesets, storage
from colorize.models import build_model


@dataclass(frozen=True)
class ProbeConfig:
    """``data`` holds ``train/`` and ``test/`` class folders; ``weights=None`` probes the bundled model."""

    data: str
    weights: str | None = None
    limit: int | None = None
    test_limit: int | None = None
    epochs: int = 30
    seed: int = 0
    out: str | None = None
    s3_endpoint: str | None = None

    def __post_init__(self) -> None:
        for name in ("limit", "test_limit", "epochs"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


@torch.inference_mode()
def encoder_features(model: nn.Module, rgb: np.ndarray, batch_pixels: int = 500 * 64 * 64) -> torch.Tensor:
    """uint8 (N, S, S, 3) -> (N, D): the encoder's stages, each averaged over space, side by side.

    The model sees only the lightness, as when it colours; ``batch_pixels`` bounds a batch
    (500 images at 64 px): a fixed 500 images took 3.4 GB at 128 px, and 4x that per doubling.
    """
    model.eval()
    parts, batch_size = [], max(1, batch_pixels // (rgb.shape[1] * rgb.shape[2]))
    for start in range(0, len(rgb), batch_size):
        L = torch.from_numpy(color.rgb_to_lab_np(rgb[start : start + batch_size])[..., :1]).permute(0, 3, 1, 2)
        if model.config.arch == "unet":
            stages = model.encode(color.normalize_l(L))
        else:  # the seed autoencoder: the output of each strided convolution and its ReLU
            x, stages = color.gray_rgb_from_l(L), []
            for layer in model.encoder:
                x = layer(x)
                if isinstance(layer, nn.ReLU):
                    stages.append(x)
        parts.append(torch.cat([s.mean(dim=(2, 3)) for s in stages], dim=1))
    return torch.cat(parts)


def linear_probe(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, *, classes: int, epochs: int, seed: int
) -> float:
    """Test accuracy of a softmax classifier on standardised features (Adam, light weight decay)."""
    torch.manual_seed(seed)
    # A feature (nearly) constant on train, such as a ReLU that never fires there, keeps scale 1:
    # divided by a floor of 1e-6, a test image where it fired took values near 19,000 on a
    # weight the probe never trained. Nearly: below a thousandth of the features' median spread.
    mean, std = train_x.mean(dim=0), train_x.std(dim=0)
    std = torch.where(std > max(1e-6, 1e-3 * float(std.median())), std, torch.ones_like(std))
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    probe = nn.Linear(train_x.shape[1], classes)
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(epochs):
        for index in torch.randperm(len(train_x)).split(256):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(probe(train_x[index]), train_y[index]).backward()
            optimizer.step()
    with torch.inference_mode():
        return int((probe(test_x).argmax(dim=1) == test_y).sum()) / len(test_y)  # 0.88, not float32's 0.8799999952316284


def _shared_images(train: np.ndarray, test: np.ndarray) -> int:
    """How many of the (N, H, W, 3) ``test`` images are, pixel for pixel, among ``train``'s: a
    copy in both splits is scored on an image the probe was fitted to."""
    seen = {hashlib.blake2b(image.tobytes(), digest_size=16).digest() for image in train}
    return sum(hashlib.blake2b(image.tobytes(), digest_size=16).digest() in seen for image in test)


def probe(config: ProbeConfig) -> dict[str, Any]:
    """Probe accuracy of the trained encoder and of a random one, as a JSON-able report."""
    settings = storage.S3Settings.from_env(config.s3_endpoint)
    if config.out:  # checked before the work, not after it
        out_fs, out_path = storage.resolve(config.out, settings)
        storage.check_output(out_fs, out_path, config.out, "--out", settings)
    trained, weights_id = colorizer.load_weights(config.weights, settings)
    torch.manual_seed(config.seed)
    random_init = build_model(trained.config).eval()
    size = trained.config.image_size
    root = Path(config.data)
    train = imagesets.load_folder(root / "train", size=size, limit=config.limit, seed=config.seed)
    test = imagesets.load_folder(root / "test", size=size, limit=config.test_limit, seed=config.seed)
    if train.classes != test.classes:
        only = {split: ", ".join(sorted(set(a.classes) - set(b.classes))[:5]) or "none"
                for split, a, b in (("train/", train, test), ("test/", test, train))}
        raise ValueError(
            f"{config.data}: train/ and test/ have different classes with readable images (only in train/: "
            f"{only['train/']}; only in test/: {only['test/']}); a --limit or --test-limit too small to draw "
            "from every class does this too"
        )
    if len(train.classes) < 2:
        raise ValueError(f"{config.data}: a probe needs at least 2 classes to tell apart, found only {train.classes[0]!r}")
    train_y, test_y = torch.from_numpy(train.labels), torch.from_numpy(test.labels)
    report: dict[str, Any] = {
        "data": config.data,
        "weights": colorizer.weights_label(config.weights),
        "weights_id": weights_id,
        "model_config": trained.config.to_dict(),
        "train_images": len(train_y),
        "test_images": len(test_y),
        "unreadable": len(train.unreadable) + len(test.unreadable),
        "unreadable_files": [storage.utf8_name(p) for p in (train.unreadable + test.unreadable)[:errors.NAMED_UNREADABLE]],
        "classes": len(train.classes),
        "chance": float(np.bincount(test.labels).max() / len(test_y)),
        "test_images_in_train": _shared_images(train.rgb, test.rgb),
        "seed": config.seed,  # of the subsets, the random encoder and the probe: the report's numbers depend on it
        "epochs": config.epochs,
    }
    if report["test_images_in_train"]:
        print(f"warning: {report['test_images_in_train']} of the {len(test_y)} test/ images are also in train/ "
              f"(the same pixels at {size} px); the probe's test accuracy counts them", file=sys.stderr, flush=True)
    for name, model in (("colourisation", trained), ("random_init", random_init)):
        train_x, test_x = encoder_features(model, train.rgb), encoder_features(model, test.rgb)
        report["features"] = train_x.shape[1]
        report[f"accuracy_{name}"] = linear_probe(
            train_x, train_y, test_x, test_y, classes=len(train.classes), epochs=config.epochs, seed=config.seed
        )
    if config.out:
        storage.write_json(out_fs, storage.join(out_path, "probe.json"), report)
    return report
