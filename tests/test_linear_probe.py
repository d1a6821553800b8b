"""Unit tests of the shared linear-probe trainer (PROTOCOLS.md 3a, 3b, 4, 12.5)."""
from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from sklearn.metrics import top_k_accuracy_score
from torch import nn

from densebench.config import make_config
from densebench.errors import InputError
from densebench.protocols import linear_probe as lp

PROTOCOLS = ("linear_imagenet_mhead", "linear_imagenet", "linear_places205_mhead", "linear_inat18_mhead")


def protocol(name):
    return importlib.import_module(f"densebench.protocols.{name}")


# ----------------------------------------------------------------------------- configs

def test_paper_configs_hold_the_published_protocol():
    mhead = protocol("linear_imagenet_mhead").Config()
    assert (mhead.num_classes, mhead.epochs, mhead.lr, mhead.momentum, mhead.weight_decay, mhead.nesterov) == \
        (1000, 90, 0.01, 0.9, 1e-4, True)
    assert mhead.lr_steps == (30, 60, 90) and mhead.lr_gamma == 0.1 and mhead.batch_size == 256
    assert mhead.color_jitter == (0.4, 0.4, 0.4, 0.0) and mhead.lighting_std == 0.1
    assert mhead.bn_momentum == 0.1 and mhead.pooling == "specified" and mhead.eval_interval == 10
    avg = protocol("linear_imagenet").Config()
    assert (avg.lr, avg.weight_decay, avg.nesterov, avg.lr_steps, avg.epochs, avg.eval_interval) == \
        (30.0, 0.0, False, (60, 80), 100, 1)
    assert not hasattr(avg, "bn_momentum")
    places = protocol("linear_places205_mhead").Config()
    assert (places.num_classes, places.epochs, places.lr_steps, places.train_center_crop) == (205, 28, (7, 14, 21), 256)
    inat = protocol("linear_inat18_mhead").Config()
    assert (inat.num_classes, inat.epochs, inat.lr_steps) == (8142, 84, (24, 48, 72))
    for name in PROTOCOLS:
        module = protocol(name)
        assert module.NAME == name
        cfg = module.Config()
        assert (cfg.crop_size, cfg.resize_size, cfg.init_std, cfg.fast) == (224, 256, 0.01, False)
        head = "avgpool" if name == "linear_imagenet" else "multi"
        lp.check_config(cfg, head)          # every trainer field present


@pytest.mark.parametrize("name", PROTOCOLS)
def test_tiny_preset_applies_and_fast_mode_is_not_paper(name):
    module = protocol(name)
    cfg, label = make_config(module.Config, name, "tiny")
    assert label == "tiny" and cfg.batch_size == 32 and cfg.crop_size == 64 and cfg.eval_interval == 1
    _, label = make_config(module.Config, name, "paper", {"fast": True})
    assert label == "custom"


# ----------------------------------------------------------------------------- augmentation

def test_lighting_matches_the_pca_formula():
    image = torch.rand(3, 5, 4)
    torch.manual_seed(7)
    out = lp.Lighting(0.1)(image)
    torch.manual_seed(7)
    alpha = torch.normal(0.0, 0.1, size=(3,)).numpy().astype(np.float64)
    eigvec = np.array(lp.LIGHTING_EIGVEC)           # column j is the j-th eigenvector
    shift = eigvec @ (alpha * np.array(lp.LIGHTING_EIGVAL))
    expected = image.numpy() + shift.reshape(3, 1, 1)
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-6)
    assert not np.allclose(shift, 0)
    assert torch.equal(lp.Lighting(0.0)(image), image)


