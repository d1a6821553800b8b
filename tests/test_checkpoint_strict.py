"""Strict import: an incomplete or mismatched backbone is an error (exit 1), never random weights."""
from __future__ import annotations

import pytest
import torch
import torchvision

from densebench.cli import main as cli_main
from densebench.errors import InputError
from densebench.evaluate.checkpoint import _strip, load_backbone_state_dict


@pytest.fixture(scope="module")
def state():
    torch.manual_seed(0)
    return torchvision.models.resnet18().state_dict()


def _backbone(state):
    return {k: v.clone() for k, v in state.items() if not k.startswith("fc.")}


def _inspect_fails(path, capsys, *extra):
    assert cli_main(["inspect", str(path), *extra]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err
    return err


def test_missing_one_tensor(state, tmp_path, capsys):
    sd = _backbone(state)
    del sd["layer3.1.conv2.weight"]
    path = tmp_path / "missing.pth"
    torch.save({"state_dict": sd, "author": "x"}, path)
    err = _inspect_fails(path, capsys)
    assert "missing 1 backbone keys: layer3.1.conv2.weight" in err and "resnet18" in err


def test_missing_tensor_in_a_prefixed_format_names_the_format(state, tmp_path, capsys):
    sd = {"backbone." + k: v for k, v in _backbone(state).items()}
    sd.update({"encoder_k.module.0.conv1.weight": state["conv1.weight"], "queue": torch.zeros(4, 4)})
    del sd["backbone.layer4.0.downsample.1.running_var"]
    path = tmp_path / "mm1.pth"
    torch.save({"state_dict": sd, "meta": {}}, path)
    err = _inspect_fails(path, capsys)
    assert "layer4.0.downsample.1.running_var" in err
    assert "closest format guess: mmselfsup-1.x" in err


def test_wrong_shape(state, tmp_path, capsys):
    sd = _backbone(state)
    sd["layer2.0.conv1.weight"] = torch.zeros(128, 64, 1, 1)
    path = tmp_path / "shape.pth"
    torch.save(sd, path)
    err = _inspect_fails(path, capsys)
    assert "wrong-shape" in err and "layer2.0.conv1.weight (file [128, 64, 1, 1] vs [128, 64, 3, 3])" in err


def test_classifier_only_file(state, tmp_path, capsys):
    path = tmp_path / "linear_head.pth"
    torch.save({"state_dict": {"fc.weight": state["fc.weight"], "fc.bias": state["fc.bias"]}}, path)
    err = _inspect_fails(path, capsys)
    assert "missing" in err and "conv1.weight" in err and "layer1.0.conv1.weight" in err
    assert "closest format guess: none" in err


def test_unexpected_backbone_key(state, tmp_path, capsys):
    sd = _backbone(state)
    sd["layer4.2.conv1.weight"] = torch.zeros(512, 512, 3, 3)
    path = tmp_path / "extra.pth"
    torch.save(sd, path)
    err = _inspect_fails(path, capsys)
    assert "unexpected backbone keys: layer4.2.conv1.weight" in err


def test_unknown_prefix_is_not_guessed(state, tmp_path, capsys):
    """Keys under a prefix no format knows are not stripped heuristically: the import fails."""
    path = tmp_path / "odd.pth"
    torch.save({"net.trunk." + k: v for k, v in _backbone(state).items()}, path)
    err = _inspect_fails(path, capsys)
    assert "missing" in err and "net.trunk.conv1.weight" in err  # shown among the file's keys


def test_given_arch_mismatch(state, tmp_path, capsys):
    path = tmp_path / "r18.pth"
    torch.save(state, path)
    err = _inspect_fails(path, capsys, "--arch", "resnet50")
    assert "resnet50 backbone (given)" in err and "layer1.0.conv3.weight" in err
    err = _inspect_fails(path, capsys, "--arch", "resnet9000")
    assert "unknown --arch" in err


def test_missing_num_batches_tracked_is_filled_with_zero(state, tmp_path):
    sd = {k: v for k, v in _backbone(state).items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "no_counter.pth"
    torch.save(sd, path)
    loaded, info = load_backbone_state_dict(path)
    assert len(info.filled) == 20 and all(int(loaded[k]) == 0 for k in info.filled)
    assert all(torch.equal(loaded[k], sd[k]) for k in sd)


def test_prefixes_are_removed_as_prefixes():
    assert _strip("module.layer1.0.conv1.weight", "module.") == "layer1.0.conv1.weight"
    assert "module.layer1.0.conv1.weight".lstrip("module.") != "layer1.0.conv1.weight"  # the trap
    assert _strip("model.conv1.weight", "module.") is None
    assert _strip("backbone.bn1.weight", "backbone.") == "bn1.weight"


def test_two_sources_for_one_tensor_are_refused(state, tmp_path):
    """Two source keys that rename to the same torchvision key make the file ambiguous."""
    import pickle

    model = {"stem.conv1.weight": state["conv1.weight"].numpy(),
             "stem.conv1.norm.weight": state["bn1.weight"].numpy(),
             "stem.bn1.weight": state["bn1.weight"].numpy()}
    path = tmp_path / "twice.pkl"
    with open(path, "wb") as fh:
        pickle.dump({"model": model}, fh)
    with pytest.raises(InputError, match="several keys onto bn1.weight"):
        load_backbone_state_dict(path, allow_unsafe_pickle=True)


def test_dict_without_tensors(tmp_path, capsys):
    path = tmp_path / "empty.pth"
    torch.save({"state_dict": {}, "epoch": 3}, path)
    err = _inspect_fails(path, capsys)
    assert "no tensors found" in err and "state_dict" in err
