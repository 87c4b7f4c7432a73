"""Sharpness during training: :class:`SharpnessTracker` (its rows go to the sinks of :mod:`curvature.sinks`).

A tracker measures, every ``every`` steps, the top Hessian eigenvalue λ_max(H) of the loss at the model's current
parameters (and, for an optimizer with a diagonal pre-conditioner — Adam/AdamW, RMSprop, Adagrad, Adamax, NAdam,
RAdam, Adafactor, Adadelta — the pre-conditioned sharpness λ_max(P⁻¹H)), compares it with the optimizer's
stability threshold (:func:`~curvature.optim.stability_threshold`) and writes one row per measurement; where no
threshold is derived, ``stability_note`` says so (and what to use instead)::

    tracker = SharpnessTracker(F.cross_entropy, every=50, sinks=["sharpness.csv"])
    for i, (x, y) in enumerate(loader):
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        tracker.step(model, optimizer, (x, y), step=i)   # before optimizer.step(): measures θ_i, on (x, y)
        optimizer.step()

**When it measures** (the default, ``when="before_step"``): call :meth:`SharpnessTracker.step` after the
backward pass and *before* ``optimizer.step()``, with the batch of this step. The row at ``step=i`` then
describes the parameters θ_i that update i starts from (i updates applied so far), the loss landscape of the
batch that update uses, and the learning rate that update uses: ``lr·λ`` is what decides whether *this* step is
stable. This is the paper's per-step measurement (Kalra & Barkeshli, arXiv 2406.09405: sharpness on the current
training mini-batch). ``when="after_step"`` documents (and, in the framework callbacks, selects) a call after
``optimizer.step()``: the row then describes θ_{i+1}. The tracker itself cannot see where it is called from; the
``when`` value is written into every row so a reader knows.

For Adam/AdamW the pre-conditioner P is read from the optimizer's state, i.e. the P of the last step taken
(``lookahead="auto"``); before the first step there is no state, and the tracker then builds the P of the step
about to be taken from the probe batch's gradient (``lookahead=True`` in
:func:`~curvature.optim.preconditioned_sharpness`), so the very first row is defined too.

**Never hurts training.** Nothing the tracker does changes parameters, ``.grad``, buffers, optimizer state,
``model.training`` or the global RNG state: a run with a tracker attached is bit-identical to the same run
without it (the one thing it adds is a read-only ``register_step_post_hook`` on the optimizer, see below).

**When a measurement fails** (the policy; the framework callbacks follow it too):

* *Set-up errors fail at once.* When no measurement has succeeded yet and one fails with the kind of error a wrong
  set-up raises (a ``loss_fn(model, batch)`` signature, ``F.cross_entropy`` on (B, T, V) logits, inputs and targets
  of different lengths: TypeError, ValueError, shape RuntimeErrors, ...), every later row would fail the same way:
  :class:`TrackingSetupError` is raised, naming what was given and the expected ``loss_fn(outputs, targets)``, and
  no row is written. ``setup_errors="warn"`` warns once with that text instead and goes on.
* *Later failures warn once per kind.* After a row has succeeded, a failure (out of memory, NaN, a transient
  fault, no convergence, a failing sink) gives a :class:`TrackingWarning` the first time for each kind, then again
  at the 10th, 100th, ... with the count (``tracker.failures``); every such row is written with ``error`` (why) and
  ``error_kind`` (one of :data:`curvature.usage.FAILURE_KINDS`), and training goes on. ``on_error="raise"``
  raises :class:`TrackingError` after writing the row instead.

**Order of calls.** With ``when="before_step"`` the tracker watches the optimizer through a read-only step hook:
when :meth:`SharpnessTracker.step` comes after ``optimizer.step()`` with no ``backward()`` in between (its row
would describe the parameters after the update), it warns once with the fix.

**Starts and cost.** Each solve (Lanczos by default, stopped once the eigenvalue is within ``eig_tol=1e-3``) starts
from the previous measurement's Ritz vectors plus a guard vector (the next one), so a λ1/λ2 swap between rows
cannot lock it onto λ2; a row without earlier vectors starts from the measured batch's gradient (P^{-1/2}g for
λ(P⁻¹H); ``gradient_start``) instead of a random vector. λ(H), λ(P⁻¹H) and the signals share one first-order graph,
or the training step's own (``backward(create_graph=True)``). Measured on CPU (``docs/tracking.md``,
``benchmarks/results/tracker-every100-cpu-2026-12-02.md``): ≈ 13 HVPs and 40–47 training steps per row on a digits
MLP at the edge of stability and on a 438k GPT with Adam, every row within 1e-3 of a tight float64 solve. When a
warm start does not converge, the tracker retries once from a random start.

Rows (``tracker.history``, the CSV / JSON-lines columns, TensorBoard tags) carry the keys of :data:`ROW_KEYS`.
"""
from __future__ import annotations

import contextlib
import logging
import math
import operator
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from ._exact import frozen_rng, unwrap_model
from .diagnostics import OPERATOR_OPTIONS, SOLVERS, solve, split_operator_options
from .distributed import RemoteRankError
from .hvp import select_parameters
from .solvers import RandomStarts, combined_start
from .operators import HessianOperator
from .sharded import is_sharded_model
from .route_check import check_one_sided, rayleigh_product, solve_eig_tol
from .optim import (PreconditionedHessianOperator, edge_ratio, has_diagonal_preconditioner, is_adam_like,
                    lookahead_required, require_diagonal_preconditioner, stability_note, stability_threshold,
                    unwrap_optimizer)
from .critical import critical_sharpness
from .operators import GraphHessianOperator
from .rows import ROW_KEYS, SCALAR_KEYS  # the row schema (re-exported)
from .signals import loss_at, step_signals
from ._validate import check_optional_positive_int, check_positive_float, check_seed, check_tol
from .usage import (StepOrderWatch, check_batch_argument, check_not_a_batch_half, describe, explain_setup_failure,
                    failure_kind)

__all__ = ["SharpnessTracker", "ROW_KEYS", "SCALAR_KEYS", "TrackingError", "TrackingSetupError", "TrackingWarning",
           "CSVSink",
           "JSONLinesSink", "TensorBoardSink", "LoggingSink", "CallableSink", "WandbSink", "MLflowSink", "make_sink",
           "format_row", "model_output_loss", "read_rows", "parse_value", "is_json_lines", "warm_started_solve"]

log = logging.getLogger("curvature.tracking")

class TrackingError(RuntimeError):
    """A measurement failed (or did not converge) and the tracker was built with ``on_error="raise"``."""


class TrackingSetupError(TrackingError, TypeError):
    """The first measurement failed because of how the tracker is set up (the loss's signature, the batch's form,
    shapes): every later row would fail the same way. Raised whatever ``on_error`` says, unless
    ``setup_errors="warn"``; the message names what was given and the expected ``loss_fn(outputs, targets)``."""


class TrackingWarning(RuntimeWarning):
    """A measurement failed; training goes on (``on_error="warn"``)."""


_STEP_CALL = "tracker.step(model, optimizer, batch, step)"


# ---------------------------------------------------------------------------------------------------
# Loss adapters
# ---------------------------------------------------------------------------------------------------
from .data import model_output_loss, own_loss_batch, resolve_loss_fn  # noqa: E402  (model_output_loss re-exported here)


# Row files and sinks live in rows.py and sinks.py; re-exported here (public names of this module).
from .rows import is_json_lines, parse_value, read_rows  # noqa: E402
from .sinks import (  # noqa: E402
    CallableSink, CSVSink, JSONLinesSink, LoggingSink, MLflowSink, TensorBoardSink, WandbSink, format_row, make_sink,
)


