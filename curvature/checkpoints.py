"""Curvature of saved checkpoints, offline: safe loading and :func:`analyze_checkpoints`.

A folder of checkpoints written during training is turned into one row per checkpoint with the same columns
as :class:`~curvature.tracking.SharpnessTracker` rows (``step``, ``lr``, ``loss``, ``sharpness``,
``preconditioned_sharpness``, ``threshold``, ``num_hvps``, ``seconds``, ``converged``) plus ``file`` and
``error``.

Formats read (one loader for all, chosen by content, not by name):

* a plain ``state_dict`` (``torch.save(model.state_dict(), path)``);
* a dict with the model under ``"model"`` / ``"model_state_dict"`` / ``"state_dict"`` / ``"module"``, the
  optimizer under ``"optimizer"`` / ``"optimizer_state_dict"`` / ``"optimizer_states"`` (Lightning: a list)
  and the step under ``"step"`` / ``"global_step"`` / ``"iteration"`` (else ``"epoch"``);
* ``.safetensors`` files (tensors only; a ``"step"`` entry of the file's metadata is used if present);
* Lightning ``.ckpt`` files: ``state_dict`` keys carry the attribute name of the network inside the
  LightningModule (``"model.0.weight"``); the longest common prefix that makes the keys fit the model is
  stripped (also ``"module."`` from DDP and ``"_orig_mod."`` from ``torch.compile``).

Security: ``torch.load`` runs with ``weights_only=True`` unless ``trust_checkpoints=True``; a checkpoint
that holds pickled Python objects (which can execute code when loaded) is refused with a message naming the
option. Only trust checkpoints whose source you trust.
"""
from __future__ import annotations

import contextlib
import copy
import csv
import importlib
import json
import math
import os
import pickle
import re
import sys
import time
import warnings
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .tracking import ROW_KEYS, is_json_lines, read_rows, warm_started_solve

__all__ = ["analyze_checkpoints", "load_checkpoint", "find_checkpoints", "fit_state_dict", "import_object",
           "resolve_loss", "read_rows", "format_rows", "step_from_name", "infer_optimizer_class", "Checkpoint",
           "CheckpointError", "UnsafeCheckpointError", "ROW_COLUMNS", "CHECKPOINT_SUFFIXES"]

#: File endings recognised as checkpoints when a directory is given.
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors", ".tar")

#: Columns of an analysis row, in output order: ``file``, then the tracker's row keys (``eigenvalues`` columns hold
#: JSON lists in CSV).
ROW_COLUMNS: tuple[str, ...] = ("file",) + tuple(k for k in ROW_KEYS if k != "when")

# Files that training frameworks write next to the weights (Hugging Face Trainer folders): skipped in directories.
_NOT_MODEL_FILES = ("optimizer.", "scheduler.", "rng_state", "training_args.", "scaler.")
_MODEL_KEYS = ("model_state_dict", "model", "state_dict", "module", "net", "network", "model_state")
_OPTIMIZER_KEYS = ("optimizer_state_dict", "optimizer", "optimizer_states", "optim", "optimizer_state", "opt")
_STEP_KEYS = ("step", "global_step", "iteration", "iter", "steps")


class CheckpointError(ValueError):
    """A checkpoint (or the inputs naming it) cannot be used; the message says why and what to do."""


class UnsafeCheckpointError(CheckpointError):
    """The checkpoint holds pickled Python objects and ``trust_checkpoints`` was not given."""


