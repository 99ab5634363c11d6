"""Every runnable (``>>>``) example in the docstrings of sparse_ft and theory runs, in CI.

An example that needs a model gets ``task_model`` (a tiny random-init BERT task model for CB) with
``BuildContext`` and ``make_method_config``; sketches that need data or a hub model are written without
prompts, so ``>>>`` always means "this runs"."""

import doctest
import importlib
import pkgutil
from pathlib import Path

import pytest

import sparse_ft
import theory
from sparse_ft.methods import BuildContext, make_method_config
from tests.conftest import tiny_task_model


def modules_with_examples() -> list[str]:
    names = []
    for package in (sparse_ft, theory):
        for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            source = Path(importlib.import_module(info.name).__file__).read_text()
            if ">>>" in source:
                names.append(info.name)
    return names


@pytest.mark.parametrize("name", modules_with_examples())
def test_docstring_examples_run(name):
    globs = {"task_model": tiny_task_model("cb"), "BuildContext": BuildContext,
             "make_method_config": make_method_config}
    result = doctest.testmod(importlib.import_module(name), extraglobs=globs,
                             optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
