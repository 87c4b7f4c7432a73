"""``loss_fn=None``: the model computes its own loss (Hugging Face models given ``labels``).

A small local bridge for the entry points that call the model themselves (``find_critical_lr``, the warm-ups,
``analyze_checkpoints``): it defers to ``curvature.data.resolve_loss_fn`` (the one resolver, from the data
module) when that exists, and until then uses :func:`curvature.tracking.model_output_loss` (same meaning).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["own_loss_fn", "own_loss_batch", "own_loss_data"]


def own_loss_fn(loss_fn: Callable | None) -> Callable:
    """``loss_fn`` itself, or for ``None`` a loss that returns the model output's ``loss``."""
    if loss_fn is not None:
        return loss_fn
    try:
        from .data import resolve_loss_fn
    except ImportError:
        from .tracking import model_output_loss

        return model_output_loss
    return resolve_loss_fn(None)


def own_loss_batch(batch: Any) -> Any:
    """A dict batch (keyword inputs with ``labels``, or a ``BatchEncoding``) → ``(inputs_dict, None)``; anything
    else unchanged."""
    if isinstance(batch, dict) or (hasattr(batch, "keys") and hasattr(batch, "__getitem__")
                                   and not isinstance(batch, (tuple, list))):
        return ({k: batch[k] for k in batch.keys() if isinstance(batch[k], torch.Tensor)}, None)
    return batch


def own_loss_data(data: Any) -> Any:
    """:func:`own_loss_batch` of one batch or of each batch of a list."""
    return [own_loss_batch(b) for b in data] if isinstance(data, list) else own_loss_batch(data)
