"""Guards on PyTorch itself: every second-order route the engine uses, on every op known to be a trap,
against central differences of first-order gradients (float64). A PyTorch upgrade that breaks one of
these routes fails here, before it can give a user a wrong number.

Routes used by curvature: double backward (one vector, and batched with is_grads_batched), and
torch.func.jvp(torch.func.grad(f)) (one vector, and vmap-ed over a block).
Not used (wrong on torch 2.13 for affine layer_norm, train-mode batch_norm, instance_norm): anything through
torch.func.jacrev, including torch.func.hessian.
"""
import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, jvp, vmap

from curvature._exact import second_order_context

G = torch.Generator().manual_seed(0)


def _r(*shape):
    return torch.randn(*shape, generator=G, dtype=torch.float64)


# Each case: (function of a flat parameter vector -> scalar, parameter size)
def _layer_norm():
    x = _r(4, 6)
    return (lambda p: (F.layer_norm(x * p[:6], (6,), p[6:12] + 1.0, p[12:18]) ** 3).sum(), 18)


def _batch_norm_train():
    x = _r(8, 3)
    return (lambda p: (torch.tanh(F.batch_norm(x * p[:3], None, None, p[3:6] + 1, p[6:9], training=True))
                       ** 2).sum(), 9)


def _instance_norm():
    x = _r(2, 3, 5)
    return (lambda p: (F.instance_norm(x * p[:3, None], weight=p[3:6] + 1, bias=p[6:9]) ** 3).sum(), 9)


def _group_norm():
    x = _r(2, 4, 3)
    return (lambda p: (F.group_norm(x * p[:4, None], 2, p[4:8] + 1, p[8:12]) ** 3).sum(), 12)


def _sdpa():  # 4-D inputs: the fused kernel by default (no double backward, no forward AD)
    x = _r(2, 2, 3, 4)
    return (lambda p: F.scaled_dot_product_attention(x * p[:4], x * p[4:8], x, is_causal=True).pow(2).sum(), 8)


def _gru():
    x = _r(2, 3, 2)
    rnn = torch.nn.GRU(2, 2, batch_first=True).double()
    names = [n for n, _ in rnn.named_parameters()]
    shapes = [q.shape for q in rnn.parameters()]
    sizes = [s.numel() for s in shapes]

    def f(p):
        ps = dict(zip(names, (t.view(s) for t, s in zip(p.split(sizes), shapes))))
        return torch.func.functional_call(rnn, ps, (x,))[0].pow(2).sum()
    return (f, sum(sizes))


def _cross_entropy():
    x, y = _r(5, 4), torch.tensor([0, 1, 2, 3, 0])
    return (lambda p: F.cross_entropy(x @ p.view(4, 4), y), 16)


def _hardsigmoid():  # no double backward in PyTorch: substituted inside the context (nn.Hardsigmoid calls it too)
    x = _r(4, 6) * 3
    return (lambda p: (F.hardsigmoid(x * p[:6] + p[6:12]) ** 3 + torch.nn.Hardsigmoid()(x * p[:6]) ** 2).sum(), 12)


CASES = {"hardsigmoid": _hardsigmoid,
         "layer_norm": _layer_norm, "batch_norm_train": _batch_norm_train, "instance_norm": _instance_norm,
         "group_norm": _group_norm, "sdpa_fused_default": _sdpa, "gru": _gru, "cross_entropy": _cross_entropy}


def _fd_hvp(f, p, v, eps=1e-5):
    def g(q):
        q = q.detach().requires_grad_()
        return torch.autograd.grad(f(q), q)[0]
    return (g(p + eps * v) - g(p - eps * v)) / (2 * eps)


def _double_backward(f, p, V):
    p = p.detach().requires_grad_()
    g = torch.autograd.grad(f(p), p, create_graph=True)[0]
    return torch.stack([torch.autograd.grad(g, p, v, retain_graph=True)[0] for v in V])


def _batched_double_backward(f, p, V):
    p = p.detach().requires_grad_()
    g = torch.autograd.grad(f(p), p, create_graph=True)[0]
    return torch.autograd.grad(g, p, V, is_grads_batched=True)[0]


def _fwd_over_rev(f, p, V):
    return torch.stack([jvp(grad(f), (p,), (v,))[1] for v in V])


def _vmap_fwd_over_rev(f, p, V):
    return vmap(lambda v: jvp(grad(f), (p,), (v,))[1])(V)


