"""Tests for keeneye.evaluation: threshold choice, metrics and plots."""

from __future__ import annotations

import json

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score

from keeneye.evaluation import plots
from keeneye.evaluation.metrics import (
    as_binary_arrays,
    binary_metrics,
    format_metrics_table,
    predict_labels,
)
from keeneye.config import EvaluationConfig
from keeneye.evaluation.threshold import ThresholdChoice, choose_configured_threshold, choose_threshold

NAMES = ("good", "defect")


def _f1(y, p, t):
    return f1_score(y, (np.asarray(p, dtype=float) >= t).astype(int), zero_division=0)


def _random_case(seed: int, n: int = 80):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(int)
    y[:5], y[5:10] = 1, 0  # at least 5 of each class
    # rounded so that equal scores occur, also across classes
    p = np.round(np.clip(rng.normal(0.35 + 0.3 * y, 0.18), 0, 1), 2)
    return y, p


# --------------------------------------------------------------------------- threshold


@pytest.mark.parametrize("seed", range(8))
def test_choose_threshold_maximises_f1_like_brute_force(seed):
    y, p = _random_case(seed)
    choice = choose_threshold(y, p)
    assert choice.method == "max_f1_on_validation"
    assert choice.warning is None
    assert type(choice.threshold) is float and type(choice.validation_f1) is float

    # brute force over every candidate: each distinct score (and above the maximum)
    candidates = np.append(np.unique(p), 1.0 + 1e-9)
    scores = [_f1(y, p, t) for t in candidates]
    best = max(scores)
    assert choice.validation_f1 == pytest.approx(best, abs=1e-12)
    assert _f1(y, p, choice.threshold) == pytest.approx(best, abs=1e-12)

    # tie-break: the lowest best cut, and the returned threshold keeps its decisions
    lowest_best_cut = candidates[int(np.flatnonzero(np.isclose(scores, best, atol=1e-12))[0])]
    np.testing.assert_array_equal(predict_labels(p, choice.threshold), predict_labels(p, lowest_best_cut))

    # placed at the midpoint between the cut and the next-lower distinct score
    lower = p[p < lowest_best_cut]
    expected = (lowest_best_cut + (lower.max() if lower.size else 0.0)) / 2
    assert choice.threshold == pytest.approx(expected)
    assert not np.any(p == choice.threshold)


def test_choose_threshold_tie_takes_lowest_cut_and_midpoint():
    # F1 = 0.8 at cut 0.75 (tp=4, fp=0, fn=2) and at cut 0.5 (tp=6, fp=3, fn=0)
    pos = [0.9, 0.85, 0.8, 0.75, 0.55, 0.5]
    neg = [0.7, 0.65, 0.6, 0.3, 0.2, 0.1]
    y = np.r_[np.ones(len(pos), int), np.zeros(len(neg), int)]
    p = np.r_[pos, neg]
    assert _f1(y, p, 0.75) == pytest.approx(0.8) and _f1(y, p, 0.5) == pytest.approx(0.8)
    choice = choose_threshold(y, p)
    assert choice.threshold == pytest.approx(0.4)  # midpoint of 0.5 and the next-lower 0.3
    assert choice.validation_f1 == pytest.approx(0.8)
    # permutation of the samples does not matter
    order = np.random.default_rng(0).permutation(y.size)
    assert choose_threshold(y[order], p[order]).threshold == choice.threshold


def test_choose_threshold_lowest_score_cut_uses_zero_as_lower_bound():
    # everything positive is optimal: the best cut is the minimum score
    y = np.r_[np.ones(20, int), np.zeros(5, int)]
    p = np.r_[np.linspace(0.2, 0.9, 20), [0.2, 0.25, 0.3, 0.35, 0.4]]
    choice = choose_threshold(y, p)
    assert _f1(y, p, choice.threshold) == pytest.approx(max(_f1(y, p, t) for t in np.unique(p)))
    assert choice.threshold == pytest.approx(0.1)


