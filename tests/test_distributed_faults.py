"""Ranks agree, and only rank 0 writes (issue #15.14, #15.15): 2 gloo processes on CPU, unequal shards (7, 13).

* the tracker's CSV / JSON-lines / TensorBoard / logging sinks, given the same paths on both ranks, are written
  once (rank 0): exactly one row per step, one TensorBoard event file, no log lines on rank 1;
* ``find_critical_lr`` returns the same ``η_c`` on both ranks, equal to the single-process search on the
  concatenated shards; ``PersistentCatapultWarmup`` and ``CurvatureAwareWarmup`` fed each rank's own loss set the
  same learning rate on both ranks.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _dist_faults_worker as W  # noqa: E402
from test_distributed import _spawn  # noqa: E402 - the one spawn-with-timeout helper

pytestmark = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    path = tmp_path_factory.mktemp("dist_faults")
    return path, _spawn(path, timeout=240.0, fn=W.run)


def test_file_tensorboard_and_logging_sinks_write_on_rank_zero_only(ranks):
    from curvature.rows import read_rows

    path, (r0, r1) = ranks
    assert r0["sharpness"] == r1["sharpness"]  # the values are global: identical on every rank
    for name in ("rows.csv", "rows.jsonl"):
        rows = read_rows(path / "shared" / name)
        assert [r["step"] for r in rows] == [0, 1, 2], name
        assert [r["sharpness"] for r in rows] == pytest.approx(r0["sharpness"], rel=1e-12)
    events = [f for f in os.listdir(path / "shared" / "tb") if f.startswith("events.")]
    assert len(events) == 1, events
    assert r0["log_records"] == 3 and r1["log_records"] == 0


def test_find_critical_lr_is_global_and_equal_on_both_ranks(ranks):
    from curvature.warmup import find_critical_lr

    _, (r0, r1) = ranks
    model, loss_fn, X, Y = W.problem()
    single = find_critical_lr(model, loss_fn, (X, Y), W.sgd, lr_target=50.0, delta=0.1)
    assert r0["lr_c"] == r1["lr_c"] and r0["bracket"] == r1["bracket"]
    assert r0["lr_c"] == pytest.approx(single.lr_c, rel=1e-9)
    assert r0["loss0"] == pytest.approx(single.loss0, rel=1e-12)


def test_warmups_set_the_same_lr_on_every_rank(ranks):
    _, (r0, r1) = ranks
    assert r0["persistent_lrs"] == r1["persistent_lrs"]
    assert r0["aware_lrs"] == r1["aware_lrs"] and r0["aware_reference"] == r1["aware_reference"]
