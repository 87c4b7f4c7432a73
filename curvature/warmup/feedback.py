r"""Curvature-aware warm-up: a feedback controller on the measured edge ratio.

The learning rate is raised toward ``η_trgt`` while the *measured* edge ratio

    r = η·λ / c,   c = η·stability_threshold(optimizer)

stays below a safety fraction ``s`` (``safety``, default **0.5**: half-way to the edge of stability). ``c`` is the
numerator of the stability threshold: 2 for SGD (so ``r = η·λ^H/2``), ``2+2μ`` for SGD with momentum μ, and
``(2+2β₁)/(1−β₁) = 38`` for Adam/AdamW with β₁ = 0.9, where ``λ`` is then the pre-conditioned sharpness
``λ_max(P⁻¹H)`` (Kalra & Barkeshli, *Why Warmup the Learning Rate?*, NeurIPS 2024, arXiv 2406.09405). ``r = 1`` is
the edge of stability; :func:`curvature.optim.edge_ratio` is the same number.

Every ``every`` steps a warm-started :class:`~curvature.tracking.SharpnessTracker` measures ``λ`` (LOBPCG started
from the previous eigenvector: a handful of Hessian-vector products per measurement) and the controller decides:

* **grow** — plan the next rate from the measurement, not by a fixed factor:
  ``η_next = min(s·c/λ̂, growth·η, η_trgt)``, so the *predicted* ratio ``η_next·λ̂/c`` is at most ``s``
  (``λ̂ = λ·(1 + residual)`` inflates the measured value by the solver's relative residual, so an inexact
  eigenvalue errs on the safe side; ``growth`` caps the jump per measurement, because λ can rise as η grows);
* **hold** — the ratio is already near the bound (``r ≥ hold_band·s``): keep η;
* **backoff** — (a) the loss spiked: ``L_t > spike_factor × L_ref`` (``L_ref`` an exponential moving average of
  the earlier, non-spiking losses) or the loss is not finite: ``η ← backoff·η``, the rate that spiked becomes a
  ceiling until the loss is back below ``L_ref``, and λ is measured again at the next step; or (b) the measured
  ratio is *above* ``s`` (λ rose since the last measurement): ``η ← s·c/λ̂``;
* **done** — ``η`` reached ``η_trgt`` (with predicted ratio ``≤ s``): the warm-up is over, no more
  measurements (zero overhead from then on). Loss spikes are still watched (free): a spike backs off and resumes
  the warm-up.

Between measurements η is constant. With ``lr_init=None`` the first measurement sets ``η_0 = min(s·c/λ_0, η_trgt)``
directly: the largest rate the measured curvature allows (compare the catapult-based ``η_init`` of
:func:`~curvature.warmup.find_critical_lr`, which finds ``≈ 2/λ``, the edge itself, with forward passes).

Use in a plain loop — call :meth:`CurvatureAwareWarmup.step` after ``loss.backward()`` and **before**
``optimizer.step()``, with this step's loss and batch; the rate it sets is the one this update uses::

    sched = CurvatureAwareWarmup(opt, model, loss_fn, lr_target=0.1)
    for x, y in loader:
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        sched.step(loss, (x, y))     # measures θ_t on (x, y) when due, sets the lr of update t
        opt.step()

The measurement never changes parameters, ``.grad``, buffers, optimizer state or the RNG (the tracker's
guarantee). Every decision is appended to :attr:`~CurvatureAwareWarmup.history` (``step``, ``lr`` (now set),
``lr_prev``, ``loss``, ``sharpness`` (λ, ``None`` when not measured), ``ratio`` (``η_prev·λ/c``),
``predicted_ratio`` (``η·λ̂/c``), ``action`` ∈ {grow, hold, backoff, done}, ``reason``, ``num_hvps`` ...) and sent to
the tracker's sinks (CSV, JSON lines, TensorBoard, callables): one row per decision, with the measurement's
columns (:data:`~curvature.rows.ROW_KEYS`) plus the decision's.

Frameworks: :func:`lightning_callback` (a Lightning ``Callback``) and :func:`hf_callback` (a Hugging Face
``TrainerCallback``, measuring on a fixed ``probe`` batch); both import their framework only when called.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from ..optim import stability_note, stability_threshold, unwrap_optimizer
from .param_groups import group_lr, set_group_lr

__all__ = ["CurvatureAwareWarmup", "ACTIONS", "lightning_callback", "hf_callback"]

#: The decisions the controller logs.
ACTIONS = ("grow", "hold", "backoff", "done")

_DECISION_KEYS = ("action", "reason", "lr_prev", "ratio", "predicted_ratio", "planned_lr", "numerator",
                  "measured", "reference_loss", "ceiling", "total_hvps")


def _value(loss: Any) -> float | None:
    if loss is None:
        return None
    if isinstance(loss, torch.Tensor):
        return float(loss.detach().reshape(-1)[0]) if loss.numel() else None
    return float(loss)


def threshold_numerator(optimizer: Any) -> float:
    """``c = η·stability_threshold(optimizer)``: 2 (SGD, RMSprop), ``(2+2μ)/(1−d)`` (momentum), ``(2+2β₁)/(1−β₁)``
    (Adam, Adamax, NAdam, RAdam); a ``TypeError`` saying why for optimizers without a threshold (Adagrad, ...).

    Independent of η; read with the first group's lr set to 1 for a moment (and restored)."""
    opt = unwrap_optimizer(optimizer)
    group = opt.param_groups[0]
    old = group_lr(group)
    set_group_lr(group, 1.0)
    try:
        threshold = stability_threshold(opt)
    finally:
        set_group_lr(group, old)
    if threshold is None:  # Adagrad, Adafactor, Adadelta, Muon: nothing to steer the lr against
        raise TypeError(f"a curvature-aware warm-up needs a stability threshold: {stability_note(opt)}")
    return float(threshold)


