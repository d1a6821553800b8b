"""PASCAL VOC readers: classification labels, detection XML, segmentation pairs.

Layout (PROTOCOLS.md section 10): `VOCdevkit/VOC20xx/{JPEGImages, Annotations,
ImageSets/Main, ImageSets/Segmentation, SegmentationClass, SegmentationClassAug}`.

Choices, each because real files need it:
- Image ids always come from the list file (`ImageSets/.../{split}.txt`), never from the XML
  `<filename>` (some copies carry another image's filename there).
- Class names in XML are matched after lower-casing and removing spaces, underscores and
  hyphens, so "Aeroplane ", "dining table" and "potted_plant" are read as VOC classes. Any
  other name (e.g. "airplane", "tv") is an InputError naming the XML: guessing synonyms could
  silently merge classes.
- Optional object tags (`difficult`, `truncated`, `pose`) may be missing or empty: a missing
  or empty `difficult` means 0. `truncated`/`pose` are not used.
- Coordinates are read as floats ("48", "48.0", "48.5") and kept exactly as written (VOC is
  1-based); an `<object>` without `<bndbox>` or with a missing/empty coordinate is an error.
- A box must lie in the image: VOC's 1-based range [1, width] x [1, height], with one pixel of
  slack on each side for 0-based writers and exclusive right/bottom edges, i.e. [0, width + 1].
  (MMDetection and Detectron2 do not check; the devkit's range is 1..width; SSD's caffe
  converter warns outside [0, width].) Further out is an error naming the XML: such a box
  would be clipped to a sliver or trained on as written, silently.
- `<size>` missing or zero: the size is read from the image header instead.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from densebench.data.imagenet import check_images_exist, read_text_lines, require_file
from densebench.errors import InputError

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)
# VOC +1 (present) -> 1, -1 (absent) -> 0, 0 (difficult only) -> -1 (PROTOCOLS.md section 2.2)
_CLS_ENCODING = {1: 1, -1: 0, 0: -1}
SEG_IGNORE_INDEX = 255
BOX_SLACK = 1  # pixels a box may pass the 1-based image range [1, size] on each side


def _class_key(name: str) -> str:
    return "".join(ch for ch in name.strip().lower() if ch not in " _-\t")


_CLASS_INDEX = {_class_key(name): index for index, name in enumerate(VOC_CLASSES)}


def voc_class_index(name: str) -> Optional[int]:
    """Index of a VOC class name, tolerant to case, surrounding/inner spaces, '_' and '-'."""
    return _CLASS_INDEX.get(_class_key(name))


def voc_image_path(voc_root: "str | Path", image_id: str) -> Path:
    return Path(voc_root) / "JPEGImages" / f"{image_id}.jpg"


def read_id_list(list_file: "str | Path") -> List[str]:
    """Image ids of a VOC list file (one id per line; extra columns ignored; no trailing newline ok)."""
    list_file = Path(list_file)
    ids = [line.split()[0] for _, line in read_text_lines(list_file)]
    if not ids:
        raise InputError(list_file, "list file lists no image ids")
    duplicates = _first_duplicate(ids)
    if duplicates is not None:
        raise InputError(list_file, f"image id {duplicates!r} is listed twice")
    return ids


def _first_duplicate(items: Sequence[str]) -> Optional[str]:
    seen = set()
    for item in items:
        if item in seen:
            return item
        seen.add(item)
    return None


# ----------------------------------------------------------------------------- classification


def _read_class_file(class_file: Path) -> Dict[str, int]:
    """{image id: encoded label} of one `<cls>_{split}.txt` (lines "000005 -1")."""
    labels: Dict[str, int] = {}
    for number, line in read_text_lines(class_file):
        fields = line.split()
        if len(fields) != 2 or fields[1] not in ("1", "-1", "0", "+1"):
            raise InputError(class_file, f"line {number}: {line!r} is not 'image_id 1|0|-1'")
        if fields[0] in labels:
            raise InputError(class_file, f"line {number}: image id {fields[0]!r} listed twice")
        labels[fields[0]] = _CLS_ENCODING[int(fields[1])]
    return labels


def read_voc_cls_labels(voc07_root: "str | Path", split: str) -> Tuple[List[str], np.ndarray]:
    """Image ids of `ImageSets/Main/{split}.txt` (in that order) and labels int8 [N, 20].

    Column c holds class VOC_CLASSES[c] from `ImageSets/Main/<cls>_{split}.txt`, encoded as
    PROTOCOLS.md section 2.2: 1 present, 0 absent, -1 difficult only. Every class file must
    list exactly the ids of the split file.
    """
    main = Path(voc07_root) / "ImageSets" / "Main"
    ids = read_id_list(main / f"{split}.txt")
    labels = np.zeros((len(ids), len(VOC_CLASSES)), dtype=np.int8)
    for column, name in enumerate(VOC_CLASSES):
        class_file = main / f"{name}_{split}.txt"
        by_id = _read_class_file(class_file)
        missing = [image_id for image_id in ids if image_id not in by_id]
        if missing:
            raise InputError(class_file, f"lacks image id {missing[0]!r} of {split}.txt ({len(missing)} missing)")
        if len(by_id) != len(ids):
            extra = sorted(set(by_id) - set(ids))
            raise InputError(class_file, f"lists image id {extra[0]!r} that is not in {split}.txt")
        labels[:, column] = [by_id[image_id] for image_id in ids]
    return ids, labels


# ----------------------------------------------------------------------------- detection


@dataclass
class VOCAnnotation:
    """One image's objects; boxes are xmin, ymin, xmax, ymax exactly as in the XML (1-based)."""

    image_id: str
    path: Path
    width: int
    height: int
    boxes: np.ndarray  # float32 [n, 4]
    labels: np.ndarray  # int64 [n], index into VOC_CLASSES
    difficult: np.ndarray  # bool [n]


