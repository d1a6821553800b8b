"""Shared pieces of the two detection-transfer protocols (PROTOCOLS.md sections 6 and 7).

Both detectors are assembled from torchvision's detection parts (GeneralizedRCNN,
RegionProposalNetwork, RPNHead, RoIHeads, BackboneWithFPN, FastRCNNConvFCHead,
MaskRCNNHeads/Predictor) configured as the MMSelfSup 0.x mmdet benchmarks (PROTOCOLS.md 6.1,
7.1). Where torchvision's behaviour differs from mmdet 2.x, which produced the published numbers,
a small subclass or function here does what mmdet does: aligned RoIAlign (`AlignedRoIAlign`),
anchors at fixed strides without rounding (`ReferenceAnchorGenerator`), mmdet's MaxIoUAssigner
(`max_iou_assign`: min_pos_iou, low-quality matches to the GT they are best for), RPN valid
flags and allowed_border, L1 box losses, mask targets by aligned RoIAlign binarised at 0.5,
post-processing without torchvision's small-box filters, resize rounding and mask pasting with
grid_sample (`DetectionTransform`, `paste_masks`). Every normalisation layer is a trainable
nn.BatchNorm2d, SyncBatchNorm under torchrun on GPUs; nothing is frozen; 16 images per step at
any GPU count.

What the peer tests (tests/peer/test_peer_det_*.py, against mmdet 2.28.2 built from the
configs) pin, with the bound of each remaining difference:
- forward and inference (C4 and Mask R-CNN FPN, mapped random weights): features, RPN outputs,
  anchors, proposals, boxes, scores, labels equal to 1e-4 px / 1e-5; pasted binary masks
  identical;
- training (C4 and Mask R-CNN FPN): anchor and RoI assignment and regression targets
  identical; with injected proposals and an injected sampler every loss term to 1e-4
  (relative) and every parameter's gradient to 1e-4 of its largest entry;
- data: image size, padding, scale factor, boxes, labels, masks identical for injected scale
  and flip draws; the input tensor differs by at most one grey level (1/57.12 after
  normalisation, mean < 0.3 of that) because mmdet resizes the uint8 image with OpenCV;
- evaluation and solver: VOC07 11-point AP equal to eval_map to float32 rounding (1e-6);
  IoU exactly at the threshold counts as a match (eval_map's >=) in the mmdet convention,
  not in the detectron2 one (devkit's >); lr equal at every iteration of the 24k and 1x
  schedules; epoch length equal to mmdet's group sampler; SGD groups equal;
- not matched: random sampling and data order (injected in the tests; their effect is seed
  noise) and the VOC box frame of training. densebench trains and evaluates in the continuous
  frame (x0 - 1, y0 - 1, x1, y1 of the XML), flipped exactly; mmdet trains on XML - 1 (inclusive
  pixel indices, right/bottom edges 1 px inside ours), adds the 1 back in its legacy-coordinate
  metric, and flips as w - x, which puts its flipped targets 1 px right of the mirrored object
  (PROTOCOLS.md 6.3). Same metric on the same predictions; targets differ by <= 1 px.

The rest is the training machinery of both protocols: the data pipeline (image + flip, masks),
aspect-ratio grouped batches, the iteration loop with linear warm-up and step decay, AMP on GPU,
DDP, atomic checkpoint/resume under ctx.work_dir, periodic evaluation, precise-BN, and sharded
inference gathered on every rank.
"""
from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads, maskrcnn_inference
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.poolers import _setup_scales   # the scale/level inference MultiScaleRoIAlign uses
from tqdm import tqdm

from densebench import distributed as dist_utils
from densebench.data.image import load_image
from densebench.errors import InputError
from densebench.evaluate.backbone import IMAGENET_MEAN, IMAGENET_STD
from densebench.io import torch_save_atomic

# ---------------------------------------------------------------------------------------------
# model parts
# ---------------------------------------------------------------------------------------------

NORM_TYPES = (nn.BatchNorm2d, nn.SyncBatchNorm, nn.GroupNorm, nn.LayerNorm)


def stage_out_channels(stage: nn.Sequential) -> int:
    """Output channels of a torchvision ResNet stage (Bottleneck: conv3, BasicBlock: conv2)."""
    block = stage[-1]
    return (block.conv3 if hasattr(block, "conv3") else block.conv2).out_channels


class AlignedRoIAlign(MultiScaleRoIAlign):
    """MultiScaleRoIAlign with aligned=True (half-pixel offset, as mmcv and detectron2's ROIAlignV2).

    Level assignment is torchvision's LevelMapper (k0 4, canonical 224, levels clamped to the
    given maps), which equals mmdet's `floor(log2(sqrt(wh) / 56))` and detectron2's mapping.
    """

    def forward(self, x: Dict[str, torch.Tensor], boxes: List[torch.Tensor],
                image_shapes: List[Tuple[int, int]]) -> torch.Tensor:
        features = [x[name] for name in self.featmap_names]
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(features, image_shapes, self.canonical_scale,
                                                         self.canonical_level)
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)], dim=0)
        if len(features) == 1:
            return roi_align(features[0], rois, self.output_size, self.scales[0], self.sampling_ratio, aligned=True)
        levels = self.map_levels(boxes)
        result = features[0].new_zeros((len(rois), features[0].shape[1]) + tuple(self.output_size))
        for level, (feature, scale) in enumerate(zip(features, self.scales)):
            index = torch.where(levels == level)[0]
            pooled = roi_align(feature, rois[index], self.output_size, scale, self.sampling_ratio, aligned=True)
            result[index] = pooled.to(result.dtype)
        return result


class Float32BoxCoder(BoxCoder):
    """Box decoding in float32. torchvision decodes in the deltas' dtype, i.e. float16 under AMP,
    which holds image coordinates near 1000 only to 0.5 px; mmdet's configs run in float32."""

    def decode(self, rel_codes, boxes):
        return super().decode(rel_codes.float(), [b.float() for b in boxes])


