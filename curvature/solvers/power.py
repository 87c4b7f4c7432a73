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

from ._common import CountedApply, as_operator, check_k, make_generator, random_block, relative_residuals, residual_floor
from .result import EigenResult

__all__ = ["power_iteration"]


def power_iteration(op: Any, k: int = 1, *, tol: float = 1e-4, max_iters: int | None = None,
                    v0: torch.Tensor | None = None, seed: int = 0) -> EigenResult:
    """Top-``k`` largest-magnitude eigenpairs by power iteration with projection deflation.

    Args:
        op: :class:`~curvature.operators.LinearOperator` or square symmetric tensor.
        k: number of eigenpairs, found one after the other (each deflated from the next).
        tol: stop each pair when ``‖A x − λ x‖ / max(|λ|, floor) <= tol``, ``floor = eps(dtype)·max|λ|``.
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
    if max_iters is None:
        max_iters = 1000
    if max_iters < 1:
        raise ValueError(f"max_iters must be >= 1, got {max_iters}")
    dtype, device = op.dtype, op.device
    starts = None
    if v0 is not None:
        starts = v0.detach().to(device=device, dtype=dtype)
        if starts.ndim == 1:
            starts = starts[:, None]
        if starts.ndim != 2 or starts.shape[0] != n:
            raise ValueError(f"v0 must have shape ({n},) or ({n}, j), got {tuple(v0.shape)}")
    gen = make_generator(seed)
    apply = CountedApply(op)
    V = torch.zeros(n, 0, dtype=dtype, device=device)
    AV = torch.zeros(n, 0, dtype=dtype, device=device)
    vals: list[float] = []
    per_pair: list[int] = []
    pair_conv: list[bool] = []
    history: list[list[float]] = []
    total = 0
    scale = 0.0
    floor = residual_floor(0.0, dtype)
    for j in range(k):
        x = starts[:, j] if starts is not None and j < starts.shape[1] else random_block(n, 1, gen, dtype, device)[:, 0]
        for _ in range(2):
            x = x - V @ (V.T @ x)
        nrm = float(torch.linalg.vector_norm(x))
        if not (0 < nrm < float("inf")):
            if starts is not None and j < starts.shape[1]:
                raise ValueError(f"start vector {j} is zero, non-finite or inside the span of the found vectors")
            raise RuntimeError("random start vector is degenerate")
        x = x / nrm
        hist: list[float] = []
        lam, rel, conv, it = 0.0, float("inf"), False, 0
        while it < max_iters:
            it += 1
            total += 1
            y_raw = apply(x[:, None], total)[:, 0]
            lam_t = torch.dot(x, y_raw)
            lam = float(lam_t)
            scale = max(scale, abs(lam))
            floor = residual_floor(scale, dtype)
            y = y_raw
            for _ in range(2):  # deflate: keep the iterate orthogonal to the found eigenvectors
                y = y - V @ (V.T @ y)
            # residual of the deflated operator (equals the true one when V is exact)
            rel = float(torch.linalg.vector_norm(y - lam_t * x)) / max(abs(lam), floor)
            hist.append(rel)
            if rel <= tol:
                conv = True
                break
            ny = float(torch.linalg.vector_norm(y))
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
    # Rayleigh–Ritz on span(V) with the stored A V (no applications): decouples the small errors that
    # deflation by inexact vectors leaves, and gives the true residuals ‖A v − λ v‖ reported below.
    K = (V.T @ AV).to(torch.float64)
    w, U = torch.linalg.eigh(0.5 * (K + K.T))
    order = torch.argsort(w, descending=True, stable=True)
    U = U[:, order].to(dtype)
    lam_t = w[order].to(dtype)
    V, AV = V @ U, AV @ U
    floor = residual_floor(max(scale, float(lam_t.abs().max())), dtype)
    res_t = relative_residuals(AV, V, lam_t, floor)
    all_conv = bool((res_t <= tol).all())
    info = {"iterations_per_pair": per_pair, "history": history, "by_magnitude": True,
            "negative_dominant": vals[0] < 0, "deflated_converged": pair_conv, "residual_floor": floor, "tol": tol,
            "order_found": [float(v) for v in vals]}
    if vals[0] < 0:
        info["note"] = ("power iteration finds the largest-MAGNITUDE eigenvalue: the operator is dominated by a "
                        "negative eigenvalue, use lobpcg/lanczos for the algebraically largest")
    return EigenResult(eigenvalues=lam_t, eigenvectors=V, residuals=res_t,
                       num_hvps=apply.count, converged=all_conv, iterations=total, info=info)
