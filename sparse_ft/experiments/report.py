"""Table 1 (mean ± std with ranks), Figure 1 (projection discontinuity) and Figure 3 (effect of
sparsity), from stored results. Figure 2's rank analysis lives in :mod:`theory.ranks`.

Conventions of the paper's Table 1: each cell is the mean ± standard deviation of the test score
(the major metric ×100) over seeds; the AVG column is the mean of the task means and the mean of the
task standard deviations; the three best means of each column carry their rank in brackets.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from theory.ranks import ScoreRow, load_paper_table
from theory.stability import seed_variance_stability

from ..errors import UserError
from ..tasks import TASKS
from .results import load_results

AVG = "avg"


@dataclass
class Cell:
    scores: list[float]

    @property
    def mean(self) -> float:
        return float(np.mean(self.scores))

    @property
    def std(self) -> float:
        """Sample standard deviation over seeds (ddof=1, :func:`theory.stability.seed_variance_stability`);
        0 for a single seed."""
        return seed_variance_stability(self.scores) if len(self.scores) > 1 else 0.0


@dataclass
class Table:
    """rows[row][column] = Cell; rows are methods (``method@p`` when a method ran at several p)."""

    rows: dict[str, dict[str, Cell]] = field(default_factory=dict)

    @property
    def tasks(self) -> list[str]:
        present = {t for cells in self.rows.values() for t in cells}
        return [t for t in TASKS if t in present]

    def mean_std(self, row: str, column: str) -> tuple[float, float] | None:
        cells = self.rows[row]
        if column != AVG:
            cell = cells.get(column)
            return None if cell is None else (cell.mean, cell.std)
        if any(t not in cells for t in self.tasks):
            return None  # an average over a different set of tasks would not compare
        return (float(np.mean([cells[t].mean for t in self.tasks])),
                float(np.mean([cells[t].std for t in self.tasks])))

    def ranks(self, column: str) -> dict[str, int]:
        """Performance rank of each row in a column: 1 = highest mean."""
        means = {r: v[0] for r in self.rows if (v := self.mean_std(r, column)) is not None}
        return {r: i + 1 for i, r in enumerate(sorted(means, key=means.get, reverse=True))}


def row_key(result: dict, multi_sparsity: set[str]) -> str:
    method = result["method"]
    return f"{method}@{result['sparsity']:g}" if method in multi_sparsity else method


def build_table(results: list[dict]) -> Table:
    sparsities: dict[str, set] = {}
    for r in results:
        sparsities.setdefault(r["method"], set()).add(round(float(r["sparsity"]), 8))
    multi = {m for m, ps in sparsities.items() if len(ps) > 1}
    table = Table()
    for r in sorted(results, key=lambda r: (r["method"], r["task"], r["seed"])):
        cells = table.rows.setdefault(row_key(r, multi), {})
        cells.setdefault(r["task"], Cell([])).scores.append(float(r["score"]["test"]))
    return table


def _fmt(value: tuple[float, float] | None, rank: int | None = None) -> str:
    if value is None:
        return "–"
    text = f"{value[0]:.2f} ± {value[1]:.2f}"
    return f"{text} [{rank}]" if rank is not None and rank <= 3 else text


def to_markdown(table: Table) -> str:
    columns = table.tasks + [AVG]
    ranks = {c: table.ranks(c) for c in columns}
    seeds = sorted({len(cell.scores) for cells in table.rows.values() for cell in cells.values()})
    lines = ["| method | " + " | ".join(c.upper() for c in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for row in table.rows:
        cells = [_fmt(table.mean_std(row, c), ranks[c].get(row)) for c in columns]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Test score (the paper's major metric ×100), mean ± sample std over {'/'.join(map(str, seeds))} "
                 f"seed(s); [k] = rank of the mean in its column (top three).")
    return "\n".join(lines)


def to_csv(table: Table) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["method", "task", "mean", "std", "seeds", "rank"])
    for column in table.tasks + [AVG]:
        ranks = table.ranks(column)
        for row in table.rows:
            value = table.mean_std(row, column)
            if value is not None:
                n = len(table.rows[row][column].scores) if column != AVG else ""
                writer.writerow([row, column, f"{value[0]:.4f}", f"{value[1]:.4f}", n, ranks[row]])
    return out.getvalue()


def score_rows(table: Table) -> list[ScoreRow]:
    """The table as :class:`theory.ranks.ScoreRow` s, for the rank analysis of Figure 2."""
    return [ScoreRow(row, task, *table.mean_std(row, task)) for row in table.rows for task in table.tasks
            if table.mean_std(row, task) is not None]


def comparison_markdown(table: Table, paper_rows: list[ScoreRow]) -> str:
    """Ours next to the paper's, per method and task, with the difference of the means."""
    paper = {(r.method, r.task): (r.mean, r.std) for r in paper_rows}
    lines = ["| method | task | ours | paper (roberta-base, 10 seeds) | ours − paper |", "|---|---|---|---|---|"]
    for row in table.rows:
        method = row.split("@")[0]
        for column in table.tasks + [AVG]:
            ours, theirs = table.mean_std(row, column), paper.get((method, column))
            if ours is None or theirs is None:
                continue
            lines.append(f"| {row} | {column} | {_fmt(ours)} | {_fmt(theirs)} | {ours[0] - theirs[0]:+.2f} |")
    return "\n".join(lines)


