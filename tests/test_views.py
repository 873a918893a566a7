"""model.views: the image and its mirror images / quarter turns, embedded each and averaged.

The stack is made by data/preprocess (the image itself first), averaged inside model.keras
(model/backbone.build_views_extractor), so the bundle, its ONNX model and the stacked one-class
score compute what training computed.
"""

from __future__ import annotations

import base64
import json

import numpy as np
import pandas as pd
import pytest
from rich.console import Console

from keeneye.config import VIEW_COUNTS
from keeneye.data.cache import backbone_cache_key
from keeneye.data.preprocess import VIEW_SETS, InputSpec, fit_square
from keeneye.errors import ConfigError

from conftest import tiny_config


def test_views_stack_the_image_first_then_its_mirrors_and_turns():
    image = np.random.default_rng(0).integers(0, 255, (30, 50, 3), dtype=np.uint8)
    square = fit_square(image, 16)
    stacks = {views: InputSpec(16, views=views).prepare(image) for views in VIEW_SETS}
    for views, stack in stacks.items():
        assert stack.shape == (views * 16, 16, 3) == InputSpec(16, views=views).shape
        assert np.array_equal(stack[:16], square)  # the image itself first: what the one-class score sees
    parts = stacks[8].reshape(8, 16, 16, 3)
    assert np.array_equal(parts[1], square[:, ::-1]) and np.array_equal(parts[2], square[::-1])  # mirrors
    assert np.array_equal(parts[3], square[::-1, ::-1]) and np.array_equal(parts[4], np.rot90(square))  # half, quarter turn
    assert len({p.tobytes() for p in parts}) == 8
    assert np.array_equal(stacks[4], stacks[8][: 4 * 16]) and np.array_equal(stacks[2], stacks[8][: 2 * 16])


def test_the_config_allows_exactly_the_view_counts_that_preprocess_stacks(tmp_path, demo_data):
    from keeneye.config import config_from_dict

    assert VIEW_COUNTS == tuple(VIEW_SETS)  # one list of counts: config and bundle accept what InputSpec can build
    config = tiny_config(tmp_path, demo_data)
    config["model"] = config["model"] | {"views": 3}
    with pytest.raises(ConfigError, match="model.views: expected 1, 2, 4 or 8, got 3"):
        config_from_dict(config, base_dir=tmp_path)


def test_views_round_trip_and_key_the_cache():
    spec = InputSpec(96, "pad", views=4)
    assert InputSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert InputSpec.from_dict({"image_size": 96, "resize": "squash"}).views == 1  # bundles from before model.views
    keys = {backbone_cache_key("mobilenet_v2", 1.0, 96, "ab" * 20, "gap", InputSpec(96, views=v)) for v in VIEW_SETS}
    assert len(keys) == 4
    assert backbone_cache_key("mobilenet_v2", 1.0, 96, "ab" * 20, "gap", InputSpec(96, views=1)) == backbone_cache_key(
        "mobilenet_v2", 1.0, 96, "ab" * 20)  # one view keeps the key caches had before model.views
    with pytest.raises(ValueError, match="tiles and views"):
        InputSpec(96, tiles=(1, 3), views=2)


@pytest.mark.slow  # ~15 s building and tracing the 8-view graph: make test sits near its 8-minute budget
def test_the_views_extractor_averages_the_views_and_does_not_care_how_the_part_lay(imagenet_weights):
    """Mean of the per-view features; with 8 views a mirrored or turned image gets the same features."""
    from keeneye.demo import add_defect, surface_texture
    from keeneye.model.backbone import build_feature_extractor, build_views_extractor, resolve_weights

    extractor = build_feature_extractor(1.0, 64, resolve_weights("imagenet", 1.0, 64), "gap+gmp")
    views = build_views_extractor(extractor, 8)
    rng = np.random.default_rng(1)
    image = add_defect(rng, surface_texture(rng, 64))  # square at the model's size: no resize between the views
    spec = InputSpec(64, views=8)
    stack = spec.prepare(image)
    moved = [np.ascontiguousarray(m) for m in (image[:, ::-1], np.rot90(image), image[::-1, ::-1])]
    averaged, *of_moved = np.asarray(views.predict(np.stack([stack] + [spec.prepare(m) for m in moved]), verbose=0))
    per_view = np.asarray(extractor.predict(stack.reshape(8, 64, 64, 3), verbose=0))
    np.testing.assert_allclose(averaged, per_view.mean(axis=0), rtol=1e-5, atol=1e-5)
    for features in of_moved:  # the same part, lying another way
        np.testing.assert_allclose(features, averaged, rtol=1e-4, atol=1e-5)
    assert np.abs(per_view[0] - averaged).max() > 1e-3  # one view alone does care: the test could fail


@pytest.mark.parametrize("sections", [{"model": {"tiles": "1x3"}}, {"fine_tune": {"enabled": True}},
                                      {"augmentation": {"frozen_views": 2}}])
def test_views_are_refused_with_what_they_do_not_combine_with(tmp_path, demo_data, sections):
    from keeneye.config import config_from_dict
    from keeneye.training.phases import input_spec_for

    config = tiny_config(tmp_path, demo_data, **sections)
    config["model"] = config["model"] | sections.get("model", {}) | {"views": 2}
    with pytest.raises(ConfigError, match="model.views 2 cannot be combined"):
        input_spec_for(config_from_dict(config, base_dir=tmp_path), [])


