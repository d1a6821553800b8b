"""Pre-training loop: checkpoints, exact resume, SIGKILL, checkpoint format, data determinism."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from densebench.pretrain.augment import AugmentConfig, two_views
from densebench.pretrain.trainer import (ResumableBatchSampler, TwoViewDataset, read_latest, read_log,
                                         train)
from densebench.errors import InputError
from test_pretrain_helpers import small_config, write_image_folder

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("pt_images"), num_images=32)


def _paths(root: Path):
    from densebench.pretrain.trainer import read_training_images

    return read_training_images(root)


def _losses(work_dir: Path):
    return [(r["iteration"], r["loss_global"], r["loss_dense"], r["lr"]) for r in read_log(work_dir / "log.jsonl")]


def test_resume_mid_epoch_reproduces_the_uninterrupted_losses(image_root, tmp_path):
    cfg = small_config()  # 32 images / batch 8 = 4 steps per epoch, 2 epochs, checkpoint every 3
    paths = _paths(image_root)
    train(cfg, paths, tmp_path / "full", show_progress=False)
    full = _losses(tmp_path / "full")
    assert [r[0] for r in full] == list(range(1, 9))
    assert full[0][3] == pytest.approx(0.03) and full[4][3] == pytest.approx(0.015)  # cosine per epoch

    # checkpoints at 3 (interval), 4 (epoch end), 6 (interval); stopped after 7: resume mid-epoch
    train(cfg, paths, tmp_path / "cut", show_progress=False, stop_after_iters=7)
    assert read_latest(tmp_path / "cut").name == "iter_00000006.pth"
    assert len(read_log(tmp_path / "cut" / "log.jsonl")) == 7
    # the resumed run uses loader workers: data are seeded per (seed, epoch, index), not per process
    train(dataclasses.replace(cfg, workers=1), paths, tmp_path / "cut", resume=True, show_progress=False)
    assert _losses(tmp_path / "cut") == full
    final = torch.load(tmp_path / "cut" / "epoch_0002.pth", weights_only=True)
    reference = torch.load(tmp_path / "full" / "epoch_0002.pth", weights_only=True)
    for key, value in reference["state_dict"].items():
        assert torch.equal(final["state_dict"][key], value), key


def test_checkpoint_format_and_backbone_extraction(image_root, tmp_path):
    cfg = small_config(epochs=1)
    train(cfg, _paths(image_root), tmp_path, show_progress=False)
    ckpt = torch.load(read_latest(tmp_path), map_location="cpu", weights_only=True)
    assert ckpt["densebench"] == {"kind": "densecl_pretrain", "version": 1}
    assert ckpt["epoch"] == 1 and ckpt["iteration"] == 4
    keys = ckpt["state_dict"].keys()
    for prefix in ("backbone.", "neck.mlp.0.", "neck.mlp2.2.", "backbone_k.", "neck_k."):
        assert any(k.startswith(prefix) for k in keys), prefix
    assert {"queue", "queue_ptr", "queue2", "queue2_ptr"} <= set(keys)
    assert int(ckpt["state_dict"]["queue_ptr"]) == (4 * 8) % 32
    assert ckpt["config"]["arch"] == "resnet18" and ckpt["sampler"]["steps_per_epoch"] == 4
    assert set(ckpt["rng"]) == {"torch", "cuda", "numpy", "python"}
    assert ckpt["optimizer"]["state"], "SGD momentum buffers are saved"
    # the extracted backbone loads strictly into torchvision through the evaluation side
    from densebench.evaluate.checkpoint import load_backbone_state_dict

    for path in (tmp_path / "backbone.pth", read_latest(tmp_path)):
        state, info = load_backbone_state_dict(path, arch="resnet18")
        assert torch.equal(state["conv1.weight"], ckpt["state_dict"]["backbone.conv1.weight"])
    assert (tmp_path / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = read_log(tmp_path / "log.jsonl")
    assert {"pairs_per_s", "data_wait_frac", "loss_global", "loss_dense", "lr"} <= set(records[0])
    # a second fresh run into the same work dir is refused rather than overwriting it
    with pytest.raises(InputError, match="--resume"):
        train(cfg, _paths(image_root), tmp_path, show_progress=False)
    with pytest.raises(InputError, match="config differs"):
        train(dataclasses.replace(cfg, lr=0.1), _paths(image_root), tmp_path, resume=True, show_progress=False)


def test_resume_ignores_retired_options_in_a_saved_config_with_a_note(image_root, tmp_path, caplog):
    """A checkpoint and config.json written while PretrainConfig still had `fast_weight_grad`
    (or its first name `winograd_weight_grad`) resume; the retired keys are ignored with a note,
    while a real difference is still refused."""
    cfg = small_config(epochs=1)
    train(cfg, _paths(image_root), tmp_path, show_progress=False, stop_after_iters=3)
    ckpt_path = read_latest(tmp_path)
    ckpt = torch.load(ckpt_path, weights_only=True)
    ckpt["config"].update(fast_weight_grad=True, winograd_weight_grad=None)
    torch.save(ckpt, ckpt_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    saved["config"]["fast_weight_grad"], saved["fast_weight_grad"] = True, True
    (tmp_path / "config.json").write_text(json.dumps(saved))

    with pytest.raises(InputError, match="config differs.*lr"):
        train(dataclasses.replace(cfg, lr=0.1), _paths(image_root), tmp_path, resume=True, show_progress=False)
    with caplog.at_level("INFO", logger="densebench.pretrain.trainer"):
        train(cfg, _paths(image_root), tmp_path, resume=True, show_progress=False)
    notes = [r.getMessage() for r in caplog.records if "earlier densebench version" in r.getMessage()]
    assert len(notes) == 1 and "fast_weight_grad=True" in notes[0] and "winograd_weight_grad=None" in notes[0]
    assert read_latest(tmp_path).name == "epoch_0001.pth" and len(read_log(tmp_path / "log.jsonl")) == 4
    rewritten = json.loads((tmp_path / "config.json").read_text())
    assert "fast_weight_grad" not in rewritten and "fast_weight_grad" not in rewritten["config"]


def test_resume_of_a_run_saved_before_an_option_existed(image_root, tmp_path):
    """A checkpoint whose config lacks an option added later (it ran with that option's default)
    resumes at the default and is refused with any other value."""
    cfg = small_config(epochs=1)
    train(cfg, _paths(image_root), tmp_path, show_progress=False, stop_after_iters=3)
    ckpt_path = read_latest(tmp_path)
    ckpt = torch.load(ckpt_path, weights_only=True)
    for added in ("neck_bn", "color_jitter_p", "grayscale_p", "blur_p", "crop_scale_min"):
        del ckpt["config"][added]
    torch.save(ckpt, ckpt_path)

    with pytest.raises(InputError, match="config differs.*neck_bn"):
        train(dataclasses.replace(cfg, neck_bn=True), _paths(image_root), tmp_path, resume=True, show_progress=False)
    train(cfg, _paths(image_root), tmp_path, resume=True, show_progress=False)
    assert read_latest(tmp_path).name == "epoch_0001.pth" and len(read_log(tmp_path / "log.jsonl")) == 4


def test_checkpoint_retention_keeps_latest_and_interval_epochs(image_root, tmp_path):
    cfg = small_config(epochs=3, checkpoint_interval=3, keep_epoch_interval=2)
    train(cfg, _paths(image_root), tmp_path, show_progress=False)
    assert sorted(p.name for p in tmp_path.glob("*.pth")) == ["backbone.pth", "epoch_0002.pth", "epoch_0003.pth"]
    assert read_latest(tmp_path).name == "epoch_0003.pth"
    assert not list(tmp_path.glob(".*.tmp"))


def test_sampler_batches_are_a_per_epoch_permutation_split_over_ranks():
    single = list(ResumableBatchSampler(20, 8, 2, seed=3))
    assert len(single) == 4 and all(len(b) == 8 for b in single)
    epoch0 = [i for b in single[:2] for _, i in b]
    epoch1 = [i for b in single[2:] for _, i in b]
    assert len(set(epoch0)) == 16 and epoch0 != epoch1  # drop_last, reshuffled per epoch
    ranks = [list(ResumableBatchSampler(20, 8, 2, seed=3, rank=r, world_size=2)) for r in range(2)]
    for step in range(4):
        assert ranks[0][step] + ranks[1][step] == single[step]
    assert list(ResumableBatchSampler(20, 8, 2, seed=3, start_iter=3)) == single[3:]


def test_augmentation_is_determined_by_seed_epoch_index(image_root):
    paths = _paths(image_root)[:2]
    dataset = TwoViewDataset(paths, AugmentConfig(size=24), seed=5)
    q1, k1 = dataset[(0, 1)]
    q2, k2 = dataset[(0, 1)]
    assert q1.shape == (3, 24, 24) and torch.equal(q1, q2) and torch.equal(k1, k2)
    assert not torch.equal(q1, k1)  # the two views are drawn independently
    assert not torch.equal(dataset[(1, 1)][0], q1)  # a new epoch draws new views
    # normalised with ImageNet mean/std: a constant mid-grey image maps to (0.5 - mean) / std
    from PIL import Image

    grey = Image.new("RGB", (40, 40), (128, 128, 128))
    view = two_views(grey, AugmentConfig(size=16, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0), 0, 0, 0)[0]
    expected = (128 / 255 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(view[:, 8, 8], expected, rtol=1e-4, atol=1e-4)


def test_crop_parameters_follow_torchvision_distribution():
    import random

    from densebench.pretrain.augment import resized_crop_params

    rng = random.Random(0)
    for _ in range(500):
        top, left, h, w = resized_crop_params(rng, 100, 80, (0.2, 1.0), (3 / 4, 4 / 3))
        assert 0 <= top <= 80 - h and 0 <= left <= 100 - w
        assert 0.2 * 8000 * 0.9 <= h * w <= 8000 and 0.7 <= w / h <= 1.4


@pytest.mark.slow
def test_tiny_preset_loss_falls_on_synthetic_data(synth_root, tmp_path):
    """The `tiny` preset pre-trains on the synthetic ImageNet and its loss falls.

    As in MoCo, the loss first RISES while the randomly initialised queues fill with real keys
    (queue_len / batch_size steps), so the comparison is: the last 10 iterations against the
    10 iterations right after the queues have been filled once.
    """
    from densebench.cli import main

    assert main(["pretrain", "--data", str(synth_root / "imagenet"), "--work-dir", str(tmp_path),
                 "--preset", "tiny"]) == 0
    records = read_log(tmp_path / "log.jsonl")
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["preset"] == "tiny" and config["config"]["arch"] == "resnet18"
    assert config["channels_last"] is True and "fast_weight_grad" not in config   # the CPU default
    filled = config["config"]["queue_len"] // config["config"]["batch_size"]
    losses = [r["loss"] for r in records]
    assert len(losses) >= filled + 20
    after_fill = sum(losses[filled:filled + 10]) / 10
    last = sum(losses[-10:]) / 10
    assert last < after_fill - 0.1, (after_fill, last)
    # and it learns to tell instances apart instead of collapsing: over the last 10 steps the
    # queries of a batch are nearly orthogonal and a query is closer to its own key than to the
    # queue (with the paper's colour jitter and no neck BN: query-query cosine 1.000 from step 20)
    tail = records[-10:]
    cos_batch = sum(r["cos_batch"] for r in tail) / 10
    margin = sum(r["cos_pos"] - r["cos_neg"] for r in tail) / 10
    assert cos_batch < 0.3 and margin > 0.4, (cos_batch, margin)
    assert (tmp_path / "backbone.pth").is_file() and (tmp_path / "loss_curve.png").is_file()


def test_collapse_warning_reads_the_tail_of_the_log(caplog):
    """A run whose queries point one way over its last 10% of steps gets one warning; a run that
    collapsed only early, and a log from before the cosines were logged, get none."""
    from densebench.pretrain.trainer import collapse_cosine, warn_if_collapsed

    collapsed_late = [{"cos_batch": 0.2}] * 90 + [{"cos_batch": 0.99}] * 10
    collapsed_early = [{"cos_batch": 0.999}] * 90 + [{"cos_batch": 0.1}] * 10
    assert collapse_cosine(collapsed_late) == pytest.approx(0.99)
    assert collapse_cosine(collapsed_early) == pytest.approx(0.1)
    assert collapse_cosine([{"loss": 1.0}]) is None
    with caplog.at_level("WARNING", logger="densebench.pretrain.trainer"):
        for records in (collapsed_late, collapsed_early, [{"loss": 1.0}]):
            warn_if_collapsed(records)
    warnings_ = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings_) == 1 and "collapsed" in warnings_[0] and "0.990" in warnings_[0]


KILL_TEST_SETS = ["arch=resnet18", "epochs=2", "batch_size=8", "queue_len=32", "image_size=32", "feat_dim=16",
                  "hid_dim=32", "bn_group_size=0", "workers=0", "checkpoint_interval=2", "keep_epoch_interval=0"]


def _pretrain_cmd(data: Path, work_dir: Path, *extra: str):
    cmd = [sys.executable, "-m", "densebench", "pretrain", "--data", str(data), "--work-dir", str(work_dir)]
    for item in KILL_TEST_SETS:
        cmd += ["--set", item]
    return cmd + list(extra)


@pytest.mark.slow
def test_sigkill_and_resume_gives_the_uninterrupted_trajectory(image_root, tmp_path):
    # All three runs are subprocesses with the same thread count: float reductions (and so the
    # last bits of the losses) depend on the number of threads, not on the interruption.
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    subprocess.run(_pretrain_cmd(image_root, tmp_path / "full"), check=True, env=env, cwd=REPO,
                   capture_output=True)
    victim = subprocess.Popen(_pretrain_cmd(image_root, tmp_path / "cut"), env=env, cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log_path = tmp_path / "cut" / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and victim.poll() is None:
        if log_path.is_file() and len(log_path.read_text().splitlines()) >= 5:
            break
        time.sleep(0.02)
    assert victim.poll() is None, "the run finished before it could be killed"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    # the latest checkpoint is complete (atomic write + pointer written after it)
    torch.load(read_latest(tmp_path / "cut"), weights_only=True)
    subprocess.run(_pretrain_cmd(image_root, tmp_path / "cut", "--resume"), check=True, env=env, cwd=REPO,
                   capture_output=True)
    assert _losses(tmp_path / "cut") == _losses(tmp_path / "full")
