"""The row: its schema (:data:`ROW_KEYS`, the column order; :data:`SCALAR_KEYS`, what scalar loggers get) and the
one writer and reader of row files (CSV and JSON lines), for the tracker's sinks and ``analyze_checkpoints``.

A *row* is a flat dict (:data:`ROW_KEYS`, plus ``file`` etc. for checkpoint analysis). On disk:

* **JSON lines**: one object per line, always valid JSON (``json.dumps(allow_nan=False)``). JSON has no NaN or
  infinity, so a non-finite float, also inside a list (``eigenvalues``), is written as the string ``"nan"``,
  ``"inf"`` or ``"-inf"``; the reader turns those strings back into floats in numeric columns and lists.
* **CSV**: a header line, then one record per row; ``None`` is an empty cell, lists are JSON text (same encoding),
  non-finite floats are ``nan``/``inf``/``-inf``.

Every row is written with one ``write`` of complete line(s), flushed (and ``fsync``-ed by :func:`append_rows`).
A write cut short (crash, ``kill -9``, full disk) leaves a *torn* last record: the file then does not end in a
newline, or its last record does not parse. :func:`read_row_file` reports it and :func:`repair_row_file`
drops it (atomically: the good records are written to a temporary file that replaces the original), so a
resumed analysis measures that row again instead of appending to a half line.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ROW_KEYS", "SCALAR_KEYS", "SIGNAL_KEYS", "CRITICAL_KEYS", "to_plain", "encode_json_row", "encode_csv_row",
           "parse_value", "is_json_lines", "read_rows", "read_row_file", "repair_row_file", "append_rows", "write_rows",
           "RowFile", "LIST_KEYS", "INT_KEYS", "BOOL_KEYS", "STR_KEYS"]

#: The tracker row columns :func:`curvature.signals.step_signals` fills.
SIGNAL_KEYS = ("batch_sharpness", "update_sharpness", "predicted_loss_change", "actual_loss_change",
               "preconditioned_batch_sharpness", "preconditioned_update_sharpness", "signals_num_hvps",
               "signals_seconds")

#: The tracker row columns of a critical-sharpness measurement (:func:`curvature.critical.critical_sharpness`,
#: ``critical_every=N``): λ_c = 2/η_c, η_c, η·λ_c/2 (1.0 = the edge of stability, any optimizer), its forward passes
#: (the loss at θ included unless the step's loss was reused) and seconds.
CRITICAL_KEYS = ("critical_sharpness", "critical_lr", "critical_edge_ratio", "critical_forward_passes",
                 "critical_seconds")

#: The keys of every tracker row, in column order (the API contract's keys first).
ROW_KEYS: tuple[str, ...] = (
    "step",                       # the step label passed to tracker.step (or the tracker's own call counter)
    "lr",                         # optimizer.param_groups[0]["lr"] at the time of measurement
    "loss",                       # mean loss at the measured parameters, on the probe data
    "sharpness",                  # λ_max(H)
    "preconditioned_sharpness",   # λ_max(P⁻¹H) for optimizers with a diagonal P (Adam, RMSprop, ...), else None
    "threshold",                  # stability_threshold(optimizer): 2/η (SGD), (2+2μ)/η, (2+2β₁)/((1−β₁)η) (Adam)
    "edge_ratio",                 # λ / threshold (λ^{P⁻¹H} for Adam): 1.0 = edge of stability
    "num_hvps",                   # HVPs spent on this row (H, P⁻¹H and the signals, retries included)
    "seconds",                    # wall time of the measurement
    "converged",                  # every solve reached tol
    "eigenvalues",                # top-k eigenvalues of H (list)
    "preconditioned_eigenvalues",  # top-k of P⁻¹H (list) or None
    "residual",                   # largest relative residual ‖Hv − λv‖/|λ| of the H solve
    "preconditioned_residual",    # same for P⁻¹H
    "preconditioned_num_hvps",    # the part of num_hvps spent on P⁻¹H
    "warm_start",                 # the accepted H solve started from the previous eigenvectors
    "lookahead",                  # P was built for the step about to be taken (Adam before its first step)
    "optimizer",                  # optimizer class name
    "when",                       # "before_step" or "after_step"
    "error",                      # None, or why the measurement failed / did not converge
    "preconditioner",             # "next_step" (P of the step about to be taken) or "last_step"; None without Adam
    "error_bound",                # bound on the relative error of `sharpness`: ‖r‖²/(gap·|λ|) (solver's estimate)
    "preconditioned_error_bound",  # the same for `preconditioned_sharpness`
    "eig_tol",                    # the relative eigenvalue accuracy asked for (None: residual tol only)
    "solver",                     # eigensolver used
    "source",                     # "operator" (a fresh first-order graph) or "training_graph" (the step's own)
    "error_kind",                 # None, or why the row is empty / inexact: curvature.usage.FAILURE_KINDS
    "stability_note",             # why threshold / edge_ratio / preconditioned_sharpness is empty (None: all there)
    "hvp_route",                  # "one_sided" (one gradient per HVP, central check on the Ritz vector) or "exact"
    "num_gradients",              # first-order gradient passes of the row (one-sided route: G(θ), 1/HVP, 2/check)
    "hvp_route_note",             # why the route is exact where one-sided was eligible (None otherwise)
    "compile_seconds",            # compile=True: seconds the operators' first (compiling) HVP took (None otherwise)
) + SIGNAL_KEYS + CRITICAL_KEYS   # per-step signals (signals=True), critical sharpness (critical_every=N)

#: Numeric keys a scalar logger (TensorBoard, Lightning, HF) gets.
SCALAR_KEYS = ("sharpness", "preconditioned_sharpness", "threshold", "edge_ratio", "lr", "loss", "num_hvps",
               "seconds", "residual", "critical_sharpness", "critical_edge_ratio")


#: Columns holding lists of floats (JSON text in CSV).
LIST_KEYS = ("eigenvalues", "preconditioned_eigenvalues")
#: Integer columns.
INT_KEYS = ("step", "num_hvps", "preconditioned_num_hvps", "signals_num_hvps", "critical_forward_passes", "num_gradients",
            "optimizer_index", "file_size")
#: Boolean columns.
BOOL_KEYS = ("converged", "warm_start", "lookahead")
#: Text columns (never parsed as numbers).
STR_KEYS = ("optimizer", "when", "error", "error_kind", "file", "preconditioner", "file_id", "options", "run", "solver",
            "source", "stability_note", "hvp_route", "hvp_route_note")

_NONFINITE = {"nan": math.nan, "inf": math.inf, "+inf": math.inf, "-inf": -math.inf, "infinity": math.inf,
              "-infinity": -math.inf}


def to_plain(value: Any) -> Any:
    """A JSON-safe copy of one value: tensors / numpy arrays → lists or numbers, numpy scalars → Python numbers,
    non-finite floats → ``"nan"`` / ``"inf"`` / ``"-inf"`` (recursively, in lists, tuples and dicts)."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # torch.Tensor, numpy array / scalar
        value = value.tolist()
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else ("nan" if math.isnan(value) else ("inf" if value > 0 else "-inf"))
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value if isinstance(value, (int, float)) else str(value)


