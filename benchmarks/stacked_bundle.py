"""head.anomaly_feature bundles: predictor start with the stored ONNX patch graph vs converting it at load, and the export.

    python benchmarks/stacked_bundle.py --bundle runs/<stacked bundle> [--repeats 5] [--images 64]
                                        [--out benchmarks/results/stacked_bundle.json]

From the given bundle (made by `keeneye train` with head.anomaly_feature; one written before the patch graph was
stored is upgraded here with the same function train now calls, `write_anomaly_feature_onnx`) two copies are made in a
temporary folder: "stored" (anomaly_features.onnx, hashed in metadata.json) and "converted" (without it, as bundles
were before). Then:

1. one-image `keeneye predict` commands (fresh processes: imports, bundle, engines, one image) on both copies, taking
   turns, `--repeats` times each: wall seconds (medians) and whether TensorFlow was imported;
2. `keeneye export --format onnx` of the stored copy (its verification record), and the stacked probability recomputed
   from the exported files with plain ONNX Runtime + numpy on `--images` of the bundle's testing images, against the
   bundle's predictor: the largest difference;
3. predict throughput: `Predictor.predict_paths` (engine auto, from the files on disk) over `--throughput-images` testing
   images, on the stored copy and on a "head alone" copy (the same bundle without its anomaly_feature entry and files:
   what `head.anomaly_feature: "auto"` publishes when it drops the stacker), taking turns `--repeats` times; medians.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STARTUP_CHECK = ("import runpy, sys; sys.argv = ['keeneye', *sys.argv[1:]]\n"
                 "try:\n    runpy.run_module('keeneye', run_name='__main__')\n"
                 "except SystemExit:\n    pass\n"
                 "print('tensorflow imported:', 'tensorflow' in sys.modules, file=sys.stderr)")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True, help="A bundle trained with head.anomaly_feature.")
    parser.add_argument("--repeats", type=int, default=5, help="Interleaved one-image predict commands per copy.")
    parser.add_argument("--images", type=int, default=64, help="Testing images for the plain ONNX Runtime recomputation.")
    parser.add_argument("--throughput-images", type=int, default=256, help="Testing images per throughput repeat.")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "stacked_bundle.json")
    return parser.parse_args()


def stored_copy(bundle_path: Path, folder: Path) -> tuple[Path, str]:
    """A copy holding the stored, checked ONNX patch graph (written as `keeneye train` writes it when missing)."""
    import keras
    import pandas as pd

    from keeneye.bundle import BundleWriter, load_bundle
    from keeneye.inference.export import write_anomaly_feature_onnx
    from keeneye.model.anomaly_feature import Stacker
    from keeneye.model.patchcore import PatchBank

    target = folder / "stored"
    shutil.copytree(bundle_path, target)
    bundle = load_bundle(target)
    info = bundle.spec.anomaly_feature
    if info.onnx_file:
        return target, "stored at train time"
    manifest = pd.read_csv(target / "manifest.csv")
    testing = manifest.loc[manifest["split"] == "testing", "path"].tolist()
    line = write_anomaly_feature_onnx(target, bundle.model, keras.saving.load_model(target / info.model_file, compile=False),
                                      PatchBank.load(target / info.bank_file), Stacker(info.coef_logit, info.coef_log_score, info.intercept),
                                      info.score_top_k, info.score_neighbours, testing, spec=bundle.input_spec)
    metadata = json.loads((target / "metadata.json").read_text())
    metadata["anomaly_feature"] |= BundleWriter(target).anomaly_feature_files()
    (target / "metadata.json").write_text(json.dumps(metadata, indent=2))
    return target, line


def converted_copy(stored: Path, folder: Path) -> Path:
    """A copy as bundles were before: no stored ONNX patch graph, no file hashes in metadata."""
    from keeneye.bundle import ANOMALY_FEATURE_ONNX_FILE

    target = folder / "converted"
    shutil.copytree(stored, target)
    for name in (ANOMALY_FEATURE_ONNX_FILE, ANOMALY_FEATURE_ONNX_FILE + ".verification.json"):
        (target / name).unlink(missing_ok=True)
    metadata = json.loads((target / "metadata.json").read_text())
    for key in ("onnx_file", "sha256"):
        metadata["anomaly_feature"].pop(key, None)
    (target / "metadata.json").write_text(json.dumps(metadata, indent=2))
    return target


def head_only_copy(stored: Path, folder: Path) -> Path:
    """The same bundle without the one-class part: the head's own probability, as when "auto" drops the stacker."""
    from keeneye.bundle import ANOMALY_FEATURE_BANK_FILE, ANOMALY_FEATURE_MODEL_FILE, ANOMALY_FEATURE_ONNX_FILE

    target = folder / "head_alone"
    shutil.copytree(stored, target)
    metadata = json.loads((target / "metadata.json").read_text())
    metadata.pop("anomaly_feature")
    for name in (ANOMALY_FEATURE_MODEL_FILE, ANOMALY_FEATURE_BANK_FILE, ANOMALY_FEATURE_ONNX_FILE):
        (target / name).unlink(missing_ok=True)
    (target / "metadata.json").write_text(json.dumps(metadata, indent=2))
    return target


