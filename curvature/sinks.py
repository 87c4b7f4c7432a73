"""Where tracker rows go: files (CSV, JSON lines), TensorBoard, a logger, W&B, MLflow, or any callable.

Each sink is a ``callable(row)`` with an optional ``close()``; :func:`make_sink` turns a short spec (a path, a
``logging.Logger``, a ``SummaryWriter``, a ``wandb`` run, an MLflow run) into one.

* **Resumable files.** Path sinks (:class:`CSVSink`, :class:`JSONLinesSink`) append to an existing file: on
  open, a torn last record (a write cut short by a crash) is dropped and the rows already in the file are read;
  a row whose ``step`` (and ``optimizer_index``) was already in the file is not written again (a resumed run does
  not duplicate or delete its history; a warning says so once), while every row of this run is written.
  ``append=False`` starts the file afresh.
* **One writer under DDP.** With ``torch.distributed`` initialised (more than one process), the file,
  TensorBoard, logging, W&B and MLflow sinks write on rank 0 only (``rank_zero_only=True``, the default): every
  rank measures the same global values, so one copy is complete. Plain callables are called on every rank.
* **W&B / MLflow**: every numeric column (``sharpness``, ``threshold``, ``lr``, ..., ``eigenvalue_i`` for k > 1)
  is logged on the row's ``step``: ``run.log({...}, step=row["step"])`` and
  ``client.log_metric(run_id, key, value, step=row["step"])``. Lists, strings, ``None`` and non-finite values
  are not logged. Both packages are optional imports.
"""
from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .rows import ROW_KEYS, SCALAR_KEYS, append_rows, is_json_lines, repair_row_file

__all__ = ["CSVSink", "JSONLinesSink", "TensorBoardSink", "LoggingSink", "CallableSink", "WandbSink", "MLflowSink",
           "make_sink", "format_row", "is_rank_zero"]

log = logging.getLogger("curvature.tracking")


def is_rank_zero() -> bool:
    """True unless ``torch.distributed`` is initialised and this process is not rank 0."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return True
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def numeric_items(row: dict, prefix: str = "") -> dict[str, float]:
    """The row's finite numeric scalars (:data:`~curvature.rows.SCALAR_KEYS`) as floats, plus
    ``eigenvalue_i`` / ``preconditioned_eigenvalue_i`` when a row holds more than one eigenvalue."""
    out: dict[str, float] = {}
    for key in SCALAR_KEYS:
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[prefix + key] = float(value)
    for key, tag in (("eigenvalues", "eigenvalue_"), ("preconditioned_eigenvalues", "preconditioned_eigenvalue_")):
        values = row.get(key) or []
        if len(values) > 1:
            for i, value in enumerate(values):
                if isinstance(value, (int, float)) and math.isfinite(float(value)):
                    out[f"{prefix}{tag}{i}"] = float(value)
    return out


def _row_id(row: dict) -> tuple:
    """What identifies a row in a rows file: its step, and which optimizer it describes (Lightning's manual
    optimization with several optimizers writes one row per optimizer at the same step)."""
    return row.get("step"), row.get("optimizer_index")


class _RankZeroSink:
    rank_zero_only: bool = True

    def _skip(self) -> bool:
        return self.rank_zero_only and not is_rank_zero()


# ---------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------
class _FileSink(_RankZeroSink):
    _json_lines = False

    def __init__(self, path: str | os.PathLike, append: bool = True, *, rank_zero_only: bool = True) -> None:
        self.path = Path(path)
        self.append = bool(append)
        self.rank_zero_only = bool(rank_zero_only)
        self.columns: list[str] | None = None
        self._steps: set | None = None
        self._warned = False

    def _open(self, row: dict) -> None:
        """On first use: start the file, or (append) repair a torn last record and note the rows already there —
        only those are skipped later (a resumed run); every row this sink is given is written."""
        if self._steps is not None:
            return
        self._steps = set()
        exists = self.path.exists() and self.path.stat().st_size > 0
        if not (self.append and exists):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")
            return
        found = repair_row_file(self.path, self._json_lines)
        if found.rows and not any("step" in r for r in found.rows) or (found.columns and "step" not in found.columns):
            raise ValueError(f"{self.path} exists and is not a rows file (no 'step' column); refusing to append to "
                             "it: give another path, or append=False to overwrite it")
        self._steps = {_row_id(r) for r in found.rows}
        if found.columns:
            self.columns = list(found.columns)

    def __call__(self, row: dict) -> None:
        if self._skip():
            return
        self._open(row)
        step = row.get("step")
        if step is not None and _row_id(row) in self._steps:  # type: ignore[operator]
            if not self._warned:
                self._warned = True
                warnings.warn(f"{self.path} already has a row for step {step} (an earlier or resumed run); rows of "
                              "steps already in the file are not written again (use another path, or "
                              "append=False, for a fresh file)", RuntimeWarning, stacklevel=3)
            return
        if not self._json_lines and self.columns is None:
            keys = ROW_KEYS
            self.columns = list(keys) + [k for k in row if k not in keys]
        append_rows(self.path, [row], self.columns, self._json_lines, fsync=False)

    def close(self) -> None:
        """Nothing is held open (each row is appended and flushed); kept for the sink protocol."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"


