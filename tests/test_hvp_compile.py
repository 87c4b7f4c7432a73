"""``compile=True``: HVPs by a ``torch.compile``-d ``jvp(grad(L))``, exact against the dense float64 reference, off by
default, with its compile time on the operator; and the default route's HVPs are unchanged by the wrapper's cuts."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import curvature as cv
from conftest import dense_hessian_fd, mlp_mse, rel_err


def test_compiled_hvp_is_exact_and_leaves_the_model_alone():
    # mlp_mse: a loss with floating-point targets, whose jvp made "efficient zero" tangents that crashed the
    # compiled code (a segfault on torch 2.13) before the targets entered the jvp as zero-tangent primals.
    model, loss_fn, data = mlp_mse()
    before = [p.detach().clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    op = cv.HessianOperator(model, loss_fn, data, compile=True)
    assert op.method == "forward_over_reverse" and op.engine.compiled
    assert op.compile_seconds is not None and op.compile_seconds > 0
    H = op.to_dense()
    assert rel_err(H, dense_hessian_fd(model, loss_fn, data)) < 1e-7
    plain = cv.HessianOperator(model, loss_fn, data).to_dense()
    assert rel_err(H, plain) < 1e-12  # the same matrix as the uncompiled route, up to rounding
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    # a second operator on the same model and loss reuses the compiled code (a tracker's next row)
    again = cv.HessianOperator(model, loss_fn, data, compile=True)
    assert again.compile_seconds < op.compile_seconds
    assert cv.HessianOperator(model, loss_fn, data).compile_seconds is None  # off by default


@pytest.mark.parametrize("kwargs, error, words", [
    ({"compile": "yes"}, TypeError, "compile must be True or False"),
    ({"compile": True, "method": "reverse_over_reverse"}, ValueError, "reverse_over_reverse"),
    ({"compile": True, "method": "finite_difference"}, ValueError, "finite_difference"),
])
def test_compile_option_refuses_what_it_cannot_do(kwargs, error, words):
    model, loss_fn, data = mlp_mse()
    with pytest.raises(error, match=words):
        cv.HessianOperator(model, loss_fn, data, **kwargs)


def test_default_route_equals_raw_kept_graph_autograd_bitwise():
    # the wrapper's cuts (in-place division, one multiply call, no autocast switching when it is already off)
    # change no bit: (Hv · n) / n exactly as before, with Hv from one backward through the kept graph
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 3))
    x, y = torch.randn(12, 6), torch.randint(0, 3, (12,))
    loss_fn = nn.CrossEntropyLoss()
    op = cv.HessianOperator(model, loss_fn, (x, y))
    params = list(model.parameters())
    g = torch.autograd.grad(loss_fn(model(x), y), params, create_graph=True)
    v = torch.randn(op.shape[0])
    raw = torch.autograd.grad(g, params, [t.view_as(p) for t, p in zip(torch.split(v, op._numels), params)],
                              retain_graph=True)
    expected = torch.cat([(h * 12.0).reshape(-1) for h in raw]) / 12
    assert torch.equal(op.matvec(v), expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast switched off for the HVP, and back on after
        assert torch.equal(op.matvec(v), expected)
        assert torch.is_autocast_enabled("cpu")


def test_tracker_rows_carry_the_compile_time():
    from curvature import SharpnessTracker
    model, loss_fn, data = mlp_mse()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    rows = {}
    for compile_ in (False, True):
        tracker = SharpnessTracker(loss_fn, every=1, tol=1e-8, compile=compile_)
        rows[compile_] = tracker.step(model, opt, data, step=0)
    assert rows[False]["compile_seconds"] is None and rows[False]["hvp_route"] == "exact"
    assert rows[True]["compile_seconds"] is not None and rows[True]["compile_seconds"] >= 0
    assert rows[True]["hvp_route"] == "exact" and "compile" in rows[True]["hvp_route_note"]
    assert rows[True]["sharpness"] == pytest.approx(rows[False]["sharpness"], rel=1e-9)
