"""Lightning callback: sharpness every N optimizer steps, logged to the Trainer's loggers and the tracker's sinks.

::

    from curvature.integrations.lightning import SharpnessCallback
    cb = SharpnessCallback(F.cross_entropy, every=50, sinks=["sharpness.csv"])
    trainer = lightning.Trainer(max_steps=1000, callbacks=[cb])
    trainer.fit(module, loader)
    cb.history        # the rows (also cb.tracker.to_dataframe())

The LightningModule is called as ``pl_module(inputs)`` (its ``forward``) on a batch ``(inputs, targets)``; give
``batch_transform=fn`` (batch → (inputs, targets)) for other batch layouts. By default (``when="before_step"``)
the measurement runs in ``on_before_optimizer_step`` (after backward, before the update) on the last micro-batch of
the step; ``when="after_step"`` measures in ``on_train_batch_end`` after the update. ``probe_batch`` measures on a
fixed batch instead of the current one. DDP/compiled wrappers are unwrapped (curvature of the underlying module,
on each rank's data; all-reduced across ranks when ``torch.distributed`` is initialised).

**Step.** A row's ``step`` is Lightning's own logging step (the batches that stepped the optimizers so far, the
axis of ``self.log`` and ``LearningRateMonitor``): the updates applied before this one (``before_step``), or
including it (``after_step``). With one optimizer this equals ``trainer.global_step``; with manual optimization
and several optimizers ``global_step`` counts every optimizer's steps (2 per batch for two), the logging step
one per batch, so the rows share the loggers' axis.

**Several optimizers** (manual optimization): each optimizer ``i`` gets its own tracker over *its own* parameters
(``optimizer.param_groups``), with its own lr, stability threshold and warm-start vectors; its rows carry
``optimizer_index = i`` and are logged as ``curvature/optimizer_{i}/sharpness`` etc. ``cb.trackers[i]`` is that
tracker, ``cb.history`` all rows in order.

**Logging.** Values go to ``pl_module.log`` (``callback_metrics``, as ``curvature/sharpness`` etc.; not to the
loggers there, since Lightning only forwards every ``log_every_n_steps``) and straight to every
``trainer.loggers`` entry with ``log_metrics(..., step=row["step"])`` (Lightning's loggers write on rank 0 only).
The tracker's own sinks (files, ...) are written on global rank 0 only; the values are the same on every rank.

**Resume.** The callback's ``state_dict`` (saved in Lightning checkpoints) holds every tracker's rows and
warm-start vectors, so after ``trainer.fit(module, ckpt_path=...)`` the history continues and the first new row is
warm-started.

The class derives from ``lightning.pytorch.Callback`` when the ``lightning`` package is installed, else from
``pytorch_lightning.Callback``; ``PLSharpnessCallback`` is the ``pytorch_lightning`` flavour when both are
installed (a Trainer accepts only callbacks of its own package).
"""
from __future__ import annotations

import warnings
from typing import Any, Callable

from ..optim import unwrap_optimizer
from ..tracking import SCALAR_KEYS, SharpnessTracker, TrackingWarning

__all__ = ["SharpnessCallback", "PLSharpnessCallback"]


def _bases() -> tuple[type | None, type | None]:
    lightning_cb = pl_cb = None
    try:
        from lightning.pytorch import Callback as lightning_cb  # type: ignore[no-redef]
    except ImportError:
        pass
    try:
        from pytorch_lightning import Callback as pl_cb  # type: ignore[no-redef]
    except ImportError:
        pass
    if lightning_cb is None and pl_cb is None:
        raise ImportError("curvature.integrations.lightning needs Lightning: pip install lightning "
                          "(or pytorch-lightning), or pip install 'torch-curvature[lightning]'")
    return lightning_cb, pl_cb


def _logging_step(trainer: Any) -> int:
    """Lightning's logging step: the batches that stepped the optimizers so far (the loggers' x axis)."""
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    value = getattr(loop, "_batches_that_stepped", None)
    return int(trainer.global_step if value is None else value)


