"""Gradient statistics of the training loss at the current θ, one number per backbone entry.

Written once and shared by the gradient-based mask methods (DESIGN §5, §8). For training examples
z_1..z_N, per-example losses ℓ(θ; z) and the mean loss L(θ) = (1/N) Σ_z ℓ(θ; z):

* :func:`loss_gradient`: ∇L(θ), accumulated as the *summed* gradient Σ_b n_b·∇(mean loss of batch b)
  and divided by N once (SAM, Fu et al. 2023, Theorem 3, squares this vector);
* :func:`fisher_diagonal`: F = Σ_z (∇ℓ(θ; z))², the empirical Fisher diagonal from per-example
  gradients (ChildTuning-D, Xu et al. 2021). It is not SAM's (Σ_z ∇ℓ)² = N²(∇L)²: per-example
  squares keep the gradient noise that cancels in the sum, so the two rank entries differently;
* :func:`hessian_diagonal`: diag(∇²L) ≈ (1/S) Σ_s v_s ⊙ (∇²L v_s) with Rademacher v_s
  (Hutchinson 1990; Bekas et al. 2007), through :class:`theory.hessian.HessianOperator`.

Every function takes the task model, a list of batches and the names of the parameters to
differentiate (default: every backbone tensor), and returns ``{backbone name: tensor}`` shaped like
the parameters. Parameters are swapped in with ``torch.func.functional_call``, so neither their
``requires_grad`` flags nor their ``.grad`` fields are touched. The caller picks dropout on or off
with :func:`training_mode`.

The Fisher diagonal's per-example gradients come from a loop over single examples with their trailing
padding cut off: they are dense over every backbone tensor, so ``torch.func.vmap`` would hold
chunk × m of them at once (1.45 GB for 16 MiniLM examples), and the loop is exact for every head and
architecture. (vmap itself does work on the task model: under torch.func transforms it hands the
encoder a prebuilt 4-D attention mask, see :func:`sparse_ft.models.additive_attention_mask`; the
theory instruments use it for per-example gradients on the small tunable subspace.) Measured on MiniLM,
CB, 2 shared CPU cores: the loop costs about 1.5-4x batched passes over the same examples.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from theory.hessian import HessianOperator, hutchinson_diagonal
from theory.subspace import default_batch_size, functional_loss

from ..errors import UserError
from ..models import batch_loss

BACKBONE = "backbone."


def backbone_names(model: nn.Module) -> list[str]:
    """Full names (``backbone.…``) of every backbone parameter of a task model."""
    return [BACKBONE + n for n, _ in model.backbone.named_parameters()]


def _strip(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n.removeprefix(BACKBONE): t for n, t in tensors.items()}


@contextmanager
def training_mode(model: nn.Module, dropout: bool, seed: int):
    """Dropout on (``model.train()``) or off (``model.eval()``) inside the block, the random state
    forked and seeded with ``seed`` (the mask seed); flags and random state restored after."""
    flags = {m: m.training for m in model.modules()}
    devices = [p.device for p in model.parameters() if p.device.type == "cuda"][:1]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model.train(dropout)
        try:
            yield model
        finally:
            for module, flag in flags.items():
                module.training = flag


@contextmanager
def eager_attention(model: nn.Module):
    """A Hugging Face backbone switched to eager attention inside the block, for Hessian-vector
    products: fused SDPA kernels have no second derivative (eager attention computes the same
    function, up to float rounding). Other modules pass through unchanged."""
    backbone = getattr(model, "backbone", model)
    before = getattr(getattr(backbone, "config", None), "_attn_implementation", None)
    switch = before not in (None, "eager") and hasattr(backbone, "set_attn_implementation")
    if switch:
        backbone.set_attn_implementation("eager")
    try:
        yield model
    finally:
        if switch:
            backbone.set_attn_implementation(before)


def selection_data(context, limit: int | None) -> list[dict]:
    """The first ``limit`` training examples (all when None) of a build context's selection batches."""
    if context.selection_batches is None:
        raise UserError("this method scores parameters on training data, but none was given")
    return take_examples(context.selection_batches(), limit)


