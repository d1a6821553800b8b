"""Cityscapes reader (PROTOCOLS.md sections 9 and 10).

Images `cityscapes/leftImg8bit/{split}/<city>/<name>_leftImg8bit.png`, labels
`cityscapes/gtFine/{split}/<city>/<name>_gtFine_labelTrainIds.png` (19 train ids, 255 ignore),
as written by mmseg's `tools/convert_datasets/cityscapes.py`.

When a `_labelTrainIds.png` is absent but the official `_gtFine_labelIds.png` exists, the
pair points at the labelIds file and `read_cityscapes_label` maps it through the official
id -> trainId table (cityscapesscripts `helpers/labels.py`, `LABEL_ID_TO_TRAIN_ID` below)
when it is read; nothing is written into the dataset folder. On downscaled copies (such as
the realdata sample) the converted map can differ from a shipped labelTrainIds file at a few
boundary pixels, because the two PNGs were resized independently.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Tuple

import numpy as np

from densebench.data.image import read_label_png
from densebench.data.imagenet import is_dir_entry
from densebench.errors import InputError

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)
IGNORE_INDEX = 255
SPLITS = ("train", "val", "test")
IMAGE_SUFFIX = "_leftImg8bit.png"
TRAIN_IDS_SUFFIX = "_gtFine_labelTrainIds.png"
LABEL_IDS_SUFFIX = "_gtFine_labelIds.png"

# official labelId -> trainId (cityscapesscripts helpers/labels.py); every id not listed,
# including 0..6, 9, 10, 14..16, 18, 29, 30 and the license plate (-1), is ignored (255)
_TRAIN_ID_OF_LABEL_ID = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
    24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}
LABEL_ID_TO_TRAIN_ID = np.full(256, IGNORE_INDEX, dtype=np.uint8)
for _label_id, _train_id in _TRAIN_ID_OF_LABEL_ID.items():
    LABEL_ID_TO_TRAIN_ID[_label_id] = _train_id


def label_ids_to_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """Map an official labelIds array (uint8) to train ids 0..18, others 255."""
    return LABEL_ID_TO_TRAIN_ID[np.asarray(label_ids, dtype=np.uint8)]


def read_cityscapes_label(path: "str | Path") -> np.ndarray:
    """HxW uint8 train ids of a `_labelTrainIds.png`, or of a `_labelIds.png` (converted)."""
    labels = read_label_png(path)
    if str(path).endswith(LABEL_IDS_SUFFIX):
        return label_ids_to_train_ids(labels)
    return labels


def _label_path(gt_dir: Path, image: Path) -> Path:
    base = image.name[: -len(IMAGE_SUFFIX)]
    train_ids = gt_dir / image.parent.name / f"{base}{TRAIN_IDS_SUFFIX}"
    if train_ids.is_file():
        return train_ids
    label_ids = gt_dir / image.parent.name / f"{base}{LABEL_IDS_SUFFIX}"
    if label_ids.is_file():
        return label_ids
    raise InputError(train_ids, f"label not found for {image} (neither {TRAIN_IDS_SUFFIX} nor {LABEL_IDS_SUFFIX})")


def read_cityscapes(cs_root: "str | Path", split: str) -> List[Tuple[Path, Path]]:
    """(leftImg8bit png, label png) pairs of a split, sorted by city and file name.

    The label is the `_gtFine_labelTrainIds.png`, or the `_gtFine_labelIds.png` when the
    former is absent: read labels with `read_cityscapes_label`, which converts the latter.
    """
    if split not in SPLITS:
        raise ValueError(f"Cityscapes split must be one of {SPLITS}, got {split!r}")
    cs_root = Path(cs_root)
    image_dir = cs_root / "leftImg8bit" / split
    gt_dir = cs_root / "gtFine" / split
    if not image_dir.is_dir():
        raise InputError(image_dir, f"Cityscapes {split} images not found")
    if not gt_dir.is_dir():
        raise InputError(gt_dir, f"Cityscapes {split} labels not found")
    images = sorted(
        image_dir / city.name / name
        for city in os.scandir(image_dir)
        if is_dir_entry(city)
        for name in os.listdir(city.path)
        if name.endswith(IMAGE_SUFFIX)
    )
    if not images:
        raise InputError(image_dir, f"no *{IMAGE_SUFFIX} images in the city folders")
    return [(image, _label_path(gt_dir, image)) for image in images]
