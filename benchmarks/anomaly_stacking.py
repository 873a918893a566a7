"""Probe (issues #11 / #13 part 5): does the one-class patch score help the supervised model as one more feature?

Why: the supervised head sees globally pooled embeddings, which can miss a small local defect; the
one-class mode's patch distances (PatchCore on block_6_expand_relu + block_12_add) see it. If the two
signals are complementary, a stacker on both should beat the supervised model alone.

Protocol (nothing is chosen on a test split):

* **Supervised**: keeneye's own supervised phases (training/phases.py: scan, embed from the shared
  embedding cache, split, cross-validated head, published refit head, out-of-fold threshold), run
  exactly as ``keeneye train`` runs them. Its K group folds over training + validation give every
  training row an out-of-fold (OOF) probability; the published head gives the test probabilities.
* **Anomaly, out of fold**: in the same group folds, the memory bank is the coreset of the good
  images of the other folds, and the held-out fold is scored (an image is never scored against its
  own patches nor its own group's). **Anomaly, test**: bank from all good training images. The patch
  features are the product's graph with the config defaults (``anomaly.*``), cached on disk; bank,
  coreset and score are keeneye's (training/anomaly.build_bank, model/patchcore.reweighted_scores).
* **Stacker**: standardised logistic regression (scikit-learn) on [supervised logit, log anomaly
  score], fitted on the OOF rows, applied to the test rows. Its threshold is keeneye's F1 rule
  (evaluation/threshold.choose_threshold) on *cross-fitted* stacked OOF probabilities (for each fold,
  the stacker fitted on the other folds' OOF rows), which also give the cross-validated estimate.
  "anomaly alone" is the same stacker on the log anomaly score only (a Platt scaling of it).

magnetic: the 5 group folds of folds_5.csv (fold k testing, the other four training); per fold and mean
  +- sd, for each mode: test F1 at the chosen threshold and at 0.5, ROC AUC, AP, the CV estimate and its
  gap to the test F1; and the paired per-fold differences stacked - supervised.
casting: train folder -> test folder, all 715 test images and without the 64 leaked duplicates.

    nice -n 15 python benchmarks/anomaly_stacking.py [magnetic|casting|all] [--modes default multi] [--max-bank-size N] [--out FILE]

The modes: ``default`` = model.features gap + head.kind dense (keeneye's defaults), ``multi`` =
model.features multi + head.kind logistic (the best frozen mode on magnetic tile).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
WEIGHTS = SHARED / "weights" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
CACHE = Path.home() / ".cache" / "keeneye" / "anomaly-tune"
RESULTS = REPO / "benchmarks" / "results"
MODES = {"default": [], "multi": ["model.features=multi", "head.kind=logistic"]}
KINDS = ("supervised", "anomaly", "stacked")


@dataclass
class SupervisedRun:
    """What keeneye's supervised phases decided, by image path: OOF rows (with folds) and test rows."""

    pool_paths: list[str]
    y_pool: np.ndarray
    folds: np.ndarray
    oof: np.ndarray
    test_paths: list[str]
    y_test: np.ndarray
    test_probability: np.ndarray
    threshold: float
    head: str


def supervised_run(cfg) -> SupervisedRun:
    """The phases of `keeneye train` up to the threshold (api._train without publishing a bundle)."""
    import keras
    from rich.console import Console

    from keeneye.inference.engines import make_feature_engine
    from keeneye.terminal import Reporter
    from keeneye.training import phases
    from keeneye.training.distribute import choose_devices, op_determinism

    reporter = Reporter.of(Console(quiet=True))
    devices = choose_devices(cfg.training.distribute)
    with op_determinism(cfg.training.deterministic):
        keras.utils.set_random_seed(cfg.training.seed)
        scanned = phases.scan(cfg, reporter)
        backbone = phases.build_backbone(cfg, scanned)
        engine = make_feature_engine(backbone.extractor, cache_folder=backbone.cache_folder)
        prepared = phases.audit(cfg, scanned, backbone, phases.embed(cfg, scanned, backbone, engine, reporter), reporter)
        partial = phases.open_run_state(cfg, prepared, None, reporter)
        fit = phases.fit_head(cfg, prepared, backbone.extractor, partial, devices, (), reporter)
        choice = phases.choose_threshold(cfg, prepared, fit, reporter)
    assert fit.cv is not None, "the probe needs the cross-validated head (training.cv_folds >= 2)"
    sets, paths = prepared.sets, prepared.manifest["path"].to_numpy()
    pool, testing = sets["training"] | sets["validation"], sets["testing"]
    return SupervisedRun(list(paths[pool]), prepared.y[pool], np.asarray(fit.cv.folds), np.asarray(fit.cv.best.oof, np.float64),
                         list(paths[testing]), prepared.y[testing], fit.probability(testing).astype(np.float64),
                         float(choice.threshold), fit.cv.best.candidate.name)


