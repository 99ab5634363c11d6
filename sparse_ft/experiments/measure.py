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
from tqdm.auto import tqdm

from theory.bounds import BoundReport, stability_bound_report
from theory.hessian import HessianOperator
from theory.lanczos import extreme_eigenvalues
from theory.lipschitz import per_sample_grad_norms

from ..errors import check_choice, check_range
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
    """λmax, λmin (with Ritz residuals, from several Lanczos starts), ρ̂ and the Theorem 1 bound for one tuned
    model at one ``point`` ("theta0": the selected set before training; "A(S)": a trained model)."""

    point: str
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
    starts_agree: bool = True
    space: str = "subspace"
    loss_scale: str = "mean loss over the measured examples, eval mode"

    def to_dict(self) -> dict:
        """JSON-ready (strict: the bound's inf is None with its reason)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "bound"}
        return {**out, "bound": self.bound.to_dict()}


def certified_extremes(op, lanczos_steps: int, max_lanczos_steps: int, starts: int = 2, seed: int = 0,
                       log=lambda msg: None):
    """:func:`theory.lanczos.extreme_eigenvalues` from ``starts`` random starts, with the Krylov dimension
    doubled from ``lanczos_steps`` until both extremes converge and the starts agree, or ``max_lanczos_steps``
    is reached (reported, not hidden: ``converged`` and ``agree`` say which)."""
    steps = min(lanczos_steps, op.dim)
    while True:
        log(f"Lanczos: {steps} steps x {starts} starts on {op.dim:,} coordinates ...")
        result = extreme_eigenvalues(op, steps, starts=starts, seed=seed)
        if (result.converged and result.agree) or steps >= min(max_lanczos_steps, op.dim):
            return result
        log(f"  not certified yet (residuals {result.residual_max:.2g}, {result.residual_min:.2g}; starts "
            f"{'agree' if result.agree else 'disagree'}): extending")
        steps = min(2 * steps, max_lanczos_steps, op.dim)


def measure_subspace(tuned, batches: list[dict], sparsity: float, n_train: int, lanczos_steps: int = 15,
                     seed: int = 0, cache_graph: bool = True, point: str = "theta0", max_lanczos_steps: int = 120,
                     starts: int = 2, log=lambda msg: None) -> SubspaceMeasurement:
    """Lanczos extremes of the Hessian on the tunable coordinates (several starts, extended until certified
    or ``max_lanczos_steps``), ρ̂ over the same examples, and Theorem 1's bound 2ρ²/((Λmin + 2(1−p))·n) with
    n = ``n_train``, at ``point`` (the caller says whether ``tuned`` is at θ0 or at a trained A(S)).

    ``cache_graph`` keeps each batch's first-order graph between the Lanczos products (memory: one
    double-backward graph per batch); measured on MiniLM at 16 × 128, p = 0.005, 2 CPU threads, a
    product then costs 2.13 gradients instead of 3.09 (``benchmarks/bench_hvp.py``)."""
    names = tunable_coordinates(tuned)
    with eager_attention(tuned.model):  # fused attention kernels have no second derivative
        op = HessianOperator(tuned, mean_loss, batches, params=names, cache_graph=cache_graph)
        result = certified_extremes(op, lanczos_steps, max_lanczos_steps, starts, seed, log)
        op.clear_cache()
        # vmap (the task model passes a prebuilt 4-D attention mask under it), the exact loop if it fails
        rho = per_sample_grad_norms(tuned, mean_loss, batches, params=names, method="auto").rho
    examples = sum(len(b["labels"]) for b in batches)
    return SubspaceMeasurement(
        point=point, method=tuned.config.name, sparsity=sparsity, dim=op.dim, examples=examples,
        lambda_max=result.lambda_max, lambda_min=result.lambda_min, residual_max=result.residual_max,
        residual_min=result.residual_min, converged=result.converged, hvps=result.num_matvecs, rho=rho,
        n_train=n_train, starts_agree=result.agree,
        bound=stability_bound_report(rho, result.lambda_min, sparsity, n_train, residual_min=result.residual_min,
                                     lambda_max=result.lambda_max))


def measure_selected(spec: RunSpec, examples: int, lanczos_steps: int = 15, max_lanczos_steps: int = 120,
                     log=lambda msg: None) -> SubspaceMeasurement:
    """Select the method's tunable set at θ0 for ``spec`` (no training) and measure it there."""
    run = prepare(spec)
    tuned = build_tuned(run)
    return measure_tuned(run, tuned, examples, lanczos_steps, max_lanczos_steps, "theta0", log)


