"""The two reference detectors (mmdet 2.28.2) as the MMSelfSup 0.x benchmarks configure them, their
weights mapped onto densebench's detectors, and shared inputs for the detection peer tests.

Config sources (open-mmlab/mmselfsup, branch 0.x, configs/benchmarks/mmdetection/):
- C4: voc0712/faster_rcnn_r50_c4_mstrain_24k_voc0712.py over _base_/models/faster_rcnn_r50_c4.py
  (backbone frozen_stages=-1, norm_eval=False; shared head ResLayerExtraNorm; 20 classes).
- FPN: coco/mask_rcnn_r50_fpn_mstrain_1x_coco.py over _base_/models/mask_rcnn_r50_fpn.py
  (SyncBN in backbone, neck, Shared4Conv1FCBBoxHead and mask head).
Written out below as plain dicts (no inheritance), with three test-only changes that keep every
code path: SyncBN -> BN (one process; identical in eval mode and for one process in train mode),
no pretrained checkpoint, fewer RPN proposals at test time (rpn max_per_img) so res5 runs on
few RoIs on CPU; densebench gets the same counts.
"""
from __future__ import annotations

import copy
import logging

import numpy as np
import torch
import torchvision
from mmcv import ConfigDict
from mmcv.cnn import build_norm_layer
from mmdet.models import build_detector
from mmdet.models.backbones import ResNet
from mmdet.models.builder import SHARED_HEADS
from mmdet.models.roi_heads.shared_heads.res_layer import ResLayer
from torch import nn

from densebench.protocols import det_coco_maskrcnn_fpn, det_voc0712_c4, detection

BN = dict(type="BN", requires_grad=True)


