"""COCO box and mask AP with pycocotools, on a cleaned copy of the ground truth.

PROTOCOLS.md 7.1 ("Metrics"): pycocotools COCOeval for `bbox` and `segm`, AP over IoU
0.50:0.05:0.95 (101-point interpolation, 100 detections), AP50, AP75, APs/m/l.

pycocotools needs a few things from the ground truth that real files do not always give
(DESIGN.md "What users of the peer projects trip over"); `prepare_ground_truth` fixes them on
a deep copy, never on the caller's data, and says what it changed:
- annotation ids are renumbered 1..N: COCOeval stores the matched ground-truth id per
  detection and treats id 0 as "unmatched", so a detection matched to annotation 0 would
  count as a false positive (duplicated ids would break the index too);
- a missing `iscrowd` becomes 0, a missing `area` the box area;
- a missing or empty `segmentation` (annToMask crashes on an empty polygon list) and
  polygons with fewer than 3 points become the rectangle of the annotation's box;
- objects that no detection can ever match because their region has zero area (a box with
  zero width, or a mask with no pixel) become ignore regions (`iscrowd` 1) of that IoU type
  instead of guaranteed misses, as training ignores them too;
- annotations whose category is not in `categories` are dropped (COCOeval never looks at them).
"""
from __future__ import annotations

import contextlib
import copy
import io
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

IOU_TYPES = ("bbox", "segm")
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _rectangle_polygon(bbox: Sequence[float]) -> List[List[float]]:
    x, y, w, h = (float(v) for v in bbox)
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def _usable_segmentation(segmentation: Any) -> bool:
    if isinstance(segmentation, dict):
        return "counts" in segmentation and "size" in segmentation
    if isinstance(segmentation, list):
        return any(isinstance(p, list) and len(p) >= 6 for p in segmentation)
    return False


def _clean_segmentation(segmentation: Any, bbox: Sequence[float]) -> Any:
    if not _usable_segmentation(segmentation):
        return _rectangle_polygon(bbox)
    if isinstance(segmentation, list):
        return [p for p in segmentation if isinstance(p, list) and len(p) >= 6]
    return segmentation


def prepare_ground_truth(dataset: Dict[str, Any], iou_type: str = "bbox") -> Dict[str, Any]:
    """A cleaned deep copy of a COCO instances dict for COCOeval (see module docstring).

    The copy carries `densebench_notes`: counts of what was changed, for the record.
    """
    if iou_type not in IOU_TYPES:
        raise ValueError(f"iou_type must be one of {IOU_TYPES}, got {iou_type!r}")
    data = copy.deepcopy(dataset)
    known_categories = {c["id"] for c in data.get("categories", [])}
    image_sizes = {img["id"]: (int(img["height"]), int(img["width"])) for img in data.get("images", [])}
    notes = {"unknown_category_dropped": 0, "segmentation_from_box": 0, "zero_area_ignored": 0,
             "renumbered_ids": True}
    annotations = []
    for ann in data.get("annotations", []):
        if ann.get("category_id") not in known_categories:
            notes["unknown_category_dropped"] += 1
            continue
        bbox = [float(v) for v in ann["bbox"]]
        ann["bbox"] = bbox
        ann["iscrowd"] = int(ann.get("iscrowd", 0) or 0)
        if "area" not in ann:
            ann["area"] = bbox[2] * bbox[3]
        if not _usable_segmentation(ann.get("segmentation")):
            notes["segmentation_from_box"] += 1
        ann["segmentation"] = _clean_segmentation(ann.get("segmentation"), bbox)
        if iou_type == "bbox":
            empty = bbox[2] <= 0 or bbox[3] <= 0
        else:
            height, width = image_sizes[ann["image_id"]]
            rle = _to_rle(ann["segmentation"], height, width)
            empty = float(mask_utils.area(rle)) <= 0
        if empty and not ann["iscrowd"]:
            ann["iscrowd"] = 1
            notes["zero_area_ignored"] += 1
        annotations.append(ann)
    for new_id, ann in enumerate(annotations, start=1):
        ann["id"] = new_id
    data["annotations"] = annotations
    data["densebench_notes"] = notes
    return data


