"""Checkpoint import: every supported layout, built here from a seeded torchvision ResNet.

Each layout builder below writes the key layout of one codebase from the facts in
PROTOCOLS.md 1.7 / the issue (independently of densebench's renaming code); the test checks
that the imported backbone computes exactly the source model's features and that `inspect`
names the format.
"""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from densebench.cli import main as cli_main
from densebench.evaluate.backbone import forward_features
from densebench.evaluate.checkpoint import (ARCHS, build_backbone, check_arch, infer_arch,
                                            load_backbone_state_dict, reference_shapes, tensors_hash)


def seeded_resnet(arch: str = "resnet18", seed: int = 0) -> nn.Module:
    """A ResNet whose convs and every BN parameter/buffer are random, so any mix-up changes the output."""
    torch.manual_seed(seed)
    model = getattr(torchvision.models, arch)()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.num_batches_tracked.fill_(int(torch.randint(1, 10_000, ())))
    return model.eval()


def fixed_input() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(123))


@pytest.fixture(scope="module")
def source():
    """(model, full state dict incl. fc, backbone state dict, reference features)."""
    model = seeded_resnet("resnet18", seed=1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    backbone = {k: v for k, v in state.items() if not k.startswith("fc.")}
    with torch.no_grad():
        feats = forward_features(model, fixed_input())
    return model, state, backbone, feats


def _prefixed(prefix: str, sd: dict) -> dict:
    return {prefix + k: v.clone() for k, v in sd.items()}


def _densecl_neck(prefix: str) -> dict:
    # DenseCL neck: global mlp (Linear) + dense mlp2 (1x1 conv), PROTOCOLS.md 1.7
    return {f"{prefix}mlp.0.weight": torch.randn(16, 512), f"{prefix}mlp.0.bias": torch.randn(16),
            f"{prefix}mlp.2.weight": torch.randn(8, 16), f"{prefix}mlp.2.bias": torch.randn(8),
            f"{prefix}mlp2.0.weight": torch.randn(16, 512, 1, 1), f"{prefix}mlp2.0.bias": torch.randn(16),
            f"{prefix}mlp2.2.weight": torch.randn(8, 16, 1, 1), f"{prefix}mlp2.2.bias": torch.randn(8)}


def _queues() -> dict:
    return {"queue": torch.randn(8, 32), "queue_ptr": torch.zeros(1, dtype=torch.long),
            "queue2": torch.randn(8, 32), "queue2_ptr": torch.zeros(1, dtype=torch.long)}


def reference_detectron2_name(key: str) -> str:
    """The [DC] convert-pretrain-to-detectron2 renaming, as listed in PROTOCOLS.md 1.7."""
    if "layer" not in key:
        key = "stem." + key
    for t in (1, 2, 3, 4):
        key = key.replace(f"layer{t}", f"res{t + 1}")
    for t in (1, 2, 3):
        key = key.replace(f"bn{t}", f"conv{t}.norm")
    return key.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


# ---- one writer per layout: (state, backbone, path) -> written path ------------------------


def write_torchvision(state, backbone, path):
    torch.save(state, path)


def write_safetensors(state, backbone, path):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path))


def write_extracted_author(state, backbone, path):
    # MMSelfSup tools/model_converters/extract_backbone_weights.py output
    torch.save({"state_dict": {k: v.clone() for k, v in backbone.items()}, "author": "MMSelfSup"}, path)


def write_extracted_plain(state, backbone, path):
    torch.save({"state_dict": {k: v.clone() for k, v in backbone.items()}}, path)


def write_extracted_model(state, backbone, path):
    torch.save({"model": {k: v.clone() for k, v in backbone.items()}, "epoch": 5}, path)


def write_bare_backbone(state, backbone, path):
    torch.save({k: v.clone() for k, v in backbone.items()}, path)