def test_choose_threshold_float32_neighbours_keep_decisions():
    cut = np.float32(np.nextafter(np.float32(0.5), np.float32(1)))  # 0.5 and cut are adjacent
    p = np.r_[np.full(5, cut), np.full(5, 0.5), [0.1, 0.2]].astype(np.float32)
    y = np.r_[np.ones(5, int), np.zeros(7, int)]
    choice = choose_threshold(y, p)
    assert choice.validation_f1 == 1.0
    # the decisions hold whether the float32 scores are compared in float32 or float64
    np.testing.assert_array_equal((p >= choice.threshold).astype(int), y)
    np.testing.assert_array_equal((p >= np.float32(choice.threshold)).astype(int), y)
    np.testing.assert_array_equal(predict_labels(p, choice.threshold), y)


def test_choose_threshold_accepts_keras_shaped_predictions():
    y, p = _random_case(3)
    assert choose_threshold(y, p.reshape(-1, 1)) == choose_threshold(list(y), pd.Series(p))


@pytest.mark.parametrize(
    ("n_pos", "n_neg"), [(4, 50), (50, 4), (0, 30), (30, 0), (0, 0)]
)
def test_choose_threshold_falls_back_with_warning(n_pos, n_neg):
    rng = np.random.default_rng(1)
    y = np.r_[np.ones(n_pos, int), np.zeros(n_neg, int)]
    p = rng.random(y.size)
    choice = choose_threshold(y, p, min_per_class=5)
    assert choice.threshold == 0.5
    assert choice.method == "default_0.5"
    assert f"{n_pos} positive" in choice.warning and f"{n_neg} negative" in choice.warning
    assert "at least 5" in choice.warning
    if y.size:
        assert choice.validation_f1 == pytest.approx(_f1(y, p, 0.5))
    else:
        assert choice.validation_f1 is None


def test_choose_threshold_min_per_class_is_configurable():
    y = np.r_[np.ones(3, int), np.zeros(3, int)]
    p = np.array([0.9, 0.8, 0.7, 0.3, 0.2, 0.1])
    assert choose_threshold(y, p).method == "default_0.5"
    choice = choose_threshold(y, p, min_per_class=3)
    assert choice.method == "max_f1_on_validation"
    assert choice.threshold == pytest.approx(0.5) and choice.validation_f1 == 1.0


def test_choose_threshold_fixed():
    y, p = _random_case(2)
    choice = choose_threshold(y, p, fixed=0.3)
    assert choice == ThresholdChoice(0.3, "fixed", pytest.approx(_f1(y, p, 0.3)), None)
    # fixed wins even without enough validation data; F1 only when there is data
    assert choose_threshold([1], [0.9], fixed=0.7).method == "fixed"
    assert choose_threshold([], [], fixed=0.7).validation_f1 is None
    with pytest.raises(ValueError):
        choose_threshold(y, p, fixed=1.5)



@pytest.mark.parametrize("settings", [
    {},
    {"threshold": 0.3},
    {"min_validation_per_class": 40},
    {"threshold_objective": "recall_at_precision", "target_precision": 0.9},
    {"threshold_objective": "precision_at_recall", "target_recall": 0.8},
])
def test_configured_threshold_applies_every_evaluation_setting(settings):
    """The one reader of the evaluation section's threshold rule gives what choose_threshold gives with those settings
    spelled out, for each of them (fixed, the per-class minimum, both objectives and their targets)."""
    y, p = _random_case(5)
    ev = EvaluationConfig(**settings)
    fixed = None if ev.threshold == "auto" else ev.threshold
    for source in ("validation", "out_of_fold"):
        expected = choose_threshold(y, p, min_per_class=ev.min_validation_per_class, fixed=fixed,
                                    objective=ev.threshold_objective, target=ev.objective_target, source=source)
        assert choose_configured_threshold(ev, y, p, source=source) == expected
    if settings:  # each setting changes the choice here, so a helper that dropped one would fail above
        assert choose_configured_threshold(ev, y, p) != choose_configured_threshold(EvaluationConfig(), y, p)

def test_threshold_choice_to_dict_is_json():
    d = choose_threshold(*_random_case(0)).to_dict()
    assert set(d) == {"threshold", "method", "validation_f1", "warning"}
    json.dumps(d, allow_nan=False)
    d = choose_threshold([1, 0], [0.2, 0.4]).to_dict()
    assert d["warning"] and json.loads(json.dumps(d))["threshold"] == 0.5


@pytest.mark.parametrize(
    ("y", "p"),
    [([0, 1, 2], [0.1, 0.2, 0.3]), ([0, 1], [0.1]), ([0, 1], [0.1, np.nan]), ([0, 1], [0.1, 1.2]),
     (["a", "b"], [0.1, 0.2])],
)
def test_invalid_inputs_raise(y, p):
    with pytest.raises(ValueError):
        as_binary_arrays(y, p)
    with pytest.raises(ValueError):
        choose_threshold(y, p)


