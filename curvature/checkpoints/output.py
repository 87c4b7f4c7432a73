"""The analysis's resumable output file (CSV / JSON lines): row identity (the checkpoint's ``file_id``, the
options a row was computed with), opening for resume or overwrite, refusing a foreign file."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch

from ..rows import ROW_KEYS, read_row_file, write_rows
from .errors import CheckpointError

__all__ = ['ROW_COLUMNS', 'file_id', 'open_output']

#: Columns of an analysis row, in output order: ``file``, then the tracker's row keys (``eigenvalues`` columns hold
#: JSON lists in CSV).
#: ``preconditioner`` says which P a λ(P⁻¹H) uses (always ``"next_step"`` here: the P of the step about to be taken);
#: ``file_id`` (size:mtime of the checkpoint) and ``options`` (what the row was computed with) let a resumed run tell
#: a row it can reuse from a stale or foreign one.
ROW_COLUMNS: tuple[str, ...] = ("file",) + tuple(k for k in ROW_KEYS if k != "when") + \
    tuple(k for k in ("preconditioner",) if k not in ROW_KEYS) + ("file_id", "options")


# ---------------------------------------------------------------------------------------------------
# Output file (CSV / JSON lines), row identity, resume
# ---------------------------------------------------------------------------------------------------
def same_file(a: str, b: Path) -> bool:
    if a == str(b):
        return True
    with contextlib.suppress(OSError):
        return Path(a).resolve() == b.resolve()
    return False


def file_id(path: Path) -> str | None:
    """What identifies a checkpoint file's content cheaply: ``"size:mtime_ns"`` (``None`` if unreadable). A file
    overwritten in place (``last.ckpt``) gets a new id, so its old row is recomputed on resume."""
    with contextlib.suppress(OSError):
        st = Path(path).stat()
        return f"{st.st_size}:{st.st_mtime_ns}"
    return None


def callable_name(obj: Any) -> str:
    if isinstance(obj, str):
        return obj
    if obj is None:
        return "model"
    module = getattr(obj, "__module__", None) or type(obj).__module__
    name = getattr(obj, "__qualname__", None) or type(obj).__qualname__
    return f"{module}:{name}"


def data_fingerprint(spec: Any, data: Any) -> str:
    """A short hash of the data's tensors (shapes, dtypes and bytes) when it is a batch or a list of batches held in
    memory; for other iterables (a DataLoader) only its type and the spec can be compared."""
    import hashlib

    h = hashlib.sha1()
    budget = [512 * 2**20]

    def visit(x: Any) -> bool:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"{tuple(t.shape)}{t.dtype}".encode())
            nbytes = t.numel() * t.element_size()
            budget[0] -= nbytes
            if budget[0] < 0:
                return False
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            return True
        if isinstance(x, dict):
            return all(visit(k) and visit(v) for k, v in sorted(x.items(), key=lambda kv: str(kv[0])))
        if isinstance(x, (list, tuple)):
            h.update(f"[{len(x)}".encode())
            return all(visit(v) for v in x)
        if isinstance(x, (int, float, str, bool, type(None))):
            h.update(repr(x).encode())
            return True
        return False

    label = spec if isinstance(spec, str) else type(data).__name__
    return f"{label}#{h.hexdigest()[:12]}" if visit(data) else f"{label}#{type(data).__name__}"


def options_text(**options: Any) -> str:
    return json.dumps({k: (str(v) if not isinstance(v, (int, float, str, bool, type(None))) else v)
                       for k, v in sorted(options.items())}, sort_keys=True, separators=(",", ":"))


def _options_diff(old: str, new: str) -> str:
    try:
        a, b = json.loads(old), json.loads(new)
    except ValueError:
        return "unreadable options"
    keys = sorted(set(a) | set(b))
    return ", ".join(f"{k}: {a.get(k)!r} there, {b.get(k)!r} now" for k in keys if a.get(k) != b.get(k))


def _ours(found: Any, jl: bool, text_start: str) -> bool:
    """Whether a rows file was written by analyze_checkpoints (a ``file`` column), or is an empty/torn start of one."""
    if jl:
        if found.rows:
            return all("file" in r for r in found.rows)
        return found.bad == 0 and (text_start == "" or '{"file"'.startswith(text_start[:7]))
    if found.columns is not None:
        return "file" in found.columns
    header = ",".join(ROW_COLUMNS)
    return found.bad == 0 and header.startswith(text_start.rstrip("\n"))


def open_output(out_path: Path, jl: bool, *, resume: bool, overwrite: bool, options: str,
                 files: list[Path]) -> tuple[list[dict], list[str], list[str]]:
    """Read, check and repair an existing ``out``; returns (rows kept, columns to write, notes for the user).

    Kept: rows of this analysis (``file`` column), without error, computed with the same ``options`` and on a
    checkpoint whose ``file_id`` is unchanged. Dropped (and so recomputed): a torn last record, malformed records,
    error rows, rows of overwritten checkpoints. Refused: a file that is not an analysis output (unless
    ``overwrite``), rows computed with other options (unless ``resume=False``, which starts afresh)."""
    columns = list(ROW_COLUMNS)
    if not out_path.exists() or out_path.stat().st_size == 0:
        return [], columns, []
    found = read_row_file(out_path, jl)
    with out_path.open(encoding="utf-8", errors="replace") as f:
        start = f.read(4096)
    if not _ours(found, jl, start):
        if not overwrite:
            raise CheckpointError(f"--out {out_path}: the file exists and is not an analysis output (no 'file' "
                                  f"column); refusing to overwrite it. Choose another --out, or pass --overwrite "
                                  f"(overwrite=True) to replace it")
        write_rows(out_path, [], columns, jl)
        return [], columns, [f"{out_path}: replaced (--overwrite)"]
    notes = []
    if found.torn:
        notes.append(f"{out_path}: dropped a torn last row (a write cut short); that checkpoint is analysed again")
    if found.bad:
        notes.append(f"{out_path}: dropped {found.bad} malformed row(s); their checkpoints are analysed again")
    if not resume:
        write_rows(out_path, [], columns, jl)
        return [], columns, notes
    previous = found.rows
    other = [r for r in previous if r.get("options") not in (None, options)]
    if other:
        raise CheckpointError(f"--out {out_path} holds rows computed with other options ("
                              f"{_options_diff(str(other[0]['options']), options)}); reusing them would mix "
                              f"results: use another --out, or --no-resume (resume=False) to recompute every "
                              f"checkpoint into this one")
    kept, stale = [], 0
    for r in previous:
        if r.get("error") or not r.get("file"):
            continue
        match = next((f for f in files if same_file(str(r["file"]), f)), None)
        if r.get("options") is None or r.get("file_id") is None or \
                (match is not None and r.get("file_id") != file_id(match)):
            stale += 1
            continue
        kept.append(r)
    if stale:
        notes.append(f"{out_path}: {stale} row(s) are stale (the checkpoint changed since, or the row has no "
                     f"identity from an older version) and are recomputed")
    if found.damaged or len(kept) != len(previous) or (found.columns is not None and found.columns != columns):
        write_rows(out_path, kept, columns, jl)  # atomic: the kept rows, nothing else
    return kept, columns, notes
