"""Probe fine-tuning settings (fine_tune.method cached_top) on magnetic-tile WITHOUT touching a test fold.

Outer fold `--test-fold` (default 0) is never loaded. Of the other four group folds, `--val-fold` is the
validation set (whole groups, so honest) and the rest train. The frozen bottom's activations of every
training image in 8 views are computed once per (cut layer, image size) and kept in a .npy under
--cache (default ~/.cache/keeneye/finetune_probe), so each setting costs only its top training.
Prints validation AP / AUC / F1 (at the best validation threshold, so an upper bound) per setting,
and the frozen head trained the same way (0 epochs of the top) as the reference.

    python benchmarks/finetune_probe.py --unfreeze block_16_expand --lr 1e-4,3e-4 --epochs 12
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "magnetic-tile"


def rows_of(test_fold: int) -> list[dict]:
    rows = [r for r in csv.DictReader((DATA / "folds_5.csv").open()) if r["path"].lower().endswith(".jpg")]
    return [r for r in rows if int(r["fold"]) != test_fold]  # the test fold is never read


def scores(y: np.ndarray, p: np.ndarray) -> dict:
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

    precision, recall, _ = precision_recall_curve(y, p)
    f1 = np.max(2 * precision * recall / np.maximum(precision + recall, 1e-12))
    return {"ap": float(average_precision_score(y, p)), "auc": float(roc_auc_score(y, p)), "best_f1": float(f1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--test-fold", type=int, default=0)
    parser.add_argument("--val-fold", type=int, default=1)
    parser.add_argument("--unfreeze", default="block_16_expand")
    parser.add_argument("--lr", default="1e-4")
    parser.add_argument("--schedule", default="cosine")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--patience", type=int, default=4)
    parser.add_argument("--views", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--features", default="gap")
    parser.add_argument("--class-weight", default="balanced")
    parser.add_argument("--c", type=float, default=3e-3, help="C of the frozen logistic head (the folds chose 1e-3..1e-2)")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "keeneye" / "finetune_probe")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "finetune_probe.json")
    args = parser.parse_args()

    import keras

    from keeneye.config import config_from_dict
    from keeneye.data.preprocess import InputSpec
    from keeneye.model.backbone import build_feature_extractor, resolve_weights
    from keeneye.training.cached_top import cache_views, model_inputs, split_backbone, train_top, view_of
    from keeneye.training.finetune import find_backbone, first_unfrozen, unfreeze_top
    from keeneye.training.fit import fit_logistic_head

    rows = rows_of(args.test_fold)
    paths = [str(DATA / r["path"]) for r in rows]
    y = np.array([int(r["binary_label"]) for r in rows])
    is_val = np.array([int(r["fold"]) == args.val_fold for r in rows])
    extractor = build_feature_extractor(1.0, args.image_size, resolve_weights("imagenet", 1.0, args.image_size), args.features)
    base = find_backbone(extractor)
    cut_name = base.layers[first_unfrozen(base, args.unfreeze)].name
    bottom, _ = split_backbone(extractor, cut_name)
    # the activations, then any parts pooled below the cut (split_backbone), one .npy each
    caches = [args.cache / f"t{args.test_fold}_{cut_name}_{args.image_size}_{args.views}{'' if i == 0 else f'_{args.features}_{i}'}.npy"
              for i in range(len(bottom.outputs))]
    started = time.perf_counter()
    if all(cache.exists() for cache in caches):
        acts = tuple(np.load(cache, mmap_mode="r") for cache in caches)
    else:
        acts, failed = cache_views(bottom, paths, InputSpec(args.image_size), args.views, 32)
        assert not failed, failed
        args.cache.mkdir(parents=True, exist_ok=True)
        for cache, array in zip(caches, acts):
            np.save(cache, array)
    print(f"activations {[a.shape for a in acts]} in {time.perf_counter() - started:.0f} s", flush=True)
    results = []
    train_idx, val_idx = np.flatnonzero(~is_val), np.flatnonzero(is_val)
    train_acts = tuple(np.asarray(a[:, train_idx]) for a in acts)
    val = (view_of(acts, 0, val_idx), y[val_idx])
    for lr in [float(v) for v in args.lr.split(",")]:
        cfg = config_from_dict({"data_folder_path": "/tmp",
                                "training": {"seed": 0, "batch_size": 32, "class_weight": args.class_weight},
                                "fine_tune": {"enabled": True, "method": "cached_top", "unfreeze": args.unfreeze,
                                              "learning_rate": lr, "epochs": args.epochs, "patience": args.patience,
                                              "schedule": args.schedule, "views": args.views}})
        keras.utils.set_random_seed(0)
        ext = build_feature_extractor(1.0, args.image_size, resolve_weights("imagenet", 1.0, args.image_size), args.features)
        _, top = split_backbone(ext, cut_name)
        t0 = time.perf_counter()
        # The frozen reference, and the head fine-tuning starts from: logistic regression on the frozen features
        # (view 0 of the training images), as head.kind logistic.
        frozen_train = np.asarray(top.predict(model_inputs([a[0] for a in train_acts]), batch_size=64, verbose=0))
        head = fit_logistic_head(frozen_train, y[train_idx], args.c, "balanced", 0)
        p0 = np.asarray(head.predict(np.asarray(top.predict(model_inputs(val[0]), batch_size=64, verbose=0)), verbose=0))[:, 0]
        reference = scores(val[1], p0)
        unfreeze_top(find_backbone(ext), args.unfreeze)
        model, outcome = train_top(cfg, top, head, (train_acts, y[train_idx]), val, None, verbose=0)
        p = np.asarray(model.predict(model_inputs(val[0]), batch_size=64, verbose=0))[:, 0]
        r = {"lr": lr, "epochs_run": len(outcome.history), "best_epoch": int(outcome.history.attrs.get("best_epoch", 0)),
             "seconds": round(time.perf_counter() - t0, 1), **scores(val[1], p), "frozen": reference, "unfreeze": args.unfreeze,
             "schedule": args.schedule, "views": args.views, "image_size": args.image_size, "features": args.features,
             "class_weight": args.class_weight, "epochs": args.epochs,
             "val_loss": [round(float(v), 4) for v in outcome.history.get("val_loss", [])]}
        print(json.dumps(r), flush=True)
        results.append(r)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(args.out.read_text()) if args.out.exists() else []
    args.out.write_text(json.dumps(previous + results, indent=1))


if __name__ == "__main__":
    main()
