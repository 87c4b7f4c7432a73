"""The forms the entry points expect, checked where a mistake is made, and explained where it shows.

Every entry point measures the loss ``loss_fn(outputs, targets)`` with ``outputs = model(inputs)`` on a batch
``(inputs, targets)`` (or a dict batch holding its ``labels``, with ``loss_fn=None`` for the model's own loss), or on
an iterable of such batches. The mistakes of a first hour break that contract in a few typical ways:

* the batch's two halves passed as two arguments, ``tracker.step(model, opt, x, y)``: ``y`` lands in ``step`` (or
  in ``k`` / ``optimizer`` of :func:`~curvature.sharpness` / :func:`~curvature.preconditioned_sharpness`);
  :func:`check_batch_argument` and :func:`check_not_a_batch_half` name the argument it landed in;
* a loss class instead of an instance (``nn.CrossEntropyLoss``) is refused where the loss is resolved
  (:func:`curvature.data.resolve_loss_fn`);
* a loss with another signature (``loss_fn(model, batch)``), ``F.cross_entropy`` on a sequence model's (B, T, V) logits, inputs and targets of
  different lengths: these fail inside the first measurement with torch's own message ("too many values to
  unpack", "'Tensor' object is not callable"); :func:`explain_setup_failure` says what was called with what, the
  expected form, and the likely fix.

:func:`failure_kind` sorts a failed measurement into one of :data:`FAILURE_KINDS` (the tracker's ``error_kind``
column): ``"setup"`` for the errors a wrong set-up raises, ``"out_of_memory"``, ``"non_finite"`` (NaN/inf loss,
gradient or eigenvalue), ``"remote_rank"`` (another rank failed), ``"not_converged"``, ``"sink"`` and ``"error"``.
"""
from __future__ import annotations

import contextlib
import inspect
import re
import weakref
from collections.abc import Mapping
from typing import Any

import torch

from .data import is_single_batch

__all__ = ["FAILURE_KINDS", "BATCH_FORM", "describe", "check_batch_argument", "check_not_a_batch_half",
           "failure_kind", "explain_setup_failure", "StepOrderWatch"]

#: The values of a row's ``error_kind`` (``None`` when the row has no error).
FAILURE_KINDS = ("setup", "out_of_memory", "non_finite", "remote_rank", "not_converged", "sink", "error")

#: How the docs and messages name the expected batch form.
BATCH_FORM = ("a batch (inputs, targets), a dict batch with its 'labels' (loss_fn=None: the model's own loss), "
              "or an iterable of them (a list, a DataLoader)")

_LOSS_FORM = ("loss_fn(outputs, targets) -> scalar mean loss, called with outputs = model(inputs) on each batch "
              "(inputs, targets)")


def describe(x: Any, depth: int = 0) -> str:
    """A short description of a value for an error message: ``Tensor (8, 5) float32``, ``tuple of 2: (...)``,
    ``dict with keys ['input_ids', 'labels']``."""
    if isinstance(x, torch.Tensor):
        return f"Tensor {tuple(x.shape)} {str(x.dtype).replace('torch.', '')}"
    if isinstance(x, Mapping):
        return f"{type(x).__name__} with keys {list(x.keys())[:8]}"
    if isinstance(x, (tuple, list)):
        if depth >= 1 or len(x) > 4:
            return f"{type(x).__name__} of {len(x)}"
        return f"{type(x).__name__} of {len(x)}: (" + ", ".join(describe(v, depth + 1) for v in x) + ")"
    if inspect.isclass(x):
        return f"the class {x.__module__}.{x.__qualname__}"
    text = repr(x)
    return f"{type(x).__name__} {text[:60] + '...' if len(text) > 60 else text}"


def check_batch_argument(batch: Any, name: str, call: str) -> None:
    """Raise ``TypeError`` when ``batch`` cannot be a batch or an iterable of batches: a bare tensor (its rows
    would be read as batches), a number or a string. ``name`` is the argument, ``call`` the call as the user
    writes it (``"tracker.step(model, optimizer, batch, step)"``)."""
    bad = isinstance(batch, (torch.Tensor, str, bytes, int, float)) and not isinstance(batch, bool)
    if not bad:
        return
    hint = (" (inputs without targets: pass (inputs, targets) as one argument)" if isinstance(batch, torch.Tensor)
            else "")
    raise TypeError(f"{call}: {name} must be {BATCH_FORM}, e.g. {call.split('(')[0]}(..., (x, y), ...); "
                    f"got {describe(batch)}{hint}")


