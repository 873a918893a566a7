"""Benchmark: orderless second-order texture descriptors of MobileNetV2 blocks on magnetic-tile (frozen).

Why: average and max pooling keep first-order statistics of a block; texture recognition with frozen
CNNs is known to gain from second-order, orderless pooling of a conv layer (bilinear CNN, Lin et al.
2015; FV-CNN, Cimpoi et al. 2015), and magnetic-tile's defects are changes of a surface texture far
from ImageNet. Per block and test fold: a PCA to --dim dimensions fitted on the positions of the four
training folds' images only (no labels, never the test fold), then per image
- "cov": the second moment of its projected positions (Z^T Z / n), signed square root, L2 norm, upper
  triangle (bilinear pooling);
- "vlad": residuals to k-means(16) centres of the projected training positions, signed square root,
  intra- and L2 normalisation;
each alone and appended to keeneye's "multi" embedding (block_13_expand_relu and out_relu, average and
max), judged like benchmarks/feature_layers.py (logistic head, C and threshold from 5 inner group folds,
refit, test fold). --full adds the second moment of the unprojected channels (no fitted step at all).
--views V: every descriptor (and "multi") averaged over the image's model.views views, as keeneye's views
extractor averages its features; the PCA and k-means are fitted on the images as they lay.
Printed: mean +- sd over the 5 group folds, and each set's paired differences from "multi".
--variants [NAME ...]: instead of "cov" and "vlad", how the projection and normalisation behind keeneye's "multi+cov"
were chosen (projection_variant): a random projection (nothing fitted) against a PCA of 128 training images, signed
square root against the L2 norm alone; and what else was tried on it afterwards: the matrix square root or
logarithm of the trace-normalised moment (matrix power normalisation, MPN-COV: Li et al. 2017) instead of the L2
norm, and the block at each image's native size instead of 224 px squashed (the second moment is orderless, so
it takes any size; "pca128_l2_native", one backbone pass per image, maps cached). Default: all of them.
--casting: instead, "multi" against "multi" + the block_6 second moment on casting, the PCA fitted on the
train split's positions, C and threshold from 5 stratified folds of the train split (image by image, the
same folds for both sets), the refit scored on the test split, whole and without its 64 leaked duplicates.

    python benchmarks/texture_pooling.py [--blocks b6 b13] [--dim 48] [--full b12a] [--views 1|2|4|8] [--out FILE]
    python benchmarks/texture_pooling.py --casting [--dim 48] [--out FILE]
    python benchmarks/texture_pooling.py --variants --blocks b6 --out benchmarks/results/texture_pooling_variants.json
    python benchmarks/texture_pooling.py --variants pca128_l2 pca128_msqrt pca128_mlog pca128_l2_native --blocks b6

The block maps (float16, 224 px squash) are stored under ~/.cache/keeneye/texture-maps.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import feature_layers as fl  # noqa: E402

CACHE = Path.home() / ".cache" / "keeneye" / "texture-maps"
BLOCKS = {"b3": "block_3_expand_relu", "b5a": "block_5_add", "b6": "block_6_expand_relu", "b12a": "block_12_add",
          "b13": "block_13_expand_relu", "last": "out_relu"}
CLUSTERS = 16


def block_maps(paths: list[str], blocks: list[str], view: int = 0) -> dict[str, np.ndarray]:
    """Each block's output map (N, H, W, C) of every image's dihedral view `view` at 224 px squash: from
    CACHE, or one backbone pass."""
    def file(block: str) -> Path:
        return CACHE / (f"magnetic_tile_{block}" + (f"_view{view}" if view else "") + ".npy")

    missing = [b for b in blocks if not file(b).exists()]
    if missing:
        import keras

        from keeneye.data.preprocess import InputSpec, dihedral

        spec, started, base = InputSpec(224, "squash"), time.perf_counter(), fl.imagenet_mobilenet()
        model = keras.Model(base.inputs, [base.get_layer(BLOCKS[b]).output for b in missing])
        parts: dict[str, list] = {b: [] for b in missing}
        for start in range(0, len(paths), 32):
            x = dihedral(np.stack([spec.load(p) for p in paths[start : start + 32]]), view).astype(np.float32) / 127.5 - 1.0
            outs = model.predict(x, verbose=0)
            for b, out in zip(missing, outs if len(missing) > 1 else [outs]):
                parts[b].append(out.astype(np.float16))
        CACHE.mkdir(parents=True, exist_ok=True)
        for b in missing:
            np.save(file(b), np.concatenate(parts[b]))
        print(f"  maps of {', '.join(missing)} (view {view}): {len(paths)} images in {time.perf_counter() - started:.0f} s",
              flush=True)
    return {b: np.load(file(b), mmap_mode="r") for b in blocks}


def signed_sqrt_l2(z: np.ndarray) -> np.ndarray:
    """The normalisation bilinear pooling needs: a few large entries must not dominate the vector."""
    z = np.sign(z) * np.sqrt(np.abs(z))
    return z / (np.linalg.norm(z, axis=-1, keepdims=True) + 1e-12)


def second_moment(z: np.ndarray) -> np.ndarray:
    """(N, P, D) positions -> (N, D (D + 1) / 2): upper triangle of Z^T Z / P, signed sqrt, L2."""
    upper = np.triu_indices(z.shape[-1])
    moment = np.einsum("npi,npj->nij", z, z) / z.shape[1]
    return signed_sqrt_l2(moment[:, upper[0], upper[1]]).astype(np.float32)


def full_moment_l2(z: np.ndarray) -> np.ndarray:
    """(N, P, D) projected positions -> (N, D * D): the whole Z^T Z, L2-normalised, as keeneye's "multi+cov" pools it."""
    moment = np.einsum("npi,npj->nij", z, z).reshape(len(z), -1)
    return moment / np.linalg.norm(moment, axis=1, keepdims=True)


