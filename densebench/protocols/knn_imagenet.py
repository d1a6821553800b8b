"""ImageNet weighted k-NN (PROTOCOLS.md 5) on L2-normalised GAP features.

Memory bank = train features, queries = val features, both from layer4 + global average pool
(resize 256, centre crop 224). Cosine similarity; each of the k nearest neighbours votes for
its label with weight exp(sim / T), T = 0.07; classes ranked by summed votes; top-1 and top-5
(top-5 uses the first min(5, k) ranked classes, as the reference knn_classifier does).
The top max(k) neighbours are found once; every k uses a prefix of that list.
Memory is bounded: queries go in chunks of `query_chunk` rows and the bank in chunks of
`bank_chunk` rows, keeping only a running top-max(k) per query. Works for any number of
queries (the reference splits the queries into 100 chunks and fails below 100). When the bank
has fewer rows than a k, that k uses the whole bank (recorded in `extra`). Neighbours with equal
similarity are taken in bank order (lower index first), so the answer does not depend on the
chunk sizes (tests/test_knn.py checks it against a dense numpy kNN).
Ranking ties among classes with equal votes (e.g. zero-vote classes filling a top-5) are
broken by the lower class index (the reference's order there is unspecified).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Literal, Sequence, Tuple

import numpy as np
import torch

from densebench.config import PositiveFloat, PositiveInt
from densebench.data.imagenet import read_imagenet
from densebench.data.layout import imagenet_root
from densebench.errors import InputError
from densebench.evaluate.context import ProtocolOutput, RunContext
from densebench.evaluate.features import GAP, extract_features, knn_preprocess, save_feature_file

NAME = "knn_imagenet"
BACKENDS = ("torch", "faiss")


@dataclass
class Config:
    ks: Tuple[PositiveInt, ...] = (10, 20, 100, 200)  # 5: test_knn.py --num-knn default
    temperature: PositiveFloat = 0.07               # 5: T
    resize_short: PositiveInt = 256                 # 5: Resize 256, CenterCrop 224
    image_size: PositiveInt = 224
    batch_size: PositiveInt = 256                   # 5: extraction batch 256 per GPU
    amp: bool = True                                # fp16 autocast on CUDA (reference: fp32)
    query_chunk: PositiveInt = 500                  # 5: 50000 / 100 queries per chunk (no effect on results)
    bank_chunk: PositiveInt = 262144                # train rows per similarity block (memory bound)
    backend: Literal[BACKENDS] = "torch"            # "torch" or "faiss" (exact inner-product index)


def normalize_rows(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=1)


def topk_neighbours(bank: torch.Tensor, queries: torch.Tensor, k: int, bank_chunk: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(similarities, bank indices) of the k most similar bank rows per query, most similar first.

    Equal similarities go to the lower bank index, so the neighbours (and every k's prefix of
    them) are the same for any bank_chunk: the running best list is re-ranked after every block,
    including when it holds exactly k rows (k clipped to the bank size).
    """
    best_sim = torch.empty(queries.shape[0], 0, device=queries.device)
    best_idx = torch.empty(queries.shape[0], 0, dtype=torch.long, device=queries.device)
    for start in range(0, bank.shape[0], bank_chunk):
        block = bank[start:start + bank_chunk].to(queries.device, non_blocking=True)
        block_idx = torch.arange(start, start + block.shape[0], device=queries.device).expand(queries.shape[0], -1)
        # columns stay in bank order among equal similarities: earlier best rows have lower indices
        best_sim, best_idx = _top_in_column_order(torch.cat([best_sim, queries @ block.T], dim=1),
                                                  torch.cat([best_idx, block_idx], dim=1), k)
    return best_sim, best_idx


