"""keeneye: transfer-learning binary image classifier for visual inspection.

    from keeneye import train, evaluate, predict, Predictor, load_config
"""

__version__ = "0.1.0"

_EXPORTS = {
    "train": "keeneye.api", "evaluate": "keeneye.api", "predict": "keeneye.api", "watch": "keeneye.api",
    "TrainResult": "keeneye.api", "EvaluationResult": "keeneye.api",
    "Predictor": "keeneye.inference.predictor", "load_bundle": "keeneye.bundle",
    "load_config": "keeneye.config", "config_from_dict": "keeneye.config", "Config": "keeneye.config",
    "scan_folder": "keeneye.data.scan", "KeeneyeError": "keeneye.errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    """Import lazily: `import keeneye` stays fast and does not start TensorFlow."""
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'keeneye' has no attribute {name!r}")
