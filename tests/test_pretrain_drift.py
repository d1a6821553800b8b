"""benchmarks/pretrain_drift.py: the rebuilt initial weights are the trainer's, and the per-stage
distances match a hand computation."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from densebench.pretrain.trainer import read_training_images, train
from test_pretrain_helpers import small_config, write_image_folder

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("pretrain_drift", REPO / "benchmarks" / "pretrain_drift.py")
drift = importlib.util.module_from_spec(spec)
spec.loader.exec_module(drift)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two one-epoch runs of 16 images: at lr 0 (SGD leaves every weight where it started) and at lr 0.5."""
    root = tmp_path_factory.mktemp("drift")
    paths = read_training_images(write_image_folder(root / "images", num_images=16))
    for name, lr in (("frozen", 0.0), ("moving", 0.5)):
        train(small_config(epochs=1, lr=lr, seed=3), paths, root / name, show_progress=False)
    return root


def test_a_run_at_lr_zero_ends_at_the_rebuilt_initial_weights(runs):
    end = drift.final_backbone(runs / "frozen")
    init = drift.initial_backbone(drift.saved_config(runs / "frozen"))
    convs = [k for k, v in init.items() if v.dim() == 4]
    assert len(convs) == 20  # ResNet-18: stem, 16 block convs, 3 downsamples
    for key in convs:
        assert torch.equal(end[key], init[key]), key
    assert [row[1] for row in drift.stage_drift(end, init)] == [0.0] * 5
    # and a run that learnt moved every stage (so the equality above is not vacuous)
    moved = drift.stage_drift(drift.final_backbone(runs / "moving"), drift.initial_backbone(drift.saved_config(runs / "moving")))
    assert all(distance > 1e-4 for _, distance, _ in moved)


def test_stage_distances_match_a_hand_computation():
    torch.manual_seed(0)
    init = {"conv1.weight": torch.randn(4, 3, 3, 3), "bn1.weight": torch.ones(4),
            "layer1.0.conv1.weight": torch.randn(4, 4, 3, 3), "layer1.0.conv2.weight": torch.randn(4, 4, 3, 3)}
    for stage in ("layer2", "layer3", "layer4"):
        init[f"{stage}.0.conv1.weight"] = torch.randn(2, 4, 1, 1)
    end = {k: v.clone() for k, v in init.items()}
    end["conv1.weight"] *= 3.0                      # stem: distance 2, norm ratio 3
    end["bn1.weight"] += 100.0                      # not a conv: ignored
    end["layer1.0.conv2.weight"].zero_()            # one of two convs zeroed
    end["layer3.0.conv1.weight"] = -end["layer3.0.conv1.weight"]  # distance 2, ratio 1
    rows = {stage: (d, r) for stage, d, r in drift.stage_drift(end, init)}
    assert rows["conv1"] == pytest.approx((2.0, 3.0))
    n1, n2 = init["layer1.0.conv1.weight"].norm().item(), init["layer1.0.conv2.weight"].norm().item()
    total = math.hypot(n1, n2)
    assert rows["layer1"] == pytest.approx((n2 / total, n1 / total))
    assert rows["layer2"] == rows["layer4"] == (0.0, 1.0)
    assert rows["layer3"] == pytest.approx((2.0, 1.0))
