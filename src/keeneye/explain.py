"""Grad-CAM: where the model looked when it made its decision.

The bundle's ``model.keras`` is ``Input(uint8) -> feature_extractor -> head``, where
``feature_extractor`` is ``Rescaling -> MobileNetV2 (functional) -> GlobalAveragePooling2D`` and
``head`` is a few Dense layers ending in one sigmoid unit. Grad-CAM (Selvaraju et al., 2017) takes
the last convolutional feature map ``A`` (MobileNetV2's output, e.g. 7x7x1280 at 224 px), the
gradient of the decision score ``s`` with respect to it, weights each channel by its mean
gradient and keeps the positive part: ``relu(sum_k mean_ij(ds/dA_ijk) * A_k)``.

The score is the head's *logit* (before the sigmoid), signed for the predicted class: ``+logit``
when the image is called positive, ``-logit`` when negative. The logit keeps its gradient where
the probability saturates at 0 or 1 (exactly the confident mistakes one wants to look at).
The map is computed on the squashed image_size x image_size input and stretched back over the
original image.

    keeneye explain runs/<name> IMAGE... --out DIR
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import cv2
import numpy as np
import pandas as pd

from keeneye.data.decode import DecodeError, load_image, resize_square
from keeneye.errors import BundleError

__all__ = ["GradCam", "Explanation", "overlay_heatmap", "explain_decoded", "explain_images", "explain"]

MAX_OVERLAY_SIDE = 512


@dataclass
class Explanation:
    path: str
    probability: float | None
    label: str | None
    heatmap: np.ndarray | None  # float32 in [0, 1], at the original image's size
    overlay: np.ndarray | None  # RGB uint8
    error: str | None = None


class GradCam:
    """Grad-CAM for a keeneye classifier (a loaded bundle model or the one train just built)."""

    def __init__(self, model) -> None:
        import keras

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
        second, mid-level map too and tiled models several images: not supported, ValueError)."""
        import keras

        pool = extractor.get_layer("features")
        if isinstance(pool, keras.layers.GlobalAveragePooling2D):
            return pool
        names = {layer.name for layer in extractor.layers}
        if isinstance(pool, keras.layers.Concatenate) and names >= {"last_avg", "last_max"} and "mid_avg" not in names:
            average, maximum = extractor.get_layer("last_avg"), extractor.get_layer("last_max")
            return lambda features: pool([average(features), maximum(features)])
        raise ValueError('Grad-CAM is implemented for model.features "gap" and "gap+gmp" without tiles')

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
            sign = tf.stop_gradient(tf.where(probability >= threshold, 1.0, -1.0))
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


def _display(image: np.ndarray, max_side: int) -> np.ndarray:
    height, width = image.shape[:2]
    scale = max_side / max(height, width)
    if scale >= 1:
        return image
    return cv2.resize(image, (max(1, round(width * scale)), max(1, round(height * scale))), interpolation=cv2.INTER_AREA)


def explain_decoded(
    cam: GradCam, images: Sequence[np.ndarray], threshold: float, class_names: tuple[str, str],
    names: Sequence[str] | None = None, max_side: int = MAX_OVERLAY_SIDE,
) -> list[Explanation]:
    """Grad-CAM for decoded RGB uint8 images of any size (one batch): what files and the server both use."""
    negative, positive = class_names
    names = list(names) if names is not None else [f"image-{i}" for i in range(len(images))]
    batch = np.stack([resize_square(image, cam.image_size) for image in images])
    maps, probabilities = cam.explain(batch, threshold)
    return [
        Explanation(path=name, probability=float(probability), label=positive if probability >= threshold else negative,
                    heatmap=heat, overlay=overlay_heatmap(_display(image, max_side), heat))
        for name, image, heat, probability in zip(names, images, maps, probabilities)
    ]


def explain_images(
    model, paths: Sequence[str], threshold: float, class_names: tuple[str, str], batch_size: int = 16,
    max_side: int = MAX_OVERLAY_SIDE, cam: GradCam | None = None,
) -> list[Explanation]:
    """Grad-CAM overlays for image files, in order; a file that cannot be decoded gets its reason."""
    cam = cam or GradCam(model)
    results: list[Explanation | None] = [None] * len(paths)
    pending: list[tuple[int, np.ndarray]] = []

    def flush() -> None:
        if not pending:
            return
        explained = explain_decoded(cam, [image for _, image in pending], threshold, class_names,
                                    [str(paths[index]) for index, _ in pending], max_side)
        for (index, _), item in zip(pending, explained):
            results[index] = item
        pending.clear()

    for index, path in enumerate(paths):
        try:
            pending.append((index, load_image(path)))
        except DecodeError as exc:
            results[index] = Explanation(str(path), None, None, None, None, error=exc.reason)
        if len(pending) == batch_size:
            flush()
    flush()
    return [r for r in results if r is not None]


