import copy

import pytest
import torch
from transformers import DistilBertConfig

from sparse_ft.errors import UserError
from sparse_ft.methods import BuildContext, make_method_config
from sparse_ft.methods.base import backbone_size
from sparse_ft.models import TaskModel, backbone_from_config
from sparse_ft.tasks import get_task
from sparse_ft.train import TrainConfig, train

HIDDEN, LAYERS, WIDTH = 32, 2, 2  # tiny_config: d = 32, 2 layers; bottleneck 32 // 16 = 2
PER_ADAPTER = 2 * HIDDEN * WIDTH + WIDTH + HIDDEN


def build(model, **options):
    return make_method_config("adapter", **options).build(model, BuildContext())


def randomize(tuned, std=0.2):
    with torch.no_grad():
        for param in tuned.adapters.parameters():
            param.normal_(0.0, std)


@pytest.mark.parametrize("variant", ["houlsby", "pfeiffer"])
def test_identity_at_init(variant, setup):
    model, loaders = setup
    batch = next(iter(loaders["train"]))
    plain = copy.deepcopy(model).eval()
    tuned = build(model, variant=variant).eval()
    with torch.no_grad():
        assert torch.equal(tuned(batch), plain(batch))  # up-projection zero: exactly the pretrained model
        randomize(tuned)
        assert not torch.allclose(tuned(batch), plain(batch), atol=1e-4)  # the hooks are really in the path


@pytest.mark.parametrize("variant, adapters", [("houlsby", 2 * LAYERS), ("pfeiffer", LAYERS)])
def test_sparsity_report_counts_added_parameters(variant, adapters, setup):
    model, _ = setup
    m = backbone_size(model)
    report = build(model, variant=variant).sparsity_report()
    assert report.additive
    assert report.backbone_params == m == backbone_size(model)  # the backbone itself gained nothing
    assert report.budget == report.changed == report.trainable == adapters * PER_ADAPTER
    assert report.head_params == sum(p.numel() for p in model.head.parameters())


@pytest.mark.parametrize("variant", ["houlsby", "pfeiffer"])
def test_backbone_bit_identical_after_training_and_head_trains(variant, setup):
    model, loaders = setup
    backbone0 = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
    head0 = {n: p.detach().clone() for n, p in model.head.named_parameters()}
    tuned = build(model, variant=variant)
    config = TrainConfig(max_steps=4, eval_every=2, lr=1e-2, warmup_ratio=0.0, min_steps=0)
    outcome = train(tuned, loaders["train"], loaders["val"], config, torch.device("cpu"), progress=False)
    assert outcome.steps == 4
    backbone = dict(model.backbone.named_parameters())
    assert set(backbone) == set(backbone0)
    for name, theta0 in backbone0.items():
        assert torch.equal(backbone[name], theta0), name
    assert any(not torch.equal(p, head0[n]) for n, p in model.head.named_parameters())
    assert all(p.abs().sum() > 0 for key, p in tuned.adapters.named_parameters() if key.endswith("up.weight"))
    report = tuned.sparsity_report()
    assert report.changed == report.budget


def test_train_layernorm_counts_changed_layernorm_entries(setup):
    model, loaders = setup
    norms = {n: p.numel() for n, p in model.backbone.named_parameters() if "LayerNorm" in n}
    others0 = {n: p.detach().clone() for n, p in model.backbone.named_parameters() if n not in norms}
    tuned = build(model, variant="houlsby", train_layernorm=True)
    added = 2 * LAYERS * PER_ADAPTER
    before = tuned.sparsity_report()
    assert (before.budget, before.changed) == (added + sum(norms.values()), added)
    config = TrainConfig(max_steps=3, eval_every=3, lr=1e-2, warmup_ratio=0.0, min_steps=0)
    train(tuned, loaders["train"], loaders["val"], config, torch.device("cpu"), progress=False)
    after = tuned.sparsity_report()
    params = dict(model.backbone.named_parameters())
    assert all(torch.equal(params[n], p) for n, p in others0.items())
    changed_norms = sum(int((params[n] != tuned._layernorms[n]).sum()) for n in norms)
    assert 0 < changed_norms <= sum(norms.values())
    assert after.changed == added + changed_norms <= after.budget


@pytest.mark.parametrize("variant", ["houlsby", "pfeiffer"])
def test_merge_into_dense_gives_the_same_logits(variant, setup):
    model, loaders = setup
    batch = next(iter(loaders["train"]))
    tuned = build(model, variant=variant)
    randomize(tuned)
    tuned.eval()
    dense = tuned.merge_into_dense().eval()
    assert isinstance(dense, TaskModel) and dense is not tuned.model
    with torch.no_grad():
        torch.testing.assert_close(dense(batch), tuned(batch), rtol=0, atol=1e-6)
        randomize(tuned)  # the merged model is independent of the tuned one
        assert not torch.allclose(dense(batch), tuned(batch), atol=1e-4)
    owned = sum(p.numel() for n, p in dense.named_parameters() if ".adapter." in n)
    assert owned == tuned.added_param_count()


def test_unsupported_architecture_is_a_user_error():
    config = DistilBertConfig(dim=32, n_layers=1, n_heads=2, hidden_dim=37, vocab_size=50)
    backbone = backbone_from_config(config)
    with pytest.raises(UserError, match="cannot find BERT-style blocks in DistilBertModel"):
        build(TaskModel(backbone, get_task("cb")))


def test_config_checks():
    assert make_method_config("adapter").variant == "pfeiffer"
    assert make_method_config("adapter").non_linearity == "relu"
    assert make_method_config("adapter", variant="houlsby").non_linearity == "gelu"
    assert make_method_config("adapter", variant="houlsby", non_linearity="swish").non_linearity == "swish"
    with pytest.raises(UserError, match="variant"):
        make_method_config("adapter", variant="parallel")
    with pytest.raises(UserError, match="reduction_factor"):
        make_method_config("adapter", reduction_factor=0)
    with pytest.raises(UserError, match="non_linearity"):
        make_method_config("adapter", non_linearity="softmax")
    with pytest.raises(UserError, match="fixes its own sparsity"):
        make_method_config("adapter", sparsity=0.01)
