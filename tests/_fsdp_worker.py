"""Code run inside the 2 gloo processes of ``tests/test_fsdp.py``: FSDP2 ``fully_shard`` on CPU."""
from __future__ import annotations

import copy
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import lm_loss, transformer  # noqa: E402
from curvature.sharded import sharded_lanczos  # noqa: E402

SIZES = {0: (3, 2), 1: (1, 2)}  # unequal shards, the same number of batches on each rank

from _gloo import gloo_rank  # noqa: E402


def union():
    model, loss_fn, _ = transformer()
    g = torch.Generator().manual_seed(5)
    n = sum(sum(s) for s in SIZES.values())
    idx, y = torch.randint(0, 11, (n, 5), generator=g), torch.randint(0, 11, (n, 5), generator=g)
    return model, idx, y


def shard(rank: int, idx, y):
    lo = sum(sum(SIZES[r]) for r in range(rank))
    a, b = SIZES[rank]
    return [(idx[lo:lo + a], y[lo:lo + a]), (idx[lo + a:lo + a + b], y[lo + a:lo + a + b])]


class Checkpointed(torch.nn.Module):
    """Runs ``inner`` under non-reentrant activation checkpointing (recomputed in the backward)."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint
        return checkpoint(self.inner, x, use_reentrant=False)


def run(rank: int, world: int, init_file: str, out_dir: str) -> None:
    with gloo_rank(rank, world, init_file, out_dir, timeout_s=60):
        from torch.distributed.fsdp import fully_shard

        from curvature.sharded import ShardedHessianOperator
        out: dict = {}
        model, idx, y = union()
        data = shard(rank, idx, y)
        m32 = copy.deepcopy(model).float()
        mck = copy.deepcopy(model)
        mck.mlp = Checkpointed(mck.mlp)  # same parameters, same order, checkpointed MLP
        fully_shard(mck)
        fully_shard(model)
        fully_shard(m32)  # gets model's weights after its training step, below
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        lm_loss(model(idx[:2]), y[:2]).backward()  # a step of training first, so there is state to keep
        opt.step()
        with torch.no_grad():
            for p32, pck, p in zip(m32.parameters(), mck.parameters(), model.parameters()):
                p32.to_local().copy_(p.to_local())
                pck.to_local().copy_(p.to_local())
        before_opt = copy.deepcopy(opt.state_dict())
        before = [p.to_local().clone() for p in model.parameters()]
        grads = [p.grad for p in model.parameters()]
        rng = torch.get_rng_state()

        op = ShardedHessianOperator(model, lm_loss, data)
        out["n_local"], out["global_n"] = op.shape[0], op.global_n
        out["loss"] = op.loss
        out["eig64"], out["basis"] = sharded_lanczos(op, 3, 60)
        out["basis_bytes"] = out["basis"] * op.shape[0] * 8
        out["untouched"] = (all(torch.equal(a, p.to_local()) for a, p in zip(before, model.parameters()))
                            and all(p.grad is g for p, g in zip(model.parameters(), grads))
                            and torch.equal(rng, torch.get_rng_state()))
        after_opt = opt.state_dict()
        out["opt_untouched"] = all(torch.equal(torch.as_tensor(before_opt["state"][i][key]).to_local()
                                               if hasattr(before_opt["state"][i][key], "to_local") else
                                               torch.as_tensor(before_opt["state"][i][key]),
                                               torch.as_tensor(after_opt["state"][i][key]).to_local()
                                               if hasattr(after_opt["state"][i][key], "to_local") else
                                               torch.as_tensor(after_opt["state"][i][key]))
                                   for i in before_opt["state"] for key in before_opt["state"][i])
        out["theta_after_step"] = op.gather(op.parameter_vector()[:, None])[:, 0]
        V = op.random_block(2, 7)
        out["hv_global"] = op.gather(op.matmat(V))
        out["v_global"] = op.gather(V)
        opck = ShardedHessianOperator(mck, lm_loss, data)  # FSDP + activation checkpointing
        out["hv_checkpointed"] = opck.gather(opck.matmat(V))
        from curvature.optim import PreconditionedHessianOperator  # dispatches to the sharded operator
        pop = PreconditionedHessianOperator(model, lm_loss, data, opt, lookahead=False)
        out["precond_dispatch"] = type(pop).__name__
        out["precond_eig"], _ = sharded_lanczos(pop, 1, 40)
        out["P_local"] = pop.preconditioner.numel()
        op32 = ShardedHessianOperator(m32, lm_loss, data)
        out["eig32"], _ = sharded_lanczos(op32, 3, 60)
        # The package's own solver, once it takes inner products through the hooks (tracker's solvers/_common).
        calls = {"dot": 0}
        orig_dot = op.dot

        def counting_dot(X, Y):
            calls["dot"] += 1
            return orig_dot(X, Y)
        op.dot = counting_dot
        from curvature.solvers import lanczos
        try:
            r = lanczos(op, 3, tol=1e-8)
            out["solver_eig"] = r.eigenvalues if calls["dot"] else None
        except Exception as exc:  # noqa: BLE001 - a solver without the hooks may fail on local vectors
            out["solver_eig"] = None if not calls["dot"] else f"{type(exc).__name__}: {exc}"
        # HessianOperator(fsdp_model) dispatches to the sharded operator, so sharpness() and the tracker work
        from curvature.operators import HessianOperator
        out["dispatch"] = type(HessianOperator(model, lm_loss, data)).__name__
        if calls["dot"]:
            from curvature.diagnostics import sharpness
            out["sharpness"] = sharpness(model, lm_loss, data, k=1, tol=1e-8).eigenvalues
            try:
                from curvature.tracking import SharpnessTracker
                tracker = SharpnessTracker(lm_loss, every=1, k=1, tol=1e-8)  # Adam: λ(H) and λ(P⁻¹H), next step's P
                row = tracker.step(model, opt, data, step=0)
                out["tracker_row"] = {k: row[k] for k in ("sharpness", "loss", "error", "preconditioned_sharpness",
                                                          "preconditioner") if k in row}
            except Exception as exc:  # noqa: BLE001
                out["tracker_row"] = f"{type(exc).__name__}: {exc}"
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
