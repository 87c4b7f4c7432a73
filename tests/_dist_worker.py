"""Code that runs inside the processes spawned by ``tests/test_distributed.py`` (2-process gloo on CPU).

The parent computes single-process references over the union of the shards; each rank here computes the
same quantities on its own shard with ``torch.distributed`` initialised and saves them to ``out_dir``.
Everything one rank computes is grouped in one spawn (start-up costs seconds).
"""
from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

DT = torch.float64
SHARDS = (7, 13)  # unequal shard sizes: an unweighted average of the ranks' Hessians would be wrong

from _gloo import gloo_rank  # noqa: E402


def problem():
    """Model, loss and the union of the data (20 samples); deterministic."""
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)
    X = torch.randn(sum(SHARDS), 5, dtype=DT)
    Y = torch.randint(0, 3, (sum(SHARDS),))
    return model, F.cross_entropy, X, Y


def shard(rank: int, X: torch.Tensor, Y: torch.Tensor):
    lo = sum(SHARDS[:rank])
    hi = lo + SHARDS[rank]
    if rank == 1:  # several batches on one rank: weighting inside a rank and across ranks together
        mid = lo + 5
        return [(X[lo:mid], Y[lo:mid]), (X[mid:hi], Y[mid:hi])]
    return (X[lo:hi], Y[lo:hi])