def warm_started_solve(fn: Callable[..., Any], X0: torch.Tensor | None, *, retry_cold: bool = True
                       ) -> tuple[Any, int, bool]:
    """``fn(X0=X0)`` (a solve warm-started from earlier eigenvectors), started cold instead when ``X0`` no longer
    fits (the parameters changed), and retried once cold when the warm solve does not converge.
    Returns (the accepted result, operator applications spent in all, whether it was warm-started)."""
    warm = X0 is not None
    try:
        res = fn(X0=X0)
    except ValueError as exc:
        if not warm or "X0" not in str(exc):
            raise
        res, warm = fn(X0=None), False
    hvps = int(res.num_hvps)
    if warm and not res.converged and retry_cold:
        cold = fn(X0=None)
        hvps += int(cold.num_hvps)
        if cold.converged or float(cold.residuals.max()) < float(res.residuals.max()):
            res, warm = cold, False
    return res, hvps, warm


# ---------------------------------------------------------------------------------------------------
# The tracker
# ---------------------------------------------------------------------------------------------------
def _finite(values: Sequence[float]) -> bool:
    return all(isinstance(v, float) and math.isfinite(v) for v in values)


def _positive_int(value: Any, name: str) -> int:
    """An int >= 1 (a bool, float or string is refused with a message naming the option)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= 1, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


#: ``hvp_route`` values of the tracker (see :class:`SharpnessTracker`).
#: Weight of the seeded random direction in a warm start, relative to one unit hint (a stored Ritz vector). 0.3:
#: the 2.6 % miss at step 330 of the GELU trajectory (every=10) is gone, HVPs per row unchanged on three of four
#: benchmark trajectories and +2 % on the fourth; 0.1 did not remove the miss, 1.0 cost up to +19 % HVPs.
WARM_RANDOM_WEIGHT = 0.3

HVP_ROUTES = ("auto", "exact", "one_sided")
#: The least the first-row calibration may scale the residual term of the one-sided bound down to (it measured
#: 0.015 of the one-sided spread on the GPT, 0.37 on the EoS digits MLP; below this floor one measurement is not
#: trusted).
ROUTE_RESIDUAL_SCALE_FLOOR = 0.05
#: ``hvp_route="auto"`` gives the one-sided route up after this many rows whose bound missed eig_tol (each was solved
#: again with exact HVPs, so each miss costs a one-sided solve on top of the exact one).
ROUTE_MISSES_BEFORE_EXACT = 2
#: Operator options that choose a route or a setup the one-sided route does not take over.
_EXACT_ONLY_OPTIONS = ("method", "fd_order", "fd_epsilon", "autocast", "distributed", "process_group", "compile")


def _gradient_passes(op: Any) -> int:
    """First-order gradient passes an operator spent: the one-sided engine counts them (G(θ), one per HVP, two
    per check); an exact engine made one (its cached first-order graph); the training graph none."""
    engine = getattr(op, "engine", None)
    if engine is None:
        return 0
    return int(getattr(engine, "gradients", 1))


def _bound(res: Any) -> float | None:
    """The solver's bound on the relative eigenvalue error, when it gives one."""
    b = res.info.get("error_bound")
    return float(b) if isinstance(b, (int, float)) else None


def _missed(res: Any, tol: float | None, eig_tol: float | None) -> str:
    parts = []
    if tol is not None:
        parts.append(f"residual {float(res.residuals.max()):.2e} vs tol {tol:g}")
    if eig_tol is not None:
        b = _bound(res)
        parts.append(f"error bound {b if b is not None else float('nan'):.2e} vs eig_tol {eig_tol:g}")
    return ", ".join(parts)


