"""Random: a uniformly random p-sparse mask (the Random baseline of Fu et al. 2023, Table 1)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models import TaskModel
from .base import BuildContext, register
from .masks import ScoredMaskConfig


@register
@dataclass
class RandomConfig(ScoredMaskConfig):
    """Random: exactly ⌊p·numel⌋ uniformly drawn entries per tensor (or ⌊p·m⌋ overall), from the mask seed.

    Scores are i.i.d. U(0, 1) in float64, drawn tensor by tensor in the backbone's parameter order
    from ``torch.Generator().manual_seed(mask_seed)``; the top k of i.i.d. scores is a uniformly random
    k-subset (float64 makes ties, which would bias it, practically impossible). Same seed, same mask.
    """

    name = "random"
    citation = "Fu et al., AAAI 2023: the Random baseline (a random approach in their taxonomy)"

    def score(self, model: TaskModel, context: BuildContext) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(context.mask_seed)
        return {name: torch.rand(p.shape, generator=generator, dtype=torch.float64)
                for name, p in model.backbone.named_parameters()}
