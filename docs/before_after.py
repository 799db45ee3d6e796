"""Draw docs/before-after.png: original | greyscale input | colourised, for the sample photos.

Run after the quick start has written ``out/``:
    colorize run --input samples --output out && python docs/before_after.py out
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

from colorize import plots

ROOT = Path(__file__).resolve().parent.parent


def main(out: Path) -> None:
    originals, greys, colours = [], [], []
    for photo in sorted((ROOT / "samples" / "photos").glob("*.jpg")):
        original = Image.open(photo).convert("RGB").resize((128, 128), Image.Resampling.BICUBIC)
        result = Image.open(out / "images" / "photos" / f"{photo.stem}.png").convert("RGB")
        originals.append(np.asarray(original))
        greys.append(np.asarray(original.convert("L").convert("RGB")))
        colours.append(np.asarray(result.resize((128, 128), Image.Resampling.BICUBIC)))
    columns = [("original", np.stack(originals)), ("input (grey)", np.stack(greys)), ("colorize", np.stack(colours))]
    plots.image_grid(columns, cell=128).save(ROOT / "docs" / "before-after.png")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "out"))
