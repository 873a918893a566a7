"""Probe (issue #12, "let one tile decide"): a supervised multiple-instance head on patch features.

Why: on magnetic tile the globally pooled embeddings dilute small defects (blowholes, cracks), and the
one-class patch score sees small anomalies but not which anomalies are defects. A head that gives every
patch a logit and the image the smooth maximum of its patches' logits, trained from image labels only
(never masks), can learn which local patterns are defects.

* **Patch features**: the one-class mode's own graph (model/patchcore.build_patch_extractor with the
  ``anomaly`` config defaults: block_6_expand_relu + block_12_add, 3 x 3 local averaging, the coarse
  14 x 14 grid at 224 px, seeded random projection to 128), computed once and cached as float16 by
  benchmarks/anomaly_stacking.patch_features (the same cache file that script uses).
* **Head**: patch logit = w . standardised patch feature + b (one linear layer); image logit = a smooth
  maximum over the image's 196 patches: the mean of the top-k patch logits (k = 1, 4) or
  log-mean-exp with sharpness r = 4; class-balanced binary cross-entropy, L2 weight decay (1e-4, 1e-3),
  full-batch Adam (lr 0.01) in TensorFlow, the out-of-fold logits read after 50, 100 and 200 steps. All
  6 (pooling, decay) candidates train side by side in one graph. (A first run with 15 candidates, top-16
  and r = 1 too, decay 1e-2 and 400 steps, chose r = 4, 1e-4, 200 steps on fold 0 and cost 7 minutes of
  the loaded 2-core machine per fold: the grid was cut to what fits.)
* **Choice, nothing on a test split**: keeneye's supervised phases (``multi`` + exact logistic head, as
  benchmarks/anomaly_stacking.supervised_run runs them) give the K group folds over the outer training
  part. In those same folds every candidate's out-of-fold logits are computed; the (pooling, decay,
  steps) with the highest pooled out-of-fold AP is chosen (head.auto's criterion), the threshold is
  keeneye's rule (evaluation/threshold.choose_threshold) on its out-of-fold probabilities, and the head
  is refit on the whole training part with those settings and applied to the testing fold.
* **Stacks** (anomaly_stacking.stacked: standardised logistic regression on out-of-fold columns,
  threshold on cross-fitted out-of-fold probabilities): the MIL logit with the supervised logit, with the
  log one-class score (anomaly_stacking.anomaly_oof_and_test, bank capped by the product default), and with
  both; and the product's own ``head.anomaly_feature`` (supervised + one-class score), with ``"auto"``'s
  verdict (training/phases.anomaly_feature_verdict: kept only when its out-of-fold AP beats the head's by
  more than one paired standard error), so "multi + logistic + anomaly_feature auto" is reproduced in the
  same run.

magnetic: the 5 group folds of folds_5.csv (fold k testing, the other four training); per fold and mean
  +- sd: test F1 at the chosen threshold and at 0.5, ROC AUC, AP, CV estimate and its gap; the paired
  per-fold differences against the supervised head and against anomaly_feature auto.
casting: train folder -> test folder, all 715 test images and without the 64 leaked duplicates.

    nice -n 15 python benchmarks/patch_mil.py [magnetic|casting|all] [--folds 0,1,2,3,4] [--out FILE]
        [--patch-layers block_13_expand_relu out_relu --patch-dim 512]

--patch-layers / --patch-dim: other patch features for the MIL head only (the one-class score keeps the defaults),
e.g. the layers ``model.features: multi`` pools (block_13_expand_relu and the last block, 7 x 7 grid at 224 px),
projected to 512. The supervised run and the one-class scores are cached per fold under ~/.cache/keeneye/patch-mil,
so a second feature set costs only the MIL fits.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from anomaly_stacking import (CACHE as TUNE_CACHE, RESULTS, SHARED, anomaly_oof_and_test, config, fold_manifest, logit, patch_features, scores,
                              stacked, supervised_run)

POOLINGS = ("top1", "top4", "lse4")
DECAYS = (1e-4, 1e-3)
STEPS = (50, 100, 200)
LEARNING_RATE = 0.01
CACHE = TUNE_CACHE.parent / "patch-mil"
#: The supervised head alone (head.anomaly_feature is "auto" by default now; the phases run here never add it anyway,
#: the combinations with the one-class score are stacked below).
SUPERVISED = ["model.features=multi", "head.kind=logistic", "head.anomaly_feature=false"]
KINDS = ("supervised", "anomaly_feature", "anomaly_feature_auto", "mil", "mil+supervised", "mil+anomaly",
         "mil+supervised+anomaly")


def candidates() -> list[tuple[str, float]]:
    return [(p, d) for p in POOLINGS for d in DECAYS]


def pooled_logits(z, poolings: list[str]):
    """Image logits (N, C) from patch logits z (N, P, C): candidate c pooled by poolings[c] (a smooth maximum)."""
    import tensorflow as tf

    zt = tf.transpose(z, [0, 2, 1])  # (N, C, P)
    top = tf.math.top_k(zt, k=max([int(p[3:]) for p in poolings if p.startswith("top")] or [1])).values  # sorted, largest first
    n_patches = tf.cast(tf.shape(z)[1], z.dtype)
    columns = []
    for c, pooling in enumerate(poolings):
        if pooling.startswith("top"):
            columns.append(tf.reduce_mean(top[:, c, : int(pooling[3:])], axis=1))
        else:
            r = float(pooling[3:])
            columns.append((tf.reduce_logsumexp(r * zt[:, c], axis=1) - tf.math.log(n_patches)) / r)
    return tf.stack(columns, axis=1)


def fit_mil(x: np.ndarray, y: np.ndarray, evaluate: list[np.ndarray], cands: list[tuple[str, float]], steps=STEPS,
            seed: int = 0) -> dict[int, list[np.ndarray]]:
    """Train every candidate on (x (N, P, D) float32, y), return {steps: [image logits (n, C) of each array in evaluate]}.

    The features are standardised with the training patches' mean and sd (per channel). Full-batch Adam:
    the whole set is a few hundred MB at most, and the gradient is exact, so the run is deterministic.
    """
    import keras
    import tensorflow as tf

    mean = x.reshape(-1, x.shape[-1]).mean(axis=0)
    scale = np.maximum(x.reshape(-1, x.shape[-1]).std(axis=0), 1e-6)
    xs = tf.constant((x - mean) / scale, tf.float32)
    weight = np.where(y == 1, len(y) / (2.0 * max(y.sum(), 1)), len(y) / (2.0 * max((1 - y).sum(), 1)))
    yt, wt = tf.constant(y[:, None].repeat(len(cands), 1), tf.float32), tf.constant(weight[:, None], tf.float32)
    poolings = [p for p, _ in cands]
    decay = tf.constant([d for _, d in cands], tf.float32)
    rng = np.random.default_rng(seed)
    w = tf.Variable(rng.normal(0.0, 0.01, (x.shape[-1], len(cands))).astype(np.float32))
    b = tf.Variable(np.zeros(len(cands), np.float32))
    optimizer = keras.optimizers.Adam(LEARNING_RATE)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            logits = pooled_logits(tf.einsum("npd,dc->npc", xs, w) + b, poolings)
            bce = tf.nn.sigmoid_cross_entropy_with_logits(yt, logits)
            loss = tf.reduce_sum(tf.reduce_mean(wt * bce, axis=0) + decay * tf.reduce_sum(w * w, axis=0))
        optimizer.apply_gradients(zip(tape.gradient(loss, [w, b]), [w, b]))

    def predict(array: np.ndarray) -> np.ndarray:
        z = tf.einsum("npd,dc->npc", tf.constant((array - mean) / scale, tf.float32), w) + b
        return pooled_logits(z, poolings).numpy().astype(np.float64)

    out, done = {}, 0
    for target in sorted(steps):
        for _ in range(target - done):
            step()
        done = target
        out[target] = [predict(e) for e in evaluate]
    return out


def grid(features: np.ndarray, rows: np.ndarray) -> np.ndarray:
    return np.asarray(features[rows], np.float32).reshape(len(rows), -1, features.shape[-1])


def mil_cross_validated(features: np.ndarray, pool: np.ndarray, y: np.ndarray, folds: np.ndarray, test: np.ndarray) -> dict:
    """Choose (pooling, decay, steps) on out-of-fold AP in `folds`, threshold out of fold, refit on all `pool`, score `test`."""
    from sklearn.metrics import average_precision_score

    from keeneye.evaluation.threshold import choose_threshold

    cands = candidates()
    oof = {s: np.full((len(pool), len(cands)), np.nan) for s in STEPS}
    for k in range(int(folds.max()) + 1):
        held = folds == k
        found = fit_mil(grid(features, pool[~held]), y[~held], [grid(features, pool[held])], cands)
        for s in STEPS:
            oof[s][held] = found[s][0]
    table = [{"pooling": p, "decay": d, "steps": s, "oof_ap": float(average_precision_score(y, oof[s][:, c]))}
             for s in STEPS for c, (p, d) in enumerate(cands)]
    best = max(table, key=lambda r: r["oof_ap"])
    column = cands.index((best["pooling"], best["decay"]))
    best_oof = oof[best["steps"]][:, column]
    choice = choose_threshold(y, 1 / (1 + np.exp(-best_oof)), source="out_of_fold")
    refit = fit_mil(grid(features, pool), y, [grid(features, test)], cands)  # all of them: the test APs below are for information
    return {"chosen": best, "candidates": table, "oof_logit": best_oof, "test_logit": refit[best["steps"]][0][:, column],
            "threshold": choice.threshold, "test_logits_all": {s: refit[s][0] for s in STEPS}}


def evaluate(run, mil: dict, a_oof: np.ndarray, a_test: np.ndarray, keep: np.ndarray | None = None) -> dict:
    """Every kind's test scores (on `keep` rows) with its own out-of-fold threshold and estimate."""
    from keeneye.evaluation.threshold import choose_threshold
    from keeneye.training.crossval import fold_scores
    from keeneye.training.phases import anomaly_feature_verdict

    y, folds = run.y_pool, run.folds
    keep = np.ones(len(run.y_test), bool) if keep is None else keep
    out = {"supervised": scores(run.y_test[keep], run.test_probability[keep], run.threshold, y, run.oof, folds)}
    p_mil_oof, p_mil_test = 1 / (1 + np.exp(-mil["oof_logit"])), 1 / (1 + np.exp(-mil["test_logit"]))
    out["mil"] = scores(run.y_test[keep], p_mil_test[keep], mil["threshold"], y, p_mil_oof, folds)
    columns_oof = {"supervised": logit(run.oof), "mil": mil["oof_logit"], "anomaly": np.log(np.maximum(a_oof, 1e-12))}
    columns_test = {"supervised": logit(run.test_probability), "mil": mil["test_logit"],
                    "anomaly": np.log(np.maximum(a_test, 1e-12))}
    crossed = {}
    for kind, parts in (("anomaly_feature", ("supervised", "anomaly")), ("mil+supervised", ("mil", "supervised")),
                        ("mil+anomaly", ("mil", "anomaly")), ("mil+supervised+anomaly", ("mil", "supervised", "anomaly"))):
        cross, p_test, coef = stacked(np.c_[tuple(columns_oof[p] for p in parts)], y, folds,
                                      np.c_[tuple(columns_test[p] for p in parts)])
        choice = choose_threshold(y, cross, source="out_of_fold")
        crossed[kind] = cross
        out[kind] = scores(run.y_test[keep], p_test[keep], choice.threshold, y, cross, folds) | {"stacker_coef_standardised": coef}
    verdict = anomaly_feature_verdict(fold_scores(y, crossed["anomaly_feature"], folds, 0.5)["average_precision"],
                                      fold_scores(y, run.oof, folds, 0.5)["average_precision"])
    out["anomaly_feature_auto"] = dict(out["anomaly_feature" if verdict["kept"] else "supervised"]) | {"verdict": verdict}
    return out


