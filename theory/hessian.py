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

``auto`` chooses, before the first product, only among backends that agree with double backward (the
reference: reverse mode is what ``torch.autograd.functional.hessian`` uses and what every kernel
implements): it applies both to one probe vector (Gaussian, seed 0, drawn on the CPU) on the first
batch, times them, and keeps forward-over-reverse only if its product is within √eps (dtype) of double
backward's, relative, *and* it was faster. A larger gap falls back to double backward with a warning:
some kernels' forward-mode derivatives differ from the reverse-mode convention (``nn.Embedding`` with
``padding_idx``: reverse mode zeroes the padding row's gradient, forward mode still propagates a tangent
through it, so forward-over-reverse gives a different, asymmetric matrix), and a missing forward-mode
derivative falls back too (fused SDPA attention kernels have none: load Hugging Face models with
``attn_implementation="eager"``, or call ``model.set_attn_implementation("eager")``; the error raised
otherwise says so). An explicitly chosen backend is used as it is.

Determinism: before its first measurement the operator evaluates the loss and gradient twice at x0, each
after ``model.eval()``, and raises :class:`theory.subspace.NondeterministicError` (a ``ValueError``) if
they differ (:func:`theory.subspace.check_deterministic`): a random eval-mode forward has no Hessian.

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

from theory.subspace import (
    LossFn,
    ParamsSpec,
    Subspace,
    batch_weights,
    check_deterministic,
    eval_mode,
    functional_loss,
    relative_gap,
)

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

    Attributes: ``dim`` (k), ``dtype``, ``device``, ``backend`` (resolved at the first product when
    "auto"), ``backend_timings`` (seconds per backend on the probe when "auto"), ``backend_gap``
    (relative gap of forward-over-reverse to double backward on the probe, None until measured),
    ``num_matvecs``.

    Raises (at the first product, gradient or loss): :class:`theory.subspace.NondeterministicError` when
    the eval-mode loss is random (module docstring).
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
        self.backend_gap: float | None = None
        self.num_matvecs = 0
        self._checked = False
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
        return self._apply(V.T).T

    def _apply(self, v: torch.Tensor) -> torch.Tensor:
        """Σ_b w_b H_b v for v of shape (dim,) or (c, dim); counts products; hints at eager attention."""
        w = v.detach().to(dtype=self.dtype, device=self.device)
        self._check_deterministic()
        try:
            with eval_mode(self.model):
                if self.backend is None:
                    self._choose_backend()
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
        self._check_deterministic()
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
        self._check_deterministic()
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
        gap = relative_gap(second, first)
        return DeterminismCheck(gap, gap <= rtol)

    # ------------------------------------------------------------------ internals
    def _check_deterministic(self) -> None:
        """Once, before the first measurement: the loss and gradient at x0 on the first batch must not
        change between two eval-mode evaluations (:func:`theory.subspace.check_deterministic`)."""
        if not self._checked:
            check_deterministic(self.model, self._loss, self.space, self._x0, self.batches[0])
            self._checked = True

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

    def _choose_backend(self) -> None:
        """``auto``: apply both backends to one probe vector on the first batch; keep forward-over-reverse
        only if it agrees with double backward within √eps (relative) and is faster (module docstring)."""
        probe = torch.randn(self.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        probe = probe.to(dtype=self.dtype, device=self.device)
        results = {}
        for backend in ("forward_over_reverse", "double_backward"):
            start = time.perf_counter()
            try:
                results[backend] = self._hvp(backend, probe, 0)
            except (RuntimeError, NotImplementedError) as err:
                if backend == "double_backward":
                    raise
                warnings.warn(
                    f"forward-over-reverse HVP unavailable ({err}); using double backward", stacklevel=4
                )
                continue
            self.backend_timings[backend] = time.perf_counter() - start
        self.backend = "double_backward"
        if "forward_over_reverse" in results:
            self.backend_gap = relative_gap(results["forward_over_reverse"], results["double_backward"])
            rtol = torch.finfo(self.dtype).eps ** 0.5
            if not self.backend_gap <= rtol:
                warnings.warn(
                    f"forward-over-reverse HVP disagrees with double backward on a probe vector (relative "
                    f"gap {self.backend_gap:.2e} > {rtol:.1e}): a kernel's forward-mode derivative differs "
                    "from its reverse mode (e.g. nn.Embedding with padding_idx); using double backward",
                    stacklevel=4,
                )
            elif self.backend_timings["forward_over_reverse"] < self.backend_timings["double_backward"]:
                self.backend = "forward_over_reverse"


def hutchinson_diagonal(op: Any, samples: int, seed: int, *, chunk: int = 1) -> torch.Tensor:
    """diag(H) ≈ (1/S) Σ_s v_s ⊙ (H v_s) with Rademacher probes v_s: the one Hutchinson diagonal estimator.

    Hutchinson (1990) for the trace; Bekas, Kokiopoulou & Saad, "An estimator for the diagonal of a
    matrix", Appl. Numer. Math. 57 (2007), Eq. 3. Unbiased: E[v vᵀ] = I gives E[v_i (Hv)_i] = H_ii; the
    variance of entry i is Σ_{j≠i} H_ij² / S, so the estimate is exact, for any S, when H is diagonal.

    Draws: v_s = 2·randint(0, 2, (op.dim,)) − 1, the s-th draw of one CPU ``torch.Generator`` seeded with
    ``seed``, i.e. row s of ``torch.randint(0, 2, (S, op.dim), generator=torch.Generator().manual_seed(seed))
    * 2 - 1``: the same probes on every device and for every ``chunk``.

    Args:
        op: a :class:`HessianOperator` on any subspace (or any operator with ``dim`` and ``matvec``;
            ``matmat`` when ``chunk`` > 1).
        samples: S ≥ 1, the number of probes (Hessian-vector products).
        seed: seed of the probes' generator.
        chunk: probes applied at once through ``op.matmat`` (memory grows with chunk · dim); the result
            does not depend on it.

    Returns:
        A 1-D tensor of length ``op.dim`` (op's dtype and device; accumulated in float64) in the operator's
        coordinate order. For a :class:`HessianOperator`, ``op.space.unflatten(d)`` maps it to
        ``{parameter name: tensor of the parameter's shape}`` (estimates at a mask's positions, 0
        elsewhere; whole tensors reshaped), ``op.space.split(d)`` to the flat per-tensor pieces.

    Example::

        >>> from theory.operators import DenseOperator
        >>> hutchinson_diagonal(DenseOperator(torch.diag(torch.tensor([1.0, -2.0, 3.0]))), samples=1, seed=0)
        tensor([ 1., -2.,  3.])
    """
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be an integer >= 1, got {samples!r}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be an integer >= 1, got {chunk!r}")
    dtype, device = getattr(op, "dtype", torch.float64), getattr(op, "device", "cpu")
    gen = torch.Generator().manual_seed(seed)
    total = torch.zeros(op.dim, dtype=torch.float64)
    for start in range(0, samples, chunk):
        count = min(chunk, samples - start)
        v = torch.randint(0, 2, (count, op.dim), generator=gen).to(torch.float64) * 2 - 1
        w = v.to(dtype=dtype, device=device)
        hv = op.matvec(w[0])[None] if count == 1 else op.matmat(w.T).T
        total += (v * hv.detach().to(device="cpu", dtype=torch.float64)).sum(dim=0)
    return (total / samples).to(dtype=dtype, device=device)
