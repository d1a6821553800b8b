"""torch.compile of the DenseCL encoders: same losses, same state-dict keys, real parameters updated."""
from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from densebench.pretrain.model import DenseCL
from test_pretrain_helpers import small_config, write_image_folder


def _compiler_missing() -> str:
    """Inductor on CPU builds C++ kernels; without a compiler torch.compile cannot run here."""
    if not any(shutil.which(name) for name in ("g++", "c++", "clang++")):
        return "torch.compile on CPU needs a C++ compiler (g++/c++/clang++), none on PATH"
    return ""


needs_compiler = pytest.mark.skipif(bool(_compiler_missing()), reason=_compiler_missing() or "compiler present")


def _tiny_model() -> DenseCL:
    torch.manual_seed(0)
    return DenseCL("resnet18", feat_dim=16, hid_dim=32, queue_len=32).train()


def _step(model, optimizer, im_q, im_k, perm, ghost_groups):
    out = model(im_q, im_k, perm, 0.5, ghost_groups)
    optimizer.zero_grad(set_to_none=True)
    out["loss"].backward()
    optimizer.step()
    return {name: value.detach() for name, value in out.items()}


@pytest.mark.slow
@needs_compiler
def test_compiled_encoders_match_eager_losses_and_updates():
    generator = torch.Generator().manual_seed(1)
    im_q, im_k = (torch.randn(8, 3, 32, 32, generator=generator) for _ in range(2))
    torch._dynamo.reset()
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    eager, compiled = _tiny_model(), _tiny_model()
    keys_before = list(compiled.state_dict())
    compiled.compile_encoders()
    assert list(compiled.state_dict()) == keys_before  # no `_orig_mod.` prefixes
    optimizers = [torch.optim.SGD(m.query_parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4)
                  for m in (eager, compiled)]
    # step 1, ghost-BN with 2 groups of 4 and shuffle-BN: the same losses
    perm = torch.randperm(8, generator=generator)
    out_eager = _step(eager, optimizers[0], im_q, im_k, perm, ghost_groups=2)
    out_compiled = _step(compiled, optimizers[1], im_q, im_k, perm, ghost_groups=2)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs_before  # really compiled
    for name in ("loss", "loss_global", "loss_dense"):
        assert float(out_compiled[name]) == pytest.approx(float(out_eager[name]), abs=1e-4), name
    eager_state, compiled_state = eager.state_dict(), compiled.state_dict()
    assert list(compiled_state) == list(eager_state)
    for name, reference in eager_state.items():
        value = compiled_state[name]
        if name.startswith(("backbone_k.", "neck_k.")) and reference.is_floating_point() and "running_" not in name:
            tolerance = 1e-6   # step 1's momentum update: lerp of identical initial parameters
        elif name.startswith(("queue", "backbone_k.", "neck_k.")):
            tolerance = 1e-4   # compiled key features / key BN statistics
        else:
            tolerance = 1e-3   # after one SGD step (lr 0.03) on slightly reassociated gradients
        assert torch.allclose(value.float(), reference.float(), atol=tolerance), name
    assert int(compiled.queue_ptr) == int(eager.queue_ptr) == 8

    # step 2 with another shuffle: no recompilation failure; BN over 4 samples of a 1x1 layer4
    # map amplifies step 1's rounding differences, hence the looser tolerance
    key_param_before = compiled.backbone_k.conv1.weight.detach().clone()
    perm = torch.randperm(8, generator=generator)
    out_eager = _step(eager, optimizers[0], im_q, im_k, perm, ghost_groups=2)
    out_compiled = _step(compiled, optimizers[1], im_q, im_k, perm, ghost_groups=2)
    # the momentum update moved the real key parameters (query != key after step 1), as eagerly
    assert not torch.equal(compiled.backbone_k.conv1.weight, key_param_before)
    assert torch.allclose(compiled.backbone_k.conv1.weight, eager.backbone_k.conv1.weight, atol=1e-6)
    assert torch.isfinite(out_compiled["loss"])
    assert float(out_compiled["loss"]) == pytest.approx(float(out_eager["loss"]), abs=5e-3)


def test_trainer_compile_option_records_it_and_keeps_checkpoint_keys(tmp_path, monkeypatch):
    """The trainer's wiring, with dynamo's eager backend (traced, no C++ build: fast)."""
    from densebench.pretrain.trainer import PretrainConfig, read_training_images, resolve_compile, train

    compiled_models = []
    original = DenseCL.compile_encoders

    def compile_with_eager_backend(model, **kwargs):
        compiled_models.append(model)
        original(model, backend="eager")

    monkeypatch.setattr(DenseCL, "compile_encoders", compile_with_eager_backend)
    paths = read_training_images(write_image_folder(tmp_path / "images", num_images=8))
    cfg = small_config(epochs=1, checkpoint_interval=1)
    runs = {}
    for use_compile in (False, True):
        work_dir = tmp_path / f"compile_{use_compile}"
        train(dataclasses.replace(cfg, compile=use_compile), paths, work_dir, show_progress=False,
              stop_after_iters=1)
        record = json.loads((work_dir / "config.json").read_text())
        assert record["compile"] is use_compile and record["config"]["compile"] is use_compile
        ckpt = torch.load(work_dir / "epoch_0001.pth", weights_only=True)
        log = json.loads((work_dir / "log.jsonl").read_text().splitlines()[0])
        runs[use_compile] = (ckpt["state_dict"], log)
    assert len(compiled_models) == 1  # only the compile=True run
    assert compiled_models[0].backbone._compiled_call_impl is not None  # really compiled in place
    (eager_state, eager_log), (compiled_state, compiled_log) = runs[False], runs[True]
    assert list(compiled_state) == list(eager_state)  # no `_orig_mod.` in the checkpoint
    for name, reference in eager_state.items():
        assert torch.allclose(compiled_state[name].float(), reference.float(), atol=1e-4), name
    assert compiled_log["loss"] == pytest.approx(eager_log["loss"], abs=1e-4)
    # the default is eager (no measured gain on GPU); None means "on with CUDA"
    assert resolve_compile(PretrainConfig(), torch.device("cuda")) is False
    assert resolve_compile(PretrainConfig(compile=None), torch.device("cpu")) is False
    assert resolve_compile(PretrainConfig(compile=None), torch.device("cuda")) is True