def mean_sd(values: list[float]) -> str:
    return f"{statistics.fmean(values):.3f} +- {statistics.stdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def summarise(folds: dict[int, dict]) -> dict:
    """Mean +- sd of every metric per kind, and paired per-fold differences of each MIL kind against the two references."""
    metrics = ("f1", "f1_at_0.5", "roc_auc", "average_precision", "cv_f1", "cv_gap")
    ks = sorted(folds)
    out = {kind: {m: [folds[k][kind][m] for k in ks] for m in metrics} for kind in KINDS}
    for reference in ("supervised", "anomaly_feature_auto"):
        for kind in KINDS:
            if kind.startswith("mil"):
                out[f"{kind} - {reference}"] = {m: [folds[k][kind][m] - folds[k][reference][m] for k in ks]
                                                for m in ("f1", "f1_at_0.5", "roc_auc", "average_precision")}
    return out


def print_summary(title: str, summary: dict) -> None:
    print(f"{title}:")
    for kind, values in summary.items():
        print(f"  {kind:46s}" + "  ".join(f"{m} {mean_sd(v)}" for m, v in values.items()), flush=True)


def one_line(name: str, result: dict) -> str:
    return f"{name}: " + "; ".join(f"{kind} F1 {result[kind]['f1']:.3f} AUC {result[kind]['roc_auc']:.3f} "
                                   f"AP {result[kind]['average_precision']:.3f}" for kind in KINDS)


