import math

import pytest
import torch

from sparse_ft.errors import UserError
from sparse_ft.methods import BuildContext, make_method_config
from sparse_ft.methods.base import backbone_size
from sparse_ft.models import TaskModel
from sparse_ft.train import TrainConfig, train
from tests.conftest import tiny_task_model


def build(model, mask_seed=0, **options):
    return make_method_config("mixout", **options).build(model, BuildContext(mask_seed=mask_seed))


def shift_backbone(tuned, delta=0.01):
    """Move every backbone entry away from θ0 (as training would), through the trainable tensors."""
    with torch.no_grad():
        for name, param in tuned.model.backbone.named_parameters():
            param.add_(delta * (1 + torch.rand_like(param)))


def query(tuned):
    return tuned.model.backbone.encoder.layer[0].attention.self.query


def test_train_swap_is_dense_at_evaluation(setup):
    model, loaders = setup
    batch = next(iter(loaders["train"]))
    tuned = build(model, ratio=0.7)
    shift_backbone(tuned)
    tuned.eval()
    layer = query(tuned)
    assert torch.equal(layer.weight, layer.parametrizations.weight.original)  # the current weights, untouched
    dense = tuned.merge_into_dense().eval()
    assert isinstance(dense, TaskModel)
    plain_names = [n for n, _ in tiny_task_model("cb").named_parameters()]
    assert [n for n, _ in dense.named_parameters()] == plain_names  # names and order of the plain model
    with torch.no_grad():
        assert torch.equal(dense(batch), tuned(batch))
        tuned.train()
        assert not torch.allclose(tuned(batch), dense(batch), atol=1e-4)  # training mode mixes


@pytest.mark.parametrize("ratio", [0.3, 0.9])
def test_train_swap_expectation_is_w_and_swapped_entries_are_theta0(ratio, setup):
    model, _ = setup
    tuned = build(model, ratio=ratio).train()
    layer = query(tuned)
    theta0 = layer.weight.detach().clone()  # at build, θ = θ0
    shift_backbone(tuned)
    w = layer.parametrizations.weight.original.detach()
    delta = w - theta0
    draws, total, swapped = 4000, torch.zeros_like(w), 0
    torch.manual_seed(0)
    with torch.no_grad():
        for i in range(draws):
            mixed = layer.weight
            total += mixed
            if i < 20:
                is_theta0 = mixed == theta0
                swapped += int(is_theta0.sum())
                # kept entries are rescaled around θ0 so that the expectation is w
                torch.testing.assert_close(mixed[~is_theta0], (theta0 + delta / (1 - ratio))[~is_theta0])
    # E[mixed] = w: per entry the mean of `draws` samples has std sqrt(r/(1-r)/draws)·|Δ|
    sigma = math.sqrt(ratio / (1 - ratio) / draws) * delta.abs()
    assert ((total / draws - w).abs() <= 6 * sigma + 1e-7).all()
    n = 20 * w.numel()
    assert abs(swapped / n - ratio) < 6 * math.sqrt(ratio * (1 - ratio) / n)


def test_train_swap_gradient_and_neuron_unit(setup):
    model, _ = setup
    tuned = build(model, ratio=0.5, unit="neuron").train()
    layer = query(tuned)
    theta0 = layer.weight.detach().clone()
    shift_backbone(tuned)
    mixed = layer.weight
    keep = mixed.detach() != theta0
    assert keep.any() and (~keep).any()
    assert (keep == keep[:1]).all()  # one draw per input neuron (column), shared over the rows
    (mixed * 3.0).sum().backward()
    grad = layer.parametrizations.weight.original.grad
    torch.testing.assert_close(grad, keep * 3.0 / (1 - 0.5))  # exact gradient: M / (1 - r)


def test_train_swap_report_and_single_theta0_copy(setup):
    model, _ = setup
    m = backbone_size(model)
    tuned = build(model)
    assert tuned.ratio == 0.9
    report = tuned.sparsity_report()
    assert (report.backbone_params, report.budget, report.changed, report.trainable) == (m, m, 0, m)
    stored = sum(mod.parametrizations[name][0].theta0.numel() for mod, name in tuned._mixed)
    assert stored + sum(t.numel() for t in tuned._theta0_cpu.values()) == m  # θ0 held exactly once
    assert all(isinstance(mod, torch.nn.Linear) and name == "weight" for mod, name in tuned._mixed)
    assert not any("theta0" in key or "reset" in key for key in tuned.checkpoint_state())
    shift_backbone(tuned)
    assert tuned.sparsity_report().changed == m


