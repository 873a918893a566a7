"""Feature sets as head.auto candidates (issue 12 part 5): "gap" and "gap+gmp" are column subsets of
"multi", a head trained on a subset is exported by zero weights outside it, and head.auto compares them."""

from __future__ import annotations

import numpy as np
import pytest

from keeneye.config import EvaluationConfig, HeadConfig, TrainingConfig
from keeneye.model.head import build_head, linear_head, widen_head
from keeneye.training.crossval import AUTO_CANDIDATES, candidates_for, cross_validate, group_folds, run_cross_validation


@pytest.fixture(scope="module")
def extractors():
    """The three feature modes of the real backbone at 64 px (ImageNet weights, alpha 1.0: the file tests have)."""
    from keeneye.model.backbone import FEATURE_MODES, build_feature_extractor, resolve_weights

    weights = resolve_weights("imagenet", 1.0, 64)
    return {mode: build_feature_extractor(1.0, 64, weights, mode) for mode in FEATURE_MODES}


def test_gap_and_gap_gmp_are_exact_column_subsets_of_multi(extractors) -> None:
    """feature_subsets names the columns of multi (and of gap+gmp) that equal the smaller modes' embeddings."""
    from keeneye.model.backbone import build_tiled_extractor, feature_subsets

    images = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    out = {mode: np.asarray(extractor(images)) for mode, extractor in extractors.items()}
    subsets = feature_subsets(extractors["multi"], "multi")
    assert list(subsets) == ["gap", "gap+gmp", "multi"]
    assert len(subsets["multi"]) == out["multi"].shape[1] and out["gap"].std() > 0
    for mode in ("gap", "gap+gmp"):
        np.testing.assert_allclose(out["multi"][:, subsets[mode]], out[mode], atol=1e-5)
    assert list(feature_subsets(extractors["gap+gmp"], "gap+gmp")) == ["gap", "gap+gmp"]
    tiled = feature_subsets(build_tiled_extractor(extractors["multi"], 2), "multi")
    assert all(np.array_equal(tiled[m], subsets[m]) for m in subsets)


@pytest.mark.parametrize("units", [(), (6,)])
def test_widened_head_gives_the_narrow_heads_probabilities(units) -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(20, 30)).astype(np.float32)
    columns = np.array([3, 4, 5, 10, 11, 29])
    narrow = build_head(len(columns), units, 0.2, seed=0)
    for layer in narrow.layers:  # non-zero biases too
        if layer.get_weights():
            layer.set_weights([rng.normal(size=w.shape).astype(np.float32) for w in layer.get_weights()])
    wide = widen_head(narrow, columns, 30)
    np.testing.assert_allclose(np.asarray(wide(x)), np.asarray(narrow(x[:, columns])), atol=1e-6)
    first = [layer for layer in wide.layers if layer.get_weights()][0].get_weights()[0]
    assert not np.delete(first, columns, axis=0).any()
    logistic = linear_head(rng.normal(size=6), 0.3, rng.normal(size=6), rng.uniform(0.5, 2, 6))
    np.testing.assert_allclose(np.asarray(widen_head(logistic, columns, 30)(x)), np.asarray(logistic(x[:, columns])), atol=1e-6)


def test_head_auto_compares_feature_subsets_with_the_logistic_candidate(monkeypatch) -> None:
    """Subset candidates come first (simpler), train on their columns only; without subsets the set is unchanged.
    (The run uses the first two auto candidates only: the dense ones cost seconds each and add nothing here.)"""
    from keeneye.training import crossval

    rng = np.random.default_rng(2)
    groups = np.repeat(np.arange(40), 3)
    signal = rng.normal(size=(40, 4))[groups] + 0.3 * rng.normal(size=(120, 4))
    y = (signal[:, 0] + 0.5 * rng.normal(size=120) > 0.3).astype(int)
    x = np.concatenate([signal, rng.normal(size=(120, 12))], axis=1).astype(np.float32)  # 4 informative, 12 noise
    sets = {"gap": np.arange(4), "multi": np.arange(16)}
    auto = HeadConfig(auto=True)
    training = TrainingConfig(seed=0, cv_folds=3, epochs=1)
    names = [c.name for c in candidates_for(auto, training, list(sets))]
    assert names == ["logistic-balanced@gap"] + [c.name for c in AUTO_CANDIDATES]
    assert candidates_for(auto, training) == list(AUTO_CANDIDATES)
    monkeypatch.setattr(crossval, "AUTO_CANDIDATES", AUTO_CANDIDATES[:2])
    cv = run_cross_validation(x, y, groups, auto, training, EvaluationConfig(min_validation_per_class=3), feature_sets=sets)
    first = cv.results[0]
    assert first.candidate.features == "gap" and first.heads[0].input_shape[-1] == 4
    direct = cross_validate(x[:, :4], y, group_folds(y, groups, 3, 0), AUTO_CANDIDATES[0], training)
    np.testing.assert_allclose(first.oof, direct.oof, atol=1e-6)
    recorded = cv.to_dict()["candidates"]
    assert recorded[0]["features"] == "gap"
    # metrics.json records each candidate's per-fold AP difference from the best on the same folds (paired one-SE rule)
    best = max(range(len(cv.results)), key=lambda i: cv.results[i].ap)
    for r, entry in zip(cv.results, recorded):
        paired = entry["paired_vs_best"]
        np.testing.assert_allclose(paired["fold_ap_difference"], np.subtract(r.fold_ap, cv.results[best].fold_ap), atol=1e-4)
        assert paired["within_one_se"] == (paired["mean_difference"] >= -paired["standard_error"])
    assert recorded[best]["paired_vs_best"]["mean_difference"] == 0.0 and recorded[cv.chosen]["paired_vs_best"]["within_one_se"]
    assert all(not e["paired_vs_best"]["within_one_se"] for e in recorded[:cv.chosen])  # the simplest within the band wins


@pytest.mark.slow
def test_train_with_head_auto_on_multi_exports_the_chosen_subset(tmp_path, demo_data, imagenet_weights) -> None:
    """End to end: head.auto on "multi" features weighs the subsets; whatever it chose, the bundle (a head
    taking all multi columns) gives the training-time probabilities on ONNX and Keras."""
    import pandas as pd
    from rich.console import Console

    from conftest import tiny_config
    from keeneye import api
    from keeneye.bundle import load_bundle
    from keeneye.config import config_from_dict
    from keeneye.inference.predictor import Predictor

    config = config_from_dict(tiny_config(tmp_path, demo_data, run_name="auto", model={"features": "multi"},
                                          head={"auto": True}, training={"epochs": 5}), base_dir=tmp_path)
    result = api.train(config, console=Console(quiet=True))
    candidates = result.metrics["cross_validation"]["candidates"]
    assert [c["features"] for c in candidates[:2]] == ["gap", "gap+gmp"] and len(candidates) == len(AUTO_CANDIDATES) + 2
    trained = pd.read_csv(result.run_dir / "predictions.csv")
    bundle = load_bundle(result.run_dir)
    for engine in ("onnx", "keras"):
        predicted = Predictor(bundle, engine=engine).predict_paths(trained["path"].tolist())["probability"].to_numpy()
        assert np.abs(predicted - trained["probability"].to_numpy()).max() < 1e-4, engine
