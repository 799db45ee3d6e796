"""Colour maths: sRGB <-> CIE Lab (D65), ITU-R 601 luma, and the model's normalisation.

Pure functions with no I/O. The torch functions take channels-first tensors ``(..., 3, H, W)``
on any device; the ``*_np`` wrappers take channels-last numpy images ``(..., H, W, 3)`` as
image libraries hand them out. RGB values are floats in [0, 1]; L is in [0, 100]; a and b
are in Lab units (roughly [-110, 110]).
"""

from __future__ import annotations

import numpy as np
import torch

# The model sees L and ab normalised with these constants (richzhang/colorization's convention).
L_CENTER = 50.0
L_RANGE = 100.0
AB_RANGE = 110.0

# ITU-R BT.601 luma weights, applied to gamma-encoded sRGB (what PIL's convert("L") does).
LUMA_601 = (0.299, 0.587, 0.114)

# CIE Lab with the D65 white: the sRGB -> XYZ matrix and CIE's two curve constants. Public
# because images.py runs the same conversion in numpy for the bulk job's hot path.
WHITE_D65 = (0.95047, 1.0, 1.08883)
RGB_TO_XYZ = (
    (0.4124564, 0.3575761, 0.1804375),
    (0.2126729, 0.7151522, 0.0721750),
    (0.0193339, 0.1191920, 0.9503041),
)
CIE_EPSILON = 216.0 / 24389.0  # CIE's (6/29)^3
CIE_KAPPA = 24389.0 / 27.0  # CIE's (29/3)^3
# How far outside [0, 1] a linear sRGB value may fall and still count as in gamut.
GAMUT_TOLERANCE = 1e-6


