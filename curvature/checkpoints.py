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

from .data import own_loss_batch, resolve_loss_fn
from .rows import append_rows, is_json_lines, read_row_file, read_rows, write_rows
from .tracking import ROW_KEYS, warm_started_solve

__all__ = ["analyze_checkpoints", "load_checkpoint", "find_checkpoints", "fit_state_dict", "import_object",
           "resolve_loss", "read_rows", "format_rows", "step_from_name", "infer_optimizer_class", "Checkpoint",
           "CheckpointError", "UnsafeCheckpointError", "ROW_COLUMNS", "CHECKPOINT_SUFFIXES", "add_search_path"]

#: File endings recognised as checkpoints when a directory is given.
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors", ".tar")

#: Columns of an analysis row, in output order: ``file``, then the tracker's row keys (``eigenvalues`` columns hold
#: JSON lists in CSV).
#: ``preconditioner`` says which P a λ(P⁻¹H) uses (always ``"next_step"`` here: the P of the step about to be taken);
#: ``file_id`` (size:mtime of the checkpoint) and ``options`` (what the row was computed with) let a resumed run tell
#: a row it can reuse from a stale or foreign one.
ROW_COLUMNS: tuple[str, ...] = ("file",) + tuple(k for k in ROW_KEYS if k != "when") + \
    tuple(k for k in ("preconditioner",) if k not in ROW_KEYS) + ("file_id", "options")

# Files that training frameworks write next to the weights (Hugging Face Trainer folders): skipped in directories.
_NOT_MODEL_FILES = ("optimizer.", "scheduler.", "rng_state", "training_args.", "scaler.")
_HF_DIR = re.compile(r"checkpoint-\d+")
_HF_MODEL_FILES = ("model.safetensors", "pytorch_model.bin")
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
def add_search_path(dirs: Iterable[str | os.PathLike]) -> list[str]:
    """Append folders to ``sys.path`` (after the installed packages, so a module in them never shadows an installed
    one) for ``--model`` / ``--data`` / ``--loss`` modules; returns the folders added. This is the only place
    user folders join the path: the current directory is never searched unless it is named here (``--path .``)
    or on ``PYTHONPATH``."""
    added = []
    for d in dirs:
        folder = os.path.abspath(os.fspath(d))
        if not os.path.isdir(folder):
            raise CheckpointError(f"--path {os.fspath(d)!r}: no such folder")
        if folder not in sys.path:
            sys.path.append(folder)
            added.append(folder)
    return added


def _import_file(file: str, what: str, spec: str) -> Any:
    """The module of a Python file, by its path (``sys.path`` is not changed)."""
    import hashlib
    import importlib.util

    path = Path(file).expanduser()
    if not path.is_file():
        raise CheckpointError(f"{what} {spec!r}: no such file '{path}'")
    stem = re.sub(r"\W", "_", path.stem)
    name = f"_curvature_user_{stem}_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise CheckpointError(f"{what} {spec!r}: cannot load '{path}' as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - a user module that fails while importing
        del sys.modules[name]
        raise CheckpointError(f"{what} {spec!r}: running '{path}' failed: {type(exc).__name__}: {exc}") from exc
    return module


