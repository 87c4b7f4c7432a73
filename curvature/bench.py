"""Benchmark eigensolvers on your own model: :func:`benchmark_solvers` and the ``curvature bench`` command.

One process, one model, one batch: our solvers (Lanczos, LOBPCG, power iteration, each at the accuracy asked),
scipy's ``eigsh(which="LA")`` (ARPACK) on the same HVPs, and any installed peer library (PyHessian,
hessian-eigenthings, curvlinops — through the adapters in :mod:`curvature.peers`; a peer that is not installed gets
a "skipped" row naming the install command) run side by side. Each row has λ_max, its relative error against a tight
reference (Lanczos to a residual of 1e-10 in float64), the HVPs and the wall time. Medians over ``seeds``
start vectors (single-start counts vary ±40 % with the start vector).

    rows = benchmark_solvers(model, loss_fn, (x, y), eig_tol=1e-3)
    print(format_table(rows))

``curvature bench --model pkg.mod:build --data pkg.mod:batch [--loss mse] [--eig-tol 1e-3] [--seeds 5]``
prints the same table.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch

from .diagnostics import solve
from .operators import HessianOperator
from ._cli_defaults import BENCH_SOLVERS
from ._validate import check_tol
from . import peers as peer_adapters

__all__ = ["benchmark_solvers", "format_table", "run"]

OUR_SOLVERS = BENCH_SOLVERS  # one source with the CLI's choices
PEERS = peer_adapters.PEERS


def _scipy_eigsh(op: HessianOperator, tol: float, seed: int) -> tuple[float, int]:
    import numpy as np
    from scipy.sparse.linalg import eigsh

    before = op.num_hvps
    v0 = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(seed), dtype=torch.float64).numpy()
    vals = eigsh(op.to_scipy(), k=1, which="LA", tol=tol, v0=v0.astype(np.dtype(str(op.dtype).split(".")[-1])))[0]
    return float(vals[0]), op.num_hvps - before


def _peer(name: str, model: torch.nn.Module, loss_fn: Any, data: Any, tol: float, seed: int) -> tuple[float, int]:
    r = peer_adapters.top_eigenvalue(name, model, loss_fn, data, tol=tol, seed=seed)
    return float(r.eigenvalue), int(r.num_hvps)


def benchmark_solvers(model: torch.nn.Module, loss_fn: Any, data: Any, *, eig_tol: float = 1e-3,
                      tol: float | None = None, solvers: Sequence[str] = OUR_SOLVERS, scipy: bool = True,
                      peers: Sequence[str] | bool = True, seeds: int = 5, reference_tol: float = 1e-10,
                      **operator_options: Any) -> list[dict]:
    """λ_max of ``model``'s loss Hessian by each solver, side by side, with its error against a tight reference.

    Args:
        model, loss_fn, data: as for :func:`~curvature.sharpness` (one batch or a list of batches).
        eig_tol: relative eigenvalue accuracy asked of our solvers (their ``eig_tol``); scipy and the peers get
            ``tol = eig_tol`` in their own meaning (ARPACK: relative accuracy of the Ritz value; PyHessian /
            hessian-eigenthings: relative change between iterations).
        tol: also require this residual tolerance of our solvers (``None``: accuracy-controlled stop only).
        solvers: which of ours (``"lanczos"``, ``"lobpcg"``, ``"power_iteration"``).
        scipy: run ``scipy.sparse.linalg.eigsh(which="LA")`` on the same HVPs.
        peers: ``True`` = every installed peer, a list = those, ``False`` = none. Missing ones get a "skipped" row.
        seeds: start vectors per solver (medians are reported).
        reference_tol: residual tolerance of the float64 Lanczos reference.
        **operator_options: passed to :class:`~curvature.operators.HessianOperator` (``dtype``, ``method``, ...).

    Returns:
        One dict per solver: ``solver``, ``eigenvalue`` (median), ``rel_error`` (median and ``max_rel_error``,
        against the reference), ``hvps`` (median), ``seconds`` (median wall time of a solve, operator built
        once), ``error_bound`` (median, ours), ``note``. The first row is the reference itself.
    """
    eig_tol = check_tol(eig_tol, "eig_tol")
    if not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 1:
        raise ValueError(f"seeds must be an int >= 1, got {seeds!r}")
    unknown = sorted(set(solvers) - set(OUR_SOLVERS))
    if unknown:
        raise ValueError(f"unknown solvers {unknown}: choose from {list(OUR_SOLVERS)}")
    ref_opts = dict(operator_options, dtype=torch.float64)
    t0 = time.perf_counter()
    ref_op = HessianOperator(model, loss_fn, data, **ref_opts)
    ref = solve(ref_op, 1, "lanczos", reference_tol, None, None, True, 0)
    lam_ref = ref.eigenvalue
    rows = [{"solver": "reference (lanczos, float64)", "eigenvalue": lam_ref, "rel_error": 0.0,
             "max_rel_error": 0.0, "hvps": ref.num_hvps, "seconds": time.perf_counter() - t0, "error_bound": None,
             "note": f"residual {float(ref.residuals.max()):.1e}, n = {ref_op.shape[0]}"}]
    op = HessianOperator(model, loss_fn, data, **operator_options)

    def row(name: str, results: list[tuple[float, int, float, float | None]], note: str = "") -> dict:
        lams = [r[0] for r in results]
        errs = [abs(lam - lam_ref) / abs(lam_ref) for lam in lams]
        bounds = [r[3] for r in results if r[3] is not None]
        return {"solver": name, "eigenvalue": statistics.median(lams), "rel_error": statistics.median(errs),
                "max_rel_error": max(errs), "hvps": statistics.median(r[1] for r in results),
                "seconds": statistics.median(r[2] for r in results),
                "error_bound": statistics.median(bounds) if bounds else None, "note": note}

    for name in solvers:
        results = []
        for seed in range(seeds):
            t = time.perf_counter()
            res = solve(op, 1, name, tol, None, None, True, seed, eig_tol)
            results.append((res.eigenvalue, res.num_hvps, time.perf_counter() - t, res.info.get("error_bound")))
        rows.append(row(name, results, f"eig_tol {eig_tol:g}" + (f", tol {tol:g}" if tol else "")))
    if scipy:
        results = []
        for seed in range(seeds):
            t = time.perf_counter()
            lam, hv = _scipy_eigsh(op, eig_tol, seed)
            results.append((lam, hv, time.perf_counter() - t, None))
        rows.append(row('scipy eigsh(which="LA")', results, f"tol {eig_tol:g} (ARPACK)"))
    wanted = list(PEERS) if peers is True else list(peers or [])
    for name in wanted:
        if importlib.util.find_spec(name) is None:
            rows.append({"solver": name, "eigenvalue": None, "rel_error": None, "max_rel_error": None, "hvps": None,
                         "seconds": None, "error_bound": None,
                         "note": f"skipped: not installed (pip install --no-deps {peer_adapters.distribution(name)})"})
            continue
        try:
            results = []
            for seed in range(seeds):
                t = time.perf_counter()
                lam, hv = _peer(name, model, loss_fn, data, eig_tol, seed)
                results.append((lam, hv, time.perf_counter() - t, None))
            rows.append(row(name, results, f"tol {eig_tol:g} (its own meaning)"))
        except Exception as exc:  # noqa: BLE001 - a peer failing is a result, not a crash
            rows.append({"solver": name, "eigenvalue": None, "rel_error": None, "max_rel_error": None,
                         "hvps": None, "seconds": None, "error_bound": None,
                         "note": f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"})
    return rows


def _cell(value: Any, spec: str) -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


def format_table(rows: Sequence[dict]) -> str:
    """The rows of :func:`benchmark_solvers` as a markdown table."""
    head = "| solver | λ_max | rel. error (median / max) | error bound | HVPs | seconds | note |"
    lines = [head, "|" + "---|" * 7]
    for r in rows:
        err = ("—" if r["rel_error"] is None else f"{_cell(r['rel_error'], '.1e')} / {_cell(r['max_rel_error'], '.1e')}")
        lines.append(f"| {r['solver']} | {_cell(r['eigenvalue'], '.8g')} | {err} | {_cell(r['error_bound'], '.1e')} | "
                     f"{_cell(r['hvps'], 'g')} | {_cell(r['seconds'], '.3f')} | {r['note']} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# The `curvature bench` command
# ---------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    """Run ``curvature bench`` (prints the table); exit status 0."""
    from .checkpoints import add_search_path, build_model, resolve_data, resolve_loss, resolve_model_factory

    check_tol(args.eig_tol, "--eig-tol")
    add_search_path(args.path)
    model = build_model(resolve_model_factory(args.model))
    data = resolve_data(args.data)
    loss = resolve_loss(args.loss)
    opts = {} if args.dtype is None else {"dtype": getattr(torch, args.dtype)}
    if args.device is not None:
        opts["device"] = args.device
    rows = benchmark_solvers(model, loss, data, eig_tol=args.eig_tol, solvers=args.solvers, scipy=not args.no_scipy,
                             peers=not args.no_peers, seeds=args.seeds, **opts)
    print(format_table(rows))
    return 0
