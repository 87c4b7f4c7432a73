r"""Catapult-based critical learning rate, and the warm-ups built on it.

Kalra & Barkeshli, *Why Warmup the Learning Rate? Underlying Mechanisms and Improvements* (NeurIPS 2024,
arXiv 2406.09405): when the learning rate crosses the local stability threshold (``η ≈ 2/λ_max`` for GD), one
optimizer step *increases* the loss ("loss catapult"). The smallest such ``η`` on a fixed batch, the critical
learning rate ``η_c``, is found with forward passes only:

* from ``θ_0``, one optimizer step with candidate ``η`` gives ``θ_1(η)``; the loss *increased* when
  ``L(θ_1) >= L(θ_0)`` (a non-finite ``L(θ_1)`` counts as an increase);
* an exponential search (doubling from ``η_start``, capped at ``η_trgt``) brackets the first increase;
* a binary search narrows the bracket ``[lo, hi]`` (``L(θ_1(lo)) < L(θ_0) <= L(θ_1(hi))``) until the upper end
  also satisfies ``L(θ_1(hi)) < L(θ_0) + δ·|L(θ_0)|`` (``= L(θ_0)(1 + δ)`` for a positive loss);
  ``η_c = hi``. ``δ = 0.1`` suits SGD; for Adam, whose pre-conditioned step is far more sensitive, use ``δ ≈ 0.01``.

For plain GD on a quadratic ``L = ½ Σ λ_i θ_i²`` with ``θ_0`` along the top eigenvector,
``L(θ_1)/L(θ_0) = (1 - ηλ_max)²``, so ``2/λ_max <= η_c < (1 + √(1+δ))/λ_max``.

The gradient at ``θ_0`` does not depend on ``η``: it is computed once (one forward and one backward pass) and
reused for every trial, so each trial costs one forward pass. Every trial step is undone exactly (parameters,
buffers, ``.grad``, optimizer state, ``model.training``, RNG state).

The paper then warms up from ``η_init = η_c``: ``η_t = η_init + η_trgt·t/T`` capped at ``η_trgt``
(:func:`catapult_warmup`); if no catapult happens up to ``η_trgt``, ``η_init = η_trgt/10``. Its *persistent*
catapult warm-up (:class:`PersistentCatapultWarmup`) repeats the search whenever the loss has fallen below the
reference loss, jumping ``η`` to the bracket's upper end each time, until ``η_trgt``.
"""
from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from .._exact import unwrap_model
from ..data import own_loss_batch, resolve_loss_fn
from ..distributed import collective_device, resolve_process_group, sum_or_fail
from ..hvp import as_batches, call_model
from .param_groups import group_lr, set_group_lr
from .schedules import CatapultWarmup

__all__ = ["CriticalLR", "find_critical_lr", "catapult_warmup", "PersistentCatapultWarmup", "global_mean"]

OptimizerFactory = Callable[[list[nn.Parameter], float], torch.optim.Optimizer]
LossFn = Callable[[Any, Any], torch.Tensor]


@dataclass(frozen=True)
class CriticalLR:
    """Result of :func:`find_critical_lr`.

    Attributes:
        lr_c: the critical learning rate ``η_c`` (upper end of the final bracket), or ``None`` when no catapult
            happened up to ``lr_target``.
        bracket: ``(lower, upper)``: the largest tried ``η`` whose step decreased the loss and the smallest that
            increased it (``lower`` is ``0.0`` if every tried ``η`` increased it; ``upper`` is ``None`` when none did).
        forward_passes: forward passes used, the one at ``θ_0`` (which also had the only backward pass) included.
        lr_init: the recommended initial warm-up learning rate: ``lr_c``, or ``lr_target/10`` when not found.
        found: whether a catapult (loss increase) was found at or below ``lr_target``.
        history: every trial as ``(lr, loss_after_one_step)``, in the order tried.
        loss0: ``L(θ_0)`` on the batch.
        lr_target: the target learning rate searched up to.
        delta: the tolerance ``δ`` used.
        converged: ``False`` when the search stopped early: ``max_forward_passes`` ran out, or the bracket shrank
            to float resolution before ``δ`` was met (``lr_c`` is then the best upper end so far, or ``None``).
        backward_passes: always 1 (the gradient at ``θ_0``).
    """

    lr_c: float | None
    bracket: tuple[float, float | None]
    forward_passes: int
    lr_init: float
    found: bool
    history: list[tuple[float, float]] = field(default_factory=list)
    loss0: float = math.nan
    lr_target: float = math.nan
    delta: float = 0.1
    converged: bool = True
    backward_passes: int = 1


