"""Exports round-trip: a run's TaskModel as AutoModelForSequenceClassification (BERT through its pooler slot,
RoBERTa through its classification head), a LoRA run as a peft adapter, a tuned transformers model as its own
class; what cannot be mapped is refused in one line."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

import sparse_ft as sft
from sparse_ft.methods import BuildContext
from sparse_ft.models import TaskModel, backbone_from_config
from sparse_ft.tasks import get_task
from tests.api.conftest import FAMILIES, HIDDEN, VOCAB, batches, method_config, tiny_model, trained

ENCODERS = {
    "bert": lambda: tf.BertConfig(max_position_embeddings=16, pad_token_id=0, **SIZES),
    "roberta": lambda: tf.RobertaConfig(max_position_embeddings=18, pad_token_id=1, **SIZES),
}
SIZES = {"hidden_size": HIDDEN, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 37,
         "vocab_size": VOCAB}


def trained_run(kind: str, method: str, base_dir, task: str = "cb", steps: int = 2):
    """A TaskModel on a tiny ``kind`` encoder (saved to ``base_dir`` at θ0, as a run's base model is),
    tuned by ``method`` for a few AdamW steps, in eval mode, with a batch to score."""
    torch.manual_seed(0)
    backbone = backbone_from_config(ENCODERS[kind]())
    backbone.save_pretrained(base_dir)
    batch = dict(batches(kind)[0])
    if task == "stsb":
        batch["labels"] = torch.rand(4) * 5
    tuned = method_config(method).build(TaskModel(backbone, get_task(task)),
                                        BuildContext(selection_batches=lambda: [batch]))
    optimizer = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        tuned.loss(batch).backward()
        optimizer.step()
        optimizer.zero_grad()
    return tuned.eval(), batch


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.reshape(4, -1)


@pytest.mark.parametrize("kind", list(ENCODERS))
@pytest.mark.parametrize(("method", "task"), [("sam", "cb"), ("lora", "cb"), ("random", "stsb")])
def test_a_run_exports_as_auto_model_for_sequence_classification(kind, method, task, tmp_path):
    tuned, batch = trained_run(kind, method, tmp_path / "base", task)
    sft.export_transformers(tuned, tmp_path / "out")
    model = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        expected = tuned(batch).reshape(4, -1)
    torch.testing.assert_close(logits(model, batch), expected, rtol=1e-5, atol=1e-5)
    labels = get_task(task).labels
    assert model.config.problem_type == ("regression" if labels is None else "single_label_classification")
    assert labels is None or list(model.config.id2label.values()) == list(labels)


@pytest.mark.parametrize("kind", list(ENCODERS))
def test_a_lora_run_exports_as_a_peft_adapter(kind, tmp_path):
    from peft import PeftModel

    tuned, batch = trained_run(kind, "lora", tmp_path / "base")
    sft.export_peft(tuned, tmp_path / "adapter", str(tmp_path / "base"))
    base = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=3)
    model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        expected = tuned(batch).reshape(4, -1)
    torch.testing.assert_close(logits(model, batch), expected, rtol=1e-5, atol=1e-5)
    assert model.peft_config["default"].base_model_name_or_path == str(tmp_path / "base")


@pytest.mark.parametrize(("method", "task", "fmt", "words"), [
    ("adapter", "cb", "transformers", "adapters are extra modules"),
    ("lora", "copa", "transformers", "multiple_choice"),
    ("sam", "cb", "peft", "LoRA models only"),
])
def test_what_cannot_be_mapped_is_refused_in_one_line(method, task, fmt, words, tmp_path):
    torch.manual_seed(0)
    backbone = backbone_from_config(ENCODERS["bert"]())
    ids = torch.arange(32).view(2, 2, 8) % 37 + 3 if task == "copa" else batches("bert")[0]["input_ids"]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1, 2, 0][:len(ids)])}
    tuned = method_config(method).build(TaskModel(backbone, get_task(task)),
                                        BuildContext(selection_batches=lambda: [batch]))
    export = sft.export_transformers if fmt == "transformers" else sft.export_peft
    with pytest.raises(sft.UserError, match=words) as refusal:
        export(tuned, tmp_path / "out")
    assert "\n" not in str(refusal.value) and not (tmp_path / "out").exists()


AUTO = {"bert": tf.AutoModelForSequenceClassification, "roberta": tf.AutoModelForSequenceClassification,
        "gpt2": tf.AutoModelForCausalLM, "llama": tf.AutoModelForCausalLM,
        "gpt2-cls": tf.AutoModelForSequenceClassification}


@pytest.mark.parametrize("family", FAMILIES)
def test_a_tuned_transformers_model_exports_as_its_own_class(family, tmp_path, tmp_path_factory):
    model, _ = trained("sam", family, tmp_path_factory)
    batch = batches(family)[0]
    sft.export_transformers(model.tuned, tmp_path)
    loaded = AUTO[family].from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=1e-5, atol=1e-5)
    if family == "gpt2":
        assert loaded.lm_head.weight is loaded.transformer.wte.weight


@pytest.mark.parametrize("family", FAMILIES)
def test_a_lora_tuned_transformers_model_exports_as_a_peft_adapter(family, tmp_path, tmp_path_factory):
    from peft import PeftModel

    model, _ = trained("lora", family, tmp_path_factory)
    batch = batches(family)[0]
    tiny_model(family).save_pretrained(tmp_path / "base")  # the same seed: θ0
    sft.export_peft(model.tuned, tmp_path / "adapter", str(tmp_path / "base"))
    loaded = PeftModel.from_pretrained(AUTO[family].from_pretrained(tmp_path / "base"), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=1e-5, atol=1e-5)
