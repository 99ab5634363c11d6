"""Extreme eigenvalues and spectral density of a symmetric operator by the Lanczos process.

**Lanczos** (Lanczos 1950; Golub & Van Loan, *Matrix Computations*, 4th ed., Alg. 10.1.1 with full
reorthogonalisation, §10.3.1). From a unit start q_1, m products build an orthonormal basis
Q_m = [q_1..q_m] of the Krylov space and the tridiagonal T_m = Q_mᵀ A Q_m (diagonal α, off-diagonal β):

    A Q_m = Q_m T_m + β_m q_{m+1} e_mᵀ.

With T_m = S diag(θ) Sᵀ, the Ritz pair (θ_i, y_i = Q_m s_i) has residual ||A y_i − θ_i y_i|| = |β_m s_{m,i}|
(Parlett, *The Symmetric Eigenvalue Problem*, §13.2), so *some* eigenvalue of A lies within that residual of
θ_i. Ritz values lie inside [λmin, λmax] (Cauchy interlacing): an unconverged θ_max is too low and an
unconverged θ_min too high. A small residual at θ_max does **not** say that the eigenvalue near it is
λmax: a start (nearly) orthogonal to the top eigenvector converges to an interior eigenvalue with a tiny
residual. :func:`extreme_eigenvalues` therefore runs several independent random starts and reports
whether they agree (DESIGN §6 "Where"). Basis and T are float64 whatever the operator's dtype; every new vector is
reorthogonalised twice against the whole basis (Gram-Schmidt "twice is enough"), which costs
O(m·k) memory: keep num_steps · k · 8 bytes affordable.

**Stochastic Lanczos quadrature** (Ghorbani, Krishnan & Xiao, ICML 2019, "An Investigation into Neural
Net Optimization via Hessian Eigenvalue Density", §2.2; Lin, Saad & Yang, SIAM Review 2016): for a unit
Rademacher probe v, vᵀ f(A) v ≈ Σ_i τ_i f(θ_i) with nodes θ_i = eig(T_m) and weights τ_i = s_{1,i}²
(Gauss quadrature, exact for polynomials of degree ≤ 2m−1). Averaging over probes with f a Gaussian
of width σ estimates the smoothed density φ(t) = (1/k) Σ_j N(t; λ_j, σ²), which integrates to 1.

**Power iteration** (the baseline of PyHessian, Yao et al., IEEE BigData 2020, whose ``eigenvalues()``
computes the top (largest-magnitude) eigenvalues by power iteration with deflation, stopping on a
relative change of the estimate): iterate v ← Av/||Av|| for the dominant eigenvalue μ1; our second
phase, power iteration on μ1·I − A for the other end of the spectrum, is not in PyHessian.

Example::

    res = lanczos(op, num_steps=30, seed=0)
    res.lambda_max, res.residual_max, res.converged
    ext = extreme_eigenvalues(op, num_steps=30, starts=2, seed=0)
    ext.lambda_max, ext.residual_max, ext.agree
    dens = slq_density(op, num_probes=5, num_steps=40)
    plot_density(dens, path="density.png", log_y=True)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal

from theory.operators import as_matvec


class ExtremesCertificate:
    """Convergence of the two extreme eigenvalue estimates: residual ≤ ``tol`` at each end.

    Shared by :class:`LanczosResult` and :class:`PowerIterationResult`, which define
    ``residual_max``, ``residual_min`` and ``tol``."""

    @property
    def converged_max(self) -> bool:
        return self.residual_max <= self.tol

    @property
    def converged_min(self) -> bool:
        return self.residual_min <= self.tol

    @property
    def converged(self) -> bool:
        return self.converged_max and self.converged_min


@dataclass
class LanczosResult(ExtremesCertificate):
    """Ritz values (ascending) with residual bounds |β_m s_{m,i}| and quadrature weights s_{1,i}².

    ``converged_max`` / ``converged_min``: the extreme Ritz value's residual is ≤ ``tol``
    (``rtol·|λmax|`` unless an absolute tolerance was given). ``converged`` needs both.
    """

    ritz_values: np.ndarray
    residuals: np.ndarray
    weights: np.ndarray
    tol: float
    num_matvecs: int
    breakdown: bool
    alphas: np.ndarray
    betas: np.ndarray
    seconds: float
    ritz_vectors: np.ndarray | None = field(default=None, repr=False)

    @property
    def num_steps(self) -> int:
        return len(self.alphas)

    @property
    def lambda_max(self) -> float:
        return float(self.ritz_values[-1])

    @property
    def lambda_min(self) -> float:
        return float(self.ritz_values[0])

    @property
    def residual_max(self) -> float:
        return float(self.residuals[-1])

    @property
    def residual_min(self) -> float:
        return float(self.residuals[0])

    def __str__(self) -> str:
        def state(ok: bool) -> str:
            return "converged" if ok else "NOT converged (Ritz value lies inside the spectrum)"

        return (
            f"Lanczos: {self.num_steps} steps, {self.num_matvecs} products, {self.seconds:.2f} s"
            f"{', breakdown (invariant subspace)' if self.breakdown else ''}\n"
            f"  lambda_max = {self.lambda_max:.6g}  residual {self.residual_max:.2e}  "
            f"{state(self.converged_max)}\n"
            f"  lambda_min = {self.lambda_min:.6g}  residual {self.residual_min:.2e}  "
            f"{state(self.converged_min)}\n"
            f"  tolerance {self.tol:.2e}"
        )


def lanczos(
    op: Any,
    num_steps: int,
    seed: int = 0,
    *,
    start: str | np.ndarray = "rademacher",
    rtol: float = 1e-3,
    atol: float | None = None,
    stop_when_converged: bool = False,
    breakdown_tol: float = 1e-10,
    return_vectors: bool = False,
    callback: Callable[[int], None] | None = None,
) -> LanczosResult:
    """Run ``min(num_steps, dim)`` Lanczos steps (one operator product each) with full reorthogonalisation.

    Args:
        op: an operator (``dim``, ``matvec``), a dense symmetric matrix or a scipy ``LinearOperator``.
        num_steps: Krylov dimension m (capped at the operator's dimension).
        seed: seed of the random start vector.
        start: "rademacher", "gaussian", or an explicit start vector (normalised here).
        rtol, atol: convergence tolerance on the extreme residuals, ``atol`` if given else ``rtol·|λmax|``.
        stop_when_converged: stop as soon as both extreme Ritz values meet the tolerance.
        breakdown_tol: stop when β_j ≤ breakdown_tol·||T_j|| (the Krylov space is invariant, the Ritz
            values are exact).
        return_vectors: also return the Ritz vectors Q_m S (k × m).
        callback: called with the step index j after each operator product (a progress bar's tick).
    """
    dim, apply = as_matvec(op)
    if num_steps < 1:
        raise ValueError(f"num_steps must be ≥ 1, got {num_steps}")
    if atol is None and rtol <= 0 or atol is not None and atol <= 0:
        raise ValueError("the tolerance must be positive")
    m = min(int(num_steps), dim)
    q = _start_vector(start, dim, seed)
    basis = np.zeros((m, dim))
    alphas: list[float] = []
    betas: list[float] = []
    breakdown = False
    clock = time.perf_counter()
    for j in range(m):
        basis[j] = q
        w = apply(q)
        if callback is not None:
            callback(j)
        alpha = float(q @ w)
        for _ in range(2):
            w -= basis[: j + 1].T @ (basis[: j + 1] @ w)
        beta = float(np.linalg.norm(w))
        alphas.append(alpha)
        betas.append(beta)
        scale = max(np.abs(alphas).max(), max(betas[:-1], default=0.0))
        if beta <= breakdown_tol * scale:
            breakdown = True
            break
        q = w / beta
        if stop_when_converged and j >= 1 and _result(alphas, betas, basis, rtol, atol, False).converged:
            break
    result = _result(alphas, betas, basis, rtol, atol, return_vectors)
    result.breakdown = breakdown
    result.seconds = time.perf_counter() - clock
    return result


def dense_cross_check(op: Any, result: LanczosResult, max_dim: int = 3000) -> dict:
    """Compare Lanczos extremes with float64 ``numpy.linalg.eigvalsh`` of the dense operator (k ≤ max_dim;
    uses ``op.to_dense()`` when the operator has one, else k products). Returns the dense extremes and the
    errors, which must not exceed the reported residuals for a converged end."""
    dim, apply = as_matvec(op)
    if dim > max_dim:
        raise ValueError(f"dim {dim} > max_dim {max_dim}: too large for a dense cross-check")
    if hasattr(op, "to_dense"):
        dense = np.asarray(op.to_dense().detach().cpu().double())
    else:
        dense = np.stack([apply(e) for e in np.eye(dim)], axis=1)
    eigenvalues = np.linalg.eigvalsh((dense + dense.T) / 2)
    return {
        "lambda_max": float(eigenvalues[-1]),
        "lambda_min": float(eigenvalues[0]),
        "error_max": abs(result.lambda_max - float(eigenvalues[-1])),
        "error_min": abs(result.lambda_min - float(eigenvalues[0])),
        "residual_max": result.residual_max,
        "residual_min": result.residual_min,
    }


@dataclass
class MultiStartExtremes(ExtremesCertificate):
    """λmax / λmin over independent Lanczos starts, each with the residual of the start that gave it.

    ``lambda_max`` = max over starts of the top Ritz value, ``lambda_min`` = min of the bottom one;
    ``agree_max`` / ``agree_min``: every start's extreme Ritz value lies within the two residuals (plus a
    rounding floor, ``floor``) of the reported one. ``converged_*`` as for :class:`LanczosResult` (residual ≤
    ``tol``). What this certifies: see :func:`extreme_eigenvalues`.
    """

    lambda_max: float
    lambda_min: float
    residual_max: float
    residual_min: float
    tol: float
    agree_max: bool
    agree_min: bool
    floor: float
    runs: list[LanczosResult] = field(repr=False)
    seeds: list[int | None]

    @property
    def agree(self) -> bool:
        return self.agree_max and self.agree_min

    @property
    def num_matvecs(self) -> int:
        return sum(r.num_matvecs for r in self.runs)

    def to_dict(self) -> dict:
        """JSON-ready: the reported extremes, the verdicts, and each start's extremes."""
        return {
            "lambda_max": self.lambda_max,
            "residual_max": self.residual_max,
            "lambda_min": self.lambda_min,
            "residual_min": self.residual_min,
            "tol": self.tol,
            "converged_max": self.converged_max,
            "converged_min": self.converged_min,
            "agree_max": self.agree_max,
            "agree_min": self.agree_min,
            "num_matvecs": self.num_matvecs,
            "starts": [
                {
                    "seed": seed,
                    "num_steps": run.num_steps,
                    "lambda_max": run.lambda_max,
                    "residual_max": run.residual_max,
                    "lambda_min": run.lambda_min,
                    "residual_min": run.residual_min,
                }
                for seed, run in zip(self.seeds, self.runs)
            ],
        }

    def __str__(self) -> str:
        def state(converged: bool, agree: bool) -> str:
            return (
                f"{'converged' if converged else 'NOT converged'}, "
                f"{'starts agree' if agree else 'starts DISAGREE: one found an interior eigenvalue'}"
            )

        return (
            f"Lanczos, {len(self.runs)} starts, {self.num_matvecs} products\n"
            f"  lambda_max = {self.lambda_max:.6g}  residual {self.residual_max:.2e}  "
            f"{state(self.converged_max, self.agree_max)}\n"
            f"  lambda_min = {self.lambda_min:.6g}  residual {self.residual_min:.2e}  "
            f"{state(self.converged_min, self.agree_min)}\n"
            f"  tolerance {self.tol:.2e}"
        )


def extreme_eigenvalues(
    op: Any,
    num_steps: int,
    starts: int | Sequence[np.ndarray] = 2,
    seed: int = 0,
    *,
    rtol: float = 1e-3,
    atol: float | None = None,
    stop_when_converged: bool = False,
    callback: Callable[[int], None] | None = None,
) -> MultiStartExtremes:
    """λmax and λmin from several independent Lanczos starts, with what each number certifies.

    Runs :func:`lanczos` from ``starts`` Rademacher vectors (seeds ``seed``, ``seed + 1``, ...; or from the
    given start vectors), ``min(num_steps, dim)`` products each, and reports the largest top Ritz value and
    the smallest bottom one, each with its own start's residual.

    Certified (exact arithmetic; the operator's own rounding aside):

    * **bracket**: λmax(A) ≥ ``lambda_max`` and λmin(A) ≤ ``lambda_min``: every Ritz value of every start
      lies in [λmin, λmax], so the max (min) over starts is the tightest of these bounds;
    * **localisation**: some eigenvalue of A lies within ``residual_max`` of ``lambda_max`` (within
      ``residual_min`` of ``lambda_min``), the Ritz-pair residual bound.

    Not certified: that the eigenvalue near ``lambda_max`` is λmax itself. A start with (almost) no
    component on the top eigenvector converges, with a small residual, to an interior eigenvalue, and
    λmax may then exceed ``lambda_max + residual_max`` by any amount. Independent random starts that agree
    (``agree_max``: each start's top Ritz value within its residual plus the reported one's, plus ``floor``
    = 100·eps(operator dtype)·max(|λmax|, |λmin|) for rounding) make such a miss unlikely, since each random
    start has a nonzero component on every eigenvector almost surely; that is evidence, not proof (for a
    probabilistic bound on the error of Lanczos with one random start on a PSD matrix, see Kuczyński &
    Woźniakowski, SIAM J. Matrix Anal. Appl. 13(4), 1992). Disagreement means some start stopped at an
    interior eigenvalue: the bracket still holds, the extreme is not found; run more steps or starts.

    Args:
        op: an operator (``dim``, ``matvec``), a dense symmetric matrix or a scipy ``LinearOperator``.
        num_steps: Krylov dimension per start (capped at dim).
        starts: the number of random starts (≥ 1; 2 by default), or a sequence of start vectors.
        seed: seed of the first random start.
        rtol, atol, stop_when_converged: as for :func:`lanczos`; ``tol`` = atol, else rtol·|lambda_max|.
        callback: as for :func:`lanczos`, called after every product of every start.

    Returns:
        :class:`MultiStartExtremes`; ``to_dict()`` is JSON-ready. Costs the sum of the starts' products.
    """
    if isinstance(starts, (int, np.integer)) and not isinstance(starts, bool):
        if starts < 1:
            raise ValueError(f"starts must be >= 1, got {starts}")
        seeds: list[int | None] = [seed + s for s in range(int(starts))]
        vectors: list[Any] = ["rademacher"] * len(seeds)
    else:
        vectors = [np.asarray(v, dtype=np.float64) for v in starts]
        seeds = [None] * len(vectors)
        if not vectors:
            raise ValueError("starts is empty")
    runs = [
        lanczos(
            op,
            num_steps,
            0 if s is None else s,
            start=v,
            rtol=rtol,
            atol=atol,
            stop_when_converged=stop_when_converged,
            callback=callback,
        )
        for s, v in zip(seeds, vectors)
    ]
    top = max(runs, key=lambda r: r.lambda_max)
    bottom = min(runs, key=lambda r: r.lambda_min)
    scale = max(abs(top.lambda_max), abs(bottom.lambda_min), np.finfo(float).tiny)
    floor = 100 * _operator_eps(op) * scale
    agree_max = all(
        abs(r.lambda_max - top.lambda_max) <= r.residual_max + top.residual_max + floor for r in runs
    )
    agree_min = all(
        abs(r.lambda_min - bottom.lambda_min) <= r.residual_min + bottom.residual_min + floor for r in runs
    )
    tol = atol if atol is not None else rtol * max(abs(top.lambda_max), np.finfo(float).tiny)
    return MultiStartExtremes(
        top.lambda_max,
        bottom.lambda_min,
        top.residual_max,
        bottom.residual_min,
        float(tol),
        agree_max,
        agree_min,
        float(floor),
        runs,
        seeds,
    )


def _operator_eps(op: Any) -> float:
    """Unit roundoff of the operator's products: its torch/numpy dtype's eps, float64's by default."""
    dtype = getattr(op, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return float(torch.finfo(dtype).eps)
    if dtype is not None and np.issubdtype(np.dtype(dtype), np.floating):
        return float(np.finfo(dtype).eps)
    return float(np.finfo(np.float64).eps)


def _result(alphas, betas, basis, rtol, atol, return_vectors) -> LanczosResult:
    """Ritz values, residuals and quadrature weights of T_m (eigh of the tridiagonal, ascending)."""
    a, b = np.asarray(alphas), np.asarray(betas)
    theta, s = eigh_tridiagonal(a, b[:-1]) if len(a) > 1 else (a.copy(), np.ones((1, 1)))
    residuals = np.abs(b[-1] * s[-1, :])
    tol = atol if atol is not None else rtol * max(abs(theta[-1]), np.finfo(float).tiny)
    vectors = basis[: len(a)].T @ s if return_vectors else None
    return LanczosResult(theta, residuals, s[0, :] ** 2, float(tol), len(a), False, a, b, 0.0, vectors)


def _start_vector(start: str | np.ndarray, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if isinstance(start, str):
        if start == "rademacher":
            v = rng.choice([-1.0, 1.0], size=dim)
        elif start == "gaussian":
            v = rng.standard_normal(dim)
        else:
            raise ValueError(f"start must be 'rademacher', 'gaussian' or a vector, got {start!r}")
    else:
        v = np.asarray(start, dtype=np.float64).reshape(-1)
        if v.shape[0] != dim or not np.linalg.norm(v) > 0:
            raise ValueError(f"start vector must be nonzero with length {dim}")
    return v / np.linalg.norm(v)


@dataclass
class SpectralDensity:
    """Smoothed spectral density φ(t) on ``grid`` (integrates to 1 over a grid covering the nodes ± 5σ),
    with the raw quadrature ``nodes`` / ``weights`` of each probe."""

    grid: np.ndarray
    density: np.ndarray
    sigma: float
    nodes: list[np.ndarray]
    weights: list[np.ndarray]
    num_matvecs: int

    def integral(self) -> float:
        return float(np.trapezoid(self.density, self.grid))


def slq_density(
    op: Any,
    num_probes: int = 10,
    num_steps: int = 50,
    seed: int = 0,
    grid: np.ndarray | None = None,
    sigma: float | None = None,
    num_points: int = 1000,
) -> SpectralDensity:
    """Stochastic Lanczos quadrature estimate of the spectral density (Ghorbani et al. 2019, Eq. 6-8).

    φ(t) ≈ (1/P) Σ_p Σ_i τ_{p,i} · exp(−(t − θ_{p,i})²/(2σ²)) / (σ√(2π)), with nodes θ_{p,i} = eig(T_m) from
    a unit Rademacher probe p (seed + p) and weights τ_{p,i} = (first component of the i-th eigenvector)².
    ``sigma`` defaults to 1% of the node range (Ghorbani et al. use σ² = 1e-5 after scaling the spectrum to
    [−1, 1], i.e. σ ≈ 0.16% of the range: smaller σ resolves outliers, larger σ smooths the bulk).
    ``grid`` defaults to ``num_points`` points over [min node − 5σ, max node + 5σ].
    Costs num_probes · min(num_steps, dim) products.
    """
    if num_probes < 1:
        raise ValueError(f"num_probes must be ≥ 1, got {num_probes}")
    runs = [lanczos(op, num_steps, seed=seed + p, start="rademacher") for p in range(num_probes)]
    nodes = [r.ritz_values for r in runs]
    weights = [r.weights for r in runs]
    low = min(n[0] for n in nodes)
    high = max(n[-1] for n in nodes)
    if sigma is None:
        sigma = 0.01 * (high - low) if high > low else max(abs(high), 1.0) * 1e-3
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    grid = np.linspace(low - 5 * sigma, high + 5 * sigma, num_points) if grid is None else np.asarray(grid)
    all_nodes, all_weights = np.concatenate(nodes), np.concatenate(weights) / num_probes
    z = (grid[:, None] - all_nodes[None, :]) / sigma
    density = (np.exp(-0.5 * z**2) / (sigma * np.sqrt(2 * np.pi))) @ all_weights
    return SpectralDensity(grid, density, float(sigma), nodes, weights, sum(r.num_matvecs for r in runs))


def plot_density(
    density: SpectralDensity,
    ax: Any = None,
    *,
    log_y: bool = False,
    path: str | None = None,
    title: str | None = None,
) -> Any:
    """Plot φ(t) (optionally on a log y-axis, floored at 1e-8 of the peak); save to ``path`` if given.
    Returns the matplotlib figure."""
    import matplotlib

    if ax is None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5)) if ax is None else (ax.figure, ax)
    values = density.density
    if log_y:
        floor = max(values.max() * 1e-8, np.finfo(float).tiny)
        values = np.maximum(values, floor)
        ax.set_yscale("log")
    ax.plot(density.grid, values, lw=1.2)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.set_title(title or f"SLQ spectral density ({len(density.nodes)} probes, σ = {density.sigma:.2g})")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=150)
    return fig


