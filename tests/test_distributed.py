"""Data-parallel curvature with real processes: 2 ranks, gloo on CPU, unequal shards (7 and 13 samples).

One spawn runs every distributed check (see ``_dist_worker.py``); the parent compares with single-process
references over the union of the shards (float64):

* HVPs, loss, gradient, and the eigenvalues of every solver equal the single-process ones to 1e-10 relative
  (the only difference is the order of floating-point sums: per-shard sums + one all-reduce);
* every rank gets bitwise-identical results (lock-step solvers, same stopping decisions);
* a rank with ``data=[]`` still takes part; ``distributed=False`` gives the local shard's Hessian;
* a DDP-wrapped model gives the same curvature and none of DDP's gradient hooks fire;
* micro-batching, trace estimators, SLQ and the per-layer table agree with their single-process values;
* ``preconditioned_sharpness`` and ``SharpnessTracker`` too, when those modules are in the tree.
"""
from __future__ import annotations

import math
import os
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _dist_worker as W  # noqa: E402
from conftest import dense_hessian_fd, rel_err  # noqa: E402

pytestmark = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

WORLD = 2
TOL = 1e-10
# Keys whose values are local by design (not expected to match across ranks).
LOCAL_KEYS = {"hv_local"}


def _spawn(tmp_path, timeout: float = 150.0, fn=W.run) -> list[dict]:
    init_file = str(tmp_path / "init")
    out_dir = str(tmp_path)
    ctx = mp.start_processes(fn, args=(WORLD, init_file, out_dir), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise TimeoutError(f"distributed workers did not finish within {timeout:.0f} s (hang?)")
    except Exception:
        errors = [p for p in os.listdir(out_dir) if p.startswith("error")]
        details = "\n".join(open(os.path.join(out_dir, p)).read() for p in errors)
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
        raise AssertionError(f"distributed run failed:\n{details}") from None
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


def _assert_identical(a, b, key):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"{key} differs across ranks"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), key
        for k in a:
            _assert_identical(a[k], b[k], f"{key}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), key
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_identical(x, y, f"{key}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), key
    else:
        assert a == b, f"{key} differs across ranks: {a!r} vs {b!r}"


def _close(a, b, key, tol=TOL, scale=0.0):
    """Relative closeness; ``scale`` floors the denominator (eigenvalues near 0 are compared to ‖H‖)."""
    if a is None or b is None:
        assert a is None and b is None, key
    elif isinstance(a, torch.Tensor):
        err = float((a - b).norm()) / max(float(b.norm()), scale, 1e-300)
        assert err <= tol, f"{key}: relative error {err:.2e} > {tol:.0e}"
    elif isinstance(a, dict):
        for k in a:
            _close(a[k], b[k], f"{key}.{k}", tol, scale)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), key
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{key}[{i}]", tol, scale)
    elif isinstance(a, float):
        assert abs(a - b) <= tol * max(abs(b), scale, 1e-300), f"{key}: {a!r} vs {b!r}"
    else:
        assert a == b, f"{key}: {a!r} vs {b!r}"


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory):
    return _spawn(tmp_path_factory.mktemp("dist"))


@pytest.fixture(scope="module")
def reference():
    model, loss_fn, X, Y = W.problem()
    ref = W.compute(model, loss_fn, (X, Y), X, Y, distributed=False)
    H = dense_hessian_fd(model, loss_fn, (X, Y))
    return ref, H


def test_ranks_are_bitwise_identical(dist_results):
    r0, r1 = dist_results
    assert r0.keys() == r1.keys()
    for key in r0:
        if key not in LOCAL_KEYS:
            _assert_identical(r0[key], r1[key], key)