def _to_rle(segmentation: Any, height: int, width: int) -> dict:
    """Polygon list, uncompressed RLE or compressed RLE -> compressed RLE (pycocotools' annToRLE)."""
    if isinstance(segmentation, list):
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation["counts"], list):
        return mask_utils.frPyObjects(segmentation, height, width)
    return segmentation


def coco_from_dict(dataset: Dict[str, Any]) -> COCO:
    """A pycocotools COCO index over an in-memory dict, without the index's prints."""
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def encode_mask(mask: np.ndarray) -> Dict[str, Any]:
    """Binary HxW mask -> compressed RLE with a str `counts` (JSON-ready)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def results_for_image(image_id: int, boxes_xyxy: np.ndarray, scores: np.ndarray, category_ids: Sequence[int],
                      masks: Optional[np.ndarray] = None) -> List[Dict[str, Any]]:
    """COCO result entries of one image; boxes in absolute xyxy, masks binary [n, H, W]."""
    out = []
    for i in range(len(scores)):
        x0, y0, x1, y1 = (float(v) for v in boxes_xyxy[i])
        entry = {"image_id": int(image_id), "category_id": int(category_ids[i]),
                 "bbox": [x0, y0, x1 - x0, y1 - y0], "score": float(scores[i])}
        if masks is not None:
            entry["segmentation"] = encode_mask(masks[i])
        out.append(entry)
    return out


def _per_class_ap(evaluator: COCOeval, gt: COCO) -> Dict[str, Optional[float]]:
    """AP (percent) per category from COCOeval's precision array [T, R, K, A, M] (area all, 100 dets)."""
    precision = evaluator.eval["precision"]
    table: Dict[str, Optional[float]] = {}
    for k, cat_id in enumerate(evaluator.params.catIds):
        values = precision[:, :, k, 0, -1]
        values = values[values > -1]
        table[gt.cats[cat_id]["name"]] = float(values.mean() * 100.0) if values.size else None
    return table


def evaluate_coco(ground_truth: Dict[str, Any], results: List[Dict[str, Any]],
                  iou_types: Sequence[str] = IOU_TYPES,
                  image_ids: Optional[Sequence[int]] = None) -> Dict[str, Dict[str, Any]]:
    """pycocotools AP of `results` (COCO result format) against a COCO instances dict.

    Returns {iou_type: {"metrics": {AP, AP50, AP75, APs, APm, APl}, "per_class": {...},
    "summary": text, "notes": {...}}}; numbers in percent, None where pycocotools reports -1
    (no ground truth in that area range). `image_ids` restricts the evaluation to those images.
    """
    out: Dict[str, Dict[str, Any]] = {}
    for iou_type in iou_types:
        gt_data = prepare_ground_truth(ground_truth, iou_type)
        notes = gt_data.pop("densebench_notes")
        gt = coco_from_dict(gt_data)
        entries = [r for r in results if iou_type != "segm" or "segmentation" in r]
        if iou_type == "bbox":
            entries = [{k: v for k, v in r.items() if k != "segmentation"} for r in entries]
        if not entries:
            out[iou_type] = {"metrics": {name: 0.0 for name in STAT_NAMES}, "per_class": {},
                             "summary": "no detections", "notes": notes}
            continue
        text = io.StringIO()
        with contextlib.redirect_stdout(text):
            dt = gt.loadRes(copy.deepcopy(entries))
            evaluator = COCOeval(gt, dt, iou_type)
            if image_ids is not None:
                evaluator.params.imgIds = sorted(int(i) for i in image_ids)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        stats = evaluator.stats[: len(STAT_NAMES)]
        metrics = {name: (float(value) * 100.0 if value > -1 else None) for name, value in zip(STAT_NAMES, stats)}
        out[iou_type] = {"metrics": metrics, "per_class": _per_class_ap(evaluator, gt),
                         "summary": text.getvalue(), "notes": notes}
    return out
