"""Pooled backbone features for every manifest row, computed once and cached on disk.

With a frozen backbone and no augmentation, training the head on stored features is the same
computation as running the whole network every epoch, many times faster. The images go through
runtime's batch loop (`keeneye.runtime.batches.run_engine`: decoding in one bounded thread pool
overlapped with the forward pass), so memory stays flat however large the dataset is.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from keeneye.data.cache import EmbeddingCache, default_cache_dir  # noqa: F401  (re-exported)
from keeneye.data.preprocess import InputSpec
from keeneye.runtime.batches import as_spec, iter_batches, iter_decoded, run_engine  # noqa: F401  (re-exported)


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


def embed_manifest(
    manifest: pd.DataFrame,
    engine: Callable[[np.ndarray], np.ndarray],
    feature_dim: int,
    image_size: int | InputSpec,
    cache: EmbeddingCache | None,
    batch_size: int = 32,
    workers: int | None = None,
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

    todo_positions = np.array([positions[index] for index, _ in todo], dtype=np.int64)
    sha1_by_index = manifest["sha1"]
    new_sha1s: list[str] = []
    new_vectors: list[np.ndarray] = []

    def keep(keys: list[int], output: np.ndarray) -> None:
        """One batch's vectors into `features`, and those of hashed files into the next cache shard."""
        features[todo_positions[keys]] = output
        for key, vector in zip(keys, output):
            sha1 = sha1_by_index[todo[key][0]]
            if sha1:
                new_sha1s.append(sha1)
                new_vectors.append(vector)

    run = run_engine(engine, [path for _, path in todo], image_size, batch_size, workers, progress, sink=keep)
    dropped = {todo[key][0]: reason for key, reason in run.failures.items()}
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
