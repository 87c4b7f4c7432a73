"""Shared helpers for the notebooks: digits data, a small FCN, and a full-batch training loop.

Everything is small on purpose (a ~10k-parameter FCN on scikit-learn's bundled 8×8 digits, full-batch GD or
Adam) so that each notebook runs in well under two minutes on two CPU cores. Nothing is downloaded.

The experiments follow Kalra & Barkeshli, *Why Warmup the Learning Rate? Underlying Mechanisms and
Improvements* (NeurIPS 2024, arXiv 2406.09405).
"""
from __future__ import annotations

import math
import os
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import curvature as cv

__all__ = ["setup", "load_digits_data", "FCN", "make_model", "lambda0", "train", "loss_fn", "diverged",
           "HERE", "mse_loss"]

HERE = os.path.dirname(os.path.abspath(__file__)) if "__file__" in globals() else os.getcwd()


def setup(threads: int = 2, dtype: torch.dtype = torch.float32) -> None:
    """Pin the thread count and the default dtype (deterministic, fair on a shared 2-core machine)."""
    torch.set_num_threads(threads)
    torch.set_default_dtype(dtype)


def loss_fn(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (the loss used throughout the notebooks)."""
    return F.cross_entropy(outputs, targets)


def mse_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean squared error against one-hot targets, ``½·mean_i ‖f(x_i) − e_{y_i}‖²`` (integer labels in)."""
    onehot = F.one_hot(targets, outputs.shape[-1]).to(outputs.dtype)
    return 0.5 * (outputs - onehot).pow(2).sum(-1).mean()


def load_digits_data(n: int | None = 1024, dtype: torch.dtype | None = None, seed: int = 0
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled digits (1,797 8×8 images): ``n`` shuffled samples, features standardised.

    Returns ``(X, y)`` with ``X`` of shape ``(n, 64)`` and integer labels ``y``.
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    X = torch.as_tensor(data.data, dtype=torch.float64)
    y = torch.as_tensor(data.target, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=gen)
    if n is not None:
        perm = perm[:n]
    X, y = X[perm], y[perm]
    X = (X - X.mean(0)) / (X.std(0) + 1e-6)  # constant pixels stay 0
    return X.to(dtype or torch.get_default_dtype()), y


class FCN(nn.Module):
    """Fully connected network ``64 → width → … → 10`` with a scalable last layer.

    ``last_scale`` multiplies the initial weights of the read-out layer (its bias starts at 0):
    ``1`` is the standard (PyTorch default, SP-like) initialisation; a small value such as ``1/width`` mimics
    μP's small output layer, which starts the network in the *progressive sharpening* regime. ``init_scale``
    multiplies every hidden layer's initial weights (large values: *sharpness reduction* regime).
    """

    def __init__(self, width: int = 64, depth: int = 2, act: str = "relu", last_scale: float = 1.0,
                 init_scale: float = 1.0, d_in: int = 64, d_out: int = 10) -> None:
        super().__init__()
        dims = [d_in] + [width] * depth
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.out = nn.Linear(dims[-1], d_out)
        self.act = {"relu": F.relu, "tanh": torch.tanh, "gelu": F.gelu}[act]
        with torch.no_grad():
            for layer in self.hidden:
                layer.weight.mul_(init_scale)
            self.out.weight.mul_(last_scale)
            self.out.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.hidden:
            x = self.act(layer(x))
        return self.out(x)


def make_model(seed: int = 0, **kw) -> FCN:
    """An :class:`FCN` initialised from ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return FCN(**kw)


def lambda0(model: nn.Module, batch, tol: float = 1e-4, loss: Callable = loss_fn) -> float:
    """Sharpness λ_max(H) at the current point (full batch)."""
    return float(cv.sharpness(model, loss, batch, tol=tol, solver="lanczos").eigenvalues[0])


def diverged(loss: float, limit: float = 1e3) -> bool:
    return not (math.isfinite(loss) and loss < limit)


def train(model: nn.Module, batch, optimizer: torch.optim.Optimizer, schedule: Callable[[int], float],
          steps: int, tracker: "cv.tracking.SharpnessTracker | None" = None,
          sharpness_every: int = 0, stop_on_divergence: bool = True, loss: Callable = loss_fn) -> dict:
    """Full-batch training: at step ``t`` set every group's lr to ``schedule(t)``, take one step.

    Records per step the loss *before* the step and the lr used. With ``tracker`` the tracker is called at every
    step (it measures every ``tracker.every`` steps, before the optimizer step). With ``sharpness_every > 0``
    (and no tracker) λ_max(H) is measured with :func:`curvature.sharpness` every that many steps.
    Returns a dict of lists: ``loss``, ``lr``, and ``sharp_step``/``sharp`` when sharpness was measured;
    ``diverged`` is True when the loss blew up (training then stops early if ``stop_on_divergence``).
    """
    X, y = batch
    out = {"loss": [], "lr": [], "sharp_step": [], "sharp": [], "diverged": False}
    X0 = None
    for t in range(steps):
        lr = float(schedule(t))
        for g in optimizer.param_groups:
            g["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        value_t = loss(model(X), y)
        value = float(value_t.detach())
        out["loss"].append(value)
        out["lr"].append(lr)
        if diverged(value):
            out["diverged"] = True
            if stop_on_divergence:
                break
        value_t.backward()
        if tracker is not None:
            tracker.step(model, optimizer, batch, step=t)
        elif sharpness_every and t % sharpness_every == 0:
            res = cv.sharpness(model, loss, batch, tol=1e-3, X0=X0, solver="lanczos")
            X0 = res.eigenvectors
            out["sharp_step"].append(t)
            out["sharp"].append(float(res.eigenvalues[0]))
        optimizer.step()
    return out


def final_loss(model: nn.Module, batch, loss: Callable = loss_fn) -> float:
    with torch.no_grad():
        return float(loss(model(batch[0]), batch[1]))


__all__.append("final_loss")
