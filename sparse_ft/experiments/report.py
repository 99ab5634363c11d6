"""Table 1 (mean ± std with ranks), Figure 1 (projection discontinuity) and Figure 3 (effect of
sparsity), from stored results. Figure 2's rank analysis lives in :mod:`theory.ranks`.

Conventions of the paper's Table 1: each cell is the mean ± standard deviation of the test score
(the major metric ×100) over seeds; the AVG column is the mean of the task means and the mean of the
task standard deviations; the three best means of each column carry their rank in brackets.
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from theory.ranks import ScoreRow, load_paper_table
from theory.stability import seed_variance_stability

from ..errors import UserError
from ..tasks import TASKS
from .results import load_analyses, load_results

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
        return [t for t in TASKS if t in present] + sorted(present - set(TASKS))  # task files after the paper's

    def mean_std(self, row: str, column: str) -> tuple[float, float] | None:
        cells = self.rows[row]
        if column != AVG:
            cell = cells.get(column)
            return None if cell is None else (cell.mean, cell.std)
        if any(t not in cells for t in self.tasks):
            return None  # an average over a different set of tasks would not compare
        return (float(np.mean([cells[t].mean for t in self.tasks])),
                float(np.mean([cells[t].std for t in self.tasks])))

    def seed_count(self, row: str, column: str) -> int:
        """Seeds behind a cell (for AVG, the fewest over its tasks; 0 where the cell is missing)."""
        cells = self.rows[row]
        columns = self.tasks if column == AVG else [column]
        return min((len(cells[c].scores) if c in cells else 0) for c in columns)

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


def _fmt(value: tuple[float, float] | None, rank: int | None = None, with_std: bool = True) -> str:
    if value is None:
        return "–"
    text = f"{value[0]:.2f} ± {value[1]:.2f}" if with_std else f"{value[0]:.2f}"
    return f"{text} [{rank}]" if rank is not None and rank <= 3 else text


def to_markdown(table: Table) -> str:
    columns = table.tasks + [AVG]
    ranks = {c: table.ranks(c) for c in columns}
    seeds = sorted({len(cell.scores) for cells in table.rows.values() for cell in cells.values()})
    lines = ["| method | " + " | ".join(c.upper() for c in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for row in table.rows:
        cells = [_fmt(table.mean_std(row, c), ranks[c].get(row), with_std=table.seed_count(row, c) > 1)
                 for c in columns]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Test score (the paper's major metric ×100), mean ± sample std over {'/'.join(map(str, seeds))} "
                 f"seed(s) (a one-seed cell shows its score alone); [k] = rank of the mean in its column (top three).")
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
    analyses = load_analyses(results_dir)
    if analyses:
        (output / "analysis.md").write_text("## By configuration\n\n" + analysis_summary_markdown(analyses, results)
                                            + "\n\n## By run\n\n" + analysis_markdown(analyses) + "\n")
        plot_analysis(analyses, output)
        lines.append(f"{len(analyses)} analysed runs: analysis.md, analysis_theorem2.png, analysis_curvature.png")
    return lines


def format_or_dash(value, fmt: str = ".3g") -> str:
    """``value`` formatted, or "–" for a missing (None) number."""
    return "–" if value is None else format(value, fmt)


def analysis_markdown(analyses: list[dict]) -> str:
    """One row per analysed run (``sparse-ft analyze``): where it was measured, the spectrum, stationarity,
    ρ̂, the risks and both theorems, with the assumption that decided a vacuous bound."""
    head = ("| task | method | p | seed | point, space (dim) | λmin (res.) | λmax | ‖∇L̂‖ | ρ̂ | n | R̂ | R | R − R̂ | "
            "Theorem 1 (formula) | Theorem 2 | verdict |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for a in sorted(analyses, key=lambda a: (a["task"], a["method"], a["sparsity"], a["seed"], a["space"])):
        t1, t2 = a["theorem1"], a["theorem2"]
        verdict = (f"vacuous ({t1['failed_assumption']})" if t1["vacuous"] else
                   "holds (relaxed; H not PSD)" if not t1["psd"] else "holds")
        lines.append(
            f"| {a['task']} | {a['method']} | {a['sparsity']:.4g} | {a['seed']} | {a['point']}, {a['space']} "
            f"({a['dim']:,}) | {a['lambda_min']:.3g} ({a['residual_min']:.1g}) | {a['lambda_max']:.3g} | "
            f"{a['grad_norm']:.2g} | {a['rho']:.3g} | {a['n_train']} | {a['train_risk']:.3g} | {a['test_risk']:.3g} | "
            f"{a['generalization_gap']:.3g} | {format_or_dash(t1['value'])} ({format_or_dash(t1['formula_value'])}) | {format_or_dash(t2['value'])} | "
            f"{verdict} |")
    lines += ["", ("All at A(S), the saved tuned model; risks are mean cross-entropy per example (R̂ on the n training "
              "examples, R on the test split); ρ̂ is the largest per-example gradient norm over θ0 and A(S); Theorem 2 "
              "uses C = the largest per-example loss measured and δ = 0.05. A subspace λmin is never below the full "
              "Hessian's (Cauchy interlacing), so a subspace bound is the optimistic one.")]
    return "\n".join(lines)


def _spread(values: list[float | None], fmt: str = ".3g") -> str:
    """Mean ± sample standard deviation (:func:`theory.stability.seed_variance_stability`) of the numbers in ``values``, "–" where none is a number; a value
    that is None (a vacuous bound) is left out and counted in the caller's verdict column."""
    numbers = [v for v in values if v is not None]
    if not numbers:
        return "–"
    if len(numbers) == 1:
        return format(numbers[0], fmt)
    return f"{format(float(np.mean(numbers)), fmt)} ± {format(seed_variance_stability(numbers), fmt)}"


