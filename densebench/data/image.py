"""Image decoding that survives real files: one function every reader and protocol uses.

Real datasets hold images in every mode Pillow knows (L, CMYK, P with transparency, RGBA,
LA, 16-bit PNG), PNG bytes behind a `.JPEG` name and EXIF orientation tags. `load_image`
turns each of them into the RGB image a network expects, and turns every file that cannot be
decoded (missing, zero bytes, truncated, not an image) into an `InputError` naming the file,
so a bad file in a million-image list stops a run with one readable line.

Conventions chosen here (documented because each is a choice):
- EXIF orientation is applied (as OpenCV's `imread` and torchvision's `decode_image` with
  `apply_exif_orientation` do), so a phone photo stored sideways comes out upright.
- Transparent pixels (RGBA, LA, P with a `transparency` entry, PA) are composited onto
  `TRANSPARENT_BACKGROUND` (white), the way a viewer shows them, instead of exposing whatever
  colour happens to be stored under alpha 0.
- 16-bit images (`I;16*`, and `I` holding 0..65535 as Pillow gives 16-bit grey PNGs) are
  scaled linearly to 8 bit: `round(v / 257)`, so 0 -> 0 and 65535 -> 255. Pillow's own
  `convert("L")` clips instead, which turns most 16-bit images white.
- Segmentation labels are not images: `read_label_png` returns the stored indices and never
  converts colours (VOC label PNGs are palette images whose RGB look is irrelevant).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from densebench.errors import InputError

TRANSPARENT_BACKGROUND = (255, 255, 255)

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_LABEL_MODES = ("P", "L")


def _open_decoded(path: Path) -> Image.Image:
    """Open and fully decode `path` (so truncation is found now), or raise InputError."""
    try:
        size = os.path.getsize(path)
    except FileNotFoundError as exc:
        raise InputError(path, "image file not found") from exc
    except OSError as exc:
        raise InputError(path, f"cannot read image file ({exc})") from exc
    if size == 0:
        raise InputError(path, "image file is empty (0 bytes)")
    if os.path.isdir(path):
        raise InputError(path, "is a directory, expected an image file")
    try:
        with Image.open(path) as img:
            img.load()
            return img
    except Image.UnidentifiedImageError as exc:
        raise InputError(path, "not an image file (Pillow cannot identify its format)") from exc
    except Exception as exc:  # any decoder failure on a file is bad input, not a bug of ours
        raise InputError(path, f"cannot decode image, file truncated or corrupt ({type(exc).__name__}: {exc})") from exc


def _sixteen_bit_to_l(img: Image.Image, path: Path) -> Image.Image:
    """Scale a 16-bit (or 0..65535 int) grey image linearly to 8 bit."""
    values = np.asarray(img).astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise InputError(path, f"unsupported {img.mode} image with values outside 0..65535")
    scaled = np.floor(values / 257.0 + 0.5).astype(np.uint8)
    return Image.fromarray(scaled, mode="L")


def _composite_on_background(img: Image.Image) -> Image.Image:
    """Blend an image with alpha onto TRANSPARENT_BACKGROUND."""
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, TRANSPARENT_BACKGROUND + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _to_rgb(img: Image.Image, path: Path) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in _SIXTEEN_BIT_MODES:
        return _sixteen_bit_to_l(img, path).convert("RGB")
    if img.mode == "F":
        raise InputError(path, "floating-point (mode F) images are not supported; convert to 8-bit")
    if img.mode == "P" and "transparency" in img.info:
        return _composite_on_background(img)
    if img.mode in _ALPHA_MODES:
        return _composite_on_background(img)
    # L, 1, P without transparency, CMYK (Pillow reads Adobe-inverted JPEG CMYK correctly),
    # YCbCr, LAB, HSV
    return img.convert("RGB")


def load_image(path: "str | Path") -> Image.Image:
    """Decode any image file to an RGB PIL image with EXIF orientation applied.

    Raises InputError naming the file when it is missing, empty, truncated or not an image.
    """
    path = Path(path)
    img = _open_decoded(path)
    try:
        img = ImageOps.exif_transpose(img)
    except (ValueError, TypeError, KeyError, OSError, SyntaxError):
        pass  # a broken EXIF block: keep the pixels as stored, ignore the orientation
    return _to_rgb(img, path)


def read_label_png(path: "str | Path") -> np.ndarray:
    """Read a segmentation label PNG as an HxW uint8 array of class indices.

    Palette (P) PNGs give their palette indices (VOC `SegmentationClass`), L PNGs their grey
    values (mode-L copies of `SegmentationClassAug`, Cityscapes `*_labelTrainIds.png`).
    A colour (RGB/RGBA) label image is an error: its colours are not indices, and guessing
    a colour->index table silently would corrupt every label.
    """
    path = Path(path)
    img = _open_decoded(path)
    if img.mode not in _LABEL_MODES:
        raise InputError(
            path,
            f"label image has mode {img.mode}; expected a palette (P) or grey (L) PNG of class indices",
        )
    return np.array(img, dtype=np.uint8)
