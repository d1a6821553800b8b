"""DenseCL model/loss/queues against a hand-computed reference (PROTOCOLS.md 1.1-1.3).

The reference below is written independently of densebench.pretrain.model: it recomputes
the momentum update parameter by parameter, runs the encoders group by group (per-"GPU"
BN), un-shuffles with an explicit loop, and computes both InfoNCE losses and the dense
argmax with explicit loops over images and locations in float64.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from densebench.pretrain.model import (DenseCL, GhostBatchNorm2d, cosine_lr, info_nce,
                                      set_ghost_groups, similarity_stats)

TEMPERATURE = 0.2


def _norm(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


def _encode_by_groups(backbone, neck, images, groups):
    """Backbone + neck run on each contiguous group separately (per-device BN), concatenated."""
    maps, globals_, denses = [], [], []
    for chunk in images.chunk(groups):
        fmap = backbone(chunk)
        maps.append(fmap)
        pooled = fmap.mean(dim=(2, 3))
        globals_.append(neck.mlp[2](torch.relu(neck.mlp[0](pooled))))
        denses.append(neck.mlp2[2](torch.relu(neck.mlp2[0](fmap))))
    return torch.cat(maps), torch.cat(globals_), torch.cat(denses)


def _ce_positive_first(pos: float, negs: torch.Tensor) -> float:
    logits = torch.cat([torch.tensor([pos], dtype=torch.float64), negs.double()]) / TEMPERATURE
    return float(torch.logsumexp(logits, 0) - logits[0])


def reference_step(model: DenseCL, im_q, im_k, perm, groups, momentum, use_projected_for_match=False):
    """Independent re-implementation of one DenseCL step; returns losses and expected queues."""
    ref = copy.deepcopy(model)
    set_ghost_groups(ref, 1)
    with torch.no_grad():
        named_q = dict(ref.backbone.named_parameters(prefix="backbone"))
        named_q.update(dict(ref.neck.named_parameters(prefix="neck")))
        for name, param_k in list(ref.backbone_k.named_parameters(prefix="backbone_k")) + \
                list(ref.neck_k.named_parameters(prefix="neck_k")):
            param_q = named_q[name.replace("backbone_k", "backbone").replace("neck_k", "neck")]
            param_k.copy_(momentum * param_k + (1 - momentum) * param_q)
        fq, q, q_dense = _encode_by_groups(ref.backbone, ref.neck, im_q, groups)
        fk_s, k_s, k_dense_s = _encode_by_groups(ref.backbone_k, ref.neck_k, im_k[perm], groups)
        fk, k, k_dense = torch.empty_like(fk_s), torch.empty_like(k_s), torch.empty_like(k_dense_s)
        for i, p in enumerate(perm.tolist()):  # un-shuffle: shuffled position i holds image p
            fk[p], k[p], k_dense[p] = fk_s[i], k_s[i], k_dense_s[i]
    n, _, h, w = fq.shape
    queue, queue2 = model.queue.double(), model.queue2.double()
    global_terms, dense_terms = [], []
    for b in range(n):
        qb, kb = _norm(q[b].double()), _norm(k[b].double())
        global_terms.append(_ce_positive_first(float(qb @ kb), qb @ queue))
        for i in range(h * w):
            yi, xi = divmod(i, w)
            q_vec = _norm(q_dense[b, :, yi, xi].double())
            fq_vec = _norm(fq[b, :, yi, xi].double())
            best_j, best_sim = None, -math.inf
            for j in range(h * w):
                yj, xj = divmod(j, w)
                if use_projected_for_match:
                    sim = float(q_vec @ _norm(k_dense[b, :, yj, xj].double()))
                else:
                    sim = float(fq_vec @ _norm(fk[b, :, yj, xj].double()))
                if sim > best_sim:
                    best_j, best_sim = j, sim
            yj, xj = divmod(best_j, w)
            k_vec = _norm(k_dense[b, :, yj, xj].double())
            dense_terms.append(_ce_positive_first(float(q_vec @ k_vec), q_vec @ queue2))
    k_normed = torch.stack([_norm(k[b].double()) for b in range(n)])
    k2_normed = torch.stack([_norm(k_dense[b].double().mean(dim=(1, 2))) for b in range(n)])
    return sum(global_terms) / n, sum(dense_terms) / (n * h * w), k_normed, k2_normed


def _model(queue_len=8, feat_dim=16, momentum=0.5):
    torch.manual_seed(0)
    model = DenseCL("resnet18", feat_dim=feat_dim, hid_dim=32, queue_len=queue_len, momentum=momentum)
    with torch.no_grad():  # make query and key encoders differ so the momentum update matters
        for param in model.query_parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model.train()


@pytest.mark.parametrize("groups", [1, 2])
def test_losses_and_queues_match_hand_computed_reference(groups):
    model = _model()
    torch.manual_seed(1)
    im_q, im_k = torch.randn(4, 3, 96, 96), torch.randn(4, 3, 96, 96)
    perm = torch.tensor([2, 0, 3, 1])
    queue_before, queue2_before = model.queue.clone(), model.queue2.clone()
    ref_global, ref_dense, ref_k, ref_k2 = reference_step(model, im_q, im_k, perm, groups, momentum=0.5)

    out = model(im_q, im_k, perm, loss_lambda=0.5, ghost_groups=groups)

    assert float(out["loss_global"]) == pytest.approx(ref_global, rel=1e-5)
    assert float(out["loss_dense"]) == pytest.approx(ref_dense, rel=1e-5)
    assert float(out["loss"].detach()) == pytest.approx(0.5 * ref_global + 0.5 * ref_dense, rel=1e-5)
    # queue <- normalised k, queue2 <- normalised GAP of the key dense projection; ptr += batch
    torch.testing.assert_close(model.queue[:, :4].double(), ref_k.T, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.queue2[:, :4].double(), ref_k2.T, rtol=1e-5, atol=1e-6)
    assert torch.equal(model.queue[:, 4:], queue_before[:, 4:])
    assert torch.equal(model.queue2[:, 4:], queue2_before[:, 4:])
    assert model.queue_ptr.tolist() == [4] and model.queue2_ptr.tolist() == [4]


@pytest.mark.parametrize("temperature", [0.2, 0.01])
def test_info_nce_value_and_gradients_equal_cross_entropy_on_concatenated_logits(temperature):
    torch.manual_seed(3)
    q = F.normalize(torch.randn(37, 16), dim=1).requires_grad_()
    positive = F.normalize(torch.randn(37, 16), dim=1).requires_grad_()
    queue = F.normalize(torch.randn(16, 300), dim=0)
    loss = info_nce(q, positive, queue, temperature)
    loss.backward()

    q64, pos64 = q.detach().double().requires_grad_(), positive.detach().double().requires_grad_()
    logits = torch.cat([(q64 * pos64).sum(1, keepdim=True), q64 @ queue.double()], dim=1) / temperature
    expected = F.cross_entropy(logits, torch.zeros(37, dtype=torch.long))
    expected.backward()
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    torch.testing.assert_close(q.grad.double(), q64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(positive.grad.double(), pos64.grad, rtol=1e-4, atol=1e-6)


def test_reference_is_sensitive_to_the_correspondence_features():
    """The dense loss differs when matching on projected features: the test above can fail."""
    model = _model()
    torch.manual_seed(1)
    im_q, im_k = torch.randn(4, 3, 96, 96), torch.randn(4, 3, 96, 96)
    perm = torch.arange(4)
    _, dense_backbone, _, _ = reference_step(model, im_q, im_k, perm, 1, momentum=0.5)
    _, dense_projected, _, _ = reference_step(model, im_q, im_k, perm, 1, momentum=0.5,
                                              use_projected_for_match=True)
    out = model(im_q, im_k, perm, loss_lambda=0.5)
    assert float(out["loss_dense"]) == pytest.approx(dense_backbone, rel=1e-5)
    assert abs(dense_projected - dense_backbone) > 1e-4


def test_loss_gradient_only_reaches_query_encoder_and_lambda_zero_ignores_dense():
    model = _model()
    im_q, im_k = torch.randn(4, 3, 64, 64), torch.randn(4, 3, 64, 64)
    out = model(im_q, im_k, torch.arange(4), loss_lambda=0.0)
    assert float(out["loss"].detach()) == pytest.approx(float(out["loss_global"]), rel=1e-6)
    out["loss"].backward()
    assert all(p.grad is None for p in model.key_parameters())
    assert model.neck.mlp[0].weight.grad is not None
    # with lambda 0 the dense branch gets no gradient
    assert float(model.neck.mlp2[0].weight.grad.abs().sum()) == 0.0


def test_queue_pointer_wraps_around():
    model = _model(queue_len=8)
    for step in range(3):
        model(torch.randn(4, 3, 64, 64), torch.randn(4, 3, 64, 64), torch.arange(4))
        assert model.queue_ptr.item() == [4, 0, 4][step] == model.queue2_ptr.item()
    assert torch.allclose(model.queue.norm(dim=0), torch.ones(8), atol=1e-5)
    assert torch.allclose(model.queue2.norm(dim=0), torch.ones(8), atol=1e-5)


def test_ghost_batchnorm_equals_separate_batchnorms():
    torch.manual_seed(0)
    ghost = GhostBatchNorm2d(5)
    ghost.weight.data.uniform_(0.5, 1.5)
    ghost.bias.data.uniform_(-0.5, 0.5)
    ghost.ghost_groups = 3
    x = torch.randn(6, 5, 4, 3) * 3 + 1
    y = ghost(x)
    for g, chunk in enumerate(x.chunk(3)):
        mean = chunk.mean(dim=(0, 2, 3), keepdim=True)
        var = chunk.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        expected = (chunk - mean) / torch.sqrt(var + ghost.eps) * ghost.weight.view(1, -1, 1, 1) \
            + ghost.bias.view(1, -1, 1, 1)
        torch.testing.assert_close(y[2 * g:2 * g + 2], expected, rtol=1e-5, atol=1e-5)
    # running statistics are those of group 0 (the reference saves rank 0's)
    first = x[:2]
    torch.testing.assert_close(ghost.running_mean, 0.1 * first.mean(dim=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ghost.running_var, 0.9 + 0.1 * first.var(dim=(0, 2, 3), unbiased=True),
                               rtol=1e-5, atol=1e-6)
    assert ghost.num_batches_tracked.item() == 1
    ghost.eval()  # eval mode: running statistics, no grouping
    torch.testing.assert_close(ghost(x), F.batch_norm(x, ghost.running_mean, ghost.running_var,
                                                      ghost.weight, ghost.bias, False))


def test_neck_bn_is_batchnorm_over_each_ghost_group_and_follows_set_ghost_groups():
    """neck_norm puts a BN after each hidden layer: the global one equals torch's BatchNorm1d on
    each ghost group's rows, the dense one BatchNorm2d; the default neck has none."""
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in DenseCL("resnet18", queue_len=8).neck.modules())
    torch.manual_seed(0)
    model = DenseCL("resnet18", feat_dim=8, hid_dim=16, queue_len=8, neck_norm=True).train()
    assert [type(m).__name__ for m in model.neck.mlp] == ["Linear", "FlatGhostBatchNorm", "ReLU", "Linear"]
    assert [type(m).__name__ for m in model.neck.mlp2] == ["Conv2d", "GhostBatchNorm2d", "ReLU", "Conv2d"]
    set_ghost_groups(model, 2)
    rows = torch.randn(6, 16) * 2 + 1
    out = model.neck.mlp[1](rows)
    reference = torch.nn.BatchNorm1d(16).train()
    for g, chunk in enumerate(rows.chunk(2)):
        torch.testing.assert_close(out[3 * g:3 * g + 3], reference(chunk), rtol=1e-5, atol=1e-5)
    features = torch.randn(4, 512, 2, 2)
    q, q_grid, q2 = model.neck(features)
    assert q.shape == (4, 8) and q_grid.shape == (4, 8, 4) and q2.shape == (4, 8)


