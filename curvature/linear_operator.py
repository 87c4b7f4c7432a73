"""The linear-operator protocol on flat vectors, in the shape of ``scipy.sparse.linalg.LinearOperator``.

Every operator here is a symmetric ``n × n`` matrix that is never formed: it is applied to a vector
(``matvec``) or to a block of vectors (``matmat``) and counts how many vectors it was applied to
(``num_hvps``). Solvers (:mod:`curvature.solvers`) and estimators (:mod:`curvature.spectrum`) only use this
protocol, so they work with any operator, not only Hessians. The Hessian of a model is in
:mod:`curvature.operators`.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["LinearOperator", "MatrixOperator", "ShiftedOperator", "ParameterOperator"]


class LinearOperator:
    """Base class: a symmetric linear map ``R^n -> R^n`` acting on torch tensors.

    Subclasses implement :meth:`_matmat` (``(n, k) -> (n, k)``). The public :meth:`matmat`
    checks shapes, counts ``num_hvps`` (one per column) and calls it.
    """

    shape: tuple[int, int]
    dtype: torch.dtype
    device: torch.device

    def __init__(self, n: int, dtype: torch.dtype, device: torch.device | str) -> None:
        self.shape = (int(n), int(n))
        self.dtype = dtype
        self.device = torch.device(device)
        self.num_hvps = 0

    # -- to implement -------------------------------------------------------------------------
    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # -- protocol --------------------------------------------------------------------------------
    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``A @ V`` for a block ``V`` of shape ``(n, k)``; counts ``k`` operator applications."""
        if V.ndim != 2 or V.shape[0] != self.shape[0]:
            raise ValueError(f"matmat expects a tensor of shape ({self.shape[0]}, k), got {tuple(V.shape)}")
        if V.shape[1] == 0:
            return V.new_zeros(V.shape)
        V = V.to(device=self.device, dtype=self.dtype)
        out = self._matmat(V)
        self.num_hvps += V.shape[1]
        return out

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``A @ v`` for a 1-D tensor of length ``n``."""
        if v.ndim != 1 or v.shape[0] != self.shape[0]:
            raise ValueError(f"matvec expects a 1-D tensor of length {self.shape[0]}, got {tuple(v.shape)}")
        return self.matmat(v[:, None])[:, 0]

    def __matmul__(self, x: torch.Tensor) -> torch.Tensor:
        """``A @ x`` for a 1-D or 2-D tensor; a numpy array gives a numpy array (of its dtype, on the CPU)."""
        if type(x).__module__ == "numpy" and hasattr(x, "dtype"):
            out = self @ torch.from_numpy(x.copy())
            return out.detach().cpu().numpy().astype(x.dtype if x.dtype.kind == "f" else "float64")
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"operator @ x needs a torch.Tensor or numpy array, got {type(x).__name__}")
        if x.ndim == 1:
            return self.matvec(x)
        if x.ndim == 2:
            return self.matmat(x)
        raise ValueError(f"operator @ x needs a 1-D or 2-D tensor, got {x.ndim}-D")

    def to_dense(self) -> torch.Tensor:
        """The full ``n × n`` matrix (``n`` operator applications; for small ``n`` only)."""
        return self.matmat(torch.eye(self.shape[0], dtype=self.dtype, device=self.device))

    def to_scipy(self) -> Any:
        """A ``scipy.sparse.linalg.LinearOperator`` over numpy arrays that calls this operator.

        Use ``eigsh(op.to_scipy(), k, which="LA")`` for the algebraically largest eigenvalues
        (scipy's default ``"LM"`` is the largest *magnitude*).
        """
        from scipy.sparse.linalg import LinearOperator as ScipyLinearOperator

        np_dtype = torch.empty((), dtype=self.dtype).numpy().dtype

        def _mv(x: np.ndarray) -> np.ndarray:
            t = torch.as_tensor(np.ascontiguousarray(x), device=self.device).to(self.dtype)
            if t.ndim == 1:
                return self.matvec(t).detach().cpu().numpy()
            return self.matmat(t.reshape(self.shape[0], -1)).detach().cpu().numpy()

        return ScipyLinearOperator(self.shape, matvec=_mv, rmatvec=_mv, matmat=_mv, dtype=np_dtype)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype}, device={self.device})"


class MatrixOperator(LinearOperator):
    """A dense symmetric matrix behind the operator protocol (tests, small problems, analytic cases)."""

    def __init__(self, matrix: torch.Tensor) -> None:
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"MatrixOperator needs a square matrix, got shape {tuple(matrix.shape)}")
        super().__init__(matrix.shape[0], matrix.dtype, matrix.device)
        self.matrix = matrix

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.matrix @ V


class ShiftedOperator(LinearOperator):
    """``A − σI``: same eigenvectors, eigenvalues shifted by −σ. Counts its own applications (and ``A``'s)."""

    def __init__(self, op: LinearOperator, shift: float) -> None:
        super().__init__(op.shape[0], op.dtype, op.device)
        self.op = op
        self.shift = float(shift)

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.op.matmat(V) - self.shift * V


class ParameterOperator(LinearOperator):
    """An operator on flat vectors of a model's parameters, applied by an HVP engine (``engine.hvp_sum`` on
    per-parameter ``(k, *shape)`` blocks): the layout shared by :class:`HessianOperator` and the sharded operator.
    Subclasses set ``engine``, ``param_shapes`` and ``_numels`` (the numel of each block of a flat vector)."""

    engine: Any
    param_shapes: list[torch.Size]
    _numels: list[int]

    def flatten(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-parameter tensors → one flat vector in this operator's parameter order."""
        return torch.cat([t.reshape(-1) for t in tensors])

    def unflatten(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """A flat vector → views shaped like the parameters."""
        return [t.view(s) for t, s in zip(torch.split(flat, self._numels), self.param_shapes)]

    def _local_hvp_sum(self, V: torch.Tensor) -> torch.Tensor:
        """This process's weighted sum Σ_b w_b ∇²L_b V for an ``(n, k)`` block (before any all-reduce)."""
        k = V.shape[1]
        tangents = [blk.T.reshape(k, *s) for blk, s in zip(torch.split(V, self._numels, dim=0), self.param_shapes)]
        out = self.engine.hvp_sum(tangents)
        return torch.cat([o.reshape(k, -1) for o in out], dim=1).T.contiguous()
