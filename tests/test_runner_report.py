"""`densebench evaluate` bookkeeping and `densebench report`, with stand-in protocol modules.

The real protocols are exercised end to end elsewhere; here the protocol modules are
replaced by small fakes so that the runner's skip/resume logic and the report's
comparability rules are tested in isolation and fast.
"""
from __future__ import annotations

import json
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision

from densebench import cli
from densebench.errors import InputError
from densebench.evaluate import runner
from densebench.results import report, store

FAKE_PROTOCOLS = ("svm_voc07", "knn_imagenet", "seg_voc12aug_fcn")


@dataclass
class FakeConfig:
    alpha: float = 1.0
    steps: tuple = (30, 60)


def make_fake_module(name: str, calls: list, explode_on: set, seeded_calls: list):
    module = types.ModuleType(f"densebench.protocols.{name}")
    module.NAME = name
    module.Config = FakeConfig

    def run(ctx, cfg):
        if name in explode_on or (name, ctx.seed) in explode_on:
            raise KeyboardInterrupt("simulated kill")
        calls.append(name)
        seeded_calls.append((name, ctx.seed))
        value = 50.0 + 10.0 * cfg.alpha + 0.37 * ctx.seed ** 2
        metrics = {"svm_voc07": {"feat5": {"mAP": value}},
                   "knn_imagenet": {f"k{k}": {"top1": value, "top5": value} for k in (10, 20, 100, 200)},
                   "seg_voc12aug_fcn": {"mIoU": value, "aAcc": value}}[name]
        extra = {}
        if name == "svm_voc07":
            extra = {"classes": ["cat", "dog"], "per_layer": {"feat5": {"class_AP": [value, value / 2]}}}
        return runner.ProtocolOutput(metrics=metrics, data={"root": str(ctx.data_root)}, extra=extra)

    module.run = run
    return module


@pytest.fixture
def fakes(monkeypatch):
    calls: list = []
    explode: set = set()
    seeded_calls: list = []
    for name in FAKE_PROTOCOLS:
        module = make_fake_module(name, calls, explode, seeded_calls)
        monkeypatch.setitem(sys.modules, f"densebench.protocols.{name}", module)
    monkeypatch.setattr(runner, "check_data", lambda cells, data_root, skip_absent: None)
    return calls, explode, seeded_calls


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    torch.manual_seed(0)
    state = {k: v for k, v in torchvision.models.resnet18().state_dict().items() if not k.startswith("fc.")}
    path = tmp_path / "ckpt.pth"
    torch.save(state, path)
    return path


def evaluate(checkpoint, tmp_path, *extra):
    data_root = tmp_path / "data"
    data_root.mkdir(exist_ok=True)
    return cli.main(["evaluate", str(checkpoint), "--data-root", str(data_root), "--out", str(tmp_path / "res"),
                     "--protocols", ",".join(FAKE_PROTOCOLS), "--arch", "resnet18", *extra])


def test_interrupted_evaluate_redoes_only_unfinished_cells(fakes, checkpoint, tmp_path):
    calls, explode, _ = fakes
    explode.add("knn_imagenet")
    with pytest.raises(KeyboardInterrupt):
        evaluate(checkpoint, tmp_path)
    assert calls == ["svm_voc07"]
    assert len(list((tmp_path / "res" / "records").glob("*.json"))) == 1

    explode.clear()
    calls.clear()
    assert evaluate(checkpoint, tmp_path) == 0
    assert calls == ["knn_imagenet", "seg_voc12aug_fcn"]          # svm_voc07 was not redone
    assert len(list((tmp_path / "res" / "records").glob("*.json"))) == 3

    calls.clear()
    assert evaluate(checkpoint, tmp_path) == 0
    assert calls == []
    assert evaluate(checkpoint, tmp_path, "--force") == 0
    assert calls == list(FAKE_PROTOCOLS)


