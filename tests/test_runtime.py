"""keeneye.runtime: every engine computes what Keras computes, the batch loop keeps order and reasons,
and Grad-CAM shows predict's probability (same decode, same resize) even for a large JPEG.

Real ImageNet weights (the `tiny_bundle` fixture, 96 px): with random weights every image gives
nearly the same probability and agreement would be trivially true.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

from keeneye.bundle import load_bundle
from keeneye.data.decode import load_image, resize_square
from keeneye.data.preprocess import InputSpec
from keeneye.runtime.batches import run_engine
from keeneye.runtime.convert import ONNX_FILE, PROBABILITY_TOLERANCE, generated_images
from keeneye.runtime.engines import Engine, KerasEngine, OnnxEngine, OpenVinoEngine


@pytest.fixture(scope="module")
def bundle(tiny_bundle):
    return load_bundle(tiny_bundle.run_dir)


def test_every_engine_agrees_with_keras_on_generated_images(bundle):
    """Keras, ONNX Runtime and OpenVINO here; TFLiteEngine and SavedModelEngine are checked the same way
    (within PROBABILITY_TOLERANCE of Keras on generated images) by test_export.py's round trips,
    which load the exports through them: converting those formats costs a minute on a loaded machine."""
    images = generated_images(6, bundle.input_spec.shape, seed=11)
    keras_engine = KerasEngine(bundle.model)
    reference = keras_engine(images)
    assert reference.shape == (6, 1) and np.ptp(reference) > 1e-3  # varied outputs: agreement means something
    engines = [OnnxEngine(bundle.path / ONNX_FILE), OpenVinoEngine(bundle.path / ONNX_FILE)]
    assert [e.name for e in engines] == ["onnx", "openvino"]
    for engine in [keras_engine, *engines]:
        assert isinstance(engine, Engine)
        output = engine.run(images)
        assert output.dtype == np.float32 and output.reshape(-1).shape == (6,), engine.name
        np.testing.assert_allclose(output.reshape(6, 1), reference, atol=PROBABILITY_TOLERANCE, err_msg=engine.name)
    assert keras_engine.input_shape == engines[0].input_shape == engines[1].input_shape == bundle.input_spec.shape
    assert OpenVinoEngine(bundle.path / ONNX_FILE)(images[:0]).shape == (0, 1)


def test_run_engine_keeps_order_and_gives_reasons_for_failures(tmp_path):
    paths = []
    for index in range(7):
        path = tmp_path / f"{index}.png"
        cv2.imwrite(str(path), np.full((20 + index, 30, 3), 10 * index, np.uint8))
        paths.append(str(path))
    (tmp_path / "broken.png").write_bytes(b"not an image at all")
    paths.insert(2, str(tmp_path / "broken.png"))
    paths.insert(5, str(tmp_path / "missing.png"))
    seen: list[int] = []

    def mean_grey(batch: np.ndarray) -> np.ndarray:
        seen.append(len(batch))
        return batch.reshape(len(batch), -1).mean(axis=1, keepdims=True).astype(np.float32)

    run = run_engine(mean_grey, paths, 16, batch_size=3, workers=2)
    assert set(run.failures) == {2, 5}
    assert "not an image" in run.failures[2] and "unreadable" in run.failures[5]
    good = [i for i in range(len(paths)) if i not in (2, 5)]
    np.testing.assert_allclose(run.outputs[good, 0], [10.0 * i for i in range(7)])  # each output at its file's position
    assert np.isnan(run.outputs[[2, 5]]).all() and run.ok.tolist() == [i in good for i in range(len(paths))]
    assert seen == [3, 3, 1]  # 7 decodable images in batches of 3
    nothing = run_engine(mean_grey, [], 16)
    assert nothing.outputs is None and nothing.failures == {} and len(nothing.ok) == 0


def _large_jpeg(folder: Path) -> Path:
    """A 1200 x 900 JPEG of a textured surface with a defect: over 2x the model input, so libjpeg may reduce it."""
    texture = generated_images(2, 120, seed=3)[1]
    large = cv2.resize(texture, (1200, 900), interpolation=cv2.INTER_CUBIC)
    large = np.clip(large.astype(np.int16) + np.random.default_rng(0).integers(-12, 13, large.shape), 0, 255).astype(np.uint8)
    path = folder / "large.jpg"
    cv2.imwrite(str(path), cv2.cvtColor(large, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
    return path


def test_reduced_jpeg_decode_is_off_unless_asked_for_and_old_bundles_keep_it(tmp_path):
    path = _large_jpeg(tmp_path)
    full = resize_square(load_image(path), 96)
    assert np.array_equal(InputSpec(96).load(path), full)  # the default: full decode, then the resize rule
    assert np.abs(InputSpec(96, reduced_decode=True).load(path).astype(int) - full).max() > 0  # DCT-reduced: other pixels
    assert not InputSpec.from_dict(InputSpec(96).to_dict()).reduced_decode
    assert InputSpec.from_dict({"image_size": 96, "resize": "squash", "tiles": None}).reduced_decode  # trained with it then


@pytest.mark.parametrize("reduced", [False, True], ids=["full-decode", "reduced-decode"])
def test_explain_and_predict_give_the_same_probability_for_a_large_jpeg(tiny_bundle, bundle, tmp_path, reduced):
    from keeneye.explain import explain, explain_images
    from keeneye.inference.predictor import Predictor

    path = _large_jpeg(tmp_path)
    predictor = Predictor(bundle, engine="keras")
    predictor.input_spec = replace(bundle.input_spec, reduced_decode=reduced)
    predicted = predictor.predict_paths([str(path)])["probability"].iloc[0]
    if reduced:  # the Python API with a spec of one's own
        shown = explain_images(bundle.model, [str(path)], bundle.threshold, bundle.class_names, spec=predictor.input_spec)[0].probability
    else:  # keeneye explain: the bundle's own spec
        explained = explain(tiny_bundle.run_dir, [str(path)], tmp_path / "out")
        assert explained["error"].isna().all() and Path(explained["overlay"].iloc[0]).is_file()
        shown = explained["probability"].iloc[0]
    assert abs(shown - predicted) <= 1e-5
