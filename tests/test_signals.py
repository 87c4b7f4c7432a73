"""Per-step signals (curvature.signals) against dense float64 references: batch sharpness, update curvature,
predicted vs actual loss change, Adam's pre-conditioned counterparts, next_update vs a real optimizer step."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import dense_hessian_fd
from curvature.operators import HessianOperator
from curvature.optim import PreconditionedHessianOperator
from curvature.signals import (GraphHessianOperator, batch_sharpness, loss_at, next_update,
                               preconditioned_batch_sharpness, step_signals, update_sharpness)
from curvature.tracking import SharpnessTracker


def _problem(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    X, Y = torch.randn(32, 4, dtype=torch.float64), torch.randn(32, 2, dtype=torch.float64)
    return model, F.mse_loss, (X, Y)


def _flat_grad(model, loss_fn, batch):
    params = list(model.parameters())
    g = torch.autograd.grad(loss_fn(model(batch[0]), batch[1]), params)
    return torch.cat([t.reshape(-1) for t in g])


def test_batch_sharpness_and_update_curvature_match_the_dense_hessian():
    model, loss_fn, batch = _problem()
    H = dense_hessian_fd(model, loss_fn, batch)
    g = _flat_grad(model, loss_fn, batch)
    op = HessianOperator(model, loss_fn, batch)
    assert batch_sharpness(op) == pytest.approx(float(g @ H @ g / (g @ g)), rel=1e-8)
    d = torch.randn(g.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    P = torch.rand(g.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(2)) + 0.5
    out = update_sharpness(op, d, P)
    assert out["update_sharpness"] == pytest.approx(float(d @ H @ d / (d @ d)), rel=1e-8)
    assert out["predicted_loss_change"] == pytest.approx(float(g @ d + 0.5 * d @ H @ d), rel=1e-8)
    assert out["preconditioned_update_sharpness"] == pytest.approx(float(d @ H @ d / (d @ (P * d))), rel=1e-8)
    u = g / P
    assert preconditioned_batch_sharpness(op, P) == pytest.approx(float(u @ H @ u / (g @ u)), rel=1e-8)


def test_graph_operator_matches_the_dense_hessian_and_leaves_grad_alone():
    model, loss_fn, batch = _problem(1)
    H = dense_hessian_fd(model, loss_fn, batch)
    loss = loss_fn(model(batch[0]), batch[1])
    op = GraphHessianOperator(list(model.named_parameters()), loss)
    V = torch.randn(H.shape[0], 3, dtype=torch.float64)
    torch.testing.assert_close(op.matmat(V), H @ V, rtol=1e-6, atol=1e-8)
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="graph"):
        GraphHessianOperator(list(model.parameters()), loss.detach())


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.SGD(ps, lr=0.1),
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-2),
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, dampening=0.0),
    lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=1e-2),
    lambda ps: torch.optim.AdamW(ps, lr=1e-2, amsgrad=True),
])
def test_next_update_is_the_step_the_optimizer_takes(make):
    model, loss_fn, batch = _problem(2)
    opt = make(model.parameters())
    for i in range(3):  # state exists after the first step; check at steps 0, 1, 2
        opt.zero_grad()
        loss_fn(model(batch[0]), batch[1]).backward()
        params = list(model.parameters())
        before = torch.cat([p.detach().reshape(-1) for p in params]).clone()
        state = copy.deepcopy(opt.state_dict())
        delta = next_update(opt, params, [p.grad for p in params])
        assert opt.state_dict()["state"].keys() == state["state"].keys()  # not changed
        opt.step()
        after = torch.cat([p.detach().reshape(-1) for p in params])
        torch.testing.assert_close(delta, after - before, rtol=1e-10, atol=1e-12)


def test_loss_at_and_actual_change():
    model, loss_fn, batch = _problem(3)
    named = list(model.named_parameters())
    d = 1e-2 * torch.randn(sum(p.numel() for _, p in named), dtype=torch.float64)
    moved = copy.deepcopy(model)
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(torch.nn.utils.parameters_to_vector(moved.parameters()) + d,
                                            moved.parameters())
    assert loss_at(model, loss_fn, batch, named, d) == pytest.approx(float(loss_fn(moved(batch[0]), batch[1])))
    assert loss_at(model, loss_fn, batch, named) == pytest.approx(float(loss_fn(model(batch[0]), batch[1])))


def test_tracker_signal_columns_sgd_and_adam():
    model, loss_fn, batch = _problem(4)
    H = dense_hessian_fd(model, loss_fn, batch)
    for opt in (torch.optim.SGD(model.parameters(), lr=0.05), torch.optim.Adam(model.parameters(), lr=1e-2)):
        opt.zero_grad()
        loss_fn(model(batch[0]), batch[1]).backward()
        row = SharpnessTracker(loss_fn, every=1, signals=True).step(model, opt, batch, step=0)
        g = _flat_grad(model, loss_fn, batch)
        params = list(model.parameters())
        d = next_update(opt, params, [p.grad for p in params])
        assert row["batch_sharpness"] == pytest.approx(float(g @ H @ g / (g @ g)), rel=1e-6)
        assert row["update_sharpness"] == pytest.approx(float(d @ H @ d / (d @ d)), rel=1e-6)
        pred = float(g @ d + 0.5 * d @ H @ d)
        assert row["predicted_loss_change"] == pytest.approx(pred, rel=1e-6)
        actual = loss_at(model, loss_fn, batch, list(model.named_parameters()), d) - float(
            loss_fn(model(batch[0]), batch[1]))
        assert row["actual_loss_change"] == pytest.approx(actual, rel=1e-9)
        adam = isinstance(opt, torch.optim.Adam)
        assert (row["preconditioned_batch_sharpness"] is not None) == adam
        assert row["signals_num_hvps"] == (3 if adam else 2) and row["signals_seconds"] >= 0
        if adam:
            P = PreconditionedHessianOperator(model, loss_fn, batch, opt, lookahead=True).preconditioner
            assert row["preconditioned_update_sharpness"] == pytest.approx(float(d @ H @ d / (d @ (P * d))), rel=1e-6)


def test_step_signals_without_optimizer_costs_one_hvp():
    model, loss_fn, batch = _problem(5)
    op = HessianOperator(model, loss_fn, batch)
    out = step_signals(op)
    assert out["signals_num_hvps"] == 1 and op.num_hvps == 1 and out["update_sharpness"] is None
