"""Lanczos, SLQ and power iteration against dense eigendecompositions with known spectra."""

import json

import numpy as np
import pytest
import torch

from tests.theory.helpers import mlp_loss, reference_hessian
from theory.hessian import HessianOperator
from theory.lanczos import (
    dense_cross_check,
    extreme_eigenvalues,
    lanczos,
    plot_density,
    power_iteration_extremes,
    slq_density,
)
from theory.operators import DenseOperator


def matrix_with_spectrum(eigenvalues, seed=0):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((len(eigenvalues), len(eigenvalues))))
    return (q * eigenvalues) @ q.T


def spectrum(n=300, seed=0):
    rng = np.random.default_rng(seed)
    bulk = np.concatenate([rng.normal(0.0, 0.3, n - 40), rng.normal(2.0, 0.2, 30)])
    outliers = np.array([12.0, 9.0, 7.5, 6.0, 5.0, -3.0, -2.5, -2.0, -1.8, -1.6])
    return np.sort(np.concatenate([bulk, outliers]))


def test_full_krylov_space_recovers_every_eigenvalue():
    ev = spectrum(60)
    res = lanczos(DenseOperator(torch.from_numpy(matrix_with_spectrum(ev))), num_steps=60)
    assert res.num_matvecs == 60
    np.testing.assert_allclose(res.ritz_values, ev, rtol=1e-8, atol=1e-8 * abs(ev).max())
    assert abs(res.lambda_max - ev[-1]) <= 1e-8 * abs(ev[-1])
    assert abs(res.lambda_min - ev[0]) <= 1e-8 * abs(ev[-1])
    assert res.converged and np.all(np.diff(res.ritz_values) >= 0)


def test_hessian_extremes_match_dense_eigh(mlp, mlp_batches):
    names = [n for n, _ in mlp.named_parameters()]
    ev = np.linalg.eigvalsh(reference_hessian(mlp, mlp_loss, mlp_batches, names).numpy())
    op = HessianOperator(mlp, mlp_loss, mlp_batches, hvp_backend="double_backward")
    res = lanczos(op, num_steps=op.dim, seed=1)
    scale = abs(ev).max()
    assert abs(res.lambda_max - ev[-1]) <= 1e-8 * scale
    assert abs(res.lambda_min - ev[0]) <= 1e-8 * scale
    assert res.num_matvecs == op.num_matvecs <= op.dim
    short = lanczos(op, num_steps=30, seed=1)
    check = dense_cross_check(op, short)
    assert check["lambda_max"] == pytest.approx(ev[-1], rel=1e-10)
    if short.converged_max:
        assert check["error_max"] <= short.residual_max + 1e-12


def test_residuals_are_the_ritz_pair_residuals_and_certify_convergence():
    ev = spectrum()
    a = matrix_with_spectrum(ev)
    res = lanczos(a, num_steps=40, seed=3, return_vectors=True)
    for i in (0, 1, -2, -1):
        y = res.ritz_vectors[:, i]
        np.testing.assert_allclose(
            np.linalg.norm(a @ y - res.ritz_values[i] * y), res.residuals[i], rtol=1e-6, atol=1e-10
        )
    assert res.converged_max and res.converged_min
    assert res.tol == pytest.approx(1e-3 * abs(res.lambda_max))
    assert abs(res.lambda_max - ev[-1]) <= res.residual_max + 1e-12
    assert abs(res.lambda_min - ev[0]) <= res.residual_min + 1e-12
    # Ritz values stay inside the spectrum, so an early stop errs inwards
    early = lanczos(a, num_steps=4, seed=3)
    assert ev[0] - 1e-12 <= early.lambda_min and early.lambda_max <= ev[-1] + 1e-12
    assert not early.converged and "NOT converged" in str(early)