def write_mmselfsup0(state, backbone, path):
    sd = {**_prefixed("encoder_q.0.", backbone), **_densecl_neck("encoder_q.1."),
          **_prefixed("encoder_k.0.", backbone), **_densecl_neck("encoder_k.1."),
          **_prefixed("backbone.", backbone), **_queues()}
    torch.save({"meta": {"epoch": 200, "iter": 1000, "mmcv_version": "1.4.0", "config": "model = dict()"},
                "state_dict": sd, "optimizer": {"state": {}, "param_groups": []}}, path)


def write_mmselfsup1(state, backbone, path):
    sd = {**_prefixed("backbone.", backbone), **_densecl_neck("neck."),
          **_prefixed("encoder_k.module.0.", backbone), **_densecl_neck("encoder_k.module.1."),
          "encoder_k.steps": torch.tensor([1000.0]), **_queues()}
    torch.save({"meta": {"epoch": 200, "mmengine_version": "0.4.0", "dataset_meta": {}}, "state_dict": sd}, path)


def write_densebench(state, backbone, path):
    sd = {**_prefixed("backbone.", backbone), **_densecl_neck("neck."),
          **_prefixed("backbone_k.", backbone), **_densecl_neck("neck_k."), **_queues()}
    torch.save({"densebench": {"kind": "densecl_pretrain", "version": 1}, "state_dict": sd,
                "optimizer": {"state": {}, "param_groups": []}, "config": {"lr": 0.03}, "epoch": 3,
                "iteration": 30}, path)


def write_moco_v1(state, backbone, path):
    head = {"fc.weight": torch.randn(128, 512), "fc.bias": torch.randn(128)}
    sd = {**_prefixed("module.encoder_q.", {**backbone, **head}),
          **_prefixed("module.encoder_k.", {**backbone, **head}),
          "module.queue": torch.randn(128, 64), "module.queue_ptr": torch.zeros(1, dtype=torch.long)}
    torch.save({"epoch": 200, "arch": "resnet18", "state_dict": sd, "optimizer": {"state": {}, "param_groups": []}}, path)


def write_moco_v2(state, backbone, path):
    head = {"fc.0.weight": torch.randn(512, 512), "fc.0.bias": torch.randn(512),
            "fc.2.weight": torch.randn(128, 512), "fc.2.bias": torch.randn(128)}
    sd = {**_prefixed("module.encoder_q.", {**backbone, **head}),
          **_prefixed("module.encoder_k.", {**backbone, **head}),
          "module.queue": torch.randn(128, 64), "module.queue_ptr": torch.zeros(1, dtype=torch.long)}
    torch.save({"epoch": 200, "arch": "resnet18", "state_dict": sd, "optimizer": {"state": {}, "param_groups": []}}, path)


def write_moco_v3(state, backbone, path):
    head = {"fc.0.weight": torch.randn(64, 512), "fc.1.weight": torch.randn(64), "fc.1.bias": torch.randn(64),
            "fc.1.running_mean": torch.randn(64), "fc.1.running_var": torch.rand(64),
            "fc.1.num_batches_tracked": torch.tensor(3), "fc.3.weight": torch.randn(32, 64)}
    sd = {**_prefixed("module.base_encoder.", {**backbone, **head}),
          **_prefixed("module.momentum_encoder.", {**backbone, **head}),
          "module.predictor.0.weight": torch.randn(64, 32), "module.predictor.3.weight": torch.randn(32, 64)}
    torch.save({"epoch": 100, "arch": "resnet18", "state_dict": sd, "optimizer": {"state": {}, "param_groups": []},
                "scaler": {"scale": 65536.0}}, path)


def write_timm_bare(state, backbone, path):
    torch.save(state, path)  # timm ResNet names are torchvision's: conv1, bn1, layerX.Y.*, fc


def write_timm_train(state, backbone, path):
    # timm train.py checkpoint (its "args" Namespace would need the unsafe flag, so left out here)
    torch.save({"epoch": 10, "arch": "resnet", "state_dict": state,
                "state_dict_ema": {k: v.clone() for k, v in state.items()}, "optimizer": {"state": {}},
                "version": 2, "metric": 71.2}, path)


