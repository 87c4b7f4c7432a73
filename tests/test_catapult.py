"""find_critical_lr: exact bounds on a quadratic, bitwise restoration, pass counts, edge cases."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from curvature.warmup import CatapultWarmup, CriticalLR, catapult_warmup, find_critical_lr

LAM = torch.tensor([0.5, 1.0, 3.0, 10.0], dtype=torch.float64)


class Quadratic(nn.Module):
    """``L(θ) = ½ θᵀ diag(λ) θ``: the model outputs ``√λ ⊙ θ``, the loss is ``½‖out‖²`` (targets ignored)."""

    def __init__(self, theta0: torch.Tensor, lam: torch.Tensor = LAM) -> None:
        super().__init__()
        self.theta = nn.Parameter(theta0.clone().to(torch.float64))
        self.register_buffer("sqrt_lam", lam.sqrt())
        self.forwards = 0
        self.backwards = 0
        self.theta.register_hook(self._count_backward)

    def _count_backward(self, grad):
        self.backwards += 1

    def forward(self, x):
        self.forwards += 1
        return self.sqrt_lam * self.theta + 0 * x.sum()


def quad_loss(out, target):
    return 0.5 * (out**2).sum() + 0 * target.sum()


BATCH = (torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64))


def sgd(params, lr):
    return torch.optim.SGD(params, lr=lr)


def closed_form_loss(theta, lam, lr):
    return float(0.5 * (lam * (1 - lr * lam) ** 2 * theta**2).sum())


def exact_bracket(theta, lam, delta):
    """[η*, η⁺): η* the first loss increase, η⁺ where L(θ_1) = (1+δ)L(θ_0) (L(θ_1)/L(θ_0) convex in η)."""
    a = float((lam**3 * theta**2).sum())
    b = float((lam**2 * theta**2).sum())
    c = float((lam * theta**2).sum())
    return 2 * b / a, (b + math.sqrt(b * b + delta * a * c)) / a


@pytest.mark.parametrize("delta", [0.1, 0.01])
def test_quadratic_aligned_gives_two_over_lambda(delta):
    theta0 = torch.tensor([0.0, 0.0, 0.0, 1.5], dtype=torch.float64)  # top eigenvector of diag(λ)
    model = Quadratic(theta0)
    res = find_critical_lr(model, quad_loss, BATCH, sgd, lr_target=1.0, delta=delta)
    lam_max = float(LAM.max())
    # L(θ_1)/L(θ_0) = (1 - ηλ)²: increase iff η >= 2/λ, below (1+δ) iff η < (1 + √(1+δ))/λ
    lo, hi = 2 / lam_max, (1 + math.sqrt(1 + delta)) / lam_max
    assert res.found and res.converged
    assert lo * (1 - 1e-12) <= res.lr_c < hi
    assert res.bracket[1] == res.lr_c and res.bracket[0] < 2 / lam_max
    assert abs(res.lr_c * lam_max / 2 - 1) < (math.sqrt(1 + delta) - 1) / 2  # relative error bound
    assert res.lr_init == res.lr_c
    # every trial is exactly one GD step from θ_0
    for lr, loss1 in res.history:
        assert loss1 == pytest.approx(closed_form_loss(theta0, LAM, lr), rel=1e-12)
    assert torch.equal(model.theta.detach(), theta0)


def test_quadratic_general_theta_exact_bounds():
    torch.manual_seed(1)
    theta0 = torch.randn(4, dtype=torch.float64)
    model = Quadratic(theta0)
    delta = 0.1
    res = find_critical_lr(model, quad_loss, BATCH, sgd, lr_target=1.0, delta=delta)
    eta_star, eta_plus = exact_bracket(theta0, LAM, delta)
    assert eta_star >= 2 / float(LAM.max())  # equality only along the top eigenvector
    assert eta_star * (1 - 1e-12) <= res.lr_c < eta_plus
    assert res.loss0 == pytest.approx(0.5 * float((LAM * theta0**2).sum()), rel=1e-14)
    lower, upper = res.bracket
    assert closed_form_loss(theta0, LAM, lower) < res.loss0 <= closed_form_loss(theta0, LAM, upper)


def test_forward_and_backward_counts():
    model = Quadratic(torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64))
    res = find_critical_lr(model, quad_loss, BATCH, sgd, lr_target=1.0)
    assert res.forward_passes == model.forwards == 1 + len(res.history)
    assert model.backwards == 1 and res.backward_passes == 1
    # doubling from lr_target/2**10 takes <= 11 trials, bisection a handful more
    assert len(res.history) <= 20
    assert res.history[0][0] == 1.0 / 2**10


def test_budget_is_respected():
    model = Quadratic(torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64))
    with pytest.warns(RuntimeWarning, match="converged=False"):
        res = find_critical_lr(model, quad_loss, BATCH, sgd, lr_target=1.0, max_forward_passes=5)
    assert res.forward_passes == model.forwards == 5 and not res.converged


def test_lr_start_above_threshold_searches_down():
    theta0 = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    model = Quadratic(theta0)
    res = find_critical_lr(model, quad_loss, BATCH, sgd, lr_target=1.0, lr_start=0.9)
    assert res.found and 0.2 <= res.lr_c < (1 + math.sqrt(1.1)) / 10
    assert res.bracket[0] > 0


def test_no_catapult_below_target():
    theta0 = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    model = Quadratic(theta0)
    res = find_critical_lr(model, quad_loss, BATCH, sgd, lr_target=0.15)  # < 2/λ_max = 0.2
    assert not res.found and res.lr_c is None
    assert res.lr_init == pytest.approx(0.015)
    assert res.bracket == (0.15, None)
    assert res.history[-1][0] == 0.15 and all(l1 < res.loss0 for _, l1 in res.history)
    s = catapult_warmup(res, 0.15, 100)
    assert isinstance(s, CatapultWarmup) and s(0) == pytest.approx(0.015)


def test_catapult_warmup_from_result_and_values():
    model = Quadratic(torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64))
    res = find_critical_lr(model, quad_loss, BATCH, sgd, lr_target=1.0)
    s = catapult_warmup(res, 1.0, 100)
    assert s(0) == res.lr_c and s(50) == pytest.approx(res.lr_c + 0.5) and s(100) == 1.0
    assert catapult_warmup(None, 1.0, 10)(0) == pytest.approx(0.1)
    assert catapult_warmup(0.3, 1.0, 10)(7) == 1.0
    assert catapult_warmup(2.0, 1.0, 10)(0) == 1.0  # capped at η_trgt


def test_errors():
    model = Quadratic(torch.ones(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="lr_target"):
        find_critical_lr(model, quad_loss, BATCH, sgd, lr_target=0.0)
    with pytest.raises(ValueError, match="lr_target"):
        find_critical_lr(model, quad_loss, BATCH, sgd, lr_target=-1.0)
    with pytest.raises(ValueError, match="scalar"):
        find_critical_lr(model, lambda o, t: 0.5 * o**2, BATCH, sgd, lr_target=1.0)
    with pytest.raises(ValueError, match="not finite"):
        find_critical_lr(model, lambda o, t: o.sum() * float("nan"), BATCH, sgd, lr_target=1.0)
    with pytest.raises(ValueError, match="delta"):
        find_critical_lr(model, quad_loss, BATCH, sgd, lr_target=1.0, delta=0.0)
    with pytest.raises(ValueError, match="optimizer"):
        find_critical_lr(model, quad_loss, BATCH, None, lr_target=1.0)
    with pytest.raises(TypeError, match="batch"):
        find_critical_lr(model, quad_loss, torch.zeros(2), sgd, lr_target=1.0)
    assert torch.equal(model.theta.detach(), torch.ones(4, dtype=torch.float64))


# -- restoration on a real network ------------------------------------------------------------------------
class Net(nn.Module):
    def __init__(self, dropout: float = 0.3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 16)
        self.bn = nn.BatchNorm1d(16)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(16, 3)
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)

    def forward(self, x, scale=1.0):
        return self.frozen(self.fc2(self.drop(torch.tanh(self.bn(self.fc1(x))))) * scale)


def _data(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def _snapshot(model, optimizer=None):
    snap = {
        "params": {k: v.detach().clone() for k, v in model.named_parameters()},
        "buffers": {k: v.detach().clone() for k, v in model.named_buffers()},
        "grad_obj": {k: v.grad for k, v in model.named_parameters()},
        "grad_val": {k: None if v.grad is None else v.grad.clone() for k, v in model.named_parameters()},
        "training": [m.training for m in model.modules()],
        "rng": torch.get_rng_state().clone(),
    }
    if optimizer is not None:
        snap["opt"] = copy.deepcopy(optimizer.state_dict())
    return snap


def _assert_same(model, snap, optimizer=None):
    for k, v in model.named_parameters():
        assert torch.equal(v.detach(), snap["params"][k]), k
        assert v.grad is snap["grad_obj"][k], k
        if v.grad is not None:
            assert torch.equal(v.grad, snap["grad_val"][k]), k
    for k, v in model.named_buffers():
        assert torch.equal(v, snap["buffers"][k]), k
    assert [m.training for m in model.modules()] == snap["training"]
    assert torch.equal(torch.get_rng_state(), snap["rng"])
    if optimizer is not None:
        a, b = optimizer.state_dict(), snap["opt"]
        assert a["param_groups"] == b["param_groups"]
        assert a["state"].keys() == b["state"].keys()
        for i in a["state"]:
            for key, val in a["state"][i].items():
                assert torch.equal(torch.as_tensor(val), torch.as_tensor(b["state"][i][key])), (i, key)


def test_restores_everything_with_existing_adam_state():
    torch.manual_seed(0)
    model = Net()
    x, y = _data()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    # leave a stale gradient on fc1 and None on fc2
    opt.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    model.fc2.weight.grad = None
    torch.manual_seed(123)
    snap = _snapshot(model, opt)
    res = find_critical_lr(model, nn.functional.cross_entropy, (x, y), None, lr_target=10.0, delta=0.01, optimizer=opt)
    _assert_same(model, snap, opt)
    assert res.found and 0 < res.bracket[0] < res.lr_c <= 10.0
    assert res.forward_passes == 1 + len(res.history)
    # the next random number is the one it would have been without the search
    a = torch.rand(3)
    torch.set_rng_state(snap["rng"])
    assert torch.equal(a, torch.rand(3))


def test_restores_with_factory_in_eval_mode_and_dict_inputs():
    torch.manual_seed(0)
    model = Net().eval()
    x, y = _data()
    snap = _snapshot(model)
    res = find_critical_lr(
        model, nn.functional.cross_entropy, ({"x": x, "scale": 2.0}, y),
        lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9), lr_target=100.0,
    )
    _assert_same(model, snap)
    assert res.found and res.history


def test_dropout_masks_frozen_within_a_call():
    """With dropout p=0.5, a tiny step must lower the loss: every forward pass sees the same masks."""
    torch.manual_seed(0)
    model = Net(dropout=0.5).train()
    x, y = _data()
    res = find_critical_lr(model, nn.functional.cross_entropy, ((x,), y), sgd, lr_target=1e-4, lr_start=1e-6)
    assert all(loss1 < res.loss0 for _, loss1 in res.history)
    assert res.history[0][1] == pytest.approx(res.loss0, rel=1e-4)


def test_factory_receives_trainable_params_and_trial_lrs():
    model = Net(dropout=0.0)
    x, y = _data()
    calls = []

    def factory(params, lr):
        calls.append((list(params), lr))
        return torch.optim.SGD(calls[-1][0], lr=lr)

    res = find_critical_lr(model, nn.functional.cross_entropy, (x, y), factory, lr_target=50.0)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(len(ps) == len(trainable) and all(a is b for a, b in zip(ps, trainable)) for ps, _ in calls)
    assert [lr for _, lr in calls] == [lr for lr, _ in res.history]


def test_optimizer_mode_trial_equals_a_real_step_and_never_steps_it():
    torch.manual_seed(0)
    model = Net(dropout=0.0).eval()
    x, y = _data()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=100)  # patches opt.step: must not leak into trials
    steps_before = opt.state_dict()["state"][0]["step"].clone()
    res = find_critical_lr(model, nn.functional.cross_entropy, (x, y), None, lr_target=1.0, delta=0.01, optimizer=opt)
    assert torch.equal(opt.state_dict()["state"][0]["step"], steps_before)
    assert not getattr(opt, "_opt_called", False) or sched.last_epoch == 0
    # replay one trial by hand on a copy
    lr, loss1 = res.history[3]
    m2 = copy.deepcopy(model)
    o2 = torch.optim.Adam(m2.parameters(), lr=lr)
    o2.load_state_dict(opt.state_dict())
    for g in o2.param_groups:
        g["lr"] = lr
    o2.zero_grad()
    nn.functional.cross_entropy(m2(x), y).backward()
    o2.step()
    with torch.no_grad():
        assert float(nn.functional.cross_entropy(m2(x), y)) == pytest.approx(loss1, rel=1e-6)


def test_result_type():
    model = Quadratic(torch.ones(4, dtype=torch.float64))
    res = find_critical_lr(model, quad_loss, BATCH, sgd, lr_target=1.0)
    assert isinstance(res, CriticalLR)
    lower, upper = res.bracket
    assert isinstance(lower, float) and isinstance(upper, float) and isinstance(res.forward_passes, int)


def test_loss_fn_none_uses_the_models_own_loss():
    """``loss_fn=None``: a model that returns ``outputs.loss`` (HF style, dict batch with labels) gives the same
    search as the explicit loss."""
    import types

    import torch.nn.functional as F

    class OwnLoss(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()

        def forward(self, x, labels=None):
            logits = self.net(x)
            return types.SimpleNamespace(logits=logits, loss=F.cross_entropy(logits, labels))

    torch.manual_seed(1)
    x, y = torch.randn(16, 4, dtype=torch.float64) * 3, torch.randint(0, 3, (16,))
    model = OwnLoss()
    own = find_critical_lr(model, None, {"x": x, "labels": y}, sgd, lr_target=50.0)
    explicit = find_critical_lr(model.net, F.cross_entropy, (x, y), sgd, lr_target=50.0)
    assert own.found and own.lr_c == explicit.lr_c and own.history == explicit.history
