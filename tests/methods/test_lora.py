import copy

import pytest
import torch

from sparse_ft.errors import UserError
from sparse_ft.methods import BuildContext, make_method_config
from sparse_ft.methods.base import backbone_size
from sparse_ft.models import TaskModel
from sparse_ft.train import TrainConfig, train

HIDDEN, LAYERS, FFN = 32, 2, 37  # tiny_config


def build(model, **options):
    return make_method_config("lora", **options).build(model, BuildContext())


def randomize_b(tuned, std=0.3):
    with torch.no_grad():
        for name, param in tuned.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, std)


def test_identity_at_init_and_forward_through_task_model(setup):
    model, loaders = setup
    batch = next(iter(loaders["train"]))
    plain = copy.deepcopy(model).eval()
    tuned = build(model).eval()
    assert type(tuned.model.backbone) is type(plain.backbone)  # injected in place, TaskModel.encode unchanged
    with torch.no_grad():
        assert torch.equal(tuned(batch), plain(batch))  # B = 0
        randomize_b(tuned)
        assert not torch.allclose(tuned(batch), plain(batch), atol=1e-4)


@pytest.mark.parametrize("options, per_layer", [
    ({}, 2 * 8 * (HIDDEN + HIDDEN)),  # query + value, r = 8: L * 2 * r * (d_in + d_out)
    ({"r": 4, "target_modules": "query,key,value,dense"},  # the authors' six Linears per block
     4 * (3 * 2 * HIDDEN + 2 * HIDDEN + (HIDDEN + FFN) + (FFN + HIDDEN))),
])
def test_sparsity_report_counts_added_parameters(options, per_layer, setup):
    model, _ = setup
    m = backbone_size(model)
    report = build(model, **options).sparsity_report()
    assert report.additive
    assert report.backbone_params == m
    assert report.budget == report.changed == report.trainable == LAYERS * per_layer
    assert report.head_params == sum(p.numel() for p in model.head.parameters())


def test_backbone_bit_identical_after_training_and_head_trains(setup):
    model, loaders = setup
    backbone0 = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
    head0 = {n: p.detach().clone() for n, p in model.head.named_parameters()}
    tuned = build(model, dropout=0.1)
    config = TrainConfig(max_steps=4, eval_every=2, lr=1e-2, warmup_ratio=0.0, min_steps=0)
    outcome = train(tuned, loaders["train"], loaders["val"], config, torch.device("cpu"), progress=False)
    assert outcome.steps == 4
    base = {n.replace(".base_layer", ""): p for n, p in model.backbone.named_parameters() if "lora_" not in n}
    assert set(base) == set(backbone0)
    for name, theta0 in backbone0.items():
        assert torch.equal(base[name], theta0), name
    assert any(not torch.equal(p, head0[n]) for n, p in model.head.named_parameters())
    lora_b = [p for n, p in model.backbone.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)


def test_merge_into_dense_gives_the_same_logits_and_plain_weights(setup):
    model, loaders = setup
    batch = next(iter(loaders["train"]))
    names = [n for n, _ in model.named_parameters()]
    tuned = build(model, r=4, alpha=16)
    randomize_b(tuned)
    tuned.eval()
    dense = tuned.merge_into_dense().eval()
    assert isinstance(dense, TaskModel)
    assert [n for n, _ in dense.named_parameters()] == names  # no LoRA wrapper left
    with torch.no_grad():
        torch.testing.assert_close(dense(batch), tuned(batch), rtol=0, atol=1e-6)
        query = model.backbone.encoder.layer[0].attention.self.query
        lora_a, lora_b = query.lora_A["default"].weight, query.lora_B["default"].weight
        expected = query.base_layer.weight + (16 / 4) * lora_b @ lora_a
        torch.testing.assert_close(dense.backbone.encoder.layer[0].attention.self.query.weight, expected)
        assert torch.equal(dense.backbone.encoder.layer[0].attention.self.key.weight,
                           model.backbone.encoder.layer[0].attention.self.key.weight)


def test_config_checks(setup):
    model, _ = setup
    config = make_method_config("lora")
    defaults = (config.r, config.alpha, config.dropout, config.target_modules)
    assert defaults == (8, 8.0, 0.0, ("query", "value"))
    assert make_method_config("lora", target_modules=["key"]).target_modules == ("key",)
    with pytest.raises(UserError, match="not found"):
        build(model, target_modules="nonexistent")
    with pytest.raises(UserError, match="r must be"):
        make_method_config("lora", r=0)
    with pytest.raises(UserError, match="integer"):
        make_method_config("lora", r=2.5)
    with pytest.raises(UserError, match="dropout"):
        make_method_config("lora", dropout=1.0)
    with pytest.raises(UserError, match="fixes its own sparsity"):
        make_method_config("lora", sparsity=0.01)


@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_added_weights_are_drawn_from_the_mask_seed(method, setup):
    model, _ = setup

    def added(seed: int) -> list[torch.Tensor]:
        torch.manual_seed(1000 + seed)  # the global generator must not matter
        tuned = make_method_config(method).build(copy.deepcopy(model), BuildContext(mask_seed=seed))
        return [p.detach().clone() for n, p in tuned.named_parameters() if p.requires_grad and "head" not in n]

    first, again, other = added(0), added(0), added(1)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert any(not torch.equal(a, b) for a, b in zip(first, other))
    state = torch.random.get_rng_state()
    make_method_config(method).build(copy.deepcopy(model), BuildContext(mask_seed=3))
    assert torch.equal(state, torch.random.get_rng_state())  # the global generator is left as it was
