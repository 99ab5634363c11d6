import dataclasses
import json

import pytest

from sparse_ft.errors import UserError
from sparse_ft.experiments.reproduce import PLANS, STAGES, StageLog, estimated_cost, reproduce
from sparse_ft.experiments.results import load_analyses


@pytest.fixture
def small_quick_plan(monkeypatch):
    """The quick preset in this process (no worker start-ups) with a shorter converged protocol."""
    plan = dataclasses.replace(PLANS["quick"], jobs=1,
                               converge={"n": 8, "max_steps": 20, "retrains": 2, "lanczos_steps": 8})
    monkeypatch.setitem(PLANS, "quick", plan)
    return plan


@pytest.mark.integration
def test_quick_reproduction_on_a_tiny_model(tiny_model_dir, data_dir, tmp_path, small_quick_plan):
    paper = data_dir.parent / "paper_table1.csv"
    messages = []
    index = reproduce("quick", tmp_path, data_dir=str(data_dir), paper_csv=paper if paper.exists() else None,
                      model=str(tiny_model_dir), log=messages.append)
    assert [m.split(":")[0] for m in messages if m.startswith("stage")] == [f"stage {i}/4" for i in range(1, 5)]
    text = index.read_text()
    assert "## Table 1 (reduced)" in text and "| full |" in text and "| sam |" in text
    for figure in ("figure1_projection", "figure3_sparsity", "figure2_ranks_ours", "analysis_theorem2",
                   "analysis_curvature"):
        assert (tmp_path / f"{figure}.png").stat().st_size > 10_000
    assert (tmp_path / "figure3_sparsity.svg").exists()
    raw = (tmp_path / "figure3.json").read_text()
    assert "Infinity" not in raw and "NaN" not in raw  # strict JSON: a vacuous bound is null
    points = json.loads(raw)["points"]
    plan = small_quick_plan
    assert [p["sparsity"] for p in points] == plan.figure3_sparsities
    analyses = load_analyses(tmp_path / "runs" / "theory")
    assert len(analyses) == len(plan.figure3_sparsities) * len(plan.seeds)
    assert all(a["point"] == "A(S)" and a["n_train"] == plan.converge["n"] for a in analyses)
    for p in points:
        assert p["point"] == "A(S)" and p["analysed_seeds"] == len(plan.seeds) and p["seeds"] == len(plan.seeds)
    assert points[0]["stability"] is not None and points[-1]["stability"] is not None
    # a second invocation finds every run done and recomputes nothing
    cached = sorted((tmp_path / "runs" / "theory").rglob("*.json"))
    stamps = [p.stat().st_mtime_ns for p in cached]
    reproduce("quick", tmp_path, data_dir=str(data_dir), model=str(tiny_model_dir), log=lambda msg: None)
    assert [p.stat().st_mtime_ns for p in cached] == stamps


def test_missing_data_or_model_stops_before_any_run(tiny_model_dir, data_dir, tmp_path):
    with pytest.raises(UserError, match="fetch-data"):
        reproduce("quick", tmp_path / "a", data_dir=str(tmp_path / "no-data"), model=str(tiny_model_dir))
    with pytest.raises(UserError, match="model folder .* does not exist"):
        reproduce("quick", tmp_path / "b", data_dir=str(data_dir), model=str(tmp_path / "no-model"))
    (tmp_path / "empty-model").mkdir()
    with pytest.raises(UserError, match="cannot load"):
        reproduce("quick", tmp_path / "c", data_dir=str(data_dir), model=str(tmp_path / "empty-model"))
    assert not any((tmp_path / name).exists() for name in "abc")


def test_paper_preset_states_its_cost():
    text = estimated_cost(PLANS["paper"])
    assert "700 runs" in text or "runs of up to 50000 steps" in text
    assert "GPU-hours" in text


def test_stage_log_counts_down_the_measured_stage_times():
    messages = []
    log = StageLog(messages.append, len(STAGES), expected=(600.0, 120.0, 1200.0, 60.0))
    for name in STAGES:
        log.begin(name, "detail")
    assert [m.split(":")[0] for m in messages] == ["stage 1/4", "stage 2/4", "stage 3/4", "stage 4/4"]
    assert "about 33 min left" in messages[0] and "about 1 min left" in messages[3]


def test_stage_log_without_a_measured_time_gives_no_eta():
    messages = []
    StageLog(messages.append, 2, expected=None).begin("Table 1", "detail")
    assert messages == ["stage 1/2: Table 1: detail [0.0 min in]"]
