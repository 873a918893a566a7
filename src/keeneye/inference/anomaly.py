"""Inference for one-class (anomaly) bundles: an engine with the same contract as the classifier's.

An anomaly bundle's ``model.keras`` is the patch feature graph (uint8 images -> (N, H, W, D)
patch features), ``memory_bank.npy`` holds the good patches and ``metadata.json["anomaly"]``
the raw threshold and how scores are normalised. :class:`~keeneye.model.patchcore.AnomalyEngine` runs the feature graph
on the fastest engine (ONNX Runtime or OpenVINO on CPU, from the bundle's verified ``model.onnx``), finds
each patch's nearest good patch (exact search, or IVF when the bundle says so; see PatchBank) and returns the normalised score ``s / (s + t)`` with
shape (N, 1), exactly like a classifier's probability: the Predictor, ``evaluate`` and the REST
service use it unchanged (threshold 0.5), and :meth:`AnomalyEngine.maps` gives the heat maps.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from keeneye.bundle import ANOMALY_FEATURE_ONNX_FILE
from keeneye.data.decode import resize_square
from keeneye.data.files import sha256_of_file
from keeneye.data.preprocess import InputSpec
from keeneye.errors import BundleError
from keeneye.model.anomaly_feature import Stacker, StackedEngine, first_square
from keeneye.model.decision import predict_labels
from keeneye.model.gradcam import MAX_OVERLAY_SIDE, fit_display  # overlays drawn at Grad-CAM's size
from keeneye.runtime.choice import EngineNotice, candidates, make_engine
from keeneye.runtime.convert import is_verified
from keeneye.runtime.engines import Engine, EngineError
from keeneye.model.patchcore import BANK_FILE, AnomalyEngine, BankMismatch, PatchBank, anomaly_maps, overlay_anomaly_map

__all__ = ["AnomalyEngine", "AnomalyOverlay", "anomaly_overlays", "has_anomaly_feature", "is_anomaly_bundle", "make_anomaly_engine",
           "make_stacked_engine", "one_class_part_map", "one_class_part_overlays", "stacked_explanation", "stored_patch_onnx"]


@dataclass
class AnomalyOverlay:
    """One image's anomaly score, decision and map (what the REST service returns on request)."""

    probability: float  # the normalised score s / (s + t)
    label: str
    heatmap: np.ndarray  # float32 (image_size, image_size): patch distance / (2 t), clipped to [0, 1]
    overlay: np.ndarray  # RGB uint8, the map over the image (at most MAX_OVERLAY_SIDE per side)


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
    bank = PatchBank.load(bank_path, method=info.get("search", "exact"), nprobe=info.get("nprobe", 16))
    return AnomalyEngine(features, bank, info["raw_threshold"], info.get("map_sigma", 4.0),
                         neighbours=info.get("score_neighbours", 1), top_k=info.get("score_top_k", 1))


def has_anomaly_feature(bundle) -> bool:
    """True for supervised bundles trained with ``head.anomaly_feature``: the one-class score is part of the probability."""
    return bundle is not None and bundle.metadata.get("anomaly_feature") is not None


def stored_patch_onnx(bundle) -> Path | None:
    """The head.anomaly_feature bundle's stored ONNX patch graph, when it can be trusted as it is: the file that
    metadata.json names and hashes, with a passed verification record made from the patch graph metadata hashes.
    None for bundles written before it was stored, or when any of that does not hold (then it is converted anew)."""
    info = bundle.spec.anomaly_feature
    hashes = (info.sha256 if info is not None else None) or {}
    if info is None or not info.onnx_file or info.onnx_file not in hashes or info.model_file not in hashes:
        return None
    path = bundle.path / info.onnx_file
    if not is_verified(path, hashes[info.model_file]) or sha256_of_file(path) != hashes[info.onnx_file]:
        return None
    return path


def _converted_patch_engine(bundle, engine: str, threads: int | None) -> Engine:
    """The Keras patch graph on `engine`: Keras itself, or converted to ONNX and checked in memory (see
    runtime.choice.make_engine), as every load of a bundle written before the graph was stored does."""
    import keras

    model_path = bundle.path / bundle.spec.anomaly_feature.model_file
    try:
        patches = keras.saving.load_model(model_path, compile=False)
    except Exception as exc:
        raise BundleError(f"{model_path}: could not load the patch feature graph ({type(exc).__name__}: {exc}).") from None
    return make_engine(patches, engine, threads=threads)


