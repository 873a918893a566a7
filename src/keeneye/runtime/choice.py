"""Which engine runs a model: 'auto' = the fastest on this machine that agrees with Keras.

On a CPU, 'auto' tries `CPU_ORDER` (ONNX Runtime, then OpenVINO) and falls back to Keras, with an
`EngineFallbackWarning` saying why each faster one could not be used; on a GPU it is Keras. An
explicit name raises `EngineError` instead of falling back.

Where a bundle's ONNX model comes from (`bundle_onnx_model`), for both ONNX engines:

1. `model.onnx` inside the bundle, written at train time and verified against `model.keras`
   then (`convert.is_verified`);
2. else a copy converted earlier on this machine, cached under
   `$KEENEYE_CACHE_DIR/onnx/<sha256 of model.keras>.onnx` (bundles are never modified after
   they are published);
3. else `model.keras` is converted now (a few seconds, once), checked against Keras on
   generated images, and cached as in 2.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from keeneye.bundle import MODEL_FILE
from keeneye.data.cache import default_cache_dir
from keeneye.data.files import sha256_of_file, write_atomic
from keeneye.errors import KeeneyeError
from keeneye.runtime.convert import (
    FEATURE_TOLERANCE, ONNX_FILE, PROBABILITY_TOLERANCE, convert_and_verify, convert_to_onnx, generated_images,
    is_verified, onnx_verification_record, verification_path,
)
from keeneye.runtime.engines import (
    Engine, EngineError, KerasEngine, OnnxEngine, OpenVinoEngine, gpu_available, onnxruntime_available,
    openvino_available,
)

ENGINE_CHOICES = ("auto", "openvino", "onnx", "keras")
#: 'auto' on a CPU, fastest first by keeneye's own measurement (benchmarks/inference.py, MobileNetV2
#: 224 px, casting test split, the same model.onnx, 2-core Xeon shared with other work, load average
#: 8-12): ONNX Runtime 32.2 vs OpenVINO 25.8 images/s bare at batch 32 (3 of 3 interleaved repeats;
#: 34.8 vs 27.8 in 5 of 5 in a second run; 48.9 vs 43.0 in a third at load 8), 39.5 vs 26.1 at batch 1. On a quiet machine OpenVINO was
#: measured about 2x faster (issue 10): where that holds, put it first. Each falls back to the next.
CPU_ORDER = ("onnx", "openvino")
FEATURE_ENGINE_FILE = "feature_extractor.onnx"


class EngineFallbackWarning(UserWarning):
    """A faster engine could not be used and a slower one runs instead (the message says why)."""


class EngineNotice(UserWarning):
    """Something worth knowing about where an engine's model came from (e.g. a one-time conversion)."""


_AVAILABLE = {"openvino": openvino_available, "onnx": onnxruntime_available}
_PACKAGE = {"openvino": "openvino (pip install 'keeneye[openvino]')", "onnx": "onnxruntime (pip install onnxruntime)"}


def onnx_engine(kind: str, model: bytes | str | os.PathLike, threads: int | None = None, source: str = "") -> Engine:
    """An engine of `kind` ("openvino" or "onnx") on an ONNX model (bytes or a file)."""
    if not _AVAILABLE[kind]():
        raise EngineError(f"engine '{kind}' needs the {_PACKAGE[kind]} package.")
    if kind == "openvino":
        return OpenVinoEngine(model, threads=threads, source=source)
    return OnnxEngine(model, threads=threads, source=source)


def check_choice(engine: str) -> None:
    if engine not in ENGINE_CHOICES:
        raise EngineError(f"unknown engine '{engine}'; choose one of {', '.join(ENGINE_CHOICES)}.")


def candidates(engine: str) -> tuple[str, ...]:
    """The ONNX engines to try for a request, in order (empty: Keras)."""
    check_choice(engine)
    if engine == "keras" or (engine == "auto" and gpu_available()):
        return ()
    return CPU_ORDER if engine == "auto" else (engine,)


def _reason(exc: Exception) -> str:
    return str(exc) if isinstance(exc, KeeneyeError) else f"{type(exc).__name__}: {exc}"


# --- a bundle's classifier -----------------------------------------------------------------------


def onnx_cache_dir() -> Path:
    return default_cache_dir() / "onnx"


