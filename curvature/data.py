"""Data: what a batch is, what it weighs, and how the loss is read.

**One batch or many.** ``data`` is read by these rules (never by guessing from a length of 2 alone):

* a ``Mapping`` (``dict``, ``UserDict``, Hugging Face ``BatchEncoding``) is **one batch** holding inputs and
  targets together: the model is called as ``model(**batch)`` and the loss as ``loss_fn(outputs,
  batch.get("labels"))`` (``loss_fn=None``: the model's own loss, ``outputs.loss``);
* a tuple/list ``(inputs, targets)`` whose first element is a tensor or a Mapping (and, for a Mapping, whose
  second is not one) is **one batch**; ``inputs`` a tensor (one argument), a tuple (positional arguments) or a
  Mapping (keyword arguments); so is ``((x, z), y)`` with a tensor or ``None`` as targets;
* anything else iterable — a list of batches, a ``DataLoader``, a generator — is **many batches**, each read by
  the first two rules. ``[A, B]`` with A, B dicts is two batches; ``[(UserDict, y), (UserDict, y)]`` is two.
  To be explicit, pass a list: ``[batch]`` is always one batch.

``inputs_as="argument"`` passes a Mapping batch (or Mapping inputs) as the one positional argument, for models
whose ``forward(self, batch)`` takes the dict itself.

**Weights.** The Hessian is that of the dataset's mean loss, L = Σ_b w_b L_b / Σ_b w_b, where a batch weighs its
number of samples, or what ``weight_fn(batch)`` says (called on the batch as given, and on each micro-batch
with ``max_batch_size=``). With ``loss_fn=None`` and integer ``labels`` in the batch (Hugging Face), a batch weighs
its number of non-ignored labels (``!= -100``), i.e. the count HF's token-mean loss divides by: for causal LMs
(class names ``*ForCausalLM`` / ``*LMHeadModel`` or the config's ``architectures``, after unwrapping DDP/FSDP,
``torch.compile`` and PEFT; their loss shifts labels by one) that of ``labels[..., 1:]``. A model without a config
(a user's wrapper) is judged by the Hugging Face models inside it, and with several batches or ranks a warning
says that the weighting is a guess (pass ``weight_fn=``).
Then micro-batching and splitting into batches leave the Hessian unchanged. A batch of weight 0 (every label
ignored: its mean loss is 0/0) is skipped.

**Streaming.** A re-iterable ``data`` that is not a list or tuple (a ``DataLoader``) is not held in memory: it
is read once at construction (to count and weigh batches, holding one at a time) and again on every HVP pass.
Every pass sees the same batches in the same order — the loader is iterated with the RNG state (torch, Python,
NumPy, and any ``generator=`` of the loader or its sampler) it had when the operator was built, kept apart from the
model's own frozen randomness — and the global RNG is unchanged afterwards. A loader that still yields different
batches on a later pass (randomness outside those generators) raises. One batch stays in memory (the engine's
fast cached path).

**Losses.** ``loss_fn=None`` is the model's own loss (:func:`model_output_loss`). Loss modules must be
mean-reduced (:func:`resolve_loss_fn` refuses ``reduction="sum"``: the curvature would scale with the batch size
and every threshold comparison would be wrong).
"""
from __future__ import annotations

import math
import random
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ._validate import check_optional_positive_int

__all__ = ["Batch", "BatchSource", "as_batches", "call_model", "model_output_loss", "resolve_loss_fn", "own_loss_batch",
           "token_count", "is_single_batch", "INPUTS_AS", "CurvatureWarning"]

LossFn = Callable[[Any, Any], torch.Tensor]
INPUTS_AS = ("kwargs", "argument")
IGNORE_INDEX = -100


class CurvatureWarning(UserWarning):
    """Something about the inputs makes the curvature less accurate or less meaningful than asked for."""