def take_examples(batches: Iterable[dict], limit: int | None) -> list[dict]:
    """The batches, cut after the first ``limit`` examples (all of them when ``limit`` is None)."""
    taken, count = [], 0
    for batch in batches:
        if limit is not None and count >= limit:
            break
        size = default_batch_size(batch)
        if limit is not None and count + size > limit:
            batch = {k: v[: limit - count] for k, v in batch.items()}
            size = limit - count
        taken.append(batch)
        count += size
    if not taken:
        raise UserError("no training examples to score the parameters with")
    return taken


def single_examples(batch: dict) -> Iterator[dict]:
    """Each example of a padded batch as a batch of one, trailing padding removed.

    Tensors whose last dimension is the sequence length (ids, masks, span masks) are cut at the last
    attended position; padding is masked out of attention, so the example's loss is unchanged.
    """
    length = batch["input_ids"].shape[-1]
    for i in range(default_batch_size(batch)):
        one = {k: v[i : i + 1] for k, v in batch.items()}
        attended = one.get("attention_mask", torch.ones(1, length)).reshape(-1, length).any(0).nonzero()
        end = int(attended.max()) + 1 if len(attended) else length
        yield {k: (v[..., :end] if v.dim() >= 2 and v.shape[-1] == length else v) for k, v in one.items()}


class _Differentiator:
    """∇ of ``loss_fn(model, batch)`` with respect to the named parameters, at their current values."""

    def __init__(self, model: nn.Module, names: list[str] | None, loss_fn=batch_loss):
        params = dict(model.named_parameters())
        self.names = backbone_names(model) if names is None else list(names)
        # detached leaves share the parameters' storage: no copy, and the model's flags stay as they are
        self.leaves = [params[n].detach().requires_grad_() for n in self.names]
        self.tensors = dict(zip(self.names, self.leaves))
        self.loss = functional_loss(model, loss_fn)

    def __call__(self, batch: dict) -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(self.loss(self.tensors, batch), self.leaves)

    def zeros(self) -> list[torch.Tensor]:
        return [torch.zeros_like(v) for v in self.leaves]


def loss_gradient(model: nn.Module, batches: list[dict], names: list[str] | None = None,
                  loss_fn=batch_loss) -> dict[str, torch.Tensor]:
    """∇L(θ) of the mean loss over all examples of ``batches``.

    The summed gradient Σ_z ∇ℓ(θ; z) = Σ_b n_b·∇(mean loss of batch b) is accumulated batch by batch
    and divided by N = Σ_b n_b at the end, so batches of unequal size are weighted correctly.
    """
    diff = _Differentiator(model, names, loss_fn)
    total, count = diff.zeros(), 0
    for batch in batches:
        n = default_batch_size(batch)
        for acc, g in zip(total, diff(batch)):
            acc.add_(g, alpha=n)
        count += n
    return _strip({name: acc / count for name, acc in zip(diff.names, total)})


def fisher_diagonal(model: nn.Module, batches: list[dict], names: list[str] | None = None,
                    loss_fn=batch_loss) -> dict[str, torch.Tensor]:
    """F = Σ_z (∇ℓ(θ; z))², from one backward pass per example (see the module docstring)."""
    diff = _Differentiator(model, names, loss_fn)
    total = diff.zeros()
    for batch in batches:
        for example in single_examples(batch):
            for acc, g in zip(total, diff(example)):
                acc.addcmul_(g, g)
    return _strip(dict(zip(diff.names, total)))


def hessian_diagonal(model: nn.Module, batches: list[dict], samples: int, seed: int,
                     names: list[str] | None = None, loss_fn=batch_loss) -> dict[str, torch.Tensor]:
    """diag(∇²L) per backbone tensor, by the one Hutchinson estimator (:func:`theory.hessian.hutchinson_diagonal`,
    ``samples`` Rademacher probes from ``seed``) on the Hessian of the mean loss over ``batches``
    (batch-size weighted), in eval mode and eager attention. Exact for a diagonal Hessian, whatever S."""
    if samples < 1:
        raise UserError(f"hutchinson_samples must be at least 1, got {samples}")
    names = backbone_names(model) if names is None else list(names)
    with eager_attention(model):
        op = HessianOperator(model, loss_fn, batches, params=names)
        estimate = hutchinson_diagonal(op, samples, seed)
    return _strip(op.space.unflatten(estimate))
