"""The contract every colouriser meets: Lab lightness in, ab chroma out, in Lab units.

The networks in :mod:`colorize.models` speak their own native units (normalised L for the
U-Net, grey sRGB for the seed autoencoder); this module adapts both to one interface for
training, evaluation and the bulk job, and reads and writes weight files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import pickle
import re
import zipfile
from importlib import resources
from pathlib import Path

import pyarrow.fs as pafs
import torch
import torch.nn.functional as F
from torch import nn

from colorize import color, errors, quantize, storage
from colorize.models import ModelConfig, build_model, check_temperature
from colorize.options import LOSSES, REGRESSION_LOSSES

# The psnr loss's floor on each image's MSE (50 dB): it bounds how much one near-perfect image
# can weigh in a batch (the gradient of log(mse) grows as 1/mse).
PSNR_LOSS_FLOOR = 1e-5
BUNDLED_WEIGHTS = "unet-photos-cifar64-semantic.pt"


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside a DistributedDataParallel wrapper (or the model itself)."""
    return getattr(model, "module", model)


def device_of(model: nn.Module) -> torch.device:
    """Where ``model``'s parameters live (the CPU for a model without any)."""
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def predict_ab(
    model: nn.Module, L: torch.Tensor, *, temperature: float | None = None, flip: bool = False
) -> torch.Tensor:
    """(B, 1, H, W) L in [0, 100] -> (B, 2, H, W) ab in Lab units.

    A classification head is decoded by the annealed mean at ``temperature``, by default the
    one in the model's config. With ``flip``, the ab predicted for each image and for its mirror
    image (mirrored back) are averaged: one model call on twice the batch, for a little more
    fidelity and a little less colour (docs/colour.md, rounds 7 and 8). The result is scaled by
    the config's ``saturation``.
    """
    config = unwrap(model).config
    views = torch.cat((L, L.flip(-1))) if flip else L
    if config.arch == "autoencoder":
        ab = color.rgb_to_lab(model(color.gray_rgb_from_l(views)).float())[:, 1:]
    else:
        ab = decode(model, model(color.normalize_l(views)), temperature=temperature)
    if flip:
        plain, mirrored = ab.chunk(2)
        ab = (plain + mirrored.flip(-1)) / 2
    return ab if config.saturation == 1 else ab * config.saturation


def decode(model: nn.Module, out: torch.Tensor, *, temperature: float | None = None) -> torch.Tensor:
    """A U-Net's raw output (normalised ab, or logits over ab cells) -> ab in Lab units."""
    bare = unwrap(model)
    if bare.config.head == "classification":
        temperature = bare.config.temperature if temperature is None else temperature
        check_temperature(temperature)
        return quantize.annealed_mean(out, bare.ab_bins, temperature)
    return color.denormalize_ab(out.float())


def predict_rgb(
    model: nn.Module, L: torch.Tensor, gray: torch.Tensor | None = None, *, flip: bool = False
) -> torch.Tensor:
    """(B, 1, H, W) L -> (B, 3, H, W) sRGB in [0, 1].

    The U-Net's chroma is merged with the input's own lightness. The seed autoencoder's RGB
    comes back as it is, as the seed evaluated it; it sees ``gray`` (the 601 luma of the
    original, in [0, 1]) when known, else the neutral grey of lightness L. ``flip`` averages
    the prediction with its mirror image's, as in :func:`predict_ab`; the config's
    ``saturation`` scales the chroma (the autoencoder's too, keeping its own lightness).
    """
    bare = unwrap(model)
    if bare.config.arch == "autoencoder":
        x = color.gray_rgb_from_l(L) if gray is None else gray
        rgb = model(x).float()
        if flip:
            rgb = (rgb + model(x.flip(-1)).float().flip(-1)) / 2
        if bare.config.saturation != 1:
            lab = color.rgb_to_lab(rgb.clamp(0.0, 1.0))
            lab = torch.cat((lab[:, :1], lab[:, 1:] * bare.config.saturation), dim=1)
            return color.lab_to_rgb(lab)
        return rgb.clamp(0.0, 1.0)
    return color.lab_to_rgb(torch.cat((L, predict_ab(model, L, flip=flip)), dim=1))


