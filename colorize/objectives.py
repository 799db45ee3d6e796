"""One optimisation step, in plain torch: the reconstruction loss and the optional GAN term.

:func:`train_step` is all the learning there is; :mod:`colorize.train` wraps it in Ray
Train, the ablation study (:mod:`colorize.ablation`) calls it in a plain loop, and neither
changes what a step does. No Ray here, so the same step runs on a GPU machine without Ray.

The adversarial term is pix2pix's: a :class:`~colorize.models.PatchDiscriminator` judges
(L, ab) patches, the colouriser is pushed to make its ab indistinguishable from real ones
on top of its reconstruction loss, and the discriminator learns in the same step with its
own optimiser. Both may be DDP-wrapped.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from colorize import color, colorizer
from colorize.options import PRECISIONS



@dataclass
class Adversary:
    """A discriminator, its optimiser, and the weight of its verdict in the colouriser's loss."""

    discriminator: nn.Module
    optimizer: torch.optim.Optimizer
    weight: float

    @classmethod
    def training(cls, discriminator: nn.Module, lr: float, weight: float) -> Adversary:
        """``discriminator`` with pix2pix's optimiser: Adam, its first beta lowered to 0.5."""
        return cls(discriminator, torch.optim.Adam(discriminator.parameters(), lr=lr, betas=(0.5, 0.999)), weight)


def set_lr(lr: float, optimizer: torch.optim.Optimizer, adversary: Adversary | None = None) -> None:
    """Set the learning rate of the colouriser's optimiser and of its adversary's, if any."""
    for group in [*optimizer.param_groups, *(adversary.optimizer.param_groups if adversary else [])]:
        group["lr"] = lr


def _critic_input(L: torch.Tensor, ab: torch.Tensor) -> torch.Tensor:
    return torch.cat((color.normalize_l(L), color.normalize_ab(ab)), dim=1)


@functools.cache
def fast_bf16(device_type: str) -> bool:
    """Whether bf16 autocast speeds training up on this kind of device: on GPUs with bf16 units
    (NVIDIA's since Ampere; older ones emulate it), and on CPUs with AVX-512 BF16 or AMX
    instructions (oneDNN emulates bf16 on others, slower than float32). Measured by
    ``benchmarks/bench_cpu_precision.py``."""
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device_type != "cpu":
        return False
    probes = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return any(probe() for probe in probes if probe is not None)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``"float32"`` or ``"bf16"``: what ``precision`` (one of :data:`PRECISIONS`) means on ``device``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "bf16" if fast_bf16(device.type) else "float32"
    return precision


