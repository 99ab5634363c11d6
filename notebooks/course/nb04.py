"""Checks for notebook 04 (stability and bounds)."""

from __future__ import annotations

import math

from . import check_equal, check_number


def check_exercise_1(answer, rho, lam_min, p, n) -> None:
    """Theorem 1 by hand."""
    from theory.bounds import stability_bound

    return check_number(1, answer, stability_bound(rho, lam_min, p, n), rtol=1e-6, what="your bound",
                        hint="2ρ² on top; (Λmin + 2(1 − p))·n below")


def check_exercise_2(answer, *, rho, lam_min, p, C, delta) -> None:
    """Smallest n with Theorem 2's square-root term below C."""
    mu = lam_min + 2 * (1 - p)
    expected = math.floor((C**2 + 24 * C * rho**2 / mu) / (2 * delta * C**2)) + 1
    return check_number(2, answer, expected, rtol=0, atol=0.5, what="your n",
                        hint="square both sides: n > (C² + 24Cρ²/μ) / (2δC²), then the next integer")


def check_exercise_3(answer, report) -> None:
    """The failed assumption of the MiniLM Theorem 1 report."""
    expected = report.failed_assumption or "none"
    return check_equal(3, answer, expected, normalize=lambda s: str(s).strip().lower(), what="your answer",
                       hint="the PSD test comes first: is λmin < 0?")
