"""Mixout (Lee, Cho and Kang 2020): dense fine-tuning that stochastically mixes θ with θ0.

**Train-time swap** (``mode="train_swap"``, Lee et al.). In every training forward pass each affected
weight ``w`` (pretrained value ``u``) is replaced by

    mixout(w; u, r) = ((1 − M) ⊙ u + M ⊙ w − r·u) / (1 − r),   M_i ~ Bernoulli(1 − r) (keep),

Lee et al.'s ``mixout(u, p)`` with p = r. Entries with M = 0 are *swapped* for u exactly (the
code computes ``u + M ⊙ (w − u)/(1 − r)``, which is the same map and returns u bit-for-bit where M = 0),
kept entries are rescaled around u, and ``E_M[mixout(w)] = w``. The gradient reaching w is
``M/(1 − r)`` times the gradient of the mixed weight (autograd's exact one; Lee et al.'s hand-written
backward drops the ``1/(1 − r)``, which Adam's normalisation all but cancels). At evaluation the
weights are used as they are: the deployed model is dense. ``unit="entry"`` draws M per entry (DESIGN
§5; element-wise, what the README of Lee et al.'s code calls mixconnect); ``unit="neuron"`` draws one
M per input neuron of a 2-D weight and shares it over the rows, which is what Lee et al.'s own
``mixout.py`` does (the outgoing weights of a neuron are swapped together). Lee et al. apply it to the
Linear weights (their ``MixLinear``; here ``nn.Linear`` and GPT-2's ``Conv1D``, a Linear whose weight is
stored transposed), biases and everything else training normally:
``apply_to="linear"`` (the default for this mode); ``"all"`` mixes every backbone tensor. Lee et al.'s
GLUE runs used r ∈ {0.7, 0.8, 0.9}; 0.9 is the default here. Their Hugging Face example also sets
dropout to 0; sparse-ft leaves the backbone's dropout as configured.

**Evaluation-time reset** (``mode="eval_reset"``, Fu et al.'s code: ``runner.py``, ``run_val``).
Training is plain full fine-tuning; each time the model is switched to evaluation (every ``.eval()``
call, so every validation pass and the final val and test passes, as the authors drew a fresh mask per
``run_val``), a random r-portion of the entries of every affected tensor is reset to θ0 without
rescaling. The authors reset every encoder tensor, so ``apply_to="all"`` is the default for this mode.
Its evaluation-mode function is therefore random; a measurement (Hessian, ρ̂, leave-one-out losses)
holds one draw fixed with :meth:`MixoutTuned.frozen_evaluation` and records its seed.
The masks come from a generator seeded by the mask seed (DESIGN §4); the train-time masks of
``train_swap`` come from torch's global generator, like dropout.

**Sparsity.** In the paper's terms a fraction ≈ 1 − r of the entries carries a change: Mixout's p is
1 − r, set through ``ratio`` (default 0.9), never through a shared ``--sparsity``. The report compares the *evaluated* model with θ0 exactly: for ``train_swap`` that is the
dense θ, so ``changed`` ≈ m and ``budget`` = m (any entry may change: mixout regularises dense
fine-tuning, it does not make it sparse); for ``eval_reset`` it is θ with the current reset applied,
and ``budget`` = the entries not reset by the current mask (≈ (1 − r)·m for ``apply_to="all"``), so
``changed ≤ budget`` always holds.

**Implementation.** ``torch.nn.utils.parametrize`` on each affected tensor: the parametrisation holds
the one device copy of θ0 for that tensor (a non-persistent buffer, kept out of checkpoints) and the
current reset mask; tensors that are not mixed keep a CPU copy of θ0 for the count. Parametrised
tensors appear as ``<module>.parametrizations.<name>.original``. :meth:`MixoutTuned.merge_into_dense`
removes the parametrisations from a copy (:func:`sparse_ft.parametrized.unparametrize_copy`), leaving
the weights that evaluation uses.

Example::

    >>> tuned = make_method_config("mixout", ratio=0.9).build(task_model, BuildContext())  # p = 0.1
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize
from transformers.pytorch_utils import Conv1D

from ..errors import UserError, check_choice, check_range
from ..models import TaskModel
from ..parametrized import unparametrize_copy
from .base import BuildContext, MethodConfig, TunedModel, register

MODES = ("train_swap", "eval_reset")
APPLY_TO = ("auto", "linear", "all")
UNITS = ("entry", "neuron")
DEFAULT_RATIO = 0.9
LINEAR_INPUT_AXIS = {nn.Linear: 1, Conv1D: 0}  # the input-neuron axis: Linear (out, in), GPT-2's Conv1D (in, out)


def linear_input_axis(module: nn.Module) -> int | None:
    """The input-neuron axis of a Linear-like module's weight; None for any other module."""
    return next((axis for kind, axis in LINEAR_INPUT_AXIS.items() if isinstance(module, kind)), None)


