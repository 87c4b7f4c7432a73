"""Time and HVPs to reach λ_max, ours and the peers', on the same model and data.

    python -m benchmarks.eigensolvers [--quick] [--size small] [--device cpu|cuda] [--dtype float64]
                                      [--models ...] [--tols 1e-3 1e-6] [--threads 2] [--k-scaling] [--out FILE.md]

For each workload: a reference λ_max from scipy ``eigsh(which="LA", tol=1e-12)`` on plain torch double-backward
HVPs (no library involved), then for each solver and tolerance: the eigenvalue, its relative error vs the
reference, the *true* relative residual ``‖Hv − λv‖/|λ|`` of the returned vector (one extra reference HVP;
peers define ``tol`` differently: PyHessian bounds the relative change of λ between iterations), HVPs
(counted per vector), seconds (operator construction included), and whether the solver said it converged.

Solvers: ``curvature.sharpness(..., solver="lobpcg" | "lanczos" | "power_iteration", tol)``; PyHessian power
iteration (default ``tol=1e-3, maxIter=100``, and tighter); hessian-eigenthings ``power_iteration_one``;
curvlinops ``HessianLinearOperator`` + scipy ``eigsh(which="LA")``. Power iterations find the largest
*magnitude* eigenvalue: when the most negative eigenvalue dominates (common at initialisation) they return
it; such rows are flagged. ``--k-scaling`` adds time/HVPs for the top-k (k = 1 → 32).
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from typing import Any, Callable

import numpy as np
import torch

from . import models as M
from curvature import peers as P
from ._timing import (environment, fmt_s, header_markdown, import_curvature, markdown_table, pin_threads,
                      touch_memory, write_report)

COLUMNS = ["solver", "tol", "λ_max", "rel.err vs ref", "true residual", "HVPs", "seconds", "converged", "note"]


def reference(model, loss_fn, batch, tol: float = 1e-12, seed: int = 0):
    """λ_max by ARPACK (``eigsh``, which="LA") on plain torch double-backward HVPs; (λ, v, hvps, seconds)."""
    from scipy.sparse.linalg import LinearOperator, eigsh
    hvp = P.reference_hvp_fn(model, loss_fn, batch)
    p0 = M.trainable_params(model)[0]
    n = M.num_params(model)
    count = {"n": 0}

    def mv(x):
        count["n"] += 1
        xt = torch.as_tensor(np.asarray(x).reshape(-1), dtype=p0.dtype, device=p0.device)
        return hvp(xt).double().cpu().numpy()

    A = LinearOperator((n, n), matvec=mv, dtype=np.float64)
    v0 = np.random.default_rng(seed).standard_normal(n)
    t0 = time.perf_counter()
    vals, vecs = eigsh(A, k=1, which="LA", tol=tol, v0=v0)
    secs = time.perf_counter() - t0
    v = torch.as_tensor(vecs[:, 0], dtype=p0.dtype, device=p0.device)
    return float(vals[0]), v, count["n"], secs, hvp


def _ours(cv, model, loss_fn, batch, solver: str, tol: float, k: int = 1, max_iters: int | None = None):
    t0 = time.perf_counter()
    if hasattr(cv, "sharpness"):
        res = cv.sharpness(model, loss_fn, batch, k=k, solver=solver, tol=tol, max_iters=max_iters)
    else:  # the operator and solvers landed before `sharpness`
        import curvature.solvers as cvs
        op = cv.HessianOperator(model, loss_fn, batch)
        fn = getattr(cv, solver, None) or getattr(cvs, solver)
        res = fn(op, k=k, tol=tol, max_iters=max_iters)
    secs = time.perf_counter() - t0
    return res, secs


class Table:
    def __init__(self, ref_lam: float, ref_hvp: Callable[[torch.Tensor], torch.Tensor]):
        self.ref_lam, self.ref_hvp, self.rows = ref_lam, ref_hvp, []

    def add(self, solver: str, tol: float | str, lam: float, vec: torch.Tensor | None, hvps: int, secs: float,
            converged: Any, note: str = "") -> None:
        err = abs(lam - self.ref_lam) / abs(self.ref_lam)
        res = P.relative_residual(self.ref_hvp, lam, vec) if vec is not None else float("nan")
        err_s = f"{err:.1e}"
        notes = [note] if note else []
        if lam < 0 < self.ref_lam:
            err_s = f"**{err:.1e} WRONG**"
            notes.append("returned the most negative eigenvalue (largest magnitude), not λ_max")
        elif converged is False:
            notes.append("hit its iteration cap")
        elif isinstance(tol, float) and err > max(100 * tol, 1e-6):
            err_s = f"**{err:.1e} WRONG**"
            notes.append("says converged, but λ is off")
        elif isinstance(tol, float) and tol < 1e-9 + 1e-12:
            pass
        elif isinstance(tol, float) and err > 10 * tol:
            notes.append("λ error > 10×tol although it says converged")
        if isinstance(tol, float) and converged is not False and res == res and res > 100 * tol \
                and lam > 0 and "most negative" not in " ".join(notes):
            notes.append(f"true residual {res:.0e} ≫ tol")
        self.rows.append({"solver": solver, "tol": tol if isinstance(tol, str) else f"{tol:.0e}",
                          "λ_max": f"{lam:.8g}", "rel.err vs ref": err_s,
                          "true residual": f"{res:.1e}", "HVPs": hvps, "seconds": fmt_s(secs),
                          "converged": converged, "note": "; ".join(notes), "_secs": secs, "_hvps": hvps,
                          "_err": err})

    def fail(self, solver: str, tol, e: BaseException, note: str = "") -> None:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        self.rows.append({"solver": solver, "tol": tol if isinstance(tol, str) else f"{tol:.0e}",
                          "λ_max": "**fails**", "note": (note + "; " if note else "") +
                          f"`{type(e).__name__}: {msg[:150]}`"})


def warm_up(model, loss_fn, batch, peers: list[str]) -> None:
    """One HVP by every route before anything is timed: first calls pay one-off costs (torch.func
    dispatch set-up, vmap, allocator growth) that would otherwise land on whichever solver runs first."""
    v = torch.randn(M.num_params(model), dtype=M.trainable_params(model)[0].dtype,
                    device=M.trainable_params(model)[0].device)
    P.reference_hvp_fn(model, loss_fn, batch)(v)
    cv = import_curvature()
    if cv is not None:
        for method in ("reverse_over_reverse", "forward_over_reverse"):
            try:
                cv.HessianOperator(model, loss_fn, batch, method=method).matmat(torch.stack([v, v], 1))
            except Exception:  # noqa: BLE001
                pass
    for peer in peers:
        with P.math_sdpa(isinstance(model, M.GPT)):
            try:
                P.hvp_fn(peer, model, loss_fn, batch)(v)
            except Exception:  # noqa: BLE001 - missing or failing peers are reported by the real runs
                pass


def bench_workload(wl: M.Workload, tols: list[float], peers: list[str], power_max_iters: int,
                   seed: int = 0) -> tuple[str, list[dict]]:
    model, loss_fn, batch = wl.as_tuple()
    is_gpt = isinstance(model, M.GPT)
    warm_up(model, loss_fn, batch, peers)
    lam_ref, v_ref, hv_ref, s_ref, ref_hvp = reference(model, loss_fn, batch, seed=seed)
    t = Table(lam_ref, ref_hvp)
    t.add("scipy eigsh LA on torch double backward (reference)", 1e-12, lam_ref, v_ref, hv_ref, s_ref, True,
          "defines the reference λ_max")
    cv = import_curvature()
    for solver in ("lobpcg", "lanczos", "power_iteration"):
        for tol in tols:
            if cv is None:
                t.rows.append({"solver": f"ours {solver}", "tol": f"{tol:.0e}", "λ_max": "skipped",
                               "note": "curvature not importable yet"})
                continue
            try:
                mi = power_max_iters if solver == "power_iteration" else None
                res, secs = _ours(cv, model, loss_fn, batch, solver, tol, max_iters=mi)
                t.add(f"ours {solver}", tol, float(res.eigenvalues[0]), res.eigenvectors[:, 0], int(res.num_hvps),
                      secs, bool(res.converged))
            except Exception as e:  # noqa: BLE001
                t.fail(f"ours {solver}", tol, e)
    if cv is not None:
        try:
            res, secs = _ours(cv, model, loss_fn, batch, "lobpcg", 1e-9)
            t.add("ours lobpcg (tight)", 1e-9, float(res.eigenvalues[0]), res.eigenvectors[:, 0],
                  int(res.num_hvps), secs, bool(res.converged), "agreement with the reference")
        except Exception as e:  # noqa: BLE001
            t.fail("ours lobpcg (tight)", 1e-9, e)

    peer_runs: list[tuple[str, str, float, int | None, str]] = []
    for tol in tols:
        peer_runs.append(("pyhessian", "PyHessian power iteration", tol, None, "maxIter=100 (default)"))
    peer_runs.append(("pyhessian", "PyHessian power iteration", min(tols), power_max_iters,
                      f"maxIter={power_max_iters}"))
    for tol in tols:
        peer_runs.append(("hessian_eigenthings", "hessian-eigenthings power_iteration_one", tol, power_max_iters,
                          f"max_iter={power_max_iters}"))
    for tol in tols:
        peer_runs.append(("curvlinops", "curvlinops + eigsh(LA)", tol, None, ""))
    failed_default: set[str] = set()
    for peer, label, tol, mi, note in peer_runs:
        if peer not in peers:
            continue
        if not P.available(peer):
            t.rows.append({"solver": label, "tol": f"{tol:.0e}", "λ_max": "skipped", "note": "not installed"})
            continue
        # GPT: try PyTorch's default (fused) attention once per peer; after it fails, run the peer with
        # attention forced to the math kernel so that it still gets a number. Other models: as they are.
        if not is_gpt:
            attempts = [False]
        else:
            attempts = [True] if peer in failed_default else [False, True]
        for math in attempts:
            lab = label + (", math SDPA" if math else "")
            try:
                with P.math_sdpa(math):
                    r = P.top_eigenvalue(peer, model, loss_fn, batch, tol=tol, max_iters=mi, seed=seed)
                t.add(lab, tol, r.eigenvalue, r.eigenvector, r.num_hvps, r.seconds, r.converged,
                      "; ".join(x for x in (note, r.note) if x))
                break
            except Exception as e:  # noqa: BLE001
                t.fail(lab, tol, e, note)
                if not math:
                    failed_default.add(peer)
    title = (f"### {wl.name} ({wl.size}): {wl.num_params:,} parameters, batch {wl.batch_size}\n\n{wl.notes}\n\n"
             f"Reference λ_max = {lam_ref:.10g}\n\n")
    return title + markdown_table(t.rows, COLUMNS), t.rows


def k_scaling(wl: M.Workload, ks: list[int], tol: float, peers: list[str]) -> str:
    cv = import_curvature()
    model, loss_fn, batch = wl.as_tuple()
    rows = []
    for k in ks:
        row: dict[str, Any] = {"k": k}
        if cv is not None:
            for solver in ("lobpcg", "lanczos"):
                try:
                    res, secs = _ours(cv, model, loss_fn, batch, solver, tol, k=k)
                    row[f"ours {solver}"] = f"{fmt_s(secs)}, {res.num_hvps} HVPs" + ("" if res.converged else " (not conv.)")
                except Exception as e:  # noqa: BLE001
                    row[f"ours {solver}"] = f"fails: {type(e).__name__}"
        if "curvlinops" in peers and P.available("curvlinops") and not isinstance(model, M.GPT):
            try:
                from curvature.peers import curvlinops_top
                r = curvlinops_top(model, loss_fn, batch, tol, None, 0, k=k)
                row["curvlinops + eigsh(LA)"] = f"{fmt_s(r.seconds)}, {r.num_hvps} HVPs"
            except Exception as e:  # noqa: BLE001
                row["curvlinops + eigsh(LA)"] = f"fails: {type(e).__name__}"
        rows.append(row)
    return (f"### Scaling with k: top-k eigenpairs of {wl.name} ({wl.num_params:,} parameters), tol {tol:.0e}\n\n"
            + markdown_table(rows, ["k", "ours lobpcg", "ours lanczos", "curvlinops + eigsh(LA)"]))


def summary(all_rows: dict[str, list[dict]]) -> str:
    lines = []
    for name, rows in all_rows.items():
        for r in rows:
            if "_secs" not in r or "reference" in r["solver"]:
                continue
            lines.append({"workload": name, "solver": r["solver"], "tol": r["tol"], "HVPs": r["_hvps"],
                          "seconds": fmt_s(r["_secs"]), "rel.err": r["rel.err vs ref"]})
    return "### Summary\n\n" + markdown_table(lines, ["workload", "solver", "tol", "HVPs", "seconds", "rel.err"])


def parse(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.eigensolvers", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny workloads (tests)")
    ap.add_argument("--size", default=None, choices=M.SIZES)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    ap.add_argument("--models", nargs="+", default=None, choices=sorted(M.WORKLOADS))
    ap.add_argument("--peers", nargs="*", default=list(P.PEERS), choices=list(P.PEERS))
    ap.add_argument("--tols", nargs="+", type=float, default=[1e-3, 1e-6])
    ap.add_argument("--power-max-iters", type=int, default=None, help="cap for power iterations (default 1000; 200 quick)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--touch-gb", type=float, default=None)
    ap.add_argument("--k-scaling", action="store_true", help="time/HVPs for top-k, k = 1..32 (MLP)")
    ap.add_argument("--out", default=None)
    return ap.parse_args(argv)


def main(argv=None) -> str:
    a = parse(argv)
    size = a.size or ("tiny" if a.quick else "small")
    models = a.models or ["mlp", "cnn", "ln_transformer", "gpt"]
    device, dtype = torch.device(a.device), getattr(torch, a.dtype)
    pmi = a.power_max_iters or (200 if a.quick else 1000)
    warnings.filterwarnings("ignore", category=UserWarning)
    with pin_threads(a.threads):
        gb = a.touch_gb if a.touch_gb is not None else (0 if a.quick else 2)
        touched = touch_memory(gb, device)
        env = environment(device, dtype, a.threads)
        env["workload size"] = size
        env["memory touched before timing"] = f"{gb} GiB ({touched:.1f} s)"
        parts, all_rows = [], {}
        for name in models:
            wl = M.make(name, size, seed=0, device=device, dtype=dtype)
            md, rows = bench_workload(wl, a.tols, a.peers, pmi)
            print(md, flush=True)
            parts.append(md)
            all_rows[name] = rows
        parts.insert(0, summary(all_rows))
        if a.k_scaling:
            ks = [1, 4] if a.quick else [1, 2, 4, 8, 16, 32]
            md = k_scaling(M.make("mlp", size, device=device, dtype=dtype), ks, 1e-3, a.peers)
            print(md)
            parts.append(md)
    cmd = "python -m benchmarks.eigensolvers " + " ".join(sys.argv[1:] if argv is None else argv)
    report = header_markdown(env, "Eigensolvers: cost of λ_max, side by side", cmd) + "\n" + "\n".join(parts)
    write_report(report, a.out, echo=False)
    return report


if __name__ == "__main__":
    main()
