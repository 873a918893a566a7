"""Benchmark: four ways to fit the logistic head on "multi+cov" differently, on magnetic-tile (issue 12).

Each is a change with a reason, measured against keeneye's own fit on the same features and folds:
  * rows: with model.views V the head is fitted on the view-averaged features. Fitting it on every view as a row
    of its own (V x the rows; C divided by V, so each image weighs the same against the penalty) is exact
    augmentation, and it penalises directions along which an image's views disagree. The prediction is the
    sigmoid of the mean logit over the views, which for a linear head is the published graph's prediction.
  * train_rows: the same rows at training, but the prediction on the image itself (one view, one backbone pass):
    the views as training-time augmentation only, so prediction costs what model.views 1 costs. Its baseline is
    keeneye's fit on the image alone (model.views 1).
  * c_grid: head.logistic_c stops at 0.1 and the folds chose that top value often; the grid extended to
    0.3, 1, 3, 10 shows whether the optimum lay beyond it.
  * regions: the second moment of the whole image dilutes a small defect; the element-wise maximum of the
    second moments of the 2 x 2 quadrants (each L2-normalised; max, since views permute the quadrants) is
    appended, so one region can decide.
Features as keeneye's "multi+cov" builds them (block_13_expand_relu and out_relu average and max; block_6_expand_relu
projected on the PCA of 128 training images, the whole 48 x 48 moment, L2), from texture_pooling.py's cached block
maps (224 px squash; views are the dihedral views of keeneye.data.preprocess). Per test fold: C and the threshold
from 5 inner group folds of the other four (an image's views stay together), refit, test. Printed: mean +- sd over
the 5 group folds and the paired differences from keeneye's fit.

    python benchmarks/head_probes.py --probe rows|train_rows|c_grid|regions [--views 1|2|4|8] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import feature_layers as fl  # noqa: E402
import texture_pooling as tp  # noqa: E402

WIDER_C = (0.3, 1.0, 3.0, 10.0)


def moments(maps: np.ndarray, pca, regions: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """keeneye's texture part of every image (whole 48 x 48 moment, L2) and, with `regions`, the element-wise
    maximum of its 2 x 2 quadrants' moments (each L2)."""
    n, h, w, c = maps.shape
    whole, quadrants = [], []
    for start in range(0, n, 128):
        z = pca.transform(np.asarray(maps[start : start + 128], np.float32).reshape(-1, c)).astype(np.float32)
        z = z.reshape(-1, h, w, z.shape[-1])
        whole.append(tp.full_moment_l2(z.reshape(len(z), h * w, -1)))
        if regions:
            half = h // 2
            parts = [z[:, a * half : (a + 1) * half, b * half : (b + 1) * half] for a in (0, 1) for b in (0, 1)]
            quadrants.append(np.max([tp.full_moment_l2(q.reshape(len(z), half * half, -1)) for q in parts], 0))
    return np.concatenate(whole), (np.concatenate(quadrants) if regions else None)


def keeneye_fit(x: np.ndarray, labels: np.ndarray, pool: np.ndarray, test: np.ndarray, inner: np.ndarray,
                grid: tuple[float, ...] | None = None) -> dict:
    """keeneye's own logistic fit on one row per image (feature_layers' judge: keeneye's cross_validate_logistic),
    without the probability arrays, so the result goes into the JSON."""
    fit = fl.logistic_fit_and_score(x, labels, pool, test, inner, "balanced", grid)
    del fit["p"], fit["oof"]
    return fit


