"""Probe (issue #12): do pixel masks of the defects help a frozen-feature classifier on magnetic-tile?

Why: every frozen mode so far learns from image labels only, and on magnetic-tile the best of them
(`multi+cov`, logistic head) reaches test F1 0.77 (0.80 with 8 views) against the issue's 0.88. A head
trained from image labels must find out which few positions of a defect image are the defect; a
patch-level multiple-instance head that tried (benchmarks/patch_mil.py) learned the blowholes and missed
the rest. Magnetic-tile ships a mask beside every photo (`*.png`, the defect's pixels), as many
inspection data sets do, and segmentation-supervised classifiers (Tabernik et al. 2019, "Segmentation-
based deep-learning approach for surface-defect detection") gain most from exactly that supervision.
This probe asks how much the masks are worth before any product change: if users who have masks
should be able to give them to keeneye.

* **Patch features** (frozen ImageNet MobileNetV2, 224 px squash, the maps benchmarks/texture_pooling.py
  caches): a 14 x 14 grid; each cell holds block_13_expand_relu (576 values) and block_6_expand_relu
  averaged over its 2 x 2 positions (192): 768 values, standardised on the training patches.
  With ``--context`` (tried after the first run, so exploratory) each cell also holds the last block
  (out_relu, 1280 values, stride 32: the 7 x 7 cell it lies in), since a defect patch may only look like
  one beside its surroundings.
* **Patch labels from the masks** (squashed to 224 like the image; mask pixel > 127): a cell is a defect
  patch when at least 2% of its 16 x 16 pixels are defect pixels, a good patch when none are; cells in
  between are not trained on. Every cell of a good image is a good patch. (2%, the grid and the features
  were set before the first run.)
* **Patch head**: logistic regression (L2, C = 0.1, balanced class weights; fixed before the first
  run) on all defect patches and 40,000 random good patches of the training images.
* **Image score**: the patch logits' maximum, or the mean of the top 3, chosen by pooled out-of-fold AP
  over keeneye's 5 inner group folds of the training part (never the test fold); the threshold is
  keeneye's rule on the out-of-fold scores (expit of the image logit).
* **Stack**: the image score beside `multi+cov`'s out-of-fold logit (texture_pooling's "pca128_l2", the
  product's feature set, judged as in feature_layers.py), combined by keeneye's logistic head on those two
  columns (out-of-fold values for the training part), threshold out of fold.

Only the training part's masks are used; the test fold is scored from its images alone.

    nice -n 15 python benchmarks/mask_patches.py [--folds 0 1 2 3 4] [--context] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from scipy.special import expit, logit

sys.path.insert(0, str(Path(__file__).resolve().parent))
import feature_layers as fl  # noqa: E402
import texture_pooling as tp  # noqa: E402

GRID, CELL, SIZE = 14, 16, 224
DEFECT_SHARE = 0.02  # a cell is a defect patch from this share of defect pixels on
GOOD_PATCHES = 40_000
PATCH_C = 0.1
POOLINGS = {"max": 1, "top3": 3}


def patch_grid(maps: dict[str, np.ndarray], context: bool = False) -> np.ndarray:
    """(N, 196, 768) float32: block_13 at its 14 x 14 grid beside block_6 averaged over 2 x 2 positions;
    `context`: also the last block (7 x 7, each value repeated over its 2 x 2 cells): (N, 196, 2048)."""
    b6, b13, last = maps["b6"], maps["b13"], maps["last"]
    n = len(b13)
    out = np.empty((n, GRID * GRID, b13.shape[-1] + b6.shape[-1] + (last.shape[-1] if context else 0)), np.float32)
    for start in range(0, n, 128):
        six = np.asarray(b6[start : start + 128], np.float32)
        parts = [np.asarray(b13[start : start + 128], np.float32), six.reshape(len(six), GRID, 2, GRID, 2, -1).mean(axis=(2, 4))]
        if context:
            parts.append(np.asarray(last[start : start + 128], np.float32).repeat(2, axis=1).repeat(2, axis=2))
        out[start : start + 128] = np.concatenate(parts, axis=-1).reshape(len(six), GRID * GRID, -1)
    return out


def cell_shares(paths: list[str]) -> np.ndarray:
    """(N, 196) share of defect pixels in each cell of every image's mask, squashed to 224 px like the image."""
    import cv2

    shares = np.zeros((len(paths), GRID * GRID), np.float32)
    for i, path in enumerate(paths):
        mask = cv2.imread(path[:-4] + ".png", cv2.IMREAD_GRAYSCALE)
        if mask is None:
            raise FileNotFoundError(f"no mask beside {path}")
        defect = cv2.resize((mask > 127).astype(np.float32), (SIZE, SIZE), interpolation=cv2.INTER_AREA)
        shares[i] = defect.reshape(GRID, CELL, GRID, CELL).mean(axis=(1, 3)).reshape(-1)
    return shares


