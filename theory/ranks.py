"""Stability rank against performance rank (Fu et al., AAAI 2023, Figure 2), from a results table.

For each task column: stability rank = rank of the seed standard deviation, ascending (1 = most stable);
performance rank = rank of the mean score, descending (1 = best); ties get the average rank
(``scipy.stats.rankdata``). The agreement between the two is Spearman's ρ (``scipy.stats.spearmanr``)

* per task column (one value per column, over methods),
* pooled over all (method, task) cells,
* at the method level: between each method's mean stability rank and mean performance rank over the
  tasks, the quantity Figure 2 plots (with error bars = the standard deviation over tasks).

A positive ρ means the more stable methods also rank higher. The table is a list of :class:`ScoreRow`;
:func:`load_paper_table` reads ``paper_table1.csv`` (comment lines start with '#'; columns method,
paper_name, task, mean, std; "avg" is a column too: it is left out of the default task set so that it is
not counted twice, and can be analysed alone with ``tasks=["avg"]``).

Example::

    rows = load_paper_table("../shared/data/paper_table1.csv")
    analysis = analyze_ranks(rows)
    print(analysis)
    plot_ranks(analysis, path="figures/figure2_ranks.png")
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from theory.stability import seed_variance_stability

AVERAGE_COLUMN = "avg"


@dataclass(frozen=True)
class ScoreRow:
    """Mean and seed standard deviation of one method on one task (scores ×100 in the paper)."""

    method: str
    task: str
    mean: float
    std: float
    paper_name: str = ""


def load_paper_table(path: str | Path) -> list[ScoreRow]:
    """Rows of a CSV with columns method, paper_name, task, mean, std (lines starting with '#' skipped)."""
    with open(path, newline="") as handle:
        lines = [line for line in handle if not line.lstrip().startswith("#") and line.strip()]
    reader = csv.DictReader(lines)
    missing = {"method", "task", "mean", "std"} - set(reader.fieldnames or ())
    if missing:
        raise ValueError(f"{path}: missing columns {sorted(missing)}")
    return [
        ScoreRow(r["method"], r["task"], float(r["mean"]), float(r["std"]), r.get("paper_name") or "")
        for r in reader
    ]


def rows_from_seed_scores(scores: Mapping[tuple[str, str], Sequence[float]], ddof: int = 1) -> list[ScoreRow]:
    """Rows from raw per-seed scores ``{(method, task): [score per seed]}``: mean and
    :func:`theory.stability.seed_variance_stability` (ddof=1 by default)."""
    return [
        ScoreRow(method, task, float(np.mean(values)), seed_variance_stability(values, ddof))
        for (method, task), values in scores.items()
    ]


@dataclass
class RankAnalysis:
    """Ranks per task (``stability_ranks[task][method]``, ``performance_ranks[task][method]``) and the
    Spearman correlations between them (each a ``(rho, pvalue)`` pair)."""

    methods: list[str]
    tasks: list[str]
    stability_ranks: dict[str, dict[str, float]]
    performance_ranks: dict[str, dict[str, float]]
    per_task: dict[str, tuple[float, float]]
    pooled: tuple[float, float]
    method_level: tuple[float, float]

    def mean_ranks(self, kind: str) -> tuple[np.ndarray, np.ndarray]:
        """Mean and standard deviation (ddof=0) over tasks of each method's rank; ``kind`` is "stability" or
        "performance"."""
        table = {"stability": self.stability_ranks, "performance": self.performance_ranks}[kind]
        values = np.array([[table[t][m] for t in self.tasks] for m in self.methods])
        return values.mean(axis=1), values.std(axis=1)

    def to_dict(self) -> dict:
        return {
            "methods": self.methods,
            "tasks": self.tasks,
            "stability_ranks": self.stability_ranks,
            "performance_ranks": self.performance_ranks,
            "per_task": {t: {"rho": r, "pvalue": p} for t, (r, p) in self.per_task.items()},
            "pooled": {"rho": self.pooled[0], "pvalue": self.pooled[1]},
            "method_level": {"rho": self.method_level[0], "pvalue": self.method_level[1]},
        }

    def __str__(self) -> str:
        stab, _ = self.mean_ranks("stability")
        perf, _ = self.mean_ranks("performance")
        width = max(len(m) for m in self.methods)
        lines = [f"{'method'.ljust(width)}  mean stability rank  mean performance rank"]
        order = np.argsort(stab, kind="stable")
        lines += [f"{self.methods[i].ljust(width)}  {stab[i]:19.2f}  {perf[i]:21.2f}" for i in order]
        lines.append("Spearman rho (p-value):")
        lines += [f"  {t}: {r:+.3f} ({p:.3g})" for t, (r, p) in self.per_task.items()]
        lines.append(
            f"  pooled over {len(self.methods) * len(self.tasks)} cells: "
            f"{self.pooled[0]:+.3f} ({self.pooled[1]:.3g})"
        )
        lines.append(
            f"  method level (mean ranks over {len(self.tasks)} tasks): "
            f"{self.method_level[0]:+.3f} ({self.method_level[1]:.3g})"
        )
        return "\n".join(lines)


def analyze_ranks(rows: Sequence[ScoreRow], tasks: Sequence[str] | None = None) -> RankAnalysis:
    """Stability and performance ranks per task and their Spearman correlations (module docstring).

    ``tasks`` defaults to every task column except "avg", in table order; every method must have a row
    for every task analysed.
    """
    cells = {(r.method, r.task): r for r in rows}
    if len(cells) != len(rows):
        raise ValueError("the table has duplicate (method, task) rows")
    methods = list(dict.fromkeys(r.method for r in rows))
    if tasks is None:
        tasks = [t for t in dict.fromkeys(r.task for r in rows) if t != AVERAGE_COLUMN]
    tasks = list(tasks)
    missing = [(m, t) for t in tasks for m in methods if (m, t) not in cells]
    if missing or not tasks:
        raise ValueError(f"every method needs a row for every task; missing {missing[:5]}")
    if len(methods) < 3:
        raise ValueError("need at least 3 methods to correlate ranks")
    stability, performance, per_task = {}, {}, {}
    for task in tasks:
        std = np.array([cells[m, task].std for m in methods])
        mean = np.array([cells[m, task].mean for m in methods])
        stability[task] = dict(zip(methods, stats.rankdata(std).tolist()))
        performance[task] = dict(zip(methods, stats.rankdata(-mean).tolist()))
        per_task[task] = _spearman(list(stability[task].values()), list(performance[task].values()))
    pooled = _spearman(
        [stability[t][m] for t in tasks for m in methods], [performance[t][m] for t in tasks for m in methods]
    )
    analysis = RankAnalysis(methods, tasks, stability, performance, per_task, pooled, (np.nan, np.nan))
    analysis.method_level = _spearman(
        analysis.mean_ranks("stability")[0], analysis.mean_ranks("performance")[0]
    )
    return analysis


def plot_ranks(analysis: RankAnalysis, path: str | Path | None = None, ax: Any = None) -> Any:
    """Figure 2: mean performance rank against mean stability rank per method, error bars = std over tasks.
    Returns the matplotlib figure (saved to ``path`` if given)."""
    import matplotlib

    if ax is None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 5.2)) if ax is None else (ax.figure, ax)
    x, xerr = analysis.mean_ranks("stability")
    y, yerr = analysis.mean_ranks("performance")
    ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="o", capsize=3, lw=1)
    placed: list[tuple[float, float]] = []
    for name, xi, yi in zip(analysis.methods, x, y):
        # labels of points that (nearly) coincide are stacked instead of drawn over each other
        stack = sum(abs(xi - px) < 0.6 and abs(yi - py) < 0.6 for px, py in placed)
        placed.append((xi, yi))
        ax.annotate(name, (xi, yi), textcoords="offset points", xytext=(5, 4 - 14 * stack), fontsize=12)
    rho, pvalue = analysis.method_level
    count = len(analysis.tasks)
    ax.set_xlabel("stability rank (std ascending)", fontsize=12)
    ax.set_ylabel("performance rank (mean descending)", fontsize=12)
    ax.set_title(f"method-level Spearman ρ = {rho:.2f} (p = {pvalue:.2g})\nmean ranks over {count} "
                 f"task{'s' if count != 1 else ''}", fontsize=12)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=150)
        fig.savefig(Path(path).with_suffix(".svg"))
    return fig


def _spearman(a, b) -> tuple[float, float]:
    result = stats.spearmanr(a, b)
    return float(result.statistic), float(result.pvalue)
