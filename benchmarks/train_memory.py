"""Benchmark: peak RSS of `keeneye train` on casting with a warm embedding cache, checkout against checkout.

Each checkout (e.g. /work/main and this worktree) trains in its own child process (PYTHONPATH=<checkout>/src)
on the same config as benchmarks/train_casting.py, with its own copy of a warm embedding cache (the
cache format may differ between checkouts, so they never share one). The child's peak RSS is read
from getrusage(RUSAGE_CHILDREN) (each run in a fresh process of its own). The template cache must
already hold every casting vector (warm); a checkout that consolidates its cache does so in its first
run (shards -> one memory-mapped matrix), so its later runs read the consolidated cache. The
checkouts alternate for `--repeats` runs each; every run and the medians are reported, with the
feature matrix size (images x 1280 floats x 4 bytes).

    python benchmarks/train_memory.py --checkout /work/main --checkout . \
        --cache-template ~/.cache/keeneye [--repeats 2] [--out benchmarks/results/train_memory.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "casting"
CACHE_KEY = "mobilenet_v2-a1.0-s224-w71e4c4ec4aa24c9c-v2"  # MobileNetV2 1.0/224, gap: the config below

CHILD = r"""
import json, sys, time
from pathlib import Path
from rich.console import Console
from keeneye import api
from keeneye.config import config_from_dict
work, data, cache = map(Path, sys.argv[1:4])
config = config_from_dict({"data_folder_path": str(data / "casting_data"), "output_dir": str(work / "runs"),
                           "run_name": "casting", "cache_dir": str(cache), "training": {"epochs": 50, "seed": 0}},
                          base_dir=work)
started = time.perf_counter()
result = api.train(config, console=Console(stderr=True, quiet=True))
print(json.dumps({"seconds": time.perf_counter() - started, "n_images": int(result.metrics["n"]),
                  "f1": result.metrics["at_threshold"]["f1"], "timings": result.timings}))
"""


def run_once(checkout: Path, cache: Path, data: Path) -> dict:
    """One `train` in a child process; its peak RSS (MB) from RUSAGE_CHILDREN (max over finished children)."""
    work = Path(tempfile.mkdtemp(prefix="keeneye-bench-memory-"))
    env = {**os.environ, "PYTHONPATH": str(checkout / "src"), "TF_CPP_MIN_LOG_LEVEL": "2"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    done = subprocess.run([sys.executable, "-c", CHILD, str(work), str(data), str(cache)], env=env,
                          capture_output=True, text=True, check=False)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    shutil.rmtree(work, ignore_errors=True)
    if done.returncode:
        raise SystemExit(f"train failed in {checkout}:\n{done.stderr[-4000:]}")
    if peak <= before:
        raise SystemExit("a child's peak RSS is hidden by an earlier, larger one: run fewer checkouts per process")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "peak_rss_mb": peak / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkout", type=Path, action="append", required=True)
    parser.add_argument("--cache-template", type=Path, default=Path.home() / ".cache" / "keeneye")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "train_memory.json")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="keeneye-bench-memory-caches-"))
    caches = {}
    for number, checkout in enumerate(args.checkout):
        caches[checkout] = scratch / f"cache{number}"
        shutil.copytree(args.cache_template / "embeddings" / CACHE_KEY, caches[checkout] / "embeddings" / CACHE_KEY)
    runs: dict[str, list[dict]] = {str(c): [] for c in args.checkout}
    # RUSAGE_CHILDREN keeps the largest child so far, so each run happens in a fresh grandchild of its own.
    for repeat in range(args.repeats):
        for checkout in args.checkout:
            result = _isolated(checkout, caches[checkout], args.data)
            runs[str(checkout)].append(result)
            print(f"run {repeat + 1} {checkout}: peak RSS {result['peak_rss_mb']:.0f} MB, {result['seconds']:.0f} s", flush=True)
    n = runs[str(args.checkout[0])][0]["n_images"]
    n_all = sum(1 for p in (args.data / "casting_data").rglob("*") if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
    summary = {c: {"median_peak_rss_mb": round(statistics.median(r["peak_rss_mb"] for r in rs), 1),
                   "peak_rss_mb": [round(r["peak_rss_mb"], 1) for r in rs],
                   "median_seconds": round(statistics.median(r["seconds"] for r in rs), 1),
                   "test_f1": [round(r["f1"], 4) for r in rs]} for c, rs in runs.items()}
    shards = sorted((args.cache_template / "embeddings" / CACHE_KEY).glob("*"))
    result = {"summary": summary, "runs": runs, "test_images": n, "images": n_all,
              "feature_matrix_mb": round(n_all * 1280 * 4 / 2**20, 1), "cache_template_files": len(shards),
              "cpu_cores": os.cpu_count(), "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(summary, indent=2))
    print(f"written to {args.out}")
    shutil.rmtree(scratch, ignore_errors=True)


def _isolated(checkout: Path, cache: Path, data: Path) -> dict:
    """run_once in a fresh Python process, so RUSAGE_CHILDREN there sees this run's child only."""
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import train_memory as t; from pathlib import Path; "
            "print(json.dumps(t.run_once(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))))")
    done = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), str(checkout), str(cache), str(data)],
                          capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(done.stderr[-4000:] or done.stdout[-4000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
