"""Inference engines: run a Keras model on batches of uint8 images, as fast as the backend allows.

Every engine takes a (N, S, S, 3) uint8 batch and returns a float32 array, so callers
(embedding extraction, the predictor, the server) never care which one runs. Each has a
`name` ("onnx" or "keras") and a `source` (where its model came from, for messages).

Two engines:

* `OnnxEngine`: ONNX Runtime on the CPU, the default there (MobileNetV2 at 224 px on 2 cores:
  about 3x Keras `model.predict` batched end to end, 3.5x single-image latency; see
  benchmarks/inference.py and benchmarks/results/inference.json).
* `KerasEngine`: TensorFlow through one traced `tf.function`; the default on a GPU and the
  fallback everywhere.

Where a bundle's ONNX model comes from (`bundle_onnx_engine`):

1. `model.onnx` inside the bundle, written at train time and verified against `model.keras`
   then; used when its `model.onnx.verification.json` names the sha256 of this `model.keras`;
2. else a copy converted earlier on this machine, cached under
   `$KEENEYE_CACHE_DIR/onnx/<sha256 of model.keras>.onnx` (bundles are never modified after
   they are published);
3. else `model.keras` is converted now (a few seconds, once), checked against Keras on
   generated images, and cached as in 2.

If none of that works, 'auto' falls back to Keras with an `EngineFallbackWarning` saying why;
an explicit `onnx` raises `EngineError`.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
import warnings
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from keeneye.errors import KeeneyeError

ENGINE_CHOICES = ("auto", "onnx", "keras")
ONNX_FILE = "model.onnx"
ONNX_OPSET = 17
ONNX_INPUT_NAME = "image"
#: Largest difference in probability allowed between a float32 ONNX model and Keras.
PROBABILITY_TOLERANCE = 1e-4
#: Largest difference allowed in pooled backbone features (values of order 0.1-6, ReLU6 averages)
#: between ONNX Runtime and Keras for the embedding cache; measured differences are ~1e-5.
FEATURE_TOLERANCE = 1e-3
#: ONNX Runtime splits large batches into chunks of about this many input pixels: at 224 px,
#: 2 to 4 images per run call are faster per image than 32 (activations stay in the CPU caches;
#: measured by `benchmarks/inference.py --tune`), at 96 px chunks are 5x larger.
ONNX_CHUNK_PIXELS = 2 * 224 * 224
FEATURE_ENGINE_FILE = "feature_extractor.onnx"


class EngineError(KeeneyeError, ValueError):
    """An engine was asked for that cannot be used (unknown name, ONNX Runtime missing, conversion failed)."""

    exit_code = 2


class EngineFallbackWarning(UserWarning):
    """A faster engine could not be used and a slower one runs instead (the message says why)."""


class EngineNotice(UserWarning):
    """Something worth knowing about where an engine's model came from (e.g. a one-time conversion)."""


# --- environment ---------------------------------------------------------------------------------


def physical_cores() -> int:
    """Physical cores this process may use (hyper-threads do not speed up convolutions)."""
    try:
        import psutil

        physical = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except Exception:  # pragma: no cover - psutil is a dependency, but never fail on this
        physical = os.cpu_count() or 1
    try:
        allowed = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not on Linux
        allowed = physical
    return max(1, min(physical, allowed))


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except Exception:
        return False
    return True


def gpu_available() -> bool:
    """True when TensorFlow sees a GPU (then Keras is the default engine)."""
    try:
        import tensorflow as tf

        return bool(tf.config.list_physical_devices("GPU"))
    except Exception:  # pragma: no cover
        return False


def sha256_of_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verification_path(path: str | os.PathLike) -> Path:
    """`<file>.verification.json`, next to the exported file or folder."""
    path = Path(path)
    return path.with_name(path.name + ".verification.json")


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary name in the same folder, then rename: readers never see half a file."""
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        temporary.write_bytes(data)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


# --- engines -------------------------------------------------------------------------------------


_TRACED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _quiet_retracing_warning() -> None:
    """TensorFlow warns after 5 models traced through the same code ("triggered tf.function
    retracing"): expected when a process loads several bundles, so it is filtered out once."""
    global _RETRACING_FILTERED
    if not _RETRACING_FILTERED:
        import tensorflow as tf

        tf.get_logger().addFilter(lambda record: "triggered tf.function retracing" not in record.getMessage())
        _RETRACING_FILTERED = True


_RETRACING_FILTERED = False


def _traced(model):
    """One traced tf.function per model, shared by every KerasEngine on it (tracing costs ~1 s)."""
    import tensorflow as tf

    call = _TRACED.get(model)
    if call is None:
        _quiet_retracing_warning()
        spec = tf.TensorSpec((None, *model.input_shape[1:]), tf.uint8)
        reference = weakref.ref(model)  # a strong reference in the value would keep the key alive forever
        call = tf.function(lambda batch: reference()(batch, training=False), input_signature=[spec], reduce_retracing=True, autograph=False)
        _TRACED[model] = call
    return call


class KerasEngine:
    """TensorFlow execution of a Keras model through one traced `tf.function`.

    A direct call per batch avoids `model.predict`'s per-call setup cost (large for small
    batches); the fixed input signature avoids retracing for every batch size.
    """

    name = "keras"

    def __init__(self, model, source: str = "model.keras") -> None:
        self.model = model
        self.source = source
        self._call = _traced(model)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self._call(np.ascontiguousarray(batch, dtype=np.uint8)), dtype=np.float32)


