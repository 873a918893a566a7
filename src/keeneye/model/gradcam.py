"""Grad-CAM: where the model looked when it made its decision (the computation; files and the CLI in keeneye.explain).

The bundle's ``model.keras`` is ``Input(uint8) -> feature_extractor -> head``, where
``feature_extractor`` is ``Rescaling -> MobileNetV2 (functional) -> GlobalAveragePooling2D`` and
``head`` is a few Dense layers ending in one sigmoid unit. Grad-CAM (Selvaraju et al., 2017) takes
the last convolutional feature map ``A`` (MobileNetV2's output, e.g. 7x7x1280 at 224 px), the
gradient of the decision score ``s`` with respect to it, weights each channel by its mean
gradient and keeps the positive part: ``relu(sum_k mean_ij(ds/dA_ijk) * A_k)``.

The score is the head's *logit* (before the sigmoid), signed for the predicted class: ``+logit``
when the image is called positive, ``-logit`` when negative. The logit keeps its gradient where
the probability saturates at 0 or 1 (exactly the confident mistakes one wants to look at).
The map is computed on the model input, prepared exactly as predict prepares it (same decode,
same resize: the probability shown is predict's), and stretched back over the original image.

It lives in the model layer so that the run report (evaluation) can draw it without importing
the layers above.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import cv2
import numpy as np

from keeneye.data.decode import DecodeError, decode_image_bytes
from keeneye.data.preprocess import InputSpec
from keeneye.errors import BundleError
from keeneye.model.decision import predict_labels

MAX_OVERLAY_SIDE = 512


@dataclass
class Explanation:
    """One image's explanation, or the reason it has none (`error`)."""

    path: str
    probability: float | None
    label: str | None
    heatmap: np.ndarray | None  # float32 in [0, 1] on the feature-map grid (stretched over the image in `overlay`)
    overlay: np.ndarray | None  # RGB uint8
    error: str | None = None


