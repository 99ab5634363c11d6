"""The p-sparse parametrisation shared by every mask method (DESIGN §1).

For each selected backbone tensor θ⁽ᵗ⁾ with flat index set I_t (|I_t| = k_t),

    θ⁽ᵗ⁾ = θ0⁽ᵗ⁾ + scatter(I_t, v_t),        v_t ∈ R^{k_t} trainable, θ0 frozen,

so ||θ − θ0||₀ ≤ Σ_t k_t by construction, the optimizer only ever sees the values v (its state
scales with the budget ⌊mp⌋, not with m), and no update, weight decay included, can move an entry
outside the mask. Weight decay on v pulls θ towards θ0 on the mask, the ||θ − θ0||² term of the
paper's relaxed objective.

**Storage.** The parametrisation is :mod:`torch.nn.utils.parametrize` (``module.weight`` stays an
ordinary tensor for the module's own code; names ``<module>.parametrizations.<attr>.original`` and
``...<attr>.0.values``). The ``original`` tensor holds θ itself, updated in place on I only: at
every forward, ``original[I] = θ0[I] + v`` (O(k)) with θ0[I] kept in the non-persistent buffer
``theta0_at`` (k entries, rebuilt from θ0 when a saved delta is loaded). Entries outside I are never written, so they stay θ0
bit-for-bit, and θ[I] is the same floating-point sum θ0[I] + v as ``index_add``. No dense copy of θ is
made per forward and no dense θ0 is kept besides the one tensor.

**Gradient of v** (∂L/∂v_j = ∂L/∂θ_{I_j}), by the op that consumes θ:

* ``nn.Linear`` weight, y = x Wᵀ + b over tokens t: ∂L/∂W_rc = Σ_t gy[t, r]·x[t, c]. Only the k entries
  (r_j, c_j) are formed, a sampled dense-dense product (SDDMM), while dx = gy·W stays dense; a
  SparseDelta bias gets ∂L/∂b_r = Σ_t gy[t, r] at its k rows. ``SparseDelta.linear_grad`` chooses:
  ``"kernel"`` (:func:`sparse_ft.kernels.sddmm_tokens`, which reads gy and x token-major as autograd
  hands them over), ``"sampled"`` (``torch.sparse.sampled_addmm`` with the CSR pattern of I, which
  needs gy and x transposed first), ``"dense"`` (form the dense dW with one GEMM, then gather), and
  ``"auto"`` = kernel on CPU (sampled where the kernel could not be built), dense on CUDA and inside
  ``torch.compile`` (a tensor-core GEMM of these sizes beats cuSPARSE's SDDMM; the compiler needs
  dense ops).
* ``nn.Embedding`` weight, y_t = W[ids_t]: ∂L/∂W_rc = Σ_{t: ids_t = r} gy[t, c] (0 on ``padding_idx``),
  summed per distinct id of the batch (sort, segment sums, binary search of the k rows): O(T·d + k log T)
  with static shapes, where the dense gradient would be a |vocab| × d tensor.
* anything else (biases under other modules, LayerNorm): the dense gradient the consumer forms,
  gathered at I (these tensors are small).

This path serves the module's own ``nn.Parameter`` values, i.e. training and evaluation. When the
values are substituted (``torch.func.functional_call``, as :mod:`theory` does) or a torch.func
transform is active, and whenever ``SparseDelta.fast_paths`` is False, θ is formed out of place as
``index_put(θ_stored, I, θ0[I] + v)``, the definition itself, which every autograd mode (double
backward, forward-over-reverse, vmap) differentiates; the in-place path is first-order only.
"""

from __future__ import annotations

import warnings
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError, check_choice
from .kernels import load_sddmm, sddmm_tokens

LINEAR_GRADS = ("auto", "kernel", "sampled", "dense")


