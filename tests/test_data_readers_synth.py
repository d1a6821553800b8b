"""Every reader on the tiny synthetic benchmark (fixture `synth_root`), with the values the
generator promises (counts, label ranges, sizes) cross-checked between independent files:
VOC class files vs XML objects, COCO masks vs areas, Cityscapes labelIds vs labelTrainIds."""
from __future__ import annotations

import shutil
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from densebench.data import layout
from densebench.data.cityscapes import read_cityscapes, read_cityscapes_label
from densebench.data.coco import category_ids, read_coco_instances, segmentation_to_mask
from densebench.data.image import load_image, read_label_png
from densebench.data.imagenet import read_imagenet
from densebench.data.inat import read_inat18
from densebench.data.places205 import read_places205
from densebench.data.voc import VOC_CLASSES, read_voc_cls_labels, read_voc_det, read_voc_seg


def test_synth_imagenet(synth_root):
    root = layout.imagenet_root(synth_root)
    train, val = read_imagenet(root, "train"), read_imagenet(root, "val")
    assert Counter(label for _, label in train) == {label: 16 for label in range(10)}
    assert Counter(label for _, label in val) == {label: 20 for label in range(10)}
    # train labels are the sorted wnid positions of the class folders
    wnids = sorted(p.name for p in (root / "train").iterdir())
    assert all(path.parent.name == wnids[label] for path, label in train)
    assert all(path.parent == root / "val" for path, _ in val)
    img = load_image(train[0][0])
    assert img.mode == "RGB" and img.size == (96, 96)


def test_synth_imagenet_class_folders_agree_with_meta(synth_root, tmp_path):
    root = tmp_path / "imagenet"
    shutil.copytree(layout.imagenet_root(synth_root) / "train", root / "train")
    from_meta = read_imagenet(layout.imagenet_root(synth_root), "train")
    from_folders = read_imagenet(root, "train")
    relative = sorted((p.relative_to(p.parents[1]), label) for p, label in from_meta)
    assert sorted((p.relative_to(p.parents[1]), label) for p, label in from_folders) == relative


def test_synth_places205(synth_root):
    root = layout.places205_root(synth_root)
    train, val = read_places205(root, "train"), read_places205(root, "val")
    assert Counter(label for _, label in train) == {label: 12 for label in range(8)}
    assert Counter(label for _, label in val) == {label: 16 for label in range(8)}
    assert not set(train) & set(val)
    assert load_image(val[0][0]).size == (96, 96)


def test_synth_inat18_list_and_json_agree(synth_root, tmp_path):
    root = layout.inat18_root(synth_root)
    for split, per_category in (("train", 12), ("val", 16)):
        samples = read_inat18(root, split)
        assert Counter(label for _, label in samples) == {label: per_category for label in range(8)}
        assert all("train_val2018/train_val2018" not in str(path) for path, _ in samples)
        assert all(path.is_file() for path, _ in samples)
    copy = tmp_path / "iNaturalist2018"
    shutil.copytree(root, copy)
    shutil.rmtree(copy / "meta")  # only the official json is left
    from_json = read_inat18(copy, "val")
    assert [(p.relative_to(copy), label) for p, label in from_json] == [
        (p.relative_to(root), label) for p, label in read_inat18(root, "val")
    ]


@pytest.mark.parametrize("split", ["trainval", "test"])
def test_synth_voc07_cls_labels_match_the_xml(synth_root, split):
    root = layout.voc07_root(synth_root)
    ids, labels = read_voc_cls_labels(root, split)
    annotations = read_voc_det(root, split)
    assert ids == [ann.image_id for ann in annotations] and len(ids) == 100
    assert labels.shape == (100, 20) and set(np.unique(labels).tolist()) <= {-1, 0, 1}
    for ann, row in zip(annotations, labels):
        for column in range(len(VOC_CLASSES)):
            flags = ann.difficult[ann.labels == column]
            expected = 0 if flags.size == 0 else (1 if (~flags).any() else -1)
            assert row[column] == expected, (ann.image_id, VOC_CLASSES[column])
    assert (labels == 1).sum(axis=0).min() >= 5  # every class has positives in both splits


def test_synth_voc_det(synth_root):
    root = layout.voc07_root(synth_root)
    annotations = read_voc_det(root, "test")
    assert sum(int(ann.difficult.sum()) for ann in annotations) > 0
    for ann in annotations[:10]:
        assert load_image(ann.path).size == (ann.width, ann.height)
        assert ann.boxes.shape == (len(ann.labels), 4) and len(ann.labels) >= 1
        assert (ann.boxes[:, :2] >= 1).all()
        assert (ann.boxes[:, 2] <= ann.width).all() and (ann.boxes[:, 3] <= ann.height).all()
    assert len(read_voc_det(layout.voc12_root(synth_root), "trainval")) == 40


def test_synth_voc12_seg(synth_root):
    root = layout.voc12_root(synth_root)
    train, val = read_voc_seg(root, "train"), read_voc_seg(root, "val")
    assert len(train) == 48 and len(val) == 16
    assert [label.parent.name for _, label in train] == ["SegmentationClass"] * 24 + ["SegmentationClassAug"] * 24
    assert {label.parent.name for _, label in val} == {"SegmentationClass"}
    for image, label in train[::8] + val[::8]:
        values = read_label_png(label)
        assert Image.open(label).mode == "P"
        assert values.shape == (load_image(image).height, load_image(image).width)
        assert set(np.unique(values).tolist()) <= set(range(21)) | {255}
        assert (255 in values) == (label.parent.name == "SegmentationClass")  # Aug has no border band


@pytest.mark.parametrize("split, count", [("train", 48), ("val", 32)])
def test_synth_coco(synth_root, split, count):
    root = layout.coco_root(synth_root)
    coco, images = read_coco_instances(root / "annotations" / f"instances_{split}2017.json", root / f"{split}2017")
    assert len(images) == count
    assert category_ids(coco) == [1, 3, 6, 17, 18, 62]
    assert min(coco.getAnnIds()) == 1  # the file starts at id 0; shifted for COCOeval
    assert any(image.iscrowd.any() for image in images)
    for image in images[:8]:
        assert load_image(image.path).size == (image.width, image.height)
        assert image.labels.tolist() == [category_ids(coco).index(c) for c in image.category_ids]
        for box, seg, crowd in zip(image.boxes, image.segmentations, image.iscrowd):
            mask = segmentation_to_mask(seg, image.height, image.width)
            assert isinstance(seg, dict) == bool(crowd)  # crowd regions are uncompressed RLE
            ys, xs = np.nonzero(mask)
            # box and mask agree: the mask's extent is the box (xyxy, exclusive end)
            assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == box.tolist()


def test_synth_cityscapes(synth_root):
    root = layout.cityscapes_root(synth_root)
    train, val = read_cityscapes(root, "train"), read_cityscapes(root, "val")
    assert len(train) == 12 and len(val) == 4
    assert {image.parent.name for image, _ in train} == {"aachen", "bochum"}
    for image, label in train[:3] + val[:1]:
        assert label.name.endswith("_gtFine_labelTrainIds.png")
        train_ids = read_cityscapes_label(label)
        assert train_ids.shape == (128, 256) and load_image(image).size == (256, 128)
        assert set(np.unique(train_ids).tolist()) <= set(range(19)) | {255}
        label_ids = label.with_name(label.name.replace("labelTrainIds", "labelIds"))
        # the generator's own table and ours agree pixel for pixel on synthetic data
        assert np.array_equal(read_cityscapes_label(label_ids), train_ids)
