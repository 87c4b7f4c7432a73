"""Models, data and losses named by strings (``"pkg.module:function"``, ``"path/file.py:function"``, loss
names): what the command line and :func:`~curvature.checkpoints.analyze_checkpoints` accept."""
from __future__ import annotations

import copy
import importlib
import os
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import resolve_loss_fn
from .errors import CheckpointError

__all__ = ['add_search_path', 'import_object', 'resolve_loss', 'resolve_model_factory', 'build_model', 'resolve_data']

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
