"""Hessian-vector products of a model's mean loss, exact and batched.

For trainable parameters θ (flattened in ``named_parameters()`` order) and batches b of n_b samples,
the engine applies the Hessian of the dataset's mean loss

    L(θ) = Σ_b n_b L_b(θ) / N,        N = Σ_b n_b,

to a block of k directions V = [v_1 … v_k]. It returns the *local weighted sum* Σ_b n_b ∇²L_b(θ) V; the
operator layer divides by N (after an all-reduce when data is sharded over processes).

Two exact routes (see :mod:`curvature._exact` for why these and not ``jacrev``):

* ``"reverse_over_reverse"`` (double backward): g = ∂L/∂θ is built once with ``create_graph=True`` and
  kept; each block is then one backward through that graph, ``∂(gᵀV)/∂θ``, batched over the k directions
  (``is_grads_batched``). With one batch the first-order graph is built once per operator and reused by
  every HVP. This is the default (``"auto"``): the cheapest single HVP in our benchmarks (1.5–3.0x a
  gradient on CPU), which is what the eigensolvers apply.
* ``"forward_over_reverse"``: ``torch.func.jvp(torch.func.grad(L), (θ,), (v,))``, ``vmap``-ed over the block.
  It keeps no graph between calls (less memory held); a module without forward-mode rules makes it fall back
  to double backward (logged at DEBUG level with the reason).

Randomness inside the model (dropout) is frozen: every forward pass of one engine reseeds the RNG with the
same seed per batch, so the operator is one fixed symmetric matrix, and the caller's RNG state is restored.
"""
from __future__ import annotations

import functools
import logging
import math
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ._compiled import compiled_hvp
from ._exact import (SecondOrderError, StateGuard, autocast_state, backward_context, call_with_state,
                     check_twice_differentiable, explain_missing_derivative, frozen_rng, has_train_mode_batchnorm,
                     low_precision_islands, peek_seed, reseed, second_order_context, unwrap_model)

__all__ = ["Batch", "BatchSource", "HVPEngine", "as_batches", "call_model", "select_parameters", "METHODS"]

log = logging.getLogger("curvature.hvp")

METHODS = ("auto", "reverse_over_reverse", "forward_over_reverse")
LossFn = Callable[[Any, Any], torch.Tensor]


# ---------------------------------------------------------------------------------------------------
# Data: batches, weights, losses live in curvature.data (re-exported here)
# ---------------------------------------------------------------------------------------------------
from .data import (  # noqa: E402
    Batch, BatchSource, as_batches, call_model, is_known_mean_loss, model_output_loss, resolve_loss_fn,
    warn_if_low_precision_loss, warn_if_low_precision_modules, warn_if_sum_reduced,
)
from ._validate import check_device, check_optional_positive_int, check_seed  # noqa: E402


