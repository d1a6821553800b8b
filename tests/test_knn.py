"""kNN: chunked top-k voting equals a dense reference; clipping, small query counts, accuracy."""
from __future__ import annotations

import pytest
import torch

from densebench.protocols.knn_imagenet import accuracy, knn_predict


def dense_reference(bank, bank_labels, queries, k, num_classes, temperature=0.07):
    """The whole similarity matrix at once, straight from PROTOCOLS.md 5."""
    bank = bank / bank.norm(dim=1, keepdim=True)
    queries = queries / queries.norm(dim=1, keepdim=True)
    sims = queries @ bank.T
    k = min(k, bank.shape[0])
    top_sim, top_idx = sims.topk(k, dim=1)
    scores = torch.zeros(queries.shape[0], num_classes)
    for q in range(queries.shape[0]):
        for s, i in zip(top_sim[q], top_idx[q]):
            scores[q, bank_labels[i]] += torch.exp(s / temperature)
    return torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :min(5, k)]


@pytest.mark.parametrize("num_queries,query_chunk,bank_chunk", [(37, 500, 100000), (37, 4, 7), (3, 1, 5)])
def test_chunked_equals_dense(num_queries, query_chunk, bank_chunk):
    gen = torch.Generator().manual_seed(0)
    bank = torch.randn(90, 16, generator=gen)
    labels = torch.randint(0, 12, (90,), generator=gen)
    queries = torch.randn(num_queries, 16, generator=gen)
    ks = (1, 3, 10, 20)
    preds = knn_predict(bank, labels, queries, ks, 12, query_chunk=query_chunk, bank_chunk=bank_chunk)
    for k in ks:
        assert preds[k].shape == (num_queries, min(5, k))
        assert torch.equal(preds[k], dense_reference(bank, labels, queries, k, 12))


def test_k_larger_than_bank_is_clipped():
    gen = torch.Generator().manual_seed(1)
    bank, labels = torch.randn(6, 4, generator=gen), torch.randint(0, 3, (6,), generator=gen)
    queries = torch.randn(5, 4, generator=gen)
    preds = knn_predict(bank, labels, queries, (200,), 3, bank_chunk=2)
    assert torch.equal(preds[200], dense_reference(bank, labels, queries, 6, 3))


def test_accuracy_and_separable_clusters():
    gen = torch.Generator().manual_seed(2)
    centers = torch.randn(4, 32, generator=gen) * 5
    bank_labels = torch.arange(4).repeat_interleave(20)
    bank = centers[bank_labels] + torch.randn(80, 32, generator=gen)
    val_labels = torch.tensor([0, 1, 2, 3, 0])
    queries = centers[val_labels] + torch.randn(5, 32, generator=gen)
    metrics = accuracy(knn_predict(bank, bank_labels, queries, (10, 20), 4, query_chunk=2, bank_chunk=9), val_labels)
    assert metrics["k10"] == {"top1": 100.0, "top5": 100.0}
    preds = {1: torch.tensor([[2], [1]]), 10: torch.tensor([[2, 0, 1, 3, 4], [0, 2, 3, 4, 5]])}
    assert accuracy(preds, torch.tensor([0, 1])) == {"k1": {"top1": 50.0, "top5": 50.0},
                                                     "k10": {"top1": 0.0, "top5": 50.0}}
