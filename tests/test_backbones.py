"""The pretrained encoder: the Keras port, the TensorFlow.js weight conversion, and the frozen
encoder inside a U-Net. Plain torch; the real nsfwjs weights are not needed (nor fetched)."""

from __future__ import annotations

import base64
import dataclasses
import gzip
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from colorize import ablation, backbones, colorizer
from colorize.models import ModelConfig, build_model, load_backbone, load_pretrained
from tests.test_models import lab_batch
from tests.test_probe import write_classes

PRETRAINED = ModelConfig(arch="unet", width=4, depth=2, image_size=16, pretrained="mobilenet_v2")


def keras_weights(net: backbones.MobileNetV2) -> dict[str, torch.Tensor]:
    """``net``'s weights as a Keras model names and lays them out: the inverse of the conversion."""
    bn = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_variance"}
    keras = {}
    for key, value in net.state_dict().items():
        _, layer, kind = key.split(".")
        if kind == "num_batches_tracked":
            continue
        if isinstance(net.layers[layer], torch.nn.BatchNorm2d):
            keras[f"{layer}/{bn[kind]}"] = value
        elif "depthwise" in layer:
            keras[f"{layer}/depthwise_kernel"] = value.permute(2, 3, 0, 1)
        else:
            keras[f"{layer}/kernel"] = value.permute(2, 3, 1, 0)
    return keras


def loaded_net(state: dict[str, torch.Tensor]) -> backbones.MobileNetV2:
    net = backbones.MobileNetV2()
    net.load_state_dict(state)
    return net


def random_mobilenet_state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    net = backbones.MobileNetV2()
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):  # statistics that are not the identity
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 2.0)
    return net.state_dict()


def tfjs_files(weights: dict[str, tuple[np.ndarray, float, float]]) -> tuple[str, str]:
    """A minified TensorFlow.js model module and its shard module, as nsfwjs ships them, for
    uint8 weights {name: (q, min, scale)}."""
    specs = ",".join(
        f'{{name:"{name}",shape:[{",".join(map(str, q.shape))}],dtype:"float32",'
        f'quantization:{{min:{low},scale:{scale},dtype:"uint8"}}}}'
        for name, (q, low, scale) in weights.items()
    )
    model_js = f'a.exports={{modelTopology:{{keras_version:"2.2.4"}},weightsManifest:[{{paths:["group1-shard1of1"],weights:[{specs}]}}]}}'
    data = b"".join(q.astype(np.uint8).tobytes() for q, _, _ in weights.values())
    shard_js = 'a.exports="' + base64.b64encode(data).decode() + '"},{}]'
    return model_js, shard_js


def test_the_port_has_keras_strides_and_widths() -> None:
    full, early = backbones.MobileNetV2(), backbones.MobileNetV2(blocks=11)
    rgb = torch.rand(2, 3, 64, 64)
    assert full.eval()(rgb).shape == (2, 1280, 2, 2) and (full.features, full.stride) == (1280, 32)
    assert early.eval()(rgb).shape == (2, 96, 4, 4) and (early.features, early.stride) == (96, 16)
    assert "block_11_expand" not in early.layers and "Conv_1" not in early.layers
    with pytest.raises(ValueError, match="1 to 17 blocks, got 0"):
        backbones.MobileNetV2(blocks=0)


def test_stride_two_layers_pad_the_bottom_and_right_as_tensorflow_does() -> None:
    """TensorFlow's 'same' padding for a 3x3, stride-2 convolution on an even side is one row
    and column after the image and none before; the first layer must see exactly that."""
    torch.manual_seed(0)
    net = backbones.MobileNetV2(blocks=1).eval()
    rgb = torch.rand(1, 3, 8, 8)
    conv, bn = net.layers["Conv1"], net.layers["bn_Conv1"]
    want = F.relu6(bn(F.conv2d(F.pad(rgb, (0, 1, 0, 1)), conv.weight, stride=2)))
    got = net._layer("Conv1", rgb, bn="bn_Conv1")
    assert torch.equal(got, want)
    assert not torch.allclose(got, F.relu6(bn(F.conv2d(rgb, conv.weight, stride=2, padding=1))))


def test_keras_weights_convert_to_the_port_and_back() -> None:
    state = random_mobilenet_state()
    converted = backbones.mobilenet_v2_state(keras_weights(loaded_net(state)))
    assert converted.keys() == state.keys()
    assert all(torch.equal(converted[k], state[k]) for k in state if not k.endswith("num_batches_tracked"))
    # A Keras 3x3 kernel (kh, kw, in, out) computes the same convolution once converted.
    kernel = torch.randn(3, 3, 4, 5)
    key, weight = backbones.keras_to_torch("block_1_expand/kernel", kernel)
    x = torch.randn(1, 4, 6, 6)
    patches = F.unfold(x, 3).view(1, 4, 3, 3, 16)  # (B, in, kh, kw, positions)
    want = torch.einsum("bihwp,hwio->bop", patches, kernel).view(1, 5, 4, 4)
    assert key == "layers.block_1_expand.weight" and torch.allclose(F.conv2d(x, weight), want, atol=1e-5)