# ---------------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------------
def select_parameters(model: nn.Module, params: Sequence[str | torch.Tensor] | None = None
                      ) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of the parameters curvature is taken with respect to.

    Default: every trainable parameter (``requires_grad=True``) in ``named_parameters()`` order, tied
    parameters once. ``params`` narrows it to a subset given by names or tensors (kept in model order);
    a name may also be a module prefix (``"fc1"`` selects ``fc1.weight`` and ``fc1.bias``).
    """
    named = list(model.named_parameters())
    if params is None:
        chosen = [(n, p) for n, p in named if p.requires_grad]
        if not chosen:
            raise ValueError("the model has no trainable parameters (none with requires_grad=True)")
        return chosen
    if isinstance(params, (str, torch.Tensor)):
        params = [params]
    params = list(params)
    if not params:
        raise ValueError("params= is empty: name at least one parameter")
    by_id = {id(p): n for n, p in named}
    wanted: set[str] = set()
    for item in params:
        if isinstance(item, torch.Tensor):
            if id(item) not in by_id:
                raise ValueError(f"params= contains a tensor of shape {tuple(item.shape)} that is not a parameter "
                                 f"of the model")
            wanted.add(by_id[id(item)])
        elif isinstance(item, str):
            hits = [n for n, _ in named if n == item or n.startswith(item + ".")]
            if not hits:
                names = ", ".join(n for n, _ in named)
                raise ValueError(f"params= names '{item}', which is not a parameter or module of the model; "
                                 f"its parameters are: {names}")
            wanted.update(hits)
        else:
            raise TypeError(f"params= takes names or tensors, got {type(item).__name__}")
    return [(n, p) for n, p in named if n in wanted]


def check_parameters(model: nn.Module, selected: Sequence[tuple[str, torch.Tensor]]) -> None:
    """Refuse a point where curvature is undefined: parameters or buffers on the meta device (shapes without
    values), and selected parameters holding inf/NaN (the loss may stay finite, e.g. behind a saturating tanh,
    and λ would be a meaningless number). Sharded (DTensor) parameters are checked on their local shard."""
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta:
        shown = ", ".join(meta[:4]) + (f", ... ({len(meta)} in all)" if len(meta) > 4 else "")
        raise ValueError(f"the model's parameters/buffers {shown} {'is' if len(meta) == 1 else 'are'} on the meta device (shapes "
                         "without values: a model built under torch.device('meta') or with deferred init); load or "
                         "materialise the weights first (e.g. model.to_empty(device='cpu') then load_state_dict)")
    local = [p.to_local() if hasattr(p, "to_local") else p for _, p in selected]
    bad = torch.stack([(~torch.isfinite(p.detach())).sum() for p in local]).tolist() if local else []
    for (name, p), count in zip(selected, bad):
        if count:
            raise FloatingPointError(f"parameter '{name}' holds {int(count)} non-finite value(s) (inf/NaN) of "
                                     f"{p.numel()}: the Hessian is undefined at this point (training diverged, or "
                                     "the weights are corrupt); measure at finite parameters")


# ---------------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------------
def _guarded(method: Callable) -> Callable:
    """Run an engine method with a fresh :class:`StateGuard` restored on the way out (a second line of defence
    behind the contexts inside, so that one interrupt anywhere cannot leave state switched), and turn
    "no second derivative for op X" into a :class:`SecondOrderError` that names X and the modules using it."""

    @functools.wraps(method)
    def wrapper(self: HVPEngine, *args: Any, **kwargs: Any) -> Any:
        guard = StateGuard()
        try:
            return method(self, guard, *args, **kwargs)
        except (RuntimeError, NotImplementedError) as exc:
            explained = None if isinstance(exc, SecondOrderError) else explain_missing_derivative(
                exc, self.model, self._spy_forward)
            if explained is None:
                raise
            raise explained from exc
        finally:
            guard.restore()

    return wrapper


class HVPEngine:
    """Applies Σ_b n_b ∇²L_b(θ) to blocks of directions given per parameter as ``(k, *shape)`` tensors.

    Construction makes one pass over the data (loss and gradient per batch, checked for NaN/inf); with
    ``"reverse_over_reverse"`` and a single batch that pass keeps the first-order graph for every later HVP.

    The engine is a snapshot of the point it was built at: it copies the selected parameters θ and the buffers
    (one copy of θ in the engine's dtype; none extra when ``dtype``/``device`` already make one), so training
    on afterwards does not change it. Frozen parameters (``requires_grad=False``, e.g. a LoRA base model) are
    not copied; if one is changed in place after construction, the next call raises instead of mixing points.

    ``autocast=False`` (default) computes every forward pass with autocast off, in the engine's dtype, also
    inside a ``torch.autocast`` region; ``autocast=True`` asks for reduced precision explicitly: the autocast
    state active at construction is used for every pass (the operator is then an approximation).
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn | None, data: Any,
                 params: Sequence[str | torch.Tensor] | None = None, *, method: str = "auto",
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 seed: int | None = None, max_batch_size: int | None = None, chunk_size: int | None = None,
                 autocast: bool = False, cache_graph: bool = True, allow_empty: bool = False,
                 weight_fn: Callable[[Any], Any] | None = None, inputs_as: str = "kwargs",
                 compile: bool = False) -> None:  # noqa: A002 - the option's public name
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if not isinstance(compile, bool):
            raise TypeError(f"compile must be True or False, got {compile!r}")
        if compile and method == "reverse_over_reverse":
            raise ValueError("compile=True compiles forward-over-reverse (jvp of grad); it cannot apply to "
                             "method='reverse_over_reverse' (a kept autograd graph). Use method='auto' or "
                             "'forward_over_reverse' with compile=True, or compile=False")
        self.model = unwrap_model(model)
        self.loss_fn = resolve_loss_fn(loss_fn)  # None: the model's own loss; sum-reduced loss modules refused
        seed = None if seed is None else check_seed(seed)
        chunk_size = check_optional_positive_int(chunk_size, "chunk_size")
        device = check_device(device)
        selected = select_parameters(self.model, params)
        check_parameters(self.model, selected)
        self.names = [n for n, _ in selected]
        self.shapes = [p.shape for _, p in selected]
        self.params = [p for _, p in selected]  # the model's own tensors (never written)
        dtypes = {p.dtype for p in self.params}
        if dtype is None and len(dtypes) > 1:
            raise TypeError(f"the selected parameters have mixed dtypes {sorted(map(str, dtypes))}; pass dtype=")
        self.dtype = dtype or self.params[0].dtype
        if not self.dtype.is_floating_point:
            raise TypeError(f"curvature needs floating-point parameters, got {self.dtype}")
        self.device = torch.device(device) if device is not None else self.params[0].device
        if max_batch_size is not None and has_train_mode_batchnorm(self.model):
            raise ValueError("max_batch_size= (micro-batching) would change the function of a model with "
                             "BatchNorm in train mode: its batch statistics couple the samples of a batch. "
                             "Use eval mode, or pass batches of the size you want analysed.")
        # an object with __iter__/__len__; a DataLoader is streamed (read again on every pass)
        self.batches = as_batches(data, max_batch_size, weight_fn=weight_fn, inputs_as=inputs_as, model=self.model,
                                  own_loss=self.loss_fn is model_output_loss)
        if not len(self.batches) and not allow_empty:
            raise ValueError("data is empty: it yielded no batches")
        self.num_samples = self.batches.total_weight  # Σ_b w_b (samples, or what weight_fn / labels say)
        self.seed = peek_seed(self.device) if seed is None else int(seed)
        self.chunk_size = chunk_size
        self.method = "forward_over_reverse" if compile else self._route(method)
        self._autocast = autocast_state() if autocast else None
        self._vmap_ok = True
        self._batched_grad_ok = True
        self._first_pass(cache_graph)
        #: whether HVPs run through ``torch.compile`` (``compile=True``), and the seconds the first compiled HVP took
        #: at construction (compilation included, when there was any to do; None without compile)
        self.compiled = compile
        self.compile_seconds: float | None = None
        self._compiled: Callable[..., tuple[torch.Tensor, ...]] | None = None
        if compile:
            self._compile()

    @staticmethod
    def _route(method: str) -> str:
        """The one place that turns the requested method into the route this engine runs."""
        return "reverse_over_reverse" if method == "auto" else method

    def _compile(self) -> None:
        """Compile the HVP (:mod:`curvature._compiled`) and run it once on a zero direction, timed: a model or
        platform that ``torch.compile`` cannot handle fails here, at construction, with the reason."""
        self._compiled = compiled_hvp(self.model, self.loss_fn)
        zero = [torch.zeros((1, *s), dtype=self.dtype, device=self.device) for s in self.shapes]
        start = time.perf_counter()
        try:
            self.hvp_sum(zero)
        except Exception as exc:
            self._compiled = None
            raise RuntimeError(f"compile=True: torch.compile could not compile this model's Hessian-vector product "
                               f"({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                               "); use compile=False (the default, same numbers)") from exc
        self.compile_seconds = time.perf_counter() - start

    @_guarded
    def _first_pass(self, guard: StateGuard, cache_graph: bool) -> None:
        """Snapshot θ and the buffers; loss and gradient per batch (validated); maybe keep the graph."""
        keep = cache_graph and self.method == "reverse_over_reverse" and len(self.batches) == 1
        self._graph: tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor | None, ...]] | None = None
        self.low_precision_modules: dict[str, str] = {}  # module name -> the dtype it computes in, below ours
        chosen = set(self.names)
        with frozen_rng(self.device, guard), second_order_context(self.model, guard, autocast=self._autocast):
            self._primals = tuple(self._snapshot(p) for p in self.params)
            self._buffers = {n: self._snapshot(b) for n, b in self.model.named_buffers()}
            self._constants = {n: self._cast(p.detach()) for n, p in self.model.named_parameters() if n not in chosen}
            self._live_constants = [(n, p, p._version) for n, p in self.model.named_parameters()
                                    if n not in chosen and _same_memory(self._constants[n], p)]
            loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
            grad_sum = [torch.zeros(s, dtype=self.dtype, device=self.device) for s in self.shapes]
            for i, batch in enumerate(self.batches):
                leaves = tuple(p.detach().requires_grad_() for p in self._primals)
                if i == 0:  # the first forward is spied on: which modules compute below the operator's dtype
                    loss, self.low_precision_modules = low_precision_islands(
                        self.model, self.dtype, functools.partial(self._loss, leaves, i, batch, guard), guard)
                else:
                    loss = self._loss(leaves, i, batch, guard)
                self._check_finite_loss(loss, i)
                if i == 0:
                    check_twice_differentiable(loss, self.model, functools.partial(
                        self._loss, tuple(p.detach().requires_grad_() for p in self._primals), i, batch, guard))
                    self._check_loss(loss, batch, guard)
                grads = torch.autograd.grad(loss, leaves, create_graph=keep, allow_unused=True)
                grads = tuple(torch.zeros_like(p) if g is None else g for g, p in zip(grads, leaves))
                self._check_finite_grad(grads, i)
                loss_sum += loss.detach().double() * batch.weight
                for acc, g in zip(grad_sum, grads):
                    acc.add_(g.detach(), alpha=batch.weight)
                if keep:
                    self._graph = (leaves, grads)
        self.loss_sum = loss_sum
        self.grad_sum = grad_sum

    def _spy_forward(self) -> None:
        """One forward pass on the first batch (used to find the module that calls an op in an error message)."""
        guard = StateGuard()
        try:
            with frozen_rng(self.device, guard), second_order_context(self.model, guard, autocast=self._autocast):
                self._loss(tuple(p.detach() for p in self._primals), 0, self.batches[0], guard)
        finally:
            guard.restore()

    # -- the function ---------------------------------------------------------------------------------
    def _cast(self, t: torch.Tensor) -> torch.Tensor:
        if t.is_inference():  # made inside torch.inference_mode(): autograd cannot record it; copy it
            t = t.clone()
        if t.is_floating_point():
            return t.to(device=self.device, dtype=self.dtype)
        return t.to(device=self.device)

    def _snapshot(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` in the engine's dtype/device, never sharing memory with the live tensor."""
        copy = self._cast(t.detach())
        return copy.clone() if _same_memory(copy, t) else copy

    def _check_point_unchanged(self) -> None:
        changed = [n for n, p, version in self._live_constants if p._version != version]
        if changed:
            raise RuntimeError(f"frozen parameter(s) {', '.join(changed)} changed in place since this operator was "
                               "built (it holds them by reference, not as a copy): build a new operator at the new "
                               "point")

    def _move(self, x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return self._cast(x)
        if isinstance(x, dict):
            return {k: self._move(v) for k, v in x.items()}
        if isinstance(x, (tuple, list)):
            return type(x)(self._move(v) for v in x)
        return x

    def _loss(self, primals: Sequence[torch.Tensor], index: int, batch: Batch, guard: StateGuard) -> torch.Tensor:
        """L_b(θ) with θ = ``primals``; reseeds the RNG so every evaluation of batch b draws the same masks."""
        reseed(self.seed + index, self.device)
        state = dict(self._constants)
        state.update({n: b.clone() for n, b in self._buffers.items()})  # in-place buffer writes hit copies
        state.update(zip(self.names, primals))
        out = call_with_state(self.model, state, self._move(batch.args), self._move(batch.kwargs), guard)
        loss = self.loss_fn(out, self._move(batch.targets))
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(f"loss_fn must return a scalar (mean-reduced) loss, got {shape}")
        return loss.reshape(())

    def _check_loss(self, loss: torch.Tensor, batch: Batch, guard: StateGuard) -> None:
        """Once per engine: warn on a loss computed below the operator's precision, and on a loss that scales
        with the batch size (measured on a few samples, for callables whose reduction is not known)."""
        self.loss_dtype = loss.dtype
        low_loss = warn_if_low_precision_loss(loss, self.dtype)
        if not (low_loss and set(self.low_precision_modules) <= {""}):  # the model's own loss cast: warned once above
            warn_if_low_precision_modules(self.low_precision_modules, self.dtype, self.model)
        # the model's own loss (loss_fn=None) is the model's property: remembered per model
        owner = self.model if self.loss_fn is model_output_loss else self.loss_fn
        if not is_known_mean_loss(self.loss_fn, self.model) and not _seen_mean_reduced(owner):
            factor = warn_if_sum_reduced(lambda b: self._loss(self._primals, 0, b, guard), batch)
            if factor is not None and abs(factor - 2.0) >= 0.05:
                _remember_mean_reduced(owner)

    def _check_finite_loss(self, loss: torch.Tensor, index: int) -> None:
        if not torch.isfinite(loss.detach()).item():
            raise FloatingPointError(f"the loss is {loss.item()} at batch {index} of {len(self.batches)}: "
                                     "curvature is undefined there")

    def _check_finite_grad(self, grads: Sequence[torch.Tensor], index: int) -> None:
        for name, g in zip(self.names, grads):
            if not torch.isfinite(g.detach()).all().item():
                raise FloatingPointError(f"the gradient is not finite (NaN/inf) in parameter '{name}' "
                                         f"at batch {index} of {len(self.batches)}")

    # -- HVPs -----------------------------------------------------------------------------------------
    @_guarded
    def hvp_sum(self, guard: StateGuard, tangents: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Σ_b n_b ∇²L_b(θ) V for V given per parameter as ``(k, *shape)`` tensors; same layout out."""
        self._check_point_unchanged()
        if self._graph is not None:
            # Hot path: one backward through the kept first-order graph. No forward runs, so neither the RNG nor
            # the model is involved; only inference mode and autocast are switched (the graph was built inside
            # the second-order context).
            leaves, grads = self._graph
            with backward_context(guard, autocast=self._autocast):
                out = self._double_backward(leaves, grads, tangents)
                torch._foreach_mul_(out, self.batches[0].weight)  # one call; the same products as h.mul_(w) each
                return out
        out: list[torch.Tensor] | None = None
        with frozen_rng(self.device, guard), second_order_context(self.model, guard, autocast=self._autocast):
            for i, batch in enumerate(self.batches):
                hv = self._hvp_batch(tangents, i, batch, guard)
                if out is None:
                    out = [h.mul(batch.weight) for h in hv]
                else:
                    for acc, h in zip(out, hv):
                        acc.add_(h, alpha=batch.weight)
            if out is None:  # no batches on this rank (distributed): contributes zero
                k = tangents[0].shape[0]
                out = [torch.zeros((k, *s), dtype=self.dtype, device=self.device) for s in self.shapes]
        return out

    def _hvp_batch(self, tangents: Sequence[torch.Tensor], index: int, batch: Batch, guard: StateGuard
                   ) -> Sequence[torch.Tensor]:
        if self._compiled is not None:
            return self._compiled_batch(tangents, index, batch)
        if self.method == "forward_over_reverse":
            try:
                return self._forward_over_reverse(tangents, index, batch, guard)
            except (RuntimeError, NotImplementedError) as exc:
                self._raise_unless_forward_ad_failed(exc, index, batch, guard)
                log.debug("forward-over-reverse failed (%s: %s); falling back to double backward for this "
                          "operator", type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
                self.method = "reverse_over_reverse"
        leaves = tuple(p.detach().requires_grad_() for p in self._primals)
        loss = self._loss(leaves, index, batch, guard)
        grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
        return self._double_backward(leaves, grads, tangents)

    def _compiled_batch(self, tangents: Sequence[torch.Tensor], index: int, batch: Batch) -> list[torch.Tensor]:
        """H_b V by the compiled jvp(grad(L_b)), one direction per call (the RNG reseeded per call, as in
        :meth:`_loss`, so every call of batch b draws the same dropout masks; compiled code draws other masks
        than eager code, so a dropout model's operator is another fixed operator than the uncompiled one's)."""
        assert self._compiled is not None
        others = dict(self._constants)
        others.update({n: b.clone() for n, b in self._buffers.items()})
        args, kwargs, targets = self._move(batch.args), self._move(batch.kwargs), self._move(batch.targets)
        names = tuple(self.names)
        cols = []
        for c in range(tangents[0].shape[0]):
            reseed(self.seed + index, self.device)
            cols.append(self._compiled(names, self._primals, tuple(t[c] for t in tangents), others, args,
                                       kwargs, targets))
        return [torch.stack([col[j] for col in cols]).detach() for j in range(len(self.shapes))]

    def _raise_unless_forward_ad_failed(self, exc: BaseException, index: int, batch: Batch,
                                        guard: StateGuard) -> None:
        """Re-raise ``exc`` if it is not a failure of forward-mode AD / torch.func itself: probe the same loss
        with plain autograd; if that fails too, the error is the model's or the loss_fn's own."""
        leaves = tuple(p.detach().requires_grad_() for p in self._primals)
        try:
            self._loss(leaves, index, batch, guard)
        except Exception:
            raise exc from None

    def _double_backward(self, leaves: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None],
                         tangents: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """∂(Σ_i g_iᵀ v_i)/∂θ for each of the k directions; a gradient entry with no graph (g constant in θ,
        e.g. an unused parameter) contributes nothing."""
        k = tangents[0].shape[0]
        live = [j for j, g in enumerate(grads) if g is not None and g.requires_grad]
        outs = [grads[j] for j in live]

        def once(vs: Sequence[torch.Tensor], batched: bool) -> Sequence[torch.Tensor | None]:
            if not live:
                return [None] * len(leaves)
            return torch.autograd.grad(outs, leaves, grad_outputs=[vs[j] for j in live], retain_graph=True,
                                       allow_unused=True, is_grads_batched=batched)

        def zeros(j: int) -> torch.Tensor:
            return torch.zeros((k, *self.shapes[j]), dtype=self.dtype, device=self.device)

        if k == 1:
            res = once([t[0] for t in tangents], False)
            return [zeros(j) if r is None else r.detach().unsqueeze(0) for j, r in enumerate(res)]
        if self._batched_grad_ok:
            try:
                res = once(tangents, True)
            except RuntimeError as exc:  # e.g. ops without a batching rule for their double backward
                log.debug("batched double backward failed (%s); looping over the block", str(exc).splitlines()[0])
                self._batched_grad_ok = False
            else:
                return [zeros(j) if r is None else r.detach() for j, r in enumerate(res)]
        result = [zeros(j) for j in range(len(self.shapes))]
        for c in range(k):
            for j, r in enumerate(once([t[c] for t in tangents], False)):
                if r is not None:
                    result[j][c] = r.detach()
        return result

    def _forward_over_reverse(self, tangents: Sequence[torch.Tensor], index: int, batch: Batch, guard: StateGuard
                              ) -> Sequence[torch.Tensor]:
        def loss_of(primals: tuple[torch.Tensor, ...]) -> torch.Tensor:
            return self._loss(primals, index, batch, guard)

        grad_fn = torch.func.grad(loss_of)

        def hvp_one(tangent: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            return torch.func.jvp(grad_fn, (self._primals,), (tangent,))[1]

        k = tangents[0].shape[0]
        if k > 1 and self._vmap_ok:
            try:
                res = torch.func.vmap(hvp_one, randomness="same", chunk_size=self.chunk_size)(tuple(tangents))
                return [r.detach() for r in res]
            except (RuntimeError, NotImplementedError, ValueError) as exc:
                text = str(exc).lower()
                if ("forward" in text and "ad" in text) or not ("vmap" in text or "batch" in text):
                    raise  # not a limitation of vmap (e.g. the loss_fn's own error): no silent retry
                log.debug("vmap over forward-over-reverse failed (%s); looping over the block",
                          str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                self._vmap_ok = False
        cols = [hvp_one(tuple(t[c] for t in tangents)) for c in range(k)]
        return [torch.stack([col[j] for col in cols]).detach() for j in range(len(self.shapes))]

    @_guarded
    def loss_and_grad_sum(self, guard: StateGuard, primals: Sequence[torch.Tensor]
                          ) -> tuple[float, list[torch.Tensor]]:
        """Σ_b n_b L_b and Σ_b n_b ∇L_b at another point θ' (same batches, same frozen randomness).
        Used by finite-difference checks; does not touch the model."""
        self._check_point_unchanged()
        loss_sum = 0.0
        with frozen_rng(self.device, guard), second_order_context(self.model, guard, autocast=self._autocast):
            grad_sum = [torch.zeros(s, dtype=self.dtype, device=self.device) for s in self.shapes]
            for i, batch in enumerate(self.batches):
                leaves = tuple(self._cast(p.detach()).requires_grad_() for p in primals)
                loss = self._loss(leaves, i, batch, guard)
                grads = torch.autograd.grad(loss, leaves, allow_unused=True)
                loss_sum += float(loss.detach()) * batch.weight
                for acc, g in zip(grad_sum, grads):
                    if g is not None:
                        acc.add_(g, alpha=batch.weight)
        return loss_sum, grad_sum

    @property
    def primals(self) -> tuple[torch.Tensor, ...]:
        """θ as the engine sees it (detached copies in the engine's dtype/device)."""
        return self._primals

    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)


#: Loss callables this process has measured as mean-reduced: a tracker builds an operator per row, and the two
#: extra forward passes of the check are paid once, not on every row (a sum-reduced one is checked, and warned
#: about, every time).
_MEAN_REDUCED: "weakref.WeakSet[Any]" = weakref.WeakSet()


def _seen_mean_reduced(loss_fn: Any) -> bool:
    try:
        return loss_fn in _MEAN_REDUCED
    except TypeError:  # not weak-referenceable
        return False


def _remember_mean_reduced(loss_fn: Any) -> None:
    try:
        _MEAN_REDUCED.add(loss_fn)
    except TypeError:
        pass


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` share storage (e.g. ``b.to(dtype)`` when the dtype already matched)."""
    if a.is_sparse or b.is_sparse or a.device != b.device:
        return False
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
