"""FCN R50-D8 on VOC2012 + Aug, 512x512 crops, 20k iterations (PROTOCOLS.md section 8).

Training: VOC2012 train.txt (SegmentationClass) + aug.txt (SegmentationClassAug); evaluation:
val.txt, whole-image inference at the test scale, mIoU over 21 classes (background included).
Model, pipeline, loop and metric are shared with Cityscapes in `segmentation.py`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Tuple

from densebench.config import Fraction, PositiveFloat, PositiveInt
from densebench.data.layout import voc12_root
from densebench.evaluate.context import ProtocolOutput, RunContext
from densebench.protocols.segmentation import SegData, run_segmentation

NAME = "seg_voc12aug_fcn"


@dataclass
class Config:
    # data (PROTOCOLS.md 8, "Train data" / "Train aug" / "Test")
    num_classes: PositiveInt = 21                      # 20 VOC classes + background
    crop_size: Tuple[PositiveInt, PositiveInt] = (512, 512)  # (h, w) RandomCrop and Pad
    train_scale: Tuple[PositiveInt, PositiveInt] = (2048, 512)  # Resize img_scale (long, short bounds), keep ratio
    ratio_range: Tuple[PositiveFloat, PositiveFloat] = (0.5, 2.0)  # random rescale ratio
    cat_max_ratio: Fraction = 0.75                     # RandomCrop category-max rule
    flip_prob: Fraction = 0.5
    photometric_distortion: bool = True                # brightness/contrast/saturation/hue, p=0.5 each
    test_scale: Tuple[PositiveInt, PositiveInt] = (2048, 512)  # test Resize, keep ratio
    test_mode: Literal["whole", "slide"] = "whole"     # test_cfg mode='whole'
    slide_crop: Tuple[PositiveInt, PositiveInt] = (512, 512)  # unused with mode 'whole'
    slide_stride: Tuple[PositiveInt, PositiveInt] = (341, 341)  # unused with mode 'whole'
    # model (PROTOCOLS.md 8, "Backbone" / "Decode head" / "Aux head")
    head_channels: PositiveInt = 512                   # FCNHead channels
    aux_channels: PositiveInt = 256                    # auxiliary FCNHead channels
    dropout: Fraction = 0.1                            # Dropout2d before the classifier
    align_corners: bool = False
    aux_loss_weight: float = 0.4
    loss_average: Literal["valid", "all"] = "all"      # CE mean over ALL pixels, ignored ones count 0 (mmseg 0.x); "valid": non-ignored only
    sync_bn: bool = True                               # SyncBN under torchrun on GPU
    # optimisation (PROTOCOLS.md 8, "Optimiser" / "Schedule" / "Batch")
    lr: float = 0.01
    momentum: Fraction = 0.9
    weight_decay: float = 5e-4
    poly_power: float = 0.9
    min_lr: float = 1e-4
    batch_size: PositiveInt = 16                       # total over all GPUs (4 GPUs x 4)
    iterations: PositiveInt = 20000
    eval_interval: PositiveInt = 2000                  # "Eval cadence"
    checkpoint_interval: PositiveInt = 2000            # resume state in the work dir
    amp: bool = False                                  # float16 autocast on GPU; off: the configs train in fp32


def voc_seg_data(ctx: RunContext) -> SegData:
    """train = train.txt -> SegmentationClass + aug.txt -> SegmentationClassAug; val = val.txt."""
    from densebench.data.voc import VOC_CLASSES, read_voc_seg

    root = voc12_root(ctx.data_root)
    train = read_voc_seg(root, "train")
    val = read_voc_seg(root, "val")
    aug = sum(1 for _, label in train if label.parent.name == "SegmentationClassAug")
    splits = {"voc12_seg_train": len(train) - aug, "voc12_seg_aug": aug, "voc12_seg_val": len(val)}
    return SegData(train, val, ["background", *VOC_CLASSES], splits)


def run(ctx: RunContext, cfg: Config) -> ProtocolOutput:
    return run_segmentation(ctx, cfg, NAME, voc_seg_data(ctx))
