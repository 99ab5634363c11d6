"""MagPruning: tune the entries of largest pretrained magnitude (Fu et al. 2023's rule-based baseline)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models import TaskModel
from .base import BuildContext, register
from .masks import ScoredMaskConfig


@register
@dataclass
class MagnitudeConfig(ScoredMaskConfig):
    """MagPruning: the top ⌊p·numel⌋ entries of |θ0| per tensor (or the top ⌊p·m⌋ overall).

    The score is the magnitude criterion of pruning (Han et al. 2015), used the other way round:
    the largest pretrained weights are the ones that tune. The authors' code ranks per tensor.
    """

    name = "magnitude"
    citation = ("Han et al. 2015, Learning both Weights and Connections for Efficient Neural Networks; "
                "Lee et al. 2021, Layer-adaptive Sparsity for the Magnitude-based Pruning; "
                "the MagPruning baseline of Fu et al., AAAI 2023")

    def score(self, model: TaskModel, context: BuildContext) -> dict[str, torch.Tensor]:
        return {name: p.detach().abs() for name, p in model.backbone.named_parameters()}
