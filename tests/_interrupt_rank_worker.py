"""Code run inside the 2 gloo processes of ``tests/test_rank_interrupts.py`` (#26.1).

Rank 1 is stopped by a ``KeyboardInterrupt`` (a real SIGINT, as from Ctrl-C) or a ``SystemExit`` (``sys.exit``)
in the middle of a collective step; rank 0 must raise a ``RemoteRankError`` at once, and both must meet again
in the next collective. Every scenario runs in sequence on one process group with a short timeout, so a regression
fails (gloo abort, timeout) instead of hanging; each records (exception type, first line, seconds, next value).
"""
from __future__ import annotations

import os
import signal
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _gloo import gloo_rank  # noqa: E402
from _rank_failure_worker import problem, shard  # noqa: E402

LINGER_S = 3.0  # how long the interrupted rank stays alive (cleanup, a handler, a debugger) before its next collective


INTERRUPTED_AT = [float("nan")]  # wall-clock time of this rank's last interrupt


def interrupt(kind: str) -> None:
    INTERRUPTED_AT[0] = time.time()
    if kind == "KeyboardInterrupt":
        signal.raise_signal(signal.SIGINT)  # Python's handler raises KeyboardInterrupt at the next bytecode
        time.sleep(1)  # (a real Ctrl-C; this line is not reached)
    sys.exit(3)


class InterruptingLoss:
    """cross-entropy that is interrupted on this rank at call number ``at`` (1-based)."""

    def __init__(self, kind: str, at: int | None):
        self.kind, self.at, self.calls = kind, at, 0

    def __call__(self, out, y):
        self.calls += 1
        if self.at is not None and self.calls == self.at:
            interrupt(self.kind)
        return F.cross_entropy(out, y)


def scenario(rank: int, fn, linger: bool) -> tuple[str, str, float, float, float]:
    """Run ``fn``; the interrupted rank lingers (or not), then every rank takes part in one more all-reduce
    (the training loop's next collective): its value (rank+1 summed: 3.0) shows the group is still in step.
    Returns (exception type, first line, wall-clock time it was caught, next all-reduce's value, wall-clock
    time of this rank's interrupt)."""
    INTERRUPTED_AT[0] = float("nan")
    try:
        fn()
        kind, msg = "ok", ""
    except BaseException as exc:  # noqa: BLE001 - KeyboardInterrupt / SystemExit are what is recorded
        kind, msg = type(exc).__name__, (str(exc).splitlines()[0] if str(exc) else "")
    caught = time.time()
    if linger and kind in ("KeyboardInterrupt", "SystemExit"):
        time.sleep(LINGER_S)
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return kind, msg, caught, float(t.item()), INTERRUPTED_AT[0]


def run(rank: int, world: int, init_file: str, out_dir: str) -> None:
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # as in an interactive run
    out: dict = {}
    with gloo_rank(rank, world, init_file, out_dir, timeout_s=15):
        from curvature.operators import HessianOperator
        from curvature.optim import gi_adam_init
        from curvature.solvers import lanczos
        from curvature.warmup import find_critical_lr
        model, X, Y = problem()
        data = shard(rank, X, Y)
        for kind in ("KeyboardInterrupt", "SystemExit"):
            for linger in (True, False):
                # in the 3rd HVP of a Lanczos solve (2 loss calls at construction, 2 per HVP)
                loss = InterruptingLoss(kind, 2 + 2 * 2 + 1 if rank == 1 else None)
                out[kind, "hvp", linger] = scenario(
                    rank, lambda: lanczos(HessianOperator(model, loss, data), 1, tol=1e-10), linger)
            # while the operator is built (its first loss call)
            loss = InterruptingLoss(kind, 1 if rank == 1 else None)
            linger = kind == "KeyboardInterrupt"
            out[kind, "build", linger] = scenario(rank, lambda: HessianOperator(model, loss, data), linger)
        # the tracker with on_error="warn": a remote interrupt is not a measurement error to warn about and train on
        # past; rank 0 raises too (rank 1 interrupted in its 2nd HVP)
        from curvature.tracking import SharpnessTracker
        sgd = torch.optim.SGD(model.parameters(), lr=0.1)
        loss = InterruptingLoss("KeyboardInterrupt", 2 + 2 + 1 if rank == 1 else None)
        tracker = SharpnessTracker(loss, every=1, k=1, tol=1e-10, on_error="warn", retry_cold=False)
        out["KeyboardInterrupt", "tracker", False] = scenario(rank, lambda: tracker.step(model, sgd, data, step=0), False)
        # GI-Adam's first-order gradient and the critical-lr search (their own all-reduces)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        loss = InterruptingLoss("KeyboardInterrupt", 2 if rank == 1 else None)
        out["KeyboardInterrupt", "gi_adam", False] = scenario(rank, lambda: gi_adam_init(opt, model, loss, data), False)
        for at in (1, 3):  # the loss at θ_0, then a trial step
            loss = InterruptingLoss("KeyboardInterrupt", at if rank == 1 else None)
            out["KeyboardInterrupt", f"critical_lr{at}", at == 1] = scenario(rank, lambda: find_critical_lr(
                model, loss, (X[rank * 10:rank * 10 + 10], Y[rank * 10:rank * 10 + 10]),
                optimizer_factory=lambda p, lr: torch.optim.SGD(p, lr=lr), lr_target=10.0), at == 1)
        # afterwards the group still works: a solve on both ranks
        out["healthy"] = float(lanczos(HessianOperator(model, F.cross_entropy, data), 1, tol=1e-10).eigenvalues[0])
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
