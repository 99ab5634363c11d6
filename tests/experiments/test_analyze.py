"""`sparse-ft analyze`: the theory's quantities at A(S) of saved runs, in a named space, as strict JSON."""

import json
import math

import pytest

from sparse_ft.cli import main
from sparse_ft.experiments.analyze import AnalyzeSettings, analyze_run, analyze_runs
from sparse_ft.experiments.report import analysis_summary_markdown, write_report
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
    write_report(folder, tmp_path / "report")  # both spaces in one report: a row each, one figure each
    report = (tmp_path / "report" / "analysis.md").read_text()
    assert f"full ({full['dim']:,})" in report and f"subspace ({sub['dim']:,})" in report
    assert (tmp_path / "report" / "analysis_curvature.png").stat().st_size > 10_000


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
    write_report(root, tmp_path / "report")
    report = (tmp_path / "report" / "analysis.md").read_text()
    assert "## By configuration" in report and "| cb | bitfit |" in report and "subspace" in report
    assert main(["analyze", str(tmp_path / "nothing-here")]) == 2
    assert "no such folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["analyze", str(tmp_path / "empty")]) == 2
    assert "no finished runs" in capsys.readouterr().err
    with pytest.raises(Exception, match="space"):
        AnalyzeSettings(space="diagonal").validate()


def _analysis(run: str, lambda_min: float, theorem1: float | None, score: float) -> tuple[dict, dict]:
    """A synthetic analysis record and its run's result, as ``load_analyses`` / ``load_results`` return them."""
    verdict = {"value": theorem1, "vacuous": theorem1 is None, "relaxed_curvature": lambda_min + 2 * (1 - 0.005)}
    analysis = {"task": "cb", "method": "sam", "sparsity": 0.005, "space": "subspace", "dim": 100,
                "training_stop": "converged", "lambda_min": lambda_min, "lambda_max": 1.0, "grad_norm": 0.01,
                "rho_points": {"A(S)": 0.1, "theta0": 3.0}, "train_risk": 0.001, "test_risk": 1.5,
                "theorem1": verdict, "theorem2": {**verdict, "value": None if theorem1 is None else 10.0},
                "_path": f"/runs/{run}/analysis.json"}
    return analysis, {"score": {"test": score}, "_path": f"/runs/{run}/result.json"}


def test_summary_averages_seeds_and_counts_vacuous_bounds():
    pairs = [_analysis("seed0", -0.01, 0.2, 60.0), _analysis("seed1", -0.03, 0.4, 58.0),
             _analysis("seed2", -5.0, None, 59.0)]
    table = analysis_summary_markdown([a for a, _ in pairs], [r for _, r in pairs])
    row = next(line for line in table.splitlines() if line.startswith("| cb | sam |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[4] == "3" and cells[5] == "converged 3"
    assert cells[12] == "0.3 ± 0.141 (vacuous 1/3)"  # the vacuous seed is counted, not averaged
    assert cells[11] == format(-5.0 + 2 * 0.995, ".3g")  # the smallest relaxed curvature over the seeds
    assert cells[16] == "59.00 ± 1.00"
