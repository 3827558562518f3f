"""The scores of a fine-tune's predictions: classification from its confusion matrix, regression from the values.

The definitions are scikit-learn's and SciPy's, and the tests hold these to them:

* ``accuracy``: the share of examples whose prediction is right.
* ``macro_f1``: F1 averaged over the labels that occur in the truth or the
  predictions (``f1_score(average="macro")``).
* ``f1``: the F1 of the positive class, label 1 of two (``f1_score``), 0 when
  neither the truth nor the predictions hold a positive. GLUE's MRPC and QQP
  report it.
* ``matthews``: the Matthews correlation coefficient, multiclass
  (``matthews_corrcoef``), 0 when a side holds a single class. GLUE's CoLA
  reports it.
* ``pearson``: Pearson's r (``scipy.stats.pearsonr``).
* ``spearman``: Pearson's r of the ranks, tied values sharing their average
  rank (``scipy.stats.spearmanr``). STS-B reports it with Pearson's r.

Both correlations are NaN where a side is constant, as SciPy's are; an epoch
whose score is NaN is never picked over one that has a score.
"""

from __future__ import annotations

import math

import numpy as np

CLASSIFICATION = ("accuracy", "macro_f1", "f1", "matthews")
REGRESSION = ("pearson", "spearman")


def confusion_matrix(truth, predicted, num_labels: int) -> np.ndarray:
    """(num_labels, num_labels) counts: a row per true label, a column per predicted label."""
    cells = np.asarray(truth, np.int64) * num_labels + np.asarray(predicted, np.int64)
    return np.bincount(cells, minlength=num_labels * num_labels).reshape(num_labels, num_labels)


def classification_scores(matrix) -> dict[str, float]:
    """accuracy, macro_f1, matthews and, for two labels, f1 of a confusion matrix."""
    m = np.asarray(matrix, np.float64)
    true, predicted, hits, total = m.sum(1), m.sum(0), np.diag(m), m.sum()
    present = (true + predicted) > 0
    f1s = 2 * hits[present] / (true + predicted)[present]
    # Matthews' multiclass form (Gorodkin 2004), in counts: (c·s - t·p) / sqrt((s² - p·p)(s² - t·t))
    covariance = hits.sum() * total - true @ predicted
    spread = (total**2 - predicted @ predicted) * (total**2 - true @ true)
    scores = {"accuracy": hits.sum() / total, "macro_f1": f1s.mean(),
              "matthews": covariance / math.sqrt(spread) if spread > 0 else 0.0}
    if len(m) == 2:
        scores["f1"] = 2 * hits[1] / (true[1] + predicted[1]) if true[1] + predicted[1] else 0.0
    return {name: float(value) for name, value in scores.items()}


def pearson(x, y) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    dx, dy = x - x.mean(), y - y.mean()
    norm = math.sqrt((dx @ dx) * (dy @ dy))
    return float(np.clip(dx @ dy / norm, -1.0, 1.0)) if norm > 0 else math.nan


def average_ranks(x) -> np.ndarray:
    """Ranks from 1, tied values given the mean of the ranks they span (``scipy.stats.rankdata``)."""
    values, tie_group = np.unique(np.asarray(x, np.float64), return_inverse=True)
    counts = np.bincount(tie_group)
    last = np.cumsum(counts)  # the rank of each group's last member
    return (last - (counts - 1) / 2)[tie_group]


def spearman(x, y) -> float:
    return pearson(average_ranks(x), average_ranks(y))


def regression_scores(predicted, truth) -> dict[str, float]:
    return {"pearson": pearson(predicted, truth), "spearman": spearman(predicted, truth)}


def rank_key(value: float) -> float:
    """What picking the best epoch compares: the score, with NaN below every number."""
    return -math.inf if math.isnan(value) else value
