"""Theorem 1 and Theorem 2: hand-computed values, vacuous cases, monotonicity, input validation."""

import json
import math

import numpy as np
import pytest

from theory.bounds import (
    check_generalization,
    check_stability,
    generalization_bound,
    generalization_bound_report,
    psd_tolerance,
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
    # p = 1 (full fine-tuning) with a singular Hessian: no regularisation left
    flat = stability_bound_report(1.0, 0.0, 1.0, 100)
    assert flat.value == math.inf and flat.vacuous and flat.failed_assumption == "relaxed_strong_convexity"
    assert flat.formula_value == math.inf and flat.psd and not flat.relaxed_positive
    assert flat.to_dict()["value"] is None and flat.to_dict()["formula_value"] is None
    tol = stability_bound_report(1.0, -1e-3, 1.0, 100, psd_tol=1e-2)
    assert tol.value == math.inf and tol.failed_assumption == "relaxed_strong_convexity" and tol.psd
    assert generalization_bound(0.1, 1.0, 0.0, 1.0, 100, 1.0, 0.1) == math.inf
    # clearly vacuous: lambda_min = -4.25 at p = 0.005 (theta0 of a MiniLM run), both verdicts fail
    bad = stability_bound_report(1.0, -4.25, 0.005, 100, residual_min=1e-3, lambda_max=30.0)
    assert bad.vacuous and bad.value == math.inf and bad.failed_assumption == "relaxed_strong_convexity"
    assert not bad.psd and not bad.relaxed_positive and bad.relaxed_curvature == pytest.approx(-2.26)
    d = bad.to_dict()
    assert d["value"] is None and d["formula_value"] is None and d["vacuous"] is True
    assert d["verdicts"]["strict_psd"] == {
        "holds": False,
        "condition": "lambda_min >= -psd_tol",
        "value": None,
    }
    assert d["verdicts"]["relaxed"]["holds"] is False and d["verdicts"]["relaxed"]["value"] is None
    assert "Infinity" not in json.dumps(d) and "NaN" not in json.dumps(d)
    gen = generalization_bound_report(0.1, 1.0, -4.25, 0.005, 100, 1.0, 0.1)
    assert gen.vacuous and gen.failed_assumption == "relaxed_strong_convexity"
    assert stability_bound(1.0, -4.25, 0.005, 100) == math.inf


def test_converged_like_indefinite_hessian_strict_and_relaxed_verdicts():
    # MiniLM/CB near A(S): lambda_min -0.0021, lambda_max 0.021, Ritz residual 9e-8, p = 0.005
    kwargs = {"residual_min": 9e-8, "lambda_max": 0.021}
    report = stability_bound_report(1.0, -0.0021, 0.005, 250, **kwargs)
    formula = 2 / ((2 * 0.995 - 0.0021) * 250)
    assert report.psd_tol == pytest.approx(9e-8 + 100 * 2.0**-23 * 0.021)
    assert not report.psd and report.relaxed_positive and report.relaxed_curvature == pytest.approx(1.9879)
    assert not report.vacuous and report.failed_assumption is None and report.decided_by == "relaxed"
    assert report.value == pytest.approx(formula) and report.formula_value == pytest.approx(formula)
    assert "not PSD" in report.reason and "relaxed objective" in report.reason
    d = report.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["value"] == pytest.approx(formula) and d["psd"] is False and d["relaxed_positive"] is True
    assert d["verdicts"]["strict_psd"]["value"] is None
    assert d["verdicts"]["relaxed"]["value"] == pytest.approx(formula)
    assert stability_bound(1.0, -0.0021, 0.005, 250, **kwargs) == pytest.approx(formula)
    # the theorem as stated: the strict verdict decides
    strict = stability_bound_report(1.0, -0.0021, 0.005, 250, require_psd=True, **kwargs)
    assert strict.vacuous and strict.value == math.inf and strict.failed_assumption == "hessian_psd"
    assert strict.decided_by == "strict_psd" and strict.formula_value == pytest.approx(formula)
    # within the tolerance: a Ritz value -1e-7 with residual 1e-6 does not refute PSD
    near = stability_bound_report(1.0, -1e-7, 0.005, 250, residual_min=1e-6, lambda_max=0.021)
    assert near.psd and not near.vacuous and near.reason == ""
    assert psd_tolerance(1e-6, 0.021) == pytest.approx(1e-6 + 100 * 2.0**-23 * 0.021)
    gen = generalization_bound_report(0.3, 1.0, -0.0021, 0.005, 10000, 1.0, 0.1, **kwargs)
    assert not gen.vacuous and not gen.psd and gen.relaxed_positive
    assert gen.value == pytest.approx(0.3 + math.sqrt((1 + 24 / 1.9879) / 2000))


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
    vacuous = check_stability(0.001, 1.0, -0.1, 0.01, 100, require_psd=True)
    assert vacuous.verdict == "vacuous" and "not PSD" in vacuous.note
    assert check_stability(0.001, 1.0, -3.0, 0.01, 100).verdict == "vacuous"
    relaxed = check_stability(0.001, 1.0, -0.1, 0.01, 100)
    assert relaxed.verdict == "holds" and "not PSD" in relaxed.note
    edge = check_stability(0.0099, 1.0, 0.0, 0.5, 200, ci=(0.005, 0.02))  # bound 0.01
    assert edge.verdict == "holds" and "upper confidence limit" in edge.note
    text = str(holds)
    for word in ("measured", "Theorem 1", "rho", "lambda_min", "p ", "n ", "mean loss", "verdict", "holds"):
        assert word in text
    d = holds.to_dict()
    assert d["verdict"] == "holds" and d["bound"]["inputs"]["n"] == 100 and d["bound"]["loss_scale"]
    assert json.loads(json.dumps(vacuous.to_dict()))["bound"]["value"] is None
    gen = check_generalization(0.35, 0.3, 1.0, 0.5, 0.5, 10000, 1.0, 0.1)
    assert gen.verdict == "holds" and "Theorem 2" in str(gen)
