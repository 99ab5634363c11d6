"""Hand-written CPU kernels, compiled on first use by ``torch.utils.cpp_extension`` and cached per environment.

Only what no library provides lives here: :func:`sddmm_tokens`, the k entries Σ_t gy[t, r_j]·x[t, c_j]
of a Linear weight's gradient read straight from the token-major gy and x (``torch.sparse.sampled_addmm``
needs both transposed first, and the transposes dominate; see ``sddmm_tokens.cpp``). Building needs a
C++ compiler and ``ninja`` (a dependency); where the build fails, or ``SPARSE_FT_NO_KERNELS=1`` is set,
:func:`load_sddmm` returns None once with a warning and callers fall back to ``sampled_addmm``.

The build is cached under PyTorch's extension root (``$TORCH_EXTENSIONS_DIR``, else
``~/.cache/torch_extensions``), in ``sparse_ft/<name>-<key>``, where the key (:func:`build_key`) hashes
the interpreter, the torch build and the C++ source. Virtual environments that share a home directory
therefore each keep their own build instead of rebuilding over one another's (torch's default folder is
keyed by Python version and CUDA only, so alternating venvs with different torch builds recompiled it
every time). A build prints one line to stderr; a cached one is loaded silently.
"""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess
import sys
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("sddmm_tokens.cpp")
DISABLE_ENV = "SPARSE_FT_NO_KERNELS"
NAME = "sparse_ft_sddmm_tokens"  # the Python module's name (TORCH_EXTENSION_NAME in the source)
CFLAGS = ("-O3", "-fopenmp")
LDFLAGS = ("-fopenmp",)


def build_key(executable: str | None = None, prefix: str | None = None, python: str | None = None,
              torch_version: str | None = None, torch_git: str | None = None, torch_cuda: str | None = None,
              source: bytes | None = None, flags: tuple[str, ...] = CFLAGS + LDFLAGS) -> str:
    """A short hex key naming one environment's build of the kernel; each argument defaults to this process.

    Built from the interpreter (``sys.executable``, ``sys.prefix``, ``sys.version``), the torch build
    (``torch.__version__``, ``torch.version.git_version``, ``torch.version.cuda``), the C++ source's bytes
    and the compiler flags: any change to one gives another key, so another build folder, and a build is
    never loaded into an environment it was not compiled for. A pure function of its arguments.

    >>> build_key(torch_version="2.13.0+cpu") != build_key(torch_version="2.12.0+cpu")
    True
    """
    parts = [
        sys.executable if executable is None else executable,
        sys.prefix if prefix is None else prefix,
        sys.version if python is None else python,
        torch.__version__ if torch_version is None else torch_version,
        str(torch.version.git_version if torch_git is None else torch_git),
        str(torch.version.cuda if torch_cuda is None else torch_cuda),
        hashlib.sha256(SOURCE.read_bytes() if source is None else source).hexdigest(),
        " ".join(flags),
    ]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def build_directory(key: str | None = None) -> Path:
    """The folder that holds (or will hold) this environment's build: ``<extension root>/sparse_ft/<name>-<key>``.

    The root is ``$TORCH_EXTENSIONS_DIR`` when set, else torch's per-user default (``~/.cache/torch_extensions``);
    the folder is not created here.
    """
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    return Path(root) / "sparse_ft" / f"{NAME}-{build_key() if key is None else key}"


@functools.cache
def load_sddmm():
    """The compiled extension module (``.sddmm_tokens(gy, x, rows, cols)``), or None.

    Loads this environment's cached build, or builds it first (seconds to minutes; announced on stderr).
    Returns None when ``SPARSE_FT_NO_KERNELS`` is set, or, with a RuntimeWarning naming the reason, when
    the build fails (no compiler, no ninja, an unwritable cache folder).
    """
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        return None
    from torch.utils.cpp_extension import LIB_EXT, load

    try:
        folder = build_directory()
        if not (folder / f"{NAME}{LIB_EXT}").is_file():
            from tqdm.auto import tqdm

            tqdm.write("sparse-ft: building the CPU kernel (once per environment) ...", file=sys.stderr)  # above any bar
        folder.mkdir(parents=True, exist_ok=True)
        return load(name=NAME, sources=[str(SOURCE)], extra_cflags=list(CFLAGS), extra_ldflags=list(LDFLAGS),
                    build_directory=str(folder), verbose=False)
    except (RuntimeError, OSError, ImportError, subprocess.SubprocessError) as exc:  # no compiler, no ninja, ...
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        warnings.warn(f"sparse-ft: the CPU SDDMM kernel could not be built ({reason}); using "
                      "torch.sparse.sampled_addmm instead (slower)", RuntimeWarning, stacklevel=2)
        return None


def sddmm_tokens(gy: torch.Tensor, x: torch.Tensor, crow: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Σ_t gy[t, r_j]·x[t, cols[j]] for every entry j of the CSR pattern (``crow``, ``cols``) of an O × I
    matrix, in the pattern's order: gy (T, O), x (T, I) float32 on CPU; needs :func:`load_sddmm`."""
    return load_sddmm().sddmm_tokens(gy.contiguous(), x.contiguous(), crow, cols)
