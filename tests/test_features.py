"""Feature extraction: preprocessing + pooling as specified, list order, cache, --save-features."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from densebench.data.image import load_image
from densebench.data.layout import voc07_root
from densebench.data.voc import read_voc_cls_labels, voc_image_path
from densebench.evaluate import features as features_mod
from densebench.evaluate.backbone import pooled_features
from densebench.evaluate.context import RunContext
from densebench.evaluate.features import GAP, extract_features, knn_preprocess, voc_preprocess


def make_ctx(tmp_path, checkpoint, data_root, save=None):
    return RunContext(checkpoint=checkpoint, data_root=data_root, work_dir=tmp_path / "work",
                      cache_dir=tmp_path / "cache", arch="resnet18", show_progress=False,
                      save_features_dir=save)


def test_voc_transform_squashes_without_crop(realdata):
    image = load_image(realdata / "mmdet_tests_data" / "color.jpg")
    tensor = voc_preprocess(256, 224).transform()(image)
    assert tensor.shape == (3, 224, 224)
    assert knn_preprocess(64, 48).transform()(image).shape == (3, 48, 48)
    # squash keeps the whole image: a 2:1 image resized to 64 x 32 reaches the same pixels
    wide = load_image(realdata / "mmdet_tests_data" / "color.jpg").resize((200, 100))
    squashed = voc_preprocess(32, 32).transform()(wide)
    direct = torchvision.transforms.functional.to_tensor(
        wide.resize((64, 32), Image.BILINEAR).resize((32, 32), Image.BILINEAR))
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    assert torch.allclose(squashed, (direct - mean) / std, atol=0.1)


def test_extract_matches_direct_forward_and_caches(tmp_path, synth_root, resnet18_checkpoint, monkeypatch):
    root = voc07_root(synth_root)
    ids, labels = read_voc_cls_labels(root, "test")
    paths = [voc_image_path(root, i) for i in ids[:6]]
    ctx = make_ctx(tmp_path, resnet18_checkpoint, synth_root, save=None)
    prep = voc_preprocess(128, 112)
    feats = extract_features(ctx, "voc07", "test", paths, ["feat2", "feat3", GAP], prep, batch_size=4)
    model, _ = ctx.backbone()
    model.eval()
    batch = torch.stack([prep.transform()(load_image(p)) for p in paths])
    with torch.no_grad():
        direct = pooled_features(model, batch, ["feat2", "feat3"])
        gap = model(batch)                                 # fc = Identity: torchvision's own GAP
    # feat2 at 112 input: 64 x 28 x 28 -> AvgPool(16, 8) -> 64 x 2 x 2
    assert feats["feat2"].shape == (6, 64 * 2 * 2) and feats["feat2"].dtype == np.float32
    np.testing.assert_allclose(feats["feat2"], direct["feat2"].numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(feats["feat3"], direct["feat3"].numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(feats[GAP], gap.numpy(), rtol=1e-4, atol=1e-5)
    # second call: read from the cache, no forward pass
    monkeypatch.setattr(features_mod, "compute_features", lambda *a, **k: pytest.fail("recomputed"))
    again = extract_features(ctx, "voc07", "test", paths, ["feat3", "feat2"], prep, batch_size=4)
    np.testing.assert_array_equal(again["feat2"], feats["feat2"])
    # another preprocessing or image list is another cache entry
    with pytest.raises(pytest.fail.Exception):
        extract_features(ctx, "voc07", "test", paths, ["feat2"], voc_preprocess(128, 120))
    with pytest.raises(pytest.fail.Exception):
        extract_features(ctx, "voc07", "test", paths[:5], ["feat2"], prep)
