"""The bulk job on a real local Ray cluster and a real S3 server: every input accounted for."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from colorize import cli, color, colorizer, pipeline, storage
from colorize.models import ModelConfig, build_model
from colorize.pipeline import BulkConfig, run
from tests.helpers import another_run_starts_after, encode, output_held_elsewhere, ray_processes, scene

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A small U-Net with random weights: the pipeline's behaviour does not depend on skill."""
    import torch

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    path.write_bytes(colorizer.weights_bytes(build_model(ModelConfig(width=4, depth=2, image_size=16))))
    return str(path)


def exif_rotated_jpeg() -> bytes:
    """A 40x20 JPEG whose EXIF says 'rotate 90 degrees': it displays as 20x40."""
    img = Image.fromarray(scene(np.random.default_rng(1), 40)[:20])
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(img, "JPEG", exif=exif.tobytes(), quality=95)


def with_alpha(img: Image.Image, mode: str) -> Image.Image:
    """``img`` in ``mode`` with an alpha that runs from 0 on the left to 235 on the right."""
    out = img.convert(mode)
    out.putalpha(Image.fromarray(np.tile(np.arange(img.width, dtype=np.uint8) * 5, (img.height, 1))))
    return out


def mixed_inputs(folder: Path) -> dict[str, tuple[int, int]]:
    """Images of many modes, sizes and names; returns relpath -> expected (width, height)."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(scene(rng, 48))
    files = {
        "photo.jpg": (encode(rgb, "JPEG", quality=90), (48, 48)),
        "nested/deeper/gray.png": (encode(rgb.convert("L")), (48, 48)),
        "nested/alpha.png": (encode(with_alpha(rgb, "RGBA")), (48, 48)),
        "nested/la.png": (encode(with_alpha(rgb, "LA")), (48, 48)),
        "palette.gif": (encode(rgb.convert("P"), "GIF"), (48, 48)),
        "print.tiff": (encode(rgb.convert("CMYK"), "TIFF"), (48, 48)),
        "deep16.png": (encode(Image.fromarray((np.arange(24 * 24).reshape(24, 24) * 100).astype(np.uint16))), (24, 24)),
        "tiny 1x1.png": (encode(Image.new("RGB", (1, 1), (200, 10, 10))), (1, 1)),
        "panorama.webp": (encode(Image.fromarray(scene(rng, 600)[:12]), "WEBP", lossless=True), (600, 12)),
        "ünïcode naïve.bmp": (encode(rgb, "BMP"), (48, 48)),
        "rotated.jpg": (exif_rotated_jpeg(), (20, 40)),
    }
    for relpath, (payload, _) in files.items():
        (folder / relpath).parent.mkdir(parents=True, exist_ok=True)
        (folder / relpath).write_bytes(payload)
    return {relpath: size for relpath, (_, size) in files.items()}


def scene_pngs(folder: Path, n: int, size: int, *, name: str = "{}.png") -> Path:
    """``folder`` with ``n`` scene PNGs of ``size`` px, the i-th seeded with i and named ``name.format(i)``."""
    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(scene(np.random.default_rng(i), size)).save(folder / name.format(i))
    return folder


def lightness(img: Image.Image) -> np.ndarray:
    img = img.convert("RGB") if img.mode not in ("I;16", "I") else Image.fromarray(
        np.clip(np.asarray(img) / 257.0 + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    return color.rgb_to_lab_np(np.asarray(img))[..., 0]


def parquet_rows(root: Path) -> list[dict]:
    return [row for f in sorted((root / "parquet").glob("*.parquet")) for row in pq.read_table(f).to_pylist()]


def test_a_folder_of_mixed_images_keeps_size_and_lightness(ray_cluster: str, weights: str, tmp_path: Path) -> None:
    inputs = mixed_inputs(tmp_path / "in")
    out = tmp_path / "out"
    summary = run(BulkConfig(input=str(tmp_path / "in"), output=str(out), weights=weights, batch_size=4))

    assert summary["inputs"] == len(inputs) and summary["written"] == len(inputs), summary
    assert summary["failed"] == 0 and summary["skipped"] == 0
    for relpath, (width, height) in inputs.items():
        source = Image.open(tmp_path / "in" / relpath)
        result = Image.open(out / "images" / (os.path.splitext(relpath)[0] + ".png"))
        assert result.size == (width, height), relpath
        source = source if relpath != "rotated.jpg" else source.transpose(Image.Transpose.ROTATE_270)
        difference = np.abs(lightness(source) - lightness(result))
        # Within 8-bit rounding of the output, whatever colour the model chose.
        assert difference.mean() < 0.5 and difference.max() < 2.5, (relpath, difference.max())
        if relpath in ("nested/alpha.png", "nested/la.png"):
            assert result.mode == "RGBA"
            alpha = np.asarray(source.convert("RGBA"))[..., 3]
            assert len(np.unique(alpha)) == 48 and np.array_equal(np.asarray(result)[..., 3], alpha)

    rows = parquet_rows(out)
    assert sorted(r["relpath"] for r in rows) == sorted(os.path.splitext(r)[0] + ".png" for r in inputs)
    for row in rows:
        assert row["png"] == (out / "images" / row["relpath"]).read_bytes()
        assert (row["width"], row["height"]) == Image.open(io.BytesIO(row["png"])).size
        assert row["weights"] == summary["weights"]
    assert json.loads((out / "_SUMMARY.json").read_text()) == summary


def test_broken_inputs_are_listed_and_the_good_ones_written(ray_cluster: str, weights: str, tmp_path: Path, capsys) -> None:
    good = encode(Image.fromarray(scene(np.random.default_rng(2), 32)), "JPEG")
    broken = {
        "empty.jpg": b"",
        "text.jpg": b"hello, I am not a picture",
        "truncated.jpg": good[: len(good) // 2],
        "notes.txt": b"a stray file",
        "bomb.png": encode(Image.new("L", (300, 300))),
        "header.ppm": b"P6\n4x 3\n255\n" + bytes(36),  # Pillow raises ValueError, not OSError
        "fake.zip": b"an archive by name only",
    }
    folder = tmp_path / "in"
    folder.mkdir()
    for name, payload in broken.items():
        (folder / name).write_bytes(payload)
    for i in range(3):
        (folder / f"good{i}.jpg").write_bytes(good)

    summary = run(BulkConfig(input=str(folder), output=str(tmp_path / "out"), weights=weights, max_pixels=50_000))

    assert (summary["inputs"], summary["written"], summary["failed"]) == (10, 3, 7)
    failed = {Path(r["source"]).name: r["error"] for r in pq.read_table(tmp_path / "out/failed/failed.parquet").to_pylist()}
    assert set(failed) == set(broken)
    assert "empty" in failed["empty.jpg"]
    assert "not an image" in failed["text.jpg"] and "not an image" in failed["notes.txt"]
    assert "truncated" in failed["truncated.jpg"]
    assert "max-pixels" in failed["bomb.png"]
    assert "corrupt" in failed["header.ppm"] and "cannot read" in failed["fake.zip"]
    assert sorted(p.name for p in (tmp_path / "out/images").iterdir()) == ["good0.png", "good1.png", "good2.png"]
    # The first few reasons are said where the run is watched; the rest are a Parquet read away.
    said = capsys.readouterr().err.splitlines()
    assert "colourising 9 file(s) and 1 archive(s)" in said[0]
    shown = [line for line in said if line.startswith("  failed: ")]
    assert len(shown) == pipeline.SHOWN_FAILURES and said[-1] == "  ... and 2 more"
    assert set(shown) <= {f"  failed: {folder / name}: {error}" for name, error in failed.items()}


def test_a_resumed_run_writes_only_what_is_missing(ray_cluster: str, weights: str, tmp_path: Path, capfd,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    folder = scene_pngs(tmp_path / "in", 6, 24)
    out = tmp_path / "out"
    run(BulkConfig(input=str(folder), output=str(out), weights=weights, formats=("png",)))
    (out / "images" / "2.png").unlink()
    (out / "images" / "5.png").unlink()
    before = {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()}
    (out / "images" / f"{storage.TEMP_PREFIX}{'5f3a' * 8}").write_bytes(b"half a PNG")  # a killed run was writing it
    (out / "failed").mkdir(exist_ok=True)
    records = (out / f"{storage.TEMP_PREFIX}{'7b2d' * 8}", out / "failed" / f"{storage.TEMP_PREFIX}{'e04c' * 8}")
    for record in records:
        record.write_bytes(b"half a record")  # _SUMMARY.json or failed.parquet, where the driver was killed
    (folder / ".tmp-holiday.png").write_bytes((folder / "0.png").read_bytes())  # an input: its output is no such file
    capfd.readouterr()
    monkeypatch.setattr(pipeline, "PROGRESS_S", 0.0)  # a progress line after every block

    summary = run(BulkConfig(input=str(folder), output=str(out), weights=weights, formats=("png",)))

    assert (summary["written"], summary["skipped"], summary["inputs"]) == (3, 4, 7)
    said = capfd.readouterr().err
    assert re.search(r"^3/3 files \(3 written, 0 failed\) in \d+ s, [\d.]+ images/s$", said, re.MULTILINE), said
    monkeypatch.setattr(pipeline, "PROGRESS_S", 10.0)
    assert not any(record.exists() for record in records)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir() if p.name in before} == before
    pngs = [".tmp-holiday.png", *(f"{i}.png" for i in range(6))]
    assert sorted(p.name for p in (out / "images").iterdir()) == pngs
    assert run(BulkConfig(input=str(folder), output=str(out), weights=weights, formats=("png",)))["skipped"] == 7
    assert sorted(p.name for p in (out / "images").iterdir()) == pngs

    (folder / "4.png").rename(folder / "renamed.png")  # its old PNG stays, and is said to
    assert run(BulkConfig(input=str(folder), output=str(out), weights=weights, formats=("png",)))["written"] == 1
    assert "1 PNG(s) under images/ come from no input found now (renamed or removed since), such as 4.png" \
        in capfd.readouterr().err
    (folder / "renamed.png").rename(folder / "4.png")
    (out / "images" / "renamed.png").unlink()

    level1 = {p.name: (p.stat().st_size, np.asarray(Image.open(p))) for p in (out / "images").iterdir()}
    (out / "images" / f"{storage.TEMP_PREFIX}{'9c1e' * 8}").write_bytes(b"half a PNG")  # and --overwrite too
    redone = run(BulkConfig(input=str(folder), output=str(out), weights=weights, formats=("png",), overwrite=True,
                            png_level=0))
    assert redone["written"] == 7
    assert sorted(p.name for p in (out / "images").iterdir()) == pngs
    for p in (out / "images").iterdir():  # the same pixels, stored without compression
        assert np.array_equal(np.asarray(Image.open(p)), level1[p.name][1]) and p.stat().st_size > level1[p.name][0]


@pytest.mark.parametrize(("flags", "goes_on"), [((), "goes on with the rest"), (("--overwrite",), "starts over")])
def test_ctrl_c_while_colouring_says_that_the_same_command_goes_on(ray_cluster: str, weights: str, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch, capsys,
                                                                   flags: tuple, goes_on: str) -> None:
    """Training said how to resume; a run said only "interrupted"."""
    folder = scene_pngs(tmp_path / "in", 3, 24)

    def ctrl_c(*args) -> str:  # noqa: ANN002 - at the first progress line, with a block written
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "PROGRESS_S", 0.0)
    monkeypatch.setattr(pipeline, "_progress", ctrl_c)
    before = signal.getsignal(signal.SIGTERM)
    try:
        status = cli.main(["run", "--input", str(folder), "--output", str(tmp_path / "out"), "--weights", weights, *flags])
    finally:
        signal.signal(signal.SIGTERM, before)  # cli.main's handler, for this process's later tests

    assert status == cli.EXIT_INTERRUPTED
    assert capsys.readouterr().err.splitlines()[-1] == \
        f"colorize run: interrupted; what is written is kept, and the same command {goes_on}"


def test_progress_lines_say_how_many_how_fast_and_how_long_is_left() -> None:
    counts = {"written": 1180, "failed": 20, "skipped": 0}
    assert pipeline._progress(counts, 5000, 60.0) == "1,200/5,000 files (1,180 written, 20 failed) in 60 s, 20.0 images/s, about 3 min left"
    assert pipeline._progress(counts, 1500, 60.0).endswith(", about 15 s left")
    # Archives' members are counted as they are read: no total, and no time left to tell.
    assert pipeline._progress({**counts, "skipped": 300}, None, 60.0) == \
        "1,500 images (1,180 written, 20 failed, 300 done before) in 60 s, 25.0 images/s"


def test_a_relative_input_resumed_from_another_working_folder_is_not_redone(
    ray_cluster: str, weights: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a Ray job does on each upload: the same ``--input imgs``, under a new working folder."""
    out = tmp_path / "out"
    for upload in ("w1", "w2"):
        scene_pngs(tmp_path / upload / "imgs", 3, 24)
    monkeypatch.chdir(tmp_path / "w1")
    assert run(BulkConfig(input="imgs", output=str(out), weights=weights))["written"] == 3

    monkeypatch.chdir(tmp_path / "w2")
    summary = run(BulkConfig(input="imgs", output=str(out), weights=weights))

    assert (summary["written"], summary["skipped"]) == (0, 3)
    rows = pq.read_table(out / "parquet").column("relpath").to_pylist()
    assert sorted(rows) == ["0.png", "1.png", "2.png"]  # one row each, not a second from the new folder


