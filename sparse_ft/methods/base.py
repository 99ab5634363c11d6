"""The unified view of the paper: every method turns a pretrained backbone into a *tuned model*.

A :class:`TunedModel` knows (a) its tunable tensors, (b) θ0, (c) how to report ||θ − θ0||₀ against
the backbone size m, and (d) how to save, load and merge itself (DESIGN §1). Each method is a small
config dataclass registered under its name; ``config.build(task_model, context)`` returns the tuned
model. The trainer only talks to this interface, so a new method plugs in without touching the loop.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..errors import UserError, check_range
from ..models import TaskModel

METHODS: dict[str, type[MethodConfig]] = {}

NO_DECAY_MARKERS = ("bias", "layernorm", "layer_norm", "norm.weight")


def register(cls):
    """Class decorator: make a method config available under ``cls.name``."""
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[MethodConfig]:
    try:
        return METHODS[name]
    except KeyError:
        raise UserError(f"unknown method {name!r}; known methods: {', '.join(METHODS)}") from None


def make_method_config(name: str, sparsity: float | None = None, **options) -> MethodConfig:
    """The config of method ``name`` with its documented defaults, ``sparsity`` and known ``options``.

    Raises :class:`UserError` for an unknown method or option, p outside (0, 1], or a sparsity given to
    a method that fixes its own (full, bitfit, mixout: set mixout's r with ``ratio``)."""
    if sparsity is not None:
        check_range("sparsity", sparsity, 0.0, 1.0, low_open=True)
    cls = get_method(name)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise UserError(f"method {name!r} has no option(s) {unknown}; options: {sorted(known)}")
    if sparsity is not None and not cls.uses_sparsity:
        raise UserError(f"method {name!r} fixes its own sparsity; do not pass --sparsity{cls.sparsity_hint}")
    return cls(**options) if sparsity is None else cls(sparsity=sparsity, **options)


def config_from_dict(fields: dict) -> MethodConfig:
    """The config that :meth:`MethodConfig.to_dict` wrote (keys that are not fields, such as derived
    values, are ignored)."""
    cls = get_method(fields["name"])
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in fields.items() if k in known})


def backbone_fingerprint(backbone: nn.Module) -> str:
    """A hash of θ0's identity: names, shapes, sums and a few values of every floating backbone tensor.
    Saved with every tuned model, so that a file is never applied to another base model."""
    digest = hashlib.sha256()
    for name, tensor in backbone.state_dict().items():
        if not tensor.is_floating_point():
            continue
        flat = tensor.detach().reshape(-1)
        probe = torch.cat([flat[:8], flat[-8:]]).double().cpu()
        digest.update(f"{name}{tuple(tensor.shape)}{float(flat.double().sum()):.6e}".encode())
        digest.update(probe.numpy().tobytes())
    return digest.hexdigest()[:16]


def backbone_size(model: TaskModel) -> int:
    """m: the number of backbone parameters (the head is excluded, DESIGN §2)."""
    return sum(p.numel() for p in model.backbone.parameters())


def is_no_decay(name: str) -> bool:
    """Biases and LayerNorm parameters get no weight decay (DESIGN §4)."""
    lowered = name.lower()
    return any(marker in lowered for marker in NO_DECAY_MARKERS)


@dataclass
class BuildContext:
    """What a method may need to build its tuned model.

    ``selection_batches`` yields training batches at θ0 for gradient-based scorers (SAM, Fisher), in file
    order; ``training_batches`` yields one epoch of the shuffled training loader (SAM's ``rule="authors"``);
    ``mask_seed`` seeds every random choice of the method (DESIGN §4's third seed);
    ``max_steps`` is the length of the training run, when known (DiffPruning fits its phases into it).
    """

    selection_batches: Callable[[], Iterable[dict]] | None = None
    training_batches: Callable[[], Iterable[dict]] | None = None
    mask_seed: int = 0
    device: torch.device | str = "cpu"
    max_steps: int | None = None

    @contextlib.contextmanager
    def seeded(self):
        """Within the block, random initialisations (LoRA's A, an adapter's down projection) draw from
        ``mask_seed``; the global generators are left as they were."""
        device = torch.device(self.device)
        with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
            torch.manual_seed(self.mask_seed)
            yield


@dataclass
class MethodConfig:
    """Base of every method config. ``sparsity`` is p, the fraction of the m backbone parameters
    that may change; methods that fix it themselves (full, bitfit) set ``uses_sparsity = False``."""

    name: ClassVar[str] = ""
    uses_sparsity: ClassVar[bool] = True
    sparsity_hint: ClassVar[str] = ""  # how to set p instead, for methods that fix their own
    citation: ClassVar[str] = ""
    sparsity: float | None = None

    def build(self, model: TaskModel, context: BuildContext) -> TunedModel:
        raise NotImplementedError

    def rebuild(self, model: TaskModel, state: dict[str, torch.Tensor], metadata: dict) -> TunedModel:
        """The structure of a saved tuned model on ``model`` (at θ0), before its saved state is loaded:
        no data is needed. The default builds afresh; the mask family rebuilds from the saved index sets."""
        return self.build(model, BuildContext())

    def to_dict(self) -> dict:
        return {"name": self.name, **dataclasses.asdict(self)}


