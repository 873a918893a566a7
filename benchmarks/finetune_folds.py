"""Frozen vs cached-top fine-tuned, magnetic-tile, the 5 group folds of folds_5.csv, same folds for both.

Fold k is testing. Of the other four, fold (k+1) % 5 is validation (whole groups: early stopping, the
logistic C, both thresholds, and the keep/drop rule look only at it) and three folds train.
  frozen:     logistic regression (standardised, balanced, C chosen on validation) on the frozen
              MobileNetV2 average-pooled features, as head.kind logistic;
  fine-tuned: fine_tune.method cached_top from that head: the top (from --unfreeze) + head trained
              on cached activations of the 8 flips / quarter turns (keeneye.training.cached_top).
  kept:       judge_fine_tuning (validation AP gain > the frozen AP spread over 3 inner group folds).
The bottom's activations of all 1,344 images x 8 views are computed once and cached (--cache), shared
by the folds (the bottom is frozen, so they do not depend on the fold). Wall time per fold = the top
training + the frozen fit; the one-off activation pass is reported separately.

    nice -n 15 python benchmarks/finetune_folds.py [--lr 3e-4] [--epochs 10] [--out benchmarks/results/finetune_folds.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "magnetic-tile"


def test_scores(y: np.ndarray, p: np.ndarray, threshold: float) -> dict:
    from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

    return {"f1": float(f1_score(y, (p >= threshold).astype(int), zero_division=0)), "roc_auc": float(roc_auc_score(y, p)),
            "average_precision": float(average_precision_score(y, p)), "threshold": float(threshold)}


def frozen_spread(x: np.ndarray, y: np.ndarray, groups: np.ndarray, c: float) -> float:
    """sd of the frozen logistic head's AP over 3 group folds of the training images: judge_fine_tuning's margin."""
    from sklearn.metrics import average_precision_score
    from sklearn.model_selection import StratifiedGroupKFold

    from keeneye.training.fit import fit_logistic

    aps = []
    for train, held in StratifiedGroupKFold(3, shuffle=True, random_state=0).split(x, y, groups):
        model = fit_logistic(x[train], y[train], c)
        aps.append(average_precision_score(y[held], model.predict_proba(np.asarray(x[held], np.float64))[:, 1]))
    return float(np.std(aps, ddof=1))


def all_activations(paths: list[str], folds: np.ndarray, args, bottom) -> np.ndarray:
    from keeneye.data.preprocess import InputSpec
    from keeneye.training.cached_top import cache_views

    cache = args.cache / f"all_{args.cut}_{args.image_size}_{args.views}.npy"
    if cache.exists():
        return np.load(cache)
    acts = np.full((args.views, len(paths), *bottom.output_shape[1:]), np.nan, np.float32)
    for fold in range(5):  # reuse a finetune_probe.py cache (every fold but one, in file order)
        probe = args.cache / f"t{fold}_{args.cut}_{args.image_size}_{args.views}.npy"
        if probe.exists():
            acts[:, folds != fold] = np.load(probe)
            break
    todo = np.flatnonzero(np.isnan(acts[0]).reshape(len(paths), -1).any(axis=1))
    computed, failed = cache_views(bottom, [paths[i] for i in todo], InputSpec(args.image_size), args.views, 32)
    assert not failed, failed
    acts[:, todo] = computed[0]  # "gap": the bottom's one output
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, acts)
    return acts


def run_fold(k: int, acts: np.ndarray, y: np.ndarray, folds: np.ndarray, groups: np.ndarray, args) -> dict:
    import keras

    from keeneye.config import config_from_dict
    from keeneye.evaluation.threshold import choose_threshold
    from keeneye.model.backbone import build_feature_extractor, resolve_weights
    from keeneye.training.cached_top import split_backbone, train_top
    from keeneye.training.finetune import find_backbone, judge_fine_tuning, unfreeze_top
    from keeneye.training.fit import LOGISTIC_C_GRID, choose_logistic_c, fit_logistic_head

    v = (k + 1) % 5
    tr, va, te = np.flatnonzero((folds != k) & (folds != v)), np.flatnonzero(folds == v), np.flatnonzero(folds == k)
    started = time.perf_counter()
    keras.utils.set_random_seed(0)
    ext = build_feature_extractor(1.0, args.image_size, resolve_weights("imagenet", 1.0, args.image_size), "gap")
    _, top = split_backbone(ext, args.cut)
    feats = np.asarray(top.predict(acts[0], batch_size=64, verbose=0))  # frozen features, view 0, every image
    c, _ = choose_logistic_c(feats[tr], y[tr], feats[va], y[va], LOGISTIC_C_GRID)
    head = fit_logistic_head(feats[tr], y[tr], c)
    p_frozen = np.asarray(head.predict(feats, batch_size=256, verbose=0))[:, 0]
    margin = frozen_spread(feats[tr], y[tr], groups[tr], c)
    frozen_seconds = time.perf_counter() - started

    cfg = config_from_dict({"data_folder_path": "/tmp", "training": {"seed": 0, "batch_size": 32, "class_weight": "balanced"},
                            "fine_tune": {"enabled": True, "method": "cached_top", "unfreeze": args.unfreeze, "learning_rate": args.lr,
                                          "epochs": args.epochs, "patience": args.patience, "schedule": args.schedule,
                                          "views": args.views}})
    unfreeze_top(find_backbone(ext), args.unfreeze)
    started = time.perf_counter()
    model, outcome = train_top(cfg, top, head, ((acts[:, tr],), y[tr]), ((acts[0, va],), y[va]), None)
    p_fine = np.asarray(model.predict(acts[0], batch_size=64, verbose=0))[:, 0]
    fine_seconds = time.perf_counter() - started
    kept, reason = judge_fine_tuning(y[va], p_frozen[va], p_fine[va], margin)
    out = {"validation_fold": v, "logistic_c": c, "margin": margin, "kept": kept, "reason": reason,
           "epochs_run": len(outcome.history), "best_epoch": int(outcome.history.attrs.get("best_epoch", 0)),
           "frozen_seconds": round(frozen_seconds, 1), "fine_tune_seconds": round(fine_seconds, 1)}
    for name, p in (("frozen", p_frozen), ("fine_tuned", p_fine)):
        threshold = choose_threshold(y[va], p[va]).threshold
        out[name] = test_scores(y[te], p[te], threshold)
    out["kept_test"] = out["fine_tuned" if kept == "fine_tune" else "frozen"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--unfreeze", default="block_16_expand")
    parser.add_argument("--cut", default="block_16_expand", help="the first unfrozen layer (the cached activations enter it)")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--schedule", default="cosine")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--patience", type=int, default=3)
    parser.add_argument("--views", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--folds", default="0,1,2,3,4")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "keeneye" / "finetune_probe")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "finetune_folds.json")
    args = parser.parse_args()

    from keeneye.model.backbone import build_feature_extractor, resolve_weights
    from keeneye.training.cached_top import split_backbone

    rows = [r for r in csv.DictReader((DATA / "folds_5.csv").open()) if r["path"].lower().endswith(".jpg")]
    y = np.array([int(r["binary_label"]) for r in rows])
    folds = np.array([int(r["fold"]) for r in rows])
    groups = np.array([int(r["group"]) for r in rows])
    started = time.perf_counter()
    bottom, _ = split_backbone(build_feature_extractor(1.0, args.image_size, resolve_weights("imagenet", 1.0, args.image_size)), args.cut)
    acts = all_activations([str(DATA / r["path"]) for r in rows], folds, args, bottom)
    cache_seconds = time.perf_counter() - started
    print(f"activations {acts.shape}: {cache_seconds:.0f} s (0 when cached)", flush=True)
    results = {}
    for k in [int(f) for f in args.folds.split(",")]:
        r = results[k] = run_fold(k, acts, y, folds, groups, args)
        print(f"fold {k}: frozen F1 {r['frozen']['f1']:.3f} AUC {r['frozen']['roc_auc']:.3f} AP {r['frozen']['average_precision']:.3f} | "
              f"fine-tuned F1 {r['fine_tuned']['f1']:.3f} AUC {r['fine_tuned']['roc_auc']:.3f} AP {r['fine_tuned']['average_precision']:.3f} "
              f"| kept {r['kept']} | {r['epochs_run']} epochs (best {r['best_epoch']}), {r['fine_tune_seconds']:.0f} s", flush=True)
    summary = {}
    for mode in ("frozen", "fine_tuned", "kept_test"):
        for key in ("f1", "roc_auc", "average_precision"):
            values = [r[mode][key] for r in results.values()]
            summary[f"{mode}.{key}"] = {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0}
            print(f"{mode:10s} {key:18s} {summary[f'{mode}.{key}']['mean']:.4f} +- {summary[f'{mode}.{key}']['sd']:.4f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "activation_seconds": round(cache_seconds, 1),
                                    "folds": results, "summary": summary}, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
