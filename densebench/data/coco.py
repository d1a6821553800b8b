"""COCO instances reader: a validated pycocotools COCO object plus per-image training targets.

`load_coco` checks the json before anything trains or evaluates on it, and fails with the
json path and the first problem (duplicate ids, an annotation pointing at an unknown image or
category, a malformed box or segmentation). It also makes three repairs inside the returned
COCO object, each for a known pycocotools pitfall (DESIGN.md), and documents them here:
- Annotation id 0: `COCOeval` stores the matched ground-truth id and treats id 0 as "no
  match", so a detection matched to annotation 0 counts as a false positive. When any id is
  < 1, every annotation id is shifted by the same amount so that the smallest becomes 1
  (ids are only used for matching; nothing else refers to them).
- Missing or empty `segmentation` (e.g. a crowd box with no mask, `[]`), and polygons with
  fewer than 3 points: `annToMask`/segm evaluation crash on them, so the COCO object gets an
  all-zero RLE of the image size instead (no pixels). `COCOImage.segmentations` keeps the raw
  value (`[]` when the key was missing) and `segmentation_to_mask` returns zeros for it.
- Missing `iscrowd` is set to 0 and a missing `area` to the box area.
Everything else, including zero-width boxes, stays in the COCO object, so evaluation sees the
file as written.

Training targets (`read_coco_instances`) follow MMDetection's `CocoDataset._parse_ann_info`
(the protocol of PROTOCOLS.md section 7.1): an annotation is left out of an image's targets
when `ignore` is set, when its box is narrower or lower than 1 pixel, or when its area is
<= 0. Crowd annotations are kept with `iscrowd=True` so that a training loop can treat them
as ignore regions. Labels are contiguous 0..C-1 in sorted category-id order, so id gaps
(COCO's 1..90 for 80 classes) disappear.
"""
from __future__ import annotations

import contextlib
import io
import json
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from densebench.data.imagenet import check_images_exist, require_file
from densebench.errors import InputError


