"""ρ: the largest per-sample gradient norm on the tunable coordinates, an empirical Lipschitz estimate.

Theorem 1 of Fu et al. (AAAI 2023) assumes the loss ℓ(θ; z) is ρ-Lipschitz in the tunable parameters,
i.e. ||∇_x ℓ(θ(x); z)|| ≤ ρ for every example z and every x the algorithm can reach. We measure

    ρ̂ = max_{c ∈ checkpoints} max_{z ∈ data} ||∇_x ℓ(θ_c(x); z)||₂

on the k tunable coordinates (the same coordinates as :class:`theory.hessian.HessianOperator`). This is
a *lower* estimate of the true constant (a supremum over all z and θ): it says what was observed, over
the examples and checkpoints it was measured on, and the result records both.

Per-sample loss: ``loss_fn(model, batch)`` (the mean-loss function the Hessian uses) applied to a batch of
one example, i.e. every per-example tensor of the batch (first dimension = batch size) sliced to length 1.
Gradients are computed in eval mode (dropout off) with ``torch.func.vmap(torch.func.grad(...))``
(Horace He & Richard Zou, functorch; the per-sample gradient recipe of Opacus / Yousefpour et al. 2021),
or with a loop of single-example backward passes when vmap cannot trace the model (data-dependent
control flow, e.g. the attention-mask checks of Hugging Face models): ``method="auto"`` tries vmap
and falls back to the loop, which gives the same numbers. A model whose eval-mode loss is random is
refused before anything is measured (:func:`theory.subspace.check_deterministic`).

Example::

    est = per_sample_grad_norms(model, loss_fn, batches, params=masks, checkpoints=[sd0, sd1])
    print(est)          # ρ̂, quantiles, and what it was measured over
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import grad, vmap

from theory.subspace import (
    LossFn,
    ParamsSpec,
    Subspace,
    check_deterministic,
    default_batch_size,
    eval_mode,
    example_dims,
    functional_loss,
    map_examples,
)

QUANTILES = (0.5, 0.9, 0.99, 1.0)


@dataclass
class LipschitzEstimate:
    """Per-sample gradient norms, ``norms[c, i]`` for checkpoint c and example i, and their maximum ρ̂."""

    rho: float
    norms: np.ndarray
    quantiles: dict[float, float]
    dim: int
    method: str
    checkpoint_labels: list[str] = field(default_factory=list)

    @property
    def num_samples(self) -> int:
        return self.norms.shape[1]

    @property
    def num_checkpoints(self) -> int:
        return self.norms.shape[0]

    @property
    def description(self) -> str:
        return (
            f"empirical estimate: max per-sample gradient norm over {self.num_samples} examples x "
            f"{self.num_checkpoints} checkpoint(s) on {self.dim} tunable coordinates (eval mode); a lower "
            "estimate of the Lipschitz constant rho of Theorem 1, not a certified bound"
        )

    def to_dict(self) -> dict:
        return {
            "rho": self.rho,
            "quantiles": {str(q): v for q, v in self.quantiles.items()},
            "per_checkpoint_max": dict(zip(self.checkpoint_labels, self.norms.max(axis=1).tolist())),
            "num_samples": self.num_samples,
            "num_checkpoints": self.num_checkpoints,
            "dim": self.dim,
            "method": self.method,
            "description": self.description,
        }

    def __str__(self) -> str:
        qs = "  ".join(f"q{q:g}={v:.4g}" for q, v in self.quantiles.items())
        return f"rho_hat = {self.rho:.6g}   ({qs})\n{self.description}"


def per_sample_grad_norms(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Any],
    params: ParamsSpec = None,
    *,
    checkpoints: Sequence[Mapping[str, torch.Tensor]] | None = None,
    method: str = "auto",
    chunk_size: int | None = None,
    batch_size_fn: Callable[[Any], int] | None = None,
) -> LipschitzEstimate:
    """||∇_x ℓ(θ; z_i)|| for every example of ``batches`` at the model's parameters or at each checkpoint.

    Args:
        model, loss_fn, params: as for :class:`theory.hessian.HessianOperator`.
        batches: the examples, in batches (each batch is split into its examples).
        checkpoints: state dicts (full or partial; missing entries keep the model's values) to measure at;
            None measures at the model's current parameters. The model itself is not modified.
        method: "vmap", "loop" or "auto" (vmap, switching to the loop for good at its first failure; the
            result's ``method`` says what ran, e.g. "vmap+loop").
        chunk_size: examples per vmap chunk (bounds memory at chunk_size · k gradient entries).
        batch_size_fn: ``batch -> number of examples``; default: first dim of the first tensor.

    Raises:
        theory.subspace.NondeterministicError (a ValueError): the eval-mode loss on the first batch (at the
        first checkpoint) changes between two identical evaluations.
    """
    if method not in ("auto", "vmap", "loop"):
        raise ValueError(f"method must be 'auto', 'vmap' or 'loop', got {method!r}")
    space = Subspace(model, params)
    states = [None] if checkpoints is None else list(checkpoints)
    if not states:
        raise ValueError("checkpoints is empty; pass None to measure at the model's parameters")
    f = functional_loss(model, loss_fn)
    size_of = batch_size_fn or default_batch_size
    batches = list(batches)
    if not batches:
        raise ValueError("batches is empty")
    check_deterministic(model, f, space, space.gather(states[0]), batches[0], states[0])
    rows, used = [], []
    with eval_mode(model):
        for state in states:
            x = space.gather(state)
            norms = []
            for batch in batches:
                one, how = _norms(f, space, x, state, batch, size_of(batch), method, chunk_size)
                norms.append(one)
                used.append(how)
                if how == "loop":  # "auto" stops trying vmap after its first failure
                    method = "loop"
            rows.append(torch.cat(norms).cpu().double().numpy())
    table = np.stack(rows)
    quantiles = {q: float(np.quantile(table, q)) for q in QUANTILES}
    labels = ["current"] if checkpoints is None else [f"checkpoint {c}" for c in range(len(states))]
    how = "+".join(dict.fromkeys(used))
    return LipschitzEstimate(float(table.max()), table, quantiles, space.dim, how, labels)


def _norms(f, space, x, state, batch, size, method, chunk_size) -> tuple[torch.Tensor, str]:
    """Per-example gradient norms of one batch; returns the method that worked."""
    dims = example_dims(batch, size)

    def sample_loss(x_, example):
        return f(space.assemble(x_, state), map_examples(example, dims, lambda t: t.unsqueeze(0)))

    if method in ("auto", "vmap"):
        try:
            grads = vmap(grad(sample_loss), in_dims=(None, dims), chunk_size=chunk_size)(x, batch)
            return grads.norm(dim=1), "vmap"
        except (RuntimeError, ValueError, NotImplementedError) as err:
            if method == "vmap":
                raise
            warnings.warn(f"vmap over examples failed ({err}); using a loop of backward passes", stacklevel=3)
    out = []
    for i in range(size):
        x_ = x.clone().requires_grad_(True)
        example = map_examples(batch, dims, lambda t, i=i: t[i : i + 1])
        loss = f(space.assemble(x_, state), example)
        out.append(torch.autograd.grad(loss, x_)[0].norm())
    return torch.stack(out), "loop"
