"""The embedding pass of `train` on a Ray cluster (training.embed_on = "ray").

Same inputs and outputs as `features.embed_manifest`: features aligned with the manifest's rows
(NaN where a file could not be decoded, with the decoder's own reason), vectors already in the cache
taken from it, new ones written to the same cache as ordinary shards. What changes is where the
backbone runs: on an actor pool (runtime.ray_pool) whose actors build the feature engine once each
and decode + embed batches of (row, path); only rows and vectors travel, never pixels. The driver
alone writes the cache, in shards of at most `SHARD_ROWS` vectors as results arrive, so a crash
keeps what was finished and a rerun embeds only the rest.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import pandas as pd

from keeneye.data.cache import EmbeddingCache
from keeneye.data.preprocess import InputSpec
from keeneye.runtime.ray_pool import RayError, connect, gpus_per_actor, map_on_actor_pool, require_ray
from keeneye.training.features import EmbeddingResult, as_spec, iter_batches

#: New vectors written to one cache shard (about 5 MB at 1280 floats): bounded driver memory, little lost on a crash.
SHARD_ROWS = 1024


class EmbeddingActor:
    """Per actor: the feature engine built once (`make_engine()`), then batches of (key, path) embedded.

    Decoding uses the same `iter_batches` as the local pass, so a bad file fails with the same reason.
    Returns one row per input: key, features (NaN for a failure), reason ("" when embedded).
    """

    def __init__(self, make_engine: Callable[[], Callable[[np.ndarray], np.ndarray]], spec: InputSpec,
                 feature_dim: int, batch_size: int, workers: int = 2) -> None:
        self.engine = make_engine()
        self.spec, self.feature_dim, self.batch_size, self.workers = spec, feature_dim, batch_size, workers

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keys = [int(key) for key in batch["key"]]
        vectors = np.full((len(keys), self.feature_dim), np.nan, dtype=np.float32)
        reasons = np.full(len(keys), "", dtype=object)
        at = {key: row for row, key in enumerate(keys)}
        for done, images, failures in iter_batches(zip(keys, map(str, batch["path"])), self.spec, self.batch_size, self.workers):
            if done:
                vectors[[at[key] for key in done]] = np.asarray(self.engine(images), dtype=np.float32)
            for key, reason in failures:
                reasons[at[key]] = reason
        return {"key": np.asarray(keys, dtype=np.int64), "features": vectors, "reason": reasons}


def embed_manifest_ray(
    manifest: pd.DataFrame, make_engine: Callable[[], Callable[[np.ndarray], np.ndarray]], feature_dim: int,
    image_size: int | InputSpec, cache: EmbeddingCache | None, batch_size: int = 32, actors: int = 2,
    address: str | None = None, progress: Callable[[int], None] | None = None,
) -> EmbeddingResult:
    """Features for every row as `embed_manifest` gives them, the missing ones computed on a Ray actor pool."""
    require_ray()
    start = time.perf_counter()
    features = np.full((len(manifest), feature_dim), np.nan, dtype=np.float32)
    sha1s = manifest["sha1"].fillna("").astype(str).to_numpy()
    found = cache.fill(sha1s, features) if cache is not None else np.zeros(len(manifest), dtype=bool)
    if progress and found.any():
        progress(int(found.sum()))
    todo = [{"key": row, "path": str(path)} for row, (path, hit) in enumerate(zip(manifest["path"], found)) if not hit]
    dropped: dict[int, str] = {}
    if todo:
        connect(address)
        gpus = gpus_per_actor(actors)
        kwargs = {"make_engine": make_engine, "spec": as_spec(image_size), "feature_dim": feature_dim, "batch_size": batch_size}
        results = map_on_actor_pool(EmbeddingActor, todo, actors, batch_size, kwargs, gpus=gpus)
        dropped = _collect(results, features, sha1s, cache, progress)
    index = manifest.index
    return EmbeddingResult(
        features=features,
        dropped=pd.DataFrame({"reason": pd.Series({index[row]: reason for row, reason in sorted(dropped.items())}, dtype=object)}),
        n_cached=int(found.sum()),
        n_computed=len(todo) - len(dropped),
        seconds=time.perf_counter() - start,
        cache_folder=cache.folder if cache is not None else None,
        notes=[f"embedded on Ray ({actors} actor{'s' if actors != 1 else ''})"] if todo else [],
    )


def _collect(results, features: np.ndarray, sha1s: np.ndarray, cache: EmbeddingCache | None,
             progress: Callable[[int], None] | None) -> dict[int, str]:
    """Write each finished batch into `features` (by row) and, in shards, into the cache; the failures by row."""
    ray = require_ray()
    dropped: dict[int, str] = {}
    pending_rows: list[np.ndarray] = []
    try:
        for frame in results:
            rows = frame["key"].to_numpy(dtype=np.int64)
            vectors = np.stack([np.asarray(v, dtype=np.float32) for v in frame["features"]]) if len(frame) else np.empty((0, features.shape[1]), np.float32)
            failed = frame["reason"].astype(str).to_numpy() != ""
            dropped.update(zip(rows[failed].tolist(), frame["reason"][failed].tolist()))
            features[rows[~failed]] = vectors[~failed]
            pending_rows.append(rows[~failed])
            if sum(map(len, pending_rows)) >= SHARD_ROWS:
                _write_shard(cache, np.concatenate(pending_rows), features, sha1s)
                pending_rows = []
            if progress:
                progress(len(frame))
    except ray.exceptions.RayError as exc:
        raise RayError(f"the Ray embedding pass failed: {exc} (vectors finished so far are cached; a rerun embeds the rest)") from None
    finally:
        if pending_rows:
            _write_shard(cache, np.concatenate(pending_rows), features, sha1s)
    return dropped


def _write_shard(cache: EmbeddingCache | None, rows: np.ndarray, features: np.ndarray, sha1s: np.ndarray) -> None:
    """One cache shard for the rows with a content hash (a row without one is embedded but not cached)."""
    rows = rows[sha1s[rows] != ""]
    if cache is not None and len(rows):
        cache.add([str(sha1) for sha1 in sha1s[rows]], features[rows])
