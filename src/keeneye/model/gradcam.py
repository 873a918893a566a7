"""Grad-CAM: where the model looked when it made its decision (the computation; files and the CLI in keeneye.explain).

The bundle's ``model.keras`` is ``Input(uint8) -> feature_extractor -> head``, where
``feature_extractor`` is ``Rescaling -> MobileNetV2 (functional) -> pooling`` (model.features) and
``head`` is a few Dense layers ending in one sigmoid unit; with tiles or views the extractor runs
on every square of the input stack and pools over the squares (max over tiles, mean over views).
Grad-CAM (Selvaraju et al., 2017) takes a convolutional feature map ``A``, the gradient of the
decision score ``s`` with respect to it, weights each channel by its mean gradient and keeps the
positive part: ``relu(sum_k mean_ij(ds/dA_ijk) * A_k)``.

The map ``A`` is the one the pooled features are read from: MobileNetV2's output (7x7 at 224 px)
for "gap" and "gap+gmp". "multi" also pools MID_LEVEL_LAYER (14x14), and the head's logit is then
the sum of a mid-level part and a last-block part (exactly so for the logistic head): each part's
map is weighed by the gradient of its own pooled features (the last block is computed from the
mid-level map outside the gradient tape), and the two weighted maps are added on the finer grid
before the ReLU. Measured on magnetic-tile's defect masks (benchmarks/gradcam_masks.py), that
points at the defect far more often than weighing the mid-level map by its whole gradient, which
also runs back through the last block (pointing game 0.44 against 0.16), and a little more often
than the last block's map alone (0.39). "multi+cov" adds TEXTURE_LAYER's map (28x28) the same way,
the finest of three (not measured against the masks).

With tiles or views each square gets its map (one backward pass through the pooling
over squares, so a tile that did not decide gets little), and `InputSpec.lay_over_image` puts the
maps back where the squares came from. With tiles, the tile that decided is the one without which
the score for the predicted class falls most (the head on the features pooled over the other
tiles); the overlay outlines it.

The score is the head's *logit* (before the sigmoid), signed for the predicted class: ``+logit``
when the image is called positive, ``-logit`` when negative. The logit keeps its gradient where
the probability saturates at 0 or 1 (exactly the confident mistakes one wants to look at).
The map is computed on the model input, prepared exactly as predict prepares it (same decode,
same resize: the probability shown is predict's), and laid back over the original image.

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
from keeneye.data.preprocess import InputSpec, tile_boxes
from keeneye.errors import BundleError
from keeneye.model.decision import predict_labels

MAX_OVERLAY_SIDE = 512


@dataclass
class Explanation:
    """One image's explanation, or the reason it has none (`error`)."""

    path: str
    probability: float | None
    label: str | None
    heatmap: np.ndarray | None  # float32 in [0, 1] laid over the image (at the size of `overlay`)
    overlay: np.ndarray | None  # RGB uint8
    error: str | None = None
    tile: int | None = None  # tiled bundles: the tile that decided (row by row from 0), outlined on the overlay


@dataclass
class CamMaps:
    """Grad-CAM of one batch: per image and square of its input stack."""

    maps: np.ndarray  # (N, squares, h, w) float32, each image's largest value 1 (0 where nothing argued for the class)
    probabilities: np.ndarray  # (N,)
    shares: np.ndarray  # (N, squares): how far the signed logit falls without that square (zeros for a single image)