if "ResLayerExtraNorm" not in SHARED_HEADS.module_dict:
    @SHARED_HEADS.register_module()
    class ResLayerExtraNorm(ResLayer):
        """MMSelfSup 0.x mmselfsup/models/utils/res_layer_extra_norm.py: res5, then a norm layer
        named `norm` on its output (no activation)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            channels = 64 * 2 ** self.stage * ResNet.arch_settings[kwargs["depth"]][0].expansion
            self.add_module("norm", build_norm_layer(self.norm_cfg, channels)[1])

        def forward(self, x):
            return self.norm(getattr(self, f"layer{self.stage + 1}")(x))


def rpn_head_cfg(in_channels, scales, strides):
    return dict(type="RPNHead", in_channels=in_channels, feat_channels=in_channels,
                anchor_generator=dict(type="AnchorGenerator", scales=scales, ratios=[0.5, 1.0, 2.0], strides=strides),
                bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=[1.0] * 4),
                loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=1.0),
                loss_bbox=dict(type="L1Loss", loss_weight=1.0))


def bbox_coder_cfg():
    return dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=[0.1, 0.1, 0.2, 0.2])


def assigner(pos, neg, min_pos, low_quality):
    return dict(type="MaxIoUAssigner", pos_iou_thr=pos, neg_iou_thr=neg, min_pos_iou=min_pos,
                match_low_quality=low_quality, ignore_iof_thr=-1)


def sampler(num, fraction, add_gt):
    return dict(type="RandomSampler", num=num, pos_fraction=fraction, neg_pos_ub=-1, add_gt_as_proposals=add_gt)


def c4_cfg(num_classes=20, rpn_test_max=50):
    """faster_rcnn_r50_c4.py + faster_rcnn_r50_c4_mstrain_24k_voc0712.py (model part)."""
    return dict(
        type="FasterRCNN",
        backbone=dict(type="ResNet", depth=50, num_stages=3, strides=(1, 2, 2), dilations=(1, 1, 1), out_indices=(2,),
                      frozen_stages=-1, norm_cfg=BN, norm_eval=False, style="pytorch"),
        rpn_head=rpn_head_cfg(1024, [2, 4, 8, 16, 32], [16]),
        roi_head=dict(
            type="StandardRoIHead",
            shared_head=dict(type="ResLayerExtraNorm", depth=50, stage=3, stride=2, dilation=1, style="pytorch",
                             norm_cfg=BN, norm_eval=False),
            bbox_roi_extractor=dict(type="SingleRoIExtractor",
                                    roi_layer=dict(type="RoIAlign", output_size=14, sampling_ratio=0),
                                    out_channels=1024, featmap_strides=[16]),
            bbox_head=dict(type="BBoxHead", with_avg_pool=True, roi_feat_size=7, in_channels=2048,
                           num_classes=num_classes, bbox_coder=bbox_coder_cfg(), reg_class_agnostic=False,
                           loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
                           loss_bbox=dict(type="L1Loss", loss_weight=1.0))),
        train_cfg=dict(
            rpn=dict(assigner=assigner(0.7, 0.3, 0.3, True), sampler=sampler(256, 0.5, False), allowed_border=0,
                     pos_weight=-1, debug=False),
            rpn_proposal=dict(nms_pre=12000, max_per_img=2000, nms=dict(type="nms", iou_threshold=0.7),
                              min_bbox_size=0),
            rcnn=dict(assigner=assigner(0.5, 0.5, 0.5, False), sampler=sampler(512, 0.25, True), pos_weight=-1,
                      debug=False)),
        test_cfg=dict(
            rpn=dict(nms_pre=6000, max_per_img=rpn_test_max, nms=dict(type="nms", iou_threshold=0.7), min_bbox_size=0),
            rcnn=dict(score_thr=0.05, nms=dict(type="nms", iou_threshold=0.5), max_per_img=100)))


def fpn_cfg(num_classes=3, rpn_test_max=100):
    """mask_rcnn_r50_fpn.py + mask_rcnn_r50_fpn_mstrain_1x_coco.py (model part)."""
    def conv_head(extra):
        return dict(in_channels=256, num_classes=num_classes, norm_cfg=BN, **extra)
    return dict(
        type="MaskRCNN",
        backbone=dict(type="ResNet", depth=50, num_stages=4, out_indices=(0, 1, 2, 3), frozen_stages=-1,
                      norm_cfg=BN, norm_eval=False, style="pytorch"),
        neck=dict(type="FPN", in_channels=[256, 512, 1024, 2048], out_channels=256, num_outs=5, norm_cfg=BN),
        rpn_head=rpn_head_cfg(256, [8], [4, 8, 16, 32, 64]),
        roi_head=dict(
            type="StandardRoIHead",
            bbox_roi_extractor=dict(type="SingleRoIExtractor",
                                    roi_layer=dict(type="RoIAlign", output_size=7, sampling_ratio=0),
                                    out_channels=256, featmap_strides=[4, 8, 16, 32]),
            bbox_head=conv_head(dict(type="Shared4Conv1FCBBoxHead", fc_out_channels=1024, roi_feat_size=7,
                                     bbox_coder=bbox_coder_cfg(), reg_class_agnostic=False,
                                     loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
                                     loss_bbox=dict(type="L1Loss", loss_weight=1.0))),
            mask_roi_extractor=dict(type="SingleRoIExtractor",
                                    roi_layer=dict(type="RoIAlign", output_size=14, sampling_ratio=0),
                                    out_channels=256, featmap_strides=[4, 8, 16, 32]),
            mask_head=conv_head(dict(type="FCNMaskHead", num_convs=4, conv_out_channels=256,
                                     loss_mask=dict(type="CrossEntropyLoss", use_mask=True, loss_weight=1.0)))),
        train_cfg=dict(
            rpn=dict(assigner=assigner(0.7, 0.3, 0.3, True), sampler=sampler(256, 0.5, False), allowed_border=-1,
                     pos_weight=-1, debug=False),
            rpn_proposal=dict(nms_pre=2000, max_per_img=1000, nms=dict(type="nms", iou_threshold=0.7),
                              min_bbox_size=0),
            rcnn=dict(assigner=assigner(0.5, 0.5, 0.5, True), sampler=sampler(512, 0.25, True), mask_size=28,
                      pos_weight=-1, debug=False)),
        test_cfg=dict(
            rpn=dict(nms_pre=1000, max_per_img=rpn_test_max, nms=dict(type="nms", iou_threshold=0.7),
                     min_bbox_size=0),
            rcnn=dict(score_thr=0.05, nms=dict(type="nms", iou_threshold=0.5), max_per_img=100,
                      mask_thr_binary=0.5)))


logging.getLogger("mmcv").setLevel(logging.ERROR)       # init_weights logs every tensor


def build_reference(cfg: dict, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = build_detector(ConfigDict(copy.deepcopy(cfg)))
    model.init_weights()
    return model


def our_c4(num_classes=20, rpn_test_max=50, **overrides):
    cfg = det_voc0712_c4.Config(rpn_post_nms_test=rpn_test_max, **overrides)
    resnet = torchvision.models.resnet50(weights=None, norm_layer=nn.BatchNorm2d)
    return detection.build_faster_rcnn_c4(resnet, num_classes, cfg), cfg


def our_fpn(num_classes=3, rpn_test_max=100, **overrides):
    cfg = det_coco_maskrcnn_fpn.Config(rpn_post_nms_test=rpn_test_max, **overrides)
    resnet = torchvision.models.resnet50(weights=None, norm_layer=nn.BatchNorm2d)
    return detection.build_mask_rcnn_fpn(resnet, num_classes, cfg), cfg


# ---------------------------------------------------------------------------------------------
# weight mapping: mmdet state dict -> densebench state dict
# ---------------------------------------------------------------------------------------------

def _background_first(tensor: torch.Tensor, per_class: int) -> torch.Tensor:
    """mmdet's classifier has background LAST (index C), torchvision's FIRST (index 0)."""
    return torch.cat([tensor[-per_class:], tensor[:-per_class]])


def _box_regression(tensor: torch.Tensor) -> torch.Tensor:
    """mmdet regresses C classes; torchvision C + 1 with an unused background slot first (zeros)."""
    return torch.cat([torch.zeros_like(tensor[:4]), tensor])


def _convmodule(prefix_from: str, prefix_to: str, sd: dict, out: dict) -> None:
    """mmcv ConvModule (conv, bn) -> torchvision Conv2dNormActivation (0, 1)."""
    for key, value in sd.items():
        if key.startswith(prefix_from + ".conv."):
            out[prefix_to + ".0." + key[len(prefix_from) + 6:]] = value
        elif key.startswith(prefix_from + ".bn."):
            out[prefix_to + ".1." + key[len(prefix_from) + 4:]] = value


def c4_state_dict(reference: nn.Module, tensors: dict = None) -> dict:
    """`tensors` (default: the state dict) named as the reference's parameters, e.g. their gradients."""
    sd = reference.state_dict() if tensors is None else tensors
    out = {}
    for key, value in sd.items():
        if key.startswith("backbone."):
            out[key] = value
        elif key.startswith("roi_head.shared_head.layer4."):
            out["roi_heads.box_head.res5." + key[len("roi_head.shared_head.layer4."):]] = value
        elif key.startswith("roi_head.shared_head.norm."):
            out["roi_heads.box_head.extra_norm." + key[len("roi_head.shared_head.norm."):]] = value
    _rpn_state(sd, out)
    _box_predictor_state(sd, out)
    return out


