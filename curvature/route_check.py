"""The one-gradient HVP route's check of its own error, on the converged Ritz vector.

A solve on the one-sided operator D₊v = (G(θ + εv) − G(θ))/ε (``FiniteDifferenceEngine(order=1)``: one gradient
per HVP) converges to a Ritz pair (θ, x) of D₊, whose eigenvalue is biased by (ε/2)·∇³L[x, x, x] (O(h)). Two more
gradients on x give the backward difference D₋x = (G(θ) − G(θ − εx))/ε, and

    λ_ctr = xᵀ(D₊x + D₋x)/2        the central-difference Rayleigh quotient of x: O(h²) off xᵀHx,
    e = ‖D₊x − D₋x‖/2 ≈ ‖D₊x − Hx‖  the one-sided route's own error on x (its first-order term): an upper estimate
                                    of the central difference's error on x, ‖Cx − Hx‖, C = (D₊ + D₋)/2
                                    (measured: 67× that on the GPT, 2–3× on the digits MLPs),
    b = |xᵀD₊x − xᵀD₋x|/2           the one-sided eigenvalue bias on x, an estimate of λ_ctr's own error
                                    (measured: central error 0.1–0.6 × b on the GELU MLP, float32, but 7–27× b for
                                    small models and for λ(P⁻¹H) with Adam early in training: ``scale``).

The reported value is λ_ctr, and its relative error bound is

    ‖r‖²/(min(gap, 1 %·|λ_ctr|)·|λ_ctr|) + scale·b/|λ_ctr|,     ‖r‖ = ‖Cx − λ_ctr x‖ + residual_scale·e,

the Kato–Temple bound (same gap estimate and 1 % cap as the solver's stop, see
:func:`~curvature.solvers._common.eigenvalue_error_bound`) with the residual the *exact* Hessian would leave (≤ the
central residual plus the central difference's error on x), plus the route's error on the Rayleigh quotient.
``scale`` = ``residual_scale`` = 1 unless a measurement against one exact HVP on the same vector (the tracker's
first row) set them to cover twice what it found (:meth:`OneSidedCheck.rebound`). The operator can be any wrapper
of the engine (λ(P⁻¹H): ``PreconditionedHessianOperator(inner=H)``): the check goes through ``op.matmat``.

Where the one-sided spread e is large next to the eigenvalue (e ≳ 3e-3 at eig_tol 1e-3, the GPT), x itself is that
far from an eigenvector of H (it is one of D₊), the central residual cannot fall below ≈ e, and the capped bound
cannot certify eig_tol: the tracker then solves with exact HVPs.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .solvers import MIN_RELATIVE_GAP

__all__ = ["OneSidedCheck", "check_one_sided", "check_ritz_pairs", "one_sided_bound", "rayleigh_product",
           "is_one_sided", "solve_eig_tol", "ONE_SIDED_SOLVE_FRACTION"]

#: One-sided solves stop at this fraction of ``eig_tol``: the bound after the central check adds the route's own
#: error (the one-sided error on the Ritz vector enlarges the residual, the bias term adds ~2e-4 on the benchmark
#: MLP), and the whole must still meet ``eig_tol``.
ONE_SIDED_SOLVE_FRACTION = 0.5


@dataclass
class OneSidedCheck:
    """What :func:`check_one_sided` measured on a Ritz vector x (relative quantities divide by |λ_ctr|)."""

    value: float             # λ_ctr, the central-difference Rayleigh quotient
    one_sided_value: float   # xᵀD₊x
    residual: float          # ‖r‖/|λ_ctr| with the route's error added (see the module docstring)
    route_error: float       # b/|λ_ctr|, the one-sided bias on x (times ``scale``)
    error_bound: float       # the bound on |λ_ctr − λ|/|λ|
    gradients: int           # gradient passes spent (2)
    central_residual: float = 0.0  # ‖Cx − λ_ctr x‖/|λ_ctr|, C = (D₊ + D₋)/2
    spread: float = 0.0      # e/|λ_ctr| = ‖D₊x − D₋x‖/(2|λ_ctr|), the one-sided error on x (unscaled)
    bias: float = 0.0        # b/|λ_ctr| unscaled
    gap: float = 0.0         # the Ritz gap (absolute) the Kato–Temple term uses, capped at 1 %
    central: torch.Tensor | None = field(default=None, repr=False, compare=False)  # C x (float64), for a calibration
    x: torch.Tensor | None = field(default=None, repr=False, compare=False)        # the unit vector checked

    def rebound(self, scale: float = 1.0, residual_scale: float = 1.0) -> tuple[float, float]:
        """(residual, bound) with the bias term times ``scale`` and the residual's route term times
        ``residual_scale`` (see :func:`one_sided_bound`)."""
        return one_sided_bound(self.value, self.central_residual, self.spread, self.bias, self.gap, scale,
                               residual_scale)


def one_sided_bound(lam: float, central_residual: float, spread: float, bias: float, gap: float,
                    scale: float = 1.0, residual_scale: float = 1.0) -> tuple[float, float]:
    """The relative (residual, error bound) of λ_ctr from relative pieces: residual = central_residual +
    residual_scale·spread, bound = Kato–Temple(residual, min(gap, 1 %·|λ|)) + scale·bias (``gap`` absolute).
    ``residual_scale`` = 1 takes the one-sided spread e for the central difference's error on x (the route's error
    is O(ε), the central one O(ε²): 67× smaller on the GPT, but only 2–3× on the digits MLPs, where rounding
    dominates both); a first-row calibration against one exact HVP sets it to cover twice what it measured."""
    a = max(abs(lam), torch.finfo(torch.float64).tiny)
    r = central_residual + residual_scale * spread
    delta = min(gap, MIN_RELATIVE_GAP * a)
    kato = (r * a) ** 2 / (delta * a) if delta > 0 else math.inf
    return r, kato + scale * bias


def rayleigh_product(op: Any, x: torch.Tensor) -> tuple[float, torch.Tensor]:
    """(xᵀAx/xᵀx, A x̂) in float64 for the unit x̂ = x/‖x‖ (one application of ``op``)."""
    x = x.reshape(-1).to(device=op.device, dtype=op.dtype)
    x = x / x.double().norm().to(x.dtype)
    y = op.matmat(x[:, None])[:, 0].double()
    return float(x.double() @ y), y


def check_one_sided(op: Any, engine: Any, x: torch.Tensor, ritz_gap: float | None, scale: float = 1.0,
                    residual_scale: float = 1.0) -> OneSidedCheck:
    """Central Rayleigh quotient and error bound of the Ritz vector ``x`` of a solve on ``op`` (whose HVPs come
    from ``engine``, a one-sided :class:`~curvature.finite_difference.FiniteDifferenceEngine`); ``ritz_gap`` is
    the solver's gap estimate (``info["ritz_gap"]``, capped here at 1 % like the solver's stop); ``scale`` and
    ``residual_scale`` as in :func:`one_sided_bound`."""
    x = x.reshape(-1).to(device=op.device, dtype=op.dtype)
    x = x / x.double().norm().to(x.dtype)
    X = x[:, None]
    yp = op.matmat(X)[:, 0].double()
    with engine.one_sided_side(-1):
        ym = op.matmat(X)[:, 0].double()
    xd = x.double()
    lp, lm = float(xd @ yp), float(xd @ ym)
    lam = 0.5 * (lp + lm)
    a = max(abs(lam), torch.finfo(op.dtype).tiny)
    central = 0.5 * (yp + ym)
    spread = float((yp - ym).norm()) / 2 / a
    r_central = float((central - lam * xd).norm()) / a
    bias = abs(lp - lm) / 2 / a
    gap = ritz_gap if ritz_gap is not None and math.isfinite(ritz_gap) else MIN_RELATIVE_GAP * a
    residual, bound = one_sided_bound(lam, r_central, spread, bias, gap, scale, residual_scale)
    return OneSidedCheck(value=lam, one_sided_value=lp, residual=residual, route_error=scale * bias,
                         error_bound=bound, gradients=2, central_residual=r_central, spread=spread, bias=bias,
                         gap=gap, central=central, x=xd)


def is_one_sided(op: Any) -> bool:
    """Whether ``op`` (or the operator it wraps, ``op.inner``) applies one-sided gradient differences."""
    engine = getattr(getattr(op, "inner", op), "engine", None)
    return getattr(engine, "order", None) == 1 and hasattr(engine, "one_sided_side")


def solve_eig_tol(op: Any, eig_tol: float | None) -> float | None:
    """The eig_tol a solve on ``op`` stops at: ``ONE_SIDED_SOLVE_FRACTION · eig_tol`` on the one-sided route (its
    check adds the route's error to the bound afterwards), ``eig_tol`` otherwise."""
    return eig_tol * ONE_SIDED_SOLVE_FRACTION if eig_tol is not None and is_one_sided(op) else eig_tol


def check_ritz_pairs(op: Any, res: Any, eig_tol: float | None = None, scale: float = 1.0) -> Any:
    """``res`` (a solve on the one-sided ``op``) with each Ritz value replaced by its central check: the
    values are the central Rayleigh quotients λ_ctr, the residuals and ``info["error_bound"]`` include the route's
    error (:func:`check_one_sided`, 2 gradients per vector, counted in ``num_hvps``), ``info["one_sided_checks"]``
    holds the checks, and
    ``converged`` also asks that the bound meet ``eig_tol`` (when given)."""
    engine = getattr(op, "inner", op).engine
    gap = res.info.get("ritz_gap")
    checks = [dataclasses.replace(check_one_sided(op, engine, res.eigenvectors[:, i], gap, scale), central=None, x=None)
              for i in range(res.eigenvectors.shape[1])]  # (no n-vectors kept in the result's info)
    res.eigenvalues = torch.tensor([c.value for c in checks], dtype=res.eigenvalues.dtype, device=res.eigenvalues.device)
    res.residuals = torch.tensor([c.residual for c in checks], dtype=res.residuals.dtype, device=res.residuals.device)
    res.num_hvps += sum(c.gradients for c in checks)  # the check's applications count like the solve's
    bound = max(c.error_bound for c in checks)
    res.info.update(error_bound=bound, one_sided_checks=checks, solver_error_bound=res.info.get("error_bound"))
    if eig_tol is not None and not bound <= eig_tol:
        res.converged = False
        res.info["stopped"] = (f"the one-sided route's bound {bound:.1e} (its own error included) is above eig_tol "
                               f"{eig_tol:g}: use the exact route (method='auto') or a smaller fd_epsilon")
    return res
