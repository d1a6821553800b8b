"""`densebench data check`: which dataset parts each protocol finds under a data root.

A "part" is one split of one dataset (e.g. `voc07_det_test`). Each part is checked cheaply
with the same reader the protocols use (densebench/data/*.py): the reader lists the split and
validates its list/annotation files (labels, boxes, ids), then a few sample files are decoded
(first, middle, last: images, label PNGs, whose values and sizes are checked). The result per
part is
    present    the reader accepted it; `count` items
    missing    the dataset's folder (PART_FOLDERS) does not exist: it was never installed
    malformed  the folder exists but a file the part needs is absent or wrong, or a sample
               was rejected (`detail` = the reader's message, naming the file)
A protocol can run when every part it needs is present. `evaluate` treats malformed data as
an error and skips a protocol only when its data is missing under `--protocols all`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from densebench.data import layout
from densebench.errors import InputError

# protocol name -> the dataset parts it reads (DESIGN.md protocol names)
PROTOCOL_DATASETS: Dict[str, Tuple[str, ...]] = {
    "svm_voc07": ("voc07_cls_trainval", "voc07_cls_test"),
    "lowshot_svm_voc07": ("voc07_cls_trainval", "voc07_cls_test"),
    "knn_imagenet": ("imagenet_train", "imagenet_val"),
    "linear_imagenet_mhead": ("imagenet_train", "imagenet_val"),
    "linear_imagenet": ("imagenet_train", "imagenet_val"),
    "linear_places205_mhead": ("places205_train", "places205_val"),
    "linear_inat18_mhead": ("inat18_train", "inat18_val"),
    "det_voc0712_c4": ("voc07_det_trainval", "voc12_det_trainval", "voc07_det_test"),
    "det_coco_maskrcnn_fpn": ("coco_train2017", "coco_val2017"),
    "seg_voc12aug_fcn": ("voc12_seg_train", "voc12_seg_aug", "voc12_seg_val"),
    "seg_cityscapes_fcn": ("cityscapes_train", "cityscapes_val"),
}

SAMPLES_PER_PART = 3  # decoded files per part: first, middle and last item
VOC_SEG_VALUES = set(range(21)) | {255}
CITYSCAPES_VALUES = set(range(19)) | {255}


@dataclass
class PartStatus:
    status: str   # "present" | "missing" | "malformed"
    count: int    # items in the split (0 unless present)
    detail: str   # where it was found, or what is missing / wrong


# The folder whose absence means the part's dataset was never installed ("missing"). Below
# it, anything absent or wrong is "malformed". SegmentationClassAug (SBD) is its own download.
PART_FOLDERS: Dict[str, Callable[[Path], Path]] = {
    "imagenet_train": layout.imagenet_root,
    "imagenet_val": layout.imagenet_root,
    "places205_train": layout.places205_root,
    "places205_val": layout.places205_root,
    "inat18_train": layout.inat18_root,
    "inat18_val": layout.inat18_root,
    "voc07_cls_trainval": layout.voc07_root,
    "voc07_cls_test": layout.voc07_root,
    "voc07_det_trainval": layout.voc07_root,
    "voc07_det_test": layout.voc07_root,
    "voc12_det_trainval": layout.voc12_root,
    "voc12_seg_train": layout.voc12_root,
    "voc12_seg_aug": lambda root: layout.voc12_root(root) / "SegmentationClassAug",
    "voc12_seg_val": layout.voc12_root,
    "coco_train2017": layout.coco_root,
    "coco_val2017": layout.coco_root,
    "cityscapes_train": layout.cityscapes_root,
    "cityscapes_val": layout.cityscapes_root,
}
# Class count of the full dataset: a label at or above it is wrong at any scale.
DATASET_CLASSES = {"imagenet": 1000, "places205": 205, "inat18": 8142}


def _not_found(path: Path) -> InputError:
    return InputError(path, "is a symlink that does not resolve (dangling or a loop)" if path.is_symlink()
                      else "not found")


def _require(*paths: Path) -> None:
    for path in paths:
        if not path.exists():
            raise _not_found(path)


def _require_any(*paths: Path) -> None:
    if not any(path.exists() for path in paths):
        raise _not_found(paths[0])


def _samples(items: Sequence) -> list:
    """First, middle and last item: a cheap spot check that catches a truncated tail too."""
    if not items:
        return []
    picks = sorted({0, len(items) // 2, len(items) - 1})[:SAMPLES_PER_PART]
    return [items[i] for i in picks]


def _decode_samples(paths: Sequence[Path]) -> None:
    from densebench.data.image import load_image

    for path in _samples(list(paths)):
        load_image(path)


def _check_pair_samples(pairs: Sequence[Tuple[Path, Path]], read_label: Callable, allowed: set, what: str) -> None:
    """Sampled image/label pairs: both decode, the label's values are class indices or 255, and
    the label has its image's size (a resized label would shift every pixel's class)."""
    from densebench.data.image import load_image

    for image_path, label_path in _samples(list(pairs)):
        width, height = load_image(image_path).size
        labels = read_label(label_path)
        bad = sorted(set(np.unique(labels).tolist()) - allowed)
        if bad:
            raise InputError(label_path, f"{what} label PNG holds values {bad[:5]} outside "
                                         f"{min(allowed)}..{max(allowed - {255})} and 255")
        if labels.shape[:2] != (height, width):
            raise InputError(label_path, f"label is {labels.shape[1]}x{labels.shape[0]} but its image "
                                         f"{image_path} is {width}x{height}")


def _exists_all(paths: Sequence[Path], listed_in: Path) -> None:
    """InputError naming the first of `paths` that is not on disk (one listing per folder)."""
    present: Dict[Path, set] = {}
    for path in paths:
        if path.parent not in present:
            try:
                present[path.parent] = set(os.listdir(path.parent))
            except OSError:
                present[path.parent] = set()
        if path.name not in present[path.parent]:
            raise InputError(path, f"image not found (listed in {listed_in})")


# ----------------------------------------------------------------------------- per-part checks
# each returns (count, detail) or raises InputError


def _label_range_problem(labels: Sequence[int], dataset: str, split: str, train_labels: Optional[Sequence[int]]):
    """Why these labels cannot be right, or None: at or above the dataset's class count, or (val)
    above every train label, which would silently add classes no training image has (kNN
    would vote over them, a probe would be sized by them)."""
    high = max(labels)
    if high >= DATASET_CLASSES[dataset]:
        return f"label {high} is outside 0..{DATASET_CLASSES[dataset] - 1} ({dataset} has {DATASET_CLASSES[dataset]} classes)"
    if train_labels is not None and high > max(train_labels):
        return f"{split} label {high} is above every train label (train labels span 0..{max(train_labels)})"
    return None


def _image_list_part(reader: Callable, dataset: str, dataset_root: Path, split: str,
                     label_files: Sequence[Path], anchors: Sequence[Sequence[Path]]):
    """An image-list split: the list, its labels (range, and val against train), sample images.
    `label_files`: where the reader takes the labels from, in the reader's order (for messages)."""
    for group in [label_files, *anchors]:
        _require_any(*group)
    samples = reader(dataset_root, split)
    labels = [label for _, label in samples]
    train_labels = None if split == "train" else [label for _, label in reader(dataset_root, "train", check_files=False)]
    problem = _label_range_problem(labels, dataset, split, train_labels)
    if problem is not None:
        raise InputError(next(path for path in label_files if path.exists()), problem)
    _decode_samples([path for path, _ in samples])
    return len(samples), f"{len(samples)} images, {len(set(labels))} classes"


