"""Grad-CAM and anomaly-map overlays for image files: `keeneye explain` and the service's /explain.

The computation is keeneye.model.gradcam (where the run report can reach it too); here files are
decoded in runtime's pipeline, each model input prepared exactly as predict prepares it (same
reduced-size JPEG decode, same resize rule), so the probability an overlay shows is predict's.

    keeneye explain runs/<name> IMAGE... --out DIR
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable, Sequence

import cv2
import numpy as np
import pandas as pd

from keeneye.bundle import load_bundle
from keeneye.data.preprocess import InputSpec
from keeneye.data.decode import load_image
from keeneye.inference.anomaly import has_anomaly_feature, is_anomaly_bundle, stacked_explanation
from keeneye.inference.predictor import Predictor, expand_inputs
from keeneye.model.gradcam import (
    MAX_OVERLAY_SIDE, Explanation, GradCam, explain_batch, explain_files, fit_display, load_for_explaining, overlay_heatmap,
)
from keeneye.runtime.batches import iter_decoded

__all__ = ["GradCam", "Explanation", "overlay_heatmap", "explain_decoded", "explain_images", "explain", "with_probabilities"]


def explain_decoded(
    cam: GradCam, images: Sequence[np.ndarray], threshold: float, class_names: tuple[str, str],
    names: Sequence[str] | None = None, max_side: int = MAX_OVERLAY_SIDE, spec: InputSpec | None = None,
) -> list[Explanation]:
    """Grad-CAM for decoded RGB uint8 images of any size (one batch): what the server uses.

    `spec`: how the model input is made (the bundle's resize rule; default squash), as predict does.
    """
    spec = spec or InputSpec(cam.image_size)
    names = list(names) if names is not None else [f"image-{i}" for i in range(len(images))]
    prepared = np.stack([spec.prepare(image) for image in images])
    displays = [fit_display(image, max_side) for image in images]
    return explain_batch(cam, prepared, displays, threshold, class_names, names, spec)


def explain_images(
    model, paths: Sequence[str], threshold: float, class_names: tuple[str, str], batch_size: int = 16,
    max_side: int = MAX_OVERLAY_SIDE, cam: GradCam | None = None, spec: InputSpec | None = None,
) -> list[Explanation]:
    """Grad-CAM overlays for image files, in order, decoded in runtime's pipeline; a file that fails gets its reason.

    The model input is made exactly as predict makes it (same decode and resize, from `spec`), so
    the probability shown is predict's.
    """
    cam = cam or GradCam(model)
    spec = spec or InputSpec(cam.image_size)
    return explain_files(cam, paths, threshold, class_names, spec, batch_size, max_side,
                         decode=lambda items, load: iter_decoded(items, spec, prefetch=2 * batch_size, load=load))


def with_probabilities(explanations: list[Explanation], probabilities: Sequence[float], threshold: float,
                       class_names: tuple[str, str]) -> list[Explanation]:
    """The explained images (those without an error, in order) with the bundle's own probabilities and labels.

    For head.anomaly_feature bundles: Grad-CAM shows where the supervised head looked, while the
    probability also holds the one-class score, which only the Predictor's StackedEngine computes.
    """
    values = iter(probabilities)
    for item in explanations:
        if item.error is None:
            item.probability = float(next(values))
            item.label = class_names[1] if item.probability >= threshold else class_names[0]
    return explanations


def explain_anomaly_images(
    engine, paths: Sequence[str], class_names: tuple[str, str], image_size: int, max_side: int = MAX_OVERLAY_SIDE,
) -> list[Explanation]:
    """Anomaly-map overlays for a one-class bundle (its AnomalyEngine): patch distances, upsampled and smoothed.

    The heat map is in raw distance units over [0, 2 x threshold], so a good part stays cool and
    the colour means the same on every image (see model.patchcore.overlay_anomaly_map).
    """
    from keeneye.model.patchcore import overlay_anomaly_map

    negative, positive = class_names
    spec = InputSpec(image_size)
    results: list[Explanation] = []
    for key, item, reason in iter_decoded(enumerate(paths), spec, load=lambda p: load_for_explaining(p, spec, max_side)):
        if item is None:
            results.append(Explanation(str(paths[key]), None, None, None, None, error=reason))
            continue
        prepared, display = item
        maps, scores = engine.maps(prepared[None])
        heat = np.clip(maps[0] / (2.0 * engine.raw_threshold), 0.0, 1.0).astype(np.float32)
        results.append(Explanation(str(paths[key]), float(scores[0]), positive if scores[0] >= 0.5 else negative, heat,
                                   overlay_anomaly_map(display, maps[0], engine.raw_threshold)))
    return results


def stack_note(spec: InputSpec) -> str:
    """What the console says about a tiled or views bundle's overlays ('' for single images)."""
    if spec.tiles is not None:
        return (f"; {spec.tiles[0]}x{spec.tiles[1]} tiles, each mapped where it lies; the tile that decided is outlined "
                "and listed in the tile column, counted row by row from 0")
    return f"; the {spec.views} views' maps turned back and averaged" if spec.views > 1 else ""


def overlay_file_name(path: str, used: set[str], suffix: str = "gradcam") -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(path).stem) or "image"
    name = f"{stem}_{suffix}.png"
    counter = 2
    while name in used:
        name = f"{stem}-{counter}_{suffix}.png"
        counter += 1
    used.add(name)
    return name