# ---------------------------------------------------------------------------------------------------
# Factories given as strings ("pkg.module:function")
# ---------------------------------------------------------------------------------------------------
def import_object(spec: str, what: str = "factory") -> Any:
    """The object named by ``"package.module:name"`` (or ``"package.module.name"``).

    ``what`` names the option in error messages (e.g. ``"--model"``). Raises :class:`CheckpointError`
    with the reason when the module does not import or has no such attribute.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise CheckpointError(f"{what}: expected 'package.module:function', got {spec!r}")
    spec = spec.strip()
    if ":" in spec:
        mod_name, _, attr = spec.partition(":")
    elif "." in spec:
        mod_name, _, attr = spec.rpartition(".")
    else:
        raise CheckpointError(f"{what} {spec!r}: expected 'package.module:function' (module path, a colon, "
                              f"then the name of a function in it)")
    if not mod_name or not attr:
        raise CheckpointError(f"{what} {spec!r}: expected 'package.module:function'")
    if os.getcwd() not in sys.path and "" not in sys.path:  # like `python -m`: modules in the cwd import
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(mod_name)
    except ModuleNotFoundError as exc:
        hint = "" if exc.name != mod_name.split(".")[0] else \
            " (is it installed, or is its folder on PYTHONPATH / the current directory?)"
        raise CheckpointError(f"{what} {spec!r}: cannot import module '{mod_name}': {exc}{hint}") from exc
    except Exception as exc:  # noqa: BLE001 - a user module that fails while importing
        raise CheckpointError(f"{what} {spec!r}: importing module '{mod_name}' failed: "
                              f"{type(exc).__name__}: {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(module) if not n.startswith("_")]
            listing = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
            raise CheckpointError(f"{what} {spec!r}: module '{mod_name}' has no attribute '{attr}' "
                                  f"(it has: {listing})")
        obj = getattr(obj, part)
    return obj


def _loss_by_name() -> dict[str, Callable]:
    import torch.nn.functional as F

    return {"cross_entropy": F.cross_entropy, "ce": F.cross_entropy, "mse": F.mse_loss,
            "mse_loss": F.mse_loss, "nll": F.nll_loss, "nll_loss": F.nll_loss, "l1": F.l1_loss,
            "huber": F.huber_loss, "bce": F.binary_cross_entropy,
            "bce_with_logits": F.binary_cross_entropy_with_logits}


def resolve_loss(loss: Any) -> Callable:
    """A loss function from a callable, a short name (``"cross_entropy"``, ``"mse"``, ``"nll"``, ``"l1"``,
    ``"huber"``, ``"bce"``, ``"bce_with_logits"``) or ``"pkg.module:function"``."""
    if callable(loss):
        return loss
    if isinstance(loss, str):
        named = _loss_by_name()
        if loss in named:
            return named[loss]
        if ":" in loss or "." in loss:
            fn = import_object(loss, "--loss")
            if isinstance(fn, type):  # a loss class such as torch.nn.CrossEntropyLoss
                fn = fn()
            if not callable(fn):
                raise CheckpointError(f"--loss {loss!r} is a {type(fn).__name__}, not a function")
            return fn
        raise CheckpointError(f"--loss {loss!r}: use one of {', '.join(sorted(named))} or 'package.module:function'")
    raise CheckpointError(f"loss_fn must be callable or a name, got {type(loss).__name__}")


def resolve_model_factory(model_factory: Any) -> Callable[[], nn.Module]:
    if isinstance(model_factory, str):
        spec = model_factory
        model_factory = import_object(spec, "--model")
        if not callable(model_factory):
            raise CheckpointError(f"--model {spec!r} is a {type(model_factory).__name__}, not a function")
    if isinstance(model_factory, nn.Module):
        template = model_factory
        return lambda: copy.deepcopy(template)
    if not callable(model_factory):
        raise CheckpointError(f"model_factory must be a function returning an nn.Module, "
                              f"got {type(model_factory).__name__}")
    return model_factory


def build_model(factory: Callable[[], nn.Module]) -> nn.Module:
    name = getattr(factory, "__qualname__", repr(factory))
    model = factory()
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"the model factory {name} returned a {type(model).__name__}, "
                              f"expected a torch.nn.Module")
    return model


def resolve_data(data: Any) -> Any:
    if isinstance(data, str):
        spec = data
        data = import_object(spec, "--data")
        if callable(data) and not isinstance(data, (torch.Tensor, nn.Module)):
            data = data()
        if data is None:
            raise CheckpointError(f"--data {spec!r} returned None; it must return one batch (inputs, targets) "
                                  f"or an iterable of batches")
    elif callable(data) and not isinstance(data, (torch.Tensor, nn.Module)) and not hasattr(data, "__iter__"):
        data = data()
    if hasattr(data, "__next__"):  # a one-shot iterator/generator: read once, reuse for every checkpoint
        data = list(data)
    return data


# ---------------------------------------------------------------------------------------------------
# Finding and ordering checkpoint files
# ---------------------------------------------------------------------------------------------------
def _natural_key(path: Path) -> list:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", str(path))]


def step_from_name(path: str | os.PathLike) -> int | None:
    """The step a file name encodes: ``step=500`` / ``step_500`` / ``iter-500`` / ``checkpoint-500``, else the
    last number in the name (``ckpt_000300.pt`` → 300), else a labelled number in the parent folder's name
    (``checkpoint-500/model.safetensors``); ``None`` if none."""
    p = Path(path)
    stem = p.name
    for suffix in CHECKPOINT_SUFFIXES:
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    labelled = r"(?:global_step|step|iteration|iter|it|checkpoint|ckpt|epoch)[=_\-]?(\d+)"
    m = re.findall(labelled, stem, flags=re.I) or re.findall(r"\d+", stem)
    if m:
        return int(m[-1])
    m = re.fullmatch(r".*?" + labelled, p.parent.name, flags=re.I)  # e.g. checkpoint-500/model.safetensors
    return int(m.group(1)) if m else None


def find_checkpoints(paths_or_dir: Any, recursive: bool = False) -> list[Path]:
    """Checkpoint files named by a directory, a file, or a list of them (directories expanded to the files
    ending in :data:`CHECKPOINT_SUFFIXES`, sub-folders too with ``recursive=True``; a Hugging Face Trainer's
    ``optimizer.pt`` / ``scheduler.pt`` / ``rng_state*.pth`` / ``training_args.bin`` are skipped). Raises :class:`CheckpointError` for a missing path or when no
    checkpoint file is found."""
    items = [paths_or_dir] if isinstance(paths_or_dir, (str, os.PathLike)) else list(paths_or_dir)
    if not items:
        raise CheckpointError("no checkpoint paths given")
    files: list[Path] = []
    for item in items:
        p = Path(item).expanduser()
        if p.is_dir():
            pattern = "**/*" if recursive else "*"
            found = sorted((f for f in p.glob(pattern) if f.is_file() and f.name.endswith(CHECKPOINT_SUFFIXES)
                            and not f.name.startswith(_NOT_MODEL_FILES)), key=_natural_key)
            if not found:
                others = sorted(f.name for f in p.iterdir())[:8]
                seen = f" (it holds: {', '.join(others)}{', ...' if len(others) == 8 else ''})" if others else \
                    " (it is empty)"
                raise CheckpointError(f"no checkpoint files ({', '.join('*' + s for s in CHECKPOINT_SUFFIXES)}) in "
                                      f"directory '{p}'{seen}")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        elif p.exists():
            raise CheckpointError(f"'{p}' is neither a file nor a directory")
        else:
            parent = p.parent if str(p.parent) else Path(".")
            hint = "" if parent.exists() else f" (its parent '{parent}' does not exist either)"
            kind = "checkpoint directory or file"
            raise CheckpointError(f"{kind} '{p}' does not exist{hint}")
    unique: dict[str, Path] = {}
    for f in files:
        unique.setdefault(str(f.resolve()), f)
    return list(unique.values())


# ---------------------------------------------------------------------------------------------------
# Loading one checkpoint
# ---------------------------------------------------------------------------------------------------
@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` found in one file."""

    path: Path
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict | None = None
    step: int | None = None
    epoch: int | None = None
    lr: float | None = None
    format: str = "state_dict"
    extra: dict = field(default_factory=dict)


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) for k in obj) and \
        all(isinstance(v, torch.Tensor) for v in obj.values())