@dataclass
class PowerIterationResult(ExtremesCertificate):
    """Extremes from power iteration, with the same residual certificate ||Av − μv|| as Lanczos;
    ``tol`` = atol, or rtol·|μ1| (μ1 the dominant eigenvalue: |λmax| when the top of the spectrum
    dominates)."""

    lambda_max: float
    lambda_min: float
    residual_max: float
    residual_min: float
    tol: float
    num_matvecs: int
    seconds: float
    history: list[list[tuple[float, float]]] = field(default_factory=list, repr=False)


def power_iteration_extremes(
    op: Any,
    max_iters: int = 100,
    seed: int = 0,
    *,
    rtol: float = 1e-3,
    atol: float | None = None,
    criterion: str = "residual",
) -> PowerIterationResult:
    """Both ends of the spectrum by power iteration, counting products: the baseline Lanczos is compared with.

    Phase 1 is PyHessian's method (Yao et al., IEEE BigData 2020; ``pyhessian/hessian.py``,
    ``hessian.eigenvalues``, which computes only top eigenvalues): v ← Av/||Av|| converges to the eigenvalue
    of largest magnitude μ1. Phase 2 is ours, not PyHessian's: power iteration on μ1·I − A, whose dominant
    eigenvalue is μ1 − (the other end of A's spectrum). Each iteration costs one product and yields the
    Rayleigh quotient μ = vᵀAv and residual ||Av − μv|| for free; each phase stops after ``max_iters``
    products at the latest.
    ``criterion="residual"`` stops when the residual is ≤ ``atol`` if given, else ≤ rtol·|μ1| (the
    certificate Lanczos uses); ``"relative_change"`` stops when |μ_{t−1} − μ_t| / (|μ_{t−1}| + 1e-6) < rtol
    (PyHessian's rule, with its ``tol`` = rtol, which certifies nothing). ``history`` holds, per phase, the
    (Rayleigh quotient of A, residual) of every iteration.
    """
    if criterion not in ("residual", "relative_change"):
        raise ValueError(f"criterion must be 'residual' or 'relative_change', got {criterion!r}")
    if max_iters < 1:
        raise ValueError(f"max_iters must be >= 1, got {max_iters}")
    dim, apply = as_matvec(op)
    rng = np.random.default_rng(seed)

    def stopper(scale: float | None):
        def stop(history: list[tuple[float, float]]) -> bool:
            mu, residual = history[-1]
            if criterion == "relative_change":
                previous = history[-2][0] if len(history) > 1 else None
                return previous is not None and abs(previous - mu) / (abs(previous) + 1e-6) < rtol
            return residual <= (atol if atol is not None else rtol * abs(mu if scale is None else scale))

        return stop

    clock = time.perf_counter()
    first = _power(apply, rng.standard_normal(dim), 0.0, 1.0, max_iters, stopper(None))
    mu1 = first[-1][0]
    second = _power(apply, rng.standard_normal(dim), mu1, -1.0, max_iters, stopper(abs(mu1)))
    history = [first, [(mu1 - nu, r) for nu, r in second]]
    (lo, r_lo), (hi, r_hi) = sorted([first[-1], history[1][-1]])
    tol = atol if atol is not None else rtol * abs(mu1)
    seconds = time.perf_counter() - clock
    return PowerIterationResult(hi, lo, r_hi, r_lo, tol, len(first) + len(second), seconds, history)


def _power(apply, v, shift, sign, max_iters, stop) -> list[tuple[float, float]]:
    """Power iteration on shift·I + sign·A; the (Rayleigh quotient, residual) of every iteration."""
    v = v / np.linalg.norm(v)
    history: list[tuple[float, float]] = []
    for _ in range(max_iters):
        u = shift * v + sign * apply(v)
        mu = float(v @ u)
        history.append((mu, float(np.linalg.norm(u - mu * v))))
        norm = np.linalg.norm(u)
        if stop(history) or norm == 0.0:
            break
        v = u / norm
    return history
