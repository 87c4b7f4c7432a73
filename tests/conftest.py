"""Shared model zoo and the one dense reference every numeric test compares against.

The reference Hessian is built column by column from central differences of *first-order* gradients
(plain ``torch.autograd.grad``, no second-order autograd, no torch.func transforms), in float64:

    H[:, i] ≈ (∇L(θ + ε e_i) − ∇L(θ − ε e_i)) / (2ε),

with L the sample-weighted mean loss over the batches. It is independent of the engine under test, and it
is right for LayerNorm / BatchNorm / attention, where ``torch.func.hessian`` is not.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

DT = torch.float64

# The test models are tiny: one thread is faster than two fighting over 2 cores (and than BLAS threads
# oversubscribing a loaded machine), and results are bitwise reproducible.
torch.set_num_threads(1)


def _batches(data):
    if isinstance(data, tuple) and len(data) == 2 and not isinstance(data[0], tuple | list) or (
            isinstance(data, tuple) and isinstance(data[0], dict)):
        return [data]
    if isinstance(data, tuple) and isinstance(data[0], tuple) and isinstance(data[1], torch.Tensor):
        return [data]
    return list(data)


def _size(batch):
    inputs, targets = batch
    return targets.shape[0]


def _call(model, state, inputs):
    if isinstance(inputs, dict):
        return functional_call(model, state, (), inputs)
    if isinstance(inputs, (tuple, list)):
        return functional_call(model, state, tuple(inputs))
    return functional_call(model, state, (inputs,))


def flat_grad_fn(model: nn.Module, loss_fn: Callable, data, names: Sequence[str] | None = None):
    """θ (flat) ↦ ∇L(θ) (flat), first-order autograd only; buffers are copied per call (state untouched)."""
    named = dict(model.named_parameters())
    names = list(names) if names is not None else [n for n, p in model.named_parameters() if p.requires_grad]
    shapes = [named[n].shape for n in names]
    numels = [math.prod(s) for s in shapes]
    batches = _batches(data)
    total = sum(_size(b) for b in batches)
    # Train-mode BatchNorm: batch statistics without touching the running stats (same function).
    bn = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]

    def loss_at(theta: torch.Tensor) -> torch.Tensor:
        leaves = [t.view(s) for t, s in zip(torch.split(theta, numels), shapes)]
        total_loss = 0.0
        for batch in batches:
            state = {n: b.clone() for n, b in model.named_buffers()}
            state.update({n: p.detach() for n, p in model.named_parameters() if n not in names})
            state.update(zip(names, leaves))
            total_loss = total_loss + loss_fn(_call(model, state, batch[0]), batch[1]) * (_size(batch) / total)
        return total_loss

    first_order = torch.func.grad(loss_at)  # first-order only

    def grad(theta: torch.Tensor) -> torch.Tensor:
        for m in bn:  # batch statistics without writing running stats (the same function)
            m.track_running_stats = False
        try:
            return first_order(theta)
        finally:
            for m in bn:
                m.track_running_stats = True

    theta0 = torch.cat([named[n].detach().reshape(-1) for n in names])
    return grad, theta0


def dense_hessian_fd(model: nn.Module, loss_fn: Callable, data, names: Sequence[str] | None = None,
                     eps: float = 1e-5) -> torch.Tensor:
    """Dense float64 Hessian by central differences of gradients (2n first-order gradient evaluations,
    batched with ``vmap`` over the perturbed points where the model allows, else one by one)."""
    grad, theta0 = flat_grad_fn(model, loss_fn, data, names)
    n = theta0.numel()
    E = torch.eye(n, dtype=theta0.dtype) * eps
    try:
        batched = torch.func.vmap(grad, chunk_size=256)
        H = (batched(theta0 + E) - batched(theta0 - E)).T / (2 * eps)
    except (RuntimeError, NotImplementedError, ValueError):
        H = torch.stack([(grad(theta0 + E[i]) - grad(theta0 - E[i])) / (2 * eps) for i in range(n)], dim=1)
    return H

def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


# --------------------------------------------------------------------------------------------------
# Model zoo: tiny float64 models (n = a few hundred parameters), smooth activations so that central
# differences are accurate. Each entry: () -> (model, loss_fn, data).
# --------------------------------------------------------------------------------------------------
def mse(out, y):
    return F.mse_loss(out, y)


def mlp_mse():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)
    return m, mse, (torch.randn(16, 5, dtype=DT), torch.randn(16, 3, dtype=DT))


def mlp_ce():
    torch.manual_seed(1)
    m = nn.Sequential(nn.Linear(6, 10), nn.GELU(), nn.Linear(10, 4)).to(DT)
    return m, F.cross_entropy, (torch.randn(20, 6, dtype=DT), torch.randint(0, 4, (20,)))


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.bn(self.conv(x))).flatten(1))


def _cnn(train: bool):
    torch.manual_seed(2)
    m = SmallCNN().to(DT)
    with torch.no_grad():  # non-trivial running stats for eval mode
        m.bn.running_mean.uniform_(-0.5, 0.5)
        m.bn.running_var.uniform_(0.5, 2.0)
    m.train(train)
    return m, F.cross_entropy, (torch.randn(8, 1, 6, 6, dtype=DT), torch.randint(0, 3, (8,)))


def cnn_bn_eval():
    return _cnn(False)


def cnn_bn_train():
    return _cnn(True)


class TinyTransformer(nn.Module):
    """Pre-LN decoder block with 4-D F.scaled_dot_product_attention (fused kernel by default) and tied
    embedding / output weights."""

    def __init__(self, vocab=11, d=8, heads=2, seq=5):
        super().__init__()
        self.heads = heads
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(seq, d) * 0.1)
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.lnf = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight  # tied

    def forward(self, idx):
        B, T = idx.shape
        x = self.emb(idx) + self.pos[:T]
        q, k, v = self.qkv(self.ln1(x)).split(x.shape[-1], dim=-1)
        sh = lambda t: t.view(B, T, self.heads, -1).transpose(1, 2)  # noqa: E731
        a = F.scaled_dot_product_attention(sh(q), sh(k), sh(v), is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, -1))
        x = x + self.mlp(self.ln2(x))
        return self.head(self.lnf(x))


def lm_loss(logits, y):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def transformer():
    torch.manual_seed(3)
    m = TinyTransformer().to(DT)
    with torch.no_grad():  # affine LayerNorm away from identity (where torch.func.hessian goes wrong)
        for ln in (m.ln1, m.ln2, m.lnf):
            ln.weight.uniform_(0.5, 1.5)
            ln.bias.uniform_(-0.3, 0.3)
    idx = torch.randint(0, 11, (4, 5))
    return m, lm_loss, (idx, torch.randint(0, 11, (4, 5)))


class GRUNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(3, 5, batch_first=True)
        self.fc = nn.Linear(5, 2)

    def forward(self, x):
        return self.fc(self.rnn(x)[0][:, -1])


def gru():
    torch.manual_seed(4)
    m = GRUNet().to(DT)
    return m, F.cross_entropy, (torch.randn(6, 4, 3, dtype=DT), torch.randint(0, 2, (6,)))


def partly_frozen():
    torch.manual_seed(5)
    m = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 2)).to(DT)
    m[0].weight.requires_grad_(False)
    m[2].bias.requires_grad_(False)
    return m, F.cross_entropy, (torch.randn(10, 4, dtype=DT), torch.randint(0, 2, (10,)))


def unequal_batches():
    torch.manual_seed(6)
    m = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
    data = [(torch.randn(n, 4, dtype=DT), torch.randint(0, 3, (n,))) for n in (7, 3, 12)]
    return m, F.cross_entropy, data


class TwoInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(2, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x, z=None):
        return self.out(torch.tanh(self.a(x) + self.b(z)))


def tuple_inputs():
    torch.manual_seed(7)
    m = TwoInput().to(DT)
    return m, F.cross_entropy, ((torch.randn(9, 3, dtype=DT), torch.randn(9, 2, dtype=DT)), torch.randint(0, 2, (9,)))


def dict_inputs():
    torch.manual_seed(7)
    m = TwoInput().to(DT)
    return m, F.cross_entropy, ({"x": torch.randn(9, 3, dtype=DT), "z": torch.randn(9, 2, dtype=DT)},
                                torch.randint(0, 2, (9,)))


ZOO = {
    "mlp_mse": mlp_mse, "mlp_ce": mlp_ce, "cnn_bn_eval": cnn_bn_eval, "cnn_bn_train": cnn_bn_train,
    "transformer": transformer, "gru": gru, "partly_frozen": partly_frozen, "unequal_batches": unequal_batches,
    "tuple_inputs": tuple_inputs, "dict_inputs": dict_inputs,
}


def dropout_mlp():
    torch.manual_seed(8)
    m = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 3)).to(DT).train()
    return m, F.cross_entropy, (torch.randn(12, 5, dtype=DT), torch.randint(0, 3, (12,)))


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Everything a diagnostic must leave untouched, copied bit for bit."""
    snap = {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "training": [m.training for m in model.modules()],
        "rng": torch.get_rng_state(),
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
    }
    if optimizer is not None:
        import copy
        snap["opt"] = copy.deepcopy(optimizer.state_dict())
    return snap


