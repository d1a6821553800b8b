"""Optional: our DenseCL step equals MMPreTrain's DenseCL (runs only when mmpretrain imports).

Same weights, momentum encoder, queues, inputs and shuffle-BN permutation: the global and
dense losses agree to 1e-5, the queues after one step are equal, and so are the gradients.
"""
from __future__ import annotations

import warnings

import pytest
import torch

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    mmpretrain = pytest.importorskip("mmpretrain", reason="mmpretrain is not installed")

from densebench.pretrain.model import DenseCL  # noqa: E402
from densebench.pretrain.mmpretrain_reference import build_mmpretrain_densecl, mmpretrain_losses  # noqa: E402

pytestmark = pytest.mark.optional


@pytest.mark.parametrize("arch,size", [("resnet18", 96), ("resnet50", 64)])
def test_losses_queues_and_gradients_equal_mmpretrain(arch, size):
    torch.manual_seed(0)
    ours = DenseCL(arch, feat_dim=16, queue_len=16, momentum=0.9)
    with torch.no_grad():  # query and key encoders differ, so the momentum update is exercised
        for param in ours.query_parameters():
            param.add_(0.02 * torch.randn_like(param))
    theirs = build_mmpretrain_densecl(ours, arch)
    im_q, im_k = torch.randn(8, 3, size, size), torch.randn(8, 3, size, size)
    perm = torch.randperm(8)

    their_losses = mmpretrain_losses(theirs, im_q, im_k, perm)
    our_losses = ours(im_q, im_k, perm, loss_lambda=0.5)

    assert float(our_losses["loss_global"]) * 0.5 == pytest.approx(float(their_losses["loss_single"].detach()), abs=1e-5)
    assert float(our_losses["loss_dense"]) * 0.5 == pytest.approx(float(their_losses["loss_dense"].detach()), abs=1e-5)
    for name in ("queue", "queue2"):
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), rtol=0, atol=1e-5)
        assert getattr(ours, name + "_ptr").tolist() == getattr(theirs, name + "_ptr").tolist() == [8]
    # key encoders after the momentum update
    torch.testing.assert_close(ours.backbone_k.layer4[0].conv1.weight,
                               theirs.encoder_k.module[0].layer4[0].conv1.weight, rtol=0, atol=1e-6)
    our_losses["loss"].backward()
    (their_losses["loss_single"] + their_losses["loss_dense"]).backward()
    for ours_param, their_param in ((ours.backbone.conv1.weight, theirs.backbone.conv1.weight),
                                    (ours.neck.mlp2[0].weight, theirs.neck.mlp2[0].weight)):
        # elementwise, float32 rounding of the deep backward reaches ~1e-3 relative on tiny
        # entries; as a whole the gradients agree to 1e-4
        relative = float((ours_param.grad - their_param.grad).norm() / their_param.grad.norm())
        assert relative < 1e-4, relative
