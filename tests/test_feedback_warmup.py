"""CurvatureAwareWarmup: the bound η·λ/c ≤ safety on a quadratic with known curvature, spike back-off, the log."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from curvature.warmup.feedback import ACTIONS, CurvatureAwareWarmup, threshold_numerator


class Quadratic(nn.Module):
    """L(θ) = ½ θᵀ diag(λ) θ; the model's output is the loss itself."""

    def __init__(self, lambdas, seed=0):
        super().__init__()
        self.register_buffer("lam", torch.as_tensor(lambdas, dtype=torch.float64))
        gen = torch.Generator().manual_seed(seed)
        self.theta = nn.Parameter(torch.randn(len(lambdas), generator=gen, dtype=torch.float64))

    def forward(self, x):
        return 0.5 * (self.lam * self.theta**2).sum() + 0.0 * x.sum()


def own_loss(out, y):
    return out


BATCH = (torch.zeros(1, 1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))


def run(model, opt, sched, steps, spike_at=None):
    lrs = []
    for t in range(steps):
        opt.zero_grad()
        loss = own_loss(model(BATCH[0]), BATCH[1])
        loss.backward()
        fed = loss.detach() if t != spike_at else 10.0 * sched.reference  # injected spike
        lrs.append(sched.step(fed, BATCH))
        assert opt.param_groups[0]["lr"] == pytest.approx(lrs[-1])
        opt.step()
    return lrs


@pytest.mark.parametrize("safety", [0.5, 0.9])
def test_bound_never_exceeded_on_quadratic_sgd(safety):
    lambdas = torch.linspace(0.5, 10.0, 20)  # λ_max = 10 known analytically
    model = Quadratic(lambdas)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    lr_target = 1.0  # η_trgt·λ_max/2 = 5: the controller must stop well below it
    sched = CurvatureAwareWarmup(opt, model, own_loss, lr_target, safety=safety, every=3, spike_factor=1e9)
    lrs = run(model, opt, sched, 40)
    for lr in lrs:
        assert lr * 10.0 / 2 <= safety * (1 + 1e-9)
    # it got close to the bound (planned from λ, not a blind multiplicative ramp), never reached the target
    assert max(lrs) * 10.0 / 2 > 0.9 * safety
    assert not sched.done and sched.reached_step is None
    assert sched.numerator == pytest.approx(2.0)


def test_reaches_target_when_curvature_allows_and_stops_measuring():
    model = Quadratic([0.1, 0.5, 1.0])
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sched = CurvatureAwareWarmup(opt, model, own_loss, lr_target=0.8, safety=0.5, every=2, lr_init=0.01)
    lrs = run(model, opt, sched, 30)
    assert sched.done and lrs[-1] == pytest.approx(0.8)
    assert all(lr * 1.0 / 2 <= 0.5 + 1e-9 for lr in lrs)
    grows = [d for d in sched.history if d["action"] == "grow"]
    assert all(d["lr"] <= 2.0 * d["lr_prev"] * (1 + 1e-12) for d in grows)  # growth cap per decision
    n = sched.measurements
    run(model, opt, sched, 10)
    assert sched.measurements == n  # done: no more HVPs


def test_momentum_and_adam_numerators():
    p = [nn.Parameter(torch.zeros(2))]
    sgd = torch.optim.SGD(p, lr=0.3, momentum=0.9)
    assert threshold_numerator(sgd) == pytest.approx(2.0)  # empty momentum buffer: the first step is plain GD
    p[0].grad = torch.zeros(2)
    sgd.step()
    assert threshold_numerator(sgd) == pytest.approx(3.8)
    assert threshold_numerator(torch.optim.Adam(p, lr=0.3)) == pytest.approx(38.0)


def test_backs_off_on_injected_spike():
    model = Quadratic([1.0, 2.0])
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sched = CurvatureAwareWarmup(opt, model, own_loss, lr_target=5.0, safety=0.5, every=4, spike_factor=2.0)
    lrs = run(model, opt, sched, 12, spike_at=9)
    spike = [d for d in sched.history if d["step"] == 9]
    assert len(spike) == 1 and spike[0]["action"] == "backoff" and "spike" in spike[0]["reason"]
    assert lrs[9] == pytest.approx(0.5 * lrs[8])
    assert spike[0]["ceiling"] == pytest.approx(lrs[8])  # the rate that spiked caps growth until recovery
    after = [d for d in sched.history if d["step"] == 10]
    assert len(after) == 1 and after[0]["measured"]  # λ measured again at the next step (not waiting `every`)


def test_non_finite_loss_backs_off_not_raises():
    model = Quadratic([1.0])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = CurvatureAwareWarmup(opt, model, own_loss, lr_target=1.0, lr_init=0.1)
    lr = sched.step(float("nan"), BATCH)
    assert lr == pytest.approx(0.05) and sched.history[-1]["action"] == "backoff"


def test_decision_log_is_complete_and_goes_to_sinks(tmp_path):
    model = Quadratic(torch.linspace(0.2, 4.0, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    seen = []
    csv_path = tmp_path / "decisions.csv"
    sched = CurvatureAwareWarmup(opt, model, own_loss, lr_target=2.0, safety=0.5, every=3, spike_factor=3.0,
                                 sinks=[seen.append, csv_path])
    lrs = run(model, opt, sched, 25, spike_at=13)
    hist = sched.history
    assert hist and all(d["action"] in ACTIONS for d in hist)
    # every measurement step has a decision; every lr change is explained by a decision at that step
    measured = [d["step"] for d in hist if d["measured"]]
    assert measured[0] == 0 and len(measured) == sched.measurements
    by_step = {d["step"]: d for d in hist}
    for t in range(1, len(lrs)):
        if lrs[t] != lrs[t - 1]:
            assert t in by_step and by_step[t]["lr"] == pytest.approx(lrs[t])
    for d in hist:
        for key in ("step", "lr", "lr_prev", "action", "reason", "num_hvps"):
            assert key in d
        if d["measured"]:
            assert d["lambda"] == pytest.approx(4.0, rel=1e-3) and d["sharpness"] is not None
    assert sum(d["num_hvps"] for d in hist) == sched.num_hvps
    assert seen == hist  # the same records went to the sink
    from curvature.tracking import read_rows

    rows = read_rows(csv_path)
    assert [r["action"] for r in rows] == [d["action"] for d in hist]
    sched.close()


def test_adam_uses_preconditioned_sharpness():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    loss_fn = nn.functional.mse_loss
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = CurvatureAwareWarmup(opt, model, loss_fn, lr_target=0.05, safety=0.5, every=2)
    for _ in range(6):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        sched.step(loss, (x, y))
        opt.step()
    d = sched.history[0]
    assert d["preconditioned_sharpness"] is not None and d["lambda"] == pytest.approx(d["preconditioned_sharpness"])
    for d in sched.history:
        if d["measured"] and d["predicted_ratio"] is not None:
            assert d["predicted_ratio"] <= 0.5 * (1 + 1e-9)
    assert math.isclose(sched.numerator, 38.0)


def test_validation():
    model = Quadratic([1.0])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for kw in ({"safety": 0}, {"safety": 2.5}, {"growth": 1.0}, {"every": 0}, {"backoff": 1.0},
               {"spike_factor": 1.0}):
        with pytest.raises(ValueError):
            CurvatureAwareWarmup(opt, model, own_loss, 1.0, **kw)
    with pytest.raises(ValueError):
        CurvatureAwareWarmup(opt, model, own_loss, -1.0)