# ---------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------
def model_output_loss(outputs: Any, targets: Any = None) -> torch.Tensor:
    """``loss_fn`` for models that compute their own loss (Hugging Face models given ``labels``): returns
    ``outputs.loss`` (or ``outputs["loss"]``, or the first element of a tuple). ``loss_fn=None`` means this
    everywhere."""
    loss = getattr(outputs, "loss", None)
    if loss is None and isinstance(outputs, Mapping):
        loss = outputs.get("loss")
    if loss is None and isinstance(outputs, (tuple, list)) and outputs:
        loss = outputs[0]
    if not isinstance(loss, torch.Tensor):
        raise ValueError("loss_fn=None uses the model's own loss, but the model's output has no `loss` "
                         "(pass the labels in the batch, e.g. {'input_ids': ..., 'labels': ...}, or give a loss_fn)")
    return loss


def resolve_loss_fn(loss_fn: LossFn | None) -> LossFn:
    """The loss callable every entry point uses: ``None`` → :func:`model_output_loss` (the model's own loss);
    a loss module or object with a ``reduction`` attribute must have ``reduction == "mean"``.

    Curvature is that of the *mean* loss: a sum-reduced loss has a Hessian N times larger (N = samples or
    tokens in the batch), so λ and every comparison with a stability threshold (2/η, ...) would be off by N.
    """
    if loss_fn is None:
        return model_output_loss
    if isinstance(loss_fn, type):  # nn.CrossEntropyLoss (the class): calling it builds a module, weight=outputs
        raise TypeError(f"loss_fn is the class {loss_fn.__module__}.{loss_fn.__qualname__}, not a loss: pass an "
                        f"instance, {loss_fn.__name__}(), or a function such as torch.nn.functional.cross_entropy; "
                        "expected loss_fn(outputs, targets) -> scalar mean loss")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable (outputs, targets) -> scalar, or None for the model's own loss; "
                        f"got {type(loss_fn).__name__}")
    reduction = getattr(loss_fn, "reduction", None)
    if isinstance(loss_fn, nn.modules.loss._Loss) or reduction is not None:
        if reduction != "mean":
            raise ValueError(
                f"loss_fn {type(loss_fn).__name__} has reduction={reduction!r}: curvature is that of the mean loss "
                "(thresholds such as 2/η compare with the mean loss's Hessian; a sum scales it by the batch size). "
                f"Use {type(loss_fn).__name__}(reduction='mean') (the default).")
    return loss_fn


def own_loss_batch(batch: Any) -> Any:
    """For entry points that call the model themselves with ``loss_fn=None``: a Mapping batch (keyword inputs with
    ``labels``, a ``BatchEncoding``) → ``(inputs_dict, None)`` of its tensors; a list → each batch so; anything
    else unchanged."""
    if isinstance(batch, list):
        return [own_loss_batch(b) for b in batch]
    if isinstance(batch, Mapping) or (hasattr(batch, "keys") and hasattr(batch, "__getitem__")
                                      and not isinstance(batch, (tuple, list))):
        return ({k: batch[k] for k in batch.keys() if isinstance(batch[k], torch.Tensor)}, None)
    return batch


def is_known_mean_loss(loss_fn: LossFn, model: nn.Module | None = None) -> bool:
    """Losses whose reduction is known to be a mean without measuring: a Hugging Face model's own loss (mean over
    non-ignored labels by construction), loss modules (checked by :func:`resolve_loss_fn`) and
    ``torch.nn.functional`` losses called with their defaults. Another model's own loss is measured."""
    if loss_fn is model_output_loss:
        return model is not None and hasattr(model, "config") and hasattr(model, "loss_type")
    if isinstance(loss_fn, nn.modules.loss._Loss):
        return True
    return getattr(loss_fn, "__module__", None) == "torch.nn.functional"


