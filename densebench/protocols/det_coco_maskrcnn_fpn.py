"""Mask R-CNN R50-FPN, 1x schedule, multi-scale training, on COCO2017 (PROTOCOLS.md section 7.1).

The MMSelfSup mmdet protocol: SyncBN in the backbone, FPN, 4conv1fc box head and mask head;
train2017 (images without any annotation or under 32 px filtered as mmdet does, crowd boxes
ignored), evaluated on val2017 with
pycocotools (box and mask AP, AP50, AP75, APs/m/l; per class in `extra`). The number of
classes comes from the annotation file (80 for COCO). The 12 epochs are turned into
iterations from the number of training images and the total batch; steps at epochs 8 and 11.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

import numpy as np

from densebench import distributed as dist_utils
from densebench.config import AllowedBorder, Fraction, Milestones, NonNegativeInt, PositiveFloat, PositiveInt
from densebench.data.coco import category_ids, read_coco_instances, segmentation_to_mask
from densebench.data.layout import coco_root
from densebench.errors import InputError
from densebench.evaluate.context import ProtocolOutput, RunContext
from densebench.io import write_json_atomic
from densebench.protocols import detection
from densebench.protocols.coco_eval import evaluate_coco, results_for_image

NAME = "det_coco_maskrcnn_fpn"


@dataclass
class Config:
    # input (7.1 "Train aug", "Test input")
    train_min_sizes: Tuple[PositiveInt, ...] = tuple(range(640, 801, 32))
    train_max_size: PositiveInt = 1333
    test_min_size: PositiveInt = 800
    test_max_size: PositiveInt = 1333
    flip_prob: Fraction = 0.5
    # FPN P2-P6 (7.1 "Backbone/FPN")
    fpn_channels: PositiveInt = 256
    # RPN (7.1 "RPN"): anchor scale 8 x strides 4..64 = 32..512 px; pre-NMS counts are per level
    anchor_scale: PositiveFloat = 8.0
    anchor_ratios: Tuple[PositiveFloat, ...] = (0.5, 1.0, 2.0)
    rpn_fg_iou: Fraction = 0.7
    rpn_bg_iou: Fraction = 0.3
    rpn_batch_per_image: PositiveInt = 256
    rpn_positive_fraction: Fraction = 0.5
    rpn_pre_nms_train: PositiveInt = 2000
    rpn_post_nms_train: PositiveInt = 1000
    rpn_pre_nms_test: PositiveInt = 1000
    rpn_post_nms_test: PositiveInt = 1000
    rpn_nms: Fraction = 0.7
    rpn_min_pos_iou: Fraction = 0.3                 # low-quality matches need this IoU (mmdet min_pos_iou)
    rpn_allowed_border: AllowedBorder = -1          # -1: every anchor on the image's (32-padded) grid
    # heads (7.1 "Box head", "Mask head", "RCNN train")
    box_roi_size: PositiveInt = 7
    mask_roi_size: PositiveInt = 14
    head_channels: PositiveInt = 256
    box_head_convs: NonNegativeInt = 4
    box_head_fc: PositiveInt = 1024
    mask_head_convs: NonNegativeInt = 4
    roi_fg_iou: Fraction = 0.5
    roi_bg_iou: Fraction = 0.5
    roi_batch_per_image: PositiveInt = 512
    roi_positive_fraction: Fraction = 0.25
    roi_low_quality: bool = True                    # mmdet rcnn assigner match_low_quality (min_pos_iou 0.5)
    # test (7.1 "Test")
    test_score_thresh: Fraction = 0.05
    test_nms: Fraction = 0.5
    test_detections_per_img: PositiveInt = 100
    mask_threshold: Fraction = 0.5
    # solver (7.1 "Solver", "Batch")
    base_lr: float = 0.02
    momentum: Fraction = 0.9
    weight_decay: float = 1e-4
    epochs: PositiveInt = 12
    lr_step_epochs: Milestones = (8, 11)
    warmup_iters: NonNegativeInt = 1000
    warmup_factor: Fraction = 0.001
    images_per_step: PositiveInt = 16               # total batch of the reference (8 GPUs x 2, SyncBN over all)
    images_per_gpu: NonNegativeInt = 0              # 0: images_per_step / GPUs; > 0: scale lr/iters linearly
    amp: bool = True                                # GPU only
    eval_interval: NonNegativeInt = 0               # iterations; 0 = after every epoch (mmdet)
    checkpoint_interval: NonNegativeInt = 2000
    log_interval: PositiveInt = 50
    max_iter: NonNegativeInt = 0                    # > 0: override the epoch-derived length (smoke runs)
    max_val_images: NonNegativeInt = 0              # 0 = all of val2017 (smoke runs only)


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------

def to_record(image) -> detection.DetectionRecord:
    """Training targets without crowd boxes (PROTOCOLS.md 7.1 "Crowd boxes ignored")."""
    keep = ~image.iscrowd
    return detection.DetectionRecord(
        image_id=image.image_id, path=image.path, width=image.width, height=image.height,
        boxes=image.boxes[keep], labels=image.labels[keep],
        segmentations=[seg for seg, k in zip(image.segmentations, keep) if k])


def kept_for_training(coco, image) -> bool:
    """mmdet CocoDataset._filter_imgs (filter_empty_gt, min_size 32): an image is trained on when it
    has any annotation at all -- one with only crowd (or too small) boxes is kept and contributes
    negatives -- and both sides are at least 32 pixels."""
    return bool(coco.imgToAnns.get(image.image_id)) and min(image.width, image.height) >= 32


def load_split(data_root, split: str):
    root = coco_root(data_root)
    return read_coco_instances(root / "annotations" / f"instances_{split}2017.json", root / f"{split}2017")


def iterations_per_epoch(group_ids: List[int], images_per_step: int) -> int:
    """mmdet's epoch length with its aspect-ratio group sampler: each group is padded to whole batches."""
    return sum(math.ceil(group_ids.count(group) / images_per_step) for group in set(group_ids))


