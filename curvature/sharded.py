"""Curvature of fully-sharded models (FSDP2 ``fully_shard``): sharded vectors, finite-difference HVPs.

With FSDP each rank r stores a shard θ_r of every parameter (a ``DTensor`` with ``Shard(0)``). Double
backward cannot go through FSDP (its all-gathers and reduce-scatters sit outside the autograd graph), so the
HVP is the finite-difference one of :mod:`curvature.finite_difference`, through FSDP's own forward and
backward:

    (Hv)_r ≈ (G_r(θ + εv) − G_r(θ − εv)) / 2ε,

where every rank perturbs its own shard by ε·v_r (in place, in the shard storage FSDP all-gathers from; put
back bitwise after each evaluation), FSDP all-gathers the perturbed parameters, and its backward
reduce-scatters the gradient, so G_r is this rank's shard of the global gradient. Nothing of size n is ever
replicated: a direction, an eigenvector and every solver basis vector is held as this rank's slice
(``shape == (n_local, n_local)``; ``global_n`` = n), which is the point at 7B parameters (28 GB per float32
vector). ε uses the global ‖θ‖/√n and ‖v‖ (one scalar all-reduce per HVP).

Weighting: FSDP's backward averages the ranks' gradients; each rank back-propagates n_b·L_b and the shard
gradient is multiplied by R, so the operator is the Hessian of the global sample-weighted mean loss
Σ_r Σ_b n_b L_b / N, as for data parallelism. Every rank must pass the same number of batches (each batch is
one FSDP forward/backward, a collective); this is checked at construction.

Solvers reach the sharded vectors through two operator hooks (``curvature.solvers._common``): ``op.dot(X, Y)``
= Σ_r X_rᵀ Y_r (one all-reduce of a k×m matrix) and ``op.random_block(k, seed, dtype)`` = this rank's rows of
one global seeded random block (the same global block whatever the number of ranks).
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from .data import as_batches, model_output_loss, resolve_loss_fn
from .distributed import all_reduce_sum, disagreeing, ranks_disagree, sum_or_fail
from .finite_difference import FiniteDifferenceEngine, is_dtensor, local_tensor
from .hvp import check_parameters, select_parameters
from .linear_operator import LinearOperator, ParameterOperator

__all__ = ["ShardedHessianOperator", "ShardedPreconditionedOperator", "is_sharded_model", "sharded_lanczos"]


def is_sharded_model(model: torch.nn.Module) -> bool:
    """True when some parameter is a ``DTensor`` (FSDP2 ``fully_shard``, tensor parallelism)."""
    return any(is_dtensor(p) for p in model.parameters())


class ShardedHessianOperator(ParameterOperator):
    """The Hessian of a fully-sharded model's global mean loss, acting on rank-local slices of vectors.

    Args:
        model: a model whose parameters are FSDP2 ``DTensor`` shards (``fully_shard``), in its current mode.
        loss_fn, data, params, seed, max_batch_size: as for :class:`~curvature.operators.HessianOperator`
            (``data`` is this rank's shard of the data, the same number of batches on every rank).
        fd_order, fd_epsilon: the finite-difference order (2 or 4) and step (see
            :mod:`curvature.finite_difference`).
        process_group: the group FSDP shards over (default WORLD).

    Attributes: ``global_n``, ``loss`` (global mean), ``gradient`` (this rank's slice), ``param_names``,
    ``num_samples`` (global). Nothing about the model changes (shards bitwise, buffers, ``.grad``, RNG).
    """

    def __init__(self, model: torch.nn.Module, loss_fn: Any, data: Any, params: Any = None, *,
                 seed: int | None = None, max_batch_size: int | None = None, fd_order: int = 2,
                 fd_epsilon: float | None = None, process_group: Any = None, weight_fn: Any = None,
                 inputs_as: str = "kwargs") -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("ShardedHessianOperator needs torch.distributed initialised (FSDP runs under it)")
        if not is_sharded_model(model):
            raise ValueError("the model has no sharded (DTensor) parameters; use HessianOperator (exact routes, "
                             "data parallel) for replicated models")
        group = process_group if process_group is not None else dist.group.WORLD
        self.process_group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if seed is None:  # every rank must freeze the same randomness: agree on rank 0's seed
            s = torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(torch.initial_seed() % 2**62))
            dist.broadcast(s, src=dist.get_global_rank(group, 0), group=group)
            seed = int(s.item())
        prepared: list[Any] = []

        def batch_count() -> torch.Tensor:  # a rank whose data fails (or that is interrupted) fails every rank
            check_parameters(model, select_parameters(model, params))  # e.g. inf in this rank's shard only
            prepared.append(as_batches(data, max_batch_size, weight_fn=weight_fn, inputs_as=inputs_as, model=model,
                                       own_loss=resolve_loss_fn(loss_fn) is model_output_loss))
            return ranks_disagree(torch.tensor([float(len(prepared[0]))], dtype=torch.float64))
        counts = sum_or_fail(batch_count, (2,), torch.float64, torch.device("cpu"), group,
                             "while preparing its data for the sharded operator")
        data = prepared[0]
        batches_probe = len(data)
        if disagreeing(counts, self.world):
            raise ValueError(f"every rank must pass the same number of batches to a sharded operator (each batch "
                             f"is one FSDP forward/backward, a collective); this rank has {batches_probe}")

        def sum_over_shards(t: torch.Tensor) -> torch.Tensor:
            return all_reduce_sum(t.clone(), group)

        self.engine = FiniteDifferenceEngine(model, loss_fn, data, params, seed=seed,
                                             order=fd_order, epsilon=fd_epsilon, gradient="backward",
                                             sum_over_shards=sum_over_shards, gradient_world=self.world)
        e = self.engine
        super().__init__(e.numel(), e.dtype, e.device)
        self.param_names: list[str] = list(e.names)
        self.params: list[torch.Tensor] = list(e.params)
        self.param_shapes: list[torch.Size] = list(e.shapes)  # local shard shapes
        self.global_shapes: list[torch.Size] = [p.shape for p in e.params]
        self._numels = [math.prod(s) for s in e.shapes]
        totals = all_reduce_sum(torch.tensor([float(e.numel()), float(e.num_samples)], dtype=torch.float64), group)
        self.global_n = int(totals[0].item())
        self.num_samples = float(totals[1].item())
        loss = all_reduce_sum(e.loss_sum.clone().reshape(1), group)
        self.loss: float = float(loss.item()) / self.num_samples
        self.gradient: torch.Tensor = self.flatten(e.grad_sum) / self.num_samples

    @classmethod
    def from_operator_options(cls, model: torch.nn.Module, loss_fn: Any, data: Any, params: Any = None, *,
                              method: str = "auto", dtype: torch.dtype | None = None, device: Any = None,
                              seed: int | None = None, max_batch_size: int | None = None,
                              chunk_size: int | None = None, cache_graph: bool = True, fd_order: int = 2,
                              fd_epsilon: float | None = None, distributed: bool | None = None,
                              process_group: Any = None, weight_fn: Any = None, inputs_as: str = "kwargs",
                              autocast: bool = False, compile: bool = False) -> "ShardedHessianOperator":  # noqa: A002
        """Build from :class:`~curvature.operators.HessianOperator`'s options (what ``HessianOperator(model,
        ...)`` does for a sharded model); options that cannot apply to sharded parameters are refused."""
        if method not in ("auto", "finite_difference"):
            raise ValueError(f"method={method!r} cannot run on a fully-sharded (FSDP) model: double backward does "
                             "not go through FSDP's collectives. Use method='finite_difference' (the default here)")
        if compile:
            raise ValueError("compile=True cannot apply to a fully-sharded (FSDP) model: it compiles an exact HVP "
                             "(jvp of grad), which does not go through FSDP's collectives. Leave compile=False")
        if distributed is False:
            raise ValueError("distributed=False cannot apply to a fully-sharded model: its parameters live on all ranks")
        first = next(model.parameters())
        if (dtype is not None and dtype != first.dtype) or (device is not None and torch.device(device) != first.device):
            raise ValueError("dtype=/device= other than the sharded parameters' are not supported for FSDP models "
                             "(a full copy of the model would be needed); measure in the parameters' own dtype")
        return cls(model, loss_fn, data, params, seed=seed, max_batch_size=max_batch_size, fd_order=fd_order,
                   fd_epsilon=fd_epsilon, process_group=process_group, weight_fn=weight_fn, inputs_as=inputs_as)

    @property
    def method(self) -> str:
        return "finite_difference"

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        # Every rank takes part in every FSDP collective of the HVP (the gradients come back reduce-scattered, so
        # no all-reduce of our own); a rank that fails inside them cannot be rescued (the others are in FSDP's
        # all-gather).
        return self._local_hvp_sum(V) / self.num_samples

    # -- solver hooks --------------------------------------------------------------------------------
    def dot(self, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        """Xᵀ Y over the global vectors: Σ_r X_rᵀ Y_r (one all-reduce of the small result); 1-D inputs give
        a 0-d tensor."""
        local = torch.dot(X, Y) if X.ndim == 1 and Y.ndim == 1 else X.T @ Y
        return all_reduce_sum(local.contiguous(), self.process_group)

    def random_block(self, k: int, seed: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """This rank's rows of one global standard-normal ``(global_n, k)`` block, drawn per parameter (in order,
        each as its full global ``(numel, k)`` block from one CPU generator seeded with ``seed``) and sliced to
        the rows of this rank's shard: the same global block for any number of ranks."""
        dtype = dtype or self.dtype
        gen = torch.Generator().manual_seed(int(seed))
        gen_dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
        parts = []
        for p, local_shape, global_shape in zip(self.params, self.param_shapes, self.global_shapes):
            full = torch.randn(math.prod(global_shape), k, generator=gen, dtype=gen_dtype)
            lo, hi = self._row_range(global_shape, local_shape)
            row = math.prod(global_shape[1:]) if len(global_shape) > 1 else 1
            parts.append(full[lo * row:hi * row])
        return torch.cat(parts).to(device=self.device, dtype=dtype)

    def _row_range(self, global_shape: torch.Size, local_shape: torch.Size) -> tuple[int, int]:
        """Rows [lo, hi) of dim 0 this rank holds under FSDP2's ``Shard(0)`` (``torch.chunk`` layout)."""
        d0 = global_shape[0] if len(global_shape) else 1
        chunk = -(-d0 // self.world)
        lo = min(self.rank * chunk, d0)
        hi = min(lo + chunk, d0)
        if (local_shape[0] if len(local_shape) else 1) != hi - lo:
            raise NotImplementedError(f"unexpected shard layout: global {tuple(global_shape)}, local "
                                      f"{tuple(local_shape)} on rank {self.rank} of {self.world}")
        return lo, hi

    def gather(self, V: torch.Tensor) -> torch.Tensor:
        """The global ``(global_n, k)`` block from every rank's slice (for small models, checks and export)."""
        V = V.reshape(V.shape[0], -1)
        k = V.shape[1]
        pieces = torch.split(V, self._numels, dim=0)
        out = []
        for piece, gshape in zip(pieces, self.global_shapes):
            sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world)]
            dist.all_gather(sizes, torch.tensor([piece.shape[0]], dtype=torch.int64), group=self.process_group)
            cap = int(max(int(s.item()) for s in sizes))
            padded = torch.zeros(cap, k, dtype=V.dtype, device=V.device)
            padded[:piece.shape[0]] = piece
            got = [torch.zeros_like(padded) for _ in range(self.world)]
            dist.all_gather(got, padded, group=self.process_group)
            out.append(torch.cat([g[:int(s.item())] for g, s in zip(got, sizes)]))
        return torch.cat(out)

    def parameter_vector(self) -> torch.Tensor:
        """This rank's slice of θ (a copy)."""
        return self.flatten(self.engine.primals).clone()