def fit_patch_head(patches: np.ndarray, shares: np.ndarray, labels: np.ndarray, rows: np.ndarray, seed: int):
    """(scaler, logistic regression) on the defect patches and GOOD_PATCHES random good patches of `rows`."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    share = shares[rows]
    good = (share == 0) | (labels[rows] == 0)[:, None]
    defect = (share >= DEFECT_SHARE) & (labels[rows] == 1)[:, None]
    good_at, defect_at = np.argwhere(good), np.argwhere(defect)
    rng = np.random.default_rng(seed)
    good_at = good_at[rng.choice(len(good_at), size=min(GOOD_PATCHES, len(good_at)), replace=False)]
    at = np.concatenate([defect_at, good_at])
    x = patches[rows[at[:, 0]], at[:, 1]]
    y = np.r_[np.ones(len(defect_at)), np.zeros(len(good_at))]
    scaler = StandardScaler().fit(x)
    head = LogisticRegression(C=PATCH_C, class_weight="balanced", max_iter=2000).fit(scaler.transform(x), y)
    return scaler, head


def image_logits(model, patches: np.ndarray, rows: np.ndarray) -> dict[str, np.ndarray]:
    """Every pooling's image logit for `rows`: the maximum and the mean of the top 3 patch logits."""
    scaler, head = model
    logits = np.concatenate([head.decision_function(scaler.transform(patches[rows[s : s + 256]].reshape(-1, patches.shape[-1])))
                             .reshape(-1, patches.shape[1]) for s in range(0, len(rows), 256)])
    ranked = -np.sort(-logits, axis=1)
    return {name: ranked[:, :k].mean(axis=1) for name, k in POOLINGS.items()}


def scores(y: np.ndarray, p: np.ndarray, threshold: float) -> dict:
    from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

    return {"f1": float(f1_score(y, p >= threshold)), "f1_at_0.5": float(f1_score(y, p >= 0.5)),
            "auc": float(roc_auc_score(y, p)), "ap": float(average_precision_score(y, p)), "threshold": float(threshold)}


def mask_head_fold(patches, shares, labels, groups, folds, k: int) -> dict:
    """Test fold k: out-of-fold image logits over the inner group folds (pooling chosen on them), the refit
    on the whole training part, the test logits."""
    from sklearn.metrics import average_precision_score

    from keeneye.evaluation.threshold import choose_threshold
    from keeneye.training.crossval import group_folds

    pool, test = np.flatnonzero(folds != k), np.flatnonzero(folds == k)
    inner = group_folds(labels[pool], groups[pool], 5, 0)
    oof = {name: np.zeros(len(pool)) for name in POOLINGS}
    for i in np.unique(inner):
        fit_at, held_at = np.flatnonzero(inner != i), np.flatnonzero(inner == i)
        model = fit_patch_head(patches, shares, labels, pool[fit_at], seed=100 * k + int(i))
        for name, held_logit in image_logits(model, patches, pool[held_at]).items():
            oof[name][held_at] = held_logit
    oof_ap = {name: float(average_precision_score(labels[pool], v)) for name, v in oof.items()}
    pooling = max(oof_ap, key=oof_ap.get)
    threshold = choose_threshold(labels[pool], expit(oof[pooling]), source="out_of_fold").threshold
    test_logit = image_logits(fit_patch_head(patches, shares, labels, pool, seed=100 * k + 9), patches, test)[pooling]
    return {"fold": k, "pooling": pooling, "oof_ap": oof_ap, "oof_logit": oof[pooling], "test_logit": test_logit,
            **scores(labels[test], expit(test_logit), threshold)}


