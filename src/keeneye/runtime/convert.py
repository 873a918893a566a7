"""Keras -> ONNX, checked against Keras: the one convert-and-verify and the one model-file validity check.

A converted file is trusted only with its record beside it, `<file>.verification.json`, naming
the sha256 of the `model.keras` it was made from and saying the check passed
(:func:`is_verified`); every consumer (predict's engines, export, serving) asks that one function.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from keeneye.runtime.engines import Engine, KerasEngine, OnnxEngine

ONNX_FILE = "model.onnx"
ONNX_OPSET = 17
ONNX_INPUT_NAME = "image"
#: Largest difference in probability allowed between a float32 ONNX model and Keras.
PROBABILITY_TOLERANCE = 1e-4
#: Largest difference allowed in pooled backbone features (values of order 0.1-6, ReLU6 averages)
#: between an ONNX engine and Keras for the embedding cache; measured differences are ~1e-5.
FEATURE_TOLERANCE = 1e-3


# --- verification records ------------------------------------------------------------------------


def verification_path(path: str | os.PathLike) -> Path:
    """`<file>.verification.json`, next to the exported file or folder."""
    path = Path(path)
    return path.with_name(path.name + ".verification.json")


def read_verification(path: str | os.PathLike) -> dict | None:
    try:
        return json.loads(verification_path(path).read_text())
    except (OSError, ValueError):
        return None


def is_verified(path: str | os.PathLike, source_sha256: str) -> bool:
    """True when `path` exists and its verification record passed for the model file of this sha256."""
    record = read_verification(path)
    return Path(path).exists() and record is not None and record.get("source_sha256") == source_sha256 and bool(record.get("passed"))


def onnx_verification_record(keras_sha256: str, max_diff: float, n_images: int, images: str, seconds: float,
                             tolerance: float = PROBABILITY_TOLERANCE) -> dict:
    import onnxruntime
    import tf2onnx

    return {
        "format": "onnx", "quantize": None, "source": ONNX_FILE, "source_sha256": keras_sha256, "opset": ONNX_OPSET,
        "images": images, "n_images": n_images, "max_abs_diff": max_diff, "tolerance": {"max_abs_diff": tolerance},
        "passed": max_diff <= tolerance, "conversion_s": seconds,
        "versions": {"tf2onnx": tf2onnx.__version__, "onnxruntime": onnxruntime.__version__},
    }


# --- conversion ----------------------------------------------------------------------------------


def _to_onnx_proto(model, input_name: str, dtype, output_name: str, opset: int):
    import logging

    import tensorflow as tf
    import tf2onnx

    logging.getLogger("tf2onnx").setLevel(logging.WARNING)
    spec = (tf.TensorSpec((None, *model.input_shape[1:]), dtype, name=input_name),)
    function = tf.function(lambda inputs: model(inputs, training=False), autograph=False)
    proto, _ = tf2onnx.convert.from_function(function, input_signature=spec, opset=opset)
    old_name = proto.graph.output[0].name
    for node in proto.graph.node:
        node.output[:] = [output_name if name == old_name else name for name in node.output]
    proto.graph.output[0].name = output_name
    proto.producer_name = "keeneye (tf2onnx)"
    return proto


def convert_to_onnx(model, output_name: str = "output", opset: int = ONNX_OPSET) -> bytes:
    """A Keras model with a uint8 image input -> a serialized ONNX model (through tf2onnx).

    The input is named `image` (uint8, N x S x S x 3, NHWC as in Keras, dynamic batch) and the
    output `output_name` (float32).
    """
    import tensorflow as tf

    serialized = _to_onnx_proto(model, ONNX_INPUT_NAME, tf.uint8, output_name, opset).SerializeToString()
    release_freed_memory()
    return serialized


def release_freed_memory() -> None:
    """Give the heap freed by a conversion back to the OS.

    tf2onnx's graph freezing takes ~600 MB for MobileNetV2; glibc keeps freed heap in the process
    unless asked, which would keep a training run's peak RSS high to the end.
    """
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _rename(merged, old: str, new: str) -> None:
    for value in (*merged.graph.input, *merged.graph.output):
        if value.name == old:
            value.name = new
    for node in merged.graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        node.output[:] = [new if name == old else name for name in node.output]


def convert_classifier_to_onnx(classifier, feature_onnx: bytes | None = None) -> bytes:
    """The bundle's classifier (feature_extractor -> head) as ONNX, output `probability`.

    With the feature extractor's ONNX model at hand (converted for the embeddings), only the
    small head is converted and the two graphs are joined: about 1 s instead of 4-6 s for the
    whole network. The caller checks the result against Keras either way.
    """
    if feature_onnx is None:
        return convert_to_onnx(classifier, output_name="probability")
    import onnx
    import onnx.compose
    import tensorflow as tf

    head = classifier.get_layer("head")
    backbone = onnx.load_from_string(feature_onnx)
    head_proto = _to_onnx_proto(head, "pooled_features", tf.float32, "probability", ONNX_OPSET)
    if backbone.opset_import != head_proto.opset_import or backbone.ir_version != head_proto.ir_version:
        return convert_to_onnx(classifier, output_name="probability")
    backbone = onnx.compose.add_prefix(backbone, "backbone/")
    head_proto = onnx.compose.add_prefix(head_proto, "head/")
    merged = onnx.compose.merge_models(backbone, head_proto, io_map=[("backbone/features", "head/pooled_features")])
    _rename(merged, "backbone/" + ONNX_INPUT_NAME, ONNX_INPUT_NAME)
    _rename(merged, "head/probability", "probability")
    merged.producer_name = "keeneye (tf2onnx)"
    dedupe_opsets(merged)
    onnx.checker.check_model(merged)
    return merged.SerializeToString()


def dedupe_opsets(model) -> None:
    """One opset entry per domain (onnx.compose.merge_models repeats them, which ORT's quantizer rejects)."""
    versions: dict[str, int] = {}
    for entry in model.opset_import:
        versions[entry.domain] = max(versions.get(entry.domain, 0), entry.version)
    if len(versions) != len(model.opset_import):
        del model.opset_import[:]
        for domain, version in versions.items():
            model.opset_import.add(domain=domain, version=version)


# --- checking ------------------------------------------------------------------------------------


def max_abs_difference(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"outputs have different shapes: {a.shape} vs {b.shape}")
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def generated_images(count: int, size: int | Sequence[int], seed: int = 0) -> np.ndarray:
    """Seeded textured surfaces, half with a defect: stand-ins when no real images are at hand.

    `size`: a side (square images), or a model input shape (T*S, S, 3) of stacked tiles, where every
    image is T such surfaces stacked (the defect in one of them).
    """
    from keeneye.demo import add_defect, surface_texture

    height, side = (size, size) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))
    tiles = max(1, height // side)
    rng = np.random.default_rng(seed)
    images = []
    for index in range(count):
        parts = [surface_texture(rng, side) for _ in range(tiles)]
        if index % 2:
            where = int(rng.integers(tiles)) if tiles > 1 else 0
            parts[where] = add_defect(rng, parts[where])
        images.append(np.concatenate(parts, axis=0))
    return np.stack(images) if images else np.empty((0, tiles * side, side, 3), np.uint8)


@dataclass
class Verified:
    """A conversion and how far its engine is from Keras on the check images."""

    data: bytes
    engine: Engine  # the engine the check ran on (reused by the caller: it is already compiled)
    max_diff: float
    seconds: float  # conversion time
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.max_diff <= self.tolerance


def convert_and_verify(
    model, images: np.ndarray, tolerance: float = PROBABILITY_TOLERANCE, *, convert: Callable[[], bytes] | None = None,
    reference: np.ndarray | None = None, make: Callable[[bytes], Engine] = OnnxEngine,
    wrap: Callable[[Engine], Callable[[np.ndarray], np.ndarray]] | None = None,
) -> Verified:
    """Convert `model` (or call `convert`) and compare the engine `make` builds on it with Keras on `images`.

    `reference`: Keras's outputs on `images` when the caller has them; `wrap`: what turns the
    engine's raw outputs into the compared ones (e.g. anomaly scores from patch features).
    Never raises for a disagreement: the caller decides what a failed check means.
    """
    started = time.perf_counter()
    data = convert() if convert is not None else convert_to_onnx(model, output_name="probability")
    seconds = time.perf_counter() - started
    if reference is None:
        keras_engine = KerasEngine(model)
        reference = (wrap(keras_engine) if wrap else keras_engine)(images)
    engine = make(data)
    output = (wrap(engine) if wrap else engine)(images)
    return Verified(data, engine, max_abs_difference(output, reference), seconds, tolerance)