def test_a_run_refuses_to_resume_an_output_filled_from_other_input_or_weights(
    ray_cluster: str, weights: str, tmp_path: Path
) -> None:
    """A resumed run skips inputs by output name: another input's or model's colours would stay."""
    first, second = scene_pngs(tmp_path / "a", 2, 16), scene_pngs(tmp_path / "b", 2, 16)  # the same names
    other_weights = tmp_path / "other.pt"
    other_weights.write_bytes(colorizer.weights_bytes(build_model(ModelConfig(width=4, depth=2, image_size=16))))
    os.symlink(first, tmp_path / "link-to-a")
    out = tmp_path / "out"
    assert run(BulkConfig(input=str(first), output=str(out), weights=weights, formats=("png",)))["written"] == 2
    before = {p.name: p.read_bytes() for p in (out / "images").iterdir()}

    for changed, what in (({"input": str(second)}, f"another input \\({first}, now {second}\\)"),
                          ({"weights": str(other_weights)}, "another weights")):
        with pytest.raises(storage.StorageError, match=what):
            run(BulkConfig(**{"input": str(first), "output": str(out), "weights": weights, "formats": ("png",), **changed}))
    assert {p.name: p.read_bytes() for p in (out / "images").iterdir()} == before

    # The same folder through a link is the same input; --overwrite takes the new input on.
    assert run(BulkConfig(input=str(tmp_path / "link-to-a"), output=str(out), weights=weights, formats=("png",)))["skipped"] == 2
    with pytest.raises(ValueError, match="a decoding temperature is for a classification head; this model's head is regression"):
        run(BulkConfig(input=str(first), output=str(out), weights=weights, temperature=0.5))  # it would change nothing
    assert run(BulkConfig(input=str(second), output=str(out), weights=weights, formats=("png",), overwrite=True))["written"] == 2
    assert run(BulkConfig(input=str(second), output=str(out), weights=weights, formats=("png",)))["skipped"] == 2
    # Over another input's outputs, a whole --overwrite leaves its colours only: the others' PNGs
    # went on beside them, unmarked, though their Parquet rows were gone; one whose input now
    # fails too, or a resumed run took that input as done.
    third = scene_pngs(tmp_path / "c", 3, 16, name="c{}.png")
    (third / "0.png").write_bytes(b"not a png")
    stray = os.path.join(os.fsencode(out / "images"), b"stray\xe9.png")  # not UTF-8, so no run's: left alone
    Path(os.fsdecode(stray)).write_bytes(b"")
    summary = run(BulkConfig(input=str(third), output=str(out), weights=weights, overwrite=True))
    assert (summary["written"], summary["failed"]) == (3, 1)
    assert sorted(p.name for p in (out / "images").iterdir()) == ["c0.png", "c1.png", "c2.png", os.fsdecode(b"stray\xe9.png")]
    assert sorted(Path(r["relpath"]).name for r in parquet_rows(out)) == ["c0.png", "c1.png", "c2.png"]
    assert run(BulkConfig(input=str(third), output=str(out), weights=weights))["failed"] == 1


