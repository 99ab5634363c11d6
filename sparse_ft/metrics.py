"""The paper's metrics: jiant's "major" metric per task, reported ×100 (DESIGN §3).

Each function takes predictions and gold labels as array-likes. ``compute_metrics`` returns every
metric of a task plus ``major`` (the one Table 1 reports), all ×100.
"""

from __future__ import annotations

import numpy as np
from scipy import stats
from sklearn import metrics as skm


def accuracy(pred, gold) -> float:
    return float(np.mean(np.asarray(pred) == np.asarray(gold)))


def f1(pred, gold) -> float:
    """Binary F1 of the positive class 1."""
    return float(skm.f1_score(gold, pred, pos_label=1, zero_division=0))


def macro_f1(pred, gold, labels=None) -> float:
    """Unweighted mean of per-class F1 over ``labels`` (default: the classes seen in gold or pred)."""
    return float(skm.f1_score(gold, pred, labels=labels, average="macro", zero_division=0))


def matthews(pred, gold) -> float:
    """Matthews correlation coefficient; 0 when a row or column of the confusion matrix is empty."""
    return float(skm.matthews_corrcoef(gold, pred))


def _corr(fn, pred, gold) -> float:
    pred, gold = np.asarray(pred, dtype=float), np.asarray(gold, dtype=float)
    if np.std(pred) == 0 or np.std(gold) == 0:
        return 0.0  # undefined correlation of a constant: report none rather than NaN
    return float(fn(pred, gold)[0])


def pearson(pred, gold) -> float:
    return _corr(stats.pearsonr, pred, gold)


def spearman(pred, gold) -> float:
    return _corr(stats.spearmanr, pred, gold)


def _scaled(values: dict[str, float], major: float) -> dict[str, float]:
    return {**{k: 100.0 * v for k, v in values.items()}, "major": 100.0 * major}


def mcc_metric(pred, gold, num_labels):
    m = matthews(pred, gold)
    return _scaled({"mcc": m, "accuracy": accuracy(pred, gold)}, m)


def accuracy_metric(pred, gold, num_labels):
    a = accuracy(pred, gold)
    return _scaled({"accuracy": a}, a)


def acc_and_f1_metric(pred, gold, num_labels):
    a, f = accuracy(pred, gold), f1(pred, gold)
    return _scaled({"accuracy": a, "f1": f}, (a + f) / 2)


def acc_and_macro_f1_metric(pred, gold, num_labels):
    a, f = accuracy(pred, gold), macro_f1(pred, gold)  # classes seen in gold or pred, as jiant
    return _scaled({"accuracy": a, "macro_f1": f}, (a + f) / 2)


def pearson_and_spearman_metric(pred, gold, num_labels):
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
    """All metrics of ``task`` (a TaskSpec) ×100, with the Table 1 one under ``major``."""
    return MAJOR_METRICS[task.metric](pred, gold, task.num_labels)
