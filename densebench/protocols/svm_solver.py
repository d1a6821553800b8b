"""Many linear SVMs at once: the batched torch solver and the sklearn reference backend.

The VOC07 SVM protocols (PROTOCOLS.md 2.3/2.4) fit one sklearn `LinearSVC` per (class, cost,
fold or sample): squared hinge, L2 penalty, `fit_intercept=True`, `intercept_scaling=1`,
class_weight {+1: 2, -1: 1}. liblinear treats the intercept as one more feature of constant
value 1 that is regularised like the others, so every fit minimises the strictly convex

    f(w) = 1/2 ||w~||^2 + sum_i C_i max(0, 1 - y_i w~ . x~_i)^2,   x~ = [x, 1],  C_i = C * cw[y_i]

whose optimum is unique. liblinear reaches it by dual coordinate descent, one problem at a
time. `fit_svms_torch` reaches the same optimum for a whole batch of problems together with a
truncated Newton method on the primal (the "generalised Hessian" of the squared hinge):

* Problems share one feature matrix and differ by labels, costs and a row mask (which rows
  a problem trains on: CV folds and low-shot samples are masks), so every product is one big
  matrix multiplication over all problems (BLAS-3 / GPU friendly).
* Kernel form: the optimum is w = sum_i coef_i x~_i over the problem's rows (the regulariser
  kills any other component), so the solver only needs the Gram matrix K = x~ x~^T (one syrk)
  and works on coefficients; the decision values on the training rows are K coef.
* Newton steps are solved through the push-through identity as a small-condition system
  (A^-1/2 + K_SS) e = b on the rows with a positive hinge, by CG preconditioned with the
  diagonal plus the leading eigenpairs of K (subspace iteration); one product with K per CG
  iteration. An Armijo line search costs no extra product (the margins are linear in the step).
  A problem stops when its gradient norm falls below `tol` times its initial gradient norm;
  converged problems leave the batch (within CG too). Gradients, margins and the stopping test
  use K's dtype (float64); the CG products may run in float32 (`cg_dtype`): an inexact Newton
  direction changes the path, not the optimum.
* Grouped form: K (G, N, N) with problems (G, Q, N), one Gram matrix per group (the low-shot
  sweep uses one per (sample, class), see voc_svm_common._lowshot_torch). A problem can be
  warm-started (`coef0`), e.g. from its optimum at the next smaller cost.

An earlier version rotated the rows into the eigenbasis of K (an N^3 eigendecomposition, 34 s
of the 91 s full sweep at N = 5011 on one CI core) and ran CG on the primal Hessian there; the
kernel form needs no eigendecomposition and about as many CG iterations, each half the products.

The sklearn backend (`svm_backend: sklearn`) runs the reference `LinearSVC` fits one by one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

BACKENDS = ("torch", "sklearn")


@dataclass
class SVMProblems:
    """A batch of binary problems over the rows of one feature matrix X (N x D).

    labels: (P, N) +1/-1; mask: (P, N) bool, the rows each problem trains on;
    costs: (P,) the SVM cost C; the class weight multiplies C for positives/negatives.
    """
    labels: np.ndarray
    mask: np.ndarray
    costs: np.ndarray
    pos_weight: float = 2.0
    neg_weight: float = 1.0

    def __post_init__(self):
        self.labels = np.asarray(self.labels, dtype=np.int8)
        self.mask = np.asarray(self.mask, dtype=bool)
        self.costs = np.asarray(self.costs, dtype=np.float64)
        if self.labels.shape != self.mask.shape or self.labels.ndim != 2:
            raise ValueError("labels and mask must both be (problems, rows)")
        if self.costs.shape != (self.labels.shape[0],):
            raise ValueError("one cost per problem")

    def __len__(self) -> int:
        return self.labels.shape[0]

    def row_costs(self) -> np.ndarray:
        """C_i per (problem, row): C * class weight on the rows a problem uses, 0 elsewhere."""
        weight = np.where(self.labels > 0, self.pos_weight, self.neg_weight)
        return self.costs[:, None] * weight * self.mask


@dataclass
class LinearModels:
    """weights (P, D) and bias (P,), float64; decision = x . w + b (sklearn decision_function)."""
    weights: np.ndarray
    bias: np.ndarray

    def decision(self, x: np.ndarray) -> np.ndarray:
        """(P, M) scores for the rows of x (M x D)."""
        return self.weights @ np.asarray(x, dtype=np.float64).T + self.bias[:, None]


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Per-sample x / (||x||_2 + 1e-5) in float64, as the reference svm_helper.normalize_features."""
    x = np.asarray(x, dtype=np.float64)
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-5)