def _rpn_state(sd: dict, out: dict) -> None:
    for ours, theirs in (("conv.0.0", "rpn_conv"), ("cls_logits", "rpn_cls"), ("bbox_pred", "rpn_reg")):
        for kind in ("weight", "bias"):
            out[f"rpn.head.{ours}.{kind}"] = sd[f"rpn_head.{theirs}.{kind}"]


def _box_predictor_state(sd: dict, out: dict) -> None:
    for kind in ("weight", "bias"):
        out[f"roi_heads.box_predictor.cls_score.{kind}"] = _background_first(sd[f"roi_head.bbox_head.fc_cls.{kind}"], 1)
        out[f"roi_heads.box_predictor.bbox_pred.{kind}"] = _box_regression(sd[f"roi_head.bbox_head.fc_reg.{kind}"])


def fpn_state_dict(reference: nn.Module, tensors: dict = None) -> dict:
    """`tensors` (default: the state dict) named as the reference's parameters, e.g. their gradients."""
    sd = reference.state_dict() if tensors is None else tensors
    out = {}
    for key, value in sd.items():
        if key.startswith("backbone."):
            out["backbone.body." + key[len("backbone."):]] = value
    for i in range(4):
        _convmodule(f"neck.lateral_convs.{i}", f"backbone.fpn.inner_blocks.{i}", sd, out)
        _convmodule(f"neck.fpn_convs.{i}", f"backbone.fpn.layer_blocks.{i}", sd, out)
        _convmodule(f"roi_head.bbox_head.shared_convs.{i}", f"roi_heads.box_head.{i}", sd, out)
        _convmodule(f"roi_head.mask_head.convs.{i}", f"roi_heads.mask_head.{i}", sd, out)
    for kind in ("weight", "bias"):
        out[f"roi_heads.box_head.5.{kind}"] = sd[f"roi_head.bbox_head.shared_fcs.0.{kind}"]
        out[f"roi_heads.mask_predictor.conv5_mask.{kind}"] = sd[f"roi_head.mask_head.upsample.{kind}"]
        logits = sd[f"roi_head.mask_head.conv_logits.{kind}"]
        out[f"roi_heads.mask_predictor.mask_fcn_logits.{kind}"] = torch.cat([torch.zeros_like(logits[:1]), logits])
    _rpn_state(sd, out)
    _box_predictor_state(sd, out)
    return out


def load_mapped(ours: nn.Module, mapped: dict) -> None:
    """Strict: every densebench tensor comes from the reference (only the unused background rows
    are zeros, see _box_regression)."""
    missing, unexpected = ours.load_state_dict(mapped, strict=False)
    assert not unexpected, unexpected
    assert not missing, missing


