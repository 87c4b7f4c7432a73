"""PreconditionedHessianOperator / preconditioned_sharpness against dense float64 references.

Reference: H from central differences of gradients (``dense_hessian_fd``), P built here by hand from the
optimizer's state dict with the formula of shared/README.md, P = (1−β₁ᵗ)·diag(√v̂ + ε), v̂ = v/(1−β₂ᵗ), each
group's block divided by lr_g/lr_0; eigenvalues of P^{-1/2} H P^{-1/2} by ``eigvalsh``.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import (DT, assert_same_state, cnn_bn_train, dense_hessian_fd, dropout_mlp, flat_grad_fn, mlp_ce,
                      mlp_mse, partly_frozen, rel_err, snapshot)
from curvature.optim import PreconditionedHessianOperator, preconditioned_sharpness, stability_threshold


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def train(model, loss_fn, data, opt, steps):
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model(data[0]), data[1]).backward()
        opt.step()


def _fused_runs_on_cpu() -> bool:
    try:
        p = torch.zeros(2, dtype=DT, requires_grad=True)
        opt = torch.optim.Adam([p], fused=True)
        p.grad = torch.ones_like(p)
        opt.step()
        return True
    except (RuntimeError, ValueError):
        return False


IMPLS = [pytest.param({"foreach": False}, id="for-loop"), pytest.param({"foreach": True}, id="foreach"),
         pytest.param({"fused": True}, id="fused",
                      marks=pytest.mark.skipif(not _fused_runs_on_cpu(), reason="fused Adam needs CUDA here"))]


def group_of(opt, p):
    return next(g for g in opt.param_groups if any(q is p for q in g["params"]))


def hand_P(opt, model, names, lookahead=False, grad=None):
    """P from the state dict formulas (float64), in ``names`` order; lookahead uses the flat ``grad``."""
    named = dict(model.named_parameters())
    lr0 = float(opt.param_groups[0]["lr"])
    parts, offset = [], 0
    for n in names:
        p = named[n]
        g = group_of(opt, p)
        b1, b2 = (float(b) for b in g["betas"])
        st = opt.state.get(p, {})
        if lookahead:
            gr = grad[offset:offset + p.numel()].view_as(p).double()
            if g["weight_decay"] and not g.get("decoupled_weight_decay", False):
                gr = gr + g["weight_decay"] * p.detach().double()
            t = (float(st["step"]) if st else 0.0) + 1
            v = (b2 * st["exp_avg_sq"].double() if st else 0.0) + (1 - b2) * gr ** 2
            if g["amsgrad"] and st:
                v = torch.maximum(st["max_exp_avg_sq"].double(), v)
        else:
            t = float(st["step"])
            v = (st["max_exp_avg_sq"] if g["amsgrad"] else st["exp_avg_sq"]).double()
        vhat = v / (1 - b2 ** t)
        parts.append(((1 - b1 ** t) * (vhat.sqrt() + g["eps"]) * lr0 / float(g["lr"])).reshape(-1))
        offset += p.numel()
    return torch.cat(parts)


def reference(H, P):
    D = P.rsqrt()
    A = D[:, None] * H * D[None, :]
    A = 0.5 * (A + A.T)
    return A, torch.linalg.eigvalsh(A).flip(0)


def names_of(model):
    return [n for n, p in model.named_parameters() if p.requires_grad]


def grouped_params(model, **second):
    """Two groups: first Linear (lr 1e-2), last Linear with other lr/betas/eps."""
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    g2 = {"params": list(layers[-1].parameters()), "lr": 3e-3, "betas": (0.8, 0.99), "eps": 1e-6}
    g2.update(second)
    rest = [p for p in model.parameters() if all(p is not q for q in g2["params"])]
    return [{"params": rest}, g2]


# --------------------------------------------------------------------------------------------------
# against the dense reference
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["Adam", "AdamW", "Adam-amsgrad", "AdamW-amsgrad-wd"])
def test_dense_reference_groups_and_implementations(kind, impl):
    model, loss_fn, data = mlp_mse()
    cls = torch.optim.AdamW if kind.startswith("AdamW") else torch.optim.Adam
    kw = dict(impl, amsgrad="amsgrad" in kind, weight_decay=0.05 if "wd" in kind else 0.0)
    opt = cls(grouped_params(model), lr=1e-2, **kw)
    train(model, loss_fn, data, opt, 4)
    assert isinstance(opt.state[model[0].weight]["step"], torch.Tensor)
    names = names_of(model)
    H = dense_hessian_fd(model, loss_fn, data, names)
    P_ref = hand_P(opt, model, names)
    A_ref, ev_ref = reference(H, P_ref)

    op = PreconditionedHessianOperator(model, loss_fn, data, opt, lookahead=False)
    assert op.param_names == names and op.shape == (H.shape[0], H.shape[0])
    torch.testing.assert_close(op.preconditioner, P_ref, rtol=1e-12, atol=0)
    A = op.to_dense()
    assert rel_err(A, A_ref) < 1e-7
    ev = torch.linalg.eigvalsh(0.5 * (A + A.T)).flip(0)
    assert rel_err(ev[:2], ev_ref[:2]) < 1e-8

    res = preconditioned_sharpness(model, loss_fn, data, opt, k=2, tol=1e-10, lookahead=False)
    assert res.converged
    assert rel_err(res.eigenvalues, ev_ref[:2]) < 1e-8
    assert res.info["loss"] == pytest.approx(float(loss_fn(model(data[0]), data[1]).detach()), rel=1e-12)
    assert res.info["threshold"] == pytest.approx(stability_threshold(opt))


def test_step_stored_as_number_and_lr_tensor():
    model, loss_fn, data = mlp_ce()
    opt = torch.optim.Adam(grouped_params(model), lr=1e-2)
    train(model, loss_fn, data, opt, 3)
    P_tensor_steps = PreconditionedHessianOperator(model, loss_fn, data, opt, lookahead=False).preconditioner
    for st in opt.state.values():  # older checkpoints stored a Python number
        st["step"] = int(st["step"].item())
    opt.param_groups[1]["lr"] = torch.tensor(opt.param_groups[1]["lr"], dtype=DT)
    op = PreconditionedHessianOperator(model, loss_fn, data, opt, lookahead=False)
    torch.testing.assert_close(op.preconditioner, P_tensor_steps, rtol=0, atol=0)
    torch.testing.assert_close(op.preconditioner, hand_P(opt, model, names_of(model)), rtol=1e-12, atol=0)


def test_group_lr_fold_makes_one_threshold():
    """Halving a group's lr doubles its block of P: the fold keeps (2+2β₁)/((1−β₁)η₀) valid for all groups."""
    model, loss_fn, data = mlp_mse()
    opt = torch.optim.Adam(grouped_params(model, lr=1e-2, betas=(0.9, 0.999), eps=1e-8), lr=1e-2)
    train(model, loss_fn, data, opt, 2)
    P1 = PreconditionedHessianOperator(model, loss_fn, data, opt, lookahead=False).preconditioner.clone()
    opt.param_groups[1]["lr"] = 5e-3
    P2 = PreconditionedHessianOperator(model, loss_fn, data, opt, lookahead=False).preconditioner
    n_last = sum(p.numel() for p in opt.param_groups[1]["params"])
    torch.testing.assert_close(P2[:-n_last], P1[:-n_last], rtol=0, atol=0)
    torch.testing.assert_close(P2[-n_last:], 2 * P1[-n_last:], rtol=1e-15, atol=0)


