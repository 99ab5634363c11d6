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
derivative: load Hugging Face models with ``attn_implementation="eager"``, or call
``model.set_attn_implementation("eager")``; the error raised otherwise says so).

``cache_graph=True`` keeps, per batch, the autograd graph of g = ∇L_b(x0) built with ``create_graph``;
every later product is then a single backward pass through it (``retain_graph=True``) instead of
forward + backward + double backward. On MiniLM (p = 0.005, batch 16 × 128, CPU) this brings one
product from about 3× to 2-2.6× the cost of a gradient (``benchmarks/bench_hvp.py``; the rest is the
backward of the backward: 6 matrix products per linear layer against 3 for a gradient, and the
elementwise double-backward formulas of GELU, softmax and LayerNorm), at the price of holding each
batch's activations and first-order backward intermediates (about 1.6 GB RSS for that MiniLM batch).
It implies the double-backward backend. Use it for Lanczos / SLQ / CG on a few batches; call
:meth:`HessianOperator.clear_cache` to free the memory.

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
from torch.func import grad, jvp, vmap

from theory.subspace import LossFn, ParamsSpec, Subspace, batch_weights, eval_mode, functional_loss

BACKENDS = ("auto", "double_backward", "forward_over_reverse")


class DeterminismCheck(NamedTuple):
    """Two products with the same vector: relative gap ||Hv₁ − Hv₂|| / ||Hv₁|| and whether it is ≤ rtol."""

    gap: float
    passed: bool


