"""mIoU / aAcc of the segmentation protocols against a hand-worked example, sklearn's confusion
matrix and the real label PNGs of tests/data/realdata (PROTOCOLS.md 8 "Metric")."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import confusion_matrix

from densebench.protocols.segmentation import intersect_and_union, mean_iou, summarize_iou


def test_hand_worked_example_accumulates_over_the_set():
    # image 1, pairs (pred, label): (0,0) (0,1) (1,1) (1,1) (2,255 ignored) (2,2)
    pred1, label1 = np.array([[0, 0, 1], [1, 2, 2]]), np.array([[0, 1, 1], [1, 255, 2]])
    # image 2: (2,2) (2,0) (0,0) (1,0)
    pred2, label2 = np.array([[2, 2], [0, 1]]), np.array([[2, 0], [0, 0]])
    out = mean_iou([pred1, pred2], [label1, label2], num_classes=4, class_names=["a", "b", "c", "d"])
    # class a: I = 1+1, U = 2+3 -> 0.4; class b: I = 2+0, U = 3+1 -> 0.5; class c: I = 1+1, U = 1+2 -> 2/3
    # class d: absent on both sides -> excluded (null); per-image averaging would give another number
    assert out["per_class_IoU"]["a"] == pytest.approx(40.0)
    assert out["per_class_IoU"]["b"] == pytest.approx(50.0)
    assert out["per_class_IoU"]["c"] == pytest.approx(200.0 / 3)
    assert out["per_class_IoU"]["d"] is None
    assert out["mIoU"] == pytest.approx((40.0 + 50.0 + 200.0 / 3) / 3)
    # aAcc: correct pixels 6 over 9 labelled (non-255) pixels
    assert out["aAcc"] == pytest.approx(600.0 / 9)
    # per-class accuracy: a 2/4, b 2/3, c 2/2
    assert out["per_class_Acc"]["a"] == pytest.approx(50.0)
    assert out["per_class_Acc"]["b"] == pytest.approx(200.0 / 3)


def _sklearn_miou(preds, labels, num_classes):
    """Independent implementation: one confusion matrix over all valid pixels of the set."""
    y_true = np.concatenate([l.ravel() for l in labels])
    y_pred = np.concatenate([p.ravel() for p in preds])
    keep = y_true != 255
    cm = confusion_matrix(y_true[keep], y_pred[keep], labels=list(range(num_classes))).astype(np.float64)
    inter = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = inter / union
    return 100 * np.nanmean(iou), 100 * iou, 100 * inter.sum() / cm.sum()


def test_matches_sklearn_confusion_matrix_on_random_maps():
    rng = np.random.default_rng(0)
    num_classes = 7
    preds, labels = [], []
    for shape in [(13, 17), (20, 9), (5, 31)]:
        label = rng.integers(0, num_classes - 1, size=shape)  # class 6 never labelled ...
        label[rng.random(shape) < 0.15] = 255
        pred = np.where(rng.random(shape) < 0.6, label, rng.integers(0, num_classes - 2, size=shape))
        pred[pred == 255] = 0                              # ... and never predicted: excluded
        preds.append(pred)
        labels.append(label)
    expected_miou, expected_iou, expected_aacc = _sklearn_miou(preds, labels, num_classes)
    out = mean_iou(preds, labels, num_classes)
    assert out["mIoU"] == pytest.approx(expected_miou)
    assert out["aAcc"] == pytest.approx(expected_aacc)
    got = np.array([np.nan if v is None else v for v in out["per_class_IoU"].values()])
    np.testing.assert_allclose(got, expected_iou, equal_nan=True)
    assert out["per_class_IoU"]["6"] is None


def test_intersect_and_union_ignores_255_and_out_of_range_labels():
    pred = torch.tensor([0, 1, 2, 1])
    label = torch.tensor([0, 255, 9, 1])
    inter, union, area_pred, area_label = intersect_and_union(pred, label, num_classes=3)
    assert inter.tolist() == [1, 1, 0]
    assert area_label.tolist() == [1, 1, 0]     # 9 >= num_classes counts nowhere (mmseg histc)
    assert area_pred.tolist() == [1, 1, 1]
    assert union.tolist() == [1, 1, 1]


def test_empty_set_gives_null_not_nan():
    out = summarize_iou(torch.zeros(4, 3, dtype=torch.float64), ["x", "y", "z"])
    assert out["mIoU"] is None and out["aAcc"] is None


def _label_png(path):
    return np.array(Image.open(path))  # palette indices, never .convert("RGB")


def test_real_voc_aug_labels_against_themselves(realdata):
    files = sorted((realdata / "voc_SegmentationClassAug_sample" / "SegmentationClassAug").glob("*.png"))
    assert len(files) >= 10
    labels = [_label_png(f) for f in files]
    rng = np.random.default_rng(1)
    # predictions equal the labels where labelled; anything at the 255 border (ignored)
    preds = [np.where(l == 255, rng.integers(0, 21, size=l.shape), l) for l in labels]
    out = mean_iou(preds, labels, 21)
    assert out["mIoU"] == pytest.approx(100.0) and out["aAcc"] == pytest.approx(100.0)
    present = set(np.unique(np.concatenate([l.ravel() for l in labels]))) - {255}
    for c, value in enumerate(out["per_class_IoU"].values()):
        assert (value == pytest.approx(100.0)) if c in present else (value is None)
    # one real map against itself
    single = mean_iou([labels[0]], [labels[0]], 21)
    assert single["mIoU"] == pytest.approx(100.0)
    assert sum(v is not None for v in single["per_class_IoU"].values()) == len(set(np.unique(labels[0])) - {255})
    # a wrong prediction (every object pixel called background) against sklearn
    wrong = [np.where(l == 255, 255, 0) for l in labels]
    wrong = [np.where(w == 255, 0, w) for w in wrong]
    expected_miou, _, expected_aacc = _sklearn_miou(wrong, labels, 21)
    out = mean_iou(wrong, labels, 21)
    assert out["mIoU"] == pytest.approx(expected_miou) and out["aAcc"] == pytest.approx(expected_aacc)
    assert out["mIoU"] < 50


def test_real_cityscapes_train_ids_against_themselves(realdata):
    path = next((realdata / "mmseg_tests_data" / "pseudo_cityscapes_dataset" / "gtFine").rglob("*_labelTrainIds.png"))
    label = _label_png(path)
    assert 255 in label
    pred = np.where(label == 255, 18, label)
    out = mean_iou([pred], [label], 19)
    assert out["mIoU"] == pytest.approx(100.0) and out["aAcc"] == pytest.approx(100.0)
    present = set(np.unique(label).tolist()) - {255}
    assert {c for c, v in enumerate(out["per_class_IoU"].values()) if v is not None} == present
    # shift every labelled pixel by one class: compare with sklearn
    shifted = np.where(label == 255, 0, (label.astype(np.int64) + 1) % 19)
    expected_miou, _, expected_aacc = _sklearn_miou([shifted], [label], 19)
    out = mean_iou([shifted], [label], 19)
    assert out["mIoU"] == pytest.approx(expected_miou) and out["aAcc"] == pytest.approx(expected_aacc)
    assert math.isclose(out["aAcc"], 0.0, abs_tol=1e-9)
