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
            spec: dict[str, torch.Tensor | None] = {n: None for n, p in named.items() if p.requires_grad}
        elif isinstance(params, Mapping):
            spec = dict(params)
        elif isinstance(params, (str, bytes)) or not isinstance(params, Sequence):
            raise TypeError("params must be None, a list of parameter names or a dict name -> bool mask")
        else:
            spec = {n: None for n in params}
            if len(spec) != len(params):
                raise ValueError("params lists a parameter name twice")
        if not spec:
            raise ValueError("no tunable parameters: params selects nothing")
        unknown = [n for n in spec if n not in named]
        if unknown:
            raise KeyError(f"unknown parameter names {unknown}; the model has e.g. {list(named)[:5]}")

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


def functional_loss(model: nn.Module, loss_fn: LossFn) -> Callable[[dict, Any], torch.Tensor]:
    """``f(tensors, batch)``: ``loss_fn(model, batch)`` evaluated with the parameters in ``tensors``."""
    wrapper = _LossModule(model, loss_fn)

    def f(tensors: dict, batch: Any) -> torch.Tensor:
        return functional_call(wrapper, {"model." + n: t for n, t in tensors.items()}, (batch,))

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
