"""Bad datasets through the real CLI: each is exit 1 with one line naming the culprit file.

Every case copies only the dataset folder(s) its protocol reads from the tiny synthetic data,
damages one file, and runs `python -m densebench evaluate` (and `data check`) as a subprocess.
It asserts exit code 1, exactly one stderr line `densebench evaluate: error: ...` that names
the culprit file, no "Traceback" anywhere in the output and no results folder (the data is
validated before any feature is extracted or anything is written), and that `data check`
rejects the same data naming the same file.

The last tests damage files that `data check` does not sample (it decodes the first, middle
and last item of each split) so the error comes from a DataLoader worker during the run:
still one line, exit 1, and no record.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, Tuple

import numpy as np
import pytest
from PIL import Image

from densebench.data import layout

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "densebench", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600)


def assert_one_line_error(result: subprocess.CompletedProcess, command: str, culprit: Path, words: Sequence[str]):
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    assert result.returncode == 1, output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"densebench {command}: error: "), output
    assert str(culprit) in lines[0], output
    for word in words:
        assert word in lines[0], output


# ----------------------------------------------------------------------------- damage helpers


def list_ids(list_file: Path) -> list:
    return [line.split()[0] for line in list_file.read_text().splitlines() if line.strip()]


def rewrite_line(path: Path, index: int, new_line: str) -> None:
    lines = path.read_text().splitlines()
    lines[index] = new_line
    path.write_text("\n".join(lines) + "\n")


def voc07(root: Path) -> Path:
    return layout.voc07_root(root)


def voc12(root: Path) -> Path:
    return layout.voc12_root(root)


def first_voc07(root: Path, split: str) -> str:
    return list_ids(voc07(root) / "ImageSets" / "Main" / f"{split}.txt")[0]


def edit_xml(root: Path, old: str, new: str) -> Path:
    """Replace the first `old` in the first trainval XML of VOC2007; return the XML path."""
    xml = voc07(root) / "Annotations" / f"{first_voc07(root, 'trainval')}.xml"
    text = xml.read_text()
    assert old in text
    xml.write_text(text.replace(old, new, 1))
    return xml


def set_xml_box(root: Path, xmin: int, xmax: int) -> Path:
    xml = voc07(root) / "Annotations" / f"{first_voc07(root, 'trainval')}.xml"
    text = xml.read_text()
    start, end = text.index("<xmin>"), text.index("</xmax>")
    middle = text[start:end + len("</xmax>")]
    ymin = middle[middle.index("<ymin>"):middle.index("</ymin>") + len("</ymin>")]
    xml.write_text(text[:start] + f"<xmin>{xmin}</xmin>\n\t\t\t{ymin}\n\t\t\t<xmax>{xmax}</xmax>"
                   + text[end + len("</xmax>"):])
    return xml


def cls_label_value_2(root: Path) -> Path:
    class_file = voc07(root) / "ImageSets" / "Main" / "aeroplane_test.txt"
    image_id = list_ids(class_file)[0]
    rewrite_line(class_file, 0, f"{image_id}  2")
    return class_file


def empty_split_file(root: Path) -> Path:
    split_file = voc07(root) / "ImageSets" / "Main" / "trainval.txt"
    split_file.write_text("")
    return split_file


def removed_split_file(root: Path) -> Path:
    split_file = voc07(root) / "ImageSets" / "Main" / "test.txt"
    split_file.unlink()
    return split_file


def listed_image_missing(root: Path) -> Path:
    image = voc07(root) / "JPEGImages" / f"{list_ids(voc07(root) / 'ImageSets' / 'Main' / 'test.txt')[3]}.jpg"
    image.unlink()
    return image


def first_test_image(root: Path) -> Path:
    return voc07(root) / "JPEGImages" / f"{first_voc07(root, 'test')}.jpg"


def zero_byte_image(root: Path) -> Path:
    image = first_test_image(root)
    image.write_bytes(b"")
    return image


def truncated_image(root: Path) -> Path:
    image = first_test_image(root)
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 3])
    return image


def non_image_file(root: Path) -> Path:
    image = first_test_image(root)
    image.write_text("this is not a JPEG\n")
    return image


def directory_as_image(root: Path) -> Path:
    image = first_test_image(root)
    image.unlink()
    image.mkdir()
    return image


def image_symlink_loop(root: Path) -> Path:
    image = first_test_image(root)
    image.unlink()
    os.symlink(image.name, image)  # a link to itself
    return image


def xml_symlink_loop(root: Path) -> Path:
    xml = voc07(root) / "Annotations" / f"{first_voc07(root, 'trainval')}.xml"
    xml.unlink()
    other = xml.with_name("loop_partner.xml")
    os.symlink(other.name, xml)
    os.symlink(xml.name, other)
    return xml


def coco_json(root: Path) -> Path:
    return layout.coco_root(root) / "annotations" / "instances_val2017.json"


def edit_coco(edit: Callable[[dict], None]) -> Callable[[Path], Path]:
    def damage(root: Path) -> Path:
        path = coco_json(root)
        data = json.loads(path.read_text())
        edit(data)
        path.write_text(json.dumps(data))
        return path
    return damage


def coco_not_json(root: Path) -> Path:
    path = coco_json(root)
    path.write_text(path.read_text()[:-200])  # cut off mid-file
    return path


def _unknown_image(data: dict) -> None:
    data["annotations"][0]["image_id"] = 987654321


def _negative_image_size(data: dict) -> None:
    data["images"][0]["width"] = -640


def _negative_box_size(data: dict) -> None:
    data["annotations"][0]["bbox"][2] = -5.0


def imagenet_list(root: Path, split: str) -> Path:
    return layout.imagenet_root(root) / "meta" / f"{split}.txt"


def set_list_label(list_file_of: Callable[[Path], Path], label: int) -> Callable[[Path], Path]:
    def damage(root: Path) -> Path:
        list_file = list_file_of(root)
        relpath = list_file.read_text().splitlines()[0].rsplit(maxsplit=1)[0]
        rewrite_line(list_file, 0, f"{relpath} {label}")
        return list_file
    return damage


def imagenet_val_list(root: Path) -> Path:
    return imagenet_list(root, "val")


def imagenet_listed_image_missing(root: Path) -> Path:
    relpath = imagenet_val_list(root).read_text().splitlines()[1].rsplit(maxsplit=1)[0]
    image = layout.imagenet_root(root) / "val" / relpath
    image.unlink()
    return image


def imagenet_empty_val_list(root: Path) -> Path:
    imagenet_val_list(root).write_text("\n")
    return imagenet_val_list(root)


def imagenet_val_list_is_directory(root: Path) -> Path:
    imagenet_val_list(root).unlink()
    imagenet_val_list(root).mkdir()
    return imagenet_val_list(root)


def places_train_list(root: Path) -> Path:
    return layout.places205_root(root) / "trainvalsplit_places205" / "train_places205.csv"


def inat_val_list(root: Path) -> Path:
    return layout.inat18_root(root) / "meta" / "val.txt"


def seg_pair(root: Path, list_name: str, index: int) -> Tuple[Path, Path]:
    label_dir = "SegmentationClassAug" if list_name == "aug" else "SegmentationClass"
    image_id = list_ids(voc12(root) / "ImageSets" / "Segmentation" / f"{list_name}.txt")[index]
    return voc12(root) / "JPEGImages" / f"{image_id}.jpg", voc12(root) / label_dir / f"{image_id}.png"


def seg_label_rgb(root: Path) -> Path:
    _, label = seg_pair(root, "val", 0)
    Image.open(label).convert("RGB").save(label)
    return label


def write_label_like(label: Path, values: np.ndarray) -> None:
    Image.fromarray(values.astype(np.uint8), mode="L").save(label)


def seg_label_value_60(root: Path) -> Path:
    _, label = seg_pair(root, "val", 0)
    values = np.array(Image.open(label))
    values[:4, :4] = 60
    write_label_like(label, values)
    return label


def seg_label_wrong_size(root: Path) -> Path:
    _, label = seg_pair(root, "val", 0)
    values = np.array(Image.open(label))
    write_label_like(label, values[: values.shape[0] // 2])
    return label


def seg_aug_list_removed(root: Path) -> Path:
    aug = voc12(root) / "ImageSets" / "Segmentation" / "aug.txt"
    aug.unlink()
    return aug


def cityscapes_first_label(root: Path) -> Path:
    return sorted((layout.cityscapes_root(root) / "gtFine" / "val").glob("*/*_gtFine_labelTrainIds.png"))[0]


def cityscapes_label_wrong_size(root: Path) -> Path:
    label = cityscapes_first_label(root)
    values = np.array(Image.open(label))
    write_label_like(label, values[:, : values.shape[1] - 8])
    return label


def cityscapes_city_loop(root: Path) -> Path:
    city = layout.cityscapes_root(root) / "leftImg8bit" / "train" / "zz_loop"
    os.symlink(city.name, city)  # a link to itself
    return city


# ----------------------------------------------------------------------------- the corpus


@dataclass
class Case:
    name: str
    protocol: str
    folders: Tuple[str, ...]           # what to copy from the synthetic root
    damage: Callable[[Path], Path]     # damages the copy, returns the file the error must name
    words: Tuple[str, ...] = ()        # further words the error line must hold
    data_check: bool = True            # `data check` rejects it too (False: depends on the protocol config)


VOC07 = ("VOCdevkit/VOC2007",)
VOC = ("VOCdevkit",)
COCO = ("coco",)
IMAGENET = ("imagenet",)
VOC12 = ("VOCdevkit/VOC2012",)

CASES = [
    Case("voc_cls_label_value_2", "svm_voc07", VOC07, cls_label_value_2, ("is not 'image_id 1|0|-1'",)),
    Case("voc_empty_split_file", "svm_voc07", VOC07, empty_split_file, ("no image ids",)),
    Case("voc_missing_split_file", "svm_voc07", VOC07, removed_split_file, ("not found",)),
    Case("voc_listed_image_missing", "svm_voc07", VOC07, listed_image_missing, ("image not found",)),
    Case("zero_byte_image", "svm_voc07", VOC07, zero_byte_image, ("empty (0 bytes)",)),
    Case("truncated_image", "svm_voc07", VOC07, truncated_image, ("truncated",)),
    Case("non_image_file", "svm_voc07", VOC07, non_image_file, ("not an image file",)),
    Case("directory_as_image", "svm_voc07", VOC07, directory_as_image, ("is a directory",)),
    Case("image_symlink_loop", "svm_voc07", VOC07, image_symlink_loop, ("symbolic links",)),
    Case("voc_xmax_below_xmin", "det_voc0712_c4", VOC, lambda root: set_xml_box(root, 90, 40), ("xmax<xmin",)),
    Case("voc_box_outside_image", "det_voc0712_c4", VOC, lambda root: set_xml_box(root, 10, 900),
         ("outside the",)),
    Case("voc_unknown_class", "det_voc0712_c4", VOC,
         lambda root: edit_xml(root, "</name>", "_zebra</name>"), ("unknown class name",)),
    Case("voc_xml_symlink_loop", "det_voc0712_c4", VOC, xml_symlink_loop, ("does not resolve",)),
    Case("coco_not_json", "det_coco_maskrcnn_fpn", COCO, coco_not_json, ("cannot parse json",)),
    Case("coco_unknown_image", "det_coco_maskrcnn_fpn", COCO, edit_coco(_unknown_image), ("unknown image_id",)),
    Case("coco_negative_image_size", "det_coco_maskrcnn_fpn", COCO, edit_coco(_negative_image_size),
         ("positive 'width'",)),
    Case("coco_negative_box_size", "det_coco_maskrcnn_fpn", COCO, edit_coco(_negative_box_size),
         ("negative box size",)),
    Case("imagenet_label_above_1000", "knn_imagenet", IMAGENET, set_list_label(imagenet_val_list, 5000),
         ("label 5000", "1000 classes")),
    Case("imagenet_val_label_above_train", "knn_imagenet", IMAGENET, set_list_label(imagenet_val_list, 999),
         ("val label 999", "above every train label")),
    Case("imagenet_listed_image_missing", "knn_imagenet", IMAGENET, imagenet_listed_image_missing,
         ("image not found",)),
    Case("imagenet_empty_list", "knn_imagenet", IMAGENET, imagenet_empty_val_list, ("lists no images",)),
    Case("imagenet_list_is_directory", "knn_imagenet", IMAGENET, imagenet_val_list_is_directory,
         ("is a directory",)),
    # 9 is a valid Places205 label, but the tiny preset's probe has 8 classes: only evaluate knows
    Case("places_label_above_num_classes", "linear_places205_mhead", ("Places205",),
         set_list_label(places_train_list, 9), ("label 9", "num_classes=8"), data_check=False),
    Case("inat_label_above_8142", "linear_inat18_mhead", ("iNaturalist2018",),
         set_list_label(inat_val_list, 9000), ("label 9000",)),
    Case("seg_label_rgb", "seg_voc12aug_fcn", VOC12, seg_label_rgb, ("mode RGB",)),
    Case("seg_label_value_60", "seg_voc12aug_fcn", VOC12, seg_label_value_60, ("[60]",)),
    Case("seg_label_size_differs", "seg_voc12aug_fcn", VOC12, seg_label_wrong_size, ("but its image",)),
    Case("seg_aug_list_missing", "seg_voc12aug_fcn", VOC12, seg_aug_list_removed, ("not found",)),
    Case("cityscapes_label_size_differs", "seg_cityscapes_fcn", ("cityscapes",), cityscapes_label_wrong_size,
         ("but its image",)),
    Case("cityscapes_city_symlink_loop", "seg_cityscapes_fcn", ("cityscapes",), cityscapes_city_loop,
         ("symbolic links",)),
]


def copy_folders(synth_root: Path, root: Path, folders: Sequence[str]) -> None:
    for folder in folders:
        shutil.copytree(synth_root / folder, root / folder, symlinks=True)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_dataset_is_one_line_error(case, synth_root, resnet18_checkpoint, tmp_path):
    root = tmp_path / "data"
    copy_folders(synth_root, root, case.folders)
    culprit = case.damage(root)
    out = tmp_path / "results"
    result = run_cli("evaluate", resnet18_checkpoint, "--data-root", root, "--protocols", case.protocol,
                     "--preset", "tiny", "--out", out)
    assert_one_line_error(result, "evaluate", culprit, (f"{case.protocol} cannot run", *case.words))
    assert not out.exists()  # failed before anything was written
    check = run_cli("data", "check", root, "--protocols", case.protocol)
    assert "Traceback" not in check.stdout + check.stderr
    if case.data_check:
        assert check.returncode == 1 and str(culprit) in check.stdout, check.stdout + check.stderr
    else:
        assert check.returncode == 0, check.stdout + check.stderr


def test_malformed_data_is_an_error_under_protocols_all(synth_root, resnet18_checkpoint, tmp_path):
    """Only an absent dataset is skipped under `all`: a broken VOC2007 (everything else absent)
    stops the run, naming the file."""
    root = tmp_path / "data"
    copy_folders(synth_root, root, VOC07)
    culprit = cls_label_value_2(root)
    result = run_cli("evaluate", resnet18_checkpoint, "--data-root", root, "--preset", "tiny",
                     "--out", tmp_path / "results")
    assert_one_line_error(result, "evaluate", culprit, ("svm_voc07 cannot run",))
    assert not (tmp_path / "results").exists()


def test_absent_data_is_skipped_under_all_and_an_error_by_name(resnet18_checkpoint, tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    out = tmp_path / "results"
    result = run_cli("evaluate", resnet18_checkpoint, "--data-root", root, "--preset", "tiny", "--out", out)
    assert result.returncode == 0 and "Traceback" not in result.stdout + result.stderr
    assert "svm_voc07: skipped (voc07_cls_trainval missing:" in result.stdout
    assert not (out / "records").exists()
    result = run_cli("evaluate", resnet18_checkpoint, "--data-root", root, "--protocols", "knn_imagenet",
                     "--preset", "tiny", "--out", out)
    assert_one_line_error(result, "evaluate", layout.imagenet_root(root), ("knn_imagenet cannot run", "missing"))


# ----------------------------------------------------------------------------- errors during the run


def test_input_error_survives_pickle_and_dataloader_workers(tmp_path):
    """torch rebuilds a worker's exception as `cls(formatted traceback)`; pickle uses __reduce__."""
    import pickle

    import torch

    from densebench.errors import InputError

    error = pickle.loads(pickle.dumps(InputError(tmp_path / "x.jpg", "image file is empty (0 bytes)")))
    assert (error.path, error.problem) == (str(tmp_path / "x.jpg"), "image file is empty (0 bytes)")

    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, index):
            if index == 3:
                raise InputError(tmp_path / f"{index}.jpg", "cannot decode image") from ValueError("deep cause")
            return index

    with pytest.raises(InputError) as caught:
        list(torch.utils.data.DataLoader(Images(), batch_size=1, num_workers=2))
    assert str(caught.value) == f"{tmp_path / '3.jpg'}: cannot decode image"


