"""Hand-written CPU kernels, compiled on first use by ``torch.utils.cpp_extension`` and cached.

Only what no library provides lives here: :func:`sddmm_tokens`, the k entries Σ_t gy[t, r_j]·x[t, c_j]
of a Linear weight's gradient read straight from the token-major gy and x (``torch.sparse.sampled_addmm``
needs both transposed first, and the transposes dominate; see ``sddmm_tokens.cpp``). Building needs a
C++ compiler and ``ninja`` (a dependency); where the build fails, or ``SPARSE_FT_NO_KERNELS=1`` is set,
:func:`load_sddmm` returns None once with a warning and callers fall back to ``sampled_addmm``.
"""

from __future__ import annotations

import functools
import os
import subprocess
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("sddmm_tokens.cpp")
DISABLE_ENV = "SPARSE_FT_NO_KERNELS"


@functools.cache
def load_sddmm():
    """The compiled extension module (``.sddmm_tokens(gy, x, rows, cols)``), or None."""
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        return None
    from torch.utils.cpp_extension import load

    try:
        return load(name="sparse_ft_sddmm_tokens", sources=[str(SOURCE)], extra_cflags=["-O3", "-fopenmp"],
                    extra_ldflags=["-fopenmp"], verbose=False)
    except (RuntimeError, OSError, ImportError, subprocess.SubprocessError) as exc:  # no compiler, no ninja, ...
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        warnings.warn(f"sparse-ft: the CPU SDDMM kernel could not be built ({reason}); using "
                      "torch.sparse.sampled_addmm instead (slower)", RuntimeWarning, stacklevel=2)
        return None


def sddmm_tokens(gy: torch.Tensor, x: torch.Tensor, crow: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Σ_t gy[t, r_j]·x[t, cols[j]] for every entry j of the CSR pattern (``crow``, ``cols``) of an O × I
    matrix, in the pattern's order: gy (T, O), x (T, I) float32 on CPU; needs :func:`load_sddmm`."""
    return load_sddmm().sddmm_tokens(gy.contiguous(), x.contiguous(), crow, cols)