def test_frozen_params_and_params_subset():
    model, loss_fn, data = partly_frozen()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)  # owns the frozen ones too; they get no state
    train(model, loss_fn, data, opt, 3)
    names = names_of(model)
    op = PreconditionedHessianOperator(model, loss_fn, data, opt, lookahead=False)
    assert op.param_names == names and "0.weight" not in names
    _, ev_ref = reference(dense_hessian_fd(model, loss_fn, data, names), hand_P(opt, model, names))
    res = preconditioned_sharpness(model, loss_fn, data, opt, k=2, tol=1e-10, lookahead=False)
    assert rel_err(res.eigenvalues, ev_ref[:2]) < 1e-8

    sub = ["4.weight", "4.bias"]
    _, ev_sub = reference(dense_hessian_fd(model, loss_fn, data, sub), hand_P(opt, model, sub))
    res = preconditioned_sharpness(model, loss_fn, data, opt, k=1, tol=1e-10, params=["4"], lookahead=False)
    assert res.info["num_params"] == 14
    assert rel_err(res.eigenvalues, ev_sub[:1]) < 1e-8


@pytest.mark.parametrize("solver", ["lanczos", "power_iteration"])
def test_other_solvers(solver):
    model, loss_fn, data = mlp_ce()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train(model, loss_fn, data, opt, 3)
    names = names_of(model)
    _, ev_ref = reference(dense_hessian_fd(model, loss_fn, data, names), hand_P(opt, model, names))
    res = preconditioned_sharpness(model, loss_fn, data, opt, k=1, solver=solver, tol=1e-9, max_iters=3000, lookahead=False)
    # the algebraic top for every solver: here P⁻¹H's largest-magnitude eigenvalue is negative (-214.9 vs
    # λ_max = 178.7), and power iteration is shifted to find λ_max (see diagnostics.solve)
    if solver == "power_iteration":
        assert ev_ref.abs().max() > ev_ref[0] and res.info["shift"] < 0
    assert rel_err(res.eigenvalues, ev_ref[:1]) < 1e-7


