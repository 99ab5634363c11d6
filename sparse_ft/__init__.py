"""sparse-ft: p-sparse parameter-efficient fine-tuning (Fu et al., AAAI 2023) on real transformers.

The public API, in peft's shape (``import sparse_ft as sft``): one config class per method,
:func:`get_sparse_model`, :class:`SparseModel` (``print_trainable_parameters``, ``save_pretrained``,
``from_pretrained``, ``merge_and_unload``), :class:`SparseCallback` for ``transformers.Trainer``, the
exports to transformers and peft folders, and :func:`load_run` for a saved ``sparse-ft train`` run.
Names are imported on first use, so ``import sparse_ft`` stays cheap (the CLI starts without torch).
See ``docs/api.md`` for each name's reference.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_SOURCES = {
    **{name: "sparse_ft.methods" for name in (
        "AdapterConfig", "BitFitConfig", "ChildPruningConfig", "DiffPruningConfig", "FullConfig", "LoRAConfig",
        "MagnitudeConfig", "MixoutConfig", "RandomConfig", "SamConfig", "MethodConfig", "SparsityReport",
        "METHODS")},
    "get_sparse_model": "sparse_ft.api",
    "SparseModel": "sparse_ft.api",
    "SparseCallback": "sparse_ft.api",
    "HFTaskModel": "sparse_ft.hf_model",
    "export_transformers": "sparse_ft.export",
    "export_peft": "sparse_ft.export",
    "load_run": "sparse_ft.experiments.saved",
    "resolve_model_path": "sparse_ft.models",
    "UserError": "sparse_ft.errors",
}

__all__ = [  # noqa: RUF022 - grouped as in _SOURCES
    "AdapterConfig", "BitFitConfig", "ChildPruningConfig", "DiffPruningConfig", "FullConfig", "LoRAConfig",
    "MagnitudeConfig", "MixoutConfig", "RandomConfig", "SamConfig", "MethodConfig", "SparsityReport", "METHODS", "get_sparse_model", "SparseModel", "SparseCallback", "HFTaskModel", "export_transformers",
    "export_peft", "load_run", "resolve_model_path", "UserError"]


def __getattr__(name: str):
    if name not in _SOURCES:
        raise AttributeError(f"module 'sparse_ft' has no attribute {name!r}")
    value = getattr(importlib.import_module(_SOURCES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
