"""What Lanczos' own bookkeeping costs per step, with the basis stored row-major (the layout before 2026-12-02:
``torch.zeros(n, cap)``, every basis vector a strided column) and column-major (``torch.empty(cap, n).T``, every
basis vector contiguous), side by side in one run.

Only the layout differs between the two (the same Gram–Schmidt code runs on both). The operator is diagonal
(an O(n) elementwise product), so the time per step is the solver's own work:
writing the new vector, two Gram–Schmidt passes against the basis, the Ritz problem. Both layouts run the same
iterations (same start vector, same stop), so their eigenvalues agree to rounding; times are medians of
interleaved repeats. On a real model the HVP comes on top (the 438k GPT: ≈ 50 ms per HVP on one CPU thread).

Run ``python -m benchmarks.lanczos_layout [--sizes 26122 437760 4000000] [--steps 20] [--out FILE.md]``.
"""
from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import time
from collections.abc import Sequence

import torch

from curvature import lanczos
from curvature.operators import LinearOperator

from ._timing import environment, fmt_num, header_markdown, markdown_table, pin_threads, write_report

#: the solver module; its basis allocator is swapped for the old layout while a "before" run is timed
_lanczos_mod = importlib.import_module("curvature.solvers.lanczos")


class Diagonal(LinearOperator):
    """diag(d): an O(n) product, so a solve's time is its own bookkeeping."""

    def __init__(self, d: torch.Tensor) -> None:
        super().__init__(d.shape[0], d.dtype, d.device)
        self.d = d

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.d[:, None] * V


def _row_major(n: int, m: int, dtype: torch.dtype, device) -> torch.Tensor:
    return torch.zeros(n, m, dtype=dtype, device=device)


def run_one(op: Diagonal, layout: str, steps: int) -> tuple[float, float]:
    """(seconds per step, top eigenvalue) of ``steps`` Lanczos steps in the given basis layout."""
    original = _lanczos_mod._basis
    if layout == "row-major (before)":
        _lanczos_mod._basis = _row_major
    try:
        t0 = time.perf_counter()
        res = lanczos(op, 1, max_iters=steps, tol=1e-300)
        dt = time.perf_counter() - t0
    finally:
        _lanczos_mod._basis = original
    return dt / res.iterations, float(res.eigenvalues[0])


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.lanczos_layout", description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[26_122, 437_760, 4_000_000])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    layouts = ("row-major (before)", "column-major (now)")
    rows = []
    with pin_threads(args.threads):
        env = environment("cpu", torch.float32, args.threads)
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        for n in args.sizes:
            g = torch.Generator().manual_seed(0)
            op = Diagonal(torch.rand(n, generator=g, dtype=torch.float64).to(torch.float32))
            times: dict[str, list[float]] = {k: [] for k in layouts}
            values: dict[str, float] = {}
            for _ in range(args.repeat):  # interleaved
                for layout in layouts:
                    t, lam = run_one(op, layout, args.steps)
                    times[layout].append(t)
                    values[layout] = lam
            before, now = (statistics.median(times[k]) for k in layouts)
            rows.append({"n": n, "steps": args.steps, "ms/step row-major (before)": fmt_num(before * 1e3),
                         "ms/step column-major (now)": fmt_num(now * 1e3), "before / now": fmt_num(before / now, 3),
                         "λ agree": f"{abs(values[layouts[0]] - values[layouts[1]]):.1e}"})
            print(markdown_table(rows[-1:]), flush=True)
    text = header_markdown(env, "Lanczos bookkeeping per step: basis layout before / now",
                           " ".join(["python -m benchmarks.lanczos_layout", *(argv if argv is not None
                                                                             else sys.argv[1:])]))
    text += (f"\n1-min load average at the start: {load:.1f} (2 shared cores). Medians of {args.repeat} "
             "interleaved repeats.\n\n")
    text += markdown_table(rows)
    write_report(text, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
