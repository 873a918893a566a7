"""MobileNetV2 backbone: weight resolution (download, cache, local file) and the feature extractor.

The extractor takes raw RGB uint8 images and does MobileNetV2's own preprocessing inside the
model (x / 127.5 - 1, as `keras.applications.mobilenet_v2.preprocess_input`), so a saved model
needs nothing from keeneye to be used.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import keras

from keeneye.data.files import sha256_of_file
from keeneye.errors import WeightsError

# Keras publishes MobileNetV2 weights per input size; keeneye always uses the 224 px no-top file of
# the chosen alpha for every input size (the convolution weights do not depend on it), so an
# air-gapped user needs exactly one file per alpha.
IMAGENET_ROWS = 224
IMAGENET_BASE_URL = "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v2/"
FEATURE_LAYER_NAME = "features"


@dataclass(frozen=True)
class ResolvedWeights:
    """Where the backbone's weights came from: recorded in the bundle's metadata."""

    spec: str  # "imagenet", "none" or the path the user gave
    path: Path | None
    sha256: str | None

    def to_dict(self) -> dict:
        return {"spec": self.spec, "path": str(self.path) if self.path else None, "sha256": self.sha256}


def imagenet_weights_filename(alpha: float, image_size: int) -> str:
    """The Keras file name of the no-top MobileNetV2 ImageNet weights used for any `image_size`."""
    return f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{float(alpha)}_{IMAGENET_ROWS}_no_top.h5"


def keras_models_cache_dir() -> Path:
    """`$KERAS_HOME/models` (default `~/.keras/models`): where Keras caches downloaded weights."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(home) / "models"


def resolve_weights(weights: str, alpha: float, image_size: int) -> ResolvedWeights:
    """Find the weights file: an explicit path, or ImageNet through Keras's cache and download.

    Never falls back to random weights: only `weights="none"` gives an untrained backbone.
    """
    if weights == "none":
        return ResolvedWeights("none", None, None)
    if weights != "imagenet":
        path = Path(weights).expanduser().resolve()
        if not path.is_file():
            raise WeightsError(f"model.weights: weights file {path} does not exist.")
        return ResolvedWeights(weights, path, sha256_of_file(path))

    filename = imagenet_weights_filename(alpha, image_size)
    cached = keras_models_cache_dir() / filename
    url = IMAGENET_BASE_URL + filename
    try:
        downloaded = keras.utils.get_file(filename, url, cache_subdir="models")
    except BaseException as exc:  # urllib errors arrive wrapped in a bare Exception
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise WeightsError(
            "Could not get the ImageNet weights for MobileNetV2 "
            f"(alpha {alpha}, no top).\n"
            f"  tried: the Keras cache file {cached} (not there)\n"
            f"  tried: downloading {url} ({type(exc).__name__}: {exc})\n"
            "Ways out:\n"
            f"  1. on a machine with internet, run keeneye once (or download {url}) and copy the file;\n"
            f"  2. put the file at {cached} (the folder is $KERAS_HOME/models, default ~/.keras/models);\n"
            "  3. or set model.weights in config.json to the file's path "
            "(e.g. --set model.weights=/path/to/" + filename + ")."
        ) from None
    path = Path(downloaded).resolve()
    return ResolvedWeights("imagenet", path, sha256_of_file(path))


#: What the pooled embedding holds (model.features). Every mode is plain Keras layers, so model.keras,
#: its ONNX conversion and every export compute exactly the features the head was trained on.
FEATURE_MODES: tuple[str, ...] = ("gap", "gap+gmp", "multi", "multi+cov")
#: The mid-level block "multi" pools besides the last one: stride 16 (14 x 14 at 224 px), computed on
#: the way to the last block anyway, so it costs the pooling only.
MID_LEVEL_LAYER = "block_13_expand_relu"
#: The low-level block whose second moment "multi+cov" adds: stride 8 (28 x 28 at 224 px, 192 channels at
#: alpha 1), where texture is still local (benchmarks/texture_pooling.py measured blocks 5, 6, 12, 13).
TEXTURE_LAYER = "block_6_expand_relu"
#: Principal axes of the texture block's positions kept before the second moment: 48 x 48 = 2,304 values.
TEXTURE_DIM = 48
#: The 1 x 1 convolution that centres and projects the texture block's positions (training/texture.py fits it).
TEXTURE_PROJECTION = "low_projection"
#: The layers after the projection, in order: positions (P, D) -> Z^T Z (D, D) -> flat -> L2-normalised.
TEXTURE_LAYERS = ("low_positions", "low_moment", "low_moment_flat", "low_cov")


