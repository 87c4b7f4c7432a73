"""Lanczos with full reorthogonalisation and thick restart, and the tridiagonal Lanczos helper.

Lanczos builds an orthonormal basis ``V_m`` of the Krylov space ``span{v0, A v0, …, A^{m-1} v0}``
with ``A V_m = V_m H_m + β_m v_{m+1} e_mᵀ`` and ``H_m = V_mᵀ A V_m`` (tridiagonal before a restart).
Ritz pairs ``(θ, V_m y)`` from ``H_m y = θ y`` have residual ``‖A V_m y − θ V_m y‖ = |β_m| |e_mᵀ y|``:
the stopping test costs no operator application. That estimate ignores rounding, so the residuals
that are reported (and confirm convergence) are recomputed as ``‖W y − θ V y‖`` from the stored
applications ``W = A V`` (memory: two ``n × max_basis`` blocks). When the basis reaches ``max_basis`` vectors it is
thick-restarted (Wu & Simon 2000) from the best Ritz vectors plus the residual direction, so no
progress is lost. Full reorthogonalisation (the three-term step, then classical Gram–Schmidt against the whole
basis, repeated when it removed much: the DGKS test) keeps ``V`` orthonormal to working precision, which also keeps
spurious ("ghost") copies of converged eigenvalues away. The basis is stored column by column (each vector
contiguous): on n = 437,760 a step's bookkeeping is 9.7 ms, 29.8 ms row-major (``benchmarks/lanczos_layout.py``).
Limitation: a single start vector spans at most one direction of a repeated eigenvalue, so an
eigenvalue of multiplicity p > 1 is found once; use :func:`~curvature.solvers.lobpcg` (a block
method) when multiplicities matter.
"""
from __future__ import annotations

from typing import Any

import torch

from ._common import (CountedApply, RandomStarts, StopRule, as_operator, check_k,
                      column_norms, dot, residual_floor, vector_norm)
from .._exact import autocast_off
from .._validate import check_optional_positive_int, check_seed
from .result import EigenResult

__all__ = ["lanczos", "lanczos_tridiagonal"]


