"""Models and the training step, in plain torch: shapes, gradients, learning, weights files."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from colorize import color, colorizer, models, quantize, storage
from colorize.models import GAN_MIN_SIZE, ModelConfig, PatchDiscriminator, build_model, load_backbone, without_colour_head
from colorize.objectives import Adversary, recalibrate_batchnorm, resolve_precision
from colorize.train import train_step
from tests.helpers import scene

CONFIGS = [
    ModelConfig(arch="unet", width=8, depth=2, image_size=16),
    ModelConfig(arch="unet", width=4, depth=3, image_size=16),
    ModelConfig(arch="autoencoder", width=8, depth=2, image_size=16),
    ModelConfig(arch="unet", width=8, depth=2, image_size=16, head="classification"),
    ModelConfig(arch="unet", width=8, depth=2, image_size=16, attention=True),
]


def native_loss(config: ModelConfig) -> str:
    return "ce" if config.head == "classification" else "mse"


def lab_batch(n: int = 16, size: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    rgb = np.stack([scene(rng, size) for _ in range(n)])
    lab = torch.from_numpy(color.rgb_to_lab_np(rgb)).permute(0, 3, 1, 2)
    return {"L": lab[:, :1].contiguous(), "ab": lab[:, 1:].contiguous()}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.arch}-w{c.width}-d{c.depth}-{c.head}-att{c.attention:d}")
def test_shapes_finite_and_every_parameter_gets_a_gradient(config: ModelConfig) -> None:
    torch.manual_seed(0)
    model = build_model(config)
    batch = lab_batch(4)
    ab = colorizer.predict_ab(model, batch["L"])
    rgb = colorizer.predict_rgb(model, batch["L"])
    assert ab.shape == (4, 2, 16, 16)
    assert rgb.shape == (4, 3, 16, 16)
    assert torch.isfinite(ab).all() and torch.isfinite(rgb).all()
    assert rgb.min() >= 0 and rgb.max() <= 1

    colorizer.loss(model, batch["L"], batch["ab"], native_loss(config)).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"no finite gradient for {missing}"


@pytest.mark.parametrize("config", CONFIGS[::2], ids=lambda c: f"{c.arch}-{c.head}")
def test_train_step_lowers_the_loss_on_a_tiny_batch(config: ModelConfig) -> None:
    torch.manual_seed(0)
    model = build_model(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    batch = lab_batch(16)
    losses = [float(train_step(model, batch, optimizer, loss=native_loss(config))) for _ in range(40)]
    assert losses[-1] < (0.5 if config.head == "regression" else 0.8) * losses[0], losses


@pytest.mark.parametrize("config", [CONFIGS[0], CONFIGS[3], CONFIGS[4]], ids=("regression", "classification", "attention"))
def test_a_bf16_step_on_the_cpu_learns_and_keeps_float32_weights(config: ModelConfig) -> None:
    # bf16 autocast runs on any CPU (emulated where the instructions are missing, only slower).
    torch.manual_seed(0)
    model = build_model(config).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    batch = lab_batch(16)
    loss = "psnr" if config.head == "regression" else "ce"
    losses = [float(train_step(model, batch, optimizer, loss=loss, colourfulness_weight=0.05 if loss == "psnr" else 0.0,
                               precision="bf16")) for _ in range(30)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0] - (3.0 if loss == "psnr" else 0.1 * losses[0]), losses
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


def test_bf16_and_float32_steps_agree_to_bf16_precision() -> None:
    batch = lab_batch(8)
    values = {}
    for precision in ("float32", "bf16"):
        torch.manual_seed(0)
        model = build_model(CONFIGS[0])
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # the loss of the same weights, twice
        values[precision] = float(train_step(model, batch, optimizer, loss="psnr", precision=precision))
    assert values["bf16"] == pytest.approx(values["float32"], abs=0.3)  # dB; not equal: bf16 is really used
    assert values["bf16"] != values["float32"]


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        pytest.skip("no /proc/cpuinfo to read the CPU's instructions from")
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


def test_auto_precision_is_bf16_where_the_device_has_it_fast() -> None:
    cpu = torch.device("cpu")
    has_bf16_units = bool({"avx512_bf16", "amx_tile"} & _cpu_flags())  # read apart from torch's own probes
    assert resolve_precision("auto", cpu) == ("bf16" if has_bf16_units else "float32")
    # On CUDA: bf16 on GPUs with bf16 units (compute capability 8 and later, Ampere on).
    ampere = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)
    assert resolve_precision("auto", torch.device("cuda")) == ("bf16" if ampere else "float32")
    assert resolve_precision("float32", torch.device("cuda")) == "float32"
    assert resolve_precision("bf16", cpu) == "bf16"
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp16", cpu)


def test_a_channels_last_model_saves_the_same_weights_file() -> None:
    torch.manual_seed(0)
    model = build_model(CONFIGS[1])
    plain = colorizer.weights_bytes(model)
    assert colorizer.weights_bytes(model.to(memory_format=torch.channels_last)) == plain
    assert colorizer.weights_id(plain) == colorizer.weights_id(colorizer.weights_bytes(colorizer.model_from_bytes(plain)))


def test_a_classification_head_learns_the_colours_of_its_batch() -> None:
    torch.manual_seed(0)
    model = build_model(CONFIGS[3])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    batch = lab_batch(16)
    prior = quantize.class_prior([batch["ab"]], model.ab_bins)
    weights = quantize.rebalance_weights(prior)
    for _ in range(100):
        train_step(model, batch, optimizer, loss="ce", class_weights=weights)
    with torch.inference_mode():
        error = (colorizer.predict_ab(model.eval(), batch["L"]) - batch["ab"]).abs().mean()
    assert error < 0.5 * batch["ab"].abs().mean(), "the annealed mean should land near the true colours"


def test_the_adversarial_step_trains_both_networks() -> None:
    torch.manual_seed(0)
    model = build_model(CONFIGS[0])
    critic = PatchDiscriminator(width=8)
    adversary = Adversary(critic, torch.optim.Adam(critic.parameters(), lr=1e-3), weight=0.1)
    before = [p.detach().clone() for p in critic.parameters()]
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    batch = lab_batch(16)
    losses = [float(train_step(model, batch, optimizer, adversary=adversary)) for _ in range(30)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert any(not torch.equal(b, p) for b, p in zip(before, critic.parameters())), "the critic never stepped"
    assert critic(torch.zeros(2, 3, 16, 16)).shape[1] == 1


def test_the_critic_trains_down_to_its_minimum_size_and_no_further() -> None:
    critic = PatchDiscriminator().train()
    assert critic(torch.zeros(1, 3, GAN_MIN_SIZE, GAN_MIN_SIZE)).isfinite().all()
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        critic(torch.zeros(1, 3, GAN_MIN_SIZE - 4, GAN_MIN_SIZE - 4))


def test_temperature_is_an_inference_flag(tmp_path) -> None:
    model = build_model(CONFIGS[3]).eval()
    path = tmp_path / "m.pt"
    path.write_bytes(colorizer.weights_bytes(model))
    L = lab_batch(2)["L"]
    default, _ = colorizer.load_weights(str(path))
    cold, _ = colorizer.load_weights(str(path), temperature=0.1)
    assert default.config.temperature == 0.38 and cold.config.temperature == 0.1
    with torch.inference_mode():
        assert not torch.allclose(colorizer.predict_ab(default, L), colorizer.predict_ab(cold, L))
        assert torch.allclose(colorizer.predict_ab(cold, L), colorizer.predict_ab(default, L, temperature=0.1))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.arch}-{c.head}-att{c.attention:d}")
def test_saturation_scales_the_predicted_chroma_and_keeps_the_lightness(config: ModelConfig, tmp_path) -> None:
    torch.manual_seed(0)
    model = build_model(config).eval()
    path = tmp_path / "m.pt"
    path.write_bytes(colorizer.weights_bytes(model))
    L = lab_batch(2)["L"]
    as_trained, _ = colorizer.load_weights(str(path))
    vivid, _ = colorizer.load_weights(str(path), saturation=1.5)
    grey, _ = colorizer.load_weights(str(path), saturation=0)
    assert as_trained.config.saturation == 1.0 and vivid.config.saturation == 1.5
    with torch.inference_mode():
        ab = colorizer.predict_ab(as_trained, L)
        torch.testing.assert_close(colorizer.predict_ab(vivid, L), 1.5 * ab)
        torch.testing.assert_close(colorizer.predict_ab(vivid, L, flip=True), 1.5 * colorizer.predict_ab(as_trained, L, flip=True))
        # In RGB: the grey model gives neutral grey, and the vivid one more chroma at the same lightness
        # (the autoencoder keeps its own lightness, the U-Nets the input's).
        rgb = {name: colorizer.predict_rgb(m, L) for name, m in (("as", as_trained), ("vivid", vivid), ("grey", grey))}
    lab = {name: color.rgb_to_lab(x) for name, x in rgb.items()}
    chroma = {name: x[:, 1:].norm(dim=1).mean().item() for name, x in lab.items()}
    assert chroma["grey"] < 0.1 and chroma["vivid"] > 1.2 * chroma["as"] > 0, chroma
    torch.testing.assert_close(lab["vivid"][:, :1], lab["as"][:, :1], atol=0.5, rtol=0)
    # Written from the model, the weights file carries it; the config refuses what is out of range.
    again = colorizer.model_from_bytes(colorizer.weights_bytes(vivid))
    assert again.config.saturation == 1.5
    for bad in (-0.1, 4.5, float("nan")):
        with pytest.raises(ValueError, match="saturation must be in"):
            colorizer.load_weights(str(path), saturation=bad)


@pytest.mark.parametrize("config", [*CONFIGS, ModelConfig(width=4, depth=2, image_size=16, classes=3)],
                         ids=lambda c: f"{c.arch}-{c.head}-att{c.attention:d}-classes{c.classes}")
def test_flip_averaging_is_the_mean_of_the_two_views_and_mirror_symmetric(config: ModelConfig) -> None:
    torch.manual_seed(0)
    model = build_model(config).eval()
    if config.head == "classification":
        with torch.no_grad():
            model.head.weight.mul_(30)  # from near-uniform logits to an opinionated random model
    L = lab_batch(3)["L"]
    with torch.inference_mode():
        rgb = colorizer.predict_rgb(model, L, flip=True)
        # A mirrored image is coloured as the mirror of the image's colouring...
        torch.testing.assert_close(colorizer.predict_rgb(model, L.flip(-1), flip=True), rgb.flip(-1), atol=1e-5, rtol=0)
        # ...which a random model does not do by itself...
        assert not torch.allclose(colorizer.predict_rgb(model, L.flip(-1)), colorizer.predict_rgb(model, L).flip(-1), atol=1e-3)
        if config.arch == "unet":
            # ...and the chroma is the mean of the image's and its mirror's.
            views = colorizer.predict_ab(model, L), colorizer.predict_ab(model, L.flip(-1)).flip(-1)
            torch.testing.assert_close(colorizer.predict_ab(model, L, flip=True), (views[0] + views[1]) / 2, atol=1e-4, rtol=0)


def test_weights_files_from_before_the_head_option_still_load() -> None:
    config = ModelConfig.from_dict({"arch": "unet", "width": 8, "depth": 2, "image_size": 16})
    assert config.head == "regression" and not config.attention


def test_a_loss_that_does_not_fit_the_head_is_refused() -> None:
    batch = lab_batch(2)
    with pytest.raises(ValueError, match="does not fit"):
        colorizer.loss(build_model(CONFIGS[3]), batch["L"], batch["ab"], "mse")
    with pytest.raises(ValueError, match="does not fit"):
        colorizer.loss(build_model(CONFIGS[0]), batch["L"], batch["ab"], "ce")


# What each loss is, on the normalised ab the regression head predicts (psnr: its own test below).
REFERENCE_LOSSES = {"mse": F.mse_loss, "l1": F.l1_loss, "huber": lambda pred, target: F.smooth_l1_loss(pred, target, beta=0.1)}


@pytest.mark.parametrize("kind", colorizer.REGRESSION_LOSSES)
def test_every_regression_loss_is_what_it_says_and_trains_every_weight(kind: str) -> None:
    torch.manual_seed(0)
    model = build_model(CONFIGS[0])
    batch = lab_batch(2)
    value = colorizer.loss(model, batch["L"], batch["ab"], kind)
    value.backward()
    assert torch.isfinite(value)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    if kind in REFERENCE_LOSSES:
        with torch.no_grad():
            pred = model(color.normalize_l(batch["L"]))
        assert value.item() == pytest.approx(REFERENCE_LOSSES[kind](pred, color.normalize_ab(batch["ab"])).item(), rel=1e-5)


def test_the_psnr_loss_is_minus_the_mean_psnr_that_evaluation_reports() -> None:
    from colorize import metrics

    batch = lab_batch(6)
    pred_ab = batch["ab"] * 0.5 + 3.0  # a muted, tinted guess
    value = colorizer.psnr_loss(batch["L"], pred_ab, batch["ab"])

    def srgb8(ab: torch.Tensor) -> np.ndarray:
        return color.to_uint8(color.lab_to_rgb(torch.cat((batch["L"], ab), dim=1)).permute(0, 2, 3, 1).numpy())

    reported = metrics.per_image_psnr(srgb8(pred_ab), srgb8(batch["ab"])).mean()
    assert float(-value) == pytest.approx(reported, abs=0.3)  # 8-bit rounding and the floor aside
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as train_step runs it in bf16: still float32
        assert float(colorizer.psnr_loss(batch["L"], pred_ab, batch["ab"])) == pytest.approx(float(value), abs=1e-4)
    exact = colorizer.psnr_loss(batch["L"], batch["ab"], batch["ab"])
    assert float(exact) == pytest.approx(10 * np.log10(colorizer.PSNR_LOSS_FLOOR), abs=1e-3)


def test_the_psnr_loss_has_finite_gradients_where_colours_leave_the_gamut() -> None:
    # Far outside the gamut, sRGB clips at 0 and 1; the clipped pixels must pass zero gradient, not NaN.
    batch = lab_batch(2)
    pred_ab = (batch["ab"] * 8.0 + 40.0).requires_grad_()
    colorizer.psnr_loss(batch["L"], pred_ab, batch["ab"]).backward()
    assert torch.isfinite(pred_ab.grad).all() and pred_ab.grad.abs().sum() > 0


def test_the_psnr_loss_has_finite_gradients_on_black_and_white_pixels() -> None:
    # Black pixels make linear RGB exactly 0, where the sRGB curve's power branch has an infinite
    # slope. torch 2.11 on the GPU machine let gradient through clamp's bound there and the weights
    # turned to NaN; torch 2.14 stops it at the clamp, so the curve itself is checked at 0 too.
    L = torch.zeros(2, 1, 8, 8)
    L[1] = 100.0
    pred_ab = torch.zeros(2, 2, 8, 8, requires_grad=True)
    colorizer.psnr_loss(L, pred_ab, torch.zeros(2, 2, 8, 8)).backward()
    assert torch.isfinite(pred_ab.grad).all()
    linear = torch.zeros(4, requires_grad=True)
    color._srgb_curve(linear).sum().backward()
    assert torch.equal(linear.grad, torch.full((4,), 12.92))


def test_the_psnr_loss_weighs_each_image_by_one_over_its_error() -> None:
    # Image 1 is five times as wrong as image 0: plain MSE pushes hardest on image 1, the mean
    # PSNR on image 0 (5x the error is 25x the MSE, so a fifth of the gradient per unit error).
    batch = lab_batch(2)
    truth = batch["ab"]
    pred_ab = (truth + torch.tensor([2.0, 10.0]).view(2, 1, 1, 1)).requires_grad_()
    colorizer.psnr_loss(batch["L"], pred_ab, truth).backward()
    psnr_grad = pred_ab.grad.abs().sum(dim=(1, 2, 3))
    pred_ab.grad = None
    torch.nn.functional.mse_loss(pred_ab, truth).backward()
    mse_grad = pred_ab.grad.abs().sum(dim=(1, 2, 3))
    assert mse_grad[1] > 3 * mse_grad[0]
    assert psnr_grad[0] > 3 * psnr_grad[1]


def test_colourfulness_in_torch_is_the_metric_and_differentiable_on_grey() -> None:
    from colorize import metrics

    rng = np.random.default_rng(1)
    images = np.stack([scene(rng, 16) for _ in range(6)])
    images[0] = images[0, ..., :1]  # one grey image: zero colourfulness
    torch_cf = colorizer.colourfulness(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0)
    assert torch_cf.numpy() == pytest.approx(metrics.colourfulness(images), abs=0.01)
    grey = torch.full((1, 3, 8, 8), 0.5, requires_grad=True)
    colorizer.colourfulness(grey).sum().backward()
    assert torch.isfinite(grey.grad).all()


def test_the_colourfulness_term_asks_each_image_for_its_own_colour_not_more() -> None:
    batch = lab_batch(8)
    L, ab = batch["L"], batch["ab"]
    assert float(colorizer.colourfulness_gap(L, ab, ab)) == pytest.approx(0.0, abs=1e-3)
    for scale, sign in ((0.3, -1), (1.5, 1)):  # muted: more colour lowers it; garish: less does
        s = torch.tensor(scale, requires_grad=True)
        colorizer.colourfulness_gap(L, s * ab, ab).backward()
        assert sign * float(s.grad) > 0, (scale, float(s.grad))
    tint = torch.full_like(ab, 5.0, requires_grad=True)  # a grey truth: any colour is a gap
    gap = colorizer.colourfulness_gap(L, tint, torch.zeros_like(ab))
    gap.backward()
    assert gap.item() > 1 and torch.isfinite(tint.grad).all()
    model = build_model(CONFIGS[0])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    assert np.isfinite(float(train_step(model, batch, optimizer, loss="psnr", colourfulness_weight=0.05)))


def test_unknown_loss_is_refused() -> None:
    batch = lab_batch(2)
    with pytest.raises(ValueError, match="loss must be one of"):
        colorizer.loss(build_model(CONFIGS[0]), batch["L"], batch["ab"], "perceptual")


def test_weights_round_trip_without_unpickling_objects() -> None:
    model = build_model(CONFIGS[0]).eval()
    raw = colorizer.weights_bytes(model)
    again = colorizer.model_from_bytes(raw)
    assert again.config == model.config
    L = lab_batch(2)["L"]
    with torch.inference_mode():
        assert torch.equal(colorizer.predict_ab(model, L), colorizer.predict_ab(again, L))
    assert colorizer.weights_id(raw) == colorizer.weights_id(colorizer.weights_bytes(again))


class Payload:
    """Unpickling this would run code: a weights loader must refuse it."""

    def __reduce__(self):
        return (print, ("unpickled!",))


def test_a_pickled_object_in_a_weights_file_is_refused(tmp_path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"config": CONFIGS[0].to_dict(), "state_dict": {}, "x": Payload()}, path)
    with pytest.raises(ValueError, match="not a colorize weights file") as refused:
        colorizer.load_weights(str(path))
    # torch's cause, not its advice to load with weights_only=False, and no terminal escapes
    assert re.search(r"\(UnpicklingError: Unsupported global: GLOBAL [\w.]*print was not an allowed global by default\.\)$",
                     str(refused.value))
    assert "\x1b" not in str(refused.value) and "weights_only" not in str(refused.value)
    # A global from a blocked module: torch gives its cause after the advice, with no marker.
    torch.save({"config": CONFIGS[0].to_dict(), "state_dict": {}, "x": Blocked()}, path)
    with pytest.raises(ValueError, match=r"\(UnpicklingError: Trying to load unsupported GLOBAL posix.system whose module "
                                         r"posix is blocked\.\)$"):
        colorizer.load_weights(str(path))


class Blocked:
    def __reduce__(self):
        return (os.system, ("true",))


def test_a_weights_file_with_flipped_bits_is_refused_and_a_folder_is_pointed_at_its_model(tmp_path) -> None:
    """torch never checks a zip's checksums: a damaged copy loaded, and coloured with wrong weights."""
    raw = bytearray(colorizer.read_weights(None))
    middle = len(raw) // 2
    raw[middle : middle + 4000] = bytes(b ^ 0xFF for b in raw[middle : middle + 4000])
    (tmp_path / "damaged.pt").write_bytes(raw)
    with pytest.raises(ValueError, match=r"damaged.pt: a damaged weights file: the checksum of its part '[^']+' does not match"):
        colorizer.load_weights(str(tmp_path / "damaged.pt"))
    model, _ = colorizer.load_weights(None)
    torch.serialization.set_crc32_options(False)  # a documented torch option: no checksums to check
    try:
        torch.save({"config": model.config.to_dict(), "state_dict": model.state_dict()}, tmp_path / "unchecked.pt")
    finally:
        torch.serialization.set_crc32_options(True)
    colorizer.load_weights(str(tmp_path / "unchecked.pt"))
    # Trained larger than training now allows (1024 px), it still loads.
    torch.save({"config": {**model.config.to_dict(), "image_size": 2048}, "state_dict": model.state_dict()}, tmp_path / "big.pt")
    assert colorizer.load_weights(str(tmp_path / "big.pt"))[0].config.image_size == 2048

    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(storage.StorageError, match=r"run: a folder, not a weights file; pass a .pt file"):
        colorizer.load_weights(str(run))
    (run / "model.pt").write_bytes(colorizer.read_weights(None))
    with pytest.raises(storage.StorageError, match=f"run: a folder, not a weights file; pass {run}/model.pt$"):
        colorizer.load_weights(str(run))


