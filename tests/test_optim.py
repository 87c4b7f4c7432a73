"""Stability thresholds (checked against PyTorch's own optimizers on quadratics), edge_ratio, GI-Adam."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from conftest import DT, assert_same_state, cnn_bn_train, dense_hessian_fd, dropout_mlp, mlp_ce, rel_err, snapshot
from curvature.optim import (GIAdam, PreconditionedHessianOperator, edge_ratio, gi_adam_init, is_adam_like,
                             preconditioned_sharpness, stability_threshold)
from test_preconditioned import IMPLS, names_of, train


def _opt(cls, lr=0.1, **kw):
    return cls([torch.zeros(1, requires_grad=True)], lr=lr, **kw)


def _stepped(opt):
    """``opt`` after one step on a zero gradient (momentum buffers exist; nothing moves)."""
    for g in opt.param_groups:
        for p in g["params"]:
            p.grad = torch.zeros_like(p)
    opt.step()
    return opt


# --------------------------------------------------------------------------------------------------
# thresholds
# --------------------------------------------------------------------------------------------------
def test_threshold_formulas():
    assert stability_threshold(_opt(torch.optim.SGD, 0.1)) == pytest.approx(20.0)
    assert stability_threshold(_stepped(_opt(torch.optim.SGD, 0.1, momentum=0.9))) == pytest.approx(38.0)
    assert stability_threshold(_stepped(_opt(torch.optim.SGD, 0.1, momentum=0.9, dampening=0.5))) == pytest.approx(76.0)
    assert stability_threshold(_stepped(_opt(torch.optim.SGD, 0.1, momentum=0.9, nesterov=True))) == pytest.approx(
        3.8 / 2.8 / 0.1)
    # before the first step the momentum buffer is empty: the step is plain GD (Nesterov: η(1+μ)g)
    assert stability_threshold(_opt(torch.optim.SGD, 0.1, momentum=0.9)) == pytest.approx(20.0)
    assert stability_threshold(_opt(torch.optim.SGD, 0.1, momentum=0.9, dampening=0.5)) == pytest.approx(20.0)
    assert stability_threshold(_opt(torch.optim.SGD, 0.1, momentum=0.9, nesterov=True)) == pytest.approx(20.0 / 1.9)
    assert stability_threshold(_opt(torch.optim.SGD, 0.1, dampening=0.5)) == pytest.approx(20.0)  # no momentum
    assert stability_threshold(_opt(torch.optim.Adam, 1e-3)) == pytest.approx(38_000.0)
    assert stability_threshold(_opt(torch.optim.AdamW, 1e-3, betas=(0.5, 0.9))) == pytest.approx(3.0 / 0.5 / 1e-3)
    assert stability_threshold(_opt(torch.optim.Adam, torch.tensor(1e-3, dtype=DT))) == pytest.approx(38_000.0)


def test_threshold_uses_first_group_and_current_lr():
    a, b = torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([{"params": [a], "lr": 0.2}, {"params": [b], "lr": 5.0}], lr=1.0, momentum=0.5)
    assert stability_threshold(opt) == pytest.approx(2.0 / 0.2)  # empty momentum buffer: plain GD
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.1 * (t + 1))  # warm-up factor
    assert stability_threshold(opt) == pytest.approx(2.0 / 0.02)
    a.grad = b.grad = torch.zeros(1)
    opt.step()
    sched.step()
    assert stability_threshold(opt) == pytest.approx(3.0 / 0.04)


def _run_quadratic(lam, make, steps, x0=1.0):
    """|x| along optimizer steps on L(x) = λx²/2, with PyTorch's own update rule."""
    x = torch.tensor([x0], dtype=DT, requires_grad=True)
    opt = make([x])
    out = []
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * lam * x ** 2).sum().backward()
        opt.step()
        out.append(abs(float(x.detach())))
    return out


@pytest.mark.parametrize("kw", [{}, {"momentum": 0.9}, {"momentum": 0.5}, {"momentum": 0.9, "dampening": 0.5},
                                {"momentum": 0.9, "nesterov": True}, {"momentum": 0.3, "nesterov": True}],
                         ids=["gd", "mom0.9", "mom0.5", "mom-damp", "nesterov0.9", "nesterov0.3"])
def test_sgd_thresholds_on_a_quadratic(kw):
    """Just below the threshold PyTorch's SGD contracts, just above it diverges (the threshold of a run, read
    once the momentum buffer exists)."""
    make = lambda p: torch.optim.SGD(p, lr=0.1, **kw)  # noqa: E731
    thr = stability_threshold(_stepped(make([torch.zeros(1, requires_grad=True)])))
    below = _run_quadratic(0.97 * thr, make, 400)
    above = _run_quadratic(1.03 * thr, make, 400)
    assert below[-1] < 1e-3
    assert above[-1] > 1e3


