"""curvature: exact, fast curvature diagnostics for PyTorch.

Sharpness λ_max(H), Adam's pre-conditioned sharpness λ_max(P⁻¹H), stability thresholds, trace and spectral
density, training callbacks, offline checkpoint analysis and learning-rate warm-up tools.
"""
# HVP engine and operators
from .hvp import HVPEngine
from .operators import HessianOperator, LinearOperator, MatrixOperator

# eigensolvers
from .solvers import EigenResult, lanczos, lanczos_tridiagonal, lobpcg, power_iteration

# diagnostics
from .diagnostics import HVPCheck, check_hvp, sharpness

# optimizer-aware curvature
from .optim import (
    GIAdam, PreconditionedHessianOperator, edge_ratio, gi_adam_init, is_adam_like, preconditioned_sharpness,
    stability_threshold,
)

# trace, spectral density, per-layer curvature
from .spectrum import (
    LayerCurvature, SpectralDensity, TraceEstimate, exact_trace, hessian_spectral_density, hessian_trace,
    hutchinson_trace, hutchpp_trace, layer_curvature, spectral_density,
)

# warm-up
from .warmup import (
    CatapultWarmup, Constant, CosineDecay, CriticalLR, Decay, ExponentialWarmup, LambdaFactor, LinearWarmup,
    LossAdaptiveWarmup, PersistentCatapultWarmup, Schedule, SequentialSchedule, WarmupStableDecay,
    catapult_warmup, find_critical_lr, join, loss_adaptive_lr, warmup_cosine,
)

__version__ = "0.1.0"

__all__ = [
    # operators
    "HVPEngine", "HessianOperator", "LinearOperator", "MatrixOperator",
    # eigensolvers
    "EigenResult", "lobpcg", "lanczos", "lanczos_tridiagonal", "power_iteration",
    # diagnostics
    "sharpness", "check_hvp", "HVPCheck",
    # optimizer-aware curvature
    "PreconditionedHessianOperator", "preconditioned_sharpness", "stability_threshold", "edge_ratio",
    "is_adam_like", "gi_adam_init", "GIAdam",
    # spectrum
    "hessian_trace", "hutchinson_trace", "hutchpp_trace", "exact_trace", "TraceEstimate",
    "hessian_spectral_density", "spectral_density", "SpectralDensity", "layer_curvature", "LayerCurvature",
    # warm-up
    "Schedule", "Constant", "LinearWarmup", "ExponentialWarmup", "Decay", "CosineDecay", "WarmupStableDecay",
    "CatapultWarmup", "SequentialSchedule", "LambdaFactor", "join", "warmup_cosine",
    "CriticalLR", "find_critical_lr", "catapult_warmup", "PersistentCatapultWarmup",
    "LossAdaptiveWarmup", "loss_adaptive_lr",
]
