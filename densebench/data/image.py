"""Image decoding that survives real files (PROVISIONAL: hardened by the data-layer work)."""
from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageOps

from densebench.errors import InputError


def load_image(path: "str | Path") -> Image.Image:
    """Decode any image file to an RGB PIL image with EXIF orientation applied."""
    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(path, f"cannot decode image ({exc})") from exc