class GradCam:
    """Grad-CAM for a keeneye classifier (a loaded bundle model or the one train just built): every
    model.features mode, single images or stacks of tiles or views."""

    def __init__(self, model) -> None:
        import keras

        try:
            extractor, self.across, self.squares = self._per_square(model)
            head = model.get_layer("head")
            self.preprocess = extractor.get_layer("mobilenet_v2_preprocess")
            backbone = next(layer for layer in extractor.layers if isinstance(layer, keras.Model))
            self.to_maps, self.pool = self._map_and_pooling(extractor, backbone)
            output = head.get_layer("probability")
        except (ValueError, StopIteration) as exc:
            raise BundleError(
                "Grad-CAM needs a keeneye classifier (feature_extractor with a MobileNetV2 inside, then head); "
                f"this model is laid out differently ({exc})."
            ) from None
        self.hidden = keras.Model(head.inputs, output.input, name="head_hidden")
        self.kernel, self.bias = output.kernel, output.bias
        self.image_size = int(extractor.input_shape[1])

    @staticmethod
    def _per_square(model):
        """(the extractor of one square, the pooling over the squares or None, squares per input) of a classifier."""
        from keeneye.model.backbone import STACKED_EXTRACTORS, per_square  # keras: imported only when Grad-CAM runs

        names = {layer.name for layer in model.layers}
        return per_square(model.get_layer(next((n for n in STACKED_EXTRACTORS if n in names), "feature_extractor")))

    @staticmethod
    def _map_and_pooling(extractor, backbone) -> tuple[Callable, Callable]:
        """(scaled image -> the maps the pooled features are read from, those maps -> the extractor's pooled features).

        "multi" reads two maps: the mid-level one and the last block's; "multi+cov" also TEXTURE_LAYER's, the
        finest. Each is computed from the one before (outside the gradient tape, so that each map's gradient is
        that of its own pooled part).
        """
        import keras

        from keeneye.model.backbone import BLOCK_OF_MAP, embedding_parts, join_parts, pooled_maps

        blocks = [BLOCK_OF_MAP[prefix] for prefix in pooled_maps(extractor)[:-1]]  # the finer maps, finest first
        cuts = [backbone.inputs, *(backbone.get_layer(block).output for block in blocks), backbone.outputs[-1]]
        steps = [keras.Model(a, b, name=f"grad_cam_step_{i}") for i, (a, b) in enumerate(zip(cuts, cuts[1:]))]
        parts = embedding_parts(extractor)

        def chained_maps(scaled):
            maps = [scaled]
            for step in steps:
                maps.append(step(maps[-1], training=False))
            return maps[1:]

        def pooled(maps):
            return join_parts(extractor, [pool(maps[i]) for _, i, pool in parts])

        return chained_maps, pooled

    def _logit(self, pooled):
        """The head's logit (N,) for pooled features: its hidden layers, then the output unit without the sigmoid."""
        import tensorflow as tf

        hidden = self.hidden(pooled, training=False)
        return tf.reshape(tf.matmul(hidden, tf.cast(self.kernel, hidden.dtype)) + tf.cast(self.bias, hidden.dtype), [-1])

    def explain(self, batch: np.ndarray, threshold: float) -> CamMaps:
        """Maps for the class each image is predicted as (positive iff probability >= threshold)."""
        import tensorflow as tf

        x = tf.convert_to_tensor(np.asarray(batch, dtype=np.uint8))
        n, size = int(x.shape[0]), self.image_size
        maps = self.to_maps(self.preprocess(tf.reshape(x, (n * self.squares, size, size, 3))))
        with tf.GradientTape() as tape:
            tape.watch(maps)
            features = self.pool(maps)
            pooled = features if self.across is None else self.across(tf.reshape(features, (n, self.squares, -1)))
            logit = self._logit(pooled)
            probability = tf.sigmoid(logit)
            sign = tf.stop_gradient(tf.where(probability >= threshold, 1.0, -1.0))  # predict_labels' rule, inside the graph
            score = tf.reduce_sum(logit * sign)
        cams = np.maximum(self._weighted(maps, tape.gradient(score, maps)), 0.0).reshape(n, self.squares, *maps[0].shape[1:3])
        peak = cams.reshape(n, -1).max(axis=1)[:, None, None, None]
        cams = np.where(peak > 0, cams / np.maximum(peak, 1e-12), 0.0).astype(np.float32)
        per_square = tf.reshape(features, (n, self.squares, -1))
        return CamMaps(cams, probability.numpy().astype(np.float64), self._shares(per_square, logit * sign, sign))

    @staticmethod
    def _weighted(maps, gradients) -> np.ndarray:
        """sum_k mean_ij(ds/dA_ijk) * A_k for every map, brought to the first (finest) map's grid and added, before the ReLU."""
        height, width = (int(d) for d in maps[0].shape[1:3])
        total = np.zeros((int(maps[0].shape[0]), height, width), np.float32)
        for features, gradient in zip(maps, gradients):
            weighted = np.einsum("nhwc,nc->nhw", features.numpy(), gradient.numpy().mean(axis=(1, 2))).astype(np.float32)
            if weighted.shape[1:] != (height, width):
                weighted = np.stack([cv2.resize(m, (width, height), interpolation=cv2.INTER_LINEAR) for m in weighted])
            total += weighted
        return total

    def _shares(self, per_square, signed_logit, sign) -> np.ndarray:
        """(N, squares): how much the signed logit falls when a square is left out of the pooling over squares.

        Leaving a tile out asks the question directly (would the decision stand without it?), where
        gradient x features would also credit a tile for features that are large on every tile.
        """
        import tensorflow as tf

        n = int(per_square.shape[0])
        if self.across is None or self.squares == 1:
            return np.zeros((n, 1), np.float32)
        falls = []
        for square in range(self.squares):
            others = tf.concat([per_square[:, :square], per_square[:, square + 1 :]], axis=1)
            falls.append((signed_logit - self._logit(self.across(others)) * sign).numpy())
        return np.stack(falls, axis=1)


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


