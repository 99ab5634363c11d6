"""Checks for notebook 03 (Hessian spectrum)."""

from __future__ import annotations

import numpy as np
import torch

from . import check_number


def check_exercise_1(answer, op) -> None:
    """Smallest number of Lanczos steps (seed 0) with both residuals below 1e-3·|λmax|."""
    from theory.lanczos import lanczos

    expected = None
    for steps in range(1, op.dim + 1):
        res = lanczos(op, steps, seed=0)
        if max(res.residual_max, res.residual_min) < 1e-3 * abs(res.lambda_max):
            expected = steps
            break
    return check_number(1, answer, expected, rtol=0, atol=0.5, what="your number of steps",
                        hint="loop over steps = 1, 2, ... and stop at the first where both residuals pass")


def check_exercise_2(answer, H) -> None:
    """λmin of the principal submatrix on the first k // 2 coordinates."""
    H = torch.as_tensor(H, dtype=torch.float64)
    half = H.shape[0] // 2
    sub = H[:half, :half]
    expected = float(torch.linalg.eigvalsh((sub + sub.T) / 2)[0])
    return check_number(2, answer, expected, rtol=1e-4, atol=1e-6, what="your λmin",
                        hint="H[:half, :half] with half = k // 2, then the smallest eigenvalue (eigvalsh)")


def check_exercise_3(answer, density) -> None:
    """Fraction of the SLQ density's mass below 0."""
    below = density.grid < 0
    expected = float(np.trapezoid(density.density[below], density.grid[below])
                     / np.trapezoid(density.density, density.grid))
    return check_number(3, answer, expected, rtol=0, atol=0.02, what="your fraction",
                        hint="integrate density over grid < 0 and divide by the integral over the whole grid")
