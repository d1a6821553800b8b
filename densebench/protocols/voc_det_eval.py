"""PASCAL VOC2007 detection metric: 11-point AP per class, difficult objects ignored.

PROTOCOLS.md 6.1 ("Metric (AP50)") and 6.2 ("Metrics"), 12.9:
- per class, detections of all test images are sorted by score; each detection is matched to
  the ground-truth box of its class in its image with the highest IoU; if that IoU is above
  the threshold (strictly, as the VOC devkit and detectron2 do; `inclusive=True`: at or above,
  as mmdet's `eval_map` does) and the box is difficult, the
  detection is neither a true nor a false positive; if the box is not difficult and not yet
  taken it is a true positive, else a false positive; below the threshold it is a false positive;
- AP is the VOC07 11-point interpolation: the mean over t in {0, 0.1, ..., 1} of the highest
  precision at recall >= t (0 when that recall is never reached), with the points generated as
  the reference implementations do (`RECALL_POINTS`, floating-point quirk included);
- mAP is the mean over the classes that have at least one non-difficult ground-truth box;
- detectron2's "AP" is the mean of the mAPs at IoU 0.50, 0.55, ..., 0.95; AP50/AP75 are the
  mAPs at 0.50/0.75.

Coordinates. The VOC XML stores 1-based inclusive pixel indices, and the devkit measures
widths as xmax - xmin + 1. densebench converts boxes once, on load, to continuous 0-based
pixel coordinates (xmin - 1, ymin - 1, xmax, ymax) (`voc_box_to_continuous`), trains and
predicts in them, and measures plain continuous IoU here (`pixel_offset=0`). That is exactly
the devkit's "+1" IoU on the XML values (test_det_voc_metric checks the equivalence);
`pixel_offset=1` evaluates boxes still in the XML convention.
All returned numbers are percentages (0-100).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np

# 0.50, 0.55, ..., 0.95 (detectron2 PascalVOCDetectionEvaluator)
IOU_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))


def voc_box_to_continuous(boxes_xml: np.ndarray) -> np.ndarray:
    """1-based inclusive XML boxes -> continuous 0-based [x0, y0, x1, y1] (float32)."""
    boxes = np.asarray(boxes_xml, dtype=np.float32).reshape(-1, 4).copy()
    boxes[:, :2] -= 1.0
    return boxes


def box_iou(boxes: np.ndarray, box: np.ndarray, pixel_offset: float = 0.0) -> np.ndarray:
    """IoU of every row of `boxes` with one `box`; `pixel_offset` 1 is the devkit's +1 rule."""
    ix0 = np.maximum(boxes[:, 0], box[0])
    iy0 = np.maximum(boxes[:, 1], box[1])
    ix1 = np.minimum(boxes[:, 2], box[2])
    iy1 = np.minimum(boxes[:, 3], box[3])
    inter = np.maximum(ix1 - ix0 + pixel_offset, 0.0) * np.maximum(iy1 - iy0 + pixel_offset, 0.0)
    area_box = (box[2] - box[0] + pixel_offset) * (box[3] - box[1] + pixel_offset)
    area_boxes = (boxes[:, 2] - boxes[:, 0] + pixel_offset) * (boxes[:, 3] - boxes[:, 1] + pixel_offset)
    union = area_box + area_boxes - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


# The recall points exactly as the VOC devkit, detectron2 and mmdet generate them:
# np.arange(0, 1.1, 0.1) holds 0.30000000000000004, 0.6000000000000001 and 0.7000000000000001,
# so a recall of exactly 3/10 does not reach the "0.3" point. Kept for identical numbers.
RECALL_POINTS = np.arange(0.0, 1.1, 0.1)


def voc07_11point_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """Mean over the 11 RECALL_POINTS t of max(precision[recall >= t]) (0 where unreached), in [0, 1]."""
    ap = 0.0
    for t in RECALL_POINTS:
        reached = recall >= t
        ap += float(precision[reached].max()) if reached.any() else 0.0
    return ap / 11.0


def match_class(gt_boxes: Dict[int, np.ndarray], gt_difficult: Dict[int, np.ndarray],
                det_images: np.ndarray, det_scores: np.ndarray, det_boxes: np.ndarray,
                iou_threshold: float, pixel_offset: float = 0.0, inclusive: bool = False):
    """True/false positive flags of one class's detections, in descending-score order.

    Returns (tp, fp) float arrays; a detection matched to a difficult box has 0 in both.
    """
    order = np.argsort(-det_scores, kind="stable")
    tp = np.zeros(len(order))
    fp = np.zeros(len(order))
    taken = {image: np.zeros(len(boxes), dtype=bool) for image, boxes in gt_boxes.items()}
    for rank, index in enumerate(order):
        image = int(det_images[index])
        boxes = gt_boxes.get(image)
        if boxes is None or len(boxes) == 0:
            fp[rank] = 1
            continue
        ious = box_iou(boxes, det_boxes[index], pixel_offset)
        best = int(np.argmax(ious))
        if ious[best] > iou_threshold or (inclusive and ious[best] == iou_threshold):
            if gt_difficult[image][best]:
                continue
            if not taken[image][best]:
                tp[rank] = 1
                taken[image][best] = True
            else:
                fp[rank] = 1
        else:
            fp[rank] = 1
    return tp, fp