def records(results_dir: Path) -> list:
    return sorted((results_dir / "records").glob("*.json")) if (results_dir / "records").is_dir() else []


def unsampled(items: list) -> int:
    """An index `data check` does not decode (it samples the first, middle and last item)."""
    assert len(items) >= 4
    return 1


def test_zero_byte_image_in_a_dataloader_worker(synth_root, resnet18_checkpoint, tmp_path):
    """The worker cannot send the InputError itself; it must still arrive as one line."""
    root = tmp_path / "data"
    copy_folders(synth_root, root, IMAGENET)
    lines = imagenet_list(root, "train").read_text().splitlines()
    relpath = lines[unsampled(lines)].rsplit(maxsplit=1)[0]
    culprit = layout.imagenet_root(root) / "train" / relpath
    culprit.write_bytes(b"")
    assert run_cli("data", "check", root, "--protocols", "knn_imagenet").returncode == 0  # not sampled
    out = tmp_path / "results"
    result = run_cli("evaluate", resnet18_checkpoint, "--data-root", root, "--protocols", "knn_imagenet",
                     "--preset", "tiny", "--out", out, "--workers", "2")
    output = result.stdout + result.stderr
    assert result.returncode == 1 and "Traceback" not in output and "RuntimeError" not in output, output
    failed = [line for line in result.stdout.splitlines() if "failed: knn_imagenet seed 0:" in line]
    assert failed == [f"  failed: knn_imagenet seed 0: {culprit}: image file is empty (0 bytes)"], output
    assert records(out) == []


