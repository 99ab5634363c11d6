"""BitFit: tune every bias of the backbone (Zaken et al. 2021); p follows from the architecture."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError
from ..models import TaskModel
from .base import BuildContext, register
from .masks import MaskMethodConfig


def is_bias(name: str) -> bool:
    return name == "bias" or name.endswith(".bias")


@register
@dataclass
class BitFitConfig(MaskMethodConfig):
    """BitFit: every bias entry of the backbone (attention, feed-forward and LayerNorm biases).

    The budget is the number of bias entries, so p = budget / m is fixed by the architecture
    (0.1% for roberta-base); the method has no options.
    """

    name = "bitfit"
    uses_sparsity = False
    citation = ("Zaken et al. 2021, BitFit: Simple Parameter-efficient Fine-tuning for "
                "Transformer-based Masked Language-models")

    def select(self, model: TaskModel, context: BuildContext) -> tuple[dict[str, torch.Tensor], int]:
        """Whole bias tensors (no scoring); the budget is their entry count."""
        indices = {name: torch.arange(p.numel(), device=p.device)
                   for name, p in model.backbone.named_parameters() if is_bias(name)}
        if not indices:
            raise UserError("the backbone has no bias parameters; BitFit has nothing to tune")
        return indices, sum(len(i) for i in indices.values())