def lay_out(spec: InputSpec, maps: np.ndarray, display: np.ndarray) -> np.ndarray:
    """One image's square maps laid over its display image, largest value 1."""
    heat = np.clip(spec.lay_over_image(maps, *display.shape[:2]), 0.0, None)
    peak = float(heat.max())
    return (heat / peak if peak > 0 else heat).astype(np.float32)


def outline_tile(overlay: np.ndarray, spec: InputSpec, tile: int) -> np.ndarray:
    """The overlay with tile `tile` of the spec's grid outlined in white."""
    height, width = overlay.shape[:2]
    top, left, side = tile_boxes(height, width, *spec.tiles, spec.overlap)[tile]
    thickness = max(1, round(min(height, width) / 120))
    return cv2.rectangle(overlay.copy(), (max(left, 0), max(top, 0)),
                         (min(left + side, width) - 1, min(top + side, height) - 1), (255, 255, 255), thickness)


def explain_batch(
    cam: GradCam, prepared: np.ndarray, displays: Sequence[np.ndarray], threshold: float, class_names: tuple[str, str],
    names: Sequence[str], spec: InputSpec | None = None,
) -> list[Explanation]:
    """Grad-CAM for model inputs (`prepared`, made by `spec`), drawn over the images in `displays` (any size)."""
    spec = spec or InputSpec(cam.image_size)
    if spec.passes != cam.squares:
        raise BundleError(f"the model takes {cam.squares} squares per image, the input spec makes {spec.passes}")
    negative, positive = class_names
    found = cam.explain(prepared, threshold)
    labels = predict_labels(found.probabilities, threshold)
    explanations = []
    for name, display, maps, shares, probability, label in zip(names, displays, found.maps, found.shares, found.probabilities, labels):
        heat = lay_out(spec, maps, display)
        overlay, tile = overlay_heatmap(display, heat), None
        if spec.tiles is not None:
            tile = int(np.argmax(shares))
            overlay = outline_tile(overlay, spec, tile)
        explanations.append(Explanation(path=name, probability=float(probability), label=positive if label == 1 else negative,
                                        heatmap=heat, overlay=overlay, tile=tile))
    return explanations


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
            results.extend(explain_batch(cam, np.stack(prepared), displays, threshold, class_names, names, spec))
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