def session_options(threads: int | None = None):
    """ONNX Runtime settings chosen by measurement on a 2-core CPU (benchmarks/inference.py --tune).

    * all graph optimisations: the NCHWc layout rewrites and Conv+BN+ReLU fusions are worth
      about 2.7x over the 'basic' level for MobileNetV2;
    * intra-op threads = physical cores (hyper-threads only add contention), one inter-op thread;
    * no spin-waiting between ops: spinning wins ~15% on an idle machine (403 vs 348 img/s) but
      halves throughput as soon as anything else wants the CPU (101-117 vs 198-215 img/s with
      the decoding threads or other processes running), because waiting threads burn the cores.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads or physical_cores()
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return options


def default_chunk(image_size: int | None) -> int:
    if not image_size:
        return 4
    return max(1, ONNX_CHUNK_PIXELS // (image_size * image_size))


class OnnxEngine:
    """ONNX Runtime (CPU) execution of an ONNX model with a uint8 image input.

    Two ways to use the cores, chosen per call (measured with benchmarks/inference.py --tune):

    * a batch of at most `chunk` images runs on one session with `threads` intra-op threads
      (lowest single-image latency);
    * a larger batch is cut into chunks that run concurrently, one per core, each on a
      single-threaded session (`parallel` > 1): no per-operator synchronisation between cores,
      which costs much of the multi-threaded session's speed, and most of it when other
      processes compete for the CPU.
    """

    name = "onnx"

    def __init__(
        self, model: bytes | str | os.PathLike, threads: int | None = None, chunk: int | None = None, source: str = "",
        parallel: int | None = None,
    ) -> None:
        import onnxruntime as ort

        content = model if isinstance(model, bytes) else str(model)
        self.threads = threads or physical_cores()
        self.parallel = self.threads if parallel is None else max(1, parallel)
        self.session = ort.InferenceSession(content, sess_options=session_options(self.threads), providers=["CPUExecutionProvider"])
        self._single = None
        self._pool = None
        if self.parallel > 1:
            self._single = ort.InferenceSession(content, sess_options=session_options(1), providers=["CPUExecutionProvider"])
            self._pool = ThreadPoolExecutor(self.parallel, thread_name_prefix="keeneye-onnx")
        self.path = None if isinstance(model, bytes) else Path(model)
        self.source = source or (str(model) if not isinstance(model, bytes) else "in memory")
        model_input = self.session.get_inputs()[0]
        self.input_name = model_input.name
        size = model_input.shape[1] if len(model_input.shape) == 4 else None
        self.image_size = size if isinstance(size, int) else None
        self.chunk = chunk or default_chunk(self.image_size)
        self._output_tail = tuple(d if isinstance(d, int) else 1 for d in self.session.get_outputs()[0].shape[1:])

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass

    def _run(self, session, batch: np.ndarray) -> np.ndarray:
        return np.asarray(session.run(None, {self.input_name: batch})[0], dtype=np.float32)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.uint8)
        if len(batch) == 0:
            return np.empty((0, *self._output_tail), np.float32)
        if len(batch) <= self.chunk:
            return self._run(self.session, batch)
        parts = [batch[i : i + self.chunk] for i in range(0, len(batch), self.chunk)]
        pool = self._pool
        if pool is not None:
            return np.concatenate(list(pool.map(lambda part: self._run(self._single, part), parts)))
        return np.concatenate([self._run(self.session, part) for part in parts])


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
    for value in merged.graph.input:
        if value.name == "backbone/" + ONNX_INPUT_NAME:
            value.name = ONNX_INPUT_NAME
    for value in merged.graph.output:
        if value.name == "head/probability":
            value.name = "probability"
    for node in merged.graph.node:
        node.input[:] = [ONNX_INPUT_NAME if name == "backbone/" + ONNX_INPUT_NAME else name for name in node.input]
        node.output[:] = ["probability" if name == "head/probability" else name for name in node.output]
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


def read_verification(path: Path) -> dict | None:
    try:
        return json.loads(verification_path(path).read_text())
    except (OSError, ValueError):
        return None


def onnx_verification_record(keras_sha256: str, max_diff: float, n_images: int, images: str, seconds: float) -> dict:
    import onnxruntime
    import tf2onnx

    return {
        "format": "onnx",
        "quantize": None,
        "source": ONNX_FILE,
        "source_sha256": keras_sha256,
        "opset": ONNX_OPSET,
        "images": images,
        "n_images": n_images,
        "max_abs_diff": max_diff,
        "tolerance": {"max_abs_diff": PROBABILITY_TOLERANCE},
        "passed": max_diff <= PROBABILITY_TOLERANCE,
        "conversion_s": seconds,
        "versions": {"tf2onnx": tf2onnx.__version__, "onnxruntime": onnxruntime.__version__},
    }


def convert_and_check(model, images: np.ndarray, keras_engine: Callable | None = None) -> tuple[bytes, float, float]:
    """Convert a classifier to ONNX and compare it with Keras on `images`: (bytes, max diff, seconds)."""
    started = time.perf_counter()
    data = convert_to_onnx(model, output_name="probability")
    seconds = time.perf_counter() - started
    reference = (keras_engine or KerasEngine(model))(images)
    difference = max_abs_difference(OnnxEngine(data)(images), reference)
    return data, difference, seconds


def onnx_cache_dir() -> Path:
    from keeneye.training.features import default_cache_dir

    return default_cache_dir() / "onnx"


def _usable(candidate: Path, keras_sha256: str) -> bool:
    record = read_verification(candidate)
    return (
        candidate.is_file() and record is not None and record.get("source_sha256") == keras_sha256
        and bool(record.get("passed"))
    )


def bundle_onnx_engine(bundle, threads: int | None = None) -> OnnxEngine:
    """The ONNX Runtime engine for a bundle: its model.onnx, else a cached or fresh conversion."""
    from keeneye.bundle import MODEL_FILE

    keras_sha256 = sha256_of_file(bundle.path / MODEL_FILE)
    inside = bundle.path / ONNX_FILE
    if _usable(inside, keras_sha256):
        return OnnxEngine(inside, threads=threads, source=str(inside))
    cached = onnx_cache_dir() / f"{keras_sha256[:32]}.onnx"
    if _usable(cached, keras_sha256):
        return OnnxEngine(cached, threads=threads, source=f"{cached} (converted earlier from model.keras)")
    if bundle.model is None:
        raise EngineError(f"{bundle.path} has no usable {ONNX_FILE} and its Keras model is not loaded.")
    why = "is stale (made from another model.keras)" if inside.is_file() else "is missing"
    images = generated_images(8, bundle.model.input_shape[1:], seed=0)
    data, difference, seconds = convert_and_check(bundle.model, images)
    if difference > PROBABILITY_TOLERANCE:
        raise EngineError(
            f"the ONNX conversion of {bundle.path / MODEL_FILE} disagrees with Keras "
            f"(max probability difference {difference:.2e} > {PROBABILITY_TOLERANCE:.0e})."
        )
    where = "in memory only"
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(cached, data)
        record = onnx_verification_record(keras_sha256, difference, len(images), "generated", seconds)
        write_atomic(verification_path(cached), json.dumps(record, indent=2).encode())
        where = f"cached at {cached}"
    except OSError as exc:
        where = f"in memory only: cache not writable ({exc.strerror or exc})"
    warnings.warn(
        f"{bundle.path.name}: {ONNX_FILE} {why}; converted model.keras to ONNX in {seconds:.1f} s "
        f"(max difference from Keras {difference:.1e}), {where}.",
        EngineNotice, stacklevel=2,
    )
    return OnnxEngine(data, threads=threads, source=f"converted from model.keras ({where})")


def make_engine(model, engine: str = "auto", bundle=None, threads: int | None = None):
    """The engine for a model (or a bundle's model): 'auto' = ONNX Runtime on CPU, Keras on GPU.

    'auto' falls back to Keras with an EngineFallbackWarning when ONNX Runtime cannot be used;
    an explicit 'onnx' raises EngineError instead.
    """
    if engine not in ENGINE_CHOICES:
        raise EngineError(f"unknown engine '{engine}'; choose one of {', '.join(ENGINE_CHOICES)}.")
    if engine == "keras":
        return KerasEngine(model)
    if engine == "auto" and gpu_available():
        return KerasEngine(model, source="model.keras (GPU)")
    if not onnxruntime_available():
        if engine == "onnx":
            raise EngineError("engine 'onnx' needs the onnxruntime package (pip install onnxruntime).")
        warnings.warn("onnxruntime is not installed: running on Keras/TensorFlow (slower on CPU).", EngineFallbackWarning, stacklevel=2)
        return KerasEngine(model)
    try:
        if bundle is not None:
            return bundle_onnx_engine(bundle, threads=threads)
        data, difference, _ = convert_and_check(model, generated_images(8, model.input_shape[1:], seed=0))
        if difference > PROBABILITY_TOLERANCE:
            raise EngineError(f"the ONNX conversion disagrees with Keras (max difference {difference:.2e}).")
        return OnnxEngine(data, threads=threads, source="converted in memory")
    except Exception as exc:
        reason = str(exc) if isinstance(exc, KeeneyeError) else f"{type(exc).__name__}: {exc}"
        if engine == "onnx":
            raise EngineError(f"engine 'onnx' cannot be used: {reason}") from None
        warnings.warn(f"ONNX Runtime cannot be used ({reason}): running on Keras/TensorFlow instead.", EngineFallbackWarning, stacklevel=2)
        return KerasEngine(model)


# --- embeddings for training ---------------------------------------------------------------------


class FeatureEngine:
    """The frozen backbone for the embedding cache, on the fastest engine that agrees with Keras.

    Nothing is converted until the first batch arrives (a fully cached run converts nothing).
    On the first batch the extractor runs on ONNX Runtime (converted once and kept in
    `cache_folder/feature_extractor.onnx`) and on Keras; if the features differ by more than
    `FEATURE_TOLERANCE`, or ONNX Runtime cannot be used, Keras runs from then on with an
    EngineFallbackWarning.
    """

    def __init__(self, extractor, engine: str = "auto", cache_folder: str | os.PathLike | None = None,
                 tolerance: float = FEATURE_TOLERANCE) -> None:
        if engine not in ENGINE_CHOICES:
            raise EngineError(f"unknown engine '{engine}'; choose one of {', '.join(ENGINE_CHOICES)}.")
        self.extractor = extractor
        self.requested = engine
        self.cache_folder = Path(cache_folder) if cache_folder else None
        self.tolerance = tolerance
        self.engine: Callable | None = None
        self.parity: float | None = None
        self.note = ""
        self._onnx: bytes | None = None

    @property
    def name(self) -> str:
        return getattr(self.engine, "name", "pending")

    def _onnx_bytes(self) -> bytes:
        cached = self.cache_folder / FEATURE_ENGINE_FILE if self.cache_folder else None
        if cached is not None and cached.is_file():
            return cached.read_bytes()
        data = convert_to_onnx(self.extractor, output_name="features")
        if cached is not None:
            try:
                cached.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(cached, data)
            except OSError:
                pass  # only costs a conversion next time
        return data

    def _choose(self, batch: np.ndarray) -> np.ndarray:
        keras_engine = KerasEngine(self.extractor)
        if self.requested == "keras" or (self.requested == "auto" and gpu_available()):
            self.engine = keras_engine
            return keras_engine(batch)
        reference = keras_engine(batch)
        try:
            if not onnxruntime_available():
                raise EngineError("onnxruntime is not installed")
            data = self._onnx_bytes()
            candidate = OnnxEngine(data, source="feature extractor")
            output = candidate(batch)
            self.parity = max_abs_difference(output, reference)
            if self.parity > self.tolerance:
                raise EngineError(f"its features differ from Keras by {self.parity:.2e} (> {self.tolerance:.0e}) on the first batch")
        except Exception as exc:
            if self.cache_folder is not None:  # a bad cached conversion must not stay
                (self.cache_folder / FEATURE_ENGINE_FILE).unlink(missing_ok=True)
            reason = str(exc) if isinstance(exc, KeeneyeError) else f"{type(exc).__name__}: {exc}"
            if self.requested == "onnx":
                raise EngineError(f"ONNX Runtime cannot compute the embeddings: {reason}") from None
            warnings.warn(f"embeddings on Keras/TensorFlow: ONNX Runtime not used ({reason}).", EngineFallbackWarning, stacklevel=3)
            self.engine = keras_engine
            self.note = f"keras (ONNX Runtime not used: {reason})"
            return reference
        self.engine = candidate
        self._onnx = data
        self.note = f"onnx (max difference from Keras on the first batch {self.parity:.1e})"
        return output

    def onnx_model(self) -> bytes | None:
        """The extractor's ONNX model if it passed the parity check here, or was cached by an earlier run."""
        if self._onnx is not None:
            return self._onnx
        if self.engine is None and self.cache_folder is not None and (self.cache_folder / FEATURE_ENGINE_FILE).is_file():
            try:
                return (self.cache_folder / FEATURE_ENGINE_FILE).read_bytes()
            except OSError:
                return None
        return None

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if self.engine is None:
            return self._choose(np.ascontiguousarray(batch, dtype=np.uint8))
        return self.engine(batch)


def make_feature_engine(extractor, engine: str = "auto", cache_folder: str | os.PathLike | None = None) -> FeatureEngine:
    """The engine that computes backbone embeddings for training (see FeatureEngine)."""
    return FeatureEngine(extractor, engine=engine, cache_folder=cache_folder)