def test_segmentation_label_above_class_count_during_training(synth_root, resnet18_checkpoint, tmp_path):
    """Was `IndexError: Target 60 is out of bounds` from the loss; now one line naming the PNG."""
    root = tmp_path / "data"
    copy_folders(synth_root, root, VOC12)
    aug_ids = list_ids(voc12(root) / "ImageSets" / "Segmentation" / "aug.txt")
    sampled = {0, len(aug_ids) // 2, len(aug_ids) - 1}
    for index in range(len(aug_ids)):
        if index not in sampled:
            _, label = seg_pair(root, "aug", index)
            values = np.array(Image.open(label))
            values[0, 0] = 60
            write_label_like(label, values)
    assert run_cli("data", "check", root, "--protocols", "seg_voc12aug_fcn").returncode == 0  # not sampled
    out = tmp_path / "results"
    result = run_cli("evaluate", resnet18_checkpoint, "--data-root", root, "--protocols", "seg_voc12aug_fcn",
                     "--preset", "tiny", "--out", out, "--workers", "2")
    output = result.stdout + result.stderr
    assert result.returncode == 1 and "Traceback" not in output and "IndexError" not in output, output
    failed = [line for line in result.stdout.splitlines() if "failed: seg_voc12aug_fcn seed 0:" in line]
    assert len(failed) == 1 and "SegmentationClassAug" in failed[0] and "[60]" in failed[0], output
    assert records(out) == []
