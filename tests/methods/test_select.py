"""Select a mask without training, save it, train on it (`sparse-ft select`, `sparse-ft train --mask`)."""

import json

import pytest
import torch
from safetensors import safe_open

from sparse_ft.cli import main
from sparse_ft.errors import UserError
from sparse_ft.methods import make_method_config
from sparse_ft.methods.masks import SparseDeltaTuned, load_mask_into
from sparse_ft.methods.saving import save_tuned
from tests.methods.mask_utils import (
    cb_batches,
    context,
    masks,
    single_thread,  # noqa: F401 (autouse fixture)
    theta,
    theta0,
    tiny,
    train_steps,
)


def test_select_save_then_train_on_the_mask(tokenizer, data_dir, tmp_path):
    batches = cb_batches(tokenizer, data_dir)
    config = make_method_config("sam", 0.01, scope="global", selection_examples=6)
    model = tiny(tokenizer)
    indices, budget = config.select(model, context(batches))
    path = str(tmp_path / "mask.safetensors")
    save_tuned(SparseDeltaTuned(model, config, indices, budget), path, weights=False)
    with safe_open(path, framework="pt") as handle:
        saved = list(handle.keys())
    assert saved and all(key.endswith(".indices") for key in saved)  # index sets only: no values, no head

    fresh = tiny(tokenizer)
    before = theta0(fresh)
    tuned = load_mask_into(path, fresh, make_method_config("sam", 0.01))
    assert tuned.config == config and tuned.budget == budget  # the config the mask was selected with
    assert tuned.indices().keys() == indices.keys()
    assert all(torch.equal(tuned.indices()[n], indices[n]) for n in indices)
    train_steps(tuned, batches, steps=2, weight_decay=0.1)
    assert 0 < tuned.sparsity_report().changed <= budget
    after, inside = theta(tuned), masks(indices, {n: t.shape for n, t in before.items()})
    assert all(torch.equal(after[n][~m], before[n][~m]) for n, m in inside.items())
    with pytest.raises(UserError, match="holds a 'sam' mask"):
        load_mask_into(path, tiny(tokenizer), make_method_config("random", 0.01))


def test_select_refuses_a_method_without_a_mask(tmp_path, capsys):
    mask = str(tmp_path / "m.safetensors")
    assert main(["select", "--task", "cb", "--method", "lora", "--output", mask]) == 2
    assert "has no mask to select" in capsys.readouterr().err


@pytest.mark.integration
def test_cli_select_then_train_with_mask_on_minilm(data_dir, tmp_path, capsys):
    mask = str(tmp_path / "masks" / "magnitude.safetensors")
    common = ["--task", "cb", "--data-dir", str(data_dir), "--train-limit", "16"]
    assert main(["select", "--method", "magnitude", "--sparsity", "0.005", "--output", mask, *common]) == 0
    selected = capsys.readouterr().out
    assert "magnitude: trainable" in selected and "budget" in selected
    out = tmp_path / "run"
    assert main(["train", "--method", "magnitude", "--mask", mask, "--max-steps", "2", "--quiet", "--eval-limit", "8",
                 "--output", str(out), *common]) == 0
    report = json.loads((out / "result.json").read_text())["sparsity_report"]
    with safe_open(mask, framework="pt") as handle:
        budget = int(handle.metadata()["budget"])
    assert report["budget"] == budget and 0 < report["changed"] <= budget