def test_bundled_names_the_bundled_model_wherever_weights_are_taken() -> None:
    """As `train --init bundled` always did; `probe --weights bundled` was 'no such weights file'."""
    assert colorizer.load_weights("bundled")[1] == colorizer.load_weights(None)[1]


def test_a_weights_file_whose_tensors_do_not_fit_its_config_is_refused_before_building(tmp_path) -> None:
    state = build_model(CONFIGS[0]).state_dict()
    # A width this large would take over 100 GiB if built before the shapes were compared.
    huge = {**CONFIGS[0].to_dict(), "width": 4096, "depth": 3}
    torch.save({"config": huge, "state_dict": state}, tmp_path / "huge.pt")
    with pytest.raises(ValueError, match=r"huge.pt: a colorize weights file that cannot be used: its tensors do not fit "
                                         r"its config \(first at '[\w.]+'; arch=unet, width=4096, depth=3, head="):
        colorizer.load_weights(str(tmp_path / "huge.pt"))
    state = {k: v.clone() for k, v in state.items()}
    next(v for v in state.values() if v.is_floating_point()).view(-1)[0] = float("nan")
    torch.save({"config": CONFIGS[0].to_dict(), "state_dict": state}, tmp_path / "nan.pt")
    with pytest.raises(ValueError, match="holds NaN or infinite values"):
        colorizer.load_weights(str(tmp_path / "nan.pt"))


