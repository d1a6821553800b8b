"""Shared helpers of the pre-training tests (no tests here): a tiny ImageNet-style folder, small configs."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from PIL import Image

from densebench.pretrain.trainer import PretrainConfig


def write_image_folder(root: Path, num_images: int = 32, seed: int = 0) -> Path:
    """`root/train/<wnid>/*.JPEG`: smooth random colour images of varied sizes (4 classes)."""
    rng = np.random.default_rng(seed)
    for index in range(num_images):
        folder = root / "train" / f"n0000000{index % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        height, width = int(rng.integers(40, 72)), int(rng.integers(40, 72))
        coarse = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((width, height), Image.BILINEAR)
        img.save(folder / f"img_{index:04d}.JPEG", quality=90)
    return root


def small_config(**changes) -> PretrainConfig:
    """ResNet-18 at 32 px, batch 8, tiny queue: a few seconds per run on one CPU thread."""
    base = dict(arch="resnet18", epochs=2, batch_size=8, queue_len=32, image_size=32, feat_dim=16,
                hid_dim=32, bn_group_size=0, workers=0, checkpoint_interval=3, keep_epoch_interval=0)
    base.update(changes)
    return dataclasses.replace(PretrainConfig(), **base)
