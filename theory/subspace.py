"""The tunable coordinates of a module, gathered into one flat vector, and the batch plumbing.

A p-sparse fine-tuned model changes only k of the backbone's m entries (Fu et al., AAAI 2023, §3):
θ = θ0 + scatter(mask, values). Every instrument in :mod:`theory` (Hessian, ρ, influence) works on
that k-vector, never on the masked full space, whose (1-p)m exact zeros would pin λmin at 0.

``params`` describes the coordinates, in one of three forms:

* ``None``: every parameter with ``requires_grad`` (in ``model.named_parameters()`` order);
* a list of parameter names: those tensors, whole, in the given order;
* a dict ``name -> bool mask`` (mask of the parameter's shape; ``True`` = tunable; ``None`` = the whole
  tensor, e.g. a task head): the selected entries of each tensor, in the dict's order and row-major
  order within a tensor.

Tied weights: a tensor reachable under several names (``decoder.weight`` set to ``embeddings.weight``,
or one submodule registered as two attributes) is one set of coordinates, listed under the name
``model.named_parameters()`` gives it (the first one); ``params`` may use any of its names, but only one.
:func:`functional_loss` substitutes such a tensor at every place it is held, each place once, so the
model is left exactly as it was (``torch.func.functional_call``'s own tie handling swaps a module
registered twice two times and restores the wrong tensor).

Example::

    space = Subspace(model, {"classifier.weight": torch.ones(3, 8, dtype=torch.bool)})
    x = space.gather()                       # current values, length space.dim == 24
    tensors = space.assemble(x)              # full tensors for torch.func.functional_call
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

ParamsSpec = None | Sequence[str] | Mapping[str, torch.Tensor]
LossFn = Callable[[nn.Module, Any], torch.Tensor]


class Subspace:
    """Bookkeeping for k tunable coordinates of ``model`` (see the module docstring for ``params``).

    ``assemble(x)`` returns, for every parameter of the model, the tensor to use in a functional call:
    tunable tensors are rebuilt from ``x`` (masked ones as the frozen tensor with ``x`` written at the
    mask, ``index_put`` on the flattened tensor), all others are detached, so autograd and torch.func
    differentiate with respect to ``x`` only.
    """

    def __init__(self, model: nn.Module, params: ParamsSpec = None):
        named = dict(model.named_parameters())
        if params is None:
            items: list[tuple[str, torch.Tensor | None]] = [
                (n, None) for n, p in named.items() if p.requires_grad
            ]
        elif isinstance(params, Mapping):
            items = list(params.items())
        elif isinstance(params, (str, bytes)) or not isinstance(params, Sequence):
            raise TypeError("params must be None, a list of parameter names or a dict name -> bool mask")
        else:
            items = [(n, None) for n in params]
        if not items:
            raise ValueError("no tunable parameters: params selects nothing")
        canonical = canonical_names(model)
        unknown = [n for n, _ in items if n not in canonical]
        if unknown:
            raise KeyError(f"unknown parameter names {unknown}; the model has e.g. {list(named)[:5]}")
        spec = {canonical[n]: mask for n, mask in items}
        if len(spec) != len(items):
            raise ValueError(
                "params names a parameter twice (tied weights count once: use one of their names)"
            )

        self.names: list[str] = list(spec)
        self.shapes: list[torch.Size] = [named[n].shape for n in self.names]
        self.indices: list[torch.Tensor | None] = []
        for name in self.names:
            mask = spec[name]
            if mask is None:
                self.indices.append(None)
                continue
            mask = torch.as_tensor(mask)
            if mask.dtype != torch.bool or mask.shape != named[name].shape:
                raise ValueError(
                    f"mask for {name!r} must be a bool tensor of shape {tuple(named[name].shape)}, "
                    f"got {mask.dtype} {tuple(mask.shape)}"
                )
            self.indices.append(mask.reshape(-1).nonzero().squeeze(1).to(named[name].device))
        self.sizes = [
            p.numel() if idx is None else idx.numel()
            for p, idx in zip((named[n] for n in self.names), self.indices)
        ]
        self.dim = sum(self.sizes)
        if self.dim == 0:
            raise ValueError("the masks select no entry: the tunable subspace is empty")
        dtypes = {named[n].dtype for n in self.names}
        if len(dtypes) != 1:
            raise ValueError(f"tunable parameters mix dtypes {dtypes}; cast the model first")
        self.dtype = dtypes.pop()
        self.device = named[self.names[0]].device
        self._model = model

    def gather(self, state: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The k-vector of current values (or of ``state``, e.g. a checkpoint's state dict)."""
        source = self._base(state)
        chunks = []
        for name, idx in zip(self.names, self.indices):
            flat = source[name].detach().reshape(-1)
            chunks.append(flat if idx is None else flat[idx])
        return torch.cat(chunks)

    def assemble(self, x: torch.Tensor, state: Mapping[str, torch.Tensor] | None = None) -> dict:
        """Parameter tensors (keyed by name) with the tunable coordinates taken from ``x``; with a
        ``state`` (checkpoint), its other parameters and its buffers are used too."""
        base = self._base(state)
        tensors = {n: t.detach() for n, t in base.items()}
        if state is not None:
            tensors.update({n: state[n] for n, _ in self._model.named_buffers() if n in state})
        for name, shape, idx, chunk in zip(self.names, self.shapes, self.indices, x.split(self.sizes)):
            if idx is None:
                tensors[name] = chunk.view(shape)
            else:
                tensors[name] = base[name].detach().reshape(-1).index_put((idx,), chunk).view(shape)
        return tensors

    def split(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The k-vector cut into per-tensor pieces (flat), keyed by parameter name."""
        return dict(zip(self.names, x.split(self.sizes)))

    def unflatten(self, x: torch.Tensor, fill: float = 0.0) -> dict[str, torch.Tensor]:
        """The k-vector as full tensors keyed by parameter name: each of the parameter's shape, with
        ``x``'s entries at the tunable positions (row-major within the mask) and ``fill`` elsewhere
        (a whole tensor is just reshaped). Dtype and device of ``x``."""
        out = {}
        for name, shape, idx, chunk in zip(self.names, self.shapes, self.indices, x.split(self.sizes)):
            if idx is None:
                out[name] = chunk.reshape(shape)
            else:
                flat = torch.full((shape.numel(),), fill, dtype=x.dtype, device=x.device)
                out[name] = flat.index_put((idx.to(x.device),), chunk).view(shape)
        return out

    def _base(self, state: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        tensors = dict(self._model.named_parameters())
        if state is None:
            return tensors
        return {
            n: state[n].to(device=t.device, dtype=t.dtype) if n in state else t for n, t in tensors.items()
        }


class _LossModule(nn.Module):
    """``forward(batch) = loss_fn(model, batch)``, so that ``functional_call`` can swap the model's
    parameters while ``loss_fn`` still sees the real module (its config, helpers and buffers)."""

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> torch.Tensor:
        return self.loss_fn(self.model, batch)


def canonical_names(model: nn.Module) -> dict[str, str]:
    """Every name of every parameter and buffer (``remove_duplicate=False``) -> the name
    ``named_parameters()`` / ``named_buffers()`` give that tensor (its first name)."""
    out = {}
    for members in (model.named_parameters, model.named_buffers):
        first = {id(t): n for n, t in members()}
        out.update({n: first[id(t)] for n, t in members(remove_duplicate=False)})
    return out


def _places(model: nn.Module) -> dict[str, list[str]]:
    """Canonical name -> one name per distinct place (owning module, attribute) that holds the tensor.

    A module registered under two names holds its tensors in one place (listed once); a tensor tied
    between two modules is held in two places (listed twice)."""
    places: dict[str, list[str]] = {}
    seen: set[tuple[int, str]] = set()
    for name, canonical in canonical_names(model).items():
        path, _, attr = name.rpartition(".")
        key = (id(model.get_submodule(path)), attr)
        if key not in seen:
            seen.add(key)
            places.setdefault(canonical, []).append(name)
    return places


def functional_loss(model: nn.Module, loss_fn: LossFn) -> Callable[[dict, Any], torch.Tensor]:
    """``f(tensors, batch)``: ``loss_fn(model, batch)`` evaluated with the parameters in ``tensors``
    (keyed by canonical name, as :meth:`Subspace.assemble` returns them), the model left as it was.

    Each tensor is substituted at every place that holds it, each place exactly once
    (``functional_call(..., tie_weights=False)`` with the places spelled out): see the module docstring
    on tied weights."""
    wrapper = _LossModule(model, loss_fn)
    places = _places(model)

    def f(tensors: dict, batch: Any) -> torch.Tensor:
        swap = {"model." + place: t for n, t in tensors.items() for place in places.get(n, [n])}
        return functional_call(wrapper, swap, (batch,), tie_weights=False)

    return f


def default_batch_size(batch: Any) -> int:
    """Number of examples in a batch: the first dimension of the tensor, or of the first tensor value
    of a dict / first tensor element of a tuple or list."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    values = (
        batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ()
    )
    for value in values:
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    raise TypeError(
        f"cannot find the batch size of a {type(batch).__name__}: pass batch_size_fn=lambda batch: ..."
    )