@pytest.mark.parametrize("kw", [{"momentum": 0.9}, {"momentum": 0.5, "dampening": 0.5},
                                {"momentum": 0.9, "nesterov": True}], ids=["mom0.9", "mom-damp", "nesterov0.9"])
def test_sgd_momentum_threshold_of_the_first_step(kw):
    """#12.14: the first step of SGD with momentum (empty buffer: buf = g) is plain GD (Nesterov: η(1+μ)g), so
    its threshold is 2/η (2/((1+μ)η)), not (2+2μ)/η: torch's own first step contracts |x| on L = λx²/2 just below
    it and expands it just above; once the buffer exists the run's threshold is returned."""
    make = lambda p: torch.optim.SGD(p, lr=0.1, **kw)  # noqa: E731
    thr0 = stability_threshold(make([torch.zeros(1, requires_grad=True)]))
    expected = 2.0 / ((1 + kw["momentum"]) * 0.1) if kw.get("nesterov") else 2.0 / 0.1
    assert thr0 == pytest.approx(expected)
    assert _run_quadratic(0.97 * thr0, make, 1)[0] < 1.0
    assert _run_quadratic(1.03 * thr0, make, 1)[0] > 1.0
    x = torch.tensor([1.0], dtype=DT, requires_grad=True)
    opt = make([x])
    (0.5 * x ** 2).sum().backward()
    opt.step()
    assert stability_threshold(opt) > 1.25 * thr0  # (2+2μ)/((1−d)η) etc. once momentum builds up


@pytest.mark.parametrize("beta1", [0.9, 0.5])
def test_adam_threshold_on_a_quadratic(beta1):
    """torch Adam with ε ≫ √v̂ (tiny iterates) has P ≈ (1−β₁ᵗ)ε frozen: λ/ε = 0.97·threshold contracts,
    1.03·threshold grows (until v̂ catches up: Adam's self-stabilisation, outside this linear regime)."""
    make = lambda p: torch.optim.Adam(p, lr=1.0, eps=1.0, betas=(beta1, 0.999))  # noqa: E731
    thr = stability_threshold(make([torch.zeros(1, requires_grad=True)]))
    below = _run_quadratic(0.97 * thr, make, 300, x0=1e-60)
    above = _run_quadratic(1.03 * thr, make, 300, x0=1e-60)
    assert below[299] < below[99]
    assert above[299] > 1e3 * above[99]


def test_edge_ratio_and_is_adam_like():
    sgd = _opt(torch.optim.SGD, 0.1)
    assert edge_ratio(sgd, 20.0) == pytest.approx(1.0)
    assert edge_ratio(sgd, torch.tensor(10.0)) == pytest.approx(0.5)  # = ηλ/2
    adam = _opt(torch.optim.Adam, 1e-3)
    assert edge_ratio(adam, 3800) == pytest.approx(0.1)
    model, loss_fn, data = mlp_ce()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train(model, loss_fn, data, opt, 2)
    res = preconditioned_sharpness(model, loss_fn, data, opt, tol=1e-8)
    assert edge_ratio(opt, res) == pytest.approx(res.eigenvalue * 1e-2 / 38)
    assert is_adam_like(adam) and is_adam_like(_opt(torch.optim.AdamW)) and is_adam_like(_opt(GIAdam))
    assert not is_adam_like(sgd) and not is_adam_like(_opt(torch.optim.RMSprop))


def test_threshold_errors():
    # #21: RMSprop has a threshold now (2/η on λ(P⁻¹H)); Adagrad has none: None, and edge_ratio says why
    assert stability_threshold(_opt(torch.optim.RMSprop, 0.1)) == pytest.approx(20.0)
    assert stability_threshold(_opt(torch.optim.Adagrad, 0.1)) is None
    with pytest.raises(ValueError, match=r"needs a stability threshold: no stability threshold derived for Adagrad"):
        edge_ratio(_opt(torch.optim.Adagrad, 0.1), 1.0)
    with pytest.raises(TypeError, match=r"takes a torch\.optim\.Optimizer .*got str"):
        stability_threshold("adam")
    sgd = _opt(torch.optim.SGD, 0.1)
    sgd.param_groups[0]["lr"] = 0.0
    with pytest.raises(ValueError, match=r"learning rate of parameter group 0 is 0\.0.*need lr > 0"):
        stability_threshold(sgd)
    sgd.param_groups[0]["lr"] = -0.1
    with pytest.raises(ValueError, match=r"is -0\.1"):
        edge_ratio(sgd, 1.0)
    with pytest.raises(ValueError, match=r"dampening=1\.0 >= 1.*no stability threshold"):
        stability_threshold(_opt(torch.optim.SGD, 0.1, momentum=0.9, dampening=1.0))
    with pytest.raises(ValueError, match=r"beta1 must be in \[0, 1\)"):
        adam = _opt(torch.optim.Adam)
        adam.param_groups[0]["betas"] = (1.0, 0.999)
        stability_threshold(adam)
    with pytest.raises(ValueError, match=r"one eigenvalue, got a tensor of shape \(2,\)"):
        edge_ratio(_opt(torch.optim.SGD), torch.ones(2))
    with pytest.raises(TypeError, match=r"float, a tensor or an EigenResult, got str"):
        edge_ratio(_opt(torch.optim.SGD), "1.0")