@dataclass
class SparsityReport:
    """||θ − θ0||₀ of the backbone against its size m.

    ``budget`` is the most entries the method may change (⌊p·m⌋ for masks, m for full fine-tuning,
    the added parameters for additive methods); ``changed`` is the realised count, by exact
    comparison with θ0 (for additive methods, the added parameters); ``realized`` = changed / m.
    """

    backbone_params: int
    budget: int
    changed: int
    trainable: int
    head_params: int
    additive: bool = False

    @property
    def realized(self) -> float:
        return self.changed / self.backbone_params

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "realized": self.realized}

    def __str__(self) -> str:
        kind = "added parameters" if self.additive else "changed backbone entries"
        return (f"trainable {self.trainable:,} (+{self.head_params:,} head) | backbone m={self.backbone_params:,} | "
                f"budget {self.budget:,} ({self.budget / self.backbone_params:.4%}) | "
                f"{kind} {self.changed:,} ({self.realized:.4%} realised)")


class Theta0Snapshot:
    """A frozen copy of the backbone at θ0, for methods that change it densely (full, mixout).

    Mask methods keep θ0 inside their parametrisation and do not need this copy.
    """

    def __init__(self, backbone: nn.Module):
        self.tensors = {n: p.detach().to("cpu", copy=True) for n, p in backbone.named_parameters()}

    @torch.no_grad()
    def count_changed(self, backbone: nn.Module) -> int:
        """Σ over tensors of #{i : θ_i ≠ θ0_i}, compared exactly."""
        return sum(int((p.detach().cpu() != self.tensors[n]).sum()) for n, p in backbone.named_parameters())


class TunedModel(nn.Module, abc.ABC):
    """A task model whose backbone a method has made tunable in its own way.

    Subclasses set which tensors train and implement :meth:`sparsity_report` and
    :meth:`merge_into_dense`; the other hooks have defaults that suit most methods.
    """

    def __init__(self, model: TaskModel, config: MethodConfig):
        super().__init__()
        self.model = model
        self.config = config
        self.backbone_params = backbone_size(model)
        self.fingerprint = backbone_fingerprint(model.backbone)  # of θ0: nothing has changed it yet

    def forward(self, batch: dict) -> torch.Tensor:
        return self.model(batch)

    @property
    def task(self):
        return self.model.task

    def loss(self, batch: dict) -> torch.Tensor:
        """Mean task loss of a batch (the training objective adds :meth:`regularization`)."""
        return self.model.loss(batch)

    def regularization(self) -> torch.Tensor | None:
        """An extra training penalty (DiffPruning's expected L0); None for most methods."""
        return None

    def on_step_end(self, step: int) -> bool:
        """Called after each optimizer step; return True when the set of trainable tensors changed
        (a projection), so the trainer rebuilds its optimizer."""
        return False

    def prepare_functional(self) -> None:
        """Make the module ready for ``torch.func.functional_call`` with substituted tensors (the sparse
        delta's stored tensors must hold θ0 then); a no-op for most methods."""

    @property
    def eval_is_random(self) -> bool:
        """True when the evaluation-mode function is random (Mixout's eval-time reset)."""
        return False

    @contextlib.contextmanager
    def frozen_evaluation(self, seed: int = 0):
        """Within the block, the evaluation-mode function is one fixed function: a random one
        (:attr:`eval_is_random`) is drawn once from ``seed``. Yields a record of the draw (a dict for
        the measurement's JSON), empty for deterministic methods."""
        yield {}

    def head_param_count(self) -> int:
        return sum(p.numel() for p in self.model.head.parameters())

    def trainable_param_count(self) -> int:
        """Trainable entries outside the head (what the optimizer keeps state for, head aside)."""
        head = {id(p) for p in self.model.head.parameters()}
        return sum(p.numel() for p in self.parameters() if p.requires_grad and id(p) not in head)

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: decay on weights, none on biases and LayerNorm (DESIGN §4)."""
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if param.requires_grad:
                (no_decay if is_no_decay(name) else decay).append(param)
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """What the trainer keeps for the best checkpoint: trainable tensors and buffers (masks)."""
        keep = {n for n, p in self.named_parameters() if p.requires_grad} | {n for n, _ in self.named_buffers()}
        return {k: v.detach().clone() for k, v in self.state_dict().items() if k in keep}

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(state) - set(self.state_dict())
        if missing:
            raise UserError(f"saved state does not fit this {self.config.name} model: {sorted(missing)[:3]}")
        self.load_state_dict(state, strict=False)

    additive: ClassVar[bool] = False  # True: the method adds parameters (counted as the budget and as changed)

    def sparsity_report(self) -> SparsityReport:
        """||θ − θ0||₀ against m, with the budget (DESIGN §5): the one place a report is built."""
        budget, changed = self.budget_and_changed()
        return SparsityReport(backbone_params=self.backbone_params, budget=budget, changed=changed,
                              trainable=self.trainable_param_count(), head_params=self.head_param_count(),
                              additive=self.additive)

    @abc.abstractmethod
    def budget_and_changed(self) -> tuple[int, int]:
        """(budget, changed): the most backbone entries the method may change (or the parameters it adds),
        and how many differ from θ0 now by exact comparison (or the added ones)."""

    @abc.abstractmethod
    def merge_into_dense(self) -> TaskModel:
        """A plain :class:`~sparse_ft.models.TaskModel` (a copy; this model is left as it is) whose
        backbone holds the weights this tuned model evaluates with: same logits in eval mode, no
        parametrisation, LoRA wrapper or hook of the method left (an adapter is nonlinear, so its copy
        keeps it as a submodule)."""

    def describe(self) -> str:
        """The trainable-parameter printout: method, trainable count, budget and realised sparsity."""
        return f"{self.config.name}: {self.sparsity_report()}"
