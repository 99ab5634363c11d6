"""``sparse-ft analyze``: the theory's quantities measured where Theorems 1 and 2 speak, at A(S).

For a saved run (``result.json`` + ``model.safetensors``) this loads the tuned model at A(S) and measures,
on the run's own training set S (all n examples unless ``examples`` limits the Hessian's):

* λmax, λmin of the Hessian of the mean training loss, by Lanczos from several random starts
  (:func:`theory.lanczos.extreme_eigenvalues`: a bracket and a residual per extreme, and whether the
  starts agree), in one named ``space``: ``subspace`` (the tunable coordinates: a mask's k values, the
  added parameters of LoRA or an adapter, every backbone entry for full fine-tuning) or ``full`` (every
  coordinate of the merged backbone, m of them; Theorem 1's Λmin). By Cauchy interlacing the subspace's
  λmin is never below the full one, so a bound from the subspace is the optimistic one;
* ‖∇L̂(A(S))‖ in the same space: how stationary A(S) is;
* ρ̂, the largest per-example gradient norm over all n training examples, at A(S) and at θ0 (the run's
  start: the same structure with nothing trained, the initial head); the bounds use the larger and say so;
* R̂ (mean training loss) and R (mean test loss) at A(S), on the same mean-loss scale, and R − R̂;
* Theorems 1 and 2 (:mod:`theory.bounds`) with both assumption verdicts; Theorem 2's C is the largest
  per-example loss measured (cross-entropy is unbounded; the theorem needs a loss in [0, C]).

Every number is written to ``RUN_DIR/analysis.json`` (``analysis.full.json`` for the full space) with the point
("A(S)") and space it belongs to.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import torch

from theory.bounds import FLOAT32_EPS, generalization_bound_report, stability_bound_report
from theory.hessian import HessianOperator
from theory.lanczos import extreme_eigenvalues
from theory.lipschitz import per_sample_grad_norms

from ..errors import UserError, check_choice, check_range
from ..methods.saving import read_tuned, saved_config
from ..methods.scoring import eager_attention
from ..models import build_task_model, example_losses
from ..tasks import get_task
from ..train import to_device
from .measure import mean_loss, training_batches, tunable_coordinates
from .results import MODEL_FILE, RESULT_FILE, analysis_file, write_json_atomic
from .run import quiet_libraries
from .saved import prepare_saved_run
from .sweep import run_calls

SPACES = ("subspace", "full")
DELTA = 0.05  # Theorem 2's confidence: the bound holds with probability >= 1 - delta


@dataclasses.dataclass
class AnalyzeSettings:
    """How ``analyze`` measures: ``examples`` (None: all n) enter the Hessian, ``lanczos_steps`` Krylov
    steps from each of ``starts`` random starts, in ``space`` (subspace or full), on ``device``."""

    examples: int | None = None
    lanczos_steps: int = 30
    starts: int = 2
    space: str = "subspace"
    device: str = "auto"

    def validate(self) -> None:
        check_choice("--space", self.space, SPACES)
        if self.examples is not None:
            check_range("--examples", self.examples, 1)
        check_range("--lanczos-steps", self.lanczos_steps, 2)
        check_range("--starts", self.starts, 1)


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Run folders among ``paths``: each one that holds result.json, or every run under a sweep root."""
    runs = []
    for path in map(Path, paths):
        if (path / RESULT_FILE).is_file():
            runs.append(path)
        elif path.is_dir():
            runs.extend(sorted(p.parent for p in path.rglob(RESULT_FILE)))
        else:
            raise UserError(f"{path}: no such folder")
    if not runs:
        raise UserError(f"no finished runs (folders with {RESULT_FILE}) under {', '.join(map(str, paths))}")
    return runs


def space_of(tuned, space: str):
    """(module, parameter names) spanning ``space``: the tuned model's tunable coordinates, or a merged
    copy's whole backbone (m coordinates; an adapter's added ones with them)."""
    if space == "subspace":
        return tuned, tunable_coordinates(tuned)
    merged = tuned.merge_into_dense().eval()
    return merged, [f"backbone.{n}" for n, _ in merged.backbone.named_parameters()]


