"""Power iteration with deflation.

``x ← A x / ‖A x‖`` converges to the eigenvector of the largest-MAGNITUDE eigenvalue at the rate
``|λ₂/λ₁|`` per operator application. For ``k > 1`` the found vectors are deflated by projection:
the iteration runs on ``(I − V Vᵀ) A (I − V Vᵀ)``, which for exact eigenvectors equals Hotelling's
``A − V Λ Vᵀ`` and is better conditioned numerically. Each step gives, for free, the Rayleigh quotient
``λ = xᵀ A x`` and the exact residual ``‖A x − λ x‖`` of the current iterate, so the stopping test and
the reported residuals cost no extra applications.

Because it ranks by magnitude, on an indefinite operator whose most negative eigenvalue dominates
(|λ_min| > λ_max) it returns that negative eigenvalue; ``info["negative_dominant"]`` then says so. Use
:func:`~curvature.solvers.lobpcg` or :func:`~curvature.solvers.lanczos` for the algebraically largest.
"""
from __future__ import annotations

from typing import Any

import torch

from ._common import (CountedApply, RandomStarts, StopRule, as_operator, check_k, dot,
                      relative_residuals, residual_floor, vector_norm)
from .._exact import autocast_off
from .._validate import check_optional_positive_int, check_seed
from .result import EigenResult

__all__ = ["power_iteration"]


def _aitken_error(deltas: list[float]) -> float:
    """Remaining error of a linearly converging sequence from its last two changes: δ_t ρ/(1−ρ), ρ = δ_t/δ_{t−1}
    (``inf`` until two changes exist or while the changes do not shrink)."""
    if len(deltas) < 2:
        return float("inf")
    d1, d0 = deltas[-1], deltas[-2]
    if d1 == 0.0:
        return 0.0
    if d0 <= 0.0 or d1 >= d0:
        return float("inf")
    rho = d1 / d0
    return d1 * rho / (1.0 - rho)