def _as_int(value: Any) -> int | None:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)) and math.isfinite(value):
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return None


def _unsafe_message(path: Path, exc: BaseException) -> str:
    text = str(exc)
    m = re.search(r"GLOBAL ([\w.]+)", text)
    what = f" (e.g. {m.group(1)})" if m else ""
    return (f"{path}: refused to load: the checkpoint holds pickled Python objects{what}, and unpickling them can "
            f"run arbitrary code. Load it only if you trust where it came from: pass --trust-checkpoints (CLI) "
            f"or trust_checkpoints=True (Python).")


def _torch_load(path: Path, trust: bool, mmap: bool) -> tuple[Any, bool]:
    """``torch.load`` on CPU, safely unless trusted; returns (object, whether it is memory-mapped)."""
    kwargs: dict[str, Any] = {"map_location": "cpu", "weights_only": not trust}
    if mmap:
        kwargs["mmap"] = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's FutureWarning about weights_only when trust=True
            return torch.load(path, **kwargs), mmap
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if not trust and re.search(r"\bGLOBAL\b|allowed global|safe_globals|Unsupported class", text, re.I):
            raise UnsafeCheckpointError(_unsafe_message(path, exc)) from exc
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", text)
        detail_text = detail.group(1).strip() if detail else _first_line(exc)
        raise CheckpointError(f"{path}: cannot read the checkpoint: it is truncated, corrupt or not a PyTorch "
                              f"checkpoint ({detail_text})") from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError,
            AttributeError, ModuleNotFoundError, ImportError, TypeError, IndexError, UnicodeDecodeError) as exc:
        msg = _first_line(exc)
        if mmap and "mmap" in msg.lower():
            return _torch_load(path, trust, False)
        size = path.stat().st_size if path.exists() else 0
        if size == 0:
            raise CheckpointError(f"{path}: the file is empty (0 bytes)") from exc
        if isinstance(exc, (ModuleNotFoundError, ImportError, AttributeError)) and trust:
            raise CheckpointError(f"{path}: unpickling needs code that is not importable here ({msg})") from exc
        if trust and not isinstance(exc, (RuntimeError, EOFError, zipfile.BadZipFile)):
            raise CheckpointError(f"{path}: loading failed while unpickling ({type(exc).__name__}: {msg})") from exc
        raise CheckpointError(f"{path}: cannot read the checkpoint: it is truncated, corrupt or not a PyTorch "
                              f"checkpoint ({msg})") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= 300 else line[:297] + "..."


