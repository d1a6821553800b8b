"""VOC07 11-point detection AP: a hand-worked example and an independent devkit-style implementation."""
from __future__ import annotations

import numpy as np
import pytest

from densebench.protocols.voc_det_eval import (IOU_THRESHOLDS, evaluate_voc_detection, voc07_11point_ap,
                                               voc_box_to_continuous)

CLASSES = ["cat", "dog", "bird"]


def _image(boxes, labels, difficult):
    return {"boxes": np.asarray(boxes, dtype=np.float64).reshape(-1, 4), "labels": np.asarray(labels),
            "difficult": np.asarray(difficult, dtype=bool)}


def _dets(boxes, scores, labels):
    return {"boxes": np.asarray(boxes, dtype=np.float64).reshape(-1, 4), "scores": np.asarray(scores, dtype=float),
            "labels": np.asarray(labels)}


def hand_example():
    """cat: image0 has A (normal) and B (difficult); image1 has C (normal). dog: one box, never detected.
    bird: no ground truth at all, one false detection (so bird must not enter the mAP)."""
    A, B, C = [0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]
    ground_truth = [_image([A, B], [0, 0], [False, True]),
                    _image([C, [60, 60, 70, 70]], [0, 1], [False, False])]
    detections = [
        _dets([A, B, A, [80, 80, 90, 90]], [0.9, 0.8, 0.7, 0.6], [0, 0, 0, 2]),   # TP, difficult, duplicate FP, bird
        _dets([[100, 100, 110, 110], [40, 40, 50, 46]], [0.6, 0.5], [0, 0]),      # FP; C at IoU 0.6
    ]
    return ground_truth, detections


def test_hand_worked_example():
    ground_truth, detections = hand_example()
    result = evaluate_voc_detection(ground_truth, detections, CLASSES)
    # cat at IoU 0.5: ranked TP(.9), ignored(.8), FP(.7), FP(.6), TP(.5), 2 positives.
    # recall .5 .5 .5 .5 1, precision 1 1 .5 .33 .5 -> t in 0..0.5: 1 (6 points), t in .6..1: .5 (5 points)
    cat_50 = 100 * (6 * 1.0 + 5 * 0.5) / 11
    # IoU of C's detection is exactly 0.6; matching needs IoU > t, so from t = 0.6 on it is a FP:
    # recall never passes .5 -> 6 points of precision 1 only
    cat_high = 100 * 6 / 11
    per_threshold = [cat_50 if t < 0.6 else cat_high for t in IOU_THRESHOLDS]
    assert result.ap[:, 0] == pytest.approx(per_threshold)
    assert result.ap[:, 1] == pytest.approx([0.0] * 10)                  # dog: GT, no detection
    assert np.isnan(result.ap[:, 2]).all()                               # bird: no GT
    assert result.num_positives.tolist() == [2, 1, 0]                    # difficult B not counted
    metrics = result.metrics()
    assert metrics["AP50"] == pytest.approx(cat_50 / 2)
    assert metrics["AP75"] == pytest.approx(cat_high / 2)
    assert metrics["AP"] == pytest.approx(np.mean(per_threshold) / 2)
    per_class = result.per_class()
    assert per_class["cat"]["AP50"] == pytest.approx(cat_50)
    assert per_class["bird"]["AP50"] is None


def test_difficult_match_is_neither_tp_nor_fp():
    """Removing the detection on the difficult box must not change anything."""
    ground_truth, detections = hand_example()
    without = [dict(d) for d in detections]
    keep = np.array([True, False, True, True])
    without[0] = {k: v[keep] for k, v in detections[0].items()}
    a = evaluate_voc_detection(ground_truth, detections, CLASSES)
    b = evaluate_voc_detection(ground_truth, without, CLASSES)
    np.testing.assert_allclose(a.ap, b.ap)
    # whereas the same detection on a normal box would be a TP
    ground_truth[0]["difficult"][1] = False
    c = evaluate_voc_detection(ground_truth, detections, CLASSES)
    assert c.ap[0, 0] != pytest.approx(a.ap[0, 0])


def test_11_point_interpolation():
    recall = np.array([0.1, 0.2, 0.4, 0.4, 0.8])
    precision = np.array([1.0, 0.5, 0.6, 0.4, 0.3])
    # t=0,.1 -> 1; t=.2 -> .6; .3,.4 -> .6; .5,.6,.7,.8 -> .3; .9,1 -> 0
    expected = (1 + 1 + 0.6 + 0.6 + 0.6 + 0.3 * 4) / 11
    assert voc07_11point_ap(recall, precision) == pytest.approx(expected)


def test_11_point_recall_points_follow_the_reference_float_quirk():
    """devkit/detectron2/mmdet use np.arange(0, 1.1, 0.1): a recall of exactly 0.3 misses the 0.3 point."""
    recall = np.array([0.3])
    precision = np.array([1.0])
    assert voc07_11point_ap(recall, precision) == pytest.approx(3 / 11)       # t = 0, .1, .2 only
    assert voc07_11point_ap(np.array([0.4]), precision) == pytest.approx(5 / 11)


# ------------------------------------------------------------------ independent devkit-style implementation

