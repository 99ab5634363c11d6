"""The public API: every name documented, docs/api.md generated from the docstrings and current, and
``import sparse_ft`` cheap (names load on first use)."""

from __future__ import annotations

import importlib.util
import inspect
import subprocess
import sys
from pathlib import Path

import sparse_ft as sft

ROOT = Path(__file__).resolve().parents[2]


def test_every_public_name_has_a_docstring():
    undocumented = [name for name in sft.__all__
                    if not isinstance(getattr(sft, name), dict) and not inspect.getdoc(getattr(sft, name))]
    assert not undocumented


def test_the_api_reference_is_generated_from_the_docstrings():
    spec = importlib.util.spec_from_file_location("api_docs", ROOT / "scripts" / "api_docs.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert (ROOT / "docs" / "api.md").read_text() == script.render(), "run .venv/bin/python scripts/api_docs.py"


def test_importing_the_package_loads_nothing_heavy():
    code = "import sys, sparse_ft; print('torch' in sys.modules, len(sparse_ft.__all__))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", str(len(sft.__all__))]
