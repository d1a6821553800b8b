"""Results merged from uneven pieces equal the unsplit computation (issue 18: the kNN merge was
wrong only for some piece sizes). Rank gathers run under torchrun with 3 gloo ranks over sizes
that 3 does not divide (and one where a rank gets nothing): feature rows, linear-probe features
and accuracy counts, detection predictions (evaluated by COCO/VOC code only after this gather);
low-shot SVM chunks are uneven."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

GATHER_SCRIPT = r'''
import json, sys
import torch, torchvision
from torch.utils.data import Dataset
from densebench import distributed as du
from densebench.evaluate import features
from densebench.protocols import detection, linear_probe

du.init_distributed()
world, rank = du.world_size(), du.rank()
out = {"world": world}
cpu = torch.device("cpu")
resnet = torchvision.models.resnet18()            # a rank without rows asks it for the width (512)
pre = features.Preprocess("center_crop", 32, 32)
# feature shards: rank r computed rows r, r + W, ...; row i holds i * (1, -1, 0.5, ...);
# 49157 rows are more than one 16384-row gather block per rank
for total, dim in ((2, 512), (7, 512), (3 * 16384 + 5, 3)):
    mine = torch.arange(rank, total, world, dtype=torch.float32)
    pattern = torch.tensor([1.0, -1.0, 0.5]).repeat(dim)[:dim]
    chunks = [mine[:, None] * pattern] if len(mine) else []
    rows = features._gather_rows(chunks, total, resnet, cpu, features.GAP, pre)
    expected = torch.arange(total, dtype=torch.float32)[:, None] * pattern
    out[f"features_{total}"] = [list(rows.shape), bool((torch.from_numpy(rows) == expected).all())]

class Items(Dataset):
    def __init__(self, n): self.n = n
    def __len__(self): return self.n
    def __getitem__(self, i): return torch.tensor([float(i), 2.0 * i]), i % 3, i

class Runtime:
    device = cpu
    def head_inputs(self, backbone, images): return {"double": images * 2, "first": images[:, :1]}

for n in (2, 7, 11):
    got = linear_probe.extract_features(None, Items(n), Runtime(), batch_size=2, num_workers=0, show_progress=False)
    out[f"probe_{n}"] = {name: value.tolist() for name, value in got.items()}

class Heads(torch.nn.Module):                        # predicts class i % 4 for sample i
    def __init__(self):
        super().__init__()
        self.heads = torch.nn.ModuleDict({"h": torch.nn.Identity()})
    def forward(self, feats):
        return {"h": torch.nn.functional.one_hot(feats["first"][:, 0].long() % 4, 4).float()}

for n in (7, 11):                                    # the val shard of each rank, as prepare_probe builds it
    shard = torch.utils.data.Subset(Items(n), list(range(rank, n, world)))
    loader = torch.utils.data.DataLoader(shard, batch_size=2, collate_fn=linear_probe.collate)
    out[f"probe_eval_{n}"] = linear_probe.evaluate(None, Heads(), loader, Runtime(), num_classes=4)["h"]

class Detector(torch.nn.Module):
    def forward(self, images): return [{"score": img.sum().view(1), "label": torch.tensor([7])} for img in images]

for n in (2, 7):
    preds = detection.run_inference(Detector(), Items(n), cpu, False, lambda output, i: [i, float(output["score"])],
                                    show_progress=False)
    out[f"detection_{n}"] = preds
if du.is_main():
    open(sys.argv[1], "w").write(json.dumps(out))
du.barrier()
'''


@pytest.mark.slow
def test_rank_gathers_with_uneven_shards_equal_the_unsplit_lists(tmp_path):
    script, result = tmp_path / "gather.py", tmp_path / "out.json"
    script.write_text(GATHER_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=3",
                    str(script), str(result)], check=True, env=env, timeout=300)
    out = json.loads(result.read_text())
    assert out["world"] == 3
    for total, dim in ((2, 512), (7, 512), (3 * 16384 + 5, 3)):
        assert out[f"features_{total}"] == [[total, dim], True], total
    for n in (2, 7, 11):
        assert out[f"probe_{n}"] == {"double": [[2.0 * i, 4.0 * i] for i in range(n)],
                                     "first": [[float(i)] for i in range(n)]}
    for n in (7, 11):                                   # labels i % 3, predictions i % 4
        top1 = round(100.0 * sum(i % 3 == i % 4 for i in range(n)) / n, 4)
        assert out[f"probe_eval_{n}"] == {"top1": top1, "top5": 100.0}
    for n in (2, 7):
        assert out[f"detection_{n}"] == [[i, 3.0 * i] for i in range(n)]


def test_lowshot_uneven_group_chunks_equal_one_chunk_and_sklearn(monkeypatch):
    """The (sample, class) groups solved in chunks of unequal size give the per-group APs of one
    chunk, and the mAP of sklearn's per-problem fits."""
    from densebench.protocols import voc_svm_common as common
    from densebench.protocols.voc_svm_common import (REFERENCE_COSTS, SolverOptions, aggregate_lowshot,
                                                     lowshot_fit_and_test, sample_lowshot_targets)
    from densebench.protocols.voc_svm_common import synthetic_voc_features

    train_x, train_t, test_x, test_t = synthetic_voc_features(120, 80, 64, seed=3, signal=0.3)
    costs = REFERENCE_COSTS[::3]
    samples = [sample_lowshot_targets(train_t, 2, random.Random(s)) for s in range(3)]     # 60 groups
    sizes = []
    real_solve = common._group_solve
    monkeypatch.setattr(common, "_group_solve", lambda *a, **k: sizes.append(a[2].shape[0]) or real_solve(*a, **k))
    one = lowshot_fit_and_test(train_x, samples, test_x, test_t, costs, SolverOptions(lowshot_basis="group"))
    assert sizes == [60]
    sizes.clear()
    uneven = lowshot_fit_and_test(train_x, samples, test_x, test_t, costs,
                                  SolverOptions(lowshot_basis="group", chunk_bytes=2 ** 20))
    assert len(set(sizes)) > 1 and sum(sizes) == 60, sizes      # e.g. 8 chunks of 7 and one of 4
    diff = np.abs(uneven - one)
    assert (diff > 1e-6).mean() <= 0.01 and diff.max() <= 0.01      # other batch shapes: near-ties may swap
    ref = lowshot_fit_and_test(train_x, samples, test_x, test_t, costs, SolverOptions(backend="sklearn"))
    assert abs(aggregate_lowshot(uneven, costs)["mAP"] - aggregate_lowshot(ref, costs)["mAP"]) <= 0.1


