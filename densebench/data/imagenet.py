"""ImageNet reader (PROTOCOLS.md section 10) and the "relpath label" image-list format.

Three layouts are accepted, tried in this order for a split ("train" or "val"):
1. `meta/{split}_labeled.txt` ([DC] DenseCL layout: `meta/train.txt` holds filenames only).
2. `meta/{split}.txt` (MMSelfSup layout), lines "relpath label", e.g.
   "n01440764/n01440764_10026.JPEG 0" or "ILSVRC2012_val_00000001.JPEG 65".
3. Class folders `{split}/<wnid>/*`: labels are the positions of the wnids in sorted order
   (caffe `get_ilsvrc_aux.sh`, torchvision ImageFolder); the wnid list is taken from `train/`
   so that val labels agree with train labels.
Image paths in lists are relative to `imagenet/{split}/`.

The list format is shared with Places205 and iNat2018 (`read_image_list`): each line is parsed
by its LAST run of whitespace (MMSelfSup 0.x `ImageList`), so paths may contain spaces. A
line without an integer label is an error with the file and line number, never a silent
label of 0. Listed images must exist; this is checked with one directory listing per folder
(not one `stat` per image), which keeps 1.28 M train images to ~1000 listings.
"""
from __future__ import annotations

import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Tuple

from densebench.errors import InputError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SPLITS = ("train", "val")

# "relpath<whitespace or comma>label" where label is the last token (an integer)
_LABELED_LINE = re.compile(r"^(?P<path>.*\S)[\s,]+(?P<label>[+-]?\d+)$")


def require_file(path: Path, what: str) -> None:
    """InputError unless `path` is a file: says whether it is absent, a directory or a symlink
    that does not resolve (dangling, or a loop), so the message points at the real problem."""
    if path.is_file():
        return
    if path.is_dir():
        raise InputError(path, f"{what} is a directory, expected a file")
    if path.is_symlink():
        raise InputError(path, f"{what} is a symlink that does not resolve (dangling or a loop)")
    raise InputError(path, f"{what} not found")


def is_dir_entry(entry: os.DirEntry) -> bool:
    """`entry.is_dir()`, with a symlink loop or unreadable entry as an InputError naming it."""
    try:
        return entry.is_dir()
    except OSError as exc:
        raise InputError(entry.path, f"cannot read folder entry ({exc.strerror})") from exc


def read_text_lines(list_file: Path) -> List[Tuple[int, str]]:
    """(1-based line number, stripped text) of every non-blank line; missing file -> InputError.

    Tolerates a missing trailing newline, CRLF line ends and a UTF-8 byte-order mark.
    """
    list_file = Path(list_file)
    require_file(list_file, "list file")
    try:
        text = list_file.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(list_file, f"cannot read list file ({exc})") from exc
    return [(number, line.strip()) for number, line in enumerate(text.splitlines(), 1) if line.strip()]


def parse_labeled_line(list_file: Path, line_number: int, line: str) -> Tuple[str, int]:
    """Split "relpath label" at its last separator; a line without an integer label is an InputError."""
    match = _LABELED_LINE.match(line)
    if match is None:
        raise InputError(
            list_file,
            f"line {line_number}: {line!r} has no integer label (expected 'relpath label')",
        )
    label = int(match.group("label"))
    if label < 0:
        raise InputError(list_file, f"line {line_number}: negative label {label}")
    return match.group("path"), label


def check_images_exist(paths: Iterable[Path], list_file: "Path | None", what: str = "image") -> None:
    """Raise InputError naming the first missing file; one directory listing per folder."""
    by_folder = defaultdict(list)
    for path in paths:
        by_folder[path.parent].append(path)
    missing: List[Path] = []
    for folder, members in by_folder.items():
        try:
            present = set(os.listdir(folder))
        except OSError:
            present = set()
        missing.extend(p for p in members if p.name not in present)
    if missing:
        where = f" (listed in {list_file})" if list_file is not None else ""
        raise InputError(
            missing[0],
            f"{what} not found{where}; {len(missing)} listed {what}(s) missing in total",
        )


def read_image_list(
    list_file: "str | Path",
    image_dir: "str | Path",
    check_files: bool = True,
    relpath_fix: Optional[Callable[[str], str]] = None,
) -> List[Tuple[Path, int]]:
    """Read an OpenSelfSup/MMSelfSup ImageList file: lines "relpath label" under image_dir."""
    list_file, image_dir = Path(list_file), Path(image_dir)
    samples = []
    for number, line in read_text_lines(list_file):
        relpath, label = parse_labeled_line(list_file, number, line)
        if relpath_fix is not None:
            relpath = relpath_fix(relpath)
        samples.append((image_dir / relpath, label))
    if not samples:
        raise InputError(list_file, "list file lists no images")
    if check_files:
        check_images_exist((path for path, _ in samples), list_file)
    return samples


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _class_folders(folder: Path) -> List[str]:
    return sorted(entry.name for entry in os.scandir(folder) if is_dir_entry(entry) and not entry.name.startswith("."))


def read_class_folders(split_dir: Path, classes: List[str]) -> List[Tuple[Path, int]]:
    """Images of `split_dir/<class>/`, labelled by the class position in `classes`."""
    index_of = {name: index for index, name in enumerate(classes)}
    samples = []
    for name in _class_folders(split_dir):
        if name not in index_of:
            raise InputError(split_dir / name, "class folder not among the training classes")
        files = sorted(e.name for e in os.scandir(split_dir / name) if _is_image(e.name) and not is_dir_entry(e))
        samples.extend((split_dir / name / file, index_of[name]) for file in files)
    if not samples:
        raise InputError(split_dir, "no images found in the class folders")
    return samples


def imagenet_classes(imagenet_root: "str | Path") -> List[str]:
    """Sorted wnid folder names of `train/` (the label order of the class-folder layout)."""
    train_dir = Path(imagenet_root) / "train"
    classes = _class_folders(train_dir) if train_dir.is_dir() else []
    if not classes:
        raise InputError(train_dir, "no class folders (and no meta list) to derive ImageNet labels from")
    return classes


def read_imagenet(imagenet_root: "str | Path", split: str, check_files: bool = True) -> List[Tuple[Path, int]]:
    """(image path, label) for an ImageNet split, from a meta list or from class folders."""
    if split not in SPLITS:
        raise ValueError(f"ImageNet split must be one of {SPLITS}, got {split!r}")
    root = Path(imagenet_root)
    image_dir = root / split
    for list_file in (root / "meta" / f"{split}_labeled.txt", root / "meta" / f"{split}.txt"):
        if list_file.exists() or list_file.is_symlink():  # a directory or broken link: say so
            return read_image_list(list_file, image_dir, check_files=check_files)
    if not image_dir.is_dir():
        raise InputError(image_dir, f"ImageNet {split} split not found (no meta/{split}.txt and no {split}/ folder)")
    if not _class_folders(image_dir):
        raise InputError(
            root / "meta" / f"{split}.txt",
            f"list file not found, and {image_dir} has no class folders to label the images",
        )
    train_dir = root / "train"
    has_train_classes = train_dir.is_dir() and bool(_class_folders(train_dir))
    classes = imagenet_classes(root) if has_train_classes else _class_folders(image_dir)
    return read_class_folders(image_dir, classes)
