r"""Learning-rate schedules as plain, immutable, composable callables.

Every schedule is a frozen dataclass ``sched`` with ``sched(step) -> lr``: the *absolute* learning rate at integer
step ``t >= 0`` (floats are accepted too). Each piece keeps its own clock, starting at ``t = 0``; composition
(:meth:`Schedule.then`, :func:`join`) restarts the clock of a piece at its boundary.

Closed forms (``T`` a number of steps, ``t`` the step):

* :class:`Constant`: ``η_t = η``.
* :class:`LinearWarmup`: ``η_t = η_0 + (η_max - η_0)·min(t, T)/T`` (flat at ``η_max`` from ``t = T`` on).
* :class:`ExponentialWarmup`: ``η_t = η_max - (η_max - η_0)·exp(-t/τ)``; with ``η_0 = 0`` this is
  ``η_max·(1 - e^{-kt})``, ``k = 1/τ`` (``τ`` = steps to reach 63 % of the way).
* :class:`Decay` / :class:`CosineDecay`: ``η_t = η_min + (η_max - η_min)·s(min(t, T)/T)`` with
  ``s(u) = (1 + cos πu)/2`` (cosine), ``1 - u`` (linear) or ``1 - √u`` ("1-sqrt", Hägele et al. 2024).
* :class:`WarmupStableDecay` (WSD; Hu et al., MiniCPM, arXiv 2404.06395; Hägele et al., arXiv 2405.18392):
  linear warm-up over ``T_w``, constant ``η_max``, then a decay of shape ``s`` over the last ``T_d`` steps of
  ``T``, flat at ``η_min`` after ``T``.
* :class:`CatapultWarmup` (Kalra & Barkeshli, *Why Warmup the Learning Rate?*, arXiv 2406.09405):
  ``η_t = min(η_init + η_trgt·t/T, η_trgt)``.

Every schedule also plugs into PyTorch: :meth:`Schedule.as_lambda` gives the multiplicative factor
``t -> sched(t)/base_lr`` that :class:`torch.optim.lr_scheduler.LambdaLR` expects, and
:meth:`Schedule.lr_scheduler` builds that ``LambdaLR`` (per-group learning-rate ratios are kept).

Example::

    sched = LinearWarmup(lr_max=3e-3, warmup_steps=100).then(CosineDecay(3e-3, decay_steps=900, lr_min=3e-5))
    scheduler = sched.lr_scheduler(optimizer)     # optimizer.param_groups[0]["lr"] == sched(t) after t steps
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
import torch

__all__ = [
    "Schedule",
    "Constant",
    "LinearWarmup",
    "ExponentialWarmup",
    "Decay",
    "CosineDecay",
    "WarmupStableDecay",
    "CatapultWarmup",
    "SequentialSchedule",
    "LambdaFactor",
    "join",
    "warmup_cosine",
]

_DECAY_SHAPES = ("linear", "cosine", "1-sqrt")


def _check_lr(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _check_steps(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")


def _decay_shape(shape: str, u: float) -> float:
    """Fraction ``s(u)`` of the way from ``η_min`` to ``η_max`` left at progress ``u ∈ [0, 1]``."""
    if shape == "linear":
        return 1.0 - u
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * u))
    if shape == "1-sqrt":
        return 1.0 - math.sqrt(u)
    raise ValueError(f"decay shape must be one of {_DECAY_SHAPES}, got {shape!r}")


class Schedule:
    """Base class: ``sched(step) -> lr`` (absolute learning rate), composable and ``LambdaLR``-ready.

    Subclasses implement :meth:`_lr` for ``t >= 0`` and may set :attr:`duration` (the step from which the
    schedule is flat or done, used as the default boundary by :meth:`then`; ``None`` when it never ends).
    """

    def _lr(self, t: float) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def duration(self) -> int | None:
        """Steps until this schedule has done its job (default boundary for :meth:`then`); ``None`` = endless."""
        return None

    def __call__(self, step: int | float) -> float:
        t = float(step)
        if not t >= 0:  # also rejects NaN
            raise ValueError(f"step must be >= 0, got {step!r}")
        return float(self._lr(t))

    # -- composition -------------------------------------------------------------------------
    def then(self, other: "Schedule", at: int | None = None) -> "SequentialSchedule":
        """This schedule for ``at`` steps (default :attr:`duration`), then ``other`` with its clock restarted at 0."""
        return join(self, other, boundaries=None if at is None else (at,))

    # -- PyTorch integration ------------------------------------------------------------------
    def as_lambda(self, base_lr: float) -> "LambdaFactor":
        """The factor ``t -> sched(t)/base_lr`` for :class:`torch.optim.lr_scheduler.LambdaLR`.

        With ``base_lr`` the optimizer's (first group's) initial lr, that group's lr is ``sched(t)`` at step ``t``.
        """
        return LambdaFactor(self, float(base_lr))

    def lr_scheduler(
        self, optimizer: torch.optim.Optimizer, base_lr: float | None = None, last_epoch: int = -1
    ) -> torch.optim.lr_scheduler.LambdaLR:
        """A :class:`~torch.optim.lr_scheduler.LambdaLR` that makes the first group's lr equal ``sched(t)``.

        ``base_lr`` defaults to the first group's ``initial_lr`` (or ``lr``); every group is multiplied by the same
        factor ``sched(t)/base_lr``, so the ratios between groups are kept. Call ``scheduler.step()`` after each
        ``optimizer.step()``, as usual.
        """
        if base_lr is None:
            group = optimizer.param_groups[0]
            base_lr = float(group.get("initial_lr", group["lr"]))
        if not (math.isfinite(base_lr) and base_lr > 0):
            raise ValueError(
                f"base_lr must be > 0 to turn a schedule into a LambdaLR factor, got {base_lr!r}; "
                "build the optimizer with a non-zero lr (e.g. the peak lr) or pass base_lr="
            )
        return torch.optim.lr_scheduler.LambdaLR(optimizer, self.as_lambda(base_lr), last_epoch=last_epoch)


@dataclass(frozen=True)
class LambdaFactor:
    """``t -> schedule(t)/base_lr``: a picklable factor for ``LambdaLR`` (its ``state_dict`` keeps it)."""

    schedule: Schedule
    base_lr: float

    def __call__(self, step: int) -> float:
        return self.schedule(step) / self.base_lr


@dataclass(frozen=True)
class Constant(Schedule):
    """``η_t = lr`` for every ``t``."""

    lr: float

    def __post_init__(self) -> None:
        _check_lr("lr", self.lr)

    def _lr(self, t: float) -> float:
        return self.lr


@dataclass(frozen=True)
class LinearWarmup(Schedule):
    """``η_t = η_0 + (η_max - η_0)·min(t, T)/T`` with ``T = warmup_steps`` (``T = 0``: ``η_max`` throughout)."""

    lr_max: float
    warmup_steps: int
    lr_init: float = 0.0

    def __post_init__(self) -> None:
        _check_lr("lr_max", self.lr_max)
        _check_lr("lr_init", self.lr_init)
        _check_steps("warmup_steps", self.warmup_steps)

    @property
    def duration(self) -> int:
        return self.warmup_steps

    def _lr(self, t: float) -> float:
        if t >= self.warmup_steps:
            return self.lr_max
        return self.lr_init + (self.lr_max - self.lr_init) * t / self.warmup_steps


@dataclass(frozen=True)
class ExponentialWarmup(Schedule):
    """``η_t = η_max - (η_max - η_0)·exp(-t/τ)``, ``τ = time_constant`` > 0 (steps).

    With ``lr_init = 0`` (default) this is the usual ``η_max·(1 - e^{-kt})`` with rate ``k = 1/τ``
    (:meth:`from_rate`). It never ends (:attr:`duration` is ``None``): pass ``at=`` to :meth:`then`.
    """

    lr_max: float
    time_constant: float
    lr_init: float = 0.0

    def __post_init__(self) -> None:
        _check_lr("lr_max", self.lr_max)
        _check_lr("lr_init", self.lr_init)
        if not (math.isfinite(self.time_constant) and self.time_constant > 0):
            raise ValueError(f"time_constant must be > 0, got {self.time_constant!r}")

    @classmethod
    def from_rate(cls, lr_max: float, rate: float, lr_init: float = 0.0) -> "ExponentialWarmup":
        """``η_t = η_max(1 - e^{-k t})`` (for ``lr_init = 0``) with ``k = rate`` per step."""
        if not (math.isfinite(rate) and rate > 0):
            raise ValueError(f"rate must be > 0, got {rate!r}")
        return cls(lr_max, 1.0 / rate, lr_init)

    @property
    def rate(self) -> float:
        """``k = 1/τ``."""
        return 1.0 / self.time_constant

    def _lr(self, t: float) -> float:
        return self.lr_max - (self.lr_max - self.lr_init) * math.exp(-t / self.time_constant)


@dataclass(frozen=True)
class Decay(Schedule):
    """``η_t = η_min + (η_max - η_min)·s(min(t, T)/T)``, ``T = decay_steps``, flat at ``η_min`` from ``T`` on.

    ``shape`` picks ``s``: ``"cosine"`` ``(1 + cos πu)/2`` (Loshchilov & Hutter, SGDR, arXiv 1608.03983),
    ``"linear"`` ``1 - u``, ``"1-sqrt"`` ``1 - √u`` (Hägele et al., arXiv 2405.18392). ``T = 0``: ``η_min``.
    """

    lr_max: float
    decay_steps: int
    lr_min: float = 0.0
    shape: str = "cosine"

    def __post_init__(self) -> None:
        _check_lr("lr_max", self.lr_max)
        _check_lr("lr_min", self.lr_min)
        _check_steps("decay_steps", self.decay_steps)
        if self.shape not in _DECAY_SHAPES:
            raise ValueError(f"shape must be one of {_DECAY_SHAPES}, got {self.shape!r}")

    @property
    def duration(self) -> int:
        return self.decay_steps

    def _lr(self, t: float) -> float:
        if t >= self.decay_steps:
            return self.lr_min
        return self.lr_min + (self.lr_max - self.lr_min) * _decay_shape(self.shape, t / self.decay_steps)


def CosineDecay(lr_max: float, decay_steps: int, lr_min: float = 0.0) -> Decay:
    """Cosine decay ``η_t = η_min + (η_max - η_min)(1 + cos(π·min(t,T)/T))/2`` (a :class:`Decay`)."""
    return Decay(lr_max, decay_steps, lr_min, shape="cosine")


@dataclass(frozen=True)
class WarmupStableDecay(Schedule):
    r"""Warmup-stable-decay (WSD; Hu et al., arXiv 2404.06395; Hägele et al., arXiv 2405.18392).

    With ``T = total_steps``, ``T_w = warmup_steps`` and ``T_d = round(decay_fraction·T)``:

    * ``t < T_w``: ``η_0 + (η_max - η_0)·t/T_w`` (linear warm-up);
    * ``T_w ≤ t < T - T_d``: ``η_max`` (stable);
    * ``T - T_d ≤ t ≤ T``: ``η_min + (η_max - η_min)·s((t - T + T_d)/T_d)``, ``s`` as in :class:`Decay`
      (``decay_shape``: ``"linear"`` (default), ``"cosine"`` or ``"1-sqrt"``);
    * ``t > T``: ``η_min``.

    ``decay_fraction = 0`` gives warm-up then constant forever.
    """

    lr_max: float
    warmup_steps: int
    total_steps: int
    decay_fraction: float = 0.1
    lr_init: float = 0.0
    lr_min: float = 0.0
    decay_shape: str = "linear"

    def __post_init__(self) -> None:
        _check_lr("lr_max", self.lr_max)
        _check_lr("lr_init", self.lr_init)
        _check_lr("lr_min", self.lr_min)
        _check_steps("warmup_steps", self.warmup_steps)
        _check_steps("total_steps", self.total_steps)
        if not (0.0 <= self.decay_fraction <= 1.0):
            raise ValueError(f"decay_fraction must be in [0, 1], got {self.decay_fraction!r}")
        if self.decay_shape not in _DECAY_SHAPES:
            raise ValueError(f"decay_shape must be one of {_DECAY_SHAPES}, got {self.decay_shape!r}")
        if self.warmup_steps + self.decay_steps > self.total_steps:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) + decay steps ({self.decay_steps}) exceed "
                f"total_steps ({self.total_steps})"
            )

    @property
    def decay_steps(self) -> int:
        """``T_d = round(decay_fraction · total_steps)``."""
        return int(round(self.decay_fraction * self.total_steps))

    @property
    def decay_start(self) -> int:
        """``T - T_d``: the first step of the decay."""
        return self.total_steps - self.decay_steps

    @property
    def duration(self) -> int:
        return self.total_steps

    def _lr(self, t: float) -> float:
        if t < self.warmup_steps:
            return self.lr_init + (self.lr_max - self.lr_init) * t / self.warmup_steps
        t_d = self.decay_steps
        if t_d == 0 or t < self.decay_start:
            return self.lr_max
        if t >= self.total_steps:
            return self.lr_min
        u = (t - self.decay_start) / t_d
        return self.lr_min + (self.lr_max - self.lr_min) * _decay_shape(self.decay_shape, u)


@dataclass(frozen=True)
class CatapultWarmup(Schedule):
    """``η_t = min(η_init + η_trgt·t/T, η_trgt)`` (Kalra & Barkeshli, arXiv 2406.09405, Sec. on η_init = η_c).

    Starting at the critical learning rate ``η_init = η_c`` instead of 0 reaches ``η_trgt`` after
    ``T·(1 - η_init/η_trgt)`` steps instead of ``T``: :attr:`duration` is that number, rounded up.
    Build it from a search result with :func:`curvature.warmup.catapult_warmup`.
    """

    lr_init: float
    lr_target: float
    warmup_steps: int

    def __post_init__(self) -> None:
        _check_lr("lr_init", self.lr_init)
        _check_lr("lr_target", self.lr_target)
        _check_steps("warmup_steps", self.warmup_steps)

    @property
    def duration(self) -> int:
        if self.lr_target <= 0 or self.lr_init >= self.lr_target:
            return 0
        return int(math.ceil(self.warmup_steps * (1.0 - self.lr_init / self.lr_target)))

    def _lr(self, t: float) -> float:
        if self.warmup_steps == 0:
            return self.lr_target
        return min(self.lr_init + self.lr_target * t / self.warmup_steps, self.lr_target)


@dataclass(frozen=True)
class SequentialSchedule(Schedule):
    """``schedules[i]`` on ``[boundaries[i-1], boundaries[i])`` (``boundaries[-1] = 0``), its clock at ``t - start``.

    ``len(boundaries) == len(schedules) - 1``, non-decreasing and ``>= 0``. At a boundary ``t = b_i`` the next
    schedule starts (at its own ``t = 0``). Build with :func:`join` or :meth:`Schedule.then`.
    """

    schedules: tuple[Schedule, ...]
    boundaries: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "schedules", tuple(self.schedules))
        object.__setattr__(self, "boundaries", tuple(self.boundaries))
        if not self.schedules:
            raise ValueError("need at least one schedule")
        if not all(isinstance(s, Schedule) for s in self.schedules):
            raise TypeError("every piece must be a Schedule")
        if len(self.boundaries) != len(self.schedules) - 1:
            raise ValueError(
                f"need len(schedules) - 1 = {len(self.schedules) - 1} boundaries, got {len(self.boundaries)}"
            )
        previous = 0
        for b in self.boundaries:
            if not (isinstance(b, (int, float)) and math.isfinite(b) and b >= previous):
                raise ValueError(f"boundaries must be finite, >= 0 and non-decreasing, got {self.boundaries}")
            previous = b

    @property
    def duration(self) -> int | None:
        last = self.schedules[-1].duration
        if last is None:
            return None
        return (self.boundaries[-1] if self.boundaries else 0) + last

    def _lr(self, t: float) -> float:
        i = bisect.bisect_right(self.boundaries, t)
        start = self.boundaries[i - 1] if i > 0 else 0
        return self.schedules[i](t - start)


def join(*schedules: Schedule, boundaries: tuple[int, ...] | list[int] | None = None) -> SequentialSchedule:
    """Chain schedules: piece ``i`` runs from ``boundaries[i-1]`` (absolute step) with its own clock restarted.

    ``boundaries=None`` uses the pieces' durations (every piece but the last must have one). A piece may itself be
    a :class:`SequentialSchedule` (it then runs on its own clock, cut at the next boundary).
    """
    if not schedules:
        raise ValueError("join() needs at least one schedule")
    if boundaries is None:
        bounds: list[int] = []
        start = 0
        for s in schedules[:-1]:
            if s.duration is None:
                raise ValueError(
                    f"{type(s).__name__} has no fixed duration: give the boundaries explicitly "
                    "(join(..., boundaries=...) or .then(other, at=...))"
                )
            start += s.duration
            bounds.append(start)
    else:
        bounds = list(boundaries)
        if len(bounds) != len(schedules) - 1:
            raise ValueError(f"need {len(schedules) - 1} boundaries, got {len(bounds)}")
    return SequentialSchedule(tuple(schedules), tuple(bounds))


def warmup_cosine(
    lr_max: float, warmup_steps: int, total_steps: int, lr_init: float = 0.0, lr_min: float = 0.0
) -> SequentialSchedule:
    """Linear warm-up to ``lr_max`` over ``warmup_steps``, then cosine decay to ``lr_min`` at ``total_steps``."""
    _check_steps("total_steps", total_steps)
    if total_steps < warmup_steps:
        raise ValueError(f"total_steps ({total_steps}) < warmup_steps ({warmup_steps})")
    return LinearWarmup(lr_max, warmup_steps, lr_init).then(CosineDecay(lr_max, total_steps - warmup_steps, lr_min))

