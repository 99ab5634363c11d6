"""Any Hugging Face ``PreTrainedModel`` presented as the task model that the methods consume.

Every method (:mod:`sparse_ft.methods`) turns a *task model* into a tuned model. A task model is an
``nn.Module`` with

* ``backbone``: the module whose parameters are the m entries that sparsity is counted against;
* ``head``: a module trained absolutely beside the method's entries and excluded from m (may be empty);
* ``loss(batch)``: the mean loss of a batch (a scalar), and ``forward(batch)``: its logits.

:class:`sparse_ft.models.TaskModel` is one (a bare encoder plus sparse-ft's heads for the paper's tasks);
:class:`HFTaskModel` is the other: a transformers model, whole, with its own forward and its own loss
(sequence classification's cross-entropy, a causal LM's shifted next-token loss), split into backbone and
head by name. The methods see no difference: they parametrise, wrap or hook modules *inside* the backbone,
and the transformers model, which holds those same module objects, runs them.

**The split** (peft's vocabulary): ``backbone`` is a dotted submodule path, by default the model's
``base_model_prefix`` ("bert", "roberta", "transformer", "model"), or ``""`` for a bare base model (then m
is every parameter). ``modules_to_save`` are the head's modules, by default every other top-level child
(``classifier``, ``score``, ``lm_head``, BERT's ``dropout``). A tensor tied across the border (a causal LM's
``lm_head.weight is transformer.wte.weight``) is one tensor: it stays in the backbone, counted once in m,
and the outside module becomes a view of it (:mod:`sparse_ft.ties`), so a tied ``lm_head`` adds nothing to
the head. Parameters in neither part are frozen and reported.

The transformers model is not registered as a child: the provider's parameters are exactly the backbone's
and the head's, under ``backbone.*`` and ``head.*`` (the names saved tuned models use). ``.to()``,
``.train()`` and ``.eval()`` reach the whole transformers model.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import UserError
from .ties import find_ties, make_views, restore_ties

HEAD_KEY_SEPARATOR = "__"  # a dotted module path as a ModuleDict key ("cls.predictions" -> "cls__predictions")


def default_backbone(model: nn.Module) -> str:
    """The path of ``model``'s base model (``base_model_prefix``, e.g. "roberta"), or ``""`` when ``model``
    is a bare base model itself (``BertModel``)."""
    prefix = getattr(model, "base_model_prefix", "")
    return prefix if prefix and isinstance(getattr(model, prefix, None), nn.Module) else ""


def _submodule(model: nn.Module, path: str, role: str) -> nn.Module:
    try:
        return model.get_submodule(path) if path else model
    except AttributeError:
        children = ", ".join(n for n, _ in model.named_children())
        raise UserError(f"{type(model).__name__} has no module {path!r} for the {role}; "
                        f"its top-level modules: {children}") from None


def _inside(name: str, path: str) -> bool:
    return not path or name == path or name.startswith(path + ".")


class HFTaskModel(nn.Module):
    """A transformers model as a task model: ``backbone`` (m), ``head`` (``modules_to_save``), its own loss.

    ``model``: any ``transformers.PreTrainedModel`` (changed in place: tied weights become views, parameters
    outside backbone and head are frozen); ``backbone``: dotted path of the submodule whose parameters are m
    (None: :func:`default_backbone`); ``modules_to_save``: the head's module paths (None: every top-level
    child but the backbone). Batches are dicts of tensors the model's ``forward`` accepts, with ``labels``
    for :meth:`loss`. Raises :class:`~sparse_ft.errors.UserError` for a path the model lacks, a head module
    inside the backbone (or the reverse), or a head that shares a tensor with the backbone.
    """

    def __init__(self, model: nn.Module, backbone: str | None = None, modules_to_save: list[str] | None = None):
        super().__init__()
        path = default_backbone(model) if backbone is None else backbone
        self.backbone = _submodule(model, path, "backbone")
        if modules_to_save is None:
            modules_to_save = [n for n, _ in model.named_children() if path and not _inside(path, n)]
        for name in modules_to_save:
            if _inside(name, path) or _inside(path, name):
                raise UserError(f"head module {name!r} overlaps the backbone {path or '(the whole model)'!r}")
        self.head = nn.ModuleDict({n.replace(".", HEAD_KEY_SEPARATOR): _submodule(model, n, "head")
                                   for n in modules_to_save})
        self.backbone_path, self.head_paths = path, list(modules_to_save)
        self.backbone_params = sum(p.numel() for p in self.backbone.parameters())  # m, before any method adds to it
        self.ties = find_ties(model, path)
        make_views(model, self.ties)
        shared = {id(p) for p in self.backbone.parameters()} & {id(p) for p in self.head.parameters()}
        if shared:
            raise UserError(f"the head {self.head_paths} shares {len(shared)} tensor(s) with the backbone; "
                            "leave tied modules out of modules_to_save")
        own = {id(p) for p in self.parameters()}
        self.outside = [n for n, p in model.named_parameters() if id(p) not in own]
        for name, param in model.named_parameters():
            if id(param) not in own:
                param.requires_grad_(False)
        object.__setattr__(self, "hf", model)  # not a child: the parameters stay backbone.* and head.*

    # ------------------------------------------------------------------ the task model interface
    def forward(self, batch: dict) -> torch.Tensor:
        """The model's logits for ``batch`` (shape as the model returns them, e.g. (B, C) or (B, L, |V|))."""
        return self.hf(**batch).logits

    def loss(self, batch: dict) -> torch.Tensor:
        """The model's own mean loss of ``batch`` (a 0-d tensor; needs ``labels`` in the batch)."""
        loss = self.hf(**batch).loss
        if loss is None:
            raise UserError(f"{type(self.hf).__name__} returned no loss: batches need 'labels'")
        return loss

    # ------------------------------------------------------------------ the whole transformers model
    def _apply(self, fn, recurse=True):
        self.hf._apply(fn, recurse)  # backbone and head are inside it
        return self

    def train(self, mode: bool = True):
        """Training (``mode``) or evaluation mode for the whole transformers model; returns the provider."""
        super().train(mode)
        self.hf.train(mode)
        return self

    def to_plain(self) -> nn.Module:
        """The transformers model with its ties restored and every parameter trainable, as
        ``from_pretrained`` would give it: for merged copies (``merge_into_dense``), whose backbone holds
        plain tensors again. The provider must not be used afterwards."""
        restore_ties(self.hf, self.ties)
        return self.hf.requires_grad_(True)

    # ------------------------------------------------------------------ description
    def split(self) -> dict:
        """The split as JSON: ``backbone`` path, ``modules_to_save``, ``ties`` {outside: inside name}."""
        return {"backbone": self.backbone_path, "modules_to_save": self.head_paths, "ties": self.ties}

    def describe_split(self) -> str:
        """What counts in m, what trains beside it, what is tied and what is frozen, one line each."""
        head = sum(p.numel() for p in self.head.parameters())
        heads = ", ".join(self.head_paths) or "(none)"
        lines = [f"backbone (m): {self.backbone_path or '(the whole model)'}, {self.backbone_params:,} parameters",
                 f"head (modules_to_save, trained absolutely, not in m): {heads}, {head:,} parameters"]
        lines += [f"tied: {outside} is {inside} (one tensor, counted once in m; changing it changes both uses)"
                  for outside, inside in self.ties.items()]
        if self.outside:
            outside = set(self.outside)
            frozen = sum(p.numel() for n, p in self.hf.named_parameters() if n in outside)
            lines.append(f"frozen (neither backbone nor head): {len(self.outside)} tensors, {frozen:,} parameters")
        return "\n".join(lines)
