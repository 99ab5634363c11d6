"""Full fine-tuning: every backbone parameter trains (the paper's FullTuning baseline, p = 1)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from ..models import TaskModel
from .base import BuildContext, MethodConfig, Theta0Snapshot, TunedModel, register


@register
@dataclass
class FullConfig(MethodConfig):
    """Full fine-tuning: the dense baseline that every p-sparse method is compared with."""

    name = "full"
    uses_sparsity = False
    citation = "Devlin et al. 2019; the FullTuning row of Fu et al. 2023, Table 1"

    def build(self, model: TaskModel, context: BuildContext) -> FullTuned:
        return FullTuned(model, self)


class FullTuned(TunedModel):
    def __init__(self, model: TaskModel, config: FullConfig):
        super().__init__(model, config)
        model.requires_grad_(True)
        self.theta0 = Theta0Snapshot(model.backbone)

    def budget_and_changed(self) -> tuple[int, int]:
        return self.backbone_params, self.theta0.count_changed(self.model.backbone)

    @torch.no_grad()
    def merge_into_dense(self) -> TaskModel:
        """A copy of the task model: full fine-tuning is dense already."""
        return copy.deepcopy(self.model)
