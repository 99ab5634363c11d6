"""The p-sparse parametrisation shared by every mask method (DESIGN §1).

For each selected backbone tensor θ⁽ᵗ⁾ with flat index set I_t (|I_t| = k_t),

    θ⁽ᵗ⁾ = θ0⁽ᵗ⁾ + scatter(I_t, v_t),        v_t ∈ R^{k_t} trainable, θ0 frozen,

so ||θ − θ0||₀ ≤ Σ_t k_t by construction, the optimizer only ever sees the values v (its state
scales with the budget ⌊mp⌋, not with m), and no update, weight decay included, can move an entry
outside the mask. Weight decay on v pulls θ towards θ0 on the mask, the ||θ − θ0||² term of the
paper's relaxed objective.

**Storage.** The parametrisation is :mod:`torch.nn.utils.parametrize` (``module.weight`` stays an
ordinary tensor for the module's own code; names ``<module>.parametrizations.<attr>.original`` and
``...<attr>.0.values``). The ``original`` tensor holds θ itself, updated in place on I only: before
a forward, wherever v changed since the last write, ``original[I] = θ0[I] + v`` with θ0[I] kept in
the buffer ``theta0_at`` (k entries). Entries outside I are never written, so they stay θ0
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

import copy
import hashlib
import json
import warnings
import weakref
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils import parametrize

from .errors import UserError, check_range
from .kernels import load_sddmm, sddmm_tokens
from .methods.base import BuildContext, MethodConfig, SparsityReport, TunedModel, get_method
from .models import TaskModel
from .parametrized import unparametrize_copy

SCOPES = ("per_tensor", "global")
INDEX_PREFIX = "indices/"
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
        self.register_buffer("theta0_at", theta0.detach().reshape(-1)[indices].clone())
        init = torch.zeros(len(indices), dtype=theta0.dtype, device=theta0.device) if values is None else values.to(theta0.device)[order]
        self.values = nn.Parameter(init.detach().to(theta0.device, theta0.dtype).clone())
        self._written = None  # (weakref to the values written into the stored tensor, their version)
        self._pattern = None  # (crow, col, zeros) of I's CSR pattern in a 2-D tensor, built on first use

    def fast(self) -> bool:
        """True when the in-place path applies: the module's own values, no torch.func transform."""
        if not self.fast_paths or type(self.values) is not nn.Parameter:
            return False
        return torch.compiler.is_compiling() or not torch._C._are_functorch_transforms_active()

    @torch.no_grad()
    def write(self, stored: torch.Tensor) -> torch.Tensor:
        """Make ``stored`` hold θ: ``stored[I] = θ0[I] + v`` if v changed since the last write
        (always inside ``torch.compile``, where the write becomes part of the graph); returns it."""
        values, last, compiling = self.values, self._written, torch.compiler.is_compiling()
        if compiling or last is None or last[0]() is not values or last[1] != values._version:
            stored.view(-1).index_copy_(0, self.indices, self.theta0_at + values)
            if not compiling:
                self._written = (weakref.ref(values), values._version)
        return stored

    @torch.no_grad()
    def restore(self, stored: torch.Tensor) -> None:
        """Put θ0 back into ``stored`` (before the parametrisation is removed)."""
        stored.view(-1).index_copy_(0, self.indices, self.theta0_at)
        self._written = None

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
        device = self.indices.device
        if self._pattern is None or self._pattern[0].device != device:  # dense parts: deep-copyable
            rows, cols = self.indices // shape[1], self.indices % shape[1]
            crow = torch.zeros(shape[0] + 1, dtype=torch.long, device=device)
            crow[1:] = torch.bincount(rows, minlength=shape[0]).cumsum(0)
            self._pattern = (crow, cols, torch.zeros(len(cols), device=device))
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
            if ctx.w_mode == "kernel":
                dwv = sddmm_tokens(gy2.float(), x2.float(), w_pattern.crow_indices(), w_pattern.col_indices())
            elif ctx.w_mode == "sampled":
                dwv = _sampled_dw(w_pattern, gy2, x2)
            else:  # dense dW, then gathered
                dwv = (gy2.t() @ x2.to(gy2.dtype)).reshape(-1).index_select(0, w_indices)
            dwv = dwv.to(wv_dtype)
        if need[7]:
            dbv = gy2.index_select(1, b_indices).float().sum(0).to(bv_dtype)
        return dx, None, dbias, dwv, None, None, None, dbv, None


