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
The authors' code summed the gradients of 500 training batches in train mode (dropout on) before
training; ``dropout=True`` reproduces that mode, the default scores the deterministic loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError, check_range
from ..models import TaskModel
from .base import BuildContext, register
from .masks import ScoredMaskConfig
from .scoring import hessian_diagonal, loss_gradient, selection_data, training_mode

CURVATURES = ("none", "diag")


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
    selection_examples: int | None = None
    dropout: bool = False
    curvature: str = "none"
    hutchinson_samples: int = 10

    def __post_init__(self):
        super().__post_init__()
        if self.curvature not in CURVATURES:
            raise UserError(f"curvature must be one of {CURVATURES}, got {self.curvature!r}")
        if self.selection_examples is not None:
            check_range("selection_examples", self.selection_examples, 1)
        check_range("hutchinson_samples", self.hutchinson_samples, 1)

    def score(self, model: TaskModel, context: BuildContext) -> dict[str, torch.Tensor]:
        batches = selection_data(context, self.selection_examples)
        with training_mode(model, self.dropout, context.mask_seed):
            gradient = loss_gradient(model, batches)
        if self.curvature == "none":
            return {name: theorem3_score(g) for name, g in gradient.items()}
        diagonal = hessian_diagonal(model, batches, self.hutchinson_samples, context.mask_seed)
        return {name: theorem3_score(g, diagonal[name]) for name, g in gradient.items()}
