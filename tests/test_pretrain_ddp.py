"""A 2-process gloo run (torchrun) equals the single-process run on the same global batch.

Why the two runs are the same computation (so only float rounding differs):
- data: both see the same global batch per step (the sampler gives rank r the r-th
  contiguous slice of the step's global batch; augmentation is seeded per sample);
- BN: the config sets bn_group_size=4 = the per-rank batch. Under torchrun each rank's BN
  sees its own 4 query images (one group); in the single process the 8 images form two
  ghost-BN groups of 4, which are exactly rank 0's and rank 1's images. BN with one group of
  8 would NOT match a 2x4 DDP run, which is why the emulation exists;
- shuffle-BN: the key images are gathered, permuted with the same permutation (seeded by
  (seed, iteration), broadcast from rank 0 under DDP), rank r / ghost group r takes the r-th
  slice, and the outputs are un-shuffled;
- gradients: DDP averages the per-rank gradients of per-rank mean losses = the gradient of
  the global mean loss of the single process; keys are all-gathered before enqueueing, so
  the queues agree;
- the logged DDP loss is the all-reduced mean over ranks = the single-process mean.
A single process with plain BN over all 8 images differs already at step 1 (checked below).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from densebench.pretrain.trainer import read_log, read_training_images, train
from test_pretrain_helpers import small_config, write_image_folder

REPO = Path(__file__).resolve().parents[1]
# NCHW in both runs: the memory format is not what this test is about, and the tolerance of the
# later steps below was calibrated with it. In channels_last (the trainer's default) step 1 agrees
# to 1e-5 as well, but oneDNN's NHWC kernels round differently and by step 3 this ill-conditioned
# setup has drifted 0.55% apart.
SETTINGS = dict(epochs=3, batch_size=8, bn_group_size=4, checkpoint_interval=0, keep_epoch_interval=1,
                channels_last=False)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_process_gloo_run_equals_single_process_run(tmp_path):
    data = write_image_folder(tmp_path / "imagenet", num_images=8)  # one step per epoch
    cfg = small_config(**SETTINGS)
    train(cfg, read_training_images(data), tmp_path / "single", show_progress=False)

    sets = [f"{field}={value}" for field, value in vars(cfg).items()
            if field in {"arch", "epochs", "batch_size", "queue_len", "image_size", "feat_dim", "hid_dim",
                         "bn_group_size", "workers", "checkpoint_interval", "keep_epoch_interval",
                         "channels_last"}]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
           "-m", "densebench", "pretrain", "--data", str(data), "--work-dir", str(tmp_path / "ddp")]
    for item in sets:
        cmd += ["--set", item]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    result = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    single = read_log(tmp_path / "single" / "log.jsonl")
    ddp = read_log(tmp_path / "ddp" / "log.jsonl")
    assert [r["iteration"] for r in ddp] == [r["iteration"] for r in single] == [1, 2, 3]
    # step 1 agrees to float32 rounding; later steps drift by rounding amplified through
    # training (BN over 4 images of 1x1 layer4 maps is ill-conditioned), hence the looser bound
    for a, b in zip(single, ddp):
        rel = 1e-5 if a["iteration"] == 1 else 2e-3
        assert b["loss_global"] == pytest.approx(a["loss_global"], rel=rel)
        assert b["loss_dense"] == pytest.approx(a["loss_dense"], rel=rel)
    # after step 1 (epoch_0001.pth) every tensor agrees to float rounding: weights, momentum
    # encoder, queues and BN running statistics (rank 0's = ghost group 0's)
    step1_single = torch.load(tmp_path / "single" / "epoch_0001.pth", weights_only=True)
    step1_ddp = torch.load(tmp_path / "ddp" / "epoch_0001.pth", weights_only=True)
    assert step1_ddp["world_size"] == 2 and step1_single["world_size"] == 1
    for key, value in step1_single["state_dict"].items():
        torch.testing.assert_close(step1_ddp["state_dict"][key], value, rtol=1e-4, atol=2e-5, msg=key)
    assert step1_ddp["state_dict"]["queue_ptr"].tolist() == [8]

    # the comparison is sensitive: one BN group of 8 in the single process does not match
    plain = small_config(**dict(SETTINGS, bn_group_size=0))
    train(plain, read_training_images(data), tmp_path / "plain", show_progress=False, stop_after_iters=1)
    first_plain = read_log(tmp_path / "plain" / "log.jsonl")[0]
    assert abs(first_plain["loss_dense"] - ddp[0]["loss_dense"]) > 1e-4
