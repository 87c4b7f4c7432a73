"""Hessian operators of a model, and the one place that chooses the HVP route.

:class:`HessianOperator` is ∇²_θ L of a model's mean loss as a :class:`~curvature.linear_operator.LinearOperator`;
:func:`make_engine` picks its engine (exact double backward / forward-over-reverse from :mod:`curvature.hvp`, or
gradient differences from :mod:`curvature.finite_difference`), and ``HessianOperator(...)`` on a fully-sharded
model returns the :class:`~curvature.sharded.ShardedHessianOperator`. :class:`GraphHessianOperator` is the
Hessian on the training step's own graph (the per-step signals). This module sits above the three routes.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from .distributed import (all_reduce_sum, assert_ranks_agree, collective_device, disagreeing, fingerprint,
                          raise_together, ranks_disagree, resolve_process_group, sum_or_fail, world_size)
from .finite_difference import FiniteDifferenceEngine
from .hvp import HVPEngine
from .linear_operator import LinearOperator, MatrixOperator, ParameterOperator, ShiftedOperator
from .sharded import ShardedHessianOperator, is_sharded_model
from .usage import check_batch_argument, check_not_a_batch_half

# LinearOperator, MatrixOperator, ShiftedOperator, ParameterOperator (the protocol) and assert_ranks_agree are
# re-exported from the modules below this one, where they are defined.
__all__ = ["HessianOperator", "GraphHessianOperator", "make_engine", "ENGINE_METHODS", "LinearOperator",
           "MatrixOperator", "ShiftedOperator", "ParameterOperator", "assert_ranks_agree"]

# Every value of HessianOperator(method=...): the exact routes of HVPEngine and the gradient-difference route.
ENGINE_METHODS = ("auto", "reverse_over_reverse", "forward_over_reverse", "finite_difference")


def make_engine(model: torch.nn.Module, loss_fn: Any, data: Any, params: Any = None, *, method: str = "auto",
                fd_order: int = 2, fd_epsilon: float | None = None, **options: Any) -> Any:
    """The HVP engine for ``method``: :class:`~curvature.hvp.HVPEngine` for the exact routes,
    :class:`~curvature.finite_difference.FiniteDifferenceEngine` for ``"finite_difference"``."""
    if method not in ENGINE_METHODS:
        raise ValueError(f"method must be one of {ENGINE_METHODS}, got {method!r}")
    if method == "finite_difference":
        if options.pop("compile", False):
            raise ValueError("compile=True applies to the exact routes (method='auto' or 'forward_over_reverse'), "
                             "not to method='finite_difference'")
        options.pop("chunk_size", None)
        options.pop("cache_graph", None)
        return FiniteDifferenceEngine(model, loss_fn, data, params, order=fd_order, epsilon=fd_epsilon, **options)
    if fd_order != 2 or fd_epsilon is not None:
        raise ValueError(f"fd_order= and fd_epsilon= apply to method='finite_difference' only (method={method!r})")
    return HVPEngine(model, loss_fn, data, params, method=method, **options)


class HessianOperator(ParameterOperator):
    """The Hessian ∇²_θ L of a model's mean loss w.r.t. its trainable parameters, as a linear operator.

    ``L(θ) = Σ_b n_b L_b(θ) / N`` over the batches of ``data`` (each weighted by its number of samples; over
    all ranks' shards when ``torch.distributed`` is initialised). θ is the trainable parameters in
    ``model.named_parameters()`` order (tied parameters once), or the subset named by ``params=``.

    Args:
        model: any ``nn.Module``, analysed in its current mode (train mode = batch statistics for BatchNorm).
        loss_fn: ``loss_fn(outputs, targets) -> scalar``, mean-reduced, or ``None`` for the model's own loss
            (``output.loss``); see :mod:`curvature.data`.
        data: one batch ``(inputs, targets)``, one dict batch (labels inside), or an iterable of batches (a
            DataLoader is streamed, same batches every pass); ``inputs`` a tensor, a tuple (positional) or a
            dict (keyword arguments). Rules in :mod:`curvature.data`.
        params: names (or module prefixes) or tensors narrowing θ, for per-layer curvature.
        method: ``"auto"`` (= ``"reverse_over_reverse"``, the cheapest single HVP in our benchmarks, keeps the
            first-order graph of a single batch), ``"forward_over_reverse"`` (keeps no graph), or
            ``"finite_difference"`` (gradient differences through the model's own forward/backward: FSDP,
            fused kernels, compile, checkpointing; ≈ u^{2/3} accurate, see :mod:`curvature.finite_difference`).
        fd_order, fd_epsilon: for ``"finite_difference"``: 2 (central) or 4 (Richardson); the step length.
        dtype: compute in this dtype (e.g. ``torch.float64`` for validation) on copies of θ and the inputs.
        device: compute on this device (default: where the parameters are).
        seed: seed that freezes the model's randomness (dropout) for this operator; default derived from the
            current RNG state without advancing it.
        max_batch_size: split batches into micro-batches of at most this many samples (bounded memory;
            exact for models whose samples do not interact; refused for train-mode BatchNorm).
        chunk_size: most directions per ``vmap`` call in forward-over-reverse blocks (memory bound).
        distributed: ``None`` = all-reduce when ``torch.distributed`` runs >1 process; ``False`` opts out.
        process_group: the group to all-reduce over (default WORLD).
        weight_fn: ``weight_fn(batch) -> number``, what a batch weighs in the mean loss (default: its samples;
            with ``loss_fn=None`` and HF ``labels``, its non-ignored labels).
        inputs_as: ``"kwargs"`` (a dict is passed as keyword arguments) or ``"argument"`` (as the one positional
            argument, for ``forward(self, batch)``).
        autocast: exact routes compute with autocast off (also inside a ``torch.autocast`` region); ``True``
            keeps the autocast state active at construction for every pass (reduced precision, asked for).
        compile: ``True`` runs each HVP as a ``torch.compile``-d ``jvp(grad(L))`` (forward-over-reverse; exact,
            equal to the uncompiled route up to rounding); compiled once, at construction, and timed
            (``compile_seconds``). Off by default. Not with ``method="reverse_over_reverse"``.

    Nothing about the model changes: parameters, buffers, ``.grad``, ``model.training`` and the RNG state
    are the same after every call.
    """

    def __new__(cls, model: torch.nn.Module | None = None, *args: Any, **kwargs: Any) -> Any:
        """A fully-sharded model (FSDP2 ``fully_shard``: DTensor parameters) gets a
        :class:`~curvature.sharded.ShardedHessianOperator` (finite differences, sharded vectors): double
        backward cannot go through FSDP. Every entry point built on this class (``sharpness``, the tracker,
        the callbacks) then works on sharded models, with solvers that use the ``dot``/``random_block`` hooks."""
        if cls is HessianOperator and model is not None and is_sharded_model(model):
            return ShardedHessianOperator.from_operator_options(model, *args, **kwargs)
        return super().__new__(cls)

    def __init__(self, model: torch.nn.Module, loss_fn: Any, data: Any, params: Any = None, *,
                 method: str = "auto", dtype: torch.dtype | None = None, device: Any = None,
                 seed: int | None = None, max_batch_size: int | None = None, chunk_size: int | None = None,
                 cache_graph: bool = True, fd_order: int = 2, fd_epsilon: float | None = None,
                 distributed: bool | None = None, process_group: Any = None,
                 weight_fn: Any = None, inputs_as: str = "kwargs", autocast: bool = False,
                 compile: bool = False) -> None:  # noqa: A002 - the option's public name
        group = resolve_process_group(distributed, process_group)
        error: BaseException | None = None
        try:
            call = "HessianOperator(model, loss_fn, data, params)"
            if isinstance(params, torch.Tensor) and not params.requires_grad:  # (model, loss_fn, x, y): y in params
                check_not_a_batch_half(params, "params", call, batch_name="data")
            check_batch_argument(data, "data", call)
            self.engine = make_engine(model, loss_fn, data, params, method=method, dtype=dtype, device=device,
                                      seed=seed, max_batch_size=max_batch_size, chunk_size=chunk_size,
                                      cache_graph=cache_graph, fd_order=fd_order, fd_epsilon=fd_epsilon,
                                      allow_empty=group is not None, weight_fn=weight_fn, inputs_as=inputs_as,
                                      autocast=autocast, compile=compile)
        except BaseException as exc:  # a Ctrl-C too: raising alone would leave the others waiting in the all-reduce
            if group is None:
                raise
            error = exc
        # One collective carries the sample count, whether any rank failed, and a fingerprint of what must agree
        # between ranks (parameter count and shapes), so all ranks raise together instead of aborting later.
        fp = 0.0 if error else float(fingerprint(self.engine.numel(), [tuple(s) for s in self.engine.shapes]))
        status = torch.cat([torch.tensor([0.0 if error else float(self.engine.num_samples), 1.0 if error else 0.0],
                                         dtype=torch.float64), ranks_disagree(torch.tensor([fp], dtype=torch.float64))])
        status = status.to(collective_device(group, None if error else self.engine.device))
        all_reduce_sum(status, group)
        if status[1].item() > 0:
            raise_together(error, group, "while building the Hessian operator",
                           hint="non-finite loss/gradient or bad data on its shard?")
        e = self.engine
        if group is not None and disagreeing(status[2:].cpu(), world_size(group)):
            raise ValueError(f"the ranks' models differ: parameter count or shapes are not the same on every rank "
                             f"(this rank: {e.numel()} parameters in {len(e.shapes)} tensors). Build the same model "
                             "on every rank (same params= selection) before measuring curvature")
        super().__init__(e.numel(), e.dtype, e.device)
        self.process_group = group
        #: modules whose forward computes below this operator's dtype (name -> dtype): λ is only that accurate
        self.low_precision_modules: dict[str, str] = dict(getattr(e, "low_precision_modules", {}) or {})
        self.param_names: list[str] = list(e.names)
        self.params: list[torch.Tensor] = list(e.params)
        self.param_shapes: list[torch.Size] = list(e.shapes)
        self._numels = [math.prod(s) for s in e.shapes]
        total = float(status[0].item())  # Σ_b w_b: samples, or tokens / what weight_fn says (maybe fractional)
        self.num_samples = int(total) if total.is_integer() else total
        if self.num_samples == 0:
            raise ValueError("data is empty on every rank: no samples to take curvature over")
        loss = all_reduce_sum(e.loss_sum.clone().reshape(1), group)
        self.loss: float = float(loss.item()) / self.num_samples
        grad = self.flatten([g.clone() for g in e.grad_sum])
        self.gradient: torch.Tensor = all_reduce_sum(grad, group) / self.num_samples
        #: seconds the HVP's ``torch.compile`` took at construction (``compile=True``), else None
        self.compile_seconds: float | None = getattr(e, "compile_seconds", None)

    @property
    def method(self) -> str:
        """The HVP route in use (after any automatic fallback)."""
        return self.engine.method

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        # The local HVP and the all-reduce are one fail-together step: a rank whose HVP raises (e.g. out of
        # memory) sends a failure flag in the same all-reduce, and every rank raises at once.
        HV = sum_or_fail(lambda: self._local_hvp_sum(V), (self.shape[0], V.shape[1]), self.dtype, self.device,
                         self.process_group, "in a Hessian-vector product")
        return HV.div_(self.num_samples)  # HV is a fresh tensor (a cat, or the all-reduce buffer): divide in place

    def loss_and_gradient_at(self, theta: torch.Tensor) -> tuple[float, torch.Tensor]:
        """Mean loss and its gradient at another flat point θ' (same data, same frozen randomness)."""
        def local() -> torch.Tensor:
            loss_sum, grad_sum = self.engine.loss_and_grad_sum(self.unflatten(theta.to(self.device, self.dtype)))
            return torch.cat([torch.tensor([loss_sum], dtype=torch.float64, device=self.device),
                              self.flatten(grad_sum).double()])
        both = sum_or_fail(local, (self.shape[0] + 1,), torch.float64, self.device, self.process_group,
                           "to evaluate the loss and gradient at a point")
        return float(both[0].item()) / self.num_samples, (both[1:] / self.num_samples).to(self.dtype)

    def parameter_vector(self) -> torch.Tensor:
        """θ as one flat vector (a copy, in this operator's dtype/device)."""
        return self.flatten([p.detach() for p in self.engine.primals]).clone()


class GraphHessianOperator(LinearOperator):
    """The Hessian of a loss whose autograd graph already exists — the training step's own forward pass.

    ``H v = ∂(gᵀv)/∂θ`` by a backward pass through the first-order gradient ``g = ∂L/∂θ``. ``g`` is taken from
    the parameters' ``.grad`` when the loop ran ``loss.backward(create_graph=True)`` (then no extra pass is
    needed), else computed once from ``loss`` (whose graph must still exist: call before ``backward()``, or
    use ``backward(retain_graph=True)``). Nothing is accumulated into ``.grad``.

    Args:
        params: the parameters (tensors, or ``(name, tensor)`` pairs) the Hessian is taken with respect to.
        loss: the scalar training loss with its graph, or ``None`` to use the graphs in ``p.grad``.

    Attributes: ``gradient`` (flat, detached), ``loss`` (float, ``nan`` when not given), ``param_names``,
    ``params``, ``method = "training_graph"``. Valid until the parameters change (``optimizer.step()``).
    """

    method = "training_graph"

    def __init__(self, params: Sequence[Any], loss: torch.Tensor | None = None) -> None:
        pairs = [p if isinstance(p, tuple) else (f"param{i}", p) for i, p in enumerate(params)]
        pairs = [(n, p) for n, p in pairs if p.requires_grad]
        if not pairs:
            raise ValueError("GraphHessianOperator needs at least one parameter that requires grad")
        self.param_names = [n for n, _ in pairs]
        self.params = [p for _, p in pairs]
        graphs = [p.grad for p in self.params]
        if all(g is not None and g.requires_grad for g in graphs):
            grads = list(graphs)  # loss.backward(create_graph=True) left the first-order graph in .grad
        elif loss is None:
            raise ValueError("no first-order graph: run loss.backward(create_graph=True) in the training step, "
                             "or pass the loss (with its graph still alive) as loss=")
        else:
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or loss.grad_fn is None:
                raise ValueError("loss must be the scalar training loss with its autograd graph (not detached, "
                                 "not .item())")
            try:
                grads = list(torch.autograd.grad(loss.reshape(()), self.params, create_graph=True,
                                                 retain_graph=True, allow_unused=True))
            except RuntimeError as exc:
                if "backward through the graph a second time" in str(exc) or "freed" in str(exc):
                    raise ValueError("the loss's graph was already freed by backward(): call the tracker before "
                                     "loss.backward(), or use loss.backward(create_graph=True)") from exc
                raise
        self._grads = [torch.zeros_like(p) if g is None else g for p, g in zip(self.params, grads)]
        self._numels = [p.numel() for p in self.params]
        p0 = self.params[0]
        super().__init__(sum(self._numels), p0.dtype, p0.device)
        self.gradient = torch.cat([g.detach().reshape(-1) for g in self._grads]).clone()
        self.loss = float(loss.detach()) if isinstance(loss, torch.Tensor) else math.nan

    def flatten(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat([t.reshape(-1) for t in tensors])

    def unflatten(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [t.view_as(p) for t, p in zip(torch.split(flat, self._numels), self.params)]

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        out = []
        connected = [g.requires_grad for g in self._grads]
        grads = [g for g, c in zip(self._grads, connected) if c]
        for j in range(V.shape[1]):
            tangents = [t for t, c in zip(self.unflatten(V[:, j]), connected) if c]
            hv = torch.autograd.grad(grads, self.params, grad_outputs=tangents, retain_graph=True,
                                     allow_unused=True)
            out.append(torch.cat([(torch.zeros_like(p) if h is None else h).detach().reshape(-1)
                                  for p, h in zip(self.params, hv)]))
        return torch.stack(out, dim=1)
