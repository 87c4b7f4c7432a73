"""Code run inside the 2 gloo processes of ``tests/test_distributed_faults.py`` (unequal shards, 7 and 13 samples).

Each rank: (1) a tracker with file, TensorBoard and logging sinks pointing at the *same* paths on both ranks
(only rank 0 may write them); (2) ``find_critical_lr`` on its shard (must equal the single-process result on
the concatenated data, on both ranks); (3) ``PersistentCatapultWarmup`` and ``CurvatureAwareWarmup`` fed each
rank's own loss (the lr they set must be the same on both ranks). Results go to ``rank{r}.pt``.
"""
from __future__ import annotations

import logging
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

DT = torch.float64
SHARDS = (7, 13)

from _gloo import gloo_rank  # noqa: E402


def problem():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
    X = torch.randn(sum(SHARDS), 4, dtype=DT) * 2
    Y = torch.randint(0, 3, (sum(SHARDS),))
    return model, F.cross_entropy, X, Y


def shard(rank, X, Y):
    lo = sum(SHARDS[:rank])
    return X[lo:lo + SHARDS[rank]], Y[lo:lo + SHARDS[rank]]


def sgd(params, lr):
    return torch.optim.SGD(params, lr=lr)


def run(rank: int, world: int, init_file: str, out_dir: str) -> None:
    with gloo_rank(rank, world, init_file, out_dir, timeout_s=60):
        from curvature.sinks import LoggingSink, TensorBoardSink
        from curvature.tracking import SharpnessTracker
        from curvature.warmup import CurvatureAwareWarmup, PersistentCatapultWarmup, find_critical_lr

        out: dict = {}
        model, loss_fn, X, Y = problem()
        x, y = shard(rank, X, Y)
        # (1) sinks: the same paths on both ranks
        records: list[str] = []

        class Keep(logging.Handler):
            def emit(self, record):
                records.append(record.getMessage())

        logger = logging.getLogger(f"faults.rank{rank}")
        logger.addHandler(Keep())
        logger.setLevel(logging.INFO)
        shared = os.path.join(out_dir, "shared")
        tracker = SharpnessTracker(loss_fn, every=1, tol=1e-8, sinks=[
            os.path.join(shared, "rows.csv"), os.path.join(shared, "rows.jsonl"),
            TensorBoardSink(os.path.join(shared, "tb")), LoggingSink(logger)])
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for step in range(3):
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            tracker.step(model, opt, (x, y), step=step)
            opt.step()
        tracker.close()
        out["sharpness"] = [r["sharpness"] for r in tracker.history]
        out["log_records"] = len(records)
        dist.barrier()

        # (2) find_critical_lr on the shards
        model, loss_fn, X, Y = problem()
        x, y = shard(rank, X, Y)
        res = find_critical_lr(model, loss_fn, (x, y), sgd, lr_target=50.0, delta=0.1)
        out["lr_c"], out["bracket"], out["loss0"] = res.lr_c, res.bracket, res.loss0

        # (3) the warm-ups, fed each rank's own loss
        def warm_up(make, steps):
            model, loss_fn, X, Y = problem()
            x, y = shard(rank, X, Y)
            opt = torch.optim.SGD(model.parameters(), lr=0.01)
            sched, lrs = make(opt, model, loss_fn), []
            for _ in range(steps):
                opt.zero_grad()
                loss = loss_fn(model(x), y)
                loss.backward()
                lrs.append(sched.step(loss, (x, y)))
                opt.step()
            return sched, lrs

        _, out["persistent_lrs"] = warm_up(lambda o, m, f: PersistentCatapultWarmup(o, m, f, lr_target=50.0), 3)
        ctrl, out["aware_lrs"] = warm_up(
            lambda o, m, f: CurvatureAwareWarmup(o, m, f, lr_target=5.0, every=1, tol=1e-6), 4)
        out["aware_reference"] = ctrl.reference
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
