"""Stability measured three ways: leave-one-out retraining, seed variance, and influence functions.

**Pointwise hypothesis stability** (Bousquet & Elisseeff, JMLR 2002, Def. 2; the quantity Theorem 1 of
Fu et al., AAAI 2023 bounds). For the training set S = {z_1..z_n} and Sⁱ = S without z_i,

    ε̂ = (1/K) Σ_{i ∈ I} |ℓ(A(Sⁱ), z_i) − ℓ(A(S), z_i)|,      I = K indices drawn without replacement,

where A is the whole training algorithm (mask selection included), passed as ``train_fn(indices) ->
model``: the caller keeps seeds and data order identical with i removed, so the gap measures the effect of
z_i and not of the seed. This estimates the expectation over i for *this* S (Def. 2 also averages over S).
A percentile bootstrap over the K gaps (Efron & Tibshirani 1993, §13.3) gives the confidence interval;
two runs of ``train_fn`` on the full S with the same seed give the noise floor (nonzero when training is
not bitwise reproducible): gaps at or below it are not resolved.

**Seed-variance stability** (Fu et al., Table 1 and Figure 2): the standard deviation of a score across
random seeds.

**Influence functions** (Cook & Weisberg 1982; Koh & Liang, ICML 2017, Eq. 2-3). Removing z_i moves the
minimiser of L_S + (λ/2)||x||² by ≈ (1/n)(H + λI)⁻¹∇ℓ(z_i), hence

    ℓ(A(Sⁱ), z_i) − ℓ(A(S), z_i) ≈ (1/n) ∇ℓ(z_i)ᵀ (H + λI)⁻¹ ∇ℓ(z_i),

with H the Hessian of the mean training loss on the tunable coordinates and λ ≥ 0 a damping (the ridge
coefficient when the objective has one; otherwise a regulariser that makes H + λI positive definite).
The solve uses conjugate gradients (Hestenes & Stiefel 1952) in float64 on the matrix-free operator.

Example::

    res = pointwise_hypothesis_stability(train_fn, loss_at_fn, n=len(data), num_samples=20, seed=0)
    print(res)                                    # ε̂, CI, noise floor
    est = influence_loo_estimates(op, [op.gradient([example(i)]) for i in res.indices], n, damping=1e-3)
    compare_influence_to_retraining(est.estimates, res.signed_gaps)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

from theory.operators import as_matvec


@dataclass
class PointwiseStability:
    """ε̂ with its bootstrap CI and the per-index losses (``loss_full[j]`` = ℓ(A(S), z_i), ``loss_loo[j]`` =
    ℓ(A(Sⁱ), z_i) for i = ``indices[j]``), in the loss's own scale."""

    epsilon: float
    ci_low: float
    ci_high: float
    confidence: float
    indices: np.ndarray
    loss_full: np.ndarray
    loss_loo: np.ndarray
    noise_floor: float | None
    noise_gaps: np.ndarray | None
    n: int
    seed: int
    num_bootstrap: int

    @property
    def gaps(self) -> np.ndarray:
        """|ℓ(A(Sⁱ), z_i) − ℓ(A(S), z_i)| per sampled index."""
        return np.abs(self.signed_gaps)

    @property
    def signed_gaps(self) -> np.ndarray:
        """ℓ(A(Sⁱ), z_i) − ℓ(A(S), z_i): what the influence estimate predicts."""
        return self.loss_loo - self.loss_full

    @property
    def num_samples(self) -> int:
        return len(self.indices)

    def to_dict(self) -> dict:
        return {
            "epsilon": self.epsilon,
            "ci": [self.ci_low, self.ci_high],
            "confidence": self.confidence,
            "noise_floor": self.noise_floor,
            "n": self.n,
            "num_samples": self.num_samples,
            "seed": self.seed,
            "num_bootstrap": self.num_bootstrap,
            "indices": self.indices.tolist(),
            "loss_full": self.loss_full.tolist(),
            "loss_loo": self.loss_loo.tolist(),
        }

    def __str__(self) -> str:
        floor = "not measured" if self.noise_floor is None else f"{self.noise_floor:.4g}"
        return (
            f"pointwise hypothesis stability eps_hat = {self.epsilon:.4g}  "
            f"({self.confidence:.0%} bootstrap CI [{self.ci_low:.4g}, {self.ci_high:.4g}])\n"
            f"  over K = {self.num_samples} of n = {self.n} leave-one-out retrainings (seed {self.seed}); "
            f"same-seed rerun noise floor {floor}"
        )