class CurvatureAwareWarmup:
    r"""Warm-up that raises η toward ``lr_target`` while the measured edge ratio ``η·λ/c`` stays below ``safety``.

    See the module docs for the rule. Args:
        optimizer: ``torch.optim.SGD`` (with or without momentum) or ``Adam``/``AdamW`` (λ is then λ_max(P⁻¹H)).
            Every group's lr is set to ``η`` times its ratio to the first group's lr at construction.
        model, loss_fn: what the tracker measures (``loss_fn(outputs, targets) -> scalar``).
        lr_target: ``η_trgt`` > 0.
        safety: ``s`` ∈ (0, 2): the bound on the predicted edge ratio (0.5 = half the stability threshold; values
            in (1, 2) deliberately allow mild catapults, the spike back-off then acts as the brake).
        growth: largest factor by which one decision may raise η (> 1; default 2).
        every: measure λ every ``every`` steps (and at the step after a back-off).
        backoff: factor (0 < b < 1) applied to η after a loss spike.
        spike_factor: a loss above ``spike_factor × L_ref`` is a spike (> 1; default 1.5).
        hold_band: hold (no growth) when the ratio is already ``≥ hold_band·safety`` (default 0.9).
        lr_init: the rate before the first measurement settles it (``None``: set from the first measurement,
            ``min(s·c/λ_0, η_trgt)``; a number: start there and grow from it).
        loss_ema: β of the reference loss ``L_ref ← β·L_ref + (1−β)·L`` (non-spiking steps only).
        watch_after_done: keep checking for loss spikes after η_trgt is reached (free; a spike resumes warm-up).
        tracker: an existing :class:`~curvature.tracking.SharpnessTracker` to measure with (the controller calls
            its ``measure`` on its own schedule; do not also call ``tracker.step`` on the same steps). ``None``:
            one is built with ``k=1, warm_start=True, tol=tol`` and ``tracker_kwargs``.
        probe: measure on this fixed batch instead of the batch passed to :meth:`step`.
        sinks: where decision rows go (paths ``.csv``/``.jsonl``, a logger, a SummaryWriter, callables); they are
            installed as the tracker's sinks.
        tol: the tracker's eigensolver tolerance (relative residual) when it builds one.
        **tracker_kwargs: more :class:`~curvature.tracking.SharpnessTracker` options (``dtype``, ``max_iters``, ...).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, loss_fn: Callable | None,
                 lr_target: float, *, safety: float = 0.5, growth: float = 2.0, every: int = 5,
                 backoff: float = 0.5, spike_factor: float = 1.5, hold_band: float = 0.9,
                 lr_init: float | None = None, loss_ema: float = 0.9, watch_after_done: bool = True,
                 tracker: Any = None, probe: Any = None, sinks: Iterable[Any] = (), tol: float = 1e-3,
                 **tracker_kwargs: Any) -> None:
        from ..tracking import SharpnessTracker, make_sink

        lr_target = float(lr_target)
        if not (math.isfinite(lr_target) and lr_target > 0):
            raise ValueError(f"lr_target must be a finite number > 0, got {lr_target!r}")
        if not (0 < safety < 2):
            raise ValueError(f"safety must be in (0, 2) (a fraction of the stability threshold), got {safety!r}")
        if not growth > 1:
            raise ValueError(f"growth must be > 1, got {growth!r}")
        if int(every) < 1:
            raise ValueError(f"every must be >= 1, got {every!r}")
        if not (0 < backoff < 1):
            raise ValueError(f"backoff must be in (0, 1), got {backoff!r}")
        if not spike_factor > 1:
            raise ValueError(f"spike_factor must be > 1, got {spike_factor!r}")
        if not (0 < hold_band <= 1):
            raise ValueError(f"hold_band must be in (0, 1], got {hold_band!r}")
        if not (0 <= loss_ema < 1):
            raise ValueError(f"loss_ema must be in [0, 1), got {loss_ema!r}")
        if lr_init is not None and not (math.isfinite(lr_init) and 0 < lr_init <= lr_target):
            raise ValueError(f"lr_init must be in (0, lr_target], got {lr_init!r}")
        self.optimizer = optimizer
        self.model = model
        self.loss_fn = loss_fn
        self.lr_target = lr_target
        self.safety = float(safety)
        self.growth = float(growth)
        self.every = int(every)
        self.backoff = float(backoff)
        self.spike_factor = float(spike_factor)
        self.hold_band = float(hold_band)
        self.lr_init = None if lr_init is None else float(lr_init)
        self.loss_ema = float(loss_ema)
        self.watch_after_done = bool(watch_after_done)
        opt = unwrap_optimizer(optimizer)
        ref = group_lr(opt.param_groups[0])
        self.ratios = [1.0 if ref == 0 else group_lr(g) / ref for g in opt.param_groups]
        self.numerator = threshold_numerator(opt)
        if tracker is None:
            tracker = SharpnessTracker(loss_fn, every=self.every, k=1, tol=tol, warm_start=True, probe=probe,
                                       **tracker_kwargs)
        elif probe is not None:
            tracker.probe = probe
        self.tracker = tracker
        self.tracker.sinks = list(getattr(tracker, "sinks", [])) + [make_sink(s) for s in sinks]
        self.history: list[dict[str, Any]] = []
        self.lr: float | None = None
        self.reference: float | None = None
        self.ceiling: float | None = None
        self.done = False
        self.step_count = 0
        self.last_measure_step: int | None = None
        self.measure_next = False
        self.last_backoff: tuple[int, float] | None = None
        self.last_lambda: float | None = None
        self.num_hvps = 0
        self.measurements = 0
        self.reached_step: int | None = None
        if self.lr_init is not None:
            self._apply(self.lr_init)

    # -- public ---------------------------------------------------------------------------------------
    def step(self, loss: float | torch.Tensor | None = None, batch: Any = None, step: int | None = None) -> float:
        """Feed this step's training loss and batch (after ``backward()``, before ``optimizer.step()``); returns the
        learning rate (first group) now set, which the coming update uses.

        ``loss=None`` skips the spike check on this step (the loss of a measurement, on the probe, is used when
        there is one); ``batch`` may be ``None`` when the controller has a ``probe``. ``step`` labels the log rows
        (default: the number of earlier calls).
        """
        t = self.step_count if step is None else int(step)
        self.step_count += 1
        value = _value(loss)
        value = self._global_loss(value, batch)
        # 1. loss spike (cheap, every step; also after done when watch_after_done)
        if value is not None and (not self.done or self.watch_after_done):
            if self._is_spike(value, t):
                return self._back_off(t, value)
            self._update_reference(value)
        if self.done:
            return self.lr  # type: ignore[return-value]
        # 2. measure when due
        due = (self.last_measure_step is None or self.measure_next or t - self.last_measure_step >= self.every)
        if not due:
            return self.lr if self.lr is not None else group_lr(unwrap_optimizer(self.optimizer).param_groups[0])
        return self._measure_and_decide(t, value, batch)

    def get_last_lr(self) -> list[float]:
        """The current lr of every group (like PyTorch schedulers)."""
        return [group_lr(g) for g in unwrap_optimizer(self.optimizer).param_groups]

    @property
    def decisions(self) -> list[dict[str, Any]]:
        """Alias of :attr:`history`."""
        return self.history

    def state_dict(self) -> dict[str, Any]:
        keys = ("lr", "reference", "ceiling", "done", "step_count", "last_measure_step", "measure_next",
                "last_backoff", "last_lambda", "num_hvps", "measurements", "reached_step", "ratios", "numerator")
        state = {k: getattr(self, k) for k in keys}
        state["history"] = [dict(r) for r in self.history]
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, list(v) if k == "history" else v)
        if self.lr is not None:
            self._apply(self.lr)

    def close(self) -> None:
        """Close the tracker's file sinks."""
        self.tracker.close()

    def __repr__(self) -> str:
        return (f"CurvatureAwareWarmup(lr_target={self.lr_target:g}, safety={self.safety:g}, every={self.every}, "
                f"lr={self.lr}, done={self.done}, decisions={len(self.history)}, hvps={self.num_hvps})")

    # -- internals ------------------------------------------------------------------------------------
    def _global_loss(self, value: float | None, batch: Any) -> float | None:
        """Under ``torch.distributed`` (the tracker's ``distributed`` option, auto by default) the training loss
        fed on each rank is replaced by the global sample-weighted mean over the ranks, so spike checks and
        decisions, and so the lr, are the same on every rank (λ is already global: the tracker's operator
        all-reduces). Every rank must feed a loss, or none, on the same steps."""
        from ..data import own_loss_batch
        from ..distributed import resolve_process_group
        from ..hvp import as_batches
        from .catapult import global_mean

        if value is None:
            return None
        options = getattr(self.tracker, "operator_options", {}) or {}
        group = resolve_process_group(options.get("distributed"), options.get("process_group"))
        if group is None:
            return value
        weight = 1.0
        if batch is not None:
            try:
                data = batch if self.loss_fn is not None else own_loss_batch(batch)
                weight = float(sum(b.size for b in as_batches(data)))
            except (TypeError, ValueError):
                weight = 1.0
        return global_mean(value, weight, group)

    def _apply(self, lr: float) -> None:
        self.lr = float(lr)
        for g, r in zip(unwrap_optimizer(self.optimizer).param_groups, self.ratios):
            set_group_lr(g, self.lr * r)

    def _current_lr(self) -> float:
        return self.lr if self.lr is not None else group_lr(unwrap_optimizer(self.optimizer).param_groups[0])

    def _is_spike(self, value: float, t: int) -> bool:
        if not math.isfinite(value):
            return True
        if self.reference is None or not value > self.spike_factor * self.reference:
            return False
        if self.last_backoff is not None and t - self.last_backoff[0] < self.every:
            # within the cool-down of a back-off: only a loss still rising by spike_factor counts again
            return value > self.spike_factor * self.last_backoff[1]
        return True

    def _update_reference(self, value: float) -> None:
        if self.reference is None:
            self.reference = value
        else:
            self.reference = self.loss_ema * self.reference + (1 - self.loss_ema) * value
        if self.ceiling is not None and value < self.reference:
            self.ceiling = None  # recovered from the spike

    def _back_off(self, t: int, value: float) -> float:
        prev = self._current_lr()
        new = prev * self.backoff
        self.ceiling = prev if self.ceiling is None else min(self.ceiling, prev)
        self.last_backoff = (t, value if math.isfinite(value) else math.inf)
        self.measure_next = True
        was_done = self.done
        self.done = False
        self._apply(new)
        reason = ("non-finite loss" if not math.isfinite(value)
                  else f"loss spike: {value:.4g} > {self.spike_factor:g} x reference {self.reference:.4g}")
        if was_done:
            reason += " (after reaching lr_target: warm-up resumed)"
        self._log(t, value, None, prev, new, "backoff", reason)
        return new

    def _measure_and_decide(self, t: int, value: float | None, batch: Any) -> float:
        prev = self._current_lr()
        if prev <= 0:
            self._apply(self.lr_target * 1e-3)  # stability_threshold needs lr > 0
            prev = self.lr  # type: ignore[assignment]
        sinks, self.tracker.sinks = self.tracker.sinks, []
        try:
            row = self.tracker.measure(self.model, self.optimizer, batch, step=t)
        finally:
            self.tracker.sinks = sinks
        self.last_measure_step = t
        self.measure_next = False
        self.measurements += 1
        self.num_hvps += int(row.get("num_hvps") or 0)
        lam = row.get("preconditioned_sharpness")
        residual = row.get("preconditioned_residual")
        if lam is None:
            lam, residual = row.get("sharpness"), row.get("residual")
        if value is None and row.get("loss") is not None:  # no training loss given: use the probe's
            value = float(row["loss"])
            if self._is_spike(value, t):
                return self._back_off(t, value)
            self._update_reference(value)
        if lam is None or not math.isfinite(lam):
            self._log(t, value, row, prev, prev, "hold", f"no usable measurement ({row.get('error')})")
            return prev
        lam = float(lam)
        opt = unwrap_optimizer(self.optimizer)
        if isinstance(opt, torch.optim.SGD):  # L2 weight decay: SGD sees H + wd·I
            lam += float(opt.param_groups[0].get("weight_decay", 0.0) or 0.0)
        self.last_lambda = lam
        res = float(residual) if residual is not None and math.isfinite(residual) else 0.0
        lam_hat = lam * (1.0 + min(max(res, 0.0), 1.0))
        c = self.numerator
        ratio = prev * lam / c
        planned = self.safety * c / lam_hat if lam_hat > 0 else math.inf
        cap = self.lr_target if self.ceiling is None else min(self.lr_target, self.ceiling)
        if self.lr is None:  # first measurement (no lr_init): start at the plan
            new, action, reason = min(planned, cap), "grow", "initial rate from the first measurement"
            ratio = None
        elif prev * lam_hat / c > self.safety:  # above the bound: down to the plan
            new, action, reason = planned, "backoff", f"ratio {prev * lam_hat / c:.3g} above safety {self.safety:g}"
        elif ratio >= self.hold_band * self.safety or prev >= cap:
            new, action = prev, "hold"
            reason = "ratio near the bound" if prev < cap else "at the ceiling of a recent spike"
        else:
            new, action, reason = min(planned, self.growth * prev, cap), "grow", "ratio below safety"
            if new <= prev:
                new, action, reason = prev, "hold", "planned rate not above the current one"
        if new >= self.lr_target * (1 - 1e-12) and action in ("grow", "hold"):
            new, action, reason = self.lr_target, "done", "reached lr_target"
            self.done = True
            if self.reached_step is None:
                self.reached_step = t
        self._apply(new)
        self._log(t, value, row, prev, new, action, reason, lam=lam, ratio=ratio,
                  predicted=new * lam_hat / c, planned=planned)
        return new

    def _log(self, t: int, value: float | None, row: dict | None, prev: float, new: float, action: str,
             reason: str, lam: float | None = None, ratio: float | None = None, predicted: float | None = None,
             planned: float | None = None) -> None:
        from ..tracking import ROW_KEYS

        record: dict[str, Any] = dict.fromkeys(ROW_KEYS)
        if row is not None:
            record.update(row)
        else:
            record["num_hvps"] = 0
        record.update(step=t, lr=new, loss=value if value is not None else record.get("loss"),
                      action=action, reason=reason, lr_prev=prev, ratio=ratio, predicted_ratio=predicted,
                      planned_lr=planned, numerator=self.numerator, measured=row is not None,
                      reference_loss=self.reference, ceiling=self.ceiling, total_hvps=self.num_hvps)
        if lam is not None:
            record["lambda"] = lam
        record["threshold"] = self.numerator / new if new > 0 else None
        record["edge_ratio"] = ratio if ratio is not None else record.get("edge_ratio")
        if row is not None:
            row.update({k: record[k] for k in _DECISION_KEYS})  # the tracker's own history gets the decision too
        self.history.append(record)
        for sink in self.tracker.sinks:
            try:
                sink(record)
            except Exception as exc:  # noqa: BLE001 - logging must not stop training
                import warnings

                warnings.warn(f"curvature: sink {sink!r} failed ({type(exc).__name__}: {exc})", RuntimeWarning,
                              stacklevel=3)


