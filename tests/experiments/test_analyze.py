"""`sparse-ft analyze`: the theory's quantities at A(S) of saved runs, in a named space, as strict JSON."""

import json
import math

import pytest

from sparse_ft.cli import main
from sparse_ft.experiments.analyze import AnalyzeSettings, analyze_run, analyze_runs
from sparse_ft.experiments.results import ANALYSIS_FILE, MODEL_FILE
from sparse_ft.experiments.run import RunSpec, execute

KEYS = {"point", "space", "dim", "examples", "lambda_max", "lambda_min", "residual_max", "residual_min", "converged",
        "hvps", "grad_norm", "rho", "n_train", "train_risk", "test_risk", "generalization_gap", "theorem1",
        "theorem2", "seconds"}


def converged_run(model, data_dir, folder, method="sam", **extra):
    spec = RunSpec(task="cb", method=method, sparsity=0.05 if method == "sam" else None, model=str(model),
                   data_dir=str(data_dir), preset="converge", train_limit=8, eval_limit=8, device="cpu",
                   train_overrides={"max_steps": 40, "eval_every": 10, "batch_size": 8, "max_length": 64,
                                    "lr": 1e-2, "converge_loss": 0.05}, **extra)
    return execute(spec, progress=False, log=lambda m: None, output=folder)


def test_converged_protocol_records_its_stop(tiny_model_dir, data_dir, tmp_path):
    result = converged_run(tiny_model_dir, data_dir, tmp_path / "run")
    assert result["stop"] in ("converged", "max_steps")
    assert result["best_step"] == result["steps"]  # A(S) is the last model, not the best on val
    if result["stop"] == "converged":
        assert result["final_train_loss"] < 0.05
    else:
        assert result["steps"] == 40


def test_analysis_at_A_of_S_in_both_spaces(tiny_model_dir, data_dir, tmp_path):
    folder = tmp_path / "run"
    result = converged_run(tiny_model_dir, data_dir, folder)
    sub = analyze_run(folder, AnalyzeSettings(lanczos_steps=12, device="cpu"))
    text = (folder / ANALYSIS_FILE).read_text()
    assert "Infinity" not in text and "NaN" not in text
    saved = json.loads(text)
    assert KEYS <= set(saved) and saved["point"] == "A(S)" and saved["space"] == "subspace"
    assert saved["dim"] == result["sparsity_report"]["budget"] and saved["n_train"] == 8
    assert set(saved["theorem1"]) >= {"value", "vacuous", "failed_assumption"}
    assert saved["rho"] == max(saved["rho_points"].values()) and saved["rho_points"]["theta0"] > 0
    assert math.isclose(saved["generalization_gap"], saved["test_risk"] - saved["train_risk"])
    assert saved["lambda_min"] <= saved["lambda_max"]
    full = analyze_run(folder, AnalyzeSettings(lanczos_steps=12, space="full", device="cpu"))
    assert (folder / "analysis.full.json").is_file() and json.loads(text)["space"] == "subspace"  # both kept
    assert full["dim"] == result["sparsity_report"]["backbone_params"]
    # Cauchy interlacing: the subspace's extremes lie inside the full Hessian's (up to Lanczos' own bracket)
    assert full["lambda_max"] >= sub["lambda_max"] - sub["residual_max"]
    assert full["lambda_min"] <= sub["lambda_min"] + sub["residual_min"]


def test_sweep_analysis_skips_done_runs_and_goes_past_bad_ones(tiny_model_dir, data_dir, tmp_path, capsys):
    root = tmp_path / "sweep"
    converged_run(tiny_model_dir, data_dir, root / "cb" / "bitfit" / "seed0", method="bitfit")
    converged_run(tiny_model_dir, data_dir, root / "cb" / "bitfit" / "seed1", method="bitfit", seed=1)
    (root / "cb" / "bitfit" / "seed1" / MODEL_FILE).unlink()
    settings = AnalyzeSettings(lanczos_steps=6, device="cpu")
    summary = analyze_runs([root], settings, progress=False)
    assert summary["done"] == 1 and len(summary["failed"]) == 1 and "no model.safetensors" in summary["failed"][0]
    again = analyze_runs([root], settings, progress=False)
    assert again["skipped"] == 1 and again["done"] == 0
    assert main(["analyze", str(tmp_path / "nothing-here")]) == 2
    assert "no such folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["analyze", str(tmp_path / "empty")]) == 2
    assert "no finished runs" in capsys.readouterr().err
    with pytest.raises(Exception, match="space"):
        AnalyzeSettings(space="diagonal").validate()
