"""Benchmark: which frozen features (model.features, model.resize, model.tiles) see magnetic-tile defects.

Magnetic-tile in the 5 group folds of `../shared/data/magnetic-tile/folds_5.csv`: fold k is testing,
the other four training, with validation carved from them by whole groups (keeneye's own
`assign_splits`). For every mode, the embeddings come from keeneye's training path (feature
extractor of the mode, FeatureEngine, embed_manifest, the shared embedding cache) and the head and
threshold from keeneye's pipeline (fit_head, choose_threshold); printed per mode: mean +- sd over the
folds of test F1 (at the validation-chosen threshold), ROC AUC and AP, and the embedding time of the
mode relative to "gap", measured side by side (same decoded images, interleaved repeats, medians).

With --casting, the casting set too (training split -> training + validation, the test split without
the 64 byte-identical duplicates of training images): test F1 / AUC / AP per mode.
With --timing, only the embedding time of the --modes relative to "gap" (128 magnetic-tile images, 5
interleaved repeats, medians), e.g. for "multi+cov", whose accuracy needs its projection fitted by
`keeneye train` (benchmarks/magnetic_tile.py), so it is timed here and not scored.

    python benchmarks/features.py [--modes gap gap+gmp multi multi/pad multi/tiles=auto] [--casting]
        [--head dense|logistic] [--out benchmarks/results/features.json]
    python benchmarks/features.py --timing --modes gap multi multi+cov --out benchmarks/results/features_timing.json

A mode is FEATURES[/pad|/crop][/tiles=auto|RxC][/size=N].
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
MT = SHARED / "data" / "magnetic-tile"
CASTING = SHARED / "data" / "casting"
WEIGHTS = SHARED / "weights" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
DEFAULT_MODES = ["gap", "gap+gmp", "multi", "multi/pad", "multi/tiles=auto"]


def parse_mode(mode: str) -> dict:
    """'multi/pad/tiles=auto/size=288' -> model config section values."""
    parts = mode.split("/")
    model = {"features": parts[0], "resize": "squash", "tiles": "none", "image_size": 224}
    for part in parts[1:]:
        if part in ("squash", "pad", "crop"):
            model["resize"] = part
        elif part.startswith("tiles="):
            model["tiles"] = part.split("=", 1)[1]
        elif part.startswith("size="):
            model["image_size"] = int(part.split("=", 1)[1])
        else:
            raise SystemExit(f"unknown mode part {part!r} in {mode!r}")
    return model


def sha1_of(path: str) -> str:
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()


def spec_for(model: dict, training_paths: list[str]):
    from rich.console import Console

    from keeneye.api import input_spec_for
    from keeneye.config import config_from_dict

    cfg = config_from_dict({"data_folder_path": str(REPO), "model": model})
    return input_spec_for(cfg, training_paths, Console(quiet=True))


def extractor_for(model: dict, spec):
    from keeneye.model.backbone import build_feature_extractor, build_tiled_extractor, resolve_weights

    weights = resolve_weights(str(WEIGHTS), 1.0, model["image_size"])
    extractor = build_feature_extractor(1.0, model["image_size"], weights, model["features"])
    if spec.tiles is not None:
        extractor = build_tiled_extractor(extractor, spec.n_tiles)
    return extractor, weights


def embed(manifest: pd.DataFrame, model: dict, spec) -> tuple[np.ndarray, float]:
    """Features of every row through keeneye's training path, with the shared embedding cache."""
    from keeneye.inference.engines import make_feature_engine
    from keeneye.data.cache import EmbeddingCache, backbone_cache_key, default_cache_dir
    from keeneye.training.features import embed_manifest

    extractor, weights = extractor_for(model, spec)
    key = backbone_cache_key("mobilenet_v2", 1.0, model["image_size"], weights.sha256, model["features"], spec)
    cache = EmbeddingCache(default_cache_dir(), key)
    engine = make_feature_engine(extractor, cache_folder=cache.folder)
    result = embed_manifest(manifest, engine, extractor.output_shape[-1], spec, cache, batch_size=32)
    print(f"  embedded: {result.n_cached} cached, {result.n_computed} computed in {result.seconds:.0f} s ({engine.note or engine.name})",
          flush=True)
    return result.features, result.seconds


