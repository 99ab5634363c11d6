"""A tuned model written as a plain transformers folder, or a LoRA tuned model as a peft adapter folder.

Both exports rebuild a fresh transformers model from the tuned model's tensors, load them with every key
accounted for, and check, before writing anything, that the written model gives the tuned model's logits on a
probe batch (max |Δlogit| ≤ 1e-4, eval mode; an ``eval_reset`` Mixout is exported at one frozen draw, seed 0).

**Which transformers class.** A tuned transformers model (:class:`~sparse_ft.hf_model.HFTaskModel`, what
``get_sparse_model`` builds) keeps its own class. A ``sparse-ft train`` run's :class:`~sparse_ft.models.TaskModel`
(a bare encoder plus sparse-ft's head ``out_proj(tanh(dense(h[:, 0])))``) becomes
``AutoModelForSequenceClassification`` of its backbone's type, for classification and regression tasks:

* RoBERTa: ``RobertaClassificationHead`` is the same function: ``classifier.dense`` ← ``dense``,
  ``classifier.out_proj`` ← ``out_proj``;
* BERT (MiniLM, the default model, is one): ``BertForSequenceClassification`` is
  ``classifier(dropout(pooler(h)))`` with ``pooler = tanh(dense(h[:, 0]))``, the same function with the head's
  ``dense`` in BERT's pooler slot: ``bert.pooler.dense`` ← ``dense``, ``classifier`` ← ``out_proj``. Exact; the
  pooler then holds a task-trained layer, not the pretrained pooler (which sparse-ft never loads).

Other backbone types, multiple choice (COPA) and span (WSC) tasks are refused with one line: no transformers
class computes sparse-ft's head on them (span pooling has no counterpart at all). Adapters are refused for the
transformers format: they are extra nonlinear modules no transformers class has.

**peft.** A LoRA tuned model becomes ``PeftModel``'s folder (``adapter_config.json`` + ``adapter_model.safetensors``):
the LoRA factors A, B under peft's names, the head as ``modules_to_save`` (BERT: ``pooler`` and ``classifier``;
RoBERTa: ``classifier``; a transformers model: its head modules), ``base_model_name_or_path`` the base at θ0.
Load it with ``PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base, num_labels=C),
folder)``. Sources: transformers' ``modeling_bert``/``modeling_roberta`` heads; peft's ``LoraConfig``.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from pathlib import Path

import torch
from torch import nn

from .errors import UserError
from .hf_model import HFTaskModel
from .methods.base import TunedModel
from .methods.lora import LoRATuned
from .models import TaskModel
from .tasks import CLASSIFICATION, REGRESSION

TOLERANCE = 1e-4  # max |Δlogit| the exported model may differ from the tuned one by
HEAD_LAYOUTS = {  # model_type -> {transformers module path ({base} = base_model_prefix): sparse-ft head part}
    "bert": {"{base}.pooler.dense": "dense", "classifier": "out_proj"},
    "roberta": {"classifier.dense": "dense", "classifier.out_proj": "out_proj"},
}
PEFT_HEADS = {"bert": ["pooler", "classifier"], "roberta": ["classifier"]}  # modules_to_save for a TaskModel


def export_transformers(tuned: TunedModel, output: str | Path, tokenizer=None) -> Path:
    """Write ``tuned`` as a ``save_pretrained`` folder that ``AutoModelFor…from_pretrained(output)`` loads
    with the same logits (see the module docstring for the classes); ``tokenizer`` (optional) is saved beside
    it. Returns ``output``. Raises :class:`~sparse_ft.errors.UserError` for adapters, a task kind or backbone
    type without a matching class, or a failed logit check."""
    with _evaluating(tuned):
        merged = tuned.merge_into_dense()
        model = _fresh(merged, merged.backbone.state_dict())
        _check_logits(tuned, model, "transformers")
    output = Path(output)
    model.save_pretrained(output)
    if tokenizer is not None:
        tokenizer.save_pretrained(output)
    return output


def export_peft(tuned: TunedModel, output: str | Path, base_model: str | None = None) -> Path:
    """Write a LoRA ``tuned`` model as a peft adapter folder that ``PeftModel.from_pretrained(base, output)``
    loads with the same logits, ``base`` being the transformers model at θ0 (``base_model``: its name or path,
    recorded as ``base_model_name_or_path``; default the tuned model's own). Returns ``output``. Raises
    :class:`~sparse_ft.errors.UserError` for another method than LoRA, an unmappable head, or a failed check."""
    from peft import LoraConfig, get_peft_model

    if not isinstance(tuned, LoRATuned):
        raise UserError(f"--format peft writes LoRA models only (peft has no {tuned.config.name!r} adapter); "
                        "use --format transformers")
    config = tuned.config
    with _evaluating(tuned):
        base = _fresh(tuned.model, _without_lora(tuned.model.backbone.state_dict()))
        heads = _peft_heads(tuned.model)
        name = base_model or getattr(getattr(tuned.model, "hf", None), "name_or_path", "") or ""
        peft_config = LoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout,
                                 target_modules=list(config.target_modules), modules_to_save=heads,
                                 base_model_name_or_path=name, bias="none",
                                 task_type="SEQ_CLS" if isinstance(tuned.model, TaskModel) else None)
        with warnings.catch_warnings():  # peft's "fan_in_fan_out" notice for GPT-2's Conv1D
            warnings.simplefilter("ignore", UserWarning)
            model = get_peft_model(base, peft_config)
        model.peft_config["default"].base_model_name_or_path = name  # peft took the fresh model's (none)
        lora = {k: v for k, v in tuned.model.backbone.state_dict().items() if "lora_" in k}
        prefix = tuned.model.backbone_path if isinstance(tuned.model, HFTaskModel) else base.base_model_prefix
        backbone = model.get_base_model()
        _load(backbone.get_submodule(prefix) if prefix else backbone, lora, "LoRA factors", partial=True)
        _check_logits(tuned, model.eval(), "peft")
    output = Path(output)
    model.save_pretrained(output)
    return output


# ---------------------------------------------------------------------------------------------- the model
def _fresh(task_model: nn.Module, backbone_state: dict[str, torch.Tensor]) -> nn.Module:
    """A new transformers model (eval mode) holding ``backbone_state`` as its base model and ``task_model``'s
    head: the task model's own class for an HFTaskModel, AutoModelForSequenceClassification for a TaskModel."""
    if isinstance(task_model, HFTaskModel):
        hf, prefix = task_model.hf, task_model.backbone_path
        model = type(hf)(copy.deepcopy(hf.config))
        rest = {k: v for k, v in hf.state_dict().items() if prefix and not k.startswith(prefix + ".")}
        state = {**rest, **{_join(prefix, k): v for k, v in backbone_state.items()}}
    else:
        model, state = _classifier(task_model, backbone_state)
    _load(model, state, "weights")
    return model.to(_device(task_model)).eval()


def _classifier(task_model: TaskModel, backbone_state: dict[str, torch.Tensor]) -> tuple[nn.Module, dict]:
    """AutoModelForSequenceClassification of the backbone's type, and its state: the backbone plus the
    head mapped through :data:`HEAD_LAYOUTS`."""
    from transformers import AutoModelForSequenceClassification

    task, config = task_model.task, copy.deepcopy(task_model.backbone.config)
    if task.kind not in (CLASSIFICATION, REGRESSION):
        raise UserError(f"task {task.name!r} is {task.kind}: transformers has no class computing sparse-ft's "
                        f"{task.kind} head (export covers classification and regression)")
    layout = HEAD_LAYOUTS.get(config.model_type)
    if layout is None:
        raise UserError(f"no transformers head matches sparse-ft's on a {config.model_type!r} backbone "
                        f"(supported: {', '.join(HEAD_LAYOUTS)}); keep the run's model.safetensors instead")
    config.num_labels = task.num_labels
    config.problem_type = "regression" if task.kind == REGRESSION else "single_label_classification"
    if task.labels:
        config.id2label = {i: str(label) for i, label in enumerate(task.labels)}
        config.label2id = {str(label): i for i, label in enumerate(task.labels)}
    model = AutoModelForSequenceClassification.from_config(config)
    base = model.base_model_prefix
    state = {f"{base}.{k}": v for k, v in backbone_state.items()}
    head = task_model.head.state_dict()
    for target, part in layout.items():
        for tensor in ("weight", "bias"):
            state[f"{target.format(base=base)}.{tensor}"] = head[f"{part}.{tensor}"]
    return model, state


def _load(model: nn.Module, state: dict[str, torch.Tensor], what: str, partial: bool = False) -> None:
    """Load ``state`` into ``model``, refusing unknown keys and (unless ``partial``) missing ones other than
    the second name of a tied tensor."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise UserError(f"the tuned model has tensors {type(model).__name__} does not ({unexpected[0]}, "
                        f"{len(unexpected)} in all): it is not a plain transformers model (adapters are extra modules)")
    held: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        held.setdefault(id(param), []).append(name)
    tied = {n for names in held.values() if any(x in state for x in names) for n in names}
    absent = [k for k in missing if k not in tied and (not partial or "lora_" in k)]
    if absent:
        raise UserError(f"{what} for {type(model).__name__} lack {absent[0]} ({len(absent)} in all)")


def _without_lora(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """θ0 of a LoRA-wrapped module's state: the frozen base weights under their plain names."""
    return {k.replace(".base_layer.", "."): v for k, v in state.items() if "lora_" not in k}


def _peft_heads(task_model: nn.Module) -> list[str]:
    if isinstance(task_model, HFTaskModel):
        return [p for p in task_model.head_paths if any(True for _ in task_model.hf.get_submodule(p).parameters())]
    return PEFT_HEADS[task_model.backbone.config.model_type]


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _device(task_model: nn.Module) -> torch.device:
    return next(task_model.parameters()).device


# ---------------------------------------------------------------------------------------------- the check
@contextlib.contextmanager
def _evaluating(tuned: TunedModel):
    """Eval mode inside the block (one frozen evaluation draw for an eval-random method), the mode restored after."""
    training = tuned.training
    with tuned.frozen_evaluation(0):
        tuned.eval()
        try:
            yield
        finally:
            tuned.train(training)


def _probe(task_model: nn.Module) -> dict[str, torch.Tensor]:
    """Two rows of 8 token ids (3.., avoiding the usual special ids) with a full attention mask."""
    config = task_model.hf.config if isinstance(task_model, HFTaskModel) else task_model.backbone.config
    ids = (torch.arange(16).view(2, 8) % (config.vocab_size - 3) + 3).to(_device(task_model))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@torch.no_grad()
def _check_logits(tuned: TunedModel, model: nn.Module, what: str) -> None:
    """Refuse an export whose model does not give ``tuned``'s logits on the probe batch."""
    batch = _probe(tuned.model)
    expected = tuned(batch).reshape(2, -1)
    actual = model(**batch).logits.reshape(2, -1)
    gap = float((expected - actual).abs().max())
    if not gap <= TOLERANCE:
        raise UserError(f"the {what} export does not reproduce the tuned model: max |Δlogit| = {gap:.3g} "
                        f"> {TOLERANCE}")
