"""Frozen-backbone feature extraction for the SVM and kNN protocols, with a shared cache.

* Preprocessing (PROTOCOLS.md 2.1 and 5): VOC = resize the shorter side to 256, then squash
  to exactly 224 x 224 (no crop); kNN = resize the shorter side to 256, centre crop 224.
  Both then ToTensor and ImageNet mean/std.
* Features: `densebench.evaluate.backbone.pooled_features` (feat1..feat5, the specified
  AvgPool2d, flattened C-major) or `gap_features` (layer4 global average pool), computed with
  the checkpoint's backbone in eval mode. Dimensions follow from the model and input size.
* Batched loading with `ctx.num_workers` workers, autocast (fp16) on CUDA when `amp`, rows
  sharded across ranks under torchrun (rank r takes rows r, r + W, ...) and gathered back in
  list order.
* Cache: one float32 .npy per (checkpoint fingerprint, dataset, split, layer, preprocessing,
  image list with each image's size and mtime) under `ctx.cache_dir`, written atomically by
  rank 0; an unreadable or truncated entry is recomputed with a logged note; a cached layer is read back
  instead of recomputed, so svm_voc07, lowshot_svm_voc07 and reruns share one extraction.
  The fingerprint is CheckpointInfo.backbone_hash (the backbone tensors), so the same weights
  in another file format hit the same cache.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from tqdm import tqdm

from densebench import distributed as dist_utils
from densebench.data.image import load_image
from densebench.evaluate.backbone import IMAGENET_MEAN, IMAGENET_STD, gap_features, pooled_features
from densebench.errors import InputError
from densebench.evaluate.context import RunContext
from densebench.io import numpy_save_atomic

log = logging.getLogger(__name__)

GAP = "gap"
FEATURE_CACHE_VERSION = 2        # 2: image sizes and mtimes in the key


@dataclass(frozen=True)
class Preprocess:
    """mode "squash": resize short side then resize to size x size; "center_crop": resize then crop."""
    mode: str
    resize_short: int
    size: int
    amp: bool = True            # fp16 autocast, only ever applied on CUDA

    def transform(self) -> transforms.Compose:
        if self.mode == "squash":
            geometry = [transforms.Resize(self.resize_short), transforms.Resize((self.size, self.size))]
        elif self.mode == "center_crop":
            geometry = [transforms.Resize(self.resize_short), transforms.CenterCrop(self.size)]
        else:
            raise ValueError(f"unknown preprocessing mode {self.mode!r}")
        return transforms.Compose(geometry + [transforms.ToTensor(),
                                              transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def key(self, device: torch.device) -> dict:
        out = asdict(self)
        out["amp"] = bool(self.amp and device.type == "cuda")   # what actually ran
        return out


def voc_preprocess(resize_short: int = 256, size: int = 224, amp: bool = True) -> Preprocess:
    return Preprocess("squash", resize_short, size, amp)


def knn_preprocess(resize_short: int = 256, size: int = 224, amp: bool = True) -> Preprocess:
    return Preprocess("center_crop", resize_short, size, amp)


class ImageListDataset(Dataset):
    """Images of a list, preprocessed; returns (tensor, row index)."""

    def __init__(self, paths: Sequence[Path], indices: Sequence[int], transform):
        self.paths = list(paths)
        self.indices = list(indices)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int):
        index = self.indices[item]
        return self.transform(load_image(self.paths[index])), index


def image_list_digest(paths: Sequence[Path]) -> str:
    """Hash of every image's resolved path, size and modification time (ns): replacing, editing
    or touching an image gives another cache entry (a full content hash would read every image)."""
    digest = hashlib.sha256()
    for path in paths:
        try:
            resolved = Path(path).resolve()
            stat = resolved.stat()
        except FileNotFoundError as exc:
            raise InputError(path, "image file not found") from exc
        except (OSError, RuntimeError) as exc:          # permissions, symlink loops
            raise InputError(path, f"cannot read image file ({exc})") from exc
        digest.update(f"{resolved}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def cache_file(cache_dir: Path, fingerprint: str, dataset: str, split: str, layer: str,
               preprocess: Preprocess, device: torch.device, paths: Sequence[Path]) -> Path:
    """cache_dir/<fingerprint>/<dataset>_<split>/<layer>-<hash of preprocessing + image list>.npy"""
    key = {"version": FEATURE_CACHE_VERSION, "preprocess": preprocess.key(device), "images": image_list_digest(paths),
           "count": len(paths)}
    key_hash = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / fingerprint / f"{dataset}_{split}" / f"{layer}-{key_hash}.npy"


def _read_cached(path: Path, rows: int) -> Optional[np.ndarray]:
    """The cached (rows, D) float32 array, or None (with a logged note) when the entry is absent,
    unreadable, truncated or of another shape: it is then recomputed and rewritten."""
    if not path.is_file():
        return None
    try:
        cached = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        log.warning("feature cache %s is unreadable (%s); recomputing it", path, exc)
        return None
    if cached.ndim != 2 or cached.shape[0] != rows or cached.dtype != np.float32:
        log.warning("feature cache %s holds a %s %s array, expected %d float32 rows; recomputing it",
                    path, cached.dtype, cached.shape, rows)
        return None
    return cached


def extract_features(ctx: RunContext, dataset: str, split: str, paths: Sequence[Path],
                     layers: Sequence[str], preprocess: Preprocess, batch_size: int = 256,
                     use_cache: bool = True) -> Dict[str, np.ndarray]:
    """{layer: float32 (N, D)} for the images in list order; layers are feat1..feat5 or "gap".

    Reads cached layers, computes only the missing ones (in one pass over the images).
    """
    model, info = ctx.backbone()
    fingerprint = f"{info.arch}-{info.backbone_hash}"
    files = {layer: cache_file(ctx.cache_dir, fingerprint, dataset, split, layer, preprocess, ctx.device, paths)
             for layer in layers}
    out: Dict[str, np.ndarray] = {}
    for layer, path in files.items():
        cached = _read_cached(path, len(paths)) if use_cache else None
        if cached is not None:
            out[layer] = cached
    missing = [layer for layer in layers if layer not in out]
    if missing:
        log.info("extracting %s %s %s for %d images", dataset, split, ",".join(missing), len(paths))
        computed = compute_features(model, paths, missing, preprocess, ctx.device, batch_size,
                                    ctx.num_workers, ctx.show_progress, desc=f"{dataset} {split}")
        for layer, array in computed.items():
            if use_cache and dist_utils.is_main():
                numpy_save_atomic(files[layer], array)
            out[layer] = array
        dist_utils.barrier()
    return {layer: out[layer] for layer in layers}


@torch.no_grad()
def compute_features(model: torch.nn.Module, paths: Sequence[Path], layers: Sequence[str],
                     preprocess: Preprocess, device: torch.device, batch_size: int = 256,
                     num_workers: int = 0, show_progress: bool = True, desc: str = "features") -> Dict[str, np.ndarray]:
    """Run the backbone over this rank's share of the images and gather all rows in list order."""
    model = model.to(device).eval()
    world, rank = dist_utils.world_size(), dist_utils.rank()
    indices = list(range(rank, len(paths), world))
    loader = DataLoader(ImageListDataset(paths, indices, preprocess.transform()), batch_size=batch_size,
                        shuffle=False, num_workers=num_workers, pin_memory=device.type == "cuda")
    use_amp = preprocess.amp and device.type == "cuda"
    local: Dict[str, List[torch.Tensor]] = {layer: [] for layer in layers}
    for images, _ in tqdm(loader, desc=desc, disable=not show_progress or not dist_utils.is_main()):
        images = images.to(device, non_blocking=True)
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
            feats = _forward(model, images, layers)
        for layer in layers:
            local[layer].append(feats[layer].float().cpu())
    return {layer: _gather_rows(local[layer], len(paths), model, device, layer, preprocess) for layer in layers}


