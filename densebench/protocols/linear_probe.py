"""The one linear-probe trainer shared by the four probe protocols (PROTOCOLS.md sections 3, 4, 12.5).

A frozen backbone (eval mode: its BatchNorm uses the pre-trained running statistics, no
gradient reaches it) feeds either
  * the multi-head probe (3a, 4): five heads on feat1..feat5, each the specified AvgPool2d
    (9216/9216/8192/9216/8192 dims for ResNet-50 at 224), BatchNorm2d(C, affine=False,
    momentum 0.1) synchronised across ranks, flatten, Linear(dim -> classes), or
  * the AvgPool probe (3b): global average pool, Linear(2048 -> classes), no BN.
Every head has its own cross-entropy; the losses are summed and trained in the same pass.

Each protocol module owns its config (paper values) and its train-time augmentation; this
module owns the data set wrapper, the heads, the loop, the metric and resume. A protocol
Config must provide the fields in `TRAINER_FIELDS` (plus `MULTI_HEAD_FIELDS` for
multi-head probes).

Reproducibility choices (recorded, not paper-visible):
  * the augmentation randomness of sample i in epoch e comes from (seed, e, i), and the
    shuffling from DistributedSampler(seed, epoch), so a run is the same for any number of
    ranks or data-loading workers and after a resume;
  * the global batch is fixed (256 in the paper) and split evenly over the ranks.
"""
from __future__ import annotations

import hashlib
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torchvision import transforms as T
from tqdm import tqdm

from densebench import distributed as dist_utils
from densebench.config import config_dict
from densebench.data.labelled import LabelledImages
from densebench.errors import InputError
from densebench.evaluate.backbone import IMAGENET_MEAN, IMAGENET_STD, LAYERS, forward_features, multi_pool
from densebench.evaluate.context import ProtocolOutput, RunContext
from densebench.evaluate.features import image_list_digest
from densebench.io import torch_save_atomic

log = logging.getLogger(__name__)

TRAINER_FIELDS = ("num_classes", "epochs", "lr", "momentum", "weight_decay", "nesterov", "lr_steps",
                  "lr_gamma", "batch_size", "init_std", "crop_size", "resize_size", "eval_interval",
                  "amp", "channels_last", "fast")
MULTI_HEAD_FIELDS = ("bn_momentum", "pooling")

# AlexNet PCA lighting noise on [0, 1] RGB ([0x] mmselfsup/datasets/pipelines/transforms.py::Lighting,
# PROTOCOLS.md 3a): eigenvalues and eigenvectors (one eigenvector per column of the rows below).
LIGHTING_EIGVAL = (0.2175, 0.0188, 0.0045)
LIGHTING_EIGVEC = ((-0.5675, 0.7192, 0.4009),
                   (-0.5808, -0.0045, -0.8140),
                   (-0.5836, -0.6948, 0.4203))

# Output grids of the specified pooling at 224 input (feat1 12x12 ... feat5 2x2). The "adaptive"
# pooling option reproduces these grids, hence the head dims, at any input size (a recorded
# deviation for small inputs, where the specified kernels do not fit).
ADAPTIVE_GRIDS = {"feat1": 12, "feat2": 6, "feat3": 4, "feat4": 3, "feat5": 2}
POOLINGS = ("specified", "adaptive")
STATE_FILE = "probe_state.pt"


# ----------------------------------------------------------------------------- data

class Lighting:
    """AlexNet-style PCA lighting noise, added to a [0, 1] RGB tensor (before Normalize).

    rgb_shift = eigvec @ (alpha * eigval), alpha ~ N(0, alphastd^2) per image, as in
    fb.resnet.torch and the [0x] pipeline.
    """

    def __init__(self, alphastd: float, eigval: Sequence[float] = LIGHTING_EIGVAL,
                 eigvec: Sequence[Sequence[float]] = LIGHTING_EIGVEC):
        self.alphastd = float(alphastd)
        self.eigval = torch.tensor(eigval, dtype=torch.float32)
        self.eigvec = torch.tensor(eigvec, dtype=torch.float32)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if self.alphastd == 0:
            return image
        alpha = torch.normal(0.0, self.alphastd, size=(3,))
        shift = (self.eigvec * (alpha * self.eigval).view(1, 3)).sum(dim=1)
        return image + shift.view(3, 1, 1).to(image.dtype)

    def __repr__(self) -> str:
        return f"Lighting(alphastd={self.alphastd})"