# -- state guarding -----------------------------------------------------------------------------------------
class _RNGState:
    """The global torch RNG state (CPU, and every CUDA device once CUDA is initialised)."""

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        cuda_live = torch.cuda.is_available() and torch.cuda.is_initialized()
        self.cuda = torch.cuda.get_rng_state_all() if cuda_live else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


class _ModelState:
    """Bitwise snapshot of parameters, buffers, ``.grad`` (the tensor objects themselves) and training flags."""

    def __init__(self, model: nn.Module, extra_params: Iterable[torch.Tensor] = ()) -> None:
        seen: set[int] = set()
        self.params: list[torch.Tensor] = []
        for p in [*model.parameters(), *extra_params]:
            if id(p) not in seen:
                seen.add(id(p))
                self.params.append(p)
        self.param_values = [p.detach().clone() for p in self.params]
        self.grads = [p.grad for p in self.params]  # the objects: we only ever re-assign .grad, never write into it
        self.buffers = [b for b in model.buffers()]
        self.buffer_values = [b.detach().clone() for b in self.buffers]
        self.training = [(m, m.training) for m in model.modules()]

    @torch.no_grad()
    def restore_values(self) -> None:
        for p, v in zip(self.params, self.param_values):
            p.copy_(v)
        for b, v in zip(self.buffers, self.buffer_values):
            b.copy_(v)

    def restore(self) -> None:
        self.restore_values()
        for p, g in zip(self.params, self.grads):
            p.grad = g
        for m, flag in self.training:
            m.training = flag


# -- helpers ------------------------------------------------------------------------------------------------
def global_mean(value: float | Callable[[], float], weight: float, group: Any) -> float:
    """``Σ_r w_r·v_r / Σ_r w_r`` over the ranks of ``group`` (float64, one all-reduce); ``value`` for ``None``.
    A non-finite value on any rank makes the result non-finite on every rank, so all ranks decide alike.
    ``value`` may be a callable computing it: a rank where it raises (or is interrupted: Ctrl-C, ``sys.exit``)
    makes every rank raise together (:func:`~curvature.distributed.sum_or_fail`) instead of the others waiting."""
    if group is None:
        return float(value() if callable(value) else value)
    device = collective_device(group)

    def local() -> torch.Tensor:
        v = float(value() if callable(value) else value)
        return torch.tensor([v * float(weight), float(weight)], dtype=torch.float64, device=device)
    t = sum_or_fail(local, (2,), torch.float64, device, group, "in a loss evaluation")
    return float(t[0] / t[1]) if float(t[1]) > 0 else math.nan


def _split_batch(batch: Any) -> tuple[Any, Any]:
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise TypeError(f"batch must be a pair (inputs, targets), got {type(batch).__name__}")
    return batch[0], batch[1]


def _scalar(loss: Any) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"loss_fn must return a tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(
            f"loss_fn must return a scalar (mean-reduced) loss, got shape {tuple(loss.shape)}; "
            "use reduction='mean'"
        )
    return loss.reshape(())


def _ratios(optimizer: torch.optim.Optimizer) -> list[float]:
    """Per-group lr relative to the first group (all 1.0 when the first group's lr is 0)."""
    ref = group_lr(optimizer.param_groups[0])
    if ref == 0:
        return [1.0] * len(optimizer.param_groups)
    return [group_lr(g) / ref for g in optimizer.param_groups]


def _copy_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """A deep copy of ``optimizer`` (state, hyper-parameters) that steps the *same* parameter tensors."""
    memo = {id(p): p for g in optimizer.param_groups for p in g["params"]}
    trial = copy.deepcopy(optimizer, memo)
    # LR schedulers patch an instance-level ``step`` that calls back into the *original* optimizer: drop it.
    trial.__dict__.pop("step", None)
    return trial


