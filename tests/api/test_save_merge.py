"""save_pretrained → SparseModel.from_pretrained and merge_and_unload give the trained model's logits, on every
family and method; another base model is refused in one line."""

from __future__ import annotations

import json

import pytest
import torch

import sparse_ft as sft
from tests.api.conftest import batches, tiny_model, trained
from tests.api.test_trainer import RUNS


@pytest.mark.parametrize(("name", "family"), RUNS)
def test_save_load_and_merge_keep_the_logits(name, family, tmp_path, tmp_path_factory):
    model, _ = trained(name, family, tmp_path_factory)
    batch = batches(family)[0]
    with torch.no_grad():
        expected = model(**batch).logits
        model.save_pretrained(tmp_path)
        loaded = sft.SparseModel.from_pretrained(tiny_model(family), tmp_path)
        torch.testing.assert_close(loaded(**batch).logits, expected, rtol=0, atol=0)
        assert loaded.sparsity_report() == model.sparsity_report()
        merged = model.merge_and_unload()
        assert type(merged) is type(model.get_base_model())
        torch.testing.assert_close(merged(**batch).logits, expected, rtol=1e-5, atol=1e-6)
    if family == "gpt2":
        assert merged.lm_head.weight is merged.transformer.wte.weight  # the tie is a tie again
    record = json.loads((tmp_path / "sparse_config.json").read_text())
    assert record["method"]["name"] == name and record["backbone"] == model.tuned.model.backbone_path


def test_a_mask_file_holds_the_budget_not_the_model(tmp_path, tmp_path_factory):
    model, _ = trained("sam", "llama", tmp_path_factory)
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "sparse_model.safetensors"))
    backbone = sum(t.numel() for k, t in saved.items() if k.startswith("model.backbone."))
    assert backbone == 2 * model.sparsity_report().budget  # k indices + k values; the head is lm_head


def test_another_base_model_is_refused_in_one_line(tmp_path, tmp_path_factory):
    model, _ = trained("random", "roberta", tmp_path_factory)
    model.save_pretrained(tmp_path)
    with pytest.raises(sft.UserError, match="another base model") as refusal:
        sft.SparseModel.from_pretrained(tiny_model("roberta", seed=1), tmp_path)
    assert "\n" not in str(refusal.value)
    with pytest.raises(sft.UserError, match="not a SparseModel.save_pretrained folder"):
        sft.SparseModel.from_pretrained(tiny_model("roberta"), tmp_path / "nowhere")