@autocast_off
def power_iteration(op: Any, k: int = 1, *, tol: float | None = None, max_iters: int | None = None,
                    v0: torch.Tensor | None = None, seed: int = 0, eig_tol: float | None = None) -> EigenResult:
    """Top-``k`` largest-magnitude eigenpairs by power iteration with projection deflation.

    Args:
        op: :class:`~curvature.operators.LinearOperator` or square symmetric tensor.
        k: number of eigenpairs, found one after the other (each deflated from the next).
        tol: stop each pair when ``‖A x − λ x‖ / max(|λ|, floor) <= tol``, ``floor = eps(dtype)·max|λ|``
            (default 1e-4 unless ``eig_tol`` is given).
        eig_tol: relative eigenvalue accuracy wanted. The Rayleigh quotient converges linearly,
            λ − λ_t ≈ c ρ^t (ρ = (λ₂/λ₁)²), so the remaining error is estimated from the last two changes
            δ_t = λ_t − λ_{t−1} as ``δ_t ρ/(1 − ρ)``, ρ = δ_t/δ_{t−1} (Aitken); stop when twice that estimate, and
            the last change itself, are ``<= eig_tol·|λ|``. ``info["error_bound"]`` reports the estimate.
        max_iters: maximum applications per eigenpair; default 1000.
        v0: start vector ``(n,)`` for the first pair (``(n, j)`` starts the first ``j`` pairs);
            other pairs start from seeded Gaussian vectors.
        seed: seed of the ``torch.Generator`` for the random start vectors.

    Returns:
        :class:`EigenResult` sorted algebraically largest first; ``iterations`` = total power steps;
        ``info``: ``iterations_per_pair``, ``history`` (relative residual per step), ``by_magnitude``,
        ``negative_dominant``, ``residual_floor``, ``tol``.
    """
    op = as_operator(op)
    n = op.shape[0]
    k = check_k(k, n)
    rule = StopRule(tol, eig_tol)
    tol = rule.tol
    max_iters = check_optional_positive_int(max_iters, "max_iters")
    seed = check_seed(seed)
    if max_iters is None:
        max_iters = 1000
    dtype, device = op.dtype, op.device
    starts = None
    if v0 is not None:
        starts = v0.detach().to(device=device, dtype=dtype)
        if starts.ndim == 1:
            starts = starts[:, None]
        if starts.ndim != 2 or starts.shape[0] != n:
            raise ValueError(f"v0 must have shape ({n},) or ({n}, j), got {tuple(v0.shape)}")
    rand = RandomStarts(op, seed, device)
    apply = CountedApply(op)
    V = torch.zeros(n, 0, dtype=dtype, device=device)
    AV = torch.zeros(n, 0, dtype=dtype, device=device)
    vals: list[float] = []
    per_pair: list[int] = []
    pair_conv: list[bool] = []
    errors: list[float] = []
    history: list[list[float]] = []
    total = 0
    scale = 0.0
    floor = residual_floor(0.0, dtype)
    for j in range(k):
        x = starts[:, j] if starts is not None and j < starts.shape[1] else rand.draw(1, dtype)[:, 0]
        for _ in range(2):
            x = x - V @ dot(op, V, x[:, None])[:, 0]
        nrm = float(vector_norm(op, x))
        if not (0 < nrm < float("inf")):
            if starts is not None and j < starts.shape[1]:
                raise ValueError(f"start vector {j} is zero, non-finite or inside the span of the found vectors")
            raise RuntimeError("random start vector is degenerate")
        x = x / nrm
        hist: list[float] = []
        lam, rel, conv, it = 0.0, float("inf"), False, 0
        deltas: list[float] = []
        while it < max_iters:
            it += 1
            total += 1
            y_raw = apply(x[:, None], total)[:, 0]
            lam_t = dot(op, x[:, None], y_raw[:, None])[0, 0]
            lam_prev, lam = lam, float(lam_t)
            scale = max(scale, abs(lam))
            floor = residual_floor(scale, dtype)
            y = y_raw
            for _ in range(2):  # deflate: keep the iterate orthogonal to the found eigenvectors
                y = y - V @ dot(op, V, y[:, None])[:, 0]
            # residual of the deflated operator (equals the true one when V is exact)
            rel = float(vector_norm(op, y - lam_t * x)) / max(abs(lam), floor)
            hist.append(rel)
            if it > 1:
                deltas.append(abs(lam - lam_prev))
            est = 2.0 * _aitken_error(deltas) / max(abs(lam), floor)  # x2: Aitken is up to 1.25x optimistic
            ok = tol is None or rel <= tol
            if rule.eig_tol is not None:
                ok = ok and est <= rule.eig_tol and deltas[-1] / max(abs(lam), floor) <= rule.eig_tol \
                    if deltas else False
            if ok:
                conv = True
                break
            ny = float(vector_norm(op, y))
            if ny == 0.0:  # x is in the null space of the deflated operator: eigenvalue 0
                break
            x_new = y / ny
            if it < max_iters:
                x = x_new
            # (on the last step keep x and its A x)
        V = torch.cat([V, x[:, None]], dim=1)
        AV = torch.cat([AV, y_raw[:, None]], dim=1)
        vals.append(lam)
        per_pair.append(it)
        pair_conv.append(conv)
        history.append(hist)
        errors.append(est)
    # Rayleigh–Ritz on span(V) with the stored A V (no applications), in float64 whatever the operator's dtype
    # (a float32 VᵀAV alone limits λ to ~1e-5): decouples the small errors that deflation by inexact vectors
    # leaves, and gives the true residuals ‖A v − λ v‖ reported below.
    V64, AV64 = V.to(torch.float64), AV.to(torch.float64)
    K = dot(op, V64, AV64)
    w, U = torch.linalg.eigh(0.5 * (K + K.T))
    order = torch.argsort(w, descending=True, stable=True)
    U = U[:, order]
    V64, AV64 = V64 @ U, AV64 @ U
    lam64 = w[order]
    floor = residual_floor(max(scale, float(lam64.abs().max())), dtype)
    res_t = relative_residuals(AV64, V64, lam64, floor, op)
    if dtype != torch.float64:  # returned in dtype: rounding the vectors bounds the residual from below
        res_t = res_t.clamp_min(0.5 * torch.finfo(dtype).eps)
    lam_t, V = lam64.to(dtype), V64.to(dtype)
    res_t = res_t.to(dtype)
    all_conv = bool((res_t <= tol).all()) if tol is not None else True
    if rule.eig_tol is not None:
        all_conv = all_conv and all(c for c in pair_conv)
    info = {"iterations_per_pair": per_pair, "history": history, "by_magnitude": True,
            "negative_dominant": vals[0] < 0, "deflated_converged": pair_conv, "residual_floor": floor, "tol": tol,
            "eig_tol": rule.eig_tol, "error_bound": max(errors) if errors else float("inf"),
            "order_found": [float(v) for v in vals]}
    if vals[0] < 0:
        info["note"] = ("power iteration finds the largest-MAGNITUDE eigenvalue: the operator is dominated by a "
                        "negative eigenvalue, use lobpcg/lanczos for the algebraically largest")
    return EigenResult(eigenvalues=lam_t, eigenvectors=V, residuals=res_t,
                       num_hvps=apply.count, converged=all_conv, iterations=total, info=info)
