"""The offline analysis loop: one row per checkpoint (:func:`analyze_checkpoints`) and its text table."""
from __future__ import annotations

import contextlib
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import optim as _optim
from ..data import own_loss_batch
from ..diagnostics import check_solver_options, sharpness
from ..rows import append_rows, is_json_lines
from ..tracking import warm_started_solve
from .errors import CheckpointError, first_line
from .optimizer_state import restore_optimizer
from .output import ROW_COLUMNS, callable_name, data_fingerprint, file_id, open_output, options_text, same_file
from .reading import (Checkpoint, as_int, find_checkpoints, fit_state_dict, hf_step, load_checkpoint, natural_key,
                      step_from_name)
from .resolve import add_search_path, build_model, import_object, resolve_data, resolve_loss, resolve_model_factory

__all__ = ['analyze_checkpoints', 'format_rows']

# ---------------------------------------------------------------------------------------------------
# The analysis
# ---------------------------------------------------------------------------------------------------
def _empty_row(path: Path, step: int | None) -> dict:
    row: dict[str, Any] = dict.fromkeys(ROW_COLUMNS)
    row.update(file=str(path), step=step, num_hvps=0, seconds=0.0)
    return row


def _warm_start(prev: torch.Tensor | None, n: int) -> torch.Tensor | None:
    if prev is None or prev.ndim != 2 or prev.shape[0] != n:
        return None
    return prev


def _scan(path: Path, trust: bool) -> tuple[int | None, str | None, Checkpoint | None]:
    """(step, error, checkpoint) of one file. The step is the checkpoint's own (safetensors metadata, an HF
    Trainer's ``trainer_state.json``, or the file loaded with ``mmap=True``: tensors stay on disk until used), else
    the file name's. A memory-mapped checkpoint is kept for the analysis (each zip-format file is unpickled once);
    one that had to be read into memory (the legacy non-zip ``torch.save`` format cannot be memory-mapped) is
    dropped and read again when its turn comes, so at most one such checkpoint is held at a time (with
    ``trust_checkpoints``, its unpickling code then runs twice)."""
    ck = None
    try:
        if path.is_dir():
            load_checkpoint(path, trust)  # the clear CheckpointError
        if path.name.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
            step = hf_step(path)
            if step is None:
                step = as_int(meta.get("step", meta.get("global_step")))
        else:
            ck = load_checkpoint(path, trust, mmap=True)
            step = ck.step
            if step is None and ck.epoch is not None and step_from_name(path) is None:
                step = ck.epoch
            if not ck.extra.get("mmap"):
                ck = None
    except CheckpointError as exc:
        return step_from_name(path), str(exc), None
    except Exception as exc:  # noqa: BLE001 - reported in the row
        return step_from_name(path), f"{path}: {type(exc).__name__}: {first_line(exc)}", None
    return (step if step is not None else step_from_name(path)), None, ck