def _load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        from safetensors import safe_open
    except ImportError as exc:  # pragma: no cover - safetensors is in the demo extra
        raise CheckpointError(f"{path}: reading .safetensors needs the 'safetensors' package "
                              f"(pip install safetensors)") from exc
    try:
        tensors = {}
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
        return tensors, meta
    except Exception as exc:  # noqa: BLE001 - SafetensorError and friends
        raise CheckpointError(f"{path}: cannot read the safetensors file: it is truncated or corrupt "
                              f"({_first_line(exc)})") from exc


def _pick(obj: dict, keys: Sequence[str]) -> tuple[str | None, Any]:
    for key in keys:
        if key in obj and obj[key] is not None:
            return key, obj[key]
    return None, None


def _unwrap_model_state(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], str]:
    if _is_tensor_dict(obj):
        return obj, "state_dict"
    if isinstance(obj, nn.Module):  # torch.save(model) with trust_checkpoints=True
        return obj.state_dict(), "module"
    if isinstance(obj, dict):
        key, value = _pick(obj, _MODEL_KEYS)
        if key is not None:
            if isinstance(value, nn.Module):
                return value.state_dict(), key
            if isinstance(value, dict):
                if _is_tensor_dict(value):
                    return value, key
                inner, fmt = _unwrap_model_state(value, path)  # e.g. {"model": {"state_dict": ...}}
                return inner, f"{key}.{fmt}"
        tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        if len(tensors) >= max(1, len(obj) - 8) and tensors:  # a state_dict with a few extra entries
            return tensors, "state_dict+extras"
        keys = ", ".join(map(str, list(obj)[:10]))
        raise CheckpointError(f"{path}: found no model weights: expected a state_dict or a dict with one of "
                              f"{', '.join(_MODEL_KEYS[:4])}; its keys are: {keys}")
    raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state_dict or a dict of them")


