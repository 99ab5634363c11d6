import json
import math

import pytest

from sparse_ft.experiments.reproduce import PLANS, estimated_cost, reproduce
from theory.bounds import stability_bound


@pytest.mark.integration
def test_quick_reproduction_on_a_tiny_model(tiny_model_dir, data_dir, tmp_path):
    paper = data_dir.parent / "paper_table1.csv"
    index = reproduce("quick", tmp_path, data_dir=str(data_dir), paper_csv=paper if paper.exists() else None,
                      model=str(tiny_model_dir), log=lambda msg: None)
    text = index.read_text()
    assert "## Table 1 (reduced)" in text and "| full |" in text and "| sam |" in text
    for figure in ("figure1_projection.png", "figure3_sparsity.png", "figure2_ranks_ours.png"):
        assert (tmp_path / figure).stat().st_size > 10_000
    points = json.loads((tmp_path / "figure3.json").read_text())
    assert [p["sparsity"] for p in points] == PLANS["quick"].figure3_sparsities
    for p in points:
        assert p["seeds"] == len(PLANS["quick"].seeds)
        expected = stability_bound(p["rho"], p["lambda_min"], p["sparsity"], p["n"])
        assert p["bound"] == expected or (math.isinf(p["bound"]) and math.isinf(expected))
    assert points[0]["stability"] is not None and points[-1]["stability"] is not None
    # a second invocation finds every run done and recomputes nothing
    stamp = (tmp_path / "figure3.json").stat().st_mtime_ns
    cached = sorted((tmp_path / "runs" / "theory").iterdir())
    reproduce("quick", tmp_path, data_dir=str(data_dir), model=str(tiny_model_dir), log=lambda msg: None)
    assert sorted((tmp_path / "runs" / "theory").iterdir()) == cached
    assert (tmp_path / "figure3.json").stat().st_mtime_ns >= stamp


def test_paper_preset_states_its_cost():
    text = estimated_cost(PLANS["paper"])
    assert "700 runs" in text or "runs of up to 50000 steps" in text
    assert "GPU-hours" in text