def analyze_checkpoints(paths_or_dir: Any, model_factory: Any, data: Any, loss_fn: Any, *, k: int = 1,
                        solver: str = "lobpcg", tol: float = 1e-4, max_iters: int | None = None,
                        device: Any = None, trust_checkpoints: bool = False, optimizer_factory: Any = None,
                        progress: bool = False, out: str | os.PathLike | None = None, resume: bool = True,
                        json_lines: bool | None = None, recursive: bool = False, errors: str = "report",
                        callback: Callable[[dict], Any] | None = None, overwrite: bool = False,
                        search_path: Iterable[str | os.PathLike] = (), **operator_options: Any) -> list[dict]:
    """Sharpness (and Adam's pre-conditioned sharpness) of every checkpoint in a folder, one row each.

    Args:
        paths_or_dir: a directory (its ``*.pt, *.pth, *.ckpt, *.bin, *.safetensors, *.tar`` files, or the
            ``checkpoint-N/`` folders of a Hugging Face Trainer ``output_dir``), a file, or a list of them.
        model_factory: ``() -> nn.Module`` building the architecture (or ``"pkg.module:function"`` /
            ``"path/to/file.py:function"``); the checkpoint's weights are loaded into it (dtype of the factory's
            model is kept). Tied weights missing from the file (HF's ``lm_head.weight``) are filled from the
            parameter they are tied to in the built model.
        data: one batch ``(inputs, targets)`` or an iterable of batches (or a factory / ``"pkg.module:fn"``
            returning one); the same data is used for every checkpoint.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``, or ``"cross_entropy"``, ``"mse"``, ``"pkg.mod:fn"``;
            ``None`` (or ``"model"``): the model computes its own loss (dict batches with ``labels``).
        k, solver, tol, max_iters: as in :func:`curvature.sharpness`. Each solve is warm-started from the
            previous checkpoint's eigenvectors.
        device: move the model here first (e.g. ``"cuda"``).
        trust_checkpoints: allow pickled Python objects (``torch.load(weights_only=False)``). Only for files
            you trust: unpickling can run arbitrary code.
        optimizer_factory: ``params -> Optimizer`` to rebuild the optimizer whose saved state is loaded;
            default: inferred (Adam / AdamW / SGD) from the saved ``param_groups``.
        progress: show a tqdm bar (stderr) over the checkpoints.
        out: CSV file (or JSON lines for ``.jsonl`` / ``.json``, or ``json_lines=True``); each row is appended,
            flushed and fsync-ed as soon as it is measured.
        resume: with ``out`` existing, skip the checkpoints already analysed there: rows with the same options
            (k, solver, tol, loss, data, dtype, ...) on an unchanged file (size and mtime); error rows, a torn last
            row and rows of changed files are recomputed; rows computed with other options are refused
            (:class:`CheckpointError`). ``resume=False`` recomputes everything into ``out``.
        overwrite: replace an existing ``out`` that is not an analysis output (else :class:`CheckpointError`).
        search_path: folders to import ``"pkg.module:fn"`` specs from (after the installed packages).
        errors: ``"report"`` (a failing checkpoint gets a row with ``error`` set; the rest are analysed) or
            ``"raise"``.
        callback: called with each new row.
        **operator_options: passed to the Hessian operator (``dtype``, ``method``, ``max_batch_size``, ...).

    Returns:
        The rows, sorted by step (files without a step: natural order of names), including rows read back
        from ``out`` when resuming. ``preconditioned_sharpness`` is set when the checkpoint holds the state
        of an optimizer with a diagonal pre-conditioner (Adam/AdamW; RMSprop, Adagrad, Adamax, NAdam, RAdam,
        Adafactor, Adadelta via ``optimizer_factory``): λ_max(P⁻¹H) with the P of the step about to be taken (``preconditioner="next_step"``: the saved
        second moments updated with this data's gradient); ``threshold``
        (:func:`curvature.optim.stability_threshold`) and ``lr`` when it holds any optimizer state that could be
        restored.

    Raises:
        CheckpointError: missing path, no checkpoint files, a factory string that does not import, an ``out``
            that is not an analysis output or holds rows of other options.
    """
    if errors not in ("report", "raise"):
        raise ValueError(f"errors must be 'report' or 'raise', got {errors!r}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    # refused before any checkpoint is read (not one error row per checkpoint)
    check_solver_options(k, solver, tol, max_iters, 0, operator_options.get("eig_tol"))

    add_search_path(search_path)
    files = find_checkpoints(paths_or_dir, recursive=recursive)
    factory = resolve_model_factory(model_factory)
    loss_spec = loss_fn
    own_loss = loss_fn is None or (isinstance(loss_fn, str) and loss_fn.strip().lower() in ("model", "none", "own"))
    loss_fn = resolve_loss(loss_fn)
    optimizer_spec = optimizer_factory
    if isinstance(optimizer_factory, str):
        optimizer_factory = import_object(optimizer_factory, "--optimizer")
    data_spec = data
    data = resolve_data(data)
    if own_loss:
        data = own_loss_batch(data)
    options = options_text(k=k, solver=solver, tol=tol, max_iters=max_iters, loss=callable_name(loss_spec),
                            data=data_fingerprint(data_spec, data), preconditioner="next_step",
                            optimizer=None if optimizer_spec is None else callable_name(optimizer_spec),
                            **{key: value for key, value in operator_options.items()})
    model = build_model(factory)
    if device is not None:
        model = model.to(device)

    out_path: Path | None = None
    jl = False
    columns: list[str] = list(ROW_COLUMNS)
    done: list[dict] = []
    if out is not None:
        out_path = Path(out)
        jl = is_json_lines(out_path, json_lines)
        done, columns, notes = open_output(out_path, jl, resume=resume, overwrite=overwrite, options=options,
                                            files=files)
        for note in notes:
            warnings.warn(note, stacklevel=2)
        files = [f for f in files if not any(same_file(str(r["file"]), f) for r in done)]

    # Order by step (read from each checkpoint; file name as fallback), then natural order of names.
    scanned = [(f, *_scan(f, trust_checkpoints)) for f in files]
    scanned.sort(key=lambda t: (t[1] is None, t[1] if t[1] is not None else 0, natural_key(t[0])))

    bar = None
    if progress and scanned:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(scanned), desc="checkpoints", unit="ckpt", file=sys.stderr, dynamic_ncols=True)
        except ImportError:  # pragma: no cover
            bar = None

    rows: list[dict] = []
    prev_h: torch.Tensor | None = None
    prev_p: torch.Tensor | None = None
    try:
        for index, (path, step, scan_error, loaded) in enumerate(scanned):
            scanned[index] = (path, step, scan_error, None)  # release the memory-mapped file after this row
            row = _empty_row(path, step)
            row.update(file_id=file_id(path), options=options)
            t0 = time.perf_counter()
            try:
                if scan_error is not None:
                    raise CheckpointError(scan_error)
                row_extra, prev_h, prev_p = _analyze_one(
                    loaded or path, model, data, loss_fn, k=k, solver=solver, tol=tol, max_iters=max_iters,
                    trust=trust_checkpoints, optimizer_factory=optimizer_factory, prev_h=prev_h, prev_p=prev_p,
                    sharpness_fn=sharpness, operator_options=operator_options)
                del loaded
                row.update(row_extra)
                if row["step"] is None and row_extra.get("step") is None:
                    row["step"] = step_from_name(path)
            except CheckpointError as exc:
                if errors == "raise":
                    raise
                row["error"] = str(exc)
            except Exception as exc:  # noqa: BLE001 - one bad checkpoint must not stop the others
                if errors == "raise":
                    raise
                row["error"] = f"{path}: {type(exc).__name__}: {first_line(exc)}"
            row["seconds"] = round(time.perf_counter() - t0, 4) if row["error"] else row["seconds"]
            rows.append(row)
            if out_path is not None:
                append_rows(out_path, [row], columns, jl)
            if callback is not None:
                callback(row)
            if bar is not None:
                if row["error"]:
                    bar.set_postfix_str("error", refresh=False)
                elif row["sharpness"] is not None:
                    bar.set_postfix_str(f"step {row['step']} λ={row['sharpness']:.4g}", refresh=False)
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    allrows = done + rows
    allrows.sort(key=lambda r: (r.get("step") is None, r.get("step") if r.get("step") is not None else 0,
                                natural_key(Path(str(r.get("file"))))))
    return allrows