# --------------------------------------------------------------------------- metrics


def test_binary_metrics_hand_computed():
    y = [0, 0, 0, 0, 0, 0, 1, 1, 1, 1]
    p = [0.1, 0.2, 0.3, 0.6, 0.7, 0.45, 0.4, 0.55, 0.9, 0.3]
    # at 0.4 (p == 0.4 counts as positive): pred = 0 0 0 1 1 1 | 1 1 1 0
    m = binary_metrics(y, p, 0.4, NAMES)
    assert (m["n"], m["n_positive"], m["n_negative"]) == (10, 4, 6)
    assert (m["positive_class"], m["negative_class"]) == ("defect", "good")
    b = m["at_threshold"]
    assert (b["tn"], b["fp"], b["fn"], b["tp"]) == (3, 3, 1, 3)
    assert b["confusion_matrix"] == {"labels": ["good", "defect"], "matrix": [[3, 3], [1, 3]]}
    assert b["threshold"] == 0.4
    assert b["precision"] == pytest.approx(3 / 6)
    assert b["recall"] == pytest.approx(3 / 4)
    assert b["f1"] == pytest.approx(2 * 3 / (2 * 3 + 3 + 1))
    assert b["accuracy"] == pytest.approx(6 / 10)
    assert b["specificity"] == pytest.approx(3 / 6)
    # at 0.5: pred = 0 0 0 1 1 0 | 0 1 1 0
    h = m["at_0.5"]
    assert h["confusion_matrix"]["matrix"] == [[4, 2], [2, 2]]
    assert h["specificity"] == pytest.approx(4 / 6)
    assert h["classification_report"]["defect"]["recall"] == pytest.approx(0.5)
    assert h["classification_report"]["good"]["support"] == 6
    assert "defect" in h["classification_report_text"]
    # (positive, negative) pairs ranked correctly: 3 + 4 + 6 + 2 and one tie (0.3, 0.3) of 24
    assert m["roc_auc"] == pytest.approx(15.5 / 24)
    assert 0 < m["average_precision"] <= 1
    json.dumps(m, allow_nan=False)


@pytest.mark.parametrize("label", [0, 1])
def test_binary_metrics_one_class(label):
    y = [label] * 6
    p = [0.1, 0.2, 0.6, 0.7, 0.8, 0.3]
    m = binary_metrics(y, p, 0.5, NAMES)
    assert m["roc_auc"] is None
    assert (m["average_precision"] is None) == (label == 0)
    text = json.dumps(m, allow_nan=False)
    assert "NaN" not in text
    for block in (m["at_threshold"], m["at_0.5"]):
        assert block["tn"] + block["fp"] + block["fn"] + block["tp"] == 6
        assert set(block["classification_report"]) >= {"good", "defect"}


def test_binary_metrics_plain_python_types():
    y, p = _random_case(5)
    m = binary_metrics(np.asarray(y), np.asarray(p, dtype=np.float32), np.float64(0.42), NAMES)

    def walk(v):
        if isinstance(v, dict):
            for k, x in v.items():
                assert type(k) is str
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)
        else:
            assert v is None or type(v) in (int, float, str, bool), type(v)

    walk(m)
    assert json.loads(json.dumps(m, allow_nan=False)) == m


def test_binary_metrics_rejects_bad_arguments():
    with pytest.raises(ValueError):
        binary_metrics([], [], 0.5, NAMES)
    with pytest.raises(ValueError):
        binary_metrics([0, 1], [0.2, 0.8], 0.5, ("same", "same"))
    with pytest.raises(ValueError):
        binary_metrics([0, 1], [0.2, 0.8], float("nan"), NAMES)


def test_format_metrics_table():
    m = binary_metrics(*_random_case(4), 0.4375, NAMES)
    table = format_metrics_table(m)
    assert "at chosen threshold (0.438)" in table and "at 0.5" in table
    for row in ("F1", "precision", "recall", "accuracy", "specificity", "ROC AUC", "AP"):
        assert row in table
    one_class = format_metrics_table(binary_metrics([0, 0], [0.1, 0.2], 0.5, NAMES))
    assert "ROC AUC: n/a" in one_class and "(0.50)" in one_class


