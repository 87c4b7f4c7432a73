"""Code run inside the 2 gloo processes of ``tests/test_rank_failures.py`` (#15.12/13).

One spawn runs every scenario in sequence on the same process group (that the group is still usable after
each failure is part of what is checked); each scenario records (exception type, first line, seconds).
"""
from __future__ import annotations

import os
import sys
import time
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

DT = torch.float64

from _gloo import gloo_rank  # noqa: E402


def problem(width: int = 8):
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(5, width), nn.Tanh(), nn.Linear(width, 3)).to(DT)
    X = torch.randn(20, 5, dtype=DT)
    Y = torch.randint(0, 3, (20,))
    return model, X, Y


def shard(rank: int, X, Y):
    """Two batches per rank, so every HVP runs the loss function again (no cached graph)."""
    lo = rank * 10
    return [(X[lo:lo + 5], Y[lo:lo + 5]), (X[lo + 5:lo + 10], Y[lo + 5:lo + 10])]


class FailingLoss:
    """cross-entropy that raises a simulated OOM on this rank at call number ``fail_at`` (1-based)."""

    def __init__(self, fail_at: int | None):
        self.fail_at = fail_at
        self.calls = 0

    def __call__(self, out, y):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise RuntimeError("CUDA out of memory (simulated) in the HVP")
        return F.cross_entropy(out, y)


def _outcome(fn):
    t0 = time.monotonic()
    try:
        fn()
        kind, msg = "ok", ""
    except Exception as exc:  # noqa: BLE001
        kind, msg = type(exc).__name__, (str(exc).splitlines()[0] if str(exc) else "")
    return kind, msg, time.monotonic() - t0


def run(rank: int, world: int, init_file: str, out_dir: str) -> None:
    out: dict = {}
    with gloo_rank(rank, world, init_file, out_dir, timeout_s=20):
        from curvature.operators import HessianOperator, assert_ranks_agree
        from curvature.solvers import lanczos
        model, X, Y = problem()
        data = shard(rank, X, Y)
        # 1. Rank 1 fails in its 3rd HVP (2 loss calls at construction, 2 per HVP: call 2+2·2+1 = 7).
        for method in ("auto", "finite_difference"):
            per_hvp = 2 if method == "auto" else 4
            loss = FailingLoss(2 + 2 * per_hvp + 1 if rank == 1 else None)

            def solve():
                op = HessianOperator(model, loss, data, method=method)
                lanczos(op, 1, tol=1e-10)
            out[f"solve_{method}"] = _outcome(solve)

        # 2. The tracker with on_error="warn": both ranks warn and go on to the next collective of training.
        try:
            from curvature.tracking import SharpnessTracker
        except ImportError:
            out["tracker"] = None
        else:
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            loss = FailingLoss(2 + 2 * 2 + 1 if rank == 1 else None)
            tracker = SharpnessTracker(loss, every=1, k=1, tol=1e-10, on_error="warn", retry_cold=False)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                row = tracker.step(model, opt, data, step=0)
            t = torch.tensor([float(rank + 1)])
            dist.all_reduce(t)  # the training step's gradient all-reduce
            out["tracker"] = {"error": row.get("error"), "warned": len(caught) > 0, "after": float(t.item())}

        # 3. Models that differ between ranks: a clear error on both, no gloo abort.
        other, _, _ = problem(width=8 if rank == 0 else 9)
        out["mismatch"] = _outcome(lambda: HessianOperator(other, F.cross_entropy, data))

        # 4. Optimizer state that differs (the hook PreconditionedHessianOperator can call).
        P = torch.ones(10, dtype=DT)
        if rank == 1:
            P[3] = 1.5
        out["adam_mismatch"] = _outcome(lambda: assert_ranks_agree(dist.group.WORLD, adam_preconditioner=P,
                                                                   num_params=10))
        out["adam_same"] = _outcome(lambda: assert_ranks_agree(dist.group.WORLD, adam_preconditioner=torch.ones(3)))

        # 5. The group is still healthy: a correct operator and a final all-reduce work.
        op = HessianOperator(model, F.cross_entropy, data)
        out["healthy_lambda"] = float(lanczos(op, 1, tol=1e-10).eigenvalues[0])
        fd = HessianOperator(model, F.cross_entropy, data, method="finite_difference")  # DDP-style all-reduce
        out["healthy_lambda_fd"] = float(lanczos(fd, 1, tol=1e-10).eigenvalues[0])
        t = torch.tensor([1.0])
        dist.all_reduce(t)
        out["final_allreduce"] = float(t.item())
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
