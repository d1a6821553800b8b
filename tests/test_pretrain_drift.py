"""trainer.initial_backbone_state is where a run starts (used by benchmarks/pretrain_drift.py and
the run_all baseline), and the drift script's per-stage distances match a hand computation."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from densebench.pretrain.trainer import initial_backbone_state, read_training_images, train
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
    init = initial_backbone_state(drift.saved_config(runs / "frozen"))
    convs = [k for k, v in init.items() if v.dim() == 4]
    assert len(convs) == 20  # ResNet-18: stem, 16 block convs, 3 downsamples
    for key in convs:
        assert torch.equal(end[key], init[key]), key
    assert [row[1] for row in drift.stage_drift(end, init)] == [0.0] * 5
    # and a run that learnt moved every stage (so the equality above is not vacuous)
    moved = drift.stage_drift(drift.final_backbone(runs / "moving"), initial_backbone_state(drift.saved_config(runs / "moving")))
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


def test_random_init_baseline_is_the_start_of_the_tiny_pretraining(tmp_path):
    """`random_init --pretrain-preset tiny` (run_all.sh's baseline) holds the weights a tiny run of
    that seed trains from: compared with a one-step run at lr 0 through the real trainer."""
    from densebench.config import make_config
    from densebench.evaluate.random_init import main as random_init_main
    from densebench.pretrain.trainer import PretrainConfig, read_latest

    assert random_init_main(["--arch", "resnet18", "--pretrain-preset", "tiny", "--seed", "2",
                             "--out", str(tmp_path / "baseline.pth")]) == 0
    baseline = torch.load(tmp_path / "baseline.pth", weights_only=True)
    cfg, _ = make_config(PretrainConfig, "pretrain", "tiny",
                         {"arch": "resnet18", "seed": 2, "lr": 0.0, "epochs": 1, "workers": 0})
    paths = read_training_images(write_image_folder(tmp_path / "images", num_images=cfg.batch_size))
    train(cfg, paths, tmp_path / "run", show_progress=False)
    started = torch.load(read_latest(tmp_path / "run"), weights_only=True)["state_dict"]
    convs = [k for k, v in baseline.items() if v.dim() == 4]
    assert len(convs) == 20
    for key in convs:
        assert torch.equal(baseline[key], started[f"backbone.{key}"]), key
    # torchvision's resnet18 takes it strictly (no fc), and another seed is another draw
    import torchvision

    missing, unexpected = torchvision.models.resnet18().load_state_dict(baseline, strict=False)
    assert missing == ["fc.weight", "fc.bias"] and unexpected == []
    assert random_init_main(["--arch", "resnet18", "--pretrain-preset", "tiny", "--seed", "3",
                             "--out", str(tmp_path / "other.pth")]) == 0
    assert not torch.equal(torch.load(tmp_path / "other.pth", weights_only=True)["conv1.weight"], baseline["conv1.weight"])


def test_random_init_refuses_an_arch_pretraining_does_not_know(tmp_path, capsys):
    from densebench.evaluate.random_init import main as random_init_main

    assert random_init_main(["--arch", "vgg16", "--pretrain-preset", "tiny", "--out", str(tmp_path / "x.pth")]) == 1
    assert "unknown --arch 'vgg16'" in capsys.readouterr().err
    assert not (tmp_path / "x.pth").exists()


def test_drift_script_names_a_dir_that_is_not_a_run_and_prints_nothing(runs, tmp_path, capsys):
    assert drift.main([str(runs / "frozen"), str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip().splitlines() == [f"pretrain_drift: error: {tmp_path / 'config.json'}: "
                                                 "not found: not a `densebench pretrain` work dir"]
    assert drift.main([str(runs / "frozen")]) == 0
    assert "frozen" in capsys.readouterr().out


def test_drift_script_names_an_unreadable_config_or_checkpoint(runs, tmp_path, capsys):
    """A broken config.json or a checkpoint that is not ours: one line naming the file, exit 1."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(runs / "frozen", broken)
    (broken / "config.json").write_text("{not json")
    assert drift.main([str(broken)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"pretrain_drift: error: {broken / 'config.json'}: not a `densebench")
    shutil.copy(runs / "frozen" / "config.json", broken / "config.json")
    latest = broken / (broken / "latest").read_text().strip()
    torch.save({"state_dict": {}}, latest)
    assert drift.main([str(broken)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip().splitlines() == [
        f"pretrain_drift: error: {latest}: not a densebench pre-training checkpoint"]