def sharded_lanczos(op: "ShardedHessianOperator", k: int, steps: int = 60, seed: int = 0) -> tuple[torch.Tensor, int]:
    """Top-k eigenvalues of a sharded operator: Lanczos with full reorthogonalisation (twice) for ``steps``
    steps, every inner product through ``op.dot`` and the start through ``op.random_block``; returns
    ``(eigenvalues, basis size)``. The basis is held sharded (``steps × n_local`` per rank). A minimal stand-in
    until :mod:`curvature.solvers` take inner products through the operator hooks (then use ``lanczos``)."""
    q = op.random_block(1, seed, op.dtype)
    Q = [q / op.dot(q, q).sqrt()]
    alphas, betas = [], []
    for j in range(steps):
        w = op.matmat(Q[-1])
        alphas.append(float(op.dot(Q[-1], w)))
        Qm = torch.cat(Q, dim=1)
        for _ in range(2):
            w = w - Qm @ op.dot(Qm, w)
        beta = float(op.dot(w, w).sqrt())
        if j == steps - 1 or beta < 1e-10:
            break
        betas.append(beta)
        Q.append(w / beta)
    T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if betas:
        off = torch.tensor(betas, dtype=torch.float64)
        T = T + torch.diag(off, 1) + torch.diag(off, -1)
    return torch.linalg.eigvalsh(T).flip(0)[:k], len(Q)


