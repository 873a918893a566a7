"""Predict throughput of several bundles side by side (e.g. model.views 1 vs 8, with and without the stacked score).

    python benchmarks/bundle_throughput.py --bundle views1=runs/a --bundle views8=runs/b [--images 200] [--repeats 5]
                                           [--out benchmarks/results/bundle_throughput.json]

`Predictor.predict_paths` (engine auto, from the image files, as `keeneye predict` runs it) over the first `--images`
testing images of the first bundle's predictions.csv, every bundle in turn, `--repeats` rounds; medians of images per
second and the ratio to the first bundle. Each predictor is loaded once, before the rounds, and warmed on a few images,
so start-up is not timed. Timings on a shared machine are noisy: read the ratios, measured in one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", action="append", required=True, metavar="NAME=PATH", help="a bundle to time (repeatable)")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "bundle_throughput.json")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "src"))
    from keeneye.inference.predictor import Predictor

    bundles = dict(entry.split("=", 1) for entry in args.bundle)
    first = Path(next(iter(bundles.values())))
    paths = pd.read_csv(first / "predictions.csv")["path"].head(args.images).tolist()
    predictors = {name: Predictor.from_bundle(path) for name, path in bundles.items()}
    for predictor in predictors.values():
        predictor.predict_paths(paths[:8])  # warm: engines built, first batch run
    rates: dict[str, list[float]] = {name: [] for name in predictors}
    for _ in range(args.repeats):
        for name, predictor in predictors.items():
            started = time.perf_counter()
            predictor.predict_paths(paths)
            rates[name].append(len(paths) / (time.perf_counter() - started))
    base = statistics.median(next(iter(rates.values())))
    rows = {name: {"bundle": bundles[name], "engine": predictors[name].engine_name,
                   "passes_per_image": predictors[name].input_spec.passes,
                   "images_per_s": statistics.median(values), "ratio": statistics.median(values) / base, "runs": values}
            for name, values in rates.items()}
    print(f"{'bundle':24} {'passes':>6} {'images/s':>9} {'ratio':>6}")
    for name, row in rows.items():
        print(f"{name:24} {row['passes_per_image']:6d} {row['images_per_s']:9.1f} {row['ratio']:6.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"images": len(paths), "repeats": args.repeats, "results": rows}, indent=2))
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
