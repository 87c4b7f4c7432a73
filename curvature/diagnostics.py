"""Curvature diagnostics on a model: sharpness (top Hessian eigenvalues), the HVP self-check, and the comparison
of the exact and finite-difference HVP routes on the user's model.

Sharpness is λ_max(∇²L): gradient descent with step η is stable on a quadratic while η·λ_max < 2
(see :mod:`curvature.optim` for thresholds of momentum and Adam, and for the pre-conditioned sharpness).
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from ._exact import holding_rng
from ._validate import check_optional_positive_int, check_positive_float, check_positive_int, check_seed, check_tol
from .operators import HessianOperator, LinearOperator, ShiftedOperator
from .route_check import check_ritz_pairs, is_one_sided, solve_eig_tol
from .data import CurvatureWarning
from .usage import check_batch_argument, check_not_a_batch_half
from .solvers import EigenResult, lanczos, lobpcg, power_iteration

__all__ = ["sharpness", "solve", "check_hvp", "HVPCheck", "compare_hvp_routes", "RouteComparison", "SOLVERS"]

SOLVERS = {"lobpcg": lobpcg, "lanczos": lanczos, "power_iteration": power_iteration}

# Options of HessianOperator that sharpness() and friends pass through.
OPERATOR_OPTIONS = ("method", "dtype", "device", "seed", "max_batch_size", "chunk_size", "cache_graph",
                    "distributed", "process_group", "weight_fn", "inputs_as", "fd_order", "fd_epsilon", "autocast",
                    "compile")


def solve(op: LinearOperator, k: int = 1, solver: str = "lobpcg", tol: float | None = None,
          max_iters: int | None = None, X0: torch.Tensor | None = None, largest: bool = True, seed: int = 0,
          eig_tol: float | None = None) -> EigenResult:
    """Top-k (``largest=False``: bottom-k) eigenpairs of ``op`` with the named solver.

    ``X0`` warm-starts LOBPCG (a block) and Lanczos / power iteration (its first column). With
    ``"power_iteration"`` the result is also the algebraically largest: where the spectrum is dominated by a
    negative eigenvalue, a second pass on the shifted operator A − λ_min·I finds the top (``info["shift"]``).
    ``tol`` bounds the relative residuals (default 1e-4 unless ``eig_tol`` is given); ``eig_tol`` asks for a
    relative eigenvalue accuracy (a bounded error, ``info["error_bound"]``) and drops the residual requirement
    unless ``tol`` is given too.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {sorted(SOLVERS)}, got {solver!r}")
    k = check_positive_int(k, "k")
    tol = None if tol is None else check_tol(tol)  # None: the solver's default
    max_iters = check_optional_positive_int(max_iters, "max_iters")
    seed = check_seed(seed, "solver_seed")
    if k > op.shape[0]:
        raise ValueError(f"k={k} eigenpairs asked of an operator of size {op.shape[0]}")
    with holding_rng(op.device):  # the RNG states saved once for the solve, not around every HVP
        return _solve(op, k, solver, tol, max_iters, X0, largest, seed, eig_tol)


def _solve(op: LinearOperator, k: int, solver: str, tol: float | None, max_iters: int | None,
           X0: torch.Tensor | None, largest: bool, seed: int, eig_tol: float | None) -> EigenResult:
    if solver == "lobpcg":
        return lobpcg(op, k, largest=largest, tol=tol, max_iters=max_iters, X0=X0, seed=seed, eig_tol=eig_tol)
    v0 = None if X0 is None else (X0 if X0.ndim == 1 else X0[:, 0])
    if solver == "lanczos":
        return lanczos(op, k, largest=largest, tol=tol, max_iters=max_iters, v0=v0, seed=seed, eig_tol=eig_tol)
    if not largest:
        raise ValueError("power_iteration finds the largest-magnitude eigenvalues; use lobpcg or lanczos "
                         "with largest=False for the most negative ones")
    return _algebraic_power_iteration(op, k, tol, max_iters, v0, seed, eig_tol)


