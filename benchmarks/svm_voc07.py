"""Wall time of the batched torch SVM solver vs the sklearn LinearSVC reference, same features.

Synthetic Gaussian-mixture VOC07 stand-ins (default 5011 x 8192 trainval, 4952 x 8192 test);
runs the full-SVM sweep (20 classes x 19 costs x 3 folds + refit) and a low-shot sweep
(samples x classes x costs for the chosen k) with both backends and prints times, the speed
ratio and the mAP difference. Use --n/--dim to run smaller, --device cuda for the GPU.
    python benchmarks/svm_voc07.py --n 1000 --dim 2048 --lowshot-k 8 --samples 1
"""
from __future__ import annotations

import argparse
import random
import time

import numpy as np
import torch

from densebench.protocols.voc_svm_common import (REFERENCE_COSTS, SolverOptions, aggregate_lowshot, full_svm_sweep,
                                                 lowshot_fit_and_test, sample_lowshot_targets, synthetic_voc_features)


def timed(fn):
    tic = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - tic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5011, help="trainval rows (test rows scale as 4952/5011)")
    parser.add_argument("--dim", type=int, default=8192)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--lowshot-k", type=int, nargs="+", default=[1, 8, 96])
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--skip-full", action="store_true")
    parser.add_argument("--skip-sklearn", action="store_true", help="time only the torch solver")
    args = parser.parse_args()
    n_test = max(1, round(args.n * 4952 / 5011))
    train_x, train_t, test_x, test_t = synthetic_voc_features(args.n, n_test, args.dim, seed=0, signal=0.06)
    ours = SolverOptions(backend="torch", device=args.device)
    ref = SolverOptions(backend="sklearn")
    print(f"features {args.n}x{args.dim} / {n_test}x{args.dim}, torch threads {torch.get_num_threads()}, "
          f"device {args.device}" + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else ""))
    if not args.skip_full:
        fast, t_fast = timed(lambda: full_svm_sweep(train_x, train_t, test_x, test_t, options=ours))
        print(f"full SVM  torch   {t_fast:9.2f} s  mAP {fast.mean_ap:.3f}")
        if not args.skip_sklearn:
            slow, t_slow = timed(lambda: full_svm_sweep(train_x, train_t, test_x, test_t, options=ref))
            print(f"full SVM  sklearn {t_slow:9.2f} s  mAP {slow.mean_ap:.3f}   "
                  f"speed-up {t_slow / t_fast:.1f}x   |mAP diff| {abs(fast.mean_ap - slow.mean_ap):.3f}")
    for k in args.lowshot_k:
        samples = [sample_lowshot_targets(train_t, k, random.Random(s)) for s in range(args.samples)]
        fast, t_fast = timed(lambda: lowshot_fit_and_test(train_x, samples, test_x, test_t, REFERENCE_COSTS, ours))
        a = aggregate_lowshot(fast, REFERENCE_COSTS)
        print(f"low-shot k={k:<3d} torch   {t_fast:9.2f} s  mAP {a['mAP']:.3f}")
        if not args.skip_sklearn:
            slow, t_slow = timed(lambda: lowshot_fit_and_test(train_x, samples, test_x, test_t, REFERENCE_COSTS, ref))
            b = aggregate_lowshot(slow, REFERENCE_COSTS)
            print(f"low-shot k={k:<3d} sklearn {t_slow:9.2f} s  mAP {b['mAP']:.3f}   "
                  f"speed-up {t_slow / t_fast:.1f}x   |mAP diff| {abs(a['mAP'] - b['mAP']):.3f}")


if __name__ == "__main__":
    main()
