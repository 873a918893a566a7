"""Benchmark: does early-stopping each fold head on the fold it then scores bias the out-of-fold threshold and estimate?

keeneye's cross-validation (training/crossval.cross_validate) trains each fold head on K-1 folds and
early-stops it on the held-out fold's loss, so that fold's out-of-fold (OOF) probabilities come
from the epoch that fitted it best: a choice made on the rows being scored. The published head is
then refit on every row for the median of the folds' best epochs. The honest alternative scores
every fold at that median epoch E (one number chosen from all folds, like the logistic head's C),
i.e. from heads trained exactly as the published one is.

Magnetic-tile, 5 outer group folds (`../shared/data/magnetic-tile/folds_5.csv`), the default head
(dense [128], Adam, the config's defaults) on the cached default embeddings (`gap`; run
`python benchmarks/magnetic_tile.py` once to fill the cache). For each outer fold: 5 inner group
folds over the other four (tile groups), OOF both ways, the threshold chosen on each (the config's
rule), the head refit on all four for E epochs and scored on the outer fold at both thresholds.
Printed per fold and as mean +- sd: OOF AP and F1 estimate, test F1 at each threshold, and the
estimate's gap to the test F1.

    python benchmarks/oof_epochs.py [--out FILE]
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import statistics
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "magnetic-tile"
CACHE_KEY = "mobilenet_v2-a1.0-s224-w71e4c4ec4aa24c9c-v2-dfull"


def magnetic_tile_rows() -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Image paths (jpg), labels, tile groups and outer folds from folds_5.csv."""
    rows = list(csv.DictReader((DATA / "folds_5.csv").open()))
    paths = [str(DATA / r["path"]) for r in rows]
    return (paths, np.array([int(r["binary_label"]) for r in rows]), np.array([r["group"] for r in rows]),
            np.array([int(r["fold"]) for r in rows]))


def cached_embeddings(paths: list[str], key: str) -> np.ndarray:
    """The rows of one keeneye embedding cache, by content hash; fails when an image is missing."""
    from keeneye.data.cache import EmbeddingCache, default_cache_dir

    sha1s = np.array([hashlib.sha1(Path(p).read_bytes()).hexdigest() for p in paths])
    out = np.full((len(paths), 1280), np.nan, np.float32)
    found = EmbeddingCache(default_cache_dir(), key).fill(sha1s, out)
    if not found.all():
        raise SystemExit(f"cache {key}: {int((~found).sum())} of {len(paths)} images missing; "
                         "run python benchmarks/magnetic_tile.py first")
    return out


def oof_at_epoch(x, y, folds, candidate, training, epochs: int) -> np.ndarray:
    """OOF probabilities of fold heads trained for exactly `epochs` epochs (no early stopping), as the refit is."""
    from keeneye.training.crossval import train_head

    fixed = training.model_copy(update={"early_stopping_patience": 0})
    oof = np.full(len(y), np.nan, np.float32)
    for k in range(int(folds.max()) + 1):
        held = folds == k
        _, _, p = train_head(x[~held], y[~held], candidate, fixed, epochs, x[held], y[held], seed=training.seed + k)
        oof[held] = p
    return oof


def one_outer_fold(x, y, groups, outer, k: int) -> dict:
    """Both OOF variants in the inner folds of outer fold k's training rows, and their test F1."""
    from sklearn.metrics import average_precision_score, f1_score

    from keeneye.config import EvaluationConfig, HeadConfig, TrainingConfig
    from keeneye.evaluation.metrics import predict_labels
    from keeneye.evaluation.threshold import choose_configured_threshold
    from keeneye.training.crossval import candidates_for, cross_validate, fold_scores, group_folds, train_head

    head, training, evaluation = HeadConfig(), TrainingConfig(), EvaluationConfig()
    candidate = candidates_for(head, training)[0]
    train, test = outer != k, outer == k
    xt, yt = x[train], y[train]
    folds = group_folds(yt, groups[train], training.cv_folds, training.seed)
    result = cross_validate(xt, yt, folds, candidate, training)  # today: each fold stopped on its own held loss
    epochs = max(1, int(round(float(np.median(result.best_epochs)))))
    published, _, _ = train_head(xt, yt, candidate, training, epochs, seed=training.seed)  # the refit, as train does it
    test_p = np.asarray(published(x[test], training=False)).reshape(-1)
    row = {"fold": k, "best_epochs": result.best_epochs, "refit_epochs": epochs}
    for name, oof in (("own_best_epoch", result.oof), ("median_epoch", oof_at_epoch(xt, yt, folds, candidate, training, epochs))):
        choice = choose_configured_threshold(evaluation, yt, oof, source="out_of_fold")
        estimate = fold_scores(yt, oof, folds, choice.threshold)
        test_f1 = float(f1_score(y[test], predict_labels(test_p, choice.threshold), labels=[0, 1], zero_division=0))
        row[name] = {"oof_ap": float(average_precision_score(yt, oof)), "threshold": choice.threshold,
                     "estimate_f1": estimate["f1_mean"], "test_f1": test_f1, "gap": estimate["f1_mean"] - test_f1}
    row["test_ap"] = float(average_precision_score(y[test], test_p))
    return row


def mean_sd(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} +- {statistics.stdev(values):.3f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "oof_epochs.json")
    args = parser.parse_args()
    paths, y, groups, outer = magnetic_tile_rows()
    x = cached_embeddings(paths, CACHE_KEY)
    rows = []
    for k in range(int(outer.max()) + 1):
        row = one_outer_fold(x, y, groups, outer, k)
        rows.append(row)
        a, b = row["own_best_epoch"], row["median_epoch"]
        print(f"fold {k}: best epochs {row['best_epochs']} -> E {row['refit_epochs']}; OOF AP {a['oof_ap']:.4f} vs "
              f"{b['oof_ap']:.4f}; threshold {a['threshold']:.3f} vs {b['threshold']:.3f}; estimate F1 "
              f"{a['estimate_f1']:.3f} vs {b['estimate_f1']:.3f}; test F1 {a['test_f1']:.3f} vs {b['test_f1']:.3f}", flush=True)
    print("\n| OOF from | OOF AP | estimate F1 | test F1 | estimate - test |\n|---|---|---|---|---|")
    for name in ("own_best_epoch", "median_epoch"):
        v = lambda key: [r[name][key] for r in rows]  # noqa: E731
        print(f"| {name} | {mean_sd(v('oof_ap'))} | {mean_sd(v('estimate_f1'))} | {mean_sd(v('test_f1'))} | "
              f"{mean_sd(v('gap'))} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"folds": rows}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
