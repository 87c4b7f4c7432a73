"""Warm-up tools: learning-rate schedules, catapult-based critical learning rate, loss-adaptive warm-up.

* :mod:`.schedules` — linear / exponential warm-up, cosine / linear / 1-sqrt decay, warmup-stable-decay, constant,
  composable (``join``, ``.then``) and ``LambdaLR``-ready.
* :mod:`.catapult` — ``find_critical_lr`` (Kalra & Barkeshli, arXiv 2406.09405), ``catapult_warmup``,
  ``PersistentCatapultWarmup``.
* :mod:`.adaptive` — ``LossAdaptiveWarmup`` (Alimisis, Islamov & Lucchi, arXiv 2510.03164).
* :mod:`.feedback` — ``CurvatureAwareWarmup`` (the lr held under the measured stability threshold).
* :mod:`.compare` — ``compare_schedules``, ``find_required_warmup``: schedules side by side on one model.

Schedules, the catapult search and the loss-adaptive warm-up use only torch; the curvature-aware warm-up
(:mod:`.feedback`) measures with :mod:`curvature.tracking`.
"""
from .adaptive import LossAdaptiveWarmup, loss_adaptive_lr
from .feedback import CurvatureAwareWarmup, threshold_numerator
from .compare import ComparisonResult, compare_schedules, find_required_warmup
from .catapult import CriticalLR, PersistentCatapultWarmup, catapult_warmup, find_critical_lr
from .schedules import (
    CatapultWarmup,
    Constant,
    CosineDecay,
    Decay,
    ExponentialWarmup,
    LambdaFactor,
    LinearWarmup,
    Schedule,
    SequentialSchedule,
    WarmupStableDecay,
    join,
    warmup_cosine,
)

__all__ = [
    # schedules
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
    # catapult
    "CriticalLR",
    "find_critical_lr",
    "catapult_warmup",
    "PersistentCatapultWarmup",
    # curvature feedback
    "CurvatureAwareWarmup",
    "threshold_numerator",
    # loss-adaptive
    "LossAdaptiveWarmup",
    "loss_adaptive_lr",
    # schedule comparison
    "ComparisonResult",
    "compare_schedules",
    "find_required_warmup",
]