def normalize() -> T.Normalize:
    return T.Normalize(IMAGENET_MEAN, IMAGENET_STD)


def crop_flip_transform(crop_size: int, rrc_scale: Sequence[float]) -> T.Compose:
    """RandomResizedCrop (bilinear) + HFlip + Normalize: the AvgPool (3b) and iNat18 (4) train pipeline."""
    return T.Compose([
        T.RandomResizedCrop(crop_size, scale=tuple(rrc_scale), interpolation=T.InterpolationMode.BILINEAR),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        normalize(),
    ])


def test_transform(resize_size: int, crop_size: int) -> T.Compose:
    """Resize the short side (bilinear), centre crop, normalise: the test preprocessing of 3a/3b/4."""
    return T.Compose([T.Resize(resize_size, interpolation=T.InterpolationMode.BILINEAR),
                      T.CenterCrop(crop_size), T.ToTensor(), normalize()])


class CachedFeatures(Dataset):
    """Pre-computed head inputs (fast mode): index -> ({head: tensor}, label, index)."""

    def __init__(self, features: Dict[str, torch.Tensor], labels: torch.Tensor):
        self.features = features
        self.labels = labels

    def set_epoch(self, epoch: int) -> None:
        pass

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return {name: feats[index] for name, feats in self.features.items()}, int(self.labels[index]), index


def check_labels(items: Sequence[Tuple[Path, int]], num_classes: int, list_file: "str | Path") -> None:
    """Every label must lie in [0, num_classes): a wrong class count would silently truncate the probe."""
    if not items:
        raise InputError(list_file, "the list holds no samples")
    labels = np.fromiter((label for _, label in items), dtype=np.int64, count=len(items))
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        bad = low if low < 0 else high
        raise InputError(list_file, f"label {bad} is outside [0, {num_classes}) (num_classes={num_classes} "
                                    f"in the protocol config; the list's labels span {low}..{high})")


def label_source(dataset: str, dataset_root: Path, split: str) -> Path:
    """The file (or folder) whose labels the reader used for a split: named in label errors."""
    root = Path(dataset_root)
    if dataset == "imagenet":
        for candidate in (root / "meta" / f"{split}_labeled.txt", root / "meta" / f"{split}.txt"):
            if candidate.is_file():
                return candidate
        return root / split
    if dataset == "places205":
        from densebench.data.places205 import places205_list_file

        return places205_list_file(root, split)
    if dataset == "inat18":
        listed = root / "meta" / f"{split}.txt"
        return listed if listed.is_file() else root / f"{split}2018.json"
    raise ValueError(f"unknown probe dataset {dataset!r}")


def read_split(dataset: str, data_root: "str | Path", split: str) -> Tuple[List[Tuple[Path, int]], Path]:
    """(path, label) list of one split of imagenet / places205 / inat18, and its label source."""
    from densebench.data import layout

    if dataset == "imagenet":
        from densebench.data.imagenet import read_imagenet as reader
        root = layout.imagenet_root(data_root)
    elif dataset == "places205":
        from densebench.data.places205 import read_places205 as reader
        root = layout.places205_root(data_root)
    elif dataset == "inat18":
        from densebench.data.inat import read_inat18 as reader
        root = layout.inat18_root(data_root)
    else:
        raise ValueError(f"unknown probe dataset {dataset!r}")
    return reader(root, split), label_source(dataset, root, split)