# -- the search ---------------------------------------------------------------------------------------------
def find_critical_lr(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    optimizer_factory: OptimizerFactory | None,
    lr_target: float,
    delta: float = 0.1,
    lr_start: float | None = None,
    max_forward_passes: int = 64,
    optimizer: torch.optim.Optimizer | None = None,
    lr_ratios: Sequence[float] | None = None,
    *,
    distributed: bool | None = None,
    process_group: Any = None,
) -> CriticalLR:
    r"""Critical learning rate ``η_c`` from loss catapults (Kalra & Barkeshli, arXiv 2406.09405), forward passes only.

    For each candidate ``η`` one optimizer step is taken from ``θ_0`` on the fixed ``batch`` with the gradient
    ``g_0 = ∇L(θ_0)`` (computed once), then ``L(θ_1)`` is evaluated and the step is undone. The loss *increased*
    when ``L(θ_1) >= L(θ_0)`` (or is not finite).

    1. Exponential search: ``η = η_start, 2η_start, 4η_start, …`` capped at ``lr_target``, until an increase.
       If ``η_start`` itself increases the loss, halve instead until it does not (so ``lower > 0``).
    2. Binary search on ``[lower, upper]`` (midpoint) until ``L(θ_1(upper)) < L(θ_0) + δ·|L(θ_0)|``.
    3. ``η_c = upper``. With no increase up to ``lr_target``: ``lr_c = None``, ``found = False`` and the
       recommended ``lr_init = lr_target/10`` (as in the paper).

    For GD on ``½ θᵀ diag(λ) θ`` from ``θ_0``: ``L(θ_1)/L(θ_0) = Σλ_i(1-ηλ_i)²θ_i² / Σλ_iθ_i²``, so
    ``η_c ∈ [η*, η⁺)`` with ``η* = 2Σλ²θ²/Σλ³θ²`` (``= 2/λ_max`` when ``θ_0`` is a top eigenvector) and
    ``η⁺ = (b + √(b² + δ·a·c))/a``, ``a = Σλ³θ², b = Σλ²θ², c = Σλθ²``.

    Args:
        model: the network; used in the mode it is in (``train()``/``eval()``). Every parameter, buffer,
            ``.grad`` (also ``None``), training flag and the global RNG state are restored bitwise after
            every trial; randomness in the model (dropout) is the same in every forward pass of one call.
        loss_fn: ``loss_fn(outputs, targets) -> scalar tensor``.
        batch: ``(inputs, targets)``; ``inputs`` a tensor, a tuple (positional args) or a dict (keyword args).
        optimizer_factory: ``optimizer_factory(params, lr)`` builds a fresh optimizer over ``params`` (the
            model's trainable parameters, in ``model.parameters()`` order) for each trial. May be ``None`` when
            ``optimizer`` is given.
        lr_target: ``η_trgt`` > 0; the search never tries a larger ``η``.
        delta: ``δ`` > 0, tolerance on the loss increase at the returned ``η_c``. ``0.1`` for SGD, ``≈ 0.01``
            suggested for Adam.
        lr_start: ``η_start``, first candidate; default ``lr_target / 2**10``.
        max_forward_passes: budget, the forward pass at ``θ_0`` included (so at most ``max_forward_passes - 1``
            trials). If it runs out, the result has ``converged=False`` (and a warning is issued).
        optimizer: an existing optimizer, e.g. mid-training with Adam moments. Trials then step a deep copy of it
            (its state and hyper-parameters, with the lr of group ``i`` set to ``η·lr_ratios[i]``), over the
            parameters it holds; the real optimizer and its state are never modified.
        lr_ratios: with ``optimizer``, per-group lr multipliers; default: each group's current lr divided by the
            first group's (all ones if that is 0).
        distributed: ``None`` (auto: when ``torch.distributed`` is initialised with several processes), ``True``
            or ``False``. Distributed, each rank holds a shard of the data: every loss is the global
            sample-weighted mean ``Σ_r n_r L_r / Σ_r n_r`` and the gradient the global ``Σ_r n_r g_r / N`` (one
            all-reduce each), so every rank takes the same decisions and returns the same ``η_c``, equal to the
            single-process result on the concatenated shards. Every rank must call it.
        process_group: the group to reduce over (default: the world).

    ``loss_fn=None`` uses the model's own loss (``outputs.loss``; ``batch`` a dict with ``labels``).

    Returns:
        :class:`CriticalLR` (``lr_c``, ``bracket``, ``forward_passes``, ``lr_init``, ``found``, ``history``, …).

    Raises:
        ValueError: ``lr_target <= 0``, ``delta <= 0``, a bad ``lr_start``, a non-scalar or non-finite loss at
            ``θ_0``, or neither ``optimizer_factory`` nor ``optimizer``.
    """
    lr_target = float(lr_target)
    if not (math.isfinite(lr_target) and lr_target > 0):
        raise ValueError(f"lr_target must be a finite number > 0, got {lr_target!r}")
    if not (math.isfinite(delta) and delta > 0):
        raise ValueError(f"delta must be > 0, got {delta!r}")
    if lr_start is None:
        lr_start = lr_target / 2**10
    lr_start = float(lr_start)
    if not (math.isfinite(lr_start) and 0 < lr_start <= lr_target):
        raise ValueError(f"lr_start must be in (0, lr_target={lr_target}], got {lr_start!r}")
    if max_forward_passes < 2:
        raise ValueError(f"max_forward_passes must be >= 2 (one at θ_0, one trial), got {max_forward_passes}")
    if optimizer is None and optimizer_factory is None:
        raise ValueError("give optimizer_factory(params, lr) or an existing optimizer=")

    frozen: list[torch.Tensor] = []
    if optimizer is not None:
        params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        frozen = [p for g in optimizer.param_groups for p in g["params"] if not p.requires_grad]
        ratios = list(lr_ratios) if lr_ratios is not None else _ratios(optimizer)
        if len(ratios) != len(optimizer.param_groups):
            raise ValueError(f"lr_ratios needs {len(optimizer.param_groups)} entries, got {len(ratios)}")
    else:
        seen: set[int] = set()
        params = []
        for p in model.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    if not params:
        raise ValueError("no trainable parameters to step")

    group = resolve_process_group(distributed, process_group)
    if loss_fn is None:
        batch = own_loss_batch(batch)
    loss_fn = resolve_loss_fn(loss_fn)
    model_net = unwrap_model(model)  # DDP: call the inner module (no reducer hooks, no gradient sync)
    inputs, targets = _split_batch(batch)
    n_local = float(as_batches(batch)[0].size) if group is not None else 1.0
    state = _ModelState(model, [*params, *frozen])
    rng = _RNGState()
    forward_passes = 0
    history: list[tuple[float, float]] = []

    try:
        # θ_0: loss and gradient (the only backward pass). autograd.grad leaves .grad untouched.
        def at_theta0() -> tuple[float, list[torch.Tensor | None]]:
            with torch.enable_grad():
                loss_t = _scalar(loss_fn(call_model(model_net, inputs), targets))
            if not loss_t.requires_grad:  # the same on every rank (same model)
                raise ValueError("the loss does not depend on any trainable parameter")
            gs = torch.autograd.grad(loss_t, params, allow_unused=True)
            return float(loss_t.detach()), [None if g is None else g.detach() for g in gs]

        forward_passes += 1
        if group is None:
            loss0, grads0 = at_theta0()
        else:  # global loss and gradient Σ_r n_r (L_r, g_r) / N: one fail-together all-reduce (unused params: 0)
            used: list[bool] = []

            def flat() -> torch.Tensor:
                loss, gs = at_theta0()
                used[:] = [g is not None for g in gs]
                return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1).to(torch.float64) * n_local
                                  for p, g in zip(params, gs)] +
                                 [torch.tensor([n_local, n_local * loss], dtype=torch.float64, device=params[0].device)])
            size = sum(p.numel() for p in params) + 2
            device = collective_device(group, params[0].device if params[0].device.type != "cpu" else None)
            summed = sum_or_fail(flat, (size,), torch.float64, device, group, "at θ_0 of the critical-lr search")
            total, offset, grads0 = summed[-2], 0, []
            loss0 = float(summed[-1] / total)
            for p, u in zip(params, used):
                part = (summed[offset:offset + p.numel()] / total).reshape(p.shape).to(p.device, p.dtype)
                grads0.append(part if u else None)  # a parameter the loss does not use stays unused
                offset += p.numel()
        if not math.isfinite(loss0):
            raise ValueError(f"the loss at θ_0 is not finite ({loss0}); cannot search for a catapult")
        state.restore_values()  # e.g. BatchNorm running stats updated by the forward pass
        threshold = loss0 + delta * abs(loss0)

        def trial(lr: float) -> float:
            nonlocal forward_passes

            def loss_after_step() -> float:  # this rank's part; a failure or interrupt here fails every rank
                if optimizer is not None:
                    opt = _copy_optimizer(optimizer)
                    for g, r in zip(opt.param_groups, ratios):
                        set_group_lr(g, lr * r)
                else:
                    opt = optimizer_factory(params, lr)  # type: ignore[misc]
                for p, g in zip(params, grads0):
                    p.grad = None if g is None else g.clone()
                for p in frozen:  # a stale .grad on a frozen parameter must not move it
                    p.grad = None
                opt.step()
                rng.restore()  # same dropout masks as at θ_0
                with torch.no_grad():
                    value = float(_scalar(loss_fn(call_model(model_net, inputs), targets)))
                return value if math.isfinite(value) else math.inf
            loss1 = global_mean(loss_after_step, n_local, group)
            forward_passes += 1
            state.restore()
            rng.restore()
            history.append((lr, loss1))
            return loss1

        def increased(loss1: float) -> bool:
            return not loss1 < loss0  # NaN / inf count as an increase

        def budget_left() -> bool:
            return forward_passes < max_forward_passes

        lower: float = 0.0
        upper: float | None = None
        upper_loss = math.nan
        lr = lr_start
        converged = True
        # 1. exponential search
        first = trial(lr)
        if increased(first):
            upper, upper_loss = lr, first
            while True:
                if not budget_left():
                    converged = False
                    break
                lr = lr / 2
                loss1 = trial(lr)
                if increased(loss1):
                    upper, upper_loss = lr, loss1
                else:
                    lower = lr
                    break
        else:
            lower = lr
            while lr < lr_target:
                if not budget_left():
                    converged = False
                    break
                lr = min(2 * lr, lr_target)
                loss1 = trial(lr)
                if increased(loss1):
                    upper, upper_loss = lr, loss1
                    break
                lower = lr
        # 2. binary search on the bracket
        if upper is not None and converged:
            while not upper_loss < threshold:
                if not budget_left():
                    converged = False
                    break
                mid = 0.5 * (lower + upper)
                if not lower < mid < upper:  # bracket below float resolution: δ cannot be met
                    converged = False
                    break
                loss1 = trial(mid)
                if increased(loss1):
                    upper, upper_loss = mid, loss1
                else:
                    lower = mid
    finally:
        state.restore()
        rng.restore()

    if not converged:
        warnings.warn(
            f"find_critical_lr: the search stopped before meeting its tolerance (max_forward_passes="
            f"{max_forward_passes}, {forward_passes} used); the result is approximate (converged=False)",
            RuntimeWarning,
            stacklevel=2,
        )
    found = upper is not None
    return CriticalLR(
        lr_c=upper,
        bracket=(lower, upper),
        forward_passes=forward_passes,
        lr_init=upper if upper is not None else lr_target / 10,
        found=found,
        history=history,
        loss0=loss0,
        lr_target=lr_target,
        delta=float(delta),
        converged=converged,
    )