def per_example_losses(model, batches) -> torch.Tensor:
    """ℓ(A(S); z) for every example of ``batches`` (eval mode, mean-loss scale)."""
    with torch.no_grad():
        return torch.cat([example_losses(model.task, model(b), b["labels"]).double().cpu() for b in batches])


def measure_point(model, names: list[str], batches: list[dict], hessian_batches: list[dict],
                  settings: AnalyzeSettings, seed: int, progress: bool = False) -> dict:
    """Spectrum, gradient norm and ρ̂ of one model on ``names`` (already in eval mode); ``progress`` shows a
    bar over the Hessian-vector products, the bulk of the cost."""
    from tqdm.auto import tqdm

    with eager_attention(getattr(model, "model", model)):
        op = HessianOperator(model, mean_loss, hessian_batches, params=names, cache_graph=True)
        steps = min(settings.lanczos_steps, op.dim)
        with tqdm(total=steps * settings.starts, unit="HVP", leave=False, disable=not progress,
                  desc=f"Lanczos at A(S): {settings.starts} starts x {steps} steps, dim {op.dim:,}") as bar:
            extremes = extreme_eigenvalues(op, steps, starts=settings.starts, seed=seed,
                                           callback=lambda step: bar.update())
        op.clear_cache()
        grad_norm = float(op.gradient(batches).norm())  # over all n examples, not only the Hessian's
        rho = per_sample_grad_norms(model, mean_loss, batches, params=names, method="auto").rho
    return {"dim": op.dim, "extremes": extremes, "grad_norm": grad_norm, "rho": rho}


def analyze_run(run_dir: str | Path, settings: AnalyzeSettings, log=lambda msg: None, progress: bool = False) -> dict:
    """Measure one saved run at A(S) and write ``run_dir/analysis.json``; returns the record. ``progress``
    shows a bar over the Lanczos products."""
    start = time.perf_counter()
    run, tuned, result = prepare_saved_run(run_dir, device=settings.device)
    seed = run.spec.seeds()["mask"]
    batches = training_batches(run, None)
    hessian_batches = training_batches(run, settings.examples)
    n = len(run.features["train"])
    test = [to_device(b, run.device) for b in run.loaders["test"]]
    p = float(result["sparsity"])
    with tuned.frozen_evaluation(seed=seed) as draw:
        tuned.eval()
        model, names = space_of(tuned, settings.space)
        log(f"{run_dir}: Lanczos on {settings.space} ({sum(1 for _ in names)} tensors) at A(S)")
        at_s = measure_point(model, names, batches, hessian_batches, settings, seed, progress)
        train_losses, test_losses = per_example_losses(tuned, batches), per_example_losses(tuned, test)
    at_0 = rho_at_theta0(run_dir, run, settings, batches)
    rho = max(at_s["rho"], at_0)
    extremes = at_s["extremes"]
    train_risk, test_risk = float(train_losses.mean()), float(test_losses.mean())
    C = float(torch.cat([train_losses, test_losses]).max())
    assumptions = {"residual_min": extremes.residual_min, "lambda_max": extremes.lambda_max, "eps": FLOAT32_EPS}
    theorem1 = stability_bound_report(rho, extremes.lambda_min, p, n, **assumptions)
    theorem2 = generalization_bound_report(train_risk, rho, extremes.lambda_min, p, n, C, DELTA, **assumptions)
    record = {
        "point": "A(S)", "space": settings.space, "dim": at_s["dim"],
        "task": result["task"], "method": result["method"], "sparsity": p, "seed": result["seed"],
        "model": result["model"], "examples": sum(len(b["labels"]) for b in hessian_batches),
        "lambda_max": extremes.lambda_max, "lambda_min": extremes.lambda_min,
        "residual_max": extremes.residual_max, "residual_min": extremes.residual_min,
        "converged": extremes.converged, "starts_agree": extremes.agree, "hvps": extremes.num_matvecs,
        "lanczos": extremes.to_dict(), "grad_norm": at_s["grad_norm"],
        "rho": rho, "rho_points": {"A(S)": at_s["rho"], "theta0": at_0},
        "rho_note": "largest per-example gradient norm over all n training examples, the max over the "
                    "points measured (theta0 and A(S)), in the subspace's coordinates at theta0",
        "n_train": n, "train_risk": train_risk, "test_risk": test_risk, "n_test": len(test_losses),
        "generalization_gap": test_risk - train_risk, "loss_scale": "mean cross-entropy per example (eval mode)",
        "theorem1": theorem1.to_dict(), "theorem2": {**theorem2.to_dict(), "C": C, "delta": DELTA},
        "C_note": "the largest per-example loss measured at A(S) on train and test (the loss is unbounded)",
        "training_stop": result.get("stop"), "evaluation_draw": draw,
        "seconds": time.perf_counter() - start, "train_seconds": result.get("train_seconds"),
    }
    write_json_atomic(Path(run_dir) / analysis_file(settings.space), record)
    return record