def test_float32_model_analysed_in_float64():
    model, loss_fn, data = mlp_mse()
    model = model.float()
    data32 = (data[0].float(), data[1].float())
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train(model, loss_fn, data32, opt, 3)
    op = PreconditionedHessianOperator(model, loss_fn, data32, opt, dtype=torch.float64, lookahead=False)
    assert op.dtype == torch.float64 and op.preconditioner.dtype == torch.float64
    m64 = copy.deepcopy(model).double()
    names = names_of(model)
    P = hand_P(opt, model, names)
    torch.testing.assert_close(op.preconditioner, P, rtol=1e-12, atol=0)
    # reference: the float32 point and data, exactly representable in float64
    m64_data = (data32[0].double(), data32[1].double())
    _, ev_ref = reference(dense_hessian_fd(m64, loss_fn, m64_data, names), P)
    res = preconditioned_sharpness(model, loss_fn, data32, opt, k=2, tol=1e-10, dtype=torch.float64, lookahead=False)
    assert rel_err(res.eigenvalues, ev_ref[:2]) < 1e-7


# --------------------------------------------------------------------------------------------------
# lookahead
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["Adam", "AdamW-wd", "Adam-L2wd-amsgrad"])
def test_lookahead_by_hand_and_equals_the_next_step(kind, impl):
    model, loss_fn, data = mlp_mse()
    cls = torch.optim.AdamW if kind.startswith("AdamW") else torch.optim.Adam
    opt = cls(grouped_params(model), lr=1e-2, amsgrad="amsgrad" in kind,
              weight_decay=0.1 if "wd" in kind else 0.0, **impl)
    train(model, loss_fn, data, opt, 3)
    names = names_of(model)
    grad_fn, theta = flat_grad_fn(model, loss_fn, data, names)
    g = grad_fn(theta)
    P_ref = hand_P(opt, model, names, lookahead=True, grad=g)
    op = PreconditionedHessianOperator(model, loss_fn, data, opt, lookahead=True)
    torch.testing.assert_close(op.gradient, g, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(op.preconditioner, P_ref, rtol=1e-12, atol=0)
    _, ev_ref = reference(dense_hessian_fd(model, loss_fn, data, names), P_ref)
    res = preconditioned_sharpness(model, loss_fn, data, opt, k=2, tol=1e-10, lookahead=True)
    assert rel_err(res.eigenvalues, ev_ref[:2]) < 1e-8
    # the P of the step about to be taken is the P stored once that step is taken (same batch)
    train(model, loss_fn, data, opt, 1)
    after = PreconditionedHessianOperator(model, loss_fn, data, opt, lookahead=False).preconditioner
    torch.testing.assert_close(after, op.preconditioner, rtol=1e-11, atol=0)


@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW])
def test_lookahead_before_the_first_step(cls):
    model, loss_fn, data = mlp_ce()
    opt = cls(grouped_params(model), lr=1e-2)
    assert not opt.state
    names = names_of(model)
    grad_fn, theta = flat_grad_fn(model, loss_fn, data, names)
    g = grad_fn(theta)
    op = PreconditionedHessianOperator(model, loss_fn, data, opt, lookahead=True)
    # v = (1−β₂)g², t = 1  ⇒  v̂ = g²,  P = (1−β₁)(|g| + ε)·lr0/lr_g
    b1 = torch.cat([torch.full((p.numel(),), group_of(opt, p)["betas"][0], dtype=DT) for p in model.parameters()])
    eps = torch.cat([torch.full((p.numel(),), group_of(opt, p)["eps"], dtype=DT) for p in model.parameters()])
    fold = torch.cat([torch.full((p.numel(),), 1e-2 / group_of(opt, p)["lr"], dtype=DT) for p in model.parameters()])
    torch.testing.assert_close(op.preconditioner, (1 - b1) * (g.abs() + eps) * fold, rtol=1e-10, atol=0)
    torch.testing.assert_close(op.preconditioner, hand_P(opt, model, names, True, g), rtol=1e-12, atol=0)
    assert not opt.state  # reading state created none
    _, ev_ref = reference(dense_hessian_fd(model, loss_fn, data, names), op.preconditioner)
    res = preconditioned_sharpness(model, loss_fn, data, opt, k=2, tol=1e-10, lookahead=True)
    assert rel_err(res.eigenvalues, ev_ref[:2]) < 1e-8
    # and it equals the stored P after the first step
    train(model, loss_fn, data, opt, 1)
    torch.testing.assert_close(PreconditionedHessianOperator(model, loss_fn, data, opt, lookahead=False).preconditioner,
                               op.preconditioner, rtol=1e-11, atol=0)


