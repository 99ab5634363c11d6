"""DiffPruning: hard-concrete gates, the expected-L0 penalty, projection after burn-in, reprojection."""

import math

import pytest
import torch

from sparse_ft.errors import UserError
from sparse_ft.methods import make_method_config
from sparse_ft.methods.base import backbone_size
from sparse_ft.methods.diffpruning import DiffPruningConfig, HardConcreteDelta
from sparse_ft.train import TrainConfig, train
from tests.methods.mask_utils import (
    adam_state_entries,
    cb_batches,
    context,
    masks,
    single_thread,  # noqa: F401 (autouse fixture)
    theta,
    theta0,
    tiny,
    train_steps,
)

P = 0.01


@pytest.fixture
def setup(tokenizer, data_dir):
    return tiny(tokenizer), cb_batches(tokenizer, data_dir)


def test_hard_concrete_gate_matches_its_open_probability():
    alphas = torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0]).repeat_interleave(20000)
    gate = HardConcreteDelta(torch.zeros(len(alphas)), DiffPruningConfig(temperature=2 / 3))
    with torch.no_grad():
        gate.log_alpha.copy_(alphas)
    torch.manual_seed(0)
    z = gate.gate(sample=True).view(5, -1)
    assert bool(((z >= 0) & (z <= 1)).all()) and bool((z == 1).any()) and bool((z == 0).any())
    expected = gate.open_probability().view(5, -1)[:, 0]
    torch.testing.assert_close((z > 0).float().mean(1), expected, atol=0.01, rtol=0.0)
    deterministic = gate.gate(sample=False).view(5, -1)[:, 0]
    torch.testing.assert_close(deterministic, (torch.sigmoid(alphas[::20000]) * 3 - 1.5).clamp(0, 1))


def test_gated_phase_is_dense_with_the_expected_l0_penalty(setup):
    model, batches = setup
    m = backbone_size(model)
    tuned = make_method_config("diffpruning", P, burn_in_steps=4).build(model, context(batches))
    report = tuned.sparsity_report()
    assert report.trainable == 2 * m and report.changed == 0  # w = 0 at the start: θ = θ0
    penalty = tuned.regularization()
    expected = 1.25e-7 * m / (1 + math.exp(-5.0))  # λ·m·σ(α0): log(−l/r) = 0 for l = −r
    assert math.isclose(float(penalty.detach()), expected, rel_tol=1e-5)
    alpha_groups = [g for g in tuned.param_groups(0.01) if "lr_scale" in g]
    assert [(g["lr_scale"], g["weight_decay"]) for g in alpha_groups] == [(1000.0, 0.0)]


@pytest.mark.parametrize("scope", ["per_tensor", "global"])
def test_projection_after_burn_in_keeps_top_alpha_within_budget(scope, setup):
    model, batches = setup
    before = theta0(model)
    numels = [q.numel() for q in model.backbone.parameters()]
    budget = int(P * sum(numels)) if scope == "global" else sum(int(P * n) for n in numels)
    tuned = make_method_config("diffpruning", P, scope=scope, burn_in_steps=3).build(model, context(batches))
    train_steps(tuned, batches, steps=2, weight_decay=0.1)
    gates = dict(tuned._gates)
    top = tuned.config.select_from_scores({n: g.log_alpha for n, g in gates.items()})[0]
    diffs = {n: g.diff().reshape(-1) for n, g in gates.items()}
    assert tuned.on_step_end(3) and not tuned.gated
    assert all(torch.equal(tuned.indices()[n], top[n]) for n in top) and tuned.indices().keys() == top.keys()
    for name, delta in tuned._deltas.items():
        assert torch.equal(delta.values.detach(), diffs[name][delta.indices])  # kept entries do not move
    optimizer, _ = train_steps(tuned, batches, steps=2, weight_decay=0.1)
    report = tuned.sparsity_report()
    assert report.budget == budget == report.trainable and 0 < report.changed <= budget
    assert adam_state_entries(optimizer, skip={id(p) for p in model.head.parameters()}) == budget
    after, inside = theta(tuned), masks(tuned.indices(), {n: t.shape for n, t in before.items()})
    assert all(torch.equal(after[n][~m], before[n][~m]) for n, m in inside.items())


def test_reprojection_sends_leaving_entries_back_to_theta0(setup):
    model, batches = setup
    before = theta0(model)
    config = make_method_config("diffpruning", P, burn_in_steps=6, reproject_every=2)
    tuned = config.build(model, context(batches))
    _, changes = train_steps(tuned, batches, steps=1, lr=0.05)
    assert tuned.changed_count() > tuned.budget and not changes  # dense before the first projection
    kept = tuned.project(final=False)
    assert tuned.gated
    after, inside = theta(tuned), masks(kept, {n: t.shape for n, t in before.items()})
    assert all(torch.equal(after[n][~m], before[n][~m]) for n, m in inside.items())
    assert 0 < tuned.changed_count() <= tuned.budget


def test_trainer_records_each_projection_and_ends_p_sparse(setup):
    model, batches = setup
    budget = int(P * backbone_size(model))
    tuned = make_method_config("diffpruning", P, scope="global", burn_in_steps=6, reproject_every=2).build(
        model, context(batches, max_steps=8))
    config = TrainConfig(max_steps=8, eval_every=4, batch_size=4, bf16=False, check_every=1, min_steps=0,
                         weight_decay=0.1, lr=1e-2)
    outcome = train(tuned, batches, batches, config, torch.device("cpu"), progress=False)
    assert outcome.structure_changes == [2, 4, 6]
    report = tuned.sparsity_report()
    assert not tuned.gated and report.budget == budget and 0 < report.changed <= budget


def test_burn_in_defaults_to_half_the_run_and_must_fit_in_it(setup, tokenizer):
    model, batches = setup
    ten_steps = context(batches, max_steps=10)
    assert make_method_config("diffpruning", P).build(model, ten_steps).burn_in_steps == 5
    with pytest.raises(UserError, match="exceeds"):
        make_method_config("diffpruning", P, burn_in_steps=20).build(tiny(tokenizer), ten_steps)
    with pytest.raises(UserError, match="burn_in_steps"):
        make_method_config("diffpruning", P).build(tiny(tokenizer), context(batches))
    with pytest.raises(UserError, match="learns its scores"):
        make_method_config("diffpruning", P).select(tiny(tokenizer), context(batches))
    with pytest.raises(UserError, match="stretch_upper"):
        make_method_config("diffpruning", P, stretch_upper=0.9)

