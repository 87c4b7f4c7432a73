"""Adapters for the peer libraries, so they run side by side with ``curvature`` on the same model and data
(``curvature bench``, :func:`curvature.benchmark_solvers`, the scripts in the repository's ``benchmarks/``).

Peers (each optional; a missing one raises :class:`PeerUnavailable`, which the scripts turn into "skipped"):

``pyhessian``            PyHessian 0.1: ``hessian(model, criterion, data=(x, y), cuda=...)`` then
                         ``.eigenvalues(maxIter, tol, top_n)`` (power iteration; ``tol`` bounds the *relative
                         change of the eigenvalue* between iterations, not a residual).
                         HVPs counted by wrapping ``pyhessian.hessian.hessian_vector_product`` (the name that
                         ``hessian.eigenvalues`` calls). Its constructor runs one forward and a
                         ``loss.backward(create_graph=True)`` and every HVP re-uses that graph
                         (``retain_graph=True``): an HVP is one double-backward pass, no forward, and the graph
                         stays in memory. It calls ``model.eval()`` itself (so a BatchNorm model is analysed in
                         eval mode, whatever mode it was in: a different matrix) and leaves graph-carrying
                         tensors in ``param.grad``; the adapter restores the mode and clears ``.grad``.
``hessian_eigenthings``  hessian-eigenthings 1.0.0a5: ``HessianOperator(model, [batch], loss_fn(model, batch))``
                         and ``power_iteration_one(op, max_iter, tol, seed)`` (stops when both the relative
                         change of λ and the relative residual are below ``tol``). HVPs counted by wrapping the
                         operator instance's ``matvec``. Every HVP = forward + create_graph backward + second
                         backward (no graph caching).
``curvlinops``           curvlinops-for-pytorch 3.0.1: ``HessianLinearOperator(model, loss_module, params,
                         [batch], check_deterministic=False)``; λ_max by ``scipy.sparse.linalg.eigsh(
                         op.to_scipy(), k, which="LA", tol)``. HVPs counted by wrapping the instance's
                         ``_matmat`` (one count per column). Its HVP is ``vmap(jvp(jacrev(loss)))``: the
                         composition that is wrong through affine LayerNorm / train-mode BatchNorm
                         (shared/README.md, "Known autograd traps").

``torch``                no library: plain double backward (``autograd.grad(create_graph=True)`` then ``grad``),
                         forward included, attention switched to the math SDPA kernel. This is the reference.

Vectors are flat torch tensors in *our* order: trainable parameters in ``model.named_parameters()`` order.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn


__all__ = ["PEERS", "PeerUnavailable", "PeerResult", "available", "distribution", "peer_version", "hvp_fn", "matmat_fn",
           "top_eigenvalue", "reference_hvp_fn", "math_sdpa", "split_like", "flatten"]

PEERS = ("pyhessian", "hessian_eigenthings", "curvlinops")
_MODULES = {"pyhessian": "pyhessian", "hessian_eigenthings": "hessian_eigenthings", "curvlinops": "curvlinops"}
_DISTS = {"pyhessian": "pyhessian", "hessian_eigenthings": "hessian-eigenthings",
          "curvlinops": "curvlinops-for-pytorch"}


class PeerUnavailable(RuntimeError):
    """The peer library is not installed (or fails to import)."""


@dataclass
class PeerResult:
    eigenvalue: float
    num_hvps: int
    seconds: float
    eigenvector: torch.Tensor | None = None   # flat, our parameter order, unit norm
    converged: bool | None = None
    note: str = ""


def _import(peer: str):
    if peer not in _MODULES:
        raise KeyError(f"unknown peer {peer!r}; choose from {PEERS}")
    try:
        return __import__(_MODULES[peer])
    except Exception as e:  # noqa: BLE001 - ImportError, or a broken dependency chain
        raise PeerUnavailable(f"{peer} is not installed or does not import ({type(e).__name__}: {e}). Install it "
                              f"without its dependencies, so torch is not replaced: pip install --no-deps "
                              f"{_DISTS[peer]} (see benchmarks/README.md for its light dependencies)") from e


def available(peer: str) -> bool:
    try:
        _import(peer)
        return True
    except PeerUnavailable:
        return False


def distribution(peer: str) -> str:
    """The package-index name of ``peer`` (what ``pip install --no-deps`` takes)."""
    return _DISTS[peer]


def peer_version(peer: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(_DISTS[peer])
    except Exception:  # noqa: BLE001
        return None


# ---------------------------------------------------------------------------------------------- helpers
def trainable_params(model: nn.Module) -> list[torch.nn.Parameter]:
    """Trainable parameters in ``model.named_parameters()`` order (tied parameters once): our flat order."""
    return [p for _, p in model.named_parameters() if p.requires_grad]


def split_like(v: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    out, off = [], 0
    for p in params:
        n = p.numel()
        out.append(v[off:off + n].view_as(p))
        off += n
    return out


def flatten(ts) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


@contextlib.contextmanager
def math_sdpa(enabled: bool = True):
    """Route ``F.scaled_dot_product_attention`` to its math kernel (twice differentiable, forward-mode AD)."""
    if not enabled:
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.MATH):
        yield


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    if dtype in (torch.float32, torch.float64):
        torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _param_dtype(model: nn.Module) -> torch.dtype:
    return trainable_params(model)[0].dtype


def _device(model: nn.Module) -> torch.device:
    return trainable_params(model)[0].device


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


# ---------------------------------------------------------------------------------------------- reference
def reference_hvp_fn(model: nn.Module, loss_fn, batch, math_attention: bool = True
                     ) -> Callable[[torch.Tensor], torch.Tensor]:
    """Plain double backward, forward included, no caching: the textbook HVP (and our reference)."""
    params = trainable_params(model)
    x, y = batch

    def hvp(v: torch.Tensor) -> torch.Tensor:
        with math_sdpa(math_attention):
            loss = loss_fn(model(x), y)
            g = torch.autograd.grad(loss, params, create_graph=True)
            hv = torch.autograd.grad(g, params, grad_outputs=split_like(v, params))
        return flatten(hv).detach()

    return hvp


def gradient_fn(model: nn.Module, loss_fn, batch, math_attention: bool = False) -> Callable[[], torch.Tensor]:
    """One forward + backward (the unit that HVP costs are measured in)."""
    params = trainable_params(model)
    x, y = batch

    def grad() -> torch.Tensor:
        with math_sdpa(math_attention):
            loss = loss_fn(model(x), y)
            g = torch.autograd.grad(loss, params)
        return flatten(g)

    return grad


# ---------------------------------------------------------------------------------------------- PyHessian
def _pyhessian_build(model, loss_fn, batch):
    PyHessian = _pyhessian_module().hessian  # noqa: N806
    was_training = model.training
    dev = _device(model)
    try:
        with _default_dtype(_param_dtype(model)):
            h = PyHessian(model, loss_fn, data=batch, cuda=dev.type == "cuda")
    finally:
        for p in model.parameters():  # PyHessian leaves graph-carrying .grad behind
            p.grad = None
        model.train(was_training)
    return h


def _pyhessian_module():
    # ``pyhessian/__init__.py`` re-exports the class ``hessian``, which shadows the submodule of the same
    # name as an attribute: ``import pyhessian.hessian as m`` gives the class. Take the module itself.
    import sys
    _import("pyhessian")
    import pyhessian.hessian  # noqa: F401 - make sure the submodule is loaded
    return sys.modules["pyhessian.hessian"]


def _pyhessian_hvp(model, loss_fn, batch):
    phh = _pyhessian_module()
    h = _pyhessian_build(model, loss_fn, batch)
    params = h.params

    def hvp(v: torch.Tensor) -> torch.Tensor:
        return flatten(phh.hessian_vector_product(h.gradsH, params, split_like(v, params))).detach()

    return hvp


def _pyhessian_top(model, loss_fn, batch, tol, max_iters, seed):
    phh = _pyhessian_module()
    dev = _device(model)
    counter = {"n": 0}
    orig = phh.hessian_vector_product

    def counting(gradsH, params, v):
        counter["n"] += 1
        return orig(gradsH, params, v)

    rng = [dev] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=rng):
        torch.manual_seed(seed)
        _sync(dev)
        t0 = time.perf_counter()
        h = _pyhessian_build(model, loss_fn, batch)
        phh.hessian_vector_product = counting
        try:
            with _default_dtype(_param_dtype(model)):
                vals, vecs = h.eigenvalues(maxIter=max_iters or 100, tol=tol, top_n=1)
        finally:
            phh.hessian_vector_product = orig
        _sync(dev)
        secs = time.perf_counter() - t0
    vec = flatten(vecs[0]).detach()
    vec = vec / vec.norm()
    hit_max = counter["n"] >= (max_iters or 100)
    return PeerResult(float(vals[0]), counter["n"], secs, vec, converged=not hit_max,
                      note="model.eval() forced" if model.training else "")


# ---------------------------------------------------------------------------------------------- hessian-eigenthings
def _eigenthings_op(model, loss_fn, batch):
    he = _import("hessian_eigenthings")

    def lf(m, b):
        return loss_fn(m(b[0]), b[1])

    return he.HessianOperator(model, [batch], lf)


def _eigenthings_hvp(model, loss_fn, batch):
    op = _eigenthings_op(model, loss_fn, batch)
    return lambda v: op.matvec(v).detach()


def _eigenthings_top(model, loss_fn, batch, tol, max_iters, seed):
    he = _import("hessian_eigenthings")
    dev = _device(model)
    op = _eigenthings_op(model, loss_fn, batch)
    counter = {"n": 0}
    orig = op.matvec

    def counting(v):
        counter["n"] += 1
        return orig(v)

    op.matvec = counting  # instance attribute: power_iteration_one calls operator.matvec
    _sync(dev)
    t0 = time.perf_counter()
    lam, vec, _res, _iters, conv = he.power_iteration_one(op, max_iter=max_iters or 100, tol=tol, seed=seed)
    _sync(dev)
    secs = time.perf_counter() - t0
    vec = vec.detach()
    return PeerResult(float(lam), counter["n"], secs, vec / vec.norm(), converged=bool(conv))


# ---------------------------------------------------------------------------------------------- curvlinops
def _curvlinops_op(model, loss_fn, batch):
    cl = _import("curvlinops")
    if not hasattr(loss_fn, "reduction"):
        raise TypeError("curvlinops needs the loss as an nn.Module with a `reduction` attribute")
    return cl.HessianLinearOperator(model, loss_fn, trainable_params(model), [batch], check_deterministic=False)


def _curvlinops_hvp(model, loss_fn, batch):
    op = _curvlinops_op(model, loss_fn, batch)
    return lambda V: (op @ V).detach()  # V may be (n,) or (n, k): a vmap over columns


def curvlinops_top(model, loss_fn, batch, tol, max_iters, seed, k: int = 1):
    import numpy as np
    from scipy.sparse.linalg import eigsh
    dev = _device(model)
    op = _curvlinops_op(model, loss_fn, batch)
    counter = {"n": 0}
    orig = op._matmat

    def counting(M):
        counter["n"] += int(M[0].shape[-1])
        return orig(M)

    op._matmat = counting  # instance attribute: __matmul__ calls self._matmat
    A = op.to_scipy()
    n = A.shape[0]
    v0 = np.random.default_rng(seed).standard_normal(n)
    _sync(dev)
    t0 = time.perf_counter()
    vals, vecs = eigsh(A, k=k, which="LA", tol=tol, v0=v0, maxiter=max_iters)
    _sync(dev)
    secs = time.perf_counter() - t0
    i = int(np.argmax(vals))
    vec = torch.as_tensor(vecs[:, i], dtype=_param_dtype(model), device=dev)
    return PeerResult(float(vals[i]), counter["n"], secs, vec / vec.norm(), converged=True)


# ---------------------------------------------------------------------------------------------- dispatch
def hvp_fn(peer: str, model: nn.Module, loss_fn, batch) -> Callable[[torch.Tensor], torch.Tensor]:
    """A callable ``v -> H v`` (flat vectors, our order) built with ``peer``'s own HVP machinery.

    Building it may itself run a forward/backward (PyHessian). Raises :class:`PeerUnavailable` when the
    peer is not installed; any other exception is the peer failing on this model.
    """
    if peer == "torch":
        return reference_hvp_fn(model, loss_fn, batch)
    _import(peer)
    return {"pyhessian": _pyhessian_hvp, "hessian_eigenthings": _eigenthings_hvp,
            "curvlinops": _curvlinops_hvp}[peer](model, loss_fn, batch)


def matmat_fn(peer: str, model: nn.Module, loss_fn, batch) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``V (n, k) -> H V`` where the peer has a native block product (curvlinops: vmap); else ``None``."""
    if peer == "curvlinops":
        return _curvlinops_hvp(model, loss_fn, batch)
    _import(peer)
    return None


def top_eigenvalue(peer: str, model: nn.Module, loss_fn, batch, tol: float = 1e-3, max_iters: int | None = None,
                   seed: int = 0) -> PeerResult:
    """λ_max with ``peer``'s own solver at tolerance ``tol`` (the peer's own meaning of ``tol``).

    ``pyhessian``: power iteration (``maxIter`` default 100). ``hessian_eigenthings``: ``power_iteration_one``
    (``max_iter`` default 100). ``curvlinops``: scipy ``eigsh(which="LA")`` (ARPACK Lanczos).
    """
    _import(peer)
    fn = {"pyhessian": _pyhessian_top, "hessian_eigenthings": _eigenthings_top, "curvlinops": curvlinops_top}[peer]
    return fn(model, loss_fn, batch, tol, max_iters, seed)


def relative_residual(hvp: Callable[[torch.Tensor], torch.Tensor], lam: float, v: torch.Tensor) -> float:
    """``‖H v − λ v‖ / |λ|`` for a unit ``v`` with a trusted ``hvp`` (one extra HVP)."""
    v = v / v.norm()
    r = hvp(v) - lam * v
    return float(r.norm() / max(abs(lam), 1e-30))
