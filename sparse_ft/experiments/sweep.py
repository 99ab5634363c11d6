"""Grids of (task, method, sparsity, seed) runs: resumable, parallel, and on Ray for clusters.

Each run lives in its own folder ``ROOT/<task>/<method>/p<sparsity>/seed<seed>/`` holding
``result.json`` (written atomically: a temp file renamed into place) or, when it failed,
``error.json`` with the error. Re-running the same sweep skips every folder that has a
``result.json``, so an interrupted sweep resumes and loses no finished run; a failure is recorded
and does not stop the others, and is retried on the next invocation.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError, check_range
from ..methods import get_method, make_method_config
from ..models import DEFAULT_MODEL
from ..tasks import get_task
from ..train import preset
from .results import ERROR_FILE, RESULT_FILE, write_json_atomic
from .run import RunSpec, execute, preflight, quiet_libraries

TRAIN_KEYS = ("max_steps", "lr", "batch_size", "eval_every", "max_length")
RUN_KEYS = ("model", "data_dir", "preset", "train_limit", "eval_limit", "device")
SWEEP_KEYS = ("tasks", "methods", "sparsities", "seeds", "options", "train_by_method", *RUN_KEYS, *TRAIN_KEYS)


@dataclass
class SweepSpec:
    """The grid: every task × method × sparsity × seed. A method that fixes its own sparsity (full,
    bitfit) runs once per seed whatever ``sparsities`` says; ``None`` in ``sparsities`` means the
    method's default."""

    tasks: list[str]
    methods: list[str]
    sparsities: list[float | None] = field(default_factory=lambda: [None])
    seeds: list[int] = field(default_factory=lambda: [0])
    options: dict[str, dict] = field(default_factory=dict)  # method -> its options
    run: dict = field(default_factory=dict)  # RunSpec fields shared by every run
    train: dict = field(default_factory=dict)  # TrainConfig overrides shared by every run
    train_by_method: dict[str, dict] = field(default_factory=dict)  # method -> overrides on top of ``train``

    def runs(self) -> list[RunSpec]:
        specs, seen = [], set()
        tasks = [get_task(t).ref for t in self.tasks]  # a task file by its absolute path: workers resolve it too
        for task, method, sparsity, seed in itertools.product(tasks, self.methods, self.sparsities, self.seeds):
            if not get_method(method).uses_sparsity:
                sparsity = None
            key = (task, method, sparsity, seed)
            if key in seen:
                continue
            seen.add(key)
            specs.append(RunSpec(task=task, method=method, sparsity=sparsity, seed=seed,
                                 method_options=dict(self.options.get(method, {})),
                                 train_overrides={**self.train, **self.train_by_method.get(method, {})},
                                 **self.run))
        return specs


    def contains(self, result: dict) -> bool:
        """Whether a stored result is one of this grid's runs (several grids may share a folder)."""
        method = result.get("method")
        names = {get_task(t).name for t in self.tasks}
        if method not in self.methods or result.get("task") not in names or result.get("seed") not in self.seeds:
            return False
        wanted = [p for p in self.sparsities if p is not None]
        return not (get_method(method).uses_sparsity and wanted) or any(
            abs(float(result["sparsity"]) - p) < 1e-12 for p in wanted)


def run_dir(root: Path, spec: RunSpec) -> Path:
    """``ROOT/<task name>/<method>/p<p>/seed<s>`` (a task file's ``name``, not its path)."""
    p = "default" if spec.sparsity is None else f"{spec.sparsity:g}"
    return Path(root) / get_task(spec.task).name / spec.method / f"p{p}" / f"seed{spec.seed}"


def _line_of(text: str, key: str) -> int | None:
    for lineno, line in enumerate(text.splitlines(), start=1):
        if re.match(rf"\s*(\[\s*)?{re.escape(key)}\b", line):
            return lineno
    return None


def load_sweep_file(path: str | Path) -> SweepSpec:
    """Read a TOML sweep file; every key, task, method and sparsity is checked before any run."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    path = Path(path)
    if not path.is_file():
        raise UserError(f"sweep file {str(path)!r} does not exist")
    text = path.read_text()
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: {exc}") from None
    for key in raw:
        if key not in SWEEP_KEYS:
            raise UserError(f"{path}:{_line_of(text, key)}: unknown key {key!r}; allowed: {', '.join(SWEEP_KEYS)}")
    sweep = SweepSpec(
        tasks=list(raw.get("tasks", [])), methods=list(raw.get("methods", [])),
        sparsities=list(raw.get("sparsities", [None])), seeds=list(raw.get("seeds", [0])),
        options=dict(raw.get("options", {})), train_by_method=dict(raw.get("train_by_method", {})),
        run={k: raw[k] for k in RUN_KEYS if k in raw}, train={k: raw[k] for k in TRAIN_KEYS if k in raw})
    try:
        validate(sweep)
    except SweepError as exc:
        line = _line_of(text, exc.key)
        raise UserError(f"{path}:{line}: {exc}" if line else f"{path}: {exc}") from None
    return sweep


class SweepError(UserError):
    """A bad sweep entry; ``key`` is the sweep-file key it came from."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


