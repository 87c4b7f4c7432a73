"""The LinearOperator protocol of HessianOperator, per-layer blocks, data forms."""
import numpy as np
import pytest
import scipy.sparse.linalg as sla
import torch
from conftest import ZOO, dense_reference, rel_err, transformer

import curvature as cv


def test_protocol_shape_dtype_device_and_counting():
    model, loss_fn, data = ZOO["mlp_ce"]()
    op = cv.HessianOperator(model, loss_fn, data)
    n = sum(p.numel() for p in model.parameters())
    assert op.shape == (n, n) and op.dtype == torch.float64 and op.device == torch.device("cpu")
    assert op.num_hvps == 0
    op.matvec(torch.randn(n, dtype=torch.float64))
    op.matmat(torch.randn(n, 3, dtype=torch.float64))
    op @ torch.randn(n, 2, dtype=torch.float64)
    assert op.num_hvps == 6
    with pytest.raises(ValueError, match="1-D tensor of length"):
        op.matvec(torch.randn(n + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"shape \(\d+, k\)"):
        op.matmat(torch.randn(3, n, dtype=torch.float64))


def test_to_scipy_with_eigsh_largest_algebraic():
    model, loss_fn, data = ZOO["cnn_bn_train"]()
    H = dense_reference("cnn_bn_train")
    op = cv.HessianOperator(model, loss_fn, data)
    lin = op.to_scipy()
    assert isinstance(lin, sla.LinearOperator) and lin.shape == op.shape and lin.dtype == np.float64
    top = sla.eigsh(lin, k=2, which="LA", tol=1e-10, return_eigenvectors=False)
    ref = torch.linalg.eigvalsh(H)[-2:].numpy()
    assert np.allclose(np.sort(top), ref, rtol=1e-6)


@pytest.mark.parametrize("selector", ["names", "prefix", "tensors"])
def test_params_subset_is_the_diagonal_block(selector):
    model, loss_fn, data = transformer()
    H = dense_reference("transformer")
    names = [n for n, _ in model.named_parameters()]
    sizes = [p.numel() for p in model.parameters()]
    offsets = np.cumsum([0] + sizes)
    wanted = ["ln1.weight", "ln1.bias", "qkv.weight"]
    idx = torch.cat([torch.arange(offsets[names.index(w)], offsets[names.index(w) + 1]) for w in wanted])
    params = {"names": wanted, "prefix": ["ln1", "qkv.weight"],
              "tensors": [model.ln1.weight, model.ln1.bias, model.qkv.weight]}[selector]
    op = cv.HessianOperator(model, loss_fn, data, params=params)
    assert op.param_names == wanted
    assert rel_err(op.to_dense(), H[idx][:, idx]) <= 1e-6


def test_tied_weights_counted_once():
    model, loss_fn, data = transformer()
    op = cv.HessianOperator(model, loss_fn, data)
    assert "head.weight" not in op.param_names and "emb.weight" in op.param_names
    assert op.shape[0] == sum(p.numel() for p in model.parameters())


def test_frozen_parameters_are_left_out():
    model, loss_fn, data = ZOO["partly_frozen"]()
    op = cv.HessianOperator(model, loss_fn, data)
    assert "0.weight" not in op.param_names and "2.bias" not in op.param_names
    assert rel_err(op.to_dense(), dense_reference("partly_frozen")) <= 1e-6


def test_dataloader_is_read_once_even_when_it_shuffles():
    torch.manual_seed(0)
    model, loss_fn, (x, y) = ZOO["mlp_ce"]()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=6, shuffle=True)
    before = torch.get_rng_state()
    op = cv.HessianOperator(model, loss_fn, loader)
    assert op.num_samples == 20 and len(op.engine.batches) == 4
    v = torch.randn(op.shape[0], dtype=torch.float64)
    a, b = op.matvec(v), op.matvec(v)
    assert torch.equal(a, b)
    # the mean over all of the data is the full-batch Hessian whatever the order
    assert rel_err(op.to_dense(), dense_reference("mlp_ce")) <= 1e-6
    del before


def test_matrix_operator_and_repr():
    A = torch.diag(torch.arange(1.0, 5.0, dtype=torch.float64))
    op = cv.MatrixOperator(A)
    assert torch.equal(op @ torch.ones(4, dtype=torch.float64), torch.arange(1.0, 5.0, dtype=torch.float64))
    assert "MatrixOperator(shape=(4, 4)" in repr(op)
