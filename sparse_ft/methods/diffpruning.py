"""DiffPruning (Guo et al. 2021): learn a gated diff θ = θ0 + z⊙w, then project it to p-sparse.

Gated phase. Every backbone tensor gets a dense diff w (initialised at 0) and dense gate logits α
(initialised at ``alpha_init``); in training each gate is a hard-concrete sample (Louizos et al. 2018)

    u ~ U(0, 1),  s = σ((log u − log(1 − u) + α) / β),  z = min(1, max(0, s·(r − l) + l)),

with stretch limits l < 0 < 1 < r, and in evaluation its deterministic value min(1, max(0, σ(α)(r − l) + l)).
The training objective adds the expected number of open gates (the relaxed L0 norm of the diff)

    λ · Σ_i P(z_i ≠ 0) = λ · Σ_i σ(α_i − β·log(−l/r))            (:meth:`DiffPruningTuned.regularization`).

w and α are dense over the backbone in this phase, as in the method itself: optimizer state is 4m
here, not O(⌊m·p⌋); the sparsity report says so.

Projection. After ``burn_in_steps`` optimizer steps the top ⌊m·p⌋ entries of α (per tensor or
global, ``scope``) are kept with their current diff ẑ⊙w as values (ẑ the evaluation gate, so θ does
not move on kept entries; ẑ = 1 wherever σ(α) ≥ (1 − l)/(r − l), i.e. α ≥ log 5 ≈ 1.6 for l, r = ∓1.5, so
this is w on the kept entries in practice); every other entry returns to θ0, and training continues
on the fixed mask in the :class:`~sparse_ft.delta.SparseDeltaTuned` parametrisation (O(⌊m·p⌋) state).
Guo et al. projected by the magnitude of the diff, Fu et al.'s code by |α|; here, as DESIGN §5 says,
by α (a very negative α is a closed gate, not an important entry).

Reprojection. ``reproject_every=K`` also projects every K steps during the gated phase: entries
outside the current top ⌊m·p⌋ of α get w = 0 (θ back at θ0 exactly) while training goes on densely.
The training loss jumps back at each projection, the projection discontinuity of Fu et al.'s
Figure 1; the trainer records the steps (``structure_changes``). After the last projection, at
``burn_in_steps``, the mask is fixed: α trains only in the gated phase, so a projection after it
would choose the same set.

Defaults (Guo et al. 2021, their released scripts): l, r = −1.5, 1.5; β = 1 (their relaxation has no
temperature); α init 5; λ = 1.25e-7 on the *sum* over entries (their loss is the mean cross-entropy
of a batch, as here; the penalty's size scales with m, 335M for their BERT-large); a separate learning
rate for α of 0.1 (``alpha_lr_scale=1000`` × this toolkit's default lr 1e-4; α gets no weight decay).
Burn-in: half of the run (Guo et al. train the gated and the fixed-mask phases for 3 epochs each);
Fu et al.'s code used 500 steps, with l, r = ∓3 and a mean instead of a sum in the penalty.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UserError, check_range
from ..models import TaskModel
from .base import BuildContext, register
from .masks import ScoredMaskConfig, SparseDeltaTuned, saved_indices, scope_budget

_EPS = 1e-6  # keeps log u and log(1 − u) finite


@register
@dataclass
class DiffPruningConfig(ScoredMaskConfig):
    """DiffPruning: hard-concrete gated diff with an L0 penalty, projected to the top ⌊m·p⌋ gate logits.

    Options (defaults from Guo et al. 2021, see the module docstring): ``burn_in_steps`` (None = half
    of the run), ``reproject_every`` (K > 0: also project every K steps of the gated phase),
    ``penalty`` λ, ``alpha_init``, ``stretch_lower`` l, ``stretch_upper`` r, ``temperature`` β,
    ``alpha_lr_scale`` (α's learning rate over the run's), ``scope``.
    """

    name = "diffpruning"
    citation = ("Guo, Rush and Kim 2021, Parameter-Efficient Transfer Learning with Diff Pruning (ACL); "
                "hard-concrete gates of Louizos, Welling and Kingma 2018")
    burn_in_steps: int | None = None
    reproject_every: int = 0
    penalty: float = 1.25e-7
    alpha_init: float = 5.0
    stretch_lower: float = -1.5
    stretch_upper: float = 1.5
    temperature: float = 1.0
    alpha_lr_scale: float = 1000.0

    def __post_init__(self):
        super().__post_init__()
        if self.burn_in_steps is not None:
            check_range("burn_in_steps", self.burn_in_steps, 1)
        check_range("reproject_every", self.reproject_every, 0)
        check_range("penalty", self.penalty, 0.0)
        check_range("stretch_lower", self.stretch_lower, high=0.0, high_open=True)
        check_range("stretch_upper", self.stretch_upper, 1.0, low_open=True)
        check_range("temperature", self.temperature, 0.0, low_open=True)
        check_range("alpha_lr_scale", self.alpha_lr_scale, 0.0, low_open=True)

    def score(self, model: TaskModel, context: BuildContext) -> dict[str, torch.Tensor]:
        raise UserError("diffpruning learns its scores (the gate logits α) in training: "
                        "it has no mask to select before `sparse-ft train`")

    def build(self, model: TaskModel, context: BuildContext) -> DiffPruningTuned:
        burn_in = self.burn_in_steps
        if burn_in is None:
            if context.max_steps is None:
                raise UserError("diffpruning needs burn_in_steps when the run length is unknown")
            burn_in = max(1, context.max_steps // 2)
        if context.max_steps is not None and burn_in > context.max_steps:
            raise UserError(f"burn_in_steps={burn_in} exceeds the run's {context.max_steps} steps: "
                            "the model would never be projected to p-sparse")
        return DiffPruningTuned(model, self, burn_in)

    def rebuild(self, model: TaskModel, state: dict[str, torch.Tensor], metadata: dict) -> SparseDeltaTuned:
        """A saved run after its projection is a plain sparse delta on the saved index sets (the same
        function); one saved in the gated phase gets its gates back."""
        if saved_indices(state):
            return super().rebuild(model, state, metadata)
        return DiffPruningTuned(model, self, self.burn_in_steps or 1)


class HardConcreteDelta(nn.Module):
    """θ = θ0 + z ⊙ w with hard-concrete gates z(α) (see the module docstring); a parametrisation of θ0."""

    def __init__(self, theta0: torch.Tensor, config: DiffPruningConfig):
        super().__init__()
        self.w = nn.Parameter(torch.zeros_like(theta0))
        self.log_alpha = nn.Parameter(torch.full_like(theta0, config.alpha_init))
        self.lower, self.upper = config.stretch_lower, config.stretch_upper
        self.temperature = config.temperature

    def gate(self, sample: bool) -> torch.Tensor:
        """A hard-concrete sample of z (``sample``) or its deterministic evaluation value."""
        if sample:
            u = torch.rand_like(self.log_alpha).clamp_(_EPS, 1 - _EPS)
            s = torch.sigmoid((u.log() - (-u).log1p() + self.log_alpha) / self.temperature)
        else:
            s = torch.sigmoid(self.log_alpha)
        return (s * (self.upper - self.lower) + self.lower).clamp(0.0, 1.0)

    def forward(self, theta0: torch.Tensor) -> torch.Tensor:
        return theta0 + self.gate(self.training) * self.w

    def open_probability(self) -> torch.Tensor:
        """P(z ≠ 0) = σ(α − β·log(−l/r)) per entry (Louizos et al. 2018)."""
        return torch.sigmoid(self.log_alpha - self.temperature * math.log(-self.lower / self.upper))

    @torch.no_grad()
    def diff(self) -> torch.Tensor:
        """θ − θ0 in evaluation: ẑ ⊙ w."""
        return self.gate(False) * self.w


class DiffPruningTuned(SparseDeltaTuned):
    """DiffPruning's two phases on one model: gated dense diff until ``burn_in_steps``, then a fixed
    p-sparse mask (the :class:`SparseDeltaTuned` parametrisation it inherits)."""

    def __init__(self, model: TaskModel, config: DiffPruningConfig, burn_in_steps: int):
        numels = [p.numel() for p in model.backbone.parameters()]
        super().__init__(model, config, {}, scope_budget(numels, config.sparsity, config.scope))
        self.burn_in_steps = burn_in_steps
        self._gates: dict[str, HardConcreteDelta] = {}
        for name, param in list(model.backbone.named_parameters()):
            gate = HardConcreteDelta(param.detach(), config)
            self._attach(name, gate)
            self._gates[name] = gate

    @property
    def gated(self) -> bool:
        return bool(self._gates)

    # -------------------------------------------------------------- training hooks
    def regularization(self) -> torch.Tensor | None:
        if not self.gated:
            return None
        return self.config.penalty * sum(g.open_probability().sum() for g in self._gates.values())

    def param_groups(self, weight_decay: float) -> list[dict]:
        """The inherited groups, with α moved to its own group: no decay, ``alpha_lr_scale`` × lr."""
        alphas = [g.log_alpha for g in self._gates.values()]
        ids = {id(a) for a in alphas}
        groups = [{**g, "params": [p for p in g["params"] if id(p) not in ids]}
                  for g in super().param_groups(weight_decay)]
        if alphas:
            groups.append({"params": alphas, "weight_decay": 0.0, "lr_scale": self.config.alpha_lr_scale})
        return [g for g in groups if g["params"]]

    def on_step_end(self, step: int) -> bool:
        if not self.gated:
            return False
        if step >= self.burn_in_steps:
            self.project(final=True)
            return True
        if self.config.reproject_every and step % self.config.reproject_every == 0:
            self.project(final=False)
            return True
        return False

    # -------------------------------------------------------------- the projection
    @torch.no_grad()
    def project(self, final: bool) -> dict[str, torch.Tensor]:
        """Keep the top ⌊m·p⌋ entries of α, send every other entry back to θ0; returns the kept
        index sets. ``final`` switches to the fixed-mask phase, else the gated phase goes on."""
        indices, _ = self.config.select_from_scores({n: g.log_alpha for n, g in self._gates.items()})
        if final:
            values = {n: self._gates[n].diff().reshape(-1)[idx.to(self._gates[n].w.device)]
                      for n, idx in indices.items()}
            for name in list(self._gates):
                self._detach(name)
            self._gates = {}
            self.set_indices(indices, values)
            return indices
        for name, gate in self._gates.items():
            keep = torch.zeros(gate.w.numel(), dtype=torch.bool, device=gate.w.device)
            if name in indices:
                keep[indices[name].to(keep.device)] = True
            gate.w.view(-1).masked_fill_(~keep, 0.0)
        return indices

    # -------------------------------------------------------------- accounting, saving
    @torch.no_grad()
    def changed_count(self) -> int:
        """In the gated phase: #{i : θ0_i + ẑ_i·w_i ≠ θ0_i} (evaluation gates), exact comparison."""
        total = super().changed_count()
        for name, gate in self._gates.items():
            theta0 = self.theta0(name)
            total += int((theta0 + gate.diff() != theta0).sum())
        return total