def class_ap(tp: np.ndarray, fp: np.ndarray, num_positives: int) -> float:
    """11-point AP in [0, 1] from ordered TP/FP flags and the number of non-difficult boxes."""
    if num_positives == 0:
        return float("nan")
    tp_cum = np.cumsum(tp)
    fp_cum = np.cumsum(fp)
    recall = tp_cum / num_positives
    precision = tp_cum / np.maximum(tp_cum + fp_cum, np.finfo(np.float64).eps)
    return voc07_11point_ap(recall, precision)


@dataclass
class VOCDetectionResult:
    """mAPs (percent) and the per-class table ap[threshold][class] (percent, NaN = class without GT)."""
    iou_thresholds: Sequence[float]
    class_names: List[str]
    ap: np.ndarray                                  # [num_thresholds, num_classes], percent
    num_positives: np.ndarray                       # non-difficult GT boxes per class
    map_per_threshold: List[float] = field(default_factory=list)

    def map_at(self, threshold: float) -> float:
        index = [round(t, 2) for t in self.iou_thresholds].index(round(threshold, 2))
        return self.map_per_threshold[index]

    def metrics(self) -> Dict[str, float]:
        """{"AP50", "AP75", "AP"}: AP is the mean over all thresholds (detectron2's 'AP')."""
        out = {"AP50": self.map_at(0.5)}
        if 0.75 in [round(t, 2) for t in self.iou_thresholds]:
            out["AP75"] = self.map_at(0.75)
        out["AP"] = float(np.mean(self.map_per_threshold))
        return out

    def per_class(self) -> Dict[str, Dict[str, Optional[float]]]:
        table: Dict[str, Dict[str, Optional[float]]] = {}
        thresholds = [round(t, 2) for t in self.iou_thresholds]
        for c, name in enumerate(self.class_names):
            column = self.ap[:, c]
            if np.isnan(column).all():
                table[name] = {"AP50": None, "AP75": None, "AP": None, "num_gt": 0}
                continue
            entry: Dict[str, Optional[float]] = {"AP50": float(column[thresholds.index(0.5)])}
            if 0.75 in thresholds:
                entry["AP75"] = float(column[thresholds.index(0.75)])
            entry["AP"] = float(column.mean())
            entry["num_gt"] = int(self.num_positives[c])
            table[name] = entry
        return table


def evaluate_voc_detection(ground_truth: Sequence[dict], detections: Sequence[dict], class_names: Sequence[str],
                           iou_thresholds: Sequence[float] = IOU_THRESHOLDS,
                           pixel_offset: float = 0.0, inclusive: bool = False) -> VOCDetectionResult:
    """VOC07 11-point AP of `detections` against `ground_truth`, one entry per test image each.

    ground_truth[i]: {"boxes": [n,4], "labels": [n] in 0..C-1, "difficult": [n] bool}
    detections[i]:   {"boxes": [m,4], "scores": [m], "labels": [m] in 0..C-1}
    """
    if len(ground_truth) != len(detections):
        raise ValueError(f"{len(ground_truth)} ground-truth images but {len(detections)} detection entries")
    num_classes = len(class_names)
    ap = np.full((len(iou_thresholds), num_classes), np.nan)
    num_positives = np.zeros(num_classes, dtype=np.int64)
    for c in range(num_classes):
        gt_boxes: Dict[int, np.ndarray] = {}
        gt_difficult: Dict[int, np.ndarray] = {}
        for image, gt in enumerate(ground_truth):
            keep = np.asarray(gt["labels"]) == c
            if keep.any():
                gt_boxes[image] = np.asarray(gt["boxes"], dtype=np.float64).reshape(-1, 4)[keep]
                gt_difficult[image] = np.asarray(gt["difficult"], dtype=bool)[keep]
                num_positives[c] += int((~gt_difficult[image]).sum())
        images, scores, boxes = [], [], []
        for image, det in enumerate(detections):
            keep = np.asarray(det["labels"]) == c
            if keep.any():
                images.append(np.full(int(keep.sum()), image))
                scores.append(np.asarray(det["scores"], dtype=np.float64)[keep])
                boxes.append(np.asarray(det["boxes"], dtype=np.float64).reshape(-1, 4)[keep])
        det_images = np.concatenate(images) if images else np.zeros(0, dtype=np.int64)
        det_scores = np.concatenate(scores) if scores else np.zeros(0)
        det_boxes = np.concatenate(boxes) if boxes else np.zeros((0, 4))
        for t, threshold in enumerate(iou_thresholds):
            tp, fp = match_class(gt_boxes, gt_difficult, det_images, det_scores, det_boxes, threshold, pixel_offset,
                                    inclusive)
            ap[t, c] = 100.0 * class_ap(tp, fp, int(num_positives[c]))
    has_gt = num_positives > 0
    maps = [float(ap[t, has_gt].mean()) if has_gt.any() else 0.0 for t in range(len(iou_thresholds))]
    return VOCDetectionResult(iou_thresholds=list(iou_thresholds), class_names=list(class_names), ap=ap,
                              num_positives=num_positives, map_per_threshold=maps)
