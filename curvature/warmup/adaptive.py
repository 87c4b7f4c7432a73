r"""Loss-adaptive warm-up from the ``(H0, H1)`` curvature bound.

Alimisis, Islamov, Lucchi, *Why Do We Need Warm-up? A Theoretical Perspective* (arXiv 2510.03164): when the
curvature is bounded by the loss, ``‖∇²L(w)‖ ≤ H0 + H1·(L(w) − L*)``, the step size
``η_t = 1/(H0 + H1·(L_t − L*))`` grows as the loss falls — a warm-up that the loss itself drives — and provably
beats any fixed step size.

Parametrisation (ours, not the paper's): the peak learning rate ``η_max = 1/H0`` and ``C = H1/H0`` give

    ``η_t = η_max / (1 + C·(L_t − L*))``,   ``L* = 0`` by default,

clamped to ``[lr_min, η_max]``. ``η_max`` is the learning rate you would train with at (near) zero loss, and ``C``
says how strongly a high loss damps it: at ``L_t − L* = 1/C`` the rate is half of ``η_max``.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch

__all__ = ["LossAdaptiveWarmup", "loss_adaptive_lr"]


def loss_adaptive_lr(
    loss: float, lr_max: float, C: float, loss_min: float = 0.0, lr_min: float = 0.0
) -> float:
    """``clamp(η_max / (1 + C·(loss − L*)), lr_min, η_max)``; ``η_max`` when the denominator is ``<= 1``."""
    denom = 1.0 + C * (loss - loss_min)
    if denom <= 1.0:  # loss at or below L*: the bound allows the peak rate (also guards denom <= 0)
        return lr_max
    return min(max(lr_max / denom, lr_min), lr_max)


class LossAdaptiveWarmup:
    r"""Scheduler driven by the training loss: ``η_t = η_max / (1 + C·(L̃_t − L*))`` clamped to ``[lr_min, η_max]``.

    From Alimisis, Islamov & Lucchi (arXiv 2510.03164), ``η_t = 1/(H0 + H1(L_t − L*))``; the ``(η_max, C)`` form
    with ``η_max = 1/H0``, ``C = H1/H0`` is this library's parametrisation (:meth:`from_curvature` takes
    ``H0, H1``).

    ``L̃_t`` is the loss fed to :meth:`step`, optionally smoothed by an exponential moving average
    ``L̃_t = β·L̃_{t−1} + (1 − β)·L_t`` (``ema = β ∈ [0, 1)``, ``L̃_0 = L_0``, no bias correction); ``β = 0``
    (default) uses the raw loss.

    Use: compute the loss, ``loss.backward()``, ``sched.step(loss)``, ``optimizer.step()`` — the step then uses the
    rate for the current loss. Every parameter group's lr is set to ``η_t`` times its ratio to the first group's lr
    at construction (all ratios 1 if that lr was 0). The optimizer is not touched until the first :meth:`step`.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        lr_max: float,
        C: float,
        loss_min: float = 0.0,
        ema: float = 0.0,
        lr_min: float = 0.0,
    ) -> None:
        if not (math.isfinite(lr_max) and lr_max > 0):
            raise ValueError(f"lr_max must be > 0, got {lr_max!r}")
        if not (math.isfinite(C) and C >= 0):
            raise ValueError(f"C must be >= 0, got {C!r}")
        if not (0.0 <= ema < 1.0):
            raise ValueError(f"ema must be in [0, 1), got {ema!r}")
        if not (math.isfinite(lr_min) and 0 <= lr_min <= lr_max):
            raise ValueError(f"lr_min must be in [0, lr_max], got {lr_min!r}")
        if not math.isfinite(loss_min):
            raise ValueError(f"loss_min must be finite, got {loss_min!r}")
        self.optimizer = optimizer
        self.lr_max = float(lr_max)
        self.C = float(C)
        self.loss_min = float(loss_min)
        self.ema = float(ema)
        self.lr_min = float(lr_min)
        ref = float(optimizer.param_groups[0]["lr"])
        self.ratios = [1.0 if ref == 0 else float(g["lr"]) / ref for g in optimizer.param_groups]
        self.smoothed_loss: float | None = None
        self.last_loss: float | None = None
        self.last_lr: float | None = None
        self.step_count = 0

    @classmethod
    def from_curvature(
        cls, optimizer: torch.optim.Optimizer, H0: float, H1: float, **kwargs: Any
    ) -> "LossAdaptiveWarmup":
        """From the bound ``‖∇²L‖ ≤ H0 + H1(L − L*)``: ``η_max = 1/H0``, ``C = H1/H0``."""
        if not (H0 > 0 and H1 >= 0):
            raise ValueError(f"need H0 > 0 and H1 >= 0, got H0={H0!r}, H1={H1!r}")
        return cls(optimizer, lr_max=1.0 / H0, C=H1 / H0, **kwargs)

    def lr_for(self, loss: float) -> float:
        """The clamped rate for a (smoothed) loss value, without changing any state."""
        return loss_adaptive_lr(loss, self.lr_max, self.C, self.loss_min, self.lr_min)

    def step(self, loss: float | torch.Tensor) -> float:
        """Feed the current loss; sets every group's lr and returns ``η_t`` (the first group's lr)."""
        value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        if not math.isfinite(value):
            raise ValueError(f"non-finite loss {value} fed to LossAdaptiveWarmup at step {self.step_count}")
        if self.smoothed_loss is None or self.ema == 0.0:
            self.smoothed_loss = value
        else:
            self.smoothed_loss = self.ema * self.smoothed_loss + (1.0 - self.ema) * value
        self.last_loss = value
        lr = self.lr_for(self.smoothed_loss)
        for g, r in zip(self.optimizer.param_groups, self.ratios):
            g["lr"] = lr * r
        self.last_lr = lr
        self.step_count += 1
        return lr

    def get_last_lr(self) -> list[float]:
        """The current lr of every group (like PyTorch schedulers)."""
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {
            "lr_max": self.lr_max,
            "C": self.C,
            "loss_min": self.loss_min,
            "ema": self.ema,
            "lr_min": self.lr_min,
            "ratios": list(self.ratios),
            "smoothed_loss": self.smoothed_loss,
            "last_loss": self.last_loss,
            "last_lr": self.last_lr,
            "step_count": self.step_count,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key in ("lr_max", "C", "loss_min", "ema", "lr_min"):
            setattr(self, key, float(state[key]))
        self.ratios = [float(r) for r in state["ratios"]]
        self.smoothed_loss = state["smoothed_loss"]
        self.last_loss = state["last_loss"]
        self.last_lr = state["last_lr"]
        self.step_count = int(state["step_count"])
