"""Benchmark: do the Grad-CAM heat maps point at the defect? Magnetic-tile's masks, per feature mode (issue 12).

For each run folder of `benchmarks/magnetic_tile.py` (fold0 ... fold4, each a bundle whose testing
split is that group fold), `keeneye.explain.explain_images` explains the testing split's defect
images that the bundle calls defects (true positives: the map then shows the evidence for
"defect"), and each map is scored against the defect's mask (the ``MT_*/Imgs/*.png`` beside each
photo; keeneye never sees the masks):

* pointing game (Zhang et al., 2016): the map's peak lies on the mask or within 15 px of it, beside
  the share of the image within 15 px of the mask (what a peak at a random place would score);
* energy inside: the share of the map's sum that falls on the mask, beside the mask's share of the
  image (what a flat map would score).

For a bundle with the one-class score stacked in (head.anomaly_feature), the one-class part's map
(patch distances to the good patches, what `keeneye explain` draws beside Grad-CAM) is scored too.

Mean over the images of a fold, then mean +- sd over the folds.

    python benchmarks/magnetic_tile.py --set model.features=multi --set head.kind=logistic --out /tmp/multi.json
    python benchmarks/gradcam_masks.py --runs gap=<run_dir parent of fold0..4> --runs multi=<...> [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
TOLERANCE_PX = 15


def mask_of(photo: str, shape: tuple[int, int]) -> np.ndarray | None:
    """The defect mask beside a magnetic-tile photo, at `shape` (bool), or None when there is none."""
    path = Path(photo).with_suffix(".png")
    mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE) if path.is_file() else None
    if mask is None:
        return None
    return cv2.resize(mask, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST) > 127


def score_map(heat: np.ndarray, mask: np.ndarray) -> dict:
    """Pointing-game hit, energy on the mask and the mask's area share for one map."""
    peak = np.unravel_index(int(np.argmax(heat)), heat.shape)
    near = cv2.dilate(mask.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * TOLERANCE_PX + 1,) * 2)) > 0
    total = float(heat.sum())
    return {"hit": bool(near[peak]), "energy_inside": float(heat[mask].sum() / total) if total > 0 else 0.0,
            "mask_share": float(mask.mean()), "chance_hit": float(near.mean())}


def one_class_heat(predictor, spec, path: str) -> np.ndarray:
    """The one-class part's map of a head.anomaly_feature bundle over the image (patch distances, raw units)."""
    from keeneye.data.decode import load_image
    from keeneye.inference.anomaly import one_class_part_map

    image = load_image(path)
    return one_class_part_map(predictor.engine.scorer, spec, image, *image.shape[:2])


def score_fold(run_dir: Path) -> dict:
    from keeneye.bundle import load_bundle
    from keeneye.explain import explain_images
    from keeneye.inference.anomaly import has_anomaly_feature
    from keeneye.inference.predictor import Predictor

    bundle = load_bundle(run_dir)
    predictions = pd.read_csv(run_dir / "predictions.csv")
    positive = bundle.positive_class
    found = predictions[(predictions["label"] == positive) & (predictions["predicted"] == positive)]["path"].tolist()
    explained = explain_images(bundle.model, found, bundle.threshold, bundle.class_names, spec=bundle.input_spec, max_side=4096)
    predictor = Predictor(bundle) if has_anomaly_feature(bundle) else None
    scores, one_class = [], []
    for item in explained:
        mask = None if item.heatmap is None else mask_of(item.path, item.heatmap.shape)
        if mask is not None and mask.any():
            scores.append(score_map(item.heatmap, mask))
            if predictor is not None:  # the stacked bundle's other part: where the patches are far from the good ones
                one_class.append(score_map(one_class_heat(predictor, bundle.input_spec, item.path), mask))
    frame, parts = pd.DataFrame(scores), pd.DataFrame(one_class)
    return {"n": len(frame), "pointing": float(frame["hit"].mean()), "energy_inside": float(frame["energy_inside"].mean()),
            "one_class_pointing": float(parts["hit"].mean()) if len(parts) else None,
            "mask_share": float(frame["mask_share"].mean()), "chance_hit": float(frame["chance_hit"].mean()), "features": bundle.metadata["backbone"].get("features", "gap"),
            "views": bundle.input_spec.views}


def mean_sd(values: list[float]) -> str:
    return f"{statistics.fmean(values):.3f} +- {statistics.stdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", action="append", required=True, metavar="NAME=DIR",
                        help="a mode's name and the folder holding its fold0 ... fold4 run folders")
    parser.add_argument("--out", type=Path, default=RESULTS / "gradcam_masks.json")
    args = parser.parse_args()
    results = {}
    for item in args.runs:
        name, folder = item.split("=", 1)
        folds = {run.name: score_fold(run) for run in sorted(Path(folder).glob("fold*")) if (run / "metadata.json").is_file()}
        for fold, r in folds.items():
            print(f"{name} {fold}: {r['n']} true positives, pointing {r['pointing']:.3f} (chance {r['chance_hit']:.3f}), energy on the mask "
                  f"{r['energy_inside']:.3f} (mask share {r['mask_share']:.3f})"
                  + ("" if r["one_class_pointing"] is None else f"; one-class part's map: pointing {r['one_class_pointing']:.3f}"),
                  flush=True)
        summary = {m: mean_sd([r[m] for r in folds.values()]) for m in ("pointing", "chance_hit", "energy_inside", "mask_share")}
        stacked = [k for k, r in folds.items() if r["one_class_pointing"] is not None]
        if stacked:  # the folds whose bundle holds the one-class score: both maps, paired
            summary["stacked_folds"] = stacked
            summary["one_class_pointing"] = mean_sd([folds[k]["one_class_pointing"] for k in stacked])
            summary["pointing_in_stacked_folds"] = mean_sd([folds[k]["pointing"] for k in stacked])
        print(f"{name}: pointing {summary['pointing']} (chance {summary['chance_hit']}), energy on the mask {summary['energy_inside']} "
              f"(mask share {summary['mask_share']})" + (f"; in the {len(stacked)} stacked folds Grad-CAM "
              f"{summary['pointing_in_stacked_folds']}, the one-class part's map {summary['one_class_pointing']}" if stacked else ""),
              flush=True)
        results[name] = {"folder": folder, "folds": folds, "summary": summary}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"tolerance_px": TOLERANCE_PX, "modes": results}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