ROUTES = {"double_backward": _double_backward, "batched_double_backward": _batched_double_backward,
          "forward_over_reverse": _fwd_over_rev, "vmap_forward_over_reverse": _vmap_fwd_over_rev}


@pytest.mark.parametrize("route", sorted(ROUTES))
@pytest.mark.parametrize("case", sorted(CASES))
def test_route_is_exact_inside_the_second_order_context(case, route):
    f, n = CASES[case]()
    p = _r(n) * 0.5 + 1.0
    V = _r(3, n)
    ref = torch.stack([_fd_hvp(f, p, v) for v in V])
    with second_order_context(torch.nn.Module()):
        try:
            got = ROUTES[route](f, p, V)
        except RuntimeError as exc:
            # the engine falls back (to looping / to double backward) when a route raises; what matters
            # is that no route returns a wrong number
            pytest.skip(f"{route} raises on {case} ({str(exc).splitlines()[0][:80]}); engine falls back")
    err = float((got - ref).norm() / ref.norm())
    assert err <= 1e-6, f"{route} on {case}: relative error {err:.2e}"


def test_fused_attention_has_no_double_backward_outside_the_context():
    # why second_order_context selects the MATH kernel: if this starts passing, PyTorch grew the rule
    f, n = _sdpa()
    p = _r(n)
    with pytest.raises(RuntimeError, match="not implemented"):
        _double_backward(f, p, _r(1, n))


# --- what the second-order context switches, end to end against the dense FD Hessian -----------------------
import torch.utils.checkpoint as _ckpt  # noqa: E402
from conftest import dense_hessian_fd, rel_err  # noqa: E402

import curvature as cv  # noqa: E402


class CheckpointedNet(torch.nn.Module):
    """LayerNorm/GELU blocks run through torch.utils.checkpoint (mode: None = no checkpointing)."""

    def __init__(self, mode=None):
        super().__init__()
        self.mode = mode
        self.inp = torch.nn.Linear(4, 8)
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.Linear(8, 8), torch.nn.GELU()) for _ in range(2))
        self.out = torch.nn.Linear(8, 3)

    def forward(self, x):
        # the first checkpoint sees an input without requires_grad: reentrant checkpointing then silently drops
        # the gradient of the parameters inside it (a wrong λ before the fix, no error)
        h = self.inp(x) if self.mode is None else _ckpt.checkpoint(self.inp, x, use_reentrant=self.mode)
        for block in self.blocks:
            h = h + (block(h) if self.mode is None else _ckpt.checkpoint(block, h, use_reentrant=self.mode))
        return self.out(h)


def _ckpt_case():
    torch.manual_seed(0)
    model = CheckpointedNet().double()
    with torch.no_grad():
        for block in model.blocks:
            block[0].weight.uniform_(0.5, 1.5)
            block[0].bias.uniform_(-0.3, 0.3)
    return model, F.cross_entropy, (torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,)))


@pytest.mark.parametrize("method", ["reverse_over_reverse", "forward_over_reverse"])
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_is_exact(use_reentrant, method):
    model, loss_fn, data = _ckpt_case()
    H = dense_hessian_fd(model, loss_fn, data)  # reference without checkpointing
    model.mode = use_reentrant
    saved = dict(_ckpt.__dict__)
    op = cv.HessianOperator(model, loss_fn, data, method=method)
    V = _r(H.shape[0], 3)
    assert rel_err(op.matmat(V), H @ V) <= 1e-6
    lam = cv.sharpness(model, loss_fn, data, method=method, tol=1e-10).eigenvalues[0].item()
    assert abs(lam - torch.linalg.eigvalsh(H)[-1].item()) <= 1e-6 * abs(lam)
    assert all(_ckpt.__dict__[k] is v for k, v in saved.items())  # checkpoint module restored object by object
    # checkpointing still works for training afterwards
    loss_fn(model(data[0]), data[1]).backward()
    # a float32 model analysed in float64 (recomputation would run the float32 function on float64 copies)
    model.float()
    x32 = (data[0].float(), data[1])
    lams = []
    for mode in (None, use_reentrant):
        model.mode = mode
        lams.append(cv.sharpness(model, loss_fn, x32, method=method, dtype=torch.float64, tol=1e-10)
                    .eigenvalues[0].item())
    assert abs(lams[0] - lams[1]) <= 1e-10 * abs(lams[0])


