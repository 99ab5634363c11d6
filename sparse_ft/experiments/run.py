"""One fine-tuning run, end to end: data → model → method → training → result.json.

``RunSpec`` is everything that defines a run; ``execute(spec)`` performs it and returns the result
dict whose fields DESIGN §7 fixes. The CLI's ``train`` and the sweep both go through here.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import data as data_mod
from ..errors import UserError, check_range
from ..methods import BuildContext, MethodConfig, TunedModel, make_method_config
from ..methods.masks import load_mask_into
from ..methods.saving import save_tuned
from ..models import DEFAULT_MODEL, TaskModel, build_task_model, load_tokenizer, resolve_model_path
from ..tasks import REGRESSION, get_task
from ..train import compiles, evaluate, peak_memory_mb, preset, to_device, train
from .results import MODEL_FILE, RESULT_FILE, write_json_atomic


@dataclass
class RunSpec:
    task: str
    method: str
    sparsity: float | None = None
    model: str = DEFAULT_MODEL
    data_dir: str | None = None
    seed: int = 0  # data order and dropout
    head_seed: int | None = None  # head initialisation (default: seed)
    mask_seed: int | None = None  # mask sampling (default: seed)
    preset: str = "cpu"
    train_overrides: dict = field(default_factory=dict)  # TrainConfig fields (lr, max_steps, ...)
    method_options: dict = field(default_factory=dict)
    train_limit: int | None = None  # a seeded subset of the training set
    eval_limit: int | None = None  # the first N examples of val and of test
    device: str = "auto"
    mask_path: str | None = None  # a saved mask to train on (``sparse-ft select``)

    def seeds(self) -> dict:
        return {"data": self.seed,
                "head": self.seed if self.head_seed is None else self.head_seed,
                "mask": self.seed if self.mask_seed is None else self.mask_seed}

    def validate(self) -> MethodConfig:
        """Check every field (one :class:`UserError` line) and return the run's method config, the one
        place it is built."""
        get_task(self.task)
        method = make_method_config(self.method, self.sparsity, **self.method_options)
        if self.train_limit is not None:
            check_range("train_limit", self.train_limit, 1)
        if self.eval_limit is not None:
            check_range("eval_limit", self.eval_limit, 1)
        preset(self.preset, **self.train_overrides)
        return method


def preflight(tasks, model: str, data_dir: str | None) -> None:
    """Check, before any work, that every task's data can be read and that ``model`` loads (its tokenizer
    and config: seconds, no weights); one :class:`UserError` line with what to run otherwise."""
    from transformers import AutoConfig

    data_mod.require_task_data(tasks, data_dir)
    load_tokenizer(model)
    try:
        AutoConfig.from_pretrained(resolve_model_path(model))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load model {model!r}: {str(exc).splitlines()[0]}") from None


def quiet_libraries() -> None:
    """No load reports or progress bars from transformers; no tokenizer thread pools in workers."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {name!r} requested but CUDA is not available")
    return torch.device(name)


def subset(examples: list, limit: int | None, seed: int = 0) -> list:
    """A seeded random subset of ``limit`` examples (the same for every run seed)."""
    if limit is None or limit >= len(examples):
        return examples
    return random.Random(seed).sample(examples, limit)


@dataclass
class PreparedRun:
    """Everything a run needs before training; reused by ``select`` and the theory commands."""

    spec: RunSpec
    task: object
    model: TaskModel
    tokenizer: object
    config: object
    device: torch.device
    features: dict[str, list]
    loaders: dict[str, object]
    context: BuildContext
    method: MethodConfig