def test_records_hold_schema_and_seed(fakes, checkpoint, tmp_path):
    assert evaluate(checkpoint, tmp_path, "--seed", "3", "--name", "mine") == 0
    records = store.load_records(tmp_path / "res")
    assert {r["protocol"] for r in records} == set(FAKE_PROTOCOLS)
    for record in records:
        assert record["seed"] == 3
        assert record["checkpoint"]["name"] == "mine"
        assert record["checkpoint"]["arch"] == "resnet18"
        assert record["comparable"] is True and record["preset"] == "paper"
        assert record["world_size"] == 1 and record["device"] == "cpu"
        assert set(store.REQUIRED_FIELDS) <= set(record)


def test_altered_config_is_recorded_as_custom_and_not_comparable(fakes, checkpoint, tmp_path):
    assert evaluate(checkpoint, tmp_path, "--set", "svm_voc07.alpha=2") == 0
    by_protocol = {r["protocol"]: r for r in store.load_records(tmp_path / "res")}
    assert by_protocol["svm_voc07"]["preset"] == "custom"
    assert by_protocol["svm_voc07"]["comparable"] is False
    assert by_protocol["svm_voc07"]["config"]["alpha"] == 2.0
    assert by_protocol["knn_imagenet"]["comparable"] is True


def test_report_marks_non_comparable_and_shows_deltas(fakes, checkpoint, tmp_path):
    assert evaluate(checkpoint, tmp_path, "--set", "knn_imagenet.alpha=0") == 0
    assert cli.main(["report", str(tmp_path / "res")]) == 0
    text = (tmp_path / "res" / "report.md").read_text()
    # svm: comparable, value 60.00 vs published 82.5 -> delta -22.50
    assert "60.00 (-22.50)" in text
    # knn with alpha=0 -> value 50, marked not comparable, no delta
    assert f"50.00 {report.NOT_COMPARABLE}" in text
    assert "50.00 (" not in text
    assert "82.50" in text and "48.50" in text           # published numbers beside ours


def test_edited_flag_cannot_make_an_altered_config_comparable(fakes, checkpoint, tmp_path):
    assert evaluate(checkpoint, tmp_path, "--set", "svm_voc07.alpha=2") == 0
    path = next(p for p in (tmp_path / "res" / "records").glob("svm_voc07*.json"))
    record = json.loads(path.read_text())
    record["comparable"], record["preset"] = True, "paper"      # a hand edit that lies
    path.write_text(json.dumps(record))
    assert not report.is_comparable(record)
    report.write_report(tmp_path / "res")
    assert f"70.00 {report.NOT_COMPARABLE}" in (tmp_path / "res" / "report.md").read_text()


def test_report_is_byte_identical_and_follows_records(fakes, checkpoint, tmp_path):
    assert evaluate(checkpoint, tmp_path) == 0
    res = tmp_path / "res"
    first = report.write_report(res).read_bytes()
    first_zoo = report.write_report(res, zoo=True).read_bytes()
    first_csv = (res / "report_files" / "voc07_svm.csv").read_bytes()
    assert report.write_report(res).read_bytes() == first
    assert report.write_report(res, zoo=True).read_bytes() == first_zoo
    assert (res / "report_files" / "voc07_svm.csv").read_bytes() == first_csv

    path = next(p for p in (res / "records").glob("seg_voc12aug_fcn*.json"))
    record = json.loads(path.read_text())
    record["metrics"]["mIoU"] = 12.34
    path.write_text(json.dumps(record))
    changed = report.write_report(res).read_text()
    assert "12.34" in changed and changed.encode() != first
    assert "12.34" in report.write_report(res, zoo=True).read_text()


def test_unknown_protocol_and_bad_checkpoint_exit_1(fakes, checkpoint, tmp_path, capsys):
    data_root = tmp_path / "data"
    data_root.mkdir()
    assert cli.main(["evaluate", str(checkpoint), "--data-root", str(data_root), "--protocols", "nope"]) == 1
    assert "unknown protocol" in capsys.readouterr().err
    missing = tmp_path / "missing.pth"
    # (only the faked protocols: the configs are built before the checkpoint is read, and the real
    # lowshot module cannot import from the fake svm_voc07)
    assert cli.main(["evaluate", str(missing), "--data-root", str(data_root),
                     "--protocols", ",".join(FAKE_PROTOCOLS)]) == 1
    assert str(missing) in capsys.readouterr().err