# ---------------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Batch:
    """One batch: the model is called as ``model(*args, **kwargs)`` and the loss as ``loss_fn(out, targets)``.
    ``size`` is its number of samples (the leading dimension), ``weight`` what it counts for in the mean loss
    (default: ``size``)."""

    args: tuple
    kwargs: dict
    targets: Any
    size: int
    weight: float = field(default=-1.0)
    weight_guess: str | None = field(default=None, compare=False)  # why ``weight`` is a guess (None: known)

    def __post_init__(self) -> None:
        if self.weight < 0:
            object.__setattr__(self, "weight", float(self.size))


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(inputs)`` with the batch convention of this package: a Mapping is passed as keyword arguments,
    a tuple/list as positional arguments, anything else as the one argument."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _first_tensor(x: Any) -> torch.Tensor | None:
    if isinstance(x, torch.Tensor):
        return x if x.ndim > 0 else None
    if isinstance(x, Mapping):
        x = list(x.values())
    if isinstance(x, (tuple, list)):
        for item in x:
            t = _first_tensor(item)
            if t is not None:
                return t
    return None


def _is_pair(x: Any) -> bool:
    """``(inputs, targets)``: a 2-sequence whose inputs are a tensor or a Mapping (not two Mappings), or positional
    inputs followed by a tensor or ``None``."""
    if not isinstance(x, (tuple, list)) or len(x) != 2:
        return False
    inputs, targets = x
    if isinstance(inputs, torch.Tensor):
        return True
    if isinstance(inputs, Mapping):
        return not isinstance(targets, Mapping)
    return isinstance(inputs, (tuple, list)) and (targets is None or isinstance(targets, torch.Tensor))


def _is_one_batch(x: Any) -> bool:
    return isinstance(x, Mapping) or _is_pair(x)


def is_single_batch(data: Any) -> bool:
    """True when ``data`` is one batch (a Mapping or an ``(inputs, targets)`` pair), False when it is an
    iterable of batches. A 2-sequence of positional inputs and tuple targets, ``((x, z), (y1, y2))``, is
    indistinguishable from two batches ``[(x1, y1), (x2, y2)]`` and is read as the latter: wrap one batch in a
    list to be explicit."""
    if _is_one_batch(data):
        return True
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], (tuple, list)):
        # ((x, z), (y1, y2)) or [(x1, y1), (x2, y2)]: many batches when every element is itself a batch
        return not all(_is_one_batch(d) for d in data)
    return False


def _labels(raw: Any) -> Any:
    return raw.get("labels") if isinstance(raw, Mapping) else None


def _to_batch(raw: Any, index: int, inputs_as: str = "kwargs") -> Batch:
    if isinstance(raw, Mapping):
        inputs, targets = raw, _labels(raw)
    elif isinstance(raw, (tuple, list)) and len(raw) == 2:
        inputs, targets = raw
    else:
        raise TypeError(f"batch {index} must be a pair (inputs, targets) or a Mapping (a dict batch with its "
                        f"labels inside), got {type(raw).__name__}"
                        + (f" of length {len(raw)}" if isinstance(raw, (tuple, list)) else ""))
    if isinstance(inputs, Mapping):
        args, kwargs = ((dict(inputs),), {}) if inputs_as == "argument" else ((), dict(inputs))
    elif isinstance(inputs, (tuple, list)):
        args, kwargs = tuple(inputs), {}
    else:
        args, kwargs = (inputs,), {}
    ref = targets if isinstance(targets, torch.Tensor) and targets.ndim > 0 else _first_tensor(inputs)
    if ref is None:
        raise TypeError(f"batch {index}: cannot tell its number of samples (no tensor with a batch dimension)")
    size = int(ref.shape[0])
    if size == 0:
        raise ValueError(f"batch {index} is empty (0 samples)")
    return Batch(args, kwargs, targets, size)


def _slice(x: Any, lo: int, hi: int, size: int) -> Any:
    if isinstance(x, torch.Tensor):
        return x[lo:hi] if x.ndim > 0 and x.shape[0] == size else x
    if isinstance(x, Mapping):
        return {k: _slice(v, lo, hi, size) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_slice(v, lo, hi, size) for v in x)
    return x


def _concat_self(x: Any, size: int) -> Any:
    """Every tensor with the batch dimension repeated twice (the same samples, twice): for a mean loss of
    independent samples the loss is unchanged, for a sum it doubles."""
    if isinstance(x, torch.Tensor):
        return torch.cat([x, x]) if x.ndim > 0 and x.shape[0] == size else x
    if isinstance(x, Mapping):
        return {k: _concat_self(v, size) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_concat_self(v, size) for v in x)
    return x