@pytest.mark.slow  # a stacked train (two backbone graphs) with 2 views: ~30 s on a quiet machine
def test_a_views_bundle_with_the_one_class_score_predicts_what_training_scored(tmp_path, demo_data, imagenet_weights):
    """Train with 2 views and head.anomaly_feature (real weights, 96 px): the bundle on ONNX Runtime and on Keras,
    and its ONNX export, give the testing split the probabilities training wrote, within 1e-4."""
    from keeneye import api
    from keeneye.bundle import load_bundle
    from keeneye.config import config_from_dict
    from keeneye.inference.export import export_bundle
    from keeneye.inference.predictor import Predictor

    head = {"kind": "logistic", "dense_units": [], "dropout": 0.0, "anomaly_feature": True}
    config = config_from_dict(tiny_config(tmp_path, demo_data, run_name="views", head=head, model={"views": 2},
                                          anomaly={"max_bank_size": 500}), base_dir=tmp_path)
    run = api.train(config, console=Console(quiet=True)).run_dir
    bundle = load_bundle(run)
    assert bundle.input_spec.views == 2 and bundle.metadata["input"]["views"] == 2 and "anomaly_feature" in bundle.metadata
    trained = pd.read_csv(run / "predictions.csv")
    for engine in ("onnx", "keras"):
        predicted = Predictor(bundle, engine=engine).predict_paths(trained["path"].tolist())["probability"].to_numpy()
        np.testing.assert_allclose(predicted, trained["probability"], atol=1e-4, err_msg=engine)
    exported = export_bundle(run, "onnx", output=tmp_path / "views.onnx")
    assert exported.verification["max_abs_diff"] < 1e-4

    from keeneye.explain import explain_images

    explained = explain_images(bundle.model, trained["path"].tolist()[:2], bundle.threshold, bundle.class_names,
                               spec=bundle.input_spec)
    assert all(item.error is None and item.heatmap.max() == pytest.approx(1.0) for item in explained)


def test_the_web_service_explains_a_views_bundle_and_says_why_when_it_cannot(tmp_path, imagenet_weights):
    """POST /predict and POST /explain work on a views bundle (the views' maps turned back onto the image); a model
    Grad-CAM cannot read gets 501 with the reason (it used to be a bare 500), which the web page shows."""
    import cv2
    import keras
    from fastapi.testclient import TestClient

    from keeneye.bundle import load_bundle
    from keeneye.inference.predictor import Predictor
    from keeneye.model.backbone import build_input_extractor, resolve_weights
    from keeneye.model.head import build_classifier, build_head
    from keeneye.serving import ServeSettings, create_app

    spec = InputSpec(64, views=2)
    extractor = build_input_extractor(1.0, 64, resolve_weights("imagenet", 1.0, 64), "gap", views=2)
    inputs = keras.Input(spec.shape, dtype="uint8")
    opaque = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(  # not a keeneye classifier's layout
        keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(inputs))))
    image = cv2.imencode(".png", np.random.default_rng(2).integers(0, 255, (80, 120, 3), dtype=np.uint8))[1].tobytes()
    upload = [("files", ("part.png", image, "image/png"))]
    answers = {}
    for name, model in (("views", build_classifier(extractor, build_head(extractor.output_shape[-1], [], 0.0))),
                        ("opaque", opaque)):
        folder = tmp_path / name
        folder.mkdir()
        model.save(folder / "model.keras")
        (folder / "metadata.json").write_text(json.dumps({"bundle_format": 1, "class_names": ["good", "defect"],
                                                          "positive_class": "defect", "threshold": 0.5, "input": spec.to_dict()}))
        with TestClient(create_app(Predictor(load_bundle(folder), engine="keras"), ServeSettings())) as client:
            answers[name] = client.post("/predict", files=upload), client.post("/explain", files=upload)
    predicted, explained = answers["views"]
    assert predicted.status_code == 200 and explained.status_code == 200
    result = explained.json()["results"][0]
    assert result["probability"] == pytest.approx(predicted.json()["results"][0]["probability"], abs=1e-5)
    heat = cv2.imdecode(np.frombuffer(base64.b64decode(result["heatmap"].split(",", 1)[1]), np.uint8), cv2.IMREAD_COLOR)
    assert heat.shape == (80, 120, 3) and result["tile"] is None  # laid over the image as sent; no tiles to name
    predicted, explained = answers["opaque"]
    assert predicted.status_code == 200 and explained.status_code == 501
    assert explained.json()["error"]["code"] == "explain_unsupported" and "laid out differently" in explained.json()["error"]["message"]


def test_one_class_mode_names_the_supervised_settings_it_does_not_use(tmp_path, demo_data):
    from keeneye.config import config_from_dict
    from keeneye.training.anomaly import supervised_only_settings

    base = {"data_folder_path": str(demo_data), "mode": "anomaly"}
    assert supervised_only_settings(config_from_dict(base, base_dir=tmp_path)) == []
    chosen = config_from_dict(base | {"model": {"views": 4, "features": "multi", "image_size": 96}}, base_dir=tmp_path)
    assert supervised_only_settings(chosen) == ["model.features 'multi'", "model.views 4"]
