"""Linear probe under torchrun (2 gloo ranks == 1 process with the same global batch) and
resume after SIGKILL (the resumed run ends exactly where the uninterrupted one does)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from densebench.protocols import linear_probe as lp

REPO_ROOT = Path(__file__).resolve().parents[1]

# A few training steps of the real wiring (prepare_probe: loaders, SyncBN, DDP), then an
# evaluation; rank 0 saves the heads. Run once under torchrun with 2 ranks and once plainly.
STEPS_SCRIPT = r'''
import sys
from pathlib import Path
import torch
from densebench import distributed as du
from densebench.config import make_config
from densebench.evaluate.context import RunContext
from densebench.protocols import linear_imagenet_mhead as m, linear_probe as lp

ckpt, data_root, out = map(Path, sys.argv[1:4])
device = du.init_distributed()
results = {"world": du.world_size()}
for fast in (False, True):
    cfg, _ = make_config(m.Config, m.NAME, "tiny", {"batch_size": 16, "fast": fast})
    ctx = RunContext(checkpoint=ckpt, data_root=data_root, work_dir=out.parent / "work", cache_dir=out.parent / "cache",
                     seed=0, device=device, arch="resnet18", show_progress=False)
    train, val, _ = lp.load_probe_data("imagenet", data_root, cfg.num_classes)
    probe = lp.prepare_probe(ctx, cfg, "multi", train, val, m.train_transform(cfg))
    for epoch in range(2):
        lp.train_epoch(probe.backbone, probe.trained, probe.train_loader, probe.optimizer, probe.runtime,
                       epoch, max_steps=2)
    scores = lp.evaluate(probe.backbone, probe.heads, probe.val_loader, probe.runtime, cfg.num_classes)
    results[f"fast={fast}"] = {"heads": probe.heads.state_dict(), "scores": scores}
if du.is_main():
    torch.save(results, out)
du.barrier()
'''

RUN_SCRIPT = r'''
import json, sys
from pathlib import Path
import torch
from densebench.config import make_config
from densebench.evaluate.context import RunContext
from densebench.protocols import linear_imagenet_mhead as m

ckpt, data_root, work_dir, out = map(Path, sys.argv[1:5])
cfg, _ = make_config(m.Config, m.NAME, "tiny")
ctx = RunContext(checkpoint=ckpt, data_root=data_root, work_dir=work_dir, cache_dir=work_dir / "cache",
                 seed=0, arch="resnet18", show_progress=False)
output = m.run(ctx, cfg)
out.write_text(json.dumps({"metrics": output.metrics, "history": output.extra["history"],
                           "resumed_from_epoch": output.extra["resumed_from_epoch"]}))
'''


def subprocess_env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process(synth_root, resnet18_checkpoint, tmp_path):
    script = tmp_path / "steps.py"
    script.write_text(STEPS_SCRIPT)
    single, double = tmp_path / "one" / "out.pt", tmp_path / "two" / "out.pt"
    single.parent.mkdir()
    double.parent.mkdir()
    subprocess.run([sys.executable, str(script), str(resnet18_checkpoint), str(synth_root), str(single)],
                   check=True, env=subprocess_env(), timeout=300)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
                    "--nproc_per_node=2", str(script), str(resnet18_checkpoint), str(synth_root), str(double)],
                   check=True, env=subprocess_env(), timeout=300)
    one = torch.load(single, weights_only=True)
    two = torch.load(double, weights_only=True)
    assert one["world"] == 1 and two["world"] == 2
    for mode in ("fast=False", "fast=True"):
        heads_one, heads_two = one[mode]["heads"], two[mode]["heads"]
        assert heads_one.keys() == heads_two.keys()
        for key, value in heads_one.items():
            if value.is_floating_point():
                torch.testing.assert_close(heads_two[key], value, rtol=1e-4, atol=1e-6, msg=f"{mode} {key}")
            else:
                assert torch.equal(heads_two[key], value), key
        # the heads really trained (4 steps) and the BN tracked 4 global batches
        assert int(heads_one["heads.feat2.0.num_batches_tracked"]) == 4
        assert one[mode]["scores"] == two[mode]["scores"]


@pytest.mark.slow
def test_resume_after_sigkill_reproduces_the_uninterrupted_run(synth_root, resnet18_checkpoint, tmp_path):
    script = tmp_path / "run.py"
    script.write_text(RUN_SCRIPT)

    def command(work: Path, out: Path):
        return [sys.executable, str(script), str(resnet18_checkpoint), str(synth_root), str(work), str(out)]

    whole_work, whole_out = tmp_path / "whole", tmp_path / "whole.json"
    subprocess.run(command(whole_work, whole_out), check=True, env=subprocess_env(), timeout=300)

    cut_work, cut_out = tmp_path / "cut", tmp_path / "cut.json"
    state = cut_work / lp.STATE_FILE
    proc = subprocess.Popen(command(cut_work, cut_out), env=subprocess_env())
    try:
        deadline = time.time() + 300
        while not state.is_file() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    killed_at = torch.load(state, weights_only=True)["epoch"]
    assert 1 <= killed_at < 4, "the kill must land before the last epoch"
    assert not cut_out.exists()

    subprocess.run(command(cut_work, cut_out), check=True, env=subprocess_env(), timeout=300)
    whole, cut = json.loads(whole_out.read_text()), json.loads(cut_out.read_text())
    assert cut["resumed_from_epoch"] == killed_at and whole["resumed_from_epoch"] == 0
    assert cut["metrics"] == whole["metrics"]
    assert cut["history"] == whole["history"]
    heads_whole = torch.load(whole_work / lp.STATE_FILE, weights_only=True)["heads"]
    heads_cut = torch.load(state, weights_only=True)["heads"]
    for key, value in heads_whole.items():
        assert torch.equal(heads_cut[key], value), key
