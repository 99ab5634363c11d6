"""The training loop and the paper's protocol (DESIGN §4).

Preset ``paper``: batch 16; AdamW (lr 1e-4, eps 1e-8, weight decay 0.01 except bias/LayerNorm);
linear warmup over 10% of the steps, then linear decay to 0; gradient clipping at 1.0; max length
256; evaluate every 500 steps on val; stop after 40 evaluations without improvement once at least
20000 steps have run; reload the best checkpoint and score test.

The authors' jiant config set warmup to 10% of 10000 *epochs*, so their learning rate never left
warmup; that artefact is not copied: warmup here is 10% of ``max_steps``.

The loop only talks to the :class:`~sparse_ft.methods.base.TunedModel` interface: it takes the
trainable parameters and their weight-decay groups from the tuned model, adds the method's
regularizer to the loss, and rebuilds the optimizer when the method reports a new tunable set.

``compile`` ("off", "on", or "cuda" = on when the device is CUDA; the ``paper`` preset): the step's
forward and backward go through ``torch.compile`` (mode "reduce-overhead", i.e. CUDA graphs, on CUDA;
the default mode on CPU, which needs a C++ compiler), AdamW is the fused kernel on CUDA, and batches
are padded to a few bucket lengths (:func:`sparse_ft.data.length_buckets`) so that only a few shapes
are ever compiled. Results match eager within numerical noise. The step loop makes no host sync
outside the ``check_every`` interval (loss check, progress) and evaluation.
"""

from __future__ import annotations

import dataclasses
import math
import resource
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .errors import UserError, check_choice, check_range
from .metrics import compute_metrics
from .models import TaskModel, example_losses


@dataclass
class TrainConfig:
    batch_size: int = 16
    lr: float = 1e-4
    adam_eps: float = 1e-8
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    max_length: int = 256
    eval_every: int = 500
    patience: int = 40  # evaluations without improvement before stopping ...
    min_steps: int = 20000  # ... once at least this many steps have run
    max_steps: int = 50000
    bf16: bool = True  # autocast on CUDA only
    check_every: int = 25  # steps between non-finite-loss checks and progress updates (host syncs)
    compile: str = "off"  # "off", "on", or "cuda": compile the step when the device is CUDA
    # The converged protocol (preset "converge"): train on a fixed small set until the mean training
    # loss, in eval mode over the whole set at each evaluation, falls below ``converge_loss``; A(S) is
    # then the last model, not the best on val. ``train_limit`` is the set's default size.
    converge_loss: float | None = None
    train_limit: int | None = None

    def validate(self) -> None:
        for name in ("batch_size", "max_length", "eval_every", "max_steps", "patience", "check_every"):
            check_range(name, getattr(self, name), 1)
        check_choice("compile", self.compile, COMPILE_CHOICES)
        check_range("lr", self.lr, 0.0, low_open=True)
        check_range("warmup_ratio", self.warmup_ratio, 0.0, 1.0)
        check_range("weight_decay", self.weight_decay, 0.0)
        check_range("min_steps", self.min_steps, 0)
        if self.converge_loss is not None:
            check_range("converge_loss", self.converge_loss, 0.0, low_open=True)
        if self.train_limit is not None:
            check_range("train_limit", self.train_limit, 1)


COMPILE_CHOICES = ("off", "on", "cuda")

PRESETS: dict[str, TrainConfig] = {
    "paper": TrainConfig(compile="cuda"),
    # A laptop CPU: MiniLM at length 128, a few hundred steps, evaluation every 25 steps.
    "cpu": TrainConfig(max_length=128, eval_every=25, patience=4, min_steps=100, max_steps=300),
    # Theorems 1 and 2 speak of a minimiser A(S): 32 examples trained until their mean loss is below 1e-3
    # (at most 400 steps; the outcome records which stop it hit), no warmup, the last model kept.
    "converge": TrainConfig(max_length=128, eval_every=20, patience=10**9, min_steps=0, max_steps=400,
                            warmup_ratio=0.0, converge_loss=1e-3, train_limit=32),
}


def preset(name: str, **overrides) -> TrainConfig:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    config = dataclasses.replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})
    config.validate()
    return config


