"""Experiment tracking and the runs table: MLflow (local store), TensorBoard logs, `keeneye runs`.

The shared tiny bundle is tracked in a local MLflow store (with a registered model); a second run,
trained here on the same demo images (embeddings cached, few epochs, no cross-validation), changes the head's dropout,
writes TensorBoard logs and points MLflow at a port where nothing listens.
"""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
from rich.console import Console
from typer.testing import CliRunner

from conftest import tiny_config

UNREACHABLE = "http://127.0.0.1:9"
MODEL_NAME = "keeneye-test"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_bundle, demo_data):
    """runs/tiny: the shared tiny bundle (copied), tracked afterwards with `track_run`, the hook train calls;
    runs/second: trained here through `keeneye.train`, with TensorBoard logs and an unreachable MLflow server."""
    pytest.importorskip("mlflow")
    import mlflow

    from keeneye import api
    from keeneye.config import config_from_dict, load_config
    from keeneye.tracking import track_run

    root = tmp_path_factory.mktemp("tracking")
    output_dir = root / "runs"
    tiny = output_dir / "tiny"
    shutil.copytree(tiny_bundle.run_dir, tiny)
    config = load_config(tiny / "config.json", [f"output_dir={output_dir}", "tracking.mlflow=true", f"tracking.registered_model={MODEL_NAME}"])
    tracked_output = io.StringIO()
    run_id = track_run(tiny, config, Console(file=tracked_output, width=250))

    second_output = io.StringIO()
    second_config = config_from_dict(tiny_config(root, demo_data, run_name="second", training={"epochs": 8, "cv_folds": 0}, head={"dropout": 0.3},
                                                 tracking={"mlflow": True, "mlflow_uri": UNREACHABLE, "tensorboard": True}), base_dir=root)
    second = api.train(second_config, console=Console(file=second_output, width=250))

    uri = f"sqlite:///{output_dir / 'mlruns' / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)  # for models:/ URIs (the registry follows the tracking URI)
    yield SimpleNamespace(output_dir=output_dir, tiny=tiny, config=config, run_id=run_id, tracked_output=tracked_output.getvalue(),
                          second=second, second_output=second_output.getvalue(), client=mlflow.MlflowClient(uri))
    mlflow.set_tracking_uri(previous)


def _mlflow_runs(runs):
    experiment = runs.client.get_experiment_by_name("keeneye")
    return runs.client.search_runs([experiment.experiment_id]), experiment


def test_mlflow_logs_params_metrics_and_artifacts(runs) -> None:
    from keeneye.runs import flatten

    logged, experiment = _mlflow_runs(runs)
    assert [run.info.run_name for run in logged] == ["tiny"]  # "second" could not reach its server
    run = logged[0]
    assert run.info.run_id == runs.run_id and run.info.status == "FINISHED"
    bundle = runs.tiny
    assert Path(experiment.artifact_location.removeprefix("file://")).is_relative_to(runs.output_dir / "mlruns")

    params = run.data.params
    config = runs.config.model_dump(mode="json")
    assert set(params) == set(flatten(config)) and len(params) > 40
    assert params["head.dropout"] == "0.1" and params["training.epochs"] == "40" and params["tracking.mlflow"] == "true"
    assert params["head.dense_units"] == "[32]" and params["data_folder_path"] == config["data_folder_path"]

    metrics, metadata = json.loads((bundle / "metrics.json").read_text()), json.loads((bundle / "metadata.json").read_text())
    got = run.data.metrics
    for point in ("at_threshold", "at_0.5"):
        for key in ("f1", "precision", "recall", "threshold", "tp", "fn"):
            assert got[f"test.{point}.{key}"] == pytest.approx(metrics[point][key])
    assert got["test.average_precision"] == pytest.approx(metrics["average_precision"])
    assert got["validation.f1"] == pytest.approx(metrics["threshold_choice"]["validation_f1"])
    assert got["time.total_s"] == pytest.approx(metadata["timings"]["total_s"])
    assert got["data.used"] == sum(row["used"] for row in metadata["data"]) == 64
    assert got["data.dropped"] == 0 and got["leakage.leaked_testing_images"] == metrics["leakage"]["leaked_testing_images"]

    artifacts = {item.path for item in runs.client.list_artifacts(run.info.run_id)}
    assert {"audit.json", "audit.txt", "report.html", "metrics.json", "predictions.csv", "roc.png"} <= artifacts
    assert not any(path.startswith("model.") for path in artifacts)  # the model is logged once, as the pyfunc
    assert f"registered as {MODEL_NAME} version 1" in runs.tracked_output


