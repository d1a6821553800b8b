"""Where each dataset lives under a data root (PROTOCOLS.md section 10, mmselfsup `data/`).

A data root holds one folder per dataset, exactly as the official tools expect them:
    imagenet/            train/<wnid>/*.JPEG, val/*.JPEG, meta/{train,val}.txt
    Places205/           trainvalsplit_places205/{train,val}_places205.csv, data/vision/torralba/deeplearning/images256/
    iNaturalist2018/     train_val2018/<super>/<cat>/*.jpg, meta/{train,val}.txt (or {train,val}2018.json)
    VOCdevkit/VOC2007/   JPEGImages, Annotations, ImageSets/Main/...
    VOCdevkit/VOC2012/   JPEGImages, Annotations, SegmentationClass(Aug), ImageSets/{Main,Segmentation}
    coco/                annotations/instances_{train,val}2017.json, train2017/, val2017/
    cityscapes/          leftImg8bit/{train,val}/<city>/, gtFine/{train,val}/<city>/
`densebench data synth` writes the same tree.
"""
from __future__ import annotations

from pathlib import Path


def imagenet_root(root: "str | Path") -> Path:
    return Path(root) / "imagenet"


def places205_root(root: "str | Path") -> Path:
    return Path(root) / "Places205"


def inat18_root(root: "str | Path") -> Path:
    return Path(root) / "iNaturalist2018"


def voc07_root(root: "str | Path") -> Path:
    return Path(root) / "VOCdevkit" / "VOC2007"


def voc12_root(root: "str | Path") -> Path:
    return Path(root) / "VOCdevkit" / "VOC2012"


def coco_root(root: "str | Path") -> Path:
    return Path(root) / "coco"


def cityscapes_root(root: "str | Path") -> Path:
    return Path(root) / "cityscapes"
