"""The finite-difference HVP route (``method="finite_difference"``) against the dense float64 reference.

The reference (``conftest.dense_hessian_fd``) is itself built from central differences, but of a functional
copy of the model with its own step; the route under test runs the model's own forward/backward on its real
parameters. Checked: accuracy per model of the zoo and per order, the step rule, bitwise restoration of
parameters / buffers / ``.grad`` / RNG after every HVP (also when a forward raises), frozen dropout masks,
fused SDPA + activation checkpointing, λ_max through Lanczos, and :func:`compare_hvp_routes`.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from conftest import DT, ZOO, assert_same_state, dense_reference, dropout_mlp, rel_err, snapshot, transformer
from curvature.diagnostics import compare_hvp_routes
from curvature.finite_difference import finite_difference_step
from curvature.operators import HessianOperator
from curvature.solvers import lanczos


def _directions(n: int, k: int = 3, dtype=DT) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("order", [2, 4])
def test_matches_dense_reference_on_the_zoo(zoo_case, order):
    name, (model, loss_fn, data) = zoo_case
    before = snapshot(model)
    op = HessianOperator(model, loss_fn, data, method="finite_difference", fd_order=order)
    assert op.method == "finite_difference"
    H = dense_reference(name)
    V = _directions(H.shape[0])
    assert rel_err(op.matmat(V), H @ V) < 1e-6, name
    exact = HessianOperator(model, loss_fn, data)
    assert abs(op.loss - exact.loss) <= 1e-12 * abs(exact.loss)
    assert rel_err(op.gradient, exact.gradient) < 1e-12
    assert_same_state(before, model)


def test_step_rule_and_validation():
    assert finite_difference_step(0.1, torch.float64) == pytest.approx(0.25 * (2.0 ** -53) ** (1 / 3))  # floor 1
    assert finite_difference_step(10.0, torch.float32) == pytest.approx(2.5 * (2.0 ** -24) ** (1 / 3))
    assert finite_difference_step(10.0, torch.float32, order=4) == pytest.approx(2.5 * (2.0 ** -24) ** 0.2)
    model, loss_fn, data = ZOO["mlp_mse"]()
    with pytest.raises(ValueError, match="fd_order"):
        HessianOperator(model, loss_fn, data, method="finite_difference", fd_order=3)
    with pytest.raises(ValueError, match="fd_epsilon"):
        HessianOperator(model, loss_fn, data, method="finite_difference", fd_epsilon=-1.0)
    with pytest.raises(ValueError, match="finite_difference"):
        HessianOperator(model, loss_fn, data, fd_order=4)
    with pytest.raises(ValueError, match="method must be one of"):
        HessianOperator(model, loss_fn, data, method="fd")


def test_state_restored_bitwise_with_grads_buffers_and_rng():
    model, loss_fn, data = ZOO["cnn_bn_train"]()  # train-mode BatchNorm: the forward writes running stats
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    grads = [p.grad for p in model.parameters()]
    before = snapshot(model)
    for mode in ("autograd", "backward"):
        op = HessianOperator(model, loss_fn, data, method="finite_difference")
        op.engine.gradient_mode = mode
        op.matmat(_directions(op.shape[0], 2))
        assert_same_state(before, model)
        assert all(p.grad is g for p, g in zip(model.parameters(), grads)), mode  # the same tensors


def test_state_restored_when_a_forward_raises():
    model, _, data = ZOO["mlp_ce"]()
    calls = {"n": 0}

    def flaky_loss(out, y):
        calls["n"] += 1
        if calls["n"] == 4:  # inside the second HVP's perturbed evaluation
            raise RuntimeError("simulated out of memory")
        return F.cross_entropy(out, y)

    before = snapshot(model)
    op = HessianOperator(model, flaky_loss, data, method="finite_difference")
    op.matvec(_directions(op.shape[0], 1)[:, 0])
    with pytest.raises(RuntimeError, match="simulated"):
        op.matvec(_directions(op.shape[0], 1)[:, 0])
    assert_same_state(before, model)


def test_dropout_masks_are_frozen_and_shared_with_the_exact_route():
    model, loss_fn, data = dropout_mlp()
    exact = HessianOperator(model, loss_fn, data, seed=7)
    fd = HessianOperator(model, loss_fn, data, method="finite_difference", seed=7)
    V = _directions(exact.shape[0])
    a, b = fd.matmat(V), fd.matmat(V)
    assert torch.equal(a, b)  # one fixed operator
    assert rel_err(a, exact.matmat(V)) < 1e-7  # the same masks as the exact route's functional forward


class CheckpointedSDPA(nn.Module):
    """Pre-LN block, fused 4-D SDPA (no double backward) inside non-reentrant activation checkpointing."""

    def __init__(self, d=8, heads=2, vocab=11, use_checkpoint=True):
        super().__init__()
        self.heads = heads
        self.use_checkpoint = use_checkpoint
        self.emb = nn.Embedding(vocab, d)
        self.ln = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def _attn(self, x):
        B, T, _ = x.shape
        q, k, v = self.qkv(self.ln(x)).split(x.shape[-1], dim=-1)
        sh = lambda t: t.view(B, T, self.heads, -1).transpose(1, 2)  # noqa: E731
        return x + F.scaled_dot_product_attention(sh(q), sh(k), sh(v), is_causal=True).transpose(1, 2).reshape(B, T, -1)

    def forward(self, idx):
        x = self.emb(idx)
        return self.head(checkpoint(self._attn, x, use_reentrant=False) if self.use_checkpoint else self._attn(x))


def test_fused_attention_with_activation_checkpointing():
    torch.manual_seed(0)
    model = CheckpointedSDPA().to(DT)
    idx, y = torch.randint(0, 11, (3, 6)), torch.randint(0, 11, (3, 6))
    lm = lambda out, t: F.cross_entropy(out.reshape(-1, out.shape[-1]), t.reshape(-1))  # noqa: E731
    fd = HessianOperator(model, lm, (idx, y), method="finite_difference")
    V = _directions(fd.shape[0])
    plain = CheckpointedSDPA(use_checkpoint=False).to(DT)
    plain.load_state_dict(model.state_dict())
    exact = HessianOperator(plain, lm, (idx, y))  # same function without checkpointing, MATH attention kernel
    assert rel_err(fd.matmat(V), exact.matmat(V)) < 1e-7
    # the exact route runs checkpointed blocks without recomputation inside its context: exact there too
    assert rel_err(HessianOperator(model, lm, (idx, y)).matmat(V), exact.matmat(V)) < 1e-10


def test_lambda_max_float32_and_float64_copy():
    model, loss_fn, data = transformer()
    ref = float(lanczos(HessianOperator(model, loss_fn, data), 1, tol=1e-10).eigenvalues[0])
    m32 = transformer()[0].float()
    d32 = (data[0], data[1])
    lam32 = float(lanczos(HessianOperator(m32, loss_fn, d32, method="finite_difference"), 1, tol=1e-5).eigenvalues[0])
    assert abs(lam32 - ref) <= 1e-3 * abs(ref)
    # dtype=float64 on a float32 model: a private float64 copy (the user's model is untouched)
    before = snapshot(m32)
    op = HessianOperator(m32, loss_fn, d32, method="finite_difference", dtype=torch.float64)
    assert op.dtype == torch.float64
    lam64 = float(lanczos(op, 1, tol=1e-10).eigenvalues[0])
    ref32 = float(lanczos(HessianOperator(m32, loss_fn, d32, dtype=torch.float64), 1, tol=1e-10).eigenvalues[0])
    assert abs(lam64 - ref32) <= 1e-7 * abs(ref32)
    assert_same_state(before, m32)


def test_compare_hvp_routes_reports_accuracy_and_cost():
    model, loss_fn, data = ZOO["transformer"]()
    c = compare_hvp_routes(model, loss_fn, data, lambda_max=True, tol=1e-9, fd_order=4)
    assert len(c.hvp_errors) == 3 and c.max_hvp_error < 1e-7
    assert c.lambda_max_error < 1e-7
    assert c.seconds_exact > 0 and c.seconds_fd > 0 and c.exact_method == "reverse_over_reverse"
    assert "finite differences" in str(c)
    c32 = compare_hvp_routes(transformer()[0].float(), loss_fn, data, fd_order=4)
    assert 1e-8 < c32.max_hvp_error < 1e-2 and c32.dtype == torch.float32 and math.isfinite(c32.epsilon)


def test_a_graph_built_before_stays_valid():
    """A training loop may compute its loss, measure curvature, then call backward: the FD route must not bump
    the parameters' version counters (no in-place writes on them)."""
    model, loss_fn, (X, Y) = ZOO["mlp_ce"]()
    loss = loss_fn(model(X), Y)
    versions = [p._version for p in model.parameters()]
    HessianOperator(model, loss_fn, (X, Y), method="finite_difference").matmat(_directions(sum(p.numel() for p in model.parameters()), 2))
    assert [p._version for p in model.parameters()] == versions
    loss.backward()  # would raise "modified by an inplace operation" otherwise


