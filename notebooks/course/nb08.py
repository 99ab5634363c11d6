"""Checks for notebook 08 (the proofs) and its assumption table."""

from __future__ import annotations

import math

import torch

from . import check_equal, check_number


def check_exercise_1(answer, g, lam, k) -> None:
    """min_Δ s_M(Δ) on SAM's mask: −Σ_{top k of g²} gᵢ² / (2|λmax|)."""
    g = torch.as_tensor(g, dtype=torch.float64)
    top = torch.topk(g**2, k).values
    expected = -float(top.sum()) / (2 * abs(lam))
    return check_number(1, answer, expected, rtol=1e-8, what="your minimum",
                        hint="the minimiser is Δᵢ = −gᵢ/|λmax| on the mask; plug it in (the value is negative)")


def check_exercise_2(answer, d, p) -> None:
    """E‖(I−M)v‖²/‖v‖² for uniform masks with exactly ⌊dp⌋ ones: 1 − k/d."""
    k = math.floor(d * p)
    expected = 1 - k / d
    if answer is not None and not isinstance(answer, str):
        try:
            if math.isclose(float(answer), 1 - p, rel_tol=1e-9) and not math.isclose(expected, 1 - p):
                return check_number(2, answer, expected, rtol=1e-9, what="your ratio",
                                    hint="that is 1 − p; with exactly k ones, P(Mᵢ = 1) = k/d")
        except (TypeError, ValueError):
            pass
    return check_number(2, answer, expected, rtol=1e-9, what="your ratio",
                        hint="by symmetry each entry is kept with probability k/d")


def check_exercise_3(answer, *, train_risk, C, n, beta, delta) -> None:
    """Bousquet & Elisseeff's bound with a given β."""
    expected = train_risk + math.sqrt((C**2 + 12 * C * n * beta) / (2 * n * delta))
    return check_number(3, answer, expected, rtol=1e-8, what="your bound",
                        hint="R̂ + √((C² + 12·C·n·β)/(2·n·δ)) with β = beta_hat")


def failed_checks(at) -> set[str]:
    """The names of the checks of exercise 4 that fail for the measurements ``at``."""
    failed = set()
    if at["grad_relaxed"] > 0.1 * at["grad_start"]:
        failed.add("stationary")
    if at["lambda_min"] < -at["psd_tol"]:
        failed.add("hessian_psd")
    if at["lambda_min"] + 2 * (1 - at["p"]) <= 0:
        failed.add("relaxed_strong_convexity")
    if at["mask_kept_loo"] < 1:
        failed.add("independent_mask")
    return failed


def check_exercise_4(answer, at) -> None:
    """The failing checks at A(S)."""
    return check_equal(4, answer, failed_checks(at), normalize=lambda s: {str(x).strip().lower() for x in s},
                       what="your set", hint="go through the four criteria one by one with the numbers in at_AS")


def assumption_table(at) -> str:
    """One line per assumption of Theorems 1-2: what was measured at A(S) and the verdict."""
    failed = failed_checks(at)
    mu = at["lambda_min"] + 2 * (1 - at["p"])
    rows = [
        ("A(S) minimises F_S = L + (1−p)||θ−θ0||²",
         f"||∇F_S(A(S))|| = {at['grad_relaxed']:.3g} vs ||∇L(θ0)|| = {at['grad_start']:.3g}",
         "fails" if "stationary" in failed else "holds (to 10%)"),
        ("∇²L(A(S)) ⪰ 0 on the mask",
         f"λmin = {at['lambda_min']:.4g} (residual {at['residual_min']:.2g}, τ = {at['psd_tol']:.2g})",
         "fails" if "hessian_psd" in failed else "not refuted"),
        ("Λmin + 2(1−p) > 0", f"{mu:.4g}", "fails" if "relaxed_strong_convexity" in failed else "holds"),
        ("Λmin of the whole Hessian", f"mask + head: {at['lambda_min_with_head']:.4g} ≤ mask: {at['lambda_min']:.4g}",
         "the mask's value is optimistic (interlacing)"),
        ("ℓ is ρ-Lipschitz", f"ρ̂ = {at['rho']:.4g} at A(S) only", "lower estimate, not a certificate"),
        ("0 ≤ ℓ ≤ C", f"largest loss: train {at['max_train_loss']:.3g}, test {at['max_test_loss']:.3g}",
         "fails: cross-entropy is unbounded"),
        ("M random, independent of S", f"one example out keeps {at['mask_kept_loo']:.1%} of SAM's mask",
         "fails" if "independent_mask" in failed else "holds as measured"),
        ("Theorem 1's conclusion", f"ε̂ = {at.get('epsilon', float('nan')):.4g} by retraining",
         "measured; the bound is vacuous" if "relaxed_strong_convexity" in failed else "compare with the bound"),
    ]
    width = [max(len(r[j]) for r in rows) for j in range(3)]
    lines = [f"{'assumption'.ljust(width[0])}  {'measured at A(S)'.ljust(width[1])}  verdict"]
    lines += [f"{a.ljust(width[0])}  {b.ljust(width[1])}  {c}" for a, b, c in rows]
    return "\n".join(lines)
