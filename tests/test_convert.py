"""`densebench convert`: torchvision -> {torchvision, detectron2, mmdet} -> import gives identical tensors."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import torchvision

from densebench.cli import main as cli_main
from densebench.evaluate.checkpoint import load_backbone_state_dict
from densebench.evaluate.convert import detectron2_key, to_detectron2, to_mmdet, to_torchvision
from test_checkpoint import reference_detectron2_name


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A seeded ResNet-18 written as a MoCo v2 checkpoint (so conversion also strips a prefix)."""
    torch.manual_seed(3)
    model = torchvision.models.resnet18()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
                module.num_batches_tracked.fill_(77)
    state = model.state_dict()
    backbone = {k: v.clone() for k, v in state.items() if not k.startswith("fc.")}
    path = tmp_path_factory.mktemp("convert") / "moco_v2.pth.tar"
    sd = {f"module.encoder_q.{k}": v for k, v in backbone.items()}
    sd.update({"module.encoder_q.fc.0.weight": torch.randn(512, 512), "module.encoder_q.fc.2.weight": torch.randn(8, 512),
               "module.queue": torch.randn(8, 16)})
    torch.save({"epoch": 200, "arch": "resnet18", "state_dict": sd}, path)
    return path, backbone


def _assert_identical(state, backbone):
    assert set(state) == set(backbone)
    for key, value in backbone.items():
        assert state[key].dtype == value.dtype and torch.equal(state[key], value), key


@pytest.mark.parametrize("target,filename,expected_format,unsafe", [
    ("torchvision", "r18_tv.pth", "torchvision", False),
    ("detectron2", "r18_d2.pkl", "detectron2", True),
    ("mmdet", "r18_mmdet.pth", "mmdet/mmseg", False),
])
def test_round_trip(target, filename, expected_format, unsafe, source, tmp_path, capsys):
    path, backbone = source
    out = tmp_path / filename
    assert cli_main(["convert", str(path), "--to", target, "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    state, info = load_backbone_state_dict(out, allow_unsafe_pickle=unsafe)
    assert info.format == expected_format and info.arch == "resnet18"
    _assert_identical(state, backbone)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left no temporary behind


def test_torchvision_output_loads_with_only_fc_missing(source, tmp_path):
    path, backbone = source
    out = tmp_path / "tv.pth"
    assert cli_main(["convert", str(path), "--to", "torchvision", "--out", str(out)]) == 0
    sd = torch.load(out, weights_only=True)
    model = torchvision.models.resnet18()
    result = model.load_state_dict(sd, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys


def test_detectron2_output_follows_protocol_convention(source, tmp_path):
    path, backbone = source
    out = tmp_path / "d2.pkl"
    assert cli_main(["convert", str(path), "--to", "detectron2", "--out", str(out)]) == 0
    with open(out, "rb") as fh:
        payload = pickle.load(fh)  # our own file, written a moment ago
    assert payload["__author__"] == "densebench" and payload["matching_heuristics"] is True
    model = payload["model"]
    assert set(model) == {reference_detectron2_name(k) for k in backbone}
    for key in ("stem.conv1.weight", "stem.conv1.norm.running_var", "res2.0.conv2.norm.bias",
                "res3.0.shortcut.weight", "res3.0.shortcut.norm.running_mean", "res5.1.conv1.weight"):
        assert key in model, key
    assert all(isinstance(v, np.ndarray) for v in model.values())
    assert np.array_equal(model["res3.0.shortcut.norm.running_mean"], backbone["layer2.0.downsample.1.running_mean"].numpy())


def test_detectron2_needs_pkl_name(source, tmp_path, capsys):
    path, _ = source
    out = tmp_path / "d2.pth"
    assert cli_main(["convert", str(path), "--to", "detectron2", "--out", str(out)]) == 1
    assert ".pkl" in capsys.readouterr().err and not out.exists()


def test_mmdet_output_layout(source, tmp_path):
    path, backbone = source
    out = tmp_path / "mmdet.pth"
    assert cli_main(["convert", str(path), "--to", "mmdet", "--out", str(out)]) == 0
    payload = torch.load(out, weights_only=True)
    assert set(payload["state_dict"]) == {f"backbone.{k}" for k in backbone}
    assert payload["meta"]["source_format"] == "moco-v2" and payload["meta"]["arch"] == "resnet18"


def test_plain_functions_match_key_conventions():
    sd = {"conv1.weight": torch.zeros(1), "bn1.running_var": torch.ones(1), "layer4.2.bn3.weight": torch.ones(1),
          "layer1.0.downsample.0.weight": torch.ones(1), "fc.weight": torch.ones(1)}
    assert set(to_torchvision(sd)) == set(sd) - {"fc.weight"}
    assert set(to_mmdet(sd)["state_dict"]) == {"backbone.conv1.weight", "backbone.bn1.running_var",
                                               "backbone.layer4.2.bn3.weight", "backbone.layer1.0.downsample.0.weight"}
    assert set(to_detectron2(sd)["model"]) == {"stem.conv1.weight", "stem.conv1.norm.running_var",
                                               "res5.2.conv3.norm.weight", "res2.0.shortcut.weight"}
    for key in sd:
        if not key.startswith("fc."):
            assert detectron2_key(key) == reference_detectron2_name(key)


@pytest.mark.parametrize("problem", ["missing", "wrong_shape", "classifier_only"])
def test_broken_sources_fail_without_writing(problem, source, tmp_path, capsys):
    _, backbone = source
    sd = {k: v.clone() for k, v in backbone.items()}
    if problem == "missing":
        del sd["layer2.1.bn2.weight"]
        expected = "layer2.1.bn2.weight"
    elif problem == "wrong_shape":
        sd["layer2.1.bn2.weight"] = torch.zeros(3)
        expected = "layer2.1.bn2.weight"
    else:
        sd = {"fc.weight": torch.zeros(10, 512), "fc.bias": torch.zeros(10)}
        expected = "conv1.weight"
    path = tmp_path / "broken.pth"
    torch.save({"state_dict": sd}, path)
    out = tmp_path / "out.pth"
    assert cli_main(["convert", str(path), "--to", "mmdet", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err and str(path) in err
    assert not out.exists()
