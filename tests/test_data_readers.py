"""Dataset readers on the real-format samples (tests/data/realdata, see its README) and on
malformed files written here: every bad input is an InputError whose message names the file."""
from __future__ import annotations

import contextlib
import copy
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.cocoeval import COCOeval

from densebench.data.cityscapes import (
    CITYSCAPES_CLASSES,
    LABEL_ID_TO_TRAIN_ID,
    read_cityscapes,
    read_cityscapes_label,
)
from densebench.data.coco import category_ids, load_coco, read_coco_instances, segmentation_to_mask
from densebench.data.image import load_image, read_label_png
from densebench.data.imagenet import read_image_list, read_imagenet
from densebench.data.inat import read_inat18
from densebench.data.places205 import read_places205
from densebench.data.voc import (
    VOC_CLASSES,
    parse_voc_xml,
    read_id_list,
    read_voc_cls_labels,
    read_voc_det,
    read_voc_seg,
    voc_class_index,
    voc_image_path,
)
from densebench.errors import InputError


def _touch(path: Path, content: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _raises_naming(path: Path, *words: str):
    """Context manager: an InputError whose message names `path` and contains `words`."""

    @contextlib.contextmanager
    def check():
        with pytest.raises(InputError) as info:
            yield
        message = str(info.value)
        assert "\n" not in message, message  # the CLI prints it as one line
        assert str(path) in message, message
        for word in words:
            assert word in message, message

    return check()


# ----------------------------------------------------------------------------- ImageNet-style lists


def test_realdata_image_list_parsed_by_last_space(realdata):
    folder = realdata / "mmselfsup_tests_data"
    samples = read_image_list(folder / "data_list.txt", folder)
    assert samples == [(folder / "color.jpg", 0), (folder / "gray.jpg", 1)]
    assert load_image(samples[1][0]).size == (512, 288)


def test_realdata_unlabelled_list_names_file_and_line(realdata):
    list_file = realdata / "mmselfsup_tests_data" / "data_list_no_label.txt"
    with _raises_naming(list_file, "line 1", "no integer label"):
        read_image_list(list_file, list_file.parent)


def test_imagenet_meta_list(tmp_path):
    root = tmp_path / "imagenet"
    _touch(root / "train" / "n01440764" / "n01440764_10026.JPEG")
    _touch(root / "train" / "n01443537" / "with space 7.JPEG")
    # CRLF line ends, a blank line and no trailing newline: all tolerated
    _write(root / "meta" / "train.txt", "n01440764/n01440764_10026.JPEG 0\r\n\r\nn01443537/with space 7.JPEG 1")
    assert read_imagenet(root, "train") == [
        (root / "train" / "n01440764" / "n01440764_10026.JPEG", 0),
        (root / "train" / "n01443537" / "with space 7.JPEG", 1),
    ]


def test_imagenet_flat_val_list(tmp_path):
    root = tmp_path / "imagenet"
    _touch(root / "val" / "ILSVRC2012_val_00000001.JPEG")
    _write(root / "meta" / "val.txt", "ILSVRC2012_val_00000001.JPEG 65\n")
    assert read_imagenet(root, "val") == [(root / "val" / "ILSVRC2012_val_00000001.JPEG", 65)]


def test_imagenet_densecl_labeled_list_preferred(tmp_path):
    root = tmp_path / "imagenet"
    _touch(root / "train" / "n01" / "a.JPEG")
    _write(root / "meta" / "train.txt", "n01/a.JPEG\n")  # [DC]: filenames only
    _write(root / "meta" / "train_labeled.txt", "n01/a.JPEG 3\n")
    assert read_imagenet(root, "train") == [(root / "train" / "n01" / "a.JPEG", 3)]


def test_imagenet_unlabelled_meta_list_is_an_error(tmp_path):
    root = tmp_path / "imagenet"
    _touch(root / "train" / "n01" / "a.JPEG")
    list_file = _write(root / "meta" / "train.txt", "n01/a.JPEG 0\nn01/a.JPEG\n")
    with _raises_naming(list_file, "line 2"):
        read_imagenet(root, "train")


def test_imagenet_negative_label_is_an_error(tmp_path):
    root = tmp_path / "imagenet"
    list_file = _write(root / "meta" / "val.txt", "x.JPEG -1\n")
    with _raises_naming(list_file, "line 1", "negative"):
        read_imagenet(root, "val", check_files=False)


def test_imagenet_missing_listed_image_is_named(tmp_path):
    root = tmp_path / "imagenet"
    _touch(root / "train" / "n01" / "a.JPEG")
    _write(root / "meta" / "train.txt", "n01/a.JPEG 0\nn01/b.JPEG 0\nn02/c.JPEG 1\n")
    with _raises_naming(root / "train" / "n01" / "b.JPEG", "2 listed image(s) missing"):
        read_imagenet(root, "train")
    assert len(read_imagenet(root, "train", check_files=False)) == 3


def test_imagenet_class_folders_use_sorted_train_wnids(tmp_path):
    root = tmp_path / "imagenet"
    for wnid in ("n02", "n01", "n03"):
        _touch(root / "train" / wnid / f"{wnid}_1.JPEG")
    _touch(root / "train" / "n01" / "n01_0.png")
    _touch(root / "train" / "n01" / "readme.txt")  # not an image: skipped
    _touch(root / "val" / "n03" / "v.JPEG")  # val holds only one class: label still from train's order
    assert read_imagenet(root, "train") == [
        (root / "train" / "n01" / "n01_0.png", 0),
        (root / "train" / "n01" / "n01_1.JPEG", 0),
        (root / "train" / "n02" / "n02_1.JPEG", 1),
        (root / "train" / "n03" / "n03_1.JPEG", 2),
    ]
    assert read_imagenet(root, "val") == [(root / "val" / "n03" / "v.JPEG", 2)]
    _touch(root / "val" / "n09" / "w.JPEG")
    with _raises_naming(root / "val" / "n09", "not among the training classes"):
        read_imagenet(root, "val")


def test_imagenet_missing_split(tmp_path):
    root = tmp_path / "imagenet"
    with _raises_naming(root / "val", "not found"):
        read_imagenet(root, "val")
    _touch(root / "val" / "ILSVRC2012_val_00000001.JPEG")  # flat val without meta/val.txt
    with _raises_naming(root / "meta" / "val.txt", "no class folders"):
        read_imagenet(root, "val")


# ----------------------------------------------------------------------------- Places205, iNat18


def test_places205_lists(tmp_path):
    root = tmp_path / "Places205"
    images = root / "data" / "vision" / "torralba" / "deeplearning" / "images256"
    _touch(images / "a" / "abbey" / "00000001.jpg")
    _touch(images / "b" / "bar" / "00000002.jpg")
    _write(root / "trainvalsplit_places205" / "train_places205.csv", "a/abbey/00000001.jpg 0\nb/bar/00000002.jpg,7\n")
    assert read_places205(root, "train") == [
        (images / "a" / "abbey" / "00000001.jpg", 0),
        (images / "b" / "bar" / "00000002.jpg", 7),
    ]
    with _raises_naming(root / "trainvalsplit_places205" / "val_places205.csv", "not found"):
        read_places205(root, "val")


def test_inat_meta_list_does_not_double_the_prefix(tmp_path):
    root = tmp_path / "iNaturalist2018"
    image = _touch(root / "train_val2018" / "Plantae" / "7477" / "a.jpg")
    _touch(root / "train_val2018" / "Aves" / "12" / "b.jpg")
    # the converter copies the official file_name, which already starts with train_val2018/
    _write(root / "meta" / "train.txt", "train_val2018/Plantae/7477/a.jpg 7477\nAves/12/b.jpg 12\n")
    assert read_inat18(root, "train") == [(image, 7477), (root / "train_val2018" / "Aves" / "12" / "b.jpg", 12)]


def _inat_json(images, annotations):
    return json.dumps({"images": images, "annotations": annotations, "categories": []})


def test_inat_official_json(tmp_path):
    root = tmp_path / "iNaturalist2018"
    _touch(root / "train_val2018" / "Plantae" / "7477" / "a.jpg")
    _touch(root / "train_val2018" / "Aves" / "12" / "b.jpg")
    images = [
        {"id": 5, "file_name": "train_val2018/Plantae/7477/a.jpg"},
        {"id": 2, "file_name": "train_val2018/Aves/12/b.jpg"},
    ]
    annotations = [{"id": 1, "image_id": 2, "category_id": 12}, {"id": 2, "image_id": 5, "category_id": 7477}]
    _write(root / "val2018.json", _inat_json(images, annotations))
    assert read_inat18(root, "val") == [
        (root / "train_val2018" / "Plantae" / "7477" / "a.jpg", 7477),
        (root / "train_val2018" / "Aves" / "12" / "b.jpg", 12),
    ]


def test_inat_json_errors(tmp_path):
    root = tmp_path / "iNaturalist2018"
    json_file = _write(
        root / "train2018.json",
        _inat_json([{"id": 1, "file_name": "a.jpg"}], [{"id": 1, "image_id": 1, "category_id": 0},
                                                      {"id": 2, "image_id": 9, "category_id": 0}]),
    )
    with _raises_naming(json_file, "unknown image_id 9"):
        read_inat18(root, "train", check_files=False)
    _write(json_file, _inat_json([{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
                                 [{"id": 1, "image_id": 1, "category_id": 0}]))
    with _raises_naming(json_file, "has no annotation"):
        read_inat18(root, "train", check_files=False)
    with _raises_naming(root / "meta" / "val.txt", "not found"):
        read_inat18(root, "val")


# ----------------------------------------------------------------------------- VOC classification


def _write_voc_cls(root: Path, split: str, ids, labels_by_class, order=None):
    main = root / "ImageSets" / "Main"
    _write(main / f"{split}.txt", "".join(f"{image_id}\n" for image_id in ids))
    for name in VOC_CLASSES:
        values = labels_by_class.get(name, {})
        rows = order or ids
        # the official files right-align the value: "000005 -1" / "000007  1" / "000009  0"
        _write(main / f"{name}_{split}.txt", "".join(f"{i} {values.get(i, -1):2d}\n" for i in rows))


def test_voc_cls_labels_encoding_and_order(tmp_path):
    ids = ["000005", "000002", "000009"]
    _write_voc_cls(
        tmp_path, "trainval", ids,
        {"aeroplane": {"000005": 1, "000002": 0}, "tvmonitor": {"000009": 1}, "dog": {"000002": 1}},
        order=sorted(ids),  # class files in another order: rows still follow trainval.txt
    )
    got_ids, labels = read_voc_cls_labels(tmp_path, "trainval")
    assert got_ids == ids
    assert labels.dtype == np.int8 and labels.shape == (3, 20)
    aeroplane, dog, tv = VOC_CLASSES.index("aeroplane"), VOC_CLASSES.index("dog"), VOC_CLASSES.index("tvmonitor")
    assert labels[:, aeroplane].tolist() == [1, -1, 0]  # +1 -> 1, VOC 0 (difficult) -> -1, -1 -> 0
    assert labels[:, dog].tolist() == [0, 1, 0]
    assert labels[:, tv].tolist() == [0, 0, 1]
    assert labels.sum() == 1 + 1 + 1 - 1


def test_voc_cls_mismatched_ids_are_an_error(tmp_path):
    _write_voc_cls(tmp_path, "test", ["000001", "000002"], {})
    bird = tmp_path / "ImageSets" / "Main" / "bird_test.txt"
    _write(bird, "000001 -1\n000003 -1\n")
    with _raises_naming(bird, "000002"):
        read_voc_cls_labels(tmp_path, "test")
    _write(bird, "000001 -1\n000002 -1\n000003 1\n")
    with _raises_naming(bird, "000003"):
        read_voc_cls_labels(tmp_path, "test")
    _write(bird, "000001 -1\n000002 2\n")
    with _raises_naming(bird, "line 2"):
        read_voc_cls_labels(tmp_path, "test")


def test_voc_cls_missing_files(tmp_path, realdata):
    with _raises_naming(tmp_path / "ImageSets" / "Main" / "trainval.txt", "not found"):
        read_voc_cls_labels(tmp_path, "trainval")
    # the realdata VOC2007 copy ships trainval.txt but no per-class files
    voc07 = realdata / "mmdet_tests_data" / "VOCdevkit" / "VOC2007"
    with _raises_naming(voc07 / "ImageSets" / "Main" / "aeroplane_trainval.txt", "not found"):
        read_voc_cls_labels(voc07, "trainval")


# ----------------------------------------------------------------------------- VOC detection


def test_voc_det_realdata_voc2007(realdata):
    voc07 = realdata / "mmdet_tests_data" / "VOCdevkit" / "VOC2007"
    for split in ("trainval", "test"):
        (ann,) = read_voc_det(voc07, split)
        assert ann.image_id == "000001" and ann.path == voc07 / "JPEGImages" / "000001.jpg"
        assert (ann.width, ann.height) == (353, 500)
        assert ann.boxes.dtype == np.float32
        assert ann.boxes.tolist() == [[48, 240, 195, 371], [8, 12, 352, 498]]
        assert [VOC_CLASSES[i] for i in ann.labels] == ["dog", "person"]
        assert ann.labels.dtype == np.int64 and ann.difficult.tolist() == [False, False]
        assert load_image(ann.path).size == (ann.width, ann.height)


def test_voc_det_realdata_id_from_list_not_filename(realdata):
    voc12 = realdata / "mmdet_tests_data" / "VOCdevkit" / "VOC2012"
    (ann,) = read_voc_det(voc12, "trainval")
    # the XML says <filename>000002.jpg</filename>; the list file says 000001
    assert ann.image_id == "000001" and ann.path == voc_image_path(voc12, "000001")
    assert (ann.width, ann.height) == (335, 500)
    assert ann.boxes.tolist() == [[139, 200, 207, 301]]
    assert ann.labels.tolist() == [VOC_CLASSES.index("train")] and ann.difficult.tolist() == [False]
    assert load_image(ann.path).size == (335, 500)


def test_voc_det_realdata_custom_flat_layout(realdata):
    folder = realdata / "mmdet_tests_data" / "custom_dataset"
    ann = parse_voc_xml(folder / "images" / "000001.xml", "000001", folder / "images" / "000001.jpg")
    assert ann.boxes.tolist() == [[48, 240, 195, 371], [8, 12, 352, 498]]
    assert read_id_list(folder / "trainval.txt") == ["000001"]


_XML_QUIRKS = """<annotation>
  <filename>someone_else.jpg</filename>
  <object><name>Aeroplane </name><difficult>1</difficult>
    <bndbox><xmin>48.0</xmin><ymin>240</ymin><xmax>195.5</xmax><ymax>371</ymax></bndbox></object>
  <object><name>dining table</name><truncated></truncated><pose/>
    <bndbox><xmin>1</xmin><ymin>2</ymin><xmax>3</xmax><ymax>4</ymax></bndbox></object>
  <object><name>potted_plant</name><difficult></difficult>
    <bndbox><xmin>5</xmin><ymin>6</ymin><xmax>7</xmax><ymax>8</ymax></bndbox></object>
  <object><name>person</name><difficult>0</difficult><truncated>1</truncated><pose>Left</pose>
    <bndbox><xmin>10</xmin><ymin>10</ymin><xmax>20</xmax><ymax>30</ymax></bndbox></object>
</annotation>"""


def _voc_tree(root: Path, ids, xml_by_id, image_size=(40, 30)) -> Path:
    _write(root / "ImageSets" / "Main" / "trainval.txt", "\n".join(ids))  # no trailing newline
    for image_id in ids:
        voc_image_path(root, image_id).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", image_size).save(voc_image_path(root, image_id))
        if image_id in xml_by_id:
            _write(root / "Annotations" / f"{image_id}.xml", xml_by_id[image_id])
    return root


def test_voc_det_xml_quirks(tmp_path):
    root = _voc_tree(tmp_path, ["2008_000001"], {"2008_000001": _XML_QUIRKS}, image_size=(200, 375))
    (ann,) = read_voc_det(root, "trainval")
    assert ann.image_id == "2008_000001" and ann.path.name == "2008_000001.jpg"
    assert (ann.width, ann.height) == (200, 375)  # no <size>: read from the image header
    assert ann.boxes.tolist() == [[48.0, 240.0, 195.5, 371.0], [1, 2, 3, 4], [5, 6, 7, 8], [10, 10, 20, 30]]
    assert [VOC_CLASSES[i] for i in ann.labels] == ["aeroplane", "diningtable", "pottedplant", "person"]
    assert ann.difficult.tolist() == [True, False, False, False]  # missing/empty difficult = 0


def test_voc_box_on_the_border_slack_is_accepted(tmp_path):
    """0-based writers (0..9) and exclusive edges (..11) are within the one pixel of slack."""
    box = "<bndbox><xmin>0</xmin><ymin>0</ymin><xmax>11</xmax><ymax>11</ymax></bndbox>"
    xml = f"<annotation><size><width>10</width><height>10</height></size><object><name>dog</name>{box}</object></annotation>"
    (ann,) = read_voc_det(_voc_tree(tmp_path, ["000007"], {"000007": xml}), "trainval")
    assert ann.boxes.tolist() == [[0, 0, 11, 11]]


def test_voc_class_name_variants():
    assert voc_class_index("Aeroplane ") == 0 and voc_class_index("TV-Monitor") == 19
    assert voc_class_index("airplane") is None and voc_class_index("tv") is None


@pytest.mark.parametrize(
    "object_xml, words",
    [
        ("<object><name>dog</name><difficult>0</difficult></object>", ["object 1", "no <bndbox>"]),
        ("<object><name>airplane</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>2</xmax><ymax>2</ymax></bndbox></object>",
         ["unknown class name 'airplane'"]),
        ("<object><name>dog</name><bndbox><xmin>1</xmin><ymin></ymin><xmax>2</xmax><ymax>2</ymax></bndbox></object>",
         ["<ymin>"]),
        ("<object><name>dog</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>2</xmax><ymax>x</ymax></bndbox></object>",
         ["not a number"]),
        ("<object><name>dog</name><bndbox><xmin>5</xmin><ymin>1</ymin><xmax>2</xmax><ymax>2</ymax></bndbox></object>",
         ["xmax<xmin"]),
        ("<object><name>dog</name><difficult>yes</difficult>"
         "<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>2</xmax><ymax>2</ymax></bndbox></object>", ["difficult"]),
        ("<object><name>dog</name", ["cannot parse XML"]),
        # outside the 10x10 image beyond the one pixel of slack around VOC's 1-based 1..10
        ("<object><name>dog</name><bndbox><xmin>2</xmin><ymin>1</ymin><xmax>12</xmax><ymax>5</ymax></bndbox></object>",
         ["object 1 (dog)", "outside the 10x10 image"]),
        ("<object><name>dog</name><bndbox><xmin>1</xmin><ymin>-1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox></object>",
         ["outside the 10x10 image"]),
    ],
)
def test_voc_det_malformed_xml_names_the_file(tmp_path, object_xml, words):
    xml = f"<annotation><size><width>10</width><height>10</height></size>{object_xml}</annotation>"
    root = _voc_tree(tmp_path, ["000007"], {"000007": xml})
    with _raises_naming(root / "Annotations" / "000007.xml", *words):
        read_voc_det(root, "trainval")


def test_voc_det_missing_files(tmp_path):
    with _raises_naming(tmp_path / "ImageSets" / "Main" / "test.txt", "not found"):
        read_voc_det(tmp_path, "test")
    root = _voc_tree(tmp_path, ["000001", "000002"], {"000001": "<annotation/>"})
    with _raises_naming(root / "Annotations" / "000002.xml", "not found"):
        read_voc_det(root, "trainval")
    _write(root / "Annotations" / "000002.xml", "<annotation><size><width>4</width><height>3</height></size></annotation>")
    anns = read_voc_det(root, "trainval")
    assert anns[1].boxes.shape == (0, 4) and anns[1].labels.shape == (0,) and (anns[1].width, anns[1].height) == (4, 3)
    voc_image_path(root, "000002").unlink()
    with _raises_naming(voc_image_path(root, "000002"), "image not found"):
        read_voc_det(root, "trainval")


# ----------------------------------------------------------------------------- VOC segmentation


def test_voc_id_list_without_trailing_newline(realdata):
    list_file = realdata / "voc_SegmentationClassAug_sample" / "train_aug_ids.txt"
    assert not list_file.read_bytes().endswith(b"\n")
    ids = read_id_list(list_file)
    assert len(ids) == 10582 and ids[-1] == list_file.read_text().split()[-1]
    assert all(len(i) == 11 and i[4] == "_" for i in ids)


def _seg_tree(root: Path, train, aug, val, aug_labels_from: "Path | None" = None) -> Path:
    seg = root / "ImageSets" / "Segmentation"
    for name, ids in (("train", train), ("aug", aug), ("val", val)):
        if ids is not None:
            _write(seg / f"{name}.txt", "\n".join(ids))
    for image_id in train + aug + (val or []):
        _touch(voc_image_path(root, image_id))
    for image_id in train + (val or []):
        _touch(root / "SegmentationClass" / f"{image_id}.png")
    for image_id in aug:
        target = root / "SegmentationClassAug" / f"{image_id}.png"
        if aug_labels_from is not None:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(aug_labels_from / f"{image_id}.png", target)
        else:
            _touch(target)
    return root


def test_voc_seg_train_aug_pairing(tmp_path, realdata):
    sample = realdata / "voc_SegmentationClassAug_sample" / "SegmentationClassAug"
    root = _seg_tree(tmp_path, ["2007_000032", "2007_000039"], ["2008_000002", "2008_000003"], ["2007_000033"],
                     aug_labels_from=sample)
    train = read_voc_seg(root, "train")
    assert train == [
        (root / "JPEGImages" / "2007_000032.jpg", root / "SegmentationClass" / "2007_000032.png"),
        (root / "JPEGImages" / "2007_000039.jpg", root / "SegmentationClass" / "2007_000039.png"),
        (root / "JPEGImages" / "2008_000002.jpg", root / "SegmentationClassAug" / "2008_000002.png"),
        (root / "JPEGImages" / "2008_000003.jpg", root / "SegmentationClassAug" / "2008_000003.png"),
    ]
    assert set(np.unique(read_label_png(train[3][1])).tolist()) == {0, 15, 19}
    assert read_voc_seg(root, "val") == [
        (root / "JPEGImages" / "2007_000033.jpg", root / "SegmentationClass" / "2007_000033.png")
    ]


def test_voc_seg_pair_format_lines(tmp_path):
    root = _seg_tree(tmp_path, ["a"], [], ["v"])
    _write(root / "ImageSets" / "Segmentation" / "aug.txt", "/JPEGImages/b.jpg /SegmentationClassAug/b.png\n")
    _touch(root / "JPEGImages" / "b.jpg")
    _touch(root / "SegmentationClassAug" / "b.png")
    assert read_voc_seg(root, "train")[1] == (root / "JPEGImages" / "b.jpg", root / "SegmentationClassAug" / "b.png")


def test_voc_seg_errors(tmp_path):
    seg = tmp_path / "ImageSets" / "Segmentation"
    root = _seg_tree(tmp_path, ["a", "b"], ["c"], None)
    with _raises_naming(seg / "val.txt", "not found"):
        read_voc_seg(root, "val")
    (seg / "aug.txt").unlink()
    with _raises_naming(seg / "aug.txt", "not found"):
        read_voc_seg(root, "train")
    _write(seg / "aug.txt", "c\nb")
    with _raises_naming(seg / "aug.txt", "both train.txt and aug.txt"):
        read_voc_seg(root, "train")
    _write(seg / "aug.txt", "c")
    _write(seg / "val.txt", "c")
    with _raises_naming(seg / "val.txt", "also a training image"):
        read_voc_seg(root, "train")
    _write(seg / "val.txt", "d")
    with _raises_naming(tmp_path / "JPEGImages" / "d.jpg", "image not found"):
        read_voc_seg(root, "val")
    _touch(tmp_path / "JPEGImages" / "d.jpg")
    with _raises_naming(tmp_path / "SegmentationClass" / "d.png", "label not found"):
        read_voc_seg(root, "val")


# ----------------------------------------------------------------------------- COCO


def _coco_sample(realdata, name="coco_sample.json", drop_annotation=None) -> dict:
    data = json.loads((realdata / "mmdet_tests_data" / name).read_text())
    if drop_annotation is not None:
        data["annotations"] = [a for a in data["annotations"] if a["id"] != drop_annotation]
    return data


def test_coco_realdata_unknown_category_and_duplicate_ids(realdata):
    sample = realdata / "mmdet_tests_data" / "coco_sample.json"
    with _raises_naming(sample, "annotation 6", "category_id 3"):
        load_coco(sample)
    wrong = realdata / "mmdet_tests_data" / "coco_wrong_format_sample.json"
    with _raises_naming(wrong, "duplicate annotation id 1"):
        load_coco(wrong)


@pytest.mark.parametrize("name", ["coco_sample.json", "Objects365/unsorted_obj365_sample.json"])
def test_coco_realdata_edge_cases(tmp_path, realdata, name):
    """coco_sample without its one annotation of an undeclared category (id 6)."""
    ann_file = _write(tmp_path / "sample.json", json.dumps(_coco_sample(realdata, name, drop_annotation=6)))
    coco, images = read_coco_instances(ann_file, tmp_path / "images", check_files=False)
    assert category_ids(coco) == [1, 2]
    assert sorted(coco.getAnnIds()) == [1, 2, 3, 4, 5, 7, 9]  # everything stays for evaluation
    assert [img.image_id for img in images] == [0, 1, 2, 3]  # image ids start at 0
    assert [img.path for img in images] == [tmp_path / "images" / f"fake{i}.jpg" for i in range(1, 5)]
    assert [(img.width, img.height) for img in images] == [(800, 800)] * 3 + [(20, 20)]
    first, second, third, fourth = images
    assert first.boxes.tolist() == [[0, 0, 20, 20], [0, 0, 20, 20]]
    assert first.category_ids.tolist() == [1, 2] and first.labels.tolist() == [0, 1]
    assert first.iscrowd.tolist() == [False, True]  # crowd box with no segmentation key
    assert first.segmentations[1] == []
    assert segmentation_to_mask(first.segmentations[1], 800, 800).sum() == 0
    assert segmentation_to_mask(first.segmentations[0], 800, 800).sum() == 100  # the 10x10 polygon
    # image 1: ann 3 kept, ann 4 (ignore=1) and ann 5 (zero width) are not training targets
    assert second.boxes.tolist() == [[0, 0, 20, 20]] and second.labels.tolist() == [0]
    assert third.boxes.shape == (0, 4) and third.labels.shape == (0,) and third.iscrowd.shape == (0,)
    # image 3: ann 7 (area 0) and ann 9 (0.1 px high) are left out, as MMDetection does
    assert fourth.boxes.shape == (0, 4)
    # pycocotools can rasterise every annotation, including the crowd one without a mask
    assert coco.annToMask(coco.anns[2]).sum() == 0 and coco.annToMask(coco.anns[1]).sum() == 100
    assert coco.anns[3]["iscrowd"] == 0 and coco.anns[5]["bbox"] == [0, 0, 0, 10]


def test_coco_realdata_val2017_excerpt(realdata):
    ann_file = realdata / "cvnets_coco_val2017_subset" / "annotations" / "instances_val2017.json"
    coco, images = read_coco_instances(ann_file, Path("/nonexistent"), check_files=False)
    ids = category_ids(coco)
    assert len(ids) == 80 and ids[0] == 1 and ids[-1] == 90  # gaps: 80 classes over ids 1..90
    names = {cat["id"]: cat["name"] for cat in coco.loadCats(ids)}
    assert [img.image_id for img in images] == [37777, 397133]
    by_id = {img.image_id: img for img in images}
    for image_id, size, name in ((37777, (352, 230), "potted plant"), (397133, (640, 427), "bottle")):
        img = by_id[image_id]
        assert (img.width, img.height) == size
        (category,) = img.category_ids.tolist()
        assert names[category] == name and img.labels.tolist() == [ids.index(category)]
        (ann,) = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        x, y, w, h = ann["bbox"]
        assert np.allclose(img.boxes, [[x, y, x + w, y + h]])
        mask = segmentation_to_mask(img.segmentations[0], img.height, img.width)
        assert mask.shape == (img.height, img.width) and mask.dtype == np.uint8
        assert np.array_equal(mask, coco.annToMask(ann))
        assert abs(int(mask.sum()) - ann["area"]) / ann["area"] < 0.1
    assert by_id[397133].labels.tolist() == [39] and by_id[37777].labels.tolist() == [58]


def test_coco_missing_image_files_are_named(tmp_path, realdata):
    ann_file = realdata / "cvnets_coco_val2017_subset" / "annotations" / "instances_val2017.json"
    with _raises_naming(tmp_path / "000000037777.jpg", "image not found"):
        read_coco_instances(ann_file, tmp_path)


def _tiny_coco(annotations, images=None, categories=None) -> dict:
    return {
        "images": images or [{"id": 1, "file_name": "a.jpg", "width": 40, "height": 30}],
        "annotations": annotations,
        "categories": categories or [{"id": 3, "name": "x"}, {"id": 7, "name": "y"}],
    }


def _ann(ann_id, bbox, category_id=3, image_id=1, **extra):
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox,
            "area": bbox[2] * bbox[3] if len(bbox) == 4 else 1.0, "iscrowd": 0, **extra}


def test_coco_annotation_to_unknown_image_names_the_json(tmp_path):
    ann_file = _write(tmp_path / "bad.json", json.dumps(_tiny_coco([_ann(1, [0, 0, 5, 5], image_id=99)])))
    with _raises_naming(ann_file, "unknown image_id 99"):
        load_coco(ann_file)


@pytest.mark.parametrize(
    "annotation, words",
    [
        (_ann(1, [0, 0, -2, 5]), ["negative box size"]),
        (_ann(1, [0, 0, 5]), ["bbox"]),
        (_ann(1, [0, 0, 5, 5], segmentation=[[1, 2, 3]]), ["odd number"]),
        (_ann(1, [0, 0, 5, 5], segmentation={"size": [10, 10], "counts": "abc"}), ["RLE size"]),
        (_ann(1, [0, 0, 5, 5], segmentation={"size": [30, 40], "counts": [5, 5]}), ["counts sum"]),
    ],
)
def test_coco_malformed_annotations(tmp_path, annotation, words):
    ann_file = _write(tmp_path / "bad.json", json.dumps(_tiny_coco([annotation])))
    with _raises_naming(ann_file, "annotation 1", *words):
        load_coco(ann_file)


def test_coco_unreadable_files(tmp_path):
    with _raises_naming(tmp_path / "none.json", "not found"):
        load_coco(tmp_path / "none.json")
    broken = _write(tmp_path / "broken.json", '{"images": [')
    with _raises_naming(broken, "cannot parse json"):
        load_coco(broken)
    no_categories = _write(tmp_path / "nocat.json", json.dumps({"images": [], "annotations": []}))
    with _raises_naming(no_categories, "'categories'"):
        load_coco(no_categories)


def _bbox_ap(coco, detections) -> float:
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(coco, coco.loadRes(detections), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return float(evaluator.stats[0])


def test_coco_annotation_id_zero_is_matched_in_evaluation(tmp_path):
    """pycocotools treats a match to annotation id 0 as 'unmatched'; load_coco renumbers ids."""
    boxes = [[2, 2, 10, 10], [20, 5, 12, 15]]
    data = _tiny_coco([_ann(0, boxes[0]), _ann(1, boxes[1], category_id=7)])
    ann_file = _write(tmp_path / "zero.json", json.dumps(data))
    coco = load_coco(ann_file)
    assert sorted(coco.getAnnIds()) == [1, 2]
    perfect = [{"image_id": 1, "category_id": c, "bbox": b, "score": 1.0} for c, b in ((3, boxes[0]), (7, boxes[1]))]
    assert _bbox_ap(coco, perfect) == pytest.approx(1.0)
    # the same file loaded by plain pycocotools misses the match to id 0 (the bug we work around)
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        raw = COCO(str(ann_file))
    assert _bbox_ap(raw, perfect) < 0.99


def test_coco_category_gaps_and_crowd_rle(tmp_path):
    crowd_mask = np.zeros((30, 40), dtype=np.uint8)
    crowd_mask[5:9, 10:30] = 1
    flat = crowd_mask.flatten(order="F")
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [2]])))  # run starts
    counts = [int(c) for c in np.diff(np.concatenate([[0], changes]))[:-1]] + [int(len(flat) - changes[-2])]
    assert sum(counts) == 1200 and np.array_equal(
        segmentation_to_mask({"size": [30, 40], "counts": counts}, 30, 40), crowd_mask
    )
    compressed = mask_utils.encode(np.asfortranarray(crowd_mask))
    compressed_str = {"size": [30, 40], "counts": compressed["counts"].decode("ascii")}
    annotations = [
        _ann(10, [1, 2, 3, 4], category_id=7, segmentation=[[1, 2, 4, 2, 4, 6, 1, 6]]),
        _ann(11, [10, 5, 20, 4], category_id=3, iscrowd=1, segmentation={"size": [30, 40], "counts": counts}),
        _ann(12, [10, 5, 20, 4], category_id=3, segmentation=compressed_str),
        _ann(13, [0, 0, 2, 2], category_id=7, segmentation=[]),
    ]
    ann_file = _write(tmp_path / "gaps.json", json.dumps(_tiny_coco(annotations)))
    _touch(tmp_path / "images" / "a.jpg")
    coco, (image,) = read_coco_instances(ann_file, tmp_path / "images")
    assert category_ids(coco) == [3, 7]
    assert image.labels.tolist() == [1, 0, 0, 1] and image.category_ids.tolist() == [7, 3, 3, 7]
    assert image.iscrowd.tolist() == [False, True, False, False]
    assert np.array_equal(segmentation_to_mask(image.segmentations[1], 30, 40), crowd_mask)
    assert np.array_equal(segmentation_to_mask(image.segmentations[2], 30, 40), crowd_mask)
    assert image.segmentations[3] == [] and segmentation_to_mask([], 30, 40).sum() == 0
    for ann_id in (11, 12):
        assert np.array_equal(coco.annToMask(coco.anns[ann_id]), crowd_mask)
    assert coco.annToMask(coco.anns[13]).sum() == 0  # empty polygon list: no crash


