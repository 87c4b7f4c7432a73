"""Hugging Face ``Trainer`` callback: sharpness every N optimizer steps on a fixed probe batch.

::

    from curvature.integrations.transformers import SharpnessCallback
    cb = SharpnessCallback(every=50, sinks=["sharpness.csv"])       # loss_fn=None: the model's own loss
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[cb])
    trainer.train()           # curvature/* values reach every report_to integration, on the global_step axis
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

**Logging.** Each row's numbers go through ``trainer.log`` (as ``curvature/sharpness`` etc.): into
``state.log_history`` and to every ``report_to`` integration (TensorBoard, W&B, MLflow, ...), at
``state.global_step`` = the row's ``step``. HF hands callbacks no trainer, so at ``on_train_begin`` the callback
finds the ``Trainer`` whose callback list holds it (on the call stack of ``trainer.train()``); if it cannot (a
custom training loop driving the callback handler), it raises at once with the one line to add,
``cb.attach(trainer)``, instead of training without logging. Rows also go to the tracker's own sinks (paths, ...),
written by the main process only (``state.is_world_process_zero``); the values are the same on every rank.

**Resume.** The callback is an HF stateful callback (``ExportableState``): each checkpoint's
``trainer_state.json`` holds its rows and warm-start vectors (vectors of more than 2^18 numbers go to
``curvature_warm_start.pt`` in the checkpoint folder). After ``trainer.train(resume_from_checkpoint=...)`` the
history continues (rows of the first run, then the new ones) and the first new row is warm-started, whether or not
``restore_callback_states_from_checkpoint`` is set.

**transformers ≥ 4.45** is needed for ``when="before_step"`` (the ``on_pre_optimizer_step`` event): with an older
version the callback raises at construction instead of recording nothing.
"""
from __future__ import annotations

import itertools
import os
import sys
import weakref
from typing import Any, Callable, ClassVar

import torch

try:
    from transformers import TrainerCallback
    from transformers.trainer_callback import ExportableState
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("curvature.integrations.transformers needs transformers (and accelerate for the Trainer): "
                      "pip install 'torch-curvature[transformers]'") from exc

from ..tracking import SCALAR_KEYS, SharpnessTracker, TrackingSetupError, TrackingWarning

__all__ = ["SharpnessCallback", "probe_batch_from_dataloader", "check_hook_support"]


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


_BEFORE_STEP_HOOK = "on_pre_optimizer_step"  # TrainerCallback event added in transformers 4.45


def check_hook_support(callback_base: type = TrainerCallback, when: str = "before_step") -> None:
    """Raise when ``when="before_step"`` cannot work: the installed transformers has no ``on_pre_optimizer_step``
    event (it came in 4.45), so the callback would record nothing."""
    if when == "before_step" and not hasattr(callback_base, _BEFORE_STEP_HOOK):
        import transformers

        raise RuntimeError(
            f"transformers {getattr(transformers, '__version__', '?')} has no TrainerCallback.{_BEFORE_STEP_HOOK} "
            "(added in transformers 4.45), so SharpnessCallback(when='before_step') would record nothing: "
            "pip install 'transformers>=4.45', or use when='after_step'")


def _find_trainer(callback: Any) -> Any:
    """The ``transformers.Trainer`` whose callback handler holds ``callback``, from the frames of the running
    ``trainer.train()`` (HF passes no trainer to callbacks); ``None`` if there is none on the stack."""
    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        handler = getattr(candidate, "callback_handler", None)
        if handler is not None and callable(getattr(candidate, "log", None)) and any(
                cb is callback for cb in getattr(handler, "callbacks", ())):
            return candidate
        frame = frame.f_back
    return None


def _callback_being_restored(cls: type, uid: str) -> Any:
    """The instance HF's ``_load_callback_state`` is rebuilding: among the callbacks of the Trainer on the call
    stack, the one with this id, else the first of this class (HF pairs saved states with callbacks in order)."""
    frame = sys._getframe(2)
    while frame is not None:
        handler = getattr(frame.f_locals.get("self"), "callback_handler", None)
        if handler is not None:
            mine = [cb for cb in getattr(handler, "callbacks", ()) if type(cb) is cls]
            if mine:
                return next((cb for cb in mine if getattr(cb, "_uid", None) == uid), mine[0])
        frame = frame.f_back
    return cls._live.get(uid)


_WARM_START_FILE = "curvature_warm_start.pt"
_INLINE_LIMIT = 1 << 18  # warm-start numbers kept inside trainer_state.json; more go to a file beside it


