"""Which patch features separate defects best? Layers, projection, standardisation, image score (issue #13).

Every candidate layer's output is computed once per data set and image size (3 x 3 local average,
resized to the coarsest grid, float16, under ~/.cache/keeneye/anomaly-tune/layers_*), then the
candidates are combinations of:

* layer sets (stride 8 + stride 16, as PatchCore's WRN layer2 + layer3): the expand_relu outputs
  (wide, 192 + 576 channels), the residual stream (block_5_add + block_12_add, 32 + 96) or mixes;
* reduction: none, a seeded random projection (the product's), or PCA fitted on the good bank patches;
* per-channel standardisation on the good bank patches (PaDiM's insight: a channel with a large
  spread among good patches should not dominate the distance);
* image score: the largest patch distance, or the mean of the top k patch distances.

Chosen only on training data: casting on its ``train`` folder (bank 1200 ok_front, scored 400 other
ok_front + 400 def_front); magnetic tile nested in the 5 group folds (outer fold k is never used to
choose: candidates are ranked on inner fold (k + 1) % 5 with the bank from the good images of the three
other folds, then the inner winner is measured on fold k with the bank from the four training folds).

    python benchmarks/anomaly_layers.py casting|magnetic [--size 224]
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
#: Candidate layers (channels at alpha 1): stride 8 then stride 16.
LAYERS = {"block_5_add": 32, "block_6_expand_relu": 192, "block_9_add": 64, "block_10_expand_relu": 384,
          "block_12_add": 96, "block_13_expand_relu": 576}
SETS = {
    "expand6+expand13": ["block_6_expand_relu", "block_13_expand_relu"],
    "add5+add12": ["block_5_add", "block_12_add"],
    "add5+add9+add12": ["block_5_add", "block_9_add", "block_12_add"],
    "expand6+add12": ["block_6_expand_relu", "block_12_add"],
    "add5+expand13": ["block_5_add", "block_13_expand_relu"],
    "expand6+expand10": ["block_6_expand_relu", "block_10_expand_relu"],
    "expand13": ["block_13_expand_relu"],
}
ALL_SETS = dict(SETS)
REDUCTIONS = ["none", "random128", "pca128", "random256"]
STANDARDISE = [False, True]
TOPK = [1, 3, 10]
BANK_CAP = 5000
#: Greedy coreset on a random sample of this many bank patches (screening speed; the product runs it on all).
CORESET_POOL = 40000


def extract(name: str, paths: list[str], size: int) -> np.ndarray:
    """(N, H, W, sum of LAYERS channels) float16: each layer locally averaged and on the coarsest grid; cached."""
    from anomaly_tune import cached_features  # the sibling script: one cached extraction for both
    from keeneye.model.patchcore import build_patch_extractor

    build = lambda: build_patch_extractor(1.0, size, WEIGHTS, list(LAYERS), projection_dim=None, seed=0)  # noqa: E731
    return cached_features(CACHE / f"layers_{name}_{size}.npy", build, paths, size, f"{name} {size}")


def columns(layer_set: list[str]) -> np.ndarray:
    offsets = np.cumsum([0, *LAYERS.values()])
    index = {name: i for i, name in enumerate(LAYERS)}
    return np.concatenate([np.arange(offsets[index[n]], offsets[index[n] + 1]) for n in layer_set])


def transform(pool: np.ndarray, reduction: str, standardise: bool):
    """A function patches (..., C) -> (..., D) fitted on the good bank patches `pool` (P, C), as the product fits it."""
    from keeneye.model.patchcore import fit_patch_transform

    sample = pool[np.random.default_rng(0).choice(len(pool), min(len(pool), 50000), replace=False)]
    out_dim = None if reduction == "none" else int(reduction[-3:])
    kernel, bias = fit_patch_transform(sample, out_dim, "pca" if reduction.startswith("pca") else "random", standardise, seed=0)
    if out_dim is None:  # diagonal: an elementwise scale, not a (P, C) x (C, C) product
        diagonal = np.diag(kernel).astype(np.float32)
        return lambda x: (np.asarray(x, np.float32) * diagonal + bias).astype(np.float32)
    return lambda x: (np.asarray(x, np.float32) @ kernel + bias).astype(np.float32)


def bank_of(sample: np.ndarray, count: int) -> "object":
    """Greedy coreset of `count` patches (the product's share of the whole pool) from a random sample of the pool."""
    from keeneye.model.patchcore import PatchBank, greedy_coreset

    return PatchBank(sample[greedy_coreset(sample, count, seed=0)])


def score_candidates(features: np.ndarray, bank_rows: np.ndarray, rows: np.ndarray) -> dict:
    """Raw scores of `rows` for every candidate, the bank from the good images `bank_rows`."""
    from keeneye.model.patchcore import coreset_size

    out = {}
    started = time.perf_counter()
    for set_name, reduction, standardise in itertools.product(SETS, REDUCTIONS, STANDARDISE):
        cols = columns(SETS[set_name])
        if reduction != "none" and int(reduction[-3:]) >= len(cols):
            continue
        pool = np.asarray(features[bank_rows][..., cols], np.float32).reshape(-1, len(cols))
        pool = pool[np.random.default_rng(0).choice(len(pool), min(len(pool), CORESET_POOL), replace=False)]
        f = transform(pool, reduction, standardise)
        bank = bank_of(f(pool), coreset_size(len(bank_rows) * features.shape[1] * features.shape[2], 0.1, BANK_CAP))
        distances = bank.distances(f(features[rows][..., cols])).reshape(len(rows), -1)
        print(f"    {set_name} {reduction} standardise={standardise}: {time.perf_counter() - started:.0f} s", flush=True)
        ranked = -np.sort(-distances, axis=1)
        for k in TOPK:
            out[(set_name, reduction, standardise, k)] = ranked[:, :k].mean(axis=1)
    return out


def record(scores: dict, y: np.ndarray) -> list[dict]:
    from sklearn.metrics import roc_auc_score

    return [{"layers": s, "reduction": r, "standardise": z, "topk": k, "auroc": float(roc_auc_score(y, v))}
            for (s, r, z, k), v in scores.items()]


def casting(size: int) -> dict:
    root = SHARED / "data" / "casting" / "casting_data" / "train"
    rng = np.random.default_rng(0)
    ok = rng.permutation(sorted(str(p) for p in (root / "ok_front").glob("*.jpeg")))
    bad = rng.permutation(sorted(str(p) for p in (root / "def_front").glob("*.jpeg")))[:400]
    features = extract("casting-train", list(ok[:1600]) + list(bad), size)
    y = np.r_[np.zeros(400), np.ones(400)]
    rows = record(score_candidates(features, np.arange(1200), np.arange(1200, 2000)), y)
    for r in sorted(rows, key=lambda r: -r["auroc"])[:15]:
        print(f"  {r}", flush=True)
    return {"candidates": rows}


def magnetic(size: int) -> dict:
    from sklearn.metrics import roc_auc_score

    root = SHARED / "data" / "magnetic-tile"
    frame = pd.read_csv(root / "folds_5.csv")
    features = extract("magnetic-tile", [str(root / p) for p in frame["path"]], size)
    y, fold = frame["binary_label"].to_numpy(), frame["fold"].to_numpy()
    inner, nested = {}, []
    for k in range(5):
        j = (k + 1) % 5
        found = score_candidates(features, np.flatnonzero((fold != k) & (fold != j) & (y == 0)), np.flatnonzero(fold == j))
        inner[k] = record(found, y[fold == j])
        best = max(inner[k], key=lambda r: r["auroc"])
        print(f"  outer {k}: inner best {best}", flush=True)
    key = ("layers", "reduction", "standardise", "topk")
    mean_inner = {}
    for r in itertools.chain(*inner.values()):
        mean_inner.setdefault(tuple(r[f] for f in key), []).append(r["auroc"])
    ranking = sorted(((statistics.mean(v), c) for c, v in mean_inner.items()), reverse=True)
    for m, c in ranking[:15]:
        print(f"  inner mean {m:.4f} {c}", flush=True)
    for k in range(5):
        best = max(inner[k], key=lambda r: r["auroc"])
        global SETS, REDUCTIONS, STANDARDISE, TOPK
        saved = SETS, REDUCTIONS, STANDARDISE, TOPK
        SETS, REDUCTIONS, STANDARDISE, TOPK = {best["layers"]: saved[0][best["layers"]]}, [best["reduction"]], [best["standardise"]], [best["topk"]]
        found = score_candidates(features, np.flatnonzero((fold != k) & (y == 0)), np.flatnonzero(fold == k))
        SETS, REDUCTIONS, STANDARDISE, TOPK = saved
        auroc = float(roc_auc_score(y[fold == k], next(iter(found.values()))))
        nested.append({"fold": k, "chosen": {f: best[f] for f in key}, "inner_auroc": best["auroc"], "auroc": auroc})
        print(f"  fold {k}: {nested[-1]}", flush=True)
    values = [n["auroc"] for n in nested]
    print(f"magnetic nested AUROC {statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}", flush=True)
    return {"inner": inner, "inner_mean_ranking": [{"mean_inner_auroc": m, "candidate": c} for m, c in ranking],
            "nested": nested, "nested_auroc_mean": statistics.mean(values), "nested_auroc_sd": statistics.stdev(values)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("which", choices=["casting", "magnetic"])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--sets", nargs="+", choices=list(ALL_SETS), default=list(ALL_SETS), help="layer sets to try")
    parser.add_argument("--reductions", nargs="+", choices=REDUCTIONS, default=list(REDUCTIONS))
    parser.add_argument("--standardise", nargs="+", choices=["no", "yes"], default=["no", "yes"])
    parser.add_argument("--tag", default="", help="suffix of the result file")
    args = parser.parse_args()
    global SETS
    SETS = {name: ALL_SETS[name] for name in args.sets}
    REDUCTIONS[:] = args.reductions
    STANDARDISE[:] = [value == "yes" for value in args.standardise]
    started = time.perf_counter()
    result = casting(args.size) if args.which == "casting" else magnetic(args.size)
    result["seconds"] = time.perf_counter() - started
    out = RESULTS / f"anomaly_layers_{args.which}_{args.size}{args.tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