# ---------------------------------------------------------------------------------------------
# random but informative weights
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def calibrate(model: nn.Module, run, seed: int) -> None:
    """Random weights that behave like a trained detector's in scale: random BN affine parameters,
    then BN running statistics from one train-mode pass of `run()`, so eval-mode activations stay
    O(1) through every stage."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    generator = torch.Generator().manual_seed(seed)
    for m in norms:
        m.weight.copy_(0.5 + torch.rand(m.num_features, generator=generator))
        m.bias.copy_(0.2 * torch.randn(m.num_features, generator=generator))
        m.reset_running_stats()
        m.momentum = None
    model.train()
    run()
    model.eval()
    for m in norms:
        m.momentum = 0.1


@torch.no_grad()
def set_output_std(layer: nn.Module, inputs: torch.Tensor, std: float) -> None:
    """Rescale a head layer's weights (bias zero) so its outputs on `inputs` have standard deviation `std`."""
    layer.bias.zero_()
    layer.weight.mul_(std / float(layer(inputs).std()))


# ---------------------------------------------------------------------------------------------
# the pairs used by the tests: reference with calibrated random weights, ours with the same weights
# ---------------------------------------------------------------------------------------------

def padded_input(seed: int, padded: tuple, image: tuple) -> torch.Tensor:
    """A normalised batch of one image of size `image` zero-padded to `padded` (as mmdet's Pad)."""
    x = torch.randn((1, 3) + tuple(padded), generator=torch.Generator().manual_seed(seed))
    x[..., image[0]:, :] = 0
    x[..., image[1]:] = 0
    return x


def image_meta(image: tuple, original: tuple, padded: tuple) -> dict:
    h, w = image
    return dict(img_shape=(h, w, 3), ori_shape=tuple(original) + (3,), pad_shape=tuple(padded) + (3,),
                scale_factor=np.array([w / original[1], h / original[0]] * 2, dtype=np.float32), flip=False)


@torch.no_grad()
def c4_pair(x: torch.Tensor, meta: dict, seed: int = 0):
    ref = build_reference(c4_cfg(), seed)
    head = ref.roi_head

    def run():
        features = ref.extract_feat(x)
        head.shared_head(head.bbox_roi_extractor(features, CALIBRATION_ROIS))

    calibrate(ref, run, seed + 1)
    features = ref.extract_feat(x)
    hidden = torch.relu(ref.rpn_head.rpn_conv(features[0]))
    set_output_std(ref.rpn_head.rpn_cls, hidden, 2.0)
    set_output_std(ref.rpn_head.rpn_reg, hidden, 0.3)
    proposals = ref.rpn_head.simple_test_rpn(features, [meta])[0]
    rois = torch.cat([proposals.new_zeros(len(proposals), 1), proposals[:, :4]], dim=1)
    pooled = head.shared_head(head.bbox_roi_extractor(features, rois)).mean((2, 3))
    set_output_std(head.bbox_head.fc_cls, pooled, 2.0)
    set_output_std(head.bbox_head.fc_reg, pooled, 0.3)
    ours, _ = our_c4()
    load_mapped(ours, c4_state_dict(ref))
    return ref.eval(), ours.eval()


@torch.no_grad()
def fpn_pair(x: torch.Tensor, meta: dict, seed: int = 0):
    ref = build_reference(fpn_cfg(), seed)
    head = ref.roi_head

    def run():
        features = ref.extract_feat(x)
        head._bbox_forward(features, CALIBRATION_ROIS)
        head._mask_forward(features, CALIBRATION_ROIS)

    calibrate(ref, run, seed + 1)
    features = ref.extract_feat(x)
    hidden = torch.cat([torch.relu(ref.rpn_head.rpn_conv(level)).flatten(2) for level in features], 2)[..., None]
    set_output_std(ref.rpn_head.rpn_cls, hidden, 2.0)
    set_output_std(ref.rpn_head.rpn_reg, hidden, 0.3)
    proposals = ref.rpn_head.simple_test_rpn(features, [meta])[0]
    rois = torch.cat([proposals.new_zeros(len(proposals), 1), proposals[:, :4]], dim=1)
    box_head, mask_head = head.bbox_head, head.mask_head
    hidden = head.bbox_roi_extractor(features[:4], rois)
    for conv in box_head.shared_convs:
        hidden = conv(hidden)
    hidden = torch.relu(box_head.shared_fcs[0](hidden.flatten(1)))
    set_output_std(box_head.fc_cls, hidden, 2.0)
    set_output_std(box_head.fc_reg, hidden, 0.3)
    hidden = head.mask_roi_extractor(features[:4], rois)
    for conv in mask_head.convs:
        hidden = conv(hidden)
    set_output_std(mask_head.conv_logits, torch.relu(mask_head.upsample(hidden)), 2.0)
    ours, _ = our_fpn()
    load_mapped(ours, fpn_state_dict(ref))
    return ref.eval(), ours.eval()


CALIBRATION_ROIS = torch.tensor([[0, 0, 0, 100, 100], [0, 20, 30, 150, 110], [0, 50, 10, 80, 60.0],
                                 [0, 5, 5, 30, 20]])