def bundle_onnx_model(bundle) -> tuple[bytes | Path, str]:
    """(the bundle's verified ONNX model, where it came from): inside, cached, or converted now (see module doc)."""
    keras_sha256 = sha256_of_file(bundle.path / MODEL_FILE)
    inside = bundle.path / ONNX_FILE
    if is_verified(inside, keras_sha256):
        return inside, str(inside)
    cached = onnx_cache_dir() / f"{keras_sha256[:32]}.onnx"
    if is_verified(cached, keras_sha256):
        return cached, f"{cached} (converted earlier from model.keras)"
    if bundle.model is None:
        raise EngineError(f"{bundle.path} has no usable {ONNX_FILE} and its Keras model is not loaded.")
    why = "is stale (made from another model.keras)" if inside.is_file() else "is missing"
    images = generated_images(8, bundle.model.input_shape[1:], seed=0)
    check = convert_and_verify(bundle.model, images)
    if not check.passed:
        raise EngineError(
            f"the ONNX conversion of {bundle.path / MODEL_FILE} disagrees with Keras "
            f"(max probability difference {check.max_diff:.2e} > {PROBABILITY_TOLERANCE:.0e})."
        )
    where = "in memory only"
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(cached, check.data)
        record = onnx_verification_record(keras_sha256, check.max_diff, len(images), "generated", check.seconds)
        write_atomic(verification_path(cached), json.dumps(record, indent=2).encode())
        where = f"cached at {cached}"
    except OSError as exc:
        where = f"in memory only: cache not writable ({exc.strerror or exc})"
    warnings.warn(
        f"{bundle.path.name}: {ONNX_FILE} {why}; converted model.keras to ONNX in {check.seconds:.1f} s "
        f"(max difference from Keras {check.max_diff:.1e}), {where}.",
        EngineNotice, stacklevel=3,
    )
    return check.data, f"converted from model.keras ({where})"


def bundle_onnx_engine(bundle, threads: int | None = None, kind: str = "onnx") -> Engine:
    """The `kind` engine ("onnx" or "openvino") on the bundle's verified ONNX model."""
    model, source = bundle_onnx_model(bundle)
    return onnx_engine(kind, model, threads=threads, source=source)


def _model_onnx(model, bundle) -> tuple[bytes | Path, str]:
    if bundle is not None:
        return bundle_onnx_model(bundle)
    check = convert_and_verify(model, generated_images(8, model.input_shape[1:], seed=0))
    if not check.passed:
        raise EngineError(f"the ONNX conversion disagrees with Keras (max difference {check.max_diff:.2e}).")
    return check.data, "converted in memory"


def make_engine(model, engine: str = "auto", bundle=None, threads: int | None = None,
                onnx: tuple[bytes | Path, str] | None = None) -> Engine:
    """The engine for a model (or a bundle's model): see the module doc for 'auto' and the fallbacks.

    onnx: (an ONNX model already verified against `model`, where it came from), e.g. a bundle's stored patch graph;
    then nothing is converted, and `model` may be None (no Keras fallback: 'auto' raises when no ONNX engine runs it).
    """
    kinds = candidates(engine)
    if not kinds:
        if model is None:
            raise EngineError("the Keras engine needs the bundle's Keras model, which is not loaded.")
        return KerasEngine(model, source="model.keras (GPU)" if engine == "auto" else "model.keras")
    reasons: list[str] = []
    try:
        onnx_model, source = onnx if onnx is not None else _model_onnx(model, bundle)
    except Exception as exc:
        onnx_model, source = None, ""
        reasons.append(f"no verified ONNX model: {_reason(exc)}")
    for kind in kinds if onnx_model is not None else ():
        try:
            return onnx_engine(kind, onnx_model, threads=threads, source=source)
        except Exception as exc:
            reasons.append(f"{kind}: {_reason(exc)}")
    if engine != "auto":
        raise EngineError(f"engine '{engine}' cannot be used: {'; '.join(reasons)}")
    if model is None:
        raise EngineError(f"no engine can run this bundle: {'; '.join(reasons)}")
    warnings.warn(f"running on Keras/TensorFlow (slower on CPU): {'; '.join(reasons)}.", EngineFallbackWarning, stacklevel=2)
    return KerasEngine(model)


# --- the embedding pass --------------------------------------------------------------------------


