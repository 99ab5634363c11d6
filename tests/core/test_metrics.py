import math
import warnings

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from sparse_ft import metrics
from sparse_ft.tasks import REGRESSION, TASKS, get_task


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
    assert metrics.macro_f1(pred, gold, [0, 1]) == pytest.approx(7 / 12)


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
    ("cb", [1, 1, 0, 1, 0], [1, 1, 1, 0, 0], 100 * (3 / 5 + 7 / 18) / 2),  # neutral: F1 0
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


# ----------------------------------------------------------------------------- the label space, not the batch
def test_cb_macro_f1_counts_a_class_absent_from_gold_and_pred_as_zero():
    """jiant's CB: mean of the three one-vs-rest F1s; class 2 (neutral) never occurs -> F1 = 0."""
    result = metrics.compute_metrics(get_task("cb"), [0, 1, 0, 1], [0, 1, 0, 1])
    assert result["macro_f1"] == pytest.approx(200 / 3)
    assert result["major"] == pytest.approx(100 * (1 + 2 / 3) / 2)  # 83.33


def _jiant_major(task, pred, gold) -> float:
    """jiant 2's major metric, transcribed from jiant/tasks/evaluate/core.py (sklearn, default arguments
    but zero_division=0, which is what its "warn" default returns)."""
    pred, gold = np.asarray(pred), np.asarray(gold)
    acc = float((pred == gold).mean())
    if task.metric == "mcc":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # sklearn's "a single label was found"
            return skm.matthews_corrcoef(gold, pred)
    if task.metric == "accuracy":
        return acc
    if task.metric == "acc_and_f1":
        return (acc + skm.f1_score(gold, pred, zero_division=0)) / 2
    if task.metric == "acc_and_macro_f1":  # CommitmentBankEvaluationScheme
        f1s = [skm.f1_score(gold == k, pred == k, zero_division=0) for k in range(3)]
        return (acc + float(np.mean(f1s))) / 2
    raise AssertionError(task.metric)


def _degenerate_cases(num_labels: int):
    n = num_labels
    return {
        "one class predicted for all": ([0] * 6, [i % n for i in range(6)]),
        "last class predicted for all": ([n - 1] * 6, [i % n for i in range(6)]),
        "class absent from gold": ([i % n for i in range(6)], [0] * 6),
        "class absent from gold and pred": ([0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]),
        "perfect on two classes": ([0, 1, 0, 1], [0, 1, 0, 1]),
        "no positive prediction": ([0, 0, 0, 0], [1, 0, 1, 0]),
        "all wrong": ([1, 0, 1, 0], [0, 1, 0, 1]),
    }


@pytest.mark.parametrize("task_name", [t for t in TASKS if TASKS[t].kind != REGRESSION])
def test_every_classification_metric_matches_jiant_on_degenerate_inputs(task_name):
    task = get_task(task_name)
    for case, (pred, gold) in _degenerate_cases(task.num_labels).items():
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no ill-defined-metric warnings, no NaN
            result = metrics.compute_metrics(task, pred, gold)
        assert all(math.isfinite(v) for v in result.values()), (task_name, case, result)
        assert result["major"] == pytest.approx(100 * _jiant_major(task, pred, gold)), (task_name, case)


def test_degenerate_values_by_hand():
    assert metrics.compute_metrics(get_task("cola"), [1, 1, 1, 1], [0, 1, 0, 1])["mcc"] == 0.0
    assert metrics.compute_metrics(get_task("cola"), [1, 1, 0, 1], [1, 1, 1, 1])["mcc"] == 0.0
    mrpc = metrics.compute_metrics(get_task("mrpc"), [0, 0, 0, 0], [1, 0, 1, 0])
    assert (mrpc["f1"], mrpc["major"]) == (0.0, 25.0)
    cb = metrics.compute_metrics(get_task("cb"), [0, 0, 0, 0], [0, 1, 0, 1])  # F1 = 2/3, 0, 0
    assert cb["major"] == pytest.approx(100 * (0.5 + 2 / 9) / 2)
    cb_all_right_one_class = metrics.compute_metrics(get_task("cb"), [2, 2], [2, 2])
    assert cb_all_right_one_class["major"] == pytest.approx(100 * (1 + 1 / 3) / 2)


def test_matthews_multiclass_matches_sklearn_over_the_label_space():
    rng = np.random.default_rng(0)
    gold, pred = rng.integers(0, 3, 40), rng.integers(0, 3, 40)
    assert metrics.matthews(pred, gold, [0, 1, 2]) == pytest.approx(skm.matthews_corrcoef(gold, pred))


def test_regression_metric_on_constant_inputs_is_zero_not_nan():
    task = get_task("stsb")
    for pred, gold in (([2.0, 2.0, 2.0], [1.0, 2.0, 3.0]), ([1.0, 2.0, 3.0], [4.0, 4.0, 4.0])):
        assert metrics.compute_metrics(task, pred, gold)["major"] == 0.0


def test_inputs_of_different_lengths_or_empty_are_refused():
    with pytest.raises(ValueError, match="one length"):
        metrics.accuracy([0, 1], [0])
    with pytest.raises(ValueError, match="non-empty"):
        metrics.compute_metrics(get_task("cola"), [], [])