class SharpnessTracker:
    """Measure sharpness every ``every`` steps of a training loop (framework-free).

    Args:
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` (mean-reduced). ``None``: the model computes its own loss
            (Hugging Face models with ``labels`` in the batch): dict batches are passed as keyword inputs and
            ``outputs.loss`` is used (:func:`model_output_loss`).
        every: measure when ``step % every == 0``; other calls are a cheap no-op returning ``None``.
        k: number of top eigenvalues (``row["eigenvalues"]``; ``row["sharpness"]`` is the first).
        solver: ``"lanczos"`` (default: fewest HVPs in our measurements, see ``docs/tracking.md``),
            ``"lobpcg"`` or ``"power_iteration"``.
        eig_tol: the relative accuracy of λ asked for (default 1e-3): the solver stops once its bound
            ‖r‖²/(gap·|λ|) on the error is below it (``row["error_bound"]``). ``None``: residual ``tol`` only.
        tol: residual tolerance ‖Hv − λv‖/|λ| (an opt-in guarantee on the eigenvectors too); default none when
            ``eig_tol`` is given (else 1e-4). ``max_iters``: solver budget.
        probe: data to measure on. ``None`` (default): the batch passed to :meth:`step` (the current training
            batch). Otherwise a fixed batch ``(inputs, targets)`` or an iterable of batches (list, DataLoader: the
            Hessian of their sample-weighted mean loss, read at every measurement).
        when: ``"before_step"`` (default: call :meth:`step` after ``backward()``, before ``optimizer.step()``) or
            ``"after_step"``; recorded in each row and used by the framework callbacks to pick their hook.
        warm_start: start each solve from the previous measurement's Ritz vectors.
        warm_guard: with ``warm_start``, start from the previous top-k Ritz vectors **and the next one** (the
            (k+1)-th), so that when λ_k and λ_{k+1} swap between measurements (the edge of stability) the solve
            still sees both and cannot settle on the second (Lanczos / power iteration: the sum of the vectors as
            the start vector; LOBPCG: the guard added to the k-th column). ``False``: the previous top-k only (the
            old behaviour).
        gradient_start: start from the measured batch's gradient g (P^{-1/2}g for λ(P⁻¹H)), which the operator
            has already computed, instead of a random vector: ``"cold"`` (default) when there are no earlier
            Ritz vectors (the first row, after a reset); ``True`` also added to the warm start; ``False`` never.
            g leans towards the top eigenvectors (at the edge of stability the iterates oscillate along them):
            the cold GPT row took 23 HVPs instead of 33; added to a warm start it helped at every=100 on the MLP
            and cost a little at every=1/10 (``docs/tracking.md``).
        preconditioned: ``"auto"`` measures λ_max(P⁻¹H) when the optimizer has a diagonal pre-conditioner
            (Adam/AdamW, RMSprop, Adagrad, Adamax, NAdam, RAdam, Adafactor, Adadelta:
            :func:`~curvature.optim.has_diagonal_preconditioner`); ``True`` requires it, ``False`` never. Where a
            stability column stays empty (no derived threshold: Adagrad, Adafactor, Adadelta, Muon; lr = 0;
            ``preconditioned=False`` with an adaptive optimizer), the row's ``stability_note`` says why.
        lookahead: ``True`` (default): P of the step about to be taken (v ← β₂v + (1−β₂)g², t ← t+1, g = the
            measured batch's gradient), matching what a row describes; ``False``: P of the last step taken (from
            the optimizer state; undefined before the first step); ``"auto"``: last step once the optimizer has
            stepped, next step before (and always for Adafactor and Adadelta, whose last-step P cannot be rebuilt:
            :func:`~curvature.optim.lookahead_required`). Each row says which in ``preconditioner``.
        max_grad_norm: the training loop clips gradients to this norm (``clip_grad_norm_``): the lookahead P is
            built from the measured gradient clipped the same way, as the optimizer will see it. ``None`` (default):
            unclipped. The Hugging Face callback sets it from ``TrainingArguments.max_grad_norm``.
        share_graph: λ(H) and λ(P⁻¹H) (and the signals) from one first-order graph per measurement (default);
            ``False`` builds one per solve (the old cost).
        signals: also compute the per-step signals of :mod:`curvature.signals` (batch sharpness, update
            curvature, predicted vs actual loss change, and Adam's pre-conditioned counterparts) on the measured
            batch: 2–3 HVPs and one forward pass more per row (``signals_num_hvps``, ``signals_seconds``).
        sinks: where rows go besides ``history``: paths (``.csv``, ``.jsonl``), a ``logging.Logger``, a TensorBoard
            ``SummaryWriter``, sink objects (:class:`CSVSink`, :class:`TensorBoardSink`, ...) or any callable(row).
        on_error: ``"warn"`` (a failed measurement gives a :class:`TrackingWarning`, once per kind of failure,
            and a row with ``error`` / ``error_kind``) or ``"raise"`` (:class:`TrackingError`, after the row is
            written).
        setup_errors: ``"raise"`` (default): a first measurement that fails because of the set-up raises
            :class:`TrackingSetupError` (see the module docs); ``"warn"``: warn once with the same text and go on.
        retry_cold: when a warm-started solve does not converge, retry once from a random start.
        batch_transform: optional ``fn(batch) -> (inputs, targets)`` applied to the batch (or probe) first.
        hvp_route: how the solves apply the Hessian. ``"exact"``: double backward through a cached first-order
            graph (1.6–2.6 training steps per HVP on CPU). ``"one_sided"``: Hv ≈ (∇L(θ+εv) − ∇L(θ))/ε, one
            gradient per HVP (1.5 training steps on the digits MLP, engine bookkeeping included; an exact HVP 2),
            ∇L(θ) computed once per row under the row's frozen RNG (so
            dropout masks match), ε = u^{1/2}·max(1, ‖θ‖/√n); two more gradients on the converged Ritz vector give
            the central Rayleigh quotient (the reported value) and the route's own error, folded into
            ``error_bound`` (:mod:`curvature.route_check`); a row whose bound exceeds ``eig_tol`` is solved again
            with exact HVPs. λ(P⁻¹H)'s first passing check is compared once with an exact HVP (its bias estimate
            was 27× low on a small Adam problem); where that is further off than the check's bound, λ(P⁻¹H) is
            solved with exact HVPs from then on. ``"auto"`` (default): one-sided when eligible (``eig_tol`` given,
            float32/float64, no autocast, no route/distributed operator option, not distributed, not the
            training-graph entry) and when the first row's check against an exact HVP on its Ritz vector shows the
            route's error below ``eig_tol/4``, its bound (route terms calibrated on that HVP) meets ``eig_tol`` and
            its timing shows a row costs less that way; exact otherwise, and after
            ``ROUTE_MISSES_BEFORE_EXACT`` (2) later rows whose bound missed (``row["hvp_route_note"]`` says why).
            ``row["hvp_route"]`` is the route used. With ``k > 1`` only the top value is the central one;
            ``eigenvalues[1:]`` are one-sided Ritz values (bias ~1e-4).
        keep_history: keep rows in :attr:`history` (set ``False`` for very long runs that only use sinks).
        solver_seed: seed of the solver's random start vectors.
        critical_every: also measure the critical sharpness λ_c = 2/η_c of the step about to be taken
            (:func:`~curvature.critical.critical_sharpness`: forward passes only, any linear-in-lr optimizer) when
            ``step % critical_every == 0``, into the ``critical_*`` columns (``critical_edge_ratio`` = η·λ_c/2,
            1.0 = the edge of stability for every optimizer); a step that is not a λ_max step gets a row with only
            those columns (and ``lr``, ``loss``). Warm-started from the previous η_c; the loss at θ is the
            ``loss=`` given to :meth:`step` when the tracker has no probe and the model no active dropout.
            ``every=None`` with ``critical_every``: critical-sharpness rows only.
        critical_rtol: its bracket tolerance (default 1/16).
        **operator_options: passed to the operator (``method``, ``dtype``, ``device``, ``max_batch_size``,
            ``params``, ``distributed``, ``compile``, ...).
    """

    def __init__(self, loss_fn: Callable | None, every: int = 50, k: int = 1, solver: str = "lanczos",
                 tol: float | None = None, max_iters: int | None = None, probe: Any = None,
                 when: str = "before_step", warm_start: bool = True, preconditioned: bool | str = "auto",
                 sinks: Iterable[Any] = (), on_error: str = "warn", *, eig_tol: float | None = 1e-3,
                 lookahead: bool | str = True, warm_guard: bool = True, gradient_start: bool | str = "cold",
                 share_graph: bool = True, max_grad_norm: float | None = None, setup_errors: str = "raise",
                 signals: bool = False, retry_cold: bool = True,
                 batch_transform: Callable[[Any], Any] | None = None, keep_history: bool = True,
                 solver_seed: int = 0, critical_every: int | None = None, critical_rtol: float = 1 / 16,
                 hvp_route: str = "auto", **operator_options: Any) -> None:
        self.critical_every = None if critical_every is None else _positive_int(critical_every, "critical_every")
        if every is None and self.critical_every is None:
            raise ValueError("every=None measures nothing: give every=N (λ_max rows) and/or critical_every=N")
        self.every = None if every is None else _positive_int(every, "every")
        self.critical_rtol = float(critical_rtol)
        if not (math.isfinite(self.critical_rtol) and 0 < self.critical_rtol < 1):
            raise ValueError(f"critical_rtol must be in (0, 1), got {critical_rtol!r}")
        self._critical_lr: float | None = None
        self.k = _positive_int(k, "k")
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {sorted(SOLVERS)}, got {solver!r}")
        if when not in ("before_step", "after_step"):
            raise ValueError(f"when must be 'before_step' or 'after_step', got {when!r}")
        if on_error not in ("warn", "raise"):
            raise ValueError(f"on_error must be 'warn' or 'raise', got {on_error!r}")
        if setup_errors not in ("warn", "raise"):
            raise ValueError(f"setup_errors must be 'raise' (a misconfigured first measurement raises) or 'warn', "
                             f"got {setup_errors!r}")
        if preconditioned not in ("auto", True, False):
            raise ValueError(f"preconditioned must be 'auto', True or False, got {preconditioned!r}")
        if lookahead not in ("auto", True, False):
            raise ValueError(f"lookahead must be True (P of the step about to be taken), False (P of the last step) "
                             f"or 'auto', got {lookahead!r}")
        unknown = sorted(set(operator_options) - set(OPERATOR_OPTIONS) - {"params"})
        if unknown:
            raise TypeError(f"SharpnessTracker() got unexpected keyword arguments: {unknown}")
        self.own_loss = loss_fn is None
        self.loss_fn = resolve_loss_fn(loss_fn)  # None: the model's own loss; a loss class or sum-reduction refused
        self.setup_errors = setup_errors
        self.solver = solver
        self.eig_tol = check_tol(eig_tol, "eig_tol", allow_none=True)
        self.tol = check_tol(tol, "tol", allow_none=True)
        if self.tol is None and self.eig_tol is None:
            self.tol = 1e-4
        self.max_iters = check_optional_positive_int(max_iters, "max_iters")
        self.probe = probe
        self.when = when
        if self.critical_every is not None and when != "before_step":
            raise ValueError("critical_every= measures the step about to be taken: it needs when='before_step' "
                             "(call tracker.step after backward(), before optimizer.step())")
        self.warm_start = bool(warm_start)
        self.warm_guard = bool(warm_guard)
        if gradient_start not in ("cold", True, False):
            raise ValueError(f"gradient_start must be 'cold' (the first solve, or any without earlier vectors), "
                             f"True (every solve) or False, got {gradient_start!r}")
        self.gradient_start = gradient_start
        self.share_graph = bool(share_graph)
        self.signals = bool(signals)
        self.preconditioned = preconditioned
        self.lookahead = lookahead
        self.max_grad_norm = None if max_grad_norm is None else check_positive_float(max_grad_norm, "max_grad_norm")
        self.on_error = on_error
        self.retry_cold = bool(retry_cold)
        self.batch_transform = batch_transform
        self.keep_history = bool(keep_history)
        self.solver_seed = check_seed(solver_seed, "solver_seed")
        if hvp_route not in HVP_ROUTES:
            raise ValueError(f"hvp_route must be one of {HVP_ROUTES} ('auto': one-sided differences when a first-row "
                             f"check against an exact HVP shows they meet eig_tol), got {hvp_route!r}")
        self.hvp_route = hvp_route
        self._route: str | None = None  # the route decided on the first row ("auto")
        self._route_note: str | None = None
        # the route's error terms in the one-sided bounds, for λ(H) and λ(P⁻¹H): (bias scale, residual scale), set by
        # the first row's check against one exact HVP (see _calibrate)
        self._route_scales: dict[str, tuple[float, float]] = {}
        self._route_misses = self._p_route_misses = 0  # one-sided rows whose bound missed eig_tol (solved again)
        self._p_route_note: str | None = None  # why λ(P⁻¹H) left the one-sided route (set: it is exact from now on)
        self._per_hvp_seconds = 0.0  # of the last λ(H) solve
        self.operator_options = dict(operator_options)
        self.sinks: list[Callable[[dict], Any]] = [make_sink(s) for s in sinks]
        self.history: list[dict] = []
        self.last: dict | None = None
        self._calls = 0
        self._X_h: torch.Tensor | None = None
        self._X_p: torch.Tensor | None = None
        self._signature_seen: tuple | None = None
        #: failed measurements so far, by kind (:data:`curvature.usage.FAILURE_KINDS`)
        self.failures: dict[str, int] = {}
        self._succeeded = False  # a measurement has given a value: later failures are not set-up errors
        self._order_watch = StepOrderWatch()

    # -- public ---------------------------------------------------------------------------------------
    def should_measure(self, step: int) -> bool:
        """``step % every == 0`` (λ_max) or ``step % critical_every == 0`` (λ_c)."""
        return self._sharpness_due(step) or self._critical_due(step)

    def _sharpness_due(self, step: int) -> bool:
        return self.every is not None and int(step) % self.every == 0

    def _critical_due(self, step: int) -> bool:
        return self.critical_every is not None and int(step) % self.critical_every == 0

    def step(self, model: torch.nn.Module, optimizer: Any, batch: Any = None, step: int | None = None, *,
             loss: torch.Tensor | None = None) -> dict | None:
        """Measure if ``step % every == 0`` and return the row, else return ``None`` at once.

        ``step`` defaults to the number of earlier calls (0, 1, 2, ...). ``batch`` is the current training batch
        (measured on unless a ``probe`` was given). Call it before ``optimizer.step()`` (``when="before_step"``,
        the default) — see the module docs for what a row then describes.

        Training-graph entry (no extra forward/backward pass, ``row["source"] == "training_graph"``): when the loop
        ran ``loss.backward(create_graph=True)`` (and the tracker has no probe and no operator options such as
        ``dtype``), the HVPs run through the first-order graph in ``p.grad``; or pass ``loss=`` (before
        ``backward()``, graph alive). Set ``p.grad = None`` after ``optimizer.step()`` to free that graph.
        """
        step = self._check_call(model, optimizer, batch, step)
        if self.when == "before_step":
            self._check_order(optimizer, self._calls if step is None else step)
        if step is None:
            step = self._calls
        self._calls += 1
        if not self.should_measure(step):
            return None
        return self.measure(model, optimizer, batch, step, loss=loss)

    def measure(self, model: torch.nn.Module, optimizer: Any, batch: Any = None, step: int | None = None, *,
                loss: torch.Tensor | None = None) -> dict:
        """Measure now (whatever ``every`` says), emit the row to the sinks and return it."""
        if loss is not None and self.probe is not None:
            raise ValueError("loss= measures on the training step's own graph (its batch); the tracker has a "
                             "probe= batch: use one or the other")
        step = self._check_call(model, optimizer, batch, step, call="tracker.measure(model, optimizer, batch, step)")
        step = self._calls if step is None else step
        if self.every is None or (self.critical_every is not None and not self._sharpness_due(step)
                                  and self._critical_due(step)):
            row = self._critical_only_row(step, optimizer)  # a critical-sharpness step between λ_max steps
        else:
            row = self._measure(model, optimizer, batch, step, loss)
        if self._critical_due(step):
            self._add_critical(row, model, optimizer, batch, loss)
        self._emit(row)
        if row.get("error") and self.on_error == "raise":
            raise TrackingError(f"sharpness measurement at step {row['step']} failed: {row['error']}")
        return row

    def reset(self) -> None:
        """Forget the warm-start vectors (the next measurement starts cold)."""
        self._X_h = self._X_p = None

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue this tracker: the rows, the call counter and the warm-start
        vectors (CPU tensors). Plain Python values and tensors only (``torch.load(weights_only=True)`` reads it);
        the framework callbacks save it with their checkpoints."""
        return {"history": [dict(r) for r in self.history], "calls": self._calls, "critical_lr": self._critical_lr,
                "warm_start_h": None if self._X_h is None else self._X_h.detach().cpu().clone(),
                "warm_start_p": None if self._X_p is None else self._X_p.detach().cpu().clone()}

    def load_state_dict(self, state: dict[str, Any], model: torch.nn.Module | None = None) -> None:
        """Continue from :meth:`state_dict`: rows are kept (history continues), and the warm-start vectors start
        the next solve when ``model`` is given and they fit its trainable parameters (else the next solve is cold).
        Rows are not re-sent to the sinks (they were written when measured)."""
        self.history = [dict(r) for r in state.get("history", [])]
        self.last = self.history[-1] if self.history else None
        self._calls = int(state.get("calls", len(self.history)))
        lr_c = state.get("critical_lr")
        self._critical_lr = float(lr_c) if isinstance(lr_c, (int, float)) and math.isfinite(lr_c) and lr_c > 0 else None
        self._X_h = self._X_p = None
        self._signature_seen = None
        self._succeeded = any(r.get("sharpness") is not None or r.get("critical_sharpness") is not None
                              for r in self.history)
        if model is None:
            return
        net = unwrap_model(model)
        chosen = self.operator_options.get("params")
        if chosen is None:
            n = sum(p.numel() for p in net.parameters() if p.requires_grad)
        elif all(isinstance(t, torch.Tensor) for t in chosen):
            n = sum(t.numel() for t in {id(t): t for t in chosen}.values())
        else:  # names / prefixes: the dimension is not known here; start cold
            return
        device = next(iter(net.parameters()), torch.empty(0)).device
        h, p = state.get("warm_start_h"), state.get("warm_start_p")
        self._X_h = h.to(device) if isinstance(h, torch.Tensor) and h.ndim == 2 and h.shape[0] == n else None
        self._X_p = p.to(device) if isinstance(p, torch.Tensor) and p.ndim == 2 and p.shape[0] == n else None
        self._signature_seen = self._signature(net)

    def to_dataframe(self) -> Any:
        """``history`` as a ``pandas.DataFrame`` (columns in :data:`ROW_KEYS` order); needs pandas."""
        import pandas as pd

        extra = [k for row in self.history for k in row if k not in ROW_KEYS]
        columns = list(ROW_KEYS) + list(dict.fromkeys(extra))
        return pd.DataFrame(self.history, columns=columns)

    def close(self) -> None:
        """Close file and TensorBoard sinks (rows are already flushed; this releases the handles) and remove the
        read-only optimizer step hooks."""
        self._order_watch.close()
        for sink in self.sinks:
            close = getattr(sink, "close", None)
            if callable(close):
                with contextlib.suppress(Exception):
                    close()

    def __enter__(self) -> SharpnessTracker:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        tol = "None" if self.tol is None else f"{self.tol:g}"
        return (f"SharpnessTracker(every={self.every}, k={self.k}, solver={self.solver!r}, eig_tol={self.eig_tol}, "
                f"tol={tol}, when={self.when!r}, warm_start={self.warm_start}, rows={len(self.history)})")

    # -- internals ------------------------------------------------------------------------------------
    def _data(self, batch: Any) -> Any:
        data = self.probe if self.probe is not None else batch
        if data is None:
            raise ValueError("no data to measure on: pass the current batch to tracker.step(model, optimizer, "
                             "batch) or give the tracker a probe=")
        if self.batch_transform is not None:
            data = self.batch_transform(data)
        if self.own_loss:
            data = own_loss_batch(data)
        return data

    def _start(self, op: Any, X: torch.Tensor | None, hint: torch.Tensor | None) -> torch.Tensor | None:
        """The start of this measurement's solve: the stored Ritz vectors ``X`` (top-k, plus the guard (k+1)-th
        with ``warm_guard``) and, with ``gradient_start``, ``hint`` (the gradient in the operator's coordinates).
        Lanczos/power iteration get one vector, the sum of the normalised hints (:func:`combined_start`), with a
        component along each, plus a seeded random direction when warm; LOBPCG a k-column block (guard added to
        the k-th column, gradient to the first)."""
        X = X if self.warm_start else None
        if self.gradient_start is False or (self.gradient_start == "cold" and X is not None):
            hint = None
        if self.solver != "lobpcg":
            if X is not None:
                X = X[:, :self.k + 1] if self.warm_guard and X.shape[1] > self.k else X[:, :1]
            start = combined_start(op, [X, hint])
            if X is None or start is None:
                return start
            # A warm Krylov start carries a seeded random direction (WARM_RANDOM_WEIGHT × one unit hint): where the
            # top eigenvector has left the span of the stored vectors (they can span an invariant subspace of the
            # new H), a Krylov space grown from them alone converges, residual and bound ~0, to a lower eigenvalue.
            r = RandomStarts(op, self.solver_seed + self._calls, op.device).draw(1, op.dtype)[:, 0]
            noise = combined_start(op, [r])
            return start if noise is None else start + WARM_RANDOM_WEIGHT * noise
        if X is not None:
            X = X[:, :self.k + 1].clone()
            if self.warm_guard and X.shape[1] > self.k:  # the guard joins the k-th column: no extra column
                X[:, self.k - 1] += X[:, self.k]
            X = X[:, :self.k]
        g = combined_start(op, [hint])
        if g is None:
            return X
        if X is None:
            return g[:, None]
        X[:, 0] += g
        return X

    def _keep(self, res: Any) -> torch.Tensor:
        """Vectors to warm-start the next measurement from: the top-k Ritz vectors and, when the solver gives
        it, the next one (``info["guard_vectors"]``)."""
        guard = res.info.get("guard_vectors")
        X = guard if isinstance(guard, torch.Tensor) and guard.shape[1] > self.k else res.eigenvectors
        return X.detach().clone()

    def _solve(self, op: Any, X: torch.Tensor | None, hint: torch.Tensor | None = None) -> tuple[Any, int, bool]:
        eig_tol = solve_eig_tol(op, self.eig_tol)  # a fraction of it on the one-sided route (its check adds its error)

        def run(X0: torch.Tensor | None) -> Any:
            return solve(op, self.k, self.solver, self.tol, self.max_iters, X0, True, self.solver_seed, eig_tol)

        res, hvps, started = warm_started_solve(run, self._start(op, X, hint), retry_cold=self.retry_cold)
        return res, hvps, started and X is not None and self.warm_start  # warm: from the previous vectors

    def _graph_in_grads(self, net: torch.nn.Module) -> bool:
        """Whether the loop ran ``backward(create_graph=True)`` on the batch being measured: every trainable
        parameter's ``.grad`` carries a graph, no probe is set and no operator option asks for another setup."""
        if self.probe is not None or set(self.operator_options) - {"params", "seed"}:
            return False
        named = select_parameters(net, self.operator_options.get("params"))
        return bool(named) and all(p.grad is not None and p.grad.requires_grad for _, p in named)

    def _operator(self, net: torch.nn.Module, data: Any, loss: torch.Tensor | None, route: str = "exact") -> Any:
        """The Hessian operator of this measurement: on the training step's graph (``loss`` given, or the
        first-order graph the loop left in ``.grad``) or a new one (``route="one_sided"``: one-sided gradient
        differences, :class:`~curvature.finite_difference.FiniteDifferenceEngine` with ``order=1``)."""
        if loss is not None or self._graph_in_grads(net):
            return GraphHessianOperator(select_parameters(net, self.operator_options.get("params")), loss)
        op_kw, rest = split_operator_options(dict(self.operator_options))
        if route == "one_sided":
            op_kw.update(method="finite_difference", fd_order=1)
        return HessianOperator(net, self.loss_fn, data, rest.get("params"), **op_kw)

    def _route_for(self, net: torch.nn.Module, loss: torch.Tensor | None) -> tuple[str, str | None]:
        """The HVP route of this row and, when one-sided differences were eligible in principle but are not used,
        why (see ``hvp_route``)."""
        if self.hvp_route == "exact":
            return "exact", None
        if loss is not None or self._graph_in_grads(net):
            return "exact", "the training step's own graph (exact HVPs, no extra gradient)"
        asked = sorted(set(self.operator_options) & set(_EXACT_ONLY_OPTIONS))
        if asked:
            return "exact", f"operator option(s) {asked} given: the one-sided route is not used with them"
        if self.eig_tol is None or self.tol is not None:
            return "exact", "a residual tol= was asked: one-sided differences cannot meet it (their error is O(√u))"
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return "exact", "a distributed run: the one-sided route's check is not yet collective (exact HVPs)"
        first = next(iter(net.parameters()), torch.empty(0))
        dtype, device = first.dtype, first.device
        if self.operator_options.get("dtype") not in (None, dtype) or self.operator_options.get("device") not in (
                None, device, str(device)):
            return "exact", ("dtype=/device= other than the parameters': the one-sided route would need a copy of "
                             "the model")
        if torch.finfo(dtype).bits < 32:
            return "exact", f"{dtype} parameters: gradient differences are unreliable at this precision"
        with contextlib.suppress(TypeError, AttributeError, RuntimeError):
            if torch.is_autocast_enabled(device.type):
                return "exact", "autocast is active: gradient differences carry its low-precision rounding"
        if self.hvp_route == "one_sided":
            return "one_sided", None
        if self._route == "exact":
            return "exact", self._route_note
        return "one_sided", None

    def _h_row(self, H: Any, X: torch.Tensor | None, row: dict) -> Any:
        """Solve for λ(H) from ``X`` (or the gradient), write the row's λ(H) fields, keep the Ritz vectors."""
        ts = time.perf_counter()
        res, hvps, warm = self._solve(H, X, getattr(H, "gradient", None))
        self._per_hvp_seconds = (time.perf_counter() - ts) / max(hvps, 1)  # solver bookkeeping included
        row["num_hvps"] += hvps
        values = [float(v) for v in res.eigenvalues]
        row.update(sharpness=values[0], eigenvalues=values,
                   loss=None if row["source"] == "training_graph" and math.isnan(H.loss) else float(H.loss),
                   residual=float(res.residuals.max()), warm_start=warm, converged=bool(res.converged),
                   error_bound=_bound(res))
        if not _finite(values):
            self._X_h = None
            raise FloatingPointError(f"non-finite eigenvalues {values}")
        self._X_h = self._keep(res)
        return res

    def _p_row(self, P_op: Any, X: torch.Tensor | None, row: dict) -> Any:
        """Solve for λ(P⁻¹H) from ``X`` (or P^{-1/2}g), write the row's pre-conditioned fields, keep the vectors."""
        pres, phvps, _ = self._solve(P_op, X, P_op.whitened_gradient)
        row["num_hvps"] += phvps
        row["preconditioned_num_hvps"] = (row["preconditioned_num_hvps"] or 0) + phvps
        pvalues = [float(v) for v in pres.eigenvalues]
        row.update(preconditioned_sharpness=pvalues[0], preconditioned_eigenvalues=pvalues,
                   preconditioned_residual=float(pres.residuals.max()), preconditioned_error_bound=_bound(pres))
        if not _finite(pvalues):
            self._X_p = None
            raise FloatingPointError(f"non-finite pre-conditioned eigenvalues {pvalues}")
        self._X_p = self._keep(pres)
        return pres

    def _first_row_check(self, exact_H: Any, chk: Any, row: dict, t_grad: float = 0.0,
                         t_build: float = 0.0) -> tuple[bool, str | None]:
        """``hvp_route="auto"``'s measurement on its first one-sided row: one exact HVP on the Ritz vector. The
        one-sided route is kept when a row costs less on it (timed here: a gradient ``t_grad`` against an exact HVP
        and the first-order graph ``t_build``; a one-sided row is G(θ) + its HVPs + 2 check gradients, an exact row
        the graph + about one HVP fewer, since the one-sided solve stops at ``eig_tol/2``) **and** the central
        Rayleigh quotient it reports is within ``eig_tol/4`` of the exact one; the route's error terms of this and
        later bounds are then calibrated on the exact HVP (:meth:`_calibrate`)."""
        t_hvp = math.inf
        for _ in range(2):  # twice, the faster counts (one timing on a shared machine is noisy)
            th = time.perf_counter()
            exact, hx = rayleigh_product(exact_H, chk.x)
            t_hvp = min(t_hvp, time.perf_counter() - th)
        row["num_hvps"] += 2
        n = max(int(row["num_hvps"]) - 2, 1)
        one_sided_cost, exact_cost = (n + 3) * t_grad, t_build + max(n - 1, 1) * t_hvp
        if t_grad > 0 and t_hvp > 0 and one_sided_cost > exact_cost:
            return False, (f"exact HVPs are cheaper on this model (measured on the first row: a gradient "
                           f"{t_grad * 1e3:.3g} ms, an exact HVP {t_hvp * 1e3:.3g} ms, the graph {t_build * 1e3:.3g} ms:"
                           f" a row ≈ {one_sided_cost * 1e3:.3g} vs {exact_cost * 1e3:.3g} ms): exact HVPs from now on")
        err = abs(chk.value - exact) / max(abs(exact), torch.finfo(torch.float64).tiny)
        if not err <= self.eig_tol / 4:
            return False, (f"one-sided gradient differences are {err:.1e} off an exact HVP on the first row's Ritz "
                           f"vector (more than eig_tol/4 = {self.eig_tol / 4:.1e}; non-smooth activations such as "
                           "ReLU kinks, or rounding): exact HVPs from now on")
        return self._calibrate("", chk, exact, hx, row)

    def _calibrate(self, key: str, chk: Any, exact: float, hx: torch.Tensor, row: dict) -> tuple[bool, str | None]:
        """Scale the route's error terms of the one-sided bound (``key``: ``""`` for λ(H), ``"preconditioned_"``
        for λ(P⁻¹H)) so that they cover twice what one exact HVP A x measured on this row's checked vector x: the
        central value's error |λ_ctr − xᵀAx| (bias term; scale ≥ 1) and the central difference's error on x,
        ‖Cx − Ax‖ (residual term, whose default is the one-sided spread e: 67× the central error on the GPT,
        2–3× on the digits MLPs; the scale is kept ≥ ``ROUTE_RESIDUAL_SCALE_FLOOR``). Rewrites this row's bound;
        returns whether it meets ``eig_tol``."""
        tiny = torch.finfo(torch.float64).tiny
        a = max(abs(exact), tiny)
        err = abs(chk.value - exact) / a
        err_res = float((chk.central - hx).norm()) / a
        scale = max(1.0, 2.0 * err / chk.bias) if chk.bias > 0 else (1.0 if err == 0 else math.inf)
        residual_scale = (max(ROUTE_RESIDUAL_SCALE_FLOOR, 2.0 * err_res / chk.spread) if chk.spread > 0
                          else (1.0 if err_res == 0 else math.inf))
        if math.isinf(scale) or math.isinf(residual_scale):
            return False, "the one-sided route's error estimate is 0 but the exact check is not: exact HVPs"
        self._route_scales[key] = (scale, residual_scale)
        residual, bound = chk.rebound(scale, residual_scale)
        row.update({f"{key}residual": residual, f"{key}error_bound": bound})
        return bound <= self.eig_tol, None

    def _one_sided_value(self, op: Any, H: Any, res: Any, row: dict, key: str) -> tuple[bool, Any]:
        """Central check of the one-sided solve ``res`` on ``op`` (H or P⁻¹H over H's engine): writes the central
        Rayleigh quotient, residual and bound into ``row`` (``key``: ``""`` or ``"preconditioned_"``); returns
        whether the bound meets ``eig_tol`` and the check (:class:`~curvature.route_check.OneSidedCheck`)."""
        scale, residual_scale = self._route_scales.get(key, (1.0, 1.0))
        chk = check_one_sided(op, H.engine, res.eigenvectors[:, 0], res.info.get("ritz_gap"), scale, residual_scale)
        values = list(row[f"{key}eigenvalues"])
        values[0] = chk.value
        name = "sharpness" if not key else "preconditioned_sharpness"
        row.update({name: chk.value, f"{key}eigenvalues": values, f"{key}residual": chk.residual,
                    f"{key}error_bound": chk.error_bound})
        return chk.error_bound <= self.eig_tol, chk

    def _measure(self, model: torch.nn.Module, optimizer: Any, batch: Any, step: int,
                 loss: torch.Tensor | None = None) -> dict:
        t0 = time.perf_counter()
        row: dict[str, Any] = dict.fromkeys(ROW_KEYS)
        row.update(step=step, num_hvps=0, converged=False, when=self.when, eig_tol=self.eig_tol,
                   solver=self.solver, source="operator" if loss is None else "training_graph")
        opt = unwrap_optimizer(optimizer)
        row["optimizer"] = type(opt).__name__ if opt is not None else None
        problems: list[str] = []
        try:
            net = unwrap_model(model)
            signature = self._signature(net)
            if signature != self._signature_seen:
                self.reset()
                self._signature_seen = signature
                self._route, self._route_note, self._route_scales = None, None, {}  # another model: decide again
                self._route_misses = self._p_route_misses = 0
                self._p_route_note = None
            if opt is not None:
                row["lr"] = float(opt.param_groups[0]["lr"])
                with contextlib.suppress(TypeError, ValueError):
                    row["threshold"] = float(stability_threshold(opt))
            device = next(iter(net.parameters()), torch.empty(0)).device
            with frozen_rng(device), torch.enable_grad():
                data = self._data(batch) if loss is None or batch is not None else None
                route, note = self._route_for(net, loss)
                H = self._operator(net, data, loss, route)
                engines = [H]
                row["source"] = getattr(H, "method", None) == "training_graph" and "training_graph" or "operator"
                res = self._h_row(H, self._X_h, row)
                exact_H = None
                calibrating = route == "one_sided" and self.hvp_route == "auto" and self._route is None
                if route == "one_sided":
                    tc = time.perf_counter()
                    chk_ok, chk = self._one_sided_value(H, H, res, row, "")
                    t_grad = min((time.perf_counter() - tc) / 2, self._per_hvp_seconds)  # the check: 2 gradients
                    if calibrating:  # the first row decides, on one exact HVP, also where the safe bound missed
                        tb = time.perf_counter()
                        exact_H = self._operator(net, data, None, "exact")
                        t_build = time.perf_counter() - tb
                        engines.append(exact_H)
                        chk_ok, note = self._first_row_check(exact_H, chk, row, t_grad, t_build)
                        if not chk_ok and note is None:
                            note = (f"the one-sided route's error bound {row['error_bound']:.1e} is above eig_tol "
                                    f"{self.eig_tol:g} on the first row (its error calibrated on one exact HVP): "
                                    "exact HVPs from now on")
                    elif not chk_ok:
                        note = (f"the one-sided route's error bound {row['error_bound']:.1e} is above eig_tol "
                                f"{self.eig_tol:g}: this row solved again with exact HVPs")
                        self._route_misses += 1
                        if self.hvp_route == "auto" and self._route_misses >= ROUTE_MISSES_BEFORE_EXACT:
                            self._route = "exact"  # each miss costs a one-sided solve on top of the exact one
                            self._route_note = (f"the one-sided route missed eig_tol on {self._route_misses} rows "
                                                "(solved again with exact HVPs each time): exact HVPs from now on")
                            note = self._route_note
                    if not chk_ok:  # exact HVPs, warm-started from the one-sided Ritz vectors
                        route = "exact"
                        if self.hvp_route == "auto" and self._route is None:
                            self._route, self._route_note = "exact", note
                        H = exact_H if exact_H is not None else self._operator(net, data, None, "exact")
                        engines.append(H)
                        res = self._h_row(H, self._keep(res), row)
                    elif self.hvp_route == "auto" and self._route is None:
                        self._route = "one_sided"
                row.update(hvp_route=route, hvp_route_note=note)
                if not res.converged:
                    problems.append(f"λ_max(H) did not converge ({_missed(res, self.tol, self.eig_tol)})")

                # lr = 0 (the first step of a warm-up from 0): λ_max(P⁻¹H) is defined, the threshold is not
                P_op = None
                if opt is not None and self._wants_preconditioned(opt, net):
                    lookahead = self.lookahead if self.lookahead != "auto" else lookahead_required(opt)
                    row["lookahead"] = bool(lookahead)
                    row["preconditioner"] = "next_step" if lookahead else "last_step"

                    def preconditioned(inner: Any) -> Any:
                        return PreconditionedHessianOperator(net, self.loss_fn, data, opt, lookahead=lookahead,
                                                             inner=inner, max_grad_norm=self.max_grad_norm)
                    p_route = route
                    if route == "one_sided" and self._p_route_note is not None:
                        p_route = "exact"  # the first row's exact HVP found the one-sided λ(P⁻¹H) off
                        exact_H = exact_H if exact_H is not None else self._operator(net, data, None, "exact")
                        engines.append(exact_H)
                        row["hvp_route"] = "one_sided (H), exact (P⁻¹H)"
                        row["hvp_route_note"] = row["hvp_route_note"] or self._p_route_note
                        P_op = preconditioned(exact_H)
                    elif self.share_graph:
                        P_op = preconditioned(H)
                    else:
                        inner = self._operator(net, data, loss, route)
                        engines.append(inner)
                        P_op = preconditioned(inner)
                    pres = self._p_row(P_op, self._X_p, row)
                    if p_route == "one_sided":
                        ok, pchk = self._one_sided_value(P_op, P_op.inner, pres, row, "preconditioned_")
                        if ok and "preconditioned_" not in self._route_scales:
                            # the first λ(P⁻¹H) that passes its check is checked once more, on one exact HVP (also
                            # with hvp_route="one_sided"): where that is further off than the check's bound, the
                            # check's error estimates are wrong (seen on a GPT with Adam at step 0), and λ(P⁻¹H) goes
                            # exact from now on
                            exact_H = exact_H if exact_H is not None else self._operator(net, data, None, "exact")
                            engines.append(exact_H)
                            exact_p, phx = rayleigh_product(preconditioned(exact_H), pchk.x)
                            row["num_hvps"] += 1
                            perr = abs(pchk.value - exact_p) / max(abs(exact_p), torch.finfo(torch.float64).tiny)
                            ok = perr <= pchk.error_bound and self._calibrate("preconditioned_", pchk, exact_p, phx,
                                                                              row)[0]
                            if not ok:  # the route's error on λ(P⁻¹H) is not under control: exact from now on
                                self._p_route_note = (f"λ(P⁻¹H): its one-sided value was {perr:.1e} off an exact HVP "
                                                      f"on the same vector (step {step}): exact HVPs for it from then on")
                        elif not ok:
                            self._p_route_misses += 1
                            if self._p_route_misses >= ROUTE_MISSES_BEFORE_EXACT:
                                self._p_route_note = (f"λ(P⁻¹H): its one-sided bound missed eig_tol on "
                                                      f"{self._p_route_misses} rows: exact HVPs for it from then on")
                        if not ok:
                            row["hvp_route_note"] = (
                                f"{self._p_route_note}; this row's λ(P⁻¹H) solved again with exact HVPs"
                                if self._p_route_note is not None else
                                f"the one-sided route's error bound on λ(P⁻¹H) {row['preconditioned_error_bound']:.1e} "
                                f"is above eig_tol {self.eig_tol:g}: λ(P⁻¹H) solved again with exact HVPs")
                            row["hvp_route"] = "one_sided (H), exact (P⁻¹H)"
                            exact_H = exact_H if exact_H is not None else self._operator(net, data, None, "exact")
                            engines.append(exact_H)
                            P_op = preconditioned(exact_H)
                            pres = self._p_row(P_op, self._keep(pres), row)
                    row["converged"] = row["converged"] and bool(pres.converged)
                    if not pres.converged:
                        problems.append(f"λ_max(P⁻¹H) did not converge ({_missed(pres, self.tol, self.eig_tol)})")
                if route == "one_sided":
                    row["converged"] = row["converged"] and row["error_bound"] <= self.eig_tol and (
                        row["preconditioned_error_bound"] is None or row["preconditioned_error_bound"] <= self.eig_tol)
                row["num_gradients"] = sum(_gradient_passes(e) for e in {id(e): e for e in engines}.values())
                compiled = [s for s in (getattr(e, "compile_seconds", None) for e in {id(e): e for e in engines}.values())
                            if s is not None]
                row["compile_seconds"] = sum(compiled) if compiled else None  # compile=True: in `seconds` too
                if self.signals:
                    row.update(self._signals(net, opt, H, P_op, data))
                    row["num_hvps"] += row["signals_num_hvps"] or 0
            # the threshold of an optimizer with a diagonal P is one for λ(P⁻¹H), never for λ(H)
            top = row["preconditioned_sharpness"] if opt is not None and has_diagonal_preconditioner(opt) \
                else row["sharpness"]
            if row["threshold"] is not None and top is not None:
                row["edge_ratio"] = float(edge_ratio(opt, top))
        except Exception as exc:  # noqa: BLE001 - a measurement must never stop training unless asked to
            if isinstance(exc, RemoteRankError) and exc.interrupted:
                raise  # another rank was stopped (Ctrl-C, sys.exit): this one stops too instead of training on alone
            msg = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")
            problems.insert(0, msg)
            row["converged"] = False
            row["error_kind"] = failure_kind(exc, first=not self._succeeded)
            log.debug("measurement at step %s failed", step, exc_info=True)
            if row["error_kind"] == "setup":
                explained = explain_setup_failure(exc, self.loss_fn, self._shown_data(batch),
                                                 data_name="probe" if self.probe is not None else "batch")
                if self.setup_errors == "raise":
                    raise TrackingSetupError(
                        f"curvature: {explained}\n(no row was written; this tracker raises on a first measurement "
                        "that fails like this because every later one would too: SharpnessTracker(..., "
                        "setup_errors='warn') warns once instead)") from exc
                problems[0] = f"{msg} [set-up: {explained.splitlines()[1]}]"
        if row["sharpness"] is not None:
            self._succeeded = True
        row["seconds"] = time.perf_counter() - t0
        if opt is not None:
            row["stability_note"] = self._stability_note(opt, row, problems)
        if problems:
            row["error"] = "; ".join(problems)
            row["error_kind"] = row["error_kind"] or "not_converged"
            if self.on_error == "warn":
                self._warn_failure(row["error_kind"], step, row["error"])
        return row

    def _shown_data(self, batch: Any) -> Any:
        """The data a failed measurement was given (after ``batch_transform``), for its error message."""
        data = self.probe if self.probe is not None else batch
        if self.batch_transform is not None:
            with contextlib.suppress(Exception):
                data = self.batch_transform(data)
        return data

    def _warn_failure(self, kind: str, step: Any, text: str) -> None:
        """One :class:`TrackingWarning` per kind of failure, then again at the 10th, 100th, ... with the count."""
        count = self.failures[kind] = self.failures.get(kind, 0) + 1
        if count == 1:
            warnings.warn(f"curvature: sharpness measurement at step {step} failed ({text}); training continues. "
                          f"Further failures of this kind ({kind}) are counted in tracker.failures and warned at "
                          "the 10th, 100th, ...; each row says why in its error and error_kind columns",
                          TrackingWarning, stacklevel=5)
        elif math.log10(count).is_integer():
            warnings.warn(f"curvature: {count} sharpness measurements have failed with {kind} so far (the latest at "
                          f"step {step}: {text}); training continues", TrackingWarning, stacklevel=5)

    def _critical_only_row(self, step: int, optimizer: Any) -> dict:
        row: dict[str, Any] = dict.fromkeys(ROW_KEYS)
        opt = unwrap_optimizer(optimizer)
        row.update(step=step, num_hvps=0, when=self.when, optimizer=type(opt).__name__ if opt is not None else None)
        if isinstance(opt, torch.optim.Optimizer):
            with contextlib.suppress(TypeError, ValueError):
                row["lr"] = float(opt.param_groups[0]["lr"])
            with contextlib.suppress(TypeError, ValueError):
                row["threshold"] = float(stability_threshold(opt))
            if row["threshold"] is None:
                with contextlib.suppress(TypeError, ValueError):
                    row["stability_note"] = stability_note(opt)
        return row

    def _add_critical(self, row: dict, model: torch.nn.Module, optimizer: Any, batch: Any,
                      loss: torch.Tensor | None) -> None:
        """The critical-sharpness columns of ``row`` (a failure goes into ``error``; training goes on)."""
        t0 = time.perf_counter()
        only = row.get("sharpness") is None and row.get("source") is None
        try:
            net = unwrap_model(model)
            data = self._data(batch)
            stochastic = net.training and any(isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0
                                              for m in net.modules())
            reuse = loss if (loss is not None and self.probe is None and not stochastic) else None
            options = {k: v for k, v in self.operator_options.items()
                       if k in ("distributed", "process_group", "weight_fn", "inputs_as", "max_batch_size", "seed")}
            if self.when != "before_step":
                raise ValueError("critical sharpness measures the step about to be taken: it needs "
                                 "when='before_step' (after backward(), before optimizer.step())")
            res = critical_sharpness(model, None if self.own_loss else self.loss_fn, data, optimizer,
                                     rtol=self.critical_rtol, lr_start=self._critical_lr, loss=reuse, **options)
            row.update(res.row())
            if only:
                row["loss"] = res.loss
                row["converged"] = res.converged
            if res.note:
                raise RuntimeError(f"critical sharpness: {res.note}")
            self._critical_lr = res.critical_lr
            self._succeeded = True
        except Exception as exc:  # noqa: BLE001 - a measurement must never stop training unless asked to
            if isinstance(exc, RemoteRankError) and exc.interrupted:
                raise  # another rank was stopped (Ctrl-C, sys.exit): this one stops too, as in _measure
            msg = f"critical sharpness: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            msg = msg.rstrip(": ")
            row["error"] = msg if not row.get("error") else f"{row['error']}; {msg}"
            kind = failure_kind(exc, first=not self._succeeded)
            row["error_kind"] = row.get("error_kind") or kind
            log.debug("critical sharpness at step %s failed", row.get("step"), exc_info=True)
            if kind == "setup" and self.setup_errors == "raise":  # the same policy as the λ_max measurement
                explained = explain_setup_failure(exc, self.loss_fn, self._shown_data(batch),
                                                  data_name="probe" if self.probe is not None else "batch")
                raise TrackingSetupError(
                    f"curvature: {explained}\n(no row was written; this tracker raises on a first measurement that "
                    "fails like this because every later one would too: SharpnessTracker(..., "
                    "setup_errors='warn') warns once instead)") from exc
            if self.on_error == "warn":
                self._warn_failure(kind, row.get("step"), msg)
        row["critical_seconds"] = time.perf_counter() - t0
        row["seconds"] = row["critical_seconds"] + (0.0 if only else (row.get("seconds") or 0.0))  # the whole row

    def _signals(self, net: torch.nn.Module, opt: Any, H: Any, P_op: Any, data: Any) -> dict:
        """The per-step signals on the measured batch (see :func:`curvature.signals.step_signals`)."""
        update_opt = opt if isinstance(opt, (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)) else None
        named = list(zip(H.param_names, H.params))
        def loss_after(delta: torch.Tensor) -> float:
            return loss_at(net, self.loss_fn, data, named, delta)
        pre = P_op.preconditioner if P_op is not None and P_op.lookahead else None
        return step_signals(H, update_opt, preconditioner=pre,
                            loss_after=loss_after if data is not None and update_opt is not None else None)

    @staticmethod
    def _signature(net: torch.nn.Module) -> tuple:
        """Which parameters the operator runs over; warm-start vectors are kept only while it is the same."""
        return tuple((id(p), tuple(p.shape), p.requires_grad) for p in net.parameters())

    def _wants_preconditioned(self, opt: Any, net: torch.nn.Module) -> bool:
        if self.preconditioned == "auto":  # a fully-sharded model: P is read shard by shard for Adam/AdamW only
            return has_diagonal_preconditioner(opt) and (is_adam_like(opt) or not is_sharded_model(net))
        if self.preconditioned and not has_diagonal_preconditioner(opt):
            require_diagonal_preconditioner(opt, "preconditioned=True")  # names it and what to use instead
        return bool(self.preconditioned)

    def _stability_note(self, opt: Any, row: dict, problems: list[str]) -> str | None:
        """Why a stability column of this row is empty (None when threshold and edge_ratio are there)."""
        if row["threshold"] is not None and row["edge_ratio"] is not None:
            return None
        try:
            note = stability_note(opt) if row["threshold"] is None else None
            if row["threshold"] is None and note is None:
                stability_threshold(opt)  # raises what is wrong (lr = 0, beta1 = 1, dampening = 1, ...)
        except (TypeError, ValueError) as exc:
            note = f"no stability threshold: {str(exc).splitlines()[0]}"
        if note is None and row["preconditioned_sharpness"] is None and has_diagonal_preconditioner(opt):
            why = "preconditioned=False" if self.preconditioned is False else \
                "λ(P⁻¹H) of a fully-sharded (FSDP2) model is implemented for Adam/AdamW only"
            note = (f"edge_ratio needs λ(P⁻¹H) for {type(opt).__name__} (its threshold is one for P⁻¹H, not H), "
                    f"and {why}")
        if note is None and problems:
            note = "the measurement did not complete; see error"
        return note

    def _emit(self, row: dict) -> None:
        self.last = row
        if self.keep_history:
            self.history.append(row)
        for sink in self.sinks:
            try:
                sink(row)
            except Exception as exc:  # noqa: BLE001
                if self.on_error == "raise":
                    raise
                self._warn_failure("sink", row.get("step"), f"sink {sink!r}: {type(exc).__name__}: {exc}")

    # -- argument checks and the order of calls ----------------------------------------------------------
    def _check_call(self, model: Any, optimizer: Any, batch: Any, step: Any, call: str = _STEP_CALL) -> int | None:
        """The arguments of :meth:`step` / :meth:`measure` in the expected forms (each mistake named), and the
        step label as an int."""
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"{call}: model got {describe(model)}; expected the torch.nn.Module being trained")
        if optimizer is not None and not hasattr(unwrap_optimizer(optimizer), "param_groups"):
            check_not_a_batch_half(optimizer, "optimizer", call)
            raise TypeError(f"{call}: optimizer got {describe(optimizer)}; expected the torch.optim.Optimizer "
                            "that trains the model (or None)")
        check_not_a_batch_half(step, "step", call)
        if batch is not None and self.batch_transform is None:
            check_batch_argument(batch, "batch", call)
        if step is None:
            return None
        try:
            if isinstance(step, bool):
                raise TypeError
            if isinstance(step, float) and step.is_integer():
                return int(step)
            return operator.index(step)  # int, numpy integers, 0-d integer tensors
        except TypeError:
            raise TypeError(f"{call}: step got {describe(step)}; expected the int label of this training step "
                            "(or None: the tracker counts its own calls)") from None

    def _check_order(self, optimizer: Any, step: int) -> None:
        """Warn once when :meth:`step` (``when="before_step"``) runs after ``optimizer.step()`` with no
        ``backward()`` in between (:class:`~curvature.usage.StepOrderWatch`: read-only, never changes training)."""
        opt = unwrap_optimizer(optimizer)
        if opt is None or self._order_watch.warned:
            return
        why = self._order_watch.check(opt, first_call=step == 0 and self._calls == 0)
        if why is not None:
            self._warn_order(opt, why)

    def _warn_order(self, opt: Any, why: str) -> None:
        self._order_watch.warned = True
        warnings.warn(
            f"curvature: tracker.step was called after optimizer.step() ({why}): its rows describe the parameters "
            "after the update, not the ones the update starts from. Fix: call tracker.step(model, optimizer, "
            "(x, y), step=i) after loss.backward() and before optimizer.step(); or, to measure after the update "
            "on purpose, build the tracker with when='after_step'", TrackingWarning, stacklevel=4)
