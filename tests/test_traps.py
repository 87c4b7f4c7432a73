"""Second-order traps of real models (issue 23): each case against a dense float64 Hessian from central differences
of first-order gradients (tests/conftest.py), or a state comparison.

weight normalisation (PyTorch's double backward through ``_weight_norm`` is wrong), the other parametrizations,
custom autograd.Functions whose backward records no graph, Python/NumPy randomness in ``forward``, causal LMs inside
wrappers, Mixtral's grouped-matmul experts, float32 islands in float64 runs, and the HF callback's lookahead P under
gradient clipping."""
from __future__ import annotations

import copy
import random
import types
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvature as cv
from curvature.data import CurvatureWarning
from curvature.optim import PreconditionedHessianOperator, preconditioned_sharpness
from curvature.tracking import SharpnessTracker

from conftest import DT, dense_hessian_fd, rel_err

X = torch.randn(16, 4, dtype=DT, generator=torch.Generator().manual_seed(0))
Y = torch.randn(16, 2, dtype=DT, generator=torch.Generator().manual_seed(1))


def _mlp(first: nn.Module, width: int = 5) -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(first, nn.Tanh(), nn.Linear(width, 2)).to(DT)


def _linear(i: int = 4, o: int = 5) -> nn.Linear:
    torch.manual_seed(2)
    return nn.Linear(i, o)


# --- 1. parametrizations --------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
@pytest.mark.parametrize("kind", ["parametrization", "legacy_hook"])
@pytest.mark.parametrize("method", ["auto", "forward_over_reverse"])
def test_weight_norm_is_exact(kind, method):
    wrap = nn.utils.parametrizations.weight_norm if kind == "parametrization" else nn.utils.weight_norm
    model = _mlp(wrap(_linear()))
    H = dense_hessian_fd(model, F.mse_loss, (X, Y))
    A = cv.HessianOperator(model, F.mse_loss, (X, Y), method=method).to_dense()
    assert rel_err(A, H) < 1e-6  # PyTorch's own double backward: 0.49 off, asymmetric
    assert float((A - A.T).abs().max()) < 1e-12


def test_orthogonal_and_spectral_norm():
    model = _mlp(nn.utils.parametrizations.orthogonal(_linear(4, 4)), width=4)
    assert rel_err(cv.HessianOperator(model, F.mse_loss, (X, Y)).to_dense(),
                   dense_hessian_fd(model, F.mse_loss, (X, Y))) < 1e-6
    model = _mlp(nn.utils.parametrizations.spectral_norm(_linear()))
    model.eval()  # fixed power-iteration vectors u, v: a function of θ like any other
    assert rel_err(cv.HessianOperator(model, F.mse_loss, (X, Y)).to_dense(),
                   dense_hessian_fd(model, F.mse_loss, (X, Y))) < 1e-6
    # train mode: each forward runs a power iteration under no_grad, so the gradient field is not a gradient (its
    # Jacobian is asymmetric); the operator is the Hessian at the updated, frozen u, v (= eval mode after the update)
    model.train()
    A = cv.HessianOperator(model, F.mse_loss, (X, Y)).to_dense()
    after = copy.deepcopy(model)
    with torch.no_grad():
        after(X)
    after.eval()
    assert rel_err(A, dense_hessian_fd(after, F.mse_loss, (X, Y))) < 1e-6
    assert float((A - A.T).abs().max()) < 1e-12


# --- 2. custom autograd.Functions whose backward records no graph --------------------------------------------
class _NoGradCube(torch.autograd.Function):
    @staticmethod
    def forward(x):
        return x.pow(3)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        with torch.no_grad():
            return g * 3 * x.pow(2)


class _DetachedTanh(torch.autograd.Function):
    @staticmethod
    def forward(x):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g.detach() * (1 - y.detach().pow(2))


class _Act(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn.apply(x)


@pytest.mark.parametrize("fn", [_NoGradCube, _DetachedTanh])
def test_custom_function_without_differentiable_backward_is_refused(fn):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), _Act(fn), nn.Linear(5, 2)).to(DT)
    with pytest.raises(cv.SecondOrderError, match=rf"{fn.__name__} \(applied in module '1' \(_Act\)\).*"
                                                  r"method='finite_difference'"):
        cv.HessianOperator(model, F.mse_loss, (X, Y))  # was 0.67-0.76 off, silently
    H = dense_hessian_fd(model, F.mse_loss, (X, Y))
    assert rel_err(cv.HessianOperator(model, F.mse_loss, (X, Y), method="finite_difference").to_dense(), H) < 1e-6


# --- 3. Python's and NumPy's global generators in forward --------------------------------------------------------
class _Jitter(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 2).to(DT)

    def forward(self, x):
        scale = 1 + 0.5 * random.random() + 0.5 * float(np.random.rand())
        return torch.tanh(self.lin(x)) * scale