def validate(sweep: SweepSpec) -> None:
    """Reject an empty grid, an unknown task or method, or an invalid sparsity, before any run."""
    checks = [
        ("tasks", lambda: sweep.tasks or _fail("a sweep needs at least one task")),
        ("methods", lambda: sweep.methods or _fail("a sweep needs at least one method")),
        ("tasks", lambda: [get_task(t) for t in sweep.tasks]),
        ("methods", lambda: [get_method(m) for m in sweep.methods]),
        ("sparsities", lambda: [check_range("sparsity", p, 0.0, 1.0, low_open=True)
                                for p in sweep.sparsities if p is not None]),
        ("options", lambda: [make_method_config(m, None, **o) for m, o in sweep.options.items()]),
        ("preset", lambda: preset(sweep.run.get("preset", "cpu"), **sweep.train)),
        ("train_by_method", lambda: [(get_method(m), preset(sweep.run.get("preset", "cpu"), **{**sweep.train, **o}))
                                     for m, o in sweep.train_by_method.items()]),
    ]
    for key, check in checks:
        try:
            check()
        except UserError as exc:
            key = next((k for k in TRAIN_KEYS if str(exc).startswith(k)), key)
            raise SweepError(key, str(exc)) from None
    for spec in sweep.runs():
        spec.validate()


def _fail(message: str):
    raise UserError(message)


def _execute_into(spec: RunSpec, folder: str, threads: int | None = None, save_model: bool = True) -> dict:
    """Run one spec and store result.json (or error.json); returns a status line for the parent."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    quiet_libraries()
    folder = Path(folder)
    start = time.time()
    try:
        result = execute(spec, progress=False, log=lambda msg: None, output=folder, save_model=save_model)
    except Exception as exc:  # noqa: BLE001 - a failed run is recorded, not fatal to the sweep
        write_json_atomic(folder / ERROR_FILE, {"spec": dataclasses.asdict(spec), "error": f"{type(exc).__name__}: {exc}",
                                                "traceback": traceback.format_exc()})
        return {"folder": str(folder), "ok": False, "error": f"{type(exc).__name__}: {exc}"}
    (folder / ERROR_FILE).unlink(missing_ok=True)
    return {"folder": str(folder), "ok": True, "seconds": time.time() - start, "test": result["score"]["test"]}


def _assign_devices(specs: list[RunSpec], jobs_per_gpu: int) -> tuple[list[RunSpec], int]:
    """Spread runs over the visible GPUs (``jobs_per_gpu`` sharing each card); CPU runs unchanged."""
    import torch

    if not torch.cuda.is_available() or all(s.device == "cpu" for s in specs):
        return specs, 0
    gpus = torch.cuda.device_count()
    placed = [dataclasses.replace(s, device=f"cuda:{i % gpus}") for i, s in enumerate(specs)]
    return placed, gpus * jobs_per_gpu


def require_ray() -> None:
    """One line, before any work, where Ray is missing."""
    try:
        import ray  # noqa: F401
    except ImportError:
        raise UserError("--executor ray needs Ray: .venv/bin/python -m pip install 'ray>=2.9' "
                        "(or set up with EXTRAS=dev,notebooks,ray bash scripts/setup.sh)") from None


def run_calls(fn, calls: list[tuple], workers: int, bar) -> list:
    """``fn(*args)`` for every ``args`` in ``calls``, ticking ``bar`` as each finishes; results in the order
    they finish. One worker: in this process. More: in spawned worker processes, a fresh one per call
    (Python >= 3.11), so each call's peak memory is its own; ``fn`` must be importable by name."""
    if workers <= 1:
        results = []
        for args in calls:
            results.append(fn(*args))
            bar.update(1)
        return results
    import multiprocessing

    fresh = {"max_tasks_per_child": 1} if sys.version_info >= (3, 11) else {}
    results = []
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"), **fresh) as pool:
        for future in as_completed([pool.submit(fn, *args) for args in calls]):
            results.append(future.result())
            bar.update(1)
    return results


def run_sweep(sweep: SweepSpec, root: str | Path, jobs: int = 1, jobs_per_gpu: int = 1, executor: str = "local",
              progress: bool = True, save_model: bool = True) -> dict:
    """Run every unfinished run of ``sweep`` under ``root``; returns counts of done/skipped/failed."""
    from tqdm.auto import tqdm

    validate(sweep)
    if executor == "ray":
        require_ray()
    root = Path(root)
    specs = sweep.runs()
    todo = [s for s in specs if not (run_dir(root, s) / RESULT_FILE).exists()]
    if todo:  # the data and the model, checked once before the first run instead of failing in every one
        preflight(sweep.tasks, sweep.run.get("model", DEFAULT_MODEL), sweep.run.get("data_dir"))
    skipped = len(specs) - len(todo)
    todo, gpu_workers = _assign_devices(todo, jobs_per_gpu)
    workers = gpu_workers or jobs
    threads = max(1, (os.cpu_count() or 1) // workers)
    statuses = []
    bar = tqdm(total=len(todo), desc=f"sweep ({skipped} already done)", unit="run", disable=not progress)
    if executor == "ray":
        statuses = _run_ray(todo, root, jobs_per_gpu, threads, bar, save_model)
    else:
        calls = [(s, str(run_dir(root, s)), threads if workers > 1 else None, save_model) for s in todo]
        statuses = run_calls(_execute_into, calls, workers, bar)
    bar.close()
    failed = [s for s in statuses if not s["ok"]]
    for status in failed:
        print(f"failed: {status['folder']}: {status['error']}", file=sys.stderr)
    return {"runs": len(specs), "skipped": skipped, "done": len(statuses) - len(failed), "failed": len(failed)}


def _run_ray(specs: list[RunSpec], root: Path, jobs_per_gpu: int, threads: int, bar, save_model: bool) -> list[dict]:
    """One Ray task per run; a GPU run asks for 1/jobs_per_gpu of a GPU."""
    import ray
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    remote = ray.remote(_execute_into)
    refs = []
    for spec in specs:
        gpu = 1.0 / jobs_per_gpu if spec.device.startswith("cuda") else 0
        refs.append(remote.options(num_gpus=gpu, num_cpus=1).remote(spec, str(run_dir(root, spec)), threads, save_model))
    statuses = []
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        statuses.append(ray.get(ready[0]))
        bar.update(1)
    return statuses


