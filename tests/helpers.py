"""Test helpers: small real images with colour a model can learn, ports, Ray processes."""

from __future__ import annotations

import io
import os
import socket
from pathlib import Path

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
