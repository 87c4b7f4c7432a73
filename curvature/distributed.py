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

__all__ = ["resolve_process_group", "all_reduce_sum", "world_size", "collective_device", "RemoteRankError",
           "raise_together", "sum_or_fail", "describe", "is_interrupt", "fingerprint", "ranks_disagree",
           "disagreeing", "assert_ranks_agree"]


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


class RemoteRankError(RuntimeError):
    """Another rank of the process group failed in a collective step; its error message is quoted.

    ``ranks`` lists the ranks that failed; ``interrupted`` is true when one of them was stopped by a
    ``KeyboardInterrupt`` / ``SystemExit`` (a Ctrl-C, a signal handler, ``sys.exit``) rather than an error.
    """

    def __init__(self, message: str, ranks: tuple[int, ...] = (), interrupted: bool = False) -> None:
        super().__init__(message)
        self.ranks = tuple(ranks)
        self.interrupted = bool(interrupted)


def describe(error: BaseException) -> str:
    """``"Type: first line"`` of an exception (``"KeyboardInterrupt"`` when it has no message)."""
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def is_interrupt(error: BaseException | None) -> bool:
    """A ``BaseException`` that is not an ``Exception``: ``KeyboardInterrupt``, ``SystemExit``, ``GeneratorExit``."""
    return error is not None and not isinstance(error, Exception)


def _gather_messages(error: BaseException | None, group: Any) -> list[tuple[str, bool] | None]:
    """Every rank's (error message, interrupted?) (``None`` where it did not fail); one small collective, only
    on failure."""
    mine = None if error is None else (describe(error), is_interrupt(error))
    messages: list[tuple[str, bool] | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(messages, mine, group=group)
    return messages


def raise_together(error: BaseException | None, group: Any, what: str, hint: str = "") -> None:
    """Call on every rank once a collective flag says some rank failed: the failing ranks raise their own
    error (an interrupted rank its own ``KeyboardInterrupt`` / ``SystemExit``), the others a
    :class:`RemoteRankError` naming the failed rank(s) and quoting the first message (``hint``, a likely cause,
    is added for errors, not for interrupts)."""
    messages = _gather_messages(error, group)
    if error is not None:
        raise error
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    ranks = tuple(r for r, _ in failed)
    names = ", ".join(str(r) for r in ranks)
    first, interrupted = failed[0][1] if failed else ("unknown error", False)
    if interrupted:
        raise RemoteRankError(f"rank {names} was interrupted ({first}: a Ctrl-C, a signal or sys.exit there) "
                              f"{what}; this rank stops too instead of waiting for it", ranks, True)
    raise RemoteRankError(f"rank {names} failed {what}{f' ({hint})' if hint else ''}: {first}", ranks,
                          any(m[1] for _, m in failed))


def sum_or_fail(compute: Any, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                group: Any | None, what: str) -> torch.Tensor:
    """``all_reduce_sum(compute())``, such that an exception on any rank makes every rank raise.

    The local result travels with one extra element, a failure count, in the same all-reduce: a rank whose
    ``compute`` raises contributes zeros and 1. If the count is non-zero, every rank raises together (see
    :func:`raise_together`) instead of the others waiting in a collective the failed rank never reaches.
    ``KeyboardInterrupt`` and ``SystemExit`` count as failures too: the interrupted rank tells the others
    first, then re-raises its own interrupt, and the process group stays in step for the next collective.
    """
    if group is None:
        return compute()
    error: BaseException | None = None
    try:
        local = compute()
    except BaseException as exc:  # noqa: BLE001 - a Ctrl-C too: re-raised below, on every rank, after telling them
        error = exc
        local = torch.zeros(shape, dtype=dtype, device=device)
    flag = torch.ones(1, dtype=dtype, device=device) if error is not None else torch.zeros(1, dtype=dtype, device=device)
    buf = torch.cat([local.reshape(-1).to(dtype=dtype, device=device), flag])
    all_reduce_sum(buf, group)
    if float(buf[-1].item()) > 0:
        raise_together(error, group, what)
    return buf[:-1].view(shape)


def fingerprint(*items: Any) -> int:
    """A small integer (< 2**20) identifying ``items`` (ints, strings, shapes, bytes): equal on every rank
    iff the items agree (up to CRC collisions)."""
    import zlib
    h = 0
    for item in items:
        data = item if isinstance(item, bytes) else repr(item).encode()
        h = zlib.crc32(data, h)
    return h & 0xFFFFF


def ranks_disagree(values: torch.Tensor) -> torch.Tensor:
    """For small integer ``values`` (m,) per rank (float64, exact), the pair ``[Σ c, Σ c²]`` per value, to be
    summed in one all-reduce; :func:`disagreeing` then tells which values differ between ranks."""
    return torch.stack([values, values * values], dim=1).reshape(-1)


def disagreeing(summed: torch.Tensor, world: int) -> list[int]:
    """Indices of the values whose ``R·Σc² ≠ (Σc)²`` (not all equal; Cauchy–Schwarz with equality iff equal)."""
    pairs = summed.reshape(-1, 2)
    return [i for i, (s, s2) in enumerate(pairs.tolist()) if world * s2 != s * s]


def assert_ranks_agree(group: Any | None, **items: Any) -> None:
    """Check in one all-reduce that ``items`` (name → anything with a stable ``repr``, or bytes / a tensor,
    compared by content) are the same on every rank of ``group``; every rank raises the same ``ValueError``
    naming the items that differ. No-op without a group. Call it on every rank (it is a collective).

    Example (the Adam state of :class:`~curvature.optim.PreconditionedHessianOperator`):
    ``assert_ranks_agree(op.inner.process_group, adam_preconditioner=P)``.
    """
    if group is None or not items:
        return
    def content(x: Any) -> Any:
        return x.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes() if isinstance(
            x, torch.Tensor) and x.numel() else x
    values = torch.tensor([float(fingerprint(content(v))) for v in items.values()], dtype=torch.float64)
    summed = ranks_disagree(values).to(collective_device(group))
    all_reduce_sum(summed, group)
    bad = [list(items)[i] for i in disagreeing(summed.cpu(), world_size(group))]
    if bad:
        raise ValueError(f"these differ between the ranks of the process group: {', '.join(bad)}. Every rank must "
                         "measure the same model and optimizer state (e.g. the replicas of one DDP job)")