def token_count(labels: torch.Tensor, *, shift: bool = False, ignore_index: int = IGNORE_INDEX) -> int:
    """Number of labels a token-mean loss averages over: ``labels != ignore_index``, of ``labels[..., 1:]`` when
    the loss shifts them (causal LMs predict token t+1 from tokens ≤ t)."""
    if shift:
        labels = labels[..., 1:]
    return int((labels != ignore_index).sum().item())


_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
_DATA_PARALLEL = ("DistributedDataParallel", "DataParallel", "FullyShardedDataParallel")


def _unwrap_known(model: nn.Module) -> nn.Module:
    """Strip the wrappers whose inner model computes the loss: DDP / DataParallel / FSDP (``.module``),
    ``torch.compile`` (``._orig_mod``), PEFT (``get_base_model()``, else ``base_model.model``)."""
    seen: set[int] = set()
    while id(model) not in seen:
        seen.add(id(model))
        inner = None
        if type(model).__name__ in _DATA_PARALLEL and isinstance(getattr(model, "module", None), nn.Module):
            inner = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            inner = model._orig_mod
        elif callable(getattr(model, "get_base_model", None)):
            try:
                inner = model.get_base_model()
            except Exception:  # noqa: BLE001 - not a PEFT model after all
                inner = None
        elif isinstance(getattr(getattr(model, "base_model", None), "model", None), nn.Module) \
                and not hasattr(model, "config"):
            inner = model.base_model.model
        if not isinstance(inner, nn.Module) or inner is model:
            return model
        model = inner
    return model


def _causal_by_name_or_config(model: nn.Module) -> bool:
    if type(model).__name__.endswith(_CAUSAL_SUFFIXES):
        return True
    architectures = getattr(getattr(model, "config", None), "architectures", None) or ()
    return any(isinstance(a, str) and a.endswith(_CAUSAL_SUFFIXES) for a in architectures)


def causal_lm_shift(model: nn.Module | None) -> tuple[bool, str | None]:
    """Whether the model's own loss shifts labels by one (a causal LM predicts token t+1 from tokens ≤ t), and
    ``None`` when that is known, or a sentence saying why it is a guess.

    Known: after unwrapping DDP/FSDP/``torch.compile``/PEFT, a Hugging Face model (it has a ``config``) is a causal
    LM by its class name (``*ForCausalLM``, ``*LMHeadModel``) or its config's ``architectures``. A model without a
    config (a user's wrapper) is guessed from the Hugging Face models inside it."""
    if model is None:
        return False, None
    inner = _unwrap_known(model)
    if _causal_by_name_or_config(inner):
        return True, None
    if hasattr(inner, "config"):
        return False, None
    hf = [(n, m) for n, m in inner.named_modules() if n and hasattr(m, "config") and isinstance(m, nn.Module)]
    causal = [(n, m) for n, m in hf if _causal_by_name_or_config(m)]
    where = f"{type(inner).__name__} is not a Hugging Face model (no config)"
    if causal:
        n, m = causal[0]
        return True, (f"{where}; it holds the causal LM '{n}' ({type(m).__name__}), so its loss is taken to shift "
                      "labels by one (each batch weighs its labels[..., 1:] that are not -100)")
    if hf:
        n, m = hf[0]
        return False, (f"{where}; it holds '{n}' ({type(m).__name__}), not a causal LM, so its loss is taken not to "
                       "shift labels (each batch weighs its labels that are not -100)")
    return False, f"{where}, so its loss is taken to average over every label that is not -100, unshifted"


def is_causal_lm(model: nn.Module | None) -> bool:
    """Whether the model's own loss shifts labels by one (see :func:`causal_lm_shift`, which also says whether
    that is a guess)."""
    return causal_lm_shift(model)[0]


