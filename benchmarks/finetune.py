"""Benchmark: frozen backbone (head only) vs fine-tuned, on the casting and magnetic-tile sets.

For each data set, one `keeneye train` with `fine_tune.enabled` (the genuine ImageNet weights), in its own
process so that peak RSS is the run's own. Reported per data set:
  - test F1 of the head-only model and of the fine-tuned model, each at the threshold chosen on validation
    for that phase (both are captured during the run, whichever train keeps), and which one train kept
    (by validation F1) with the kept bundle's own test metrics;
  - casting: the test split without the 64 test images that are byte-identical copies of training images
    (`DUPLICATES_train_test.tsv`), and the whole test split;
  - magnetic tile: a CSV manifest (only .jpg; MT_Free = good, the rest = defect) with the `group` column of
    `groups_heuristic.csv`, so testing and validation are held out by whole groups (data.test_fraction 0.2);
  - wall time of each phase (scan + embeddings, head, fine-tuning, evaluation + bundle), peak RSS.

Fine-tuning on 2 CPU cores is slow: image size, unfreeze depth and epochs per data set are arguments
(casting: keeneye's fine_tune defaults; magnetic-tile: the images method sized to ~20 minutes here; see --help).
Embeddings come from the shared cache (~/.cache/keeneye) unless KEENEYE_BENCH_FRESH_CACHE=1.

    python benchmarks/finetune.py [--datasets casting,magnetic-tile] [--out benchmarks/results/finetune.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
WEIGHTS = SHARED / "weights" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"

# casting: keeneye's own fine_tune defaults (nothing passed: method cached_top, unfreeze block_16_expand,
# learning rate 3e-5, cosine schedule, 8 views, up to 10 epochs; issue 12's casting check). magnetic-tile: the
# images-method settings of the first fine-tuning benchmark, chosen by timing one epoch on this 2-core machine.
# A key present here is passed to the fine_tune section (batch_size to training); absent: keeneye's default.
FINE_TUNE_KEYS = ("unfreeze", "epochs", "patience", "learning_rate", "method", "views", "schedule", "augment")
DEFAULTS = {
    "casting": {"image_size": 224, "seeds": [0]},
    "magnetic-tile": {"method": "images", "image_size": 224, "unfreeze": 30, "epochs": 8, "patience": 3, "learning_rate": 1e-4, "batch_size": 32,
                      "seeds": [0, 1, 2]},
}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def magnetic_tile_manifest(data: Path, folder: Path) -> Path:
    """path,label,group for the .jpg images (the .png beside them are masks)."""
    path = folder / "manifest.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "group"])
        for row in csv.DictReader((data / "groups_heuristic.csv").open()):
            if row["path"].lower().endswith(".jpg"):
                label = "good" if row["class"] == "MT_Free" else "defect"
                writer.writerow([str((data / row["path"]).resolve()), label, f"g{row['group']}"])
    return path


def f1_report(y_true, probabilities, threshold: float) -> dict:
    import numpy as np
    from sklearn.metrics import f1_score, precision_score, recall_score, roc_auc_score

    y_true = np.asarray(y_true).astype(int)
    p = np.asarray(probabilities, dtype=float)
    predicted = (p >= threshold).astype(int)
    return {
        "n": int(len(y_true)), "threshold": float(threshold),
        "f1": float(f1_score(y_true, predicted, zero_division=0)),
        "precision": float(precision_score(y_true, predicted, zero_division=0)),
        "recall": float(recall_score(y_true, predicted, zero_division=0)),
        "roc_auc": float(roc_auc_score(y_true, p)) if len(set(y_true)) == 2 else None,
        "errors": int((predicted != y_true).sum()),
    }


def run_one(name: str, settings: dict, work: Path, seed: int) -> dict:
    """One train with fine-tuning (in this process); both phases' models evaluated on the test split."""
    import numpy as np
    import pandas as pd
    from rich.console import Console

    import keeneye.training.finetune as finetune
    from keeneye import api
    from keeneye.config import config_from_dict
    from keeneye.model.head import build_classifier

    captured = {}
    original = finetune.fine_tune

    def capturing_fine_tune(cfg, extractor, head, *args, **kwargs):
        result = original(cfg, extractor, head, *args, **kwargs)
        captured["head"] = build_classifier(extractor, head)  # the frozen-backbone model, as trained by the head phase
        captured["fine_tune"] = build_classifier(result.extractor, result.head)
        return result

    finetune.fine_tune = capturing_fine_tune
    section = {
        "output_dir": str(work / "runs"), "run_name": f"{name}-seed{seed}",
        "model": {"weights": str(WEIGHTS), "image_size": settings["image_size"]},
        "training": {"seed": seed, **({"batch_size": settings["batch_size"]} if "batch_size" in settings else {})},
        # one fine-tune judged on validation: this benchmark compares that one fine-tuned model with the frozen one on test
        "fine_tune": {"enabled": True, "judge": "validation", **{k: settings[k] for k in FINE_TUNE_KEYS if k in settings}},
    }
    if os.environ.get("KEENEYE_BENCH_FRESH_CACHE"):  # cold embeddings; default: the shared cache (~/.cache/keeneye)
        section["cache_dir"] = str(work / "cache")
    if name == "casting":
        section |= {"data_folder_path": str(SHARED / "data" / "casting" / "casting_data"), "positive_class": "def_front"}
    else:
        manifest = magnetic_tile_manifest(SHARED / "data" / "magnetic-tile", work)
        section |= {"positive_class": "defect", "data": {"manifest_path": str(manifest), "test_fraction": 0.2}}
        section["training"] |= {"class_weight": "balanced"}
    config = config_from_dict(section, base_dir=work)
    rss_before = peak_rss_mb()
    started = time.perf_counter()
    result = api.train(config, console=Console(stderr=True, width=160))
    seconds = time.perf_counter() - started
    rss_train = peak_rss_mb()

    metadata = json.loads((result.run_dir / "metadata.json").read_text())
    rows = pd.read_csv(result.run_dir / "manifest.csv")
    test = rows[rows["evaluated"]]
    positive = result.class_names[1]
    y = (test["label"] == positive).astype(int).to_numpy()
    subsets = {"testing": np.ones(len(test), bool)}
    if name == "casting":
        casting = SHARED / "data" / "casting"
        duplicates = pd.read_csv(casting / "DUPLICATES_train_test.tsv", sep="\t", header=None, names=["test", "train"])
        leaked = {str((casting / p).resolve()) for p in duplicates["test"]}
        clean = ~test["path"].map(lambda p: str(Path(p).resolve())).isin(leaked).to_numpy()
        subsets = {"testing_without_duplicates": clean, "testing": subsets["testing"]}
    phases = metadata["training"]["phases"]
    evaluation = {}
    for phase in ("head", "fine_tune"):
        probabilities, failed = finetune.predict_paths(captured[phase], test["path"].tolist(), settings["image_size"])
        assert not failed, failed
        evaluation[phase] = {subset: f1_report(y[mask], probabilities[mask], phases[phase]["threshold"])
                             for subset, mask in subsets.items()}
    timings = metadata["timings"]
    return {
        "dataset": name, "seed": seed, "settings": settings, "run_dir": str(result.run_dir),
        "images": {split: int((rows["split"] == split).sum()) for split in ("training", "validation", "testing")},
        "kept_by_train": metadata["training"]["kept"], "kept_reason": metadata["training"].get("kept_reason"),
        "validation_f1": {phase: phases[phase]["validation_f1"] for phase in ("head", "fine_tune")},
        "epochs": {phase: phases[phase]["epochs_run"] for phase in ("head", "fine_tune")},
        "best_epoch": {phase: phases[phase]["best_epoch"] for phase in ("head", "fine_tune")},
        "test": evaluation,
        "bundle_test_metrics": metadata["metrics"]["testing"],
        "seconds": {
            "scan_and_embeddings": round(timings["scan_and_embeddings_s"], 1),
            "head_training": round(timings["head_training_s"], 1),
            "fine_tuning": round(timings.get("fine_tuning_s", 0.0), 1),
            "fine_tuning_per_epoch": round(timings.get("fine_tuning_s", 0.0) / max(1, phases["fine_tune"]["epochs_run"]), 1),
            "evaluation_and_bundle": round(timings["total_s"] - timings["scan_and_embeddings_s"] - timings["head_training_s"]
                                           - timings.get("fine_tuning_s", 0.0), 1),
            "train_total": round(seconds, 1),
        },
        "peak_rss_mb": {"before_train": round(rss_before), "train": round(rss_train)},
        "devices": metadata["training"]["devices"],
    }