# --------------------------------------------------------------------------------------------------
# nothing changes
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("factory", [dropout_mlp, cnn_bn_train], ids=["dropout", "bn-train"])
@pytest.mark.parametrize("lookahead", [False, True])
def test_state_untouched(factory, lookahead):
    model, loss_fn, data = factory()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, amsgrad=True)
    train(model, loss_fn, data, opt, 2)
    opt.zero_grad()
    loss_fn(model(data[0]), data[1]).backward()  # leave live .grad around
    before = snapshot(model, opt)
    op = PreconditionedHessianOperator(model, loss_fn, data, opt, lookahead=lookahead)
    op.matmat(torch.randn(op.shape[0], 3, dtype=DT, generator=torch.Generator().manual_seed(0)))
    preconditioned_sharpness(model, loss_fn, data, opt, k=2, tol=1e-6, lookahead=lookahead)
    stability_threshold(opt)
    assert_same_state(before, model, opt)


def test_operator_protocol():
    model, loss_fn, data = mlp_mse()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train(model, loss_fn, data, opt, 2)
    op = PreconditionedHessianOperator(model, loss_fn, data, opt, lookahead=False)
    n = op.shape[0]
    V = torch.randn(n, 4, dtype=DT, generator=torch.Generator().manual_seed(1))
    AV = op.matmat(V)
    torch.testing.assert_close(op @ V[:, 0], AV[:, 0], rtol=1e-12, atol=1e-12)
    assert op.num_hvps == 5
    D = op.preconditioner.rsqrt()
    torch.testing.assert_close(AV, D[:, None] * (op.inner @ (D[:, None] * V)), rtol=1e-12, atol=1e-12)
    assert op.loss == op.inner.loss and op.gradient is op.inner.gradient
    assert op.lr == 1e-2 and op.beta1 == 0.9
    import numpy as np
    x = np.random.default_rng(0).standard_normal(n)
    np.testing.assert_allclose(op.to_scipy() @ x, op.matvec(torch.from_numpy(x)).numpy(), rtol=1e-12)