def write_solo_learn(state, backbone, path):
    sd = {**_prefixed("backbone.", backbone), **_prefixed("momentum_backbone.", backbone),
          "projector.0.weight": torch.randn(64, 512), "projector.0.bias": torch.randn(64),
          "projector.3.weight": torch.randn(32, 64), "classifier.weight": torch.randn(10, 512),
          "classifier.bias": torch.randn(10), "momentum_projector.0.weight": torch.randn(64, 512)}
    torch.save({"epoch": 99, "global_step": 1000, "pytorch-lightning_version": "2.0.0", "state_dict": sd,
                "optimizer_states": [], "lr_schedulers": [], "hyper_parameters": {"method": "byol"}}, path)


def write_lightly(state, backbone, path):
    model = torchvision.models.resnet18()
    model.load_state_dict(state)
    wrapper = nn.Module()
    wrapper.backbone = nn.Sequential(*list(model.children())[:-1])  # lightly's examples convention
    wrapper.projection_head = nn.Sequential(nn.Linear(512, 64), nn.ReLU(), nn.Linear(64, 32))
    torch.save(wrapper.state_dict(), path)


def write_vissl(state, backbone, path):
    model = torchvision.models.resnet18()
    model.load_state_dict(state)
    trunk = nn.Module()
    trunk._feature_blocks = nn.ModuleDict([
        ("conv1", model.conv1), ("bn1", model.bn1), ("conv1_relu", model.relu), ("maxpool", model.maxpool),
        ("layer1", model.layer1), ("layer2", model.layer2), ("layer3", model.layer3), ("layer4", model.layer4),
        ("avgpool", model.avgpool), ("flatten", nn.Flatten(1))])
    heads = {"0.clf.0.weight": torch.randn(128, 512), "0.clf.0.bias": torch.randn(128)}
    torch.save({"classy_state_dict": {"base_model": {"model": {"trunk": trunk.state_dict(), "heads": heads},
                                                     "meta": {}}},
                "phase_idx": 10, "iteration": 5000, "loss": {}, "iteration_num": 5000, "train_phase_idx": 5}, path)


def write_vissl_flat(state, backbone, path):
    # a whole VISSL model's state dict: trunk._feature_blocks.* next to heads.*
    sd = _prefixed("trunk._feature_blocks.", backbone)
    sd["heads.0.clf.0.weight"] = torch.randn(10, 512)
    torch.save(sd, path)


def write_detectron2(state, backbone, path):
    model = {reference_detectron2_name(k): v.numpy().copy() for k, v in backbone.items()}
    with open(path, "wb") as fh:
        pickle.dump({"model": model, "__author__": "DenseCL", "matching_heuristics": True}, fh)


def write_mmdet(state, backbone, path):
    torch.save({"state_dict": _prefixed("backbone.", backbone), "meta": {"author": "x"}}, path)


def write_mmdet_detector(state, backbone, path):
    sd = {**_prefixed("backbone.", backbone), "neck.lateral_convs.0.conv.weight": torch.randn(8, 64, 1, 1),
          "rpn_head.rpn_conv.weight": torch.randn(8, 8, 3, 3), "roi_head.bbox_head.fc_cls.weight": torch.randn(21, 8)}
    torch.save({"state_dict": sd, "meta": {"epoch": 12}}, path)


def write_dataparallel(state, backbone, path):
    torch.save(_prefixed("module.", state), path)


