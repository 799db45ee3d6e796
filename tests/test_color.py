"""Property and reference-value tests for colorize.color (sRGB <-> Lab, luma, normalisation)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from colorize import ablation, color

# README: out-of-gamut colours are desaturated with their lightness kept, to within 0.3 at sRGB's
# yellow corner. A literal, not color.CLIP_DELTA_E: the tests hold the code to what the docs promise.
LIGHTNESS_KEPT = 0.3 + 0.01

# Small images keep each example cheap; no deadline because the CI machine may be shared.
# A decorator rather than a loaded profile, so other test modules keep their own settings.
fast = settings(max_examples=60, deadline=None)

sizes = st.tuples(st.integers(1, 4), st.integers(1, 4))


@st.composite
def rgb_images(draw: st.DrawFn) -> torch.Tensor:
    """float32 sRGB (3, H, W) in [0, 1], with the cube's faces and corners reachable."""
    h, w = draw(sizes)
    values = st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0, width=32))
    return torch.from_numpy(draw(arrays(np.float32, (3, h, w), elements=values)))


@st.composite
def uint8_images(draw: st.DrawFn) -> np.ndarray:
    """uint8 sRGB (H, W, 3)."""
    h, w = draw(sizes)
    return draw(arrays(np.uint8, (h, w, 3)))


@fast
@given(rgb_images())
def test_rgb_lab_round_trip(rgb: torch.Tensor) -> None:
    back = color.lab_to_rgb(color.rgb_to_lab(rgb))
    assert back.shape == rgb.shape
    assert (back - rgb).abs().max().item() < 1e-4


@fast
@given(rgb_images())
def test_lab_ranges_over_gamut(rgb: torch.Tensor) -> None:
    lab = color.rgb_to_lab(rgb)
    # float32 rounding can put white a few ulps above 100.
    assert lab[0].min().item() >= -1e-4
    assert lab[0].max().item() <= 100 + 1e-4
    assert lab[1:].abs().max().item() < 130


@fast
@given(rgb_images(), st.floats(1.5, 5.0), st.floats(-40.0, 40.0))
def test_out_of_gamut_keeps_lightness(rgb: torch.Tensor, scale: float, shift: float) -> None:
    lab = color.rgb_to_lab(rgb)
    pushed = torch.cat((lab[:1], lab[1:] * scale + shift), dim=0)  # mostly outside sRGB
    out = color.lab_to_rgb(pushed, keep_lightness=True)
    assert out.min().item() >= 0.0 and out.max().item() <= 1.0
    assert (color.rgb_to_lab(out)[0] - lab[0]).abs().max().item() < LIGHTNESS_KEPT  # < 0.05 but at sharp corners


def _largest_fitting_fraction(lab: np.ndarray, samples: int = 2049) -> np.ndarray:
    """For Lab (N, 3): the largest of ``samples`` chroma fractions in [0, 1] at which each fits sRGB."""
    fractions = np.linspace(0.0, 1.0, samples, dtype=np.float32)
    rays = np.concatenate([np.broadcast_to(lab[:, None, :1], (len(lab), samples, 1)),
                           lab[:, None, 1:] * fractions[None, :, None]], axis=-1)
    linear = color._lab_to_linear(torch.from_numpy(rays).movedim(-1, -3)).movedim(-3, -1).numpy()
    fits = ((linear >= -color.GAMUT_TOLERANCE) & (linear <= 1 + color.GAMUT_TOLERANCE)).all(-1)
    return np.where(fits, fractions, 0.0).max(axis=1)


