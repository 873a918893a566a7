"""Fine-tuning the top from cached activations (fine_tune.method cached_top, issue #12 part 4).

Cheap: 96 px demo images, 2 views, 2 epochs, real ImageNet weights (the agreement depends on them).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from conftest import tiny_config
from keeneye.config import config_from_dict
from keeneye.errors import ConfigError


def test_dihedral_views_are_the_8_distinct_symmetries_of_the_square() -> None:
    from keeneye.data.preprocess import dihedral
    from keeneye.training.cached_top import VIEWS

    image = np.arange(2 * 3 * 3 * 1, dtype=np.uint8).reshape(2, 3, 3, 1)
    views = [dihedral(image, v) for v in range(VIEWS)]
    assert np.array_equal(views[0], image)
    assert len({v.tobytes() for v in views}) == 8
    assert np.array_equal(views[1][0, :, :, 0], np.rot90(image[0, :, :, 0]))
    assert np.array_equal(views[4][0, :, :, 0], image[0, :, ::-1, 0])


def test_large_activations_are_memory_mapped_and_read_by_position() -> None:
    """Beyond the in-memory limit the activations live in an unlinked file; batches read only the decoded columns."""
    from keeneye.training.cached_top import activation_array, views_dataset
    from keeneye.training.pipeline import EpochPlan

    small = activation_array((2, 3, 4), limit=1 << 20)
    assert not isinstance(small, np.memmap) and np.isnan(small).all()
    big = activation_array((2, 5, 3), limit=16)
    assert isinstance(big, np.memmap) and np.isnan(big).all()
    big[:] = np.arange(30, dtype=np.float32).reshape(2, 5, 3)
    positions = np.array([0, 2, 4])  # column 1 and 3 failed to decode
    labels = np.array([0, 1, 1])
    plan = EpochPlan(labels, 8, 0, shuffle=False)
    rows = [row for acts, _, _ in views_dataset((big,), labels, np.ones(3), plan, [0], 0, positions).as_numpy_iterator()
            for row in acts]
    assert len(rows) == 3
    for row, column in zip(rows, positions):  # each row is one view of its own column, never a failed one
        assert any(np.array_equal(row, big[view, column]) for view in range(2))


def test_split_needs_a_cut_at_the_start_of_a_block() -> None:
    from keeneye.model.backbone import ResolvedWeights, build_feature_extractor
    from keeneye.training.cached_top import split_backbone

    extractor = build_feature_extractor(0.35, 96, ResolvedWeights("none", None, None), "multi")
    with pytest.raises(ConfigError, match="first layer of a block"):
        split_backbone(extractor, "block_15_depthwise")  # block_15_add also needs the block's input
    bottom, top = split_backbone(extractor, "block_13_expand")
    assert len(bottom.outputs) == 1  # block_13_expand_relu is above this cut: the top pools it
    images = np.random.default_rng(0).integers(0, 255, (2, 96, 96, 3), dtype=np.uint8)
    np.testing.assert_allclose(top.predict(bottom.predict(images, verbose=0), verbose=0), extractor.predict(images, verbose=0),
                               atol=1e-5)


@pytest.mark.parametrize("features, cached", [("multi", ["mid_avg", "mid_max"]), ("multi+cov", ["mid_avg", "mid_max", "low_cov"]),
                                              ("gap+gmp", [])])
def test_parts_pooled_below_the_cut_are_cached_beside_the_activations(features, cached, imagenet_weights) -> None:
    """Cut at block_16_expand: what "multi" pools from block_13 and "multi+cov" from block_6 is as frozen as those
    blocks, so the bottom pools it once and the top takes it as inputs; top(bottom(x)) is the extractor's embedding."""
    from keeneye.model.backbone import build_feature_extractor, resolve_weights
    from keeneye.training.cached_top import split_backbone

    extractor = build_feature_extractor(1.0, 64, resolve_weights(str(imagenet_weights), 1.0, 64), features)
    bottom, top = split_backbone(extractor, "block_16_expand")
    assert [t.name for t in top.inputs] == ["activations", *(f"cached_{name}" for name in cached)]
    assert len(bottom.outputs) == 1 + len(cached)
    images = np.random.default_rng(0).integers(0, 255, (3, 64, 64, 3), dtype=np.uint8)
    parts = bottom.predict(images, verbose=0)
    expected = extractor.predict(images, verbose=0)
    np.testing.assert_allclose(top.predict(parts, verbose=0), expected, atol=1e-5)
    assert np.ptp(expected) > 1e-3


