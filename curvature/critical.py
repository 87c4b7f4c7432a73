r"""Critical sharpness: the stability curvature of the step an optimizer is about to take, in forward passes.

For the update Δ(η) that ``optimizer.step()`` would take now with learning rate η (every param group's lr scaled
together, η the first group's), the **critical learning rate** is the smallest η > 0 at which that step raises
the loss, and the **critical sharpness** is

    η_c = min{η > 0 : L(θ + Δ(η)) > L(θ)},        λ_c = 2 / η_c

(Kalra et al. 2026, "A Scalable Measure of Loss Landscape Curvature for Analyzing the Training Dynamics of
LLMs", arXiv 2601.16979). Every ``torch.optim`` optimizer whose step is linear in its lr — SGD, Adam, AdamW,
NAdam, RAdam, Adamax, RMSprop, Adagrad, Adadelta, Adafactor, Muon, SparseAdam, decoupled weight decay included —
has Δ(η) = η·u, so one direction u is computed per call and every trial is one forward pass at θ + η·u. (The
contract is the step about to be taken scaled, Δ(η) = (η/η₀)·Δ(η₀): torch's Adafactor caps its relative step at
min(η, 1/√t), so beyond η = 1/√t its real step stops growing while λ_c follows the scaled step.)
For GD on a quadratic ½θᵀAθ, L(θ − ηg) − L(θ) = −η gᵀg + ½η² gᵀAg, so λ_c = gᵀAg/gᵀg: the curvature along the
update, which is ≤ λ_max and reaches it when g lies along the top eigenvector (the edge of stability). Compare
η·λ_c with 2 (``edge_ratio = η·λ_c/2``) for any optimizer: ≥ 1 means the step about to be taken raises the loss.

**The update.** SGD, Adam and AdamW: the closed form of :func:`curvature.signals.parameter_update` from ``.grad``
and the optimizer state (the only extra memory is one copy of the parameters, to put them back bitwise). Any
other optimizer: one *virtual step* — parameters and optimizer state are snapshot, ``step()`` runs once (lrs at
a reference value, its hooks bypassed), Δ is read off and everything is put back bitwise. LBFGS, Rprop and ASGD
(steps not linear in the lr) are refused.

**The search** (forward passes only, under ``torch.no_grad``) keeps a bracket [lo, hi] — the loss did not rise at
lo, it rose at hi (a non-finite loss counts as a rise) — and stops when hi − lo ≤ rtol·lo; η_c is the midpoint.
``search="bisection"`` is the published one: from ``lr_start`` double until the loss rises (halve until it does
not), then bisect. ``search="model"`` (default) places trials with the secant slope h(η) = (L(θ+ηu) − L(θ))/η, which
is linear, a + ½cη, on a quadratic and whose value at η → 0 is the free directional derivative a = gᵀu (the
gradient is already in ``.grad``): its root is the quadratic model's η_c, and each trial goes just past (or short
of) the predicted root so that two trials close a bracket of width rtol. Trials always stay inside the bracket and
a bisection follows any two trials that did not halve it, so the bracket guarantee of the published search holds.

**Nothing changes.** Parameters, buffers (forwards run on copies), ``.grad``, optimizer state, param groups, the
global RNG state (every forward of one call draws the same dropout masks) and module modes are bitwise the same
afterwards, also when interrupted (:class:`curvature._exact.StateGuard`).

**Scale.** Under DDP (``torch.distributed`` initialised, each rank its shard of the data, the gradient in
``.grad`` already averaged) each forward's loss sum and weight travel in one all-reduce that also carries a
failure flag, so every rank takes the same decisions and gets the same λ_c: the single-process result on the
concatenated data. FSDP2 (``fully_shard``) models are stepped on their local shards, never gathered. Autocast
regions are kept (the result's ``autocast`` says which).
"""
from __future__ import annotations

import collections
import functools
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ._exact import StateGuard, autocast_state, call_with_state, frozen_rng, peek_seed, reseed, unwrap_model
from .data import as_batches, model_output_loss, resolve_loss_fn
from .distributed import collective_device, resolve_process_group, sum_or_fail
from .finite_difference import is_dtensor, local_tensor
from .optim import unwrap_optimizer
from .rows import CRITICAL_KEYS  # the columns CriticalSharpness.row() fills (the row schema)
from .signals import parameter_update

