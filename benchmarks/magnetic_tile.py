"""Benchmark: magnetic-tile defects from a CSV manifest, split by group (each tile was shot ~6 times).

A manifest is written (into a temporary folder, never into the repository) from
`../shared/data/magnetic-tile/groups_heuristic.csv`: only the `.jpg` images (the `.png` beside them
are masks), `MT_Free` = good, the five other folders = defect, and the `group` column. `keeneye train`
then carves testing (data.test_fraction) and validation by whole groups, stratified by label, with the
genuine ImageNet weights. Checked and reported:
  - no group shared between testing and training (nor validation), read back from the run's manifest.csv;
  - test F1 / precision / recall / ROC AUC at the chosen threshold;
  - what the audit still finds across groups (near-duplicates by dHash and by embedding: the heuristic
    groups are not perfect), and the test F1 with those leaked images left out (data.drop_leaked_test);
  - for contrast, the same data split image by image (no group column): the optimistic number a
    leaky split gives.

    python benchmarks/magnetic_tile.py [--data ../shared/data/magnetic-tile] [--out benchmarks/results/magnetic_tile.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO.parent / "shared" / "weights" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"


def write_manifest(data: Path, folder: Path, with_groups: bool = True) -> Path:
    rows = list(csv.DictReader((data / "groups_heuristic.csv").open()))
    path = folder / ("manifest.csv" if with_groups else "manifest_no_groups.csv")
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"] + (["group"] if with_groups else []))
        for row in rows:
            if not row["path"].lower().endswith(".jpg"):
                continue
            label = "good" if row["class"] == "MT_Free" else "defect"
            writer.writerow([str((data / row["path"]).resolve()), label] + ([f"g{row['group']}"] if with_groups else []))
    return path


def run(manifest: Path, work: Path, name: str, weights: Path, seed: int = 0, **data_section) -> dict:
    from rich.console import Console

    from keeneye import api
    from keeneye.config import config_from_dict

    config = config_from_dict(
        {
            "output_dir": str(work / "runs"),
            "run_name": name,
            "cache_dir": str(work / "cache"),
            "positive_class": "defect",
            "model": {"weights": str(weights), "image_size": 224},
            "training": {"seed": seed, "class_weight": "balanced"},
            "data": {"manifest_path": str(manifest), "test_fraction": 0.2, **data_section},
        },
        base_dir=work,
    )
    started = time.perf_counter()
    result = api.train(config, console=Console(quiet=True))
    seconds = time.perf_counter() - started
    return {"result": result, "seconds": seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "magnetic-tile")
    parser.add_argument("--weights", type=Path, default=WEIGHTS)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "magnetic_tile.json")
    parser.add_argument("--seeds", default="0,1,2", help="split seeds for the group-aware runs (the first is checked in detail)")
    args = parser.parse_args()

    import pandas as pd

    work = Path(tempfile.mkdtemp(prefix="keeneye-bench-magnetic-tile-"))
    manifest = write_manifest(args.data.resolve(), work)
    runs = {}

    grouped = run(manifest, work, "grouped", args.weights)
    result = grouped["result"]
    rows = pd.read_csv(result.run_dir / "manifest.csv", dtype={"group": str})
    groups = {split: set(rows.loc[rows["split"] == split, "group"]) for split in ("training", "validation", "testing")}
    audit = json.loads((result.run_dir / "audit.json").read_text())
    runs["grouped"] = summary(result, grouped["seconds"]) | {
        "images": {s: int((rows["split"] == s).sum()) for s in groups},
        "groups": {s: len(g) for s, g in groups.items()},
        "groups_shared_testing_training": len(groups["testing"] & groups["training"]),
        "groups_shared_testing_validation": len(groups["testing"] & groups["validation"]),
        "groups_shared_validation_training": len(groups["validation"] & groups["training"]),
        "audit": {
            "groups_crossing_splits": len(audit["groups"]["crossing_splits"]),
            "identical_sets_across_splits": len(audit["exact_duplicates"]["across_splits"]),
            "near_duplicate_pairs_hash": audit["near_duplicates"]["hash"]["n_pairs"],
            "near_duplicate_pairs_embedding": audit["near_duplicates"].get("embedding", {}).get("n_pairs"),
            "leaked_testing_images": audit["leakage"]["leaked_testing_images"],
            "leaked_by_kind": audit["leakage"]["by_kind"],
        },
        "split_notes": audit.get("split_notes"),
    }
    dropped = run(manifest, work, "grouped-drop-leaked", args.weights, drop_leaked_test=True)
    runs["grouped_drop_leaked_test"] = summary(dropped["result"], dropped["seconds"])
    leaky = run(write_manifest(args.data.resolve(), work, with_groups=False), work, "image-split", args.weights)
    leaky_audit = json.loads((leaky["result"].run_dir / "audit.json").read_text())
    runs["image_level_split_for_contrast"] = summary(leaky["result"], leaky["seconds"]) | {
        "leaked_testing_images": leaky_audit["leakage"]["leaked_testing_images"],
    }

    seeds = [int(s) for s in args.seeds.split(",")]
    per_seed = [runs["grouped"]] + [summary(run(manifest, work, f"grouped-seed{seed}", args.weights, seed=seed)["result"], 0.0) for seed in seeds[1:]]
    for seed, entry in zip(seeds, per_seed):
        entry["seed"] = seed
        shared = shared_groups(Path(entry["run_dir"]))
        entry["groups_shared_with_testing"] = shared
    f1s = [entry["f1"] for entry in per_seed]
    runs["grouped_over_seeds"] = {
        "seeds": seeds, "f1": f1s, "f1_mean": float(sum(f1s) / len(f1s)),
        "f1_sd": float((sum((f - sum(f1s) / len(f1s)) ** 2 for f in f1s) / max(1, len(f1s) - 1)) ** 0.5),
        "roc_auc": [entry["roc_auc"] for entry in per_seed],
        "groups_shared_with_testing": [entry["groups_shared_with_testing"] for entry in per_seed],
    }
    ok = all(entry["groups_shared_with_testing"] == 0 for entry in per_seed)
    output = {"data": str(args.data), "manifest": str(manifest), "work": str(work), "no_shared_groups": ok, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(output, indent=2))
    g = runs["grouped"]
    print(f"group-aware split: {g['images']} images, {g['groups']} groups; shared groups testing-training "
          f"{g['groups_shared_testing_training']}, testing-validation {g['groups_shared_testing_validation']} -> {'PASS' if ok else 'FAIL'}")
    for name, r in runs.items():
        if name == "grouped_over_seeds":
            print(f"group-aware, seeds {r['seeds']}: test F1 {', '.join(f'{f:.3f}' for f in r['f1'])} "
                  f"(mean {r['f1_mean']:.3f} +- {r['f1_sd']:.3f}); shared groups with testing {r['groups_shared_with_testing']}")
            continue
        print(f"{name:32s} test n={r['n']:4d}  F1 {r['f1']:.4f}  precision {r['precision']:.4f}  recall {r['recall']:.4f}  "
              f"ROC AUC {r['roc_auc']:.4f}  threshold {r['threshold']:.3f}  ({r['seconds']:.0f} s)")
    print(f"audit of the grouped run: {g['audit']}")
    print(f"written to {args.out}; runs in {work / 'runs'}")
    return 0 if ok else 1


def shared_groups(run_dir: Path) -> int:
    """Groups that testing shares with training or validation, read back from the run's manifest.csv."""
    import pandas as pd

    rows = pd.read_csv(run_dir / "manifest.csv", dtype={"group": str})
    testing = set(rows.loc[rows["split"] == "testing", "group"])
    fitted = set(rows.loc[rows["split"].isin(["training", "validation"]), "group"])
    return len(testing & fitted)


def summary(result, seconds: float) -> dict:
    at = result.metrics["at_threshold"]
    return {
        "run_dir": str(result.run_dir), "n": result.metrics["n"], "f1": at["f1"], "precision": at["precision"],
        "recall": at["recall"], "roc_auc": result.metrics["roc_auc"], "threshold": result.threshold,
        "f1_at_0.5": result.metrics["at_0.5"]["f1"], "seconds": round(seconds, 1),
    }


if __name__ == "__main__":
    sys.exit(main())