def load_probe_data(dataset: str, data_root: "str | Path", num_classes: int):
    """Train and val lists with labels checked against num_classes; returns (train, val, record data)."""
    train_items, train_source = read_split(dataset, data_root, "train")
    val_items, val_source = read_split(dataset, data_root, "val")
    check_labels(train_items, num_classes, train_source)
    check_labels(val_items, num_classes, val_source)
    data = {"root": str(data_root), "splits": {"train": len(train_items), "val": len(val_items)},
            "lists": {"train": str(train_source), "val": str(val_source)}}
    return train_items, val_items, data


# ----------------------------------------------------------------------------- model

class FrozenBackbone(nn.Module):
    """A ResNet that never trains: no gradients, and always in eval mode (BN keeps its running stats).

    forward(x) returns the head inputs: for "multi", the pooled feat1..feat5 maps (N, C, h, w);
    for "avgpool", {"avgpool": (N, C)} (layer4 output, global average pooled).
    """

    def __init__(self, resnet: nn.Module, head: str, pooling: str = "specified"):
        super().__init__()
        if head not in ("multi", "avgpool"):
            raise ValueError(f"head must be 'multi' or 'avgpool', not {head!r}")
        if pooling not in POOLINGS:
            raise InputError(None, f"pooling must be one of {POOLINGS}, not {pooling!r}")
        self.resnet = resnet
        self.head = head
        self.pooling = pooling
        for param in self.resnet.parameters():
            param.requires_grad_(False)
        if head == "multi":
            self.pools = nn.ModuleDict({
                name: multi_pool(name) if pooling == "specified" else nn.AdaptiveAvgPool2d(ADAPTIVE_GRIDS[name])
                for name in LAYERS})
        super().train(False)

    def train(self, mode: bool = True) -> "FrozenBackbone":
        """Ignore train(): frozen_stages=4 keeps every stage, BN included, in eval mode."""
        return super().train(False)

    @property
    def names(self) -> Tuple[str, ...]:
        return LAYERS if self.head == "multi" else ("avgpool",)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        if self.head == "avgpool":
            fmap = forward_features(self.resnet, images, ["feat5"])["feat5"]
            return {"avgpool": fmap.mean(dim=(2, 3))}
        maps = forward_features(self.resnet, images, LAYERS)
        return {name: self.pools[name](fmap) for name, fmap in maps.items()}

    @torch.no_grad()
    def output_shapes(self, crop_size: int) -> Dict[str, Tuple[int, ...]]:
        """Per-head input shape (without batch) for a crop_size input, from a real forward pass."""
        param = next(self.resnet.parameters())
        probe = torch.zeros(1, 3, crop_size, crop_size, device=param.device, dtype=param.dtype)
        try:
            feats = self(probe)
        except RuntimeError as exc:
            raise InputError(None, f"the {self.pooling} pooling does not fit a {crop_size}px input ({exc}); "
                                   "use a larger crop_size or pooling=adaptive") from exc
        return {name: tuple(t.shape[1:]) for name, t in feats.items()}


class CpuSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d synchronised over gloo ranks on CPU, where torch's SyncBatchNorm is refused.

    Outside a multi-rank training step it is plain BatchNorm2d. Under torchrun it normalises
    with the mean and biased variance of the global batch (differentiable all_reduce) and
    updates the running statistics with the unbiased global variance, as nn.SyncBatchNorm
    does on GPUs (which is what `convert_sync_batchnorm` uses there).
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist_utils.is_dist() and dist_utils.world_size() > 1):
            return super().forward(input)
        from torch.distributed.nn.functional import all_reduce

        self._check_input_dim(input)
        dims = [0] + list(range(2, input.dim()))
        count = torch.tensor([float(input.numel() // input.shape[1])], dtype=input.dtype, device=input.device)
        total = all_reduce(torch.cat([input.sum(dims), count]))
        global_count = total[-1]
        mean = total[:-1] / global_count
        shape = [1, -1] + [1] * (input.dim() - 2)
        centred = input - mean.view(shape)
        var = all_reduce((centred * centred).sum(dims)) / global_count
        out = centred / torch.sqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                n = float(global_count)
                unbiased = var.detach() * (n / max(n - 1.0, 1.0))
                self.running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(unbiased, alpha=momentum)
        return out


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """The heads' BatchNorm2d -> SyncBatchNorm (torch's on GPU, CpuSyncBatchNorm on CPU), state kept."""
    if device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            sync = CpuSyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                    child.track_running_stats)
            sync.load_state_dict(child.state_dict())
            sync.train(child.training)
            setattr(module, name, sync)
        else:
            convert_sync_batchnorm(child, device)
    return module


class ProbeHeads(nn.Module):
    """One linear classifier per backbone output; forward returns {name: logits}."""

    def __init__(self, shapes: Dict[str, Tuple[int, ...]], num_classes: int, init_std: float,
                 bn_momentum: Optional[float]):
        super().__init__()
        heads = {}
        for name, shape in shapes.items():
            layers: List[nn.Module] = []
            if bn_momentum is not None:         # multi-head: BN(affine=False) on the pooled map
                layers.append(nn.BatchNorm2d(shape[0], affine=False, momentum=bn_momentum))
            layers.append(nn.Flatten(1))
            linear = nn.Linear(int(np.prod(shape)), num_classes)
            nn.init.normal_(linear.weight, 0.0, init_std)
            nn.init.zeros_(linear.bias)
            layers.append(linear)
            heads[name] = nn.Sequential(*layers)
        self.heads = nn.ModuleDict(heads)

    def input_dims(self) -> Dict[str, int]:
        return {name: head[-1].in_features for name, head in self.heads.items()}

    def forward(self, features: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return {name: head(features[name]) for name, head in self.heads.items()}


def build_heads(backbone: FrozenBackbone, cfg: Any, seed: int) -> ProbeHeads:
    """Heads sized by a real forward pass at cfg.crop_size; initialised from `seed`."""
    shapes = backbone.output_shapes(cfg.crop_size)
    bn_momentum = cfg.bn_momentum if backbone.head == "multi" else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ProbeHeads(shapes, cfg.num_classes, cfg.init_std, bn_momentum)


# ----------------------------------------------------------------------------- loop

def make_optimizer(heads: nn.Module, cfg: Any) -> torch.optim.SGD:
    """SGD on the head parameters only (norm_decay_mult 0 is a no-op: the BN has no parameters)."""
    params = [p for p in heads.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           nesterov=cfg.nesterov)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: Any) -> torch.optim.lr_scheduler.MultiStepLR:
    """Step decay per epoch (x lr_gamma at each epoch in lr_steps)."""
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(cfg.lr_steps), gamma=cfg.lr_gamma)


def per_rank_batch(global_batch: int, world: int) -> int:
    if global_batch % world:
        raise InputError(None, f"batch_size {global_batch} (the global batch) is not divisible by the "
                               f"world size {world}")
    return global_batch // world


def collate(batch):
    """Stack (inputs, label, index) triples; inputs are a tensor or a {name: tensor} dict."""
    inputs, labels, indices = zip(*batch)
    if isinstance(inputs[0], dict):
        stacked = {name: torch.stack([x[name] for x in inputs]) for name in inputs[0]}
    else:
        stacked = torch.stack(inputs)
    return stacked, torch.tensor(labels, dtype=torch.long), torch.tensor(indices, dtype=torch.long)


class Runtime:
    """Device, precision and memory format choices for one run (recorded in `extra`)."""

    def __init__(self, device: torch.device, amp: bool, channels_last: bool):
        self.device = device
        self.amp = bool(amp) and device.type == "cuda"
        self.channels_last = bool(channels_last) and device.type == "cuda"

    def describe(self) -> Dict[str, Any]:
        return {"device": str(self.device), "amp_dtype": "bfloat16" if self.amp else None,
                "channels_last": self.channels_last}

    def head_inputs(self, backbone: FrozenBackbone, batch) -> Dict[str, torch.Tensor]:
        """Backbone forward (frozen, no grad) or cached features -> float32 head inputs on device."""
        if isinstance(batch, dict):
            return {k: v.to(self.device, non_blocking=True).float() for k, v in batch.items()}
        images = batch.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            feats = backbone(images)
        return {k: v.float() for k, v in feats.items()}


def train_epoch(backbone: FrozenBackbone, heads: nn.Module, loader: DataLoader,
                optimizer: torch.optim.Optimizer, runtime: Runtime, epoch: int,
                max_steps: Optional[int] = None, show_progress: bool = False) -> Dict[str, float]:
    """One pass over the training data; each head's CE is summed into one backward. Returns mean losses."""
    heads.train()
    backbone.train()        # stays in eval mode: FrozenBackbone.train is a no-op
    loader.sampler.set_epoch(epoch)
    loader.dataset.set_epoch(epoch)
    names: List[str] = []
    totals: Optional[torch.Tensor] = None      # summed per-head losses, kept on the device (no sync per step)
    steps = 0
    bar = tqdm(loader, desc=f"probe epoch {epoch + 1}", disable=not show_progress or not dist_utils.is_main(),
               leave=False, dynamic_ncols=True)
    for batch, labels, _ in bar:
        feats = runtime.head_inputs(backbone, batch)
        labels = labels.to(runtime.device, non_blocking=True)
        logits = heads(feats)
        names = list(logits)
        losses = torch.stack([F.cross_entropy(logits[name], labels) for name in names])
        optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()
        optimizer.step()
        totals = losses.detach() if totals is None else totals + losses.detach()
        steps += 1
        if not bar.disable and steps % 20 == 1:
            bar.set_postfix(loss=f"{float(losses.sum()):.3f}")
        if max_steps is not None and steps >= max_steps:
            break
    if totals is None:
        return {}
    return {name: float(value) / steps for name, value in zip(names, totals.cpu())}


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: Iterable[int]) -> torch.Tensor:
    """Number of samples whose label is among the k highest logits, for each k (int64, logits' device)."""
    ks = list(ks)
    top = logits.topk(max(ks), dim=1).indices
    hits = top == labels.view(-1, 1)
    return torch.stack([hits[:, :k].any(dim=1).sum() for k in ks])