# --------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------
def test_errors():
    model, loss_fn, data = mlp_mse()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"supports torch\.optim\.Adam, AdamW .*RMSprop.*got SGD: SGD has no "
                                        r"pre-conditioner \(P = I.*use sharpness\(\)"):
        PreconditionedHessianOperator(model, loss_fn, data, sgd)
    with pytest.raises(TypeError, match=r"got SGD: SGD has no pre-conditioner"):
        preconditioned_sharpness(model, loss_fn, data, sgd)

    fresh = torch.optim.Adam(model.parameters(), lr=1e-2)
    with pytest.raises(ValueError, match=r"no Adam state .*0\.weight.*Take an optimizer step first, or pass "
                                         r"lookahead=True"):
        PreconditionedHessianOperator(model, loss_fn, data, fresh, lookahead=False)

    only_last = torch.optim.Adam(model[2].parameters(), lr=1e-2)
    train(model, loss_fn, data, only_last, 1)
    with pytest.raises(ValueError, match=r"does not own these parameters of the operator: 0\.weight, 0\.bias"):
        PreconditionedHessianOperator(model, loss_fn, data, only_last, lookahead=False)
    PreconditionedHessianOperator(model, loss_fn, data, only_last, params=["2"])  # narrowed: fine

    partial = torch.optim.Adam([{"params": model[0].parameters()}, {"params": model[2].parameters()}], lr=1e-2)
    model[2].weight.grad = None
    model.zero_grad(set_to_none=True)
    model[0].weight.grad = torch.ones_like(model[0].weight)
    model[0].bias.grad = torch.ones_like(model[0].bias)
    partial.step()  # only the first layer has state now
    # #12.12: a parameter without state no longer blocks the operator: the one used on this data gets the P of its
    # first step (it has a gradient here), and info says so
    op = PreconditionedHessianOperator(model, loss_fn, data, partial, lookahead=False)
    assert op.info["first_step_preconditioner"] == ["2.weight", "2.bias"] and op.info["left_out"] == []
    assert op.info["preconditioner"] == "last_step"

    zero = torch.optim.Adam(model.parameters(), lr=1e-2)
    for p in model.parameters():  # initialised but never stepped (as after gi_adam_init)
        zero.state[p].update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.ones_like(p))
    with pytest.raises(ValueError, match=r"step = 0 for 0\.weight.*pass lookahead=True"):
        PreconditionedHessianOperator(model, loss_fn, data, zero, lookahead=False)

    opt = torch.optim.Adam([{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.0}],
                           lr=1e-2)
    train(model, loss_fn, data, opt, 1)
    with pytest.raises(ValueError, match=r"learning rate of parameter group 1 is 0\.0.*lr > 0"):
        PreconditionedHessianOperator(model, loss_fn, data, opt, lookahead=False)
    opt.param_groups[0]["lr"] = -1.0
    with pytest.raises(ValueError, match=r"learning rate of parameter group 0 is -1\.0"):
        PreconditionedHessianOperator(model, loss_fn, data, opt, lookahead=False)

    no_eps = torch.optim.Adam(model.parameters(), lr=1e-2, eps=0.0)
    train(model, loss_fn, data, no_eps, 1)
    with torch.no_grad():
        no_eps.state[model[2].bias]["exp_avg_sq"].zero_()
    with pytest.raises(ValueError, match=r"not positive and finite in 2\.bias"):
        PreconditionedHessianOperator(model, loss_fn, data, no_eps, lookahead=False)

    good = torch.optim.Adam(model.parameters(), lr=1e-2)
    train(model, loss_fn, data, good, 1)
    with pytest.raises(TypeError, match=r"unexpected keyword arguments: \['tolerance'\]"):
        preconditioned_sharpness(model, loss_fn, data, good, tolerance=1e-3, lookahead=False)
    with pytest.raises(ValueError, match=r"solver must be one of"):
        preconditioned_sharpness(model, loss_fn, data, good, solver="arnoldi", lookahead=False)