def test_logged_model_gives_keeneyes_probabilities(runs) -> None:
    import mlflow

    from keeneye.inference.predictor import Predictor

    model = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}/1")
    spec = model.metadata.signature.inputs.inputs[0]
    assert spec.type == np.dtype(np.uint8) and spec.shape == (-1, -1, -1, 3)

    paths = sorted((runs.config.data_folder_path / "testing").rglob("*.png"))[::3]
    images = np.stack([cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in paths])
    odd_size = np.random.default_rng(0).integers(0, 256, (3, 150, 110, 3), dtype=np.uint8)
    predictor = Predictor.from_bundle(runs.tiny)
    for batch in (images, odd_size):
        logged = np.asarray(model.predict(batch))
        expected = predictor.predict_images(batch)
        assert logged.shape == (len(batch),)
        assert np.max(np.abs(logged - expected)) <= 1e-5
    assert np.ptp(np.asarray(model.predict(images))) > 0.3  # a real model: defects and good parts apart


def test_tensorboard_logs_every_epoch_of_the_head_phase(runs) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    bundle = runs.second.run_dir
    history = (bundle / "history.csv").read_text().strip().splitlines()
    epochs = len(history) - 1
    assert "val_loss" in history[0]  # cv_folds 0: the head trains beside a validation split, so both curves exist
    for side in ("train", "validation"):
        events = EventAccumulator(str(bundle / "tensorboard" / "head" / side)).Reload()
        assert len(events.Tensors("epoch_loss")) == epochs
    assert not (runs.tiny / "tensorboard").exists()  # off unless asked for
    second = runs.client.search_runs([runs.client.get_experiment_by_name("keeneye").experiment_id], "attributes.run_name = 'second'")
    assert not second


def test_unreachable_server_is_one_warning_and_the_run_completes(runs) -> None:
    bundle = runs.second.run_dir
    assert bundle.name == "second" and (bundle / "metadata.json").is_file() and (bundle / "model.keras").is_file()
    warnings = [line for line in runs.second_output.splitlines() if "warning:" in line and "MLflow" in line]
    assert len(warnings) == 1 and UNREACHABLE in warnings[0] and "is complete" in warnings[0]


