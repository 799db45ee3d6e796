"""Colouriser networks. Plain torch: no Ray, no file system, no argparse.

Two architectures, each described by a frozen :class:`ModelConfig` that travels in every
checkpoint:

- ``autoencoder``: the seed notebook's convolutional autoencoder. Grey sRGB in, RGB out,
  trained with MSE on RGB. Kept as the reference baseline.
- ``unet``: a U-Net in Lab. Normalised L in, normalised ab out (see :mod:`colorize.color`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

ARCHITECTURES = ("unet", "autoencoder")


@dataclass(frozen=True)
class ModelConfig:
    """What a colouriser is; stored in every checkpoint so loading needs nothing else.

    Args:
        arch: ``"unet"`` or ``"autoencoder"``.
        width: channels of the first stage; each stage below doubles it.
        depth: number of 2x downsampling stages (image_size must divide by 2**depth).
        image_size: the square working resolution the model was trained at, in pixels.
    """

    arch: str = "unet"
    width: int = 32
    depth: int = 3
    image_size: int = 32

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"model arch must be one of {ARCHITECTURES}, got {self.arch!r}")
        if self.width < 1 or self.depth < 1:
            raise ValueError(f"width and depth must be positive, got {self.width}, {self.depth}")
        if self.image_size % (2**self.depth):
            raise ValueError(
                f"image_size {self.image_size} must be divisible by 2**depth = {2**self.depth}"
            )

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


class UNet(nn.Module):
    """U-Net colouriser in Lab: (B, 1, H, W) normalised L -> (B, 2, H, W) normalised ab.

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
        self.up = nn.ModuleList()
        self.merge = nn.ModuleList()
        for w_low, w in zip(widths[:0:-1], widths[-2::-1]):
            self.up.append(nn.ConvTranspose2d(w_low, w, 2, stride=2))
            self.merge.append(_conv_block(2 * w, w))
        self.head = nn.Conv2d(widths[0], 2, 1)

    def forward(self, l_norm: torch.Tensor) -> torch.Tensor:
        skips = []
        x = l_norm
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
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


def build_model(config: ModelConfig) -> nn.Module:
    """A freshly initialised colouriser for ``config``."""
    if config.arch == "unet":
        return UNet(config=config)
    return ConvAutoencoder(config=config)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
