"""Block LOBPCG (Knyazev 2001) for a few extreme eigenpairs of a symmetric operator.

Each iteration does Rayleigh–Ritz on ``S = [X, R, P]``: ``X`` the current Ritz vectors (block of ``m``),
``R = A X − X Θ`` the residuals of the still-active columns and ``P`` the previous update directions
(the "conjugate" directions that make LOBPCG behave like a block CG/Lanczos). Only ``R`` is ever
multiplied by the operator: ``A X`` and ``A P`` are carried along implicitly (``A(S C) = (A S) C``), so one
iteration costs as many applications as there are active residual columns.

Robustness (Hetmaniuk & Lehoucq 2006; Duersch, Shao, Yang & Gu 2018):
* ``R`` is orthogonalised against ``[X, P]`` twice and orthonormalised by SVQB, dropping near-dependent
  directions (it is always applied *after* orthonormalisation, so ``A R`` is exact);
* ``P`` is built in coefficient space — the ``[R, P]`` rows of the Ritz coefficients, made orthogonal to
  the ``X`` coefficients — so ``[X, P]`` is orthonormal without cancellation in ``n``-space;
* the Rayleigh–Ritz problem is solved through SVQB of ``SᵀS`` (drops dependent directions; float64);
* soft locking: converged columns stay in ``X`` (and keep being improved by Rayleigh–Ritz) but get no
  ``R``/``P`` columns, hence no operator applications;
* restart when stalled: ``P`` is dropped and a fresh seeded random block joins the search space
  (``X`` is kept, so no progress is lost); repeated stalls stop the solver (``info["stopped"]``).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

from ._common import (CountedApply, RandomStarts, StopRule, as_operator, check_k, dot,
                      eigenvalue_error_bound, orthonormalize, relative_residuals, residual_floor, rounding_residual,
                      svqb_gram, working_dtype)
from .._exact import autocast_off
from .._validate import check_optional_positive_int, check_seed
from .result import EigenResult

__all__ = ["lobpcg"]

_STALL_WINDOW = 20       # iterations without a 10% drop of the worst wanted residual → restart
_MAX_STALL_RESTARTS = 3  # consecutive fruitless restarts → stop (precision floor reached)
_SAFEGUARD = 0.3         # eig_tol stop: the last Ritz-value move must be <= 0.3 eig_tol (measured: the gap of a
                         # [X, R, P] space over-estimates the true gap, so the bound alone can be 1.2x optimistic)


def _rayleigh_ritz(S: torch.Tensor, AS: torch.Tensor, eps: float, op: Any = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ritz pairs of ``A`` in ``span(S)``: ``θ`` descending and ``C`` with ``Cᵀ M C = I``, ``M = SᵀS``.

    ``K = Sᵀ A S``; SVQB of ``M`` gives ``T`` (dropping dependent directions), then ``eigh(Tᵀ K T)``.
    Returns ``(theta, C, M)`` in float64.
    """
    M = dot(op, S, S).to(torch.float64)
    K = dot(op, S, AS).to(torch.float64)
    K = 0.5 * (K + K.T)
    T = svqb_gram(M, eps)
    theta, U = torch.linalg.eigh(T.T @ K @ T)
    C = T @ U
    return theta.flip(0), C.flip(1), M


def _ritz_gaps(theta_all: torch.Tensor, m: int) -> torch.Tensor:
    """Distance of each of the first ``m`` Ritz values (``theta_all`` descending) to its nearest neighbour in the
    search space; ``inf`` where it has none (a one-column space)."""
    big = torch.full((1,), math.inf, dtype=theta_all.dtype, device=theta_all.device)
    d = theta_all[:-1] - theta_all[1:]
    above = torch.cat([big, d])
    below = torch.cat([d, big])
    return torch.minimum(above, below)[:m]


