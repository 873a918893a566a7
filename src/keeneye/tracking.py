"""Experiment tracking: MLflow after a run is published, TensorBoard logs while it trains.

MLflow (``tracking.mlflow: true``; ``pip install 'keeneye[mlflow]'``) receives, once the bundle
is complete: the resolved config as parameters (flattened keys such as ``head.dropout``), every
number of :func:`keeneye.runs.run_metrics` as metrics, the bundle's reports (audit, report.html,
metrics.json, plots, CSVs, TensorBoard logs) as artifacts, and the model as an MLflow pyfunc
(:mod:`keeneye.inference.mlflow_model`: uint8 images in, probabilities out, keeneye's own
predictor inside), optionally registered under ``tracking.registered_model``.

Tracking never breaks a run: it starts after the bundle is published, and any failure (an
unreachable server, a full disk, a registry that refuses) is one warning. The first request goes
out with short HTTP timeouts and no retries, so an unreachable server costs seconds, not minutes.

With no ``tracking.mlflow_uri``, the store is ``<output_dir>/mlruns/``: an SQLite database
(``mlflow.db``) and an ``artifacts/`` folder, no server needed; browse it with
``mlflow ui --backend-store-uri sqlite:///<output_dir>/mlruns/mlflow.db``. (MLflow 3 refuses its
plain-file store unless MLFLOW_ALLOW_FILE_STORE is set, so the local store is SQLite.)
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from rich.console import Console
from rich.markup import escape

import keeneye
from keeneye.bundle import EVALUATIONS_DIR
from keeneye.config import Config, TrackingConfig
from keeneye.errors import ConfigError
from keeneye.runs import flatten, run_metrics
from keeneye.terminal import Reporter

if TYPE_CHECKING:
    from mlflow.models import ModelSignature

LOCAL_STORE = "mlruns"
TENSORBOARD_FOLDER = "tensorboard"
MODEL_NAME = "model"
#: The first request to a tracking server: no retries, a short timeout (MLflow's default retries for minutes).
PROBE_HTTP_SETTINGS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
#: Bundle files that are reports, not model: logged as run artifacts and left out of the pyfunc model.
REPORT_SUFFIXES = (".png", ".html", ".csv", ".txt")
REPORT_FILES = ("metrics.json", "audit.json")
NOT_MODEL_FOLDERS = (EVALUATIONS_DIR, "exports", TENSORBOARD_FOLDER)


def require_packages(cfg: Config) -> None:
    """Fail before training, not after, when tracking is on and its package is missing."""
    needs = [("mlflow", "mlflow", cfg.tracking.mlflow), ("tensorboard", "tensorboard", cfg.tracking.tensorboard)]
    for key, module, wanted in needs:
        if wanted and importlib.util.find_spec(module) is None:
            raise ConfigError(
                f"tracking.{key} is true but the {module} package is not installed: "
                f"pip install 'keeneye[{key}]' (or set tracking.{key} to false)."
            )


# --- TensorBoard -------------------------------------------------------------------------------


def tensorboard_callbacks(cfg: Config, run_state: Path, phase: str) -> list:
    """A Keras TensorBoard callback writing to `<run state>/tensorboard/<phase>` when tracking.tensorboard is on.

    The logs live beside the phase's checkpoints until the bundle is published (a resumed run
    appends to them), then move into the bundle with :func:`keep_tensorboard_logs`.
    """
    if not cfg.tracking.tensorboard:
        return []
    import keras

    return [keras.callbacks.TensorBoard(log_dir=str(Path(run_state) / TENSORBOARD_FOLDER / phase))]


def keep_tensorboard_logs(run_state: Path, bundle_folder: Path) -> None:
    """Copy the run's TensorBoard logs into the bundle (runs/<name>/tensorboard/<phase>/{train,validation})."""
    source = Path(run_state) / TENSORBOARD_FOLDER
    if source.is_dir():
        shutil.copytree(source, Path(bundle_folder) / TENSORBOARD_FOLDER)


# --- MLflow ------------------------------------------------------------------------------------


def store_location(settings: TrackingConfig, output_dir: Path) -> tuple[str, Path | None]:
    """(tracking URI, local store folder or None for a remote store)."""
    uri = settings.mlflow_uri
    if uri is not None and not os.path.isabs(uri):  # config validation made every plain path absolute
        return uri, None
    folder = Path(uri) if uri is not None else Path(output_dir) / LOCAL_STORE
    return f"sqlite:///{folder / 'mlflow.db'}", folder


def config_params(cfg: Config) -> dict[str, str]:
    """The resolved config as MLflow parameters: flattened keys, JSON values (strings as they are)."""
    flat = flatten(cfg.model_dump(mode="json"))
    return {key: value if isinstance(value, str) else json.dumps(value) for key, value in flat.items()}


