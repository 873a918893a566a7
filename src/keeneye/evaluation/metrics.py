"""Binary classification metrics for the positive ("defect") class.

Conventions used everywhere in keeneye:

* ``y_true`` holds 0/1 labels, **1 = positive** (the rare class, e.g. "defect").
* ``probabilities`` are the model's probabilities of the positive class, in [0, 1].
* **Prediction rule: a sample is predicted positive iff ``probability >= threshold``**
  (see :func:`predict_labels`; comparisons are done in float64 so that a float32
  model output and a Python-float threshold compare exactly).

Everything scikit-learn already computes is computed by scikit-learn; this module
only arranges the results into a JSON-serialisable dict (plain Python types, ``None``
where a value is undefined, never NaN).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from keeneye.model.decision import predict_labels  # noqa: F401  (the one rule; importable from here too)

__all__ = [
    "as_binary_arrays",
    "binary_metrics",
    "format_metrics_table",
    "predict_labels",
]

_METRIC_ROWS = (
    ("F1", "f1"),
    ("precision", "precision"),
    ("recall", "recall"),
    ("accuracy", "accuracy"),
    ("specificity", "specificity"),
)


# --------------------------------------------------------------------------- helpers


def _as_1d(values: Any, name: str, dtype: Any = None) -> np.ndarray:
    arr = np.asarray(values) if dtype is None else np.asarray(values, dtype=dtype)
    if arr.ndim == 2 and arr.shape[1] == 1:  # Keras predict() returns (n, 1)
        arr = arr[:, 0]
    elif arr.ndim == 0:
        raise ValueError(f"{name} must be a 1-D sequence, got a scalar")
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (or of shape (n, 1)), got shape {arr.shape}")
    return arr


def as_binary_arrays(y_true: Any, probabilities: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert labels / probabilities to ``(int64 array, float64 array)``.

    Accepts lists, numpy arrays, pandas Series and ``(n, 1)`` arrays as returned by
    ``model.predict``. Raises ``ValueError`` for mismatched lengths, labels other than
    0/1, or probabilities that are not finite numbers in [0, 1]. Empty inputs are allowed.
    """
    y = _as_1d(y_true, "y_true")
    try:
        p = _as_1d(probabilities, "probabilities", dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"probabilities must be numbers: {exc}") from exc
    if y.shape != p.shape:
        raise ValueError(f"y_true has {y.size} labels but probabilities has {p.size} values")
    if y.size == 0:
        return y.astype(np.int64), p
    if y.dtype == bool:
        y = y.astype(np.int64)
    elif not np.issubdtype(y.dtype, np.number):
        raise ValueError(f"y_true must contain 0/1 labels (1 = positive), got dtype {y.dtype}")
    bad = ~np.isin(y, (0, 1))
    if bad.any():
        found = np.unique(y[bad])[:5].tolist()
        raise ValueError(f"y_true must contain only 0 and 1 (1 = positive); found {found}")
    if not np.all(np.isfinite(p)):
        raise ValueError("probabilities contain NaN or infinite values")
    if p.min() < 0.0 or p.max() > 1.0:
        raise ValueError(
            f"probabilities must lie in [0, 1]; got range [{p.min():.6g}, {p.max():.6g}]"
        )
    return y.astype(np.int64), p


def check_threshold(threshold: Any, name: str = "threshold") -> float:
    """Return ``threshold`` as a Python float, raising ``ValueError`` unless it is in [0, 1]."""
    try:
        value = float(threshold)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a number in [0, 1], got {threshold!r}") from exc
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be a number in [0, 1], got {threshold!r}")
    return value