def views_study(work: Path, seeds: list[int], views: list[int], image_size: int = 224) -> dict:
    """Head only, magnetic tile: does training the head on K augmented views per image (augmentation.frozen_views)
    beat the cached originals alone? Same grouped splits per seed; the embedding cache is warm after the first run."""
    from rich.console import Console

    from keeneye import api
    from keeneye.config import config_from_dict

    manifest = magnetic_tile_manifest(SHARED / "data" / "magnetic-tile", work)
    rows = []
    for seed in seeds:
        for k in views:
            config = config_from_dict({
                "output_dir": str(work / "runs"), "run_name": f"views{k}-seed{seed}", "cache_dir": str(work / "cache"),
                "positive_class": "defect", "model": {"weights": str(WEIGHTS), "image_size": image_size},
                "training": {"seed": seed, "class_weight": "balanced"}, "augmentation": {"frozen_views": k},
                "data": {"manifest_path": str(manifest), "test_fraction": 0.2},
            }, base_dir=work)
            started = time.perf_counter()
            result = api.train(config, console=Console(quiet=True))
            rows.append({"seed": seed, "frozen_views": k, "f1": result.metrics["at_threshold"]["f1"],
                         "roc_auc": result.metrics["roc_auc"], "average_precision": result.metrics["average_precision"],
                         "seconds": round(time.perf_counter() - started, 1)})
            print(json.dumps(rows[-1]), file=sys.stderr)
    summary = {}
    for k in views:
        mine = [r for r in rows if r["frozen_views"] == k]
        summary[str(k)] = {m: round(sum(r[m] for r in mine) / len(mine), 4) for m in ("f1", "roc_auc", "average_precision", "seconds")}
    return {"dataset": "magnetic-tile (grouped split)", "image_size": image_size, "runs": rows, "mean_by_views": summary}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="casting,magnetic-tile")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "finetune.json")
    parser.add_argument("--set", action="append", default=[], metavar="DATASET.KEY=VALUE",
                        help="change a default, e.g. casting.epochs=2 or magnetic-tile.image_size=160")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--views-study", action="store_true",
                        help="only the frozen_views study (head only, magnetic tile, seeds 0-2, K = 0 and 4)")
    args = parser.parse_args()
    if args.views_study:
        study = views_study(Path(tempfile.mkdtemp(prefix="keeneye-bench-views-")), [0, 1, 2], [0, 4])
        out = args.out.with_name("frozen_views.json")
        out.write_text(json.dumps(study, indent=2))
        print(json.dumps(study["mean_by_views"], indent=2))
        return 0
    settings = json.loads(json.dumps(DEFAULTS))
    for item in args.set:
        key, value = item.split("=", 1)
        dataset, field = key.split(".", 1)
        settings[dataset][field] = json.loads(value)

    if args.child:  # one data set in this process; JSON on the last line of stdout
        name, work, seed = args.child.split("|", 2)
        print(json.dumps(run_one(name, settings[name], Path(work), int(seed))))
        return 0

    results, work = {}, Path(tempfile.mkdtemp(prefix="keeneye-bench-finetune-"))
    for name in args.datasets.split(","):
        runs = []
        for seed in settings[name]["seeds"]:
            command = [sys.executable, __file__, "--child", f"{name}|{work}|{seed}"] + sum((["--set", s] for s in args.set), [])
            started = time.perf_counter()
            done = subprocess.run(command, stdout=subprocess.PIPE, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
            if done.returncode != 0:
                print(f"{name} seed {seed}: failed (exit {done.returncode})", file=sys.stderr)
                runs.append({"seed": seed, "error": f"exit {done.returncode}"})
                continue
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]) | {"process_seconds": round(time.perf_counter() - started, 1)})
        subset = "testing_without_duplicates" if name == "casting" else "testing"
        ok = [r for r in runs if "test" in r]
        mean = lambda values: round(sum(values) / len(values), 4) if values else None  # noqa: E731
        results[name] = {
            "runs": runs,
            "summary": {
                "subset": subset, "seeds": [r["seed"] for r in ok],
                "test_f1_head": [round(r["test"]["head"][subset]["f1"], 4) for r in ok],
                "test_f1_fine_tuned": [round(r["test"]["fine_tune"][subset]["f1"], 4) for r in ok],
                "test_f1_kept_by_train": [round(r["test"][r["kept_by_train"]][subset]["f1"], 4) for r in ok],
                "kept_by_train": [r["kept_by_train"] for r in ok],
                "mean_test_f1_head": mean([r["test"]["head"][subset]["f1"] for r in ok]),
                "mean_test_f1_fine_tuned": mean([r["test"]["fine_tune"][subset]["f1"] for r in ok]),
                "peak_rss_mb_max": max((r["peak_rss_mb"]["train"] for r in ok), default=None),
            },
        }
    targets = {}
    casting_runs = [r for r in results.get("casting", {}).get("runs", []) if "test" in r]
    if casting_runs:
        targets["casting head-only test F1 (without duplicates) >= 0.996 (issue 12)"] = all(
            r["test"]["head"]["testing_without_duplicates"]["f1"] >= 0.996 for r in casting_runs)
        targets["casting fine-tuned test F1 (without duplicates) >= 0.998 (issue 12)"] = all(
            r["test"]["fine_tune"]["testing_without_duplicates"]["f1"] >= 0.998 for r in casting_runs)
        targets["casting peak RSS < 3 GB"] = all(r["peak_rss_mb"]["train"] < 3072 for r in casting_runs)
    output = {"results": results, "targets": targets, "work": str(work), "python": sys.version.split()[0], "cpus": os.cpu_count()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(output, indent=2))
    for name, entry in results.items():
        subset = entry["summary"]["subset"]
        for r in entry["runs"]:
            if "test" not in r:
                continue
            h, f = r["test"]["head"][subset], r["test"]["fine_tune"][subset]
            print(f"{name} seed {r['seed']} ({subset}, n={h['n']}): head-only F1 {h['f1']:.4f} ({h['errors']} errors) | fine-tuned F1 "
                  f"{f['f1']:.4f} ({f['errors']} errors); kept by train: {r['kept_by_train']}; seconds {r['seconds']}; "
                  f"peak RSS {r['peak_rss_mb']['train']} MB")
    for target, ok in targets.items():
        print(f"{'PASS' if ok else 'FAIL'}  {target}")
    print(f"written to {args.out}")
    return 0 if all(targets.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
