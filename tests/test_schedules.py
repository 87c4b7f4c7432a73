"""Schedules against their closed forms, composition boundaries, and LambdaLR integration."""
from __future__ import annotations

import dataclasses
import math
import pickle

import pytest
import torch

from curvature.warmup.schedules import (
    CatapultWarmup,
    Constant,
    CosineDecay,
    Decay,
    ExponentialWarmup,
    LinearWarmup,
    SequentialSchedule,
    WarmupStableDecay,
    join,
    warmup_cosine,
)

approx = lambda x: pytest.approx(x, rel=1e-12, abs=1e-15)  # noqa: E731


def test_constant():
    s = Constant(0.3)
    for t in (0, 1, 7, 10**6):
        assert s(t) == 0.3
    assert s.duration is None


def test_linear_warmup_closed_form():
    eta0, eta_max, T = 0.01, 0.5, 20
    s = LinearWarmup(eta_max, T, lr_init=eta0)
    for t in (0, 1, 5, 10, 19, 20, 21, 1000):
        expected = eta0 + (eta_max - eta0) * min(t, T) / T
        assert s(t) == approx(expected)
    assert s(0) == eta0 and s(T) == eta_max and s(T + 5) == eta_max
    assert s.duration == T
    assert LinearWarmup(0.2, 0)(0) == 0.2  # T = 0: peak from the start


def test_exponential_warmup_closed_form():
    eta_max, tau = 0.4, 8.0
    s = ExponentialWarmup(eta_max, tau)
    for t in (0, 1, 8, 16, 100):
        assert s(t) == approx(eta_max * (1 - math.exp(-t / tau)))
    assert s(0) == 0.0
    assert s(tau) == approx(eta_max * (1 - math.exp(-1)))
    assert s(10_000) == approx(eta_max)
    k = 0.25
    r = ExponentialWarmup.from_rate(eta_max, k)
    assert r.rate == approx(k)
    for t in (0, 3, 12):
        assert r(t) == approx(eta_max * (1 - math.exp(-k * t)))
    s0 = ExponentialWarmup(1.0, 2.0, lr_init=0.1)
    assert s0(0) == approx(0.1) and s0(2) == approx(1.0 - 0.9 * math.exp(-1))
    assert s.duration is None


@pytest.mark.parametrize(
    "shape,f",
    [
        ("cosine", lambda u: 0.5 * (1 + math.cos(math.pi * u))),
        ("linear", lambda u: 1 - u),
        ("1-sqrt", lambda u: 1 - math.sqrt(u)),
    ],
)
def test_decay_closed_form(shape, f):
    eta_max, eta_min, T = 1.0, 0.05, 40
    s = Decay(eta_max, T, eta_min, shape=shape)
    for t in (0, 1, 10, 20, 39, 40, 41, 500):
        expected = eta_min + (eta_max - eta_min) * f(min(t, T) / T)
        assert s(t) == approx(expected)
    assert s(0) == eta_max and s(T) == approx(eta_min) and s(T + 1) == eta_min


def test_cosine_decay_midpoint():
    s = CosineDecay(0.8, 100, lr_min=0.2)
    assert s(0) == 0.8
    assert s(50) == approx(0.5)
    assert s(100) == approx(0.2) and s(1000) == 0.2
    assert s.shape == "cosine" and s.duration == 100


@pytest.mark.parametrize("shape", ["linear", "cosine", "1-sqrt"])
def test_wsd_closed_form(shape):
    eta0, eta_max, eta_min, Tw, T, frac = 0.0, 1.0, 0.1, 10, 100, 0.2
    s = WarmupStableDecay(eta_max, Tw, T, decay_fraction=frac, lr_init=eta0, lr_min=eta_min, decay_shape=shape)
    Td = 20
    assert s.decay_steps == Td and s.decay_start == 80 and s.duration == T
    f = {"linear": lambda u: 1 - u, "cosine": lambda u: 0.5 * (1 + math.cos(math.pi * u)),
         "1-sqrt": lambda u: 1 - math.sqrt(u)}[shape]

    def closed(t):
        if t < Tw:
            return eta0 + (eta_max - eta0) * t / Tw
        if t < T - Td:
            return eta_max
        if t <= T:
            return eta_min + (eta_max - eta_min) * f((t - (T - Td)) / Td)
        return eta_min

    for t in (0, 1, 5, 9, 10, 11, 50, 79, 80, 85, 90, 99, 100, 101, 10_000):
        assert s(t) == approx(closed(t)), t
    assert s(0) == eta0 and s(Tw) == eta_max and s(80) == eta_max
    assert s(T) == approx(eta_min) and s(T + 1) == eta_min


def test_wsd_no_decay_and_validation():
    s = WarmupStableDecay(1.0, 5, 50, decay_fraction=0.0)
    assert s(5) == 1.0 and s(50) == 1.0 and s(10**5) == 1.0
    with pytest.raises(ValueError):
        WarmupStableDecay(1.0, 60, 100, decay_fraction=0.5)
    with pytest.raises(ValueError):
        WarmupStableDecay(1.0, 5, 100, decay_shape="exp")


def test_catapult_warmup_schedule():
    s = CatapultWarmup(lr_init=0.2, lr_target=1.0, warmup_steps=50)
    for t in (0, 1, 10, 39, 40, 41, 50, 200):
        assert s(t) == approx(min(0.2 + 1.0 * t / 50, 1.0))
    assert s(0) == 0.2 and s(40) == 1.0  # reaches η_trgt after T(1 - η_init/η_trgt) = 40 steps
    assert s.duration == 40


