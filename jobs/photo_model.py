"""Train a colouriser on photographs in memory, without Ray: the photo model of docs/colour.md.

    python -m jobs.photo_model --data photos --size 64 --epochs 15 --loss huber --out runs/photo-huber

Photos (class folders, any size) are centre-cropped to squares at ``--size``, a seeded 5% is
held out, and the rest train one :class:`colorize.ablation.Variant` with the same loop as the
ablation study (``objectives.train_step``, horizontal flips, cosine learning rate). ``--data``
may be repeated to train on several folders at once (say photos and CIFAR-10, ``--limit``
images from each); each keeps its own holdout and is scored on its own. Writes
``OUT/model.pt``, ``OUT/metrics.json`` (held-out PSNR, SSIM, colourfulness next to the grey
baseline, per folder) and ``OUT/holdout.png`` (grey, prediction and truth for 8 held-out photos).
``--semantic`` adds a semantic branch (``ModelConfig.classes``) that learns each image's class from
its class folder (each ``--data`` folder's classes counted apart) and feeds its features to the
colouriser; ``metrics.json`` then also holds its held-out class accuracy.
``--score-every N`` also scores the holdouts every N epochs while training (one line each, and a
learning curve in ``metrics.json``); that time is not counted against ``--minutes``. With
``--keep-best`` the model kept is the one of those scores (or the last) with the highest held-out
PSNR, written to ``model.pt`` as soon as it is found (training still runs to its end; a lease
cut short still has the best so far).

``--compare A.pt B.pt ...`` trains nothing: it scores those weights files (``bundled`` for the
bundled model) on the same held-out photos and writes ``OUT/compare.json``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import torch
from PIL import Image

from colorize import ablation, backbones, color, colorizer, evaluate, imagesets, storage
from colorize.metrics import SSIM_WINDOW
from colorize.models import MAX_IMAGE_SIZE, ModelConfig, count_parameters, without_class_head, without_colour_head
from colorize.objectives import PRECISIONS, resolve_precision

HOLDOUT = 0.05


@dataclasses.dataclass
class Photos:
    """The --data folders loaded: training images (all folders together) and each folder's holdout."""

    train: np.ndarray  # uint8 (N, S, S, 3)
    train_labels: np.ndarray  # (N,): each folder's classes numbered after the folders before it
    holdouts: dict[str, np.ndarray]
    holdout_labels: dict[str, np.ndarray]
    classes: int  # over all folders
    unreadable: dict[str, list[str]]


@dataclasses.dataclass
class Trained:
    """The model kept, its held-out ``scores`` (model's and grey baseline's, per folder) and how it was trained."""

    model: torch.nn.Module
    scores: dict[str, tuple[dict, dict]]
    seconds: float
    epochs: float
    kept_epoch: float
    curve: list[dict]  # with --score-every: the held-out scores along the way


