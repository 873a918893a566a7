"""Inference for one-class (anomaly) bundles: an engine with the same contract as the classifier's.

An anomaly bundle's ``model.keras`` is the patch feature graph (uint8 images -> (N, H, W, D)
patch features), ``memory_bank.npy`` holds the good patches and ``metadata.json["anomaly"]``
the raw threshold and how scores are normalised. :class:`AnomalyEngine` runs the feature graph
on the fastest engine (ONNX Runtime on CPU, from the bundle's verified ``model.onnx``), finds
each patch's nearest good patch (faiss) and returns the normalised score ``s / (s + t)`` with
shape (N, 1), exactly like a classifier's probability: the Predictor, ``evaluate`` and the REST
service use it unchanged (threshold 0.5), and :meth:`AnomalyEngine.maps` gives the heat maps.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from keeneye.errors import BundleError
from keeneye.inference import engines as _engines
from keeneye.model.patchcore import BANK_FILE, PatchBank, anomaly_maps, image_scores, normalise_scores

__all__ = ["AnomalyEngine", "is_anomaly_bundle", "make_anomaly_engine"]


def is_anomaly_bundle(bundle) -> bool:
    """True for bundles trained with ``mode: "anomaly"`` (older bundles have no mode: supervised)."""
    return bundle is not None and bundle.metadata.get("mode") == "anomaly"


class AnomalyEngine:
    """Feature engine + memory bank + normalisation: uint8 batch -> normalised anomaly scores (N, 1)."""

    def __init__(self, features: Callable[[np.ndarray], np.ndarray], bank: PatchBank, raw_threshold: float,
                 map_sigma: float = 4.0) -> None:
        self.features = features
        self.bank = bank
        self.raw_threshold = float(raw_threshold)
        self.map_sigma = float(map_sigma)
        self.name = getattr(features, "name", "keras")
        self.source = f"{getattr(features, 'source', 'model.keras')} + memory bank of {len(bank)} patches"

    def distance_maps(self, batch: np.ndarray) -> np.ndarray:
        """(N, H, W) distance of each patch to its nearest good patch."""
        return self.bank.distances(self.features(np.ascontiguousarray(batch, dtype=np.uint8)))

    def raw_scores(self, batch: np.ndarray) -> np.ndarray:
        return image_scores(self.distance_maps(batch))

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return normalise_scores(self.raw_scores(batch), self.raw_threshold).astype(np.float32).reshape(-1, 1)

    def maps(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(anomaly maps (N, S, S) in raw distance units, normalised scores (N,)) for a batch at image_size."""
        distances = self.distance_maps(batch)
        size = int(np.asarray(batch).shape[1])
        scores = normalise_scores(image_scores(distances), self.raw_threshold)
        return anomaly_maps(distances, size, self.map_sigma), scores


def make_anomaly_engine(bundle, engine: str = "auto") -> AnomalyEngine:
    """The AnomalyEngine of an anomaly bundle; the feature graph runs on `engine` (see engines.make_engine)."""
    info = bundle.metadata.get("anomaly") or {}
    bank_path = bundle.path / BANK_FILE
    if not bank_path.is_file() or "raw_threshold" not in info:
        raise BundleError(f"{bundle.path} is an anomaly bundle without its {BANK_FILE} or its anomaly metadata.")
    features = _engines.make_engine(bundle.model, engine, bundle=bundle)
    return AnomalyEngine(features, PatchBank.load(bank_path), info["raw_threshold"], info.get("map_sigma", 4.0))
