"""VOC07 low-shot SVM (PROTOCOLS.md 2.4): k positives + 19k negatives per class, 5 samples.

Per layer (default feat5, the published "feature5" row; the reference sweep runs one layer at
a time too) and per k in 1, 2, 4, ..., 96: draw 5 samples as create_voc_low_shot_challenge_samples.py
does but from a recorded seed; for every (sample, class, cost) train the reference SVM on the
sampled rows (no CV) and compute the test AP on full VOC07 test (difficult dropped).
Cost selection (`cost_selection`):
  "test_mean" (published, aggregate_low_shot_svm_stats.py): the cost that maximises the mean
      test mAP over the samples; mean/std/min/max over samples at that cost.
  "cv": per (sample, class), argmax of a stratified CV AP over the sampled training rows
      (min(3, k) folds). Not the published protocol, so never comparable; undefined for k = 1
      (one positive cannot be split), which is then reported as null.
Progress is saved per (layer, sample, k) under ctx.work_dir, so an interrupted sweep resumes.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Literal, Optional, Tuple

import numpy as np
from tqdm import tqdm

from densebench import distributed as dist_utils
from densebench.config import PositiveFloat, PositiveInt
from densebench.data.layout import voc07_root
from densebench.data.voc import VOC_CLASSES
from densebench.evaluate.backbone import LAYERS
from densebench.evaluate.context import ProtocolOutput, RunContext
from densebench.io import write_json_atomic
from densebench.protocols.svm_voc07 import load_voc07_features, solver_options
from densebench.protocols.svm_solver import BACKENDS as SVM_BACKENDS
from densebench.protocols.svm_solver import l2_normalize
from densebench.protocols.voc_svm_common import (LOWSHOT_KS, REFERENCE_COSTS, SolverOptions, aggregate_lowshot,
                                                 lowshot_fit_and_test, lowshot_rng, ranking_ap,
                                                 sample_lowshot_targets, stratified_folds)

NAME = "lowshot_svm_voc07"
COST_SELECTIONS = ("test_mean", "cv")


@dataclass
class Config:
    layers: Tuple[Literal[LAYERS], ...] = ("feat5",)  # README low-shot row = feature5
    ks: Tuple[PositiveInt, ...] = LOWSHOT_KS          # 2.4: 1, 2, 4, 8, 16, 32, 64, 96
    num_samples: PositiveInt = 5                      # 2.4: 5 independent samples
    costs: Tuple[PositiveFloat, ...] = REFERENCE_COSTS  # 2.4: same 19 costs as the full SVM
    cost_selection: Literal[COST_SELECTIONS] = "test_mean"  # 2.4: published rule (chosen on test)
    pos_weight: PositiveFloat = 2.0                   # same LinearSVC settings as 2.3
    neg_weight: PositiveFloat = 1.0
    resize_short: PositiveInt = 256
    image_size: PositiveInt = 224
    batch_size: PositiveInt = 256
    amp: bool = True
    svm_backend: Literal[SVM_BACKENDS] = "torch"
    svm_tol: PositiveFloat = 1e-6
    svm_dtype: Literal["float64", "float32"] = "float64"


# ----------------------------------------------------------------------------- resumable state

def _state_file(ctx: RunContext, layer: str, sample: int, k: int) -> Path:
    return Path(ctx.work_dir) / "lowshot" / layer / f"sample{sample}_k{k}.json"


def _state_key(ctx: RunContext, cfg: Config, arrays: Tuple[np.ndarray, ...] = ()) -> dict:
    """What a stored (sample, k) result depends on besides the work dir (which already names the
    checkpoint and config): the seed, the solver, and the features and labels themselves, so a
    rerun on replaced images (same checkpoint, same config) does not reuse stale APs."""
    digest = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(memoryview(array).cast("B"))
    return {"seed": ctx.seed, "costs": list(cfg.costs), "selection": cfg.cost_selection,
            "backend": cfg.svm_backend, "tol": cfg.svm_tol, "data": digest.hexdigest()[:16]}


def _load_state(path: Path, key: dict) -> Optional[dict]:
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return state if state.get("key") == key else None


# ----------------------------------------------------------------------------- CV option

def lowshot_cv_scores(train_x: np.ndarray, sample: np.ndarray, costs, options: SolverOptions) -> Optional[np.ndarray]:
    """Mean stratified-CV AP (num_costs, num_classes) on the sampled rows; None if k < 2."""
    num_classes = sample.shape[1]
    labels, masks, problem_costs, index = [], [], [], []
    for c in range(num_classes):
        rows = np.flatnonzero(sample[:, c] != -1)
        y_rows = np.where(sample[rows, c] == 1, 1, -1)
        folds = min(3, int((y_rows == 1).sum()))
        if folds < 2:
            return None
        y = np.where(sample[:, c] == 1, 1, -1).astype(np.int8)
        for held_out in stratified_folds(y_rows, folds):
            mask = sample[:, c] != -1
            mask[rows[held_out]] = False
            for j, cost in enumerate(costs):
                labels.append(y)
                masks.append(mask)
                problem_costs.append(cost)
                index.append((c, j, rows[held_out], folds))
    used = np.flatnonzero((sample != -1).any(axis=1))
    models = options.fit(train_x[used], np.stack(labels)[:, used], np.stack(masks)[:, used], np.array(problem_costs))
    scores = models.decision(train_x)
    cv = np.zeros((len(costs), num_classes))
    for p, (c, j, held, folds) in enumerate(index):
        cv[j, c] += ranking_ap(scores[p, held], sample[held, c] == 1) / folds
    return cv


# ----------------------------------------------------------------------------- sweep

def run_layer(ctx: RunContext, cfg: Config, layer: str, train_x, train_targets, test_x, test_targets,
              options: SolverOptions, progress=None) -> Dict[int, List[dict]]:
    """{k: [state per sample]}; each state holds the (costs x classes) test APs of one sample."""
    key = _state_key(ctx, cfg, (train_x, train_targets, test_x, test_targets))
    out: Dict[int, List[dict]] = {}
    basis_cache: dict = {}            # the Gram matrix of all training rows, built once for the large k
    for k in cfg.ks:
        states: Dict[int, dict] = {}
        pending, samples = [], []
        for s in range(cfg.num_samples):
            state = _load_state(_state_file(ctx, layer, s, k), key)
            if state is None:
                pending.append(s)
                samples.append(sample_lowshot_targets(train_targets, k, lowshot_rng(ctx.seed, s, k)))
            else:
                states[s] = state
        if pending:
            aps = lowshot_fit_and_test(train_x, samples, test_x, test_targets, cfg.costs, options, normalized=True,
                                       basis_cache=basis_cache)
            for s, sample, sample_aps in zip(pending, samples, aps):
                state = {"key": key, "layer": layer, "k": k, "sample": s, "test_AP": sample_aps.tolist(),
                         "positives_per_class": (sample == 1).sum(axis=0).tolist()}
                if cfg.cost_selection == "cv":
                    cv = lowshot_cv_scores(train_x, sample, cfg.costs, options)
                    state["cv_AP"] = None if cv is None else cv.tolist()
                write_json_atomic(_state_file(ctx, layer, s, k), state)
                states[s] = state
        if progress is not None:
            progress.update(1)
        out[k] = [states[s] for s in range(cfg.num_samples)]
    return out


def summarize(states: List[dict], costs, selection: str) -> Optional[dict]:
    """mAP mean/std/min/max over samples (percent) under the chosen cost-selection rule."""
    aps = np.array([state["test_AP"] for state in states])          # (samples, costs, classes)
    if selection == "test_mean":
        return aggregate_lowshot(aps, costs)
    if any(state.get("cv_AP") is None for state in states):
        return None
    per_sample = []
    for state, sample_aps in zip(states, aps):
        chosen = np.argmax(np.array(state["cv_AP"]), axis=0)          # per class, first max wins
        per_sample.append(sample_aps[chosen, np.arange(aps.shape[2])].mean() * 100.0)
    per_sample = np.array(per_sample)
    return {"mAP": float(per_sample.mean()), "std": float(per_sample.std()),
            "min": float(per_sample.min()), "max": float(per_sample.max())}


def run(ctx: RunContext, cfg: Config) -> ProtocolOutput:
    if cfg.cost_selection not in COST_SELECTIONS:
        raise ValueError(f"cost_selection must be one of {COST_SELECTIONS}, got {cfg.cost_selection!r}")
    data = load_voc07_features(ctx, cfg, cfg.layers)
    train, test = data["trainval"], data["test"]
    options = solver_options(ctx, cfg)
    metrics: Dict[str, object] = {}
    extra: Dict[str, object] = {"classes": list(VOC_CLASSES), "seed": ctx.seed, "cost_selection": cfg.cost_selection,
                                "per_layer": {}}
    with tqdm(total=len(cfg.layers) * len(cfg.ks), desc="low-shot SVM",
              disable=not ctx.show_progress or not dist_utils.is_main()) as progress:
        for layer in cfg.layers:
            train_x, test_x = l2_normalize(train[layer]), l2_normalize(test[layer])
            states = run_layer(ctx, cfg, layer, train_x, train["labels"], test_x, test["labels"], options, progress)
            metrics[layer] = {f"k{k}": summarize(states[k], cfg.costs, cfg.cost_selection) for k in cfg.ks}
            extra["per_layer"][layer] = {
                f"k{k}": {"mAP_per_sample_and_cost": (np.array([s["test_AP"] for s in states[k]]).mean(axis=2)
                                                      * 100.0).round(4).tolist(),
                          "min_positives": int(min(min(s["positives_per_class"]) for s in states[k]))}
                for k in cfg.ks}
    extra["note"] = ("samples drawn per (seed, sample, k) with random.Random('densebench-lowshot-{seed}-{sample}-{k}'); "
                     "a class with fewer than k positives or 19k negatives uses all it has (see min_positives)")
    if cfg.cost_selection == "cv":
        extra["note"] += "; cost chosen by CV on the training rows: not the published rule, not comparable"
    return ProtocolOutput(metrics=metrics, extra=extra,
                          data={"root": str(voc07_root(ctx.data_root)),
                                "splits": {"trainval": int(train["labels"].shape[0]),
                                           "test": int(test["labels"].shape[0])}})