def _analyze_one(source: Path | Checkpoint, model: nn.Module, data: Any, loss_fn: Callable, *, k: int, solver: str, tol: float,
                 max_iters: int | None, trust: bool, optimizer_factory: Callable | None,
                 prev_h: torch.Tensor | None, prev_p: torch.Tensor | None, sharpness_fn: Callable,
                 operator_options: dict) -> tuple[dict, torch.Tensor | None, torch.Tensor | None]:
    ck = source if isinstance(source, Checkpoint) else load_checkpoint(source, trust)
    path = ck.path
    fitted = fit_state_dict(model, ck.model_state, path)
    model.load_state_dict(fitted, strict=True)
    del ck.model_state, fitted
    row: dict[str, Any] = {}
    if ck.step is not None:
        row["step"] = ck.step
    elif ck.epoch is not None and step_from_name(path) is None:
        row["step"] = ck.epoch
    row["lr"] = ck.lr

    optimizer = None
    if ck.optimizer_state is not None:
        optimizer = restore_optimizer(model, ck.optimizer_state, optimizer_factory, path,
                                       hf=ck.format == "hf_trainer")

    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    common = dict(k=k, solver=solver, tol=tol, max_iters=max_iters, **operator_options)
    t0 = time.perf_counter()
    res, hvps, warm = warm_started_solve(lambda X0: sharpness_fn(model, loss_fn, data, X0=X0, **common),
                             _warm_start(prev_h, n))
    prev_h = res.eigenvectors.detach().clone()
    values = [float(v) for v in res.eigenvalues]
    row.update(loss=float(res.info.get("loss", float("nan"))), sharpness=values[0], eigenvalues=values,
               residual=float(res.residuals.max()), num_hvps=hvps, converged=bool(res.converged), warm_start=warm)
    if "hvp_route" in res.info:  # a finite-difference route: which one, its gradient passes and (one-sided) its bound
        row.update(hvp_route=res.info["hvp_route"], num_gradients=res.info.get("num_gradients"))
        if "one_sided_checks" in res.info:
            row["error_bound"] = res.info["error_bound"]
    problems = [] if res.converged else [f"λ_max(H) did not converge (residual {row['residual']:.2e} > tol {tol:g})"]

    if optimizer is not None:

        row["optimizer"] = type(optimizer).__name__
        row["lr"] = float(optimizer.param_groups[0]["lr"])
        with contextlib.suppress(TypeError, ValueError):
            row["threshold"] = float(_optim.stability_threshold(optimizer))
        top = values[0]
        if _optim.has_diagonal_preconditioner(optimizer):  # Adam/AdamW, RMSprop, Adagrad, ... (#21)
            # The P of the step about to be taken (#12.4 lookahead contract): the saved second moments updated
            # with this data's gradient, as that step would; the same for a checkpoint saved before Adam's first step.
            lookahead = True
            pres, phvps, _ = warm_started_solve(
                lambda X0: _optim.preconditioned_sharpness(model, loss_fn, data, optimizer, X0=X0,
                                                           lookahead=lookahead, **common),
                _warm_start(prev_p, n))
            prev_p = pres.eigenvectors.detach().clone()
            pvalues = [float(v) for v in pres.eigenvalues]
            row.update(preconditioned_sharpness=pvalues[0], preconditioned_eigenvalues=pvalues,
                       preconditioned_residual=float(pres.residuals.max()), preconditioned_num_hvps=phvps,
                       lookahead=lookahead, preconditioner="next_step")
            if "one_sided_checks" in pres.info:
                row["preconditioned_error_bound"] = pres.info["error_bound"]
                row["num_gradients"] = (row.get("num_gradients") or 0) + int(pres.info.get("num_gradients", 0))
            row["num_hvps"] += phvps
            row["converged"] = row["converged"] and bool(pres.converged)
            if not pres.converged:
                problems.append(f"λ_max(P⁻¹H) did not converge (residual {row['preconditioned_residual']:.2e} "
                                f"> tol {tol:g})")
            top = pvalues[0]
        if row.get("threshold"):
            row["edge_ratio"] = top / row["threshold"]
        else:  # never an empty stability column without a word (#21)
            note = _optim.stability_note(optimizer)
            if note is None:
                try:
                    _optim.stability_threshold(optimizer)
                except (TypeError, ValueError) as exc:  # lr = 0, beta1 = 1, ...
                    note = f"no stability threshold: {first_line(exc)}"
            row["stability_note"] = note
        optimizer.state.clear()
        del optimizer
    row["seconds"] = round(time.perf_counter() - t0, 4)
    if problems:
        warnings.warn(f"{path}: " + "; ".join(problems), stacklevel=3)
    return row, prev_h, prev_p