def _own_loss_weight(raw: Any, model: nn.Module | None) -> tuple[float, str | None] | None:
    """The weight of a batch under the model's own token-mean loss: its number of non-ignored labels, and why it
    is a guess (None when known; see :func:`causal_lm_shift`)."""
    labels = None  # HF style: the `labels` entry of a dict batch (or of dict inputs)
    if isinstance(raw, Mapping):
        labels = raw.get("labels")
    elif _is_pair(raw) and isinstance(raw[0], Mapping):
        labels = raw[0].get("labels")
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.ndim == 0:
        return None
    shift, guess = causal_lm_shift(model)
    if labels.ndim < 2:
        shift, guess = False, None
    return float(token_count(labels, shift=shift)), guess


def _data_parallel() -> bool:
    """Whether this process is one of several ranks (each weighs its own batches)."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _weigh(raw: Any, batch: Batch, index: int, weight_fn: Callable[[Any], Any] | None,
           model: nn.Module | None, own_loss: bool) -> Batch:
    if weight_fn is not None:
        w = weight_fn(raw)
        w = float(w.item() if isinstance(w, torch.Tensor) else w)
        if not (math.isfinite(w) and w >= 0):
            raise ValueError(f"weight_fn returned {w} for batch {index}: a batch's weight must be a finite number >= 0")
    elif own_loss:
        weighed = _own_loss_weight(raw, model)
        if weighed is None:
            return batch
        w, guess = weighed
        return Batch(batch.args, batch.kwargs, batch.targets, batch.size, w, guess)
    else:
        return batch
    return Batch(batch.args, batch.kwargs, batch.targets, batch.size, w)


def _split(raw: Any, size: int, max_batch_size: int | None) -> Iterator[Any]:
    if max_batch_size is None or size <= max_batch_size:
        yield raw
        return
    for lo in range(0, size, max_batch_size):
        yield _slice(raw, lo, min(lo + max_batch_size, size), size)


def _tensors(x: Any) -> Iterator[torch.Tensor]:
    """The tensors in a nested batch structure (mappings in sorted-key order, sequences in order)."""
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, Mapping):
        for k in sorted(x, key=str):
            yield from _tensors(x[k])
    elif isinstance(x, (tuple, list)):
        for v in x:
            yield from _tensors(v)


def _fingerprint(batch: Batch) -> tuple:
    """A cheap summary of a batch's tensors (shapes and float64 sums) to check that every pass sees the same."""
    return tuple((tuple(x.shape), float(x.detach().double().sum()) if x.numel() else 0.0)
                 for x in _tensors((batch.args, batch.kwargs, batch.targets)))


def _check_not_meta(batch: Batch, index: int) -> None:
    """Meta tensors have shapes but no values: no loss, let alone curvature, can be computed from them."""
    if any(x.is_meta for x in _tensors((batch.args, batch.kwargs, batch.targets))):
        raise ValueError(f"data: batch {index} holds tensors on the meta device (shapes without values); pass real "
                         "data (e.g. on 'cpu' or 'cuda')")


class _LoaderRNG:
    """The RNG states a loader is iterated with, kept apart from the caller's and the model's: on every pass
    they start from the states captured at construction, and around each ``next()`` they are swapped in and out,
    so the loader sees the same random stream however many model evaluations run between two batches."""

    def __init__(self, data: Any) -> None:
        self.generators = self._generators(data)
        self.captured = self._get()

    @staticmethod
    def _generators(data: Any) -> list[torch.Generator]:
        gens: list[torch.Generator] = []
        for obj in (data, getattr(data, "sampler", None), getattr(getattr(data, "batch_sampler", None), "sampler", None)):
            g = getattr(obj, "generator", None)
            if isinstance(g, torch.Generator) and all(g is not h for h in gens):
                gens.append(g)
        return gens

    def _get(self) -> tuple:
        try:
            import numpy as np
            np_state = np.random.get_state()
        except ImportError:  # pragma: no cover
            np_state = None
        return (torch.get_rng_state(), random.getstate(), np_state, [g.get_state() for g in self.generators])

    def _set(self, state: tuple) -> None:
        torch_state, py_state, np_state, gen_states = state
        torch.set_rng_state(torch_state)
        random.setstate(py_state)
        if np_state is not None:
            import numpy as np
            np.random.set_state(np_state)
        for g, s in zip(self.generators, gen_states):
            g.set_state(s)

    def iterate(self, data: Iterable) -> Iterator[Any]:
        """Yield the items of ``data`` with the loader's RNG swapped in for each step; the caller's states are
        restored at every yield and when the iteration ends or is abandoned."""
        loader_state = self.captured
        caller = self._get()
        self._set(loader_state)
        try:
            it = iter(data)
            loader_state = self._get()
        finally:
            self._set(caller)
        while True:
            caller = self._get()
            self._set(loader_state)
            try:
                item = next(it)
            except StopIteration:
                return
            finally:
                loader_state = self._get()
                self._set(caller)
            yield item


