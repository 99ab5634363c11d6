"""The files a run leaves behind, in one place: their names, how they are written and read.

``RUN_DIR/result.json`` (DESIGN §7: scores, sparsity report, everything needed to rebuild the run),
``RUN_DIR/model.safetensors`` (the tuned model at A(S), :mod:`sparse_ft.methods.saving`),
``RUN_DIR/analysis.json`` (the instruments at A(S), ``sparse-ft analyze``) and ``RUN_DIR/error.json``
(a failed sweep run). Every JSON file is strict (no NaN or Infinity: a vacuous bound is ``null`` with a
reason) and written atomically with mode 0644.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

RESULT_FILE = "result.json"
MODEL_FILE = "model.safetensors"
ANALYSIS_FILE = "analysis.json"  # the tunable subspace's; the full space's is analysis_file("full")
ERROR_FILE = "error.json"


def strict_json(value):
    """``value`` with every non-finite float (a vacuous bound's inf, an undefined mean's nan) turned into
    None, so that the file is strict JSON; the reason stands in a field beside it."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def write_json_atomic(path: Path, payload: dict) -> None:
    """Write JSON so that a reader never sees a half-written file (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump(strict_json(payload), handle, indent=2, allow_nan=False)
    os.chmod(tmp, 0o644)  # mkstemp makes it 0600; results are for others to read
    os.replace(tmp, path)


def load_results(root: str | Path) -> tuple[list[dict], list[str]]:
    """Every readable result.json under ``root``, and one line per corrupt one (never averaged)."""
    results, problems = [], []
    for path in sorted(Path(root).rglob(RESULT_FILE)):
        try:
            result = json.loads(path.read_text())
            result["score"]["test"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            problems.append(f"{path}: unreadable result ({type(exc).__name__}), skipped")
            continue
        result["_path"] = str(path)
        results.append(result)
    return results, problems


def analysis_file(space: str) -> str:
    """``analysis.json`` for the tunable subspace, ``analysis.full.json`` for the full space: a run keeps both."""
    return ANALYSIS_FILE if space == "subspace" else f"analysis.{space}.json"


def load_analyses(root: str | Path) -> list[dict]:
    """Every readable analysis file under ``root`` (``sparse-ft analyze``, any space), each with its ``_path``."""
    analyses = []
    for path in sorted(Path(root).rglob("analysis*.json")):
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError:
            continue
        record["_path"] = str(path)
        analyses.append(record)
    return analyses


def summary_line(result: dict) -> str:
    rep = result["sparsity_report"]
    return (f"{result['task']} {result['method']} seed {result['seed']}: val {result['score']['val']:.2f} "
            f"test {result['score']['test']:.2f} (major metric x100 on {result['data']['test']} test examples) | "
            f"changed {rep['changed']:,}/{rep['backbone_params']:,} = {rep['realized']:.4%} | "
            f"{result['steps']} steps, train {result['train_seconds']:.1f}s, wall {result['wall_seconds']:.1f}s, "
            f"peak {result['peak_memory_mb']:.0f} MB")