def test_a_head_is_left_out_and_missing_or_misshapen_weights_are_refused() -> None:
    keras = keras_weights(loaded_net(random_mobilenet_state()))
    with_head = {**keras, "dense_1/kernel": torch.zeros(1280, 256), "dense_1/bias": torch.zeros(256)}
    assert backbones.mobilenet_v2_state(with_head).keys() == backbones.MobileNetV2().state_dict().keys()
    with pytest.raises(ValueError, match="lack 1 of MobileNetV2's, layers.Conv1.weight first"):
        backbones.mobilenet_v2_state({k: v for k, v in keras.items() if k != "Conv1/kernel"})
    with pytest.raises(ValueError, match="Conv1/kernel: no MobileNetV2 weight of shape"):
        backbones.mobilenet_v2_state({**keras, "Conv1/kernel": torch.zeros(3, 3, 1, 32)})
    with pytest.raises(ValueError, match="not a MobileNetV2 weight this port knows"):
        backbones.keras_to_torch("Conv1/bias", torch.zeros(32))


def test_tfjs_weights_are_dequantised_in_manifest_order() -> None:
    rng = np.random.default_rng(0)
    weights = {"a/kernel": (rng.integers(0, 256, (3, 3, 2, 4)), -1.5, 0.0125), "b/gamma": (np.array([0, 7, 255]), 2e-3, 5e-1)}
    model_js, shard_js = tfjs_files(weights)
    loaded = backbones.tfjs_weights(model_js, shard_js)
    assert list(loaded) == ["a/kernel", "b/gamma"]
    for name, (q, low, scale) in weights.items():
        assert loaded[name].shape == q.shape and torch.allclose(loaded[name], torch.from_numpy(low + scale * q).float())
    _, short_shard = tfjs_files({**weights, "b/gamma": (np.array([0, 7]), 0.0, 1.0)})
    with pytest.raises(ValueError, match="take 75 bytes, the shard holds 74"):
        backbones.tfjs_weights(model_js, short_shard)
    with pytest.raises(ValueError, match="no uint8-quantised weights"):
        backbones.tfjs_weights("a.exports={}", shard_js)
    with pytest.raises(ValueError, match="no base64 weight data"):
        backbones.tfjs_weights(model_js, "a.exports=1")


def test_a_package_that_is_not_nsfwjs_is_refused_before_it_is_read() -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as package:
        info = tarfile.TarInfo(backbones.NSFWJS_MODEL)
        package.addfile(info, io.BytesIO(b""))
    with pytest.raises(ValueError, match="not the nsfwjs 4.4.0 package"):
        backbones.nsfwjs_mobilenet_v2(buffer.getvalue())
    with pytest.raises(ValueError, match="not the nsfwjs 4.4.0 package"):
        backbones.nsfwjs_mobilenet_v2(gzip.compress(b"anything"))


def test_the_pretrained_encoder_starts_as_a_no_op_stays_frozen_and_travels_in_the_weights_file() -> None:
    torch.manual_seed(0)
    plain = build_model(dataclasses.replace(PRETRAINED, pretrained="")).eval()
    model = build_model(PRETRAINED)
    load_backbone(model, plain.state_dict())
    load_pretrained(model, random_mobilenet_state())
    L = lab_batch(4)["L"]
    assert torch.equal(colorizer.predict_ab(model.eval(), L), colorizer.predict_ab(plain, L))
    assert model.pretrained(L / 100 - 0.5).shape == (4, 96, 4, 4)  # the bottleneck's grid

    frozen = {k: v.clone() for k, v in model.pretrained.state_dict().items()}
    lab = torch.cat([lab_batch(16)[k] for k in ("L", "ab")], dim=1)
    budget = ablation.Budget(epochs=2, batch_size=8, precision="float32")
    trained, _, _ = ablation.fit(ablation.Variant("pretrained", PRETRAINED, loss="psnr"), lab, budget,
                                 init=plain.state_dict(), pretrained=random_mobilenet_state())
    assert all(torch.equal(v, frozen[k]) for k, v in trained.pretrained.state_dict().items())  # batch-norm statistics too
    assert not trained.train().pretrained.net.training
    assert trained.pretrained_fuse[-1].weight.abs().sum() > 0  # the fusion learns
    loaded = colorizer.model_from_bytes(colorizer.weights_bytes(trained))
    assert loaded.config.pretrained == "mobilenet_v2"
    assert torch.allclose(colorizer.predict_ab(loaded, L), colorizer.predict_ab(trained.eval(), L), atol=1e-4)  # NCHW vs NHWC


