"""Run the service with uvicorn: what `keeneye serve` calls."""

from __future__ import annotations

import json
import os
from pathlib import Path

from keeneye.bundle import load_bundle
from keeneye.errors import BundleError, ConfigError, KeeneyeError
from keeneye.serving.app import configure_logging, create_app
from keeneye.serving.limits import release_large_buffers
from keeneye.serving.settings import ServeSettings
from keeneye.terminal import filter_tensorflow_import_logs

#: With several worker processes, uvicorn imports the app in each of them: the bundle and the
#: settings travel through this environment variable to `app_from_env`.
SPEC_ENV = "KEENEYE_SERVE_SPEC"


def app_from_env():
    """App factory for uvicorn worker processes (`--workers N`)."""
    spec = json.loads(os.environ[SPEC_ENV])
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0") != "0":  # `keeneye serve` without --verbose: as quiet as the parent
        filter_tensorflow_import_logs()
    configure_logging(spec.get("log_level", "info"))
    release_large_buffers()
    return create_app(spec["bundle"], ServeSettings(**spec["settings"]))


def load_predictor(path: Path, settings: ServeSettings):
    """The Predictor `serve` will use, or a BundleError saying why the bundle cannot be served (no traceback)."""
    from keeneye.inference.predictor import Predictor

    try:
        return Predictor.from_bundle(path, engine=settings.engine, batch_size=max(32, settings.max_batch_size))
    except KeeneyeError:
        raise
    except Exception as exc:  # an engine that cannot run this model: still the bundle's problem for the user
        raise BundleError(f"{path}: cannot be served ({type(exc).__name__}: {exc}).") from None


def serve(
    bundle: str | os.PathLike, settings: ServeSettings | None = None, host: str = "127.0.0.1", port: int = 8000,
    workers: int = 1, log_level: str = "info",
) -> None:
    """Serve a bundle until SIGTERM/SIGINT; then in-flight requests finish and the batcher drains.

    Each worker process loads its own copy of the model (memory grows with `workers`).
    """
    import uvicorn

    from keeneye.inference import predictor as predictor_module

    settings = settings or ServeSettings()
    path = Path(bundle).expanduser().resolve()
    load_bundle(path, load_model=False)  # metadata schema and model archive checked: a clear BundleError now
    engines = getattr(predictor_module, "ENGINES", None)
    if engines and settings.engine not in engines:
        raise ConfigError(f"serve setting engine={settings.engine!r}: unknown engine (choose one of {', '.join(engines)})")
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    configure_logging(log_level)
    release_large_buffers()  # RSS follows the request bodies in memory (bounded by the budget), not past peaks
    options = dict(
        host=host, port=port, log_level=log_level, access_log=False, server_header=False,
        timeout_graceful_shutdown=settings.shutdown_timeout_s,
    )
    if workers == 1:  # the model is loaded here, so a bundle that cannot serve is refused before uvicorn starts
        uvicorn.run(create_app(load_predictor(path, settings), settings), **options)
    else:
        os.environ[SPEC_ENV] = json.dumps({"bundle": str(path), "settings": settings.model_dump(mode="json"), "log_level": log_level})
        uvicorn.run("keeneye.serving.server:app_from_env", factory=True, workers=workers, **options)