def mil_summary(mil: dict, y_test: np.ndarray) -> dict:
    """The choice, every candidate's out-of-fold AP and (for information only, never for choosing) its test AP."""
    from sklearn.metrics import average_precision_score

    cands = candidates()
    table = [r | {"test_ap_for_information": float(average_precision_score(
        y_test, mil["test_logits_all"][r["steps"]][:, cands.index((r["pooling"], r["decay"]))]))} for r in mil["candidates"]]
    return {"chosen": mil["chosen"], "threshold": mil["threshold"], "candidates": table}


def supervised_and_anomaly(name: str, cfg, features: np.ndarray, index: dict[str, int], anomaly):
    """The supervised run and the one-class scores (out of fold and test), cached on disk: they do not depend on the
    MIL head, so runs with other MIL patch features reuse them."""
    import hashlib
    import pickle

    key = hashlib.sha256(json.dumps([SUPERVISED, anomaly.model_dump()], sort_keys=True).encode()).hexdigest()[:12]
    target = CACHE / f"{name}_{key}.pkl"
    if target.is_file():
        return pickle.loads(target.read_bytes())
    run = supervised_run(cfg)
    found = (run, *anomaly_oof_and_test(features, index, run, anomaly, seed=0))
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(pickle.dumps(found))
    return found