class HessianOperator:
    """H = ∇²L on the tunable subspace (see the module docstring).

    Args:
        model: any ``nn.Module``; the tunable values at construction are the expansion point x0 (the
            frozen entries are read from the model at every product: do not modify it meanwhile).
        loss_fn: ``loss_fn(model, batch) -> scalar`` mean loss of one batch.
        batches: the fixed data; batch b is weighted by its size n_b / N.
        params: tunable coordinates, see :class:`theory.subspace.Subspace` (None, names, or name -> mask).
        hvp_backend: "auto", "double_backward" or "forward_over_reverse".
        batch_size_fn: ``batch -> n_b``; default: first dimension of the (first) tensor in the batch.
        cache_graph: keep each batch's first-order graph between products (double backward only).

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
        cache_graph: bool = False,
    ):
        if hvp_backend not in BACKENDS:
            raise ValueError(f"hvp_backend must be one of {BACKENDS}, got {hvp_backend!r}")
        if cache_graph and hvp_backend == "forward_over_reverse":
            raise ValueError(
                "cache_graph=True reuses a reverse-mode graph: use hvp_backend='double_backward'"
            )
        self.model = model
        self.batches = list(batches)
        self.weights = batch_weights(self.batches, batch_size_fn)
        self.space = Subspace(model, params)
        self.dim = self.space.dim
        self.dtype = self.space.dtype
        self.device = self.space.device
        self.hvp_backend = hvp_backend
        self.cache_graph = cache_graph
        self.backend: str | None = (
            "double_backward" if cache_graph else (None if hvp_backend == "auto" else hvp_backend)
        )
        self.backend_timings: dict[str, float] = {}
        self.num_matvecs = 0
        self._loss = functional_loss(model, loss_fn)
        self._x0 = self.space.gather()
        self._graphs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    # ------------------------------------------------------------------ products
    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """Hv for a 1-D tensor of length ``dim``; returned with v's dtype and device."""
        v = torch.as_tensor(v)
        if v.dim() != 1 or v.shape[0] != self.dim:
            raise ValueError(f"v must be a 1-D tensor of length {self.dim}, got shape {tuple(v.shape)}")
        return self._apply(v)

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """HV for a (dim, c) matrix: the c products run batched (``vmap`` over the tangents for
        forward-over-reverse, ``is_grads_batched`` for double backward), sharing one first-order pass."""
        V = torch.as_tensor(V)
        if V.dim() != 2 or V.shape[0] != self.dim:
            raise ValueError(f"V must be a matrix with {self.dim} rows, got shape {tuple(V.shape)}")
        if self.backend is None:
            first = self.matvec(V[:, 0])
            return (
                torch.cat([first[:, None], self.matmat(V[:, 1:])], dim=1)
                if V.shape[1] > 1
                else first[:, None]
            )
        return self._apply(V.T).T

    def _apply(self, v: torch.Tensor) -> torch.Tensor:
        """Σ_b w_b H_b v for v of shape (dim,) or (c, dim); counts products; hints at eager attention."""
        w = v.detach().to(dtype=self.dtype, device=self.device)
        try:
            with eval_mode(self.model):
                if self.backend is None:
                    out = self._choose_backend(w)
                else:
                    out = sum(c * self._hvp(self.backend, w, b) for b, c in enumerate(self.weights))
        except (RuntimeError, NotImplementedError) as err:
            if "not implemented" in str(err) or "not support" in str(err):
                raise type(err)(
                    f"{err}\nA kernel in the model lacks the second-order derivative this HVP needs. Fused "
                    "attention (SDPA/flash) is the usual cause: load Hugging Face models with "
                    "attn_implementation='eager' (or call model.set_attn_implementation('eager'))."
                ) from err
            raise
        self.num_matvecs += 1 if v.dim() == 1 else v.shape[0]
        return out.detach().to(dtype=v.dtype, device=v.device)

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
            return float(
                sum(c * self._loss(self.space.assemble(self._x0), b) for c, b in zip(weights, batches))
            )

    def clear_cache(self) -> None:
        """Drop the graphs kept by ``cache_graph=True`` (they are rebuilt on the next product)."""
        self._graphs.clear()

    # ------------------------------------------------------------------ views
    def to_dense(self, max_dim: int = 5000, chunk: int = 64) -> torch.Tensor:
        """The k × k matrix H = H·I, computed ``chunk`` columns at a time with :meth:`matmat` (k products;
        not symmetrised, so any asymmetry shows numerical noise)."""
        if self.dim > max_dim:
            raise ValueError(
                f"to_dense would need {self.dim} Hessian-vector products and a {self.dim}x{self.dim} matrix; "
                f"refusing above max_dim={max_dim} (use theory.lanczos for the extremes and density)"
            )
        eye = torch.eye(self.dim, dtype=self.dtype, device=self.device)
        return torch.cat([self.matmat(eye[:, j : j + chunk]) for j in range(0, self.dim, chunk)], dim=1)

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

    def _hvp(self, backend: str, v: torch.Tensor, b: int) -> torch.Tensor:
        """H_b v for batch b's mean loss; v of shape (dim,) or (c, dim) (c products, batched)."""
        batch = self.batches[b]
        batched = v.dim() == 2
        if backend == "forward_over_reverse":
            grad_fn = grad(lambda x: self._loss(self.space.assemble(x), batch))

            def tangent(u: torch.Tensor) -> torch.Tensor:
                return jvp(grad_fn, (self._x0,), (u,))[1]

            return vmap(tangent)(v) if batched else tangent(v)
        if b in self._graphs:
            x, g = self._graphs[b]
        else:
            x = self._x0.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(self._loss(self.space.assemble(x), batch), x, create_graph=True)
            if self.cache_graph:
                self._graphs[b] = (x, g)
        return torch.autograd.grad(
            g, x, grad_outputs=v, retain_graph=self.cache_graph, is_grads_batched=batched
        )[0]

    def _choose_backend(self, v: torch.Tensor) -> torch.Tensor:
        """Time both backends on the first batch, keep the faster (or the only one that runs)."""
        results = {}
        for backend in ("forward_over_reverse", "double_backward"):
            start = time.perf_counter()
            try:
                results[backend] = self._hvp(backend, v, 0)
            except (RuntimeError, NotImplementedError) as err:
                if backend == "double_backward":
                    raise
                warnings.warn(
                    f"forward-over-reverse HVP unavailable ({err}); using double backward", stacklevel=3
                )
                continue
            self.backend_timings[backend] = time.perf_counter() - start
        self.backend = min(self.backend_timings, key=self.backend_timings.get)
        if len(results) == 2:
            a, b = results.values()
            gap = float((a - b).norm() / b.norm().clamp_min(torch.finfo(b.dtype).tiny))
            if gap > 100 * torch.finfo(self.dtype).eps ** 0.5:
                warnings.warn(f"the two HVP backends disagree (relative gap {gap:.2e})", stacklevel=3)
        out = self.weights[0] * results[self.backend]
        for b in range(1, len(self.batches)):
            out = out + self.weights[b] * self._hvp(self.backend, v, b)
        return out


def hutchinson_diagonal(
    op: HessianOperator, num_probes: int = 10, seed: int = 0, chunk: int = 16
) -> torch.Tensor:
    """Unbiased estimate of diag(H): mean over Rademacher probes z of z ⊙ Hz (Bekas, Kokiopoulou & Saad,
    "An estimator for the diagonal of a matrix", Appl. Numer. Math. 2007); the curvature |h_i| of the
    exact Theorem 3 selection rule (SAM with ``curvature=diag``). ``num_probes`` products, ``chunk`` of
    them batched at a time through :meth:`HessianOperator.matmat`."""
    if num_probes < 1:
        raise ValueError(f"num_probes must be >= 1, got {num_probes}")
    gen = torch.Generator().manual_seed(seed)
    total = torch.zeros(op.dim, dtype=torch.float64)
    for start in range(0, num_probes, chunk):
        count = min(chunk, num_probes - start)
        z = torch.randint(0, 2, (op.dim, count), generator=gen, dtype=torch.float64) * 2 - 1
        total += (z * op.matmat(z.to(op.dtype)).double().cpu()).sum(dim=1)
    return (total / num_probes).to(op.dtype)