@pytest.mark.parametrize(("change", "why"), [
    ({"width": "32"}, "model width must be int, got '32'"),  # was "not a colorize weights file (TypeError: ...)"
    ({"depth": 0}, r"model depth must be at least 1, got 0"),
    ({"attention": 1}, "model attention must be bool, got 1"),
])
def test_a_weights_file_whose_config_no_model_can_have_is_refused(tmp_path, change: dict, why: str) -> None:
    """Refused as unusable, with the field: a hand-made file's config, or one edited by hand."""
    state = build_model(CONFIGS[0]).state_dict()
    torch.save({"config": {**CONFIGS[0].to_dict(), **change}, "state_dict": state}, tmp_path / "made.pt")
    with pytest.raises(ValueError, match=rf"made.pt: a colorize weights file that cannot be used: its config: {why}"):
        colorizer.load_weights(str(tmp_path / "made.pt"))


def test_a_classification_model_loads_in_a_process_that_has_not_built_one_yet() -> None:
    # As in a fresh Ray worker: the ab cells are first computed while the shapes are checked on "meta".
    data = colorizer.weights_bytes(build_model(CONFIGS[3]))
    models.ab_bins.cache_clear()
    model = colorizer.model_from_bytes(data)
    assert model.ab_bins.device.type == models.ab_bins().device.type == "cpu"
    assert torch.isfinite(colorizer.predict_ab(model, torch.full((1, 1, 16, 16), 50.0))).all()


