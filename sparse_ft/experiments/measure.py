"""sparse-ft's side of the theory instruments (DESIGN §6).

``theory/`` works on any module, loss and data; this module hands it a tuned model's pieces: the
tunable coordinates (every trainable tensor outside the task head: the mask values of a sparse
delta, the added parameters of an adapter or LoRA), the mean task loss, and training batches. All
numbers refer to the *mean* cross-entropy (or squared error) over the named examples, in eval mode.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from theory.bounds import BoundReport, stability_bound_report
from theory.hessian import HessianOperator
from theory.lanczos import lanczos
from theory.lipschitz import per_sample_grad_norms

from ..errors import UserError, check_range
from ..methods.scoring import eager_attention
from ..train import to_device
from .run import RunSpec, build_tuned, fit, fit_replicas, prepare

HEAD = "model.head."


def tunable_coordinates(tuned) -> list[str]:
    """Names of the trainable tensors outside the head: the subspace the theory speaks of."""
    return [n for n, p in tuned.named_parameters() if p.requires_grad and not n.startswith(HEAD)]


def mean_loss(model, batch) -> torch.Tensor:
    return model.loss(batch)


def training_batches(run, examples: int | None) -> list[dict]:
    """The first ``examples`` training examples in file order, as device batches."""
    batches, count = [], 0
    for batch in run.loaders["selection"]:
        if examples is not None and count >= examples:
            break
        if examples is not None and count + len(batch["labels"]) > examples:
            batch = {k: v[: examples - count] for k, v in batch.items()}
        batches.append(to_device(batch, run.device))
        count += len(batch["labels"])
    return batches


@dataclass
class SubspaceMeasurement:
    """λmax, λmin (with Ritz residuals), ρ̂ and the Theorem 1 bound for one tuned model."""

    method: str
    sparsity: float
    dim: int
    examples: int
    lambda_max: float
    lambda_min: float
    residual_max: float
    residual_min: float
    converged: bool
    hvps: int
    rho: float
    n_train: int
    bound: BoundReport  # Theorem 1 with its assumptions checked
    loss_scale: str = "mean loss over the measured examples, eval mode"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def measure_subspace(tuned, batches: list[dict], sparsity: float, n_train: int, lanczos_steps: int = 15,
                     seed: int = 0, cache_graph: bool = True) -> SubspaceMeasurement:
    """Lanczos extremes of the Hessian on the tunable coordinates, ρ̂ over the same examples, and
    Theorem 1's bound 2ρ²/((Λmin + 2(1−p))·n) with n = ``n_train``.

    ``cache_graph`` keeps each batch's first-order graph between the Lanczos products (memory: one
    double-backward graph per batch); measured on MiniLM at 16 × 128, p = 0.005, 2 CPU threads, a
    product then costs 2.13 gradients instead of 3.09 (``benchmarks/bench_hvp.py``)."""
    names = tunable_coordinates(tuned)
    with eager_attention(tuned.model):  # fused attention kernels have no second derivative
        op = HessianOperator(tuned, mean_loss, batches, params=names, cache_graph=cache_graph)
        result = lanczos(op, min(lanczos_steps, op.dim), seed=seed)
        op.clear_cache()
        # vmap (the task model passes a prebuilt 4-D attention mask under it), the exact loop if it fails
        rho = per_sample_grad_norms(tuned, mean_loss, batches, params=names, method="auto").rho
    examples = sum(len(b["labels"]) for b in batches)
    return SubspaceMeasurement(
        method=tuned.config.name, sparsity=sparsity, dim=op.dim, examples=examples,
        lambda_max=result.lambda_max, lambda_min=result.lambda_min, residual_max=result.residual_max,
        residual_min=result.residual_min, converged=result.converged, hvps=result.num_matvecs, rho=rho,
        n_train=n_train, bound=stability_bound_report(rho, result.lambda_min, sparsity, n_train))


def measure_selected(spec: RunSpec, examples: int, lanczos_steps: int = 15) -> SubspaceMeasurement:
    """Select the method's tunable set at θ0 for ``spec`` (no training) and measure it there."""
    run = prepare(spec)
    tuned = build_tuned(run)
    batches = training_batches(run, examples)
    sparsity = spec.sparsity if spec.sparsity is not None else tuned.sparsity_report().budget / tuned.backbone_params
    return measure_subspace(tuned, batches, sparsity, len(run.features["train"]), lanczos_steps)


REPLICA_MODES = ("sequential", "batched")


def loo_stability(spec: RunSpec, retrains: int, seed: int = 0, replicas: str = "sequential",
                  replica_batch: int | None = None):
    """Pointwise hypothesis stability of ``spec``'s whole algorithm (mask selection included):
    ε̂ = mean_i |ℓ(A(Sⁱ), z_i) − ℓ(A(S), z_i)| over ``retrains`` sampled i, by retraining.

    ``replicas="sequential"`` retrains one model after another; ``"batched"`` trains them as vmapped
    replicas (:mod:`sparse_ft.replicas`), ``replica_batch`` at a time (all K + 2 when None)."""
    from theory.stability import pointwise_hypothesis_stability

    if replicas not in REPLICA_MODES:
        raise UserError(f"replicas must be one of {REPLICA_MODES}, got {replicas!r}")
    if replica_batch is not None:
        check_range("replica_batch", replica_batch, 1)
    quiet = {"progress": False, "log": lambda msg: None}
    run = prepare(spec)
    n = len(run.features["train"])
    collate = run.loaders["selection"].collate_fn

    def excluded(indices: list[int]) -> frozenset[int]:
        return frozenset(range(n)) - frozenset(indices)

    def train_fn(indices: list[int]):
        return fit(spec, exclude=excluded(indices), **quiet)[1]

    def train_many_fn(index_sets: list[list[int]]):
        size = replica_batch or len(index_sets)
        for start in range(0, len(index_sets), size):
            chunk = [excluded(indices) for indices in index_sets[start:start + size]]
            yield from fit_replicas(spec, chunk, progress=False)[1]

    @torch.no_grad()
    def loss_at(model, i: int) -> float:
        model.eval()
        return float(model.loss(to_device(collate([run.features["train"][i]]), run.device)))

    batched = replicas == "batched"
    estimate = pointwise_hypothesis_stability(None if batched else train_fn, loss_at, n, num_samples=retrains,
                                              seed=seed, train_many_fn=train_many_fn if batched else None)
    return estimate, n
