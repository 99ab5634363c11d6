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

Vacuity: if Λmin < 0 (beyond ``psd_tol``) the PSD assumption of Theorem 1 fails; if Λmin + 2(1−p) ≤ 0
the denominator vanishes. Either way the bound is ``math.inf`` and the report says which assumption
failed; ``formula_value`` keeps what the expression gives, for inspection only.

Example::

    stability_bound(rho=2.0, lambda_min=0.1, p=0.005, n=250)          # 0.0161...
    print(check_stability(measured=0.004, rho=2.0, lambda_min=0.1, p=0.005, n=250))
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

LOSS_SCALE = "mean loss per example"


@dataclass(frozen=True)
class BoundReport:
    """A bound's value (``math.inf`` when vacuous), why it is vacuous, and the inputs it used."""

    name: str
    value: float
    formula_value: float
    vacuous: bool
    reason: str
    failed_assumption: str | None
    inputs: dict = field(default_factory=dict)
    loss_scale: str = LOSS_SCALE

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        status = f"VACUOUS ({self.reason})" if self.vacuous else self.reason or "assumptions as checked hold"
        args = ", ".join(
            f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.inputs.items()
        )
        return f"{self.name} = {self.value:.6g}  [{args}; {self.loss_scale}]  {status}"


def stability_bound(rho: float, lambda_min: float, p: float, n: int, *, psd_tol: float = 0.0) -> float:
    """Theorem 1: 2ρ² / ((Λmin + 2(1−p))·n), or ``math.inf`` when vacuous (see the module docstring)."""
    return stability_bound_report(rho, lambda_min, p, n, psd_tol=psd_tol).value


def generalization_bound(
    empirical_risk: float,
    rho: float,
    lambda_min: float,
    p: float,
    n: int,
    C: float,
    delta: float,
    *,
    psd_tol: float = 0.0,
) -> float:
    """Theorem 2: R̂ + √((C² + 24Cρ²/(Λmin + 2(1−p))) / (2nδ)), or ``math.inf`` when vacuous."""
    return generalization_bound_report(empirical_risk, rho, lambda_min, p, n, C, delta, psd_tol=psd_tol).value


def stability_bound_report(
    rho: float, lambda_min: float, p: float, n: int, *, psd_tol: float = 0.0
) -> BoundReport:
    """Theorem 1 with its assumptions checked; see :class:`BoundReport`."""
    _check(rho=rho, lambda_min=lambda_min, p=p, n=n, psd_tol=psd_tol)
    denominator = lambda_min + 2 * (1 - p)
    formula = 2 * rho**2 / (denominator * n) if denominator > 0 else math.inf
    inputs = {"rho": float(rho), "lambda_min": float(lambda_min), "p": float(p), "n": int(n)}
    return _report("Theorem 1 stability bound", formula, denominator, lambda_min, psd_tol, inputs)


def generalization_bound_report(
    empirical_risk: float,
    rho: float,
    lambda_min: float,
    p: float,
    n: int,
    C: float,
    delta: float,
    *,
    psd_tol: float = 0.0,
) -> BoundReport:
    """Theorem 2 with its assumptions checked; a finite value ≥ C is valid but says nothing (the risk of
    a loss in [0, C] never exceeds C), which the report's reason notes."""
    _check(
        rho=rho,
        lambda_min=lambda_min,
        p=p,
        n=n,
        psd_tol=psd_tol,
        C=C,
        delta=delta,
        empirical_risk=empirical_risk,
    )
    denominator = lambda_min + 2 * (1 - p)
    if denominator > 0:
        formula = empirical_risk + math.sqrt((C**2 + 24 * C * rho**2 / denominator) / (2 * n * delta))
    else:
        formula = math.inf
    inputs = {
        "empirical_risk": float(empirical_risk),
        "rho": float(rho),
        "lambda_min": float(lambda_min),
        "p": float(p),
        "n": int(n),
        "C": float(C),
        "delta": float(delta),
    }
    report = _report("Theorem 2 generalization bound", formula, denominator, lambda_min, psd_tol, inputs)
    if not report.vacuous and report.value >= C:
        report = BoundReport(
            report.name,
            report.value,
            formula,
            False,
            f"uninformative: the bound {report.value:.4g} is ≥ C = {C:.4g}, the largest possible risk",
            None,
            inputs,
        )
    return report


def _report(name, formula, denominator, lambda_min, psd_tol, inputs) -> BoundReport:
    if lambda_min < -psd_tol:
        reason = (
            f"the Hessian is not PSD (lambda_min = {lambda_min:.4g} < -psd_tol = {-psd_tol:.4g}); "
            "Theorem 1 assumes the Hessian of L at A(S) is positive semi-definite"
        )
        return BoundReport(name, math.inf, formula, True, reason, "hessian_psd", inputs)
    if denominator <= 0:
        reason = (
            f"lambda_min + 2(1-p) = {denominator:.4g} <= 0: the relaxed objective is not strongly "
            "convex at A(S), the denominator vanishes"
        )
        return BoundReport(name, math.inf, formula, True, reason, "positive_denominator", inputs)
    return BoundReport(name, formula, formula, False, "", None, inputs)


def _check(*, rho, lambda_min, p, n, psd_tol, C=None, delta=None, empirical_risk=None) -> None:
    """All input validation of this module: ranges as the theorems state them."""

    def real(name, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite real number, got {value!r}")

    for name, value in (("rho", rho), ("lambda_min", lambda_min), ("p", p), ("psd_tol", psd_tol)):
        real(name, value)
    if rho < 0:
        raise ValueError(f"rho must be >= 0 (a gradient norm), got {rho}")
    if not 0 < p <= 1:
        raise ValueError(f"p must lie in (0, 1] (the fraction of tunable entries), got {p}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1 (the training-set size), got {n!r}")
    if psd_tol < 0:
        raise ValueError(f"psd_tol must be >= 0, got {psd_tol}")
    if C is not None:
        real("C", C)
        if C <= 0:
            raise ValueError(f"C must be > 0 (the loss lies in [0, C]), got {C}")
        real("delta", delta)
        if not 0 < delta < 1:
            raise ValueError(f"delta must lie in (0, 1) (the failure probability), got {delta}")
        real("empirical_risk", empirical_risk)
        if not 0 <= empirical_risk <= C:
            raise ValueError(
                f"empirical_risk must lie in [0, C] = [0, {C}] (a loss bounded by C), got {empirical_risk}"
            )


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
    psd_tol: float = 0.0,
) -> BoundCheck:
    """Measured pointwise hypothesis stability ε̂ against Theorem 1 (ε̂ and its confidence interval from
    :func:`theory.stability.pointwise_hypothesis_stability`)."""
    report = stability_bound_report(rho, lambda_min, p, n, psd_tol=psd_tol)
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
    *,
    psd_tol: float = 0.0,
) -> BoundCheck:
    """A held-out estimate of the risk R(A, S) (mean test loss) against Theorem 2."""
    report = generalization_bound_report(empirical_risk, rho, lambda_min, p, n, C, delta, psd_tol=psd_tol)
    return BoundCheck("risk (held-out mean loss)", float(measured_risk), report)


def _fmt(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)