def test_lr_zero_in_every_group_is_the_start_of_a_warm_up():
    # P does not depend on η when the groups share it: at η = 0 (a warm-up from 0) λ_max(P⁻¹H) is the same as
    # at any η, while the threshold is undefined (an error that says so)
    model, loss_fn, data = mlp_ce()
    opt = torch.optim.Adam([{"params": model[0].parameters()}, {"params": model[2].parameters()}], lr=1e-2)
    train(model, loss_fn, data, opt, 2)
    at_lr = PreconditionedHessianOperator(model, loss_fn, data, opt, lookahead=False).preconditioner
    for g in opt.param_groups:
        g["lr"] = 0.0
    at_zero = PreconditionedHessianOperator(model, loss_fn, data, opt, lookahead=False).preconditioner
    assert torch.equal(at_lr, at_zero)
    with pytest.raises(ValueError, match="lr > 0"):
        stability_threshold(opt)


# --------------------------------------------------------------------------------------------------
# #12.4: lookahead by default; float32 accuracy of the lookahead P; #12.12: unused parameters
# --------------------------------------------------------------------------------------------------
def test_default_is_the_p_of_the_step_about_to_be_taken():
    model, loss_fn, data = mlp_mse()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train(model, loss_fn, data, opt, 2)
    names = names_of(model)
    grad, theta = flat_grad_fn(model, loss_fn, data, names)
    H = dense_hessian_fd(model, loss_fn, data, names)
    _, ev_next = reference(H, hand_P(opt, model, names, lookahead=True, grad=grad(theta)))
    _, ev_last = reference(H, hand_P(opt, model, names))
    res = preconditioned_sharpness(model, loss_fn, data, opt, tol=1e-10)
    assert res.info["preconditioner"] == "next_step" and res.info["lookahead"] is True
    assert rel_err(res.eigenvalues[:1], ev_next[:1]) < 1e-8
    last = preconditioned_sharpness(model, loss_fn, data, opt, tol=1e-10, lookahead=False)
    assert last.info["preconditioner"] == "last_step"
    assert rel_err(last.eigenvalues[:1], ev_last[:1]) < 1e-8
    assert abs(float(ev_next[0] / ev_last[0]) - 1) > 1e-3  # the two really differ here


def _float32_lm():
    torch.manual_seed(11)
    model = nn.Sequential(nn.Embedding(13, 8), nn.Tanh(), nn.Linear(8, 13))
    x = torch.randint(0, 13, (24,))
    y = torch.randint(0, 13, (24,))
    return model, nn.functional.cross_entropy, (x, y)


def test_lookahead_before_the_first_step_is_float32_accurate():
    """P = (1−β₁)(|g| + ε) at t = 1: float32 rounding of small gradient entries used to give ~2e-3 error in
    λ(P⁻¹H); the lookahead gradient is now taken in float64. Reference: the same model in float64, dense FD H."""
    model, loss_fn, data = _float32_lm()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    res = preconditioned_sharpness(model, loss_fn, data, opt, tol=1e-7, max_iters=500)
    ref_model = copy.deepcopy(model).double()
    names = names_of(ref_model)
    grad, theta = flat_grad_fn(ref_model, loss_fn, data, names)
    H = dense_hessian_fd(ref_model, loss_fn, data, names)
    ref_opt = torch.optim.Adam(ref_model.parameters(), lr=1e-3)
    _, ev = reference(H, hand_P(ref_opt, ref_model, names, lookahead=True, grad=grad(theta)))
    err = abs(float(res.eigenvalues[0]) - float(ev[0])) / float(ev[0])
    print(f"\nfloat32 lookahead λ(P⁻¹H) before the first step: {float(res.eigenvalues[0]):.6g} vs float64 "
          f"{float(ev[0]):.6g}, relative error {err:.1e}")
    assert err <= 1e-5
    # lookahead_dtype=None: P from the operator's own float32 gradient (no extra pass), float32-accurate only
    cheap = preconditioned_sharpness(model, loss_fn, data, opt, tol=1e-7, max_iters=500, lookahead_dtype=None)
    assert abs(float(cheap.eigenvalues[0]) - float(ev[0])) / float(ev[0]) < 1e-3


class UnusedHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
        self.aux = nn.Linear(6, 2)  # never used: Adam keeps no state for it

    def forward(self, x):
        return self.body(x)


def test_unused_head_does_not_block_and_is_left_out():
    torch.manual_seed(12)
    model = UnusedHead().to(DT)
    loss_fn = nn.functional.cross_entropy
    data = (torch.randn(10, 4, dtype=DT), torch.randint(0, 3, (10,)))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train(model, loss_fn, data, opt, 2)
    assert model.aux.weight not in opt.state or "exp_avg_sq" not in opt.state[model.aux.weight]
    used = [n for n in names_of(model) if n.startswith("body")]
    H = dense_hessian_fd(model, loss_fn, data, used)
    for lookahead in (True, False):
        res = preconditioned_sharpness(model, loss_fn, data, opt, tol=1e-10, lookahead=lookahead)
        assert res.info["left_out"] == ["aux.weight", "aux.bias"]
        grad, theta = flat_grad_fn(model, loss_fn, data, used)
        _, ev = reference(H, hand_P(opt, model, used, lookahead=lookahead, grad=grad(theta)))
        assert rel_err(res.eigenvalues[:1], ev[:1]) < 1e-8


def test_lookahead_gradient_auto_is_float64_only_before_the_first_step():
    """lookahead_dtype="auto" (default): the float64 gradient pass runs while a parameter has no Adam state (P ∝ |g|
    there); after a step the operator's own float32 gradient gives the same λ(P⁻¹H) to float32 accuracy (v's
    history dominates) without the extra pass."""
    model, loss_fn, data = _float32_lm()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = preconditioned_sharpness(model, loss_fn, data, opt, tol=1e-7, max_iters=500)
    assert before.info["lookahead_gradient"] == "float64"
    opt.zero_grad()
    loss_fn(model(data[0]), data[1]).backward()
    opt.step()
    auto = preconditioned_sharpness(model, loss_fn, data, opt, tol=1e-7, max_iters=500)
    wide = preconditioned_sharpness(model, loss_fn, data, opt, tol=1e-7, max_iters=500,
                                    lookahead_dtype=torch.float64)
    assert auto.info["lookahead_gradient"] == "float32" and wide.info["lookahead_gradient"] == "float64"
    # reference: float64 model, dense FD Hessian, hand-built lookahead P from the float64 gradient
    ref_model = copy.deepcopy(model).double()
    names = names_of(ref_model)
    grad, theta = flat_grad_fn(ref_model, loss_fn, data, names)
    H = dense_hessian_fd(ref_model, loss_fn, data, names)
    ref_opt = torch.optim.Adam(ref_model.parameters(), lr=1e-3)
    ref_opt.load_state_dict(opt.state_dict())
    _, ev = reference(H, hand_P(ref_opt, ref_model, names, lookahead=True, grad=grad(theta)))
    for res in (auto, wide):
        assert abs(float(res.eigenvalues[0]) - float(ev[0])) / float(ev[0]) <= 1e-5
    with pytest.raises(TypeError, match="lookahead_dtype"):
        preconditioned_sharpness(model, loss_fn, data, opt, lookahead_dtype="float64")