# --------------------------------------------------------------------------------------------------
# GI-Adam
# --------------------------------------------------------------------------------------------------
def _reference_grads(model, loss_fn, data):
    twin = copy.deepcopy(model)
    twin.zero_grad()
    loss_fn(twin(data[0]), data[1]).backward()
    return [p.grad.clone() for p in twin.parameters()]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_gi_adam_init_state_bitwise_and_stock_steps(impl, cls, amsgrad):
    model, loss_fn, data = mlp_ce()
    lr, (b1, b2), eps = 1e-2, (0.9, 0.999), 1e-8
    opt = cls(model.parameters(), lr=lr, betas=(b1, b2), eps=eps, amsgrad=amsgrad, **impl)
    twin = copy.deepcopy(model)
    stock = cls(twin.parameters(), lr=lr, betas=(b1, b2), eps=eps, amsgrad=amsgrad, **impl)
    train(twin, loss_fn, data, stock, 1)  # the layout a stock step creates
    g0 = _reference_grads(model, loss_fn, data)
    theta0 = [p.detach().clone() for p in model.parameters()]

    loss = gi_adam_init(opt, model, loss_fn, data)
    assert loss == pytest.approx(float(loss_fn(model(data[0]), data[1]).detach()), rel=1e-14)
    for p, q, g in zip(model.parameters(), twin.parameters(), g0):
        st, ref = opt.state[p], stock.state[q]
        assert set(st) == set(ref)
        assert torch.equal(st["exp_avg_sq"], g * g)  # bitwise: v₀ = g₀²
        assert torch.equal(st["exp_avg"], torch.zeros_like(p))
        assert float(st["step"]) == 0.0
        for key in st:
            assert (st[key].dtype, st[key].device, st[key].shape) == (ref[key].dtype, ref[key].device, ref[key].shape)
        if amsgrad:
            assert torch.equal(st["max_exp_avg_sq"], g * g)
            assert st["max_exp_avg_sq"].data_ptr() != st["exp_avg_sq"].data_ptr()
        assert p.grad is None  # .grad untouched

    # stock Adam runs on: first step by hand, t = 1, m₁ = (1−β₁)g, v₁ = β₂g₀² + (1−β₂)g², bias corrections kept
    train(model, loss_fn, data, opt, 1)
    wd = opt.param_groups[0]["weight_decay"]
    for p, t0, g in zip(model.parameters(), theta0, g0):
        m1 = (1 - b1) * g
        v1 = b2 * g * g + (1 - b2) * g * g
        start = t0 * (1 - lr * wd) if cls is torch.optim.AdamW else t0
        expected = start - lr * (m1 / (1 - b1)) / ((v1 / (1 - b2)).sqrt() + eps)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=1e-15)
        big = g.abs() > 1e-5  # ≈ η·√(1−β₂)·sign(g) where |g| ≫ ε: the automatic warm-up factor
        torch.testing.assert_close((start - p.detach())[big], lr * math.sqrt(1 - b2) * g.sign()[big],
                                   rtol=1e-3, atol=0)
    train(model, loss_fn, data, opt, 3)
    assert all(float(opt.state[p]["step"]) == 4.0 for p in model.parameters())
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_gi_adam_class_matches_gi_adam_init():
    model, loss_fn, data = mlp_ce()
    twin = copy.deepcopy(model)
    gi = GIAdam(model.parameters(), lr=1e-2)
    ref = torch.optim.Adam(twin.parameters(), lr=1e-2)
    gi_adam_init(ref, twin, loss_fn, data)
    train(model, loss_fn, data, gi, 3)
    train(twin, loss_fn, data, ref, 3)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-13, atol=1e-15)
        torch.testing.assert_close(gi.state[p]["exp_avg_sq"], ref.state[q]["exp_avg_sq"], rtol=1e-13, atol=0)
    # closure form and a scheduler work as with Adam
    sched = torch.optim.lr_scheduler.StepLR(gi, 1, 0.5)

    def closure():
        gi.zero_grad()
        loss = loss_fn(model(data[0]), data[1])
        loss.backward()
        return loss

    assert torch.isfinite(gi.step(closure))
    sched.step()
    assert gi.param_groups[0]["lr"] == pytest.approx(5e-3)


