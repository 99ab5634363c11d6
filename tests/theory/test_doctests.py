"""The runnable (``>>>``) examples in theory's docstrings."""

import doctest

import pytest

import theory.hessian


@pytest.mark.parametrize("module", [theory.hessian], ids=lambda m: m.__name__)
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
