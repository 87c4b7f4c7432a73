"""HVPs of every route against the dense central-difference Hessian, on the whole model zoo."""
import logging

import pytest
import torch
from conftest import ZOO, dense_hessian_fd, dense_reference, mlp_mse, rel_err, transformer, unequal_batches

import curvature as cv

METHODS = ["reverse_over_reverse", "forward_over_reverse"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", sorted(ZOO))
def test_hvp_matches_finite_differences(name, method):
    model, loss_fn, data = ZOO[name]()
    H = dense_reference(name)
    op = cv.HessianOperator(model, loss_fn, data, method=method)
    assert op.shape == H.shape and op.dtype == torch.float64
    gen = torch.Generator().manual_seed(0)
    V = torch.randn(op.shape[0], 5, generator=gen, dtype=torch.float64)
    assert rel_err(op.matmat(V), H @ V) <= 1e-6          # a block (batched)
    assert rel_err(op.matvec(V[:, 0]), H @ V[:, 0]) <= 1e-6  # a single vector
    assert rel_err(op @ V[:, 1], H @ V[:, 1]) <= 1e-6
    assert op.num_hvps == 7


def test_uncached_graph_and_chunked_vmap_agree():
    model, loss_fn, data = transformer()
    H = dense_reference("transformer")
    V = torch.randn(H.shape[0], 6, dtype=torch.float64)
    for kw in ({"cache_graph": False}, {"method": "forward_over_reverse", "chunk_size": 2}):
        assert rel_err(cv.HessianOperator(model, loss_fn, data, **kw).matmat(V), H @ V) <= 1e-6


def test_forward_over_reverse_falls_back_where_pytorch_lacks_it(caplog):
    # F.mse_loss under jvp(grad(.)) raises "ZeroTensors are immutable" on torch 2.13: the engine must fall
    # back to double backward, say so in a DEBUG log, and still be exact.
    model, loss_fn, data = mlp_mse()
    op = cv.HessianOperator(model, loss_fn, data, method="forward_over_reverse")
    v = torch.randn(op.shape[0], dtype=torch.float64)
    with caplog.at_level(logging.DEBUG, logger="curvature.hvp"):
        hv = op.matvec(v)
    assert rel_err(hv, dense_reference("mlp_mse") @ v) <= 1e-6
    if op.method == "reverse_over_reverse":
        assert any("falling back" in r.message for r in caplog.records)


def test_float32_model_validated_in_float64():
    model, loss_fn, (x, y) = ZOO["mlp_ce"]()
    H = dense_reference("mlp_ce")
    m32 = model.float()
    op32 = cv.HessianOperator(m32, loss_fn, (x.float(), y))
    op64 = cv.HessianOperator(m32, loss_fn, (x.float(), y), dtype=torch.float64)
    assert op32.dtype == torch.float32 and op64.dtype == torch.float64
    assert all(p.dtype == torch.float32 for p in m32.parameters())  # the model itself is not cast
    v = torch.randn(op64.shape[0], dtype=torch.float64)
    # the float32 parameters differ from the float64 zoo model by rounding only
    H32 = dense_hessian_fd(m32.double(), loss_fn, (x, y)); m32.float()
    assert rel_err(op64.matvec(v), H32 @ v) <= 1e-6
    assert rel_err(op32.matvec(v.float()).double(), H32 @ v) <= 1e-4
    assert rel_err(H32, H) <= 1e-5


def test_several_batches_weighted_by_sample_count():
    model, loss_fn, data = unequal_batches()
    H = dense_reference("unequal_batches")
    # the unweighted average of per-batch Hessians is a different matrix: make sure we are not computing it
    Hs = [dense_hessian_fd(model, loss_fn, b) for b in data]
    unweighted = sum(Hs) / len(Hs)
    weighted = sum(h * b[1].shape[0] for h, b in zip(Hs, data)) / sum(b[1].shape[0] for b in data)
    assert rel_err(weighted, H) <= 1e-8 and rel_err(unweighted, H) > 1e-3
    op = cv.HessianOperator(model, loss_fn, iter(data))  # any iterable (a generator) works, read once
    assert op.num_samples == 22
    assert rel_err(op.to_dense(), H) <= 1e-6


def test_max_batch_size_splits_without_changing_the_matrix():
    model, loss_fn, data = ZOO["mlp_ce"]()
    H = dense_reference("mlp_ce")
    op = cv.HessianOperator(model, loss_fn, data, max_batch_size=6)  # 20 samples -> 6+6+6+2
    assert len(op.engine.batches) == 4
    assert rel_err(op.to_dense(), H) <= 1e-6


def test_loss_and_gradient_are_the_dataset_means():
    model, loss_fn, data = unequal_batches()
    op = cv.HessianOperator(model, loss_fn, data)
    n = sum(b[1].shape[0] for b in data)
    loss = sum(float(loss_fn(model(x), y)) * y.shape[0] for x, y in data) / n
    model.zero_grad()
    sum(loss_fn(model(x), y) * y.shape[0] / n for x, y in data).backward()
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    assert abs(op.loss - loss) <= 1e-12 * abs(loss) and rel_err(op.gradient, g) <= 1e-12


# --- #12.6: an operator is a snapshot of the point it was built at ---------------------------------------
@pytest.mark.parametrize("n_batches", [1, 2])
def test_operator_is_a_snapshot_of_its_point(n_batches):
    model, loss_fn, (x, y) = ZOO["mlp_ce"]()
    data = (x, y) if n_batches == 1 else [(x[:12], y[:12]), (x[12:], y[12:])]
    H_old = dense_hessian_fd(model, loss_fn, data)
    op = cv.HessianOperator(model, loss_fn, data)
    loss_old, grad_old = op.loss, op.gradient.clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):  # train on: the live parameters move
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    H_new = dense_hessian_fd(model, loss_fn, data)
    assert rel_err(H_new, H_old) > 1e-2  # the point really moved
    V = torch.randn(op.shape[0], 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert rel_err(op.matmat(V), H_old @ V) <= 1e-6
    assert rel_err(op @ V[:, 0], H_old @ V[:, 0]) <= 1e-6
    assert op.loss == loss_old and torch.equal(op.gradient, grad_old)
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert not torch.equal(op.parameter_vector(), theta)


def test_changed_frozen_parameter_raises_instead_of_mixing_points():
    model, loss_fn, data = ZOO["partly_frozen"]()
    op = cv.HessianOperator(model, loss_fn, data, cache_graph=False)
    v = torch.randn(op.shape[0], dtype=torch.float64)
    op.matvec(v)
    with torch.no_grad():
        model[0].weight.add_(0.1)  # frozen (requires_grad=False): held by reference, not copied
    with pytest.raises(RuntimeError, match=r"frozen parameter\(s\) 0.weight changed"):
        op.matvec(v)


# --- #15.3: only forward-AD failures fall back ------------------------------------------------------------
def test_forward_over_reverse_propagates_the_loss_fns_own_runtime_error():
    model, _, data = ZOO["mlp_ce"]()
    calls = {"n": 0}

    def buggy(out, y):
        calls["n"] += 1
        if calls["n"] > 1:  # fine while the operator is built, broken afterwards
            raise RuntimeError("user bug")
        return torch.nn.functional.cross_entropy(out, y)

    op = cv.HessianOperator(model, buggy, data, method="forward_over_reverse")
    with pytest.raises(RuntimeError, match="user bug"):
        op.matmat(torch.randn(op.shape[0], 2, dtype=torch.float64))
    assert op.method == "forward_over_reverse"  # no silent switch to double backward


# --- #12.10: ops without double backward --------------------------------------------------------------------
class _SE(torch.nn.Module):
    """MobileNetV3-style squeeze-excitation gate (nn.Hardsigmoid) plus a functional F.hardsigmoid and
    an inplace one; hardswish too."""

    def __init__(self):
        super().__init__()
        self.fc1, self.gate, self.fc2 = torch.nn.Linear(4, 6), torch.nn.Hardsigmoid(), torch.nn.Linear(6, 3)
        self.act = torch.nn.Hardswish()

    def forward(self, x):
        h = self.fc1(x)
        h = h * self.gate(h) + torch.nn.functional.hardsigmoid(2 * h) + self.act(h)
        return self.fc2(torch.nn.functional.hardsigmoid(h, inplace=True))


def test_hardsigmoid_is_substituted_exactly():
    torch.manual_seed(0)
    model = _SE().double()
    x, y = torch.randn(32, 4, dtype=torch.float64) * 2, torch.randint(0, 3, (32,))
    H = dense_hessian_fd(model, torch.nn.functional.cross_entropy, (x, y))
    V = torch.randn(H.shape[0], 3, dtype=torch.float64)
    hardsigmoid = torch.nn.functional.hardsigmoid
    for method in METHODS:
        op = cv.HessianOperator(model, torch.nn.functional.cross_entropy, (x, y), method=method)
        assert rel_err(op.matmat(V), H @ V) <= 1e-6
        assert rel_err(op.matvec(V[:, 0]), H @ V[:, 0]) <= 1e-6
    assert torch.nn.functional.hardsigmoid is hardsigmoid  # restored: the very same function object
    assert torch.equal(cv._exact.SUBSTITUTIONS["hardsigmoid"](x), hardsigmoid(x))  # same values


class _Dist(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3, 4)
        self.centres = torch.nn.Parameter(torch.randn(2, 4))

    def forward(self, x):
        return -torch.cdist(self.proj(x), self.centres)  # aten::_cdist_backward has no derivative


class CdistHead(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.cdist = _Dist()

    def forward(self, x):
        return self.cdist(x)


def test_op_without_double_backward_raises_naming_op_and_module():
    torch.manual_seed(0)
    model = CdistHead().double()
    data = (torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,)))
    for method in METHODS:
        with pytest.raises(cv.SecondOrderError, match=r"_cdist_backward, called by module 'cdist' \(_Dist\)"):
            cv.sharpness(model, torch.nn.functional.cross_entropy, data, method=method, max_iters=3)


class _OnceDifferentiable(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.pow(3)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * x.pow(2) * g


class _Cube(torch.nn.Module):
    def forward(self, x):
        return _OnceDifferentiable.apply(x)


def test_once_differentiable_function_raises_clearly():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), _Cube(), torch.nn.Linear(4, 2)).double()
    data = (torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,)))
    with pytest.raises(cv.SecondOrderError, match="once_differentiable"):
        cv.sharpness(model, torch.nn.functional.cross_entropy, data, max_iters=3)
