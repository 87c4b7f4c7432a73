"""Checks for numeric options, one small function per kind of value.

Each returns the value in its canonical Python type (``int`` / ``float``) or raises ``TypeError`` (wrong type:
a string, a bool, a tensor with several elements) or ``ValueError`` (right type, bad value: NaN, inf, ≤ 0), with
a message that names the option and says what is allowed. Solvers and every public entry point call them at
the top, so a bad value fails at once instead of silently spending the budget or returning a wrong number
(``tol=inf`` would stop at the random start vector's Rayleigh quotient).
"""
from __future__ import annotations

import math
import numbers
import operator
from typing import Any

__all__ = ["check_tol", "check_positive_int", "check_nonneg_int", "check_optional_positive_int",
           "check_finite_float", "check_positive_float", "check_nonneg_float", "check_seed", "check_device"]


def _describe(x: Any) -> str:
    return f"{x!r} ({type(x).__name__})"


def _as_int(x: Any, name: str) -> int:
    if isinstance(x, bool) or isinstance(x, str):
        raise TypeError(f"{name} must be an integer, got {_describe(x)}")
    if isinstance(x, float):
        if not math.isfinite(x) or x != int(x):
            raise ValueError(f"{name} must be an integer, got {x!r}")
        return int(x)
    try:
        return operator.index(x)  # int, numpy integers, 0-d integer tensors
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {_describe(x)}") from None


def _as_float(x: Any, name: str) -> float:
    if isinstance(x, bool) or isinstance(x, str) or x is None:
        raise TypeError(f"{name} must be a real number, got {_describe(x)}")
    if isinstance(x, numbers.Real):
        return float(x)
    item = getattr(x, "item", None)  # 0-d tensors / numpy scalars
    if callable(item) and getattr(x, "numel", lambda: 1)() == 1:
        value = item()
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return float(value)
    raise TypeError(f"{name} must be a real number, got {_describe(x)}")


def check_finite_float(x: Any, name: str) -> float:
    """A finite real number (not NaN, not ±inf)."""
    value = _as_float(x, name)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return value


def check_positive_float(x: Any, name: str) -> float:
    """A finite real number > 0."""
    value = check_finite_float(x, name)
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def check_nonneg_float(x: Any, name: str) -> float:
    """A finite real number ≥ 0."""
    value = check_finite_float(x, name)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def check_tol(x: Any, name: str = "tol", *, allow_none: bool = False) -> float | None:
    """A convergence tolerance: finite and > 0 (``inf`` would accept any vector as converged, ``0`` or NaN would
    never converge and spend the whole budget). ``allow_none``: ``None`` (= the default) passes through."""
    if x is None and allow_none:
        return None
    value = _as_float(x, name)
    if math.isnan(value) or math.isinf(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0 (a relative residual such as 1e-4), got {value}: "
                         + ("inf accepts any vector as converged" if math.isinf(value) and value > 0 else
                            "it can never be met, so the solver would spend its whole budget"))
    return value


def check_positive_int(x: Any, name: str) -> int:
    """An integer ≥ 1."""
    value = _as_int(x, name)
    if value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value}")
    return value


def check_nonneg_int(x: Any, name: str) -> int:
    """An integer ≥ 0."""
    value = _as_int(x, name)
    if value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value}")
    return value


def check_optional_positive_int(x: Any, name: str) -> int | None:
    """``None`` or an integer ≥ 1 (e.g. ``max_iters=None`` = the solver's default budget)."""
    return None if x is None else check_positive_int(x, name)


def check_seed(x: Any, name: str = "seed") -> int:
    """A seed for ``torch.Generator.manual_seed``: an integer in [−2⁶³, 2⁶⁴)."""
    value = _as_int(x, name)
    if not -(2 ** 63) <= value < 2 ** 64:
        raise ValueError(f"{name} must be an integer in [-2**63, 2**64), got {value}")
    return value


def check_device(x: Any, name: str = "device") -> Any:
    """``None`` or a ``torch.device`` that exists on this machine: ``"cuda"`` without CUDA (or past the last GPU),
    ``"mps"`` without MPS and ``"meta"`` (no values) are refused with a message naming the option."""
    if x is None:
        return None
    import torch

    try:
        dev = torch.device(x)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"{name}={x!r} is not a device ({exc}); pass e.g. 'cpu' or 'cuda'") from None
    use = f"pass {name}='cpu', or leave {name}=None to use the parameters' own device"
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = " (a CPU-only build)" if torch.version.cuda is None else ""
            raise ValueError(f"{name}={x!r}: CUDA is not available on this machine (torch {torch.__version__}"
                             f"{build}); {use}")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{name}={x!r}: this machine has {torch.cuda.device_count()} CUDA device(s); {use}")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{name}={x!r}: MPS is not available on this machine; {use}")
    elif dev.type == "meta":
        raise ValueError(f"{name}={x!r}: the meta device holds shapes without values, no curvature can be "
                         f"computed there; {use}")
    return dev
