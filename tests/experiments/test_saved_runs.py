"""Saved runs: every method's run leaves its tuned model at A(S), which `load_run` rebuilds and
`sparse-ft evaluate` scores to exactly the score in result.json; bad folders get one line."""

import json

import pytest
import torch

from sparse_ft.cli import main
from sparse_ft.experiments.results import MODEL_FILE, RESULT_FILE
from sparse_ft.experiments.run import RunSpec, execute
from sparse_ft.experiments.saved import evaluate_run, load_run
from sparse_ft.methods import METHODS
from tests.conftest import tiny_config

SIZING = {"diffpruning": {"burn_in_steps": 2}}


def spec(method, model, data_dir, **extra):
    sparsity = 0.05 if METHODS[method].uses_sparsity else None
    return RunSpec(task="cb", method=method, sparsity=sparsity, model=str(model), data_dir=str(data_dir), train_limit=8,
                   eval_limit=8, device="cpu", method_options=SIZING.get(method, {}),
                   train_overrides={"max_steps": 4, "eval_every": 2, "batch_size": 4, "max_length": 64}, **extra)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_train_load_run_evaluate_round_trip(method, tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "run"
    result = execute(spec(method, tiny_model_dir, data_dir), progress=False, log=lambda m: None, output=out)
    assert json.loads((out / RESULT_FILE).read_text())["score"] == result["score"]
    assert (out / MODEL_FILE).stat().st_mode & 0o777 == 0o644
    assert (out / RESULT_FILE).stat().st_mode & 0o777 == 0o644
    tuned = load_run(out)
    assert not tuned.training and tuned.config.name == method
    assert tuned.sparsity_report().changed == result["sparsity_report"]["changed"]
    for split in ("val", "test"):
        assert evaluate_run(out, split, device="cpu")["score"] == result["score"][split]


def test_file_size_follows_what_trained(tiny_model_dir, data_dir, tmp_path):
    """A p-sparse run's file is about k values + k indices + the head, not the backbone."""
    result = execute(spec("sam", tiny_model_dir, data_dir), progress=False, log=lambda m: None, output=tmp_path)
    k, m = result["sparsity_report"]["budget"], result["sparsity_report"]["backbone_params"]
    size = (tmp_path / MODEL_FILE).stat().st_size
    assert size < 0.2 * 4 * m and size < 12 * k + 4 * 200_000


def test_bad_run_folders_get_one_line(tiny_model_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    execute(spec("bitfit", tiny_model_dir, data_dir), progress=False, log=lambda m: None, output=out)
    cases = {"no result.json": tmp_path / "empty", "no model.safetensors": None, "corrupt": None}
    (tmp_path / "empty").mkdir()
    assert main(["evaluate", str(cases["no result.json"])]) == 2
    assert "no result.json" in capsys.readouterr().err
    (out / MODEL_FILE).write_bytes(b"not a safetensors file")
    assert main(["evaluate", str(out), "--device", "cpu"]) == 2
    assert "not a readable safetensors file" in capsys.readouterr().err
    (out / MODEL_FILE).unlink()
    assert main(["evaluate", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "no model.safetensors" in err and err.count("\n") == 1


def test_a_file_for_another_base_model_is_refused(tiny_model_dir, data_dir, tmp_path, tokenizer):
    from transformers import BertModel

    out = tmp_path / "run"
    execute(spec("bitfit", tiny_model_dir, data_dir), progress=False, log=lambda m: None, output=out)
    other = tmp_path / "other-bert"
    torch.manual_seed(1)
    BertModel(tiny_config(vocab_size=len(tokenizer)), add_pooling_layer=False).save_pretrained(other)
    tokenizer.save_pretrained(other)
    result = json.loads((out / RESULT_FILE).read_text())
    result["spec"]["model"] = str(other)
    (out / RESULT_FILE).write_text(json.dumps(result))
    with pytest.raises(Exception, match="another base model"):
        load_run(out)


def test_cli_evaluate_writes_json(tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "run"
    result = execute(spec("lora", tiny_model_dir, data_dir), progress=False, log=lambda m: None, output=out)
    assert main(["evaluate", str(out), "--split", "val", "--device", "cpu", "--json", str(tmp_path / "e.json")]) == 0
    scored = json.loads((tmp_path / "e.json").read_text())
    assert scored["split"] == "val" and scored["score"] == result["score"]["val"] and "major" in scored["metrics"]
