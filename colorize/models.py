"""Colouriser networks. Plain torch: no Ray, no file system, no argparse.

Two architectures, each described by a frozen :class:`ModelConfig` that travels in every
checkpoint:

- ``autoencoder``: the seed notebook's convolutional autoencoder. Grey sRGB in, RGB out,
  trained with MSE on RGB. Kept as the reference baseline.
- ``unet``: a U-Net in Lab. Normalised L in; out either normalised ab (the ``regression``
  head) or logits over quantised ab cells (the ``classification`` head, decoded by the
  annealed mean in :mod:`colorize.colorizer`); optionally self-attention at the bottleneck,
  and optionally a semantic branch (:class:`SemanticEncoder`): a small classifier of the
  whole image, trained on image labels, whose features are fused into the bottleneck; and
  optionally a frozen pretrained encoder (:class:`PretrainedFeatures`) whose feature map is
  fused there too.

:class:`PatchDiscriminator` is the pix2pix critic for the adversarial term.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from colorize import backbones, color
from colorize.options import ARCHITECTURES, HEADS, MAX_SATURATION

# The largest square a model is trained at (train, ablation, photo_model): a batch of 64 at
# 100,000 px asked a read task for 168 GiB. Not checked on loading: weights trained larger load.
MAX_IMAGE_SIZE = 1024
ATTENTION_HEADS = 4  # heads of the bottleneck's self-attention (ModelConfig.attention)
# The semantic branch sees L pooled down to at most this side: what class an image is needs no
# more (CIFAR-10's own size), and its cost then stays flat at any working resolution.
SEMANTIC_SIZE = 32
# The smallest input the semantic branch trains on: its last stage is then 2x2, where BatchNorm
# still has more than one value per channel in a batch of one image.
SEMANTIC_MIN_SIZE = 16
# The smallest input the PatchGAN critic (PatchDiscriminator) takes: its instance norm then
# normalises a 2x2 map; at 8 px that map is 1x1 and every training step raised.
GAN_MIN_SIZE = 12
# The U-Net's parameters that only the semantic branch has: a model without the branch
# fine-tunes into one with it by loading every other weight (models.load_backbone).
SEMANTIC_MODULES = ("semantic", "classify", "fuse")
# Frozen pretrained encoders (ModelConfig.pretrained), each with how many of its blocks the
# U-Net uses (11: blocks 0-10). MobileNetV2's blocks 0-10 are the ones nsfwjs kept
# frozen at their ImageNet weights (its blocks 11-16 were fine-tuned to its own task).
PRETRAINED = {"mobilenet_v2": 11}
# The modules a U-Net gains with a pretrained encoder: its weights load apart (load_backbone).
PRETRAINED_MODULES = ("pretrained", "pretrained_fuse")
# The colour head and, for classification, its fixed ab cell centres (a buffer built with the model).
COLOUR_HEAD = ("head", "ab_bins")


_FIELD_TYPES = {"int": int, "float": (int, float), "bool": bool, "str": str}


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
        saturation: the factor the predicted chroma (ab) is multiplied by at inference, for
            either head: 1 as trained, above 1 more vivid and less faithful, 0 grey. Training
            losses never see it.
        classes: with a positive number, the U-Net gains a semantic branch that classifies
            the whole image into this many classes (trained on image labels beside the
            colour loss) and feeds its features to the bottleneck; 0, none.
        pretrained: the name of a frozen pretrained encoder (a key of :data:`PRETRAINED`)
            whose feature map, at the bottleneck's resolution, is added to the bottleneck;
            ``""``, none. Its weights travel in the checkpoint like any other.
    """

    arch: str = "unet"
    width: int = 32
    depth: int = 3
    image_size: int = 32
    head: str = "regression"
    attention: bool = False
    temperature: float = 0.38
    saturation: float = 1.0
    classes: int = 0
    pretrained: str = ""

    def __post_init__(self) -> None:
        for field in fields(self):  # a weights file's config is JSON-like data, perhaps hand-made
            value, kind = getattr(self, field.name), _FIELD_TYPES[field.type]
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise ValueError(f"model {field.name} must be {field.type}, got {value!r}")
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"model arch must be one of {ARCHITECTURES}, got {self.arch!r}")
        for name in ("width", "depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"model {name} must be at least 1, got {getattr(self, name)}")
        if self.image_size < 2**self.depth or self.image_size % (2**self.depth):
            raise ValueError(
                f"image_size {self.image_size} must be a positive multiple of 2**depth = {2**self.depth}"
            )
        if self.head not in HEADS:
            raise ValueError(f"model head must be one of {HEADS}, got {self.head!r}")
        if self.arch == "autoencoder" and (self.head != "regression" or self.attention):
            raise ValueError("the seed autoencoder has no classification head and no attention")
        if self.attention and not SelfAttention.fits(self.width * 2**self.depth):
            raise ValueError(f"attention works on the bottleneck's width * 2**depth channels, which must be a multiple of "
                             f"{ATTENTION_HEADS} and of its norm's groups; {self.width} * 2**{self.depth} is not")
        if self.classes < 0 or self.classes == 1:
            raise ValueError(f"classes must be 0 (no semantic branch) or at least 2, got {self.classes}")
        if self.arch == "autoencoder" and self.classes:
            raise ValueError("the seed autoencoder has no semantic branch")
        if self.pretrained and (self.arch != "unet" or self.pretrained not in PRETRAINED):
            raise ValueError(f"pretrained must be one of {sorted(PRETRAINED)} on a U-Net, got {self.pretrained!r}")
        check_temperature(self.temperature)
        if not 0 <= self.saturation <= MAX_SATURATION:  # also refuses NaN
            raise ValueError(f"saturation must be in [0, {MAX_SATURATION:g}], got {self.saturation}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**data)


def check_temperature(temperature: float) -> None:
    """Refuse an annealed-mean temperature outside (0, 1] (NaN too) with a ValueError."""
    if not 0 < temperature <= 1:
        raise ValueError(f"temperature must be in (0, 1], got {temperature}")


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
    """The classification head's classes: centres (Q, 2) of the gamut's ab cells, Lab units;
    on the CPU, even when first asked for under another default device (a model built on
    ``meta`` to check a weights file's shapes), since the cache keeps them."""
    with torch.device("cpu"):
        return color.ab_gamut_bins()


class SelfAttention(nn.Module):
    """Multi-head self-attention over all positions of a feature map, with a residual."""

    def __init__(self, *, channels: int, heads: int = ATTENTION_HEADS) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(self.groups(channels), channels)
        self.attention = nn.MultiheadAttention(channels, heads, batch_first=True)

    @staticmethod
    def groups(channels: int) -> int:
        return min(32, channels // 4)

    @classmethod
    def fits(cls, channels: int, heads: int = ATTENTION_HEADS) -> bool:
        """Whether ``channels`` split into ``heads`` and into the norm's groups."""
        return channels % heads == 0 and cls.groups(channels) > 0 and channels % cls.groups(channels) == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        mixed, _ = self.attention(tokens, tokens, tokens, need_weights=False)
        return x + mixed.transpose(1, 2).reshape(b, c, h, w)


class SemanticEncoder(nn.Module):
    """What the whole image is: (B, 1, H, W) normalised L -> (B, 8 * width) features, pooled
    over the image. Four stages of two 3x3 convolutions, each stage after the first at half
    the resolution and twice the width; L larger than :data:`SEMANTIC_SIZE` is average-pooled
    down to it first.

    A network of its own rather than a head on the U-Net's encoder: the colour loss alone
    teaches that encoder little about classes (a linear probe on its features: 30-51% on
    CIFAR-10 against 40% for random ones, docs/colour.md), and a class head on its bottleneck learned to 37% train accuracy on
    CIFAR-10 in 4 epochs, where this one learns to above 60%.
    """

    def __init__(self, *, width: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 1
        for stage in range(4):
            c_out = width * 2**stage
            layers += [
                nn.Conv2d(c_in, c_out, 3, stride=2 if stage else 1, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
                nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ]
            c_in = c_out
        self.net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.features = c_in

    def forward(self, l_norm: torch.Tensor) -> torch.Tensor:
        if max(l_norm.shape[-2:]) > SEMANTIC_SIZE:
            l_norm = F.adaptive_avg_pool2d(l_norm, SEMANTIC_SIZE)
        return self.net(l_norm)


class PretrainedFeatures(nn.Module):
    """A frozen pretrained encoder on the U-Net's input: (B, 1, H, W) normalised L ->
    (B, features, H/2**depth, W/2**depth), the bottleneck's resolution.

    L becomes the neutral sRGB grey it stands for, in [0, 1] as nsfwjs feeds its MobileNetV2
    (a linear probe of the pooled features on CIFAR-10 scores 5 points higher so than on
    Keras's [-1, 1]), resized so that the encoder's stride lands on the bottleneck's grid.
    The encoder stays in eval mode (its batch-norm statistics fixed) and gets no gradient.
    """

    def __init__(self, *, name: str, depth: int) -> None:
        super().__init__()
        self.net = backbones.MobileNetV2(blocks=PRETRAINED[name])
        self.net.requires_grad_(False)
        self.depth = depth
        self.features = self.net.features

    def train(self, mode: bool = True) -> PretrainedFeatures:
        super().train(mode)
        self.net.eval()
        return self

    def forward(self, l_norm: torch.Tensor) -> torch.Tensor:
        side = (l_norm.shape[-2] >> self.depth) * self.net.stride, (l_norm.shape[-1] >> self.depth) * self.net.stride
        grey = color.gray_rgb_from_l(l_norm * color.L_RANGE + color.L_CENTER).clamp(0, 1)  # (B, 1, H, W) in [0, 1]
        grey = F.interpolate(grey, size=side, mode="bilinear", align_corners=False, antialias=True)
        with torch.no_grad():
            return self.net(grey.expand(-1, 3, -1, -1))


class UNet(nn.Module):
    """U-Net colouriser in Lab: (B, 1, H, W) normalised L -> (B, 2, H, W) normalised ab,
    or (B, Q, H, W) logits over :func:`ab_bins` with the classification head.

    With ``config.classes``, a :class:`SemanticEncoder` (twice the U-Net's width) also
    classifies the image, and its features, through a small MLP, are added to every position
    of the bottleneck (Iizuka et al. 2016's fusion of global and local features). The MLP's
    last layer starts at zero, so a model that gains the branch starts out colouring exactly
    as it did without it. With ``config.pretrained``, the feature map of a frozen pretrained
    encoder (:class:`PretrainedFeatures`) is added to the bottleneck through two 1x1
    convolutions, the last also starting at zero.

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
        if config.classes:
            self.semantic = SemanticEncoder(width=2 * config.width)
            self.classify = nn.Linear(self.semantic.features, config.classes)
            self.fuse = nn.Sequential(
                nn.Linear(self.semantic.features, widths[-1]), nn.ReLU(inplace=True), nn.Linear(widths[-1], widths[-1])
            )
            nn.init.zeros_(self.fuse[-1].weight)
            nn.init.zeros_(self.fuse[-1].bias)
        if config.pretrained:
            self.pretrained = PretrainedFeatures(name=config.pretrained, depth=config.depth)
            self.pretrained_fuse = nn.Sequential(
                nn.Conv2d(self.pretrained.features, widths[-1], 1), nn.ReLU(inplace=True), nn.Conv2d(widths[-1], widths[-1], 1)
            )
            nn.init.zeros_(self.pretrained_fuse[-1].weight)
            nn.init.zeros_(self.pretrained_fuse[-1].bias)

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

    def forward(self, l_norm: torch.Tensor, *, with_logits: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The colour output; with ``with_logits``, also the semantic branch's (B, classes)
        class logits (one forward pass for both losses, as DDP needs)."""
        *skips, x = self.encode(l_norm)
        logits = None
        if self.config.classes:
            features = self.semantic(l_norm)  # (B, F)
            logits = self.classify(features)
            x = x + self.fuse(features)[:, :, None, None]
        elif with_logits:
            raise ValueError("this model has no semantic branch (ModelConfig.classes = 0), so no class logits")
        if self.config.pretrained:
            x = x + self.pretrained_fuse(self.pretrained(l_norm))
        for up, merge, skip in zip(self.up, self.merge, reversed(skips)):
            x = merge(torch.cat((up(x), skip), dim=1))
        return (self.head(x), logits) if with_logits else self.head(x)


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


def load_backbone(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load ``state`` into ``model``, which may add a semantic branch that ``state`` lacks
    (that branch keeps its fresh initialisation, so the model colours as ``state`` did), or a
    pretrained encoder (whose weights :func:`load_pretrained` loads), or
    whose colour head ``state`` lacks (:func:`without_colour_head`: a fresh head of another
    kind on the same U-Net). Any other missing or unexpected key is an error."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shapes that differ; torch's message runs over many lines
        raise ValueError(f"weights do not fit this model: {str(error).splitlines()[-1].strip()}") from None
    missing = [k for k in missing if k.split(".")[0] not in (*SEMANTIC_MODULES, *PRETRAINED_MODULES, *COLOUR_HEAD)]
    if missing or unexpected:
        raise ValueError(f"weights do not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}")


def load_pretrained(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a pretrained encoder's weights (a full network's state dict, such as
    :func:`colorize.backbones.mobilenet_v2_state` gives) into ``model``'s
    :class:`PretrainedFeatures`; the layers it does not use are left out."""
    if not isinstance(getattr(model, "pretrained", None), PretrainedFeatures):
        raise ValueError("this model has no pretrained encoder (ModelConfig.pretrained is empty)")
    net = model.pretrained.net
    wanted = net.state_dict()
    absent = [k for k in wanted if k not in state]
    if absent:
        raise ValueError(f"these are not {model.config.pretrained} weights: {absent[0]} is missing")
    net.load_state_dict({k: state[k] for k in wanted})


def without_class_head(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` less the semantic branch's class head: what carries over to a model of other
    classes (the branch's encoder and fusion do; :func:`load_backbone` starts a fresh head)."""
    return {k: v for k, v in state.items() if k.split(".")[0] != "classify"}


def without_colour_head(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` less the U-Net's colour head, its last 1x1 convolution: what carries over to
    the same U-Net with the other head (regression's 2 channels of ab or classification's
    logits over ab cells); :func:`load_backbone` starts a fresh head."""
    return {k: v for k, v in state.items() if k.split(".")[0] not in COLOUR_HEAD}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
