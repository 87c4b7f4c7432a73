"""Keep the current directory out of ``sys.path`` for the ``curvature`` program.

``python -m curvature`` puts the current directory first on ``sys.path`` (and ``''`` does the same for ``-c``), so a
file such as ``safetensors.py`` or ``fractions.py`` in a downloaded checkpoint folder would be imported instead of
the real package the first time something imports that name, and run its code. The program never needs the
current directory on the path: the user's ``--model`` / ``--data`` modules are found on ``PYTHONPATH``, in the
folders given with ``--path`` (searched after the installed packages) or as ``path/to/file.py:function``.
A folder named explicitly in ``PYTHONPATH`` is kept (the user asked for it).
"""
from __future__ import annotations

import os
import sys

__all__ = ["drop_cwd_from_sys_path", "running_curvature_module"]


def running_curvature_module() -> bool:
    """True while ``python -m curvature`` (or ``-m curvature.<submodule>``) is starting: only then may importing
    the package drop the current directory. A user's own ``python -m mypkg`` whose package imports curvature keeps
    its ``sys.path`` (its other modules in the current directory must stay importable)."""
    if sys.argv[:1] != ["-m"]:
        return False
    argv = list(getattr(sys, "orig_argv", []))
    for i, arg in enumerate(argv[:-1]):
        if arg == "-m":
            target = argv[i + 1]
            return target == "curvature" or target.startswith("curvature.")
        if arg.startswith("-m") and len(arg) > 2:  # -mcurvature
            return arg[2:] == "curvature" or arg[2:].startswith("curvature.")
    return False


def drop_cwd_from_sys_path() -> list[str]:
    """Remove ``''`` and every entry that resolves to the current directory from ``sys.path`` (unless that folder
    is listed in ``PYTHONPATH``); returns the removed entries."""
    try:
        cwd = os.path.realpath(os.getcwd())
    except OSError:  # the current directory was deleted
        cwd = None
    explicit = {os.path.realpath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p}
    removed, keep = [], []
    for entry in sys.path:
        real = os.path.realpath(entry) if entry else cwd
        if (entry == "" or real == cwd) and real not in explicit:
            removed.append(entry)
        else:
            keep.append(entry)
    sys.path[:] = keep
    return removed
