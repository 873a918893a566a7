"""train -> evaluate -> predict end to end, the embedding cache, bundle contents and bad-file accounting."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from rich.console import Console
from typer.testing import CliRunner

from badfiles import make_bad_files_folder
from conftest import tiny_config
from keeneye import api
from keeneye.bundle import load_bundle
from keeneye.cli import app
from keeneye.config import config_from_dict
from keeneye.data.decode import load_image
from keeneye.errors import BundleError, DataError, WeightsError

QUIET = Console(quiet=True)


def test_train_writes_a_complete_bundle(tiny_bundle) -> None:
    run = tiny_bundle.run_dir
    for name in ("model.keras", "metadata.json", "config.json", "metrics.json", "history.csv", "predictions.csv",
                 "dropped_files.csv", "skipped_files.csv", "training_curves.png", "confusion_matrix.png", "precision_recall.png"):
        assert (run / name).is_file(), name
    metadata = json.loads((run / "metadata.json").read_text())
    assert metadata["class_names"] == ["good", "defect"] and metadata["positive_class"] == "defect"
    assert 0 < metadata["threshold"] < 1
    assert metadata["input"]["image_size"] == 96
    assert len(metadata["backbone"]["weights_sha256"]) == 64
    assert {"tensorflow", "keras", "keeneye"} <= set(metadata["versions"])
    predictions = pd.read_csv(run / "predictions.csv")
    assert list(predictions.columns) == ["path", "label", "probability", "predicted"]
    assert len(predictions) == 24  # 12 testing images per class
    assert not list(run.parent.glob(".staging-*")), "staging folder left behind"


def test_trained_model_separates_the_demo_classes(tiny_bundle) -> None:
    """Real ImageNet features on scratched vs clean textures: the head must learn something."""
    assert tiny_bundle.metrics["roc_auc"] >= 0.9
    assert tiny_bundle.metrics["at_threshold"]["f1"] >= 0.8


def test_plain_keras_model_matches_predictor(tiny_bundle, demo_data) -> None:
    """model.keras loads with plain Keras (no custom objects) and gives the predictor's numbers."""
    import keras

    paths = sorted(str(p) for p in (demo_data / "testing").rglob("*.png"))
    model = keras.saving.load_model(tiny_bundle.run_dir / "model.keras", compile=False)
    images = np.stack([load_image(p, 96) for p in paths])
    plain = np.asarray(model.predict(images, verbose=0)).reshape(-1)
    predictor = api.Predictor.from_bundle(tiny_bundle.run_dir, engine="keras")
    frame = predictor.predict_paths(paths)
    assert frame["error"].isna().all()
    assert np.abs(plain - frame["probability"].to_numpy()).max() < 1e-5
    assert plain.std() > 0.05, "probabilities should differ between images"


def test_evaluate_reproduces_training_metrics(tiny_bundle) -> None:
    result = api.evaluate(tiny_bundle.run_dir, console=QUIET)
    assert (result.folder / "metrics.json").is_file()
    for key in ("f1", "precision", "recall"):
        assert result.metrics["at_threshold"][key] == pytest.approx(tiny_bundle.metrics["at_threshold"][key], abs=1e-9)
    assert result.metrics["n"] == tiny_bundle.metrics["n"]


def test_evaluate_on_another_folder(tiny_bundle, demo_data, tmp_path) -> None:
    shutil.copytree(demo_data / "testing" / "defect", tmp_path / "defect")
    result = api.evaluate(tiny_bundle.run_dir, data=tmp_path, console=QUIET)
    assert result.metrics["n"] == 12 and result.metrics["n_positive"] == 12


def test_predict_cli_reports_bad_inputs_and_keeps_going(tiny_bundle, demo_data, tmp_path) -> None:
    good = sorted((demo_data / "testing" / "defect").glob("*.png"))[:3]
    broken = tmp_path / "broken.jpg"
    broken.write_text("not an image")
    output = tmp_path / "out" / "preds.csv"
    runner = CliRunner()
    result = runner.invoke(app, ["predict", str(tiny_bundle.run_dir), *map(str, good), str(broken), str(tmp_path / "missing.png"),
                                 "--output", str(output)])
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(output)
    assert len(frame) == 5
    assert frame["probability"].notna().sum() == 3
    reasons = dict(zip(frame["path"].map(lambda p: Path(p).name), frame["error"]))
    assert reasons["broken.jpg"] == "not an image (unrecognised format)"
    assert reasons["missing.png"] == "no such file or folder"
    assert set(frame.loc[frame["error"].isna(), "label"]) <= {"good", "defect"}


def test_predict_folder_and_glob_to_json(tiny_bundle, demo_data, tmp_path) -> None:
    output = tmp_path / "preds.json"
    frame = api.predict(tiny_bundle.run_dir, [demo_data / "testing" / "good", str(demo_data / "testing" / "defect" / "*_00*.png")],
                        output=output, console=QUIET)
    records = json.loads(output.read_text())
    assert len(records) == len(frame) == 12 + 10
    assert all(r["error"] is None and 0 <= r["probability"] <= 1 for r in records)


def test_predict_exits_nonzero_only_when_nothing_predicted(tiny_bundle, tmp_path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"")
    result = CliRunner().invoke(app, ["predict", str(tiny_bundle.run_dir), str(bad)])
    assert result.exit_code == 1
    assert "empty file (0 bytes)" in result.stderr


