"""FCN R50-D8 semantic segmentation transfer, shared by `seg_voc12aug_fcn` and `seg_cityscapes_fcn`.

PROTOCOLS.md sections 8 and 9 (the [0x]/[DCseg] mmsegmentation configs), rebuilt from torchvision
parts: a dilated ResNet with the standard 7x7 stem (section 12.10: not the ResNetV1c deep stem),
an FCN decode head on layer4 and an auxiliary FCN head on layer3, the mmseg training pipeline
(random rescale, cat_max_ratio crop, flip, PhotoMetricDistortion, normalise, pad), SGD with the
poly schedule, whole-image or sliding-window inference, and mIoU accumulated over the whole
validation set. Runs as one process or under torchrun (DDP, SyncBN on GPU; the batch is the
total over all GPUs, so BN sees the reference's 16 / 8 images at any GPU count), fp32 as the
reference (AMP on request), atomic checkpoints in `ctx.work_dir` and evaluation every
`eval_interval` iterations.

A protocol module supplies its `Config` (paper defaults) and the image/label pairs; everything
else lives here, top to bottom: data pipeline, model, loss, inference, metric, loop.

What the peer tests (tests/peer/test_peer_seg_*.py, against mmseg 0.30 / mmcv 1.7 with the
MMSelfSup 0.x benchmark configs) pin, each with its bound:
- train pipeline, same injected draws (rescale ratio, crop incl. cat_max_ratio re-draws and the
  10-retry fallback, flip, every photometric op, contrast first or last): same draws in the same
  order, label and 255 padding identical, network input within 1e-5 (mmcv multiplies by 1/std,
  we divide); resize and colour conversions equal OpenCV's integer/float32 arithmetic bit for bit.
  Only residue: HSV->RGB follows OpenCV's AVX2 block structure; a reference run on a CPU with
  another vector width differs by at most 1 grey level on pixels a saturation/hue op touched.
- test pipeline within 1e-5; JPEG/PNG decoding identical (Pillow vs cv2 / mmseg loaders).
- model: parameter count and every tensor mapped strictly; whole and slide logits (resized to
  the original size) within 1e-4, identical argmax; slide windows at the config's crop/stride
  and test size within 1e-5.
- loss (decode + 0.4 aux, ignore 255, averaged over ALL pixels as avg_non_ignore=False) within
  1e-5 relative; every gradient of one training step within 1e-4 relative.
- lr at each of the 20k / 40k iterations within 1e-12 relative of mmcv's PolyLrUpdaterHook; one
  SGD group with every parameter decayed, two steps identical.
- mIoU, aAcc, per-class IoU/Acc within 1e-12 relative of mmseg's mean_iou (ignore 255, classes
  absent from the labels, label values >= num_classes).
"""
from __future__ import annotations

import logging
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from tqdm import tqdm

from densebench import distributed as dist_utils
from densebench.config import config_dict
from densebench.errors import InputError
from densebench.evaluate.context import ProtocolOutput, RunContext
from densebench.io import torch_save_atomic

log = logging.getLogger(__name__)

IGNORE_INDEX = 255
# mmseg Normalize: ImageNet mean/std on 0-255 RGB (to_rgb=True)
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
# mmseg PhotoMetricDistortion defaults (PROTOCOLS.md section 8, "Train aug")
BRIGHTNESS_DELTA = 32
CONTRAST_RANGE = (0.5, 1.5)
SATURATION_RANGE = (0.5, 1.5)
HUE_DELTA = 18
CROP_RETRIES = 10  # mmseg RandomCrop: up to 10 re-draws for cat_max_ratio
STATE_FILE = "seg_train_state.pt"


# ----------------------------------------------------------------------------------------------
# Data pipeline (numpy uint8 HxWx3 RGB images, uint8 HxW label maps)
# ----------------------------------------------------------------------------------------------

