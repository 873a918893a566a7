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
from keeneye.model.backbone import embedding_parts, join_parts, maps_below
from keeneye.runtime.batches import run_engine
from keeneye.training.pipeline import EpochPlan, epoch_rng

VIEWS = 8  # the dihedral group of the square: 4 quarter turns, each also mirrored
VIEW_STREAM = 2  # epoch_rng stream that draws each epoch's views (0: head, 1: fine-tuning order)
#: Activations larger than this go to a memory-mapped temporary file (block_15's output is ~31 KB per
#: image and view: 10,000 images x 8 views would otherwise hold 2.5 GB of RAM).
IN_MEMORY_BYTES = 1 << 30


def split_backbone(extractor: keras.Model, first_trained: str) -> tuple[keras.Model, keras.Model]:
    """(bottom, top) of the extractor's MobileNetV2 at the input of layer `first_trained`.

    bottom: uint8 image -> [activations entering `first_trained`, then the embedding parts pooled from blocks
    below the cut]; top: that list -> the extractor's pooled features, built from the extractor's own layers
    (training the top trains the extractor). A part pooled from a block below the cut ("multi"'s
    block_13_expand_relu when the cut is higher, "multi+cov"'s texture part from block_6_expand_relu) is as
    frozen as that block, so the bottom pools it once and it is cached beside the activations: small vectors
    instead of a deeper cut's larger maps. The cut must be one tensor: the input of a block's first layer
    (e.g. ``block_16_expand``), not a layer inside a block with a skip connection. Without frozen parts the
    bottom has one output and the top one input.
    """
    from keeneye.training.finetune import find_backbone

    base = find_backbone(extractor)
    cut = base.get_layer(first_trained).input
    if isinstance(cut, (list, tuple)):
        raise ConfigError(f"fine_tune.unfreeze: {first_trained} takes several inputs; cached_top needs the first layer of a "
                          "block, e.g. block_16_expand or block_13_expand")
    parts = embedding_parts(extractor)
    below = maps_below(extractor, base, first_trained)
    trained_maps = [i for i in range(len(base.outputs)) if i not in below]
    try:
        top_base = keras.Model(cut, [base.outputs[i] for i in trained_maps], name="cached_top_backbone")
    except ValueError as exc:
        raise ConfigError(f"fine_tune.unfreeze: the top of the network from {first_trained} needs more than that layer's "
                          f"input ({exc}); with fine_tune.method cached_top unfreeze from the first layer of a block, e.g. "
                          "block_16_expand or block_13_expand") from None
    image = keras.Input(extractor.input_shape[1:], dtype="uint8", name="image")
    scaled = extractor.get_layer("mobilenet_v2_preprocess")(image)
    lower = keras.Model(base.inputs, [cut, *(base.outputs[i] for i in below)], name="cached_bottom_backbone")(scaled)
    frozen = [(name, pool(lower[1 + below.index(i)])) for name, i, pool in parts if i in below]
    bottom = keras.Model(image, [lower[0], *(t for _, t in frozen)], name="cached_bottom")
    activations = keras.Input(tuple(cut.shape[1:]), name="activations")
    cached = {name: keras.Input(tuple(t.shape[1:]), name=f"cached_{name}") for name, t in frozen}
    maps = dict(zip(trained_maps, top_base(activations)))  # a Model built with a list of outputs returns a list
    pooled = [cached[name] if name in cached else pool(maps[i]) for name, i, pool in parts]
    return bottom, keras.Model(model_inputs([activations, *cached.values()]), join_parts(extractor, pooled), name="cached_top")


