"""Benchmark: how far int8 exports of real bundles move their decisions, per bundle, one table.

Why: `keeneye export --quantize int8` refuses an export whose decisions at the bundle's threshold
differ from model.keras's on more than 5% of the bundle's testing images, or whose test F1 drops
by more than 0.03. Whether a feature mode and head survive 8 bits is a property of real images
(the test suite's synthetic bundles only show that the check runs), so this exports real bundles
(e.g. the fold bundles that `benchmarks/magnetic_tile.py` leaves in its work folder) with keeneye's
own export_bundle and records its verification, also where the default limits would refuse it.

    python benchmarks/int8_exports.py --work /tmp/keeneye-bench-magnetic-tile-XXXX [...] [--format onnx|tflite]
    python benchmarks/int8_exports.py --bundle runs/<name> [...]

Each --work folder contributes its runs/fold*/ bundles. The limits are loosened to "anything" so
every export is measured; `passes` says whether the product's default int8 limits would keep it.
Printed per bundle: feature mode, head, views, equal decisions, test F1 (Keras -> int8), largest
probability difference, and with --timing (ONNX) the int8 model's time on 32 images over model.onnx's
(ONNX Runtime, 5 repeats taking turns, medians); written as JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/inference.py's interleaved timing


def bundles_of(works: list[Path], bundles: list[Path]) -> list[Path]:
    """The bundle folders to export: every runs/fold*/ of each --work folder, then each --bundle."""
    found = [run for work in works for run in sorted((work / "runs").glob("fold*")) if (run / "metadata.json").is_file()]
    return found + bundles


def speed_ratio(bundle, exported: Path, repeats: int = 5) -> float:
    """The int8 export's time over that of the bundle's float model.onnx on the same 32 images: ONNX Runtime,
    one batch each per repeat, taking turns (benchmarks/inference.py's `interleaved`), medians."""
    import numpy as np
    import onnxruntime as ort
    from rich.console import Console

    from inference import interleaved
    from keeneye.runtime.convert import generated_images

    images = generated_images(32, bundle.image_size, seed=0)
    images = np.concatenate([images] * bundle.input_spec.views, axis=1)  # views stack under the image
    sessions = {name: ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                for name, path in (("float32", bundle.path / "model.onnx"), ("int8", exported))}
    cases = {name: (lambda index, s=session: len(s.run(None, {"image": images[index]})[0])) for name, session in sessions.items()}
    rates = interleaved(cases, len(images), repeats, 1, Console(quiet=True))
    return float(np.median(rates["float32"]) / np.median(rates["int8"]))


def measure(run: Path, fmt: str, timing: bool = False) -> dict:
    """Export `run` to int8 `fmt` in a scratch folder and return the verification record (and, with `timing`,
    the int8 export's time relative to float32)."""
    from keeneye.bundle import load_bundle
    from keeneye.inference.export import TOLERANCES, Tolerance, export_bundle

    bundle = load_bundle(run)
    anything = Tolerance(max_abs_diff=None, min_agreement=0.0, max_f1_drop=None)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="keeneye-int8-") as scratch:
        result = export_bundle(bundle, fmt, quantize="int8", output=scratch, tolerance=anything)  # never refused
        record = result.verification
        ratio = speed_ratio(bundle, result.path) if timing and fmt == "onnx" else None
    default = TOLERANCES["int8"]
    passes = record["decision_agreement"] >= default.min_agreement and (
        record["f1_change"] is None or record["f1_change"] >= -default.max_f1_drop)
    meta = bundle.metadata
    return {"bundle": str(run), "format": fmt, "features": meta["backbone"].get("features"), "head": meta["head"].get("kind"),
            "views": bundle.input_spec.views, "n_images": record["n_images"], "decision_agreement": record["decision_agreement"],
            "f1_keras": record["f1_keras"], "f1_int8": record["f1_exported"], "f1_change": record["f1_change"],
            "max_abs_diff": record["max_abs_diff"], "passes_default_limits": bool(passes), "time_vs_float32": ratio,
            "seconds": round(time.perf_counter() - started, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, nargs="*", default=[], help="benchmark work folders holding runs/fold*/")
    parser.add_argument("--bundle", type=Path, nargs="*", default=[], help="bundle folders")
    parser.add_argument("--format", default="onnx", choices=("onnx", "tflite"))
    parser.add_argument("--timing", action="store_true", help="onnx: also time the int8 export against model.onnx")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "int8_exports.json")
    args = parser.parse_args()
    runs = bundles_of(args.work, args.bundle)
    if not runs:
        parser.error("no bundle found: pass --work folders with runs/fold*/ or --bundle folders")
    rows = []
    print(f"{'bundle':60} {'features':10} {'head':9} {'views':>5} {'equal':>7} {'F1 keras -> int8':>18} {'max |dp|':>9} passes")
    for run in runs:
        row = measure(run, args.format, args.timing)
        rows.append(row)
        f1 = "" if row["f1_keras"] is None else f"{row['f1_keras']:.3f} -> {row['f1_int8']:.3f}"
        print(f"{str(run)[-60:]:60} {str(row['features']):10} {str(row['head']):9} {str(row['views']):>5} "
              f"{row['decision_agreement']:7.3f} {f1:>18} {row['max_abs_diff']:9.3f} {row['passes_default_limits']}"
              + (f"  time {row['time_vs_float32']:.2f}x float32" if row["time_vs_float32"] else ""), flush=True)
    import keeneye.inference.export as export

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"keeneye_export_module": export.__file__, "format": args.format, "python": sys.version,
                                    "results": rows}, indent=2))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