@register
@dataclass
class MixoutConfig(MethodConfig):
    """Mixout: swap weights for θ0 at random while training (Lee et al.), or reset an r-portion to θ0
    at evaluation (the authors' code).

    ``ratio``: r, the probability of taking θ0 (default 0.9, Lee et al.'s GLUE setting); p = 1 − r is
    the expected fraction of entries that keep their change, so Mixout fixes its own p: a sweep's shared
    sparsity does not apply (p = 0.005 would give r = 0.995, a 200× rescaling), and ``--sparsity`` is
    refused in favour of ``-o ratio=R``.
    ``mode``: "train_swap" (Lee et al.) or "eval_reset" (Fu et al.'s code);
    ``apply_to``: "linear" (Linear weights), "all" (every backbone tensor) or "auto" (linear for
    train_swap, all for eval_reset); ``unit``: "entry" or "neuron" (train_swap: one draw per input
    neuron of a 2-D weight, Lee et al.'s code).
    """

    name = "mixout"
    uses_sparsity = False
    sparsity_hint = " (mixout: set r with -o ratio=R, p = 1 - r)"
    citation = ("Lee, Cho and Kang 2020, Mixout: Effective Regularization to Finetune Large-scale "
                "Pretrained Language Models (ICLR; arXiv 1909.11299)")
    ratio: float = DEFAULT_RATIO
    mode: str = "train_swap"
    apply_to: str = "auto"
    unit: str = "entry"

    def __post_init__(self):
        check_choice("mixout mode", self.mode, MODES)
        check_choice("mixout apply_to", self.apply_to, APPLY_TO)
        check_choice("mixout unit", self.unit, UNITS)
        check_range("ratio", self.ratio, 0.0, 1.0, high_open=True)
        if self.apply_to == "auto":
            self.apply_to = "linear" if self.mode == "train_swap" else "all"
        if self.unit != "entry" and self.mode != "train_swap":
            raise UserError("mixout unit='neuron' applies to mode='train_swap' only "
                            "(eval_reset resets entries)")

    def build(self, model: TaskModel, context: BuildContext) -> MixoutTuned:
        return MixoutTuned(model, self, context.mask_seed)


class Mix(nn.Module):
    """The parametrisation of one tensor: holds its θ0 and, in ``eval_reset`` mode, the reset mask.
    ``input_axis``: the axis of a 2-D weight that indexes input neurons (1 for nn.Linear's (out, in))."""

    def __init__(self, theta0: torch.Tensor, ratio: float, mode: str, unit: str, input_axis: int = 1):
        super().__init__()
        self.ratio, self.mode, self.unit, self.input_axis = ratio, mode, unit, input_axis
        self.register_buffer("theta0", theta0, persistent=False)
        reset = torch.zeros_like(theta0, dtype=torch.bool) if mode == "eval_reset" else None
        self.register_buffer("reset", reset, persistent=False)  # True: evaluated at θ0 (eval_reset)

    def keep_mask(self, weight: torch.Tensor) -> torch.Tensor:
        """M ~ Bernoulli(1 − r), per entry or per input neuron of a 2-D weight (shared along the other axis)."""
        shape = list(weight.shape)
        if self.unit == "neuron" and weight.dim() == 2:
            shape[1 - self.input_axis] = 1
        return torch.rand(shape, device=weight.device) >= self.ratio

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.mode == "train_swap":
            if not self.training or self.ratio == 0.0:
                return weight
            keep = self.keep_mask(weight)
            return self.theta0 + keep * ((weight - self.theta0) / (1.0 - self.ratio))
        if self.training:
            return weight
        return torch.where(self.reset, self.theta0, weight)

    def extra_repr(self) -> str:
        return f"ratio={self.ratio}, mode={self.mode}, unit={self.unit}"


