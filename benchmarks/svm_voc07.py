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
    python benchmarks/svm_voc07.py --device cuda --sklearn-procs 15    # GPU vs reference in 15 processes
--sklearn-procs P runs the reference one class per task in P single-threaded processes, as the
reference scripts run one process per class; its time is then the sum of the tasks' times (the
time of one core doing it all), divided by a measured contention factor (processes sharing the
memory bandwidth run slower than one alone), and the pool's wall time is printed beside it. It
makes the full-size reference fit inside a GPU session (one core: ~15 min for the full sweep alone).
"""
from __future__ import annotations

import argparse
import multiprocessing
import random
import time

import numpy as np
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


# Features and low-shot samples for the reference's worker processes, which inherit them by fork.
SHARED: dict = {}


def warm_reference_worker() -> None:
    """Pay the worker's imports and first fit before any timed task."""
    from sklearn.svm import LinearSVC

    LinearSVC().fit(np.eye(4), [0, 1, 0, 1])


def reference_task(task):
    """One class of one reference sweep, single-threaded: (APs, seconds, fit seconds)."""
    from threadpoolctl import threadpool_limits

    sweep, c = task
    torch.set_num_threads(1)
    ref, timings = SolverOptions(backend="sklearn"), {}
    with threadpool_limits(1):
        tic = time.perf_counter()
        if sweep == "full":
            aps = full_svm_sweep(SHARED["train_x"], SHARED["train_t"][:, [c]], SHARED["test_x"],
                                 SHARED["test_t"][:, [c]], options=ref, timings=timings).class_aps
        else:
            aps = lowshot_fit_and_test(SHARED["train_n"], [s[:, [c]] for s in SHARED["samples"][sweep]],
                                       SHARED["test_n"], SHARED["test_t"][:, [c]], REFERENCE_COSTS, ref,
                                       normalized=True, timings=timings)
        return aps, time.perf_counter() - tic, timings["fit"]


def reference_in_pool(pool, sweep, num_classes: int):
    """The reference sweep split by class over the pool -> (mAP, summed seconds, summed fit seconds).

    Processes that share the memory bandwidth run slower than one alone, so the first sweep
    reruns one class task with the pool otherwise idle; the ratio of the two times (the
    contention factor, printed) divides every summed time after it."""
    tic = time.perf_counter()
    parts = pool.map(reference_task, [(sweep, c) for c in range(num_classes)], chunksize=1)
    wall = time.perf_counter() - tic
    if "contention" not in SHARED:
        probe = min(pool._processes, num_classes) // 2          # a task that ran while all processes were busy
        alone = pool.apply(reference_task, ((sweep, probe),))[1]
        SHARED["contention"] = max(1.0, parts[probe][1] / alone)
        print(f"  (reference contention factor {SHARED['contention']:.2f}: class {probe} took {parts[probe][1]:.1f} s "
              f"in the busy pool, {alone:.1f} s alone; summed times below are divided by it)", flush=True)
    factor = SHARED["contention"]
    seconds, fit = sum(p[1] for p in parts) / factor, sum(p[2] for p in parts) / factor
    print(f"  (reference {sweep if sweep == 'full' else f'k={sweep}'}: {len(parts)} class tasks on "
          f"{pool._processes} processes, {wall:.1f} s wall, {seconds * factor:.1f} s summed)", flush=True)
    if sweep == "full":
        return float(np.concatenate([p[0] for p in parts]).mean() * 100.0), seconds, fit
    return aggregate_lowshot(np.concatenate([p[0] for p in parts], axis=2), REFERENCE_COSTS)["mAP"], seconds, fit