def main(argv: Sequence[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    start, budget, out = _checked(parser, args)
    started = time.perf_counter()
    try:
        for uri in args.compare or []:
            if uri != colorizer.BUNDLED:
                colorizer.load_weights(uri)  # fail here, in one line, not after loading and training
        pretrained = read_pretrained(args.pretrained) if args.pretrained else None
        photos = load_photos(args.data, args.size, args.limit)
    except (ValueError, storage.StorageError) as error:
        parser.error(str(error))  # one line and exit status 2, like the colorize command
    print(f"{len(photos.train)} training and {sum(map(len, photos.holdouts.values()))} held-out photos at {args.size} px, "
          f"loaded in {time.perf_counter() - started:.0f} s", flush=True)
    if args.compare:
        compare(args.compare, photos.holdouts, out)
        return

    if args.semantic and photos.classes < 2:
        parser.error(f"--semantic needs at least two class folders in --data, found {photos.classes}")
    config, init = _model_config(parser, args, start, photos.classes, pretrained is not None)
    device = torch.device(args.device)
    if device.type == "cuda":
        # Scoring runs on the training device, in float32: no TF32 rounding in its convolutions
        # and products (training autocasts to bf16 and is not affected).
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    labels = torch.from_numpy(photos.train_labels).to(device) if config.classes and config.classes == photos.classes else None
    variant = ablation.Variant(out.name, config, loss=args.loss, rebalance=args.rebalance, gan_weight=args.gan_weight,
                               colourfulness_weight=args.cf_weight, psnr_weight=args.psnr_weight)
    for stale in ("metrics.json", "holdout.png"):  # an earlier run's: beside this run's model.pt, they would lie
        (out / stale).unlink(missing_ok=True)
    trained = _train(args, variant, budget, photos, out, device=device, init=init, labels=labels, pretrained=pretrained)
    _write_results(args, out, config, photos, trained, device=device, with_classes=labels is not None)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, action="append",
                        help="a folder of class folders of photos (repeat to train on several)")
    parser.add_argument("--out", required=True, help="folder for model.pt, metrics.json, holdout.png")
    parser.add_argument("--size", "--image-size", dest="size", type=int,
                        help="working resolution (default: --init's, else 64; --image-size as in colorize train)")
    parser.add_argument("--width", type=int, help="U-Net width (default: 16; with --init, its own)")
    parser.add_argument("--depth", type=int, help="U-Net depth (default: 4; with --init, its own)")
    parser.add_argument("--head", choices=("regression", "classification"),
                        help="regression, or classification over ab cells (default: --init's head, else regression)")
    parser.add_argument("--loss", choices=colorizer.LOSSES,
                        help="training loss (default: ce for a classification head, else huber)")
    parser.add_argument("--no-rebalance", dest="rebalance", action="store_false",
                        help="the classification head's cross-entropy without class rebalancing")
    parser.add_argument("--semantic", action="store_true",
                        help="add a semantic branch that learns each image's class from its class folder and feeds the "
                             "colouriser (from --init weights without one, the branch starts fresh)")
    parser.add_argument("--pretrained", metavar="WEIGHTS",
                        help="add a frozen ImageNet-pretrained MobileNetV2 whose features feed the bottleneck, its "
                             "weights from this file (python -m jobs.fetch_pretrained writes it)")
    parser.add_argument("--gan-weight", type=float, default=0.0, help="weight of the PatchGAN term (default: 0, none)")
    parser.add_argument("--cf-weight", type=float, default=0.0,
                        help="weight of the colourfulness-gap term (0..255 units) beside the loss (default: 0)")
    parser.add_argument("--psnr-weight", type=float, default=0.0,
                        help="weight of minus the mean PSNR (dB) of the decoded ab beside the loss: with --head "
                             "classification, asks its annealed mean at --temperature to be faithful (default: 0)")
    parser.add_argument("--temperature", type=float,
                        help=f"the classification head's annealed-mean temperature, in training and in the weights "
                             f"(default: --init's, else {ModelConfig.temperature})")
    parser.add_argument("--epochs", type=int, default=15, help="(default: 15)")
    parser.add_argument("--minutes", type=float,
                        help="train for this long instead of --epochs (the learning-rate schedule follows the clock)")
    parser.add_argument("--batch-size", type=int, default=64, help="(default: 64)")
    parser.add_argument("--lr", type=float, default=2e-3, help="Adam's learning rate (default: 0.002)")
    parser.add_argument("--shift", type=int, default=0, metavar="PIXELS",
                        help="move each training image by up to PIXELS each way (reflection-padded random crops; default: 0)")
    parser.add_argument("--limit", type=int, help="a seeded subset of N photos from each folder")
    parser.add_argument("--init", help="start from this model.pt or 'bundled' (its architecture; fine-tuning, e.g. with --gan-weight; "
                             "a --head of the other kind starts fresh on its U-Net)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    parser.add_argument("--device", default=ablation.Budget().device, help="torch device (default: cuda where there is one, else cpu)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="bf16 autocast or float32; auto: bf16 where the device has fast bf16 (default: auto)")
    parser.add_argument("--score-every", type=int, default=0, metavar="EPOCHS",
                        help="also score the holdouts every EPOCHS epochs while training, off the clock (default: 0, only at the end)")
    parser.add_argument("--keep-best", action="store_true",
                        help="with --score-every: keep the weights whose held-out PSNR (mean over --data folders) is "
                             "highest, written to model.pt as each is found, instead of the last")
    parser.add_argument("--compare", nargs="+", metavar="WEIGHTS", help="score these weights files (or 'bundled') instead of training")
    return parser


def _checked(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[torch.nn.Module | None, ablation.Budget, Path]:
    """The flags checked before any photo is read (those that need the photos' classes, or the
    --init model beside them, are checked once they are loaded): the --init model, the training
    budget and the --out folder (made). Fills in --size and --loss where they follow from others."""
    for flag, value in (("--gan-weight", args.gan_weight), ("--cf-weight", args.cf_weight), ("--psnr-weight", args.psnr_weight)):
        if value < 0:
            parser.error(f"{flag} must be >= 0 (a negative weight trains away from the truth), got {value}")
    if args.temperature is not None and not 0 < args.temperature <= 1:
        parser.error(f"--temperature must be in (0, 1], got {args.temperature}")
    start = None
    if args.init:  # read first: its working size is the default --size the images load at
        try:
            start, _ = colorizer.load_weights(args.init)
        except (ValueError, storage.StorageError) as error:
            parser.error(str(error))
        for flag, given, has in (("--width", args.width, start.config.width), ("--depth", args.depth, start.config.depth)):
            if given is not None and given != has:
                parser.error(f"--init {args.init} fixes the model's architecture; leave out {flag} {given} (it has {has})")
    if args.size is not None and not SSIM_WINDOW <= args.size <= MAX_IMAGE_SIZE:  # SSIM scores the holdout
        parser.error(f"--size must be from {SSIM_WINDOW} to {MAX_IMAGE_SIZE}, got {args.size}")
    args.size = args.size or (start.config.image_size if start is not None else 64)
    depth = start.config.depth if start is not None else args.depth or 4
    if args.size % 2**depth:  # here, not after the data has loaded
        parser.error(f"--size {args.size} must be divisible by 2**depth = {2**depth}"
                     + (f" (--init {args.init})" if start is not None else ""))
    if args.score_every < 0:
        parser.error(f"--score-every must be >= 0, got {args.score_every}")
    if not 0 <= args.shift < args.size // 2:
        parser.error(f"--shift must be from 0 to {args.size // 2 - 1} pixels at --size {args.size}, got {args.shift}")
    if args.keep_best and not args.score_every:
        parser.error("--keep-best needs --score-every N: the held-out scores it chooses by")
    for flag, value in (("--lr", args.lr), ("--minutes", args.minutes), ("--epochs", args.epochs), ("--batch-size", args.batch_size),
                        ("--threads", args.threads), ("--width", args.width), ("--depth", args.depth), ("--limit", args.limit)):
        if value is not None and not value > 0:  # NaN too
            parser.error(f"{flag} must be > 0, got {value}")
    head = args.head or (start.config.head if start is not None else "regression")
    args.loss = args.loss or ("ce" if head == "classification" else "huber")
    if (args.loss == "ce") != (head == "classification"):
        parser.error(f"--loss {args.loss} does not fit the {head} head (ce is for classification)"
                     + (f" of --init {args.init}" if args.head is None and start is not None else ""))
    try:  # its checks (a device this machine has) here, not after the photos have loaded
        budget = ablation.Budget(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, device=args.device,
                                 seconds=args.minutes * 60 if args.minutes else None, precision=args.precision,
                                 shift=args.shift)
    except ValueError as error:
        parser.error(str(error))
    if error := storage.not_local("--out", args.out):
        parser.error(error)
    torch.set_num_threads(args.threads)
    out = Path(args.out).resolve()
    inside = next((d for d in args.data if out.is_relative_to(Path(d).resolve())), None)
    if inside is not None:  # a rerun would read OUT/holdout.png, held-out photos, as a training photo
        parser.error(f"--out {args.out} lies inside --data {inside}; put it elsewhere")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        parser.error(f"--out {out}: {error.strerror or error}")
    return start, budget, out


def load_photos(folders: list[str], size: int, limit: int | None) -> Photos:
    """Each folder's photos at ``size`` px (``limit`` of each), split into a holdout and the rest."""
    holdouts, holdout_labels, parts, label_parts, classes, unreadable = {}, {}, [], [], 0, {}
    for folder in folders:
        images = imagesets.load_folder(folder, size=size, limit=limit)
        if images.unreadable:
            unreadable[folder] = list(images.unreadable)
            print(f"{folder}: skipped {len(images.unreadable)} file(s) that could not be read, such as "
                  f"{images.unreadable[0]}", flush=True)
        held, rest = holdout_split(images)
        if not len(held) or not len(rest):
            raise ValueError(f"{folder}: {len(images.rgb)} images leave {len(rest)} to train on and {len(held)} to hold "
                             f"out (5% of the folder, at least 8): give it more images, or a larger --limit")
        holdouts[folder], holdout_labels[folder] = images.rgb[held], images.labels[held] + classes
        parts.append(images.rgb[rest])
        label_parts.append(images.labels[rest] + classes)  # each folder's classes after the folders before it
        classes += len(images.classes)
    return Photos(np.concatenate(parts), np.concatenate(label_parts), holdouts, holdout_labels, classes, unreadable)


def _model_config(parser: argparse.ArgumentParser, args: argparse.Namespace, start: torch.nn.Module | None,
                  classes: int, pretrained: bool) -> tuple[ModelConfig, dict[str, torch.Tensor] | None]:
    """The model to train and the weights it starts from (None: fresh), from the flags and --init."""
    temperature = args.temperature or ModelConfig.temperature
    init = None
    if start is None:
        config = ModelConfig(arch="unet", width=args.width or 16, depth=args.depth or 4, image_size=args.size,
                             head=args.head or "regression", temperature=temperature, classes=classes if args.semantic else 0)
    else:  # not a fresh model first: a shallower --init at a --size its depth allows failed that one's checks
        if args.semantic and start.config.arch != "unet":
            parser.error(f"--semantic needs a U-Net, but --init {args.init} is the {start.config.arch}")
        init = start.state_dict()
        # Its architecture; this run's working size (a U-Net is fully convolutional) and, if given, temperature.
        # Not its saturation: a factor suited to its colour, not to the model this run makes (as colorize train).
        config = dataclasses.replace(start.config, image_size=args.size, saturation=1.0,
                                     temperature=args.temperature or start.config.temperature)
        if args.head and args.head != config.head:
            if config.arch != "unet":
                parser.error(f"--head {args.head} needs a U-Net, but --init {args.init} is the {config.arch}")
            # The same U-Net with a fresh colour head of the other kind, at this run's temperature.
            init = without_colour_head(init)
            config = dataclasses.replace(config, head=args.head, temperature=temperature)
        # Other folders' classes: a fresh class head; the branch's encoder and fusion carry over. With
        # a single class folder there is nothing to classify: the colour loss alone trains the branch.
        if (args.semantic or config.classes) and classes >= 2 and classes != config.classes:
            init = without_class_head(init)
            config = dataclasses.replace(config, classes=classes)
    if pretrained:
        if config.arch != "unet":
            parser.error(f"--pretrained needs a U-Net, but --init {args.init} is the {config.arch}")
        config = dataclasses.replace(config, pretrained="mobilenet_v2")
    return config, init


def _train(args: argparse.Namespace, variant: ablation.Variant, budget: ablation.Budget, photos: Photos, out: Path, *,
           device: torch.device, init: dict[str, torch.Tensor] | None, labels: torch.Tensor | None,
           pretrained: dict[str, torch.Tensor] | None) -> Trained:
    """Train ``variant`` on ``device``, scoring the holdouts every --score-every epochs; with --keep-best, keep
    the weights that scored best. ``model.pt`` holds the model kept (and, along the way, the best
    so far)."""
    curve: list[dict] = []
    best: dict = {"psnr": -np.inf}  # with --keep-best: the epoch, mean held-out PSNR and weights of the best so far

    def score_holdouts(epoch: int, model: torch.nn.Module) -> None:
        if epoch % args.score_every:
            return
        snapshot = copy.deepcopy(model).eval()  # the training model stays in train mode
        # The model's scores only: the grey baseline's are the same at every epoch.
        point = {"epoch": epoch, **{folder: evaluate.score(snapshot, evaluate.in_batches(holdout), with_gray=False)[0]
                                    for folder, holdout in photos.holdouts.items()}}
        curve.append(point)
        print(f"  {out.name}: epoch {epoch} held out: " + "; ".join(
            f"{folder} psnr {point[folder]['psnr']:.3f} ssim {point[folder]['ssim']:.4f} cf {point[folder]['colourfulness']:.2f}"
            for folder in photos.holdouts), flush=True)
        psnr = mean_psnr({folder: point[folder] for folder in photos.holdouts})
        if args.keep_best and psnr > best["psnr"]:
            best.update(epoch=epoch, psnr=psnr, weights=colorizer.weights_bytes(snapshot))
            write_atomically(out / "model.pt", best["weights"])  # a lease cut short still has it

    model, seconds, epochs = ablation.fit(variant, ablation.to_lab(photos.train, device), budget,
                                          init=init, on_epoch=score_holdouts if args.score_every else None,
                                          labels=labels, pretrained=pretrained)
    if "weights" not in best:  # saved before scoring, which takes minutes (with --keep-best, model.pt holds the best so far)
        write_atomically(out / "model.pt", colorizer.weights_bytes(model))
    scores = {folder: score(model, holdout) for folder, holdout in photos.holdouts.items()}
    kept_epoch, last_psnr = round(epochs, 2), mean_psnr({folder: result for folder, (result, _) in scores.items()})
    if args.keep_best and best["psnr"] > last_psnr:
        model = colorizer.model_from_bytes(best["weights"]).to(device)
        scores = {folder: score(model, holdout) for folder, holdout in photos.holdouts.items()}
        kept_epoch = best["epoch"]
        print(f"kept the weights of epoch {kept_epoch}: held-out PSNR {best['psnr']:.3f}, the last {last_psnr:.3f}", flush=True)
    write_atomically(out / "model.pt", colorizer.weights_bytes(model))
    return Trained(model, scores, seconds, epochs, kept_epoch, curve)


def _write_results(args: argparse.Namespace, out: Path, config: ModelConfig, photos: Photos, trained: Trained, *,
                   device: torch.device, with_classes: bool) -> None:
    """``holdout.png`` (grey, prediction and truth of 8 held-out photos) and ``metrics.json``, and the scores printed."""
    model = trained.model
    holdout = np.concatenate(list(photos.holdouts.values()))
    picks = holdout[np.linspace(0, len(holdout) - 1, 8).round().astype(int)]
    rows = [evaluate.gray_baseline(picks), evaluate.colorize_rgb(model, picks), picks]
    Image.fromarray(np.concatenate([np.concatenate(list(r), axis=1) for r in rows], axis=0)).save(out / "holdout.png")
    metrics = {
        "data": args.data, "train_photos": len(photos.train), "holdout_photos": len(holdout), "size": args.size,
        "model": config.to_dict(), "parameters": count_parameters(model), "loss": args.loss,
        "rebalance": args.rebalance, "gan_weight": args.gan_weight, "cf_weight": args.cf_weight,
        "psnr_weight": args.psnr_weight, "init": args.init, "epochs": round(trained.epochs, 2),
        "batch_size": args.batch_size, "lr": args.lr, "shift": args.shift, "seconds": round(trained.seconds, 1),
        "hardware": ablation.hardware(args.device), "threads": args.threads,
        "precision": resolve_precision(args.precision, device),
        "weights_id": colorizer.weights_id((out / "model.pt").read_bytes()), "kept_epoch": trained.kept_epoch,
        "holdout": trained.scores, "curve": trained.curve, "unreadable": photos.unreadable,
    }
    if with_classes:
        metrics["holdout_class_accuracy"] = {folder: class_accuracy(model, photos.holdouts[folder], photos.holdout_labels[folder])
                                             for folder in photos.holdouts}
        print("held-out class accuracy: " + "; ".join(f"{f} {a:.3f}" for f, a in metrics["holdout_class_accuracy"].items()))
    write_atomically(out / "metrics.json", json.dumps(metrics, indent=2).encode())
    for folder, (result, gray) in trained.scores.items():
        print(f"held out of {folder}: psnr {result['psnr']:.2f} ssim {result['ssim']:.4f} cf {result['colourfulness']:.2f} "
              f"(grey {gray['psnr']:.2f} / {gray['ssim']:.4f}, truth cf {gray['colourfulness_truth']:.2f})", flush=True)
    print(f"{trained.seconds:.0f} s of training, {trained.epochs:.1f} epochs", flush=True)


def read_pretrained(path: str) -> dict[str, torch.Tensor]:
    """The MobileNetV2 weights file ``--pretrained`` names, checked whole (every weight there,
    every shape right); a ValueError in one line if it is not one."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        backbones.MobileNetV2().load_state_dict(state)
    except OSError as error:
        raise ValueError(f"--pretrained: {error}") from None
    except Exception:  # torch.load of arbitrary bytes fails in many ways (KeyError, UnpicklingError, ...)
        raise ValueError(f"--pretrained {path}: not MobileNetV2 weights (python -m jobs.fetch_pretrained writes them)") from None
    return state


def mean_psnr(results: dict[str, dict]) -> float:
    """The held-out PSNR that --keep-best chooses by: the mean over the --data folders, each
    folder weighed alike whatever its size."""
    return float(np.mean([result["psnr"] for result in results.values()]))


def write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` in one step: a reader (or a lease's time limit) never
    finds half a file."""
    storage.write_bytes_atomic(pafs.LocalFileSystem(), str(path), data)


def holdout_split(images: imagesets.ImageSet) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the held-out images of a folder's ``images``, and of the rest: those of the
    folder's seeded 5% (:func:`split` of its whole listing) that ``images`` holds. So a run with
    ``--limit`` never trains on an image that a run without it holds out, or holds one out
    that it trains on."""
    held_out = np.zeros(images.listed, dtype=bool)
    held_out[split(images.listed)[0]] = True
    mask = held_out[images.index]
    return np.flatnonzero(mask), np.flatnonzero(~mask)


def split(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a seeded 5% (at least 8) of ``n`` images to hold out, and of the rest, each in
    folder order."""
    order = np.random.default_rng(0).permutation(n)
    held = max(8, round(n * HOLDOUT))
    return np.sort(order[:held]), np.sort(order[held:])


@torch.inference_mode()
def class_accuracy(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
    """The semantic branch's accuracy on uint8 (N, S, S, 3) images with int labels (N,)."""
    right = 0
    for start in range(0, len(images), 500):
        L = ablation.to_lab(images[start : start + 500], colorizer.device_of(model))[:, :1]
        _, logits = model(color.normalize_l(L), with_logits=True)
        right += int((logits.argmax(1).cpu().numpy() == labels[start : start + 500]).sum())
    return right / len(images)


def score(model: torch.nn.Module, images: np.ndarray) -> tuple[dict, dict]:
    """The model's metrics on ``images`` and the grey baseline's."""
    result, gray, _ = evaluate.score(model, evaluate.in_batches(images))
    return result, gray


def compare(weights: list[str], holdouts: dict[str, np.ndarray], out: Path) -> None:
    rows: dict[str, dict] = {}
    for folder, holdout in holdouts.items():
        rows[folder] = {}
        for uri in weights:
            model, weights_id = colorizer.load_weights(uri)
            result, gray = score(model, holdout)
            rows[folder][uri] = {"weights_id": weights_id, **result}
            print(f"{folder}: {uri}: psnr {result['psnr']:.2f} ssim {result['ssim']:.4f} cf {result['colourfulness']:.2f} "
                  f"dcf {result['delta_colourfulness']:.2f}", flush=True)
        rows[folder]["gray"] = gray
        print(f"{folder}: grey: psnr {gray['psnr']:.2f} ssim {gray['ssim']:.4f}; truth cf {gray['colourfulness_truth']:.2f}")
    (out / "compare.json").write_text(json.dumps({"holdout_photos": {f: len(h) for f, h in holdouts.items()}, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
