"""ImageNet AvgPool linear probe, the MoCo v1/v2 linear setting (PROTOCOLS.md 3b,
[0x] `resnet50_linear-8xb32-steplr-100e_in1k`).

Frozen eval-mode backbone; layer4 output globally average pooled (2048-d for ResNet-50),
then Linear -> classes, no BN; SGD lr 30, no weight decay. Trainer: `linear_probe`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple, Literal

from torchvision import transforms as T

from densebench.config import Fraction, Milestones, NonNegativeFloat, PositiveInt
from densebench.evaluate.context import ProtocolOutput, RunContext
from densebench.protocols.linear_probe import crop_flip_transform, load_probe_data, run_probe

NAME = "linear_imagenet"


@dataclass
class Config:
    num_classes: PositiveInt = 1000                 # 3b: Linear(2048 -> 1000)
    epochs: PositiveInt = 100                       # 3b
    lr: float = 30.0                                # 3b: SGD lr 30
    momentum: Fraction = 0.9
    weight_decay: float = 0.0                       # 3b: wd 0
    nesterov: bool = False                          # 3b: no nesterov
    lr_steps: Milestones = (60, 80)                 # 3b: x0.1 at 60 and 80
    lr_gamma: float = 0.1
    batch_size: PositiveInt = 256                   # global batch, 32 x 8 GPUs
    init_std: NonNegativeFloat = 0.01               # N(0, 0.01), bias 0
    crop_size: PositiveInt = 224                    # RandomResizedCrop 224 / CenterCrop 224
    resize_size: PositiveInt = 256                  # test: resize short side 256
    rrc_scale: Tuple[Fraction, Fraction] = (0.08, 1.0)  # default RRC scale, bilinear
    eval_interval: PositiveInt = 1                  # [0x] evaluation interval=1
    amp: bool = True                                # bf16 autocast of the backbone on GPU
    channels_last: bool = True                      # on GPU
    fast: bool = False                              # cached features, no augmentation: not comparable
    decode: Literal["cpu", "device"] = "cpu"        # "device": JPEG decode + augmentation on the GPU (data/gpu_decode.py)


def train_transform(cfg: Config) -> T.Compose:
    """RRC + HFlip + Normalize; no jitter, no lighting (3b)."""
    return crop_flip_transform(cfg.crop_size, cfg.rrc_scale)


def check_data(data_root, cfg: Config) -> None:
    """Called by `evaluate` before any protocol runs: labels must fit cfg.num_classes."""
    load_probe_data("imagenet", data_root, cfg.num_classes)


def run(ctx: RunContext, cfg: Config) -> ProtocolOutput:
    train_items, val_items, data = load_probe_data("imagenet", ctx.data_root, cfg.num_classes)
    return run_probe(ctx, cfg, "avgpool", train_items, val_items, train_transform(cfg), data)
