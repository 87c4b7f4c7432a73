"""Curvature of saved checkpoints, offline: safe loading and :func:`analyze_checkpoints`.

The package, one job a module (each imports only those above it in this list):

* :mod:`~curvature.checkpoints.errors` — :class:`CheckpointError` and its unsafe-pickle subclass;
* :mod:`~curvature.checkpoints.resolve` — models, data and losses named by strings (the CLI's arguments);
* :mod:`~curvature.checkpoints.reading` — finding checkpoints, reading the formats below safely, fitting a
  ``state_dict`` to a model;
* :mod:`~curvature.checkpoints.optimizer_state` — optimizers rebuilt from saved state;
* :mod:`~curvature.checkpoints.output` — the resumable output file and its row identity;
* :mod:`~curvature.checkpoints.analysis` — the analysis loop and its text table.

A folder of checkpoints written during training is turned into one row per checkpoint with the same columns
as :class:`~curvature.tracking.SharpnessTracker` rows (``step``, ``lr``, ``loss``, ``sharpness``,
``preconditioned_sharpness``, ``threshold``, ``num_hvps``, ``seconds``, ``converged``) plus ``file`` and
``error``.

Formats read (one loader for all, chosen by content, not by name):

* a plain ``state_dict`` (``torch.save(model.state_dict(), path)``);
* a dict with the model under ``"model"`` / ``"model_state_dict"`` / ``"state_dict"`` / ``"module"``, the
  optimizer under ``"optimizer"`` / ``"optimizer_state_dict"`` / ``"optimizer_states"`` (Lightning: a list)
  and the step under ``"step"`` / ``"global_step"`` / ``"iteration"`` (else ``"epoch"``);
* ``.safetensors`` files (tensors only; a ``"step"`` entry of the file's metadata is used if present);
* Lightning ``.ckpt`` files: ``state_dict`` keys carry the attribute name of the network inside the
  LightningModule (``"model.0.weight"``); the longest common prefix that makes the keys fit the model is
  stripped (also ``"module."`` from DDP and ``"_orig_mod."`` from ``torch.compile``).

Security: ``torch.load`` runs with ``weights_only=True`` unless ``trust_checkpoints=True``; a checkpoint
that holds pickled Python objects (which can execute code when loaded) is refused with a message naming the
option. Only trust checkpoints whose source you trust.
"""
from __future__ import annotations

from ..rows import read_rows
from .analysis import analyze_checkpoints, format_rows
from .errors import CheckpointError, UnsafeCheckpointError
from .optimizer_state import infer_optimizer_class
from .output import ROW_COLUMNS
from .reading import (CHECKPOINT_SUFFIXES, Checkpoint, find_checkpoints, fit_state_dict, load_checkpoint,
                      step_from_name)
from .resolve import add_search_path, build_model, import_object, resolve_data, resolve_loss, resolve_model_factory

__all__ = ["analyze_checkpoints", "load_checkpoint", "find_checkpoints", "fit_state_dict", "import_object",
           "resolve_loss", "read_rows", "format_rows", "step_from_name", "infer_optimizer_class", "Checkpoint",
           "CheckpointError", "UnsafeCheckpointError", "ROW_COLUMNS", "CHECKPOINT_SUFFIXES", "add_search_path",
           "build_model", "resolve_data", "resolve_model_factory"]
