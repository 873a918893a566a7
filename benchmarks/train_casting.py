"""Benchmark: `keeneye train` on the full casting set vs a bare batched MobileNetV2 forward pass.

Measured in one process, side by side (timings on shared machines are noisy; ratios hold up):
  - the whole train (scan + hashing + decode + embeddings, head training, threshold, evaluation, bundle),
    cold: a fresh embedding cache, so every image goes through the backbone;
  - one bare batched forward pass (Keras, batch 32) over the same training images, images decoded
    beforehand per batch and only the forward calls timed: the floor any frozen-backbone trainer pays;
  - the same forward pass in ONNX Runtime and OpenVINO (float32, train's feature_extractor.onnx), taking
    turns with Keras batch by batch: the floor of the embedding pass, over all the images train embeds;
  - peak RSS of the train (read before the bare pass runs);
  - test F1 on the whole test split and without the 64 test images that are byte-identical
    copies of training images (DUPLICATES_train_test.tsv).
What is cold: the embedding cache (a fresh cache_dir), so every image is hashed, decoded and embedded,
and the backbone is converted to ONNX once (feature_extractor.onnx lives in that cache folder, keyed
by backbone, size, weights sha256 and features: later runs with this backbone on any data reuse it).
Warm as on any machine after one run: the ImageNet weights file, Python's imports from disk.
Where the seconds go: the phases of TIMED, each timed by a wrapper in this process.
Targets (issues 2, 10): test F1 >= 0.97 (and unchanged), train <= 0.4x the bare pass, peak RSS < 2 GB.
The embedding engine train chose ('auto': the fastest CPU engine that agrees with Keras) is recorded.

    python benchmarks/train_casting.py [--data ../shared/data/casting] [--out benchmarks/results/train_casting.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO.parent / "shared" / "weights" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def bare_forward_seconds(paths: list[str], weights: Path, onnx_model: Path | None, batch_size: int = 32) -> dict[str, float]:
    """Sum of the forward-call times over all images of a plain Keras MobileNetV2 (+ GAP), and of the
    same network in ONNX Runtime and OpenVINO (float32, from the feature_extractor.onnx train wrote):
    the engines take turns batch by batch, on the same decoded batch, so load hits them alike.

    Keras is the issue's reference; the fastest bare engine is the floor of any embedding pass, and
    so shows what ratio float32 inference on this CPU allows at all (train also embeds the test split).
    """
    import numpy as np

    from keeneye.data.decode import load_image
    from keeneye.model.backbone import ResolvedWeights, build_feature_extractor
    from keeneye.runtime.choice import onnx_engine

    model = build_feature_extractor(1.0, 224, ResolvedWeights(str(weights), weights, None))
    engines = {"keras": model.predict_on_batch}
    if onnx_model is not None:
        engines |= {kind: onnx_engine(kind, onnx_model) for kind in ("onnx", "openvino")}
    warm = np.zeros((batch_size, 224, 224, 3), np.uint8)
    for engine in engines.values():  # trace / compile once, like any real run
        engine(warm)
    total = dict.fromkeys(engines, 0.0)
    for number, start in enumerate(range(0, len(paths), batch_size)):
        batch = np.stack([load_image(p, 224) for p in paths[start : start + batch_size]])
        names = list(engines)
        for name in names[number % len(names):] + names[: number % len(names)]:
            begin = time.perf_counter()
            engines[name](batch)
            total[name] += time.perf_counter() - begin
    return total


#: Where the seconds of a train go: (module, attribute, label). Top-level phases in the order they run
#: (their sum is the train less import and glue); "  " marks a part of the phase above it.
TIMED = [
    ("keeneye.training.phases", "scan", "scan (folders, weights, input spec)"),
    ("keeneye.training.phases", "build_backbone", "build backbone"),
    ("keeneye.training.phases", "embed", "embed phase"),
    ("keeneye.training.phases", "inspect_images", "  hashing images (sha1 + perceptual hash)"),
    ("keeneye.training.features", "embed_manifest", "  embedding pass (decode + engine, ONNX conversion included)"),
    ("keeneye.data.cache.EmbeddingCache", "consolidate", "  cache consolidation"),
    ("keeneye.training.phases", "audit", "audit phase"),
    ("keeneye.training.phases", "mutual_neighbour_pairs", "  embedding near-duplicates (mutual top-2), once"),
    ("keeneye.training.phases", "split_with_auto_groups", "  split (automatic groups: hash neighbours, folds)"),
    ("keeneye.training.phases", "audit_manifest", "  audit (duplicates, leakage)"),
    ("keeneye.data.audit.Audit", "add_embedding_near_duplicates", "  embedding near-duplicates into the audit"),
    ("keeneye.training.phases", "open_run_state", "run state"),
    ("keeneye.training.phases", "cross_validate_head", "cross-validation (5 fold heads)"),
    ("keeneye.training.phases", "fit_published_head", "published head (refit, Keras fit)"),
    ("keeneye.training.phases", "choose_threshold", "threshold"),
    ("keeneye.training.phases", "keep_head", "keep head"),
    ("keeneye.api", "_evaluate_testing", "evaluation on testing (metrics, plots)"),
    ("keeneye.bundle.BundleWriter", "save_model", "save model.keras"),
    ("keeneye.inference.export", "write_bundle_onnx", "model.onnx (join, convert, verify)"),
    ("keeneye.api", "_write_run_files", "run files (history, curves, manifest, audit)"),
    ("keeneye.api", "_write_train_report", "report.html"),
]


def timed_phases() -> dict[str, float]:
    """Wrap the functions of TIMED with timers (this process only); returns the dict they fill."""
    import functools
    import importlib

    seconds: dict[str, float] = {}
    for module_name, attribute, label in TIMED:
        try:
            owner = importlib.import_module(module_name)
        except ImportError:  # a class: import its module, then take the class
            module_name, class_name = module_name.rsplit(".", 1)
            owner = getattr(importlib.import_module(module_name), class_name)
        original = getattr(owner, attribute)

        def timed(*args, _original=original, _label=label, **kwargs):
            begin = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                seconds[_label] = seconds.get(_label, 0.0) + time.perf_counter() - begin

        setattr(owner, attribute, functools.wraps(original)(timed))
    return seconds


def train(args, work: Path):
    """The whole `keeneye train`, cold cache: (result, seconds, peak RSS MB, console text, seconds per phase)."""
    from rich.console import Console

    from keeneye import api
    from keeneye.config import config_from_dict

    phase_seconds = timed_phases()

    config = config_from_dict(
        {
            "data_folder_path": str(args.data / "casting_data"), "output_dir": str(work / "runs"), "run_name": "casting",
            "cache_dir": str(work / "cache"), "model": {"weights": str(args.weights)}, "training": {"epochs": 50, "seed": 0},
        },
        base_dir=work,
    )
    console = Console(stderr=True, record=True)
    started = time.perf_counter()
    result = api.train(config, console=console)
    return result, time.perf_counter() - started, peak_rss_mb(), console.export_text(), phase_seconds


def test_scores(args, result, manifest) -> tuple[dict, int]:
    """Metrics on the test split without the 64 leaked duplicates, and how many of their training copies sit in validation."""
    import pandas as pd

    from keeneye.evaluation.metrics import binary_metrics

    predictions = pd.read_csv(result.run_dir / "predictions.csv")
    duplicates = pd.read_csv(args.data / "DUPLICATES_train_test.tsv", sep="\t", header=None, names=["test", "train"])
    leaked = {str((args.data / p).resolve()) for p in duplicates["test"]}
    clean = predictions[~predictions["path"].map(lambda p: str(Path(p).resolve())).isin(leaked)]
    # the training copies of the 64 duplicated test images: automatic groups keep them out of validation
    copies = {str((args.data / p).resolve()) for p in duplicates["train"]}
    split_of = dict(zip(manifest["path"].map(lambda p: str(Path(p).resolve())), manifest["split"]))
    negative, positive = result.class_names
    clean_metrics = binary_metrics((clean["label"] == positive).astype(int).to_numpy(), clean["probability"].to_numpy(),
                                   result.threshold, result.class_names)
    return clean_metrics, sum(split_of.get(p) == "validation" for p in copies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "casting")
    parser.add_argument("--weights", type=Path, default=WEIGHTS)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "train_casting.json")
    args = parser.parse_args()
    import pandas as pd

    rss_before = peak_rss_mb()
    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="keeneye-bench-casting-"))
    result, train_seconds, train_peak_rss, text, phase_seconds = train(args, work)
    manifest = pd.read_csv(result.run_dir / "manifest.csv")
    train_paths = manifest.loc[manifest["split"].isin(["training", "validation"]), "path"].tolist()
    onnx_files = sorted((work / "cache").glob("embeddings/*/feature_extractor.onnx"))
    bare_all = bare_forward_seconds(train_paths, args.weights, onnx_files[0] if onnx_files else None)
    bare = bare_all["keras"]
    clean_metrics, copies_in_validation = test_scores(args, result, manifest)
    engine_lines = [line.strip() for line in text.splitlines() if line.startswith("embedding engine")]
    rows = {
        "train images (training + validation)": len(train_paths),
        "all images embedded (cold cache)": int(len(manifest)),
        "embedding engine": engine_lines[0] if engine_lines else "not printed",
        "test images": int(result.metrics["n"]),
        "test F1 (all test images)": round(result.metrics["at_threshold"]["f1"], 4),
        "test F1 (without 64 leaked duplicates)": round(clean_metrics["at_threshold"]["f1"], 4),
        "test images without duplicates": int(clean_metrics["n"]),
        "training copies of the duplicates in validation": int(copies_in_validation),
        **{f"{key} (s)": round(value, 1) for key, value in result.timings.items() if isinstance(value, (int, float))},
        "whole train (s)": round(train_seconds, 1),
        "bare Keras forward pass, training images (s)": round(bare, 1),
        "train / bare forward pass": round(train_seconds / bare, 3),
        "bare forward throughput (images/s)": round(len(train_paths) / bare, 1),
        **{f"bare {name} forward pass, training images (s)": round(value, 1) for name, value in bare_all.items() if name != "keras"},
        **{f"bare {name} / bare Keras": round(value / bare, 3) for name, value in bare_all.items() if name != "keras"},
        "floor: fastest bare engine over all embedded images / bare Keras": round(
            min(bare_all.values()) * len(manifest) / len(train_paths) / bare, 3),
        **{f"phase: {label} (s)": round(phase_seconds.get(label, 0.0), 1) for _, _, label in TIMED},
        "phase: not in a timed phase (imports, glue) (s)": round(
            train_seconds - sum(v for k, v in phase_seconds.items() if not k.startswith("  ")), 1),
        "peak RSS during train (MB)": round(train_peak_rss, 0),
        "peak RSS before train (MB)": round(rss_before, 0),
        "load average before / after (1 min)": f"{load_before[0]:.1f} / {os.getloadavg()[0]:.1f}",
    }
    targets = {
        "test F1 >= 0.97": rows["test F1 (all test images)"] >= 0.97,
        "no duplicate's copy in validation": copies_in_validation == 0,
        "train <= 0.4x bare forward": rows["train / bare forward pass"] <= 0.4,
        "peak RSS < 2 GB": train_peak_rss < 2048,
    }
    width = max(map(len, rows))
    print("\nkeeneye train on casting (cold embedding cache), CPU cores:", os.cpu_count())
    for key, value in rows.items():
        print(f"  {key:<{width}}  {value}")
    for key, ok in targets.items():
        print(f"  target {key:<{width - 7}}  {'met' if ok else 'NOT met'}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"results": rows, "targets": targets, "timings": result.timings,
                                    "python": sys.version.split()[0]}, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
