"""SAM, the Second-order Approximation Method (Fu et al. 2023, Theorem 3).

Around θ0, with g = ∇L(θ0) of the mean training loss L and a diagonal curvature D = diag(d), d > 0,

    L(θ0 + Δ) ≈ L(θ0) + gᵀΔ + ½ ΔᵀDΔ.

For Δ supported on a set S of k coordinates the model is separable: coordinate i contributes
g_iΔ_i + ½ d_iΔ_i², minimal at Δ_i = −g_i/d_i with value −g_i²/(2d_i). The best k-subset therefore
maximises Σ_{i∈S} g_i²/(2d_i): it is the k largest g_i²/d_i. Theorem 3 takes D = |λmax|·I, a
common d, so the rule is the k largest g_i², the default here (``curvature="none"``).
``curvature="diag"`` uses d_i = |h_i| with h_i a Hutchinson estimate of ∇²L_ii, the exact rule for
a diagonal Hessian, to test how much the |λmax|·I approximation costs. (A negative h_i would make the
quadratic model unbounded below along coordinate i; |h_i| is the diagonal analogue of Theorem 3's
|λmax|. h_i = 0 with g_i ≠ 0 scores +inf: the model is linear there.)

g is accumulated as the summed gradient over the selection examples and divided by their number
(:func:`sparse_ft.scoring.loss_gradient`), then squared: (Σ_z ∇ℓ_z)²/N², not the Fisher Σ_z (∇ℓ_z)².
**The authors' rule** (``rule="authors"``, their ``runner.py`` burn-in) differs in four ways: train mode
(dropout on); after each batch's backward, ``clip_grad_norm_(all parameters, 1.0)``; the clipped gradients
summed over ``authors_batches`` = 599 batches drawn from the shuffled training loader (burn-in 600;
epochs repeat when the loader is shorter); then per tensor the top-k of |Σ g|, the absolute value of the
sum. With per-batch clipping the sum is no longer a multiple of ∇L, so the two rules select different
sets (an outside audit measured an overlap of 0.62 on MiniLM/CB at p = 0.005; not re-measured here). The default (``rule="theorem3"``) is the rule of
Theorem 3 on the deterministic mean loss.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from ..errors import UserError, check_choice, check_range
from ..models import TaskModel
from .base import BuildContext, register
from .masks import ScoredMaskConfig
from .scoring import hessian_diagonal, loss_gradient, selection_data, training_mode

CURVATURES = ("none", "diag")
RULES = ("theorem3", "authors")


def theorem3_score(gradient: torch.Tensor, curvature: torch.Tensor | None = None) -> torch.Tensor:
    """g_i²/|d_i| (2× the decrease of the quadratic model from tuning coordinate i alone); g_i² when
    the curvature is a common constant (``None``). g_i = 0 scores 0 whatever d_i."""
    squared = gradient.square()
    if curvature is None:
        return squared
    return torch.where(gradient == 0, torch.zeros_like(squared), squared / curvature.abs())


@register
@dataclass
class SamConfig(ScoredMaskConfig):
    """SAM: the entries of largest squared mean-loss gradient at θ0 (Fu et al. 2023, Theorem 3).

    Options: ``selection_examples`` (None = every training example), ``dropout`` (False: eval mode;
    True: train mode, as the authors' code), ``curvature`` ("none": D = |λmax|·I, Theorem 3;
    "diag": divide by a Hutchinson estimate of |∇²L_ii|), ``hutchinson_samples`` (Rademacher probes
    for "diag"; 10, as the authors' code's Hutchinson variant), ``scope`` ("per_tensor": the authors'
    code; "global": the theorem's top ⌊m·p⌋).
    """

    name = "sam"
    citation = "Fu et al. 2023, On the Effectiveness of Parameter-Efficient Fine-Tuning (AAAI), Theorem 3"
    rule: str = "theorem3"
    authors_batches: int = 599
    selection_examples: int | None = None
    dropout: bool = False
    curvature: str = "none"
    hutchinson_samples: int = 10

    def __post_init__(self):
        super().__post_init__()
        check_choice("curvature", self.curvature, CURVATURES)
        check_choice("rule", self.rule, RULES)
        check_range("authors_batches", self.authors_batches, 1)
        if self.rule == "authors" and self.curvature != "none":
            raise UserError("rule='authors' has no curvature option; use curvature='none'")
        if self.selection_examples is not None:
            check_range("selection_examples", self.selection_examples, 1)
        check_range("hutchinson_samples", self.hutchinson_samples, 1)

    def score(self, model: TaskModel, context: BuildContext) -> dict[str, torch.Tensor]:
        if self.rule == "authors":
            return authors_scores(model, context, self.authors_batches)
        batches = selection_data(context, self.selection_examples)
        with training_mode(model, self.dropout, context.mask_seed):
            gradient = loss_gradient(model, batches)
        if self.curvature == "none":
            return {name: theorem3_score(g) for name, g in gradient.items()}
        diagonal = hessian_diagonal(model, batches, self.hutchinson_samples, context.mask_seed)
        return {name: theorem3_score(g, diagonal[name]) for name, g in gradient.items()}


def authors_scores(model: TaskModel, context: BuildContext, num_batches: int) -> dict[str, torch.Tensor]:
    """|Σ_b clip(∇ℓ_b)| per backbone entry: the authors' SAM burn-in (module docstring). Train mode, random
    state from the mask seed; ``num_batches`` batches of the shuffled training loader, epochs repeated;
    each batch's gradient of every parameter (head included) clipped to global norm 1.0 before it is added."""
    if context.training_batches is None:
        raise UserError("sam rule='authors' draws from the shuffled training loader, which was not given")
    backbone = dict(model.backbone.named_parameters())
    total = {name: torch.zeros_like(p) for name, p in backbone.items()}
    epochs = itertools.chain.from_iterable(context.training_batches() for _ in itertools.count())
    with training_mode(model, True, context.mask_seed):
        for batch in itertools.islice(epochs, num_batches):
            model.zero_grad(set_to_none=True)
            model.loss(batch).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            for name, param in backbone.items():
                if param.grad is not None:
                    total[name].add_(param.grad)
    model.zero_grad(set_to_none=True)
    return {name: t.abs() for name, t in total.items()}
