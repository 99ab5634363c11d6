"""Checks for notebook 05 (sparsity sweep)."""

from __future__ import annotations

import numpy as np
import torch

from . import _report, check_number, unanswered


def check_exercise_1(answer, values) -> None:
    """(mean, sample std) of the seed scores."""
    if unanswered(answer):
        return _report(1, None)
    try:
        mean, std = (float(v) for v in answer)
    except (TypeError, ValueError) as err:
        return _report(1, False, f"expected a pair (mean, std) of numbers ({err})")
    values = np.asarray(values, dtype=float)
    if not np.isclose(mean, values.mean(), rtol=1e-6, atol=1e-9):
        return _report(1, False, f"the mean {mean:.4g} is off")
    if np.isclose(std, values.std(ddof=0), rtol=1e-6, atol=1e-9) and not np.isclose(values.std(ddof=0), values.std(ddof=1)):
        return _report(1, False, "that is the population std (ddof=0); the paper reports the sample std (ddof=1)")
    return check_number(1, std, float(values.std(ddof=1)), rtol=1e-6, atol=1e-9, what="your std")


def check_exercise_2(answer, gradient_scores, small_p, large_p) -> None:
    """Fraction of the small-p SAM mask inside the large-p mask."""
    from sparse_ft.methods import make_method_config

    small, _ = make_method_config("sam", small_p).select_from_scores(gradient_scores)
    large, _ = make_method_config("sam", large_p).select_from_scores(gradient_scores)
    inside = sum(int(torch.isin(idx.cpu(), large[name].cpu()).sum()) for name, idx in small.items() if name in large)
    expected = inside / sum(len(idx) for idx in small.values())
    return check_number(2, answer, expected, rtol=1e-6, what="your fraction",
                        hint="count, tensor by tensor, the small mask's indices found in the large mask (torch.isin)")
