"""head.anomaly_feature: the one-class patch score stacked onto the supervised probability (training/anomaly_feature.py)."""

from __future__ import annotations

import json
from pathlib import Path

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
    for threshold in (0.2, 0.5, 0.9):  # the one-class map's scale: the score that flags a part while the head is undecided
        assert stacker([0.5], [stacker.score_alone_at(threshold)])[0] == pytest.approx(threshold, abs=1e-9)


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


@pytest.fixture(scope="module")
def stacked_run(tmp_path_factory, demo_data, imagenet_weights):
    """A tiny head.anomaly_feature bundle (real weights, 96 px), trained once for the slow tests of this module."""
    from keeneye import api
    from keeneye.config import config_from_dict

    root = tmp_path_factory.mktemp("stacked")
    head = {"kind": "logistic", "dense_units": [], "dropout": 0.0, "anomaly_feature": True}  # pinned: kept whatever the paired rule says
    config = config_from_dict(tiny_config(root, demo_data, run_name="stacked", head=head, anomaly={"max_bank_size": 500}),
                              base_dir=root)
    return api.train(config, console=Console(quiet=True)).run_dir


@pytest.mark.slow  # a full train with two backbone graphs and a predictor load: ~20 s on a quiet machine
def test_stacked_bundle_predicts_the_probabilities_training_scored(stacked_run, tmp_path):
    """Train with head.anomaly_feature (real weights, 96 px); predict from the bundle gives the test split's
    probabilities of training within 1e-4, and the one-class score really moves them."""
    from keeneye.bundle import ANOMALY_FEATURE_BANK_FILE, ANOMALY_FEATURE_MODEL_FILE
    from keeneye.inference.predictor import Predictor

    run = stacked_run
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
    import cv2

    page = (run / "report.html").read_text(encoding="utf-8")  # the mistakes of the run: Grad-CAM and the one-class map
    assert page.count("alt='one-class map'") == page.count("alt='Grad-CAM'")
    for row in explained.itertuples():  # the one-class part of the decision, drawn beside Grad-CAM over the same image
        one_class, gradcam = cv2.imread(row.one_class_overlay), cv2.imread(row.overlay)
        assert one_class.shape == gradcam.shape == cv2.imread(row.path).shape and not np.array_equal(one_class, gradcam)

    from fastapi.testclient import TestClient

    from keeneye.serving import ServeSettings, create_app

    upload = [("files", ("part.png", Path(trained["path"][0]).read_bytes(), "image/png"))]
    with TestClient(create_app(Predictor.from_bundle(run), ServeSettings())) as client:
        result = client.post("/explain", files=upload).json()["results"][0]
    assert result["probability"] == pytest.approx(trained["probability"][0], abs=1e-4)
    assert result["heatmap"].startswith("data:image/png") and result["one_class_heatmap"].startswith("data:image/png")


@pytest.mark.slow  # uses the stacked_run train (~20 s); the test itself is a few seconds
def test_explaining_a_stacked_bundle_runs_the_patch_graph_once_per_image(stacked_run, tmp_path, monkeypatch):
    """The stacked probability and the one-class map come from the same patch distances: `explain` and POST /explain
    score each image's patches once (not once for the probability and again for the map), and still give predict's
    probability and a map that differs from Grad-CAM's."""
    from fastapi.testclient import TestClient

    from keeneye.explain import explain
    from keeneye.inference.predictor import Predictor
    from keeneye.model.patchcore import AnomalyEngine
    from keeneye.serving import ServeSettings, create_app

    scored_rows = []
    original = AnomalyEngine.distances_and_scores

    def counting(self, batch):
        scored_rows.append(len(batch))
        return original(self, batch)

    monkeypatch.setattr(AnomalyEngine, "distances_and_scores", counting)
    paths = pd.read_csv(stacked_run / "predictions.csv")["path"][:3].tolist()
    expected = Predictor.from_bundle(stacked_run).predict_paths(paths)["probability"].to_numpy()
    scored_rows.clear()
    explained = explain(stacked_run, paths, tmp_path / "explained", console=Console(quiet=True))
    assert sum(scored_rows) == len(paths)
    np.testing.assert_allclose(explained["probability"], expected, atol=1e-5)
    assert explained["one_class_overlay"].notna().all()

    with TestClient(create_app(Predictor.from_bundle(stacked_run), ServeSettings())) as client:
        scored_rows.clear()
        upload = [("files", (f"part{i}.png", Path(p).read_bytes(), "image/png")) for i, p in enumerate(paths[:2])]
        results = client.post("/explain", files=upload).json()["results"]
    assert sum(scored_rows) == 2
    assert [r["probability"] for r in results] == pytest.approx(expected[:2], abs=1e-5)
    assert all(r["one_class_heatmap"].startswith("data:image/png") for r in results)


