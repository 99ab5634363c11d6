"""The paper's metrics: jiant's "major" metric per task, reported ×100 (DESIGN §3).

Every metric runs over the task's label space ``labels = range(num_labels)``, never over the labels a
batch happens to contain: jiant's CB score averages the binary F1 of each of the three classes, and a
class absent from both gold and predictions scores F1 = 0 (pred = gold = [0, 1, 0, 1] gives
(1 + (1 + 1 + 0)/3)/2 = 83.33, not 100). Degenerate inputs score 0 rather than NaN: F1 of a class with
no true positives (sklearn's ``zero_division=0``, what jiant's default gives), Matthews correlation when
one class is predicted for all (an empty row or column of the confusion matrix, sklearn's convention),
and Pearson/Spearman of a constant.

Inputs: ``pred`` and ``gold`` are 1-D array-likes of equal, non-zero length: class indices in
``labels`` for classification (multiple choice: the choice index), floats for regression.
``compute_metrics`` returns every metric of a task plus ``major`` (the one Table 1 reports), all ×100.
Source of the formulas: jiant 2, ``jiant/tasks/evaluate/core.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import stats


def _pair(pred, gold) -> tuple[np.ndarray, np.ndarray]:
    pred, gold = np.asarray(pred).ravel(), np.asarray(gold).ravel()
    if pred.shape != gold.shape or pred.size == 0:
        raise ValueError(f"pred and gold must be non-empty and of one length, got {pred.size} and {gold.size}")
    return pred, gold


def accuracy(pred, gold) -> float:
    """Fraction of exact matches, in [0, 1]."""
    pred, gold = _pair(pred, gold)
    return float(np.mean(pred == gold))


def per_class_f1(pred, gold, labels: Sequence[int]) -> np.ndarray:
    """Binary F1 of each class in ``labels`` (one-vs-rest), shape (len(labels),); 0 for a class with no
    true positives, including one absent from both gold and pred (jiant's CB convention)."""
    pred, gold = _pair(pred, gold)
    from sklearn import (
        metrics as skm,  # imported on use: 1.7 s that a CLI call or notebook start need not pay
    )

    return skm.f1_score(gold, pred, labels=list(labels), average=None, zero_division=0).astype(float)


def f1(pred, gold, pos_label: int = 1) -> float:
    """Binary F1 of the positive class ``pos_label`` (MRPC: label "1"); 0 with no true positive."""
    return float(per_class_f1(pred, gold, [pos_label])[0])


def macro_f1(pred, gold, labels: Sequence[int]) -> float:
    """Unweighted mean of the per-class F1 over the whole label space ``labels`` (see :func:`per_class_f1`)."""
    return float(np.mean(per_class_f1(pred, gold, labels)))


def matthews(pred, gold, labels: Sequence[int] = (0, 1)) -> float:
    """Matthews correlation coefficient over ``labels`` (the multiclass R_K of Gorodkin 2004, as sklearn),
    in [-1, 1]; 0 when it is undefined (one class predicted for all, or one class in gold)."""
    pred, gold = _pair(pred, gold)
    from sklearn import metrics as skm

    c = skm.confusion_matrix(gold, pred, labels=list(labels)).astype(float)
    t, p, n = c.sum(axis=1), c.sum(axis=0), c.sum()
    cov_tp = np.trace(c) * n - t @ p
    denominator = np.sqrt((n * n - p @ p) * (n * n - t @ t))
    return float(cov_tp / denominator) if denominator > 0 else 0.0


def _corr(fn, pred, gold) -> float:
    pred, gold = _pair(pred, gold)
    pred, gold = pred.astype(float), gold.astype(float)
    if np.std(pred) == 0 or np.std(gold) == 0:
        return 0.0  # undefined correlation of a constant: report none rather than NaN
    return float(fn(pred, gold)[0])


def pearson(pred, gold) -> float:
    """Pearson's r of float scores, in [-1, 1] (scipy); 0 when either side is constant."""
    return _corr(stats.pearsonr, pred, gold)


def spearman(pred, gold) -> float:
    """Spearman's rank correlation, in [-1, 1] (scipy); 0 when either side is constant."""
    return _corr(stats.spearmanr, pred, gold)


# Each task metric: (pred, gold, labels) -> {metric name: value ×100, ..., "major": the Table 1 one ×100}.
def _scaled(values: dict[str, float], major: float) -> dict[str, float]:
    return {**{k: 100.0 * v for k, v in values.items()}, "major": 100.0 * major}


def mcc_metric(pred, gold, labels):
    m = matthews(pred, gold, labels)
    return _scaled({"mcc": m, "accuracy": accuracy(pred, gold)}, m)


def accuracy_metric(pred, gold, labels):
    a = accuracy(pred, gold)
    return _scaled({"accuracy": a}, a)


def acc_and_f1_metric(pred, gold, labels):
    a, f = accuracy(pred, gold), f1(pred, gold, pos_label=labels[-1])
    return _scaled({"accuracy": a, "f1": f}, (a + f) / 2)


def acc_and_macro_f1_metric(pred, gold, labels):
    a, f = accuracy(pred, gold), macro_f1(pred, gold, labels)  # every class of the task, as jiant's CB
    return _scaled({"accuracy": a, "macro_f1": f}, (a + f) / 2)


def pearson_and_spearman_metric(pred, gold, labels):
    p, s = pearson(pred, gold), spearman(pred, gold)
    return _scaled({"pearson": p, "spearman": s}, (p + s) / 2)


MAJOR_METRICS = {
    "mcc": mcc_metric,
    "accuracy": accuracy_metric,
    "acc_and_f1": acc_and_f1_metric,
    "acc_and_macro_f1": acc_and_macro_f1_metric,
    "pearson_and_spearman": pearson_and_spearman_metric,
}


def compute_metrics(task, pred, gold) -> dict[str, float]:
    """All metrics of ``task`` (a TaskSpec) ×100, with the Table 1 one under ``major``; the label space is
    ``range(task.num_labels)`` (class or choice indices; unused for regression)."""
    return MAJOR_METRICS[task.metric](pred, gold, list(range(task.num_labels)))
