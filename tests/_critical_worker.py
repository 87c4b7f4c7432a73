"""Code run inside the 2 gloo processes of the distributed tests in ``tests/test_critical.py``.

Each rank measures λ_c on its own shard of the data (DDP: replicated parameters; FSDP2: sharded ones) and, as the
reference, the single-process λ_c on the union of the shards with the same update (``distributed=False``).
"""
from __future__ import annotations

import copy
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _gloo import gloo_rank  # noqa: E402
from conftest import lm_loss, transformer  # noqa: E402

DT = torch.float64
SHARDS = (7, 13)
FSDP_SIZES = {0: (3, 2), 1: (1, 2)}  # the same number of batches on each rank (each is an FSDP forward)


def _summary(res) -> dict:
    return {"critical_lr": res.critical_lr, "bracket": res.bracket, "forward_passes": res.forward_passes,
            "loss": res.loss, "history": res.history, "converged": res.converged, "world_size": res.world_size}


def _ddp_case(rank: int, out: dict) -> None:
    from curvature import critical_sharpness
    from curvature.distributed import RemoteRankError
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)
    X, Y = torch.randn(sum(SHARDS), 5, dtype=DT), torch.randint(0, 3, (sum(SHARDS),))
    lo = sum(SHARDS[:rank])
    hi = lo + SHARDS[rank]
    mine = [(X[lo:lo + 5], Y[lo:lo + 5]), (X[lo + 5:hi], Y[lo + 5:hi])] if rank == 1 else (X[lo:hi], Y[lo:hi])
    ddp = nn.parallel.DistributedDataParallel(model)
    for name, make in (("Adam", lambda p: torch.optim.Adam(p, lr=1e-2)),
                       ("RMSprop", lambda p: torch.optim.RMSprop(p, lr=1e-3))):
        opt = make(model.parameters())
        for _ in range(2):  # state, on the full data (the same on every rank)
            opt.zero_grad()
            F.cross_entropy(model(X), Y).backward()
            opt.step()
        opt.zero_grad()
        F.cross_entropy(model(X), Y).backward()  # the global gradient on every rank, as DDP would leave it
        before = [p.detach().clone() for p in model.parameters()]
        res = critical_sharpness(ddp, F.cross_entropy, mine, opt, rtol=1e-3)
        ref = critical_sharpness(model, F.cross_entropy, (X, Y), opt, rtol=1e-3, distributed=False)
        out[f"ddp_{name}"] = _summary(res)
        out[f"ref_{name}"] = _summary(ref)
        out[f"untouched_{name}"] = all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    # a rank whose loss fails: every rank raises instead of waiting in the all-reduce
    calls = {"n": 0}

    def failing(out_, y):
        calls["n"] += 1
        if rank == 1 and calls["n"] == 3:
            raise RuntimeError("injected failure")
        return F.cross_entropy(out_, y)
    try:
        critical_sharpness(ddp, failing, mine if rank == 0 else mine[0], opt)
        out["fail_together"] = "no error"
    except RemoteRankError as exc:
        out["fail_together"] = f"remote: {exc}"
    except RuntimeError as exc:
        out["fail_together"] = f"own: {exc}"


def _fsdp_case(rank: int, out: dict) -> None:
    from torch.distributed.fsdp import fully_shard

    from curvature import critical_sharpness
    model, _, _ = transformer()
    g = torch.Generator().manual_seed(5)
    n = sum(sum(s) for s in FSDP_SIZES.values())
    idx, y = torch.randint(0, 11, (n, 5), generator=g), torch.randint(0, 11, (n, 5), generator=g)
    lo = sum(sum(FSDP_SIZES[r]) for r in range(rank))
    a, b = FSDP_SIZES[rank]
    mine = [(idx[lo:lo + a], y[lo:lo + a]), (idx[lo + a:lo + a + b], y[lo + a:lo + a + b])]
    reference = copy.deepcopy(model)
    fully_shard(model)
    for name, make in (("SGD", lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9)),
                       ("RMSprop", lambda p: torch.optim.RMSprop(p, lr=1e-3))):
        opt = make(model.parameters())
        opt.zero_grad()
        lm_loss(model(idx[:3]), y[:3]).backward()  # the same batch on every rank: FSDP averages equal gradients
        before = [p.to_local().clone() for p in model.parameters()]
        grads = [p.grad for p in model.parameters()]
        res = critical_sharpness(model, lm_loss, mine, opt, rtol=1e-3)
        out[f"fsdp_{name}"] = _summary(res)
        out[f"fsdp_untouched_{name}"] = (all(torch.equal(a, p.to_local()) for a, p in zip(before, model.parameters()))
                                         and all(p.grad is g for p, g in zip(model.parameters(), grads))
                                         and not opt.state)
        # the reference: the unsharded model with the gathered parameters and gradients, on the union of the data
        with torch.no_grad():
            for p_ref, p in zip(reference.parameters(), model.parameters()):
                p_ref.copy_(p.full_tensor())
                p_ref.grad = p.grad.full_tensor().clone()
        ref_opt = make(reference.parameters())
        ref = critical_sharpness(reference, lm_loss, [(idx, y)], ref_opt, rtol=1e-3, distributed=False)
        out[f"fsdp_ref_{name}"] = _summary(ref)


def run(rank: int, world: int, init_file: str, out_dir: str) -> None:
    with gloo_rank(rank, world, init_file, out_dir, timeout_s=60):
        out: dict = {}
        _ddp_case(rank, out)
        _fsdp_case(rank, out)
        dist.barrier()
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
