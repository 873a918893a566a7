"""The `Engine` interface and its implementations: a model that takes uint8 images, on some runtime.

Every engine takes a (N, H, W, 3) uint8 batch and returns a float32 array (N, ...), so callers
(the embedding pass, the predictor, the server, export verification) never care which one runs.
Each has a `name` (for messages and metadata), a `source` (where its model came from) and an
`input_shape` (H, W, 3) when the model declares one.

* `KerasEngine`: TensorFlow through one traced `tf.function`; the default on a GPU, the reference
  every other engine is checked against, and the last fallback.
* `OnnxEngine`: ONNX Runtime on the CPU; the fastest measured on this project's shared CPUs
  (see benchmarks/inference.py and `keeneye.runtime.choice.CPU_ORDER`).
* `OpenVinoEngine`: OpenVINO's CPU runtime on the same ONNX model (faster on a quiet machine).
* `TFLiteEngine`, `SavedModelEngine`: exported files (keeneye export), for verification and use.
"""

from __future__ import annotations

import glob
import os
import sys
import threading
import warnings
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from keeneye.errors import KeeneyeError

#: ONNX Runtime splits large batches into chunks of about this many input pixels: at 224 px,
#: 2 to 4 images per run call are faster per image than 32 (activations stay in the CPU caches;
#: measured by `benchmarks/inference.py --tune`), at 96 px chunks are 5x larger.
ONNX_CHUNK_PIXELS = 2 * 224 * 224


class EngineError(KeeneyeError, ValueError):
    """An engine was asked for that cannot be used (unknown name, runtime missing, conversion failed)."""

    exit_code = 2


@runtime_checkable
class Engine(Protocol):
    """What every engine offers: `run(uint8 batch) -> float32 array`, a name and its input shape."""

    name: str
    source: str

    @property
    def input_shape(self) -> tuple[int, int, int] | None: ...

    def run(self, batch: np.ndarray) -> np.ndarray: ...

    def __call__(self, batch: np.ndarray) -> np.ndarray: ...


class BaseEngine:
    """Shared plumbing: `__call__` is `run`, `image_size` comes from `input_shape`."""

    name = "engine"
    source = ""
    _input_shape: tuple[int, int, int] | None = None

    @property
    def input_shape(self) -> tuple[int, int, int] | None:
        return self._input_shape

    @property
    def image_size(self) -> int | None:
        """The side of one (untiled) input image, when the model declares it."""
        return None if self._input_shape is None else int(self._input_shape[1])

    def run(self, batch: np.ndarray) -> np.ndarray:  # pragma: no cover - every engine defines it
        raise NotImplementedError

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.run(batch)


def _static_shape(dims) -> tuple[int, int, int] | None:
    """(H, W, C) from a model's declared input dimensions, None where they are not all fixed."""
    dims = list(dims)[1:]
    if len(dims) != 3 or not all(isinstance(d, (int, np.integer)) and d > 0 for d in dims):
        return None
    return tuple(int(d) for d in dims)  # type: ignore[return-value]


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


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except Exception:
        return False
    return True


def gpu_available() -> bool:
    """True when TensorFlow sees a GPU (then Keras is the default engine).

    On Linux, TensorFlow cannot see a GPU when the machine has no NVIDIA or ROCm device node; then
    the answer comes without importing TensorFlow (5-10 s of a CPU-only `keeneye predict`, whose
    ONNX engines do not need it). Elsewhere, or with a device present, TensorFlow is asked.
    """
    if sys.platform.startswith("linux") and "tensorflow" not in sys.modules and not _gpu_device_nodes():
        return False
    try:
        import tensorflow as tf

        return bool(tf.config.list_physical_devices("GPU"))
    except Exception:  # pragma: no cover
        return False


def _gpu_device_nodes() -> bool:
    return bool(glob.glob("/dev/nvidia[0-9]*")) or os.path.exists("/dev/kfd") or os.path.exists("/dev/dxg")


# --- Keras ---------------------------------------------------------------------------------------


_TRACED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_RETRACING_FILTERED = False


def _quiet_retracing_warning() -> None:
    """TensorFlow warns after 5 models traced through the same code ("triggered tf.function
    retracing"): expected when a process loads several bundles, so it is filtered out once."""
    global _RETRACING_FILTERED
    if not _RETRACING_FILTERED:
        import tensorflow as tf

        tf.get_logger().addFilter(lambda record: "triggered tf.function retracing" not in record.getMessage())
        _RETRACING_FILTERED = True


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


class KerasEngine(BaseEngine):
    """TensorFlow execution of a Keras model through one traced `tf.function`.

    A direct call per batch avoids `model.predict`'s per-call setup cost (large for small
    batches); the fixed input signature avoids retracing for every batch size.
    """

    name = "keras"

    def __init__(self, model, source: str = "model.keras") -> None:
        self.model = model
        self.source = source
        self._input_shape = _static_shape(model.input_shape)
        self._call = _traced(model)

    def run(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self._call(np.ascontiguousarray(batch, dtype=np.uint8)), dtype=np.float32)


# --- ONNX Runtime --------------------------------------------------------------------------------


