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
  the batch.

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
             basis: Optional["RowBasis"] = None, sklearn_max_iter: int = 2000) -> LinearModels:
    """Fit every problem of the batch; x are the (already normalised) training features.

    sklearn_max_iter: the reference's 2000 liblinear epochs often stop short of the optimum
    for C = 100 on separable data; a larger value gives the converged reference.
    """
    if backend == "torch":
        return fit_svms_torch(x, problems, device=device, tol=tol, dtype=dtype,
                              max_newton=max_newton, basis=basis)
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
    """Orthonormal coordinates of the row space of x~ = [x, 1]: z = x~ @ transform (r columns).

    Computing it costs one eigendecomposition; reuse it for every problem over the same rows
    (all folds, all costs, all classes).
    """
    transform: torch.Tensor      # (D + 1, r)
    z: torch.Tensor              # (N, r) coordinates of the rows the basis was built from

    @classmethod
    def build(cls, x: np.ndarray, device="cpu", dtype=torch.float64, rel_eps: float = 1e-10) -> "RowBasis":
        xt = _augment(torch.as_tensor(np.asarray(x), device=device).to(dtype))
        n, d = xt.shape
        if n <= d:
            gram = xt @ xt.T
            evals, evecs = torch.linalg.eigh(gram)
            keep = evals > evals.max().clamp(min=1e-300) * rel_eps
            evals, evecs = evals[keep], evecs[:, keep]
            transform = xt.T @ (evecs / evals.sqrt())
            z = evecs * evals.sqrt()
        else:
            cov = xt.T @ xt
            evals, evecs = torch.linalg.eigh(cov)
            keep = evals > evals.max().clamp(min=1e-300) * rel_eps
            transform = evecs[:, keep]
            z = xt @ transform
        return cls(transform=transform, z=z)

    def project(self, x: np.ndarray) -> torch.Tensor:
        xt = _augment(torch.as_tensor(np.asarray(x), device=self.transform.device).to(self.transform.dtype))
        return xt @ self.transform


def _augment(x: torch.Tensor) -> torch.Tensor:
    """Append the constant-1 intercept feature (liblinear with intercept_scaling = 1)."""
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], dim=1)


def fit_svms_torch(x: np.ndarray, problems: SVMProblems, device="cpu", tol: float = 1e-6,
                   dtype: torch.dtype = torch.float64, max_newton: int = 100,
                   basis: Optional[RowBasis] = None) -> LinearModels:
    """Batched truncated-Newton solver; returns weights in the original feature space."""
    device = torch.device(device)
    if basis is None:
        basis = RowBasis.build(x, device=device, dtype=dtype)
    z = basis.z
    labels = torch.as_tensor(problems.labels, device=device).to(dtype)
    row_costs = torch.as_tensor(problems.row_costs(), device=device).to(dtype)
    w_z = solve_primal_newton(z, labels, row_costs, tol=tol, max_newton=max_newton)
    w_full = (basis.transform @ w_z.T).T.cpu().numpy().astype(np.float64)     # (P, D + 1)
    return LinearModels(weights=np.ascontiguousarray(w_full[:, :-1]), bias=w_full[:, -1].copy())


def _objective_parts(w, margins, labels, row_costs):
    viol = (1.0 - labels * margins).clamp(min=0) * (row_costs > 0)
    value = 0.5 * (w * w).sum(1) + (row_costs * viol * viol).sum(1)
    return value, viol