def vlad(z: np.ndarray, centres: np.ndarray, assign: np.ndarray) -> np.ndarray:
    """(N, P, D) positions and their nearest centre -> (N, K D) VLAD, intra- and L2-normalised."""
    out = np.zeros((z.shape[0], len(centres), z.shape[-1]), np.float32)
    for j, centre in enumerate(centres):
        out[:, j] = ((z - centre) * (assign == j)[..., None]).sum(1)
    out = signed_sqrt_l2(out).reshape(len(z), -1)
    return out / (np.linalg.norm(out, axis=1, keepdims=True) + 1e-12)


def fitted_descriptors(views: list[np.ndarray], train: np.ndarray, dim: int, seed: int) -> dict[str, np.ndarray]:
    """"cov" and "vlad" of every image, averaged over its views' maps, with the PCA and k-means fitted on the
    positions of the training images as they lay (views[0]) only."""
    from sklearn.cluster import MiniBatchKMeans
    from sklearn.decomposition import PCA

    n, h, w, c = views[0].shape
    rng = np.random.default_rng(seed)
    positions = np.asarray(views[0][train]).reshape(-1, c).astype(np.float32)
    positions = positions[rng.choice(len(positions), size=min(60000, len(positions)), replace=False)]
    pca = PCA(dim, random_state=seed).fit(positions)
    kmeans = MiniBatchKMeans(CLUSTERS, random_state=seed, n_init=3).fit(pca.transform(positions))
    centres = kmeans.cluster_centers_.astype(np.float32)
    out = {"cov": 0.0, "vlad": 0.0}
    for maps in views:
        z = pca.transform(np.asarray(maps, np.float32).reshape(-1, c)).reshape(n, h * w, dim).astype(np.float32)
        assign = kmeans.predict(z.reshape(-1, dim)).reshape(n, h * w)
        out["cov"] = out["cov"] + second_moment(z) / len(views)
        out["vlad"] = out["vlad"] + vlad(z, centres, assign) / len(views)
    return out


def pca_of_128(maps, train: np.ndarray, seed: int, dim: int):
    """The PCA keeneye's "multi+cov" fits: every position of 128 random training images (`maps`: an (N, H, W, C)
    array or a list of (H, W, C) maps of any size)."""
    from sklearn.decomposition import PCA

    picked = np.sort(np.random.default_rng(seed).choice(np.flatnonzero(train), 128, replace=False))
    positions = np.concatenate([np.asarray(maps[i], np.float32).reshape(-1, maps[i].shape[-1]) for i in picked])
    return PCA(dim, random_state=0).fit(positions)


