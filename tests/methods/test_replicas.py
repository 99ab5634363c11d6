"""Replicas trained as one vmapped batch against the same trainings run one by one."""

import json

import numpy as np
import pytest
import torch

from sparse_ft.cli import main
from sparse_ft.errors import UserError
from sparse_ft.experiments.measure import loo_stability
from sparse_ft.experiments.run import RunSpec, fit, fit_replicas
from sparse_ft.replicas import EXAMPLE_WEIGHT, stack_batches
from tests.conftest import tiny_config

EXCLUDES = [frozenset(), frozenset({3}), frozenset({7})]


@pytest.fixture(scope="module")
def quiet_model_dir(tmp_path_factory, tokenizer):
    """A saved tiny BERT without dropout, so that replicas and sequential runs compute the same function."""
    from transformers import BertModel

    path = tmp_path_factory.mktemp("tiny-bert-no-dropout")
    torch.manual_seed(0)
    config = tiny_config(vocab_size=len(tokenizer), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    BertModel(config, add_pooling_layer=False).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def spec_for(method, model_dir, data_dir, sparsity=None, task="cb"):
    # lr and clipping large enough that clipping acts and early stopping picks different steps; adam_eps
    # above float noise, which AdamW would otherwise blow up to ±lr on gradients that are exactly 0 in
    # exact arithmetic (attention key biases, the COPA head's output bias)
    train = {"batch_size": 4, "max_steps": 8, "eval_every": 2, "patience": 2, "min_steps": 0, "lr": 3e-2,
             "max_grad_norm": 0.05, "check_every": 2, "adam_eps": 1e-4}
    return RunSpec(task=task, method=method, sparsity=sparsity, model=str(model_dir), data_dir=str(data_dir),
                   train_limit=14, eval_limit=8, train_overrides=train, device="cpu")


def test_stack_batches_pads_sequences_and_examples():
    a = {"input_ids": torch.ones(2, 5, dtype=torch.long), "attention_mask": torch.ones(2, 5, dtype=torch.long),
         "labels": torch.tensor([1, 2])}
    b = {"input_ids": torch.ones(3, 7, dtype=torch.long), "attention_mask": torch.ones(3, 7, dtype=torch.long),
         "labels": torch.tensor([0, 1, 2])}
    stacked = stack_batches([a, b], pad_token_id=9)
    assert stacked["input_ids"].shape == (2, 3, 7) and stacked["labels"].shape == (2, 3)
    assert stacked["input_ids"][0, :2, 5:].eq(9).all() and stacked["input_ids"][0, 2].eq(9).all()
    assert stacked["attention_mask"][0, :2, 5:].eq(0).all() and stacked["attention_mask"][0, 2].eq(0).all()
    assert stacked[EXAMPLE_WEIGHT].tolist() == [[1, 1, 0], [1, 1, 1]]


@pytest.mark.parametrize("method, sparsity, task", [("sam", 0.05, "cb"), ("lora", None, "cb"), ("bitfit", None, "copa"),
                                                    ("random", 0.05, "wsc")])
def test_replicas_train_like_sequential_runs(method, sparsity, task, quiet_model_dir, data_dir):
    spec = spec_for(method, quiet_model_dir, data_dir, sparsity, task)
    _, batched, outcomes = fit_replicas(spec, EXCLUDES, progress=False)
    for exclude, tuned, outcome in zip(EXCLUDES, batched, outcomes):
        _, reference, expected = fit(spec, exclude=exclude, progress=False, log=lambda msg: None)
        assert [h["step"] for h in outcome.history] == [h["step"] for h in expected.history]
        assert outcome.best_step == expected.best_step and outcome.steps == expected.steps
        for (name, p), (_, q) in zip(tuned.named_parameters(), reference.named_parameters()):
            if q.requires_grad:
                torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-4, msg=name)
        for (name, b), (_, c) in zip(tuned.named_buffers(), reference.named_buffers()):
            assert torch.equal(b, c), name  # the same selected masks
    sam_masks = [t.indices() for t in batched] if method == "sam" else None
    if sam_masks:  # leaving an example out changes the scores, hence the selection
        assert any(not torch.equal(sam_masks[0][n], sam_masks[1][n]) for n in sam_masks[0])


def test_methods_that_change_their_tunable_set_are_refused(quiet_model_dir, data_dir):
    spec = spec_for("diffpruning", quiet_model_dir, data_dir, 0.05)
    with pytest.raises(UserError, match="cannot be trained as one batch"):
        fit_replicas(spec, EXCLUDES[:2], progress=False)


def test_batched_leave_one_out_matches_sequential_retraining(quiet_model_dir, data_dir):
    spec = spec_for("sam", quiet_model_dir, data_dir, 0.05)
    sequential, n = loo_stability(spec, retrains=2, seed=1)
    batched, _ = loo_stability(spec, retrains=2, seed=1, replicas="batched", replica_batch=3)  # two batches
    assert n == 14 and batched.indices.tolist() == sequential.indices.tolist()
    np.testing.assert_allclose(batched.loss_full, sequential.loss_full, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(batched.loss_loo, sequential.loss_loo, rtol=1e-3, atol=1e-4)
    assert batched.noise_floor == pytest.approx(0.0, abs=1e-6)


def test_stability_command_with_batched_replicas(quiet_model_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "stability.json"
    args = ["stability", "--task", "cb", "--method", "sam", "--sparsity", "0.05", "--model", str(quiet_model_dir),
            "--data-dir", str(data_dir), "--train-limit", "10", "--eval-limit", "4", "--device", "cpu",
            "--max-steps", "2", "--eval-every", "1", "--batch-size", "4", "--retrains", "2", "--examples", "4",
            "--replicas", "batched", "--json", str(out)]
    assert main(args) == 0
    assert json.loads(out.read_text())["stability"]["num_samples"] == 2
    assert main(args[:-2] + ["--replica-batch", "0"]) == 2
    assert "replica_batch" in capsys.readouterr().err
