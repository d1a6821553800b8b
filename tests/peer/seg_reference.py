"""The reference side of the segmentation peer tests: the MMSelfSup 0.x FCN benchmark configs
written out as plain dicts (the `_base_` files are not part of the installed mmseg wheel), the
mapping of mmseg's FCN state dict onto densebench's, and a source of random draws that can be
replayed through mmseg's numpy calls and densebench's `np.random.Generator` alike.

Config sources (open-mmlab/mmselfsup, branch 0.x, commit 6faad816):
  M = configs/benchmarks/mmsegmentation/_base_/models/fcn_r50-d8.py
  V = configs/benchmarks/mmsegmentation/_base_/datasets/pascal_voc12.py (+ pascal_voc12_aug.py)
  C = configs/benchmarks/mmsegmentation/_base_/datasets/cityscapes_769x769.py
  S20 / S40 = configs/benchmarks/mmsegmentation/_base_/schedules/schedule_20k.py / schedule_40k.py
  VOC = configs/benchmarks/mmsegmentation/voc12aug/fcn_r50-d8_512x512_20k_voc12aug.py
  CS = configs/benchmarks/mmsegmentation/cityscapes/fcn_r50-d8_769x769_40k_cityscapes.py
"""
from __future__ import annotations

import copy
from typing import Any, Dict, List, Tuple

import numpy as np
import torch

from densebench.protocols import seg_cityscapes_fcn, seg_voc12aug_fcn

# M: norm_cfg = dict(type='SyncBN', requires_grad=True). SyncBN needs a process group; the tests
# run one CPU process, where SyncBN and BN compute the same thing, so BN stands in.
NORM_CFG = dict(type="BN", requires_grad=True)

# M, verbatim except norm_cfg (above) and the pretrained init (random weights are mapped over).
FCN_R50_D8 = dict(
    type="EncoderDecoder",
    backbone=dict(type="ResNet", depth=50, num_stages=4, out_indices=(0, 1, 2, 3), dilations=(1, 1, 2, 4),
                  strides=(1, 2, 1, 1), norm_cfg=NORM_CFG, norm_eval=False, style="pytorch",
                  contract_dilation=True),
    decode_head=dict(type="FCNHead", in_channels=2048, in_index=3, channels=512, num_convs=2, concat_input=True,
                     dropout_ratio=0.1, num_classes=19, norm_cfg=NORM_CFG, align_corners=False,
                     loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0)),
    auxiliary_head=dict(type="FCNHead", in_channels=1024, in_index=2, channels=256, num_convs=1,
                        concat_input=False, dropout_ratio=0.1, num_classes=19, norm_cfg=NORM_CFG,
                        align_corners=False,
                        loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=0.4)),
    train_cfg=dict(),
    test_cfg=dict(mode="whole"),
)

IMG_NORM_CFG = dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], to_rgb=True)  # V and C


def _train_pipeline(img_scale: Tuple[int, int], crop_size: Tuple[int, int]) -> List[Dict[str, Any]]:
    """V / C train_pipeline after LoadImageFromFile and LoadAnnotations."""
    return [
        dict(type="Resize", img_scale=img_scale, ratio_range=(0.5, 2.0)),
        dict(type="RandomCrop", crop_size=crop_size, cat_max_ratio=0.75),
        dict(type="RandomFlip", prob=0.5),
        dict(type="PhotoMetricDistortion"),
        dict(type="Normalize", **IMG_NORM_CFG),
        dict(type="Pad", size=crop_size, pad_val=0, seg_pad_val=255),
        dict(type="DefaultFormatBundle"),
        dict(type="Collect", keys=["img", "gt_semantic_seg"]),
    ]


def _model(num_classes: int, align_corners: bool, test_cfg: Dict[str, Any]) -> Dict[str, Any]:
    model = copy.deepcopy(FCN_R50_D8)
    for head in ("decode_head", "auxiliary_head"):
        model[head]["num_classes"] = num_classes
        model[head]["align_corners"] = align_corners
    model["test_cfg"] = test_cfg
    return model