def _imagenet(split: str):
    def check(root: Path):
        from densebench.data.imagenet import read_imagenet

        base = layout.imagenet_root(root)
        return _image_list_part(read_imagenet, "imagenet", base, split,
                                [base / "meta" / f"{split}_labeled.txt", base / "meta" / f"{split}.txt", base / split],
                                [[base / split]])
    return check


def _places205(split: str):
    def check(root: Path):
        from densebench.data.places205 import IMAGE_SUBDIR, places205_list_file, read_places205

        base = layout.places205_root(root)
        return _image_list_part(read_places205, "places205", base, split, [places205_list_file(base, split)],
                                [[base / IMAGE_SUBDIR]])
    return check


def _inat18(split: str):
    def check(root: Path):
        from densebench.data.inat import IMAGE_SUBDIR, read_inat18

        base = layout.inat18_root(root)
        return _image_list_part(read_inat18, "inat18", base, split,
                                [base / "meta" / f"{split}.txt", base / f"{split}2018.json"],
                                [[base / IMAGE_SUBDIR]])
    return check


def _voc07_cls(split: str):
    def check(root: Path):
        from densebench.data.voc import VOC_CLASSES, read_voc_cls_labels, voc_image_path

        base = layout.voc07_root(root)
        main = base / "ImageSets" / "Main"
        _require(main / f"{split}.txt", *(main / f"{name}_{split}.txt" for name in VOC_CLASSES),
                 base / "JPEGImages")
        ids, labels = read_voc_cls_labels(base, split)
        paths = [voc_image_path(base, image_id) for image_id in ids]
        _exists_all(paths, main / f"{split}.txt")
        _decode_samples(paths)
        no_positive = [VOC_CLASSES[c] for c in range(len(VOC_CLASSES)) if not (labels[:, c] == 1).any()]
        if no_positive:
            raise InputError(main / f"{no_positive[0]}_{split}.txt", f"class has no positive image in {split}")
        return len(ids), f"{len(ids)} images, {int((labels == 1).sum())} positive labels"
    return check


def _voc_det(voc_root: Callable[[Path], Path], split: str):
    def check(root: Path):
        from densebench.data.voc import read_voc_det

        base = voc_root(root)
        _require(base / "ImageSets" / "Main" / f"{split}.txt", base / "Annotations", base / "JPEGImages")
        annotations = read_voc_det(base, split)
        _decode_samples([ann.path for ann in annotations])
        boxes = sum(len(ann.labels) for ann in annotations)
        difficult = sum(int(ann.difficult.sum()) for ann in annotations)
        return len(annotations), f"{len(annotations)} images, {boxes} boxes ({difficult} difficult)"
    return check


def _voc12_seg(list_name: str, label_dir: str):
    def check(root: Path):
        from densebench.data.image import read_label_png
        from densebench.data.voc import read_voc_seg, read_voc_seg_list

        base = layout.voc12_root(root)
        seg = base / "ImageSets" / "Segmentation"
        _require(seg / f"{list_name}.txt", base / label_dir, base / "JPEGImages")
        pairs = read_voc_seg_list(base, list_name, label_dir)
        if list_name == "aug" and (seg / "train.txt").exists():
            read_voc_seg(base, "train")  # the train+aug pairing: ids must not overlap
        _check_pair_samples(pairs, read_label_png, VOC_SEG_VALUES, "VOC")
        return len(pairs), f"{len(pairs)} image/label pairs ({label_dir})"
    return check


def _coco(split: str):
    def check(root: Path):
        from densebench.data.coco import read_coco_instances

        base = layout.coco_root(root)
        ann_file = base / "annotations" / f"instances_{split}2017.json"
        _require(ann_file, base / f"{split}2017")
        coco, images = read_coco_instances(ann_file, base / f"{split}2017")
        from densebench.data.image import load_image

        for record in _samples(images):
            size = load_image(record.path).size
            if size != (record.width, record.height):
                raise InputError(record.path, f"image is {size[0]}x{size[1]} but {ann_file} says "
                                              f"{record.width}x{record.height}")
        return len(images), (f"{len(images)} images, {len(coco.anns)} annotations, "
                             f"{len(coco.cats)} categories")
    return check


def _cityscapes(split: str):
    def check(root: Path):
        from densebench.data.cityscapes import read_cityscapes, read_cityscapes_label

        base = layout.cityscapes_root(root)
        _require(base / "leftImg8bit" / split, base / "gtFine" / split)
        pairs = read_cityscapes(base, split)
        _check_pair_samples(pairs, read_cityscapes_label, CITYSCAPES_VALUES, "Cityscapes train-id")
        cities = len({image.parent.name for image, _ in pairs})
        return len(pairs), f"{len(pairs)} images in {cities} cities"
    return check


PART_CHECKS: Dict[str, Callable[[Path], Tuple[int, str]]] = {
    "imagenet_train": _imagenet("train"),
    "imagenet_val": _imagenet("val"),
    "places205_train": _places205("train"),
    "places205_val": _places205("val"),
    "inat18_train": _inat18("train"),
    "inat18_val": _inat18("val"),
    "voc07_cls_trainval": _voc07_cls("trainval"),
    "voc07_cls_test": _voc07_cls("test"),
    "voc07_det_trainval": _voc_det(layout.voc07_root, "trainval"),
    "voc07_det_test": _voc_det(layout.voc07_root, "test"),
    "voc12_det_trainval": _voc_det(layout.voc12_root, "trainval"),
    "voc12_seg_train": _voc12_seg("train", "SegmentationClass"),
    "voc12_seg_aug": _voc12_seg("aug", "SegmentationClassAug"),
    "voc12_seg_val": _voc12_seg("val", "SegmentationClass"),
    "coco_train2017": _coco("train"),
    "coco_val2017": _coco("val"),
    "cityscapes_train": _cityscapes("train"),
    "cityscapes_val": _cityscapes("val"),
}


