"""Benchmark: one-class mode (mode "anomaly", PatchCore on MobileNetV2) on casting and magnetic tile.

casting (`keeneye train` with mode "anomaly"; the bank sees only ok_front training images):
  - test image AUROC and F1 at the false-alarm-rate threshold (1% of held-out good images), on the
    whole test split and without the 64 test images that are copies of training images;
  - peak RSS of that train (the process does nothing else before it is read);
  - predict throughput of the anomaly bundle vs a supervised bundle on the same data, side by side in
    one process: the same decoded test images, interleaved repeats, medians (both on the default engine).
magnetic-tile (the 5 group folds of folds_5.csv): for each fold, the bank is built from the good images of
  the fold's training part (minus a group-aware validation part, which sets the false-alarm threshold);
  the fold is scored. Patch features are computed once for all images with the bundle's own feature
  graph, then each fold uses the same library pieces train uses (build_bank, choose_anomaly_threshold).

    python benchmarks/anomaly.py [casting|magnetic|all] [--set anomaly.coreset_share=0.1 ...]

ivf (an already trained casting one-class bundle, e.g. one with the whole 10% coreset): test AUROC (whole and
deduplicated) of the bundle and of a copy searched by IVF (anomaly.search "ivf"), and predict throughput of both
next to a supervised bundle, interleaved as above:

    python benchmarks/anomaly.py ivf --bundle RUN --supervised RUN [--nprobe 16]
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
WEIGHTS = SHARED / "weights" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
RESULTS = REPO / "benchmarks" / "results"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def casting_config(work: Path, mode: str, overrides: list[str]):
    from keeneye.config import config_from_dict

    return config_from_dict(
        {"data_folder_path": str(SHARED / "data" / "casting" / "casting_data"), "output_dir": str(work / "runs"),
         "run_name": mode, "positive_class": "def_front", "mode": mode,
         "model": {"weights": str(WEIGHTS), "image_size": 224},
         "anomaly": {"threshold_rule": "false_alarm_rate", "false_alarm_rate": 0.01}},
        base_dir=work, overrides=overrides if mode == "anomaly" else [],
    )


def scores_without_duplicates(run_dir: Path) -> dict:
    """AUROC and F1 at the bundle's threshold on the test split, all and without the leaked copies."""
    from sklearn.metrics import f1_score, roc_auc_score

    predictions = pd.read_csv(run_dir / "predictions.csv")
    leaked = {line.split("\t")[0].split("/")[-1] for line in (SHARED / "data" / "casting" / "DUPLICATES_train_test.tsv").read_text().splitlines() if line}
    out = {}
    for name, rows in (("all", predictions), ("deduplicated", predictions[~predictions["path"].map(lambda p: Path(p).name in leaked)])):
        y = (rows["label"] == "def_front").astype(int)
        out[name] = {"n": int(len(rows)), "auroc": float(roc_auc_score(y, rows["probability"])),
                     "f1": float(f1_score(y, (rows["probability"] >= 0.5).astype(int)))}
    return out


def throughput(bundles: dict[str, Path], paths: list[str], repeats: int = 5, other_searches: bool = True) -> dict:
    """Images per second of Predictor.predict_images per bundle: same images, interleaved repeats, medians.

    Also, per repeat and in the same loop, where the one-class time goes: decoding the files (the same
    for both modes), the patch feature graph, the nearest-neighbour search (the bundle's backend, and with
    `other_searches` faiss IndexFlatL2 on the same bank and queries and the uncapped bank), the IVF search of an
    "anomaly_ivf" bundle when one is timed, and the re-weighting.
    """
    from keeneye.data.decode import load_image
    from keeneye.inference.predictor import Predictor
    from keeneye.model.patchcore import PatchBank, reweighted_scores

    images = [load_image(p) for p in paths]
    predictors = {name: Predictor.from_bundle(path) for name, path in bundles.items()}
    for predictor in predictors.values():
        predictor.predict_images(images[:8])  # warm up
    engine = predictors["anomaly"].engine
    batch = np.stack([predictors["anomaly"].input_spec.prepare(image) for image in images])
    faiss_bank = PatchBank(engine.bank.features, backend="faiss")
    info = predictors["anomaly"].bundle.metadata["anomaly"]
    uncapped = math.ceil(info["coreset_share"] * info["training_patches"])  # the bank without max_bank_size (timing only:
    big_bank = PatchBank(np.resize(engine.bank.features, (uncapped, engine.bank.dim)))  # search time depends on its size)
    rates: dict[str, list[float]] = {name: [] for name in predictors}
    parts: dict[str, list[float]] = {k: [] for k in ("decode", "features", "search", "search_ivf", "search_faiss", "reweight",
                                                     "search_uncapped_bank")}

    def timed(key: str, call):
        started = time.perf_counter()
        out = call()
        parts[key].append((time.perf_counter() - started) / len(images) * 1000)
        return out

    ivf = predictors.get("anomaly_ivf")
    for _ in range(repeats):
        for name, predictor in predictors.items():
            started = time.perf_counter()
            predictor.predict_images(images)
            rates[name].append(len(images) / (time.perf_counter() - started))
        timed("decode", lambda: [load_image(p) for p in paths])
        patches = timed("features", lambda: np.concatenate([engine.features(batch[i : i + 32]) for i in range(0, len(batch), 32)]))
        distances, index = timed("search", lambda: engine.bank.nearest(patches))
        if ivf is not None:
            timed("search_ivf", lambda: ivf.engine.bank.nearest(patches))
        timed("reweight", lambda: reweighted_scores(engine.bank, patches, distances, index, engine.neighbours, engine.top_k))
        if other_searches:
            timed("search_faiss", lambda: faiss_bank.nearest(patches))
            timed("search_uncapped_bank", lambda: big_bank.nearest(patches))
    return {"predict": {name: {"median_img_per_s": statistics.median(r), "runs": r, "engine": predictors[name].engine_name}
                        for name, r in rates.items()},
            "anomaly_ms_per_image_median": {k: statistics.median(v) for k, v in parts.items() if v},
            "bank": {"size": len(engine.bank), "dim": engine.bank.dim, "neighbours": engine.neighbours,
                     "uncapped_size_timed": uncapped}}