def test_runs_table_lists_both_runs_sorted(runs) -> None:
    from keeneye.cli import app
    from keeneye.runs import list_runs

    frame = list_runs(runs.output_dir, sort="f1")
    assert sorted(frame["name"]) == ["second", "tiny"]  # mlruns/ is not a run
    for row in frame.itertuples():
        metrics = json.loads((Path(row.path) / "metrics.json").read_text())
        assert row.test_f1 == pytest.approx(metrics["at_threshold"]["f1"])
        assert row.test_ap == pytest.approx(metrics["average_precision"])
    assert list(frame["test_f1"]) == sorted(frame["test_f1"], reverse=True)
    assert list(list_runs(runs.output_dir, sort="name", descending=True)["name"]) == ["tiny", "second"]

    result = CliRunner().invoke(app, ["runs", str(runs.output_dir), "--sort", "ap"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "tiny" in result.output and "second" in result.output and "frozen" in result.output
    bad = CliRunner().invoke(app, ["runs", str(runs.output_dir), "--sort", "colour"])
    assert bad.exit_code == 2 and "f1" in bad.output


def test_compare_shows_the_changed_keys(runs) -> None:
    from keeneye.cli import app
    from keeneye.runs import compare_runs

    comparison = compare_runs("tiny", "second", output_dir=runs.output_dir)
    changed = dict(zip(comparison.config["key"], zip(comparison.config["a"], comparison.config["b"])))
    assert changed["head.dropout"] == ("0.1", "0.3") and changed["training.epochs"] == ("40", "8")
    assert changed["training.cv_folds"] == ("5", "0")
    assert set(changed) == {"run_name", "output_dir", "training.epochs", "training.cv_folds", "head.dropout", "tracking.mlflow",
                            "tracking.mlflow_uri", "tracking.tensorboard"}
    assert "time.total_s" in set(comparison.metrics["metric"])

    result = CliRunner().invoke(app, ["runs", "compare", "tiny", str(runs.second.run_dir), "-d", str(runs.output_dir)],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "head.dropout" in result.output and "0.3" in result.output and "8 keys differ" in result.output
    missing = CliRunner().invoke(app, ["runs", "compare", "tiny", "nope", "-d", str(runs.output_dir)])
    assert missing.exit_code == 2 and "nope is not a run" in missing.output


def test_cross_validated_estimate_is_read_when_present(tmp_path: Path) -> None:
    from keeneye.runs import cv_estimate, run_metrics

    assert cv_estimate({"cross_validation": {"folds": 5, "f1": {"mean": 0.81, "sd": 0.04}}}) == (0.81, 0.04)
    assert cv_estimate({"cv": {"estimate": 0.7}}) == (0.7, None)
    assert cv_estimate({"at_threshold": {"f1": 0.9}}) == (None, None)
    (tmp_path / "metrics.json").write_text(json.dumps({"cross_validation": {"f1": {"mean": 0.81, "sd": 0.04}, "note": "text"}}))
    assert run_metrics(tmp_path) == {"cv.f1.mean": 0.81, "cv.f1.sd": 0.04}


def test_tracking_without_mlflow_says_how_to_install(tmp_path: Path, demo_data, monkeypatch) -> None:
    from keeneye import api
    from keeneye.config import config_from_dict
    from keeneye.errors import ConfigError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    config = config_from_dict(tiny_config(tmp_path, demo_data, tracking={"mlflow": True}), base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"pip install 'keeneye\[mlflow\]'"):
        api.train(config, console=Console(quiet=True))
    assert not (tmp_path / "runs").exists()  # it stopped before doing anything


def test_tracking_config(project: Path) -> None:
    from keeneye.config import config_from_dict
    from keeneye.errors import ConfigError

    default = config_from_dict({"data_folder_path": "data"}, base_dir=project).tracking
    assert (default.mlflow, default.tensorboard, default.mlflow_uri, default.experiment) == (False, False, None, "keeneye")
    folder = config_from_dict({"data_folder_path": "data", "tracking": {"mlflow_uri": "store"}}, base_dir=project)
    assert folder.tracking.mlflow_uri == str(project / "store")  # a plain path: a local store beside the config
    for uri in ("http://mlflow:5000", "sqlite:///x/mlflow.db", "databricks"):
        assert config_from_dict({"data_folder_path": "data", "tracking": {"mlflow_uri": uri}}, base_dir=project).tracking.mlflow_uri == uri
    with pytest.raises(ConfigError, match=r"tracking\.mlflow: expected true or false, got \"yes\""):
        config_from_dict({"data_folder_path": "data", "tracking": {"mlflow": "yes"}}, base_dir=project)
    with pytest.raises(ConfigError, match=r"tracking\.mlfow: unknown key; did you mean 'tracking\.mlflow'"):
        config_from_dict({"data_folder_path": "data", "tracking": {"mlfow": True}}, base_dir=project)
