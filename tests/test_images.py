"""The bulk job's fast paths give the same numbers as the colour maths they stand in for."""

from __future__ import annotations

import io
import os
import unicodedata
import struct
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageCms, PngImagePlugin

from colorize import color, colorizer, data, images, imagesets, metrics, plots
from colorize.models import ModelConfig, build_model
from colorize.pipeline import for_inference
from tests.helpers import SRGB_PRIMARIES, encode, icc_profile, scene


def test_lightness_equals_the_lab_conversion() -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    assert np.abs(images.lightness(rgb) - color.rgb_to_lab_np(rgb)[..., 0]).max() < 1e-4
    grey = np.arange(256, dtype=np.uint8).reshape(16, 16)
    expected = color.rgb_to_lab_np(np.repeat(grey[..., None], 3, axis=-1))[..., 0]
    assert np.abs(images.lightness(grey) - expected).max() < 1e-4


def test_compose_matches_lab_to_rgb_on_the_whole_image() -> None:
    rng = np.random.default_rng(1)
    L = (rng.random((45, 70)) * 100).astype(np.float32)
    for spread in (5.0, 40.0, 120.0):  # from all in gamut to mostly out of it
        ab = rng.normal(0.0, spread, (2, 8, 8)).astype(np.float32)
        ab_full = F.interpolate(torch.from_numpy(ab)[None], size=L.shape, mode="bilinear", align_corners=False)
        lab = torch.cat((torch.from_numpy(L)[None, None], ab_full), dim=1)
        expected = color.to_uint8(color.lab_to_rgb(lab)[0].permute(1, 2, 0).numpy()).astype(int)
        difference = np.abs(images.compose(L, ab) - expected)
        # The sRGB curve is a table lookup: a level off only right at a rounding boundary.
        assert difference.max() <= 1 and (difference > 0).mean() < 0.005, (spread, (difference > 0).mean())


def test_the_inference_model_predicts_what_the_trained_one_does() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(width=4, depth=2, image_size=16))
    model.train()(torch.rand(8, 1, 16, 16))  # non-trivial BatchNorm running statistics
    model.eval()
    L = torch.rand(4, 1, 16, 16) * 100
    with torch.inference_mode():
        expected = colorizer.predict_ab(model, L)
        fused = for_inference(model).to(memory_format=torch.channels_last)
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
        assert torch.allclose(colorizer.predict_ab(fused, L), expected, atol=1e-3)


def test_compose_keeps_lightness_when_it_desaturates_out_of_gamut_chroma() -> None:
    L = np.full((4, 4), 50.0, dtype=np.float32)
    ab = np.full((2, 4, 4), 300.0, dtype=np.float32)  # far outside sRGB at any lightness
    rgb = images.compose(L, ab)
    lightness = color.rgb_to_lab_np(rgb)[..., 0]
    assert np.abs(lightness - 50.0).max() < 0.5
    assert np.ptp(rgb.astype(int), axis=-1).min() > 20  # still coloured, not grey


def test_compose_refuses_chroma_that_is_not_finite() -> None:
    # A ValueError fails the batch's inputs with a reason; NaN used to become an IndexError that failed the task.
    ab = np.full((2, 4, 4), np.nan, dtype=np.float32)
    with pytest.raises(ValueError, match="predicted NaN or infinite chroma"):
        images.compose(np.full((4, 4), 50.0, dtype=np.float32), ab)


