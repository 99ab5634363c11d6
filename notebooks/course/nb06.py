"""Checks for notebook 06 (projection discontinuity)."""

from __future__ import annotations

import numpy as np

from . import check_function, check_number


def _project(theta, theta0, scores, k):
    keep = np.zeros(len(theta), dtype=bool)
    keep[np.argsort(-np.asarray(scores), kind="stable")[:k]] = True
    return np.where(keep, theta, theta0)


def check_exercise_1(project) -> None:
    """project(theta, theta0, scores, k) on random vectors (distinct scores, so the top k is unique)."""
    rng = np.random.default_rng(7)
    cases = []
    for n, k in ((10, 3), (6, 1), (8, 8), (12, 5)):
        theta, theta0, scores = rng.normal(size=n), rng.normal(size=n), rng.permutation(n) + rng.uniform(0, 0.5, n)
        cases.append(((theta.copy(), theta0.copy(), scores.copy(), k), _project(theta, theta0, scores, k)))
    return check_function(1, project, cases, what="project",
                          compare=lambda got, want: np.shape(got) == want.shape and np.allclose(got, want),
                          hint="the k largest scores keep θ; every other entry takes θ0's value")


def check_exercise_2(answer, result) -> None:
    """Largest loss ratio across a projection."""
    losses = {q["step"]: q["loss"] for q in result["train_losses"]}
    ratios = [losses[s + 1] / losses[s] for s in result["structure_changes"] if s + 1 in losses and s in losses]
    return check_number(2, answer, max(ratios), rtol=1e-6, what="your ratio",
                        hint="after / before, i.e. losses[s + 1] / losses[s], maximised over the projection steps")