def clip_factor(grad_norm: float, max_grad_norm: float | None) -> float:
    """The factor ``torch.nn.utils.clip_grad_norm_`` (and so the Hugging Face Trainer) scales a gradient of norm
    ``grad_norm`` by: min(1, max_grad_norm / (‖g‖ + 1e-6)); 1 when ``max_grad_norm`` is None or ≤ 0 (no clipping)."""
    if max_grad_norm is None or max_grad_norm <= 0:
        return 1.0
    return min(1.0, float(max_grad_norm) / (grad_norm + 1e-6))


class ShardedPreconditionedOperator(LinearOperator):
    """P^{-1/2} H P^{-1/2} for a fully-sharded model and its Adam/AdamW, with P read shard by shard from the
    optimizer's own (sharded) state — the formula of :class:`curvature.optim.PreconditionedHessianOperator`:

        P = (1−β₁ᵗ)·(√(v/(1−β₂ᵗ)) + ε)·(η₀/η_g),

    v = ``exp_avg_sq`` (``max_exp_avg_sq`` with amsgrad), t = ``step``; with ``lookahead=True`` (default) the
    P of the step about to be taken, v ← β₂v + (1−β₂)g², t ← t+1, from this rank's slice of the global gradient
    g (plus wd·θ for Adam's L2 decay). Each rank builds only its slice of P. ``inner`` is the
    :class:`ShardedHessianOperator`; ``dot``/``random_block``/``gather`` are its hooks.
    """

    def __init__(self, model: torch.nn.Module, loss_fn: Any, data: Any, optimizer: Any, params: Any = None, *,
                 lookahead: bool = True, inner: ShardedHessianOperator | None = None,
                 max_grad_norm: float | None = None, **options: Any) -> None:
        if inner is None:
            inner = ShardedHessianOperator.from_operator_options(model, loss_fn, data, params, **options)
        elif options or params is not None:
            raise TypeError("pass either inner= (an existing ShardedHessianOperator) or params/options, not both")
        super().__init__(inner.shape[0], inner.dtype, inner.device)
        opt = getattr(optimizer, "optimizer", optimizer)
        if not isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)):
            raise TypeError(f"ShardedPreconditionedOperator needs torch.optim.Adam/AdamW, got {type(opt).__name__}")
        self.inner, self.optimizer, self.lookahead = inner, opt, bool(lookahead)
        self.global_n, self.process_group = inner.global_n, inner.process_group
        self.param_names, self.loss, self.gradient = inner.param_names, inner.loss, inner.gradient
        owners = {id(p): g for g in opt.param_groups for p in g["params"]}
        lr0 = float(opt.param_groups[0]["lr"])
        self.lr, self.beta1 = lr0, float(opt.param_groups[0]["betas"][0])
        self.info: dict[str, Any] = {"preconditioner": "next_step" if lookahead else "last_step", "sharded": True}
        gradient = inner.gradient
        if lookahead and max_grad_norm is not None:
            factor = clip_factor(float(inner.dot(gradient, gradient).sqrt()), max_grad_norm)
            gradient = gradient * factor
            self.info["lookahead_clip"] = factor
        grads = inner.unflatten(gradient)
        parts = []
        for name, p, g in zip(inner.param_names, inner.params, grads):
            group = owners.get(id(p))
            if group is None:
                raise ValueError(f"the optimizer does not own parameter '{name}' of the operator")
            beta1, beta2 = (float(b) for b in group["betas"])
            eps, lr = float(group["eps"]), float(group["lr"])
            state = opt.state.get(p, {})
            def local(key: str) -> torch.Tensor | None:
                t = state.get(key)
                return None if t is None else local_tensor(t).detach().to(self.dtype).reshape(g.shape)
            has = "exp_avg_sq" in state and "step" in state
            t = float(state["step"]) if has else 0.0
            v = local("max_exp_avg_sq") if group.get("amsgrad") and has else (local("exp_avg_sq") if has else None)
            if self.lookahead:
                wd = float(group.get("weight_decay", 0.0))
                if wd and not group.get("decoupled_weight_decay", isinstance(opt, torch.optim.AdamW)):
                    g = g + wd * inner.unflatten(inner.parameter_vector())[inner.param_names.index(name)]
                v = (beta2 * v if v is not None else 0.0) + (1 - beta2) * g * g
                t += 1
            elif v is None or t <= 0:
                raise ValueError(f"no Adam state for '{name}': take a step first, or pass lookahead=True")
            bc1, bc2 = 1 - beta1 ** t, 1 - beta2 ** t
            parts.append((bc1 * (v.sqrt() / math.sqrt(bc2) + eps) * (lr0 / lr if lr > 0 and lr0 > 0 else 1.0)).reshape(-1))
        self.preconditioner = torch.cat(parts) if parts else torch.zeros(0, dtype=self.dtype)
        self._scale = self.preconditioner.rsqrt()

    @property
    def method(self) -> str:
        return "finite_difference"

    @property
    def whitened_gradient(self) -> torch.Tensor:
        """This rank's slice of P^{-1/2} g (as
        :attr:`curvature.optim.PreconditionedHessianOperator.whitened_gradient`)."""
        return self._scale * self.gradient.to(self.dtype)

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        D = self._scale[:, None]
        return D * self.inner.matmat(D * V)

    def dot(self, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        return self.inner.dot(X, Y)

    def random_block(self, k: int, seed: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.inner.random_block(k, seed, dtype)

    def gather(self, V: torch.Tensor) -> torch.Tensor:
        return self.inner.gather(V)
