"""Benchmark: keeneye's prediction path against plain Keras and the bare ONNX Runtime forward pass.

All measured in one process, side by side, each repeated and interleaved round-robin (the CPU
is shared, so timings are noisy; medians of the interleaved repeats are what is compared):

  (a) Keras `model.predict` called once per image, on preloaded images (a subset: it is slow);
  (b) Keras `model.predict` batched (batch 32), on preloaded images;
  (c) `Predictor.predict_paths` end to end from the files on disk (read, decode, resize, infer,
      labels), once per engine (onnx, keras); engine start-up timed separately;
  (d) the bare ONNX Runtime forward pass of the bundle's model.onnx on preloaded tensors, with
      keeneye's session settings: the ceiling for (c).
Plus single-image latency (p50, p99): the engine alone on a preloaded image, and end to end
from the encoded file bytes (`Predictor.predict_bytes`: decode + resize + infer).
Targets (issue 5): (c) onnx >= 3x (b) and >= 85% of (d).

With --tune it also sweeps ONNX Runtime's settings (threads, spinning, images per run call) on
preloaded tensors and end to end: the measurements behind the defaults in inference/engines.py.

    python benchmarks/inference.py [--bundle runs/<name>] [--data ../shared/data/casting/casting_data]
                                   [--repeats 5] [--tune] [--out benchmarks/results/inference.json]

Without --bundle it trains one on the casting training images at 224 px (real ImageNet weights
from ../shared/weights) in a temporary folder.
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
WEIGHTS = SHARED / "weights" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
DATA = SHARED / "data" / "casting" / "casting_data"


def train_bundle(data: Path, weights: Path, work: Path) -> Path:
    from rich.console import Console

    from keeneye import api
    from keeneye.config import config_from_dict

    config = config_from_dict(
        {
            "data_folder_path": str(data), "output_dir": str(work / "runs"), "run_name": "casting-224",
            "cache_dir": str(work / "cache"), "model": {"image_size": 224, "weights": str(weights)},
            "training": {"epochs": 50, "seed": 0},
        },
        base_dir=work,
    )
    return api.train(config, console=Console(stderr=True, quiet=True)).run_dir


def percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(values), q))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="A trained bundle at any size (default: train one on casting at 224 px).")
    parser.add_argument("--data", type=Path, default=DATA, help="Folder with test/<class>/ images (and train/ for training).")
    parser.add_argument("--weights", type=Path, default=WEIGHTS)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--slices", type=int, default=5, help="Slices per repeat; cases take turns slice by slice.")
    parser.add_argument("--per-image-per-slice", type=int, default=20, help="Images per slice for (a), Keras predict per image (slow).")
    parser.add_argument("--latency-images", type=int, default=200)
    parser.add_argument("--tune", action="store_true", help="Also sweep ONNX Runtime settings.")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "inference.json")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    import numpy as np
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True)
    if args.bundle is None:
        work = Path(tempfile.mkdtemp(prefix="keeneye-bench-inference-"))
        console.print(f"training a bundle on {args.data} at 224 px in {work} ...")
        started = time.perf_counter()
        bundle_path = train_bundle(args.data, args.weights, work)
        console.print(f"trained in {time.perf_counter() - started:.0f} s: {bundle_path}")
    else:
        bundle_path = args.bundle

    import keras
    import onnxruntime as ort
    import tensorflow as tf

    from keeneye.bundle import load_bundle
    from keeneye.data.decode import load_image
    from keeneye.inference.engines import physical_cores
    from keeneye.inference.predictor import Predictor, expand_inputs

    bundle = load_bundle(bundle_path)
    size = bundle.image_size
    paths, _ = expand_inputs([args.data / "test"])
    n = len(paths)
    console.print(f"{n} test images from {args.data / 'test'}; bundle {bundle.path.name} at {size} px; "
                  f"{physical_cores()} physical cores, {os.cpu_count()} logical; load average {os.getloadavg()[0]:.1f}")

    # --- start-up: a fresh bundle load, the engine, and the first prediction (tracing included) ---
    startup = {}
    for name in ("onnx", "keras"):
        started = time.perf_counter()
        fresh = Predictor(load_bundle(bundle_path), engine=name)
        fresh.predict_paths(paths[:1])
        startup[name] = time.perf_counter() - started
        del fresh

    images = np.stack([load_image(p, size) for p in paths])
    encoded = [Path(p).read_bytes() for p in paths]
    model = bundle.model
    predictors = {name: Predictor(bundle, engine=name) for name in ("onnx", "keras")}
    for name, predictor in predictors.items():
        assert predictor.engine_name == name, predictor.engine_name
    onnx_engine = predictors["onnx"].engine
    bare = onnx_engine  # the very session (c) uses: same settings, no decoding

    # warm-up: tracing, ORT arena allocation, page cache for the files
    model.predict(images[:32], batch_size=32, verbose=0)
    model.predict(images[:1], verbose=0)
    bare(images[:32])
    for predictor in predictors.values():
        predictor.predict_paths(paths[:64])

    def run_a(index):
        subset = index[: args.per_image_per_slice]
        for i in subset:
            model.predict(images[i : i + 1], verbose=0)
        return len(subset)

    def run_b(index):
        model.predict(images[index], batch_size=32, verbose=0)
        return len(index)

    def run_c(name):
        def run(index):
            frame = predictors[name].predict_paths([paths[i] for i in index])
            assert frame["error"].isna().all()
            return len(index)
        return run

    def run_d(index):
        bare(images[index])
        return len(index)

    def run_d1(index):
        for i in index:
            bare.session.run(None, {bare.input_name: images[i : i + 1]})
        return len(index)

    cases = {
        "a_keras_predict_per_image": run_a,
        "b_keras_predict_batched": run_b,
        "c_predict_paths_onnx": run_c("onnx"),
        "c_predict_paths_keras": run_c("keras"),
        "d_bare_onnxruntime_chunked": run_d,
        "d_bare_onnxruntime_per_image": run_d1,
    }
    # Each repeat covers all n images for every case (a: a subset), in slices; the cases take turns
    # slice by slice (rotating order), so a burst of load from other processes hits all of them.
    slices = np.array_split(np.arange(n), args.slices)
    keys = list(cases)
    rates: dict[str, list[float]] = {key: [] for key in cases}
    for repeat in range(args.repeats):
        elapsed = dict.fromkeys(cases, 0.0)
        counts = dict.fromkeys(cases, 0)
        for number, index in enumerate(slices):
            shift = (repeat + number) % len(keys)
            for key in keys[shift:] + keys[:shift]:
                started = time.perf_counter()
                counts[key] += cases[key](index)
                elapsed[key] += time.perf_counter() - started
        for key in cases:
            rates[key].append(counts[key] / elapsed[key])
        console.print(f"repeat {repeat + 1}/{args.repeats}: " + ", ".join(f"{k.split('_', 1)[0]}:{k.split('_')[-1]}={v[-1]:.0f}" for k, v in rates.items())
                      + f" (load {os.getloadavg()[0]:.1f})")

    # --- single-image latency, the four paths taking turns image by image ---
    latency: dict[str, list[float]] = {"onnx_engine": [], "keras_engine": [], "onnx_end_to_end": [], "keras_end_to_end": []}
    keras_engine = predictors["keras"].engine
    for i in range(min(args.latency_images, n)):
        for key, call in (
            ("onnx_engine", lambda: onnx_engine(images[i : i + 1])),
            ("keras_engine", lambda: keras_engine(images[i : i + 1])),
            ("onnx_end_to_end", lambda: predictors["onnx"].predict_bytes(encoded[i])),
            ("keras_end_to_end", lambda: predictors["keras"].predict_bytes(encoded[i])),
        ):
            started = time.perf_counter()
            call()
            latency[key].append((time.perf_counter() - started) * 1000)

    # --- agreement of the two engines on the whole test set ---
    frame_onnx = predictors["onnx"].predict_paths(paths)
    frame_keras = predictors["keras"].predict_paths(paths)
    max_diff = float(np.max(np.abs(frame_onnx["probability"].to_numpy() - frame_keras["probability"].to_numpy())))
    same_labels = float((frame_onnx["label"] == frame_keras["label"]).mean())

    medians = {key: statistics.median(values) for key, values in rates.items()}
    ceiling_key = max(("d_bare_onnxruntime_chunked", "d_bare_onnxruntime_per_image"), key=lambda k: medians[k])
    per_repeat = lambda a, b: [x / y for x, y in zip(rates[a], rates[b])]  # noqa: E731
    ratios = {
        "c_onnx_over_b": medians["c_predict_paths_onnx"] / medians["b_keras_predict_batched"],
        "c_onnx_over_d": medians["c_predict_paths_onnx"] / medians[ceiling_key],
        "c_onnx_over_c_keras": medians["c_predict_paths_onnx"] / medians["c_predict_paths_keras"],
        "d_over_b": medians[ceiling_key] / medians["b_keras_predict_batched"],
        "per_repeat_median": {
            "c_onnx_over_b": statistics.median(per_repeat("c_predict_paths_onnx", "b_keras_predict_batched")),
            "c_onnx_over_d": statistics.median(per_repeat("c_predict_paths_onnx", ceiling_key)),
        },
    }
    results = {
        "bundle": str(bundle.path), "image_size": size, "n_images": n, "repeats": args.repeats, "slices": args.slices,
        "a_images_per_repeat": sum(min(len(i), args.per_image_per_slice) for i in slices),
        "images_per_second": {key: {"median": medians[key], "all": [round(v, 2) for v in values]} for key, values in rates.items()},
        "ceiling": ceiling_key,
        "ratios": ratios,
        "targets": {"c_onnx_over_b_min": 3.0, "c_onnx_over_d_min": 0.85,
                    "met": ratios["c_onnx_over_b"] >= 3.0 and ratios["c_onnx_over_d"] >= 0.85},
        "startup_to_first_prediction_s": startup,
        "latency_ms": {key: {"p50": percentile(v, 50), "p99": percentile(v, 99), "n": len(v)} for key, v in latency.items()},
        "engines_max_abs_diff_on_test_set": max_diff,
        "engines_same_label_share": same_labels,
        "settings": {
            "onnx_threads": onnx_engine.threads, "onnx_images_per_run_call": onnx_engine.chunk,
            "onnx_parallel_single_thread_sessions": onnx_engine.parallel,
            "predictor_batch_size": predictors["onnx"].batch_size, "decode_workers": predictors["onnx"].workers,
            "onnx_model": onnx_engine.source,
        },
        "machine": {"platform": platform.platform(), "logical_cpus": os.cpu_count(), "physical_cores": physical_cores(),
                    "load_average_at_end": os.getloadavg()},
        "versions": {"python": platform.python_version(), "tensorflow": tf.__version__, "keras": keras.__version__,
                     "onnxruntime": ort.__version__, "numpy": np.__version__},
    }
    if args.tune:
        results["tuning"] = tune(bundle, images, paths, onnx_engine, args.repeats, console)

    table = Table(title=f"Inference, {n} casting test images at {size} px: images/s, median of {args.repeats} interleaved repeats")
    for column in ("case", "median", "min", "max", "vs (b)"):
        table.add_column(column, justify="left" if column == "case" else "right")
    for key, values in rates.items():
        table.add_row(key, f"{medians[key]:.1f}", f"{min(values):.1f}", f"{max(values):.1f}",
                      f"{medians[key] / medians['b_keras_predict_batched']:.2f}x")
    console.print(table)
    lat = Table(title="Single-image latency (ms), 4 paths taking turns")
    for column in ("path", "p50", "p99"):
        lat.add_column(column, justify="left" if column == "path" else "right")
    for key, value in results["latency_ms"].items():
        lat.add_row(key, f"{value['p50']:.2f}", f"{value['p99']:.2f}")
    console.print(lat)
    console.print(
        f"(c) onnx / (b) keras batched = {ratios['c_onnx_over_b']:.2f}x (target >= 3; per-repeat median "
        f"{ratios['per_repeat_median']['c_onnx_over_b']:.2f}x); (c) onnx / (d) ceiling = {ratios['c_onnx_over_d']:.1%} "
        f"(target >= 85%; per-repeat median {ratios['per_repeat_median']['c_onnx_over_d']:.1%}); start-up to first "
        f"prediction: onnx {startup['onnx']:.2f} s, keras {startup['keras']:.2f} s; engines: max |p_onnx - p_keras| "
        f"{max_diff:.1e}, same label {same_labels:.1%}; load average {os.getloadavg()[0]:.1f}",
        highlight=False,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    console.print(f"written to {args.out}")


def tune(bundle, images, paths, engine, repeats: int, console) -> dict:
    """ONNX Runtime settings, interleaved: one multi-threaded session (with and without spin-waiting)
    vs chunks run concurrently on single-threaded sessions, at several images per run call; bare
    on preloaded tensors and end to end from files (with 1 or 2 decoding threads)."""
    import onnxruntime as ort

    from keeneye.inference.engines import OnnxEngine, physical_cores, session_options
    from keeneye.inference.predictor import Predictor

    cores = physical_cores()
    if engine.path is not None:
        onnx_path = str(engine.path)
    else:  # converted in memory: write it out for the sessions below
        from keeneye.inference.engines import convert_to_onnx

        onnx_path = str(Path(tempfile.mkdtemp()) / "model.onnx")
        Path(onnx_path).write_bytes(convert_to_onnx(bundle.model, output_name="probability"))

    def spinning(chunk: int) -> OnnxEngine:
        variant = OnnxEngine(onnx_path, chunk=chunk, parallel=1)
        options = session_options(cores)
        options.add_session_config_entry("session.intra_op.allow_spinning", "1")
        variant.session = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
        return variant

    variants = {}
    for chunk in (1, 2, 4, 8, 32):
        variants[f"parallel={cores}x1thread,chunk={chunk}"] = OnnxEngine(onnx_path, chunk=chunk, parallel=cores)
        variants[f"1session,{cores}threads,nospin,chunk={chunk}"] = OnnxEngine(onnx_path, chunk=chunk, parallel=1)
    for chunk in (2, 4, 8):
        variants[f"1session,{cores}threads,spin,chunk={chunk}"] = spinning(chunk)
    variants["1session,1thread,chunk=2"] = OnnxEngine(onnx_path, threads=1, chunk=2, parallel=1)
    basic = OnnxEngine(onnx_path, chunk=4, parallel=1)
    options = session_options(cores)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    basic.session = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
    variants[f"1session,{cores}threads,nospin,chunk=4,optimisation=basic"] = basic

    sample = images[:128]
    bare: dict[str, list[float]] = {key: [] for key in variants}
    for repeat in range(repeats):
        keys = list(variants)
        keys = keys[repeat % len(keys):] + keys[: repeat % len(keys)]
        for key in keys:
            started = time.perf_counter()
            variants[key](sample)
            bare[key].append(len(sample) / (time.perf_counter() - started))

    end_to_end: dict[str, list[float]] = {}
    predictors = {}
    for key in (f"parallel={cores}x1thread,chunk=2", f"parallel={cores}x1thread,chunk=4", f"1session,{cores}threads,nospin,chunk=4"):
        for workers in (1, 2):
            predictor = Predictor(bundle, engine="onnx", workers=workers)
            predictor.engine = variants[key]
            predictors[f"{key},decode_workers={workers}"] = predictor
    subset = paths[:360]
    for repeat in range(repeats):
        for key, predictor in predictors.items():
            started = time.perf_counter()
            predictor.predict_paths(subset)
            end_to_end.setdefault(key, []).append(len(subset) / (time.perf_counter() - started))
    bare_median = {key: statistics.median(values) for key, values in bare.items()}
    e2e = {key: statistics.median(values) for key, values in end_to_end.items()}
    console.print("tuning, bare (img/s): " + ", ".join(f"{k}: {v:.0f}" for k, v in sorted(bare_median.items(), key=lambda kv: -kv[1])), highlight=False)
    console.print("tuning, end to end (img/s): " + ", ".join(f"{k}: {v:.0f}" for k, v in sorted(e2e.items(), key=lambda kv: -kv[1])), highlight=False)
    return {"bare_images_per_second": bare_median, "end_to_end_images_per_second": e2e}


if __name__ == "__main__":
    sys.exit(main())
