"""Helpers shared by the eigensolvers: operator coercion, counted application, seeded random
blocks, B-orthonormalisation (SVQB with dropping) and relative residuals.

All of them work on ``op.device`` in ``op.dtype``; only tiny ``s × s`` problems are solved in
float64 (on the same device) for robustness in float32 runs.
"""
from __future__ import annotations

from typing import Any

import torch

from ..operators import LinearOperator, MatrixOperator

__all__ = ["as_operator", "CountedApply", "random_block", "svqb", "svqb_gram", "orthonormalize", "make_generator", "project_out", "relative_residuals",
           "residual_floor", "check_k"]


def as_operator(op: Any) -> LinearOperator:
    """Return ``op`` as something with ``shape/dtype/device/matmat``; a square tensor is wrapped.

    Raises ``ValueError`` for a non-square tensor/operator or an object without ``matmat``.
    """
    if isinstance(op, torch.Tensor):
        if op.ndim != 2 or op.shape[0] != op.shape[1]:
            raise ValueError(f"the operator must be a square matrix, got a tensor of shape {tuple(op.shape)}")
        if not op.is_floating_point():
            op = op.to(torch.get_default_dtype())
        return MatrixOperator(op)
    if not hasattr(op, "matmat") or not hasattr(op, "shape"):
        raise TypeError(f"expected a LinearOperator (shape, dtype, device, matmat) or a square tensor, "
                        f"got {type(op).__name__}")
    shape = tuple(op.shape)
    if len(shape) != 2 or shape[0] != shape[1]:
        raise ValueError(f"the operator must be square (n, n), got shape {shape}")
    return op


def check_k(k: int, n: int) -> int:
    """Validate the number of wanted eigenpairs ``1 <= k <= n``."""
    if not isinstance(k, int) or isinstance(k, bool):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got k={k}")
    if k > n:
        raise ValueError(f"k={k} eigenpairs requested but the operator is only {n} x {n}")
    return k


class CountedApply:
    """Applies ``op.matmat`` and counts applications per column; raises on non-finite output."""

    def __init__(self, op: LinearOperator) -> None:
        self.op = op
        self.count = 0

    def __call__(self, V: torch.Tensor, iteration: int) -> torch.Tensor:
        if V.shape[1] == 0:
            return V.new_zeros(V.shape)
        Y = self.op.matmat(V)
        self.count += int(V.shape[1])
        if not bool(torch.isfinite(Y).all()):
            raise FloatingPointError(f"the operator returned NaN/inf at iteration {iteration} "
                                     f"(applied to a block of {V.shape[1]} vectors)")
        return Y.to(dtype=V.dtype)


def random_block(n: int, k: int, generator: torch.Generator, dtype: torch.dtype,
                 device: torch.device) -> torch.Tensor:
    """Standard normal ``(n, k)`` block drawn on the CPU from ``generator`` in ``dtype``, then moved.

    Drawing on the CPU makes CPU and CUDA runs start from the same vectors for the same seed.
    """
    gen_dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    return torch.randn(n, k, generator=generator, dtype=gen_dtype).to(device=device, dtype=dtype)


def make_generator(seed: int) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed))
    return g


def project_out(V: torch.Tensor, Q: torch.Tensor | None, passes: int = 2) -> torch.Tensor:
    """``V ← (I − Q Qᵀ) V`` for orthonormal ``Q``, classical Gram–Schmidt applied twice ("twice is enough")."""
    if Q is None or Q.shape[1] == 0 or V.shape[1] == 0:
        return V
    for _ in range(passes):
        V = V - Q @ (Q.T @ V)
    return V