class SparseDelta(nn.Module):
    """θ = θ0 + scatter(indices, values) on the flattened tensor: the parametrisation of one tensor,
    whose stored ``original`` holds θ (see the module docstring)."""

    fast_paths: ClassVar[bool] = True  # False: always the out-of-place definition (tests, debugging)
    linear_grad: ClassVar[str] = "auto"  # how a Linear weight's k gradient entries are formed

    def __init__(self, theta0: torch.Tensor, indices: torch.Tensor, values: torch.Tensor | None = None):
        """``indices`` (flat, distinct) are kept sorted, ``values`` (aligned with them, default 0) with them."""
        super().__init__()
        indices, order = torch.sort(indices.to(theta0.device, torch.long))
        if len(indices) > 1 and bool((indices[1:] == indices[:-1]).any()):
            raise UserError("a sparse delta's indices must be distinct")
        self.register_buffer("indices", indices)
        self.register_buffer("theta0_at", theta0.detach().reshape(-1)[indices].clone(), persistent=False)
        init = torch.zeros(len(indices), dtype=theta0.dtype, device=theta0.device) if values is None else values.to(theta0.device)[order]
        self.values = nn.Parameter(init.detach().to(theta0.device, theta0.dtype).clone())
        self._pattern = None  # (crow, col, zeros) of I's CSR pattern in a 2-D tensor, built on first use

    def fast(self) -> bool:
        """True when the in-place path applies: the module's own values, no torch.func transform."""
        if not self.fast_paths or type(self.values) is not nn.Parameter:
            return False
        return torch.compiler.is_compiling() or not torch._C._are_functorch_transforms_active()

    @torch.no_grad()
    def write(self, stored: torch.Tensor) -> torch.Tensor:
        """Make ``stored`` hold θ: ``stored[I] = θ0[I] + v``, at every forward; returns it.

        Writing every time (k entries, O(k)) is what makes every update path reach the forward: fused,
        foreach and for-loop optimizers, ``param.data`` edits and loaded state all change v without a
        reliable signal (a fused AdamW step does not bump v's version counter). The write goes through
        ``stored.data`` so that it does not bump the stored tensor's version either: a second forward
        before a backward (gradient accumulation) writes the same θ and must not invalidate the first
        forward's saved tensors. Inside ``torch.compile`` the write is an ordinary in-place op of the graph.
        """
        target = stored if torch.compiler.is_compiling() else stored.data
        target.view(-1).index_copy_(0, self.indices, self.theta0_at + self.values.detach())
        return stored

    @torch.no_grad()
    def restore(self, stored: torch.Tensor) -> None:
        """Put θ0 back into ``stored`` (before the parametrisation is removed)."""
        stored.view(-1).index_copy_(0, self.indices, self.theta0_at)

    def theta0(self, stored: torch.Tensor) -> torch.Tensor:
        """θ0 as a new dense tensor."""
        return stored.detach().clone().view(-1).index_copy_(0, self.indices, self.theta0_at).view_as(stored)

    def forward(self, stored: torch.Tensor) -> torch.Tensor:
        if not self.fast():  # the definition, out of place: differentiable in every autograd mode
            flat = stored.reshape(-1).index_put((self.indices,), self.theta0_at + self.values)
            return flat.view_as(stored)
        return _GatheredGrad.apply(self.write(stored), self.values, self.indices)

    def pattern(self, shape: torch.Size) -> torch.Tensor:
        """The CSR pattern (zero values) of I in a 2-D tensor of ``shape``: the SDDMM's sample set."""
        device, dtype = self.indices.device, _accumulation_dtype(self.values)  # the SDDMM's dtype
        if self._pattern is None or self._pattern[2].device != device or self._pattern[2].dtype != dtype:
            rows, cols = self.indices // shape[1], self.indices % shape[1]  # dense parts: deep-copyable
            crow = torch.zeros(shape[0] + 1, dtype=torch.long, device=device)
            crow[1:] = torch.bincount(rows, minlength=shape[0]).cumsum(0)
            self._pattern = (crow, cols, torch.zeros(len(cols), dtype=dtype, device=device))
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(*self._pattern, tuple(shape), check_invariants=False)

    def extra_repr(self) -> str:
        return f"k={len(self.indices)}"


class _GatheredGrad(torch.autograd.Function):
    """θ (the stored tensor, returned as a view) with ∂L/∂v = (∂L/∂θ).flat[I]."""

    @staticmethod
    def forward(ctx, stored, values, indices):
        ctx.save_for_backward(indices)
        ctx.dtype = values.dtype
        return stored.view_as(stored)

    @staticmethod
    def backward(ctx, grad):
        (indices,) = ctx.saved_tensors
        return None, grad.reshape(-1).index_select(0, indices).to(ctx.dtype), None