def cache_views(bottom: keras.Model, paths: Sequence[str], spec: InputSpec, views: int, batch_size: int = 32,
                progress=None) -> tuple[tuple[np.ndarray, ...], dict[int, str]]:
    """One (views, N, ...) float32 array per output of the bottom (the activations, then any parts it pools; see
    split_backbone) for every view of every image (NaN for files that fail), and the failures.

    Each file is decoded once; its `views` dihedral views go through the bottom together.
    """
    shapes = [tuple(t.shape[1:]) for t in bottom.outputs]
    starts = np.cumsum([0] + [int(np.prod(shape)) for shape in shapes])  # each output's columns in the flat batch
    out = tuple(activation_array((views, len(paths), *shape)) for shape in shapes)

    def all_views(batch: np.ndarray) -> np.ndarray:
        stacked = np.concatenate([dihedral(batch, v) for v in range(views)])
        outputs = bottom.predict_on_batch(stacked)
        outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        flat = np.concatenate([np.asarray(o).reshape(views, len(batch), -1) for o in outputs], axis=-1)
        return flat.swapaxes(0, 1)  # (B, views, all outputs flattened): one array for the batch loop

    def sink(keys: list[int], result: np.ndarray) -> None:
        for array, shape, start, end in zip(out, shapes, starts[:-1], starts[1:]):
            array[:, keys] = result[..., start:end].reshape(len(keys), views, *shape).swapaxes(0, 1)

    run = run_engine(all_views, list(paths), spec, max(1, batch_size // views), progress=progress, sink=sink)
    return out, run.failures


def view_of(cached: Sequence[np.ndarray], view: int, columns: np.ndarray) -> tuple[np.ndarray, ...]:
    """One view of the `columns` images from every cached array (the top's inputs for those images)."""
    return tuple(np.asarray(array[view, columns]) for array in cached)


def model_inputs(parts: Sequence) -> object:
    """What a Keras model with these inputs takes: the one array (or tensor) alone, several as a tuple."""
    return parts[0] if len(parts) == 1 else tuple(parts)


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


def views_dataset(cached: Sequence[np.ndarray], labels: np.ndarray, weights: np.ndarray, plan: EpochPlan, epochs, seed: int,
                  positions: np.ndarray | None = None):
    """tf.data batches (top inputs, label, weight) following `plan`; every image in a random view drawn per (seed, epoch).

    `cached`: cache_views' arrays (possibly memory-mapped); `positions`: the columns that the labels belong
    to (the files that decoded), so the arrays are read batch by batch instead of being copied without
    their failures. Every array of one image is read in the same view.
    """
    import tensorflow as tf

    epochs = list(epochs)
    views = cached[0].shape[0]
    labels, weights = np.asarray(labels, np.float32), np.asarray(weights, np.float32)
    columns = np.arange(len(labels)) if positions is None else np.asarray(positions)

    def batches():
        for epoch in epochs:
            drawn = epoch_rng(seed, epoch, VIEW_STREAM).integers(0, views, len(labels))
            for rows in plan.batches(epoch):
                yield model_inputs([array[drawn[rows], columns[rows]] for array in cached]), labels[rows], weights[rows]

    inputs = model_inputs([tf.TensorSpec([None, *array.shape[2:]], tf.float32) for array in cached])
    signature = (inputs, tf.TensorSpec([None], tf.float32), tf.TensorSpec([None], tf.float32))
    return tf.data.Dataset.from_generator(batches, output_signature=signature).prefetch(2)


def learning_rate(rate: float, schedule: str, steps_per_epoch: int, epochs: int):
    """A constant rate, or one epoch of linear warm-up from 0 then cosine decay to 0 over the remaining epochs."""
    if schedule == "constant":
        return rate
    warmup = steps_per_epoch
    return keras.optimizers.schedules.CosineDecay(0.0, decay_steps=max(1, steps_per_epoch * epochs - warmup),
                                                  warmup_target=rate, warmup_steps=warmup)


def train_top(cfg, top: keras.Model, head: keras.Model, train: tuple[Sequence[np.ndarray], np.ndarray],
              val: tuple[Sequence[np.ndarray], np.ndarray],
              checkpoint_dir: Path | None, callbacks: Sequence = (), verbose: int = 0, positions: np.ndarray | None = None):
    """Train top + head on cached views (train: cache_views' arrays, labels of the `positions` columns (default all);
    val: the top's inputs in view 0 (view_of), labels). Returns (model, PhaseOutcome)."""
    import tensorflow as tf

    from keeneye.training.fit import run_phase, sample_weights

    ft, training = cfg.fine_tune, cfg.training
    inputs = [keras.Input(tuple(t.shape[1:]), name=t.name) for t in top.inputs]
    model = keras.Model(model_inputs(inputs), head(top(model_inputs(inputs))), name="keeneye_cached_top")
    plan = EpochPlan(train[1], training.batch_size, training.seed, shuffle=True, oversample=training.oversample, stream=1)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate(ft.learning_rate, ft.schedule, plan.steps_per_epoch, ft.epochs)),
                  loss="binary_crossentropy", metrics=[keras.metrics.AUC(name="auc")])
    weights = sample_weights(train[1], training.class_weight)
    validation = None
    if len(val[1]):
        validation = tf.data.Dataset.from_tensor_slices((model_inputs(val[0]), np.asarray(val[1], np.float32))).batch(training.batch_size)
    return model, run_phase(
        model, lambda first: views_dataset(train[0], train[1], weights, plan, range(first, ft.epochs), training.seed, positions),
        plan.steps_per_epoch, ft.epochs, validation, "val_loss" if validation is not None else "loss", ft.patience,
        checkpoint_dir, callbacks, verbose,
    )


def dropped_frame(index: pd.Index, failures: dict[int, str]) -> pd.DataFrame:
    """manifest index -> reason for the positions that failed to decode."""
    return pd.DataFrame({"reason": pd.Series({index[k]: r for k, r in sorted(failures.items())}, dtype=object)})