def train_schedule(cfg: Config, group_ids: List[int], total_batch: int) -> detection.Schedule:
    """Epochs -> iterations at the reference batch, then the linear scaling rule for the real batch."""
    iters_per_epoch = iterations_per_epoch(group_ids, cfg.images_per_step)
    max_iter = cfg.max_iter if cfg.max_iter > 0 else cfg.epochs * iters_per_epoch
    steps = [e * iters_per_epoch for e in cfg.lr_step_epochs if e * iters_per_epoch < max_iter]
    return detection.scaled_schedule(cfg.base_lr, max_iter, steps, cfg.warmup_iters, cfg.warmup_factor,
                                     cfg.images_per_step, total_batch)


# ---------------------------------------------------------------------------------------------
# metric
# ---------------------------------------------------------------------------------------------

def coco_results_converter(records: List[detection.DetectionRecord], label_to_category: List[int],
                           mask_threshold: float):
    """Model output -> COCO result entries (bbox xywh, RLE mask at the original image size)."""
    def convert(output, index: int) -> List[Dict[str, Any]]:
        masks = (output["masks"][:, 0] >= mask_threshold).numpy().astype(np.uint8)
        categories = [label_to_category[int(label) - 1] for label in output["labels"]]
        return results_for_image(records[index].image_id, output["boxes"].numpy(), output["scores"].numpy(),
                                 categories, masks)
    return convert


# ---------------------------------------------------------------------------------------------
# run
# ---------------------------------------------------------------------------------------------