def fit_svms(x: np.ndarray, problems: SVMProblems, backend: str = "torch",
             device: "torch.device | str" = "cpu", tol: float = 1e-6,
             dtype: torch.dtype = torch.float64, max_newton: int = 100, sklearn_max_iter: int = 2000,
             cg_dtype: Optional[torch.dtype] = torch.float32) -> LinearModels:
    """Fit every problem of the batch; x are the (already normalised) training features.

    sklearn_max_iter: the reference's 2000 liblinear epochs often stop short of the optimum
    for C = 100 on separable data; a larger value gives the converged reference.
    """
    if backend == "torch":
        return fit_svms_torch(x, problems, device=device, tol=tol, dtype=dtype,
                              max_newton=max_newton, cg_dtype=cg_dtype)
    if backend == "sklearn":
        return fit_svms_sklearn(x, problems, max_iter=sklearn_max_iter)
    raise ValueError(f"unknown svm backend {backend!r}; known: {BACKENDS}")


# ----------------------------------------------------------------------------- reference backend

def fit_svms_sklearn(x: np.ndarray, problems: SVMProblems, tol: float = 1e-4,
                     max_iter: int = 2000, random_state: int = 0) -> LinearModels:
    """One sklearn LinearSVC per problem with the reference settings (train_svm_kfold.py).

    random_state is fixed (the reference leaves it unset; liblinear shuffles coordinates).
    """
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.svm import LinearSVC

    x = np.asarray(x, dtype=np.float64)
    weights = np.zeros((len(problems), x.shape[1]))
    bias = np.zeros(len(problems))
    for p in range(len(problems)):
        rows = problems.mask[p]
        clf = LinearSVC(C=float(problems.costs[p]), class_weight={1: problems.pos_weight, -1: problems.neg_weight},
                        loss="squared_hinge", penalty="l2", dual=True, tol=tol, max_iter=max_iter,
                        intercept_scaling=1.0, fit_intercept=True, random_state=random_state)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(x[rows], problems.labels[p, rows].astype(np.int64))
        sign = 1.0 if clf.classes_[1] == 1 else -1.0   # decision_function is for classes_[1]
        weights[p] = sign * clf.coef_[0]
        bias[p] = sign * clf.intercept_[0]
    return LinearModels(weights, bias)


# ----------------------------------------------------------------------------- batched solver

def _blas_operand(t: torch.Tensor) -> np.ndarray:
    """t as a numpy array whose last two dimensions BLAS can read (C or Fortran order); other
    strides (e.g. expanded tensors) would send numpy's matmul to its slow non-BLAS loop."""
    if not (t.is_contiguous() or t.transpose(-1, -2).is_contiguous()):
        t = t.contiguous()
    return t.numpy()


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for 2-D or batched 3-D tensors of one dtype; the solver's and the scoring's large
    products. On CPU through numpy's BLAS (the OpenBLAS that numpy's wheels ship), which on the
    2-core AMD EPYC CI machine, one thread, ran them faster than torch's MKL: float32
    (1900 x 5011) x (5011 x 5011) 1.12 vs 2.05 s, (4952 x 8192) x (8192 x 1900) 1.78 vs 2.91 s,
    float64 batched (100, 16, 1280) x (100, 1280, 1280) 0.28 vs 0.45 s (benchmarks/blas_products.py).
    Whole protocols at VOC07 size (5011 x 8192, one thread, `blas_products.py --sweeps 5011,8192`,
    the machine shared): full sweep 106 vs 173 s (1.64x), low-shot k = 1 and 96 146 vs 208 s
    (1.42x), mAP equal to 1e-4. At the tiny preset's size (100 x 2048) the two are within
    0.1 s (torch / numpy 0.88 and 0.97), so one rule serves both. Elsewhere torch's own product."""
    if a.device.type != "cpu":
        return a @ b
    return torch.from_numpy(np.matmul(_blas_operand(a), _blas_operand(b)))


def gram_matrix(x: torch.Tensor) -> torch.Tensor:
    """x x^T through matmul: on CPU numpy sees one buffer and its transpose and runs BLAS syrk (half
    the flops of a general product; 1.9x faster than torch's matmul for 2000 x 8193 float64 on the
    2-core AMD EPYC CI machine)."""
    x = x.contiguous()                                # one buffer for both operands
    return matmul(x, x.T)