def _theorem_spread(runs: list[dict], name: str) -> str:
    """A theorem's bound over seeds: mean ± std of the finite values, and how many seeds were vacuous."""
    vacuous = sum(a[name]["vacuous"] for a in runs)
    return _spread([a[name]["value"] for a in runs]) + (f" (vacuous {vacuous}/{len(runs)})" if vacuous else "")


def analysis_summary_markdown(analyses: list[dict], results: list[dict]) -> str:
    """One row per configuration (task, method, p, space) of analysed runs, mean ± std over its seeds: the
    spectrum, stationarity, ρ̂ at A(S) and θ0, the relaxed curvature λmin + 2(1−p) (its smallest seed), both
    theorems with how many seeds were vacuous, the measured risks and the runs' test scores (``results``,
    matched to an analysis by its run folder)."""
    scores = {str(Path(r["_path"]).parent): r["score"]["test"] for r in results}
    groups: dict[tuple, list[dict]] = {}
    for a in analyses:
        groups.setdefault((a["task"], a["method"], round(a["sparsity"], 6), a["space"]), []).append(a)
    head = ("| task | method | p | space (dim) | seeds | stop | λmin | λmax | ‖∇L̂‖ | ρ̂ at A(S) | ρ̂ at θ0 | "
            "min λmin + 2(1−p) | Theorem 1 | R̂ | R | Theorem 2 | test score |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for (task, method, sparsity, space), runs in sorted(groups.items()):
        stops = ", ".join(f"{stop} {count}" for stop, count in
                          sorted(Counter(str(a.get("training_stop")) for a in runs).items()))
        lines.append(
            f"| {task} | {method} | {sparsity:.4g} | {space} ({runs[0]['dim']:,}) | {len(runs)} | {stops} | "
            f"{_spread([a['lambda_min'] for a in runs])} | {_spread([a['lambda_max'] for a in runs])} | "
            f"{_spread([a['grad_norm'] for a in runs], '.2g')} | {_spread([a['rho_points']['A(S)'] for a in runs])} | "
            f"{_spread([a['rho_points']['theta0'] for a in runs])} | "
            f"{min(a['theorem1']['relaxed_curvature'] for a in runs):.3g} | {_theorem_spread(runs, 'theorem1')} | "
            f"{_spread([a['train_risk'] for a in runs], '.2g')} | {_spread([a['test_risk'] for a in runs])} | "
            f"{_theorem_spread(runs, 'theorem2')} | {_spread([scores.get(str(Path(a['_path']).parent)) for a in runs], '.2f')} |")
    lines += ["", ("Mean ± std over seeds, all at A(S) (the saved tuned model) in the space named. The bound uses "
              "ρ̂ = max(ρ̂ at A(S), ρ̂ at θ0); a vacuous bound is left out of its mean and counted. Test score: the "
              "run's major metric ×100 on the test split.")]
    return "\n".join(lines)


SPACE_NAMES = {"subspace": "tunable subspace", "full": "full space"}
GRAD_MARKERS = {"subspace": "x", "full": "+"}


def plot_analysis(analyses: list[dict], output: str | Path) -> None:
    """Two figures from analysed runs: Theorem 2's bound against the measured test risk, analysis by
    analysis (``analysis_theorem2.png``), and λmin and ‖∇L̂‖ at A(S) against p (``analysis_curvature.png``).
    Colour = method; a filled marker is the tunable subspace, a hollow one the full space."""
    from matplotlib.lines import Line2D

    output = Path(output)
    methods = sorted({a["method"] for a in analyses})
    colors = {m: f"C{i}" for i, m in enumerate(methods)}
    spaces = sorted({a["space"] for a in analyses}, reverse=True)  # subspace first
    method_handles = [Line2D([], [], ls="", marker="o", color=colors[m], label=m) for m in methods]

    def style(a: dict, marker: str = "o") -> dict:
        color = colors[a["method"]]
        if marker in "x+":  # line markers have no face to leave hollow
            return {"marker": marker, "s": 40, "color": color}
        return {"marker": marker, "s": 40, "edgecolors": color,
                "facecolors": color if a["space"] == "subspace" else "none"}

    def space_handles(what: str) -> list:  # the o markers: filled subspace, hollow full space
        return [Line2D([], [], ls="", marker="o", color="black", markerfacecolor="black" if space == "subspace"
                       else "none", label=f"{what}, {SPACE_NAMES[space]}") for space in spaces]

    fig, ax = _figure(6.4, 5.6)
    drawn = [a for a in analyses if a["theorem2"]["value"] is not None]
    for a in drawn:
        ax.scatter(a["test_risk"], a["theorem2"]["value"], **style(a))
    top = max([a["test_risk"] for a in analyses] + [a["theorem2"]["value"] for a in drawn])
    line = ax.plot([0, top], [0, top], color="grey", ls=":", label="bound = measured risk")
    ax.set_xlabel("measured test risk R at A(S) (mean cross-entropy)")
    ax.set_ylabel("Theorem 2 bound on R (δ = 0.05)")
    ax.set_title(f"Theorem 2 against the measured risk\n{len(drawn)} analyses drawn, "
                 f"{len(analyses) - len(drawn)} vacuous (not drawn)")
    fig.legend(handles=method_handles + (space_handles("bound") if len(spaces) > 1 else []) + line,
               loc="lower center", ncol=3, frameon=False)
    _save(fig, output / "analysis_theorem2.png", rect=(0, 0.16, 1, 1))

    fig, ax = _figure(6.4, 5.8)
    ax2 = ax.twinx()
    for a in analyses:
        ax.scatter(a["sparsity"], a["lambda_min"], **style(a))
        ax2.scatter(a["sparsity"], a["grad_norm"], **style(a, GRAD_MARKERS[a["space"]]))
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax2.set_yscale("log")
    ax.set_xlabel("sparsity p (fraction of the backbone that may change)")
    ax.set_ylabel("λmin of the training-loss Hessian (o)")
    ax2.set_ylabel("‖∇L̂(A(S))‖ (x, +)")
    ax.set_title("Curvature and stationarity at A(S)")
    grad_handles = [Line2D([], [], ls="", marker=GRAD_MARKERS[space], color="black",
                           label=f"‖∇L̂‖, {SPACE_NAMES[space]}") for space in spaces]
    fig.legend(handles=method_handles + space_handles("λmin") + grad_handles, loc="lower center",
               ncol=3, frameon=False)
    _save(fig, output / "analysis_curvature.png", rect=(0, 0.2, 1, 1))


# ----------------------------------------------------------------------------- figures
def _figure(width: float, height: float):
    """A matplotlib Figure not tied to pyplot: no backend switch, so notebooks keep inline plots."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    return fig, fig.subplots()


MIN_FONT_PT = 12


def _save(fig, path: str | Path, rect=(0, 0, 1, 1)) -> None:
    """Save a figure for a projector (every text ≥ 12 pt, 150 dpi) as PNG at ``path`` and as SVG beside it."""
    from matplotlib.text import Text

    for text in fig.findobj(Text):
        if text.get_fontsize() < MIN_FONT_PT:
            text.set_fontsize(MIN_FONT_PT)
    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=150)
    fig.savefig(Path(path).with_suffix(".svg"))


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
    ax.legend()
    _save(fig, path)
    return fig


def plot_sparsity_effect(points: list[dict], path: str | Path, title: str = ""):
    """Figure 3: test mean ± std against sparsity p, and on a second (log) axis, at A(S): Theorem 1's bound
    where it holds, its formula where an assumption failed (marked so, not a bound), and the measured
    leave-one-out ε̂ with its 95% confidence interval.

    ``points``: dicts with ``sparsity``, ``mean``, ``std`` and optionally ``theorem1`` (None when vacuous),
    ``theorem1_formula``, ``stability`` and ``stability_ci``. A series with no finite value is left out and
    the legend says why."""
    points = sorted(points, key=lambda p: p["sparsity"])
    fig, ax = _figure(7.2, 5.0)
    scored = [p for p in points if p.get("mean") is not None]
    ax.errorbar([p["sparsity"] for p in scored], [p["mean"] for p in scored], yerr=[p["std"] for p in scored],
                marker="o", capsize=4, color="tab:blue", label="test score, mean ± std over seeds")
    ax.set_xscale("log")
    ax.set_xticks([p["sparsity"] for p in points], [f"{p['sparsity']:g}" for p in points])
    ax.set_xlabel("sparsity p (fraction of backbone parameters tuned)")
    ax.set_ylabel("test score (major metric ×100)", color="tab:blue")
    ax2 = ax.twinx()
    ax2.set_yscale("log")
    ax2.set_ylabel("stability at A(S) (mean cross-entropy)")
    notes = []
    for key, label, color in (("theorem1", "Theorem 1 bound", "tab:red"),
                              ("theorem1_formula", "Theorem 1 formula where an assumption failed (not a bound)",
                               "tab:orange")):
        xy = [(p["sparsity"], p[key]) for p in points if p.get(key) is not None
              and (key == "theorem1" or p.get("theorem1") is None)]
        if xy:
            ax2.plot(*zip(*xy), marker="s", ls="--", color=color, label=label)
        elif key == "theorem1":
            notes.append("Theorem 1 vacuous at every p (not drawn)")
    loo = [p for p in points if p.get("stability") is not None]
    if loo:
        lows = [p["stability"] - p["stability_ci"][0] for p in loo]
        highs = [p["stability_ci"][1] - p["stability"] for p in loo]
        ax2.errorbar([p["sparsity"] for p in loo], [p["stability"] for p in loo], yerr=[lows, highs], marker="^",
                     ls=":", capsize=4, color="tab:green", label="leave-one-out ε̂ (95% CI)")
    handles, labels = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    fig.legend(handles + h2, labels + l2, loc="lower center", ncol=2, fontsize=10, frameon=False)
    ax.set_title((title or "Effect of sparsity (SAM)") + ("\n" + "; ".join(notes) if notes else ""))
    _save(fig, path, rect=(0, 0.16, 1, 1))
    return fig
