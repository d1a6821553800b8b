"""Import of MMSelfSup 0.x/original and 1.x DenseCL checkpoints into the full model (PROTOCOLS.md 1.7)."""
from __future__ import annotations

import pytest
import torch

from densebench.errors import InputError
from densebench.pretrain.model import DenseCL
from densebench.pretrain.mmselfsup_import import load_densecl_checkpoint
from densebench.pretrain.trainer import read_log, read_training_images, train
from test_pretrain_helpers import small_config, write_image_folder


class NotAllowlisted:
    """An object a weights_only load refuses (mmcv meta can hold such things)."""


def _source_model():
    torch.manual_seed(7)
    model = DenseCL("resnet18", feat_dim=16, hid_dim=32, queue_len=32)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.randn_like(tensor))
        model.queue_ptr.fill_(8)
        model.queue2_ptr.fill_(8)
    return model


def _layout_0x(state):
    """[DC]/[0x]: encoder_q.{0,1}, encoder_k.{0,1}, backbone.* registered twice, queues."""
    out = {}
    for key, value in state.items():
        for ours, theirs in (("backbone_k.", "encoder_k.0."), ("neck_k.", "encoder_k.1."),
                             ("backbone.", "encoder_q.0."), ("neck.", "encoder_q.1.")):
            if key.startswith(ours):
                out[theirs + key[len(ours):]] = value.clone()
                if ours == "backbone.":
                    out[key] = value.clone()
                break
        else:
            out[key] = value.clone()
    return out


def _layout_1x(state):
    """[1x]: backbone.*, neck.*, encoder_k.module.{0,1}.*, encoder_k.steps, queues."""
    out = {"encoder_k.steps": torch.tensor([1234])}
    for key, value in state.items():
        if key.startswith("backbone_k."):
            out["encoder_k.module.0." + key[len("backbone_k."):]] = value.clone()
        elif key.startswith("neck_k."):
            out["encoder_k.module.1." + key[len("neck_k."):]] = value.clone()
        else:
            out[key] = value.clone()
    return out


@pytest.mark.parametrize("layout", [_layout_0x, _layout_1x])
def test_both_layouts_import_every_tensor(tmp_path, layout):
    source = _source_model().state_dict()
    path = tmp_path / "densecl.pth"
    torch.save({"meta": {"epoch": 1, "iter": 4}, "state_dict": layout(source)}, path)
    target = DenseCL("resnet18", feat_dim=16, hid_dim=32, queue_len=32)
    state, epochs, info = load_densecl_checkpoint(path, target)
    assert epochs == 1 and info["layout"] in ("mmselfsup0x", "mmselfsup1x")
    target.load_state_dict(state)
    for key, value in source.items():
        assert torch.equal(target.state_dict()[key], value), key


def test_import_errors_name_the_problem(tmp_path):
    source = _source_model().state_dict()
    target = DenseCL("resnet18", feat_dim=16, hid_dim=32, queue_len=32)
    broken = _layout_0x(source)
    del broken["encoder_k.1.mlp2.0.weight"]
    torch.save({"state_dict": broken}, tmp_path / "missing.pth")
    with pytest.raises(InputError, match="missing"):
        load_densecl_checkpoint(tmp_path / "missing.pth", target)
    twin = _layout_0x(source)
    twin["backbone.conv1.weight"] = twin["backbone.conv1.weight"] + 1
    torch.save({"state_dict": twin}, tmp_path / "twin.pth")
    with pytest.raises(InputError, match="twin"):
        load_densecl_checkpoint(tmp_path / "twin.pth", target)
    torch.save({"state_dict": _layout_1x(source)}, tmp_path / "ok.pth")
    with pytest.raises(InputError, match="shape mismatch"):
        load_densecl_checkpoint(tmp_path / "ok.pth", DenseCL("resnet18", feat_dim=16, hid_dim=32, queue_len=64))
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}}, tmp_path / "tv.pth")
    with pytest.raises(InputError, match="not an MMSelfSup"):
        load_densecl_checkpoint(tmp_path / "tv.pth", target)
    torch.save({"meta": {"x": NotAllowlisted()}, "state_dict": _layout_1x(source)}, tmp_path / "pickle.pth")
    with pytest.raises(InputError, match="--allow-unsafe-pickle"):
        load_densecl_checkpoint(tmp_path / "pickle.pth", target)
    state, _, _ = load_densecl_checkpoint(tmp_path / "pickle.pth", target, allow_unsafe_pickle=True)
    assert torch.equal(state["queue"], source["queue"])


def test_training_continues_from_an_imported_checkpoint(tmp_path):
    """--init-from: the model (incl. queues and pointers) comes from the file, the run starts at meta.epoch."""
    data = write_image_folder(tmp_path / "imagenet", num_images=16)
    cfg = small_config(epochs=2, feat_dim=16, hid_dim=32, queue_len=32)  # 2 steps per epoch
    source = _source_model().state_dict()
    torch.save({"meta": {"epoch": 1}, "state_dict": _layout_1x(source)}, tmp_path / "mm.pth")
    train(cfg, read_training_images(data), tmp_path / "run", init_from=str(tmp_path / "mm.pth"),
          show_progress=False)
    records = read_log(tmp_path / "run" / "log.jsonl")
    assert [r["iteration"] for r in records] == [3, 4] and all(r["epoch"] == 1 for r in records)
    ckpt = torch.load(tmp_path / "run" / "epoch_0002.pth", weights_only=True)
    assert ckpt["init_from"]["layout"] == "mmselfsup1x"
    # two steps of 8 keys were enqueued after the imported pointer 8
    assert int(ckpt["state_dict"]["queue_ptr"]) == 24
    assert torch.equal(ckpt["state_dict"]["queue"][:, :8], source["queue"][:, :8])
    assert not torch.equal(ckpt["state_dict"]["queue"][:, 8:24], source["queue"][:, 8:24])
