"""The mask family: methods whose tuned model changes the backbone only on chosen index sets.

Random, BitFit, MagPruning, SAM, ChildPruning and DiffPruning (after projection) all end as a
:class:`SparseDeltaTuned`: per backbone tensor an index set I and trainable values v, θ = θ0 +
scatter(I, v) (the :class:`~sparse_ft.delta.SparseDelta` parametrisation). This module holds what they
share: the budget arithmetic (⌊p·numel⌋ per tensor or ⌊p·m⌋ overall), top-k selection, the tuned model,
the family's config bases and mask files (a saved tuned model without values, ``sparse-ft select``).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..delta import SparseDelta, delta_of, use_sparse_forward
from ..errors import UserError, check_choice, check_range
from ..models import TaskModel
from ..parametrized import unparametrize_copy
from .base import BuildContext, MethodConfig, TunedModel
from .saving import check_base, read_tuned, saved_config

SCOPES = ("per_tensor", "global")
INDICES_KEY = re.compile(r"^model\.backbone\.(.+)\.parametrizations\.(\w+)\.0\.indices$")


def budget_for(numel: int, sparsity: float) -> int:
    """⌊p·numel⌋, the number of entries a p-sparse tensor (or model) may change."""
    return int(sparsity * numel)


def check_scope(scope: str) -> None:
    check_choice("scope", scope, SCOPES)


def scope_budget(numels: list[int], sparsity: float, scope: str) -> int:
    """The budget of a selection: Σ_t ⌊p·numel_t⌋ (``per_tensor``) or ⌊p·m⌋, m = Σ_t numel_t (``global``)."""
    check_scope(scope)
    if scope == "global":
        return budget_for(sum(numels), sparsity)
    return sum(budget_for(n, sparsity) for n in numels)


def _flat_scores(score: torch.Tensor) -> torch.Tensor:
    """Scores keep their floating dtype (float64 scores, e.g. random ones, then have no ties)."""
    flat = score.detach().reshape(-1)
    return flat if flat.is_floating_point() else flat.float()


def select_top_k(scores: dict[str, torch.Tensor], sparsity: float,
                 scope: str = "per_tensor") -> dict[str, torch.Tensor]:
    """Flat indices of the highest scores: the top ⌊p·numel⌋ of each tensor (``per_tensor``) or the
    top ⌊p·m⌋ over all tensors together (``global``, m = Σ numel). Ties break arbitrarily but
    deterministically; the indices of each tensor come sorted."""
    check_range("sparsity", sparsity, 0.0, 1.0, low_open=True)
    check_scope(scope)
    if scope == "per_tensor":
        chosen = {}
        for name, score in scores.items():
            k = budget_for(score.numel(), sparsity)
            if k:
                chosen[name] = torch.topk(_flat_scores(score), k, sorted=False).indices.sort().values
        return chosen
    names = list(scores)
    flat = torch.cat([_flat_scores(scores[n]) for n in names])
    k = budget_for(flat.numel(), sparsity)
    top = torch.topk(flat, k, sorted=False).indices.sort().values
    offsets = torch.tensor([0] + [scores[n].numel() for n in names]).cumsum(0)
    chosen = {}
    for i, name in enumerate(names):
        lo, hi = int(offsets[i]), int(offsets[i + 1])
        part = top[(top >= lo) & (top < hi)] - lo
        if len(part):
            chosen[name] = part
    return chosen



def _owner(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    module_name, _, attr = name.rpartition(".")
    return (root.get_submodule(module_name) if module_name else root), attr



class SparseDeltaTuned(TunedModel):
    """A task model whose backbone changes only on given flat index sets (one per tensor).

    ``indices`` maps backbone parameter names (``encoder.layer.0.attention.self.query.weight``) to
    flat int64 indices; ``budget`` is what the method was allowed (⌊p·m⌋ or Σ⌊p·numel⌋).
    """

    def __init__(self, model: TaskModel, config: MethodConfig, indices: dict[str, torch.Tensor], budget: int):
        super().__init__(model, config)
        self.budget = budget
        model.backbone.requires_grad_(False)
        model.head.requires_grad_(True)
        self._orders = {name: [n for n, _ in module.named_parameters(recurse=False)]  # for the merge
                        for name, module in model.backbone.named_modules()}
        self._deltas: dict[str, SparseDelta] = {}
        self.set_indices(indices)

    # -------------------------------------------------------------- the index sets
    def indices(self) -> dict[str, torch.Tensor]:
        return {name: delta.indices for name, delta in self._deltas.items()}

    def theta0(self, name: str) -> torch.Tensor:
        """θ0 of a parametrised backbone tensor: the frozen original under the parametrisation (a new
        tensor for a SparseDelta, whose stored tensor holds θ)."""
        module, attr = _owner(self.model.backbone, name)
        stored, delta = module.parametrizations[attr].original, delta_of(module, attr)
        return stored if delta is None else delta.theta0(stored)

    def _attach(self, name: str, parametrization: nn.Module) -> None:
        """Parametrise backbone tensor ``name`` by ``parametrization(θ0)``; θ0 stays frozen."""
        module, attr = _owner(self.model.backbone, name)
        parametrize.register_parametrization(module, attr, parametrization)
        module.parametrizations[attr].original.requires_grad_(False)
        if isinstance(parametrization, SparseDelta):
            use_sparse_forward(module)

    def _detach(self, name: str) -> None:
        """Remove the parametrisation of ``name``: the tensor is θ0 again, frozen."""
        module, attr = _owner(self.model.backbone, name)
        delta = delta_of(module, attr)
        if delta is not None:
            delta.restore(module.parametrizations[attr].original)
        parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
        getattr(module, attr).requires_grad_(False)

    def prepare_functional(self) -> None:
        """Make every stored tensor hold θ0 again; the values are kept, and the next forward on the fast
        path writes θ back. Needed where the values are substituted (``functional_call``), whose
        out-of-place definition reads θ0 from the stored tensor outside the substituted indices."""
        for name, delta in self._deltas.items():
            module, attr = _owner(self.model.backbone, name)
            delta.restore(module.parametrizations[attr].original)

    def dense_delta(self, name: str) -> torch.Tensor:
        """θ − θ0 of one tensor, dense."""
        delta = self._deltas[name]
        theta0 = self.theta0(name)
        return torch.zeros(theta0.numel(), dtype=delta.values.dtype, device=theta0.device).index_add_(
            0, delta.indices, delta.values.detach()).view_as(theta0)

    def set_indices(self, indices: dict[str, torch.Tensor],
                    values: dict[str, torch.Tensor] | None = None) -> None:
        """Project onto new index sets: entries that stay keep their values, entries that leave the
        mask return to θ0, new entries start at θ0 (DESIGN §5, the projection of ChildPruning and
        DiffPruning), unless ``values`` gives a tensor's new values (aligned with its indices).
        The trainer must rebuild its optimizer afterwards."""
        backbone = self.model.backbone
        params = dict(backbone.named_parameters())
        unknown = set(indices) - set(params) - set(self._deltas)
        if unknown:
            raise UserError(f"mask names tensors the backbone does not have: {sorted(unknown)[:3]}")
        kept = {}
        for name in list(self._deltas):
            kept[name] = self.dense_delta(name).reshape(-1)
            self._detach(name)
        self._deltas = {}
        for name, idx in indices.items():
            module, attr = _owner(backbone, name)
            theta0 = getattr(module, attr)
            idx = idx.to(theta0.device, torch.long)
            if len(idx) and (int(idx.max()) >= theta0.numel() or int(idx.min()) < 0):
                raise UserError(f"mask indices out of range for {name} ({theta0.numel()} entries)")
            if values is not None and name in values:
                start = values[name].to(theta0.device, theta0.dtype)
            else:
                start = kept[name][idx] if name in kept else None
            delta = SparseDelta(theta0, idx, start)
            self._attach(name, delta)
            self._deltas[name] = delta

    # -------------------------------------------------------------- accounting
    @torch.no_grad()
    def changed_count(self) -> int:
        """Σ_t #{i ∈ I_t : θ_i ≠ θ0_i}, by exact comparison (entries outside I_t are θ0 by construction)."""
        total = 0
        for name, delta in self._deltas.items():
            module, attr = _owner(self.model.backbone, name)
            theta = getattr(module, attr).reshape(-1)[delta.indices]
            total += int((theta != delta.theta0_at).sum())
        return total

    def budget_and_changed(self) -> tuple[int, int]:
        return self.budget, self.changed_count()

    # -------------------------------------------------------------- merge
    def merge_into_dense(self) -> TaskModel:
        """A plain TaskModel with θ = θ0 + scatter(I, v) written into its tensors, in the pretrained
        parameter order (parametrisations are evaluated in eval mode, so a stochastic one gives its
        deterministic value)."""
        merged = copy.deepcopy(self.model)
        merged.eval()
        for name, module in merged.backbone.named_modules():
            if parametrize.is_parametrized(module):
                unparametrize_copy(module, self._orders.get(name))
        return merged.train(self.model.training)


