"""MMPreTrain's DenseCL as an external reference (optional; needs `mmpretrain`, `mmengine`, mmcv-lite).

Used by tests/test_pretrain_mmpretrain.py (numerical equivalence) and benchmarks/pretrain_step.py
(speed ratio). Builds `mmpretrain.models.selfsup.DenseCL` with the published model config
(configs/densecl/densecl_resnet50_8xb32-coslr-200e_in1k.py) for any ResNet depth, copies our
weights, momentum encoder and queues into it (the [1x] key layout, PROTOCOLS.md 1.7), and runs
one step with the same shuffle-BN permutation as ours.
"""
from __future__ import annotations

import contextlib
from typing import Dict

import torch

from densebench.pretrain.model import DenseCL

DEPTHS = {"resnet18": 18, "resnet34": 34, "resnet50": 50, "resnet101": 101, "resnet152": 152}


def build_mmpretrain_densecl(ours: DenseCL, arch: str):
    """An MMPreTrain DenseCL with the same sizes as `ours` and a copy of its state."""
    from mmpretrain.registry import MODELS
    from mmpretrain.utils import register_all_modules

    register_all_modules(init_default_scope=True)
    in_dim = ours.backbone.out_channels
    cfg = dict(
        type="DenseCL", queue_len=ours.queue_len, feat_dim=ours.queue.shape[0],
        momentum=1.0 - ours.momentum, loss_lambda=0.5,
        backbone=dict(type="ResNet", depth=DEPTHS[arch], norm_cfg=dict(type="BN"), zero_init_residual=False),
        neck=dict(type="DenseCLNeck", in_channels=in_dim, hid_channels=ours.neck.mlp[0].out_features,
                  out_channels=ours.queue.shape[0], num_grid=ours.neck.num_grid),
        head=dict(type="ContrastiveHead", loss=dict(type="CrossEntropyLoss"), temperature=ours.temperature),
    )
    theirs = MODELS.build(cfg)
    load_our_state(theirs, ours.state_dict())
    # mmengine's EMA copies the parameters outright on its first update; steps > 0 makes it a
    # momentum update from the start, as ours and the [0x]/[DC] reference
    theirs.encoder_k.steps.fill_(1)
    return theirs.train()


def to_mmpretrain_keys(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if key.startswith("backbone_k."):
            out["encoder_k.module.0." + key[len("backbone_k."):]] = value
        elif key.startswith("neck_k."):
            out["encoder_k.module.1." + key[len("neck_k."):]] = value
        else:
            out[key] = value
    return out


def load_our_state(theirs, state: Dict[str, torch.Tensor]) -> None:
    mapped = to_mmpretrain_keys(state)
    expected = theirs.state_dict()
    missing = [k for k in expected if k not in mapped and k != "encoder_k.steps"]
    unexpected = [k for k in mapped if k not in expected]
    if missing or unexpected:
        raise RuntimeError(f"MMPreTrain DenseCL key mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for key, value in mapped.items():
            expected[key].copy_(value)


@contextlib.contextmanager
def fixed_shuffle(perm: torch.Tensor):
    """Make MMPreTrain's shuffle-BN use `perm` (it draws torch.randperm otherwise)."""
    import mmpretrain.models.selfsup.densecl as densecl_module

    original = densecl_module.batch_shuffle_ddp
    densecl_module.batch_shuffle_ddp = lambda x: (x[perm.to(x.device)], torch.argsort(perm).to(x.device))
    try:
        yield
    finally:
        densecl_module.batch_shuffle_ddp = original


def mmpretrain_losses(theirs, im_q: torch.Tensor, im_k: torch.Tensor, perm: torch.Tensor):
    """MMPreTrain's weighted losses (loss_single = 0.5 L_global, loss_dense = 0.5 L_dense)."""
    with fixed_shuffle(perm):
        return theirs.loss([im_q, im_k], [])