def train_step(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    *,
    loss: str = "mse",
    class_weights: torch.Tensor | None = None,
    adversary: Adversary | None = None,
    colourfulness_weight: float = 0.0,
    psnr_weight: float = 0.0,
    precision: str = "auto",
) -> torch.Tensor:
    """One step on a batch of ``L`` (B,1,H,W) and ``ab`` (B,2,H,W) in Lab units, and ``label``
    (B,) int64 image classes for a model with a semantic branch (``ModelConfig.classes``).

    With an ``adversary``, the colouriser's loss gains ``weight`` times the non-saturating
    GAN loss of its predicted ab, then the discriminator takes one step on real against
    predicted ab. ``colourfulness_weight`` adds that times each image's colourfulness gap to
    its truth (:func:`colorize.colorizer.colourfulness_gap`, in 0..255 units), and
    ``psnr_weight`` that times minus the mean per-image PSNR of the decoded ab
    (:func:`colorize.colorizer.psnr_loss`, in dB): beside the classification head's
    cross-entropy, it asks the annealed mean the model decodes with to be faithful too. A ``label``
    adds the semantic branch's cross-entropy, with weight 1 (measured in docs/colour.md).

    ``precision="bf16"`` runs the networks under bf16 autocast (weights, gradients, the
    optimiser and the colour losses stay float32); ``"auto"`` does so on GPUs and CPUs
    that have bf16 units (Ampere GPUs on; CPUs with AVX-512 BF16 or AMX: :func:`fast_bf16`). Returns the colouriser's loss, detached
    and on the batch's device: reading it (``float(...)``) waits for the GPU, so callers that
    do not log every step can let the host run ahead.
    """
    model.train()
    L, ab = batch["L"], batch["ab"]
    device = L.device
    bf16 = resolve_precision(precision, device) == "bf16"
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)
    labels = batch.get("label")
    with autocast:
        if adversary is None and not colourfulness_weight and not psnr_weight and labels is None:
            value = colorizer.loss(model, L, ab, loss, class_weights=class_weights)
        else:
            # One forward pass feeds every term: DDP allows one forward per backward.
            if labels is None:
                out = model(color.normalize_l(L))
            else:
                out, logits = model(color.normalize_l(L), with_logits=True)
            value = colorizer.output_loss(model, out, L, ab, loss, class_weights=class_weights)
            if labels is not None:
                value = value + F.cross_entropy(logits.float(), labels)
            if colourfulness_weight or psnr_weight or adversary is not None:
                fake_ab = colorizer.decode(model, out)
            if psnr_weight:
                value = value + psnr_weight * colorizer.psnr_loss(L, fake_ab, ab)
            if colourfulness_weight:
                value = value + colourfulness_weight * colorizer.colourfulness_gap(L, fake_ab, ab)
            if adversary is not None:
                # The bare critic: its DDP wrapper would all-reduce gradients that are thrown away.
                verdict = colorizer.unwrap(adversary.discriminator)(_critic_input(L, fake_ab)).float()
                value = value + adversary.weight * F.binary_cross_entropy_with_logits(verdict, torch.ones_like(verdict))
    optimizer.zero_grad(set_to_none=True)
    value.backward()
    optimizer.step()
    if adversary is not None:
        _critic_step(adversary, L, ab, fake_ab.detach(), autocast)
    return value.detach()


def _critic_step(adversary: Adversary, L: torch.Tensor, real_ab: torch.Tensor, fake_ab: torch.Tensor, autocast) -> None:  # noqa: ANN001
    """Real and predicted ab in one forward pass (one DDP synchronisation), labelled 1 and 0."""
    adversary.discriminator.train()
    with autocast:
        logits = adversary.discriminator(_critic_input(torch.cat((L, L)), torch.cat((real_ab, fake_ab)))).float()
    labels = torch.cat((torch.ones_like(logits[: len(L)]), torch.zeros_like(logits[len(L) :])))
    adversary.optimizer.zero_grad(set_to_none=True)
    F.binary_cross_entropy_with_logits(logits, labels).backward()
    adversary.optimizer.step()


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Re-estimate every BatchNorm's running mean and variance from ``batches`` of L (Lab
    units) with the weights as they are now (PreciseBN: Wu & Johnson, "Rethinking 'Batch' in
    BatchNorm", 2021), but those of a frozen pretrained encoder. Returns the number of batches
    used; with none, nothing changes.

    The running averages that BatchNorm keeps while training trail the weights: after a dozen
    steps they are still mostly their initial values (a variance of 1 decays as 0.9**steps), and
    an evaluated model that saw few steps can differ wholly from the one that trained; a
    semantic branch trained to 100% on 16 px images under DDP scored 50-89% in eval mode, and
    100% once recalibrated. Pass the bare module (not a DDP wrapper): the forwards here are
    local and join no collectives.
    """
    batches = list(batches)
    was_training = model.training
    model.train()
    # A frozen pretrained encoder stays in eval mode under train(): its statistics are its own.
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    if not batches or not norms:
        model.train(was_training)
        return 0
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches below, each weighted equally
    try:
        for L in batches:
            model(color.normalize_l(L))
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)
    return len(batches)


def cosine_lr(base: float, progress: float, total: float) -> float:
    """Learning rate at ``progress`` of ``total`` (epochs or steps) on a cosine schedule from
    ``base`` at 0 to 5% of it at ``total`` (training's last epoch, ``total - 1``, is just above)."""
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress / total)))
