import math

import numpy as np
import pytest
from scipy import stats

from sparse_ft import metrics
from sparse_ft.tasks import get_task


def test_matthews_hand_example():
    # confusion: tp=2, tn=1, fp=1, fn=1 -> (2*1 - 1*1)/sqrt(3*3*2*2) = 1/6
    gold = [1, 1, 1, 0, 0]
    pred = [1, 1, 0, 1, 0]
    assert metrics.matthews(pred, gold) == pytest.approx(1 / 6)


def test_accuracy_f1_macro_f1_hand_examples():
    gold = [1, 1, 1, 0, 0]
    pred = [1, 1, 0, 1, 0]
    assert metrics.accuracy(pred, gold) == pytest.approx(3 / 5)
    assert metrics.f1(pred, gold) == pytest.approx(2 / 3)  # precision 2/3, recall 2/3
    # class 0: precision 1/2, recall 1/2 -> 1/2 ; class 1: 2/3 -> macro 7/12
    assert metrics.macro_f1(pred, gold) == pytest.approx(7 / 12)


def test_correlations_match_scipy_and_constant_is_zero():
    rng = np.random.default_rng(0)
    gold = rng.normal(size=50)
    pred = gold + rng.normal(scale=0.5, size=50)
    assert metrics.pearson(pred, gold) == pytest.approx(stats.pearsonr(pred, gold)[0])
    assert metrics.spearman(pred, gold) == pytest.approx(stats.spearmanr(pred, gold)[0])
    assert metrics.pearson(np.ones(5), gold[:5]) == 0.0


@pytest.mark.parametrize("task,pred,gold,major", [
    ("cola", [1, 1, 0, 1, 0], [1, 1, 1, 0, 0], 100 / 6),
    ("rte", [0, 1, 1, 0], [0, 1, 0, 0], 75.0),
    ("mrpc", [1, 1, 0, 1, 0], [1, 1, 1, 0, 0], 100 * (3 / 5 + 2 / 3) / 2),
    ("cb", [1, 1, 0, 1, 0], [1, 1, 1, 0, 0], 100 * (3 / 5 + 7 / 12) / 2),
])
def test_major_metric_is_the_papers_times_100(task, pred, gold, major):
    assert metrics.compute_metrics(get_task(task), pred, gold)["major"] == pytest.approx(major)


def test_stsb_major_is_mean_of_pearson_and_spearman():
    gold = np.array([0.0, 1.0, 2.5, 4.0, 5.0])
    pred = np.array([0.5, 0.8, 3.0, 3.5, 4.9])
    expected = 100 * (stats.pearsonr(pred, gold)[0] + stats.spearmanr(pred, gold)[0]) / 2
    result = metrics.compute_metrics(get_task("stsb"), pred, gold)
    assert result["major"] == pytest.approx(expected)
    assert not math.isnan(result["pearson"])
