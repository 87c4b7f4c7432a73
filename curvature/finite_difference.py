"""Hessian-vector products from differences of the model's own gradients (``method="finite_difference"``).

For a direction v and the step h along its unit vector v̂ = v/‖v‖ (ε = h/‖v‖),

    D_ε(v) = (G(θ + εv) − G(θ − εv)) / 2ε = Hv + (ε²/6)·∇³L[v, v, ·]·‖…‖ + O(ε⁴),   G = Σ_b n_b ∇L_b,

with G computed by the model's *own* forward and backward on its real parameters (no ``functional_call``, no
second-order graph, no kernel rerouting): whatever trains the model computes the curvature — fused / flash
SDPA, ``torch.compile``, activation checkpointing, bf16 autocast, fused loss kernels, FSDP's sharded
parameters (see :mod:`curvature.sharded`). Nothing is kept between HVPs; peak memory is that of one gradient.

**Choice of the step (documented derivation).** Two errors compete. Truncation: the first neglected term of
the central difference is (h²/6)·∂³_v̂ ∇L, so it grows as h². Rounding: θ ± h v̂ is rounded to the parameters'
dtype and each gradient carries a rounding error of relative size ~u (u = unit roundoff); both enter divided
by 2h. The sum c₁h² + c₂u/h is smallest at h ∝ u^{1/3}. The length scale is that of one coordinate of θ, its
root mean square ‖θ‖/√n (a unit direction v̂ spread over the coordinates moves each one by about h/√n, i.e.
by the relative amount h/‖θ‖; an eigenvector concentrated on a few weights moves those by up to h), floored
at 1 so that a model near θ = 0 still gets a step that rounding does not swamp:

    h = c · u^{1/3} · max(1, ‖θ‖/√n),        ε = h/‖v‖,        c = 1/4.

The constant c = (3c₂/c₁)^{1/3} depends on the ratio of rounding to third-derivative constants, which is
smallest along the top eigenvectors (they concentrate on the most curved weights); c = 1/4 is calibrated on
the benchmark models for λ_max: on the GPT in float32, λ_max is 1.3e-4 accurate with c = 1/4 and 1.9e-3
with c = 1 (random-direction HVPs prefer a larger step: 4e-4 vs 2e-4).

Measured figures per model and dtype are in ``docs/distributed.md``. The step is scaled by the coordinate
scale and not by ‖θ‖ for the same reason: h = u^{1/3}‖θ‖ is better for random directions and 10× worse for
λ_max. With ``order=4`` the Richardson combination (4·D_{ε/2} − D_ε)/3 cancels the h² term; its
error c₁h⁴ + c₂u/h is smallest at h ∝ u^{1/5} (4 gradients per HVP instead of 2), with the
same c; λ_max of the GPT in float32 to 4e-5.
u is that of the lower of the parameters' dtype and an autocast dtype active at construction (bf16 autocast:
the gradients carry bf16 rounding). Non-smooth models (ReLU, max-pool) cross kinks within the step: their FD
Hessian is a smoothed one (errors up to O(1) in float32 on the ReLU CNN); check with
:func:`curvature.diagnostics.compare_hvp_routes` first.

**Guarantees.** After every HVP (also when interrupted): the parameters are bitwise what they were (a copy is
kept and written back; θ + εv − εv is not θ in floating point), the buffers too (train-mode BatchNorm updates
its running statistics in the forward; they are written back), ``.grad`` is the tensor it was (or ``None``),
and the RNG state is restored; every forward pass of one engine reseeds the RNG per batch, so both evaluations
of a difference (and every HVP) draw the same dropout masks. This is one fixed operator up to O(h²) terms, not
exactly linear nor exactly symmetric: Lanczos/LOBPCG converge to its eigenvalues to about the accuracy of one
HVP (measured).

Gradients come from ``torch.autograd.grad(loss, params)`` (``gradient="autograd"``: ``.grad`` is never written
and DDP's hooks do not fire; the default for ordinary modules) or from ``loss.backward()`` and ``.grad``
(``gradient="backward"``: needed by FSDP, whose gradients are reduce-scattered by its backward hooks, and by
reentrant activation checkpointing; ``.grad`` is saved and put back). ``"auto"`` picks ``"backward"`` when a
parameter is a ``DTensor`` and ``"autograd"`` otherwise.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ._exact import frozen_rng, holding_rng, peek_seed, reseed
from .data import Batch, as_batches, model_output_loss, resolve_loss_fn
from ._validate import check_device
from .hvp import check_parameters, select_parameters

__all__ = ["FiniteDifferenceEngine", "finite_difference_step", "ONE_SIDED_STEP_CONSTANT", "is_dtensor", "local_tensor"]

GRADIENT_MODES = ("auto", "autograd", "backward")
# c in h = c·u^{1/3}·max(1, ‖θ‖/√n): calibrated on the benchmark models for λ_max (see the module docstring).
STEP_CONSTANT = 0.25
# c in h = c·u^{1/2}·max(1, ‖θ‖/√n) for the one-sided difference (order=1): calibrated on the benchmark models
# (GELU/tanh MLPs on digits, the GPT; float32) for the Rayleigh quotient along the top eigenvector.
ONE_SIDED_STEP_CONSTANT = 1.0


def is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "to_local")


def local_tensor(t: Any) -> Any:
    """What this rank stores: a DTensor's local shard (same storage), else ``t`` itself (any other tensor, a number,
    ``None``)."""
    return t.to_local() if is_dtensor(t) else t


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = eps/2 of ``dtype``."""
    return torch.finfo(dtype).eps / 2


