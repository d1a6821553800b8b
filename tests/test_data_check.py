"""`densebench data check`: present / missing / malformed parts and the per-protocol verdict."""
from __future__ import annotations

import json
import shutil

import pytest

from densebench import cli
from densebench.data import check, layout
from densebench.errors import InputError

ALL_PARTS = (
    "imagenet_train", "imagenet_val", "places205_train", "places205_val", "inat18_train", "inat18_val",
    "voc07_cls_trainval", "voc07_cls_test", "voc07_det_trainval", "voc07_det_test", "voc12_det_trainval",
    "voc12_seg_train", "voc12_seg_aug", "voc12_seg_val", "coco_train2017", "coco_val2017",
    "cityscapes_train", "cityscapes_val",
)
TINY_COUNTS = {
    "imagenet_train": 160, "imagenet_val": 200, "places205_train": 96, "places205_val": 128,
    "inat18_train": 96, "inat18_val": 128, "voc07_cls_trainval": 100, "voc07_cls_test": 100,
    "voc07_det_trainval": 100, "voc07_det_test": 100, "voc12_det_trainval": 40,
    "voc12_seg_train": 24, "voc12_seg_aug": 24, "voc12_seg_val": 16,
    "coco_train2017": 48, "coco_val2017": 32, "cityscapes_train": 12, "cityscapes_val": 4,
}


@pytest.fixture()
def data_copy(synth_root, tmp_path):
    """A private copy of the tiny benchmark that a test may damage."""
    root = tmp_path / "data"
    shutil.copytree(synth_root, root)
    return root


def test_protocol_table_covers_every_protocol_and_part():
    assert set(check.PROTOCOL_DATASETS) == set(cli.PROTOCOLS)
    assert {p for parts in check.PROTOCOL_DATASETS.values() for p in parts} == set(ALL_PARTS)
    assert set(check.PART_CHECKS) == set(ALL_PARTS)


def test_everything_present_on_synthetic_data(synth_root, capsys):
    statuses = check.check_parts(synth_root)
    assert {part: (s.status, s.count) for part, s in statuses.items()} == {
        part: ("present", count) for part, count in TINY_COUNTS.items()}
    for protocol in check.PROTOCOL_DATASETS:
        assert check.missing_for_protocol(synth_root, protocol) == []
    assert cli.main(["data", "check", str(synth_root)]) == 0
    out = capsys.readouterr().out
    assert "CANNOT RUN" not in out and "seg_cityscapes_fcn: ok" in out
    assert "voc07_det_test       present       100" in out