# (id, writer, file name, expected format, needs the unsafe flag)
LAYOUTS = [
    ("torchvision", write_torchvision, "tv.pth", "torchvision", False),
    ("safetensors", write_safetensors, "model.safetensors", "torchvision", False),
    ("extracted-author", write_extracted_author, "ext.pth", "extracted-backbone", False),
    ("extracted-plain", write_extracted_plain, "ext.pth", "extracted-backbone", False),
    ("extracted-model", write_extracted_model, "ext.pth", "extracted-backbone", False),
    ("bare-backbone", write_bare_backbone, "bare.pth", "torchvision", False),
    ("mmselfsup-0.x", write_mmselfsup0, "densecl.pth", "mmselfsup-0.x", False),
    ("mmselfsup-1.x", write_mmselfsup1, "densecl.pth", "mmselfsup-1.x", False),
    ("densebench", write_densebench, "latest.pth", "densebench", False),
    ("moco-v1", write_moco_v1, "moco.pth.tar", "moco-v1", False),
    ("moco-v2", write_moco_v2, "moco.pth.tar", "moco-v2", False),
    ("moco-v3", write_moco_v3, "moco.pth.tar", "moco-v3", False),
    ("timm-bare", write_timm_bare, "timm.pth", "torchvision", False),
    ("timm-train", write_timm_train, "checkpoint-10.pth.tar", "timm", False),
    ("solo-learn", write_solo_learn, "byol.ckpt", "solo-learn", False),
    ("lightly", write_lightly, "lightly.pth", "lightly", False),
    ("vissl", write_vissl, "model_final_checkpoint_phase9.torch", "vissl", False),
    ("vissl-flat", write_vissl_flat, "vissl_model.torch", "vissl", False),
    ("detectron2", write_detectron2, "densecl_r18.pkl", "detectron2", True),
    ("mmdet-backbone", write_mmdet, "mmdet.pth", "mmdet/mmseg", False),
    ("mmdet-detector", write_mmdet_detector, "faster_rcnn.pth", "mmdet/mmseg", False),
    ("dataparallel", write_dataparallel, "dp.pth", "torchvision-dataparallel", False),
]


def _assert_same_features(model: nn.Module, reference: dict) -> None:
    with torch.no_grad():
        feats = forward_features(model.eval(), fixed_input())
    for name, value in reference.items():
        assert torch.equal(feats[name], value), name


@pytest.mark.parametrize("layout", LAYOUTS, ids=[row[0] for row in LAYOUTS])
def test_layout_imports_exactly_and_inspect_names_format(layout, source, tmp_path, capsys):
    _, writer, filename, expected_format, unsafe = layout
    model, state, backbone, feats = source
    path = tmp_path / filename
    writer(state, backbone, path)

    imported, info = build_backbone(path, allow_unsafe_pickle=unsafe)
    assert info.format == expected_format
    assert info.arch == "resnet18"
    assert isinstance(imported.fc, nn.Identity)
    _assert_same_features(imported, feats)
    loaded = imported.state_dict()
    assert set(loaded) == set(backbone)
    assert all(torch.equal(loaded[k], backbone[k]) for k in backbone)  # num_batches_tracked included
    assert info.backbone_hash == tensors_hash(backbone)
    assert info.loaded == len(backbone) and not info.filled

    argv = ["inspect", str(path), "--json"] + (["--allow-unsafe-pickle"] if unsafe else [])
    assert cli_main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == expected_format and report["arch"] == "resnet18"
    assert report["record"] == info.record()
    assert report["ignored_count"] == len(info.ignored)


TEXT_LAYOUTS = [row for row in LAYOUTS if row[0] in ("torchvision", "mmselfsup-0.x", "detectron2")]


@pytest.mark.parametrize("layout", TEXT_LAYOUTS, ids=[row[0] for row in TEXT_LAYOUTS])
def test_inspect_text_output(layout, source, tmp_path, capsys):
    _, writer, filename, expected_format, unsafe = layout
    _, state, backbone, _ = source
    path = tmp_path / filename
    writer(state, backbone, path)
    argv = ["inspect", str(path)] + (["--allow-unsafe-pickle"] if unsafe else [])
    assert cli_main(argv) == 0
    text = capsys.readouterr().out
    _, info = load_backbone_state_dict(path, allow_unsafe_pickle=unsafe)
    assert f"format:        {expected_format}" in text
    assert "architecture:  resnet18" in text and "basic blocks [2, 2, 2, 2]" in text
    assert f"sha256:        {info.sha256}" in text and f"backbone_hash: {info.backbone_hash}" in text
    assert f"loaded:        {len(backbone)} backbone tensors" in text
    assert f"ignored:       {len(info.ignored)} keys" in text
    source_key, target_key = info.mapping_examples[0]
    assert f"  {source_key} -> {target_key}" in text


