"""The decode pipeline and the one batch loop: image files -> an engine's outputs, failures with reasons.

Decoding runs in one bounded thread pool (OpenCV releases the GIL) overlapped with the forward
pass; results come back in input order and at most `prefetch` images are in flight, so memory
stays flat however many files there are. A file that cannot be read or decoded is never dropped
silently: it comes back with its reason (see data/decode.py).
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from keeneye.data.decode import DecodeError
from keeneye.data.preprocess import InputSpec
from keeneye.runtime.engines import physical_cores


def as_spec(image_size: int | InputSpec) -> InputSpec:
    """An InputSpec from a plain image size (squashed, untiled: keeneye's rule before specs existed)."""
    return image_size if isinstance(image_size, InputSpec) else InputSpec(int(image_size))


def decode_workers() -> int:
    """Decode threads to run beside an engine: one more than the physical cores.

    Decoding (OpenCV, GIL released) and the forward pass share the cores; a spare thread keeps a
    decoded batch ready whenever the engine asks. Measured end to end on the 2-core machine under
    load (benchmarks/inference.py, 715 casting images at 224 px, medians of 3 interleaved repeats):
    beside ONNX Runtime, 3 threads 45.7 images/s (93% of its bare forward pass) vs 2 threads 39.3
    and 42.2 (two cases of the same setting) and 1 thread 39.4, 3 threads ahead of 2 in 5 of 6
    pairs; beside OpenVINO, slower there, 1-3 threads were within 12% (23.7-26.7). Not measured on
    more than 2 cores.
    """
    return physical_cores() + 1


def iter_decoded(
    paths: Iterable[tuple[int, str]], image_size: int | InputSpec, workers: int | None = None, prefetch: int = 64,
    load: Callable[[str], object] | None = None,
) -> Iterator[tuple[int, object | None, str | None]]:
    """(key, prepared image or None, reason or None) for each (key, path), in order, `prefetch` at most in flight.

    `load`: what turns a path into the item (default: the spec's decode, resize and tiling, exactly
    as predict and training prepare images).
    """
    load = load or as_spec(image_size).load
    with ThreadPoolExecutor(max_workers=workers or decode_workers(), thread_name_prefix="keeneye-decode") as pool:
        pending: deque[tuple[int, Future]] = deque()
        for key, path in paths:
            pending.append((key, pool.submit(load, path)))
            if len(pending) >= prefetch:
                yield _result(*pending.popleft())
        while pending:
            yield _result(*pending.popleft())


def _result(key: int, future: Future) -> tuple[int, object | None, str | None]:
    try:
        return key, future.result(), None
    except DecodeError as exc:
        return key, None, exc.reason


def iter_batches(
    paths: Iterable[tuple[int, str]], image_size: int | InputSpec, batch_size: int, workers: int | None = None,
) -> Iterator[tuple[list[int], np.ndarray, list[tuple[int, str]]]]:
    """Yield (keys, uint8 batch, failures) with decoding overlapped with the consumer's work."""
    spec = as_spec(image_size)
    keys: list[int] = []
    images: list[np.ndarray] = []
    failures: list[tuple[int, str]] = []
    for key, image, reason in iter_decoded(paths, spec, workers, prefetch=2 * batch_size):
        if image is None:
            failures.append((key, reason or "could not be decoded"))
        else:
            keys.append(key)
            images.append(image)  # type: ignore[arg-type]
        if len(images) == batch_size:
            yield keys, np.stack(images), failures
            keys, images, failures = [], [], []
    if images or failures:
        yield keys, (np.stack(images) if images else spec.empty_batch()), failures


@dataclass
class EngineRun:
    """What `run_engine` returns: outputs by input position (NaN rows where a file failed), failures."""

    outputs: np.ndarray | None  # (N, ...) float32; None when a `sink` took the outputs, or nothing ran
    failures: dict[int, str]  # input position -> reason

    @property
    def ok(self) -> np.ndarray:
        n = 0 if self.outputs is None else len(self.outputs)
        mask = np.ones(n, dtype=bool)
        mask[[k for k in self.failures if k < n]] = False
        return mask


def first_column(outputs: np.ndarray) -> np.ndarray:
    """(N,) from outputs of shape (N,) or (N, 1, ...): one probability or score per image."""
    return np.ascontiguousarray(outputs.reshape(len(outputs), -1)[:, 0]) if outputs.ndim > 1 else outputs


def run_engine(
    engine: Callable[[np.ndarray], np.ndarray], paths: Sequence[str], image_size: int | InputSpec, batch_size: int = 32,
    workers: int | None = None, progress: Callable[[int], None] | None = None,
    sink: Callable[[list[int], np.ndarray], None] | None = None,
) -> EngineRun:
    """Run `engine` over image files: the one batch loop of keeneye (predict, embeddings, fine-tuning, checks).

    Outputs land at the position of their path (NaN rows for the files that failed, whose reasons
    are in `failures`); with `sink`, each batch's (positions, outputs) goes there instead and
    nothing is kept (the embedding pass writes straight into its array).
    """
    outputs: np.ndarray | None = None
    failures: dict[int, str] = {}
    for keys, batch, failed in iter_batches(enumerate(paths), image_size, batch_size, workers):
        failures.update(failed)
        if keys:
            result = np.asarray(engine(batch), dtype=np.float32)
            if sink is not None:
                sink(keys, result)
            else:
                if outputs is None:
                    outputs = np.full((len(paths), *result.shape[1:]), np.nan, np.float32)
                outputs[keys] = result
        if progress:
            progress(len(keys) + len(failed))
    return EngineRun(outputs, failures)
