"""Places205 multi-head linear probe on Feature1..Feature5 (PROTOCOLS.md 4,
[0x] `resnet50_mhead_8xb32-steplr-28e_places205`).

The model is that of 3a (five heads, specified pooling, synced BatchNorm(affine=False),
Linear -> 205); 28 epochs, steps [7, 14, 21]. The reference evaluated every 10 epochs and not
at the end, so its published accuracy is epoch 20's: the metrics are epoch 20's, the final
epoch's are kept under `at_final_epoch` (linear_probe.probe_metrics). Trainer: `linear_probe`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torchvision import transforms as T

from densebench.config import Fraction, Milestones, NonNegativeFloat, PositiveInt
from densebench.evaluate.context import ProtocolOutput, RunContext
from densebench.protocols.linear_probe import POOLINGS, load_probe_data, normalize, run_probe

NAME = "linear_places205_mhead"


@dataclass
class Config:
    num_classes: PositiveInt = 205                  # 4: 205 classes
    epochs: PositiveInt = 28                        # 4
    lr: float = 0.01                                # 4: SGD 0.01
    momentum: Fraction = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = True
    lr_steps: Milestones = (7, 14, 21)              # 4: x0.1 each
    lr_gamma: float = 0.1
    batch_size: PositiveInt = 256                   # global batch, 32 x 8 GPUs
    init_std: NonNegativeFloat = 0.01               # N(0, 0.01), bias 0
    bn_momentum: Fraction = 0.1                     # BatchNorm2d(C, affine=False, momentum 0.1), SyncBN
    pooling: Literal[POOLINGS] = "specified"        # 2.1 AvgPool2d specs; "adaptive" = same grids, any size
    crop_size: PositiveInt = 224                    # RandomCrop 224 / test CenterCrop 224
    resize_size: PositiveInt = 256                  # train and test: resize short side 256
    train_center_crop: PositiveInt = 256            # train: CenterCrop 256 before RandomCrop 224
    eval_interval: PositiveInt = 10                 # every 10 epochs (and at the end)
    amp: bool = True                                # bf16 autocast of the backbone on GPU
    channels_last: bool = True                      # on GPU
    fast: bool = False                              # cached features, no augmentation: not comparable
    decode: Literal["cpu", "device"] = "cpu"        # "device": JPEG decode + augmentation on the GPU (data/gpu_decode.py)


def train_transform(cfg: Config) -> T.Compose:
    """Resize 256, CenterCrop 256, RandomCrop 224, HFlip, Normalize (no jitter, no lighting)."""
    return T.Compose([
        T.Resize(cfg.resize_size, interpolation=T.InterpolationMode.BILINEAR),
        T.CenterCrop(cfg.train_center_crop),
        T.RandomCrop(cfg.crop_size),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        normalize(),
    ])


def check_data(data_root, cfg: Config) -> None:
    """Called by `evaluate` before any protocol runs: labels must fit cfg.num_classes."""
    load_probe_data("places205", data_root, cfg.num_classes)


def run(ctx: RunContext, cfg: Config) -> ProtocolOutput:
    train_items, val_items, data = load_probe_data("places205", ctx.data_root, cfg.num_classes)
    return run_probe(ctx, cfg, "multi", train_items, val_items, train_transform(cfg), data)
