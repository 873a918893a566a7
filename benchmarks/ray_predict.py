"""Benchmark: `predict --ray` with 1 and 2 actors against single-process predict, on the casting test split.

All in one process, interleaved round-robin (the CPU is shared, timings are noisy; medians are
compared). Each timed job includes loading the model (local: `Predictor.from_bundle`, which loads
model.keras as `keeneye predict` does, then ONNX Runtime with a thread per core; Ray: every actor
starts and opens the bundle's model.onnx with one thread, without Keras), reading, decoding and
scoring all images. The local Ray
instance is started once beforehand (a cluster is long-lived) and its start-up time is reported
apart. Target (issue 16): Ray with 2 actors >= 80% of the single-process throughput on this machine.

    python benchmarks/ray_predict.py [--bundle runs/<name>] [--repeats 3] [--out benchmarks/results/ray_predict.json]

Without --bundle it trains one on the casting training images at 224 px (shared embedding cache).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DATA = SHARED / "data" / "casting" / "casting_data"


def train_bundle(data: Path, work: Path) -> Path:
    """A 224 px casting bundle; embeddings come from the shared cache (~/.cache/keeneye) when warm."""
    from rich.console import Console

    from keeneye import api
    from keeneye.config import config_from_dict

    config = config_from_dict(
        {"data_folder_path": str(data), "output_dir": str(work / "runs"), "run_name": "casting-224",
         "model": {"image_size": 224, "weights": "imagenet"}, "training": {"epochs": 50, "seed": 0}},
        base_dir=work,
    )
    return api.train(config, console=Console(stderr=True, quiet=True)).run_dir


def run_local(bundle: Path, test: Path) -> tuple[float, int]:
    from keeneye.inference.predictor import Predictor, expand_inputs

    start = time.perf_counter()
    predictor = Predictor.from_bundle(bundle)
    paths, _ = expand_inputs([test])
    frame = predictor.predict_paths(paths)
    return time.perf_counter() - start, int(frame["error"].isna().sum())


def run_ray(bundle: Path, test: Path, actors: int) -> tuple[float, int]:
    from keeneye.inference.distributed import predict_ray

    start = time.perf_counter()
    frame = predict_ray(bundle, [test], actors=actors)
    return time.perf_counter() - start, int(frame["error"].isna().sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "ray_predict.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="keeneye-ray-bench-"))
    bundle = args.bundle or train_bundle(args.data, work)
    test = args.data / "test"

    import ray

    start = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray_start_s = time.perf_counter() - start
    modes = {"single process": lambda: run_local(bundle, test),
             "ray, 1 actor": lambda: run_ray(bundle, test, 1), "ray, 2 actors": lambda: run_ray(bundle, test, 2)}
    times: dict[str, list[float]] = {name: [] for name in modes}
    counts: dict[str, int] = {}
    for round_ in range(args.repeats):
        order = list(modes) if round_ % 2 == 0 else list(reversed(modes))  # interleaved, order alternating
        for name in order:
            seconds, counts[name] = modes[name]()
            times[name].append(seconds)
            print(f"round {round_ + 1} {name}: {seconds:.1f} s", file=sys.stderr)
    ray.shutdown()

    base = statistics.median(times["single process"])
    rows = {name: {"seconds": values, "median_s": statistics.median(values), "images": counts[name],
                   "images_per_s": counts[name] / statistics.median(values),
                   "vs_single_process": base / statistics.median(values)} for name, values in times.items()}
    print(f"{'mode':<16}{'median s':>10}{'images/s':>10}{'vs single':>11}")
    for name, row in rows.items():
        print(f"{name:<16}{row['median_s']:>10.1f}{row['images_per_s']:>10.1f}{row['vs_single_process']:>10.0%}")
    print(f"(local Ray start-up, not in the jobs: {ray_start_s:.1f} s; load average at the end {os.getloadavg()[0]:.1f})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "data": str(test), "bundle": str(bundle), "repeats": args.repeats, "cpus": os.cpu_count(),
        "platform": platform.platform(), "ray_start_s": ray_start_s, "load_average_end": os.getloadavg(),
        "target": "ray 2 actors >= 0.8 x single process", "met": rows["ray, 2 actors"]["vs_single_process"] >= 0.8,
        "modes": rows,
    }, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
