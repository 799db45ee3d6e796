"""The ``colorize`` command: parses arguments into a config and calls one library function."""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from colorize import errors, storage, submit
from colorize.options import ARCHITECTURES, HEADS, LOSSES, MAX_PIXELS, MAX_SATURATION, PRECISIONS

EXIT_FAILED = 1  # a run that started failed (training lost its workers more often than --max-failures)
EXIT_USAGE = 2  # bad arguments or unusable input: nothing was done
EXIT_SOME_FAILED = 3  # `run` finished but some inputs are listed in failed/
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: stdout's reader left (| head), as a shell reports it
S3_ENDPOINT_HELP = "S3-compatible endpoint URL (default: $AWS_ENDPOINT_URL_S3, else $AWS_ENDPOINT_URL, else AWS)"
SATURATION_HELP = ("multiply the predicted chroma by X, in [0, 4]: above 1 more vivid and less faithful (1.6 matches "
                   "CIFAR-10's colourfulness for 1.4 dB of PSNR), 0 grey (default: the model's own, 1 for the bundled model)")
FLIP_AVERAGE_HELP = ("average each image's chroma with its mirror image's: a little more fidelity, a little less "
                     "colour, twice the model's work (default: off)")


class _Once(argparse._StoreAction):
    """A flag with one value, refused when given twice (argparse would keep the last one
    silently: ``run --input a --input b`` would colour b alone)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:  # noqa: ANN001
        given = namespace.__dict__.setdefault(_GIVEN, set())
        if self.dest in given:
            parser.error(f"{option_string} was given twice; it takes one value")
        given.add(self.dest)
        super().__call__(parser, namespace, values, option_string)


_GIVEN = "_flags_given"


class _Parser(argparse.ArgumentParser):
    """argparse, with :class:`_Once` for every plain flag, and errors that name a mistyped flag
    (``--ouptut: did you mean --output?``); subcommands inherit it."""

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        self.register("action", None, _Once)
        self.register("action", "store", _Once)
        self._argv: list[str] = []

    def parse_known_args(self, args=None, namespace=None):  # noqa: ANN001, ANN201
        self._argv = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        # A command's own parser knows every flag it was given, unless it passes the rest on (submit).
        if self._subparsers is None and all(action.nargs != argparse.REMAINDER for action in self._actions):
            known = [flag for action in self._actions for flag in action.option_strings]
            own = self._argv[: self._argv.index("--")] if "--" in self._argv else self._argv
            given = [token.split("=", 1)[0] for token in own if token.startswith("--")]
            # argparse takes any unique abbreviation: --out for --output
            unknown = [flag for flag in given if not any(k.startswith(flag) for k in known)]
            if unknown:
                close = difflib.get_close_matches(unknown[0], known, n=1)
                message += f" ({unknown[0]}: did you mean {close[0]}?)" if close else f" ({unknown[0]} is not one of its flags)"
        super().error(message)


def positive_int(text: str, least: int = 1) -> int:
    """An argparse type: a whole number of at least ``least`` (the benchmarks' counts use it too)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
    return value


def _seed(text: str) -> int:
    """An argparse type: a whole number from 0 to 2**32 - 1, as numpy's legacy and torch's CUDA seeds are."""
    value = positive_int(text, least=0)
    if value >= 2**32:
        raise argparse.ArgumentTypeError(f"must be below 2**32 = {2**32}, got {value}")
    return value


def _number_in(low: float, high: float, *, low_open: bool = False) -> Callable[[str], float]:
    """An argparse type for a number in [low, high], or (low, high] with ``low_open``; NaN is refused."""
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (low < value if low_open else low <= value) or not value <= high:  # NaN fails both
            raise argparse.ArgumentTypeError(f"must be in {interval}, got {text}")
        return value

    return parse


_temperature = _number_in(0, 1, low_open=True)
_saturation = _number_in(0, MAX_SATURATION)


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a colouriser with Ray Train (data-parallel, checkpointed, resumable)",
        description="Train a colouriser on Ray Train. Running it again with the same --out resumes "
        "from the last checkpoint.",
    )
    p.add_argument("--data", required=True, help="training images: a folder (any nesting), Parquet shards with an "
                   "'image' bytes column (a folder of them, or a pattern such as 'DIR/train-*.parquet'), or the "
                   "CIFAR-10 python release (.tar.gz or extracted); local or s3://")
    p.add_argument("--out", required=True, help="folder or s3:// prefix for checkpoints, model.pt, curve.png, grid.png")
    p.add_argument("--val", help="validation images, same forms as --data (CIFAR-10 python: its test batch)")
    p.add_argument("--init", metavar="WEIGHTS",
                   help="fine-tune this model: a model.pt (local or s3://) or 'bundled'; its architecture is kept, so "
                   "--model, --width, --depth, --head and --attention are left out (default: a new model)")
    p.add_argument("--model", choices=ARCHITECTURES, help="architecture (default: unet)")
    p.add_argument("--width", type=positive_int, help="channels of the first stage (default: 32)")
    p.add_argument("--depth", type=positive_int, help="downsampling stages (default: 3)")
    p.add_argument("--image-size", type=positive_int,
                   help="square training resolution in px, at most 1024 (default: 32, or --init's)")
    p.add_argument("--head", choices=HEADS,
                   help="predict ab directly, or a distribution over ab cells (default: regression)")
    p.add_argument("--attention", action="store_true", default=None, help="self-attention at the U-Net's bottleneck")
    p.add_argument("--semantic", action="store_true",
                   help="add a semantic branch that learns each image's class and feeds it to the colouriser: "
                   "CIFAR-10's classes, a Parquet 'label' column, or top-level class folders (ImageNet's layout)")
    p.add_argument("--temperature", type=_temperature,
                   help="annealed-mean temperature the classification head decodes with (default: 0.38, or --init's)")
    p.add_argument("--epochs", type=positive_int, default=10, help="epochs to train in total (default: 10)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="global batch size (default: 64)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak Adam learning rate, cosine-decayed (default: 2e-3)")
    p.add_argument("--loss", choices=LOSSES,
                   help="mse, l1, huber or psnr (per-image log error) for the regression head; ce for classification (default: mse or ce)")
    p.add_argument("--no-rebalance", dest="rebalance", action="store_false",
                   help="plain cross-entropy: do not weigh rare colours up (classification head)")
    p.add_argument("--gan-weight", type=float, default=0.0,
                   help="weight of a PatchGAN adversarial term trained in the same loop (default: 0, off)")
    p.add_argument("--cf-weight", type=float, default=0.0,
                   help="weight of a term matching each image's colourfulness to its truth's (default: 0, off)")
    p.add_argument("--psnr-weight", type=float, default=0.0,
                   help="weight of minus the mean PSNR (dB) of the decoded ab beside the loss: with the classification "
                   "head, asks its annealed mean to be faithful too (default: 0, off)")
    p.add_argument("--num-workers", type=positive_int, default=1, help="Ray Train workers (default: 1)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker (NCCL)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="bf16 autocast or float32; auto: bf16 on GPUs with bf16 units (Ampere on) and on CPUs with "
                   "bf16 instructions (AVX-512 BF16, AMX), where a step is 1.9x faster than float32 for the default "
                   "model (2.7x at the bundled model's shape), else float32 (default: auto)")
    p.add_argument("--cpus-per-worker", type=float, help="CPUs reserved per worker (default: leave one CPU for data)")
    p.add_argument("--limit", type=positive_int, help="use only N training images (smoke tests; a seeded subset of a folder, the first N of Parquet or CIFAR-10)")
    p.add_argument("--val-limit", type=positive_int, default=1000, help="validation images per epoch (default: 1000)")
    p.add_argument("--max-failures", type=int, default=2, help="worker failures to recover from; -1 retries forever (default: 2)")
    p.add_argument("--seed", type=_seed, default=0,
                   help="seeds the model's initial weights and each worker's shuffle; crops and flips are drawn afresh "
                   "each run (default: 0)")
    p.add_argument("--s3-endpoint", help=S3_ENDPOINT_HELP)
    p.set_defaults(handler=_train, build_config=_train_config)


def _train_config(args: argparse.Namespace):  # noqa: ANN202 - the import stays lazy
    from colorize.train import TrainConfig

    return TrainConfig.from_dict(_config_values(args))


def _train(args: argparse.Namespace) -> int:
    from colorize.train import train

    print(json.dumps(train(_train_config(args)), indent=2))
    return 0


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="PSNR, SSIM and colourfulness of a model next to the grey baseline",
        description="Colour the lightness of each image with a model and compare with the original, next to "
        "the grey baseline (601 luma copied to R, G, B). Prints JSON.",
    )
    p.add_argument("--data", required=True, help="test images, same forms as `train --data` (CIFAR-10 python: its test batch; a folder or "
                   "Parquet folder is read whole, with a warning naming the test split where it holds a training one)")
    p.add_argument("--weights", help="a model.pt from `train`, local or s3://, or 'bundled' (the default)")
    p.add_argument("--limit", type=positive_int, help="evaluate only N files, unreadable ones included (a seeded subset of a folder, the first N of Parquet or CIFAR-10)")
    p.add_argument("--out", help="folder or s3:// prefix for metrics.json and grid.png")
    p.add_argument("--batch-size", type=positive_int, default=256, help="images per model call (default: 256)")
    p.add_argument("--temperature", type=_temperature,
                   help="annealed-mean temperature for a classification head (default: the model's own)")
    p.add_argument("--saturation", type=_saturation, metavar="X", help=SATURATION_HELP)
    p.add_argument("--flip-average", action="store_true", help=FLIP_AVERAGE_HELP)
    p.add_argument("--s3-endpoint", help=S3_ENDPOINT_HELP)
    p.set_defaults(handler=_evaluate, build_config=_evaluate_config)