@pytest.mark.slow
def test_second_run_reuses_the_embedding_cache(tmp_path, demo_data, imagenet_weights) -> None:
    cache = tmp_path / "cache"
    # cv_folds 0: the cache is the subject here; the default cross-validated head is trained by tiny_bundle
    config = tiny_config(tmp_path, demo_data, cache_dir=str(cache), run_name="cached", training={"epochs": 3, "cv_folds": 0})
    first = api.train(config_from_dict(config, base_dir=tmp_path), console=QUIET)
    stored = sorted((str(p.relative_to(cache)), p.stat().st_mtime_ns) for p in cache.rglob("*") if p.is_file())
    assert any(name.endswith(".npy") for name, _ in stored), "the first run leaves a consolidated matrix"
    console = Console(record=True, width=200)
    second = api.train(config_from_dict(config, base_dir=tmp_path), console=console)
    text = console.export_text()
    assert "embedding cache reused: 64 reused, 0 computed" in text
    assert first.run_dir.name == "cached" and second.run_dir.name == "cached-2", "a second run must not overwrite the first"
    after = sorted((str(p.relative_to(cache)), p.stat().st_mtime_ns) for p in cache.rglob("*") if p.is_file())
    assert after == stored, "nothing new to store (or rewrite) on the second run"
    assert second.metrics["at_threshold"]["f1"] == pytest.approx(first.metrics["at_threshold"]["f1"])


def _bad_data_folder(root: Path) -> Path:
    """Two classes with good images plus one of every bad kind in training/defect."""
    from keeneye.demo import make_demo_dataset

    data = make_demo_dataset(root / "data", seed=5, train_per_class=8, test_per_class=4, size=48)
    make_bad_files_folder(data / "training" / "defect" / "bad")
    return data


def test_every_file_is_used_skipped_or_dropped_with_a_reason(tmp_path) -> None:
    data = _bad_data_folder(tmp_path)
    expected = make_bad_files_folder(tmp_path / "reference")
    config = {"data_folder_path": str(data), "output_dir": str(tmp_path / "runs"), "positive_class": "defect",
              "max_dropped_fraction": 0.5, "model": {"alpha": 0.35, "image_size": 96, "weights": "none"},
              "training": {"epochs": 1, "cv_folds": 0},  # one head fit, no folds: the file accounting is the subject
              "evaluation": {"min_validation_per_class": 1}}  # 2 validation images per class would bring the folds back
    result = api.train(config_from_dict(config, base_dir=tmp_path), console=QUIET)
    run = result.run_dir
    dropped = pd.read_csv(run / "dropped_files.csv")
    skipped = pd.read_csv(run / "skipped_files.csv")
    manifest = pd.read_csv(run / "manifest.csv")
    names = lambda frame: sorted(Path(p).name for p in frame["path"])  # noqa: E731
    assert names(dropped) == sorted(n for n, outcome in expected.items() if outcome == "dropped")
    assert names(skipped) == sorted(n for n, outcome in expected.items() if outcome == "skipped")
    bad_used = manifest[manifest["used"] & manifest["path"].str.contains("/bad/")]
    assert names(bad_used) == sorted(n for n, outcome in expected.items() if outcome == "used")
    assert dropped["reason"].str.len().gt(0).all() and set(dropped.columns) == {"path", "split", "label", "reason"}
    files_on_disk = [p for p in data.rglob("*") if p.is_file()]
    assert len(files_on_disk) == int(manifest["used"].sum()) + len(dropped) + len(skipped)
    counts = result.counts
    assert counts["found"].sum() == len(files_on_disk)
    assert (counts["found"] == counts["skipped"] + counts["dropped"] + counts["used"]).all()


def test_too_many_unreadable_files_stop_the_run(tmp_path) -> None:
    data = _bad_data_folder(tmp_path)
    config = {"data_folder_path": str(data), "output_dir": str(tmp_path / "runs"), "run_name": "strict",
              "positive_class": "defect", "max_dropped_fraction": 0.05, "model": {"alpha": 0.35, "image_size": 96, "weights": "none"}}
    with pytest.raises(DataError, match=r"3 of 33 images \(9.1%\) could not be read, more than max_dropped_fraction=0.05") as info:
        api.train(config_from_dict(config, base_dir=tmp_path), console=QUIET)
    report = tmp_path / "runs" / "strict-dropped_files.csv"
    assert str(report) in str(info.value) and len(pd.read_csv(report)) == 3
    assert not (tmp_path / "runs" / "strict").exists()


def test_missing_imagenet_weights_give_one_clear_error(tmp_path, demo_data) -> None:
    """alpha 0.5 weights are not in the test $KERAS_HOME and there is no internet here."""
    config = tiny_config(tmp_path, demo_data, model={"alpha": 0.5, "image_size": 96, "weights": "imagenet"})
    with pytest.raises(WeightsError) as info:
        api.train(config_from_dict(config, base_dir=tmp_path), console=QUIET)
    message = str(info.value)
    assert "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.5_224_no_top.h5" in message
    assert "tried: downloading https://storage.googleapis.com/" in message
    assert "$KERAS_HOME/models" in message and "model.weights" in message
    result = CliRunner().invoke(app, ["train", "--config", str(_write(tmp_path / "c.json", config))])
    assert result.exit_code == 2 and "Traceback" not in result.output and "Ways out" in result.stderr


def _write(path: Path, config: dict) -> Path:
    path.write_text(json.dumps(config))
    return path


def test_crash_while_saving_leaves_no_bundle(tmp_path, demo_data, imagenet_weights, monkeypatch) -> None:
    import keeneye.api as api_module

    def exploding_plot(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(api_module, "plot_training_curves", exploding_plot)
    config = tiny_config(tmp_path, demo_data, run_name="crash", training={"epochs": 2, "cv_folds": 0})
    with pytest.raises(RuntimeError, match="disk full"):
        api.train(config_from_dict(config, base_dir=tmp_path), console=QUIET)
    runs = tmp_path / "runs"
    assert list(runs.iterdir()) == [], "neither a bundle nor a staging folder may remain"
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(runs / "crash")
