"""Warm-started tracker rows against a tight float64 solve at the same step, with and without the random direction
in the warm start (``curvature.tracking.WARM_RANDOM_WEIGHT``), in one run.

The trajectories are those of ``benchmarks.tracker`` (digits MLP at the edge of stability, the GELU MLP at
lr = 3/λ₀, the small GPT with Adam), the route is exact (``hvp_route="exact"``), every row gets a reference
(Lanczos to tol 1e-8 in float64). Per run: HVPs per row, the worst row error, and the rows whose ``error_bound`` is
below their true error (a silent miss when the error is above ``eig_tol``).

Run ``python -m benchmarks.warm_start [--quick] [--weights 0 0.3] [--only gelu mlp gpt] [--out FILE.md]``.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import curvature.tracking as tracking

from ._timing import environment, header_markdown, markdown_table, pin_threads, write_report
from .tracker import _run, trajectories

RUNS = {"gelu": [(400, 10), (500, 100)], "mlp": [(300, 10), (500, 100)], "gpt": [(200, 10)]}


def one(name: str, traj: tuple, every: int, weight: float) -> dict:
    make, make_opt, batches = traj[:3]
    saved = tracking.WARM_RANDOM_WEIGHT
    tracking.WARM_RANDOM_WEIGHT = weight
    try:
        _, rows, refs = _run(make, make_opt, batches, dict(hvp_route="exact"), every, graph=False, reference=True)
    finally:
        tracking.WARM_RANDOM_WEIGHT = saved
    errs = [(abs(r["sharpness"] - f["sharpness"]) / abs(f["sharpness"]), r["step"], r["error_bound"])
            for r, f in zip(rows, refs)]
    worst = max(errs)
    missed = [f"step {s}: {e:.1e} > bound {b:.1e}" for e, s, b in errs if b is not None and b < e]
    warm = [r["num_hvps"] for r in rows[1:]] or [rows[0]["num_hvps"]]
    return {"trajectory": name, "every": every, "weight": weight, "rows": len(rows),
            "HVPs per warm row": f"{sum(warm) / len(warm):.2f}", "worst row error": f"{worst[0]:.1e} (step {worst[1]})",
            "bound below the error": "; ".join(missed) or "none"}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.3])
    ap.add_argument("--only", nargs="+", default=list(RUNS), choices=list(RUNS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    pin_threads(args.threads)
    trs = trajectories(args.quick, mlp_steps=500, gpt_steps=200)
    keys = {"gelu": "GELU", "mlp": "digits MLP", "gpt": "GPT"}
    rows = []
    for key in args.only:
        name = next(n for n in trs if keys[key] in n)
        for steps, every in RUNS[key]:
            traj = trs[name]
            traj = (traj[0], traj[1], traj[2][:steps] if not args.quick else traj[2])
            for w in args.weights:
                rows.append(one(name, traj, min(every, 5) if args.quick else every, w))
                print(rows[-1], flush=True)
    cmd = "python -m benchmarks.warm_start " + " ".join(sys.argv[1:] if argv is None else argv)
    text = header_markdown(environment(threads=args.threads), "Warm starts with and without a random direction",
                           cmd) + "\n" + markdown_table(rows)
    write_report(text, args.out, echo=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