def magnetic(fold_ids: list[int], anomaly, patches) -> dict:
    root = SHARED / "data" / "magnetic-tile"
    frame = pd.read_csv(root / "folds_5.csv")
    paths = [str((root / p).resolve()) for p in frame["path"]]
    features = patch_features("magnetic-tile", paths, anomaly, seed=0)
    mil_features = features if patches == anomaly else patch_features("magnetic-tile", paths, patches, seed=0)
    index = {p: i for i, p in enumerate(paths)}
    work = Path(tempfile.mkdtemp(prefix="keeneye-bench-patch-mil-"))
    folds = {}
    for k in fold_ids:
        started = time.perf_counter()
        cfg = config(work, f"multi-fold{k}", {"positive_class": "defect", "data": {"manifest_path": str(fold_manifest(root, work, k))}},
                     SUPERVISED)
        run, a_oof, a_test = supervised_and_anomaly(f"magnetic-fold{k}", cfg, features, index, anomaly)
        pool, test = np.array([index[p] for p in run.pool_paths]), np.array([index[p] for p in run.test_paths])
        mil_started = time.perf_counter()
        mil = mil_cross_validated(mil_features, pool, run.y_pool.astype(int), run.folds, test)
        folds[k] = evaluate(run, mil, a_oof, a_test) | {"mil_choice": mil_summary(mil, run.y_test), "head": run.head,
                                                        "mil_seconds": round(time.perf_counter() - mil_started, 1),
                                                        "seconds": round(time.perf_counter() - started, 1)}
        print(one_line(f"fold {k}", folds[k]) + f"; MIL chose {mil['chosen']} ({folds[k]['mil_seconds']:.0f} s)", flush=True)
    summary = summarise(folds)
    print_summary("magnetic-tile (5 group folds)", summary)
    return {"folds": folds, "summary": summary}


