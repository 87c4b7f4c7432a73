"""Critical sharpness λ_c = 2/η_c along two training runs, against λ_max, λ(P⁻¹H) and the thresholds, with its cost.

* the digits MLP trained by full-batch GD (MSE, lr = 3/λ₀: it catapults, then sits at the edge of stability);
* the small GPT (stdlib bytes, tied embeddings) trained by AdamW (lr 3e-3, no warm-up) on mini-batches.

Every ``--every`` steps, after ``backward()`` and before ``optimizer.step()``, on the step's own batch:

* λ_c with the model-placed search and with the published exponential + bisection search, each warm-started from
  its own previous η_c and reusing the step's loss (forward passes, seconds); the same cold (no warm start);
* a tight λ_c (rtol 1e-4), the reference for the accuracy of the rtol = 1/16 values;
* the 1-HVP quadratic estimate λ_q = uᵀHu / (−gᵀu) (u = Δ/η the update per unit lr: λ_q = 2/η_q for the quadratic
  model's η_q; = gᵀHg/gᵀg for GD), on a fresh Hessian operator (one forward+backward with graph, one HVP);
* the exact λ_max(H) row (Lanczos, eig_tol 1e-3) and, for AdamW, λ_max(P⁻¹H) (P of the step about to be taken);
* 2/η and the optimizer's threshold (2/η for GD, (2+2β₁)/((1−β₁)η) = 38/η for AdamW).

Costs are in training-step units: seconds divided by the median wall time of the run's plain training steps.

Run ``python -m benchmarks.critical [--quick] [--out FILE.md] [--figure FILE.png]``.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence

import torch

from curvature import critical_sharpness, preconditioned_sharpness, sharpness
from curvature.operators import HessianOperator
from curvature.optim import stability_threshold
from curvature.signals import next_update

from ._timing import environment, fmt_num, header_markdown, markdown_table, pin_threads, write_report
from .models import byte_batch, gpt, mlp


def _mse_onehot(out, y):
    return torch.nn.functional.mse_loss(out, torch.nn.functional.one_hot(y, out.shape[-1]).to(out.dtype))


def quadratic_estimate(model, loss_fn, batch, opt) -> float:
    """λ_q = uᵀHu / (−gᵀu), u the update per unit lr (1 HVP on a fresh operator of the batch)."""
    H = HessianOperator(model, loss_fn, batch)
    lr = float(opt.param_groups[0]["lr"])
    grads = [p.grad.detach().reshape(-1) for p in H.params]
    u = next_update(opt, H.params, H.unflatten(torch.cat(grads))) / lr
    Hu = H.matvec(u.to(H.dtype))
    g = torch.cat(grads).double()
    return float(u.double() @ Hu.double()) / float(-(g @ u.double()))


def setups(quick: bool, mlp_steps: int, gpt_steps: int) -> dict:
    """name -> (model, loss_fn, optimizer, batches, has_preconditioner)."""
    size = "tiny" if quick else "small"
    out = {}
    w = mlp(size)
    lam0 = float(sharpness(w.model, _mse_onehot, w.batch, eig_tol=1e-3).eigenvalues[0])
    lr = 3.0 / lam0
    out[f"digits MLP, GD (MSE) lr = 3/λ₀ = {lr:.3g}"] = (
        w.model, _mse_onehot, torch.optim.SGD(w.model.parameters(), lr=lr), [w.batch] * mlp_steps, False)
    g = gpt(size)
    T, bs = g.batch[0].shape[1], g.batch[0].shape[0]
    pool_x, pool_y = byte_batch(bs * 16, T, seed=1)
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(gpt_steps):
        idx = torch.randint(0, pool_x.shape[0], (bs,), generator=gen)
        batches.append((pool_x[idx], pool_y[idx]))
    out["small GPT, AdamW lr 3e-3 (no warm-up), mini-batches"] = (
        g.model, g.loss_fn, torch.optim.AdamW(g.model.parameters(), lr=3e-3), batches, True)
    return out


def run(name: str, model, loss_fn, opt, batches, precond: bool, every: int) -> tuple[list[dict], float]:
    rows, step_times = [], []
    prev = {"model": None, "bisection": None}
    for i, batch in enumerate(batches):
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = loss_fn(model(batch[0]), batch[1])
        loss.backward()
        t_fwd_bwd = time.perf_counter() - t0
        if i % every == 0:
            r: dict = {"workload": name, "step": i, "lr": float(opt.param_groups[0]["lr"]),
                       "threshold": float(stability_threshold(opt))}
            for search in ("model", "bisection"):
                res = critical_sharpness(model, loss_fn, batch, opt, lr_start=prev[search], search=search,
                                         loss=loss.detach())
                cold = critical_sharpness(model, loss_fn, batch, opt, search=search, loss=loss.detach())
                r[f"lc_{search}"] = res.critical_sharpness
                r[f"fp_{search}"] = res.forward_passes + 1  # + the loss at θ (reused here from the step)
                r[f"fp_cold_{search}"] = cold.forward_passes + 1
                r[f"s_{search}"] = res.seconds
                r[f"conv_{search}"] = res.converged
                if res.converged:
                    prev[search] = res.critical_lr
            tight = critical_sharpness(model, loss_fn, batch, opt, rtol=1e-4, loss=loss.detach())
            r["lc_tight"] = tight.critical_sharpness
            t1 = time.perf_counter()
            r["lq"] = quadratic_estimate(model, loss_fn, batch, opt)
            r["s_quad"] = time.perf_counter() - t1
            t1 = time.perf_counter()
            res = sharpness(model, loss_fn, batch, eig_tol=1e-3)
            r["s_exact"] = time.perf_counter() - t1
            r["lmax"], r["hvps"] = float(res.eigenvalues[0]), int(res.num_hvps)
            if precond:
                t1 = time.perf_counter()
                pres = preconditioned_sharpness(model, loss_fn, batch, opt, eig_tol=1e-3)
                r["s_exact"] += time.perf_counter() - t1
                r["lpre"], r["hvps"] = float(pres.eigenvalues[0]), r["hvps"] + int(pres.num_hvps)
            r["loss"] = float(loss)
            rows.append(r)
        t1 = time.perf_counter()
        opt.step()
        step_times.append(t_fwd_bwd + time.perf_counter() - t1)  # the training step alone
    return rows, statistics.median(step_times)


def _med(values: Sequence[float]) -> float:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(vals) if vals else math.nan


def _rng(values: Sequence[float], digits: int = 2) -> str:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return f"{min(vals):.{digits}f}–{max(vals):.{digits}f}" if vals else "—"


def summarize(name: str, rows: list[dict], step_s: float, precond: bool, skip: int) -> tuple[dict, dict]:
    """(what λ_c says, what it costs): medians over the rows after the first ``skip`` steps."""
    late = [r for r in rows if r["step"] >= skip] or rows
    warm = rows[1:] or rows
    say = {"workload": name, "steps ≥": skip,
           "λ_c·η/2": _rng([r["lc_model"] * r["lr"] / 2 for r in late]),
           "λ_max·η/2": _rng([r["lmax"] * r["lr"] / 2 for r in late]),
           "λ_c/λ_max": _rng([r["lc_model"] / r["lmax"] for r in late]),
           "λ(P⁻¹H)·η/38": _rng([r["lpre"] * r["lr"] / 38 for r in late]) if precond else "—",
           "λ_q/λ_c (tight)": _rng([r["lq"] / r["lc_tight"] for r in late]),
           "λ_c (1/16)/tight": _rng([r["lc_model"] / r["lc_tight"] for r in late], 3)}
    cost = {"workload": name, "step (s)": f"{step_s * 1e3:.1f} ms",
            "λ_c model, warm (steps)": fmt_num(_med([r["s_model"] for r in warm]) / step_s, 2),
            "λ_c bisection, warm (steps)": fmt_num(_med([r["s_bisection"] for r in warm]) / step_s, 2),
            "λ_q, 1 HVP (steps)": fmt_num(_med([r["s_quad"] for r in warm]) / step_s, 2),
            "exact row (steps)": fmt_num(_med([r["s_exact"] for r in warm]) / step_s, 1),
            "exact row HVPs": fmt_num(_med([r["hvps"] for r in warm]), 3),
            "forwards model warm: median (range)":
                f"{_med([r['fp_model'] for r in warm]):g} ({min(r['fp_model'] for r in warm)}–"
                f"{max(r['fp_model'] for r in warm)})",
            "forwards bisection warm":
                f"{_med([r['fp_bisection'] for r in warm]):g} ({min(r['fp_bisection'] for r in warm)}–"
                f"{max(r['fp_bisection'] for r in warm)})",
            "forwards cold model / bisection":
                f"{_med([r['fp_cold_model'] for r in rows]):g} / {_med([r['fp_cold_bisection'] for r in rows]):g}"}
    return say, cost


def figure(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6.2 * len(results), 4.2), squeeze=False)
    for ax, (name, (rows, _, precond)) in zip(axes[0], results.items()):
        s = [r["step"] for r in rows]
        ax.plot(s, [r["lmax"] for r in rows], "-o", ms=3, color="tab:blue", label=r"$\lambda_{\max}(H)$")
        ax.plot(s, [r["lc_model"] for r in rows], "-^", ms=3, color="tab:purple",
                label=r"critical sharpness $\lambda_c = 2/\eta_c$")
        ax.plot(s, [r["lq"] for r in rows], ":", color="tab:purple", lw=1.2,
                label=r"1-HVP estimate $u^\top H u/(-g^\top u)$")
        ax.plot(s, [2 / r["lr"] for r in rows], "-.", color="tab:purple", lw=1.1, label=r"$2/\eta$")
        if precond:
            ax.plot(s, [r["lpre"] for r in rows], "-s", ms=3, color="tab:red", label=r"$\lambda_{\max}(P^{-1}H)$")
            ax.plot(s, [r["threshold"] for r in rows], "--", color="tab:red", lw=1.1, label=r"$38/\eta$ (Adam)")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(name, fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    axes[0][0].set_ylabel("curvature")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.critical", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny workloads, few steps (tests)")
    ap.add_argument("--mlp-steps", type=int, default=None, help="default 400 (quick 6)")
    ap.add_argument("--gpt-steps", type=int, default=None, help="default 300 (quick 6)")
    ap.add_argument("--every", type=int, default=None, help="measure every N steps (default 10; quick 2)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    ap.add_argument("--figure", default=None)
    args = ap.parse_args(argv)
    mlp_steps = args.mlp_steps or (6 if args.quick else 400)
    gpt_steps = args.gpt_steps or (6 if args.quick else 300)
    every = args.every or (2 if args.quick else 10)
    with pin_threads(args.threads):
        env = environment("cpu", torch.float32, args.threads)
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        results = {}
        for name, (model, loss_fn, opt, batches, precond) in setups(args.quick, mlp_steps, gpt_steps).items():
            rows, step_s = run(name, model, loss_fn, opt, batches, precond, every)
            results[name] = (rows, step_s, precond)
            print(name, f"{len(rows)} rows, step {step_s * 1e3:.1f} ms", flush=True)
        load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    says, costs, every_row = [], [], []
    for name, (rows, step_s, precond) in results.items():
        skip = 0 if args.quick else (50 if "MLP" in name else 30)
        s, c = summarize(name, rows, step_s, precond, skip)
        says.append(s)
        costs.append(c)
        for r in rows:
            every_row.append({"workload": name.split(",")[0], "step": r["step"], "loss": fmt_num(r["loss"], 4),
                              "λ_c": fmt_num(r["lc_model"]), "λ_c tight": fmt_num(r["lc_tight"]),
                              "λ_q": fmt_num(r["lq"]), "λ_max": fmt_num(r["lmax"]),
                              "λ(P⁻¹H)": fmt_num(r.get("lpre")), "2/η": fmt_num(2 / r["lr"]),
                              "threshold": fmt_num(r["threshold"]), "fwd model": r["fp_model"],
                              "fwd bisection": r["fp_bisection"]})
    text = header_markdown(env, "Critical sharpness λ_c = 2/η_c: what it says and what it costs",
                           " ".join(["python -m benchmarks.critical", *(argv if argv is not None else sys.argv[1:])]))
    text += (f"\nMachine load (1-min load average on 2 shared cores): {load:.1f} at the start, {load_after:.1f} at "
             "the end; costs are ratios of medians measured in the same run. Forward counts include the loss at θ "
             "(reused from the training step by the tracker, so it costs one forward less there); the published "
             "search needs 5–6 warm-started forwards plus the loss at θ.\n")
    text += "\n## What λ_c says (ranges over the measurements after the first steps)\n\n" + markdown_table(says)
    text += "\n## What it costs (medians over the warm-started measurements)\n\n" + markdown_table(costs)
    text += "\n## Every measurement\n\n" + markdown_table(every_row)
    if args.figure:
        figure(results, args.figure)
        text += f"\n![λ_c, λ_max, λ(P⁻¹H) and the thresholds]({os.path.basename(args.figure)})\n"
    write_report(text, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