def _evaluate_config(args: argparse.Namespace):  # noqa: ANN202
    from colorize.evaluate import EvaluateConfig

    return EvaluateConfig(**_config_values(args))


def _evaluate(args: argparse.Namespace) -> int:
    from colorize.evaluate import evaluate

    print(json.dumps(evaluate(_evaluate_config(args)), indent=2))
    return 0


def _add_probe(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "probe",
        help="linear probe: class accuracy from the frozen encoder's features vs a random encoder",
        description="Colourisation as a pretext task: train a linear classifier on the frozen encoder's "
        "features (each stage average-pooled) and report test accuracy next to the same probe on a randomly "
        "initialised encoder. Prints JSON.",
    )
    p.add_argument("--data", required=True, help="a local folder with train/ and test/ class folders (CIFAR-10 as JPEGs)")
    p.add_argument("--weights", help="a model.pt from `train`, local or s3://, or 'bundled' (the default)")
    p.add_argument("--limit", type=positive_int, help="a seeded subset of N training images")
    p.add_argument("--test-limit", type=positive_int, help="a seeded subset of N test images")
    p.add_argument("--epochs", type=positive_int, default=30, help="probe training epochs (default: 30)")
    p.add_argument("--seed", type=int, default=0, help="seed for subsets, the random encoder and the probe")
    p.add_argument("--out", help="folder for probe.json (local or s3://)")
    p.add_argument("--s3-endpoint", help=S3_ENDPOINT_HELP)
    p.set_defaults(handler=_probe)


