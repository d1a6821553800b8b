"""Pieces shared by `svm_voc07` and `lowshot_svm_voc07` (PROTOCOLS.md section 2).

Everything here works on features already in memory, so tests and benchmarks run the exact
protocol pipelines on synthetic features:
    full_svm_sweep(train_x, train_targets, test_x, test_targets, ...)      section 2.3
    sample_lowshot_targets(train_targets, k, rng)                        section 2.4
    lowshot_fit_and_test(train_x, samples, test_x, test_targets, ...)     section 2.4
Label encoding (section 2.2): 1 present, 0 absent, -1 difficult-only.
With the torch backend both sweeps stay in torch on SolverOptions.device: batched solves
(svm_solver.solve_kernel_newton), CV decision values taken from the solver's margins, CV and
test APs as batched sorts (batched_ranking_ap / batched_envelope_ap). The sklearn backend
fits one LinearSVC per problem, as the reference does.
"""
from __future__ import annotations

import functools
import random
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from densebench.protocols.svm_solver import (KernelRows, LinearModels, SVMProblems, augment_intercept, fit_svms,
                                             gram_matrix, l2_normalize, matmul, solve_kernel_newton)

# "1.0,10.0,100.0" plus 0.5^n for n = 4..19, in this order (eval_svm_full.sh; svm_helper.parse_cost_list)
REFERENCE_COSTS = (1.0, 10.0, 100.0) + tuple(0.5 ** n for n in range(4, 20))
LOWSHOT_KS = (1, 2, 4, 8, 16, 32, 64, 96)


# ----------------------------------------------------------------------------- metric

def voc_envelope_ap(scores: np.ndarray, positives: np.ndarray) -> float:
    """AP as svm_helper.get_precision_recall + calculate_ap (PROTOCOLS.md 2.3).

    Sort by score descending (stable on ties), cumulative precision/recall with recall over the
    number of positives, sentinels (0, 0) and (1, 0), backward running max of precision, sum of
    recall steps times envelope precision. Returns 0 when there is no positive.
    """
    scores = np.asarray(scores, dtype=np.float64)
    positives = np.asarray(positives, dtype=bool)
    num_pos = int(positives.sum())
    if num_pos == 0:
        return 0.0
    order = np.argsort(-scores, kind="stable")
    tp = np.cumsum(positives[order])
    fp = np.cumsum(~positives[order])
    recall = tp / num_pos
    precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    steps = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def ranking_ap(scores: np.ndarray, positives: np.ndarray) -> float:
    """Non-interpolated AP = sum_n (R_n - R_(n-1)) P_n over distinct score thresholds.

    The definition of sklearn.metrics.average_precision_score (the reference CV scorer),
    computed directly because the per-call overhead of sklearn dominates a batched sweep.
    Tied scores form one threshold, as in sklearn. Returns 0 when there is no positive
    (sklearn warns and returns -0.0 / nan there; the reference never meets that case).
    """
    scores = np.asarray(scores, dtype=np.float64)
    positives = np.asarray(positives, dtype=bool)
    num_pos = int(positives.sum())
    if num_pos == 0:
        return 0.0
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    last_of_group = np.r_[np.flatnonzero(np.diff(sorted_scores) != 0), len(scores) - 1]
    tp = np.cumsum(positives[order])[last_of_group]
    seen = last_of_group + 1
    recall_steps = np.diff(np.r_[0, tp]) / num_pos
    return float(np.sum(recall_steps * tp / seen))


def _sorted_rows(scores: torch.Tensor, positives: torch.Tensor, keep: torch.Tensor):
    """Sort each row by score, descending and stable, with the rows not kept moved to the end.
    Sorted in the scores' own dtype: the order is the same as in float64, and float32 sorts faster."""
    scores = torch.where(keep, scores, torch.full_like(scores, float("-inf")))
    sorted_scores, order = torch.sort(scores, dim=1, descending=True, stable=True)
    kept = torch.gather(keep, 1, order)
    pos = torch.gather(positives & keep, 1, order)
    return sorted_scores, pos, kept


