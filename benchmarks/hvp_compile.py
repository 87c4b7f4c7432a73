"""Per-HVP time of our exact default route against raw kept-graph autograd and PyHessian, and the compile option.

    python -m benchmarks.hvp_compile [--quick] [--size small] [--models mlp gpt] [--rounds 200] [--no-compile]
                                     [--threads 1] [--out FILE.md]

For each workload, in one process on one machine, with the calls interleaved (each round calls every method once,
in a rotating order) so that drifting load hits all of them alike:

* ``raw kept graph``: the floor, no library: ``g = ∂L/∂θ`` built once with ``create_graph=True``, then one
  ``torch.autograd.grad(g, θ, v, retain_graph=True)`` per HVP (flattening included);
* ``ours auto``: ``HessianOperator(...).matvec`` with the default route (reverse-over-reverse on the kept graph);
* ``PyHessian``: ``hessian_vector_product`` on its own kept graph (``pip install --no-deps pyhessian``; skipped when
  missing);
* ``ours forward_over_reverse``: ``jvp(grad(L))``, no graph kept (the route that ``compile=True`` compiles);
* ``ours compile=True``: the same, ``torch.compile``-d; its setup column includes the compile time.

Columns: the median time of one HVP, the medians of the per-round ratios to the raw route and to PyHessian, the
HVP in gradients (one forward + backward, timed in the same rounds), the relative error against the raw route,
and the setup (operator construction; compilation for the compiled row).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from typing import Any, Callable

import torch

from . import models as M
from curvature import peers as P
from ._timing import environment, fmt_s, header_markdown, markdown_table, pin_threads, write_report

COLUMNS = ["method", "time / HVP", "× raw", "× PyHessian", "HVP / grad", "rel.err vs raw", "setup", "note"]


def raw_kept_graph(model: torch.nn.Module, loss_fn: Any, batch: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """One backward per HVP through a first-order graph built once (what every kept-graph route costs at least)."""
    params = M.trainable_params(model)
    x, y = batch
    with P.math_sdpa(True):
        g = torch.autograd.grad(loss_fn(model(x), y), params, create_graph=True)

    def hvp(v: torch.Tensor) -> torch.Tensor:
        return P.flatten(torch.autograd.grad(g, params, P.split_like(v, params), retain_graph=True)).detach()

    return hvp


def bench_workload(wl: M.Workload, rounds: int, compile_: bool) -> list[dict[str, Any]]:
    import curvature as cv

    model, loss_fn, batch = wl.as_tuple()
    is_gpt = isinstance(model, M.GPT)
    v = torch.randn(wl.num_params, generator=torch.Generator().manual_seed(0)).to(wl.batch[0].device)
    v = (v / v.norm()).to(M.trainable_params(model)[0].dtype)
    fns: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    setup: dict[str, str] = {}
    notes: dict[str, str] = {}
    rows: list[dict[str, Any]] = []

    def build(name: str, make: Callable[[], Callable[[torch.Tensor], torch.Tensor]], note: str = "") -> None:
        t0 = time.perf_counter()
        try:
            fns[name] = make()
        except P.PeerUnavailable as exc:
            rows.append({"method": name, "time / HVP": "skipped", "note": str(exc)})
            return
        except Exception as exc:  # noqa: BLE001 - a failing row is a result too
            rows.append({"method": name, "time / HVP": "**fails**", "note": f"`{type(exc).__name__}: "
                         f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}`"})
            return
        setup[name] = fmt_s(time.perf_counter() - t0)
        notes[name] = note

    grad = P.gradient_fn(model, loss_fn, batch, math_attention=is_gpt)
    build("raw kept graph", lambda: raw_kept_graph(model, loss_fn, batch), "torch.autograd.grad, no library")
    build("ours auto", lambda: cv.HessianOperator(model, loss_fn, batch).matvec,
          "reverse-over-reverse, kept graph (the default)")

    def pyhessian() -> Callable[[torch.Tensor], torch.Tensor]:
        with P.math_sdpa(is_gpt):
            return P.hvp_fn("pyhessian", model, loss_fn, batch)

    build("PyHessian", pyhessian, "its kept graph" + (" (math SDPA)" if is_gpt else ""))
    build("ours forward_over_reverse", lambda: cv.HessianOperator(model, loss_fn, batch,
                                                                    method="forward_over_reverse").matvec,
          "jvp(grad), no graph kept")
    if compile_:
        compiled: dict[str, Any] = {}

        def make_compiled() -> Callable[[torch.Tensor], torch.Tensor]:
            op = cv.HessianOperator(model, loss_fn, batch, compile=True)
            compiled["s"] = op.compile_seconds
            return op.matvec

        build("ours compile=True", make_compiled, "torch.compile(jvp(grad))")
        if "s" in compiled:
            notes["ours compile=True"] += f"; compile (first HVP) {compiled['s']:.1f} s"

    ref = fns["raw kept graph"](v)
    errs = {k: float((f(v).double() - ref.double()).norm() / ref.double().norm()) for k, f in fns.items()}
    for f in fns.values():  # warm-up
        for _ in range(3):
            f(v)
    keys = [*fns, "gradient"]
    calls: dict[str, Callable[[], Any]] = {k: (lambda f=f: f(v)) for k, f in fns.items()}
    calls["gradient"] = grad
    times: dict[str, list[float]] = {k: [] for k in keys}
    for r in range(rounds):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            t0 = time.perf_counter()
            calls[k]()
            times[k].append(time.perf_counter() - t0)

    def ratio(k: str, base: str) -> str:
        if base not in times:
            return "—"
        return f"{statistics.median(a / b for a, b in zip(times[k], times[base])):.3f}"

    for k in fns:
        rows.append({"method": k, "time / HVP": fmt_s(statistics.median(times[k])), "× raw": ratio(k, "raw kept graph"),
                     "× PyHessian": ratio(k, "PyHessian"), "HVP / grad": ratio(k, "gradient"),
                     "rel.err vs raw": f"{errs[k]:.1e}", "setup": setup[k], "note": notes[k]})
    return rows


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.hvp_compile", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny workloads, 20 rounds, no compile (tests)")
    ap.add_argument("--size", default=None, choices=M.SIZES, help="workload size (default small; tiny with --quick)")
    ap.add_argument("--models", nargs="+", default=None, choices=sorted(M.WORKLOADS))
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 200; 20 with --quick)")
    ap.add_argument("--no-compile", action="store_true", help="leave out the compile=True row")
    ap.add_argument("--threads", type=int, default=1, help="pin torch + BLAS threads (default 1)")
    ap.add_argument("--out", default=None, help="write the markdown report here")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> str:
    a = parse(argv)
    size = a.size or ("tiny" if a.quick else "small")
    rounds = a.rounds or (20 if a.quick else 200)
    compile_ = not (a.no_compile or a.quick)
    warnings.filterwarnings("ignore", category=UserWarning)
    parts = []
    with pin_threads(a.threads):
        env = environment("cpu", torch.float32, a.threads)
        env["workload size"] = size
        env["interleaved rounds"] = f"{rounds} (medians; ratios are medians of per-round ratios)"
        for name in a.models or ["mlp", "gpt"]:
            wl = M.make(name, size, seed=0)
            rows = bench_workload(wl, rounds, compile_)
            md = (f"### {wl.name} ({wl.size}): {wl.num_params:,} parameters, batch {wl.batch_size}\n\n"
                  f"load average at the end: {' / '.join(f'{x:.1f}' for x in os.getloadavg())}\n\n"
                  + markdown_table(rows, COLUMNS))
            print(md, flush=True)
            parts.append(md)
    cmd = "python -m benchmarks.hvp_compile " + " ".join(sys.argv[1:] if argv is None else argv)
    report = header_markdown(env, "Per-HVP time: our exact route vs raw autograd and PyHessian; compile=True", cmd)
    report += "\n" + "\n".join(parts)
    write_report(report, a.out, echo=False)
    return report


if __name__ == "__main__":
    main()
