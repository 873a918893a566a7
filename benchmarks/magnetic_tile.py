"""Benchmark: magnetic-tile defects in the 5 group folds of `../shared/data/magnetic-tile/folds_5.csv`.

Fold k is testing; training and validation come from the other four (validation and the
cross-validation folds group-aware). For every fold, one `keeneye train` (genuine ImageNet weights,
default settings plus any `--set key=value`), and printed per fold and as mean +- sd:
  - test F1 at the chosen threshold and at 0.5, ROC AUC, average precision;
  - the cross-validated estimate (F1 over the out-of-fold predictions of training + validation,
    printed by train before the test score) and its gap to the test F1;
  - over all test folds, the share of each defect kind flagged (recall per kind) and of good tiles
    (MT_Free: false alarms).
Manifests are written into a temporary folder (never into the repository): only `.jpg` images,
MT_Free = good, the five other folders = defect.

  --no-groups: the manifest carries no group column at all (as a folder layout would): the only groups
    are the automatic ones (identical files, perceptual-hash and embedding near-duplicates). The testing
    fold is still the group fold, so the test stays honest; what changes is how honest validation is.
  --set key=value: config overrides, as `keeneye train --set` (e.g. --set head.auto=true,
    --set model.features=..., --set training.cv_publish=average).

    python benchmarks/magnetic_tile.py [--no-groups] [--set head.auto=true] [--folds 0,1,2,3,4] [--out FILE]
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO.parent / "shared" / "weights" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"


def write_manifest(data: Path, folder: Path, fold: int, with_groups: bool) -> Path:
    """path,label,split[,group]: fold `fold` is testing, the others training (validation is carved by train)."""
    rows = list(csv.DictReader((data / "folds_5.csv").open()))
    path = folder / f"manifest_fold{fold}{'' if with_groups else '_no_groups'}.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "split"] + (["group"] if with_groups else []))
        for row in rows:
            if not row["path"].lower().endswith(".jpg"):
                continue
            label = "defect" if row["binary_label"] == "1" else "good"
            split = "testing" if int(row["fold"]) == fold else ""
            writer.writerow([str((data / row["path"]).resolve()), label, split] + ([f"g{row['group']}"] if with_groups else []))
    return path


def run_fold(manifest: Path, work: Path, name: str, weights: Path, overrides: list[str]) -> dict:
    from rich.console import Console

    from keeneye import api
    from keeneye.config import config_from_dict

    config = config_from_dict(
        {
            "output_dir": str(work / "runs"),
            "run_name": name,
            "positive_class": "defect",
            "model": {"weights": str(weights), "image_size": 224},
            "training": {"seed": 0},
            "data": {"manifest_path": str(manifest)},
        },
        base_dir=work, overrides=overrides,
    )
    started = time.perf_counter()
    result = api.train(config, console=Console(quiet=True))
    seconds = time.perf_counter() - started
    m = result.metrics
    cv = m.get("cross_validation") or {}
    # with head.anomaly_feature the published model is the stacked one, with fine-tuning judged across the folds and
    # kept the fine-tuned one: each has its own cross-validated estimate
    tuned = m.get("fine_tune") or {}
    published = tuned.get("cross_validation") if tuned.get("kept") else (m.get("anomaly_feature") or {}).get("cross_validation")
    estimate = (published or cv).get("estimate", {})
    audit = json.loads((result.run_dir / "audit.json").read_text())
    entry = {
        "run_dir": str(result.run_dir), "n": m["n"], "n_positive": m["n_positive"], "threshold": result.threshold,
        "threshold_method": m["threshold_choice"]["method"],
        "f1": m["at_threshold"]["f1"], "f1_at_0.5": m["at_0.5"]["f1"], "precision": m["at_threshold"]["precision"],
        "recall": m["at_threshold"]["recall"], "roc_auc": m["roc_auc"], "average_precision": m["average_precision"],
        "cv_f1": estimate.get("f1_mean"), "cv_f1_sd": estimate.get("f1_sd"), "cv_head": cv.get("chosen"),
        "cv_logistic_c": next((c.get("logistic_c") for c in cv.get("candidates", []) if c.get("name") == cv.get("chosen")
                               and c.get("kind") == "logistic"), None),
        "cv_candidates": cv.get("candidates"), "automatic_groups": audit["groups"].get("automatic"),
        "seconds": round(seconds, 1),
        "fine_tune_kept": tuned.get("kept"), "fine_tune_verdict": (tuned.get("cross_validation") or {}).get("verdict"),
    }
    entry["cv_gap"] = None if entry["cv_f1"] is None else entry["cv_f1"] - entry["f1"]
    entry["flagged_by_kind"] = flagged_by_kind(result.run_dir / "predictions.csv")
    entry["cv_unpaired_choice"] = unpaired_choice(entry["cv_candidates"] or [])
    return entry


def flagged_by_kind(predictions: Path) -> dict:
    """{MT_<kind>: [test images, flagged as defect]} from a run's predictions.csv: which defect kinds the model
    misses (recall per kind) and how many good tiles (MT_Free) it flags (false alarms)."""
    import pandas as pd

    rows = pd.read_csv(predictions)
    rows = rows.assign(kind=rows["path"].map(lambda p: Path(p).parts[-3]), flagged=rows["predicted"] == "defect")
    counts = rows.groupby("kind")["flagged"].agg(["size", "sum"])
    return {kind: [int(n), int(f)] for kind, (n, f) in counts.iterrows()}


def unpaired_choice(candidates: list[dict]) -> str | None:
    """What the earlier one-SE rule would have chosen from the same candidates: the simplest whose pooled
    OOF AP is within sd(winner's fold APs) / sqrt(K) of the best (for comparison with the paired rule)."""
    import numpy as np

    if len(candidates) < 2 or "fold_average_precision" not in candidates[0]:
        return None
    aps = [c["oof_average_precision"] for c in candidates]
    best = int(np.argmax(aps))
    folds = np.asarray(candidates[best]["fold_average_precision"], float)
    band = np.nanstd(folds, ddof=1) / np.sqrt(len(folds))
    return next(c["name"] for c, ap in zip(candidates, aps) if ap >= aps[best] - band)


def mean_sd(values: list) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "sd": None}
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0}


