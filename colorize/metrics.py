"""Image-quality metrics for colourisation on batches of 8-bit sRGB images.

Pure numpy/torch with no I/O. Every function takes uint8 batches of shape (N, H, W, 3) and
returns one value per image; ``summarize`` and ``MetricAccumulator`` average those over a set.
MSE is on values scaled to [0, 1]; PSNR is in dB with data range 1; SSIM follows Wang et al.
2004 as skimage computes it; colourfulness is Hasler and Suesstrunk 2003 on 0..255 values.
"""

from __future__ import annotations

import numpy as np
import torch

# An image identical to its truth has infinite PSNR; averaging needs a finite value, so PSNR is
# capped here (the largest PSNR a single-level error can give on a 32x32 image is ~83 dB; at
# 256 px and above, 101 dB and more, so the cap then takes such an image for identical). Raising
# it would move every published mean: CIFAR-10's 113 grey test images score the cap as grey.
PSNR_CAP_DB = 100.0

# SSIM constants from Wang et al. 2004, as skimage's structural_similarity uses them with
# gaussian_weights=True: an 11x11 Gaussian window (sigma 1.5, truncated at 3.5 sigma).
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
SSIM_DATA_RANGE = 255.0

# Pixels per SSIM chunk (256 images of 32x32), so that memory does not grow with image size:
# 64 images of 256 px peak at 0.45 GB, where a fixed 256 images a chunk took 2.1 GB for them.
_SSIM_CHUNK_PIXELS = 256 * 32 * 32


def _check_batch(images: np.ndarray, name: str) -> None:
    if not isinstance(images, np.ndarray):
        raise ValueError(f"{name}: expected a numpy array, got {type(images).__name__}")
    if images.dtype != np.uint8:
        raise ValueError(f"{name}: expected dtype uint8, got {images.dtype}")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{name}: expected shape (N, H, W, 3), got {images.shape}")


def _check_pair(pred: np.ndarray, truth: np.ndarray) -> None:
    _check_batch(pred, "pred")
    _check_batch(truth, "truth")
    if pred.shape != truth.shape:
        raise ValueError(f"pred and truth shapes differ: {pred.shape} vs {truth.shape}")