__all__ = ["critical_sharpness", "CriticalSharpness", "CRITICAL_KEYS", "SEARCHES", "NONLINEAR_OPTIMIZERS"]


SEARCHES = ("model", "bisection")

#: Optimizers whose step is not η·(a fixed direction): refused with a clear error.
NONLINEAR_OPTIMIZERS = tuple(getattr(torch.optim, n) for n in ("LBFGS", "Rprop", "ASGD") if hasattr(torch.optim, n))

_CLOSED_FORM = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)
# lr = 0 (a warm-up from 0): Δ is taken at this lr instead, every group alike (below Adafactor's cap 1/√t)
_ZERO_LR_REFERENCE = 1e-3


@dataclass(frozen=True)
class CriticalSharpness:
    """Result of :func:`critical_sharpness`.

    Attributes:
        critical_sharpness: λ_c = 2/η_c (``nan`` when no bracket was found: see ``note``).
        critical_lr: η_c, the midpoint of ``bracket`` (relative error ≤ rtol/2 when ``converged``).
        bracket: ``(lo, hi)``: the loss did not rise at lo, it rose at hi (``lo`` 0.0 / ``hi`` inf if never seen).
        forward_passes: every forward pass over the data this call ran, the one at θ included (0 for it when
            ``loss`` was given and reused).
        converged: hi − lo ≤ rtol·lo was reached.
        lr: η₀, the first param group's lr now (the η of the step about to be taken).
        edge_ratio: η₀·λ_c/2 = η₀/η_c (≥ 1: the step about to be taken raises the loss).
        loss: L(θ) on the data measured on (``reference_data`` if given).
        directional_derivative: gᵀu, the slope of L(θ + ηu) at η = 0 per unit η from ``.grad`` (the training
            gradient; the quadratic model's ``a``).
        update: ``"closed_form"`` (SGD/Adam/AdamW) or ``"virtual_step"``.
        search: ``"model"`` or ``"bisection"``.
        rtol: the tolerance asked for.
        history: every trial ``(η, L(θ + Δ(η)))`` in the order tried.
        loss_reused: L(θ) was the ``loss`` given (no forward pass for it).
        autocast: the autocast regions the forwards ran in (``"cpu:bfloat16"``), ``None`` for none.
        world_size: processes whose data was averaged (1 without ``torch.distributed``).
        seconds: wall time.
        note: why no (or no converged) value, else ``None``.
    """

    critical_sharpness: float
    critical_lr: float
    bracket: tuple[float, float]
    forward_passes: int
    converged: bool
    lr: float
    edge_ratio: float
    loss: float
    directional_derivative: float
    update: str
    search: str
    rtol: float
    history: tuple[tuple[float, float], ...] = field(default_factory=tuple)
    loss_reused: bool = False
    autocast: str | None = None
    world_size: int = 1
    seconds: float = 0.0
    note: str | None = None

    def row(self) -> dict[str, Any]:
        """The :data:`CRITICAL_KEYS` columns of a tracker row."""
        finite = math.isfinite(self.critical_sharpness)
        return {"critical_sharpness": self.critical_sharpness if finite else None,
                "critical_lr": self.critical_lr if finite else None,
                "critical_edge_ratio": self.edge_ratio if math.isfinite(self.edge_ratio) else None,
                "critical_forward_passes": self.forward_passes, "critical_seconds": self.seconds}


# ---------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------
def _check_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    opt = unwrap_optimizer(optimizer)
    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer (the one whose next step is measured), "
                        f"got {type(optimizer).__name__}")
    if isinstance(opt, NONLINEAR_OPTIMIZERS):
        why = "a line search" if isinstance(opt, torch.optim.LBFGS) else "its step size is its own state"
        raise TypeError(f"critical sharpness needs a step that scales with the learning rate (Δ(η) = η·u); "
                        f"{type(opt).__name__}'s step does not ({why}). "
                        "Use SGD, Adam(W), NAdam, RAdam, Adamax, RMSprop, Adagrad, Adadelta, Adafactor or Muon")
    return opt