def augment_intercept(x: torch.Tensor) -> torch.Tensor:
    """Append the constant-1 intercept feature (liblinear with intercept_scaling = 1)."""
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], dim=1)


@dataclass
class KernelRows:
    """The Gram matrix K = x~ x~^T (G, N, N) of one or more row sets (groups) and its leading
    eigenpairs, which precondition the inner solves. Build it once and reuse it for every problem
    over the same rows (all folds, costs and classes; the low-shot union of all training rows)."""
    gram: torch.Tensor                     # (G, N, N), the solver dtype (float64)
    top_values: torch.Tensor               # (G, k)
    top_vectors: torch.Tensor              # (G, N, k)
    lowered: dict = field(default_factory=dict, repr=False)   # dtype -> gram in that dtype

    def gram_in(self, dtype: torch.dtype) -> torch.Tensor:
        """The Gram matrix in the CG products' dtype, converted once per KernelRows (the
        warm-started costs of a sweep each call the solver on the same kernel)."""
        if dtype == self.gram.dtype:
            return self.gram
        if dtype not in self.lowered:
            self.lowered[dtype] = self.gram.to(dtype)
        return self.lowered[dtype]

    @classmethod
    def from_gram(cls, gram: torch.Tensor, num_top: int = 4, iterations: int = 3) -> "KernelRows":
        gram = gram if gram.dim() == 3 else gram[None]
        values, vectors = top_eigenpairs(gram, num_top, iterations)
        return cls(gram, values, vectors)

    def select(self, groups: torch.Tensor) -> "KernelRows":
        return KernelRows(self.gram[groups], self.top_values[groups], self.top_vectors[groups])


def top_eigenpairs(gram: torch.Tensor, k: int, iterations: int = 3):
    """Leading k eigenpairs (values (G, k), vectors (G, N, k)) of each PSD matrix of gram (G, N, N),
    by subspace iteration from a fixed random start; only the preconditioner depends on them.
    3 iterations: the CG iteration counts of the VOC07-sized sweeps are those of 6 (full sweep
    241 vs 244, low-shot k = 64 826 vs 865) and the iterations, matrix-vector-like products over
    every group's Gram matrix, took 1.1 s instead of 2 s at k = 64."""
    num_groups, n, _ = gram.shape
    k = min(k, n)
    width = min(n, k + 4)
    generator = torch.Generator(device=gram.device).manual_seed(0)
    start = torch.randn(n, width, generator=generator, dtype=gram.dtype, device=gram.device)
    basis = start.expand(num_groups, n, width)            # the same start for every group: a group's
                                                          # result does not depend on its batch
    for _ in range(iterations):
        basis, _ = torch.linalg.qr(matmul(gram, basis))
    values, small = torch.linalg.eigh(basis.transpose(1, 2) @ matmul(gram, basis))
    return values[:, -k:].clamp(min=0), torch.bmm(basis, small[:, :, -k:])


def fit_svms_torch(x: np.ndarray, problems: SVMProblems, device="cpu", tol: float = 1e-6,
                   dtype: torch.dtype = torch.float64, max_newton: int = 100,
                   cg_dtype: Optional[torch.dtype] = torch.float32) -> LinearModels:
    """Batched kernel-form Newton solver; returns weights in the original feature space."""
    device = torch.device(device)
    rows = augment_intercept(torch.as_tensor(np.asarray(x)).to(device=device, dtype=dtype))
    kernel = KernelRows.from_gram(gram_matrix(rows))
    labels = torch.as_tensor(problems.labels, device=device).to(dtype)
    row_costs = torch.as_tensor(problems.row_costs(), device=device).to(dtype)
    coef = solve_kernel_newton(kernel, labels, row_costs, tol=tol, max_newton=max_newton, cg_dtype=cg_dtype)
    w_full = (coef @ rows).cpu().numpy().astype(np.float64)                          # (P, D + 1)
    return LinearModels(weights=np.ascontiguousarray(w_full[:, :-1]), bias=w_full[:, -1].copy())


def _compact(running: torch.Tensor):
    """Working set of a (G, Q) grid of problems: the groups with a running problem, and per group
    the running problems first, cut to the largest count. Returns (groups (G',), slots (G', Q'),
    valid (G', Q')) or None; padding slots (valid False) point at finished problems of the group."""
    counts = running.sum(1)
    groups = torch.nonzero(counts > 0).squeeze(1)
    if groups.numel() == 0:
        return None
    run = running[groups]
    width = int(counts.max())
    slots = torch.argsort((~run).to(torch.int32), dim=1, stable=True)[:, :width]
    return groups, slots, torch.gather(run, 1, slots)