def prepare(spec: RunSpec, exclude: frozenset[int] = frozenset()) -> PreparedRun:
    """Data, model and method context of a run; ``exclude`` leaves training examples out (by their
    position in the training set after ``train_limit``), keeping the others' order."""
    method = spec.validate()
    task = get_task(spec.task)
    config = preset(spec.preset, **spec.train_overrides)
    device = resolve_device(spec.device)
    seeds = spec.seeds()
    splits = data_mod.load_splits(task, spec.data_dir)
    splits["train"] = subset(splits["train"], spec.train_limit if spec.train_limit is not None else config.train_limit)
    for name in ("val", "test"):
        splits[name] = splits[name][: spec.eval_limit] if spec.eval_limit else splits[name]
    tokenizer = load_tokenizer(spec.model)
    featurizer = data_mod.Featurizer(task, tokenizer, config.max_length)
    features = {name: data_mod.featurize(examples, featurizer, name) for name, examples in splits.items()}
    buckets = data_mod.length_buckets(config.max_length) if compiles(config, device) else None  # few shapes
    collator = data_mod.Collator(tokenizer.pad_token_id, regression=task.kind == REGRESSION, buckets=buckets)
    pin = device.type == "cuda"
    loaders = {
        **training_loaders(features["train"], collator, config, seeds["data"], pin, exclude),
        **{name: data_mod.make_loader(features[name], collator, config.batch_size, shuffle=False, pin_memory=pin)
           for name in ("val", "test")},
    }
    model = build_task_model(task, spec.model, head_seed=seeds["head"])
    context = build_context(loaders["selection"], seeds["mask"], device, config, loaders["train"])
    return PreparedRun(spec, task, model, tokenizer, config, device, features, loaders, context, method)


def training_loaders(train_features: list, collator, config, data_seed: int, pin: bool,
                     exclude: frozenset[int]) -> dict:
    """The shuffled training loader and the file-order one that methods select on, ``exclude`` left out."""
    return {
        "train": data_mod.make_loader(train_features, collator, config.batch_size, shuffle=True, seed=data_seed,
                                      pin_memory=pin, exclude=exclude),
        "selection": data_mod.make_loader(train_features, collator, config.batch_size, shuffle=False,
                                          pin_memory=pin, exclude=exclude),
    }


def build_context(selection_loader, mask_seed: int, device: torch.device, config, train_loader) -> BuildContext:
    def on_device(loader):
        return lambda: (to_device(batch, device) for batch in loader)

    return BuildContext(selection_batches=on_device(selection_loader), training_batches=on_device(train_loader),
                        mask_seed=mask_seed, device=device, max_steps=config.max_steps)


def build_tuned(run: PreparedRun):
    """Apply the run's method (or its saved mask) to the prepared model."""
    return build_method(run, run.model.to(run.device), run.context)


def build_method(run: PreparedRun, model: TaskModel, context: BuildContext):
    """Apply the run's method (or its saved mask) to ``model``, selecting on ``context``'s data."""
    if run.spec.mask_path:
        return load_mask_into(run.spec.mask_path, model, run.method)
    return run.method.build(model, context)


def fit(spec: RunSpec, exclude: frozenset[int] = frozenset(), progress: bool = True, log=print):
    """Prepare, build and train: the algorithm A of the stability analysis (mask selection included).
    Returns the prepared run, the trained tuned model and the training outcome."""
    run = prepare(spec, exclude)
    tuned = build_tuned(run)
    report = tuned.sparsity_report()
    log(f"{tuned.config.name}: trains {report.trainable:,} entries (+{report.head_params:,} head); budget "
        f"{report.budget:,} of m = {report.backbone_params:,} ({report.budget / report.backbone_params:.4%})")
    outcome = train(tuned, run.loaders["train"], run.loaders["val"], run.config, run.device,
                    seed=spec.seeds()["data"], progress=progress, train_eval_loader=run.loaders["selection"])
    return run, tuned, outcome