def _to_builtin(value: Any) -> Any:
    """Recursively convert numpy types to Python types and NaN/inf to None."""
    if isinstance(value, dict):
        return {str(k): _to_builtin(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_builtin(v) for v in value]
    if isinstance(value, np.ndarray):
        return _to_builtin(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _check_class_names(class_names: Sequence[str]) -> tuple[str, str]:
    if isinstance(class_names, str) or len(class_names) != 2:
        raise ValueError(
            f"class_names must be (negative_name, positive_name), got {class_names!r}"
        )
    neg, pos = (str(c) for c in class_names)
    if not neg or not pos or neg == pos:
        raise ValueError(f"class_names must be two distinct non-empty names, got {class_names!r}")
    return neg, pos


def _block(y: np.ndarray, p: np.ndarray, threshold: float, names: tuple[str, str]) -> dict:
    pred = predict_labels(p, threshold)
    # imported here: sklearn.metrics takes seconds to import, and `keeneye predict` (which imports this
    # module through the API) computes no metrics
    from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score, precision_score, recall_score

    cm = confusion_matrix(y, pred, labels=[0, 1])  # rows = true, cols = predicted
    tn, fp, fn, tp = (int(v) for v in cm.ravel())
    report_kwargs = dict(labels=[0, 1], target_names=list(names), zero_division=0)
    return {
        "threshold": float(threshold),
        "f1": float(f1_score(y, pred, labels=[0, 1], pos_label=1, zero_division=0)),
        "precision": float(precision_score(y, pred, labels=[0, 1], pos_label=1, zero_division=0)),
        "recall": float(recall_score(y, pred, labels=[0, 1], pos_label=1, zero_division=0)),
        "accuracy": float(accuracy_score(y, pred)),
        # specificity = recall of the negative class; undefined (None, shown "n/a") without negative samples
        "specificity": float(recall_score(y, pred, labels=[0, 1], pos_label=0, zero_division=0)) if tn + fp else None,
        "confusion_matrix": {"labels": list(names), "matrix": [[tn, fp], [fn, tp]]},
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "classification_report": classification_report(y, pred, output_dict=True, **report_kwargs),
        "classification_report_text": classification_report(y, pred, digits=3, **report_kwargs),
    }


# --------------------------------------------------------------------------- public API


def binary_metrics(
    y_true: Any, probabilities: Any, threshold: float, class_names: tuple[str, str]
) -> dict:
    """Metrics of a binary classifier at ``threshold`` and at 0.5.

    ``class_names = (negative_name, positive_name)``; ``y_true`` in {0, 1} with 1 = positive.
    A sample is predicted positive iff ``probability >= threshold``. Precision, recall and
    F1 are those of the positive class; undefined ratios are 0 (``zero_division=0``), except
    ``specificity``, which is ``None`` when there is no negative sample (a 0 would read as "every
    negative was misclassified").
    ``roc_auc`` is ``None`` unless both classes are present, ``average_precision`` is
    ``None`` when there is no positive sample. The result contains only plain Python
    types and no NaN, so ``json.dumps(result, allow_nan=False)`` works.
    """
    y, p = as_binary_arrays(y_true, probabilities)
    if y.size == 0:
        raise ValueError("binary_metrics needs at least one sample, got none")
    names = _check_class_names(class_names)
    thr = check_threshold(threshold)
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    from sklearn.metrics import average_precision_score, roc_auc_score

    roc_auc = float(roc_auc_score(y, p)) if n_pos and n_neg else None
    ap = float(average_precision_score(y, p, pos_label=1)) if n_pos else None
    result = {
        "n": int(y.size),
        "n_positive": n_pos,
        "n_negative": n_neg,
        "positive_class": names[1],
        "negative_class": names[0],
        "roc_auc": roc_auc,
        "average_precision": ap,
        "at_threshold": _block(y, p, thr, names),
        "at_0.5": _block(y, p, 0.5, names),
    }
    return _to_builtin(result)


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def format_threshold(threshold: float) -> str:
    """Short text for a threshold: 2 decimals when exact (0.5 -> "0.50"), else 3; tiny values keep 2 significant digits."""
    if 0.0 < threshold < 0.01:
        return f"{threshold:.2g}"
    if abs(round(threshold, 2) - threshold) < 1e-9:
        return f"{threshold:.2f}"
    return f"{threshold:.3f}"


def format_metrics_table(metrics: dict) -> str:
    """A short plain-text table of a :func:`binary_metrics` result for a terminal."""
    at_t = metrics["at_threshold"]
    at_half = metrics["at_0.5"]
    columns = (f"at chosen threshold ({format_threshold(at_t['threshold'])})", "at 0.5")
    rows = [(label, _fmt(at_t[key]), _fmt(at_half[key])) for label, key in _METRIC_ROWS]
    rows.append(
        (
            "TP/FP/TN/FN",
            *(f"{b['tp']}/{b['fp']}/{b['tn']}/{b['fn']}" for b in (at_t, at_half)),
        )
    )
    w0 = max(len("metric"), *(len(r[0]) for r in rows))
    w1 = max(len(columns[0]), *(len(r[1]) for r in rows))
    w2 = max(len(columns[1]), *(len(r[2]) for r in rows))
    lines = [
        f"n={metrics['n']}  positive '{metrics['positive_class']}': {metrics['n_positive']}"
        f"  negative '{metrics['negative_class']}': {metrics['n_negative']}",
        f"{'metric':<{w0}}  {columns[0]:>{w1}}  {columns[1]:>{w2}}",
        f"{'-' * w0}  {'-' * w1}  {'-' * w2}",
    ]
    lines += [f"{a:<{w0}}  {b:>{w1}}  {c:>{w2}}" for a, b, c in rows]
    lines.append(f"ROC AUC: {_fmt(metrics.get('roc_auc'))}")
    lines.append(f"Average precision (AP): {_fmt(metrics.get('average_precision'))}")
    return "\n".join(lines)
