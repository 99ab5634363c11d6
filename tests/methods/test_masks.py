"""The mask methods on the shared p-sparse machinery: budgets, realised counts, optimizer state,
exactness outside the mask, merge/save/load, seeds and ChildPruning's re-selection."""

import pytest
import torch

from sparse_ft.errors import UserError
from sparse_ft.methods import make_method_config
from sparse_ft.methods.base import backbone_size
from sparse_ft.methods.bitfit import is_bias
from sparse_ft.methods.masks import load_mask_into
from sparse_ft.methods.saving import load_tuned, save_tuned
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
SCORED = [("random", {}), ("magnitude", {}), ("sam", {}), ("childpruning", {}),
          ("childpruning", {"reselect_every": 2})]


@pytest.fixture
def setup(tokenizer, data_dir):
    return tiny(tokenizer), cb_batches(tokenizer, data_dir)


def expected_budget(model, scope: str, p: float = P) -> int:
    """Σ⌊p·numel⌋ or ⌊p·m⌋ of a model's backbone, taken before a method parametrises it."""
    numels = [q.numel() for q in model.backbone.parameters()]
    return int(p * sum(numels)) if scope == "global" else sum(int(p * n) for n in numels)


def check_trained_mask_model(tuned, before, optimizer, budget):
    """Realised ≤ budget; optimizer state = the trainable entries = what the mask holds; every entry
    outside the mask still bit-identical to θ0."""
    report = tuned.sparsity_report()
    assert report.budget == budget
    assert 0 < report.changed <= report.budget
    held = sum(len(i) for i in tuned.indices().values())
    assert report.trainable == held <= budget
    head = {id(p) for p in tuned.model.head.parameters()}
    assert adam_state_entries(optimizer, skip=head) == held
    after = theta(tuned)
    inside = masks(tuned.indices(), {n: t.shape for n, t in before.items()})
    for name, mask in inside.items():
        assert torch.equal(after[name][~mask], before[name][~mask]), name


@pytest.mark.parametrize("scope", ["per_tensor", "global"])
@pytest.mark.parametrize("method, options", SCORED)
def test_scored_masks_train_within_budget(method, options, scope, setup):
    model, batches = setup
    before, budget = theta0(model), expected_budget(model, scope)
    tuned = make_method_config(method, P, scope=scope, **options).build(model, context(batches))
    assert sum(len(i) for i in tuned.indices().values()) == budget  # exactly ⌊p·numel⌋ each / ⌊p·m⌋ in all
    optimizer, _ = train_steps(tuned, batches, steps=3, weight_decay=0.1)
    check_trained_mask_model(tuned, before, optimizer, budget)


def test_bitfit_tunes_every_bias_and_nothing_else(setup):
    model, batches = setup
    before = theta0(model)
    biases = {n: q.numel() for n, q in model.backbone.named_parameters() if is_bias(n)}
    assert any("LayerNorm" in n for n in biases) and any("attention" in n for n in biases)
    tuned = make_method_config("bitfit").build(model, context(batches))
    assert set(tuned.indices()) == set(biases)
    optimizer, _ = train_steps(tuned, batches, steps=3, weight_decay=0.1)
    check_trained_mask_model(tuned, before, optimizer, budget=sum(biases.values()))
    with pytest.raises(UserError, match="fixes its own sparsity"):
        make_method_config("bitfit", 0.01)


def test_random_mask_is_exact_per_tensor_and_follows_the_seed(setup):
    model, batches = setup
    config = make_method_config("random", P)
    first = config.select(model, context(batches, seed=0))[0]
    again = config.select(model, context(batches, seed=0))[0]
    other = config.select(model, context(batches, seed=1))[0]
    for name, q in model.backbone.named_parameters():
        k = int(P * q.numel())
        assert len(first.get(name, [])) == k and len(set(first.get(name, torch.tensor([])).tolist())) == k
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert any(not torch.equal(first[n], other[n]) for n in first)
    glob = make_method_config("random", P, scope="global").select(model, context(batches))[0]
    assert sum(len(i) for i in glob.values()) == int(P * backbone_size(model))


