"""model.features, model.resize and model.tiles: the bundle computes what training computed.

Every feature mode and tiling is trained once on tiny generated images with the real ImageNet
weights (96 px); the bundle's ONNX model and Keras model (through the Predictor, from the image
files) must give the testing split the probabilities training wrote into predictions.csv.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from rich.console import Console

from keeneye import api
from keeneye.bundle import load_bundle
from keeneye.config import config_from_dict
from keeneye.data.preprocess import InputSpec, cut_tiles, fit_square, tile_boxes
from keeneye.demo import add_defect, surface_texture
from keeneye.inference.predictor import Predictor
from keeneye.data.cache import backbone_cache_key

from conftest import tiny_config

SIDE = 96


@pytest.mark.parametrize("height,width,rows,cols", [(500, 1250, 2, 4), (100, 300, 1, 3), (300, 100, 1, 3),
                                                    (224, 224, 2, 2), (37, 91, 3, 2), (1000, 333, 5, 1)])
def test_tiles_cover_the_whole_image(height, width, rows, cols):
    covered = np.zeros((height, width), bool)
    for top, left, side in tile_boxes(height, width, rows, cols, overlap=0.25):
        covered[max(0, top) : top + side, max(0, left) : left + side] = True
    assert covered.all()
    stack = cut_tiles(np.full((height, width, 3), 7, np.uint8), 32, rows, cols, 0.25)
    assert stack.shape == (rows * cols * 32, 32, 3)


def test_pad_and_crop_keep_the_aspect_ratio():
    image = np.full((50, 100, 3), 200, np.uint8)
    image[:, :10] = 0  # a dark left border
    padded = fit_square(image, 40, "pad")
    assert padded.shape == (40, 40, 3) and padded[:9].max() == 0 and padded[31:].max() == 0  # black bars
    assert padded[12:28, 20].min() == 200
    cropped = fit_square(image, 40, "crop")
    assert cropped.min() == 200  # the centre square leaves the dark border out
    assert fit_square(image, 40, "squash")[:, :3].max() == 0


def test_input_spec_and_cache_key_follow_the_options():
    spec = InputSpec(96, "pad", (1, 3), 0.3)
    assert InputSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert InputSpec.from_dict({"image_size": 96}) == InputSpec(96, reduced_decode=True)  # bundles from before the options (reduced decode was the rule then)
    keys = {backbone_cache_key("mobilenet_v2", 1.0, 96, "ab" * 20, f, s)
            for f in ("gap", "multi") for s in (InputSpec(96), InputSpec(96, "pad"), spec)}
    assert len(keys) == 6
    assert backbone_cache_key("mobilenet_v2", 1.0, 96, "ab" * 20) == backbone_cache_key("mobilenet_v2", 1.0, 96, "ab" * 20, "gap", InputSpec(96))


def strips(rng: np.random.Generator, count: int, defect: bool) -> list[np.ndarray]:
    """1 x 3 strips of surfaces; with `defect`, one random third carries a defect."""
    images = []
    for _ in range(count):
        parts = [surface_texture(rng, SIDE) for _ in range(3)]
        if defect:
            where = int(rng.integers(3))
            parts[where] = add_defect(rng, parts[where])
        images.append(np.concatenate(parts, 1))
    return images


@pytest.fixture(scope="module")
def long_data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("long") / "data"
    rng = np.random.default_rng(5)
    for split, count in (("training", 12), ("testing", 6)):
        for label in ("good", "defect"):
            (folder / split / label).mkdir(parents=True)
            for index, image in enumerate(strips(rng, count, label == "defect")):
                cv2.imwrite(str(folder / split / label / f"{index}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    return folder


@pytest.mark.slow
def test_tiled_bundle_onnx_and_keras_give_the_training_time_probabilities(tmp_path, long_data):
    """The full path once: train (multi features, 1x3 tiles) -> bundle -> Predictor on both engines."""
    config = config_from_dict(tiny_config(tmp_path, long_data, run_name="run", model={"features": "multi", "tiles": "1x3"},
                                          training={"epochs": 5}), base_dir=tmp_path)
    result = api.train(config, console=Console(quiet=True))
    bundle = load_bundle(result.run_dir)
    assert bundle.metadata["backbone"]["features"] == "multi"
    assert bundle.input_spec == InputSpec(SIDE, "squash", (1, 3), 0.25)
    assert json.loads((result.run_dir / "config.json").read_text())["model"]["tiles"] == "1x3"
    trained = pd.read_csv(result.run_dir / "predictions.csv")
    assert (result.run_dir / "model.onnx").is_file()
    mistakes = int((trained["label"] != trained["predicted"]).sum())
    page = (result.run_dir / "report.html").read_text(encoding="utf-8")
    assert page.count("alt='Grad-CAM'") == min(12, mistakes)  # the report's mistakes carry their tiled Grad-CAM
    for engine in ("onnx", "keras"):
        predicted = Predictor(bundle, engine=engine).predict_paths(trained["path"].tolist())
        assert np.abs(predicted["probability"].to_numpy() - trained["probability"].to_numpy()).max() < 1e-4, engine


def write_bundle(folder: Path, classifier, spec: InputSpec) -> Path:
    folder.mkdir()
    classifier.save(folder / "model.keras")
    (folder / "metadata.json").write_text(json.dumps({
        "bundle_format": 1, "class_names": ["good", "defect"], "positive_class": "defect", "threshold": 0.5,
        "input": spec.to_dict()}))
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("features,resize", [("gap", "pad"), ("gap+gmp", "crop")])  # "multi": the tiled train test; ~20 s each
def test_every_feature_mode_predicts_what_the_embeddings_gave(tmp_path, long_data, features, resize):
    """Training path (embed_manifest on the feature engine, then the head) == bundle on ONNX and on Keras."""
    import keras

    from keeneye.inference.engines import make_feature_engine
    from keeneye.model.backbone import build_feature_extractor, resolve_weights
    from keeneye.model.head import build_classifier, build_head
    from keeneye.training.features import embed_manifest

    spec = InputSpec(SIDE, resize)
    extractor = build_feature_extractor(1.0, SIDE, resolve_weights("imagenet", 1.0, SIDE), features)
    keras.utils.set_random_seed(0)
    head = build_head(extractor.output_shape[-1], [8], 0.0)
    paths = sorted(str(p) for p in (long_data / "testing").rglob("*.png"))
    manifest = pd.DataFrame({"path": paths, "sha1": [""] * len(paths)})
    embedded = embed_manifest(manifest, make_feature_engine(extractor, engine="onnx"), extractor.output_shape[-1], spec, None)
    training_time = np.asarray(head(embedded.features)).reshape(-1)
    assert training_time.std() > 1e-4  # the images are told apart: the comparison below means something
    bundle = load_bundle(write_bundle(tmp_path / "bundle", build_classifier(extractor, head), spec))
    for engine in ("onnx", "keras"):
        predicted = Predictor(bundle, engine=engine).predict_paths(paths)["probability"].to_numpy()
        assert np.abs(predicted - training_time).max() < 1e-4, engine


def test_one_tile_carries_the_defect_and_decides():
    """A head fitted on max-pooled tile features of strips (as train fits it): the one defective tile,
    wherever it is, lifts the strip over 0.5; the same strip without it stays below; Grad-CAM names
    that tile as the one that decided and heats it more than the others."""
    from sklearn.linear_model import LogisticRegression

    from keeneye.model.backbone import build_feature_extractor, build_tiled_extractor, resolve_weights
    from keeneye.model.gradcam import GradCam, explain_batch
    from keeneye.model.head import build_classifier, build_head

    rng = np.random.default_rng(11)
    spec = InputSpec(SIDE, tiles=(1, 3), overlap=0.0)
    tiled = build_tiled_extractor(build_feature_extractor(1.0, SIDE, resolve_weights("imagenet", 1.0, SIDE), "gap+gmp"), 3)
    training = np.stack([spec.prepare(s) for s in strips(rng, 16, False) + strips(rng, 16, True)])
    features = np.asarray(tiled(training))  # max-pooled over tiles, as train embeds them
    regression = LogisticRegression(C=1.0, max_iter=2000).fit(features, np.repeat([0, 1], 16))
    head = build_head(features.shape[1], [], 0.0)
    head.get_layer("probability").set_weights([regression.coef_.T.astype(np.float32), regression.intercept_.astype(np.float32)])
    classifier = build_classifier(tiled, head)
    scores = {}
    for where in range(3):
        parts = [surface_texture(rng, SIDE) for _ in range(3)]
        clean = np.concatenate(parts, 1)
        parts[where] = add_defect(rng, parts[where])
        strip = np.concatenate(parts, 1)
        stacks = np.stack([spec.prepare(clean), spec.prepare(strip)])
        scores[where] = np.asarray(classifier(stacks)).reshape(-1)
        explained = explain_batch(GradCam(classifier), stacks[1:], [strip], 0.5, ("good", "defect"), ["strip"], spec)[0]
        assert explained.tile == where  # the report and `keeneye explain` outline the tile that decided
        inside = explained.heatmap[:, where * SIDE : (where + 1) * SIDE]
        assert inside.mean() > 2 * np.delete(explained.heatmap, np.s_[where * SIDE : (where + 1) * SIDE], axis=1).mean()
    assert all(clean < 0.5 < defect for clean, defect in scores.values()), scores