def _algebraic_power_iteration(op: LinearOperator, k: int, tol: float | None, max_iters: int | None,
                               v0: torch.Tensor | None, seed: int, eig_tol: float | None = None) -> EigenResult:
    """Top-k *algebraic* eigenpairs by power iteration, which by itself finds the largest *magnitudes*.

    Pairs come out in order of magnitude, so a negative one among them is λ_min; then A − λ_min·I is positive
    semi-definite, its largest magnitudes are its largest eigenvalues, and a second pass on it gives the top-k
    of A (eigenvalues shifted back, residuals ‖Av − λv‖/|λ| recomputed from the shifted ones)."""
    if tol is None and eig_tol is None:
        tol = 1e-4
    first = power_iteration(op, k, tol=tol, max_iters=max_iters, v0=v0, seed=seed, eig_tol=eig_tol)
    if not (first.eigenvalues < 0).any():
        return first
    sigma = float(first.eigenvalues.min())
    shifted = ShiftedOperator(op, sigma)
    passes = [first]

    def unshift(res: EigenResult) -> tuple[torch.Tensor, torch.Tensor]:
        vals = res.eigenvalues + sigma
        floor = torch.finfo(vals.dtype).eps * float(vals.abs().max())
        return vals, res.residuals * (res.eigenvalues.abs() / vals.abs().clamp_min(floor))

    second = power_iteration(shifted, k, tol=tol, max_iters=max_iters, v0=v0, seed=seed, eig_tol=eig_tol)
    passes.append(second)
    vals, residuals = unshift(second)
    if tol is not None and not bool((residuals <= tol).all()):
        # a residual relative to |λ − σ| is |λ − σ|/|λ| times looser than one relative to |λ|: refine once, warm,
        # at the tolerance that makes the unshifted residual meet ``tol``
        ratio = float((vals.abs() / second.eigenvalues.abs().clamp_min(torch.finfo(vals.dtype).tiny)).min())
        refined = power_iteration(shifted, k, tol=tol * ratio, max_iters=max_iters, v0=second.eigenvectors,
                                  seed=seed, eig_tol=eig_tol)
        passes.append(refined)
        second = refined
        vals, residuals = unshift(refined)
    info = dict(second.info, shift=sigma, first_pass_eigenvalues=first.eigenvalues.tolist(), passes=len(passes))
    converged = bool((residuals <= tol).all()) if tol is not None else bool(second.converged)
    return EigenResult(vals, second.eigenvectors, residuals, sum(p.num_hvps for p in passes),
                       converged, sum(p.iterations for p in passes), info)


def split_operator_options(options: dict) -> tuple[dict, dict]:
    """Separate HessianOperator options from the rest (used by every diagnostic entry point)."""
    op_kw = {k: options.pop(k) for k in list(options) if k in OPERATOR_OPTIONS}
    return op_kw, options


def check_solver_options(k: Any, solver: Any, tol: Any, max_iters: Any, seed: Any, eig_tol: Any = None) -> None:
    """Validate solver options before any model work is done (raises ``ValueError``/``TypeError``)."""
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {sorted(SOLVERS)}, got {solver!r}")
    check_positive_int(k, "k")
    check_tol(tol, allow_none=True)
    check_tol(eig_tol, "eig_tol", allow_none=True)
    check_optional_positive_int(max_iters, "max_iters")
    check_seed(seed, "solver_seed")


