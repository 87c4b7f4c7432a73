"""Bad input gets a clear error that names the problem."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvature as cv


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


X, Y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,))


def test_non_scalar_loss():
    with pytest.raises(ValueError, match="scalar"):
        cv.HessianOperator(_mlp(), lambda o, y: F.cross_entropy(o, y, reduction="none"), (X, Y))


def test_nan_loss_names_the_batch():
    bad = X.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"loss is nan at batch 1 of 2"):
        cv.sharpness(_mlp(), F.cross_entropy, [(X, Y), (bad, Y)])


def test_infinite_gradient_names_the_parameter():
    model = _mlp()
    with torch.no_grad():
        model[2].weight[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match=r"parameter '2\.weight' holds 1 non-finite value"):
        cv.sharpness(model, F.cross_entropy, (X, Y))

    def loss_fn(out, y):  # finite loss, infinite gradient in one parameter: d/dx sqrt(x) at 0
        return F.cross_entropy(out, y) + torch.sqrt(model[0].bias.abs()).sum() * 0
    m = _mlp()
    with torch.no_grad():
        m[0].bias.zero_()

    def loss_sqrt(out, y):
        return F.cross_entropy(out, y)
    # a model whose output goes through sqrt(0) in one parameter
    class SqrtNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.zeros(2, dtype=torch.float64))
            self.lin = nn.Linear(3, 2).double()

        def forward(self, x):
            return self.lin(x) + torch.sqrt(self.a)
    with pytest.raises(FloatingPointError, match=r"gradient is not finite \(NaN/inf\) in parameter 'a'"):
        cv.sharpness(SqrtNet(), loss_sqrt, (X, Y))


def test_no_trainable_parameters():
    model = _mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        cv.sharpness(model, F.cross_entropy, (X, Y))


def test_empty_data():
    with pytest.raises(ValueError, match="data is empty"):
        cv.sharpness(_mlp(), F.cross_entropy, [])
    with pytest.raises(ValueError, match="batch 0 is empty"):
        cv.sharpness(_mlp(), F.cross_entropy, (X[:0], Y[:0]))


def test_unknown_param_name_lists_the_real_ones():
    with pytest.raises(ValueError, match=r"'fc9'.*0\.weight, 0\.bias, 2\.weight, 2\.bias"):
        cv.HessianOperator(_mlp(), F.cross_entropy, (X, Y), params=["fc9"])


def test_k_larger_than_dimension():
    model = nn.Linear(2, 1).double()
    with pytest.raises(ValueError, match="k"):
        cv.sharpness(model, F.mse_loss, (torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 1, dtype=torch.float64)), k=4)


def test_unknown_solver_and_method():
    with pytest.raises(ValueError, match="solver must be one of"):
        cv.sharpness(_mlp(), F.cross_entropy, (X, Y), solver="arnoldi")
    with pytest.raises(ValueError, match="method must be one of"):
        cv.HessianOperator(_mlp(), F.cross_entropy, (X, Y), method="magic")


def test_data_that_is_not_batches():
    with pytest.raises(TypeError, match="batch"):
        cv.sharpness(_mlp(), F.cross_entropy, [X, Y, X])
    with pytest.raises(TypeError, match="data must be a batch"):
        cv.sharpness(_mlp(), F.cross_entropy, 42)


def test_micro_batching_refused_for_train_mode_batchnorm():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double().train()
    with pytest.raises(ValueError, match="BatchNorm in train mode"):
        cv.HessianOperator(model, F.cross_entropy, (X, Y), max_batch_size=2)


def test_asymmetric_operator_is_detected_by_check_hvp():
    # a "loss" whose custom backward is not a true gradient makes the HVP asymmetric: check_hvp must say so
    class Skew(torch.autograd.Function):
        @staticmethod
        def forward(ctx, w):
            ctx.save_for_backward(w)
            return (w ** 2).sum()

        @staticmethod
        def backward(ctx, g):
            (w,) = ctx.saved_tensors
            return g * torch.stack([w[1], -w[0]]) * 3 + g * 2 * w  # gradient field with a curl

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.tensor([0.3, -0.7], dtype=torch.float64))

        def forward(self, x):
            return Skew.apply(self.w) + 0 * x.sum()

    res = cv.check_hvp(Net(), lambda out, y: out, (X, Y))
    assert not res.passed and res.max_symmetry_error > 0.1
    with pytest.raises(AssertionError, match="FAILED"):
        cv.check_hvp(Net(), lambda out, y: out, (X, Y), raise_on_failure=True)


# --- #26.3/4: the last input edges --------------------------------------------------------------------
@pytest.mark.parametrize("method", ["auto", "finite_difference"])
def test_inf_parameter_is_refused_even_when_the_loss_stays_finite(method):
    model = _mlp()
    with torch.no_grad():
        model[0].weight[1, 2] = float("inf")  # behind tanh: loss and gradient stay finite
    with pytest.raises(FloatingPointError, match=r"parameter '0\.weight' holds 1 non-finite value\(s\) \(inf/NaN\) of 12"):
        cv.sharpness(model, F.cross_entropy, (X, Y), method=method)


@pytest.mark.parametrize("eigenvalue,what", [(float("nan"), "NaN"), (-0.3, "< 0"), (torch.tensor(-1.0), "< 0")])
def test_edge_ratio_of_a_nan_or_negative_eigenvalue_is_nan_with_a_warning(eigenvalue, what):
    import math

    opt = torch.optim.SGD(_mlp().parameters(), lr=0.1)
    with pytest.warns(RuntimeWarning, match=f"eigenvalue is .*{what}.*undefined, returning NaN"):
        assert math.isnan(cv.edge_ratio(opt, eigenvalue))
    assert cv.edge_ratio(opt, 0.0) == 0.0 and cv.edge_ratio(opt, 4.0) == pytest.approx(0.2)  # 2/η = 20


@pytest.mark.parametrize("method", ["auto", "finite_difference"])
def test_meta_device_model_or_data_named(method):
    with torch.device("meta"):
        meta_model = _mlp()
    with pytest.raises(ValueError, match=r"parameters/buffers 0\.weight, 0\.bias, 2\.weight, 2\.bias are on the meta"):
        cv.sharpness(meta_model, F.cross_entropy, (X, Y), method=method)
    for data in ((X.to("meta"), Y), (X, Y.to("meta")), [(X, Y), ({"input": X.to("meta")}, Y)]):
        with pytest.raises(ValueError, match=r"data: batch \d holds tensors on the meta device"):
            cv.sharpness(_mlp(), F.cross_entropy, data, method=method)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("method", ["auto", "finite_difference"])
def test_cuda_device_without_cuda_named(method):
    with pytest.raises(ValueError, match=r"device='cuda': CUDA is not available on this machine"):
        cv.sharpness(_mlp(), F.cross_entropy, (X, Y), method=method, device="cuda")
    with pytest.raises(ValueError, match=r"device='meta': the meta device holds shapes without values"):
        cv.HessianOperator(_mlp(), F.cross_entropy, (X, Y), method=method, device="meta")
