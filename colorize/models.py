"""Colouriser networks. Plain torch: no Ray, no file system, no argparse.

Two architectures, each described by a frozen :class:`ModelConfig` that travels in every
checkpoint:

- ``autoencoder``: the seed notebook's convolutional autoencoder. Grey sRGB in, RGB out,
  trained with MSE on RGB. Kept as the reference baseline.
- ``unet``: a U-Net in Lab. Normalised L in; out either normalised ab (the ``regression``
  head) or logits over quantised ab cells (the ``classification`` head, decoded by the
  annealed mean in :mod:`colorize.colorizer`); optionally self-attention at the bottleneck.

:class:`PatchDiscriminator` is the pix2pix critic for the adversarial term.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from colorize import color

ARCHITECTURES = ("unet", "autoencoder")
HEADS = ("regression", "classification")


@dataclass(frozen=True)
class ModelConfig:
    """What a colouriser is; stored in every checkpoint so loading needs nothing else.

    Args:
        arch: ``"unet"`` or ``"autoencoder"``.
        width: channels of the first stage; each stage below doubles it.
        depth: number of 2x downsampling stages (image_size must divide by 2**depth).
        image_size: the square working resolution the model was trained at, in pixels.
        head: ``"regression"`` (2 channels of ab) or ``"classification"`` (logits over the
            gamut's ab cells); U-Net only.
        attention: a self-attention block at the U-Net's bottleneck.
        temperature: the annealed-mean temperature a classification head decodes with by
            default (1 is the mean of the distribution; towards 0, its mode).
    """

    arch: str = "unet"
    width: int = 32
    depth: int = 3
    image_size: int = 32
    head: str = "regression"
    attention: bool = False
    temperature: float = 0.38

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"model arch must be one of {ARCHITECTURES}, got {self.arch!r}")
        if self.width < 1 or self.depth < 1:
            raise ValueError(f"width and depth must be positive, got {self.width}, {self.depth}")
        if self.image_size % (2**self.depth):
            raise ValueError(
                f"image_size {self.image_size} must be divisible by 2**depth = {2**self.depth}"
            )
        if self.head not in HEADS:
            raise ValueError(f"model head must be one of {HEADS}, got {self.head!r}")
        if self.arch == "autoencoder" and (self.head != "regression" or self.attention):
            raise ValueError("the seed autoencoder has no classification head and no attention")
        if not 0 < self.temperature <= 1:
            raise ValueError(f"temperature must be in (0, 1], got {self.temperature}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**data)


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


@functools.lru_cache(maxsize=1)
def ab_bins() -> torch.Tensor:
    """The classification head's classes: centres (Q, 2) of the gamut's ab cells, Lab units."""
    return color.ab_gamut_bins()


class SelfAttention(nn.Module):
    """Multi-head self-attention over all positions of a feature map, with a residual."""

    def __init__(self, *, channels: int, heads: int = 4) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(min(32, channels // 4), channels)
        self.attention = nn.MultiheadAttention(channels, heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        mixed, _ = self.attention(tokens, tokens, tokens, need_weights=False)
        return x + mixed.transpose(1, 2).reshape(b, c, h, w)


class UNet(nn.Module):
    """U-Net colouriser in Lab: (B, 1, H, W) normalised L -> (B, 2, H, W) normalised ab,
    or (B, Q, H, W) logits over :func:`ab_bins` with the classification head.

    H and W must be divisible by ``2**config.depth``.
    """

    def __init__(self, *, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        widths = [config.width * 2**i for i in range(config.depth + 1)]
        self.down = nn.ModuleList()
        c_in = 1
        for w in widths[:-1]:
            self.down.append(_conv_block(c_in, w))
            c_in = w
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = _conv_block(widths[-2], widths[-1])
        self.attention = SelfAttention(channels=widths[-1]) if config.attention else nn.Identity()
        self.up = nn.ModuleList()
        self.merge = nn.ModuleList()
        for w_low, w in zip(widths[:0:-1], widths[-2::-1]):
            self.up.append(nn.ConvTranspose2d(w_low, w, 2, stride=2))
            self.merge.append(_conv_block(2 * w, w))
        if config.head == "classification":
            self.register_buffer("ab_bins", ab_bins().clone())
            self.head = nn.Conv2d(widths[0], len(self.ab_bins), 1)
        else:
            self.head = nn.Conv2d(widths[0], 2, 1)

    def encode(self, l_norm: torch.Tensor) -> list[torch.Tensor]:
        """The encoder's feature maps, finest first, the bottleneck last."""
        features = []
        x = l_norm
        for block in self.down:
            x = block(x)
            features.append(x)
            x = self.pool(x)
        features.append(self.attention(self.bottleneck(x)))
        return features

    def forward(self, l_norm: torch.Tensor) -> torch.Tensor:
        *skips, x = self.encode(l_norm)
        for up, merge, skip in zip(self.up, self.merge, reversed(skips)):
            x = merge(torch.cat((up(x), skip), dim=1))
        return self.head(x)


class ConvAutoencoder(nn.Module):
    """The seed's autoencoder: (B, 1, H, W) grey sRGB in [0, 1] -> (B, 3, H, W) sRGB in [0, 1]."""

    def __init__(self, *, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        widths = [config.width * 2**i for i in range(config.depth)]
        layers: list[nn.Module] = []
        c_in = 1
        for w in widths:
            layers += [nn.Conv2d(c_in, w, 3, stride=2, padding=1), nn.ReLU(inplace=True)]
            c_in = w
        self.encoder = nn.Sequential(*layers)
        layers = []
        for w in reversed([3, *widths[:-1]]):
            layers += [nn.ConvTranspose2d(c_in, w, 4, stride=2, padding=1), nn.ReLU(inplace=True)]
            c_in = w
        layers[-1] = nn.Sigmoid()
        self.decoder = nn.Sequential(*layers)

    def forward(self, gray: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(gray))


class PatchDiscriminator(nn.Module):
    """pix2pix's PatchGAN critic: (B, 3, H, W) normalised L and ab -> (B, 1, h, w) logits,
    one per overlapping patch (receptive field 34 px with the default ``layers=2``).

    Instance norm rather than batch norm, so that real and generated images can share one
    forward pass (one DDP synchronisation) without mixing their statistics.

    Args:
        width: channels of the first layer; each stride-2 layer doubles them.
        layers: stride-2 layers; the patch grows with each.
    """

    def __init__(self, *, width: int = 32, layers: int = 2) -> None:
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(3, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True)]
        c = width
        for i in range(1, layers + 1):
            stride = 2 if i < layers else 1
            blocks += [
                nn.Conv2d(c, 2 * c, 4, stride=stride, padding=1, bias=False),
                nn.InstanceNorm2d(2 * c, affine=True),
                nn.LeakyReLU(0.2, inplace=True),
            ]
            c *= 2
        blocks.append(nn.Conv2d(c, 1, 4, padding=1))
        self.net = nn.Sequential(*blocks)

    def forward(self, lab_norm: torch.Tensor) -> torch.Tensor:
        return self.net(lab_norm)


def build_model(config: ModelConfig) -> nn.Module:
    """A freshly initialised colouriser for ``config``."""
    if config.arch == "unet":
        return UNet(config=config)
    return ConvAutoencoder(config=config)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
