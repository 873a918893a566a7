"""Probe (issue #12): should the one-class score of a stacked model average over `model.views` too?

Why: `model.views` says that how a part or texture lay does not matter, and the supervised head of a
views bundle sees the mean of the 8 flips / quarter turns' features (magnetic-tile: test F1 0.720 ->
0.765 for `multi` + logistic). The one-class part of `head.anomaly_feature` still scores only the image
as it lay: its memory bank holds good patches in one orientation (a good grain seen turned can look
anomalous), and its score is a max-type statistic (the mean of the 10 largest patch distances), whose
noise an average over views reduces. Both reasons hold for any data where views are right, not for
magnetic-tile alone.

Protocol (as benchmarks/anomaly_stacking.py, nothing chosen on a test fold): keeneye's supervised phases
with `model.features=multi`, `head.kind=logistic`, `model.views=8` (the best frozen mode) give the group
folds, out-of-fold and test probabilities; the one-class scores come from banks of the other folds' good
images (test fold: all good training images), product defaults (block_6_expand_relu + block_12_add, 10%
coreset capped at 10000, top-10 mean, re-weighted). Patch features of each of the 8 views (data/preprocess
.dihedral of the squashed 224 px image) are cached as float16. Variants of the one-class score:
  view0      the image only, bank of good patches as they lay (the product today)
  query8     the mean over the 8 views of each view's score, bank as they lay
  bank8      the image only, bank from the good patches of all 8 views (coreset of the 8x larger pool)
  both8      the mean over 8 views, bank of all 8 views
Each is stacked with the supervised logit (logistic regression on [logit p, log s], threshold from
cross-fitted OOF probabilities). Printed per fold and as mean +- sd; paired differences against view0.

    nice -n 15 python benchmarks/anomaly_views.py [--folds 0,1,2,3,4] [--variants view0 query8 bank8 both8] [--out FILE]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from anomaly_stacking import (  # noqa: E402
    CACHE, KINDS, RESULTS, SHARED, WEIGHTS, anomaly_oof_and_test, config, evaluate_kinds, fold_manifest, supervised_run,
)

VIEWS = 8
VARIANTS = ("view0", "query8", "bank8", "both8")
SUPERVISED = ["model.features=multi", "head.kind=logistic", "model.views=8"]


def view_features(paths: list[str], view: int, anomaly) -> np.ndarray:
    """(N, H, W, D) patch features of view `view` of every image (the product's one-class graph), cached float16."""
    import keras

    from anomaly_tune import cached_features
    from keeneye.model.patchcore import build_patch_extractor

    def build():
        patches = build_patch_extractor(1.0, 224, WEIGHTS, anomaly.layers, projection_dim=anomaly.feature_dim, seed=0,
                                        grid=anomaly.grid)
        image = keras.Input((224, 224, 3))
        turned = keras.layers.Lambda(lambda x: _dihedral_tensor(x, view), output_shape=(224, 224, 3))(image)
        return keras.Model(image, patches(turned))

    layers = "+".join(anomaly.layers)
    return cached_features(CACHE / f"views_magnetic-tile_224_{layers}_{anomaly.feature_dim}_view{view}.npy", build, paths, 224,
                           f"view {view}")


def _dihedral_tensor(images, view: int):
    """data/preprocess.dihedral on a (N, S, S, C) tensor: `view % 4` quarter turns, then mirrored when view >= 4."""
    import tensorflow as tf

    turned = tf.image.rot90(images, k=view % 4)
    return tf.reverse(turned, axis=[2]) if view >= 4 else turned


def scores_of(features: list[np.ndarray], bank_rows: np.ndarray, rows: np.ndarray, anomaly, variant: str) -> np.ndarray:
    """Raw one-class scores of `rows` under `variant` (module docstring), the bank built as train builds it."""
    from keeneye.model.patchcore import reweighted_scores
    from keeneye.training.anomaly import build_bank

    bank_views = features if variant in ("bank8", "both8") else features[:1]
    query_views = features if variant in ("query8", "both8") else features[:1]
    pool = np.concatenate([np.asarray(f[np.sort(bank_rows)], np.float32).reshape(-1, f.shape[-1]) for f in bank_views])
    bank = build_bank(pool, anomaly.coreset_share, anomaly.max_bank_size, 0)
    per_view = []
    for f in query_views:
        query = np.asarray(f[rows], np.float32)
        per_view.append(reweighted_scores(bank, query, *bank.nearest(query), anomaly.score_neighbours, anomaly.score_top_k))
    return np.mean(per_view, axis=0)


def mean_sd(values: list[float]) -> str:
    return f"{statistics.fmean(values):.3f} +- {statistics.stdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def main() -> int:
    from anomaly_tune import write_results
    from keeneye.config import AnomalyConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folds", default="0,1,2,3,4")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=RESULTS / "anomaly_views_magnetic.json")
    args = parser.parse_args()
    anomaly = AnomalyConfig()
    root = SHARED / "data" / "magnetic-tile"
    paths = [str((root / p).resolve()) for p in pd.read_csv(root / "folds_5.csv")["path"]]
    index = {p: i for i, p in enumerate(paths)}
    features = [view_features(paths, view, anomaly) for view in range(VIEWS)]
    work = Path(tempfile.mkdtemp(prefix="keeneye-bench-anomaly-views-"))
    folds: dict[int, dict] = {}
    for k in [int(f) for f in args.folds.split(",")]:
        started = time.perf_counter()
        cfg = config(work, f"fold{k}", {"positive_class": "defect", "data": {"manifest_path": str(fold_manifest(root, work, k))}},
                     SUPERVISED)
        run = supervised_run(cfg)
        folds[k] = {"head": run.head}
        for variant in args.variants:
            a_oof, a_test = anomaly_oof_and_test(features, index, run, anomaly, 0,
                                                 score=lambda f, bank, rows, a, seed: scores_of(f, bank, rows, a, variant))
            folds[k][variant] = evaluate_kinds(run, a_oof, a_test)
            r = folds[k][variant]
            print(f"fold {k} {variant}: " + "; ".join(f"{kind} F1 {r[kind]['f1']:.3f} AUC {r[kind]['roc_auc']:.3f} "
                                                       f"AP {r[kind]['average_precision']:.3f}" for kind in KINDS), flush=True)
        folds[k]["seconds"] = round(time.perf_counter() - started, 1)
    summary = {}
    for variant in args.variants:
        summary[variant] = {kind: {m: [folds[k][variant][kind][m] for k in sorted(folds)] for m in ("f1", "roc_auc", "average_precision")}
                            for kind in ("anomaly", "stacked")}
        line = "; ".join(f"{kind} F1 {mean_sd(v['f1'])} AUC {mean_sd(v['roc_auc'])} AP {mean_sd(v['average_precision'])}"
                         for kind, v in summary[variant].items())
        print(f"{variant:7s} {line}")
        if variant != "view0" and "view0" in summary:
            diff = {m: [a - b for a, b in zip(summary[variant]["stacked"][m], summary["view0"]["stacked"][m])]
                    for m in ("f1", "roc_auc", "average_precision")}
            summary[variant]["stacked_minus_view0"] = diff
            print("        stacked - view0: " + ", ".join(f"{m} {np.round(v, 3).tolist()}" for m, v in diff.items()))
    supervised = {m: [folds[k][args.variants[0]]["supervised"][m] for k in sorted(folds)] for m in ("f1", "roc_auc", "average_precision")}
    print("supervised alone: " + ", ".join(f"{m} {mean_sd(v)}" for m, v in supervised.items()))
    write_results({"anomaly_settings": anomaly.model_dump(), "supervised_overrides": SUPERVISED, "folds": folds,
                   "summary": summary, "supervised": supervised}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
