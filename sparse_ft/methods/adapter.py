"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021): new modules, backbone frozen.

An adapter is a residual bottleneck ``A(h) = W_up f(W_down h + b_down) + b_up`` with
``W_down ∈ R^{b×d}``, ``W_up ∈ R^{d×b}`` and ``b = ⌊d / reduction_factor⌋``. In a post-LN encoder
(BERT, RoBERTa, ELECTRA, XLM-R, MiniLM) every sublayer ends in ``LN(h + x)``, where
``h = dropout(dense(·))`` is the sublayer output and ``x`` its input. The two variants are

* ``houlsby``: two adapters per layer, after the attention output and after the feed-forward output,
  each before the residual and the LayerNorm: ``LN(h + A(h) + x)``, ``f`` = GELU (Houlsby et al.'s
  ``feedforward_adapter`` in google-research/adapter-bert: adapter after the dropout, GELU);
* ``pfeiffer``: one adapter per layer, after the feed-forward block, reading the normalised output and
  reusing the pretrained LayerNorm: ``LN(h + x + A(LN(h + x)))``, ``f`` = ReLU (AdapterHub's
  ``PfeifferConfig``: ``original_ln_before``, ``original_ln_after``, ``residual_before_ln``).

Added parameters: ``2db + b + d`` per adapter, times ``L`` (pfeiffer) or ``2L`` (houlsby).

**What the paper ran.** Fu et al.'s code (AnalyzeParameterEfficientFinetune, ``src/main_runscript.py``)
calls AdapterHub's ``encoder.add_adapter("adapter")`` without a config, and adapter-transformers'
``DEFAULT_ADAPTER_CONFIG`` is ``"pfeiffer"`` (reduction factor 16, ReLU); ``train_adapter`` then
freezes every encoder weight, LayerNorms included, while jiant's task head, outside the encoder,
keeps training. The default here is therefore ``variant="pfeiffer"`` with frozen LayerNorms; the
paper's text cites Houlsby et al., whose architecture is ``variant="houlsby"`` (with
``non_linearity="gelu"`` and, as Houlsby et al. did, ``train_layernorm=True`` if wanted).

