"""The ablation study: every loss, head and architecture trained the same way, side by side.

Each :class:`Variant` trains with the project's own :func:`~colorize.objectives.train_step`
in a plain loop over CIFAR-10 held in memory (on the GPU when there is one: the whole
training split is 600 MB of Lab floats), then is scored with :func:`colorize.evaluate.score`
on the test split next to the grey baseline. No Ray, so the same study runs on a bare GPU
machine; the Ray Train path is the same step in a different loop.

Results accumulate in ``OUT/ablation.json`` (re-running a subset of variants replaces
their rows), and ``OUT/ablation.md`` and ``OUT/ablation-grid.png`` are rebuilt from it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from colorize import color, colorizer, errors, evaluate, imagesets, metrics, plots, quantize, storage
from colorize.models import MAX_IMAGE_SIZE, ModelConfig, PatchDiscriminator, build_model, count_parameters, load_backbone, load_pretrained
from colorize.objectives import PRECISIONS, Adversary, cosine_lr, resolve_precision, set_lr, train_step

GRID_IMAGES = 8  # test images in the picture grid, evenly spaced (class folders: across classes)


@dataclass(frozen=True)
class Variant:
    """One row group of the table: a model, its loss, and what else it trains with.

    ``temperatures`` are extra annealed-mean temperatures to score a classification head at
    (one row each); its own ``model.temperature`` is always scored.
    """

    name: str
    model: ModelConfig
    loss: str = "mse"
    rebalance: bool = True
    gan_weight: float = 0.0
    colourfulness_weight: float = 0.0
    psnr_weight: float = 0.0
    temperatures: tuple[float, ...] = ()
    note: str = ""

    def __post_init__(self) -> None:
        if min(self.gan_weight, self.colourfulness_weight, self.psnr_weight) < 0:
            raise ValueError(f"{self.name}: term weights must be >= 0, got gan {self.gan_weight}, "
                             f"colourfulness {self.colourfulness_weight}, psnr {self.psnr_weight}")


def _unet(**kw: Any) -> ModelConfig:
    return ModelConfig(arch="unet", **{"width": 32, "depth": 3, "image_size": 32, **kw})


VARIANTS: tuple[Variant, ...] = (
    Variant("seed-autoencoder", ModelConfig(arch="autoencoder", width=32, depth=3), note="the seed notebook's model and loss (RGB MSE)"),
    Variant("unet-mse", _unet(), note="ab regression, MSE"),
    Variant("unet-huber", _unet(), loss="huber", note="ab regression, Huber (L1 beyond 0.1)"),
    Variant("unet-psnr", _unet(), loss="psnr", note="ab regression, minus the mean per-image sRGB PSNR (the reported figure)"),
    Variant("unet-psnr-cf", _unet(), loss="psnr", colourfulness_weight=0.1,
            note="unet-psnr + each image's colourfulness gap to its truth, weight 0.1 (DDColor's colourfulness loss, matched)"),
    Variant("unet-psnr-semantic", _unet(classes=10), loss="psnr",
            note="unet-psnr + a semantic branch: a small classifier of the whole image, trained on the class labels, "
                 "its features added to the bottleneck (classes: the training folders')"),
    Variant("unet-mse-gan", _unet(), gan_weight=0.02, note="MSE + PatchGAN term, weight 0.02"),
    Variant("unet-class", _unet(head="classification"), loss="ce", temperatures=(0.2, 0.6, 1.0),
            note="262 gamut ab cells, soft-encoded, rebalanced CE, annealed mean"),
    Variant("unet-class-plain", _unet(head="classification"), loss="ce", rebalance=False, note="as unet-class without rebalancing"),
    Variant("unet-class-gan", _unet(head="classification"), loss="ce", gan_weight=0.02, note="rebalanced CE + PatchGAN term"),
    Variant("unet-wide-mse", _unet(width=64), note="twice the width (4x the parameters)"),
    Variant("unet-attn-mse", _unet(attention=True), note="self-attention at the bottleneck"),
)


@dataclass
class Budget:
    """How every variant trains: the same data, epochs, batch and schedule.

    With ``seconds``, training runs for that long instead of ``epochs`` (the cosine schedule
    follows the clock), for a lease of fixed length on a shared or unknown machine.
    ``precision`` is one of :data:`colorize.objectives.PRECISIONS`. ``shift`` moves each training
    image by up to that many pixels each way (a random crop of the image padded by reflection,
    CIFAR-10's usual augmentation) on top of the horizontal flips.
    """

    epochs: int = 4
    batch_size: int = 128
    lr: float = 2e-3
    seed: int = 0
    device: str = field(default_factory=lambda: "cuda" if torch.cuda.is_available() else "cpu")
    seconds: float | None = None
    precision: str = "auto"
    shift: int = 0

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        for name, value in (("epochs", self.epochs), ("batch size", self.batch_size)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if self.shift < 0:
            raise ValueError(f"shift must be >= 0 pixels, got {self.shift}")
        for name, value in (("learning rate", self.lr), ("seconds", self.seconds)):
            if value is not None and not value > 0:  # `not >`: NaN is refused too
                raise ValueError(f"{name} must be > 0, got {value}")
        try:
            device = torch.device(self.device)
        except RuntimeError as error:
            raise ValueError(f"device {self.device!r} is not a torch device: {errors.one_line(error, with_type=False)}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r}: this machine has no CUDA GPU that torch can use")


def to_lab(rgb: np.ndarray, device: torch.device, chunk_pixels: int = 2**19) -> torch.Tensor:
    """uint8 (N, S, S, 3) -> float32 Lab (N, 3, S, S) on ``device``, filled in place a chunk of
    images at a time: the conversion's temporaries stay about 100 MB, and the result is never
    held twice. 6,000 images of 64 px (281 MB of Lab) peaked 1.2 GB over the input with
    chunks of 4,096 images joined at the end, 0.38 GB now."""
    lab = torch.empty((len(rgb), 3, *rgb.shape[1:3]), dtype=torch.float32, device=device)
    chunk = max(1, chunk_pixels // (rgb.shape[1] * rgb.shape[2]))
    for start in range(0, len(rgb), chunk):
        x = torch.from_numpy(rgb[start : start + chunk]).to(device).permute(0, 3, 1, 2).float() / 255.0
        lab[start : start + chunk] = color.rgb_to_lab(x)
    return lab


def fit(
    variant: Variant,
    lab: torch.Tensor,
    budget: Budget,
    init: dict[str, torch.Tensor] | None = None,
    on_epoch: Callable[[int, torch.nn.Module], None] | None = None,
    labels: torch.Tensor | None = None,
    pretrained: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.nn.Module, float, float]:
    """Train ``variant`` on Lab images (N, 3, S, S), from the state dict ``init`` if given
    (fine-tuning; a model with a semantic branch may start from one without), its frozen
    pretrained encoder (``ModelConfig.pretrained``) from ``pretrained``, a full encoder's
    weights (:func:`colorize.models.load_pretrained`), if given; returns the
    model, seconds taken and epochs done (fractional under a time budget). A model with a
    semantic branch (``classes``) learns its classes from ``labels``, int64 (N,) on the images' device (without them,
    through the colour loss alone). ``on_epoch(epoch, model)`` runs after each epoch (say, to score a holdout)
    with the clock stopped: its time counts neither in the seconds returned nor against
    ``budget.seconds``. It must leave the model where it is, and in the mode it finds it."""
    torch.manual_seed(budget.seed)
    device = lab.device
    cuda = device.type == "cuda"
    model = build_model(variant.model)
    if init is not None:
        load_backbone(model, init)
    if pretrained is not None:
        load_pretrained(model, pretrained)
    if labels is not None and not variant.model.classes:
        raise ValueError(f"{variant.name}: image labels are for a model with a semantic branch, and this one has none")
    # NHWC convolutions (bf16 tensor cores on a GPU; on a CPU 1.06x to 1.6x faster in float32,
    # bench_cpu_precision) and, on a GPU, one fused Adam kernel per step.
    model = model.to(device, memory_format=torch.channels_last)
    precision = resolve_precision(budget.precision, device)
    torch.backends.cudnn.benchmark = cuda
    optimizer = torch.optim.Adam(model.parameters(), lr=budget.lr, fused=cuda or None)
    class_weights = None
    if variant.loss == "ce" and variant.rebalance:
        # In slices: the distances to every cell take 2 KB a pixel.
        prior = quantize.class_prior((lab[i : i + 64, 1:] for i in range(0, min(len(lab), quantize.PRIOR_IMAGES), 64)), model.ab_bins)
        class_weights = quantize.rebalance_weights(prior).to(device)
    adversary = None
    if variant.gan_weight:
        critic = PatchDiscriminator().to(device, memory_format=torch.channels_last)
        adversary = Adversary.training(critic, budget.lr, variant.gan_weight)
    if not len(lab):
        raise ValueError("no training images")
    batch_size = min(budget.batch_size, len(lab))  # a small set still trains, in one batch an epoch
    steps_per_epoch = len(lab) // batch_size
    total = budget.epochs * steps_per_epoch
    generator = torch.Generator(device="cpu").manual_seed(budget.seed)
    if cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    steps, epoch, done, value = 0, 0, False, torch.zeros(())
    while not done:
        order = torch.randperm(len(lab), generator=generator).to(device)
        before = steps
        for step in range(steps_per_epoch):
            if budget.seconds:
                progress = (time.perf_counter() - started) / budget.seconds
                done = progress >= 1
                if done:
                    break
                lr = cosine_lr(budget.lr, progress, 1)
            else:
                lr = cosine_lr(budget.lr, steps, total)
            set_lr(lr, optimizer, adversary)
            picked = order[step * batch_size : (step + 1) * batch_size]
            batch = lab[picked]
            if step % 2:
                batch = batch.flip(-1)  # horizontal flips, half the batches
            if budget.shift:
                batch = random_shift(batch, budget.shift, generator)
            if cuda:
                batch = batch.contiguous(memory_format=torch.channels_last)
            tensors = {"L": batch[:, :1], "ab": batch[:, 1:]}
            if labels is not None:
                tensors["label"] = labels[picked]
            value = train_step(model, tensors, optimizer, loss=variant.loss,
                               class_weights=class_weights, adversary=adversary,
                               colourfulness_weight=variant.colourfulness_weight, psnr_weight=variant.psnr_weight,
                               precision=precision)
            steps += 1
        if steps == before:  # the time ran out before this epoch's first step: no epoch to count or score
            break
        epoch += 1
        if not bool(torch.isfinite(value)):  # once an epoch: reading it waits for the GPU
            raise FloatingPointError(f"{variant.name}: the loss is not finite after {epoch} epochs; try a lower learning rate")
        done = done or (not budget.seconds and epoch >= budget.epochs)
        print(f"  {variant.name}: epoch {epoch}{'' if budget.seconds else f'/{budget.epochs}'} done, "
              f"{time.perf_counter() - started:.0f} s", flush=True)
        if on_epoch is not None:
            paused = time.perf_counter()
            on_epoch(epoch, model)
            started += time.perf_counter() - paused
    if cuda:
        torch.cuda.synchronize()
    return model.eval(), time.perf_counter() - started, steps / max(1, steps_per_epoch)


def random_shift(batch: torch.Tensor, pixels: int, generator: torch.Generator) -> torch.Tensor:
    """Each image of (B, C, S, S) moved by up to ``pixels`` each way, its border filled by
    reflection: a random S x S crop of the image padded by ``pixels``. Offsets come from the
    (CPU) ``generator``, so a seeded run stays the same run."""
    b, _, h, w = batch.shape
    padded = torch.nn.functional.pad(batch, (pixels,) * 4, mode="reflect")
    dy, dx = (torch.randint(0, 2 * pixels + 1, (b,), generator=generator).to(batch.device) for _ in range(2))
    rows = (dy[:, None] + torch.arange(h, device=batch.device))[:, :, None]  # (B, S, 1)
    cols = (dx[:, None] + torch.arange(w, device=batch.device))[:, None, :]  # (B, 1, S)
    picked = padded.permute(0, 2, 3, 1)[torch.arange(b, device=batch.device)[:, None, None], rows, cols]  # (B, S, S, C)
    return picked.permute(0, 3, 1, 2)


def _grid_examples(test: np.ndarray) -> np.ndarray:
    return test[np.linspace(0, len(test) - 1, GRID_IMAGES).round().astype(int)]


def score(model: torch.nn.Module, test: np.ndarray) -> tuple[dict[str, float], np.ndarray]:
    """Metrics on the test images (model on CPU, like the bulk job) and the grid examples."""
    model = model.cpu()
    result, _, _ = evaluate.score(model, evaluate.in_batches(test), with_gray=False)
    return result, evaluate.colorize_rgb(model, _grid_examples(test))


def hardware(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(0)
    return f"CPU, {os.cpu_count()} cores ({platform.machine()})"


def run_variant(
    variant: Variant, lab: torch.Tensor, test: np.ndarray, budget: Budget, out: Path, weights_dir: Path,
    labels: torch.Tensor | None = None,
) -> list[dict[str, Any]]:
    """Train, score and save one variant; one row per decoding temperature. ``labels`` (N,)
    are the training images' classes, for a variant with a semantic branch."""
    model, seconds, _ = fit(variant, lab, budget, labels=labels if variant.model.classes else None)
    weights = weights_dir / f"{variant.name}.pt"
    weights.parent.mkdir(parents=True, exist_ok=True)
    raw = colorizer.weights_bytes(model)
    weights.write_bytes(raw)
    temperatures = [variant.model.temperature, *variant.temperatures] if variant.model.head == "classification" else [None]
    rows = []
    for temperature in temperatures:
        colorizer.set_decoding(model, temperature=temperature)
        result, examples = score(model, test)
        label = variant.name if temperature in (None, variant.model.temperature) else f"{variant.name} T={temperature:g}"
        Image.fromarray(np.concatenate(list(examples), axis=1)).save(out / "ablation" / f"{label.replace(' ', '_')}.png")
        rows.append({
            "variant": label, "note": variant.note, "model": model.config.to_dict(), "loss": variant.loss,
            "rebalance": variant.rebalance, "gan_weight": variant.gan_weight,
            "colourfulness_weight": variant.colourfulness_weight, "temperature": temperature,
            "parameters": count_parameters(model), "train_images": len(lab), "epochs": budget.epochs,
            "batch_size": budget.batch_size, "lr": budget.lr, "seconds": round(seconds, 1),
            "hardware": hardware(budget.device), "precision": resolve_precision(budget.precision, torch.device(budget.device)),
            "weights": str(weights), "weights_id": colorizer.weights_id(raw), **result,
        })
    colorizer.set_decoding(model, temperature=variant.model.temperature)
    return rows