def test_distributed_equals_single_process_over_union(dist_results, reference):
    ref, H = reference
    out = dist_results[0]
    assert out["num_samples"] == sum(W.SHARDS)
    for key in ("hv", "gradient", "loss", "lobpcg_vals", "lanczos_vals", "power_vals", "bottom_vals",
                "hv_micro", "hutch", "hutch_samples", "hutch_adaptive", "hutchpp", "slq_weights",
                "slq_nodes", "preconditioned", "preconditioned_lookahead", "tracker"):
        _close(out[key], ref[key], key)
    for row, ref_row in zip(out["layers"], ref["layers"], strict=True):  # λ_min of a block can be ~0
        _close(row, ref_row, f"layer {row[0]}", scale=abs(ref_row[1][0]))
    assert out["hutch_adaptive_hvps"] == ref["hutch_adaptive_hvps"] < 160  # it stopped, at the same point
    # eigenvectors up to sign
    overlap = (out["lobpcg_vecs"] * ref["lobpcg_vecs"]).sum(0).abs()
    assert torch.allclose(overlap, torch.ones_like(overlap), atol=1e-8)
    # and the union's dense Hessian (central differences, ~1e-8 accurate) agrees
    evals = torch.linalg.eigvalsh(0.5 * (H + H.T))
    assert rel_err(out["lobpcg_vals"], evals.flip(0)[:2]) < 1e-6
    assert abs(float(out["bottom_vals"][0]) - float(evals[0])) < 1e-6 * float(evals.abs().max())
    assert rel_err(out["hv"], H @ W.directions(H.shape[0])) < 1e-6


def test_unweighted_average_would_differ(reference):
    """The shards are unequal, so the check above would catch an unweighted mean of per-rank Hessians."""
    model, loss_fn, X, Y = W.problem()
    from curvature.operators import HessianOperator
    V = W.directions(reference[1].shape[0])
    parts = [HessianOperator(model, loss_fn, W.shard(r, X, Y)).matmat(V) for r in range(WORLD)]
    assert rel_err(sum(parts) / WORLD, reference[0]["hv"]) > 1e-3


def test_empty_rank_and_local_opt_out(dist_results):
    from curvature.operators import HessianOperator
    model, loss_fn, X, Y = W.problem()
    n0 = W.SHARDS[0]
    only0 = HessianOperator(model, loss_fn, (X[:n0], Y[:n0]))
    V = W.directions(only0.shape[0])
    for rank in range(WORLD):
        _close(dist_results[rank]["hv_rank1_empty"], only0.matmat(V), "hv_rank1_empty")
        local = HessianOperator(model, loss_fn, W.shard(rank, X, Y)).matmat(V)
        assert torch.equal(dist_results[rank]["hv_local"], local)


def test_ddp_wrapped_model(dist_results):
    for out in dist_results:
        assert torch.equal(out["ddp_hv"], out["hv"])
        _close(out["ddp_vals"], out["lobpcg_vals"], "ddp_vals")
        assert out["ddp_hook_calls_during_curvature"] == 0
        assert out["ddp_grads_untouched"]
        assert out["ddp_hook_calls_after_backward"] > 0  # the hook was live: curvature just never used it


def test_optional_modules_were_covered(dist_results):
    """Say in the test log whether preconditioned_sharpness / the tracker were exercised in this tree."""
    out = dist_results[0]
    missing = [k for k in ("preconditioned", "tracker") if out[k] is None]
    if missing:
        pytest.skip(f"not in this tree yet, so not tested distributed: {missing}")


def test_nonfinite_shard_fails_on_every_rank_without_waiting(tmp_path):
    outs = _spawn(tmp_path, timeout=60, fn=W.run_nonfinite)
    assert outs[1]["outcome"][0] == "FloatingPointError"  # the rank whose shard has the NaN
    for rank, out in enumerate(outs):  # every rank raises at once, with our error, not a transport failure
        kind, message = out["outcome"]
        assert kind != "ok" and "gloo" not in message and "Connection closed" not in message, (rank, kind, message)
        assert out["seconds"] < 2, f"rank {rank} waited {out['seconds']:.1f} s"