# --------------------------------------------------------------------------- plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _assert_png(path):
    assert path.is_file() and path.stat().st_size > 0
    assert path.read_bytes()[:8] == PNG_MAGIC
    img = mpimg.imread(path)
    assert img.shape[0] > 100 and img.shape[1] > 100


@pytest.fixture(scope="module")
def scores():
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(150, int), np.ones(15, int)]
    p = np.r_[rng.beta(2, 6, 150), rng.beta(5, 2, 15)].astype(np.float32)
    return y, p


def test_plot_training_curves(tmp_path):
    n = 8
    history = pd.DataFrame(
        {
            "epoch": np.arange(n),
            "loss": np.linspace(0.9, 0.2, n),
            "val_loss": np.linspace(1.0, 0.4, n),
            "auc": np.linspace(0.6, 0.97, n),
            "val_auc": np.linspace(0.55, 0.9, n),
            "precision": np.linspace(0.3, 0.9, n),  # no val_ partner
            "val_recall": np.linspace(0.3, 0.8, n),  # no train partner
            "learning_rate": [1e-3] * 4 + [1e-5] * 4,
            "phase": ["head"] * 4 + ["fine_tune"] * 4,
        }
    )
    _assert_png(plots.plot_training_curves(history, tmp_path / "a" / "b" / "curves.png"))


@pytest.mark.parametrize(
    "history",
    [
        pd.DataFrame({"loss": [0.7], "val_loss": [0.8], "auc": [0.6]}),
        pd.DataFrame({"loss": [0.7, 0.5], "val_loss": [np.nan, np.nan]}),
        pd.DataFrame(),
        pd.DataFrame({"loss": []}),
    ],
    ids=["single-epoch", "all-nan-val", "empty", "no-rows"],
)
def test_plot_training_curves_degenerate(tmp_path, history):
    _assert_png(plots.plot_training_curves(history, tmp_path / "curves.png"))


@pytest.mark.parametrize("matrix", [[[140, 10], [3, 12]], [[10, 0], [0, 0]], [[0, 0], [0, 0]]])
def test_plot_confusion_matrix(tmp_path, matrix):
    out = plots.plot_confusion_matrix(matrix, NAMES, tmp_path / "sub" / "cm.png", title="Test set")
    assert out == tmp_path / "sub" / "cm.png"
    _assert_png(out)


def test_plot_confusion_matrix_accepts_metrics_dict_and_checks_shape(tmp_path, scores):
    m = binary_metrics(*scores, 0.5, NAMES)
    _assert_png(plots.plot_confusion_matrix(m["at_0.5"]["confusion_matrix"], NAMES, tmp_path / "cm.png"))
    with pytest.raises(ValueError):
        plots.plot_confusion_matrix([[1, 2, 3]], NAMES, tmp_path / "bad.png")


def test_plot_curves_regular(tmp_path, scores):
    y, p = scores
    _assert_png(plots.plot_precision_recall(y, p, 0.61, tmp_path / "pr.png"))
    _assert_png(plots.plot_threshold_curves(y, p, 0.61, tmp_path / "thr.png"))
    _assert_png(plots.plot_roc(y, p, tmp_path / "roc.png"))


@pytest.mark.parametrize(
    ("y", "p"),
    [([0] * 6, [0.1, 0.2, 0.3, 0.4, 0.5, 0.9]), ([1] * 6, [0.1, 0.2, 0.3, 0.4, 0.5, 0.9]), ([], [])],
    ids=["only-negative", "only-positive", "empty"],
)
def test_plot_curves_degenerate(tmp_path, y, p):
    _assert_png(plots.plot_precision_recall(y, p, 0.5, tmp_path / "pr.png"))
    _assert_png(plots.plot_threshold_curves(y, p, 0.5, tmp_path / "thr.png"))
    _assert_png(plots.plot_roc(y, p, tmp_path / "roc.png"))


def test_plots_leave_pyplot_state_alone(tmp_path, scores):
    import matplotlib
    import matplotlib.pyplot as plt

    backend = matplotlib.get_backend()
    figures = plt.get_fignums()
    plots.plot_roc(*scores, tmp_path / "roc.png")
    assert plt.get_fignums() == figures
    assert matplotlib.get_backend() == backend