def test_hf_gradient_checkpointing_same_lambda():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=17, n_positions=8, n_embd=8, n_layer=2, n_head=2, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    plain = transformers.GPT2LMHeadModel(cfg).double().train()
    ckpt = transformers.GPT2LMHeadModel(cfg).double().train()
    ckpt.load_state_dict(plain.state_dict())
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    ids = torch.randint(0, 17, (3, 8), generator=torch.Generator().manual_seed(1))

    def lm(out, y):
        return F.cross_entropy(out.logits[:, :-1].reshape(-1, 17), y[:, 1:].reshape(-1))

    lams = [cv.sharpness(m, lm, ({"input_ids": ids}, ids), tol=1e-10, max_iters=500).eigenvalues[0].item()
            for m in (plain, ckpt)]
    assert abs(lams[0] - lams[1]) <= 1e-10 * abs(lams[0])
    assert ckpt.is_gradient_checkpointing


def test_autocast_region_does_not_lower_the_precision():
    model, loss_fn, data = _ckpt_case()
    ref = cv.sharpness(model, loss_fn, data, tol=1e-10).eigenvalues[0].item()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        lam = cv.sharpness(model, loss_fn, data, tol=1e-10).eigenvalues[0].item()
        op = cv.HessianOperator(model, loss_fn, data, cache_graph=False)
        hv = op.matvec(torch.ones(op.shape[0], dtype=torch.float64))
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    assert abs(lam - ref) <= 1e-10 * abs(ref)
    H = dense_hessian_fd(model, loss_fn, data)
    assert rel_err(hv, H.sum(1)) <= 1e-6
    # float32 model: float32 accuracy inside the region too
    m32 = model.float()
    x32 = (data[0].float(), data[1])
    ref32 = cv.sharpness(m32, loss_fn, x32, tol=1e-6).eigenvalues[0].item()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        lam32 = cv.sharpness(m32, loss_fn, x32, tol=1e-6).eigenvalues[0].item()
    assert abs(lam32 - ref32) <= 1e-5 * abs(ref32)


def test_reduced_precision_on_request():
    model, loss_fn, data = _ckpt_case()
    from curvature.hvp import HVPEngine
    ones = [torch.ones(1, *p.shape, dtype=torch.float32) for p in model.float().parameters()]
    x32 = (data[0].float(), data[1])
    exact = HVPEngine(model, loss_fn, x32, cache_graph=False).hvp_sum(ones)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        engine = HVPEngine(model, loss_fn, x32, cache_graph=False, autocast=True)
    low = engine.hvp_sum(ones)  # the region's bf16 is kept for every pass, also outside it
    err = max(float((a - b).norm() / b.norm()) for a, b in zip(low, exact))
    assert 1e-4 < err < 0.5
    assert not torch.is_autocast_enabled("cpu")


def test_inside_inference_mode():
    model, loss_fn, data = _ckpt_case()
    ref = cv.sharpness(model, loss_fn, data, tol=1e-10).eigenvalues[0].item()
    with torch.inference_mode():
        x, y = data[0].clone(), data[1].clone()  # inference tensors
        lam = cv.sharpness(model, loss_fn, (x, y), tol=1e-10).eigenvalues[0].item()
        lam_fr = cv.sharpness(model, loss_fn, (x, y), tol=1e-10, method="forward_over_reverse").eigenvalues[0].item()
        assert torch.is_inference_mode_enabled()
        built_inside = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    assert abs(lam - ref) <= 1e-10 * abs(ref) and abs(lam_fr - ref) <= 1e-8 * abs(ref)
    # a model whose parameters are inference tensors (built inside inference mode) is analysed from copies
    H = dense_hessian_fd(_clone_module(built_inside), loss_fn, data)
    lam_inf = cv.sharpness(built_inside, loss_fn, data, tol=1e-10).eigenvalues[0].item()
    assert abs(lam_inf - torch.linalg.eigvalsh(H)[-1].item()) <= 1e-6 * abs(lam_inf)


def _clone_module(m):
    import copy
    out = copy.deepcopy(m) if not any(p.is_inference() for p in m.parameters()) else None
    if out is None:
        out = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
        with torch.no_grad():
            for a, b in zip(out.parameters(), m.parameters()):
                a.copy_(b)
    return out