def test_compiled_model_runs_its_compiled_forward():
    """torch.compile'd model: the FD route calls the compiled module itself (no unwrapping), and the perturbed
    parameters reach the compiled graph (no stale guards / recompiles every HVP)."""
    import torch._dynamo

    model, loss_fn, data = ZOO["mlp_ce"]()
    counter = {"n": 0}

    def backend(gm, example_inputs):
        counter["n"] += 1
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    before = snapshot(model)
    op = HessianOperator(compiled, loss_fn, data, method="finite_difference")
    V = _directions(op.shape[0], 2)
    got = op.matmat(V)
    assert counter["n"] >= 1  # the compiled graph ran
    compiles = counter["n"]
    op.matmat(V)
    assert counter["n"] == compiles  # no recompilation per HVP
    assert rel_err(got, HessianOperator(model, loss_fn, data).matmat(V)) < 1e-7
    assert_same_state(before, model)
    torch._dynamo.reset()


def test_a_solve_holds_the_rng_once_and_restores_it_also_when_interrupted():
    """diagnostics.solve saves the RNG states once (holding_rng) instead of around every gradient: the HVPs of a
    dropout model are the same inside the hold, the states are the caller's afterwards, also after an error."""
    import random

    import numpy as np

    from curvature._exact import frozen_rng, holding_rng
    from curvature.diagnostics import solve

    model, loss_fn, data = dropout_mlp()
    fd = HessianOperator(model, loss_fn, data, method="finite_difference", fd_order=1, seed=3)
    V = _directions(fd.shape[0], 2)
    outside = fd.matmat(V)
    torch.manual_seed(11), random.seed(11), np.random.seed(11)
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    with holding_rng(fd.device):
        inside = fd.matmat(V)
        torch.rand(3)  # the hold restores on exit what anything inside drew
    assert torch.equal(inside, outside)
    res = solve(fd, 1, "lanczos", None, 8, None, True, 0, 1e-3)
    assert math.isfinite(float(res.eigenvalues[0]))

    def interrupted(_):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), holding_rng(fd.device):
        with frozen_rng(fd.device):  # saves nothing inside the hold: the hold's own restore must cover it
            torch.rand(5), random.random(), np.random.rand()
            interrupted(None)
    assert torch.equal(torch.get_rng_state(), states[0])
    assert random.getstate() == states[1]
    assert np.array_equal(np.random.get_state()[1], states[2])


def test_the_solvers_finiteness_check_still_catches_nan_and_inf_but_not_large_finite_values():
    from curvature.solvers._common import CountedApply

    class Fixed:
        def __init__(self, Y):
            self.Y = Y

        def matmat(self, V):
            return self.Y

    V = torch.ones(4, 1, dtype=torch.float64)
    for bad in (float("nan"), float("inf"), -float("inf")):
        Y = torch.ones(4, 1, dtype=torch.float64)
        Y[2, 0] = bad
        with pytest.raises(FloatingPointError, match="NaN/inf"):
            CountedApply(Fixed(Y))(V, 1)
    huge = torch.full((4, 1), 1e308, dtype=torch.float64)  # finite entries whose float64 sum overflows
    assert torch.equal(CountedApply(Fixed(huge))(V, 1), huge)
    inf_pair = torch.tensor([[float("inf")], [-float("inf")], [1.0], [1.0]], dtype=torch.float64)  # sum: NaN
    with pytest.raises(FloatingPointError):
        CountedApply(Fixed(inf_pair))(V, 1)
