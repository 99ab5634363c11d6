"""transformers.Trainer, default arguments and default optimizer (fused AdamW), trains every method on every
family: mask methods end with exactly their budget changed (the sparse delta writes θ = θ0 + scatter(I, v) at
every forward, so fused updates reach the model), and the dataset columns the model takes survive."""

from __future__ import annotations

import pytest
import torch

import sparse_ft as sft
from sparse_ft.methods import METHODS
from sparse_ft.methods.masks import SparseDeltaTuned
from tests.api.conftest import (
    FAMILIES,
    REFUSALS,
    batches,
    dead_entries,
    method_config,
    tiny_model,
    trained,
    trainer,
)

RUNS = [(name, family) for family in FAMILIES for name in METHODS if (name, family) not in REFUSALS]


@pytest.mark.parametrize(("name", "family"), RUNS)
def test_trainer_trains_and_a_mask_changes_exactly_its_budget(name, family, tmp_path_factory):
    model, run = trained(name, family, tmp_path_factory)
    assert run.optimizer.optimizer.defaults["fused"]  # Trainer's default: AdamW, fused
    assert run.state.global_step == 3 and torch.isfinite(torch.tensor(run.state.log_history[-1]["train_loss"]))
    report = model.sparsity_report()
    if isinstance(model.tuned, SparseDeltaTuned):
        assert report.changed == report.budget - dead_entries(family, model.tuned)
    elif report.additive:
        assert report.changed == report.budget
    elif name == "full":
        assert 0.9 * report.budget < report.changed <= report.budget
    else:  # Mixout: an entry moves in the steps that keep it (p = 1 - r = 0.1 each), biases and the rest always
        assert 0 < report.changed <= report.budget
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for g in run.optimizer.optimizer.param_groups for p in g["params"]} == trainable


def test_the_optimizer_follows_a_reselecting_mask(tmp_path):
    """ChildPruning with reselect_every=1 projects after every step: SparseCallback points the Trainer's
    optimizer at the new values each time, and the budget holds."""
    data = batches("bert")
    model = sft.get_sparse_model(tiny_model("bert"), method_config("childpruning", reselect_every=1), data=data)
    run = trainer(model, data, tmp_path, callbacks=[sft.SparseCallback()])
    run.train()
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for g in run.optimizer.optimizer.param_groups for p in g["params"]} == trainable
    assert model.sparsity_report().changed <= model.sparsity_report().budget


def test_a_projecting_method_without_the_callback_is_refused(tmp_path):
    data = batches("bert")
    model = sft.get_sparse_model(tiny_model("bert"), method_config("diffpruning"), data=data)
    with pytest.raises(sft.UserError, match="SparseCallback"):
        trainer(model, data, tmp_path).train()