class _SharpnessCallbackMixin:
    """The Lightning-version-independent part (see the module docs)."""

    def __init__(self, loss_fn: Callable | None, every: int = 50, probe_batch: Any = None, *,
                 log_to_trainer: bool = True, prefix: str = "curvature/", **tracker_kwargs: Any) -> None:
        super().__init__()
        if probe_batch is None:
            probe_batch = tracker_kwargs.pop("probe", None)
        self._loss_fn = loss_fn
        self._tracker_kwargs = dict(tracker_kwargs, every=every, probe=probe_batch)
        self.tracker = SharpnessTracker(loss_fn, **self._tracker_kwargs)
        self.trackers: dict[int, SharpnessTracker] = {0: self.tracker}
        self._shared_sinks: list[Callable[[dict], Any]] | None = None
        self.log_to_trainer = log_to_trainer
        self.prefix = prefix
        self._batch: Any = None
        self._last: dict[int, int] = {}
        self._rows: list[dict] = []
        self._multi = False
        self._pending: dict | None = None

    @property
    def history(self) -> list[dict]:
        """All rows, in the order they were measured (with several optimizers: every optimizer's)."""
        return self._rows if self._multi else self.tracker.history

    # -- state (saved in Lightning checkpoints) ------------------------------------------------------
    @property
    def state_key(self) -> str:
        """Distinct per configuration, so several of these callbacks in one Trainer keep separate states."""
        return f"{type(self).__qualname__}{{prefix={self.prefix!r}, every={self.tracker.every}}}"

    def state_dict(self) -> dict[str, Any]:
        return {"version": 1, "multi": self._multi, "last": dict(self._last),
                "trackers": {i: t.state_dict() for i, t in self.trackers.items()}, "rows": list(self._rows)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = dict(state_dict)  # applied at on_train_start, when the model (for the vectors) is known

    def _apply_pending(self, trainer: Any, pl_module: Any) -> None:
        state, self._pending = self._pending, None
        if not state:
            return
        self._configure(trainer)
        for i, tracker_state in (state.get("trackers") or {}).items():
            tracker = self._tracker_for(int(i), trainer)
            tracker.load_state_dict(tracker_state, model=pl_module)
        self._rows = [dict(r) for r in state.get("rows", [])]
        self._last = {int(k): int(v) for k, v in (state.get("last") or {}).items()}

    # -- set-up ---------------------------------------------------------------------------------------
    def _configure(self, trainer: Any) -> None:
        optimizers = list(getattr(trainer, "optimizers", []) or [])
        self._multi = len(optimizers) > 1
        if int(getattr(trainer, "global_rank", 0) or 0) != 0:
            self.tracker.sinks = []  # files and logs are written by global rank 0 only
        if self._multi and self._shared_sinks is None:
            # one set of sinks for all trackers (one CSV file, one header); rows carry optimizer_index
            self._shared_sinks, self.tracker.sinks = self.tracker.sinks, []

    def _tracker_for(self, index: int, trainer: Any) -> SharpnessTracker:
        if not self._multi:
            return self.tracker
        if index not in self.trackers or "params" not in self.trackers[index].operator_options:
            opt = unwrap_optimizer(trainer.optimizers[index])
            params = [p for g in opt.param_groups for p in g["params"] if p.requires_grad]
            kwargs = dict(self._tracker_kwargs, sinks=(), params=params)
            self.trackers[index] = SharpnessTracker(self._loss_fn, **kwargs)
            if index == 0:
                self.tracker = self.trackers[0]
        return self.trackers[index]

    # -- hooks ----------------------------------------------------------------------------------------
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._configure(trainer)
        if self._pending is not None:
            self._apply_pending(trainer, pl_module)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._batch = batch

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if self.tracker.when == "before_step":
            self._maybe_measure(trainer, pl_module, optimizer, _logging_step(trainer))

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.tracker.when == "after_step" and trainer.optimizers:
            step = _logging_step(trainer) + 1  # this batch's update is applied; the counter moves after this hook
            for opt in (trainer.optimizers if self._multi else trainer.optimizers[:1]):
                self._maybe_measure(trainer, pl_module, opt, step)
        self._batch = None

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        for tracker in self.trackers.values():
            tracker.close()
        for sink in self._shared_sinks or []:
            close = getattr(sink, "close", None)
            if callable(close):
                close()

    # -- internals ------------------------------------------------------------------------------------
    def _index(self, trainer: Any, optimizer: Any) -> int:
        raw = unwrap_optimizer(optimizer)
        for i, opt in enumerate(getattr(trainer, "optimizers", []) or []):
            if unwrap_optimizer(opt) is raw:
                return i
        return 0

    def _maybe_measure(self, trainer: Any, pl_module: Any, optimizer: Any, step: int) -> None:
        index = self._index(trainer, optimizer) if self._multi else 0
        tracker = self._tracker_for(index, trainer)
        # once per step and optimizer (gradient accumulation, after_step)
        if self._last.get(index) == step or not tracker.should_measure(step):
            return
        self._last[index] = step
        if tracker.probe is None and self._batch is None:
            return
        row = tracker.measure(pl_module, optimizer, self._batch, step)
        if self._multi:
            row["optimizer_index"] = index
            self._rows.append(row)
            self._emit_shared(row)
        if self.log_to_trainer:
            self._log(trainer, pl_module, row, f"optimizer_{index}/" if self._multi else "")

    def _emit_shared(self, row: dict) -> None:
        for sink in self._shared_sinks or []:
            try:
                sink(row)
            except Exception as exc:  # noqa: BLE001 - a sink never stops training (unless asked)
                if self.tracker.on_error == "raise":
                    raise
                warnings.warn(f"curvature: tracker sink {sink!r} failed ({type(exc).__name__}: {exc}); "
                              "training continues", TrackingWarning, stacklevel=3)

    def _log(self, trainer: Any, pl_module: Any, row: dict, infix: str) -> None:
        metrics = {self.prefix + infix + k: float(row[k]) for k in SCALAR_KEYS
                   if isinstance(row.get(k), (int, float)) and not isinstance(row.get(k), bool)}
        if not metrics:
            return
        for name, value in metrics.items():
            pl_module.log(name, value, on_step=True, on_epoch=False, logger=False, batch_size=1)
        for logger in getattr(trainer, "loggers", []) or []:
            logger.log_metrics(metrics, step=int(row["step"]))


_LIGHTNING_BASE, _PL_BASE = _bases()


def _make(base: type, name: str) -> type:
    cls = type(name, (_SharpnessCallbackMixin, base), {"__module__": __name__, "__doc__": (
        "Lightning callback that runs a :class:`~curvature.tracking.SharpnessTracker` every ``every`` optimizer "
        "steps (base: ``" + base.__module__ + ".Callback``).\n\n"
        "Args: ``loss_fn(outputs, targets)``; ``every``; ``probe_batch`` (a fixed batch; default: the current "
        "one); ``log_to_trainer`` (pl_module.log + trainer.loggers); ``prefix`` of the logged names; the rest are "
        ":class:`~curvature.tracking.SharpnessTracker` options (``k``, ``tol``, ``when``, ``sinks``, "
        "``on_error``, ``batch_transform``, ...). Rows: ``.history``; the tracker(s): ``.tracker``, "
        "``.trackers``. State (rows, warm-start vectors) is saved in Lightning checkpoints.")})
    return cls


SharpnessCallback = _make(_LIGHTNING_BASE or _PL_BASE, "SharpnessCallback")
PLSharpnessCallback = _make(_PL_BASE, "PLSharpnessCallback") if _PL_BASE is not None else SharpnessCallback