def test_lowshot_stored_pieces_are_not_reused_for_other_features(tmp_path, monkeypatch):
    """Low-shot results are stored per (layer, sample, k) and merged on a rerun; the work dir names
    the checkpoint and config but not the images, so replaced images must not reuse stale pieces."""
    from densebench.evaluate.context import RunContext
    from densebench.protocols import lowshot_svm_voc07 as lowshot
    from densebench.protocols.svm_solver import l2_normalize
    from densebench.protocols.voc_svm_common import SolverOptions, synthetic_voc_features

    ctx = RunContext(checkpoint=tmp_path / "c.pth", data_root=tmp_path, work_dir=tmp_path / "work",
                     cache_dir=tmp_path / "cache", show_progress=False)
    cfg = lowshot.Config(ks=(1, 2), num_samples=2, costs=(0.01, 1.0))
    calls = []
    real = lowshot.lowshot_fit_and_test
    monkeypatch.setattr(lowshot, "lowshot_fit_and_test", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))

    def run(seed):
        train_x, train_t, test_x, test_t = synthetic_voc_features(60, 40, 16, seed=seed, signal=0.5)
        return lowshot.run_layer(ctx, cfg, "feat5", l2_normalize(train_x), train_t, l2_normalize(test_x), test_t,
                                 SolverOptions())

    first = run(0)
    assert calls == [2, 2]
    assert run(0) == first and calls == [2, 2]                      # same features: every piece reused
    other = run(1)
    assert calls == [2, 2, 2, 2] and other != first                  # other features: all recomputed
