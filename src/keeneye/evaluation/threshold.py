"""Choosing the decision threshold from held-out probabilities (validation, or out-of-fold).

With the keeneye rule "predict positive iff probability >= threshold", the threshold is the one
that best meets an objective on held-out labels and probabilities:

* ``f1`` (default): maximise the F1 score of the positive class (label 1);
* ``precision_at_recall``: the highest precision among the cuts whose recall reaches a target
  (a line where a missed defect costs more than a false alarm: "catch 95% of defects");
* ``recall_at_precision``: the highest recall among the cuts whose precision reaches a target
  ("at most 1 false alarm in 10 calls"); when no cut reaches it, the most precise cut, with a warning.

The probabilities are either the validation split's or, with cross-validation
(:mod:`keeneye.training.crossval`), the out-of-fold probabilities of every training and
validation image: each predicted by a head that never saw it nor its group. The latter are many
more held-out positives, so the threshold no longer swings with a handful of validation defects.

Tie-breaking and placement of the threshold
-------------------------------------------
``sklearn.metrics.precision_recall_curve`` gives precision and recall for every distinct
validation probability used as a cut ``c`` (positive iff ``p >= c``). F1 is computed for
all cuts at once (vectorised) and:

1. among the cuts that reach the best objective value (within 1e-12, i.e. float noise), the
   **lowest** cut is taken: an equal score at a lower cut means at least as much recall, which
   is what matters when the positive class is a rare defect (``recall_at_precision`` is the
   exception: among cuts of equal recall it takes the highest, the one with the fewest false alarms);
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

from keeneye.config import EvaluationConfig
from keeneye.evaluation.metrics import as_binary_arrays, check_threshold, predict_labels

__all__ = [
    "DEFAULT_THRESHOLD",
    "METHOD_DEFAULT",
    "METHOD_FIXED",
    "METHOD_MAX_F1",
    "OBJECTIVES",
    "ThresholdChoice",
    "choose_configured_threshold",
    "choose_threshold",
    "objective_cut",
]

DEFAULT_THRESHOLD = 0.5
METHOD_MAX_F1 = "max_f1_on_validation"
METHOD_DEFAULT = "default_0.5"
METHOD_FIXED = "fixed"
OBJECTIVES = ("f1", "precision_at_recall", "recall_at_precision")
_METHOD_PREFIX = {"f1": "max_f1", "precision_at_recall": "max_precision_at_recall", "recall_at_precision": "max_recall_at_precision"}

_TIE_TOLERANCE = 1e-12


@dataclass(frozen=True)
class ThresholdChoice:
    """The decision threshold and how it was obtained."""

    threshold: float
    method: str  # "<objective>_on_validation" | "<objective>_out_of_fold" | "default_0.5" | "fixed"
    validation_f1: float | None  # F1 of the positive class at `threshold` on the held-out probabilities
    warning: str | None  # set when falling back to 0.5, or when a target cannot be met

    def to_dict(self) -> dict:
        return asdict(self)


def _f1_at(y: np.ndarray, p: np.ndarray, threshold: float) -> float | None:
    if y.size == 0:
        return None
    from sklearn.metrics import f1_score  # slow to import; the API (and so `keeneye predict`) imports this module

    pred = predict_labels(p, threshold)
    return float(f1_score(y, pred, labels=[0, 1], pos_label=1, zero_division=0))


def _safe_midpoint(lower: float, cut: float) -> float:
    """Midpoint of (lower, cut] that keeps ``lower`` negative and ``cut`` positive, else cut."""
    mid = (lower + cut) / 2.0
    ok64 = lower < mid <= cut
    ok32 = np.float32(lower) < np.float32(mid) <= np.float32(cut)
    return float(mid) if (ok64 and ok32) else float(cut)


def objective_cut(y: np.ndarray, p: np.ndarray, objective: str = "f1", target: float | None = None) -> tuple[float, bool]:
    """(the best cut c for "positive iff p >= c", whether the target was met); see the module docstring."""
    from sklearn.metrics import precision_recall_curve

    # precision[i], recall[i] belong to the rule p >= cuts[i]; cuts ascending.
    precision, recall, cuts = precision_recall_curve(y, p, pos_label=1)
    precision, recall = precision[: cuts.size], recall[: cuts.size]
    met = True
    if objective == "f1":
        denom = precision + recall
        score = np.divide(2.0 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    elif objective == "precision_at_recall":
        feasible = recall >= target - _TIE_TOLERANCE  # the lowest cut has recall 1: never empty
        score = np.where(feasible, precision, -1.0)
    elif objective == "recall_at_precision":
        feasible = precision >= target - _TIE_TOLERANCE
        met = bool(feasible.any())
        score = np.where(feasible, recall, -1.0) if met else precision
    else:
        raise ValueError(f"unknown threshold objective {objective!r}; expected one of {OBJECTIVES}")
    tied = np.flatnonzero(score >= score.max() - _TIE_TOLERANCE)
    if objective == "recall_at_precision" and met:
        tied = tied[recall[tied] >= recall[tied].max() - _TIE_TOLERANCE]
        return float(cuts[tied[-1]]), met  # equal recall: the highest cut has the fewest false alarms
    return float(cuts[tied[0]]), met


def _placed(p: np.ndarray, cut: float) -> float:
    below = p[p < cut]
    lower = float(below.max()) if below.size else 0.0
    return _safe_midpoint(lower, cut)


def _max_f1_threshold(y: np.ndarray, p: np.ndarray) -> float:
    return _placed(p, objective_cut(y, p, "f1")[0])


def choose_threshold(
    y_true: Any,
    probabilities: Any,
    *,
    min_per_class: int = 5,
    fixed: float | None = None,
    objective: str = "f1",
    target: float | None = None,
    source: str = "validation",
) -> ThresholdChoice:
    """Choose the decision threshold from held-out labels and probabilities.

    ``objective`` is one of :data:`OBJECTIVES` (``target`` is the recall or precision to reach);
    ``source`` names where the probabilities come from ("validation" or "out_of_fold") and
    ends up in the method name, e.g. ``max_f1_out_of_fold``.

    * ``fixed`` given: that threshold, method ``"fixed"`` (validation F1 still reported
      when there is validation data).
    * fewer than ``min_per_class`` validation samples of either class (or no validation
      data): 0.5, method ``"default_0.5"``, with a warning.
    * otherwise: the threshold that best meets ``objective`` (method e.g.
      ``"max_f1_on_validation"``); see the module docstring for tie-breaking and placement.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown threshold objective {objective!r}; expected one of {OBJECTIVES}")
    if objective != "f1" and (target is None or not 0 < float(target) <= 1):
        raise ValueError(f"threshold objective {objective!r} needs a target between 0 and 1, got {target!r}")
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
        where = "Validation data" if source == "validation" else "The out-of-fold predictions"
        warning = (
            f"{where} has {n_pos} positive (label 1) and {n_neg} negative (label 0) "
            f"samples; choosing a threshold needs at least {min_per_class} of each class, "
            f"so the default threshold {DEFAULT_THRESHOLD} is used."
        )
        return ThresholdChoice(
            DEFAULT_THRESHOLD, METHOD_DEFAULT, _f1_at(y, p, DEFAULT_THRESHOLD), warning
        )

    cut, met = objective_cut(y, p, objective, target)
    threshold = _placed(p, cut)
    warning = None
    if not met:
        warning = (f"no threshold reaches precision {target} on the {source.replace('_', '-')} predictions; "
                   "the most precise threshold is used.")
    method = f"{_METHOD_PREFIX[objective]}_{'on_validation' if source == 'validation' else source}"
    return ThresholdChoice(threshold, method, _f1_at(y, p, threshold), warning)


def choose_configured_threshold(
    evaluation: EvaluationConfig, y_true: Any, probabilities: Any, *, source: str = "validation"
) -> ThresholdChoice:
    """:func:`choose_threshold` with the rule the config's evaluation section sets (a fixed threshold or "auto",
    the objective and its target, the fewest held-out images per class): the one place that reads those settings,
    so every phase that chooses a threshold (head, cross-validation, fine-tuning, the stacked score) uses the
    same rule."""
    fixed = None if evaluation.threshold == "auto" else float(evaluation.threshold)
    return choose_threshold(y_true, probabilities, min_per_class=evaluation.min_validation_per_class, fixed=fixed,
                            objective=evaluation.threshold_objective, target=evaluation.objective_target, source=source)
