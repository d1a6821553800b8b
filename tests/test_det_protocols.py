"""Both detection protocols train at tiny scale on the synthetic data; loss falls; records hold every metric."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from densebench.config import make_config
from densebench.evaluate.context import RunContext
from densebench.protocols import det_coco_maskrcnn_fpn, det_voc0712_c4

pytestmark = pytest.mark.slow


def _context(checkpoint, synth_root, work_dir):
    work_dir.mkdir(parents=True, exist_ok=True)
    return RunContext(checkpoint=checkpoint, data_root=synth_root, work_dir=work_dir, cache_dir=work_dir,
                      arch="resnet18", show_progress=False)


def _loss_fell(history):
    losses = [entry["loss"] for entry in history]
    assert len(losses) >= 2 and all(np.isfinite(losses))
    assert losses[-1] < losses[0], losses


def _in_percent(value):
    return value is None or 0.0 <= value <= 100.0


def test_voc_c4_tiny_trains_evaluates_and_resumes(resnet18_checkpoint, synth_root, tmp_path):
    cfg, label = make_config(det_voc0712_c4.Config, det_voc0712_c4.NAME, "tiny")
    assert label == "tiny"
    ctx = _context(resnet18_checkpoint, synth_root, tmp_path / "voc")
    torch.manual_seed(0)
    out = det_voc0712_c4.run(ctx, cfg)

    assert set(out.metrics["bbox"]) == {"AP", "AP50", "AP75"}
    assert all(_in_percent(v) for v in out.metrics["bbox"].values())
    _loss_fell(out.extra["loss_history"])
    # periodic evaluations only before the end (the final one is the record's metrics)
    assert [e["iteration"] for e in out.extra["eval_history"]] == list(range(cfg.eval_interval, cfg.max_iter, cfg.eval_interval))
    assert set(out.extra["per_class"]) == set(det_voc0712_c4.VOC_CLASSES)
    assert len(out.extra["map_per_iou"]) == 10
    assert out.extra["checkpoint_init"]["per_stage"]["layer4"] > 0 and not out.extra["checkpoint_init"]["missing"]
    assert out.extra["convention"]["keep_difficult_in_training"] is False
    assert out.extra["schedule"]["max_iter"] == cfg.max_iter
    test_images = cfg.max_test_images or 100  # 0 = the whole tiny VOC07 test set
    assert out.data["splits"]["voc07_test"] == test_images
    saved = json.loads((ctx.work_dir / "detections.json").read_text())
    assert len(saved["images"]) == test_images
    json.dumps({"metrics": out.metrics, "extra": out.extra, "data": out.data}, allow_nan=False)

    # a finished run resumes at its last iteration and only re-evaluates: same numbers
    again = det_voc0712_c4.run(ctx, cfg)
    assert again.extra["resumed_from_iteration"] == cfg.max_iter
    assert again.metrics == out.metrics
    assert json.loads((ctx.work_dir / "detections.json").read_text()) == saved
    assert again.extra["loss_history"] == out.extra["loss_history"]


def test_voc_c4_detectron2_convention(resnet18_checkpoint, synth_root, tmp_path):
    """difficult kept in training, precise-BN before each evaluation, no weight decay on norms."""
    overrides = {"convention": "detectron2", "max_iter": 4, "lr_steps": [3], "eval_interval": 2,
                 "max_test_images": 4, "precise_bn_iters": 2}
    cfg, label = make_config(det_voc0712_c4.Config, det_voc0712_c4.NAME, "tiny", overrides)
    assert label == "custom"
    ctx = _context(resnet18_checkpoint, synth_root, tmp_path / "voc_d2")
    out = det_voc0712_c4.run(ctx, cfg)
    assert out.extra["convention"] == {"keep_difficult_in_training": True, "precise_bn_iters": 2,
                                       "weight_decay_norm": 0.0}
    assert set(out.metrics["bbox"]) == {"AP", "AP50", "AP75"}
    assert [e["iteration"] for e in out.extra["eval_history"]] == [2]


def test_training_records_follow_the_difficult_convention(synth_root):
    dropped, _ = det_voc0712_c4.training_records(synth_root, keep_difficult=False)
    kept, _ = det_voc0712_c4.training_records(synth_root, keep_difficult=True)
    assert len(dropped) == len(kept)
    assert sum(r.difficult.sum() for r in dropped) == 0
    assert sum(r.difficult.sum() for r in kept) > 0
    assert sum(len(r.labels) for r in kept) > sum(len(r.labels) for r in dropped)
    first = kept[0]
    assert first.boxes.min() >= 0 and (first.boxes[:, 2:] > first.boxes[:, :2]).all()


def test_coco_mask_rcnn_fpn_tiny_trains_and_evaluates(resnet18_checkpoint, synth_root, tmp_path):
    cfg, _ = make_config(det_coco_maskrcnn_fpn.Config, det_coco_maskrcnn_fpn.NAME, "tiny")
    ctx = _context(resnet18_checkpoint, synth_root, tmp_path / "coco")
    torch.manual_seed(0)
    out = det_coco_maskrcnn_fpn.run(ctx, cfg)
    for iou_type in ("bbox", "segm"):
        assert set(out.metrics[iou_type]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
        assert all(_in_percent(v) for v in out.metrics[iou_type].values())
        assert out.extra["per_class"][iou_type]
    _loss_fell(out.extra["loss_history"])
    assert {"loss_mask", "loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"} <= \
        set(out.extra["loss_history"][0])
    assert [e["iteration"] for e in out.extra["eval_history"]] == list(range(cfg.eval_interval, cfg.max_iter, cfg.eval_interval))
    assert out.extra["checkpoint_init"]["per_stage"]["layer4"] > 0 and not out.extra["checkpoint_init"]["missing"]
    saved = json.loads((ctx.work_dir / "detections.json").read_text())
    assert len(saved["images"]) == (cfg.max_val_images or 32)  # 0 = the whole tiny val2017
    json.dumps({"metrics": out.metrics, "extra": out.extra, "data": out.data}, allow_nan=False)