def batch_weights(batches: Sequence[Any], batch_size_fn: Callable[[Any], int] | None) -> list[float]:
    """w_b = n_b / Σ n_b, so that Σ_b w_b·mean_loss_b is the mean loss over all examples."""
    if len(batches) == 0:
        raise ValueError("batches is empty")
    sizes = [(batch_size_fn or default_batch_size)(b) for b in batches]
    if any(s <= 0 for s in sizes):
        raise ValueError(f"batch sizes must be positive, got {sizes}")
    total = sum(sizes)
    return [s / total for s in sizes]


def relative_gap(a: torch.Tensor, reference: torch.Tensor) -> float:
    """||a − reference|| / ||reference|| (0 when the two are identical, NaNs included)."""
    if torch.equal(a.nan_to_num(), reference.nan_to_num()):
        return 0.0
    tiny = torch.finfo(reference.dtype).tiny
    return float((a - reference).norm() / reference.norm().clamp_min(tiny))


class NondeterministicError(ValueError):
    """The function an instrument would measure changes between two identical evaluations."""


def check_deterministic(
    model: nn.Module,
    f: Callable[[dict, Any], torch.Tensor],
    space: Subspace,
    x: torch.Tensor,
    batch: Any,
    state: Mapping[str, torch.Tensor] | None = None,
    *,
    rtol: float | None = None,
) -> None:
    """Refuse a loss whose eval-mode value or gradient changes between two identical calls.

    Every instrument puts the model in eval mode (:func:`eval_mode`) and then measures a *function*:
    Hessian-vector products, gradients, per-example gradient norms. A model whose eval-mode forward is
    random (a forward that draws noise, or a module that redraws a mask whenever ``.eval()`` is called,
    as a Mixout reset can) has no such function: two identical Hessian-vector products then differ at
    the order of the products themselves, and Lanczos or ρ̂ report noise. So, before measuring, the loss
    ``f(space.assemble(x, state), batch)`` and its gradient in ``x`` are evaluated twice, each time
    inside its own ``eval_mode(model)`` exactly as a measurement enters it, and compared.

    Args:
        model: the module ``f`` evaluates (its train/eval flags are restored afterwards).
        f, space, x, batch, state: as :func:`functional_loss`, :meth:`Subspace.assemble`.
        rtol: largest accepted relative gap |ℓ₁ − ℓ₂|/|ℓ₁| and ||g₁ − g₂||/||g₁||; default √eps of the
            subspace's dtype (1.5e-8 in float64, 3.5e-4 in float32): far above the run-to-run noise of
            nondeterministic GPU reductions (a few eps), far below the O(1) gaps of a random forward.

    Raises:
        NondeterministicError (a ValueError) naming the gaps.
    """
    tol = torch.finfo(space.dtype).eps ** 0.5 if rtol is None else rtol

    def evaluate() -> tuple[torch.Tensor, torch.Tensor]:
        x_ = x.detach().clone().requires_grad_(True)
        with eval_mode(model):
            loss = f(space.assemble(x_, state), batch)
            (g,) = torch.autograd.grad(loss, x_, allow_unused=True)
        return loss.detach(), torch.zeros_like(x_) if g is None else g

    (loss1, g1), (loss2, g2) = evaluate(), evaluate()
    gaps = (relative_gap(loss2, loss1), relative_gap(g2, g1))
    if not max(gaps) <= tol:
        raise NondeterministicError(
            "the model's eval-mode loss is random: two identical evaluations (each after model.eval()) "
            f"differ by {gaps[0]:.2e} in the loss and {gaps[1]:.2e} in its gradient (relative; tolerance "
            f"{tol:.1e}), so there is no fixed function to measure. Make the eval-mode forward "
            "deterministic: look for a module that draws noise in forward or redraws a random mask when "
            ".eval() is called."
        )


@contextmanager
def eval_mode(model: nn.Module):
    """Put every submodule in eval mode (dropout off) and restore each one's flag afterwards."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for module, flag in flags.items():
            module.training = flag


def example_dims(batch: Any, size: int) -> Any:
    """``in_dims`` for ``torch.func.vmap`` over the examples of a batch: 0 for every tensor whose first
    dimension is the batch size, None for anything else (same structure as the batch: a tensor, a
    mapping or a tuple/list of leaves)."""

    def dim(value: Any) -> int | None:
        return 0 if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == size else None

    if isinstance(batch, Mapping):
        return {key: dim(value) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(dim(value) for value in batch)
    return dim(batch)


def map_examples(batch: Any, dims: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to the per-example leaves (those with dim 0 in ``dims``), keep the others."""
    if isinstance(batch, Mapping):
        return {key: fn(value) if dims[key] == 0 else value for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(fn(value) if d == 0 else value for value, d in zip(batch, dims))
    return fn(batch) if dims == 0 else batch
