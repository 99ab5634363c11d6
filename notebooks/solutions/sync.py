"""Rebuild the solution notebooks from the tutorials, keeping the answers already written here.

    ../.venv/bin/python solutions/sync.py            # from notebooks/: rewrite every solutions/NN_*.ipynb
    ../.venv/bin/python solutions/sync.py --check    # exit 1 when one is out of date or lacks an answer

A solution notebook is its tutorial, without outputs, with three differences: a header cell, a
``course.STRICT = True`` cell after the setup cell (every check raises unless the answer is right), and each
exercise cell (tag ``exercise``, metadata ``"exercise": N``) replaced by the cell of the same number in the
current solution notebook. Edit a tutorial, run this, and only the answers need writing by hand.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell

NOTEBOOKS = Path(__file__).resolve().parents[1]
SOLUTIONS = NOTEBOOKS / "solutions"
STRICT_SOURCE = ("import course\n\ncourse.STRICT = True  # solution notebook: every check below raises unless the "
                 "answer is right")


def tutorials() -> list[Path]:
    return sorted(p for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb") if exercise_numbers(nbformat.read(p, 4)))


def exercise_numbers(notebook) -> list[int]:
    return [c.metadata["exercise"] for c in notebook.cells if "exercise" in c.metadata.get("tags", [])]


def header(name: str):
    cell = new_markdown_cell(
        f"*Worked solutions for `{name}.ipynb`: the same notebook with every exercise answered. Its check "
        "cells raise unless the answer is right; CI runs it. Regenerate after editing the tutorial with "
        "`python solutions/sync.py` (keeps these answers).*")
    cell.metadata["tags"] = ["solutions-header"]
    return cell


def build(tutorial: Path, answers: dict[int, str]):
    """The solution notebook for ``tutorial`` with ``answers`` (exercise number -> source)."""
    notebook = nbformat.read(tutorial, as_version=4)
    cells = [header(tutorial.stem)]
    for cell in notebook.cells:
        cell = copy.deepcopy(cell)
        cell.pop("id", None)
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
            cell.metadata.pop("execution", None)
        tags = cell.metadata.get("tags", [])
        if "exercise" in tags and cell.metadata["exercise"] in answers:
            cell.source = answers[cell.metadata["exercise"]]
        cells.append(cell)
        if "setup" in tags:
            strict = new_code_cell(STRICT_SOURCE)
            strict.metadata["tags"] = ["strict"]
            strict.pop("id", None)
            cells.append(strict)
    notebook.cells = cells
    for number, cell in enumerate(notebook.cells):  # deterministic ids: rebuilding changes nothing
        cell["id"] = f"solution-{number:03d}"
    nbformat.validate(notebook)
    return notebook


def answers_of(solution: Path) -> dict[int, str]:
    if not solution.exists():
        return {}
    notebook = nbformat.read(solution, as_version=4)
    return {c.metadata["exercise"]: c.source for c in notebook.cells if "exercise" in c.metadata.get("tags", [])}


def comparable(notebook) -> list[tuple[str, str, list]]:
    return [(c.cell_type, c.source, sorted(c.metadata.get("tags", []))) for c in notebook.cells]


def sync(check: bool = False) -> list[str]:
    """Rewrite (or with ``check``, compare) every solution notebook; returns the problems found."""
    problems = []
    for tutorial in tutorials():
        solution = SOLUTIONS / tutorial.name
        answers = answers_of(solution)
        student = {c.metadata["exercise"]: c.source for c in nbformat.read(tutorial, 4).cells
                   if "exercise" in c.metadata.get("tags", [])}
        for number, source in student.items():
            if answers.get(number, source).strip() == source.strip():
                problems.append(f"{solution.name}: exercise {number} has no worked answer")
        built = build(tutorial, answers)
        if check:
            current = nbformat.read(solution, 4) if solution.exists() else None
            if current is None or comparable(current) != comparable(built):
                problems.append(f"{solution.name}: out of date with {tutorial.name} (run solutions/sync.py)")
        else:
            nbformat.write(built, solution)
    return problems


if __name__ == "__main__":
    found = sync(check="--check" in sys.argv)
    print("\n".join(found) or "solution notebooks in sync")
    sys.exit(1 if found else 0)