def _fmt(value: Any, spec: str = ".5g") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def format_rows(rows: Sequence[dict]) -> str:
    """A plain-text table of analysis (or tracker) rows: step, lr, loss, λ_max(H), λ_max(P⁻¹H) when present,
    threshold, edge ratio (η·λ/2 for SGD; λ/threshold in general) and whether the solves converged."""
    adam = any(r.get("preconditioned_sharpness") is not None for r in rows)
    header = ["step", "lr", "loss", "λ_max(H)"] + (["λ_max(P⁻¹H)"] if adam else []) + \
        ["threshold", "λ/thr" if adam else "η·λ/2", "converged"]
    lines: list[list[str]] = []
    for r in rows:
        if r.get("error") and r.get("sharpness") is None:
            lines.append([_fmt(r.get("step")), "error: " + " ".join(str(r["error"]).split())])
            continue
        lam = r.get("preconditioned_sharpness") if adam else r.get("sharpness")
        thr = r.get("threshold")
        edge = r.get("edge_ratio")
        if edge is None and lam is not None and thr:
            edge = lam / thr
        cells = [_fmt(r.get("step")), _fmt(r.get("lr"), ".4g"), _fmt(r.get("loss"), ".4f"),
                 _fmt(r.get("sharpness"), ".4f")]
        if adam:
            cells.append(_fmt(r.get("preconditioned_sharpness"), ".4g"))
        cells += [_fmt(thr, ".4g"), _fmt(edge, ".3f"), _fmt(r.get("converged"))]
        lines.append(cells)
    widths = [len(h) for h in header]
    for cells in lines:
        if len(cells) == len(header):
            widths = [max(w, len(c)) for w, c in zip(widths, cells)]
    out = ["  ".join(h.rjust(w) for h, w in zip(header, widths))]
    for cells in lines:
        if len(cells) == len(header):
            out.append("  ".join(c.rjust(w) for c, w in zip(cells, widths)))
        else:
            out.append(cells[0].rjust(widths[0]) + "  " + cells[1])
    return "\n".join(out)
