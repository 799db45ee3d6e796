"""Tests for colorize.metrics on tiny hand-built batches (no data files, no network)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import numpy as np
import pytest
import torch

from colorize import metrics


def _random_batch(n: int, size: int, seed: int) -> np.ndarray:
    """uint8 (n, size, size, 3) noise."""
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _noisy_copy(images: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    """images plus Gaussian noise of ``sigma`` levels, so SSIM lands well inside (0, 1)."""
    noise = np.random.default_rng(seed).normal(0.0, sigma, images.shape)
    return np.clip(np.rint(images + noise), 0, 255).astype(np.uint8)


def _reference_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """Loop-by-loop SSIM of two uint8 (H, W, 3) images: Wang et al. 2004 with an 11x11
    Gaussian window (sigma 1.5), population statistics, data range 255, averaged over every
    window that fits inside the image and over the three channels."""
    size, sigma = 11, 1.5
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    offsets = np.arange(size) - size // 2
    window = np.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2 * sigma**2))
    window /= window.sum()
    h, w, channels = x.shape
    values = []
    for c in range(channels):
        for i in range(h - size + 1):
            for j in range(w - size + 1):
                px = x[i : i + size, j : j + size, c].astype(np.float64)
                py = y[i : i + size, j : j + size, c].astype(np.float64)
                mx, my = (window * px).sum(), (window * py).sum()
                vx = (window * (px - mx) ** 2).sum()
                vy = (window * (py - my) ** 2).sum()
                cov = (window * (px - mx) * (py - my)).sum()
                num = (2 * mx * my + c1) * (2 * cov + c2)
                den = (mx**2 + my**2 + c1) * (vx + vy + c2)
                values.append(num / den)
    return float(np.mean(values))


def test_identical_images_are_perfect() -> None:
    images = _random_batch(3, 16, seed=0)
    np.testing.assert_array_equal(metrics.per_image_mse(images, images), np.zeros(3))
    np.testing.assert_array_equal(metrics.per_image_psnr(images, images), [metrics.PSNR_CAP_DB] * 3)
    np.testing.assert_allclose(metrics.per_image_ssim(images, images), np.ones(3), atol=1e-12)


def test_constant_offset_gives_known_mse_and_psnr() -> None:
    truth = np.random.default_rng(1).integers(0, 246, (2, 12, 12, 3), dtype=np.uint8)
    pred = truth + np.uint8(10)
    np.testing.assert_allclose(metrics.per_image_mse(pred, truth), (10 / 255) ** 2, rtol=1e-12)
    np.testing.assert_allclose(
        metrics.per_image_psnr(pred, truth), 20 * math.log10(255 / 10), rtol=1e-12
    )


def test_grey_images_have_zero_colourfulness() -> None:
    levels = np.random.default_rng(2).integers(0, 256, (4, 8, 8, 1), dtype=np.uint8)
    np.testing.assert_array_equal(metrics.colourfulness(np.repeat(levels, 3, axis=-1)), 0.0)


def test_colourfulness_by_hand() -> None:
    # Red and black: rg = [255, 0], yb = [127.5, 0], so both std and mean are
    # (127.5, 63.75) and CF = 1.3 * sqrt(127.5^2 + 63.75^2).
    red_black = np.array([[[[255, 0, 0], [0, 0, 0]]]], dtype=np.uint8)
    # Red and green: |R - G| = 255 for both (the signed form would give mean 0, std 255),
    # yb = 127.5 for both, so std is 0 and CF = 0.3 * sqrt(255^2 + 127.5^2).
    red_green = np.array([[[[255, 0, 0], [0, 255, 0]]]], dtype=np.uint8)
    cf = metrics.colourfulness(np.concatenate((red_black, red_green)))
    np.testing.assert_allclose(
        cf, [1.3 * math.hypot(127.5, 63.75), 0.3 * math.hypot(255, 127.5)], rtol=1e-12
    )


def test_ssim_matches_loop_reference() -> None:
    truth = _random_batch(2, 16, seed=3)
    pred = np.concatenate((_noisy_copy(truth[:1], 30.0, seed=4), _random_batch(1, 16, seed=5)))
    ours = metrics.per_image_ssim(pred, truth)
    expected = [_reference_ssim(p, t) for p, t in zip(pred, truth)]
    np.testing.assert_allclose(ours, expected, atol=1e-4)
    assert 0.2 < ours[0] < 0.95  # the noisy copy is neither identical nor unrelated


def test_ssim_is_independent_of_chunking(monkeypatch: pytest.MonkeyPatch) -> None:
    truth = _random_batch(5, 11, seed=6)
    pred = _noisy_copy(truth, 20.0, seed=7)
    whole = metrics.per_image_ssim(pred, truth)
    monkeypatch.setattr(metrics, "_SSIM_CHUNK_PIXELS", 2 * 11 * 11)  # two images a chunk
    np.testing.assert_allclose(metrics.per_image_ssim(pred, truth), whole, rtol=1e-12)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU"))])
def test_ssim_filters_on_the_device_asked_with_the_same_result(device: str) -> None:
    truth = _random_batch(3, 16, seed=10)
    pred = _noisy_copy(truth, 25.0, seed=11)
    np.testing.assert_allclose(metrics.per_image_ssim(pred, truth, device), metrics.per_image_ssim(pred, truth), rtol=1e-12)
    acc = metrics.MetricAccumulator(device)
    acc.update(pred, truth)
    assert acc.result()["ssim"] == pytest.approx(metrics.summarize(pred, truth)["ssim"], rel=1e-12)


def test_metrics_take_read_only_arrays_without_warnings() -> None:
    truth = _random_batch(2, 16, seed=8)
    pred = _noisy_copy(truth, 10.0, seed=9)
    for array in (truth, pred):
        array.flags.writeable = False  # as np.asarray gives them from a PIL image
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        summary = metrics.summarize(pred, truth)
    assert 0 < summary["ssim"] < 1


def test_ssim_rejects_images_smaller_than_the_window() -> None:
    images = _random_batch(1, 10, seed=8)
    with pytest.raises(ValueError, match="10x10"):
        metrics.per_image_ssim(images, images)


def test_summarize_values() -> None:
    truth = _random_batch(3, 12, seed=9)
    pred = _noisy_copy(truth, 15.0, seed=10)
    summary = metrics.summarize(pred, truth)
    assert summary["images"] == 3
    assert summary["mse"] == pytest.approx(metrics.per_image_mse(pred, truth).mean())
    assert summary["psnr"] == pytest.approx(metrics.per_image_psnr(pred, truth).mean())
    assert summary["ssim"] == pytest.approx(metrics.per_image_ssim(pred, truth).mean())
    cf_pred = metrics.colourfulness(pred).mean()
    cf_truth = metrics.colourfulness(truth).mean()
    assert summary["colourfulness"] == pytest.approx(cf_pred)
    assert summary["colourfulness_truth"] == pytest.approx(cf_truth)
    assert summary["delta_colourfulness"] == pytest.approx(abs(cf_pred - cf_truth))


def test_images_whose_truth_is_grey_are_counted_and_left_out_of_the_colour_psnr() -> None:
    truth = _random_batch(4, 12, seed=16)
    truth[1] = truth[1, ..., :1]  # neutral grey: R = G = B
    pred = _noisy_copy(truth, 10.0, seed=17)
    pred[1] = truth[1]  # copied exactly, as the grey baseline copies a grey image: PSNR capped at 100 dB
    summary = metrics.summarize(pred, truth)
    psnr = metrics.per_image_psnr(pred, truth)
    assert metrics.is_grey(truth).tolist() == [False, True, False, False]
    assert summary["grey_truth_images"] == 1 and psnr[1] == metrics.PSNR_CAP_DB
    assert summary["psnr_colour_images"] == pytest.approx(psnr[[0, 2, 3]].mean())
    assert summary["psnr"] == pytest.approx(psnr.mean()) and summary["psnr"] > summary["psnr_colour_images"] + 10
    assert metrics.summarize(truth[1:2], truth[1:2])["psnr_colour_images"] is None


def test_accumulator_equals_summarize_on_concatenation() -> None:
    truth = _random_batch(7, 12, seed=11)
    pred = _noisy_copy(truth, 25.0, seed=12)
    pred[2] = truth[2]  # one capped PSNR in the mix
    acc = metrics.MetricAccumulator()
    for batch in (slice(0, 1), slice(1, 5), slice(5, 7)):
        acc.update(pred[batch], truth[batch])
    streamed = acc.result()
    whole = metrics.summarize(pred, truth)
    assert streamed.keys() == whole.keys()
    for key, value in whole.items():
        assert streamed[key] == pytest.approx(value, rel=1e-12), key


def test_accumulator_without_images_raises() -> None:
    with pytest.raises(ValueError, match="no images"):
        metrics.MetricAccumulator().result()


@pytest.mark.parametrize(
    "metric", [metrics.per_image_mse, metrics.per_image_psnr, metrics.per_image_ssim]
)
def test_mismatched_shapes_raise(metric: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> None:
    pred = _random_batch(2, 12, seed=13)
    truth = _random_batch(2, 13, seed=14)
    with pytest.raises(ValueError, match=r"\(2, 12, 12, 3\) vs \(2, 13, 13, 3\)"):
        metric(pred, truth)


def test_bad_dtype_and_layout_raise() -> None:
    images = _random_batch(1, 12, seed=15)
    with pytest.raises(ValueError, match="float32"):
        metrics.summarize(images.astype(np.float32), images)
    with pytest.raises(ValueError, match=r"\(12, 12, 3\)"):
        metrics.per_image_mse(images[0], images[0])
    with pytest.raises(ValueError, match=r"\(1, 3, 12, 12\)"):
        metrics.colourfulness(images.transpose(0, 3, 1, 2))