def rescale_size(height: int, width: int, scale: Sequence[float]) -> Tuple[int, int]:
    """mmcv `imrescale` keep-ratio size: the largest size whose long edge fits max(scale) and
    whose short edge fits min(scale). Returns (new_height, new_width)."""
    long_bound, short_bound = max(scale), min(scale)
    factor = min(long_bound / max(height, width), short_bound / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


# OpenCV's 8-bit bilinear resize works in fixed point: 11-bit weights per axis, then the vertical
# pass scales each row sum down by 4 bits, multiplies by the 16-bit row weight keeping the high
# half, and rounds by 2 bits. Floating-point bilinear + rounding differs by one grey level on ~10%
# of pixels; this reproduces cv2.resize(INTER_LINEAR) bit for bit (tests/peer checks random sizes).
RESIZE_COEF_SCALE = 2048


def _linear_taps(src: int, dst: int, clamp: bool) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source indices (i0, i1) and fixed-point weights (w0, w1) per output position, as OpenCV
    computes them: centre (d + 0.5) * src / dst - 0.5 in float32; along x a centre outside the image
    takes the border pixel with weight 1 (`clamp`), along y the weights stay and the row index is
    clipped to the image."""
    centre = ((np.arange(dst) + 0.5) * (1.0 / (dst / src)) - 0.5).astype(np.float32)
    first = np.floor(centre).astype(np.int64)
    frac = (centre - first).astype(np.float32)
    if clamp:
        outside = (first < 0) | (first >= src - 1)
        frac[outside] = 0.0
        first = np.clip(first, 0, src - 1)
    w0 = np.rint((np.float32(1.0) - frac) * np.float32(RESIZE_COEF_SCALE)).astype(np.int32)
    w1 = np.rint(frac * np.float32(RESIZE_COEF_SCALE)).astype(np.int32)
    return np.clip(first, 0, src - 1), np.clip(first + 1, 0, src - 1), w0, w1


def resize_image(image: np.ndarray, size: Tuple[int, int], rows_per_chunk: int = 256) -> np.ndarray:
    """Bilinear resize of a uint8 HxWxC image to `size` (h, w), equal to cv2.resize(INTER_LINEAR),
    which mmcv's imrescale uses. Output rows are computed in chunks to bound memory."""
    if image.shape[:2] == tuple(size):
        return image
    height, width = size
    x0, x1, wx0, wx1 = _linear_taps(image.shape[1], width, clamp=True)
    y0, y1, wy0, wy1 = _linear_taps(image.shape[0], height, clamp=False)
    pixels = image.astype(np.int32)
    # horizontal pass on every source row, pre-shifted by 4 bits for the vertical pass
    rows = (pixels[:, x0] * wx0[None, :, None] + pixels[:, x1] * wx1[None, :, None]) >> 4
    out = np.empty((height, width) + image.shape[2:], dtype=np.uint8)
    for start in range(0, height, rows_per_chunk):
        part = slice(start, start + rows_per_chunk)
        shape = (-1,) + (1,) * (rows.ndim - 1)
        top = (rows[y0[part]] * wy0[part].reshape(shape)) >> 16
        bottom = (rows[y1[part]] * wy1[part].reshape(shape)) >> 16
        out[part] = np.clip((top + bottom + 2) >> 2, 0, 255)
    return out


def resize_label(label: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a label map, equal to cv2.resize(INTER_NEAREST): source index
    floor(d * src / dst) with the scale taken as 1 / (dst / src) in double, as OpenCV does."""
    if label.shape == tuple(size):
        return label
    (src_h, src_w), (height, width) = label.shape[:2], size
    ys = np.minimum(np.floor(np.arange(height) * (1.0 / (height / src_h))).astype(np.int64), src_h - 1)
    xs = np.minimum(np.floor(np.arange(width) * (1.0 / (width / src_w))).astype(np.int64), src_w - 1)
    return np.ascontiguousarray(label[ys][:, xs])


def random_rescale(image: np.ndarray, label: np.ndarray, scale: Sequence[int],
                   ratio_range: Sequence[float], rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """mmseg Resize(img_scale, ratio_range, keep_ratio=True): scale * U(ratio range), then imrescale."""
    ratio = rng.uniform(ratio_range[0], ratio_range[1])
    target = (int(scale[0] * ratio), int(scale[1] * ratio))
    size = rescale_size(image.shape[0], image.shape[1], target)
    return resize_image(image, size), resize_label(label, size)


def _crop_box(height: int, width: int, crop: Sequence[int], rng: np.random.Generator) -> Tuple[int, int, int, int]:
    margin_h, margin_w = max(height - crop[0], 0), max(width - crop[1], 0)
    top, left = int(rng.integers(0, margin_h + 1)), int(rng.integers(0, margin_w + 1))
    return top, min(top + crop[0], height), left, min(left + crop[1], width)


def random_crop(image: np.ndarray, label: np.ndarray, crop: Sequence[int], cat_max_ratio: float,
                rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """mmseg RandomCrop: a crop of at most `crop` (h, w); with cat_max_ratio < 1 the box is re-drawn
    up to 10 times until the crop holds more than one class and no class (255 ignored) covers
    `cat_max_ratio` or more of it. After 10 failures the last re-drawn box is used, as in mmseg."""
    box = _crop_box(image.shape[0], image.shape[1], crop, rng)
    if cat_max_ratio < 1.0:
        for _ in range(CROP_RETRIES):
            top, bottom, left, right = box
            values, counts = np.unique(label[top:bottom, left:right], return_counts=True)
            counts = counts[values != IGNORE_INDEX]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            box = _crop_box(image.shape[0], image.shape[1], crop, rng)
    top, bottom, left, right = box
    return image[top:bottom, left:right], label[top:bottom, left:right]


def _convert(values: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """mmseg PhotoMetricDistortion.convert: scale and shift in float, clip to 0-255, truncate to uint8."""
    return np.clip(values.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


# OpenCV's 8-bit RGB->HSV divides through lookup tables with 12 fractional bits.
HSV_SHIFT = 12
_DIVISORS = np.maximum(np.arange(256), 1).astype(np.float64)
_SAT_TABLE = np.where(np.arange(256) > 0, np.rint((255 << HSV_SHIFT) / _DIVISORS), 0).astype(np.int64)
_HUE_TABLE = np.where(np.arange(256) > 0, np.rint((180 << HSV_SHIFT) / (6.0 * _DIVISORS)), 0).astype(np.int64)
# HSV->RGB: for hue sector 0..5, which of (v, p, q, t) is (r, g, b); pixels per vector block
# (8 float lanes x 4) of OpenCV's AVX2 code
OPENCV_HSV_BLOCK = 32
_HSV_SECTORS = np.array([[0, 3, 1], [2, 0, 1], [1, 0, 3], [1, 2, 0], [3, 1, 0], [0, 1, 2]])


def rgb_to_hsv_opencv(image: np.ndarray) -> np.ndarray:
    """uint8 RGB -> uint8 HSV exactly as cv2.COLOR_RGB2HSV: H in [0, 180) (degrees / 2), S and V
    in [0, 255], in OpenCV's integer arithmetic (checked against cv2 on every RGB value)."""
    rgb = image.astype(np.int64)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    value = rgb.max(axis=-1)
    diff = value - rgb.min(axis=-1)
    half = 1 << (HSV_SHIFT - 1)
    saturation = (diff * _SAT_TABLE[value] + half) >> HSV_SHIFT
    hue = np.where(value == r, g - b, np.where(value == g, b - r + 2 * diff, r - g + 4 * diff))
    hue = (hue * _HUE_TABLE[diff] + half) >> HSV_SHIFT
    hue = np.where(hue < 0, hue + 180, hue)
    return np.stack([hue, saturation, value], axis=-1).astype(np.uint8)


def hsv_opencv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """uint8 HSV (OpenCV 8-bit: H in [0, 180)) -> uint8 RGB exactly as cv2.COLOR_HSV2RGB does it on
    an AVX2 CPU (opencv-python's usual dispatch): float32 arithmetic in which `1 - s * x` is one
    fused multiply-add (emulated in double); each image row goes in blocks of
    `OPENCV_HSV_BLOCK` pixels through the vector code, which TRUNCATES v * 255, and the last
    width % 32 pixels of the row through the scalar code, which rounds half to even. mmseg's
    PhotoMetricDistortion goes through this conversion; tests/peer checks it on every HSV value."""
    f32 = np.float32
    hue = hsv[..., 0].astype(f32) * f32(6.0 / 180.0)
    sat = hsv[..., 1].astype(f32) * f32(1.0 / 255.0)
    val = hsv[..., 2].astype(f32) * f32(1.0 / 255.0)
    sector = np.floor(hue)
    frac = (hue - sector).astype(f32)
    sector = sector.astype(np.int64) % 6
    sat64 = sat.astype(np.float64)
    p = (1.0 - sat64).astype(f32) * val
    q = (1.0 - sat64 * frac.astype(np.float64)).astype(f32) * val
    t = (1.0 - sat64 * (f32(1.0) - frac).astype(np.float64)).astype(f32) * val
    table = np.stack([val, p, q, t], axis=-1)
    rgb = np.take_along_axis(table, _HSV_SECTORS[sector], axis=-1) * f32(255.0)
    vector_part = (np.arange(hsv.shape[-2]) < hsv.shape[-2] // OPENCV_HSV_BLOCK * OPENCV_HSV_BLOCK)[:, None]
    return np.clip(np.where(vector_part, np.trunc(rgb), np.rint(rgb)), 0, 255).astype(np.uint8)


def photometric_distortion(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """mmseg PhotoMetricDistortion: brightness, contrast (2nd or last, chosen at random),
    saturation, hue; each applied with probability 0.5; uint8 in and out."""
    if rng.integers(2):
        image = _convert(image, beta=rng.uniform(-BRIGHTNESS_DELTA, BRIGHTNESS_DELTA))
    contrast_first = bool(rng.integers(2))
    if contrast_first and rng.integers(2):
        image = _convert(image, alpha=rng.uniform(*CONTRAST_RANGE))
    if rng.integers(2):
        hsv = rgb_to_hsv_opencv(image)
        hsv[..., 1] = _convert(hsv[..., 1], alpha=rng.uniform(*SATURATION_RANGE))
        image = hsv_opencv_to_rgb(hsv)
    if rng.integers(2):
        hsv = rgb_to_hsv_opencv(image)
        # np.random.randint(-18, 18) in mmseg: the upper bound is exclusive
        hsv[..., 0] = ((hsv[..., 0].astype(np.int64) + int(rng.integers(-HUE_DELTA, HUE_DELTA))) % 180).astype(np.uint8)
        image = hsv_opencv_to_rgb(hsv)
    if not contrast_first and rng.integers(2):
        image = _convert(image, alpha=rng.uniform(*CONTRAST_RANGE))
    return image


def normalize_image(image: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 RGB -> float CxHxW normalised with the ImageNet mean/std on 0-255."""
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()
    mean = torch.tensor(PIXEL_MEAN).view(3, 1, 1)
    std = torch.tensor(PIXEL_STD).view(3, 1, 1)
    return (tensor - mean) / std


def pad_to(image: torch.Tensor, label: np.ndarray, size: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pad bottom/right to `size`: image with 0 (after normalisation, as mmseg), label with 255."""
    height, width = label.shape
    pad_h, pad_w = max(size[0] - height, 0), max(size[1] - width, 0)
    image = F.pad(image, (0, pad_w, 0, pad_h), value=0.0)
    label_t = F.pad(torch.from_numpy(label.astype(np.int64)), (0, pad_w, 0, pad_h), value=IGNORE_INDEX)
    return image, label_t


def train_transform(image: np.ndarray, label: np.ndarray, cfg: Any,
                    rng: np.random.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """The mmseg train pipeline after loading: rescale, crop, flip, photometric distortion,
    normalise, pad. Every random draw comes from `rng`, in mmseg's order (the peer test replays
    the same draws through mmseg's own transforms)."""
    image, label = random_rescale(image, label, cfg.train_scale, cfg.ratio_range, rng)
    image, label = random_crop(image, label, cfg.crop_size, cfg.cat_max_ratio, rng)
    if rng.random() < cfg.flip_prob:
        image, label = image[:, ::-1], label[:, ::-1]
    if cfg.photometric_distortion:
        image = photometric_distortion(image, rng)
    return pad_to(normalize_image(image), label, cfg.crop_size)


def val_transform(image: np.ndarray, test_scale: Sequence[int]) -> torch.Tensor:
    """The mmseg test pipeline: keep-ratio resize to the test scale, normalise (no padding)."""
    size = rescale_size(image.shape[0], image.shape[1], test_scale)
    return normalize_image(resize_image(image, size))


def load_pair(image_path: Path, label_path: Path, num_classes: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Decode one image/label pair; a size mismatch, or (given `num_classes`) a label value that is
    neither a class nor IGNORE_INDEX, is bad input naming the label file. Checked on every load:
    `data check` samples only a few labels, and a stray value would otherwise stop training with
    a bare `IndexError: Target 60 is out of bounds` (or be dropped silently by the metric)."""
    from densebench.data.cityscapes import read_cityscapes_label
    from densebench.data.image import load_image

    image = np.array(load_image(image_path), dtype=np.uint8)
    # Label indices of any palette/L PNG; a Cityscapes `_labelIds.png` (used when labelTrainIds
    # were not generated) is converted to train ids, never trained on as raw ids.
    label = np.asarray(read_cityscapes_label(label_path), dtype=np.uint8)
    if image.shape[:2] != label.shape[:2]:
        raise InputError(label_path, f"label is {label.shape[1]}x{label.shape[0]} but its image "
                                     f"{image_path} is {image.shape[1]}x{image.shape[0]}")
    if num_classes is not None:
        stray = np.unique(label[(label >= num_classes) & (label != IGNORE_INDEX)])
        if stray.size:
            raise InputError(label_path, f"label values {stray[:5].tolist()} are neither classes 0..{num_classes - 1} "
                                         f"nor the ignore index {IGNORE_INDEX}")
    return image, label


class SegTrainDataset(torch.utils.data.Dataset):
    """Training pairs through the mmseg train pipeline. Items are addressed as (index, draw_seed)
    so every augmentation is a function of the seed alone: identical with any worker count and
    exactly repeatable after a resume."""

    def __init__(self, pairs: Sequence[Tuple[Path, Path]], cfg: Any):
        self.pairs = list(pairs)
        self.cfg = cfg

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, item: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
        index, draw_seed = item
        image, label = load_pair(*self.pairs[index], self.cfg.num_classes)
        return train_transform(image, label, self.cfg, np.random.default_rng(draw_seed))


class SegValDataset(torch.utils.data.Dataset):
    """Validation pairs: image rescaled to the test scale (keep ratio) and normalised; the label
    stays at the original size (the metric compares at the original size)."""

    def __init__(self, pairs: Sequence[Tuple[Path, Path]], test_scale: Sequence[int], num_classes: Optional[int] = None):
        self.pairs = list(pairs)
        self.test_scale = test_scale
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        image, label = load_pair(*self.pairs[index], self.num_classes)
        return val_transform(image, self.test_scale), torch.from_numpy(label.astype(np.int64))


class TrainBatchSampler(torch.utils.data.Sampler):
    """Per-rank batches for iterations [start, total): epochs of seeded permutations, padded to a
    multiple of the world size and split by rank (as DistributedSampler), each item paired with a
    draw seed derived from (seed, rank, position in the stream)."""

    def __init__(self, num_items: int, batch_per_rank: int, rank: int, world: int, seed: int,
                 start_iteration: int, total_iterations: int):
        self.num_items, self.batch, self.rank, self.world = num_items, batch_per_rank, rank, world
        self.seed, self.start, self.total = seed, start_iteration, total_iterations
        self.per_rank = math.ceil(num_items / world)

    def __len__(self) -> int:
        return max(self.total - self.start, 0)

    def _epoch_indices(self, epoch: int) -> List[int]:
        generator = torch.Generator().manual_seed(self.seed * 100003 + epoch)
        order = torch.randperm(self.num_items, generator=generator).tolist()
        padded = (order * math.ceil(self.per_rank * self.world / self.num_items))[: self.per_rank * self.world]
        return padded[self.rank::self.world]

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        position = self.start * self.batch
        epoch, cached = -1, []
        for _ in range(len(self)):
            batch = []
            for _ in range(self.batch):
                if position // self.per_rank != epoch:
                    epoch = position // self.per_rank
                    cached = self._epoch_indices(epoch)
                draw_seed = zlib.crc32(f"{self.seed}/{self.rank}/{position}".encode())
                batch.append((cached[position % self.per_rank], draw_seed))
                position += 1
            yield batch


# ----------------------------------------------------------------------------------------------
# Model: dilated ResNet (standard stem) + FCN decode head + auxiliary FCN head
# ----------------------------------------------------------------------------------------------

def block_dilations(num_blocks: int, dilation: int, contract_dilation: bool) -> List[int]:
    """mmseg ResLayer: with contract_dilation the first block uses dilation // 2 (when dilation > 1)."""
    first = dilation // 2 if (contract_dilation and dilation > 1) else dilation
    return [first] + [dilation] * (num_blocks - 1)


def _set_conv(conv: nn.Conv2d, stride: int, dilation: int) -> None:
    conv.stride = (stride, stride)
    if conv.kernel_size[0] > 1:
        conv.dilation = (dilation, dilation)
        conv.padding = (dilation, dilation)


def set_stage_geometry(stage: nn.Sequential, stride: int, dilation: int, contract_dilation: bool) -> None:
    """Give every block of one ResNet stage its stride and dilation, mmseg style.

    Bottleneck (pytorch style): stride and dilation on the 3x3 conv2. BasicBlock: stride and
    dilation on conv1, conv2 keeps dilation 1 (mmseg BasicBlock). The downsample 1x1 conv of the
    first block takes the stage stride. Parameter shapes and names are unchanged, so torchvision
    state dicts load strictly."""
    for index, (block, block_dilation) in enumerate(zip(stage, block_dilations(len(stage), dilation, contract_dilation))):
        block_stride = stride if index == 0 else 1
        if isinstance(block, torchvision.models.resnet.Bottleneck):
            _set_conv(block.conv2, block_stride, block_dilation)
        elif isinstance(block, torchvision.models.resnet.BasicBlock):
            _set_conv(block.conv1, block_stride, block_dilation)
        else:
            raise TypeError(f"unsupported ResNet block {type(block).__name__}")
        block.stride = block_stride
        if block.downsample is not None:
            block.downsample[0].stride = (block_stride, block_stride)


def build_dilated_resnet(arch: str, strides: Sequence[int] = (1, 2, 1, 1), dilations: Sequence[int] = (1, 1, 2, 4),
                         contract_dilation: bool = True) -> nn.Module:
    """A torchvision ResNet (standard 7x7 stem, fc removed) turned into ResNet-D8:
    layer1..4 strides (1, 2, 1, 1) and dilations (1, 1, 2, 4), output stride 8."""
    if not hasattr(torchvision.models, arch) or not arch.startswith(("resnet", "wide_resnet", "resnext")):
        raise InputError(None, f"unknown ResNet arch {arch!r}")
    model = getattr(torchvision.models, arch)(weights=None)
    model.fc = nn.Identity()
    for stage, stride, dilation in zip((model.layer1, model.layer2, model.layer3, model.layer4), strides, dilations):
        set_stage_geometry(stage, stride, dilation, contract_dilation)
    return model


def stage_channels(resnet: nn.Module) -> Tuple[int, int]:
    """(layer3, layer4) output channels, read from the model (1024/2048 for ResNet-50, 256/512 for ResNet-18)."""
    def out_channels(stage: nn.Sequential) -> int:
        last = stage[-1]
        return (last.bn3 if hasattr(last, "bn3") else last.bn2).num_features
    return out_channels(resnet.layer3), out_channels(resnet.layer4)


def conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """mmcv ConvModule(3x3, padding 1, no bias, BN, ReLU) with its init: Kaiming normal fan_out, BN 1/0."""
    conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    bn = nn.BatchNorm2d(out_channels)
    return nn.Sequential(conv, bn, nn.ReLU(inplace=True))


class FCNHead(nn.Module):
    """mmseg FCNHead: num_convs x ConvModule(3x3), optional concat of the input with the conv output
    followed by one more ConvModule, Dropout2d, then a 1x1 classifier (init normal std 0.01, bias 0)."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, num_convs: int,
                 concat_input: bool, dropout: float):
        super().__init__()
        self.convs = nn.Sequential(*[conv_bn_relu(in_channels if i == 0 else channels, channels)
                                     for i in range(num_convs)])
        self.conv_cat = conv_bn_relu(in_channels + channels, channels) if concat_input else None
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out = self.convs(features)
        if self.conv_cat is not None:
            out = self.conv_cat(torch.cat([features, out], dim=1))
        return self.conv_seg(self.dropout(out))


class FCNSegmentor(nn.Module):
    """Dilated ResNet backbone, FCN decode head on layer4 and auxiliary FCN head on layer3."""

    def __init__(self, backbone: nn.Module, num_classes: int, head_channels: int = 512, aux_channels: int = 256,
                 dropout: float = 0.1, align_corners: bool = False):
        super().__init__()
        self.backbone = backbone
        c3, c4 = stage_channels(backbone)
        self.decode_head = FCNHead(c4, head_channels, num_classes, num_convs=2, concat_input=True, dropout=dropout)
        self.aux_head = FCNHead(c3, aux_channels, num_classes, num_convs=1, concat_input=False, dropout=dropout)
        self.num_classes = num_classes
        self.align_corners = align_corners

    def backbone_features(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        net = self.backbone
        x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        c3 = net.layer3(net.layer2(net.layer1(x)))
        return c3, net.layer4(c3)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Training forward: (decode logits, aux logits) at the feature resolution (1/8)."""
        c3, c4 = self.backbone_features(x)
        return self.decode_head(c4), self.aux_head(c3)

    def encode_decode(self, x: torch.Tensor) -> torch.Tensor:
        """Inference: decode-head logits resized to the input size (mmseg encode_decode)."""
        _, c4 = self.backbone_features(x)
        logits = self.decode_head(c4)
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=self.align_corners)


def build_segmentor(arch: str, backbone_state: Dict[str, torch.Tensor], cfg: Any) -> FCNSegmentor:
    """The FCN-D8 model with the checkpoint's backbone loaded strictly (every tensor must match)."""
    backbone = build_dilated_resnet(arch, contract_dilation=True)
    backbone.load_state_dict(backbone_state, strict=True)
    return FCNSegmentor(backbone, cfg.num_classes, cfg.head_channels, cfg.aux_channels, cfg.dropout, cfg.align_corners)


# ----------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------

def seg_cross_entropy(logits: torch.Tensor, label: torch.Tensor, align_corners: bool,
                      average: str = "all") -> torch.Tensor:
    """Pixel-wise CE on logits bilinearly upsampled to the label size, 255 ignored.
    average "all" (the reference): sum over the valid pixels divided by ALL pixels, ignored and
    padding included, as mmseg 0.x CrossEntropyLoss with its default avg_non_ignore=False, which
    the benchmark configs use; "valid": divided by the valid pixels (avg_non_ignore=True)."""
    logits = F.interpolate(logits.float(), size=label.shape[-2:], mode="bilinear", align_corners=align_corners)
    per_pixel = F.cross_entropy(logits, label, ignore_index=IGNORE_INDEX, reduction="none")
    if average == "all":
        return per_pixel.mean()
    valid = (label != IGNORE_INDEX).sum()
    return per_pixel.sum() / valid.clamp(min=1)


def fcn_loss(model_out: Tuple[torch.Tensor, torch.Tensor], label: torch.Tensor, cfg: Any) -> torch.Tensor:
    decode_logits, aux_logits = model_out
    loss = seg_cross_entropy(decode_logits, label, cfg.align_corners, cfg.loss_average)
    return loss + cfg.aux_loss_weight * seg_cross_entropy(aux_logits, label, cfg.align_corners, cfg.loss_average)


# ----------------------------------------------------------------------------------------------
# Inference: whole image or sliding window, logits resized to the original size, argmax
# ----------------------------------------------------------------------------------------------

def window_boxes(height: int, width: int, crop: Sequence[int], stride: Sequence[int]) -> List[Tuple[int, int, int, int]]:
    """mmseg slide_inference windows (y1, y2, x1, x2): a grid at `stride`, the last window of a row or
    column shifted back to end at the image border; a window is clipped to the image when the image
    is smaller than the crop."""
    h_grids = max(height - crop[0] + stride[0] - 1, 0) // stride[0] + 1
    w_grids = max(width - crop[1] + stride[1] - 1, 0) // stride[1] + 1
    boxes = []
    for h_index in range(h_grids):
        for w_index in range(w_grids):
            y2 = min(h_index * stride[0] + crop[0], height)
            x2 = min(w_index * stride[1] + crop[1], width)
            boxes.append((max(y2 - crop[0], 0), y2, max(x2 - crop[1], 0), x2))
    return boxes


def slide_logits(encode: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, num_classes: int,
                 crop: Sequence[int], stride: Sequence[int], windows_per_batch: int = 4) -> torch.Tensor:
    """Sum the logits of every window into the full map and divide by how many windows cover each
    pixel. All windows of one image have the same size, so they run in small batches."""
    _, _, height, width = image.shape
    summed = image.new_zeros((1, num_classes, height, width), dtype=torch.float32)
    count = image.new_zeros((1, 1, height, width), dtype=torch.float32)
    boxes = window_boxes(height, width, crop, stride)
    for start in range(0, len(boxes), windows_per_batch):
        chunk = boxes[start:start + windows_per_batch]
        crops = torch.cat([image[:, :, y1:y2, x1:x2] for y1, y2, x1, x2 in chunk])
        logits = encode(crops).float()
        for (y1, y2, x1, x2), window in zip(chunk, logits):
            summed[0, :, y1:y2, x1:x2] += window
            count[0, :, y1:y2, x1:x2] += 1
    if bool((count == 0).any()):
        raise RuntimeError("sliding windows left pixels uncovered")
    return summed / count


def predict_logits(encode: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, original_size: Sequence[int],
                   num_classes: int, mode: str, align_corners: bool, crop: Sequence[int] = (769, 769),
                   stride: Sequence[int] = (513, 513)) -> torch.Tensor:
    """Logits [1, C, H, W] at the original size: whole-image or sliding-window logits at the test
    size, resized bilinearly to the original size (mmseg's inference with rescale=True)."""
    if mode == "whole":
        logits = encode(image).float()
    elif mode == "slide":
        logits = slide_logits(encode, image, num_classes, crop, stride)
    else:
        raise InputError(None, f"unknown test mode {mode!r} (whole or slide)")
    return F.interpolate(logits, size=tuple(original_size), mode="bilinear", align_corners=align_corners)


def predict(encode: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, original_size: Sequence[int],
            num_classes: int, mode: str, align_corners: bool, crop: Sequence[int] = (769, 769),
            stride: Sequence[int] = (513, 513)) -> torch.Tensor:
    """Class map [H, W] at the original size: argmax of `predict_logits`."""
    return predict_logits(encode, image, original_size, num_classes, mode, align_corners, crop, stride).argmax(dim=1)[0]


# ----------------------------------------------------------------------------------------------
# Metric: per-class intersection/union accumulated over the whole validation set
# ----------------------------------------------------------------------------------------------

def intersect_and_union(pred: torch.Tensor, label: torch.Tensor, num_classes: int,
                        ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Per-class pixel counts [4, C]: intersection, union, prediction area, label area, over the
    pixels whose label is not `ignore_index` (label values >= C count nowhere, as mmseg's histc)."""
    pred, label = torch.as_tensor(pred).long().flatten(), torch.as_tensor(label).long().flatten()
    keep = label != ignore_index
    pred, label = pred[keep], label[keep]

    def area(values: torch.Tensor) -> torch.Tensor:
        values = values[(values >= 0) & (values < num_classes)]
        return torch.bincount(values, minlength=num_classes)[:num_classes]

    intersect = area(pred[pred == label])
    area_pred, area_label = area(pred), area(label)
    return torch.stack([intersect, area_pred + area_label - intersect, area_pred, area_label]).double()


def summarize_iou(areas: torch.Tensor, class_names: Sequence[str]) -> Dict[str, Any]:
    """mIoU = nan-mean over classes of sum(I)/sum(U) (a class absent from both prediction and label
    has union 0, IoU nan, and is left out); aAcc = sum(I) / sum(label area). Percent."""
    areas = areas.double().cpu()
    intersect, union, _, area_label = areas
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = (intersect / union).numpy()
        acc = (intersect / area_label).numpy()
    total_label = float(area_label.sum())
    return {
        "mIoU": _nan_to_none(100.0 * float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")),
        "aAcc": _nan_to_none(100.0 * float(intersect.sum()) / total_label if total_label > 0 else float("nan")),
        "per_class_IoU": {name: _nan_to_none(100.0 * float(v)) for name, v in zip(class_names, iou)},
        "per_class_Acc": {name: _nan_to_none(100.0 * float(v)) for name, v in zip(class_names, acc)},
    }


def _nan_to_none(value: float) -> Optional[float]:
    """JSON has no NaN: a class with no pixels on either side is recorded as null."""
    return None if value is None or not math.isfinite(value) else value


def mean_iou(preds: Sequence[Any], labels: Sequence[Any], num_classes: int,
             class_names: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Convenience: accumulate over pairs of (prediction, label) maps and summarise."""
    areas = torch.zeros(4, num_classes, dtype=torch.float64)
    for pred, label in zip(preds, labels):
        areas += intersect_and_union(torch.as_tensor(np.asarray(pred)), torch.as_tensor(np.asarray(label)), num_classes)
    names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
    return summarize_iou(areas, names)


# ----------------------------------------------------------------------------------------------
# Loop: train, evaluate periodically, checkpoint/resume
# ----------------------------------------------------------------------------------------------

def poly_lr(iteration: int, total: int, base_lr: float, min_lr: float, power: float) -> float:
    """mmcv PolyLrUpdaterHook (by iteration): (base - min) * (1 - it / total) ** power + min."""
    return (base_lr - min_lr) * (1 - iteration / total) ** power + min_lr


def scheduled_lr(iteration: int, cfg: Any) -> float:
    """The lr of (0-based) `iteration`, set before its step; no warmup (the configs have none)."""
    return poly_lr(iteration, cfg.iterations, cfg.lr, cfg.min_lr, cfg.poly_power)


@dataclass
class SegData:
    """What a protocol module hands to `run_segmentation`."""
    train_pairs: List[Tuple[Path, Path]]
    val_pairs: List[Tuple[Path, Path]]
    class_names: List[str]
    splits: Dict[str, int]


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device_type=device.type, dtype=torch.float16, enabled=enabled and device.type == "cuda")


@torch.no_grad()
def evaluate(model: FCNSegmentor, val_pairs: Sequence[Tuple[Path, Path]], cfg: Any, class_names: Sequence[str],
             device: torch.device, num_workers: int = 0, show_progress: bool = False) -> Dict[str, Any]:
    """Predict every validation image (sharded over ranks), sum the per-class areas over ranks, summarise."""
    was_training = model.training
    model.eval()
    use_amp = cfg.amp and device.type == "cuda"
    dataset = SegValDataset(val_pairs, cfg.test_scale, cfg.num_classes)
    shard = list(range(dist_utils.rank(), len(dataset), dist_utils.world_size()))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, shard), batch_size=None,
                                         num_workers=num_workers, generator=torch.Generator().manual_seed(0))
    areas = torch.zeros(4, cfg.num_classes, dtype=torch.float64, device=device)

    def encode(x: torch.Tensor) -> torch.Tensor:
        with _autocast(device, use_amp):
            return model.encode_decode(x)

    for image, label in tqdm(loader, desc="seg eval", disable=not show_progress or not dist_utils.is_main()):
        label = label.to(device)
        pred = predict(encode, image[None].to(device), label.shape, cfg.num_classes, cfg.test_mode,
                       cfg.align_corners, cfg.slide_crop, cfg.slide_stride)
        areas += intersect_and_union(pred, label, cfg.num_classes)
    if dist_utils.is_dist():
        torch.distributed.all_reduce(areas)
    model.train(was_training)
    return summarize_iou(areas, class_names)


def _load_resume_state(path: Path, expected: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key, value in expected.items():
        if state.get(key) != value:
            raise InputError(path, f"resume state was written with another {key}; delete it or use another work dir")
    return state


def _save_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: Any, iteration: int,
                history: List[Dict[str, Any]], last_eval: Optional[Dict[str, Any]], identity: Dict[str, Any]) -> None:
    if dist_utils.is_main():
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                 "iteration": iteration, "history": history, "last_eval": last_eval,
                 "torch_rng": torch.get_rng_state(), **identity}
        torch_save_atomic(state, path)
    dist_utils.barrier()


def _train_loader(data: SegData, cfg: Any, ctx: RunContext, start: int, batch_per_rank: int) -> torch.utils.data.DataLoader:
    sampler = TrainBatchSampler(len(data.train_pairs), batch_per_rank, dist_utils.rank(), dist_utils.world_size(),
                                ctx.seed, start, cfg.iterations)
    # an own generator: creating the iterator must not consume the global RNG (exact resume)
    return torch.utils.data.DataLoader(SegTrainDataset(data.train_pairs, cfg), batch_sampler=sampler,
                                       num_workers=ctx.num_workers, pin_memory=ctx.device.type == "cuda",
                                       generator=torch.Generator().manual_seed(ctx.seed))


def _prepare_model(ctx: RunContext, cfg: Any) -> Tuple[FCNSegmentor, Any, bool]:
    torch.manual_seed(ctx.seed)
    backbone_state, info = ctx.backbone_state_dict()
    model = build_segmentor(info.arch, backbone_state, cfg)
    sync_bn = bool(cfg.sync_bn and dist_utils.is_dist() and ctx.device.type == "cuda")
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model.to(ctx.device), info, sync_bn


def build_optimizer(model: nn.Module, cfg: Any) -> torch.optim.SGD:
    """SGD with one group: every parameter, BN and biases included, gets the same lr, momentum
    and weight decay (mmcv's DefaultOptimizerConstructor without paramwise_cfg)."""
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def run_segmentation(ctx: RunContext, cfg: Any, protocol: str, data: SegData) -> ProtocolOutput:
    """Train FCN-D8 from the checkpoint's backbone, evaluate every `eval_interval` iterations and at the
    end, and return the final mIoU/aAcc (per-class IoU and the evaluation history in `extra`)."""
    if not data.train_pairs or not data.val_pairs:
        raise InputError(ctx.data_root, f"{protocol}: no training or validation images found")
    world = dist_utils.world_size()
    if cfg.batch_size % world:
        raise InputError(None, f"{protocol}: batch_size {cfg.batch_size} is not divisible by the world size {world}")
    batch_per_rank = cfg.batch_size // world
    device = ctx.device
    model, info, sync_bn = _prepare_model(ctx, cfg)
    optimizer = build_optimizer(model, cfg)
    use_amp = bool(cfg.amp and device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp)

    state_path = Path(ctx.work_dir) / STATE_FILE
    identity = {"protocol": protocol, "config": config_dict(cfg), "backbone_hash": info.backbone_hash,
                "world_size": world, "seed": ctx.seed}
    state = _load_resume_state(state_path, identity)
    start, history, last_eval = 0, [], None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"])
        start, history, last_eval = state["iteration"], state["history"], state["last_eval"]
        log.info("%s: resuming at iteration %d from %s", protocol, start, state_path)

    train_model: nn.Module = model
    if dist_utils.is_dist():
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    model.train()
    loader = _train_loader(data, cfg, ctx, start, batch_per_rank)
    progress = tqdm(loader, total=len(loader.batch_sampler), initial=0, desc=f"{protocol} train",
                    disable=not ctx.show_progress or not dist_utils.is_main())
    iteration = start
    for images, labels in progress:
        for group in optimizer.param_groups:
            group["lr"] = scheduled_lr(iteration, cfg)
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with _autocast(device, use_amp):
            out = train_model(images)
        loss = fcn_loss(out, labels, cfg)
        if not torch.isfinite(loss):
            raise RuntimeError(f"{protocol}: loss is {loss.item()} at iteration {iteration}")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        iteration += 1
        progress.set_postfix(loss=f"{loss.item():.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        done = iteration == cfg.iterations
        if iteration % cfg.eval_interval == 0 or done:
            last_eval = evaluate(model, data.val_pairs, cfg, data.class_names, device, ctx.num_workers, ctx.show_progress)
            last_eval["iteration"] = iteration
            history.append({"iteration": iteration, "mIoU": last_eval["mIoU"], "aAcc": last_eval["aAcc"]})
            log.info("%s: iteration %d mIoU %s aAcc %s", protocol, iteration, last_eval["mIoU"], last_eval["aAcc"])
        if iteration % cfg.checkpoint_interval == 0 or done:
            _save_state(state_path, model, optimizer, scaler, iteration, history, last_eval, identity)
    if last_eval is None or last_eval.get("iteration") != cfg.iterations:
        last_eval = evaluate(model, data.val_pairs, cfg, data.class_names, device, ctx.num_workers, ctx.show_progress)
        last_eval["iteration"] = cfg.iterations

    return ProtocolOutput(
        metrics={"mIoU": last_eval["mIoU"], "aAcc": last_eval["aAcc"], "iteration": last_eval["iteration"]},
        data={"root": str(ctx.data_root), "splits": dict(data.splits)},
        extra={"class_names": list(data.class_names),
               "per_class_IoU": last_eval["per_class_IoU"], "per_class_Acc": last_eval["per_class_Acc"],
               "history": history, "sync_bn": sync_bn, "amp": use_amp, "batch_per_gpu": batch_per_rank,
               "backbone_arch": info.arch, "resumed_from": start},
    )
