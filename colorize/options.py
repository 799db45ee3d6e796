"""The choices and limits the command line offers, in a module that imports nothing heavy.

``colorize submit`` and ``colorize jobs`` parse a job's command to check it before sending, and
importing torch for these names cost them 5 of their 8 seconds of start-up. The modules that
act on the names import them from here.
"""

from __future__ import annotations

ARCHITECTURES = ("unet", "autoencoder")
HEADS = ("regression", "classification")
REGRESSION_LOSSES = ("mse", "l1", "huber", "psnr")
LOSSES = (*REGRESSION_LOSSES, "ce")  # "ce": the classification head's rebalanced cross-entropy
# "auto": bf16 autocast where the device runs it fast (see objectives.fast_bf16), float32 elsewhere.
PRECISIONS = ("auto", "float32", "bf16")
# ModelConfig.saturation's ceiling. On CIFAR-10 the bundled model matches the truth's
# colourfulness at 1.6 and overshoots it by a quarter at 2; at 4 over a third of its coloured
# pixels leave the sRGB gamut (and are desaturated back into it): more is a typo, not a wish.
MAX_SATURATION = 4.0
MAX_PIXELS = 80_000_000  # the default --max-pixels: larger images are refused as decompression bombs
