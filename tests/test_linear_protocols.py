"""The four linear-probe protocols end to end on the tiny synthetic benchmark (tiny preset).

A random-init ResNet-18 is the backbone: the synthetic classes differ in colour, shape and
texture, so even random features let a linear probe clearly beat chance.
"""
from __future__ import annotations

import importlib
import shutil
from pathlib import Path

import pytest
import torch

from densebench.config import make_config
from densebench.errors import InputError
from densebench.evaluate.context import RunContext
from densebench.protocols import linear_probe as lp

# protocol -> (classes in the tiny synthetic data, heads)
CASES = {
    "linear_imagenet_mhead": (10, lp.LAYERS),
    "linear_imagenet": (10, ("avgpool",)),
    "linear_places205_mhead": (8, lp.LAYERS),
    "linear_inat18_mhead": (8, lp.LAYERS),
}


def make_ctx(ckpt: Path, data_root: Path, work_dir: Path) -> RunContext:
    return RunContext(checkpoint=ckpt, data_root=data_root, work_dir=work_dir, cache_dir=work_dir / "cache",
                      seed=0, arch="resnet18", show_progress=False)


def run_tiny(name, ckpt, data_root, work_dir, **overrides):
    module = importlib.import_module(f"densebench.protocols.{name}")
    cfg, _ = make_config(module.Config, name, "tiny", overrides)
    torch.manual_seed(0)
    return cfg, module.run(make_ctx(ckpt, data_root, work_dir), cfg)


def check_output(output, cfg, classes, heads):
    assert list(output.metrics) == list(heads)
    for values in output.metrics.values():
        assert set(values) == {"top1", "top5", "epoch"} and values["epoch"] == cfg.epochs
        assert 0 <= values["top1"] <= values["top5"] <= 100
    history = output.extra["history"]
    assert [h["epoch"] for h in history] == list(range(1, cfg.epochs + 1))      # eval_interval 1
    assert output.data["splits"]["train"] > 0 and output.data["splits"]["val"] > 0
    assert output.extra["global_batch"] == 32 and output.extra["per_rank_batch"] == 32
    chance = 100.0 / classes
    return max(v["top1"] for v in output.metrics.values()), chance


@pytest.mark.parametrize("name", ["linear_imagenet_mhead", "linear_imagenet"])
def test_imagenet_probes_beat_chance(name, synth_root, resnet18_checkpoint, tmp_path):
    classes, heads = CASES[name]
    cfg, output = run_tiny(name, resnet18_checkpoint, synth_root, tmp_path)
    best, chance = check_output(output, cfg, classes, heads)
    # random init must learn something but not saturate (issue 19: objects are recoloured at
    # random half of the time, so colour, which random features see, no longer gives the class)
    assert chance + 5 <= best < 90, output.metrics
    assert (tmp_path / lp.STATE_FILE).is_file()
    if name == "linear_imagenet_mhead":
        assert output.extra["head_dims"] == {"feat1": 9216, "feat2": 2304, "feat3": 2048, "feat4": 2304, "feat5": 2048}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["linear_places205_mhead", "linear_inat18_mhead"])
def test_places_and_inat_probes_beat_chance(name, synth_root, resnet18_checkpoint, tmp_path):
    classes, heads = CASES[name]
    cfg, output = run_tiny(name, resnet18_checkpoint, synth_root, tmp_path)
    best, chance = check_output(output, cfg, classes, heads)
    # Places labels are background kind + palette (weak for random features); iNat is the
    # dominant object, recoloured at random half of the time (issue 19)
    assert chance + 5 <= best < 90, output.metrics


def test_fast_mode_trains_on_cached_features_and_says_so(synth_root, resnet18_checkpoint, tmp_path):
    cfg, output = run_tiny("linear_imagenet_mhead", resnet18_checkpoint, synth_root, tmp_path, fast=True)
    best, chance = check_output(output, cfg, 10, lp.LAYERS)
    assert best >= 3 * chance
    assert "not_comparable" in output.extra and output.extra["augmentation"] is None


def test_places_probe_reports_the_reference_epoch_and_keeps_the_final_one(synth_root, resnet18_checkpoint, tmp_path):
    """Evaluated every 4 of 6 epochs: the metrics are epoch 4's (the last evaluation the reference's
    hook would make), epoch 6's go to `at_final_epoch`."""
    cfg, output = run_tiny("linear_places205_mhead", resnet18_checkpoint, synth_root, tmp_path,
                           fast=True, eval_interval=4)
    by_epoch = {entry["epoch"]: entry["heads"] for entry in output.extra["history"]}
    assert sorted(by_epoch) == [4, 6]
    final = output.metrics.pop("at_final_epoch")
    assert output.metrics == {name: dict(values, epoch=4) for name, values in by_epoch[4].items()}
    assert final == {name: dict(values, epoch=6) for name, values in by_epoch[6].items()}


def test_labels_beyond_num_classes_name_the_list_file(synth_root, resnet18_checkpoint, tmp_path):
    with pytest.raises(InputError) as err:
        run_tiny("linear_imagenet_mhead", resnet18_checkpoint, synth_root, tmp_path, num_classes=5)
    assert err.value.path.endswith("train.txt") and "num_classes=5" in err.value.problem


def test_missing_list_is_an_input_error(synth_root, resnet18_checkpoint, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(synth_root / "Places205", root / "Places205")
    (root / "Places205" / "trainvalsplit_places205" / "val_places205.csv").unlink()
    with pytest.raises(InputError) as err:
        run_tiny("linear_places205_mhead", resnet18_checkpoint, root, tmp_path / "work")
    assert "val_places205.csv" in str(err.value)