@torch.no_grad()
def evaluate(backbone: FrozenBackbone, heads: nn.Module, loader: DataLoader, runtime: Runtime,
             num_classes: int, show_progress: bool = False) -> Dict[str, Dict[str, float]]:
    """Top-1/top-5 (percent) per head over this rank's shard, summed over ranks."""
    heads.eval()
    names = list(heads.heads.keys())
    ks = (1, min(5, num_classes))
    counts = torch.zeros(len(names), 2, dtype=torch.int64, device=runtime.device)
    seen = 0
    for batch, labels, _ in tqdm(loader, desc="probe eval", leave=False, dynamic_ncols=True,
                                 disable=not show_progress or not dist_utils.is_main()):
        feats = runtime.head_inputs(backbone, batch)
        labels = labels.to(runtime.device)
        logits = heads(feats)
        for row, name in enumerate(names):
            counts[row] += topk_correct(logits[name].float(), labels, ks)
        seen += len(labels)
    totals = torch.cat([counts.flatten(), torch.tensor([seen], dtype=torch.int64, device=runtime.device)])
    if dist_utils.is_dist():
        dist.all_reduce(totals)
    totals = totals.cpu()
    counts, seen_all = totals[:-1].view(len(names), 2), float(totals[-1])
    return {name: {"top1": round(100.0 * float(counts[row, 0]) / seen_all, 4),
                   "top5": round(100.0 * float(counts[row, 1]) / seen_all, 4)}
            for row, name in enumerate(names)}


# ----------------------------------------------------------------------------- fast mode