def fit_on_views(view_rows: list[np.ndarray], predict_rows: list[np.ndarray], labels: np.ndarray, pool: np.ndarray,
                 test: np.ndarray, inner: np.ndarray, grid: list[float]) -> dict:
    """keeneye's logistic protocol with every view of an image as a training row (`view_rows`), predicted by the
    mean logit over `predict_rows`: C by pooled out-of-fold AP, threshold out of fold, refit, test. Its own loop,
    since keeneye's cross_validate_logistic scores every row, not an image's mean over its views."""
    from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

    from keeneye.evaluation.metrics import predict_labels
    from keeneye.evaluation.threshold import choose_threshold
    from keeneye.training.fit import logistic_path

    def fitted(rows: np.ndarray, cs: list[float]) -> list:
        return logistic_path(np.concatenate([v[rows] for v in view_rows]), np.tile(labels[rows], len(view_rows)), cs)

    def probability(model, rows: np.ndarray) -> np.ndarray:
        logit = np.mean([model.decision_function(np.asarray(v[rows], np.float64)) for v in predict_rows], axis=0)
        return 1.0 / (1.0 + np.exp(-logit))

    where = np.flatnonzero(pool)
    paths = [fitted(where[inner != k], grid) for k in range(inner.max() + 1)]
    best = None
    for i, c in enumerate(grid):
        oof = np.zeros(len(where))
        for k, path in enumerate(paths):
            oof[inner == k] = probability(path[i], where[inner == k])
        ap = float(average_precision_score(labels[pool], oof))
        if best is None or ap > best[0] + 1e-9:
            best = (ap, c, oof)
    ap, c, oof = best
    threshold = choose_threshold(labels[pool], oof, source="out_of_fold").threshold
    p, y = probability(fitted(where, [c])[0], np.flatnonzero(test)), labels[test]
    return {"c": c, "oof_ap": ap, "threshold": threshold, "f1": float(f1_score(y, predict_labels(p, threshold))),
            "auc": float(roc_auc_score(y, p)), "ap": float(average_precision_score(y, p))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--probe", required=True, choices=("rows", "train_rows", "c_grid", "regions"))
    parser.add_argument("--views", type=int, default=8, choices=(1, 2, 4, 8))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.probe in ("rows", "train_rows") and args.views == 1:
        parser.error(f"--probe {args.probe} needs --views 2, 4 or 8")
    sys.path.insert(0, str(fl.REPO / "src"))
    from keeneye.data.preprocess import VIEW_SETS
    from keeneye.training.crossval import group_folds
    from keeneye.training.fit import LOGISTIC_C_GRID

    paths, labels, groups, folds = fl.magnetic_tile_folds()
    views = [tp.block_maps(paths, ["b6", "b13", "last"], view) for view in VIEW_SETS[args.views]]
    multi = [tp.pooled_multi([m]) for m in views]
    grid = list(LOGISTIC_C_GRID)
    rows: dict[str, list[dict]] = {"keeneye": [], args.probe: []}
    for k in sorted(np.unique(folds)):
        started, pool, test = time.perf_counter(), folds != k, folds == k
        pca = tp.pca_of_128(views[0]["b6"], pool, int(k), 48)
        texture = [moments(m["b6"], pca, args.probe == "regions") for m in views]
        per_view = [np.concatenate([x, t[0]], axis=1) for x, t in zip(multi, texture)]
        averaged = np.mean(per_view, axis=0)
        inner = group_folds(labels[pool], groups[pool], 5, 0)
        # train_rows' baseline is keeneye with one view: fitted and scored on the image alone
        rows["keeneye"].append(keeneye_fit(per_view[0] if args.probe == "train_rows" else averaged, labels, pool, test, inner))
        if args.probe == "rows":
            probe = fit_on_views(per_view, per_view, labels, pool, test, inner, [c / len(views) for c in grid])
        elif args.probe == "train_rows":
            probe = fit_on_views(per_view, per_view[:1], labels, pool, test, inner, [c / len(views) for c in grid])
        elif args.probe == "c_grid":
            probe = keeneye_fit(averaged, labels, pool, test, inner, tuple(grid) + WIDER_C)
        else:
            regions = np.mean([t[1] for t in texture], axis=0)
            probe = keeneye_fit(np.concatenate([averaged, regions], axis=1), labels, pool, test, inner)
        rows[args.probe].append(probe)
        print(f"fold {k} ({time.perf_counter() - started:.0f} s): " + "  ".join(
            f"{name} C {r[-1]['c']:g} F1 {r[-1]['f1']:.3f} AUC {r[-1]['auc']:.3f} AP {r[-1]['ap']:.3f} OOF AP {r[-1]['oof_ap']:.3f}"
            for name, r in rows.items()), flush=True)
    summary = {name: {key: [float(np.mean([x[key] for x in r])), float(np.std([x[key] for x in r], ddof=1))]
                      for key in ("f1", "auc", "ap", "oof_ap")} for name, r in rows.items()}
    for name, s in summary.items():
        print(f"{name:8}  " + "  ".join(f"{key} {m:.3f} +- {sd:.3f}" for key, (m, sd) in s.items()))
    print(f"{args.probe} - keeneye, paired over the folds: " + tp.paired_line(rows[args.probe], rows["keeneye"]))
    out = args.out or fl.REPO / "benchmarks" / "results" / f"head_probes_{args.probe}_views{args.views}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"probe": args.probe, "views": args.views, "folds": rows, "summary": summary}, indent=2))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