def explain_anomaly_images(
    engine, paths: Sequence[str], class_names: tuple[str, str], image_size: int, max_side: int = MAX_OVERLAY_SIDE,
) -> list[Explanation]:
    """Anomaly-map overlays for a one-class bundle (its AnomalyEngine): patch distances, upsampled and smoothed.

    The heat map is in raw distance units over [0, 2 x threshold], so a good part stays cool and
    the colour means the same on every image (see model.patchcore.overlay_anomaly_map).
    """
    from keeneye.model.patchcore import overlay_anomaly_map

    negative, positive = class_names
    results: list[Explanation] = []
    for path in paths:
        try:
            image = load_image(path)
        except DecodeError as exc:
            results.append(Explanation(str(path), None, None, None, None, error=exc.reason))
            continue
        maps, scores = engine.maps(resize_square(image, image_size)[None])
        heat = np.clip(maps[0] / (2.0 * engine.raw_threshold), 0.0, 1.0).astype(np.float32)
        results.append(Explanation(str(path), float(scores[0]), positive if scores[0] >= 0.5 else negative, heat,
                                   overlay_anomaly_map(_display(image, max_side), maps[0], engine.raw_threshold)))
    return results


def overlay_file_name(path: str, used: set[str], suffix: str = "gradcam") -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(path).stem) or "image"
    name = f"{stem}_{suffix}.png"
    counter = 2
    while name in used:
        name = f"{stem}-{counter}_{suffix}.png"
        counter += 1
    used.add(name)
    return name


def explain(run_dir: str | os.PathLike, inputs: Iterable[str | os.PathLike], out: str | os.PathLike, console=None) -> pd.DataFrame:
    """Write a Grad-CAM overlay PNG per image into `out`, and `explanations.csv` (path, probability, label, overlay, error)."""
    from rich.console import Console
    from rich.markup import escape

    from keeneye.bundle import load_bundle
    from keeneye.inference.anomaly import is_anomaly_bundle
    from keeneye.inference.predictor import Predictor, expand_inputs

    console = console or Console(stderr=True)
    bundle = load_bundle(run_dir)
    paths, problems = expand_inputs(inputs)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    anomaly = is_anomaly_bundle(bundle)
    if anomaly:  # one-class bundle: the anomaly map (distance of each patch to the good ones) is the explanation
        console.print(f"explaining {len(paths)} images with {bundle.path.name} (anomaly maps: patch distances to the good patches)")
        explanations = explain_anomaly_images(Predictor(bundle).engine, paths, bundle.class_names, bundle.image_size)
    else:
        console.print(f"explaining {len(paths)} images with {bundle.path.name} (Grad-CAM on the last MobileNetV2 feature map)")
        explanations = explain_images(bundle.model, paths, bundle.threshold, bundle.class_names)
    rows, used = [], set()
    for item in explanations:
        overlay_path = None
        if item.overlay is not None:
            overlay_path = folder / overlay_file_name(item.path, used, "anomaly" if anomaly else "gradcam")
            cv2.imwrite(str(overlay_path), cv2.cvtColor(item.overlay, cv2.COLOR_RGB2BGR))
        rows.append({"path": item.path, "probability": item.probability, "label": item.label,
                     "overlay": None if overlay_path is None else str(overlay_path), "error": item.error})
    rows += [{"path": p["path"], "probability": None, "label": None, "overlay": None, "error": p["error"]} for p in problems]
    frame = pd.DataFrame(rows, columns=["path", "probability", "label", "overlay", "error"])
    frame.to_csv(folder / "explanations.csv", index=False)
    for row in frame[frame["error"].notna()].itertuples():
        console.print(f"[yellow]not explained:[/] {escape(str(row.path))}: {escape(str(row.error))}", highlight=False)
    console.print(f"{int(frame['overlay'].notna().sum())} overlays written to {escape(str(folder))} (explanations.csv lists them)")
    return frame