def _save_overlay(folder: Path, used: set[str], path: str, overlay: np.ndarray | None, suffix: str) -> str | None:
    """Write one RGB overlay as `<stem>_<suffix>.png` in `folder` (None when there is none); its path."""
    if overlay is None:
        return None
    target = folder / overlay_file_name(path, used, suffix)
    cv2.imwrite(str(target), cv2.cvtColor(overlay, cv2.COLOR_RGB2BGR))
    return str(target)


def explain(run_dir: str | os.PathLike, inputs: Iterable[str | os.PathLike], out: str | os.PathLike, console=None) -> pd.DataFrame:
    """Write a Grad-CAM overlay PNG per image into `out`, and `explanations.csv` (path, probability, label, overlay,
    one_class_overlay: the one-class part's map, for head.anomaly_feature bundles; tile: the tile that decided, for
    tiled bundles; error)."""
    from rich.console import Console
    from rich.markup import escape

    console = console or Console(stderr=True)
    bundle = load_bundle(run_dir)
    paths, problems = expand_inputs(inputs)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    anomaly, stacked = is_anomaly_bundle(bundle), None  # stacked: a head.anomaly_feature bundle's StackedEngine
    if anomaly:  # one-class bundle: the anomaly map (distance of each patch to the good ones) is the explanation
        console.print(f"explaining {len(paths)} images with {bundle.path.name} (anomaly maps: patch distances to the good patches)")
        explanations = explain_anomaly_images(Predictor(bundle).engine, paths, bundle.class_names, bundle.image_size)
    else:
        console.print(f"explaining {len(paths)} images with {bundle.path.name} (Grad-CAM{stack_note(bundle.input_spec)})")
        explanations = explain_images(bundle.model, paths, bundle.threshold, bundle.class_names, spec=bundle.input_spec)
        if has_anomaly_feature(bundle):  # the probability also holds the one-class score: the Predictor's engine
            stacked = Predictor(bundle).engine
            console.print("the probability holds the one-class score too: its part is drawn beside Grad-CAM "
                          "(<name>_one_class.png: patch distances to the good patches)")
    rows, used = [], set()
    for item in explanations:
        one_class = None
        if stacked is not None and item.error is None:  # one patch pass gives the stacked probability and the map
            spec = bundle.input_spec
            probability, drawn = stacked_explanation(stacked, spec, bundle.threshold, spec.load(item.path),
                                                     fit_display(load_image(item.path), MAX_OVERLAY_SIDE))
            item = with_probabilities([item], [probability], bundle.threshold, bundle.class_names)[0]
            one_class = _save_overlay(folder, used, item.path, drawn, "one_class")
        rows.append({"path": item.path, "probability": item.probability, "label": item.label,
                     "overlay": _save_overlay(folder, used, item.path, item.overlay, "anomaly" if anomaly else "gradcam"),
                     "one_class_overlay": one_class, "tile": item.tile, "error": item.error})
    rows += [{"path": p["path"], "probability": None, "label": None, "overlay": None, "one_class_overlay": None, "tile": None,
              "error": p["error"]} for p in problems]
    columns = ["path", "probability", "label", "overlay", "one_class_overlay", "tile", "error"]
    frame = pd.DataFrame(rows, columns=columns).astype({"tile": "Int64"})
    frame.to_csv(folder / "explanations.csv", index=False)
    for row in frame[frame["error"].notna()].itertuples():
        console.print(f"[yellow]not explained:[/] {escape(str(row.path))}: {escape(str(row.error))}", highlight=False)
    console.print(f"{int(frame['overlay'].notna().sum())} overlays written to {escape(str(folder))} (explanations.csv lists them)")
    return frame
