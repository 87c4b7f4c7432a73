"""Reading and writing an optimizer's per-group learning rate (a float, or a tensor for capturable/fused
optimizers and some schedulers), shared by every warm-up scheduler here."""
from __future__ import annotations

import torch

__all__ = ["group_lr", "set_group_lr"]


def group_lr(group: dict) -> float:
    """The learning rate of one ``optimizer.param_groups`` entry as a float."""
    lr = group["lr"]
    return float(lr.item() if isinstance(lr, torch.Tensor) else lr)


def set_group_lr(group: dict, value: float) -> None:
    """Set a group's learning rate in place, keeping a tensor lr a tensor."""
    if isinstance(group["lr"], torch.Tensor):
        group["lr"].fill_(value)
    else:
        group["lr"] = value
