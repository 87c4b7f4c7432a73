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
    stability_threshold, unwrap_optimizer,
)

# training callbacks and plots (matplotlib, TensorBoard, Lightning, transformers are imported lazily)
from .plotting import plot_sharpness, plot_spectrum
from .tracking import (
    ROW_KEYS, CallableSink, CSVSink, JSONLinesSink, LoggingSink, SharpnessTracker, TensorBoardSink, TrackingError,
    TrackingWarning, model_output_loss, read_rows,
)

# trace, spectral density, per-layer curvature
from .spectrum import (
    LayerCurvature, SpectralDensity, TraceEstimate, exact_trace, hessian_spectral_density, hessian_trace,
    hutchinson_trace, hutchpp_trace, layer_curvature, spectral_density,
)

# warm-up
from .warmup import (
    CatapultWarmup, Constant, CosineDecay, CriticalLR, CurvatureAwareWarmup, Decay, ExponentialWarmup, LambdaFactor, LinearWarmup,
    LossAdaptiveWarmup, PersistentCatapultWarmup, Schedule, SequentialSchedule, WarmupStableDecay,
    catapult_warmup, find_critical_lr, join, loss_adaptive_lr, warmup_cosine,
)

# offline analysis of checkpoints
from .checkpoints import Checkpoint, CheckpointError, UnsafeCheckpointError, analyze_checkpoints, load_checkpoint

# schedule comparison harness
from .compare import ComparisonResult, compare_schedules, find_required_warmup

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
    "is_adam_like", "gi_adam_init", "GIAdam", "unwrap_optimizer",
    # tracking and plots
    "SharpnessTracker", "ROW_KEYS", "TrackingError", "TrackingWarning", "CSVSink", "JSONLinesSink",
    "TensorBoardSink", "LoggingSink", "CallableSink", "model_output_loss", "read_rows",
    "plot_sharpness", "plot_spectrum",
    # spectrum
    "hessian_trace", "hutchinson_trace", "hutchpp_trace", "exact_trace", "TraceEstimate",
    "hessian_spectral_density", "spectral_density", "SpectralDensity", "layer_curvature", "LayerCurvature",
    # warm-up
    "Schedule", "Constant", "LinearWarmup", "ExponentialWarmup", "Decay", "CosineDecay", "WarmupStableDecay",
    "CatapultWarmup", "SequentialSchedule", "LambdaFactor", "join", "warmup_cosine",
    "CriticalLR", "find_critical_lr", "catapult_warmup", "PersistentCatapultWarmup",
    "LossAdaptiveWarmup", "loss_adaptive_lr", "CurvatureAwareWarmup",
    # offline analysis
    "analyze_checkpoints", "load_checkpoint", "Checkpoint", "CheckpointError", "UnsafeCheckpointError",
    # schedule comparison
    "compare_schedules", "ComparisonResult", "find_required_warmup",
]

# per-step signals (issue #16) and solver benchmarks on the user's model
from .bench import benchmark_solvers  # noqa: E402
from .signals import (GraphHessianOperator, batch_sharpness, next_update,  # noqa: E402
                      preconditioned_batch_sharpness, step_signals, update_sharpness)

__all__ += ["GraphHessianOperator", "batch_sharpness", "preconditioned_batch_sharpness", "update_sharpness",
            "next_update", "step_signals", "benchmark_solvers"]