def test_ignored_keys_are_reported_not_loaded(source, tmp_path):
    _, state, backbone, _ = source
    path = tmp_path / "densecl.pth"
    write_mmselfsup0(state, backbone, path)
    _, info = load_backbone_state_dict(path)
    ignored = set(info.ignored)
    assert "queue" in ignored and "queue2_ptr" in ignored
    assert "encoder_q.1.mlp2.0.weight" in ignored and "encoder_k.0.conv1.weight" in ignored
    assert "encoder_q.0.layer1.0.conv1.weight" in ignored  # the duplicate of backbone.*
    assert ("backbone.conv1.weight", "conv1.weight") in [tuple(p) for p in info.mapping_examples]
    assert info.record() == {"path": str(path), "sha256": info.sha256, "format": "mmselfsup-0.x",
                             "arch": "resnet18", "backbone_hash": info.backbone_hash}


def test_mmselfsup0_with_encoder_q_only(source, tmp_path):
    """A 0.x file without the `backbone.*` duplicate is read from encoder_q.0.*."""
    _, state, backbone, _ = source
    sd = {**_prefixed("encoder_q.0.", backbone), **_densecl_neck("encoder_q.1."), **_queues()}
    path = tmp_path / "q_only.pth"
    torch.save({"state_dict": sd, "meta": {}}, path)
    loaded, info = load_backbone_state_dict(path)
    assert info.format == "mmselfsup-0.x"
    assert all(torch.equal(loaded[k], backbone[k]) for k in backbone)


def test_mmselfsup0_disagreeing_duplicate_is_refused(source, tmp_path):
    _, state, backbone, _ = source
    sd = {**_prefixed("encoder_q.0.", backbone), **_prefixed("backbone.", backbone)}
    sd["encoder_q.0.layer2.0.conv1.weight"] += 1.0
    path = tmp_path / "bad.pth"
    torch.save({"state_dict": sd}, path)
    from densebench.errors import InputError

    with pytest.raises(InputError, match="encoder_q.0.layer2.0.conv1.weight"):
        load_backbone_state_dict(path)


def test_detectron2_without_num_batches_tracked_is_filled(source, tmp_path):
    """detectron2 FrozenBN stores no counter: filled with 0 (documented), reported in info.filled."""
    _, state, backbone, feats = source
    model = {reference_detectron2_name(k): v.numpy().copy() for k, v in backbone.items()
             if not k.endswith("num_batches_tracked")}
    path = tmp_path / "frozen.pkl"
    with open(path, "wb") as fh:
        pickle.dump({"model": model, "__author__": "torchvision", "matching_heuristics": True}, fh)
    imported, info = build_backbone(path, allow_unsafe_pickle=True)
    _assert_same_features(imported, feats)
    n_bn = sum(k.endswith("num_batches_tracked") for k in backbone)
    assert len(info.filled) == n_bn == 20
    loaded, _ = load_backbone_state_dict(path, allow_unsafe_pickle=True)
    assert all(int(loaded[k]) == 0 for k in info.filled)


def test_detectron2_full_model_prefix(source, tmp_path):
    """A detectron2 FPN model_final (backbone.bottom_up.*) is read from its bottom-up ResNet."""
    _, state, backbone, feats = source
    model = {"backbone.bottom_up." + reference_detectron2_name(k): v.numpy().copy() for k, v in backbone.items()}
    model["backbone.fpn_lateral2.weight"] = np.zeros((4, 64, 1, 1), np.float32)
    model["roi_heads.box_predictor.cls_score.weight"] = np.zeros((3, 4), np.float32)
    path = tmp_path / "model_final.pkl"
    with open(path, "wb") as fh:
        pickle.dump({"model": model, "__author__": "Detectron2 Model Zoo"}, fh)
    imported, info = build_backbone(path, allow_unsafe_pickle=True)
    assert info.format == "detectron2"
    _assert_same_features(imported, feats)


def test_fp16_source_is_upcast_exactly(source, tmp_path):
    _, state, backbone, _ = source
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in backbone.items()}
    path = tmp_path / "half.pth"
    torch.save(half, path)
    loaded, _ = load_backbone_state_dict(path)
    assert all(loaded[k].dtype == backbone[k].dtype for k in backbone)
    assert all(torch.equal(loaded[k], half[k].to(backbone[k].dtype)) for k in backbone)


