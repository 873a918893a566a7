"""Inference engines: run a Keras model on batches of uint8 images, as fast as the backend allows.

Every engine takes a (N, S, S, 3) uint8 batch and returns a float32 array, so callers
(embedding extraction, the predictor, the server) never care which one runs.
"""

from __future__ import annotations

import numpy as np


class KerasEngine:
    """TensorFlow execution of a Keras model through one traced `tf.function`.

    A direct call per batch avoids `model.predict`'s per-call setup cost (large for small
    batches); the fixed input signature avoids retracing for every batch size.
    """

    name = "keras"

    def __init__(self, model) -> None:
        import tensorflow as tf

        self.model = model
        spec = tf.TensorSpec((None, *model.input_shape[1:]), tf.uint8)
        self._call = tf.function(lambda batch: model(batch, training=False), input_signature=[spec], reduce_retracing=True)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self._call(np.ascontiguousarray(batch, dtype=np.uint8)), dtype=np.float32)