def throughput(copies: dict[str, Path], paths: list[str], repeats: int) -> dict:
    """Images per second of `Predictor.predict_paths` (engine auto) on each copy, taking turns; medians."""
    from keeneye.inference.predictor import Predictor

    predictors = {name: Predictor.from_bundle(path) for name, path in copies.items()}
    for predictor in predictors.values():
        predictor.predict_paths(paths[:32])  # warm-up: sessions, thread pools
    rates: dict[str, list[float]] = {name: [] for name in copies}
    for _ in range(repeats):
        for name, predictor in predictors.items():
            begin = time.perf_counter()
            predictor.predict_paths(paths)
            rates[name].append(len(paths) / (time.perf_counter() - begin))
    medians = {name: statistics.median(values) for name, values in rates.items()}
    return {"images": len(paths), "engine": {name: p.engine_name for name, p in predictors.items()},
            "images_per_second": {name: {"median": round(medians[name], 1), "all": [round(v, 1) for v in values]}
                                  for name, values in rates.items()},
            "stacked_over_head_alone": round(medians["stacked"] / medians["head alone"], 3),
            "load_average_at_end": round(os.getloadavg()[0], 2)}


def command_start(copies: dict[str, Path], image: str, repeats: int) -> dict:
    """Wall seconds of one-image `keeneye predict` commands on each copy, taking turns; medians; TensorFlow imported?"""
    import pandas as pd

    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    seconds: dict[str, list[float]] = {name: [] for name in copies}
    imported, probability = {}, {}
    for _ in range(repeats):
        for name, path in copies.items():
            begin = time.perf_counter()
            run = subprocess.run([sys.executable, "-c", STARTUP_CHECK, "predict", str(path), image, "--engine", "onnx",
                                  "--output", str(path / "one.csv")], capture_output=True, text=True, env=env)
            seconds[name].append(time.perf_counter() - begin)
            imported[name] = "tensorflow imported: True" in run.stderr
            if run.returncode != 0 or not (path / "one.csv").is_file():
                raise SystemExit(f"predict on {name} failed:\n{run.stdout}\n{run.stderr}")
            probability[name] = float(pd.read_csv(path / "one.csv")["probability"].iloc[0])
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    return {"seconds": {name: {"median": round(medians[name], 2), "all": [round(v, 2) for v in values]}
                        for name, values in seconds.items()},
            "stored_over_converted": round(medians["stored"] / medians["converted"], 3), "tensorflow_imported": imported,
            "probability_of_the_image": probability, "load_average_at_end": round(os.getloadavg()[0], 2)}


def recompute(export_path: Path, paths: list[str]) -> "object":
    """The stacked probability from the exported files with plain ONNX Runtime + numpy (the README's recipe)."""
    import numpy as np
    import onnxruntime

    from keeneye.data.decode import load_image, resize_square
    from keeneye.inference.export import stacked_sidecar

    record = json.loads(stacked_sidecar(export_path).read_text())
    images = np.stack([resize_square(load_image(p), record["input"]["image_size"]) for p in paths])
    classifier = onnxruntime.InferenceSession(str(export_path))
    patch_graph = onnxruntime.InferenceSession(str(export_path.parent / record["patch_model"]))
    bank = np.load(export_path.parent / record["bank_file"]).astype(np.float64)
    out = []
    for start in range(0, len(images), 8):
        batch = images[start : start + 8]
        p = np.clip(classifier.run(None, {"image": batch})[0].reshape(-1).astype(np.float64), *record["clipping"]["probability"])
        flat = patch_graph.run(None, {"image": batch})[0].reshape(len(batch), -1, bank.shape[1]).astype(np.float64)
        squared = (flat**2).sum(-1)[:, :, None] - 2 * flat @ bank.T + (bank**2).sum(-1)[None, None]
        nearest = np.sqrt(np.maximum(squared.min(-1), 0.0))
        s = np.maximum(np.sort(nearest, axis=1)[:, -record["score_top_k"]:].mean(axis=1), record["clipping"]["raw_score_min"])
        z = record["coef_logit"] * np.log(p / (1 - p)) + record["coef_log_score"] * np.log(s) + record["intercept"]
        out.append(1 / (1 + np.exp(-z)))
    return np.concatenate(out)


def export_check(stored: Path, n_images: int) -> dict:
    import numpy as np
    import pandas as pd

    from keeneye.inference.export import export_bundle
    from keeneye.inference.predictor import Predictor

    begin = time.perf_counter()
    result = export_bundle(stored, "onnx")
    seconds = time.perf_counter() - begin
    paths = pd.read_csv(stored / "predictions.csv")["path"].head(n_images).tolist()
    expected = Predictor.from_bundle(stored).predict_paths(paths)["probability"].to_numpy()
    difference = float(np.max(np.abs(recompute(result.path, paths) - expected)))
    keys = ("n_images", "max_abs_diff", "decision_agreement", "f1_keras", "f1_exported", "passed")
    return {"export_s": round(seconds, 1), "verification": {k: result.verification[k] for k in keys},
            "files": [result.path.name, *result.notes], "plain_onnxruntime_numpy_vs_predictor_max_abs_diff": difference,
            "plain_recomputation_images": len(paths)}


def main() -> None:
    args = parse_args()
    folder = Path(tempfile.mkdtemp(prefix="keeneye-bench-stacked-"))
    stored, how = stored_copy(args.bundle.resolve(), folder)
    converted = converted_copy(stored, folder)
    import pandas as pd

    image = str(pd.read_csv(stored / "predictions.csv")["path"].iloc[0])
    results = {"bundle": str(args.bundle), "stored_onnx": how,
               "predict_command": command_start({"stored": stored, "converted": converted}, image, args.repeats),
               "export": export_check(stored, args.images)}
    testing = pd.read_csv(stored / "predictions.csv")["path"].head(args.throughput_images).tolist()
    results["throughput"] = throughput({"stacked": stored, "head alone": head_only_copy(stored, folder)}, testing, args.repeats)
    print(json.dumps(results, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