def stacked_fold(columns_oof: np.ndarray, columns_test: np.ndarray, labels, groups, folds, k: int) -> dict:
    """keeneye's logistic head on a few out-of-fold score columns (C and threshold from the inner group folds)."""
    from keeneye.training.crossval import group_folds

    pool, test = folds != k, folds == k
    x = np.zeros((len(labels), columns_oof.shape[1]), np.float32)
    x[pool], x[test] = columns_oof, columns_test
    inner = group_folds(labels[pool], groups[pool], 5, 0)
    fit = fl.logistic_fit_and_score(x, labels, pool, test, inner, "balanced")
    p = fit.pop("p")
    return {"fold": k, "c": fit["c"], "oof_ap": fit["oof_ap"], **scores(labels[test], p, fit["threshold"])}


def texture_fold(multi: np.ndarray, b6, labels, groups, folds, k: int) -> dict:
    """`multi+cov` (the product's feature set) judged as in feature_layers.py, keeping its out-of-fold and test logits."""
    from keeneye.training.crossval import group_folds

    pool, test = folds != k, folds == k
    x = np.concatenate([multi, tp.projection_variant(b6, pool, "pca128_l2", k, 48)], axis=1)
    inner = group_folds(labels[pool], groups[pool], 5, 0)
    fit = fl.logistic_fit_and_score(x, labels, pool, test, inner, "balanced")
    oof_logit, test_logit = (logit(np.clip(p, 1e-12, 1 - 1e-12)) for p in (fit["oof"], fit["p"]))
    return {"fold": k, "oof_logit": oof_logit, "test_logit": test_logit,
            **scores(labels[test], fit["p"], fit["threshold"])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folds", nargs="*", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--context", action="store_true",
                        help="patch features also hold the last block (7 x 7, stride 32): what lies around each cell")
    parser.add_argument("--out", type=Path, default=fl.REPO / "benchmarks" / "results" / "mask_patches.json")
    args = parser.parse_args()
    sys.path.insert(0, str(fl.REPO / "src"))
    paths, labels, groups, folds = fl.magnetic_tile_folds()
    maps = tp.block_maps(paths, ["b6", "b13", "last"])
    started = time.perf_counter()
    patches, shares = patch_grid(maps, args.context), cell_shares(paths)
    print(f"patch grid {patches.shape}, masks read in {time.perf_counter() - started:.0f} s; defect patches per defect image "
          f"(median) {np.median((shares[labels == 1] >= DEFECT_SHARE).sum(axis=1)):.0f}", flush=True)
    multi = tp.pooled_multi([maps])
    rows: dict[str, list[dict]] = {"multi+cov": [], "mask patches": [], "multi+cov + mask patches": []}
    for k in args.folds:
        started = time.perf_counter()
        texture = texture_fold(multi, maps["b6"], labels, groups, folds, k)
        masked = mask_head_fold(patches, shares, labels, groups, folds, k)
        both = stacked_fold(np.c_[texture["oof_logit"], masked["oof_logit"]], np.c_[texture["test_logit"], masked["test_logit"]],
                            labels, groups, folds, k)
        for name, row in zip(rows, (texture, masked, both)):
            rows[name].append({key: v for key, v in row.items() if not key.endswith("_logit")})
            print(f"fold {k} {name:26}: F1 {row['f1']:.3f} (0.5: {row['f1_at_0.5']:.3f}) AUC {row['auc']:.3f} AP {row['ap']:.3f}",
                  flush=True)
        print(f"fold {k}: pooling {masked['pooling']} (inner AP {masked['oof_ap']}), {time.perf_counter() - started:.0f} s",
              flush=True)
    print(f"\n{'mode':28} mean +- sd over folds {args.folds}")
    report = {}
    for name, fold_rows in rows.items():
        summary = {key: {"mean": float(np.mean([r[key] for r in fold_rows])), "sd": float(np.std([r[key] for r in fold_rows], ddof=1))}
                   for key in ("f1", "f1_at_0.5", "auc", "ap")} if len(fold_rows) > 1 else {}
        report[name] = {"folds": fold_rows, "summary": summary}
        if summary:
            print(f"{name:28} F1 {summary['f1']['mean']:.3f} +- {summary['f1']['sd']:.3f} (0.5: {summary['f1_at_0.5']['mean']:.3f}) "
                  f"AUC {summary['auc']['mean']:.3f} AP {summary['ap']['mean']:.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"grid": GRID, "context": args.context, "defect_share": DEFECT_SHARE, "good_patches": GOOD_PATCHES, "patch_c": PATCH_C,
                                    "results": report}, indent=2, default=float))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