# ---- ResNet-50 (timm naming) and architecture inference ---------------------------------


@pytest.fixture(scope="module")
def resnet50_source():
    model = seeded_resnet("resnet50", seed=2)
    with torch.no_grad():
        feats = forward_features(model, fixed_input(), ["feat2", "feat5"])
    return model.state_dict(), feats


@pytest.mark.slow
@pytest.mark.parametrize("writer,expected", [(write_timm_bare, "torchvision"), (write_timm_train, "timm"),
                                             (write_safetensors, "torchvision")])
def test_timm_resnet50(writer, expected, resnet50_source, tmp_path):
    state, feats = resnet50_source
    backbone = {k: v for k, v in state.items() if not k.startswith("fc.")}
    path = tmp_path / ("model.safetensors" if writer is write_safetensors else "timm_r50.pth")
    writer(state, backbone, path)
    imported, info = build_backbone(path)
    assert (info.format, info.arch) == (expected, "resnet50")
    assert "bottleneck blocks [3, 4, 6, 3]" in info.arch_source and "layer1 width 64" in info.arch_source
    with torch.no_grad():
        got = forward_features(imported.eval(), fixed_input(), ["feat2", "feat5"])
    assert all(torch.equal(got[k], feats[k]) for k in feats)


@pytest.mark.parametrize("arch", ARCHS)
def test_arch_is_inferred_from_shapes(arch):
    with torch.device("meta"):
        state = getattr(torchvision.models, arch)().state_dict()
    backbone = {k: v for k, v in state.items() if not k.startswith("fc.")}
    check = infer_arch(backbone)
    assert check.arch == arch and check.ok
    assert set(reference_shapes(arch)) == set(backbone)


def test_wide_resnet_evidence_names_width():
    from densebench.evaluate.checkpoint import arch_evidence

    with torch.device("meta"):
        wide = torchvision.models.wide_resnet50_2().state_dict()
    assert "layer1 width 128" in arch_evidence(wide)
    assert check_arch(wide, "resnet50").wrong_shape  # same keys, different shapes


def test_given_arch_is_checked(source, tmp_path):
    _, state, _, _ = source
    path = tmp_path / "tv.pth"
    torch.save(state, path)
    _, info = load_backbone_state_dict(path, arch="resnet18")
    assert info.arch == "resnet18" and info.arch_source == "given"


# ---- densebench's own files, written by densebench.pretrain ------------------------------


def test_real_densebench_pretrain_model_and_extracted_backbone(tmp_path):
    """The pre-training model's own state dict (and its backbone.pth export) import exactly."""
    model_mod = pytest.importorskip("densebench.pretrain.model")
    trainer = pytest.importorskip("densebench.pretrain.trainer")
    torch.manual_seed(5)
    densecl = model_mod.DenseCL(arch="resnet18", feat_dim=16, queue_len=32)
    state = densecl.state_dict()
    expected = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}

    path = tmp_path / "epoch_0001.pth"
    torch.save({"densebench": dict(trainer.CHECKPOINT_KIND), "state_dict": state, "epoch": 1, "iteration": 4,
                "config": {"arch": "resnet18"}, "arch": "resnet18"}, path)
    loaded, info = load_backbone_state_dict(path)
    assert (info.format, info.arch) == ("densebench", "resnet18")
    assert set(loaded) == set(expected) and all(torch.equal(loaded[k], expected[k]) for k in expected)
    assert any(k.startswith("backbone_k.") for k in info.ignored) and "queue2" in info.ignored

    extracted = tmp_path / "backbone.pth"
    torch.save({"state_dict": trainer.extract_backbone(state), "author": "densebench", "arch": "resnet18",
                "iteration": 4}, extracted)
    loaded2, info2 = load_backbone_state_dict(extracted)
    assert info2.format == "extracted-backbone" and "densebench" in info2.container
    assert info2.backbone_hash == info.backbone_hash
