"""A synthetic benchmark written in the real dataset layouts (PROTOCOLS.md section 10).

One scene generator renders objects of 20 classes (named as the 20 VOC classes, each a
distinct shape x colour x texture) on textured backgrounds. Every object's mask comes from
rasterising one polygon with pycocotools, the same rasteriser `annToMask` uses, so boxes,
instance masks, semantic masks and COCO polygons agree pixel for pixel. Objects of one
scene never overlap (their boxes keep a gap), so the visible mask is the whole polygon.

The classification sets are learnable on purpose: an ImageNet-style image shows one
dominant object whose class is the label, painted (like its distractors) in a random colour
half of the time, so that colour is a partial cue and the rest takes shape and texture (a model
that learns them beats random features, which mostly see colour), a Places-style label is the scene's background kind and palette, and an
iNat-style label is again the dominant object. VOC, COCO and Cityscapes scenes hold several
objects with exact boxes and masks; small VOC objects are marked difficult.

Everything derives from one seed (one `numpy.random.Generator` per dataset part, spawned
from `SeedSequence([seed, part])`), JPEG quality is fixed and files are written in a fixed
order, so the same seed gives the same bytes. The tree is written into a temporary folder
under OUT and each dataset folder is renamed into place only when complete.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from densebench.data import layout
from densebench.errors import InputError

log = logging.getLogger(__name__)

JPEG_QUALITY = 90
MARKER_FILE = "SYNTHETIC.json"  # written at OUT; lets a later run replace its own output
DATASET_DIRS = ("imagenet", "Places205", "iNaturalist2018", "VOCdevkit", "coco", "cityscapes")

# The 20 object classes, named and ordered as the VOC classes (alphabetical).
OBJECT_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)
SHAPES = ("circle", "square", "triangle", "diamond", "hexagon", "star", "cross", "ellipse",
          "arrow", "trapezoid")
COLOURS = (  # saturated, far apart; backgrounds are muted so objects stand out
    (220, 40, 40), (40, 180, 60), (40, 70, 220), (235, 210, 40), (200, 50, 200),
    (40, 200, 210), (245, 140, 30), (120, 50, 170), (235, 235, 235), (25, 25, 25),
)
TEXTURES = ("solid", "hstripes", "checker", "dots")
BACKGROUNDS = ("noise", "stripes", "gradient", "blocks")


def object_style(category: int) -> Tuple[str, Tuple[int, int, int], str]:
    """(shape, colour, texture) of object class `category`: unique per class.

    Classes c and c+10 share a shape but differ in colour and texture, classes 0..9 differ
    in shape and colour, so every class is a distinct combination."""
    shape = SHAPES[category % 10]
    colour = COLOURS[(category + 5 * (category // 10)) % 10]
    texture = TEXTURES[(category + 2 * (category // 10)) % 4]
    return shape, colour, texture


# ----------------------------------------------------------------------------- scales


@dataclass(frozen=True)
class Scale:
    cls_size: int              # side of ImageNet/Places/iNat images
    imagenet_classes: int
    imagenet_train: int        # per class
    imagenet_val: int          # per class
    places_classes: int
    places_train: int
    places_val: int
    inat_train: int            # per category (8 categories)
    inat_val: int
    voc_size: Tuple[int, int]  # (width, height) of landscape VOC/COCO images
    voc07_trainval: int
    voc07_test: int
    voc12_seg_train: int
    voc12_seg_val: int
    voc12_seg_aug: int
    coco_train: int
    coco_val: int
    cityscapes_size: Tuple[int, int]
    cityscapes_train_per_city: int
    cityscapes_train_cities: Tuple[str, ...]
    cityscapes_val: int


SCALES: Dict[str, Scale] = {
    # val sets of 128-200 images: at 32-50 a single run's top-1 had a binomial std of ~7 points,
    # more than any gap between checkpoints
    "tiny": Scale(cls_size=96, imagenet_classes=10, imagenet_train=16, imagenet_val=20,
                  places_classes=8, places_train=12, places_val=16, inat_train=12, inat_val=16,
                  voc_size=(160, 120), voc07_trainval=100, voc07_test=100,
                  voc12_seg_train=24, voc12_seg_val=16, voc12_seg_aug=24,
                  coco_train=48, coco_val=32, cityscapes_size=(256, 128),
                  cityscapes_train_per_city=6, cityscapes_train_cities=("aachen", "bochum"),
                  cityscapes_val=4),
    "small": Scale(cls_size=128, imagenet_classes=20, imagenet_train=80, imagenet_val=20,
                   places_classes=8, places_train=80, places_val=25, inat_train=60, inat_val=20,
                   voc_size=(320, 240), voc07_trainval=500, voc07_test=500,
                   voc12_seg_train=120, voc12_seg_val=80, voc12_seg_aug=120,
                   coco_train=300, coco_val=80, cityscapes_size=(512, 256),
                   cityscapes_train_per_city=20,
                   cityscapes_train_cities=("aachen", "bochum", "bremen"), cityscapes_val=20),
}

# ----------------------------------------------------------------------------- rasterising


def rasterise_polygon(polygon: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bool mask of a polygon (Nx2 float x,y) with the pycocotools rasteriser.

    The COCO files store the same polygon, so `annToMask` reproduces this mask exactly."""
    from pycocotools import mask as mask_utils

    rles = mask_utils.frPyObjects([polygon.reshape(-1).tolist()], height, width)
    with warnings.catch_warnings():  # pycocotools' numpy-2 `copy=` DeprecationWarning, not ours
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(rles)[:, :, 0].astype(bool)