def _forward(model, images, layers):
    pooled = [layer for layer in layers if layer != GAP]
    feats = pooled_features(model, images, pooled) if pooled else {}
    if GAP in layers:
        feats[GAP] = gap_features(model, images)
    return feats


def feature_dims(model: torch.nn.Module, layers: Sequence[str], size: int) -> Dict[str, int]:
    """Feature dimension per layer for a size x size input (probed with one dummy forward)."""
    model = model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        feats = _forward(model, torch.zeros(1, 3, size, size, device=device), layers)
    return {layer: int(feats[layer].shape[1]) for layer in layers}


def _gather_rows(chunks: List[torch.Tensor], total: int, model, device, layer, preprocess) -> np.ndarray:
    """Put rows back in list order; under torchrun all_gather the padded shards in blocks."""
    if chunks:
        mine = torch.cat(chunks)
    else:
        dim = feature_dims(model, [layer], preprocess.size)[layer]
        mine = torch.zeros(0, dim)
    world = dist_utils.world_size()
    if world == 1:
        return mine.numpy().astype(np.float32, copy=False)
    per_rank = -(-total // world)
    padded = torch.zeros(per_rank, mine.shape[1])
    padded[: mine.shape[0]] = mine
    comm_device = device if device.type == "cuda" else torch.device("cpu")
    out = np.zeros((total, mine.shape[1]), dtype=np.float32)
    block = 16384
    for start in range(0, per_rank, block):
        part = padded[start:start + block].to(comm_device)
        gathered = dist_utils.all_gather_cat(part).cpu().view(world, part.shape[0], -1)
        for r in range(world):
            rows = np.arange(start, start + part.shape[0]) * world + r       # global index of each row
            valid = rows < total
            out[rows[valid]] = gathered[r][torch.as_tensor(valid)].numpy()
    return out


def save_feature_file(ctx: RunContext, name: str, array: np.ndarray) -> Optional[Path]:
    """Write ctx.save_features_dir/<name>.npy (atomic, rank 0 only) when --save-features is set."""
    if ctx.save_features_dir is None or not dist_utils.is_main():
        return None
    path = Path(ctx.save_features_dir) / f"{name}.npy"
    numpy_save_atomic(path, array)
    return path
