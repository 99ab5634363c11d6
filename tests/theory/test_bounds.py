"""Theorem 1 and Theorem 2: hand-computed values, vacuous cases, monotonicity, input validation."""

import math

import numpy as np
import pytest

from theory.bounds import (
    check_generalization,
    check_stability,
    generalization_bound,
    generalization_bound_report,
    stability_bound,
    stability_bound_report,
)


def test_hand_computed_values():
    # 2·2² / ((0.1 + 2·0.995)·250) = 8 / 522.5
    assert stability_bound(2.0, 0.1, 0.005, 250) == pytest.approx(8 / 522.5, rel=1e-14)
    # 0.3 + sqrt((1 + 24·1·1/1.5) / (2·10000·0.1)) = 0.3 + sqrt(17/2000)
    assert generalization_bound(0.3, 1.0, 0.5, 0.5, 10000, 1.0, 0.1) == pytest.approx(
        0.3 + math.sqrt(17 / 2000), rel=1e-14
    )
    assert stability_bound(0.0, 0.0, 0.5, 10) == 0.0


def test_vacuous_cases_return_inf_with_the_failed_assumption():
    report = stability_bound_report(1.0, -0.1, 0.5, 100)
    assert report.value == math.inf and report.vacuous and report.failed_assumption == "hessian_psd"
    assert "not PSD" in report.reason and math.isfinite(report.formula_value)
    assert stability_bound(1.0, -0.1, 0.5, 100) == math.inf
    assert math.isfinite(stability_bound(1.0, -0.1, 0.5, 100, psd_tol=0.2))
    # p = 1 (full fine-tuning) with a singular Hessian: no regularisation left
    flat = stability_bound_report(1.0, 0.0, 1.0, 100)
    assert flat.value == math.inf and flat.failed_assumption == "positive_denominator"
    assert flat.formula_value == math.inf
    tol = stability_bound_report(1.0, -1e-3, 1.0, 100, psd_tol=1e-2)
    assert tol.value == math.inf and tol.failed_assumption == "positive_denominator"
    assert generalization_bound(0.1, 1.0, 0.0, 1.0, 100, 1.0, 0.1) == math.inf
    gen = generalization_bound_report(0.1, 1.0, -0.5, 0.5, 100, 1.0, 0.1)
    assert gen.vacuous and gen.failed_assumption == "hessian_psd"


def test_uninformative_generalization_bound_is_flagged_not_clipped():
    report = generalization_bound_report(0.3, 1.0, 0.5, 0.5, 100, 1.0, 0.1)
    assert report.value == pytest.approx(0.3 + math.sqrt(17 / 20)) and report.value > 1.0
    assert not report.vacuous and "uninformative" in report.reason


def test_monotone_in_p():
    ps = np.linspace(0.01, 1.0, 25)
    stab = [stability_bound(1.5, 0.05, float(p), 500) for p in ps]
    gen = [generalization_bound(0.2, 1.5, 0.05, float(p), 500, 2.0, 0.05) for p in ps]
    assert np.all(np.diff(stab) > 0) and np.all(np.diff(gen) > 0)
    assert stability_bound(1.0, 0.1, 0.5, 100) > stability_bound(1.0, 0.1, 0.5, 200)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"p": 0.0}, r"p must lie in \(0, 1\]"),
        ({"p": 1.5}, r"p must lie in \(0, 1\]"),
        ({"n": 0}, "n must be an integer >= 1"),
        ({"n": 2.5}, "n must be an integer >= 1"),
        ({"rho": -1.0}, "rho must be >= 0"),
        ({"rho": float("nan")}, "finite"),
        ({"lambda_min": float("inf")}, "finite"),
        ({"delta": 1.0}, r"delta must lie in \(0, 1\)"),
        ({"delta": 0.0}, r"delta must lie in \(0, 1\)"),
        ({"C": 0.0}, "C must be > 0"),
        ({"empirical_risk": 3.0}, r"empirical_risk must lie in \[0, C\]"),
        ({"psd_tol": -1.0}, "psd_tol must be >= 0"),
    ],
)
def test_input_validation(kwargs, match):
    args = {"empirical_risk": 0.2, "rho": 1.0, "lambda_min": 0.1, "p": 0.5, "n": 100, "C": 2.0, "delta": 0.1}
    psd_tol = kwargs.pop("psd_tol", 0.0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        generalization_bound(**args, psd_tol=psd_tol)
    if not {"C", "delta", "empirical_risk"} & set(kwargs):
        with pytest.raises(ValueError, match=match):
            stability_bound(args["rho"], args["lambda_min"], args["p"], args["n"], psd_tol=psd_tol)


def test_report_objects():
    holds = check_stability(0.001, 1.0, 0.1, 0.01, 100, ci=(0.0005, 0.002))
    assert holds.verdict == "holds" and holds.note == ""
    assert check_stability(0.5, 1.0, 0.1, 0.01, 100).verdict == "violated"
    vacuous = check_stability(0.001, 1.0, -0.1, 0.01, 100)
    assert vacuous.verdict == "vacuous" and "not PSD" in vacuous.note
    edge = check_stability(0.0099, 1.0, 0.0, 0.5, 200, ci=(0.005, 0.02))  # bound 0.01
    assert edge.verdict == "holds" and "upper confidence limit" in edge.note
    text = str(holds)
    for word in ("measured", "Theorem 1", "rho", "lambda_min", "p ", "n ", "mean loss", "verdict", "holds"):
        assert word in text
    d = holds.to_dict()
    assert d["verdict"] == "holds" and d["bound"]["inputs"]["n"] == 100 and d["bound"]["loss_scale"]
    gen = check_generalization(0.35, 0.3, 1.0, 0.5, 0.5, 10000, 1.0, 0.1)
    assert gen.verdict == "holds" and "Theorem 2" in str(gen)