class FeatureEngine:
    """The frozen backbone for the embedding cache, on the fastest engine that agrees with Keras.

    Nothing is converted until the first batch arrives (a fully cached run converts nothing).
    On the first batch the extractor runs on Keras and on the candidates of `candidates(engine)`
    in order (converted once and kept in `cache_folder/feature_extractor.onnx`); the first whose
    features agree with Keras within `tolerance` runs from then on, else Keras, with an
    EngineFallbackWarning ('auto') or an EngineError (an explicit name).
    """

    def __init__(self, extractor, engine: str = "auto", cache_folder: str | os.PathLike | None = None,
                 tolerance: float = FEATURE_TOLERANCE) -> None:
        check_choice(engine)
        self.extractor = extractor
        self.requested = engine
        self.cache_folder = Path(cache_folder) if cache_folder else None
        self.tolerance = tolerance
        self.engine: Callable | None = None
        self.parity: float | None = None
        self.note = ""
        self._onnx: bytes | None = None
        self._converted_from_cache = False
        self.conversion_s: float | None = None  # the backbone's ONNX conversion (or its read from the cache)

    @property
    def name(self) -> str:
        return getattr(self.engine, "name", "pending")

    def _cached_file(self) -> Path | None:
        return self.cache_folder / FEATURE_ENGINE_FILE if self.cache_folder else None

    def _onnx_bytes(self) -> bytes:
        cached = self._cached_file()
        if cached is not None and cached.is_file():
            self._converted_from_cache = True
            return cached.read_bytes()
        data = convert_to_onnx(self.extractor, output_name="features")
        if cached is not None:
            try:
                cached.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(cached, data)
            except OSError:
                pass  # only costs a conversion next time
        return data

    def _try(self, kind: str, batch: np.ndarray, reference: np.ndarray) -> np.ndarray:
        """Build `kind` on the extractor's ONNX model and check it on this batch; the outputs when it agrees."""
        check = convert_and_verify(self.extractor, batch, self.tolerance, convert=self._onnx_bytes, reference=reference,
                                   make=lambda data: onnx_engine(kind, data, source="feature extractor"))
        self.parity = check.max_diff
        if not check.passed:
            raise EngineError(f"its features differ from Keras by {check.max_diff:.2e} (> {self.tolerance:.0e}) on the first batch")
        self.engine, self._onnx = check.engine, check.data
        self.conversion_s = check.seconds
        how = "ONNX model from the cache" if self._converted_from_cache else f"converted to ONNX in {check.seconds:.1f} s, cached"
        self.note = f"{kind} (max difference from Keras on the first batch {check.max_diff:.1e}; {how})"
        return check.engine(batch)

    def _choose(self, batch: np.ndarray) -> np.ndarray:
        keras_engine = KerasEngine(self.extractor)
        kinds = candidates(self.requested)
        reference = keras_engine(batch)
        reasons: list[str] = []
        for kind in kinds:
            try:
                return self._try(kind, batch, reference)
            except Exception as exc:
                reasons.append(f"{kind}: {_reason(exc)}")
        cached = self._cached_file()
        if reasons and cached is not None:  # a bad cached conversion must not stay
            cached.unlink(missing_ok=True)
        if reasons and self.requested != "auto":  # the engine asked for failed (engine "keras" tries nothing)
            raise EngineError(f"engine '{self.requested}' cannot compute the embeddings: {'; '.join(reasons)}")
        if reasons:
            warnings.warn(f"embeddings on Keras/TensorFlow ({'; '.join(reasons)}).", EngineFallbackWarning, stacklevel=3)
            self.note = f"keras ({'; '.join(reasons)})"
        self.engine = keras_engine
        return reference

    def onnx_model(self) -> bytes | None:
        """The extractor's ONNX model if it passed the parity check here, or was cached by an earlier run."""
        if self._onnx is not None:
            return self._onnx
        cached = self._cached_file()
        if self.engine is None and cached is not None and cached.is_file():
            try:
                return cached.read_bytes()
            except OSError:
                return None
        return None

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if self.engine is None:
            return self._choose(np.ascontiguousarray(batch, dtype=np.uint8))
        return self.engine(batch)

    run = __call__


def make_feature_engine(extractor, engine: str = "auto", cache_folder: str | os.PathLike | None = None) -> FeatureEngine:
    """The engine that computes backbone embeddings for training (see FeatureEngine)."""
    return FeatureEngine(extractor, engine=engine, cache_folder=cache_folder)