class ReferenceAnchorGenerator(AnchorGenerator):
    """mmdet's AnchorGenerator: base anchors not rounded, each level at its fixed stride.

    torchvision rounds the base anchors to integers and derives a level's stride as
    padded size // grid size (61-63 instead of 64 for P6 when height / 32 is odd).
    `anchor_strides` holds every anchor's stride after a forward (for mmdet's valid flags).
    """

    def __init__(self, sizes, aspect_ratios, strides: Sequence[int]):
        self.strides = tuple(int(s) for s in strides)
        super().__init__(sizes, aspect_ratios)
        self.anchor_strides: Optional[torch.Tensor] = None

    def generate_anchors(self, scales, aspect_ratios, dtype=torch.float32, device=torch.device("cpu")):
        scales = torch.as_tensor(scales, dtype=dtype, device=device)
        h_ratios = torch.sqrt(torch.as_tensor(aspect_ratios, dtype=dtype, device=device))
        ws = (scales[None, :] / h_ratios[:, None]).reshape(-1)
        hs = (scales[None, :] * h_ratios[:, None]).reshape(-1)
        return torch.stack([-ws, -hs, ws, hs], dim=1) / 2

    def forward(self, image_list, feature_maps: List[torch.Tensor]) -> List[torch.Tensor]:
        grid_sizes = [feature_map.shape[-2:] for feature_map in feature_maps]
        device = feature_maps[0].device
        strides = [[torch.tensor(s, device=device), torch.tensor(s, device=device)] for s in self.strides]
        self.set_cell_anchors(torch.float32, device)                         # float32 under AMP too
        per_level = self.grid_anchors(grid_sizes, strides)
        self.anchor_strides = torch.cat([torch.full((len(a),), float(s), device=device)
                                         for a, s in zip(per_level, self.strides)])
        anchors = torch.cat(per_level)
        return [anchors for _ in image_list.image_sizes]


def max_iou_assign(iou: torch.Tensor, pos_iou: float, neg_iou: float, min_pos_iou: float,
                   low_quality: bool) -> torch.Tensor:
    """mmdet's MaxIoUAssigner on an IoU matrix [num_gt, num_boxes]: -1 ignored, 0 negative, g + 1 GT g.

    Negative below neg_iou, positive at or above pos_iou (to the box's best GT); with
    `low_quality`, each GT whose best IoU is at least min_pos_iou also takes every box that
    reaches that best IoU (later GTs win ties), even below pos_iou.
    torchvision's Matcher gives such a box to its own best GT and has no minimum IoU.
    """
    assigned = torch.full((iou.shape[1],), -1, dtype=torch.long, device=iou.device)
    if iou.shape[0] == 0:
        return assigned.zero_()
    max_iou, best_gt = iou.max(dim=0)
    assigned[(max_iou >= 0) & (max_iou < neg_iou)] = 0
    positive = max_iou >= pos_iou
    assigned[positive] = best_gt[positive] + 1
    if low_quality:
        gt_max = iou.max(dim=1, keepdim=True).values
        best_for = (iou == gt_max) & (gt_max >= min_pos_iou)                  # [num_gt, num_boxes]
        gt_number = torch.arange(1, iou.shape[0] + 1, device=iou.device)[:, None]
        last_gt = (best_for * gt_number).max(dim=0).values                    # the later GT wins, as mmdet's loop
        assigned = torch.where(last_gt > 0, last_gt, assigned)
    return assigned


class L1RegionProposalNetwork(RegionProposalNetwork):
    """torchvision's RPN with mmdet's training targets and the specified L1 box loss.

    Anchors are assigned by `max_iou_assign` (min_pos_iou for the low-quality matches); only
    mmdet's valid anchors take part: the anchor's location lies inside the image padded to 32
    (not the batch padding) and, when `allowed_border` >= 0, the anchor lies inside the image
    (within `allowed_border` pixels). Proposals keep every box of positive width and height
    (mmdet min_bbox_size 0; torchvision drops those under 1e-3).
    """

    def __init__(self, *args, min_pos_iou: float = 0.3, allowed_border: int = -1, **kwargs):
        super().__init__(*args, **kwargs)
        self.min_pos_iou = min_pos_iou
        self.allowed_border = allowed_border
        self.min_size = torch.finfo(torch.float32).tiny
        self.box_coder = Float32BoxCoder(self.box_coder.weights)
        self._image_sizes: List[Tuple[int, int]] = []

    def forward(self, images, features, targets=None):
        self._image_sizes = list(images.image_sizes)
        return super().forward(images, features, targets)

    def usable_anchors(self, anchors: torch.Tensor, image_size: Tuple[int, int]) -> torch.Tensor:
        strides = self.anchor_generator.anchor_strides
        height, width = image_size
        pad_h, pad_w = math.ceil(height / 32) * 32, math.ceil(width / 32) * 32
        centre_x = torch.round((anchors[:, 0] + anchors[:, 2]) / 2 / strides)
        centre_y = torch.round((anchors[:, 1] + anchors[:, 3]) / 2 / strides)
        usable = (centre_x < torch.ceil(pad_w / strides)) & (centre_y < torch.ceil(pad_h / strides))
        if self.allowed_border >= 0:
            border = self.allowed_border
            usable &= ((anchors[:, 0] >= -border) & (anchors[:, 1] >= -border)
                       & (anchors[:, 2] < width + border) & (anchors[:, 3] < height + border))
        return usable

    def assign_targets_to_anchors(self, anchors, targets):
        labels, matched_gt_boxes = [], []
        for anchors_i, target, size in zip(anchors, targets, self._image_sizes):
            gt_boxes = target["boxes"]
            assigned = max_iou_assign(self.box_similarity(gt_boxes, anchors_i), self.proposal_matcher.high_threshold,
                                      self.proposal_matcher.low_threshold, self.min_pos_iou, low_quality=True)
            assigned[~self.usable_anchors(anchors_i, size)] = -1
            label = (assigned > 0).float()
            label[assigned < 0] = -1.0
            labels.append(label)
            matched_gt_boxes.append(gt_boxes[(assigned - 1).clamp(min=0)] if len(gt_boxes)
                                    else torch.zeros_like(anchors_i))
        return labels, matched_gt_boxes

    def compute_loss(self, objectness, pred_bbox_deltas, labels, regression_targets):
        sampled_pos, sampled_neg = self.fg_bg_sampler(labels)
        sampled_pos = torch.where(torch.cat(sampled_pos, dim=0))[0]
        sampled_neg = torch.where(torch.cat(sampled_neg, dim=0))[0]
        sampled = torch.cat([sampled_pos, sampled_neg], dim=0)
        labels = torch.cat(labels, dim=0)
        regression_targets = torch.cat(regression_targets, dim=0)
        box_loss = F.l1_loss(pred_bbox_deltas[sampled_pos], regression_targets[sampled_pos],
                             reduction="sum") / max(sampled.numel(), 1)
        objectness_loss = F.binary_cross_entropy_with_logits(objectness.flatten()[sampled], labels[sampled])
        return objectness_loss, box_loss


