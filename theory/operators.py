"""The operator protocol the eigen-solvers accept, and a dense reference operator.

An operator is anything with ``dim`` (int) and ``matvec(v)`` taking and returning a 1-D torch tensor
of length ``dim`` (e.g. :class:`theory.hessian.HessianOperator`). :func:`as_matvec` turns an operator,
a dense symmetric matrix (numpy or torch) or a ``scipy.sparse.linalg.LinearOperator`` into a float64
numpy function, so that Lanczos, power iteration and CG run in float64 whatever the model's dtype.

Example::

    op = DenseOperator(torch.diag(torch.arange(5.0)))
    dim, apply = as_matvec(op)
    apply(np.ones(5))        # array([0., 1., 2., 3., 4.])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator


class DenseOperator:
    """A symmetric matrix A wrapped as an operator (``matvec(v) = A v``): the float64 reference
    against which the matrix-free solvers are tested."""

    def __init__(self, matrix: torch.Tensor | np.ndarray):
        a = torch.as_tensor(matrix)
        if a.dim() != 2 or a.shape[0] != a.shape[1]:
            raise ValueError(f"matrix must be square, got shape {tuple(a.shape)}")
        self.matrix = a
        self.dim = a.shape[0]
        self.dtype = a.dtype
        self.device = a.device
        self.num_matvecs = 0

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        self.num_matvecs += 1
        return (self.matrix @ v.to(self.matrix.dtype)).to(v.dtype)

    def to_dense(self) -> torch.Tensor:
        return self.matrix.clone()


def as_matvec(op: Any) -> tuple[int, Callable[[np.ndarray], np.ndarray]]:
    """``(dim, f)`` with ``f(x: float64 array) -> float64 array`` applying the operator."""
    if isinstance(op, (np.ndarray, torch.Tensor)):
        op = DenseOperator(op)
    if isinstance(op, LinearOperator):
        if op.shape[0] != op.shape[1]:
            raise ValueError(f"operator must be square, got shape {op.shape}")
        return op.shape[0], lambda x: np.asarray(op.matvec(x), dtype=np.float64).reshape(-1)
    if not (hasattr(op, "dim") and hasattr(op, "matvec")):
        raise TypeError(
            "expected an operator with .dim and .matvec(torch 1-D tensor), a square matrix or a "
            f"scipy LinearOperator, got {type(op).__name__}"
        )
    dtype = getattr(op, "dtype", torch.float64)
    device = getattr(op, "device", "cpu")

    def apply(x: np.ndarray) -> np.ndarray:
        v = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64)).to(dtype=dtype, device=device)
        return op.matvec(v).detach().to(device="cpu", dtype=torch.float64).numpy()

    return int(op.dim), apply
