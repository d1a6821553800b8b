"""Test-only stand-in for mmcv 1.7.2's compiled ops (`mmcv._ext`), built on torchvision.ops.

`install()` registers a module named `mmcv._ext` before mmcv is imported. Functions listed in
IMPLEMENTED provide the ops the reference models call at run time, with mmcv's ext signatures
(the callers are mmcv/ops/roi_align.py, nms.py, roi_pool.py: outputs are written in place into
tensors the caller allocated, keyword arguments named as there); any other attribute resolves to
a function that raises, so a reference model never runs an op that nobody checked.
test_peer_ops.py checks each against the op's documented semantics on hand-worked cases.

Why torchvision's kernels are the same computation (read against mmcv's
csrc/pytorch/cpu/roi_align.cpp and nms.cpp, which ship in the mmcv sdist):
- roi_align (avg mode): both start at x1 * scale - (0.5 if aligned), clamp the RoI size to >= 1
  only when not aligned, sample ceil(roi_size / pooled_size) points per bin when
  sampling_ratio == 0, drop samples outside [-1, size], clamp to the border, and divide by
  max(grid_h * grid_w, 1). mmcv additionally asserts a non-negative RoI size when aligned.
- nms: both sort by score (descending), suppress IoU > threshold and return the kept indices in
  score order; mmcv's `offset` adds 1 to widths and heights (offset 1 = shift x2, y2 by +1).
- roi_pool has no torchvision twin (torchvision rounds the RoI to integers, mmcv's CUDA kernel
  uses (x2 + 1) * scale with floor/ceil bin edges); it is written out from mmcv's kernel. No
  detector of the peer tests calls it.
"""
from __future__ import annotations

import math
import sys
import types

IMPLEMENTED: dict = {}


def _op(function):
    IMPLEMENTED[function.__name__] = function
    return function


@_op
def roi_align_forward(input, rois, output, argmax_y, argmax_x, aligned_height, aligned_width, spatial_scale,
                      sampling_ratio, pool_mode, aligned):
    import torch
    if pool_mode != 1:
        raise NotImplementedError("mmcv._ext.roi_align_forward: only pool_mode 'avg' has a stand-in")
    if aligned and bool(((rois[:, 3] - rois[:, 1] < 0) | (rois[:, 4] - rois[:, 2] < 0)).any()):
        raise ValueError("ROIs in ROIAlign cannot have non-negative size!")   # mmcv's AT_ASSERTM
    output.copy_(torch.ops.torchvision.roi_align(input, rois, float(spatial_scale), int(aligned_height),
                                                 int(aligned_width), int(sampling_ratio), bool(aligned)))


@_op
def roi_align_backward(grad_output, rois, argmax_y, argmax_x, grad_input, aligned_height, aligned_width,
                       spatial_scale, sampling_ratio, pool_mode, aligned):
    import torch
    if pool_mode != 1:
        raise NotImplementedError("mmcv._ext.roi_align_backward: only pool_mode 'avg' has a stand-in")
    n, c, h, w = grad_input.shape
    grad_input.copy_(torch.ops.torchvision._roi_align_backward(
        grad_output, rois, float(spatial_scale), int(aligned_height), int(aligned_width), n, c, h, w,
        int(sampling_ratio), bool(aligned)))


@_op
def nms(bboxes, scores, iou_threshold, offset):
    import torch
    import torchvision
    if bboxes.numel() == 0:
        return bboxes.new_zeros(0, dtype=torch.long)
    boxes = bboxes.float()
    if offset:
        boxes = torch.cat([boxes[:, :2], boxes[:, 2:] + float(offset)], dim=1)
    return torchvision.ops.nms(boxes, scores.float(), float(iou_threshold))


@_op
def roi_pool_forward(input, rois, output, argmax, pooled_height, pooled_width, spatial_scale):
    """mmcv's roi_pool_forward_cuda_kernel, one RoI bin at a time (small inputs only)."""
    height, width = input.shape[-2:]
    output.zero_()
    argmax.fill_(-1)
    for n, roi in enumerate(rois.tolist()):
        batch, x1, y1 = int(roi[0]), roi[1] * spatial_scale, roi[2] * spatial_scale
        roi_w = (roi[3] + 1) * spatial_scale - x1
        roi_h = (roi[4] + 1) * spatial_scale - y1
        if roi_w <= 0 or roi_h <= 0:
            continue
        bin_w, bin_h = roi_w / pooled_width, roi_h / pooled_height
        for ph in range(pooled_height):
            y_lo = min(max(math.floor(ph * bin_h + y1), 0), height)
            y_hi = min(max(math.ceil((ph + 1) * bin_h + y1), 0), height)
            for pw in range(pooled_width):
                x_lo = min(max(math.floor(pw * bin_w + x1), 0), width)
                x_hi = min(max(math.ceil((pw + 1) * bin_w + x1), 0), width)
                if y_hi <= y_lo or x_hi <= x_lo:
                    continue
                window = input[batch, :, y_lo:y_hi, x_lo:x_hi].reshape(input.shape[1], -1)
                value, index = window.max(dim=1)
                output[n, :, ph, pw] = value
                window_w = x_hi - x_lo
                argmax[n, :, ph, pw] = ((y_lo + index // window_w) * width + x_lo + index % window_w).int()


@_op
def roi_pool_backward(grad_output, rois, argmax, grad_input, pooled_height, pooled_width, spatial_scale):
    n_rois, channels = grad_output.shape[:2]
    flat = grad_input.view(grad_input.shape[0], channels, -1)
    batch = rois[:, 0].long()
    for n in range(n_rois):
        index = argmax[n].reshape(channels, -1).long()
        valid = index >= 0
        grad = grad_output[n].reshape(channels, -1) * valid
        flat[batch[n]].scatter_add_(1, index.clamp(min=0), grad)


def _missing(name: str):
    def raise_missing(*args, **kwargs):
        raise NotImplementedError(f"mmcv._ext.{name} has no stand-in in tests/peer/mmcv_ops_standin.py")

    return raise_missing


def install() -> None:
    if "mmcv._ext" in sys.modules:
        return
    ext = types.ModuleType("mmcv._ext")

    def module_getattr(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return IMPLEMENTED.get(name) or _missing(name)

    ext.__getattr__ = module_getattr
    sys.modules["mmcv._ext"] = ext