def test_json_output(synth_root, capsys):
    assert cli.main(["data", "check", str(synth_root), "--protocols", "svm_voc07,knn_imagenet", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["protocols"]) == {"svm_voc07", "knn_imagenet"}
    assert report["protocols"]["svm_voc07"]["can_run"] is True
    assert set(report["parts"]) == {"voc07_cls_trainval", "voc07_cls_test", "imagenet_train", "imagenet_val"}
    assert report["parts"]["imagenet_val"] == {"status": "present", "count": 200, "detail": "200 images, 10 classes"}


def test_removed_split_file_blocks_detection_only(data_copy, capsys):
    (layout.voc07_root(data_copy) / "ImageSets" / "Main" / "test.txt").unlink()
    status = check.check_parts(data_copy, ["voc07_det_test", "voc07_det_trainval"])
    # VOC2007/ exists, so a split list missing inside it is malformed (not "never installed")
    assert status["voc07_det_test"].status == "malformed"
    assert "test.txt: not found" in status["voc07_det_test"].detail
    assert status["voc07_det_trainval"].status == "present"
    reasons = check.missing_for_protocol(data_copy, "det_voc0712_c4")
    assert len(reasons) == 1 and reasons[0].startswith("voc07_det_test malformed:") and "test.txt" in reasons[0]
    # svm_voc07 also reads test.txt (the row order of the class files): blocked as well
    assert check.missing_for_protocol(data_copy, "svm_voc07")
    assert cli.main(["data", "check", str(data_copy), "--protocols", "knn_imagenet"]) == 0
    capsys.readouterr()
    assert cli.main(["data", "check", str(data_copy), "--protocols", "det_voc0712_c4,seg_voc12aug_fcn"]) == 1
    captured = capsys.readouterr()
    assert "det_voc0712_c4: CANNOT RUN" in captured.out and "seg_voc12aug_fcn: ok" in captured.out
    assert "cannot run: det_voc0712_c4" in captured.err


def test_removed_dataset_folder_is_missing(data_copy):
    shutil.rmtree(layout.cityscapes_root(data_copy))
    statuses = check.check_parts(data_copy, ["cityscapes_train", "cityscapes_val"])
    assert {s.status for s in statuses.values()} == {"missing"}
    assert cli.main(["data", "check", str(data_copy), "--protocols", "seg_cityscapes_fcn"]) == 1


def test_xml_without_bndbox_is_malformed(data_copy):
    voc07 = layout.voc07_root(data_copy)
    image_id = (voc07 / "ImageSets" / "Main" / "trainval.txt").read_text().split()[5]
    xml = voc07 / "Annotations" / f"{image_id}.xml"
    text = xml.read_text()
    start, end = text.index("<bndbox>"), text.index("</bndbox>") + len("</bndbox>")
    xml.write_text(text[:start] + text[end:])
    status = check.check_parts(data_copy, ["voc07_det_trainval"])["voc07_det_trainval"]
    assert status.status == "malformed" and f"{image_id}.xml" in status.detail
    assert check.missing_for_protocol(data_copy, "det_voc0712_c4")[0].startswith("voc07_det_trainval malformed")


def test_coco_annotation_on_unknown_image_is_malformed(data_copy):
    ann_file = layout.coco_root(data_copy) / "annotations" / "instances_val2017.json"
    data = json.loads(ann_file.read_text())
    data["annotations"][0]["image_id"] = 999_999_999
    ann_file.write_text(json.dumps(data))
    status = check.check_parts(data_copy, ["coco_val2017"])["coco_val2017"]
    assert status.status == "malformed" and "instances_val2017.json" in status.detail
    assert check.check_parts(data_copy, ["coco_train2017"])["coco_train2017"].status == "present"


def test_zero_byte_sample_image_is_malformed(data_copy):
    val = layout.imagenet_root(data_copy) / "val"
    first = (layout.imagenet_root(data_copy) / "meta" / "val.txt").read_text().split()[0]
    (val / first).write_bytes(b"")
    status = check.check_parts(data_copy, ["imagenet_val"])["imagenet_val"]
    assert status.status == "malformed" and first in status.detail


def test_listed_image_absent_is_reported(data_copy):
    places = layout.places205_root(data_copy)
    (places / "data/vision/torralba/deeplearning/images256/b/beach/00000003.jpg").unlink()
    status = check.check_parts(data_copy, ["places205_train"])["places205_train"]
    assert status.status == "malformed" and "00000003.jpg" in status.detail


def test_label_png_with_foreign_values_is_malformed(data_copy):
    import numpy as np
    from PIL import Image

    voc12 = layout.voc12_root(data_copy)
    first = (voc12 / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[0]
    path = voc12 / "SegmentationClass" / f"{first}.png"
    labels = np.array(Image.open(path))
    labels[0, 0] = 77
    Image.fromarray(labels, mode="L").save(path)
    status = check.check_parts(data_copy, ["voc12_seg_val"])["voc12_seg_val"]
    assert status.status == "malformed" and "77" in status.detail


def test_unknown_protocol_and_root(synth_root, tmp_path, capsys):
    with pytest.raises(InputError, match="unknown protocol"):
        check.missing_for_protocol(synth_root, "nope")
    assert cli.main(["data", "check", str(synth_root), "--protocols", "svm_voc07,nope"]) == 1
    assert "unknown protocol 'nope'" in capsys.readouterr().err
    assert cli.main(["data", "check", str(tmp_path / "absent")]) == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["data", "check", str(empty)]) == 1
    statuses = check.check_parts(empty)
    assert {s.status for s in statuses.values()} == {"missing"}
