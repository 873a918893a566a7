"""MobileNetV2 backbone: weight resolution (download, cache, local file) and the feature extractor.

The extractor takes raw RGB uint8 images and does MobileNetV2's own preprocessing inside the
model (x / 127.5 - 1, as `keras.applications.mobilenet_v2.preprocess_input`), so a saved model
needs nothing from keeneye to be used.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import keras

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


def sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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


def build_feature_extractor(alpha: float, image_size: int, weights: ResolvedWeights) -> keras.Model:
    """Raw RGB uint8 images (N, S, S, 3) -> pooled MobileNetV2 features (N, D), frozen."""
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
    features = base(scaled, training=False)
    pooled = keras.layers.GlobalAveragePooling2D(name=FEATURE_LAYER_NAME)(features)
    return keras.Model(inputs, pooled, name="feature_extractor")