def fit_replicas(spec: RunSpec, excludes: list[frozenset[int]], progress: bool = True):
    """:func:`fit` for each ``exclude`` in ``excludes``, trained as one batch of replicas
    (:mod:`sparse_ft.replicas`): each replica selects its own tunable set on its own data. Returns the
    prepared run, the trained tuned models and their outcomes, in the order of ``excludes``."""
    from ..replicas import train_replicas

    run = prepare(spec)  # run.model stays θ0: each replica builds its method on a copy
    collator, pin, seeds = run.loaders["train"].collate_fn, run.device.type == "cuda", spec.seeds()
    tuned_models, train_loaders = [], []
    for exclude in excludes:
        loaders = training_loaders(run.features["train"], collator, run.config, seeds["data"], pin, exclude)
        context = build_context(loaders["selection"], seeds["mask"], run.device, run.config, loaders["train"])
        tuned_models.append(build_method(run, copy.deepcopy(run.model).to(run.device), context))
        train_loaders.append(loaders["train"])
    outcomes = train_replicas(tuned_models, train_loaders, run.loaders["val"], run.config, run.device,
                              seed=seeds["data"], progress=progress)
    return run, tuned_models, outcomes


def final_metrics(tuned: TunedModel, run: PreparedRun, splits=("val", "test")) -> tuple[dict, dict]:
    """The metrics of ``tuned`` (at A(S)) on ``splits``, with its evaluation function held fixed: a random
    one (Mixout's eval-time reset) is drawn once from the mask seed. Returns the metrics by split and the
    record of that draw (empty for deterministic methods), so that ``sparse-ft evaluate`` repeats them."""
    with tuned.frozen_evaluation(seed=run.spec.seeds()["mask"]) as draw:
        metrics = {name: evaluate(tuned, run.loaders[name], run.device, run.config.bf16) for name in splits}
    return metrics, draw


def execute(spec: RunSpec, progress: bool = True, log=print, output: str | Path | None = None,
            save_model: bool = True) -> dict:
    """Run one fine-tuning job and return its result dict (DESIGN §7).

    With ``output``, the run is left in that folder: ``model.safetensors`` (the tuned model at A(S), the
    checkpoint that was scored; unless ``save_model`` is False), then ``result.json``, whose presence marks
    the run as finished."""
    wall_start = time.perf_counter()
    run, tuned, outcome = fit(spec, progress=progress, log=log)
    metrics, draw = final_metrics(tuned, run)
    report = tuned.sparsity_report()
    folder = data_mod.resolve_data_dir(spec.data_dir)
    result = {
        "task": run.task.name,
        "method": spec.method,
        "sparsity": spec.sparsity if spec.sparsity is not None else report.budget / report.backbone_params,
        "seed": spec.seed,
        "seeds": spec.seeds(),
        "model": spec.model,
        "preset": spec.preset,
        "train_config": dataclasses.asdict(run.config),
        "method_config": tuned.config.to_dict(),
        "data": {name: len(run.features[name]) for name in ("train", "val", "test")},
        "metrics": metrics,
        "score": {name: metrics[name]["major"] for name in ("val", "test")},
        "sparsity_report": report.to_dict(),
        "steps": outcome.steps,
        "best_step": outcome.best_step,
        "history": outcome.history,
        "train_losses": outcome.losses,
        "structure_changes": outcome.structure_changes,
        "stop": outcome.stop,
        "final_train_loss": outcome.train_loss,
        "wall_seconds": time.perf_counter() - wall_start,
        "train_seconds": outcome.train_seconds,
        "peak_memory_mb": peak_memory_mb(run.device),
        "device": str(run.device),
        "torch": torch.__version__,
        "spec": dataclasses.asdict(spec),  # everything needed to rebuild the run (sparse-ft evaluate, analyze)
        "data_dir": str(folder.resolve()) if folder else None,
        "evaluation_draw": draw,
        "model_file": MODEL_FILE if output is not None and save_model else None,
    }
    if output is not None:
        if save_model:
            save_tuned(tuned, Path(output) / MODEL_FILE, metadata={"base_model": spec.model, "task": spec.task})
        write_json_atomic(Path(output) / RESULT_FILE, result)
    return result