def projection_variant(maps: np.ndarray, train: np.ndarray, variant: str, seed: int, dim: int) -> np.ndarray:
    """The block's second moment with the projection and normalisation of `variant` (--variants):
    "random_uncentred" / "random_centred": a seeded random orthonormal projection (nothing fitted), the
    second moment about zero or about each image's own mean; "pca128_sqrt": the PCA fitted on every position
    of 128 random training images (what keeneye's "multi+cov" fits on), signed sqrt, upper triangle;
    "pca128_l2": the same PCA, the full D x D matrix and the L2 norm only: keeneye's "multi+cov" exactly."""
    n, h, w, c = maps.shape
    if variant.startswith("random"):
        matrix = np.linalg.qr(np.random.default_rng(0).standard_normal((c, dim)))[0].astype(np.float32)
        project = lambda x: x @ matrix  # noqa: E731
    else:
        project = pca_of_128(maps, train, seed, dim).transform
    out = []
    for start in range(0, n, 128):
        z = project(np.asarray(maps[start : start + 128], np.float32).reshape(-1, c)).reshape(-1, h * w, dim).astype(np.float32)
        if variant == "random_centred":
            z = z - z.mean(axis=1, keepdims=True)
        if variant in ("pca128_msqrt", "pca128_mlog"):
            moments = np.einsum("npi,npj->nij", z.astype(np.float64), z) / (h * w)
            out.append(matrix_normalised(moments, "sqrt" if variant.endswith("sqrt") else "log"))
        elif variant == "pca128_l2":
            out.append(full_moment_l2(z))
        else:
            out.append(second_moment(z))
    return np.concatenate(out).astype(np.float32)


def matrix_normalised(moments: np.ndarray, how: str) -> np.ndarray:
    """(N, D, D) second moments -> flattened, L2-normalised matrix square root ("sqrt") or logarithm ("log")
    of each moment divided by its trace: the matrix power normalisation of second-order pooling (MPN-COV,
    iSQRT-COV), which treats the moment as the symmetric positive matrix it is, unlike an element-wise root."""
    moments = moments / np.trace(moments, axis1=1, axis2=2)[:, None, None]
    values, vectors = np.linalg.eigh(moments)
    values = np.clip(values, 1e-10, None)
    values = np.sqrt(values) if how == "sqrt" else np.log(values + 1e-4)
    out = np.einsum("nij,nj,nkj->nik", vectors, values, vectors).reshape(len(moments), -1)
    return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)


def native_maps(paths: list[str], block: str) -> list[np.ndarray]:
    """The block's map of every image at its own size (no resize; one backbone pass per image), from CACHE."""
    file = CACHE / f"magnetic_tile_{block}_native.npz"
    if not file.exists():
        import keras
        from PIL import Image

        started, base = time.perf_counter(), keras.applications.MobileNetV2(input_shape=(None, None, 3), include_top=False,
                                                                            weights=None)
        base.load_weights(str(fl.WEIGHTS))
        cut = keras.Model(base.inputs, base.get_layer(BLOCKS[block]).output)
        maps = np.empty(len(paths), object)
        for i, path in enumerate(paths):
            x = np.asarray(Image.open(path).convert("RGB"), np.float32)[None] / 127.5 - 1.0
            maps[i] = cut(x, training=False).numpy()[0].astype(np.float16)
        CACHE.mkdir(parents=True, exist_ok=True)
        np.savez(file, maps=maps)
        print(f"  native maps of {block}: {len(paths)} images in {time.perf_counter() - started:.0f} s", flush=True)
    return list(np.load(file, allow_pickle=True)["maps"])


def native_variant(maps: list[np.ndarray], train: np.ndarray, seed: int, dim: int) -> np.ndarray:
    """"pca128_l2" on native-size maps: the same 128 training images fit the PCA (all their positions)."""
    c, pca = maps[0].shape[-1], pca_of_128(maps, train, seed, dim)
    out = []
    for m in maps:
        z = pca.transform(np.asarray(m, np.float32).reshape(-1, c)).astype(np.float32)
        moment = (z.T @ z).reshape(-1)
        out.append(moment / np.linalg.norm(moment))
    return np.stack(out).astype(np.float32)


VARIANTS = ("random_uncentred", "random_centred", "pca128_sqrt", "pca128_l2", "pca128_msqrt", "pca128_mlog", "pca128_l2_native")


