"""torch's CPU matrix products vs numpy's (svm_solver.matmul) for the SVM solver's shapes.

The batched SVM solver and the low-shot scoring send their large CPU products through numpy
(the OpenBLAS that numpy's wheels ship) instead of torch (MKL in the PyPI wheels), because on
the AMD EPYC CI machine numpy's ran them faster. This prints, per shape, the median time of
each and the ratio torch / numpy, measured alternately in one process, so the choice can be
checked on any machine (a ratio below 1 means torch is faster there):
    OMP_NUM_THREADS=1 python benchmarks/blas_products.py
    OMP_NUM_THREADS=1 python benchmarks/blas_products.py --scale 0.5      # smaller shapes
`--sweeps N,D` instead times the whole SVM protocols (full sweep; low-shot k = 1 and 96, 5
samples) on synthetic N x D features, with the products through numpy and through torch in turn,
and prints both mAPs (the dispatch changes float32 rounding only):
    OMP_NUM_THREADS=1 python benchmarks/blas_products.py --sweeps 100,2048 --repeats 5    # tiny preset size
    OMP_NUM_THREADS=1 python benchmarks/blas_products.py --sweeps 5011,8192 --repeats 1   # VOC07 size
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from densebench.protocols.svm_solver import matmul
from densebench.system import retain_freed_memory


def shapes(scale: float):
    """(name, a shape, b shape, dtype) of the sweeps' products at VOC07 size, scaled."""
    n, m, d = (max(8, int(v * scale)) for v in (5011, 4952, 8192))
    g = max(8, int(1280 * scale))
    return [
        ("union CG product, 1900 problems (float32)", (1900, n), (n, n), torch.float32),
        ("union gradient product, 100 problems (float64)", (100, n), (n, n), torch.float64),
        ("group CG products, 100 x 16 problems (float32)", (100, 16, g), (100, g, g), torch.float32),
        ("group gradient products, 100 x 16 (float64)", (100, 16, g), (100, g, g), torch.float64),
        ("test kernel, train x test (float32)", (n, d), (d, m), torch.float32),
    ]


def median_times(functions, repeats: int):
    """Median seconds of each function, called in turn, so load changes hit all alike."""
    times = [[] for _ in functions]
    for _ in range(repeats):
        for fn, bucket in zip(functions, times):
            tic = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - tic)
    return [statistics.median(bucket) for bucket in times]


def time_sweeps(n: int, dim: int, repeats: int) -> None:
    """The SVM protocols end to end, products through numpy (svm_solver.matmul) vs torch's own."""
    import random

    from densebench.protocols import svm_solver, voc_svm_common as common
    from densebench.protocols.voc_svm_common import (REFERENCE_COSTS, aggregate_lowshot, full_svm_sweep,
                                                     lowshot_fit_and_test, sample_lowshot_targets,
                                                     synthetic_voc_features)

    through_numpy = svm_solver.matmul
    train_x, train_t, test_x, test_t = synthetic_voc_features(n, max(1, round(n * 4952 / 5011)), dim, signal=0.06)
    train_n, test_n = svm_solver.l2_normalize(train_x), svm_solver.l2_normalize(test_x)
    samples = {k: [sample_lowshot_targets(train_t, k, random.Random(s)) for s in range(5)] for k in (1, 96)}

    def full():
        return full_svm_sweep(train_x, train_t, test_x, test_t).mean_ap

    def lowshot():
        cache: dict = {}        # the low-shot protocol keeps the Gram matrix across k
        return [aggregate_lowshot(lowshot_fit_and_test(train_n, samples[k], test_n, test_t, REFERENCE_COSTS,
                                                       normalized=True, basis_cache=cache), REFERENCE_COSTS)["mAP"]
                for k in samples]

    for name, sweep in (("full SVM sweep", full), ("low-shot sweep, k = 1 and 96", lowshot)):
        results = {}

        def run(product, label):
            def call():
                svm_solver.matmul = common.matmul = product
                try:
                    results[label] = sweep()
                finally:
                    svm_solver.matmul = common.matmul = through_numpy
            return call
        run(through_numpy, "numpy")()                                 # warm-up
        t_numpy, t_torch = median_times([run(through_numpy, "numpy"), run(torch.matmul, "torch")], repeats)
        print(f"{name} ({n} x {dim}): torch {t_torch:.2f} s   numpy {t_numpy:.2f} s   torch / numpy "
              f"{t_torch / t_numpy:5.2f}   mAP numpy {results['numpy']} torch {results['torch']}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every dimension by this")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sweeps", metavar="N,D", help="time the SVM protocols on N x D features instead")
    args = parser.parse_args()
    retain_freed_memory()
    print(f"torch {torch.__version__} threads {torch.get_num_threads()}, numpy {np.__version__}")
    if args.sweeps:
        n, dim = (int(v) for v in args.sweeps.split(","))
        return time_sweeps(n, dim, args.repeats)
    generator = torch.Generator().manual_seed(0)
    for name, a_shape, b_shape, dtype in shapes(args.scale):
        a = torch.randn(a_shape, generator=generator, dtype=dtype)
        b = torch.randn(b_shape, generator=generator, dtype=dtype)
        ours, plain = (lambda: matmul(a, b)), (lambda: torch.matmul(a, b))
        torch.testing.assert_close(ours(), plain(), rtol=1e-4, atol=1e-2)
        t_numpy, t_torch = median_times([ours, plain], args.repeats)
        print(f"{name:<50s} torch {t_torch * 1e3:8.1f} ms   numpy {t_numpy * 1e3:8.1f} ms   "
              f"torch / numpy {t_torch / t_numpy:5.2f}", flush=True)


if __name__ == "__main__":
    main()
