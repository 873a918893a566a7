"""Choosing the decision threshold on the validation split.

The threshold maximises the F1 score of the positive class (label 1) on validation,
with the keeneye rule "predict positive iff probability >= threshold".

Tie-breaking and placement of the threshold
-------------------------------------------
``sklearn.metrics.precision_recall_curve`` gives precision and recall for every distinct
validation probability used as a cut ``c`` (positive iff ``p >= c``). F1 is computed for
all cuts at once (vectorised) and:

1. among the cuts that reach the maximum F1 (within 1e-12, i.e. float noise), the
   **lowest** cut is taken: equal F1 at a lower cut means at least as much recall, which
   is what matters when the positive class is a rare defect;
2. the returned threshold is **not** the cut itself (a threshold sitting exactly on a
   validation probability is brittle: the slightest numerical change flips that sample)
   but the **midpoint between the cut and the next-lower distinct validation probability**
   (or 0 when no validation probability is lower). Every validation decision is unchanged
   - samples with ``p >= c`` stay positive, samples with ``p <= next-lower`` stay negative -
   and the margin to the nearest validation probability on either side is maximal.
   If the two probabilities are so close that the midpoint would round onto one of them
   (in float64 or in float32, the usual dtype of model outputs) the cut itself is used.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from sklearn.metrics import f1_score, precision_recall_curve

from keeneye.evaluation.metrics import as_binary_arrays, check_threshold, predict_labels

__all__ = [
    "DEFAULT_THRESHOLD",
    "METHOD_DEFAULT",
    "METHOD_FIXED",
    "METHOD_MAX_F1",
    "ThresholdChoice",
    "choose_threshold",
]

DEFAULT_THRESHOLD = 0.5
METHOD_MAX_F1 = "max_f1_on_validation"
METHOD_DEFAULT = "default_0.5"
METHOD_FIXED = "fixed"

_TIE_TOLERANCE = 1e-12


@dataclass(frozen=True)
class ThresholdChoice:
    """The decision threshold and how it was obtained."""

    threshold: float
    method: str  # "max_f1_on_validation" | "default_0.5" | "fixed"
    validation_f1: float | None  # F1 of the positive class at `threshold` on validation
    warning: str | None  # set when falling back to 0.5

    def to_dict(self) -> dict:
        return asdict(self)


def _f1_at(y: np.ndarray, p: np.ndarray, threshold: float) -> float | None:
    if y.size == 0:
        return None
    pred = predict_labels(p, threshold)
    return float(f1_score(y, pred, labels=[0, 1], pos_label=1, zero_division=0))


def _safe_midpoint(lower: float, cut: float) -> float:
    """Midpoint of (lower, cut] that keeps ``lower`` negative and ``cut`` positive, else cut."""
    mid = (lower + cut) / 2.0
    ok64 = lower < mid <= cut
    ok32 = np.float32(lower) < np.float32(mid) <= np.float32(cut)
    return float(mid) if (ok64 and ok32) else float(cut)


def _max_f1_threshold(y: np.ndarray, p: np.ndarray) -> float:
    # precision[i], recall[i] belong to the rule p >= thresholds[i]; thresholds ascending.
    precision, recall, cuts = precision_recall_curve(y, p, pos_label=1)
    precision, recall = precision[: cuts.size], recall[: cuts.size]
    denom = precision + recall
    f1 = np.divide(2.0 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    best = int(np.flatnonzero(f1 >= f1.max() - _TIE_TOLERANCE)[0])  # lowest tied cut
    cut = float(cuts[best])
    below = p[p < cut]
    lower = float(below.max()) if below.size else 0.0
    return _safe_midpoint(lower, cut)


def choose_threshold(
    y_true: Any,
    probabilities: Any,
    *,
    min_per_class: int = 5,
    fixed: float | None = None,
) -> ThresholdChoice:
    """Choose the decision threshold from validation labels and probabilities.

    * ``fixed`` given: that threshold, method ``"fixed"`` (validation F1 still reported
      when there is validation data).
    * fewer than ``min_per_class`` validation samples of either class (or no validation
      data): 0.5, method ``"default_0.5"``, with a warning.
    * otherwise: the F1-maximising threshold (method ``"max_f1_on_validation"``); see
      the module docstring for tie-breaking and placement between validation scores.
    """
    if int(min_per_class) < 1:
        raise ValueError(f"min_per_class must be >= 1, got {min_per_class!r}")
    min_per_class = int(min_per_class)
    y, p = as_binary_arrays(y_true, probabilities)

    if fixed is not None:
        threshold = check_threshold(fixed, "fixed")
        return ThresholdChoice(threshold, METHOD_FIXED, _f1_at(y, p, threshold), None)

    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos < min_per_class or n_neg < min_per_class:
        warning = (
            f"Validation data has {n_pos} positive (label 1) and {n_neg} negative (label 0) "
            f"samples; choosing a threshold needs at least {min_per_class} of each class, "
            f"so the default threshold {DEFAULT_THRESHOLD} is used."
        )
        return ThresholdChoice(
            DEFAULT_THRESHOLD, METHOD_DEFAULT, _f1_at(y, p, DEFAULT_THRESHOLD), warning
        )

    threshold = _max_f1_threshold(y, p)
    return ThresholdChoice(threshold, METHOD_MAX_F1, _f1_at(y, p, threshold), None)
