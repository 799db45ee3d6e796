"""Before/after pictures of real photographs, coloured by the bulk job.

Two pictures:

- ``docs/before-after.png``: original | greyscale input | colourised, for the repository's
  sample photos, from the quick start's output::

      colorize run --input samples --output out && python docs/before_after.py out

- ``docs/skimage-before-after.png``: scikit-image's sample photographs (they ship inside its
  wheel; ``pip install -e '.[docs]'``), each coloured through ``colorize run``'s pipeline at
  its own size (300-640 px) by every model given, next to the original and the grey input::

      python docs/before_after.py --skimage [--weights A.pt --weights B.pt ...]

  Without ``--weights`` the bundled model alone (``--weights bundled`` names it beside
  others); a weights file's column is titled by its file name.

- ``docs/saturation.png``: the same photographs, coloured by the bundled model at each
  ``colorize run --saturation`` factor given::

      python docs/before_after.py --skimage --saturation 1 --saturation 1.3 --saturation 1.6
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from colorize import plots

ROOT = Path(__file__).resolve().parent.parent
SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry")
CELL = 192


def samples(out: Path) -> None:
    originals, greys, colours = [], [], []
    for photo in sorted((ROOT / "samples" / "photos").glob("*.jpg")):
        original = Image.open(photo).convert("RGB").resize((128, 128), Image.Resampling.BICUBIC)
        result = Image.open(out / "images" / "photos" / f"{photo.stem}.png").convert("RGB")
        originals.append(np.asarray(original))
        greys.append(np.asarray(original.convert("L").convert("RGB")))
        colours.append(np.asarray(result.resize((128, 128), Image.Resampling.BICUBIC)))
    columns = [("original", np.stack(originals)), ("input (grey)", np.stack(greys)), ("colorize", np.stack(colours))]
    plots.image_grid(columns, cell=128).save(ROOT / "docs" / "before-after.png")


def skimage_photos(weights: list[str | None], saturations: list[float | None], picture: Path) -> None:
    """One column per model (at its own saturation), or per saturation of the first model."""
    import skimage.data

    from colorize.pipeline import BulkConfig, run

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "photos"
        folder.mkdir()
        originals = []
        for name in SKIMAGE_PHOTOS:
            rgb = getattr(skimage.data, name)()
            Image.fromarray(rgb).save(folder / f"{name}.png")
            originals.append(rgb)
        columns = [("original", originals), ("input (grey)", [np.asarray(Image.fromarray(o).convert("L").convert("RGB")) for o in originals])]
        runs = [(uri, None) for uri in weights] if saturations == [None] else [(weights[0], s) for s in saturations]
        for i, (uri, saturation) in enumerate(runs):
            out = Path(scratch) / f"out-{i}"
            summary = run(BulkConfig(input=str(folder), output=str(out), weights=uri, saturation=saturation, formats=("png",)))
            if summary["written"] != len(SKIMAGE_PHOTOS):
                raise RuntimeError(f"{uri}: {summary}")
            title = "bundled" if uri is None else Path(uri).parent.name if Path(uri).name == "model.pt" else Path(uri).stem
            if saturation is not None:
                title = f"{title}, saturation {saturation:g}"
            columns.append((title, [np.asarray(Image.open(out / "images" / f"{n}.png").convert("RGB")) for n in SKIMAGE_PHOTOS]))
    plots.image_grid(columns, cell=CELL).save(picture)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default="out", help="the quick start's output folder (default: out)")
    parser.add_argument("--skimage", action="store_true", help="scikit-image's sample photos instead")
    parser.add_argument("--weights", action="append", help="a model.pt to compare (repeatable; default: the bundled model)")
    parser.add_argument("--saturation", action="append", type=float,
                        help="with --skimage: a column per factor, of the first model, into docs/saturation.png (repeatable)")
    args = parser.parse_args()
    if args.skimage:
        weights = [None if w == "bundled" else w for w in args.weights or ["bundled"]]
        picture = "saturation.png" if args.saturation else "skimage-before-after.png"
        skimage_photos(weights, args.saturation or [None], ROOT / "docs" / picture)
    elif args.weights or args.saturation:
        parser.error("--weights and --saturation go with --skimage; the sample photos are read from OUT as coloured")
    elif not (Path(args.out) / "images" / "photos").is_dir():
        parser.error(f"{args.out}: no images/photos/ here; run the quick start first "
                     f"(colorize run --input samples --output {args.out})")
    else:
        samples(Path(args.out))


if __name__ == "__main__":
    main()
