"""The second-order context: what every curvature computation runs inside.

PyTorch's second derivatives are right through plain double backward and through
``torch.func.jvp(torch.func.grad(f))`` (and ``vmap`` over it) for every op we test, but

* fused ``F.scaled_dot_product_attention`` kernels (flash / memory-efficient, the default for 4-D inputs on
  CPU and GPU) have neither double backward nor forward-mode AD: we select the MATH kernel, which is
  differentiable twice and computes the same function;
* cuDNN RNN kernels have no double backward: cuDNN is disabled inside the context;
* train-mode BatchNorm updates its running statistics in place, which breaks ``torch.func`` transforms and
  would change buffers: inside the context a train-mode BatchNorm is told not to track running statistics,
  which selects the very same function (batch statistics) without the in-place update;
* autocast (CPU and CUDA) is switched off, so an HVP taken inside a ``torch.autocast`` region is computed in
  the operator's dtype, not in bf16/fp16 (``autocast=True`` on the engine keeps the caller's region instead);
* ``F.hardsigmoid`` (``nn.Hardsigmoid``, MobileNetV3's squeeze-excitation gate) has no double backward on
  torch 2.13: it is replaced by the same function composed of differentiable ops, ``clamp(x + 3, 0, 6) / 6``
  (see :data:`SUBSTITUTIONS`); any other op without a second derivative raises :class:`SecondOrderError`
  naming the op and the modules that use it;
* ``torch.utils.checkpoint`` (also through Hugging Face's ``gradient_checkpointing_enable()``, which holds a
  ``functools.partial(checkpoint, ...)``) runs the wrapped function directly: no recomputation, so no
  reentrant-backward / recomputed-metadata failures and no silently wrong second derivatives;
* ``torch.inference_mode()`` is left for the computation (tensors created in it are copied where read) and
  ``nn.Embedding(sparse=True)`` / ``nn.EmbeddingBag(sparse=True)`` compute dense gradients (the same
  function and derivatives; sparse gradients have no double backward).

``torch.func.jacrev``-based routes (``torch.func.hessian``, ``jvp(jacrev(f))``) are wrong for affine LayerNorm,
train-mode BatchNorm and InstanceNorm on torch 2.13; nothing in this package uses them (see
``tests/test_exactness.py``, which guards every route we do use against central differences).

The context also freezes randomness: :func:`frozen_rng` saves the global RNGs (torch on the CPU and the CUDA device
in use, Python's ``random``, NumPy's global generator) and :func:`reseed` makes every forward pass of one operator
draw the same dropout masks (and the same ``random.random()`` / ``np.random`` numbers), so the operator is
one fixed symmetric matrix; the caller's RNG state is restored bit for bit on exit.

Interrupts. Every switch is recorded in a :class:`StateGuard` *before* it is made, and undone by
:meth:`StateGuard.restore`, which is idempotent and written so that a ``KeyboardInterrupt`` (or any exception)
landing anywhere, including inside the restore itself, still leaves everything restored: the undo actions are
applied by one C-level ``map`` (no Python bytecode, hence no signal handler, runs in the middle of it), an
exception raised meanwhile is re-raised only after a complete pass, and callers restore once more on their own
way out. Functorch transform levels (``vmap``/``grad``/``jvp``) and the legacy vmap mode used by
``autograd.grad(is_grads_batched=True)`` left active by an interrupt are popped back to the depth at entry.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import logging
import operator
import random
import re
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.autograd.forward_ad as _fwad
import torch.nn.functional as F
import torch.utils.checkpoint as _checkpoint_module
from torch import nn

log = logging.getLogger("curvature.exact")

__all__ = ["second_order_context", "frozen_rng", "holding_rng", "reseed", "peek_seed", "unwrap_model", "has_train_mode_batchnorm",
           "StateGuard", "call_with_state", "SUBSTITUTIONS", "SecondOrderError", "explain_missing_derivative",
           "autocast_state", "autocast_off", "backward_context", "check_twice_differentiable",
           "low_precision_islands", "spying_forward", "NAMESPACE_SUBSTITUTIONS"]


def _autocast_devices() -> tuple[str, ...]:
    """Device types whose autocast state this torch can query (CPU, CUDA, MPS, XPU)."""
    found = []
    for device_type in ("cpu", "cuda", "mps", "xpu"):
        try:
            torch.is_autocast_enabled(device_type)
            torch.get_autocast_dtype(device_type)
        except (RuntimeError, ValueError, TypeError):
            continue
        found.append(device_type)
    return tuple(found)


_AUTOCAST_DEVICES = _autocast_devices()


class SecondOrderError(NotImplementedError):
    """An op in the model has no second derivative in PyTorch (and no exact substitute is known)."""


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


# ---------------------------------------------------------------------------------------------------
# The undo log
# ---------------------------------------------------------------------------------------------------
def _assign_all(mappings: Sequence[Any], keys: Sequence[Any], values: Sequence[Any]) -> Callable[[], Any]:
    """A callable doing ``mappings[i][keys[i]] = values[i]`` for all i, built from C-level parts only (``deque``
    consuming a ``map`` of ``setitem``): once called, no Python bytecode, hence no signal handler, runs until it
    has finished. It acts once; later calls do nothing."""
    return functools.partial(collections.deque, map(operator.setitem, mappings, keys, values), 0)


def _assign(mappings: Sequence[Any], keys: Sequence[Any], values: Sequence[Any]) -> None:
    """``mappings[i][keys[i]] = values[i]`` for all i (repeatable)."""
    _assign_all(mappings, keys, values)()


def _legacy_vmap_level() -> int:
    # no getter exists: increment and decrement in one C-level call, which returns the level it restored
    return tuple(map(operator.call, (torch._C._vmapmode_increment_nesting, torch._C._vmapmode_decrement_nesting)))[1]


def _close_leaked_dual_level() -> None:
    """Close a forward-AD level left open by an interrupt, and put Python's copy of the level back to "none".

    torch supports one forward-AD level at a time (level 0; entering a second raises "Nested forward mode AD is not
    supported"), and Python keeps its own copy (``torch.autograd.forward_ad._current_level``): an interrupt between
    the C++ call and that assignment leaves the two apart, and every later ``jvp`` then fails. Probing by entering
    a level tells whether one is open."""
    try:
        level = torch._C._enter_dual_level()
    except RuntimeError:  # one is open: the one the interrupt left
        torch._C._exit_dual_level(level=0)
    else:
        torch._C._exit_dual_level(level=level)
    _fwad._current_level = -1


def _jvp_nesting_module() -> Any:
    """``torch._functorch.eager_transforms`` (its ``JVP_NESTING`` counter decides whether ``jvp`` opens a dual
    level), or None on a torch without it."""
    return sys.modules.get("torch._functorch.eager_transforms")


class StateGuard:
    """An undo log for process and model state switched during a curvature computation.

    ``record_*`` methods note the current value *before* changing it, so an interrupt between the two leaves
    nothing unrecorded; :meth:`restore` may be called any number of times (each undo sets a value, it never
    toggles). It also pops functorch / legacy-vmap levels pushed since the guard was made.
    """

    def __init__(self) -> None:
        self._undo: list[Callable[[], Any]] = []
        self._functorch_depth = torch._C._functorch.get_dynamic_layer_stack_depth()
        self._vmap_level = _legacy_vmap_level()
        et = _jvp_nesting_module()
        self._jvp_nesting = getattr(et, "JVP_NESTING", None)
        self._dual_level = _fwad._current_level

    def push(self, undo: Callable[[], Any]) -> None:
        """Add an idempotent undo action (a C-level callable where possible, e.g. a ``functools.partial``)."""
        self._undo.append(undo)

    def set_item(self, mapping: Any, key: Any, value: Any) -> None:
        """``mapping[key] = value``, undone to the current value (or to absence)."""
        if key in mapping:
            self._undo.append(functools.partial(operator.setitem, mapping, key, mapping[key]))
        else:
            self._undo.append(functools.partial(mapping.pop, key, None))
        mapping[key] = value

    def _pop_functorch_levels(self) -> None:
        if torch._C._functorch.get_dynamic_layer_stack_depth() > self._functorch_depth:
            torch._C._functorch.pop_dynamic_layer_stack_and_undo_to_depth(self._functorch_depth)

    def _pop_legacy_vmap_levels(self) -> None:
        while _legacy_vmap_level() > self._vmap_level:
            torch._C._vmapmode_decrement_nesting()

    def _repair_jvp_bookkeeping(self) -> None:
        """The Python halves of ``torch.func.jvp``'s bookkeeping: its nesting counter and the forward-AD level."""
        et = _jvp_nesting_module()
        if self._jvp_nesting is not None and et is not None and et.JVP_NESTING != self._jvp_nesting:
            et.JVP_NESTING = self._jvp_nesting
        if self._dual_level < 0:  # (inside a caller's own dual level nothing is touched)
            _close_leaked_dual_level()

    def _repair_levels(self) -> None:
        self._pop_functorch_levels()
        self._pop_legacy_vmap_levels()
        self._repair_jvp_bookkeeping()

    def restore(self) -> None:
        """Undo everything (newest first); an exception raised meanwhile (a second Ctrl-C) is re-raised after a
        complete pass."""
        pending: BaseException | None = None
        for _ in range(3):
            try:
                self._repair_levels()
                list(map(operator.call, reversed(self._undo)))
                break
            except BaseException as exc:  # noqa: BLE001 - finish restoring, then re-raise
                if pending is None:
                    pending = exc
        else:  # the same step keeps failing (not an interrupt): every action on its own, none left out, no hang
            self._restore_each()
        if pending is not None:
            raise pending

    def _restore_each(self) -> None:
        """The slow path of :meth:`restore`: each repair and undo action run by itself, failures skipped."""
        for action in (self._pop_functorch_levels, self._pop_legacy_vmap_levels, self._repair_jvp_bookkeeping,
                       *reversed(self._undo)):
            try:
                action()
            except Exception:  # noqa: BLE001 - best effort: the first error is what restore() re-raises
                log.debug("an undo action failed during restore", exc_info=True)


@contextlib.contextmanager
def _restoring(guard: StateGuard | None) -> Iterator[StateGuard]:
    own = StateGuard() if guard is None else guard
    try:
        yield own
    finally:
        own.restore()


# ---------------------------------------------------------------------------------------------------
# Switches
# ---------------------------------------------------------------------------------------------------
def _sdpa_math_kernel(guard: StateGuard) -> None:
    names = getattr(getattr(torch.nn, "attention", None), "_backend_names", None)
    if not names:
        return
    for name in names:
        get, put = getattr(torch._C, f"_get_{name}_sdp_enabled", None), getattr(torch._C, f"_set_sdp_use_{name}", None)
        if get is None or put is None:
            continue
        guard.push(functools.partial(put, bool(get())))
        put(name == "math")


def autocast_state() -> dict[str, tuple[bool, torch.dtype]]:
    """Whether autocast is on, and its dtype, per device type (CPU, CUDA, MPS, XPU)."""
    return {d: (torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in _AUTOCAST_DEVICES}


def _set_autocast(guard: StateGuard, state: Mapping[str, tuple[bool, torch.dtype]] | None) -> None:
    """Autocast off on every device type, or set to ``state`` (captured by :func:`autocast_state`)."""
    for dev in _AUTOCAST_DEVICES:
        enabled, dtype = state[dev] if state is not None else (False, None)
        now_enabled, now_dtype = torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev)
        if now_enabled == enabled and dtype in (None, now_dtype):
            continue  # already as wanted (the common case: autocast off): nothing to switch, nothing to undo
        guard.push(functools.partial(torch.set_autocast_dtype, dev, now_dtype))
        guard.push(functools.partial(torch.set_autocast_enabled, dev, now_enabled))
        if dtype is not None:
            torch.set_autocast_dtype(dev, dtype)
        torch.set_autocast_enabled(dev, enabled)


def _leave_inference_mode(guard: StateGuard) -> None:
    if torch.is_inference_mode_enabled():
        leave = torch._C._InferenceMode(False)  # RAII: also undone if collected before being recorded
        guard.push(functools.partial(leave.__exit__, None, None, None))


def _grad_on(guard: StateGuard) -> None:
    guard.push(functools.partial(torch._C._set_grad_enabled, torch.is_grad_enabled()))
    torch._C._set_grad_enabled(True)


def _cudnn_off(guard: StateGuard) -> None:
    guard.push(functools.partial(torch._C._set_cudnn_enabled, torch._C._get_cudnn_enabled()))
    torch._C._set_cudnn_enabled(False)


def _module_flags(guard: StateGuard, model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats:
            guard.set_item(m.__dict__, "track_running_stats", False)
        elif isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse:
            guard.set_item(m.__dict__, "sparse", False)


def _hardsigmoid(input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``F.hardsigmoid`` = relu6(x + 3) / 6, composed of twice-differentiable ops (same values)."""
    out = torch.clamp(input + 3.0, 0.0, 6.0) / 6.0
    return input.copy_(out) if inplace else out


_embedding_bag = F.embedding_bag  # the original, for the cases the substitute does not cover


def _embedding_bag_sum_mean(input: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor | None = None,
                            max_norm: float | None = None, norm_type: float = 2, scale_grad_by_freq: bool = False,
                            mode: str = "mean", sparse: bool = False, per_sample_weights: torch.Tensor | None = None,
                            include_last_offset: bool = False, padding_idx: int | None = None) -> torch.Tensor:
    """``F.embedding_bag`` for ``mode="sum"``/``"mean"`` as a gather and a segment sum (twice differentiable):
    bag b = Σ_i w_i E[idx_i] over its entries i that are not ``padding_idx`` (mean: divided by their count,
    an empty bag gives 0). ``mode="max"`` and ``max_norm`` go to the original."""
    if mode not in ("sum", "mean") or max_norm is not None or input.dim() not in (1, 2):
        return _embedding_bag(input, weight, offsets, max_norm, norm_type, scale_grad_by_freq, mode, sparse,
                              per_sample_weights, include_last_offset, padding_idx)
    if input.dim() == 2:
        bags, length = input.shape
        flat = input.reshape(-1)
        bag_of = torch.arange(bags, device=input.device).repeat_interleave(length)
        psw = per_sample_weights.reshape(-1) if per_sample_weights is not None else None
    else:
        flat = input
        starts = offsets[:-1] if include_last_offset else offsets
        bags = starts.numel()
        ends = torch.cat([starts[1:], starts.new_tensor([flat.numel()])]) if not include_last_offset else offsets[1:]
        bag_of = torch.arange(bags, device=input.device).repeat_interleave(ends - starts)
        psw = per_sample_weights
    rows = F.embedding(flat, weight, padding_idx, None, norm_type, scale_grad_by_freq, False)
    keep = torch.ones_like(flat, dtype=rows.dtype) if padding_idx is None else (flat != padding_idx).to(rows.dtype)
    scale = keep if psw is None else keep * psw
    out = rows.new_zeros(bags, weight.shape[1]).index_add(0, bag_of, rows * scale[:, None])
    if mode == "mean":
        count = keep.new_zeros(bags).index_add(0, bag_of, keep)
        out = out / count.clamp_min(1)[:, None]
    return out


_grouped_mm_original = getattr(F, "grouped_mm", None)
_torch_grouped_mm_original = getattr(torch, "_grouped_mm", None)


def _grouped_mm(mat_a: torch.Tensor, mat_b: torch.Tensor, *, offs: torch.Tensor | None = None,
                bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
                _original: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
    """``F.grouped_mm`` / ``torch._grouped_mm`` for the MoE form (``mat_a`` (M, K) rows sorted by group,
    ``mat_b`` (G, K, N), ``offs`` the cumulative row ends): rows offs[g-1]:offs[g] times ``mat_b[g]``, rows past
    offs[-1] zero, as a loop of plain matmuls. The fused kernel takes float32/bf16/fp16 only and its double
    backward fails ("Invalid strides/sizes"); this is the same function in any dtype, twice differentiable.
    Other forms go to the original kernel."""
    original = _original or _grouped_mm_original or _torch_grouped_mm_original
    if (offs is None or mat_a.dim() != 2 or mat_b.dim() != 3 or bias is not None
            or (out_dtype is not None and out_dtype != mat_a.dtype)):
        return original(mat_a, mat_b, offs=offs, bias=bias, out_dtype=out_dtype)
    ends = [int(e) for e in offs.tolist()]
    pieces, start = [], 0
    for g, end in enumerate(ends):
        pieces.append(mat_a[start:end] @ mat_b[g])
        start = end
    if start < mat_a.shape[0]:
        pieces.append(mat_a.new_zeros(mat_a.shape[0] - start, mat_b.shape[-1]))
    return torch.cat(pieces)


def _torch_grouped_mm(mat_a: torch.Tensor, mat_b: torch.Tensor, offs: torch.Tensor | None = None,
                      bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    return _grouped_mm(mat_a, mat_b, offs=offs, bias=bias, out_dtype=out_dtype, _original=_torch_grouped_mm_original)


def _weight_norm(v: torch.Tensor, g: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``torch._weight_norm`` = v · g / ‖v‖ (norm over every dim but ``dim``; over all of v for dim = -1), composed
    of twice-differentiable ops. PyTorch's own double backward of ``_weight_norm_interface`` is wrong (HVPs 12–49 %
    off and asymmetric in float64), which weight normalisation (``parametrizations.weight_norm`` and the legacy
    ``nn.utils.weight_norm`` hook) would silently inherit."""
    if dim is None or dim == -1:
        norm = v.norm()
    else:
        dim = dim % v.dim()
        norm = v.norm(dim=[d for d in range(v.dim()) if d != dim], keepdim=True)
    return v * (g / norm)


#: ``torch.nn.functional`` functions without a (right) double-backward formula on this torch, and the exact
#: equivalent used inside the second-order context (``nn.Hardsigmoid`` calls ``F.hardsigmoid``,
#: ``nn.EmbeddingBag`` calls ``F.embedding_bag``, Hugging Face's grouped-matmul MoE experts ``F.grouped_mm``).
SUBSTITUTIONS: dict[str, Callable[..., torch.Tensor]] = {"hardsigmoid": _hardsigmoid,
                                                         "embedding_bag": _embedding_bag_sum_mean}
if _grouped_mm_original is not None:
    SUBSTITUTIONS["grouped_mm"] = _grouped_mm

#: The same for functions looked up in other namespaces (module name → {function name → exact equivalent}):
#: ``torch._weight_norm`` (called by ``parametrizations.weight_norm`` as ``torch._weight_norm`` and by the legacy
#: hook under its own imported name), ``torch._grouped_mm`` (MoE experts on a torch without ``F.grouped_mm``).
NAMESPACE_SUBSTITUTIONS: dict[str, dict[str, Callable[..., torch.Tensor]]] = {
    "torch": {"_weight_norm": _weight_norm, **({"_grouped_mm": _torch_grouped_mm} if _torch_grouped_mm_original
                                                else {})},
    "torch.nn.utils.weight_norm": {"_weight_norm": _weight_norm},
}


def _substitute_ops(guard: StateGuard) -> None:
    for name, exact in SUBSTITUTIONS.items():
        guard.set_item(F.__dict__, name, exact)
    for module_name, functions in NAMESPACE_SUBSTITUTIONS.items():
        namespace = getattr(sys.modules.get(module_name), "__dict__", None)
        if namespace is None:
            continue
        for name, exact in functions.items():
            if name in namespace:
                guard.set_item(namespace, name, exact)


def _run_directly_reentrant(function: Callable, preserve_rng_state: bool, *args: Any) -> Any:
    return function(*args)


class _DirectCheckpointFunction:
    """Stands in for ``torch.utils.checkpoint.CheckpointFunction``: run the function, keep its graph."""

    apply = staticmethod(_run_directly_reentrant)


def _no_recomputation(function: Callable, preserve_rng_state: bool, context_fn: Any, determinism_check: Any,
                      debug: Any, early_stop: Any, *args: Any, **kwargs: Any) -> Iterator[None]:
    """Stands in for the non-reentrant checkpoint's pre/post-forward generator: does nothing."""
    yield


def _checkpointing_off(guard: StateGuard) -> None:
    # ``checkpoint`` looks these up in its module's globals at call time, so every caller is covered, also
    # those that hold the function itself (HF: functools.partial(checkpoint, **kwargs)).
    namespace = _checkpoint_module.__dict__
    if "CheckpointFunction" in namespace:
        guard.set_item(namespace, "CheckpointFunction", _DirectCheckpointFunction)
    if "_checkpoint_without_reentrant_generator" in namespace:
        guard.set_item(namespace, "_checkpoint_without_reentrant_generator", _no_recomputation)


@contextlib.contextmanager
def second_order_context(model: nn.Module, guard: StateGuard | None = None, *,
                         autocast: Mapping[str, tuple[bool, torch.dtype]] | None = None) -> Iterator[StateGuard]:
    """Run model code so that its second derivatives exist and are exact, and no state changes.

    Leaves inference mode, enables grad mode, selects the MATH attention kernel, disables cuDNN (RNN double
    backward) and autocast (or sets the autocast ``state`` given), turns off running-stat updates of
    train-mode BatchNorm and sparse embedding gradients (same function), substitutes ops without double
    backward (:data:`SUBSTITUTIONS`) and makes ``torch.utils.checkpoint`` run without recomputation.
    Everything is recorded in ``guard`` (a new one if None) and restored on exit, also when interrupted.
    """
    with _restoring(guard) as g:
        _grad_on(g)  # before leaving inference mode: replaying the undo log then ends in the same state
        _leave_inference_mode(g)
        _sdpa_math_kernel(g)
        _cudnn_off(g)
        _set_autocast(g, autocast)
        _module_flags(g, model)
        _substitute_ops(g)
        _checkpointing_off(g)
        yield g


def autocast_off(fn: Callable) -> Callable:
    """Decorator: run ``fn`` with autocast off on every device type, restored on the way out (also when
    interrupted). For the solvers' own arithmetic (Gram matrices, orthogonalisation), which a caller's
    ``torch.autocast`` region would otherwise round to bf16."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with _restoring(None) as guard:
            _set_autocast(guard, None)
            return fn(*args, **kwargs)

    return wrapper


@contextlib.contextmanager
def backward_context(guard: StateGuard | None = None, *,
                     autocast: Mapping[str, tuple[bool, torch.dtype]] | None = None) -> Iterator[StateGuard]:
    """The part of :func:`second_order_context` a backward through an already built graph needs (no forward
    runs): out of inference mode, autocast off (or ``autocast``), functorch levels repaired on exit."""
    with _restoring(guard) as g:
        _leave_inference_mode(g)
        _set_autocast(g, autocast)
        yield g


# ---------------------------------------------------------------------------------------------------
# Calling a module with other tensors in place of its parameters and buffers
# ---------------------------------------------------------------------------------------------------
def _slot(model: nn.Module, name: str, kind: str) -> tuple[dict, str]:
    module_path, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_path) if module_path else model
    return getattr(module, kind), leaf


def call_with_state(model: nn.Module, state: Mapping[str, torch.Tensor], args: Sequence[Any] = (),
                    kwargs: Mapping[str, Any] | None = None, guard: StateGuard | None = None) -> Any:
    """``model(*args, **kwargs)`` with the tensors of ``state`` (by parameter/buffer name) in place of the
    model's, like ``torch.func.functional_call`` (tied names follow their first name), but the swap in and the
    swap back are each one C-level loop, recorded in ``guard`` first: an interrupt anywhere leaves the model
    with its own Parameter and buffer objects (``guard.restore()`` on the caller's way out repairs it)."""
    mappings: list[dict] = []
    keys: list[str] = []
    values: list[torch.Tensor] = []
    for kind, named in (("_parameters", model.named_parameters(remove_duplicate=False)),
                        ("_buffers", model.named_buffers(remove_duplicate=False))):
        first: dict[int, str] = {}
        for name, tensor in named:
            canonical = first.setdefault(id(tensor), name)
            value = state.get(name, state.get(canonical))
            if value is None:
                continue
            mapping, key = _slot(model, name, kind)
            mappings.append(mapping)
            keys.append(key)
            values.append(value)
    originals = list(map(operator.getitem, mappings, keys))
    back = _assign_all(mappings, keys, originals)
    if guard is not None:  # a repeatable undo for the guard (the one-shot ``back`` serves the finally below)
        guard.push(functools.partial(_assign, mappings, keys, originals))
    try:
        _assign_all(mappings, keys, values)()
        return model(*args, **(kwargs or {}))
    finally:
        back()  # a C-level call: an interrupt is handled after it, not in the middle


# ---------------------------------------------------------------------------------------------------
# Errors of ops without second derivatives
# ---------------------------------------------------------------------------------------------------
_MISSING = (re.compile(r"derivative for '?(?:aten::)?([A-Za-z0-9_.]+)'? is not implemented"),
            re.compile(r"Trying to use forward AD with (?:aten::)?([A-Za-z0-9_.]+) that does not support it"))


@contextlib.contextmanager
def spying_forward(model: nn.Module, on_call: Callable[[str, Any, tuple, dict, Any], None],
                   guard: StateGuard) -> Iterator[None]:
    """Inside: every torch function called by a module's forward is reported to ``on_call(module_name, func,
    args, kwargs, result)`` with the innermost module whose forward is running (a ``TorchFunctionMode`` and
    forward pre/post hooks, removed on exit through ``guard``)."""
    from torch.overrides import TorchFunctionMode

    stack: list[str] = []

    class _Spy(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            out = func(*args, **(kwargs or {}))
            if stack:
                on_call(stack[-1], func, args, kwargs or {}, out)
            return out

    def enter(name: str) -> None:
        stack.append(name)

    def leave() -> None:  # a forward hook that returned the popped name would replace the module's output
        if stack:
            stack.pop()

    hooks = []
    for name, module in model.named_modules():
        hooks.append(module.register_forward_pre_hook(lambda m, a, n=name: enter(n)))
        hooks.append(module.register_forward_hook(lambda m, a, o: leave()))
    for handle in hooks:
        guard.push(handle.remove)
    try:
        with _Spy():
            yield
    finally:
        for handle in hooks:
            handle.remove()


def _modules_calling(model: nn.Module, base: str, rerun: Callable[[], Any], guard: StateGuard) -> list[str]:
    """Names of the innermost modules whose forward calls a torch function called ``base`` (one spied forward)."""
    found: list[str] = []

    def note(module: str, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        name = getattr(func, "__name__", "").replace("_", "").lower()
        if name == base and module not in found:
            found.append(module)

    try:
        with spying_forward(model, note, guard):
            rerun()
    except Exception:  # noqa: BLE001 - only looking
        pass
    return found


def low_precision_islands(model: nn.Module, dtype: torch.dtype, run: Callable[[], Any], guard: StateGuard
                          ) -> tuple[Any, dict[str, str]]:
    """Run ``run()`` (one forward pass, its result returned) and find the modules that compute below ``dtype``:
    those whose forward casts a ``dtype`` tensor that depends on the parameters (requires grad; constants such as
    rotary tables do not count) to a less precise floating dtype (Hugging Face ``RMSNorm`` /
    ``T5LayerNorm`` compute in float32 whatever the input; causal-LM heads cast logits with ``.float()``).
    Returns ``(run's result, {module name: the lower dtype})``; the caller's curvature is then only as accurate
    as that dtype."""
    if not dtype.is_floating_point:
        return run(), {}
    eps = torch.finfo(dtype).eps
    islands: dict[str, str] = {}

    def note(module: str, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        if module in islands or not isinstance(out, torch.Tensor) or not out.is_floating_point() \
                or torch.finfo(out.dtype).eps <= eps:
            return
        if any(isinstance(a, torch.Tensor) and a.dtype == dtype and a.requires_grad  # depends on θ: not a constant
               for a in (*args, *kwargs.values())):
            islands[module] = str(out.dtype).replace("torch.", "")

    try:
        with spying_forward(model, note, guard):
            return run(), islands
    except Exception:  # noqa: BLE001 - the spy may be what failed (a model with its own function mode): run plainly
        log.debug("the spied forward pass failed; running it without the spy", exc_info=True)
        return run(), {}


def explain_missing_derivative(exc: BaseException, model: nn.Module, rerun: Callable[[], Any] | None = None
                               ) -> SecondOrderError | None:
    """A :class:`SecondOrderError` naming the op (and the modules that call it, found by re-running one
    forward pass ``rerun`` with a spy, or else by class name) if ``exc`` says an op has no second derivative;
    None for any other error."""
    text = str(exc)
    base = None
    if "once_differentiable" in text:
        op = "a custom autograd.Function marked @once_differentiable"
    else:
        match = next((m for m in (p.search(text) for p in _MISSING) if m), None)
        if match is None:
            return None
        op = match.group(1)
        base = re.sub(r"^_+|(_backward)+$", "", op.split(".")[0]).replace("_", "").lower()
    modules = dict(model.named_modules())
    users: list[str] = []
    if base and rerun is not None:
        guard = StateGuard()
        try:
            users = _modules_calling(model, base, rerun, guard)
        finally:
            guard.restore()
    if base and not users:
        users = [n for n, m in modules.items() if type(m).__name__.lower() == base]
    named = [f"'{n or type(model).__name__}' ({type(modules[n]).__name__})" for n in users]
    where = (f", called by module {', '.join(named)}" if named else "")
    return SecondOrderError(
        f"curvature needs second derivatives, but PyTorch has no second derivative for {op}{where}. "
        f"Replace it in the model by an equivalent composed of twice-differentiable ops (for example "
        f"torch.clamp / torch.where expressions), or take curvature w.r.t. parameters that do not depend on it "
        f"(params=). Known equivalents are substituted automatically: {', '.join(sorted(SUBSTITUTIONS))}.")


def _is_once_differentiable(cls: type) -> bool:
    backward = getattr(cls, "backward", None)
    code = getattr(backward, "__code__", None)  # functools.wraps hides the wrapper's name, not its code's
    return code is not None and "once_differentiable" in getattr(code, "co_qualname", code.co_name)


def _backward_records_graph(node: Any) -> bool:
    """Probe a custom ``autograd.Function``'s node once: call its backward (grad mode on) on random output
    gradients that require grad. A backward written with differentiable torch ops returns input gradients that
    require grad; one computed under ``no_grad``, detached or in NumPy returns plain tensors, and second
    derivatives through it would be dropped. True when nothing could be probed (no false alarm)."""
    try:
        grads_out = [torch.randn(tuple(m.shape), dtype=m.dtype, device=m.device, requires_grad=True)
                     for m in node._input_metadata]
        with torch.enable_grad():
            result = node.apply(*grads_out)
    except Exception:  # noqa: BLE001 - not probeable (nested tensors, a backward needing state): no verdict
        log.debug("could not probe the backward of %s", type(node).__name__, exc_info=True)
        return True
    result = result if isinstance(result, tuple) else (result,)
    needs = tuple(getattr(node, "needs_input_grad", ()) or ())
    return all(not (isinstance(r, torch.Tensor) and r.is_floating_point() and i < len(needs) and needs[i])
               or r.requires_grad for i, r in enumerate(result))


def _tensors_in(x: Any) -> Iterator[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, Mapping):
        for v in x.values():
            yield from _tensors_in(v)
    elif isinstance(x, (tuple, list)):
        for v in x:
            yield from _tensors_in(v)


def _graph_nodes(roots: Sequence[Any], seen: set[int]) -> Iterator[Any]:
    """Every autograd node reachable from ``roots`` that is not in ``seen`` (ids), once each; adds them to it."""
    stack = list(roots)
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        yield node
        stack.extend(n for n, _ in node.next_functions)


def _modules_applying(model: nn.Module, classes: Sequence[type], rerun: Callable[[], Any],
                      guard: StateGuard) -> dict[type, str]:
    """The innermost module whose forward applies each custom ``autograd.Function`` class of ``classes`` (one
    forward with graph, ``rerun``): forward hooks fire inner modules first, and each walks only the graph nodes
    no earlier hook has seen, so the first module whose output reaches a node of the class made it."""
    seen: set[int] = set()
    found: dict[type, str] = {}

    def walk(name: str, output: Any) -> None:
        for node in _graph_nodes([t.grad_fn for t in _tensors_in(output)], seen):
            cls = getattr(node, "_forward_cls", None)
            if cls in classes and cls not in found:
                found[cls] = name

    for name, module in model.named_modules():
        guard.push(module.register_forward_hook(lambda m, a, o, n=name: walk(n, o)).remove)
    try:
        rerun()
    except Exception:  # noqa: BLE001 - only looking
        pass
    return found


def check_twice_differentiable(loss: torch.Tensor, model: nn.Module | None = None,
                               rerun: Callable[[], Any] | None = None) -> None:
    """Raise :class:`SecondOrderError` if the graph of ``loss`` runs through a custom ``autograd.Function`` whose
    backward records no graph: one marked ``@once_differentiable``, or one found by probing its backward once per
    class (:func:`_backward_records_graph`: computed under ``no_grad``, detached, in NumPy). With
    ``create_graph=True`` such a backward records nothing, so second derivatives through it would silently come out
    as zero. The error names the Function and, with ``model`` and ``rerun`` (one forward pass building a graph),
    the module that applies it. One walk over the graph's nodes, one backward call per custom Function class."""
    verdict: dict[type, str | None] = {}
    for node in _graph_nodes([loss.grad_fn], set()):
        cls = getattr(node, "_forward_cls", None)
        if cls is not None and cls not in verdict:
            verdict[cls] = ("is marked @once_differentiable" if _is_once_differentiable(cls) else
                            None if _backward_records_graph(node) else
                            "has a backward that autograd cannot differentiate (its gradients carry no graph: computed "
                            "under torch.no_grad(), detached, or in NumPy)")
    offenders = {cls: why for cls, why in verdict.items() if why is not None}
    if not offenders:
        return
    where: dict[type, str] = {}
    if model is not None and rerun is not None:
        guard = StateGuard()
        try:
            where = _modules_applying(model, list(offenders), rerun, guard)
        finally:
            guard.restore()
    modules = dict(model.named_modules()) if model is not None else {}
    parts = []
    for cls, why in offenders.items():
        name = where.get(cls)
        used = (f" (applied in module '{name or type(model).__name__}' ({type(modules[name]).__name__}))"
                if name is not None else "")
        parts.append(f"the custom autograd.Function {cls.__qualname__}{used} {why}")
    raise SecondOrderError(
        f"curvature needs second derivatives, but {'; '.join(parts)}: its backward records no graph, so second "
        "derivatives through it would silently be zero. Give it a backward written with differentiable torch ops "
        "(without @once_differentiable), or use method='finite_difference' (differences of first-order gradients, "
        "which such a backward computes right), or take curvature w.r.t. parameters that do not depend on it "
        "(params=).")


# ---------------------------------------------------------------------------------------------------
# Randomness
# ---------------------------------------------------------------------------------------------------
def _rng_devices(device: torch.device) -> list[int]:
    if device.type == "cuda" and torch.cuda.is_available():
        return [device.index if device.index is not None else torch.cuda.current_device()]
    return []


def _numpy_random() -> Any:
    """``numpy.random`` if NumPy is imported (a model that draws from it has imported it), else None."""
    np = sys.modules.get("numpy")
    return getattr(np, "random", None)


def _save_rng(guard: StateGuard, device: torch.device) -> None:
    guard.push(functools.partial(random.setstate, random.getstate()))
    np_random = _numpy_random()
    if np_random is not None:
        guard.push(functools.partial(np_random.set_state, np_random.get_state()))
    guard.push(functools.partial(torch.default_generator.set_state, torch.default_generator.get_state()))
    for index in _rng_devices(device):
        gen = torch.cuda.default_generators[index]
        guard.push(functools.partial(gen.set_state, gen.get_state()))


_held_rng = threading.local()  # .devices: the devices whose RNG states an enclosing holding_rng() restores


@contextlib.contextmanager
def frozen_rng(device: torch.device, guard: StateGuard | None = None) -> Iterator[None]:
    """Restore the global RNG states (torch CPU and the CUDA device in use, Python's ``random``, NumPy's global
    generator) on exit, whatever happens inside. Inside :func:`holding_rng` for the same device it saves nothing:
    the enclosing hold restores the states on its own exit."""
    if torch.device(device) in getattr(_held_rng, "devices", ()):
        yield  # the enclosing hold restores the states
        return
    with _restoring(guard) as g:
        _save_rng(g, device)
        yield


@contextlib.contextmanager
def holding_rng(device: torch.device) -> Iterator[None]:
    """:func:`frozen_rng` once around many applications of an operator (a solve): the RNG states are saved on
    entry and restored on exit, and the :func:`frozen_rng` of every gradient or HVP inside saves nothing (each of
    them reseeds before its forward, so they compute the same). Saving and restoring torch's, Python's and
    NumPy's states costs ≈ 0.1 ms, a tenth of a gradient of a small model. Only engine work may run inside: code
    that draws from the global generators in between would see the engines' seeds, not the caller's state."""
    device = torch.device(device)
    held = getattr(_held_rng, "devices", ())
    if device in held:
        yield  # held already (a solve's hold around an engine's own): the outer one restores
        return
    with frozen_rng(device):
        _held_rng.devices = (*held, device)
        try:
            yield
        finally:
            _held_rng.devices = held


def reseed(seed: int, device: torch.device) -> None:
    """Seed the generators a forward pass on ``device`` draws from (call inside :func:`frozen_rng`): torch's,
    Python's ``random`` and NumPy's global generator, so a model drawing from any of them sees the same numbers in
    every forward pass of one operator."""
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np_random = _numpy_random()
    if np_random is not None:
        np_random.seed(seed % 2**32)
    if device.type == "cuda" and torch.cuda.is_available():
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)


def peek_seed(device: torch.device) -> int:
    """A seed derived from the current RNG state, without advancing it."""
    with frozen_rng(device):
        return int(torch.randint(0, 2**62, (1,)).item())