def import_object(spec: str, what: str = "factory", search_path: Iterable[str | os.PathLike] = ()) -> Any:
    """The object named by ``"package.module:name"`` (or ``"package.module.name"``, or ``"path/to/file.py:name"``).

    Modules are imported from the installed packages and ``PYTHONPATH``, then the folders of ``search_path``
    (appended to ``sys.path``, see :func:`add_search_path`); the current directory is not searched (a checkpoint
    folder must not be able to shadow a module). A ``.py`` file path before the colon is loaded from that file.
    ``what`` names the option in error messages (e.g. ``"--model"``). Raises :class:`CheckpointError`
    with the reason when the module does not import or has no such attribute.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise CheckpointError(f"{what}: expected 'package.module:function', got {spec!r}")
    spec = spec.strip()
    if ":" in spec:
        drive = 2 if re.match(r"^[A-Za-z]:[\\/]", spec) else 0  # C:\\models\\m.py:build
        head, _, attr = spec[drive:].partition(":")
        mod_name = spec[:drive] + head
    elif "." in spec:
        mod_name, _, attr = spec.rpartition(".")
    else:
        raise CheckpointError(f"{what} {spec!r}: expected 'package.module:function' (module path, a colon, "
                              f"then the name of a function in it)")
    if not mod_name or not attr:
        raise CheckpointError(f"{what} {spec!r}: expected 'package.module:function'")
    add_search_path(search_path)
    if mod_name.endswith(".py") or "/" in mod_name or os.sep in mod_name:
        module = _import_file(mod_name, what, spec)
    else:
        try:
            module = importlib.import_module(mod_name)
        except ModuleNotFoundError as exc:
            hint = "" if exc.name != mod_name.split(".")[0] else \
                (" (is it installed or on PYTHONPATH? The current directory is not searched: pass --path DIR "
                 "(CLI) / search_path= , or name the file: path/to/file.py:function)")
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
    """A loss function from ``None`` / ``"model"`` (the model computes its own loss from ``labels`` in the batch),
    a callable, a short name (``"cross_entropy"``, ``"mse"``, ``"nll"``, ``"l1"``,
    ``"huber"``, ``"bce"``, ``"bce_with_logits"``) or ``"pkg.module:function"``."""
    if loss is None or (isinstance(loss, str) and loss.strip().lower() in ("model", "none", "own")):
        return resolve_loss_fn(None)
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
            # a folder named like a checkpoint (``x.pt/``) is listed too: it gets a row with a clear error
            # instead of vanishing (every checkpoint-looking entry gets exactly one row)
            found = sorted((f for f in p.glob(pattern) if (f.is_file() or f.is_dir())
                            and f.name.endswith(CHECKPOINT_SUFFIXES) and not f.name.startswith(_NOT_MODEL_FILES)),
                           key=_natural_key)
            if not found and not recursive:  # a Hugging Face Trainer output_dir: checkpoint-N/ sub-folders
                found = sorted((f for sub in p.iterdir() if sub.is_dir() and _HF_DIR.fullmatch(sub.name)
                                for f in sub.iterdir() if f.is_file() and f.name in _HF_MODEL_FILES),
                               key=_natural_key)
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
    if path.is_dir():
        raise CheckpointError(f"'{path}' is a directory, not a checkpoint file (a folder named like one); "
                              "rename or move it, or pass the checkpoint file inside it")
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
    return _with_hf_trainer_files(Checkpoint(path, state, opt_state, step, epoch, lr, fmt, extra), trust_checkpoints)


def _hf_trainer_folder(path: Path) -> bool:
    """``path`` is the weights file of a Hugging Face Trainer checkpoint folder (``checkpoint-N/model.safetensors``
    with ``trainer_state.json`` / ``optimizer.pt`` beside it)."""
    folder = path.parent
    return path.name in _HF_MODEL_FILES and ((folder / "trainer_state.json").is_file()
                                             or (folder / "optimizer.pt").is_file())


def _hf_step(path: Path) -> int | None:
    """``global_step`` of the ``trainer_state.json`` beside an HF Trainer weights file (``None`` if absent)."""
    state_file = path.parent / "trainer_state.json"
    if path.name not in _HF_MODEL_FILES or not state_file.is_file():
        return None
    try:
        state = json.loads(state_file.read_text())
    except (ValueError, OSError) as exc:
        raise CheckpointError(f"{state_file}: cannot read the Trainer state ({_first_line(exc)})") from exc
    return _as_int(state.get("global_step")) if isinstance(state, dict) else None


def _with_hf_trainer_files(ck: Checkpoint, trust: bool) -> Checkpoint:
    """Add what a Hugging Face Trainer saves beside the weights: the step (``trainer_state.json``'s
    ``global_step``) and the optimizer (``optimizer.pt``, the torch optimizer's ``state_dict``; loaded with
    ``weights_only=True`` unless trusted). The lr is the optimizer's ``param_groups[0]["lr"]``: the Trainer saves
    after the scheduler's step, so it is the lr of the step about to be taken."""
    if not _hf_trainer_folder(ck.path):
        return ck
    ck.format = "hf_trainer"
    step = _hf_step(ck.path)
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


_NO_DECAY_NAMES = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")


def _hf_param_order(model: nn.Module, counts: Sequence[int]) -> list[nn.Parameter] | None:
    """The parameters in the order of a Hugging Face Trainer's default optimizer: group 0 = parameters with weight
    decay, group 1 = without (biases, LayerNorm/RMSNorm weights, names with "norm"), each in ``named_parameters``
    order (tied weights once). This is the documented assumption for ``optimizer.pt``; it is checked against the
    saved state's shapes. ``None`` when the group sizes do not match."""
    if len(counts) != 2:
        return None
    in_norm = {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters(recurse=False)}
    decay, rest = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = id(p) in in_norm or any(re.search(pat, name.lower()) for pat in _NO_DECAY_NAMES)
        (rest if no_decay else decay).append(p)
    return decay + rest if [len(decay), len(rest)] == list(counts) else None


