"""The CUDA-graph training step (GraphedTrainStep) against the eager step, and when the trainer uses it."""
from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

from densebench.errors import InputError
from densebench.pretrain.model import DenseCL
from densebench.pretrain.step import GraphedTrainStep, train_step
from densebench.pretrain.trainer import PretrainConfig, read_training_images, resolve_cuda_graph, train
from test_pretrain_helpers import small_config, write_image_folder

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


def test_cuda_graph_applies_only_to_one_cuda_process_without_compile():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_cuda_graph(PretrainConfig(), cuda, use_compile=False) is True
    assert resolve_cuda_graph(PretrainConfig(), cuda, use_compile=True) is False
    assert resolve_cuda_graph(PretrainConfig(), cpu, use_compile=False) is False
    assert resolve_cuda_graph(PretrainConfig(cuda_graph=False), cuda, use_compile=False) is False
    with pytest.raises(InputError, match="cuda_graph=true needs a CUDA device"):
        resolve_cuda_graph(PretrainConfig(cuda_graph=True), cpu, use_compile=False)


def test_enqueue_writes_at_the_pointer_without_reading_it_on_the_host():
    """The device-side slot indices write the same columns as the reference's slice at int(ptr)."""
    model = DenseCL("resnet18", feat_dim=4, hid_dim=8, queue_len=12)
    queue = torch.zeros(4, 12)
    ptr = torch.tensor([8])
    keys = torch.arange(16, dtype=torch.float32).reshape(4, 4)
    model.enqueue(queue, ptr, keys)
    assert torch.equal(queue[:, 8:12], keys.T) and not queue[:, :8].any()
    assert int(ptr) == 0                                       # wrapped
    model.enqueue(queue, ptr, keys + 100)
    assert torch.equal(queue[:, 0:4], (keys + 100).T) and int(ptr) == 4


def _models(device, arch="resnet18", queue_len=64):
    torch.manual_seed(0)
    eager = DenseCL(arch, feat_dim=16, hid_dim=32, queue_len=queue_len).to(device).train()
    graphed = copy.deepcopy(eager)
    optimizers = [torch.optim.SGD(m.query_parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4)
                  for m in (eager, graphed)]
    return eager, graphed, optimizers


@needs_cuda
@pytest.mark.parametrize("bf16", [False, True])
def test_graphed_steps_equal_eager_steps_through_recaptures(bf16, monkeypatch):
    """8 steps with fresh inputs each step, a learning-rate change (recapture) and ghost-BN
    groups: the same losses, queues, pointers and parameters as the eager steps."""
    device = torch.device("cuda")
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    eager, graphed, (opt_eager, opt_graphed) = _models(device)
    runner = GraphedTrainStep(graphed, opt_graphed, bf16, eager_steps=2)
    generator = torch.Generator().manual_seed(1)
    tolerance = 2e-2 if bf16 else 1e-4
    for step in range(8):
        if step == 5:
            for opt in (opt_eager, opt_graphed):
                opt.param_groups[0]["lr"] = 0.01
        im_q, im_k = (torch.randn(8, 3, 64, 64, generator=generator).to(device) for _ in range(2))
        perm = torch.randperm(8, generator=generator)
        expected = train_step(eager, opt_eager, im_q, im_k, perm, 0.5, 2, bf16)
        got = runner(im_q, im_k, perm, 0.5, 2)
        for name in ("loss_global", "loss_dense"):
            assert float(got[name]) == pytest.approx(float(expected[name]), abs=tolerance), (step, name)
    assert runner.captures == 2                                # steps 3 and 6 (lr changed)
    assert int(graphed.queue_ptr) == int(eager.queue_ptr) == (8 * 8) % 64
    assert torch.allclose(graphed.queue, eager.queue, atol=tolerance)
    for (name, value), reference in zip(graphed.state_dict().items(), eager.state_dict().values()):
        if value.is_floating_point():
            assert torch.allclose(value, reference, atol=tolerance), name
        else:
            assert torch.equal(value, reference), name


@needs_cuda
def test_trainer_on_cuda_records_the_graph_and_matches_the_eager_run(tmp_path):
    paths = read_training_images(write_image_folder(tmp_path / "images", num_images=48))
    cfg = small_config(epochs=1, batch_size=8, checkpoint_interval=0, bf16=False)
    logs = {}
    for use_graph in (False, True):
        work_dir = tmp_path / f"graph_{use_graph}"
        train(dataclasses.replace(cfg, cuda_graph=use_graph), paths, work_dir, device=torch.device("cuda"),
              show_progress=False)
        assert json.loads((work_dir / "config.json").read_text())["cuda_graph"] is use_graph
        logs[use_graph] = [json.loads(line) for line in (work_dir / "log.jsonl").read_text().splitlines()]
    assert len(logs[True]) == len(logs[False]) == 6
    for eager_record, graph_record in zip(logs[False], logs[True]):
        assert graph_record["loss"] == pytest.approx(eager_record["loss"], abs=1e-3)