def sharpness(model: torch.nn.Module, loss_fn: Any, data: Any, k: int = 1, solver: str = "lanczos",
              tol: float | None = None, max_iters: int | None = None, X0: torch.Tensor | None = None, *,
              params: Any = None, largest: bool = True, solver_seed: int = 0, eig_tol: float | None = None,
              **operator_options: Any) -> EigenResult:
    """Top-k eigenvalues of the Hessian of the mean loss, λ_1 ≥ … ≥ λ_k (``largest=False``: the k most
    negative), with their eigenvectors.

    ``solver`` defaults to Lanczos (fewest HVPs in our measurements: k=1 29 vs 32 (LOBPCG) at eig_tol 1e-3, 37 vs 51
    at tol 1e-4, k=5 65 vs 121; medians over 5 start vectors). ``tol`` bounds each relative residual ‖Hv − λv‖/|λ|
    (default 1e-4 unless ``eig_tol`` is given);
    ``eig_tol`` asks for the relative eigenvalue accuracy instead (e.g. ``eig_tol=1e-3``: stop once the bound
    ‖r‖²/(gap·|λ|) on the error is below it; ``info["error_bound"]``); ``X0`` (an ``(n, m)`` block, e.g. the previous
    step's eigenvectors) warm-starts the solver. Extra keyword options go to :class:`HessianOperator`
    (``method``, ``dtype``, ``device``, ``seed``, ``max_batch_size``, ``distributed``, ...). The result's
    ``info`` holds ``loss`` (mean loss at the point), ``method`` (HVP route used) and ``low_precision_modules``
    (modules computing below the operator's dtype, e.g. float32 RMSNorms in a float64 run: λ is only that accurate).
    """
    op_kw, rest = split_operator_options(dict(operator_options))
    if rest:
        raise TypeError(f"sharpness() got unexpected keyword arguments: {sorted(rest)}")
    check_not_a_batch_half(k, "k", "sharpness(model, loss_fn, data, k)", batch_name="data")
    check_batch_argument(data, "data", "sharpness(model, loss_fn, data, k)")
    check_solver_options(k, solver, tol, max_iters, solver_seed, eig_tol)
    op = HessianOperator(model, loss_fn, data, params, **op_kw)
    res = solve_checked(op, k, solver, tol, max_iters, X0, largest, solver_seed, eig_tol)
    res.info.update(loss=op.loss, method=op.method, num_params=op.shape[0],
                    low_precision_modules=dict(getattr(op, "low_precision_modules", {})))
    return res


def solve_checked(op: LinearOperator, k: int = 1, solver: str = "lanczos", tol: float | None = None,
                  max_iters: int | None = None, X0: torch.Tensor | None = None, largest: bool = True, seed: int = 0,
                  eig_tol: float | None = None) -> EigenResult:
    """:func:`solve`, and on the one-sided route (``fd_order=1``, also under a pre-conditioner) the central check of
    every Ritz pair (:func:`~curvature.route_check.check_ritz_pairs`): its Ritz values are O(ε) off, so the solve
    stops at ``ONE_SIDED_SOLVE_FRACTION · eig_tol`` and the result reports the central values with a bound that
    includes the route's error. Finite-difference results carry ``info["hvp_route"]`` and ``info["num_gradients"]``."""
    one_sided = is_one_sided(op)
    if one_sided and getattr(op, "dot", None) is not None:
        raise ValueError("fd_order=1 (one-sided differences) on a sharded (FSDP2) model: the route's error check is "
                         "not collective yet, so its values could not be bounded. Use fd_order=2 (central "
                         "differences, the sharded default) or fd_order=4")
    res = solve(op, k, solver, tol, max_iters, X0, largest, seed, solve_eig_tol(op, eig_tol))
    if one_sided:
        res = check_ritz_pairs(op, res, eig_tol)
    engine = getattr(getattr(op, "inner", op), "engine", None)
    if getattr(engine, "method", None) == "finite_difference":
        res.info.update(hvp_route="one_sided" if one_sided else f"finite_difference (order {engine.order})",
                        num_gradients=int(engine.gradients))
    return res