def rho_at_theta0(run_dir, run, settings: AnalyzeSettings, batches: list[dict]) -> float:
    """ρ̂ at θ0 over the training set, in the tunable subspace (the run's structure with nothing trained)."""
    state, metadata = read_tuned(Path(run_dir) / MODEL_FILE)
    spec = run.spec
    fresh = build_task_model(get_task(spec.task), spec.model, head_seed=spec.seeds()["head"]).to(run.device)
    tuned0 = saved_config(metadata).rebuild(fresh, state, metadata).to(run.device).eval()
    with tuned0.frozen_evaluation(seed=spec.seeds()["mask"]):
        tuned0.eval()
        model, names = space_of(tuned0, "subspace")
        with eager_attention(tuned0.model):
            return per_sample_grad_norms(model, mean_loss, batches, params=names, method="auto").rho


def _analyze_into(run_dir: str, settings: AnalyzeSettings, threads: int | None = None, progress: bool = False) -> dict:
    """Analyse one run (in a worker, or in this process with ``progress``: a bar over its Lanczos products); a
    failure is recorded in the status, not raised (a sweep goes on)."""
    if threads:
        torch.set_num_threads(threads)
    quiet_libraries()
    try:
        record = analyze_run(run_dir, settings, progress=progress)
    except Exception as exc:  # noqa: BLE001 - a bad run is reported, the others are analysed
        return {"run": run_dir, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
    return {"run": run_dir, "ok": True, "seconds": record["seconds"]}


def analyze_runs(paths: list[str | Path], settings: AnalyzeSettings, jobs: int = 1, progress: bool = True,
                 redo: bool = False) -> dict:
    """``analyze`` over run folders or sweep roots: runs already analysed are skipped (unless ``redo``),
    ``jobs`` at a time, with a progress bar and ETA; returns counts and the failures, one line each."""
    from tqdm.auto import tqdm

    settings.validate()
    runs = find_runs(paths)
    todo = [r for r in runs if redo or not (r / analysis_file(settings.space)).is_file()]
    threads = max(1, (os.cpu_count() or 1) // max(1, jobs))
    bar = tqdm(total=len(todo), desc=f"analyze at A(S) ({len(runs) - len(todo)} already done)", unit="run",
               disable=not progress)
    inner = progress and jobs == 1  # workers' bars would interleave
    statuses = run_calls(_analyze_into, [(str(r), settings, threads if jobs > 1 else None, inner) for r in todo], jobs, bar)
    bar.close()
    failed = [s for s in statuses if not s["ok"]]
    return {"runs": len(runs), "skipped": len(runs) - len(todo), "done": len(statuses) - len(failed),
            "failed": [f"{s['run']}: {s['error']}" for s in failed]}