def test_backbone_state_dict_uses_torchvision_names():
    import torchvision

    model = DenseCL("resnet18", queue_len=8)
    backbone = {k[len("backbone."):] for k in model.state_dict() if k.startswith("backbone.")}
    reference = {k for k in torchvision.models.resnet18().state_dict() if not k.startswith("fc.")}
    assert backbone == reference
    assert {k for k in model.state_dict() if k.startswith("neck.")} == {
        f"neck.{m}.{i}.{p}" for m in ("mlp", "mlp2") for i in (0, 2) for p in ("weight", "bias")}
    assert model.queue.shape == model.queue2.shape == (128, 8)
    assert model.queue_ptr.dtype == torch.long and model.queue_ptr.shape == (1,)


def test_init_styles_differ_as_documented():
    torch.manual_seed(0)
    fan_in = DenseCL("resnet18", queue_len=8, init_style="fan_in").backbone.layer1[0].conv1.weight.detach()
    torch.manual_seed(0)
    fan_out = DenseCL("resnet18", queue_len=8, init_style="fan_out").backbone.layer4[0].conv1.weight.detach()
    # kaiming normal std = sqrt(2 / fan); layer1 conv1 of R18: fan_in = 64*9, layer4: fan_out = 512*9
    assert float(fan_in.std()) == pytest.approx(math.sqrt(2 / (64 * 9)), rel=0.05)
    assert float(fan_out.std()) == pytest.approx(math.sqrt(2 / (512 * 9)), rel=0.05)


