"""LoRA (Hu et al. 2022) through ``peft``: low-rank additive updates of chosen Linear weights.

A target Linear ``y = W x + b`` becomes ``y = W x + b + (α / r) · B A dropout(x)`` with
``A ∈ R^{r×d_in}`` (Kaiming-uniform) and ``B ∈ R^{d_out×r}`` (zero), so the model at step 0 is the
pretrained one. W and b stay frozen; A, B and the task head train. Added parameters:
``r · (d_in + d_out)`` per target, i.e. ``L · 2 · r · (d + d)`` for query and value of an L-layer
encoder of width d.

**Defaults and sources.** ``r = 8``, ``alpha = 8``, ``target_modules = ("query", "value")``: the LoRA
paper's RoBERTa-base GLUE configuration (Hu et al. 2022, Table 9: r_q = r_v = 8, α = 8), which are also
peft's ``LoraConfig`` defaults (r=8, lora_alpha=8, lora_dropout=0.0); ``dropout = 0.0`` as peft. DESIGN
§5 fixes query and value as the default targets. The authors' code (AnalyzeParameterEfficientFinetune,
``src/main_runscript.py``) instead used ``loralib`` on all six Linear layers of every block (query, key,
value, attention output, intermediate, output) with ``lora_alpha = 1`` (loralib's default, scaling 1/r),
re-initialised B with Kaiming (so their model did not start at θ0), and called
``mark_only_lora_as_trainable`` on the whole jiant model, which froze the task head as well; those are
not copied (``target_modules="query,key,value,dense"`` reproduces their placement).

**Implementation.** ``peft.inject_adapter_in_model`` wraps the target Linears of the backbone in
place, so ``TaskModel.backbone`` stays the Hugging Face encoder and ``TaskModel.encode`` is unchanged;
the frozen weights move to ``<target>.base_layer.weight``. :meth:`LoRATuned.merge_into_dense` folds
``(α/r)·BA`` into W with peft's own ``merge`` on each LoRA layer (what ``merge_and_unload`` does) and
puts the plain Linear back, returning a dense :class:`~sparse_ft.models.TaskModel`.

**Sparsity (DESIGN §5).** Additive: ``budget`` = ``changed`` = the added parameters (the backbone is
frozen; the equivalent p is added / m, as the paper counts it).

Example::

    >>> config = make_method_config("lora", r=4, target_modules="query,key,value")
    >>> tuned = config.build(task_model, BuildContext())
    >>> dense = tuned.merge_into_dense()  # a plain TaskModel with the same logits
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch

from ..errors import UserError, check_range
from ..models import TaskModel
from .base import BuildContext, MethodConfig, TunedModel, register

DEFAULT_TARGETS = ("query", "value")  # DESIGN §5; peft's default for BERT and RoBERTa too


@register
@dataclass
class LoRAConfig(MethodConfig):
    """LoRA through peft: rank-r updates of the target Linears; backbone frozen, head trains.

    ``r``: rank (8); ``alpha``: the update is scaled by alpha / r (8); ``dropout``: on the LoRA
    branch's input (0.0); ``target_modules``: module-name suffixes, a tuple or a comma-separated string
    ("query,value"); every match in the backbone gets an update. The default ("query", "value") becomes
    peft's default for the backbone's architecture (gpt2: c_attn; llama: q_proj, v_proj) on a backbone that
    has no module of those names (:meth:`for_backbone`; the tuned model records the targets it used).
    """

    name = "lora"
    uses_sparsity = False  # p follows from r and the targets
    citation = ("Hu et al. 2022, LoRA: Low-Rank Adaptation of Large Language Models (ICLR); "
                "via huggingface/peft")
    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] | str = DEFAULT_TARGETS

    def __post_init__(self):
        if isinstance(self.target_modules, str):
            self.target_modules = tuple(t.strip() for t in self.target_modules.split(",") if t.strip())
        self.target_modules = tuple(self.target_modules)
        if not self.target_modules or not all(isinstance(t, str) for t in self.target_modules):
            raise UserError(f"lora target_modules must name at least one module, got {self.target_modules!r}")
        if not isinstance(self.r, int) or isinstance(self.r, bool):
            raise UserError(f"lora r must be an integer, got {self.r!r}")
        check_range("r", self.r, 1)
        check_range("alpha", self.alpha, 0.0, low_open=True)
        check_range("dropout", self.dropout, 0.0, 1.0, high_open=True)

    def peft_config(self):
        from peft import LoraConfig as PeftLoraConfig

        return PeftLoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                              target_modules=list(self.target_modules), bias="none")

    def for_backbone(self, backbone: torch.nn.Module) -> LoRAConfig:
        """This config, or, when its targets are the default and ``backbone`` has no module they name, a
        copy with peft's default targets for the backbone's ``config.model_type`` (where peft has one)."""
        if self.target_modules != DEFAULT_TARGETS or any(
                name.rpartition(".")[2] in DEFAULT_TARGETS for name, _ in backbone.named_modules()):
            return self
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

        targets = PEFT_DEFAULTS.get(getattr(getattr(backbone, "config", None), "model_type", None))
        return dataclasses.replace(self, target_modules=tuple(targets)) if targets else self

    def build(self, model: TaskModel, context: BuildContext) -> LoRATuned:
        with context.seeded():
            return LoRATuned(model, self.for_backbone(model.backbone))


def _lora_layers(module: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    from peft.tuners.lora import LoraLayer

    return [(name, m) for name, m in module.named_modules() if isinstance(m, LoraLayer)]


class LoRATuned(TunedModel):
    def __init__(self, model: TaskModel, config: LoRAConfig):
        super().__init__(model, config)  # m is measured here, before anything is added
        from peft import inject_adapter_in_model

        model.backbone.requires_grad_(False)
        try:
            inject_adapter_in_model(config.peft_config(), model.backbone)
        except ValueError as exc:  # peft: "Target modules {...} not found in the base model"
            raise UserError(f"lora: {str(exc).splitlines()[0]}") from None
        model.head.requires_grad_(True)
        if not _lora_layers(model.backbone):
            raise UserError(f"lora: no module of {type(model.backbone).__name__} matches "
                            f"{config.target_modules}")

    def added_param_count(self) -> int:
        return sum(p.numel() for name, p in self.model.backbone.named_parameters() if "lora_" in name)

    additive = True

    def budget_and_changed(self) -> tuple[int, int]:
        added = self.added_param_count()
        return added, added

    @torch.no_grad()
    def merge_into_dense(self) -> TaskModel:
        """A plain TaskModel with ``W ← W + (α/r)·BA`` in every target and the LoRA wrappers removed."""
        dense = copy.deepcopy(self.model)
        for name, layer in _lora_layers(dense.backbone):
            layer.merge(safe_merge=True)  # peft's merge; raises on non-finite results
            parent, _, child = name.rpartition(".")
            setattr(dense.backbone.get_submodule(parent), child, layer.get_base_layer())
        return dense.requires_grad_(True)