@dataclass
class HVPCheck:
    """Outcome of :func:`check_hvp`: per-direction relative errors against central differences of gradients
    and of the symmetry ``uᵀHv = vᵀHu``."""

    fd_errors: list[float]
    symmetry_errors: list[float]
    tol: float
    eps: float
    dtype: torch.dtype
    details: dict = field(default_factory=dict)

    @property
    def max_fd_error(self) -> float:
        return max(self.fd_errors)

    @property
    def max_symmetry_error(self) -> float:
        return max(self.symmetry_errors)

    @property
    def passed(self) -> bool:
        return self.max_fd_error <= self.tol and self.max_symmetry_error <= self.tol

    def __str__(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        text = (f"check_hvp {verdict} ({self.dtype}, tol {self.tol:.0e}): max relative error vs finite "
                f"differences {self.max_fd_error:.2e}, max asymmetry {self.max_symmetry_error:.2e} "
                f"over {len(self.fd_errors)} directions")
        loss_dtype = self.details.get("loss_dtype")
        if loss_dtype is not None and loss_dtype != self.dtype:
            text += (f"; the loss is computed in {loss_dtype}, so the step and tolerance are those of {loss_dtype} "
                     f"and the HVP is only {loss_dtype}-accurate (compute the loss on the logits in {self.dtype} "
                     "for a full-precision check)")
        return text


def check_hvp(model: torch.nn.Module, loss_fn: Any, data: Any, *, params: Any = None, num_directions: int = 3,
              dtype: torch.dtype | None = torch.float64, eps: float | None = None, tol: float | None = None,
              seed: int = 0, raise_on_failure: bool = False, **operator_options: Any) -> HVPCheck:
    """Verify the HVP of ``model`` on random directions: Hv against central differences of gradients,

        (∇L(θ + εv) − ∇L(θ − εv)) / 2ε,

    and symmetry, |uᵀHv − vᵀHu| / (‖u‖‖Hv‖ + ‖v‖‖Hu‖). Runs in float64 by default (pass ``dtype=None`` to
    check in the model's own dtype, with a looser default tolerance). Non-smooth models (ReLU) can show
    finite-difference errors where a kink is crossed; the symmetry check is unaffected by that.
    """
    op_kw, rest = split_operator_options(dict(operator_options))
    if rest:
        raise TypeError(f"check_hvp() got unexpected keyword arguments: {sorted(rest)}")
    num_directions = check_positive_int(num_directions, "num_directions")
    if num_directions < 2:
        raise ValueError(f"num_directions must be >= 2 (the symmetry check pairs them), got {num_directions}")
    tol = None if tol is None else check_tol(tol)
    eps = None if eps is None else check_positive_float(eps, "eps")
    seed = check_seed(seed)
    with warnings.catch_warnings():  # the low-precision-loss warning is folded into the verdict below
        warnings.filterwarnings("ignore", category=CurvatureWarning, message="the loss is computed in")
        op = HessianOperator(model, loss_fn, data, params, dtype=dtype, **op_kw)
    work = op.dtype
    # The gradients the finite differences are taken of are only as precise as the loss: a float32 loss under a
    # float64 operator (HF's logits.float()) needs the float32 step and tolerance.
    loss_dtype = getattr(op.engine, "loss_dtype", work)
    precision = loss_dtype if (loss_dtype.is_floating_point
                               and torch.finfo(loss_dtype).eps > torch.finfo(work).eps) else work
    unit = torch.finfo(precision).eps
    tol = tol if tol is not None else (1e-5 if precision == torch.float64 else math.sqrt(unit) * 50)
    gen = torch.Generator().manual_seed(seed)
    theta = op.parameter_vector()
    scale = max(1.0, float(theta.norm()) / math.sqrt(theta.numel()))
    step = eps if eps is not None else unit ** (1 / 3) * scale
    V = torch.randn(op.shape[0], num_directions, generator=gen, dtype=torch.float64).to(op.device, work)
    V = V / V.norm(dim=0, keepdim=True)
    HV = op.matmat(V)
    fd_errors, sym_errors = [], []
    for i in range(num_directions):
        v = V[:, i]
        _, g_plus = op.loss_and_gradient_at(theta + step * v)
        _, g_minus = op.loss_and_gradient_at(theta - step * v)
        fd = (g_plus - g_minus) / (2 * step)
        fd_errors.append(float((HV[:, i] - fd).norm() / fd.norm().clamp_min(torch.finfo(work).tiny)))
        j = (i + 1) % num_directions
        u, Hu = V[:, j], HV[:, j]
        denom = float(u.norm() * HV[:, i].norm() + v.norm() * Hu.norm())
        sym_errors.append(abs(float(u @ HV[:, i] - v @ Hu)) / max(denom, torch.finfo(work).tiny))
    result = HVPCheck(fd_errors, sym_errors, tol, step, work, {"num_params": op.shape[0], "method": op.method,
                                                               "loss_dtype": loss_dtype,
                                                               "low_precision_modules": dict(getattr(
                                                                   op, "low_precision_modules", {}))})
    if raise_on_failure and not result.passed:
        raise AssertionError(str(result))
    return result


# ---------------------------------------------------------------------------------------------------
# Comparing the routes on the user's own model
# ---------------------------------------------------------------------------------------------------
@dataclass
class RouteComparison:
    """Outcome of :func:`compare_hvp_routes`: per-direction ‖H_fd v − H v‖/‖H v‖, seconds per HVP of each
    route, and (optionally) both routes' λ_max."""

    hvp_errors: list[float]
    seconds_exact: float
    seconds_fd: float
    epsilon: float
    order: int
    dtype: torch.dtype
    exact_method: str
    lambda_max_exact: float | None = None
    lambda_max_fd: float | None = None
    details: dict = field(default_factory=dict)

    @property
    def max_hvp_error(self) -> float:
        return max(self.hvp_errors)

    @property
    def lambda_max_error(self) -> float | None:
        if self.lambda_max_exact is None or self.lambda_max_fd is None:
            return None
        return abs(self.lambda_max_fd - self.lambda_max_exact) / max(abs(self.lambda_max_exact), 1e-300)

    def __str__(self) -> str:
        lam = "" if self.lambda_max_error is None else f", λ_max rel. error {self.lambda_max_error:.1e}"
        return (f"finite differences (order {self.order}, h={self.epsilon:.2e}, {self.dtype}) vs "
                f"{self.exact_method}: HVP rel. error max {self.max_hvp_error:.1e}{lam}; "
                f"{self.seconds_fd * 1e3:.1f} ms vs {self.seconds_exact * 1e3:.1f} ms per HVP")


def compare_hvp_routes(model: torch.nn.Module, loss_fn: Any, data: Any, *, params: Any = None, num_directions: int = 3,
                       exact_method: str = "auto", fd_order: int = 2, fd_epsilon: float | None = None,
                       dtype: torch.dtype | None = None, lambda_max: bool = False, tol: float = 1e-6,
                       seed: int = 0, **operator_options: Any) -> RouteComparison:
    """How far the finite-difference route is from the exact one on *this* model and data.

    Builds both operators (same data, same frozen randomness, same ``params``/``dtype``), applies them to
    ``num_directions`` seeded random unit directions and reports ‖H_fd v − H v‖/‖H v‖ per direction and the
    seconds per HVP of each route (one warm-up block each first); with ``lambda_max=True`` also both routes'
    largest eigenvalue (Lanczos to ``tol``). Use it before trusting FD curvature on a model that the exact
    route can still handle (a small replica, a single process, fewer layers).
    """
    if not isinstance(num_directions, int) or num_directions < 1:
        raise ValueError(f"num_directions must be a positive int, got {num_directions!r}")
    opt_seed = operator_options.pop("seed", None)
    common = dict(params=params, dtype=dtype, seed=opt_seed if opt_seed is not None else 1234, **operator_options)
    exact = HessianOperator(model, loss_fn, data, method=exact_method, **common)
    fd = HessianOperator(model, loss_fn, data, method="finite_difference", fd_order=fd_order, fd_epsilon=fd_epsilon,
                         **common)
    gen = torch.Generator().manual_seed(seed)
    V = torch.randn(exact.shape[0], num_directions, generator=gen, dtype=torch.float64)
    V = (V / V.norm(dim=0, keepdim=True)).to(exact.device, exact.dtype)

    def timed(op: Any) -> tuple[torch.Tensor, float]:
        op.matmat(V[:, :1])  # warm-up (caches, first-call costs)
        t0 = time.perf_counter()
        out = op.matmat(V)
        return out, (time.perf_counter() - t0) / num_directions

    HV, t_exact = timed(exact)
    FV, t_fd = timed(fd)
    errors = [float((FV[:, i] - HV[:, i]).double().norm() / HV[:, i].double().norm().clamp_min(1e-300))
              for i in range(num_directions)]
    result = RouteComparison(errors, t_exact, t_fd, fd.engine.epsilon, fd_order, fd.dtype, exact.method,
                             details={"num_params": exact.shape[0], "theta_norm": fd.engine.theta_norm})
    if lambda_max:
        result.lambda_max_exact = float(lanczos(exact, 1, tol=tol).eigenvalues[0])
        result.lambda_max_fd = float(lanczos(fd, 1, tol=tol).eigenvalues[0])
    return result
