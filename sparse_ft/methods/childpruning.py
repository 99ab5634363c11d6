"""ChildPruning: ChildTuning-D's Fisher mask (Xu et al. 2021), optionally re-selected during training.

The score of entry i is the empirical Fisher information F_i = Σ_z (∇ℓ(θ; z)_i)² over per-example
gradients of the selection examples (:func:`sparse_ft.scoring.fisher_diagonal`); the top ⌊m·p⌋
entries tune. ChildTuning-D keeps the entries above a percentile of F taken over all tensors
together, hence ``scope="global"`` by default. (Xu et al. square mini-batch gradients and score only
the encoder layers; here the Fisher is per example, as DESIGN §5 asks, over every backbone tensor.)

Fu et al. (2023) file ChildPruning with the projection methods. ``reselect_every=K`` makes that
explicit: every K optimizer steps the Fisher is recomputed at the current θ (on the merged dense
model, dropout off), and θ is projected onto the new p-sparse set with
:meth:`~sparse_ft.delta.SparseDeltaTuned.set_indices`: entries that stay keep their values, entries
that leave return to θ0 exactly, new entries start at θ0. The loss jumps at such a step (the
projection discontinuity of Fu et al., Figure 1); the trainer records the step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import check_range
from ..models import TaskModel
from .base import BuildContext, register
from .masks import ScoredMaskConfig, SparseDeltaTuned
from .scoring import fisher_diagonal, selection_data, training_mode


@register
@dataclass
class ChildPruningConfig(ScoredMaskConfig):
    """ChildPruning: the entries of largest empirical Fisher information (ChildTuning-D, Xu et al. 2021).

    Options: ``scope`` ("global", ChildTuning-D's single percentile), ``selection_examples``
    (None = every training example), ``reselect_every`` (K > 0: re-score at the current θ and
    project every K steps; 0 = one selection at θ0).
    """

    name = "childpruning"
    citation = ("Xu et al. 2021, Raise a Child in Large Language Model: Towards Effective and "
                "Generalizable Fine-tuning (EMNLP), ChildTuning-D")
    scope: str = "global"
    selection_examples: int | None = None
    reselect_every: int = 0

    def __post_init__(self):
        super().__post_init__()
        if self.selection_examples is not None:
            check_range("selection_examples", self.selection_examples, 1)
        check_range("reselect_every", self.reselect_every, 0)

    def score(self, model: TaskModel, context: BuildContext) -> dict[str, torch.Tensor]:
        batches = selection_data(context, self.selection_examples)
        with training_mode(model, False, context.mask_seed):
            return fisher_diagonal(model, batches)

    def build(self, model: TaskModel, context: BuildContext) -> SparseDeltaTuned:
        indices, budget = self.select(model, context)
        if self.reselect_every:
            return ReselectingTuned(model, self, indices, budget, context)
        return SparseDeltaTuned(model, self, indices, budget)


def same_indices(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n].to(b[n].device), b[n]) for n in a)


class ReselectingTuned(SparseDeltaTuned):
    """Iterative ChildPruning: every ``reselect_every`` steps, re-score at θ and project onto the top k."""

    def __init__(self, model: TaskModel, config: ChildPruningConfig, indices: dict[str, torch.Tensor],
                 budget: int, context: BuildContext):
        super().__init__(model, config, indices, budget)
        self.context = context

    def on_step_end(self, step: int) -> bool:
        if step % self.config.reselect_every:
            return False
        indices, _ = self.config.select_from_scores(self.config.score(self.merge_into_dense(), self.context))
        if same_indices(indices, self.indices()):
            return False
        self.set_indices(indices)
        return True