def write_report(results: dict[str, Any], out: Path) -> None:
    """ablation.md (the table) and ablation-grid.png (the same test images, every row)."""
    gray, rows = results["gray"], results["rows"]
    lines = [
        "| variant | parameters | train images x epochs | time | hardware, precision | PSNR dB | SSIM | CF | dCF |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| gray baseline (601 luma to R, G, B) | 0 | - | - | - | {gray['psnr']:.2f} | {gray['ssim']:.4f} | "
        f"{gray['colourfulness']:.2f} | {gray['delta_colourfulness']:.2f} |",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['parameters'] / 1e6:.2f} M | {r['train_images']} x {r['epochs']} | {r['seconds']:.0f} s | "
            f"{r['hardware']}, {r.get('precision', 'float32')} | {r['psnr']:.2f} | {r['ssim']:.4f} | {r['colourfulness']:.2f} | {r['delta_colourfulness']:.2f} |"
        )
    notes = [f"- **{r['variant']}**: {r['note']}" for r in rows if r["note"] and " T=" not in r["variant"]]
    # Tables from before the test folder was recorded were all scored on CIFAR-10's test split.
    test = results.get("test", {})
    source = f"{test['image_size']} px, from {test['source']}" if "source" in test else "CIFAR-10 test split"
    header = f"Test images: {gray['images']} ({source}). Truth colourfulness: {gray['colourfulness_truth']:.2f}."
    if gray.get("grey_truth_images"):
        header += (f" {gray['grey_truth_images']} of them are grey in truth: the baseline copies those exactly, at the"
                   f" {metrics.PSNR_CAP_DB:.0f} dB cap")
        # None where every test image is grey
        others = gray.get("psnr_colour_images")
        header += f", and over the other images its PSNR is {others:.2f} dB." if others is not None else "."
    text = "\n".join([
        "<!-- Generated by `python -m jobs.ablation --data DIR` (docs/colour.md gives each row's flags); "
        "edit colorize/ablation.py, not this table. -->",
        header, "", *lines, "", *notes, "",
    ])
    (out / "ablation.md").write_text(text)
    strips = [("gray", out / "ablation" / "_gray.png"), *((r["variant"], out / "ablation" / f"{r['variant'].replace(' ', '_')}.png") for r in rows),
              ("truth", out / "ablation" / "_truth.png")]
    rows_of_images = [(label, _split(np.asarray(Image.open(path)))) for label, path in strips if path.exists()]
    # The grid helper lays out one column per title; here each variant is a row, so each test
    # image is a column and the variant names go down the left margin.
    cell, margin = 64, 140
    grid = plots.image_grid([("", np.stack([r[1][i] for r in rows_of_images])) for i in range(GRID_IMAGES)], cell=cell)
    labelled = Image.new("RGB", (grid.width + margin, grid.height), (255, 255, 255))
    labelled.paste(grid, (margin, 0))
    draw = ImageDraw.Draw(labelled)
    for i, (label, _) in enumerate(rows_of_images):
        draw.text((4, 16 + cell * i + cell // 2 - 6), label[:30], fill=(40, 40, 40))
    labelled.save(out / "ablation-grid.png")


def refresh_strips(results: dict[str, Any], test: np.ndarray, out: Path) -> None:
    """Redraw every row's grid strip from its weights file, where that is still on disk and
    still the model the row scored (a later study may have written another model under the
    same name), so that all rows show the same test images."""
    examples = _grid_examples(test)
    kept = [row["variant"] for row in results["rows"] if not _scored(row)]
    if kept:
        print(f"{len(kept)} row(s) keep their drawn strips, such as {kept[0]}: their weights files are gone or are not "
              "the models they scored (rows from before session 35 record no weights_id)", flush=True)
    for row in results["rows"]:
        if _scored(row):
            model, _ = colorizer.load_weights(row["weights"], temperature=row["temperature"])
            strip = np.concatenate(list(evaluate.colorize_rgb(model, examples)), axis=1)
            Image.fromarray(strip).save(out / "ablation" / f"{row['variant'].replace(' ', '_')}.png")


def _scored(row: dict[str, Any]) -> bool:
    """Whether ``row``'s weights file is still the model it scored."""
    path = Path(row["weights"])
    return path.is_file() and row.get("weights_id") == colorizer.weights_id(path.read_bytes())


def _split(strip: np.ndarray) -> np.ndarray:
    """A horizontal strip of square images -> (N, S, S, 3)."""
    size = strip.shape[0]
    return np.stack([strip[:, i : i + size] for i in range(0, strip.shape[1], size)])


def _scaled(variant: Variant, scale: float, image_size: int) -> Variant:
    width = max(1, round(variant.model.width * scale)) if variant.model.arch == "unet" else variant.model.width
    return dataclasses.replace(variant, model=dataclasses.replace(variant.model, width=width, image_size=image_size))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a folder with train/ and test/ class folders (CIFAR-10 as JPEGs)")
    parser.add_argument("--out", default="docs", help="where ablation.json, ablation.md, ablation-grid.png go (default: docs)")
    parser.add_argument("--weights-dir", default="runs/ablation", help="where each variant's weights go, as VARIANT.pt (default: runs/ablation)")
    parser.add_argument("--variants", help=f"comma-separated subset of: {', '.join(v.name for v in VARIANTS)}")
    parser.add_argument("--limit", type=int, help="train on a seeded subset of N training images")
    parser.add_argument("--test-limit", type=int, help="score on a seeded subset of N test images")
    parser.add_argument("--epochs", type=int, default=Budget.epochs, help=f"epochs per variant (default: {Budget.epochs})")
    parser.add_argument("--batch-size", type=int, default=Budget.batch_size, help=f"(default: {Budget.batch_size})")
    parser.add_argument("--lr", type=float, default=Budget.lr, help=f"Adam's learning rate (default: {Budget.lr:g})")
    parser.add_argument("--device", default=Budget().device, help="torch device (default: cuda where there is one, else cpu)")
    parser.add_argument("--precision", choices=PRECISIONS, default=Budget.precision,
                        help="bf16 autocast or float32; auto: bf16 where the device has fast bf16 (default: auto)")
    parser.add_argument("--report-only", action="store_true", help="train nothing: redraw the grid and table from ablation.json")
    parser.add_argument("--width-scale", type=float, default=1.0,
                        help="multiply every U-Net's width (0.5 makes the study affordable on a CPU)")
    parser.add_argument("--image-size", type=int, default=32, help="working resolution of every model (default: 32)")
    args = parser.parse_args(argv)
    for flag, value in (("--limit", args.limit), ("--test-limit", args.test_limit)):
        if value is not None and value < 1:
            parser.error(f"{flag} must be at least 1, got {value}")
    if not (math.isfinite(args.width_scale) and args.width_scale > 0):
        parser.error(f"--width-scale must be a finite number > 0, got {args.width_scale}")
    if args.image_size > MAX_IMAGE_SIZE:
        parser.error(f"--image-size {args.image_size} is above {MAX_IMAGE_SIZE}, the largest working resolution")
    if args.image_size < metrics.SSIM_WINDOW:
        parser.error(f"--image-size {args.image_size} is below SSIM's {metrics.SSIM_WINDOW} px window: the test split could not be scored")
    names = args.variants.split(",") if args.variants is not None else [v.name for v in VARIANTS]
    unknown = [n for n in names if n not in {v.name for v in VARIANTS}]
    if unknown:
        parser.error(f"--variants: unknown name {unknown[0]!r}; the variants are {', '.join(v.name for v in VARIANTS)}")
    try:
        chosen = [_scaled(v, args.width_scale, args.image_size) for v in VARIANTS if v.name in names]
    except ValueError as error:
        parser.error(f"--image-size: {error}")
    if args.report_only:
        chosen = []
    try:
        budget = Budget(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, device=args.device, precision=args.precision)
    except ValueError as error:
        parser.error(str(error))  # before any data is read
    for flag, folder in (("--out", args.out), ("--weights-dir", args.weights_dir)):
        if error := storage.not_local(flag, folder):
            parser.error(error)
    torch.set_num_threads(os.cpu_count() or 1)
    out = Path(args.out)
    for split in ("train", "test"):  # a rerun would read the strips written there, the test split's truth among them
        if out.resolve().is_relative_to((Path(args.data) / split).resolve()):
            parser.error(f"--out {args.out} lies inside {Path(args.data) / split}, which the study reads; put it elsewhere")
    # Both made here, not after a variant has trained for minutes and its weights cannot be saved.
    for flag, folder in (("--out", out / "ablation"), *([("--weights-dir", Path(args.weights_dir))] if chosen else [])):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=folder).close()
        except OSError as error:
            parser.error(f"{flag}: cannot write in {folder}: {error.strerror or error}")

    try:
        test_set = imagesets.load_folder(Path(args.data) / "test", size=args.image_size, limit=args.test_limit)
        train = imagesets.load_folder(Path(args.data) / "train", size=args.image_size, limit=args.limit) if chosen else None
    except (ValueError, storage.StorageError) as error:
        parser.error(f"--data: {error}")  # one line and exit status 2, like the colorize command
    for split, loaded in (("test", test_set), ("train", train)):
        if loaded is not None and loaded.unreadable:
            print(f"{Path(args.data) / split}: skipped {len(loaded.unreadable)} file(s) that could not be read, such as "
                  f"{loaded.unreadable[0]}", flush=True)
    test = test_set.rgb
    if train is not None:  # a semantic branch learns as many classes as the training folder has
        for v in chosen:
            if v.model.classes and len(train.classes) < 2:
                parser.error(f"--variants: {v.name} learns the classes of {Path(args.data) / 'train'}, which has only one class folder")
        chosen = [dataclasses.replace(v, model=dataclasses.replace(v.model, classes=len(train.classes))) if v.model.classes else v
                  for v in chosen]
    results_path = out / "ablation.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {"rows": []}
    gray = metrics.MetricAccumulator()
    for batch in evaluate.in_batches(test):
        gray.update(evaluate.gray_baseline(batch), batch)
    test_split = {"images": len(test), "image_size": args.image_size, "source": f"{Path(args.data).resolve().name}/test"}
    # Rows scored on another test set would sit beside a grey row that is not theirs. (Tables
    # from before this record was kept were scored on 10,000 images at 32 px; the folder was
    # recorded later still.)
    earlier = results.get("test", {"images": results["gray"]["images"], "image_size": 32} if results["rows"] else test_split)
    if any(earlier[key] != test_split[key] for key in earlier):
        parser.error(f"{results_path} holds rows scored on {earlier['images']} test images at {earlier['image_size']} px"
                     + (f" of {earlier['source']}" if "source" in earlier else "") + f"; this run's --data, --test-limit "
                     f"and --image-size give {len(test)} at {args.image_size} px of {test_split['source']}: use another --out")
    if not (args.report_only and "gray" in results):  # a redraw leaves the numbers as they are
        results["gray"], results["test"] = gray.result(), test_split
    Image.fromarray(np.concatenate(list(evaluate.gray_baseline(_grid_examples(test))), axis=1)).save(out / "ablation" / "_gray.png")
    Image.fromarray(np.concatenate(list(_grid_examples(test)), axis=1)).save(out / "ablation" / "_truth.png")
    lab = to_lab(train.rgb, torch.device(budget.device)) if chosen else None
    labels = torch.from_numpy(train.labels).to(budget.device) if any(v.model.classes for v in chosen) else None
    for variant in chosen:
        print(f"{variant.name}: training on {len(lab)} images x {budget.epochs} epochs on {hardware(budget.device)}", flush=True)
        rows = run_variant(variant, lab, test, budget, out, Path(args.weights_dir), labels)
        names = {r["variant"] for r in rows}
        results["rows"] = [r for r in results["rows"] if r["variant"] not in names and r["variant"].split(" ")[0] != variant.name] + rows
        order = {v.name: i for i, v in enumerate(VARIANTS)}
        results["rows"].sort(key=lambda r: (order.get(r["variant"].split(" ")[0], 99), r["variant"]))
        results_path.write_text(json.dumps(results, indent=2))
        write_report(results, out)
        for r in rows:
            print(f"  {r['variant']}: psnr {r['psnr']:.2f} ssim {r['ssim']:.4f} cf {r['colourfulness']:.2f} "
                  f"dcf {r['delta_colourfulness']:.2f} ({r['seconds']:.0f} s)", flush=True)
    refresh_strips(results, test, out)
    if not args.report_only:
        results_path.write_text(json.dumps(results, indent=2))
    write_report(results, out)
