"""Fine-tuning the top of MobileNetV2 from cached mid-level activations (``fine_tune.method: "cached_top"``).

Why: on a CPU a full fine-tuning epoch pushes every image through all of MobileNetV2 forwards and
through the top backwards, and the frozen bottom (most of the multiply-adds) computes the same
thing every epoch. Here the frozen bottom (everything below the first unfrozen layer) runs once per
image and per view, the activations are kept (in memory, or in an unlinked temporary file when they
would take more than ``IN_MEMORY_BYTES``), and the epochs train only the top blocks and the
head on them: an epoch costs a fraction of a pass. Augmentation is the 8 symmetries of the square
(flips and quarter turns, ``fine_tune.views``), which suit textures and parts without an orientation:
each epoch sees every training image in one randomly drawn view. BatchNorm stays in inference mode
(frozen), as in the images method.

The trained layers are the extractor's own layers (the top model is a sub-graph of the same
MobileNetV2), so the result is the bundle's one graph: uint8 image -> bottom -> trained top -> head,
giving the probabilities the top computed while training (tests check within 1e-4).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Sequence

import keras
import numpy as np
import pandas as pd

from keeneye.data.preprocess import InputSpec, dihedral
from keeneye.errors import ConfigError
from keeneye.runtime.batches import run_engine
from keeneye.training.pipeline import EpochPlan, epoch_rng

VIEWS = 8  # the dihedral group of the square: 4 quarter turns, each also mirrored
VIEW_STREAM = 2  # epoch_rng stream that draws each epoch's views (0: head, 1: fine-tuning order)
#: Activations larger than this go to a memory-mapped temporary file (block_15's output is ~31 KB per
#: image and view: 10,000 images x 8 views would otherwise hold 2.5 GB of RAM).
IN_MEMORY_BYTES = 1 << 30


def split_backbone(extractor: keras.Model, first_trained: str) -> tuple[keras.Model, keras.Model]:
    """(bottom, top) of the extractor's MobileNetV2 at the input of layer `first_trained`.

    bottom: uint8 image -> activations entering `first_trained` (preprocessing included);
    top: those activations -> the extractor's pooled features, built from the extractor's own
    layers (training the top trains the extractor). The cut must be one tensor: the input of a
    block's first layer (e.g. ``block_16_expand``), not a layer inside a block with a skip connection.
    """
    from keeneye.training.finetune import find_backbone

    base = find_backbone(extractor)
    cut = base.get_layer(first_trained).input
    if isinstance(cut, (list, tuple)):
        raise ConfigError(f"fine_tune.unfreeze: {first_trained} takes several inputs; cached_top needs the first layer of a "
                          "block, e.g. block_16_expand or block_13_expand")
    try:
        top_base = keras.Model(cut, base.outputs if len(base.outputs) > 1 else base.outputs[0], name="cached_top_backbone")
    except ValueError as exc:
        raise ConfigError(f"fine_tune.unfreeze: the top of the network from {first_trained} needs more than that layer's "
                          f"input ({exc}); with fine_tune.method cached_top unfreeze from the first layer of a block, e.g. "
                          "block_16_expand or block_13_expand (and from block_13_expand or lower with model.features multi)") from None
    image = keras.Input(extractor.input_shape[1:], dtype="uint8", name="image")
    scaled = extractor.get_layer("mobilenet_v2_preprocess")(image)
    bottom = keras.Model(image, keras.Model(base.inputs, cut)(scaled), name="cached_bottom")
    activations = keras.Input(tuple(cut.shape[1:]), name="activations")
    outputs = top_base(activations)
    top = keras.Model(activations, _pool_like(extractor, outputs), name="cached_top")
    return bottom, top


def _pool_like(extractor: keras.Model, outputs) -> object:
    """The extractor's own pooling layers (model.features) applied to the backbone outputs of the top."""
    names = {layer.name for layer in extractor.layers}
    if "last_avg" not in names:  # "gap": one average pooling named "features"
        return extractor.get_layer("features")(outputs)
    if "mid_avg" in names:  # "multi": (middle, last)
        middle, last = outputs
        pooled = [extractor.get_layer(n)(t) for n, t in (("mid_avg", middle), ("mid_max", middle), ("last_avg", last), ("last_max", last))]
    else:  # "gap+gmp"
        pooled = [extractor.get_layer(n)(outputs) for n in ("last_avg", "last_max")]
    return extractor.get_layer("features")(pooled)


