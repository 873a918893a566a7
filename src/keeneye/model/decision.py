"""keeneye's one decision rule: positive iff probability (or normalised anomaly score) >= threshold.

It lives at the model layer, below evaluation, inference and serving, so every caller (metrics,
Grad-CAM, anomaly maps, predictions files, the report) uses this one function.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def predict_labels(probabilities: Any, threshold: float) -> np.ndarray:
    """The keeneye decision rule: 1 (positive) iff ``probability >= threshold``, else 0."""
    p = np.asarray(probabilities, dtype=np.float64)
    return (p >= float(threshold)).astype(np.int64)
