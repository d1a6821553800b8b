"""benchmarks/check_tiny_story.py: the issue-19 criteria on hand-made records over the synthetic data."""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("check_tiny_story", REPO / "benchmarks" / "check_tiny_story.py")
story = importlib.util.module_from_spec(spec)
spec.loader.exec_module(story)


def write_records(results: Path, values) -> None:
    """values: {(checkpoint, protocol): {seed: {metric path: value}}} -> JSON records."""
    folder = results / "records"
    folder.mkdir(parents=True, exist_ok=True)
    for (name, protocol), by_seed in values.items():
        for seed, metrics in by_seed.items():
            nested: dict = {}
            for path, value in metrics.items():
                node = nested
                *parents, leaf = path.split(".")
                for part in parents:
                    node = node.setdefault(part, {})
                node[leaf] = value
            record = {"protocol": protocol, "checkpoint": {"name": name}, "metrics": nested, "seed": seed,
                      "started": f"2026-01-01T00:00:0{seed}"}
            (folder / f"{protocol}__{name}__seed{seed}.json").write_text(json.dumps(record))


def story_values(gap: float, base: float = 50.0, seg: float = 30.0, ap50: float = 30.0):
    """A run where the pre-trained checkpoint leads by `gap` everywhere, with seed noise of +-1."""
    values = {}
    for name, offset in (("densecl_tiny", gap), ("random_init", 0.0)):
        for _, protocol, path in story.HEADLINE + story.DETECTION_AP50:
            level = seg if protocol.startswith("seg_") else ap50 if path == "bbox.AP50" else base
            entry = values.setdefault((name, protocol), {s: {} for s in (0, 1, 2)})
            for seed, noise in zip((0, 1, 2), (-1.0, 0.0, 1.0)):
                entry[seed][path] = level + offset + noise
    return values


def test_constant_miou_and_map_chance_by_hand(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    Image.fromarray(np.array([[0, 0, 1, 255]], np.uint8)).save(a)
    Image.fromarray(np.array([[0, 2, 2, 2]], np.uint8)).save(b)
    # classes 0 (3 px), 1 (1 px), 2 (3 px) present; predicting class 0 everywhere: IoU_0 = 3/7, others 0
    assert story.constant_miou([a, b]) == pytest.approx(100 * (3 / 7) / 3)
    targets = np.array([[1, 0], [0, -1], [0, 1], [-1, 1]])      # class 0: 1 of 3 scored, class 1: 2 of 3
    assert story.map_chance(targets) == pytest.approx(100 * (1 / 3 + 2 / 3) / 2)


def test_a_run_that_tells_the_story_passes(synth_root, tmp_path, capsys):
    write_records(tmp_path, story_values(gap=10.0))
    assert story.main([str(tmp_path), "--data-root", str(synth_root)]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and "11 wins" in out


@pytest.mark.parametrize("change, failing", [
    (lambda v: v.update({k: {s: {p: 95.0 for p in m} for s, m in e.items()}
                         for k, e in v.items() if k == ("random_init", "knn_imagenet")}), "kNN k=20 top-1: random_init within"),
    (lambda v: [m.update({"mIoU": 1.0}) for m in v[("random_init", "seg_cityscapes_fcn")].values()],
     "Cityscapes mIoU: random_init >= constant"),
    (lambda v: [m.update({"bbox.AP50": 5.0}) for m in v[("densecl_tiny", "det_voc0712_c4")].values()],
     "VOC det AP50: densecl_tiny > 10"),
    (lambda v: v[("densecl_tiny", "det_coco_maskrcnn_fpn")].pop(2), "COCO box AP: densecl_tiny - random_init"),
    (lambda v: v[("densecl_tiny", "seg_voc12aug_fcn")][0].update({"mIoU": 10.0}), "VOC12-Aug mIoU: densecl_tiny - random_init"),
])
def test_each_broken_criterion_fails(synth_root, tmp_path, capsys, change, failing):
    values = story_values(gap=10.0)
    change(values)
    write_records(tmp_path, values)
    assert story.main([str(tmp_path), "--data-root", str(synth_root)]) == 1
    failed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("FAIL")]
    assert any(failing in line for line in failed), failed


def test_small_gaps_do_not_count_as_wins(synth_root, tmp_path, capsys):
    write_records(tmp_path, story_values(gap=1.5))          # 1.5 < 2 x std (= 2)
    assert story.main([str(tmp_path), "--data-root", str(synth_root)]) == 1
    assert "0 wins" in capsys.readouterr().out


@pytest.mark.slow
def test_run_all_results_tell_the_story():
    """Set DENSEBENCH_TINY_STORY_RESULTS to the results dir of a finished ./run_all.sh."""
    results = os.environ.get("DENSEBENCH_TINY_STORY_RESULTS")
    if not results:
        pytest.skip("DENSEBENCH_TINY_STORY_RESULTS not set (a ./run_all.sh results dir)")
    assert story.main([results]) == 0