def pointwise_hypothesis_stability(
    train_fn: Callable[[list[int]], Any] | None,
    loss_at_fn: Callable[[Any, int], float],
    n: int,
    num_samples: int = 10,
    seed: int = 0,
    *,
    indices: Sequence[int] | None = None,
    num_bootstrap: int = 2000,
    confidence: float = 0.95,
    noise_floor: bool = True,
    train_many_fn: Callable[[list[list[int]]], Sequence[Any]] | None = None,
) -> PointwiseStability:
    """Leave-one-out estimate of pointwise hypothesis stability (module docstring), K + 1 (+1) trainings.

    Args:
        train_fn: ``train_fn(indices) -> model``, the full algorithm run on the examples ``indices``
            (in their original order, same seeds).
        train_many_fn: instead of ``train_fn``, ``train_many_fn(list of index lists) -> models`` trains
            all K + 1 (+1) sets at once (e.g. as one batch of replicas); the noise-floor rerun is then a
            member of that batch.
        loss_at_fn: ``loss_at_fn(model, i) -> float``, the loss of example i (same scale as the bounds).
        n: size of S.
        num_samples: K, the number of left-out indices (drawn without replacement with ``seed``).
        indices: explicit left-out indices instead of drawing them.
        num_bootstrap, confidence: percentile bootstrap of the mean gap (seeded by ``seed``).
        noise_floor: rerun ``train_fn`` on S (one more training) and report the mean same-seed gap.
    """
    if n < 2:
        raise ValueError(f"n must be >= 2 to leave one out, got {n}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    if num_bootstrap < 1:
        raise ValueError(f"num_bootstrap must be >= 1, got {num_bootstrap}")
    rng = np.random.default_rng(seed)
    if indices is None:
        if not 1 <= num_samples <= n:
            raise ValueError(f"num_samples must lie in [1, n] = [1, {n}], got {num_samples}")
        chosen = np.sort(rng.choice(n, size=num_samples, replace=False))
    else:
        chosen = np.asarray(indices, dtype=int)
        if (
            chosen.size == 0
            or chosen.min() < 0
            or chosen.max() >= n
            or len(set(chosen.tolist())) != chosen.size
        ):
            raise ValueError(f"indices must be distinct integers in [0, {n})")
    everything = list(range(n))
    index_sets = [everything] + [[j for j in everything if j != i] for i in chosen]
    index_sets += [everything] if noise_floor else []
    if train_many_fn is not None:
        models = iter(train_many_fn(index_sets))
    elif train_fn is not None:
        models = (train_fn(s) for s in index_sets)  # one at a time: only one trained model is alive
    else:
        raise ValueError("give train_fn or train_many_fn")
    full = next(models)
    loss_full = np.array([float(loss_at_fn(full, int(i))) for i in chosen])
    loss_loo = np.array([float(loss_at_fn(next(models), int(i))) for i in chosen])
    noise_gaps = None
    if noise_floor:
        rerun = next(models)
        noise_gaps = np.abs(np.array([float(loss_at_fn(rerun, int(i))) for i in chosen]) - loss_full)
    gaps = np.abs(loss_loo - loss_full)
    boot = gaps[rng.integers(0, len(gaps), size=(num_bootstrap, len(gaps)))].mean(axis=1)
    tail = (1 - confidence) / 2
    return PointwiseStability(
        float(gaps.mean()),
        float(np.quantile(boot, tail)),
        float(np.quantile(boot, 1 - tail)),
        confidence,
        chosen,
        loss_full,
        loss_loo,
        None if noise_gaps is None else float(noise_gaps.mean()),
        noise_gaps,
        n,
        seed,
        num_bootstrap,
    )


def seed_variance_stability(scores: Sequence[float], ddof: int = 1) -> float:
    """Standard deviation of a score across seeds, the stability column of Fu et al.'s Table 1.

    ``ddof=1`` (the sample standard deviation, numpy ``std(ddof=1)``, Python ``statistics.stdev``) by
    default: the paper does not state its estimator, and ddof=1 is the unbiased-variance convention of
    most result tables. With the same number of seeds for every method, ddof only rescales all stds by
    √(s/(s−1)) (1.054 for 10 seeds) and leaves the Figure 2 ranks unchanged. Pass ``ddof=0`` for the
    population formula.
    """
    values = np.asarray(scores, dtype=float)
    if values.ndim != 1 or values.size <= ddof or not np.all(np.isfinite(values)):
        raise ValueError(f"need more than ddof={ddof} finite scores in a 1-D sequence, got {scores!r}")
    return float(values.std(ddof=ddof))


@dataclass
class InfluenceEstimate:
    """(1/n)·gᵢᵀ(H + λI)⁻¹gᵢ per example, with each CG solve's iterations and relative residual."""

    estimates: np.ndarray
    iterations: np.ndarray
    relative_residuals: np.ndarray
    negative_curvature: np.ndarray
    damping: float
    n: int


def influence_loo_estimates(
    op: Any,
    grads: Sequence[Any],
    n: int,
    damping: float = 0.0,
    *,
    rtol: float = 1e-8,
    maxiter: int | None = None,
) -> InfluenceEstimate:
    """Influence-function estimate of ℓ(A(Sⁱ), z_i) − ℓ(A(S), z_i) for each gradient gᵢ (module docstring).

    Args:
        op: the Hessian of the mean training loss on the tunable coordinates (any operator, see
            :func:`theory.operators.as_matvec`), e.g. a :class:`theory.hessian.HessianOperator`.
        grads: per-example gradients ∇ℓ(z_i) on the same coordinates (``op.gradient([example])``).
        n: training-set size.
        damping: λ ≥ 0 added to H.
        rtol, maxiter: CG stops at ||r|| ≤ rtol·||g|| or after ``maxiter`` (default: dim) iterations;
            ``relative_residuals`` are the true ||g − (H + λI)x|| / ||g|| (see :func:`conjugate_gradient`).

    ``negative_curvature[i]`` flags a solve that met pᵀ(H + λI)p ≤ 0: H + λI is not positive definite and
    the estimate is meaningless (increase the damping).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if damping < 0:
        raise ValueError(f"damping must be >= 0, got {damping}")
    if len(grads) == 0:
        raise ValueError("grads is empty")
    dim, apply = as_matvec(op)
    rows = []
    for g in grads:
        b = np.asarray(g.detach().cpu().double() if hasattr(g, "detach") else g, dtype=np.float64).reshape(-1)
        if b.shape[0] != dim:
            raise ValueError(f"gradient of length {b.shape[0]} does not match the operator's dim {dim}")
        x, iters, rel, negative = conjugate_gradient(
            lambda u: apply(u) + damping * u, b, rtol, maxiter or dim
        )
        rows.append((float(b @ x) / n, iters, rel, negative))
    est, iters, rel, neg = (np.array(column) for column in zip(*rows))
    return InfluenceEstimate(est, iters, rel, neg.astype(bool), float(damping), n)


def conjugate_gradient(apply: Callable, b: np.ndarray, rtol: float, maxiter: int):
    """Solve A x = b for symmetric positive definite A (Hestenes & Stiefel 1952), float64.

    Returns ``(x, iterations, ||b − Ax|| / ||b||, negative_curvature)``. The iteration stops on the
    recursively updated residual r_j (||r_j|| ≤ rtol·||b||) or after ``maxiter`` iterations, but the
    residual returned is the *true* one, recomputed from x at the end (one more product): in floating
    point r_j drifts away from b − Ax_j and keeps decreasing after b − Ax_j has stalled at the attainable
    accuracy (Greenbaum, *Iterative Methods for Solving Linear Systems*, SIAM 1997, Ch. 7), e.g. at
    condition number 1e8 the recursion says 1e-12 where ||b − Ax||/||b|| is 3e-9. The returned residual
    can therefore exceed ``rtol``. Stops early (flagging it) on a direction with pᵀAp ≤ 0.
    """
    x = np.zeros_like(b)
    r = b.copy()
    p = r.copy()
    rr = float(r @ r)
    norm_b = math.sqrt(rr)
    if norm_b == 0:
        return x, 0, 0.0, False

    def result(iterations: int, negative: bool):
        return x, iterations, float(np.linalg.norm(b - apply(x))) / norm_b, negative

    for it in range(1, maxiter + 1):
        ap = apply(p)
        curvature = float(p @ ap)
        if curvature <= 0:
            return result(it, True)
        step = rr / curvature
        x += step * p
        r -= step * ap
        rr_new = float(r @ r)
        if math.sqrt(rr_new) <= rtol * norm_b:
            return result(it, False)
        p = r + (rr_new / rr) * p
        rr = rr_new
    return result(maxiter, False)


def compare_influence_to_retraining(estimates: Sequence[float], retrain_gaps: Sequence[float]) -> dict:
    """Spearman rank correlation (and Pearson) between influence estimates and signed retraining gaps
    ℓ(A(Sⁱ), z_i) − ℓ(A(S), z_i), as Koh & Liang (2017, Fig. 2) check their approximation."""
    a, b = np.asarray(estimates, dtype=float), np.asarray(retrain_gaps, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or a.size < 3:
        raise ValueError("need two 1-D sequences of the same length >= 3")
    spearman = stats.spearmanr(a, b)
    pearson = stats.pearsonr(a, b)
    return {
        "spearman": float(spearman.statistic),
        "spearman_pvalue": float(spearman.pvalue),
        "pearson": float(pearson.statistic),
        "pearson_pvalue": float(pearson.pvalue),
        "n": int(a.size),
    }