def test_segmentation_to_mask_hand_worked():
    square = segmentation_to_mask([[2, 2, 8, 2, 8, 6, 2, 6]], 20, 20)
    expected = np.zeros((20, 20), dtype=np.uint8)
    expected[2:6, 2:8] = 1
    assert np.array_equal(square, expected)
    # uncompressed RLE is column-major: 2 zeros, 3 ones, 7 zeros over a 3x4 image
    rle = segmentation_to_mask({"size": [3, 4], "counts": [2, 3, 7]}, 3, 4)
    assert rle.tolist() == [[0, 1, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0]]
    two_parts = segmentation_to_mask([[0, 0, 2, 0, 2, 2, 0, 2], [4, 4, 6, 4, 6, 6, 4, 6]], 8, 8)
    assert two_parts.sum() == 8 and two_parts[0, 0] == 1 and two_parts[5, 5] == 1
    assert segmentation_to_mask([[0, 0, 10, 0]], 5, 5).sum() == 0  # 2-point "polygon" is not a box
    assert segmentation_to_mask([], 7, 9).shape == (7, 9)
    with pytest.raises(ValueError):
        segmentation_to_mask({"size": [3, 3], "counts": [9]}, 3, 4)


def test_coco_deep_copy_of_raw_segmentation_is_unchanged(tmp_path):
    """The repaired COCO object gets an empty RLE, the caller's targets keep the raw []."""
    data = _tiny_coco([_ann(1, [1, 1, 5, 5], segmentation=[])])
    original = copy.deepcopy(data)
    ann_file = _write(tmp_path / "e.json", json.dumps(data))
    coco, (image,) = read_coco_instances(ann_file, tmp_path, check_files=False)
    assert image.segmentations == [original["annotations"][0]["segmentation"]] == [[]]
    assert isinstance(coco.anns[1]["segmentation"], dict)


