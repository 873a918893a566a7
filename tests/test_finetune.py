"""Fine-tuning, augmentation, oversampling and the streaming image pipeline (issue #4).

Fast: 96 px demo images, a few epochs; real ImageNet weights only where the numbers matter.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from rich.console import Console

from badfiles import EXPECTED_REASONS, make_bad_files_folder
from conftest import tiny_config
from keeneye import api
from keeneye.config import AugmentationConfig, config_from_dict
from keeneye.errors import ConfigError

QUIET = Console(quiet=True)


def _extractor(size: int = 96, weights=None):
    from keeneye.config import ModelConfig
    from keeneye.model.backbone import ResolvedWeights, build_feature_extractor, resolve_weights

    resolved = ResolvedWeights("none", None, None) if weights is None else resolve_weights(str(weights), 1.0, size)
    return build_feature_extractor(1.0, size, resolved, ModelConfig().features)  # the config's default mode, as train builds it


# ------------------------------------------------------------------------------------------------
# Which layers train
# ------------------------------------------------------------------------------------------------


def test_unfreeze_counts_layers_from_the_top_and_keeps_batchnorm_frozen() -> None:
    import keras

    from keeneye.training.finetune import find_backbone, unfreeze_top

    base = find_backbone(_extractor())
    layers = base.layers
    unfrozen = unfreeze_top(base, 20)
    top = layers[-20:]
    expected = [layer.name for layer in top if not isinstance(layer, keras.layers.BatchNormalization)]
    assert unfrozen == expected and len(expected) == 13  # 7 of the top 20 are BatchNormalization
    for layer in layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            assert not layer.trainable, f"{layer.name}: BatchNormalization must stay frozen"
        else:
            assert layer.trainable == (layer in top), layer.name
    trainable = {id(v) for v in base.trainable_variables}
    assert trainable == {id(v) for layer in top if layer.name in expected for v in layer.trainable_variables}
    assert trainable, "the top convolutions must have trainable weights"


def test_unfreeze_from_a_layer_name_and_clear_errors() -> None:
    import keras

    from keeneye.training.finetune import find_backbone, unfreeze_top

    base = find_backbone(_extractor())
    names = [layer.name for layer in base.layers]
    unfrozen = unfreeze_top(base, "block_16_expand")
    start = names.index("block_16_expand")
    assert unfrozen == [layer.name for layer in base.layers[start:] if not isinstance(layer, keras.layers.BatchNormalization)]
    assert unfrozen[0] == "block_16_expand" and "block_15_project" not in unfrozen
    with pytest.raises(ConfigError, match="'block_16_pad' is not a layer of mobilenetv2"):
        unfreeze_top(base, "block_16_pad")  # the name pattern is valid but this block has no padding layer
    with pytest.raises(ConfigError, match="155 layers asked for; .* has 154"):
        unfreeze_top(base, 155)


@pytest.mark.slow  # 20 s; the images method is no longer the default (test_cached_top checks the same for cached_top)
def test_fine_tuning_trains_only_the_top_and_never_moves_batchnorm_statistics(tmp_path, demo_data, imagenet_weights) -> None:
    """One real fine-tuning run: unfrozen kernels change, everything below and every BN statistic does not."""
    import keras

    from keeneye.model.head import build_classifier, build_head
    from keeneye.training.distribute import choose_devices
    from keeneye.training.finetune import find_backbone, fine_tune

    cfg = config_from_dict(tiny_config(tmp_path, demo_data, fine_tune={"enabled": True, "method": "images", "unfreeze": 12, "epochs": 2,
                                                                       "patience": 0, "learning_rate": 1e-3}), base_dir=tmp_path)
    extractor = _extractor(96, imagenet_weights)
    head = build_head(extractor.output_shape[-1], [32], 0.1, seed=0)
    paths = sorted(str(p) for p in (demo_data / "training").rglob("*.png"))
    labels = np.array([int("/defect/" in p) for p in paths])
    rows = pd.DataFrame({"path": paths})
    before = [[np.array(w) for w in layer.get_weights()] for layer in find_backbone(extractor).layers]
    result = fine_tune(cfg, extractor, head, rows.iloc[::2], labels[::2], rows.iloc[1::2], labels[1::2], choose_devices("off"))
    assert len(result.history) == 2 and list(result.history["epoch"]) == [1, 2]
    assert all(np.array_equal(a, b) for a, b in zip(extractor.get_weights(), [w for ws in before for w in ws])), "input model changed"
    tuned = find_backbone(result.extractor)
    top = {layer.name for layer in tuned.layers[-12:]}
    changed = set()
    for layer, old in zip(tuned.layers, before):
        same = all(np.array_equal(a, b) for a, b in zip(layer.get_weights(), old))
        if isinstance(layer, keras.layers.BatchNormalization):
            assert same, f"{layer.name}: BatchNorm weights or moving statistics moved"
        elif layer.name not in top:
            assert same, f"{layer.name} is below the unfrozen top and must not change"
        elif not same:
            changed.add(layer.name)
    assert {"Conv_1", "block_16_project"} <= changed, changed
    assert result.unfrozen == [n for n in result.unfrozen if n in top]
    assert result.dropped.empty
    # The result has the bundle's architecture, float32, and nothing random in it.
    classifier = build_classifier(result.extractor, result.head)
    path = tmp_path / "model.keras"
    classifier.save(path)
    loaded = keras.saving.load_model(path, compile=False)
    assert [layer.name for layer in loaded.layers] == ["image", "feature_extractor", "head"]
    assert not _random_layers(loaded)
    images = np.stack([np.zeros((96, 96, 3), np.uint8), np.full((96, 96, 3), 200, np.uint8)])
    np.testing.assert_allclose(loaded.predict(images, verbose=0), classifier.predict(images, verbose=0), atol=1e-6)


def _random_layers(model) -> list[str]:
    found = []
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if type(layer).__name__.startswith("Random") or layer.name == "augmentation":
            found.append(layer.name)
    return found


@pytest.mark.slow  # 22-33 s (a whole train with the images method, not the default); `make test` keeps the cached_top checks
def test_train_with_fine_tuning_reports_both_phases_and_keeps_the_bundle_contract(tmp_path, demo_data, imagenet_weights) -> None:
    """One fine-tuning train: both phases reported, the bundle contract kept, and a file that breaks after the
    embedding pass (its cached features hide it) is reported by the fine-tuning pipeline, not skipped."""
    import shutil

    import keras

    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    victim = sorted((data / "training" / "defect").glob("*.png"))[0]

    class Corrupt(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):  # the head phase starts after the embedding pass
            victim.write_bytes(victim.read_bytes()[:40])

    config = tiny_config(tmp_path, data, run_name="ft", training={"epochs": 8, "cv_folds": 0},  # the folds: tiny_bundle
                         fine_tune={"enabled": True, "method": "images", "unfreeze": "block_16_expand", "epochs": 2, "patience": 2})
    console = Console(record=True, width=250)
    result = api.train(config_from_dict(config, base_dir=tmp_path), console=console, callbacks=[Corrupt()])
    text = console.export_text()
    assert "validation F1 after head training:" in text
    assert "validation F1: head only" in text and "fine-tuned" in text and "-> keeping the" in text
    assert 'fine_tune.judge "folds" needs the cross-validation, which did not run: the validation split judges.' in text
    metadata = json.loads((result.run_dir / "metadata.json").read_text())
    training = metadata["training"]
    assert training["kept"] in ("head", "fine_tune") and training["kept_reason"]
    assert set(training["phases"]) == {"head", "fine_tune"}
    assert training["phases"]["fine_tune"]["epochs_run"] == 2 and training["phases"]["fine_tune"]["layers_trained"] == 7
    assert training["phases"]["fine_tune"]["judge"] == "validation"  # what judged, not what was asked for
    for phase in training["phases"].values():
        assert 0 <= phase["validation_f1"] <= 1
    history = pd.read_csv(result.run_dir / "history.csv")
    assert list(history["phase"].unique()) == ["head", "fine_tune"] and history["epoch"].is_monotonic_increasing
    model = keras.saving.load_model(result.run_dir / "model.keras", compile=False)  # plain Keras, no custom objects
    assert model.input.dtype == "uint8" and model.output.shape[-1] == 1
    assert [layer.name for layer in model.layers] == ["image", "feature_extractor", "head"]
    assert not _random_layers(model), "augmentation must not be in the saved model"
    assert not (tmp_path / "runs" / "ft.partial").exists(), "the resumable state is removed once the bundle is published"

    # The broken file: listed with the decoder's reason, counted, and not used.
    dropped = pd.read_csv(result.run_dir / "dropped_files.csv")
    assert dropped["path"].tolist() == [str(victim)]
    assert dropped["reason"].tolist() == ["truncated PNG (no IEND chunk)"]
    assert "failed to decode while fine-tuning" in text
    manifest = pd.read_csv(result.run_dir / "manifest.csv")
    assert not manifest.loc[manifest["path"] == str(victim), "used"].item()
    counts = pd.read_csv(result.run_dir / "data_counts.csv")
    assert (counts["found"] == counts["skipped"] + counts["dropped"] + counts["used"]).all()
    assert counts["dropped"].sum() == 1


# ------------------------------------------------------------------------------------------------
# Augmentation
# ------------------------------------------------------------------------------------------------


def test_augmenter_maps_uint8_to_uint8_and_each_setting_adds_its_layer() -> None:
    from keeneye.training.augment import augmentation_layers, build_augmenter

    off = AugmentationConfig(flip="none", rotation=0, brightness=0, contrast=0, zoom=0, crop=0)
    assert build_augmenter(off, 32, seed=0) is None
    names = [layer.name for layer in augmentation_layers(AugmentationConfig(crop=0.2), 32, seed=0)]
    assert names == ["random_flip", "random_rotation", "random_zoom", "random_crop", "crop_resize", "random_brightness", "random_contrast"]
    augmenter = build_augmenter(AugmentationConfig(crop=0.2), 32, seed=0)
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    out = np.asarray(augmenter(images, training=True))
    assert out.dtype == np.uint8 and out.shape == images.shape
    assert not np.array_equal(out, images)
    only_flip = build_augmenter(AugmentationConfig(flip="horizontal", rotation=0, brightness=0, contrast=0, zoom=0), 32, seed=1)
    flipped = np.asarray(only_flip(images, training=True))
    for original, result in zip(images, flipped):  # a flip moves pixels but never changes them
        assert np.array_equal(result, original) or np.array_equal(result, original[:, ::-1])


def test_frozen_views_are_reproducible_and_labelled(tmp_path, demo_data, imagenet_weights) -> None:
    from keeneye.training.finetune import embed_augmented_views

    cfg = config_from_dict(tiny_config(tmp_path, demo_data, augmentation={"frozen_views": 2}), base_dir=tmp_path)
    extractor = _extractor(96, imagenet_weights)
    paths = sorted(str(p) for p in (demo_data / "training").rglob("*.png"))[::5]
    rows = pd.DataFrame({"path": paths}, index=np.arange(100, 100 + len(paths)))
    labels = np.array([int("/defect/" in p) for p in paths])
    features, view_labels, dropped = embed_augmented_views(cfg, extractor, rows, labels, 2)
    again, _, _ = embed_augmented_views(cfg, extractor, rows, labels, 2)
    assert features.shape == (2 * len(paths), extractor.output_shape[-1]) and np.array_equal(view_labels, np.tile(labels, 2)) and dropped.empty
    np.testing.assert_array_equal(features, again)
    assert not np.allclose(features[: len(paths)], features[len(paths):]), "two views of an image must differ"


# ------------------------------------------------------------------------------------------------
# Imbalance
# ------------------------------------------------------------------------------------------------


def test_oversampling_balances_every_epoch_reproducibly() -> None:
    from keeneye.training.pipeline import EpochPlan

    labels = np.array([0] * 90 + [1] * 10)
    plan = EpochPlan(labels, batch_size=16, seed=7, oversample=True)
    assert plan.rows_per_epoch == 180 and plan.steps_per_epoch == 12
    first = plan.order(0)
    assert len(first) == 180 and np.bincount(labels[first]).tolist() == [90, 90]
    assert set(first.tolist()) == set(range(100)), "every row is visited every epoch"
    assert np.array_equal(first, EpochPlan(labels, 16, 7, oversample=True).order(0)), "a pure function of (seed, epoch)"
    assert not np.array_equal(first, plan.order(1))
    assert [len(b) for b in plan.batches(0)] == [16] * 11 + [4]
    plain = EpochPlan(labels, 16, 7)
    assert sorted(plain.order(3).tolist()) == list(range(100))
    assert EpochPlan(labels, 16, 7, shuffle=False).order(5).tolist() == list(range(100))


def test_oversample_in_training_uses_balanced_epochs(tmp_path, demo_data, imagenet_weights) -> None:
    from keeneye.config import HeadConfig, TrainingConfig
    from keeneye.training.fit import fit_head

    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 8)).astype("float32")
    y = np.array([0] * 50 + [1] * 10)
    seen = []

    import keras

    class Count(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen.append(self.params["steps"])

    fit_head(x, y, x[:10], y[:10], HeadConfig(dense_units=[4]), TrainingConfig(epochs=2, batch_size=10, oversample=True, early_stopping_patience=0), callbacks=[Count()])
    assert seen == [10, 10]  # 100 rows per epoch (50 + 50), not 60


# ------------------------------------------------------------------------------------------------
# The streaming pipeline and unreadable files
# ------------------------------------------------------------------------------------------------


def test_pipeline_reports_exactly_the_scanners_dropped_files(tmp_path) -> None:
    from keeneye.data.scan import scan_folder
    from keeneye.training.features import embed_manifest
    from keeneye.training.pipeline import EpochPlan, ImagePipeline

    for split in ("training", "testing"):
        for label in ("defect", "good"):
            make_bad_files_folder(tmp_path / "data" / split / label)
    scan = scan_folder(tmp_path / "data", "defect")
    manifest = scan.manifest.reset_index(drop=True)
    embedded = embed_manifest(manifest, lambda batch: np.zeros((len(batch), 3), np.float32), 3, 32, None, batch_size=4)
    scanner = {manifest.loc[i, "path"]: reason for i, reason in embedded.dropped["reason"].items()}
    assert sorted(Path(p).name for p in scanner) == sorted(4 * list(EXPECTED_REASONS))

    labels = (manifest["label"] == "defect").to_numpy().astype(int)
    with ImagePipeline(manifest["path"].tolist(), labels, 32) as pipe:
        plan = EpochPlan(labels, batch_size=5, seed=0)
        batches = list(pipe.dataset(plan, range(2)).as_numpy_iterator())
        failures = pipe.failures.frame(manifest.index)
    assert len(batches) == 2 * plan.steps_per_epoch, "no batch is skipped: shapes stay fixed"
    weights = np.concatenate([w for _, _, w in batches])
    assert (weights == 0).sum() == 2 * len(scanner), "each unreadable file gets weight 0 in each epoch"
    assert {manifest.loc[i, "path"]: r for i, r in failures["reason"].items()} == scanner
    for name, reason in EXPECTED_REASONS.items():
        assert scanner[str(tmp_path / "data" / "training" / "defect" / name)] == reason


def test_the_better_phase_on_validation_is_kept() -> None:
    from keeneye.training.finetune import compare_phases

    y = np.array([1] * 100 + [0] * 100)
    confident = np.where(y == 1, 0.9, 0.1)
    unsure = np.where(y == 1, 0.6, 0.4)
    assert compare_phases(y, unsure, 0.95, confident, 0.97)[0] == "fine_tune"
    assert compare_phases(y, confident, 0.97, unsure, 0.95)[0] == "head"
    # Less than one image's worth of F1 apart: a tie, decided by the validation log-loss.
    kept, reason = compare_phases(y, unsure, 0.9650, confident, 0.9649)
    assert kept == "fine_tune" and "tied" in reason and "log-loss" in reason
    assert compare_phases(y, confident, 0.9649, unsure, 0.9650)[0] == "head"
    assert compare_phases(y, confident, 0.96, confident, 0.96)[0] == "head", "a full tie keeps the simpler model"
    assert compare_phases(y, confident, None, unsure, None)[0] == "fine_tune"