def _check_float(value: Any, name: str, lo: float = 0.0, hi: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    v = float(value)
    if not (math.isfinite(v) and lo < v < hi):
        raise ValueError(f"{name} must be a finite number in ({lo:g}, {hi:g}), got {value!r}")
    return v


def _scalar(x: Any) -> float:
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


def _fsdp_modules(net: nn.Module) -> list[Any]:
    """The FSDP2 (``fully_shard``) modules of ``net`` whose parameters are sharded now."""
    if not any(is_dtensor(p) for p in net.parameters()):
        return []
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return []
    return [m for m in net.modules() if isinstance(m, FSDPModule)
            and any(is_dtensor(p) for p in m.parameters(recurse=False))]


def _reshard(modules: Sequence[Any]) -> None:
    """FSDP2 keeps the root's parameters unsharded after a forward until a backward reshards them: without a
    backward, put them back to the shards (the storage the trials write into, and the state the caller had)."""
    for m in modules:
        m.reshard()


def _autocast_label() -> str | None:
    on = [f"{dev}:{str(dtype).replace('torch.', '')}" for dev, (enabled, dtype) in autocast_state().items() if enabled]
    return ",".join(on) or None


# ---------------------------------------------------------------------------------------------------
# The update direction
# ---------------------------------------------------------------------------------------------------
def _copy_all(targets: Sequence[torch.Tensor], sources: Sequence[torch.Tensor]) -> None:
    """``t.copy_(s)`` for all pairs in one C-level loop (repeatable; the guard's undo of the trial points)."""
    with torch.no_grad():
        collections.deque(map(torch.Tensor.copy_, targets, sources), 0)


class _Direction:
    """The step Δ(η_ref) per trainable parameter (rank-local, float64 when yielded; ``None``: not stepped)."""

    kind: str

    def parts(self) -> Iterator[torch.Tensor | None]:
        raise NotImplementedError


class _ClosedForm(_Direction):
    """SGD / Adam / AdamW: :func:`~curvature.signals.parameter_update`, recomputed per trial from ``.grad`` and the
    state (bitwise the same each time), so nothing but the saved parameters is held."""

    kind = "closed_form"

    def __init__(self, opt: torch.optim.Optimizer, items: list[tuple[dict, torch.Tensor]], lr_of: list[float]):
        self.opt, self.items, self.lr_of = opt, items, lr_of

    def parts(self) -> Iterator[torch.Tensor | None]:
        for (group, p), lr in zip(self.items, self.lr_of):
            if p.grad is None:
                yield None
                continue
            state = {k: local_tensor(v) for k, v in self.opt.state.get(p, {}).items()}
            yield parameter_update(self.opt, {**group, "lr": lr}, state, local_tensor(p.detach()), local_tensor(p.grad))


class _VirtualStep(_Direction):
    """Any other optimizer: Δ from one real ``step()`` (lrs set to ``lr_of``, hooks bypassed), everything put back."""

    kind = "virtual_step"

    def __init__(self, opt: torch.optim.Optimizer, items: list[tuple[dict, torch.Tensor]], lr_of: list[float],
                 saved: list[torch.Tensor], locals_: list[torch.Tensor], guard: StateGuard) -> None:
        params = [p for _, p in items]
        had = {id(p): p in opt.state for p in params}
        snapshot: dict[int, tuple[dict, dict, dict]] = {}
        for p in params:
            if had[id(p)]:
                st = opt.state[p]
                snapshot[id(p)] = (st, dict(st), {k: v.clone() for k, v in st.items() if isinstance(v, torch.Tensor)})
        groups = [(g, {k: v for k, v in g.items() if k != "params"}) for g in opt.param_groups]
        grads = [(p, p.grad) for p in params]

        def put_back() -> None:
            with torch.no_grad():
                for g, entries in groups:
                    for k, v in entries.items():
                        g[k] = v
                for p in params:
                    if had[id(p)]:
                        st, entries, values = snapshot[id(p)]
                        opt.state[p] = st
                        st.clear()
                        st.update(entries)
                        for k, v in values.items():
                            entries[k].copy_(v)
                    else:
                        opt.state.pop(p, None)
                for p, g in grads:
                    p.grad = g
                _copy_all(locals_, saved)

        guard.push(put_back)
        for (group, _), lr in zip(items, lr_of):
            if isinstance(group["lr"], torch.Tensor):
                group["lr"] = torch.tensor(lr, dtype=group["lr"].dtype, device=group["lr"].device)
            else:
                group["lr"] = lr
        step = getattr(type(opt).step, "__wrapped__", type(opt).step)  # no step hooks, no scheduler patch
        step(opt)
        with torch.no_grad():
            self.deltas = [None if p.grad is None and torch.equal(loc, s) else (loc.double() - s.double())
                           for p, loc, s in zip(params, locals_, saved)]
        put_back()

    def parts(self) -> Iterator[torch.Tensor | None]:
        yield from self.deltas


# ---------------------------------------------------------------------------------------------------
# The search
# ---------------------------------------------------------------------------------------------------
def _secant_root(p1: tuple[float, float], p2: tuple[float, float]) -> float | None:
    """Root of the line through (η1, h1), (η2, h2), when h rises between them (h1 < h2)."""
    (e1, h1), (e2, h2) = p1, p2
    if not (math.isfinite(h1) and math.isfinite(h2)) or e1 == e2 or (h2 - h1) * (e2 - e1) <= 0:
        return None
    root = e2 - h2 * (e2 - e1) / (h2 - h1)
    return root if math.isfinite(root) and root > 0 else None


@dataclass
class _Bracket:
    """lo: largest η whose step did not raise the loss; hi: smallest that did. ``below``/``above`` hold the finite
    secant slopes h(η) = (L(η) − L0)/η seen on each side (``below`` starts with (0, a) when a < 0 is known)."""

    lo: float = 0.0
    hi: float = math.inf
    below: list[tuple[float, float]] = field(default_factory=list)
    above: list[tuple[float, float]] = field(default_factory=list)

    def add(self, eta: float, rose: bool, h: float) -> None:
        if rose:
            self.hi = min(self.hi, eta)
            if math.isfinite(h):
                self.above.append((eta, h))
        else:
            self.lo = max(self.lo, eta)
            self.below.append((eta, h))

    def done(self, rtol: float) -> bool:
        return self.lo > 0 and math.isfinite(self.hi) and self.hi - self.lo <= rtol * self.lo

    def prediction(self) -> float | None:
        """The secant root through the points nearest the bracket (one on each side when both are known)."""
        below = sorted(p for p in self.below if p[0] <= self.lo)[-2:]
        above = sorted(p for p in self.above if p[0] >= self.hi)[:2]
        if below and above:
            return _secant_root(below[-1], above[0])
        pts = below if below else above
        return _secant_root(pts[0], pts[1]) if len(pts) == 2 else None


def _next_trial(b: _Bracket, rtol: float, guided: bool, stalled: bool) -> float:
    """Where to try next: inside the bracket (or past it while one end is open). ``stalled``: the model-placed
    trials did not halve the uncertainty over the last two trials, so this one is the unguided step."""
    p = b.prediction() if guided and not stalled else None
    if not math.isfinite(b.hi):  # no rise yet: grow
        if p is not None and p > b.lo:
            return min(max(p * (1 + 0.45 * rtol), b.lo * (1 + rtol)), 4 * b.lo)
        return 2 * b.lo
    if b.lo == 0:  # only rises so far: shrink
        if p is not None and p < b.hi:
            return max(min(p * (1 - 0.45 * rtol), b.hi / (1 + rtol)), b.hi / 4)
        return b.hi / 2
    mid = 0.5 * (b.lo + b.hi)
    if p is None or not b.lo < p < b.hi:
        return mid
    d = 0.45 * rtol * p
    if p - b.lo <= d:
        x = b.lo * (1 + 0.95 * rtol)  # a rise here closes the bracket
    elif b.hi - p <= d:
        x = b.hi / (1 + 0.95 * rtol)  # no rise here closes it
    else:
        x = p - d if p - b.lo > b.hi - p else p + d
    return x if b.lo < x < b.hi else mid


def _uncertainty(b: _Bracket) -> tuple[str, float]:
    """The phase of the search and how uncertain η_c still is in it (smaller is better): while growing 1/lo,
    while shrinking hi, then the bracket width."""
    if not math.isfinite(b.hi):
        return "grow", 1.0 / b.lo
    if b.lo == 0:
        return "shrink", b.hi
    return "bracket", b.hi - b.lo


def _search(evaluate: Callable[[float], float], loss0: float, first: float, slope: float | None, rtol: float,
            max_trials: int, guided: bool) -> tuple[_Bracket, list[tuple[float, float]], str | None]:
    b = _Bracket()
    if guided and slope is not None and math.isfinite(slope) and slope < 0:
        b.below.append((0.0, slope))
    history: list[tuple[float, float]] = []
    eta = first
    widths: list[tuple[str, float]] = []
    floor, ceiling = first * 2.0 ** -24, first * 2.0 ** 24
    for _ in range(max_trials):
        loss = evaluate(eta)
        history.append((eta, loss))
        rose = not loss <= loss0  # nan / inf: rose
        h = (loss - loss0) / eta if math.isfinite(loss) else math.inf
        b.add(eta, rose, h)
        if b.done(rtol):
            return b, history, None
        widths.append(_uncertainty(b))
        # Safeguards: while one end is open, a trial that left it open without halving the uncertainty makes the
        # next one the published (doubling / halving) step; inside the bracket, two trials that did not halve it
        # (Brent's rule) make the next one a bisection. So no phase needs more than ~2× the published trials.
        phase, m = widths[-1]
        if phase != "bracket":
            stalled = len(widths) >= 2 and widths[-2][0] == phase and m > 0.5 * widths[-2][1]
        else:
            stalled = (len(widths) >= 3 and widths[-3][0] == widths[-2][0] == phase
                       and m > 0.5 * widths[-3][1])
        eta = _next_trial(b, rtol, guided, stalled)
        if stalled:
            widths.clear()
            b.below = [p for p in b.below if p[0] > 0]  # the slope at 0 misled: model from measured points only
        if not (b.lo < eta < b.hi) or eta == b.lo or eta == b.hi:
            return b, history, "the bracket reached float resolution before rtol"
        if eta < floor:
            return b, history, (f"the loss rose at every lr tried, down to {b.hi:.3g}: the update does not lower "
                                "the loss on this data (λ_c = ∞)")
        if eta > ceiling:
            return b, history, f"the loss did not rise at any lr tried, up to {b.lo:.3g} (λ_c ≈ 0)"
    if b.lo == 0:
        return b, history, (f"max_forward_passes ran out with the loss risen at every lr tried, down to {b.hi:.3g}: "
                            "the update does not lower the loss on this data (λ_c = ∞?)")
    if not math.isfinite(b.hi):
        return b, history, f"max_forward_passes ran out before the loss rose, up to lr {b.lo:.3g} (λ_c ≈ 0?)"
    return b, history, f"max_forward_passes ran out before the bracket reached rtol={rtol:g}"


# ---------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------
def critical_sharpness(model: nn.Module, loss_fn: Callable | None, data: Any, optimizer: Any, *,
                       rtol: float = 1 / 16, lr_start: float | None = None, reference_data: Any = None,
                       loss: float | torch.Tensor | None = None, search: str = "model",
                       max_forward_passes: int = 40, distributed: bool | None = None, process_group: Any = None,
                       weight_fn: Callable[[Any], Any] | None = None, inputs_as: str = "kwargs",
                       max_batch_size: int | None = None, seed: int | None = None) -> CriticalSharpness:
    r"""Critical sharpness λ_c = 2/η_c of the step ``optimizer`` is about to take (see the module docstring).

    Call after ``loss.backward()`` and before ``optimizer.step()``: Δ comes from the gradients in ``.grad`` and the
    optimizer's state (parameters without ``.grad`` do not move, as in ``step()``).

    Args:
        model: the network, in the mode it is in (dropout: one fixed mask for every forward of this call).
        loss_fn: ``loss_fn(outputs, targets)``, mean-reduced; ``None``: the model's own loss (``outputs.loss``).
        data: the batch(es) the loss is measured on (the batch whose gradient is in ``.grad``); rules and
            weights (samples, or tokens for a model's own loss, or ``weight_fn``) as in :mod:`curvature.data`.
        optimizer: any ``torch.optim.Optimizer`` whose step is linear in its lr (not LBFGS, Rprop, ASGD).
        rtol: stop when hi − lo ≤ rtol·lo (default 1/16, the published tolerance).
        lr_start: the first trial η (warm start: the previous η_c); default the optimizer's lr.
        reference_data: measure the loss on this data instead (Δ still from the training gradient): the
            "relative critical sharpness" on, e.g., pre-training data during fine-tuning.
        loss: L(θ) on ``data`` if known (the training step's loss): saves one forward. Not used with
            ``reference_data``; under DDP the rank-local loss (averaged here with one all-reduce).
        search: ``"model"`` (trials placed by the secant/quadratic model from gᵀΔ) or ``"bisection"``
            (the published exponential search + bisection).
        max_forward_passes: budget, the forward at θ included (≥ 3; also when ``loss`` saved that forward, so
            that ranks which disagree on reusing it still run the same number of trials).
        distributed, process_group: as for :class:`~curvature.operators.HessianOperator` (DDP/FSDP: every rank
            calls with its own shard of the data and gets the same result).
        weight_fn, inputs_as, max_batch_size: as for :class:`~curvature.operators.HessianOperator`.
        seed: the dropout seed of this call's forwards (default: derived from the RNG state, not advancing it).

    Returns:
        :class:`CriticalSharpness`.
    """
    t0 = time.perf_counter()
    opt = _check_optimizer(optimizer)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    rtol = _check_float(rtol, "rtol", 0.0, 1.0)
    if search not in SEARCHES:
        raise ValueError(f"search must be one of {SEARCHES}, got {search!r}")
    if isinstance(max_forward_passes, bool) or not isinstance(max_forward_passes, int) or max_forward_passes < 3:
        raise ValueError(f"max_forward_passes must be an int >= 3 (the loss at θ and two trials), got "
                         f"{max_forward_passes!r}")
    if lr_start is not None:
        lr_start = _check_float(lr_start, "lr_start")
    loss_fn = resolve_loss_fn(loss_fn)
    net = unwrap_model(model)  # DDP: the inner module (no reducer hooks, no buffer broadcast)
    items = [(g, p) for g in opt.param_groups for p in g["params"] if p.requires_grad]
    if not items:
        raise ValueError("the optimizer holds no trainable parameters")
    if all(p.grad is None for _, p in items):
        raise ValueError("no parameter of the optimizer has a .grad: call critical_sharpness after loss.backward() "
                         "and before optimizer.step() (Δ is the step those gradients would take)")
    lr0 = _scalar(opt.param_groups[0]["lr"])
    if not (math.isfinite(lr0) and lr0 >= 0):
        raise ValueError(f"the optimizer's lr is {lr0}: critical sharpness needs a finite lr >= 0")
    # η_ref: the lr Δ is computed at. lr = 0 (a warm-up from 0): every group at _ZERO_LR_REFERENCE (ratios are 0/0)
    ratios = [(_scalar(g["lr"]) / lr0 if lr0 > 0 else 1.0) for g in opt.param_groups]
    ratio_of = {id(g): r for g, r in zip(opt.param_groups, ratios)}
    closed = type(opt) in _CLOSED_FORM  # a subclass may change step(): it gets the virtual step
    eta_ref = lr0 if lr0 > 0 else _ZERO_LR_REFERENCE
    lr_of = [eta_ref * ratio_of[id(g)] for g, _ in items]

    measured = reference_data if reference_data is not None else data
    if measured is None:
        raise ValueError("data is None: pass the batch whose gradient is in .grad (or reference_data=)")
    group = resolve_process_group(distributed, process_group)
    batches = as_batches(measured, max_batch_size, weight_fn=weight_fn, inputs_as=inputs_as, model=net,
                         own_loss=loss_fn is model_output_loss)
    params = [p for _, p in items]
    device = params[0].device
    coll = collective_device(group, device if device.type != "cpu" else None)
    passes = 0
    guard = StateGuard()
    try:
        with torch.no_grad(), frozen_rng(device, guard):
            run_seed = peek_seed(device) if seed is None else int(seed)
            sharded = _fsdp_modules(net)
            guard.push(functools.partial(_reshard, sharded))
            locals_ = [local_tensor(p.detach()) for p in params]
            saved = [t.clone() for t in locals_]  # the one copy of the parameters
            # undone newest first: the parameters come back, then autocast's cache (of trial casts) is dropped
            guard.push(torch.clear_autocast_cache)
            guard.push(functools.partial(_copy_all, locals_, saved))
            if closed:
                direction: _Direction = _ClosedForm(opt, items, lr_of)
            else:
                direction = _VirtualStep(opt, items, lr_of, saved, locals_, guard)

            # gᵀΔ(η_ref), rank-local parts summed, sharded parts all-reduced with the loss at θ below
            dot_local, dot_sharded = 0.0, 0.0
            for p, d in zip(params, direction.parts()):
                if d is None or p.grad is None:
                    continue
                v = float(torch.sum(local_tensor(p.grad).double() * d))
                if is_dtensor(p):
                    dot_sharded += v
                else:
                    dot_local += v

            def forward_sum() -> torch.Tensor:
                total, weight = 0.0, 0.0
                torch.clear_autocast_cache()  # autocast caches its casts of the parameters, now stale
                for b in batches:
                    reseed(run_seed, device)
                    state = {n: t.detach().clone() for n, t in net.named_buffers()}
                    out = call_with_state(net, state, b.args, b.kwargs, guard)
                    value = loss_fn(out, b.targets)
                    if not isinstance(value, torch.Tensor) or value.numel() != 1:
                        raise ValueError(f"loss_fn must return a scalar (mean-reduced) tensor, got "
                                         f"{type(value).__name__}{tuple(getattr(value, 'shape', ()))}")
                    total += float(value) * b.weight
                    weight += b.weight
                _reshard(sharded)  # the next forward all-gathers the next trial point
                return torch.tensor([total, weight], dtype=torch.float64, device=coll)

            def reduced(local: Callable[[], torch.Tensor], extra: float = 0.0) -> tuple[float, float, float]:
                def both() -> torch.Tensor:
                    return torch.cat([local(), torch.tensor([extra], dtype=torch.float64, device=coll)])
                out = sum_or_fail(both, (3,), torch.float64, coll, group, "in a critical-sharpness forward pass")
                s, w, e = (float(x) for x in out.tolist())
                return (s / w if w > 0 else math.nan), w, e

            reuse = loss is not None and reference_data is None
            if reuse:
                value = _scalar(loss.detach() if isinstance(loss, torch.Tensor) else loss)
                weight = float(batches.total_weight)
                loss0, _, dot_sharded = reduced(
                    lambda: torch.tensor([value * weight, weight], dtype=torch.float64, device=coll), dot_sharded)
            else:
                loss0, _, dot_sharded = reduced(forward_sum, dot_sharded)
                passes += 1
            slope = (dot_local + dot_sharded) / eta_ref  # dL/dη at η = 0, per unit lr (the training gradient's)
            if not math.isfinite(loss0):
                raise ValueError(f"the loss at θ is not finite ({loss0}): there is no critical lr to find")

            def evaluate(eta: float) -> float:
                nonlocal passes
                s = eta / eta_ref
                for loc, s0, d in zip(locals_, saved, direction.parts()):
                    if d is not None:
                        loc.copy_(torch.add(s0.double(), d, alpha=s))
                try:
                    value, _, _ = reduced(forward_sum)
                finally:
                    _copy_all(locals_, saved)
                passes += 1
                return value

            first = lr_start if lr_start is not None else (lr0 if lr0 > 0 else eta_ref)
            bracket, history, note = _search(evaluate, loss0, first, slope if reference_data is None else None,
                                             rtol, max_forward_passes - 1, search == "model")  # rank-independent
    finally:
        guard.restore()

    converged = note is None
    lo, hi = bracket.lo, bracket.hi
    eta_c = 0.5 * (lo + hi) if lo > 0 and math.isfinite(hi) else math.nan
    lam = 2.0 / eta_c if eta_c > 0 else math.nan
    return CriticalSharpness(
        critical_sharpness=lam, critical_lr=eta_c, bracket=(lo, hi), forward_passes=passes, converged=converged,
        lr=lr0, edge_ratio=lr0 * lam / 2 if math.isfinite(lam) else math.nan, loss=loss0,
        directional_derivative=slope, update=direction.kind, search=search, rtol=rtol, history=tuple(history),
        loss_reused=reuse, autocast=_autocast_label(), world_size=1 if group is None else
        torch.distributed.get_world_size(group), seconds=time.perf_counter() - t0, note=note)