SDDMM_CHUNK = 256  # tokens per chunk of the CPU SDDMM when torch runs on one thread


def _sampled_dw(pattern: torch.Tensor, gy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Σ_t gy[t, r_j]·x[t, c_j] at the CSR ``pattern``'s entries (``torch.sparse.sampled_addmm``).

    The CPU kernel reads gyᵀ and xᵀ row-major, so both are transposed (the dominant cost). On one
    thread this runs over chunks of ``SDDMM_CHUNK`` tokens, whose transposes and dot products stay in
    cache (measured ~6% off a MiniLM step); on several threads each chunk would be a parallel region
    of its own, which costs more than it saves on a busy machine, so the tokens go in one piece."""
    tokens = gy.shape[0]
    chunk = SDDMM_CHUNK if SDDMM_CHUNK and torch.get_num_threads() == 1 else tokens
    total = None
    for start in range(0, tokens, chunk):
        gy_t = _transposed(gy[start:start + chunk].float())
        x_t = _transposed(x[start:start + chunk].float())
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
    ids, grad = ids.reshape(-1).long(), gy.reshape(-1, width).float()
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


def _delta_of(module: nn.Module, attr: str) -> SparseDelta | None:
    """The SparseDelta parametrising ``module.<attr>``, if that is how it is parametrised."""
    lists = module.parametrizations
    if attr in lists and isinstance(lists[attr][0], SparseDelta):
        return lists[attr][0]
    return None


def _linear_grad(device: torch.device) -> str:
    mode = SparseDelta.linear_grad
    if mode not in LINEAR_GRADS:
        raise UserError(f"SparseDelta.linear_grad must be one of {LINEAR_GRADS}, got {mode!r}")
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
    w = _delta_of(self, "weight")
    if w is None or not w.fast():
        return F.linear(x, self.weight, self.bias)
    weight = w.write(self.parametrizations.weight.original)
    mode = _linear_grad(weight.device)
    pattern = None if mode == "dense" else w.pattern(weight.shape)
    b = _delta_of(self, "bias")
    if b is None or not b.fast():  # a plain bias (or None), or one on the definition's path
        return _SparseDeltaLinear.apply(x, weight, self.bias, w.values, w.indices, pattern, mode, None, None)
    bias = b.write(self.parametrizations.bias.original)
    return _SparseDeltaLinear.apply(x, weight, bias, w.values, w.indices, pattern, mode, b.values, b.indices)


def _embedding_forward(self: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
    """``nn.Embedding.forward`` of an Embedding whose weight has a SparseDelta."""
    w = _delta_of(self, "weight")
    if w is None or not w.fast() or self.max_norm is not None or self.scale_grad_by_freq or self.sparse:
        return nn.Embedding.forward(self, ids)
    weight = w.write(self.parametrizations.weight.original)
    return _SparseDeltaEmbedding.apply(ids, weight, w.values, w.indices, self.padding_idx)


SPARSE_FORWARDS = {nn.Linear: _linear_forward, nn.Embedding: _embedding_forward}


def _use_sparse_forward(module: nn.Module) -> None:
    """Give a parametrised Linear or Embedding the forward above. ``parametrize`` made a class for this
    module alone (its base is the module's own class), so setting it there changes no other module; the
    override goes with that class when the module is un-parametrised. Modules whose class overrides
    ``forward`` keep it."""
    own_class = type(module).__bases__[0]
    for kind, forward in SPARSE_FORWARDS.items():
        if isinstance(module, kind) and own_class.forward is kind.forward:
            type(module).forward = forward


def budget_for(numel: int, sparsity: float) -> int:
    """⌊p·numel⌋, the number of entries a p-sparse tensor (or model) may change."""
    return int(sparsity * numel)


def check_scope(scope: str) -> None:
    if scope not in SCOPES:
        raise UserError(f"scope must be one of {SCOPES}, got {scope!r}")


def scope_budget(numels: list[int], sparsity: float, scope: str) -> int:
    """The budget of a selection: Σ_t ⌊p·numel_t⌋ (``per_tensor``) or ⌊p·m⌋, m = Σ_t numel_t (``global``)."""
    check_scope(scope)
    if scope == "global":
        return budget_for(sum(numels), sparsity)
    return sum(budget_for(n, sparsity) for n in numels)


def _flat_scores(score: torch.Tensor) -> torch.Tensor:
    """Scores keep their floating dtype (float64 scores, e.g. random ones, then have no ties)."""
    flat = score.detach().reshape(-1)
    return flat if flat.is_floating_point() else flat.float()


def select_top_k(scores: dict[str, torch.Tensor], sparsity: float,
                 scope: str = "per_tensor") -> dict[str, torch.Tensor]:
    """Flat indices of the highest scores: the top ⌊p·numel⌋ of each tensor (``per_tensor``) or the
    top ⌊p·m⌋ over all tensors together (``global``, m = Σ numel). Ties break arbitrarily but
    deterministically; the indices of each tensor come sorted."""
    check_range("sparsity", sparsity, 0.0, 1.0, low_open=True)
    check_scope(scope)
    if scope == "per_tensor":
        chosen = {}
        for name, score in scores.items():
            k = budget_for(score.numel(), sparsity)
            if k:
                chosen[name] = torch.topk(_flat_scores(score), k, sorted=False).indices.sort().values
        return chosen
    names = list(scores)
    flat = torch.cat([_flat_scores(scores[n]) for n in names])
    k = budget_for(flat.numel(), sparsity)
    top = torch.topk(flat, k, sorted=False).indices.sort().values
    offsets = torch.tensor([0] + [scores[n].numel() for n in names]).cumsum(0)
    chosen = {}
    for i, name in enumerate(names):
        lo, hi = int(offsets[i]), int(offsets[i + 1])
        part = top[(top >= lo) & (top < hi)] - lo
        if len(part):
            chosen[name] = part
    return chosen


def _owner(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    module_name, _, attr = name.rpartition(".")
    return (root.get_submodule(module_name) if module_name else root), attr


def backbone_fingerprint(backbone: nn.Module) -> str:
    """A hash of θ0's identity: names, shapes and a few values of every backbone tensor."""
    digest = hashlib.sha256()
    for name, tensor in backbone.state_dict().items():
        if not tensor.is_floating_point():
            continue
        flat = tensor.detach().reshape(-1)
        probe = torch.cat([flat[:8], flat[-8:]]).double().cpu()
        digest.update(f"{name}{tuple(tensor.shape)}{float(flat.double().sum()):.6e}".encode())
        digest.update(probe.numpy().tobytes())
    return digest.hexdigest()[:16]


class SparseDeltaTuned(TunedModel):
    """A task model whose backbone changes only on given flat index sets (one per tensor).

    ``indices`` maps backbone parameter names (``encoder.layer.0.attention.self.query.weight``) to
    flat int64 indices; ``budget`` is what the method was allowed (⌊p·m⌋ or Σ⌊p·numel⌋).
    """

    def __init__(self, model: TaskModel, config: MethodConfig, indices: dict[str, torch.Tensor], budget: int):
        super().__init__(model, config)
        self.budget = budget
        self.fingerprint = backbone_fingerprint(model.backbone)
        model.backbone.requires_grad_(False)
        model.head.requires_grad_(True)
        self._orders = {name: [n for n, _ in module.named_parameters(recurse=False)]  # for the merge
                        for name, module in model.backbone.named_modules()}
        self._deltas: dict[str, SparseDelta] = {}
        self.set_indices(indices)

    # -------------------------------------------------------------- the index sets
    def indices(self) -> dict[str, torch.Tensor]:
        return {name: delta.indices for name, delta in self._deltas.items()}

    def theta0(self, name: str) -> torch.Tensor:
        """θ0 of a parametrised backbone tensor: the frozen original under the parametrisation (a new
        tensor for a SparseDelta, whose stored tensor holds θ)."""
        module, attr = _owner(self.model.backbone, name)
        stored, delta = module.parametrizations[attr].original, _delta_of(module, attr)
        return stored if delta is None else delta.theta0(stored)

    def _attach(self, name: str, parametrization: nn.Module) -> None:
        """Parametrise backbone tensor ``name`` by ``parametrization(θ0)``; θ0 stays frozen."""
        module, attr = _owner(self.model.backbone, name)
        parametrize.register_parametrization(module, attr, parametrization)
        module.parametrizations[attr].original.requires_grad_(False)
        if isinstance(parametrization, SparseDelta):
            _use_sparse_forward(module)

    def _detach(self, name: str) -> None:
        """Remove the parametrisation of ``name``: the tensor is θ0 again, frozen."""
        module, attr = _owner(self.model.backbone, name)
        delta = _delta_of(module, attr)
        if delta is not None:
            delta.restore(module.parametrizations[attr].original)
        parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
        getattr(module, attr).requires_grad_(False)

    def reset_storage(self) -> None:
        """Make every stored tensor hold θ0 again; the values are kept, and the next forward on the fast
        path writes θ back. Needed where the values are substituted (``functional_call``), whose
        out-of-place definition reads θ0 from the stored tensor outside the substituted indices."""
        for name, delta in self._deltas.items():
            module, attr = _owner(self.model.backbone, name)
            delta.restore(module.parametrizations[attr].original)

    def dense_delta(self, name: str) -> torch.Tensor:
        """θ − θ0 of one tensor, dense."""
        delta = self._deltas[name]
        theta0 = self.theta0(name)
        return torch.zeros(theta0.numel(), dtype=delta.values.dtype, device=theta0.device).index_add_(
            0, delta.indices, delta.values.detach()).view_as(theta0)

    def set_indices(self, indices: dict[str, torch.Tensor],
                    values: dict[str, torch.Tensor] | None = None) -> None:
        """Project onto new index sets: entries that stay keep their values, entries that leave the
        mask return to θ0, new entries start at θ0 (DESIGN §5, the projection of ChildPruning and
        DiffPruning), unless ``values`` gives a tensor's new values (aligned with its indices).
        The trainer must rebuild its optimizer afterwards."""
        backbone = self.model.backbone
        params = dict(backbone.named_parameters())
        unknown = set(indices) - set(params) - set(self._deltas)
        if unknown:
            raise UserError(f"mask names tensors the backbone does not have: {sorted(unknown)[:3]}")
        kept = {}
        for name in list(self._deltas):
            kept[name] = self.dense_delta(name).reshape(-1)
            self._detach(name)
        self._deltas = {}
        for name, idx in indices.items():
            module, attr = _owner(backbone, name)
            theta0 = getattr(module, attr)
            idx = idx.to(theta0.device, torch.long)
            if len(idx) and (int(idx.max()) >= theta0.numel() or int(idx.min()) < 0):
                raise UserError(f"mask indices out of range for {name} ({theta0.numel()} entries)")
            if values is not None and name in values:
                start = values[name].to(theta0.device, theta0.dtype)
            else:
                start = kept[name][idx] if name in kept else None
            delta = SparseDelta(theta0, idx, start)
            self._attach(name, delta)
            self._deltas[name] = delta

    # -------------------------------------------------------------- accounting
    @torch.no_grad()
    def changed_count(self) -> int:
        """Σ_t #{i ∈ I_t : θ_i ≠ θ0_i}, by exact comparison (entries outside I_t are θ0 by construction)."""
        total = 0
        for name, delta in self._deltas.items():
            module, attr = _owner(self.model.backbone, name)
            theta = getattr(module, attr).reshape(-1)[delta.indices]
            total += int((theta != delta.theta0_at).sum())
        return total

    def sparsity_report(self) -> SparsityReport:
        return SparsityReport(backbone_params=self.backbone_params, budget=self.budget,
                              changed=self.changed_count(), trainable=self.trainable_param_count(),
                              head_params=self.head_param_count())

    # -------------------------------------------------------------- merge, save, load
    def merge_into_dense(self) -> TaskModel:
        """A plain TaskModel with θ = θ0 + scatter(I, v) written into its tensors, in the pretrained
        parameter order (parametrisations are evaluated in eval mode, so a stochastic one gives its
        deterministic value)."""
        merged = copy.deepcopy(self.model)
        merged.eval()
        for name, module in merged.backbone.named_modules():
            if parametrize.is_parametrized(module):
                unparametrize_copy(module, self._orders.get(name))
        return merged.train(self.model.training)

    def save(self, path: str, values: bool = True) -> None:
        """safetensors: indices (and values and the absolute head), the method config, θ0's fingerprint."""
        tensors = {f"{INDEX_PREFIX}{n}": d.indices.cpu().contiguous() for n, d in self._deltas.items()}
        if values:
            tensors.update({f"values/{n}": d.values.detach().cpu().contiguous()
                            for n, d in self._deltas.items()})
            tensors.update({f"head/{n}": p.detach().cpu().contiguous()
                            for n, p in self.model.head.state_dict().items()})
        metadata = {"method": json.dumps(self.config.to_dict()), "fingerprint": self.fingerprint,
                    "budget": str(self.budget), "backbone_params": str(self.backbone_params)}
        save_file(tensors, path, metadata=metadata)


def _read(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
        return load_file(path), metadata
    except (OSError, FileNotFoundError):
        raise UserError(f"cannot read mask file {path!r}") from None
    except Exception as exc:  # noqa: BLE001 - a corrupt file is one clear line
        raise UserError(f"{path!r} is not a sparse-ft mask file ({type(exc).__name__})") from None


def _check_base(path: str, metadata: dict, model: TaskModel) -> None:
    expected = metadata.get("fingerprint")
    actual = backbone_fingerprint(model.backbone)
    if expected != actual:
        raise UserError(f"{path!r} was made for another base model "
                        f"(fingerprint {expected}, this one {actual})")


def load_sparse_delta(path: str, model: TaskModel) -> SparseDeltaTuned:
    """Rebuild a saved tuned model (indices, values, head) on ``model``; refuses a different base."""
    tensors, metadata = _read(path)
    _check_base(path, metadata, model)
    config = _saved_config(metadata)
    indices = {k[len(INDEX_PREFIX):]: v for k, v in tensors.items() if k.startswith(INDEX_PREFIX)}
    tuned = SparseDeltaTuned(model, config, indices, int(metadata["budget"]))
    with torch.no_grad():
        for name, delta in tuned._deltas.items():
            if f"values/{name}" in tensors:
                delta.values.copy_(tensors[f"values/{name}"])
        head = {k[len("head/"):]: v for k, v in tensors.items() if k.startswith("head/")}
        if head:
            model.head.load_state_dict(head)
    return tuned


def _saved_config(metadata: dict) -> MethodConfig:
    config_dict = json.loads(metadata["method"])
    return get_method(config_dict.pop("name"))(**config_dict)


def load_mask_into(path: str, model: TaskModel, config: MethodConfig) -> SparseDeltaTuned:
    """Train-from-mask: the index sets of a saved mask on ``model``, values at 0, the run's own head.

    The tuned model carries the config the mask was selected with (its sparsity, scope, options);
    a mask of another method than ``config``'s is refused.
    """
    tensors, metadata = _read(path)
    _check_base(path, metadata, model)
    saved = _saved_config(metadata)
    if saved.name != config.name:
        raise UserError(f"{path!r} holds a {saved.name!r} mask, not a {config.name!r} one; "
                        f"pass --method {saved.name}")
    indices = {k[len(INDEX_PREFIX):]: v for k, v in tensors.items() if k.startswith(INDEX_PREFIX)}
    return SparseDeltaTuned(model, saved, indices, int(metadata["budget"]))


@dataclass
class MaskMethodConfig(MethodConfig):
    """Base of the mask methods: a scorer over backbone tensors, then the top ⌊p·numel⌋ per tensor
    (``scope="per_tensor"``) or the top ⌊p·m⌋ overall (``scope="global"``)."""

    sparsity: float | None = 0.005
    scope: str = "per_tensor"

    def __post_init__(self):
        check_scope(self.scope)

    def score(self, model: TaskModel, context: BuildContext) -> dict[str, torch.Tensor]:
        """One score per backbone entry, for every backbone tensor; higher means more worth tuning."""
        raise NotImplementedError

    def select_from_scores(self, scores: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
        """The top-k index sets of ``scores`` (one tensor per backbone tensor) and their budget."""
        indices = select_top_k(scores, self.sparsity, self.scope)
        return indices, scope_budget([s.numel() for s in scores.values()], self.sparsity, self.scope)

    def select(self, model: TaskModel, context: BuildContext) -> tuple[dict[str, torch.Tensor], int]:
        """The index sets and the budget they were chosen under."""
        return self.select_from_scores(self.score(model, context))

    def build(self, model: TaskModel, context: BuildContext) -> SparseDeltaTuned:
        indices, budget = self.select(model, context)
        return SparseDeltaTuned(model, self, indices, budget)


# Imported before sparse_ft.methods, this module made the package defer its method modules (the mask
# methods subclass the classes above); import them now. See sparse_ft/methods/__init__.py.
from . import methods as _methods

if _methods.deferred:
    _methods.import_method_modules()