def encode_json_row(row: dict) -> str:
    """One JSON line (with the newline) for ``row``; valid JSON always (no bare NaN / Infinity)."""
    return json.dumps({str(k): to_plain(v) for k, v in row.items()}, allow_nan=False) + "\n"


def _csv_cell(value: Any) -> Any:
    value = to_plain(value)
    if value is None:
        return ""
    if isinstance(value, (list, dict)):
        return json.dumps(value, allow_nan=False)
    return value


def encode_csv_row(row: dict, columns: Sequence[str], header: bool = False) -> str:
    """The CSV text (header line first if asked) of one row with the given columns (others are dropped)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    if header:
        writer.writerow(list(columns))
    writer.writerow([_csv_cell(row.get(k)) for k in columns])
    return buf.getvalue()


def _float(text: Any) -> float:
    if isinstance(text, str):
        low = text.strip().lower()
        if low in _NONFINITE:
            return _NONFINITE[low]
    return float(text)


def parse_value(key: str, value: Any) -> Any:
    """One value read back (CSV text or a JSON value) → its Python type; ``None`` for empty cells."""
    if value is None:
        return None
    if key in LIST_KEYS:
        if isinstance(value, str):
            text = value.strip()
            if text == "" or text.lower() in ("none", "null"):
                return None
            try:
                value = json.loads(text)
            except ValueError:
                return None
        if isinstance(value, list):
            with contextlib.suppress(TypeError, ValueError):
                return [_float(v) for v in value]
        return None
    if not isinstance(value, str):
        if key in INT_KEYS and isinstance(value, float) and math.isfinite(value) and value == int(value):
            return int(value)
        return value
    text = value.strip()
    if text == "" or text.lower() in ("none", "null"):
        return None
    if key in STR_KEYS:
        return value
    if key in BOOL_KEYS:
        return text.lower() in ("true", "1", "yes")
    try:
        number = _float(text)
    except ValueError:
        return value
    if key in INT_KEYS and math.isfinite(number) and number == int(number):
        return int(number)
    return number


def is_json_lines(path: str | os.PathLike, json_lines: bool | None = None) -> bool:
    """Whether a rows file is JSON lines: ``json_lines`` if given, else by suffix (``.jsonl``/``.json``/``.ndjson``)."""
    return bool(json_lines) if json_lines is not None else Path(path).suffix.lower() in (".jsonl", ".json", ".ndjson")


@dataclass
class RowFile:
    """What :func:`read_row_file` found: the parsed rows, the CSV header (``None`` for JSON lines), and the
    records that were dropped (``torn``: the last record was cut short; ``bad``: other records that do not parse,
    e.g. a row appended to a torn line by an older version)."""

    rows: list[dict] = field(default_factory=list)
    columns: list[str] | None = None
    torn: bool = False
    bad: int = 0
    raw: list[Any] = field(default_factory=list)  # the good records as read (CSV: lists of cells; JSONL: lines)

    @property
    def damaged(self) -> bool:
        return self.torn or self.bad > 0


def read_row_file(path: str | os.PathLike, json_lines: bool | None = None) -> RowFile:
    """Read a rows file, keeping only complete, well-formed records (see :class:`RowFile`).

    A file that does not end with a newline has a torn last record (every writer ends each record with one);
    CSV records whose number of cells differs from the header's are bad, and so are JSON lines that do not
    parse as an object."""
    path = Path(path)
    text = path.read_text(encoding="utf-8", errors="replace")
    out = RowFile()
    if not text:
        return out
    torn = not text.endswith("\n")
    if is_json_lines(path, json_lines):
        lines = text.split("\n")
        lines.pop()  # the torn last record, or the "" after the final newline
        out.torn = torn
        for line in lines:
            if not line.strip():
                continue
            try:
                obj = json.loads(line, parse_constant=lambda c: _NONFINITE[c.lower()])
            except (ValueError, KeyError):
                obj = None
            if not isinstance(obj, dict):
                out.bad += 1
                continue
            out.rows.append({k: parse_value(k, v) for k, v in obj.items()})
            out.raw.append(line)
        return out
    records = list(csv.reader(io.StringIO(text)))
    if torn and records:
        records.pop()
        out.torn = True
    if not records:
        return out
    header, body = records[0], records[1:]
    out.columns = header
    for i, cells in enumerate(body):
        if not cells:
            continue
        if len(cells) != len(header):
            if i == len(body) - 1:  # cut inside a quoted multi-line cell: still the torn last record
                out.torn = True
            else:
                out.bad += 1
            continue
        out.rows.append({k: parse_value(k, v) for k, v in zip(header, cells)})
        out.raw.append(cells)
    return out


def read_rows(path: str | os.PathLike, json_lines: bool | None = None, *, missing_ok: bool = False) -> list[dict]:
    """Rows written by the tracker's file sinks or by ``analyze_checkpoints``, parsed back into Python values
    (numbers, bools, lists, ``None`` for empty cells, ``nan``/``inf`` as floats).

    JSON lines are recognised by the suffix (``.jsonl``/``.json``/``.ndjson``) unless ``json_lines`` says so.
    A torn last record (a write cut short) and malformed records are skipped. ``missing_ok`` returns ``[]``
    for a missing file."""
    path = Path(path)
    if not path.exists():
        if missing_ok:
            return []
        raise FileNotFoundError(path)
    return read_row_file(path, json_lines).rows


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8", newline="") as f:
        f.write(text)
        f.flush()
        with contextlib.suppress(OSError):
            os.fsync(f.fileno())
    os.replace(tmp, path)


def write_rows(path: str | os.PathLike, rows: Iterable[dict], columns: Sequence[str] | None = None,
               json_lines: bool | None = None) -> None:
    """Replace ``path`` with exactly ``rows`` (atomically: a temporary file renamed over it). CSV needs
    ``columns`` (the header)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = list(rows)
    if is_json_lines(path, json_lines):
        text = "".join(encode_json_row(r) for r in rows)
    else:
        if columns is None:
            raise ValueError("write_rows: a CSV file needs columns=")
        text = encode_csv_row({}, columns, header=True).split("\n", 1)[0] + "\n" + \
            "".join(encode_csv_row(r, columns) for r in rows)
    _atomic_write(path, text)


