"""Colour as classification: ab quantised into gamut cells (Zhang, Isola and Efros, 2016).

Regression towards the mean of plausible colours gives desaturated brown; predicting a
distribution over ab cells and decoding it with the *annealed mean* keeps colours vivid. The
pieces, pure torch with no I/O:

- :func:`soft_encode`: a target ab becomes weights on its nearest cells (Gaussian in ab);
- :func:`class_prior` and :func:`rebalance_weights`: rare (saturated) colours weigh more in the
  loss, so that the network does not settle on the common desaturated ones;
- :func:`annealed_mean`: the expectation of the distribution sharpened by a temperature.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

NEIGHBOURS = 5
SIGMA = 5.0  # Lab units, for both soft encoding and smoothing the prior
PRIOR_MIX = 0.5  # weight of the uniform distribution mixed into the prior
PRIOR_IMAGES = 2048  # training images sampled to estimate the prior


# Pixels whose distances to every cell are held at once: the (pixels, Q) block, 262 cells of
# float32, is 275 MB. Unbounded, a batch of 256 images at 64 px took 4 GB (a (B, H, W, Q, 2)
# difference and its square), and 4x that per doubling of the side.
CHUNK_PIXELS = 2**18


@torch.no_grad()  # targets: topk's out= takes no gradient
def _nearest(ab: torch.Tensor, bins: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 2, H, W) ab and (Q, 2) centres -> the squared distances to the ``k`` nearest cells
    and their indices, each (B, H, W, k), nearest first."""
    b, _, h, w = ab.shape
    points = ab.float().permute(0, 2, 3, 1).reshape(-1, 2)
    centres = bins.to(points)
    distances = torch.empty(len(points), k, dtype=points.dtype, device=points.device)
    index = torch.empty(len(points), k, dtype=torch.long, device=points.device)
    for start in range(0, len(points), CHUNK_PIXELS):
        chunk = points[start : start + CHUNK_PIXELS]
        squared = (chunk[:, :1] - centres[:, 0]).square_()  # two (pixels, Q) blocks, not a (pixels, Q, 2) one
        squared += (chunk[:, 1:] - centres[:, 1]).square_()
        torch.topk(squared, k, dim=-1, largest=False, out=(distances[start : start + CHUNK_PIXELS],
                                                           index[start : start + CHUNK_PIXELS]))
    return distances.view(b, h, w, k), index.view(b, h, w, k)


def _soft(ab: torch.Tensor, bins: torch.Tensor, neighbours: int, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The sparse form of :func:`soft_encode`: each pixel's weights on its nearest cells and
    their indices, each (B, H, W, ``neighbours``)."""
    distances, index = _nearest(ab, bins, neighbours)
    return torch.softmax(-distances / (2 * sigma**2), dim=-1), index


def soft_encode(ab: torch.Tensor, bins: torch.Tensor, *, neighbours: int = NEIGHBOURS, sigma: float = SIGMA) -> torch.Tensor:
    """(B, 2, H, W) ab in Lab units -> (B, Q, H, W) target distribution over the cells.

    Each pixel spreads over its ``neighbours`` nearest cells with Gaussian weights, so that a
    colour between two cells is not forced into one of them.
    """
    weights, index = _soft(ab, bins, neighbours, sigma)
    target = torch.zeros(*weights.shape[:-1], len(bins), dtype=weights.dtype, device=ab.device)
    return target.scatter_(-1, index, weights).permute(0, 3, 1, 2)


def hard_encode(ab: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """(B, 2, H, W) ab -> (B, H, W) index of the nearest cell."""
    return _nearest(ab, bins, 1)[1].squeeze(-1)


def annealed_mean(logits: torch.Tensor, bins: torch.Tensor, temperature: float) -> torch.Tensor:
    """(B, Q, H, W) logits -> (B, 2, H, W) ab: the mean of ``softmax(logits / temperature)``.

    Temperature 1 is the plain mean (smooth, desaturated); lower values move towards the mode
    (vivid, sometimes patchy). Zhang et al. use 0.38.
    """
    with torch.autocast(device_type=logits.device.type, enabled=False):  # else the mean runs in bf16
        # Shifted so that the largest logit is 0 before dividing: a tiny temperature then tends
        # to the mode instead of overflowing to inf (and NaN after the softmax).
        logits = logits.float()
        # A temperature that float32 rounds to 0 (1e-46) would give 0/0: its smallest normal
        # number gives the limit, the mode.
        temperature = max(temperature, torch.finfo(torch.float32).tiny)
        probs = torch.softmax((logits - logits.amax(dim=1, keepdim=True)) / temperature, dim=1)
        return torch.einsum("bqhw,qc->bchw", probs, bins.to(probs))


class NoPixels(ValueError):
    """No colour to estimate a prior from: every sampled image was unreadable."""


def class_prior(ab_batches: Iterable[torch.Tensor], bins: torch.Tensor, *, sigma: float = SIGMA) -> torch.Tensor:
    """Empirical distribution (Q,) of the cells over ab batches, smoothed by a Gaussian in ab."""
    counts = torch.zeros(len(bins), dtype=torch.float64)
    for ab in ab_batches:
        counts += torch.bincount(hard_encode(ab, bins).flatten(), minlength=len(bins)).double().cpu()
    if counts.sum() == 0:
        raise NoPixels("no pixels to estimate the colour prior from")
    centres = bins.double().cpu()
    kernel = torch.exp(-torch.cdist(centres, centres) ** 2 / (2 * sigma**2))
    smoothed = kernel @ (counts / counts.sum())
    return (smoothed / smoothed.sum()).float()


def rebalance_weights(prior: torch.Tensor, *, mix: float = PRIOR_MIX) -> torch.Tensor:
    """Per-cell loss weights ``1 / ((1 - mix) * prior + mix / Q)``, normalised so that their
    expectation under the prior is 1 (the loss keeps its scale)."""
    weights = 1.0 / ((1 - mix) * prior + mix / len(prior))
    return weights / (prior * weights).sum()


def classification_loss(logits: torch.Tensor, ab: torch.Tensor, bins: torch.Tensor, class_weights: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy of (B, Q, H, W) logits against soft-encoded ab, each pixel weighted by the
    rebalancing weight of its nearest cell (Zhang et al.'s multinomial loss).

    The target is kept sparse: only a pixel's ``NEIGHBOURS`` cells have weight, so their log
    probabilities are gathered rather than a dense (B, Q, H, W) target built and multiplied
    (two more tensors the size of the logits, for 5 of their 262 cells).
    """
    weights, index = _soft(ab, bins, NEIGHBOURS, SIGMA)  # (B, H, W, k)
    log_probs = F.log_softmax(logits.float(), dim=1)
    per_pixel = -(weights * log_probs.gather(1, index.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)).sum(dim=-1)  # (B, H, W)
    if class_weights is None:
        return per_pixel.mean()
    # The cell of largest weight, the lowest-numbered where weights tie: the dense target's argmax.
    strongest = index.masked_fill(weights < weights.amax(dim=-1, keepdim=True), len(bins)).amin(dim=-1)
    return (class_weights.to(per_pixel)[strongest] * per_pixel).mean()