def saved_indices(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The index sets in a saved tuned model's state, by backbone tensor name."""
    found = {}
    for key, tensor in state.items():
        match = INDICES_KEY.match(key)
        if match:
            found[f"{match.group(1)}.{match.group(2)}"] = tensor
    return found


def load_mask_into(path: str, model: TaskModel, config: MethodConfig) -> SparseDeltaTuned:
    """Train-from-mask: the index sets of a saved mask on ``model``, values at 0, the run's own head.

    The tuned model carries the config the mask was selected with (its sparsity, scope, options);
    a mask of another method than ``config``'s is refused, and so is a file for another base model.
    """
    state, metadata = read_tuned(path)
    check_base(path, metadata, model)
    saved = saved_config(metadata)
    if saved.name != config.name:
        raise UserError(f"{path!r} holds a {saved.name!r} mask, not a {config.name!r} one; "
                        f"pass --method {saved.name}")
    indices = saved_indices(state)
    if not indices:
        raise UserError(f"{path!r} holds no index sets: it is not a mask of a mask method")
    return SparseDeltaTuned(model, saved, indices, int(metadata["budget"]))


@dataclass
class MaskMethodConfig(MethodConfig):
    """Base of the mask methods: ``select`` chooses the index sets and their budget; the tuned model is a
    :class:`SparseDeltaTuned` on them. A saved run is rebuilt from its index sets, without data."""

    def select(self, model: TaskModel, context: BuildContext) -> tuple[dict[str, torch.Tensor], int]:
        """The index sets (backbone tensor name → flat int64 indices) and the budget they were chosen under."""
        raise NotImplementedError

    def build(self, model: TaskModel, context: BuildContext) -> SparseDeltaTuned:
        indices, budget = self.select(model, context)
        return SparseDeltaTuned(model, self, indices, budget)

    def rebuild(self, model: TaskModel, state: dict[str, torch.Tensor], metadata: dict) -> SparseDeltaTuned:
        return SparseDeltaTuned(model, self, saved_indices(state), int(metadata["budget"]))


@dataclass
class ScoredMaskConfig(MaskMethodConfig):
    """A mask method that scores every backbone entry, then keeps the top ⌊p·numel⌋ per tensor
    (``scope="per_tensor"``) or the top ⌊p·m⌋ overall (``scope="global"``)."""

    sparsity: float | None = 0.005
    scope: str = "per_tensor"

    def __post_init__(self):
        check_scope(self.scope)

    def score(self, model: TaskModel, context: BuildContext) -> dict[str, torch.Tensor]:
        """One score per backbone entry, for every backbone tensor; higher means more worth tuning."""
        raise NotImplementedError

    def select_from_scores(self, scores: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
        """The top-k index sets of ``scores`` (one tensor per backbone tensor) and their budget."""
        indices = select_top_k(scores, self.sparsity, self.scope)
        return indices, scope_budget([s.numel() for s in scores.values()], self.sparsity, self.scope)

    def select(self, model: TaskModel, context: BuildContext) -> tuple[dict[str, torch.Tensor], int]:
        return self.select_from_scores(self.score(model, context))