def test_a_ramp_of_yellows_past_the_gamut_changes_colour_once_not_back_and_forth() -> None:
    """Near sRGB's yellow corner the chroma that fits is not one interval: a yellow fits to 27%
    of its chroma, not to 99.95%, and again to 100%. Bisection over [0, 1] landed in either band
    as the chroma grew, so a smooth ramp flickered between vivid yellow and pale cream (up to 8
    times in 600 steps); and sRGB yellow with 0.1% more chroma came out (255, 249, 197)."""
    rng = np.random.default_rng(3)
    starts = np.stack([rng.integers(240, 256, 120), rng.integers(235, 256, 120), rng.integers(0, 60, 120)], -1)
    base = color.rgb_to_lab_np(np.concatenate([[[255, 255, 0]], starts]).astype(np.uint8)[None])[0]
    more = np.arange(1.0, 1.6, 0.001, dtype=np.float32)
    ramps = np.repeat(base[:, None], len(more), axis=1)  # (121, 600, 3)
    ramps[..., 1:] *= more[None, :, None]
    out = color.lab_to_rgb_np(ramps)
    steps = np.abs(np.diff(color.to_uint8(out).astype(int), axis=1)).max(axis=-1)  # (121, 599)
    jumps = (steps > 20).sum(axis=1)
    assert (jumps >= 2).sum() <= 1, f"{(jumps >= 2).sum()} of {len(jumps)} ramps jump more than once"
    assert np.abs(color.to_uint8(out[0, 1]).astype(int) - [255, 255, 0]).max() <= 1  # x1.001: clipped, not cream
    back = color.rgb_to_lab_np(out)
    assert np.abs(back[..., 0] - ramps[..., 0]).max() <= LIGHTNESS_KEPT


def test_out_of_gamut_colours_keep_their_lightness_exactly_away_from_sharp_corners() -> None:
    """Clipping, which moves L, is kept for the few colours whose fitting chroma bisection cannot reach."""
    rng = np.random.default_rng(1)
    lab = rng.uniform([0, -110, -110], [100, 110, 110], (5000, 3)).astype(np.float32)
    back = color.rgb_to_lab_np(color.lab_to_rgb_np(lab[None]))[0]
    assert (np.abs(back[:, 0] - lab[:, 0]) > 0.01).mean() < 0.002
    assert np.abs(back[:, 0] - lab[:, 0]).max() <= LIGHTNESS_KEPT
    kept = np.hypot(back[:, 1], back[:, 2]) / np.maximum(np.hypot(lab[:, 1], lab[:, 2]), 1e-6)
    assert (_largest_fitting_fraction(lab) - kept).max() < 0.02


@fast
@given(rgb_images(), st.floats(1.5, 5.0))
def test_clipping_mode_stays_in_range(rgb: torch.Tensor, scale: float) -> None:
    lab = color.rgb_to_lab(rgb)
    out = color.lab_to_rgb(torch.cat((lab[:1], lab[1:] * scale), dim=0), keep_lightness=False)
    assert out.min().item() >= 0.0 and out.max().item() <= 1.0


@fast
@given(uint8_images())
def test_numpy_wrappers_agree_with_torch(img: np.ndarray) -> None:
    unit = torch.from_numpy(img.astype(np.float32) / 255.0).movedim(-1, -3)  # (3, H, W)
    lab = color.rgb_to_lab(unit)
    lab_np = color.rgb_to_lab_np(img)
    assert lab_np.dtype == np.float32 and lab_np.shape == img.shape
    np.testing.assert_allclose(lab_np, lab.movedim(-3, -1).numpy(), atol=1e-4)
    # Float input in [0, 1] is taken as-is, uint8 is scaled by 1/255.
    np.testing.assert_allclose(color.rgb_to_lab_np(img / 255.0), lab_np, atol=1e-4)

    pushed = lab * torch.tensor([1.0, 2.0, 2.0]).view(3, 1, 1)
    rgb_np = color.lab_to_rgb_np(pushed.movedim(-3, -1).numpy())
    np.testing.assert_allclose(rgb_np, color.lab_to_rgb(pushed).movedim(-3, -1).numpy(), atol=1e-5)

    np.testing.assert_allclose(color.luma_np(img), color.luma(unit)[0].numpy(), atol=1e-6)


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.int64, np.bool_])
def test_numpy_wrappers_refuse_integers_other_than_uint8(dtype) -> None:
    """A uint16 128 was taken for the float 128.0: L 100, far past white."""
    for convert in (color.rgb_to_lab_np, color.luma_np):
        with pytest.raises(TypeError, match="expected uint8 or floats in"):
            convert(np.full((2, 2, 3), 1, dtype=dtype))


