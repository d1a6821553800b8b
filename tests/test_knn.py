"""kNN: chunked top-k voting equals a dense numpy reference (written here from PROTOCOLS.md 5,
independently of densebench) for every bank size, chunking, query set and k; ties; accuracy."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from densebench.protocols.knn_imagenet import accuracy, knn_predict, topk_neighbours


def dense_neighbours(bank: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Bank indices of the min(k, N) most cosine-similar rows, most similar first, ties to the lower index."""
    bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    sims = queries @ bank.T
    return np.argsort(-sims, axis=1, kind="stable")[:, :min(k, bank.shape[0])], sims


def dense_knn(bank, bank_labels, queries, k, num_classes, temperature=0.07) -> np.ndarray:
    """Whole similarity matrix at once; each neighbour adds exp(sim / T) to its class; classes
    ranked by score (equal scores: lower class first); (Q, min(5, k)) class ids."""
    bank, queries = np.asarray(bank, np.float32), np.asarray(queries, np.float32)
    bank_labels = np.asarray(bank_labels)
    order, sims = dense_neighbours(bank, queries, k)
    weights = np.exp(np.take_along_axis(sims, order, axis=1) / np.float32(temperature))
    scores = np.zeros((queries.shape[0], num_classes), dtype=np.float32)
    for rank in range(order.shape[1]):              # accumulate in neighbour order
        np.add.at(scores, (np.arange(queries.shape[0]), bank_labels[order[:, rank]]), weights[:, rank])
    return np.argsort(-scores, axis=1, kind="stable")[:, :min(5, order.shape[1])]


def check_against_dense(bank, labels, queries, ks, num_classes, query_chunk, bank_chunk, device="cpu"):
    preds = knn_predict(bank, labels, queries, ks, num_classes, query_chunk=query_chunk, bank_chunk=bank_chunk,
                        device=device)
    for k in ks:
        expected = dense_knn(bank.numpy(), labels.numpy(), queries.numpy(), k, num_classes)
        assert preds[k].shape == expected.shape
        np.testing.assert_array_equal(preds[k].numpy(), expected, err_msg=f"k={k} bank_chunk={bank_chunk}")
    return preds


@pytest.mark.parametrize("bank_size", [150, 200, 230])        # below, equal to and above max k = 200
@pytest.mark.parametrize("bank_chunk", [1, 7, 50, 64, 200, 1000])  # dividing and not dividing the bank
def test_chunked_equals_dense_for_any_bank_size_and_chunking(bank_size, bank_chunk):
    gen = torch.Generator().manual_seed(bank_size)
    bank = torch.randn(bank_size, 24, generator=gen)
    labels = torch.arange(bank_size) % 37                       # many classes: every wrong neighbour shows
    # half the queries are noisy copies of rows in the last chunks, half are random
    near = bank[bank_size - 40: bank_size - 20] + 0.05 * torch.randn(20, 24, generator=gen)
    queries = torch.cat([near, torch.randn(13, 24, generator=gen)])
    check_against_dense(bank, labels, queries, (1, 3, 10, 20, 100, 200), 37, query_chunk=9, bank_chunk=bank_chunk)


def test_issue_18_repro_neighbours_in_later_chunks():
    """160 x 32 bank, queries = rows 100-119 + noise, bank_chunk 64: was 10 % top-1, dense gives 100 %."""
    gen = torch.Generator().manual_seed(0)
    bank = torch.randn(160, 32, generator=gen)
    labels = torch.arange(160) % 10
    queries = bank[100:120] + 0.01 * torch.randn(20, 32, generator=gen)
    for bank_chunk in (64, 262144):
        metrics = accuracy(knn_predict(bank, labels, queries, (10, 200), 10, bank_chunk=bank_chunk), labels[100:120])
        assert metrics["k10"]["top1"] == 100.0 and metrics["k200"]["top1"] == 100.0
    check_against_dense(bank, labels, queries, (10, 200), 10, query_chunk=500, bank_chunk=64)


def _exact_unit_rows(gen, rows, dim):
    """Rows with four entries of +-1 (norm 2): every cosine similarity is an exact multiple of 1/4,
    so many similarities tie exactly, whatever the summation order."""
    out = torch.zeros(rows, dim)
    for r in range(rows):
        cols = torch.randperm(dim, generator=gen)[:4]
        out[r, cols] = torch.randint(0, 2, (4,), generator=gen).float() * 2 - 1
    return out


@pytest.mark.parametrize("bank_chunk", [1, 3, 16, 25, 100])
def test_ties_go_to_the_lower_bank_index_for_any_chunking(bank_chunk):
    gen = torch.Generator().manual_seed(5)
    bank = _exact_unit_rows(gen, 75, 6)
    bank = torch.cat([bank, bank[:25]])                   # exact duplicates in a later chunk, too
    labels = torch.randint(0, 9, (100,), generator=gen)
    queries = _exact_unit_rows(gen, 30, 6)
    for k in (1, 4, 10, 37, 100, 150):
        _, idx = topk_neighbours(torch.nn.functional.normalize(bank), torch.nn.functional.normalize(queries),
                                 min(k, 100), bank_chunk)
        expected, _ = dense_neighbours(bank.numpy(), queries.numpy(), k)
        np.testing.assert_array_equal(idx.numpy(), expected)
    check_against_dense(bank, labels, queries, (1, 4, 10, 37, 100, 150), 9, query_chunk=7, bank_chunk=bank_chunk)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_equals_dense_with_ties_and_later_chunks():
    gen = torch.Generator().manual_seed(7)
    bank = torch.cat([_exact_unit_rows(gen, 300, 8)] * 2)           # every row twice: exact ties across chunks
    labels = torch.randint(0, 11, (600,), generator=gen)
    queries = torch.cat([_exact_unit_rows(gen, 40, 8), bank[550:580]])
    for bank_chunk in (64, 250, 600, 10000):
        check_against_dense(bank, labels, queries, (1, 10, 20, 100, 200, 1000), 11, query_chunk=16,
                            bank_chunk=bank_chunk, device="cuda")


@pytest.mark.parametrize("num_queries,query_chunk,bank_chunk", [(37, 500, 100000), (37, 4, 7), (3, 1, 5)])
def test_small_query_counts_and_chunks(num_queries, query_chunk, bank_chunk):
    gen = torch.Generator().manual_seed(0)
    bank = torch.randn(90, 16, generator=gen)
    labels = torch.randint(0, 12, (90,), generator=gen)
    queries = torch.randn(num_queries, 16, generator=gen)
    preds = check_against_dense(bank, labels, queries, (1, 3, 10, 20), 12, query_chunk, bank_chunk)
    assert preds[1].shape == (num_queries, 1) and preds[20].shape == (num_queries, 5)


def test_k_larger_than_bank_is_clipped():
    gen = torch.Generator().manual_seed(1)
    bank, labels = torch.randn(6, 4, generator=gen), torch.randint(0, 3, (6,), generator=gen)
    queries = torch.randn(5, 4, generator=gen)
    preds = knn_predict(bank, labels, queries, (200,), 3, bank_chunk=2)
    np.testing.assert_array_equal(preds[200].numpy(), dense_knn(bank.numpy(), labels.numpy(), queries.numpy(), 6, 3))


def test_non_finite_features_are_refused():
    from densebench.errors import InputError

    bank = torch.randn(8, 4)
    bank[3, 1] = float("nan")
    with pytest.raises(InputError, match="NaN or Inf"):
        knn_predict(bank, torch.zeros(8), torch.randn(2, 4), (2,), 1)


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
