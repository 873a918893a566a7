"""Benchmark: every engine's bare forward pass and keeneye's prediction path end to end, side by side.

All measured in one process, each case repeated and interleaved round-robin slice by slice (the
CPU is shared, so timings are noisy; medians of the interleaved repeats are what is compared):

  bare_<engine>      the engine alone on preloaded, prepared tensors (batch 32): keras (one traced
                     tf.function), onnx (ONNX Runtime), openvino (OpenVINO), from the bundle's model.onnx;
  keras_predict      Keras `model.predict` batched (batch 32), the plain-Keras reference;
  predict_<engine>   `Predictor.predict_paths` end to end from the files on disk (read, decode, resize,
                     infer, labels), for 'auto' (what `keeneye predict` runs) and each ONNX engine;
  predict_auto_w<k>  the same with k decode threads (the default, runtime.batches.decode_workers, is
                     one more than the physical cores).
Plus the whole one-image `keeneye predict` command in a fresh process, 'auto' vs '--engine keras'
(--startup-only measures only that), single-image latency (p50, p99) per engine and end to end from encoded bytes, the largest
probability difference of every engine from Keras on the whole test split, and the effect of the
reduced-size JPEG decode on probabilities (casting images are 300 px, below 2x 224 px, where it
never applies: they are upscaled to 2x and re-encoded for that measurement).
Target (issue 10): predict_auto >= 85% of the fastest bare engine.

With --tune it also sweeps ONNX Runtime's settings (threads, spinning, images per run call).

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
BARE_ENGINES = ("keras", "onnx", "openvino")


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


def interleaved(cases: dict, n: int, repeats: int, slices: int, console) -> dict[str, list[float]]:
    """Images per second of each case, one value per repeat; the cases take turns slice by slice
    (rotating order), so a burst of load from other processes hits all of them alike."""
    import numpy as np

    parts = np.array_split(np.arange(n), slices)
    keys = list(cases)
    rates: dict[str, list[float]] = {key: [] for key in cases}
    for repeat in range(repeats):
        elapsed = dict.fromkeys(cases, 0.0)
        counts = dict.fromkeys(cases, 0)
        for number, index in enumerate(parts):
            shift = (repeat + number) % len(keys)
            for key in keys[shift:] + keys[:shift]:
                started = time.perf_counter()
                counts[key] += cases[key](index)
                elapsed[key] += time.perf_counter() - started
        for key in cases:
            rates[key].append(counts[key] / elapsed[key])
        console.print(f"repeat {repeat + 1}/{repeats}: " + ", ".join(f"{k}={v[-1]:.0f}" for k, v in rates.items())
                      + f" (load {os.getloadavg()[0]:.1f})", highlight=False)
    return rates


def make_cases(bundle, paths: list[str], images, engines: dict, predictors: dict) -> dict:
    """The measured cases: each takes the positions of a slice of the test images, returns how many it did."""
    model = bundle.model

    def bare(engine):
        def run(index):  # a slice is a contiguous range: views, no copies
            for start in range(index[0], index[-1] + 1, 32):
                engine(images[start : min(start + 32, index[-1] + 1)])
            return len(index)
        return run

    def predict(predictor):
        def run(index):
            frame = predictor.predict_paths([paths[i] for i in index])
            assert frame["error"].isna().all()
            return len(index)
        return run

    cases = {f"bare_{name}": bare(engine) for name, engine in engines.items()}
    cases["keras_predict"] = lambda index: (model.predict(images[index], batch_size=32, verbose=0), len(index))[1]
    cases |= {f"predict_{name}": predict(predictor) for name, predictor in predictors.items()}
    return cases


def latencies(engines: dict, auto, images, encoded: list[bytes], count: int) -> dict:
    """Single-image latency (ms) of each bare engine and of predict_bytes (decode + resize + infer) on 'auto'."""
    calls = {f"{name}_engine": (lambda engine: lambda i: engine(images[i : i + 1]))(engine) for name, engine in engines.items()}
    calls["auto_end_to_end"] = lambda i: auto.predict_bytes(encoded[i])
    found: dict[str, list[float]] = {key: [] for key in calls}
    for i in range(min(count, len(images))):
        for key, call in calls.items():
            started = time.perf_counter()
            call(i)
            found[key].append((time.perf_counter() - started) * 1000)
    return {key: {"p50": percentile(v, 50), "p99": percentile(v, 99), "n": len(v)} for key, v in found.items()}


def agreement(engines: dict, images) -> dict:
    """Largest |p_engine - p_keras| over the whole test split, and the share of equal labels at 0.5."""
    import numpy as np

    outputs = {name: np.concatenate([engine(images[i : i + 32]) for i in range(0, len(images), 32)]).reshape(-1)
               for name, engine in engines.items()}
    reference = outputs["keras"]
    return {name: {"max_abs_diff": float(np.max(np.abs(p - reference))), "same_label_at_0.5": float(np.mean((p >= 0.5) == (reference >= 0.5)))}
            for name, p in outputs.items() if name != "keras"}


def reduced_decode_effect(bundle, paths: list[str], engine, count: int, work: Path) -> dict:
    """Probabilities with and without libjpeg's reduced-size decode, on casting images upscaled to 2x and re-encoded.

    With the reduced decode a 600 px JPEG is decoded at 300 px (DCT scaling) and resized to 224; without,
    decoded at 600 px and resized. Same files, same engine: the difference is the decode alone.
    """
    import cv2
    import numpy as np

    from keeneye.data.decode import load_image, resize_square

    size = bundle.image_size
    files = []
    for index, path in enumerate(paths[:count]):
        image = load_image(path)
        large = cv2.resize(image, (2 * image.shape[1], 2 * image.shape[0]), interpolation=cv2.INTER_CUBIC)
        target = work / f"{index}.jpg"
        cv2.imwrite(str(target), cv2.cvtColor(large, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
        files.append(target)
    timings = {"reduced": 0.0, "full": 0.0}
    batches = {"reduced": [], "full": []}
    for target in files:
        for key, load in (("reduced", lambda f: bundle.input_spec.load(f)), ("full", lambda f: resize_square(load_image(f), size))):
            started = time.perf_counter()
            batches[key].append(load(target))
            timings[key] += time.perf_counter() - started
    p = {key: np.concatenate([engine(np.stack(v[i : i + 32])) for i in range(0, len(v), 32)]).reshape(-1) for key, v in batches.items()}
    difference = np.abs(p["reduced"] - p["full"])
    return {"n_images": len(files), "source": f"casting test images upscaled 2x ({2 * 300} px), JPEG q95",
            "max_abs_diff": float(difference.max()), "mean_abs_diff": float(difference.mean()),
            "p99_abs_diff": percentile(list(difference), 99), "labels_changed_at_0.5": int(np.sum((p["reduced"] >= 0.5) != (p["full"] >= 0.5))),
            "decode_ms_per_image": {key: 1000 * value / len(files) for key, value in timings.items()}}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="A trained bundle at any size (default: train one on casting at 224 px).")
    parser.add_argument("--data", type=Path, default=DATA, help="Folder with test/<class>/ images (and train/ for training).")
    parser.add_argument("--weights", type=Path, default=WEIGHTS)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--slices", type=int, default=5, help="Slices per repeat; cases take turns slice by slice.")
    parser.add_argument("--latency-images", type=int, default=100)
    parser.add_argument("--reduced-decode-images", type=int, default=200)
    parser.add_argument("--tune", action="store_true", help="Also sweep ONNX Runtime settings.")
    parser.add_argument("--startup-repeats", type=int, default=3, help="Interleaved runs of each one-image predict command.")
    parser.add_argument("--startup-only", action="store_true", help="Only the one-image `keeneye predict` commands (needs --bundle).")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "inference.json")
    return parser.parse_args()


def setup(args, console):
    """(bundle, test paths, prepared images, encoded files, bare engines, predictors), warmed up."""
    import numpy as np

    from keeneye.bundle import load_bundle
    from keeneye.inference.predictor import Predictor, expand_inputs
    from keeneye.runtime.batches import decode_workers
    from keeneye.runtime.choice import bundle_onnx_engine
    from keeneye.runtime.engines import KerasEngine, physical_cores

    bundle_path = args.bundle
    if bundle_path is None:
        work = Path(tempfile.mkdtemp(prefix="keeneye-bench-inference-"))
        console.print(f"training a bundle on {args.data} at 224 px in {work} ...")
        bundle_path = train_bundle(args.data, args.weights, work)
    bundle = load_bundle(bundle_path)
    paths, _ = expand_inputs([args.data / "test"])
    console.print(f"{len(paths)} test images from {args.data / 'test'}; bundle {bundle.path.name} at {bundle.image_size} px; "
                  f"{physical_cores()} physical cores, {os.cpu_count()} logical; load average {os.getloadavg()[0]:.1f}")
    images = np.stack([bundle.input_spec.load(p) for p in paths])
    encoded = [Path(p).read_bytes() for p in paths]
    engines = {"keras": KerasEngine(bundle.model), **{kind: bundle_onnx_engine(bundle, kind=kind) for kind in ("onnx", "openvino")}}
    cores, default = physical_cores(), decode_workers()
    predictors = {"auto": Predictor(bundle, engine="auto"), "onnx": Predictor(bundle, engine="onnx"),
                  **{f"auto_w{w}": Predictor(bundle, engine="auto", workers=w) for w in sorted({1, cores, cores + 1} - {default})}}
    for engine in engines.values():  # warm-up: tracing, arenas, compiled kernels, page cache for the files
        engine(images[:32])
    bundle.model.predict(images[:32], batch_size=32, verbose=0)
    for predictor in predictors.values():
        predictor.predict_paths(paths[:64])
    return bundle, paths, images, encoded, engines, predictors


def measure(args, console) -> tuple[dict, tuple]:
    import keras
    import numpy as np
    import onnxruntime as ort
    import openvino as ov
    import tensorflow as tf

    from keeneye.runtime.engines import physical_cores

    bundle, paths, images, encoded, engines, predictors = setup(args, console)
    auto = predictors["auto"]
    console.print(f"'auto' runs on {auto.engine_name} ({auto.engine.source}), {auto.workers} decode threads", highlight=False)
    rates = interleaved(make_cases(bundle, paths, images, engines, predictors), len(paths), args.repeats, args.slices, console)
    medians = {key: statistics.median(values) for key, values in rates.items()}
    fastest = max((f"bare_{name}" for name in engines), key=lambda k: medians[k])
    per_repeat = [a / b for a, b in zip(rates["predict_auto"], rates[fastest])]
    ratios = {"predict_auto_over_fastest_bare": medians["predict_auto"] / medians[fastest],
              "predict_auto_over_fastest_bare_per_repeat_median": statistics.median(per_repeat),
              "predict_auto_over_keras_predict": medians["predict_auto"] / medians["keras_predict"],
              **{f"bare_{name}_over_bare_onnx": medians[f"bare_{name}"] / medians["bare_onnx"] for name in engines}}
    with tempfile.TemporaryDirectory(prefix="keeneye-bench-reduced-") as work:
        reduced = reduced_decode_effect(bundle, paths, engines["openvino"], args.reduced_decode_images, Path(work))
    return {
        "bundle": str(bundle.path), "image_size": bundle.image_size, "n_images": len(paths), "repeats": args.repeats,
        "auto_engine": auto.engine_name, "decode_workers_default": auto.workers,
        "images_per_second": {key: {"median": medians[key], "all": [round(v, 2) for v in values]} for key, values in rates.items()},
        "fastest_bare": fastest, "ratios": ratios,
        "target": {"predict_auto_over_fastest_bare_min": 0.85, "met": ratios["predict_auto_over_fastest_bare"] >= 0.85},
        "latency_ms": latencies(engines, auto, images, encoded, args.latency_images),
        "agreement_with_keras_on_test_split": agreement(engines, images),
        "reduced_jpeg_decode": reduced,
        "machine": {"platform": platform.platform(), "logical_cpus": os.cpu_count(), "physical_cores": physical_cores(),
                    "load_average_at_end": os.getloadavg()},
        "versions": {"python": platform.python_version(), "tensorflow": tf.__version__, "keras": keras.__version__,
                     "onnxruntime": ort.__version__, "openvino": ov.__version__, "numpy": np.__version__},
    }, (bundle, images, paths, engines)


STARTUP_CHECK = ("import runpy, sys; sys.argv = ['keeneye', *sys.argv[1:]]\n"
                 "try:\n    runpy.run_module('keeneye', run_name='__main__')\n"
                 "except SystemExit:\n    pass\n"
                 "print('tensorflow imported:', 'tensorflow' in sys.modules, file=sys.stderr)")


def command_start(bundle: Path, image: str, repeats: int) -> dict:
    """Seconds of a whole one-image `keeneye predict` command (a fresh process: imports, bundle, engine, one image),
    'auto' (ONNX Runtime on the verified model.onnx, no TensorFlow) vs '--engine keras' (TensorFlow and
    model.keras, what every predict command paid before), taking turns; medians, and whether TF was imported."""
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    seconds: dict[str, list[float]] = {"auto": [], "keras": []}
    imported: dict[str, bool] = {}
    for _ in range(repeats):
        for engine in seconds:
            begin = time.perf_counter()
            run = subprocess.run([sys.executable, "-c", STARTUP_CHECK, "predict", str(bundle), image, "--engine", engine],
                                 capture_output=True, text=True, env=env)
            seconds[engine].append(time.perf_counter() - begin)
            imported[engine] = "tensorflow imported: True" in run.stderr
    medians = {engine: statistics.median(values) for engine, values in seconds.items()}
    return {"seconds": {engine: {"median": round(medians[engine], 2), "all": [round(v, 2) for v in values]}
                        for engine, values in seconds.items()},
            "auto_over_keras": round(medians["auto"] / medians["keras"], 3), "tensorflow_imported": imported,
            "load_average_at_end": os.getloadavg()[0]}


def show(results: dict, console) -> None:
    from rich.table import Table

    rates = results["images_per_second"]
    fastest = rates[results["fastest_bare"]]["median"]
    table = Table(title=f"Inference, {results['n_images']} casting test images at {results['image_size']} px: images/s, "
                        f"median of {results['repeats']} interleaved repeats")
    for column in ("case", "median", "min", "max", "vs fastest bare"):
        table.add_column(column, justify="left" if column == "case" else "right")
    for key, value in rates.items():
        table.add_row(key, f"{value['median']:.1f}", f"{min(value['all']):.1f}", f"{max(value['all']):.1f}", f"{value['median'] / fastest:.0%}")
    console.print(table)
    console.print("latency ms (p50/p99): " + ", ".join(f"{k} {v['p50']:.1f}/{v['p99']:.1f}" for k, v in results["latency_ms"].items()),
                  highlight=False)
    ratio = results["ratios"]["predict_auto_over_fastest_bare"]
    console.print(f"predict auto ({results['auto_engine']}) / fastest bare ({results['fastest_bare']}) = {ratio:.1%} (target >= 85%); "
                  f"agreement with Keras: {results['agreement_with_keras_on_test_split']}; reduced decode: "
                  f"{results['reduced_jpeg_decode']}; load average {os.getloadavg()[0]:.1f}", highlight=False)


def main() -> None:
    args = parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from rich.console import Console

    console = Console(stderr=True)
    if args.startup_only:
        image = sorted((args.data / "test").rglob("*.jpeg"))[0]
        startup = command_start(args.bundle, str(image), args.startup_repeats)
        console.print(f"one-image predict command: {startup}", highlight=False)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"predict_command_start": startup}, indent=2))
        return
    results, (bundle, images, paths, engines) = measure(args, console)
    results["predict_command_start"] = command_start(bundle.path, paths[0], args.startup_repeats)
    if args.tune:
        results["tuning"] = tune(bundle, images, paths, engines["onnx"], args.repeats, console)
    show(results, console)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    console.print(f"written to {args.out}")

def tune(bundle, images, paths, engine, repeats: int, console) -> dict:
    """ONNX Runtime settings, interleaved: one multi-threaded session (with and without spin-waiting)
    vs chunks run concurrently on single-threaded sessions, at several images per run call; bare
    on preloaded tensors and end to end from files (with 1 or 2 decoding threads)."""
    import onnxruntime as ort

    from keeneye.runtime.engines import OnnxEngine, physical_cores, session_options
    from keeneye.inference.predictor import Predictor

    cores = physical_cores()
    if engine.path is not None:
        onnx_path = str(engine.path)
    else:  # converted in memory: write it out for the sessions below
        from keeneye.runtime.convert import convert_to_onnx

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