def reference_result(ref, pool, sweep, num_classes: int, in_process):
    """(mAP, seconds, fit seconds) of the reference for one sweep: in the pool, in this process
    (in_process() returns the same triple), or Nones when the reference is skipped."""
    if ref is None:
        return None, None, None
    if pool is not None:
        return reference_in_pool(pool, sweep, num_classes)
    return in_process()


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
    parser.add_argument("--lowshot-scoring", default="auto", choices=("auto", "weights", "kernel"),
                        help="torch low-shot test scores: through the weights, the test kernel, or the cheaper")
    parser.add_argument("--sklearn-procs", type=int, default=1,
                        help="reference: class tasks in this many single-threaded processes (1: in this process)")
    args = parser.parse_args()
    retained = retain_freed_memory()          # as the densebench CLI does; helps both backends alike
    n_test = max(1, round(args.n * 4952 / 5011))
    train_x, train_t, test_x, test_t = synthetic_voc_features(args.n, n_test, args.dim, seed=0, signal=0.06)
    train_n, test_n = l2_normalize(train_x), l2_normalize(test_x)
    ours = SolverOptions(backend="torch", device=args.device, cg_dtype=args.cg_dtype, lowshot_basis=args.lowshot_basis,
                         lowshot_scoring=args.lowshot_scoring)
    ref = None if args.skip_sklearn else SolverOptions(backend="sklearn")
    all_samples = {k: [sample_lowshot_targets(train_t, k, random.Random(s)) for s in range(args.samples)]
                   for k in args.lowshot_k}
    pool = None
    if ref is not None and args.sklearn_procs > 1:
        # forked before this process runs any torch/BLAS work (a fork after OpenMP has run can hang)
        SHARED.update(train_x=train_x, train_t=train_t, test_x=test_x, test_t=test_t, train_n=train_n,
                      test_n=test_n, samples=all_samples)
        pool = multiprocessing.get_context("fork").Pool(args.sklearn_procs, initializer=warm_reference_worker)
    print(f"features {args.n}x{args.dim} / {n_test}x{args.dim}, torch threads {torch.get_num_threads()}, "
          f"device {args.device}" + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else "")
          + f", freed memory retained: {retained}"
          + (f", reference in {args.sklearn_procs} processes" if pool else ""), flush=True)
    warm_up([o for o in (ours, ref if pool is None else None) if o is not None])
    num_classes = train_t.shape[1]
    if not args.skip_full:
        fast, t_fast, f_fast = timed(lambda t: full_svm_sweep(train_x, train_t, test_x, test_t, options=ours, timings=t))
        def full_in_process():
            slow, seconds, fit = timed(lambda t: full_svm_sweep(train_x, train_t, test_x, test_t, options=ref,
                                                                timings=t))
            return slow.mean_ap, seconds, fit
        slow_map, t_slow, f_slow = reference_result(ref, pool, "full", num_classes, full_in_process)
        report("full SVM", fast.mean_ap, t_fast, f_fast, slow_map, t_slow, f_slow)
    basis_cache: dict = {}
    totals = {"ours": [0.0, 0.0], "ref": [0.0, 0.0]}
    for k in args.lowshot_k:
        samples = all_samples[k]

        def sweep(options, cache=None):
            return lambda t: lowshot_fit_and_test(train_n, samples, test_n, test_t, REFERENCE_COSTS, options,
                                                  normalized=True, timings=t, basis_cache=cache)
        fast, t_fast, f_fast = timed(sweep(ours, basis_cache))
        def lowshot_in_process():
            slow, seconds, fit = timed(sweep(ref))
            return aggregate_lowshot(slow, REFERENCE_COSTS)["mAP"], seconds, fit
        slow_map, t_slow, f_slow = reference_result(ref, pool, k, num_classes, lowshot_in_process)
        report(f"low-shot k={k}", aggregate_lowshot(fast, REFERENCE_COSTS)["mAP"], t_fast, f_fast,
               slow_map, t_slow, f_slow)
        totals["ours"] = [totals["ours"][0] + t_fast, totals["ours"][1] + f_fast]
        if ref is not None:
            totals["ref"] = [totals["ref"][0] + t_slow, totals["ref"][1] + f_slow]
    if len(args.lowshot_k) > 1 and ref is not None:
        (t_fast, f_fast), (t_slow, f_slow) = totals["ours"], totals["ref"]
        print(f"low-shot, all k: torch {t_fast:.2f} s (fit {f_fast:.2f} s), sklearn {t_slow:.2f} s (fit {f_slow:.2f} s)"
              f"   speed-up {t_slow / t_fast:.1f}x (fit only {f_slow / f_fast:.1f}x)", flush=True)
    if pool is not None:
        pool.close()
        pool.join()


if __name__ == "__main__":
    main()