def cache_views(bottom: keras.Model, paths: Sequence[str], spec: InputSpec, views: int, batch_size: int = 32,
                progress=None) -> tuple[np.ndarray, dict[int, str]]:
    """(views, N, h, w, c) float32 bottom activations of every view of every image (NaN for files that fail), failures.

    Each file is decoded once; its `views` dihedral views go through the bottom together.
    """
    shape = tuple(bottom.output_shape[1:])
    out = activation_array((views, len(paths), *shape))

    def all_views(batch: np.ndarray) -> np.ndarray:
        stacked = np.concatenate([dihedral(batch, v) for v in range(views)])
        acts = np.asarray(bottom.predict_on_batch(stacked))
        return acts.reshape(views, len(batch), *shape).swapaxes(0, 1)  # (B, views, ...) for the sink

    def sink(keys: list[int], result: np.ndarray) -> None:
        out[:, keys] = result.swapaxes(0, 1)

    run = run_engine(all_views, list(paths), spec, max(1, batch_size // views), progress=progress, sink=sink)
    return out, run.failures


def activation_array(shape: tuple[int, ...], limit: int = IN_MEMORY_BYTES) -> np.ndarray:
    """A float32 array of `shape` filled with NaN: in RAM up to `limit` bytes, beyond that memory-mapped.

    The file is unlinked as soon as it is mapped, so it takes disk space only while the array lives and
    nothing is left behind after a crash; the page cache keeps what fits in RAM.
    """
    if int(np.prod(shape)) * 4 <= limit:
        return np.full(shape, np.nan, np.float32)
    handle, path = tempfile.mkstemp(prefix="keeneye-activations-", suffix=".npy")
    os.close(handle)
    try:
        array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
    finally:
        os.unlink(path)
    array[:] = np.nan
    return array


def views_dataset(activations: np.ndarray, labels: np.ndarray, weights: np.ndarray, plan: EpochPlan, epochs, seed: int,
                  positions: np.ndarray | None = None):
    """tf.data batches (activations, label, weight) following `plan`; every image in a random view drawn per (seed, epoch).

    `positions`: the columns of `activations` that the labels belong to (the files that decoded), so the
    array (possibly memory-mapped) is read batch by batch instead of being copied without its failures.
    """
    import tensorflow as tf

    epochs = list(epochs)
    views, shape = activations.shape[0], activations.shape[2:]
    labels, weights = np.asarray(labels, np.float32), np.asarray(weights, np.float32)
    columns = np.arange(len(labels)) if positions is None else np.asarray(positions)

    def batches():
        for epoch in epochs:
            drawn = epoch_rng(seed, epoch, VIEW_STREAM).integers(0, views, len(labels))
            for rows in plan.batches(epoch):
                yield activations[drawn[rows], columns[rows]], labels[rows], weights[rows]

    signature = (tf.TensorSpec([None, *shape], tf.float32), tf.TensorSpec([None], tf.float32), tf.TensorSpec([None], tf.float32))
    return tf.data.Dataset.from_generator(batches, output_signature=signature).prefetch(2)


def learning_rate(rate: float, schedule: str, steps_per_epoch: int, epochs: int):
    """A constant rate, or one epoch of linear warm-up from 0 then cosine decay to 0 over the remaining epochs."""
    if schedule == "constant":
        return rate
    warmup = steps_per_epoch
    return keras.optimizers.schedules.CosineDecay(0.0, decay_steps=max(1, steps_per_epoch * epochs - warmup),
                                                  warmup_target=rate, warmup_steps=warmup)


def train_top(cfg, top: keras.Model, head: keras.Model, train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray],
              checkpoint_dir: Path | None, callbacks: Sequence = (), verbose: int = 0, positions: np.ndarray | None = None):
    """Train top + head on cached views (train: (views, N, ...) activations, labels of the `positions` columns (default
    all); val: view 0 only). Returns PhaseOutcome."""
    import tensorflow as tf

    from keeneye.training.fit import run_phase, sample_weights

    ft, training = cfg.fine_tune, cfg.training
    activations = keras.Input(top.input_shape[1:], name="activations")
    model = keras.Model(activations, head(top(activations)), name="keeneye_cached_top")
    plan = EpochPlan(train[1], training.batch_size, training.seed, shuffle=True, oversample=training.oversample, stream=1)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate(ft.learning_rate, ft.schedule, plan.steps_per_epoch, ft.epochs)),
                  loss="binary_crossentropy", metrics=[keras.metrics.AUC(name="auc")])
    weights = sample_weights(train[1], training.class_weight)
    validation = None
    if len(val[1]):
        validation = tf.data.Dataset.from_tensor_slices((val[0], np.asarray(val[1], np.float32))).batch(training.batch_size)
    return model, run_phase(
        model, lambda first: views_dataset(train[0], train[1], weights, plan, range(first, ft.epochs), training.seed, positions),
        plan.steps_per_epoch, ft.epochs, validation, "val_loss" if validation is not None else "loss", ft.patience,
        checkpoint_dir, callbacks, verbose,
    )


def dropped_frame(index: pd.Index, failures: dict[int, str]) -> pd.DataFrame:
    """manifest index -> reason for the positions that failed to decode."""
    return pd.DataFrame({"reason": pd.Series({index[k]: r for k, r in sorted(failures.items())}, dtype=object)})
