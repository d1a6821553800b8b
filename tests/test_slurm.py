"""`run_all.sh --slurm`: the submitit job chain, with a stand-in submitit module (no cluster here)."""
from __future__ import annotations

import os
import sys
import types

import pytest

from densebench import slurm


class FakeJob:
    def __init__(self, job_id):
        self.job_id = job_id


class FakeExecutor:
    submitted = []

    def __init__(self, folder):
        self.folder = folder
        self.params = {}

    def update_parameters(self, **params):
        self.params.update(params)

    def submit(self, task):
        FakeExecutor.submitted.append((dict(self.params), task))
        return FakeJob(str(100 + len(FakeExecutor.submitted)))


@pytest.fixture
def fake_submitit(monkeypatch):
    module = types.ModuleType("submitit")
    module.AutoExecutor = FakeExecutor
    module.JobEnvironment = lambda: types.SimpleNamespace(global_rank=3, num_tasks=16, local_rank=1,
                                                          hostnames=["node-a", "node-b"])
    monkeypatch.setitem(sys.modules, "submitit", module)
    FakeExecutor.submitted = []
    return module


def test_pretrain_evaluate_report_chain(fake_submitit, tmp_path):
    assert slurm.main(["--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "res"),
                       "--gpus", "8", "--nodes", "2", "--partition", "gpu"]) == 0
    (pre_params, pre), (ev_params, ev), (rep_params, rep) = FakeExecutor.submitted
    assert pre.argv[:1] == ["pretrain"] and "--resume" not in pre.argv
    assert pre_params["nodes"] == 2 and pre_params["gpus_per_node"] == 8 and pre_params["tasks_per_node"] == 8
    assert pre_params["slurm_partition"] == "gpu"
    assert ev.argv[0] == "evaluate" and ev.argv[1].endswith("pretrain/densecl_paper/backbone.pth")
    assert ev_params["slurm_additional_parameters"] == {"dependency": "afterok:101"}
    assert rep.argv == ["report", str(tmp_path / "res")]
    assert rep_params["slurm_additional_parameters"] == {"dependency": "afterok:102"}


def test_given_checkpoint_skips_pretraining(fake_submitit, tmp_path):
    assert slurm.main(["--data-root", "d", "--out", str(tmp_path), "--checkpoint", "ck.pth", "--seeds", "0,1,2"]) == 0
    assert [task.argv[0] for _, task in FakeExecutor.submitted] == ["evaluate", "report"]
    argv = FakeExecutor.submitted[0][1].argv
    assert argv[argv.index("--seeds") + 1] == "0,1,2"
    assert "slurm_additional_parameters" not in FakeExecutor.submitted[0][0]


def test_task_sets_the_torchrun_environment(fake_submitit, monkeypatch):
    seen = {}
    monkeypatch.setattr("densebench.cli.main", lambda argv: seen.update(argv=argv, env=dict(os.environ)) or 0)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        monkeypatch.setenv(key, "stale")          # registered, so monkeypatch restores them afterwards
    monkeypatch.setenv("MASTER_PORT", "29511")
    assert slurm.DensebenchTask(["report", "x"])() == 0
    env = seen["env"]
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_ADDR"]) == ("3", "16", "1", "node-a")
    assert env["MASTER_PORT"] == "29511" and seen["argv"] == ["report", "x"]


@pytest.mark.parametrize("option,value", [("--seeds", "-1"), ("--seeds", f"0,{2 ** 32}"), ("--seeds", "1,1"), ("--gpus", "0")])
def test_bad_numbers_stop_before_a_job_is_queued(option, value, capsys):
    with pytest.raises(SystemExit) as exc:
        slurm.main(["--data-root", "d", option, value])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.strip().splitlines()) == 1 and f"argument {option}" in err