class CSVSink(_FileSink):
    """Rows to a CSV file (header = :data:`~curvature.rows.ROW_KEYS` plus any extra keys of the first row, or
    the existing file's header), one flushed record per row. Lists (``eigenvalues``) are JSON text, ``None`` an
    empty cell. An existing file is appended to (steps already in it are not written again); ``append=False``
    overwrites it."""


class JSONLinesSink(_FileSink):
    """Rows to a JSON-lines file, one object per row, always valid JSON: non-finite floats (also inside lists)
    are written as the strings ``"nan"``, ``"inf"``, ``"-inf"`` and read back as floats by
    :func:`~curvature.rows.read_rows`. Appends like :class:`CSVSink`."""

    _json_lines = True


# ---------------------------------------------------------------------------------------------------
# TensorBoard, logging, callables
# ---------------------------------------------------------------------------------------------------
class TensorBoardSink(_RankZeroSink):
    """Scalars to TensorBoard: ``{prefix}{key}`` for the numeric keys of a row (and ``{prefix}eigenvalue_i`` /
    ``{prefix}preconditioned_eigenvalue_i`` when k > 1), at global step ``row["step"]``; rank 0 only under DDP.

    ``target`` is a log directory (a ``torch.utils.tensorboard.SummaryWriter`` is made on first use and closed by
    :meth:`close`) or an existing writer (left open: its owner closes it)."""

    def __init__(self, target: Any, prefix: str = "curvature/", *, rank_zero_only: bool = True) -> None:
        self.prefix = prefix
        self.rank_zero_only = bool(rank_zero_only)
        if isinstance(target, (str, os.PathLike)):
            self.log_dir, self.writer, self._own = str(target), None, True
        else:
            self.log_dir, self.writer, self._own = None, target, False

    def __call__(self, row: dict) -> None:
        if self._skip():
            return
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter  # needs the `tensorboard` package
            self.writer = SummaryWriter(log_dir=self.log_dir)
        step = row.get("step")
        for key, value in numeric_items(row, self.prefix).items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None and self._own:
            self.writer.close()
            self.writer = None


class LoggingSink(_RankZeroSink):
    """One line per row to a ``logging.Logger`` (default ``curvature.tracking``) at ``level`` (INFO); rank 0 only
    under DDP."""

    def __init__(self, logger: logging.Logger | str | None = None, level: int = logging.INFO, *,
                 rank_zero_only: bool = True) -> None:
        self.logger = logger if isinstance(logger, logging.Logger) else logging.getLogger(logger or log.name)
        self.level = level
        self.rank_zero_only = bool(rank_zero_only)

    def __call__(self, row: dict) -> None:
        if not self._skip():
            self.logger.log(self.level, format_row(row))


class CallableSink:
    """Any ``callable(row)`` as a sink (called on every rank)."""

    def __init__(self, fn: Callable[[dict], Any]) -> None:
        self.fn = fn

    def __call__(self, row: dict) -> None:
        self.fn(row)


# ---------------------------------------------------------------------------------------------------
# Experiment trackers
# ---------------------------------------------------------------------------------------------------
class WandbSink(_RankZeroSink):
    """Rows to Weights & Biases: ``run.log({prefix + key: value, ...}, step=row["step"])`` with each finite numeric
    column (:func:`numeric_items`). ``run`` is a ``wandb`` run (``wandb.init()``'s result, ``wandb.run``) or the
    ``wandb.log`` function. W&B's step must not go backwards: use the same step numbers as your own
    ``wandb.log(..., step=)`` calls (a row whose step is below W&B's current one is dropped by W&B, with its
    warning). Rank 0 only under DDP."""

    def __init__(self, run: Any, prefix: str = "curvature/", *, rank_zero_only: bool = True) -> None:
        log_fn = getattr(run, "log", None) if not _is_function(run) else run
        if not callable(log_fn):
            raise TypeError(f"WandbSink needs a wandb run (with .log) or wandb.log, got {type(run).__name__}")
        self.run, self._log, self.prefix = run, log_fn, prefix
        self.rank_zero_only = bool(rank_zero_only)

    def __call__(self, row: dict) -> None:
        if self._skip():
            return
        values = numeric_items(row, self.prefix)
        step = row.get("step")
        if values:
            if step is None:
                self._log(values)
            else:
                self._log(values, step=int(step))

    def __repr__(self) -> str:
        return f"WandbSink({self.run!r})"