@torch.no_grad()
def extract_features(backbone: FrozenBackbone, dataset: Dataset, runtime: Runtime, batch_size: int,
                     num_workers: int, show_progress: bool) -> Dict[str, torch.Tensor]:
    """Head inputs of every sample (float32, CPU), computed once; each rank extracts an interleaved
    shard and the shards are gathered, so every rank ends with the whole set in dataset order.

    Held in memory: meant for quick iterations on small sets (the five ResNet-50 multi-head
    inputs are 44,032 floats per image, ~225 GB for all of ImageNet train)."""
    world, rank = dist_utils.world_size(), dist_utils.rank()
    n = len(dataset)
    per_rank = math.ceil(n / world)
    indices = [min(rank + j * world, n - 1) for j in range(per_rank)]   # pad with the last sample
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, collate_fn=collate)
    parts: Dict[str, List[torch.Tensor]] = {}
    for images, _, _ in tqdm(loader, desc="probe features", leave=False, dynamic_ncols=True,
                             disable=not show_progress or not dist_utils.is_main()):
        for name, feats in runtime.head_inputs(backbone, images).items():
            parts.setdefault(name, []).append(feats.cpu())
    out = {}
    for name, chunks in parts.items():
        local = torch.cat(chunks)
        if world > 1:
            gathered = dist_utils.all_gather_cat(local.to(runtime.device)).cpu()
            # gathered = [rank0 shard, rank1 shard, ...]; sample rank + j*world sits at row rank*per_rank + j
            local = gathered.view(world, per_rank, *local.shape[1:]).transpose(0, 1).reshape(
                world * per_rank, *local.shape[1:])[:n]
        out[name] = local.contiguous()
    return out


# ----------------------------------------------------------------------------- resume

def rng_state() -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def save_state(path: Path, heads: nn.Module, optimizer, scheduler, epoch: int,
               history: List[Dict[str, Any]], config: Dict[str, Any]) -> None:
    """Everything to continue after `epoch` completed epochs; written atomically by rank 0."""
    if dist_utils.is_main():
        torch_save_atomic({"densebench": {"kind": "linear_probe_state", "version": 1},
                           "heads": heads.state_dict(), "optimizer": optimizer.state_dict(),
                           "scheduler": scheduler.state_dict(), "epoch": epoch, "history": history,
                           "config": config, "rng": rng_state()}, path)
    dist_utils.barrier()


def data_identity(train_items: Sequence[Tuple[Path, int]], val_items: Sequence[Tuple[Path, int]]) -> Dict[str, str]:
    """Which images (path, size, mtime) and labels the probe trains and tests on. Stored in the
    resume state with the config: a state from other data (images replaced, same work dir) is
    refused instead of being continued as if it were this run."""
    out = {}
    for name, items in (("train", train_items), ("val", val_items)):
        labels = np.asarray([label for _, label in items], dtype=np.int64)
        label_hash = hashlib.sha256(labels.tobytes()).hexdigest()[:16]
        out[name] = f"{image_list_digest([path for path, _ in items])}-{label_hash}"
    return out