def test_report_without_records_exit_1(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path)]) == 1
    assert "records" in capsys.readouterr().err


def test_published_numbers_file_lists_the_conflicting_avgpool_values():
    published = report.load_published()
    entry = published["values"]["linear_imagenet"]["avgpool.top1"]
    assert entry["value"] == 63.34
    assert sorted(a["value"] for a in entry["alternatives"]) == [63.5, 63.62]
    for metrics in published["values"].values():
        for item in (metrics or {}).values():
            assert item["source"] in published["sources"]


def test_report_draws_per_class_bars_from_record_extras(fakes, checkpoint, tmp_path):
    assert evaluate(checkpoint, tmp_path) == 0
    text = report.write_report(tmp_path / "res").read_text()
    assert "report_files/svm_voc07_per_class.png" in text
    assert (tmp_path / "res" / "report_files" / "svm_voc07_per_class.png").stat().st_size > 0
    record = next(r for r in store.load_records(tmp_path / "res") if r["protocol"] == "svm_voc07")
    assert report.per_class_values(record) == {"cat": 60.0, "dog": 30.0}


def test_plan_estimates_cost_from_earlier_records(fakes, checkpoint, tmp_path, capsys):
    assert set(runner.TYPICAL_TINY_S) == set(runner.PROTOCOL_ORDER)
    assert evaluate(checkpoint, tmp_path) == 0
    first = capsys.readouterr().out
    assert "est. unknown (no earlier run here" in first
    assert evaluate(checkpoint, tmp_path, "--seed", "1") == 0
    second = capsys.readouterr().out
    assert "(median of 1 earlier run(s))" in second


# ---------------------------------------------------------------- several seeds per cell
def record_values(res: Path, protocol: str, metric: str) -> dict:
    """{seed: value} read straight from the JSON files, not through the report code."""
    out = {}
    for path in sorted((res / "records").glob(f"{protocol}__*.json")):
        record = json.loads(path.read_text())
        node = record["metrics"]
        for part in metric.split("."):
            node = node[part]
        out[record["seed"]] = node
    return out


def test_seeds_and_seed_are_exclusive_and_checked(fakes, checkpoint, tmp_path, capsys):
    for bad in (["--seed", "1", "--seeds", "0,1"], ["--seeds", "0,x"], ["--seeds", "1,1"]):
        with pytest.raises(SystemExit) as exc:
            evaluate(checkpoint, tmp_path, *bad)
        assert exc.value.code == 2
    assert "--seeds" in capsys.readouterr().err
    assert not (tmp_path / "res").exists()


def test_multi_seed_run_writes_one_record_per_seed_and_resumes_only_missing_cells(fakes, checkpoint, tmp_path):
    calls, explode, seeded = fakes
    explode.add(("knn_imagenet", 1))
    with pytest.raises(KeyboardInterrupt):
        evaluate(checkpoint, tmp_path, "--seeds", "0,1,2")
    assert seeded == [(p, 0) for p in FAKE_PROTOCOLS] + [("svm_voc07", 1)]
    explode.clear()
    seeded.clear()
    assert evaluate(checkpoint, tmp_path, "--seeds", "0,1,2") == 0
    assert seeded == [("knn_imagenet", 1), ("seg_voc12aug_fcn", 1)] + [(p, 2) for p in FAKE_PROTOCOLS]
    records = store.load_records(tmp_path / "res")
    assert sorted((r["protocol"], r["seed"]) for r in records) == sorted(
        (p, s) for p in FAKE_PROTOCOLS for s in (0, 1, 2))
    assert all(r["key"].endswith(f"__seed{r['seed']}") for r in records)
    seeded.clear()
    assert evaluate(checkpoint, tmp_path, "--seeds", "2,0") == 0 and seeded == []
    assert evaluate(checkpoint, tmp_path, "--seed", "1") == 0 and seeded == []    # --seed N still works