def fit_and_test(features: np.ndarray, labels: np.ndarray, split: np.ndarray, seed: int = 0, head_kind: str = "dense") -> dict:
    """keeneye's head (head.kind) + threshold on training/validation rows; metrics on the testing rows."""
    from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

    from keeneye.config import config_from_dict
    from keeneye.evaluation.metrics import predict_labels
    from keeneye.evaluation.threshold import choose_threshold
    from keeneye.training.fit import fit_head

    from keeneye.training.fit import fit_logistic_published

    cfg = config_from_dict({"data_folder_path": str(REPO), "training": {"seed": seed, "class_weight": "balanced"},
                            "head": {"kind": head_kind}})
    sets = {name: split == name for name in ("training", "validation", "testing")}
    fit = fit_head if head_kind == "dense" else lambda *a: fit_logistic_published(*a)[:2]  # logistic: C by validation AP
    head, history = fit(features[sets["training"]], labels[sets["training"]], features[sets["validation"]],
                        labels[sets["validation"]], cfg.head, cfg.training)

    def probability(mask):
        return np.asarray(head.predict(features[mask], verbose=0, batch_size=512)).reshape(-1)

    choice = choose_threshold(labels[sets["validation"]], probability(sets["validation"]),
                              min_per_class=cfg.evaluation.min_validation_per_class)
    y, p = labels[sets["testing"]], probability(sets["testing"])
    return {"f1": float(f1_score(y, predict_labels(p, choice.threshold))), "auc": float(roc_auc_score(y, p)),
            "ap": float(average_precision_score(y, p)), "threshold": choice.threshold, "epochs": len(history),
            "n_test": int(len(y))}


def carve_validation(frame: pd.DataFrame, seed: int = 0) -> np.ndarray:
    """testing rows as given; validation carved from the others by whole groups (keeneye's rule)."""
    from keeneye.config import config_from_dict
    from keeneye.data.split import assign_splits

    fraction = config_from_dict({"data_folder_path": str(REPO)}).training.validation_fraction
    manifest = frame[["path", "label", "split", "group", "sha1"]].copy()
    return assign_splits(manifest, fraction, 0.0, seed).manifest["split"].to_numpy()


def summarize(per_fold: list[dict]) -> dict:
    out = {}
    for key in ("f1", "auc", "ap"):
        values = [fold[key] for fold in per_fold]
        out[key] = {"mean": statistics.mean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0}
    return out


def timing(paths: list[str], models: dict[str, dict], specs: dict, repeats: int = 3, batch: int = 32) -> dict:
    """Embedding seconds per mode relative to gap on the same images: decode+prepare and backbone, interleaved."""
    from keeneye.inference.engines import make_feature_engine

    engines, inputs = {}, {}
    for name, model in models.items():
        extractor, _ = extractor_for(model, specs[name])
        engines[name] = make_feature_engine(extractor)
        engines[name](np.stack([specs[name].load(p) for p in paths[:2]]))  # convert and check once, outside the clock
    seconds: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name in models:
            started = time.perf_counter()
            images = np.stack([specs[name].load(p) for p in paths])
            for i in range(0, len(images), batch):
                engines[name](images[i : i + batch])
            seconds[name].append(time.perf_counter() - started)
            inputs[name] = images.shape
    base = statistics.median(seconds["gap"]) if "gap" in seconds else None
    return {name: {"median_s": statistics.median(v), "ratio_vs_gap": (statistics.median(v) / base) if base else None,
                   "input_shape": list(inputs[name][1:])} for name, v in seconds.items()}


def magnetic_tile(modes: list[str], folds_path: Path, head_kind: str = "dense") -> dict:
    folds = pd.read_csv(folds_path)
    folds["path"] = [str(MT / p) for p in folds["path"]]
    folds["label"] = np.where(folds["binary_label"] == 1, "defect", "good")
    folds["group"] = "g" + folds["group"].astype(str)
    folds["sha1"] = [sha1_of(p) for p in folds["path"]]
    labels = folds["binary_label"].to_numpy().astype(int)
    results, specs, models = {}, {}, {}
    for mode in modes:
        model = parse_mode(mode)
        print(f"magnetic-tile, mode {mode}", flush=True)
        # auto tiles are resolved on all images' headers here (sizes only, no labels): one grid for all folds
        spec = spec_for(model, folds["path"].tolist())
        features, seconds = embed(folds, model, spec)
        per_fold = []
        for k in sorted(folds["fold"].unique()):
            frame = folds.assign(split=np.where(folds["fold"] == k, "testing", None))
            split = carve_validation(frame, seed=0)
            per_fold.append(fit_and_test(features, labels, split, head_kind=head_kind) | {"fold": int(k)})
            print(f"  fold {k}: F1 {per_fold[-1]['f1']:.3f} AUC {per_fold[-1]['auc']:.3f} AP {per_fold[-1]['ap']:.3f}", flush=True)
        results[mode] = {"model": model, "input": spec.to_dict(), "folds": per_fold, "summary": summarize(per_fold),
                         "embedding_seconds_this_run": seconds}
        specs[mode], models[mode] = spec, model
    if "gap" in models:
        sample = folds.sample(64, random_state=0)["path"].tolist()
        print("timing embedding passes side by side (64 images, 3 interleaved repeats)...", flush=True)
        for mode, row in timing(sample, models, specs).items():
            results[mode]["timing"] = row
    return results


