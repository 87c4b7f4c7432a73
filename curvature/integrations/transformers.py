"""Hugging Face ``Trainer`` callback: sharpness every N optimizer steps on a fixed probe batch.

::

    from curvature.integrations.transformers import SharpnessCallback
    cb = SharpnessCallback(every=50, sinks=["sharpness.csv"])       # loss_fn=None: the model's own loss
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[cb])
    cb.attach(trainer)        # optional: rows also go through trainer.log (report_to integrations, log_history)
    trainer.train()
    cb.history

**Probe batch.** HF callbacks do not see the current batch, so the tracker measures on a fixed probe batch: the
``probe_batch`` you give (a dict of tensors as the model takes it, with ``labels``), or else the first
``batch_size`` samples of the Trainer's training set passed through the train dataloader's own collate function
(the same tensors the loader would produce, built without iterating the loader, so its sampler, the RNG and
accelerate's state are untouched). The probe is fixed for the whole run: rows are comparable over time, and
warm-started solves are cheap.

**Loss.** ``loss_fn=None`` (default) uses the model's own loss (``outputs.loss``, the model called with the whole
dict batch, labels included). With a ``loss_fn(outputs, targets)``, a dict batch is split into
``(inputs without "labels", labels)``.

**When.** ``when="before_step"`` (default): in ``on_pre_optimizer_step`` (after backward and gradient clipping,
before ``optimizer.step()``); the row's ``step`` is ``state.global_step`` = updates already applied.
``when="after_step"``: in ``on_step_end`` (after the update and the scheduler step); ``step`` = updates applied,
this one included. ``lr`` is the optimizer's current first-group lr. Accelerate's optimizer wrapper and DDP model
wrappers are unwrapped.

**Logging.** Each row's numbers go to ``state.log_history`` (as ``curvature/sharpness`` etc. with ``step``), through
``trainer.log`` when the callback knows the trainer (:meth:`SharpnessCallback.attach`, or ``trainer=``), so that the
``report_to`` integrations (TensorBoard, W&B, ...) receive them too; rows also go to the tracker's own sinks.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

try:
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("curvature.integrations.transformers needs transformers (and accelerate for the Trainer): "
                      "pip install 'curvature[transformers]'") from exc

from ..tracking import SCALAR_KEYS, SharpnessTracker

__all__ = ["SharpnessCallback", "probe_batch_from_dataloader"]


def probe_batch_from_dataloader(dataloader: Any, size: int | None = None) -> Any:
    """The first ``size`` (default: the loader's batch size) samples of ``dataloader.dataset``, collated with
    ``dataloader.collate_fn``: what the loader would yield for those indices, made without iterating it (no RNG
    draw, no sampler or accelerate state change). Map-style datasets only."""
    dataset = getattr(dataloader, "dataset", None)
    collate = getattr(dataloader, "collate_fn", None)
    if dataset is None or collate is None or not hasattr(dataset, "__getitem__") or isinstance(
            dataset, torch.utils.data.IterableDataset):
        raise ValueError("cannot build a probe batch from this dataloader (no map-style dataset / collate_fn): "
                         "pass probe_batch= to SharpnessCallback")
    if size is None:
        size = getattr(dataloader, "batch_size", None)
        if size is None:
            size = getattr(getattr(dataloader, "batch_sampler", None), "batch_size", None)
    size = int(size or 8)
    n = min(size, len(dataset))
    if n == 0:
        raise ValueError("the training set is empty: pass probe_batch= to SharpnessCallback")
    with torch.random.fork_rng(devices=[]):  # collators may draw (masking); keep the global RNG as it was
        return collate([dataset[i] for i in range(n)])


def _as_dict(batch: Any) -> dict | None:
    if isinstance(batch, dict):
        return batch
    if hasattr(batch, "keys") and hasattr(batch, "__getitem__") and not isinstance(batch, (tuple, list)):
        return {k: batch[k] for k in batch.keys()}  # BatchEncoding and friends
    return None


def _split_labels(batch: Any) -> Any:
    """With a user loss_fn: {..., "labels": y} → ({...}, y); other batches unchanged."""
    d = _as_dict(batch)
    if d is None or "labels" not in d:
        return batch
    inputs = {k: v for k, v in d.items() if k != "labels" and isinstance(v, torch.Tensor)}
    return inputs, d["labels"]


class SharpnessCallback(TrainerCallback):
    """A :class:`~curvature.tracking.SharpnessTracker` inside a ``transformers.Trainer`` (see the module docs).

    Args:
        loss_fn: ``None`` = the model's own loss (``outputs.loss``); or ``loss_fn(outputs, labels)``.
        every: measure when ``state.global_step % every == 0``.
        probe_batch: a fixed batch (dict of tensors, with ``labels``); default: built from the train dataloader.
        probe_size: samples in the default probe batch (default: the train batch size).
        trainer: the Trainer, to log through ``trainer.log`` (or call :meth:`attach`).
        prefix: prefix of the logged names.
        **tracker_kwargs: :class:`~curvature.tracking.SharpnessTracker` options (``k``, ``tol``, ``when``,
            ``sinks``, ``on_error``, ``dtype``, ...).
    """

    def __init__(self, loss_fn: Callable | None = None, every: int = 50, probe_batch: Any = None, *,
                 probe_size: int | None = None, trainer: Any = None, prefix: str = "curvature/",
                 log_to_trainer: bool = True, **tracker_kwargs: Any) -> None:
        if probe_batch is None:
            probe_batch = tracker_kwargs.pop("probe", None)
        if loss_fn is not None and "batch_transform" not in tracker_kwargs:
            tracker_kwargs["batch_transform"] = _split_labels
        self.tracker = SharpnessTracker(loss_fn, every=every, **tracker_kwargs)
        self.probe_batch = probe_batch
        self.probe_size = probe_size
        self.trainer = trainer
        self.prefix = prefix
        self.log_to_trainer = log_to_trainer
        self._last_step: int | None = None

    @property
    def history(self) -> list[dict]:
        return self.tracker.history

    def attach(self, trainer: Any) -> SharpnessCallback:
        """Add this callback to ``trainer`` and log through ``trainer.log``; returns self."""
        self.trainer = trainer
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        return self

    # -- events ---------------------------------------------------------------------------------------
    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.tracker.when == "before_step":
            self._maybe_measure(state, kwargs)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.tracker.when == "after_step":
            self._maybe_measure(state, kwargs)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.tracker.close()

    # -- internals ------------------------------------------------------------------------------------
    def _maybe_measure(self, state: Any, kwargs: dict) -> None:
        step = int(state.global_step)
        if step == self._last_step or not self.tracker.should_measure(step):
            return
        self._last_step = step
        model, optimizer = kwargs.get("model"), kwargs.get("optimizer")
        if model is None:
            return
        try:
            if self.probe_batch is None:
                self.probe_batch = probe_batch_from_dataloader(kwargs.get("train_dataloader"), self.probe_size)
        except Exception as exc:  # noqa: BLE001 - never stop training for a missing probe (unless asked)
            if self.tracker.on_error == "raise":
                raise
            import warnings

            from ..tracking import TrackingWarning
            warnings.warn(f"curvature: no probe batch for the sharpness callback ({exc}); skipping", TrackingWarning)
            return
        row = self.tracker.measure(model, optimizer, self.probe_batch, step)
        if self.log_to_trainer:
            self._log(state, row)

    def _log(self, state: Any, row: dict) -> None:
        metrics = {self.prefix + k: float(row[k]) for k in SCALAR_KEYS
                   if isinstance(row.get(k), (int, float)) and not isinstance(row.get(k), bool)}
        if not metrics:
            return
        if self.trainer is not None:
            self.trainer.log(dict(metrics))
        else:
            state.log_history.append({**metrics, "step": int(state.global_step)})
