"""The exact logistic head (head.kind "logistic", head.auto's logistic candidate): fitted by scikit-learn,
transplanted into the plain Keras head, C chosen by group cross-validation. Synthetic embeddings: no backbone."""

from __future__ import annotations

import numpy as np
import pytest

from keeneye.config import EvaluationConfig, HeadConfig, TrainingConfig, config_from_dict
from keeneye.errors import ConfigError
from keeneye.training.crossval import AUTO_CANDIDATES, candidates_for, group_folds, run_cross_validation
from keeneye.training.fit import choose_logistic_c, fit_logistic, fit_logistic_head, logistic_head, logistic_path


def embeddings(n: int = 240, d: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of 6 near-copies per group (like magnetic-tile's shots of one tile), far from standardised:
    means around 1, scales from 0.05 to 5 (real MobileNetV2 features: 0.001 to 6), one constant column; the label depends on a few columns."""
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(n // 6), 6)
    base = rng.normal(size=(n // 6, d))[groups] + 0.3 * rng.normal(size=(n, d))
    y = (base[:, 0] - 0.8 * base[:, 1] + 0.5 * rng.normal(size=n) > 0.9).astype(int)
    scale = np.geomspace(0.05, 5, d)
    x = 1.0 + base * scale
    x[:, 5] = 2.5  # zero variance: the scaler keeps its scale at 1
    return x.astype(np.float32), y, groups


def test_transplanted_head_gives_sklearn_probabilities() -> None:
    x, y, _ = embeddings()
    model = fit_logistic(x, y, c=0.1, class_weight="balanced")
    head = logistic_head(model)
    expected = model.predict_proba(x.astype(np.float64))[:, 1]
    got = np.asarray(head(x, training=False)).reshape(-1)
    assert np.abs(got - expected).max() < 1e-5
    assert [layer.__class__.__name__ for layer in head.layers] == ["InputLayer", "Dense"]  # plain one-layer head
    assert np.ptp(expected) > 0.5  # a model that separates, not a constant


def test_exact_fit_is_deterministic_and_warm_starts_reach_the_cold_optimum() -> None:
    x, y, _ = embeddings(seed=1)
    grid = [1e-3, 1e-2, 1e-1]
    path = logistic_path(x, y, grid)
    for c, warm in zip(grid, path):
        cold = fit_logistic(x, y, c)
        diff = np.abs(warm.predict_proba(x.astype(np.float64))[:, 1] - cold.predict_proba(x.astype(np.float64))[:, 1])
        assert diff.max() < 1e-3
    again = fit_logistic_head(x, y, 1e-2)
    first = fit_logistic_head(x, y, 1e-2)
    assert np.array_equal(first.get_weights()[0], again.get_weights()[0])


def test_cross_validation_chooses_c_by_pooled_out_of_fold_ap() -> None:
    from sklearn.metrics import average_precision_score

    x, y, groups = embeddings(seed=2)
    grid = [1e-4, 1e-2, 1.0]
    head = HeadConfig(kind="logistic", logistic_c=grid)
    cv = run_cross_validation(x, y, groups, head, TrainingConfig(seed=0, cv_folds=4), EvaluationConfig())
    result = cv.best
    scores = result.c_scores
    assert sorted(scores) == grid
    (chosen,) = result.candidate.logistic_c
    assert scores[chosen] == max(scores.values())
    assert result.ap == pytest.approx(scores[chosen])
    # the OOF probabilities are the fold heads' (the Keras transplants) on their held-out fold
    folds = cv.folds
    assert np.array_equal(folds, group_folds(y, groups, 4, 0))
    for k, fold_head in enumerate(result.heads):
        held = folds == k
        assert np.abs(np.asarray(fold_head(x[held])).reshape(-1) - result.oof[held]).max() < 1e-5
        assert len(set(groups[held]) & set(groups[~held])) == 0
    assert average_precision_score(y, result.oof) > 0.6 > 2 * y.mean()  # it learned the signal (chance: the prevalence)
    assert cv.refit_epochs == 1
    assert cv.to_dict()["candidates"][0]["logistic_c_oof_average_precision"].keys() == {f"{c:g}" for c in grid}


def test_choose_c_without_cross_validation() -> None:
    x, y, _ = embeddings(seed=3)
    assert choose_logistic_c(x, y, x[:0], y[:0], [0.5])[0] == 0.5
    assert choose_logistic_c(x, y, x[:0], y[:0], [1e-3, 1e-2, 1e-1])[0] == 1e-2  # nothing to choose by: the middle
    c, how = choose_logistic_c(x[:160], y[:160], x[160:], y[160:], [1e-4, 1e-1])
    assert c in (1e-4, 1e-1) and "validation AP" in how


def test_logistic_is_a_candidate_of_head_auto_and_a_configurable_kind() -> None:
    assert AUTO_CANDIDATES[0].kind == "logistic"  # the simplest: ties within one standard error go to it
    configured = candidates_for(HeadConfig(kind="logistic", logistic_c=[0.01]), TrainingConfig(class_weight="balanced"))
    assert [(c.kind, c.logistic_c, c.class_weight) for c in configured] == [("logistic", (0.01,), "balanced")]
    assert configured[0].head_config().dense_units == []


def test_logistic_kind_rejects_hidden_layers_with_a_clear_message(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r'head\.kind.*"logistic" is one linear layer.*remove dense_units'):
        config_from_dict({"data_folder_path": str(tmp_path), "head": {"kind": "logistic", "dense_units": [64]}})
    cfg = config_from_dict({"data_folder_path": str(tmp_path), "head": {"kind": "logistic"}})
    assert (cfg.head.dense_units, cfg.head.dropout, cfg.head.l2) == ([], 0.0, 0.0)


def test_train_publishes_the_exact_logistic_refit(tmp_path, demo_data, imagenet_weights) -> None:
    """End to end (tiny real backbone): the bundle's head is the logistic regression refit on training +
    validation at the cross-validated C, and loads as plain Keras."""
    import keras
    import pandas as pd
    from rich.console import Console

    from conftest import tiny_config
    from keeneye import api
    from keeneye.data.decode import load_image

    config = config_from_dict(tiny_config(tmp_path, demo_data, run_name="logistic",
                                          head={"kind": "logistic", "dense_units": [], "dropout": 0.0}), base_dir=tmp_path)
    result = api.train(config, console=Console(quiet=True))
    (candidate,) = result.metrics["cross_validation"]["candidates"]
    assert candidate["kind"] == "logistic" and len(candidate["logistic_c"]) == 1
    model = keras.saving.load_model(result.run_dir / "model.keras")
    head, extractor = model.get_layer("head"), model.get_layer("feature_extractor")
    assert [type(layer).__name__ for layer in head.layers] == ["InputLayer", "Dense"]
    manifest = pd.read_csv(result.run_dir / "manifest.csv")
    pool = manifest[manifest["split"].isin(["training", "validation"]) & manifest["used"]]
    images = np.stack([load_image(path, config.model.image_size) for path in pool["path"]])
    features = np.asarray(extractor(images))
    y = (pool["label"] == "defect").to_numpy().astype(int)
    expected = fit_logistic(features, y, candidate["logistic_c"][0], config.training.class_weight).predict_proba(
        features.astype(np.float64))[:, 1]
    assert np.abs(np.asarray(head(features)).reshape(-1) - expected).max() < 1e-3