#: The pooled parts of each mode's embedding, in column order (the Concatenate order below). "gap" and
#: "gap+gmp" are column subsets of "multi", so one "multi" embedding holds all three feature sets.
FEATURE_PARTS: dict[str, tuple[str, ...]] = {
    "gap": ("last_avg",),
    "gap+gmp": ("last_avg", "last_max"),
    "multi": ("mid_avg", "mid_max", "last_avg", "last_max"),
    "multi+cov": ("mid_avg", "mid_max", "last_avg", "last_max", "low_cov"),
}


def feature_subsets(extractor: keras.Model, features: str) -> dict[str, "np.ndarray"]:
    """The column indices of every feature mode that is a subset of the `features` embedding `extractor` makes.

    Why: head.auto compares feature sets on one cached embedding of the richest mode (no second
    backbone pass); a head trained on a subset is exported by zero weights outside its columns
    (model/head.widen_head). Widths are read from the model (they depend on alpha), tiled or not.
    """
    import numpy as np

    extractor = per_square(extractor)[0]  # tiled or views extractor: the per-image one inside
    parts = FEATURE_PARTS[features]
    layer = extractor.get_layer(FEATURE_LAYER_NAME)
    widths = [int(t.shape[-1]) for t in layer.input] if len(parts) > 1 else [int(layer.output.shape[-1])]
    if len(widths) != len(parts):
        raise ValueError(f"feature layer of {features!r} has {len(widths)} parts, expected {len(parts)}")
    starts = dict(zip(parts, np.cumsum([0] + widths[:-1]).tolist()))
    ranges = {part: np.arange(starts[part], starts[part] + width) for part, width in zip(parts, widths)}
    return {mode: np.concatenate([ranges[p] for p in sub]) for mode, sub in FEATURE_PARTS.items() if set(sub) <= set(parts)}


def _pool(tensor, name: str, with_max: bool) -> list:
    pooled = [keras.layers.GlobalAveragePooling2D(name=f"{name}_avg")(tensor)]
    if with_max:
        pooled.append(keras.layers.GlobalMaxPooling2D(name=f"{name}_max")(tensor))
    return pooled


def _second_moment(low) -> object:
    """TEXTURE_LAYER's map (N, H, W, C) -> the L2-normalised second moment of its projected positions (N, D * D).

    Why: average and max pooling keep first-order statistics; which channels fire *together* is what
    describes a texture (bilinear / covariance pooling: Lin et al. 2015, Cimpoi et al. 2015), and
    magnetic-tile's defects are texture changes far from ImageNet. The projection (TEXTURE_PROJECTION)
    starts as a seeded random one; training/texture.py replaces it with the principal axes of the training
    images' positions (centred on their mean), which measured better than any fixed projection
    (benchmarks/texture_pooling.py). The full symmetric D x D matrix is kept (built-in Keras layers only).
    """
    import numpy as np

    from keeneye.model.patchcore import projection_matrix

    height, width, depth = (int(d) for d in low.shape[1:])
    dim = min(TEXTURE_DIM, depth)
    projection = keras.layers.Conv2D(dim, 1, use_bias=True, trainable=False, name=TEXTURE_PROJECTION)
    layers = (projection, keras.layers.Reshape((height * width, dim), name=TEXTURE_LAYERS[0]),
              keras.layers.Dot(axes=1, name=TEXTURE_LAYERS[1]), keras.layers.Flatten(name=TEXTURE_LAYERS[2]),
              keras.layers.UnitNormalization(name=TEXTURE_LAYERS[3]))
    texture = _apply_texture_layers(layers, low)
    projection.set_weights([projection_matrix(depth, dim, 0)[None, None], np.zeros(dim, np.float32)])
    return texture


def _apply_texture_layers(layers, low):
    """(projection, reshape, dot, flatten, normalise) applied to a map: the one wiring of the texture part."""
    project, reshape, dot, flatten, normalise = layers
    positions = reshape(project(low))
    return normalise(flatten(dot([positions, positions])))


def texture_pooling(extractor: keras.Model):
    """map -> the "multi+cov" texture part, with `extractor`'s own (fitted) layers: for Grad-CAM, which pools maps again."""
    layers = tuple(extractor.get_layer(n) for n in (TEXTURE_PROJECTION, *TEXTURE_LAYERS))
    return lambda low: _apply_texture_layers(layers, low)


#: The block each pooled map of the backbone comes from, by the prefix of its parts' names ("last": its output).
BLOCK_OF_MAP = {"low": TEXTURE_LAYER, "mid": MID_LEVEL_LAYER, "last": None}


def pooled_maps(extractor: keras.Model) -> list[str]:
    """The prefixes of the backbone maps a per-image extractor pools, in the order its nested MobileNetV2 returns them
    (finest first; build_feature_extractor): ["last"] for "gap" and "gap+gmp", ["low", "mid", "last"] for "multi+cov"."""
    names = {layer.name for layer in extractor.layers}
    return [prefix for prefix in BLOCK_OF_MAP if any(name.startswith(f"{prefix}_") for name in names)] or ["last"]


