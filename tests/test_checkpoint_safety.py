"""Checkpoint reading never executes code from the file unless --allow-unsafe-pickle is given."""
from __future__ import annotations

import argparse
import pickle

import pytest
import torch
import torchvision

from densebench.cli import main as cli_main
from densebench.errors import InputError
from densebench.evaluate.checkpoint import load_backbone_state_dict, read_checkpoint


class CreatesMarker:
    """Unpickling this object opens (creates) the marker file: stands in for arbitrary code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return {k: v for k, v in torchvision.models.resnet18().state_dict().items() if not k.startswith("fc.")}


@pytest.fixture
def no_pickle_load(monkeypatch):
    """Make any use of the stdlib unpickler fail loudly; record how torch.load is called."""
    def forbidden(*args, **kwargs):
        raise AssertionError("the stdlib unpickler must not be used")

    calls = []
    real_torch_load = torch.load

    def recording_torch_load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_torch_load(*args, **kwargs)

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    monkeypatch.setattr(torch, "load", recording_torch_load)
    return calls


def test_normal_checkpoint_is_read_with_weights_only(backbone, tmp_path, no_pickle_load):
    path = tmp_path / "ok.pth"
    torch.save({"state_dict": backbone}, path)
    state, info = load_backbone_state_dict(path)
    assert no_pickle_load == [True]
    assert info.reader == "torch.load(weights_only=True)"
    assert torch.equal(state["layer1.0.conv1.weight"], backbone["layer1.0.conv1.weight"])


def test_code_executing_torch_file_is_refused_without_running(backbone, tmp_path, no_pickle_load, capsys):
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": backbone, "hook": CreatesMarker(marker)}, path)
    assert not marker.exists()
    with pytest.raises(InputError) as excinfo:
        load_backbone_state_dict(path)
    message = str(excinfo.value)
    assert str(path) in message and "--allow-unsafe-pickle" in message and "execute code" in message
    assert "open" in message  # the disallowed global torch reported
    assert not marker.exists()
    assert no_pickle_load == [True]  # only the weights_only load was attempted

    assert cli_main(["inspect", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err
    assert not marker.exists()


def test_code_executing_plain_pickle_named_pth_is_refused(tmp_path, no_pickle_load):
    marker = tmp_path / "MARKER"
    path = tmp_path / "old_pickle.pth"
    with open(path, "wb") as fh:
        pickle.dump({"state_dict": {}, "hook": CreatesMarker(marker)}, fh)
    with pytest.raises(InputError, match="allow-unsafe-pickle"):
        load_backbone_state_dict(path)
    assert not marker.exists()


def test_pkl_file_is_refused_without_unpickling(tmp_path, no_pickle_load, capsys):
    marker = tmp_path / "MARKER"
    path = tmp_path / "model_final.pkl"
    with open(path, "wb") as fh:
        pickle.dump({"model": {}, "hook": CreatesMarker(marker)}, fh)
    with pytest.raises(InputError) as excinfo:
        read_checkpoint(path)
    assert str(path) in str(excinfo.value) and "--allow-unsafe-pickle" in str(excinfo.value)
    assert no_pickle_load == []  # not even torch.load(weights_only=True) touches a .pkl
    assert not marker.exists()
    assert cli_main(["convert", str(path), "--to", "torchvision", "--out", str(tmp_path / "o.pth")]) == 1
    assert "model_final.pkl" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "o.pth").exists()


def test_unsafe_flag_allows_full_unpickling(backbone, tmp_path):
    """timm train checkpoints hold an argparse.Namespace: refused by default, read with the flag."""
    path = tmp_path / "checkpoint-3.pth.tar"
    torch.save({"state_dict": backbone, "arch": "resnet", "version": 2, "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(InputError, match="Namespace"):
        load_backbone_state_dict(path)
    state, info = load_backbone_state_dict(path, allow_unsafe_pickle=True)
    assert info.format == "timm" and "weights_only=False" in info.reader
    assert torch.equal(state["conv1.weight"], backbone["conv1.weight"])


def test_unsafe_flag_reads_a_plain_pickle_with_pth_name(backbone, tmp_path):
    path = tmp_path / "plain.pth"
    with open(path, "wb") as fh:
        pickle.dump({"state_dict": {k: v.numpy() for k, v in backbone.items()}}, fh)
    state, info = load_backbone_state_dict(path, allow_unsafe_pickle=True)
    assert info.reader.startswith("pickle.load")
    assert all(torch.equal(state[k], backbone[k]) for k in backbone)


def test_safetensors_never_unpickles(backbone, tmp_path, no_pickle_load):
    from safetensors.torch import save_file

    path = tmp_path / "weights.bin"  # detected by content, not only by suffix
    save_file({k: v.contiguous() for k, v in backbone.items()}, str(path))
    state, info = load_backbone_state_dict(path)
    assert info.reader == "safetensors" and no_pickle_load == []
    assert all(torch.equal(state[k], backbone[k]) for k in backbone)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04broken zip"])
def test_garbage_files_fail_with_one_line(content, tmp_path, capsys):
    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    assert cli_main(["inspect", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err


def test_missing_file(tmp_path, capsys):
    assert cli_main(["inspect", str(tmp_path / "nope.pth")]) == 1
    assert "not found" in capsys.readouterr().err