def test_stop_when_converged_and_caps():
    a = matrix_with_spectrum(spectrum())
    full = lanczos(a, num_steps=80)
    early = lanczos(a, num_steps=80, stop_when_converged=True)
    assert early.converged and early.num_matvecs < full.num_matvecs
    assert lanczos(np.diag([1.0, 2.0, 3.0]), num_steps=10).num_matvecs <= 3
    assert lanczos(np.diag([1.0, 2.0, 3.0]), num_steps=1, atol=10.0).converged


def test_breakdown_on_an_invariant_subspace():
    ev = np.repeat([-1.0, 0.5, 4.0], 20)
    res = lanczos(matrix_with_spectrum(ev), num_steps=30, start="gaussian")
    assert res.breakdown and res.num_steps == 3
    np.testing.assert_allclose(res.ritz_values, [-1.0, 0.5, 4.0], atol=1e-10)
    assert res.residuals.max() < 1e-8


def test_float32_operator_and_input_checks():
    ev = spectrum(100)
    op = DenseOperator(torch.from_numpy(matrix_with_spectrum(ev)).float())
    res = lanczos(op, num_steps=100)
    assert abs(res.lambda_max - ev[-1]) < 1e-4 * ev[-1]
    with pytest.raises(ValueError, match="num_steps"):
        lanczos(op, 0)
    with pytest.raises(ValueError, match="start"):
        lanczos(op, 5, start="uniform")
    with pytest.raises(TypeError, match="operator"):
        lanczos(object(), 5)


def test_slq_density_integrates_to_one_and_matches_the_known_spectrum(tmp_path):
    ev = spectrum(400, seed=1)
    a = matrix_with_spectrum(ev, seed=1)
    sigma = 0.25
    dens = slq_density(a, num_probes=8, num_steps=60, seed=0, sigma=sigma, num_points=2000)
    assert dens.integral() == pytest.approx(1.0, abs=1e-6)
    assert dens.num_matvecs == 8 * 60
    for w in dens.weights:
        assert w.sum() == pytest.approx(1.0, abs=1e-10)
    # the exact smoothed density (1/k) Σ N(t; λ_j, σ²) on the same grid
    z = (dens.grid[:, None] - ev[None, :]) / sigma
    exact = (np.exp(-0.5 * z**2) / (sigma * np.sqrt(2 * np.pi))).mean(axis=1)
    assert np.trapezoid(np.abs(dens.density - exact), dens.grid) < 0.1
    # histogram masses with unit bins
    edges = np.arange(-4.0, 14.0, 1.0)
    counts = np.histogram(ev, bins=edges)[0] / len(ev)
    cdf = np.concatenate([[0.0], np.cumsum((dens.density[1:] + dens.density[:-1]) / 2 * np.diff(dens.grid))])
    masses = np.diff(np.interp(edges, dens.grid, cdf))
    assert np.abs(masses - counts).max() < 0.06
    fig = plot_density(dens, log_y=True, path=tmp_path / "density.png")
    assert (tmp_path / "density.png").stat().st_size > 0
    assert fig.axes[0].get_yscale() == "log"


def test_power_iteration_baseline_finds_the_same_extremes():
    ev = spectrum(200)
    a = matrix_with_spectrum(ev)
    power = power_iteration_extremes(a, max_iters=1000, rtol=1e-4)
    lz = lanczos(a, num_steps=60)
    assert power.converged
    assert power.lambda_max == pytest.approx(lz.lambda_max, rel=1e-3)
    assert power.lambda_min == pytest.approx(lz.lambda_min, rel=1e-3)
    assert power.num_matvecs > lz.num_matvecs
    pyhessian = power_iteration_extremes(a, max_iters=1000, criterion="relative_change")
    assert pyhessian.num_matvecs < power.num_matvecs
    same_certificate = power_iteration_extremes(a, max_iters=1000, atol=lz.tol)
    assert same_certificate.tol == lz.tol and same_certificate.converged
    assert len(same_certificate.history) == 2 and same_certificate.history[0][-1][1] <= lz.tol
    capped = power_iteration_extremes(a, max_iters=3)
    assert capped.num_matvecs == 6 and not capped.converged
    # negative-dominant spectrum: phase 1 finds λmin, phase 2 the top
    neg = power_iteration_extremes(-a, max_iters=1000, rtol=1e-4)
    assert neg.lambda_min == pytest.approx(-ev[-1], rel=1e-3) and neg.lambda_max == pytest.approx(
        -ev[0], rel=1e-3
    )