def measure_tuned(run, tuned, examples: int | None, lanczos_steps: int = 15, max_lanczos_steps: int = 120,
                  point: str = "A(S)", log=lambda msg: None) -> SubspaceMeasurement:
    """Measure ``tuned`` (of the prepared ``run``) on its first ``examples`` training examples, its
    evaluation function held fixed (:meth:`~sparse_ft.methods.base.TunedModel.frozen_evaluation`)."""
    batches = training_batches(run, examples)
    spec = run.spec
    sparsity = spec.sparsity if spec.sparsity is not None else tuned.sparsity_report().budget / tuned.backbone_params
    with tuned.frozen_evaluation(seed=spec.seeds()["mask"]):
        return measure_subspace(tuned, batches, sparsity, len(run.features["train"]), lanczos_steps, point=point,
                                max_lanczos_steps=max_lanczos_steps, log=log)


REPLICA_MODES = ("sequential", "batched")


def loo_stability(spec: RunSpec, retrains: int, seed: int = 0, replicas: str = "sequential",
                  replica_batch: int | None = None, progress: bool = False, trained: list | None = None):
    """Pointwise hypothesis stability of ``spec``'s whole algorithm (mask selection included):
    ε̂ = mean_i |ℓ(A(Sⁱ), z_i) − ℓ(A(S), z_i)| over ``retrains`` sampled i, by retraining (K + 2 trainings:
    A(S), its same-seed rerun for the noise floor, and the K leave-one-out ones).

    ``replicas="sequential"`` retrains one model after another; ``"batched"`` trains them as vmapped
    replicas (:mod:`sparse_ft.replicas`), ``replica_batch`` at a time (all K + 2 when None). ``progress``
    shows a bar over the trainings with an ETA; ``trained``, a list, receives the first model trained on
    all of S (A(S), to measure it)."""
    from theory.stability import pointwise_hypothesis_stability

    check_choice("replicas", replicas, REPLICA_MODES)
    if replica_batch is not None:
        check_range("replica_batch", replica_batch, 1)
    quiet = {"progress": False, "log": lambda msg: None}
    run = prepare(spec)
    n = len(run.features["train"])
    collate = run.loaders["selection"].collate_fn

    def excluded(indices: list[int]) -> frozenset[int]:
        return frozenset(range(n)) - frozenset(indices)

    bar = tqdm(total=retrains + 2, desc="leave-one-out trainings", unit="training", disable=not progress)

    def keep(model, indices):
        if trained is not None and not trained and len(indices) == n:
            trained.append(model)
        bar.update(1)
        return model

    def train_fn(indices: list[int]):
        return keep(fit(spec, exclude=excluded(indices), **quiet)[1], indices)

    def train_many_fn(index_sets: list[list[int]]):
        size = replica_batch or len(index_sets)
        for start in range(0, len(index_sets), size):
            chunk = [excluded(indices) for indices in index_sets[start:start + size]]
            for model, indices in zip(fit_replicas(spec, chunk, progress=False)[1], index_sets[start:start + size]):
                yield keep(model, indices)

    @torch.no_grad()
    def loss_at(model, i: int) -> float:
        model.eval()
        return float(model.loss(to_device(collate([run.features["train"][i]]), run.device)))

    batched = replicas == "batched"
    estimate = pointwise_hypothesis_stability(None if batched else train_fn, loss_at, n, num_samples=retrains,
                                              seed=seed, train_many_fn=train_many_fn if batched else None)
    bar.close()
    return estimate, n