class BatchSource:
    """The batches of an operator: a fixed sequence of :class:`Batch` with ``__iter__`` and ``__len__``.

    Lists, tuples, single batches and one-shot iterators are held in memory; other re-iterables (a
    ``DataLoader``) are streamed: read again on every pass, with the same batches in the same order (see the
    module docstring). ``total_weight`` is Σ_b w_b, ``num_samples`` Σ_b n_b."""

    def __init__(self, data: Any, max_batch_size: int | None = None, *, weight_fn: Callable[[Any], Any] | None = None,
                 inputs_as: str = "kwargs", model: nn.Module | None = None, own_loss: bool = False,
                 stream: bool | None = None) -> None:
        if data is None:
            raise ValueError("data is None: pass one batch (inputs, targets), a dict batch, or an iterable of batches")
        if inputs_as not in INPUTS_AS:
            raise ValueError(f"inputs_as must be one of {INPUTS_AS}, got {inputs_as!r}")
        self.max_batch_size = check_optional_positive_int(max_batch_size, "max_batch_size")
        if weight_fn is not None and not callable(weight_fn):
            raise TypeError(f"weight_fn must be callable batch -> number, got {type(weight_fn).__name__}")
        self.weight_fn = weight_fn
        self.inputs_as = inputs_as
        self.model = model
        self.own_loss = own_loss
        if is_single_batch(data):
            raws: Iterable = [data]
        elif isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
            raise TypeError(f"data must be a batch (inputs, targets), a dict batch, or an iterable of batches, "
                            f"got {type(data).__name__}")
        else:
            raws = data
        # no iter() here: a DataLoader draws its base seed from the global RNG at every iter()
        held = isinstance(raws, (list, tuple))
        reiterable = not held and not isinstance(raws, Iterator)
        self._stream = reiterable if stream is None else bool(stream) and reiterable
        self._data = raws
        self._rng = None if held else _LoaderRNG(raws)
        # the construction pass: count, weigh and fingerprint; when streaming only the first batch is kept
        held_batches: list[Batch] = []
        fingerprints: list[tuple] = []
        self.total_weight, self.num_samples, token_warning = 0.0, 0, False
        #: why the batches' weights (token counts of the model's own loss) are a guess; None when known
        self.weight_guess: str | None = None
        for i, b in enumerate(self._read()):
            _check_not_meta(b, i)
            self.weight_guess = self.weight_guess or b.weight_guess
            if not self._stream or not held_batches:
                held_batches.append(b)
            if self._stream:
                fingerprints.append(_fingerprint(b))
            self.total_weight += b.weight
            self.num_samples += b.size
            token_warning = token_warning or self._has_ignored_labels(b)
        self._count = len(fingerprints) if self._stream else len(held_batches)
        if token_warning and self.weight_fn is None and not self.own_loss and self._count > 1:
            warnings.warn("targets contain ignored labels (-100) and there are several (micro-)batches, each "
                          "weighted by its number of samples; a token-mean loss weighs a batch by its "
                          "non-ignored tokens: pass weight_fn=lambda b: curvature.data.token_count(b[1]) (add "
                          "shift=True if your loss shifts labels) so batches are weighted as the loss averages",
                          CurvatureWarning, stacklevel=4)
        if self.weight_guess and self.weight_fn is None and (self._count > 1 or _data_parallel()):
            warnings.warn(f"the batches are weighted by a guess: {self.weight_guess}. With several (micro-)batches "
                          "or ranks the Hessian of the mean loss depends on these weights: pass weight_fn= to say what "
                          "a batch weighs, e.g. weight_fn=lambda b: curvature.data.token_count(b['labels'], "
                          "shift=True)", CurvatureWarning, stacklevel=4)
        if self._stream and self._count > 1:
            self._fingerprints: list[tuple] | None = fingerprints
            self._batches: list[Batch] | None = None
        else:
            self._fingerprints = None
            self._batches = held_batches
            self._stream = False

    @property
    def streaming(self) -> bool:
        """True when batches are read from the loader on every pass instead of held in memory."""
        return self._stream

    def _raw_items(self) -> Iterator[Any]:
        if self._rng is None:
            return iter(self._data)
        return self._rng.iterate(self._data)

    def _read(self) -> Iterator[Batch]:
        for i, raw in enumerate(self._raw_items()):
            if self.weight_fn is None and not self.own_loss and self.max_batch_size is None:
                yield _to_batch(raw, i, self.inputs_as)
                continue
            size = _to_batch(raw, i, self.inputs_as).size
            for part in _split(raw, size, self.max_batch_size):
                b = _weigh(part, _to_batch(part, i, self.inputs_as), i, self.weight_fn, self.model, self.own_loss)
                if b.weight == 0:
                    continue  # e.g. every label ignored: weighs nothing (and its mean loss would be 0/0)
                yield b

    @staticmethod
    def _has_ignored_labels(b: Batch) -> bool:
        t = b.targets
        return (isinstance(t, torch.Tensor) and not t.is_floating_point() and t.ndim >= 2
                and bool((t == IGNORE_INDEX).any()))

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[Batch]:
        if self._batches is not None:
            return iter(self._batches)
        return self._stream_pass()

    def _stream_pass(self) -> Iterator[Batch]:
        assert self._fingerprints is not None
        n = 0
        for b in self._read():
            if n >= self._count or _fingerprint(b) != self._fingerprints[n]:
                raise RuntimeError(
                    f"the DataLoader yielded a different batch {n} on this pass than at construction: its randomness "
                    "is not reproducible from torch's, Python's and NumPy's RNG states (e.g. a transform with its "
                    "own generator, or a sampler that changes per epoch), so the operator would not be one fixed "
                    "matrix. Pass data=list(loader) to hold the batches in memory.")
            n += 1
            yield b
        if n != self._count:
            raise RuntimeError(f"the DataLoader yielded {n} batches on this pass, {self._count} at construction: "
                               "pass data=list(loader) to hold one fixed set of batches in memory")

    def __getitem__(self, index: int) -> Batch:
        if self._batches is not None:
            return self._batches[index]
        if index < 0:
            index += self._count
        for i, b in enumerate(self):
            if i == index:
                return b
        raise IndexError(index)


