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
the step, and the row's ``step`` is ``trainer.global_step`` = the number of updates already applied, like a plain
loop that calls ``tracker.step(..., step=i)`` before ``optimizer.step()``. ``when="after_step"`` measures in
``on_train_batch_end`` after the update (``step`` = updates applied, then including this one). ``probe_batch``
measures on a fixed batch instead of the current one. DDP/compiled wrappers are unwrapped (curvature of the
underlying module, on each rank's data; all-reduced across ranks when ``torch.distributed`` is initialised).

Values go to ``pl_module.log`` (``callback_metrics``, as ``curvature/sharpness`` etc.; not to the loggers there,
since Lightning only forwards every ``log_every_n_steps``) and straight to every ``trainer.loggers`` entry with
``log_metrics(..., step=row["step"])``.

The class derives from ``lightning.pytorch.Callback`` when the ``lightning`` package is installed, else from
``pytorch_lightning.Callback``; ``PLSharpnessCallback`` is the ``pytorch_lightning`` flavour when both are
installed (a Trainer accepts only callbacks of its own package).
"""
from __future__ import annotations

from typing import Any, Callable

from ..tracking import SCALAR_KEYS, SharpnessTracker

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
                          "(or pytorch-lightning), or pip install 'curvature[lightning]'")
    return lightning_cb, pl_cb


class _SharpnessCallbackMixin:
    """The Lightning-version-independent part (see the module docs)."""

    def __init__(self, loss_fn: Callable | None, every: int = 50, probe_batch: Any = None, *,
                 log_to_trainer: bool = True, prefix: str = "curvature/", **tracker_kwargs: Any) -> None:
        super().__init__()
        if probe_batch is None:
            probe_batch = tracker_kwargs.pop("probe", None)
        self.tracker = SharpnessTracker(loss_fn, every=every, probe=probe_batch, **tracker_kwargs)
        self.log_to_trainer = log_to_trainer
        self.prefix = prefix
        self._batch: Any = None
        self._last_step: int | None = None

    @property
    def history(self) -> list[dict]:
        return self.tracker.history

    # -- hooks ----------------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._batch = batch

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if self.tracker.when == "before_step":
            self._maybe_measure(trainer, pl_module, optimizer, int(trainer.global_step))

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.tracker.when == "after_step" and trainer.optimizers:
            self._maybe_measure(trainer, pl_module, trainer.optimizers[0], int(trainer.global_step))
        self._batch = None

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.tracker.close()

    # -- internals ------------------------------------------------------------------------------------
    def _maybe_measure(self, trainer: Any, pl_module: Any, optimizer: Any, step: int) -> None:
        # once per optimizer step (several optimizers, or after_step with gradient accumulation)
        if step == self._last_step or not self.tracker.should_measure(step):
            return
        self._last_step = step
        if self.tracker.probe is None and self._batch is None:
            return
        row = self.tracker.measure(pl_module, optimizer, self._batch, step)
        if self.log_to_trainer:
            self._log(trainer, pl_module, row)

    def _log(self, trainer: Any, pl_module: Any, row: dict) -> None:
        metrics = {self.prefix + k: float(row[k]) for k in SCALAR_KEYS
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
        "``on_error``, ``batch_transform``, ...). Rows: ``.history``; the tracker: ``.tracker``.")})
    return cls


SharpnessCallback = _make(_LIGHTNING_BASE or _PL_BASE, "SharpnessCallback")
PLSharpnessCallback = _make(_PL_BASE, "PLSharpnessCallback") if _PL_BASE is not None else SharpnessCallback
