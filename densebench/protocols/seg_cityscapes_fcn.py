"""FCN R50-D8 on Cityscapes, 769x769 crops, 40k iterations (PROTOCOLS.md section 9).

Training: leftImg8bit/train with gtFine labelTrainIds (19 classes, others 255); evaluation: val,
sliding-window inference (769 crop, 513 stride) at the test scale, mIoU over 19 classes.
Model, pipeline, loop and metric are shared with VOC in `segmentation.py`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Tuple

from densebench.config import Fraction, PositiveFloat, PositiveInt
from densebench.data.layout import cityscapes_root
from densebench.evaluate.context import ProtocolOutput, RunContext
from densebench.protocols.segmentation import SegData, run_segmentation

NAME = "seg_cityscapes_fcn"


@dataclass
class Config:
    # data (PROTOCOLS.md 9, "Train data" / "Train aug" / "Test")
    num_classes: PositiveInt = 19                      # labelTrainIds 0..18
    crop_size: Tuple[PositiveInt, PositiveInt] = (769, 769)  # (h, w) RandomCrop and Pad
    train_scale: Tuple[PositiveInt, PositiveInt] = (2049, 1025)  # Resize img_scale (long, short bounds), keep ratio
    ratio_range: Tuple[PositiveFloat, PositiveFloat] = (0.5, 2.0)
    cat_max_ratio: Fraction = 0.75
    flip_prob: Fraction = 0.5
    photometric_distortion: bool = True
    test_scale: Tuple[PositiveInt, PositiveInt] = (2049, 1025)  # test Resize, keep ratio
    test_mode: Literal["whole", "slide"] = "slide"     # test_cfg mode='slide'
    slide_crop: Tuple[PositiveInt, PositiveInt] = (769, 769)
    slide_stride: Tuple[PositiveInt, PositiveInt] = (513, 513)
    # model (PROTOCOLS.md 9 "Model": as section 8 with align_corners True)
    head_channels: PositiveInt = 512
    aux_channels: PositiveInt = 256
    dropout: Fraction = 0.1
    align_corners: bool = True
    aux_loss_weight: float = 0.4
    loss_average: Literal["valid", "all"] = "all"      # CE mean over ALL pixels, ignored ones count 0 (mmseg 0.x); "valid": non-ignored only
    sync_bn: bool = True
    # optimisation (PROTOCOLS.md 9, "Optimiser / schedule" / "Batch")
    lr: float = 0.01
    momentum: Fraction = 0.9
    weight_decay: float = 5e-4
    poly_power: float = 0.9
    min_lr: float = 1e-4
    batch_size: PositiveInt = 8                        # total over all GPUs (4 GPUs x 2)
    iterations: PositiveInt = 40000
    eval_interval: PositiveInt = 4000                  # "Eval cadence"
    checkpoint_interval: PositiveInt = 4000
    amp: bool = False                                  # float16 autocast on GPU; off: the configs train in fp32


def cityscapes_seg_data(ctx: RunContext) -> SegData:
    from densebench.data.cityscapes import CITYSCAPES_CLASSES, read_cityscapes

    root = cityscapes_root(ctx.data_root)
    train = read_cityscapes(root, "train")
    val = read_cityscapes(root, "val")
    splits = {"cityscapes_train": len(train), "cityscapes_val": len(val)}
    return SegData(train, val, list(CITYSCAPES_CLASSES), splits)


def run(ctx: RunContext, cfg: Config) -> ProtocolOutput:
    return run_segmentation(ctx, cfg, NAME, cityscapes_seg_data(ctx))