def patch_features(name: str, paths: list[str], anomaly, seed: int) -> np.ndarray:
    """(N, H, W, D) patch features of the product's one-class graph (config defaults), cached as float16."""
    from anomaly_tune import cached_features  # the sibling script: one cached extraction loop
    from keeneye.model.patchcore import build_patch_extractor

    build = lambda: build_patch_extractor(1.0, 224, WEIGHTS, anomaly.layers, projection_dim=anomaly.feature_dim,  # noqa: E731
                                          seed=seed, grid=anomaly.grid)
    layers = "+".join(anomaly.layers)
    return cached_features(CACHE / f"stacking_{name}_224_{layers}_{anomaly.feature_dim}.npy", build, paths, 224, name)


def anomaly_scores(features: np.ndarray, bank_rows: np.ndarray, rows: np.ndarray, anomaly, seed: int) -> np.ndarray:
    """Raw one-class scores of `rows`, the bank built from the good images `bank_rows` as train builds it."""
    from keeneye.model.patchcore import reweighted_scores
    from keeneye.training.anomaly import build_bank

    pool = np.asarray(features[np.sort(bank_rows)], np.float32).reshape(-1, features.shape[-1])
    bank = build_bank(pool, anomaly.coreset_share, anomaly.max_bank_size, seed)
    query = np.asarray(features[rows], np.float32)
    return reweighted_scores(bank, query, *bank.nearest(query), anomaly.score_neighbours, anomaly.score_top_k)


def anomaly_oof_and_test(features, index: dict[str, int], run: SupervisedRun, anomaly, seed: int, score=anomaly_scores):
    """Out-of-fold raw scores of the training rows (bank from the other folds' good images) and the test rows' scores;
    `score(features, bank_rows, rows, anomaly, seed)` computes them (anomaly_views.py passes its variants)."""
    pool = np.array([index[p] for p in run.pool_paths])
    good = run.y_pool == 0
    oof = np.full(len(pool), np.nan)
    for k in range(int(run.folds.max()) + 1):
        held = run.folds == k
        oof[held] = score(features, pool[good & ~held], pool[held], anomaly, seed)
    test = score(features, pool[good], np.array([index[p] for p in run.test_paths]), anomaly, seed)
    return oof, test


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


def stacker():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000))


def stacked(x_oof: np.ndarray, y: np.ndarray, folds: np.ndarray, x_test: np.ndarray):
    """(cross-fitted OOF probabilities, test probabilities, coefficients of the stacker fitted on all OOF rows)."""
    cross = np.full(len(y), np.nan)
    for k in range(int(folds.max()) + 1):
        held = folds == k
        cross[held] = stacker().fit(x_oof[~held], y[~held]).predict_proba(x_oof[held])[:, 1]
    final = stacker().fit(x_oof, y)
    return cross, final.predict_proba(x_test)[:, 1], final[-1].coef_.ravel().tolist()


