"""The trainable head on pooled features, and its composition with the backbone."""

from __future__ import annotations

from typing import Sequence

import keras


def build_head(input_dim: int, dense_units: Sequence[int], dropout: float, seed: int | None = None, l2: float = 0.0) -> keras.Model:
    """Pooled features (N, D) -> probability of the positive class (N, 1).

    Dropout / Dense(relu) blocks then a sigmoid unit; `l2` penalises the dense kernels (a built-in
    regulariser: the saved model still loads without custom objects). Trained on cached features, then attached
    to the backbone unchanged, so the bundle computes exactly what was trained.
    """
    regularizer = keras.regularizers.L2(l2) if l2 > 0 else None
    features = keras.Input((input_dim,), name="pooled_features")
    x = features
    for index, units in enumerate(dense_units):
        if dropout > 0:
            x = keras.layers.Dropout(dropout, seed=None if seed is None else seed + index, name=f"dropout_{index}")(x)
        x = keras.layers.Dense(units, activation="relu", kernel_regularizer=regularizer, name=f"dense_{index}")(x)
    if dropout > 0:
        x = keras.layers.Dropout(dropout, seed=seed, name="dropout_out")(x)
    probability = keras.layers.Dense(1, activation="sigmoid", dtype="float32", kernel_regularizer=regularizer, name="probability")(x)
    return keras.Model(features, probability, name="head")


def build_classifier(feature_extractor: keras.Model, head: keras.Model) -> keras.Model:
    """Raw RGB uint8 image -> probability: the model that goes into the bundle."""
    image = keras.Input(feature_extractor.input_shape[1:], dtype="uint8", name="image")
    probability = head(feature_extractor(image))
    return keras.Model(image, probability, name="keeneye_classifier")


def average_heads(heads: Sequence[keras.Model]) -> keras.Model:
    """One head that outputs the mean probability of several heads (the fold heads of cross-validation).

    Built from plain Keras layers (Average), so the bundle still loads with keras.saving.load_model alone.
    """
    if len(heads) == 1:
        return heads[0]
    features = keras.Input(heads[0].input_shape[1:], name="pooled_features")
    outputs = []
    for index, head in enumerate(heads):
        head.name = f"fold_head_{index}"
        outputs.append(head(features))
    return keras.Model(features, keras.layers.Average(name="probability_mean")(outputs), name="head")


def linear_head(coef, intercept: float, mean=None, scale=None) -> keras.Model:
    """A fitted linear model on (optionally standardised) features as the Keras head: Dense(1, sigmoid).

    ``sigmoid(((x - mean) / scale) . coef + intercept)`` is folded into one Dense layer (kernel
    ``coef / scale``, bias ``intercept - sum(mean * coef / scale)``, computed in float64), so a
    scikit-learn StandardScaler + LogisticRegression becomes the same plain Keras head that
    :func:`build_head` makes with ``dense_units=[]``: bundles, exports and ONNX need nothing new.
    """
    import numpy as np

    coef = np.asarray(coef, np.float64).reshape(-1)
    mean = np.zeros_like(coef) if mean is None else np.asarray(mean, np.float64).reshape(-1)
    scale = np.ones_like(coef) if scale is None else np.asarray(scale, np.float64).reshape(-1)
    kernel = coef / scale
    bias = float(intercept) - float(np.dot(mean, kernel))
    head = build_head(len(coef), (), 0.0)
    head.get_layer("probability").set_weights([kernel.reshape(-1, 1).astype(np.float32), np.array([bias], np.float32)])
    return head


def widen_head(head: keras.Model, columns, input_dim: int) -> keras.Model:
    """A head trained on the feature columns `columns` as the same head on all `input_dim` features.

    The first Dense layer's kernel gets zero rows outside `columns` (every other weight copied), so
    its output is exactly the narrow head's: the chosen feature subset of head.auto needs no slicing
    layer, and bundles, ONNX and the other exports are plain Dense layers as before. The zero rows
    cost one multiply-add per extra feature, nothing next to the backbone.
    """
    import numpy as np

    columns = np.asarray(columns)
    if len(columns) == input_dim and np.array_equal(columns, np.arange(input_dim)):
        return head
    dense = [layer for layer in head.layers if isinstance(layer, keras.layers.Dense)]
    units = tuple(int(layer.units) for layer in dense[:-1])
    dropouts = [layer for layer in head.layers if isinstance(layer, keras.layers.Dropout)]
    wide = build_head(input_dim, units, float(dropouts[0].rate) if dropouts else 0.0)
    for index, layer in enumerate(dense):
        weights = layer.get_weights()
        if index == 0:
            kernel = np.zeros((input_dim, weights[0].shape[1]), weights[0].dtype)
            kernel[columns] = weights[0]
            weights = [kernel, *weights[1:]]
        wide.get_layer(layer.name).set_weights(weights)
    wide.name = head.name
    return wide
