"""Reading checkpoints: finding them in a folder, loading five formats safely (``weights_only`` unless trusted),
and fitting a saved ``state_dict`` to a model (prefixes, tied weights)."""
from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError, UnsafeCheckpointError, first_line

__all__ = ['CHECKPOINT_SUFFIXES', 'Checkpoint', 'CheckpointError', 'UnsafeCheckpointError', 'find_checkpoints', 'step_from_name', 'load_checkpoint', 'fit_state_dict']

#: File endings recognised as checkpoints when a directory is given.
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors", ".tar")


# Files that training frameworks write next to the weights (Hugging Face Trainer folders): skipped in directories.
_NOT_MODEL_FILES = ("optimizer.", "scheduler.", "rng_state", "training_args.", "scaler.")
_HF_DIR = re.compile(r"checkpoint-\d+")
_HF_MODEL_FILES = ("model.safetensors", "pytorch_model.bin")
_MODEL_KEYS = ("model_state_dict", "model", "state_dict", "module", "net", "network", "model_state")
_OPTIMIZER_KEYS = ("optimizer_state_dict", "optimizer", "optimizer_states", "optim", "optimizer_state", "opt")
_STEP_KEYS = ("step", "global_step", "iteration", "iter", "steps")


# ---------------------------------------------------------------------------------------------------
# Finding and ordering checkpoint files
# ---------------------------------------------------------------------------------------------------
def natural_key(path: Path) -> list:
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
            # a folder named like a checkpoint (``x.pt/``) is listed too: it gets a row with a clear error
            # instead of vanishing (every checkpoint-looking entry gets exactly one row)
            found = sorted((f for f in p.glob(pattern) if (f.is_file() or f.is_dir())
                            and f.name.endswith(CHECKPOINT_SUFFIXES) and not f.name.startswith(_NOT_MODEL_FILES)),
                           key=natural_key)
            if not found and not recursive:  # a Hugging Face Trainer output_dir: checkpoint-N/ sub-folders
                found = sorted((f for sub in p.iterdir() if sub.is_dir() and _HF_DIR.fullmatch(sub.name)
                                for f in sub.iterdir() if f.is_file() and f.name in _HF_MODEL_FILES),
                               key=natural_key)
            if not found:
                others = sorted(f.name for f in p.iterdir())[:8]
                seen = f" (it holds: {', '.join(others)}{', ...' if len(others) == 8 else ''})" if others else \
                    " (it is empty)"
                subdirs = [] if recursive else [f.name for f in p.iterdir() if f.is_dir()]
                hint = f"; it has sub-folders ({_short_list(sorted(subdirs), 4)}): pass --recursive " \
                    f"(recursive=True) to look inside them" if subdirs else ""
                raise CheckpointError(f"no checkpoint files ({', '.join('*' + s for s in CHECKPOINT_SUFFIXES)}) in "
                                      f"directory '{p}'{seen}{hint}")
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


def as_int(value: Any) -> int | None:
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
        detail_text = detail.group(1).strip() if detail else first_line(exc)
        raise CheckpointError(f"{path}: cannot read the checkpoint: it is truncated, corrupt or not a PyTorch "
                              f"checkpoint ({detail_text})") from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError,
            AttributeError, ModuleNotFoundError, ImportError, TypeError, IndexError, UnicodeDecodeError) as exc:
        msg = first_line(exc)
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
                              f"({first_line(exc)})") from exc


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
    if path.is_dir():
        raise CheckpointError(f"'{path}' is a directory, not a checkpoint file (a folder named like one); "
                              "rename or move it, or pass the checkpoint file inside it")
    if not path.is_file():
        raise CheckpointError(f"checkpoint file '{path}' does not exist")
    if path.name.endswith(".safetensors"):
        tensors, meta = _load_safetensors(path)
        step = as_int(meta.get("step", meta.get("global_step")))
        epoch = as_int(meta.get("epoch"))
        lr = None
        with contextlib.suppress(TypeError, ValueError):
            lr = float(meta["lr"]) if "lr" in meta else None
        if not tensors:
            raise CheckpointError(f"{path}: the safetensors file holds no tensors")
        return _with_hf_trainer_files(Checkpoint(path, tensors, None, step, epoch, lr, "safetensors",
                                                 {"metadata": meta}), trust_checkpoints)
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
        step = as_int(raw_step)
        epoch = as_int(obj.get("epoch"))
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
    return _with_hf_trainer_files(Checkpoint(path, state, opt_state, step, epoch, lr, fmt, extra), trust_checkpoints)


