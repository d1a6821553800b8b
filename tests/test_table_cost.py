"""benchmarks/table_cost.py in its quick CPU mode: it runs the protocols' own code paths and its
printed projections equal a hand computation from the measured step times and the paper schedules."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def printed_row(output: str, name: str):
    for line in output.splitlines():
        cells = line.split()
        if cells and cells[0] == name and len(cells) > 10:
            return cells
    raise AssertionError(f"no table row for {name} in\n{output}")


@pytest.mark.slow
def test_quick_cpu_run_projects_the_paper_schedules(tmp_path):
    out_json = tmp_path / "cost.json"
    done = subprocess.run([sys.executable, "benchmarks/table_cost.py", "--device", "cpu", "--quick", "--protocols",
                           "linear_imagenet,det_voc0712_c4", "--json-out", str(out_json)],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out_json.read_text())["results"]

    # linear_imagenet: 100 epochs x ceil(1,281,167 / 256) = 500,500 steps of 256 images (timed at
    # batch 4 in quick mode), validation of 50,000 images after every epoch
    probe = result["linear_imagenet"]["measured"]
    steps_s = 100 * 5005 * probe["train"]["step_s"] * 256 / probe["train"]["batch"]
    eval_s = 100 * 50_000 / probe["eval_img_s"]
    probe_h = (steps_s + eval_s) / 3600
    # det C4: 24,000 iterations of 16 images = 192,000 of 2 on one process; 12 evaluations of the
    # 4,952 VOC07 test images (every 2,000 reference iterations, the last at the end)
    det = result["det_voc0712_c4"]["measured"]
    det_h = (192_000 * det["train"]["step_s"] + 12 * 4_952 / det["eval_img_s"]) / 3600

    for name, hours in (("linear_imagenet", probe_h), ("det_voc0712_c4", det_h)):
        assert result[name]["projection"]["gpu_h"] == pytest.approx(hours, rel=1e-9)
        row = printed_row(done.stdout, name)
        one_gpu, eight_gpu, gpu_h = (float(row[i]) for i in (8, 9, 10))
        assert one_gpu == pytest.approx(hours, abs=0.006) and gpu_h == pytest.approx(hours, abs=0.006)
        assert eight_gpu == pytest.approx(hours / 8, abs=0.006)
        assert 0.0 <= result[name]["measured"]["train"]["data_wait"] < 1.0
        assert result[name]["measured"]["train"]["steps_timed"] == 2
    total = [line for line in done.stdout.splitlines() if line.startswith("whole table")][0]
    assert f"{probe_h + det_h:.1f} GPU-hours" in total
    # the reference column: 176 V100 GPU-hours for the AvgPool probe, ratio = reference / ours
    assert printed_row(done.stdout, "linear_imagenet")[-1] == f"{176 / probe_h:.1f}x"


def test_schedule_lengths_are_the_paper_protocols():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import table_cost

    assert table_cost.schedule("linear_imagenet_mhead") == {"train_steps": 90 * 5005, "step_images": 256,
                                                            "eval_images": 9 * 50_000}
    assert table_cost.schedule("linear_places205_mhead")["train_steps"] == 28 * 9566
    assert table_cost.schedule("det_coco_maskrcnn_fpn") == {"train_steps": 12 * 7330, "step_images": 16,
                                                            "eval_images": 12 * 5_000}
    assert table_cost.schedule("seg_voc12aug_fcn") == {"train_steps": 20_000, "step_images": 16,
                                                       "eval_images": 10 * 1_449}
    assert table_cost.schedule("seg_cityscapes_fcn")["train_steps"] == 40_000
    assert table_cost.schedule("pretrain")["train_steps"] == 200 * 5004
    assert table_cost.eval_count(84, 10) == 9 and table_cost.eval_count(100, 1) == 100
