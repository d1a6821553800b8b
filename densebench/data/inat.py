"""iNaturalist-2018 reader (PROTOCOLS.md sections 4 and 10).

Two sources, tried in this order for a split ("train" or "val"):
1. `iNaturalist2018/meta/{split}.txt`, lines "file_name category_id" as written by MMSelfSup's
   `tools/data_converters/convert_inaturalist.py`.
2. The official `iNaturalist2018/{split}2018.json` (COCO-like: images, annotations with one
   category per image; category ids are the labels 0..8141).
Images live under `iNaturalist2018/train_val2018/`. The official `file_name` values already
start with `train_val2018/` and the converter copies them verbatim, so joining them onto the
image prefix would double it (PROTOCOLS.md section 4 note). A leading `train_val2018`
path component is therefore dropped before the join (by path component, not by characters).
"""
from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import List, Tuple

from densebench.data.imagenet import check_images_exist, read_image_list, require_file
from densebench.errors import InputError

SPLITS = ("train", "val")
IMAGE_SUBDIR = "train_val2018"


def strip_image_prefix(relpath: str) -> str:
    """'train_val2018/Plantae/7477/x.jpg' -> 'Plantae/7477/x.jpg'; other paths unchanged."""
    parts = PurePosixPath(relpath.replace("\\", "/")).parts
    if parts and parts[0] == IMAGE_SUBDIR:
        parts = parts[1:]
    return str(PurePosixPath(*parts)) if parts else relpath


def _read_official_json(json_file: Path, image_dir: Path) -> List[Tuple[Path, int]]:
    try:
        data = json.loads(json_file.read_text(encoding="utf-8"))
        images, annotations = data["images"], data["annotations"]
    except (OSError, ValueError) as exc:
        raise InputError(json_file, f"cannot parse iNat json ({exc})") from exc
    except (KeyError, TypeError) as exc:
        raise InputError(json_file, f"iNat json lacks 'images'/'annotations' ({exc})") from exc
    label_of = {}
    for ann in annotations:
        try:
            image_id, label = ann["image_id"], int(ann["category_id"])
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(json_file, f"annotation {ann!r} lacks image_id/category_id") from exc
        if image_id in label_of and label_of[image_id] != label:
            raise InputError(json_file, f"image_id {image_id} has two different category ids")
        label_of[image_id] = label
    samples = []
    for image in images:
        try:
            image_id, file_name = image["id"], image["file_name"]
        except (KeyError, TypeError) as exc:
            raise InputError(json_file, f"image entry {image!r} lacks id/file_name") from exc
        if image_id not in label_of:
            raise InputError(json_file, f"image {file_name!r} (id {image_id}) has no annotation")
        samples.append((image_dir / strip_image_prefix(file_name), label_of[image_id]))
    known_ids = {image["id"] for image in images}
    unknown = [image_id for image_id in label_of if image_id not in known_ids]
    if unknown:
        raise InputError(json_file, f"annotation points at unknown image_id {unknown[0]}")
    if not samples:
        raise InputError(json_file, "json lists no images")
    return samples


def read_inat18(inat_root: "str | Path", split: str, check_files: bool = True) -> List[Tuple[Path, int]]:
    """(image path, label) for an iNat2018 split; InputError naming the file on bad input."""
    if split not in SPLITS:
        raise ValueError(f"iNat2018 split must be one of {SPLITS}, got {split!r}")
    root = Path(inat_root)
    image_dir = root / IMAGE_SUBDIR
    list_file = root / "meta" / f"{split}.txt"
    if list_file.exists() or list_file.is_symlink():  # a directory or broken link: say so
        return read_image_list(list_file, image_dir, check_files=check_files, relpath_fix=strip_image_prefix)
    json_file = root / f"{split}2018.json"
    if not json_file.exists() and not json_file.is_symlink():
        raise InputError(list_file, f"list file not found (and no {json_file.name} beside it)")
    require_file(json_file, "iNat json")
    samples = _read_official_json(json_file, image_dir)
    if check_files:
        check_images_exist((path for path, _ in samples), json_file)
    return samples
