"""DenseCL (PROTOCOLS.md 1.1-1.3): backbone, DenseCLNeck, momentum encoder, two queues, loss.

The forward pass follows the reference ([0x] mmselfsup/models/algorithms/densecl.py
`forward_train`, identical to [DC] `openselfsup/models/densecl.py`) step by step:

1. query view -> backbone map F_q -> neck (q, q_grid, q2); L2-normalise all four along channels;
2. no grad: momentum update of the key encoder, THEN shuffle-BN forward of the key view,
   the same normalisations, un-shuffle;
3. global InfoNCE over [q.k, q.queue] / T;
4. dense: j*(i) = argmax_j <F_q[:, i], F_k[:, j]> over normalised BACKBONE features, positive
   q_grid[:, i].k_grid[:, j*(i)], negatives q_grid[:, i].queue2, CE averaged over N*S^2;
5. loss = (1 - lambda) * L_global + lambda * L_dense;
6. enqueue (after the loss): queue <- normalised k, queue2 <- normalised k2 (GAP of the key
   dense projection, one vector per image), keys all-gathered over ranks first.

State-dict naming (the densebench checkpoint format): `backbone.*` (torchvision ResNet names,
no fc), `neck.mlp.{0,2}`, `neck.mlp2.{0,2}` (`{0,1,3}`, 1 the BN, with `neck_bn`), `backbone_k.*`,
`neck_k.*`, `queue`, `queue_ptr`, `queue2`, `queue2_ptr`.
"""
from __future__ import annotations

import copy
import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from densebench import distributed as dist_utils

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


# --------------------------------------------------------------------------- backbone


class GhostBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are computed over `ghost_groups` equal sub-batches.

    Emulates the reference's per-GPU BN (32 images per BN batch, PROTOCOLS.md 12.2) when a
    larger batch runs in one process. Group g is the g-th contiguous block of the batch, which
    is exactly the sub-batch rank g would hold in the reference. The statistics come from the
    same `F.batch_norm` kernel as a plain BN (the groups are laid side by side as extra
    channels). Running statistics follow group 0 only: in the reference (DDP with
    broadcast_buffers=False) each GPU keeps its own and rank 0's are the ones saved. With
    ghost_groups == 1 this is nn.BatchNorm2d. State-dict keys are those of nn.BatchNorm2d.
    """

    ghost_groups: int = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups = self.ghost_groups
        if groups <= 1 or not self.training:
            return super().forward(x)
        batch, channels, height, width = x.shape
        if batch % groups:
            raise ValueError(f"batch {batch} is not divisible into {groups} ghost-BN groups")
        per_group = batch // groups
        side_by_side = (x.reshape(groups, per_group, channels, height, width).transpose(0, 1)
                        .reshape(per_group, groups * channels, height, width))
        running_mean = self.running_mean.repeat(groups)
        running_var = self.running_var.repeat(groups)
        out = F.batch_norm(side_by_side, running_mean, running_var, self.weight.repeat(groups),
                           self.bias.repeat(groups), True, self.momentum, self.eps)
        with torch.no_grad():
            self.running_mean.copy_(running_mean[:channels])
            self.running_var.copy_(running_var[:channels])
            self.num_batches_tracked.add_(1)
        return (out.reshape(per_group, groups, channels, height, width).transpose(0, 1)
                .reshape(batch, channels, height, width))


class ResNetTrunk(nn.Module):
    """A torchvision ResNet without avgpool/fc whose forward returns the layer4 map.

    Submodules are those of torchvision's ResNet, so the state dict uses torchvision names
    (`conv1`, `bn1`, `layerX.Y.convZ/bnZ`, `layerX.0.downsample.{0,1}`) and loads into
    `torchvision.models.<arch>` with only `fc.*` missing (PROTOCOLS.md 1.7).
    """

    def __init__(self, arch: str = "resnet50", init_style: str = "fan_out"):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r}; known: {', '.join(ARCHS)}")
        # zero_init_residual=False as in the reference (PROTOCOLS.md 1.1); BN weight 1, bias 0
        resnet = getattr(torchvision.models, arch)(weights=None, norm_layer=GhostBatchNorm2d)
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            setattr(self, name, getattr(resnet, name))
        self.out_channels = resnet.fc.in_features
        init_backbone(self, init_style)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def init_backbone(backbone: nn.Module, init_style: str) -> None:
    """Kaiming-normal (relu gain) on every conv, BN weight 1 / bias 0 (PROTOCOLS.md 1.1, 12.3).

    fan_out = [0x]/[1x] (mmcv KaimingInit defaults; the version that produced the published
    numbers); fan_in = [DC] (the authors' original code).
    """
    if init_style not in ("fan_in", "fan_out"):
        raise ValueError(f"init_style must be fan_in or fan_out, got {init_style!r}")
    for module in backbone.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode=init_style, nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class FlatGhostBatchNorm(GhostBatchNorm2d):
    """GhostBatchNorm2d for (N, C) rows, as BatchNorm1d: the neck's optional global-branch BN."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x[:, :, None, None]).flatten(1)


def set_ghost_groups(module: nn.Module, groups: int) -> None:
    for sub in module.modules():
        if isinstance(sub, GhostBatchNorm2d):
            sub.ghost_groups = groups


# --------------------------------------------------------------------------- neck


class DenseCLNeck(nn.Module):
    """Global branch (GAP -> Linear-ReLU-Linear) and dense branch (1x1 conv-ReLU-conv).

    Returns (q [N, D], q_grid [N, D, S*S], q2 [N, D] = GAP of the dense projection), all
    un-normalised, as [0x]/[DC] DenseCLNeck. `num_grid` None keeps the backbone's grid.
    `norm` puts a (ghost-)BN after each hidden layer, as MoCo v3's and SimCLR's heads have and
    DenseCL's has not: it centres the projections over the batch, which keeps a short run from
    collapsing them to one direction (the tiny preset; measured in its notes).
    """

    def __init__(self, in_channels: int, hid_channels: int, out_channels: int,
                 num_grid: Optional[int] = None, init_style: str = "fan_out", norm: bool = False):
        super().__init__()
        global_norm = [FlatGhostBatchNorm(hid_channels)] if norm else []
        dense_norm = [GhostBatchNorm2d(hid_channels)] if norm else []
        self.mlp = nn.Sequential(nn.Linear(in_channels, hid_channels), *global_norm, nn.ReLU(inplace=True),
                                 nn.Linear(hid_channels, out_channels))
        self.mlp2 = nn.Sequential(nn.Conv2d(in_channels, hid_channels, 1), *dense_norm, nn.ReLU(inplace=True),
                                  nn.Conv2d(hid_channels, out_channels, 1))
        self.num_grid = num_grid
        if init_style == "fan_in":
            # [DC] init_linear='kaiming': Linear layers only; the convs keep the PyTorch default
            for layer in self.mlp:
                if isinstance(layer, nn.Linear):
                    nn.init.kaiming_normal_(layer.weight, mode="fan_in", nonlinearity="relu")
                    nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor):
        q = self.mlp(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))  # GAP of the full map
        if self.num_grid is not None:  # only the dense branch is pooled to num_grid x num_grid
            x = F.adaptive_avg_pool2d(x, self.num_grid)
        dense = self.mlp2(x)
        q2 = torch.flatten(F.adaptive_avg_pool2d(dense, 1), 1)
        return q, dense.flatten(2), q2


# --------------------------------------------------------------------------- loss pieces


