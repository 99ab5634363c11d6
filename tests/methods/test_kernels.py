"""The CPU SDDMM kernel against the dense product, and the fallback when it cannot be built."""

import os

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
