"""Benchmark: does re-estimating MobileNetV2's BatchNorm statistics on the target images help (AdaBN)?

Why it might: magnetic-tile's grey textures are far from ImageNet, so the ImageNet BatchNorm
statistics may leave many channels outside their useful range; AdaBN (Li et al. 2016) re-estimates
them on the target domain without labels. Per test fold of folds_5.csv, from --images images of the
four training folds only (never the test fold):
- "full": every BatchNorm layer's mean and variance from those images (one training-mode pass with
  momentum 0, so each layer sees the earlier layers already adapted);
- "mean": only the means (inference-mode passes measure every BatchNorm input; repeated --passes times
  so later layers see the earlier ones re-centred); the ImageNet variances are kept.
Then "gap" and "multi" features of every image from the adapted network, judged like
benchmarks/feature_layers.py (logistic head, C and threshold from 5 inner group folds, refit, test
fold), and "none" (the ImageNet statistics) beside them. Also printed: the share of feature columns
that are zero on every image (channels the adaptation switched off).

    python benchmarks/adabn.py [--variants none full mean] [--images 128] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import feature_layers as fl  # noqa: E402


def batchnorms(base) -> list:
    import keras

    return [layer for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization)]


def adapt_full(base, x: np.ndarray) -> None:
    """Every BatchNorm layer's moving mean and variance := the statistics of x (one pass, training mode)."""
    layers = batchnorms(base)
    for layer in layers:
        layer.momentum = 0.0
    base(x, training=True)
    for layer in layers:
        layer.momentum = 0.999


def adapt_means(base, x: np.ndarray, passes: int) -> None:
    """Every BatchNorm layer's moving mean := the mean of its input over x; the variances stay ImageNet's."""
    import keras

    layers = batchnorms(base)
    probe = keras.Model(base.inputs, [layer.input for layer in layers])
    for _ in range(passes):
        sums = [np.zeros(layer.moving_mean.shape, np.float64) for layer in layers]
        for start in range(0, len(x), 16):
            for i, tensor in enumerate(probe(x[start : start + 16], training=False)):
                sums[i] += np.asarray(keras.ops.sum(tensor, axis=(0, 1, 2)), np.float64) / (tensor.shape[1] * tensor.shape[2])
        for layer, total in zip(layers, sums):
            layer.moving_mean.assign(total / len(x))


def features(base, x: np.ndarray) -> dict[str, np.ndarray]:
    """keeneye's "gap" and "multi" embeddings of x from this backbone."""
    import keras

    inner = keras.Model(base.inputs, [base.get_layer("block_13_expand_relu").output, base.get_layer("out_relu").output])
    mid, last = [], []
    for start in range(0, len(x), 64):
        m, lst = inner.predict(x[start : start + 64], verbose=0)
        mid.append(np.concatenate([m.mean((1, 2)), m.max((1, 2))], 1))
        last.append(np.concatenate([lst.mean((1, 2)), lst.max((1, 2))], 1))
    mid, last = np.concatenate(mid), np.concatenate(last)
    return {"gap": last[:, : last.shape[1] // 2], "multi": np.concatenate([mid, last], 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="*", default=["none", "full", "mean"], choices=("none", "full", "mean"))
    parser.add_argument("--images", type=int, default=128, help="training images per fold that set the statistics")
    parser.add_argument("--passes", type=int, default=3, help="re-centring passes of the 'mean' variant")
    parser.add_argument("--out", type=Path, default=fl.REPO / "benchmarks" / "results" / "adabn.json")
    args = parser.parse_args()
    sys.path.insert(0, str(fl.REPO / "src"))
    from keeneye.data.preprocess import InputSpec

    paths, labels, groups, folds = fl.magnetic_tile_folds()
    spec = InputSpec(224, "squash")
    images = np.stack([spec.load(p) for p in paths]).astype(np.float32) / 127.5 - 1.0
    rng, report = np.random.default_rng(0), {}
    for variant in args.variants:
        for k in sorted(np.unique(folds)):
            started, base = time.perf_counter(), fl.imagenet_mobilenet()
            chosen = rng.choice(np.flatnonzero(folds != k), size=args.images, replace=False)
            if variant == "full":
                adapt_full(base, images[chosen])
            elif variant == "mean":
                adapt_means(base, images[chosen], args.passes)
            for name, x in features(base, images).items():
                row = fl.judge_fold(x, labels, groups, folds, int(k), "balanced") | {"zero_columns": float((x.max(0) <= 0).mean())}
                report.setdefault(f"{variant}/{name}", []).append(row)
                print(f"{variant:4} {name:5} fold {k}: F1 {row['f1']:.3f} AUC {row['auc']:.3f} AP {row['ap']:.3f} "
                      f"zero columns {row['zero_columns']:.2f} ({time.perf_counter() - started:.0f} s)", flush=True)
    print()
    for key, rows in report.items():
        zero = np.mean([r["zero_columns"] for r in rows])
        print(f"{key:12} {fl.summary_line(fl.summarise(rows))}  zero columns {zero:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"images": args.images, "passes": args.passes, "results": report}, indent=2))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
