"""Pooled backbone features for every manifest row, computed once and cached on disk.

With a frozen backbone and no augmentation, training the head on stored features is the same
computation as running the whole network every epoch, many times faster. Decoding runs in a
small thread pool (OpenCV releases the GIL) overlapped with the forward pass, with a bounded
queue so memory stays flat however large the dataset is.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import pandas as pd

from keeneye.data.cache import EmbeddingCache, default_cache_dir  # noqa: F401  (default_cache_dir: engines.py imports it from here)
from keeneye.data.decode import DecodeError
from keeneye.data.preprocess import InputSpec


@dataclass
class EmbeddingResult:
    """Features aligned with the manifest's rows; rows that could not be decoded are dropped."""

    features: np.ndarray  # (n_rows, D) float32, NaN for dropped rows
    dropped: pd.DataFrame  # index = manifest index, column "reason"
    n_cached: int = 0
    n_computed: int = 0
    seconds: float = 0.0
    cache_folder: Path | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> np.ndarray:
        return ~np.isnan(self.features).any(axis=1)


def as_spec(image_size: int | InputSpec) -> InputSpec:
    """An InputSpec from a plain image size (squashed, untiled: keeneye's rule before specs existed)."""
    return image_size if isinstance(image_size, InputSpec) else InputSpec(int(image_size))


def iter_decoded(
    paths: Iterable[tuple[int, str]], image_size: int | InputSpec, workers: int, prefetch: int
) -> Iterator[tuple[int, np.ndarray | None, str | None]]:
    """Decode (and resize or tile, as `image_size` says) in a thread pool, in order, at most `prefetch` in flight."""
    spec = as_spec(image_size)
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="keeneye-decode") as pool:
        pending: deque[tuple[int, Future]] = deque()
        for key, path in paths:
            pending.append((key, pool.submit(spec.load, path)))
            if len(pending) >= prefetch:
                yield _result(*pending.popleft())
        while pending:
            yield _result(*pending.popleft())


def _result(key: int, future: Future) -> tuple[int, np.ndarray | None, str | None]:
    try:
        return key, future.result(), None
    except DecodeError as exc:
        return key, None, exc.reason


def iter_batches(
    paths: Iterable[tuple[int, str]], image_size: int | InputSpec, batch_size: int, workers: int = 2
) -> Iterator[tuple[list[int], np.ndarray, list[tuple[int, str]]]]:
    """Yield (keys, uint8 batch, failures) with decoding overlapped with the consumer's work.

    `image_size`: an InputSpec (resize rule, tiles) or a plain size (squashed, untiled).
    """
    spec = as_spec(image_size)
    keys: list[int] = []
    images: list[np.ndarray] = []
    failures: list[tuple[int, str]] = []
    for key, image, reason in iter_decoded(paths, image_size, workers, prefetch=2 * batch_size):
        if image is None:
            failures.append((key, reason or "could not be decoded"))
        else:
            keys.append(key)
            images.append(image)
        if len(images) == batch_size:
            yield keys, np.stack(images), failures
            keys, images, failures = [], [], []
    if images or failures:
        yield keys, (np.stack(images) if images else spec.empty_batch()), failures


def embed_manifest(
    manifest: pd.DataFrame,
    engine: Callable[[np.ndarray], np.ndarray],
    feature_dim: int,
    image_size: int | InputSpec,
    cache: EmbeddingCache | None,
    batch_size: int = 32,
    workers: int = 2,
    progress: Callable[[int], None] | None = None,
) -> EmbeddingResult:
    """Features for every row: from the cache when the content hash is known, else computed."""
    start = time.perf_counter()
    features = np.full((len(manifest), feature_dim), np.nan, dtype=np.float32)
    positions = {index: position for position, index in enumerate(manifest.index)}
    sha1s = manifest["sha1"].fillna("").astype(str).to_numpy()
    found = cache.fill(sha1s, features) if cache is not None else np.zeros(len(manifest), dtype=bool)
    todo = [(index, path) for index, path, hit in zip(manifest.index, manifest["path"], found) if not hit]
    n_cached = int(found.sum())
    if progress and n_cached:
        progress(n_cached)

    dropped: dict[int, str] = {}
    new_sha1s: list[str] = []
    new_vectors: list[np.ndarray] = []
    sha1_by_index = manifest["sha1"]
    for keys, batch, failures in iter_batches(todo, image_size, batch_size, workers):
        dropped.update(failures)
        if keys:
            output = engine(batch)
            for key, vector in zip(keys, output):
                features[positions[key]] = vector
                if sha1_by_index[key]:
                    new_sha1s.append(sha1_by_index[key])
                    new_vectors.append(vector)
        if progress:
            progress(len(keys) + len(failures))
    if cache is not None and new_sha1s:
        cache.add(new_sha1s, np.stack(new_vectors))
    dropped_frame = pd.DataFrame({"reason": pd.Series(dropped, dtype=object)})
    return EmbeddingResult(
        features=features,
        dropped=dropped_frame,
        n_cached=n_cached,
        n_computed=len(todo) - len(dropped),
        seconds=time.perf_counter() - start,
        cache_folder=cache.folder if cache is not None else None,
    )