def _dense(apply: Callable[[torch.Tensor, int], torch.Tensor], n: int, k: int, sign: float,
           dtype: torch.dtype, device: torch.device, tol: float) -> EigenResult:
    """Tiny ``n``: form ``A`` with ``n`` applications and use ``eigh``."""
    A = apply(torch.eye(n, dtype=dtype, device=device), 1)
    A = 0.5 * (A + A.T)
    w, U = torch.linalg.eigh(A.to(torch.float64))
    w, U = w.flip(0)[:k], U.flip(1)[:, :k]  # (already ×sign) largest of sign·A first
    w, U = w.to(dtype), U.to(dtype)
    floor = residual_floor(float(w.abs().max()), dtype)
    res = relative_residuals(A @ U, U, w, floor)
    return EigenResult(eigenvalues=sign * w, eigenvectors=U, residuals=res, num_hvps=n,
                       converged=bool((res <= tol).all()), iterations=1,
                       info={"method": "dense", "restarts": 0, "tol": tol, "history": [res.tolist()],
                             "residual_floor": floor,
                             "note": "3 * block_size > n: formed the dense matrix with n applications"})


@autocast_off
def lobpcg(op: Any, k: int = 1, *, largest: bool = True, tol: float | None = None, max_iters: int | None = None,
           X0: torch.Tensor | None = None, seed: int = 0, block_size: int | None = None,
           callback: Callable[[int, torch.Tensor, torch.Tensor], Any] | None = None,
           eig_tol: float | None = None) -> EigenResult:
    """Top-``k`` eigenpairs of a symmetric operator by block LOBPCG with soft locking.

    Args:
        op: :class:`~curvature.operators.LinearOperator` or square symmetric tensor.
        k: number of eigenpairs.
        largest: ``True`` → algebraically largest (largest first); ``False`` → most negative
            (smallest first).
        tol: stop when every wanted relative residual ``‖A x − θ x‖ / max(|θ|, floor) <= tol``;
            ``floor = eps(dtype) · max|θ|`` (≈ ``eps·‖A‖``) guards ``θ ≈ 0``. Default 1e-4 when ``eig_tol``
            is not given, else no residual requirement.
        eig_tol: relative eigenvalue accuracy wanted: stop when every wanted bound ``‖r‖²/(gap·|θ|)`` (gap to the
            neighbouring Ritz value of ``[X, R, P]``) is ``<= eig_tol`` and no wanted Ritz value moved by more than
            ``eig_tol`` in the last iteration; ``info["error_bound"]`` is the bound reached.
        max_iters: maximum Rayleigh–Ritz steps (the initial one on ``X`` included); default 500.
        X0: warm start ``(n, m0)`` (or ``(n,)``): ``m0 < block`` is padded with seeded random columns,
            ``m0 > block`` enlarges the block to ``m0``.
        seed: seed of the ``torch.Generator`` for random vectors (results are deterministic).
        block_size: columns in ``X``, ``>= k`` (default ``k``); extra columns are guard vectors that help
            on clustered spectra but cost applications.
        callback: ``callback(iteration, eigenvalues, residuals)`` after each Rayleigh–Ritz step
            (wanted ``k`` only); returning ``True`` stops the solver.

    Returns:
        :class:`EigenResult`; ``iterations`` = Rayleigh–Ritz steps; ``info``: ``restarts``, ``tol``,
        ``history`` (wanted residuals per iteration), ``block_size``, ``residual_floor``, ``stopped``
        (why it stopped when not converged), ``method`` (``"lobpcg"`` or ``"dense"`` when
        ``3·block > n``: the matrix is then formed with ``n`` applications).
    """
    op = as_operator(op)
    n = op.shape[0]
    k = check_k(k, n)
    m = k if block_size is None else int(block_size)
    if m < k:
        raise ValueError(f"block_size={block_size} must be >= k={k}")
    if X0 is not None:
        if X0.ndim == 1:
            X0 = X0[:, None]
        if X0.ndim != 2 or X0.shape[0] != n:
            raise ValueError(f"X0 must have shape ({n}, m), got {tuple(X0.shape)}")
        if X0.shape[1] > n:
            raise ValueError(f"X0 has {X0.shape[1]} columns, more than n={n}")
        m = max(m, X0.shape[1])
    rule = StopRule(tol, eig_tol, safeguard=_SAFEGUARD)
    tol = rule.tol
    max_iters = check_optional_positive_int(max_iters, "max_iters")
    seed = check_seed(seed)
    if max_iters is None:
        max_iters = 500
    # Mixed precision: operator applications in the operator's dtype, everything else (the n × 3m basis, its
    # orthonormalisation and Rayleigh–Ritz) in float64. In float32 the small-basis arithmetic otherwise
    # stagnates: on a 438k-parameter GPT it stalled at residual 2e-4 with λ off by 2e-4, where float64
    # bookkeeping converges. The n × 3m float64 blocks cost little next to one HVP.
    dtype, device = working_dtype(op.dtype), op.device
    eps = torch.finfo(dtype).eps
    sign = 1.0 if largest else -1.0
    counted = CountedApply(op)

    def apply(V: torch.Tensor, it: int) -> torch.Tensor:
        Y = counted(V, it)
        return Y if largest else -Y

    if 3 * m > n:
        res = _dense(apply, n, k, sign, dtype, device, tol if tol is not None else math.inf)
        res.info.update(eig_tol=rule.eig_tol, error_bound=0.0)
        res.num_hvps = counted.count
        res.eigenvalues, res.eigenvectors, res.residuals = (t.to(op.dtype) for t in
                                                            (res.eigenvalues, res.eigenvectors, res.residuals))
        return res

    starts = RandomStarts(op, seed, device)
    # ---- initial block ------------------------------------------------------------------------
    X = starts.draw(m, dtype) if X0 is None else X0.detach().to(device=device, dtype=dtype)
    X, _ = orthonormalize(X, op=op)
    while X.shape[1] < m:  # pad (short or dependent X0) with random columns
        Z, _ = orthonormalize(starts.draw(m - X.shape[1], dtype), X, op=op)
        X = torch.cat([X, Z], dim=1)
    AX = apply(X, 1)
    theta_all, C, _ = _rayleigh_ritz(X, AX, eps, op)
    Cx = C[:, :m].to(dtype)
    X, AX, theta = X @ Cx, AX @ Cx, theta_all[:m]
    # preallocated search space [X, R, P] and its image (no torch.cat per iteration)
    S_buf = torch.empty(n, 3 * m, dtype=dtype, device=device)
    AS_buf = torch.empty(n, 3 * m, dtype=dtype, device=device)
    bound = math.inf
    scale = float(theta.abs().max())
    prev: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int] | None = None
    iters, restarts, stall_restarts = 1, 0, 0
    history: list[list[float]] = []
    best, best_iter = float("inf"), 1
    converged, stopped = False, None
    restart_now = False
    while True:
        floor = residual_floor(scale, op.dtype)  # residuals mean nothing below the HVPs' own precision
        th = theta.to(dtype)
        res = relative_residuals(AX, X, th, floor, op)
        if dtype != op.dtype:  # the vectors are returned in op.dtype: their rounding bounds the residual
            res = res.clamp_min_(rounding_residual(th, scale, op.dtype, floor))
        worst = float(res[:k].max())
        history.append(res[:k].tolist())
        gaps = _ritz_gaps(theta_all, m)
        bounds = eigenvalue_error_bound(th, res * th.abs().clamp_min(floor), gaps, floor)
        bound = float(bounds[:k].max())
        if callback is not None and callback(iters, sign * th[:k], res[:k]) is True:
            stopped = "callback"
            break
        if rule.check(th[:k], res[:k], gaps[:k], floor):
            converged = True
            break
        if iters >= max_iters:
            stopped = "max_iters"
            break
        # ---- stall detection ------------------------------------------------------------------
        if worst < 0.9 * best:
            best, best_iter, stall_restarts = worst, iters, 0
        elif iters - best_iter >= _STALL_WINDOW:
            if stall_restarts >= _MAX_STALL_RESTARTS:
                stopped = "stagnation"
                break
            restart_now = True
        active = torch.zeros_like(res, dtype=torch.bool)
        if tol is not None:
            active |= res > tol
        if rule.eig_tol is not None:
            active |= bounds > rule.eig_tol
        if not bool(active[:k].any()):  # the wanted columns only miss the move safeguard: keep refining them
            active[:k] = True
        na = int(active.sum())
        # ---- P from the previous Rayleigh–Ritz coefficients (coefficient space) -----------------
        P = AP = None
        if prev is not None and not restart_now:
            S_p, AS_p, Cx_p, M_p, nx = prev
            Z = Cx_p[:, active].clone()
            Z[:nx] = 0.0
            for _ in range(2):
                Z = Z - Cx_p @ (Cx_p.T @ (M_p @ Z))  # coefficient space (small, global): no dot hook
            T = svqb_gram(Z.T @ M_p @ Z, eps)
            if T.shape[1] > 0:
                Z = (Z @ T).to(dtype)
                P, AP = S_p @ Z, AS_p @ Z
        # ---- residual block (explicit, then applied) -----------------------------------------------
        R = AX[:, active] - X[:, active] * th[active][None, :]
        if restart_now:
            R = torch.cat([R, starts.draw(na, dtype)], dim=1)
        Q = X if P is None else torch.cat([X, P], dim=1)
        R, _ = orthonormalize(R, Q, op=op)
        if R.shape[1] == 0:  # residuals lie in span[X, P]: nothing new to search → restart
            if restart_now:
                stopped = "stagnation"
                break
            restart_now = True
            P = AP = None
            R, _ = orthonormalize(starts.draw(na, dtype), X, op=op)
        if restart_now:
            restarts += 1
            stall_restarts += 1
            best_iter = iters
            restart_now = False
        iters += 1
        AR = apply(R, iters)
        blocks = [(X, AX), (R, AR)] + ([(P, AP)] if P is not None else [])
        width = sum(b.shape[1] for b, _ in blocks)
        if width > S_buf.shape[1]:  # a restart added random columns: grow once
            S_buf = torch.empty(n, width, dtype=dtype, device=device)
            AS_buf = torch.empty(n, width, dtype=dtype, device=device)
        S, AS = S_buf[:, :width], AS_buf[:, :width]
        col = 0
        for b, ab in blocks:
            S[:, col:col + b.shape[1]].copy_(b)
            AS[:, col:col + b.shape[1]].copy_(ab)
            col += b.shape[1]
        theta_all, C, M = _rayleigh_ritz(S, AS, eps, op)
        if C.shape[1] < m:  # basis collapsed (should not happen): keep X, restart without P
            prev = None
            restart_now = True
            continue
        scale = max(scale, float(theta_all.abs().max()))
        Cx64 = C[:, :m]
        Cx = Cx64.to(dtype)
        X, AX, theta = S @ Cx, AS @ Cx, theta_all[:m]
        prev = (S, AS, Cx64, M, m)
    guard = X[:, :min(m, k + 1)]
    if guard.shape[1] <= k and prev is not None and prev[2].shape[0] > m:
        # the block has no (k+1)-th column: take the next Ritz vector of the last search space [X, R, P]
        S_last = prev[0]  # C, theta_all are still those of its Rayleigh–Ritz step
        if C.shape[1] > m:
            guard = torch.cat([guard, S_last @ C[:, m:m + 1].to(dtype)], dim=1)
    info = {"method": "lobpcg", "restarts": restarts, "tol": tol, "eig_tol": rule.eig_tol, "history": history,
            "block_size": m, "residual_floor": floor, "stopped": stopped, "error_bound": bound,
            "guard_vectors": guard.to(op.dtype)}
    out = op.dtype
    return EigenResult(eigenvalues=(sign * th[:k]).to(out), eigenvectors=X[:, :k].to(out), residuals=res[:k].to(out),
                       num_hvps=counted.count, converged=converged, iterations=iters, info=info)
