"""Choose the one-class settings without looking at any test split (issue #13).

Candidates (PatchCore's recipe on MobileNetV2: block_6 + block_13 expand outputs, the two mid-level
stages at strides 8 and 16, 3 x 3 local averaging, the coarser grid because the finer one costs 4x
the search): image size (224, 320), patch feature depth (128, 256), bank cap (2500, 5000, 10000 at a
10% coreset) and the image score (largest patch distance, or PatchCore's re-weighting over 9 neighbours).

casting: only its ``train`` folder. 1200 random ``ok_front`` images build the bank; 400 other
  ``ok_front`` and 400 ``def_front`` training images are scored (AUROC).
magnetic tile: nested in the 5 group folds. For outer fold k, candidates are ranked on an inner
  fold j = (k + 1) % 5 (bank from the good images of the three other folds); the best one is then
  measured on fold k (bank from the good images of the four training folds, as benchmarks/anomaly.py
  does). Fold k never takes part in the choice made for it.

Patch features are computed once per image size with the product's own feature graph and kept
under ~/.cache/keeneye/anomaly-tune (float16). A bank of cap c is the first c patches of one greedy
coreset run (greedy selection is a sequence: its first c picks are the greedy c-coreset of the same pool).

    python benchmarks/anomaly_tune.py [casting|magnetic|all]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
WEIGHTS = SHARED / "weights" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
CACHE = Path.home() / ".cache" / "keeneye" / "anomaly-tune"
RESULTS = REPO / "benchmarks" / "results"
SIZES = [224, 320]
DIMS = [128, 256]
CAPS = [2500, 5000, 10000]
NEIGHBOURS = [1, 9]
SHARE = 0.1
#: The layers this script tuned around (the cache under CACHE holds their features); the layer choice itself
#: is benchmarks/anomaly_layers.py's.
TUNED_LAYERS = ("block_6_expand_relu", "block_13_expand_relu")
#: Magnetic tile's pools are smaller (about 570 good images per inner bank) and the coreset is the cost of each of
#: its 15 banks on the 2-core machine: caps up to 5000 there.
MAGNETIC_CAPS = (2500, 5000)


def features_for(name: str, paths: list[str], size: int) -> np.ndarray:
    """(N, H, W, 256) float16 patch features of the default layers at `size`, cached on disk."""
    from keeneye.model.patchcore import build_patch_extractor

    build = lambda: build_patch_extractor(1.0, size, WEIGHTS, TUNED_LAYERS, projection_dim=256, seed=0)  # noqa: E731
    return np.asarray(cached_features(CACHE / f"{name}_{size}.npy", build, paths, size, f"{name} {size}"))


def cached_features(target: Path, build, paths: list[str], size: int, label: str) -> np.ndarray:
    """`build()`'s extractor over `paths` as float16 (N, ...), memory-mapped from `target` when it exists (the
    extractor is then never built), else computed and saved there.

    The batch loop is keeneye's own (runtime.batches.run_engine), with the fastest verified engine;
    float16 halves the cache (these are ranking features, not the product's).
    """
    from keeneye.runtime.batches import run_engine
    from keeneye.runtime.choice import make_feature_engine

    if target.is_file():
        return np.load(target, mmap_mode="r")
    extractor = build()
    engine = make_feature_engine(extractor)
    out = np.zeros((len(paths), *extractor.output_shape[1:]), np.float16)
    started = time.perf_counter()
    run = run_engine(engine, paths, size, 16, sink=lambda keys, found: out.__setitem__(keys, found))
    assert not run.failures, run.failures
    print(f"  features {label}: {out.shape} in {time.perf_counter() - started:.0f} s", flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    np.save(target, out)
    return out


def coreset_order(patches: np.ndarray, count: int) -> np.ndarray:
    from keeneye.model.patchcore import greedy_coreset

    return greedy_coreset(patches, count, seed=0)


def score_all(features: np.ndarray, bank_rows: np.ndarray, rows: np.ndarray, caps: tuple[int, ...] = CAPS) -> dict:
    """Raw scores of `rows` for every (dim, cap, neighbours) candidate, the bank from `bank_rows`."""
    from keeneye.model.patchcore import PatchBank, reweighted_scores

    pool = features[bank_rows].reshape(-1, features.shape[-1]).astype(np.float32)
    started = time.perf_counter()
    order = coreset_order(pool, min(max(caps), int(np.ceil(SHARE * len(pool)))))
    seconds = time.perf_counter() - started
    query = features[rows].astype(np.float32)
    out = {}
    for dim, cap in itertools.product(DIMS, caps):
        bank = PatchBank(pool[order[:cap], :dim])
        patches = query[..., :dim]
        distances, index = bank.nearest(patches)
        for k in NEIGHBOURS:
            out[(dim, min(cap, len(order)), k)] = reweighted_scores(bank, patches, distances, index, k)
    return {"scores": out, "coreset_s": seconds, "pool": len(pool)}


def casting() -> dict:
    from sklearn.metrics import roc_auc_score

    root = SHARED / "data" / "casting" / "casting_data" / "train"
    rng = np.random.default_rng(0)
    ok = rng.permutation(sorted(str(p) for p in (root / "ok_front").glob("*.jpeg")))
    bad = rng.permutation(sorted(str(p) for p in (root / "def_front").glob("*.jpeg")))[:400]
    paths = list(ok[:1600]) + list(bad)
    y = np.r_[np.zeros(400), np.ones(400)]
    results = []
    for size in SIZES:
        features = features_for("casting-train", paths, size)
        found = score_all(features, np.arange(1200), np.arange(1200, 2000))
        for (dim, cap, k), scores in found["scores"].items():
            results.append({"size": size, "dim": dim, "cap": cap, "neighbours": k, "auroc": float(roc_auc_score(y, scores))})
            print(f"  casting train-part size {size} dim {dim} cap {cap} k {k}: AUROC {results[-1]['auroc']:.4f}", flush=True)
    return {"candidates": results, "best": max(results, key=lambda r: r["auroc"])}


def magnetic() -> dict:
    from sklearn.metrics import f1_score, roc_auc_score

    root = SHARED / "data" / "magnetic-tile"
    frame = pd.read_csv(root / "folds_5.csv")
    paths = [str(root / p) for p in frame["path"]]
    y, fold, group = frame["binary_label"].to_numpy(), frame["fold"].to_numpy(), frame["group"].to_numpy()
    inner: dict[int, list] = {k: [] for k in range(5)}
    outer: dict[int, list] = {k: [] for k in range(5)}
    for size in SIZES:
        features = features_for("magnetic-tile", paths, size)
        for k in range(5):
            j = (k + 1) % 5
            found = score_all(features, np.flatnonzero((fold != k) & (fold != j) & (y == 0)), np.flatnonzero(fold == j), MAGNETIC_CAPS)
            inner[k] += [{"size": size, "dim": d, "cap": c, "neighbours": n, "auroc": float(roc_auc_score(y[fold == j], s))}
                         for (d, c, n), s in found["scores"].items()]
            print(f"  magnetic size {size} inner fold {j} for outer {k} (coreset {found['coreset_s']:.0f} s)", flush=True)
    for k in range(5):  # the outer fold is scored only for the image size chosen for it (all its candidates share one bank)
        size = max(inner[k], key=lambda r: r["auroc"])["size"]
        features = features_for("magnetic-tile", paths, size)
        rng = np.random.default_rng(k)  # the same group-aware validation part benchmarks/anomaly.py holds out
        train_groups = np.unique(group[(fold != k) & (y == 0)])
        val_groups = set(rng.choice(train_groups, max(1, round(0.15 * len(train_groups))), replace=False))
        bank_rows = np.flatnonzero((fold != k) & (y == 0) & ~np.isin(group, list(val_groups)))
        val_rows = np.flatnonzero((fold != k) & (y == 0) & np.isin(group, list(val_groups)))
        test_rows = np.flatnonzero(fold == k)
        found = score_all(features, bank_rows, np.r_[val_rows, test_rows], MAGNETIC_CAPS)
        for (d, c, n), s in found["scores"].items():
            threshold = np.quantile(s[: len(val_rows)], 0.99)  # the false-alarm rule at 1%, on held-out good images only
            tested = s[len(val_rows):]
            outer[k].append({"size": size, "dim": d, "cap": c, "neighbours": n, "auroc": float(roc_auc_score(y[test_rows], tested)),
                             "f1_at_1pct_false_alarms": float(f1_score(y[test_rows], (tested >= threshold).astype(int)))})
    key = ("size", "dim", "cap", "neighbours")
    chosen = []
    for k in range(5):
        best = max(inner[k], key=lambda r: r["auroc"])
        measured = next(r for r in outer[k] if all(r[f] == best[f] for f in key))
        chosen.append({"fold": k, "chosen": {f: best[f] for f in key}, "inner_auroc": best["auroc"], "auroc": measured["auroc"],
                       "f1_at_1pct_false_alarms": measured["f1_at_1pct_false_alarms"]})
        print(f"  fold {k}: chose {chosen[-1]['chosen']} (inner {best['auroc']:.4f}) -> outer AUROC {measured['auroc']:.4f} "
              f"F1 {measured['f1_at_1pct_false_alarms']:.4f}", flush=True)
    nested = [c["auroc"] for c in chosen]
    f1 = [c["f1_at_1pct_false_alarms"] for c in chosen]
    return {"nested": chosen, "nested_auroc_mean": statistics.mean(nested), "nested_auroc_sd": statistics.stdev(nested),
            "nested_f1_mean": statistics.mean(f1), "nested_f1_sd": statistics.stdev(f1),
            "inner": inner, "outer (chosen size only; for information, never for choosing)": outer}



def write_results(results: dict, out: Path) -> None:
    """The benchmark's JSON (its folder made), and where it went: one place for every sibling script's last step."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"written {out}")

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("which", nargs="?", default="all", choices=["casting", "magnetic", "all"])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="image sizes to try (default 224 320)")
    parser.add_argument("--defaults-only", action="store_true",
                        help="only the chosen defaults (feature_dim 128, bank 5000, plain largest distance) at each size")
    args = parser.parse_args()
    SIZES[:] = args.sizes
    if args.defaults_only:
        DIMS[:], CAPS[:], NEIGHBOURS[:] = [128], [5000], [1]
    results = {}
    if args.which in ("casting", "all"):
        results["casting_train_part"] = casting()
        print("casting best on the training part:", results["casting_train_part"]["best"], flush=True)
    if args.which in ("magnetic", "all"):
        results["magnetic_tile_nested"] = m = magnetic()
        print(f"magnetic-tile nested: AUROC {m['nested_auroc_mean']:.4f} ± {m['nested_auroc_sd']:.4f}, "
              f"F1 at 1% false alarms {m['nested_f1_mean']:.4f} ± {m['nested_f1_sd']:.4f}")
    out = RESULTS / f"anomaly_tune_{args.which}_{'_'.join(map(str, SIZES))}.json"
    write_results(results, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