def write_report(results_dir: str | Path, output: str | Path, paper_csv: str | Path | None = None) -> list[str]:
    """Write table1.md/.csv (and comparison.md with the paper's numbers) from a results folder;
    returns the lines to print: problems with unreadable results first, then the table."""

    results, problems = load_results(results_dir)
    if not results:
        raise UserError(f"no readable result.json under {str(results_dir)!r}")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    table = build_table(results)
    markdown = to_markdown(table)
    (output / "table1.md").write_text(markdown + "\n")
    (output / "table1.csv").write_text(to_csv(table))
    lines = [*problems, markdown]
    if paper_csv:
        comparison = comparison_markdown(table, load_paper_table(paper_csv))
        (output / "comparison.md").write_text(comparison + "\n")
        lines.append(comparison)
    return lines


# ----------------------------------------------------------------------------- figures
def _figure(width: float, height: float):
    """A matplotlib Figure not tied to pyplot: no backend switch, so notebooks keep inline plots."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    return fig, fig.subplots()


def plot_projection_discontinuity(result: dict, path: str | Path):
    """Figure 1: the training loss of a run with periodic mask projections (DiffPruning with
    ``reproject_every``), log scale, each projection marked by a vertical line."""
    steps = [p["step"] for p in result["train_losses"]]
    losses = [p["loss"] for p in result["train_losses"]]
    fig, ax = _figure(6.4, 3.6)
    ax.plot(steps, losses, lw=1.2, label="training loss (mean over each logging window)")
    for i, step in enumerate(result.get("structure_changes", [])):
        ax.axvline(step, color="tab:red", ls="--", lw=0.8, label="mask projection" if i == 0 else None)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (log)")
    ax.set_title(f"Projection discontinuity: {result['method']} on {result['task'].upper()} ({result['model']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    return fig


def plot_sparsity_effect(points: list[dict], path: str | Path, title: str = ""):
    """Figure 3: test mean ± std against sparsity p (log x), and on a second axis the Theorem 1 bound
    and the measured leave-one-out stability where they were computed.

    ``points``: dicts with ``sparsity``, ``mean``, ``std`` and optionally ``bound``, ``bound_formula`` (the
    formula's value when an assumption failed, drawn apart and labelled so), ``stability``.
    """
    points = sorted(points, key=lambda p: p["sparsity"])
    ps = [p["sparsity"] for p in points]
    fig, ax = _figure(6.4, 3.8)
    ax.errorbar(ps, [p["mean"] for p in points], yerr=[p["std"] for p in points], marker="o", capsize=3,
                color="tab:blue", label="test score (mean ± std over seeds)")
    ax.set_xscale("log")
    ax.set_xlabel("sparsity p (fraction of backbone parameters tuned)")
    ax.set_ylabel("test score (×100)", color="tab:blue")
    extra = [(k, label, c) for k, label, c in (
        ("bound", "Theorem 1 bound", "tab:red"),
        ("bound_formula", "Theorem 1 formula, assumptions failed (not a bound)", "tab:orange"),
        ("stability", "measured LOO stability ε̂", "tab:green"))
        if any(p.get(k) is not None and math.isfinite(p[k]) for p in points)
        and not (k == "bound_formula" and all(p.get("bound") == p.get(k) for p in points))]
    handles, labels = ax.get_legend_handles_labels()
    if extra:
        ax2 = ax.twinx()
        for key, label, color in extra:
            xy = [(p["sparsity"], p[key]) for p in points if p.get(key) is not None and math.isfinite(p[key])]
            ax2.plot(*zip(*xy), marker="s", ls="--", color=color, label=label)
        ax2.set_yscale("log")
        ax2.set_ylabel("stability (mean-loss scale)")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, fontsize=8, loc="best")
    ax.set_title(title or "Effect of sparsity (SAM)")
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    return fig
