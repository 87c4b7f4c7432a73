"""Ranks fail together (#15.12/13), with 2 real gloo processes on CPU.

* Rank 1 raises a simulated out-of-memory error in its 3rd HVP of a Lanczos solve (exact and
  finite-difference routes): rank 1 raises its own error, rank 0 a ``RemoteRankError`` quoting it, both within
  seconds (the group timeout is 20 s; without the fix rank 0 waits in the all-reduce until it).
* ``SharpnessTracker(on_error="warn")``: both ranks warn, write an error row and reach the training step's
  next all-reduce with the right value (without the fix gloo aborts on mismatched sizes).
* Models with different parameter counts, and differing Adam state (``assert_ranks_agree``): the same clear
  ``ValueError`` on both ranks instead of a gloo abort.
* Afterwards the process group still works (a solve and an all-reduce).
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _rank_failure_worker as W  # noqa: E402
from test_distributed import _spawn  # noqa: E402

pytestmark = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")


@pytest.fixture(scope="module")
def outs(tmp_path_factory):
    return _spawn(tmp_path_factory.mktemp("rankfail"), timeout=120, fn=W.run)


@pytest.mark.parametrize("method", ["auto", "finite_difference"])
def test_a_failing_hvp_fails_every_rank_at_once(outs, method):
    (k0, m0, s0), (k1, m1, s1) = outs[0][f"solve_{method}"], outs[1][f"solve_{method}"]
    assert (k1, m1) == ("RuntimeError", "CUDA out of memory (simulated) in the HVP")
    assert k0 == "RemoteRankError" and "rank 1 failed" in m0 and "out of memory (simulated)" in m0, m0
    assert s0 < 10 and s1 < 10, (s0, s1)  # not the 20 s group timeout


def test_tracker_warns_on_both_ranks_and_training_goes_on(outs):
    if outs[0]["tracker"] is None:
        pytest.skip("no SharpnessTracker in this tree")
    for rank, out in enumerate(outs):
        t = out["tracker"]
        assert t["error"] and t["warned"], (rank, t)
        assert t["after"] == 3.0  # 1 + 2: the next all-reduce of training is intact
    assert "out of memory (simulated)" in outs[0]["tracker"]["error"]


def test_mismatched_models_and_optimizer_state_give_a_clear_error_on_every_rank(outs):
    for out in outs:
        kind, msg, sec = out["mismatch"]
        assert kind == "ValueError" and "models differ" in msg, msg
        kind, msg, _ = out["adam_mismatch"]
        assert kind == "ValueError" and "adam_preconditioner" in msg and "num_params" not in msg, msg
        assert out["adam_same"][0] == "ok"


def test_group_is_healthy_afterwards(outs):
    assert outs[0]["healthy_lambda"] == outs[1]["healthy_lambda"] > 0
    # the finite-difference route under data parallelism: same all-reduce, same global Hessian
    assert outs[0]["healthy_lambda_fd"] == outs[1]["healthy_lambda_fd"]
    assert abs(outs[0]["healthy_lambda_fd"] - outs[0]["healthy_lambda"]) <= 1e-8 * outs[0]["healthy_lambda"]
    assert outs[0]["final_allreduce"] == outs[1]["final_allreduce"] == 2.0
