"""Helpers shared by the eigensolvers: operator coercion, counted application, seeded random
blocks, B-orthonormalisation (SVQB with dropping) and relative residuals.

All of them work on ``op.device`` in ``op.dtype``; only tiny ``s × s`` problems are solved in
float64 (on the same device) for robustness in float32 runs.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from .._validate import check_tol
from ..linear_operator import LinearOperator, MatrixOperator

__all__ = ["as_operator", "CountedApply", "random_block", "svqb", "svqb_gram", "orthonormalize", "make_generator", "project_out", "relative_residuals",
           "residual_floor", "check_k", "dot", "column_norms", "vector_norm", "RandomStarts", "check_tol",
           "combined_start",
           "eigenvalue_error_bound", "StopRule"]


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
        # one float64 sum is finite iff every entry is (a float32/bf16 sum in float64 cannot overflow; a float64
        # one can, so a non-finite sum is confirmed entry by entry): a tenth of the cost of isfinite().all()
        if not math.isfinite(float(Y.sum(dtype=torch.float64))) and not bool(torch.isfinite(Y).all()):
            raise FloatingPointError(f"the operator returned NaN/inf at iteration {iteration} "
                                     f"(applied to a block of {V.shape[1]} vectors)")
        return Y.to(dtype=V.dtype)


def random_block(n: int, k: int, generator: torch.Generator, dtype: torch.dtype,
                 device: torch.device) -> torch.Tensor:
    """Standard normal ``(n, k)`` block drawn on the CPU from ``generator`` in float64, then cast and moved.

    Drawing on the CPU in float64 makes CPU and CUDA, float32 and float64 runs start from the same vectors
    (up to the final rounding) for the same seed.
    """
    return torch.randn(n, k, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------------
# Operator hooks: inner products and random starts (sharded operators override them)
# ---------------------------------------------------------------------------------------------------
def dot(op: Any, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """``Xᵀ Y`` through the operator's hook ``op.dot(X, Y)`` when it has one (a sharded operator sums the
    local products over all ranks), else the local ``X.T @ Y``. 1-D inputs give a scalar tensor."""
    hook = getattr(op, "dot", None)
    if hook is not None:
        return hook(X, Y)
    if X.ndim == 1 and Y.ndim == 1:
        return torch.dot(X, Y)
    return X.T @ Y


def column_norms(op: Any, X: torch.Tensor) -> torch.Tensor:
    """Euclidean norm of each column of ``X`` (``(n, k)`` → ``(k,)``), through :func:`dot`."""
    if getattr(op, "dot", None) is None:
        return torch.linalg.vector_norm(X, dim=0)
    return torch.diagonal(dot(op, X, X)).clamp_min(0).sqrt()


def vector_norm(op: Any, x: torch.Tensor) -> torch.Tensor:
    """Euclidean norm of a vector ``(n,)``, through :func:`dot`."""
    if getattr(op, "dot", None) is None:
        return torch.linalg.vector_norm(x)
    return dot(op, x[:, None], x[:, None])[0, 0].clamp_min(0).sqrt()


def combined_start(op: Any, vectors: Any) -> torch.Tensor | None:
    """One start vector from several hints (columns of blocks and single vectors, in the operator's layout):
    the sum of each one normalised, ``Σ x_i/‖x_i‖`` (norms through :func:`dot`, so a sharded operator's ranks
    agree): it has a component along every hint, so a Krylov solve from it sees each direction they lean to (when
    the hints are near-eigenvectors, all of them after a few steps). Zero or non-finite hints are skipped; ``None`` when
    none is left (start at random)."""
    total = None
    for x in vectors:
        if x is None:
            continue
        cols = x[:, None] if x.ndim == 1 else x
        for j in range(cols.shape[1]):
            c = cols[:, j].to(device=op.device, dtype=op.dtype)
            nrm = float(vector_norm(op, c))
            if not (0.0 < nrm < math.inf):
                continue
            total = c / nrm if total is None else total + c / nrm
    return total


class RandomStarts:
    """Seeded random start blocks for one solve: ``draw(k, dtype)`` → an ``(n, k)`` block.

    Uses the operator's hook ``op.random_block(k, seed, dtype)`` when it has one (a sharded operator returns
    this rank's slice of one global block; successive draws get seeds ``seed, seed + 1, ...``), else
    :func:`random_block` from one ``torch.Generator`` seeded with ``seed`` (float64 draws on the CPU).
    """

    def __init__(self, op: Any, seed: int, device: torch.device) -> None:
        self.op = op
        self.seed = int(seed)
        self.device = device
        self.n = int(op.shape[0])
        self.draws = 0
        self._hook = getattr(op, "random_block", None)
        self._gen = make_generator(self.seed) if self._hook is None else None

    def draw(self, k: int, dtype: torch.dtype) -> torch.Tensor:
        self.draws += 1
        if self._hook is not None:
            return self._hook(k, self.seed + self.draws - 1, dtype).to(device=self.device, dtype=dtype)
        return random_block(self.n, k, self._gen, dtype, self.device)


# ---------------------------------------------------------------------------------------------------
# Accuracy-controlled stopping
# ---------------------------------------------------------------------------------------------------
#: The smallest relative gap between wanted and unwanted eigenvalues the eig_tol stop assumes.
MIN_RELATIVE_GAP = 1e-2


def eigenvalue_error_bound(theta: torch.Tensor, residual_norms: torch.Tensor, gaps: torch.Tensor,
                           floor: float) -> torch.Tensor:
    """Bound on the relative error of Ritz values: ``‖r_i‖² / (gap_i · |θ_i|)``.

    For a Ritz pair (θ, x) with ‖x‖ = 1 and residual r = Ax − θx, the eigenvalue λ nearest θ satisfies
    |λ − θ| ≤ ‖r‖²/δ, where δ separates θ from the rest of the spectrum (Kato–Temple; Saad, *Numerical
    Methods for Large Eigenvalue Problems*, Thm 3.8 / Parlett, *The Symmetric Eigenvalue Problem*, §11-7).
    δ is estimated by the gap to the neighbouring Ritz value (θ_k − θ_{k+1} for the k-th wanted one),
    which the safeguard of :class:`StopRule` backs up, and capped at ``MIN_RELATIVE_GAP · |θ|`` (1 %): two
    eigenvalues closer than the basis has resolved (λ1/λ2 = 3.362/3.315 at the edge of stability) leave a Ritz value
    between them with a small residual and a large Ritz gap; the cap keeps the bound honest for any pair at least
    1 % apart (it then asks ‖r‖/|θ| ≤ 0.1·√eig_tol). A gap ≤ 0 (not yet separated) gives ``inf``.
    """
    th = theta.to(torch.float64).abs().clamp_min(floor)
    g = torch.minimum(gaps.to(torch.float64), MIN_RELATIVE_GAP * th)
    r2 = residual_norms.to(torch.float64) ** 2
    out = torch.where(g > 0, r2 / (g.clamp_min(torch.finfo(torch.float64).tiny) * th),
                      torch.full_like(r2, math.inf))
    return out


class StopRule:
    """The stopping test shared by the solvers.

    * ``tol`` (residual): every wanted ``‖Ax − θx‖/|θ| <= tol`` — a guarantee on the eigenvectors too.
    * ``eig_tol`` (eigenvalue): every wanted relative error bound ``‖r‖²/(gap·|θ|) <= eig_tol`` (see
      :func:`eigenvalue_error_bound`) **and**, as a safeguard against an over-estimated gap, each wanted Ritz
      value moved by at most ``safeguard · eig_tol`` (relative) since the previous iteration (``safeguard``: 1 for
      Lanczos, whose Ritz values converge superlinearly; 0.3 for LOBPCG, whose 3-block search space estimates
      the gap poorly), and the change still to come if the Ritz values keep converging at their last rate
      (Aitken extrapolation of the moves, :meth:`extrapolated`) is at most ``eig_tol`` — this catches two close
      eigenvalues not yet separated, where the gap of the basis is far larger than the true one.

    Converged = every criterion that was asked for holds. ``tol=None`` and ``eig_tol=None`` together mean the
    default residual test ``tol = 1e-4``.
    """

    DEFAULT_TOL = 1e-4

    def __init__(self, tol: Any, eig_tol: Any, safeguard: float = 1.0) -> None:
        self.safeguard = float(safeguard)
        self.eig_tol = check_tol(eig_tol, "eig_tol", allow_none=True)
        tol = check_tol(tol, "tol", allow_none=True)
        self.tol = self.DEFAULT_TOL if tol is None and self.eig_tol is None else tol
        self._prev: torch.Tensor | None = None
        self._moves: list[float] = []
        self.last_bound: float = math.inf
        self.last_move: float = math.inf

    def moved(self, theta: torch.Tensor, floor: float) -> float:
        """Largest relative change of the wanted Ritz values since the last call (``inf`` on the first)."""
        th = theta.detach().to(torch.float64)
        prev, self._prev = self._prev, th.clone()
        if prev is None or prev.shape != th.shape:
            self._moves = []
            return math.inf
        move = float(((th - prev).abs() / th.abs().clamp_min(floor)).max())
        self._moves.append(move)
        return move

    def extrapolated(self) -> float:
        """Remaining change of the Ritz values if they keep converging at the rate of the last two moves,
        ``δ_t ρ/(1−ρ)`` with ``ρ = δ_t/δ_{t−1}`` (Aitken): large while two close eigenvalues are still being
        separated (slow, linear convergence), tiny once convergence is fast. ``inf`` when not shrinking."""
        moves = self._moves
        if len(moves) < 2:
            return math.inf
        d1, d0 = moves[-1], moves[-2]
        if d1 == 0.0:
            return 0.0
        if not d1 < d0:
            return math.inf
        rho = d1 / d0
        return d1 * rho / (1.0 - rho)

    def check(self, theta: torch.Tensor, rel_residuals: torch.Tensor, gaps: torch.Tensor | None,
              floor: float, watched: torch.Tensor | None = None) -> bool:
        """Whether to stop now. ``rel_residuals`` are ``‖r‖/|θ|``; ``gaps`` the Ritz gaps (None: unknown);
        ``watched`` (default ``theta``): the Ritz values whose move the safeguard watches (the wanted ones
        plus the next, so a value still emerging from below holds the stop back)."""
        self.last_move = self.moved(theta if watched is None else watched, floor)
        return self.satisfied(theta, rel_residuals, gaps, floor)

    def satisfied(self, theta: torch.Tensor, rel_residuals: torch.Tensor, gaps: torch.Tensor | None,
                  floor: float) -> bool:
        """The test of :meth:`check` on given residuals, with the last recorded move (no state update)."""
        ok = True
        if self.tol is not None:
            ok = bool((rel_residuals <= self.tol).all())
        if self.eig_tol is not None:
            # the moves first (Python floats): the bound is computed only once they allow a stop
            ok = ok and self.last_move <= self.safeguard * self.eig_tol and self.extrapolated() <= self.eig_tol
            if ok:
                self.last_bound = self.bound(theta, rel_residuals, gaps, floor)
                ok = self.last_bound <= self.eig_tol
        return ok

    @staticmethod
    def bound(theta: torch.Tensor, rel_residuals: torch.Tensor, gaps: torch.Tensor | None, floor: float) -> float:
        """The largest relative eigenvalue error bound over the wanted pairs (``inf`` without gaps)."""
        if gaps is None:
            return math.inf
        th = theta.to(torch.float64).abs().clamp_min(floor)
        r = rel_residuals.to(torch.float64) * th
        return float(eigenvalue_error_bound(theta, r, gaps, floor).max())


def make_generator(seed: int) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed))
    return g


def project_out(V: torch.Tensor, Q: torch.Tensor | None, passes: int = 2, op: Any = None) -> torch.Tensor:
    """``V ← (I − Q Qᵀ) V`` for orthonormal ``Q``, classical Gram–Schmidt applied twice ("twice is enough");
    inner products through :func:`dot` of ``op``."""
    if Q is None or Q.shape[1] == 0 or V.shape[1] == 0:
        return V
    for _ in range(passes):
        V = V - Q @ dot(op, Q, V).to(V.dtype)
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


def svqb(V: torch.Tensor, drop_tol: float | None = None, op: Any = None) -> torch.Tensor:
    """Transform ``T`` (``k × r``, ``r <= k``, in ``V.dtype``) with ``V T`` orthonormal (see :func:`svqb_gram`)."""
    eps = torch.finfo(V.dtype).eps
    return svqb_gram(dot(op, V, V), eps, drop_tol).to(V.dtype)


def orthonormalize(V: torch.Tensor, Q: torch.Tensor | None = None,
                   drop_tol: float | None = None, op: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormalise ``V`` against ``Q`` then within itself (SVQB twice, dropping dependent columns).

    Returns ``(W, T)`` with ``W`` orthonormal; when ``Q`` is None, ``W = V T`` (``T`` is the
    accumulated transform, useful to update ``A V`` implicitly).
    """
    T_total = torch.eye(V.shape[1], dtype=V.dtype, device=V.device)
    for _ in range(2):
        V = project_out(V, Q, op=op)
        T = svqb(V, drop_tol, op)
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


def relative_residuals(AV: torch.Tensor, V: torch.Tensor, lam: torch.Tensor, floor: float,
                       op: Any = None) -> torch.Tensor:
    """``‖A v_i − λ_i v_i‖ / max(|λ_i|, floor)`` per column."""
    R = AV - V * lam[None, :]
    return column_norms(op, R) / lam.abs().clamp_min(floor)