def _expand(apply: CountedApply, V: torch.Tensor, m: int, reorthogonalize: bool, beta_prev: float,
            iteration: int, op: Any = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """One Lanczos step on the basis ``V[:, :m]`` (orthonormal): ``w = A v_m`` made orthogonal to the basis.

    Returns ``(h, w, A v_m, ‖w‖)`` with ``h = V[:, :m]ᵀ A v_m`` (the new column of ``H``; with
    ``reorthogonalize=False`` only the three-term entries ``α_m, β_{m-1}``) and the unnormalised ``w``.
    """
    v = V[:, m - 1]
    Av = apply(v[:, None], iteration)[:, 0]
    w = Av
    if reorthogonalize:
        # the large components first, against the last two vectors only (the three-term recurrence: 2n reads),
        # then one classical Gram–Schmidt pass against the whole basis for what rounding left; a second pass
        # only when that one removed a lot (DGKS: ‖w‖ fell below ‖w_before‖/√2, e.g. after a thick restart, whose
        # kept Ritz vectors all couple to the next vector). Half the basis traffic of two full passes.
        lo = max(m - 2, 0)
        L = V[:, lo:m]
        h = torch.zeros(m, dtype=w.dtype, device=w.device)
        c = dot(op, L, w[:, None])[:, 0]
        w = w - L @ c
        h[lo:m] = c
        B = V[:, :m]
        norm = float(vector_norm(op, w))
        for _ in range(2):
            before = norm
            h2 = dot(op, B, w[:, None])[:, 0]
            w = w - B @ h2
            h = h + h2
            norm = float(vector_norm(op, w))
            if norm >= 0.7071 * before:
                break
    else:
        h = torch.zeros(m, dtype=w.dtype, device=w.device)
        alpha = dot(op, v[:, None], w[:, None])[0, 0]
        w = w - alpha * v
        if m >= 2:
            w = w - beta_prev * V[:, m - 2]
            h[m - 2] = beta_prev
        h[m - 1] = alpha
        norm = float(vector_norm(op, w))
    return h, w, Av, norm


@autocast_off
def lanczos_tridiagonal(op: Any, v0: torch.Tensor, num_steps: int, *,
                        reorthogonalize: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``num_steps`` Lanczos steps from ``v0``: ``A Q = Q T + β q e_mᵀ`` with ``T = tridiag(β, α, β)``.

    Args:
        op: a :class:`~curvature.operators.LinearOperator` or a square tensor (symmetric).
        v0: start vector ``(n,)`` (normalised here; any non-zero vector).
        num_steps: number of steps ``m`` (= operator applications), ``1 <= m <= n``.
        reorthogonalize: full reorthogonalisation (Gram–Schmidt twice against all of ``Q``);
            ``False`` gives the plain three-term recurrence (cheaper, loses orthogonality).

    Returns:
        ``(alphas, betas, Q)``: ``alphas (m,)`` the diagonal of ``T``, ``betas (m-1,)`` its off-diagonal,
        ``Q (n, m)`` the Lanczos vectors. Stops early (shorter outputs) when ``β`` vanishes, i.e. the
        Krylov space is invariant — the Ritz values are then exact eigenvalues. For stochastic Lanczos
        quadrature the nodes are ``eigh(T)`` values and the weights the squared first components.
    """
    op = as_operator(op)
    n = op.shape[0]
    if v0.ndim != 1 or v0.shape[0] != n:
        raise ValueError(f"v0 must be a 1-D tensor of length {n}, got shape {tuple(v0.shape)}")
    if int(num_steps) < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    m_max = min(int(num_steps), n)
    v0 = v0.to(device=op.device, dtype=op.dtype)
    nrm = float(vector_norm(op, v0))
    if not (nrm > 0 and nrm < float("inf")):
        raise ValueError("v0 must be a finite, non-zero vector")
    apply = CountedApply(op)
    V = _basis(n, m_max, op.dtype, op.device)
    V[:, 0] = v0 / nrm
    alphas: list[torch.Tensor] = []
    betas: list[torch.Tensor] = []
    beta_prev = 0.0
    scale = 0.0
    eps = torch.finfo(op.dtype).eps
    for m in range(1, m_max + 1):
        h, w, _, beta_prev = _expand(apply, V, m, reorthogonalize, beta_prev, m, op)
        alphas.append(h[m - 1])
        scale = max(scale, abs(float(h[m - 1])))
        if m == m_max:
            break
        beta = w.new_tensor(beta_prev)
        scale = max(scale, beta_prev)
        if beta_prev <= 10 * eps * max(scale, torch.finfo(op.dtype).tiny):
            break  # invariant Krylov space: T's eigenvalues are exact
        betas.append(beta)
        V[:, m] = w / beta
    m = len(alphas)
    return torch.stack(alphas), (torch.stack(betas) if betas else V.new_zeros(0)), V[:, :m]


def _basis(n: int, m: int, dtype: torch.dtype, device: Any) -> torch.Tensor:
    """An uninitialised ``(n, m)`` block stored column by column (``.T`` of an ``(m, n)`` tensor): each column
    (one basis vector) is contiguous, and ``B.T @ w`` / ``B @ h`` on a leading block ``B = V[:, :j]`` run on
    contiguous memory."""
    return torch.empty(m, n, dtype=dtype, device=device).T


def _true_residuals(V: torch.Tensor, W: torch.Tensor, Y: torch.Tensor, theta: torch.Tensor,
                    floor: float, op: Any = None) -> torch.Tensor:
    """``‖W y − θ V y‖ / max(|θ|, floor)`` per Ritz pair, from the stored ``W = A V`` (no application)."""
    Yd = Y.to(device=V.device, dtype=V.dtype)
    th = theta.to(device=V.device, dtype=V.dtype)
    return column_norms(op, W @ Yd - (V @ Yd) * th[None, :]) / th.abs().clamp_min(floor)


def ritz_gaps(theta: torch.Tensor, sel: torch.Tensor) -> torch.Tensor | None:
    """For the selected Ritz values, the distance to the nearest other Ritz value of the basis (``None`` when
    the basis has a single one). ``theta`` is ascending (``eigh`` order)."""
    m = theta.shape[0]
    if m < 2:
        return None
    big = torch.full((1,), float("inf"), dtype=theta.dtype, device=theta.device)
    up = torch.cat([theta[1:] - theta[:-1], big])      # to the next larger one
    down = torch.cat([big, theta[1:] - theta[:-1]])    # to the next smaller one
    return torch.minimum(up, down)[sel]


def _select(theta: torch.Tensor, count: int, which: str) -> torch.Tensor:
    """Indices of the ``count`` wanted Ritz values, in output order (descending; ascending for "SA")."""
    if which == "LA":
        return torch.argsort(theta, descending=True, stable=True)[:count]
    if which == "SA":
        return torch.argsort(theta, stable=True)[:count]
    idx = torch.argsort(theta.abs(), descending=True, stable=True)[:count]  # "LM"
    return idx[torch.argsort(theta[idx], descending=True, stable=True)]


@autocast_off
def lanczos(op: Any, k: int = 1, *, largest: bool = True, tol: float | None = None, max_iters: int | None = None,
            v0: torch.Tensor | None = None, seed: int = 0, which: str | None = None,
            max_basis: int | None = None, eig_tol: float | None = None) -> EigenResult:
    """Top-``k`` eigenpairs of a symmetric operator by thick-restarted Lanczos (full reorthogonalisation).

    Args:
        op: :class:`~curvature.operators.LinearOperator` or square symmetric tensor.
        k: number of eigenpairs.
        largest: ``True`` → algebraically largest (largest first); ``False`` → algebraically smallest
            (smallest first).
        tol: stop when every relative residual ``|β_m e_mᵀ y| / max(|θ|, floor) <= tol``
            (``floor = eps(dtype) · max|θ|``, guards ``θ ≈ 0``). Default 1e-4 when ``eig_tol`` is not given,
            else no residual requirement.
        eig_tol: the relative eigenvalue accuracy wanted: stop when the bound ``‖r‖²/(gap·|θ|)`` (gap to the
            neighbouring Ritz value) is ``<= eig_tol`` for every wanted pair and no wanted Ritz value moved by more
            than ``eig_tol/10`` in the last step. ``info["error_bound"]`` reports the bound reached.
        max_iters: maximum Lanczos steps (= operator applications); default ``max(1000, 10 k)``.
        v0: start vector ``(n,)``; default a seeded Gaussian vector.
        seed: seed of the ``torch.Generator`` used for random vectors (deterministic results).
        which: overrides ``largest``: ``"LA"`` (largest algebraic), ``"SA"`` (smallest algebraic) or
            ``"LM"`` (largest magnitude, returned largest algebraic first).
        max_basis: Krylov basis cap before a thick restart; default ``min(n, max(30, 3k + 10))``.

    Returns:
        :class:`EigenResult`; ``iterations`` = Lanczos steps; ``info`` has ``restarts``, ``tol``,
        ``history`` (max relative residual after each step), ``which``, ``max_basis``,
        ``residual_floor``, ``invariant_subspaces`` (breakdowns continued with a random vector),
        ``stopped`` (why, when not converged: ``"max_iters"``, ``"precision floor"``, ...).
    """
    op = as_operator(op)
    n = op.shape[0]
    k = check_k(k, n)
    if which is None:
        which = "LA" if largest else "SA"
    which = which.upper()
    if which not in ("LA", "SA", "LM"):
        raise ValueError(f"which must be 'LA', 'SA' or 'LM', got {which!r}")
    rule = StopRule(tol, eig_tol)
    max_iters = check_optional_positive_int(max_iters, "max_iters")
    seed = check_seed(seed)
    if max_iters is None:
        max_iters = max(1000, 10 * k)
    cap = min(n, max(30, 3 * k + 10)) if max_basis is None else min(n, int(max_basis))
    if cap < min(n, k + 2):
        raise ValueError(f"max_basis={max_basis} is too small for k={k}: need at least k + 2")
    keep = min(cap - 2, max(k + 5, cap // 2)) if cap < n else cap
    dtype, device = op.dtype, op.device
    eps = torch.finfo(dtype).eps
    starts = RandomStarts(op, seed, device)
    if v0 is None:
        v = starts.draw(1, dtype)[:, 0]
    else:
        if v0.ndim == 2 and v0.shape[1] == 1:
            v0 = v0[:, 0]
        if v0.ndim != 1 or v0.shape[0] != n:
            raise ValueError(f"v0 must have shape ({n},), got {tuple(v0.shape)}")
        v = v0.detach().to(device=device, dtype=dtype)
    nrm = float(vector_norm(op, v))
    if not (0 < nrm < float("inf")):
        raise ValueError("v0 must be a finite, non-zero vector")
    apply = CountedApply(op)
    # column-major (each basis vector contiguous) and uninitialised: a column is read only after it is written,
    # and writing/reading a strided column of an (n, cap) row-major block costs more than the HVP on large n
    V = _basis(n, cap, dtype, device)
    W = _basis(n, cap, dtype, device)  # W = A V (the applications themselves)
    # the small projected matrix and everything computed from it live on the CPU: a 30 × 30 eigh on a GPU costs
    # more than an HVP of a mid-sized model, and each step reads one number of it (β) back anyway
    H = torch.zeros(cap, cap, dtype=torch.float64)
    V[:, 0] = v / nrm
    m, steps, restarts, breakdowns = 1, 0, 0, 0
    scale = 0.0
    history: list[float] = []
    converged = False
    stopped = None
    while True:
        h, w, W[:, m - 1], beta = _expand(apply, V, m, True, 0.0, steps + 1, op)
        steps += 1
        h64 = h.to(device="cpu", dtype=torch.float64)
        H[:m, m - 1] = h64
        H[m - 1, :m] = h64
        theta, Y = torch.linalg.eigh(H[:m, :m])  # symmetric by construction (row and column set alike)
        scale = max(scale, float(theta.abs().max()))
        floor = residual_floor(scale, dtype)
        sel = _select(theta, min(k, m), which)
        res = (beta * Y[m - 1, sel]).abs() / theta[sel].abs().clamp_min(floor)
        history.append(float(res.max()))
        gaps = ritz_gaps(theta, sel)
        watched = theta[_select(theta, min(k + 1, m), which)] if k > 1 else None
        if rule.check(theta[sel], res, gaps, floor, watched) and m >= k:
            true_res = _true_residuals(V[:, :m], W[:, :m], Y[:, sel], theta[sel], floor, op).cpu()
            converged = rule.satisfied(theta[sel], true_res, gaps, floor)
            if not converged:  # the estimate is below the rounding level of A V: cannot do better
                stopped = "precision floor"
            break
        if steps >= max_iters or m >= n:
            break
        if beta <= 10 * eps * max(scale, 1e-300):
            # invariant subspace: continue from a random direction orthogonal to the basis
            breakdowns += 1
            w = starts.draw(1, dtype)[:, 0]
            for _ in range(2):
                w = w - V[:, :m] @ dot(op, V[:, :m], w[:, None])[:, 0]
            wn = float(vector_norm(op, w))
            if wn <= eps:
                break
            w = w / wn
        else:
            w = w / beta
        if m == cap:  # thick restart from the `keep` best Ritz vectors + residual direction
            idx = _select(theta, keep, which)
            Yk = Y[:, idx].to(device=device, dtype=dtype)
            V[:, :keep] = V[:, :m] @ Yk
            W[:, :keep] = W[:, :m] @ Yk
            H.zero_()
            H[torch.arange(keep), torch.arange(keep)] = theta[idx]
            m = keep
            restarts += 1
        V[:, m] = w
        m += 1
    Ysel = Y[:, sel].to(device=device, dtype=dtype)
    vecs = V[:, :m] @ Ysel
    vals = theta[sel].to(device=device, dtype=dtype)
    # reported residuals are recomputed from the stored applications W = A V: ‖W y − θ V y‖ / |θ|
    res = _true_residuals(V[:, :m], W[:, :m], Y[:, sel], theta[sel], floor, op)
    if stopped is None and not converged:
        stopped = "max_iters" if steps >= max_iters else "basis exhausted"
    gaps = ritz_gaps(theta, sel)
    info = {"stopped": stopped, "estimated_residuals": history[-1] if history else None, "restarts": restarts,
            "tol": rule.tol, "eig_tol": rule.eig_tol, "history": history, "which": which, "max_basis": cap,
            "residual_floor": floor, "invariant_subspaces": breakdowns, "basis_size": m,
            "error_bound": StopRule.bound(theta[sel], res.cpu(), gaps, floor) if m >= k else float("inf"),
            "ritz_gap": float(gaps.min()) if gaps is not None else None,
            "guard_vectors": (V[:, :m] @ Y[:, _select(theta, min(m, k + 1), which)].to(device=device, dtype=dtype))}
    if vals.shape[0] < k:  # only possible when stopped before k steps (max_iters < k)
        info["note"] = f"stopped after {steps} steps, fewer than k={k} Ritz pairs"
        pad = k - vals.shape[0]
        vals = torch.cat([vals, vals.new_full((pad,), float("nan"))])
        vecs = torch.cat([vecs, vecs.new_zeros(n, pad)], dim=1)
        res = torch.cat([res, res.new_full((pad,), float("inf"))])
    return EigenResult(eigenvalues=vals, eigenvectors=vecs, residuals=res.to(dtype), num_hvps=apply.count,
                       converged=converged, iterations=steps, info=info)