def ivf_copy(bundle: Path, folder: Path, nprobe: int | None) -> Path:
    """A copy of a one-class bundle whose metadata says search "ivf" (the bank, threshold and feature graph unchanged).

    The raw threshold stays the one chosen with exact search; IVF distances are never smaller, so the
    copy flags at most slightly more. AUROC does not depend on the threshold.
    """
    import shutil

    from keeneye.config import AnomalyConfig

    copy = Path(shutil.copytree(bundle, folder / f"{bundle.name}-ivf"))
    metadata = json.loads((copy / "metadata.json").read_text())
    metadata["anomaly"] |= {"search": "ivf", "nprobe": nprobe or AnomalyConfig().nprobe}
    (copy / "metadata.json").write_text(json.dumps(metadata, indent=2))
    return copy


def predict_testing(bundle: Path) -> None:
    """Rewrite a bundle's predictions.csv by predicting its testing rows again (for a copy whose search changed)."""
    from keeneye.inference.predictor import Predictor

    manifest = pd.read_csv(bundle / "manifest.csv")
    rows = manifest[manifest["evaluated"]]
    out = Predictor.from_bundle(bundle).predict_paths(rows["path"].tolist())
    pd.DataFrame({"path": rows["path"].to_numpy(), "label": rows["label"].to_numpy(),
                  "probability": out["probability"].to_numpy()}).to_csv(bundle / "predictions.csv", index=False)


def existing(anomaly: Path, supervised: Path, nprobe: int | None) -> dict:
    """Exact vs IVF search on an already trained one-class bundle, next to a supervised one: test scores and throughput."""
    work = Path(tempfile.mkdtemp(prefix="keeneye-bench-anomaly-ivf-"))
    ivf = ivf_copy(anomaly, work, nprobe)
    predict_testing(ivf)
    bundles = {"anomaly": anomaly, "anomaly_ivf": ivf, "supervised": supervised}
    test_paths = sorted(str(p) for p in (SHARED / "data" / "casting" / "casting_data" / "test").rglob("*.jpeg"))[::11][:64]
    speed = throughput(bundles, test_paths, other_searches=False)
    predict = speed["predict"]
    return {
        **{name: scores_without_duplicates(path) for name, path in bundles.items() if name != "supervised"},
        "bank": json.loads((ivf / "metadata.json").read_text())["anomaly"], "throughput": speed,
        "throughput_ratio": {name: predict[name]["median_img_per_s"] / predict["supervised"]["median_img_per_s"]
                             for name in bundles if name != "supervised"},
        "runs": {name: str(path) for name, path in bundles.items()},
    }


def compare_side_by_side(a: Path, b: Path) -> None:
    """What `keeneye runs compare A B` prints for the two bundles (one-class next to supervised)."""
    from rich.console import Console

    from keeneye.runs import compare_runs

    for table in compare_runs(a, b).tables():
        Console(width=140).print(table)


