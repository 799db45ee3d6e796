"""jobs.gpu_data: the GPU lease's data, packed from the shared archives, matches what training reads."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

from colorize import imagesets, metrics
from jobs import gpu_data
from tests.helpers import write_images


def _archive(path: Path, root: Path, *names: str) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name in names:
            tar.add(root / name, arcname=name)
    return path


@pytest.fixture
def shared(tmp_path: Path) -> tuple[Path, Path]:
    """Small stand-ins for cifar10-jpeg.tar.gz and photos-train.tar.gz, in their layouts."""
    src = tmp_path / "src"
    write_images(src / "cifar10" / "train", 6, size=32, seed=1)
    write_images(src / "cifar10" / "test", 4, size=32, seed=2)
    write_images(src / "photos", 12, size=150, seed=3)
    write_images(src / "photos" / "wide", 2, size=90, seed=4)  # photos of another size in a deeper folder
    (src / "README.md").write_text("not an image")
    return _archive(tmp_path / "cifar.tar.gz", src, "cifar10"), _archive(tmp_path / "photos.tar.gz", src, "photos", "README.md")


def test_it_packs_cifar_train_unchanged_and_photos_as_the_crops_training_reads(shared: tuple[Path, Path], tmp_path: Path) -> None:
    cifar, photos = shared
    out = tmp_path / "gpu"
    gpu_data.main(["--cifar", str(cifar), "--photos", str(photos), "--out", str(out), "--size", "16"])
    assert not (out / "cifar10-test.tar.gz").exists()  # the test split stays behind unless asked for

    for split, count in (("train", 6), ("test", 4)):
        if split == "test":
            gpu_data.main(["--cifar", str(cifar), "--photos", str(photos), "--out", str(out), "--size", "16", "--with-test"])
        with tarfile.open(cifar) as original, tarfile.open(out / f"cifar10-{split}.tar.gz") as packed:
            wanted = {m.name: original.extractfile(m).read() for m in original
                      if m.isfile() and m.name.startswith(f"cifar10/{split}/")}
            assert {m.name: packed.extractfile(m).read() for m in packed if m.isfile()} == wanted
        assert len(wanted) == count

    full, small = tmp_path / "full", tmp_path / "small"
    for archive, folder in ((photos, full), (out / "photos16.tar.gz", small)):
        with tarfile.open(archive) as tar:
            tar.extractall(folder, filter="data")
    assert not (small / "README.md").exists()
    assert sorted(p.relative_to(small) for p in small.rglob("*.jpg")) == sorted(p.relative_to(full) for p in full.rglob("*.jpg"))
    crops = imagesets.load_folder(full / "photos", size=16).rgb
    packed_crops = imagesets.load_folder(small / "photos", size=16).rgb
    assert packed_crops.shape == crops.shape == (14, 16, 16, 3)
    assert metrics.per_image_psnr(packed_crops, crops).min() > 30  # the same crops in the same order (so the same holdout), JPEG at quality 90


def test_it_refuses_a_missing_archive_in_one_line(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        gpu_data.main(["--cifar", str(tmp_path / "nope.tar.gz"), "--photos", str(tmp_path / "nope.tar.gz"), "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    assert "nope.tar.gz: no such file" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    (tmp_path / "junk.tar.gz").write_bytes(b"not an archive")
    with pytest.raises(SystemExit) as exit_info:
        gpu_data.main(["--cifar", str(tmp_path / "junk.tar.gz"), "--photos", str(tmp_path / "junk.tar.gz"), "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].endswith(f"error: {tmp_path / 'junk.tar.gz'}: not a tar archive (plain, gzip, bzip2 or xz)"), errors
    assert list((tmp_path / "o").iterdir()) == []


def test_it_stops_at_a_corrupt_photo_and_names_it(tmp_path: Path, capsys) -> None:
    src = tmp_path / "src"
    write_images(src / "cifar10" / "train", 2, size=32)
    write_images(src / "photos", 3, size=40)
    (src / "photos" / "class1" / "0009.jpg").write_bytes(b"\xff\xd8 not really a JPEG")
    cifar, photos = _archive(tmp_path / "c.tar.gz", src, "cifar10"), _archive(tmp_path / "p.tar.gz", src, "photos")
    with pytest.raises(SystemExit) as exit_info:
        gpu_data.main(["--cifar", str(cifar), "--photos", str(photos), "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "photos/class1/0009.jpg: not a readable image" in errors[0], errors
    assert list((tmp_path / "o").iterdir()) == []  # no half-written archive left behind