@contextmanager
def _environment(settings: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the block only (MLflow reads its HTTP settings from there per request)."""
    previous = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _experiment_id(client, name: str, store: Path | None) -> str:
    """The experiment's id, creating it (artifacts inside the local store, not in the current directory)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = (store / "artifacts").as_uri() if store is not None else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # another run created it meanwhile
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def track_run(run_dir: Path, cfg: Config, console: Console | Reporter) -> str | None:
    """Log a published run to MLflow; returns the MLflow run id, or None (tracking off, or it failed: one warning)."""
    if not cfg.tracking.mlflow or run_dir is None:
        return None
    uri, store = store_location(cfg.tracking, Path(cfg.output_dir))
    try:
        import mlflow

        if store is not None:
            store.mkdir(parents=True, exist_ok=True)
        with _environment(PROBE_HTTP_SETTINGS):
            experiment_id = _experiment_id(mlflow.MlflowClient(uri), cfg.tracking.experiment, store)
        run_id, version = _log_run(mlflow, uri, experiment_id, Path(run_dir), cfg)
    except Exception as exc:  # tracking must never fail a run whose bundle is already written
        reason = " ".join(str(exc).split())
        reason = reason if len(reason) <= 240 else reason[:240] + "…"
        console.print(f"[yellow]warning:[/] MLflow tracking at {escape(uri)} failed (the bundle {escape(str(run_dir))} "
                      f"is complete): {type(exc).__name__}: {escape(reason)}",
                      highlight=False, soft_wrap=True)
        return None
    registered = f"; registered as {cfg.tracking.registered_model} version {version}" if version else ""
    console.print(f"MLflow: run {run_id} in experiment {escape(cfg.tracking.experiment)} at {escape(uri)}{escape(registered)}",
                  highlight=False, soft_wrap=True)
    return run_id


@contextmanager
def _tracking_uri(mlflow, uri: str) -> Iterator[None]:
    """MLflow's fluent API (start_run, log_model) uses a global URI: set it for the block, then put it back."""
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


def _log_run(mlflow, uri: str, experiment_id: str, run_dir: Path, cfg: Config) -> tuple[str, str | None]:
    tags = {"keeneye.version": keeneye.__version__, "keeneye.run_dir": str(run_dir)}
    with _tracking_uri(mlflow, uri), mlflow.start_run(
        experiment_id=experiment_id, run_name=run_dir.name, tags=tags, nested=mlflow.active_run() is not None,
    ) as run:
        mlflow.log_params(config_params(cfg))
        mlflow.log_metrics(run_metrics(run_dir))
        for path in sorted(run_dir.iterdir()):
            if path.is_file() and (path.suffix in REPORT_SUFFIXES or path.name in REPORT_FILES):
                mlflow.log_artifact(str(path))
        if (run_dir / TENSORBOARD_FOLDER).is_dir():
            mlflow.log_artifacts(str(run_dir / TENSORBOARD_FOLDER), TENSORBOARD_FOLDER)
        info = _log_model(mlflow, run_dir, cfg.tracking.registered_model)
    return run.info.run_id, getattr(info, "registered_model_version", None)


def pyfunc_signature() -> ModelSignature:
    """uint8 RGB images (N, height, width, 3) of any size in, the positive-class probability (N,) out."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),
                          outputs=Schema([TensorSpec(np.dtype(np.float32), (-1,))]))


def _model_files(run_dir: Path, target: Path) -> Path:
    """The bundle without its reports: what the predictor loads (model.keras, model.onnx, metadata, config, ...)."""
    target.mkdir()
    for path in run_dir.iterdir():
        if path.is_file() and not (path.suffix in REPORT_SUFFIXES or path.name in REPORT_FILES):
            shutil.copy2(path, target / path.name)
        elif path.is_dir() and path.name not in NOT_MODEL_FOLDERS:
            shutil.copytree(path, target / path.name)
    return target


def _log_model(mlflow, run_dir: Path, registered_model: str | None):
    """The bundle as an MLflow pyfunc (models from code: keeneye.inference.mlflow_model, nothing pickled)."""
    code = importlib.util.find_spec("keeneye.inference.mlflow_model").origin
    with tempfile.TemporaryDirectory(prefix="keeneye-mlflow-") as temporary, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # MLflow's advice to add an input example and type hints
        bundle = _model_files(run_dir, Path(temporary) / "bundle")
        return mlflow.pyfunc.log_model(
            name=MODEL_NAME, python_model=code, artifacts={"bundle": str(bundle)}, signature=pyfunc_signature(),
            pip_requirements=[f"keeneye=={keeneye.__version__}"], registered_model_name=registered_model,
        )
