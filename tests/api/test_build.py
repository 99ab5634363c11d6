"""get_sparse_model on five transformers families: every method builds (or refuses in one line), the split
(what counts in m, the head, tied weights) is what the model implies, and a tie stays one tensor."""

from __future__ import annotations

import pytest
import torch

import sparse_ft as sft
from sparse_ft.delta import delta_of
from sparse_ft.hf_model import HFTaskModel
from sparse_ft.methods import METHODS
from sparse_ft.methods.scoring import loss_gradient
from tests.api.conftest import FAMILIES, REFUSALS, batches, method_config, tiny_model


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_builds_or_refuses_in_one_line(name, family):
    model, data = tiny_model(family), batches(family)
    m = sum(p.numel() for p in model.base_model.parameters())
    if (name, family) in REFUSALS:
        with pytest.raises(sft.UserError, match=REFUSALS[(name, family)]) as refusal:
            sft.get_sparse_model(model, method_config(name), data=data)
        assert "\n" not in str(refusal.value)
        return
    sparse = sft.get_sparse_model(model, method_config(name), data=data)
    assert type(sparse).__name__ == f"Sparse{type(model).__name__}" and isinstance(sparse, sft.SparseModel)
    report = sparse.sparsity_report()
    assert report.backbone_params == m
    assert report.changed == (report.budget if report.additive else 0)  # nothing trained yet
    with torch.no_grad():
        output = sparse.eval()(**data[0])
    assert torch.isfinite(output.loss) and output.logits.shape[0] == 4


SPLITS = {  # family -> (backbone path, head modules, head parameters, ties)
    "bert": ("bert", ["dropout", "classifier"], 32 * 3 + 3, {}),
    "roberta": ("roberta", ["classifier"], 32 * 32 + 32 + 32 * 3 + 3, {}),
    "gpt2": ("transformer", ["lm_head"], 0, {"lm_head.weight": "transformer.wte.weight"}),
    "llama": ("model", ["lm_head"], 40 * 32, {}),
    "gpt2-cls": ("transformer", ["score"], 32 * 3, {}),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_the_default_split_follows_the_model(family, capsys):
    sparse = sft.get_sparse_model(tiny_model(family), method_config("random"))
    backbone, heads, head_params, ties = SPLITS[family]
    provider = sparse.tuned.model
    assert (provider.backbone_path, provider.head_paths, provider.ties) == (backbone, heads, ties)
    assert sparse.sparsity_report().head_params == head_params
    sparse.print_trainable_parameters()
    printed = capsys.readouterr().out
    m = sparse.sparsity_report().backbone_params
    assert "budget" in printed and "realised" in printed and f"backbone (m): {backbone}, {m:,} parameters" in printed
    for outside, inside in ties.items():
        assert f"tied: {outside} is {inside}" in printed


def test_an_explicit_split_freezes_and_reports_what_it_leaves_out(capsys):
    model = tiny_model("llama")
    sparse = sft.get_sparse_model(model, method_config("random"), modules_to_save=[])
    assert sparse.sparsity_report().head_params == 0 and not model.lm_head.weight.requires_grad
    sparse.print_trainable_parameters()
    assert "frozen (neither backbone nor head): 1 tensors, 1,280 parameters" in capsys.readouterr().out
    with pytest.raises(sft.UserError, match="no module 'decoder'"):
        sft.get_sparse_model(tiny_model("llama"), method_config("random"), backbone="decoder")
    with pytest.raises(sft.UserError, match="overlaps the backbone"):
        sft.get_sparse_model(tiny_model("llama"), method_config("random"), modules_to_save=["model.norm"])


def test_a_tied_output_embedding_is_the_backbone_tensor_in_both_uses():
    """GPT-2's lm_head reads transformer.wte.weight through a view, so the gradient that scores the tensor
    (SAM's, the Fisher's) and the gradient of a mask's values are the full gradient of the tied tensor, input
    and output use together, as autograd gives it on the untouched model."""
    data = batches("gpt2")[:1]
    plain = tiny_model("gpt2")
    expected = torch.autograd.grad(plain(**data[0]).loss, plain.transformer.wte.weight)[0]
    torch.testing.assert_close(loss_gradient(HFTaskModel(tiny_model("gpt2")), data)["wte.weight"], expected)
    sparse = sft.get_sparse_model(tiny_model("gpt2"), method_config("random"))  # eval mode: no dropout
    assert "weight" not in dict(sparse.get_base_model().lm_head.named_parameters(recurse=False))
    sparse(**data[0]).loss.backward()
    delta = delta_of(sparse.tuned.model.backbone.wte, "weight")
    torch.testing.assert_close(delta.values.grad, expected.reshape(-1)[delta.indices])


def test_the_data_also_feed_the_authors_sam_rule():
    sparse = sft.get_sparse_model(tiny_model("bert"), sft.SamConfig(sparsity=0.05, rule="authors", authors_batches=3),
                                  data=batches("bert"))
    assert sparse.sparsity_report().budget > 0


@pytest.mark.parametrize(("family", "targets"), [("bert", ("query", "value")), ("gpt2", ("c_attn",)),
                                                  ("llama", ("q_proj", "v_proj"))])
def test_lora_default_targets_follow_the_architecture(family, targets):
    sparse = sft.get_sparse_model(tiny_model(family), sft.LoRAConfig())
    assert sparse.tuned.config.target_modules == targets


def test_bad_arguments_are_one_line_errors():
    with pytest.raises(sft.UserError, match="PreTrainedModel"):
        sft.get_sparse_model(torch.nn.Linear(2, 2), method_config("random"))
    with pytest.raises(sft.UserError, match="method config"):
        sft.get_sparse_model(tiny_model("bert"), {"name": "sam"})
    with pytest.raises(sft.UserError, match="training data"):
        sft.get_sparse_model(tiny_model("bert"), method_config("sam"))


def test_a_model_refused_once_can_be_wrapped_again_with_its_tie():
    model = tiny_model("gpt2")
    with pytest.raises(sft.UserError):
        sft.get_sparse_model(model, method_config("adapter"))
    sparse = sft.get_sparse_model(model, method_config("random"))
    assert sparse.tuned.model.ties == {"lm_head.weight": "transformer.wte.weight"}
    merged = sparse.merge_and_unload()
    assert merged.lm_head.weight is merged.transformer.wte.weight