class GradCam:
    """Grad-CAM for a keeneye classifier (a loaded bundle model or the one train just built)."""

    def __init__(self, model) -> None:
        import keras

        stacked = {layer.name for layer in model.layers} & {"tiled_feature_extractor", "views_feature_extractor"}
        if stacked:  # several images per input: one map would not say which tile or view it belongs to
            raise BundleError("Grad-CAM is implemented for single images: this bundle stacks "
                              f"{'tiles (model.tiles)' if 'tiled_feature_extractor' in stacked else 'views (model.views)'} "
                              "in each input.")
        try:
            extractor = model.get_layer("feature_extractor")
            head = model.get_layer("head")
            self.preprocess = extractor.get_layer("mobilenet_v2_preprocess")
            self.pool = self._pooling(extractor)
            self.backbone = next(layer for layer in extractor.layers if isinstance(layer, keras.Model))
            output = head.get_layer("probability")
        except (ValueError, StopIteration) as exc:
            raise BundleError(
                "Grad-CAM needs a keeneye classifier (feature_extractor with a MobileNetV2 inside, then head); "
                f"this model is laid out differently ({exc})."
            ) from None
        self.hidden = keras.Model(head.inputs, output.input, name="head_hidden")
        self.kernel, self.bias = output.kernel, output.bias
        self.image_size = int(model.input_shape[1])

    @staticmethod
    def _pooling(extractor):
        """Last-block feature map -> the extractor's pooled features ("gap" and "gap+gmp"; "multi" pools a
        second, mid-level map too: not supported, BundleError)."""
        import keras

        pool = extractor.get_layer("features")
        if isinstance(pool, keras.layers.GlobalAveragePooling2D):
            return pool
        names = {layer.name for layer in extractor.layers}
        if isinstance(pool, keras.layers.Concatenate) and names >= {"last_avg", "last_max"} and "mid_avg" not in names:
            average, maximum = extractor.get_layer("last_avg"), extractor.get_layer("last_max")
            return lambda features: pool([average(features), maximum(features)])
        raise BundleError('Grad-CAM is implemented for model.features "gap" and "gap+gmp": this bundle pools the mid-level '
                          'block too (model.features "multi").')

    @staticmethod
    def _maps(features: np.ndarray, gradients: np.ndarray) -> np.ndarray:
        weights = gradients.mean(axis=(1, 2))  # (N, C): mean gradient per channel
        maps = np.maximum(np.einsum("nhwc,nc->nhw", features, weights), 0.0)
        peak = maps.reshape(len(maps), -1).max(axis=1)
        return np.where(peak[:, None, None] > 0, maps / np.maximum(peak, 1e-12)[:, None, None], 0.0).astype(np.float32)

    def explain(self, batch: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
        """Maps for the class each image is predicted as (positive iff probability >= threshold)."""
        import tensorflow as tf

        x = tf.convert_to_tensor(np.asarray(batch, dtype=np.uint8))
        features = self.backbone(self.preprocess(x), training=False)
        with tf.GradientTape() as tape:
            tape.watch(features)
            hidden = self.hidden(self.pool(features), training=False)
            logit = tf.reshape(tf.matmul(hidden, tf.cast(self.kernel, hidden.dtype)) + tf.cast(self.bias, hidden.dtype), [-1])
            probability = tf.sigmoid(logit)
            sign = tf.stop_gradient(tf.where(probability >= threshold, 1.0, -1.0))  # predict_labels' rule, inside the graph
            score = tf.reduce_sum(logit * sign)
        gradients = tape.gradient(score, features)
        return self._maps(features.numpy(), gradients.numpy()), probability.numpy().astype(np.float64)


def overlay_heatmap(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blend a [0, 1] map (any size) over an RGB uint8 image as a JET colour map."""
    height, width = image.shape[:2]
    stretched = cv2.resize(heatmap.astype(np.float32), (width, height), interpolation=cv2.INTER_CUBIC)
    stretched = np.clip(stretched, 0.0, 1.0)
    colours = cv2.cvtColor(cv2.applyColorMap(np.uint8(255 * stretched), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    return cv2.addWeighted(image, 1.0 - alpha, colours, alpha, 0.0)


def fit_display(image: np.ndarray, max_side: int) -> np.ndarray:
    """The image shrunk (never enlarged) so that its longer side is at most `max_side`: overlays stay small."""
    height, width = image.shape[:2]
    scale = max_side / max(height, width)
    if scale >= 1:
        return image
    return cv2.resize(image, (max(1, round(width * scale)), max(1, round(height * scale))), interpolation=cv2.INTER_AREA)


Decoded = Iterator[tuple[int, "tuple[np.ndarray, np.ndarray] | None", "str | None"]]


def explain_batch(
    cam: GradCam, prepared: np.ndarray, displays: Sequence[np.ndarray], threshold: float, class_names: tuple[str, str],
    names: Sequence[str],
) -> list[Explanation]:
    """Grad-CAM for model inputs (`prepared`), drawn over the images in `displays` (any size)."""
    negative, positive = class_names
    maps, probabilities = cam.explain(prepared, threshold)
    labels = predict_labels(probabilities, threshold)
    return [
        Explanation(path=name, probability=float(probability), label=positive if label == 1 else negative,
                    heatmap=heat, overlay=overlay_heatmap(display, heat))
        for name, display, heat, probability, label in zip(names, displays, maps, probabilities, labels)
    ]


def load_for_explaining(path: str, spec: InputSpec, max_side: int = MAX_OVERLAY_SIDE) -> tuple[np.ndarray, np.ndarray]:
    """(model input exactly as predict makes it, the image shrunk for display) from one read of the file."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise DecodeError(f"unreadable: {exc.strerror or exc}") from exc
    return spec.from_bytes(data), fit_display(decode_image_bytes(data), max_side)


def _in_order(items: Iterable[tuple[int, str]], load: Callable[[str], tuple[np.ndarray, np.ndarray]]) -> Decoded:
    for key, path in items:
        try:
            yield key, load(path), None
        except DecodeError as exc:
            yield key, None, exc.reason


def explain_files(
    cam: GradCam, paths: Sequence[str], threshold: float, class_names: tuple[str, str], spec: InputSpec | None = None,
    batch_size: int = 16, max_side: int = MAX_OVERLAY_SIDE,
    decode: Callable[[Iterable[tuple[int, str]], Callable], Decoded] | None = None,
) -> list[Explanation]:
    """Grad-CAM overlays for image files, in order; a file that cannot be decoded gets its reason.

    `decode(items, load)`: how files are decoded (default: one after the other; keeneye.explain passes
    runtime's thread pool). Model inputs are prepared by `spec` (default: squash to the model's size).
    """
    spec = spec or InputSpec(cam.image_size)
    results: list[Explanation] = []
    pending: list[tuple[str, np.ndarray, np.ndarray]] = []

    def flush() -> None:
        if pending:
            names, prepared, displays = zip(*pending)
            results.extend(explain_batch(cam, np.stack(prepared), displays, threshold, class_names, names))
            pending.clear()

    for key, item, reason in (decode or _in_order)(enumerate(paths), lambda p: load_for_explaining(p, spec, max_side)):
        if item is None:
            flush()  # keep the order of the files
            results.append(Explanation(str(paths[key]), None, None, None, None, error=reason))
            continue
        pending.append((str(paths[key]), *item))
        if len(pending) == batch_size:
            flush()
    flush()
    return results
