"""Colour as classification: gamut cells, soft encoding, the prior, annealed-mean decoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis.extra.numpy import arrays

from colorize import color, quantize
from colorize.models import ab_bins

BINS = ab_bins()


def test_the_gamut_cells_are_zhangs_quantisation() -> None:
    assert len(BINS) == 262  # the sRGB gamut's 10x10 cells, as the README says (Zhang et al. count 313 from ImageNet)
    assert (BINS == torch.tensor([0.0, 0.0])).all(dim=1).any(), "neutral grey must be a class"
    assert (BINS % 10 == 0).all()


@settings(max_examples=30, deadline=None)
@given(arrays(np.uint8, (4, 4, 3)))
def test_every_srgb_colour_lies_in_some_cell(rgb: np.ndarray) -> None:
    ab = torch.from_numpy(color.rgb_to_lab_np(rgb)[..., 1:]).permute(2, 0, 1)[None]
    nearest = BINS[quantize.hard_encode(ab, BINS)]  # (1, H, W, 2)
    assert (nearest - ab.permute(0, 2, 3, 1)).abs().max() <= 5.0 + 1e-3


def test_soft_encoding_is_a_distribution_peaked_at_the_nearest_cell() -> None:
    ab = torch.tensor([[[[3.0, -42.0]], [[17.0, 60.0]]]])  # (1, 2, 1, 2): two pixels
    target = quantize.soft_encode(ab, BINS)
    assert target.shape == (1, len(BINS), 1, 2)
    assert torch.allclose(target.sum(dim=1), torch.ones(1, 1, 2))
    assert ((target > 0).sum(dim=1) == 5).all()  # the README's "5 nearest cells"
    assert torch.equal(target.argmax(dim=1), quantize.hard_encode(ab, BINS))


def test_encoding_in_chunks_of_pixels_matches_the_nearest_cells_found_all_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Distances to every cell are held a chunk of pixels at a time (a batch of 256 at 64 px took 4 GB)."""
    ab = torch.randn(3, 2, 7, 5, generator=torch.Generator().manual_seed(0)) * 40
    brute = ((ab.permute(0, 2, 3, 1)[..., None, :] - BINS) ** 2).sum(dim=-1)  # (B, H, W, Q)
    whole = quantize.soft_encode(ab, BINS), quantize.hard_encode(ab, BINS)
    monkeypatch.setattr(quantize, "CHUNK_PIXELS", 16)  # 105 pixels: chunks of 16 and a last of 9
    soft, hard = quantize.soft_encode(ab, BINS), quantize.hard_encode(ab, BINS)
    assert torch.equal(soft, whole[0]) and torch.equal(hard, whole[1]) and torch.equal(hard, brute.argmin(dim=-1))
    assert torch.allclose(soft.permute(0, 2, 3, 1).topk(5, dim=-1).indices.sort().values,
                          brute.topk(5, dim=-1, largest=False).indices.sort().values)


@pytest.mark.parametrize("temperature", [0.05, 0.38, 1.0])
def test_annealed_mean_of_a_confident_prediction_is_its_cell(temperature: float) -> None:
    logits = torch.full((1, len(BINS), 2, 2), -30.0)
    logits[:, 7] = 30.0
    ab = quantize.annealed_mean(logits, BINS, temperature)
    assert torch.allclose(ab, BINS[7].view(1, 2, 1, 1).expand(1, 2, 2, 2), atol=1e-3)


def test_lower_temperature_moves_from_the_mean_towards_the_mode() -> None:
    torch.manual_seed(0)
    logits = torch.randn(1, len(BINS), 1, 1) * 2
    mode = BINS[logits.flatten().argmax()]
    distances = [float((quantize.annealed_mean(logits, BINS, t).flatten() - mode).norm()) for t in (1.0, 0.38, 0.1, 0.02)]
    assert distances == sorted(distances, reverse=True)
    assert distances[-1] < 1.0
    # The limit: the mode itself, not an overflow to NaN (logits / 1e-40 are past float32),
    # nor 0 / 0 where float32 rounds the temperature itself to 0.
    for tiny in (1e-40, 1e-46):
        assert torch.equal(quantize.annealed_mean(logits, BINS, tiny).flatten(), mode)


def test_annealed_mean_stays_float32_under_bf16_autocast() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, len(BINS), 4, 4) * 3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ab = quantize.annealed_mean(logits, BINS, 0.38)
    assert ab.dtype == torch.float32
    assert torch.allclose(ab, quantize.annealed_mean(logits, BINS, 0.38), atol=1e-5)


def test_rebalancing_weighs_rare_colours_up_and_keeps_the_loss_scale() -> None:
    common = torch.zeros(8, 2, 4, 4)  # greys
    rare = torch.tensor([60.0, 50.0]).view(1, 2, 1, 1).expand(1, 2, 4, 4)  # a saturated orange
    prior = quantize.class_prior([common, rare], BINS)
    weights = quantize.rebalance_weights(prior)
    assert torch.isclose(prior.sum(), torch.tensor(1.0))
    assert torch.isclose((prior * weights).sum(), torch.tensor(1.0), atol=1e-5)
    grey, orange = quantize.hard_encode(torch.zeros(1, 2, 1, 1), BINS), quantize.hard_encode(rare[:, :, :1, :1], BINS)
    assert weights[orange] > 3 * weights[grey]


def test_the_loss_prefers_the_right_distribution() -> None:
    ab = torch.tensor([20.0, -30.0]).view(1, 2, 1, 1).expand(2, 2, 3, 3).contiguous()
    right = 10 * quantize.soft_encode(ab, BINS)
    wrong = 10 * quantize.soft_encode(-ab, BINS)
    weights = torch.ones(len(BINS))
    assert quantize.classification_loss(right, ab, BINS, weights) < quantize.classification_loss(wrong, ab, BINS, weights)
    assert quantize.classification_loss(right, ab, BINS, None) < quantize.classification_loss(torch.zeros_like(right), ab, BINS, None)


def _dense_loss(logits: torch.Tensor, ab: torch.Tensor, class_weights: torch.Tensor | None) -> torch.Tensor:
    """The multinomial loss written from its definition: a dense target over every cell."""
    target = quantize.soft_encode(ab, BINS)
    per_pixel = -(target * torch.log_softmax(logits.float(), dim=1)).sum(dim=1)
    weight = 1.0 if class_weights is None else class_weights[target.argmax(dim=1)]
    return (weight * per_pixel).mean()


@pytest.mark.parametrize("rebalanced", [False, True])
def test_the_sparse_loss_and_its_gradient_are_the_dense_targets(rebalanced: bool) -> None:
    """The loss gathers each pixel's 5 cells instead of building a (B, Q, H, W) target."""
    generator = torch.Generator().manual_seed(0)
    # Random colours, and pixels exactly between two cells: (5, 0) is as near (0, 0) as (10, 0),
    # and the dense target's argmax takes the lower-numbered of the two for the weight.
    ab = torch.randn(2, 2, 6, 5, generator=generator) * 40
    ab[0, :, 0] = torch.tensor([5.0, 0.0]).view(2, 1)
    logits = torch.randn(2, len(BINS), 6, 5, generator=generator) * 3
    class_weights = torch.rand(len(BINS), generator=generator) * 4 + 0.1 if rebalanced else None
    sparse, dense = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    loss = quantize.classification_loss(sparse, ab, BINS, class_weights)
    reference = _dense_loss(dense, ab, class_weights)
    loss.backward(), reference.backward()
    assert torch.allclose(loss, reference, rtol=1e-6)
    assert torch.allclose(sparse.grad, dense.grad, rtol=1e-5, atol=1e-9)
