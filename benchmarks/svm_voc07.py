"""Wall time of the batched torch SVM solver vs the sklearn LinearSVC reference, same features.

Synthetic Gaussian-mixture VOC07 stand-ins (default 5011 x 8192 trainval, 4952 x 8192 test);
runs the full-SVM sweep (20 classes x 19 costs x 3 folds + refit) and a low-shot sweep
(samples x classes x costs for each k) with both backends and prints, per sweep, the whole
pipeline time (fit + scoring + AP), the solver-only time ("fit"), the speed ratios and the mAP
difference. Both backends run after a small warm-up (imports, CUDA context), in one process.
As in the protocols, the features are L2-normalised once (outside the timings) and the torch
backend keeps the Gram matrix of all training rows across the low-shot k (basis_cache): the
first k that needs it (the union route, large k) pays for building it. A last line sums the
low-shot sweep over all k. Set the threads with OMP_NUM_THREADS (liblinear is single-threaded;
OMP_NUM_THREADS=1 compares per core). Use --n/--dim to run smaller, --device cuda for the GPU:
    python benchmarks/svm_voc07.py --n 1000 --dim 2048 --lowshot-k 1 8 --samples 2
    python benchmarks/svm_voc07.py --device cuda --skip-sklearn        # GPU times only
"""
from __future__ import annotations

import argparse
import random
import time

import torch

from densebench.protocols.svm_solver import l2_normalize
from densebench.system import retain_freed_memory
from densebench.protocols.voc_svm_common import (REFERENCE_COSTS, SolverOptions, aggregate_lowshot, full_svm_sweep,
                                                 lowshot_fit_and_test, sample_lowshot_targets, synthetic_voc_features)


def timed(fn):
    timings: dict = {}
    tic = time.perf_counter()
    out = fn(timings)
    return out, time.perf_counter() - tic, timings.get("fit", float("nan"))


def warm_up(options) -> None:
    """Pay imports, BLAS/CUDA initialisation and allocator growth outside the timed runs."""
    train_x, train_t, test_x, test_t = synthetic_voc_features(60, 30, 32, seed=1)
    for opt in options:
        full_svm_sweep(train_x, train_t, test_x, test_t, costs=REFERENCE_COSTS[:2], options=opt)
        sample = [sample_lowshot_targets(train_t, 1, random.Random(0))]
        lowshot_fit_and_test(train_x, sample, test_x, test_t, REFERENCE_COSTS[:2], opt)


def report(name, ours, t_ours, fit_ours, ref, t_ref, fit_ref) -> None:
    print(f"{name:<13s} torch   {t_ours:9.2f} s (fit {fit_ours:8.2f} s)  mAP {ours:.3f}")
    if ref is not None:
        print(f"{name:<13s} sklearn {t_ref:9.2f} s (fit {fit_ref:8.2f} s)  mAP {ref:.3f}   "
              f"speed-up {t_ref / t_ours:.1f}x (fit only {fit_ref / fit_ours:.1f}x)   "
              f"|mAP diff| {abs(ours - ref):.3f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5011, help="trainval rows (test rows scale as 4952/5011)")
    parser.add_argument("--dim", type=int, default=8192)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--lowshot-k", type=int, nargs="*", default=[1, 8, 96], help="k values (none: skip low-shot)")
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--skip-full", action="store_true")
    parser.add_argument("--skip-sklearn", action="store_true", help="time only the torch solver")
    parser.add_argument("--cg-dtype", default="float32", help="torch solver: dtype of the CG products")
    parser.add_argument("--lowshot-basis", default="auto", choices=("auto", "group", "union"),
                        help="torch low-shot: Gram matrix per (sample, class), of all rows, or the cheaper")
    args = parser.parse_args()
    retained = retain_freed_memory()          # as the densebench CLI does; helps both backends alike
    n_test = max(1, round(args.n * 4952 / 5011))
    train_x, train_t, test_x, test_t = synthetic_voc_features(args.n, n_test, args.dim, seed=0, signal=0.06)
    train_n, test_n = l2_normalize(train_x), l2_normalize(test_x)
    ours = SolverOptions(backend="torch", device=args.device, cg_dtype=args.cg_dtype, lowshot_basis=args.lowshot_basis)
    ref = None if args.skip_sklearn else SolverOptions(backend="sklearn")
    print(f"features {args.n}x{args.dim} / {n_test}x{args.dim}, torch threads {torch.get_num_threads()}, "
          f"device {args.device}" + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else "")
          + f", freed memory retained: {retained}", flush=True)
    warm_up([o for o in (ours, ref) if o is not None])
    if not args.skip_full:
        fast, t_fast, f_fast = timed(lambda t: full_svm_sweep(train_x, train_t, test_x, test_t, options=ours, timings=t))
        slow, t_slow, f_slow = (None, None, None) if ref is None else timed(
            lambda t: full_svm_sweep(train_x, train_t, test_x, test_t, options=ref, timings=t))
        report("full SVM", fast.mean_ap, t_fast, f_fast, None if slow is None else slow.mean_ap, t_slow, f_slow)
    basis_cache: dict = {}
    totals = {"ours": [0.0, 0.0], "ref": [0.0, 0.0]}
    for k in args.lowshot_k:
        samples = [sample_lowshot_targets(train_t, k, random.Random(s)) for s in range(args.samples)]

        def sweep(options, cache=None):
            return lambda t: lowshot_fit_and_test(train_n, samples, test_n, test_t, REFERENCE_COSTS, options,
                                                  normalized=True, timings=t, basis_cache=cache)
        fast, t_fast, f_fast = timed(sweep(ours, basis_cache))
        slow, t_slow, f_slow = (None, None, None) if ref is None else timed(sweep(ref))
        report(f"low-shot k={k}", aggregate_lowshot(fast, REFERENCE_COSTS)["mAP"], t_fast, f_fast,
               None if slow is None else aggregate_lowshot(slow, REFERENCE_COSTS)["mAP"], t_slow, f_slow)
        totals["ours"] = [totals["ours"][0] + t_fast, totals["ours"][1] + f_fast]
        if slow is not None:
            totals["ref"] = [totals["ref"][0] + t_slow, totals["ref"][1] + f_slow]
    if len(args.lowshot_k) > 1 and ref is not None:
        (t_fast, f_fast), (t_slow, f_slow) = totals["ours"], totals["ref"]
        print(f"low-shot, all k: torch {t_fast:.2f} s (fit {f_fast:.2f} s), sklearn {t_slow:.2f} s (fit {f_slow:.2f} s)"
              f"   speed-up {t_slow / t_fast:.1f}x (fit only {f_slow / f_fast:.1f}x)", flush=True)


if __name__ == "__main__":
    main()