def info_nce(q: torch.Tensor, positive: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """ContrastiveHead: cross-entropy over [q . positive, q . queue] / T, positive at index 0, mean.

    q, positive (M, D) rows; queue (D, K). Computed as mean(logsumexp(all logits) - positive
    logit) with 1/T folded into q: the reference's value (to float rounding) without the
    concatenated and the divided copies of the logits, which with the paper's queue are
    32 * 49 x 65536 floats (411 MB) each for the dense loss.
    """
    q_scaled = q / temperature
    pos = (q_scaled * positive).sum(dim=1)
    negatives = torch.logsumexp(q_scaled @ queue, dim=1)
    lse = torch.logaddexp(negatives, pos)
    return (lse - pos).mean()


def dense_correspondence(q_backbone: torch.Tensor, k_backbone: torch.Tensor) -> torch.Tensor:
    """For each query location, the index of the most similar key location (no gradient).

    Inputs are L2-normalised backbone features [N, C, Sq] and [N, C, Sk]; output [N, Sq].
    """
    with torch.no_grad():
        similarity = torch.bmm(q_backbone.transpose(1, 2), k_backbone)
        return similarity.max(dim=2)[1]


def densecl_losses(q, q_grid, q_backbone, k, k_grid, k_backbone, queue, queue2, temperature):
    """(L_global, L_dense) from normalised features (float32), as PROTOCOLS.md 1.2 steps 4-5."""
    loss_global = info_nce(q, k, queue, temperature)

    match = dense_correspondence(q_backbone, k_backbone)
    matched_k_grid = torch.gather(k_grid, 2, match.unsqueeze(1).expand(-1, k_grid.shape[1], -1))
    q_grid_flat = q_grid.transpose(1, 2).reshape(-1, q_grid.shape[1])                 # (N * S, D)
    matched_flat = matched_k_grid.transpose(1, 2).reshape(-1, matched_k_grid.shape[1])
    loss_dense = info_nce(q_grid_flat, matched_flat, queue2, temperature)
    return loss_global, loss_dense


@torch.no_grad()
def similarity_stats(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Mean cosines of the global branch: query-positive (`cos_pos`), query-negative over the
    whole queue (`cos_neg`) and between the distinct queries of the batch (`cos_batch`).

    Why: the loss alone cannot tell instance discrimination from collapse. A run whose queries
    all point one way (`cos_batch` near 1) can still lower the loss for a while by telling the
    current keys from the older ones in the queue (the key encoder drifts), and the loss then
    climbs back to log(K+1) as the drift slows. q, k (N, D) and queue (D, K) are normalised.
    Cheap: the means are taken through sums, never the N x K or N x N products.
    """
    n = q.shape[0]
    q_total = q.sum(dim=0)
    pos = (q * k).sum(dim=1).mean()
    neg = (q_total @ queue.sum(dim=1)) / (n * queue.shape[1])
    batch = ((q_total @ q_total - (q * q).sum()) / (n * (n - 1))) if n > 1 else torch.full_like(pos, float("nan"))
    return {"cos_pos": pos, "cos_neg": neg, "cos_batch": batch}


# --------------------------------------------------------------------------- shuffle-BN


@torch.no_grad()
def shuffle_for_bn(images: torch.Tensor, perm: torch.Tensor):
    """Reference `batch_shuffle_ddp`: gather the key images of all ranks, keep this rank's
    slice of the permuted global batch. Returns (local shuffled images, idx_unshuffle)."""
    gathered = dist_utils.all_gather_cat(images)
    perm = perm.to(images.device)
    if dist_utils.is_dist():
        torch.distributed.broadcast(perm, src=0)
    idx_unshuffle = torch.argsort(perm)
    local = images.shape[0]
    start = dist_utils.rank() * local
    return gathered[perm[start:start + local]], idx_unshuffle


@torch.no_grad()
def unshuffle_after_bn(x: torch.Tensor, idx_unshuffle: torch.Tensor) -> torch.Tensor:
    """Reference `batch_unshuffle_ddp`: gather the key outputs, take back this rank's images."""
    gathered = dist_utils.all_gather_cat(x)
    local = x.shape[0]
    start = dist_utils.rank() * local
    return gathered[idx_unshuffle[start:start + local]]


# --------------------------------------------------------------------------- the model


class DenseCL(nn.Module):
    """Query encoder (backbone + neck), momentum key encoder, two queues; forward = one step's loss."""

    def __init__(self, arch: str = "resnet50", feat_dim: int = 128, hid_dim: int = 0,
                 queue_len: int = 65536, momentum: float = 0.999, temperature: float = 0.2,
                 num_grid: Optional[int] = None, init_style: str = "fan_out", neck_norm: bool = False):
        super().__init__()
        self.backbone = ResNetTrunk(arch, init_style)
        in_dim = self.backbone.out_channels
        self.neck = DenseCLNeck(in_dim, hid_dim or in_dim, feat_dim, num_grid, init_style, neck_norm)
        # key encoder: a copy of the query encoder, never receives gradients
        self.backbone_k = copy.deepcopy(self.backbone)
        self.neck_k = copy.deepcopy(self.neck)
        for param in list(self.backbone_k.parameters()) + list(self.neck_k.parameters()):
            param.requires_grad = False
        self.momentum = momentum
        self.temperature = temperature
        self.queue_len = queue_len
        self.register_buffer("queue", F.normalize(torch.randn(feat_dim, queue_len), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        self.register_buffer("queue2", F.normalize(torch.randn(feat_dim, queue_len), dim=0))
        self.register_buffer("queue2_ptr", torch.zeros(1, dtype=torch.long))

    def compile_encoders(self, **compile_kwargs) -> None:
        """torch.compile the static part of the step: both encoders' backbone and neck.

        Uses `nn.Module.compile` (in place: the module's own `__call__` is compiled, nothing is
        wrapped), so the state-dict keys stay `backbone.*`, `neck.*`, ... with no `_orig_mod.`
        prefix, the optimizer and the momentum update keep working on the real parameters, and
        a DDP wrapper around this model sees the same parameters and hooks. The queue, shuffle-BN
        gathers, correspondence and enqueue stay eager (data-dependent / collective). Ghost-BN
        group counts are python attributes; dynamo guards on them (a changed count recompiles).
        """
        for module in (self.backbone, self.neck, self.backbone_k, self.neck_k):
            module.compile(**compile_kwargs)

    def query_parameters(self):
        return list(self.backbone.parameters()) + list(self.neck.parameters())

    def key_parameters(self):
        return list(self.backbone_k.parameters()) + list(self.neck_k.parameters())

    @torch.no_grad()
    def momentum_update(self) -> None:
        """theta_k <- m * theta_k + (1 - m) * theta_q, parameters only ([0x]/[DC]).

        Written as lerp (theta_k + (1 - m)(theta_q - theta_k)), the same update rounded as
        [1x]/MMPreTrain's mmengine ExponentialMovingAverage does it; one multi-tensor lerp
        instead of one kernel per parameter (~160 for a ResNet-50) on CUDA.
        """
        torch._foreach_lerp_(self.key_parameters(), [p.detach() for p in self.query_parameters()],
                             1.0 - self.momentum)

    @torch.no_grad()
    def enqueue(self, queue: torch.Tensor, ptr: torch.Tensor, keys: torch.Tensor) -> None:
        """Write the (all-gathered) keys at the pointer, move the pointer: the reference's
        `_dequeue_and_enqueue`. The slot indices are computed on the device from `ptr`, so the
        step never waits for the GPU here (the reference's `int(ptr)` does) and can be captured
        in a CUDA graph."""
        keys = dist_utils.all_gather_cat(keys)
        batch = keys.shape[0]
        if self.queue_len % batch:
            raise ValueError(f"queue_len {self.queue_len} is not divisible by the global batch {batch}")
        slots = ptr + torch.arange(batch, device=ptr.device)
        queue.index_copy_(1, slots, keys.T.to(queue.dtype))
        ptr.add_(batch).remainder_(self.queue_len)

    def encode(self, backbone: nn.Module, neck: nn.Module, images: torch.Tensor):
        """Normalised (global, dense [N,D,S^2], dense-GAP, backbone [N,C,S^2]) features in float32."""
        feature_map = backbone(images)
        global_proj, dense_proj, dense_gap = neck(feature_map)
        return (F.normalize(global_proj.float(), dim=1), F.normalize(dense_proj.float(), dim=1),
                F.normalize(dense_gap.float(), dim=1), F.normalize(feature_map.float().flatten(2), dim=1))

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor, perm: torch.Tensor,
                loss_lambda: float = 0.5, ghost_groups: int = 1) -> Dict[str, torch.Tensor]:
        """One training step's losses; enqueues the keys afterwards.

        perm: the global shuffle-BN permutation (length = global batch); rank 0's is used.
        ghost_groups: BN batches per process (1 = plain BN over this process's batch).
        """
        set_ghost_groups(self, ghost_groups)
        q, q_grid, _, q_backbone = self.encode(self.backbone, self.neck, im_q)
        with torch.no_grad():
            self.momentum_update()
            im_k_shuffled, idx_unshuffle = shuffle_for_bn(im_k, perm)
            k_features = self.encode(self.backbone_k, self.neck_k, im_k_shuffled)
            k, k_grid, k2, k_backbone = (unshuffle_after_bn(t, idx_unshuffle) for t in k_features)
        with torch.autocast(device_type=im_q.device.type, enabled=False):
            queue = self.queue.clone()
            loss_global, loss_dense = densecl_losses(q, q_grid, q_backbone, k, k_grid, k_backbone,
                                                     queue, self.queue2.clone(), self.temperature)
            stats = similarity_stats(q.detach(), k, queue)
        self.enqueue(self.queue, self.queue_ptr, k)
        self.enqueue(self.queue2, self.queue2_ptr, k2)
        loss = (1.0 - loss_lambda) * loss_global + loss_lambda * loss_dense
        return {"loss": loss, "loss_global": loss_global.detach(), "loss_dense": loss_dense.detach(), **stats}


def cosine_lr(base_lr: float, epoch: int, total_epochs: int, min_lr: float = 0.0) -> float:
    """Cosine annealing stepped per epoch (PROTOCOLS.md 1.6): lr_e = min + (base-min)(1+cos(pi e/E))/2."""
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * epoch / total_epochs))
