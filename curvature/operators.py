"""Linear operators on flat parameter vectors, in the shape of ``scipy.sparse.linalg.LinearOperator``.

Every operator here is a symmetric ``n × n`` matrix that is never formed: it is applied to a vector
(``matvec``) or to a block of vectors (``matmat``) and counts how many vectors it was applied to
(``num_hvps``). Solvers (:mod:`curvature.solvers`) and estimators (:mod:`curvature.spectrum`) only use this
protocol, so they work with any operator, not only Hessians.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .distributed import (all_reduce_sum, collective_device, disagreeing, fingerprint, raise_together, ranks_disagree,
                          resolve_process_group, sum_or_fail, world_size)
from .hvp import HVPEngine

__all__ = ["LinearOperator", "MatrixOperator", "ShiftedOperator", "HessianOperator", "make_engine",
           "assert_ranks_agree", "ENGINE_METHODS"]

# Every value of HessianOperator(method=...): the exact routes of HVPEngine and the gradient-difference route.
ENGINE_METHODS = ("auto", "reverse_over_reverse", "forward_over_reverse", "finite_difference")


def make_engine(model: torch.nn.Module, loss_fn: Any, data: Any, params: Any = None, *, method: str = "auto",
                fd_order: int = 2, fd_epsilon: float | None = None, **options: Any) -> Any:
    """The HVP engine for ``method``: :class:`~curvature.hvp.HVPEngine` for the exact routes,
    :class:`~curvature.finite_difference.FiniteDifferenceEngine` for ``"finite_difference"``."""
    if method not in ENGINE_METHODS:
        raise ValueError(f"method must be one of {ENGINE_METHODS}, got {method!r}")
    if method == "finite_difference":
        from .finite_difference import FiniteDifferenceEngine
        options.pop("chunk_size", None)
        options.pop("cache_graph", None)
        return FiniteDifferenceEngine(model, loss_fn, data, params, order=fd_order, epsilon=fd_epsilon, **options)
    if fd_order != 2 or fd_epsilon is not None:
        raise ValueError(f"fd_order= and fd_epsilon= apply to method='finite_difference' only (method={method!r})")
    return HVPEngine(model, loss_fn, data, params, method=method, **options)


def assert_ranks_agree(group: Any | None, **items: Any) -> None:
    """Check in one all-reduce that ``items`` (name → anything with a stable ``repr``, or bytes / a tensor,
    compared by content) are the same on every rank of ``group``; every rank raises the same ``ValueError``
    naming the items that differ. No-op without a group. Call it on every rank (it is a collective).

    Example (the Adam state of :class:`~curvature.optim.PreconditionedHessianOperator`):
    ``assert_ranks_agree(op.inner.process_group, adam_preconditioner=P)``.
    """
    if group is None or not items:
        return
    def content(x: Any) -> Any:
        return x.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes() if isinstance(
            x, torch.Tensor) and x.numel() else x
    values = torch.tensor([float(fingerprint(content(v))) for v in items.values()], dtype=torch.float64)
    summed = ranks_disagree(values).to(collective_device(group))
    all_reduce_sum(summed, group)
    bad = [list(items)[i] for i in disagreeing(summed.cpu(), world_size(group))]
    if bad:
        raise ValueError(f"these differ between the ranks of the process group: {', '.join(bad)}. Every rank must "
                         "measure the same model and optimizer state (e.g. the replicas of one DDP job)")


class LinearOperator:
    """Base class: a symmetric linear map ``R^n -> R^n`` acting on torch tensors.

    Subclasses implement :meth:`_matmat` (``(n, k) -> (n, k)``). The public :meth:`matmat`
    checks shapes, counts ``num_hvps`` (one per column) and calls it.
    """

    shape: tuple[int, int]
    dtype: torch.dtype
    device: torch.device

    def __init__(self, n: int, dtype: torch.dtype, device: torch.device | str) -> None:
        self.shape = (int(n), int(n))
        self.dtype = dtype
        self.device = torch.device(device)
        self.num_hvps = 0

    # -- to implement -------------------------------------------------------------------------
    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # -- protocol --------------------------------------------------------------------------------
    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``A @ V`` for a block ``V`` of shape ``(n, k)``; counts ``k`` operator applications."""
        if V.ndim != 2 or V.shape[0] != self.shape[0]:
            raise ValueError(f"matmat expects a tensor of shape ({self.shape[0]}, k), got {tuple(V.shape)}")
        if V.shape[1] == 0:
            return V.new_zeros(V.shape)
        V = V.to(device=self.device, dtype=self.dtype)
        out = self._matmat(V)
        self.num_hvps += V.shape[1]
        return out

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``A @ v`` for a 1-D tensor of length ``n``."""
        if v.ndim != 1 or v.shape[0] != self.shape[0]:
            raise ValueError(f"matvec expects a 1-D tensor of length {self.shape[0]}, got {tuple(v.shape)}")
        return self.matmat(v[:, None])[:, 0]

    def __matmul__(self, x: torch.Tensor) -> torch.Tensor:
        """``A @ x`` for a 1-D or 2-D tensor; a numpy array gives a numpy array (of its dtype, on the CPU)."""
        if type(x).__module__ == "numpy" and hasattr(x, "dtype"):
            out = self @ torch.from_numpy(x.copy())
            return out.detach().cpu().numpy().astype(x.dtype if x.dtype.kind == "f" else "float64")
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"operator @ x needs a torch.Tensor or numpy array, got {type(x).__name__}")
        if x.ndim == 1:
            return self.matvec(x)
        if x.ndim == 2:
            return self.matmat(x)
        raise ValueError(f"operator @ x needs a 1-D or 2-D tensor, got {x.ndim}-D")

    def to_dense(self) -> torch.Tensor:
        """The full ``n × n`` matrix (``n`` operator applications; for small ``n`` only)."""
        return self.matmat(torch.eye(self.shape[0], dtype=self.dtype, device=self.device))

    def to_scipy(self) -> Any:
        """A ``scipy.sparse.linalg.LinearOperator`` over numpy arrays that calls this operator.

        Use ``eigsh(op.to_scipy(), k, which="LA")`` for the algebraically largest eigenvalues
        (scipy's default ``"LM"`` is the largest *magnitude*).
        """
        from scipy.sparse.linalg import LinearOperator as ScipyLinearOperator

        np_dtype = torch.empty((), dtype=self.dtype).numpy().dtype

        def _mv(x: np.ndarray) -> np.ndarray:
            t = torch.as_tensor(np.ascontiguousarray(x), device=self.device).to(self.dtype)
            if t.ndim == 1:
                return self.matvec(t).detach().cpu().numpy()
            return self.matmat(t.reshape(self.shape[0], -1)).detach().cpu().numpy()

        return ScipyLinearOperator(self.shape, matvec=_mv, rmatvec=_mv, matmat=_mv, dtype=np_dtype)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype}, device={self.device})"


class MatrixOperator(LinearOperator):
    """A dense symmetric matrix behind the operator protocol (tests, small problems, analytic cases)."""

    def __init__(self, matrix: torch.Tensor) -> None:
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"MatrixOperator needs a square matrix, got shape {tuple(matrix.shape)}")
        super().__init__(matrix.shape[0], matrix.dtype, matrix.device)
        self.matrix = matrix

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.matrix @ V


class ShiftedOperator(LinearOperator):
    """``A − σI``: same eigenvectors, eigenvalues shifted by −σ. Counts its own applications (and ``A``'s)."""

    def __init__(self, op: LinearOperator, shift: float) -> None:
        super().__init__(op.shape[0], op.dtype, op.device)
        self.op = op
        self.shift = float(shift)

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.op.matmat(V) - self.shift * V


class ParameterOperator(LinearOperator):
    """An operator on flat vectors of a model's parameters, applied by an HVP engine (``engine.hvp_sum`` on
    per-parameter ``(k, *shape)`` blocks): the layout shared by :class:`HessianOperator` and the sharded operator.
    Subclasses set ``engine``, ``param_shapes`` and ``_numels`` (the numel of each block of a flat vector)."""

    engine: Any
    param_shapes: list[torch.Size]
    _numels: list[int]

    def flatten(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-parameter tensors → one flat vector in this operator's parameter order."""
        return torch.cat([t.reshape(-1) for t in tensors])

    def unflatten(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """A flat vector → views shaped like the parameters."""
        return [t.view(s) for t, s in zip(torch.split(flat, self._numels), self.param_shapes)]

    def _local_hvp_sum(self, V: torch.Tensor) -> torch.Tensor:
        """This process's weighted sum Σ_b w_b ∇²L_b V for an ``(n, k)`` block (before any all-reduce)."""
        k = V.shape[1]
        tangents = [blk.T.reshape(k, *s) for blk, s in zip(torch.split(V, self._numels, dim=0), self.param_shapes)]
        out = self.engine.hvp_sum(tangents)
        return torch.cat([o.reshape(k, -1) for o in out], dim=1).T.contiguous()


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

    Nothing about the model changes: parameters, buffers, ``.grad``, ``model.training`` and the RNG state
    are the same after every call.
    """

    def __new__(cls, model: torch.nn.Module | None = None, *args: Any, **kwargs: Any) -> Any:
        """A fully-sharded model (FSDP2 ``fully_shard``: DTensor parameters) gets a
        :class:`~curvature.sharded.ShardedHessianOperator` (finite differences, sharded vectors): double
        backward cannot go through FSDP. Every entry point built on this class (``sharpness``, the tracker,
        the callbacks) then works on sharded models, with solvers that use the ``dot``/``random_block`` hooks."""
        if cls is HessianOperator and model is not None and any(type(p).__name__ == "DTensor" for p in model.parameters()):
            from .sharded import ShardedHessianOperator
            return ShardedHessianOperator.from_operator_options(model, *args, **kwargs)
        return super().__new__(cls)

    def __init__(self, model: torch.nn.Module, loss_fn: Any, data: Any, params: Any = None, *,
                 method: str = "auto", dtype: torch.dtype | None = None, device: Any = None,
                 seed: int | None = None, max_batch_size: int | None = None, chunk_size: int | None = None,
                 cache_graph: bool = True, fd_order: int = 2, fd_epsilon: float | None = None,
                 distributed: bool | None = None, process_group: Any = None,
                 weight_fn: Any = None, inputs_as: str = "kwargs", autocast: bool = False) -> None:
        group = resolve_process_group(distributed, process_group)
        error: BaseException | None = None
        try:
            self.engine = make_engine(model, loss_fn, data, params, method=method, dtype=dtype, device=device,
                                      seed=seed, max_batch_size=max_batch_size, chunk_size=chunk_size,
                                      cache_graph=cache_graph, fd_order=fd_order, fd_epsilon=fd_epsilon,
                                      allow_empty=group is not None, weight_fn=weight_fn, inputs_as=inputs_as,
                                      autocast=autocast)
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

    @property
    def method(self) -> str:
        """The HVP route in use (after any automatic fallback)."""
        return self.engine.method

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        # The local HVP and the all-reduce are one fail-together step: a rank whose HVP raises (e.g. out of
        # memory) sends a failure flag in the same all-reduce, and every rank raises at once.
        HV = sum_or_fail(lambda: self._local_hvp_sum(V), (self.shape[0], V.shape[1]), self.dtype, self.device,
                         self.process_group, "in a Hessian-vector product")
        return HV / self.num_samples

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
