"""The course material in notebooks/: structure, helpers, and every notebook executed in quick mode.

* Structure (no kernel): each tutorial opens with learning objectives and prerequisites, has at least two
  exercises each followed by its check cell, chooses the device in one cell and reads data through the
  settings cell; the solution notebooks are in sync with the tutorials (``solutions/sync.py --check``); the
  lecture deck has 15-20 slides and its HTML matches it; notebooks/README.md has a row per notebook.
* Helpers (``notebooks/course``), on the CPU: data lookup and its instructions, the exercise checks (lenient
  and strict), model and batches on the chosen device, the figure style and non-overlapping labels.
* Execution (integration): every tutorial runs top to bottom with its placeholders (each check prints "not
  answered yet"), and every solution notebook runs with ``course.STRICT = True`` and each check prints
  "correct". Quick mode: ``SPARSE_FT_QUICK=1`` swaps in a tiny random BERT (built once in the temp folder)
  and fewer steps, about 20 s a notebook on two cores. The kernel inherits this process's environment:
  ``SPARSE_FT_QUICK``, ``SPARSE_FT_DATA`` (found as tests/conftest.py finds it) and ``SPARSE_FT_THREADS=1``
  unless set (two threads per kernel oversubscribe a shared 2-core machine). The kernel is this interpreter
  (a ``python3`` kernelspec in a temporary JUPYTER_PATH), so the notebooks see this environment's packages.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import sys
import time
from html import escape
from pathlib import Path

import pytest

from tests.conftest import SHARED_DATA

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS_DIR = Path(__file__).resolve().parents[1] / "notebooks"
TUTORIALS = sorted(NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))
SOLUTIONS = sorted((NOTEBOOKS_DIR / "solutions").glob("[0-9][0-9]_*.ipynb"))
LECTURE = NOTEBOOKS_DIR / "lecture.ipynb"
DEVICE_LINE = 'DEVICE = "cuda" if torch.cuda.is_available() else "cpu"'
CELL_TIMEOUT = 600  # seconds per cell; quick mode needs far less

if str(NOTEBOOKS_DIR) not in sys.path:
    sys.path.insert(0, str(NOTEBOOKS_DIR))
import course


def read(path: Path):
    return nbformat.read(path, as_version=4)


def tags(cell) -> list[str]:
    return cell.metadata.get("tags", [])


def code_cells(notebook):
    return [c for c in notebook.cells if c.cell_type == "code"]


# ------------------------------------------------------------------------------------------- structure


def test_the_tutorials_and_their_solutions_are_there():
    names = [p.name for p in TUTORIALS]
    assert len(TUTORIALS) >= 8 and any("proofs" in n for n in names), names
    assert [p.name for p in SOLUTIONS] == names


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.stem)
def test_a_tutorial_opens_with_objectives_and_prerequisites(path):
    first = read(path).cells[0]
    assert first.cell_type == "markdown"
    assert "**Learning objectives.**" in first.source and "**Prerequisites.**" in first.source
    objectives = first.source.split("**Learning objectives.**")[1].split("**Prerequisites.**")[0]
    assert len(re.findall(r"^\d\. ", objectives, flags=re.MULTILINE)) >= 2, "number the objectives"


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.stem)
def test_a_tutorial_has_exercises_each_followed_by_its_check(path):
    cells = read(path).cells
    exercises = [i for i, c in enumerate(cells) if "exercise" in tags(c)]
    assert len(exercises) >= 2, f"{path.name}: {len(exercises)} exercise(s)"
    numbers = [cells[i].metadata["exercise"] for i in exercises]
    assert numbers == list(range(1, len(numbers) + 1))
    for i in exercises:
        cell, following = cells[i], cells[i + 1]
        assert re.search(r"^\w+ = None  # TODO", cell.source, flags=re.MULTILINE), cell.source
        assert "check" in tags(following) and following.metadata["exercise"] == cell.metadata["exercise"]
        assert f"check_exercise_{cell.metadata['exercise']}(" in following.source
        heading = "".join(c.source for c in cells[max(0, i - 2):i] if c.cell_type == "markdown")
        assert f"Exercise {cell.metadata['exercise']}" in heading, f"{path.name}: exercise without its statement"


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.stem)
def test_a_tutorial_sets_data_and_device_in_its_first_cells(path):
    notebook = read(path)
    code = code_cells(notebook)
    assert "setup" in tags(code[0]) and "DATA_DIR = None" in code[0].source and "course.setup(" in code[0].source
    assert DEVICE_LINE in code[1].source
    assert sum(DEVICE_LINE in c.source for c in code) == 1
    rest = "\n".join(c.source for c in code[2:])
    assert not re.search(r"^DEVICE\s*=", rest, flags=re.MULTILINE), "the device is chosen in one cell"
    for forbidden in ("FileNotFoundError", "shared/data", '"cpu")', "find_shared_data"):
        assert forbidden not in rest, f"{path.name}: {forbidden!r} outside the settings cells"


def test_the_solution_notebooks_are_in_sync_and_answered():
    spec = importlib.util.spec_from_file_location("solutions_sync", NOTEBOOKS_DIR / "solutions" / "sync.py")
    sync = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sync)
    assert sync.sync(check=True) == []
    for path in SOLUTIONS:
        notebook = read(path)
        assert any("strict" in tags(c) and "course.STRICT = True" in c.source for c in notebook.cells)
        assert all("# TODO" not in c.source for c in notebook.cells if "exercise" in tags(c))


def test_the_lecture_deck_tells_the_story_in_15_to_20_slides():
    deck = read(LECTURE)
    slides = [c for c in deck.cells if c.metadata.get("slideshow", {}).get("slide_type") == "slide"]
    assert 15 <= len(slides) <= 20
    for cell in deck.cells:
        for name in re.findall(r"attachment:([\w.]+)", cell.source):
            assert name in cell.get("attachments", {}), f"slide refers to a missing attachment {name}"
    assert sum("attachment:" in c.source for c in deck.cells) >= 4, "the toolkit's figures"
    html = (NOTEBOOKS_DIR / "lecture.slides.html").read_text()
    for slide in slides:
        title = slide.source.splitlines()[0].lstrip("# ").strip()
        assert escape(title, quote=False) in html, f"lecture.slides.html lacks the slide {title!r}: rebuild it"
    assert html.count("data:image/png;base64") >= 4, "the figures are embedded in the HTML"
    readme = (NOTEBOOKS_DIR / "README.md").read_text()
    assert "nbconvert --to slides lecture.ipynb" in readme


def test_the_readme_has_a_row_per_notebook():
    readme = (NOTEBOOKS_DIR / "README.md").read_text()
    for path in TUTORIALS:
        assert re.search(rf"^\| `{path.stem}`", readme, flags=re.MULTILINE), f"no row for {path.stem}"


# ---------------------------------------------------------------------------------------- course helpers


def test_find_data_takes_the_settings_cell_then_the_environment(tmp_path, monkeypatch):
    (tmp_path / "cb").mkdir()
    (tmp_path / "cb" / "train.jsonl").write_text("{}\n")
    monkeypatch.setenv("SPARSE_FT_DATA", "/nonexistent")
    assert course.find_data(tmp_path, ["cb"]) == tmp_path.resolve()
    monkeypatch.setenv("SPARSE_FT_DATA", str(tmp_path))
    assert course.find_data(None, ["cb"]) == tmp_path.resolve()


def test_missing_data_stops_with_the_command_that_fetches_it(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSE_FT_DATA", str(tmp_path / "empty"))
    with pytest.raises(course.DataNotFound) as caught:
        course.find_data(None, ["cb", "rte"])
    message = str(caught.value)
    assert "sparse-ft fetch-data cb --output" in message and "sparse-ft fetch-data rte --output" in message
    assert "DATA_DIR" in message and "SPARSE_FT_DATA" in message
    shown = caught.value._render_traceback_()  # what Jupyter prints instead of a traceback
    assert shown[0].startswith("DataNotFound") and not any("Traceback" in line for line in shown)
    assert not isinstance(caught.value, FileNotFoundError)


def test_checks_say_unanswered_wrong_or_correct(capsys, monkeypatch):
    monkeypatch.setattr(course, "STRICT", False)
    course.check_number(1, None, 2.0)
    course.check_number(1, 3.0, 2.0, hint="look again")
    course.check_number(1, 2.0000001, 2.0)
    course.check_number(1, "two", 2.0)
    course.check_number(1, math.inf, math.inf)
    course.check_equal(2, {"b", "a"}, {"a", "b"})
    course.check_function(3, lambda x: 1 / 0, [((1,), 1)])
    course.check_function(3, lambda x: None, [((1,), 1)])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("Exercise 1: not answered yet")
    assert out[1] == "Exercise 1: not yet: your answer = 3 is too high. Hint: look again"
    assert out[2] == "Exercise 1: correct"
    assert out[3].startswith("Exercise 1: not yet: expected a number")
    assert out[4] == "Exercise 1: correct"
    assert out[5] == "Exercise 2: correct"
    assert out[6].startswith("Exercise 3: not yet: your function raised ZeroDivisionError")
    assert out[7].startswith("Exercise 3: not answered yet")


def test_strict_checks_raise_unless_correct(monkeypatch, capsys):
    monkeypatch.setattr(course, "STRICT", True)
    course.check_number(1, 2.0, 2.0)
    for answer in (None, 3.0):
        with pytest.raises(course.ExerciseFailed):
            course.check_number(1, answer, 2.0)
    assert "correct" in capsys.readouterr().out


def test_a_check_returns_nothing_so_a_check_cell_shows_no_output_value(monkeypatch):
    monkeypatch.setattr(course, "STRICT", False)
    assert course.check_number(1, 2.0, 2.0) is None


def test_the_style_is_readable_on_a_projector():
    import matplotlib

    course.style()
    params = matplotlib.rcParams
    assert params["figure.dpi"] >= 120 and params["savefig.dpi"] >= 120
    for key in ("font.size", "axes.labelsize", "xtick.labelsize", "ytick.labelsize", "legend.fontsize"):
        size = params[key]
        assert not isinstance(size, str) and size >= 12, (key, size)
    assert params["axes.titlesize"] >= 12


def test_figure_2_labels_do_not_overlap():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from theory.ranks import analyze_ranks, load_paper_table

    table = SHARED_DATA.parent / "paper_table1.csv"
    if not table.is_file():
        pytest.skip(f"{table} not found")
    course.style()
    ax = course.plot_ranks(analyze_ranks(load_paper_table(table)))
    labels = [t for t in ax.texts]
    assert len(labels) == 10 and not course.labels_overlap(labels)
    assert ax.get_xlabel() and ax.get_ylabel()
    plt.close(ax.figure)


@pytest.fixture(scope="module")
def quick_model(tmp_path_factory) -> str:
    return course.quick_model(tmp_path_factory.mktemp("course") / "tiny-bert")


def small_spec(model: str):
    from sparse_ft.experiments.run import RunSpec

    return RunSpec(task="cb", method="sam", sparsity=0.01, model=model, data_dir=str(SHARED_DATA), seed=0,
                   train_limit=8, eval_limit=4, train_overrides={"max_steps": 1, "eval_every": 1, "batch_size": 4,
                                                                 "max_length": 32})


def check_on_device(model: str, device: str):
    import torch

    from sparse_ft.train import train

    run = course.prepare_on(small_spec(model), device)
    assert course.devices_of(run.model) == {torch.device(device).type}
    batch = next(iter(run.context.selection_batches()))
    assert batch["input_ids"].device.type == torch.device(device).type
    for method, sparsity in (("sam", 0.01), ("lora", None), ("full", None)):
        tuned = course.build_method(run, method, sparsity)
        assert course.devices_of(tuned) == {torch.device(device).type}, method
        train(tuned, run.loaders["train"], run.loaders["val"], run.config, run.device, seed=0, progress=False)
    tiny = course.tiny_task_model("cb", len(run.tokenizer), device)
    assert course.devices_of(tiny) == {torch.device(device).type}
    assert course.devices_of(run.model) == {torch.device(device).type}  # θ0 untouched, still there


def test_model_and_batches_share_the_chosen_device_cpu(quick_model, data_dir):
    check_on_device(quick_model, "cpu")


@pytest.mark.gpu
def test_model_and_batches_share_the_chosen_device_cuda(quick_model, data_dir):
    check_on_device(quick_model, "cuda")


# ----------------------------------------------------------------------------------------------- execution


@pytest.fixture
def kernel_env(tmp_path, monkeypatch):
    """A python3 kernelspec for this interpreter, quick mode, the task data, one thread."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"task data not found at {SHARED_DATA}: set SPARSE_FT_DATA")
    spec_dir = tmp_path / "jupyter" / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (sparse-ft tests)", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("SPARSE_FT_QUICK", "1")
    monkeypatch.setenv("SPARSE_FT_DATA", str(SHARED_DATA))
    monkeypatch.setenv("SPARSE_FT_THREADS", os.environ.get("SPARSE_FT_THREADS", "1"))
    monkeypatch.delenv("SPARSE_FT_STRICT_CHECKS", raising=False)