def svqb_gram(G: torch.Tensor, eps: float, drop_tol: float | None = None) -> torch.Tensor:
    """From a Gram matrix ``G = Vᵀ B V`` (``k × k``): ``T`` (``k × r``) with ``Tᵀ G T = I``, dropping
    near-dependent directions.

    SVQB (Stathopoulos & Wu 2002): ``D = diag(G)^{-1/2}``, ``D G D = U Θ Uᵀ``, ``T = D U Θ^{-1/2}``
    restricted to ``θ > drop_tol · max θ`` (default ``drop_tol = 100 eps``). Columns of norm
    ``<= eps · max norm`` are dropped first. Solved in float64; ``T`` is float64.
    """
    k = G.shape[0]
    G = G.to(torch.float64)
    if k == 0:
        return G.new_zeros((0, 0))
    if drop_tol is None:
        drop_tol = 100.0 * eps
    G = 0.5 * (G + G.T)
    d = torch.diagonal(G).clamp_min(0).sqrt()
    dmax = float(d.max())
    if not dmax > 0.0:
        return G.new_zeros((k, 0))
    keep_cols = d > (eps * dmax)
    dinv = torch.where(keep_cols, 1.0 / torch.where(keep_cols, d, torch.ones_like(d)), torch.zeros_like(d))
    theta, U = torch.linalg.eigh(dinv[:, None] * G * dinv[None, :])
    keep = theta > drop_tol * max(float(theta[-1]), 0.0)
    if not bool(keep.any()):
        return G.new_zeros((k, 0))
    return dinv[:, None] * U[:, keep] / theta[keep].sqrt()[None, :]


def svqb(V: torch.Tensor, drop_tol: float | None = None) -> torch.Tensor:
    """Transform ``T`` (``k × r``, ``r <= k``, in ``V.dtype``) with ``V T`` orthonormal (see :func:`svqb_gram`)."""
    eps = torch.finfo(V.dtype).eps
    return svqb_gram(V.T @ V, eps, drop_tol).to(V.dtype)


def orthonormalize(V: torch.Tensor, Q: torch.Tensor | None = None,
                   drop_tol: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormalise ``V`` against ``Q`` then within itself (SVQB twice, dropping dependent columns).

    Returns ``(W, T)`` with ``W`` orthonormal; when ``Q`` is None, ``W = V T`` (``T`` is the
    accumulated transform, useful to update ``A V`` implicitly).
    """
    T_total = torch.eye(V.shape[1], dtype=V.dtype, device=V.device)
    for _ in range(2):
        V = project_out(V, Q)
        T = svqb(V, drop_tol)
        V = V @ T
        T_total = T_total @ T
        if V.shape[1] == 0:
            break
    return V, T_total


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of a solver's own arithmetic: float64, unless the operator works in a wider type."""
    return dtype if dtype in (torch.float64, torch.complex128) else torch.float64


def rounding_residual(lam: torch.Tensor, scale: float, dtype: torch.dtype, floor: float) -> torch.Tensor:
    """The relative residual that rounding an exact eigenvector to ``dtype`` alone leaves:
    ‖(A − λ)δv‖/|λ| ≤ ½·eps(dtype)·(‖A‖ + |λ|)/|λ| for ‖δv‖ ≤ ½·eps (``scale`` ≈ ‖A‖)."""
    a = lam.abs().clamp_min(floor)
    return 0.5 * torch.finfo(dtype).eps * (abs(scale) + a) / a


def residual_floor(scale: float, dtype: torch.dtype) -> float:
    """Floor for ``|λ|`` in relative residuals: ``eps(dtype) · scale`` (``scale`` ≈ ‖A‖, the largest
    ``|Ritz value|`` seen), and never below the smallest normal number."""
    fi = torch.finfo(dtype)
    return max(fi.eps * abs(scale), fi.tiny)


def relative_residuals(AV: torch.Tensor, V: torch.Tensor, lam: torch.Tensor, floor: float) -> torch.Tensor:
    """``‖A v_i − λ_i v_i‖ / max(|λ_i|, floor)`` per column."""
    R = AV - V * lam[None, :]
    return torch.linalg.vector_norm(R, dim=0) / lam.abs().clamp_min(floor)