def casting(overrides: list[str], also: list[str]) -> dict:
    """Train the one-class bundle (and, with `also`, a second one: the same overrides plus those), then a supervised one."""
    from rich.console import Console

    from keeneye import api

    work = Path(tempfile.mkdtemp(prefix="keeneye-bench-anomaly-"))
    started = time.perf_counter()
    anomaly = api.train(casting_config(work, "anomaly", overrides), console=Console(quiet=True))
    seconds = time.perf_counter() - started
    rss = peak_rss_mb()  # the first train in this process: the bank from the full casting good set
    metadata = json.loads((anomaly.run_dir / "metadata.json").read_text())
    bundles = {"anomaly": anomaly.run_dir}
    if also:
        second = casting_config(work, "anomaly", overrides + also).model_copy(update={"run_name": "anomaly-also"})
        bundles["anomaly_also"] = api.train(second, console=Console(quiet=True)).run_dir
    supervised = api.train(casting_config(work, "supervised", []), console=Console(quiet=True))
    bundles["supervised"] = supervised.run_dir
    test_paths = sorted(str(p) for p in (SHARED / "data" / "casting" / "casting_data" / "test").rglob("*.jpeg"))[::11][:64]
    speed = throughput(bundles, test_paths)
    compare_side_by_side(supervised.run_dir, anomaly.run_dir)
    predict = speed["predict"]
    return {
        **{name: scores_without_duplicates(path) for name, path in bundles.items()},
        "train_s": seconds, "peak_rss_mb_train": rss, "bank": metadata["anomaly"], "threshold": metadata["threshold_choice"],
        "image_size": metadata["input"]["image_size"], "throughput": speed,
        "throughput_ratio": {name: predict[name]["median_img_per_s"] / predict["supervised"]["median_img_per_s"]
                             for name in bundles if name != "supervised"},
        "runs": {name: str(path) for name, path in bundles.items()}, "overrides": overrides, "also": also,
    }


def magnetic_features(cfg, frame: pd.DataFrame, root: Path) -> np.ndarray:
    from keeneye.model.backbone import resolve_weights
    from keeneye.runtime import choice as engines
    from keeneye.model.patchcore import build_patch_extractor, raw_patch_model
    from keeneye.runtime.batches import iter_batches

    weights = resolve_weights(cfg.model.weights, cfg.model.alpha, cfg.model.image_size)
    a = cfg.anomaly
    fitted = a.standardise or a.projection == "pca"
    extractor = build_patch_extractor(cfg.model.alpha, cfg.model.image_size, weights.path, a.layers,
                                      projection_dim=a.feature_dim, seed=cfg.training.seed, grid=a.grid, fitted=fitted)
    # With a fitted transform the unreduced patches are kept: each fold fits it on its own good bank images.
    engine = engines.make_feature_engine(raw_patch_model(extractor) if fitted else extractor)
    features = None
    for keys, batch, failures in iter_batches(enumerate(str(root / p) for p in frame["path"]), cfg.model.image_size, 16):
        assert not failures, failures
        out = engine(batch)
        if features is None:
            features = np.zeros((len(frame), *out.shape[1:]), np.float32)
        features[keys] = out
    return features


def fitted_features(cfg, features: np.ndarray, bank_rows: np.ndarray) -> np.ndarray:
    """The features as the bundle's graph would give them: the transform fitted as train fits it, on bank images only."""
    from keeneye.model.patchcore import fit_patch_transform
    from keeneye.training.anomaly import TRANSFORM_FIT_IMAGES, TRANSFORM_FIT_PATCHES

    a = cfg.anomaly
    if not (a.standardise or a.projection == "pca"):
        return features
    rng = np.random.default_rng(cfg.training.seed)
    chosen = np.sort(rng.choice(bank_rows, min(len(bank_rows), TRANSFORM_FIT_IMAGES), replace=False))
    patches = features[chosen].reshape(-1, features.shape[-1])
    patches = patches[rng.choice(len(patches), min(len(patches), TRANSFORM_FIT_PATCHES), replace=False)]
    kernel, bias = fit_patch_transform(patches, a.feature_dim, a.projection, a.standardise, cfg.training.seed)
    return (features @ kernel + bias).astype(np.float32)


