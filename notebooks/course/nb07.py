"""Checks for notebook 07 (mini Table 1 and Figure 2)."""

from __future__ import annotations

from . import check_equal, check_number


def check_exercise_1(answer, paper_rows) -> None:
    """Spearman's rho of the paper's RTE column."""
    from theory.ranks import analyze_ranks

    expected = analyze_ranks(paper_rows, tasks=["rte"]).per_task["rte"][0]
    return check_number(1, answer, expected, rtol=1e-6, what="your rho",
                        hint="stds ranked ascending, means ranked descending (rank the negated means)")


def check_exercise_2(answer, analysis) -> None:
    """The method with the lowest mean stability rank."""
    mean, _ = analysis.mean_ranks("stability")
    expected = analysis.methods[int(mean.argmin())]
    return check_equal(2, answer, expected, normalize=lambda s: str(s).strip().lower(), what="your method",
                       hint="analysis.mean_ranks('stability') gives one mean rank per method, in analysis.methods order")
