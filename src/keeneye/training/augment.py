"""Training-time augmentation: Keras preprocessing layers on uint8 RGB images, uint8 out.

The augmenter is a small Keras model, ``uint8 (N, S, S, 3) -> uint8 (N, S, S, 3)``, built from the
``augmentation`` config section: RandomFlip, RandomRotation, RandomZoom, RandomCrop (+ Resizing back to
S), RandomBrightness, RandomContrast, each left out when its setting is 0 / "none". Its output is
rounded and clipped back to uint8, so what the backbone sees while training is exactly the kind of
input it gets at inference (the bundle's model takes uint8 RGB).

It is never part of the saved model: fine-tuning trains ``augmenter -> feature extractor -> head``
and the bundle stores ``feature extractor -> head`` (the same layer objects, without the augmenter),
so ``model.keras`` needs no custom objects and cannot augment at inference.

How augmentation and the embedding cache live together (measured; numbers in the reply of issue #4
and in ``benchmarks/results/finetune.json``):

* the cache holds features of the original images only, keyed by content hash: a cached feature
  must be a pure function of the file, and an augmented view is not;
* head training on the frozen backbone uses no augmentation by default. ``augmentation.frozen_views
  = K`` embeds K augmented copies of each training image per run (K extra forward passes over the
  training set, not cached) and trains the head on originals + copies;
* fine-tuning augments online, a fresh random view of every image each epoch, inside the training
  model (on the GPU when there is one).
"""

from __future__ import annotations

import keras

from keeneye.config import AugmentationConfig


class _ToUint8(keras.layers.Layer):
    """Round and clip float pixels back to uint8 (only ever used in training graphs, never saved)."""

    def call(self, inputs):
        return keras.ops.cast(keras.ops.clip(keras.ops.round(inputs), 0, 255), "uint8")

    def compute_output_spec(self, inputs):
        return keras.KerasTensor(inputs.shape, dtype="uint8")


def augmentation_layers(config: AugmentationConfig, image_size: int, seed: int) -> list[keras.layers.Layer]:
    """The configured random layers in application order (geometry first, then photometry)."""
    layers: list[keras.layers.Layer] = []
    if config.flip != "none":
        layers.append(keras.layers.RandomFlip(config.flip, seed=seed, name="random_flip"))
    if config.rotation > 0:
        layers.append(keras.layers.RandomRotation(config.rotation, fill_mode="reflect", seed=seed + 1, name="random_rotation"))
    if config.zoom > 0:
        layers.append(keras.layers.RandomZoom((-config.zoom, config.zoom), fill_mode="reflect", seed=seed + 2, name="random_zoom"))
    if config.crop > 0:
        side = max(1, int(round(image_size * (1.0 - config.crop))))
        layers.append(keras.layers.RandomCrop(side, side, seed=seed + 3, name="random_crop"))
        layers.append(keras.layers.Resizing(image_size, image_size, name="crop_resize"))
    if config.brightness > 0:
        layers.append(keras.layers.RandomBrightness(config.brightness, value_range=(0, 255), seed=seed + 4, name="random_brightness"))
    if config.contrast > 0:
        layers.append(keras.layers.RandomContrast(config.contrast, value_range=(0, 255), seed=seed + 5, name="random_contrast"))
    return layers


def build_augmenter(config: AugmentationConfig, image_size: int, seed: int) -> keras.Model | None:
    """uint8 images -> randomly transformed uint8 images (always random: call it only on training data).

    None when every transformation is turned off.
    """
    layers = augmentation_layers(config, image_size, seed)
    if not layers:
        return None
    image = keras.Input((image_size, image_size, 3), dtype="uint8", name="image")
    x = keras.ops.cast(image, "float32")
    for layer in layers:
        # training=True is recorded in the graph; the outer call's training flag (fit: True) agrees.
        x = layer(x, training=True)
    return keras.Model(image, _ToUint8(name="to_uint8")(x), name="augmentation")
