"""Inference engines, as the inference layer and its users know them: names kept from before keeneye.runtime.

Everything here lives in :mod:`keeneye.runtime` (the layer training and inference share) and is
only re-exported: the `Engine` implementations (runtime/engines.py), conversion and verification
(runtime/convert.py) and the choice of engine, 'auto' included (runtime/choice.py).
"""

from __future__ import annotations

from keeneye.data.files import sha256_of_file, write_atomic
from keeneye.runtime.choice import (
    CPU_ORDER, ENGINE_CHOICES, FEATURE_ENGINE_FILE, EngineFallbackWarning, EngineNotice, FeatureEngine,
    bundle_onnx_engine, bundle_onnx_model, make_engine, make_feature_engine, onnx_cache_dir, onnx_engine,
)
from keeneye.runtime.convert import (
    FEATURE_TOLERANCE, ONNX_FILE, ONNX_INPUT_NAME, ONNX_OPSET, PROBABILITY_TOLERANCE, Verified, convert_and_verify,
    convert_classifier_to_onnx, convert_to_onnx, dedupe_opsets, generated_images, is_verified, max_abs_difference,
    onnx_verification_record, read_verification, release_freed_memory, verification_path,
)
from keeneye.runtime.engines import (
    ONNX_CHUNK_PIXELS, BaseEngine, Engine, EngineError, KerasEngine, OnnxEngine, OpenVinoEngine, SavedModelEngine,
    TFLiteEngine, default_chunk, gpu_available, onnxruntime_available, openvino_available, physical_cores,
    session_options,
)

__all__ = [
    "CPU_ORDER", "ENGINE_CHOICES", "FEATURE_ENGINE_FILE", "FEATURE_TOLERANCE", "ONNX_CHUNK_PIXELS", "ONNX_FILE",
    "ONNX_INPUT_NAME", "ONNX_OPSET", "PROBABILITY_TOLERANCE", "BaseEngine", "Engine", "EngineError",
    "EngineFallbackWarning", "EngineNotice", "FeatureEngine", "KerasEngine", "OnnxEngine", "OpenVinoEngine",
    "SavedModelEngine", "TFLiteEngine", "Verified", "bundle_onnx_engine", "bundle_onnx_model", "convert_and_verify",
    "convert_classifier_to_onnx", "convert_to_onnx", "dedupe_opsets", "default_chunk", "generated_images",
    "gpu_available", "is_verified", "make_engine", "make_feature_engine", "max_abs_difference", "onnx_cache_dir",
    "onnx_engine", "onnx_verification_record", "onnxruntime_available", "openvino_available", "physical_cores",
    "read_verification", "release_freed_memory", "session_options", "sha256_of_file", "verification_path",
    "write_atomic",
]