@dataclass
class COCOImage:
    """One image and its training targets (boxes xyxy in absolute pixels)."""

    image_id: int
    path: Path
    width: int
    height: int
    boxes: np.ndarray  # float32 [n, 4] x1, y1, x2, y2
    labels: np.ndarray  # int64 [n], contiguous 0..C-1 in sorted category-id order
    category_ids: np.ndarray  # int64 [n], the json category ids
    iscrowd: np.ndarray  # bool [n]
    segmentations: List[Any] = field(default_factory=list)  # raw COCO segmentation objects


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _read_json(ann_file: Path) -> Dict[str, Any]:
    require_file(ann_file, "annotation file")
    try:
        with open(ann_file, "r", encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError) as exc:
        raise InputError(ann_file, f"cannot parse json ({exc})") from exc
    if not isinstance(data, dict):
        raise InputError(ann_file, "json top level is not an object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise InputError(ann_file, f"json has no '{key}' list")
    return data


def _index_unique(ann_file: Path, entries: List[Dict[str, Any]], kind: str) -> Dict[Any, Dict[str, Any]]:
    by_id: Dict[Any, Dict[str, Any]] = {}
    for position, entry in enumerate(entries):
        if not isinstance(entry, dict) or "id" not in entry:
            raise InputError(ann_file, f"{kind} entry {position} has no 'id'")
        if entry["id"] in by_id:
            raise InputError(ann_file, f"duplicate {kind} id {entry['id']}")
        by_id[entry["id"]] = entry
    return by_id


def _check_image(ann_file: Path, image: Dict[str, Any]) -> None:
    for key in ("width", "height"):
        if not _is_number(image.get(key)) or image[key] <= 0:
            raise InputError(ann_file, f"image {image['id']} has no positive '{key}'")
    if not isinstance(image.get("file_name"), str):
        raise InputError(ann_file, f"image {image['id']} has no 'file_name'")


def _segmentation_problem(seg: Any, height: int, width: int) -> "str | None":
    """Why `seg` is not a usable COCO segmentation for an image of this size, or None."""
    if isinstance(seg, list):
        for polygon in seg:
            if not isinstance(polygon, list) or not all(_is_number(v) for v in polygon):
                return "polygon is not a list of numbers"
            if len(polygon) % 2:
                return "polygon has an odd number of coordinates"
        return None
    if isinstance(seg, dict):
        size, counts = seg.get("size"), seg.get("counts")
        if not (isinstance(size, list) and len(size) == 2):
            return "RLE has no [height, width] 'size'"
        if list(size) != [height, width]:
            return f"RLE size {size} differs from the image size [{height}, {width}]"
        if not isinstance(counts, (str, bytes, list)):
            return "RLE 'counts' is neither a string nor a list"
        if isinstance(counts, list) and sum(counts) != height * width:
            return f"uncompressed RLE counts sum to {sum(counts)}, not {height * width}"
        return None
    return f"segmentation of type {type(seg).__name__}"


def _check_annotation(ann_file: Path, ann: Dict[str, Any], images: Dict, categories: Dict) -> None:
    ann_id = ann["id"]
    if ann.get("image_id") not in images:
        raise InputError(ann_file, f"annotation {ann_id} points at unknown image_id {ann.get('image_id')!r}")
    if ann.get("category_id") not in categories:
        raise InputError(
            ann_file, f"annotation {ann_id} has category_id {ann.get('category_id')!r}, which is not in 'categories'"
        )
    bbox = ann.get("bbox")
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
        raise InputError(ann_file, f"annotation {ann_id} has no [x, y, w, h] 'bbox'")
    if bbox[2] < 0 or bbox[3] < 0:
        raise InputError(ann_file, f"annotation {ann_id} has a negative box size {bbox}")
    if "segmentation" in ann:
        image = images[ann["image_id"]]
        problem = _segmentation_problem(ann["segmentation"], image["height"], image["width"])
        if problem is not None:
            raise InputError(ann_file, f"annotation {ann_id}: {problem}")


def _empty_rle(height: int, width: int) -> Dict[str, Any]:
    rle = mask_utils.encode(np.zeros((height, width), dtype=np.uint8, order="F"))
    return {"size": [height, width], "counts": rle["counts"].decode("ascii")}


def _evaluable_segmentation(seg: Any, height: int, width: int) -> Any:
    """`seg` with degenerate polygons dropped; an empty one becomes an all-zero RLE."""
    if isinstance(seg, list):
        polygons = [polygon for polygon in seg if len(polygon) >= 6]
        return polygons if polygons else _empty_rle(height, width)
    return seg


def _repair(data: Dict[str, Any], images: Dict) -> None:
    """The three documented repairs of the module docstring, in place."""
    annotations = data["annotations"]
    smallest_id = min((ann["id"] for ann in annotations), default=1)
    shift = 1 - smallest_id if smallest_id < 1 else 0
    for ann in annotations:
        ann["id"] += shift
        image = images[ann["image_id"]]
        ann.setdefault("iscrowd", 0)
        ann.setdefault("area", float(ann["bbox"][2] * ann["bbox"][3]))
        ann["segmentation"] = _evaluable_segmentation(ann.get("segmentation", []), image["height"], image["width"])


def _coco_from_dict(data: Dict[str, Any]) -> COCO:
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress lines
        coco.createIndex()
    return coco


def _load(ann_file: Path) -> Tuple[COCO, Dict[Any, Any]]:
    """Validated, repaired COCO object and {annotation id after repair: raw segmentation}."""
    data = _read_json(ann_file)
    images = _index_unique(ann_file, data["images"], "image")
    categories = _index_unique(ann_file, data["categories"], "category")
    _index_unique(ann_file, data["annotations"], "annotation")
    for image in images.values():
        _check_image(ann_file, image)
    for ann in data["annotations"]:
        _check_annotation(ann_file, ann, images, categories)
    raw_segmentations = [ann.get("segmentation", []) for ann in data["annotations"]]
    _repair(data, images)
    raw_by_id = {ann["id"]: raw for ann, raw in zip(data["annotations"], raw_segmentations)}
    return _coco_from_dict(data), raw_by_id


def load_coco(ann_file: "str | Path") -> COCO:
    """A pycocotools COCO object of a validated instances json (see the module docstring)."""
    return _load(Path(ann_file))[0]


def category_ids(coco: COCO) -> List[int]:
    """Sorted category ids; position = contiguous training label."""
    return sorted(coco.getCatIds())


def _is_training_target(ann: Dict[str, Any]) -> bool:
    """MMDetection CocoDataset._parse_ann_info: skip ignored, < 1 px wide/high, zero-area boxes."""
    _, _, width, height = ann["bbox"]
    return not ann.get("ignore", False) and width >= 1 and height >= 1 and ann["area"] > 0


def read_coco_instances(
    ann_file: "str | Path", image_dir: "str | Path", check_files: bool = True
) -> Tuple[COCO, List[COCOImage]]:
    """Validated COCO object and per-image training targets, images sorted by id."""
    ann_file, image_dir = Path(ann_file), Path(image_dir)
    coco, raw_by_id = _load(ann_file)
    label_of = {cat_id: label for label, cat_id in enumerate(category_ids(coco))}
    records = []
    for image_id in sorted(coco.getImgIds()):
        info = coco.imgs[image_id]
        targets = [ann for ann in coco.imgToAnns.get(image_id, []) if _is_training_target(ann)]
        boxes = np.asarray(
            [[x, y, x + w, y + h] for x, y, w, h in (ann["bbox"] for ann in targets)], dtype=np.float32
        ).reshape(-1, 4)
        records.append(
            COCOImage(
                image_id=image_id,
                path=image_dir / info["file_name"],
                width=int(info["width"]),
                height=int(info["height"]),
                boxes=boxes,
                labels=np.asarray([label_of[ann["category_id"]] for ann in targets], dtype=np.int64),
                category_ids=np.asarray([ann["category_id"] for ann in targets], dtype=np.int64),
                iscrowd=np.asarray([bool(ann["iscrowd"]) for ann in targets], dtype=np.bool_),
                segmentations=[raw_by_id[ann["id"]] for ann in targets],
            )
        )
    if check_files:
        check_images_exist([record.path for record in records], ann_file)
    return coco, records


def segmentation_to_mask(seg: Any, height: int, width: int) -> np.ndarray:
    """uint8 HxW 0/1 mask of a COCO segmentation: polygons, compressed or uncompressed RLE.

    An empty polygon list (or one whose polygons all have fewer than 3 points) gives zeros,
    where pycocotools' `annToMask` would crash.
    """
    if isinstance(seg, list):
        polygons = [list(map(float, polygon)) for polygon in seg if len(polygon) >= 6]
        if not polygons:
            return np.zeros((height, width), dtype=np.uint8)
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif isinstance(seg, dict):
        if list(seg.get("size", [])) != [height, width]:
            raise ValueError(f"RLE size {seg.get('size')} differs from the requested [{height}, {width}]")
        if isinstance(seg["counts"], list):
            rle = mask_utils.frPyObjects(seg, height, width)
        else:
            rle = seg
    else:
        raise ValueError(f"unsupported segmentation of type {type(seg).__name__}")
    return np.ascontiguousarray(mask_utils.decode(rle), dtype=np.uint8)