def make_stacked_engine(bundle, classifier, engine: str = "auto", threads: int | None = None) -> StackedEngine:
    """The engine of a head.anomaly_feature bundle: the classifier's engine, the patch feature graph on `engine`
    (for ONNX engines the bundle's stored, verified ONNX file as it is; else, or for older bundles, the Keras graph,
    converted in memory for ONNX engines, with a notice), the bank and the stacker (model/anomaly_feature.py)."""
    info = bundle.spec.anomaly_feature
    model_path, bank_path = bundle.path / info.model_file, bundle.path / info.bank_file
    if not model_path.is_file() or not bank_path.is_file():
        raise BundleError(f"{bundle.path} was trained with head.anomaly_feature but lacks {info.model_file} or {info.bank_file}.")
    try:  # bundles from before the hashes: nothing to check against
        bank = PatchBank.load(bank_path, sha256=(info.sha256 or {}).get(info.bank_file))
    except BankMismatch:
        raise BundleError(f"{bank_path} is not the memory bank this bundle was trained with (its sha256 differs from "
                          "metadata.json): its scores would not be the ones the stacker and threshold were fitted to. "
                          "Restore the file or train again.") from None
    stored = stored_patch_onnx(bundle) if candidates(engine) else None
    patches = None
    if stored is not None:  # no TensorFlow, no conversion
        try:
            patches = make_engine(None, engine, threads=threads, onnx=(stored, str(stored)))
        except EngineError:
            if engine != "auto":
                raise
            # auto, no ONNX engine runs it: the Keras patch graph below, with make_engine's own fallbacks and warnings
    if patches is None:
        if candidates(engine) and stored is None:
            why = (f"written before keeneye stored {ANOMALY_FEATURE_ONNX_FILE}, its patch graph is converted to ONNX at every "
                   "load (retrain to store it)" if not info.onnx_file else
                   f"its {info.onnx_file} does not match the sha256 in metadata.json or its verification record, so the patch "
                   "graph is converted to ONNX at this load")
            warnings.warn(f"{bundle.path.name}: {why}.", EngineNotice, stacklevel=3)
        patches = _converted_patch_engine(bundle, engine, threads)
    stacker = Stacker(info.coef_logit, info.coef_log_score, info.intercept)
    return StackedEngine(classifier, patches, bank, stacker,
                         top_k=info.score_top_k, neighbours=info.score_neighbours)


def anomaly_overlays(
    engine: AnomalyEngine, images: Sequence[np.ndarray], image_size: int, class_names: Sequence[str],
    threshold: float = 0.5, max_side: int = MAX_OVERLAY_SIDE,
) -> list[AnomalyOverlay]:
    """Scores and anomaly-map overlays for decoded RGB uint8 images of any size, in one batch.

    The counterpart of Grad-CAM's ``explain_decoded`` for one-class bundles, so a server can answer
    "where is the anomaly" from images it already decoded. ``threshold`` is on the normalised score
    (0.5 = the bundle's); the colour scale is the bundle's raw threshold, the same for every image.
    """
    if not len(images):
        return []
    negative, positive = class_names
    maps, scores = engine.maps(np.stack([resize_square(image, image_size) for image in images]))
    labels = predict_labels(scores, threshold)
    return [
        AnomalyOverlay(float(score), positive if label == 1 else negative,
                       np.clip(heat / (2.0 * engine.raw_threshold), 0.0, 1.0).astype(np.float32),
                       overlay_anomaly_map(fit_display(image, max_side), heat, engine.raw_threshold))
        for image, heat, score, label in zip(images, maps, scores, labels)
    ]


def one_class_part_overlays(scorer: AnomalyEngine, stacker: Stacker, spec: InputSpec, threshold: float,
                            images: Sequence[np.ndarray], max_side: int = MAX_OVERLAY_SIDE) -> list[np.ndarray]:
    """The one-class part of a head.anomaly_feature bundle's decision: each image's patch distances to the good patches,
    drawn like a one-class bundle's map (RGB overlays of the images shrunk to `max_side`).

    Grad-CAM shows the supervised head's part only. `scorer` and `stacker`: a StackedEngine's (predict,
    serve) or the training run's (its report). The colour scale is the same for every image: the
    middle colour is the raw score that flags a part on its own while the head is undecided
    (Stacker.score_alone_at). The patch graph sees the image itself (the first square), as in training.
    """
    scale = stacker.score_alone_at(threshold)
    overlays = []
    for image in images:
        display = fit_display(image, max_side)
        overlays.append(overlay_anomaly_map(display, one_class_part_map(scorer, spec, image, *display.shape[:2]), scale))
    return overlays


def stacked_explanation(engine: StackedEngine, spec: InputSpec, threshold: float, inputs: np.ndarray,
                        display: np.ndarray) -> tuple[float, np.ndarray]:
    """One image's stacked probability (what predict gives) and the overlay of its one-class part, from one pass of
    each graph: explaining a head.anomaly_feature bundle needs both, and both come from the same patch distances.

    `inputs`: the image as predict prepares it (spec.load, spec.prepare); `display`: the picture to draw on (fit_display).
    """
    batch = np.ascontiguousarray(np.asarray(inputs, np.uint8)[None])
    distances, raw = engine.scorer.distances_and_scores(first_square(batch))
    probability = float(engine.stacker(np.asarray(engine.classifier(batch), np.float64).reshape(-1), raw)[0])
    laid_out = laid_out_part_map(engine.scorer, spec, distances, *display.shape[:2])
    return probability, overlay_anomaly_map(display, laid_out, engine.stacker.score_alone_at(threshold))


def one_class_part_map(scorer: AnomalyEngine, spec: InputSpec, image: np.ndarray, height: int, width: int) -> np.ndarray:
    """One image's patch distances to the good patches (raw units), laid over a (height, width) picture of it; the patch
    graph sees the image itself (the first square of a views stack), as in training."""
    distances, _ = scorer.distances_and_scores(spec.image_only().prepare(image)[None])
    return laid_out_part_map(scorer, spec, distances, height, width)


def laid_out_part_map(scorer: AnomalyEngine, spec: InputSpec, distances: np.ndarray, height: int, width: int) -> np.ndarray:
    """Patch distances (1, H, W) of the image itself, smoothed as the scorer's maps are and laid over (height, width)."""
    return spec.image_only().lay_over_image(anomaly_maps(distances, spec.image_size, scorer.map_sigma), height, width)