class MixoutTuned(TunedModel):
    def __init__(self, model: TaskModel, config: MixoutConfig, mask_seed: int = 0):
        super().__init__(model, config)
        self.ratio = config.ratio
        self.mask_seed = mask_seed
        self.draws = 0  # evaluation-time reset masks drawn so far
        self._frozen = False  # True inside frozen_evaluation: .eval() keeps the current reset
        model.requires_grad_(True)
        linear_only = config.apply_to == "linear"
        self._mixed: list[tuple[nn.Module, str]] = []
        self._theta0_cpu: dict[str, torch.Tensor] = {}  # θ0 of the backbone tensors that are not mixed
        self._orders: dict[str, list[str]] = {}  # parameter order of each mixed module, for the merge
        for module_name, module in list(model.backbone.named_modules()):
            self._orders[module_name] = [n for n, _ in module.named_parameters(recurse=False)]
            for tensor_name, param in list(module.named_parameters(recurse=False)):
                axis = linear_input_axis(module) if tensor_name == "weight" else None
                if not linear_only or axis is not None:
                    mix = Mix(param.detach().clone(), self.ratio, config.mode, config.unit,
                              1 if axis is None else axis)
                    parametrize.register_parametrization(module, tensor_name, mix)
                    self._mixed.append((module, tensor_name))
                else:
                    full_name = f"{module_name}.{tensor_name}" if module_name else tensor_name
                    self._theta0_cpu[full_name] = param.detach().to("cpu", copy=True)
        if config.mode == "eval_reset":
            self.resample_reset()

    def _mix(self, module: nn.Module, tensor_name: str) -> Mix:
        return module.parametrizations[tensor_name][0]

    @torch.no_grad()
    def resample_reset(self) -> None:
        """Draw a fresh reset mask (an r-portion of each mixed tensor, uniform) from the mask seed."""
        self.draws += 1
        generators: dict[torch.device, torch.Generator] = {}
        for module, tensor_name in self._mixed:
            mix = self._mix(module, tensor_name)
            device = mix.theta0.device
            if device not in generators:
                generators[device] = torch.Generator(device=device)
                generators[device].manual_seed(self.mask_seed * 1_000_003 + self.draws)
            mix.reset = torch.rand(mix.theta0.shape, generator=generators[device], device=device) < self.ratio

    def train(self, mode: bool = True):
        super().train(mode)
        if not mode and self.config.mode == "eval_reset" and not self._frozen:
            self.resample_reset()  # a fresh reset per evaluation, as the authors' run_val
        return self

    @property
    def eval_is_random(self) -> bool:
        return self.config.mode == "eval_reset"

    @contextlib.contextmanager
    def frozen_evaluation(self, seed: int = 0):
        """One reset mask, drawn from ``seed``, for every ``.eval()`` inside the block (``eval_reset``);
        yields ``{"mixout_reset_seed": seed}`` for the measurement's record. Afterwards each evaluation
        draws afresh again, from the mask seed's stream."""
        if not self.eval_is_random:
            yield {}
            return
        saved = (self.mask_seed, self.draws)
        self.mask_seed, self.draws = seed, 0
        self.resample_reset()
        self._frozen = True
        try:
            yield {"mixout_reset_seed": seed}
        finally:
            self._frozen = False
            self.mask_seed, self.draws = saved

    @torch.no_grad()
    def budget_and_changed(self) -> tuple[int, int]:
        """(budget, changed) of the model that evaluation uses, against θ0, compared exactly."""
        reset_mode = self.config.mode == "eval_reset"
        budget = changed = 0
        for module, tensor_name in self._mixed:
            mix = self._mix(module, tensor_name)
            differs = module.parametrizations[tensor_name].original != mix.theta0
            if reset_mode:
                differs &= ~mix.reset
                budget += int((~mix.reset).sum())
            else:
                budget += mix.theta0.numel()
            changed += int(differs.sum())
        params = dict(self.model.backbone.named_parameters())
        for name, theta0 in self._theta0_cpu.items():
            budget += theta0.numel()
            changed += int((params[name].detach().cpu() != theta0).sum())
        return budget, changed


    def describe(self) -> str:
        config = self.config
        return f"{config.name} (r={self.ratio}, {config.mode}, {config.apply_to}): {self.sparsity_report()}"

    @torch.no_grad()
    def merge_into_dense(self) -> TaskModel:
        """A plain TaskModel holding the weights evaluation uses: θ for ``train_swap``; θ with the current
        reset mask applied for ``eval_reset``. Parameter names and order are those of the pretrained model."""
        dense = copy.deepcopy(self.model).eval()  # TaskModel.eval: no fresh reset is drawn
        for name, module in list(dense.backbone.named_modules()):
            if parametrize.is_parametrized(module):
                unparametrize_copy(module, self._orders[name])
        return dense.train(self.training).requires_grad_(True)