def test_overwrite_replaces_earlier_rows_and_a_cut_off_overwrite_is_not_resumed(
    ray_cluster: str, weights: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Parquet parts are named by the inputs they hold: an --overwrite grouping them otherwise
    added a second row for every input, and one cut off left two runs' colours to be resumed."""
    real_plan = pipeline._plan

    class CutAfterFirstBatch:
        """The run's dataset, with a Ctrl-C as the driver takes its first batch of results."""

        def __init__(self, dataset) -> None:  # noqa: ANN001
            self.dataset = dataset

        def iter_batches(self, **options):  # noqa: ANN003, ANN202
            for batch in self.dataset.iter_batches(**options):
                yield batch  # that batch's outputs are written
                raise KeyboardInterrupt

    def cut_off(config: BulkConfig) -> None:
        """Runs ``config`` with a Ctrl-C once the outputs are being written."""
        with monkeypatch.context() as patch:
            patch.setattr(pipeline, "_plan", lambda *args: CutAfterFirstBatch(real_plan(*args)))
            with pytest.raises(KeyboardInterrupt):
                run(config)

    folder, out = scene_pngs(tmp_path / "in", 5, 16), tmp_path / "out"
    (folder / "z-broken.png").write_bytes(b"not a png")  # last in name order
    assert run(BulkConfig(input=str(folder), output=str(out), weights=weights))["failed"] == 1
    scene_pngs(tmp_path / "more", 1, 16, name="extra{}.png")
    (tmp_path / "more" / "extra0.png").rename(folder / "extra0.png")

    summary = run(BulkConfig(input=str(folder), output=str(out), weights=weights, batch_size=2, overwrite=True))

    assert (summary["written"], summary["failed"]) == (6, 1)
    sources = [r["source"] for r in parquet_rows(out)]
    assert len(sources) == len(set(sources)) == 6
    # An input left out by --limit keeps its place in the failure list.
    assert run(BulkConfig(input=str(folder), output=str(out), weights=weights, limit=3))["skipped"] == 3
    assert [Path(r["source"]).name for r in pq.read_table(out / "failed/failed.parquet").to_pylist()] == ["z-broken.png"]
    (out / "images" / "0.png").unlink()
    cut_off(BulkConfig(input=str(folder), output=str(out), weights=weights))  # a plain run: the earlier summary goes
    assert not (out / "_SUMMARY.json").exists()

    other_weights = tmp_path / "other.pt"
    other_weights.write_bytes(colorizer.weights_bytes(build_model(ModelConfig(width=4, depth=2, image_size=16))))
    cut_off(BulkConfig(input=str(folder), output=str(out), weights=str(other_weights), formats=("png",), overwrite=True))
    assert not (out / "_SUMMARY.json").exists()  # no summary claims a finished run
    with pytest.raises(storage.StorageError, match="an --overwrite run into it did not finish"):
        run(BulkConfig(input=str(folder), output=str(out), weights=str(other_weights), formats=("png",)))
    # An --overwrite that leaves inputs out (--limit) leaves their earlier colours: still marked.
    run(BulkConfig(input=str(folder), output=str(out), weights=str(other_weights), formats=("png",), overwrite=True, limit=2))
    with pytest.raises(storage.StorageError, match="an --overwrite run into it did not finish"):
        run(BulkConfig(input=str(folder), output=str(out), weights=str(other_weights), formats=("png",)))
    assert run(BulkConfig(input=str(folder), output=str(out), weights=str(other_weights), formats=("png",),
                          overwrite=True))["written"] == 6
    assert run(BulkConfig(input=str(folder), output=str(out), weights=str(other_weights), formats=("png",)))["skipped"] == 6
    # Cut off again, but redoing the same colours: nothing mixes.
    cut_off(BulkConfig(input=str(folder), output=str(out), weights=str(other_weights), formats=("png",), overwrite=True))
    assert run(BulkConfig(input=str(folder), output=str(out), weights=str(other_weights), formats=("png",)))["skipped"] == 6
    # Over another model's colours without PNGs: theirs go, else a rerun took them for done.
    run(BulkConfig(input=str(folder), output=str(out), weights=weights, formats=("parquet",), overwrite=True))
    assert not list((out / "images").rglob("*.png"))
    assert run(BulkConfig(input=str(folder), output=str(out), weights=weights))["written"] == 6


@pytest.mark.parametrize(("change", "why"), [
    ({"batch_size": 0}, "--batch-size must be at least 1, got 0"),
    ({"max_pixels": 0}, "--max-pixels must be at least 1, got 0"),  # was "--batch-size and --max-pixels ..., got 32, 0"
    ({"png_level": 10}, "--png-level must be 0-9, got 10"),
    ({"formats": ("png", "jpeg")}, "--format takes a comma-separated subset of"),
])
def test_a_bulk_setting_out_of_range_is_named(change: dict, why: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(why)}"):
        BulkConfig(input="i", output="o", **change)


def test_a_run_that_finds_its_output_made_while_listing_leaves_the_other_runs_files(
    weights: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run that found no --output took no lock, then deleted as "unfinished" the file that
    another run, which made the folder while this one listed its input, was writing."""
    folder = scene_pngs(tmp_path / "in", 2, 16)
    out = tmp_path / "out"
    in_flight = out / "images" / f"{storage.TEMP_PREFIX}{'0123456789abcdef' * 2}"  # write_bytes_atomic's temporary

    def first_output() -> None:
        in_flight.parent.mkdir(parents=True)
        in_flight.write_bytes(b"half a PNG")

    with another_run_starts_after(pipeline.sources, "discover", out, first_output, monkeypatch) as holders, \
            pytest.raises(storage.InUse) as refused:
        run(BulkConfig(input=str(folder), output=str(out), weights=weights))
    assert f"out: in use by another run (pid {holders[0].pid} on " in str(refused.value)
    assert in_flight.read_bytes() == b"half a PNG"
    assert sorted(p.name for p in out.rglob("*")) == sorted([storage.LOCK_FILE, in_flight.name, "images"])


def test_model_actors_a_machine_cannot_place_are_refused(ray_cluster: str) -> None:
    import ray

    have = ray.cluster_resources()
    assert not have.get("GPU")
    with pytest.raises(ValueError, match="1 GPU actor"):
        pipeline._check_resources(BulkConfig(input="i", output="o", num_gpus=1))
    with pytest.raises(ValueError, match="3 GPU actor"):
        pipeline._check_resources(BulkConfig(input="i", output="o", num_gpus=3))
    with pytest.raises(ValueError, match="--actors sets CPU model actors; with --gpu or --num-gpus N there is one actor a GPU"):
        BulkConfig(input="i", output="o", num_gpus=1, actors=3)  # not 3 GPU actors, nor 1 silently
    too_many = int(have["CPU"] / 0.25) + 1
    with pytest.raises(ValueError, match=f"{too_many} model actor"):
        pipeline._check_resources(BulkConfig(input="i", output="o", actors=too_many))
    pipeline._check_resources(BulkConfig(input="i", output="o", actors=1))
    pipeline._check_resources(BulkConfig(input="i", output="o"))


def test_a_redone_png_keeps_one_parquet_row_and_an_output_inside_the_input_is_not_read(
    ray_cluster: str, weights: str, tmp_path: Path
) -> None:
    folder = scene_pngs(tmp_path / "in", 3, 16)
    out = folder / "colour"
    assert run(BulkConfig(input=str(folder), output=str(out), weights=weights))["written"] == 3
    (out / "images" / "1.png").unlink()

    summary = run(BulkConfig(input=str(folder), output=str(out), weights=weights))

    assert (summary["inputs"], summary["written"], summary["skipped"], summary["failed"]) == (3, 1, 2, 0)
    assert sorted(r["relpath"] for r in parquet_rows(out)) == ["0.png", "1.png", "2.png"]

    for part in (out / "parquet").glob("*.parquet"):  # as if the run died between the PNGs and their Parquet
        part.unlink()
    summary = run(BulkConfig(input=str(folder), output=str(out), weights=weights))
    assert (summary["written"], summary["skipped"]) == (3, 0)
    assert sorted(r["relpath"] for r in parquet_rows(out)) == ["0.png", "1.png", "2.png"]


def test_same_stem_inputs_do_not_overwrite_each_other(ray_cluster: str, weights: str, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    img = Image.fromarray(scene(np.random.default_rng(0), 16))
    img.save(folder / "a.jpg")
    img.save(folder / "a.webp")
    img.save(folder / "b.jpg")
    run(BulkConfig(input=str(folder), output=str(tmp_path / "out"), weights=weights))
    assert sorted(p.name for p in (tmp_path / "out/images").iterdir()) == ["a.jpg.png", "a.webp.png", "b.png"]


def test_archives_are_streamed_and_unsafe_members_refused(ray_cluster: str, weights: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    payloads = {f"shard/{i:03d}.jpg": encode(Image.fromarray(scene(rng, 20)), "JPEG") for i in range(4)}
    folder = tmp_path / "in"
    folder.mkdir()
    with tarfile.open(folder / "part.tar.gz", "w:gz") as tar:
        for name, payload in {**payloads, "shard/000.json": b"{}", "../escape.jpg": payloads["shard/000.jpg"]}.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    with zipfile.ZipFile(folder / "more.zip", "w") as archive:
        for name, payload in payloads.items():
            archive.writestr(name, payload)
    whole = io.BytesIO()
    with tarfile.open(fileobj=whole, mode="w") as tar:
        for i in range(3):
            info = tarfile.TarInfo(f"m{i}.jpg")
            info.size = len(payloads[f"shard/{i:03d}.jpg"])
            tar.addfile(info, io.BytesIO(payloads[f"shard/{i:03d}.jpg"]))
    last = tarfile.open(fileobj=io.BytesIO(whole.getvalue())).getmembers()[-1]
    (folder / "cut.tar").write_bytes(whole.getvalue()[: last.offset_data + 100])  # breaks off inside m2.jpg
    # ImageNet's training tarball is a tar of tars, and some archives hold no image: both
    # ended in "0 inputs", exit 0, nothing written or listed.
    with tarfile.open(folder / "classes.tar", "w") as tar:
        info = tarfile.TarInfo("n01440764.tar")
        info.size = len(whole.getvalue())
        tar.addfile(info, io.BytesIO(whole.getvalue()))
    with zipfile.ZipFile(folder / "meta.zip", "w") as archive:
        archive.writestr("labels.json", b"{}")
    scene_pngs(folder / "loose", 10, 16)

    out = tmp_path / "out"
    summary = run(BulkConfig(input=str(folder), output=str(out), weights=weights))

    assert (summary["inputs"], summary["written"], summary["failed"]) == (24, 20, 4), summary
    written = sorted(str(p.relative_to(out / "images")) for p in (out / "images").rglob("*.png"))
    assert written == sorted(["cut.tar/m0.png", "cut.tar/m1.png", *(f"loose/{i}.png" for i in range(10)),
                              *(f"{a}/shard/{i:03d}.png" for a in ("more.zip", "part.tar.gz") for i in range(4))])
    # A Parquet part an archive, and one for the loose files together (not one each, as when archives were among them).
    assert len(list((out / "parquet").glob("part-*.parquet"))) == 4
    failures = {Path(r["source"]).name: r for r in pq.read_table(out / "failed/failed.parquet").to_pylist()}
    assert sorted(failures) == ["cut.tar", "escape.jpg", "meta.zip", "n01440764.tar"]
    assert failures["n01440764.tar"]["error"].startswith("an archive inside an archive, which is not read: extract the outer")
    assert failures["meta.zip"]["error"].startswith("no image members in this archive")
    assert failures["escape.jpg"]["source"].endswith("part.tar.gz/../escape.jpg") and ".." in failures["escape.jpg"]["error"]
    assert "after 2 member(s)" in failures["cut.tar"]["error"]
    assert not (tmp_path / "escape.png").exists() and not (out / "escape.png").exists()

    again = run(BulkConfig(input=str(folder), output=str(out), weights=weights))
    assert (again["skipped"], again["written"], again["failed"]) == (20, 0, 4)

    # A member or file whose PNG is gone is redone; its Parquet row is kept, not written twice.
    (out / "images/more.zip/shard/001.png").unlink()
    (out / "images/loose/3.png").unlink()
    again = run(BulkConfig(input=str(folder), output=str(out), weights=weights))
    assert (again["skipped"], again["written"], again["failed"]) == (18, 2, 4)
    assert (out / "images/more.zip/shard/001.png").is_file() and (out / "images/loose/3.png").is_file()
    relpaths = pq.read_table(out / "parquet", columns=["relpath"]).column("relpath").to_pylist()
    assert len(relpaths) == len(set(relpaths)) == 20


def test_manifests_in_text_and_parquet(ray_cluster: str, weights: str, tmp_path: Path) -> None:
    folder = scene_pngs(tmp_path / "in", 3, 16)
    (tmp_path / "list.txt").write_text("# three images\nin/0.png\nin/1.png\n\n" + str(folder / "2.png") + "\n")
    pq.write_table(pa.table({"path": [str(folder / f"{i}.png") for i in range(3)]}), tmp_path / "list.parquet")

    for manifest in ("list.txt", "list.parquet"):
        out = tmp_path / f"out-{manifest}"
        summary = run(BulkConfig(input=str(tmp_path / manifest), output=str(out), weights=weights))
        assert summary["written"] == 3, manifest
        written = sorted(str(p.relative_to(out / "images")) for p in (out / "images").rglob("*.png"))
        assert written == [f"{str(folder).lstrip('/')}/{i}.png" for i in range(3)], manifest  # the path, not a basename

    limited = run(BulkConfig(input=str(tmp_path / "list.parquet"), output=str(tmp_path / "out-limited"), weights=weights,
                             limit=2))
    assert (limited["inputs"], limited["written"]) == (2, 2)


def test_s3_to_s3(ray_cluster: str, s3, weights: str, tmp_path: Path) -> None:
    bucket = s3.bucket("bulk")
    fs, root = storage.resolve(bucket, s3.settings)
    names = ["a.jpg", "sub dir/b.png", "sub dir/c.jpg", "broken.jpg"]
    for name in names:
        payload = b"nope" if name == "broken.jpg" else encode(Image.fromarray(scene(np.random.default_rng(0), 20)), "PNG")
        storage.write_bytes_atomic(fs, storage.join(root, "in", name), payload)

    summary = run(BulkConfig(input=f"{bucket}/in", output=f"{bucket}/out", weights=weights, s3_endpoint=s3.endpoint))

    assert (summary["written"], summary["failed"]) == (3, 1)
    written = storage.list_files(fs, storage.join(root, "out"))
    assert {p.split("/out/", 1)[1] for p in written} == {
        "images/a.png", "images/sub dir/b.png", "images/sub dir/c.png", "failed/failed.parquet",
        "_SUMMARY.json", "_CONFIG.json", *(p.split("/out/", 1)[1] for p in written if "/parquet/" in p),
    }
    table = pq.read_table(storage.join(root, "out", "parquet"), filesystem=fs)
    assert sorted(table.column("relpath").to_pylist()) == ["a.png", "sub dir/b.png", "sub dir/c.png"]
    again = run(BulkConfig(input=f"{bucket}/in", output=f"{bucket}/out", weights=weights, s3_endpoint=s3.endpoint,
                           batch_size=1, overwrite=True))  # parts grouped otherwise replace the first run's
    assert (again["written"], again["failed"]) == (3, 1)
    table = pq.read_table(storage.join(root, "out", "parquet"), filesystem=fs)
    assert sorted(table.column("relpath").to_pylist()) == ["a.png", "sub dir/b.png", "sub dir/c.png"]

    # A manifest in S3 whose entries are relative to its own prefix.
    storage.write_bytes_atomic(fs, storage.join(root, "lists", "list.txt"), b"../in/a.jpg\n../in/./sub dir/c.jpg\n")
    listed = run(BulkConfig(input=f"{bucket}/lists/list.txt", output=f"{bucket}/out-listed", weights=weights,
                            s3_endpoint=s3.endpoint))
    assert (listed["written"], listed["failed"]) == (2, 0)
    pngs = [p for p in storage.list_files(fs, storage.join(root, "out-listed", "images"))]
    assert sorted(p.split("/out-listed/images/", 1)[1] for p in pngs) == ["bulk/in/a.png", "bulk/in/sub dir/c.png"]


def _kill_workers_mid_run(folder: Path, out: Path, config: BulkConfig, title: bytes) -> dict:
    """Runs ``config`` in a thread, SIGKILLs every Ray worker whose title has ``title`` once the
    first Parquet file is written, and returns the run's summary. A fused task writes a part
    every --batch-size images, so the task that wrote the first part is killed with more to
    write, and its retry writes those parts again. All of them are killed because, with several
    running, killing one alone might spare the one that wrote."""
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(run(config)), daemon=True)
    runner.start()
    deadline = time.monotonic() + 240
    while not list((out / "parquet").glob("*.parquet")) if (out / "parquet").exists() else True:
        assert runner.is_alive() and time.monotonic() < deadline, "nothing was written"
        time.sleep(0.05)
    victims = ray_processes(title)
    assert victims, f"no Ray worker titled {title!r} found"
    for victim in victims:
        os.kill(victim, signal.SIGKILL)
    # The kill landed mid-run (else the test would pass without any recovery to test).
    assert runner.is_alive() and len(list((out / "images").glob("*.png"))) < 240
    runner.join(timeout=240)
    assert not runner.is_alive(), "the run did not finish after the worker was killed"
    return result


@pytest.mark.parametrize(("actors", "title"), [(1, b"Colorizer"), (None, b"colorize_items")], ids=["model-actor", "fused-task"])
def test_a_killed_worker_loses_and_duplicates_nothing(
    ray_cluster: str, weights: str, tmp_path: Path, actors: int | None, title: bytes
) -> None:
    folder = scene_pngs(tmp_path / "in", 240, 64, name="{:03d}.png")
    out = tmp_path / "out"
    config = BulkConfig(input=str(folder), output=str(out), weights=weights, batch_size=8, actors=actors)
    result = _kill_workers_mid_run(folder, out, config, title)

    assert result.get("written") == 240 and result["failed"] == 0, result
    sources = [r["source"] for r in parquet_rows(out)]
    assert len(sources) == len(set(sources)) == 240
    assert len(list((out / "images").glob("*.png"))) == 240


@pytest.mark.parametrize("actors", [None, 2], ids=["fused-tasks", "actors"])
def test_flip_averaging_colours_a_mirrored_image_as_the_mirror_image(
    ray_cluster: str, tmp_path: Path, actors: int | None, recwarn: pytest.WarningsRecorder
) -> None:
    import torch

    torch.manual_seed(0)
    model = build_model(ModelConfig(width=4, depth=2, image_size=16))
    with torch.no_grad():
        model.head.weight.mul_(20)  # vivid, so that its asymmetry shows in 8-bit colour
    weights = str(tmp_path / "vivid.pt")
    Path(weights).write_bytes(colorizer.weights_bytes(model))
    folder = tmp_path / "in"
    folder.mkdir()
    image = scene(np.random.default_rng(7), 48)
    image[:, :12] = image[:, :12] // 2  # a darker left edge: the scene is not its own mirror image
    Image.fromarray(image).save(folder / "image.png")
    Image.fromarray(image[:, ::-1]).save(folder / "mirror.png")

    def mirror_gap(out: Path) -> int:
        pair = [np.asarray(Image.open(out / "images" / f"{name}.png"), dtype=np.int16) for name in ("image", "mirror")]
        return int(np.abs(pair[0] - pair[1][:, ::-1]).max())

    plain, averaged = tmp_path / "plain", tmp_path / "averaged"
    assert run(BulkConfig(input=str(folder), output=str(plain), weights=weights, actors=actors))["written"] == 2
    assert run(BulkConfig(input=str(folder), output=str(averaged), weights=weights, actors=actors,
                          flip_average=True))["written"] == 2
    assert json.loads((averaged / "_CONFIG.json").read_text())["flip_average"] is True
    assert mirror_gap(plain) > 3  # the random model alone colours the two differently
    assert mirror_gap(averaged) <= 1  # averaged, the same up to rounding to 8 bits
    # Two inputs are one block: a second actor would idle, and Ray Data warned of it.
    assert not [w for w in recwarn if "minimum number of concurrent actors" in str(w.message)]

    # The colours depend on it, so an output made one way is not resumed the other.
    with pytest.raises(storage.StorageError, match=r"another flip averaging \(on, now off\)"):
        run(BulkConfig(input=str(folder), output=str(averaged), weights=weights, actors=actors))


def test_saturation_scales_the_colour_and_is_part_of_what_a_run_resumes(ray_cluster: str, tmp_path: Path) -> None:
    folder = scene_pngs(tmp_path / "in", 3, 48)
    lab = {}
    for saturation in (None, 1.5):
        out = tmp_path / f"out-{saturation}"
        summary = run(BulkConfig(input=str(folder), output=str(out), saturation=saturation))
        assert summary["written"] == 3
        assert json.loads((out / "_CONFIG.json").read_text())["saturation_used"] == (saturation or 1.0)
        lab[saturation] = color.rgb_to_lab_np(np.asarray(Image.open(out / "images" / "0.png"), dtype=np.float32) / 255.0)
    chroma = {k: np.linalg.norm(v[..., 1:], axis=-1).mean() for k, v in lab.items()}
    assert chroma[1.5] > 1.3 * chroma[None] > 0, chroma  # up to 1.5x, less where the gamut clips
    np.testing.assert_allclose(lab[1.5][..., 0], lab[None][..., 0], atol=1.0)  # the same lightness, to 8-bit rounding

    # Resumed at the same factor, nothing is redone; at another (or the model's own 1), refused.
    assert run(BulkConfig(input=str(folder), output=str(tmp_path / "out-1.5"), saturation=1.5))["skipped"] == 3
    with pytest.raises(storage.StorageError, match=r"another saturation \(1\.5, now 1\)"):
        run(BulkConfig(input=str(folder), output=str(tmp_path / "out-1.5")))


def test_a_classification_model_colours_at_the_temperature_asked_for(ray_cluster: str, tmp_path: Path) -> None:
    import torch

    torch.manual_seed(0)
    model = build_model(ModelConfig(width=4, depth=2, image_size=16, head="classification"))
    with torch.no_grad():
        model.head.bias.normal_(0, 3)  # an opinionated random model: temperature must matter
    weights = tmp_path / "class.pt"
    weights.write_bytes(colorizer.weights_bytes(model))
    folder = scene_pngs(tmp_path / "in", 3, 32)

    outputs = {}
    for temperature in (0.1, 1.0):
        out = tmp_path / f"out-{temperature}"
        summary = run(BulkConfig(input=str(folder), output=str(out), weights=str(weights), temperature=temperature))
        assert summary["written"] == 3
        assert json.loads((out / "_CONFIG.json").read_text())["temperature"] == temperature
        outputs[temperature] = np.asarray(Image.open(out / "images" / "0.png"), dtype=np.float32)
    chroma = {t: np.abs(color.rgb_to_lab_np(img / 255.0)[..., 1:]).mean() for t, img in outputs.items()}
    assert chroma[0.1] > chroma[1.0] + 1.0, chroma  # colder decoding is more saturated

    # Those colours depend on it, so an output made at one temperature is not resumed at another,
    # nor at the model's own (0.38) when none is asked for.
    for temperature in (1.0, None):
        with pytest.raises(storage.StorageError, match=r"another decoding temperature \(0\.1, now (1\.0|0\.38)\)"):
            run(BulkConfig(input=str(folder), output=str(tmp_path / "out-0.1"), weights=str(weights), temperature=temperature))