def pooled_multi(views: list[dict[str, np.ndarray]]) -> np.ndarray:
    """keeneye's "multi" embedding (block_13_expand_relu and out_relu, average and max), averaged over the views."""
    return np.mean([np.concatenate([np.mean(m["b13"], (1, 2)), np.max(m["b13"], (1, 2)), np.mean(m["last"], (1, 2)),
                                    np.max(m["last"], (1, 2))], axis=1).astype(np.float32) for m in views], axis=0)


def paired_line(rows: list[dict], base: list[dict]) -> str:
    """Mean paired difference from the base set, its SE over the folds and in how many folds it was higher."""
    parts = []
    for key in ("f1", "auc", "ap"):
        diff = np.array([r[key] - b[key] for r, b in zip(rows, base)])
        parts.append(f"{key} {diff.mean():+.3f} (SE {diff.std(ddof=1) / np.sqrt(len(diff)):.3f}, up {int((diff > 0).sum())}/{len(diff)})")
    return "  ".join(parts)


def casting(dim: int) -> dict:
    """Casting: test errors of the logistic head on "multi" and on "multi" + the block_6 second moment."""
    import keras
    from sklearn.decomposition import PCA
    from sklearn.metrics import f1_score

    from keeneye.data.preprocess import InputSpec
    from keeneye.evaluation.metrics import predict_labels
    from keeneye.training.crossval import group_folds

    root = fl.SHARED / "data" / "casting"
    leaked = {str(root / p) for p in pd.read_csv(root / "DUPLICATES_train_test.tsv", sep="\t", header=None)[0]}
    rows = [(str(path), positive, split == "test") for split in ("train", "test")
            for label, positive in (("def_front", 1), ("ok_front", 0))
            for path in sorted((root / "casting_data" / split / label).glob("*.jpeg"))]
    paths = [r[0] for r in rows]
    labels, test = np.array([r[1] for r in rows]), np.array([r[2] for r in rows])
    kept = ~np.array([p in leaked for p in paths])[test]
    spec, started, base = InputSpec(224, "squash"), time.perf_counter(), fl.imagenet_mobilenet()
    model = keras.Model(base.inputs, [base.get_layer(BLOCKS[b]).output for b in ("b6", "b13", "last")])
    b6, multi = [], []
    for start in range(0, len(paths), 32):
        x = np.stack([spec.load(p) for p in paths[start : start + 32]]).astype(np.float32) / 127.5 - 1.0
        low, mid, last = model.predict(x, verbose=0)
        b6.append(low.astype(np.float16))
        multi.append(pooled_multi([{"b13": mid, "last": last}]))
    b6, multi = np.concatenate(b6), np.concatenate(multi)
    print(f"casting: {len(paths)} images embedded in {time.perf_counter() - started:.0f} s", flush=True)
    positions = b6[~test].reshape(-1, b6.shape[-1])
    positions = positions[np.random.default_rng(0).choice(len(positions), 60000, replace=False)].astype(np.float32)
    pca = PCA(dim, random_state=0).fit(positions)
    moment = np.concatenate([second_moment(pca.transform(b6[s : s + 256].reshape(-1, b6.shape[-1]).astype(np.float32))
                                           .reshape(-1, b6.shape[1] * b6.shape[2], dim).astype(np.float32))
                             for s in range(0, len(b6), 256)])
    train = ~test
    inner = group_folds(labels[train], np.arange(train.sum()), 5, 0)
    report = {}
    for name, x in {"multi": multi, "multi+cov_b6": np.concatenate([multi, moment], axis=1)}.items():
        fit = fl.logistic_fit_and_score(x, labels, train, test, inner, "balanced")
        y, predicted = labels[test], predict_labels(fit.pop("p"), fit["threshold"])
        r = report[name] = {key: fit[key] for key in ("c", "threshold", "oof_ap", "f1", "auc", "ap")} | {
            "errors": int((predicted != y).sum()), "f1_dedup": float(f1_score(y[kept], predicted[kept])),
            "errors_dedup": int((predicted[kept] != y[kept]).sum())}
        print(f"{name:14} C {r['c']:g}  OOF AP {r['oof_ap']:.5f}  test F1 {r['f1']:.4f} ({r['errors']} errors in {len(y)})  without "
              f"duplicates {r['f1_dedup']:.4f} ({r['errors_dedup']} in {int(kept.sum())})  AUC {r['auc']:.5f}  AP {r['ap']:.5f}", flush=True)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", nargs="*", default=["b6", "b13"], choices=list(BLOCKS))
    parser.add_argument("--full", nargs="*", default=[], choices=list(BLOCKS), help="also the unprojected second moment")
    parser.add_argument("--dim", type=int, default=48, help="PCA dimensions before pooling")
    parser.add_argument("--views", type=int, default=1, choices=(1, 2, 4, 8), help="average over model.views views")
    parser.add_argument("--casting", action="store_true", help="multi vs multi + block_6 second moment on casting")
    parser.add_argument("--variants", nargs="*", choices=VARIANTS, default=None,
                        help="instead of cov and vlad: the projection / normalisation variants behind keeneye's multi+cov "
                             "(1 view); no name: all")
    parser.add_argument("--out", type=Path, default=fl.REPO / "benchmarks" / "results" / "texture_pooling.json")
    args = parser.parse_args()
    if args.variants is not None:
        args.variants = args.variants or list(VARIANTS)
    if args.variants and args.views != 1:
        parser.error("--variants measures one view (the projection is fitted on the images as they lie)")
    sys.path.insert(0, str(fl.REPO / "src"))
    if args.casting:
        out = args.out if args.out != parser.get_default("out") else args.out.with_name("texture_pooling_casting.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"dim": args.dim, "results": casting(args.dim)}, indent=2))
        print(f"written to {out}")
        return 0
    paths, labels, groups, folds = fl.magnetic_tile_folds()
    from keeneye.data.preprocess import VIEW_SETS

    blocks = sorted(set(args.blocks) | set(args.full) | {"b13", "last"})
    views = [block_maps(paths, blocks, view) for view in VIEW_SETS[args.views]]
    multi = pooled_multi(views)
    full = {f"fullcov_{b}": np.mean([second_moment(np.asarray(m[b], np.float32).reshape(len(paths), -1, m[b].shape[-1]))
                                     for m in views], axis=0) for b in args.full}
    rows: dict[str, list[dict]] = {}
    for k in sorted(np.unique(folds)):
        started, sets = time.perf_counter(), {"multi": multi}
        for block in args.blocks:
            if args.variants:
                for variant in args.variants:
                    sets[f"cov_{block}_{variant}"] = (
                        native_variant(native_maps(paths, block), folds != k, int(k), args.dim) if variant.endswith("native")
                        else projection_variant(views[0][block], folds != k, variant, int(k), args.dim))
                continue
            for kind, x in fitted_descriptors([m[block] for m in views], folds != k, args.dim, int(k)).items():
                sets[f"{kind}_{block}"] = x
        sets |= full
        if len(args.blocks) > 1 and not args.variants:
            sets["cov_" + "+".join(args.blocks)] = np.concatenate([sets[f"cov_{b}"] for b in args.blocks], axis=1)
        for name in [n for n in sets if n != "multi"]:
            sets[f"multi+{name}"] = np.concatenate([multi, sets[name]], axis=1)
        for name, x in sets.items():
            row = fl.judge_fold(x, labels, groups, folds, int(k), "balanced") | {"dim": int(x.shape[1])}
            rows.setdefault(name, []).append(row)
            print(f"fold {k} {name:18} dim {x.shape[1]:5d}: F1 {row['f1']:.3f} AUC {row['auc']:.3f} AP {row['ap']:.3f} "
                  f"OOF AP {row['oof_ap']:.3f}", flush=True)
        print(f"fold {k}: {time.perf_counter() - started:.0f} s", flush=True)
    report = {}
    print(f"\n{'set':20} {'dim':>5}  mean +- sd over the 5 group folds; paired difference from multi")
    for name, fold_rows in rows.items():
        report[name] = {"folds": fold_rows, "summary": fl.summarise(fold_rows)}
        print(f"{name:20} {fold_rows[0]['dim']:5d}  {fl.summary_line(report[name]['summary'])}")
        if name != "multi":
            print(f"{'':28}{paired_line(fold_rows, rows['multi'])}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"dim": args.dim, "clusters": CLUSTERS, "views": args.views, "results": report}, indent=2))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