def test_cache_views_keeps_every_output_of_the_bottom_per_view(tmp_path, imagenet_weights) -> None:
    """cache_views splits the bottom's outputs back into one array each; view 0 is the image as it lies."""
    from PIL import Image

    from keeneye.data.preprocess import InputSpec, dihedral
    from keeneye.model.backbone import build_feature_extractor, resolve_weights
    from keeneye.training.cached_top import cache_views, split_backbone, view_of

    extractor = build_feature_extractor(1.0, 64, resolve_weights(str(imagenet_weights), 1.0, 64), "multi+cov")
    bottom, top = split_backbone(extractor, "block_16_expand")
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)
    paths = []
    for i, image in enumerate(pixels):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(image).save(paths[-1])
    paths.insert(1, str(tmp_path / "broken.png"))
    (tmp_path / "broken.png").write_bytes(b"not an image")
    cached, failed = cache_views(bottom, paths, InputSpec(64), 2, batch_size=4)
    assert list(failed) == [1]
    assert [a.shape[:2] for a in cached] == [(2, 3)] * 4 and np.isnan(cached[3][:, 1]).all()
    for view in range(2):
        expected = bottom.predict(dihedral(pixels, view), verbose=0)
        for array, part in zip(cached, expected):
            np.testing.assert_allclose(array[view, [0, 2]], part, rtol=1e-5, atol=1e-4)  # other batch sizes: last digits
    np.testing.assert_allclose(top.predict(view_of(cached, 0, np.array([0, 2])), verbose=0), extractor.predict(pixels, verbose=0),
                               rtol=1e-5, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("features", ["gap", "multi+cov"])
def test_cached_top_trains_the_top_and_exports_one_graph_with_the_training_probabilities(tmp_path, demo_data, imagenet_weights,
                                                                                        features) -> None:
    """The exported classifier (image -> bottom -> trained top -> head) gives the probabilities the training-time
    top computed from the cached activations (within 1e-4); layers below the cut and BatchNorm never move, nor does
    "multi+cov"'s texture projection (its part is cached beside the activations)."""
    import keras

    from keeneye.model.backbone import build_feature_extractor, resolve_weights
    from keeneye.model.head import build_classifier, build_head
    from keeneye.training.distribute import choose_devices
    from keeneye.training.finetune import find_backbone, fine_tune, predict_paths

    cfg = config_from_dict(tiny_config(tmp_path, demo_data, model={"features": features}, fine_tune={
        "enabled": True, "method": "cached_top", "unfreeze": "block_16_expand", "views": 2, "epochs": 2, "patience": 0,
        "learning_rate": 1e-3, "schedule": "cosine"}), base_dir=tmp_path)
    extractor = build_feature_extractor(1.0, 96, resolve_weights(str(imagenet_weights), 1.0, 96), cfg.model.features)
    head = build_head(extractor.output_shape[-1], [32], 0.1, seed=0)
    paths = sorted(str(p) for p in (demo_data / "training").rglob("*.png"))
    labels = np.array([int("/defect/" in p) for p in paths])
    rows = pd.DataFrame({"path": paths})
    before = [[np.array(w) for w in layer.get_weights()] for layer in find_backbone(extractor).layers]
    result = fine_tune(cfg, extractor, head, rows.iloc[::2], labels[::2], rows.iloc[1::2], labels[1::2], choose_devices("off"))
    assert list(result.history["epoch"]) == [1, 2]
    assert all(np.array_equal(a, b) for a, b in zip(extractor.get_weights(), [w for ws in before for w in ws])), "input model changed"
    names = [layer.name for layer in find_backbone(result.extractor).layers]
    cut = names.index("block_16_expand")
    changed = set()
    for index, (layer, old) in enumerate(zip(find_backbone(result.extractor).layers, before)):
        same = all(np.array_equal(a, b) for a, b in zip(layer.get_weights(), old))
        if index < cut or isinstance(layer, keras.layers.BatchNormalization):
            assert same, f"{layer.name} must not change"
        elif not same:
            changed.add(layer.name)
    assert {"block_16_expand", "Conv_1"} <= changed, changed
    for layer in extractor.layers:  # the pooling and texture layers outside the backbone hold no trained weights
        if layer.get_weights() and layer is not find_backbone(extractor):
            assert all(np.array_equal(a, b) for a, b in zip(layer.get_weights(), result.extractor.get_layer(layer.name).get_weights()))
    classifier = build_classifier(result.extractor, result.head)
    exported, failed = predict_paths(classifier, rows["path"].iloc[1::2].tolist(), 96)
    assert not failed
    np.testing.assert_allclose(exported, result.validation_probabilities, atol=1e-4)
    assert np.ptp(exported) > 1e-3  # not a constant: the comparison means something


@pytest.mark.slow  # a whole train (~25 s quiet); fine_tune() dispatching to cached_top is covered by the test above
def test_train_with_cached_top_records_the_method_and_judges_it(tmp_path, demo_data, imagenet_weights) -> None:
    """keeneye train with method cached_top: the phase is run, described, recorded and judged like the images method."""
    import json

    from rich.console import Console

    from keeneye import api

    config = tiny_config(tmp_path, demo_data, run_name="top", training={"epochs": 8},
                         fine_tune={"enabled": True, "method": "cached_top", "unfreeze": "block_16_expand", "views": 2,
                                    "epochs": 2, "patience": 0, "judge": "validation"})  # folds: test_finetune_folds
    console = Console(record=True, width=250)
    result = api.train(config_from_dict(config, base_dir=tmp_path), console=console)
    text = console.export_text()
    assert "top trained on cached activations" in text and "-> keeping the" in text
    assert "fine-tuning: frozen bottom over" in text and "x 2 views" in text  # the long pre-pass has its own progress
    phases = json.loads((result.run_dir / "metadata.json").read_text())["training"]["phases"]
    assert phases["fine_tune"]["method"] == "cached_top" and phases["fine_tune"]["views"] == 2
    assert phases["fine_tune"]["epochs_run"] == 2 and phases["fine_tune"]["layers_trained"] == 7