@pytest.mark.slow  # uses the stacked_run train (~20 s); the test itself is about a second
def test_the_stored_patch_graph_is_loaded_without_converting_anything(stacked_run, monkeypatch):
    """The bundle stores the patch graph as ONNX, checked and hashed at train time; an ONNX predictor runs it as it is:
    no conversion (tf2onnx would fail here), no Keras model loaded, and the same probabilities as the Keras path."""
    import keras

    from keeneye.bundle import ANOMALY_FEATURE_BANK_FILE, ANOMALY_FEATURE_MODEL_FILE, ANOMALY_FEATURE_ONNX_FILE
    from keeneye.data.files import sha256_of_file
    from keeneye.inference.predictor import Predictor
    from keeneye.runtime import convert

    run = stacked_run
    info = json.loads((run / "metadata.json").read_text())["anomaly_feature"]
    assert info["onnx_file"] == ANOMALY_FEATURE_ONNX_FILE
    files = (ANOMALY_FEATURE_MODEL_FILE, ANOMALY_FEATURE_ONNX_FILE, ANOMALY_FEATURE_BANK_FILE)
    assert info["sha256"] == {name: sha256_of_file(run / name) for name in files}
    record = json.loads((run / f"{ANOMALY_FEATURE_ONNX_FILE}.verification.json").read_text())
    assert record["passed"] and record["max_abs_diff"] <= 1e-4 and record["source_sha256"] == info["sha256"][ANOMALY_FEATURE_MODEL_FILE]

    def refuse(*args, **kwargs):
        raise AssertionError("the predictor converted a graph at load")

    monkeypatch.setattr(convert, "_to_onnx_proto", refuse)
    monkeypatch.setattr(keras.saving, "load_model", refuse)
    trained = pd.read_csv(run / "predictions.csv").head(8)
    predictor = Predictor.from_bundle(run, engine="onnx")
    assert predictor.bundle.model is None and predictor.engine.scorer.features.source == str(run / ANOMALY_FEATURE_ONNX_FILE)
    onnx = predictor.predict_paths(trained["path"].tolist())["probability"]
    from keeneye.inference.distributed import BundleScorer

    actor = BundleScorer(str(run))  # what each --ray actor builds: the same two stored graphs, no Keras model
    assert actor.predictor.bundle.model is None
    np.testing.assert_allclose(actor({"path": trained["path"].to_numpy()})["probability"], onnx, atol=1e-6)
    monkeypatch.undo()
    keras_path = Predictor.from_bundle(run, engine="keras")
    assert keras_path.engine.scorer.features.name == "keras"
    np.testing.assert_allclose(onnx, keras_path.predict_paths(trained["path"].tolist())["probability"], atol=1e-4)
    np.testing.assert_allclose(onnx, trained["probability"], atol=1e-4)


