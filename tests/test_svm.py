"""VOC07 SVM / low-shot: AP definitions, the batched solver vs sklearn LinearSVC, the pipelines."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from densebench.protocols.svm_solver import (KernelRows, SVMProblems, augment_intercept, fit_svms, fit_svms_sklearn,
                                             gram_matrix, l2_normalize, matmul, solve_kernel_newton,
                                             top_eigenpairs)
from densebench.protocols.voc_svm_common import (REFERENCE_COSTS, SolverOptions, aggregate_lowshot,
                                                 batched_envelope_ap, batched_ranking_ap, cheaper_lowshot_route,
                                                 class_ap_on_test, full_svm_sweep, lowshot_fit_and_test,
                                                 lowshot_groups,
                                                 lowshot_rng, ranking_ap, sample_lowshot_targets,
                                                 scores_through_test_kernel, synthetic_voc_features,
                                                 voc_envelope_ap)


def test_reference_cost_grid():
    assert len(REFERENCE_COSTS) == 19
    assert REFERENCE_COSTS[:4] == (1.0, 10.0, 100.0, 0.0625)
    assert REFERENCE_COSTS[-1] == pytest.approx(1.9073486328125e-06)


def test_envelope_ap_hand_worked():
    # ranking: neg, pos, pos -> precision at the positives 1/2, 2/3; envelope lifts the first to 2/3
    scores = np.array([0.9, 0.8, 0.7])
    positives = np.array([False, True, True])
    assert voc_envelope_ap(scores, positives) == pytest.approx(2 / 3)
    assert ranking_ap(scores, positives) == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3)
    # pos, neg, pos, neg: precisions 1, 2/3 -> envelope AP = 0.5 * 1 + 0.5 * 2/3
    assert voc_envelope_ap(np.array([4.0, 3.0, 2.0, 1.0]), np.array([1, 0, 1, 0], bool)) == pytest.approx(5 / 6)
    assert voc_envelope_ap(np.array([1.0, 2.0]), np.array([0, 0], bool)) == 0.0


def test_envelope_ap_equals_sklearn_when_precision_is_monotone():
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(5, 40))
        scores = rng.normal(size=n)
        positives = rng.random(n) < 0.4
        if not positives.any():
            continue
        order = np.argsort(-scores)
        # make precision non-increasing over positives: put every positive before every negative
        ranked = np.sort(positives[order])[::-1]
        positives_sorted = np.empty_like(positives)
        positives_sorted[order] = ranked
        assert voc_envelope_ap(scores, positives_sorted) == pytest.approx(
            average_precision_score(positives_sorted, scores))
        # and in general the envelope is never below sklearn's AP
        assert voc_envelope_ap(scores, positives) >= average_precision_score(positives, scores) - 1e-12


def test_ranking_ap_matches_sklearn_with_ties():
    rng = np.random.default_rng(1)
    for i in range(100):
        n = int(rng.integers(2, 60))
        scores = rng.integers(0, 4, n).astype(float) if i % 2 else rng.normal(size=n)
        positives = rng.random(n) < 0.3
        if positives.any():
            assert ranking_ap(scores, positives) == pytest.approx(average_precision_score(positives, scores), abs=1e-12)


def test_test_ap_drops_difficult():
    scores = np.array([3.0, 2.0, 1.0])
    targets = np.array([-1, 0, 1], dtype=np.int8)           # difficult row ranked first is ignored
    assert class_ap_on_test(scores, targets) == pytest.approx(0.5)


def _objective(x, models, problems):
    w = np.c_[models.weights, models.bias]
    xt = np.c_[x, np.ones(len(x))]
    viol = np.clip(1 - problems.labels * (xt @ w.T).T, 0, None)
    return 0.5 * (w * w).sum(1) + (problems.row_costs() * viol * viol).sum(1)


@pytest.mark.parametrize("rows,dim", [(120, 300), (300, 40)])   # Gram route (N <= D) and covariance route
def test_solver_reaches_liblinear_optimum(rows, dim):
    rng = np.random.default_rng(2)
    x = l2_normalize(np.abs(rng.normal(size=(rows, dim))) + (rng.random((rows, 1)) < 0.3))
    labels = np.where(rng.random((4, rows)) < 0.25, 1, -1)
    mask = rng.random((4, rows)) < 0.8
    problems = SVMProblems(labels, mask, np.array([10.0, 1.0, 0.0625, 0.5 ** 12]))
    ours = fit_svms(x, problems, backend="torch")
    ref = fit_svms_sklearn(x, problems, tol=1e-8, max_iter=100000)
    np.testing.assert_allclose(_objective(x, ours, problems), _objective(x, ref, problems), rtol=1e-6)
    np.testing.assert_allclose(ours.weights, ref.weights, atol=2e-3)
    np.testing.assert_allclose(ours.bias, ref.bias, atol=2e-3)
    # rows outside a problem's mask do not influence it
    x_changed = x.copy()
    x_changed[~mask[0]] = 0.5
    other = fit_svms(x_changed, SVMProblems(labels[:1], mask[:1], problems.costs[:1]))
    np.testing.assert_allclose(other.weights, ours.weights[:1], atol=1e-4)


def test_solver_float32_close():
    rng = np.random.default_rng(3)
    x = l2_normalize(rng.random((80, 200)))
    problems = SVMProblems(np.where(rng.random((3, 80)) < 0.3, 1, -1), np.ones((3, 80), bool), np.array([1.0, 0.01, 1e-4]))
    a = fit_svms(x, problems, dtype=torch.float64)
    b = fit_svms(x, problems, dtype=torch.float32, tol=1e-4)
    np.testing.assert_allclose(a.decision(x), b.decision(x), atol=1e-3)


def test_full_sweep_matches_sklearn_reference_on_random_features():
    train_x, train_t, test_x, test_t = synthetic_voc_features(150, 150, 256, seed=0, signal=0.25)
    ours = full_svm_sweep(train_x, train_t, test_x, test_t)
    ref = full_svm_sweep(train_x, train_t, test_x, test_t, options=SolverOptions(backend="sklearn"))
    assert abs(ours.mean_ap - ref.mean_ap) <= 0.1
    assert 20.0 < ours.mean_ap < 100.0
    assert (ours.cv_scores.argmax(1) == ref.cv_scores.argmax(1)).mean() >= 0.9


def test_lowshot_sampling_rule():
    _, train_t, _, _ = synthetic_voc_features(400, 10, 8, seed=1)
    sample = sample_lowshot_targets(train_t, 2, lowshot_rng(0, 0, 2))
    for c in range(20):
        assert (sample[:, c] == 1).sum() == min(2, (train_t[:, c] == 1).sum())
        assert (sample[:, c] == 0).sum() == 38
        assert np.all(train_t[sample[:, c] == 1, c] == 1)
        assert np.all(train_t[sample[:, c] == 0, c] == 0)          # difficult never sampled
    again = sample_lowshot_targets(train_t, 2, lowshot_rng(0, 0, 2))
    other = sample_lowshot_targets(train_t, 2, lowshot_rng(0, 1, 2))
    assert np.array_equal(sample, again) and not np.array_equal(sample, other)


def test_lowshot_matches_sklearn_reference_and_aggregation():
    train_x, train_t, test_x, test_t = synthetic_voc_features(300, 150, 128, seed=4, signal=0.3)
    costs = REFERENCE_COSTS[::3]
    for k in (1, 2):
        samples = [sample_lowshot_targets(train_t, k, random.Random(s)) for s in range(2)]
        ours = lowshot_fit_and_test(train_x, samples, test_x, test_t, costs)
        ref = lowshot_fit_and_test(train_x, samples, test_x, test_t, costs, SolverOptions(backend="sklearn"))
        assert ours.shape == (2, len(costs), 20)
        a, b = aggregate_lowshot(ours, costs), aggregate_lowshot(ref, costs)
        assert abs(a["mAP"] - b["mAP"]) <= 0.1
        maps = ours.mean(axis=2) * 100
        best = maps.mean(axis=0).argmax()
        assert a["mAP"] == pytest.approx(maps[:, best].mean())
        assert a["min"] == pytest.approx(maps[:, best].min()) and a["cost"] == costs[best]


# ----------------------------------------------------------------------------- batched torch paths

@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_batched_aps_match_per_problem_definitions(dtype):
    """float32 takes the packed-key sort of the low-shot test scores: ties (negative ones, and -0.0
    beside +0.0) must keep column order, dropped rows must not count."""
    rng = np.random.default_rng(5)
    for i in range(40):
        n = int(rng.integers(2, 40))
        scores = rng.integers(-2, 3, (6, n)).astype(float) if i % 2 else rng.normal(size=(6, n))
        if i % 4 == 1:
            scores *= 0.0                                            # +0.0 and -0.0 ties
        scores = scores.astype(dtype)
        positives = rng.random((6, n)) < 0.3
        keep = rng.random((6, n)) < 0.8
        env = batched_envelope_ap(torch.tensor(scores), torch.tensor(positives), torch.tensor(keep)).numpy()
        rank = batched_ranking_ap(torch.tensor(scores), torch.tensor(positives), torch.tensor(keep)).numpy()
        for p in range(6):
            kept = keep[p]
            assert env[p] == pytest.approx(voc_envelope_ap(scores[p][kept], positives[p][kept]), abs=1e-12)
            assert rank[p] == pytest.approx(ranking_ap(scores[p][kept], positives[p][kept]), abs=1e-12)


def test_grouped_solver_with_padding_and_warm_start_reaches_liblinear_optimum():
    rng = np.random.default_rng(6)
    x = l2_normalize(np.abs(rng.normal(size=(90, 50))) + (rng.random((90, 1)) < 0.3))
    samples = []
    for _ in range(2):                                   # two "samples" of 3 classes, uneven group sizes
        sample = -np.ones((90, 3), dtype=np.int8)
        for c in range(3):
            rows = rng.choice(90, size=12 + 5 * c, replace=False)
            sample[rows, c] = (rng.random(len(rows)) < 0.3).astype(np.int8)
            sample[rows[0], c] = 1
        samples.append(sample)
    rows, valid, labels = lowshot_groups(samples)
    assert rows.shape == (6, 22) and valid.sum() == 2 * (12 + 17 + 22)
    xt = torch.as_tensor(np.c_[x, np.ones(90)])
    x_rows = xt[torch.as_tensor(rows)] * torch.as_tensor(valid)[..., None]
    kernel = KernelRows.from_gram(x_rows @ x_rows.transpose(1, 2))
    costs = np.array([0.5 ** 10, 0.0625, 1.0, 10.0])
    weights_t = torch.where(torch.as_tensor(labels) > 0, 2.0, 1.0).double() * torch.as_tensor(valid)
    for warm in (float("inf"), 0.1):
        options = SolverOptions(warm_start_above=warm)
        coef, _ = options.solve_costs(kernel, torch.as_tensor(labels).double()[:, None], weights_t[:, None], costs)
        assert not coef[:, 0].masked_select(~torch.as_tensor(valid)[:, None, :]).any()   # padding rows unused
        w = torch.bmm(coef[:, 0], x_rows).numpy()                                          # (6, costs, D + 1)
        for g in range(6):
            r = rows[g, valid[g]]
            problems = SVMProblems(np.tile(labels[g, valid[g]], (4, 1)), np.ones((4, len(r)), bool), costs)
            ref = fit_svms_sklearn(x[r], problems, tol=1e-8, max_iter=100000)
            np.testing.assert_allclose(w[g, :, :-1], ref.weights, atol=2e-3)
            np.testing.assert_allclose(w[g, :, -1], ref.bias, atol=2e-3)


def test_torch_pipelines_options_agree():
    """Warm start on/off, one chunk or many, float32 or float64 CG: same optimum, same APs."""
    train_x, train_t, test_x, test_t = synthetic_voc_features(120, 80, 64, seed=7, signal=0.3)
    costs = REFERENCE_COSTS[::2]
    base = full_svm_sweep(train_x, train_t, test_x, test_t, costs, options=SolverOptions(warm_start_above=np.inf,
                                                                                       cg_dtype="float64"))
    timings = {}
    warm = full_svm_sweep(train_x, train_t, test_x, test_t, costs, options=SolverOptions(), timings=timings)
    np.testing.assert_allclose(warm.cv_scores, base.cv_scores, atol=1e-6)
    np.testing.assert_allclose(warm.class_aps, base.class_aps, atol=1e-6)
    assert timings["fit"] > 0 and timings["score"] > 0
    samples = [sample_lowshot_targets(train_t, 2, random.Random(s)) for s in range(2)]
    one = lowshot_fit_and_test(train_x, samples, test_x, test_t, costs, SolverOptions())
    many = lowshot_fit_and_test(train_x, samples, test_x, test_t, costs, SolverOptions(chunk_bytes=1))
    diff = np.abs(one - many)                  # other batch shapes sum in another order: near-ties may swap
    assert (diff > 1e-6).mean() <= 0.01 and diff.max() <= 0.01
    cold = lowshot_fit_and_test(train_x, samples, test_x, test_t, costs, SolverOptions(warm_start_above=np.inf))
    assert np.abs(cold - one).max() <= 2e-3 and np.abs(cold - one).mean() <= 1e-4   # near-ties may swap
    large_k = [sample_lowshot_targets(train_t, 5, random.Random(s)) for s in range(2)]   # union Gram route
    a = lowshot_fit_and_test(train_x, large_k, test_x, test_t, costs, SolverOptions())
    b = lowshot_fit_and_test(train_x, large_k, test_x, test_t, costs, SolverOptions(backend="sklearn"))
    assert abs(aggregate_lowshot(a, costs)["mAP"] - aggregate_lowshot(b, costs)["mAP"]) <= 0.1
    union = lowshot_fit_and_test(train_x, samples, test_x, test_t, costs, SolverOptions(backend="sklearn"))
    assert abs(aggregate_lowshot(one, costs)["mAP"] - aggregate_lowshot(union, costs)["mAP"]) <= 0.1


def test_gram_matrix_and_top_eigenpairs_match_torch():
    """gram_matrix (numpy syrk on CPU) equals torch's product; top_eigenpairs (subspace iteration)
    finds the leading eigenvalues of a PSD matrix with a dominant direction, as features have."""
    rng = np.random.default_rng(9)
    x = torch.as_tensor(rng.random((300, 40)))
    np.testing.assert_allclose(gram_matrix(x).numpy(), (x @ x.T).numpy(), rtol=1e-12, atol=1e-12)
    gram = torch.stack([gram_matrix(x), gram_matrix(x[:, :20] * 3.0)])
    values, vectors = top_eigenpairs(gram, 2, iterations=30)
    ref_values, _ = torch.linalg.eigh(gram)
    np.testing.assert_allclose(values.numpy(), ref_values[:, -2:].numpy(), rtol=1e-6)
    rebuilt = torch.bmm(gram, vectors)
    np.testing.assert_allclose(rebuilt.numpy(), (vectors * values[:, None, :]).numpy(),
                               atol=1e-5 * float(values.max()))


@pytest.mark.parametrize("rows,dim", [(60, 200), (200, 30)])     # fewer and more rows than dimensions
def test_kernel_solver_meets_the_primal_optimality_condition(rows, dim):
    """The solver only sees K = x~ x~^T; its weights w = coef @ x~ must zero the primal gradient
    w - 2 sum_i c_i y_i max(0, 1 - y_i w.x~_i) x~_i, computed here in feature space."""
    rng = np.random.default_rng(10)
    x = l2_normalize(rng.random((rows, dim)) + (rng.random((rows, 1)) < 0.4))
    xt = torch.as_tensor(np.c_[x, np.ones(rows)])
    labels = torch.as_tensor(np.where(rng.random((4, rows)) < 0.3, 1.0, -1.0))
    mask = torch.as_tensor(rng.random((4, rows)) < 0.7)
    costs = torch.tensor([0.5 ** 12, 0.0625, 1.0, 100.0], dtype=torch.float64)
    row_costs = costs[:, None] * torch.where(labels > 0, 2.0, 1.0) * mask
    coef, margins = solve_kernel_newton(KernelRows.from_gram(xt @ xt.T), labels, row_costs, tol=1e-10,
                                        return_margins=True)
    assert not coef.masked_select(~mask).any()                       # rows a problem does not train on
    w = coef @ xt
    np.testing.assert_allclose(margins.numpy(), (w @ xt.T).numpy(), atol=1e-9)
    hinge = (1 - labels * (w @ xt.T)).clamp(min=0)
    grad = w - 2 * (row_costs * hinge * labels) @ xt
    grad0 = 2 * (row_costs * labels) @ xt
    assert (grad.norm(dim=1) <= 1e-8 * grad0.norm(dim=1)).all()


def test_warm_start_with_some_problems_already_optimal():
    """Half the problems start at their optimum: they leave the working set at the first step
    (which used to fail writing the working copy back onto itself) and keep their optimum."""
    rng = np.random.default_rng(0)
    x = augment_intercept(torch.as_tensor(l2_normalize(rng.random((60, 30)))))
    kernel = KernelRows.from_gram(gram_matrix(x))
    labels = torch.as_tensor(np.where(rng.random((4, 60)) < 0.3, 1.0, -1.0))
    costs = torch.full((4, 60), 0.5, dtype=torch.float64)
    optimum = solve_kernel_newton(kernel, labels, costs)
    start = optimum.clone()
    start[2:] = 0
    again = solve_kernel_newton(kernel, labels, costs, coef0=start)
    assert torch.allclose(again, optimum, atol=1e-8)


def test_lowshot_union_route_equals_group_route_and_reuses_its_gram():
    train_x, train_t, test_x, test_t = synthetic_voc_features(120, 80, 256, seed=11, signal=0.3)
    train_x, test_x = l2_normalize(train_x), l2_normalize(test_x)
    costs = REFERENCE_COSTS[::2]
    samples = [sample_lowshot_targets(train_t, 2, random.Random(s)) for s in range(2)]
    group = lowshot_fit_and_test(train_x, samples, test_x, test_t, costs, SolverOptions(lowshot_basis="group"),
                                 normalized=True)
    cache: dict = {}
    union = lowshot_fit_and_test(train_x, samples, test_x, test_t, costs, SolverOptions(lowshot_basis="union"),
                                 normalized=True, basis_cache=cache)
    diff = np.abs(union - group)
    assert (diff > 1e-6).mean() <= 0.01 and diff.max() <= 0.01       # near-tied test scores may swap
    assert abs(aggregate_lowshot(union, costs)["mAP"] - aggregate_lowshot(group, costs)["mAP"]) <= 0.01
    built = cache["kernel"]
    again = lowshot_fit_and_test(train_x, samples[:1], test_x, test_t, costs, SolverOptions(lowshot_basis="union",
                                 chunk_bytes=1), normalized=True, basis_cache=cache)
    assert cache["kernel"] is built                                  # not rebuilt for the next call
    np.testing.assert_allclose(again[0], union[0], atol=1e-6)
    gram = cache["gram"]                                             # the group route takes its blocks
    from_cache = lowshot_fit_and_test(train_x, samples, test_x, test_t, costs, SolverOptions(lowshot_basis="group"),
                                      normalized=True, basis_cache=cache)
    assert cache["gram"] is gram
    np.testing.assert_allclose(from_cache, group, atol=1e-6)
    with pytest.raises(ValueError, match="lowshot_basis"):
        lowshot_fit_and_test(train_x, samples, test_x, test_t, costs, SolverOptions(lowshot_basis="rows"))
    narrow = [lowshot_fit_and_test(train_x[:, :50], samples, test_x[:, :50], test_t, costs,
                                   SolverOptions(lowshot_basis=route)) for route in ("group", "union")]
    assert abs(aggregate_lowshot(narrow[0], costs)["mAP"] - aggregate_lowshot(narrow[1], costs)["mAP"]) <= 0.01


def test_lowshot_scores_through_the_test_kernel_equal_scores_through_the_weights():
    train_x, train_t, test_x, test_t = synthetic_voc_features(200, 90, 512, seed=12, signal=0.3)
    costs = REFERENCE_COSTS[::3]
    samples = [sample_lowshot_targets(train_t, 1, random.Random(s)) for s in range(3)]
    by_weights, by_kernel = (lowshot_fit_and_test(train_x, samples, test_x, test_t, costs,
                                                  SolverOptions(lowshot_basis="group", lowshot_scoring=scoring,
                                                                chunk_bytes=2 ** 20))
                             for scoring in ("weights", "kernel"))
    diff = np.abs(by_kernel - by_weights)
    assert (diff > 1e-6).mean() <= 0.01 and diff.max() <= 0.01       # near-tied test scores may swap
    reference = lowshot_fit_and_test(train_x, samples, test_x, test_t, costs, SolverOptions(backend="sklearn"))
    assert abs(aggregate_lowshot(by_kernel, costs)["mAP"] - aggregate_lowshot(reference, costs)["mAP"]) <= 0.1
    with pytest.raises(ValueError, match="lowshot_scoring"):
        lowshot_fit_and_test(train_x, samples, test_x, test_t, costs, SolverOptions(lowshot_scoring="rows"))
    # the union route scores through the kernel too, and a sweep keeps the kernel for the next k
    cache: dict = {}
    union = lowshot_fit_and_test(train_x, samples, test_x, test_t, costs,
                                 SolverOptions(lowshot_basis="union", lowshot_scoring="kernel"), basis_cache=cache)
    built = cache["test_kernel"]
    assert built.shape == (200, 90)
    diff = np.abs(union - by_weights)
    assert (diff > 1e-6).mean() <= 0.01 and diff.max() <= 0.01
    lowshot_fit_and_test(train_x, samples[:1], test_x, test_t, costs, SolverOptions(), basis_cache=cache)
    assert cache["test_kernel"] is built
    # VOC07 sizes, 1900 models: one call alone takes the weights; a sweep keeps the kernel
    assert not scores_through_test_kernel(1900, 20, 5011, 8192, 4952, reused=False)
    assert scores_through_test_kernel(1900, 20, 5011, 8192, 4952, reused=True)
    assert scores_through_test_kernel(1900, 20, 400, 512, 4952, reused=False)     # few rows, few dims


def test_lowshot_route_choice_on_voc07_sizes():
    def route(k, ready=False):
        return cheaper_lowshot_route(100, 20 * k, 5011, 8192, 19, ready)
    assert [route(k) for k in (1, 8, 32, 64, 96)] == ["group", "group", "group", "group", "union"]
    assert route(64, ready=True) == "group" and route(96, ready=True) == "union"
    assert cheaper_lowshot_route(100, 1920, 9000, 512, 19, False) == "group"   # more rows than dims: no Gram route


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_torch_pipelines_on_cuda_match_cpu():
    train_x, train_t, test_x, test_t = synthetic_voc_features(150, 100, 256, seed=8, signal=0.25)
    cpu = full_svm_sweep(train_x, train_t, test_x, test_t, options=SolverOptions())
    gpu = full_svm_sweep(train_x, train_t, test_x, test_t, options=SolverOptions(device="cuda"))
    assert abs(cpu.mean_ap - gpu.mean_ap) <= 0.1
    np.testing.assert_allclose(gpu.cv_scores, cpu.cv_scores, atol=1e-3)
    samples = [sample_lowshot_targets(train_t, k, random.Random(k)) for k in (1, 4)]
    a = lowshot_fit_and_test(train_x, samples, test_x, test_t, REFERENCE_COSTS, SolverOptions())
    b = lowshot_fit_and_test(train_x, samples, test_x, test_t, REFERENCE_COSTS, SolverOptions(device="cuda"))
    assert np.abs(a - b).mean() <= 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matmul_through_numpy_equals_torch_for_strided_and_batched_operands(dtype):
    generator = torch.Generator().manual_seed(5)
    a = torch.randn(3, 7, 11, generator=generator, dtype=dtype)
    b = torch.randn(3, 11, 5, generator=generator, dtype=dtype)
    start = torch.randn(11, 4, generator=generator, dtype=dtype).expand(3, 11, 4)     # stride 0: copied
    for left, right in [(a, b), (a, b.transpose(1, 2).contiguous().transpose(1, 2)), (a, start),
                        (a[0], b[0]), (a[:, ::2], b), (a, b[1])]:
        out = matmul(left, right)
        assert out.dtype == dtype
        torch.testing.assert_close(out, torch.matmul(left, right))


def test_blas_benchmark_runs_and_checks_the_products():
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "benchmarks/blas_products.py", "--scale", "0.01", "--repeats", "1"],
                          cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("torch / numpy") == 5
