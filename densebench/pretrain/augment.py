"""The DenseCL / MoCo v2 two-view augmentation (PROTOCOLS.md 1.5), reproducible per sample.

Order: RandomResizedCrop(size, scale (0.2, 1), ratio (3/4, 4/3), bilinear) -> ColorJitter(0.4,
0.4, 0.4, 0.1; random op order) with p=0.8 -> RandomGrayscale p=0.2 (3 channels) -> PIL
GaussianBlur, radius sigma ~ U(0.1, 2.0), p=0.5 -> horizontal flip p=0.5 -> ToTensor ->
Normalize(ImageNet mean/std). No solarization. The two views are drawn independently.

Every random draw comes from a `random.Random` seeded from (seed, epoch, index), never from a
global generator, so a sample is identical whichever worker or process decodes it and
whether or not the run was resumed mid-epoch. The parameter distributions are torchvision's
(RandomResizedCrop.get_params, ColorJitter.get_params); the image operations are
torchvision.transforms.functional on PIL images and PIL's GaussianBlur.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Tuple

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter
from torchvision.transforms import InterpolationMode

from densebench.evaluate.backbone import IMAGENET_MEAN, IMAGENET_STD


@dataclass
class AugmentConfig:
    size: int = 224
    scale: Tuple[float, float] = (0.2, 1.0)
    ratio: Tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    jitter: Tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_sigma: Tuple[float, float] = (0.1, 2.0)
    blur_p: float = 0.5
    flip_p: float = 0.5


def sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    """A generator that depends only on (seed, epoch, index)."""
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(2)
    return random.Random(int(state[0]) << 32 | int(state[1]))


def resized_crop_params(rng: random.Random, width: int, height: int, scale, ratio):
    """torchvision RandomResizedCrop.get_params with `rng`: (top, left, h, w)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def color_jitter(rng: random.Random, img: Image.Image, strengths) -> Image.Image:
    """torchvision ColorJitter: factors from U(1-s, 1+s) (hue U(-h, h)), ops in random order."""
    brightness, contrast, saturation, hue = strengths
    order = list(range(4))
    rng.shuffle(order)
    factors = (rng.uniform(1 - brightness, 1 + brightness), rng.uniform(1 - contrast, 1 + contrast),
               rng.uniform(1 - saturation, 1 + saturation), rng.uniform(-hue, hue))
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for op_index in order:
        img = ops[op_index](img, factors[op_index])
    return img


def augment_view(rng: random.Random, img: Image.Image, cfg: AugmentConfig) -> torch.Tensor:
    """One augmented view as a normalised float tensor [3, size, size]."""
    top, left, h, w = resized_crop_params(rng, img.width, img.height, cfg.scale, cfg.ratio)
    view = TF.resized_crop(img, top, left, h, w, [cfg.size, cfg.size], InterpolationMode.BILINEAR)
    if rng.random() < cfg.jitter_p:
        view = color_jitter(rng, view, cfg.jitter)
    if rng.random() < cfg.grayscale_p:
        view = TF.rgb_to_grayscale(view, num_output_channels=3)
    if rng.random() < cfg.blur_p:
        view = view.filter(ImageFilter.GaussianBlur(radius=rng.uniform(*cfg.blur_sigma)))
    if rng.random() < cfg.flip_p:
        view = TF.hflip(view)
    return TF.normalize(TF.to_tensor(view), IMAGENET_MEAN, IMAGENET_STD)


def two_views(img: Image.Image, cfg: AugmentConfig, seed: int, epoch: int, index: int):
    """(query view, key view) of one image, determined by (seed, epoch, index)."""
    rng = sample_rng(seed, epoch, index)
    return augment_view(rng, img, cfg), augment_view(rng, img, cfg)