def _take(t: torch.Tensor, groups: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    return t[groups[:, None], slots]


@torch.no_grad()
def solve_kernel_newton(kernel: KernelRows, labels: torch.Tensor, row_costs: torch.Tensor,
                        tol: float = 1e-6, max_newton: int = 100, max_cg: int = 500,
                        cg_forcing: float = 0.01, cg_dtype: Optional[torch.dtype] = None,
                        coef0: Optional[torch.Tensor] = None, return_margins: bool = False,
                        stats: Optional[dict] = None):
    """min_w 1/2||w||^2 + sum_i c_i max(0, 1 - y_i w.x~_i)^2 with w = sum_i coef_i x~_i, for every
    problem (row of labels/row_costs), knowing the rows only through K = x~ x~^T.

    Shapes: one group, labels and row_costs (P, N) -> coef (P, N); grouped, (G, Q, N) with
    kernel.gram (G, N, N) -> (G, Q, N). Rows with zero cost keep coefficient 0 (a problem's
    optimum lies in the span of its own rows).

    Newton on the primal with the generalised Hessian H = I + 2 X~_S^T A X~_S (S: the rows
    with a positive hinge, A their costs), solved through the push-through identity: the step is
    d = -g + X~_S^T e with (A^-1 / 2 + K_SS) e = K_S. gamma (g = X~^T gamma). That system is well
    conditioned at every cost (the diagonal dominates at small C; at large C its condition is that
    of K_SS once its few dominant directions, e.g. the features' mean, are deflated), so CG
    preconditioned by diag + the leading eigenpairs of K needs few iterations, each one product
    with K. CG stops when the estimated primal Newton residual ||X~_S^T 2A r|| falls below
    forcing * ||g||; a Newton step is accepted by an Armijo search that costs no extra product.
    A problem stops at ||g|| <= tol * ||g(0)||, g measured in K's dtype (float64); CG products
    may run in cg_dtype (float32). coef0 warm-starts. return_margins also returns K coef (the
    decision values on every row). stats collects iteration counts.
    """
    grouped = labels.dim() == 3
    if not grouped:
        labels, row_costs = labels[None], row_costs[None]
        coef0 = None if coef0 is None else coef0[None]
    gram_all = kernel.gram
    num_groups, num_problems, num_rows = labels.shape
    if gram_all.shape[0] != num_groups:
        raise ValueError(f"{gram_all.shape[0]} Gram matrices for {num_groups} groups of problems")
    dtype = gram_all.dtype
    cg_dtype = cg_dtype or dtype
    trained = row_costs > 0
    if coef0 is None:
        coef, margins = torch.zeros_like(labels), torch.zeros_like(labels)
    else:
        coef = coef0.to(dtype) * trained
        margins = matmul(coef, gram_all)
    stats = stats if stats is not None else {}
    stats.setdefault("newton", 0)
    stats.setdefault("cg", 0)
    residual_diag = (gram_all.diagonal(dim1=1, dim2=2)
                     - (kernel.top_vectors ** 2 * kernel.top_values[:, None, :]).sum(-1)).clamp(min=1e-12)

    groups = torch.arange(num_groups, device=labels.device)
    slots = torch.arange(num_problems, device=labels.device).expand(num_groups, -1)
    valid = torch.ones(num_groups, num_problems, dtype=torch.bool, device=labels.device)
    kern, kern_lo, rdiag = kernel, kernel.gram_in(cg_dtype), residual_diag
    # working copies: coef/margins receive them back when the working set shrinks (in-place
    # writes from an alias of the destination would fail)
    c_t, y_t, m_t, b_t = row_costs, labels, margins.clone(), coef.clone()
    g0 = None
    for _ in range(max_newton):
        viol = (1.0 - y_t * m_t).clamp(min=0) * (c_t > 0)
        gamma = b_t - 2.0 * c_t * viol * y_t
        k_gamma = matmul(gamma, kern.gram)
        grad_norm = (gamma * k_gamma).sum(-1).clamp(min=0).sqrt()
        if g0 is None:                                         # ||g|| at coef = 0 (every hinge active)
            if coef0 is None:
                g0 = grad_norm.clamp(min=1e-300)
            else:
                g_start = 2.0 * c_t * y_t
                g0 = (g_start * matmul(g_start, kern.gram)).sum(-1).clamp(min=1e-300).sqrt()
        done = (grad_norm <= tol * g0) | ~valid
        if bool(done.all()):
            break
        compact = _compact(~done) if int(done.sum()) > 0.25 * done.numel() else None
        if compact is not None and compact[1].numel() < done.numel():      # shrink the working set
            coef[groups[:, None], slots] = b_t
            margins[groups[:, None], slots] = m_t
            keep_groups, keep_slots, valid = compact
            take = lambda t: _take(t, keep_groups, keep_slots)   # noqa: E731
            c_t, y_t, m_t, b_t, g0 = take(c_t), take(y_t), take(m_t), take(b_t), take(g0)
            viol, gamma, k_gamma, grad_norm, done = take(viol), take(gamma), take(k_gamma), take(grad_norm), take(done)
            slots = _take(slots, keep_groups, keep_slots)
            if keep_groups.numel() < groups.numel():
                groups = groups[keep_groups]
                kern, kern_lo, rdiag = kern.select(keep_groups), kern_lo[keep_groups], rdiag[keep_groups]
        stats["newton"] += 1
        active = c_t * (viol > 0)
        rel = torch.minimum(torch.full_like(grad_norm, cg_forcing), (grad_norm / g0).sqrt())
        rhs = torch.where((active > 0) & ~done[..., None], k_gamma, torch.zeros_like(k_gamma))
        e, k_e = _kernel_pcg(kern, kern_lo, rdiag, active.to(cg_dtype), rhs.to(cg_dtype),
                             (rel * grad_norm).to(cg_dtype), max_cg, stats)
        step = e.to(dtype) - gamma
        step_margins = k_e.to(dtype) - k_gamma
        slope = (k_gamma * step).sum(-1)
        uphill = slope >= 0                                    # inexact direction: fall back to -g
        if bool(uphill.any()):
            step = torch.where(uphill[..., None], -gamma, step)
            step_margins = torch.where(uphill[..., None], -k_gamma, step_margins)
            slope = (k_gamma * step).sum(-1)
        ww = (b_t * m_t).sum(-1)                               # ||w||^2 = coef K coef
        value = 0.5 * ww + (c_t * viol * viol).sum(-1)
        t = _armijo(ww, (m_t * step).sum(-1), (step * step_margins).sum(-1),
                    m_t, y_t, c_t, value, slope, step_margins)
        t = torch.where(done, torch.zeros_like(t), t)
        b_t = b_t + t[..., None] * step
        m_t = matmul(b_t, kern.gram)                        # exact margins for the next gradient
    coef[groups[:, None], slots] = b_t
    margins[groups[:, None], slots] = m_t
    if not grouped:
        coef, margins = coef[0], margins[0]
    return (coef, margins) if return_margins else coef


def _kernel_pcg(kernel: KernelRows, gram_lo, residual_diag, active, rhs, target, max_iter, stats=None):
    """Batched preconditioned CG for (A^-1 / 2 + K_SS) e = rhs on each problem's active rows S
    (active > 0), grouped shapes: gram (G, N, N), active and rhs (G, Q, N), target (G, Q).

    Preconditioner: diag(1 / 2a + K_ii - sum_j l_j u_ij^2) plus the leading eigenpairs (l, u) of K
    restricted to S, inverted by Woodbury (a k x k system per problem). A problem stops when its
    estimated primal residual ||X~_S^T 2A r|| (from the same split of K: sum_j l_j (u_j . 2Ar)^2 +
    sum_i K'_ii (2a r)_i^2) reaches target. Returns e and K e (accumulated from the products CG
    makes anyway); finished problems leave the batch.
    """
    dtype = rhs.dtype
    on_rows = active > 0
    half_inv = torch.where(on_rows, 0.5 / active.clamp(min=1e-30), torch.zeros_like(active))
    values = kernel.top_values.to(dtype)
    vectors = kernel.top_vectors.to(dtype)
    rdiag = residual_diag.to(dtype)
    scale = torch.where(on_rows, 1.0 / (half_inv + rdiag[:, None, :]), torch.zeros_like(active))
    num_top = values.shape[1]
    outer = (vectors[:, :, :, None] * vectors[:, :, None, :]).reshape(vectors.shape[0], vectors.shape[1], -1)
    inv_values = 1.0 / values.clamp(min=1e-12 * float(values.max().clamp(min=1e-30)))
    core = torch.bmm(scale, outer).reshape(*scale.shape[:2], num_top, num_top) + torch.diag_embed(inv_values)[:, None]
    core_chol = torch.linalg.cholesky(core)

    def precondition(r, scale, vectors, core_chol):
        scaled = scale * r
        small = torch.cholesky_solve(torch.bmm(scaled, vectors)[..., None], core_chol)[..., 0]
        return scaled - scale * torch.bmm(small, vectors.transpose(1, 2))

    def primal_residual(r, active, vectors, values, rdiag):
        v = 2.0 * active * r
        proj = torch.bmm(v, vectors)
        return ((proj * proj * values[:, None, :]).sum(-1) + (v * v * rdiag[:, None, :]).sum(-1)).clamp(min=0).sqrt()

    solution = torch.zeros_like(rhs)
    solution_k = torch.zeros_like(rhs)
    groups = torch.arange(rhs.shape[0], device=rhs.device)
    slots = torch.arange(rhs.shape[1], device=rhs.device).expand(rhs.shape[0], -1)
    valid = torch.ones(rhs.shape[:2], dtype=torch.bool, device=rhs.device)
    gram = gram_lo
    x = torch.zeros_like(rhs)
    kx = torch.zeros_like(rhs)
    r = rhs.clone()
    y = precondition(r, scale, vectors, core_chol)
    p = y.clone()
    ry = (r * y).sum(-1)
    started = rhs.abs().sum(-1) > 0
    for _ in range(max_iter):
        running = started & valid & (primal_residual(r, active, vectors, values, rdiag) > target)
        if not bool(running.any()):
            break
        compact = _compact(running) if int(running.sum()) < 0.75 * running.numel() else None
        if compact is not None and compact[1].numel() < running.numel():
            solution[groups[:, None], slots] = x
            solution_k[groups[:, None], slots] = kx
            keep_groups, keep_slots, valid = compact
            take = lambda t: _take(t, keep_groups, keep_slots)   # noqa: E731
            x, kx, r, p, ry = take(x), take(kx), take(r), take(p), take(ry)
            active, half_inv, scale, core_chol, target = (take(active), take(half_inv), take(scale),
                                                          take(core_chol), take(target))
            started = take(started)
            slots = _take(slots, keep_groups, keep_slots)
            if keep_groups.numel() < groups.numel():
                groups = groups[keep_groups]
                gram, vectors, values, rdiag = (gram[keep_groups], vectors[keep_groups], values[keep_groups],
                                                rdiag[keep_groups])
            running = running[keep_groups[:, None], keep_slots]
        if stats is not None:
            stats["cg"] += 1
            stats["cg_products"] = stats.get("cg_products", 0) + running.numel()
        p = p * running[..., None]                               # finished problems stay put
        kp = matmul(p, gram)
        bp = torch.where(active > 0, half_inv * p + kp, torch.zeros_like(p))
        alpha = ry / (p * bp).sum(-1).clamp(min=1e-30)
        x = x + alpha[..., None] * p
        kx = kx + alpha[..., None] * kp
        r = r - alpha[..., None] * bp
        y = precondition(r, scale, vectors, core_chol)
        ry_new = (r * y).sum(-1)
        p = y + (ry_new / ry.clamp(min=1e-30))[..., None] * p
        ry = ry_new
    solution[groups[:, None], slots] = x
    solution_k[groups[:, None], slots] = kx
    return solution, solution_k


def _armijo(ww, wd, dd, margins, labels, row_costs, value, slope, step_margins, shrink=0.5, tries=30):
    """Largest t in {1, 1/2, 1/4, ...} with sufficient decrease of the objective along the step;
    ww, wd, dd are w.w, w.d, d.d (the regulariser is quadratic in t) and the margins are linear."""
    chosen = torch.zeros_like(value)
    undecided = torch.ones_like(value, dtype=torch.bool)
    t = 1.0
    for _ in range(tries):
        viol = (1.0 - labels * (margins + t * step_margins)).clamp(min=0) * (row_costs > 0)
        trial = 0.5 * (ww + 2 * t * wd + t * t * dd) + (row_costs * viol * viol).sum(-1)
        ok = undecided & (trial <= value + 1e-4 * t * slope)
        chosen = torch.where(ok, torch.full_like(chosen, t), chosen)
        undecided = undecided & ~ok
        if not bool(undecided.any()):
            break
        t *= shrink
    return chosen