def _matrix(rows: tuple, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(rows, dtype=like.dtype, device=like.device)


def _apply(matrix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Multiply each pixel's 3-vector along dim -3 by ``matrix``, in ``x``'s own precision: autocast
    would run the product in bf16 (2/255 off in sRGB), rounding the targets and colour losses."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        return torch.einsum("ij,...jhw->...ihw", matrix, x)


def srgb_to_linear(rgb: torch.Tensor) -> torch.Tensor:
    rgb = rgb.clamp(0.0, 1.0)
    return torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(linear: torch.Tensor) -> torch.Tensor:
    return _srgb_curve(linear.clamp(0.0, 1.0))


def _srgb_curve(linear: torch.Tensor) -> torch.Tensor:
    """The sRGB transfer curve on [0, 1]. Its power branch never sees values below the knee:
    torch.where sends a zero gradient into the branch it did not pick, and zero times the power's
    infinite slope at 0 is NaN. (torch up to 2.12 lets gradient through clamp's bounds, so black
    pixels, linear exactly 0, turned a GPU run's weights to NaN there.)"""
    knee = 0.0031308
    return torch.where(linear <= knee, linear * 12.92, 1.055 * linear.clamp_min(knee) ** (1 / 2.4) - 0.055)


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1], shape (..., 3, H, W) -> Lab, same shape; L in [0, 100]."""
    if not rgb.is_floating_point():
        raise TypeError(f"rgb_to_lab takes floating-point sRGB in [0, 1], got {rgb.dtype} (divide 8-bit values by 255)")
    return _linear_to_lab(srgb_to_linear(rgb))


def _linear_to_lab(linear: torch.Tensor) -> torch.Tensor:
    xyz = _apply(_matrix(RGB_TO_XYZ, linear), linear)
    white = torch.tensor(WHITE_D65, dtype=linear.dtype, device=linear.device).view(3, 1, 1)
    t = xyz / white
    f = torch.where(t > CIE_EPSILON, t.clamp(min=CIE_EPSILON) ** (1 / 3), (CIE_KAPPA * t + 16) / 116)
    fx, fy, fz = f.unbind(dim=-3)
    return torch.stack((116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)), dim=-3)


def _lab_to_linear(lab: torch.Tensor) -> torch.Tensor:
    """Lab -> linear RGB, unclamped, so callers can see what falls outside the gamut."""
    L, a, b = lab.unbind(dim=-3)
    fy = (L + 16) / 116
    fx = fy + a / 500
    fz = fy - b / 200

    def finv(f: torch.Tensor) -> torch.Tensor:
        return torch.where(f**3 > CIE_EPSILON, f**3, (116 * f - 16) / CIE_KAPPA)

    y = torch.where(L > CIE_KAPPA * CIE_EPSILON, fy**3, L / CIE_KAPPA)
    white = torch.tensor(WHITE_D65, dtype=lab.dtype, device=lab.device).view(3, 1, 1)
    xyz = torch.stack((finv(fx), y, finv(fz)), dim=-3) * white
    return _apply(torch.linalg.inv(_matrix(RGB_TO_XYZ, lab).double()).to(lab.dtype), xyz)


def lab_to_rgb(lab: torch.Tensor, *, keep_lightness: bool = True, steps: int = 12) -> torch.Tensor:
    """Lab (..., 3, H, W) -> sRGB in [0, 1].

    Colours outside the sRGB gamut are brought inside. With ``keep_lightness`` (the default)
    each such pixel keeps the fraction of its chroma at which it meets the gamut's edge going
    out from grey, found to about ``2**-steps`` (:func:`_fitting_chroma`), at its own L and hue
    (a neutral grey of any L in [0, 100] is always in gamut), except at sRGB's yellow corner,
    where one just past it is clipped and L moves by at most :data:`CLIP_DELTA_E`. Otherwise RGB is simply clipped, which is
    faster but shifts lightness.
    """
    lab = lab.float() if not lab.is_floating_point() else lab
    L = lab[..., :1, :, :].clamp(0.0, 100.0)
    lab = torch.cat((L, lab[..., 1:, :, :]), dim=-3)
    linear = _lab_to_linear(lab)
    if keep_lightness:
        outside = ~_in_gamut(linear)[..., 0, :, :]  # (..., H, W)
        if bool(outside.any()):
            pixels = lab.movedim(-3, -1)[outside].T[:, None, :].contiguous()  # (3, 1, N)
            fitted = _lab_to_linear(_scaled(pixels, _fitting_chroma(pixels, steps)))
            linear = linear.movedim(-3, -1).index_put((outside,), fitted[:, 0, :].T).movedim(-1, -3)  # clipped below
    return linear_to_srgb(linear)


def _in_gamut(linear: torch.Tensor) -> torch.Tensor:
    """Linear RGB (..., 3, H, W) -> whether each pixel is inside sRGB, (..., 1, H, W)."""
    return ((linear >= -GAMUT_TOLERANCE) & (linear <= 1 + GAMUT_TOLERANCE)).all(dim=-3, keepdim=True)


def _scaled(lab: torch.Tensor, fraction: torch.Tensor) -> torch.Tensor:
    """Lab (3, ...) with its chroma times ``fraction`` (1, ...)."""
    return torch.cat((lab[:1], lab[1:] * fraction))


# How far (CIE76 Delta E) clipping to sRGB may move a colour at the gamut's yellow corner:
# under an 8-bit level of sRGB grey in L.
CLIP_DELTA_E = 0.3
# Where the chroma fractions at which a colour fits sRGB can fall in two bands: around sRGB
# yellow (L 97.1, hue 102.8 degrees). Of 800,000 random Lab colours (half of them at L 80-100),
# the 106 whose fractions did lay within L 92.6-98.2 and hue 98.2-106.6; these bounds leave a
# margin.
_YELLOW_CORNER_L = 92.0
_YELLOW_CORNER_HUE = (96.0, 110.0)
_PROBES = 16  # there, fractions tried up from grey in 16ths


def _fitting_chroma(lab: torch.Tensor, steps: int) -> torch.Tensor:
    """The fraction of each colour's chroma, to about ``2**-steps``, at which it meets sRGB's
    edge on its way out from grey, at its own L and hue: Lab (3, 1, N) -> (1, 1, N) in [0, 1].

    Elsewhere the fractions that fit form one interval, and bisection over [0, 1] finds its
    end. At sRGB's yellow corner, where sRGB is not convex in Lab, they need not: a bright
    yellow fits from 0 to 27% of its chroma, not to 99.95%, and again to 100%. Bisection then
    landed in either band as the chroma changed, so a smooth ramp of yellows flickered
    between vivid and pale cream from one step to the next (15 of 301 ramps jumped 3 to 8
    times). There fractions are tried up from grey in 16ths and bisection refines the first
    exit, so a ramp keeps one colour past the edge; and a colour that clipping moves by at most
    :data:`CLIP_DELTA_E` (sRGB yellow with a rounding more chroma) keeps its whole chroma
    instead, clipped by the caller.
    """
    L, a, b = lab[:, 0, :]
    hue = torch.rad2deg(torch.atan2(b, a))
    corner = (L >= _YELLOW_CORNER_L) & (hue >= _YELLOW_CORNER_HUE[0]) & (hue <= _YELLOW_CORNER_HUE[1])
    lo, hi = torch.zeros_like(lab[:1]), torch.ones_like(lab[:1])
    if bool(corner.any()):
        lo[..., corner] = _before_first_exit(lab[..., corner])
        hi[..., corner] = lo[..., corner] + 1 / _PROBES
    fraction = _bisect(lab, lo, hi, steps)  # one loop for both: each step's fixed cost is most of it
    if bool(corner.any()):
        at_corner = lab[..., corner]
        moved = torch.linalg.vector_norm(_linear_to_lab(_lab_to_linear(at_corner).clamp(0.0, 1.0)) - at_corner,
                                         dim=0, keepdim=True)
        fraction[..., corner] = torch.where(moved <= CLIP_DELTA_E, 1.0, fraction[..., corner])
    return fraction


def _bisect(lab: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, steps: int) -> torch.Tensor:
    """Bisect each colour's chroma fraction between ``lo``, which fits sRGB, and ``hi``, which
    does not: the highest that fits, to ``(hi - lo) / 2**steps``."""
    for _ in range(steps):
        mid = (lo + hi) / 2
        fits = _in_gamut(_lab_to_linear(_scaled(lab, mid)))
        lo, hi = torch.where(fits, mid, lo), torch.where(fits, hi, mid)
    return lo


def _before_first_exit(lab: torch.Tensor) -> torch.Tensor:
    """The last 16th of each colour's chroma that fits sRGB before the first that does not, going
    out from grey: Lab (3, 1, N) -> (1, 1, N)."""
    fractions = torch.arange(1, _PROBES, dtype=lab.dtype, device=lab.device).view(1, -1, 1) / _PROBES
    fits = _in_gamut(_lab_to_linear(_scaled(lab.expand(-1, _PROBES - 1, -1), fractions.expand(-1, -1, lab.shape[-1]))))
    outside = torch.cat((~fits, torch.ones_like(fits[:, :1])), dim=1)  # all of it is outside: why it is here
    return outside.to(lab.dtype).argmax(dim=1, keepdim=True) / _PROBES


def luma(rgb: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma of sRGB (..., 3, H, W) -> (..., 1, H, W), same range as the input."""
    weights = torch.tensor(LUMA_601, dtype=rgb.dtype, device=rgb.device).view(3, 1, 1)
    return (rgb * weights).sum(dim=-3, keepdim=True)


def normalize_l(L: torch.Tensor) -> torch.Tensor:
    """L in [0, 100] -> model input in [-0.5, 0.5]."""
    return (L - L_CENTER) / L_RANGE


def normalize_ab(ab: torch.Tensor) -> torch.Tensor:
    """ab in Lab units -> roughly [-1, 1]."""
    return ab / AB_RANGE


def denormalize_ab(ab: torch.Tensor) -> torch.Tensor:
    return ab * AB_RANGE


def gray_rgb_from_l(L: torch.Tensor) -> torch.Tensor:
    """The neutral sRGB grey of lightness L: (..., 1, H, W) in [0, 100] -> [0, 1]."""
    fy = (L + 16) / 116
    y = torch.where(L > CIE_KAPPA * CIE_EPSILON, fy**3, L / CIE_KAPPA)
    return linear_to_srgb(y)


def rgb_to_lab_np(rgb: np.ndarray) -> np.ndarray:
    """sRGB (..., H, W, 3), uint8 or float in [0, 1] -> float32 Lab (..., H, W, 3)."""
    x = torch.from_numpy(_as_unit_float(rgb)).movedim(-1, -3)
    return rgb_to_lab(x).movedim(-3, -1).numpy()


def lab_to_rgb_np(lab: np.ndarray, *, keep_lightness: bool = True) -> np.ndarray:
    """Lab (..., H, W, 3) -> float32 sRGB in [0, 1], (..., H, W, 3)."""
    x = torch.from_numpy(np.ascontiguousarray(lab, dtype=np.float32)).movedim(-1, -3)
    return lab_to_rgb(x, keep_lightness=keep_lightness).movedim(-3, -1).numpy()


def luma_np(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma of sRGB (..., H, W, 3) -> float32 (..., H, W) in [0, 1]."""
    return (_as_unit_float(rgb) @ np.asarray(LUMA_601, dtype=np.float32)).astype(np.float32)


def to_uint8(rgb: np.ndarray) -> np.ndarray:
    """Float image in [0, 1] -> uint8, rounded to nearest."""
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


def _as_unit_float(rgb: np.ndarray) -> np.ndarray:
    if rgb.dtype == np.uint8:
        return rgb.astype(np.float32) / 255.0
    if not np.issubdtype(rgb.dtype, np.floating):  # uint16 128 was taken for 128.0, far past white
        raise TypeError(f"expected uint8 or floats in [0, 1], got {rgb.dtype}")
    return np.ascontiguousarray(rgb, dtype=np.float32)


def ab_gamut_bins(grid: float = 10.0) -> torch.Tensor:
    """Centres (Q, 2) of the ``grid``-sized ab cells that hold some colour sRGB can show.

    The quantisation of Zhang et al. (2016), cells of side 10 over [-110, 110]^2 kept where
    they overlap the gamut; they count 313 cells from ImageNet pixels (with some spill past
    the gamut), this exact test (a 7x7 sample of each cell against 99 lightness levels) keeps 262.
    """
    edge = int(AB_RANGE // grid)
    axis = torch.arange(-edge, edge + 1, dtype=torch.float64) * grid
    a, b = torch.meshgrid(axis, axis, indexing="ij")
    centres = torch.stack((a.flatten(), b.flatten()), dim=1)  # (C, 2)
    offsets = torch.linspace(-grid / 2, grid / 2, 7, dtype=torch.float64)
    da, db = torch.meshgrid(offsets, offsets, indexing="ij")
    points = centres[:, None] + torch.stack((da.flatten(), db.flatten()), dim=1)  # (C, 49, 2)
    levels = torch.arange(1.0, 100.0, dtype=torch.float64).view(-1, 1, 1, 1).expand(-1, *points.shape[:2], 1)
    lab = torch.cat((levels, points.expand(len(levels), -1, -1, -1)), dim=-1)  # (99, C, 49, 3)
    linear = _lab_to_linear(lab.movedim(-1, -3))  # (99, 3, C, 49)
    inside = ((linear >= 0) & (linear <= 1)).all(dim=1).any(dim=0).any(dim=-1)
    return centres[inside].float()