def shape_polygon(shape: str, cx: float, cy: float, w: float, h: float, angle: float) -> np.ndarray:
    """Polygon vertices (Nx2, x,y) of a shape inscribed in a w x h box centred at (cx, cy)."""
    if shape in ("circle", "ellipse"):
        t = np.linspace(0, 2 * np.pi, 20, endpoint=False)
        pts = np.stack([np.cos(t), np.sin(t) * (0.55 if shape == "ellipse" else 1.0)], 1)
    elif shape == "square":
        pts = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float) * 0.85
    elif shape == "triangle":
        pts = np.array([[0, -1], [1, 0.8], [-1, 0.8]], float)
    elif shape == "diamond":
        pts = np.array([[0, -1], [0.75, 0], [0, 1], [-0.75, 0]], float)
    elif shape == "hexagon":
        t = np.linspace(0, 2 * np.pi, 6, endpoint=False)
        pts = np.stack([np.cos(t), np.sin(t)], 1)
    elif shape == "star":
        t = np.linspace(-np.pi / 2, 1.5 * np.pi, 10, endpoint=False)
        radius = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        pts = np.stack([np.cos(t) * radius, np.sin(t) * radius], 1)
    elif shape == "cross":
        a = 0.33
        pts = np.array([[-a, -1], [a, -1], [a, -a], [1, -a], [1, a], [a, a], [a, 1], [-a, 1],
                        [-a, a], [-1, a], [-1, -a], [-a, -a]], float)
    elif shape == "arrow":
        pts = np.array([[-1, -0.35], [0.1, -0.35], [0.1, -0.9], [1, 0], [0.1, 0.9], [0.1, 0.35],
                        [-1, 0.35]], float)
    elif shape == "trapezoid":
        pts = np.array([[-0.45, -0.7], [0.45, -0.7], [1, 0.7], [-1, 0.7]], float)
    else:
        raise ValueError(shape)
    cos, sin = np.cos(angle), np.sin(angle)
    rot = pts @ np.array([[cos, sin], [-sin, cos]])
    return np.stack([cx + rot[:, 0] * w / 2, cy + rot[:, 1] * h / 2], 1)


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation with a (2r+1)^2 square, by shifting (numpy only)."""
    out = mask.copy()
    h, w = mask.shape
    padded = np.pad(mask, radius)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            out |= padded[radius + dy:radius + dy + h, radius + dx:radius + dx + w]
    return out


def erode(mask: np.ndarray, radius: int) -> np.ndarray:
    return ~dilate(~mask, radius)


def mask_box(mask: np.ndarray) -> Tuple[int, int, int, int]:
    """(x0, y0, x1, y1), 0-based inclusive pixel extents of a non-empty mask."""
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


# ----------------------------------------------------------------------------- painting


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cell: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a coarse random grid resized bilinearly."""
    grid = rng.random((height // cell + 2, width // cell + 2)).astype(np.float32)
    img = Image.fromarray(grid, mode="F").resize((width, height), Image.BILINEAR)
    return np.asarray(img, dtype=np.float32)


def _muted_colour(rng: np.random.Generator, palette: Optional[int] = None) -> np.ndarray:
    """A desaturated colour; palette 0 = warm, 1 = cool, None = any."""
    base = rng.uniform(70, 180, 3)
    if palette is None:
        grey = base.mean()
        return np.clip(grey + 0.45 * (base - grey), 0, 255).astype(np.float32)
    tint = np.array([1.25, 0.95, 0.6]) if palette == 0 else np.array([0.6, 0.95, 1.25])
    return np.clip(base.mean() * tint + rng.normal(0, 8, 3), 0, 255).astype(np.float32)


def render_background(rng: np.random.Generator, height: int, width: int,
                      kind: Optional[str] = None, palette: Optional[int] = None) -> np.ndarray:
    """float32 HxWx3 textured background: noise, stripes, gradient or blocks."""
    kind = kind if kind is not None else BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    c1, c2 = _muted_colour(rng, palette), _muted_colour(rng, palette)
    yy, xx = np.ogrid[0:height, 0:width]
    yy, xx = yy.astype(np.float32), xx.astype(np.float32)
    if kind == "noise":
        t = _smooth_noise(rng, height, width, cell=int(rng.integers(6, 14)))
    elif kind == "stripes":
        angle = rng.uniform(0, np.pi)
        period = rng.uniform(7, 16)
        t = ((xx * np.cos(angle) + yy * np.sin(angle)) / period % 2 < 1).astype(np.float32)
    elif kind == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        proj = xx * np.cos(angle) + yy * np.sin(angle)
        t = (proj - proj.min()) / max(float(np.ptp(proj)), 1.0)
    elif kind == "blocks":
        cell = int(rng.integers(10, 24))
        t = 0.25 + 0.5 * ((xx // cell + yy // cell) % 2).astype(np.float32)
    else:
        raise ValueError(kind)
    t = np.broadcast_to(t, (height, width))[..., None]
    img = c1 + (c2 - c1) * t
    img += rng.standard_normal((height, width, 1), dtype=np.float32) * 5
    return img


def _texture(texture: str, yy: np.ndarray, xx: np.ndarray, period: int) -> np.ndarray:
    """Brightness factor of an object texture at image coordinates (yy, xx)."""
    if texture == "solid":
        return np.ones(np.broadcast_shapes(yy.shape, xx.shape), np.float32)
    if texture == "hstripes":
        return np.where((yy // period) % 2 == 0, 1.0, 0.5).astype(np.float32)
    if texture == "checker":
        return np.where((yy // period + xx // period) % 2 == 0, 1.0, 0.5).astype(np.float32)
    if texture == "dots":
        cy, cx = yy % (2 * period) - period, xx % (2 * period) - period
        return np.where(cy * cy + cx * cx <= (period * 0.6) ** 2, 0.45, 1.0).astype(np.float32)
    raise ValueError(texture)


def paint_object(rng: np.random.Generator, canvas: np.ndarray, mask: np.ndarray, category: int,
                 recolour_prob: float = 0.0) -> None:
    """Paint class `category`'s colour x texture into `canvas` (float HxWx3) where `mask`;
    with probability `recolour_prob`, a colour drawn at random instead of the class's own (then
    only shape and texture tell the class).

    The texture is anchored to image coordinates; only the mask's bounding box is touched."""
    _, colour, texture = object_style(category)
    if recolour_prob > 0 and rng.random() < recolour_prob:
        colour = COLOURS[int(rng.integers(len(COLOURS)))]
    h, w = mask.shape
    period = max(2, int(round(min(h, w) / 24)))
    x0, y0, x1, y1 = mask_box(mask)
    yy, xx = np.ogrid[y0:y1 + 1, x0:x1 + 1]
    factor = np.broadcast_to(_texture(texture, yy, xx, period), (y1 - y0 + 1, x1 - x0 + 1))
    colour = np.asarray(colour, np.float32) * rng.uniform(0.85, 1.1)
    if texture != "solid":
        colour = np.maximum(colour, 60.0)  # keep dark classes' texture visible
    local = mask[y0:y1 + 1, x0:x1 + 1]
    canvas[y0:y1 + 1, x0:x1 + 1][local] = colour[None, :] * factor[local][:, None]


def to_uint8(canvas: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- scenes


@dataclass
class Instance:
    category: int                     # object class index into OBJECT_CLASSES
    polygon: np.ndarray               # Nx2 (x, y) vertices, already inside the image
    mask: np.ndarray                  # bool HxW, rasterised from `polygon`
    box: Tuple[int, int, int, int]    # 0-based inclusive extents of `mask`
    truncated: bool = False
    difficult: bool = False


@dataclass
class Scene:
    image: np.ndarray                 # uint8 HxWx3
    instances: List[Instance] = field(default_factory=list)

    def semantic(self, border: int) -> np.ndarray:
        """uint8 HxW VOC labels: 0 background, c+1 class, 255 a band of `border` px each side
        of every object outline (VOC style); border=0 gives the SBD-style map without band."""
        labels = np.zeros(self.image.shape[:2], np.uint8)
        for inst in self.instances:
            labels[inst.mask] = inst.category + 1
        if border > 0:
            for inst in self.instances:
                band = dilate(inst.mask, border) & ~erode(inst.mask, border)
                labels[band] = 255
        return labels


def _boxes_overlap(a: Tuple[float, float, float, float], b: Tuple[float, float, float, float],
                   gap: float) -> bool:
    return not (a[2] + gap < b[0] or b[2] + gap < a[0] or a[3] + gap < b[1] or b[3] + gap < a[1])


def place_object(rng: np.random.Generator, height: int, width: int, category: int,
                 size: float, taken: List[Tuple[float, float, float, float]],
                 allow_truncation: bool = True, tries: int = 30) -> Optional[Instance]:
    """Place one object of side ~`size` px without touching the boxes in `taken`."""
    shape, _, _ = object_style(category)
    for _ in range(tries):
        aspect = rng.uniform(0.8, 1.25)
        w, h = size * aspect, size / aspect
        margin = -0.2 * size if allow_truncation else 1.0
        lo_x, hi_x = w / 2 + margin, width - 1 - w / 2 - margin
        lo_y, hi_y = h / 2 + margin, height - 1 - h / 2 - margin
        if hi_x <= lo_x or hi_y <= lo_y:
            return None
        cx, cy = rng.uniform(lo_x, hi_x), rng.uniform(lo_y, hi_y)
        angle = rng.uniform(-0.25, 0.25)
        poly = shape_polygon(shape, cx, cy, w, h, angle)
        truncated = bool((poly[:, 0] < 0).any() or (poly[:, 0] > width - 1).any()
                         or (poly[:, 1] < 0).any() or (poly[:, 1] > height - 1).any())
        poly[:, 0] = np.clip(poly[:, 0], 0, width - 1)
        poly[:, 1] = np.clip(poly[:, 1], 0, height - 1)
        poly = np.round(poly, 2)
        extent = (poly[:, 0].min(), poly[:, 1].min(), poly[:, 0].max(), poly[:, 1].max())
        if any(_boxes_overlap(extent, other, gap=4) for other in taken):
            continue
        mask = rasterise_polygon(poly, height, width)
        if mask.sum() < 12:
            continue
        taken.append(extent)
        return Instance(category, poly, mask, mask_box(mask), truncated=truncated)
    return None


def render_scene(rng: np.random.Generator, height: int, width: int,
                 objects: Sequence[Tuple[int, float]], background: Optional[str] = None,
                 palette: Optional[int] = None, allow_truncation: bool = True,
                 recolour_prob: float = 0.0) -> Scene:
    """A scene with the requested (category, size in px) objects, biggest first; an object
    that finds no free place is left out (the first one always fits on an empty canvas).
    `recolour_prob`: how often an object takes a random colour (see paint_object)."""
    canvas = render_background(rng, height, width, background, palette)
    taken: List[Tuple[float, float, float, float]] = []
    instances = []
    for category, size in objects:
        inst = place_object(rng, height, width, category, size, taken, allow_truncation)
        if inst is not None:
            paint_object(rng, canvas, inst.mask, category, recolour_prob)
            instances.append(inst)
    return Scene(to_uint8(canvas), instances)


# ----------------------------------------------------------------------------- writing


def _save_jpeg(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, format="JPEG", quality=JPEG_QUALITY)


def _save_png(path: Path, image: Image.Image) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")


def _write_lines(path: Path, lines: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, separators=(",", ":")))


def voc_palette() -> List[int]:
    """The standard PASCAL VOC colour map (bit-interleaved), 256 RGB entries flat."""
    palette = []
    for index in range(256):
        r = g = b = 0
        cid = index
        for shift in range(7, -1, -1):
            r |= ((cid >> 0) & 1) << shift
            g |= ((cid >> 1) & 1) << shift
            b |= ((cid >> 2) & 1) << shift
            cid >>= 3
        palette.extend((r, g, b))
    return palette


VOC_PALETTE = voc_palette()


def _voc_label_png(labels: np.ndarray) -> Image.Image:
    img = Image.fromarray(labels, mode="L").convert("P")  # indices kept, then the VOC palette
    img.putpalette(VOC_PALETTE)
    return img


def _part_rng(seed: int, part: str) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(part.encode())]))


# ----------------------------------------------------------------------------- classification sets

IMAGENET_WNIDS = (
    "n01440764", "n01443537", "n01484850", "n01491361", "n01494475", "n01496331", "n01498041",
    "n01514668", "n01514859", "n01518878", "n01530575", "n01531178", "n01532829", "n01534433",
    "n01537544", "n01558993", "n01560419", "n01580077", "n01582220", "n01592084",
)


# How often an object of a classification image takes a random colour. At 1.0 only shape and
# texture tell the class and every tiny probe (random init and the tiny DenseCL alike) stays
# within 10 points of chance; at 0 colour alone solves it and random init saturates (86-94%).
CLS_RECOLOUR_PROB = 0.5


def _dominant_object_scene(rng: np.random.Generator, size: int, category: int) -> Scene:
    """A classification image: one object of `category` at a varied scale and 1-3 smaller
    distractors, each in a random colour half of the time, so that colour (which random conv
    features pick up) is only a partial cue and the rest takes shape and texture."""
    objects = [(category, rng.uniform(0.38, 0.7) * size)]
    for _ in range(int(rng.integers(1, 4))):
        other = int(rng.integers(len(OBJECT_CLASSES)))
        objects.append((other, rng.uniform(0.14, 0.28) * size))
    return render_scene(rng, size, size, objects, allow_truncation=False, recolour_prob=CLS_RECOLOUR_PROB)


def write_imagenet(root: Path, scale: Scale, seed: int) -> None:
    """imagenet/train/<wnid>/<wnid>_<n>.JPEG, flat val/, meta/{train,val}.txt (sorted-wnid labels)."""
    rng = _part_rng(seed, "imagenet")
    wnids = sorted(IMAGENET_WNIDS[:scale.imagenet_classes])
    train_lines, val_entries = [], []
    for label, wnid in enumerate(wnids):
        numbers = sorted(rng.choice(np.arange(1, 40000), scale.imagenet_train, replace=False))
        for number in numbers:
            rel = f"{wnid}/{wnid}_{int(number)}.JPEG"
            _save_jpeg(root / "train" / rel, _dominant_object_scene(rng, scale.cls_size, label).image)
            train_lines.append(f"{rel} {label}")
        for _ in range(scale.imagenet_val):
            val_entries.append((label, _dominant_object_scene(rng, scale.cls_size, label).image))
    order = rng.permutation(len(val_entries))  # real val files interleave the classes
    val_lines = []
    for index, entry_index in enumerate(order, start=1):
        label, image = val_entries[int(entry_index)]
        name = f"ILSVRC2012_val_{index:08d}.JPEG"
        _save_jpeg(root / "val" / name, image)
        val_lines.append(f"{name} {label}")
    _write_lines(root / "meta" / "train.txt", train_lines)
    _write_lines(root / "meta" / "val.txt", val_lines)


PLACES_CLASSES = ("a/abbey", "b/beach", "c/corridor", "f/forest_path", "h/highway", "k/kitchen",
                  "m/mountain", "s/skyscraper")


def _places_scene(rng: np.random.Generator, size: int, label: int) -> Scene:
    """A scene-like image: the label is the background kind x palette; objects are clutter."""
    kind = BACKGROUNDS[label % 4]
    palette = (label // 4) % 2
    objects = [(int(rng.integers(len(OBJECT_CLASSES))), rng.uniform(0.15, 0.3) * size)
               for _ in range(int(rng.integers(0, 3)))]
    return render_scene(rng, size, size, objects, background=kind, palette=palette)


def write_places205(root: Path, scale: Scale, seed: int) -> None:
    """Places205/trainvalsplit_places205/{train,val}_places205.csv + images256/<l>/<class>/*.jpg."""
    rng = _part_rng(seed, "places205")
    classes = sorted(PLACES_CLASSES[:scale.places_classes])
    image_dir = root / "data" / "vision" / "torralba" / "deeplearning" / "images256"
    lines: Dict[str, List[str]] = {"train": [], "val": []}
    for label, cls in enumerate(classes):
        count = scale.places_train + scale.places_val
        for number in range(1, count + 1):
            rel = f"{cls}/{number:08d}.jpg"
            _save_jpeg(image_dir / rel, _places_scene(rng, scale.cls_size, label).image)
            split = "train" if number <= scale.places_train else "val"
            lines[split].append(f"{rel} {label}")
    for split in ("train", "val"):
        _write_lines(root / "trainvalsplit_places205" / f"{split}_places205.csv", lines[split])


INAT_CATEGORIES = (  # (supercategory, name); ids are positions, as in iNat2018 (0..8141)
    ("Aves", "Turdus migratorius"), ("Aves", "Cyanocitta cristata"), ("Aves", "Ardea herodias"),
    ("Insecta", "Danaus plexippus"), ("Insecta", "Apis mellifera"), ("Insecta", "Coccinella septempunctata"),
    ("Plantae", "Quercus alba"), ("Plantae", "Taraxacum officinale"),
)


def write_inat18(root: Path, scale: Scale, seed: int) -> None:
    """iNaturalist2018/train_val2018/<super>/<cat id>/<hex>.jpg, {train,val}2018.json, meta/*.txt.

    meta lines carry the json `file_name` verbatim ("train_val2018/..."), as the official
    converter writes them."""
    rng = _part_rng(seed, "inat18")
    images: Dict[str, list] = {"train": [], "val": []}
    annotations: Dict[str, list] = {"train": [], "val": []}
    lines: Dict[str, List[str]] = {"train": [], "val": []}
    next_id = 1
    for cat_id, (supercategory, _) in enumerate(INAT_CATEGORIES):
        for index in range(scale.inat_train + scale.inat_val):
            split = "train" if index < scale.inat_train else "val"
            digest = "".join(f"{int(v):02x}" for v in rng.integers(0, 256, 16))
            file_name = f"train_val2018/{supercategory}/{cat_id}/{digest}.jpg"
            scene = _dominant_object_scene(rng, scale.cls_size, 10 + cat_id)
            _save_jpeg(root / file_name, scene.image)
            images[split].append({"id": next_id, "file_name": file_name, "width": scale.cls_size,
                                  "height": scale.cls_size, "license": 1,
                                  "rights_holder": "densebench synthetic"})
            annotations[split].append({"id": next_id, "image_id": next_id, "category_id": cat_id})
            lines[split].append(f"{file_name} {cat_id}")
            next_id += 1
    categories = [{"id": cat_id, "name": name, "supercategory": supercategory, "kingdom":
                   "Animalia" if supercategory != "Plantae" else "Plantae"}
                  for cat_id, (supercategory, name) in enumerate(INAT_CATEGORIES)]
    for split in ("train", "val"):
        _write_json(root / f"{split}2018.json", {
            "info": {"description": "densebench synthetic iNat2018-style data", "year": 2018},
            "licenses": [{"id": 1, "name": "synthetic", "url": ""}],
            "images": images[split], "annotations": annotations[split], "categories": categories})
        _write_lines(root / "meta" / f"{split}.txt", lines[split])


# ----------------------------------------------------------------------------- VOC


def _voc_objects(rng: np.random.Generator, width: int, height: int, primary: int) -> List[Tuple[int, float]]:
    """Objects of a VOC scene: a large primary object, 0-2 more, sometimes a tiny one.

    Objects cover about a quarter of the image (background ~75% of pixels, close to real VOC's
    ~70%); with the earlier 0.32-0.55 primary the background held 92% of the pixels and the tiny
    FCN and detector learnt background only."""
    short = min(width, height)
    objects = [(primary, rng.uniform(0.6, 0.9) * short)]
    for _ in range(int(rng.integers(0, 3))):
        objects.append((int(rng.integers(len(OBJECT_CLASSES))), rng.uniform(0.22, 0.4) * short))
    if rng.random() < 0.35:
        objects.append((int(rng.integers(len(OBJECT_CLASSES))), rng.uniform(7, 10)))
    return objects


def voc_scene(rng: np.random.Generator, width: int, height: int, primary: int) -> Scene:
    scene = render_scene(rng, height, width, _voc_objects(rng, width, height, primary))
    for inst in scene.instances:
        inst.difficult = bool(inst.mask.sum() < 60)  # small objects, as VOC marks them
    return scene


def voc_xml(folder: str, image_id: str, width: int, height: int, scene: Scene, segmented: bool) -> str:
    """A VOC annotation with the standard tags; boxes are 1-based inclusive pixel indices."""
    parts = [
        "<annotation>", f"\t<folder>{folder}</folder>", f"\t<filename>{image_id}.jpg</filename>",
        "\t<source>", f"\t\t<database>The {folder} Database</database>",
        f"\t\t<annotation>PASCAL {folder}</annotation>", "\t\t<image>densebench synthetic</image>",
        "\t</source>", "\t<size>", f"\t\t<width>{width}</width>", f"\t\t<height>{height}</height>",
        "\t\t<depth>3</depth>", "\t</size>", f"\t<segmented>{int(segmented)}</segmented>",
    ]
    for inst in scene.instances:
        x0, y0, x1, y1 = inst.box
        parts += [
            "\t<object>", f"\t\t<name>{OBJECT_CLASSES[inst.category]}</name>",
            "\t\t<pose>Unspecified</pose>", f"\t\t<truncated>{int(inst.truncated)}</truncated>",
            f"\t\t<difficult>{int(inst.difficult)}</difficult>", "\t\t<bndbox>",
            f"\t\t\t<xmin>{x0 + 1}</xmin>", f"\t\t\t<ymin>{y0 + 1}</ymin>",
            f"\t\t\t<xmax>{x1 + 1}</xmax>", f"\t\t\t<ymax>{y1 + 1}</ymax>", "\t\t</bndbox>",
            "\t</object>",
        ]
    parts.append("</annotation>")
    return "\n".join(parts) + "\n"


def _voc_image_size(rng: np.random.Generator, scale: Scale) -> Tuple[int, int]:
    """(width, height): mostly landscape, one in five portrait, as in VOC."""
    width, height = scale.voc_size
    return (height, width) if rng.random() < 0.2 else (width, height)


def _cls_label(scene: Scene, category: int) -> int:
    """VOC cls file value: 1 a non-difficult instance, 0 only difficult ones, -1 none."""
    flags = [inst.difficult for inst in scene.instances if inst.category == category]
    if not flags:
        return -1
    return 1 if not all(flags) else 0


def write_voc2007(root: Path, scale: Scale, seed: int) -> None:
    """VOC2007: JPEGImages, Annotations, ImageSets/Main/{trainval,test,<cls>_*}.txt.

    Image i's primary (non-difficult) object is class i mod 20 within each split, so every
    class has >= trainval/20 positives in both splits (low-shot needs k positives)."""
    rng = _part_rng(seed, "voc2007")
    total = scale.voc07_trainval + scale.voc07_test
    numbers = np.sort(rng.choice(np.arange(1, 4 * total), total, replace=False))
    is_test = np.zeros(total, bool)
    is_test[rng.choice(total, scale.voc07_test, replace=False)] = True
    counters = {False: 0, True: 0}
    split_ids: Dict[str, List[str]] = {"trainval": [], "test": []}
    labels: Dict[str, Dict[str, List[int]]] = {"trainval": {}, "test": {}}
    for number, test in zip(numbers, is_test):
        image_id = f"{int(number):06d}"
        split = "test" if test else "trainval"
        primary = counters[bool(test)] % len(OBJECT_CLASSES)
        counters[bool(test)] += 1
        width, height = _voc_image_size(rng, scale)
        scene = voc_scene(rng, width, height, primary)
        _save_jpeg(root / "JPEGImages" / f"{image_id}.jpg", scene.image)
        (root / "Annotations").mkdir(parents=True, exist_ok=True)
        (root / "Annotations" / f"{image_id}.xml").write_text(
            voc_xml("VOC2007", image_id, width, height, scene, segmented=False))
        split_ids[split].append(image_id)
        for category in range(len(OBJECT_CLASSES)):
            labels[split].setdefault(OBJECT_CLASSES[category], []).append(_cls_label(scene, category))
    main = root / "ImageSets" / "Main"
    for split, ids in split_ids.items():
        _write_lines(main / f"{split}.txt", ids)
        for name in OBJECT_CLASSES:
            # the devkit writes '%s %2d' ("000005 -1", "000007  1")
            _write_lines(main / f"{name}_{split}.txt",
                         [f"{image_id} {value:2d}" for image_id, value in zip(ids, labels[split][name])])


def write_voc2012(root: Path, scale: Scale, seed: int) -> None:
    """VOC2012: JPEGImages, Annotations, Main/trainval.txt, SegmentationClass(+Aug), Segmentation lists.

    train/val ids get XML + SegmentationClass (255 border band) and are the detection
    trainval; aug ids (disjoint) get SegmentationClassAug without band, like SBD; train ids
    also get an SBD-style SegmentationClassAug label (as the converted SBD covers them)."""
    rng = _part_rng(seed, "voc2012")
    counts = {"train": scale.voc12_seg_train, "val": scale.voc12_seg_val, "aug": scale.voc12_seg_aug}
    total = sum(counts.values())
    numbers = np.sort(rng.choice(np.arange(1, 3 * total), total, replace=False))
    ids = [f"2008_{int(n):06d}" for n in numbers]
    order = rng.permutation(total)
    split_of: Dict[str, str] = {}
    start = 0
    for split, count in counts.items():
        for index in order[start:start + count]:
            split_of[ids[int(index)]] = split
        start += count
    split_ids: Dict[str, List[str]] = {"train": [], "val": [], "aug": []}
    border = 1 if max(scale.voc_size) <= 200 else 2
    for position, image_id in enumerate(ids):
        split = split_of[image_id]
        width, height = _voc_image_size(rng, scale)
        scene = voc_scene(rng, width, height, position % len(OBJECT_CLASSES))
        _save_jpeg(root / "JPEGImages" / f"{image_id}.jpg", scene.image)
        (root / "Annotations").mkdir(parents=True, exist_ok=True)
        (root / "Annotations" / f"{image_id}.xml").write_text(
            voc_xml("VOC2012", image_id, width, height, scene, segmented=split != "aug"))
        if split in ("train", "val"):
            _save_png(root / "SegmentationClass" / f"{image_id}.png", _voc_label_png(scene.semantic(border)))
        if split in ("train", "aug"):
            _save_png(root / "SegmentationClassAug" / f"{image_id}.png", _voc_label_png(scene.semantic(0)))
        split_ids[split].append(image_id)
    seg = root / "ImageSets" / "Segmentation"
    for split, members in split_ids.items():
        _write_lines(seg / f"{split}.txt", members)
    _write_lines(seg / "trainaug.txt", split_ids["train"] + split_ids["aug"])
    _write_lines(root / "ImageSets" / "Main" / "trainval.txt", sorted(split_ids["train"] + split_ids["val"]))


# ----------------------------------------------------------------------------- COCO

# (COCO category id, name, supercategory, object class); ids keep COCO's gaps
COCO_CATEGORIES = (
    (1, "person", "person", OBJECT_CLASSES.index("person")),
    (3, "car", "vehicle", OBJECT_CLASSES.index("car")),
    (6, "bus", "vehicle", OBJECT_CLASSES.index("bus")),
    (17, "cat", "animal", OBJECT_CLASSES.index("cat")),
    (18, "dog", "animal", OBJECT_CLASSES.index("dog")),
    (62, "chair", "furniture", OBJECT_CLASSES.index("chair")),
)


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO crowd-style uncompressed RLE: run lengths over the column-major flattened mask,
    starting with a (possibly empty) run of zeros."""
    flat = mask.astype(np.uint8).flatten(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0] + counts
    return {"counts": [int(c) for c in counts], "size": [int(mask.shape[0]), int(mask.shape[1])]}


def coco_scene(rng: np.random.Generator, width: int, height: int, crowd: bool) -> Tuple[Scene, Optional[Tuple[int, np.ndarray]]]:
    """A COCO scene: 1-4 instances of COCO_CATEGORIES; with `crowd`, also a cluster of 3-5
    small same-class objects that is annotated as one iscrowd RLE region."""
    short = min(width, height)
    objects = [(COCO_CATEGORIES[int(rng.integers(len(COCO_CATEGORIES)))][3],
                rng.uniform(0.2, 0.5) * short) for _ in range(int(rng.integers(1, 5)))]
    objects.sort(key=lambda item: -item[1])
    canvas = render_background(rng, height, width)
    taken: List[Tuple[float, float, float, float]] = []
    instances = []
    for category, size in objects:
        inst = place_object(rng, height, width, category, size, taken)
        if inst is not None:
            paint_object(rng, canvas, inst.mask, category)
            instances.append(inst)
    crowd_region = None
    if crowd:
        category = COCO_CATEGORIES[int(rng.integers(len(COCO_CATEGORIES)))][3]
        union = np.zeros((height, width), bool)
        members = []
        for _ in range(int(rng.integers(3, 6))):
            member = place_object(rng, height, width, category, rng.uniform(7, 12), members,
                                  allow_truncation=False, tries=15)
            if member is None:
                continue
            # keep the cluster clear of the other instances
            if any(_boxes_overlap(members[-1], other, gap=4) for other in taken):
                members.pop()
                continue
            union |= member.mask
        if union.any():
            taken.extend(members)
            paint_object(rng, canvas, union, category)
            crowd_region = (category, union)
    if not instances and crowd_region is None:  # never an image without any annotation
        inst = place_object(rng, height, width, COCO_CATEGORIES[0][3], 0.4 * short, taken)
        paint_object(rng, canvas, inst.mask, inst.category)
        instances.append(inst)
    return Scene(to_uint8(canvas), instances), crowd_region


def write_coco(root: Path, scale: Scale, seed: int) -> None:
    """coco/annotations/instances_{train,val}2017.json, train2017/, val2017/.

    Polygon annotations for single objects, uncompressed-RLE iscrowd=1 regions in about one
    image in six, category ids with gaps, annotation ids starting at 0 in each file."""
    rng = _part_rng(seed, "coco")
    class_to_coco = {obj: cid for cid, _, _, obj in COCO_CATEGORIES}
    categories = [{"id": cid, "name": name, "supercategory": sup} for cid, name, sup, _ in COCO_CATEGORIES]
    width, height = scale.voc_size
    for split, count in (("train", scale.coco_train), ("val", scale.coco_val)):
        image_ids = np.sort(rng.choice(np.arange(1, 600000), count, replace=False))
        images, annotations = [], []
        for index, image_id in enumerate(image_ids):
            image_id = int(image_id)
            file_name = f"{image_id:012d}.jpg"
            scene, crowd = coco_scene(rng, width, height, crowd=index % 6 == 3)
            _save_jpeg(root / f"{split}2017" / file_name, scene.image)
            images.append({"license": 1, "file_name": file_name, "coco_url": "", "height": height,
                           "width": width, "date_captured": "2017-01-01 00:00:00", "flickr_url": "",
                           "id": image_id})
            for inst in scene.instances:
                x0, y0, x1, y1 = inst.box
                annotations.append({
                    "segmentation": [[float(v) for v in inst.polygon.reshape(-1)]],
                    "area": float(inst.mask.sum()), "iscrowd": 0, "image_id": image_id,
                    "bbox": [float(x0), float(y0), float(x1 - x0 + 1), float(y1 - y0 + 1)],
                    "category_id": class_to_coco[inst.category], "id": len(annotations)})
            if crowd is not None:
                category, union = crowd
                x0, y0, x1, y1 = mask_box(union)
                annotations.append({
                    "segmentation": _uncompressed_rle(union), "area": float(union.sum()),
                    "iscrowd": 1, "image_id": image_id,
                    "bbox": [float(x0), float(y0), float(x1 - x0 + 1), float(y1 - y0 + 1)],
                    "category_id": class_to_coco[category], "id": len(annotations)})
        _write_json(root / "annotations" / f"instances_{split}2017.json", {
            "info": {"description": "densebench synthetic COCO-style data", "version": "1.0",
                     "year": 2017, "contributor": "densebench", "date_created": "2017/09/01"},
            "licenses": [{"url": "", "id": 1, "name": "synthetic"}],
            "images": images, "annotations": annotations, "categories": categories})


# ----------------------------------------------------------------------------- Cityscapes

# (name, labelId, trainId, hasInstances) from cityscapesscripts/helpers/labels.py
CITYSCAPES_LABELS = (
    ("unlabeled", 0, 255, False), ("ego vehicle", 1, 255, False), ("rectification border", 2, 255, False),
    ("out of roi", 3, 255, False), ("static", 4, 255, False), ("dynamic", 5, 255, False),
    ("ground", 6, 255, False), ("road", 7, 0, False), ("sidewalk", 8, 1, False), ("parking", 9, 255, False),
    ("rail track", 10, 255, False), ("building", 11, 2, False), ("wall", 12, 3, False),
    ("fence", 13, 4, False), ("guard rail", 14, 255, False), ("bridge", 15, 255, False),
    ("tunnel", 16, 255, False), ("pole", 17, 5, False), ("polegroup", 18, 255, False),
    ("traffic light", 19, 6, False), ("traffic sign", 20, 7, False), ("vegetation", 21, 8, False),
    ("terrain", 22, 9, False), ("sky", 23, 10, False), ("person", 24, 11, True), ("rider", 25, 12, True),
    ("car", 26, 13, True), ("truck", 27, 14, True), ("bus", 28, 15, True), ("caravan", 29, 255, True),
    ("trailer", 30, 255, True), ("train", 31, 16, True), ("motorcycle", 32, 17, True),
    ("bicycle", 33, 18, True),
)
CS_ID = {name: label_id for name, label_id, _, _ in CITYSCAPES_LABELS}
CS_TRAIN_ID = np.full(256, 255, np.uint8)
for _name, _label_id, _train_id, _ in CITYSCAPES_LABELS:
    CS_TRAIN_ID[_label_id] = _train_id
CS_HAS_INSTANCES = {label_id for _, label_id, _, has in CITYSCAPES_LABELS if has}
# each class's base colour (the official colour table) and texture kind
CS_COLOURS = {
    0: (0, 0, 0), 1: (0, 0, 0), 4: (111, 74, 0), 6: (81, 0, 81), 7: (128, 64, 128),
    8: (244, 35, 232), 9: (250, 170, 160), 11: (70, 70, 70), 12: (102, 102, 156),
    13: (190, 153, 153), 17: (153, 153, 153), 19: (250, 170, 30), 20: (220, 220, 0),
    21: (107, 142, 35), 22: (152, 251, 152), 23: (70, 130, 180), 24: (220, 20, 60),
    25: (255, 0, 0), 26: (0, 0, 142), 27: (0, 0, 70), 28: (0, 60, 100), 31: (0, 80, 100),
    32: (0, 0, 230), 33: (119, 11, 32),
}
# rare classes cycled over the images so that each train id occurs in a few images
CS_ROTATING = ("wall", "fence", "traffic light", "terrain", "rider", "truck", "bus", "train",
               "motorcycle", "bicycle")


class _StreetCanvas:
    """labelIds, instanceIds and per-class painting of one Cityscapes-like frame."""

    def __init__(self, width: int, height: int):
        self.width, self.height = width, height
        self.label_ids = np.zeros((height, width), np.uint8)
        self.instance_ids = np.zeros((height, width), np.int32)
        self.instance_counts: Dict[int, int] = {}
        self.yy, self.xx = np.mgrid[0:height, 0:width]

    def fill(self, mask: np.ndarray, name: str) -> None:
        label_id = CS_ID[name]
        self.label_ids[mask] = label_id
        if label_id in CS_HAS_INSTANCES:
            k = self.instance_counts.get(label_id, 0)
            self.instance_counts[label_id] = k + 1
            self.instance_ids[mask] = label_id * 1000 + k
        else:
            self.instance_ids[mask] = label_id

    def rect(self, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
        return (self.xx >= x0) & (self.xx < x1) & (self.yy >= y0) & (self.yy < y1)

    def ellipse(self, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
        return ((self.xx - cx) / max(rx, 0.5)) ** 2 + ((self.yy - cy) / max(ry, 0.5)) ** 2 <= 1.0


def street_scene(rng: np.random.Generator, width: int, height: int, rotating: Sequence[str]) -> _StreetCanvas:
    """Road band, sidewalks, buildings, sky, vegetation, poles and signs, cars and persons,
    plus the `rotating` rarer classes; painted far to near so nearer things occlude."""
    c = _StreetCanvas(width, height)
    horizon = int(height * rng.uniform(0.42, 0.52))
    c.fill(c.yy < horizon, "sky")
    # buildings and trees along the horizon
    x = 0
    while x < width:
        block = int(rng.uniform(0.08, 0.2) * width)
        top = horizon - rng.uniform(0.12, 0.38) * height
        name = "vegetation" if rng.random() < 0.3 else "building"
        if name == "vegetation":
            c.fill(c.ellipse(x + block / 2, top + (horizon - top) / 2, block / 1.6, (horizon - top) / 1.5)
                   & (c.yy < horizon), name)
        else:
            c.fill(c.rect(x, top, x + block, horizon), name)
        x += block
    # ground: sidewalks either side of a road trapezoid, ego vehicle at the bottom
    ground = c.yy >= horizon
    c.fill(ground, "sidewalk")
    depth = (c.yy - horizon) / max(height - horizon, 1)
    half_road = width * (0.08 + 0.45 * depth)
    road = ground & (np.abs(c.xx - width / 2) <= half_road)
    c.fill(road, "road")
    if "terrain" in rotating:
        c.fill(ground & ~road & (np.abs(c.xx - width / 2) > half_road + width * 0.25), "terrain")
    if rng.random() < 0.3:
        c.fill(ground & ~road & (c.xx < width * 0.1) & (depth > 0.5), "parking")
    c.fill(c.yy >= height * 0.93, "ego vehicle")
    if "wall" in rotating:
        c.fill(c.rect(0, horizon - 0.08 * height, width * 0.3, horizon), "wall")
    if "fence" in rotating:
        c.fill(c.rect(width * 0.7, horizon - 0.06 * height, width, horizon + 2), "fence")
    # poles with a sign or a light on top
    for _ in range(int(rng.integers(1, 4))):
        px = rng.uniform(0.03, 0.97) * width
        if abs(px - width / 2) < width * 0.2:
            continue
        top = horizon - rng.uniform(0.15, 0.3) * height
        c.fill(c.rect(px, top, px + max(2, width / 128), horizon + 0.1 * height), "pole")
        head = "traffic light" if ("traffic light" in rotating and rng.random() < 0.5) else "traffic sign"
        size = max(4, width / 40)
        c.fill(c.rect(px - size / 2, top - size, px + size / 2 + 2, top), head)
    # vehicles on the road, far (small) first
    vehicles = ["car"] * int(rng.integers(1, 4)) + [v for v in ("truck", "bus", "train") if v in rotating]
    placed = sorted(((rng.uniform(0.15, 0.9), name) for name in vehicles))
    for d, name in placed:
        y_bottom = horizon + d * (height * 0.93 - horizon)
        scale = 0.3 + 0.9 * d
        w = width * 0.12 * scale * (1.8 if name in ("truck", "bus", "train") else 1.0)
        h = height * 0.12 * scale * (1.6 if name in ("truck", "bus", "train") else 1.0)
        cx = width / 2 + rng.uniform(-0.8, 0.8) * width * (0.08 + 0.45 * d) - w / 2
        body = c.rect(cx, y_bottom - h, cx + w, y_bottom)
        if name == "car":  # a cabin on top
            body |= c.ellipse(cx + w / 2, y_bottom - h, w / 3, h / 2) & (c.yy < y_bottom - h)
        c.fill(body, name)
    # persons, riders and two-wheelers on the sidewalks
    walkers = ["person"] * int(rng.integers(1, 4))
    for d, name in sorted((rng.uniform(0.2, 0.9), n) for n in walkers
                          + [v for v in ("rider", "motorcycle", "bicycle") if v in rotating]):
        y_bottom = horizon + d * (height * 0.93 - horizon)
        scale = 0.3 + 0.9 * d
        side = -1 if rng.random() < 0.5 else 1
        cx = width / 2 + side * (width * (0.1 + 0.45 * d) + rng.uniform(2, 0.06 * width))
        h = height * 0.22 * scale
        if name == "person":
            c.fill(c.ellipse(cx, y_bottom - h / 2, h / 6, h / 2), "person")
        else:
            wheel = max(2.0, h / 5)
            bike = c.ellipse(cx - wheel * 1.2, y_bottom - wheel, wheel, wheel) | c.ellipse(
                cx + wheel * 1.2, y_bottom - wheel, wheel, wheel) | c.rect(
                cx - wheel * 1.2, y_bottom - wheel * 1.5, cx + wheel * 1.2, y_bottom - wheel)
            c.fill(bike, "bicycle" if name == "bicycle" else "motorcycle")
            if name == "rider":
                c.fill(c.ellipse(cx, y_bottom - wheel * 1.5 - h / 3, h / 7, h / 3), "rider")
    return c


def render_street(rng: np.random.Generator, c: _StreetCanvas) -> np.ndarray:
    """RGB frame: each labelId painted in its colour with a per-class texture and noise."""
    canvas = np.zeros((c.height, c.width, 3), np.float32)
    light = rng.uniform(0.8, 1.15)
    noise = _smooth_noise(rng, c.height, c.width, cell=8)
    for label_id in np.unique(c.label_ids):
        mask = c.label_ids == label_id
        colour = np.asarray(CS_COLOURS.get(int(label_id), (90, 90, 90)), np.float32)
        if label_id == CS_ID["building"]:  # windows
            factor = np.where((c.yy % 8 < 3) & (c.xx % 7 < 3), 0.6, 1.0)
        elif label_id == CS_ID["vegetation"]:
            factor = 0.7 + 0.6 * noise
        elif label_id == CS_ID["road"]:
            factor = np.where((np.abs(c.xx - c.width / 2) < 1.5) & (c.yy % 10 < 5), 2.0, 1.0)
        else:
            factor = np.ones((c.height, c.width), np.float32)
        canvas[mask] = (colour[None] * factor[mask][:, None]) * light
    canvas += rng.normal(0, 4, canvas.shape[:2] + (1,)).astype(np.float32)
    return to_uint8(canvas)


def write_cityscapes(root: Path, scale: Scale, seed: int) -> None:
    """cityscapes/leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png and
    gtFine/.../*_gtFine_{labelIds,labelTrainIds,instanceIds}.png (19 train ids, others 255)."""
    rng = _part_rng(seed, "cityscapes")
    width, height = scale.cityscapes_size
    frames = [("train", city) for city in scale.cityscapes_train_cities
              for _ in range(scale.cityscapes_train_per_city)]
    frames += [("val", "frankfurt")] * scale.cityscapes_val
    frame_numbers: Dict[str, int] = {}
    for index, (split, city) in enumerate(frames):
        number = frame_numbers.get(city, 0)
        frame_numbers[city] = number + 1
        stem = f"{city}_{number // 3:06d}_{19 + 19 * number:06d}"
        k = len(CS_ROTATING)
        rotating = {CS_ROTATING[(2 * index) % k], CS_ROTATING[(2 * index + 1) % k],
                    CS_ROTATING[(index * 3 + 5) % k]}
        canvas = street_scene(rng, width, height, rotating)
        image = render_street(rng, canvas)
        _save_png(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", Image.fromarray(image))
        gt = root / "gtFine" / split / city
        _save_png(gt / f"{stem}_gtFine_labelIds.png", Image.fromarray(canvas.label_ids, mode="L"))
        _save_png(gt / f"{stem}_gtFine_labelTrainIds.png",
                  Image.fromarray(CS_TRAIN_ID[canvas.label_ids], mode="L"))
        _save_png(gt / f"{stem}_gtFine_instanceIds.png",
                  Image.fromarray(canvas.instance_ids.astype(np.uint16)))


# ----------------------------------------------------------------------------- entry points

WRITERS = (
    ("imagenet", write_imagenet, layout.imagenet_root),
    ("Places205", write_places205, layout.places205_root),
    ("iNaturalist2018", write_inat18, layout.inat18_root),
    ("VOCdevkit/VOC2007", write_voc2007, layout.voc07_root),
    ("VOCdevkit/VOC2012", write_voc2012, layout.voc12_root),
    ("coco", write_coco, layout.coco_root),
    ("cityscapes", write_cityscapes, layout.cityscapes_root),
)


def _check_target(root: Path) -> None:
    """Refuse to write over dataset folders that an earlier synth run did not create."""
    if (root / MARKER_FILE).exists():
        return
    clashes = [name for name in DATASET_DIRS if (root / name).exists()]
    if clashes:
        raise InputError(root, f"already holds {', '.join(clashes)} not written by `densebench data synth`; "
                               "choose an empty output folder")


def generate(root: "str | Path", scale: str = "tiny", seed: int = 0) -> Path:
    """Write the synthetic benchmark under `root` in every layout of data/layout.py.

    Each dataset is written into a temporary folder inside `root` and renamed into place
    when complete, so an interrupted run leaves no half-written dataset. Returns `root`."""
    if scale not in SCALES:
        raise InputError(None, f"unknown scale {scale!r}; choose one of {', '.join(SCALES)}")
    spec = SCALES[scale]
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    _check_target(root)
    staging = Path(tempfile.mkdtemp(prefix=".synth-", dir=root))
    try:
        for name, writer, where in WRITERS:
            log.info("synth: writing %s", name)
            writer(where(staging), spec, seed)
        for name, _, where in WRITERS:
            final = where(root)
            if final.exists():
                shutil.rmtree(final)
            final.parent.mkdir(parents=True, exist_ok=True)
            where(staging).rename(final)
        (root / MARKER_FILE).write_text(json.dumps({"generator": "densebench data synth",
                                                    "scale": scale, "seed": seed}) + "\n")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


def main(args: argparse.Namespace) -> int:
    """`densebench data synth OUT --scale tiny|small --seed N`."""
    root = generate(args.out, scale=args.scale, seed=args.seed)
    print(f"wrote the {args.scale} synthetic benchmark (seed {args.seed}) to {root}")
    return 0