# ----------------------------------------------------------------------------- Cityscapes


def test_cityscapes_realdata(realdata):
    root = realdata / "mmseg_tests_data" / "pseudo_cityscapes_dataset"
    ((image, label),) = read_cityscapes(root, "val")
    folder = "frankfurt"
    assert image == root / "leftImg8bit" / "val" / folder / "frankfurt_000000_000294_leftImg8bit.png"
    assert label == root / "gtFine" / "val" / folder / "frankfurt_000000_000294_gtFine_labelTrainIds.png"
    assert load_image(image).size == (256, 128)
    train_ids = read_cityscapes_label(label)
    assert train_ids.shape == (128, 256)
    assert set(np.unique(train_ids).tolist()) == {0, 1, 2, 4, 5, 7, 8, 10, 11, 13, 255}
    with _raises_naming(root / "leftImg8bit" / "train", "not found"):
        read_cityscapes(root, "train")


def test_cityscapes_label_ids_fallback(tmp_path, realdata):
    source = realdata / "mmseg_tests_data" / "pseudo_cityscapes_dataset"
    root = tmp_path / "cityscapes"
    shutil.copytree(source, root)
    shipped = read_label_png(next((root / "gtFine" / "val" / "frankfurt").glob("*_labelTrainIds.png")))
    next((root / "gtFine" / "val" / "frankfurt").glob("*_labelTrainIds.png")).unlink()
    ((_, label),) = read_cityscapes(root, "val")
    assert label.name == "frankfurt_000000_000294_gtFine_labelIds.png"
    label_ids = read_label_png(label)
    assert set(np.unique(label_ids).tolist()) == {1, 2, 3, 4, 7, 8, 11, 13, 17, 20, 21, 23, 24, 26}
    converted = read_cityscapes_label(label)
    assert set(np.unique(converted).tolist()) == {0, 1, 2, 4, 5, 7, 8, 10, 11, 13, 255}
    assert np.array_equal(converted[label_ids == 26], np.full((label_ids == 26).sum(), 13))  # car
    assert np.array_equal(converted[label_ids == 4], np.full((label_ids == 4).sum(), 255))  # static
    # downscaled independently: a few boundary pixels differ from the shipped file (77 of 32768)
    assert (converted != shipped).mean() < 0.01
    for image_label in (root / "gtFine" / "val" / "frankfurt").glob("*_labelIds.png"):
        image_label.unlink()
    expected = root / "gtFine" / "val" / "frankfurt" / "frankfurt_000000_000294_gtFine_labelTrainIds.png"
    with _raises_naming(expected, "label not found"):
        read_cityscapes(root, "val")


