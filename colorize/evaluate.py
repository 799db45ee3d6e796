"""Evaluate a colouriser next to the grey baseline on a labelled-by-colour image set.

Images are centre-cropped and resized to the model's working resolution (the bundled model's
64x64 upsamples CIFAR-10's 32x32), coloured from their own lightness, and compared as 8-bit sRGB with
:mod:`colorize.metrics`. The grey baseline is ITU-R 601 luma copied to R, G and B.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from colorize import color, colorizer, errors, metrics, plots, storage

GRID_EXAMPLES = 8


class NoImages(ValueError):
    """Nothing readable to score."""


@dataclass(frozen=True)
class EvaluateConfig:
    """``weights=None`` evaluates the bundled model; ``out`` receives metrics.json and grid.png."""

    data: str
    weights: str | None = None
    limit: int | None = None
    out: str | None = None
    batch_size: int = 256
    temperature: float | None = None
    saturation: float | None = None
    flip_average: bool = False
    s3_endpoint: str | None = None

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be at least 1, got {self.limit}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {self.batch_size}")


def gray_baseline(truth: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) -> its 601 luma, rounded and copied to R, G and B."""
    gray = np.rint(color.luma_np(truth) * 255.0).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)


@torch.inference_mode()
def colorize_rgb(model: torch.nn.Module, truth: np.ndarray, *, flip: bool = False) -> np.ndarray:
    """uint8 (N, H, W, 3) -> the model's colouring of their greyscale, uint8 (N, H, W, 3).

    Runs on the model's device (validation in training runs it on the GPU). ``flip`` averages
    each prediction with its mirror image's (:func:`colorize.colorizer.predict_ab`).
    """
    device = colorizer.device_of(model)
    L = torch.from_numpy(color.rgb_to_lab_np(truth)[..., :1]).permute(0, 3, 1, 2)  # (N,1,H,W) in [0,100]
    gray = torch.from_numpy(color.luma_np(truth))[:, None]  # (N,1,H,W) in [0,1]
    rgb = colorizer.predict_rgb(model, L.to(device), gray.to(device), flip=flip)
    return color.to_uint8(rgb.permute(0, 2, 3, 1).float().cpu().numpy())


def in_batches(rgb: np.ndarray, size: int = 500) -> Iterator[np.ndarray]:
    """An in-memory uint8 (N, H, W, 3) array as the batches :func:`score` takes."""
    for start in range(0, len(rgb), size):
        yield rgb[start : start + size]


def score(
    model: torch.nn.Module, batches: Iterable[np.ndarray], *, flip: bool = False, with_gray: bool = True
) -> tuple[dict, dict | None, list]:
    """Metrics of ``model`` (with ``flip``: averaged with its mirror images) and of the grey
    baseline over uint8 (N, H, W, 3) batches.

    Returns the model's metrics, the baseline's (None without ``with_gray``, for a caller that
    scores the same images again and again), and a few examples for a picture grid.
    """
    device = colorizer.device_of(model)  # SSIM's filtering too: on a GPU it costs little there
    model_acc, gray_acc = metrics.MetricAccumulator(device), metrics.MetricAccumulator(device)
    examples: dict[str, list[np.ndarray]] = {"gray": [], "prediction": [], "truth": []}
    for truth in batches:
        pred, gray = colorize_rgb(model, truth, flip=flip), gray_baseline(truth)
        model_acc.update(pred, truth)
        if with_gray:
            gray_acc.update(gray, truth)
        for rows, images in zip(examples.values(), (gray, pred, truth)):
            rows.extend(images[: GRID_EXAMPLES - len(rows)])  # the first few, whatever the batch size
    if not examples["truth"]:
        raise NoImages("no readable images to evaluate")
    return (model_acc.result(), gray_acc.result() if with_gray else None,
            [(name, np.stack(rows)) for name, rows in examples.items()])


def evaluate(config: EvaluateConfig) -> dict[str, Any]:
    """Metrics of the model and the grey baseline on the same images, as a JSON-able dict."""
    # Imported here so that scoring (above) also runs where Ray is not installed (a bare GPU box).
    from colorize import data, raycluster

    settings = storage.S3Settings.from_env(config.s3_endpoint)
    if config.out:  # checked before the work, not after it
        out_fs, out_path = storage.resolve(config.out, settings)
        storage.check_output(out_fs, out_path, config.out, "--out", settings)
    model, weights = colorizer.load_weights(
        config.weights, settings, temperature=config.temperature, saturation=config.saturation
    )
    if model.config.image_size < metrics.SSIM_WINDOW:
        raise ValueError(f"{config.weights or 'the bundled model'}: it works at {model.config.image_size} px, below SSIM's "
                         f"{metrics.SSIM_WINDOW} px window, so its colour cannot be scored")
    source = data.locate(config.data, settings=settings, limit=config.limit, split="test", output=config.out)
    raycluster.connect(log_to_driver=False)
    prepared = data.lab_dataset(
        source, image_size=model.config.image_size, augment=False, split="test", limit=config.limit, with_rgb=True,
        with_paths=True,
    )
    unreadable = 0
    named: list[str] = []  # a folder's unreadable files (Parquet and CIFAR-10 rows have no name)

    def readable() -> Iterator[np.ndarray]:
        nonlocal unreadable
        for batch in prepared.iter_batches(batch_size=config.batch_size, batch_format="numpy"):
            unreadable += int((~batch["ok"]).sum())
            if "path" in batch:
                named.extend(storage.to_uri(source.fs, str(p)) for p in batch["path"][~batch["ok"]])
            if batch["ok"].any():
                yield batch["rgb"][batch["ok"]]

    try:
        model_metrics, gray_metrics, examples = score(model, readable(), flip=config.flip_average)
    except NoImages:
        raise data.DataError(f"{config.data}: no readable images to evaluate") from None
    report = {
        "data": config.data,
        "weights": colorizer.weights_label(config.weights),
        "weights_id": weights,
        "model_config": model.config.to_dict(),
        "flip_average": config.flip_average,
        "images": model_metrics.pop("images"),
        "unreadable": unreadable,
        "unreadable_files": sorted(named)[:errors.NAMED_UNREADABLE],
        # Found in the folder (whatever --limit) but not read: names that are not UTF-8, dangling
        # links, pipes; a warning said so.
        "left_out": len(source.left_out),
        "left_out_files": [storage.utf8_name(storage.to_uri(source.fs, p)) for p in source.left_out[:errors.NAMED_UNREADABLE]],
        "model": model_metrics,
        "gray": {k: v for k, v in gray_metrics.items() if k != "images"},
    }
    if config.out:
        storage.write_json(out_fs, storage.join(out_path, "metrics.json"), report)
        storage.write_bytes_atomic(out_fs, storage.join(out_path, "grid.png"), plots.png_bytes(plots.image_grid(examples)))
    return report
