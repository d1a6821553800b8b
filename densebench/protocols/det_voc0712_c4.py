"""Faster R-CNN R50-C4 on VOC07+12, tested on VOC2007 test (PROTOCOLS.md section 6).

Default: the MMSelfSup mmdet protocol that produced the README AP50 82.14 (6.1): difficult
boxes dropped in training, weight decay on every parameter, no precise-BN.
`convention: detectron2` switches to the original DenseCL/MoCo detectron2 protocol (6.2, 12.9):
difficult boxes kept in training, precise-BN (200 iterations) before each evaluation, no weight
decay on normalisation layers. Both report the same metrics (11-point VOC07 AP50, and the
detectron2-style AP over IoU 0.50:0.95 and AP75), per class in `extra`.

Boxes: the XML's 1-based inclusive coordinates are converted once to continuous 0-based
coordinates (xmin - 1, ymin - 1, xmax, ymax), see voc_det_eval.py; saved detections use them too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Literal, Tuple

import numpy as np

from densebench import distributed as dist_utils
from densebench.config import AllowedBorder, Fraction, Milestones, NonNegativeInt, PositiveFloat, PositiveInt
from densebench.data.layout import voc07_root, voc12_root
from densebench.data.voc import VOC_CLASSES, read_voc_det
from densebench.errors import InputError
from densebench.evaluate.context import ProtocolOutput, RunContext
from densebench.io import write_json_atomic
from densebench.protocols import detection
from densebench.protocols.voc_det_eval import IOU_THRESHOLDS, evaluate_voc_detection, voc_box_to_continuous

NAME = "det_voc0712_c4"
CONVENTIONS = ("mmdet", "detectron2")


@dataclass
class Config:
    # data and convention (6.1 "Train data", 6.2 "Data", 12.9)
    convention: Literal[CONVENTIONS] = "mmdet"      # "mmdet" (82.14) | "detectron2"
    # input (6.1 "Train aug" / "Test")
    train_min_sizes: Tuple[PositiveInt, ...] = tuple(range(480, 801, 32))
    train_max_size: PositiveInt = 1333
    test_min_size: PositiveInt = 800
    test_max_size: PositiveInt = 1333
    flip_prob: Fraction = 0.5
    # RPN on res4, stride 16 (6.1 "RPN")
    anchor_scales: Tuple[PositiveFloat, ...] = (2.0, 4.0, 8.0, 16.0, 32.0)  # x stride 16 = 32..512 px
    anchor_ratios: Tuple[PositiveFloat, ...] = (0.5, 1.0, 2.0)
    rpn_fg_iou: Fraction = 0.7
    rpn_bg_iou: Fraction = 0.3
    rpn_batch_per_image: PositiveInt = 256
    rpn_positive_fraction: Fraction = 0.5
    rpn_pre_nms_train: PositiveInt = 12000
    rpn_post_nms_train: PositiveInt = 2000
    rpn_pre_nms_test: PositiveInt = 6000
    rpn_post_nms_test: PositiveInt = 1000
    rpn_nms: Fraction = 0.7
    rpn_min_pos_iou: Fraction = 0.3                 # low-quality matches need this IoU (mmdet min_pos_iou)
    rpn_allowed_border: AllowedBorder = 0           # only anchors inside the image are assigned
    # RoI head: RoIAlign 14 -> res5 -> extra BN -> avg-pool -> cls / class-specific box (6.1 "RoI head")
    roi_output_size: PositiveInt = 14
    roi_fg_iou: Fraction = 0.5
    roi_bg_iou: Fraction = 0.5
    roi_batch_per_image: PositiveInt = 512
    roi_positive_fraction: Fraction = 0.25
    roi_low_quality: bool = False                   # mmdet rcnn assigner match_low_quality (min_pos_iou 0.5)
    # test post-processing (6.1 "Test post-proc")
    test_score_thresh: Fraction = 0.05
    test_nms: Fraction = 0.5
    test_detections_per_img: PositiveInt = 100
    # solver (6.1 "Solver", "Batch"); schedule scaled linearly when the total batch differs
    base_lr: float = 0.02
    momentum: Fraction = 0.9
    weight_decay: float = 1e-4
    max_iter: PositiveInt = 24000
    lr_steps: Milestones = (18000, 22000)
    warmup_iters: NonNegativeInt = 100
    warmup_factor: Fraction = 0.001
    images_per_step: PositiveInt = 16               # total batch of the reference (8 GPUs x 2, SyncBN over all)
    images_per_gpu: NonNegativeInt = 0              # 0: images_per_step / GPUs; > 0: scale lr/iters linearly
    amp: bool = True                                # GPU only
    eval_interval: NonNegativeInt = 2000            # 6.1 "Eval"
    checkpoint_interval: NonNegativeInt = 2000
    log_interval: PositiveInt = 20
    precise_bn_iters: NonNegativeInt = 200          # used by the detectron2 convention only
    max_test_images: NonNegativeInt = 0             # 0 = the whole test set (smoke runs only)


def convention_settings(cfg: Config) -> Dict[str, Any]:
    """What the data convention changes (PROTOCOLS.md 12.9)."""
    if cfg.convention not in CONVENTIONS:
        raise InputError(None, f"{NAME}: convention must be one of {CONVENTIONS}, got {cfg.convention!r}")
    if cfg.convention == "mmdet":
        return {"keep_difficult_in_training": False, "precise_bn_iters": 0, "weight_decay_norm": None}
    return {"keep_difficult_in_training": True, "precise_bn_iters": cfg.precise_bn_iters, "weight_decay_norm": 0.0}


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------

def to_record(annotation, keep_difficult: bool) -> detection.DetectionRecord:
    keep = np.ones(len(annotation.labels), dtype=bool) if keep_difficult else ~annotation.difficult
    return detection.DetectionRecord(
        image_id=annotation.image_id, path=annotation.path, width=annotation.width, height=annotation.height,
        boxes=voc_box_to_continuous(annotation.boxes[keep]), labels=annotation.labels[keep],
        difficult=annotation.difficult[keep])


def training_records(data_root, keep_difficult: bool) -> Tuple[List[detection.DetectionRecord], Dict[str, int]]:
    """VOC2007 trainval + VOC2012 trainval; images without any object are filtered (mmdet filter_empty_gt)."""
    records, sizes = [], {}
    for name, root in (("voc07_trainval", voc07_root(data_root)), ("voc12_trainval", voc12_root(data_root))):
        annotations = read_voc_det(root, "trainval")
        with_objects = [a for a in annotations if len(a.labels) > 0]
        sizes[name] = len(with_objects)
        records += [to_record(a, keep_difficult) for a in with_objects]
    return records, sizes


def test_records(data_root, max_images: int) -> List[detection.DetectionRecord]:
    annotations = read_voc_det(voc07_root(data_root), "test")
    if max_images > 0:
        annotations = annotations[:max_images]
    return [to_record(a, keep_difficult=True) for a in annotations]


# ---------------------------------------------------------------------------------------------
# metric
# ---------------------------------------------------------------------------------------------

def detections_of(output, index: int) -> Dict[str, Any]:
    """Model output (labels 1..20) -> numpy detections with labels 0..19, original image coordinates."""
    return {"boxes": output["boxes"].numpy().astype(np.float64), "scores": output["scores"].numpy(),
            "labels": output["labels"].numpy() - 1}


def voc_metrics(records: List[detection.DetectionRecord], detections: List[Dict[str, Any]], convention: str):
    """mmdet's eval_map counts IoU == threshold as a match, the devkit/detectron2 only IoU above it."""
    ground_truth = [{"boxes": r.boxes, "labels": r.labels, "difficult": r.difficult} for r in records]
    return evaluate_voc_detection(ground_truth, detections, VOC_CLASSES, IOU_THRESHOLDS,
                                  inclusive=convention == "mmdet")


