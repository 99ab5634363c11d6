"""A finished run, read back: its result, its tuned model at A(S), and its scores recomputed.

A run folder holds ``result.json`` (with the run's full :class:`~sparse_ft.experiments.run.RunSpec` and
its resolved data folder) and ``model.safetensors`` (:mod:`sparse_ft.methods.saving`). Everything here
refuses a folder it cannot use with one :class:`~sparse_ft.errors.UserError` line.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from ..errors import UserError, check_choice
from ..methods import TunedModel
from ..methods.saving import load_tuned
from ..models import build_task_model
from ..tasks import get_task
from .results import MODEL_FILE, RESULT_FILE
from .run import PreparedRun, RunSpec, final_metrics, prepare, resolve_device


def read_result(run_dir: str | Path) -> dict:
    """``run_dir/result.json``; refuses a folder without one, a corrupt one, or one made before runs
    recorded their spec."""
    path = Path(run_dir) / RESULT_FILE
    if not path.is_file():
        raise UserError(f"{run_dir}: no {RESULT_FILE} here (not a finished sparse-ft run)")
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: corrupt JSON (line {exc.lineno})") from None
    if "spec" not in result:
        raise UserError(f"{path}: made by an older sparse-ft that did not record the run's spec; rerun it")
    return result


def run_spec(result: dict, data_dir: str | None = None, device: str | None = None) -> RunSpec:
    """The spec a result was made with; ``data_dir`` and ``device`` replace the recorded ones."""
    fields = dict(result["spec"])
    fields["data_dir"] = data_dir or result.get("data_dir") or fields.get("data_dir")
    if device is not None:
        fields["device"] = device
    return RunSpec(**{f.name: fields[f.name] for f in dataclasses.fields(RunSpec) if f.name in fields})


def model_file(run_dir: str | Path) -> Path:
    path = Path(run_dir) / MODEL_FILE
    if not path.is_file():
        raise UserError(f"{run_dir}: no {MODEL_FILE} (the run was made before runs saved their model, or with "
                        "--no-save-model); rerun it to measure or evaluate it")
    return path


def load_run(run_dir: str | Path, device: str | torch.device = "cpu") -> TunedModel:
    """The tuned model at A(S) of a saved run, on its base model, on ``device`` (a run trained on CUDA
    loads on a CPU), in eval mode. Raises :class:`UserError` for a missing or corrupt file or a file for
    another base model than the run's."""
    result = read_result(run_dir)
    spec = run_spec(result)
    path = model_file(run_dir)
    model = build_task_model(get_task(spec.task), spec.model, head_seed=spec.seeds()["head"])
    return load_tuned(path, model).to(device).eval()


def prepare_saved_run(run_dir: str | Path, data_dir: str | None = None,
                      device: str = "auto", exclude=frozenset()) -> tuple[PreparedRun, TunedModel, dict]:
    """The run's data and loaders (as it was trained and scored, or on ``data_dir``) with its tuned model
    at A(S) loaded onto the prepared base model; also returns the result."""
    result = read_result(run_dir)
    spec = run_spec(result, data_dir, device)
    path = model_file(run_dir)
    run = prepare(spec, exclude)
    tuned = load_tuned(path, run.model).to(resolve_device(spec.device)).eval()
    return run, tuned, result


def evaluate_run(run_dir: str | Path, split: str = "test", data_dir: str | None = None,
                 device: str = "auto") -> dict:
    """Score a saved run on ``split`` (val or test), its evaluation function fixed as when it was scored.

    Returns ``{"run", "split", "point": "A(S)", "metrics", "score"}`` with ``score`` the major metric ×100;
    on the run's own data it equals ``result.json``'s score for that split."""
    check_choice("--split", split, ("val", "test"))
    run, tuned, result = prepare_saved_run(run_dir, data_dir, device)
    metrics, _ = final_metrics(tuned, run, splits=(split,))
    return {"run": str(run_dir), "task": result["task"], "method": result["method"], "split": split,
            "point": "A(S)", "examples": len(run.features[split]), "metrics": metrics[split],
            "score": metrics[split]["major"]}
