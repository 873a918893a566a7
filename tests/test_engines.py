"""Inference engines: ONNX Runtime and Keras give the same probabilities, `--engine` is honoured,
bundles without (or with a stale) model.onnx still work, and the embedding engine checks itself.

Real ImageNet weights throughout (the `tiny_bundle` fixture, 96 px): with random weights every
image gives nearly the same features and parity would be trivially true.
"""

from __future__ import annotations

import io
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from keeneye.bundle import load_bundle
from keeneye.inference import engines
from keeneye.inference.engines import (
    FEATURE_ENGINE_FILE, ONNX_FILE, PROBABILITY_TOLERANCE, EngineError, EngineFallbackWarning, EngineNotice,
    KerasEngine, OnnxEngine, generated_images, make_engine, make_feature_engine, sha256_of_file, verification_path,
)
from keeneye.inference.predictor import ENGINES, Predictor


def _test_images(demo_data: Path) -> list[str]:
    return sorted(str(p) for p in (demo_data / "testing").rglob("*.png"))


@pytest.fixture(scope="module")
def bundle(tiny_bundle):
    return load_bundle(tiny_bundle.run_dir)


def test_engine_choices_include_openvino_onnx_and_keras():
    assert set(ENGINES) == {"auto", "openvino", "onnx", "keras"}


def test_onnx_and_keras_agree_on_real_images(bundle, demo_data):
    paths = _test_images(demo_data)
    onnx_predictor = Predictor(bundle, engine="onnx")
    keras_predictor = Predictor(bundle, engine="keras")
    assert (onnx_predictor.engine_name, keras_predictor.engine_name) == ("onnx", "keras")
    assert onnx_predictor.engine.source == str(bundle.path / ONNX_FILE)  # the bundle's own, no conversion
    onnx_frame = onnx_predictor.predict_paths(paths)
    keras_frame = keras_predictor.predict_paths(paths)
    assert onnx_frame["error"].isna().all() and len(onnx_frame) == len(paths) == 24
    p_onnx, p_keras = onnx_frame["probability"].to_numpy(), keras_frame["probability"].to_numpy()
    assert np.max(np.abs(p_onnx - p_keras)) <= PROBABILITY_TOLERANCE
    assert p_keras.std() > 0.05  # real, varied outputs: the comparison means something
    assert (onnx_frame["label"] == keras_frame["label"]).all()


def test_auto_uses_the_fastest_cpu_engine_and_falls_back_in_order(bundle, monkeypatch):
    if engines.gpu_available():
        pytest.skip("auto picks Keras on a GPU")
    first, second = engines.CPU_ORDER  # fastest first, by measurement (benchmarks/inference.py)
    auto = Predictor(bundle, engine="auto")
    assert auto.engine_name == first and auto.engine.source == str(bundle.path / ONNX_FILE)
    from keeneye.runtime import choice

    monkeypatch.setitem(choice._AVAILABLE, first, lambda: False)  # as if that package were not installed
    assert Predictor(bundle, engine="auto").engine_name == second
    with pytest.raises(EngineError, match=f"engine '{first}' needs the"):
        Predictor(bundle, engine=first)
    monkeypatch.setitem(choice._AVAILABLE, second, lambda: False)
    with pytest.warns(EngineFallbackWarning, match=f"{first}: .*{second}: "):
        assert Predictor(bundle, engine="auto").engine_name == "keras"
    monkeypatch.setitem(choice._AVAILABLE, "openvino", lambda: False)
    with pytest.raises(EngineError, match="keeneye\\[openvino\\]"):  # says how to install it
        Predictor(bundle, engine="openvino")


def test_onnx_engine_chunking_and_empty_batch(bundle):
    images = generated_images(7, bundle.image_size, seed=5)
    whole = OnnxEngine(bundle.path / ONNX_FILE, chunk=32)(images)
    chunked = OnnxEngine(bundle.path / ONNX_FILE, chunk=3)(images)
    assert whole.shape == (7, 1) and whole.dtype == np.float32
    np.testing.assert_allclose(chunked, whole, atol=1e-6)
    np.testing.assert_allclose(whole, KerasEngine(bundle.model)(images), atol=PROBABILITY_TOLERANCE)
    assert OnnxEngine(bundle.path / ONNX_FILE)(images[:0]).shape == (0, 1)


def test_model_onnx_written_at_train_time_is_verified(bundle):
    record = json.loads(verification_path(bundle.path / ONNX_FILE).read_text())
    assert record["passed"] is True
    assert record["source_sha256"] == sha256_of_file(bundle.path / "model.keras")
    assert 0 <= record["max_abs_diff"] <= PROBABILITY_TOLERANCE
    assert record["n_images"] == 16 and "testing" in record["images"]


