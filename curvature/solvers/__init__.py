"""Iterative eigensolvers for symmetric operators (Hessians), pure torch, counted in operator applications.

* :func:`lobpcg` — block LOBPCG with soft locking; the default for sharpness (fewest applications).
* :func:`lanczos` — thick-restarted Lanczos with full reorthogonalisation.
* :func:`power_iteration` — power iteration with deflation (largest *magnitude*).
* :func:`lanczos_tridiagonal` — the raw Lanczos tridiagonalisation (used by spectral-density code).

Each accepts a :class:`~curvature.operators.LinearOperator` or a square tensor and returns an
:class:`EigenResult`.
"""
from .lanczos import lanczos, lanczos_tridiagonal
from .lobpcg import lobpcg
from .power import power_iteration
from .result import EigenResult

__all__ = ["lobpcg", "lanczos", "power_iteration", "lanczos_tridiagonal", "EigenResult"]
