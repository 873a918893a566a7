"""Benchmark: `keeneye train` on casting with config overrides (e.g. head.auto), test F1 with and without duplicates.

One train on the casting folder layout (genuine ImageNet weights, the shared embedding cache, seed 0,
default settings plus any `--set key=value`), then:
  - test F1, ROC AUC and AP on the whole test split and without the 64 test images that are
    byte-identical copies of training images (DUPLICATES_train_test.tsv; benchmarks/train_casting.py's rule);
  - the head chosen by cross-validation, the reason, every candidate's pooled out-of-fold AP and paired
    per-fold difference from the best, and what the unpaired one-SE rule would have chosen from the same
    candidates (benchmarks/magnetic_tile.py's unpaired_choice);
  - the cross-validated F1 estimate and the wall time of the train.
Nothing is chosen on the test split: it is only scored.

    python benchmarks/casting_head_auto.py --set model.features=multi --set head.auto=true [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from magnetic_tile import WEIGHTS, unpaired_choice  # noqa: E402
from train_casting import test_scores  # noqa: E402


def main() -> int:
    from rich.console import Console
    import pandas as pd

    from keeneye import api
    from keeneye.config import config_from_dict

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "casting")
    parser.add_argument("--weights", type=Path, default=WEIGHTS)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "casting_head_auto.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="keeneye-bench-casting-auto-"))
    config = config_from_dict({"data_folder_path": str(args.data / "casting_data"), "output_dir": str(work / "runs"),
                               "run_name": "casting", "model": {"weights": str(args.weights)}, "training": {"seed": 0}},
                              base_dir=work, overrides=args.overrides)
    started = time.perf_counter()
    result = api.train(config, console=Console(stderr=True))
    seconds = time.perf_counter() - started
    clean, copies_in_validation = test_scores(args, result, pd.read_csv(result.run_dir / "manifest.csv"))
    m, cv = result.metrics, result.metrics.get("cross_validation") or {}
    def scores(s: dict) -> dict:
        (_, fp), (fn, _) = s["at_threshold"]["confusion_matrix"]["matrix"]
        return {"f1": round(s["at_threshold"]["f1"], 4), "errors": int(fp + fn), "n": int(s["n"]),
                "roc_auc": round(s["roc_auc"], 4), "average_precision": round(s["average_precision"], 4)}

    output = {
        "overrides": args.overrides, "run_dir": str(result.run_dir), "threshold": result.threshold, "seconds": round(seconds, 1),
        "test": scores(m), "test_without_duplicates": scores(clean), "duplicate_copies_in_validation": copies_in_validation,
        "cv_chosen": cv.get("chosen"), "cv_reason": cv.get("reason"), "cv_unpaired_choice": unpaired_choice(cv.get("candidates") or []),
        "cv_estimate": cv.get("estimate"), "cv_candidates": cv.get("candidates"),
        # with fine_tune.enabled: kept or dropped, and the folds judge's verdict and estimate (metrics.json "fine_tune")
        "fine_tune": m.get("fine_tune"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(output, indent=2))
    print(json.dumps({k: v for k, v in output.items() if k != "cv_candidates"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
