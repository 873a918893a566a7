"""Benchmark: small defects on long images, tiled (model.tiles) vs squashed, in one run.

Built from real magnetic-tile photos in a temporary folder (never in the repository):
  * background: good tiles (MT_Free) resized to the canvas height and laid side by side, cropped to
    a long canvas (default 448 x 1120 px, aspect 2.5);
  * defect image: one real defect, cut from a defect photo around its mask (the .png beside it) and
    scaled so that its box covers about 1% of the canvas, pasted at a random place;
  * good image: the same kind of patch, cut from another good photo, pasted the same way (so the
    seam of a pasted patch is in both classes and only the defect tells them apart).
Sources are split by the group folds of folds_5.csv: training images are built from folds 1-4 only,
testing images from fold 0 only; keeneye carves validation from training. Then `keeneye train` runs
once per mode on the same files, and the test ROC AUC / AP / F1 of each are printed side by side.

    python benchmarks/long_images.py [--train 160] [--test 80] [--modes gap multi multi/tiles=auto] [--explain]
        [--out benchmarks/results/long_images.json]

--explain: Grad-CAM of each mode on the test split's true positives, against the pasted defect's box.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
MT = REPO.parent / "shared" / "data" / "magnetic-tile"
WEIGHTS = REPO.parent / "shared" / "weights" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"


def read(path: str) -> np.ndarray:
    import cv2

    return cv2.cvtColor(cv2.imread(path, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def background(rng: np.random.Generator, goods: list[str], height: int, width: int) -> np.ndarray:
    import cv2

    parts, filled = [], 0
    while filled < width:
        image = read(goods[rng.integers(len(goods))])
        scaled = cv2.resize(image, (max(1, round(image.shape[1] * height / image.shape[0])), height), interpolation=cv2.INTER_AREA)
        parts.append(scaled)
        filled += scaled.shape[1]
    return np.ascontiguousarray(np.concatenate(parts, axis=1)[:, :width])


def defect_patch(path: str) -> np.ndarray | None:
    """The defect's box (mask bounding box, a few pixels of margin) from a defect photo."""
    import cv2

    mask = cv2.imread(str(Path(path).with_suffix(".png")), cv2.IMREAD_GRAYSCALE)
    if mask is None or not (mask > 0).any():
        return None
    ys, xs = np.nonzero(mask > 0)
    image = read(path)
    top, bottom = max(0, ys.min() - 4), min(image.shape[0], ys.max() + 5)
    left, right = max(0, xs.min() - 4), min(image.shape[1], xs.max() + 5)
    return image[top:bottom, left:right]


def good_patch(rng: np.random.Generator, path: str, shape: tuple[int, int]) -> np.ndarray:
    image = read(path)
    h, w = min(shape[0], image.shape[0]), min(shape[1], image.shape[1])
    top, left = rng.integers(image.shape[0] - h + 1), rng.integers(image.shape[1] - w + 1)
    return image[top : top + h, left : left + w]