# ---------------------------------------------------------------------------------------------------
# Framework adapters (imported lazily)
# ---------------------------------------------------------------------------------------------------
def lightning_callback(loss_fn: Callable | None, lr_target: float, *, batch_transform: Callable | None = None,
                       optimizer_index: int = 0, **kwargs: Any) -> Any:
    """A Lightning ``Callback`` that drives a :class:`CurvatureAwareWarmup` on the module's optimizer.

    The controller is built at ``on_train_start`` (the optimizer exists then); at ``on_before_optimizer_step``
    (after backward) it gets the loss (from ``on_before_backward``) and the batch (from ``on_train_batch_start``,
    through ``batch_transform(batch) -> (inputs, targets)`` when given). Don't combine with another lr scheduler
    on that optimizer. The controller is ``callback.controller``. ``kwargs`` go to :class:`CurvatureAwareWarmup`.
    """
    try:
        from lightning.pytorch import Callback
    except ImportError:  # pragma: no cover - old package name
        from pytorch_lightning import Callback  # type: ignore[no-redef]

    class CurvatureAwareWarmupCallback(Callback):
        def __init__(self) -> None:
            self.controller: CurvatureAwareWarmup | None = None
            self._batch: Any = None
            self._loss: Any = None

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            opt = trainer.optimizers[optimizer_index]
            self.controller = CurvatureAwareWarmup(opt, pl_module, loss_fn, lr_target, **kwargs)

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            self._batch = batch_transform(batch) if batch_transform is not None else batch

        def on_before_backward(self, trainer: Any, pl_module: Any, loss: Any) -> None:
            self._loss = loss.detach() if isinstance(loss, torch.Tensor) else loss

        def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
            if self.controller is not None:
                self.controller.step(self._loss, self._batch, step=trainer.global_step)

    return CurvatureAwareWarmupCallback()


def hf_callback(loss_fn: Callable | None, lr_target: float, probe: Any, **kwargs: Any) -> Any:
    """A Hugging Face ``TrainerCallback`` that drives a :class:`CurvatureAwareWarmup`.

    The ``Trainer`` does not show callbacks the batch or the loss, so the controller measures on a fixed
    ``probe`` batch (``loss_fn=None`` for models that return their own loss: ``probe`` is then a dict with
    ``labels``), and spikes are judged on the probe loss at measurement steps. It acts at
    ``on_pre_optimizer_step`` (after backward, before the optimizer step). Pass ``lr_scheduler_type="constant"``
    to the Trainer so it does not overwrite the rate. The controller is ``callback.controller``.
    """
    from transformers import TrainerCallback

    class CurvatureAwareWarmupHFCallback(TrainerCallback):
        def __init__(self) -> None:
            self.controller: CurvatureAwareWarmup | None = None

        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None,
                                  optimizer: Any = None, **kw: Any) -> None:
            if self.controller is None:
                self.controller = CurvatureAwareWarmup(optimizer, model, loss_fn, lr_target, probe=probe, **kwargs)
            self.controller.step(None, None, step=state.global_step)

    return CurvatureAwareWarmupHFCallback()