def test_gi_adam_cuts_preconditioned_sharpness():
    """First-step λ^{P⁻¹H} (lookahead): GI-Adam vs plain Adam; predicted ratio √(1−β₂) for |g| ≫ ε."""
    model, loss_fn, data = mlp_ce()
    plain = torch.optim.Adam(model.parameters(), lr=1e-3)
    gi = torch.optim.Adam(model.parameters(), lr=1e-3)
    gi_adam_init(gi, model, loss_fn, data)
    with pytest.raises(ValueError, match=r"step = 0 for 0\.weight.*pass lookahead=True"):
        PreconditionedHessianOperator(model, loss_fn, data, gi, lookahead=False)
    lam_plain = preconditioned_sharpness(model, loss_fn, data, plain, tol=1e-10, lookahead=True)
    lam_gi = preconditioned_sharpness(model, loss_fn, data, gi, tol=1e-10, lookahead=True)
    # dense reference for both
    names = names_of(model)
    H = dense_hessian_fd(model, loss_fn, data, names)
    g = torch.cat([x.reshape(-1) for x in _reference_grads(model, loss_fn, data)])
    for res, P in ((lam_plain, 0.1 * (g.abs() + 1e-8)), (lam_gi, 0.1 * (g.abs() / math.sqrt(1e-3) + 1e-8))):
        D = P.rsqrt()
        ref = torch.linalg.eigvalsh(D[:, None] * H * D[None, :]).max()
        assert rel_err(res.eigenvalues[:1], ref.reshape(1)) < 1e-8
    factor = lam_gi.eigenvalue / lam_plain.eigenvalue
    print(f"\nGI-Adam factor: λ^(P⁻¹H) {lam_gi.eigenvalue:.4g} vs Adam {lam_plain.eigenvalue:.4g}: "
          f"{factor:.4f} (√(1−β₂) = {math.sqrt(1e-3):.4f})")
    assert factor == pytest.approx(math.sqrt(1 - 0.999), rel=0.05)


@pytest.mark.parametrize("factory", [dropout_mlp, cnn_bn_train], ids=["dropout", "bn-train"])
def test_gi_adam_init_leaves_model_untouched(factory):
    model, loss_fn, data = factory()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    before = snapshot(model)
    gi_adam_init(opt, model, loss_fn, data)
    assert_same_state(before, model)
    # the diagnostics leave the GI state alone
    before = snapshot(model, opt)
    preconditioned_sharpness(model, loss_fn, data, opt, k=1, tol=1e-6, lookahead=True)
    assert_same_state(before, model, opt)


def test_gi_adam_multiple_batches_weighted():
    model, loss_fn, data = mlp_ce()
    x, y = data
    batches = [(x[:5], y[:5]), (x[5:], y[5:])]
    a = torch.optim.Adam(model.parameters())
    b = torch.optim.Adam(model.parameters())
    gi_adam_init(a, model, loss_fn, batches)
    gi_adam_init(b, model, loss_fn, data)
    for p in model.parameters():
        torch.testing.assert_close(a.state[p]["exp_avg_sq"], b.state[p]["exp_avg_sq"], rtol=1e-10, atol=1e-20)


def test_gi_adam_errors():
    model, loss_fn, data = mlp_ce()
    with pytest.raises(TypeError, match=r"gi_adam_init\(\) supports torch\.optim\.Adam and torch\.optim\.AdamW.*"
                                        r"got SGD"):
        gi_adam_init(torch.optim.SGD(model.parameters(), lr=0.1), model, loss_fn, data)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train(model, loss_fn, data, opt, 1)
    with pytest.raises(ValueError, match=r"already taken steps for 0\.weight.*overwrite=True"):
        gi_adam_init(opt, model, loss_fn, data)
    gi_adam_init(opt, model, loss_fn, data, overwrite=True)
    assert float(opt.state[model[0].weight]["step"]) == 0.0
    stray = torch.nn.Parameter(torch.zeros(3, 2, dtype=DT))
    other = torch.optim.Adam([*model.parameters(), stray])
    with pytest.raises(ValueError, match=r"1 trainable parameter\(s\) that are not in the model \(shapes \[\(3, 2\)\]\)"):
        gi_adam_init(other, model, loss_fn, data)
    frozen = torch.optim.Adam([torch.nn.Parameter(torch.zeros(2), requires_grad=False)])
    with pytest.raises(ValueError, match=r"owns no trainable parameters"):
        gi_adam_init(frozen, model, loss_fn, data)
