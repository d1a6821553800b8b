"""Places205 reader (PROTOCOLS.md sections 4 and 10).

Lists: `Places205/trainvalsplit_places205/{train,val}_places205.csv`. Despite the suffix the
lines are space separated, "a/abbey/00000001.jpg 0", and are parsed by the last separator
(MMSelfSup 0.x); a comma separator is accepted too. Images live under
`Places205/data/vision/torralba/deeplearning/images256/`. 205 classes, labels 0..204.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Tuple

from densebench.data.imagenet import read_image_list

SPLITS = ("train", "val")
IMAGE_SUBDIR = Path("data/vision/torralba/deeplearning/images256")
LIST_SUBDIR = Path("trainvalsplit_places205")


def places205_list_file(places_root: "str | Path", split: str) -> Path:
    return Path(places_root) / LIST_SUBDIR / f"{split}_places205.csv"


def read_places205(places_root: "str | Path", split: str, check_files: bool = True) -> List[Tuple[Path, int]]:
    """(image path, label) for a Places205 split; InputError naming the file on bad input."""
    if split not in SPLITS:
        raise ValueError(f"Places205 split must be one of {SPLITS}, got {split!r}")
    return read_image_list(
        places205_list_file(places_root, split), Path(places_root) / IMAGE_SUBDIR, check_files=check_files
    )