def load_checkpoint(path: str | os.PathLike, trust_checkpoints: bool = False, *, mmap: bool = False) -> Checkpoint:
    """Read one checkpoint file into a :class:`Checkpoint` (model weights, optimizer state, step, lr).

    ``torch.load`` runs with ``weights_only=True`` unless ``trust_checkpoints=True``. Raises
    :class:`CheckpointError` (:class:`UnsafeCheckpointError` for pickled code) with a one-line reason.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file '{path}' does not exist")
    if path.name.endswith(".safetensors"):
        tensors, meta = _load_safetensors(path)
        step = _as_int(meta.get("step", meta.get("global_step")))
        epoch = _as_int(meta.get("epoch"))
        lr = None
        with contextlib.suppress(TypeError, ValueError):
            lr = float(meta["lr"]) if "lr" in meta else None
        if not tensors:
            raise CheckpointError(f"{path}: the safetensors file holds no tensors")
        return Checkpoint(path, tensors, None, step, epoch, lr, "safetensors", {"metadata": meta})
    obj, mapped = _torch_load(path, trust_checkpoints, mmap)
    state, fmt = _unwrap_model_state(obj, path)
    opt_state = step = epoch = lr = None
    extra: dict = {}
    if isinstance(obj, dict) and not _is_tensor_dict(obj):
        key, opt_state = _pick(obj, _OPTIMIZER_KEYS)
        if isinstance(opt_state, (list, tuple)):  # Lightning: optimizer_states = [state_dict, ...]
            opt_state = opt_state[0] if opt_state else None
        if opt_state is not None and not (isinstance(opt_state, dict) and "param_groups" in opt_state):
            opt_state = None
        _, raw_step = _pick(obj, _STEP_KEYS)
        step = _as_int(raw_step)
        epoch = _as_int(obj.get("epoch"))
        if isinstance(obj.get("lr"), (int, float)):
            lr = float(obj["lr"])
        if "pytorch-lightning_version" in obj or "lightning_version" in obj or "loops" in obj:
            fmt = "lightning"
        extra = {k: v for k, v in obj.items() if isinstance(v, (int, float, str, bool)) and k not in _STEP_KEYS}
    if opt_state is not None and lr is None:
        groups = opt_state.get("param_groups") or [{}]
        if isinstance(groups[0].get("lr"), (int, float, torch.Tensor)):
            lr = float(groups[0]["lr"])
    extra["mmap"] = mapped
    return Checkpoint(path, state, opt_state, step, epoch, lr, fmt, extra)


# ---------------------------------------------------------------------------------------------------
# Fitting a state_dict to a model
# ---------------------------------------------------------------------------------------------------
def _short_list(names: Iterable[str], limit: int = 6) -> str:
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def fit_state_dict(model: nn.Module, state: dict[str, torch.Tensor], path: Any = "checkpoint") -> dict[str, torch.Tensor]:
    """The entries of ``state`` that fit ``model``'s ``state_dict`` keys, after stripping a common key prefix
    (``"model."`` of Lightning, ``"module."`` of DDP, ``"_orig_mod."`` of ``torch.compile``) if the keys do not
    fit as they are. Raises :class:`CheckpointError` naming missing / unexpected keys and shape mismatches."""
    want = model.state_dict()
    wanted = set(want)
    if set(state) == wanted:
        fitted = dict(state)
    else:
        fitted = _strip_prefix(state, wanted)
    missing = [k for k in want if k not in fitted]
    unexpected = [k for k in fitted if k not in wanted]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_short_list(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_short_list(unexpected)}")
        raise CheckpointError(f"{path}: the checkpoint does not fit the model built by --model "
                              f"({'; '.join(parts)})")
    bad = [f"{k} {tuple(fitted[k].shape)} vs model {tuple(want[k].shape)}" for k in want
           if tuple(fitted[k].shape) != tuple(want[k].shape)]
    if bad:
        raise CheckpointError(f"{path}: shapes differ from the model's: {_short_list(bad, 4)}")
    return fitted


def _strip_prefix(state: dict[str, torch.Tensor], wanted: set[str]) -> dict[str, torch.Tensor]:
    """Drop the prefix ``p`` (a run of dotted components, possibly several) that makes the most keys fit."""
    candidates: dict[str, int] = {}
    for key in state:
        parts = key.split(".")
        for j in range(1, len(parts)):
            prefix = ".".join(parts[:j]) + "."
            if key[len(prefix):] in wanted:
                candidates[prefix] = candidates.get(prefix, 0) + 1
    if candidates:
        best = max(candidates, key=lambda p: (candidates[p], -len(p)))
        stripped = {k[len(best):]: v for k, v in state.items() if k.startswith(best)}
        if wanted <= set(stripped):
            return stripped
        if candidates[best] > sum(1 for k in state if k in wanted):
            return {**{k: v for k, v in state.items() if not k.startswith(best)}, **stripped}
    return dict(state)


# ---------------------------------------------------------------------------------------------------
# Optimizers from saved state
# ---------------------------------------------------------------------------------------------------
def infer_optimizer_class(opt_state: dict) -> type[torch.optim.Optimizer] | None:
    """Adam / AdamW / SGD from the keys of a saved optimizer's ``param_groups`` (``None`` if unknown)."""
    groups = opt_state.get("param_groups") or []
    if not groups:
        return None
    keys = set(groups[0])
    states = [s for s in (opt_state.get("state") or {}).values() if isinstance(s, dict)]
    if "betas" in keys and "amsgrad" in keys and (not states or "exp_avg_sq" in states[0]):
        return torch.optim.AdamW if groups[0].get("decoupled_weight_decay") else torch.optim.Adam
    if "momentum" in keys and "nesterov" in keys and "dampening" in keys:
        return torch.optim.SGD
    return None


