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


def test_cache_follows_the_images_and_recovers_from_a_corrupt_entry(tmp_path, synth_root, resnet18_checkpoint,
                                                                     monkeypatch, caplog):
    """Issue 18: after every image was replaced the old features were reused; a truncated cached
    .npy crashed the run."""
    import os
    import shutil

    src = voc07_root(synth_root)
    ids, _ = read_voc_cls_labels(src, "test")
    images = tmp_path / "images"
    images.mkdir()
    paths = []
    for i in ids[:4]:
        paths.append(images / f"{i}.jpg")
        shutil.copy(voc_image_path(src, i), paths[-1])
    ctx = make_ctx(tmp_path, resnet18_checkpoint, synth_root)
    prep = voc_preprocess(128, 112)
    first = extract_features(ctx, "voc07", "test", paths, ["feat3"], prep, batch_size=4)["feat3"]
    entry = next((tmp_path / "cache").rglob("feat3-*.npy"))
    calls = []
    real_compute = features_mod.compute_features
    monkeypatch.setattr(features_mod, "compute_features", lambda *a, **k: calls.append(1) or real_compute(*a, **k))
    # replace every image by another one (the file names stay): not served from the cache
    for path, other in zip(paths, ids[4:8]):
        shutil.copy(voc_image_path(src, other), path)
        stat = path.stat()
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))   # coarse-mtime filesystems
    replaced = extract_features(ctx, "voc07", "test", paths, ["feat3"], prep, batch_size=4)["feat3"]
    assert calls == [1] and not np.allclose(replaced, first)
    fresh = make_ctx(tmp_path / "fresh", resnet18_checkpoint, synth_root)
    np.testing.assert_allclose(replaced, extract_features(fresh, "voc07", "test", paths, ["feat3"], prep)["feat3"],
                               rtol=1e-5, atol=1e-6)
    # a truncated cache entry is recomputed (with a note) and rewritten whole
    entry = max((tmp_path / "cache").rglob("feat3-*.npy"), key=lambda p: p.stat().st_mtime_ns)
    entry.write_bytes(entry.read_bytes()[:200])
    calls.clear()
    with caplog.at_level("WARNING", logger="densebench.evaluate.features"):
        again = extract_features(ctx, "voc07", "test", paths, ["feat3"], prep, batch_size=4)["feat3"]
    assert calls == [1] and "recomputing" in caplog.text and str(entry) in caplog.text
    np.testing.assert_array_equal(again, replaced)
    np.testing.assert_array_equal(np.load(entry), replaced)
    calls.clear()
    extract_features(ctx, "voc07", "test", paths, ["feat3"], prep, batch_size=4)
    assert calls == []                                            # the rewritten entry is used again
