"""COCO box/mask AP through densebench.protocols.coco_eval on real annotation files."""
from __future__ import annotations

import contextlib
import copy
import io
import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from densebench.protocols.coco_eval import encode_mask, evaluate_coco, prepare_ground_truth, results_for_image


def _load(realdata, relative):
    return json.loads((realdata / relative).read_text())


CVNETS = "cvnets_coco_val2017_subset/annotations/instances_val2017.json"
MMDET_SAMPLE = "mmdet_tests_data/coco_sample.json"
MMDET_WRONG = "mmdet_tests_data/coco_wrong_format_sample.json"


def _rectangle_mask(bbox, height, width):
    x, y, w, h = bbox
    rle = mask_utils.frPyObjects([[x, y, x + w, y, x + w, y + h, x, y + h]], height, width)
    return mask_utils.decode(mask_utils.merge(rle))


def exact_detections(dataset):
    """Every evaluable ground-truth object as a score-1 detection, box and mask (computed here, not by coco_eval)."""
    images = {img["id"]: img for img in dataset["images"]}
    categories = {c["id"] for c in dataset["categories"]}
    out = []
    for ann in dataset["annotations"]:
        if ann.get("iscrowd", 0) or ann["category_id"] not in categories:
            continue
        x, y, w, h = ann["bbox"]
        if w <= 0 or h <= 0:
            continue
        height, width = images[ann["image_id"]]["height"], images[ann["image_id"]]["width"]
        seg = ann.get("segmentation")
        if isinstance(seg, list) and any(len(p) >= 6 for p in seg):
            mask = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(seg, height, width)))
        else:
            mask = _rectangle_mask(ann["bbox"], height, width)
        entry = results_for_image(ann["image_id"], np.array([[x, y, x + w, y + h]]), np.array([1.0]),
                                  [ann["category_id"]], mask[None] if mask.sum() > 0 else None)[0]
        out.append(entry)
    return out


def _raw_pycocotools(dataset, results, iou_type):
    """pycocotools used directly, without densebench's ground-truth preparation."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = copy.deepcopy(dataset)
        gt.createIndex()
        dt = gt.loadRes(copy.deepcopy(results))
        evaluator = COCOeval(gt, dt, iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats


def test_exact_ground_truth_scores_100_on_real_val2017_excerpt(realdata):
    dataset = _load(realdata, CVNETS)
    scores = evaluate_coco(dataset, exact_detections(dataset))
    for iou_type in ("bbox", "segm"):
        metrics = scores[iou_type]["metrics"]
        assert metrics["AP"] == pytest.approx(100.0)
        assert metrics["AP50"] == pytest.approx(100.0)
        assert metrics["AP75"] == pytest.approx(100.0)
        assert set(metrics) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
        assert metrics["APl"] is None                        # no large object in the excerpt
    assert scores["bbox"]["per_class"]["bottle"] == pytest.approx(100.0)
    assert scores["bbox"]["per_class"]["person"] is None     # category without ground truth


def test_annotation_ids_starting_at_zero(realdata):
    dataset = _load(realdata, CVNETS)
    for new_id, ann in enumerate(dataset["annotations"]):
        ann["id"] = new_id                                   # 0 and 1
    detections = exact_detections(dataset)
    # plain pycocotools loses the match to annotation 0 ...
    assert _raw_pycocotools(dataset, detections, "bbox")[0] < 0.99
    # ... densebench renumbers a copy and gets every object
    scores = evaluate_coco(dataset, detections)
    assert scores["bbox"]["metrics"]["AP"] == pytest.approx(100.0)
    assert scores["segm"]["metrics"]["AP"] == pytest.approx(100.0)
    assert [a["id"] for a in dataset["annotations"]] == [0, 1]   # caller's data untouched


@pytest.mark.parametrize("relative", [MMDET_SAMPLE, MMDET_WRONG])
def test_odd_annotations_of_mmdet_samples(realdata, relative):
    """Crowd without segmentation, zero-width box, unknown category, no iscrowd, duplicated ids."""
    dataset = _load(realdata, relative)
    scores = evaluate_coco(dataset, exact_detections(dataset))
    assert scores["bbox"]["metrics"]["AP"] == pytest.approx(100.0)
    assert scores["segm"]["metrics"]["AP"] == pytest.approx(100.0)
    prepared = prepare_ground_truth(dataset, "bbox")
    assert [a["id"] for a in prepared["annotations"]] == list(range(1, len(prepared["annotations"]) + 1))
    if relative == MMDET_SAMPLE:
        notes = prepared["densebench_notes"]
        assert notes["unknown_category_dropped"] == 1       # category 3
        assert notes["zero_area_ignored"] == 1              # bbox [0, 0, 0, 10]


def test_missing_object_and_false_positive_lower_the_score(realdata):
    dataset = _load(realdata, MMDET_SAMPLE)
    detections = exact_detections(dataset)
    scores = evaluate_coco(dataset, detections[1:])
    assert scores["bbox"]["metrics"]["AP"] < 100.0
    fp = dict(detections[0], bbox=[500.0, 500.0, 50.0, 50.0], score=2.0)
    fp.pop("segmentation", None)
    assert evaluate_coco(dataset, detections + [fp], iou_types=("bbox",))["bbox"]["metrics"]["AP"] < 100.0


def test_equals_plain_pycocotools_on_a_clean_file(realdata):
    """Where no repair is needed (ids >= 1, full fields), the numbers are pycocotools' own."""
    dataset = _load(realdata, CVNETS)
    rng = np.random.default_rng(0)
    results = []
    for ann in dataset["annotations"]:
        img = next(i for i in dataset["images"] if i["id"] == ann["image_id"])
        for _ in range(6):
            x, y, w, h = (np.asarray(ann["bbox"]) + rng.normal(0, 3, 4)).tolist()
            w, h = max(w, 1.0), max(h, 1.0)
            mask = np.zeros((img["height"], img["width"]), dtype=np.uint8)
            mask[int(max(y, 0)):int(y + h), int(max(x, 0)):int(x + w)] = 1
            cat = ann["category_id"] if rng.random() < 0.7 else 1
            results += results_for_image(img["id"], np.array([[x, y, x + w, y + h]]), rng.random(1), [cat], mask[None])
    ours = evaluate_coco(dataset, results)
    for index, iou_type in enumerate(("bbox", "segm")):
        raw = _raw_pycocotools(dataset, results, iou_type)
        assert ours[iou_type]["metrics"]["AP"] == pytest.approx(raw[0] * 100)
        assert ours[iou_type]["metrics"]["AP50"] == pytest.approx(raw[1] * 100)
        assert ours[iou_type]["metrics"]["AP75"] == pytest.approx(raw[2] * 100)
        assert 0 < ours[iou_type]["metrics"]["AP50"] <= 100


def test_no_detections_gives_zero():
    dataset = {"images": [{"id": 1, "height": 10, "width": 10}], "categories": [{"id": 1, "name": "a"}],
               "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5], "area": 25,
                                "iscrowd": 0, "segmentation": [[1, 1, 6, 1, 6, 6, 1, 6]]}]}
    scores = evaluate_coco(dataset, [])
    assert scores["bbox"]["metrics"]["AP"] == 0.0


def test_encode_mask_round_trip():
    mask = np.zeros((7, 9), dtype=np.uint8)
    mask[2:5, 3:8] = 1
    rle = encode_mask(mask)
    assert isinstance(rle["counts"], str)
    np.testing.assert_array_equal(mask_utils.decode(rle), mask)
