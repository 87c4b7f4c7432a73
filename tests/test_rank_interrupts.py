"""A Ctrl-C on one rank must not hang the others (#26.1), with 2 real gloo processes on CPU.

Rank 1 is interrupted (a real SIGINT → ``KeyboardInterrupt``, or ``sys.exit`` → ``SystemExit``) inside a
collective step: a Hessian-vector product of a Lanczos solve, the operator's construction, GI-Adam's gradient,
the critical-lr search, ``SharpnessTracker.step`` with ``on_error="warn"`` (a remote interrupt is raised, not
warned about). Rank 1 re-raises its own interrupt; rank 0 raises a ``RemoteRankError`` naming rank 1
and the cause within seconds, whether rank 1 lingers (cleanup, a handler) or goes straight on to the training
loop's next all-reduce, which then gives the right value on both ranks (the group is still in step). Without the
fix rank 0 waits in the all-reduce until the group timeout, or gloo aborts the process on mismatched sizes.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _interrupt_rank_worker as W  # noqa: E402
from test_distributed import _spawn  # noqa: E402 - the one spawn-with-timeout helper

pytestmark = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

# (interrupt, where, whether rank 1 lingers before the next collective)
CASES = [(k, "hvp", linger) for k in ("KeyboardInterrupt", "SystemExit") for linger in (True, False)] + [
    ("KeyboardInterrupt", "build", True), ("SystemExit", "build", False), ("KeyboardInterrupt", "gi_adam", False),
    ("KeyboardInterrupt", "critical_lr1", True), ("KeyboardInterrupt", "critical_lr3", False),
    ("KeyboardInterrupt", "tracker", False)]


@pytest.fixture(scope="module")
def outs(tmp_path_factory):
    return _spawn(tmp_path_factory.mktemp("rankint"), timeout=150, fn=W.run)


@pytest.mark.parametrize("kind,where,linger", CASES)
def test_an_interrupted_rank_stops_the_others_at_once(outs, kind, where, linger):
    k0, m0, caught0, after0, _ = outs[0][kind, where, linger]
    k1, m1, _, after1, interrupted1 = outs[1][kind, where, linger]
    latency = caught0 - interrupted1  # rank 1 interrupted → rank 0 raising (one machine, one clock)
    assert k1 == kind, (k1, m1)  # the interrupted rank re-raises its own interrupt
    if kind == "SystemExit":
        assert m1 == "3"
    assert k0 == "RemoteRankError" and "rank 1 was interrupted" in m0 and kind in m0, (k0, m0)
    assert 0 <= latency < (W.LINGER_S - 1 if linger else 10), latency  # not waiting for rank 1 nor the 15 s timeout
    assert after0 == after1 == 3.0  # the next collective of training: both ranks in step


def test_latency_figures(outs):
    lat = sorted(outs[0][c][2] - outs[1][c][4] for c in CASES)
    print(f"\nrank 1 interrupted -> rank 0 raising: median {lat[len(lat) // 2]:.3f} s, max {lat[-1]:.3f} s "
          f"over {len(lat)} scenarios")


def test_group_is_healthy_afterwards(outs):
    assert outs[0]["healthy"] == outs[1]["healthy"] > 0