def embedding_parts(extractor: keras.Model) -> list[tuple[str, int, object]]:
    """(name, index of the map in pooled_maps, map -> pooled part) for each part of a per-image extractor's embedding,
    in column order (FEATURE_PARTS), with the extractor's own layers: for whoever pools maps again (Grad-CAM,
    fine-tuning from cached activations). join_parts makes the embedding of them."""
    names = {layer.name for layer in extractor.layers}
    if "last_avg" not in names:  # "gap": one average pooling named "features"
        return [(FEATURE_LAYER_NAME, 0, extractor.get_layer(FEATURE_LAYER_NAME))]
    order = pooled_maps(extractor)
    return [(part, order.index(part.split("_")[0]), texture_pooling(extractor) if part == "low_cov" else extractor.get_layer(part))
            for part in FEATURE_PARTS["multi+cov"] if part in names]


def join_parts(extractor: keras.Model, pooled: list) -> object:
    """The embedding of its parts (embedding_parts' order): the extractor's Concatenate, or the one part of "gap"."""
    return pooled[0] if len(pooled) == 1 else extractor.get_layer(FEATURE_LAYER_NAME)(pooled)


def maps_below(extractor: keras.Model, backbone: keras.Model, first_layer: str) -> list[int]:
    """Indices (pooled_maps) of the maps that come from blocks below `first_layer` of the backbone."""
    names = [layer.name for layer in backbone.layers]
    cut = names.index(first_layer)
    return [i for i, prefix in enumerate(pooled_maps(extractor)) if BLOCK_OF_MAP[prefix] and names.index(BLOCK_OF_MAP[prefix]) < cut]


def has_texture_part(extractor: keras.Model) -> bool:
    """Whether a (per-image, tiled or views) extractor holds the fitted "multi+cov" projection."""
    return TEXTURE_PROJECTION in {layer.name for layer in per_square(extractor)[0].layers}


def texture_maps_model(extractor: keras.Model) -> keras.Model:
    """uint8 squares (N, S, S, 3) -> TEXTURE_LAYER's maps, the input the projection is fitted on."""
    inner = per_square(extractor)[0]
    return keras.Model(inner.input, inner.get_layer(TEXTURE_PROJECTION).input, name="texture_maps")


def set_texture_projection(extractor: keras.Model, kernel, bias) -> None:
    """Put a fitted (C, D) kernel and (D,) bias into the projection of a "multi+cov" extractor (tiled or not)."""
    import numpy as np

    layer = per_square(extractor)[0].get_layer(TEXTURE_PROJECTION)
    layer.set_weights([np.asarray(kernel, np.float32)[None, None], np.asarray(bias, np.float32)])


def texture_projection(extractor: keras.Model) -> tuple | None:
    """The (C, D) kernel and (D,) bias of a "multi+cov" extractor's projection (None without one)."""
    if not has_texture_part(extractor):
        return None
    kernel, bias = per_square(extractor)[0].get_layer(TEXTURE_PROJECTION).get_weights()
    return kernel[0, 0], bias


def texture_fingerprint(extractor: keras.Model) -> str | None:
    """A short hash of the fitted projection (None without one): part of the embedding cache key, because the
    texture features depend on the training images the projection was fitted on."""
    import hashlib

    projection = texture_projection(extractor)
    if projection is None:
        return None
    digest = hashlib.sha256()
    for array in projection:
        digest.update(array.astype("float32").tobytes())
    return digest.hexdigest()[:12]