def test_sparse_embedding_gives_the_dense_curvature():
    def net(sparse):
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Embedding(7, 4, sparse=sparse), torch.nn.Flatten(), torch.nn.Tanh(),
                                   torch.nn.Linear(8, 3)).double()

    idx = torch.randint(0, 7, (10, 2), generator=torch.Generator().manual_seed(2))
    dense, sparse = net(False), net(True)
    data = (idx, torch.randint(0, 3, (10,)))
    H = dense_hessian_fd(dense, F.cross_entropy, data)
    for method in ("reverse_over_reverse", "forward_over_reverse"):
        op = cv.HessianOperator(sparse, F.cross_entropy, data, method=method)
        V = _r(H.shape[0], 2)
        assert rel_err(op.matmat(V), H @ V) <= 1e-6
    assert sparse[0].sparse  # restored
    F.cross_entropy(sparse(idx), data[1]).backward()
    assert sparse[0].weight.grad.is_sparse


class _Bag(torch.nn.Module):
    def __init__(self, mode, sparse, offsets):
        super().__init__()
        self.bag = torch.nn.EmbeddingBag(7, 4, mode=mode, sparse=sparse, padding_idx=2)
        self.fc = torch.nn.Linear(4, 3)
        self.offsets = offsets

    def forward(self, idx, w=None):
        if self.offsets:  # 1-D input with offsets (bags of 2 entries each)
            n = idx.shape[0]
            offsets = torch.arange(n, device=idx.device) * 2
            return torch.tanh(self.fc(self.bag(idx.reshape(-1), offsets[: n], per_sample_weights=w)))
        return torch.tanh(self.fc(self.bag(idx, per_sample_weights=w)))


@pytest.mark.parametrize("mode,sparse,offsets,weighted", [("mean", True, False, False), ("sum", False, True, True),
                                                         ("mean", False, True, False), ("sum", True, False, True)])
def test_embedding_bag_is_substituted_exactly(mode, sparse, offsets, weighted):
    # aten::_embedding_bag_backward has no derivative on torch 2.13 (dense or sparse): F.embedding_bag is replaced
    # by a gather + segment sum (same values bit for bit) inside the context
    torch.manual_seed(0)
    model = _Bag(mode, sparse, offsets).double()
    idx = torch.randint(0, 7, (10, 2), generator=torch.Generator().manual_seed(3))
    w = torch.rand(10, 2, dtype=torch.float64).reshape(-1 if offsets else 10, *(() if offsets else (2,)))
    inputs = (idx, w) if weighted else idx
    data = (inputs, torch.randint(0, 3, (10,)))
    dense = _Bag(mode, False, offsets).double()
    dense.load_state_dict(model.state_dict())
    H = dense_hessian_fd(dense, F.cross_entropy, data)
    bag = F.embedding_bag
    for method in ("reverse_over_reverse", "forward_over_reverse"):
        op = cv.HessianOperator(model, F.cross_entropy, data, method=method)
        V = _r(H.shape[0], 2)
        assert rel_err(op.matmat(V), H @ V) <= 1e-6
    assert F.embedding_bag is bag and model.bag.sparse == sparse


def test_embedding_bag_max_has_no_double_backward_and_says_so():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.EmbeddingBag(7, 4, mode="max", sparse=True), torch.nn.Linear(4, 3)).double()
    data = (torch.randint(0, 7, (10, 2)), torch.randint(0, 3, (10,)))
    with pytest.raises(cv.SecondOrderError, match=r"_embedding_bag_backward, called by module '0' \(EmbeddingBag\)"):
        cv.sharpness(model, F.cross_entropy, data, max_iters=3)
    assert model[0].sparse


def test_tracker_step_inside_an_autocast_training_loop():
    # the common loop layout: forward, tracker.step and backward all inside one bf16 autocast region
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    x, y = torch.randn(64, 6), torch.randint(0, 4, (64,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref = cv.sharpness(model, F.cross_entropy, (x, y), tol=1e-5).eigenvalues[0].item()
    tracker = cv.SharpnessTracker(F.cross_entropy, every=1, tol=1e-5)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        row = tracker.step(model, opt, (x, y), step=0)
        F.cross_entropy(model(x), y).backward()
    assert row["converged"] and row["error"] is None
    assert abs(row["sharpness"] - ref) <= 1e-5 * abs(ref)