@pytest.mark.slow
def test_bundle_with_stale_or_missing_model_onnx_converts_once_and_caches(tiny_bundle, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_bundle.run_dir, copy)
    sidecar = verification_path(copy / ONNX_FILE)
    record = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps(record | {"source_sha256": "0" * 64}))  # made from another model.keras
    stale = load_bundle(copy)
    with pytest.warns(EngineNotice, match="stale"):
        predictor = Predictor(stale, engine="onnx")
    assert predictor.engine_name == "onnx" and "converted" in predictor.engine.source
    cached = engines.onnx_cache_dir() / f"{sha256_of_file(copy / 'model.keras')[:32]}.onnx"
    assert cached.is_file() and json.loads(verification_path(cached).read_text())["passed"]

    (copy / ONNX_FILE).unlink()
    sidecar.unlink()
    without = load_bundle(copy)
    with warnings.catch_warnings():
        warnings.simplefilter("error", EngineNotice)  # the cached conversion is used: no new conversion, no notice
        again = Predictor(without, engine="onnx")
    assert str(cached) in again.engine.source
    images = generated_images(6, stale.image_size, seed=9)
    np.testing.assert_allclose(again.predict_images(images), Predictor(stale, engine="keras").predict_images(images),
                               atol=PROBABILITY_TOLERANCE)


def test_unknown_engine_is_a_clear_error(bundle):
    with pytest.raises(EngineError, match="unknown engine 'tpu'"):
        make_engine(bundle.model, "tpu", bundle=bundle)
    assert issubclass(EngineError, ValueError)


def test_cli_engine_option_is_honoured(tiny_bundle, demo_data):
    from typer.testing import CliRunner

    from keeneye.cli import app

    paths = _test_images(demo_data)[:6]
    runner = CliRunner()
    frames = {}
    for engine in ("onnx", "keras"):
        result = runner.invoke(app, ["predict", str(tiny_bundle.run_dir), *paths, "--engine", engine])
        assert result.exit_code == 0, result.output
        assert f"(engine: {engine})" in result.stderr
        frames[engine] = pd.read_csv(io.StringIO(result.stdout))
    assert len(frames["onnx"]) == 6 and frames["onnx"]["error"].isna().all()
    assert np.max(np.abs(frames["onnx"]["probability"] - frames["keras"]["probability"])) <= PROBABILITY_TOLERANCE

    bad = runner.invoke(app, ["predict", str(tiny_bundle.run_dir), paths[0], "--engine", "tpu"])
    assert bad.exit_code == 2
    assert "unknown engine 'tpu'" in bad.stderr and "Traceback" not in bad.output


def test_feature_engine_uses_onnx_after_a_parity_check(imagenet_weights, tmp_path):
    from keeneye.model.backbone import ResolvedWeights, build_feature_extractor

    extractor = build_feature_extractor(1.0, 96, ResolvedWeights(str(imagenet_weights), imagenet_weights, None))
    images = generated_images(10, 96, seed=2)
    reference = KerasEngine(extractor)(images)
    assert reference.shape == (10, 1280) and reference.std() > 0.1  # real weights: features vary

    engine = make_feature_engine(extractor, cache_folder=tmp_path)
    assert engine.name == "pending"  # nothing converted before the first batch
    first = engine(images[:4])
    if engines.gpu_available():
        assert engine.name == "keras"
        return
    assert engine.name == engines.CPU_ORDER[0] and engine.parity is not None and engine.parity <= engines.FEATURE_TOLERANCE
    assert (tmp_path / FEATURE_ENGINE_FILE).is_file()  # converted once, reused by the next run
    np.testing.assert_allclose(first, reference[:4], atol=engines.FEATURE_TOLERANCE)
    np.testing.assert_allclose(engine(images[4:]), reference[4:], atol=engines.FEATURE_TOLERANCE)
    for name in ("openvino", "onnx"):  # each CPU engine on its own, from the same cached conversion
        explicit = make_feature_engine(extractor, engine=name, cache_folder=tmp_path)
        np.testing.assert_allclose(explicit(images[:4]), reference[:4], atol=engines.FEATURE_TOLERANCE)
        assert explicit.name == name and explicit.parity <= engines.FEATURE_TOLERANCE

    keras_only = make_feature_engine(extractor, engine="keras", cache_folder=tmp_path)  # asked for: no conversion tried
    np.testing.assert_allclose(keras_only(images[:4]), reference[:4], atol=1e-6)
    assert keras_only.name == "keras"

    # a damaged cached conversion: warned, Keras used, the bad file removed
    (tmp_path / FEATURE_ENGINE_FILE).write_bytes(b"not an onnx model")
    fallback = make_feature_engine(extractor, cache_folder=tmp_path)
    with pytest.warns(EngineFallbackWarning, match="Keras"):
        out = fallback(images[:4])
    assert fallback.name == "keras"
    np.testing.assert_allclose(out, reference[:4], atol=1e-6)
    assert not (tmp_path / FEATURE_ENGINE_FILE).exists()

    (tmp_path / FEATURE_ENGINE_FILE).write_bytes(b"not an onnx model")
    with pytest.raises(EngineError, match="engine 'onnx' cannot compute the embeddings"):
        make_feature_engine(extractor, engine="onnx", cache_folder=tmp_path)(images[:2])
