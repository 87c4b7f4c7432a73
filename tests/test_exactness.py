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


CASES = {"layer_norm": _layer_norm, "batch_norm_train": _batch_norm_train, "instance_norm": _instance_norm,
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
