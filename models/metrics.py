"""Evaluation metrics computed on host arrays (exact, not streaming approximations)."""

from __future__ import annotations

import numpy as np

__all__ = ["accuracy", "auc", "dice", "logloss"]


def auc(labels, scores, weights=None) -> float:
    """Area under the ROC curve via the rank statistic, with ties given half credit (exact)."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    w = np.ones_like(y) if weights is None else np.asarray(weights, dtype=np.float64).ravel()
    pos_w, neg_w = np.sum(w * y), np.sum(w * (1 - y))
    if pos_w == 0 or neg_w == 0:
        return float("nan")
    # Group tied scores: a positive beats the negatives strictly below it, and half of those tied.
    _, group = np.unique(s, return_inverse=True)
    pos_g = np.bincount(group, weights=w * y)
    neg_g = np.bincount(group, weights=w * (1 - y))
    neg_below = np.cumsum(neg_g) - neg_g
    total = np.sum(pos_g * (neg_below + 0.5 * neg_g))
    return float(total / (pos_w * neg_w))


def logloss(labels, probabilities, weights=None, eps: float = 1e-7) -> float:
    y = np.asarray(labels, dtype=np.float64).ravel()
    p = np.clip(np.asarray(probabilities, dtype=np.float64).ravel(), eps, 1 - eps)
    w = np.ones_like(y) if weights is None else np.asarray(weights, dtype=np.float64).ravel()
    return float(-np.sum(w * (y * np.log(p) + (1 - y) * np.log(1 - p))) / np.sum(w))


def accuracy(labels, predictions) -> float:
    return float(np.mean(np.asarray(labels).ravel() == np.asarray(predictions).ravel()))


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice overlap of two masks (1 when both are empty)."""
    p, t = pred.astype(bool), truth.astype(bool)
    denom = p.sum() + t.sum()
    return 1.0 if denom == 0 else float(2.0 * np.logical_and(p, t).sum() / denom)