def pooled_flags(per_fold: list[dict]) -> dict:
    """The folds' [images, flagged] per kind, summed."""
    pooled: dict = {}
    for fold in per_fold:
        for kind, (n, f) in fold.items():
            total = pooled.setdefault(kind, [0, 0])
            total[0], total[1] = total[0] + n, total[1] + f
    return dict(sorted(pooled.items()))


KEYS = ("f1", "f1_at_0.5", "roc_auc", "average_precision", "cv_f1", "cv_gap", "threshold")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "magnetic-tile")
    parser.add_argument("--weights", type=Path, default=WEIGHTS)
    parser.add_argument("--no-groups", action="store_true", help="no group column: automatic groups only")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--folds", default="0,1,2,3,4")
    parser.add_argument("--out", type=Path, default=None, help="default benchmarks/results/magnetic_tile[_no_groups].json")
    args = parser.parse_args()
    out = args.out or REPO / "benchmarks" / "results" / f"magnetic_tile{'_no_groups' if args.no_groups else ''}.json"

    work = Path(tempfile.mkdtemp(prefix="keeneye-bench-magnetic-tile-"))
    data = args.data.resolve()
    folds = {}
    for fold in [int(f) for f in args.folds.split(",")]:
        manifest = write_manifest(data, work, fold, with_groups=not args.no_groups)
        r = folds[fold] = run_fold(manifest, work, f"fold{fold}", args.weights, args.overrides)
        auto = r["automatic_groups"] or {}
        cv = "n/a" if r["cv_f1"] is None else f"{r['cv_f1']:.3f} +- {r['cv_f1_sd']:.3f}"
        print(f"fold {fold}: CV estimate F1 {cv} -> test F1 {r['f1']:.3f} (at 0.5: {r['f1_at_0.5']:.3f}), ROC AUC {r['roc_auc']:.3f}, "
              f"AP {r['average_precision']:.3f}, threshold {r['threshold']:.3f}, head {r['cv_head']}"
              f"{'' if r['cv_logistic_c'] is None else ' (logistic, C %g)' % r['cv_logistic_c'][0]}"
              f"{'' if r['cv_unpaired_choice'] is None else ' [unpaired rule: %s]' % r['cv_unpaired_choice']}, automatic groups "
              f"{auto.get('n_groups')} (largest {auto.get('largest')}), {r['seconds']:.0f} s"
              f"{'' if r['fine_tune_kept'] is None else '; fine-tuning %s across the folds: %s' % ('kept' if r['fine_tune_kept'] else 'dropped', r['fine_tune_verdict']['reason'])}",
              flush=True)
    summary = {key: mean_sd([r[key] for r in folds.values()]) for key in KEYS}
    summary["abs_cv_gap"] = mean_sd([abs(r["cv_gap"]) for r in folds.values() if r["cv_gap"] is not None])
    for key, value in summary.items():
        if value["mean"] is not None:
            print(f"{key:18s} {value['mean']:.4f} +- {value['sd']:.4f}")
    summary["flagged_by_kind"] = pooled_flags([r["flagged_by_kind"] for r in folds.values()])
    print("flagged as defect over the test folds (recall per defect kind; false alarms on MT_Free): " + ", ".join(
        f"{kind} {f}/{n} ({f / n:.2f})" for kind, (n, f) in summary["flagged_by_kind"].items()))
    output = {"data": str(data), "groups": "none (automatic only)" if args.no_groups else "folds_5.csv group column",
              "overrides": args.overrides, "work": str(work), "folds": folds, "summary": summary}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(output, indent=2))
    print(f"written to {out}; runs in {work / 'runs'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
