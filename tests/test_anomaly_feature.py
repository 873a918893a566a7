"""head.anomaly_feature: the one-class patch score stacked onto the supervised probability (training/anomaly_feature.py)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from rich.console import Console

from conftest import tiny_config


def test_stacker_is_the_standardised_logistic_regression_folded():
    """fit_stacker's three numbers give scikit-learn's probabilities of the standardised fit (what the probe measured)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from keeneye.model.anomaly_feature import stacking_inputs
    from keeneye.training.anomaly_feature import fit_stacker

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    p = 1 / (1 + np.exp(-(2 * y - 1 + rng.normal(0, 1.5, 300))))
    s = np.exp(0.8 * y + rng.normal(0, 0.7, 300))
    x = stacking_inputs(p, s)
    stacker = fit_stacker(x, y)
    reference = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000)).fit(x, y).predict_proba(x)[:, 1]
    np.testing.assert_allclose(stacker(p, s), reference, atol=1e-9)
    assert stacker.coef_logit > 0 and stacker.coef_log_score > 0


def test_out_of_fold_scores_never_use_the_image_itself():
    """Each image is scored against the good images of the other folds: a bank holding its own patches would give 0."""
    from keeneye.config import AnomalyConfig, config_from_dict
    from keeneye.training.anomaly_feature import _raw_scores, oof_raw_scores

    rng = np.random.default_rng(1)
    grids = rng.normal(size=(30, 2, 2, 8)).astype(np.float16)
    y, folds = np.r_[np.zeros(20, int), np.ones(10, int)], np.arange(30) % 3
    cfg = config_from_dict({"data_folder_path": ".", "anomaly": {"coreset_share": 1.0, "score_top_k": 1}}, base_dir=".")
    assert isinstance(cfg.anomaly, AnomalyConfig)
    raw = oof_raw_scores(grids, y, folds, cfg)
    assert np.all(raw > 0.1)
    own, _ = _raw_scores(grids, np.flatnonzero(y == 0), np.flatnonzero(y == 0), cfg)
    assert np.all(own < 0.01)  # what a leak would look like (0 up to the float noise of the GEMM search)


@pytest.mark.slow  # a full train with two backbone graphs and a predictor load: ~20 s on a quiet machine
def test_stacked_bundle_predicts_the_probabilities_training_scored(tmp_path, demo_data, imagenet_weights):
    """Train with head.anomaly_feature (real weights, 96 px); predict from the bundle gives the test split's
    probabilities of training within 1e-4, and the one-class score really moves them."""
    from keeneye import api
    from keeneye.bundle import ANOMALY_FEATURE_BANK_FILE, ANOMALY_FEATURE_MODEL_FILE
    from keeneye.config import config_from_dict
    from keeneye.inference.predictor import Predictor

    head = {"kind": "logistic", "dense_units": [], "dropout": 0.0, "anomaly_feature": True}
    config = config_from_dict(tiny_config(tmp_path, demo_data, run_name="stacked", head=head,
                                          anomaly={"max_bank_size": 500}), base_dir=tmp_path)
    result = api.train(config, console=Console(quiet=True))
    run = result.run_dir
    metadata = json.loads((run / "metadata.json").read_text())
    info = metadata["anomaly_feature"]
    assert (run / ANOMALY_FEATURE_MODEL_FILE).is_file() and (run / ANOMALY_FEATURE_BANK_FILE).is_file()
    assert info["bank_size"] == len(np.load(run / ANOMALY_FEATURE_BANK_FILE)) <= 500
    assert metadata["threshold"] == metadata["training"]["anomaly_feature"]["cross_validation"]["threshold_choice"]["threshold"]
    assert metadata["threshold_choice"]["method"].endswith("out_of_fold")

    trained = pd.read_csv(run / "predictions.csv")
    predictor = Predictor.from_bundle(run)
    predicted = predictor.predict_paths(trained["path"].tolist())
    assert predicted["error"].isna().all()
    np.testing.assert_allclose(predicted["probability"], trained["probability"], atol=1e-4)

    batch = np.stack([predictor.input_spec.prepare(np.asarray(img)) for img in _images(trained["path"][:8])])
    supervised, raw = predictor.engine.parts(batch)
    assert np.all(raw > 0)
    assert np.max(np.abs(predictor.engine.stacker(supervised, raw) - supervised)) > 1e-3  # the score is part of it

    from keeneye.explain import explain

    explained = explain(run, trained["path"][:3].tolist(), tmp_path / "explained", console=Console(quiet=True))
    np.testing.assert_allclose(explained["probability"], trained["probability"][:3], atol=1e-4)  # Grad-CAM view, stacked probability


def _images(paths):
    from keeneye.data.decode import load_image

    return [load_image(p) for p in paths]


def test_refused_with_fine_tuning(tmp_path, demo_data):
    from keeneye import api
    from keeneye.config import config_from_dict
    from keeneye.errors import ConfigError

    config = config_from_dict(tiny_config(tmp_path, demo_data, head={"anomaly_feature": True}, fine_tune={"enabled": True}),
                              base_dir=tmp_path)
    with pytest.raises(ConfigError, match="head.anomaly_feature: fine_tune.enabled must be false"):
        api.train(config, console=Console(quiet=True))
