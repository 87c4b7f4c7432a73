"""The second-order context: what every curvature computation runs inside.

PyTorch's second derivatives are right through plain double backward and through
``torch.func.jvp(torch.func.grad(f))`` (and ``vmap`` over it) for every op we test, but

* fused ``F.scaled_dot_product_attention`` kernels (flash / memory-efficient, the default for 4-D inputs on
  CPU and GPU) have neither double backward nor forward-mode AD: we select the MATH kernel, which is
  differentiable twice and computes the same function;
* cuDNN RNN kernels have no double backward: cuDNN is disabled inside the context;
* train-mode BatchNorm updates its running statistics in place, which breaks ``torch.func`` transforms and
  would change buffers: inside the context a train-mode BatchNorm is told not to track running statistics,
  which selects the very same function (batch statistics) without the in-place update.

``torch.func.jacrev``-based routes (``torch.func.hessian``, ``jvp(jacrev(f))``) are wrong for affine LayerNorm,
train-mode BatchNorm and InstanceNorm on torch 2.13; nothing in this package uses them (see
``tests/test_exactness.py``, which guards every route we do use against central differences).

The context also freezes randomness: :func:`frozen_rng` forks the global RNG (CPU and the CUDA device in use)
and :func:`reseed` makes every forward pass of one operator draw the same dropout masks, so the operator is
one fixed symmetric matrix; the caller's RNG state is restored bit for bit on exit.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["second_order_context", "frozen_rng", "reseed", "peek_seed", "unwrap_model", "has_train_mode_batchnorm"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip wrappers whose forward adds hooks or compilation: DDP/DataParallel (``.module``) and
    ``torch.compile`` (``._orig_mod``). Parameters are shared, so curvature is that of the wrapped model."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(getattr(model, "_orig_mod"), nn.Module):
            model = model._orig_mod
        else:
            return model


def has_train_mode_batchnorm(model: nn.Module) -> bool:
    """True if a BatchNorm layer normalises with batch statistics (couples the samples of a batch)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or not m.track_running_stats)
               for m in model.modules())


@contextlib.contextmanager
def _sdpa_math_kernel() -> Iterator[None]:
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3 has no selector; nothing to do
        yield
        return
    with sdpa_kernel([SDPBackend.MATH]):
        yield


@contextlib.contextmanager
def _batchnorm_without_running_stats(model: nn.Module) -> Iterator[None]:
    changed = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats:
            m.track_running_stats = False
            changed.append(m)
    try:
        yield
    finally:
        for m in changed:
            m.track_running_stats = True


@contextlib.contextmanager
def second_order_context(model: nn.Module) -> Iterator[None]:
    """Run model code so that its second derivatives exist and are exact, and no state changes.

    Selects the MATH attention kernel, disables cuDNN (RNN double backward), turns off running-stat
    updates of train-mode BatchNorm (same function, no in-place buffer writes) and enables grad mode.
    """
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.enable_grad())
        stack.enter_context(_sdpa_math_kernel())
        stack.enter_context(torch.backends.cudnn.flags(enabled=False))
        stack.enter_context(_batchnorm_without_running_stats(model))
        yield


def _rng_devices(device: torch.device) -> list[int]:
    if device.type == "cuda" and torch.cuda.is_available():
        return [device.index if device.index is not None else torch.cuda.current_device()]
    return []


@contextlib.contextmanager
def frozen_rng(device: torch.device) -> Iterator[None]:
    """Restore the global RNG state (CPU and the CUDA device in use) on exit, whatever happens inside."""
    with torch.random.fork_rng(devices=_rng_devices(device)):
        yield


def reseed(seed: int, device: torch.device) -> None:
    """Seed the generators a forward pass on ``device`` draws from (call inside :func:`frozen_rng`)."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda" and torch.cuda.is_available():
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)


def peek_seed(device: torch.device) -> int:
    """A seed derived from the current RNG state, without advancing it."""
    with frozen_rng(device):
        return int(torch.randint(0, 2**62, (1,)).item())
