"""Every tutorial notebook in notebooks/ runs top to bottom in quick mode without an error.

Each notebook reads ``SPARSE_FT_QUICK=1`` at the top and shrinks its work (fewer examples, steps and
probes) to about a minute on two CPU cores. The kernel inherits this process's environment, so the
variables are set before it starts: ``SPARSE_FT_QUICK``, ``SPARSE_FT_DATA`` (the task folder, found as
tests/conftest.py finds it) and ``SPARSE_FT_THREADS=1`` unless already set (one intra-op thread: on a
2-core machine shared with other jobs, two threads per kernel oversubscribe the cores and made notebook
01 about 3x slower). The kernel is this interpreter (a ``python3`` kernelspec written to a temporary
JUPYTER_PATH, which takes precedence over user-level kernelspecs), so the notebooks see this
environment's sparse_ft.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import SHARED_DATA

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))
CELL_TIMEOUT = 600  # seconds per cell; quick mode needs far less


def test_the_tutorials_are_there():
    assert len(NOTEBOOKS) >= 7, f"expected the seven tutorials in {NOTEBOOKS_DIR}, found {NOTEBOOKS}"


@pytest.fixture
def quick_kernel_env(tmp_path, monkeypatch):
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


@pytest.mark.integration
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_quick_mode(path, quick_kernel_env):
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=CELL_TIMEOUT, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOKS_DIR)}})
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError, with the cell and its traceback, on any error
    errors = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
              if out.get("output_type") == "error"]
    assert not errors
    print(f"{path.name}: {time.perf_counter() - start:.0f} s in quick mode")
