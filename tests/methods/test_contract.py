"""The contract every registered method passes (DESIGN §8, from peft's test table): it builds on a tiny
model and trains, realised ||θ−θ0||₀ ≤ budget, merging and save → load give the same logits, and it
describes itself. A new method gets this whole suite by registering; nothing here names one, except the
options that size a method to a four-step run."""

import pytest
import torch

from sparse_ft.methods import METHODS, make_method_config
from sparse_ft.methods.saving import load_tuned, save_tuned
from tests.methods.mask_utils import (  # noqa: F401 - single_thread is an autouse fixture
    ADAMW_IMPLEMENTATIONS,
    cb_batches,
    context,
    single_thread,
    tiny,
    train_steps,
)

STEPS = 4
SIZING = {"diffpruning": {"burn_in_steps": 2}}  # project inside the four steps


def build(name, tokenizer, batches):
    sparsity = 0.05 if METHODS[name].uses_sparsity else None
    config = make_method_config(name, sparsity, **SIZING.get(name, {}))
    return config.build(tiny(tokenizer), context(batches, max_steps=STEPS))


@pytest.fixture(scope="module")
def batches(tokenizer, data_dir):
    return cb_batches(tokenizer, data_dir)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_trains_within_budget_and_round_trips(name, tokenizer, batches, tmp_path):
    tuned = build(name, tokenizer, batches)
    train_steps(tuned, batches, steps=STEPS)
    tuned.eval()
    report = tuned.sparsity_report()
    assert 0 < report.changed <= report.budget, report
    assert tuned.describe().startswith(name) and f"{report.budget:,}" in tuned.describe()
    with torch.no_grad():
        logits = [tuned(b) for b in batches]
        merged = tuned.merge_into_dense().eval()
        for batch, expected in zip(batches, logits):
            torch.testing.assert_close(merged(batch), expected, rtol=1e-5, atol=1e-6)
        path = tmp_path / "model.safetensors"
        save_tuned(tuned, path)
        loaded = load_tuned(path, tiny(tokenizer)).eval()
        assert loaded.sparsity_report() == report
        for batch, expected in zip(batches, logits):
            assert torch.equal(loaded(batch), expected)


@pytest.mark.parametrize("adamw", sorted(ADAMW_IMPLEMENTATIONS))
def test_every_adamw_implementation_reaches_the_weights(adamw, tokenizer, batches):
    """Fused AdamW updates the values in place without bumping their version counter; the forward must
    use them anyway. BitFit's biases all get a gradient, so after training changed == budget."""
    tuned = build("bitfit", tokenizer, batches)
    train_steps(tuned, batches, steps=3, adamw=adamw)
    tuned.eval()
    report = tuned.sparsity_report()
    assert report.changed == report.budget
    with torch.no_grad():
        merged = tuned.merge_into_dense().eval()
        for batch in batches:
            assert torch.equal(tuned(batch), merged(batch))


def test_edits_through_data_and_loaded_state_reach_the_forward(tokenizer, batches):
    tuned = build("bitfit", tokenizer, batches).eval()
    batch = batches[0]
    with torch.no_grad():
        before = tuned(batch)
        state = tuned.checkpoint_state()
        values = next(p for n, p in tuned.named_parameters() if n.endswith(".values"))
        values.data.add_(0.5)  # an edit autograd does not see
        edited = tuned(batch)
        assert not torch.equal(edited, before)
        assert torch.equal(edited, tuned.merge_into_dense().eval()(batch))
        tuned.load_checkpoint_state(state)
        assert torch.equal(tuned(batch), before)


def test_gradient_accumulation_over_two_forwards(tokenizer, batches):
    """Two forwards before one backward: writing θ at the second forward must not invalidate the first."""
    tuned = build("sam", tokenizer, batches).train()
    loss = tuned.loss(batches[0]) + tuned.loss(batches[1])
    loss.backward()
    grads = [p.grad for p in tuned.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and any(bool(g.abs().sum()) for g in grads)