def finite_difference_step(theta_rms: float, dtype: torch.dtype, order: int = 2) -> float:
    """The step length h (along a unit direction): c·u^{1/3}·max(1, ‖θ‖/√n) for central differences
    (``order=2``), c·u^{1/5}·max(1, ‖θ‖/√n) for the Richardson variant (``order=4``); ``theta_rms`` = ‖θ‖/√n,
    c = :data:`STEP_CONSTANT`; c₁·u^{1/2}·max(1, ‖θ‖/√n) for the one-sided difference (``order=1``: truncation
    c₁h against rounding c₂u/h), c₁ = :data:`ONE_SIDED_STEP_CONSTANT`.
    See the module docstring for the derivation."""
    if order not in (1, 2, 4):
        raise ValueError(f"order must be 1 (one-sided), 2 (central differences) or 4 (Richardson), got {order!r}")
    if order == 1:
        return ONE_SIDED_STEP_CONSTANT * unit_roundoff(dtype) ** 0.5 * max(1.0, float(theta_rms))
    power = 1.0 / 3.0 if order == 2 else 1.0 / 5.0
    return STEP_CONSTANT * unit_roundoff(dtype) ** power * max(1.0, float(theta_rms))


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    try:
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
    except (TypeError, AttributeError, RuntimeError):  # older signatures
        return None
    return None