def fast_rcnn_l1_loss(class_logits, box_regression, labels, regression_targets):
    """Cross-entropy over the sampled RoIs + class-specific L1 on the positives / number of RoIs."""
    labels = torch.cat(labels, dim=0)
    regression_targets = torch.cat(regression_targets, dim=0)
    classification_loss = F.cross_entropy(class_logits, labels)
    positive = torch.where(labels > 0)[0]
    deltas = box_regression.reshape(box_regression.shape[0], -1, 4)
    box_loss = F.l1_loss(deltas[positive, labels[positive]], regression_targets[positive],
                         reduction="sum") / max(labels.numel(), 1)
    return classification_loss, box_loss


class DetectionRoIHeads(RoIHeads):
    """torchvision RoIHeads (sampling, box coding) with mmdet's assignment, L1 box loss, mask
    targets and test post-processing; box + mask only.

    - RoIs are assigned by `max_iou_assign` (low-quality matches when `low_quality`, as the
      Mask R-CNN config; the C4 config has none).
    - Mask targets: the GT mask cropped by aligned RoIAlign and binarised at 0.5 (mmdet
      BitmapMasks.crop_and_resize); torchvision uses unaligned RoIAlign and soft targets.
    - Test: per-class boxes above the score threshold -> class-wise NMS -> top k, without
      torchvision's extra removal of boxes under 0.01 px.
    """

    low_quality: bool = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.box_coder = Float32BoxCoder(self.box_coder.weights)

    def assign_targets_to_proposals(self, proposals, gt_boxes, gt_labels):
        matched_idxs, labels = [], []
        for proposals_i, boxes_i, labels_i in zip(proposals, gt_boxes, gt_labels):
            iou = torchvision.ops.box_iou(boxes_i, proposals_i)
            assigned = max_iou_assign(iou, self.proposal_matcher.high_threshold, self.proposal_matcher.low_threshold,
                                      self.proposal_matcher.high_threshold, self.low_quality)
            matched = (assigned - 1).clamp(min=0)
            label = labels_i[matched] if len(labels_i) else torch.zeros_like(matched)
            label = torch.where(assigned > 0, label, torch.zeros_like(label))
            label[assigned < 0] = -1
            matched_idxs.append(matched)
            labels.append(label)
        return matched_idxs, labels

    def forward(self, features, proposals, image_shapes, targets=None):
        if self.training:
            proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        if self.training:
            loss_classifier, loss_box_reg = fast_rcnn_l1_loss(class_logits, box_regression, labels, regression_targets)
            losses = {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}
            if self.has_mask():
                losses["loss_mask"] = self._mask_loss(features, proposals, matched_idxs, labels, targets, image_shapes)
            return [], losses
        boxes, scores, labels = self.postprocess_detections(class_logits, box_regression, proposals, image_shapes)
        result = [{"boxes": b, "labels": l, "scores": s} for b, l, s in zip(boxes, labels, scores)]
        if self.has_mask():
            mask_features = self.mask_roi_pool(features, [r["boxes"] for r in result], image_shapes)
            mask_logits = self.mask_predictor(self.mask_head(mask_features))
            for probs, r in zip(maskrcnn_inference(mask_logits, [r["labels"] for r in result]), result):
                r["masks"] = probs
        return result, {}

    def postprocess_detections(self, class_logits, box_regression, proposals, image_shapes):
        num_classes = class_logits.shape[-1]
        counts = [len(p) for p in proposals]
        all_boxes = self.box_coder.decode(box_regression, proposals).split(counts)
        all_scores = F.softmax(class_logits, -1).split(counts)
        out_boxes, out_scores, out_labels = [], [], []
        for boxes, scores, shape in zip(all_boxes, all_scores, image_shapes):
            boxes = torchvision.ops.clip_boxes_to_image(boxes, shape)[:, 1:].reshape(-1, 4)
            labels = torch.arange(1, num_classes, device=boxes.device).repeat(len(scores))
            scores = scores[:, 1:].reshape(-1)
            keep = torch.where(scores > self.score_thresh)[0]
            keep = keep[torchvision.ops.batched_nms(boxes[keep], scores[keep], labels[keep], self.nms_thresh)]
            keep = keep[: self.detections_per_img]
            out_boxes.append(boxes[keep])
            out_scores.append(scores[keep])
            out_labels.append(labels[keep])
        return out_boxes, out_scores, out_labels

    def _mask_loss(self, features, proposals, matched_idxs, labels, targets, image_shapes):
        positive_proposals, positive_matches = [], []
        for image_proposals, image_labels, image_matches in zip(proposals, labels, matched_idxs):
            positive = torch.where(image_labels > 0)[0]
            positive_proposals.append(image_proposals[positive])
            positive_matches.append(image_matches[positive])
        mask_features = self.mask_roi_pool(features, positive_proposals, image_shapes)
        mask_logits = self.mask_predictor(self.mask_head(mask_features))
        return mask_loss(mask_logits, positive_proposals, [t["masks"] for t in targets],
                         [t["labels"] for t in targets], positive_matches)