def save_detections(path, records, detections) -> None:
    """Per-image detections for re-scoring (continuous 0-based xyxy; XML convention = x0+1, y0+1, x1, y1)."""
    payload = {"coordinates": "continuous 0-based xyxy (VOC XML: xmin = x0 + 1, ymin = y0 + 1)",
               "classes": list(VOC_CLASSES),
               "images": [{"image_id": r.image_id, "boxes": d["boxes"].round(2).tolist(),
                           "scores": d["scores"].round(5).tolist(), "labels": d["labels"].tolist()}
                          for r, d in zip(records, detections)]}
    write_json_atomic(path, payload)


# ---------------------------------------------------------------------------------------------
# run
# ---------------------------------------------------------------------------------------------

def run(ctx: RunContext, cfg: Config) -> ProtocolOutput:
    settings = convention_settings(cfg)
    images_per_gpu = detection.images_per_gpu_for(cfg.images_per_step, cfg.images_per_gpu,
                                                  dist_utils.world_size(), NAME)
    state_dict, info = ctx.backbone_state_dict()
    resnet = detection.resnet_from_state_dict(info.arch, state_dict)
    model = detection.build_faster_rcnn_c4(resnet, len(VOC_CLASSES), cfg)
    init_report = detection.checkpoint_load_report(model, state_dict, detection.C4_CHECKPOINT_PLACES)
    if init_report["missing"]:
        raise RuntimeError(f"checkpoint tensors not placed in the detector: {init_report['missing'][:5]}")

    train_records, train_sizes = training_records(ctx.data_root, settings["keep_difficult_in_training"])
    if not train_records:
        raise InputError(voc07_root(ctx.data_root), "no training image with objects in VOC07+12 trainval")
    tests = test_records(ctx.data_root, cfg.max_test_images)
    train_set = detection.DetectionDataset(train_records, flip_prob=cfg.flip_prob)
    test_set = detection.DetectionDataset(tests)

    total_batch = images_per_gpu * dist_utils.world_size()
    schedule = detection.scaled_schedule(cfg.base_lr, cfg.max_iter, cfg.lr_steps, cfg.warmup_iters,
                                         cfg.warmup_factor, cfg.images_per_step, total_batch)
    loop = detection.LoopSettings(images_per_gpu=images_per_gpu, momentum=cfg.momentum,
                                  weight_decay=cfg.weight_decay, weight_decay_norm=settings["weight_decay_norm"],
                                  amp=cfg.amp, eval_interval=schedule.scaled_interval(cfg.eval_interval),
                                  checkpoint_interval=schedule.scaled_interval(cfg.checkpoint_interval),
                                  log_interval=cfg.log_interval,
                                  precise_bn_iters=settings["precise_bn_iters"])

    def evaluate(model, iteration: int, final: bool):
        detections = detection.run_inference(model, test_set, ctx.device, cfg.amp, detections_of,
                                             ctx.num_workers, ctx.show_progress)
        result = voc_metrics(tests, detections, cfg.convention)
        if final and dist_utils.is_main():
            save_detections(ctx.work_dir / "detections.json", tests, detections)
        return {"bbox": result.metrics()}, {"per_class": result.per_class(),
                                             "map_per_iou": dict(zip([f"{t:.2f}" for t in IOU_THRESHOLDS],
                                                                     result.map_per_threshold))}

    trained = detection.train_detector(model, train_set, schedule, loop, evaluate, ctx.work_dir, ctx.device,
                                       ctx.seed, ctx.num_workers, ctx.show_progress)
    extra = {
        **trained.final_extra,
        "convention": settings,
        "schedule": {**schedule.record(), "eval_interval_iters": loop.eval_interval,
                     "checkpoint_interval_iters": loop.checkpoint_interval},
        "checkpoint_init": init_report,
        "sync_bn": trained.sync_bn,
        "loss_history": trained.loss_history,
        "eval_history": trained.eval_history,
        "resumed_from_iteration": trained.resumed_from,
        "train_wall_s": trained.wall_train_s,
        "detections_file": str(ctx.work_dir / "detections.json"),
        "metric": "VOC07 11-point AP, difficult ignored; AP = mean over IoU 0.50:0.05:0.95 (detectron2)",
    }
    data = {"root": str(ctx.data_root),
            "splits": {**train_sizes, "train_images": len(train_records), "voc07_test": len(tests)}}
    return ProtocolOutput(metrics=trained.final_metrics, data=data, extra=extra)