def repair_row_file(path: str | os.PathLike, json_lines: bool | None = None) -> RowFile:
    """Drop a torn last record and malformed records from ``path`` (atomic rewrite of the good records, their
    text unchanged); returns what was read. A healthy file is left untouched."""
    path = Path(path)
    found = read_row_file(path, json_lines)
    if found.damaged:
        if is_json_lines(path, json_lines):
            text = "".join(line + "\n" for line in found.raw)
        else:
            buf = io.StringIO()
            writer = csv.writer(buf, lineterminator="\n")
            if found.columns is not None:
                writer.writerow(found.columns)
            writer.writerows(found.raw)
            text = buf.getvalue()
        _atomic_write(path, text)
    return found


def append_rows(path: str | os.PathLike, rows: Iterable[dict], columns: Sequence[str] | None = None,
                json_lines: bool | None = None, *, fsync: bool = True) -> None:
    """Append ``rows`` to ``path`` (CSV: the header first when the file is new or empty), one ``write`` per row,
    flushed and fsync-ed, so a crash can tear at most the record being written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    jl = is_json_lines(path, json_lines)
    if not jl and columns is None:
        raise ValueError("append_rows: a CSV file needs columns=")
    with path.open("a", encoding="utf-8", newline="") as f:
        new = f.tell() == 0
        for i, row in enumerate(rows):
            f.write(encode_json_row(row) if jl else encode_csv_row(row, columns, header=new and i == 0))
            f.flush()
        if fsync:
            with contextlib.suppress(OSError):
                os.fsync(f.fileno())