def scores(y_test, p_test, threshold, y_oof, p_oof, folds) -> dict:
    """Test F1 at the threshold and at 0.5, AUC, AP, and the CV estimate (crossval.fold_scores) with its gap."""
    from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

    from keeneye.evaluation.metrics import predict_labels
    from keeneye.training.crossval import fold_scores

    f1 = float(f1_score(y_test, predict_labels(p_test, threshold), zero_division=0))
    estimate = fold_scores(np.asarray(y_oof), np.asarray(p_oof), folds, threshold)
    return {"f1": f1, "f1_at_0.5": float(f1_score(y_test, predict_labels(p_test, 0.5), zero_division=0)),
            "roc_auc": float(roc_auc_score(y_test, p_test)), "average_precision": float(average_precision_score(y_test, p_test)),
            "cv_f1": estimate["f1_mean"], "cv_gap": estimate["f1_mean"] - f1, "threshold": float(threshold)}


def evaluate_kinds(run: SupervisedRun, a_oof: np.ndarray, a_test: np.ndarray, keep: np.ndarray | None = None) -> dict:
    """Supervised alone (the product's head and threshold), anomaly alone and stacked, on the test rows (`keep`: a subset)."""
    from keeneye.evaluation.threshold import choose_threshold

    y, folds = run.y_pool, run.folds
    keep = np.ones(len(run.y_test), bool) if keep is None else keep
    out = {"supervised": scores(run.y_test[keep], run.test_probability[keep], run.threshold, y, run.oof, folds)}
    x_oof = np.c_[logit(run.oof), np.log(np.maximum(a_oof, 1e-12))]
    x_test = np.c_[logit(run.test_probability), np.log(np.maximum(a_test, 1e-12))]
    for kind, columns in (("anomaly", [1]), ("stacked", [0, 1])):
        cross, p_test, coef = stacked(x_oof[:, columns], y, folds, x_test[:, columns])
        choice = choose_threshold(y, cross, source="out_of_fold")
        out[kind] = scores(run.y_test[keep], p_test[keep], choice.threshold, y, cross, folds) | {"stacker_coef_standardised": coef}
    return out


def mean_sd(values: list[float]) -> str:
    return f"{statistics.fmean(values):.3f} +- {statistics.stdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def summarise(folds: dict[int, dict]) -> dict:
    """Mean +- sd of every metric per kind, and the paired per-fold differences stacked - supervised."""
    metrics = ("f1", "f1_at_0.5", "roc_auc", "average_precision", "cv_f1", "cv_gap")
    out = {kind: {m: [folds[k][kind][m] for k in sorted(folds)] for m in metrics} for kind in KINDS}
    out["stacked_minus_supervised"] = {m: [folds[k]["stacked"][m] - folds[k]["supervised"][m] for k in sorted(folds)]
                                       for m in ("f1", "f1_at_0.5", "roc_auc", "average_precision")}
    return out


def print_summary(title: str, summary: dict) -> None:
    print(f"{title}:")
    for kind in (*KINDS, "stacked_minus_supervised"):
        print(f"  {kind:26s}" + "  ".join(f"{m} {mean_sd(v)}" for m, v in summary[kind].items()), flush=True)
    print("  paired F1 differences per fold: " + ", ".join(f"{d:+.3f}" for d in summary["stacked_minus_supervised"]["f1"]))


def fold_manifest(data: Path, folder: Path, fold: int) -> Path:
    from magnetic_tile import write_manifest  # the sibling benchmark's manifest: same rows, groups, labels

    return write_manifest(data, folder, fold, with_groups=True)


def config(work: Path, name: str, data: dict, overrides: list[str]):
    from keeneye.config import config_from_dict

    return config_from_dict({"output_dir": str(work / "runs"), "run_name": name, "positive_class": data.pop("positive_class"),
                             "model": {"weights": str(WEIGHTS), "image_size": 224}, "training": {"seed": 0}, **data},
                            base_dir=work, overrides=overrides)


