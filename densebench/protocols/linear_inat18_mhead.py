"""iNaturalist-2018 multi-head linear probe on Feature1..Feature5 (PROTOCOLS.md 4,
[0x] `resnet50_mhead_8xb32-steplr-84e_inat18`).

The model is that of 3a (five heads, specified pooling, synced BatchNorm(affine=False),
Linear -> 8142); 84 epochs, steps [24, 48, 72]. No published DenseCL numbers. The reference
evaluated every 10 epochs and not at the end (last at epoch 80): the metrics are epoch 80's,
the final epoch's are kept under `at_final_epoch` (linear_probe.probe_metrics).
Trainer: `linear_probe`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Tuple

from torchvision import transforms as T

from densebench.config import Fraction, Milestones, NonNegativeFloat, PositiveInt
from densebench.evaluate.context import ProtocolOutput, RunContext
from densebench.protocols.linear_probe import POOLINGS, crop_flip_transform, load_probe_data, run_probe

NAME = "linear_inat18_mhead"


@dataclass
class Config:
    num_classes: PositiveInt = 8142                 # 4: 8142 classes
    epochs: PositiveInt = 84                        # 4
    lr: float = 0.01                                # 4: SGD 0.01
    momentum: Fraction = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = True
    lr_steps: Milestones = (24, 48, 72)             # 4: x0.1 each
    lr_gamma: float = 0.1
    batch_size: PositiveInt = 256                   # global batch, 32 x 8 GPUs
    init_std: NonNegativeFloat = 0.01               # N(0, 0.01), bias 0
    bn_momentum: Fraction = 0.1                     # BatchNorm2d(C, affine=False, momentum 0.1), SyncBN
    pooling: Literal[POOLINGS] = "specified"        # 2.1 AvgPool2d specs; "adaptive" = same grids, any size
    crop_size: PositiveInt = 224                    # RandomResizedCrop 224 / test CenterCrop 224
    resize_size: PositiveInt = 256                  # test: resize short side 256
    rrc_scale: Tuple[Fraction, Fraction] = (0.08, 1.0)  # default RRC scale, bilinear
    eval_interval: PositiveInt = 10                 # every 10 epochs (and at the end)
    amp: bool = True                                # bf16 autocast of the backbone on GPU
    channels_last: bool = True                      # on GPU
    fast: bool = False                              # cached features, no augmentation: not comparable
    decode: Literal["cpu", "device"] = "cpu"        # "device": JPEG decode + augmentation on the GPU (data/gpu_decode.py)


def train_transform(cfg: Config) -> T.Compose:
    """RandomResizedCrop 224 + HFlip + Normalize (4)."""
    return crop_flip_transform(cfg.crop_size, cfg.rrc_scale)


def check_data(data_root, cfg: Config) -> None:
    """Called by `evaluate` before any protocol runs: labels must fit cfg.num_classes."""
    load_probe_data("inat18", data_root, cfg.num_classes)


def run(ctx: RunContext, cfg: Config) -> ProtocolOutput:
    train_items, val_items, data = load_probe_data("inat18", ctx.data_root, cfg.num_classes)
    return run_probe(ctx, cfg, "multi", train_items, val_items, train_transform(cfg), data)