def casting(anomaly, patches) -> dict:
    root = SHARED / "data" / "casting" / "casting_data"
    paths = sorted(str(p.resolve()) for p in root.rglob("*.jpeg"))
    features = patch_features("casting", paths, anomaly, seed=0)
    mil_features = features if patches == anomaly else patch_features("casting", paths, patches, seed=0)
    index = {p: i for i, p in enumerate(paths)}
    leaked = {line.split("\t")[0].split("/")[-1] for line in (SHARED / "data" / "casting" / "DUPLICATES_train_test.tsv").read_text().splitlines() if line}
    work = Path(tempfile.mkdtemp(prefix="keeneye-bench-patch-mil-casting-"))
    started = time.perf_counter()
    cfg = config(work, "casting-multi", {"positive_class": "def_front", "data_folder_path": str(root)}, SUPERVISED)
    run, a_oof, a_test = supervised_and_anomaly("casting", cfg, features, index, anomaly)
    pool, test = np.array([index[p] for p in run.pool_paths]), np.array([index[p] for p in run.test_paths])
    mil = mil_cross_validated(mil_features, pool, run.y_pool.astype(int), run.folds, test)
    dedup = np.array([Path(p).name not in leaked for p in run.test_paths])
    out = {"all": evaluate(run, mil, a_oof, a_test), "deduplicated": evaluate(run, mil, a_oof, a_test, dedup),
           "n_test": len(dedup), "n_deduplicated": int(dedup.sum()), "head": run.head, "mil_choice": mil_summary(mil, run.y_test),
           "seconds": round(time.perf_counter() - started, 1)}
    for split in ("all", "deduplicated"):
        print(one_line(f"casting {split}", out[split]), flush=True)
    print(f"casting MIL chose {mil['chosen']}")
    return out


def main() -> int:
    from anomaly_tune import write_results  # the sibling script: one place for the results file

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("which", nargs="?", default="magnetic", choices=["magnetic", "casting", "all"])
    parser.add_argument("--folds", default="0,1,2,3,4")
    parser.add_argument("--patch-layers", nargs="+", default=None,
                        help="MobileNetV2 layers of the MIL head's patch features (default: the one-class mode's)")
    parser.add_argument("--patch-dim", type=int, default=None,
                        help="their random projection depth (default: the one-class mode's; above the depth: unreduced)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    from keeneye.config import AnomalyConfig

    anomaly = AnomalyConfig()
    patches = anomaly.model_copy(update={k: v for k, v in (("layers", args.patch_layers), ("feature_dim", args.patch_dim))
                                         if v is not None})
    started = time.perf_counter()
    results = {"anomaly_settings": anomaly.model_dump(), "poolings": POOLINGS, "decays": DECAYS, "steps": STEPS,
               "learning_rate": LEARNING_RATE, "supervised": SUPERVISED,
               "mil_patch_features": {"layers": list(patches.layers), "feature_dim": patches.feature_dim, "grid": patches.grid}}
    if args.which in ("magnetic", "all"):
        results["magnetic_tile"] = magnetic([int(f) for f in args.folds.split(",")], anomaly, patches)
    if args.which in ("casting", "all"):
        results["casting"] = casting(anomaly, patches)
    results["seconds"] = time.perf_counter() - started
    out = args.out or RESULTS / f"patch_mil_{args.which}.json"
    write_results(results, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