def batched_envelope_ap(scores: torch.Tensor, positives: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """voc_envelope_ap for every row of scores (P, M) at once, over the columns where keep is True.

    One sort for all problems. The envelope precision at each positive is the running maximum of
    precision from the end (the final sentinel precision is 0); each positive adds 1/num_pos of
    recall. Rows without a positive give 0. float32 scores on CPU (the low-shot test scores) take
    _envelope_ap_float32_cpu, the same numbers 3-7x faster.
    """
    if scores.dtype == torch.float32 and scores.device.type == "cpu":
        return _envelope_ap_float32_cpu(scores.numpy(), positives.numpy(), keep.numpy())
    _, pos, kept = _sorted_rows(scores, positives, keep)
    tp = torch.cumsum(pos, dim=1, dtype=torch.float64)
    seen = torch.cumsum(kept, dim=1, dtype=torch.float64)
    precision = torch.where(kept, tp / seen.clamp(min=1.0), torch.zeros_like(tp))
    envelope = torch.flip(torch.cummax(torch.flip(precision, [1]), dim=1).values, [1])
    num_pos = pos.sum(1)
    return (envelope * pos).sum(1) / num_pos.clamp(min=1)


def _envelope_ap_float32_cpu(scores: np.ndarray, positives: np.ndarray, keep: np.ndarray) -> torch.Tensor:
    """batched_envelope_ap for float32 scores (P, M), in numpy.

    Sort: each item becomes one int64 key, the score's bits mapped to an integer that orders as
    the scores do, reversed (descending), in the high 32 bits, then its column (ties keep column
    order, as a stable sort does) and whether it is a kept positive; rows not kept get the largest
    high part, so they rank last. The keys are distinct, so numpy's vectorised integer sort gives
    the stable order (0.10 s for 1900 x 4952 on one core of the CI machine, where torch's stable
    float sort takes 0.76 s). After it only the positives are touched: the j-th positive at
    rank r has precision j / r, and its envelope is the largest precision at it or at a later
    positive (a negative's precision is below that of the positive before it).
    """
    num_rows, width = scores.shape
    bits = (scores + np.float32(0.0)).view(np.int32)          # + 0: -0.0 becomes +0.0, equal to it
    flip = bits >> 31
    flip &= 0x7FFFFFFF
    bits ^= flip                                               # integer order = float order
    np.invert(bits, out=bits)                                  # descending
    np.copyto(bits, np.int32(2 ** 31 - 1), where=~keep)
    keys = bits.astype(np.int64)
    keys <<= 32
    keys |= (np.arange(width, dtype=np.int64) << 1)[None, :]
    keys |= positives & keep
    keys.sort(axis=1)
    row, rank0 = np.nonzero(keys & 1)                          # every positive, by row, then by rank
    counts = np.bincount(row, minlength=num_rows)
    starts = np.cumsum(counts) - counts
    nth = np.arange(1, len(row) + 1) - np.repeat(starts, counts)      # j: 1, 2, ... within its row
    precision = nth / (rank0 + 1.0)
    sums = np.zeros(num_rows)
    for r in np.flatnonzero(counts):
        in_row = precision[starts[r]:starts[r] + counts[r]]
        sums[r] = np.maximum.accumulate(in_row[::-1]).sum()        # envelope: running max from the end
    return torch.from_numpy(sums / np.maximum(counts, 1))


def batched_ranking_ap(scores: torch.Tensor, positives: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """ranking_ap (sklearn's AP, tied scores form one threshold) for every row at once.

    Each positive contributes 1/num_pos times the precision at the end of its group of tied scores.
    """
    sorted_scores, pos, kept = _sorted_rows(scores, positives, keep)
    num_rows, width = sorted_scores.shape
    tp = torch.cumsum(pos, dim=1, dtype=torch.float64)
    seen = torch.cumsum(kept, dim=1, dtype=torch.float64)
    precision = tp / seen.clamp(min=1.0)
    group_end = torch.ones_like(kept)
    group_end[:, :-1] = sorted_scores[:, 1:] != sorted_scores[:, :-1]
    position = torch.arange(width, device=scores.device).expand(num_rows, -1)
    end_position = torch.where(group_end, position, torch.full_like(position, width - 1))
    next_end = torch.flip(torch.cummin(torch.flip(end_position, [1]), dim=1).values, [1])
    at_group_end = torch.gather(precision, 1, next_end)
    num_pos = pos.sum(1)
    return (at_group_end * pos).sum(1) / num_pos.clamp(min=1)


def class_ap_on_test(scores: np.ndarray, class_targets: np.ndarray) -> float:
    """Test AP of one class: difficult rows (-1) dropped, then label 1 = positive (test_svm.py)."""
    keep = class_targets != -1
    return voc_envelope_ap(scores[keep], class_targets[keep] == 1)


def aps_on_test(decision: np.ndarray, test_targets: np.ndarray, class_of_problem: np.ndarray) -> np.ndarray:
    """AP per problem: decision (P, M) test scores, class_of_problem (P,) column of test_targets."""
    return np.array([class_ap_on_test(decision[p], test_targets[:, c]) for p, c in enumerate(class_of_problem)])


def train_labels(class_targets: np.ndarray) -> np.ndarray:
    """Full-SVM training labels: 1 stays +1, 0 and -1 (difficult) both become -1 (section 2.2)."""
    return np.where(class_targets == 1, 1, -1).astype(np.int8)


# ----------------------------------------------------------------------------- solver options

@dataclass
class SolverOptions:
    backend: str = "torch"                 # "torch" (batched) or "sklearn" (reference LinearSVC)
    device: str = "cpu"
    tol: float = 1e-6                      # relative gradient norm at which a torch problem stops
    dtype: str = "float64"                 # torch: Gram matrix, gradients, margins, stopping test
    pos_weight: float = 2.0                # class_weight {+1: 2, -1: 1} (train_svm_kfold.py)
    neg_weight: float = 1.0
    sklearn_max_iter: int = 2000           # reference LinearSVC max_iter
    cg_dtype: str = "float32"              # torch: Hessian products of the inner CG (inexact Newton)
    score_dtype: str = "float32"           # torch: low-shot test scores (ranking only)
    chunk_bytes: Optional[int] = None      # torch low-shot: memory per chunk of (sample, class) groups;
                                           # None: 1 GiB on CPU, 4 GiB on CUDA
    warm_start_above: float = 0.1          # torch: costs >= this are solved one by one, ascending, each
                                           # started from the previous cost's optimum (inf: all cold)
    lowshot_basis: str = "auto"            # torch low-shot: "group" (a Gram matrix per (sample, class)),
                                           # "union" (one of all training rows), "auto" (the cheaper)
    lowshot_scoring: str = "auto"          # torch low-shot test scores: "weights" (w = coef.X, then w.test),
                                           # "kernel" (coef . (X test^T), X test^T kept across the k of a
                                           # sweep), "auto" (kernel in a sweep, else the cheaper)

    def fit(self, x: np.ndarray, labels, mask, costs) -> LinearModels:
        problems = SVMProblems(labels, mask, costs, self.pos_weight, self.neg_weight)
        return fit_svms(x, problems, backend=self.backend, device=self.device, tol=self.tol,
                        dtype=getattr(torch, self.dtype),
                        sklearn_max_iter=self.sklearn_max_iter, cg_dtype=getattr(torch, self.cg_dtype))

    def solve(self, kernel: KernelRows, labels: torch.Tensor, row_costs: torch.Tensor, stats=None, coef0=None):
        """Torch solve over the rows of kernel -> (coefficients, margins), see solve_kernel_newton."""
        return solve_kernel_newton(kernel, labels, row_costs, tol=self.tol, cg_dtype=getattr(torch, self.cg_dtype),
                                   coef0=coef0, return_margins=True, stats=stats)

    def solve_costs(self, kernel: KernelRows, labels: torch.Tensor, weights: torch.Tensor, costs: np.ndarray,
                    stats=None, max_cold: Optional[int] = None):
        """Every problem of labels/weights (G, B, N) at every cost -> coefficients and margins, both
        (G, B, K, N).

        weights are the per-row class weights times the row mask (the cost multiplies them). The
        costs below warm_start_above converge from zero in a few Newton steps and go in one batch
        (split along B into batches of at most max_cold problems, to bound memory); the larger ones
        (where the hinge is nearly hard and CG needs many iterations) are solved in ascending
        order, each warm-started from the optimum at the previous cost, all of B at once.
        """
        num_groups, batch, num_rows = labels.shape
        dtype, device = kernel.gram.dtype, kernel.gram.device
        cost_t = torch.as_tensor(costs, device=device, dtype=dtype)
        coef = torch.zeros(num_groups, batch, len(costs), num_rows, dtype=dtype, device=device)
        margins = torch.zeros_like(coef)
        cold_np = np.flatnonzero(costs < self.warm_start_above)
        cold = torch.as_tensor(cold_np, device=device)
        warm = [int(j) for j in np.argsort(costs, kind="stable") if costs[j] >= self.warm_start_above]
        step = batch if max_cold is None else max(1, max_cold // max(1, num_groups * len(cold_np)))
        for first in range(0, batch if len(cold_np) else 0, step):
            part = slice(first, min(first + step, batch))
            shape = (num_groups, part.stop - first, len(cold_np), num_rows)
            row_costs = cost_t[cold][None, None, :, None] * weights[:, part, None, :]
            c_c, m_c = self.solve(kernel, labels[:, part, None, :].expand(shape).reshape(num_groups, -1, num_rows),
                                  row_costs.reshape(num_groups, -1, num_rows), stats=stats)
            coef[:, part, cold] = c_c.reshape(shape)
            margins[:, part, cold] = m_c.reshape(shape)
        previous = int(cold_np[np.argmax(costs[cold_np])]) if len(cold_np) else None
        for j in warm:
            coef0 = None if previous is None else coef[:, :, previous]
            coef[:, :, j], margins[:, :, j] = self.solve(kernel, labels, cost_t[j] * weights, stats=stats,
                                                         coef0=coef0)
            previous = j
        return coef, margins


class _Timer:
    """Adds the wall time of a block to timings[key] (synchronising CUDA), if timings is a dict."""

    def __init__(self, timings: Optional[dict], key: str, device="cpu"):
        self.timings, self.key, self.device = timings, key, torch.device(device)

    def __enter__(self):
        self._sync()
        self.tic = time.perf_counter()

    def __exit__(self, *exc):
        self._sync()
        if self.timings is not None:
            self.timings[self.key] = self.timings.get(self.key, 0.0) + time.perf_counter() - self.tic

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _weighted_costs(labels: torch.Tensor, options: SolverOptions) -> torch.Tensor:
    """Class weight per row: pos_weight for +1 labels, neg_weight for -1."""
    return torch.where(labels > 0, torch.full_like(labels, options.pos_weight),
                       torch.full_like(labels, options.neg_weight))


# ----------------------------------------------------------------------------- full SVM (2.3)

@dataclass
class FullSVMResult:
    class_aps: np.ndarray          # (20,) test AP per class, fraction
    chosen_costs: np.ndarray       # (20,)
    cv_scores: np.ndarray          # (20, num_costs) mean CV AP

    @property
    def mean_ap(self) -> float:
        return float(self.class_aps.mean() * 100.0)


def stratified_folds(labels: np.ndarray, num_folds: int) -> List[np.ndarray]:
    """Test-row indices of StratifiedKFold(num_folds) without shuffling (cross_val_score cv=3)."""
    from sklearn.model_selection import StratifiedKFold

    splitter = StratifiedKFold(n_splits=num_folds)
    return [test for _, test in splitter.split(np.zeros(len(labels)), labels)]


def full_svm_sweep(train_x: np.ndarray, train_targets: np.ndarray, test_x: np.ndarray,
                   test_targets: np.ndarray, costs: Sequence[float] = REFERENCE_COSTS,
                   num_folds: int = 3, options: Optional[SolverOptions] = None,
                   timings: Optional[dict] = None) -> FullSVMResult:
    """CV over costs per class with sklearn's AP definition, per-class argmax (first wins), refit, test AP.

    timings (a dict) receives the seconds spent in "fit" (all solver work) and "score".
    """
    options = options or SolverOptions()
    train_x, test_x = l2_normalize(train_x), l2_normalize(test_x)
    costs = np.asarray(costs, dtype=np.float64)
    if options.backend == "torch":
        return _full_svm_sweep_torch(train_x, train_targets, test_x, test_targets, costs, num_folds, options, timings)
    tic = time.perf_counter()
    num_rows, num_classes = train_targets.shape

    labels, masks, problem_costs, index = [], [], [], []     # index: (class, cost, held-out rows)
    for c in range(num_classes):
        y = train_labels(train_targets[:, c])
        for held_out in stratified_folds(y, num_folds):
            mask = np.ones(num_rows, dtype=bool)
            mask[held_out] = False
            for j, cost in enumerate(costs):
                labels.append(y)
                masks.append(mask)
                problem_costs.append(cost)
                index.append((c, j, held_out))
    models = options.fit(train_x, np.stack(labels), np.stack(masks), np.array(problem_costs))
    fit_seconds = time.perf_counter() - tic
    train_scores = models.decision(train_x)
    cv_sum = np.zeros((num_classes, len(costs)))
    for p, (c, j, held_out) in enumerate(index):
        scores = train_scores[p, held_out]
        y = train_labels(train_targets[held_out, c])
        cv_sum[c, j] += ranking_ap(scores, y == 1)
    cv_scores = cv_sum / num_folds
    chosen = costs[np.argmax(cv_scores, axis=1)]               # argmax: first maximum wins

    refit_labels = np.stack([train_labels(train_targets[:, c]) for c in range(num_classes)])
    tic = time.perf_counter()
    refit = options.fit(train_x, refit_labels, np.ones_like(refit_labels, dtype=bool), chosen)
    fit_seconds += time.perf_counter() - tic
    aps = aps_on_test(refit.decision(test_x), test_targets, np.arange(num_classes))
    if timings is not None:
        timings["fit"] = timings.get("fit", 0.0) + fit_seconds
    return FullSVMResult(class_aps=aps, chosen_costs=chosen, cv_scores=cv_scores)


def _full_svm_sweep_torch(train_x, train_targets, test_x, test_targets, costs, num_folds,
                          options: SolverOptions, timings) -> FullSVMResult:
    """The batched version of the sweep above, all on options.device.

    One Gram matrix serves every fold, cost and the refit; the CV decision values are the
    solver's margins (no mapping back to feature space); CV and test APs are batched sorts.
    """
    device, dtype = torch.device(options.device), getattr(torch, options.dtype)
    num_rows, num_classes = train_targets.shape
    num_costs = len(costs)
    labels = torch.as_tensor(np.stack([train_labels(train_targets[:, c]) for c in range(num_classes)]),
                             device=device).to(dtype)                                   # (C, N)
    held_out = torch.zeros(num_classes, num_folds, num_rows, dtype=torch.bool, device=device)
    for c in range(num_classes):
        for f, rows in enumerate(stratified_folds(labels[c].cpu().numpy(), num_folds)):
            held_out[c, f, torch.as_tensor(rows, device=device)] = True
    with _Timer(timings, "fit", device):
        train_aug = augment_intercept(torch.as_tensor(train_x, device=device).to(dtype))
        kernel = KernelRows.from_gram(gram_matrix(train_aug))
        shape = (num_classes, num_folds, num_costs, num_rows)
        cv_labels = labels[:, None, None, :].expand(shape)
        cv_weights = _weighted_costs(labels, options)[:, None, :] * (~held_out)                # (C, F, N)
        _, margins = options.solve_costs(kernel, labels[:, None, :].expand_as(cv_weights).reshape(1, -1, num_rows),
                                         cv_weights.reshape(1, -1, num_rows), costs)
        margins = margins.reshape(-1, num_rows)
    with _Timer(timings, "score", device):
        cv_aps = batched_ranking_ap(margins, (cv_labels > 0).reshape(-1, num_rows),
                                    held_out[:, :, None, :].expand(shape).reshape(-1, num_rows))
        cv_scores = cv_aps.reshape(num_classes, num_folds, num_costs).mean(1).cpu().numpy()
    chosen = costs[np.argmax(cv_scores, axis=1)]               # argmax: first maximum wins
    with _Timer(timings, "fit", device):
        refit_costs = torch.as_tensor(chosen, device=device, dtype=dtype)[:, None] * _weighted_costs(labels, options)
        coef, _ = options.solve(kernel, labels, refit_costs)
        weights = coef @ train_aug                                                   # (C, D + 1)
    with _Timer(timings, "score", device):
        test_aug = augment_intercept(torch.as_tensor(test_x, device=device).to(dtype))
        test_t = torch.as_tensor(test_targets, device=device)
        aps = batched_envelope_ap(weights @ test_aug.T, (test_t == 1).T, (test_t != -1).T).cpu().numpy()
    return FullSVMResult(class_aps=aps, chosen_costs=chosen, cv_scores=cv_scores)


# ----------------------------------------------------------------------------- low-shot (2.4)

def sample_lowshot_targets(train_targets: np.ndarray, k: int, rng: random.Random) -> np.ndarray:
    """One low-shot sample (create_voc_low_shot_challenge_samples.py), but from a seeded rng.

    Start from all -1 (ignored). For each class independently, mark k random label-1 rows as 1
    and (num_classes - 1) * k random label-0 rows as 0; difficult (-1) rows are never drawn.
    When a class has fewer candidates than asked (tiny synthetic data), all of them are taken.
    """
    num_rows, num_classes = train_targets.shape
    sample = -np.ones_like(train_targets, dtype=np.int8)
    for c in range(num_classes):
        positives = np.flatnonzero(train_targets[:, c] == 1).tolist()
        negatives = np.flatnonzero(train_targets[:, c] == 0).tolist()
        chosen_pos = rng.sample(positives, min(k, len(positives)))
        chosen_neg = rng.sample(negatives, min((num_classes - 1) * k, len(negatives)))
        sample[chosen_pos, c] = 1
        sample[chosen_neg, c] = 0
    return sample


def lowshot_rng(seed: int, sample_index: int, k: int) -> random.Random:
    """Independent, reproducible stream per (seed, sample, k), so a resumed sweep draws the same."""
    return random.Random(f"densebench-lowshot-{seed}-{sample_index}-{k}")


def lowshot_fit_and_test(train_x: np.ndarray, samples: Sequence[np.ndarray], test_x: np.ndarray,
                         test_targets: np.ndarray, costs: Sequence[float] = REFERENCE_COSTS,
                         options: Optional[SolverOptions] = None, normalized: bool = False,
                         timings: Optional[dict] = None, basis_cache: Optional[dict] = None) -> np.ndarray:
    """Test APs (len(samples), num_costs, num_classes) for low-shot target matrices.

    For each class of each sample: train on the rows whose label != -1 (0 becomes -1), no CV,
    every cost; test on the full test set without difficult rows. The sklearn backend fits one
    problem at a time; the torch backend batches all groups and costs (see _lowshot_torch).
    timings (a dict) receives the seconds spent in "fit" and "score". basis_cache: a dict the
    caller keeps across calls over the same train_x (every k of one layer), so the Gram matrix of
    all training rows (the union route for large k) is built once.
    """
    options = options or SolverOptions()
    costs = np.asarray(costs, dtype=np.float64)
    if options.backend == "torch":
        return _lowshot_torch(train_x, samples, test_x, test_targets, costs, options, timings, normalized,
                              basis_cache if basis_cache is not None else {}, keep_cache=basis_cache is not None)
    if not normalized:
        train_x, test_x = l2_normalize(train_x), l2_normalize(test_x)
    tic = time.perf_counter()
    num_classes = test_targets.shape[1]
    used = np.flatnonzero(np.any([np.any(s != -1, axis=1) for s in samples], axis=0))
    sub_x = train_x[used]
    labels, masks, problem_costs, classes = [], [], [], []
    for sample in samples:
        sub = sample[used]
        for c in range(num_classes):
            for cost in costs:
                labels.append(np.where(sub[:, c] == 1, 1, -1).astype(np.int8))
                masks.append(sub[:, c] != -1)
                problem_costs.append(cost)
                classes.append(c)
    models = options.fit(sub_x, np.stack(labels), np.stack(masks), np.array(problem_costs))
    if timings is not None:
        timings["fit"] = timings.get("fit", 0.0) + time.perf_counter() - tic
    aps = aps_on_test(models.decision(test_x), test_targets, np.array(classes))
    return aps.reshape(len(samples), num_classes, len(costs)).transpose(0, 2, 1)


def lowshot_groups(samples: Sequence[np.ndarray]):
    """(sample, class) groups of a low-shot sweep: rows (G, n) int64 indices of the rows each group
    trains on, padded with row 0; valid (G, n) False on padding; labels (G, n) +1/-1 (0 -> -1)."""
    members = [(s, c, np.flatnonzero(sample[:, c] != -1)) for s, sample in enumerate(samples)
               for c in range(sample.shape[1])]
    width = max(1, max(len(rows) for _, _, rows in members))
    rows = np.zeros((len(members), width), dtype=np.int64)
    valid = np.zeros((len(members), width), dtype=bool)
    labels = -np.ones((len(members), width), dtype=np.int8)
    for g, (s, c, r) in enumerate(members):
        rows[g, :len(r)] = r
        valid[g, :len(r)] = True
        labels[g, :len(r)] = np.where(samples[s][r, c] == 1, 1, -1)
    return rows, valid, labels


def _torch_l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """l2_normalize on a tensor (same formula, in its dtype, on the solver's device)."""
    return x / (x.norm(dim=1, keepdim=True) + 1e-5)


def cheaper_lowshot_route(num_groups: int, width: int, num_rows: int, dim: int, num_costs: int,
                          union_ready: bool) -> str:
    """"group" or "union", whichever the work estimate (in float32 multiply-adds) says is cheaper.

    group: per (sample, class) the Gram matrix of its n rows (from one Gram of the rows in use:
    about U^2 D / 2 for U used rows, or n^2 D per group when that is smaller), then products of
    n x n per problem; the warm-started large costs run one problem per group, a matrix-vector
    product per group that is bound by memory traffic (counted 12x). union: the Gram of all N
    rows (N^2 D / 2, nothing if already built for an earlier k), then products of N x N per
    problem, always as one large matrix product. A problem needs about 30 products. The constants
    are fitted to the CI machine (5011 x 8192 features, 5 samples, one thread): group 17.7 / 29.1 /
    51.6 s and union 55.0 / 53.5 / 44.9 s for k = 32 / 64 / 96, so union from k = 96 only.
    """
    products, warm_share, matvec_penalty = 30.0, 0.6, 12.0
    used = min(num_rows, num_groups * width)
    problems = num_groups * num_costs
    group = min(0.5 * used ** 2 * dim, num_groups * width ** 2 * dim)
    group += products * problems * width ** 2 * ((1 - warm_share) + warm_share * matvec_penalty)
    union = 0.0 if union_ready else 0.5 * num_rows ** 2 * dim
    union += products * problems * num_rows ** 2
    return "union" if union < group else "group"


def scores_through_test_kernel(num_models: int, width: int, num_rows: int, dim: int, num_test: int,
                               reused: bool) -> bool:
    """Whether to score the test set through the test kernel (all N training rows times the test
    rows, N x M: N M D multiply-adds once, then n M per model from its n coefficients) rather than
    through each model's weights (n D multiply-adds to form them, D M to apply them). The kernel
    is kept in the caller's basis_cache (reused), so over the k of a sweep it is built once: on
    the VOC07-sized features (5011 training rows, 4952 test rows, 8192 dims, 1900 models per k)
    203 G multiply-adds once against 77-153 G for the weights at every k. A call whose kernel
    would not be kept takes whichever is cheaper for it alone."""
    if reused:
        return True
    by_kernel = num_test * num_rows * dim + num_models * width * num_test
    by_weights = num_models * (width * dim + dim * num_test)
    return by_kernel < by_weights


def _lowshot_torch(train_x, samples, test_x, test_targets, costs, options: SolverOptions, timings,
                   normalized: bool, basis_cache: dict, keep_cache: bool) -> np.ndarray:
    """Low-shot sweep, all (sample, class) groups and costs batched, in chunks that bound memory.

    A problem trains on 20k rows, so its optimum is a combination of those rows, and the solver
    needs their Gram matrix only (options.lowshot_basis, "auto" = cheaper_lowshot_route):
    * group: the Gram matrix of each group's rows (n x n, n = 20k), shared by the group's costs;
      cheapest for small k.
    * union: the Gram matrix of all N training rows (kept in basis_cache for later calls); every
      problem runs over all rows with zero cost outside its group's, so each product is one large
      matrix product, which wins for large k where the groups' warm-started solves would be
      matrix-vector products.
    The coefficients over training rows give the test scores per chunk (options.lowshot_scoring,
    "auto" = scores_through_test_kernel): through the test kernel (the products of every training
    row with every test row, kept in basis_cache when keep_cache, so a sweep over k builds it
    once), or through each model's weights.
    """
    device, dtype = torch.device(options.device), getattr(torch, options.dtype)
    score_dtype = getattr(torch, options.score_dtype)
    num_classes = test_targets.shape[1]
    train_x, test_x = np.asarray(train_x), np.asarray(test_x)
    num_rows, dim = train_x.shape
    num_test = test_x.shape[0]
    rows_np, valid_np, labels_np = lowshot_groups(samples)
    num_groups, width = rows_np.shape
    group_class = torch.as_tensor(np.tile(np.arange(num_classes), len(samples)), device=device)
    cache_key = (num_rows, dim, str(device), options.dtype, normalized)
    test_key = cache_key + (num_test, options.score_dtype)
    route = options.lowshot_basis
    if route == "auto":
        route = cheaper_lowshot_route(num_groups, width, num_rows, dim, len(costs),
                                      union_ready=basis_cache.get("key") == cache_key)
    if route not in ("group", "union"):
        raise ValueError(f"lowshot_basis must be auto, group or union, got {options.lowshot_basis!r}")
    scoring = options.lowshot_scoring
    if scoring == "auto":
        scoring = "kernel" if scores_through_test_kernel(
            num_groups * len(costs), width, num_rows, dim, num_test,
            reused=keep_cache or basis_cache.get("test_key") == test_key) else "weights"
    if scoring not in ("weights", "kernel"):
        raise ValueError(f"lowshot_scoring must be auto, weights or kernel, got {options.lowshot_scoring!r}")
    # The intercept feature is never materialised: [x, 1].[x', 1] = x.x' + 1, and a weight vector
    # sum_i coef_i [x_i, 1] has bias sum_i coef_i.
    with _Timer(timings, "fit", device):
        train_rows = torch.as_tensor(train_x, device=device).to(dtype)
        if not normalized:
            train_rows = _torch_l2_normalize(train_rows)
    with _Timer(timings, "score", device):
        test_t = torch.as_tensor(test_targets, device=device)
        test_pos, test_keep = (test_t == 1).T, (test_t != -1).T                          # (C, M)
        if scoring == "kernel":
            if basis_cache.get("test_key") != test_key:
                test_kernel = _test_kernel(train_rows, test_x, device, score_dtype, normalized)
                if keep_cache:
                    basis_cache.update(test_key=test_key, test_kernel=test_kernel)
            else:
                test_kernel = basis_cache["test_kernel"]                                 # (N, M)
        else:
            train_lo = train_rows.to(score_dtype)
            test_lo = _normalized_test_rows(test_x, device, score_dtype, normalized)
    # One Gram matrix of all training rows serves the union route, and the group route when it is
    # built already or the groups' own Gram matrices would cost more than one of the rows in use
    # (then all rows: little more, and kept in basis_cache for the next k).
    budget = options.chunk_bytes or (4 * 2 ** 30 if device.type == "cuda" else 2 ** 30)
    gram_ready = basis_cache.get("key") == cache_key
    num_used = len(np.unique(rows_np[valid_np]))
    if route == "union" or gram_ready or num_groups * width * width > num_used * num_used:
        with _Timer(timings, "fit", device):
            if gram_ready:
                gram = basis_cache["gram"]
            else:
                gram = gram_matrix(train_rows) + 1.0
                basis_cache.pop("kernel", None)                   # eigenpairs of an earlier Gram matrix
                basis_cache.update(key=cache_key, gram=gram)
    else:
        gram = None
    if route == "union":
        with _Timer(timings, "fit", device):
            if "kernel" not in basis_cache:
                basis_cache["kernel"] = KernelRows.from_gram(gram)
            kernel = basis_cache["kernel"]
        # per group: its coefficients and margins at every cost, its warm-started problem's working
        # arrays (about 24 vectors); the cold batches get a budget of their own
        per_group = 8 * num_rows * (2 * len(costs) + 24)
        solve_chunk = functools.partial(_union_solve, kernel, costs=costs, options=options,
                                        max_cold=max(1, budget // (8 * 24 * num_rows)))
    else:
        per_group = 8 * ((0 if gram is not None else width * dim) + 4 * width * width
                         + 24 * len(costs) * width + len(costs) * dim)
        solve_chunk = functools.partial(_group_solve, train_rows, gram, costs=costs, options=options)
    per_group += 8 * 5 * len(costs) * num_test                          # scores and their sort
    if scoring == "kernel" and route == "group":
        per_group += 4 * width * num_test                                # the group's test-kernel rows
    chunk = max(1, int(budget // per_group))
    chunk = -(-num_groups // -(-num_groups // chunk))                    # equal chunks: no small last one
    aps = torch.zeros(num_groups, len(costs), dtype=torch.float64, device=device)
    for start in range(0, num_groups, chunk):
        part = slice(start, min(start + chunk, num_groups))
        with _Timer(timings, "fit", device):
            rows = torch.as_tensor(rows_np[part], device=device)
            valid = torch.as_tensor(valid_np[part], device=device)
            labels = torch.as_tensor(labels_np[part], device=device).to(dtype)
            coef, coef_rows = solve_chunk(rows, valid, labels)       # (g, costs, n or N) over training rows
        with _Timer(timings, "score", device):
            # scores only serve to rank the test set: computed in score_dtype
            bias = coef.sum(-1).reshape(-1, 1).to(score_dtype)
            weights = coef.to(score_dtype)
            if scoring == "kernel":
                scores = (matmul(weights.reshape(-1, num_rows), test_kernel) if coef_rows is None else
                          matmul(weights, _take_rows(test_kernel, coef_rows))).reshape(-1, num_test) + bias
            else:
                if coef_rows is not None and 4 * width >= num_used:
                    # wide groups: one GEMM over all rows beats gathering each group's rows
                    dense = torch.zeros(*coef.shape[:2], num_rows, dtype=score_dtype, device=device)
                    weights = dense.scatter_add_(2, coef_rows[:, None, :].expand(coef.shape), weights)
                    coef_rows = None
                weights = matmul(weights, train_lo) if coef_rows is None else \
                    matmul(weights, _take_rows(train_lo, coef_rows))                         # (g, costs, D)
                scores = matmul(test_lo, weights.reshape(-1, dim).T).T + bias  # this operand order is faster on CPU
            classes = group_class[part].repeat_interleave(len(costs))
            aps[part] = batched_envelope_ap(scores, test_pos[classes], test_keep[classes]).reshape(-1, len(costs))
    aps = aps.cpu().numpy().reshape(len(samples), num_classes, len(costs))
    return aps.transpose(0, 2, 1)


def _normalized_test_rows(test_x: np.ndarray, device, score_dtype, normalized: bool) -> torch.Tensor:
    """The test rows in score_dtype, L2-normalised here unless already (they are only ranked, so
    score_dtype suffices)."""
    test_lo = torch.as_tensor(test_x, device=device).to(score_dtype)
    return test_lo if normalized else _torch_l2_normalize(test_lo)


def _test_kernel(train_rows: torch.Tensor, test_x: np.ndarray, device, score_dtype, normalized: bool):
    """(N, M) products of every training row (as the solver sees them) with every test row, in
    score_dtype."""
    return matmul(train_rows.to(score_dtype), _normalized_test_rows(test_x, device, score_dtype, normalized).T)


def _take_rows(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """table[index] for an index tensor of any shape (rows of a 2-D table, elements of a 1-D one),
    through index_select: 2.7-6x faster than advanced indexing on CPU for the gathers here
    (a chunk's test-kernel rows, the groups' blocks of the union Gram matrix)."""
    return table.index_select(0, index.reshape(-1)).reshape(*index.shape, *table.shape[1:])


def _group_solve(train_rows, gram_all, rows, valid, labels, costs, options: SolverOptions):
    """Group route: each group's own Gram matrix (float64, g x n x n, padding rows zeroed), as a
    block of gram_all (the Gram matrix of all training rows) or else from its rows; returns the
    coefficients (g, costs, n) over each group's rows, and those rows."""
    if gram_all is None:
        x_rows = _take_rows(train_rows, rows)                                            # (g, n, D)
        gram = matmul(x_rows, x_rows.transpose(1, 2)) + 1.0
        del x_rows
    else:
        gram = _take_rows(gram_all.reshape(-1), rows[:, :, None] * gram_all.shape[1] + rows[:, None, :])
    if not bool(valid.all()):                                # padding rows: zero rows/columns
        gram.mul_(valid[:, :, None] & valid[:, None, :])
    labels = labels[:, None, :]
    coef, _ = options.solve_costs(KernelRows.from_gram(gram), labels,
                                  _weighted_costs(labels, options) * valid[:, None, :], costs)
    return coef[:, 0] * valid[:, None, :], rows


def _union_solve(kernel: KernelRows, rows, valid, labels, costs, options: SolverOptions, max_cold: int):
    """Union route: every problem of the chunk over the Gram matrix of all N training rows, each
    with zero cost outside its group's rows. All groups' problems share K, so each product is one
    large matrix product: the cold costs in batches of at most max_cold problems, each warm-started
    cost with one problem per group of the chunk. Returns coefficients (g, costs, N) over all
    training rows."""
    num_rows = kernel.gram.shape[-1]
    g = rows.shape[0]
    full_labels = torch.full((g, num_rows), -1.0, dtype=kernel.gram.dtype, device=kernel.gram.device)
    full_weights = torch.zeros_like(full_labels)
    group_of = torch.arange(g, device=rows.device)[:, None].expand_as(rows)[valid]    # padding slots left out
    full_labels[group_of, rows[valid]] = labels[valid]
    full_weights[group_of, rows[valid]] = _weighted_costs(labels, options)[valid]
    coef, _ = options.solve_costs(kernel, full_labels[None], full_weights[None], costs,
                                  max_cold=max_cold)                                     # (1, g, costs, N)
    return coef[0], None


def aggregate_lowshot(aps: np.ndarray, costs: Sequence[float]) -> Dict[str, float]:
    """aggregate_low_shot_svm_stats.py: per cost, mAP per sample; pick the cost with the best
    mean over samples (on the test set, the published rule); report stats at that cost, in %."""
    maps = aps.mean(axis=2) * 100.0              # (samples, costs)
    best = int(np.argmax(maps.mean(axis=0)))
    at_best = maps[:, best]
    return {"mAP": float(at_best.mean()), "std": float(at_best.std()), "min": float(at_best.min()),
            "max": float(at_best.max()), "cost": float(costs[best])}


# ----------------------------------------------------------------------------- synthetic features

def synthetic_voc_features(num_train: int, num_test: int, dim: int, seed: int = 0,
                           num_classes: int = 20, signal: float = 0.6):
    """Gaussian-mixture stand-ins for VOC07 features (tests and benchmarks/svm_voc07.py).

    Each image holds each class with probability 4-25 % (at least one class), marked
    difficult-only (-1) with probability 3 %; features are ReLU(noise + sum of the prototypes of
    its classes), non-negative like pooled CNN features. Returns float32 features and int8 targets.
    """
    rng = np.random.default_rng(seed)
    prototypes = rng.normal(size=(num_classes, dim)) * signal
    rates = rng.uniform(0.04, 0.25, size=num_classes)

    def split(n):
        present = rng.random((n, num_classes)) < rates
        present[np.arange(n), rng.integers(0, num_classes, n)] |= ~present.any(axis=1)
        targets = present.astype(np.int8)
        targets[(~present) & (rng.random((n, num_classes)) < 0.03)] = -1
        feats = np.maximum(rng.normal(size=(n, dim)) + present @ prototypes, 0.0)
        return feats.astype(np.float32), targets

    train_x, train_t = split(num_train)
    test_x, test_t = split(num_test)
    return train_x, train_t, test_x, test_t