def mask_targets(gt_masks: torch.Tensor, boxes: torch.Tensor, matched: torch.Tensor, size: int) -> torch.Tensor:
    """Binary [n, size, size] targets: each box's GT mask through aligned RoIAlign, >= 0.5 (mmdet)."""
    rois = torch.cat([matched[:, None].to(boxes.dtype), boxes], dim=1)
    crops = roi_align(gt_masks[:, None].to(boxes.dtype), rois, (size, size), 1.0, 0, aligned=True)[:, 0]
    return (crops >= 0.5).to(boxes.dtype)


def mask_loss(mask_logits, proposals, gt_masks, gt_labels, matched_idxs):
    """Mean binary cross-entropy of each positive RoI's own-class mask logits (mmdet mask_cross_entropy)."""
    size = mask_logits.shape[-1]
    labels = torch.cat([labels[idxs] for labels, idxs in zip(gt_labels, matched_idxs)])
    targets = torch.cat([mask_targets(m, p, i, size) for m, p, i in zip(gt_masks, proposals, matched_idxs)])
    if targets.numel() == 0:
        return mask_logits.sum() * 0
    logits = mask_logits[torch.arange(len(labels), device=labels.device), labels]
    return F.binary_cross_entropy_with_logits(logits, targets)


class DetectionTransform(GeneralizedRCNNTransform):
    """ImageNet RGB mean/std on [0, 1] input, pad to 32; random train size from a list, fixed test size.

    Resizing and mask pasting follow mmdet 2.x (the reference): the new size is rounded
    (int(side * scale + 0.5), mmcv.imrescale; torchvision floors), boxes are scaled per axis and
    clipped to the image, masks resized nearest; at test time, masks are pasted into the
    original image with grid_sample (mmdet `_do_paste_mask`), not torchvision's legacy paste.
    """

    def __init__(self, train_min_sizes: Sequence[int], train_max_size: int, test_min_size: int, test_max_size: int):
        super().__init__(tuple(int(s) for s in train_min_sizes), int(train_max_size), list(IMAGENET_MEAN),
                         list(IMAGENET_STD), size_divisible=32)
        self.test_min_size = int(test_min_size)
        self.test_max_size = int(test_max_size)

    def resize(self, image, target=None):
        height, width = image.shape[-2:]
        if self.training:
            short, long = float(self.torch_choice(self.min_size)), self.max_size
        else:
            short, long = self.test_min_size, self.test_max_size
        scale = min(short / min(height, width), long / max(height, width))
        new_h, new_w = int(height * scale + 0.5), int(width * scale + 0.5)
        image = F.interpolate(image[None], size=(new_h, new_w), mode="bilinear", align_corners=False)[0]
        if target is None:
            return image, target
        target = dict(target)
        boxes = target["boxes"] * torch.tensor([new_w / width, new_h / height] * 2, dtype=target["boxes"].dtype,
                                               device=target["boxes"].device)
        target["boxes"] = torchvision.ops.clip_boxes_to_image(boxes, (new_h, new_w))
        if "masks" in target:
            target["masks"] = F.interpolate(target["masks"][:, None].float(), size=(new_h, new_w),
                                            mode="nearest")[:, 0].to(torch.uint8)
            if bool(target.pop("flip_masks", False)):
                target["masks"] = target["masks"].flip(-1)
        return image, target

    def postprocess(self, result, image_shapes, original_image_sizes):
        if self.training:
            return result
        for prediction, size, original in zip(result, image_shapes, original_image_sizes):
            ratios = torch.tensor([original[1] / size[1], original[0] / size[0]] * 2, dtype=torch.float32,
                                  device=prediction["boxes"].device)
            prediction["boxes"] = prediction["boxes"] * ratios
            if "masks" in prediction:
                prediction["masks"] = paste_masks(prediction["masks"], prediction["boxes"], original)
        return result


def paste_masks(masks: torch.Tensor, boxes: torch.Tensor, image_size: Tuple[int, int]) -> torch.Tensor:
    """[n, 1, M, M] mask probabilities -> [n, 1, H, W]: each mask bilinearly resampled onto the
    pixels of its box (pixel centres, grid_sample with align_corners=False), 0 elsewhere; as mmdet
    2.x `_do_paste_mask` over the box +- 1 pixel."""
    height, width = image_size
    out = masks.new_zeros((len(masks), 1, height, width))
    for i, (mask, box) in enumerate(zip(masks, boxes)):
        x0, y0, x1, y1 = box.tolist()
        left, top = max(math.floor(x0) - 1, 0), max(math.floor(y0) - 1, 0)
        right, bottom = min(math.ceil(x1) + 1, width), min(math.ceil(y1) + 1, height)
        if right <= left or bottom <= top:
            continue
        xs = (torch.arange(left, right, device=masks.device, dtype=torch.float32) + 0.5 - x0) / (x1 - x0) * 2 - 1
        ys = (torch.arange(top, bottom, device=masks.device, dtype=torch.float32) + 0.5 - y0) / (y1 - y0) * 2 - 1
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)
        out[i, :, top:bottom, left:right] = F.grid_sample(mask[None].float(), grid[None], align_corners=False)[0]
    return out