def test_extreme_eigenvalues_over_random_starts_bracket_and_agree():
    ev = spectrum()
    a = matrix_with_spectrum(ev)
    ext = extreme_eigenvalues(a, num_steps=60, starts=3, seed=4)
    assert len(ext.runs) == 3 and ext.seeds == [4, 5, 6] and ext.num_matvecs == 180
    assert ext.lambda_max == max(r.lambda_max for r in ext.runs)
    assert ext.lambda_min == min(r.lambda_min for r in ext.runs)
    # bracket: Ritz values lie inside the spectrum; localisation: within the residual of an eigenvalue
    assert ext.lambda_max <= ev[-1] + 1e-12 and ext.lambda_min >= ev[0] - 1e-12
    assert ev[-1] - ext.lambda_max <= ext.residual_max + 1e-12
    assert ext.lambda_min - ev[0] <= ext.residual_min + 1e-12
    assert ext.converged and ext.agree and "starts agree" in str(ext)
    d = ext.to_dict()
    assert json.loads(json.dumps(d)) == d and len(d["starts"]) == 3 and d["agree_max"] is True
    # the one-start interface is unchanged
    one = lanczos(a, 60, seed=4)
    assert one.lambda_max == ext.runs[0].lambda_max and one.ritz_values[0] == one.lambda_min


def test_a_converged_ritz_value_need_not_be_the_extreme_and_disagreement_says_so():
    ev = spectrum()
    a = np.diag(ev)  # eigenvectors = coordinate vectors, so a zero start entry stays exactly zero
    rng = np.random.default_rng(0)
    blind = rng.standard_normal(len(ev))
    blind[-1] = 0.0  # no component on the top eigenvector
    alone = lanczos(a, 40, start=blind)
    # certified: some eigenvalue (9.0, the second largest) within the tiny residual, but not λmax = 12
    assert alone.converged_max and abs(alone.lambda_max - ev[-2]) <= alone.residual_max + 1e-9
    assert ev[-1] - alone.lambda_max > 2.9
    ext = extreme_eigenvalues(a, 40, starts=[blind, rng.standard_normal(len(ev))])
    assert ext.seeds == [None, None] and ext.lambda_max == pytest.approx(ev[-1], abs=1e-8)
    assert not ext.agree_max and ext.agree_min and "DISAGREE" in str(ext)
    with pytest.raises(ValueError, match="starts"):
        extreme_eigenvalues(a, 10, starts=0)


def test_extreme_eigenvalues_of_a_hessian_match_dense_eigh(mlp, mlp_batches):
    names = ["2.weight", "2.bias"]
    ev = np.linalg.eigvalsh(reference_hessian(mlp, mlp_loss, mlp_batches, names).numpy())
    op = HessianOperator(mlp, mlp_loss, mlp_batches, names, hvp_backend="double_backward")
    ext = extreme_eigenvalues(op, num_steps=op.dim, starts=2, seed=0)
    assert abs(ext.lambda_max - ev[-1]) <= 1e-8 * abs(ev).max() and ext.agree
    assert abs(ext.lambda_min - ev[0]) <= 1e-8 * abs(ev).max()
    assert ext.floor == pytest.approx(100 * np.finfo(np.float64).eps * abs(ev).max(), rel=1e-6)


def test_callback_ticks_once_per_product_of_every_start():
    steps = []
    result = extreme_eigenvalues(matrix_with_spectrum(spectrum(60)), num_steps=12, starts=3, callback=steps.append)
    assert steps == list(range(12)) * 3 and result.num_matvecs == 36
