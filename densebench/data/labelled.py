"""Labelled image lists as torch datasets, with per-sample augmentation seeds.

Shared by the linear probes (`protocols/linear_probe.py`) and the device-decode path
(`data/gpu_decode.py`), which must draw the same augmentation for the same sample.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from densebench.data.image import load_image


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for the augmentation of one sample in one epoch."""
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint64)
    return int(state[0]) & ((1 << 63) - 1)


class LabelledImages(Dataset):
    """(path, label) pairs -> (image tensor, label, index).

    The transform runs under a private torch RNG seeded from (seed, epoch, index), so the
    augmentation of a sample does not depend on the rank, the worker or the global RNG.
    """

    def __init__(self, items: Sequence[Tuple[Path, int]], transform: Callable, seed: int = 0):
        self.items = list(items)
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        path, label = self.items[index]
        image = load_image(path)
        with torch.random.fork_rng(devices=[]):     # CPU generator only; restored afterwards
            torch.default_generator.manual_seed(sample_seed(self.seed, self.epoch, index))
            tensor = self.transform(image)
        return tensor, int(label), index
