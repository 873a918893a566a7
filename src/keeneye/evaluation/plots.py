"""Evaluation plots written as PNG files.

Figures are built as ``matplotlib.figure.Figure`` objects and saved directly, without
pyplot: no global figure state, no backend switch, so this module is safe to use from
notebooks or applications that already chose a matplotlib backend, and works headless.

Every function creates the parent folder if needed, writes a PNG (120 dpi, tight
bounding box), releases the figure and returns the path. Degenerate inputs (a single
class, no samples, a one-epoch history) produce a figure with an explanatory note
instead of an exception.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from keeneye.evaluation.metrics import as_binary_arrays, format_threshold, predict_labels

__all__ = [
    "plot_confusion_matrix",
    "plot_precision_recall",
    "plot_roc",
    "plot_threshold_curves",
    "plot_training_curves",
]

DPI = 120
_TRAIN_COLOR = "tab:blue"
_VAL_COLOR = "tab:orange"
_NOTE_STYLE = dict(
    ha="center",
    va="center",
    fontsize=11,
    wrap=True,
    bbox=dict(boxstyle="round,pad=0.6", facecolor="#fff3cd", edgecolor="#c9a227"),
)
_ACRONYMS = {"auc": "AUC", "prc": "PR AUC", "mae": "MAE", "mse": "MSE", "rmse": "RMSE", "f1": "F1"}
_PHASE_COLUMNS = ("phase", "stage")
_OUTSIDE_LEGEND = dict(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=9, title_fontsize=9)


# --------------------------------------------------------------------------- helpers


def _save(fig: Figure, path: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight", format="png")
    fig.clear()  # Figure objects are not registered with pyplot; clearing frees the artists
    return path


def _note(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, **_NOTE_STYLE)


def _pretty(name: str) -> str:
    base = name.lower()
    if base in ("lr", "learning_rate"):
        return "Learning rate"
    if base in _ACRONYMS:
        return _ACRONYMS[base]
    words = [_ACRONYMS.get(w, w) for w in re.split(r"[_\s]+", name) if w]
    text = " ".join(words)
    return text[:1].upper() + text[1:] if text else name


def _class_counts_text(y: np.ndarray) -> str:
    n_pos = int(y.sum())
    return f"{n_pos} positive, {int(y.size - n_pos)} negative"


# --------------------------------------------------------------------------- training curves


def _metric_families(history: pd.DataFrame) -> list[tuple[str, str | None, str | None]]:
    """[(family, train_column | None, val_column | None)] for numeric, non-empty columns."""
    numeric = [
        c
        for c in history.columns
        if str(c) != "epoch"
        and pd.api.types.is_numeric_dtype(history[c])
        and not pd.api.types.is_bool_dtype(history[c])
        and history[c].notna().any()
    ]
    names = [str(c) for c in numeric]
    families: dict[str, list[str | None]] = {}
    for name in names:
        base = name[4:] if name.startswith("val_") else name
        slot = families.setdefault(base, [None, None])
        slot[1 if name.startswith("val_") else 0] = name

    def order(base: str) -> tuple[int, int]:
        if base == "loss":
            return (0, 0)
        if base.lower() in ("lr", "learning_rate"):
            return (2, 0)
        return (1, names.index(families[base][0] or families[base][1]))

    return [(b, families[b][0], families[b][1]) for b in sorted(families, key=order)]


def _phase_boundaries(history: pd.DataFrame, x: np.ndarray) -> list[tuple[float, str]]:
    for col in _PHASE_COLUMNS:
        if col in history.columns and not pd.api.types.is_numeric_dtype(history[col]):
            values = history[col].astype(str).to_numpy()
            return [
                ((x[i - 1] + x[i]) / 2.0, values[i])
                for i in range(1, len(values))
                if values[i] != values[i - 1]
            ]
    return []


def plot_training_curves(history: pd.DataFrame, path: Any) -> Path:
    """Loss and metric curves per epoch, one subplot per metric family (train + val_).

    The x axis is the ``epoch`` column when present, else ``index + 1``. A column
    ``val_X`` without ``X`` (or vice versa) is drawn alone. The minimum ``val_loss``
    (else ``loss``) is marked. A non-numeric ``phase``/``stage`` column (e.g. head
    training then fine-tuning) is shown as dashed vertical separators.
    """
    history = pd.DataFrame(history).reset_index(drop=True)
    if "epoch" in history.columns and pd.api.types.is_numeric_dtype(history["epoch"]):
        x = history["epoch"].to_numpy(dtype=float)
    else:
        x = np.arange(1, len(history) + 1, dtype=float)
    families = _metric_families(history) if len(history) else []

    if not families:
        fig = Figure(figsize=(6, 3.5))
        ax = fig.add_subplot()
        ax.set_axis_off()
        ax.set_title("Training curves")
        _note(ax, "No training history to plot\n(no epochs or no numeric metric columns).")
        return _save(fig, path)

    ncols = min(3, len(families))
    nrows = -(-len(families) // ncols)
    fig = Figure(figsize=(5.0 * ncols, 3.6 * nrows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    boundaries = _phase_boundaries(history, x)
    marker = "o" if len(history) <= 30 else None

    for ax, (base, train_col, val_col) in zip(axes, families):
        for col, label, color in ((train_col, "train", _TRAIN_COLOR), (val_col, "validation", _VAL_COLOR)):
            if col is None:
                continue
            y = history[col].to_numpy(dtype=float)
            ax.plot(x, y, label=label, color=color, marker=marker, markersize=4, linewidth=1.8)
        if base == "loss":
            col = val_col or train_col
            y = history[col].to_numpy(dtype=float)
            if np.isfinite(y).any():
                i = int(np.nanargmin(y))
                ax.plot(
                    [x[i]], [y[i]], marker="*", markersize=14, color="tab:red", linestyle="none",
                    label=f"best {'val ' if val_col else ''}loss (epoch {x[i]:g})",
                )
        if base.lower() in ("lr", "learning_rate"):
            vals = history[train_col or val_col].to_numpy(dtype=float)
            vals = vals[np.isfinite(vals)]
            if vals.size and vals.min() > 0 and vals.max() / vals.min() > 10:
                ax.set_yscale("log")
        for bx, phase in boundaries:
            ax.axvline(bx, color="grey", linestyle="--", linewidth=1)
            ax.annotate(
                phase, xy=(bx, 1.0), xycoords=("data", "axes fraction"), xytext=(3, -3),
                textcoords="offset points", ha="left", va="top", fontsize=8, color="dimgrey",
            )
        ax.set_title(_pretty(base), fontsize=12)
        ax.set_xlabel("epoch")
        ax.set_ylabel(_pretty(base))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if len(x) == 1:
            ax.set_xlim(x[0] - 1, x[0] + 1)
        ax.grid(True, alpha=0.3)
        if train_col and val_col or base == "loss":
            ax.legend(fontsize=9)
    for ax in axes[len(families):]:
        ax.set_axis_off()
    fig.suptitle("Training curves", fontsize=14)
    return _save(fig, path)


# --------------------------------------------------------------------------- confusion matrix


def plot_confusion_matrix(
    matrix: Any, class_names: Sequence[str], path: Any, title: str = "Confusion matrix"
) -> Path:
    """Heatmap of a confusion matrix (rows = true class, columns = predicted class).

    ``matrix`` is ``[[tn, fp], [fn, tp]]`` (any square count matrix works) or the
    ``confusion_matrix`` dict of :func:`keeneye.evaluation.metrics.binary_metrics`.
    Cells show the count and the percentage of the true-class row; colour encodes the
    row percentage so that the rare class's row is as readable as the common one's.
    """
    if isinstance(matrix, dict):
        matrix = matrix["matrix"]
    counts = np.asarray(matrix, dtype=np.int64)
    names = [str(c) for c in class_names]
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1] or counts.shape[0] != len(names):
        raise ValueError(
            f"matrix must be square with one row per class name; got shape {counts.shape} "
            f"and {len(names)} class names"
        )
    row_totals = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        row_frac = np.where(row_totals > 0, counts / np.maximum(row_totals, 1), np.nan)
    annot = np.empty(counts.shape, dtype=object)
    for i, j in np.ndindex(counts.shape):
        pct = "n/a" if np.isnan(row_frac[i, j]) else f"{100 * row_frac[i, j]:.1f}%"
        annot[i, j] = f"{counts[i, j]}\n({pct})"

    size = 2.2 + 1.6 * len(names)
    fig = Figure(figsize=(size + 1.2, size), layout="constrained")
    ax = fig.add_subplot()
    import seaborn as sns  # here, not at the top: seaborn (with scipy.stats) takes seconds to import, and
    # every command that imports the API (`keeneye predict` too) would pay for it

    sns.heatmap(
        np.nan_to_num(row_frac, nan=0.0),
        annot=annot,
        fmt="",
        cmap="Blues",
        vmin=0.0,
        vmax=1.0,
        square=True,
        linewidths=1,
        linecolor="white",
        cbar_kws={"label": "share of true-class row"},
        annot_kws={"fontsize": 13},
        xticklabels=names,
        yticklabels=names,
        ax=ax,
    )
    ax.set_xlabel("predicted", fontsize=11)
    ax.set_ylabel("true", fontsize=11)
    ax.tick_params(axis="y", rotation=0)
    ax.set_title(f"{title}\n(n={int(counts.sum())})", fontsize=12)
    return _save(fig, path)


# --------------------------------------------------------------------------- precision-recall / ROC


def _point_at(y: np.ndarray, p: np.ndarray, threshold: float) -> tuple[float, float]:
    pred = predict_labels(p, threshold)
    tp = int(np.sum((pred == 1) & (y == 1)))
    predicted = int(pred.sum())
    precision = tp / predicted if predicted else 0.0
    recall = tp / int(y.sum())
    return precision, recall


def plot_precision_recall(y_true: Any, probabilities: Any, threshold: float, path: Any) -> Path:
    """Precision-recall curve of the positive class with AP, marking the point at ``threshold``."""
    y, p = as_binary_arrays(y_true, probabilities)
    fig = Figure(figsize=(6.2, 5.2), layout="constrained")
    ax = fig.add_subplot()
    ax.set_title("Precision-recall curve (positive class)", fontsize=12)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.05)
    ax.grid(True, alpha=0.3)

    n_pos = int(y.sum())
    if n_pos == 0:
        _note(
            ax,
            "Precision-recall curve undefined:\nno positive samples "
            f"({_class_counts_text(y)}).",
        )
        return _save(fig, path)

    from sklearn.metrics import average_precision_score, precision_recall_curve  # slow import: see plot_confusion_matrix

    precision, recall, _ = precision_recall_curve(y, p, pos_label=1)
    ap = average_precision_score(y, p, pos_label=1)
    ax.plot(recall, precision, drawstyle="steps-post", linewidth=2, color=_TRAIN_COLOR,
            label=f"PR curve (AP = {ap:.3f})")
    prevalence = n_pos / y.size
    ax.axhline(prevalence, color="grey", linestyle=":", linewidth=1.2,
               label=f"chance (prevalence = {prevalence:.3f})")
    prec_t, rec_t = _point_at(y, p, threshold)
    ax.plot([rec_t], [prec_t], marker="o", markersize=10, color="tab:red", linestyle="none",
            label=f"threshold {format_threshold(threshold)}")
    ax.annotate(
        f"t = {format_threshold(threshold)}\nP = {prec_t:.3f}, R = {rec_t:.3f}",
        xy=(rec_t, prec_t),
        xytext=(-12 if rec_t > 0.5 else 12, -28 if prec_t > 0.5 else 28),
        textcoords="offset points",
        ha="right" if rec_t > 0.5 else "left",
        va="top" if prec_t > 0.5 else "bottom",
        fontsize=9,
        arrowprops=dict(arrowstyle="-", color="tab:red", linewidth=1),
        bbox=dict(boxstyle="round,pad=0.3", facecolor="white", edgecolor="tab:red", alpha=0.9),
    )
    ax.legend(loc="lower left", fontsize=9)
    if n_pos == y.size:
        ax.text(0.5, 0.12, "note: no negative samples, precision is 1 everywhere",
                transform=ax.transAxes, ha="center", fontsize=9, color="dimgrey")
    return _save(fig, path)


def plot_roc(y_true: Any, probabilities: Any, path: Any) -> Path:
    """ROC curve with its AUC and the chance diagonal."""
    y, p = as_binary_arrays(y_true, probabilities)
    fig = Figure(figsize=(6.2, 5.2), layout="constrained")
    ax = fig.add_subplot()
    ax.set_title("ROC curve", fontsize=12)
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (recall)")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_aspect("equal")
    ax.grid(True, alpha=0.3)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1.2, label="chance (AUC = 0.5)")

    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        _note(ax, f"ROC curve undefined:\nneeds both classes ({_class_counts_text(y)}).")
        return _save(fig, path)

    from sklearn.metrics import roc_auc_score, roc_curve  # slow import: see plot_confusion_matrix

    fpr, tpr, _ = roc_curve(y, p, pos_label=1)
    auc = roc_auc_score(y, p)
    ax.plot(fpr, tpr, linewidth=2, color=_TRAIN_COLOR, label=f"ROC (AUC = {auc:.3f})")
    ax.legend(loc="lower right", fontsize=9)
    return _save(fig, path)


# --------------------------------------------------------------------------- threshold curves


def _curves_vs_threshold(y: np.ndarray, p: np.ndarray, grid: np.ndarray) -> dict[str, np.ndarray]:
    """Precision, recall and F1 (positive class) at every threshold of ``grid``, vectorised.

    Uses the rule positive iff p >= t; undefined values (nothing predicted positive) are NaN
    so that the curve shows a gap instead of an arbitrary value.
    """
    sorted_all = np.sort(p)
    sorted_pos = np.sort(p[y == 1])
    predicted_pos = sorted_all.size - np.searchsorted(sorted_all, grid, side="left")
    tp = sorted_pos.size - np.searchsorted(sorted_pos, grid, side="left")
    n_pos = sorted_pos.size
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(predicted_pos > 0, tp / np.maximum(predicted_pos, 1), np.nan)
        recall = tp / n_pos if n_pos else np.full(grid.shape, np.nan)
        denom = predicted_pos + n_pos
        f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), np.nan)
    if n_pos == 0:
        f1 = np.full(grid.shape, np.nan)
    return {"precision": precision, "recall": recall, "F1": f1}


def plot_threshold_curves(y_true: Any, probabilities: Any, threshold: float, path: Any) -> Path:
    """F1, precision and recall of the positive class vs threshold (0..1).

    The chosen threshold is a vertical line (0.5 is a faint reference line); a lower
    panel shows the distribution of validation probabilities per class.
    """
    y, p = as_binary_arrays(y_true, probabilities)
    fig = Figure(figsize=(9.0, 6.4), layout="constrained")
    ax, ax_hist = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1.3]})
    ax.set_title("Metrics of the positive class vs decision threshold", fontsize=12)
    ax.set_ylabel("score")
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.02, 1.05)
    ax.grid(True, alpha=0.3)
    ax_hist.set_xlabel("threshold (predict positive iff probability >= threshold)")
    ax_hist.set_ylabel("density")
    ax_hist.grid(True, alpha=0.3)

    t_label = f"chosen threshold {format_threshold(threshold)}"
    if y.size == 0:
        _note(ax, "No samples: nothing to plot.")
        ax.axvline(threshold, color="tab:red", linewidth=1.8, label=t_label)
        ax.legend(**_OUTSIDE_LEGEND)
        return _save(fig, path)

    grid = np.unique(np.concatenate([np.linspace(0.0, 1.0, 1001), p, [threshold]]))
    curves = _curves_vs_threshold(y, p, grid)
    styles = {"F1": ("tab:green", 2.4, "-"), "precision": (_TRAIN_COLOR, 1.6, "-"),
              "recall": (_VAL_COLOR, 1.6, "-")}
    for name, (color, width, style) in styles.items():
        if np.isfinite(curves[name]).any():
            ax.plot(grid, curves[name], color=color, linewidth=width, linestyle=style, label=name)
    ax.axvline(0.5, color="grey", linestyle=":", linewidth=1)
    idx = int(np.searchsorted(grid, threshold))
    f1_t = curves["F1"][idx]
    extra = f" (F1 = {f1_t:.3f})" if np.isfinite(f1_t) else ""
    ax.axvline(threshold, color="tab:red", linewidth=1.8, label=t_label + extra)
    ax.legend(**_OUTSIDE_LEGEND)
    if int(y.sum()) == 0:
        _note(ax, f"No positive samples ({_class_counts_text(y)}):\nrecall and F1 are undefined.")

    bins = np.linspace(0.0, 1.0, 41)
    for label_value, name, color in ((0, "negative", _TRAIN_COLOR), (1, "positive", _VAL_COLOR)):
        values = p[y == label_value]
        if values.size:
            ax_hist.hist(values, bins=bins, density=True, alpha=0.5, color=color,
                         label=f"{name} (n={values.size})")
    ax_hist.axvline(threshold, color="tab:red", linewidth=1.8)
    ax_hist.legend(title="probabilities by true class", **_OUTSIDE_LEGEND)
    return _save(fig, path)