def loss(
    model: nn.Module, L: torch.Tensor, ab: torch.Tensor, kind: str = "mse", *, class_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Training loss for one batch.

    The U-Net's regression head regresses normalised ab (``mse``, ``l1``, ``huber``) or takes
    ``psnr``, minus the mean per-image sRGB PSNR in dB (:func:`psnr_loss`); its
    classification head takes ``ce``, cross-entropy against soft-encoded ab cells weighted by
    ``class_weights`` (see :mod:`colorize.quantize`). The seed autoencoder maps the 601 luma
    of the original to its RGB under MSE (its original objective), whatever ``kind`` says.
    """
    bare = unwrap(model)
    if bare.config.arch == "autoencoder":
        target = color.lab_to_rgb(torch.cat((L, ab), dim=1), keep_lightness=False)
        return F.mse_loss(model(color.luma(target)).float(), target)
    return output_loss(model, model(color.normalize_l(L)), L, ab, kind, class_weights=class_weights)


def output_loss(
    model: nn.Module,
    out: torch.Tensor,
    L: torch.Tensor,
    ab: torch.Tensor,
    kind: str = "mse",
    *,
    class_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`loss` for a U-Net output already computed (one forward pass serves two terms)."""
    bare = unwrap(model)
    if kind not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {kind!r}")
    if (kind == "ce") != (bare.config.head == "classification"):
        raise ValueError(f"loss {kind!r} does not fit the {bare.config.head} head (ce is for classification)")
    if kind == "ce":
        return quantize.classification_loss(out, ab, bare.ab_bins, class_weights)
    pred, target = out.float(), color.normalize_ab(ab)
    if kind == "mse":
        return F.mse_loss(pred, target)
    if kind == "l1":
        return F.l1_loss(pred, target)
    if kind == "psnr":
        return psnr_loss(L, color.denormalize_ab(pred), ab)
    return F.smooth_l1_loss(pred, target, beta=0.1)


def psnr_loss(L: torch.Tensor, pred_ab: torch.Tensor, ab: torch.Tensor) -> torch.Tensor:
    """Minus the mean per-image PSNR (dB) of the sRGB images that ``pred_ab`` and ``ab`` make
    with lightness ``L``: the figure evaluation reports, as a loss. Near it, not equal: here
    out-of-gamut colours are clipped and nothing is rounded to 8 bits (evaluation desaturates
    them and scores uint8): 0.02 dB apart for the bundled model's colours on a small test set,
    0.27 dB at --saturation 3 (a reviewer's measurement, session 43).

    Plain regression minimises the error summed over all pixels of a batch, so it may trade a
    slight tint on a nearly grey image (many dB of that image's PSNR) for a little less error
    on a colourful one (a fraction of a dB); the mean PSNR weighs each image's error by
    1/its MSE instead, and so asks for colour only where it is likely right.
    """
    # In float32 even under bf16 autocast: the colour matrices and a 1e-5 floor need the precision.
    with torch.autocast(device_type=L.device.type, enabled=False):
        pred, truth = _srgb_pair(L, pred_ab, ab)
        mse = (pred - truth).pow(2).mean(dim=(1, 2, 3))
        return 10.0 * torch.log10(mse + PSNR_LOSS_FLOOR).mean()


def _srgb_pair(L: torch.Tensor, pred_ab: torch.Tensor, ab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 sRGB (B, 3, H, W) of lightness ``L`` with the predicted and with the true ab."""
    L, pred_ab, ab = L.float(), pred_ab.float(), ab.float()
    return (
        color.lab_to_rgb(torch.cat((L, pred_ab), dim=1), keep_lightness=False),
        color.lab_to_rgb(torch.cat((L, ab), dim=1), keep_lightness=False),
    )


def colourfulness(rgb: torch.Tensor) -> torch.Tensor:
    """Differentiable Hasler-Suesstrunk colourfulness of sRGB (B, 3, H, W) in [0, 1]: (B,),
    on the 0..255 scale and in the absolute form of :func:`colorize.metrics.colourfulness`."""
    x = rgb.float() * 255.0
    rg = (x[:, 0] - x[:, 1]).abs()
    yb = (0.5 * (x[:, 0] + x[:, 1]) - x[:, 2]).abs()
    dims = (1, 2)
    # The small constants keep the square roots' gradients finite on a grey image.
    std = (rg.var(dim=dims, unbiased=False) + yb.var(dim=dims, unbiased=False) + 1e-6).sqrt()
    mean = (rg.mean(dim=dims).square() + yb.mean(dim=dims).square() + 1e-6).sqrt()
    return std + 0.3 * mean


def colourfulness_gap(L: torch.Tensor, pred_ab: torch.Tensor, ab: torch.Tensor) -> torch.Tensor:
    """The mean over a batch of each image's |colourfulness of the prediction - of the truth|.

    A term beside a regression loss (``colourfulness_weight`` in training): the conditional
    mean that regression learns is desaturated wherever colour is uncertain, and this asks
    every image for its own amount of colour, not more (DDColor's colourfulness loss, in a
    matching form so that grey images stay grey).
    """
    with torch.autocast(device_type=L.device.type, enabled=False):
        pred, truth = _srgb_pair(L, pred_ab, ab)
        return (colourfulness(pred) - colourfulness(truth)).abs().mean()


def weights_bytes(model: nn.Module) -> bytes:
    """Serialise config and parameters as a weights-only torch file."""
    bare = unwrap(model)
    buffer = io.BytesIO()
    # Plain strides: the same bytes (and weights id) whether the model trained channels-last or not
    # (contiguous() would keep a channels-last stride where a dimension has size 1).
    state = {k: v.detach().cpu().clone(memory_format=torch.contiguous_format) for k, v in bare.state_dict().items()}
    torch.save({"config": bare.config.to_dict(), "state_dict": state}, buffer)
    return buffer.getvalue()


class UnfitWeights(ValueError):
    """A colorize weights file whose tensors its model cannot take: shapes unlike its config's, NaN."""


def model_from_bytes(data: bytes) -> nn.Module:
    """Rebuild a model from :func:`weights_bytes` output. Never unpickles arbitrary objects."""
    payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    try:
        config = ModelConfig.from_dict(payload["config"])
    except ValueError as error:  # a config no model can be built from: a field of the wrong type, depth 0
        raise UnfitWeights(f"its config: {error}") from None
    state = payload["state_dict"]
    # Shapes are checked on a skeleton first: a config its tensors do not match (width 4096)
    # would otherwise allocate a model of any size before load_state_dict compared them.
    with torch.device("meta"):
        expected = {k: v.shape for k, v in build_model(config).state_dict().items()}
    found = {k: v.shape for k, v in state.items()}
    if found != expected:
        key = sorted(expected.keys() ^ found.keys()) or [k for k in expected if expected[k] != found[k]]
        shape = ", ".join(f"{name}={getattr(config, name)}" for name in ("arch", "width", "depth", "head", "attention", "classes"))
        raise UnfitWeights(f"its tensors do not fit its config (first at {key[0]!r}; {shape})")
    bad = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise UnfitWeights(f"its tensor {bad!r} holds NaN or infinite values")
    model = build_model(config)
    model.load_state_dict(state)
    return model.eval()


def bundled_weights_path() -> Path:
    return Path(str(resources.files("colorize") / "weights" / BUNDLED_WEIGHTS))


def weights_id(data: bytes) -> str:
    """A short content hash that names a weights file in outputs."""
    return "sha256:" + hashlib.sha256(data).hexdigest()[:16]


BUNDLED = "bundled"  # what --weights, --init and --compare take for the bundled model


def weights_label(uri: str | None) -> str:
    """How a report names the weights it used: ``uri``, or ``bundled:FILE`` for the bundled ones."""
    return f"{BUNDLED}:{BUNDLED_WEIGHTS}" if uri in (None, BUNDLED) else uri


def read_weights(uri: str | None, settings: storage.S3Settings | None = None) -> bytes:
    """The bytes of a weights file (local or ``s3://``), or of the bundled default for None or
    :data:`BUNDLED`."""
    if uri is None or uri == BUNDLED:
        path = bundled_weights_path()
        if not path.exists():
            raise storage.StorageError(f"{path}: the bundled weights are missing; reinstall colorize or pass --weights")
        return path.read_bytes()
    fs, path = storage.resolve(uri, settings)
    if storage.stat(fs, path, uri, missing="no such weights file").type == pafs.FileType.Directory:
        inside = storage.join(path, "model.pt")
        hint = f"pass {storage.to_uri(fs, inside)}" if storage.exists(fs, inside) else "pass a .pt file (train writes OUT/model.pt)"
        raise storage.StorageError(f"{uri}: a folder, not a weights file; {hint}")
    return storage.read_bytes(fs, path)


def set_decoding(model: nn.Module, *, temperature: float | None = None, saturation: float | None = None) -> nn.Module:
    """Make ``model`` decode with ``temperature`` and scale its chroma by ``saturation`` (None
    keeps the model's own), in place, and return it; the weights file written from it then
    carries both. Values out of range raise ValueError, from the config."""
    given = {k: v for k, v in (("temperature", temperature), ("saturation", saturation)) if v is not None}
    if given:
        model.config = dataclasses.replace(model.config, **given)
    return model


def damaged_part(raw: bytes) -> str | None:
    """The first part of torch zip ``raw`` whose checksum fails, or None: torch never checks
    them, so a file with flipped bits loaded, and coloured with wrong weights. A file saved
    without checksums (all 0) has none to check."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(raw))
        if not any(part.CRC for part in archive.infolist()):  # saved with torch.serialization.set_crc32_options(False)
            return None
        return archive.testzip()
    except (zipfile.BadZipFile, EOFError, OSError) as error:
        return f"the zip directory ({error})"


def _why_not_loaded(error: Exception) -> str:
    """torch's reason for refusing a weights file, in one line. Its messages run over many
    lines; the weights-only unpickler's opens with advice to load with weights_only=False (which
    this project never does), in terminal bold, and gives the cause after "WeightsUnpickler
    error:", of which the first sentence says enough."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    _, marker, cause = text.partition("WeightsUnpickler error:")
    if marker:
        text = re.split(r"(?<=\.)\s", cause.strip(), maxsplit=1)[0]
    elif text.startswith("Weights only load failed"):  # a global from a blocked module (os.system): the cause follows the advice
        paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
        text = paragraphs[1] if len(paragraphs) > 1 else text
    return errors.clipped(f"{type(error).__name__}: {errors.first_line(text)}", 160)


def load_weights(
    uri: str | None,
    settings: storage.S3Settings | None = None,
    *,
    temperature: float | None = None,
    saturation: float | None = None,
) -> tuple[nn.Module, str]:
    """A model in eval mode and its weights id, from a file (local or ``s3://``) or the bundled
    default; ``temperature`` overrides a classification head's decoding temperature, and
    ``saturation`` the factor on its predicted chroma."""
    raw = read_weights(uri, settings)
    name = uri if uri not in (None, BUNDLED) else bundled_weights_path()
    if not zipfile.is_zipfile(io.BytesIO(raw)):  # what torch.save writes; torch's own error says less
        raise ValueError(f"{name}: not a colorize weights file: not a torch zip file "
                         f"({len(raw):,} bytes; truncated, corrupt or another format?)")
    damaged = damaged_part(raw)
    if damaged is not None:
        raise ValueError(f"{name}: a damaged weights file: the checksum of its part {damaged!r} "
                         "does not match (copy it again)")
    try:
        model = model_from_bytes(raw)
    except UnfitWeights as error:
        raise ValueError(f"{name}: a colorize weights file that cannot be used: {error}") from None
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError, EOFError,
            pickle.UnpicklingError) as error:
        reason = _why_not_loaded(error)
        raise ValueError(
            f"{name}: not a colorize weights file, expected a weights-only torch file "
            f"with 'config' and 'state_dict' ({reason})"
        ) from None
    if temperature is not None and model.config.head != "classification":  # else it would change nothing, silently
        raise ValueError(f"{name}: a decoding temperature is for a classification head; "
                         f"this model's head is {model.config.head}")
    return set_decoding(model, temperature=temperature, saturation=saturation), weights_id(raw)