def assert_same_state(before: dict, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    after = snapshot(model, optimizer)

    def eq(a, b):
        if isinstance(a, torch.Tensor):
            return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        if isinstance(a, dict):
            return isinstance(b, dict) and a.keys() == b.keys() and all(eq(a[k], b[k]) for k in a)
        if isinstance(a, (list, tuple)):
            return type(a) is type(b) and len(a) == len(b) and all(eq(x, y) for x, y in zip(a, b))
        return a == b

    for key in before:
        assert eq(before[key], after[key]), f"{key} changed"


@pytest.fixture(params=sorted(ZOO))
def zoo_case(request):
    return request.param, ZOO[request.param]()


_DENSE_CACHE: dict = {}


def dense_reference(name: str) -> torch.Tensor:
    """The finite-difference Hessian of zoo model ``name``, computed once per test session."""
    if name not in _DENSE_CACHE:
        model, loss_fn, data = ZOO[name]()
        _DENSE_CACHE[name] = dense_hessian_fd(model, loss_fn, data)
    return _DENSE_CACHE[name]


def legacy_vmap_level() -> int:
    """The nesting level of the legacy vmap used by ``autograd.grad(is_grads_batched=True)`` (0 outside)."""
    torch._C._vmapmode_increment_nesting()
    return torch._C._vmapmode_decrement_nesting()


def process_switches() -> dict:
    """Process state the second-order context switches (by value, or by object identity for patched functions):
    grad / inference mode, autocast, cuDNN, SDPA kernels, transform levels, F.hardsigmoid, torch.utils.checkpoint."""
    import torch.utils.checkpoint as ckpt
    from torch.nn.attention import _backend_names
    return {
        "grad": torch.is_grad_enabled(), "inference": torch.is_inference_mode_enabled(),
        "autocast": [(torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in ("cpu", "cuda")],
        "cudnn": torch.backends.cudnn.enabled,
        "sdpa": [getattr(torch._C, f"_get_{n}_sdp_enabled")() for n in _backend_names],
        "functorch_depth": torch._C._functorch.get_dynamic_layer_stack_depth(),
        "vmap_level": legacy_vmap_level(),
        "hardsigmoid": id(F.hardsigmoid),
        "checkpoint": {k: id(v) for k, v in ckpt.__dict__.items()},
    }