@pytest.mark.parametrize(
    ("rgb", "expected"),
    [
        ((1.0, 1.0, 1.0), (100.0, 0.0, 0.0)),
        ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0)),
        ((1.0, 0.0, 0.0), (53.24, 80.09, 67.20)),
        ((0.0, 1.0, 0.0), (87.73, -86.18, 83.18)),
        ((0.0, 0.0, 1.0), (32.30, 79.19, -107.86)),
    ],
)
def test_published_lab_values(rgb: tuple, expected: tuple) -> None:
    lab = color.rgb_to_lab(torch.tensor(rgb).view(3, 1, 1)).flatten()
    np.testing.assert_allclose(lab.numpy(), expected, atol=0.05)


@fast
@given(uint8_images())
def test_luma_matches_pil(img: np.ndarray) -> None:
    pil = np.asarray(Image.fromarray(img).convert("L"), dtype=np.int32)
    unit = torch.from_numpy(img.astype(np.float32) / 255.0).movedim(-1, -3)
    ours = np.rint(color.luma(unit)[0].numpy() * 255.0).astype(np.int32)
    assert np.abs(ours - pil).max() <= 1


def test_gray_rgb_from_l_inverts_every_grey_level() -> None:
    levels = torch.arange(256, dtype=torch.float32) / 255.0
    greys = levels.view(1, 1, 256).expand(3, 1, 256)
    lab = color.rgb_to_lab(greys)
    assert lab[1:].abs().max().item() < 1e-3  # neutral greys have no chroma
    back = color.gray_rgb_from_l(lab[:1])  # (1, 1, 256)
    assert (back[0, 0] - levels).abs().max().item() < 1e-5
    assert np.array_equal(color.to_uint8(back[0, 0].numpy()), np.arange(256, dtype=np.uint8))


def test_colour_conversions_stay_float32_under_bf16_autocast() -> None:
    # Training targets and colour losses are computed inside the bf16 autocast of a training step.
    rgb = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lab, back = color.rgb_to_lab(rgb), color.lab_to_rgb(color.rgb_to_lab(rgb))
    assert lab.dtype == back.dtype == torch.float32
    assert torch.allclose(lab, color.rgb_to_lab(rgb)) and torch.allclose(back, rgb, atol=1e-4)


def test_rgb_to_lab_refuses_8_bit_values() -> None:
    with pytest.raises(TypeError, match="divide 8-bit values by 255"):
        color.rgb_to_lab(torch.full((3, 1, 1), 128, dtype=torch.uint8))


def test_normalisation_constants() -> None:
    L = torch.tensor([0.0, 50.0, 100.0])
    assert color.normalize_l(L).tolist() == [-0.5, 0.0, 0.5]
    ab = torch.tensor([-110.0, 0.0, 55.0])
    assert color.normalize_ab(ab).tolist() == [-1.0, 0.0, 0.5]
    assert torch.equal(color.denormalize_ab(color.normalize_ab(ab)), ab)


def test_to_lab_fills_chunks_of_any_size_with_the_whole_conversion() -> None:
    """Filled in place a chunk at a time (photo_model's 6,000 photos peaked 1.2 GB joining chunks)."""
    rgb = np.random.default_rng(3).integers(0, 256, (7, 5, 5, 3), dtype=np.uint8)
    whole = color.rgb_to_lab(torch.from_numpy(rgb).permute(0, 3, 1, 2).float() / 255.0)
    for chunk_pixels in (1, 50, 10**6):  # one image a chunk, two, all seven
        assert torch.allclose(ablation.to_lab(rgb, torch.device("cpu"), chunk_pixels=chunk_pixels), whole, atol=1e-4)
