"""Theorems 1 and 2 of Fu et al. (AAAI 2023), with their assumptions checked instead of clipped.

The sparse fine-tuned model minimises the relaxed objective E_M[L(θ) + ||(I−M)(θ−θ0)||²] =
L(θ) + (1−p)||θ−θ0||² (M a random mask keeping a fraction p of the entries), whose Hessian is
∇²L + 2(1−p)I. With ℓ ρ-Lipschitz and ∇²L(A(S)) positive semi-definite with smallest eigenvalue Λmin:

* **Theorem 1** (pointwise hypothesis stability, Bousquet & Elisseeff 2002, Def. 2):
  E_S|ℓ(A(Sⁱ), z_i) − ℓ(A(S), z_i)| ≤ 2ρ² / ((Λmin + 2(1−p))·n).
* **Theorem 2** (generalisation, through Bousquet & Elisseeff 2002, Thm. 11, for a loss in [0, C]): with
  probability ≥ 1−δ, R(A, S) ≤ R̂(A, S) + √((C² + 24Cρ²/(Λmin + 2(1−p))) / (2nδ)).

Every quantity refers to the **mean loss** (per example, the scale of ``loss_fn``), Λmin to the Hessian of
that mean loss on the tunable coordinates (:class:`theory.hessian.HessianOperator`), ρ to per-example
gradient norms on the same coordinates (:mod:`theory.lipschitz`).

Assumptions, reported separately (DESIGN §6 "Bounds"):

* **strict PSD**, the hypothesis Theorem 1 states: ∇²L(A(S)) ⪰ 0, i.e. Λmin ≥ 0. Judged with a tolerance
  τ (:func:`psd_tolerance`): ``psd`` is False only when the measurement shows a negative eigenvalue,
  Λmin < −τ with τ = r_min + 100·u·max(|λmax|, |Λmin|): the bottom Ritz value's residual r_min (some
  eigenvalue of the operator lies within r_min of it) plus the Hessian-vector products' rounding (u the
  unit roundoff of the model's dtype, float32 by default; Weyl's inequality moves every eigenvalue by
  at most the operator's error, which is a modest multiple of u·||H||).
* **relaxed**: the relaxed objective's Hessian ∇²L + 2(1−p)I is positive definite, ⇔ Λmin + 2(1−p) > 0,
  the denominator of both bounds.

**Which one decides** ``vacuous`` (and the returned value): the relaxed one, by default. The proof of
Theorem 1 expands the relaxed objective L(θ) + (1−p)||θ−θ0||², stationary at A(S), to second order and uses
its strong convexity with modulus Λmin + 2(1−p) to bound ||A(Sⁱ) − A(S)||; PSD of ∇²L alone is sufficient
for that modulus to be positive when p < 1 but is not what the argument needs. Near a converged A(S) the
Hessian of L is typically slightly indefinite (MiniLM on CB: Λmin = −0.0021 against λmax = 0.021, Ritz
residual 9e-8) while Λmin + 2(1−p) ≈ 1.99: the strict reading calls that vacuous, the relaxed one gives
the bound the proof supports, and the report carries both verdicts. ``require_psd=True`` makes the strict
hypothesis decide as well (the theorem as stated). When the deciding assumption fails the bound is
``math.inf`` (``value`` None in :meth:`BoundReport.to_dict`, never inf in JSON) and ``failed_assumption``
names it: ``"relaxed_strong_convexity"`` or ``"hessian_psd"``; ``formula_value`` keeps what the expression
gives for a positive denominator, for inspection only.

Both verdicts are only as good as Λmin: a Ritz value is ≥ the true λmin, so an unconverged Λmin is too
high and can make either verdict pass wrongly (use :func:`theory.lanczos.extreme_eigenvalues`).

Example::

    stability_bound(rho=2.0, lambda_min=0.1, p=0.005, n=250)          # 8 / 522.5 = 0.0153...
    print(check_stability(measured=0.004, rho=2.0, lambda_min=0.1, p=0.005, n=250))
    stability_bound_report(1.0, -0.0021, 0.005, 250, residual_min=9e-8, lambda_max=0.021).to_dict()
    # {'value': 0.00402..., 'vacuous': False, 'failed_assumption': None, 'psd': False,
    #  'relaxed_positive': True, 'decided_by': 'relaxed', ...}
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

LOSS_SCALE = "mean loss per example"
FLOAT32_EPS = 2.0**-23
ROUNDING_FACTOR = 100.0
RELAXED, HESSIAN_PSD = "relaxed_strong_convexity", "hessian_psd"


def psd_tolerance(
    residual_min: float = 0.0, lambda_max: float = 0.0, lambda_min: float = 0.0, eps: float = FLOAT32_EPS
) -> float:
    """τ = residual_min + 100·eps·max(|λmax|, |λmin|): how far below 0 a measured Λmin may lie and still
    not refute ∇²L ⪰ 0 (module docstring). ``residual_min``: the bottom Ritz value's residual (0 if
    unknown); ``eps``: unit roundoff of the Hessian-vector products' dtype (float32's 2⁻²³ by default,
    2⁻⁵² for a float64 model). For MiniLM/CB (r = 9e-8, λmax = 0.021, float32): τ ≈ 3.4e-7."""
    return float(residual_min) + ROUNDING_FACTOR * float(eps) * max(abs(lambda_max), abs(lambda_min))


@dataclass(frozen=True)
class BoundReport:
    """A bound's value (``math.inf`` when vacuous) with both assumption verdicts and the inputs used.

    ``psd`` (Λmin ≥ −``psd_tol``) and ``relaxed_positive`` (``relaxed_curvature`` = Λmin + 2(1−p) > 0) are
    the two verdicts; ``decided_by`` ("relaxed" or "strict_psd") says which decided ``vacuous``, and
    ``failed_assumption`` names the one that failed (None when the bound holds). :meth:`to_dict` is
    JSON-ready (no inf)."""

    name: str
    value: float
    formula_value: float
    vacuous: bool
    reason: str
    failed_assumption: str | None
    inputs: dict = field(default_factory=dict)
    loss_scale: str = LOSS_SCALE
    psd: bool = True
    psd_tol: float = 0.0
    relaxed_positive: bool = True
    relaxed_curvature: float = math.nan
    decided_by: str = "relaxed"

    def to_dict(self) -> dict:
        """{name, value (None when vacuous), vacuous, failed_assumption, decided_by, formula_value (None
        when the denominator is ≤ 0), psd, psd_tol, relaxed_positive, relaxed_curvature, verdicts
        {strict_psd, relaxed: {holds, condition, value}}, reason, inputs, loss_scale}."""
        out = {k: _finite(v) for k, v in asdict(self).items()}
        formula = _finite(self.formula_value)
        out["verdicts"] = {
            "strict_psd": {
                "holds": self.psd,
                "condition": "lambda_min >= -psd_tol",
                "value": formula if self.psd and self.relaxed_positive else None,
            },
            "relaxed": {
                "holds": self.relaxed_positive,
                "condition": "lambda_min + 2(1-p) > 0",
                "value": formula if self.relaxed_positive else None,
            },
        }
        return out

    def __str__(self) -> str:
        status = f"VACUOUS ({self.reason})" if self.vacuous else self.reason or "assumptions as checked hold"
        args = ", ".join(
            f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.inputs.items()
        )
        verdicts = (
            f"strict PSD {'holds' if self.psd else 'fails'} (tol {self.psd_tol:.2g}), relaxed "
            f"{'holds' if self.relaxed_positive else 'fails'} (lambda_min + 2(1-p) = "
            f"{self.relaxed_curvature:.4g}), decided by {self.decided_by}"
        )
        return f"{self.name} = {self.value:.6g}  [{args}; {self.loss_scale}]  {status}  [{verdicts}]"


def stability_bound(rho: float, lambda_min: float, p: float, n: int, **assumptions) -> float:
    """Theorem 1: 2ρ² / ((Λmin + 2(1−p))·n), or ``math.inf`` when vacuous (see the module docstring);
    ``assumptions``: the keyword options of :func:`stability_bound_report`."""
    return stability_bound_report(rho, lambda_min, p, n, **assumptions).value


def generalization_bound(
    empirical_risk: float,
    rho: float,
    lambda_min: float,
    p: float,
    n: int,
    C: float,
    delta: float,
    **assumptions,
) -> float:
    """Theorem 2: R̂ + √((C² + 24Cρ²/(Λmin + 2(1−p))) / (2nδ)), or ``math.inf`` when vacuous;
    ``assumptions``: the keyword options of :func:`stability_bound_report`."""
    return generalization_bound_report(empirical_risk, rho, lambda_min, p, n, C, delta, **assumptions).value


def stability_bound_report(
    rho: float,
    lambda_min: float,
    p: float,
    n: int,
    *,
    psd_tol: float | None = None,
    residual_min: float = 0.0,
    lambda_max: float | None = None,
    eps: float = FLOAT32_EPS,
    require_psd: bool = False,
) -> BoundReport:
    """Theorem 1 with both assumptions checked; see :class:`BoundReport` and the module docstring.

    Args:
        rho, lambda_min, p, n: ρ, Λmin (mean-loss Hessian on the tunable coordinates), sparsity, |S|.
        psd_tol: the strict-PSD tolerance τ; default :func:`psd_tolerance` of ``residual_min``,
            ``lambda_max`` (Λmin's magnitude if None) and ``eps``.
        residual_min, lambda_max, eps: Λmin's Ritz residual, the top eigenvalue, the HVPs' unit roundoff.
        require_psd: let the strict PSD verdict decide ``vacuous`` too (default: the relaxed one alone).
    """
    options = _check(rho, lambda_min, p, n, psd_tol, residual_min, lambda_max, eps, require_psd)
    denominator = lambda_min + 2 * (1 - p)
    formula = 2 * rho**2 / (denominator * n) if denominator > 0 else math.inf
    inputs = {"rho": float(rho), "lambda_min": float(lambda_min), "p": float(p), "n": int(n)}
    return _report("Theorem 1 stability bound", formula, denominator, lambda_min, inputs, *options)


def generalization_bound_report(
    empirical_risk: float,
    rho: float,
    lambda_min: float,
    p: float,
    n: int,
    C: float,
    delta: float,
    **assumptions,
) -> BoundReport:
    """Theorem 2 with its assumptions checked (the same two as Theorem 1, whose stability it uses;
    ``assumptions``: the keyword options of :func:`stability_bound_report`). A finite value ≥ C is valid but
    says nothing (the risk of a loss in [0, C] never exceeds C), which the report's reason notes."""
    _check_risk(C, delta, empirical_risk)
    base = stability_bound_report(rho, lambda_min, p, n, **assumptions)
    denominator = lambda_min + 2 * (1 - p)
    if denominator > 0:
        formula = empirical_risk + math.sqrt((C**2 + 24 * C * rho**2 / denominator) / (2 * n * delta))
    else:
        formula = math.inf
    inputs = {"empirical_risk": float(empirical_risk), **base.inputs, "C": float(C), "delta": float(delta)}
    report = replace(
        base,
        name="Theorem 2 generalization bound",
        value=math.inf if base.vacuous else formula,
        formula_value=formula,
        inputs=inputs,
    )
    if not report.vacuous and report.value >= C:
        note = f"uninformative: the bound {report.value:.4g} is ≥ C = {C:.4g}, the largest possible risk"
        report = replace(report, reason="; ".join(filter(None, [note, report.reason])))
    return report


def _report(name, formula, denominator, lambda_min, inputs, psd_tol, require_psd) -> BoundReport:
    """Both verdicts, the deciding one, the value and the reason."""
    psd = lambda_min >= -psd_tol
    relaxed = denominator > 0
    decided_by = "strict_psd" if require_psd else "relaxed"
    psd_text = (
        f"the Hessian is not PSD (lambda_min = {lambda_min:.4g} < -psd_tol = {-psd_tol:.4g}), "
        "the hypothesis Theorem 1 states"
    )
    if not relaxed:
        failed = RELAXED
        reason = (
            f"lambda_min + 2(1-p) = {denominator:.4g} <= 0: the relaxed objective is not strongly "
            "convex where lambda_min was measured (Theorem 1 needs it at A(S)), the denominator vanishes"
        )
    elif require_psd and not psd:
        failed, reason = HESSIAN_PSD, psd_text + " (require_psd=True)"
    else:
        failed = None
        reason = (
            ""
            if psd
            else psd_text + f"; the bound stands on the relaxed objective's strong convexity "
            f"(lambda_min + 2(1-p) = {denominator:.4g} > 0), which is what its proof uses"
        )
    return BoundReport(
        name,
        math.inf if failed else formula,
        formula,
        failed is not None,
        reason,
        failed,
        inputs,
        psd=psd,
        psd_tol=float(psd_tol),
        relaxed_positive=relaxed,
        relaxed_curvature=float(denominator),
        decided_by=decided_by,
    )


def _real(name, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")


def _check(rho, lambda_min, p, n, psd_tol, residual_min, lambda_max, eps, require_psd):
    """All input validation of Theorem 1's inputs (ranges as the theorem states them); returns
    ``(psd_tol, require_psd)`` with the default tolerance filled in."""
    for name, value in (("rho", rho), ("lambda_min", lambda_min), ("p", p), ("residual_min", residual_min)):
        _real(name, value)
    if rho < 0:
        raise ValueError(f"rho must be >= 0 (a gradient norm), got {rho}")
    if not 0 < p <= 1:
        raise ValueError(f"p must lie in (0, 1] (the fraction of tunable entries), got {p}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1 (the training-set size), got {n!r}")
    if residual_min < 0:
        raise ValueError(f"residual_min must be >= 0, got {residual_min}")
    if lambda_max is not None:
        _real("lambda_max", lambda_max)
    _real("eps", eps)
    if not 0 <= eps < 1:
        raise ValueError(f"eps must lie in [0, 1) (a unit roundoff), got {eps}")
    if not isinstance(require_psd, bool):
        raise TypeError(f"require_psd must be True or False, got {require_psd!r}")
    if psd_tol is None:
        psd_tol = psd_tolerance(
            residual_min, lambda_min if lambda_max is None else lambda_max, lambda_min, eps
        )
    _real("psd_tol", psd_tol)
    if psd_tol < 0:
        raise ValueError(f"psd_tol must be >= 0, got {psd_tol}")
    return float(psd_tol), require_psd


def _check_risk(C, delta, empirical_risk) -> None:
    """Theorem 2's extra inputs: a loss in [0, C], a failure probability δ in (0, 1)."""
    _real("C", C)
    if C <= 0:
        raise ValueError(f"C must be > 0 (the loss lies in [0, C]), got {C}")
    _real("delta", delta)
    if not 0 < delta < 1:
        raise ValueError(f"delta must lie in (0, 1) (the failure probability), got {delta}")
    _real("empirical_risk", empirical_risk)
    if not 0 <= empirical_risk <= C:
        raise ValueError(
            f"empirical_risk must lie in [0, C] = [0, {C}] (a loss bounded by C), got {empirical_risk}"
        )


def _finite(value):
    """inf / nan -> None (JSON has neither); everything else unchanged."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


@dataclass(frozen=True)
class BoundCheck:
    """A measured quantity next to its bound, with a verdict: "holds", "violated" or "vacuous"."""

    quantity: str
    measured: float
    bound: BoundReport
    measured_ci: tuple[float, float] | None = None

    @property
    def verdict(self) -> str:
        if self.bound.vacuous:
            return "vacuous"
        return "holds" if self.measured <= self.bound.value else "violated"

    @property
    def note(self) -> str:
        if (
            self.verdict == "holds"
            and self.measured_ci is not None
            and self.measured_ci[1] > self.bound.value
        ):
            return "the point estimate is within the bound but the upper confidence limit is not"
        return self.bound.reason

    def to_dict(self) -> dict:
        return {
            "quantity": self.quantity,
            "measured": self.measured,
            "measured_ci": self.measured_ci,
            "verdict": self.verdict,
            "note": self.note,
            "bound": self.bound.to_dict(),
        }

    def __str__(self) -> str:
        rows = [(self.quantity + " (measured)", _fmt(self.measured))]
        if self.measured_ci is not None:
            rows.append(
                ("  confidence interval", f"[{_fmt(self.measured_ci[0])}, {_fmt(self.measured_ci[1])}]")
            )
        rows.append((self.bound.name, _fmt(self.bound.value)))
        rows += [(f"  {k}", _fmt(v)) for k, v in self.bound.inputs.items()]
        rows += [("loss scale", self.bound.loss_scale), ("verdict", self.verdict)]
        if self.note:
            rows.append(("note", self.note))
        width = max(len(r[0]) for r in rows)
        return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def check_stability(
    measured: float,
    rho: float,
    lambda_min: float,
    p: float,
    n: int,
    *,
    ci: tuple[float, float] | None = None,
    **assumptions,
) -> BoundCheck:
    """Measured pointwise hypothesis stability ε̂ against Theorem 1 (ε̂ and its confidence interval from
    :func:`theory.stability.pointwise_hypothesis_stability`); ``assumptions``: the keyword options of
    :func:`stability_bound_report`."""
    report = stability_bound_report(rho, lambda_min, p, n, **assumptions)
    return BoundCheck("pointwise hypothesis stability", float(measured), report, ci)


def check_generalization(
    measured_risk: float,
    empirical_risk: float,
    rho: float,
    lambda_min: float,
    p: float,
    n: int,
    C: float,
    delta: float,
    **assumptions,
) -> BoundCheck:
    """A held-out estimate of the risk R(A, S) (mean test loss) against Theorem 2; ``assumptions``: the
    keyword options of :func:`stability_bound_report`."""
    report = generalization_bound_report(empirical_risk, rho, lambda_min, p, n, C, delta, **assumptions)
    return BoundCheck("risk (held-out mean loss)", float(measured_risk), report)


def _fmt(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)