@torch.no_grad()
def solve_primal_newton(z: torch.Tensor, labels: torch.Tensor, row_costs: torch.Tensor,
                        tol: float = 1e-6, max_newton: int = 100, max_cg: int = 200,
                        cg_forcing: float = 0.1) -> torch.Tensor:
    """min_w 1/2||w||^2 + sum_i c_i max(0, 1 - y_i z_i.w)^2 for every row of labels/row_costs.

    z (N, r) shared features; labels, row_costs (P, N); returns w (P, r).
    Stops per problem at ||grad|| <= tol * ||grad(0)||.
    """
    num_problems = labels.shape[0]
    w = torch.zeros(num_problems, z.shape[1], dtype=z.dtype, device=z.device)
    z_sq = z * z
    margins = torch.zeros_like(labels)
    grad0 = -2.0 * ((row_costs * labels) @ z)
    grad0_norm = grad0.norm(dim=1).clamp(min=1e-300)
    todo = torch.arange(num_problems, device=z.device)
    for _ in range(max_newton):
        if todo.numel() == 0:
            break
        w_t, m_t, y_t, c_t = w[todo], margins[todo], labels[todo], row_costs[todo]
        value, viol = _objective_parts(w_t, m_t, y_t, c_t)
        grad = w_t - 2.0 * ((c_t * viol * y_t) @ z)
        grad_norm = grad.norm(dim=1)
        done = grad_norm <= tol * grad0_norm[todo]
        if bool(done.all()):
            break
        keep = ~done
        todo, w_t, m_t, y_t, c_t = todo[keep], w_t[keep], m_t[keep], y_t[keep], c_t[keep]
        value, viol, grad, grad_norm = value[keep], viol[keep], grad[keep], grad_norm[keep]
        active = c_t * (viol > 0)                                   # generalised Hessian weights
        precond = 1.0 + 2.0 * (active @ z_sq)
        rel = torch.minimum(torch.full_like(grad_norm, cg_forcing),
                            (grad_norm / grad0_norm[todo]).sqrt())
        step = _pcg(z, active, precond, -grad, rel, max_cg)
        step_margins = step @ z.T
        t = _armijo(w_t, m_t, y_t, c_t, value, grad, step, step_margins)
        w[todo] = w_t + t[:, None] * step
        margins[todo] = m_t + t[:, None] * step_margins
    return w


def _pcg(z, active, precond, rhs, rel_tol, max_iter):
    """Batched preconditioned CG for (I + 2 Z^T diag(active_p) Z) d_p = rhs_p.

    A problem stops at ||residual|| <= rel_tol * ||rhs||; finished problems leave the batch so
    the matrix products only cover the ones still running.
    """
    solution = torch.zeros_like(rhs)
    index = torch.arange(rhs.shape[0], device=rhs.device)
    x = torch.zeros_like(rhs)
    r = rhs.clone()
    y = r / precond
    p = y.clone()
    ry = (r * y).sum(1)
    target = rel_tol * rhs.norm(dim=1)
    for _ in range(max_iter):
        running = r.norm(dim=1) > target
        if not bool(running.any()):
            break
        if not bool(running.all()):
            solution[index] = x
            index, x, r, p, ry = index[running], x[running], r[running], p[running], ry[running]
            active, precond, target = active[running], precond[running], target[running]
        hp = p + 2.0 * ((active * (p @ z.T)) @ z)
        alpha = ry / (p * hp).sum(1).clamp(min=1e-300)
        x = x + alpha[:, None] * p
        r = r - alpha[:, None] * hp
        y = r / precond
        ry_new = (r * y).sum(1)
        p = y + (ry_new / ry.clamp(min=1e-300))[:, None] * p
        ry = ry_new
    solution[index] = x
    return solution


def _armijo(w, margins, labels, row_costs, value, grad, step, step_margins, shrink=0.5, tries=30):
    """Largest t in {1, 1/2, 1/4, ...} with sufficient decrease; margins are linear in t."""
    slope = (grad * step).sum(1)
    ww, wd, dd = (w * w).sum(1), (w * step).sum(1), (step * step).sum(1)
    chosen = torch.zeros_like(value)
    undecided = torch.ones_like(value, dtype=torch.bool)
    t = 1.0
    for _ in range(tries):
        viol = (1.0 - labels * (margins + t * step_margins)).clamp(min=0) * (row_costs > 0)
        trial = 0.5 * (ww + 2 * t * wd + t * t * dd) + (row_costs * viol * viol).sum(1)
        ok = undecided & (trial <= value + 1e-4 * t * slope)
        chosen = torch.where(ok, torch.full_like(chosen, t), chosen)
        undecided = undecided & ~ok
        if not bool(undecided.any()):
            break
        t *= shrink
    return chosen