def directions(n: int, k: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    return torch.randn(n, k, generator=g, dtype=DT)


def adam_after_one_step(model, loss_fn, X, Y):
    """An Adam optimizer with state after one step on the full data (the same on every rank)."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.zero_grad()
    loss_fn(model(X), Y).backward()
    opt.step()
    model.zero_grad(set_to_none=True)
    return opt


def compute(model, loss_fn, data, X, Y, *, distributed=None, with_extras=True) -> dict:
    """Everything that must agree between a distributed run and the single-process reference."""
    import curvature.spectrum as S
    from curvature.diagnostics import sharpness
    from curvature.operators import HessianOperator
    from curvature.solvers import lanczos, lobpcg, power_iteration

    out: dict = {}
    op = HessianOperator(model, loss_fn, data, distributed=distributed)
    n = op.shape[0]
    V = directions(n)
    out["hv"] = op.matmat(V)
    out["loss"] = op.loss
    out["gradient"] = op.gradient
    out["num_samples"] = op.num_samples
    r = lobpcg(op, 2, tol=1e-10, max_iters=500)
    out["lobpcg_vals"], out["lobpcg_vecs"], out["lobpcg_hvps"] = r.eigenvalues, r.eigenvectors, r.num_hvps
    r = lanczos(op, 2, tol=1e-10)
    out["lanczos_vals"], out["lanczos_hvps"] = r.eigenvalues, r.num_hvps
    r = power_iteration(op, 1, tol=1e-6, max_iters=2000)
    out["power_vals"], out["power_hvps"] = r.eigenvalues, r.num_hvps
    r = sharpness(model, loss_fn, data, k=1, tol=1e-10, largest=False, distributed=distributed)
    out["bottom_vals"] = r.eigenvalues
    op_mb = HessianOperator(model, loss_fn, data, max_batch_size=3, distributed=distributed)
    out["hv_micro"] = op_mb.matmat(V)
    if not with_extras:
        return out
    t = S.hutchinson_trace(op, num_samples=24, block=8, seed=1)
    out["hutch"], out["hutch_samples"] = t.estimate, t.samples
    t = S.hutchinson_trace(op, tol=0.2, max_samples=160, seed=2)
    out["hutch_adaptive"], out["hutch_adaptive_hvps"] = t.estimate, t.num_hvps
    t = S.hutchpp_trace(op, 30, seed=3)
    out["hutchpp"] = t.estimate
    d = S.spectral_density(op, num_probes=3, num_steps=15, seed=4)
    out["slq_nodes"], out["slq_weights"] = d.nodes, d.weights
    table = S.layer_curvature(model, loss_fn, data, k=2, lambda_min=True, distributed=distributed)
    out["layers"] = [(row["name"], row["eigenvalues"], row["lambda_min"], row["trace"]) for row in table]
    # Adam pre-conditioned sharpness and the tracker, if those modules are present in this tree.
    try:
        from curvature.optim import preconditioned_sharpness
    except ImportError:
        out["preconditioned"] = out["preconditioned_lookahead"] = None
    else:
        m2, _, _, _ = problem()
        opt = adam_after_one_step(m2, loss_fn, X, Y)
        r = preconditioned_sharpness(m2, loss_fn, data, opt, k=1, tol=1e-10,
                                     distributed=distributed)
        out["preconditioned"] = r.eigenvalues
        m2b, _, _, _ = problem()
        r = preconditioned_sharpness(m2b, loss_fn, data, torch.optim.Adam(m2b.parameters(), lr=1e-2), k=1, tol=1e-10,
                                     lookahead=True, distributed=distributed)  # P from the global gradient
        out["preconditioned_lookahead"] = r.eigenvalues
    try:
        from curvature.tracking import SharpnessTracker
    except ImportError:
        out["tracker"] = None
    else:
        m3, _, _, _ = problem()
        opt = adam_after_one_step(m3, loss_fn, X, Y)
        tracker = SharpnessTracker(loss_fn, every=1, k=1, tol=1e-10, distributed=distributed)
        row = tracker.step(m3, opt, data, step=0)
        out["tracker"] = {key: row[key] for key in ("sharpness", "preconditioned_sharpness", "loss", "converged")}
    return out


def run(rank: int, world: int, init_file: str, out_dir: str) -> None:
    with gloo_rank(rank, world, init_file, out_dir, timeout_s=60):
        model, loss_fn, X, Y = problem()
        data = shard(rank, X, Y)
        out = compute(model, loss_fn, data, X, Y)

        # A rank with no data at all (data=[]) still takes part; the result is that of the other shards.
        from curvature.operators import HessianOperator
        only0 = (X[:SHARDS[0]], Y[:SHARDS[0]]) if rank == 0 else []
        op = HessianOperator(model, loss_fn, only0)
        out["hv_rank1_empty"] = op.matmat(directions(op.shape[0]))

        # distributed=False: each rank on its own shard only (no collective may run: a hang would show it).
        op = HessianOperator(model, loss_fn, data, distributed=False)
        out["hv_local"] = op.matmat(directions(op.shape[0]))

        # DDP-wrapped model: the core unwraps it, so DDP's gradient hooks must not fire (and nothing hangs on
        # unequal shards); a normal backward through DDP afterwards shows the hook was live.
        from curvature.diagnostics import sharpness
        calls = {"n": 0}

        def counting_hook(state, bucket):
            calls["n"] += 1
            fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
            return fut.then(lambda f: f.value()[0] / world)

        m_ddp, _, _, _ = problem()
        ddp = nn.parallel.DistributedDataParallel(m_ddp)
        ddp.register_comm_hook(None, counting_hook)
        op = HessianOperator(ddp, loss_fn, data)
        out["ddp_hv"] = op.matmat(directions(op.shape[0]))
        out["ddp_vals"] = sharpness(ddp, loss_fn, data, k=2, tol=1e-10).eigenvalues
        out["ddp_hook_calls_during_curvature"] = calls["n"]
        out["ddp_grads_untouched"] = all(p.grad is None for p in ddp.parameters())
        xs = X[: SHARDS[0]] if rank == 0 else X[SHARDS[0]:]
        ys = Y[: SHARDS[0]] if rank == 0 else Y[SHARDS[0]:]
        loss_fn(ddp(xs), ys).backward()
        out["ddp_hook_calls_after_backward"] = calls["n"]

        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()


def run_nonfinite(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """Rank 1's shard has a NaN: every rank should raise (agreeing collectively), none should wait in a
    collective until the process-group timeout. Records what happened instead of raising."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=8))
    import time

    from curvature.operators import HessianOperator
    model, loss_fn, X, Y = problem()
    X = X.clone()
    X[-1, 0] = float("nan")
    t0 = time.monotonic()
    try:
        HessianOperator(model, loss_fn, shard(rank, X, Y))
        outcome = ("ok", "")
    except Exception as exc:  # noqa: BLE001
        outcome = (type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
    seconds = time.monotonic() - t0
    if outcome[0] == "FloatingPointError":
        time.sleep(3)  # a caller that catches the error and goes on (e.g. a tracker with on_error="warn")
    torch.save({"outcome": outcome, "seconds": seconds}, os.path.join(out_dir, f"rank{rank}.pt"))
    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass
