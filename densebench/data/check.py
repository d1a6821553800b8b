"""`densebench data check`: which dataset parts each protocol finds under a data root.

A "part" is one split of one dataset (e.g. `voc07_det_test`). Each part is checked cheaply
with the same reader the protocols use (densebench/data/*.py): the reader lists the split and
validates its list/annotation files, then a few sample files are decoded (first, middle,
last: images, label PNGs). The result per part is
    present    the reader accepted it; `count` items
    missing    a file or folder the part needs does not exist (`detail` names it)
    malformed  it exists but the reader or a sample rejected it (`detail` = the reader's message)
A protocol can run when every part it needs is present.
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


class _Missing(Exception):
    """A path a part needs does not exist."""

    def __init__(self, path: Path):
        super().__init__(str(path))
        self.path = path


def _require(*paths: Path) -> None:
    for path in paths:
        if not path.exists():
            raise _Missing(path)


def _require_any(*paths: Path) -> None:
    if not any(path.exists() for path in paths):
        raise _Missing(paths[0])


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


def _check_label_values(path: Path, labels: np.ndarray, allowed: set, what: str) -> None:
    bad = sorted(set(np.unique(labels).tolist()) - allowed)
    if bad:
        raise InputError(path, f"{what} label PNG holds values {bad[:5]} outside {min(allowed)}..{max(allowed - {255})} and 255")


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
# each returns (count, detail) or raises _Missing / InputError


def _image_list_part(reader: Callable, dataset_root: Path, split: str, anchors: Sequence[Sequence[Path]]):
    for group in anchors:
        _require_any(*group)
    samples = reader(dataset_root, split)
    _decode_samples([path for path, _ in samples])
    classes = len({label for _, label in samples})
    return len(samples), f"{len(samples)} images, {classes} classes"


def _imagenet(split: str):
    def check(root: Path):
        from densebench.data.imagenet import read_imagenet

        base = layout.imagenet_root(root)
        return _image_list_part(read_imagenet, base, split, [[base / split]])
    return check


def _places205(split: str):
    def check(root: Path):
        from densebench.data.places205 import read_places205

        base = layout.places205_root(root)
        return _image_list_part(read_places205, base, split,
                                [[base / "trainvalsplit_places205" / f"{split}_places205.csv"],
                                 [base / "data" / "vision" / "torralba" / "deeplearning" / "images256"]])
    return check


def _inat18(split: str):
    def check(root: Path):
        from densebench.data.inat import read_inat18

        base = layout.inat18_root(root)
        return _image_list_part(read_inat18, base, split,
                                [[base / "meta" / f"{split}.txt", base / f"{split}2018.json"],
                                 [base / "train_val2018"]])
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
        _decode_samples([image for image, _ in pairs])
        for _, label_path in _samples(pairs):
            _check_label_values(label_path, read_label_png(label_path), VOC_SEG_VALUES, "VOC")
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
        _decode_samples([image for image, _ in pairs])
        for _, label_path in _samples(pairs):
            _check_label_values(label_path, read_cityscapes_label(label_path), CITYSCAPES_VALUES,
                                "Cityscapes train-id")
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
    try:
        count, detail = PART_CHECKS[part](root)
    except _Missing as exc:
        return PartStatus("missing", 0, f"{exc.path} not found")
    except InputError as exc:
        if exc.path is not None and not Path(exc.path).exists() and not Path(exc.path).parent.exists():
            return PartStatus("missing", 0, str(exc))
        return PartStatus("malformed", 0, str(exc))
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
