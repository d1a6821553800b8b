"""ImageNet multi-head linear probe on Feature1..Feature5 (PROTOCOLS.md 3a,
[0x] `resnet50_mhead_linear-8xb32-steplr-90e_in1k`).

Frozen eval-mode backbone; five heads (specified AvgPool, BatchNorm2d(affine=False) synced
across ranks, Linear) trained together on their summed CE. The trainer lives in
`linear_probe`; this module holds the paper config and the ImageNet training augmentation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Tuple

from torchvision import transforms as T

from densebench.config import Fraction, Milestones, NonNegativeFloat, PositiveInt
from densebench.evaluate.context import ProtocolOutput, RunContext
from densebench.protocols.linear_probe import POOLINGS, Lighting, load_probe_data, normalize, run_probe

NAME = "linear_imagenet_mhead"


@dataclass
class Config:
    num_classes: PositiveInt = 1000                 # 3a: Linear(dim -> 1000)
    epochs: PositiveInt = 90                        # 3a
    lr: float = 0.01                                # 3a: SGD lr 0.01
    momentum: Fraction = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = True
    lr_steps: Milestones = (30, 60, 90)             # 3a / 12.6: [0x] steps, x0.1 each
    lr_gamma: float = 0.1
    batch_size: PositiveInt = 256                   # global batch, 32 x 8 GPUs
    init_std: NonNegativeFloat = 0.01               # Linear ~ N(0, 0.01), bias 0
    bn_momentum: Fraction = 0.1                     # BatchNorm2d(C, affine=False, momentum 0.1), SyncBN
    pooling: Literal[POOLINGS] = "specified"        # 2.1 AvgPool2d specs; "adaptive" = same grids, any size
    crop_size: PositiveInt = 224                    # RandomResizedCrop 224 / CenterCrop 224
    resize_size: PositiveInt = 256                  # test: resize short side 256
    rrc_scale: Tuple[Fraction, Fraction] = (0.08, 1.0)  # RandomResizedCrop scale, bilinear
    color_jitter: Tuple[NonNegativeFloat, NonNegativeFloat, NonNegativeFloat, NonNegativeFloat] = (0.4, 0.4, 0.4, 0.0)  # always applied
    lighting_std: NonNegativeFloat = 0.1            # AlexNet PCA lighting alphastd
    eval_interval: PositiveInt = 10                 # top-1/top-5 every 10 epochs (and at the end)
    amp: bool = True                                # bf16 autocast of the backbone on GPU
    channels_last: bool = True                      # on GPU
    fast: bool = False                              # cached features, no augmentation: not comparable
    decode: Literal["cpu", "device"] = "cpu"        # "device": JPEG decode + augmentation on the GPU (data/gpu_decode.py)


def train_transform(cfg: Config) -> T.Compose:
    """RRC + HFlip + ColorJitter + ToTensor + Lighting (on [0, 1] RGB) + Normalize, as [0x]."""
    return T.Compose([
        T.RandomResizedCrop(cfg.crop_size, scale=tuple(cfg.rrc_scale),
                            interpolation=T.InterpolationMode.BILINEAR),
        T.RandomHorizontalFlip(),
        T.ColorJitter(*cfg.color_jitter),
        T.ToTensor(),
        Lighting(cfg.lighting_std),
        normalize(),
    ])


def check_data(data_root, cfg: Config) -> None:
    """Called by `evaluate` before any protocol runs: labels must fit cfg.num_classes."""
    load_probe_data("imagenet", data_root, cfg.num_classes)


def run(ctx: RunContext, cfg: Config) -> ProtocolOutput:
    train_items, val_items, data = load_probe_data("imagenet", ctx.data_root, cfg.num_classes)
    return run_probe(ctx, cfg, "multi", train_items, val_items, train_transform(cfg), data)
