"""Competition metrics, each with its direction, computed with scikit-learn.

Every metric takes ``(y_true, pred)`` where ``y_true`` is the encoded target of
:meth:`Competition.targets` and ``pred`` the (n, k) prediction matrix stored in ``oof.csv``:
class probabilities (multiclass), P(y=1) (binary), one probability per label (multilabel) or values
(regression). One function, :func:`score`, is what early stopping, checkpoint choice, OOF scoring and
ensemble weights all call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from sklearn import metrics as skm

CLASSIFICATION = ("binary", "multiclass")


def to_labels(pred: np.ndarray, task: str) -> np.ndarray:
    """Hard predictions: argmax class index (multiclass), 0/1 at 0.5 (binary/multilabel)."""
    pred = np.asarray(pred, dtype=np.float64)
    if task == "multiclass":
        return pred.argmax(1)
    if task in ("binary", "multilabel"):
        out = (pred >= 0.5).astype(np.int64)
        return out[:, 0] if task == "binary" else out
    return np.rint(pred[:, 0]).astype(np.int64)


def _accuracy(y, p, task):
    return skm.accuracy_score(y, to_labels(p, task))


def _f1_macro(y, p, task):
    return skm.f1_score(y, to_labels(p, task), average="macro")


def _log_loss(y, p, task):
    if task == "binary":
        return skm.log_loss(y, np.clip(p[:, 0], 1e-15, 1 - 1e-15), labels=[0, 1])
    if task == "multilabel":
        return float(np.mean([skm.log_loss(y[:, j], np.clip(p[:, j], 1e-15, 1 - 1e-15), labels=[0, 1])
                              for j in range(y.shape[1])]))
    p = np.clip(p, 1e-15, 1)
    return skm.log_loss(y, p / p.sum(1, keepdims=True), labels=list(range(p.shape[1])))


def _roc_auc(y, p, task):
    if task == "binary":
        return skm.roc_auc_score(y, p[:, 0])
    if task == "multilabel":  # mean column-wise AUC
        return float(np.mean([skm.roc_auc_score(y[:, j], p[:, j]) for j in range(y.shape[1])]))
    p = np.clip(p, 1e-15, 1)
    return skm.roc_auc_score(y, p / p.sum(1, keepdims=True), multi_class="ovr",
                             labels=list(range(p.shape[1])))


def _qwk(y, p, task):
    if task == "multiclass":  # expected grade would be smoother, but kappa scores the class
        y_hat, y_true = p.argmax(1), y
    else:  # ordinal regression: round to the nearest grade seen in the targets
        y_true = np.rint(y[:, 0]).astype(np.int64)
        y_hat = np.clip(np.rint(p[:, 0]), y_true.min(), y_true.max()).astype(np.int64)
    return skm.cohen_kappa_score(y_true, y_hat, weights="quadratic")


def _rmse(y, p, task):
    return float(np.sqrt(skm.mean_squared_error(y, p)))


def _mae(y, p, task):
    return skm.mean_absolute_error(y, p)


@dataclass(frozen=True)
class Metric:
    name: str
    fn: Callable
    greater_is_better: bool
    tasks: tuple[str, ...]

    def __call__(self, y_true, pred, task: str) -> float:
        pred = np.asarray(pred, dtype=np.float64)
        if pred.ndim == 1:
            pred = pred[:, None]
        return float(self.fn(np.asarray(y_true), pred, task))

    def better(self, a: float, b: float, min_delta: float = 0.0) -> bool:
        """True when score ``a`` beats ``b`` by more than ``min_delta`` in this metric's direction."""
        if b is None or np.isnan(b):
            return not np.isnan(a)
        return a > b + min_delta if self.greater_is_better else a < b - min_delta


METRICS = {m.name: m for m in [
    Metric("accuracy", _accuracy, True, CLASSIFICATION + ("multilabel",)),
    Metric("f1_macro", _f1_macro, True, CLASSIFICATION + ("multilabel",)),
    Metric("log_loss", _log_loss, False, CLASSIFICATION + ("multilabel",)),
    Metric("roc_auc", _roc_auc, True, CLASSIFICATION + ("multilabel",)),
    Metric("qwk", _qwk, True, ("multiclass", "regression")),
    Metric("rmse", _rmse, False, ("regression",)),
    Metric("mae", _mae, False, ("regression",)),
]}


def get_metric(name: str) -> Metric:
    if name not in METRICS:
        raise KeyError(f"unknown metric '{name}'; known: {', '.join(METRICS)}")
    return METRICS[name]
