"""Which epochs the reference's linear probes were evaluated at: mmcv 1.x's own EvalHook, as
[0x] mmselfsup/apis/train.py registers it (by_epoch, `evaluation = dict(interval=10)` from
configs/benchmarks/classification/_base_/datasets/{imagenet,places205,inaturalist2018}.py;
`interval=1` in the AvgPool probe's config), against densebench's reported_epoch."""
from __future__ import annotations

import importlib
from types import SimpleNamespace

import pytest
from mmcv.runner import EvalHook
from torch.utils.data import DataLoader

from densebench.protocols import linear_probe as lp


def evaluated_epochs(epochs: int, interval: int):
    """Run the hook's epoch callbacks of an EpochBasedRunner for `epochs` epochs; 1-based epochs evaluated."""
    hook = EvalHook(DataLoader([0]), interval=interval, by_epoch=True)
    seen = []
    hook._do_evaluate = lambda runner: seen.append(runner.epoch + 1)
    for epoch in range(epochs):
        runner = SimpleNamespace(epoch=epoch)
        hook.before_train_epoch(runner)
        hook.after_train_epoch(runner)
    return seen


@pytest.mark.parametrize("name", ["linear_imagenet_mhead", "linear_imagenet", "linear_places205_mhead",
                                  "linear_inat18_mhead"])
def test_reported_epoch_is_the_reference_hooks_last_evaluation(name):
    cfg = importlib.import_module(f"densebench.protocols.{name}").Config()
    seen = evaluated_epochs(cfg.epochs, cfg.eval_interval)
    assert seen[-1] == lp.reported_epoch(cfg.epochs, cfg.eval_interval)
    if name == "linear_places205_mhead":
        assert seen == [10, 20]                    # never at its final epoch 28


def test_short_runs():
    for epochs, interval in ((6, 4), (6, 1), (28, 10), (84, 10), (30, 10)):
        assert evaluated_epochs(epochs, interval)[-1] == lp.reported_epoch(epochs, interval)
