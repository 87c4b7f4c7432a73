"""Per-step curvature signals for mini-batch training, at 1–2 Hessian-vector products each.

λ_max of the full-batch Hessian is what decides the stability of full-batch gradient descent. In mini-batch
training the quantity that settles at 2/η is the **batch sharpness** (Andreyev & Beneventano, "Edge of
Stochastic Stability", arXiv 2412.20553),

    batch_sharpness = E_B[ g_Bᵀ H_B g_B / ‖g_B‖² ],

the curvature of the batch loss along the batch's own gradient. Measured on the step's own batch it is one
sample of that expectation (average the column over steps). For any optimizer the **update curvature**

    update_sharpness = Δθᵀ H Δθ / ‖Δθ‖²,

the curvature along the update actually taken, and the quadratic model's **predicted loss change**
``gᵀΔθ + ½ ΔθᵀHΔθ`` against the **actual** change ``L(θ + Δθ) − L(θ)`` say whether a step overshoots
(η·update_sharpness > 2 for SGD: the quadratic model predicts a loss increase along Δθ). For Adam the
pre-conditioned counterparts use the whitened operator P^{-1/2} H P^{-1/2} (same eigenvalues as P⁻¹H, compared
with the threshold (2+2β₁)/((1−β₁)η)):

    preconditioned_batch_sharpness = (P⁻¹g)ᵀ H (P⁻¹g) / (gᵀ P⁻¹ g),
    preconditioned_update_sharpness = Δθᵀ H Δθ / (Δθᵀ P Δθ).

Each function takes a Hessian operator with a ``gradient`` (a :class:`~curvature.operators.HessianOperator`, or a
:class:`~curvature.operators.GraphHessianOperator` on the training step's own graph) and returns plain floats; its cost in HVPs is
in the docstring. :func:`next_update` gives the Δθ that ``optimizer.step()`` is about to take (SGD with
momentum/Nesterov/weight decay, Adam/AdamW with amsgrad), without taking it.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from ._exact import StateGuard, call_with_state
from .data import as_batches, model_output_loss
from .operators import GraphHessianOperator  # re-exported: it lived here before
from .rows import SIGNAL_KEYS  # the columns step_signals fills (the row schema)

__all__ = ["GraphHessianOperator", "batch_sharpness", "preconditioned_batch_sharpness", "update_sharpness",
           "next_update", "parameter_update", "loss_at", "step_signals", "SIGNAL_KEYS"]



def _quotient(H: Any, u: torch.Tensor, weight: torch.Tensor | None = None) -> tuple[float, torch.Tensor]:
    """``uᵀHu / uᵀWu`` (W = I or diag(weight)) and ``Hu`` (1 HVP, in float64 arithmetic for the sums)."""
    Hu = H.matvec(u)
    num = float(torch.dot(u.double(), Hu.double()))
    den = float(torch.dot(u.double(), u.double() if weight is None else (weight * u).double()))
    return (num / den if den > 0 else math.nan), Hu


def batch_sharpness(H: Any) -> float:
    """``gᵀHg/‖g‖²`` with ``g = H.gradient`` — the batch sharpness of the batch ``H`` was built on (1 HVP).
    ``nan`` at a zero gradient."""
    return _quotient(H, H.gradient)[0]


def preconditioned_batch_sharpness(H: Any, preconditioner: torch.Tensor) -> float:
    """``(P⁻¹g)ᵀH(P⁻¹g) / (gᵀP⁻¹g)`` — the curvature of P^{-1/2}HP^{-1/2} along the whitened gradient
    P^{-1/2}g, i.e. batch sharpness in Adam's geometry (1 HVP). ``preconditioner`` is P's flat diagonal
    (:attr:`~curvature.optim.PreconditionedHessianOperator.preconditioner`)."""
    P = preconditioner.to(device=H.gradient.device, dtype=H.gradient.dtype)
    u = H.gradient / P
    return _quotient(H, u, P)[0]


def update_sharpness(H: Any, update: torch.Tensor, preconditioner: torch.Tensor | None = None) -> dict[str, float]:
    """Curvature along an update Δθ and the quadratic model's loss change (1 HVP):

    ``update_sharpness = ΔθᵀHΔθ/‖Δθ‖²``, ``predicted_loss_change = gᵀΔθ + ½ΔθᵀHΔθ``, and with a
    ``preconditioner`` P also ``preconditioned_update_sharpness = ΔθᵀHΔθ / ΔθᵀPΔθ``."""
    d = update.to(device=H.gradient.device, dtype=H.gradient.dtype).reshape(-1)
    q, Hd = _quotient(H, d)
    curv = float(torch.dot(d.double(), Hd.double()))
    out = {"update_sharpness": q,
           "predicted_loss_change": float(torch.dot(H.gradient.double(), d.double())) + 0.5 * curv}
    if preconditioner is not None:
        P = preconditioner.to(device=d.device, dtype=torch.float64)
        den = float(torch.dot(d.double(), P * d.double()))
        out["preconditioned_update_sharpness"] = curv / den if den > 0 else math.nan
    return out


def _scalar(x: Any) -> float:
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


def next_update(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor],
                grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """The flat update Δθ = θ_{t+1} − θ_t that ``optimizer.step()`` would take with gradients ``grads``, computed
    from the optimizer's state without changing it. Supports ``torch.optim.SGD`` (momentum, dampening, Nesterov,
    weight decay, maximize) and ``Adam``/``AdamW`` (L2 or decoupled weight decay, amsgrad, maximize)."""
    owner: dict[int, dict] = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    parts = []
    for p, g in zip(params, grads):
        group = owner.get(id(p))
        if group is None:
            raise ValueError("the optimizer does not own every parameter of the operator")
        parts.append(parameter_update(optimizer, group, optimizer.state.get(p, {}), p, g).reshape(-1))
    return torch.cat(parts)


def parameter_update(optimizer: torch.optim.Optimizer, group: dict, state: Any, param: torch.Tensor,
                     grad: torch.Tensor) -> torch.Tensor:
    """One parameter's part of :func:`next_update` (float64, shaped like ``param``): the step ``optimizer`` would
    take for ``param`` in ``group`` with optimizer ``state`` (a mapping: ``optimizer.state[param]``, or the same
    with rank-local shards of its tensors) and gradient ``grad``. Reads, never writes."""
    p = param
    g = grad.detach().to(torch.float64).reshape(p.shape)
    theta = p.detach().to(torch.float64)
    lr = _scalar(group["lr"])
    wd = _scalar(group.get("weight_decay", 0.0))
    if group.get("maximize", False):
        g = -g
    if isinstance(optimizer, torch.optim.SGD):
        d = g + wd * theta if wd else g
        mu = _scalar(group.get("momentum", 0.0))
        if mu:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = d
            else:
                buf = mu * buf.detach().to(torch.float64) + (1 - _scalar(group.get("dampening", 0.0))) * d
            d = d + mu * buf if group.get("nesterov", False) else buf
        return -lr * d
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        beta1, beta2 = (_scalar(b) for b in group["betas"])
        eps = _scalar(group["eps"])
        decoupled = bool(group.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW)))
        if wd and not decoupled:
            g = g + wd * theta
        has = "exp_avg" in state and "step" in state
        m = (beta1 * state["exp_avg"].detach().double() if has else 0.0) + (1 - beta1) * g
        v = (beta2 * state["exp_avg_sq"].detach().double() if has else 0.0) + (1 - beta2) * g * g
        t = (_scalar(state["step"]) if has else 0.0) + 1
        if group.get("amsgrad", False):
            vmax = state.get("max_exp_avg_sq")
            v = torch.maximum(vmax.detach().double(), v) if vmax is not None else v
        step = -lr * (m / (1 - beta1 ** t)) / (v.sqrt() / math.sqrt(1 - beta2 ** t) + eps)
        if wd and decoupled:
            step = step - lr * wd * theta
        return step
    raise TypeError(f"next_update supports SGD, Adam and AdamW, got {type(optimizer).__name__}")


def loss_at(model: torch.nn.Module, loss_fn: Any, data: Any, named_params: Sequence[tuple[str, torch.Tensor]],
            delta: torch.Tensor | None = None) -> float:
    """Mean loss (sample-weighted over the batches of ``data``) at θ + Δθ for the named parameters, by a
    forward pass with the parameters swapped in (:func:`curvature._exact.call_with_state`: interrupt-safe) on
    copies of the buffers (the model, its buffers and ``.grad`` are untouched; no graph is built; batches weighted
    as the operators weigh them). Costs one forward pass per batch."""
    numels = [p.numel() for _, p in named_params]
    shifts = torch.split(delta, numels) if delta is not None else [None] * len(numels)
    state: dict[str, torch.Tensor] = {n: b.detach().clone() for n, b in model.named_buffers()}
    for (name, p), s in zip(named_params, shifts):
        state[name] = p.detach() if s is None else p.detach() + s.view_as(p).to(device=p.device, dtype=p.dtype)
    total, count = 0.0, 0.0
    with torch.no_grad():
        for b in as_batches(data, model=model, own_loss=loss_fn is model_output_loss):
            guard = StateGuard()
            try:
                out = call_with_state(model, state, b.args, b.kwargs, guard)
            finally:
                guard.restore()
            total += float(loss_fn(out, b.targets)) * b.weight
            count += b.weight
    return total / max(count, 1e-300)


def step_signals(H: Any, optimizer: Any = None, *, preconditioner: torch.Tensor | None = None,
                 loss_after: Any = None) -> dict[str, Any]:
    """All signals of one step from one Hessian operator ``H`` (with ``gradient``) of the step's batch:
    batch sharpness (1 HVP), and with an ``optimizer`` the update of the step about to be taken
    (:func:`next_update`), its curvature and predicted loss change (1 HVP); with a ``preconditioner`` the Adam
    counterparts (1 more HVP); ``loss_after(delta) -> float`` (e.g. :func:`loss_at`) gives the actual change.
    Returns the :data:`SIGNAL_KEYS` columns (``signals_num_hvps``: HVPs spent)."""
    import time

    t0 = time.perf_counter()
    row: dict[str, Any] = dict.fromkeys(SIGNAL_KEYS)
    hvps = 1
    row["batch_sharpness"] = batch_sharpness(H)
    if preconditioner is not None:
        row["preconditioned_batch_sharpness"] = preconditioned_batch_sharpness(H, preconditioner)
        hvps += 1
    if optimizer is not None:
        grads = H.unflatten(H.gradient)
        delta = next_update(optimizer, H.params, grads)
        row.update(update_sharpness(H, delta, preconditioner))
        hvps += 1
        if loss_after is not None and math.isfinite(H.loss):
            row["actual_loss_change"] = float(loss_after(delta)) - H.loss
    row["signals_num_hvps"] = hvps
    row["signals_seconds"] = time.perf_counter() - t0
    return row