def build_feature_extractor(alpha: float, image_size: int, weights: ResolvedWeights, features: str = "gap") -> keras.Model:
    """Raw RGB uint8 images (N, S, S, 3) -> pooled MobileNetV2 features (N, D), frozen.

    features: "gap" = average of the last block (D = 1280 at alpha 1); "gap+gmp" = its average and
    maximum (2 D: a small defect that lights a few positions survives the max); "multi" = average and
    maximum of the last block and of MID_LEVEL_LAYER (finer texture, 2 D + 2 x 576 at alpha 1);
    "multi+cov" = "multi" and the second moment of TEXTURE_LAYER's projected positions (+ 48 x 48),
    whose projection training/texture.py fits on the training images.
    """
    if features not in FEATURE_MODES:
        raise ValueError(f"unknown feature mode {features!r}; choose one of {', '.join(FEATURE_MODES)}")
    inputs = keras.Input((image_size, image_size, 3), dtype="uint8", name="image")
    scaled = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="mobilenet_v2_preprocess")(inputs)
    base = keras.applications.MobileNetV2(
        input_shape=(image_size, image_size, 3), alpha=alpha, include_top=False, weights=None
    )
    if weights.path is not None:
        try:
            base.load_weights(str(weights.path))
        except Exception as exc:
            raise WeightsError(
                f"model.weights: could not load {weights.path} into MobileNetV2 (alpha {alpha}, no top): "
                f"{type(exc).__name__}: {exc}. Is it the no-top weights file for this alpha?"
            ) from None
    base.trainable = False
    if features == "multi+cov":  # one nested model with three outputs, finest first
        outputs = [base.get_layer(TEXTURE_LAYER).output, base.get_layer(MID_LEVEL_LAYER).output, base.output]
        base = keras.Model(base.inputs, outputs, name=base.name)
        low, middle, last = base(scaled, training=False)
        pooled = _pool(middle, "mid", True) + _pool(last, "last", True) + [_second_moment(low)]
    elif features == "multi":  # one nested model with two outputs: the same layers, weights and fine-tuning
        base = keras.Model(base.inputs, [base.get_layer(MID_LEVEL_LAYER).output, base.output], name=base.name)
        middle, last = base(scaled, training=False)
        pooled = _pool(middle, "mid", True) + _pool(last, "last", True)
    elif features == "gap+gmp":
        pooled = _pool(base(scaled, training=False), "last", True)
    else:  # "gap": the layer layout of every bundle before model.features existed
        return keras.Model(inputs, keras.layers.GlobalAveragePooling2D(name=FEATURE_LAYER_NAME)(base(scaled, training=False)),
                           name="feature_extractor")
    output = keras.layers.Concatenate(name=FEATURE_LAYER_NAME)(pooled)
    return keras.Model(inputs, output, name="feature_extractor")


def _stacked_extractor(extractor: keras.Model, count: int, part: str, pool: keras.layers.Layer, name: str) -> keras.Model:
    """Stacked squares (N, count*S, S, 3) -> each square's features, pooled over the squares by `pool` (N, D).

    Reshape + TimeDistributed + a 1-D pooling are plain Keras layers: the bundle's model.keras and its
    exports split the stack themselves; they take the stack data/preprocess.InputSpec makes.
    """
    size = int(extractor.input_shape[1])
    stack = keras.Input((count * size, size, 3), dtype="uint8", name="image")
    squares = keras.layers.Reshape((count, size, size, 3), name=f"{part}s")(stack)
    features = keras.layers.TimeDistributed(extractor, name=f"{part}_features")(squares)
    return keras.Model(stack, pool(features), name=name)


#: The stacked extractors' names, and the TimeDistributed layer in each that runs the per-square extractor.
STACKED_EXTRACTORS = {"tiled_feature_extractor": "tile_features", "views_feature_extractor": "view_features"}


def per_square(extractor: keras.Model) -> tuple[keras.Model, keras.layers.Layer | None, int]:
    """(the extractor of one square, the pooling over the squares or None, squares per input) of an input extractor:
    what a tiled or views extractor runs on each square, or a plain extractor itself."""
    wrapper = STACKED_EXTRACTORS.get(extractor.name)
    if wrapper is None:
        return extractor, None, 1
    inner = extractor.get_layer(wrapper).layer
    return inner, extractor.get_layer(FEATURE_LAYER_NAME), int(extractor.input_shape[1]) // int(inner.input_shape[1])


def build_tiled_extractor(extractor: keras.Model, tiles: int) -> keras.Model:
    """Stacked tiles (N, T*S, S, 3) -> features max-pooled over the T tiles (N, D): one tile can decide."""
    return _stacked_extractor(extractor, tiles, "tile", keras.layers.GlobalMaxPooling1D(name=FEATURE_LAYER_NAME),
                              "tiled_feature_extractor")


def build_views_extractor(extractor: keras.Model, views: int) -> keras.Model:
    """Stacked views (N, V*S, S, 3) -> features averaged over the V views (N, D): features that do not
    depend on how the part lay (data/preprocess.VIEW_SETS makes the stack; the first view is the image)."""
    return _stacked_extractor(extractor, views, "view", keras.layers.GlobalAveragePooling1D(name=FEATURE_LAYER_NAME),
                              "views_feature_extractor")


def build_input_extractor(alpha: float, image_size: int, weights: ResolvedWeights, features: str, n_tiles: int = 1,
                          views: int = 1) -> keras.Model:
    """The frozen extractor for a run's input: per image, or over its stack of tiles (max) or views (mean).

    One place for that choice, so a local train, a Ray actor and every consumer build the same graph.
    """
    extractor = build_feature_extractor(alpha, image_size, weights, features)
    if n_tiles > 1:
        return build_tiled_extractor(extractor, n_tiles)
    return build_views_extractor(extractor, views) if views > 1 else extractor
