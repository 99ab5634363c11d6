"""Several trainings of one method as one batch of replicas (``torch.func.vmap``).

Leave-one-out stability (:mod:`theory.stability`) retrains the same algorithm on S and on each Sⁱ = S
without z_i. Those K runs differ only in their data and, for data-dependent selections, in their mask:
the backbone θ0 they start from is one tensor. Here replica r's own tensors (the trainable ones: a
sparse delta's values, LoRA or adapter weights, the head; and whatever buffers differ across replicas:
the delta's indices and θ0 at them) are stacked along a leading replica axis, and one step computes

    L_r(w_r) = Σ_b ω_rb ℓ(f(w_r; x_rb), y_rb) / Σ_b ω_rb      for every r at once,

with ``vmap(functional_call(model, w_r, batch_r))`` over r, and backpropagates Σ_r L_r. Replicas do not
interact, so the gradient of Σ_r L_r with respect to w_r is ∇L_r(w_r): each replica's own gradient.

What is kept exactly as in :func:`sparse_ft.train.train` for each replica: its data order (its own
loader), the mean loss over its batch (ω = 1 on its examples; the rows that pad a smaller batch to the
largest have ω = 0), the learning-rate schedule, AdamW (elementwise, so one AdamW over stacked tensors is
K independent ones), gradient clipping at its *own* global norm, evaluation on val, early stopping with
its own patience, and the restore of its own best checkpoint. What differs: (1) sequences are padded
to the longest in any replica's batch (the attention mask makes this exact up to float rounding); (2)
dropout masks are drawn once per step and shared by all replicas (``randomness="same"``), where K
sequential runs with one seed draw theirs from the same generator state but for their own padded
shapes, so in train mode with dropout the two are equally valid but not bitwise equal; (3) a sparse
delta takes its out-of-place definition θ = index_put(θ0, I_r, θ0[I_r] + v_r), i.e. K dense copies of
each tuned tensor per step, and its full weight gradient gathered (the in-place fast path of
:mod:`sparse_ft.delta` serves one set of values); (4) attention is eager (``scaled_dot_product_attention``
has no vmap rule on CPU and falls back to a loop over the replicas).

Methods whose tunable set changes during training (DiffPruning, ChildPruning's reselection) or that add a
penalty to the loss cannot be stacked and raise :class:`~sparse_ft.errors.UserError`; train those
replicas one after another.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.func import functional_call, vmap
from tqdm.auto import tqdm

from .errors import UserError
from .methods.base import TunedModel
from .methods.scoring import eager_attention
from .models import example_losses
from .train import (
    EarlyStopping,
    MetricAccumulator,
    TrainConfig,
    TrainOutcome,
    bf16_autocast,
    check_finite,
    cycle,
    linear_warmup_decay,
    to_device,
)

EXAMPLE_WEIGHT = "example_weight"


def stack_batches(batches: Sequence[dict], pad_token_id: int) -> dict:
    """K collated batches as one with a leading replica axis. Token tensors (every key but ``labels``,
    sequence last) are padded to the longest sequence of all K (``input_ids`` with ``pad_token_id``, the
    others with 0); every batch is padded with empty rows to the largest batch, and ``example_weight``
    is 1 on real examples and 0 on those rows."""
    rows = max(len(b["labels"]) for b in batches)
    length = max(b["input_ids"].shape[-1] for b in batches)
    stacked = {}
    for key in batches[0]:
        filler = pad_token_id if key == "input_ids" else 0
        parts = []
        for batch in batches:
            value = batch[key]
            if key != "labels":
                value = F.pad(value, (0, length - value.shape[-1]), value=filler)
            missing = rows - value.shape[0]
            if missing:
                value = torch.cat([value, value.new_full((missing, *value.shape[1:]), filler)])
            parts.append(value)
        stacked[key] = torch.stack(parts)
    stacked[EXAMPLE_WEIGHT] = torch.stack([
        (torch.arange(rows) < len(b["labels"])).float() for b in batches])
    return stacked


class ReplicaStack:
    """K tuned models of one method as stacked tensors around one of them (the ``base``, whose module
    code runs every replica through ``functional_call``). Frozen tensors must be identical across the
    replicas (they are shared); trainable tensors and differing buffers are stacked."""

    def __init__(self, tuned_models: Sequence[TunedModel]):
        base = tuned_models[0]
        for tuned in tuned_models:
            if type(tuned).on_step_end is not TunedModel.on_step_end or tuned.regularization() is not None:
                raise UserError(f"method {tuned.config.name!r} changes its tunable set or adds a penalty while "
                                "training, so its replicas cannot be trained as one batch; train them one by one")
            tuned.prepare_functional()  # e.g. a sparse delta's shared stored tensors must hold θ0
        self.base, self.models, self.task = base, list(tuned_models), base.task
        self.count = len(tuned_models)
        named = [dict(m.named_parameters()) for m in tuned_models]
        self.trainable = [n for n, p in base.named_parameters() if p.requires_grad]
        for params in named[1:]:
            if [n for n, p in params.items() if p.requires_grad] != self.trainable:
                raise UserError("replicas must train the same tensors (the same method and model)")
        for name, param in named[0].items():
            if not param.requires_grad and any(not torch.equal(param, other[name]) for other in named[1:]):
                raise UserError(f"replicas differ in the frozen tensor {name}; they cannot share one backbone")
        self.params = {n: torch.stack([p[n].detach() for p in named]).requires_grad_() for n in self.trainable}
        buffers = [dict(m.named_buffers()) for m in tuned_models]
        self.buffers = {n: torch.stack([b[n] for b in buffers]) for n, value in buffers[0].items()
                        if any(not torch.equal(value, other[n]) for other in buffers[1:])}

    def _logits(self, params: dict, buffers: dict, batch: dict) -> torch.Tensor:
        return functional_call(self.base, {**params, **buffers}, (batch,))

    def _loss(self, params: dict, buffers: dict, batch: dict) -> torch.Tensor:
        weight = batch[EXAMPLE_WEIGHT]
        losses = example_losses(self.task, self._logits(params, buffers, batch), batch["labels"])
        return (losses * weight).sum() / weight.sum()

    def losses(self, batch: dict) -> torch.Tensor:
        """Each replica's mean loss on its own batch (``batch`` from :func:`stack_batches`): shape (K,)."""
        return vmap(self._loss, randomness="same")(self.params, self.buffers, batch)

    def logits(self, batch: dict) -> torch.Tensor:
        """Every replica's logits on one shared batch: shape (K, ...)."""
        return vmap(self._logits, in_dims=(0, 0, None), randomness="same")(self.params, self.buffers, batch)

    def param_groups(self, weight_decay: float) -> list[dict]:
        """The base's AdamW groups with each tensor replaced by its stack."""
        names = {id(p): n for n, p in self.base.named_parameters()}
        return [{**group, "params": [self.params[names[id(p)]] for p in group["params"]]}
                for group in self.base.param_groups(weight_decay)]

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """``clip_grad_norm_`` per replica: scale replica r's gradients by min(1, max_norm/(‖g_r‖ + 1e-6))
        with ‖g_r‖ the 2-norm over all of its tensors. Returns the K norms."""
        grads = [p.grad for p in self.params.values() if p.grad is not None]
        norms = torch.stack([g.reshape(self.count, -1).float().pow(2).sum(1) for g in grads]).sum(0).sqrt()
        coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.view(-1, *[1] * (g.dim() - 1)).to(g.dtype))
        return norms

    def replica_state(self, r: int) -> dict[str, torch.Tensor]:
        return {n: p[r].detach().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def load_into_model(self, r: int, state: dict[str, torch.Tensor]) -> None:
        """Write replica r's tensors into its own tuned model."""
        params = dict(self.models[r].named_parameters())
        for name, value in state.items():
            params[name].copy_(value)


@torch.no_grad()
def evaluate_replicas(stack: ReplicaStack, loader, device: torch.device, bf16: bool = False) -> list[dict]:
    """:func:`sparse_ft.train.evaluate` for every replica, each batch run once for all of them."""
    was_training = stack.base.training
    stack.base.eval()
    accumulators = [MetricAccumulator(stack.task) for _ in range(stack.count)]
    for batch in loader:
        batch = to_device(batch, device)
        with bf16_autocast(bf16, device):
            logits = stack.logits(batch)
        for accumulator, replica_logits in zip(accumulators, logits):
            accumulator.add(replica_logits, batch["labels"])
    stack.base.train(was_training)
    return [a.result() for a in accumulators]


def train_replicas(tuned_models: Sequence[TunedModel], train_loaders: Sequence, val_loader, config: TrainConfig,
                   device: torch.device, seed: int = 0, progress: bool = True) -> list[TrainOutcome]:
    """Train ``tuned_models[r]`` on ``train_loaders[r]`` for every r as one batch of replicas (module
    docstring), with the protocol of ``config``; each model ends with its own best checkpoint on val."""
    if len(tuned_models) != len(train_loaders):
        raise ValueError("one training loader per replica")
    torch.manual_seed(seed)
    for tuned in tuned_models:
        tuned.to(device).train()
    stack = ReplicaStack(tuned_models)
    count = stack.count
    pad_token_id = train_loaders[0].collate_fn.pad_token_id
    optimizer = torch.optim.AdamW(stack.param_groups(config.weight_decay), lr=config.lr, eps=config.adam_eps,
                                  foreach=device.type == "cuda")
    warmup = int(config.warmup_ratio * config.max_steps)
    trackers = [EarlyStopping(config.patience, config.min_steps) for _ in range(count)]
    histories, losses, stopped_at = [[] for _ in range(count)], [[] for _ in range(count)], [None] * count
    running = torch.zeros(count, device=device)
    step, last_check, started = 0, 0, time.perf_counter()
    batches = [cycle(loader) for loader in train_loaders]
    bar = tqdm(total=config.max_steps, desc=f"train x{count}", disable=not progress, leave=False)
    with eager_attention(stack.base.model):
        while step < config.max_steps and not all(t.stopped for t in trackers):
            batch = to_device(stack_batches([next(b) for b in batches], pad_token_id), device)
            factor = linear_warmup_decay(step, warmup, config.max_steps)
            for group in optimizer.param_groups:
                group["lr"] = config.lr * factor * group.get("lr_scale", 1.0)
            with bf16_autocast(config.bf16, device):
                replica_losses = stack.losses(batch)
            replica_losses.sum().backward()
            stack.clip_grad_norm_(config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            running += replica_losses.detach()
            evaluate_now = step % config.eval_every == 0 or step == config.max_steps
            if evaluate_now or step % config.check_every == 0:
                means = (running / (step - last_check)).tolist()
                last_check = step
                running.zero_()
                for r, mean in enumerate(means):
                    if not trackers[r].stopped:
                        check_finite(mean, step, config.lr)
                        losses[r].append({"step": step, "loss": mean})
            bar.update(1)
            if evaluate_now:
                scores = evaluate_replicas(stack, val_loader, device, config.bf16)
                for r, tracker in enumerate(trackers):
                    if tracker.stopped:
                        continue
                    histories[r].append({"step": step, "val": scores[r]["major"], "train_loss": losses[r][-1]["loss"]})
                    tracker.record(step, scores[r]["major"], lambda r=r: stack.replica_state(r))
                    if tracker.stopped:
                        stopped_at[r] = step
    bar.close()
    seconds = time.perf_counter() - started
    outcomes = []
    for r, tracker in enumerate(trackers):
        stack.load_into_model(r, tracker.state if tracker.state is not None else stack.replica_state(r))
        outcomes.append(TrainOutcome(stopped_at[r] or step, tracker.step, seconds, histories[r], losses[r], []))
    return outcomes
