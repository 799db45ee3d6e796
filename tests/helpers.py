"""Test helpers: small real images with colour a model can learn, ports, Ray processes."""

from __future__ import annotations

import io
import os
import socket
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


def scene(rng: np.random.Generator, size: int = 16) -> np.ndarray:
    """A tiny uint8 (size, size, 3) 'landscape': bright blue sky over a darker green field.

    Colour follows brightness and position, so a colouriser can learn it in a few steps.
    """
    horizon = int(rng.integers(size // 4, 3 * size // 4))
    img = np.empty((size, size, 3), dtype=np.float32)
    img[:horizon] = (90, 150, 230)
    img[horizon:] = (60, 140, 50)
    img *= rng.uniform(0.7, 1.1)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_images(folder: Path, n: int, *, size: int = 16, seed: int = 0, fmt: str = "JPEG") -> list[Path]:
    """``n`` scene images under ``folder``, split over two class subfolders."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = folder / f"class{i % 2}" / f"{i:04d}.{'jpg' if fmt == 'JPEG' else fmt.lower()}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(scene(rng, size)).save(path, format=fmt, quality=95)
        paths.append(path)
    return paths


def encode(img: Image.Image, fmt: str = "PNG", **params) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **params)
    return buffer.getvalue()


D50 = (0.9642, 1.0, 0.8249)  # the white of ICC's profile connection space, XYZ
# The sRGB primaries, adapted to the D50 white of ICC's connection space, as sRGB profiles hold them.
SRGB_PRIMARIES = {"r": (0.4361, 0.2225, 0.0139), "g": (0.3851, 0.7169, 0.0971), "b": (0.1431, 0.0606, 0.7141)}


def icc_profile(space: str, *, gamma: float, primaries: dict[str, tuple[float, float, float]] | None = None) -> bytes:
    """A minimal ICC v2 display profile: ``space`` "RGB " (matrix and curves: ``primaries``
    as {"r": XYZ, "g": XYZ, "b": XYZ}) or "GRAY", each channel a pure gamma curve.

    Built byte by byte (header, tag table, tags, each 4-byte aligned) because no profile of
    a colour space other than sRGB ships with the packages the tests install.
    """

    def s15_16(values) -> bytes:  # noqa: ANN001
        return b"".join(struct.pack(">i", round(v * 65536)) for v in values)

    def xyz(values) -> bytes:  # noqa: ANN001
        return b"XYZ \0\0\0\0" + s15_16(values)

    curve = b"curv\0\0\0\0" + struct.pack(">IH", 1, round(gamma * 256))  # one entry: a gamma, u8.8
    name = f"test {space.strip()} gamma {gamma}".encode() + b"\0"
    tags = {"desc": b"desc\0\0\0\0" + struct.pack(">I", len(name)) + name + b"\0" * 79, "wtpt": xyz(D50)}
    if space == "GRAY":
        tags["kTRC"] = curve
    else:
        for channel, primary in primaries.items():
            tags[f"{channel}XYZ"], tags[f"{channel}TRC"] = xyz(primary), curve
    table, body = b"", b""
    start = 128 + 4 + 12 * len(tags)
    for signature, tag in tags.items():
        tag += b"\0" * (-len(tag) % 4)
        table += struct.pack(">4sII", signature.encode(), start + len(body), len(tag))
        body += tag
    header = struct.pack(">I4sI4s4s4s", start + len(body), b"none", 0x02100000, b"mntr", space.encode(), b"XYZ ")
    header += b"\0" * 12 + b"acsp" + b"\0" * 28 + s15_16(D50)
    return header.ljust(128, b"\0") + struct.pack(">I", len(tags)) + table + body


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports that are free on every interface right now."""
    # Hold every socket until all are chosen so the kernel cannot hand out a port twice.
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def ray_processes(title: bytes) -> list[int]:
    """PIDs of the test cluster's Ray workers whose process title contains ``title``.

    Only processes started under this test session's ``RAY_TMPDIR`` count, never another
    cluster on the same machine.
    """
    marker = f"RAY_TMPDIR={os.environ['RAY_TMPDIR']}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and title in (entry / "cmdline").read_bytes().split(b"\0")[0]:
                if marker in (entry / "environ").read_bytes():
                    pids.append(int(entry.name))
        except OSError:
            continue
    return pids


@contextmanager
def output_held_elsewhere(folder: Path) -> Iterator[subprocess.Popen]:
    """Another process holding ``folder``'s output lock, as a running job does, until the block ends
    (it is then killed: the kernel, not the holder, releases the lock)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time, pyarrow.fs as fs; from colorize.storage import output_lock; "
         "lock = output_lock(fs.LocalFileSystem(), sys.argv[1], sys.argv[1], '--output'); lock.acquire(); print('held', flush=True); "
         "time.sleep(600)", str(folder)],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.kill()
        holder.wait()


@contextmanager
def another_run_starts_after(owner: Any, name: str, folder: Path, first_writes: Callable[[], None],
                             monkeypatch: Any) -> Iterator[list[subprocess.Popen]]:
    """Within the block, the first return from ``owner.name`` is followed by another run taking
    ``folder``'s lock (:func:`output_held_elsewhere`, until the block ends) and making
    ``first_writes()``: a run that starts while this one is between its first look at the folder
    and its lock. Yields a list that then holds the other run's process."""
    original, holders = getattr(owner, name), []
    with ExitStack() as other_run:
        def then_another_run_starts(*args: Any, **kwargs: Any) -> Any:
            result = original(*args, **kwargs)
            if not holders:
                holders.append(other_run.enter_context(output_held_elsewhere(folder)))
                first_writes()
            return result

        monkeypatch.setattr(owner, name, then_another_run_starts)
        yield holders