def session_options(threads: int | None = None):
    """ONNX Runtime settings chosen by measurement on a 2-core CPU (benchmarks/inference.py --tune).

    * all graph optimisations: the NCHWc layout rewrites and Conv+BN+ReLU fusions are worth
      about 2.7x over the 'basic' level for MobileNetV2;
    * intra-op threads = physical cores (hyper-threads only add contention), one inter-op thread;
    * no spin-waiting between ops: spinning wins ~15% on an idle machine but halves throughput as
      soon as anything else wants the CPU (the decoding threads, other processes).
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


def _model_content(model: bytes | str | os.PathLike) -> bytes | str:
    return model if isinstance(model, bytes) else str(model)


class OnnxEngine(BaseEngine):
    """ONNX Runtime (CPU) execution of an ONNX model with a uint8 image input.

    A batch of at most `chunk` images runs on one session with `threads` intra-op threads (lowest
    single-image latency); a larger batch is cut into chunks that run concurrently, one per core,
    each on a single-threaded session (`parallel` > 1): no per-operator synchronisation between cores.
    """

    name = "onnx"

    def __init__(
        self, model: bytes | str | os.PathLike, threads: int | None = None, chunk: int | None = None, source: str = "",
        parallel: int | None = None,
    ) -> None:
        import onnxruntime as ort

        content = _model_content(model)
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
        self._input_shape = _static_shape(model_input.shape)
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

    def run(self, batch: np.ndarray) -> np.ndarray:
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


# --- OpenVINO ------------------------------------------------------------------------------------


def require_openvino():
    """The openvino module, or EngineError saying how to install it (it is the `openvino` extra)."""
    try:
        import openvino
    except Exception as exc:
        raise EngineError(
            f"engine 'openvino' needs the openvino package ({type(exc).__name__}: {exc}); "
            "install it with: pip install 'keeneye[openvino]'"
        ) from None
    return openvino


class OpenVinoEngine(BaseEngine):
    """OpenVINO (CPU) execution of an ONNX model with a uint8 image input.

    Compiled for latency with float32 precision forced (OpenVINO may pick bf16 on CPUs that have
    it, which moves probabilities by ~1e-2: keeneye promises agreement with Keras within 1e-4), and
    without pinning its threads to cores: on a shared machine a pinned thread cannot move off a
    core another process is using (measured with the load average at 23 on 2 cores: 15 images/s
    pinned vs 19 unpinned, ONNX Runtime 20). One infer request per calling thread (requests are
    not thread-safe; the compiled model is).
    """

    name = "openvino"

    def __init__(self, model: bytes | str | os.PathLike, threads: int | None = None, source: str = "") -> None:
        ov = require_openvino()
        core = ov.Core()
        self.threads = threads or physical_cores()
        network = core.read_model(_model_content(model))
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": self.threads, "INFERENCE_PRECISION_HINT": "f32",
                  "ENABLE_CPU_PINNING": False}
        self.compiled = core.compile_model(network, "CPU", config)
        self.source = source or (str(model) if not isinstance(model, bytes) else "in memory")
        port = self.compiled.input(0)
        shape = port.get_partial_shape()
        self._input_shape = _static_shape([d.get_length() if d.is_static else None for d in shape]) if shape.rank.is_static else None
        out = self.compiled.output(0).get_partial_shape()
        self._output_tail = tuple(d.get_length() if d.is_static else 1 for d in list(out)[1:]) if out.rank.is_static else (1,)
        self._local = threading.local()

    def _request(self):
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        return request

    def run(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.uint8)
        if len(batch) == 0:
            return np.empty((0, *self._output_tail), np.float32)
        result = self._request().infer({0: batch}, share_inputs=True)
        return np.array(result[0], dtype=np.float32)  # a copy: the request reuses its output buffer


# --- exported files ------------------------------------------------------------------------------


class TFLiteEngine(BaseEngine):
    """A .tflite model: uint8 batch -> its output (N, ...), run `chunk` images at a time."""

    name = "tflite"

    def __init__(self, path: str | os.PathLike, threads: int | None = None, chunk: int = 16) -> None:
        try:
            from ai_edge_litert.interpreter import Interpreter  # the successor package, when installed
        except ImportError:
            import tensorflow as tf

            Interpreter = tf.lite.Interpreter
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tf.lite.Interpreter's deprecation notice
            self.interpreter = Interpreter(model_path=str(path), num_threads=threads or physical_cores())
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]
        self._input_shape = _static_shape(self.input["shape"])
        self.source, self.chunk = str(path), chunk
        self._batch = None

    def _run(self, batch: np.ndarray) -> np.ndarray:
        if self._batch != len(batch):
            self.interpreter.resize_tensor_input(self.input["index"], list(batch.shape))
            self.interpreter.allocate_tensors()
            self._batch = len(batch)
        self.interpreter.set_tensor(self.input["index"], batch.astype(self.input["dtype"], copy=False))
        self.interpreter.invoke()
        return np.array(self.interpreter.get_tensor(self.output["index"]), dtype=np.float32)

    def run(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.uint8)
        outputs = [self._run(batch[i : i + self.chunk]) for i in range(0, len(batch), self.chunk)]
        return np.concatenate(outputs) if outputs else np.empty((0, 1), np.float32)


class SavedModelEngine(BaseEngine):
    """A SavedModel folder's `serve` endpoint: uint8 batch -> its output (N, ...)."""

    name = "savedmodel"

    def __init__(self, path: str | os.PathLike, chunk: int = 32) -> None:
        import tensorflow as tf

        self.loaded = tf.saved_model.load(str(path))
        self._serve = self.loaded.serve if hasattr(self.loaded, "serve") else self.loaded.signatures["serving_default"]
        self.source, self.chunk = str(path), chunk

    def run(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.uint8)
        outputs = []
        for i in range(0, len(batch), self.chunk):
            result = self._serve(batch[i : i + self.chunk])
            if isinstance(result, dict):
                result = next(iter(result.values()))
            outputs.append(np.asarray(result, dtype=np.float32))
        return np.concatenate(outputs) if outputs else np.empty((0, 1), np.float32)