def _restore_optimizer(model: nn.Module, opt_state: dict, optimizer_factory: Callable | None,
                       path: Path) -> torch.optim.Optimizer | None:
    if optimizer_factory is not None:
        optimizer = optimizer_factory(model.parameters())
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise CheckpointError(f"optimizer_factory returned a {type(optimizer).__name__}, expected a "
                                  f"torch.optim.Optimizer")
    else:
        cls = infer_optimizer_class(opt_state)
        if cls is None:
            keys = sorted(k for k in (opt_state.get("param_groups") or [{}])[0] if k != "params")
            warnings.warn(f"{path}: optimizer state of an unknown type (param_group keys {keys}); pass "
                          f"optimizer_factory= (--optimizer) to restore it. Reporting λ_max(H) only.",
                          stacklevel=3)
            return None
        groups = opt_state["param_groups"]
        params = list(model.parameters())
        counts = [len(g.get("params", [])) for g in groups]
        if sum(counts) != len(params):
            raise CheckpointError(f"{path}: the saved optimizer holds {sum(counts)} parameters in "
                                  f"{len(groups)} group(s), the model has {len(params)}; pass optimizer_factory= "
                                  f"(--optimizer) to rebuild it as in training")
        param_groups, start = [], 0
        for g, c in zip(groups, counts):
            options = {k: v for k, v in g.items() if k != "params"}
            param_groups.append({"params": params[start:start + c], **options})
            start += c
        defaults = {k: v for k, v in groups[0].items() if k not in ("params", "initial_lr")}
        defaults.pop("decoupled_weight_decay", None)
        try:
            optimizer = cls(param_groups, **{k: defaults[k] for k in ("lr",) if k in defaults})
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: cannot rebuild {cls.__name__} from the saved param_groups "
                                  f"({_first_line(exc)}); pass optimizer_factory=") from exc
    try:
        optimizer.load_state_dict(opt_state)
    except (ValueError, KeyError, RuntimeError, TypeError) as exc:
        raise CheckpointError(f"{path}: the saved optimizer state does not fit the optimizer "
                              f"({_first_line(exc)})") from exc
    return optimizer