def _hf_trainer_folder(path: Path) -> bool:
    """``path`` is the weights file of a Hugging Face Trainer checkpoint folder (``checkpoint-N/model.safetensors``
    with ``trainer_state.json`` / ``optimizer.pt`` beside it)."""
    folder = path.parent
    return path.name in _HF_MODEL_FILES and ((folder / "trainer_state.json").is_file()
                                             or (folder / "optimizer.pt").is_file())


def hf_step(path: Path) -> int | None:
    """``global_step`` of the ``trainer_state.json`` beside an HF Trainer weights file (``None`` if absent)."""
    state_file = path.parent / "trainer_state.json"
    if path.name not in _HF_MODEL_FILES or not state_file.is_file():
        return None
    try:
        state = json.loads(state_file.read_text())
    except (ValueError, OSError) as exc:
        raise CheckpointError(f"{state_file}: cannot read the Trainer state ({first_line(exc)})") from exc
    return as_int(state.get("global_step")) if isinstance(state, dict) else None


def _with_hf_trainer_files(ck: Checkpoint, trust: bool) -> Checkpoint:
    """Add what a Hugging Face Trainer saves beside the weights: the step (``trainer_state.json``'s
    ``global_step``) and the optimizer (``optimizer.pt``, the torch optimizer's ``state_dict``; loaded with
    ``weights_only=True`` unless trusted). The lr is the optimizer's ``param_groups[0]["lr"]``: the Trainer saves
    after the scheduler's step, so it is the lr of the step about to be taken."""
    if not _hf_trainer_folder(ck.path):
        return ck
    ck.format = "hf_trainer"
    step = hf_step(ck.path)
    if step is not None:
        ck.step = step
    opt_file = ck.path.parent / "optimizer.pt"
    if ck.optimizer_state is None and opt_file.is_file():
        obj, _ = _torch_load(opt_file, trust, False)
        if isinstance(obj, dict) and "param_groups" in obj and "state" in obj:
            ck.optimizer_state = obj
            groups = obj.get("param_groups") or [{}]
            if isinstance(groups[0].get("lr"), (int, float, torch.Tensor)):
                ck.lr = float(groups[0]["lr"])
    return ck


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
    for key, source in _tied_sources(model).items():  # tied weights left out of the file (HF: lm_head.weight)
        if key not in fitted and source in fitted:
            fitted[key] = fitted[source]
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
    kinds = [f"'{k}' is {fitted[k].dtype} in the checkpoint, {want[k].dtype} in the model" for k in want
             if _is_real(want[k]) != _is_real(fitted[k])]
    if kinds:
        raise CheckpointError(f"{path}: tensor dtypes cannot be the model's (an integer or bool tensor is never a "
                              f"floating-point parameter, nor the reverse; wrong file or a quantized checkpoint?): "
                              f"{_short_list(kinds, 3)}")
    return fitted


def _is_real(t: torch.Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


def _tied_sources(model: nn.Module) -> dict[str, str]:
    """For each parameter reachable under several names (tied weights: the same tensor object, e.g.
    ``lm_head.weight is transformer.wte.weight``), its other names → the first name (``named_parameters`` order)."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    tied: dict[str, str] = {}
    for group in names.values():
        for alias in group:
            for other in group:
                if other != alias:
                    tied.setdefault(alias, other)
    return tied


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