class MLflowSink(_RankZeroSink):
    """Rows to MLflow: ``client.log_metric(run_id, prefix + key, value, step=row["step"])`` for each finite numeric
    column (:func:`numeric_items`). ``run`` is an ``mlflow.ActiveRun`` / ``mlflow.entities.Run`` (``mlflow.start_run()``),
    a run id (with ``client=``), or an ``MlflowClient`` together with ``run_id=``. Rank 0 only under DDP."""

    def __init__(self, run: Any = None, *, client: Any = None, run_id: str | None = None, prefix: str = "curvature/",
                 rank_zero_only: bool = True) -> None:
        if run is not None and hasattr(run, "log_metric") and hasattr(run, "get_run"):  # an MlflowClient
            client, run = run, None
        if isinstance(run, str):
            run_id = run
        elif run is not None:
            info = getattr(run, "info", None)
            run_id = getattr(info, "run_id", None) or getattr(run, "run_id", None)
        if not run_id:
            raise TypeError("MLflowSink needs an MLflow run (mlflow.start_run()), or client= and run_id=")
        if client is None:
            from mlflow.tracking import MlflowClient  # optional dependency

            client = MlflowClient()
        self.client, self.run_id, self.prefix = client, str(run_id), prefix
        self.rank_zero_only = bool(rank_zero_only)

    def __call__(self, row: dict) -> None:
        if self._skip():
            return
        step = row.get("step")
        for key, value in numeric_items(row, self.prefix).items():
            self.client.log_metric(self.run_id, key, value, step=int(step) if step is not None else 0)

    def __repr__(self) -> str:
        return f"MLflowSink(run_id={self.run_id!r})"


def _is_function(obj: Any) -> bool:
    import inspect

    return inspect.isfunction(obj) or inspect.ismethod(obj) or inspect.isbuiltin(obj)


def _module_of(obj: Any) -> str:
    return (getattr(obj, "__module__", None) or type(obj).__module__ or "") if _is_function(obj) \
        else (type(obj).__module__ or "")


# ---------------------------------------------------------------------------------------------------
# Formatting and specs
# ---------------------------------------------------------------------------------------------------
def _fmt(value: Any, spec: str = ".4g") -> str:
    return "—" if value is None else (format(value, spec) if isinstance(value, (int, float)) else str(value))


def format_row(row: dict) -> str:
    """A one-line human summary of a row (what :class:`LoggingSink` writes)."""
    parts = [f"step {row.get('step')}: λ_max(H)={_fmt(row.get('sharpness'))}"]
    if row.get("preconditioned_sharpness") is not None:
        parts.append(f"λ_max(P⁻¹H)={_fmt(row.get('preconditioned_sharpness'))}")
    parts.append(f"threshold={_fmt(row.get('threshold'))}")
    parts.append(f"edge_ratio={_fmt(row.get('edge_ratio'), '.3f')}")
    parts.append(f"lr={_fmt(row.get('lr'))} loss={_fmt(row.get('loss'))}")
    parts.append(f"hvps={row.get('num_hvps')} {_fmt(row.get('seconds'), '.3f')}s")
    if row.get("stability_note") and not row.get("error"):  # why threshold / edge_ratio is empty
        parts.append(f"note: {row['stability_note']}")
    if row.get("error"):
        parts.append(f"ERROR: {row['error']}")
    return ", ".join(parts)


def make_sink(spec: Any) -> Callable[[dict], Any]:
    """A sink from a short spec: a path ending in ``.csv`` → :class:`CSVSink`, ``.jsonl``/``.json``/``.ndjson`` →
    :class:`JSONLinesSink`; a ``logging.Logger`` → :class:`LoggingSink`; a ``SummaryWriter`` (anything with
    ``add_scalar``) → :class:`TensorBoardSink`; a ``wandb`` run or ``wandb.log`` → :class:`WandbSink`; an MLflow
    run (``mlflow.start_run()``) → :class:`MLflowSink`; any other callable is used as it is."""
    if isinstance(spec, (str, os.PathLike)):
        suffix = Path(spec).suffix.lower()
        if suffix == ".csv":
            return CSVSink(spec)
        if is_json_lines(spec):
            return JSONLinesSink(spec)
        raise ValueError(f"a sink path must end in .csv or .jsonl/.json/.ndjson, got {str(spec)!r} "
                         "(use TensorBoardSink(log_dir) for TensorBoard)")
    if isinstance(spec, (_RankZeroSink, CallableSink)):
        return spec
    if isinstance(spec, logging.Logger):
        return LoggingSink(spec)
    module = _module_of(spec)
    if module.split(".")[0] == "wandb" and (callable(spec) or hasattr(spec, "log")):
        return WandbSink(spec)
    if module.split(".")[0] == "mlflow" and (hasattr(getattr(spec, "info", None), "run_id") or
                                              hasattr(spec, "get_run")):
        if hasattr(spec, "get_run"):
            raise TypeError("an MlflowClient alone does not name a run: use MLflowSink(client=client, run_id=...)")
        return MLflowSink(spec)
    if hasattr(spec, "add_scalar"):
        return TensorBoardSink(spec)
    if callable(spec):
        return spec
    raise TypeError(f"cannot use {type(spec).__name__} as a sink: give a .csv/.jsonl path, a logging.Logger, a "
                    "SummaryWriter, a wandb run, an MLflow run or a callable(row)")
