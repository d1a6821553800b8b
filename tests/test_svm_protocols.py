"""svm_voc07 / lowshot_svm_voc07 / knn_imagenet end to end on the synthetic benchmark with a
real checkpoint layout (a torchvision ResNet-18 state dict), against the sklearn reference."""
from __future__ import annotations

import json

import numpy as np
import pytest

from densebench.evaluate.context import RunContext
from densebench.protocols import knn_imagenet, lowshot_svm_voc07, svm_voc07
from densebench.protocols.voc_svm_common import (SolverOptions, aggregate_lowshot, full_svm_sweep, lowshot_fit_and_test,
                                                 lowshot_rng, sample_lowshot_targets)

pytestmark = pytest.mark.slow


def make_ctx(tmp_path, checkpoint, data_root):
    return RunContext(checkpoint=checkpoint, data_root=data_root, work_dir=tmp_path / "work",
                      cache_dir=tmp_path / "cache", arch="resnet18", show_progress=False,
                      save_features_dir=tmp_path / "saved")


def test_svm_and_lowshot_on_synthetic(tmp_path, synth_root, resnet18_checkpoint, monkeypatch):
    ctx = make_ctx(tmp_path, resnet18_checkpoint, synth_root)
    cfg = svm_voc07.Config(layers=("feat2", "feat3"), resize_short=128, image_size=112, batch_size=50)
    out = svm_voc07.run(ctx, cfg)
    saved = ctx.save_features_dir
    train_x = np.load(saved / "voc07_trainval_feat3.npy")
    train_t = np.load(saved / "voc07_trainval_labels.npy")
    test_x, test_t = np.load(saved / "voc07_test_feat3.npy"), np.load(saved / "voc07_test_labels.npy")
    assert train_x.dtype == np.float32 and train_t.dtype == np.int8 and train_t.shape == (100, 20)
    assert set(np.unique(train_t)) <= {-1, 0, 1}
    assert out.metrics["best_layer"] in ("feat2", "feat3")
    # the converged sklearn reference pipeline on the same features
    ref = full_svm_sweep(train_x, train_t, test_x, test_t,
                         options=SolverOptions(backend="sklearn", sklearn_max_iter=100000))
    assert abs(out.metrics["feat3"]["mAP"] - ref.mean_ap) <= 0.1
    assert out.extra["per_layer"]["feat3"]["chosen_cost"] == [float(c) for c in ref.chosen_costs]

    low_cfg = lowshot_svm_voc07.Config(layers=("feat3",), ks=(1, 2), num_samples=2, resize_short=128,
                                       image_size=112, batch_size=50, costs=svm_voc07.Config().costs[::2])
    low = lowshot_svm_voc07.run(ctx, low_cfg)
    for k in (1, 2):
        samples = [sample_lowshot_targets(train_t, k, lowshot_rng(0, s, k)) for s in range(2)]
        ref_aps = lowshot_fit_and_test(train_x, samples, test_x, test_t, low_cfg.costs,
                                       SolverOptions(backend="sklearn", sklearn_max_iter=100000))
        assert abs(low.metrics["feat3"][f"k{k}"]["mAP"] - aggregate_lowshot(ref_aps, low_cfg.costs)["mAP"]) <= 0.1
    for k in ("k1", "k2"):
        assert low.metrics["feat3"][k]["min"] <= low.metrics["feat3"][k]["mAP"] <= low.metrics["feat3"][k]["max"]
    # resume: every (sample, k) is stored; a rerun solves nothing
    states = sorted((ctx.work_dir / "lowshot" / "feat3").glob("*.json"))
    assert len(states) == 4 and json.loads(states[0].read_text())["key"]["seed"] == 0
    monkeypatch.setattr(lowshot_svm_voc07, "lowshot_fit_and_test", lambda *a, **k: pytest.fail("recomputed"))
    assert lowshot_svm_voc07.run(ctx, low_cfg).metrics == low.metrics


def test_knn_on_synthetic_equals_dense_numpy_knn_on_the_saved_features(tmp_path, synth_root, resnet18_checkpoint):
    """Acceptance of issue 18: the tiny preset's kNN settings (bank_chunk 64 < 160 train rows, k=200
    clipped to the bank) give exactly the accuracies of a dense numpy kNN over the saved .npy files."""
    from test_knn import dense_knn

    ctx = make_ctx(tmp_path, resnet18_checkpoint, synth_root)
    cfg = knn_imagenet.Config(resize_short=73, image_size=64, batch_size=64, query_chunk=16, bank_chunk=64)
    out = knn_imagenet.run(ctx, cfg)
    assert set(out.metrics) == {"k10", "k20", "k100", "k200"}
    assert out.extra["k_clipped_to_bank_size"] == {"k200": 160}
    saved = ctx.save_features_dir
    train, train_y = np.load(saved / "imagenet_train_gap.npy"), np.load(saved / "imagenet_train_labels.npy")
    val, val_y = np.load(saved / "imagenet_val_gap.npy"), np.load(saved / "imagenet_val_labels.npy")
    assert train.shape == (160, 512)
    num_classes = int(max(train_y.max(), val_y.max()) + 1)
    for k in cfg.ks:
        pred = dense_knn(train, train_y, val, k, num_classes)
        top1 = float((pred[:, 0] == val_y).sum()) * 100.0 / len(val_y)
        top5 = float((pred == val_y[:, None]).any(axis=1).sum()) * 100.0 / len(val_y)
        assert out.metrics[f"k{k}"] == {"top1": top1, "top5": top5}, k
