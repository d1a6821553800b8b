"""Pieces shared by `svm_voc07` and `lowshot_svm_voc07` (PROTOCOLS.md section 2).

Everything here works on features already in memory, so tests and benchmarks run the exact
protocol pipelines on synthetic features:
    full_svm_sweep(train_x, train_targets, test_x, test_targets, ...)      section 2.3
    sample_lowshot_targets(train_targets, k, rng)                        section 2.4
    lowshot_sweep(...)                                                   section 2.4
Label encoding (section 2.2): 1 present, 0 absent, -1 difficult-only.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from densebench.protocols.svm_solver import LinearModels, RowBasis, SVMProblems, fit_svms, l2_normalize

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
    dtype: str = "float64"
    pos_weight: float = 2.0                # class_weight {+1: 2, -1: 1} (train_svm_kfold.py)
    neg_weight: float = 1.0
    sklearn_max_iter: int = 2000           # reference LinearSVC max_iter

    def fit(self, x: np.ndarray, labels, mask, costs, basis: Optional[RowBasis] = None) -> LinearModels:
        problems = SVMProblems(labels, mask, costs, self.pos_weight, self.neg_weight)
        return fit_svms(x, problems, backend=self.backend, device=self.device, tol=self.tol,
                        dtype=getattr(torch, self.dtype), basis=basis,
                        sklearn_max_iter=self.sklearn_max_iter)

    def basis(self, x: np.ndarray) -> Optional[RowBasis]:
        if self.backend != "torch":
            return None
        return RowBasis.build(x, device=self.device, dtype=getattr(torch, self.dtype))


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
                   num_folds: int = 3, options: Optional[SolverOptions] = None) -> FullSVMResult:
    """CV over costs per class with sklearn's AP definition, per-class argmax (first wins), refit, test AP."""
    options = options or SolverOptions()
    train_x, test_x = l2_normalize(train_x), l2_normalize(test_x)
    costs = np.asarray(costs, dtype=np.float64)
    num_rows, num_classes = train_targets.shape
    basis = options.basis(train_x)

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
    models = options.fit(train_x, np.stack(labels), np.stack(masks), np.array(problem_costs), basis)
    train_scores = models.decision(train_x)
    cv_sum = np.zeros((num_classes, len(costs)))
    for p, (c, j, held_out) in enumerate(index):
        scores = train_scores[p, held_out]
        y = train_labels(train_targets[held_out, c])
        cv_sum[c, j] += ranking_ap(scores, y == 1)
    cv_scores = cv_sum / num_folds
    chosen = costs[np.argmax(cv_scores, axis=1)]               # argmax: first maximum wins

    refit_labels = np.stack([train_labels(train_targets[:, c]) for c in range(num_classes)])
    refit = options.fit(train_x, refit_labels, np.ones_like(refit_labels, dtype=bool), chosen, basis)
    aps = aps_on_test(refit.decision(test_x), test_targets, np.arange(num_classes))
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
                         options: Optional[SolverOptions] = None, normalized: bool = False) -> np.ndarray:
    """Test APs (len(samples), num_costs, num_classes) for low-shot target matrices.

    For each class of each sample: train on the rows whose label != -1 (0 becomes -1), no CV,
    every cost; test on the full test set without difficult rows. All samples, classes and
    costs go to the solver as one batch, over the union of the rows any of them uses.
    """
    options = options or SolverOptions()
    if not normalized:
        train_x, test_x = l2_normalize(train_x), l2_normalize(test_x)
    costs = np.asarray(costs, dtype=np.float64)
    num_classes = test_targets.shape[1]
    used = np.flatnonzero(np.any([np.any(s != -1, axis=1) for s in samples], axis=0))
    sub_x = train_x[used]
    basis = options.basis(sub_x)
    labels, masks, problem_costs, classes = [], [], [], []
    for sample in samples:
        sub = sample[used]
        for c in range(num_classes):
            for cost in costs:
                labels.append(np.where(sub[:, c] == 1, 1, -1).astype(np.int8))
                masks.append(sub[:, c] != -1)
                problem_costs.append(cost)
                classes.append(c)
    models = options.fit(sub_x, np.stack(labels), np.stack(masks), np.array(problem_costs), basis)
    aps = aps_on_test(models.decision(test_x), test_targets, np.array(classes))
    return aps.reshape(len(samples), num_classes, len(costs)).transpose(0, 2, 1)


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