def load_state(path: Path, heads: nn.Module, optimizer, scheduler, config: Dict[str, Any]):
    """Restore a probe state; returns (epochs done, history). A state of another config is refused."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  (any unreadable file is bad input here)
        raise InputError(path, f"cannot read the probe resume state ({exc}); delete it to start over") from exc
    if not isinstance(state, dict) or state.get("densebench", {}).get("kind") != "linear_probe_state":
        raise InputError(path, "not a densebench linear-probe resume state; delete it to start over")
    if state["config"] != config:
        raise InputError(path, "the resume state was written for a different probe config or data set "
                               "(images or labels); delete it or use another work dir")
    heads.load_state_dict(state["heads"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return int(state["epoch"]), list(state["history"])


# ----------------------------------------------------------------------------- driver

def check_config(cfg: Any, head: str) -> None:
    needed = TRAINER_FIELDS + (MULTI_HEAD_FIELDS if head == "multi" else ())
    missing = [name for name in needed if not hasattr(cfg, name)]
    if missing:
        raise TypeError(f"{type(cfg).__qualname__} lacks probe fields {missing}")
    if cfg.eval_interval < 1 or cfg.epochs < 1:
        raise InputError(None, "epochs and eval_interval must be >= 1")
    if getattr(cfg, "decode", "cpu") not in ("cpu", "device"):
        raise InputError(None, f"decode must be 'cpu' or 'device', not {cfg.decode!r}")


def reported_epoch(epochs: int, eval_interval: int) -> int:
    """The epoch of the reference's last evaluation, whose accuracy it reports.

    Its evaluation hook (mmcv EvalHook in [0x], ValidateHook in OpenSelfSup) runs after each
    epoch that is a multiple of eval_interval and adds none at the end: Places205 (28 epochs,
    interval 10) was last evaluated at epoch 20, iNat18 (84, 10) at 80; ImageNet (90, 10 and
    100, 1) at its final epoch. With fewer epochs than the interval, the final epoch.
    """
    return (epochs // eval_interval) * eval_interval or epochs


def probe_metrics(history: List[Dict[str, Any]], epochs: int, eval_interval: int) -> Dict[str, Any]:
    """Each head at reported_epoch (the number comparable to the reference's), with the epoch it
    was measured at; when training went on after it, the final epoch's under `at_final_epoch`."""
    by_epoch = {entry["epoch"]: entry for entry in history}
    reported = by_epoch[reported_epoch(epochs, eval_interval)]
    metrics: Dict[str, Any] = {name: dict(values, epoch=reported["epoch"])
                               for name, values in reported["heads"].items()}
    last = history[-1]
    if last["epoch"] != reported["epoch"]:
        metrics["at_final_epoch"] = {name: dict(values, epoch=last["epoch"]) for name, values in last["heads"].items()}
    return metrics


@dataclass
class Probe:
    """Everything one probe run trains with, wired for the current rank."""
    backbone: FrozenBackbone
    heads: ProbeHeads                 # the bare heads (evaluation, state dicts)
    trained: nn.Module                # the heads as trained: DDP-wrapped under torchrun
    optimizer: torch.optim.SGD
    scheduler: torch.optim.lr_scheduler.MultiStepLR
    train_loader: DataLoader
    val_loader: DataLoader
    runtime: Runtime
    head_dims: Dict[str, int]
    per_rank_batch: int
    world_size: int


def prepare_probe(ctx: RunContext, cfg: Any, head: str, train_items: Sequence[Tuple[Path, int]],
                  val_items: Sequence[Tuple[Path, int]], train_transform: Callable) -> Probe:
    """Frozen backbone, heads (sized by a forward pass), loaders, optimiser and schedule."""
    check_config(cfg, head)
    world = dist_utils.world_size()
    batch = per_rank_batch(cfg.batch_size, world)
    runtime = Runtime(ctx.device, cfg.amp, cfg.channels_last)
    resnet, _ = ctx.backbone()
    backbone = FrozenBackbone(resnet, head, getattr(cfg, "pooling", "specified"))
    heads = build_heads(backbone, cfg, ctx.seed)
    backbone.to(ctx.device)
    if runtime.channels_last:
        backbone.to(memory_format=torch.channels_last)
    heads.to(ctx.device)
    log.info("probe heads %s, global batch %d = %d x %d ranks", heads.input_dims(), cfg.batch_size, batch, world)

    eval_tf = test_transform(cfg.resize_size, cfg.crop_size)
    batch_collate = collate
    if cfg.fast:
        def cached(items):
            feats = extract_features(backbone, LabelledImages(items, eval_tf, ctx.seed), runtime, batch,
                                     ctx.num_workers, ctx.show_progress)
            return CachedFeatures(feats, torch.tensor([label for _, label in items]))
        train_set, val_set, workers = cached(train_items), cached(val_items), 0
    else:
        images = LabelledImages
        if getattr(cfg, "decode", "cpu") == "device":     # JPEG decode + augmentation on ctx.device
            from densebench.data.gpu_decode import EncodedImages, collate_encoded
            images, batch_collate = EncodedImages, collate_encoded
        train_set = images(train_items, train_transform, ctx.seed)
        val_set = images(val_items, eval_tf, ctx.seed)
        workers = ctx.num_workers
    sampler = DistributedSampler(train_set, num_replicas=world, rank=dist_utils.rank(), shuffle=True,
                                 seed=ctx.seed, drop_last=False)
    pin = ctx.device.type == "cuda"
    train_loader = DataLoader(train_set, batch_size=batch, sampler=sampler, num_workers=workers,
                              collate_fn=batch_collate, pin_memory=pin, drop_last=False)
    val_shard = Subset(val_set, list(range(dist_utils.rank(), len(val_set), world)))
    val_loader = DataLoader(val_shard, batch_size=batch, shuffle=False, num_workers=workers,
                            collate_fn=batch_collate, pin_memory=pin)

    trained: nn.Module = heads
    if dist_utils.is_dist():
        heads = convert_sync_batchnorm(heads, ctx.device)
        trained = nn.parallel.DistributedDataParallel(
            heads, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    optimizer = make_optimizer(heads, cfg)
    return Probe(backbone, heads, trained, optimizer, make_scheduler(optimizer, cfg), train_loader, val_loader,
                 runtime, heads.input_dims(), batch, world)


def run_probe(ctx: RunContext, cfg: Any, head: str, train_items: Sequence[Tuple[Path, int]],
              val_items: Sequence[Tuple[Path, int]], train_transform: Callable,
              data: Dict[str, Any]) -> ProtocolOutput:
    """Train and evaluate a linear probe per the protocol config; resumable from ctx.work_dir.

    Evaluates every cfg.eval_interval epochs and after the last one; the metrics are those of
    the reference's last evaluation (probe_metrics). The state (heads, optimiser, schedule,
    epoch, history, RNG) is saved atomically after every epoch.
    """
    probe = prepare_probe(ctx, cfg, head, train_items, val_items, train_transform)
    state_path = Path(ctx.work_dir) / STATE_FILE
    config = dict(config_dict(cfg), data=data_identity(train_items, val_items))
    start_epoch, history = 0, []
    if state_path.is_file():
        start_epoch, history = load_state(state_path, probe.heads, probe.optimizer, probe.scheduler, config)
        log.info("resumed the probe after epoch %d from %s", start_epoch, state_path)

    for epoch in range(start_epoch, cfg.epochs):
        losses = train_epoch(probe.backbone, probe.trained, probe.train_loader, probe.optimizer, probe.runtime,
                             epoch, show_progress=ctx.show_progress)
        probe.scheduler.step()
        done = epoch + 1
        if done % cfg.eval_interval == 0 or done == cfg.epochs:
            scores = evaluate(probe.backbone, probe.heads, probe.val_loader, probe.runtime, cfg.num_classes,
                              ctx.show_progress)
            history.append({"epoch": done, "heads": scores, "train_loss": losses})
            log.info("probe epoch %d: top-1 %s", done, {k: v["top1"] for k, v in scores.items()})
        save_state(state_path, probe.heads, probe.optimizer, probe.scheduler, done, history, config)

    extra = {"history": history, "head_dims": probe.head_dims, "global_batch": cfg.batch_size,
             "per_rank_batch": probe.per_rank_batch, "world_size": probe.world_size,
             "runtime": probe.runtime.describe(), "resumed_from_epoch": start_epoch,
             "augmentation": None if cfg.fast else repr(train_transform),
             "decode": "cached features" if cfg.fast else getattr(cfg, "decode", "cpu"),
             "sampling": "DistributedSampler(seed, epoch); augmentation RNG per (seed, epoch, sample index)"}
    if cfg.fast:
        extra["not_comparable"] = ("fast mode: heads trained on features cached once from the test-time "
                                   "preprocessing, without augmentation")
    return ProtocolOutput(metrics=probe_metrics(history, cfg.epochs, cfg.eval_interval), data=data, extra=extra)