def run(ctx: RunContext, cfg: Config) -> ProtocolOutput:
    images_per_gpu = detection.images_per_gpu_for(cfg.images_per_step, cfg.images_per_gpu,
                                                  dist_utils.world_size(), NAME)
    train_coco, train_images = load_split(ctx.data_root, "train")
    val_coco, val_images = load_split(ctx.data_root, "val")
    categories = category_ids(train_coco)
    if categories != category_ids(val_coco):
        raise InputError(coco_root(ctx.data_root) / "annotations", "train and val categories differ")
    train_records = [to_record(image) for image in train_images if kept_for_training(train_coco, image)]
    if not any(len(r.labels) for r in train_records):
        raise InputError(coco_root(ctx.data_root) / "annotations" / "instances_train2017.json",
                         "no training image with a usable (non-crowd) box")
    if cfg.max_val_images > 0:
        val_images = val_images[: cfg.max_val_images]
    val_records = [to_record(image) for image in val_images]

    state_dict, info = ctx.backbone_state_dict()
    resnet = detection.resnet_from_state_dict(info.arch, state_dict)
    model = detection.build_mask_rcnn_fpn(resnet, len(categories), cfg)
    init_report = detection.checkpoint_load_report(model, state_dict, detection.FPN_CHECKPOINT_PLACES)
    if init_report["missing"]:
        raise RuntimeError(f"checkpoint tensors not placed in the detector: {init_report['missing'][:5]}")

    train_set = detection.DetectionDataset(train_records, flip_prob=cfg.flip_prob, mask_fn=segmentation_to_mask)
    val_set = detection.DetectionDataset(val_records)
    total_batch = images_per_gpu * dist_utils.world_size()
    schedule = train_schedule(cfg, train_set.group_ids(), total_batch)
    eval_interval = cfg.eval_interval or schedule.scaled_interval(
        iterations_per_epoch(train_set.group_ids(), cfg.images_per_step))
    loop = detection.LoopSettings(images_per_gpu=images_per_gpu, momentum=cfg.momentum,
                                  weight_decay=cfg.weight_decay, weight_decay_norm=None, amp=cfg.amp,
                                  eval_interval=eval_interval, checkpoint_interval=cfg.checkpoint_interval,
                                  log_interval=cfg.log_interval, precise_bn_iters=0)
    convert = coco_results_converter(val_records, categories, cfg.mask_threshold)
    val_ids = [r.image_id for r in val_records]

    def evaluate(model, iteration: int, final: bool):
        per_image = detection.run_inference(model, val_set, ctx.device, cfg.amp, convert,
                                            ctx.num_workers, ctx.show_progress)
        results = [entry for entries in per_image for entry in entries]
        if final and dist_utils.is_main():
            write_json_atomic(ctx.work_dir / "detections.json",
                              {"format": "COCO results (bbox xywh, RLE segmentation)",
                               "images": [{"image_id": i, "results": e} for i, e in zip(val_ids, per_image)]})
        scores = evaluate_coco(val_coco.dataset, results, image_ids=val_ids)
        metrics = {iou_type: scores[iou_type]["metrics"] for iou_type in scores}
        extra = {"per_class": {iou_type: scores[iou_type]["per_class"] for iou_type in scores},
                 "ground_truth_notes": {iou_type: scores[iou_type]["notes"] for iou_type in scores},
                 "summary": {iou_type: scores[iou_type]["summary"] for iou_type in scores}}
        return metrics, extra

    trained = detection.train_detector(model, train_set, schedule, loop, evaluate, ctx.work_dir, ctx.device,
                                       ctx.seed, ctx.num_workers, ctx.show_progress)
    extra = {
        **trained.final_extra,
        "num_classes": len(categories),
        "schedule": {**schedule.record(), "eval_interval_iters": eval_interval},
        "checkpoint_init": init_report,
        "sync_bn": trained.sync_bn,
        "loss_history": trained.loss_history,
        "eval_history": trained.eval_history,
        "resumed_from_iteration": trained.resumed_from,
        "train_wall_s": trained.wall_train_s,
        "detections_file": str(ctx.work_dir / "detections.json"),
    }
    data = {"root": str(ctx.data_root),
            "splits": {"coco_train2017": len(train_records), "coco_val2017": len(val_records)}}
    return ProtocolOutput(metrics=trained.final_metrics, data=data, extra=extra)