def check_not_a_batch_half(value: Any, name: str, call: str, batch_name: str = "batch") -> None:
    """Raise ``TypeError`` when the argument after the batch got a multi-element tensor: the targets of a batch
    passed as two arguments (``tracker.step(model, opt, x, y)`` puts ``y`` in ``step``)."""
    if isinstance(value, torch.Tensor) and value.numel() > 1:
        raise TypeError(
            f"{call}: {name} got {describe(value)}, which looks like the targets of the batch: it landed in "
            f"`{name}` because inputs and targets were passed as two arguments. Pass the batch as one argument, "
            f"{batch_name}=(inputs, targets) ({BATCH_FORM}).")


_SETUP_TYPES = (TypeError, ValueError, IndexError, KeyError, AttributeError, NotImplementedError, RuntimeError)
_SETUP_ERRORS = frozenset(t.__name__ for t in _SETUP_TYPES) | {"SecondOrderError", "TrackingSetupError"}


def failure_kind(exc: BaseException, *, first: bool) -> str:
    """The kind of a failed measurement (one of :data:`FAILURE_KINDS`). ``first``: no measurement has succeeded
    yet, so an error of the kinds a wrong set-up raises (TypeError, ValueError, IndexError, KeyError,
    AttributeError, NotImplementedError, RuntimeError other than out-of-memory) is ``"setup"``; after a success
    the same error is a transient ``"error"``."""
    text = str(exc).lower()
    if isinstance(exc, getattr(torch, "OutOfMemoryError", ())) or "out of memory" in text:
        return "out_of_memory"
    if isinstance(exc, FloatingPointError):
        return "non_finite"
    if type(exc).__name__ == "RemoteRankError":  # "rank 1 failed ...: ValueError: ...": sorted as that rank's error,
        quoted = re.search(r": (\w+): ", str(exc))  # so that every rank raises (or warns) alike
        name = quoted.group(1) if quoted else ""
        if name == "FloatingPointError":
            return "non_finite"
        return "setup" if first and name in _SETUP_ERRORS else "remote_rank"
    if first and type(exc).__name__ in _SETUP_ERRORS or first and isinstance(exc, _SETUP_TYPES):
        return "setup"
    return "error"


def _loss_name(loss_fn: Any) -> str:
    name = getattr(loss_fn, "__qualname__", None) or type(loss_fn).__qualname__
    module = getattr(loss_fn, "__module__", None) or type(loss_fn).__module__
    return f"{module}.{name}" if module and not module.startswith("__") else name


def _parameters(loss_fn: Any) -> list[str] | None:
    try:
        return list(inspect.signature(loss_fn).parameters)
    except (TypeError, ValueError):
        return None


def _pair(data: Any) -> tuple[Any, Any] | None:
    """``(inputs, targets)`` of the first batch, when ``data`` is (or starts with) such a pair."""
    with contextlib.suppress(Exception):
        first = data if is_single_batch(data) else (data[0] if isinstance(data, (tuple, list)) and data else None)
        if isinstance(first, (tuple, list)) and len(first) == 2:
            return first[0], first[1]
    return None


def _first_tensor(x: Any) -> torch.Tensor | None:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, Mapping):
        x = list(x.values())
    if isinstance(x, (tuple, list)):
        for v in x:
            t = _first_tensor(v)
            if t is not None:
                return t
    return None


def _is_cross_entropy(loss_fn: Any) -> bool:
    return loss_fn is torch.nn.functional.cross_entropy or isinstance(loss_fn, torch.nn.CrossEntropyLoss) or (
        getattr(loss_fn, "__name__", "") == "cross_entropy")