def paste(rng: np.random.Generator, canvas: np.ndarray, patch: np.ndarray, area_fraction: float) -> tuple[np.ndarray, list[int]]:
    """The canvas with the patch pasted at a random place, and that place: [top, left, height, width]."""
    import cv2

    scale = np.sqrt(area_fraction * canvas.shape[0] * canvas.shape[1] / (patch.shape[0] * patch.shape[1]))
    h = int(np.clip(round(patch.shape[0] * scale), 4, canvas.shape[0] // 2))
    w = int(np.clip(round(patch.shape[1] * scale), 4, canvas.shape[1] // 2))
    patch = cv2.resize(patch, (w, h), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    top, left = rng.integers(canvas.shape[0] - h + 1), rng.integers(canvas.shape[1] - w + 1)
    out = canvas.copy()
    out[top : top + h, left : left + w] = patch
    return out, [int(top), int(left), h, w]


def build(folder: Path, n_train: int, n_test: int, height: int, width: int, area: float, seed: int) -> Path:
    import cv2

    folds = pd.read_csv(MT / "folds_5.csv")
    folds["path"] = [str(MT / p) for p in folds["path"]]
    rng = np.random.default_rng(seed)
    rows, boxes = [], {}
    for split, count, in_split in (("training", n_train, folds["fold"] != 0), ("testing", n_test, folds["fold"] == 0)):
        goods = folds.loc[in_split & (folds["binary_label"] == 0), "path"].tolist()
        defects = [p for p in folds.loc[in_split & (folds["binary_label"] == 1), "path"]]
        patches = [p for p in (defect_patch(d) for d in defects) if p is not None and min(p.shape[:2]) >= 4]
        for index in range(count):
            label = "defect" if index % 2 else "good"
            canvas = background(rng, goods, height, width)
            patch = patches[rng.integers(len(patches))]
            if label == "good":
                patch = good_patch(rng, goods[rng.integers(len(goods))], patch.shape[:2])
            image, box = paste(rng, canvas, patch, area)
            path = folder / split / label / f"{index:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
            rows.append({"path": str(path), "label": label, "split": split})
            boxes[str(path)] = box
    manifest = folder / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    (folder / "boxes.json").write_text(json.dumps(boxes))
    return manifest


def train(manifest: Path, work: Path, mode: str) -> dict:
    from rich.console import Console

    from keeneye import api
    from keeneye.config import config_from_dict

    features, *rest = mode.split("/")
    tiles = next((p.split("=", 1)[1] for p in rest if p.startswith("tiles=")), "none")
    config = config_from_dict({
        "output_dir": str(work / "runs"), "run_name": mode.replace("/", "_").replace("=", "-").replace("+", "_"),
        "positive_class": "defect", "data": {"manifest_path": str(manifest)},
        "model": {"weights": str(WEIGHTS), "image_size": 224, "features": features, "tiles": tiles},
        "training": {"seed": 0, "class_weight": "balanced"},
    })
    started = time.perf_counter()
    result = api.train(config, console=Console(stderr=True))
    metadata = json.loads((result.run_dir / "metadata.json").read_text())
    at = result.metrics["at_threshold"]
    return {"auc": result.metrics["roc_auc"], "ap": result.metrics["average_precision"], "f1": at["f1"],
            "threshold": result.threshold, "input": metadata["input"], "seconds": time.perf_counter() - started,
            "embedding_s": result.timings.get("scan_and_embeddings_s"), "run_dir": str(result.run_dir)}


def explained_boxes(run_dir: Path, boxes: dict[str, list[int]], tolerance: int = 15) -> dict:
    """Grad-CAM of the test split's true positives against the pasted defect's box: the pointing game (the map's peak
    within `tolerance` px of the box) and, with tiles, how often the tile named as the one that decided holds the box's
    centre (beside chance: the share of the grid's tiles that hold it)."""
    from keeneye.bundle import load_bundle
    from keeneye.data.preprocess import tile_boxes
    from keeneye.explain import explain_images

    bundle = load_bundle(run_dir)
    predictions = pd.read_csv(run_dir / "predictions.csv")
    found = predictions[(predictions["label"] == "defect") & (predictions["predicted"] == "defect")]["path"].tolist()
    explained = explain_images(bundle.model, found, bundle.threshold, bundle.class_names, spec=bundle.input_spec, max_side=4096)
    hits, tiles_hit, tiles_chance = [], [], []
    for item in explained:
        top, left, h, w = boxes[item.path]
        y, x = np.unravel_index(int(np.argmax(item.heatmap)), item.heatmap.shape)
        hits.append(top - tolerance <= y < top + h + tolerance and left - tolerance <= x < left + w + tolerance)
        if item.tile is not None:
            centre = (top + h / 2, left + w / 2)
            holds = [t <= centre[0] < t + side and l <= centre[1] < l + side
                     for t, l, side in tile_boxes(*item.heatmap.shape, *bundle.input_spec.tiles, bundle.input_spec.overlap)]
            tiles_hit.append(holds[item.tile])
            tiles_chance.append(float(np.mean(holds)))
    return {"n": len(hits), "pointing": float(np.mean(hits)) if hits else None,
            "tile_holds_defect": float(np.mean(tiles_hit)) if tiles_hit else None,
            "tile_chance": float(np.mean(tiles_chance)) if tiles_chance else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=160)
    parser.add_argument("--test", type=int, default=80)
    parser.add_argument("--height", type=int, default=448)
    parser.add_argument("--width", type=int, default=1120)
    parser.add_argument("--area", type=float, default=0.01, help="defect box area / image area")
    parser.add_argument("--modes", nargs="+", default=["gap", "multi", "multi/tiles=auto"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--explain", action="store_true",
                        help="also score each mode's Grad-CAM on the test true positives against the pasted defect's box")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "long_images.json")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "src"))
    results = {}
    with tempfile.TemporaryDirectory(prefix="keeneye-long-images-") as tmp:
        work = Path(tmp)
        manifest = build(work / "data", args.train, args.test, args.height, args.width, args.area, args.seed)
        print(f"built {args.train} training + {args.test} testing images of {args.width}x{args.height} px in {work}", flush=True)
        for mode in args.modes:
            results[mode] = train(manifest, work, mode)
            print(f"{mode}: AUC {results[mode]['auc']:.3f} AP {results[mode]['ap']:.3f} F1 {results[mode]['f1']:.3f}", flush=True)
            if args.explain:
                boxes = json.loads((manifest.parent / "boxes.json").read_text())
                results[mode]["explained"] = found = explained_boxes(Path(results[mode]["run_dir"]), boxes)
                print(f"{mode}: Grad-CAM of {found['n']} true positives: peak on the defect (15 px) {found['pointing']}, "
                      f"tile named holds the defect {found['tile_holds_defect']} (chance {found['tile_chance']})", flush=True)
    report = {"settings": vars(args) | {"out": str(args.out)}, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nlong images ({args.width}x{args.height}, defect box {args.area:.0%} of the area), test split")
    print(f"{'mode':22} {'AUC':>7} {'AP':>7} {'F1':>7} {'input':>22} {'train s':>8}")
    for mode, row in results.items():
        tiles = row["input"].get("tiles")
        shown = f"{tiles['rows']}x{tiles['cols']} tiles" if tiles else f"squashed {row['input']['image_size']}"
        print(f"{mode:22} {row['auc']:7.3f} {row['ap']:7.3f} {row['f1']:7.3f} {shown:>22} {row['seconds']:8.0f}")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