def test_then_boundary():
    w = LinearWarmup(1.0, 10, lr_init=0.1)
    d = CosineDecay(1.0, 30, lr_min=0.0)
    s = w.then(d)
    assert isinstance(s, SequentialSchedule) and s.boundaries == (10,) and s.duration == 40
    for t in (0, 5, 9):
        assert s(t) == w(t)
    for t in (10, 11, 25, 40, 41):
        assert s(t) == d(t - 10)
    assert s(9) == approx(0.1 + 0.9 * 0.9) and s(10) == 1.0 and s(40) == approx(0.0)


def test_join_explicit_boundaries_and_nesting():
    a, b, c = Constant(0.1), Constant(0.2), LinearWarmup(0.5, 4)
    s = join(a, b, c, boundaries=(3, 7))
    assert [s(t) for t in range(13)] == [0.1] * 3 + [0.2] * 4 + [0.0, 0.125, 0.25, 0.375, 0.5, 0.5]
    # a sequence as a piece runs on its own clock and is cut at the next boundary
    inner = LinearWarmup(1.0, 4).then(Constant(0.7), at=6)
    outer = inner.then(Constant(0.3), at=8)
    assert [outer(t) for t in range(10)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 0.7, 0.7, 0.3, 0.3]
    # default boundaries from durations
    j = join(LinearWarmup(1.0, 2), Decay(1.0, 4, shape="linear"), Constant(0.05))
    assert j.boundaries == (2, 6)
    assert [j(t) for t in range(8)] == [0.0, 0.5, 1.0, 0.75, 0.5, 0.25, 0.05, 0.05]


def test_composition_errors():
    with pytest.raises(ValueError, match="duration"):
        ExponentialWarmup(1.0, 5.0).then(Constant(1.0))
    s = ExponentialWarmup(1.0, 5.0).then(Constant(1.0), at=20)
    assert s(19) == approx(1 - math.exp(-19 / 5)) and s(20) == 1.0
    with pytest.raises(ValueError):
        join(Constant(1.0), Constant(2.0), Constant(3.0), boundaries=(5, 2))
    with pytest.raises(ValueError):
        join(Constant(1.0), Constant(2.0), boundaries=(1, 2))


def test_invalid_arguments():
    with pytest.raises(ValueError):
        LinearWarmup(-1.0, 10)
    with pytest.raises(ValueError):
        LinearWarmup(1.0, -1)
    with pytest.raises(ValueError):
        LinearWarmup(1.0, 2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ExponentialWarmup(1.0, 0.0)
    with pytest.raises(ValueError):
        Decay(1.0, 10, shape="step")
    with pytest.raises(ValueError):
        Constant(1.0)(-1)


def test_immutable_and_picklable():
    s = warmup_cosine(1.0, 10, 100, lr_min=0.01)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.boundaries = (3,)  # type: ignore[misc]
    t = pickle.loads(pickle.dumps(s))
    assert t == s and [t(i) for i in range(0, 120, 7)] == [s(i) for i in range(0, 120, 7)]


def test_warmup_cosine_endpoints():
    s = warmup_cosine(2.0, 10, 110, lr_init=0.2, lr_min=0.02)
    assert s(0) == 0.2 and s(10) == 2.0 and s(60) == approx(1.01) and s(110) == approx(0.02)
    assert s(500) == 0.02


def _model():
    torch.manual_seed(0)
    return torch.nn.Linear(3, 2)


def test_lambda_lr_integration_single_group():
    model = _model()
    sched = LinearWarmup(0.5, 10, lr_init=0.05).then(CosineDecay(0.5, 20, lr_min=0.005))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    scheduler = sched.lr_scheduler(opt)
    x = torch.randn(4, 3)
    for t in range(40):
        assert opt.param_groups[0]["lr"] == approx(sched(t)), t
        assert scheduler.get_last_lr()[0] == approx(sched(t))
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        scheduler.step()
    assert sched.as_lambda(0.5)(3) == approx(sched(3) / 0.5)


def test_lambda_lr_keeps_group_ratios_and_state_dict():
    model = _model()
    sched = WarmupStableDecay(1.0, 5, 30, decay_fraction=0.2, decay_shape="cosine")
    opt = torch.optim.SGD([{"params": [model.weight], "lr": 1.0}, {"params": [model.bias], "lr": 0.1}], lr=1.0)
    scheduler = sched.lr_scheduler(opt)
    for t in range(35):
        assert opt.param_groups[0]["lr"] == approx(sched(t))
        assert opt.param_groups[1]["lr"] == approx(0.1 * sched(t))
        opt.step()
        scheduler.step()
    state = scheduler.state_dict()
    m2 = _model()
    opt2 = torch.optim.SGD([{"params": [m2.weight], "lr": 1.0}, {"params": [m2.bias], "lr": 0.1}], lr=1.0)
    sch2 = sched.lr_scheduler(opt2)
    sch2.load_state_dict(state)
    assert sch2.last_epoch == 35 and sch2.lr_lambdas[0].schedule == sched


def test_lambda_lr_needs_nonzero_base_lr():
    opt = torch.optim.SGD(_model().parameters(), lr=0.0)
    with pytest.raises(ValueError, match="base_lr"):
        LinearWarmup(1.0, 10).lr_scheduler(opt)
    sch = LinearWarmup(1.0, 10).lr_scheduler(opt, base_lr=1.0)  # explicit base works, factor = sched(t)/1
    assert sch.get_last_lr()[0] == 0.0