def test_python_and_numpy_randomness_frozen_and_replayed():
    random.seed(5)
    np.random.seed(5)
    py, npy = random.getstate(), np.random.get_state()
    model = _Jitter()
    op = cv.HessianOperator(model, F.mse_loss, [(X[:8], Y[:8]), (X[8:], Y[8:])])  # two batches: forwards per HVP
    A = op.to_dense()
    v = torch.randn(op.shape[0], dtype=DT)
    assert torch.equal(op @ v, op @ v)  # one fixed operator
    assert float((A - A.T).abs().max()) < 1e-12
    assert random.getstate() == py
    after = np.random.get_state()
    assert after[0] == npy[0] and np.array_equal(after[1], npy[1]) and after[2:] == npy[2:]


# --- 4. causal LMs inside wrappers --------------------------------------------------------------------------------
class _UserWrapper(nn.Module):
    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, **kw):
        return self.lm(**kw)


class _PeftLike(nn.Module):  # PEFT built without task_type: PeftModel, its base model inside
    def __init__(self, lm):
        super().__init__()
        self.base_model = types.SimpleNamespace(model=lm)
        self.inner = lm

    def get_base_model(self):
        return self.inner

    def forward(self, **kw):
        return self.inner(**kw)


def _tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=11, n_embd=8, n_layer=1, n_head=2, n_positions=16, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg).to(DT)


def test_causal_lm_in_a_wrapper_is_weighted_like_the_bare_model():
    lm = _tiny_gpt2()
    ids = torch.randint(0, 11, (4, 7), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :3] = -100
    labels[1, 5:] = -100
    data = [{"input_ids": ids[:2], "labels": labels[:2]}, {"input_ids": ids[2:], "labels": labels[2:]}]
    ref = cv.HessianOperator(lm, None, data)
    assert ref.num_samples == int((labels[:, 1:] != -100).sum()) == 20
    v = torch.randn(ref.shape[0], dtype=DT, generator=torch.Generator().manual_seed(1))
    for wrapper, guessed in ((_PeftLike(lm), False), (_UserWrapper(lm), True)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            op = cv.HessianOperator(wrapper, None, data)
        guesses = [w for w in caught if "weighted by a guess" in str(w.message)]
        assert bool(guesses) == guessed, [str(w.message) for w in caught]
        if guessed:
            assert "'lm' (GPT2LMHeadModel)" in str(guesses[0].message)
        assert op.num_samples == ref.num_samples  # was 23 (unshifted)
        assert rel_err(op @ v, ref @ v) < 1e-12


# --- 5. Mixtral's grouped-matmul experts --------------------------------------------------------------------------
def _rms_norm(self, x):
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def test_mixtral_grouped_mm_experts_float64_and_block_solvers():
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "MixtralConfig"):
        pytest.skip("no Mixtral in this transformers")
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(vocab_size=13, hidden_size=8, intermediate_size=2, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, num_local_experts=3,
                                     num_experts_per_tok=2, max_position_embeddings=16)
    model = transformers.MixtralForCausalLM(cfg).to(DT)
    for m in model.modules():  # float64 norms (MixtralRMSNorm computes in float32): a float64 reference throughout
        if type(m).__name__.endswith("RMSNorm"):
            m.forward = types.MethodType(_rms_norm, m)
    ids = torch.randint(0, 13, (2, 5), generator=torch.Generator().manual_seed(0))
    experts = [n for n, _ in model.named_parameters() if ".experts." in n]

    def loss_fn(out, y):  # a float64 loss (HF's own casts logits to float32)
        return F.cross_entropy(out.logits[:, :-1].reshape(-1, 13), y[:, 1:].reshape(-1))

    # float64 raised "Expected mat_a to be Float32" inside the fused kernel
    A = cv.HessianOperator(model, loss_fn, ({"input_ids": ids}, ids), params=experts).to_dense()
    eager = copy.deepcopy(model)
    for m in eager.modules():
        if type(m).__name__.endswith("RMSNorm"):
            m.forward = types.MethodType(_rms_norm, m)
    eager.config._experts_implementation = "eager"  # the reference runs the experts one by one
    H = dense_hessian_fd(eager, loss_fn, ({"input_ids": ids}, ids), names=experts)
    assert rel_err(A, H) < 1e-6
    # the finite-difference route runs the model's own kernel: float64 is a clear error naming it and the ways out
    with pytest.raises(TypeError, match=r"grouped_mm.*method='auto'.*_experts_implementation"):
        cv.HessianOperator(model, loss_fn, ({"input_ids": ids}, ids), params=experts, method="finite_difference")
    # float32 block LOBPCG (batched double backward) raised "Invalid strides/sizes"
    res = cv.sharpness(model.float(), loss_fn, ({"input_ids": ids}, ids), params=experts, k=2, solver="lobpcg")
    top = torch.linalg.eigvalsh(H).flip(0)[:2]
    assert torch.allclose(res.eigenvalues.double(), top, rtol=1e-3)


