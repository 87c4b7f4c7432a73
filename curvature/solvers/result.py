"""The result type every eigensolver returns."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class EigenResult:
    """Eigenpairs of a symmetric operator ``A`` found by an iterative solver.

    Attributes:
        eigenvalues: ``(k,)``, sorted algebraically largest first (for ``largest=False``
            solves: smallest first).
        eigenvectors: ``(n, k)``, orthonormal columns; column ``i`` belongs to ``eigenvalues[i]``.
        residuals: ``(k,)``, relative residual ``‖A v − λ v‖ / |λ|`` of each pair.
        num_hvps: operator applications, counted per vector (a block of 8 counts 8).
        converged: ``True`` when every residual is ``<= tol``.
        iterations: outer iterations taken.
        info: solver-specific extras (restarts, tolerance, history, ...).
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    residuals: torch.Tensor
    num_hvps: int
    converged: bool
    iterations: int
    info: dict = field(default_factory=dict)

    @property
    def eigenvalue(self) -> float:
        """The first (top) eigenvalue as a Python float."""
        return float(self.eigenvalues[0])

    def __repr__(self) -> str:  # short and readable in notebooks/logs
        vals = ", ".join(f"{float(v):.6g}" for v in self.eigenvalues)
        res = ", ".join(f"{float(r):.1e}" for r in self.residuals)
        return (f"EigenResult(eigenvalues=[{vals}], residuals=[{res}], num_hvps={self.num_hvps}, "
                f"converged={self.converged}, iterations={self.iterations})")
