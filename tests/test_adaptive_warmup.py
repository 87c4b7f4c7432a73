"""LossAdaptiveWarmup (η_max / (1 + C(L − L*))) and PersistentCatapultWarmup on a tiny MLP."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from curvature.warmup import LossAdaptiveWarmup, PersistentCatapultWarmup, loss_adaptive_lr


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))


def _data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = torch.sin(x @ torch.tensor([[1.0], [-2.0], [0.5], [1.5]])) + 0.05 * torch.randn(n, 1, generator=g)
    return x, y


mse = nn.functional.mse_loss


# -- LossAdaptiveWarmup ---------------------------------------------------------------------------------------
def test_formula_given_fed_losses():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    sched = LossAdaptiveWarmup(opt, lr_max=0.5, C=4.0)
    for loss in (10.0, 3.0, 1.0, 0.25, 0.01, 0.0):
        lr = sched.step(loss)
        assert lr == pytest.approx(0.5 / (1 + 4.0 * loss), rel=1e-14)
        assert opt.param_groups[0]["lr"] == lr and sched.get_last_lr() == [lr]
    assert lr == 0.5  # L = L* = 0: the peak rate


def test_loss_min_clamp_and_tensor_losses():
    opt = torch.optim.SGD(_mlp().parameters(), lr=1.0)
    sched = LossAdaptiveWarmup(opt, lr_max=1.0, C=1.0, loss_min=0.5, lr_min=0.1)
    assert sched.step(torch.tensor(2.5)) == pytest.approx(1.0 / 3.0)
    assert sched.step(100.0) == 0.1  # clamped below at lr_min
    assert sched.step(0.2) == 1.0  # below L*: clamped at η_max
    assert loss_adaptive_lr(1.5, 1.0, 1.0, loss_min=0.5) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="non-finite"):
        sched.step(float("nan"))


def test_ema_smoothing():
    opt = torch.optim.SGD(_mlp().parameters(), lr=0.2)
    beta, C = 0.9, 2.0
    sched = LossAdaptiveWarmup(opt, lr_max=0.2, C=C, ema=beta)
    losses = [4.0, 1.0, 3.0, 0.5, 0.5, 0.1]
    s = None
    for loss in losses:
        s = loss if s is None else beta * s + (1 - beta) * loss
        assert sched.step(loss) == pytest.approx(0.2 / (1 + C * s), rel=1e-13)
    assert sched.smoothed_loss == pytest.approx(s)


def test_group_ratios_kept():
    model = _mlp()
    opt = torch.optim.SGD(
        [{"params": model[0].parameters(), "lr": 0.2}, {"params": model[2].parameters(), "lr": 0.05}]
    )
    sched = LossAdaptiveWarmup(opt, lr_max=0.3, C=1.0)
    lr = sched.step(2.0)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1) and lr == pytest.approx(0.1)
    assert opt.param_groups[1]["lr"] == pytest.approx(0.1 * 0.25)


def test_from_curvature():
    opt = torch.optim.SGD(_mlp().parameters(), lr=1.0)
    H0, H1 = 4.0, 10.0
    sched = LossAdaptiveWarmup.from_curvature(opt, H0, H1)
    assert sched.lr_max == 0.25 and sched.C == 2.5
    assert sched.step(0.7) == pytest.approx(1.0 / (H0 + H1 * 0.7), rel=1e-14)  # the paper's 1/(H0 + H1 L)


def test_training_lr_follows_formula_and_rises_to_lr_max():
    model = _mlp()
    x, y = _data()
    lr_max, C = 0.3, 5.0
    opt = torch.optim.SGD(model.parameters(), lr=lr_max)
    sched = LossAdaptiveWarmup(opt, lr_max=lr_max, C=C)
    lrs, losses = [], []
    for _ in range(60):
        opt.zero_grad()
        loss = mse(model(x), y)
        loss.backward()
        lrs.append(sched.step(loss))
        losses.append(float(loss.detach()))
        opt.step()
    for lr, loss in zip(lrs, losses):
        assert lr == pytest.approx(lr_max / (1 + C * loss), rel=1e-12)
    assert losses[-1] < losses[0] and lrs[-1] > lrs[0]
    # as the loss goes to zero, η_t → η_max
    tail = [sched.step(10.0**-k) for k in range(1, 8)]
    assert all(a < b for a, b in zip(tail, tail[1:])) and tail[-1] == pytest.approx(lr_max, rel=1e-6)


def test_state_dict_roundtrip():
    opt = torch.optim.SGD(_mlp().parameters(), lr=0.1)
    a = LossAdaptiveWarmup(opt, lr_max=0.1, C=3.0, ema=0.5)
    for loss in (3.0, 2.0, 1.5):
        a.step(loss)
    b = LossAdaptiveWarmup(torch.optim.SGD(_mlp().parameters(), lr=0.1), lr_max=1.0, C=0.0)
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == a.state_dict()
    assert b.step(0.7) == a.step(0.7)


def test_invalid_arguments():
    opt = torch.optim.SGD(_mlp().parameters(), lr=0.1)
    for kwargs in ({"lr_max": 0.0, "C": 1.0}, {"lr_max": 1.0, "C": -1.0}, {"lr_max": 1.0, "C": 1.0, "ema": 1.0},
                   {"lr_max": 1.0, "C": 1.0, "lr_min": 2.0}):
        with pytest.raises(ValueError):
            LossAdaptiveWarmup(opt, **kwargs)


# -- PersistentCatapultWarmup ----------------------------------------------------------------------------------
def test_persistent_catapult_warmup_decisions():
    model = _mlp()
    x, y = _data()
    lr_target = 2.0
    opt = torch.optim.SGD(
        [{"params": model[0].parameters(), "lr": 1.0}, {"params": model[2].parameters(), "lr": 0.5}]
    )
    sched = PersistentCatapultWarmup(opt, model, mse, lr_target=lr_target, lr_start=1e-3)
    fed = []
    for step in range(20):  # (full-batch GD at η ≈ η_c on this tiny net diverges later on: keep it short)
        opt.zero_grad()
        loss = mse(model(x), y)
        loss.backward()
        grads_before = [p.grad.clone() for p in model.parameters()]
        params_before = [p.detach().clone() for p in model.parameters()]
        lr = sched.step(loss, (x, y))
        # the searches leave the model and its gradients as they were
        assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads_before))
        assert all(torch.equal(p.detach(), v) for p, v in zip(model.parameters(), params_before))
        assert opt.param_groups[0]["lr"] == lr and opt.param_groups[1]["lr"] == pytest.approx(0.5 * lr)
        fed.append(float(loss.detach()))
        opt.step()
    hist = sched.history
    assert hist and hist[0]["step"] == 0 and hist[0]["previous_reference"] is None
    # replay the rule: a search exactly when the loss fell below the reference, until η_trgt
    ref, done, expected = None, False, []
    for step, loss in enumerate(fed):
        if done:
            continue
        if ref is None or loss < ref:
            expected.append(step)
            entry = hist[len(expected) - 1]
            assert entry["step"] == step and entry["previous_reference"] == ref and entry["loss"] == loss
            ref, done = loss, entry["done"]
    assert [h["step"] for h in hist] == expected
    lrs = [h["lr"] for h in hist]
    assert all(a <= b for a, b in zip(lrs, lrs[1:])) and lrs[-1] <= lr_target
    for h in hist:
        if h["lr_c"] is not None:
            assert h["lr"] >= min(h["lr_c"], lr_target) and h["bracket"][1] == h["lr_c"]
        else:
            assert h["lr"] == lr_target and h["done"]
    assert len(hist) >= 2
    assert sched.done == (lrs[-1] == lr_target)


def test_persistent_first_step_on_quadratic_is_two_over_lambda():
    lam = torch.tensor([1.0, 4.0], dtype=torch.float64)

    class Quad(nn.Module):
        def __init__(self):
            super().__init__()
            self.theta = nn.Parameter(torch.tensor([0.0, 1.0], dtype=torch.float64))

        def forward(self, x):
            return lam.sqrt() * self.theta

    model = Quad()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    loss_fn = lambda out, t: 0.5 * (out**2).sum()  # noqa: E731
    sched = PersistentCatapultWarmup(opt, model, loss_fn, lr_target=10.0)
    loss = loss_fn(model(None), None)
    lr = sched.step(loss, (None, None))
    assert 0.5 <= lr < (1 + math.sqrt(1.1)) / 4  # 2/λ_max = 0.5
    # the loss does not fall below the reference with η ≥ 2/λ: no further search
    assert sched.step(loss, (None, None)) == lr and len(sched.history) == 1
    state = copy.deepcopy(sched.state_dict())
    other = PersistentCatapultWarmup(opt, model, loss_fn, lr_target=10.0)
    other.load_state_dict(state)
    assert other.state_dict() == state


def test_persistent_no_catapult_goes_to_target_and_stops():
    model = _mlp()
    x, y = _data()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    sched = PersistentCatapultWarmup(opt, model, mse, lr_target=1e-3)
    lr = sched.step(mse(model(x), y), (x, y))
    assert lr == 1e-3 and sched.done and sched.history[0]["lr_c"] is None
    assert sched.step(0.0, (x, y)) == 1e-3 and len(sched.history) == 1