class FiniteDifferenceEngine:
    """Applies Σ_b n_b ∇²L_b(θ) (≈, by central gradient differences) to ``(k, *shape)`` direction blocks.

    Same interface as :class:`curvature.hvp.HVPEngine` (``hvp_sum``, ``loss_and_grad_sum``, ``loss_sum``,
    ``grad_sum``, ``names``/``params``/``shapes``, ``numel``), so :class:`~curvature.operators.HessianOperator`
    picks it for ``method="finite_difference"``.

    Args (beyond HVPEngine's):
        order: 2 (central differences, 2 gradients per HVP), 4 (Richardson, 4 gradients per HVP) or 1 (one-sided,
            (G(θ + εv) − G(θ))/ε with G(θ) computed once at construction: **one gradient per HVP**, error O(h)
            instead of O(h²); :meth:`one_sided_side` flips it to (G(θ) − G(θ − εv))/ε, and the two together are
            the central difference: the tracker's check of this route's own error, see
            :mod:`curvature.tracking`).
        epsilon: the step length h along the unit direction (default :func:`finite_difference_step`).
        gradient: ``"auto"``, ``"autograd"`` or ``"backward"`` (see the module docstring).
        sum_over_shards: for sharded parameters, a function summing a float64 tensor over the ranks that hold
            the shards (norms of θ and v are global); identity by default.
        gradient_world: for FSDP, whose backward returns the *average* over its R ranks of their gradients: set
            to R, each rank back-propagates n_b·L_b and the shard gradient is multiplied by R, so the sum is the
            global sample-weighted Σ_r Σ_b n_b ∇L_b (the caller divides by the global N).

    ``dtype``/``device`` other than the parameters' run on a deep copy of the model cast to them (one extra
    copy of the model; refused for sharded models).
    """

    method = "finite_difference"

    def __init__(self, model: nn.Module, loss_fn: Any, data: Any, params: Sequence[str | torch.Tensor] | None = None,
                 *, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 seed: int | None = None, max_batch_size: int | None = None, allow_empty: bool = False,
                 order: int = 2, epsilon: float | None = None, gradient: str = "auto",
                 sum_over_shards: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 gradient_world: int | None = None, weight_fn: Callable[[Any], Any] | None = None,
                 inputs_as: str = "kwargs", **_ignored: Any) -> None:
        if order not in (1, 2, 4):
            raise ValueError(f"fd_order must be 1 (one-sided), 2 (central differences) or 4 (Richardson), "
                             f"got {order!r}")
        if gradient not in GRADIENT_MODES:
            raise ValueError(f"gradient must be one of {GRADIENT_MODES}, got {gradient!r}")
        if epsilon is not None and not (math.isfinite(epsilon) and epsilon > 0):
            raise ValueError(f"fd_epsilon must be a positive finite step length, got {epsilon!r}")
        loss_fn = resolve_loss_fn(loss_fn)  # None: the model's own loss; sum-reduced loss modules refused
        # DDP / DataParallel are unwrapped (their gradient hooks must not fire; the operator all-reduces);
        # a torch.compile wrapper is kept: the compiled forward/backward is what computes the gradients.
        while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        first = next((p for p in model.parameters()), None)
        if first is None:
            raise ValueError("the model has no parameters")
        device = check_device(device)
        sharded = any(is_dtensor(p) for p in model.parameters())
        want_dtype = dtype if dtype is not None else None
        want_device = torch.device(device) if device is not None else None
        if (want_dtype is not None and want_dtype != first.dtype) or (want_device is not None and want_device != first.device):
            if sharded:
                raise ValueError("dtype=/device= other than the sharded parameters' would need a full copy of the "
                                 "model; run the finite-difference route in the parameters' own dtype")
            # A private copy in the requested dtype/device: the user's model is never written.
            model = copy.deepcopy(model).to(device=want_device or first.device, dtype=want_dtype or first.dtype)
            self._input_dtype: torch.dtype | None = want_dtype
        else:
            self._input_dtype = None
        self.model = model
        self.loss_fn = loss_fn
        selected = select_parameters(model, params)
        check_parameters(model, selected)
        self.names = [n for n, _ in selected]
        self.params = [p for _, p in selected]
        self.shapes = [local_tensor(p).shape for p in self.params]  # local shapes (the shard) for DTensors
        dtypes = {p.dtype for p in self.params}
        if len(dtypes) > 1:
            raise TypeError(f"the selected parameters have mixed dtypes {sorted(map(str, dtypes))}; pass dtype=")
        self.dtype = self.params[0].dtype
        if not self.dtype.is_floating_point:
            raise TypeError(f"curvature needs floating-point parameters, got {self.dtype}")
        self.device = local_tensor(self.params[0]).device
        self.acc_dtype = self.dtype if torch.finfo(self.dtype).bits >= 32 else torch.float32
        self.gradient_mode = ("backward" if sharded else "autograd") if gradient == "auto" else gradient
        self.order = order
        self._sum = sum_over_shards or (lambda t: t)
        self.gradient_world = gradient_world
        self.batches = as_batches(data, max_batch_size, weight_fn=weight_fn, inputs_as=inputs_as, model=model,
                                  own_loss=loss_fn is model_output_loss)
        if not len(self.batches) and not allow_empty:
            raise ValueError("data is empty: it yielded no batches")
        self.num_samples = self.batches.total_weight  # Σ_b w_b (samples, or what weight_fn / labels say)
        self.seed = peek_seed(self.device) if seed is None else int(seed)
        ac = _autocast_dtype(self.device)
        self.rounding_dtype = ac if ac is not None and torch.finfo(ac).eps > torch.finfo(self.dtype).eps else self.dtype
        self.autocast_dtype = ac

        # What every HVP restores bitwise. Plain parameters are perturbed by swapping in a new tensor
        # (``p.data = θ + εv``) and swapped back: their storage is never written and their autograd version
        # counter never moves, so a graph the caller built before (loss computed, backward still to come) stays
        # valid. Sharded (DTensor) parameters must be written in place, in the shard storage FSDP all-gathers
        # from; a copy of the shard is kept and written back.
        self._inplace = [is_dtensor(p) for p in self.params]
        self._theta0 = [local_tensor(p).detach().clone() if ip else p.data for p, ip in zip(self.params, self._inplace)]
        self._buffers = [(b, b.detach().clone()) for b in model.buffers()]
        sq = torch.zeros(2, dtype=torch.float64, device=self.device)
        for t in self._theta0:
            sq[0] += t.double().pow(2).sum()
            sq[1] += t.numel()
        sq = self._sum(sq)
        self.theta_norm = float(sq[0].sqrt().item())
        self.theta_rms = self.theta_norm / math.sqrt(max(float(sq[1].item()), 1.0))
        self.epsilon = float(epsilon) if epsilon is not None else finite_difference_step(
            self.theta_rms, self.rounding_dtype, order)

        loss_sum, grad_sum = self._gradient_sum(None)
        for name, g in zip(self.names, grad_sum):
            if not torch.isfinite(g).all().item():
                raise FloatingPointError(f"the gradient is not finite (NaN/inf) in parameter '{name}'")
        self.loss_sum = loss_sum
        self.grad_sum = [g.to(self.dtype) for g in grad_sum]
        self._grad0 = grad_sum  # G(θ) in the accumulation dtype: the base of every one-sided difference
        self._side = 1.0  # +1: (G(θ+εv) − G(θ))/ε; −1: (G(θ) − G(θ−εv))/ε (order=1 only)
        self.gradients = 1  # gradient passes over the data so far (G(θ) at construction)

    # -- one pass over the data at θ + step --------------------------------------------------------------
    @contextmanager
    def _restoring(self) -> Iterator[None]:
        """Parameters, buffers, ``.grad`` and the RNG as they were on exit, whatever happens inside."""
        saved_grads = [(p, p.grad) for p in self.model.parameters()] if self.gradient_mode == "backward" else []
        try:
            with frozen_rng(self.device), torch.enable_grad():
                yield
        finally:
            with torch.no_grad():
                for p, t0, ip in zip(self.params, self._theta0, self._inplace):
                    if ip:
                        local_tensor(p).copy_(t0)
                    else:
                        p.data = t0
                for b, b0 in self._buffers:
                    b.copy_(b0)
            torch.clear_autocast_cache()
            for p, g in saved_grads:
                p.grad = g

    def _gradient_sum(self, step: Sequence[torch.Tensor] | None, alpha: float = 0.0
                      ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(Σ_b n_b L_b, Σ_b n_b ∇L_b) at θ + alpha·step (``step=None``: at θ), then θ restored."""
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        acc: list[torch.Tensor | None] = [None] * len(self.shapes)
        with self._restoring():
            if step is not None:
                with torch.no_grad():
                    step = [d if d.dtype == t0.dtype else d.to(t0.dtype) for d, t0 in zip(step, self._theta0)]
                    for p, moved, ip in zip(self.params, torch._foreach_add(self._theta0, step, alpha=alpha),
                                            self._inplace):
                        if ip:
                            local_tensor(p).copy_(moved)
                        else:
                            p.data = moved
                    # autocast caches its low-precision copies of the weights per tensor: drop them, or the
                    # perturbed forward would reuse the unperturbed bf16 weights (and the difference be 0)
                    torch.clear_autocast_cache()
            for i, batch in enumerate(self.batches):
                loss_b, grads = self._one_gradient(i, batch)
                if not math.isfinite(loss_b.item()):
                    raise FloatingPointError(f"the loss is {loss_b.item()} at batch {i} of {len(self.batches)}"
                                             + ("" if step is None else f" at a step of {alpha:.3g} along the "
                                                "direction") + ": curvature is undefined there")
                loss_sum += loss_b.double() * batch.weight
                weight = batch.weight if self.gradient_world is None else self.gradient_world
                for j, g in enumerate(grads):
                    if g is None:
                        continue
                    # a fresh tensor (autograd's, or the detached .grad just dropped): accumulated into in place
                    g = g if g.dtype == self.acc_dtype else g.to(self.acc_dtype)
                    if acc[j] is None:
                        acc[j] = g if weight == 1 else g.mul_(weight)
                    else:
                        acc[j].add_(g, alpha=weight)
                # the next batch's forward must see the same buffers as this one (train-mode BatchNorm)
                with torch.no_grad():
                    for b, b0 in self._buffers:
                        b.copy_(b0)
        grad_sum = [torch.zeros(s, dtype=self.acc_dtype, device=self.device) if a is None else a
                    for a, s in zip(acc, self.shapes)]
        return loss_sum, grad_sum

    def _one_gradient(self, index: int, batch: Batch) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        if self.gradient_mode == "backward":
            # before the forward: FSDP decides in its forward hooks whether the backward accumulates into an
            # existing .grad (the caller's, saved by _restoring), so it must see none
            for p in self.model.parameters():
                p.grad = None
        reseed(self.seed + index, self.device)
        cast = self._input_dtype
        try:
            out = self.model(*_to(batch.args, self.device, cast), **_to(batch.kwargs, self.device, cast))
        except RuntimeError as exc:
            if "mat_a" in str(exc) and "Float32" in str(exc):  # the fused grouped matmul rejects this dtype
                raise TypeError(
                    f"the model's grouped-matmul kernel (F.grouped_mm / torch._grouped_mm: Mixtral-style MoE experts) "
                    f"takes float32/bfloat16/float16 only, and method='finite_difference' runs the model's own kernels "
                    f"(here in {self.dtype}). Use an exact route (method='auto': inside curvature calls the kernel is "
                    "replaced by per-expert matmuls, exact in any dtype), or float32 with this route, or the eager "
                    "experts (model.config._experts_implementation = 'eager')") from exc
            raise
        loss = self.loss_fn(out, _to(batch.targets, self.device, cast))
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(f"loss_fn must return a scalar (mean-reduced) loss, got {shape}")
        loss = loss.reshape(())
        if self.gradient_mode == "autograd":
            grads = torch.autograd.grad(loss, self.params, allow_unused=True)
            return loss.detach(), [None if g is None else g.detach() for g in grads]
        for p in self.model.parameters():
            p.grad = None
        (loss if self.gradient_world is None else loss * batch.weight).backward()
        grads = [None if p.grad is None else local_tensor(p.grad).detach() for p in self.params]
        for p in self.model.parameters():
            p.grad = None
        return loss.detach(), grads

    # -- HVPs ------------------------------------------------------------------------------------------
    def hvp_sum(self, tangents: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """≈ Σ_b n_b ∇²L_b(θ) V for V given per parameter as ``(k, *shape)`` tensors; same layout out."""
        k = tangents[0].shape[0]
        # squared column norms in float64 without float64 copies of the tangents
        if k == 1:
            sq = torch.stack(torch._foreach_norm([t.reshape(-1) for t in tangents], 2, dtype=torch.float64))
            sq = (sq * sq).sum().reshape(1)
        else:
            sq = sum(torch.linalg.vector_norm(t.reshape(k, -1), dim=1, dtype=torch.float64) ** 2 for t in tangents)
        norms = self._sum(sq.to(self.device)).sqrt().tolist()
        columns: list[list[torch.Tensor] | None] = []
        with holding_rng(self.device):  # the RNG states saved once for the k gradients
            for c in range(k):
                if norms[c] == 0.0:
                    columns.append(None)
                    continue
                v = [t[c] for t in tangents]
                eps = self.epsilon / norms[c]
                if self.order == 1:
                    _, g = self._gradient_sum(v, self._side * eps)
                    self.gradients += 1
                    d = torch._foreach_sub(g, self._grad0)
                    torch._foreach_div_(d, self._side * eps)
                else:
                    d = self._central(v, eps)
                    if self.order == 4:
                        d_half = self._central(v, eps / 2)
                        d = [(4 * a - b) / 3 for a, b in zip(d_half, d)]
                columns.append(d)
        if k == 1 and columns[0] is not None:
            return [(x if x.dtype == self.dtype else x.to(self.dtype)).unsqueeze(0) for x in columns[0]]
        out = [torch.zeros((k, *s), dtype=self.dtype, device=self.device) for s in self.shapes]
        for c, d in enumerate(columns):
            if d is not None:
                for j, x in enumerate(d):
                    out[j][c] = x.to(self.dtype)
        return out

    def _central(self, v: Sequence[torch.Tensor], eps: float) -> list[torch.Tensor]:
        _, g_plus = self._gradient_sum(v, eps)
        _, g_minus = self._gradient_sum(v, -eps)
        self.gradients += 2
        return [(a - b) / (2 * eps) for a, b in zip(g_plus, g_minus)]

    @contextmanager
    def one_sided_side(self, side: int) -> Iterator[None]:
        """Within: the one-sided difference steps forward (``side=1``, the default) or backward (``side=-1``,
        (G(θ) − G(θ − εv))/ε). The mean of the two is the central difference; half their difference, ≈ (ε/2)·
        ∇³L[v, v, ·], is the one-sided route's own error on v. ``order=1`` only."""
        if self.order != 1:
            raise ValueError(f"one_sided_side() needs the one-sided engine (order=1), this one has order={self.order}")
        if side not in (1, -1):
            raise ValueError(f"side must be 1 or -1, got {side!r}")
        old, self._side = self._side, float(side)
        try:
            yield
        finally:
            self._side = old

    def loss_and_grad_sum(self, primals: Sequence[torch.Tensor]) -> tuple[float, list[torch.Tensor]]:
        """Σ_b n_b L_b and Σ_b n_b ∇L_b at another point θ' (the model's parameters are put back after)."""
        step = [p.to(device=self.device, dtype=self.dtype) - t0 for p, t0 in zip(primals, self._theta0)]
        loss_sum, grad_sum = self._gradient_sum(step, 1.0)
        return float(loss_sum), [g.to(self.dtype) for g in grad_sum]

    @property
    def primals(self) -> tuple[torch.Tensor, ...]:
        """θ (this rank's shard for sharded parameters), as saved at construction."""
        return tuple(self._theta0)

    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)


def _to(x: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    """Move tensors to ``device``; floating ones also to ``dtype`` when given (a model copied to dtype=)."""
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=dtype) if dtype is not None and x.is_floating_point() else x.to(device)
    if isinstance(x, dict):
        return {k: _to(v, device, dtype) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_to(v, device, dtype) for v in x)
    return x