class SharpnessCallback(TrainerCallback, ExportableState):
    """A :class:`~curvature.tracking.SharpnessTracker` inside a ``transformers.Trainer`` (see the module docs).

    Args:
        loss_fn: ``None`` = the model's own loss (``outputs.loss``); or ``loss_fn(outputs, labels)``.
        every: measure when ``state.global_step % every == 0``.
        probe_batch: a fixed batch (dict of tensors, with ``labels``); default: built from the train dataloader.
        probe_size: samples in the default probe batch (default: the train batch size).
        trainer: the Trainer to log through (default: found at ``on_train_begin``; or call :meth:`attach`).
        prefix: prefix of the logged names.
        log_to_trainer: send each row's numbers through ``trainer.log`` (the ``report_to`` integrations).
        max_grad_norm: the clipping applied to the probe gradient that Adam's lookahead P (the step about to be
            taken) is built from: ``"trainer"`` (default) = ``TrainingArguments.max_grad_norm`` (1.0 by default;
            0/None: none), as the Trainer clips the gradient its optimizer sees; a number; ``None``: unclipped.
        **tracker_kwargs: :class:`~curvature.tracking.SharpnessTracker` options (``k``, ``tol``, ``when``,
            ``sinks``, ``on_error``, ``dtype``, ...).
    """

    _live: ClassVar[weakref.WeakValueDictionary] = weakref.WeakValueDictionary()
    _ids: ClassVar[itertools.count] = itertools.count()

    def __new__(cls, *args: Any, _curvature_instance: str | None = None, **kwargs: Any) -> SharpnessCallback:
        # HF's restore_callback_states_from_checkpoint rebuilds a stateful callback as type(cb)(**state["args"]);
        # our args name the live instance, so that rebuild returns the user's own callback (config and all).
        if _curvature_instance is not None:
            live = _callback_being_restored(cls, _curvature_instance)
            if live is None:
                raise RuntimeError("cannot restore a curvature SharpnessCallback from a checkpoint without the "
                                   "callback: pass callbacks=[SharpnessCallback(...)] to the Trainer")
            return live
        return super().__new__(cls)

    def __init__(self, loss_fn: Callable | None = None, every: int = 50, probe_batch: Any = None, *,
                 probe_size: int | None = None, trainer: Any = None, prefix: str = "curvature/",
                 log_to_trainer: bool = True, max_grad_norm: float | str | None = "trainer",
                 _curvature_instance: str | None = None, **tracker_kwargs: Any) -> None:
        if _curvature_instance is not None:  # HF's rebuild of this very instance (see __new__): keep it as it is
            return
        if probe_batch is None:
            probe_batch = tracker_kwargs.pop("probe", None)
        if loss_fn is not None and "batch_transform" not in tracker_kwargs:
            tracker_kwargs["batch_transform"] = _split_labels
        if not (max_grad_norm == "trainer" or max_grad_norm is None or isinstance(max_grad_norm, (int, float))):
            raise ValueError(f"max_grad_norm must be 'trainer' (TrainingArguments.max_grad_norm), a number or None "
                             f"(unclipped), got {max_grad_norm!r}")
        self.max_grad_norm = max_grad_norm
        self.tracker = SharpnessTracker(loss_fn, every=every, **tracker_kwargs)
        check_hook_support(TrainerCallback, self.tracker.when)
        self.probe_batch = probe_batch
        self.probe_size = probe_size
        self.trainer = trainer
        self.prefix = prefix
        self.log_to_trainer = log_to_trainer
        self._last_step: int | None = None
        self._pre_hook_steps = 0
        self._probe_warned = False
        self._output_dir: str | None = None
        self._global_step = 0
        self._curvature_saved: dict | None = None  # set by HF's restore (see state()), applied at on_train_begin
        self._uid = f"{os.getpid()}-{next(self._ids)}"
        type(self)._live[self._uid] = self

    @property
    def history(self) -> list[dict]:
        return self.tracker.history

    def attach(self, trainer: Any) -> SharpnessCallback:
        """Add this callback to ``trainer`` (if it is not there yet) and log through ``trainer.log``; returns
        self. Only needed when the callback cannot find the Trainer itself (see the module docs)."""
        self.trainer = trainer
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        return self

    # -- state (HF stateful callbacks: saved in trainer_state.json of every checkpoint) ---------------------
    def state(self) -> dict:
        """``ExportableState``: ``args`` name this instance (see ``__new__``), ``attributes`` hold the tracker's
        rows and warm-start vectors (JSON)."""
        saved = self.tracker.state_dict()
        vectors = {k: saved.pop(k) for k in ("warm_start_h", "warm_start_p")}
        payload: dict[str, Any] = {"version": 1, "tracker": saved, "vectors": None, "vectors_file": None,
                                   "step": self._global_step}
        numbers = sum(v.numel() for v in vectors.values() if v is not None)
        if numbers <= _INLINE_LIMIT:
            payload["vectors"] = {k: None if v is None else v.double().tolist() for k, v in vectors.items()}
        elif self._output_dir is not None:
            folder = os.path.join(self._output_dir, f"checkpoint-{self._global_step}")
            if os.path.isdir(folder):
                torch.save(vectors, os.path.join(folder, _WARM_START_FILE))
                payload["vectors_file"] = _WARM_START_FILE
        return {"args": {"_curvature_instance": self._uid}, "attributes": {"_curvature_saved": payload}}

    def _restore(self, payload: dict, args: Any, model: Any) -> None:
        tracker_state = dict(payload.get("tracker") or {})
        vectors = payload.get("vectors") or {}
        for key in ("warm_start_h", "warm_start_p"):
            value = vectors.get(key)
            tracker_state[key] = None if value is None else torch.tensor(value, dtype=torch.float64)
        if payload.get("vectors_file"):
            path = os.path.join(args.output_dir, f"checkpoint-{payload.get('step')}", payload["vectors_file"])
            if os.path.exists(path):
                tracker_state.update(torch.load(path, weights_only=True))
        if model is not None:
            dtype = next(iter(model.parameters()), torch.empty(0)).dtype
            for key in ("warm_start_h", "warm_start_p"):
                if isinstance(tracker_state.get(key), torch.Tensor) and dtype.is_floating_point:
                    tracker_state[key] = tracker_state[key].to(dtype)
        self.tracker.load_state_dict(tracker_state, model=model)
        self._last_step = self.history[-1]["step"] if self.history else None

    def _saved_payload(self, state: Any) -> dict | None:
        if self._curvature_saved is not None:
            return self._curvature_saved
        stored = (getattr(state, "stateful_callbacks", None) or {}).get(type(self).__name__)
        entries = stored if isinstance(stored, list) else [stored] if stored else []
        mine = [e for e in entries if (e.get("args") or {}).get("_curvature_instance") == self._uid]
        entry = (mine or entries or [None])[0]
        return None if entry is None else (entry.get("attributes") or {}).get("_curvature_saved")

    # -- events ---------------------------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._output_dir = getattr(args, "output_dir", None)
        # Adam's lookahead P comes from the gradient the optimizer will see: the Trainer clips it at max_grad_norm
        clip = getattr(args, "max_grad_norm", None) if self.max_grad_norm == "trainer" else self.max_grad_norm
        self.tracker.max_grad_norm = float(clip) if clip is not None and clip > 0 else None
        if self.log_to_trainer and self.trainer is None:
            self.trainer = _find_trainer(self)
            if self.trainer is None:
                raise RuntimeError("curvature SharpnessCallback: cannot find the Trainer to log through (HF passes "
                                   "no trainer to callbacks); add one line before training: cb.attach(trainer)")
        if not getattr(state, "is_world_process_zero", True):
            self.tracker.sinks = []  # files and logs are written by the main process only
        payload = self._saved_payload(state) if int(getattr(state, "global_step", 0) or 0) > 0 else None
        if payload:
            self._restore(payload, args, kwargs.get("model"))
        self._curvature_saved = None

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._pre_hook_steps += 1
        if self.tracker.when == "before_step":
            self._maybe_measure(state, kwargs)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._global_step = int(state.global_step)
        if self.tracker.when == "after_step":
            self._maybe_measure(state, kwargs)
        elif self._pre_hook_steps == 0:
            raise RuntimeError("curvature SharpnessCallback(when='before_step'): the Trainer never sent "
                               f"{_BEFORE_STEP_HOOK} (transformers >= 4.45 sends it before every optimizer step); "
                               "nothing would be recorded: upgrade transformers, or use when='after_step'")

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
        except Exception as exc:  # noqa: BLE001 - a set-up error: raise at once (the failure policy), or warn once
            if self.tracker.on_error == "raise" or self.tracker.setup_errors == "raise":
                raise TrackingSetupError(f"curvature SharpnessCallback: no probe batch ({exc}); every row would be "
                                         "empty: pass probe_batch= (a dict batch as the model takes it, with its "
                                         "labels), or SharpnessCallback(..., setup_errors='warn') to train without "
                                         "rows") from exc
            if not self._probe_warned:
                import warnings

                warnings.warn(f"curvature: no probe batch for the sharpness callback ({exc}); no rows will be "
                              "measured", TrackingWarning)
                self._probe_warned = True
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
            self.trainer.log(dict(metrics))  # log_history + every report_to integration, at state.global_step
        else:
            state.log_history.append({**metrics, "step": int(state.global_step)})