def magnetic(overrides: list[str]) -> dict:
    from sklearn.metrics import f1_score, roc_auc_score

    from keeneye.config import config_from_dict
    from keeneye.model.patchcore import normalise_scores, reweighted_scores
    from keeneye.training.anomaly import build_bank, choose_anomaly_threshold

    root = SHARED / "data" / "magnetic-tile"
    frame = pd.read_csv(root / "folds_5.csv")
    cfg = config_from_dict({"data_folder_path": str(root), "mode": "anomaly", "model": {"weights": str(WEIGHTS)}},
                           base_dir=REPO, overrides=overrides)
    started = time.perf_counter()
    features = magnetic_features(cfg, frame, root)
    y, fold, group = frame["binary_label"].to_numpy(), frame["fold"].to_numpy(), frame["group"].to_numpy()
    folds = []
    for k in sorted(set(fold)):
        train_groups = np.unique(group[(fold != k) & (y == 0)])
        rng = np.random.default_rng(k)
        val_groups = set(rng.choice(train_groups, max(1, round(0.15 * len(train_groups))), replace=False))
        good = (fold != k) & (y == 0)
        in_val = np.array([g in val_groups for g in group])
        bank_rows, val_rows, test_rows = good & ~in_val, good & in_val, fold == k
        a = cfg.anomaly
        fold_features = fitted_features(cfg, features, np.flatnonzero(bank_rows))
        bank = build_bank(fold_features[bank_rows].reshape(-1, fold_features.shape[-1]), a.coreset_share, a.max_bank_size,
                          cfg.training.seed)

        def score(rows):
            return reweighted_scores(bank, fold_features[rows], *bank.nearest(fold_features[rows]), a.score_neighbours,
                                     a.score_top_k)

        threshold = choose_anomaly_threshold(score(val_rows), np.empty(0), "false_alarm_rate", a.false_alarm_rate, 5)
        scores = score(test_rows)
        decided = normalise_scores(scores, threshold.raw) >= 0.5
        folds.append({"fold": int(k), "auroc": float(roc_auc_score(y[test_rows], scores)),
                      "f1": float(f1_score(y[test_rows], decided.astype(int))), "bank_size": len(bank),
                      "n_bank_images": int(bank_rows.sum()), "n_test": int(test_rows.sum())})
        print(f"  fold {k}: AUROC {folds[-1]['auroc']:.4f} F1 {folds[-1]['f1']:.4f} bank {len(bank)}", flush=True)
    auroc = [f["auroc"] for f in folds]
    f1 = [f["f1"] for f in folds]
    return {"folds": folds, "auroc_mean": statistics.mean(auroc), "auroc_sd": statistics.stdev(auroc),
            "f1_mean": statistics.mean(f1), "f1_sd": statistics.stdev(f1), "seconds": time.perf_counter() - started,
            "overrides": overrides, "settings": cfg.anomaly.model_dump()}


def main() -> int:
    from anomaly_tune import write_results  # the sibling script: one place for the results file

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("which", nargs="?", default="all", choices=["casting", "magnetic", "all", "ivf"])
    parser.add_argument("--bundle", type=Path, help="ivf: a trained casting one-class bundle (timed exact and as an IVF copy)")
    parser.add_argument("--supervised", type=Path, help="ivf: a casting supervised bundle timed beside it")
    parser.add_argument("--nprobe", type=int, default=None, help="ivf: lists searched (default: anomaly.nprobe's default)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override, e.g. anomaly.coreset_share=0.1")
    parser.add_argument("--also", action="append", default=[],
                        help="casting: also train a second one-class bundle with these overrides added, timed in the same loop")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    results = {}
    if args.which in ("magnetic", "all"):
        results["magnetic_tile"] = magnetic(args.overrides)
        m = results["magnetic_tile"]
        print(f"magnetic-tile 5 group folds: AUROC {m['auroc_mean']:.4f} ± {m['auroc_sd']:.4f}, "
              f"F1 at 1% false alarms {m['f1_mean']:.4f} ± {m['f1_sd']:.4f}")
    if args.which in ("casting", "all"):
        results["casting"] = c = casting(args.overrides, args.also)
        print(f"{'casting':<14}{'split':<14}{'n':>5}{'AUROC':>9}{'F1':>9}")
        for mode in c["runs"]:
            for split, r in c[mode].items():
                print(f"{mode:<14}{split:<14}{r['n']:>5}{r['auroc']:>9.4f}{r['f1']:>9.4f}")
        t = c["throughput"]["predict"]
        print("predict img/s (median):", {name: round(r["median_img_per_s"], 1) for name, r in t.items()},
              "ratio to supervised:", {name: round(r, 2) for name, r in c["throughput_ratio"].items()})
        print(f"bank {c['bank']['bank_size']} of {c['bank']['training_patches']} patches; first train peak RSS "
              f"{c['peak_rss_mb_train']:.0f} MB, {c['train_s']:.0f} s")
        print("one-class ms per image (median):", {k: round(v, 2) for k, v in c["throughput"]["anomaly_ms_per_image_median"].items()})
    if args.which == "ivf":
        results["casting_ivf"] = c = existing(args.bundle, args.supervised, args.nprobe)
        for mode in ("anomaly", "anomaly_ivf"):
            for split, r in c[mode].items():
                print(f"{mode:<14}{split:<14}{r['n']:>5}{r['auroc']:>9.4f}{r['f1']:>9.4f}")
        print("predict img/s (median):", {name: round(r["median_img_per_s"], 1) for name, r in c["throughput"]["predict"].items()},
              "ratio to supervised:", {name: round(r, 2) for name, r in c["throughput_ratio"].items()})
        print("one-class ms per image (median):", {k: round(v, 2) for k, v in c["throughput"]["anomaly_ms_per_image_median"].items()})
    out = args.out or RESULTS / f"anomaly_{args.which}.json"
    write_results(results, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