def magnetic(modes: list[str], fold_ids: list[int], anomaly) -> dict:
    root = SHARED / "data" / "magnetic-tile"
    frame = pd.read_csv(root / "folds_5.csv")
    paths = [str((root / p).resolve()) for p in frame["path"]]
    features = patch_features("magnetic-tile", paths, anomaly, seed=0)
    index = {p: i for i, p in enumerate(paths)}
    work = Path(tempfile.mkdtemp(prefix="keeneye-bench-stacking-"))
    results = {}
    for mode in modes:
        folds = {}
        for k in fold_ids:
            started = time.perf_counter()
            cfg = config(work, f"{mode}-fold{k}", {"positive_class": "defect", "data": {"manifest_path": str(fold_manifest(root, work, k))}},
                         MODES[mode])
            run = supervised_run(cfg)
            a_oof, a_test = anomaly_oof_and_test(features, index, run, anomaly, seed=0)
            folds[k] = evaluate_kinds(run, a_oof, a_test) | {"head": run.head, "seconds": round(time.perf_counter() - started, 1)}
            print(f"{mode} fold {k}: " + "; ".join(f"{kind} F1 {folds[k][kind]['f1']:.3f} AUC {folds[k][kind]['roc_auc']:.3f} "
                                                   f"AP {folds[k][kind]['average_precision']:.3f}" for kind in KINDS)
                  + f"; stacker {np.round(folds[k]['stacked']['stacker_coef_standardised'], 2).tolist()}", flush=True)
        results[mode] = {"folds": folds, "summary": summarise(folds)}
        print_summary(f"magnetic-tile {mode}", results[mode]["summary"])
    return results


def casting(modes: list[str], anomaly) -> dict:
    root = SHARED / "data" / "casting" / "casting_data"
    paths = sorted(str(p.resolve()) for p in root.rglob("*.jpeg"))
    features = patch_features("casting", paths, anomaly, seed=0)
    index = {p: i for i, p in enumerate(paths)}
    leaked = {line.split("\t")[0].split("/")[-1] for line in (SHARED / "data" / "casting" / "DUPLICATES_train_test.tsv").read_text().splitlines() if line}
    work = Path(tempfile.mkdtemp(prefix="keeneye-bench-stacking-casting-"))
    results = {}
    for mode in modes:
        started = time.perf_counter()
        run = supervised_run(config(work, f"casting-{mode}", {"positive_class": "def_front", "data_folder_path": str(root)}, MODES[mode]))
        a_oof, a_test = anomaly_oof_and_test(features, index, run, anomaly, seed=0)
        dedup = np.array([Path(p).name not in leaked for p in run.test_paths])
        results[mode] = {"all": evaluate_kinds(run, a_oof, a_test), "deduplicated": evaluate_kinds(run, a_oof, a_test, dedup),
                         "n_test": len(dedup), "n_deduplicated": int(dedup.sum()), "head": run.head,
                         "seconds": round(time.perf_counter() - started, 1)}
        for split in ("all", "deduplicated"):
            r = results[mode][split]
            print(f"casting {mode} {split}: " + "; ".join(f"{kind} F1 {r[kind]['f1']:.4f} (0.5: {r[kind]['f1_at_0.5']:.4f}) "
                                                         f"AUC {r[kind]['roc_auc']:.4f} AP {r[kind]['average_precision']:.4f}" for kind in KINDS),
                  flush=True)
    return results


def main() -> int:
    from anomaly_tune import write_results  # the sibling script: one place for the results file

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("which", nargs="?", default="all", choices=["magnetic", "casting", "all"])
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--folds", default="0,1,2,3,4")
    parser.add_argument("--max-bank-size", type=int, default=None,
                        help="anomaly.max_bank_size for the one-class score (default: the product's; the README's numbers: 5000)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    from keeneye.config import AnomalyConfig

    anomaly = AnomalyConfig(**({} if args.max_bank_size is None else {"max_bank_size": args.max_bank_size}))
    started = time.perf_counter()
    results = {"anomaly_settings": anomaly.model_dump()}
    if args.which in ("magnetic", "all"):
        results["magnetic_tile"] = magnetic(args.modes, [int(f) for f in args.folds.split(",")], anomaly)
    if args.which in ("casting", "all"):
        results["casting"] = casting(args.modes, anomaly)
    results["seconds"] = time.perf_counter() - started
    out = args.out or RESULTS / f"anomaly_stacking_{args.which}.json"
    write_results(results, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
