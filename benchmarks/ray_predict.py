"""Benchmark: `predict --ray` with 1 and 2 actors against single-process predict, on the casting test split.

Two comparisons, all modes of both interleaved round-robin in one run (order alternating per round;
the CPU is shared, timings are noisy; medians are compared), the same 715 images every time:

* **In process (the Python API), on a running local Ray.** The benchmark starts Ray once
  (`ray.init`, its start-up reported apart, not in any timing), as a long-lived cluster would be.
  Each timed job includes loading the model (local: `Predictor.from_bundle`, which loads model.keras
  as `keeneye predict` does, then ONNX Runtime with a thread per core; Ray: every actor starts and
  opens the bundle's model.onnx without Keras, with cores/actors threads), reading, decoding and
  scoring all images. TensorFlow is already imported here after the first round.
* **The command line, each run a fresh process** (`--cli`, on by default): `keeneye predict RUN TEST
  -o x.csv` against `keeneye predict RUN TEST --ray --actors N --output x.parquet`, both with
  everything inside the timing (Python start, imports, model load, scoring, writing). The Ray runs
  come twice: `--address` of the running cluster above (how the README tells users to run it: the
  cluster outlives the command), and without an address, so each run starts (and stops) its own
  local Ray (`ray.init` inside the timing). Every run writes to a fresh output, so no resume skips work.

Target (issue 16): Ray with 2 actors >= 80% of the single-process throughput on this machine.

    python benchmarks/ray_predict.py [--bundle runs/<name>] [--repeats 3] [--no-cli] [--out benchmarks/results/ray_predict.json]

Without --bundle it trains one on the casting training images at 224 px (shared embedding cache).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable

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


def run_cli(bundle: Path, test: Path, work: Path, ray_args: list[str] | None) -> tuple[float, int]:
    """`keeneye predict` as a user runs it, in a fresh process; `ray_args` None: single process."""
    import pandas as pd

    output = work / f"{uuid.uuid4().hex}{'.csv' if ray_args is None else '.parquet'}"
    command = [sys.executable, "-m", "keeneye", "predict", str(bundle), str(test), "--output", str(output)]
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}  # no address: a local Ray per run
    start = time.perf_counter()
    subprocess.run([*command, *(ray_args or [])], check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    frame = pd.read_csv(output) if ray_args is None else pd.read_parquet(output)
    output.unlink()
    return seconds, int(frame["error"].isna().sum())


def modes_to_run(bundle: Path, test: Path, work: Path, address: str, cli: bool) -> dict[str, Callable[[], tuple[float, int]]]:
    modes = {"single process": lambda: run_local(bundle, test),
             "ray, 1 actor": lambda: run_ray(bundle, test, 1), "ray, 2 actors": lambda: run_ray(bundle, test, 2)}
    if cli:
        modes.update({
            "cli single process": lambda: run_cli(bundle, test, work, None),
            "cli ray 1 actor --address": lambda: run_cli(bundle, test, work, ["--ray", "--actors", "1", "--address", address]),
            "cli ray 2 actors --address": lambda: run_cli(bundle, test, work, ["--ray", "--actors", "2", "--address", address]),
            "cli ray 2 actors, own ray.init": lambda: run_cli(bundle, test, work, ["--ray", "--actors", "2"]),
        })
    return modes


def summary(times: dict[str, list[float]], counts: dict[str, int]) -> dict[str, dict]:
    """Medians per mode; each compared with the single process of its own kind (API or CLI)."""
    rows = {}
    for name, values in times.items():
        base = statistics.median(times["cli single process" if name.startswith("cli") else "single process"])
        rows[name] = {"seconds": values, "median_s": statistics.median(values), "images": counts[name],
                      "images_per_s": counts[name] / statistics.median(values),
                      "vs_single_process": base / statistics.median(values)}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cli", action=argparse.BooleanOptionalAction, default=True, help="also time the command line")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "ray_predict.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="keeneye-ray-bench-"))
    bundle = (args.bundle or train_bundle(args.data, work)).resolve()
    test = args.data / "test"

    import ray

    start = time.perf_counter()
    context = ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray_start_s = time.perf_counter() - start
    modes = modes_to_run(bundle, test, work, context.address_info["gcs_address"], args.cli)
    times: dict[str, list[float]] = {name: [] for name in modes}
    counts: dict[str, int] = {}
    for round_ in range(args.repeats):
        order = list(modes) if round_ % 2 == 0 else list(reversed(modes))  # interleaved, order alternating
        for name in order:
            seconds, counts[name] = modes[name]()
            times[name].append(seconds)
            print(f"round {round_ + 1} {name}: {seconds:.1f} s", file=sys.stderr)
    ray.shutdown()

    rows = summary(times, counts)
    print(f"{'mode':<32}{'median s':>10}{'images/s':>10}{'vs single':>11}")
    for name, row in rows.items():
        print(f"{name:<32}{row['median_s']:>10.1f}{row['images_per_s']:>10.1f}{row['vs_single_process']:>10.0%}")
    print(f"(local Ray start-up, not in the API jobs: {ray_start_s:.1f} s; load average at the end {os.getloadavg()[0]:.1f})")
    met = {name: rows[name]["vs_single_process"] >= 0.8 for name in rows if "2 actors" in name}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "data": str(test), "bundle": str(bundle), "repeats": args.repeats, "cpus": os.cpu_count(),
        "platform": platform.platform(), "ray_start_s": ray_start_s, "load_average_end": os.getloadavg(),
        "target": "ray 2 actors >= 0.8 x single process (API vs API, CLI vs CLI)", "met": met,
        "modes": rows,
    }, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
