"""Checks for notebook 02 (SAM and Theorem 3)."""

from __future__ import annotations

import itertools

import numpy as np

from . import check_equal, check_function, check_number


def _brute_force_isotropic(g, k, lam):
    def value(S):
        S = list(S)
        return -0.5 * float(g[S] @ g[S]) / lam

    return tuple(sorted(min(itertools.combinations(range(len(g)), k), key=value)))


def check_exercise_1(sam_support) -> None:
    """sam_support(g, k) against brute force on isotropic quadratics (where Theorem 3 is exact)."""
    rng = np.random.default_rng(123)
    cases = []
    for n, k in ((8, 2), (10, 3), (12, 4), (6, 1)):
        g = rng.normal(size=n)
        cases.append(((g.copy(), k), _brute_force_isotropic(g, k, lam=rng.uniform(0.5, 5.0))))
    return check_function(1, sam_support, cases, what="sam_support",
                          compare=lambda got, want: tuple(sorted(int(i) for i in got)) == want,
                          hint="rank the coordinates by g**2, largest first, keep k of them")


def check_exercise_2(answer, p: float) -> None:
    """Expected Jaccard index of two independent uniform masks of density p: p / (2 − p)."""
    return check_number(2, answer, p / (2 - p), rtol=1e-3, what="your Jaccard",
                        hint="|A∪B| = |A| + |B| − |A∩B|; p/2 is close but not it")


def check_exercise_3(answer, G) -> None:
    """(SAM's coordinate, Fisher's coordinate) for per-example gradients G."""
    G = np.asarray(G)
    expected = (int(np.argmax(G.mean(0) ** 2)), int(np.argmax((G**2).mean(0))))
    return check_equal(3, answer, expected, normalize=lambda v: tuple(int(i) for i in v), what="your pair",
                       hint="SAM squares the mean gradient; Fisher averages the squared gradients")
