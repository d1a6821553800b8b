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
* The features are first rotated into an orthonormal basis of their row space (an
  eigendecomposition of the Gram or covariance matrix). The optimum lies in that space (the
  regulariser kills any other component), so nothing is lost, the dimension drops to
  min(N, D + 1), and Z^T Z is diagonal, which makes the Jacobi preconditioner of the
  conjugate-gradient inner solver effective.
* Newton steps are solved by preconditioned CG, followed by an Armijo line search that costs
  no extra matrix product (the margins are linear in the step). A problem stops when its
  gradient norm falls below `tol` times its initial gradient norm; converged problems leave
  the batch (within CG too). Gradients, margins and the stopping test use the basis dtype
  (float64); the CG Hessian products may run in float32 (`cg_dtype`): an inexact Newton
  direction changes the path, not the optimum.
* Grouped form: z (G, N, r) with problems (G, Q, N), one basis per group (the low-shot sweep
  uses one small basis per (sample, class), see voc_svm_common._lowshot_torch). A problem can
  be warm-started (`w0`), e.g. from its optimum at the next smaller cost.

The sklearn backend (`svm_backend: sklearn`) runs the reference `LinearSVC` fits one by one.
"""
from __future__ import annotations

from dataclasses import dataclass
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
             dtype: torch.dtype = torch.float64, max_newton: int = 100,
             basis: Optional["RowBasis"] = None, sklearn_max_iter: int = 2000,
             cg_dtype: Optional[torch.dtype] = torch.float32) -> LinearModels:
    """Fit every problem of the batch; x are the (already normalised) training features.

    sklearn_max_iter: the reference's 2000 liblinear epochs often stop short of the optimum
    for C = 100 on separable data; a larger value gives the converged reference.
    """
    if backend == "torch":
        return fit_svms_torch(x, problems, device=device, tol=tol, dtype=dtype,
                              max_newton=max_newton, basis=basis, cg_dtype=cg_dtype)
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

@dataclass
class RowBasis:
    """Orthonormal coordinates z (N, r) of the rows of x~ = [x, 1], and the way back to weights.

    Computing it costs one eigendecomposition; reuse it for every problem over the same rows
    (all folds, all costs, all classes, and every low-shot problem over a subset of them).
    Gram route (N <= D + 1): x~ x~^T = U L U^T, z = U sqrt(L), and the orthonormal transform
    x~^T U / sqrt(L) is never formed: weights(w_z) = (row_coefficients(w_z)) @ x~, which costs
    O(P N D) instead of the O(N^2 D) of the transform. Covariance route (N > D + 1):
    x~^T x~ = V L V^T, z = x~ V, weights = w_z V^T.
    """
    z: torch.Tensor                         # (N, r) coordinates of the rows
    back: torch.Tensor                      # Gram: (N, r) U / sqrt(L); covariance: (D + 1, r) V
    rows: Optional[torch.Tensor] = None     # Gram route: x~ (N, D + 1); None on the covariance route

    @classmethod
    def build(cls, x, device="cpu", dtype=torch.float64, rel_eps: float = 1e-10) -> "RowBasis":
        x = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
        xt = _augment(x.to(device=device, dtype=dtype))
        gram_route = xt.shape[0] <= xt.shape[1]
        evals, evecs = symmetric_eigh(gram_matrix(xt) if gram_route else xt.T @ xt)
        keep = evals > evals.max().clamp(min=1e-300) * rel_eps
        evals, evecs = evals[keep], evecs[:, keep]
        if gram_route:
            return cls(z=evecs * evals.sqrt(), back=evecs / evals.sqrt(), rows=xt)
        return cls(z=xt @ evecs, back=evecs)

    def row_coefficients(self, w_z: torch.Tensor) -> torch.Tensor:
        """Gram route: (P, N) coefficients c with weights = c @ x~ (so bias = c.sum(-1))."""
        if self.rows is None:
            raise ValueError("row coefficients exist only on the Gram route (N <= D + 1)")
        return w_z @ self.back.T

    def weights(self, w_z: torch.Tensor) -> torch.Tensor:
        """(P, D + 1) weights in feature space (last column: the intercept) for w_z (P, r)."""
        if self.rows is None:
            return w_z @ self.back.T
        return self.row_coefficients(w_z) @ self.rows


def gram_matrix(x: torch.Tensor) -> torch.Tensor:
    """x x^T. On CPU through numpy, whose matmul runs x @ x.T as BLAS syrk (half the flops of a
    general product; 1.9x faster than torch's matmul for 2000 x 8193 float64 on the 2-core AMD
    EPYC CI machine)."""
    if x.device.type == "cpu":
        rows = x.contiguous().numpy()
        return torch.from_numpy(rows @ rows.T)
    return x @ x.T


def symmetric_eigh(a: torch.Tensor):
    """torch.linalg.eigh (ascending eigenvalues) of one matrix or a batch (..., n, n).

    On CPU, matrices from n = 256 up go one by one through scipy's LAPACK divide and conquer
    (driver "evd"), 1.7-1.9x faster than torch's for n = 640..5011 on the CI machine (scipy's
    OpenBLAS vs torch's MKL on AMD); smaller ones stay batched in torch.
    """
    if a.device.type != "cpu" or a.shape[-1] < 256:
        return torch.linalg.eigh(a)
    from scipy.linalg import eigh

    flat = a.reshape(-1, *a.shape[-2:])
    evals = torch.empty(flat.shape[:2], dtype=a.dtype)
    evecs = torch.empty_like(flat)
    for i, matrix in enumerate(flat):
        values, vectors = eigh(matrix.numpy(), driver="evd", check_finite=False)
        evals[i], evecs[i] = torch.from_numpy(values), torch.from_numpy(vectors)
    return evals.reshape(a.shape[:-1]), evecs.reshape(a.shape)


def augment_intercept(x: torch.Tensor) -> torch.Tensor:
    """Append the constant-1 intercept feature (liblinear with intercept_scaling = 1)."""
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], dim=1)


_augment = augment_intercept


def fit_svms_torch(x: np.ndarray, problems: SVMProblems, device="cpu", tol: float = 1e-6,
                   dtype: torch.dtype = torch.float64, max_newton: int = 100,
                   basis: Optional[RowBasis] = None, cg_dtype: Optional[torch.dtype] = torch.float32) -> LinearModels:
    """Batched truncated-Newton solver; returns weights in the original feature space."""
    device = torch.device(device)
    if basis is None:
        basis = RowBasis.build(x, device=device, dtype=dtype)
    z = basis.z
    labels = torch.as_tensor(problems.labels, device=device).to(z.dtype)
    row_costs = torch.as_tensor(problems.row_costs(), device=device).to(z.dtype)
    w_z = solve_primal_newton(z, labels, row_costs, tol=tol, max_newton=max_newton, cg_dtype=cg_dtype)
    w_full = basis.weights(w_z).cpu().numpy().astype(np.float64)                # (P, D + 1)
    return LinearModels(weights=np.ascontiguousarray(w_full[:, :-1]), bias=w_full[:, -1].copy())


def _objective_parts(w, margins, labels, row_costs):
    viol = (1.0 - labels * margins).clamp(min=0) * (row_costs > 0)
    value = 0.5 * (w * w).sum(-1) + (row_costs * viol * viol).sum(-1)
    return value, viol


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
def solve_primal_newton(z: torch.Tensor, labels: torch.Tensor, row_costs: torch.Tensor,
                        tol: float = 1e-6, max_newton: int = 100, max_cg: int = 500,
                        cg_forcing: float = 0.01, cg_dtype: Optional[torch.dtype] = None,
                        w0: Optional[torch.Tensor] = None, return_margins: bool = False,
                        stats: Optional[dict] = None):
    """min_w 1/2||w||^2 + sum_i c_i max(0, 1 - y_i z_i.w)^2 for every row of labels/row_costs.

    z (N, r) shared features with labels, row_costs (P, N) -> w (P, r); or grouped: z (G, N, r)
    with labels, row_costs (G, Q, N) -> w (G, Q, r) (each group has its own rows/basis, e.g. one
    low-shot sample of one class). Stops per problem at ||grad|| <= tol * ||grad(0)||, the
    gradient and margins always in z's dtype; the Hessian products of the inner CG run in
    cg_dtype (float32 halves their cost on CPU; an inexact Newton direction only changes the
    path, not the optimum or the stopping test). w0 warm-starts. return_margins also returns
    z @ w (the decision values on every row, masked or not). stats collects iteration counts.
    """
    grouped = z.dim() == 3
    if not grouped:
        z, labels, row_costs = z[None], labels[None], row_costs[None]
        w0 = None if w0 is None else w0[None]
    num_groups, num_problems, _ = labels.shape
    dtype = z.dtype
    cg_dtype = cg_dtype or dtype
    if w0 is None:
        w = torch.zeros(num_groups, num_problems, z.shape[2], dtype=dtype, device=z.device)
        margins = torch.zeros_like(labels)
    else:
        w = w0.to(dtype).clone()
        margins = torch.bmm(w, z.transpose(1, 2))
    grad_at_zero = -2.0 * torch.bmm(row_costs * labels, z)        # every hinge active at w = 0
    grad0_norm = grad_at_zero.norm(dim=2).clamp(min=1e-300)
    first_grad = grad_at_zero if w0 is None else None
    del grad_at_zero
    running = torch.ones(num_groups, num_problems, dtype=torch.bool, device=z.device)
    stats = stats if stats is not None else {}
    stats.setdefault("newton", 0)
    stats.setdefault("cg", 0)

    groups = torch.arange(num_groups, device=z.device)
    slots = torch.arange(num_problems, device=z.device).expand(num_groups, -1)
    valid = running.clone()
    zg = z
    zg_lo = z.to(cg_dtype)
    w_t, m_t, y_t, c_t, g0 = w, margins, labels, row_costs, grad0_norm
    for _ in range(max_newton):
        value, viol = _objective_parts(w_t, m_t, y_t, c_t)
        if first_grad is not None:                               # cold start: known already
            grad, first_grad = first_grad, None
        else:
            grad = w_t - 2.0 * torch.bmm(c_t * viol * y_t, zg)
        grad_norm = grad.norm(dim=2)
        done = (grad_norm <= tol * g0) | ~valid
        running[groups[:, None], slots] = ~done
        if bool(done.all()):
            break
        compact = _compact(~done) if int(done.sum()) > 0.25 * done.numel() else None
        if compact is not None and compact[1].numel() < done.numel():      # shrink the working set
            w[groups[:, None], slots] = w_t
            margins[groups[:, None], slots] = m_t
            keep_groups, keep_slots, valid = compact
            take = lambda t: _take(t, keep_groups, keep_slots)   # noqa: E731
            w_t, m_t, y_t, c_t, g0 = take(w_t), take(m_t), take(y_t), take(c_t), take(g0)
            value, viol, grad, grad_norm, done = take(value), take(viol), take(grad), take(grad_norm), take(done)
            slots = _take(slots, keep_groups, keep_slots)
            if keep_groups.numel() < groups.numel():
                groups = groups[keep_groups]
                zg, zg_lo = zg[keep_groups], zg_lo[keep_groups]
        stats["newton"] += 1
        stats["newton_products"] = stats.get("newton_products", 0) + done.numel()
        active = (c_t * (viol > 0)).to(cg_dtype)                 # generalised Hessian weights
        precond = 1.0 + 2.0 * torch.bmm(active, zg_lo * zg_lo)
        rel = torch.minimum(torch.full_like(grad_norm, cg_forcing), (grad_norm / g0).sqrt())
        rhs = torch.where(done[..., None], torch.zeros_like(grad), -grad).to(cg_dtype)
        step, step_margins = _pcg(zg_lo, active, precond, rhs, rel.to(cg_dtype), max_cg, stats)
        step, step_margins = step.to(dtype), step_margins.to(dtype)
        t = _armijo(w_t, m_t, y_t, c_t, value, grad, step, step_margins)
        w_t = w_t + t[..., None] * step
        m_t = torch.bmm(w_t, zg.transpose(1, 2))                # exact margins for the next gradient
    w[groups[:, None], slots] = w_t
    margins[groups[:, None], slots] = m_t
    if not grouped:
        w, margins = w[0], margins[0]
    return (w, margins) if return_margins else w


def _pcg(z, active, precond, rhs, rel_tol, max_iter, stats=None):
    """Batched preconditioned CG for (I + 2 Z^T diag(active_p) Z) d_p = rhs_p, grouped shapes
    z (G, N, r), active (G, Q, N), precond and rhs (G, Q, r). Returns d and Z d (the step's
    margins, accumulated from the products CG needs anyway).

    A problem stops at ||residual|| <= rel_tol * ||rhs||; finished problems leave the batch so
    the matrix products only cover the ones still running.
    """
    solution = torch.zeros_like(rhs)
    solution_margins = torch.zeros_like(active)
    groups = torch.arange(rhs.shape[0], device=rhs.device)
    slots = torch.arange(rhs.shape[1], device=rhs.device).expand(rhs.shape[0], -1)
    valid = torch.ones(rhs.shape[:2], dtype=torch.bool, device=rhs.device)
    x = torch.zeros_like(rhs)
    zx = torch.zeros_like(active)
    r = rhs.clone()
    y = r / precond
    p = y.clone()
    ry = (r * y).sum(-1)
    target = rel_tol * rhs.norm(dim=-1)
    zt = z.transpose(1, 2)
    for _ in range(max_iter):
        running = (r.norm(dim=-1) > target) & valid
        if not bool(running.any()):
            break
        compact = _compact(running) if int(running.sum()) < 0.75 * running.numel() else None
        if compact is not None and compact[1].numel() < running.numel():
            solution[groups[:, None], slots] = x
            solution_margins[groups[:, None], slots] = zx
            keep_groups, keep_slots, valid = compact
            take = lambda t: _take(t, keep_groups, keep_slots)   # noqa: E731
            x, zx, r, p, ry = take(x), take(zx), take(r), take(p), take(ry)
            active, precond, target = take(active), take(precond), take(target)
            slots = _take(slots, keep_groups, keep_slots)
            if keep_groups.numel() < groups.numel():
                groups = groups[keep_groups]
                z, zt = z[keep_groups], zt[keep_groups]
            running = running[keep_groups[:, None], keep_slots]
        if stats is not None:
            stats["cg"] += 1
            stats["cg_products"] = stats.get("cg_products", 0) + running.numel()
        p = p * running[..., None]                               # finished problems stay put
        zp = torch.bmm(p, zt)
        hp = p + 2.0 * torch.bmm(active * zp, z)
        alpha = ry / (p * hp).sum(-1).clamp(min=1e-30)
        x = x + alpha[..., None] * p
        zx = zx + alpha[..., None] * zp
        r = r - alpha[..., None] * hp
        y = r / precond
        ry_new = (r * y).sum(-1)
        p = y + (ry_new / ry.clamp(min=1e-30))[..., None] * p
        ry = ry_new
    solution[groups[:, None], slots] = x
    solution_margins[groups[:, None], slots] = zx
    return solution, solution_margins


def _armijo(w, margins, labels, row_costs, value, grad, step, step_margins, shrink=0.5, tries=30):
    """Largest t in {1, 1/2, 1/4, ...} with sufficient decrease; margins are linear in t."""
    slope = (grad * step).sum(-1)
    ww, wd, dd = (w * w).sum(-1), (w * step).sum(-1), (step * step).sum(-1)
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