@pytest.mark.parametrize("seed", range(4))
def test_an_image_outside_the_class_folders_is_refused_whatever_subset_is_drawn(tmp_path, seed: int) -> None:
    for i in range(20):
        (tmp_path / f"c{i % 2}").mkdir(exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / f"c{i % 2}" / f"{i}.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "loose.png")
    with pytest.raises(ValueError, match="found loose.png directly in it"):
        imagesets.load_folder(tmp_path, size=8, limit=5, seed=seed)


def test_an_image_set_follows_class_folders_that_are_symbolic_links(tmp_path) -> None:
    """As training does: train/test splits are often made of links to class folders."""
    for name in ("dog", "cat"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (8, 8), (200, 40, 40)).save(tmp_path / name / "0.png")
    (tmp_path / "train").mkdir()
    os.rename(tmp_path / "dog", tmp_path / "train" / "dog")
    os.symlink(tmp_path / "cat", tmp_path / "train" / "cat")

    found = imagesets.load_folder(tmp_path / "train", size=8)

    assert found.classes == ("cat", "dog") and len(found.rgb) == 2


def test_an_image_set_leaves_out_dot_folders_and_dot_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("dog", ".ipynb_checkpoints"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (8, 8), (200, 40, 40)).save(tmp_path / name / "0.png")
    Image.new("RGB", (8, 8), (200, 40, 40)).save(tmp_path / "dog" / "._1.png")

    found = imagesets.load_folder(tmp_path, size=8)

    assert found.classes == ("dog",) and len(found.rgb) == 1 and found.listed == 1
    assert "skipping 2 image(s) that are dot files or lie in dot folders" in capsys.readouterr().err


def test_a_grid_enlarges_small_images_a_whole_number_of_times_and_larger_ones_smoothly() -> None:
    """64 px in a 96 px cell by nearest neighbour made every other pixel two wide."""
    def checks(side: int) -> np.ndarray:
        return (np.indices((side, side)).sum(axis=0) % 2 * 255).astype(np.uint8)[None, ..., None].repeat(3, axis=-1)

    grid = np.asarray(plots.image_grid([("", checks(32)), ("", checks(64))]))
    tile = grid[16 : 16 + 96, :96, 0]  # below the 16 px header
    assert np.array_equal(tile, checks(32)[0, ..., 0].repeat(3, axis=0).repeat(3, axis=1))
    smooth = grid[16 : 16 + 96, 96:192, 0]  # fills its cell, resampled rather than pixels of two widths
    assert ((smooth > 0) & (smooth < 255)).mean() > 0.5


def test_class_folders_named_alike_up_to_unicode_normalisation_are_one_class(tmp_path: Path) -> None:
    """macOS tools leave names decomposed (NFD): test/ copied from there must match train/."""
    for split, form in (("train", "NFC"), ("test", "NFD")):
        for name in ("chien ü", "chat"):
            folder = tmp_path / split / unicodedata.normalize(form, name)
            folder.mkdir(parents=True)
            Image.new("RGB", (8, 8), (200, 40, 40)).save(folder / "0.png")
    train, test = (imagesets.load_folder(tmp_path / split, size=8) for split in ("train", "test"))
    assert train.classes == test.classes == ("chat", "chien ü")


def test_compose_works_in_blocks_of_pixels_with_the_same_result_whatever_the_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(4)
    L = rng.uniform(0, 100, (37, 53)).astype(np.float32)
    ab = rng.uniform(-90, 90, (2, 8, 8)).astype(np.float32)  # some of it out of gamut
    whole = images.compose(L, ab)
    monkeypatch.setattr(images, "_GAMUT_PIXELS", 100)  # 20 blocks, most across rows
    assert np.array_equal(images.compose(L, ab), whole)

    for shape in ((1100, 1), (1, 1100)):  # one column, one row: many blocks either way
        ramp = np.linspace(0, 100, 1100, dtype=np.float32).reshape(shape)
        rgb = images.compose(ramp, np.zeros((2, 1, 1), dtype=np.float32)).reshape(-1, 3)
        assert np.array_equal(rgb[:, 0], rgb[:, 1]) and np.array_equal(rgb[:, 1], rgb[:, 2])  # neutral grey
        assert np.all(np.diff(rgb[:, 0].astype(int)) >= 0) and rgb[0, 0] == 0 and rgb[-1, 0] == 255


def _png(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_16_bit_grey_png_reads_as_its_own_grey_for_training_evaluation_and_the_bulk_job() -> None:
    """PIL's convert("RGB") clips 16-bit grey at 255: the image read as solid white."""
    grey16 = np.linspace(5_000, 60_000, 64, dtype=np.uint16).reshape(8, 8)
    payload = _png(Image.fromarray(grey16))  # mode I;16
    expected_L = color.rgb_to_lab_np(np.repeat((grey16 / 65535.0)[..., None], 3, axis=-1))[..., 0]

    bulk_L = images.decode(payload, max_pixels=10**6).L
    train = data.prepare_batch({"bytes": np.array([payload], dtype=object)}, image_size=8, augment=False, with_rgb=True)
    probe = np.asarray(imagesets.square(Image.open(io.BytesIO(payload)), 8))

    assert np.abs(bulk_L - expected_L).max() < 0.01
    assert train["ok"].all() and np.abs(train["L"][0, 0] - expected_L).max() < 0.5  # 8 bits, not 16
    assert np.array_equal(train["rgb"][0], probe) and np.abs(probe[..., 0] - grey16 / 257.0).max() <= 0.5
    assert (probe[..., 0] == probe[..., 1]).all() and (probe[..., 1] == probe[..., 2]).all()


def test_a_png_with_megabytes_of_metadata_is_coloured_not_called_corrupt() -> None:
    """Pillow refuses a text or ICC chunk that unpacks to over 1 MB: Photoshop's XMP history,
    a large printer profile. The bulk job listed such PNGs as "corrupt or truncated"."""
    pixels = scene(np.random.default_rng(3), 48)
    info = PngImagePlugin.PngInfo()
    info.add_itxt("XML:com.adobe.xmp", "<rdf:li>history step</rdf:li>" * 100_000, zip=True)  # 3 MB
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", pnginfo=info)
    payload = buffer.getvalue()
    assert len(payload) < 100_000  # compressed: the metadata is not what makes the file large

    decoded = images.decode(payload, max_pixels=10**6)
    train = data.prepare_batch({"bytes": np.array([payload], dtype=object)}, image_size=8, augment=False, with_rgb=True)

    assert np.abs(decoded.L - images.lightness(pixels)).max() < 0.01
    assert train["ok"].all()


def test_a_32_bit_grey_image_past_16_bits_is_refused_not_clipped_to_white() -> None:
    """A 32-bit TIFF ramp to 131070 read its brighter half as white, for the bulk job and training alike."""
    ramp = np.linspace(0, 131_070, 64).astype(np.int32).reshape(8, 8)
    buffer = io.BytesIO()
    Image.fromarray(ramp, mode="I").save(buffer, format="TIFF")
    payload = buffer.getvalue()

    with pytest.raises(images.ImageError, match=r"^32-bit grey with values up to 131070, past the 16-bit range"):
        images.decode(payload, max_pixels=10**6)
    train = data.prepare_batch({"bytes": np.array([payload], dtype=object)}, image_size=8, augment=False)
    assert not train["ok"].any()
    # The same in 16 bits is read as its grey, and signed 16-bit values below 0 (elevation maps) as black.
    buffer = io.BytesIO()
    Image.fromarray(ramp // 2 - 3, mode="I").save(buffer, format="TIFF")
    L = images.decode(buffer.getvalue(), max_pixels=10**6).L
    assert L[0, 0] == 0 and L.max() > 99.9


@pytest.mark.parametrize(("head", "name"), [
    (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", "HEIF/HEIC"),  # an iPhone photo's first box
    (b"\x00\x00\x00\x1cftypmif1\x00\x00\x00\x00mif1heic", "HEIF/HEIC"),
    (b"\xff\x0a\xfa\x1f", "JPEG XL"),  # a bare codestream
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n\x00\x00\x00\x14ftypjxl ", "JPEG XL"),  # the container
])
def test_an_image_format_pillow_cannot_read_is_named(head: bytes, name: str) -> None:
    """Phone archives hold HEIC photos, listed as "not an image", as if damaged."""
    with pytest.raises(images.ImageError, match=rf"^a {name} image, a format this Pillow cannot decode: convert it"):
        images.decode(head + bytes(200), max_pixels=10**6)
    with pytest.raises(images.ImageError, match=r"^not an image \(unrecognised format\)$"):
        images.decode(b"\x00\x00\x00\x18ftypisom" + bytes(200), max_pixels=10**6)  # an MP4 video


def _png_declaring(width: int, height: int) -> bytes:
    """A small PNG whose header declares width x height pixels (a decompression bomb's header)."""
    real = bytearray(_png(Image.new("L", (4, 4))))
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    real[12:29] = ihdr  # after the signature and the chunk length
    real[29:33] = struct.pack(">I", zlib.crc32(ihdr))
    return bytes(real)


def _tiff_declaring(width: int, height: int) -> bytes:
    """A 1-bit group4 TIFF of width x height, a few KB, cut short so that it is never decoded."""
    buffer = io.BytesIO()
    Image.new("1", (width, height)).save(buffer, format="TIFF", compression="group4")
    return buffer.getvalue()[:-200]


@pytest.mark.parametrize("make", [_png_declaring, _tiff_declaring], ids=["png", "tiff"])
def test_max_pixels_decides_alone_even_above_pillow_s_own_limit(make) -> None:  # noqa: ANN001
    """Pillow refuses over 179 M pixels when opening, and TIFF checks again while loading."""
    bomb = make(14_000, 14_000)  # 196 M pixels

    with pytest.raises(images.ImageError, match=r"over --max-pixels 80,000,000"):
        images.decode(bomb, max_pixels=80_000_000)
    with pytest.raises(images.ImageError, match="corrupt or truncated") as raised:  # past the size checks, to the pixels
        images.decode(bomb, max_pixels=300_000_000)
    assert "exceeds limit" not in str(raised.value)
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # Pillow's own, restored for everyone else


def test_training_decodes_a_large_jpeg_at_a_reduced_scale_with_the_same_picture() -> None:
    """libjpeg's 1/2-1/8 scale decoding (JPEG draft mode) is most of a large photo's input work saved."""
    photo = Image.fromarray(scene(np.random.default_rng(5), 600)).resize((800, 600))
    payload = encode(photo, "JPEG")
    batch = {"bytes": np.array([payload], dtype=object)}

    drafted = data.prepare_batch(batch, image_size=64, augment=False, with_rgb=True)["rgb"][0]
    opened = data.draft(Image.open(io.BytesIO(payload)), 64)
    assert opened.size == (200, 150)  # decoded at 1/4 scale, still more than a 64 px crop needs at 0.6 of 150
    whole = data._crop_resize(Image.open(io.BytesIO(payload)).convert("RGB"), 64, None)  # decoded at full size

    assert not np.array_equal(drafted, whole)
    assert metrics.per_image_psnr(drafted[None], whole[None])[0] > 30  # the same picture


def _read_everywhere(payload: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image's bulk-job lightness, training RGB and evaluation (image set) RGB."""
    bulk_L = images.decode(payload, max_pixels=10**6).L
    train = data.prepare_batch({"bytes": np.array([payload], dtype=object)}, image_size=4, augment=False, with_rgb=True)
    assert train["ok"].all()
    return bulk_L, train["rgb"][0], np.asarray(imagesets.square(Image.open(io.BytesIO(payload)), 4))


def test_an_embedded_colour_profile_is_applied_for_the_bulk_job_training_and_evaluation() -> None:
    """Read as sRGB, a linear-gamma grey of 128 was L 54 instead of 76, and red in a space whose
    red is sRGB's green kept red's lightness (53) instead of green's (88)."""
    grey = Image.new("L", (4, 4), 128)
    bulk_L, train, probe = _read_everywhere(encode(grey, "PNG", icc_profile=icc_profile("GRAY", gamma=1.0)))
    assert np.allclose(bulk_L, 116 * (128 / 255) ** (1 / 3) - 16, atol=0.3)  # 76.2
    assert np.array_equal(train, probe) and np.abs(train.astype(int) - 188).max() <= 1  # linear 0.502 in sRGB
    assert np.allclose(images.decode(encode(grey, "PNG"), max_pixels=10**6).L, 53.6, atol=0.1)  # no profile: sRGB

    swapped = dict(SRGB_PRIMARIES, r=SRGB_PRIMARIES["g"], g=SRGB_PRIMARIES["r"])
    for fmt in ("PNG", "JPEG"):  # a rotated JPEG too: the profile survives EXIF orientation
        exif = Image.Exif()
        exif[0x0112] = 6
        red = Image.new("RGB", (4, 4), (255, 0, 0))
        profile = icc_profile("RGB ", gamma=1.0, primaries=swapped)
        bulk_L, train, probe = _read_everywhere(encode(red, fmt, icc_profile=profile, exif=exif, quality=100))
        assert np.allclose(bulk_L, 87.7, atol=1.0)  # sRGB green's lightness
        assert np.abs(train.astype(int) - (0, 255, 0)).max() <= 3 and np.array_equal(train, probe)
    ycbcr = encode(Image.new("RGB", (4, 4), (255, 0, 0)).convert("YCbCr"), "TIFF", icc_profile=profile)  # opens as YCbCr
    bulk_L, train, _ = _read_everywhere(ycbcr)
    assert np.allclose(bulk_L, images.lightness(train), atol=0.5) and bulk_L.mean() > 80


def test_an_exif_rotated_photo_is_read_upright_for_the_bulk_job_training_and_evaluation() -> None:
    """Stored 40x20, red on the left and blue on the right, with EXIF 'rotate 90 degrees clockwise':
    it shows 20x40, red above blue."""
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20], pixels[:, 20:] = (220, 30, 30), (30, 30, 220)
    exif = Image.Exif()
    exif[0x0112] = 6
    bulk_L, train, probe = _read_everywhere(encode(Image.fromarray(pixels), "JPEG", exif=exif, quality=95))
    assert bulk_L.shape == (40, 20)
    for rgb in (train, probe):  # the centre square: its top rows red, its bottom rows blue
        assert (rgb[0, :, 0] > rgb[0, :, 2] + 100).all() and (rgb[-1, :, 2] > rgb[-1, :, 0] + 100).all(), rgb


def test_training_crops_at_random_scales_and_places_and_flips_half_the_images() -> None:
    """The README's "random crop and flip": every other test reads with augment=False."""
    x, y = np.meshgrid(np.arange(64), np.arange(64))
    ramp = np.stack([x * 4, y * 4, np.full_like(x, 128)], axis=-1).astype(np.uint8)  # red grows rightwards, green down
    batch = {"bytes": np.array([encode(Image.fromarray(ramp), "PNG")] * 64, dtype=object)}
    centre = data.prepare_batch(batch, image_size=8, augment=False, with_rgb=True)["rgb"].astype(int)
    assert (centre == centre[0]).all()
    crops = data.prepare_batch(batch, image_size=8, augment=True, with_rgb=True)["rgb"].astype(int)
    red_across = crops[:, 4, -1, 0] - crops[:, 4, 0, 0]  # right edge minus left: negative where flipped
    assert (red_across > 0).sum() >= 16 and (red_across < 0).sum() >= 16
    assert len(set(np.abs(red_across))) > 4  # crops of several widths
    assert len(set(crops[:, 0, 0, 1])) > 4  # from several heights
    assert not (crops[red_across > 0] == centre[0]).all(axis=(1, 2, 3)).all()


def test_an_srgb_a_mismatched_or_an_unreadable_profile_leaves_the_pixels_as_they_are() -> None:
    pixels = scene(np.random.default_rng(2), 8)
    as_srgb = _read_everywhere(encode(Image.fromarray(pixels), "PNG"))
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    for profile in (srgb, b"not an ICC profile", icc_profile("GRAY", gamma=1.0)):  # a grey profile on RGB pixels
        read = _read_everywhere(encode(Image.fromarray(pixels), "PNG", icc_profile=profile))
        assert all(np.array_equal(a, b) for a, b in zip(read, as_srgb, strict=True))
    assert images._profile_transform(srgb, "RGB") is None  # found to be sRGB, so never applied


def test_a_grey_profile_is_a_table_of_256_with_the_full_transforms_result() -> None:
    """A grey scan's profile went through LittleCMS pixel by pixel to RGB (1.8-2.6 times the
    decode); a grey's colour depends on its value alone, so a table gives the same pixels."""
    grey = Image.fromarray(np.random.default_rng(6).integers(0, 256, (32, 48), dtype=np.uint8), mode="L")
    for gamma in (1.0, 1.8, 2.4):
        profile = icc_profile("GRAY", gamma=gamma)
        full = ImageCms.buildTransform(ImageCms.ImageCmsProfile(io.BytesIO(profile)), images._SRGB_PROFILE, "L", "RGB")
        expected = np.asarray(full.apply(grey))
        bulk_L, *_ = _read_everywhere(encode(grey, "PNG", icc_profile=profile))
        assert np.array_equal(bulk_L, images.lightness(expected))
        assert np.array_equal(np.asarray(images.to_rgb(Image.open(io.BytesIO(encode(grey, "PNG", icc_profile=profile))))),
                              expected)


def test_profiles_that_differ_only_in_their_date_share_one_transform() -> None:
    """Tools that write a fresh profile into each file differ in its header's date and ID; each
    file missed the cache and paid for a transform and its sRGB check (4.5-9.5 ms)."""
    images._profile_transform.cache_clear()
    profile = bytearray(icc_profile("RGB ", gamma=1.0, primaries=SRGB_PRIMARIES))
    pixels = Image.fromarray(scene(np.random.default_rng(7), 8))
    results = []
    for day in range(40):  # more than the cache holds
        profile[24:36], profile[84:100] = day.to_bytes(12, "big"), day.to_bytes(16, "big")
        pixels.info["icc_profile"] = bytes(profile)
        results.append(np.asarray(images.to_srgb(pixels)))
    assert images._profile_transform.cache_info().misses == 1
    assert all(np.array_equal(r, results[0]) for r in results) and not np.array_equal(results[0], np.asarray(pixels))


def test_float_images_are_unreadable_for_training_as_for_the_bulk_job() -> None:
    """A 32-bit float TIFF (mode F, values 0..1) came out of convert("RGB") black, and was
    trained on and scored as a black image while the bulk job refused it."""
    payload = encode(Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32), mode="F"), "TIFF")
    with pytest.raises(images.ImageError, match="unsupported image mode 'F'"):
        images.decode(payload, max_pixels=10**6)
    assert not data.prepare_batch({"bytes": np.array([payload], dtype=object)}, image_size=4, augment=False)["ok"].any()
    with pytest.raises(images.ImageError):  # evaluation's image sets count it as unreadable
        imagesets.square(Image.open(io.BytesIO(payload)), 4)


def test_packed_lightness_composes_within_one_level_of_the_float_one() -> None:
    """Model actors get L as uint16, half float32's bytes: rows of 6 M-pixel images grew an
    actor by 38 MB each as float32, 13 MB packed."""
    L = np.random.default_rng(4).uniform(-1.0, 101.0, (64, 64)).astype(np.float32)  # a little past both ends
    packed = images.pack_lightness(L)
    assert packed.dtype == np.uint16 and packed.nbytes == L.nbytes // 2
    back = images.unpack_lightness(packed)
    assert back.dtype == np.float32 and np.abs(back - np.clip(L, 0, 100)).max() <= 0.00077
    assert images.unpack_lightness(L) is L  # float lightness, as CPU tasks keep it, passes through
    ab = np.random.default_rng(5).normal(0, 25, (2, 4, 4)).astype(np.float32)
    assert np.abs(images.compose(back, ab).astype(int) - images.compose(np.clip(L, 0, 100), ab)).max() <= 1


def test_a_png_whose_image_data_was_damaged_is_refused_and_one_cut_after_it_is_read() -> None:
    """Pillow stops once every row is decoded, before the checksums: a zero-filled tail (an
    unfinished preallocated download) gave wrong rows, coloured and written."""
    y, x = np.mgrid[0:240, 0:320]
    noise = np.random.default_rng(0).normal(0, 6, (240, 320, 3))
    picture = np.clip(np.stack([x * 0.8, y * 1.0, (x + y) * 0.4], -1) + noise, 0, 255).astype(np.uint8)  # photo-like
    good = encode(Image.fromarray(picture), "PNG")
    zeroed = good[: int(len(good) * 0.99)] + bytes(len(good) - int(len(good) * 0.99))  # zlib took it: 3 of 240 rows wrong
    with pytest.raises(images.ImageError, match=r"corrupt PNG data: broken PNG file \(bad header checksum in b'IDAT'\)"):
        images.decode(zeroed, max_pixels=10**6)
    whole = images.decode(good, max_pixels=10**6)
    text = b"Comment\x00written after the image data"  # an ancillary chunk's bad CRC, which libpng only warns of
    noted = good[:-12] + struct.pack(">I", len(text)) + b"tEXt" + text + b"\x00\x00\x00\x00" + good[-12:]
    np.testing.assert_array_equal(images.decode(noted, max_pixels=10**6).L, whole.L)
    np.testing.assert_array_equal(images.decode(good[:-12], max_pixels=10**6).L, whole.L)  # no end chunk: all rows there
    frames = io.BytesIO()
    Image.fromarray(picture).save(frames, "PNG", save_all=True, append_images=[Image.fromarray(picture[::-1])])
    np.testing.assert_array_equal(images.decode(frames.getvalue(), max_pixels=10**6).L, whole.L)  # APNG: its first frame