def devkit_voc_eval(gt_by_image, det_list, class_index, threshold):
    """Straight transcription of the VOC devkit's per-class loop (+1 pixel areas on integer XML boxes)."""
    class_recs, npos = {}, 0
    for image, (boxes, labels, difficult) in gt_by_image.items():
        mask = labels == class_index
        class_recs[image] = {"bbox": boxes[mask], "difficult": difficult[mask], "det": [False] * int(mask.sum())}
        npos += int((~difficult[mask]).sum())
    dets = [d for d in det_list if d[2] == class_index]
    dets.sort(key=lambda d: -d[1])
    tp, fp = np.zeros(len(dets)), np.zeros(len(dets))
    for i, (image, _, _, bb) in enumerate(dets):
        rec = class_recs[image]
        ovmax, jmax = -np.inf, -1
        for j, g in enumerate(rec["bbox"]):
            iw = min(g[2], bb[2]) - max(g[0], bb[0]) + 1.0
            ih = min(g[3], bb[3]) - max(g[1], bb[1]) + 1.0
            if iw > 0 and ih > 0:
                inter = iw * ih
                uni = (bb[2] - bb[0] + 1.0) * (bb[3] - bb[1] + 1.0) + (g[2] - g[0] + 1.0) * (g[3] - g[1] + 1.0) - inter
                if inter / uni > ovmax:
                    ovmax, jmax = inter / uni, j
        if ovmax > threshold:
            if not rec["difficult"][jmax]:
                if not rec["det"][jmax]:
                    tp[i] = 1
                    rec["det"][jmax] = True
                else:
                    fp[i] = 1
        else:
            fp[i] = 1
    if npos == 0:
        return None
    fp, tp = np.cumsum(fp), np.cumsum(tp)
    rec = tp / float(npos)
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    ap = 0.0
    for t in np.arange(0.0, 1.1, 0.1):
        p = 0.0 if np.sum(rec >= t) == 0 else np.max(prec[rec >= t])
        ap += p / 11.0
    return ap


def random_benchmark(seed, num_images=25, num_classes=4):
    rng = np.random.default_rng(seed)
    gt_xml, dets_xml = [], []
    for _ in range(num_images):
        n = rng.integers(0, 6)
        xy = rng.integers(1, 150, size=(n, 2))
        wh = rng.integers(5, 80, size=(n, 2))
        boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float64)
        labels = rng.integers(0, num_classes, size=n)
        difficult = rng.random(n) < 0.2
        gt_xml.append(_image(boxes, labels, difficult))
        jitter = rng.integers(-6, 7, size=boxes.shape)
        true_dets = boxes + jitter
        true_dets[:, 2:] = np.maximum(true_dets[:, 2:], true_dets[:, :2] + 2)
        m = rng.integers(0, 5)
        xy = rng.integers(1, 150, size=(m, 2))
        false_dets = np.concatenate([xy, xy + rng.integers(5, 80, size=(m, 2))], axis=1)
        all_boxes = np.concatenate([true_dets, false_dets]).astype(np.float64)
        dup = rng.random(len(all_boxes)) < 0.2                           # some duplicates
        all_boxes = np.concatenate([all_boxes, all_boxes[dup] + 1])
        det_labels = np.concatenate([labels, rng.integers(0, num_classes, size=m)])
        det_labels = np.concatenate([det_labels, det_labels[dup]])
        scores = rng.random(len(all_boxes))
        dets_xml.append(_dets(all_boxes, scores, det_labels))
    return gt_xml, dets_xml


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_independent_devkit_implementation(seed):
    num_classes = 4
    gt_xml, dets_xml = random_benchmark(seed, num_classes=num_classes)
    names = [f"c{i}" for i in range(num_classes)]
    # densebench convention: continuous coordinates (xmin - 1, ymin - 1, xmax, ymax), plain IoU
    gt_cont = [dict(g, boxes=voc_box_to_continuous(g["boxes"])) for g in gt_xml]
    dets_cont = [dict(d, boxes=voc_box_to_continuous(d["boxes"])) for d in dets_xml]
    result = evaluate_voc_detection(gt_cont, dets_cont, names)
    legacy = evaluate_voc_detection(gt_xml, dets_xml, names, pixel_offset=1.0)
    np.testing.assert_allclose(result.ap, legacy.ap, equal_nan=True)

    gt_by_image = {i: (g["boxes"], g["labels"], g["difficult"]) for i, g in enumerate(gt_xml)}
    det_list = [(i, s, l, b) for i, d in enumerate(dets_xml) for b, s, l in zip(d["boxes"], d["scores"], d["labels"])]
    for t_index, threshold in enumerate(IOU_THRESHOLDS):
        expected = [devkit_voc_eval(gt_by_image, det_list, c, threshold) for c in range(num_classes)]
        valid = [e for e in expected if e is not None]
        for c, e in enumerate(expected):
            if e is None:
                assert np.isnan(result.ap[t_index, c])
            else:
                assert result.ap[t_index, c] == pytest.approx(100 * e, abs=1e-9)
        assert result.map_per_threshold[t_index] == pytest.approx(100 * np.mean(valid), abs=1e-9)
    assert 0 < result.metrics()["AP50"] < 100


def test_perfect_detections_score_100_and_mismatched_lengths_fail():
    gt_xml, _ = random_benchmark(5)
    perfect = [_dets(g["boxes"], np.ones(len(g["labels"])), g["labels"]) for g in gt_xml]
    metrics = evaluate_voc_detection(gt_xml, perfect, [f"c{i}" for i in range(4)]).metrics()
    assert metrics == pytest.approx({"AP50": 100.0, "AP75": 100.0, "AP": 100.0})
    with pytest.raises(ValueError):
        evaluate_voc_detection(gt_xml, perfect[:-1], [f"c{i}" for i in range(4)])