def casting(modes: list[str], head_kind: str = "dense") -> dict:
    duplicates = pd.read_csv(CASTING / "DUPLICATES_train_test.tsv", sep="\t", header=None)  # test path, train path
    leaked = {str(CASTING / p) for p in duplicates[0]}
    rows = []
    for split in ("train", "test"):
        for label, positive in (("def_front", 1), ("ok_front", 0)):
            for path in sorted((CASTING / "casting_data" / split / label).glob("*.jpeg")):
                rows.append({"path": str(path), "y": positive, "label": label, "given": split, "name": path.name})
    frame = pd.DataFrame(rows)
    frame["sha1"] = [sha1_of(p) for p in frame["path"]]
    frame["group"] = None
    test = frame["given"] == "test"
    frame["leaked"] = test & frame["path"].isin(leaked)
    frame["split"] = np.where(test, "testing", None)
    split = carve_validation(frame, seed=0)
    split = np.where(frame["leaked"], "left_out", split)
    results = {}
    for mode in modes:
        model = parse_mode(mode)
        print(f"casting, mode {mode} (test without {int(frame['leaked'].sum())} leaked duplicates)", flush=True)
        spec = spec_for(model, frame.loc[~test, "path"].tolist())
        features, seconds = embed(frame, model, spec)
        results[mode] = fit_and_test(features, frame["y"].to_numpy(), split, head_kind=head_kind) | {"embedding_seconds_this_run": seconds}
        print(f"  F1 {results[mode]['f1']:.4f} AUC {results[mode]['auc']:.4f} AP {results[mode]['ap']:.4f}", flush=True)
    return results


def timing_only(modes: list[str], folds_path: Path, out: Path) -> int:
    """The side-by-side embedding times of `modes` (gap first) on 128 magnetic-tile images, printed and written."""
    folds = pd.read_csv(folds_path)
    sample = [str(MT / p) for p in folds.sample(128, random_state=0)["path"]]
    names = ["gap", *[m for m in modes if m != "gap"]]
    models = {name: parse_mode(name) for name in names}
    specs = {name: spec_for(model, sample) for name, model in models.items()}
    print(f"timing embedding passes side by side ({len(sample)} images, 5 interleaved repeats)...", flush=True)
    rows = timing(sample, models, specs, repeats=5)
    for name, row in rows.items():
        print(f"{name:28} median {row['median_s']:.2f} s  {row['ratio_vs_gap']:.2f}x gap", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"timing": rows, "images": len(sample)}, indent=2))
    print(f"written to {out}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="*", default=DEFAULT_MODES, help="magnetic-tile modes (none: skip magnetic-tile)")
    parser.add_argument("--casting", nargs="*", default=None, help="also casting, for these modes (default: the --modes)")
    parser.add_argument("--folds", type=Path, default=MT / "folds_5.csv")
    parser.add_argument("--head", choices=("dense", "logistic"), default="dense",
                        help="head.kind: the default dense head, or the exact logistic regression (C by validation AP)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "features.json")
    parser.add_argument("--timing", action="store_true", help="only the embedding time of the modes relative to gap")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "src"))
    if args.timing:
        return timing_only(args.modes, args.folds, args.out)
    if any(parse_mode(m)["features"] == "multi+cov" for m in [*args.modes, *(args.casting or [])]):
        parser.error("multi+cov fits its projection inside keeneye train: score it with benchmarks/magnetic_tile.py (--timing times it)")
    started = time.time()
    report = {"head": args.head, "magnetic_tile": magnetic_tile(args.modes, args.folds, args.head) if args.modes else {}}
    if args.casting is not None:
        report["casting"] = casting(args.casting or args.modes or ["gap"], args.head)
    report["seconds"] = time.time() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print("\nmagnetic-tile, 5 group folds (mean +- sd)")
    print(f"{'mode':28} {'F1':>15} {'AUC':>15} {'AP':>15} {'embed time vs gap':>18}")
    for mode, row in report["magnetic_tile"].items():
        s = row["summary"]
        ratio = row.get("timing", {}).get("ratio_vs_gap")
        cells = [f"{s[k]['mean']:.3f} +- {s[k]['sd']:.3f}" for k in ("f1", "auc", "ap")]
        print(f"{mode:28} {cells[0]:>15} {cells[1]:>15} {cells[2]:>15} {('%.2fx' % ratio) if ratio else 'n/a':>18}")
    for mode, row in report.get("casting", {}).items():
        print(f"casting {mode:20} F1 {row['f1']:.4f} AUC {row['auc']:.4f} AP {row['ap']:.4f} (n test {row['n_test']})")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