# The two benchmarks: reference config values and densebench's protocol Config.
BENCHMARKS = {
    "voc12aug": dict(
        model=_model(21, False, dict(mode="whole")),                     # VOC: num_classes=21
        train_pipeline=_train_pipeline((2048, 512), (512, 512)),           # V
        test_scale=(2048, 512),                                            # V test_pipeline img_scale
        optimizer=dict(type="SGD", lr=0.01, momentum=0.9, weight_decay=0.0005),  # S20
        optimizer_config=dict(),                                           # S20: no fp16 section
        lr_config=dict(policy="poly", power=0.9, min_lr=1e-4, by_epoch=False),   # S20
        max_iters=20000,                                                   # S20
        eval_interval=2000,                                                # S20
        samples_per_gpu=4,                                                 # V
        densebench=seg_voc12aug_fcn.Config,
    ),
    "cityscapes": dict(
        model=_model(19, True, dict(mode="slide", crop_size=(769, 769), stride=(513, 513))),  # CS
        train_pipeline=_train_pipeline((2049, 1025), (769, 769)),          # C
        test_scale=(2049, 1025),                                           # C test_pipeline img_scale
        optimizer=dict(type="SGD", lr=0.01, momentum=0.9, weight_decay=0.0005),  # S40
        optimizer_config=dict(),                                           # S40: no fp16 section
        lr_config=dict(policy="poly", power=0.9, min_lr=1e-4, by_epoch=False),   # S40
        max_iters=40000,                                                   # S40
        eval_interval=4000,                                                # S40
        samples_per_gpu=2,                                                 # cityscapes.py
        densebench=seg_cityscapes_fcn.Config,
    ),
}


def build_reference(benchmark: str, **head_overrides: Any) -> torch.nn.Module:
    """mmseg's EncoderDecoder from the benchmark's model dict, random weights (mmseg's own init)."""
    from mmcv import ConfigDict
    from mmseg.models import build_segmentor

    model = copy.deepcopy(BENCHMARKS[benchmark]["model"])
    for key, value in head_overrides.items():
        model["decode_head"][key] = value
        model["auxiliary_head"][key] = value
    return build_segmentor(ConfigDict(model))


def reference_to_densebench(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """mmseg FCN state dict -> densebench FCNSegmentor names. The backbone names are torchvision's
    in both; a head's ConvModule `conv`/`bn` are densebench's Sequential items 0/1."""
    mapped = {}
    for name, tensor in state.items():
        if name.startswith(("decode_head.", "auxiliary_head.")):
            name = name.replace("auxiliary_head.", "aux_head.").replace(".conv.", ".0.").replace(".bn.", ".1.")
        mapped[name] = tensor
    return mapped


class Draws:
    """Uniform [0, 1) draws, recorded on first use and replayed on the second side.

    Every random call of either pipeline turns one draw u into its value the way numpy does:
    uniform(a, b) = a + (b - a) u, randint/integers(lo, hi) = lo + floor((hi - lo) u), rand/random
    = u. It offers numpy's legacy module functions (mmseg calls np.random.*) and the Generator
    methods densebench uses, and records whether each call wanted an integer or a float, so the two
    sides must make the same calls in the same order to agree."""

    def __init__(self, seed: int, overrides: Dict[int, float] = None):
        self._source = np.random.default_rng(seed)
        self._overrides = dict(overrides or {})
        self.log: List[Tuple[str, float]] = []
        self._replay: List[Tuple[str, float]] = []
        self._position = 0

    def replay(self) -> "Draws":
        """A fresh reader over the draws recorded so far."""
        other = Draws(0)
        other._replay = list(self.log)
        return other

    def done(self) -> bool:
        return self._position == len(self._replay)

    def _unit(self, kind: str) -> float:
        if self._replay:
            recorded_kind, unit = self._replay[self._position]
            assert recorded_kind == kind, f"draw {self._position}: reference drew {recorded_kind}, densebench {kind}"
            self._position += 1
            return unit
        unit = self._overrides.get(len(self.log), float(self._source.random()))
        self.log.append((kind, unit))
        return unit

    # numpy legacy (mmseg) and Generator (densebench) spellings
    def randint(self, low, high=None, size=None):
        assert size is None
        low, high = (0, low) if high is None else (low, high)
        return low + int(np.floor((high - low) * self._unit("int")))

    integers = randint

    def uniform(self, low=0.0, high=1.0, size=None):
        assert size is None
        return low + (high - low) * self._unit("float")

    def random_sample(self, size=None):
        assert size is None
        return self._unit("float")

    rand = random = random_sample

    def patch_numpy(self, monkeypatch) -> None:
        """Route numpy's module-level draws (as mmseg's transforms call them) through this source."""
        for name in ("randint", "uniform", "random_sample", "rand"):
            monkeypatch.setattr(np.random, name, getattr(self, name))