def test_batchnorm_recalibration_leaves_the_frozen_encoders_statistics_alone() -> None:
    from colorize.objectives import recalibrate_batchnorm

    model = build_model(PRETRAINED)
    load_pretrained(model, random_mobilenet_state())
    frozen = {k: v.clone() for k, v in model.pretrained.state_dict().items()}
    before = model.down[0][1].running_mean.clone()
    assert recalibrate_batchnorm(model, [lab_batch(8)["L"]]) == 1
    assert all(torch.equal(v, frozen[k]) for k, v in model.pretrained.state_dict().items())
    assert not torch.equal(model.down[0][1].running_mean, before)  # the U-Net's own are re-estimated


def test_colorize_train_refuses_to_fine_tune_a_model_with_a_pretrained_encoder() -> None:
    from colorize.train import TrainConfig, resolve_init

    with pytest.raises(ValueError, match="has a pretrained encoder \\(mobilenet_v2\\), which colorize train does not build"):
        resolve_init(TrainConfig(data="x", out="y", init="w.pt"), PRETRAINED)


def test_pretrained_weights_go_only_where_they_fit() -> None:
    with pytest.raises(ValueError, match="no pretrained encoder"):
        load_pretrained(build_model(dataclasses.replace(PRETRAINED, pretrained="")), random_mobilenet_state())
    with pytest.raises(ValueError, match="not mobilenet_v2 weights: layers.Conv1.weight is missing"):
        load_pretrained(build_model(PRETRAINED), {"layers.Conv_1.weight": torch.zeros(1)})
    for bad in ({"pretrained": "resnet50"}, {"pretrained": "mobilenet_v2", "arch": "autoencoder"}):
        with pytest.raises(ValueError, match="pretrained must be one of"):
            ModelConfig(**bad)


def test_the_photo_model_job_trains_with_the_pretrained_encoder(tmp_path: Path, capsys) -> None:
    from jobs import photo_model

    labelled = tmp_path / "labelled"
    write_classes(labelled / "train", 64, seed=0)
    weights = tmp_path / "mobilenet_v2.pt"
    torch.save(random_mobilenet_state(), weights)
    out = tmp_path / "pretrained"
    photo_model.main(["--data", str(labelled / "train"), "--size", "16", "--width", "4", "--depth", "2", "--loss", "psnr",
                      "--pretrained", str(weights), "--epochs", "1", "--batch-size", "16", "--threads", "1", "--out", str(out)])
    metrics = json.loads((out / "metrics.json").read_text())
    model, _ = colorizer.load_weights(str(out / "model.pt"))
    assert metrics["model"]["pretrained"] == model.config.pretrained == "mobilenet_v2"
    assert Image.open(out / "holdout.png").size == (8 * 16, 3 * 16)
    (tmp_path / "junk.pt").write_bytes(b"not torch")
    (tmp_path / "short.pt").write_bytes(b"junk\n")
    torch.save({"layers.Conv1.weight": torch.zeros(1)}, tmp_path / "partial.pt")
    for path, reason in ((tmp_path / "junk.pt", "not MobileNetV2 weights"), (tmp_path / "short.pt", "not MobileNetV2 weights"),
                         (tmp_path / "partial.pt", "not MobileNetV2 weights"),
                         (tmp_path / "none.pt", "No such file")):
        with pytest.raises(SystemExit) as exit_info:
            photo_model.main(["--data", str(labelled / "train"), "--size", "16", "--pretrained", str(path),
                              "--out", str(tmp_path / "refused")])
        errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert exit_info.value.code == 2 and len(errors) == 1 and reason in errors[0], errors
    for flags, reason in ((["--size", "0"], "--size must be from 11 to 1024, got 0"),  # trained at 64 px, silently
                          (["--size", "-16"], "--size must be from 11 to 1024"),
                          (["--out", str(tmp_path / "junk.pt")], "--out")):
        with pytest.raises(SystemExit) as exit_info:
            photo_model.main(["--data", str(labelled / "train"), "--out", str(tmp_path / "refused"), *flags])
        errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert exit_info.value.code == 2 and len(errors) == 1 and reason in errors[0], errors
    assert not (tmp_path / "refused" / "model.pt").exists()


def test_the_fetch_job_refuses_a_package_that_is_not_nsfwjs_in_one_line(tmp_path: Path, capsys) -> None:
    from jobs import fetch_pretrained

    (tmp_path / "other.tgz").write_bytes(gzip.compress(b"another package"))
    for tarball, reason in ((tmp_path / "other.tgz", "not the nsfwjs 4.4.0 package"), (tmp_path / "none.tgz", "No such file")):
        with pytest.raises(SystemExit) as exit_info:
            fetch_pretrained.main(["--out", str(tmp_path / "mobilenet_v2.pt"), "--tarball", str(tarball)])
        errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert exit_info.value.code == 2 and len(errors) == 1 and reason in errors[0], errors
    assert not (tmp_path / "mobilenet_v2.pt").exists()
    with pytest.raises(SystemExit):  # refused before a download
        fetch_pretrained.main(["--out", str(tmp_path), "--tarball", str(tmp_path / "other.tgz")])
    assert "is a folder; give the .pt file to write" in capsys.readouterr().err