def as_batches(data: Any, max_batch_size: int | None = None, *, weight_fn: Callable[[Any], Any] | None = None,
               inputs_as: str = "kwargs", model: nn.Module | None = None, own_loss: bool = False,
               stream: bool | None = None) -> BatchSource:
    """Read ``data`` into a :class:`BatchSource` (see the module docstring for the rules). ``max_batch_size``
    splits larger batches into micro-batches (each weighed on its own, so the mean loss is unchanged for models
    whose samples do not interact). A :class:`BatchSource` is returned as it is."""
    if isinstance(data, BatchSource):
        return data
    return BatchSource(data, max_batch_size, weight_fn=weight_fn, inputs_as=inputs_as, model=model,
                       own_loss=own_loss, stream=stream)


# ---------------------------------------------------------------------------------------------------
# Checks on the loss that need the model (the engine calls them once, at construction)
# ---------------------------------------------------------------------------------------------------
def doubled_batch(batch: Batch, max_samples: int = 8) -> tuple[Batch, Batch] | None:
    """``(s, s+s)``: the first ``max_samples`` samples of ``batch``, and the same samples twice. A mean loss of
    independent samples is the same on both; a sum-reduced one doubles. ``None`` if the batch cannot be sliced."""
    m = min(batch.size, max_samples)
    try:
        small = Batch(_slice(batch.args, 0, m, batch.size), _slice(batch.kwargs, 0, m, batch.size),
                      _slice(batch.targets, 0, m, batch.size), m)
        twice = Batch(_concat_self(small.args, m), _concat_self(small.kwargs, m), _concat_self(small.targets, m), 2 * m)
    except (RuntimeError, TypeError, ValueError):
        return None
    return small, twice


