"""The synthetic benchmark: determinism, real formats, exact annotations, learnability."""
from __future__ import annotations

import hashlib
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from densebench import cli
from densebench.data import layout, synth
from densebench.errors import InputError


def tree_digest(root: Path) -> str:
    """sha256 over every file's relative path and bytes, in sorted order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def test_cli_synth_is_deterministic(synth_root, tmp_path):
    out = tmp_path / "again"
    assert cli.main(["data", "synth", str(out), "--scale", "tiny", "--seed", "0"]) == 0
    assert tree_digest(out) == tree_digest(synth_root)
    assert not list(out.glob(".synth-*")), "staging folder left behind"
    other = tmp_path / "seed1"
    synth.write_imagenet(other, synth.SCALES["tiny"], seed=1)
    assert tree_digest(other) != tree_digest(layout.imagenet_root(out))


def test_refuses_to_overwrite_foreign_data(tmp_path):
    (tmp_path / "imagenet").mkdir()
    with pytest.raises(InputError, match="not written by"):
        synth.generate(tmp_path, scale="tiny")
    assert cli.main(["data", "synth", str(tmp_path)]) == 1


def test_rerun_replaces_its_own_output(tmp_path, monkeypatch):
    only_imagenet = tuple(w for w in synth.WRITERS if w[0] == "imagenet")
    monkeypatch.setattr(synth, "WRITERS", only_imagenet)
    synth.generate(tmp_path, scale="tiny", seed=0)
    stale = layout.imagenet_root(tmp_path) / "train" / "stale.JPEG"
    stale.write_bytes(b"old")
    first = (layout.imagenet_root(tmp_path) / "meta" / "train.txt").read_text()
    synth.generate(tmp_path, scale="tiny", seed=0)
    assert not stale.exists()
    assert (layout.imagenet_root(tmp_path) / "meta" / "train.txt").read_text() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["SYNTHETIC.json", "imagenet"]


def test_object_classes_are_distinct_combinations():
    styles = {synth.object_style(c) for c in range(len(synth.OBJECT_CLASSES))}
    assert len(styles) == 20
    # classes 0..9 (ImageNet-style labels) differ in both shape and colour
    assert len({synth.object_style(c)[0] for c in range(10)}) == 10
    assert len({synth.object_style(c)[1] for c in range(10)}) == 10


# ----------------------------------------------------------------------------- COCO


def test_coco_masks_boxes_and_areas_agree(synth_root):
    from pycocotools.coco import COCO

    for split in ("train", "val"):
        coco = COCO(str(layout.coco_root(synth_root) / "annotations" / f"instances_{split}2017.json"))
        cat_ids = sorted(coco.getCatIds())
        assert cat_ids == [1, 3, 6, 17, 18, 62]  # gaps as in COCO
        assert 0 in coco.anns, "an annotation with id 0 exercises the pycocotools pitfall"
        crowds = [a for a in coco.anns.values() if a["iscrowd"]]
        polygons = [a for a in coco.anns.values() if not a["iscrowd"]]
        assert crowds and polygons
        assert all(isinstance(a["segmentation"], dict) for a in crowds)
        assert all(isinstance(a["segmentation"], list) for a in polygons)
        for ann in coco.anns.values():
            mask = coco.annToMask(ann).astype(bool)
            ys, xs = np.nonzero(mask)
            assert mask.sum() == ann["area"]
            x, y, w, h = ann["bbox"]
            assert (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1) == (x, y, w, h)
        for image in coco.imgs.values():
            path = layout.coco_root(synth_root) / f"{split}2017" / image["file_name"]
            assert Image.open(path).size == (image["width"], image["height"])
            assert coco.getAnnIds(imgIds=image["id"]), "every image has an annotation"


def test_coco_polygon_raster_equals_rendered_mask():
    """The generator rasterises the same polygon that the json stores: annToMask is exact."""
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(3)
    taken = []
    for category in range(20):
        inst = synth.place_object(rng, 120, 160, category, rng.uniform(10, 60), taken)
        if inst is None:
            continue
        rle = mask_utils.frPyObjects([inst.polygon.reshape(-1).tolist()], 120, 160)
        decoded = mask_utils.decode(mask_utils.merge(rle)).astype(bool)
        np.testing.assert_array_equal(decoded, inst.mask)
        assert inst.box == synth.mask_box(inst.mask)


def test_uncompressed_rle_round_trip():
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(0)
    for first_pixel in (0, 1):
        mask = rng.random((9, 7)) < 0.4
        mask[0, 0] = bool(first_pixel)
        rle = synth._uncompressed_rle(mask)
        decoded = mask_utils.decode(mask_utils.frPyObjects(rle, 9, 7)).astype(bool)
        np.testing.assert_array_equal(decoded, mask)


# ----------------------------------------------------------------------------- VOC


def parse_xml(path: Path):
    root = ET.parse(path).getroot()
    size = root.find("size")
    objects = []
    for obj in root.findall("object"):
        box = obj.find("bndbox")
        objects.append({
            "name": obj.findtext("name"), "pose": obj.findtext("pose"),
            "truncated": int(obj.findtext("truncated")), "difficult": int(obj.findtext("difficult")),
            "box": tuple(int(box.findtext(tag)) for tag in ("xmin", "ymin", "xmax", "ymax")),
        })
    return int(size.findtext("width")), int(size.findtext("height")), objects


def test_voc_xml_boxes_match_sbd_masks(synth_root):
    """train ids have an SBD-style label (no border band): each box is exactly the extent of
    its class's pixels inside it, and no class pixel lies outside that class's boxes."""
    voc12 = layout.voc12_root(synth_root)
    train_ids = (voc12 / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    assert train_ids
    for image_id in train_ids:
        width, height, objects = parse_xml(voc12 / "Annotations" / f"{image_id}.xml")
        labels = np.array(Image.open(voc12 / "SegmentationClassAug" / f"{image_id}.png"))
        assert labels.shape == (height, width)
        assert Image.open(voc12 / "JPEGImages" / f"{image_id}.jpg").size == (width, height)
        covered = np.zeros_like(labels, dtype=bool)
        for obj in objects:
            value = synth.OBJECT_CLASSES.index(obj["name"]) + 1
            x0, y0, x1, y1 = (v - 1 for v in obj["box"])  # 1-based inclusive in the XML
            inside = labels[y0:y1 + 1, x0:x1 + 1] == value
            ys, xs = np.nonzero(inside)
            assert (xs.min(), ys.min(), xs.max(), ys.max()) == (0, 0, x1 - x0, y1 - y0), obj
            covered[y0:y1 + 1, x0:x1 + 1] |= inside
        assert not ((labels > 0) & ~covered).any(), f"{image_id}: object pixels outside every box"


def test_voc_segmentation_pngs_are_palette_with_border(synth_root):
    voc12 = layout.voc12_root(synth_root)
    palette = synth.voc_palette()
    assert palette[:12] == [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0]
    assert palette[255 * 3:] == [224, 224, 192]
    pngs = sorted((voc12 / "SegmentationClass").glob("*.png"))
    assert len(pngs) == 24 + 16
    for path in pngs:
        img = Image.open(path)
        assert img.mode == "P"
        assert img.getpalette()[:256 * 3] == palette
        values = set(np.unique(np.array(img)).tolist())
        assert 255 in values and 0 in values and values <= set(range(21)) | {255}
    aug_ids = (voc12 / "ImageSets" / "Segmentation" / "aug.txt").read_text().split()
    for image_id in aug_ids:
        img = Image.open(voc12 / "SegmentationClassAug" / f"{image_id}.png")
        assert img.mode == "P" and 255 not in np.array(img)  # SBD-derived: no band
    # the band only replaces pixels next to an outline: elsewhere both labels agree
    train_ids = (voc12 / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    for image_id in train_ids:
        with_band = np.array(Image.open(voc12 / "SegmentationClass" / f"{image_id}.png"))
        without = np.array(Image.open(voc12 / "SegmentationClassAug" / f"{image_id}.png"))
        keep = with_band != 255
        np.testing.assert_array_equal(with_band[keep], without[keep])
        edges = synth.dilate(without > 0, 1) & ~synth.erode(without > 0, 1)
        assert ((with_band == 255) <= synth.dilate(edges, 1)).all()


def test_voc12_segmentation_lists(synth_root):
    seg = layout.voc12_root(synth_root) / "ImageSets" / "Segmentation"
    lists = {name: (seg / f"{name}.txt").read_text().split() for name in ("train", "val", "aug", "trainaug")}
    assert (len(lists["train"]), len(lists["val"]), len(lists["aug"])) == (24, 16, 24)
    assert not set(lists["aug"]) & (set(lists["train"]) | set(lists["val"]))
    assert not set(lists["train"]) & set(lists["val"])
    assert lists["trainaug"] == lists["train"] + lists["aug"]
    main = (layout.voc12_root(synth_root) / "ImageSets" / "Main" / "trainval.txt").read_text().split()
    assert sorted(main) == sorted(lists["train"] + lists["val"])


def test_voc07_classification_labels_follow_the_xml(synth_root):
    voc07 = layout.voc07_root(synth_root)
    main = voc07 / "ImageSets" / "Main"
    for split in ("trainval", "test"):
        ids = (main / f"{split}.txt").read_text().split()
        assert len(ids) == 100 and ids == sorted(ids)
        expected = {}
        for image_id in ids:
            _, _, objects = parse_xml(voc07 / "Annotations" / f"{image_id}.xml")
            for name in synth.OBJECT_CLASSES:
                flags = [o["difficult"] for o in objects if o["name"] == name]
                expected[name, image_id] = -1 if not flags else (1 if not all(flags) else 0)
        zeros = 0
        for name in synth.OBJECT_CLASSES:
            lines = (main / f"{name}_{split}.txt").read_text().splitlines()
            values = {line.split()[0]: int(line.split()[1]) for line in lines}
            assert list(values) == ids
            assert all(values[i] == expected[name, i] for i in ids)
            assert sum(v == 1 for v in values.values()) >= (4 if split == "trainval" else 1)
            zeros += sum(v == 0 for v in values.values())
        assert zeros > 0, "some images hold only difficult instances of a class"
    # difficult objects are the small ones; the split ids are disjoint
    assert not set((main / "trainval.txt").read_text().split()) & set((main / "test.txt").read_text().split())
    for xml in sorted((voc07 / "Annotations").glob("*.xml"))[:40]:
        for obj in parse_xml(xml)[2]:
            x0, y0, x1, y1 = obj["box"]
            if obj["difficult"]:
                assert (x1 - x0 + 1) * (y1 - y0 + 1) < 200
            assert obj["pose"] == "Unspecified" and 1 <= x0 <= x1 and 1 <= y0 <= y1


# ----------------------------------------------------------------------------- Cityscapes


def test_cityscapes_labels(synth_root):
    cs = layout.cityscapes_root(synth_root)
    seen_train_ids = set()
    for split, count in (("train", 12), ("val", 4)):
        images = sorted((cs / "leftImg8bit" / split).glob("*/*_leftImg8bit.png"))
        assert len(images) == count
        for image in images:
            stem = image.name[: -len("_leftImg8bit.png")]
            gt = cs / "gtFine" / split / image.parent.name
            assert Image.open(image).size == (256, 128) and Image.open(image).mode == "RGB"
            label_img = Image.open(gt / f"{stem}_gtFine_labelIds.png")
            train_img = Image.open(gt / f"{stem}_gtFine_labelTrainIds.png")
            inst_img = Image.open(gt / f"{stem}_gtFine_instanceIds.png")
            assert (label_img.mode, train_img.mode, inst_img.mode) == ("L", "L", "I;16")
            label_ids, train_ids = np.array(label_img), np.array(train_img)
            instance_ids = np.array(inst_img).astype(np.int64)
            assert set(np.unique(train_ids).tolist()) <= set(range(19)) | {255}
            np.testing.assert_array_equal(train_ids, synth.CS_TRAIN_ID[label_ids])
            as_label = np.where(instance_ids >= 1000, instance_ids // 1000, instance_ids)
            np.testing.assert_array_equal(as_label, label_ids)
            if split == "train":
                seen_train_ids |= set(np.unique(train_ids).tolist())
    assert seen_train_ids == set(range(19)) | {255}, "every train id occurs in train"


# ----------------------------------------------------------------------------- classification sets


def colour_histograms(paths, bins=4):
    feats = []
    for path in paths:
        pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.int64) // (256 // bins)
        codes = (pixels[..., 0] * bins + pixels[..., 1]) * bins + pixels[..., 2]
        hist = np.bincount(codes.ravel(), minlength=bins ** 3).astype(np.float64)
        feats.append(np.sqrt(hist / hist.sum()))
    return np.stack(feats)


def orientation_histograms(paths, bins=8):
    """Gradient-magnitude-weighted histogram of edge orientations: shape and texture, no colour."""
    feats = []
    for path in paths:
        grey = np.asarray(Image.open(path).convert("L"), dtype=np.float64)
        gy, gx = np.gradient(grey)
        angle = np.minimum(((np.arctan2(gy, gx) % np.pi) / np.pi * bins).astype(int), bins - 1)
        hist = np.bincount(angle.ravel(), weights=np.hypot(gx, gy).ravel(), minlength=bins)
        feats.append(hist / hist.sum())
    return np.stack(feats)


def test_imagenet_labels_need_shape_not_colour(synth_root):
    """Nearest class mean: colour histograms stay far from solving it, since objects take random
    colours half of the time; edge-orientation histograms (shape and texture) beat chance (10%)
    by far; shuffled labels do not."""
    from densebench.data.imagenet import read_imagenet

    train = read_imagenet(layout.imagenet_root(synth_root), "train")
    val = read_imagenet(layout.imagenet_root(synth_root), "val")
    y_train, y_val = np.array([label for _, label in train]), np.array([label for _, label in val])

    def ncm_accuracy(features, labels):
        x_train, x_val = features([p for p, _ in train]), features([p for p, _ in val])
        means = np.stack([x_train[labels == c].mean(0) for c in range(10)])
        predicted = ((x_val[:, None] - means[None]) ** 2).sum(-1).argmin(1)
        return (predicted == y_val).mean()

    assert ncm_accuracy(colour_histograms, y_train) < 0.4            # 0.78 with class colours only
    assert ncm_accuracy(orientation_histograms, y_train) >= 0.3
    shuffled = np.random.default_rng(0).permutation(y_train)
    assert ncm_accuracy(orientation_histograms, shuffled) < 0.2


def test_classification_layouts(synth_root):
    imagenet = layout.imagenet_root(synth_root)
    train_lines = (imagenet / "meta" / "train.txt").read_text().splitlines()
    wnids = sorted(p.name for p in (imagenet / "train").iterdir())
    assert len(wnids) == 10 and len(train_lines) == 160
    for line in train_lines:
        rel, label = line.rsplit(" ", 1)
        assert rel.split("/")[0] == wnids[int(label)] and (imagenet / "train" / rel).is_file()
    val_lines = (imagenet / "meta" / "val.txt").read_text().splitlines()
    assert val_lines[0].startswith("ILSVRC2012_val_00000001.JPEG ")
    assert Image.open(imagenet / "val" / val_lines[0].split()[0]).size == (96, 96)

    places = layout.places205_root(synth_root)
    line = (places / "trainvalsplit_places205" / "train_places205.csv").read_text().splitlines()[0]
    assert line == "a/abbey/00000001.jpg 0"
    assert (places / "data/vision/torralba/deeplearning/images256/a/abbey/00000001.jpg").is_file()

    import json

    inat = layout.inat18_root(synth_root)
    data = json.loads((inat / "val2018.json").read_text())
    assert {"images", "annotations", "categories"} <= set(data)
    supers = {cat["supercategory"] for cat in data["categories"]}
    assert len(data["categories"]) == 8 and len(supers) == 3
    first = data["images"][0]
    assert first["file_name"].startswith("train_val2018/") and (inat / first["file_name"]).is_file()
    meta = (inat / "meta" / "val.txt").read_text().splitlines()
    label_of = {a["image_id"]: a["category_id"] for a in data["annotations"]}
    assert meta[0] == f"{first['file_name']} {label_of[first['id']]}"