class Res5ExtraNormHead(nn.Module):
    """The C4 shared RoI head: res5 (layer4) -> extra BN on its output (no ReLU) -> global average pool.

    MoCo/DenseCL `Res5ROIHeadsExtraNorm`, mmdet `ResLayerExtraNorm` (PROTOCOLS.md 6.1 "RoI head").
    """

    def __init__(self, layer4: nn.Sequential):
        super().__init__()
        self.res5 = layer4
        self.out_channels = stage_out_channels(layer4)
        self.extra_norm = nn.BatchNorm2d(self.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.extra_norm(self.res5(x))
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


def c4_backbone(resnet: nn.Module) -> nn.Sequential:
    """stem + layer1..layer3 of a torchvision ResNet (stride 16), with `out_channels` set."""
    body = nn.Sequential(OrderedDict([(name, getattr(resnet, name)) for name in
                                      ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3")]))
    body.out_channels = stage_out_channels(resnet.layer3)
    return body


def init_box_predictor(predictor: FastRCNNPredictor) -> FastRCNNPredictor:
    """mmdet/detectron2 init: classifier N(0, 0.01), box deltas N(0, 0.001), zero biases."""
    nn.init.normal_(predictor.cls_score.weight, std=0.01)
    nn.init.normal_(predictor.bbox_pred.weight, std=0.001)
    nn.init.zeros_(predictor.cls_score.bias)
    nn.init.zeros_(predictor.bbox_pred.bias)
    return predictor


@torch.no_grad()
def init_like_mmdet(fpn: nn.Module, box_head: nn.Module, mask_predictor: MaskRCNNPredictor, num_classes: int) -> None:
    """mmdet 2.x initialisation where torchvision's differs: FPN convs and the box head's fc are
    Xavier-uniform with zero bias (torchvision: Kaiming-uniform a=1 / PyTorch's Linear default);
    mask logits Kaiming-normal over fan_out = num_classes (torchvision counts the background too);
    zero biases in the mask predictor (torchvision leaves PyTorch's default)."""
    for module in list(fpn.modules()) + [m for m in box_head.modules() if isinstance(m, nn.Linear)]:
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    nn.init.normal_(mask_predictor.mask_fcn_logits.weight, std=math.sqrt(2.0 / num_classes))
    nn.init.zeros_(mask_predictor.mask_fcn_logits.bias)
    nn.init.zeros_(mask_predictor.conv5_mask.bias)


def _rpn(cfg, anchor_generator: AnchorGenerator, in_channels: int) -> L1RegionProposalNetwork:
    head = RPNHead(in_channels, anchor_generator.num_anchors_per_location()[0])
    return L1RegionProposalNetwork(
        anchor_generator, head, cfg.rpn_fg_iou, cfg.rpn_bg_iou, cfg.rpn_batch_per_image, cfg.rpn_positive_fraction,
        dict(training=cfg.rpn_pre_nms_train, testing=cfg.rpn_pre_nms_test),
        dict(training=cfg.rpn_post_nms_train, testing=cfg.rpn_post_nms_test), cfg.rpn_nms, score_thresh=0.0,
        min_pos_iou=cfg.rpn_min_pos_iou, allowed_border=cfg.rpn_allowed_border)


def _transform(cfg) -> DetectionTransform:
    return DetectionTransform(cfg.train_min_sizes, cfg.train_max_size, cfg.test_min_size, cfg.test_max_size)


def _roi_heads_kwargs(cfg) -> Dict[str, Any]:
    return dict(fg_iou_thresh=cfg.roi_fg_iou, bg_iou_thresh=cfg.roi_bg_iou,
                batch_size_per_image=cfg.roi_batch_per_image, positive_fraction=cfg.roi_positive_fraction,
                bbox_reg_weights=(10.0, 10.0, 5.0, 5.0), score_thresh=cfg.test_score_thresh,
                nms_thresh=cfg.test_nms, detections_per_img=cfg.test_detections_per_img)


def build_faster_rcnn_c4(resnet: nn.Module, num_classes: int, cfg) -> GeneralizedRCNN:
    """Faster R-CNN R-C4 (PROTOCOLS.md 6.1): res4 features, 15 anchors, res5 + extra BN RoI head.

    `resnet` is a torchvision ResNet already holding the checkpoint's weights: its stem..layer3
    become the backbone and its layer4 the shared RoI head (so res5 is initialised from the
    checkpoint too). `num_classes` excludes the background.
    """
    backbone = c4_backbone(resnet)
    stride = 16
    sizes = tuple(int(scale * stride) for scale in cfg.anchor_scales)
    anchors = ReferenceAnchorGenerator(sizes=(sizes,), aspect_ratios=(tuple(cfg.anchor_ratios),), strides=(stride,))
    rpn = _rpn(cfg, anchors, backbone.out_channels)
    box_head = Res5ExtraNormHead(resnet.layer4)
    predictor = init_box_predictor(FastRCNNPredictor(box_head.out_channels, num_classes + 1))
    roi_pool = AlignedRoIAlign(["0"], output_size=cfg.roi_output_size, sampling_ratio=0)
    roi_heads = DetectionRoIHeads(roi_pool, box_head, predictor, **_roi_heads_kwargs(cfg))
    roi_heads.low_quality = cfg.roi_low_quality
    return GeneralizedRCNN(backbone, rpn, roi_heads, _transform(cfg))


def build_mask_rcnn_fpn(resnet: nn.Module, num_classes: int, cfg) -> GeneralizedRCNN:
    """Mask R-CNN R-50-FPN (PROTOCOLS.md 7.1): P2-P6, 4conv1fc box head and 4conv mask head with BN.

    `resnet` holds the checkpoint's weights (all four stages are the FPN's inputs).
    """
    in_channels = [stage_out_channels(getattr(resnet, f"layer{i}")) for i in (1, 2, 3, 4)]
    backbone = BackboneWithFPN(resnet, {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
                               in_channels, cfg.fpn_channels, extra_blocks=LastLevelMaxPool(),
                               norm_layer=nn.BatchNorm2d)
    strides = (4, 8, 16, 32, 64)
    anchors = ReferenceAnchorGenerator(sizes=tuple((int(cfg.anchor_scale * s),) for s in strides),
                                       aspect_ratios=(tuple(cfg.anchor_ratios),) * len(strides), strides=strides)
    rpn = _rpn(cfg, anchors, backbone.out_channels)
    levels = ["0", "1", "2", "3"]
    box_pool = AlignedRoIAlign(levels, output_size=cfg.box_roi_size, sampling_ratio=0)
    box_head = FastRCNNConvFCHead((backbone.out_channels, cfg.box_roi_size, cfg.box_roi_size),
                                  [cfg.head_channels] * cfg.box_head_convs, [cfg.box_head_fc],
                                  norm_layer=nn.BatchNorm2d)
    predictor = init_box_predictor(FastRCNNPredictor(cfg.box_head_fc, num_classes + 1))
    mask_pool = AlignedRoIAlign(levels, output_size=cfg.mask_roi_size, sampling_ratio=0)
    mask_head = MaskRCNNHeads(backbone.out_channels, [cfg.head_channels] * cfg.mask_head_convs, 1,
                              norm_layer=nn.BatchNorm2d)
    mask_predictor = MaskRCNNPredictor(cfg.head_channels, cfg.head_channels, num_classes + 1)
    init_like_mmdet(backbone.fpn, box_head, mask_predictor, num_classes)
    roi_heads = DetectionRoIHeads(box_pool, box_head, predictor, mask_roi_pool=mask_pool, mask_head=mask_head,
                                  mask_predictor=mask_predictor, **_roi_heads_kwargs(cfg))
    roi_heads.low_quality = cfg.roi_low_quality
    return GeneralizedRCNN(backbone, rpn, roi_heads, _transform(cfg))


def resnet_from_state_dict(arch: str, state_dict: Dict[str, torch.Tensor]) -> nn.Module:
    """A torchvision ResNet with trainable nn.BatchNorm2d (not FrozenBatchNorm2d), loaded strictly."""
    resnet = getattr(torchvision.models, arch)(weights=None, norm_layer=nn.BatchNorm2d)
    resnet.fc = nn.Identity()
    resnet.load_state_dict(state_dict, strict=True)
    return resnet


# checkpoint key prefix -> where that tensor lives in each detector
C4_CHECKPOINT_PLACES = (("layer4.", "roi_heads.box_head.res5."), ("", "backbone."))
FPN_CHECKPOINT_PLACES = (("", "backbone.body."),)


def checkpoint_load_report(model: nn.Module, state_dict: Dict[str, torch.Tensor],
                           places: Sequence[Tuple[str, str]]) -> Dict[str, Any]:
    """Check that every checkpoint tensor sits, unchanged, in `model`; count them per stage.

    Guards against the classic silent failure of the C4 protocol (res5 left at random init).
    Returns {"tensors", "parameters" (numel of learnable ones), "per_stage": {stage: tensors},
    "missing": [checkpoint keys not found or different]}.
    """
    model_state = model.state_dict()
    learnable = {name for name, _ in model.named_parameters()}
    report: Dict[str, Any] = {"tensors": 0, "parameters": 0, "per_stage": {}, "missing": []}
    for key, value in state_dict.items():
        target = next(prefix_to + key[len(prefix_from):] for prefix_from, prefix_to in places
                      if key.startswith(prefix_from))
        placed = model_state.get(target)
        if placed is None or placed.shape != value.shape or not torch.equal(placed.cpu(), value.cpu()):
            report["missing"].append(key)
            continue
        stage = key.split(".")[0] if key.startswith("layer") else "stem"
        report["per_stage"][stage] = report["per_stage"].get(stage, 0) + 1
        report["tensors"] += 1
        if target in learnable:
            report["parameters"] += value.numel()
    return report


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------

@dataclass
class DetectionRecord:
    """One image for training or testing; boxes in continuous 0-based pixel xyxy, labels 0..C-1."""
    image_id: Any
    path: Path
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray
    difficult: Optional[np.ndarray] = None          # VOC: ground truth ignored by the metric
    segmentations: Optional[List[Any]] = None      # COCO: raw segmentation objects, one per box


class DetectionDataset(Dataset):
    """Images as float [0, 1] RGB tensors + torchvision targets (labels 1..C, 0 is background).

    Training flips horizontally with probability `flip_prob`; resizing and normalisation happen
    in the model's DetectionTransform (which flips the masks after resizing them, see there). Masks (when `mask_fn` is given) are rasterised at the
    image's size by `mask_fn(segmentation, height, width)`.
    """

    def __init__(self, records: Sequence[DetectionRecord], flip_prob: float = 0.0,
                 mask_fn: Optional[Callable[[Any, int, int], np.ndarray]] = None):
        self.records = list(records)
        self.flip_prob = flip_prob
        self.mask_fn = mask_fn

    def __len__(self) -> int:
        return len(self.records)

    def group_ids(self) -> List[int]:
        """Aspect-ratio group of each image: 1 when wider than tall, else 0."""
        return [int(r.width > r.height) for r in self.records]

    def __getitem__(self, index: int):
        record = self.records[index]
        image = torch.from_numpy(np.asarray(load_image(record.path), dtype=np.uint8).copy())
        image = image.permute(2, 0, 1).float().div_(255.0)
        height, width = image.shape[-2:]
        boxes = torch.as_tensor(record.boxes, dtype=torch.float32).reshape(-1, 4)
        target = {"boxes": boxes, "labels": torch.as_tensor(record.labels, dtype=torch.int64).reshape(-1) + 1}
        if self.mask_fn is not None:
            masks = [self.mask_fn(seg, height, width) for seg in record.segmentations or []]
            target["masks"] = (torch.from_numpy(np.stack(masks)) if masks
                               else torch.zeros((0, height, width), dtype=torch.uint8))
        if self.flip_prob > 0 and torch.rand(()) < self.flip_prob:
            image = image.flip(-1)
            target["boxes"] = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
            if "masks" in target:                   # flipped after the nearest resize, as mmdet (they do not commute)
                target["flip_masks"] = torch.tensor(True)
        return image, target, index


def collate(batch):
    return tuple(zip(*batch))


class GroupedBatches:
    """Endless per-rank batches of dataset indices, each batch from one aspect-ratio group.

    Every pass shuffles all indices with a generator seeded by (seed, pass), gives rank r the
    indices r, r + world, ... (padded by wrapping so every rank gets as many), and fills one
    buffer per group; a buffer that reaches `batch_size` is emitted (torchvision's
    GroupedBatchSampler and detectron2's AspectRatioGroupedDataset work the same way).
    Deterministic, so resuming at iteration k replays the order and skips the first k batches
    (`skip`; indices only, no image is loaded for them).
    """

    def __init__(self, group_ids: Sequence[int], batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 skip: int = 0):
        if not group_ids:
            raise ValueError("no training images")
        self.group_ids = list(group_ids)
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.skip = skip

    def __iter__(self):
        batches = self._all_batches()
        for _ in range(self.skip):
            next(batches)
        return batches

    def _all_batches(self):
        buffers: Dict[int, List[int]] = {}
        epoch = 0
        while True:
            generator = torch.Generator().manual_seed(self.seed * 1000003 + epoch)
            order = torch.randperm(len(self.group_ids), generator=generator).tolist()
            per_rank = math.ceil(len(order) / self.world_size)
            order = (order * (self.world_size + 1))[: per_rank * self.world_size]
            for index in order[self.rank::self.world_size]:
                group = buffers.setdefault(self.group_ids[index], [])
                group.append(index)
                if len(group) == self.batch_size:
                    yield list(group)
                    group.clear()
            epoch += 1


# ---------------------------------------------------------------------------------------------
# schedule, optimiser, loop
# ---------------------------------------------------------------------------------------------

@dataclass
class Schedule:
    """Iteration schedule actually run, after scaling to the real total batch (recorded)."""
    base_lr: float
    max_iter: int
    steps: List[int]
    warmup_iters: int
    warmup_factor: float
    images_per_step: int
    reference_images_per_step: int
    scale: float

    def lr_at(self, iteration: int) -> float:
        """Linear warm-up from warmup_factor, then x0.1 at every step passed (iteration is 0-based)."""
        lr = self.base_lr * (0.1 ** sum(iteration >= s for s in self.steps))
        if iteration < self.warmup_iters:
            alpha = iteration / self.warmup_iters
            lr *= self.warmup_factor * (1 - alpha) + alpha
        return lr

    def scaled_interval(self, interval: int) -> int:
        """An interval in reference iterations (evaluation, checkpoint) in the iterations actually run."""
        return max(1, round(interval / self.scale)) if interval > 0 else 0

    def record(self) -> Dict[str, Any]:
        return dict(self.__dict__)


def scaled_schedule(base_lr: float, max_iter: int, steps: Sequence[int], warmup_iters: int, warmup_factor: float,
                    reference_images_per_step: int, images_per_step: int) -> Schedule:
    """Linear scaling rule for a different total batch (detectron2 REFERENCE_WORLD_SIZE):
    lr x k, iterations (total, steps, warm-up) / k, with k = images_per_step / reference."""
    scale = images_per_step / reference_images_per_step
    return Schedule(base_lr=base_lr * scale, max_iter=max(1, round(max_iter / scale)),
                    steps=[round(s / scale) for s in steps], warmup_iters=round(warmup_iters / scale),
                    warmup_factor=warmup_factor, images_per_step=images_per_step,
                    reference_images_per_step=reference_images_per_step, scale=scale)


def images_per_gpu_for(images_per_step: int, images_per_gpu: int, world_size: int, option: str) -> int:
    """Per-GPU batch. 0 (default) keeps the reference total batch at any GPU count (mmdet ran 16
    images per step with SyncBN over all of them): images_per_step / world size, which must divide.
    A positive value is the user's explicit choice; the schedule is then scaled linearly."""
    if images_per_gpu > 0:
        return images_per_gpu
    if images_per_step % world_size:
        raise InputError(None, f"{option}.images_per_step={images_per_step} is not divisible by the "
                               f"{world_size} processes; set {option}.images_per_gpu to scale the schedule instead")
    return images_per_step // world_size


def parameter_groups(model: nn.Module, weight_decay: float, weight_decay_norm: Optional[float]) -> List[dict]:
    """All parameters with `weight_decay`, except norm-layer ones when weight_decay_norm is set."""
    if weight_decay_norm is None:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    norm_params, other_params = [], []
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if p.requires_grad:
                (norm_params if isinstance(module, NORM_TYPES) else other_params).append(p)
    return [{"params": other_params, "weight_decay": weight_decay},
            {"params": norm_params, "weight_decay": weight_decay_norm}]


@dataclass
class LoopSettings:
    """Loop knobs shared by both protocols (values from each protocol's Config)."""
    images_per_gpu: int
    momentum: float
    weight_decay: float
    weight_decay_norm: Optional[float]
    amp: bool
    eval_interval: int              # 0: evaluate only at the end
    checkpoint_interval: int
    log_interval: int
    precise_bn_iters: int           # 0: off (detectron2 convention: 200 before each evaluation)


@dataclass
class TrainResult:
    loss_history: List[Dict[str, float]] = field(default_factory=list)
    eval_history: List[Dict[str, Any]] = field(default_factory=list)
    final_metrics: Dict[str, Any] = field(default_factory=dict)
    final_extra: Dict[str, Any] = field(default_factory=dict)
    resumed_from: Optional[int] = None
    wall_train_s: float = 0.0
    sync_bn: bool = False


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def to_device(images, targets, device):
    images = [img.to(device, non_blocking=True) for img in images]
    targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
    return images, targets


@torch.no_grad()
def update_bn_stats(model: nn.Module, batches, num_iters: int, device: torch.device) -> None:
    """Precise BN (detectron2 TEST.PRECISE_BN): replace running statistics by their true average
    over `num_iters` training batches (train-mode forward, no gradient), averaged over ranks."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or num_iters <= 0:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None                      # cumulative moving average = exact mean
    was_training = model.training
    model.train()
    for _ in range(num_iters):
        images, targets, _ = next(batches)
        images, targets = to_device(images, targets, device)
        model(images, targets)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
        if dist_utils.is_dist():
            for buffer in (m.running_mean, m.running_var):
                torch.distributed.all_reduce(buffer)
                buffer.div_(dist_utils.world_size())
    model.train(was_training)


def save_train_state(path: Path, model: nn.Module, optimizer, scaler, iteration: int, result: TrainResult) -> None:
    state = {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
             "scaler": scaler.state_dict(), "iteration": iteration,
             "loss_history": result.loss_history, "eval_history": result.eval_history,
             "torch_rng": torch.get_rng_state()}
    torch_save_atomic(state, path)


def train_detector(model: nn.Module, dataset: DetectionDataset, schedule: Schedule, loop: LoopSettings,
                   evaluate: Callable[[nn.Module, int, bool], Tuple[Dict[str, Any], Dict[str, Any]]],
                   work_dir: Path, device: torch.device, seed: int, num_workers: int = 0,
                   show_progress: bool = True) -> TrainResult:
    """Train `model` for schedule.max_iter iterations, evaluating periodically and at the end.

    `evaluate(model, iteration, final)` runs on every rank (inference is sharded) and returns
    (metrics, extra). Resume state is `work_dir/train_state.pth`, written atomically every
    `checkpoint_interval` iterations and at the end; a finished state only re-runs the evaluation.
    """
    result = TrainResult()
    model.to(device)
    if dist_utils.is_dist() and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        result.sync_bn = True
    optimizer = torch.optim.SGD(parameter_groups(model, loop.weight_decay, loop.weight_decay_norm),
                                lr=schedule.base_lr, momentum=loop.momentum)
    use_amp = loop.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    state_path = Path(work_dir) / "train_state.pth"
    start_iter = 0
    if state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"])
        start_iter = int(state["iteration"])
        result.loss_history = list(state["loss_history"])
        result.eval_history = list(state["eval_history"])
        result.resumed_from = start_iter
    if dist_utils.is_dist():
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    sampler = GroupedBatches(dataset.group_ids(), loop.images_per_gpu, seed, dist_utils.rank(),
                             dist_utils.world_size(), skip=start_iter)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    batches = iter(loader)
    model.train()
    started = time.time()
    progress = tqdm(range(start_iter, schedule.max_iter), initial=start_iter, total=schedule.max_iter,
                    desc="detection train", disable=not show_progress or not dist_utils.is_main())
    window: List[Dict[str, float]] = []
    for iteration in progress:
        for group in optimizer.param_groups:
            group["lr"] = schedule.lr_at(iteration)
        images, targets, _ = next(batches)
        images, targets = to_device(images, targets, device)
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
            losses = model(images, targets)
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite detection loss at iteration {iteration}: "
                                     f"{ {k: float(v) for k, v in losses.items()} }")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        window.append({"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in losses.items()}})
        done = iteration + 1
        if done % loop.log_interval == 0 or done == schedule.max_iter:
            entry = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
            entry.update(iteration=done, lr=schedule.lr_at(iteration))
            result.loss_history.append(entry)
            window = []
            progress.set_postfix(loss=f"{entry['loss']:.3f}")
        periodic = loop.eval_interval > 0 and done % loop.eval_interval == 0 and done < schedule.max_iter
        if periodic:
            metrics, _ = _evaluate(model, batches, loop, evaluate, done, False, device)
            result.eval_history.append({"iteration": done, "metrics": metrics})
            model.train()
        if (loop.checkpoint_interval > 0 and done % loop.checkpoint_interval == 0) or done == schedule.max_iter:
            if dist_utils.is_main():
                save_train_state(state_path, model, optimizer, scaler, done, result)
            dist_utils.barrier()
    progress.close()
    result.wall_train_s = time.time() - started
    result.final_metrics, result.final_extra = _evaluate(model, batches, loop, evaluate, schedule.max_iter, True, device)
    return result


def _evaluate(model, batches, loop: LoopSettings, evaluate, iteration: int, final: bool, device):
    core = unwrap(model)
    if loop.precise_bn_iters > 0:
        update_bn_stats(core, batches, loop.precise_bn_iters, device)
    core.eval()
    return evaluate(core, iteration, final)


# ---------------------------------------------------------------------------------------------
# inference
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def run_inference(model: nn.Module, dataset: DetectionDataset, device: torch.device, amp: bool,
                  convert: Callable[[Dict[str, torch.Tensor], int], Any], num_workers: int = 0,
                  show_progress: bool = True) -> List[Any]:
    """`convert(output, index)` for every test image, in dataset order, on every rank.

    Rank r predicts images r, r + world, ...; the converted (small, CPU) results are gathered.
    """
    model.eval()
    indices = list(range(dist_utils.rank(), len(dataset), dist_utils.world_size()))
    loader = DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=1, collate_fn=collate,
                        num_workers=num_workers)
    use_amp = amp and device.type == "cuda"
    mine: List[Tuple[int, Any]] = []
    for images, _, index in tqdm(loader, desc="detection eval", leave=False,
                                 disable=not show_progress or not dist_utils.is_main()):
        images = [img.to(device, non_blocking=True) for img in images]
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
            outputs = model(images)
        for output, i in zip(outputs, index):
            output = {k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in output.items()}
            mine.append((int(i), convert(output, int(i))))
    if dist_utils.is_dist():
        gathered: List[Any] = [None] * dist_utils.world_size()
        torch.distributed.all_gather_object(gathered, mine)
        mine = [item for part in gathered for item in part]
    return [value for _, value in sorted(mine, key=lambda item: item[0])]