def test_attention_the_bottleneck_cannot_split_is_refused_in_the_config() -> None:
    with pytest.raises(ValueError, match="attention works on the bottleneck's width"):
        ModelConfig(width=33, depth=3, image_size=64, attention=True)
    with pytest.raises(ValueError, match="positive multiple of 2"):
        ModelConfig(width=4, depth=2, image_size=0)
    build_model(ModelConfig(width=4, depth=1, image_size=8, attention=True))  # 8 channels: 2 groups, 4 heads


def test_a_classification_head_decodes_at_the_temperature_given() -> None:
    model = build_model(dataclasses.replace(CONFIGS[0], head="classification")).eval()
    L = torch.rand(1, 1, CONFIGS[0].image_size, CONFIGS[0].image_size) * 100
    with pytest.raises(ValueError, match=r"temperature must be in \(0, 1\], got 0.0"):
        colorizer.predict_ab(model, L, temperature=0.0)  # not the config's, silently
    assert not torch.equal(colorizer.predict_ab(model, L, temperature=1.0), colorizer.predict_ab(model, L))


def test_the_bundled_weights_load() -> None:
    model, weights_id = colorizer.load_weights(None)
    assert model.config.arch == "unet"
    assert weights_id.startswith("sha256:")


@pytest.mark.parametrize(
    "bad",
    [{"arch": "gan"}, {"width": 0}, {"depth": 3, "image_size": 20}, {"head": "softmax"},
     {"arch": "autoencoder", "attention": True}, {"temperature": 0.0}, {"classes": 1}, {"classes": -2},
     {"arch": "autoencoder", "classes": 10}],
    ids=["arch", "width", "size", "head", "autoencoder-attention", "temperature", "one-class", "negative-classes",
         "autoencoder-classes"],
)
def test_model_config_rejects_bad_values(bad: dict) -> None:
    with pytest.raises(ValueError):
        ModelConfig(**bad)


