"""Benchmark: which head to publish after cross-validation, refit on all data or the average of the fold heads?

On the magnetic-tile 5 group folds (fold k testing), with the cached embeddings (the keeneye cache,
filled on first use): for each candidate head, the cross-validation of keeneye.training.crossval on
the other four folds (group folds on the folds_5 groups), the threshold from the out-of-fold
probabilities, then on the testing fold: F1 of the refit head (trained on all four folds for the
median best epoch count, same training loop) and of the mean of the fold heads, at that threshold
and at 0.5. Both heads are measured on test data only to decide keeneye's default
(training.cv_publish), never inside a run.

    python benchmarks/cv_publish.py [--candidates configured,mlp128-balanced,linear-balanced] [--out FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO.parent / "shared" / "weights" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"


def embeddings(data: Path, weights: Path):
    """(features, labels, groups, folds) for the folds_5 images, through the keeneye embedding cache."""
    import numpy as np
    import pandas as pd

    from keeneye.inference.engines import make_feature_engine
    from keeneye.model.backbone import build_feature_extractor, resolve_weights
    from keeneye.data.cache import EmbeddingCache, backbone_cache_key, default_cache_dir
    from keeneye.training.features import embed_manifest

    folds = pd.read_csv(data / "folds_5.csv")
    folds = folds[folds["path"].str.lower().str.endswith(".jpg")].reset_index(drop=True)
    paths = [str(data / p) for p in folds["path"]]
    manifest = pd.DataFrame({"path": paths, "sha1": [hashlib.sha1(Path(p).read_bytes()).hexdigest() for p in paths]})
    resolved = resolve_weights(str(weights), 1.0, 224)
    extractor = build_feature_extractor(1.0, 224, resolved)
    cache = EmbeddingCache(default_cache_dir(), backbone_cache_key("mobilenet_v2", 1.0, 224, resolved.sha256))
    result = embed_manifest(manifest, make_feature_engine(extractor, cache_folder=cache.folder), extractor.output_shape[-1], 224, cache)
    return result.features, folds["binary_label"].to_numpy(), folds["group"].to_numpy(), folds["fold"].to_numpy()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "magnetic-tile")
    parser.add_argument("--weights", type=Path, default=WEIGHTS)
    parser.add_argument("--candidates", default="configured,mlp128-balanced,linear-balanced")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "cv_publish.json")
    args = parser.parse_args()

    import numpy as np
    from sklearn.metrics import f1_score

    from keeneye.config import EvaluationConfig, HeadConfig, TrainingConfig
    from keeneye.training import crossval

    x, y, groups, fold_of = embeddings(args.data.resolve(), args.weights)
    training, evaluation = TrainingConfig(seed=0), EvaluationConfig()
    pool_of = {c.name: c for c in crossval.AUTO_CANDIDATES} | {"configured": crossval.candidates_for(HeadConfig(), training)[0]}
    output = {}
    for name in args.candidates.split(","):
        candidate = pool_of[name]
        rows = []
        for k in range(5):
            test, pool = fold_of == k, fold_of != k
            folds = crossval.group_folds(y[pool], groups[pool], training.cv_folds, training.seed)
            result = crossval.cross_validate(x[pool], y[pool], folds, candidate, training)
            cv = crossval.CrossValidation(folds, [result], 0, "", None, {})
            choice = crossval.choose_threshold(y[pool], result.oof, min_per_class=evaluation.min_validation_per_class,
                                               source="out_of_fold")
            refit, _, _ = crossval.train_head(x[pool], y[pool], candidate, training, cv.refit_epochs, seed=training.seed)
            p_refit = np.asarray(refit(x[test])).ravel()
            p_average = np.mean([np.asarray(h(x[test])).ravel() for h in result.heads], axis=0)
            rows.append({
                "fold": k, "threshold": choice.threshold,
                "refit_f1": f1_score(y[test], p_refit >= choice.threshold), "refit_f1_at_0.5": f1_score(y[test], p_refit >= 0.5),
                "average_f1": f1_score(y[test], p_average >= choice.threshold), "average_f1_at_0.5": f1_score(y[test], p_average >= 0.5),
            })
            print(name, rows[-1], flush=True)
        means = {key: statistics.fmean(r[key] for r in rows) for key in rows[0] if key not in ("fold",)}
        output[name] = {"folds": rows, "mean": means}
        print(f"{name}: refit F1 {means['refit_f1']:.4f} (0.5: {means['refit_f1_at_0.5']:.4f}), "
              f"average of fold heads F1 {means['average_f1']:.4f} (0.5: {means['average_f1_at_0.5']:.4f})", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(output, indent=2))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