def per_image_mse(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Mean squared error per image on values scaled to [0, 1]: uint8 (N, H, W, 3) -> (N,)."""
    _check_pair(pred, truth)
    # Integer squared errors are exact; int64 sums cannot overflow at any image size.
    diff = pred.astype(np.int32) - truth.astype(np.int32)
    sse = np.sum(diff * diff, axis=(1, 2, 3), dtype=np.int64)
    return sse / (255.0**2 * np.prod(pred.shape[1:]))


def per_image_psnr(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """PSNR in dB per image, data range 1 (= 255 on uint8), capped at ``PSNR_CAP_DB``: (N,)."""
    mse = per_image_mse(pred, truth)
    with np.errstate(divide="ignore"):
        psnr = -10.0 * np.log10(mse)
    return np.minimum(psnr, PSNR_CAP_DB) + 0.0  # + 0.0: black against white is 0.0 dB, not -0.0


def _gaussian_1d(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x * x) / (2 * sigma * sigma))
    return g / g.sum()


def per_image_ssim(pred: np.ndarray, truth: np.ndarray, device: torch.device | str | None = None) -> np.ndarray:
    """SSIM per image: uint8 (N, H, W, 3) -> (N,), mean over channels and valid window positions.

    The filtering runs on ``device`` (default: the CPU), still in float64: on a GPU it is the
    cheap part of scoring a model there, where on the CPU it is most of it.

    Matches skimage's ``structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=255, channel_axis=-1)``: skimage filters with
    reflect padding and then crops (win - 1) // 2 pixels per side, which is exactly a 'valid'
    convolution, so that is what runs here. H and W must be at least 11.
    """
    _check_pair(pred, truth)
    n, h, w, _ = pred.shape
    if h < SSIM_WINDOW or w < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {h}x{w}")
    c1 = (SSIM_K1 * SSIM_DATA_RANGE) ** 2
    c2 = (SSIM_K2 * SSIM_DATA_RANGE) ** 2
    g = _gaussian_1d(SSIM_WINDOW, SSIM_SIGMA).to(device)
    # The Gaussian is separable: two 1-D passes over 15 planes (5 moments x 3 channels).
    planes = 15
    g_rows = g.view(1, 1, SSIM_WINDOW, 1).repeat(planes, 1, 1, 1)
    g_cols = g.view(1, 1, 1, SSIM_WINDOW).repeat(planes, 1, 1, 1)
    out = np.empty(n, dtype=np.float64)
    chunk = max(1, _SSIM_CHUNK_PIXELS // (h * w))
    for start in range(0, n, chunk):
        # Contiguous (B, 3, H, W): channels-last makes the stacking and the grouped float64
        # conv2d several times slower on CPU. float64 because the variances below are
        # differences of numbers near 255^2. One copy, which also spares torch a read-only
        # array (PIL's np.asarray), which it warns about.
        x, y = (torch.from_numpy(np.ascontiguousarray(a[start : start + chunk].transpose(0, 3, 1, 2), dtype=np.float64))
                for a in (pred, truth))  # in 0..255
        x, y = x.to(device), y.to(device)
        stacked = torch.cat((x, y, x * x, y * y, x * y), dim=1)  # (B, 15, H, W)
        filtered = torch.nn.functional.conv2d(stacked, g_rows, groups=planes)
        filtered = torch.nn.functional.conv2d(filtered, g_cols, groups=planes)
        ux, uy, uxx, uyy, uxy = filtered.chunk(5, dim=1)  # each (B, 3, H-10, W-10)
        vx = uxx - ux * ux
        vy = uyy - uy * uy
        vxy = uxy - ux * uy
        ssim_map = ((2 * ux * uy + c1) * (2 * vxy + c2)) / (
            (ux * ux + uy * uy + c1) * (vx + vy + c2)
        )
        # Every channel has the same number of positions, so the mean over all of them equals
        # the mean of the per-channel means.
        out[start : start + len(x)] = ssim_map.mean(dim=(1, 2, 3)).cpu().numpy()
    return out


def colourfulness(images: np.ndarray) -> np.ndarray:
    """Hasler and Suesstrunk 2003 colourfulness per image: uint8 (N, H, W, 3) -> (N,).

    Uses the absolute-value opponent channels of CT2 and DDColor on 0..255 values:
    rg = |R - G|, yb = |(R + G) / 2 - B|, and
    CF = sqrt(std_rg^2 + std_yb^2) + 0.3 sqrt(mean_rg^2 + mean_yb^2), population std.
    """
    _check_batch(images, "images")
    rgb = images.astype(np.float64)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    rg = np.abs(r - g)
    yb = np.abs(0.5 * (r + g) - b)
    axes = (1, 2)
    std = np.sqrt(rg.var(axis=axes) + yb.var(axis=axes))
    mean = np.sqrt(rg.mean(axis=axes) ** 2 + yb.mean(axis=axes) ** 2)
    return std + 0.3 * mean


def is_grey(images: np.ndarray) -> np.ndarray:
    """Whether each uint8 (N, H, W, 3) image is neutral grey (R = G = B at every pixel): (N,)."""
    _check_batch(images, "images")
    return ((images[..., 0] == images[..., 1]) & (images[..., 1] == images[..., 2])).all(axis=(1, 2))


class MetricAccumulator:
    """Streams batches and keeps only per-metric sums, so memory stays flat over any image count.

    ``result()`` gives the same dict as ``summarize`` on the concatenation of all batches.
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        self._device = device  # where SSIM's filtering runs (per_image_ssim)
        self._sums = {"mse": 0.0, "psnr": 0.0, "psnr_colour": 0.0, "ssim": 0.0, "cf_pred": 0.0, "cf_truth": 0.0}
        self._images = 0
        self._grey = 0

    def update(self, pred: np.ndarray, truth: np.ndarray) -> None:
        """Add one batch of uint8 (N, H, W, 3) predictions and their ground truth."""
        psnr, grey = per_image_psnr(pred, truth), is_grey(truth)
        self._sums["mse"] += float(per_image_mse(pred, truth).sum())
        self._sums["psnr"] += float(psnr.sum())
        self._sums["psnr_colour"] += float(psnr[~grey].sum())
        self._grey += int(grey.sum())
        self._sums["ssim"] += float(per_image_ssim(pred, truth, self._device).sum())
        self._sums["cf_pred"] += float(colourfulness(pred).sum())
        self._sums["cf_truth"] += float(colourfulness(truth).sum())
        self._images += len(pred)

    def result(self) -> dict[str, float | None]:
        """Means over all images seen; see ``summarize`` for the keys."""
        if self._images == 0:
            raise ValueError("no images to summarise: update() was never given a non-empty batch")
        n = self._images
        cf_pred = self._sums["cf_pred"] / n
        cf_truth = self._sums["cf_truth"] / n
        colour = n - self._grey
        return {
            "mse": self._sums["mse"] / n,
            "psnr": self._sums["psnr"] / n,
            "psnr_colour_images": self._sums["psnr_colour"] / colour if colour else None,
            "grey_truth_images": self._grey,
            "ssim": self._sums["ssim"] / n,
            "colourfulness": cf_pred,
            "colourfulness_truth": cf_truth,
            "delta_colourfulness": abs(cf_pred - cf_truth),
            "images": n,
        }


def summarize(pred: np.ndarray, truth: np.ndarray) -> dict[str, float | None]:
    """Mean metrics of a uint8 (N, H, W, 3) batch against its truth.

    Keys: ``mse`` (values in [0, 1]), ``psnr`` (dB, per image then averaged),
    ``psnr_colour_images`` (the same over the images whose truth is not neutral grey; None if
    there are none) and ``grey_truth_images`` (how many are: the grey baseline copies those
    exactly, and each adds the 100 dB cap to its mean PSNR), ``ssim``,
    ``colourfulness`` (mean CF of pred), ``colourfulness_truth``, ``delta_colourfulness``
    (|difference of the two means|) and ``images`` (the count).
    """
    acc = MetricAccumulator()
    acc.update(pred, truth)
    return acc.result()
