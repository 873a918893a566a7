"""Streaming training data: ``tf.data`` pipelines whose order is a pure function of (seed, epoch).

Two things matter here beyond speed:

* **Memory does not grow with the data set.** Images are decoded from their files batch by batch
  (``keeneye.data.decode.load_image``, the decoder every other part of keeneye uses, in a small
  thread pool; OpenCV releases the GIL) inside ``tf.data`` (``tf.numpy_function`` in a parallel,
  order-preserving ``map``) with a bounded prefetch: only a few batches exist at any time. The
  pipeline holds paths and labels, never pixels of the whole set.
* **Resuming gives the run an uninterrupted run would have given.** Which rows an epoch visits,
  in which order and in which batches is decided by :class:`EpochPlan` from ``(seed, epoch)``
  only, not from iterator state, so a run resumed at epoch k sees exactly the batches it would
  have seen. One dataset spans all remaining epochs (``fit(steps_per_epoch=...)`` keeps one
  iterator), so tf.data's prefetching never runs ahead into a plan built for the wrong epoch.

Files that fail to decode (they decoded during the embedding pass, so this means the file
changed or vanished since) are never skipped silently: the image is replaced by zeros with
sample weight 0 (batch shapes stay fixed, the loss ignores it) and the failure is recorded in
:class:`DecodeFailures` with the decoder's own reason, which train reports in
``dropped_files.csv`` exactly like the embedding pass does.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np
import pandas as pd

from keeneye.data.decode import DecodeError
from keeneye.data.preprocess import InputSpec


def epoch_rng(seed: int, epoch: int, stream: int = 0) -> np.random.Generator:
    """A generator that depends on (seed, epoch, stream) only (negative seeds allowed)."""
    return np.random.default_rng(np.random.SeedSequence([seed % (1 << 32), epoch, stream]))


@dataclass(frozen=True)
class EpochPlan:
    """The rows each epoch visits, in order, cut into batches: a pure function of (seed, epoch).

    With ``oversample`` every epoch holds all rows plus enough extra minority-class rows, drawn
    with replacement, for both classes to appear equally often. Without ``shuffle`` (validation,
    prediction) every epoch is the rows in their given order.
    """

    labels: np.ndarray
    batch_size: int
    seed: int
    shuffle: bool = True
    oversample: bool = False
    stream: int = 0  # a separate random stream per phase

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", np.asarray(self.labels).astype(int))

    @property
    def rows_per_epoch(self) -> int:
        if not self.oversample:
            return len(self.labels)
        counts = np.bincount(self.labels, minlength=2)
        return int(2 * counts.max()) if counts.min() > 0 else len(self.labels)

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.rows_per_epoch // self.batch_size)

    def order(self, epoch: int) -> np.ndarray:
        rows = np.arange(len(self.labels))
        rng = epoch_rng(self.seed, epoch, self.stream)
        if self.oversample:
            counts = np.bincount(self.labels, minlength=2)
            if counts.min() > 0 and counts[0] != counts[1]:
                minority = int(np.argmin(counts))
                pool = rows[self.labels == minority]
                extra = rng.choice(pool, size=int(counts.max() - counts.min()), replace=True)
                rows = np.concatenate([rows, np.sort(extra)])
        return rng.permutation(rows) if self.shuffle else rows

    def batches(self, epoch: int) -> Iterator[np.ndarray]:
        order = self.order(epoch)
        for start in range(0, len(order), self.batch_size):
            yield order[start : start + self.batch_size]


class DecodeFailures:
    """Rows whose file failed to decode during training, with the decoder's reason (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reasons: dict[int, str] = {}

    def add(self, row: int, reason: str) -> None:
        with self._lock:
            self._reasons.setdefault(int(row), reason)

    def update(self, reasons: dict[int, str]) -> None:
        for row, reason in reasons.items():
            self.add(row, reason)

    def __len__(self) -> int:
        with self._lock:
            return len(self._reasons)

    def as_dict(self) -> dict[int, str]:
        with self._lock:
            return dict(self._reasons)

    def frame(self, index: Sequence) -> pd.DataFrame:
        """Failures as `embed_manifest` reports drops: indexed by `index[row]`, one column `reason`."""
        reasons = self.as_dict()
        return pd.DataFrame({"reason": pd.Series({index[row]: reasons[row] for row in sorted(reasons)}, dtype=object)})


