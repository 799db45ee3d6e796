"""Data-parallel training of a colouriser with Ray Train.

The step itself is plain torch (:func:`colorize.objectives.train_step`); Ray Train
contributes only ``prepare_model``, ``get_dataset_shard``, ``report`` and ``get_checkpoint``
around it in :func:`train_loop_per_worker`. With ``gan_weight > 0`` a PatchGAN
discriminator trains beside the colouriser in the same loop, each with its own optimiser,
both under DDP. Calling :func:`train` again with the same ``out`` resumes from the last
checkpoint.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import re
import sys
import tempfile
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import ray
import ray.data
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train import (
    Checkpoint, CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig, TrainingFailedError,
    WorkerGroupError,
)
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.execution import context as train_execution_context
from torch import nn

from colorize import color, colorizer, data, errors, evaluate, metrics, plots, quantize, raycluster, storage
from colorize.models import (
    GAN_MIN_SIZE, MAX_IMAGE_SIZE, SEMANTIC_MIN_SIZE, ModelConfig, PatchDiscriminator, ab_bins, build_model, count_parameters,
    load_backbone, without_class_head,
)
from colorize.objectives import (
    PRECISIONS, Adversary, cosine_lr, recalibrate_batchnorm, resolve_precision, set_lr, train_step,
)

__all__ = ["TrainConfig", "train", "train_loop_per_worker", "train_step"]

RUN_NAME = "train"  # fixed, so that a second `train` with the same --out resumes
CHECKPOINT_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's list of the checkpoints it kept, in OUT/train
EXPORTED = ("model.pt", "curve.png", "grid.png", "state.json")  # what OUT/ gets of the last checkpoint
# What a checkpoint's model is: a run resumed with other values would keep training the old model.
ARCHITECTURE = ("model", "width", "depth", "image_size", "head", "attention", "semantic")
# What else shapes the training, which a resume may change, saying so.
LEARNING = ("data", "val", "limit", "batch_size", "lr", "loss", "rebalance", "gan_weight", "cf_weight", "psnr_weight",
            "num_workers", "precision", "seed")
# What a config's None means without --init (with it: the --init weights' own).
DEFAULT_ARCHITECTURE = {"model": "unet", "width": 32, "depth": 3, "image_size": 32, "head": "regression",
                        "attention": False, "temperature": ModelConfig.temperature}


class CheckpointError(ValueError):
    """The checkpoints in ``--out`` cannot be resumed from: a usage error (exit status 2), as
    bad data is, since the same command would only fail again."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs; written as ``config.json`` beside its outputs.

    ``batch_size`` is global: each of ``num_workers`` workers takes an equal share.
    ``cpus_per_worker=None`` picks a share that leaves a CPU for Ray Data's decode tasks.
    ``loss=None`` picks ``mse`` for the regression head and ``ce`` for classification;
    ``rebalance`` weighs the classes of ``ce`` by the inverse of their smoothed frequency.
    ``gan_weight > 0`` adds the PatchGAN term with that weight, ``cf_weight > 0`` the
    colourfulness-gap term (:func:`colorize.colorizer.colourfulness_gap`), ``psnr_weight > 0``
    minus the mean PSNR of the decoded ab (:func:`colorize.colorizer.psnr_loss`). ``precision``
    is one of :data:`colorize.objectives.PRECISIONS` (``auto``: bf16 autocast where the
    worker's device runs it fast). ``semantic`` gives the U-Net a semantic branch
    (``ModelConfig.classes``) trained on the images' classes (:func:`colorize.data.class_names`:
    CIFAR-10's, a Parquet ``label`` column, or class folders).

    ``init`` (a weights file, local or ``s3://``, or ``"bundled"``) fine-tunes that model: the
    architecture (``model``, ``width``, ``depth``, ``head``, ``attention`` and a semantic branch)
    is the file's, and those fields must be left as None or agree with it; ``image_size`` and
    ``temperature`` left as None are the file's too. :func:`resolve_init` fills them in. Without
    ``init``, None means the defaults: a U-Net of width 32, depth 3, at 32 px, regression head,
    no attention, temperature 0.38.
    """

    data: str
    out: str
    val: str | None = None
    init: str | None = None
    model: str | None = None
    width: int | None = None
    depth: int | None = None
    image_size: int | None = None
    head: str | None = None
    attention: bool | None = None
    semantic: bool = False
    temperature: float | None = None
    epochs: int = 10
    batch_size: int = 64
    lr: float = 2e-3
    loss: str | None = None
    rebalance: bool = True
    gan_weight: float = 0.0
    cf_weight: float = 0.0
    psnr_weight: float = 0.0
    num_workers: int = 1
    gpu: bool = False
    precision: str = "auto"
    cpus_per_worker: float | None = None
    limit: int | None = None
    val_limit: int = 1000
    max_failures: int = 2
    seed: int = 0
    s3_endpoint: str | None = None

    def __post_init__(self) -> None:
        if self.init is None:
            for name, default in DEFAULT_ARCHITECTURE.items():
                if getattr(self, name) is None:
                    object.__setattr__(self, name, default)
        elif self.init.strip() == "":
            raise ValueError("--init is empty: give a weights file, or 'bundled'")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {PRECISIONS}, got {self.precision!r}")
        terms = (("--gan-weight", self.gan_weight), ("--cf-weight", self.cf_weight), ("--psnr-weight", self.psnr_weight))
        for flag, weight in terms:
            if not (math.isfinite(weight) and weight >= 0):
                raise ValueError(f"{flag} must be a finite number >= 0, got {weight}")
        for name in ("epochs", "batch_size", "num_workers", "width", "depth", "image_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.batch_size < self.num_workers:
            raise ValueError(f"--batch-size {self.batch_size} is smaller than --num-workers {self.num_workers}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"--lr must be a finite number > 0, got {self.lr}")
        if self.cpus_per_worker is not None and not (math.isfinite(self.cpus_per_worker) and self.cpus_per_worker > 0):
            raise ValueError(f"--cpus-per-worker must be > 0, got {self.cpus_per_worker}")
        if self.max_failures < -1:
            raise ValueError(f"--max-failures must be -1 (retry forever) or more, got {self.max_failures}")
        if any(getattr(self, name) is None for name in DEFAULT_ARCHITECTURE):
            return  # the rest needs the model, which resolve_init reads from the --init weights
        if self.loss is None:
            object.__setattr__(self, "loss", "ce" if self.head == "classification" else "mse")
        if self.loss not in colorizer.LOSSES:
            raise ValueError(f"--loss must be one of {colorizer.LOSSES}, got {self.loss!r}")
        if self.model == "unet" and (self.loss == "ce") != (self.head == "classification"):
            raise ValueError(f"--loss {self.loss} does not fit --head {self.head}: ce is the classification head's loss")
        for flag, weight in terms:
            if weight and self.model != "unet":
                raise ValueError(f"{flag} needs --model unet, got --model {self.model}")
        if self.semantic and self.model != "unet":
            raise ValueError(f"--semantic needs --model unet, got --model {self.model}")
        if self.image_size > MAX_IMAGE_SIZE:
            raise ValueError(f"--image-size {self.image_size} is above {MAX_IMAGE_SIZE}, the largest working resolution")
        if self.image_size % 2**self.depth:
            raise ValueError(f"--image-size {self.image_size} must be divisible by 2**depth = {2**self.depth} (--depth {self.depth})")
        if self.image_size < 2 ** (self.depth + 1):
            raise ValueError(f"--image-size {self.image_size} at --depth {self.depth} leaves a 1x1 bottleneck, on which "
                             f"BatchNorm cannot train a batch of one: use at least {2 ** (self.depth + 1)}, or a smaller --depth")
        if self.val and self.image_size < metrics.SSIM_WINDOW:
            raise ValueError(f"--image-size {self.image_size} is below SSIM's {metrics.SSIM_WINDOW} px window, so --val "
                             f"could not be scored: use at least {metrics.SSIM_WINDOW}, or leave out --val")
        if self.gan_weight and self.image_size < GAN_MIN_SIZE:
            raise ValueError(f"--image-size {self.image_size} is too small for --gan-weight: its critic needs at least "
                             f"{GAN_MIN_SIZE}")
        if self.semantic and self.image_size < SEMANTIC_MIN_SIZE:
            raise ValueError(f"--image-size {self.image_size} is too small for --semantic: its branch needs at least "
                             f"{SEMANTIC_MIN_SIZE} to train a batch of one")
        self.model_config()  # validates arch, width, depth and image_size

    def model_config(self, classes: int = 0) -> ModelConfig:
        """The model to train; ``classes`` (found in the data) sizes a ``semantic`` model's class head."""
        return ModelConfig(
            arch=self.model, width=self.width, depth=self.depth, image_size=self.image_size,
            head=self.head, attention=self.attention, temperature=self.temperature, classes=classes,
        )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown training config keys: {sorted(unknown)}")
        return cls(**values)


def resolve_init(config: TrainConfig, init: ModelConfig) -> TrainConfig:
    """``config`` with the architecture of the model ``init`` that it fine-tunes; refuses an
    architecture field that contradicts it (fine-tuning cannot change a model's shape).

    The run's model decodes at ``init``'s temperature unless the run sets one, and at saturation
    1 whatever ``init``'s: a factor suits the colour of the model it was chosen for, not this one.
    """
    decided = {"model": init.arch, "width": init.width, "depth": init.depth, "head": init.head, "attention": init.attention}
    clashes = [f"--{name} (it has no {name})" if value is False else f"--{name} {getattr(config, name)} (it has {value})"
               for name, value in decided.items() if getattr(config, name) not in (None, value)]
    if clashes:
        raise ValueError(f"--init {config.init} fixes the model's architecture; leave out {', '.join(clashes)}")
    size = config.image_size or init.image_size
    if init.classes and size < SEMANTIC_MIN_SIZE:
        raise ValueError(f"--init {config.init} has a semantic branch, which needs --image-size {SEMANTIC_MIN_SIZE} or "
                         f"more to train a batch of one, got {size}")
    if init.pretrained:
        raise ValueError(f"--init {config.init} has a pretrained encoder ({init.pretrained}), which colorize train "
                         "does not build: fine-tune it with python -m jobs.photo_model")
    return replace(config, **decided, image_size=size, temperature=config.temperature or init.temperature)


@torch.inference_mode()
def validate(
    model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], *, limit: int, loss: str
) -> tuple[dict[str, float], list[tuple[str, np.ndarray]]]:
    """Loss and image metrics (next to the grey baseline) on up to ``limit`` images, and the
    semantic branch's accuracy where the batches have a ``label`` (-1: a class it does not know).

    Returns the metrics and the first few examples for a picture grid; with no readable
    image, only ``val_images`` (0) and ``val_unreadable``.
    """
    model.eval()
    loss_sum, seen, unreadable = 0.0, 0, 0
    right, labelled = 0, 0

    def truths() -> Iterator[np.ndarray]:
        nonlocal loss_sum, seen, unreadable, right, labelled
        for batch in batches:
            if seen >= limit:
                return
            keep = batch["ok"].bool()
            unreadable += int((~keep).sum())
            L, ab = batch["L"][keep][: limit - seen], batch["ab"][keep][: limit - seen]
            if len(L) == 0:
                continue
            loss_sum += float(colorizer.loss(model, L, ab, loss)) * len(L)
            if "label" in batch:
                labels = batch["label"][keep][: len(L)]
                known = labels >= 0
                _, logits = model(color.normalize_l(L), with_logits=True)
                right += int((logits.argmax(1) == labels)[known].sum())
                labelled += int(known.sum())
            seen += len(L)
            yield _to_uint8(color.lab_to_rgb(torch.cat((L, ab), dim=1)))

    try:
        model_metrics, gray_metrics, examples = evaluate.score(model, truths())
    except evaluate.NoImages:
        return {"val_images": 0, "val_unreadable": unreadable}, []
    kept = ("mse", "psnr", "ssim", "colourfulness", "colourfulness_truth", "delta_colourfulness")
    result = {f"val_{k}": v for k, v in model_metrics.items() if k in kept}
    result.update({f"gray_{k}": v for k, v in gray_metrics.items() if k in ("mse", "psnr", "ssim")})
    result["val_loss"] = loss_sum / seen
    result["val_images"] = seen
    if labelled:
        result["val_class_accuracy"] = right / labelled
    result["val_unreadable"] = unreadable
    return result, examples


def _to_uint8(rgb: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) float in [0, 1] -> (B, H, W, 3) uint8."""
    return color.to_uint8(rgb.permute(0, 2, 3, 1).float().cpu().numpy())


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """What each Ray Train worker runs: resume, then epochs of train, validate, checkpoint.

    ``loop_config`` holds the ``config`` (a :class:`TrainConfig` as a dict), the torch
    ``threads`` to run (the CPUs the worker reserved), for the classification head the
    ``class_weights`` the driver estimated, for a semantic branch the number of image ``classes``,
    and with ``--init`` the ``init`` weights (bytes) that a run with no checkpoint starts from.
    """
    config = TrainConfig.from_dict(loop_config["config"])
    raycluster.quiet_ray_data()  # the validation set's, which runs here
    # Each report's checkpoint and metrics in full, at INFO through a logger named by its file
    # (which Ray Train's own level, set in _trainer, does not reach).
    logging.getLogger(train_execution_context.__file__).setLevel(logging.WARNING)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    # As many torch threads as CPUs reserved: more would fight Ray Data's decode tasks for the
    # same cores (on 2 cores, 2 threads beside a decode task trained 9x slower than 1).
    torch.set_num_threads(loop_config.get("threads", 1))
    device = ray.train.torch.get_device()
    class_weights = loop_config.get("class_weights")
    class_weights = torch.tensor(class_weights, device=device) if class_weights else None

    torch.manual_seed(config.seed)  # the same initial weights on every worker and in every run of this seed
    model = build_model(config.model_config(loop_config.get("classes", 0)))
    discriminator = PatchDiscriminator() if config.gan_weight else None
    states, start_epoch, history, resumed_at = {}, 0, [], []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        model, states, state = _restore(checkpoint)
        # The temperature is how the head decodes, not what it is: this run's may differ.
        colorizer.set_decoding(model, temperature=config.temperature)
        start_epoch = _epochs_done(state)
        redo = start_epoch == state["epoch"]  # its last epoch took no step, and failed the run: do it again
        history = state["history"][:-1] if redo else state["history"]
        resumed_at = [*state.get("resumed_at", []), start_epoch]
        if rank == 0:
            _say(f"redoing epoch {start_epoch + 1}/{config.epochs}, which had no readable images" if redo
                 else f"resuming from the checkpoint of epoch {start_epoch}/{config.epochs}")
    elif loop_config.get("init"):
        start = colorizer.model_from_bytes(loop_config["init"])
        state = start.state_dict()
        if start.config.classes != model.config.classes:
            state = without_class_head(state)  # other classes: a fresh class head; the branch carries over
        load_backbone(model, state)
    if model.config.classes and not config.semantic:
        # A branch fine-tuned without --semantic: no labels reach its class head, and DDP
        # (which waits for every trainable parameter's gradient) would stop at the second step.
        model.classify.requires_grad_(False)
    precision = resolve_precision(config.precision, device)
    # Channels-last convolutions: what bf16 kernels want, and 1.06x to 1.6x faster in float32 on a CPU.
    model = ray.train.torch.prepare_model(model.to(memory_format=torch.channels_last))
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    adversary = None
    if discriminator is not None:
        if "discriminator" in states:
            discriminator.load_state_dict(states["discriminator"])
        discriminator = ray.train.torch.prepare_model(discriminator.to(memory_format=torch.channels_last))
        adversary = Adversary.training(discriminator, config.lr, config.gan_weight)
    if "optimizer" in states:
        optimizer.load_state_dict(states["optimizer"])
    if adversary is not None and "discriminator_optimizer" in states:
        adversary.optimizer.load_state_dict(states["discriminator_optimizer"])

    shard = ray.train.get_dataset_shard("train")
    # Fine-tuning: the --init weights' scores first, so the epochs' say whether it helps.
    fine_tuning = rank == 0 and config.val and loop_config.get("init") and not checkpoint
    before = _init_scores(model, config, device) if fine_tuning else {}
    for epoch in range(start_epoch, config.epochs):
        set_lr(cosine_lr(config.lr, epoch, config.epochs), optimizer, adversary)
        row = {"epoch": epoch + 1, "precision": precision,
               **_train_epoch(model, shard, optimizer, adversary, config, class_weights, device, world, precision,
                              shuffle_seed=_shuffle_seed(config.seed, epoch, rank))}
        examples: list[tuple[str, np.ndarray]] = []
        if rank == 0 and config.val:
            val_metrics, examples = _validate_on_val(model, config, device)
            row.update(val_metrics)
        if epoch == start_epoch:
            row.update(before)
        history.append(row)
        if rank == 0:
            _say(_progress_line(row, config.epochs))
        with tempfile.TemporaryDirectory() as directory:
            checkpoint = None
            if rank == 0:
                _write_checkpoint(Path(directory), model, optimizer, adversary, config, history, resumed_at, examples)
                checkpoint = Checkpoint.from_directory(directory)
            ray.train.report({k: v for k, v in row.items() if isinstance(v, (int, float))}, checkpoint=checkpoint)
        if not row["images"]:
            break  # nothing readable: the driver says so, rather than training epochs of nothing


def _shuffle_seed(seed: int, epoch: int, rank: int) -> int:
    """A worker's shuffle seed for one epoch: another order each epoch and on each worker."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def _ingest_options(*, preserve_order: bool) -> ray.data.ExecutionOptions:
    """Ray Train's default options for feeding a dataset to the workers, kept in order if asked."""
    with warnings.catch_warnings():  # Ray Train's own use of an option Ray Data deprecated, told to every user
        warnings.filterwarnings("ignore", message=r"`ExecutionOptions.exclude_resources` is deprecated")
        options = DataConfig.default_ingest_options()
    options.preserve_order = options.preserve_order or preserve_order
    return options


def _restore(checkpoint: Checkpoint) -> tuple[nn.Module, dict[str, dict], dict[str, Any]]:
    """The model, the optimiser and discriminator states, and ``state.json`` of a checkpoint."""
    states = {}
    with checkpoint.as_directory() as directory:
        model = colorizer.model_from_bytes(Path(directory, "model.pt").read_bytes())
        for name in ("optimizer", "discriminator", "discriminator_optimizer"):
            if Path(directory, f"{name}.pt").exists():
                # On the CPU: a run trained on GPUs may resume without them (load_state_dict then
                # moves each state to its parameter's device).
                states[name] = torch.load(Path(directory, f"{name}.pt"), map_location="cpu", weights_only=True)
        state = json.loads(Path(directory, "state.json").read_text())
    return model, states, state


# Batches that re-estimate BatchNorm statistics after each epoch: 8 forwards without gradients,
# next to an epoch of hundreds of steps. Held on the device: 8 x 256 images of 64 px are 32 MiB.
PRECISE_BN_BATCHES = 8


def _train_epoch(
    model: nn.Module,
    shard: ray.data.DataIterator,
    optimizer: torch.optim.Optimizer,
    adversary: Adversary | None,
    config: TrainConfig,
    class_weights: torch.Tensor | None,
    device: torch.device,
    world: int,
    precision: str,
    shuffle_seed: int,
) -> dict[str, Any]:
    """One pass over this worker's shard, shuffled within a window of batches as ``shuffle_seed``
    says; the epoch's figures, summed over all workers.

    BatchNorm's running statistics are then re-estimated from this worker's last
    :data:`PRECISE_BN_BATCHES` batches (:func:`~colorize.objectives.recalibrate_batchnorm`), so
    that validation and the checkpoint see the statistics of the weights they hold.
    """
    per_worker_batch = config.batch_size // world
    started = time.perf_counter()
    recent: deque[torch.Tensor] = deque(maxlen=PRECISE_BN_BATCHES)
    totals = torch.zeros(4, dtype=torch.float64)  # loss * n, images, skipped (unreadable), dropped
    lockstep = dist.is_available() and dist.is_initialized() and world > 1
    for batch in shard.iter_torch_batches(
        batch_size=per_worker_batch, device=device, local_shuffle_buffer_size=4 * per_worker_batch,
        local_shuffle_seed=shuffle_seed,
    ):
        keep = batch["ok"].bool()
        readable = int(keep.sum())
        totals[2] += len(keep) - readable
        if lockstep:
            # DDP steps in lockstep: a worker with nothing readable cannot join the step's gradient
            # all-reduce, and the others would wait for it forever. So either every worker steps or none.
            fewest = torch.tensor([readable], device=device)
            dist.all_reduce(fewest, op=dist.ReduceOp.MIN)
            if int(fewest) == 0:
                totals[3] += readable
                continue
        elif readable == 0:
            continue
        step = {name: batch[name][keep] for name in ("L", "ab", "label") if name in batch}
        recent.append(step["L"])
        value = float(train_step(model, step, optimizer, loss=config.loss, class_weights=class_weights, adversary=adversary,
                                 colourfulness_weight=config.cf_weight, psnr_weight=config.psnr_weight,
                                 precision=precision))
        totals[0] += value * readable
        totals[1] += readable
    recalibrate_batchnorm(colorizer.unwrap(model), recent)
    if dist.is_available() and dist.is_initialized():
        totals = totals.to(device)
        dist.all_reduce(totals)
        totals = totals.cpu()
    seconds = time.perf_counter() - started
    return {
        "train_loss": float(totals[0] / max(1.0, float(totals[1]))),
        "images": int(totals[1]),
        "skipped": int(totals[2]),
        "dropped": int(totals[3]),
        "seconds": round(seconds, 2),
        "images_per_second": round(float(totals[1]) / max(seconds, 1e-9), 1),
        "lr": optimizer.param_groups[0]["lr"],
    }


def _validate_on_val(model: nn.Module, config: TrainConfig, device: torch.device) -> tuple[dict[str, float], list]:
    """:func:`validate` on the ``--val`` set, by rank 0 alone: with the bare module, as a DDP
    forward would wait for collectives the other ranks never join."""
    batches = ray.train.get_dataset_shard("val").iter_torch_batches(batch_size=256, device=device)
    return validate(colorizer.unwrap(model), batches, limit=config.val_limit, loss=config.loss)


def _init_scores(model: nn.Module, config: TrainConfig, device: torch.device) -> dict[str, float]:
    """The ``--init`` weights' validation scores, said before the first epoch, as ``init_*``
    beside that epoch's. A fine-tune that only made the model worse said nothing of it."""
    scores, _ = _validate_on_val(model, config, device)
    if scores.get("val_images"):
        _say(f"before training, the --init weights:  {_val_text(scores)}")
    return {f"init_{name}": scores[name] for name in INIT_SCORES if name in scores}


# The --init weights' scores that the first epoch's row keeps, as init_val_psnr and so on.
INIT_SCORES = ("val_mse", "val_psnr", "val_ssim", "val_colourfulness", "val_delta_colourfulness")


def _say(line: str) -> None:
    """Print a progress line from a train worker once. Ray Train's print patch sends a plain
    print both to the worker's stdout and to its logger, and Ray forwards both to the driver."""
    print(line, file=sys.__stdout__ or sys.stdout, flush=True)


def _val_text(row: dict[str, Any]) -> str:
    return (f"val: mse {row['val_mse']:.5f} psnr {row['val_psnr']:.2f} dB ssim {row['val_ssim']:.3f} "
            f"cf {row['val_colourfulness']:.1f}/{row['val_colourfulness_truth']:.1f}  "
            f"(gray: mse {row['gray_mse']:.5f} psnr {row['gray_psnr']:.2f} dB)")


def _progress_line(row: dict[str, Any], epochs: int) -> str:
    line = (
        f"epoch {row['epoch']}/{epochs}  train_loss {row['train_loss']:.5f}  "
        f"{row['images']} images in {row['seconds']:.1f} s ({row['images_per_second']:.0f}/s, {row['precision']})"
    )
    if row["skipped"]:
        line += f"  skipped {row['skipped']} unreadable"
    if row.get("dropped"):
        line += f"  dropped {row['dropped']} readable (in steps where a worker had none)"
    if "val_psnr" in row:
        line += f"  {_val_text(row)}"
        if "val_class_accuracy" in row:
            line += f"  classes {100 * row['val_class_accuracy']:.1f}% right"
        if row.get("val_unreadable"):
            line += f"  val skipped {row['val_unreadable']} unreadable"
    elif row.get("val_images") == 0:
        line += f"  val: no readable images ({row['val_unreadable']} unreadable)"
    return line


def _write_checkpoint(
    directory: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    adversary: Adversary | None,
    config: TrainConfig,
    history: list[dict[str, Any]],
    resumed_at: list[int],
    examples: list[tuple[str, np.ndarray]],
) -> None:
    """Model, optimizer, progress and figures: everything needed to resume or inspect.

    ``resumed_at`` lists the epochs (0-based) at which this run picked up from a checkpoint.
    """
    (directory / "model.pt").write_bytes(colorizer.weights_bytes(model))
    torch.save(optimizer.state_dict(), directory / "optimizer.pt")
    if adversary is not None:
        torch.save(colorizer.unwrap(adversary.discriminator).state_dict(), directory / "discriminator.pt")
        torch.save(adversary.optimizer.state_dict(), directory / "discriminator_optimizer.pt")
    state = {"epoch": history[-1]["epoch"] - 1, "history": history, "resumed_at": resumed_at, "config": asdict(config)}
    (directory / "state.json").write_text(json.dumps(state, indent=2))
    # Validation's loss is the colour loss alone, unweighted; the training loss says what it adds.
    terms = [name for name, on in (("class", config.semantic), ("GAN", config.gan_weight), ("CF", config.cf_weight),
                                   ("PSNR", config.psnr_weight)) if on]
    label = ("rebalanced " if config.loss == "ce" and config.rebalance else "") + "train loss"
    train_curve = {label + (f" (+ {', '.join(terms)})" if terms else ""): [h["train_loss"] for h in history]}
    val = [h.get("val_loss", math.nan) for h in history] if "val_loss" in history[-1] else None
    title = f"{config.model} on {config.data}"
    if terms and val is not None:
        # The training loss carries terms the validation loss has not: different quantities,
        # often far apart (ce minus PSNR against ce alone), each gets its own axis.
        chart = plots.stacked([plots.line_chart(train_curve, title=title, size=(640, 260)),
                               plots.line_chart({"val loss (the colour loss alone)": val}, title="", size=(640, 240))])
    else:
        chart = plots.line_chart(train_curve if val is None else {**train_curve, "val loss": val}, title=title)
    chart.save(directory / "curve.png")
    if examples:
        plots.image_grid(examples).save(directory / "grid.png")


READ_TASK_CPUS = 1.0  # what one of Ray Data's read and decode tasks takes, its default


def default_cpus_per_worker(num_workers: int, gpu: bool, cluster_cpus: float | None = None) -> float:
    """A CPU share per worker that always leaves one CPU for Ray Data's read and decode tasks.

    On a small machine whole-CPU workers starve those tasks and the run stalls silently.
    ``cluster_cpus`` (default: the connected Ray's) of 0 is a cluster that starts its CPU
    nodes on demand (the head of cluster/'s manifests has none): one CPU each, not a share of
    nothing, which gave every worker a quarter CPU and one thread.
    """
    total = float(ray.cluster_resources().get("CPU", 0) if cluster_cpus is None else cluster_cpus)
    if gpu or total == 0:
        return 1.0
    share = (total - 1.0) / num_workers
    return max(0.25, min(1.0, math.floor(share * 4) / 4))


def estimate_class_weights(dataset: ray.data.Dataset, images: int = quantize.PRIOR_IMAGES) -> tuple[torch.Tensor, int]:
    """Rebalancing weights for the ab cells, from the colour prior of the first ``images`` of
    ``dataset``, and how many of them could be read."""
    read = 0

    def batches() -> Iterator[torch.Tensor]:
        nonlocal read
        for b in dataset.limit(images).iter_batches(batch_size=256, batch_format="numpy"):
            read += int(b["ok"].sum())
            yield torch.from_numpy(b["ab"][b["ok"]])

    return quantize.rebalance_weights(quantize.class_prior(batches(), ab_bins())), read


CLASS_WEIGHTS = "class_weights.json"  # in OUT/: the classification head's rebalancing weights, which a resume reuses


def _class_weights(config: TrainConfig, source: data.Source, fs: pafs.FileSystem, out: str,
                   earlier: dict[str, Any] | None) -> list[float] | None:
    """The rebalancing weights of a ``ce`` run (None for other runs): from the colour prior of
    the first training images, unaugmented and in the listing's order, so the same data gives
    the same weights; kept in ``OUT/`` and reused by a resume on the same data and size (they
    were drawn from augmented crops as blocks came, 4% apart run to run, 32% at --limit 64).
    The file names the data, the number of images and the size it was drawn from: a run
    between that did not rebalance may have changed them."""
    if config.loss != "ce" or not config.rebalance:
        return None
    path = storage.join(out, CLASS_WEIGHTS)
    images = min(config.limit or quantize.PRIOR_IMAGES, quantize.PRIOR_IMAGES)  # the first of one seeded listing
    drawn_from = {"data": config.data.rstrip("/"), "images": images, "image_size": config.image_size}
    if earlier is not None and storage.exists(fs, path):
        kept = json.loads(storage.read_bytes(fs, path))
        if kept.get("drawn_from") == drawn_from:
            return kept["weights"]
    plain = data.lab_dataset(source, image_size=config.image_size, augment=False, limit=images)
    try:
        weights, read = estimate_class_weights(plain, images)
    except quantize.NoPixels:
        raise data.DataError(f"{config.data}: no readable images among the first {images:,}, "
                             "where the classification head's colour prior comes from") from None
    storage.write_json(fs, path, {"drawn_from": drawn_from, "images": read, "weights": weights.tolist()})
    return weights.tolist()


def _earlier_run(fs: pafs.FileSystem, out: str) -> tuple[dict[str, Any], dict[str, Any] | None, str | None] | None:
    """The config of the run whose checkpoints are in ``out``, the state of its last
    registered checkpoint and that checkpoint's folder (else ``OUT/state.json``'s, with no
    folder; else None, None); None where there is no checkpoint to resume."""
    if not _checkpoint_folders(fs, out):
        return None
    try:
        earlier = json.loads(storage.read_bytes(fs, storage.join(out, "config.json")))
    except (storage.StorageError, ValueError):
        return None
    latest = _registered_checkpoints(fs, out)[-1:]
    for folder, state_path in [(c, storage.join(c, "state.json")) for c in latest] + [(None, storage.join(out, "state.json"))]:
        if storage.exists(fs, state_path):
            return earlier, json.loads(storage.read_bytes(fs, state_path)), folder
    return earlier, None, None


def _epochs_done(state: dict[str, Any] | None) -> int:
    """The epochs a checkpoint's state holds; its last does not count where it read no image
    (the run failed on it, and a resume does it again)."""
    if state is None:
        return 0
    return state["epoch"] + (0 if state["history"][-1]["images"] == 0 else 1)


def _checkpoint_folders(fs: pafs.FileSystem, out: str) -> list[str]:
    """Every ``checkpoint_*`` folder in ``OUT/train``, registered with Ray Train or not."""
    run_dir = storage.join(out, RUN_NAME)
    if fs.get_file_info(run_dir).type != pafs.FileType.Directory:
        return []
    return [e.path for e in fs.get_file_info(pafs.FileSelector(run_dir))
            if e.type == pafs.FileType.Directory and e.base_name.startswith("checkpoint_")]


def _registered_checkpoints(fs: pafs.FileSystem, out: str) -> list[str]:
    """The checkpoint folders Ray Train kept, oldest first, from its snapshot; [] without one."""
    run_dir = storage.join(out, RUN_NAME)
    try:
        snapshot = json.loads(storage.read_bytes(fs, storage.join(run_dir, CHECKPOINT_SNAPSHOT)))
        return [storage.join(run_dir, c["checkpoint_dir_name"]) for c in snapshot["checkpoint_results"]]
    except (storage.StorageError, ValueError, KeyError, TypeError):
        return []


def _drop_unusable_checkpoints(fs: pafs.FileSystem, out: str) -> None:
    """Take the checkpoints that cannot be resumed from out of Ray Train's snapshot, saying so:
    any whose folder is gone, and the newest while unreadable. A resume then starts from the
    last good one.

    Ray refuses a snapshot that names a missing folder, in a traceback from its controller, on
    every later run; a model.pt cut short failed each worker restart alike, then the run, and
    its rerun. Checkpoint folders without a snapshot are a run's stopped before Ray registered
    its first (deleted by the next run that ends); with an epoch exported to ``OUT/``, the
    snapshot was lost, and they are refused: Ray would train from epoch 1, then delete them.
    """
    folders = set(_checkpoint_folders(fs, out))
    run_dir = storage.join(out, RUN_NAME)
    where = storage.to_uri(fs, run_dir)
    path = storage.join(run_dir, CHECKPOINT_SNAPSHOT)
    try:
        snapshot = json.loads(storage.read_bytes(fs, path))
        results = list(snapshot["checkpoint_results"])
    except (storage.StorageError, ValueError, KeyError, TypeError):
        if not folders:
            return
        if storage.exists(fs, path):
            why = f"its {CHECKPOINT_SNAPSHOT}, Ray Train's list of them, cannot be read"
        elif storage.exists(fs, storage.join(out, "state.json")):
            why = f"no {CHECKPOINT_SNAPSHOT}, Ray Train's list of them"
        else:
            return
        raise CheckpointError(f"{where} holds {len(folders)} checkpoint folder(s) but {why}, so none can be resumed "
                             "from and a run would delete them; move that folder aside, or delete it, to train from the start") from None
    dropped = [(r["checkpoint_dir_name"], "its folder is gone") for r in results
               if storage.join(run_dir, r["checkpoint_dir_name"]) not in folders]
    kept = [i for i, r in enumerate(results) if storage.join(run_dir, r["checkpoint_dir_name"]) in folders]
    while kept:
        name = results[kept[-1]]["checkpoint_dir_name"]
        why = _unusable(fs, storage.join(run_dir, name))
        if why is None:
            break
        dropped.append((name, why))
        kept.pop()
    if not dropped:
        return
    if not kept:
        raise CheckpointError(f"{where}: no checkpoint there can be resumed from ({dropped[-1][0]}: {dropped[-1][1]}); "
                             "move that folder aside, or delete it, to train from the start")
    indices = snapshot.get("checkpoint_report_indices")
    if isinstance(indices, list) and len(indices) == len(results):
        snapshot["checkpoint_report_indices"] = [indices[i] for i in kept]
    snapshot["checkpoint_results"] = [results[i] for i in kept]
    snapshot["latest_checkpoint_result"] = results[kept[-1]]
    storage.write_json(fs, path, snapshot)
    for name, why in dropped:
        print(f"leaving out checkpoint {name} ({why}): resuming from {results[kept[-1]]['checkpoint_dir_name']}", flush=True)


def _unusable(fs: pafs.FileSystem, folder: str) -> str | None:
    """Why a checkpoint folder cannot be resumed from (gone, a file missing or unreadable); None if it can."""
    if not storage.exists(fs, folder):
        return "its folder is gone"
    for name in ("model.pt", "state.json"):
        if not storage.exists(fs, storage.join(folder, name)):
            return f"no {name}"
    try:  # S3 that cannot be reached raises a StorageError here, as it should: the checkpoint may be fine
        raws = {"model.pt": storage.read_bytes(fs, storage.join(folder, "model.pt"))}
        colorizer.model_from_bytes(raws["model.pt"])
        json.loads(storage.read_bytes(fs, storage.join(folder, "state.json")))["history"][-1]
        for name in ("optimizer.pt", "discriminator.pt", "discriminator_optimizer.pt"):  # as _restore reads them
            if storage.exists(fs, storage.join(folder, name)):
                raws[name] = storage.read_bytes(fs, storage.join(folder, name))
                torch.load(io.BytesIO(raws[name]), map_location="cpu", weights_only=True)
        # torch never checks the parts' checksums: a file with flipped bits loads.
        damaged = next(((name, part) for name, raw in raws.items() if (part := colorizer.damaged_part(raw))), None)
        if damaged is not None:
            return f"unreadable: the checksum of {damaged[0]}'s part {damaged[1]!r} does not match"
    except storage.StorageError:
        raise
    except Exception as error:  # noqa: BLE001 - a file cut short fails in torch, pickle or json, in many ways
        return f"unreadable: {errors.one_line(error)}"
    return None


def _remove_unregistered_checkpoints(fs: pafs.FileSystem, out: str) -> None:
    """Delete the checkpoint folders Ray Train never registered: a run stopped or a worker
    lost within seconds of writing one leaves it (23 MB for the default model), and Ray's
    retention (``num_to_keep``) deletes only the checkpoints it knows."""
    kept = set(_registered_checkpoints(fs, out))
    if not kept:  # no snapshot: nothing says which are stray
        return
    stray = [folder for folder in _checkpoint_folders(fs, out) if folder not in kept]
    for folder in stray:
        with contextlib.suppress(OSError):
            fs.delete_dir(folder)
    if stray:
        print(f"removed {len(stray)} checkpoint folder(s) that Ray Train never registered, left by a stopped run or a lost "
              "worker", flush=True)


def _export(fs: pafs.FileSystem, out: str, read: Callable[[str], bytes | None]) -> None:
    """Copy a checkpoint's model, plots and state to ``OUT/``; ``read(name)`` gives a file's bytes, or None.

    A file the checkpoint lacks is deleted from ``OUT/``: a run resumed without ``--val`` has no
    ``grid.png``, and the earlier run's would show an older model's colours.
    """
    for name in EXPORTED:
        content = read(name)
        if content is not None:
            storage.write_bytes_atomic(fs, storage.join(out, name), content)
        else:
            storage.delete(fs, storage.join(out, name))


def _check_resume(config: TrainConfig, earlier: dict[str, Any]) -> None:
    """Refuse to resume a checkpoint into a model of another shape."""
    changed = _changed(config, earlier, ARCHITECTURE)
    if changed:
        hint = f" (--init {earlier['init']})" if earlier.get("init") and not config.init else ""
        raise ValueError(
            f"{config.out} holds checkpoints of another model ({changed}): resume with the same "
            f"settings{hint}, or train into a new --out"
        )


def _changed(config: TrainConfig, earlier: dict[str, Any], names: Iterable[str]) -> str:
    """The settings of ``names`` that differ from the earlier run's config, as ``--lr 0.002 -> 0.001; ...``."""
    return "; ".join(f"--{name.replace('_', '-')} {earlier.get(name)} -> {getattr(config, name)}"
                     for name in names if name in earlier and earlier[name] != getattr(config, name))


def _classes(config: TrainConfig, source: data.Source, earlier: dict[str, Any] | None) -> list[str]:
    """The image classes a ``semantic`` run learns (none for other runs), the same as the run it resumes."""
    if not config.semantic:
        return []
    classes = list(data.class_names(source))
    if len(classes) < 2:
        raise data.DataError(f"{config.data}: --semantic needs images of at least two classes, found {classes}")
    if earlier and earlier.get("classes", classes) != classes:
        raise ValueError(f"{config.out} holds checkpoints of a model of {len(earlier['classes'])} classes, but {config.data} "
                         f"has {len(classes)} ({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''}): resume on the "
                         "same classes, or train into a new --out")
    return classes


def _check_resources(config: TrainConfig, cpus: float) -> None:
    """On a Ray this process started, refuse a request it can never meet (the run would wait forever).

    A cluster found through RAY_ADDRESS may add nodes on demand, so it is not checked.
    """
    have = ray.cluster_resources()
    if config.gpu and have.get("GPU", 0) < config.num_workers:
        raise ValueError(f"--gpu with {config.num_workers} worker(s) needs as many GPUs; this machine has {int(have.get('GPU', 0))}")
    # Ray Data's read and decode tasks take a whole CPU each: with none left they never start,
    # and the workers wait for data for ever.
    need = config.num_workers * cpus + READ_TASK_CPUS
    if need > have.get("CPU", 0):
        raise ValueError(
            f"{config.num_workers} worker(s) x {cpus:g} CPUs and {READ_TASK_CPUS:g} for Ray Data's read tasks need {need:g} "
            f"CPUs; this machine's Ray has {have.get('CPU', 0):g} (lower --cpus-per-worker or --num-workers"
            + ("; with no more than 1 CPU, none is left for the workers)" if have.get("CPU", 0) <= 1 else ")")
        )


def train(config: TrainConfig) -> dict[str, Any]:
    """Run (or resume) training; returns the last epoch's metrics and where the model went."""
    settings = storage.S3Settings.from_env(config.s3_endpoint)
    out_fs, out_path = storage.resolve(config.out, settings)
    storage.check_output(out_fs, out_path, config.out, "--out", settings)
    with storage.output_lock(out_fs, out_path, config.out, "--out", settings) as lock:
        return _train(config, settings, out_fs, out_path, lock)


def _train(config: TrainConfig, settings: storage.S3Settings, out_fs: pafs.FileSystem, out_path: str,
           lock: storage.OutputLock) -> dict[str, Any]:
    init = None
    if config.init:
        init, init_id = colorizer.load_weights(config.init, settings)
        config = resolve_init(config, init.config)
    lock.acquire_if_there()  # an earlier run's checkpoints are read, and may be deleted
    _drop_unusable_checkpoints(out_fs, out_path)  # before anything reads the last one
    earlier = _earlier_run(out_fs, out_path)
    if earlier is not None:
        _check_resume(config, earlier[0])
        _, state, checkpoint = earlier
        done = _epochs_done(state)
        changed = _changed(config, earlier[0], LEARNING)
        if changed and done < config.epochs:
            print(f"resuming with settings other than the last run's ({changed}); the history so far "
                  "was trained with the earlier ones", flush=True)
        if done >= config.epochs:
            print(f"{config.out} has already trained {done} epoch(s), --epochs {config.epochs}: "
                  "nothing to do (a larger --epochs trains on, along the cosine schedule of the new total)", flush=True)
            _remove_unregistered_checkpoints(out_fs, out_path)
            if checkpoint is not None:  # OUT/ may hold an earlier epoch's model, where a run stopped after this checkpoint
                _export(out_fs, out_path, lambda name: storage.read_bytes(out_fs, storage.join(checkpoint, name))
                        if storage.exists(out_fs, storage.join(checkpoint, name)) else None)
            return _summary(out_fs, out_path, state)
    train_source = data.locate(config.data, settings=settings, limit=config.limit, output=config.out)
    if train_source.kind == "files" and len(train_source.files) < config.num_workers:
        raise data.DataError(f"{config.data}: {len(train_source.files)} image(s) for {config.num_workers} workers: each epoch "
                             f"splits the images equally among the workers; use --num-workers {len(train_source.files)}")
    val_source = data.locate(config.val, settings=settings, limit=config.val_limit, split="test", output=config.out) if config.val else None
    classes = _classes(config, train_source, earlier[0] if earlier else None)
    # The model's classes: the data's for --semantic; else an --init model's semantic branch
    # stays, trained by the colour loss alone.
    model_classes = len(classes) or (init.config.classes if init is not None else 0)
    class_index = {name: label for label, name in enumerate(classes)} if classes else None
    started_here = raycluster.connect(log_to_driver=True, through_client=True)
    # Ray Data's bars, drawn by the workers' data streams, are hundreds of lines in a log file.
    ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()
    cpus = config.cpus_per_worker or default_cpus_per_worker(config.num_workers, config.gpu)
    if started_here:
        _check_resources(config, cpus)  # before anything is written or sampled
    datasets = _datasets(config, train_source, val_source, class_index)
    lock.acquire()  # a new --out: before its first write
    _remove_unregistered_checkpoints(out_fs, out_path)  # a stopped run's: else each stop would leave its last one or two
    class_weights = _class_weights(config, train_source, out_fs, out_path, earlier[0] if earlier else None)
    # The class names beside the config: what a resumed run checks its data against.
    storage.write_json(out_fs, storage.join(out_path, "config.json"), {**asdict(config), **({"classes": classes} if classes else {})})
    params = count_parameters(build_model(config.model_config(model_classes)))
    start = f", from {config.init} ({init_id}, {init.config.image_size} px)" if init is not None else ""
    branch = f" with a semantic branch over {model_classes} classes" if model_classes else ""
    if model_classes and not classes:
        branch += " (no --semantic: the colour loss alone trains it)"
    print(
        f"training {config.model}{branch} ({params / 1e6:.2f} M parameters{start}) at {config.image_size} px on {config.data} with "
        f"{config.num_workers} worker(s), {cpus} CPU{' + 1 GPU' if config.gpu else ''} each; "
        f"checkpoints in {storage.to_uri(out_fs, storage.join(out_path, RUN_NAME))}",
        flush=True,
    )
    loop_config = {"config": asdict(config), "class_weights": class_weights, "threads": max(1, int(cpus)),
                   "classes": model_classes, "init": colorizer.weights_bytes(init) if init is not None else None}
    result = _fit(_trainer(config, loop_config, datasets, cpus, out_fs, out_path), config)
    _remove_unregistered_checkpoints(out_fs, out_path)
    if result.checkpoint is None:
        raise RuntimeError(f"training finished without a checkpoint in {config.out}")
    with result.checkpoint.as_directory() as directory:
        state = _last_state(Path(directory), config)
        _export(out_fs, out_path, lambda name: Path(directory, name).read_bytes() if Path(directory, name).exists() else None)
    return _summary(out_fs, out_path, state)


def _datasets(config: TrainConfig, train_source: data.Source, val_source: data.Source | None,
              class_index: dict[str, int] | None) -> dict[str, ray.data.Dataset]:
    """The training set, augmented, and any validation set."""
    datasets = {
        "train": data.lab_dataset(
            train_source, image_size=config.image_size, augment=True, limit=config.limit, class_index=class_index
        )
    }
    if val_source:
        datasets["val"] = data.lab_dataset(
            val_source, split="test", image_size=config.image_size, augment=False, limit=config.val_limit,
            class_index=class_index,
        )
    return datasets


def _trainer(config: TrainConfig, loop_config: dict[str, Any], datasets: dict[str, ray.data.Dataset], cpus: float,
             out_fs: pafs.FileSystem, out_path: str) -> TorchTrainer:
    """The data-parallel run; its checkpoints go under OUT/train, and the same OUT resumes it."""
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=config.num_workers, use_gpu=config.gpu, resources_per_worker={"CPU": cpus}
        ),
        datasets=datasets,
        # In order where a limit picks the rows (--limit; --val-limit always): the same subset
        # every epoch, not whichever read tasks finish first (Train replaces each dataset's own options).
        dataset_config=DataConfig(datasets_to_split=["train"], execution_options={
            "train": _ingest_options(preserve_order=config.limit is not None), "val": _ingest_options(preserve_order=True),
        }),
        run_config=RunConfig(
            name=RUN_NAME,
            storage_path=out_path,
            storage_filesystem=out_fs,
            failure_config=FailureConfig(max_failures=config.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            # Ray Train's own INFO lines (resources requested, each checkpoint, each report's
            # metrics in full) outnumbered the epoch lines 6 to 1; its warnings and errors stay.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )


def _fit(trainer: TorchTrainer, config: TrainConfig) -> ray.train.Result:
    """``trainer.fit()``, its failures and interruptions in a line that says how to resume."""
    try:
        result = trainer.fit()
    except SystemExit:
        # Ray Train's own Ctrl-C handler aborts the run, and fit() then ends in SystemExit(1).
        raise KeyboardInterrupt(f"the same command resumes from the last checkpoint in {config.out}") from None
    except TrainingFailedError as failure:
        raise errors.Failed(f"{_why(failure, config.max_failures)}; the same command resumes from the last checkpoint "
                            f"in {config.out}, if one was written") from None
    return result


def _last_state(checkpoint: Path, config: TrainConfig) -> dict[str, Any]:
    """The last checkpoint's state; an error where its last epoch trained on no image."""
    try:
        state = json.loads((checkpoint / "state.json").read_text())
    except FileNotFoundError:  # another run's cleanup deleted it
        raise errors.Failed(f"{config.out}: the last checkpoint's state.json is gone; is another `train` writing "
                            "to the same --out? One run per --out at a time") from None
    last = state["history"][-1]
    if last["images"] == 0:
        why = f"{last['skipped']} unreadable"
        if last.get("dropped"):
            why += (f"; the {last['dropped']} readable ones never came in a step where each of the {config.num_workers} "
                    "workers had one: try fewer --num-workers")
        elif not last["skipped"] and config.num_workers > 1:  # Parquet of fewer rows than workers
            why += f"; are there fewer than the {config.num_workers} --num-workers, which each take an equal share?"
        raise data.DataError(f"{config.data}: no readable training images in epoch {last['epoch']} ({why})")
    return state


# A worker's error that only says a peer went away: the peer's own error says why.
_PEER_GONE = re.compile(r"gloo|nccl|connection (closed|reset) by peer", re.IGNORECASE)


def _why(failure: TrainingFailedError, max_failures: int) -> str:
    """A failed run in one line: what the failing worker (or Ray Train itself) raised, out of
    Ray's wrappings; of several workers, the lowest rank whose error is not only that a peer
    went away (rank 0's "Connection closed by peer" when rank 1 died)."""
    restarts = f" after {max_failures} restart(s) (--max-failures)" if max_failures > 0 else ""
    if isinstance(failure, WorkerGroupError) and failure.worker_failures:
        failures = sorted((rank, errors.innermost(error)) for rank, error in failure.worker_failures.items())
        rank, error = next(((r, e) for r, e in failures if not _PEER_GONE.search(errors.one_line(e))), failures[0])
        return f"training failed{restarts}: worker {rank}: {errors.one_line(error)}"
    cause = getattr(failure, "controller_failure", failure)
    return f"training failed{restarts}: {errors.one_line(cause)}"


def _summary(fs: pafs.FileSystem, out: str, state: dict[str, Any]) -> dict[str, Any]:
    return {**state["history"][-1], "resumed_at": state["resumed_at"], "model": storage.to_uri(fs, storage.join(out, "model.pt"))}
