"""Bring models back from a GPU lease: half-precision copies, cut to what the lease returns.

A lease returns at most 8 files of 16 MiB (64 MiB together), and only what is in its output
folder when the command ends or is killed at its time limit. So ``jobs/gpu_lease.sh`` calls
``collect`` every few seconds while training runs: each run's ``model.pt`` that changed since the
last call goes to the output folder at once, as ``NAME-fp16.pt`` in parts of at most 15 MiB,
and ``manifest.json`` lists each whole copy with its SHA-256. The manifest is replaced last and
atomically, so a part cut short by the time limit never matches it; ``join`` rebuilds each
model here and refuses any that does not match::

    python -m jobs.gpu_collect half RUNS/NAME/model.pt NAME-fp16.pt
    python -m jobs.gpu_collect collect RUNS OUT [NAME ...]      # on the GPU machine
    python -m jobs.gpu_collect join FILES_AT DEST                # here, after the lease
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

PART_BYTES = 15 * 1024 * 1024
MANIFEST = "manifest.json"
# What a lease brings back, less room beside the parts for manifest.json, logs.tar.gz and the
# scratch copy of one of them that a collect has in OUT while it writes (a kill then leaves it).
MAX_FILES, MAX_BYTES = 8 - 3, (64 - 4) * 1024 * 1024
REFUSED = ".collect-refused"  # in RUNS: the runs already reported as not fitting, one a line


def half_bytes(model: Path) -> bytes:
    """A weights file (``colorizer.weights_bytes``) with its floating-point tensors in float16."""
    payload = torch.load(model, map_location="cpu", weights_only=True)
    payload["state_dict"] = {k: v.half() if v.is_floating_point() else v for k, v in payload["state_dict"].items()}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def collect(runs: Path, out: Path, names: Sequence[str] = ()) -> list[str]:
    """Copy each run's ``model.pt`` newer than its last copy into ``out``; returns the names copied.

    ``names`` limits it to those runs (all when empty). A model whose parts would take ``out``
    past what a lease brings back is not copied (said once a run): the files past the limit
    would be left behind, and with them maybe a part of every model."""
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    copied = []
    for model in sorted(runs.glob("*/model.pt")):
        name = model.parent.name
        if names and name not in names:
            continue
        stamp = model.stat().st_mtime_ns
        if manifest.get(name, {}).get("source_mtime_ns") == stamp:
            continue
        try:
            data = half_bytes(model)
        except (RuntimeError, EOFError, OSError) as error:  # caught mid-write: the next call takes it
            print(f"{name}: not copied yet ({error})", file=sys.stderr)
            continue
        others = [p for p in out.glob("*-fp16.pt.part*") if not p.name.startswith(f"{name}-fp16.pt.part")]
        files = len(others) + -(-len(data) // PART_BYTES)
        size = sum(p.stat().st_size for p in others) + len(data)
        if files > MAX_FILES or size > MAX_BYTES:
            _refuse_once(runs, name, f"{name}: not copied: with it the models would take {files} files and "
                                     f"{size / 2**20:.1f} MiB, past the {MAX_FILES} and {MAX_BYTES / 2**20:.0f} MiB a lease "
                                     "brings back beside its logs; name fewer runs in FETCH")
            continue
        for stale in out.glob(f"{name}-fp16.pt.part*"):
            stale.unlink()
        parts = [data[i : i + PART_BYTES] for i in range(0, len(data), PART_BYTES)]
        for index, part in enumerate(parts):
            (out / f"{name}-fp16.pt.part{index:02d}").write_bytes(part)
        manifest[name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "parts": len(parts),
                          "source_mtime_ns": stamp}
        scratch = out / f".{MANIFEST}"
        scratch.write_text(json.dumps(manifest, indent=2))
        os.replace(scratch, manifest_path)
        copied.append(name)
    return copied


def _refuse_once(runs: Path, name: str, message: str) -> None:
    said = runs / REFUSED
    if name not in (said.read_text().split() if said.exists() else []):
        print(message, file=sys.stderr, flush=True)
        with said.open("a") as f:
            f.write(name + "\n")


def join(files: Path, dest: Path) -> list[Path]:
    """Rebuild every model the manifest in ``files`` lists into ``dest``; returns their paths.

    Raises ValueError naming any model whose parts are missing or do not match its SHA-256."""
    manifest_path = files / MANIFEST
    if not manifest_path.exists():
        raise ValueError(f"{files}: no {MANIFEST}: no model was copied before the lease ended")
    dest.mkdir(parents=True, exist_ok=True)
    joined, broken = [], []
    for name, entry in json.loads(manifest_path.read_text()).items():
        parts = [files / f"{name}-fp16.pt.part{index:02d}" for index in range(entry["parts"])]
        data = b"".join(p.read_bytes() for p in parts if p.exists())
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            broken.append(name)
            continue
        (dest / f"{name}-fp16.pt").write_bytes(data)
        joined.append(dest / f"{name}-fp16.pt")
    if broken:
        raise ValueError(f"{files}: parts missing or cut short for {', '.join(broken)} (joined: {len(joined)})")
    return joined


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    half = commands.add_parser("half", help="write a float16 copy of one weights file")
    half.add_argument("model", type=Path)
    half.add_argument("dest", type=Path)
    gather = commands.add_parser("collect", help="copy changed models of RUNS into OUT in parts")
    gather.add_argument("runs", type=Path)
    gather.add_argument("out", type=Path)
    gather.add_argument("names", nargs="*", help="only these runs (default: all)")
    rebuild = commands.add_parser("join", help="rebuild the models of a lease's files and check them")
    rebuild.add_argument("files", type=Path)
    rebuild.add_argument("dest", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "half":
            args.dest.write_bytes(half_bytes(args.model))
        elif args.command == "collect":
            for name in collect(args.runs, args.out, args.names):
                print(f"collected {name}", flush=True)
        else:
            for path in join(args.files, args.dest):
                print(path)
    except (ValueError, OSError) as error:
        parser.exit(1, f"gpu_collect: {error}\n")


if __name__ == "__main__":
    main()
