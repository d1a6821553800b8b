"""Backbone forward passes shared by every protocol: feature1..feature5 and their pooling.

Feature naming (PROTOCOLS.md section 0): feat1 = stem after conv1-bn1-relu, before the
max-pool; feat2..feat5 = outputs of layer1..layer4 of a torchvision ResNet.
The "specified" AvgPool2d per layer (PROTOCOLS.md 2.1, [0x] multi_pooling.py) gives
9216/9216/8192/9216/8192 dims for ResNet-50 at 224 input; count_include_pad=True (the
PyTorch default) matters for feat1 (padding 4).
"""
from __future__ import annotations

from typing import Dict, Iterable

import torch
from torch import nn

LAYERS = ("feat1", "feat2", "feat3", "feat4", "feat5")

# (kernel, stride, padding) per layer, [0x] mmselfsup/models/utils/multi_pooling.py
MULTI_POOL_SPECS = {
    "feat1": (10, 10, 4),
    "feat2": (16, 8, 0),
    "feat3": (13, 5, 0),
    "feat4": (8, 3, 0),
    "feat5": (6, 1, 0),
}

# ImageNet mean/std in RGB order on [0, 1] input (PROTOCOLS.md 1.5)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def multi_pool(layer: str) -> nn.AvgPool2d:
    kernel, stride, padding = MULTI_POOL_SPECS[layer]
    return nn.AvgPool2d(kernel, stride=stride, padding=padding, count_include_pad=True)


def forward_features(resnet: nn.Module, x: torch.Tensor, layers: Iterable[str] = LAYERS) -> Dict[str, torch.Tensor]:
    """Run a torchvision ResNet and return the requested feature maps (stops after the last needed)."""
    wanted = set(layers)
    unknown = wanted - set(LAYERS)
    if unknown:
        raise ValueError(f"unknown feature layers {sorted(unknown)}; known: {LAYERS}")
    last = max(LAYERS.index(name) for name in wanted)
    out: Dict[str, torch.Tensor] = {}
    x = resnet.relu(resnet.bn1(resnet.conv1(x)))
    if "feat1" in wanted:
        out["feat1"] = x
    x = resnet.maxpool(x)
    for index, stage in enumerate((resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4), start=2):
        if index - 1 > last:
            break
        x = stage(x)
        name = f"feat{index}"
        if name in wanted:
            out[name] = x
    return out


def pooled_features(resnet: nn.Module, x: torch.Tensor, layers: Iterable[str] = LAYERS) -> Dict[str, torch.Tensor]:
    """Specified multi-pooling, flattened C-major (`view(N, -1)`) as the reference extractor does."""
    maps = forward_features(resnet, x, layers)
    return {name: multi_pool(name)(fmap).flatten(1) for name, fmap in maps.items()}


def gap_features(resnet: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """layer4 output, global average pooled (2048-d for ResNet-50): the kNN / AvgPool-linear feature."""
    return forward_features(resnet, x, ["feat5"])["feat5"].mean(dim=(2, 3))
