"""The CPU SDDMM kernel against the dense product, and the fallback when it cannot be built."""

import os
import sys
from pathlib import Path

import pytest
import torch

from sparse_ft import kernels
from sparse_ft.delta import SparseDelta, _linear_grad
from sparse_ft.errors import UserError


@pytest.mark.skipif(bool(os.environ.get(kernels.DISABLE_ENV)), reason="kernels switched off")
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("tokens, out_features, in_features", [(64, 24, 40), (83, 7, 130), (5, 16, 16)])
def test_kernel_equals_the_dense_product_at_the_entries(threads, tokens, out_features, in_features):
    generator = torch.Generator().manual_seed(tokens)
    gy = torch.randn(tokens, out_features, generator=generator)
    gy[tokens // 3:] = 0.0  # trailing padding: zero output gradient, whole token blocks skipped
    x = torch.randn(tokens, in_features, generator=generator)
    flat = torch.randperm(out_features * in_features, generator=generator)[: out_features * in_features // 5]
    flat = flat.sort().values
    rows, cols = flat // in_features, flat % in_features
    crow = torch.zeros(out_features + 1, dtype=torch.long)
    crow[1:] = torch.bincount(rows, minlength=out_features).cumsum(0)
    assert kernels.load_sddmm() is not None, "the SDDMM kernel did not build (a C++ compiler and ninja are needed)"
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = kernels.sddmm_tokens(gy, x, crow, cols)
    finally:
        torch.set_num_threads(before)
    expected = (gy.double().t() @ x.double())[rows, cols].float()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_without_the_kernel_auto_falls_back_and_kernel_is_refused(monkeypatch):
    monkeypatch.setattr("sparse_ft.delta.load_sddmm", lambda: None)
    monkeypatch.setattr(SparseDelta, "linear_grad", "auto")
    assert _linear_grad(torch.device("cpu")) == "sampled"
    monkeypatch.setattr(SparseDelta, "linear_grad", "kernel")
    with pytest.raises(UserError, match="could not be built"):
        _linear_grad(torch.device("cpu"))


def test_the_kernel_can_be_switched_off(monkeypatch):
    monkeypatch.setenv(kernels.DISABLE_ENV, "1")
    kernels.load_sddmm.cache_clear()
    try:
        assert kernels.load_sddmm() is None
    finally:
        monkeypatch.delenv(kernels.DISABLE_ENV)
        kernels.load_sddmm.cache_clear()


def test_the_build_key_changes_with_the_interpreter_the_torch_build_and_the_source():
    base = {"executable": "/a/.venv/bin/python", "prefix": "/a/.venv", "python": "3.12.3", "torch_version": "2.13.0+cpu",
            "torch_git": "cf30153", "torch_cuda": None, "source": b"int f();"}
    key = kernels.build_key(**base)
    assert key == kernels.build_key(**base)  # a pure function: the same environment, the same build
    for field, other in [("executable", "/b/.venv/bin/python"), ("prefix", "/b/.venv"), ("python", "3.11.9"),
                         ("torch_version", "2.12.0+cpu"), ("torch_git", "0123abc"), ("torch_cuda", "12.8"),
                         ("source", b"int g();")]:
        assert kernels.build_key(**{**base, field: other}) != key, field
    assert kernels.build_key() == kernels.build_key(sys.executable, sys.prefix, sys.version, torch.__version__)


def test_the_build_directory_is_named_by_the_key_under_the_extension_root(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    folder = kernels.build_directory()
    assert folder.parent == tmp_path / "sparse_ft" and kernels.build_key() in folder.name
    assert kernels.build_directory("abc").name.endswith("-abc")


def test_a_build_is_announced_once_and_a_cached_build_loads_silently(monkeypatch, tmp_path, capfd):
    from torch.utils import cpp_extension

    calls = []

    def fake_load(name, sources, build_directory, **kwargs):  # stands in for the compiler: writes the library
        calls.append(build_directory)
        Path(build_directory, f"{name}{cpp_extension.LIB_EXT}").write_bytes(b"")
        return object()

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.delenv(kernels.DISABLE_ENV, raising=False)
    monkeypatch.setattr(cpp_extension, "load", fake_load)
    try:
        for _ in range(2):
            kernels.load_sddmm.cache_clear()
            assert kernels.load_sddmm() is not None
    finally:
        kernels.load_sddmm.cache_clear()
    assert calls == [str(kernels.build_directory())] * 2
    assert capfd.readouterr().err.count("building the CPU kernel (once per environment)") == 1
