"""One file format for every method's tuned model: safetensors tensors plus JSON metadata.

A saved tuned model holds what trained and nothing derivable: the state the trainer checkpoints
(:meth:`~sparse_ft.methods.base.TunedModel.checkpoint_state`: trainable tensors and persistent buffers,
so a mask method's index sets and values, LoRA's or an adapter's weights, the changed backbone of full
fine-tuning and Mixout, and always the absolute task head), with the method config, θ0's fingerprint and
the budget in the metadata. Loading rebuilds the method's structure on a fresh base model at θ0
(:meth:`~sparse_ft.methods.base.MethodConfig.rebuild`, no data needed) and loads that state, so a p-sparse
run's file is about k values + k indices + the head. A file for another base model is refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..errors import UserError
from ..models import TaskModel
from .base import MethodConfig, TunedModel, backbone_fingerprint, config_from_dict

FORMAT = "sparse-ft/tuned-model/1"


def save_tuned(tuned: TunedModel, path: str | Path, *, weights: bool = True, metadata: dict | None = None) -> None:
    """Write ``tuned`` to ``path`` (safetensors, mode 0644, atomically).

    ``weights=False`` keeps only the persistent buffers (a mask method's index sets: a *mask file*);
    ``metadata`` adds string-valued entries (the base model's id, say)."""
    state = tuned.checkpoint_state()
    if not weights:
        trainable = {n for n, p in tuned.named_parameters() if p.requires_grad}
        state = {k: v for k, v in state.items() if k not in trainable}
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    report = tuned.sparsity_report()
    meta = {"format": FORMAT, "method": json.dumps(tuned.config.to_dict()), "fingerprint": tuned.fingerprint,
            "budget": str(report.budget), "backbone_params": str(report.backbone_params),
            "weights": str(weights).lower(), **{k: str(v) for k, v in (metadata or {}).items()}}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def read_tuned(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and metadata of a saved tuned model; one :class:`UserError` line for a missing,
    unreadable or foreign file."""
    path = str(path)
    if not os.path.exists(path):
        raise UserError(f"{path!r} does not exist")
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(path)
    except Exception as exc:  # noqa: BLE001 - a corrupt file is one clear line
        raise UserError(f"{path!r} is not a readable safetensors file ({type(exc).__name__}: corrupt or "
                        "truncated?)") from None
    if "method" not in metadata or "fingerprint" not in metadata:
        raise UserError(f"{path!r} is not a sparse-ft tuned model or mask (no method or fingerprint in its metadata)")
    return tensors, metadata


def check_base(path: str | Path, metadata: dict, model: TaskModel) -> None:
    """Refuse a file made for another base model than ``model`` (at θ0)."""
    expected, actual = metadata.get("fingerprint"), backbone_fingerprint(model.backbone)
    if expected != actual:
        base = f" ({metadata['base_model']})" if metadata.get("base_model") else ""
        raise UserError(f"{str(path)!r} was made for another base model{base}: "
                        f"fingerprint {expected}, this one {actual}")


def saved_config(metadata: dict) -> MethodConfig:
    """The method config a file was saved with."""
    return config_from_dict(json.loads(metadata["method"]))


def load_tuned(path: str | Path, model: TaskModel) -> TunedModel:
    """Rebuild a saved tuned model on ``model``, a fresh task model of the same base at θ0 (its head is
    overwritten by the saved one). Raises :class:`UserError` for a missing or corrupt file, a file of
    another base model, or a mask file without values."""
    state, metadata = read_tuned(path)
    if metadata.get("weights") == "false":
        raise UserError(f"{str(path)!r} is a mask file (index sets only); train on it with --mask")
    check_base(path, metadata, model)
    tuned = saved_config(metadata).rebuild(model, state, metadata)
    absent = set(tuned.checkpoint_state()) - set(state)
    if absent:
        raise UserError(f"{str(path)!r} lacks tensors this {tuned.config.name} model trains: {sorted(absent)[:3]}")
    tuned.load_checkpoint_state(state)
    return tuned
