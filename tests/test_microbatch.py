"""Memory-bounded HVPs: ``max_batch_size=`` splits batches into micro-batches weighted by their size.

For models whose samples do not interact, Σ_micro n_μ ∇²L_μ / N is the same matrix as the full-batch
Hessian; only the order of floating-point sums changes, so in float64 the products agree to ≤ 1e-12
relative. Train-mode BatchNorm couples the samples of a batch, so micro-batching would change the function:
it is refused with a clear error.
"""
from __future__ import annotations

import pytest
import torch

from curvature.diagnostics import sharpness
from curvature.operators import HessianOperator
from conftest import DT, ZOO, cnn_bn_train, dropout_mlp, mlp_mse, rel_err

CASES = sorted(k for k in ZOO if k != "cnn_bn_train")


def _directions(n, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g, dtype=DT)


@pytest.mark.parametrize("name", CASES)
def test_microbatched_hvp_equals_full_batch(name):
    model, loss_fn, data = ZOO[name]()
    full = HessianOperator(model, loss_fn, data)
    micro = HessianOperator(model, loss_fn, data, max_batch_size=3)
    assert micro.num_samples == full.num_samples
    assert len(micro.engine.batches) > len(full.engine.batches)  # it really split
    V = _directions(full.shape[0])
    assert rel_err(micro.matmat(V), full.matmat(V)) <= 1e-12
    assert micro.loss == pytest.approx(full.loss, rel=1e-12)
    assert rel_err(micro.gradient, full.gradient) <= 1e-12


@pytest.mark.parametrize("method", ["reverse_over_reverse", "forward_over_reverse"])
@pytest.mark.parametrize("size", [1, 5, 1000])
def test_microbatch_sizes_and_methods(method, size):
    model, loss_fn, data = mlp_mse()  # 16 samples
    full = HessianOperator(model, loss_fn, data, method=method)
    micro = HessianOperator(model, loss_fn, data, method=method, max_batch_size=size)
    assert len(micro.engine.batches) == -(-16 // size)
    V = _directions(full.shape[0], 3, seed=1)
    assert rel_err(micro.matmat(V), full.matmat(V)) <= 1e-12
    assert rel_err(micro.matvec(V[:, 0]), full.matvec(V[:, 0])) <= 1e-12


def test_microbatched_sharpness():
    model, loss_fn, data = mlp_mse()
    a = sharpness(model, loss_fn, data, k=1, tol=1e-9)
    b = sharpness(model, loss_fn, data, k=1, tol=1e-9, max_batch_size=6)
    assert rel_err(b.eigenvalues, a.eigenvalues) <= 1e-10


def test_train_mode_batchnorm_is_refused():
    model, loss_fn, data = cnn_bn_train()
    with pytest.raises(ValueError, match="BatchNorm in train mode"):
        HessianOperator(model, loss_fn, data, max_batch_size=4)
    with pytest.raises(ValueError, match="BatchNorm in train mode"):
        sharpness(model, loss_fn, data, max_batch_size=4)
    model.eval()  # eval mode uses running statistics: samples independent, allowed and exact
    full = HessianOperator(model, loss_fn, data)
    micro = HessianOperator(model, loss_fn, data, max_batch_size=3)
    V = _directions(full.shape[0])
    assert rel_err(micro.matmat(V), full.matmat(V)) <= 1e-12


def test_bad_max_batch_size():
    model, loss_fn, data = mlp_mse()
    with pytest.raises(ValueError, match="max_batch_size"):
        HessianOperator(model, loss_fn, data, max_batch_size=0)


def test_dropout_microbatched_operator_is_still_one_symmetric_matrix():
    """With dropout, micro-batches draw their own (frozen) masks, so the matrix differs from the full-batch
    one (a different draw of the same random Hessian), but it is still one fixed symmetric matrix."""
    model, loss_fn, data = dropout_mlp()
    op = HessianOperator(model, loss_fn, data, max_batch_size=5, seed=0)
    A = op.to_dense()
    assert torch.allclose(A, A.T, atol=1e-12 * float(A.abs().max()))
    assert torch.equal(op.to_dense(), A)