def _text(element: Optional[ET.Element]) -> str:
    return "" if element is None or element.text is None else element.text.strip()


def _number(xml_file: Path, text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError as exc:
        raise InputError(xml_file, f"{what} is {text!r}, not a number") from exc


def _flag(xml_file: Path, text: str, what: str) -> bool:
    """0/1 tag; missing or empty -> False."""
    if text == "":
        return False
    value = _number(xml_file, text, what)
    if value not in (0.0, 1.0):
        raise InputError(xml_file, f"{what} is {text!r}, expected 0 or 1")
    return value == 1.0


def _image_size(xml_file: Path, root: ET.Element, image_path: Path) -> Tuple[int, int]:
    size = root.find("size")
    width_text, height_text = _text(size.find("width") if size is not None else None), _text(
        size.find("height") if size is not None else None
    )
    if width_text and height_text:
        width = int(_number(xml_file, width_text, "<size><width>"))
        height = int(_number(xml_file, height_text, "<size><height>"))
        if width > 0 and height > 0:
            return width, height
    try:  # size missing or 0 in the XML: read the image header (cheap, no decode)
        with Image.open(image_path) as img:
            return img.size
    except (OSError, ValueError) as exc:
        raise InputError(xml_file, f"no valid <size> and the image {image_path} cannot be opened ({exc})") from exc


def parse_voc_xml(xml_file: "str | Path", image_id: str, image_path: "str | Path") -> VOCAnnotation:
    """Parse one VOC annotation XML; the id and image path come from the caller, not the XML."""
    xml_file, image_path = Path(xml_file), Path(image_path)
    require_file(xml_file, f"annotation file for image id {image_id!r}")
    try:
        root = ET.parse(xml_file).getroot()
    except (ET.ParseError, OSError) as exc:
        raise InputError(xml_file, f"cannot parse XML ({exc})") from exc
    width, height = _image_size(xml_file, root, image_path)
    boxes, labels, difficult = [], [], []
    for number, obj in enumerate(root.findall("object"), 1):
        name = _text(obj.find("name"))
        label = voc_class_index(name)
        if label is None:
            raise InputError(xml_file, f"object {number}: unknown class name {name!r} (not a VOC class)")
        bndbox = obj.find("bndbox")
        if bndbox is None:
            raise InputError(xml_file, f"object {number} ({name}) has no <bndbox>")
        coords = []
        for tag in ("xmin", "ymin", "xmax", "ymax"):
            text = _text(bndbox.find(tag))
            if text == "":
                raise InputError(xml_file, f"object {number} ({name}): <bndbox><{tag}> is missing or empty")
            coords.append(_number(xml_file, text, f"object {number} <{tag}>"))
        if coords[2] < coords[0] or coords[3] < coords[1]:
            raise InputError(xml_file, f"object {number} ({name}): box {coords} has xmax<xmin or ymax<ymin")
        if min(coords) < 1 - BOX_SLACK or coords[2] > width + BOX_SLACK or coords[3] > height + BOX_SLACK:
            raise InputError(xml_file, f"object {number} ({name}): box {coords} lies outside the "
                                       f"{width}x{height} image (VOC coordinates run 1..{width}, 1..{height})")
        boxes.append(coords)
        labels.append(label)
        difficult.append(_flag(xml_file, _text(obj.find("difficult")), f"object {number} <difficult>"))
    return VOCAnnotation(
        image_id=image_id,
        path=image_path,
        width=width,
        height=height,
        boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        labels=np.asarray(labels, dtype=np.int64),
        difficult=np.asarray(difficult, dtype=np.bool_),
    )


def read_voc_det(voc_root: "str | Path", split: str, check_files: bool = True) -> List[VOCAnnotation]:
    """Annotations of the ids in `ImageSets/Main/{split}.txt`, in list order."""
    voc_root = Path(voc_root)
    list_file = voc_root / "ImageSets" / "Main" / f"{split}.txt"
    ids = read_id_list(list_file)
    image_paths = [voc_image_path(voc_root, image_id) for image_id in ids]
    if check_files:
        check_images_exist(image_paths, list_file)
    return [
        parse_voc_xml(voc_root / "Annotations" / f"{image_id}.xml", image_id, image_path)
        for image_id, image_path in zip(ids, image_paths)
    ]


# ----------------------------------------------------------------------------- segmentation

SEG_SPLITS = ("train", "val")


def _seg_pairs(voc12_root: Path, list_file: Path, label_dir: str) -> List[Tuple[Path, Path]]:
    """(image, label png) of a Segmentation list: ids, or "/JPEGImages/x.jpg /Seg.../x.png" pairs."""
    pairs = []
    for number, line in read_text_lines(list_file):
        fields = line.split()
        if len(fields) == 1:
            image_id = fields[0]
            pairs.append((voc_image_path(voc12_root, image_id), voc12_root / label_dir / f"{image_id}.png"))
        elif len(fields) == 2:
            pairs.append((voc12_root / fields[0].lstrip("/"), voc12_root / fields[1].lstrip("/")))
        else:
            raise InputError(list_file, f"line {number}: {line!r} is neither an image id nor an 'image label' pair")
    if not pairs:
        raise InputError(list_file, "list file lists no images")
    return pairs


def read_voc_seg_list(
    voc12_root: "str | Path", list_name: str, label_dir: str, check_files: bool = True
) -> List[Tuple[Path, Path]]:
    """(image, label png) pairs of `ImageSets/Segmentation/{list_name}.txt` with labels in `label_dir`."""
    voc12_root = Path(voc12_root)
    list_file = voc12_root / "ImageSets" / "Segmentation" / f"{list_name}.txt"
    pairs = _seg_pairs(voc12_root, list_file, label_dir)
    duplicate = _first_duplicate([str(image) for image, _ in pairs])
    if duplicate is not None:
        raise InputError(list_file, f"image {duplicate} is listed twice")
    if check_files:
        _check_pairs_exist(pairs, list_file)
    return pairs


def _check_pairs_exist(pairs: List[Tuple[Path, Path]], list_file: Path) -> None:
    check_images_exist([image for image, _ in pairs], list_file, "image")
    check_images_exist([label for _, label in pairs], list_file, "label")


def _stems(pairs: List[Tuple[Path, Path]]) -> set:
    return {image.stem for image, _ in pairs}


def read_voc_seg(voc12_root: "str | Path", split: str, check_files: bool = True) -> List[Tuple[Path, Path]]:
    """(image, label png) pairs for VOC12+Aug segmentation (PROTOCOLS.md section 8).

    "train": `train.txt` -> `SegmentationClass` followed by `aug.txt` -> `SegmentationClassAug`
    (1464 + 9118 = 10,582 in the real data). "val": `val.txt` -> `SegmentationClass` (1449).
    Overlap between train, aug and val ids is an InputError (it would train on test images
    or count images twice).
    """
    if split not in SEG_SPLITS:
        raise ValueError(f"VOC segmentation split must be one of {SEG_SPLITS}, got {split!r}")
    voc12_root = Path(voc12_root)
    seg_dir = voc12_root / "ImageSets" / "Segmentation"
    if split == "val":
        return read_voc_seg_list(voc12_root, "val", "SegmentationClass", check_files)
    train = read_voc_seg_list(voc12_root, "train", "SegmentationClass", check_files=False)
    aug = read_voc_seg_list(voc12_root, "aug", "SegmentationClassAug", check_files=False)
    both = sorted(_stems(train) & _stems(aug))
    if both:
        raise InputError(seg_dir / "aug.txt", f"image {both[0]} is in both train.txt and aug.txt ({len(both)} overlap)")
    val_file = seg_dir / "val.txt"
    if val_file.is_file():
        leaked = sorted((_stems(train) | _stems(aug)) & _stems(_seg_pairs(voc12_root, val_file, "SegmentationClass")))
        if leaked:
            raise InputError(val_file, f"val image {leaked[0]} is also a training image ({len(leaked)} overlap)")
    if check_files:
        _check_pairs_exist(train, seg_dir / "train.txt")
        _check_pairs_exist(aug, seg_dir / "aug.txt")
    return train + aug
