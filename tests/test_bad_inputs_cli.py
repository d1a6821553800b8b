"""Bad and hostile command-line input: each case gives one line naming the culprit, the right
exit code, no traceback, and leaves nothing behind (issue 18).

Every case goes through `densebench.cli.main`, the function `python -m densebench` runs. By
default the cases run in this process, so torch is imported once instead of once per case (a
subprocess costs ~6 s of CPU each); DENSEBENCH_CLI_SUBPROCESS=1 runs every case as a real
`python -m densebench` subprocess instead. The tests that need separate processes (two
`evaluate` runs at once, a resumed `pretrain`) always use subprocesses.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import pytest

from densebench import cli

SUBPROCESS = os.environ.get("DENSEBENCH_CLI_SUBPROCESS") == "1"
REPO = Path(__file__).resolve().parents[1]


def run_cli(argv: List[str], cwd: Path) -> Tuple[int, str, str]:
    """(exit code, stdout, stderr) of `densebench ARGV` run in `cwd`."""
    if SUBPROCESS:
        env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
        done = subprocess.run([sys.executable, "-m", "densebench", *argv], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=600)
        return done.returncode, done.stdout, done.stderr
    out, err = io.StringIO(), io.StringIO()
    previous = Path.cwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main(argv)
            except SystemExit as exc:           # argparse: --help, usage errors
                code = exc.code if isinstance(exc.code, int) else 1
            except Exception:                   # what `python -m densebench` would show as a traceback
                traceback.print_exc()
                code = 1
    finally:
        os.chdir(previous)
    return code, out.getvalue(), err.getvalue()


def tree(root: Path) -> List[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# ----------------------------------------------------------------------------- fixtures

def valid_record() -> dict:
    return {"protocol": "knn_imagenet", "checkpoint": {"path": "x.pth", "sha256": "ab" * 32, "name": "x"},
            "metrics": {"k20": {"top1": 50.0}}, "config": {}, "config_hash": "0" * 12, "preset": "tiny",
            "comparable": False, "seed": 0, "world_size": 1, "device": "cpu", "wall_s": 1.5,
            "started": "2026-01-01T00:00:00+00:00", "versions": {}, "data": {}}


def with_record(content: bytes) -> Callable[[Path], None]:
    def setup(cwd: Path) -> None:
        folder = cwd / "res" / "records"
        folder.mkdir(parents=True)
        (folder / "good.json").write_text(json.dumps(valid_record()))
        (folder / "bad.json").write_bytes(content)
    return setup


def record_with(**changes) -> bytes:
    return json.dumps(dict(valid_record(), **changes)).encode()


def empty_records(cwd: Path) -> None:
    (cwd / "res" / "records").mkdir(parents=True)


def empty_file(cwd: Path) -> None:
    (cwd / "empty.pth").write_bytes(b"")


# (id, argv, setup, exit code, what the one-line message must contain). In argv, {ckpt} is a
# random-init ResNet-18, {data} the tiny synthetic data; every case's cwd holds a file `afile`
# and an empty folder `adir`.
EV = ["evaluate", "{ckpt}", "--data-root", "{data}", "--preset", "tiny", "--protocols", "knn_imagenet"]
PRE = ["pretrain", "--data", "{data}/imagenet", "--work-dir", "w", "--preset", "tiny"]
GOOD_JSON = json.dumps(valid_record())
CASES = [
    # --set values checked against the dataclass annotations, before the checkpoint or data is read
    ("set-bool-typo", EV + ["--set", "knn_imagenet.amp=flase"], None, 1,
     ["--set knn_imagenet.amp", "true or false", "'flase'"]),
    ("set-float-text", EV + ["--set", "knn_imagenet.temperature=abc"], None, 1,
     ["--set knn_imagenet.temperature", "a number > 0", "'abc'"]),
    ("set-float-zero", EV + ["--set", "knn_imagenet.temperature=0"], None, 1,
     ["knn_imagenet.temperature", "> 0", "got 0"]),
    ("set-empty-list", EV + ["--set", "knn_imagenet.ks=[]"], None, 1,
     ["knn_imagenet.ks", "one or more items", "got []"]),
    ("set-zero-batch", EV + ["--set", "knn_imagenet.batch_size=0"], None, 1,
     ["knn_imagenet.batch_size", "an integer > 0", "got 0"]),
    ("set-int-given-float", EV + ["--set", "knn_imagenet.bank_chunk=64.5"], None, 1,
     ["knn_imagenet.bank_chunk", "an integer", "64.5"]),
    ("set-bad-yaml", EV + ["--set", "knn_imagenet.ks=[1,"], None, 1,
     ["--set knn_imagenet.ks=[1,", "not valid YAML"]),
    ("set-unknown-choice", EV + ["--set", "knn_imagenet.backend=faiss2"], None, 1,
     ["knn_imagenet.backend", "one of torch, faiss", "'faiss2'"]),
    ("set-tuple-length", EV[:-1] + ["seg_voc12aug_fcn", "--set", "seg_voc12aug_fcn.crop_size=[64]"], None, 1,
     ["seg_voc12aug_fcn.crop_size", "a list of 2 items", "[64]"]),
    ("set-tuple-item-range", EV[:-1] + ["linear_imagenet", "--set", "linear_imagenet.rrc_scale=[0.5, 2]"], None, 1,
     ["linear_imagenet.rrc_scale", "in [0, 1]"]),
    ("set-layer-name", EV[:-1] + ["svm_voc07", "--set", "svm_voc07.layers=[feat6]"], None, 1,
     ["svm_voc07.layers", "feat1, feat2, feat3, feat4, feat5", "feat6"]),
    ("set-protocol-not-run", EV + ["--set", "svm_voc07.batch_size=8"], None, 1,
     ["--set svm_voc07.batch_size", "svm_voc07 is not among the protocols to run", "knn_imagenet"]),
    ("set-unknown-field", EV + ["--set", "knn_imagenet.temprature=0.1"], None, 1,
     ["--set knn_imagenet", "unknown config field 'temprature'"]),
    ("set-no-equals", EV + ["--set", "knn_imagenet.amp"], None, 1, ["--set expects key=value"]),
    ("set-unknown-protocol", EV + ["--set", "knn.amp=false"], None, 1, ["PROTOCOL.FIELD", "'knn.amp'"]),
    ("pretrain-set-int-text", PRE + ["--set", "epochs=abc"], None, 1, ["--set pretrain.epochs", "an integer > 0", "'abc'"]),
    ("pretrain-set-optional", PRE + ["--set", "num_grid=0"], None, 1, ["pretrain.num_grid", "null or an integer > 0"]),
    ("pretrain-set-seed", PRE + ["--set", "seed=-1"], None, 1, ["pretrain.seed", "in [0, 2**32 - 1]", "got -1"]),
    ("pretrain-set-choice", PRE + ["--set", "init_style=fan_avg"], None, 1, ["pretrain.init_style", "fan_out, fan_in"]),
    # option values
    ("seed-negative", EV + ["--seed", "-1"], None, 2, ["--seed", "in [0, 4294967295]", "got -1"]),
    ("seed-too-big", EV + ["--seed", str(2 ** 40)], None, 2, ["--seed", str(2 ** 40)]),
    ("seed-not-int", EV + ["--seed", "x"], None, 2, ["--seed", "'x' is not an integer"]),
    ("synth-seed-negative", ["data", "synth", "out", "--seed", "-5"], None, 2, ["--seed", "got -5"]),
    ("workers-negative", EV + ["--workers", "-1"], None, 2, ["--workers", ">= 0", "got -1"]),
    ("pretrain-arch", PRE + ["--arch", "vgg16"], None, 1, ["--arch 'vgg16'", "resnet18"]),
    ("unknown-protocol", EV[:-1] + ["knn"], None, 1, ["unknown protocol(s) knn"]),
    ("unknown-preset", ["evaluate", "{ckpt}", "--data-root", "{data}", "--preset", "huge"], None, 2,
     ["--preset", "'huge'"]),
    ("missing-data-root", ["evaluate", "{ckpt}", "--data-root", "nowhere"], None, 1, ["nowhere", "data root not found"]),
    ("missing-pretrain-data", ["pretrain", "--data", "nowhere", "--work-dir", "w"], None, 1,
     ["nowhere", "data folder not found"]),
    # paths of the wrong kind
    ("evaluate-out-is-file", EV + ["--out", "afile"], None, 1, ["afile", "--out must be a directory"]),
    ("evaluate-out-under-file", EV + ["--out", "afile/res"], None, 1, ["afile/res", "--out cannot be created", "is a file"]),
    ("save-features-is-file", EV + ["--save-features", "afile"], None, 1, ["afile", "--save-features must be a directory"]),
    ("work-dir-is-file", ["pretrain", "--data", "{data}/imagenet", "--work-dir", "afile"], None, 1,
     ["afile", "--work-dir must be a directory"]),
    ("synth-out-is-file", ["data", "synth", "afile"], None, 1, ["afile", "OUT must be a directory"]),
    ("convert-out-is-dir", ["convert", "{ckpt}", "--to", "torchvision", "--out", "adir"], None, 1,
     ["adir", "--out must be a file name"]),
    ("report-out-is-dir", ["report", "res", "--out", "adir"], empty_records, 1, ["adir", "--out must be a file name"]),
    # results dir and pre-training state
    ("report-truncated-record", ["report", "res"], with_record(GOOD_JSON[:60].encode()), 1,
     ["bad.json", "not a JSON record", "delete it"]),
    ("report-invalid-utf8", ["report", "res"], with_record(b"\xff\xfe" + GOOD_JSON.encode()), 1,
     ["bad.json", "invalid UTF-8"]),
    ("report-wrong-field-type", ["report", "res"], with_record(record_with(wall_s="fast")), 1,
     ["bad.json", "field wall_s must be a number", '"fast"']),
    ("report-metrics-not-object", ["report", "res"], with_record(record_with(metrics=[1, 2])), 1,
     ["bad.json", "field metrics must be an object"]),
    ("report-record-not-object", ["report", "res"], with_record(b"[1, 2, 3]"), 1, ["bad.json", "JSON object"]),
    ("report-no-records-folder", ["report", "adir"], None, 1, ["adir/records", "no records folder"]),
    ("report-empty-records", ["report", "res"], empty_records, 1, ["res/records", "no records to report"]),
    ("evaluate-with-bad-record", EV + ["--out", "res"], with_record(b"{"), 1, ["bad.json", "not a JSON record"]),
    ("init-from-empty-file", PRE + ["--init-from", "empty.pth"], empty_file, 1, ["empty.pth", "empty"]),
]


@pytest.mark.parametrize("argv,setup,code,needles", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line(argv, setup: Optional[Callable], code, needles, synth_root, resnet18_checkpoint,
                                  tmp_path):
    (tmp_path / "afile").write_text("not a folder\n")
    (tmp_path / "adir").mkdir()
    if setup:
        setup(tmp_path)
    before = tree(tmp_path)
    argv = [a.format(ckpt=resnet18_checkpoint, data=synth_root) for a in argv]
    got, out, err = run_cli(argv, tmp_path)
    assert "Traceback" not in out + err, err
    lines = err.strip().splitlines()
    assert got == code and len(lines) == 1, err
    assert lines[0].startswith(f"densebench {argv[0]}"), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert tree(tmp_path) == before                    # nothing written, not even a folder


def test_corpus_is_large_enough():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


# ----------------------------------------------------------------------------- separate processes

def densebench(*argv: str, cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "densebench", *argv], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_two_evaluate_processes_share_a_results_dir_and_set_values_get_their_types(synth_root,
                                                                                 resnet18_checkpoint, tmp_path):
    """Two `evaluate` runs at once on one results dir (shared feature cache, distinct cells):
    both records complete and readable, no temporary file left, and `--set` values recorded with
    the field's Python type (0 -> False, 7e-2 -> 0.07: YAML alone reads the first as an int and
    the second as a string)."""
    from densebench.results.store import load_records

    common = ["evaluate", str(resnet18_checkpoint), "--data-root", str(synth_root), "--preset", "tiny",
              "--protocols", "knn_imagenet", "--out", "res", "--set", "knn_imagenet.image_size=32",
              "--set", "knn_imagenet.resize_short=36"]
    first = densebench(*common, "--set", "knn_imagenet.amp=0", "--set", "knn_imagenet.temperature=7e-2",
                       "--set", "knn_imagenet.ks=[1, 3]", cwd=tmp_path)
    second = densebench(*common, "--set", "knn_imagenet.temperature=1", "--set", "knn_imagenet.ks=[5]",
                        cwd=tmp_path)
    for proc in (first, second):
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0 and "Traceback" not in out + err, err[-3000:]
    records = {tuple(r["config"]["ks"]): r for r in load_records(tmp_path / "res")}
    assert sorted(records) == [(1, 3), (5,)]
    a, b = records[(1, 3)]["config"], records[(5,)]["config"]
    assert a["amp"] is False and b["amp"] is True
    assert a["temperature"] == 0.07 and type(a["temperature"]) is float
    assert b["temperature"] == 1.0 and type(b["temperature"]) is float
    assert all(type(k) is int for k in a["ks"] + b["ks"]) and type(a["image_size"]) is int
    assert set(records[(1, 3)]["metrics"]) == {"k1", "k3"} and set(records[(5,)]["metrics"]) == {"k5"}
    leftovers = [p for p in (tmp_path / "res").rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


@pytest.mark.slow
def test_pretrain_resumes_after_a_partial_last_log_line(synth_root, tmp_path):
    """A kill while `log.jsonl` is appended leaves a partial last line; --resume drops it with a
    note and finishes (it failed with a JSONDecodeError traceback before)."""
    from densebench.config import make_config
    from densebench.pretrain.trainer import PretrainConfig, read_log, read_training_images, train

    settings = {"epochs": 1, "checkpoint_interval": 2, "workers": 0, "image_size": 32, "feat_dim": 16, "hid_dim": 32}
    cfg, label = make_config(PretrainConfig, "pretrain", "tiny", settings)
    images = read_training_images(synth_root / "imagenet")
    work = tmp_path / "work"
    train(cfg, images, work, stop_after_iters=3, preset_label=label, show_progress=False)
    log_path = work / "log.jsonl"
    with open(log_path, "a") as fh:
        fh.write('{"iteration": 4, "epoch": 0, "lo')          # the kill came mid-write
    argv = ["pretrain", "--data", str(synth_root / "imagenet"), "--work-dir", str(work), "--preset", "tiny",
            "--resume"] + [item for k, v in settings.items() for item in ("--set", f"{k}={v}")]
    proc = densebench(*argv, cwd=tmp_path)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0 and "Traceback" not in out + err, err[-3000:]
    assert "dropped a partial last line" in err
    iterations = [r["iteration"] for r in read_log(log_path)]
    steps = len(images) // cfg.batch_size
    assert iterations == list(range(1, steps + 1))
    assert (work / "backbone.pth").is_file()


def test_pretrain_resume_refuses_a_damaged_log_line_before_the_last(synth_root, tmp_path):
    """Only the last line can be partial; damage elsewhere stops the resume naming the line."""
    from densebench.errors import InputError
    from densebench.pretrain.trainer import truncate_log

    log_path = tmp_path / "log.jsonl"
    log_path.write_text('{"iteration": 1}\n\n{"iter\n{"iteration": 2}\n')
    with pytest.raises(InputError, match="line 3 is not a log record"):
        truncate_log(log_path, 2)
    log_path.write_text('{"iteration": 1}\n{"iteration": 2}\n{"iteration": 3}\n{"itera')
    truncate_log(log_path, 2)
    assert log_path.read_text() == '{"iteration": 1}\n{"iteration": 2}\n'