def execute(path: Path):
    notebook = read(path)
    client = nbclient.NotebookClient(notebook, timeout=CELL_TIMEOUT, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError, with the cell and its traceback, on any error
    print(f"{path.relative_to(NOTEBOOKS_DIR)}: {time.perf_counter() - start:.0f} s in quick mode")
    return notebook


def printed(cell) -> str:
    return "".join(out.get("text", "") for out in cell.get("outputs", []) if out.get("output_type") == "stream")


@pytest.mark.integration
@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.stem)
def test_a_tutorial_runs_in_quick_mode_with_its_placeholders(path, kernel_env):
    notebook = execute(path)
    assert not [o for c in code_cells(notebook) for o in c.get("outputs", []) if o.get("output_type") == "error"]
    for cell in notebook.cells:
        if "check" in tags(cell):
            assert f"Exercise {cell.metadata['exercise']}: not answered yet" in printed(cell)


@pytest.mark.integration
@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.stem)
def test_a_solution_notebook_passes_its_own_checks(path, kernel_env):
    notebook = execute(path)  # strict: a wrong answer raises ExerciseFailed in its check cell
    for cell in notebook.cells:
        if "check" in tags(cell):
            assert f"Exercise {cell.metadata['exercise']}: correct" in printed(cell)


@pytest.mark.integration
def test_without_data_a_notebook_stops_at_its_first_cell_with_instructions(kernel_env, tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSE_FT_DATA", str(tmp_path / "no-data-here"))
    notebook = read(TUTORIALS[0])
    for cell in code_cells(notebook):  # the stored outputs of the normal run
        cell.outputs = []
    client = nbclient.NotebookClient(notebook, timeout=CELL_TIMEOUT, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOKS_DIR)}})
    with pytest.raises(nbclient.exceptions.CellExecutionError) as caught:
        client.execute()
    assert caught.value.ename == "DataNotFound"
    setup = code_cells(notebook)[0]
    error = next(o for o in setup.outputs if o.output_type == "error")
    shown = "\n".join(error.traceback)
    assert "sparse-ft fetch-data cb --output" in shown and "Traceback" not in shown
    assert all(not c.get("outputs") for c in code_cells(notebook)[1:]), "nothing after the settings cell ran"