def _options():
    import tensorflow as tf

    options = tf.data.Options()
    options.deterministic = True
    # Every worker builds the same plan; DATA sharding gives each its own share of every batch.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return options


def _epochs_dataset(plan: EpochPlan, epochs: Iterable[int]):
    import tensorflow as tf

    epochs = list(epochs)

    def batches():
        for epoch in epochs:
            yield from plan.batches(epoch)

    return tf.data.Dataset.from_generator(batches, output_signature=tf.TensorSpec([None], tf.int64))


class ImagePipeline:
    """Decoded, batched training images from file paths: (uint8 images, float32 labels, float32 weights).

    ``weights`` are per-row sample weights (class weights; 1 otherwise). Use as a context manager
    (or call ``close``) to stop the decoding threads.
    """

    def __init__(
        self, paths: Sequence[str], labels: np.ndarray, image_size: int | InputSpec, weights: np.ndarray | None = None,
        workers: int = 2, parallel_batches: int = 2, prefetch: int = 2, failures: DecodeFailures | None = None,
    ) -> None:
        self.paths = [str(p) for p in paths]
        self.labels = np.asarray(labels, dtype=np.float32)
        self.weights = np.ones(len(self.paths), np.float32) if weights is None else np.asarray(weights, np.float32)
        self.spec = image_size if isinstance(image_size, InputSpec) else InputSpec(int(image_size))
        self.image_size = self.spec.image_size
        self.failures = failures if failures is not None else DecodeFailures()
        self.parallel_batches = max(1, parallel_batches)
        self.prefetch = max(1, prefetch)
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="keeneye-train-decode")
        self._closed = False

    def __enter__(self) -> "ImagePipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._closed = True
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _load(self, row: int) -> np.ndarray | None:
        try:
            return self.spec.load(self.paths[row])
        except DecodeError as exc:
            self.failures.add(row, exc.reason)
            return None

    def decode_batch(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """rows -> (images, labels, weights); a failed file becomes zeros with weight 0 (and is recorded)."""
        images = np.zeros((len(rows), *self.spec.shape), np.uint8)
        weights = self.weights[rows].copy()
        rows_list = [int(r) for r in rows]
        # After close(), an iterator Keras opened ahead of time may still prefetch a batch: decode it here.
        try:
            decoded = map(self._load, rows_list) if self._closed else self._pool.map(self._load, rows_list)
        except RuntimeError:  # shut down in between
            decoded = map(self._load, rows_list)
        for position, image in enumerate(decoded):
            if image is None:
                weights[position] = 0.0
            else:
                images[position] = image
        return images, self.labels[rows], weights

    def dataset(self, plan: EpochPlan, epochs: Iterable[int]):
        """One tf.data.Dataset over all the given epochs, `plan.steps_per_epoch` batches each."""
        import tensorflow as tf

        def decode(rows):
            images, labels, weights = tf.numpy_function(self.decode_batch, [rows], [tf.uint8, tf.float32, tf.float32])
            images.set_shape([None, *self.spec.shape])
            labels.set_shape([None])
            weights.set_shape([None])
            return images, labels, weights

        decode = tf.autograph.experimental.do_not_convert(decode)  # plain TF ops: nothing for AutoGraph to convert
        dataset = _epochs_dataset(plan, epochs).map(decode, num_parallel_calls=self.parallel_batches, deterministic=True)
        return dataset.prefetch(self.prefetch).with_options(_options())


def feature_dataset(features: np.ndarray, labels: np.ndarray, weights: np.ndarray | None, plan: EpochPlan, epochs: Iterable[int]):
    """Batches of cached features (in memory: they are small) following `plan`."""
    import tensorflow as tf

    features = np.asarray(features, np.float32)
    labels = np.asarray(labels, np.float32)
    weights = np.ones(len(labels), np.float32) if weights is None else np.asarray(weights, np.float32)

    def gather(rows):
        return features[rows], labels[rows], weights[rows]

    def take(rows):
        x, y, w = tf.numpy_function(gather, [rows], [tf.float32, tf.float32, tf.float32])
        x.set_shape([None, features.shape[1]])
        y.set_shape([None])
        w.set_shape([None])
        return x, y, w

    take = tf.autograph.experimental.do_not_convert(take)
    return _epochs_dataset(plan, epochs).map(take).prefetch(2).with_options(_options())
