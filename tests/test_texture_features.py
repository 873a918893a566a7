"""model.features "multi+cov": "multi" plus the second moment of block_6's positions on fitted principal axes.

The projection is fitted on the run's training images (training/texture.py), lives in the extractor's
weights (a plain-Keras bundle), changes the embedding cache key, reaches Ray actors, and the exported
graphs compute the features training embedded.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from rich.console import Console

from keeneye.data.preprocess import InputSpec

SIDE = 64


@pytest.fixture(scope="module")
def extractors(imagenet_weights):
    """"multi" and "multi+cov" of the real backbone at 64 px (block_6: 8 x 8 positions, 192 channels)."""
    from keeneye.model.backbone import build_feature_extractor, resolve_weights

    weights = resolve_weights("imagenet", 1.0, SIDE)
    return {mode: build_feature_extractor(1.0, SIDE, weights, mode) for mode in ("multi", "multi+cov")}


@pytest.fixture(scope="module")
def textures(tmp_path_factory) -> list[str]:
    """Ten seeded surfaces on disk (as a run reads them), one with a defect."""
    from keeneye.demo import add_defect, surface_texture

    folder, rng = tmp_path_factory.mktemp("textures"), np.random.default_rng(7)
    paths = []
    for index in range(10):
        image = surface_texture(rng, SIDE)
        image = add_defect(rng, image) if index == 3 else image
        paths.append(str(folder / f"{index}.png"))
        cv2.imwrite(paths[-1], cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    return paths


def test_multi_cov_holds_multi_and_a_unit_second_moment_and_loads_without_keeneye(extractors, tmp_path) -> None:
    import keras

    from keeneye.model.backbone import feature_subsets

    images = np.random.default_rng(0).integers(0, 256, (3, SIDE, SIDE, 3), dtype=np.uint8)
    wide = np.asarray(extractors["multi+cov"](images))
    subsets = feature_subsets(extractors["multi+cov"], "multi+cov")
    assert list(subsets) == ["gap", "gap+gmp", "multi", "multi+cov"] and wide.shape[1] == len(subsets["multi+cov"])
    np.testing.assert_allclose(wide[:, subsets["multi"]], np.asarray(extractors["multi"](images)), atol=1e-5)
    texture = wide[:, len(subsets["multi"]):]
    assert texture.shape[1] == 48 * 48
    np.testing.assert_allclose(np.linalg.norm(texture, axis=1), 1.0, atol=1e-5)
    moments = texture.reshape(3, 48, 48)
    np.testing.assert_allclose(moments, moments.transpose(0, 2, 1), atol=1e-6)  # Z^T Z: symmetric
    assert np.all(np.diagonal(moments, axis1=1, axis2=2) >= 0) and texture.std() > 0
    extractors["multi+cov"].save(tmp_path / "m.keras")  # built-in layers only: no custom objects to load it
    again = keras.saving.load_model(tmp_path / "m.keras", compile=False)
    np.testing.assert_allclose(np.asarray(again(images)), wide, atol=1e-6)


def test_projection_is_the_principal_axes_of_the_training_positions(extractors, textures) -> None:
    """Fitted on the images' block_6 positions: orthonormal axes that keep the top-48 variance, centred on the
    positions' mean; the same images and seed give the same projection (the cache key), a broken file is left out."""
    from keeneye.model.backbone import texture_fingerprint, texture_maps_model, texture_projection
    from keeneye.training.texture import fit_texture_projection

    extractor = extractors["multi+cov"]
    before = texture_fingerprint(extractor)
    broken = str(Path(textures[0]).with_name("broken.png"))
    Path(broken).write_bytes(b"not an image")
    used = fit_texture_projection(extractor, textures + [broken], InputSpec(SIDE), seed=0)
    assert used == len(textures)  # 10 images x 64 positions: every position is kept
    kernel, bias = texture_projection(extractor)
    fingerprint = texture_fingerprint(extractor)
    assert fingerprint != before
    images = np.stack([InputSpec(SIDE).load(p) for p in textures])
    positions = np.asarray(texture_maps_model(extractor)(images), np.float64).reshape(-1, kernel.shape[0])
    np.testing.assert_allclose(kernel.T @ kernel, np.eye(48), atol=1e-4)
    np.testing.assert_allclose(bias, -positions.mean(axis=0) @ kernel, rtol=1e-3, atol=1e-3)
    eigenvalues = np.linalg.eigvalsh(np.cov(positions.T, bias=True))[::-1]
    captured = np.var(positions @ kernel, axis=0).sum()
    assert captured == pytest.approx(eigenvalues[:48].sum(), rel=1e-3)
    assert captured > 1.5 * np.var(positions @ np.linalg.qr(np.random.default_rng(0).normal(size=kernel.shape))[0], axis=0).sum()
    fit_texture_projection(extractor, textures, InputSpec(SIDE), seed=0)
    assert texture_fingerprint(extractor) == fingerprint


def test_projection_needs_a_readable_image(extractors, tmp_path) -> None:
    from keeneye.errors import DataError
    from keeneye.training.texture import fit_texture_projection

    (tmp_path / "a.png").write_bytes(b"broken")
    with pytest.raises(DataError, match="multi\\+cov"):
        fit_texture_projection(extractors["multi+cov"], [str(tmp_path / "a.png")], InputSpec(SIDE), seed=0)