def test_report_shows_mean_std_n_missing_seeds_and_delta_of_the_mean(fakes, checkpoint, tmp_path):
    assert evaluate(checkpoint, tmp_path, "--seeds", "0,1,2") == 0
    res = tmp_path / "res"
    next((res / "records").glob("knn_imagenet__*seed2.json")).unlink()     # knn lacks seed 2
    text = report.write_report(res).read_text()

    svm = np.array(list(record_values(res, "svm_voc07", "feat5.mAP").values()))
    mean, std = svm.mean(), svm.std(ddof=1)
    assert f"{mean:.2f} ± {std:.2f} (n=3) ({mean - 82.5:+.2f})" in text     # published VOC07 SVM: 82.5
    knn = np.array(list(record_values(res, "knn_imagenet", "k20.top1").values()))
    assert len(knn) == 2
    assert f"{knn.mean():.2f} ± {knn.std(ddof=1):.2f} (n=2) [missing seed 2] ({knn.mean() - 48.5:+.2f})" in text
    assert "ddof=1" in text

    csv = pd.read_csv(res / "report_files" / "voc07_svm.csv", dtype={"seed": str})
    ours = csv[csv["checkpoint"] == "ckpt"].set_index("seed")["SVM"]
    assert [ours[str(s)] for s in (0, 1, 2)] == pytest.approx(list(svm), abs=1e-4)
    assert ours["mean"] == pytest.approx(mean, abs=1e-4) and ours["std"] == pytest.approx(std, abs=1e-4)
    assert ours["n"] == 3
    zoo = pd.read_csv(report.write_report(res, zoo=True).parent / "zoo_files" / "zoo.csv", dtype={"seed": str})
    knn_col = zoo[zoo["checkpoint"] == "ckpt"].set_index("seed")["kNN k=20"]
    assert knn_col["n"] == 2 and np.isnan(knn_col["2"]) and knn_col["std"] == pytest.approx(knn.std(ddof=1), abs=1e-4)

    first = report.write_report(res).read_bytes()
    first_csv = (res / "report_files" / "imagenet_knn.csv").read_bytes()
    assert report.write_report(res).read_bytes() == first
    assert (res / "report_files" / "imagenet_knn.csv").read_bytes() == first_csv


def test_per_class_bars_average_over_seeds(fakes, checkpoint, tmp_path):
    assert evaluate(checkpoint, tmp_path, "--seeds", "0,3") == 0
    row = report.build_rows(store.load_records(tmp_path / "res"))[0]
    stats = report.per_class_stats(row.records["svm_voc07"])
    values = np.array([[v, v / 2] for v in record_values(tmp_path / "res", "svm_voc07", "feat5.mAP").values()])
    assert stats["cat"] == pytest.approx((values[:, 0].mean(), values[:, 0].std(ddof=1)))
    assert stats["dog"] == pytest.approx((values[:, 1].mean(), values[:, 1].std(ddof=1)))
    assert "svm_voc07_per_class.png" in report.write_report(tmp_path / "res").read_text()


def test_report_reads_a_pretrain_log_with_a_partial_last_line(tmp_path, caplog):
    """A run killed (or still running) while appending leaves a partial last line: the report
    plots the complete lines and warns; a damaged line before the last is an error naming it."""
    log_path = tmp_path / "pretrain" / "run" / "log.jsonl"
    log_path.parent.mkdir(parents=True)
    log_path.write_text('{"iteration": 1, "loss": 4.5}\n\n{"iteration": 2, "loss": 4.25}\n{"iteration": 3, "lo')
    with caplog.at_level("WARNING"):
        logs = report.read_pretrain_logs(tmp_path)
    assert logs == [("run", [{"iteration": 1, "loss": 4.5}, {"iteration": 2, "loss": 4.25}])]
    assert "dropped a partial last line" in caplog.text
    log_path.write_text('{"iteration": 1, "loss": 4.5}\n[1, 2\n{"iteration": 3, "loss": 4.0}\n')
    with pytest.raises(InputError, match=r"log.jsonl: line 2 is not a log record"):
        report.read_pretrain_logs(tmp_path)
