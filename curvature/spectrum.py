"""The Hessian spectrum beyond its top: trace (Hutchinson, Hutch++), spectral density (stochastic Lanczos
quadrature), per-layer curvature and the most negative eigenvalues.

Every estimator here only uses the operator protocol (``shape``, ``dtype``, ``device``, ``matmat``), so it
works for :class:`~curvature.operators.HessianOperator`, the pre-conditioned operator, a
:class:`~curvature.operators.MatrixOperator` or a plain square tensor.

Random probes are drawn on the CPU from a ``torch.Generator`` seeded with ``seed`` (in float64, then cast),
so the same seed gives the same probes on every device and on every rank of a distributed run: with a
:class:`~curvature.operators.HessianOperator` that all-reduces its products, every rank computes the same
numbers and takes the same stopping decisions (lock-step; pass the same ``seed`` on every rank).

Estimators and their variance (``A`` symmetric ``n × n``, probes ``z``):

* Hutchinson (1989): ``tr A = E[zᵀ A z]`` for ``E[z zᵀ] = I``. One sample has variance
  ``2 (‖A‖_F² − Σ_i A_ii²)`` for Rademacher ``z`` (±1) and ``2 ‖A‖_F²`` for Gaussian ``z``; the mean of ``m``
  samples has standard error ``σ/√m``.
* Hutch++ (Meyer, Musco, Musco & Woodruff, SOSA 2021): with ``m`` products, ``Q = orth(A S)`` for ``m/3``
  random ``S``, ``tr A = tr(Qᵀ A Q) + tr((I − QQᵀ) A (I − QQᵀ))``; the first term is exact, the second is
  estimated by Hutchinson on the deflated operator with the remaining ``m/3`` probes. Its variance is that
  of Hutchinson on the deflated operator (``≤ 2‖A − A_k‖``-like), so it wins when the spectrum decays fast.
* Stochastic Lanczos quadrature (Golub & Meurant 1994/2010; Ubaru, Chen & Saad 2017; as used for neural
  network Hessians by Ghorbani, Krishnan & Xiao 2019): ``m`` Lanczos steps from a unit probe ``v`` give the
  Gauss quadrature ``vᵀ f(A) v ≈ Σ_j τ_j² f(θ_j)`` (θ = Ritz values, τ = first components of the
  eigenvectors of the tridiagonal ``T``), exact for polynomials of degree ``≤ 2m − 1``. With
  ``v = z/√n`` (Rademacher ``z``), ``E[vᵀ f(A) v] = tr f(A) / n``, so averaging over probes estimates the
  spectral density ``φ(t) = (1/n) Σ_i δ(t − λ_i)``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from . import _validate as _v
from .operators import HessianOperator, ShiftedOperator
from .solvers import lanczos_tridiagonal
from .solvers._common import as_operator

__all__ = [
    "TraceEstimate", "hutchinson_trace", "hutchpp_trace", "exact_trace",
    "SpectralDensity", "spectral_density",
    "LayerCurvature", "layer_curvature",
    "hessian_trace", "hessian_spectral_density",
]

DISTRIBUTIONS = ("rademacher", "gaussian")


# ---------------------------------------------------------------------------------------------------
# Probes
# ---------------------------------------------------------------------------------------------------
def _generator(seed: int) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed))
    return g


def _probes(n: int, k: int, gen: torch.Generator, distribution: str, op: Any) -> torch.Tensor:
    """``(n, k)`` probes with ``E[z zᵀ] = I``, drawn on the CPU in float64, then moved to the operator."""
    if distribution == "rademacher":
        Z = torch.randint(0, 2, (n, k), generator=gen, dtype=torch.int8).to(torch.float64).mul_(2).sub_(1)
    elif distribution == "gaussian":
        Z = torch.randn(n, k, generator=gen, dtype=torch.float64)
    else:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    return Z.to(device=op.device, dtype=op.dtype)


def _check_distribution(distribution: str) -> str:
    d = str(distribution).lower()
    if d == "normal":
        d = "gaussian"
    if d not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    return d


# ---------------------------------------------------------------------------------------------------
# Trace
# ---------------------------------------------------------------------------------------------------
@dataclass
class TraceEstimate:
    """A trace estimate.

    Attributes:
        estimate: the estimate of ``tr A``.
        stderr: its standard error, estimated from the samples (``0.0`` for an exact trace; ``nan`` with
            fewer than two samples).
        num_hvps: operator applications used (a block of 8 counts 8).
        samples: ``(m,)`` float64 CPU tensor of the per-probe values ``zᵀ A z`` (Hutchinson), of the deflated
            part (Hutch++; the estimate adds ``info["low_rank_trace"]`` to their mean) or of the diagonal
            (exact).
        converged: ``stderr <= tol · |estimate|`` was reached (always ``True`` for a fixed sample count and
            for exact traces).
        method: ``"hutchinson"``, ``"hutchpp"`` or ``"exact"``.
        info: extras (``tol``, ``distribution``, ``low_rank_trace``, ...).
    """

    estimate: float
    stderr: float
    num_hvps: int
    samples: torch.Tensor
    converged: bool
    method: str
    info: dict = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return int(self.samples.numel())

    def __float__(self) -> float:
        return float(self.estimate)

    def __repr__(self) -> str:
        return (f"TraceEstimate({self.method}: {self.estimate:.6g} ± {self.stderr:.2g}, "
                f"num_hvps={self.num_hvps}, converged={self.converged})")


def _stderr(samples: torch.Tensor) -> float:
    m = samples.numel()
    if m < 2:
        return float("nan")
    return float(samples.std(unbiased=True)) / math.sqrt(m)


def hutchinson_trace(op: Any, *, num_samples: int | None = None, tol: float = 1e-2, max_samples: int = 1000,
                     block: int = 8, seed: int = 0, distribution: str = "rademacher",
                     min_samples: int = 16) -> TraceEstimate:
    """Hutchinson's estimate of ``tr A``: the mean of ``zᵀ A z`` over random probes ``z``.

    Args:
        op: a linear operator (``shape``, ``dtype``, ``device``, ``matmat``) or a square tensor.
        num_samples: a fixed number of probes; ``None`` = adaptive: add blocks of probes until the standard
            error is small *relative to the magnitude* of the estimate, ``stderr <= tol · |mean|``, or
            ``max_samples`` probes were used (then ``converged=False``).
        tol: relative standard error to reach (adaptive mode).
        max_samples: cap on the number of probes (adaptive mode).
        block: probes applied per ``matmat`` call (batched HVPs).
        seed: seed of the probes (same seed = same probes on every device and rank).
        distribution: ``"rademacher"`` (±1, the lower-variance choice: variance ``2(‖A‖_F² − Σ A_ii²)`` per
            sample) or ``"gaussian"`` (``2‖A‖_F²``).
        min_samples: the adaptive rule is not tested before this many probes (a standard error from two or
            three samples is itself too noisy to stop on).

    Returns:
        :class:`TraceEstimate` with ``estimate``, ``stderr``, ``num_hvps``, ``samples``, ``converged``.
    """
    _v.check_optional_positive_int(num_samples, "num_samples")
    _v.check_tol(tol)
    _v.check_positive_int(max_samples, "max_samples")
    _v.check_positive_int(block, "block")
    _v.check_seed(seed)
    _v.check_positive_int(min_samples, "min_samples")
    op = as_operator(op)
    distribution = _check_distribution(distribution)
    n = op.shape[0]
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    if num_samples is not None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        target = int(num_samples)
    else:
        if not tol > 0:
            raise ValueError(f"tol must be > 0, got {tol}")
        if max_samples < 2:
            raise ValueError(f"max_samples must be >= 2, got {max_samples}")
        target = int(max_samples)
    gen = _generator(seed)
    values: list[torch.Tensor] = []
    count = 0
    converged = num_samples is not None
    while count < target:
        k = min(block, target - count)
        Z = _probes(n, k, gen, distribution, op)
        AZ = op.matmat(Z)
        values.append((Z * AZ).sum(dim=0).detach().to("cpu", torch.float64))
        count += k
        if num_samples is None and count >= max(2, min_samples):
            s = torch.cat(values)
            mean, se = float(s.mean()), _stderr(s)
            if se <= tol * abs(mean):
                converged = True
                break
    samples = torch.cat(values)
    return TraceEstimate(estimate=float(samples.mean()), stderr=_stderr(samples), num_hvps=count, samples=samples,
                         converged=converged, method="hutchinson",
                         info={"tol": None if num_samples is not None else tol, "distribution": distribution,
                               "seed": seed, "block": block})


def hutchpp_trace(op: Any, num_hvps: int, seed: int = 0, *, distribution: str = "rademacher") -> TraceEstimate:
    """Hutch++ (Meyer et al. 2021): ``tr A`` from exactly ``num_hvps`` operator applications.

    A third of the budget sketches the range, ``Q = orth(A S)``; ``tr(Qᵀ A Q)`` (another third) is exact; the
    last third runs Hutchinson on the deflated ``(I − QQᵀ) A (I − QQᵀ)``. Unbiased; its error falls like
    ``1/m`` (instead of ``1/√m``) when the spectrum decays, and it is exact for ``rank(A) <= num_hvps // 3``.
    ``stderr`` is the standard error of the deflated Hutchinson part (the only random part given ``Q``).
    """
    _v.check_positive_int(num_hvps, "num_hvps")
    _v.check_seed(seed)
    op = as_operator(op)
    distribution = _check_distribution(distribution)
    n = op.shape[0]
    if num_hvps < 3:
        raise ValueError(f"hutchpp_trace needs num_hvps >= 3 (a third each for sketch, projection and "
                         f"residual), got {num_hvps}")
    k = min(num_hvps // 3, n)
    g = num_hvps - 2 * k
    gen = _generator(seed)
    S = _probes(n, k, gen, distribution, op)
    Y = op.matmat(S)
    Q, _ = torch.linalg.qr(Y.to(torch.float64))
    Q = Q.to(op.dtype)
    AQ = op.matmat(Q)
    low_rank = float(torch.sum(Q.to(torch.float64) * AQ.to(torch.float64)))
    G = _probes(n, g, gen, distribution, op)
    G = G - Q @ (Q.T @ G)
    AG = op.matmat(G)
    AG = AG - Q @ (Q.T @ AG)
    samples = (G * AG).sum(dim=0).detach().to("cpu", torch.float64)
    rest = float(samples.mean())
    return TraceEstimate(estimate=low_rank + rest, stderr=_stderr(samples), num_hvps=2 * k + g, samples=samples,
                         converged=True, method="hutchpp",
                         info={"low_rank_trace": low_rank, "sketch_size": k, "num_residual_probes": g,
                               "distribution": distribution, "seed": seed})


def exact_trace(op: Any, *, block: int = 64) -> TraceEstimate:
    """``tr A = Σ_i e_iᵀ A e_i`` with ``n`` applications in blocks (small operators, references)."""
    _v.check_positive_int(block, "block")
    op = as_operator(op)
    n = op.shape[0]
    diag = []
    for lo in range(0, n, block):
        hi = min(lo + block, n)
        E = torch.zeros(n, hi - lo, dtype=op.dtype, device=op.device)
        E[torch.arange(lo, hi), torch.arange(hi - lo)] = 1
        diag.append(op.matmat(E)[lo:hi].diagonal().detach().to("cpu", torch.float64))
    d = torch.cat(diag)
    return TraceEstimate(estimate=float(d.sum()), stderr=0.0, num_hvps=n, samples=d, converged=True,
                         method="exact")


# ---------------------------------------------------------------------------------------------------
# Spectral density
# ---------------------------------------------------------------------------------------------------
@dataclass
class SpectralDensity:
    """Stochastic Lanczos quadrature of an operator's spectrum.

    Attributes:
        nodes: per probe, the Ritz values ``θ_j`` (1-D float64 CPU tensors; shorter than ``num_steps`` when
            Lanczos found an invariant subspace, in which case they are exact eigenvalues).
        weights: per probe, the Gauss weights ``τ_j²`` (sum to 1 per probe).
        n: the operator's dimension (``n · Σ_j τ_j² θ_j`` estimates the trace).
        num_hvps: operator applications used.
        info: ``num_steps``, ``seed``, ``distribution``.

    The smoothed density ``ρ_σ(t) = (1/L) Σ_l Σ_j τ_lj² N(t; θ_lj, σ²)`` integrates to 1; multiply by ``n``
    for an eigenvalue count density.
    """

    nodes: list[torch.Tensor]
    weights: list[torch.Tensor]
    n: int
    num_hvps: int
    info: dict = field(default_factory=dict)

    @property
    def num_probes(self) -> int:
        return len(self.nodes)

    def _all(self) -> tuple[torch.Tensor, torch.Tensor]:
        L = self.num_probes
        return torch.cat(self.nodes), torch.cat(self.weights) / L

    def moment(self, p: int) -> float:
        """Estimate of ``tr(A^p) / n`` (exact per probe for ``p <= 2·steps − 1``)."""
        x, w = self._all()
        return float((w * x.pow(p)).sum())

    @property
    def trace(self) -> float:
        """SLQ estimate of ``tr A`` (the same estimator as Hutchinson with the probes used)."""
        return self.n * self.moment(1)

    @property
    def support(self) -> tuple[float, float]:
        """Smallest and largest Ritz values (inner estimates of ``λ_min``, ``λ_max``)."""
        x, _ = self._all()
        return float(x.min()), float(x.max())

    def default_sigma(self) -> float:
        lo, hi = self.support
        width = hi - lo
        return 0.01 * width if width > 0 else 0.01 * max(abs(hi), 1.0)

    def grid(self, num_points: int = 512, *, sigma: float | None = None, margin: float = 5.0) -> torch.Tensor:
        """An evenly spaced grid over the support, widened by ``margin · σ`` on each side."""
        sigma = self.default_sigma() if sigma is None else float(sigma)
        lo, hi = self.support
        return torch.linspace(lo - margin * sigma, hi + margin * sigma, int(num_points), dtype=torch.float64)

    def density(self, grid: torch.Tensor | Sequence[float] | None = None, *, sigma: float | None = None,
                num_points: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
        """``(grid, values)``: the Gaussian-smoothed density ``ρ_σ`` on ``grid`` (default: :meth:`grid`).

        ``sigma`` defaults to 1 % of the spread of the Ritz values.
        """
        sigma = self.default_sigma() if sigma is None else float(sigma)
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        t = self.grid(num_points, sigma=sigma) if grid is None else torch.as_tensor(grid, dtype=torch.float64)
        x, w = self._all()
        z = (t[:, None] - x[None, :]) / sigma
        vals = (torch.exp(-0.5 * z * z) * w[None, :]).sum(dim=1) / (sigma * math.sqrt(2 * math.pi))
        return t, vals

    __call__ = density

    def plot(self, ax: Any = None, path: str | None = None, *, sigma: float | None = None, num_points: int = 512,
             log: bool = True, **line_kwargs: Any) -> Any:
        """Plot the smoothed density (matplotlib imported here, lazily); saves to ``path`` if given.
        Returns the axes."""
        import matplotlib

        if ax is None and path is not None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        t, vals = self.density(sigma=sigma, num_points=num_points)
        if ax is None:
            _, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot(t.numpy(), vals.numpy(), **line_kwargs)
        if log:
            ax.set_yscale("log")
            ax.set_ylim(bottom=max(float(vals.max()) * 1e-8, 1e-300))
        ax.set_xlabel("eigenvalue of $H$")
        used = self.default_sigma() if sigma is None else sigma
        ax.set_ylabel(f"density (Gaussian σ = {used:.2g})")
        ax.set_title(f"spectral density (SLQ: {self.num_probes} probes × {self.info.get('num_steps')} steps)",
                     fontsize=9)
        ax.grid(True, alpha=0.3)
        if path is not None:
            ax.figure.tight_layout()
            ax.figure.savefig(path, dpi=120)
        return ax

    def __repr__(self) -> str:
        lo, hi = self.support
        return (f"SpectralDensity(n={self.n}, probes={self.num_probes}, steps={self.info.get('num_steps')}, "
                f"support=[{lo:.4g}, {hi:.4g}], num_hvps={self.num_hvps})")


def spectral_density(op: Any, *, num_probes: int = 8, num_steps: int = 40, seed: int = 0,
                     distribution: str = "rademacher", reorthogonalize: bool = True) -> SpectralDensity:
    """Spectral density of a symmetric operator by stochastic Lanczos quadrature.

    ``num_probes`` unit probes ``v = z/‖z‖``, ``num_steps`` Lanczos steps each (via
    :func:`~curvature.solvers.lanczos_tridiagonal`, with full reorthogonalisation by default, which keeps
    spurious copies of outlying eigenvalues away); the Ritz values and squared first components of the
    tridiagonal eigenvectors are the nodes and weights. Costs ``num_probes · num_steps`` applications and
    keeps ``n × num_steps`` Lanczos vectors in memory at a time.
    """
    _v.check_positive_int(num_probes, "num_probes")
    _v.check_positive_int(num_steps, "num_steps")
    _v.check_seed(seed)
    op = as_operator(op)
    distribution = _check_distribution(distribution)
    if num_probes < 1:
        raise ValueError(f"num_probes must be >= 1, got {num_probes}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    n = op.shape[0]
    gen = _generator(seed)
    nodes, weights = [], []
    hvps = 0
    for _ in range(num_probes):
        z = _probes(n, 1, gen, distribution, op)[:, 0]
        alphas, betas, Q = lanczos_tridiagonal(op, z, num_steps, reorthogonalize=reorthogonalize)
        m = alphas.numel()
        hvps += m
        T = torch.diag(alphas.to("cpu", torch.float64))
        if m > 1:
            b = betas.to("cpu", torch.float64)[: m - 1]
            T = T + torch.diag(b, 1) + torch.diag(b, -1)
        theta, U = torch.linalg.eigh(T)
        nodes.append(theta)
        weights.append(U[0, :] ** 2)
        del Q
    return SpectralDensity(nodes=nodes, weights=weights, n=n, num_hvps=hvps,
                           info={"num_steps": num_steps, "seed": seed, "distribution": distribution,
                                 "reorthogonalize": reorthogonalize})


# ---------------------------------------------------------------------------------------------------
# Per-layer curvature (block-diagonal Hessian)
# ---------------------------------------------------------------------------------------------------
class LayerCurvature(list):
    """One row (a dict) per layer: ``name``, ``params`` (parameter names), ``numel``, ``lambda_max``,
    ``eigenvalues`` (top ``k``), ``lambda_min`` (``None`` unless asked), ``trace``, ``trace_stderr``,
    ``num_hvps``, ``converged``. A plain list of dicts (``pandas.DataFrame(table)`` works)."""

    COLUMNS = ("name", "numel", "lambda_max", "lambda_min", "trace", "trace_stderr", "num_hvps", "converged")

    def to_csv(self, path: str) -> None:
        import csv

        with open(path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(self.COLUMNS) + ["params", "eigenvalues"])
            w.writeheader()
            for row in self:
                out = {c: row.get(c) for c in self.COLUMNS}
                out["params"] = " ".join(row["params"])
                out["eigenvalues"] = " ".join(f"{v:.17g}" for v in row["eigenvalues"])
                w.writerow(out)

    def __str__(self) -> str:
        def fmt(v: Any) -> str:
            if v is None:
                return "-"
            if isinstance(v, float):
                return f"{v:.4g}"
            return str(v)

        cols = self.COLUMNS
        rows = [[fmt(r.get(c)) for c in cols] for r in self]
        widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
        lines = ["  ".join(c.ljust(wd) for c, wd in zip(cols, widths))]
        lines += ["  ".join(v.ljust(wd) for v, wd in zip(r, widths)) for r in rows]
        return "\n".join(lines)


def _layer_groups(model: torch.nn.Module, group: str, params: Any = None) -> list[tuple[str, list[str]]]:
    from ._exact import unwrap_model
    from .hvp import select_parameters

    names = [n for n, _ in select_parameters(unwrap_model(model), params)]
    if group == "parameter":
        return [(n, [n]) for n in names]
    if group != "module":
        raise ValueError(f"group must be 'module' or 'parameter', got {group!r}")
    groups: dict[str, list[str]] = {}
    for n in names:
        key = n.rsplit(".", 1)[0] if "." in n else n
        groups.setdefault(key, []).append(n)
    return list(groups.items())


def layer_curvature(model: torch.nn.Module, loss_fn: Any, data: Any, *, k: int = 1, trace: bool = True,
                    lambda_min: bool = False, group: str = "module", params: Any = None, solver: str = "lobpcg",
                    tol: float = 1e-6, max_iters: int | None = None, solver_seed: int = 0,
                    trace_method: str = "auto", trace_tol: float = 1e-2, trace_max_samples: int = 1000,
                    trace_seed: int = 0, dense_below: int = 64, **operator_options: Any) -> LayerCurvature:
    """Curvature of each layer's diagonal block of the Hessian: one row per layer.

    Row ``i`` is about ``H_ii = ∇²_{θ_i} L`` (the other parameters held fixed), built as a
    :class:`HessianOperator` with ``params=`` that layer's parameters.

    Args:
        group: ``"module"`` (the parameters of one module together: ``fc.weight`` + ``fc.bias``) or
            ``"parameter"`` (one row per parameter tensor). Tied parameters appear once.
        params: restrict to these parameters / module prefixes (as in :class:`HessianOperator`).
        k: top eigenvalues per layer (``lambda_max`` is the first).
        lambda_min: also compute the most negative eigenvalue of each block.
        trace: also compute ``tr H_ii``: exact for blocks formed densely (see ``dense_below``); else
            ``trace_method="auto"`` (default): exact (``numel`` applications) for blocks of at most
            ``trace_max_samples`` parameters, where that is no dearer than Hutchinson's cap, and Hutchinson to a
            relative standard error ``trace_tol`` (at most ``trace_max_samples`` probes, ``trace_seed``) above;
            ``"hutchinson"``: always Hutchinson; ``"exact"``: always exact.
        dense_below: blocks with at most this many parameters are formed densely (``numel`` HVPs, exact
            ``eigvalsh``) instead of running the iterative solver.
        solver, tol, max_iters, solver_seed: as in :func:`~curvature.diagnostics.sharpness`.
        **operator_options: :class:`HessianOperator` options (``dtype``, ``max_batch_size``,
            ``distributed``, ...).
    """
    _v.check_positive_int(k, "k")
    _v.check_tol(tol)
    _v.check_optional_positive_int(max_iters, "max_iters")
    _v.check_seed(solver_seed, "solver_seed")
    _v.check_tol(trace_tol, "trace_tol")
    _v.check_positive_int(trace_max_samples, "trace_max_samples")
    _v.check_seed(trace_seed, "trace_seed")
    _v.check_nonneg_int(dense_below, "dense_below")
    from .diagnostics import solve, split_operator_options

    op_kw, rest = split_operator_options(dict(operator_options))
    if rest:
        raise TypeError(f"layer_curvature() got unexpected keyword arguments: {sorted(rest)}")
    if trace_method not in ("auto", "exact", "hutchinson"):
        raise ValueError(f"trace_method must be 'auto', 'exact' or 'hutchinson', got {trace_method!r}")
    table = LayerCurvature()
    for name, names in _layer_groups(model, group, params):
        op = HessianOperator(model, loss_fn, data, names, **op_kw)
        numel = op.shape[0]
        kk = min(k, numel)
        row: dict[str, Any] = {"name": name, "params": tuple(names), "numel": numel}
        if numel <= dense_below:
            A = op.to_dense()
            A = 0.5 * (A + A.T)
            evals = torch.linalg.eigvalsh(A.to(torch.float64)).cpu()
            row["eigenvalues"] = [float(v) for v in evals.flip(0)[:kk]]
            row["lambda_min"] = float(evals[0]) if lambda_min else None
            converged = True
            if trace:
                row["trace"], row["trace_stderr"] = float(torch.diagonal(A).double().sum()), 0.0
        else:
            res = solve(op, kk, solver, tol, max_iters, None, True, solver_seed)
            row["eigenvalues"] = [float(v) for v in res.eigenvalues]
            converged = bool(res.converged)
            row["lambda_min"] = None
            if lambda_min:
                # on H − λ_max·I (eigenvalues ≤ 0): the relative tolerance is then relative to the spread of the
                # spectrum, which a λ_min near 0 (rank-deficient blocks) cannot defeat
                top = row["eigenvalues"][0]
                low = solve(ShiftedOperator(op, top), 1, "lobpcg" if solver == "power_iteration" else solver, tol,
                            max_iters, None, False, solver_seed)
                row["lambda_min"] = float(low.eigenvalues[0]) + top
                converged = converged and bool(low.converged)
            if trace:
                # "auto": the exact trace when it costs no more HVPs than Hutchinson's cap (numel applications,
                # no variance), Hutchinson to trace_tol on larger blocks
                if trace_method == "exact" or (trace_method == "auto" and numel <= trace_max_samples):
                    est = exact_trace(op)
                else:
                    est = hutchinson_trace(op, tol=trace_tol, max_samples=trace_max_samples, seed=trace_seed)
                    converged = converged and est.converged
                row["trace"], row["trace_stderr"] = est.estimate, est.stderr
        if not trace:
            row["trace"], row["trace_stderr"] = None, None
        row["lambda_max"] = row["eigenvalues"][0]
        row["num_hvps"] = op.num_hvps
        row["converged"] = converged
        table.append(row)
    return table


# ---------------------------------------------------------------------------------------------------
# Model-level conveniences
# ---------------------------------------------------------------------------------------------------
def hessian_trace(model: torch.nn.Module, loss_fn: Any, data: Any, *, method: str = "hutchinson",
                  num_samples: int | None = None, tol: float = 1e-2, max_samples: int = 1000, block: int = 8,
                  num_hvps: int | None = None, seed: int = 0, distribution: str = "rademacher",
                  params: Any = None, **operator_options: Any) -> TraceEstimate:
    """``tr ∇²L`` of a model's mean loss: ``method="hutchinson"`` (adaptive to ``tol`` unless
    ``num_samples``), ``"hutchpp"`` (``num_hvps`` applications, default 99) or ``"exact"`` (``n``
    applications). Extra options go to :class:`HessianOperator`; ``info["loss"]`` is the mean loss."""
    _v.check_optional_positive_int(num_samples, "num_samples")
    _v.check_tol(tol)
    _v.check_positive_int(max_samples, "max_samples")
    _v.check_positive_int(block, "block")
    _v.check_optional_positive_int(num_hvps, "num_hvps")
    _v.check_seed(seed)
    from .diagnostics import split_operator_options

    op_kw, rest = split_operator_options(dict(operator_options))
    if rest:
        raise TypeError(f"hessian_trace() got unexpected keyword arguments: {sorted(rest)}")
    op = HessianOperator(model, loss_fn, data, params, **op_kw)
    if method == "hutchinson":
        res = hutchinson_trace(op, num_samples=num_samples, tol=tol, max_samples=max_samples, block=block,
                               seed=seed, distribution=distribution)
    elif method == "hutchpp":
        res = hutchpp_trace(op, 99 if num_hvps is None else num_hvps, seed=seed, distribution=distribution)
    elif method == "exact":
        res = exact_trace(op)
    else:
        raise ValueError(f"method must be 'hutchinson', 'hutchpp' or 'exact', got {method!r}")
    res.info.update(loss=op.loss, num_params=op.shape[0])
    return res


def hessian_spectral_density(model: torch.nn.Module, loss_fn: Any, data: Any, *, num_probes: int = 8,
                             num_steps: int = 40, seed: int = 0, params: Any = None,
                             **operator_options: Any) -> SpectralDensity:
    """Spectral density of ``∇²L`` by stochastic Lanczos quadrature (see :func:`spectral_density`)."""
    _v.check_positive_int(num_probes, "num_probes")
    _v.check_positive_int(num_steps, "num_steps")
    _v.check_seed(seed)
    from .diagnostics import split_operator_options

    op_kw, rest = split_operator_options(dict(operator_options))
    if rest:
        raise TypeError(f"hessian_spectral_density() got unexpected keyword arguments: {sorted(rest)}")
    op = HessianOperator(model, loss_fn, data, params, **op_kw)
    res = spectral_density(op, num_probes=num_probes, num_steps=num_steps, seed=seed)
    res.info.update(loss=op.loss)
    return res

