"""What tracking sharpness costs during training, side by side in one run.

For each workload and optimizer (SGD, Adam) the same seeded mini-batch training runs

* without a tracker, with ``SharpnessTracker(every=100)`` and with ``every=10`` (current batch, warm start):
  wall time and its overhead over the plain run, interleaved so load drift cancels;
* with ``every=1`` on a fixed probe batch and on the current batch, warm vs cold start: HVPs per tracked step
  (the first, cold, row of each run is left out of the warm average).

Run ``python -m benchmarks.tracker [--quick] [--models mlp gpt] [--steps N] [--out FILE.md]``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Sequence

import torch

from curvature import SharpnessTracker

from ._timing import (environment, fmt_num, fmt_s, header_markdown, markdown_table, pin_threads, touch_memory,
                      write_report)
from .models import gpt, mlp

WORKLOADS = {"mlp": mlp, "gpt": gpt}


def _batches(batch, batch_size: int, steps: int, seed: int) -> list:
    x, y = batch
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch_size,), generator=g)
        out.append((x[idx], y[idx]))
    return out


def w_loss(make) -> torch.nn.Module:
    return make().loss_fn


def _train(make, opt_name: str, batches: list, tracker: SharpnessTracker | None, lr: float) -> float:
    w = make()
    model, loss_fn = w.model, w.loss_fn
    opt = (torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9) if opt_name == "sgd"
           else torch.optim.Adam(model.parameters(), lr=lr))
    t0 = time.perf_counter()
    for i, (x, y) in enumerate(batches):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        if tracker is not None:
            tracker.step(model, opt, (x, y), step=i)
        opt.step()
    return time.perf_counter() - t0


def overhead_rows(name: str, make, opt_name: str, batches: list, lr: float, repeat: int) -> list[dict]:
    kinds = {"no tracker": None, "every=100": 100, "every=10": 10}
    times: dict[str, list[float]] = {k: [] for k in kinds}
    rows_of: dict[str, int] = {}
    for _ in range(repeat):  # interleaved: one run of each per round
        for kind, every in kinds.items():
            tr = None if every is None else SharpnessTracker(w_loss(make), every=every)
            times[kind].append(_train(make, opt_name, batches, tr, lr))
            if tr is not None:
                rows_of[kind] = len(tr.history)
    base = statistics.median(times["no tracker"])
    out = []
    for kind in kinds:
        med = statistics.median(times[kind])
        out.append({"workload": name, "optimizer": opt_name, "run": kind, "steps": len(batches),
                    "measurements": rows_of.get(kind, 0), "time (median)": fmt_s(med),
                    "overhead": "—" if kind == "no tracker" else f"{(med - base) / base * 100:+.0f} %"})
    return out


def warm_cold_rows(name: str, make, opt_name: str, batches: list, lr: float) -> list[dict]:
    out = []
    probe = batches[0]
    for probe_kind in ("fixed probe", "current batch"):
        hvps = {}
        for warm in (False, True):
            tr = SharpnessTracker(w_loss(make), every=1, warm_start=warm,
                                  probe=probe if probe_kind == "fixed probe" else None)
            _train(make, opt_name, batches, tr, lr)
            counts = [r["num_hvps"] for r in tr.history[1:] if r.get("error") is None]
            hvps[warm] = statistics.mean(counts) if counts else float("nan")
        out.append({"workload": name, "optimizer": opt_name, "probe": probe_kind,
                    "HVPs/row cold": fmt_num(hvps[False]), "HVPs/row warm": fmt_num(hvps[True]),
                    "warm / cold": fmt_num(hvps[True] / hvps[False], 2)})
    return out


# ---------------------------------------------------------------------------------------------------
# Old vs new tracker, side by side in one run (issue #16 part 2)
# ---------------------------------------------------------------------------------------------------
#: The tracker variants compared: the settings of commit 7865d25 (LOBPCG, residual tol 1e-4, previous top vector
#: only, P of the last step, one first-order graph per solve) against today's defaults, and the defaults on the
#: training step's own graph (backward(create_graph=True) on the measured steps).
VARIANTS = {
    "old (7865d25 settings)": (dict(solver="lobpcg", tol=1e-4, eig_tol=None, warm_guard=False, lookahead="auto",
                                    share_graph=False, gradient_start=False), False),
    "new (defaults)": ({}, False),
    "new, training graph": ({}, True),
}
#: Issue #22: today's tracker (exact HVPs) against the new default (``hvp_route="auto"``: one-sided gradient
#: differences with a central check when the first row shows they meet eig_tol), on the same runs.
ROUTE_VARIANTS = {
    "exact HVPs (hvp_route='exact')": (dict(hvp_route="exact"), False),
    "new default (hvp_route='auto')": ({}, False),
}


def _mse_onehot(out, y):
    return torch.nn.functional.mse_loss(out, torch.nn.functional.one_hot(y, out.shape[-1]).to(out.dtype))


def trajectories(quick: bool, gpt_steps: int = 200, mlp_steps: int = 300) -> dict:
    """name -> (make(): (model, loss_fn), optimizer factory, batches, description)."""
    size = "tiny" if quick else "small"
    out = {}
    steps = 20 if quick else mlp_steps

    def make_mlp():
        w = mlp(size)
        return w.model, _mse_onehot, w.batch

    model, loss_fn, batch = make_mlp()
    out["digits MLP, full-batch GD at the edge of stability (SGD lr 2, MSE)"] = (
        make_mlp, lambda ps: torch.optim.SGD(ps, lr=2.0), [batch] * steps)

    def make_gpt():  # math attention: the training-graph variant differentiates the model's own forward twice
        w = gpt(size, attn="sdpa_math")
        return w.model, w.loss_fn, w.batch

    def make_gelu():  # the hidden every=100 check's kind: GELU MLP on digits, full-batch GD at lr = 3/λ₀, float32
        torch.manual_seed(0)
        from .models import digits
        X, y = digits(512, seed=0, dtype=torch.float32)
        net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 128),
                                  torch.nn.GELU(), torch.nn.Linear(128, 10))
        return net, _mse_onehot, (X, y)

    from curvature import sharpness
    gnet, _, gb = make_gelu()
    lam0 = sharpness(gnet, _mse_onehot, gb, solver="lanczos", tol=1e-8, dtype=torch.float64).eigenvalue
    out[f"GELU MLP on digits, full-batch GD at lr = 3/λ₀ = {3 / lam0:.3g} (MSE)"] = (
        make_gelu, lambda ps, lr=3 / lam0: torch.optim.SGD(ps, lr=lr), [gb] * steps)

    _, _, gbatch = make_gpt()
    out["GPT (tied embeddings, math attention), Adam lr 1e-3, mini-batches"] = (
        make_gpt, lambda ps: torch.optim.Adam(ps, lr=1e-3),
        _batches(gbatch, max(1, gbatch[0].shape[0] // 2), 20 if quick else gpt_steps, seed=0))
    return out


def _run(make, make_opt, batches, tracker_kw: dict | None, every: int, graph: bool, reference: bool = False):
    """One training run; returns (seconds of the loop, tracker rows, reference rows)."""
    model, loss_fn, _ = make()
    opt = make_opt(model.parameters())
    tracker = None if tracker_kw is None else SharpnessTracker(loss_fn, every=every, **tracker_kw)
    refs = []
    spent_on_refs = 0.0
    step_times = []
    t0 = time.perf_counter()
    for i, (x, y) in enumerate(batches):
        ts = time.perf_counter()
        opt.zero_grad()
        measure = tracker is not None and tracker.should_measure(i)
        loss_fn(model(x), y).backward(create_graph=graph and measure)
        step_times.append(time.perf_counter() - ts)
        if tracker is not None:
            tracker.step(model, opt, (x, y), step=i)
        ts = time.perf_counter()
        if reference and measure:
            tr = time.perf_counter()
            refs.append(_reference(model, loss_fn, (x, y), opt, tracker_kw or {}))
            spent_on_refs += time.perf_counter() - tr
        opt.step()
        step_times[-1] += time.perf_counter() - ts
        if graph and measure:
            for p in model.parameters():
                p.grad = None  # frees the create_graph graph
    _run.step_times = step_times  # per-step seconds of the training itself (tracker calls left out)
    return time.perf_counter() - t0 - spent_on_refs, (tracker.history if tracker is not None else []), refs


def _reference(model, loss_fn, batch, opt, tracker_kw: dict) -> dict:
    """A tight float64 Lanczos solve at the same point (and, for Adam, with the P convention of the tracker)."""
    from curvature import preconditioned_sharpness, sharpness
    from curvature.optim import is_adam_like

    ref = {"sharpness": sharpness(model, loss_fn, batch, solver="lanczos", tol=1e-8, dtype=torch.float64).eigenvalue}
    if is_adam_like(opt):
        la = tracker_kw.get("lookahead", True)
        if la == "auto":
            la = not any("exp_avg_sq" in s for s in opt.state.values())
        ref["preconditioned_sharpness"] = preconditioned_sharpness(
            model, loss_fn, batch, opt, solver="lanczos", tol=1e-8, lookahead=la, dtype=torch.float64).eigenvalue
    return ref


def compare_rows(name: str, make, make_opt, batches, repeat: int, everies: Sequence[int] = (100, 10),
                 variants: dict | None = None) -> tuple[list[dict], list[dict]]:
    """Overhead (interleaved, medians), HVPs per tracked step and error vs a tight solve, per variant and every;
    and the cost of one row in training steps, (t_tracked − t_plain) / rows / (t_plain / steps)."""
    summary, errors = [], []
    variants = VARIANTS if variants is None else variants
    for every in everies:
        times: dict[str, list[float]] = {"no tracker": []}
        row_seconds: dict[str, list[float]] = {}
        step_seconds: list[float] = []
        for _ in range(repeat):
            times["no tracker"].append(_run(make, make_opt, batches, None, every, False)[0])
            step_seconds += _run.step_times
            for label, (kw, graph) in variants.items():
                t, trows, _ = _run(make, make_opt, batches, kw, every, graph)
                times.setdefault(label, []).append(t)
                step_seconds += _run.step_times
                row_seconds.setdefault(label, []).extend(r["seconds"] for r in trows[1:])  # warm rows
        step_s = statistics.median(step_seconds)
        base = statistics.median(times["no tracker"])
        for label, (kw, graph) in variants.items():
            _, rows, refs = _run(make, make_opt, batches, kw, every, graph, reference=True)
            errs, perrs, under = [], [], 0
            for row, ref in zip(rows, refs):
                if row.get("sharpness") is None:
                    continue
                errs.append(abs(row["sharpness"] - ref["sharpness"]) / abs(ref["sharpness"]))
                if "preconditioned_sharpness" in ref and row.get("preconditioned_sharpness") is not None:
                    perrs.append(abs(row["preconditioned_sharpness"] - ref["preconditioned_sharpness"])
                                 / abs(ref["preconditioned_sharpness"]))
                for key, err in (("error_bound", errs[-1]),
                                 ("preconditioned_error_bound", perrs[-1] if perrs and len(perrs) == len(errs) else None)):
                    if err is not None and row.get(key) is not None and row[key] < err:
                        under += 1
                errors.append({"trajectory": name, "every": every, "tracker": label, "step": row["step"],
                               "λ(H)": fmt_num(row["sharpness"], 5), "ref λ(H)": fmt_num(ref["sharpness"], 5),
                               "err λ(H)": f"{errs[-1]:.1e}",
                               "err λ(P⁻¹H)": f"{perrs[-1]:.1e}" if perrs and len(perrs) == len(errs) else "—",
                               "HVPs": row["num_hvps"], "gradients": row.get("num_gradients"),
                               "route": row.get("hvp_route"), "bound": _fmt_bound(row.get("error_bound")),
                               "bound P⁻¹H": _fmt_bound(row.get("preconditioned_error_bound"))})
            med = statistics.median(times[label])
            hv = [r["num_hvps"] for r in rows]
            gr = [r.get("num_gradients") or 0 for r in rows]
            summary.append({
                "trajectory": name, "every": every, "tracker": label, "rows": len(rows),
                "HVPs/row (median)": fmt_num(statistics.median(hv) if hv else float("nan")),
                "HVPs/row warm (median)": fmt_num(statistics.median(hv[1:]) if len(hv) > 1 else float("nan")),
                "max err λ(H)": f"{max(errs):.1e}" if errs else "—",
                "max err λ(P⁻¹H)": f"{max(perrs):.1e}" if perrs else "—",
                "gradients/row (median)": fmt_num(statistics.median(gr) if gr else float("nan")),
                "rows with bound < error": under,
                "errors": "; ".join(sorted({str(r['error']) for r in rows if r.get('error')})) or "none",
                "time (median)": fmt_s(med), "plain run": fmt_s(base),
                "row cost (training steps)": fmt_num((med - base) / max(len(rows), 1) / (base / len(batches)), 3),
                "overhead": f"{(med - base) / base * 100:+.1f} %",
                "warm row / step (medians)": fmt_num(_ratio(row_seconds.get(label), step_s), 3),
                "→ overhead at this every": f"{_ratio(row_seconds.get(label), step_s) / every * 100:.1f} %"})
    return summary, errors


def _ratio(row_seconds: list[float] | None, step_s: float) -> float:
    """Median warm-row seconds over the median training-step seconds of the same runs (robust to load drift)."""
    return statistics.median(row_seconds) / step_s if row_seconds else float("nan")


def _emit(text: str, out: str | None) -> int:
    """Print the report and write it to ``out`` (when given); exit status 0."""
    write_report(text, out)
    return 0


def _fmt_bound(b) -> str:
    return "—" if b is None else f"{b:.1e}"


def main_compare(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.tracker --compare")
    ap.add_argument("--compare", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeat", type=int, default=None, help="interleaved timed rounds (default 3; quick 1)")
    ap.add_argument("--only", nargs="+", default=None, choices=["mlp", "gpt", "gelu"])
    ap.add_argument("--routes", action="store_true", help="compare exact HVPs with the new default route (#22)")
    ap.add_argument("--gpt-steps", type=int, default=200, help="training steps of the GPT trajectory")
    ap.add_argument("--mlp-steps", type=int, default=300, help="training steps of the MLP trajectory")
    ap.add_argument("--every", type=int, nargs="+", default=[100, 10], help="tracker intervals to compare")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    repeat = args.repeat or (1 if args.quick else 3)
    with pin_threads(args.threads):
        env = environment("cpu", torch.float32, args.threads)
        load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        summary, errors = [], []
        for name, (make, make_opt, batches) in trajectories(args.quick, args.gpt_steps, args.mlp_steps).items():
            key = "gelu" if "GELU" in name else "gpt" if "GPT" in name else "mlp"
            if args.only and key not in args.only:
                continue
            s, e = compare_rows(name, make, make_opt, batches, repeat, args.every,
                                ROUTE_VARIANTS if args.routes else None)
            summary += s
            errors += e
            print(markdown_table(s), flush=True)
        load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    text = header_markdown(env, "Tracker cost and accuracy: old vs new, side by side in one run",
                           " ".join(["python -m benchmarks.tracker", *(argv if argv is not None else sys.argv[1:])]))
    text += (f"\nMachine load (1-min load average on 2 shared cores): {load_before:.1f} at the start, "
             f"{load_after:.1f} at the end. Times are medians of {repeat} interleaved rounds (plain run and every "
             "variant once per round), so load drift hits all alike; HVP counts and errors are exact.\n")
    text += "\n## Overhead, HVPs per tracked row and worst error vs a tight float64 Lanczos solve at the same step\n\n"
    text += markdown_table(summary)
    text += "\n## Every tracked row\n\n" + markdown_table(errors)
    return _emit(text, args.out)


def main(argv: Sequence[str] | None = None) -> int:
    if "--compare" in (argv if argv is not None else sys.argv[1:]):
        return main_compare(argv)
    ap = argparse.ArgumentParser(prog="python -m benchmarks.tracker", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny workloads, few steps (tests)")
    ap.add_argument("--models", nargs="+", default=["mlp", "gpt"], choices=sorted(WORKLOADS))
    ap.add_argument("--optimizers", nargs="+", default=["sgd", "adam"], choices=["sgd", "adam"])
    ap.add_argument("--steps", type=int, default=None, help="training steps (default 300; 20 quick)")
    ap.add_argument("--warm-steps", type=int, default=None, help="steps of the every=1 warm/cold runs (default 30)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=None, help="interleaved rounds of the overhead runs (default 3)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    size = "tiny" if args.quick else "small"
    steps = args.steps or (20 if args.quick else 300)
    warm_steps = args.warm_steps or (6 if args.quick else 30)
    repeat = args.repeat or (1 if args.quick else 3)
    lrs = {"sgd": 0.05, "adam": 1e-3}
    with pin_threads(args.threads):
        if not args.quick:
            touch_memory(2.0)
        env = environment("cpu", torch.float32, args.threads)
        over, warm = [], []
        for name in args.models:
            def make(name=name):
                return WORKLOADS[name](size)
            data = make().batch
            batches = _batches(data, min(args.batch_size, data[0].shape[0]), steps, seed=0)
            for opt_name in args.optimizers:
                over += overhead_rows(name, make, opt_name, batches, lrs[opt_name], repeat)
                warm += warm_cold_rows(name, make, opt_name, batches[:warm_steps], lrs[opt_name])
    text = header_markdown(env, "Tracker cost during training", " ".join(["python -m benchmarks.tracker", *sys.argv[1:]]))
    text += "\n## Training-time overhead (current batch, warm start, k=1, tol 1e-4)\n\n" + markdown_table(over)
    text += "\n## HVPs per tracked step, warm vs cold start (every step, first row left out)\n\n" + markdown_table(warm)
    return _emit(text, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
