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

__all__ = ["drop_cwd_from_sys_path"]


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