def test_model_config_rejects_unknown_keys() -> None:
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict({"arch": "unet", "heads": 4})


SEMANTIC = ModelConfig(arch="unet", width=4, depth=2, image_size=16, classes=3)


def test_the_semantic_branch_gives_class_logits_and_every_parameter_gets_a_gradient() -> None:
    torch.manual_seed(0)
    model = build_model(SEMANTIC)
    batch = {**lab_batch(4), "label": torch.tensor([0, 1, 2, 1])}
    out, logits = model(color.normalize_l(batch["L"]), with_logits=True)
    assert out.shape == (4, 2, 16, 16) and logits.shape == (4, 3)
    assert colorizer.predict_ab(model, batch["L"]).shape == (4, 2, 16, 16)  # inference needs no labels
    train_step(model, batch, torch.optim.SGD(model.parameters(), lr=0.0), loss="psnr")
    missing = [name for name, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"no finite gradient for {missing}"
    with pytest.raises(ValueError, match="no semantic branch"):
        build_model(CONFIGS[0])(color.normalize_l(batch["L"]), with_logits=True)


def brightness_classes() -> tuple[dict[str, torch.Tensor], torch.nn.Module, torch.optim.Optimizer]:
    """A batch of two classes told apart by brightness alone (bright scenes are class 1), and a
    fresh two-class semantic model with its optimiser."""
    torch.manual_seed(0)
    batch = lab_batch(32)
    batch["label"] = (batch["L"].mean(dim=(1, 2, 3)) > batch["L"].mean()).long()
    model = build_model(dataclasses.replace(SEMANTIC, classes=2))
    return batch, model, torch.optim.Adam(model.parameters(), lr=3e-3)


def eval_accuracy(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> float:
    """The semantic branch's accuracy on ``batch`` in eval mode (BatchNorm's running statistics)."""
    model.eval()
    with torch.no_grad():
        _, logits = model(color.normalize_l(batch["L"]), with_logits=True)
    return float((logits.argmax(1) == batch["label"]).float().mean())


def test_the_semantic_branch_learns_the_labels_beside_the_colour() -> None:
    batch, model, optimizer = brightness_classes()

    def accuracy() -> float:
        return eval_accuracy(model, batch)

    before = accuracy()
    # 80 steps: the branch fits the batch within 10, its BatchNorm statistics (eval mode) by about 60.
    losses = [float(train_step(model, batch, optimizer, loss="psnr", precision="float32")) for _ in range(80)]
    assert losses[-1] < losses[0] - 3.0, losses
    assert before < 0.7 and accuracy() >= 0.9, (before, accuracy())


def test_recalibrated_batchnorm_holds_the_statistics_of_its_batches_and_fixes_an_early_eval() -> None:
    batch, model, optimizer = brightness_classes()
    for _ in range(10):  # fits the batch; the running statistics are still mostly their initial values
        train_step(model, batch, optimizer, loss="psnr", precision="float32")

    def accuracy() -> float:
        return eval_accuracy(model, batch)

    early = accuracy()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    seen: dict[torch.nn.Module, list[torch.Tensor]] = {m: [] for m in norms}
    hooks = [m.register_forward_pre_hook(lambda m, args: seen[m].append(args[0].detach())) for m in norms]
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    halves = [batch["L"][:16], batch["L"][16:]]
    assert recalibrate_batchnorm(model, halves) == 2 and recalibrate_batchnorm(model, []) == 0
    for hook in hooks:
        hook.remove()

    assert not model.training  # as accuracy() left it
    for m in norms:
        first, second = seen[m]
        torch.testing.assert_close(m.running_mean, (first.mean((0, 2, 3)) + second.mean((0, 2, 3))) / 2)
        torch.testing.assert_close(m.running_var, (first.var((0, 2, 3)) + second.var((0, 2, 3))) / 2)
        assert m.momentum == 0.1
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    assert early < 0.8 and accuracy() >= 0.9, (early, accuracy())


def test_a_model_gains_the_semantic_branch_from_weights_without_it_and_colours_as_before() -> None:
    torch.manual_seed(0)
    plain = build_model(dataclasses.replace(SEMANTIC, classes=0)).eval()
    semantic = build_model(SEMANTIC).eval()
    load_backbone(semantic, plain.state_dict())
    L = lab_batch(4)["L"]
    assert torch.equal(colorizer.predict_ab(semantic, L), colorizer.predict_ab(plain, L))
    loaded = colorizer.model_from_bytes(colorizer.weights_bytes(semantic))
    assert loaded.config.classes == 3 and torch.equal(colorizer.predict_ab(loaded, L), colorizer.predict_ab(semantic, L))
    with pytest.raises(ValueError, match="do not fit"):
        load_backbone(semantic, build_model(dataclasses.replace(SEMANTIC, classes=0, width=8)).state_dict())


def test_a_semantic_model_learns_its_classes_in_the_ablation_loop_from_labels_only() -> None:
    from colorize import ablation

    lab = torch.cat([lab_batch(16)[k] for k in ("L", "ab")], dim=1)
    variant = ablation.Variant("semantic", SEMANTIC, loss="psnr")
    budget = ablation.Budget(epochs=1, batch_size=8, precision="float32")
    start = build_model(SEMANTIC).state_dict()
    model, _, epochs = ablation.fit(variant, lab, budget, init=start, labels=torch.arange(16) % 3)
    assert epochs == 1 and model.config.classes == 3
    assert not torch.equal(model.classify.weight.cpu(), start["classify.weight"])
    # Without labels (say, a flat folder of photos) the colour loss alone trains it; the class head stays.
    unlabelled, _, _ = ablation.fit(variant, lab, budget, init=start)
    assert torch.equal(unlabelled.classify.weight.cpu(), start["classify.weight"])
    assert not torch.equal(unlabelled.fuse[-1].weight.cpu(), start["fuse.2.weight"])
    with pytest.raises(ValueError, match="labels are for a model with a semantic branch, and this one has none"):
        ablation.fit(ablation.Variant("plain", CONFIGS[0], loss="psnr"), lab, budget, labels=torch.arange(16) % 3)


def test_the_psnr_term_adds_minus_the_mean_psnr_of_the_annealed_mean_to_the_cross_entropy() -> None:
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(CONFIGS[3], temperature=1.0))
    batch = lab_batch(8)
    before = build_model(model.config)
    before.load_state_dict(model.state_dict())
    before.train()
    with torch.no_grad():
        out = before(color.normalize_l(batch["L"]))
        ce = colorizer.output_loss(before, out, batch["L"], batch["ab"], "ce")
        fidelity = colorizer.psnr_loss(batch["L"], colorizer.decode(before, out), batch["ab"])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    value = train_step(model, batch, optimizer, loss="ce", psnr_weight=0.5, precision="float32")
    assert float(value) == pytest.approx(float(ce + 0.5 * fidelity), rel=1e-5)

    # Trained on it, the annealed mean gets more faithful than cross-entropy alone makes it.
    def fidelity_after(weight: float) -> float:
        torch.manual_seed(0)
        trained = build_model(model.config)
        optimizer = torch.optim.Adam(trained.parameters(), lr=3e-3)
        for _ in range(30):
            train_step(trained, batch, optimizer, loss="ce", psnr_weight=weight, precision="float32")
        with torch.inference_mode():
            return float(colorizer.psnr_loss(batch["L"], colorizer.predict_ab(trained.eval(), batch["L"]), batch["ab"]))

    assert fidelity_after(1.0) < fidelity_after(0.0) - 1.0  # at least 1 dB more PSNR


def test_a_u_net_takes_a_fresh_head_of_the_other_kind_and_keeps_its_body() -> None:
    torch.manual_seed(0)
    regression = build_model(CONFIGS[0])
    classification = build_model(dataclasses.replace(CONFIGS[0], head="classification"))
    fresh_head = classification.head.weight.detach().clone()
    load_backbone(classification, without_colour_head(regression.state_dict()))
    body = [k for k in regression.state_dict() if k.split(".")[0] != "head"]
    assert body and all(torch.equal(classification.state_dict()[k], regression.state_dict()[k]) for k in body)
    assert torch.equal(classification.head.weight, fresh_head) and len(classification.ab_bins) == len(color.ab_gamut_bins())
    with pytest.raises(ValueError, match="do not fit"):
        load_backbone(classification, regression.state_dict())  # the 2-channel head into 262 logits
