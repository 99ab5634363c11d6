"""The p-sparse parametrisation shared by every mask method (DESIGN §1).

For each selected backbone tensor θ⁽ᵗ⁾ with flat index set I_t (|I_t| = k_t),

    θ⁽ᵗ⁾ = θ0⁽ᵗ⁾ + scatter(I_t, v_t),        v_t ∈ R^{k_t} trainable, θ0 frozen,

so ||θ − θ0||₀ ≤ Σ_t k_t by construction, the optimizer only ever sees the values v (its state
scales with the budget ⌊mp⌋, not with m), and no update, weight decay included, can move an entry
outside the mask. Weight decay on v pulls θ towards θ0 on the mask, the ||θ − θ0||² term of the
paper's relaxed objective.

The parametrisation is :mod:`torch.nn.utils.parametrize`, so ``module.weight`` stays an ordinary
tensor for the module's own forward; the gradient of v is the dense weight gradient gathered at I_t.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils import parametrize

from .errors import UserError, check_range
from .methods.base import BuildContext, MethodConfig, SparsityReport, TunedModel, get_method
from .models import TaskModel

SCOPES = ("per_tensor", "global")
INDEX_PREFIX = "indices/"


class SparseDelta(nn.Module):
    """θ = θ0 + scatter(indices, values) on the flattened tensor (a parametrisation of θ0)."""

    def __init__(self, indices: torch.Tensor, values: torch.Tensor | None = None, dtype=torch.float32):
        super().__init__()
        self.register_buffer("indices", indices.to(torch.long))
        init = torch.zeros(len(indices), dtype=dtype, device=indices.device) if values is None else values
        self.values = nn.Parameter(init.detach().clone())

    def forward(self, theta0: torch.Tensor) -> torch.Tensor:
        flat = torch.index_add(theta0.reshape(-1), 0, self.indices, self.values.to(theta0.dtype))
        return flat.view_as(theta0)


def budget_for(numel: int, sparsity: float) -> int:
    """⌊p·numel⌋, the number of entries a p-sparse tensor (or model) may change."""
    return int(sparsity * numel)


def check_scope(scope: str) -> None:
    if scope not in SCOPES:
        raise UserError(f"scope must be one of {SCOPES}, got {scope!r}")


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


def _freeze_parametrized(module: nn.Module) -> None:
    """Replace a deep-copied parametrised module's tensors by their current values.

    ``parametrize.remove_parametrizations`` deletes the property from the module's dynamically made
    class, which a deep copy shares with the original, so it would break the original model too;
    here only the copy's instance is changed.
    """
    tensors = {attr: getattr(module, attr).detach().clone() for attr in module.parametrizations}
    module.__class__ = module.__class__.__bases__[0]
    del module.parametrizations
    for attr, tensor in tensors.items():
        module.register_parameter(attr, nn.Parameter(tensor, requires_grad=False))


def _owner(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    module_name, _, attr = name.rpartition(".")
    return (root.get_submodule(module_name) if module_name else root), attr


def backbone_fingerprint(backbone: nn.Module) -> str:
    """A hash of θ0's identity: names, shapes and a few values of every backbone tensor."""
    digest = hashlib.sha256()
    for name, tensor in backbone.state_dict().items():
        if not tensor.is_floating_point():
            continue
        flat = tensor.detach().reshape(-1)
        probe = torch.cat([flat[:8], flat[-8:]]).double().cpu()
        digest.update(f"{name}{tuple(tensor.shape)}{float(flat.double().sum()):.6e}".encode())
        digest.update(probe.numpy().tobytes())
    return digest.hexdigest()[:16]