@pytest.mark.slow  # uses the stacked_run train; converts the patch graph once (~5 s)
def test_a_bundle_without_the_stored_patch_graph_converts_it_at_load_and_says_so(stacked_run, tmp_path):
    """Bundles written before the patch graph was stored (no onnx_file, no hashes) still load: converted at load,
    with a notice; so does a bundle whose stored file was replaced (its hash no longer matches). A swapped bank
    is refused at load: the stacker and the threshold were fitted to the scores of the bank metadata.json hashes."""
    import shutil

    from keeneye.bundle import ANOMALY_FEATURE_ONNX_FILE
    from keeneye.inference.predictor import Predictor
    from keeneye.runtime.choice import EngineNotice

    old = tmp_path / "old"
    shutil.copytree(stacked_run, old)
    (old / ANOMALY_FEATURE_ONNX_FILE).unlink()
    metadata = json.loads((old / "metadata.json").read_text())
    for key in ("onnx_file", "sha256"):
        del metadata["anomaly_feature"][key]
    (old / "metadata.json").write_text(json.dumps(metadata))
    trained = pd.read_csv(stacked_run / "predictions.csv").head(6)
    with pytest.warns(EngineNotice, match="converted to ONNX at every load"):
        predictor = Predictor.from_bundle(old, engine="onnx")
    assert predictor.engine.scorer.features.source == "converted in memory"
    np.testing.assert_allclose(predictor.predict_paths(trained["path"].tolist())["probability"], trained["probability"], atol=1e-4)

    replaced = tmp_path / "replaced"
    shutil.copytree(stacked_run, replaced)
    (replaced / ANOMALY_FEATURE_ONNX_FILE).write_bytes((replaced / ANOMALY_FEATURE_ONNX_FILE).read_bytes() + b"\0")
    with pytest.warns(EngineNotice, match="does not match the sha256"):
        predictor = Predictor.from_bundle(replaced, engine="onnx")
    assert predictor.engine.scorer.features.source == "converted in memory"

    from keeneye.bundle import ANOMALY_FEATURE_BANK_FILE
    from keeneye.errors import BundleError

    swapped = tmp_path / "swapped"
    shutil.copytree(stacked_run, swapped)
    bank = np.load(swapped / ANOMALY_FEATURE_BANK_FILE)
    np.save(swapped / ANOMALY_FEATURE_BANK_FILE, bank[: len(bank) // 2])  # a bank that loads, but not this bundle's
    with pytest.raises(BundleError, match="not the memory bank this bundle was trained with"):
        Predictor.from_bundle(swapped)


@pytest.mark.slow  # uses the stacked_run train; the export's checks take a few seconds
def test_export_of_a_stacked_bundle_reproduces_its_probability_with_plain_onnx_runtime(stacked_run, tmp_path):
    """keeneye export of a head.anomaly_feature bundle: the classifier graph, the patch graph, the bank and a record.
    Plain ONNX Runtime + numpy on those files gives the predictor's probabilities within 1e-4; a swapped bank is refused;
    formats the export does not check for such bundles are refused with the reason."""
    import onnxruntime

    from keeneye.bundle import ANOMALY_FEATURE_BANK_FILE
    from keeneye.data.decode import load_image, resize_square
    from keeneye.inference.export import ExportError, export_bundle, load_exported, stacked_sidecar
    from keeneye.inference.predictor import Predictor

    result = export_bundle(stacked_run, "onnx", output=tmp_path, max_images=8)
    assert result.passed and result.verification["max_abs_diff"] <= 1e-4 and result.verification["n_images"] > 0
    record = json.loads(stacked_sidecar(result.path).read_text())
    assert (tmp_path / record["bank_file"]).read_bytes() == (stacked_run / ANOMALY_FEATURE_BANK_FILE).read_bytes()
    assert sorted(result.verification["anomaly_feature"].values()) == sorted(
        [record["patch_model"], record["bank_file"], stacked_sidecar(result.path).name])

    paths = pd.read_csv(stacked_run / "predictions.csv")["path"].head(6).tolist()
    size = record["input"]["image_size"]
    images = np.stack([resize_square(load_image(p), size) for p in paths])
    p = onnxruntime.InferenceSession(str(result.path)).run(None, {"image": images})[0].reshape(-1).astype(np.float64)
    patches = onnxruntime.InferenceSession(str(tmp_path / record["patch_model"])).run(None, {"image": images})[0]
    bank = np.load(tmp_path / record["bank_file"]).astype(np.float64)
    flat = patches.reshape(len(images), -1, bank.shape[1]).astype(np.float64)
    nearest = np.sqrt(((flat[:, :, None, :] - bank[None, None]) ** 2).sum(-1).min(-1))  # brute force, (images, patches)
    s = np.maximum(np.sort(nearest, axis=1)[:, -record["score_top_k"]:].mean(axis=1), record["clipping"]["raw_score_min"])
    p = np.clip(p, *record["clipping"]["probability"])
    z = record["coef_logit"] * np.log(p / (1 - p)) + record["coef_log_score"] * np.log(s) + record["intercept"]
    expected = Predictor.from_bundle(stacked_run).predict_paths(paths)["probability"].to_numpy()
    np.testing.assert_allclose(1 / (1 + np.exp(-z)), expected, atol=1e-4)
    np.testing.assert_allclose(load_exported(result.path)(images), expected, atol=1e-4)

    np.save(tmp_path / record["bank_file"], bank[:-1].astype(np.float32))  # another bank beside the graphs: refused
    with pytest.raises(ExportError, match="memory bank"):
        load_exported(result.path)
    with pytest.raises(ExportError, match="float32 ONNX only"):
        export_bundle(stacked_run, "tflite", output=tmp_path)


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


def test_the_default_auto_skips_settings_it_is_not_made_for_and_says_why(tmp_path, demo_data):
    """"auto" is the default, so it must never refuse a config: fine-tuning, tiles or no folds publish the head alone."""
    from io import StringIO
    from types import SimpleNamespace

    from keeneye.config import config_from_dict
    from keeneye.errors import ConfigError
    from keeneye.terminal import Reporter
    from keeneye.training.phases import use_anomaly_feature

    def decide(tiles=None, head=None, **sections):
        base = tiny_config(tmp_path, demo_data, **sections)
        base["head"] = {k: v for k, v in base["head"].items() if k != "anomaly_feature"} | (head or {})  # the default
        out = StringIO()
        used = use_anomaly_feature(config_from_dict(base, base_dir=tmp_path), SimpleNamespace(spec=SimpleNamespace(tiles=tiles)),
                                   Reporter(Console(file=out, width=400)))
        return used, out.getvalue()

    assert decide() == (True, "")  # the default tries it
    used, said = decide(fine_tune={"enabled": True})
    assert not used and 'head.anomaly_feature "auto": the one-class score is not tried: fine_tune.enabled' in said
    used, said = decide(tiles=(1, 2), training={"cv_folds": 0})
    assert not used and "training.cv_folds must be at least 2" in said and "model.tiles must be off" in said
    assert decide(head={"anomaly_feature": False}, fine_tune={"enabled": True}) == (False, "")
    with pytest.raises(ConfigError, match="fine_tune.enabled must be false"):
        decide(head={"anomaly_feature": True}, fine_tune={"enabled": True})


def test_the_stacked_model_is_kept_only_when_it_beats_the_head_by_more_than_a_paired_standard_error():
    from keeneye.training.phases import anomaly_feature_verdict

    head = [0.70, 0.85, 0.80, 0.75, 0.90]  # folds of very different difficulty
    steady = anomaly_feature_verdict([a + g for a, g in zip(head, [0.03, 0.02, 0.04, 0.03, 0.02])], head)
    assert steady["kept"] and steady["mean"] > steady["se"] > 0
    noisy = anomaly_feature_verdict([a + g for a, g in zip(head, [0.10, -0.06, 0.08, -0.07, 0.00])], head)
    assert not noisy["kept"] and "simpler head" in noisy["reason"]
    worse = anomaly_feature_verdict([a - 0.02 for a in head], head)
    assert not worse["kept"]
    assert not anomaly_feature_verdict([0.9], [0.8])["kept"]  # one fold: no spread, no evidence


@pytest.mark.slow  # a full train with two backbone graphs: ~20 s on a quiet machine
def test_auto_publishes_what_the_paired_rule_decides_and_says_why(tmp_path, demo_data, imagenet_weights):
    """head.anomaly_feature "auto": the verdict in metadata decides what the bundle holds, and predict agrees."""
    from keeneye import api
    from keeneye.bundle import ANOMALY_FEATURE_MODEL_FILE
    from keeneye.config import config_from_dict
    from keeneye.inference.predictor import Predictor

    head = {"kind": "logistic", "dense_units": [], "dropout": 0.0, "anomaly_feature": "auto"}
    config = config_from_dict(tiny_config(tmp_path, demo_data, run_name="auto", head=head, anomaly={"max_bank_size": 500}),
                              base_dir=tmp_path)
    run = api.train(config, console=Console(quiet=True)).run_dir
    metadata = json.loads((run / "metadata.json").read_text())
    training = metadata["training"]
    verdict = training["anomaly_feature"]["verdict"] if "anomaly_feature" in training else training["anomaly_feature_dropped"]
    assert verdict["kept"] == (verdict["mean"] > verdict["se"]) == ("anomaly_feature" in metadata)
    assert (run / ANOMALY_FEATURE_MODEL_FILE).is_file() == verdict["kept"]
    assert "standard error" in verdict["reason"] and len(verdict["ap_differences"]) == config.training.cv_folds
    trained = pd.read_csv(run / "predictions.csv")
    predicted = Predictor.from_bundle(run).predict_paths(trained["path"].tolist())
    np.testing.assert_allclose(predicted["probability"], trained["probability"], atol=1e-4)
