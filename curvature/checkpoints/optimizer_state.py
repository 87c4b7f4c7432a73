"""Optimizers rebuilt from a checkpoint's saved state: the class, the parameter order (Hugging Face's decay
groups), and a state that fits the model's parameters."""
from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from .errors import CheckpointError, first_line

__all__ = ['infer_optimizer_class', 'restore_optimizer']

# ---------------------------------------------------------------------------------------------------
# Optimizers from saved state
# ---------------------------------------------------------------------------------------------------
def infer_optimizer_class(opt_state: dict) -> type[torch.optim.Optimizer] | None:
    """Adam / AdamW / SGD from the keys of a saved optimizer's ``param_groups`` (``None`` if unknown)."""
    groups = opt_state.get("param_groups") or []
    if not groups:
        return None
    keys = set(groups[0])
    states = [s for s in (opt_state.get("state") or {}).values() if isinstance(s, dict)]
    if "betas" in keys and "amsgrad" in keys and (not states or "exp_avg_sq" in states[0]):
        return torch.optim.AdamW if groups[0].get("decoupled_weight_decay") else torch.optim.Adam
    if "momentum" in keys and "nesterov" in keys and "dampening" in keys:
        return torch.optim.SGD
    return None


_NO_DECAY_NAMES = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")


def _hf_param_order(model: nn.Module, counts: Sequence[int]) -> list[nn.Parameter] | None:
    """The parameters in the order of a Hugging Face Trainer's default optimizer: group 0 = parameters with weight
    decay, group 1 = without (biases, LayerNorm/RMSNorm weights, names with "norm"), each in ``named_parameters``
    order (tied weights once). This is the documented assumption for ``optimizer.pt``; it is checked against the
    saved state's shapes. ``None`` when the group sizes do not match."""
    if len(counts) != 2:
        return None
    in_norm = {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters(recurse=False)}
    decay, rest = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = id(p) in in_norm or any(re.search(pat, name.lower()) for pat in _NO_DECAY_NAMES)
        (rest if no_decay else decay).append(p)
    return decay + rest if [len(decay), len(rest)] == list(counts) else None


def _state_fits(opt_state: dict, order: Sequence[torch.Tensor]) -> bool:
    """Every saved per-parameter tensor (``exp_avg``, ``momentum_buffer``, ...) has its parameter's shape when the
    saved integer ids are mapped to ``order`` group by group."""
    state = opt_state.get("state") or {}
    start = 0
    for g in opt_state.get("param_groups") or []:
        for j, pid in enumerate(g.get("params", [])):
            if start + j >= len(order):
                return False
            shape = tuple(order[start + j].shape)
            for value in (state.get(pid) or {}).values():
                if isinstance(value, torch.Tensor) and value.ndim > 0 and tuple(value.shape) != shape:
                    return False
        start += len(g.get("params", []))
    return start == len(order)


def restore_optimizer(model: nn.Module, opt_state: dict, optimizer_factory: Callable | None,
                       path: Path, hf: bool = False) -> torch.optim.Optimizer | None:
    if optimizer_factory is not None:
        optimizer = optimizer_factory(model.parameters())
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise CheckpointError(f"optimizer_factory returned a {type(optimizer).__name__}, expected a "
                                  f"torch.optim.Optimizer")
    else:
        cls = infer_optimizer_class(opt_state)
        if cls is None:
            keys = sorted(k for k in (opt_state.get("param_groups") or [{}])[0] if k != "params")
            warnings.warn(f"{path}: optimizer state of an unknown type (param_group keys {keys}); pass "
                          f"optimizer_factory= (--optimizer) to restore it. Reporting λ_max(H) only.",
                          stacklevel=3)
            return None
        groups = opt_state["param_groups"]
        params = list(model.parameters())
        counts = [len(g.get("params", [])) for g in groups]
        if sum(counts) != len(params):
            raise CheckpointError(f"{path}: the saved optimizer holds {sum(counts)} parameters in "
                                  f"{len(groups)} group(s), the model has {len(params)}; pass optimizer_factory= "
                                  f"(--optimizer) to rebuild it as in training")
        orders = ([_hf_param_order(model, counts)] if hf else []) + [params]
        fitting = [o for o in orders if o is not None and _state_fits(opt_state, o)]
        if not fitting:
            raise CheckpointError(f"{path}: the saved optimizer state does not fit the model's parameters in "
                                  f"{'the Trainer order (decay, no-decay) nor ' if hf else ''}model.parameters() "
                                  f"order (state shapes differ); pass optimizer_factory= (--optimizer) to rebuild "
                                  f"the optimizer as in training")
        params = fitting[0]
        param_groups, start = [], 0
        for g, c in zip(groups, counts):
            options = {k: v for k, v in g.items() if k != "params"}
            param_groups.append({"params": params[start:start + c], **options})
            start += c
        defaults = {k: v for k, v in groups[0].items() if k not in ("params", "initial_lr")}
        defaults.pop("decoupled_weight_decay", None)
        try:
            optimizer = cls(param_groups, **{k: defaults[k] for k in ("lr",) if k in defaults})
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: cannot rebuild {cls.__name__} from the saved param_groups "
                                  f"({first_line(exc)}); pass optimizer_factory=") from exc
    try:
        optimizer.load_state_dict(opt_state)
    except (ValueError, KeyError, RuntimeError, TypeError) as exc:
        raise CheckpointError(f"{path}: the saved optimizer state does not fit the optimizer "
                              f"({first_line(exc)})") from exc
    return optimizer
