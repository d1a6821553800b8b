"""Bad checkpoints through the real CLI (`python -m densebench inspect/evaluate/convert` in a
subprocess): exit 1, one stderr line naming the file and the culprit (tensor, dtype, shape),
no traceback, and nothing written (no converted file, no temporary file, no results dir)."""
from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

REPO_ROOT = Path(__file__).resolve().parents[1]


def densebench(*args, cwd=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run([sys.executable, "-m", "densebench", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


def assert_one_line_error(rc, out, err, *culprits):
    assert rc == 1, (rc, out, err)
    assert "Traceback" not in out + err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for culprit in culprits:
        assert culprit in lines[0], (culprit, lines[0])
    return lines[0]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def r18(tmp_path_factory):
    """A random-init ResNet-18 state dict (torchvision names, with fc)."""
    torch.manual_seed(0)
    return torchvision.models.resnet18().state_dict()


def save(tmp_path, name, state):
    path = tmp_path / name
    torch.save(state, path)
    return path


def test_random_bytes_are_not_a_checkpoint_and_not_sent_to_the_unsafe_flag(tmp_path):
    # seeded: about 1 in 125 random tails after a pickle header happens to parse as a pickle
    proto_then_noise = b"\x80\x02" + random.Random(0).randbytes(1 << 16)
    for name, content in (("proto.pth", proto_then_noise), ("notes.pth", b"hello world\n" * 50)):
        path = tmp_path / name
        path.write_bytes(content)
        line = assert_one_line_error(*densebench("inspect", path), str(path), "not a checkpoint (unrecognised format")
        assert "allow-unsafe-pickle" not in line


def test_a_real_pickle_that_needs_unpickling_points_at_the_flag(tmp_path):
    import argparse

    path = tmp_path / "timm_train.pth"
    torch.save({"state_dict": {}, "args": argparse.Namespace(lr=0.1)}, path)
    assert_one_line_error(*densebench("inspect", path), str(path), "--allow-unsafe-pickle", "Namespace")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.pth"
    path.write_bytes(b"")
    assert_one_line_error(*densebench("inspect", path), str(path), "empty")


def test_truncated_checkpoint(tmp_path, r18):
    path = save(tmp_path, "cut.pth", r18)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert_one_line_error(*densebench("inspect", path), str(path), "not a readable PyTorch checkpoint")


def test_directory_as_checkpoint(tmp_path):
    folder = tmp_path / "ckpt_dir"
    folder.mkdir()
    assert_one_line_error(*densebench("inspect", folder), str(folder), "is a directory")


def test_nan_in_a_conv_weight_is_refused_by_evaluate_before_any_work(tmp_path, r18):
    state = dict(r18)
    state["layer1.0.conv1.weight"] = state["layer1.0.conv1.weight"].clone()
    state["layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    path = save(tmp_path, "nan.pth", state)
    data, out = tmp_path / "data", tmp_path / "results"
    data.mkdir()
    assert_one_line_error(*densebench("evaluate", path, "--data-root", data, "--out", out, "--protocols",
                                      "knn_imagenet", "--preset", "tiny"),
                          str(path), "layer1.0.conv1.weight", "1 NaN")
    assert not out.exists()


def test_inf_running_var_is_refused(tmp_path, r18):
    state = dict(r18)
    state["bn1.running_var"] = state["bn1.running_var"].clone()
    state["bn1.running_var"][3] = float("inf")
    path = save(tmp_path, "inf.pth", state)
    assert_one_line_error(*densebench("inspect", path), str(path), "bn1.running_var", "1 Inf")


def test_nan_in_an_mmselfsup_checkpoint_names_the_source_key(tmp_path, r18):
    state = {f"backbone.{k}": v.clone() for k, v in r18.items() if not k.startswith("fc.")}
    state["backbone.layer4.1.bn2.weight"][0] = float("-inf")
    path = save(tmp_path, "mmselfsup.pth", {"state_dict": state, "meta": {}})
    out = tmp_path / "out.pth"
    assert_one_line_error(*densebench("convert", path, "--to", "torchvision", "--out", out),
                          str(path), "backbone.layer4.1.bn2.weight")
    assert not out.exists() and os.listdir(tmp_path) == ["mmselfsup.pth"]


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool])
def test_safetensors_with_non_float_weights_are_refused_not_cast(tmp_path, r18, dtype):
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in r18.items()}
    state["layer2.0.conv2.weight"] = (state["layer2.0.conv2.weight"] * 100).to(dtype)
    path = tmp_path / "odd.safetensors"
    save_file(state, str(path))
    assert_one_line_error(*densebench("inspect", path), str(path), "layer2.0.conv2.weight",
                          str(dtype).replace("torch.", ""))


def test_wrong_architecture_given(tmp_path):
    torch.manual_seed(0)
    path = save(tmp_path, "r50.pth", torchvision.models.resnet50().state_dict())
    line = assert_one_line_error(*densebench("inspect", path, "--arch", "resnet18"), str(path),
                                 "not a complete resnet18 backbone")
    assert "wrong-shape" in line and "resnet50" in line                 # the closest guess is the real arch


def test_a_model_that_is_not_a_resnet(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Flatten(),
                                torch.nn.Linear(8, 2))
    path = save(tmp_path, "tiny_cnn.pth", {"state_dict": model.state_dict()})
    assert_one_line_error(*densebench("evaluate", path, "--data-root", tmp_path, "--out", tmp_path / "res"),
                          str(path), "missing", "closest format guess: none")
    assert not (tmp_path / "res").exists()


def test_convert_refuses_to_write_over_its_input(tmp_path, r18):
    path = save(tmp_path, "full.pth", {"state_dict": {f"backbone.{k}": v for k, v in r18.items()}, "meta": {}})
    before = sha(path)
    link = tmp_path / "link.pth"
    link.symlink_to(path)
    hard = tmp_path / "hard.pth"
    os.link(path, hard)
    for ckpt, out, cwd in ((path, path, None),                       # the same path
                           ("full.pth", "./sub/../full.pth", tmp_path),  # relative spellings
                           (link, path, None),                       # the input is a symlink
                           (path, hard, None)):                      # a hard link
        (tmp_path / "sub").mkdir(exist_ok=True)
        assert_one_line_error(*densebench("convert", ckpt, "--to", "torchvision", "--out", out, cwd=cwd),
                              "is the input checkpoint")
        assert sha(path) == before and link.is_symlink()
    assert sorted(os.listdir(tmp_path)) == ["full.pth", "hard.pth", "link.pth", "sub"]   # no temporary file


def test_convert_writes_a_readable_file(tmp_path, r18):
    """Control: a good conversion still works, and the file is readable by the group (0644 under umask 022)."""
    path = save(tmp_path, "full.pth", dict(r18))
    out = tmp_path / "tv.pth"
    old = os.umask(0o022)
    try:
        rc, stdout, err = densebench("convert", path, "--to", "torchvision", "--out", out)
    finally:
        os.umask(old)
    assert rc == 0 and "Traceback" not in err
    assert (out.stat().st_mode & 0o777) == 0o644
    assert torch.equal(torch.load(out, weights_only=True)["conv1.weight"], r18["conv1.weight"])
