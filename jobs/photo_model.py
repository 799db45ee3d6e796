"""Train a colouriser on photographs in memory, without Ray: the photo model of docs/colour.md.

    python -m jobs.photo_model --data photos --size 64 --epochs 15 --loss huber --out runs/photo-huber

Photos (class folders, any size) are centre-cropped to squares at ``--size``, a seeded 5% is
held out, and the rest train one :class:`colorize.ablation.Variant` with the same loop as the
ablation study (``objectives.train_step``, horizontal flips, cosine learning rate). Writes
``OUT/model.pt``, ``OUT/metrics.json`` (held-out PSNR, SSIM, colourfulness next to the grey
baseline) and ``OUT/holdout.png`` (grey, prediction and truth for 8 held-out photos).

``--compare A.pt B.pt ...`` trains nothing: it scores those weights files (``bundled`` for the
bundled model) on the same held-out photos and writes ``OUT/compare.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from colorize import ablation, colorizer, evaluate, imagesets, storage
from colorize.models import ModelConfig, count_parameters

HOLDOUT = 0.05


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a folder of class folders of photos")
    parser.add_argument("--out", required=True, help="folder for model.pt, metrics.json, holdout.png")
    parser.add_argument("--size", type=int, default=64, help="working resolution (default: 64)")
    parser.add_argument("--width", type=int, default=16, help="U-Net width (default: 16)")
    parser.add_argument("--depth", type=int, default=4, help="U-Net depth (default: 4)")
    parser.add_argument("--head", choices=("regression", "classification"), default="regression")
    parser.add_argument("--loss", choices=("mse", "l1", "huber", "ce"), default="huber")
    parser.add_argument("--no-rebalance", dest="rebalance", action="store_false")
    parser.add_argument("--gan-weight", type=float, default=0.0)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--limit", type=int, help="a seeded subset of N photos")
    parser.add_argument("--init", help="start from this model.pt (same architecture; fine-tuning, e.g. with --gan-weight)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    parser.add_argument("--device", default=ablation.Budget().device)
    parser.add_argument("--compare", nargs="+", metavar="WEIGHTS", help="score these weights files (or 'bundled') instead of training")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    try:
        photos = imagesets.load_folder(args.data, size=args.size, limit=args.limit).rgb
        for uri in [*(args.compare or []), *([args.init] if args.init else [])]:
            if uri != "bundled":
                colorizer.load_weights(uri)  # fail here, in one line, not after loading and training
    except (ValueError, storage.StorageError) as error:
        parser.error(str(error))  # one line and exit status 2, like the colorize command
    order = np.random.default_rng(0).permutation(len(photos))
    held = max(8, round(len(photos) * HOLDOUT))
    holdout, train = photos[np.sort(order[:held])], photos[np.sort(order[held:])]
    print(f"{len(train)} training and {len(holdout)} held-out photos at {args.size} px, loaded in "
          f"{time.perf_counter() - started:.0f} s", flush=True)
    if args.compare:
        compare(args.compare, holdout, out)
        return

    config = ModelConfig(arch="unet", width=args.width, depth=args.depth, image_size=args.size, head=args.head)
    init = None
    if args.init:
        start, _ = colorizer.load_weights(args.init)
        config, init = start.config, start.state_dict()
    variant = ablation.Variant(out.name, config, loss=args.loss, rebalance=args.rebalance, gan_weight=args.gan_weight)
    budget = ablation.Budget(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, device=args.device)
    model, seconds = ablation.fit(variant, ablation.to_lab(train, torch.device(args.device)), budget, init=init)
    (out / "model.pt").write_bytes(colorizer.weights_bytes(model))

    result, gray, _ = evaluate.score(model.cpu(), ablation._batches(holdout))
    picks = holdout[np.linspace(0, len(holdout) - 1, 8).round().astype(int)]
    rows = [evaluate.gray_baseline(picks), evaluate.colorize_rgb(model, picks), picks]
    Image.fromarray(np.concatenate([np.concatenate(list(r), axis=1) for r in rows], axis=0)).save(out / "holdout.png")
    metrics = {
        "data": str(args.data), "train_photos": len(train), "holdout_photos": len(holdout), "size": args.size,
        "model": config.to_dict(), "parameters": count_parameters(model), "loss": args.loss,
        "rebalance": args.rebalance, "gan_weight": args.gan_weight, "init": args.init, "epochs": args.epochs,
        "batch_size": args.batch_size, "lr": args.lr, "seconds": round(seconds, 1),
        "hardware": ablation.hardware(args.device), "threads": args.threads,
        "weights_id": colorizer.weights_id((out / "model.pt").read_bytes()), "holdout": result, "gray": gray,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"held out: psnr {result['psnr']:.2f} ssim {result['ssim']:.4f} cf {result['colourfulness']:.2f} "
          f"(grey {gray['psnr']:.2f} / {gray['ssim']:.4f}, truth cf {gray['colourfulness_truth']:.2f}); "
          f"{seconds:.0f} s of training", flush=True)


def compare(weights: list[str], holdout: np.ndarray, out: Path) -> None:
    rows = {}
    for uri in weights:
        model, weights_id = colorizer.load_weights(None if uri == "bundled" else uri)
        result, gray, _ = evaluate.score(model, ablation._batches(holdout))
        rows[uri] = {"weights_id": weights_id, **result}
        print(f"{uri}: psnr {result['psnr']:.2f} ssim {result['ssim']:.4f} cf {result['colourfulness']:.2f} "
              f"dcf {result['delta_colourfulness']:.2f}", flush=True)
    rows["gray"] = gray
    print(f"grey: psnr {gray['psnr']:.2f} ssim {gray['ssim']:.4f}; truth cf {gray['colourfulness_truth']:.2f}")
    (out / "compare.json").write_text(json.dumps({"holdout_photos": len(holdout), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