def check_part(root: "str | Path", part: str) -> PartStatus:
    """Status of one dataset part under data root `root`."""
    root = Path(root)
    folder = PART_FOLDERS[part](root)
    if not folder.exists() and not folder.is_symlink():
        return PartStatus("missing", 0, f"{folder} not found")
    try:
        if not folder.is_dir():
            raise InputError(folder, "is not a directory (a file, or a symlink that does not resolve)")
        count, detail = PART_CHECKS[part](root)
    except InputError as exc:
        return PartStatus("malformed", 0, str(exc))
    except OSError as exc:  # an unreadable folder, a symlink loop met while listing
        return PartStatus("malformed", 0, f"{exc.filename or folder}: {exc.strerror or exc}")
    return PartStatus("present", count, detail)


def check_parts(root: "str | Path", parts: Optional[Sequence[str]] = None) -> Dict[str, PartStatus]:
    """{part: PartStatus} for `parts` (default: every part), in PART_CHECKS order."""
    wanted = list(PART_CHECKS) if parts is None else [p for p in PART_CHECKS if p in set(parts)]
    return {part: check_part(root, part) for part in wanted}


def _unknown_protocol(protocol: str) -> InputError:
    return InputError(None, f"unknown protocol {protocol!r}; known: {', '.join(PROTOCOL_DATASETS)}")


def missing_for_protocol(root: "str | Path", protocol: str,
                         statuses: Optional[Dict[str, PartStatus]] = None) -> List[str]:
    """Why `protocol` cannot run on data root `root` (one line per part); [] when it can."""
    if protocol not in PROTOCOL_DATASETS:
        raise _unknown_protocol(protocol)
    parts = PROTOCOL_DATASETS[protocol]
    if statuses is None:
        statuses = check_parts(root, parts)
    return [f"{part} {statuses[part].status}: {statuses[part].detail}"
            for part in parts if statuses[part].status != "present"]


def _requested_protocols(spec: str) -> List[str]:
    if spec.strip() in ("", "all"):
        return list(PROTOCOL_DATASETS)
    names = [name.strip() for name in spec.split(",") if name.strip()]
    for name in names:
        if name not in PROTOCOL_DATASETS:
            raise _unknown_protocol(name)
    return names


def main(args: argparse.Namespace) -> int:
    """`densebench data check ROOT [--protocols LIST] [--json]`: exit 1 if a protocol cannot run."""
    root = Path(args.root)
    if not root.is_dir():
        raise InputError(root, "data root not found")
    protocols = _requested_protocols(getattr(args, "protocols", "all") or "all")
    needed = sorted({part for name in protocols for part in PROTOCOL_DATASETS[name]},
                    key=list(PART_CHECKS).index)
    statuses = check_parts(root, needed)
    problems = {name: missing_for_protocol(root, name, statuses) for name in protocols}
    if getattr(args, "json", False):
        print(json.dumps({
            "root": str(root),
            "parts": {part: asdict(status) for part, status in statuses.items()},
            "protocols": {name: {"can_run": not problems[name], "parts": list(PROTOCOL_DATASETS[name]),
                                 "problems": problems[name]} for name in protocols},
        }, indent=2))
    else:
        print(f"data root: {root}")
        for name in protocols:
            print(f"{name}: {'ok' if not problems[name] else 'CANNOT RUN'}")
            for part in PROTOCOL_DATASETS[name]:
                status = statuses[part]
                count = f"{status.count:>7}" if status.status == "present" else " " * 7
                print(f"  {part:<20} {status.status:<9} {count}  {status.detail}")
    blocked = [name for name in protocols if problems[name]]
    if blocked:
        print(f"densebench data check: {len(blocked)} protocol(s) cannot run: {', '.join(blocked)}",
              file=sys.stderr)
        return 1
    return 0