class SparseDeltaTuned(TunedModel):
    """A task model whose backbone changes only on given flat index sets (one per tensor).

    ``indices`` maps backbone parameter names (``encoder.layer.0.attention.self.query.weight``) to
    flat int64 indices; ``budget`` is what the method was allowed (⌊p·m⌋ or Σ⌊p·numel⌋).
    """

    def __init__(self, model: TaskModel, config: MethodConfig, indices: dict[str, torch.Tensor], budget: int):
        super().__init__(model, config)
        self.budget = budget
        self.fingerprint = backbone_fingerprint(model.backbone)
        model.backbone.requires_grad_(False)
        model.head.requires_grad_(True)
        self._deltas: dict[str, SparseDelta] = {}
        self.set_indices(indices)

    # -------------------------------------------------------------- the index sets
    def indices(self) -> dict[str, torch.Tensor]:
        return {name: delta.indices for name, delta in self._deltas.items()}

    def theta0(self, name: str) -> torch.Tensor:
        """θ0 of a parametrised backbone tensor (the frozen original under the parametrisation)."""
        module, attr = _owner(self.model.backbone, name)
        return module.parametrizations[attr].original

    def _attach(self, name: str, parametrization: nn.Module) -> None:
        """Parametrise backbone tensor ``name`` by ``parametrization(θ0)``; θ0 stays frozen."""
        module, attr = _owner(self.model.backbone, name)
        parametrize.register_parametrization(module, attr, parametrization)
        module.parametrizations[attr].original.requires_grad_(False)

    def _detach(self, name: str) -> None:
        """Remove the parametrisation of ``name``: the tensor is θ0 again, frozen."""
        module, attr = _owner(self.model.backbone, name)
        parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
        getattr(module, attr).requires_grad_(False)

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
            delta = SparseDelta(idx, start, dtype=theta0.dtype)
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
            total += int((theta != self.theta0(name).reshape(-1)[delta.indices]).sum())
        return total

    def sparsity_report(self) -> SparsityReport:
        return SparsityReport(backbone_params=self.backbone_params, budget=self.budget,
                              changed=self.changed_count(), trainable=self.trainable_param_count(),
                              head_params=self.head_param_count())

    # -------------------------------------------------------------- merge, save, load
    def merge_into_dense(self) -> TaskModel:
        """A plain TaskModel with θ = θ0 + scatter(I, v) written into its tensors (parametrisations
        are evaluated in eval mode, so a stochastic one gives its deterministic value)."""
        merged = copy.deepcopy(self.model)
        merged.eval()
        for module in merged.modules():
            if parametrize.is_parametrized(module):
                _freeze_parametrized(module)
        return merged.train(self.model.training)

    def save(self, path: str, values: bool = True) -> None:
        """safetensors: indices (and values and the absolute head), the method config, θ0's fingerprint."""
        tensors = {f"{INDEX_PREFIX}{n}": d.indices.cpu().contiguous() for n, d in self._deltas.items()}
        if values:
            tensors.update({f"values/{n}": d.values.detach().cpu().contiguous()
                            for n, d in self._deltas.items()})
            tensors.update({f"head/{n}": p.detach().cpu().contiguous()
                            for n, p in self.model.head.state_dict().items()})
        metadata = {"method": json.dumps(self.config.to_dict()), "fingerprint": self.fingerprint,
                    "budget": str(self.budget), "backbone_params": str(self.backbone_params)}
        save_file(tensors, path, metadata=metadata)


def _read(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
        return load_file(path), metadata
    except (OSError, FileNotFoundError):
        raise UserError(f"cannot read mask file {path!r}") from None
    except Exception as exc:  # noqa: BLE001 - a corrupt file is one clear line
        raise UserError(f"{path!r} is not a sparse-ft mask file ({type(exc).__name__})") from None


def _check_base(path: str, metadata: dict, model: TaskModel) -> None:
    expected = metadata.get("fingerprint")
    actual = backbone_fingerprint(model.backbone)
    if expected != actual:
        raise UserError(f"{path!r} was made for another base model "
                        f"(fingerprint {expected}, this one {actual})")


def load_sparse_delta(path: str, model: TaskModel) -> SparseDeltaTuned:
    """Rebuild a saved tuned model (indices, values, head) on ``model``; refuses a different base."""
    tensors, metadata = _read(path)
    _check_base(path, metadata, model)
    config = _saved_config(metadata)
    indices = {k[len(INDEX_PREFIX):]: v for k, v in tensors.items() if k.startswith(INDEX_PREFIX)}
    tuned = SparseDeltaTuned(model, config, indices, int(metadata["budget"]))
    with torch.no_grad():
        for name, delta in tuned._deltas.items():
            if f"values/{name}" in tensors:
                delta.values.copy_(tensors[f"values/{name}"])
        head = {k[len("head/"):]: v for k, v in tensors.items() if k.startswith("head/")}
        if head:
            model.head.load_state_dict(head)
    return tuned


def _saved_config(metadata: dict) -> MethodConfig:
    config_dict = json.loads(metadata["method"])
    return get_method(config_dict.pop("name"))(**config_dict)


def load_mask_into(path: str, model: TaskModel, config: MethodConfig) -> SparseDeltaTuned:
    """Train-from-mask: the index sets of a saved mask on ``model``, values at 0, the run's own head.

    The tuned model carries the config the mask was selected with (its sparsity, scope, options);
    a mask of another method than ``config``'s is refused.
    """
    tensors, metadata = _read(path)
    _check_base(path, metadata, model)
    saved = _saved_config(metadata)
    if saved.name != config.name:
        raise UserError(f"{path!r} holds a {saved.name!r} mask, not a {config.name!r} one; "
                        f"pass --method {saved.name}")
    indices = {k[len(INDEX_PREFIX):]: v for k, v in tensors.items() if k.startswith(INDEX_PREFIX)}
    return SparseDeltaTuned(model, saved, indices, int(metadata["budget"]))


@dataclass
class MaskMethodConfig(MethodConfig):
    """Base of the mask methods: a scorer over backbone tensors, then the top ⌊p·numel⌋ per tensor
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
        """The index sets and the budget they were chosen under."""
        return self.select_from_scores(self.score(model, context))

    def build(self, model: TaskModel, context: BuildContext) -> SparseDeltaTuned:
        indices, budget = self.select(model, context)
        return SparseDeltaTuned(model, self, indices, budget)


# Imported before sparse_ft.methods, this module made the package defer its method modules (the mask
# methods subclass the classes above); import them now. See sparse_ft/methods/__init__.py.
from . import methods as _methods

if _methods.deferred:
    _methods.import_method_modules()
