"""Inference for one-class (anomaly) bundles: an engine with the same contract as the classifier's.

An anomaly bundle's ``model.keras`` is the patch feature graph (uint8 images -> (N, H, W, D)
patch features), ``memory_bank.npy`` holds the good patches and ``metadata.json["anomaly"]``
the raw threshold and how scores are normalised. :class:`~keeneye.model.patchcore.AnomalyEngine` runs the feature graph
on the fastest engine (OpenVINO or ONNX Runtime on CPU, from the bundle's verified ``model.onnx``), finds
each patch's nearest good patch (exact search, see PatchBank) and returns the normalised score ``s / (s + t)`` with
shape (N, 1), exactly like a classifier's probability: the Predictor, ``evaluate`` and the REST
service use it unchanged (threshold 0.5), and :meth:`AnomalyEngine.maps` gives the heat maps.
"""

from __future__ import annotations

from keeneye.errors import BundleError
from keeneye.runtime.choice import make_engine
from keeneye.model.patchcore import BANK_FILE, AnomalyEngine, PatchBank

__all__ = ["AnomalyEngine", "is_anomaly_bundle", "make_anomaly_engine"]


def is_anomaly_bundle(bundle) -> bool:
    """True for bundles trained with ``mode: "anomaly"`` (older bundles have no mode: supervised)."""
    return bundle is not None and bundle.metadata.get("mode") == "anomaly"


def make_anomaly_engine(bundle, engine: str = "auto") -> AnomalyEngine:
    """The AnomalyEngine of an anomaly bundle; the feature graph runs on `engine` (see runtime.choice.make_engine)."""
    info = bundle.metadata.get("anomaly") or {}
    bank_path = bundle.path / BANK_FILE
    if not bank_path.is_file() or "raw_threshold" not in info:
        raise BundleError(f"{bundle.path} is an anomaly bundle without its {BANK_FILE} or its anomaly metadata.")
    features = make_engine(bundle.model, engine, bundle=bundle)
    return AnomalyEngine(features, PatchBank.load(bank_path), info["raw_threshold"], info.get("map_sigma", 4.0))
