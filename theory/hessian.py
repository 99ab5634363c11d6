"""Hessian-vector products of the mean training loss on the tunable subspace.

For a fixed list of batches B_1..B_J with n_b examples each and ``loss_fn(model, B)`` returning the
mean loss of a batch, the objective is the mean loss over all N = Σ n_b examples

    L(x) = Σ_b (n_b / N) · loss_fn(model[θ(x)], B_b),     θ(x) = θ0 with the k tunable entries set to x,

and :class:`HessianOperator` applies H = ∇²L(x0) (k × k, x0 = the current values) to vectors without
forming it. Fu et al. (AAAI 2023, Theorem 1) bound stability through Λmin of this Hessian; the
operator is therefore restricted to the k tunable coordinates (never the masked full space, whose
(1-p)m exact zeros would give λmin = 0). The model is in eval mode (dropout off) during every call.

Two exact HVP backends (Pearlmutter 1994, "Fast exact multiplication by the Hessian"):

* ``double_backward``: g = ∂L/∂x with ``create_graph=True``, then Hv = ∂(gᵀv)/∂x (reverse-over-reverse);
* ``forward_over_reverse``: Hv = d/dt ∇L(x0 + t v) at t=0, ``torch.func.jvp`` of ``torch.func.grad``.

``auto`` times both once on the first batch of the first product, keeps the faster, and falls back to
double backward when forward-mode AD is missing (fused SDPA attention kernels have no forward-mode
derivative: load Hugging Face models with ``attn_implementation="eager"``).

Example::

    op = HessianOperator(model, lambda m, b: F.cross_entropy(m(b["x"]), b["y"]), batches,
                         params={"fc.weight": mask})
    hv = op.matvec(torch.randn(op.dim))      # one exact Hessian-vector product
    H = op.to_dense()                        # only for small op.dim
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator
from torch import nn
from torch.func import grad, jvp

from theory.subspace import LossFn, ParamsSpec, Subspace, batch_weights, eval_mode, functional_loss

BACKENDS = ("auto", "double_backward", "forward_over_reverse")


class DeterminismCheck(NamedTuple):
    """Two products with the same vector: relative gap ||Hv₁ − Hv₂|| / ||Hv₁|| and whether it is ≤ rtol."""

    gap: float
    passed: bool


class HessianOperator:
    """H = ∇²L on the tunable subspace (see the module docstring).

    Args:
        model: any ``nn.Module``; its current parameters are the expansion point x0.
        loss_fn: ``loss_fn(model, batch) -> scalar`` mean loss of one batch.
        batches: the fixed data; batch b is weighted by its size n_b / N.
        params: tunable coordinates, see :class:`theory.subspace.Subspace` (None, names, or name -> mask).
        hvp_backend: "auto", "double_backward" or "forward_over_reverse".
        batch_size_fn: ``batch -> n_b``; default: first dimension of the (first) tensor in the batch.

    Attributes: ``dim`` (k), ``dtype``, ``device``, ``backend`` (resolved after the first product when
    "auto"), ``backend_timings`` (seconds per backend on the first batch when "auto"), ``num_matvecs``.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: Sequence[Any],
        params: ParamsSpec = None,
        *,
        hvp_backend: str = "auto",
        batch_size_fn: Callable[[Any], int] | None = None,
    ):
        if hvp_backend not in BACKENDS:
            raise ValueError(f"hvp_backend must be one of {BACKENDS}, got {hvp_backend!r}")
        self.model = model
        self.batches = list(batches)
        self.weights = batch_weights(self.batches, batch_size_fn)
        self.space = Subspace(model, params)
        self.dim = self.space.dim
        self.dtype = self.space.dtype
        self.device = self.space.device
        self.hvp_backend = hvp_backend
        self.backend: str | None = None if hvp_backend == "auto" else hvp_backend
        self.backend_timings: dict[str, float] = {}
        self.num_matvecs = 0
        self._loss = functional_loss(model, loss_fn)
        self._x0 = self.space.gather()

    # ------------------------------------------------------------------ products
    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """Hv for a 1-D tensor of length ``dim``; returned with v's dtype and device."""
        v = torch.as_tensor(v)
        if v.dim() != 1 or v.shape[0] != self.dim:
            raise ValueError(f"v must be a 1-D tensor of length {self.dim}, got shape {tuple(v.shape)}")
        w = v.detach().to(dtype=self.dtype, device=self.device)
        with eval_mode(self.model):
            if self.backend is None:
                out = self._choose_backend(w)
            else:
                out = sum(c * self._hvp(self.backend, w, b) for c, b in zip(self.weights, self.batches))
        self.num_matvecs += 1
        return out.detach().to(dtype=v.dtype, device=v.device)

    __matmul__ = matvec

    def gradient(self, batches: Sequence[Any] | None = None, batch_size_fn=None) -> torch.Tensor:
        """∇L(x0) on the subspace (k-vector), over the operator's batches or the given ones (weighted
        by batch size), e.g. ``op.gradient([one_example])`` for a per-example gradient."""
        batches, weights = self._data(batches, batch_size_fn)
        x = self._x0.clone().requires_grad_(True)
        out = torch.zeros_like(self._x0)
        with eval_mode(self.model):
            for c, batch in zip(weights, batches):
                (g,) = torch.autograd.grad(self._loss(self.space.assemble(x), batch), x)
                out += c * g
        return out

    def loss(self, batches: Sequence[Any] | None = None, batch_size_fn=None) -> float:
        """L(x0): the mean loss over the operator's batches (or the given ones), eval mode."""
        batches, weights = self._data(batches, batch_size_fn)
        with eval_mode(self.model), torch.no_grad():
            return float(sum(c * self._loss(self.space.assemble(self._x0), b) for c, b in zip(weights, batches)))

    # ------------------------------------------------------------------ views
    def to_dense(self, max_dim: int = 5000) -> torch.Tensor:
        """The k × k matrix, column j = H e_j (k products; not symmetrised, so asymmetry shows noise)."""
        if self.dim > max_dim:
            raise ValueError(
                f"to_dense would need {self.dim} Hessian-vector products and a {self.dim}x{self.dim} matrix; "
                f"refusing above max_dim={max_dim} (use theory.lanczos for the extremes and density)"
            )
        eye = torch.eye(self.dim, dtype=self.dtype, device=self.device)
        return torch.stack([self.matvec(eye[j]) for j in range(self.dim)], dim=1)

    def as_linear_operator(self) -> LinearOperator:
        """A float64 ``scipy.sparse.linalg.LinearOperator`` view (symmetric: rmatvec = matvec)."""

        def apply(x: np.ndarray) -> np.ndarray:
            v = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64).reshape(-1))
            return self.matvec(v).numpy()

        return LinearOperator((self.dim, self.dim), matvec=apply, rmatvec=apply, dtype=np.float64)

    def check_determinism(self, v: torch.Tensor | None = None, seed: int = 0, rtol: float = 0.0):
        """Apply H twice to the same vector (Gaussian from ``seed`` if v is None) and compare.

        Nondeterministic kernels (some GPU reductions) or a model left with active randomness make
        Lanczos see a different matrix at each step; the gap shows it. Returns a :class:`DeterminismCheck`.
        """
        if v is None:
            gen = torch.Generator().manual_seed(seed)
            v = torch.randn(self.dim, generator=gen, dtype=torch.float64).to(self.dtype)
        first, second = self.matvec(v), self.matvec(v)
        gap = float((first - second).norm() / first.norm().clamp_min(torch.finfo(first.dtype).tiny))
        return DeterminismCheck(gap, gap <= rtol)

    # ------------------------------------------------------------------ internals
    def _data(self, batches, batch_size_fn):
        if batches is None:
            return self.batches, self.weights
        batches = list(batches)
        return batches, batch_weights(batches, batch_size_fn)

    def _hvp(self, backend: str, v: torch.Tensor, batch: Any) -> torch.Tensor:
        """H_b v for one batch's mean loss."""
        if backend == "forward_over_reverse":
            grad_fn = grad(lambda x: self._loss(self.space.assemble(x), batch))
            return jvp(grad_fn, (self._x0,), (v,))[1]
        x = self._x0.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(self._loss(self.space.assemble(x), batch), x, create_graph=True)
        return torch.autograd.grad(g, x, grad_outputs=v)[0]

    def _choose_backend(self, v: torch.Tensor) -> torch.Tensor:
        """Time both backends on the first batch, keep the faster (or the only one that runs)."""
        results = {}
        for backend in ("forward_over_reverse", "double_backward"):
            start = time.perf_counter()
            try:
                results[backend] = self._hvp(backend, v, self.batches[0])
            except (RuntimeError, NotImplementedError) as err:
                if backend == "double_backward":
                    raise
                warnings.warn(f"forward-over-reverse HVP unavailable ({err}); using double backward",
                              stacklevel=3)
                continue
            self.backend_timings[backend] = time.perf_counter() - start
        self.backend = min(self.backend_timings, key=self.backend_timings.get)
        if len(results) == 2:
            a, b = results.values()
            gap = float((a - b).norm() / b.norm().clamp_min(torch.finfo(b.dtype).tiny))
            if gap > 100 * torch.finfo(self.dtype).eps ** 0.5:
                warnings.warn(f"the two HVP backends disagree (relative gap {gap:.2e})", stacklevel=3)
        rest = zip(self.weights[1:], self.batches[1:])
        return self.weights[0] * results[self.backend] + sum(
            (c * self._hvp(self.backend, v, b) for c, b in rest), torch.zeros_like(v))