def linear_warmup_decay(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate factor: step/warmup during warmup, then linear decay to 0 at ``total_steps``."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


class NonFiniteLoss(UserError):
    """The training loss became NaN or infinite."""


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated CUDA memory on a GPU, peak resident set size of the process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class MetricAccumulator:
    """Collects one model's logits over an evaluation set; :meth:`result` gives the task's metrics (×100,
    ``major`` among them), the mean loss and the number of examples."""

    def __init__(self, task):
        self.task = task
        self.preds, self.golds, self.loss_sum, self.count = [], [], 0.0, 0

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.loss_sum += float(example_losses(self.task, logits, labels).sum())
        self.count += len(labels)
        self.preds.append(TaskModel.predictions(self.task, logits).cpu())
        self.golds.append(labels.cpu())

    def result(self) -> dict:
        metrics = compute_metrics(self.task, torch.cat(self.preds).numpy(), torch.cat(self.golds).numpy())
        return {**metrics, "loss": self.loss_sum / self.count, "examples": self.count}


def bf16_autocast(enabled: bool, device: torch.device) -> torch.autocast:
    """bf16 autocast on CUDA when ``enabled`` (the config's ``bf16``); off elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, device: torch.device, bf16: bool = False) -> dict:
    """The task's metrics (×100, ``major`` among them) and mean loss of ``model`` over ``loader``."""
    was_training = model.training
    model.eval()
    accumulator = MetricAccumulator(model.task)
    for batch in loader:
        batch = to_device(batch, device)
        with bf16_autocast(bf16, device):
            accumulator.add(model(batch), batch["labels"])
    model.train(was_training)
    return accumulator.result()


@dataclass
class EarlyStopping:
    """The protocol's checkpoint selection (DESIGN §4): the best val score so far with its step and state,
    and a stop once ``patience`` evaluations have not improved on it after ``min_steps`` steps."""

    patience: int
    min_steps: int
    score: float = -math.inf
    step: int = 0
    state: dict | None = None
    stale: int = 0
    stopped: bool = False

    def record(self, step: int, score: float, state: Callable[[], dict]) -> None:
        """One evaluation at ``step``; ``state()`` is called only when the score improves."""
        if score > self.score:
            self.score, self.step, self.state, self.stale = score, step, state(), 0
        else:
            self.stale += 1
        self.stopped = step >= self.min_steps and self.stale >= self.patience

    def forget(self) -> None:
        """Drop the best checkpoint (the tunable set changed, so it no longer fits)."""
        self.score, self.state, self.stale = -math.inf, None, 0


def check_finite(mean_loss: float, step: int, lr: float) -> None:
    if not math.isfinite(mean_loss):
        raise NonFiniteLoss(f"training loss became {mean_loss} by step {step}; try a lower --lr (now {lr})")


@dataclass
class TrainOutcome:
    steps: int
    best_step: int
    train_seconds: float
    history: list[dict]  # one entry per evaluation: step, val major, train loss
    losses: list[dict]  # {step, loss}: mean training loss over each check interval (Figure 1)
    structure_changes: list[int]  # steps at which the method changed its tunable set
    stop: str = "max_steps"  # why training ended: max_steps, patience, or converged
    train_loss: float | None = None  # the converged protocol's last full training loss (eval mode)


def compiles(config: TrainConfig, device: torch.device) -> bool:
    """Whether ``config`` compiles the step on ``device``."""
    return config.compile == "on" or (config.compile == "cuda" and device.type == "cuda")


def make_optimizer(tuned, config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW on the method's groups: fused when compiling on CUDA, foreach on CUDA otherwise."""
    groups = tuned.param_groups(config.weight_decay)
    if not groups:
        raise UserError("the method left no parameter trainable")
    cuda = device.type == "cuda"
    fused = cuda and compiles(config, device)
    return torch.optim.AdamW(groups, lr=config.lr, eps=config.adam_eps, foreach=cuda and not fused,
                             fused=fused or None)


def make_objective(tuned, config: TrainConfig, device: torch.device) -> Callable[[dict], tuple]:
    """``batch -> (loss, objective)``: the mean task loss and the loss plus the method's regularizer,
    under bf16 autocast on CUDA; compiled when ``config`` compiles on ``device``."""
    def objective(batch: dict):
        with bf16_autocast(config.bf16, device):
            loss = tuned.loss(batch)
            penalty = tuned.regularization()
            return loss, (loss if penalty is None else loss + penalty)

    if not compiles(config, device):
        return objective
    if device.type == "cpu" and not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
        raise UserError("compile on CPU needs a C++ compiler (g++ or clang++) for torch.compile's "
                        "inductor backend, and none was found; run without --compile")
    cuda_graphs = device.type == "cuda"
    compiled = torch.compile(objective, mode="reduce-overhead" if cuda_graphs else None, dynamic=False)
    if not cuda_graphs:
        return compiled

    def step_objective(batch: dict):
        torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs are done with
        return compiled(batch)

    return step_objective


def train_step(optimizer: torch.optim.Optimizer, objective: Callable[[dict], tuple], batch: dict,
               max_grad_norm: float) -> torch.Tensor:
    """One optimizer step: forward, backward, gradient clipping, AdamW; returns the (device) loss."""
    loss, total = objective(batch)
    total.backward()
    torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def cycle(loader):
    while True:
        yield from loader


def train(tuned, train_loader, val_loader, config: TrainConfig, device: torch.device,
          seed: int = 0, progress: bool = True, train_eval_loader=None) -> TrainOutcome:
    """Train ``tuned`` with the protocol of ``config``; the best checkpoint on val is restored, except
    under ``config.converge_loss``, where training stops once the mean loss over ``train_eval_loader``
    (the whole training set, eval mode) is below it and the last model is kept.

    ``seed`` fixes dropout (the data order is fixed by the loader's own generator).
    """
    converging = config.converge_loss is not None
    if converging and train_eval_loader is None:
        raise UserError("the converged protocol needs the training set as train_eval_loader")
    stop, train_loss = "max_steps", None
    torch.manual_seed(seed)
    tuned.to(device).train()
    optimizer = make_optimizer(tuned, config, device)
    objective = make_objective(tuned, config, device)
    warmup = int(config.warmup_ratio * config.max_steps)
    best = EarlyStopping(config.patience, config.min_steps)
    history, losses, changes = [], [], []
    running = torch.zeros((), device=device)
    train_seconds, step, last_check, window_start = 0.0, 0, 0, None
    batches = cycle(train_loader)
    # the converged protocol usually stops long before the cap, so the bar's ETA is an upper bound
    desc = f"train (until loss < {config.converge_loss:g}; ETA to the cap)" if converging else "train"
    bar = tqdm(total=config.max_steps, desc=desc, disable=not progress, leave=False)
    while step < config.max_steps:
        batch = to_device(next(batches), device)
        window_start = window_start or time.perf_counter()
        factor = linear_warmup_decay(step, warmup, config.max_steps)
        for group in optimizer.param_groups:
            group["lr"] = config.lr * factor * group.get("lr_scale", 1.0)  # a method may scale a group
        loss = train_step(optimizer, objective, batch, config.max_grad_norm)
        step += 1
        if tuned.on_step_end(step):
            optimizer = make_optimizer(tuned, config, device)
            changes.append(step)
            best.forget()
        running += loss.detach()
        evaluate_now = step % config.eval_every == 0 or step == config.max_steps
        if evaluate_now or step % config.check_every == 0:
            mean_loss = float(running) / (step - last_check)  # a host sync, once per check interval
            last_check = step
            check_finite(mean_loss, step, config.lr)
            losses.append({"step": step, "loss": mean_loss})
            running.zero_()
            train_seconds += time.perf_counter() - window_start
            window_start = None
            bar.set_postfix(loss=f"{mean_loss:.4f}")
        bar.update(1)
        if evaluate_now:
            score = evaluate(tuned, val_loader, device, config.bf16)["major"]
            history.append({"step": step, "val": score, "train_loss": mean_loss})
            if converging:
                train_loss = evaluate(tuned, train_eval_loader, device, config.bf16)["loss"]
                history[-1]["full_train_loss"] = train_loss
                if train_loss < config.converge_loss:
                    stop = "converged"
                    break
                continue
            best.record(step, score, tuned.checkpoint_state)
            if best.stopped:
                stop = "patience"
                break
    bar.close()
    if best.state is not None and not converging:
        tuned.load_checkpoint_state(best.state)
    best_step = step if converging else best.step
    return TrainOutcome(step, best_step, train_seconds, history, losses, changes, stop, train_loss)