def test_imagenet_mhead_train_transform_order():
    cfg = protocol("linear_imagenet_mhead").Config()
    steps = protocol("linear_imagenet_mhead").train_transform(cfg).transforms
    kinds = [type(t).__name__ for t in steps]
    assert kinds == ["RandomResizedCrop", "RandomHorizontalFlip", "ColorJitter", "ToTensor", "Lighting", "Normalize"]
    assert steps[0].scale == (0.08, 1.0) and steps[0].interpolation == torchvision.transforms.InterpolationMode.BILINEAR
    places = protocol("linear_places205_mhead")
    kinds = [type(t).__name__ for t in places.train_transform(places.Config()).transforms]
    assert kinds == ["Resize", "CenterCrop", "RandomCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]


def _write_images(folder: Path, count: int, size: int = 40):
    rng = np.random.default_rng(0)
    items = []
    for index in range(count):
        path = folder / f"img{index}.png"
        Image.fromarray(rng.integers(0, 256, (size, size + 6, 3), dtype=np.uint8)).save(path)
        items.append((path, index % 3))
    return items


def test_augmentation_depends_only_on_seed_epoch_and_index(tmp_path):
    items = _write_images(tmp_path, 3)
    cfg = dataclasses.replace(protocol("linear_imagenet_mhead").Config(), crop_size=32)
    dataset = lp.LabelledImages(items, protocol("linear_imagenet_mhead").train_transform(cfg), seed=3)
    first, label, index = dataset[1]
    torch.manual_seed(123)                          # the global RNG has no influence...
    again = dataset[1][0]
    assert torch.equal(first, again) and label == 1 and index == 1
    before = torch.get_rng_state()
    dataset[2]
    assert torch.equal(before, torch.get_rng_state())   # ...and is left untouched
    dataset.set_epoch(1)
    assert not torch.equal(first, dataset[1][0])        # a new epoch draws new crops


# ----------------------------------------------------------------------------- model

def test_resnet50_head_dims_from_a_real_forward_at_224():
    backbone = lp.FrozenBackbone(torchvision.models.resnet50(), "multi", "specified")
    shapes = backbone.output_shapes(224)
    dims = {name: int(np.prod(shape)) for name, shape in shapes.items()}
    assert dims == {"feat1": 9216, "feat2": 9216, "feat3": 8192, "feat4": 9216, "feat5": 8192}
    cfg = make_config(protocol("linear_imagenet_mhead").Config, "linear_imagenet_mhead")[0]
    heads = lp.build_heads(backbone, cfg, seed=0)
    assert heads.input_dims() == dims
    linear = heads.heads["feat3"][-1]
    assert linear.out_features == 1000 and torch.count_nonzero(linear.bias) == 0
    assert abs(float(linear.weight.std()) - 0.01) < 5e-4
    bn = heads.heads["feat3"][0]
    assert isinstance(bn, nn.BatchNorm2d) and not bn.affine and bn.momentum == 0.1 and bn.num_features == 512
    adaptive = lp.FrozenBackbone(torchvision.models.resnet50(), "multi", "adaptive").output_shapes(64)
    assert {n: int(np.prod(s)) for n, s in adaptive.items()} == dims
    avg = lp.FrozenBackbone(torchvision.models.resnet50(), "avgpool").output_shapes(64)
    assert avg == {"avgpool": (2048,)}


def test_specified_pooling_refuses_too_small_inputs():
    backbone = lp.FrozenBackbone(torchvision.models.resnet18(), "multi", "specified")
    with pytest.raises(InputError, match="adaptive"):
        backbone.output_shapes(64)


def test_backbone_gets_no_gradient_and_keeps_its_bn_statistics():
    """ResNet-50 at 224, batch 2: two training steps of the five heads leave the backbone untouched."""
    torch.manual_seed(0)
    resnet = torchvision.models.resnet50()
    resnet.fc = nn.Identity()
    backbone = lp.FrozenBackbone(resnet, "multi", "specified")
    cfg = dataclasses.replace(protocol("linear_imagenet_mhead").Config(), num_classes=7)
    heads = lp.build_heads(backbone, cfg, seed=0)
    before = {k: v.clone() for k, v in resnet.state_dict().items()}
    heads_before = {k: v.clone() for k, v in heads.state_dict().items()}
    optimizer = lp.make_optimizer(heads, cfg)
    runtime = lp.Runtime(torch.device("cpu"), amp=True, channels_last=True)
    heads.train()
    backbone.train()                                    # must stay in eval mode
    assert not backbone.training and not resnet.training and not resnet.bn1.training
    for _ in range(2):
        images, labels = torch.randn(2, 3, 224, 224) * 3 + 1, torch.tensor([1, 4])
        feats = runtime.head_inputs(backbone, images)
        assert all(not f.requires_grad for f in feats.values())
        loss = sum(nn.functional.cross_entropy(out, labels) for out in heads(feats).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(p.grad is None and not p.requires_grad for p in resnet.parameters())
    after = resnet.state_dict()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key      # running_mean/var/num_batches_tracked included
    changed = heads.state_dict()
    assert not torch.equal(heads_before["heads.feat5.2.weight"], changed["heads.feat5.2.weight"])
    assert int(changed["heads.feat1.0.num_batches_tracked"]) == 2


def test_cpu_sync_batchnorm_is_plain_batchnorm_in_one_process():
    x = torch.randn(6, 4, 3, 3) * 2 + 5
    plain = nn.BatchNorm2d(4, affine=False, momentum=0.1)
    wrapped = lp.convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(4, affine=False, momentum=0.1)),
                                        torch.device("cpu"))
    assert type(wrapped[0]) is lp.CpuSyncBatchNorm
    torch.testing.assert_close(wrapped(x), plain(x))
    torch.testing.assert_close(wrapped[0].running_var, plain.running_var)
    on_gpu = lp.convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(4, affine=False)), torch.device("cuda"))
    assert type(on_gpu[0]) is nn.SyncBatchNorm and not on_gpu[0].affine


# ----------------------------------------------------------------------------- metric and labels