def _probe(args: argparse.Namespace) -> int:
    from colorize.probe import ProbeConfig, probe

    print(json.dumps(probe(ProbeConfig(**_config_values(args))), indent=2))
    return 0


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="bulk-colourise images with Ray Data: PNG and Parquet out, failures listed",
        description="Colourise every image under --input at its original resolution. Re-running with the same "
        "--output skips what is already written (after a cut-off --overwrite, pass it again). Exit status: "
        "0 all written, 3 some inputs failed (see OUTPUT/failed/), 2 bad arguments or unusable input.",
    )
    p.add_argument("--input", required=True, help="a folder (recursive), an image, s3://bucket/prefix, archives "
                   "(.tar, .tar.gz, .tgz, .zip, WebDataset shards) or a manifest (.txt or .parquet list of paths)")
    p.add_argument("--output", required=True, help="folder or s3:// prefix for images/, parquet/, failed/, _SUMMARY.json")
    p.add_argument("--weights", help="a model.pt from `train`, local or s3://, or 'bundled' (the default)")
    p.add_argument("--format", default="png,parquet", help="comma-separated outputs: png, parquet (default: both)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per model call and per Parquet file (default: 64; CPU tasks read plain files in groups of 32, so at most 32 there)")
    p.add_argument("--temperature", type=_temperature,
                   help="annealed-mean temperature for a classification head (default: the model's own)")
    p.add_argument("--saturation", type=_saturation, metavar="X", help=SATURATION_HELP)
    p.add_argument("--flip-average", action="store_true", help=FLIP_AVERAGE_HELP)
    gpus = p.add_mutually_exclusive_group()
    gpus.add_argument("--gpu", action="store_const", const=1, dest="num_gpus", help="one GPU actor")
    gpus.add_argument("--num-gpus", type=positive_int, help="N GPU actors, one GPU each")
    gpus.add_argument("--actors", type=positive_int, help="run the model in N CPU actors between decode and write tasks (default: none, "
                      "every CPU task runs the model itself)")
    p.add_argument("--limit", type=positive_int, help="process only the first N inputs (a file or a whole archive is one input)")
    p.add_argument("--max-pixels", type=positive_int, default=MAX_PIXELS,
                   help=f"refuse images with more pixels (decompression bombs; default: {MAX_PIXELS:,})")
    p.add_argument("--png-level", type=int, default=1, choices=range(10), metavar="0-9",
                   help="PNG zlib compression level: 1 encodes 4.3-5.4x faster than 6 for files 18-22%% larger (default: 1)")
    p.add_argument("--overwrite", action="store_true",
                   help="redo every input, first removing the earlier Parquet parts, failure list and summary")
    p.add_argument("--s3-endpoint", help=S3_ENDPOINT_HELP)
    p.set_defaults(handler=_run, build_config=_run_config)