def test_cosine_schedule_per_epoch():
    assert cosine_lr(0.03, 0, 200) == pytest.approx(0.03)
    assert cosine_lr(0.03, 100, 200) == pytest.approx(0.015)
    assert cosine_lr(0.03, 50, 200) == pytest.approx(0.5 * 0.03 * (1 + math.cos(math.pi / 4)))
    assert cosine_lr(0.03, 200, 200) == pytest.approx(0.0, abs=1e-12)


def test_similarity_stats_equal_explicit_pairwise_means():
    """The logged cosines, taken through sums, equal the plain means over every pair (float64
    loops), for spread-out vectors and for a collapsed batch (all queries alike: cos_batch 1)."""
    torch.manual_seed(3)
    q = F.normalize(torch.randn(5, 8), dim=1)
    k = F.normalize(torch.randn(5, 8), dim=1)
    queue = F.normalize(torch.randn(8, 7), dim=0)
    stats = similarity_stats(q, k, queue)
    qd, kd, queued = q.double(), k.double(), queue.double()
    pos = sum(float(qd[i] @ kd[i]) for i in range(5)) / 5
    neg = sum(float(qd[i] @ queued[:, j]) for i in range(5) for j in range(7)) / 35
    batch = sum(float(qd[i] @ qd[j]) for i in range(5) for j in range(5) if i != j) / 20
    assert float(stats["cos_pos"]) == pytest.approx(pos, abs=1e-6)
    assert float(stats["cos_neg"]) == pytest.approx(neg, abs=1e-6)
    assert float(stats["cos_batch"]) == pytest.approx(batch, abs=1e-6)

    collapsed = F.normalize(torch.ones(4, 8) + 1e-4 * torch.randn(4, 8), dim=1)
    assert float(similarity_stats(collapsed, collapsed, queue)["cos_batch"]) == pytest.approx(1.0, abs=1e-6)
    assert math.isnan(float(similarity_stats(q[:1], k[:1], queue)["cos_batch"]))


def test_forward_reports_the_similarity_stats_of_its_own_features():
    """The step's cos_* come from the same q, k and queue (before the enqueue) as its loss:
    recomputed here from a copy of the model stepped by hand."""
    model = _model()
    twin = copy.deepcopy(model)
    torch.manual_seed(1)
    im_q, im_k = torch.randn(4, 3, 64, 64), torch.randn(4, 3, 64, 64)
    perm = torch.arange(4)
    queue_before = model.queue.clone()
    out = model(im_q, im_k, perm, loss_lambda=0.5, ghost_groups=1)
    with torch.no_grad():
        q = F.normalize(twin.neck(twin.backbone(im_q))[0], dim=1)
        twin.momentum_update()
        k = F.normalize(twin.neck_k(twin.backbone_k(im_k))[0], dim=1)
    expected = similarity_stats(q, k, queue_before)
    for key in ("cos_pos", "cos_neg", "cos_batch"):
        assert float(out[key]) == pytest.approx(float(expected[key]), abs=1e-5), key