def test_magnitude_keeps_the_largest_pretrained_entries(setup):
    model, batches = setup
    name = "encoder.layer.1.output.dense.weight"
    weight = dict(model.backbone.named_parameters())[name].detach().abs().reshape(-1)
    chosen = make_method_config("magnitude", P).select(model, context(batches))[0][name]
    threshold = weight[chosen].min()
    assert int((weight > threshold).sum()) < len(chosen) <= int((weight >= threshold).sum())


def test_trainer_with_weight_decay_leaves_entries_outside_the_mask_at_theta0(setup):
    model, batches = setup
    before, budget = theta0(model), expected_budget(model, "global")
    tuned = make_method_config("sam", P, scope="global").build(model, context(batches))
    config = TrainConfig(max_steps=4, eval_every=4, batch_size=4, bf16=False, check_every=1, min_steps=0,
                         weight_decay=0.1, lr=1e-2)
    train(tuned, batches, batches, config, torch.device("cpu"), progress=False)
    inside = masks(tuned.indices(), {n: t.shape for n, t in before.items()})
    after = theta(tuned)
    assert all(torch.equal(after[n][~m], before[n][~m]) for n, m in inside.items())
    assert 0 < tuned.sparsity_report().changed <= budget


@pytest.fixture
def trained(setup):
    model, batches = setup
    tuned = make_method_config("magnitude", P).build(model, context(batches))
    train_steps(tuned, batches, steps=3)
    return tuned.eval(), batches


def test_merged_dense_model_gives_identical_logits(trained):
    tuned, batches = trained
    merged = tuned.merge_into_dense()
    assert not any(hasattr(m, "parametrizations") for m in merged.modules())
    with torch.no_grad():
        for batch in batches:
            assert torch.equal(merged(batch), tuned(batch))


def test_save_load_round_trip_and_other_base_refused(trained, tmp_path, tokenizer):
    tuned, batches = trained
    path = str(tmp_path / "delta.safetensors")
    save_tuned(tuned, path)
    loaded = load_tuned(path, tiny(tokenizer)).eval()
    with torch.no_grad():
        assert all(torch.equal(loaded(b), tuned(b)) for b in batches)
    assert loaded.config == tuned.config and loaded.budget == tuned.budget
    for load in (load_tuned, lambda p, m: load_mask_into(p, m, tuned.config)):
        with pytest.raises(UserError, match="another base model"):
            load(path, tiny(tokenizer, seed=1))


def test_iterative_childpruning_returns_leaving_entries_to_theta0(setup):
    model, batches = setup
    before, budget = theta0(model), expected_budget(model, "global")
    tuned = make_method_config("childpruning", P, reselect_every=3).build(model, context(batches))
    train_steps(tuned, batches, steps=2, lr=0.1)
    old_indices = {n: i.clone() for n, i in tuned.indices().items()}
    old_theta = theta(tuned)
    assert tuned.on_step_end(3)  # the Fisher at the trained θ picks another set
    shapes = {n: t.shape for n, t in before.items()}
    old, new = masks(old_indices, shapes), masks(tuned.indices(), shapes)
    now = theta(tuned)
    assert sum(int((old[n] & ~new[n]).sum()) for n in shapes) > 0
    for name in shapes:
        assert torch.equal(now[name][~new[name]], before[name][~new[name]])  # left (or never in): θ0
        stayed = old[name] & new[name]
        assert torch.equal(now[name][stayed], old_theta[name][stayed])  # stayed: values kept
    assert sum(len(i) for i in tuned.indices().values()) == budget
    assert not tuned.on_step_end(4)  # only every 3 steps


def test_options_are_checked():
    with pytest.raises(UserError, match="scope"):
        make_method_config("random", P, scope="layer")
    with pytest.raises(UserError, match="curvature"):
        make_method_config("sam", P, curvature="full")
    with pytest.raises(UserError, match="reselect_every"):
        make_method_config("childpruning", P, reselect_every=-1)