**Initialisation.** ``W_down ~ N(0, init_std²)`` (0.02, AdapterHub's "bert" init), all biases and
``W_up`` zero, so ``A ≡ 0`` and the tuned model *is* the pretrained model at step 0 (the same convention
as LoRA's ``B = 0``). Houlsby et al. and AdapterHub draw ``W_up`` small but non-zero instead; the zero
up-projection makes the near-identity exact, so θ0 is well defined for the theory instruments.

**Where the adapters live.** They are registered on the tuned model (``tuned.adapters``) and called
from forward hooks on the backbone's blocks (the ``dropout`` of each ``*SelfOutput``/``*Output`` for
houlsby, the feed-forward ``LayerNorm`` for pfeiffer), so the residual and LayerNorm code of the
backbone runs unchanged and the backbone keeps exactly its pretrained parameters and names: m is
unchanged and ``backbone.named_parameters()`` still enumerates the pretrained tensors only.
:meth:`AdapterTuned.merge_into_dense` returns a stand-alone :class:`~sparse_ft.models.TaskModel`
that owns its adapters (adapters are nonlinear, so they cannot be folded into the weights).

**Why not the ``adapters`` library.** It is a heavy extra dependency whose releases are pinned to
narrow ``transformers`` ranges (it patches the model classes), and what sparse-ft needs is the forty
lines below plus an exact parameter count.

**Sparsity (DESIGN §5).** Additive: ``budget`` = the added parameters (plus the backbone's LayerNorm
entries when ``train_layernorm``); ``changed`` = the added parameters plus the LayerNorm entries that
differ from θ0 by exact comparison; the backbone's other entries are frozen.

Example::

    >>> from sparse_ft.methods import make_method_config, BuildContext
    >>> tuned = make_method_config("adapter", variant="houlsby").build(task_model, BuildContext())
    >>> tuned.describe().startswith("adapter")
    True
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError, check_choice, check_range
from ..models import TaskModel
from .base import BuildContext, MethodConfig, TunedModel, register

VARIANTS = ("houlsby", "pfeiffer")
NON_LINEARITIES = {"relu": F.relu, "gelu": F.gelu, "swish": F.silu, "tanh": torch.tanh}
DEFAULT_NON_LINEARITY = {"houlsby": "gelu", "pfeiffer": "relu"}
BLOCK_PARTS = ("dense", "dropout", "LayerNorm")  # what every *SelfOutput / *Output block must have


@register
@dataclass
class AdapterConfig(MethodConfig):
    """Bottleneck adapters (Houlsby or Pfeiffer placement); backbone frozen, adapters and head train.

    ``variant``: "pfeiffer" (default: what the authors' code ran, AdapterHub's default config) or
    "houlsby"; ``reduction_factor``: bottleneck width d / reduction_factor (16 in both papers);
    ``non_linearity``: "relu", "gelu", "swish" or "tanh" (None: gelu for houlsby, relu for pfeiffer);
    ``init_std``: std of the down-projection (the up-projection starts at zero: exact identity);
    ``train_layernorm``: also train the backbone's LayerNorms (Houlsby et al.; counted in ``changed``).
    """

    name = "adapter"
    uses_sparsity = False  # p follows from the architecture and the reduction factor
    citation = ("Houlsby et al. 2019, Parameter-Efficient Transfer Learning for NLP (ICML); "
                "Pfeiffer et al. 2021, AdapterFusion (EACL)")
    variant: str = "pfeiffer"
    reduction_factor: float = 16
    non_linearity: str | None = None
    init_std: float = 0.02
    train_layernorm: bool = False

    def __post_init__(self):
        check_choice("adapter variant", self.variant, VARIANTS)
        check_range("reduction_factor", self.reduction_factor, 0.0, low_open=True)
        check_range("init_std", self.init_std, 0.0)
        self.non_linearity = self.non_linearity or DEFAULT_NON_LINEARITY[self.variant]
        check_choice("adapter non_linearity", self.non_linearity, sorted(NON_LINEARITIES))

    def build(self, model: TaskModel, context: BuildContext) -> AdapterTuned:
        with context.seeded():
            return AdapterTuned(model, self)


class Bottleneck(nn.Module):
    """``A(h) = up(f(down(h)))`` with ``up`` initialised to zero (``A ≡ 0`` at init)."""

    def __init__(self, hidden: int, reduction_factor: float, activation: str, init_std: float):
        super().__init__()
        width = max(1, int(hidden // reduction_factor))
        self.activation = activation
        self.down = nn.Linear(hidden, width)
        self.up = nn.Linear(width, hidden)
        with torch.no_grad():
            nn.init.normal_(self.down.weight, std=init_std)
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.up(NON_LINEARITIES[self.activation](self.down(hidden)))

    def extra_repr(self) -> str:
        return f"activation={self.activation}"


class _AfterSublayer:
    """Houlsby: a forward hook on the sublayer's dropout, ``h ↦ h + A(h)`` before residual + LN."""

    def __init__(self, adapter: Bottleneck):
        self.adapter = adapter

    def __call__(self, module, args, output):
        return output + self.adapter(output)


class _AroundLayerNorm:
    """Pfeiffer: a forward hook on the block's LayerNorm, ``LN(z) ↦ LN(z + A(LN(z)))`` with z = h + x."""

    def __init__(self, adapter: Bottleneck):
        self.adapter = adapter

    def __call__(self, module, args, output):
        return module.forward(args[0] + self.adapter(output))  # .forward: no recursion into this hook


def _blocks(backbone: nn.Module) -> list[tuple[int, str, str, nn.Module]]:
    """(layer index, "attention" or "ffn", module path, block) for the attention-output and feed-forward
    output block of every layer, checked for the parts the adapters attach to; a clear error when an
    architecture lacks them."""
    layers = getattr(getattr(backbone, "encoder", None), "layer", None)
    found = []
    for i, layer in enumerate(layers if isinstance(layers, nn.ModuleList) else []):
        for kind, path in (("attention", "attention.output"), ("ffn", "output")):
            block = _submodule(layer, path)
            if not all(isinstance(getattr(block, part, None), nn.Module) for part in BLOCK_PARTS):
                return _unsupported(backbone)
            found.append((i, kind, f"encoder.layer.{i}.{path}", block))
    return found or _unsupported(backbone)


def _submodule(module: nn.Module, path: str) -> nn.Module | None:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def _unsupported(backbone: nn.Module):
    raise UserError(f"adapter: cannot find BERT-style blocks in {type(backbone).__name__} (expected "
                    "encoder.layer[i].attention.output and encoder.layer[i].output, each with dense, "
                    "dropout and LayerNorm); supported: BERT/RoBERTa-family encoders")


class AdapterTuned(TunedModel):
    def __init__(self, model: TaskModel, config: AdapterConfig):
        super().__init__(model, config)  # m is measured here, before anything is added
        model.backbone.requires_grad_(False)
        model.head.requires_grad_(True)
        hidden = model.backbone.config.hidden_size
        houlsby = config.variant == "houlsby"
        self.adapters = nn.ModuleDict()
        self._hosts: dict[str, str] = {}  # adapter key -> path (inside the TaskModel) of the hooked module
        for i, kind, path, block in _blocks(model.backbone):
            if not houlsby and kind != "ffn":
                continue
            key = f"layer{i}_{kind}"
            adapter = Bottleneck(hidden, config.reduction_factor, config.non_linearity, config.init_std)
            self.adapters[key] = adapter.to(device=block.dense.weight.device, dtype=block.dense.weight.dtype)
            host = "dropout" if houlsby else "LayerNorm"
            hook = _AfterSublayer(adapter) if houlsby else _AroundLayerNorm(adapter)
            getattr(block, host).register_forward_hook(hook)
            self._hosts[key] = f"backbone.{path}.{host}"
        self._layernorms: dict[str, torch.Tensor] = {}  # θ0 of the backbone LayerNorm entries that train
        if config.train_layernorm:
            for module_name, module in model.backbone.named_modules():
                if isinstance(module, nn.LayerNorm):
                    for param_name, param in module.named_parameters():
                        param.requires_grad_(True)
                        self._layernorms[f"{module_name}.{param_name}"] = param.detach().to("cpu", copy=True)

    def added_param_count(self) -> int:
        return sum(p.numel() for p in self.adapters.parameters())

    @torch.no_grad()
    def _changed_layernorm_entries(self) -> int:
        params = dict(self.model.backbone.named_parameters())
        return sum(int((params[n].detach().cpu() != theta0).sum()) for n, theta0 in self._layernorms.items())

    additive = True

    def budget_and_changed(self) -> tuple[int, int]:
        added = self.added_param_count()
        return (added + sum(t.numel() for t in self._layernorms.values()),
                added + self._changed_layernorm_entries())

    def merge_into_dense(self) -> TaskModel:
        """A stand-alone TaskModel with the same logits: a copy whose hooked modules own their adapters
        (as a child named ``adapter``). Adapters are nonlinear, so nothing is folded into the weights."""
        clone = copy.deepcopy(self)  # the hooks in the copy call the copied adapters
        for key, host in self._hosts.items():
            clone.model.get_submodule(host).add_module("adapter", clone.adapters[key])
        return clone.model.requires_grad_(True)