def warn_if_sum_reduced(loss_of: Callable[[Batch], torch.Tensor], batch: Batch) -> float | None:
    """Measure L(s+s)/L(s) on a few samples s of ``batch`` (see :func:`doubled_batch`) and warn when it is ≈ 2,
    the signature of a loss summed over samples. Returns the factor (``None`` when it could not be measured)."""
    pair = doubled_batch(batch)
    if pair is None:
        return None
    try:
        with torch.no_grad():
            small, twice = (float(loss_of(b).detach()) for b in pair)
    except Exception:  # noqa: BLE001 - a model that cannot take the doubled batch: no measurement, no warning
        return None
    if not (math.isfinite(small) and math.isfinite(twice)) or abs(small) < 1e-12:
        return None
    factor = twice / small
    if abs(factor - 2.0) < 0.05:
        warnings.warn(f"the loss looks sum-reduced: on the same samples given twice it is {factor:.3f}x larger "
                      "(a mean loss would be unchanged). Curvature is that of the mean loss, and thresholds (2/η, ...) "
                      "compare with it: divide your loss by the batch size (or use reduction='mean')",
                      CurvatureWarning, stacklevel=4)
    return factor


def warn_if_low_precision_loss(loss: torch.Tensor, dtype: torch.dtype) -> bool:
    """Warn when the loss tensor is computed in a lower precision than the operator's dtype (Hugging Face's
    causal-LM loss casts logits to float32 with ``logits.float()``): λ is then only as accurate as that.
    Returns whether it warned."""
    low = loss.dtype.is_floating_point and dtype.is_floating_point \
        and torch.finfo(loss.dtype).eps > torch.finfo(dtype).eps
    if low:
        warnings.warn(f"the loss is computed in {loss.dtype}, below the operator's {dtype}: curvature is only "
                      f"{loss.dtype}-accurate (Hugging Face causal-LM losses cast logits with .float()). For a "
                      f"{dtype} reference compute the loss on the logits yourself, e.g. loss_fn=lambda out, y: "
                      "F.cross_entropy(out.logits[..., :-1, :].flatten(0, 1).double(), y[..., 1:].flatten())",
                      CurvatureWarning, stacklevel=4)
    return low


def warn_if_low_precision_modules(islands: Mapping[str, str], dtype: torch.dtype, model: nn.Module) -> None:
    """Warn when modules compute below the operator's dtype (``islands``: module name → dtype, found by
    :func:`curvature._exact.low_precision_islands`), naming them: λ is then only as accurate as that dtype."""
    if not islands:
        return
    modules = dict(model.named_modules())
    named = [f"'{n or type(model).__name__}' ({type(modules[n]).__name__}, {d})" if n in modules else f"'{n}' ({d})"
             for n, d in islands.items()]
    shown = ", ".join(named[:5]) + (f" and {len(named) - 5} more" if len(named) > 5 else "")
    warnings.warn(f"{len(named)} module(s) compute below the operator's {dtype} whatever the input dtype: {shown} "
                  "(e.g. Hugging Face RMSNorm/T5LayerNorm cast to float32): curvature is only as accurate as that "
                  "dtype. The names are in the operator's .low_precision_modules and in info['low_precision_modules']."
                  " For a full-precision reference, make those modules compute in the input dtype",
                  CurvatureWarning, stacklevel=4)
