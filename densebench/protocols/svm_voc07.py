"""VOC07 SVM (PROTOCOLS.md 2.1-2.3): linear SVMs on frozen multi-pooled features.

Per layer: L2-normalised features; per class a squared-hinge L2 linear SVM with intercept and
class weight {+1: 2, -1: 1} for each of the 19 costs; 3-fold stratified CV with AP scoring;
per-class argmax of the CV AP (first wins); refit on all trainval; test AP = area under the
precision envelope with difficult images dropped; mAP over the 20 classes, in percent.
All (class, cost, fold) fits of a layer go to one batched solver (protocols/svm_solver.py);
`svm_backend: sklearn` runs the reference LinearSVC fits instead.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated, Dict, Literal, Tuple

import numpy as np

from densebench.config import PositiveFloat, PositiveInt, Rule
from densebench.data.layout import voc07_root
from densebench.data.voc import VOC_CLASSES, read_voc_cls_labels, voc_image_path
from densebench.evaluate.backbone import LAYERS
from densebench.evaluate.context import ProtocolOutput, RunContext
from densebench.evaluate.features import extract_features, save_feature_file, voc_preprocess
from densebench.protocols.svm_solver import BACKENDS as SVM_BACKENDS
from densebench.protocols.voc_svm_common import REFERENCE_COSTS, SolverOptions, full_svm_sweep

NAME = "svm_voc07"
CrossValidationFolds = Annotated[int, Rule(">= 2", lambda v: v >= 2)]


@dataclass
class Config:
    # Layers: the issue asks for all five; the reference script's FEAT_LIST default is feat5 only
    # and the published number is feature5 ("best layer"), PROTOCOLS.md 2.1.
    layers: Tuple[Literal[LAYERS], ...] = LAYERS
    costs: Tuple[PositiveFloat, ...] = REFERENCE_COSTS  # 2.3: 1, 10, 100, then 0.5^4 .. 0.5^19
    cv_folds: CrossValidationFolds = 3               # 2.3: cross_val_score(cv=3)
    pos_weight: PositiveFloat = 2.0                  # 2.3: class_weight {+1: 2, -1: 1}
    neg_weight: PositiveFloat = 1.0
    resize_short: PositiveInt = 256                  # 2.1: resize shorter side 256 ...
    image_size: PositiveInt = 224                    # ... then squash to 224 x 224
    batch_size: PositiveInt = 256
    amp: bool = True                                 # fp16 autocast on CUDA (the reference used fp32)
    svm_backend: Literal[SVM_BACKENDS] = "torch"     # "torch" (batched) or "sklearn" (reference LinearSVC)
    svm_tol: PositiveFloat = 1e-6                    # torch solver: relative gradient-norm stop
    svm_dtype: Literal["float64", "float32"] = "float64"  # 2.3: float64 features


def solver_options(ctx: RunContext, cfg) -> SolverOptions:
    return SolverOptions(backend=cfg.svm_backend, device=str(ctx.device), tol=cfg.svm_tol,
                         dtype=cfg.svm_dtype, pos_weight=cfg.pos_weight, neg_weight=cfg.neg_weight)


def load_voc07_features(ctx: RunContext, cfg, layers) -> Dict[str, Dict[str, np.ndarray]]:
    """{"trainval"/"test": {"labels": int8 (N, 20), layer: float32 (N, D), ...}} (cached, saved)."""
    root = voc07_root(ctx.data_root)
    preprocess = voc_preprocess(cfg.resize_short, cfg.image_size, cfg.amp)
    out = {}
    for split in ("trainval", "test"):
        ids, labels = read_voc_cls_labels(root, split)
        paths = [voc_image_path(root, image_id) for image_id in ids]
        feats = extract_features(ctx, "voc07", split, paths, layers, preprocess, cfg.batch_size)
        for layer, array in feats.items():
            save_feature_file(ctx, f"voc07_{split}_{layer}", array)
        save_feature_file(ctx, f"voc07_{split}_labels", labels)
        out[split] = {"labels": labels, **feats}
    return out


def run(ctx: RunContext, cfg: Config) -> ProtocolOutput:
    data = load_voc07_features(ctx, cfg, cfg.layers)
    train, test = data["trainval"], data["test"]
    options = solver_options(ctx, cfg)
    metrics: Dict[str, object] = {}
    extra: Dict[str, object] = {"classes": list(VOC_CLASSES), "per_layer": {}}
    for layer in cfg.layers:
        tic = time.perf_counter()
        result = full_svm_sweep(train[layer], train["labels"], test[layer], test["labels"],
                                costs=cfg.costs, num_folds=cfg.cv_folds, options=options)
        metrics[layer] = {"mAP": result.mean_ap}
        extra["per_layer"][layer] = {
            "dim": int(train[layer].shape[1]),
            "class_AP": [float(ap * 100.0) for ap in result.class_aps],
            "chosen_cost": [float(c) for c in result.chosen_costs],
            "cv_AP": (result.cv_scores * 100.0).round(4).tolist(),
            "svm_wall_s": round(time.perf_counter() - tic, 3),
        }
    metrics["best_layer"] = max(cfg.layers, key=lambda layer: metrics[layer]["mAP"])
    extra["note"] = ("test AP = area under the precision envelope (not 11-point); difficult test "
                     "images dropped per class, difficult train images are negatives")
    return ProtocolOutput(metrics=metrics, extra=extra,
                          data={"root": str(voc07_root(ctx.data_root)),
                                "splits": {"trainval": int(train["labels"].shape[0]),
                                           "test": int(test["labels"].shape[0])}})