# --- 6. float32 islands in float64 runs ---------------------------------------------------------------------------
class _Float32Norm(nn.Module):  # HF RMSNorm style: computes in float32 whatever the input dtype
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.weight * h.to(x.dtype)


def test_float32_islands_are_named():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), _Float32Norm(5), nn.Linear(5, 2)).to(DT)
    with pytest.warns(CurvatureWarning, match=r"'1' \(_Float32Norm, float32\)"):
        res = cv.sharpness(model, F.mse_loss, (X, Y))
    assert res.info["low_precision_modules"] == {"1": "float32"}
    # a float64 model without islands: nothing said
    with warnings.catch_warnings():
        warnings.simplefilter("error", CurvatureWarning)
        res = cv.sharpness(_mlp(_linear()), F.mse_loss, (X, Y))
    assert res.info["low_precision_modules"] == {}


# --- 7. the lookahead P under gradient clipping -----------------------------------------------------------------
def test_lookahead_preconditioner_uses_the_clipped_gradient():
    model = _mlp(_linear())
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.9, 0.99), eps=1e-8)
    g = cv.HessianOperator(model, F.mse_loss, (X, Y)).gradient
    clip = 0.25 * float(g.norm())
    gc = g * (clip / (float(g.norm()) + 1e-6))
    op = PreconditionedHessianOperator(model, F.mse_loss, (X, Y), opt, max_grad_norm=clip)
    # before the first step: v = (1-β2)g², t = 1 → P = (1-β1)(|g| + eps), from the gradient Adam will see
    assert torch.allclose(op.preconditioner, (1 - 0.9) * (gc.abs() + 1e-8), rtol=1e-12, atol=0)
    assert op.info["lookahead_clip"] == pytest.approx(clip / (float(g.norm()) + 1e-6))
    plain = PreconditionedHessianOperator(model, F.mse_loss, (X, Y), opt)
    assert torch.allclose(plain.preconditioner, (1 - 0.9) * (g.abs() + 1e-8), rtol=1e-12, atol=0)
    # the tracker passes it on: a row equals preconditioned_sharpness with the same clipping, not without
    tracker = SharpnessTracker(F.mse_loss, every=1, tol=1e-8, eig_tol=None, max_grad_norm=clip)
    row = tracker.measure(model, opt, (X, Y), 0)
    ref = preconditioned_sharpness(model, F.mse_loss, (X, Y), opt, tol=1e-8, max_grad_norm=clip)
    unclipped = preconditioned_sharpness(model, F.mse_loss, (X, Y), opt, tol=1e-8)
    assert row["preconditioned_sharpness"] == pytest.approx(ref.eigenvalues[0].item(), rel=1e-6)
    assert abs(row["preconditioned_sharpness"] / unclipped.eigenvalues[0].item() - 1) > 0.5


def test_hf_callback_clips_like_the_trainer():
    pytest.importorskip("transformers")
    from curvature.integrations.transformers import SharpnessCallback

    state = types.SimpleNamespace(global_step=0, is_world_process_zero=True, stateful_callbacks={})
    for option, trainer_value, expected in (("trainer", 1.0, 1.0), ("trainer", 0.0, None), (None, 1.0, None),
                                            (0.5, 1.0, 0.5)):
        cb = SharpnessCallback(every=1, log_to_trainer=False, max_grad_norm=option)
        cb.on_train_begin(types.SimpleNamespace(max_grad_norm=trainer_value, output_dir=None), state, None)
        assert cb.tracker.max_grad_norm == expected
    with pytest.raises(ValueError, match="max_grad_norm"):
        SharpnessCallback(max_grad_norm="clip")


def test_a_causal_lm_whose_own_loss_casts_to_float32_warns_once():
    """The head's logits.float() is both a low-precision loss and a float32 island at the root module: one cause,
    one warning (the loss's, which says what to do), the island still listed in info."""
    import warnings

    from transformers import GPT2Config, GPT2LMHeadModel

    from curvature import sharpness

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50, n_positions=16)).double()
    ids = torch.randint(0, 50, (2, 8))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        res = sharpness(model, None, {"input_ids": ids, "labels": ids}, tol=1e-3)
    below = [str(w.message) for w in seen if "below the operator" in str(w.message)]
    assert len(below) == 1 and below[0].startswith("the loss is computed in torch.float32"), below
    assert res.info["low_precision_modules"] == {"": "float32"}