def _state_fits(opt_state: dict, order: Sequence[torch.Tensor]) -> bool:
    """Every saved per-parameter tensor (``exp_avg``, ``momentum_buffer``, ...) has its parameter's shape when the
    saved integer ids are mapped to ``order`` group by group."""
    state = opt_state.get("state") or {}
    start = 0
    for g in opt_state.get("param_groups") or []:
        for j, pid in enumerate(g.get("params", [])):
            if start + j >= len(order):
                return False
            shape = tuple(order[start + j].shape)
            for value in (state.get(pid) or {}).values():
                if isinstance(value, torch.Tensor) and value.ndim > 0 and tuple(value.shape) != shape:
                    return False
        start += len(g.get("params", []))
    return start == len(order)


def _restore_optimizer(model: nn.Module, opt_state: dict, optimizer_factory: Callable | None,
                       path: Path, hf: bool = False) -> torch.optim.Optimizer | None:
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
        orders = ([_hf_param_order(model, counts)] if hf else []) + [params]
        fitting = [o for o in orders if o is not None and _state_fits(opt_state, o)]
        if not fitting:
            raise CheckpointError(f"{path}: the saved optimizer state does not fit the model's parameters in "
                                  f"{'the Trainer order (decay, no-decay) nor ' if hf else ''}model.parameters() "
                                  f"order (state shapes differ); pass optimizer_factory= (--optimizer) to rebuild "
                                  f"the optimizer as in training")
        params = fitting[0]
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
# Output file (CSV / JSON lines), row identity, resume
# ---------------------------------------------------------------------------------------------------
def _same_file(a: str, b: Path) -> bool:
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


def _callable_name(obj: Any) -> str:
    if isinstance(obj, str):
        return obj
    if obj is None:
        return "model"
    module = getattr(obj, "__module__", None) or type(obj).__module__
    name = getattr(obj, "__qualname__", None) or type(obj).__qualname__
    return f"{module}:{name}"


def _data_fingerprint(spec: Any, data: Any) -> str:
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


def _options_text(**options: Any) -> str:
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


def _open_output(out_path: Path, jl: bool, *, resume: bool, overwrite: bool, options: str,
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
        match = next((f for f in files if _same_file(str(r["file"]), f)), None)
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
            step = _hf_step(path)
            if step is None:
                step = _as_int(meta.get("step", meta.get("global_step")))
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
        return step_from_name(path), f"{path}: {type(exc).__name__}: {_first_line(exc)}", None
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
        from ``out`` when resuming. ``preconditioned_sharpness`` is set when the checkpoint holds Adam/AdamW
        state: λ_max(P⁻¹H) with the P of the step about to be taken (``preconditioner="next_step"``: the saved
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
    from .diagnostics import check_solver_options, sharpness

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
    options = _options_text(k=k, solver=solver, tol=tol, max_iters=max_iters, loss=_callable_name(loss_spec),
                            data=_data_fingerprint(data_spec, data), preconditioner="next_step",
                            optimizer=None if optimizer_spec is None else _callable_name(optimizer_spec),
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
        done, columns, notes = _open_output(out_path, jl, resume=resume, overwrite=overwrite, options=options,
                                            files=files)
        for note in notes:
            warnings.warn(note, stacklevel=2)
        files = [f for f in files if not any(_same_file(str(r["file"]), f) for r in done)]

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
                row["error"] = f"{path}: {type(exc).__name__}: {_first_line(exc)}"
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
        optimizer = _restore_optimizer(model, ck.optimizer_state, optimizer_factory, path,
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
    problems = [] if res.converged else [f"λ_max(H) did not converge (residual {row['residual']:.2e} > tol {tol:g})"]

    if optimizer is not None:
        from . import optim as _optim

        row["optimizer"] = type(optimizer).__name__
        row["lr"] = float(optimizer.param_groups[0]["lr"])
        with contextlib.suppress(TypeError, ValueError):
            row["threshold"] = float(_optim.stability_threshold(optimizer))
        top = values[0]
        if _optim.is_adam_like(optimizer):
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
