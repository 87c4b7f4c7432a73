"""A ``torch.compile``-d Hessian-vector product (the ``compile=True`` option of the exact engine).

For a batch b with loss L_b(θ) the compiled function returns

    H_b v = d/dt ∇L_b(θ + t v) |_{t=0} = ``torch.func.jvp(torch.func.grad(L_b), (θ,), (v,))[1]``,

forward-over-reverse, the composition that is exact for every layer we test (anything through ``jacrev`` is not:
see shared/README.md, "Known autograd traps"). The model is evaluated with ``torch.func.functional_call`` on the
tensors passed in (θ, the frozen parameters and copies of the buffers), so one compiled function serves every
point: ``torch.compile`` keys its cache on the code of ``hvp`` with guards on the closed-over (model, loss_fn), so
operators built on the same model and loss (a tracker's rows) reuse the compiled code instead of compiling again.
Guards recompile on new shapes (e.g. a smaller last batch).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

__all__ = ["compiled_hvp"]


def compiled_hvp(model: nn.Module, loss_fn: Callable[[Any, Any], torch.Tensor]) -> Callable[..., tuple[torch.Tensor, ...]]:
    """``hvp(names, primals, tangent, others, args, kwargs, targets) -> H v`` per parameter, compiled once per
    (model, loss_fn) (see the module docstring). ``names``/``primals``: the parameters θ differentiated;
    ``others``: every other parameter and buffer by name; ``args``/``kwargs``/``targets``: the batch."""

    def loss_at(primals: tuple[torch.Tensor, ...], names: tuple[str, ...], others: Mapping[str, torch.Tensor],
                args: Sequence[Any], kwargs: Mapping[str, Any], targets: Any) -> torch.Tensor:
        state = dict(others)
        state.update(zip(names, primals))
        out = torch.func.functional_call(model, state, tuple(args), dict(kwargs))
        return loss_fn(out, targets).reshape(())

    def hvp(names: tuple[str, ...], primals: tuple[torch.Tensor, ...], tangent: tuple[torch.Tensor, ...],
            others: Mapping[str, torch.Tensor], args: Sequence[Any], kwargs: Mapping[str, Any],
            targets: Any) -> tuple[torch.Tensor, ...]:
        # Floating-point targets enter the jvp as primals with zero tangents (same H v): left out, the jvp rules
        # of target-taking losses (mse_loss, ...) make "efficient zero" tangents for them, which AOTAutograd cannot
        # handle on torch 2.13 (inductor: a segfault in the generated code; aot_eager: "ZeroTensors are immutable").
        leaves, spec = tree_flatten(targets)
        floats = [i for i, t in enumerate(leaves) if isinstance(t, torch.Tensor) and t.is_floating_point()]

        def loss_of(p: tuple[torch.Tensor, ...], dual: tuple[torch.Tensor, ...]) -> torch.Tensor:
            filled = list(leaves)
            for i, t in zip(floats, dual):
                filled[i] = t
            return loss_at(p, names, others, args, kwargs, tree_unflatten(filled, spec))

        dual = tuple(leaves[i] for i in floats)
        zeros = tuple(torch.zeros_like(t) for t in dual)
        return torch.func.jvp(torch.func.grad(loss_of), (primals, dual), (tangent, zeros))[1]

    return torch.compile(hvp, dynamic=False)  # jvp's make_dual fails on symbolic shapes (torch 2.13)