def explain_setup_failure(exc: BaseException, loss_fn: Any, data: Any, *, who: str = "the tracker",
                          loss_label: str | None = None, data_name: str = "data") -> str:
    """What a measurement that failed on its set-up was doing, and the likely fix: the expected call
    ``loss_fn(outputs, targets)``, the loss and the batch that were given, and hints for the common mistakes
    (a ``loss_fn(model, batch)`` signature, ``F.cross_entropy`` on (B, T, V) logits, inputs and targets of
    different lengths). ``loss_label`` names the loss as the user chose it (the CLI's ``--loss``)."""
    raw = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}".rstrip(": ")
    own = getattr(loss_fn, "__name__", "") == "model_output_loss"
    loss_text = loss_label or ("the model's own loss (loss_fn=None: outputs.loss)" if own
                               else _loss_name(loss_fn))
    hints: list[str] = []
    params = _parameters(loss_fn)
    text = str(exc)
    if params and (params[0].lower() in ("model", "net", "module", "network", "m")
                   or (len(params) > 1 and params[1].lower() in ("batch", "data"))):
        hints.append(f"loss_fn's parameters are ({', '.join(params[:2])}): curvature calls it with the model's "
                     "outputs and the targets, not with the model and the batch; write it as "
                     "loss_fn(outputs, targets), e.g. lambda outputs, targets: F.cross_entropy(outputs, targets)")
    elif "object is not callable" in text or "values to unpack" in text:
        hints.append("the loss seems to call its first argument or unpack its second: curvature passes "
                     "loss_fn(outputs, targets), not loss_fn(model, batch)")
    pair = _pair(data)
    if pair is not None and not own:
        inputs, targets = pair
        x = _first_tensor(inputs)
        if isinstance(targets, torch.Tensor) and x is not None and targets.ndim > 0 and x.ndim > 0 \
                and x.shape[0] != targets.shape[0]:
            hints.append(f"the inputs hold {x.shape[0]} samples and the targets {targets.shape[0]}: a batch's inputs "
                         "and targets must have the same first (batch) dimension")
        if _is_cross_entropy(loss_fn) and isinstance(targets, torch.Tensor) and targets.ndim >= 2 and \
                not targets.is_floating_point():
            hints.append("cross-entropy on a sequence model: outputs of shape (B, T, V) need flattening, "
                         "F.cross_entropy wants (N, V) logits and (N,) targets: loss_fn = lambda logits, y: "
                         "F.cross_entropy(logits.flatten(0, -2), y.flatten())")
    elif "Expected target size" in text and _is_cross_entropy(loss_fn):
        hints.append("F.cross_entropy on (B, T, V) logits: flatten them, lambda logits, y: "
                     "F.cross_entropy(logits.flatten(0, -2), y.flatten())")
    shown = ", ".join(params[:2]) + (", ..." if len(params or ()) > 2 else "") if params else ""
    given = f"loss_fn = {loss_text}" + (f"({shown})" if params and not loss_label else "")
    lines = [f"{who} could not measure at all: {raw}",
             f"expected {_LOSS_FORM}; given {given} and {data_name} = {describe(data)}"]
    lines += [f"likely: {h}" for h in hints]
    return "\n".join(lines)


class StepOrderWatch:
    """Whether ``optimizer.step()`` ran since the last ``backward()``, seen read-only: a ``register_step_post_hook``
    notes, after each optimizer step, the ``.grad`` tensors of a few parameters (weak references and version
    counters); a backward replaces or updates them, so finding them untouched means the optimizer stepped since
    the last backward (a measurement meant for the step about to be taken would describe the wrong parameters).
    Gradient accumulation and ``zero_grad(set_to_none=False)`` change the version counters, so they never look
    like it. Never changes training; :meth:`close` removes the hooks."""

    #: how many ``.grad`` tensors are noted per optimizer step
    PROBES = 4

    def __init__(self) -> None:
        self._hooks: dict[int, Any] = {}
        self._grads_at_step: dict[int, list[tuple[Any, Any, int]]] = {}
        self.warned = False

    def check(self, opt: Any, *, first_call: bool) -> str | None:
        """Why the optimizer has stepped since the last backward (``None`` if it has not, or it cannot tell):
        the first call on ``opt`` installs the hook (and, when ``first_call``, reports an optimizer that already
        has state at step 0)."""
        if not callable(getattr(opt, "register_step_post_hook", None)):
            return None
        key = id(opt)
        if key not in self._hooks:
            ref = weakref.ref(self)

            def after_optimizer_step(o: Any, args: Any, kwargs: Any) -> None:
                watch = ref()
                if watch is not None:
                    watch._note(o, key)

            self._hooks[key] = opt.register_step_post_hook(after_optimizer_step)
            if first_call and any(opt.state.get(p) for g in opt.param_groups for p in g["params"]):
                return "the optimizer already has state at step 0"
            return None
        seen = self._grads_at_step.get(key)
        if seen and all(p() is not None and p().grad is not None and p().grad is g() and p().grad._version == v
                        for p, g, v in seen):
            return "no backward() ran since the last optimizer.step()"
        return None

    def _note(self, opt: Any, key: int) -> None:
        seen: list[tuple[Any, Any, int]] = []
        grads = (p for group in opt.param_groups for p in group["params"] if p.grad is not None)
        for p in grads:
            seen.append((weakref.ref(p), weakref.ref(p.grad), p.grad._version))
            if len(seen) == self.PROBES:
                break
        self._grads_at_step[key] = seen

    def close(self) -> None:
        """Remove the hooks (the optimizer steps exactly as before)."""
        for handle in self._hooks.values():
            with contextlib.suppress(Exception):
                handle.remove()
        self._hooks.clear()
        self._grads_at_step.clear()