def test_eval_reset_realised_sparsity(setup):
    model, loaders = setup
    batch = next(iter(loaders["train"]))
    ratio = 0.75
    tuned = build(model, ratio=ratio, mode="eval_reset", mask_seed=3)
    m = backbone_size(model)
    layer = query(tuned)
    theta0 = layer.weight.detach().clone()
    shift_backbone(tuned)
    tuned.train()
    assert torch.equal(layer.weight, layer.parametrizations.weight.original)  # training is dense
    tuned.eval()
    report = tuned.sparsity_report()
    # every entry differs from θ0, so the evaluated model changes exactly the entries not reset
    assert report.changed == report.budget
    assert abs(report.changed / m - (1 - ratio)) < 6 * math.sqrt(ratio * (1 - ratio) / m)
    evaluated = layer.weight
    original = layer.parametrizations.weight.original
    assert torch.equal(evaluated == theta0, evaluated != original)  # each entry is θ0 or θ, nothing rescaled
    assert abs(float((evaluated != theta0).float().mean()) - (1 - ratio)) < 0.1
    first = tuned(batch)
    dense = tuned.merge_into_dense().eval()
    with torch.no_grad():
        assert torch.equal(dense(batch), first)
    tuned.eval()  # a fresh reset mask per evaluation, as the authors' run_val
    assert not torch.equal(tuned(batch), first)


def test_eval_reset_masks_follow_the_mask_seed():
    a = build(tiny_task_model("cb"), ratio=0.5, mode="eval_reset", mask_seed=1)
    b = build(tiny_task_model("cb"), ratio=0.5, mode="eval_reset", mask_seed=1)
    c = build(tiny_task_model("cb"), ratio=0.5, mode="eval_reset", mask_seed=2)
    masks = [query(t).parametrizations.weight[0].reset for t in (a, b, c)]
    assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])
    assert len(a._mixed) == len(list(tiny_task_model("cb").backbone.parameters()))  # "all" by default


@pytest.mark.parametrize("mode", ["train_swap", "eval_reset"])
def test_trains_through_the_trainer(mode, setup):
    model, loaders = setup
    tuned = build(model, ratio=0.8, mode=mode)
    assert tuned.ratio == pytest.approx(0.8)
    config = TrainConfig(max_steps=4, eval_every=2, lr=1e-3, warmup_ratio=0.0, min_steps=0)
    outcome = train(tuned, loaders["train"], loaders["val"], config, torch.device("cpu"), progress=False)
    assert outcome.steps == 4
    report = tuned.sparsity_report()
    assert 0 < report.changed <= report.budget


def test_config_checks():
    assert make_method_config("mixout").ratio == 0.9
    assert make_method_config("mixout", ratio=0.7).ratio == 0.7
    assert make_method_config("mixout").apply_to == "linear"
    assert make_method_config("mixout", mode="eval_reset").apply_to == "all"
    assert make_method_config("mixout", ratio=0.75).to_dict()["ratio"] == 0.75
    with pytest.raises(UserError, match="ratio=R"):  # a shared sparsity never sets r (0.005 -> r = 0.995)
        make_method_config("mixout", 0.005)
    with pytest.raises(UserError, match="ratio"):
        make_method_config("mixout", ratio=1.0)
    with pytest.raises(UserError, match="mode"):
        make_method_config("mixout", mode="dropout")
    with pytest.raises(UserError, match="applies to mode=.train_swap. only"):
        make_method_config("mixout", mode="eval_reset", unit="neuron")
    with pytest.raises(UserError, match="apply_to"):
        make_method_config("mixout", apply_to="attention")


def test_frozen_evaluation_holds_one_recorded_draw(setup):
    """Under a measurement the eval-time reset is one function: repeated .eval() calls give equal
    logits, the draw is recorded, and afterwards every evaluation draws afresh again."""
    model, loaders = setup
    batch = next(iter(loaders["train"]))
    tuned = build(model, ratio=0.5, mode="eval_reset", mask_seed=1)
    shift_backbone(tuned)
    assert tuned.eval_is_random
    with tuned.frozen_evaluation(seed=7) as record:
        first = tuned.eval()(batch)
        second = tuned.train().eval()(batch)
        assert torch.equal(first, second)
    assert record == {"mixout_reset_seed": 7}
    with tuned.frozen_evaluation(seed=7):
        assert torch.equal(tuned.eval()(batch), first)  # the same seed, the same function
    assert not torch.equal(tuned.train().eval()(batch), tuned.train().eval()(batch))