def test_topk_correct_matches_sklearn():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(50, 7)).astype(np.float32)
    labels = rng.integers(0, 7, 50)
    counts = lp.topk_correct(torch.from_numpy(logits), torch.from_numpy(labels), (1, 5)).tolist()
    for k, count in zip((1, 5), counts):
        expected = top_k_accuracy_score(labels, logits, k=k, labels=list(range(7)), normalize=False)
        assert count == int(expected)


def test_headline_is_the_epoch_the_reference_last_evaluated():
    """[0x] evaluates every 10 epochs and not at the end (configs/benchmarks/classification/
    _base_/datasets/{places205,inaturalist2018}.py `evaluation interval=10`): Places205's 28 epochs
    were last evaluated at epoch 20, iNat18's 84 at 80; the ImageNet probes end on an evaluation."""
    epochs = {name: (protocol(name).Config().epochs, protocol(name).Config().eval_interval) for name in PROTOCOLS}
    assert {name: lp.reported_epoch(*value) for name, value in epochs.items()} == {
        "linear_imagenet_mhead": 90, "linear_imagenet": 100, "linear_places205_mhead": 20, "linear_inat18_mhead": 80}
    assert lp.reported_epoch(6, 1) == 6 and lp.reported_epoch(6, 4) == 4 and lp.reported_epoch(3, 10) == 3

    def scores(top1):
        return {"feat1": {"top1": top1, "top5": top1 + 1}, "feat5": {"top1": top1 + 2, "top5": top1 + 3}}
    history = [{"epoch": e, "heads": scores(float(e)), "train_loss": {}} for e in (10, 20, 28)]
    metrics = lp.probe_metrics(history, 28, 10)
    assert metrics == {"feat1": {"top1": 20.0, "top5": 21.0, "epoch": 20},
                       "feat5": {"top1": 22.0, "top5": 23.0, "epoch": 20},
                       "at_final_epoch": {"feat1": {"top1": 28.0, "top5": 29.0, "epoch": 28},
                                          "feat5": {"top1": 30.0, "top5": 31.0, "epoch": 28}}}
    assert lp.probe_metrics(history[:2], 20, 10) == {"feat1": {"top1": 20.0, "top5": 21.0, "epoch": 20},
                                                     "feat5": {"top1": 22.0, "top5": 23.0, "epoch": 20}}
    from densebench.results.report import metric_value

    assert metric_value(metrics, "feat5.top1") == 22.0       # the report's Places F5 / iNat F5 column


def test_check_labels_names_the_list_file():
    items = [(Path("a.jpg"), 0), (Path("b.jpg"), 9)]
    lp.check_labels(items, 10, "meta/train.txt")
    with pytest.raises(InputError) as err:
        lp.check_labels(items, 9, "meta/train.txt")
    assert err.value.path == "meta/train.txt" and "label 9" in err.value.problem
    with pytest.raises(InputError):
        lp.check_labels([], 9, "meta/val.txt")


def test_batch_must_split_evenly_over_ranks():
    assert lp.per_rank_batch(256, 8) == 32 and lp.per_rank_batch(256, 1) == 256
    with pytest.raises(InputError, match="not divisible"):
        lp.per_rank_batch(256, 3)


def test_resume_state_is_tied_to_the_images_and_labels(tmp_path):
    """Issue 18: replacing images (same checkpoint and config, so the same work dir) must not
    resume a probe trained on the old ones: the data identity is part of the stored config."""
    import os

    images = [tmp_path / "a.jpg", tmp_path / "b.jpg"]
    for path in images:
        path.write_bytes(b"x" * 10)
    train, val = [(images[0], 0)], [(images[1], 1)]
    before = lp.data_identity(train, val)
    assert lp.data_identity(list(train), list(val)) == before
    assert lp.data_identity(train, [(images[1], 2)]) != before                  # a label changed
    images[1].write_bytes(b"y" * 11)                                              # an image replaced
    assert lp.data_identity(train, val)["val"] != before["val"]
    touched = lp.data_identity(train, val)
    stat = images[0].stat()
    os.utime(images[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))       # same size, newer
    assert lp.data_identity(train, val)["train"] != touched["train"]


def test_resume_state_refuses_another_config(tmp_path):
    heads = nn.Sequential(nn.Linear(3, 2))
    cfg = protocol("linear_imagenet").Config()
    optimizer = lp.make_optimizer(heads, cfg)
    scheduler = lp.make_scheduler(optimizer, cfg)
    path = tmp_path / lp.STATE_FILE
    lp.save_state(path, heads, optimizer, scheduler, 3, [{"epoch": 3}], {"lr": 30.0})
    epoch, history = lp.load_state(path, heads, optimizer, scheduler, {"lr": 30.0})
    assert epoch == 3 and history == [{"epoch": 3}]
    with pytest.raises(InputError, match="different probe config"):
        lp.load_state(path, heads, optimizer, scheduler, {"lr": 1.0})
    path.write_bytes(b"not a torch file")
    with pytest.raises(InputError, match="resume state"):
        lp.load_state(path, heads, optimizer, scheduler, {"lr": 30.0})