def test_cityscapes_train_id_table():
    assert len(CITYSCAPES_CLASSES) == 19
    trained = {int(i): int(LABEL_ID_TO_TRAIN_ID[i]) for i in range(256) if LABEL_ID_TO_TRAIN_ID[i] != 255}
    assert sorted(trained.values()) == list(range(19))
    assert trained == {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
                       24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
    assert CITYSCAPES_CLASSES[13] == "car" and CITYSCAPES_CLASSES[11] == "person"


def test_coco_missing_iscrowd_and_area_default(tmp_path):
    annotation = {"id": 4, "image_id": 1, "category_id": 7, "bbox": [1, 2, 3, 4]}  # no iscrowd, area
    ann_file = _write(tmp_path / "min.json", json.dumps(_tiny_coco([annotation])))
    coco, (image,) = read_coco_instances(ann_file, tmp_path, check_files=False)
    assert coco.anns[4]["iscrowd"] == 0 and coco.anns[4]["area"] == 12
    assert image.iscrowd.tolist() == [False] and image.boxes.tolist() == [[1, 2, 4, 6]]
    assert image.labels.tolist() == [1]


def test_realdata_sixteen_bit_instance_ids_decode(realdata):
    """Cityscapes instanceIds is a real I;16 PNG: load_image scales it, it does not saturate."""
    path = next((realdata / "mmseg_tests_data" / "pseudo_cityscapes_dataset" / "gtFine").rglob("*_instanceIds.png"))
    raw = np.asarray(Image.open(path)).astype(np.int64)
    assert Image.open(path).mode == "I;16" and raw.max() == 26002
    decoded = np.asarray(load_image(path))
    assert decoded.shape == raw.shape + (3,)
    assert np.array_equal(decoded[..., 0], np.floor(raw / 257 + 0.5).astype(np.uint8))
    assert decoded.max() == 101  # 26002 / 257; a clipping conversion would give 255


def test_realdata_pseudo_dataset_splits_and_images(realdata):
    folder = realdata / "mmseg_tests_data" / "pseudo_dataset"
    assert read_id_list(folder / "splits" / "train.txt") == ["00000", "00001", "00002", "00003"]
    assert read_id_list(folder / "splits" / "val.txt") == ["00004"]
    for image_id in ("00000", "00004"):
        image = load_image(folder / "imgs" / f"{image_id}_img.jpg")
        assert image.size == (256, 128)
        assert read_label_png(folder / "gts" / f"{image_id}_gt.png").shape == (image.height, image.width)