def _accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    """The wider of ``x``'s dtype and float32: bf16/fp16 gradients are summed in float32, float64 stays float64."""
    return torch.promote_types(x.dtype, torch.float32)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast would run a matmul in (x's own dtype outside autocast)."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class _SparseDeltaLinear(torch.autograd.Function):
    """y = x Wᵀ + b with W (and b) stored tensors that hold θ; returns dx = gy·W, the k entries
    ∂L/∂W_rc = Σ_t gy[t, r]·x[t, c] for W's values and Σ_t gy[t, r] for b's (see the module docstring).
    Under autocast, x, W and b are cast as ``F.linear`` would be."""

    @staticmethod
    def forward(ctx, x, weight, bias, w_values, w_indices, w_pattern, w_mode, b_values, b_indices):
        dtype = _compute_dtype(x)
        xc, wc = x.to(dtype), weight.to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            y = F.linear(xc, wc, None if bias is None else bias.to(dtype))
        ctx.save_for_backward(xc, wc, w_indices, w_pattern, b_indices)
        ctx.w_mode = w_mode
        ctx.dtypes = (x.dtype, None if bias is None else bias.dtype, w_values.dtype,
                      None if b_values is None else b_values.dtype)
        return y

    @staticmethod
    def backward(ctx, gy):
        xc, wc, w_indices, w_pattern, b_indices = ctx.saved_tensors
        x_dtype, bias_dtype, wv_dtype, bv_dtype = ctx.dtypes
        need = ctx.needs_input_grad
        gy2 = gy.reshape(-1, gy.shape[-1])
        dx = dbias = dwv = dbv = None
        if need[0]:
            dx = (gy2.to(wc.dtype) @ wc).view(xc.shape).to(x_dtype)
        if need[2]:
            dbias = gy2.sum(0).to(bias_dtype)
        if need[3]:
            x2 = xc.reshape(-1, xc.shape[-1])
            if ctx.w_mode == "kernel" and _accumulation_dtype(gy2) == torch.float32:  # the kernel is float32
                dwv = sddmm_tokens(gy2.float(), x2.float(), w_pattern.crow_indices(), w_pattern.col_indices())
            elif ctx.w_mode in ("kernel", "sampled"):
                dwv = _sampled_dw(w_pattern, gy2, x2)
            else:  # dense dW, then gathered
                dwv = (gy2.t() @ x2.to(gy2.dtype)).reshape(-1).index_select(0, w_indices)
            dwv = dwv.to(wv_dtype)
        if need[7]:
            dbv = gy2.index_select(1, b_indices).to(_accumulation_dtype(gy2)).sum(0).to(bv_dtype)
        return dx, None, dbias, dwv, None, None, None, dbv, None


SDDMM_CHUNK = 256  # tokens per chunk of the CPU SDDMM when torch runs on one thread


def _sampled_dw(pattern: torch.Tensor, gy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Σ_t gy[t, r_j]·x[t, c_j] at the CSR ``pattern``'s entries (``torch.sparse.sampled_addmm``).

    The CPU kernel reads gyᵀ and xᵀ row-major, so both are transposed (the dominant cost). On one
    thread this runs over chunks of ``SDDMM_CHUNK`` tokens, whose transposes and dot products stay in
    cache (measured ~6% off a MiniLM step); on several threads each chunk would be a parallel region
    of its own, which costs more than it saves on a busy machine, so the tokens go in one piece."""
    tokens, wide = gy.shape[0], _accumulation_dtype(gy)
    chunk = SDDMM_CHUNK if SDDMM_CHUNK and torch.get_num_threads() == 1 else tokens
    total = None
    for start in range(0, tokens, chunk):
        gy_t = _transposed(gy[start:start + chunk].to(wide))
        x_t = _transposed(x[start:start + chunk].to(wide))
        part = torch.sparse.sampled_addmm(pattern, gy_t, x_t.t(), beta=0.0).values()
        total = part if total is None else total.add_(part)
    return total


TRANSPOSE_BLOCK = 16  # tokens per block of the parallel transpose below
PARALLEL_TRANSPOSE_MAX_WIDTH = 512  # wider tensors: the serial blocked 2-D transpose is faster


def _transposed(a: torch.Tensor) -> torch.Tensor:
    """``a.t().contiguous()`` for a 2-D (tokens × features) tensor, on all of torch's threads where that
    is faster. ATen copies a 2-D transpose with a serial blocked kernel; viewed as (T/b, b, d) → (d, T/b, b)
    the same copy goes through the parallel TensorIterator path, measured 2× faster on 2 threads for
    d = 384 and slower for d = 1536 (the strided reads then leave the cache)."""
    tokens, width = a.shape
    if torch.get_num_threads() == 1 or width > PARALLEL_TRANSPOSE_MAX_WIDTH or tokens % TRANSPOSE_BLOCK:
        return a.t().contiguous()
    blocks = a.view(tokens // TRANSPOSE_BLOCK, TRANSPOSE_BLOCK, width).permute(2, 0, 1)
    return blocks.contiguous().view(width, tokens)


def _embedding_grad_at(ids: torch.Tensor, gy: torch.Tensor, indices: torch.Tensor, width: int,
                       padding_idx: int | None) -> torch.Tensor:
    """∂L/∂W at the flat ``indices`` of an embedding table W (``width`` columns), for y_t = W[ids_t]:
    Σ_{t: ids_t = r} gy[t, c] at (r, c); 0 on the padding row. Static shapes (no host sync)."""
    ids, grad = ids.reshape(-1).long(), gy.reshape(-1, width).to(_accumulation_dtype(gy))
    sorted_ids, order = torch.sort(ids)
    starts = torch.ones_like(sorted_ids, dtype=torch.bool)
    starts[1:] = sorted_ids[1:] != sorted_ids[:-1]
    segment = starts.cumsum(0) - 1  # which distinct id each sorted token has
    sums = torch.zeros_like(grad).index_add_(0, segment, grad.index_select(0, order))
    rows, cols = indices // width, indices % width
    first = torch.searchsorted(sorted_ids, rows).clamp_max(len(ids) - 1)  # first token with id ≥ row
    hit = sorted_ids[first] == rows
    if padding_idx is not None:
        hit &= rows != padding_idx
    return torch.where(hit, sums[segment[first], cols], 0.0)


class _SparseDeltaEmbedding(torch.autograd.Function):
    """y = W[ids] with W a stored tensor that holds θ; W's values get :func:`_embedding_grad_at`."""

    @staticmethod
    def forward(ctx, ids, weight, values, indices, padding_idx):
        ctx.save_for_backward(ids, indices)
        ctx.meta = (weight.shape[1], padding_idx, values.dtype)
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, gy):
        ids, indices = ctx.saved_tensors
        width, padding_idx, dtype = ctx.meta
        return None, None, _embedding_grad_at(ids, gy, indices, width, padding_idx).to(dtype), None, None


def delta_of(module: nn.Module, attr: str) -> SparseDelta | None:
    """The SparseDelta parametrising ``module.<attr>``, if that is how it is parametrised."""
    lists = module.parametrizations
    if attr in lists and isinstance(lists[attr][0], SparseDelta):
        return lists[attr][0]
    return None


def _linear_grad(device: torch.device) -> str:
    mode = SparseDelta.linear_grad
    check_choice("SparseDelta.linear_grad", mode, LINEAR_GRADS)
    if mode == "kernel" and load_sddmm() is None:
        raise UserError("SparseDelta.linear_grad = 'kernel' needs the CPU SDDMM kernel, which could not be "
                        "built (see the warning above); use 'sampled'")
    if mode != "auto":
        return mode
    if device.type != "cpu" or torch.compiler.is_compiling():
        return "dense"
    return "kernel" if load_sddmm() is not None else "sampled"


def _linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``nn.Linear.forward`` of a Linear whose weight has a SparseDelta (see the module docstring)."""
    w = delta_of(self, "weight")
    if w is None or not w.fast():
        return F.linear(x, self.weight, self.bias)
    weight = w.write(self.parametrizations.weight.original)
    mode = _linear_grad(weight.device)
    pattern = None if mode == "dense" else w.pattern(weight.shape)
    b = delta_of(self, "bias")
    if b is None or not b.fast():  # a plain bias (or None), or one on the definition's path
        return _SparseDeltaLinear.apply(x, weight, self.bias, w.values, w.indices, pattern, mode, None, None)
    bias = b.write(self.parametrizations.bias.original)
    return _SparseDeltaLinear.apply(x, weight, bias, w.values, w.indices, pattern, mode, b.values, b.indices)


def _embedding_forward(self: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
    """``nn.Embedding.forward`` of an Embedding whose weight has a SparseDelta."""
    w = delta_of(self, "weight")
    if w is None or not w.fast() or self.max_norm is not None or self.scale_grad_by_freq or self.sparse:
        return nn.Embedding.forward(self, ids)
    weight = w.write(self.parametrizations.weight.original)
    return _SparseDeltaEmbedding.apply(ids, weight, w.values, w.indices, self.padding_idx)


SPARSE_FORWARDS = {nn.Linear: _linear_forward, nn.Embedding: _embedding_forward}


def use_sparse_forward(module: nn.Module) -> None:
    """Give a parametrised Linear or Embedding the forward above. ``parametrize`` made a class for this
    module alone (its base is the module's own class), so setting it there changes no other module; the
    override goes with that class when the module is un-parametrised. Modules whose class overrides
    ``forward`` keep it."""
    own_class = type(module).__bases__[0]
    for kind, forward in SPARSE_FORWARDS.items():
        if isinstance(module, kind) and own_class.forward is kind.forward:
            type(module).forward = forward


