"""Benchmark: which MobileNetV2 blocks and poolings separate magnetic-tile defects (frozen, one pass per size).

One backbone pass per input size stores the average, maximum and generalized-mean (p=3) pooling of
several blocks (stride 4 to 32) of every magnetic-tile image (squash, full decode, as keeneye does by
default); then every feature set (a list of block/pool columns) is judged by the protocol of
benchmarks/magnetic_tile.py without the rest of train: fold k of folds_5.csv is testing; on the other
four, 5 inner group folds (keeneye's crossval.group_folds on the given groups) choose the logistic
head's C (pooled out-of-fold AP, keeneye's cross_validate_logistic) and the threshold (out of fold,
keeneye's choose_threshold); the refit at that C on all four scores the test fold. Nothing is chosen
on a test fold. Printed and saved: mean +- sd of test F1, ROC AUC, AP, and the signed and absolute gap
between the cross-validated F1 estimate and the test F1.

    python benchmarks/feature_layers.py [--sizes 224 320] [--sets multi multi+b6 ...] [--cached KEY:DIM ...]
        [--views 1|2|4|8] [--contrast none|standard|stretch] [--out FILE]

The pooled features of a size are stored under ~/.cache/keeneye/feature-layers (not keeneye's
embedding cache: these are many more columns than any model.features mode).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
MT = SHARED / "data" / "magnetic-tile"
WEIGHTS = SHARED / "weights" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
CACHE = Path.home() / ".cache" / "keeneye" / "feature-layers"
BLOCKS = {"b3": "block_3_expand_relu", "b6": "block_6_expand_relu", "b10": "block_10_expand_relu",
          "b13": "block_13_expand_relu", "b16": "block_16_expand_relu", "last": "out_relu"}
POOLS = ("avg", "max", "gem")
#: Feature sets: lists of "block_pool" columns. gap / gap+gmp / multi are keeneye's model.features modes.
SETS = {
    "gap": ["last_avg"],
    "gap+gmp": ["last_avg", "last_max"],
    "multi": ["b13_avg", "b13_max", "last_avg", "last_max"],
    "multi+b6": ["b6_avg", "b6_max", "b13_avg", "b13_max", "last_avg", "last_max"],
    "multi+b10": ["b10_avg", "b10_max", "b13_avg", "b13_max", "last_avg", "last_max"],
    "multi+b16": ["b13_avg", "b13_max", "b16_avg", "b16_max", "last_avg", "last_max"],
    "mid": ["b13_avg", "b13_max"],
    "mid+b6": ["b6_avg", "b6_max", "b13_avg", "b13_max"],
    "gem-multi": ["b13_gem", "last_gem"],
    "gem+multi": ["b13_avg", "b13_max", "b13_gem", "last_avg", "last_max", "last_gem"],
    "all": [f"{b}_{p}" for b in BLOCKS for p in POOLS],
}


def magnetic_tile_folds() -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """The magnetic-tile images of folds_5.csv: (paths, binary labels, tile groups, test fold of each image)."""
    frame = pd.read_csv(MT / "folds_5.csv")
    frame = frame[frame["path"].str.lower().str.endswith(".jpg")].reset_index(drop=True)
    labels, groups, folds = frame["binary_label"].to_numpy().astype(int), frame["group"].to_numpy(), frame["fold"].to_numpy()
    return [str(MT / p) for p in frame["path"]], labels, groups, folds


def imagenet_mobilenet(size: int = 224):
    """MobileNetV2 (alpha 1, no top) with the shared ImageNet weights: the backbone of every probe here."""
    import keras

    base = keras.applications.MobileNetV2(input_shape=(size, size, 3), alpha=1.0, include_top=False, weights=None)
    base.load_weights(str(WEIGHTS))
    return base


def extractor(size: int):
    import keras

    base = imagenet_mobilenet(size)
    image = keras.Input((size, size, 3), dtype="uint8")
    x = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0)(image)
    inner = keras.Model(base.inputs, [base.get_layer(layer).output for layer in BLOCKS.values()])
    outputs = {}
    for name, tensor in zip(BLOCKS, inner(x, training=False)):
        outputs[f"{name}_avg"] = keras.ops.mean(tensor, axis=(1, 2))
        outputs[f"{name}_max"] = keras.ops.max(tensor, axis=(1, 2))
        outputs[f"{name}_gem"] = keras.ops.power(keras.ops.mean(keras.ops.power(tensor + 1e-6, 3.0), axis=(1, 2)), 1.0 / 3.0)
    return keras.Model(image, outputs)


def contrast(image: np.ndarray, how: str) -> np.ndarray:
    """Per-image contrast normalisation before the backbone (exploratory, --contrast; not a keeneye option):
    "standard" = mean 127.5 and sd 50 per image, "stretch" = the 1st-99th percentile to 0-255."""
    if how == "none":
        return image
    x = image.astype(np.float32)
    if how == "standard":
        x = (x - x.mean()) / max(float(x.std()), 1.0) * 50.0 + 127.5
    else:
        low, high = np.percentile(x, 1), np.percentile(x, 99)
        x = (x - low) * 255.0 / max(high - low, 1.0)
    return np.clip(x, 0, 255).astype(np.uint8)


def pooled_features(paths: list[str], size: int, resize: str, views: int = 1, how: str = "none") -> dict[str, np.ndarray]:
    """Every block/pool column of every image at `size`: from CACHE, or one backbone pass per view (full JPEG decode).

    views > 1: the columns averaged over the image's model.views views (keeneye.data.preprocess.VIEW_SETS),
    as keeneye's views extractor averages its features.
    """
    from keeneye.data.preprocess import VIEW_SETS, InputSpec, dihedral

    file = CACHE / (f"magnetic_tile_s{size}_{resize}" + (f"_views{views}" if views > 1 else "")
                    + (f"_{how}" if how != "none" else "") + ".npz")
    if file.exists():
        return dict(np.load(file))
    spec, model, started = InputSpec(size, resize), extractor(size), time.perf_counter()
    parts: dict[str, list] = {}
    for start in range(0, len(paths), 32):
        batch = np.stack([contrast(spec.load(p), how) for p in paths[start : start + 32]])
        outs = [model.predict(dihedral(batch, view), verbose=0) for view in VIEW_SETS[views]]
        for key in outs[0]:
            parts.setdefault(key, []).append(np.mean([np.asarray(out[key], np.float32) for out in outs], axis=0))
    features = {key: np.concatenate(value) for key, value in parts.items()}
    print(f"  size {size} {resize} views {views} contrast {how}: {len(paths)} images embedded in "
          f"{time.perf_counter() - started:.0f} s", flush=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(file, **features)
    return features


def cached_embeddings(paths: list[str], key: str, dim: int) -> np.ndarray | None:
    """The magnetic-tile rows of one keeneye embedding cache (~/.cache/keeneye/embeddings/KEY), by content hash."""
    import hashlib

    from keeneye.data.cache import EmbeddingCache, default_cache_dir

    sha1s = np.array([hashlib.sha1(Path(p).read_bytes()).hexdigest() for p in paths])
    out = np.full((len(paths), dim), np.nan, np.float32)
    found = EmbeddingCache(default_cache_dir(), key).fill(sha1s, out)
    if not found.all():
        print(f"cache {key}: {int((~found).sum())} of {len(paths)} images missing, skipped", flush=True)
        return None
    return out


def judge_fold(x: np.ndarray, labels: np.ndarray, groups: np.ndarray, test_folds: np.ndarray, k: int,
               class_weight: str) -> dict:
    """Test fold k: C and threshold from 5 inner group folds of the other four, refit on them, test scores."""
    from sklearn.metrics import f1_score

    from keeneye.training.crossval import fold_scores, group_folds

    pool, test = test_folds != k, test_folds == k
    inner = group_folds(labels[pool], groups[pool], 5, 0)
    fit = logistic_fit_and_score(x, labels, pool, test, inner, class_weight)
    p, oof = fit.pop("p"), fit.pop("oof")
    estimate = fold_scores(labels[pool], oof, inner, fit["threshold"])
    return {"fold": int(k), **fit, "f1_at_0.5": float(f1_score(labels[test], p >= 0.5)),
            "cv_f1": estimate["f1_mean"], "cv_gap": estimate["f1_mean"] - fit["f1"]}


def logistic_fit_and_score(x: np.ndarray, labels: np.ndarray, train: np.ndarray, test: np.ndarray, inner: list,
                           class_weight: str, grid: tuple[float, ...] | None = None) -> dict:
    """keeneye's logistic head on the train rows (C from `grid`, default head.logistic_c's, by pooled out-of-fold
    AP over the `inner` folds, the threshold out of fold), refit at that C and scored on the test rows: C,
    threshold, out-of-fold probabilities and AP, test probabilities, F1, ROC AUC and AP."""
    from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

    from keeneye.evaluation.metrics import predict_labels
    from keeneye.evaluation.threshold import choose_threshold
    from keeneye.training.crossval import HeadCandidate, cross_validate_logistic
    from keeneye.training.fit import LOGISTIC_C_GRID, fit_logistic

    candidate = HeadCandidate("logistic", (), 0.0, 0.0, class_weight, kind="logistic", logistic_c=tuple(grid or LOGISTIC_C_GRID))
    result = cross_validate_logistic(x[train], labels[train], inner, candidate)
    threshold = choose_threshold(labels[train], result.oof, source="out_of_fold").threshold
    c = result.candidate.logistic_c[0]
    p = fit_logistic(x[train], labels[train], c, class_weight).predict_proba(np.asarray(x[test], np.float64))[:, 1]
    y = labels[test]
    return {"c": c, "threshold": threshold, "oof": result.oof, "oof_ap": result.ap, "p": p,
            "f1": float(f1_score(y, predict_labels(p, threshold))), "auc": float(roc_auc_score(y, p)),
            "ap": float(average_precision_score(y, p))}


def summarise(rows: list[dict]) -> dict:
    """Mean and sd over the folds of every score judge_fold returns."""
    summary = {}
    for key in ("f1", "f1_at_0.5", "auc", "ap", "oof_ap", "cv_gap"):
        values = [r[key] for r in rows]
        summary[key] = {"mean": statistics.fmean(values), "sd": statistics.stdev(values)}
    summary["abs_cv_gap"] = {"mean": statistics.fmean(abs(r["cv_gap"]) for r in rows)}
    return summary


def judge(x: np.ndarray, labels: np.ndarray, groups: np.ndarray, test_folds: np.ndarray, class_weight: str) -> dict:
    """Every test fold judged by judge_fold, and the mean +- sd over them."""
    rows = [judge_fold(x, labels, groups, test_folds, k, class_weight) for k in sorted(np.unique(test_folds))]
    return {"folds": rows, "summary": summarise(rows)}


def summary_line(s: dict) -> str:
    return (f"F1 {s['f1']['mean']:.3f} +- {s['f1']['sd']:.3f}  (0.5: {s['f1_at_0.5']['mean']:.3f})  AUC {s['auc']['mean']:.3f}  "
            f"AP {s['ap']['mean']:.3f}  OOF AP {s['oof_ap']['mean']:.3f}  CV gap {s['cv_gap']['mean']:+.3f} (|.| {s['abs_cv_gap']['mean']:.3f})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="*", type=int, default=[224])
    parser.add_argument("--resize", default="squash", choices=("squash", "pad", "crop"))
    parser.add_argument("--sets", nargs="*", default=list(SETS))
    parser.add_argument("--class-weight", default="balanced", choices=("balanced", "none"))
    parser.add_argument("--views", type=int, default=1, choices=(1, 2, 4, 8), help="average the features over model.views views")
    parser.add_argument("--contrast", default="none", choices=("none", "standard", "stretch"),
                        help="per-image contrast normalisation before the backbone (exploratory)")
    parser.add_argument("--cached", nargs="*", default=[], metavar="KEY:DIM",
                        help="also judge keeneye embedding caches (e.g. an earlier multi run at 320 px, pad or tiles)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "feature_layers.json")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "src"))
    paths, labels, groups, folds = magnetic_tile_folds()
    report = {}
    for entry in args.cached:
        key, dim = entry.rsplit(":", 1)
        x = cached_embeddings(paths, key, int(dim))
        if x is None:
            continue
        row = report[key] = judge(x, labels, groups, folds, args.class_weight)
        print(f"{key}: {summary_line(row['summary'])}", flush=True)
    for size in args.sizes:
        features = pooled_features(paths, size, args.resize, args.views, args.contrast)
        for name in args.sets:
            x = np.concatenate([features[column] for column in SETS[name]], axis=1)
            row = report[f"{name}@{size}"] = judge(x, labels, groups, folds, args.class_weight) | {"dim": int(x.shape[1])}
            print(f"{name + '@' + str(size):18} dim {x.shape[1]:5d}  {summary_line(row['summary'])}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"resize": args.resize, "class_weight": args.class_weight, "views": args.views,
                                    "contrast": args.contrast, "results": report}, indent=2))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