def _run_config(args: argparse.Namespace):  # noqa: ANN202
    from colorize.pipeline import BulkConfig

    values = _config_values(args)
    values["formats"] = tuple(f.strip() for f in values.pop("format").split(",") if f.strip())
    values["num_gpus"] = values["num_gpus"] or 0
    return BulkConfig(**values)


def _run(args: argparse.Namespace) -> int:
    from colorize.pipeline import run

    summary = run(_run_config(args))
    return EXIT_SOME_FAILED if summary["failed"] else 0


def _config_values(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if k not in ("handler", "build_config", "command", _GIVEN)}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="colorize", description="Distributed image colourisation on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_run(sub)
    _add_train(sub)
    _add_evaluate(sub)
    _add_probe(sub)
    submit.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unrecognised = parser.parse_known_args(argv)
    if unrecognised:  # said by the command's parser, with its usage, not by colorize's
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        commands.choices[args.command].error(f"unrecognized arguments: {' '.join(unrecognised)}")
    errors.stop_on_sigterm()  # before Ray starts too: a SIGTERM while a command lists its input ended it silently
    try:
        return args.handler(args)
    except (storage.StorageError, ValueError) as error:  # data.DataError is a ValueError
        print(f"colorize {args.command}: error: {errors.unwrapped(error)}", file=sys.stderr)
        return EXIT_USAGE
    except errors.Failed as failure:
        print(f"colorize {args.command}: error: {failure}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt as stop:
        print(f"colorize {args.command}: interrupted" + (f"; {stop}" if str(stop) else ""), file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader has what it wanted. Point stdout at /dev/null, or flushing it at exit
        # fails again with a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