def catapult_warmup(lr_c: float | CriticalLR | None, lr_target: float, warmup_steps: int) -> CatapultWarmup:
    """The paper's warm-up from the critical lr: ``η_t = min(η_init + η_trgt·t/T, η_trgt)``.

    ``η_init = lr_c`` (capped at ``lr_target``), or ``lr_target/10`` when ``lr_c`` is ``None`` (no catapult found).
    ``lr_c`` may be a :class:`CriticalLR` (its ``lr_init`` is used). Kalra & Barkeshli, arXiv 2406.09405.
    """
    if isinstance(lr_c, CriticalLR):
        lr_init = lr_c.lr_init
    elif lr_c is None:
        lr_init = lr_target / 10
    else:
        lr_init = float(lr_c)
    return CatapultWarmup(min(lr_init, lr_target), float(lr_target), warmup_steps)


class PersistentCatapultWarmup:
    r"""Persistent catapult warm-up (Kalra & Barkeshli, arXiv 2406.09405).

    Call ``sched.step(loss, batch)`` once per training step, with the training loss at the current parameters
    and its batch, *before* ``optimizer.step()`` (e.g. right after ``loss.backward()``):

    * first call: search ``η_c`` at the current point (:func:`find_critical_lr` with ``optimizer=`` the real
      optimizer, so its state is used and never changed), set ``η`` to the bracket's upper end and make
      ``loss`` the reference loss;
    * later calls: when ``loss < reference``, search again at the current point (starting at the current ``η``),
      set ``η ← max(η, upper end)`` (the warm-up never lowers ``η``) and make ``loss`` the new reference;
    * ``η`` is capped at ``lr_target``; once it gets there (also when no catapult happens up to ``lr_target``)
      the warm-up is :attr:`done` and later calls do nothing.

    Every group's lr is ``η`` times its ratio to the first group's lr at construction (all ones if that was 0).
    Under ``torch.distributed`` (``distributed=None``: auto) the fed loss is the global sample-weighted mean over
    the ranks and the search is :func:`find_critical_lr`'s distributed one, so every rank sets the same ``η``.
    Each search is appended to :attr:`history` as a dict (``step``, ``loss`` (the new reference),
    ``previous_reference``, ``lr`` (now set),
    ``lr_c``, ``bracket``, ``forward_passes``, ``done``).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module,
        loss_fn: LossFn,
        lr_target: float,
        delta: float = 0.1,
        lr_start: float | None = None,
        max_forward_passes: int = 64,
        *,
        distributed: bool | None = None,
        process_group: Any = None,
    ) -> None:
        if not (math.isfinite(lr_target) and lr_target > 0):
            raise ValueError(f"lr_target must be a finite number > 0, got {lr_target!r}")
        self.optimizer = optimizer
        self.model = model
        self.loss_fn = loss_fn
        self.lr_target = float(lr_target)
        self.delta = float(delta)
        self.lr_start = lr_start
        self.max_forward_passes = int(max_forward_passes)
        self.distributed, self.process_group = distributed, process_group
        self.ratios = _ratios(optimizer)
        self.lr: float | None = None
        self.reference: float | None = None
        self.done = False
        self.step_count = 0
        self.history: list[dict[str, Any]] = []

    def _apply(self, lr: float) -> None:
        self.lr = lr
        for g, r in zip(self.optimizer.param_groups, self.ratios):
            set_group_lr(g, lr * r)

    def step(self, loss: float | torch.Tensor, batch: Any) -> float:
        """Feed the current training loss and batch; returns the learning rate (of the first group) now set."""
        value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        group = resolve_process_group(self.distributed, self.process_group)
        if group is not None and not self.done:  # the global loss: every rank takes the same decision
            own = batch if self.loss_fn is not None else own_loss_batch(batch)
            value = global_mean(value, float(as_batches(own)[0].size), group)
        step = self.step_count
        self.step_count += 1
        if self.done:
            return self.lr  # type: ignore[return-value]
        if not math.isfinite(value):
            raise ValueError(f"non-finite loss {value} fed to PersistentCatapultWarmup at step {step}")
        if self.reference is not None and not value < self.reference:
            return self.lr  # type: ignore[return-value]
        start = self.lr if self.lr else self.lr_start
        if start is not None:
            start = min(start, self.lr_target)
        result = find_critical_lr(
            self.model,
            self.loss_fn,
            batch,
            None,
            self.lr_target,
            delta=self.delta,
            lr_start=start,
            max_forward_passes=self.max_forward_passes,
            optimizer=self.optimizer,
            lr_ratios=self.ratios,
            distributed=self.distributed,
            process_group=self.process_group,
        )
        new_lr = result.lr_c if result.found else self.lr_target
        new_lr = min(max(new_lr, self.lr or 0.0), self.lr_target)
        self._apply(new_lr)
        previous, self.reference = self.reference, value
        self.done = new_lr >= self.lr_target
        self.history.append(
            {
                "step": step,
                "loss": value,
                "previous_reference": previous,
                "lr": new_lr,
                "lr_c": result.lr_c,
                "bracket": result.bracket,
                "forward_passes": result.forward_passes,
                "done": self.done,
            }
        )
        return new_lr

    def get_last_lr(self) -> list[float]:
        return [group_lr(g) for g in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {
            "lr": self.lr,
            "reference": self.reference,
            "done": self.done,
            "step_count": self.step_count,
            "ratios": list(self.ratios),
            "history": copy.deepcopy(self.history),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.lr = state["lr"]
        self.reference = state["reference"]
        self.done = bool(state["done"])
        self.step_count = int(state["step_count"])
        self.ratios = list(state["ratios"])
        self.history = copy.deepcopy(list(state["history"]))