# ---------------------------------------------------------------------------------------------------
# Output sinks (CSV / JSON lines), resume
# ---------------------------------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class _RowSink:
    """Appends rows to a CSV or JSON-lines file, flushed after each row."""

    def __init__(self, path: Path, json_lines: bool, columns: Sequence[str]) -> None:
        self.path, self.json_lines, self.columns = path, json_lines, list(columns)
        path.parent.mkdir(parents=True, exist_ok=True)

    def rewrite(self, rows: Sequence[dict]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("w", newline="") as f:
            self._write(f, rows, header=True)
        tmp.replace(self.path)

    def append(self, row: dict) -> None:
        new = not self.path.exists() or self.path.stat().st_size == 0
        with self.path.open("a", newline="") as f:
            self._write(f, [row], header=new)
            f.flush()
            with contextlib.suppress(OSError):
                os.fsync(f.fileno())

    def _write(self, f: Any, rows: Sequence[dict], header: bool) -> None:
        if self.json_lines:
            for row in rows:
                f.write(json.dumps({k: _plain(v) for k, v in row.items()}) + "\n")
            return
        writer = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
        if header:
            writer.writeheader()
        for row in rows:
            out = {}
            for k in self.columns:
                v = _plain(row.get(k))
                out[k] = "" if v is None else (json.dumps(v) if isinstance(v, (list, dict)) else v)
            writer.writerow(out)


def _same_file(a: str, b: Path) -> bool:
    if a == str(b):
        return True
    with contextlib.suppress(OSError):
        return Path(a).resolve() == b.resolve()
    return False


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


_KEEP_LOADED_BYTES = 256 * 2**20  # checkpoints read into memory (not memory-mapped) are re-read above this size


def _scan(path: Path, trust: bool) -> tuple[int | None, str | None, Checkpoint | None]:
    """(step, error, checkpoint) of one file. The step is the checkpoint's own (safetensors metadata, or the file
    loaded with ``mmap=True``: tensors stay on disk until used), else the file name's. The loaded checkpoint is
    kept for the analysis, so each file is unpickled once (with trust_checkpoints, its code runs once)."""
    ck = None
    try:
        if path.name.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
            step = _as_int(meta.get("step", meta.get("global_step")))
        else:
            ck = load_checkpoint(path, trust, mmap=True)
            step = ck.step
            if step is None and ck.epoch is not None and step_from_name(path) is None:
                step = ck.epoch
            if not ck.extra.get("mmap") and path.stat().st_size > _KEEP_LOADED_BYTES:
                ck = None
    except CheckpointError as exc:
        return step_from_name(path), str(exc), None
    except Exception as exc:  # noqa: BLE001 - reported in the row
        return step_from_name(path), f"{path}: {type(exc).__name__}: {_first_line(exc)}", None
    return (step if step is not None else step_from_name(path)), None, ck


def analyze_checkpoints(paths_or_dir: Any, model_factory: Any, data: Any, loss_fn: Any, *, k: int = 1,
                        solver: str = "lobpcg", tol: float = 1e-4, max_iters: int | None = None,
                        device: Any = None, trust_checkpoints: bool = False, optimizer_factory: Any = None,
                        progress: bool = False, out: str | os.PathLike | None = None, resume: bool = True,
                        json_lines: bool | None = None, recursive: bool = False, errors: str = "report",
                        callback: Callable[[dict], Any] | None = None, **operator_options: Any) -> list[dict]:
    """Sharpness (and Adam's pre-conditioned sharpness) of every checkpoint in a folder, one row each.

    Args:
        paths_or_dir: a directory (its ``*.pt, *.pth, *.ckpt, *.bin, *.safetensors, *.tar`` files), a file,
            or a list of them.
        model_factory: ``() -> nn.Module`` building the architecture (or ``"pkg.module:function"``); the
            checkpoint's weights are loaded into it (dtype of the factory's model is kept).
        data: one batch ``(inputs, targets)`` or an iterable of batches (or a factory / ``"pkg.module:fn"``
            returning one); the same data is used for every checkpoint.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``, or ``"cross_entropy"``, ``"mse"``, ``"pkg.mod:fn"``.
        k, solver, tol, max_iters: as in :func:`curvature.sharpness`. Each solve is warm-started from the
            previous checkpoint's eigenvectors.
        device: move the model here first (e.g. ``"cuda"``).
        trust_checkpoints: allow pickled Python objects (``torch.load(weights_only=False)``). Only for files
            you trust: unpickling can run arbitrary code.
        optimizer_factory: ``params -> Optimizer`` to rebuild the optimizer whose saved state is loaded;
            default: inferred (Adam / AdamW / SGD) from the saved ``param_groups``.
        progress: show a tqdm bar (stderr) over the checkpoints.
        out: CSV file (or JSON lines for ``.jsonl`` / ``.json``, or ``json_lines=True``); each row is appended
            and flushed as soon as it is measured.
        resume: with ``out`` existing, skip the files already analysed there (rows with an error are redone).
        errors: ``"report"`` (a failing checkpoint gets a row with ``error`` set; the rest are analysed) or
            ``"raise"``.
        callback: called with each new row.
        **operator_options: passed to the Hessian operator (``dtype``, ``method``, ``max_batch_size``, ...).

    Returns:
        The rows, sorted by step (files without a step: natural order of names), including rows read back
        from ``out`` when resuming. ``preconditioned_sharpness`` is set when the checkpoint holds Adam/AdamW
        state; ``threshold`` (:func:`curvature.optim.stability_threshold`) and ``lr`` when it holds any
        optimizer state that could be restored.

    Raises:
        CheckpointError: missing path, no checkpoint files, a factory string that does not import.
    """
    if errors not in ("report", "raise"):
        raise ValueError(f"errors must be 'report' or 'raise', got {errors!r}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    from .diagnostics import sharpness

    files = find_checkpoints(paths_or_dir, recursive=recursive)
    factory = resolve_model_factory(model_factory)
    loss_fn = resolve_loss(loss_fn)
    if isinstance(optimizer_factory, str):
        optimizer_factory = import_object(optimizer_factory, "--optimizer")
    data = resolve_data(data)
    model = build_model(factory)
    if device is not None:
        model = model.to(device)

    sink = None
    done: list[dict] = []
    if out is not None:
        out_path = Path(out)
        jl = is_json_lines(out_path, json_lines)
        previous = read_rows(out_path, jl, missing_ok=True)
        columns = list(ROW_COLUMNS)
        if previous and not jl:
            with out_path.open(newline="") as f:
                header = next(csv.reader(f), None) or []
            columns = header if set(ROW_COLUMNS) <= set(header) else columns
        sink = _RowSink(out_path, jl, columns)
        if resume and previous:
            done = [r for r in previous if not r.get("error") and r.get("file")]
            if len(done) != len(previous):
                sink.rewrite(done)  # rows that failed before are retried
            files = [f for f in files if not any(_same_file(str(r["file"]), f) for r in done)]
        elif previous:
            out_path.write_text("")

    # Order by step (read from each checkpoint; file name as fallback), then natural order of names.
    scanned = [(f, *_scan(f, trust_checkpoints)) for f in files]
    scanned.sort(key=lambda t: (t[1] is None, t[1] if t[1] is not None else 0, _natural_key(t[0])))

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
            t0 = time.perf_counter()
            try:
                if scan_error is not None:
                    raise CheckpointError(scan_error)
                row_extra, prev_h, prev_p = _analyze_one(
                    loaded or path, model, data, loss_fn, k=k, solver=solver, tol=tol, max_iters=max_iters,
                    trust=trust_checkpoints, optimizer_factory=optimizer_factory, prev_h=prev_h, prev_p=prev_p,
                    sharpness_fn=sharpness, operator_options=operator_options)
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
                row["error"] = f"{path}: {type(exc).__name__}: {_first_line(exc)}"
            row["seconds"] = round(time.perf_counter() - t0, 4) if row["error"] else row["seconds"]
            rows.append(row)
            if sink is not None:
                sink.append(row)
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
                                _natural_key(Path(str(r.get("file"))))))
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
        optimizer = _restore_optimizer(model, ck.optimizer_state, optimizer_factory, path)

    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    common = dict(k=k, solver=solver, tol=tol, max_iters=max_iters, **operator_options)
    t0 = time.perf_counter()
    res, hvps, warm = warm_started_solve(lambda X0: sharpness_fn(model, loss_fn, data, X0=X0, **common),
                             _warm_start(prev_h, n))
    prev_h = res.eigenvectors.detach().clone()
    values = [float(v) for v in res.eigenvalues]
    row.update(loss=float(res.info.get("loss", float("nan"))), sharpness=values[0], eigenvalues=values,
               residual=float(res.residuals.max()), num_hvps=hvps, converged=bool(res.converged), warm_start=warm)
    problems = [] if res.converged else [f"λ_max(H) did not converge (residual {row['residual']:.2e} > tol {tol:g})"]

    if optimizer is not None:
        from . import optim as _optim

        row["optimizer"] = type(optimizer).__name__
        row["lr"] = float(optimizer.param_groups[0]["lr"])
        with contextlib.suppress(TypeError, ValueError):
            row["threshold"] = float(_optim.stability_threshold(optimizer))
        top = values[0]
        if _optim.is_adam_like(optimizer):
            # P of the last step taken (as stored); before Adam's first step there is no state: then the P of the
            # step about to be taken, from this data's gradient (as SharpnessTracker does).
            lookahead = not any("exp_avg_sq" in st for st in optimizer.state.values())
            pres, phvps, _ = warm_started_solve(
                lambda X0: _optim.preconditioned_sharpness(model, loss_fn, data, optimizer, X0=X0,
                                                           lookahead=lookahead, **common),
                _warm_start(prev_p, n))
            prev_p = pres.eigenvectors.detach().clone()
            pvalues = [float(v) for v in pres.eigenvalues]
            row.update(preconditioned_sharpness=pvalues[0], preconditioned_eigenvalues=pvalues,
                       preconditioned_residual=float(pres.residuals.max()), preconditioned_num_hvps=phvps,
                       lookahead=lookahead)
            row["num_hvps"] += phvps
            row["converged"] = row["converged"] and bool(pres.converged)
            if not pres.converged:
                problems.append(f"λ_max(P⁻¹H) did not converge (residual {row['preconditioned_residual']:.2e} "
                                f"> tol {tol:g})")
            top = pvalues[0]
        if row.get("threshold"):
            row["edge_ratio"] = top / row["threshold"]
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
