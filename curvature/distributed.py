"""Data-parallel curvature: each rank holds a shard of the data; sums are all-reduced.

With shards b on rank r, the global mean loss is L = Σ_r Σ_b n_b L_b / Σ_r Σ_b n_b, so a rank computes the
local weighted sum S_r = Σ_b n_b ∇²L_b V and the operator returns (Σ_r S_r) / N after one all-reduce per
block. Every rank then holds the same product, and solvers seeded alike run in lock-step with identical
iterates. This module depends only on ``torch.distributed``.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = ["resolve_process_group", "all_reduce_sum", "world_size", "collective_device"]


def resolve_process_group(distributed: bool | None, process_group: Any = None) -> Any | None:
    """The process group to all-reduce over, or ``None`` for a single-process computation.

    ``distributed=None`` (auto): use it when ``torch.distributed`` is initialised with more than one process.
    ``False``: never. ``True``: require an initialised process group.
    """
    if distributed is False:
        return None
    ready = dist.is_available() and dist.is_initialized()
    if distributed is True and not ready:
        raise RuntimeError("distributed=True but torch.distributed is not initialised "
                           "(call torch.distributed.init_process_group first, e.g. under torchrun)")
    if not ready:
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    if distributed is None and dist.get_world_size(group) == 1:
        return None
    return group


def world_size(group: Any | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def all_reduce_sum(t: torch.Tensor, group: Any | None) -> torch.Tensor:
    """Sum ``t`` over the ranks of ``group`` (in place; returns ``t``). No-op for ``group=None``."""
    if group is not None:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def collective_device(group: Any | None, preferred: torch.device | None = None) -> torch.device:
    """Where a small tensor for a collective must live: ``preferred`` if given, else CUDA for NCCL, else CPU."""
    if preferred is not None:
        return preferred
    if group is not None and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
