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
import statistics
import sys
import time
from collections.abc import Sequence

import torch

from curvature import SharpnessTracker

from ._timing import environment, fmt_num, fmt_s, header_markdown, markdown_table, pin_threads, touch_memory
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


def main(argv: Sequence[str] | None = None) -> int:
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
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