def _top_in_column_order(sims: torch.Tensor, idx: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The min(k, width) largest of each row, descending; of equal values the leftmost columns win
    and keep their order (torch.topk alone leaves both unspecified)."""
    take = min(k, sims.shape[1])
    kth = sims.topk(take, dim=1).values[:, -1:]
    above, at = sims > kth, sims == kth
    keep = above | (at & (at.cumsum(dim=1) <= take - above.sum(dim=1, keepdim=True)))
    cols = keep.nonzero()[:, 1].view(sims.shape[0], take)        # row-major: ascending columns
    sims, idx = sims.gather(1, cols), idx.gather(1, cols)
    order = sims.sort(dim=1, descending=True, stable=True).indices
    return sims.gather(1, order), idx.gather(1, order)


def vote(neighbour_sims: torch.Tensor, neighbour_labels: torch.Tensor, num_classes: int, k: int,
         temperature: float) -> torch.Tensor:
    """Classes ranked by summed exp(sim / T) of the first k neighbours: (Q, min(5, k)) class ids."""
    weights = (neighbour_sims[:, :k] / temperature).exp()
    scores = torch.zeros(neighbour_sims.shape[0], num_classes, device=neighbour_sims.device)
    scores.scatter_add_(1, neighbour_labels[:, :k], weights)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    return order[:, :min(5, k)]


def knn_predict(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, ks: Sequence[int],
                num_classes: int, temperature: float = 0.07, query_chunk: int = 500, bank_chunk: int = 262144,
                backend: str = "torch", device: "torch.device | str" = "cpu") -> Dict[int, torch.Tensor]:
    """{k: (Q, min(5, k)) predicted classes}; features are L2-normalised here; k clipped to the bank size."""
    device = torch.device(device)
    bank = normalize_rows(bank)
    queries = normalize_rows(queries)
    for name, rows in (("train (bank)", bank), ("val (query)", queries)):
        if not torch.isfinite(rows).all():
            raise InputError(None, f"{NAME}: {name} features contain NaN or Inf (non-finite checkpoint weights, "
                                   f"or fp16 overflow: try --set {NAME}.amp=false)")
    bank_labels = bank_labels.long().to(device)
    if device.type == "cuda":
        bank = bank.to(device)          # 1.28M x 2048 float32 = 10.5 GB: fits one GPU
    max_k = min(max(ks), bank.shape[0])
    search = _faiss_search(bank, max_k) if backend == "faiss" else None
    preds: Dict[int, list] = {k: [] for k in ks}
    for start in range(0, queries.shape[0], query_chunk):
        chunk = queries[start:start + query_chunk].to(device)
        if search is not None:
            sims, idx = search(chunk)
        else:
            sims, idx = topk_neighbours(bank, chunk, max_k, bank_chunk)
        labels = bank_labels[idx]
        for k in ks:
            preds[k].append(vote(sims, labels, num_classes, min(k, max_k), temperature).cpu())
    return {k: torch.cat(parts) if parts else torch.zeros(0, min(5, k), dtype=torch.long) for k, parts in preds.items()}


def _faiss_search(bank: torch.Tensor, k: int):
    try:
        import faiss
    except ImportError as exc:
        raise RuntimeError("knn backend 'faiss' needs the faiss package (pip install densebench[faiss])") from exc
    index = faiss.IndexFlatIP(bank.shape[1])
    index.add(np.ascontiguousarray(bank.cpu().numpy(), dtype=np.float32))

    def search(chunk: torch.Tensor):
        sims, idx = index.search(np.ascontiguousarray(chunk.cpu().numpy(), dtype=np.float32), k)
        return torch.from_numpy(sims).to(chunk.device), torch.from_numpy(idx).long().to(chunk.device)
    return search


def accuracy(preds: Dict[int, torch.Tensor], targets: torch.Tensor) -> Dict[str, Dict[str, float]]:
    """{"k10": {"top1": %, "top5": %}, ...}; top-5 counts a hit among the first min(5, k) classes."""
    targets = targets.long().view(-1, 1)
    out = {}
    for k, pred in preds.items():
        hits = pred.eq(targets)
        total = max(int(targets.shape[0]), 1)
        out[f"k{k}"] = {"top1": float(hits[:, :1].any(1).sum()) * 100.0 / total,
                        "top5": float(hits.any(1).sum()) * 100.0 / total}
    return out


def run(ctx: RunContext, cfg: Config) -> ProtocolOutput:
    if cfg.backend not in BACKENDS:
        raise ValueError(f"knn backend must be one of {BACKENDS}, got {cfg.backend!r}")
    root = imagenet_root(ctx.data_root)
    preprocess = knn_preprocess(cfg.resize_short, cfg.image_size, cfg.amp)
    splits = {}
    for split in ("train", "val"):
        items = read_imagenet(root, split)
        paths = [path for path, _ in items]
        labels = np.array([label for _, label in items], dtype=np.int64)
        feats = extract_features(ctx, "imagenet", split, paths, [GAP], preprocess, cfg.batch_size)[GAP]
        save_feature_file(ctx, f"imagenet_{split}_gap", feats)
        save_feature_file(ctx, f"imagenet_{split}_labels", labels)
        splits[split] = (feats, labels)
    (train_x, train_y), (val_x, val_y) = splits["train"], splits["val"]
    num_classes = int(max(train_y.max(initial=-1), val_y.max(initial=-1)) + 1)
    preds = knn_predict(torch.from_numpy(train_x), torch.from_numpy(train_y), torch.from_numpy(val_x), cfg.ks,
                        num_classes, cfg.temperature, cfg.query_chunk, cfg.bank_chunk, cfg.backend, ctx.device)
    metrics = accuracy(preds, torch.from_numpy(val_y))
    clipped = {f"k{k}": int(train_x.shape[0]) for k in cfg.ks if k > train_x.shape[0]}
    extra = {"num_classes": num_classes, "feature_dim": int(train_x.shape[1]),
             "k_clipped_to_bank_size": clipped}
    return ProtocolOutput(metrics=metrics, extra=extra,
                          data={"root": str(root), "splits": {"train": int(train_x.shape[0]), "val": int(val_x.shape[0])}})
