"""curvature: exact, fast curvature diagnostics for PyTorch.

Sharpness λ_max(H), Adam's pre-conditioned sharpness λ_max(P⁻¹H), stability thresholds, trace and spectral
density, training callbacks, offline checkpoint analysis and learning-rate warm-up tools.
"""
from ._safepath import running_curvature_module as _running_curvature_module

if _running_curvature_module():  # `python -m curvature`: the cwd is first on sys.path while this imports (#15.5)
    from ._safepath import drop_cwd_from_sys_path as _drop_cwd

    _drop_cwd()
# Names are imported on first use (PEP 562), so that `import curvature` and `curvature --help` / `--version` do
# not import torch. Static type checkers and IDEs read the imports below; at run time `_LAZY` maps each public
# name to the module that defines it. A new public name: add it to `_LAZY` (and to `__all__`).
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    # HVP engine and operators
    from .hvp import HVPEngine
    from .operators import HessianOperator, LinearOperator, MatrixOperator

    # eigensolvers
    from .solvers import EigenResult, lanczos, lanczos_tridiagonal, lobpcg, power_iteration

    # diagnostics
    from .diagnostics import HVPCheck, check_hvp, sharpness

    # optimizer-aware curvature
    from .optim import (
        GIAdam, PreconditionedHessianOperator, edge_ratio, gi_adam_init, has_diagonal_preconditioner, is_adam_like,
        preconditioned_sharpness, stability_note, stability_threshold, unwrap_optimizer,
    )

    # training callbacks and plots (matplotlib, TensorBoard, Lightning, transformers are imported lazily)
    from .plotting import plot_sharpness, plot_spectrum
    from .tracking import (
        ROW_KEYS, CallableSink, CSVSink, JSONLinesSink, LoggingSink, SharpnessTracker, TensorBoardSink, TrackingError,
        TrackingSetupError, TrackingWarning, model_output_loss, read_rows,
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
    from .warmup import ComparisonResult, compare_schedules, find_required_warmup

    # batches, weights, the model's own loss; experiment-tracker sinks
    from .data import CurvatureWarning, resolve_loss_fn, token_count
    from .sinks import MLflowSink, WandbSink

    # second-order errors, finite differences, fully-sharded models, ranks that fail together
    from ._exact import SecondOrderError
    from .distributed import RemoteRankError
    from .diagnostics import RouteComparison, compare_hvp_routes
    from .finite_difference import FiniteDifferenceEngine
    from .sharded import ShardedHessianOperator, ShardedPreconditionedOperator, sharded_lanczos

    # per-step signals for mini-batch training; solver benchmarks on the user's model
    from .bench import benchmark_solvers
    from .operators import GraphHessianOperator
    from .signals import (batch_sharpness, next_update, preconditioned_batch_sharpness,
                          step_signals, update_sharpness)

    # critical sharpness λ_c = 2/η_c of the step about to be taken, in forward passes (every optimizer)
    from .critical import CriticalSharpness, critical_sharpness

_LAZY: dict[str, str] = {
    "HVPEngine": ".hvp",
    "HessianOperator": ".operators",
    "LinearOperator": ".operators",
    "MatrixOperator": ".operators",
    "EigenResult": ".solvers",
    "lanczos": ".solvers",
    "lanczos_tridiagonal": ".solvers",
    "lobpcg": ".solvers",
    "power_iteration": ".solvers",
    "HVPCheck": ".diagnostics",
    "check_hvp": ".diagnostics",
    "sharpness": ".diagnostics",
    "GIAdam": ".optim",
    "PreconditionedHessianOperator": ".optim",
    "edge_ratio": ".optim",
    "gi_adam_init": ".optim",
    "is_adam_like": ".optim",
    "has_diagonal_preconditioner": ".optim",
    "stability_note": ".optim",
    "preconditioned_sharpness": ".optim",
    "stability_threshold": ".optim",
    "unwrap_optimizer": ".optim",
    "plot_sharpness": ".plotting",
    "plot_spectrum": ".plotting",
    "ROW_KEYS": ".tracking",
    "CallableSink": ".tracking",
    "CSVSink": ".tracking",
    "JSONLinesSink": ".tracking",
    "LoggingSink": ".tracking",
    "SharpnessTracker": ".tracking",
    "TensorBoardSink": ".tracking",
    "TrackingError": ".tracking",
    "TrackingSetupError": ".tracking",
    "TrackingWarning": ".tracking",
    "model_output_loss": ".tracking",
    "read_rows": ".tracking",
    "LayerCurvature": ".spectrum",
    "SpectralDensity": ".spectrum",
    "TraceEstimate": ".spectrum",
    "exact_trace": ".spectrum",
    "hessian_spectral_density": ".spectrum",
    "hessian_trace": ".spectrum",
    "hutchinson_trace": ".spectrum",
    "hutchpp_trace": ".spectrum",
    "layer_curvature": ".spectrum",
    "spectral_density": ".spectrum",
    "CatapultWarmup": ".warmup",
    "Constant": ".warmup",
    "CosineDecay": ".warmup",
    "CriticalLR": ".warmup",
    "CurvatureAwareWarmup": ".warmup",
    "Decay": ".warmup",
    "ExponentialWarmup": ".warmup",
    "LambdaFactor": ".warmup",
    "LinearWarmup": ".warmup",
    "LossAdaptiveWarmup": ".warmup",
    "PersistentCatapultWarmup": ".warmup",
    "Schedule": ".warmup",
    "SequentialSchedule": ".warmup",
    "WarmupStableDecay": ".warmup",
    "catapult_warmup": ".warmup",
    "find_critical_lr": ".warmup",
    "join": ".warmup",
    "loss_adaptive_lr": ".warmup",
    "warmup_cosine": ".warmup",
    "Checkpoint": ".checkpoints",
    "CheckpointError": ".checkpoints",
    "UnsafeCheckpointError": ".checkpoints",
    "analyze_checkpoints": ".checkpoints",
    "load_checkpoint": ".checkpoints",
    "ComparisonResult": ".warmup",
    "compare_schedules": ".warmup",
    "find_required_warmup": ".warmup",
    "CurvatureWarning": ".data",
    "resolve_loss_fn": ".data",
    "token_count": ".data",
    "MLflowSink": ".sinks",
    "WandbSink": ".sinks",
    "SecondOrderError": "._exact",
    "RemoteRankError": ".distributed",
    "FiniteDifferenceEngine": ".finite_difference",
    "RouteComparison": ".diagnostics",
    "compare_hvp_routes": ".diagnostics",
    "ShardedHessianOperator": ".sharded",
    "ShardedPreconditionedOperator": ".sharded",
    "sharded_lanczos": ".sharded",
    "GraphHessianOperator": ".operators",
    "batch_sharpness": ".signals",
    "preconditioned_batch_sharpness": ".signals",
    "update_sharpness": ".signals",
    "next_update": ".signals",
    "step_signals": ".signals",
    "benchmark_solvers": ".bench",
    "critical_sharpness": ".critical",
    "CriticalSharpness": ".critical",
}


def __getattr__(name: str) -> object:
    import importlib

    module = _LAZY.get(name)
    if module is None:
        if not name.startswith("_"):  # a submodule (curvature.tracking, ...), as when everything was imported eagerly
            try:
                return importlib.import_module(f"{__name__}.{name}")
            except ModuleNotFoundError as exc:
                if exc.name != f"{__name__}.{name}":
                    raise
        raise AttributeError(f"module 'curvature' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


from ._version import __version__  # noqa: E402  (one source: curvature/_version.py)

__all__ = [
    # operators
    "HVPEngine", "HessianOperator", "LinearOperator", "MatrixOperator",
    # eigensolvers
    "EigenResult", "lobpcg", "lanczos", "lanczos_tridiagonal", "power_iteration",
    # diagnostics
    "sharpness", "check_hvp", "HVPCheck",
    # optimizer-aware curvature
    "PreconditionedHessianOperator", "preconditioned_sharpness", "stability_threshold", "edge_ratio",
    "is_adam_like", "gi_adam_init", "GIAdam", "unwrap_optimizer", "has_diagonal_preconditioner", "stability_note",
    # tracking and plots
    "SharpnessTracker", "ROW_KEYS", "TrackingError", "TrackingSetupError", "TrackingWarning", "CSVSink", "JSONLinesSink",
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
    # batches and losses
    "CurvatureWarning", "resolve_loss_fn", "token_count",
    # experiment-tracker sinks (wandb / mlflow are imported only when used)
    "WandbSink", "MLflowSink",
    # an op without a second derivative (raised by every entry point, naming op and module)
    "SecondOrderError",
    # finite-difference route, fully-sharded models, ranks that fail together
    "FiniteDifferenceEngine", "compare_hvp_routes", "RouteComparison", "ShardedHessianOperator",
    "ShardedPreconditionedOperator", "sharded_lanczos", "RemoteRankError",
    # per-step signals for mini-batch training; solver benchmarks on the user's model
    "GraphHessianOperator", "batch_sharpness", "preconditioned_batch_sharpness", "update_sharpness",
    "next_update", "step_signals", "benchmark_solvers",
    # critical sharpness λ_c = 2/η_c of the step about to be taken, in forward passes (every optimizer)
    "critical_sharpness", "CriticalSharpness",
]
