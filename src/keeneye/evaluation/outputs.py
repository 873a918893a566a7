"""Write one evaluation's files: metrics.json, predictions.csv and the plots (train and evaluate share it)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from keeneye.evaluation.metrics import binary_metrics, predict_labels
from keeneye.evaluation.plots import plot_confusion_matrix, plot_precision_recall, plot_roc, plot_threshold_curves


def write_evaluation(
    folder: Path,
    paths: list[str],
    labels: list[str],
    probabilities: np.ndarray,
    threshold: float,
    class_names: tuple[str, str],
    extra: dict | None = None,
) -> dict:
    """Metrics at `threshold` (and 0.5), per-image predictions and plots; returns the metrics dict."""
    folder.mkdir(parents=True, exist_ok=True)
    negative, positive = class_names
    y_true = (np.asarray(labels) == positive).astype(int)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    metrics = binary_metrics(y_true, probabilities, threshold, class_names)
    if extra:
        metrics.update(extra)
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=False))
    pd.DataFrame(
        {
            "path": paths,
            "label": labels,
            "probability": probabilities,
            "predicted": np.where(predict_labels(probabilities, threshold) == 1, positive, negative),
        }
    ).to_csv(folder / "predictions.csv", index=False)
    if len(y_true):
        plot_confusion_matrix(
            metrics["at_threshold"]["confusion_matrix"]["matrix"], list(class_names), folder / "confusion_matrix.png",
            title=f"Confusion matrix (threshold {threshold:.3f})",
        )
        plot_precision_recall(y_true, probabilities, threshold, folder / "precision_recall.png")
        plot_roc(y_true, probabilities, folder / "roc.png")
        plot_threshold_curves(y_true, probabilities, threshold, folder / "threshold_curves.png")
    return metrics