def test_onnx_engine_and_ray_factory_compute_the_fitted_features(extractors, textures, imagenet_weights) -> None:
    from keeneye.data.cache import backbone_cache_key
    from keeneye.inference.distributed import FeatureEngineFactory
    from keeneye.inference.engines import make_feature_engine
    from keeneye.model.backbone import resolve_weights, texture_fingerprint, texture_projection
    from keeneye.training.texture import fit_texture_projection

    extractor = extractors["multi+cov"]
    fit_texture_projection(extractor, textures[:5], InputSpec(SIDE), seed=1)
    images = np.stack([InputSpec(SIDE).load(p) for p in textures])
    expected = np.asarray(extractor(images))
    factory = FeatureEngineFactory(1.0, SIDE, resolve_weights("imagenet", 1.0, SIDE), "multi+cov", None, None, engine="keras",
                                   texture=texture_projection(extractor))
    for engine in (make_feature_engine(extractor, engine="onnx"), factory()):
        computed = np.asarray(engine(images))
        assert np.abs(computed[:, -48 * 48:] - expected[:, -48 * 48:]).max() < 1e-5  # the texture part: unit vectors
        assert np.abs(computed - expected).max() < 3e-4  # the "multi" part's last-block values reach ~10 (float32 noise)
    keys = {backbone_cache_key("mobilenet_v2", 1.0, SIDE, "ab" * 20, "multi+cov", InputSpec(SIDE), texture_fingerprint(extractor))}
    fit_texture_projection(extractor, textures[5:], InputSpec(SIDE), seed=1)
    keys.add(backbone_cache_key("mobilenet_v2", 1.0, SIDE, "ab" * 20, "multi+cov", InputSpec(SIDE), texture_fingerprint(extractor)))
    assert len(keys) == 2  # other training images, other projection: other cached features


@pytest.mark.slow  # a TFLite conversion of the full-width backbone: ~18 s
def test_tflite_int8_keeps_the_texture_part_in_float(extractors) -> None:
    """TFLite int8 of the second moment lost most decisions on magnetic-tile (README "Exports"): its ops stay float."""
    import tensorflow as tf

    from keeneye.inference.export import tflite_float_nodes

    kept = tflite_float_nodes(tf.lite.TFLiteConverter.from_keras_model(extractors["multi+cov"]).convert())
    for layer in ("low_projection", "low_moment", "low_cov"):
        assert any(layer in name for name in kept), layer
    assert not any("block_6" in name or "block_13" in name for name in kept)  # the backbone itself is quantised


def test_cached_top_fine_tuning_is_accepted(tmp_path, demo_data) -> None:
    """multi+cov with the default fine-tuning method: its texture part is cached beside the activations
    (tests/test_cached_top.py), so the run is no longer refused."""
    from keeneye.config import config_from_dict
    from keeneye.training.phases import input_spec_for

    from conftest import tiny_config

    config = config_from_dict(tiny_config(tmp_path, demo_data, model={"features": "multi+cov"},
                                          fine_tune={"enabled": True}), base_dir=tmp_path)
    assert config.fine_tune.method == "cached_top"
    assert input_spec_for(config, []).image_size == 96


@pytest.mark.slow
def test_multi_cov_run_fits_on_training_images_and_its_bundle_gives_the_training_probabilities(tmp_path, demo_data) -> None:
    """train -> bundle (views 2) -> Predictor on ONNX and Keras: the probabilities training wrote, within 1e-4."""
    from keeneye import api
    from keeneye.bundle import load_bundle
    from keeneye.config import config_from_dict
    from keeneye.inference.predictor import Predictor
    from keeneye.model.backbone import texture_projection

    from conftest import tiny_config

    config = config_from_dict(tiny_config(tmp_path, demo_data, run_name="run", model={"features": "multi+cov", "views": 2},
                                          training={"epochs": 5, "cv_folds": 0}, cache_dir=str(tmp_path / "cache")),
                              base_dir=tmp_path)
    console = Console(record=True, width=200)
    result = api.train(config, console=console)
    assert "texture projection: principal axes of block_6_expand_relu's positions in 40 training images" in console.export_text()
    bundle = load_bundle(result.run_dir)
    assert bundle.metadata["backbone"]["features"] == "multi+cov"
    assert texture_projection(bundle.model.get_layer("views_feature_extractor")) is not None
    cached = [p.name for p in (tmp_path / "cache" / "embeddings").iterdir() if p.is_dir()]
    assert len(cached) == 1 and "-fmulti_cov-p" in cached[0], cached  # the fitted projection is in the key
    trained = pd.read_csv(result.run_dir / "predictions.csv")
    for engine in ("onnx", "keras"):
        predicted = Predictor(bundle, engine=engine).predict_paths(trained["path"].tolist())
        assert np.abs(predicted["probability"].to_numpy() - trained["probability"].to_numpy()).max() < 1e-4, engine
    assert json.loads((result.run_dir / "config.json").read_text())["model"]["features"] == "multi+cov"
