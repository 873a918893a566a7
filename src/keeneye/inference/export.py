"""Deployment exports of a model bundle (ONNX, TFLite, SavedModel), each verified on export.

    from keeneye.inference.export import export_bundle, load_exported
    result = export_bundle("runs/casting", "tflite", quantize="int8")   # -> runs/casting/exports/model_int8.tflite
    run = load_exported(result.path)                                     # uint8 (N, S, S, 3) -> probabilities (N,)

Every export is the same model as `model.keras`, and that is checked, not assumed: the exported
file and the Keras model run on held-out images (the bundle's testing rows from manifest.csv
that still exist on disk, else generated images) and `<file>.verification.json` records the
largest probability difference, the share of equal decisions at the bundle's threshold and,
for quantized exports, the change in test F1. An export outside `TOLERANCES` is not moved into
place and raises `ExportVerificationError` (exit code 3 from the CLI).

Formats (all take RGB uint8 N x S x S x 3, NHWC, and return the positive-class probability N x 1;
the MobileNetV2 preprocessing is inside the model):

* `onnx`: tf2onnx, opset 17; `float16` keeps uint8 in / float32 out (ORT's float16 converter);
  `int8` is ONNX Runtime static QDQ quantization (per-channel weights) calibrated on training images.
* `tflite`: the TFLite converter from a SavedModel; `float16` weights, or `int8` calibrated on a
  representative sample of the bundle's training images (float fallback for unsupported ops).
* `savedmodel`: a TF SavedModel with a `serving_default` signature, for TF Serving.

A one-class (anomaly) bundle exports its patch feature graph (uint8 images -> patch features N x H x W x D)
in any of these formats, with `memory_bank.npy` and `<file>.anomaly.json` (raw threshold, score rule,
normalisation, the bank's sha256) beside it; the check compares the normalised anomaly scores that the
exported graph and model.keras give with that bank, and `load_exported` returns those scores.

A head.anomaly_feature bundle exports as float32 ONNX only: the classifier graph, with the patch graph
(``<stem>.anomaly_features.onnx``, the bundle's stored and verified ``anomaly_features.onnx``), its bank and
``<file>.anomaly_feature.json`` (the stacker's numbers, score rule, clipping, input and threshold) beside it; the
check compares the stacked probabilities of the exported graphs and of the Keras ones, and `load_exported` returns them.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import re
import shutil
import tempfile
import time
import uuid
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from keeneye.bundle import ANOMALY_FEATURE_MODEL_FILE, ANOMALY_FEATURE_ONNX_FILE, MODEL_FILE, Bundle, load_bundle
from keeneye.data.preprocess import InputSpec
from keeneye.data.files import sha256_of_file, write_atomic
from keeneye.errors import KeeneyeError
from keeneye.evaluation.metrics import predict_labels
from keeneye.runtime.batches import as_spec, iter_decoded
from keeneye.inference.anomaly import has_anomaly_feature, stored_patch_onnx
from keeneye.model.anomaly_feature import CLIPPING, COMBINATION, Stacker, StackedEngine
from keeneye.runtime.convert import (
    ONNX_FILE, ONNX_INPUT_NAME, ONNX_OPSET, PROBABILITY_TOLERANCE, convert_and_verify, convert_classifier_to_onnx, convert_to_onnx,
    dedupe_opsets, generated_images, is_verified, onnx_verification_record, verification_path,
)
from keeneye.runtime.engines import BaseEngine, Engine, KerasEngine, OnnxEngine, SavedModelEngine, TFLiteEngine, physical_cores
from keeneye.model.patchcore import BANK_FILE, NORMALISATION, PATCH_OUTPUT_NAME, AnomalyEngine, BankMismatch, PatchBank

FORMATS = ("onnx", "tflite", "savedmodel")
QUANTIZATIONS = ("float16", "int8")
SUPPORTED_QUANTIZATION = {"onnx": (None, "float16", "int8"), "tflite": (None, "float16", "int8"), "savedmodel": (None,)}
SUFFIX = {"onnx": ".onnx", "tflite": ".tflite", "savedmodel": ""}
EXPORTS_FOLDER = "exports"


@dataclass(frozen=True)
class Tolerance:
    """How far an export may be from model.keras on the held-out images (None: not checked)."""

    max_abs_diff: float | None
    min_agreement: float
    max_f1_drop: float | None = None

    def to_dict(self) -> dict:
        return {"max_abs_diff": self.max_abs_diff, "min_decision_agreement": self.min_agreement, "max_f1_drop": self.max_f1_drop}


TOLERANCES = {
    None: Tolerance(PROBABILITY_TOLERANCE, 0.99),  # float32: the same computation up to rounding
    # float16 rounding through ~50 layers moves probabilities by up to ~0.08 (measured on casting,
    # ONNX; 0.02 TFLite) without changing decisions; int8 moves them more (some by 0.4) and flips
    # decisions close to the threshold (2-3% on casting): gated on decisions and test F1.
    "float16": Tolerance(0.15, 0.98, 0.01),
    "int8": Tolerance(None, 0.95, 0.03),
}


def tolerance_for(quantize: str | None, max_diff: float | None = None, min_agreement: float | None = None,
                  max_f1_drop: float | None = None) -> Tolerance:
    """The default tolerance for a quantization, with any of its limits replaced."""
    default = TOLERANCES[quantize if quantize in TOLERANCES else None]
    return Tolerance(
        default.max_abs_diff if max_diff is None else max_diff,
        default.min_agreement if min_agreement is None else min_agreement,
        default.max_f1_drop if max_f1_drop is None else max_f1_drop,
    )


#: ONNX Runtime's calibrator keeps every activation of every calibration image in memory
#: (~12 MB per image at 224 px), so ONNX int8 calibration uses at most this many pixels' worth.
ONNX_CALIBRATION_PIXELS = 100 * 224 * 224


def onnx_int8_cpu_note(cpuinfo: str | None = None, machine: str | None = None) -> str | None:
    """Why an int8 ONNX export may fail its check on this CPU, or None when there is no known reason.

    ONNX Runtime's fused int8 kernels (U8S8) can saturate on x86 CPUs without VNNI (no `avx512_vnni` or
    `avx_vnni` flag): measured 2026-12-02 on an AVX2 CPU with ONNX Runtime 1.32, the same int8 graph agreed
    with Keras on 24 of 24 decisions with graph optimisations off and on 19 of 24 with them on. A user whose
    export is refused there should learn that from the error, not from a search. `cpuinfo` and `machine`
    default to this machine's /proc/cpuinfo and `platform.machine()` (tests pass their own).
    """
    machine = machine if machine is not None else platform.machine()
    if machine not in ("x86_64", "AMD64", "i686"):
        return None
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None  # not Linux: no way to tell
    flags = set(re.findall(r"[a-z0-9_]+", " ".join(line for line in cpuinfo.splitlines() if line.startswith("flags"))))
    if flags & {"avx512_vnni", "avx_vnni"}:
        return None
    return ("this x86 CPU has no VNNI (no avx512_vnni or avx_vnni in /proc/cpuinfo), where ONNX Runtime's fused int8 "
            "kernels are known to saturate; use --format tflite --quantize int8, or --quantize float16, or export "
            "int8 ONNX on a CPU with VNNI")


class ExportError(KeeneyeError):
    """An export cannot be made as asked (format, output folder, missing converter)."""

    exit_code = 2


class ExportVerificationError(ExportError):
    """The exported model does not agree with model.keras within tolerance; nothing was put in place."""

    exit_code = 3


@dataclass
class ImageSet:
    images: np.ndarray  # (N, S, S, 3) uint8
    labels: np.ndarray | None  # (N,) 0/1, None for generated images
    description: str


@dataclass
class ExportResult:
    path: Path
    format: str
    quantize: str | None
    verification: dict
    verification_path: Path
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.verification.get("passed"))


# --- images for verification and calibration ------------------------------------------------------


def _decode(paths: list[str], spec: InputSpec | int) -> tuple[list[int], np.ndarray]:
    """Images prepared as the bundle's model takes them (resize rule, tiles: see data/preprocess.py)."""
    spec = as_spec(spec)
    keys, images = [], []
    for key, image, _ in iter_decoded(enumerate(paths), spec, workers=physical_cores(), prefetch=16):
        if image is not None:
            keys.append(key)
            images.append(image)
    return keys, (np.stack(images) if images else spec.empty_batch())


def _manifest_rows(bundle: Bundle, split: str) -> tuple[pd.DataFrame, int]:
    """Rows of the bundle's manifest.csv in `split` that were used and still exist: (rows, rows listed)."""
    path = bundle.path / "manifest.csv"
    if not path.is_file():
        return pd.DataFrame(columns=["path", "label"]), 0
    manifest = pd.read_csv(path)
    rows = manifest[manifest["split"] == split]
    if "used" in rows:
        rows = rows[rows["used"].astype(str).str.lower().isin(["true", "1"])]
    listed = len(rows)
    return rows[rows["path"].map(lambda p: isinstance(p, str) and os.path.isfile(p))], listed


def _sample(rows: pd.DataFrame, count: int, seed: int) -> pd.DataFrame:
    if len(rows) <= count:
        return rows
    # stratified by label, so a rare positive class is still represented
    parts = [group.sample(max(1, round(count * len(group) / len(rows))), random_state=seed) for _, group in rows.groupby("label")]
    return pd.concat(parts).sort_index()


def held_out_images(bundle: Bundle, max_images: int = 256, seed: int = 0) -> ImageSet:
    """The bundle's testing images (a stratified sample of at most `max_images`), else generated ones."""
    rows, listed = _manifest_rows(bundle, "testing")
    rows = _sample(rows, max_images, seed)
    keys, images = _decode(rows["path"].tolist(), bundle.input_spec)
    if len(images):
        labels = (rows["label"].iloc[keys] == bundle.positive_class).to_numpy().astype(int)
        return ImageSet(images, labels, f"{len(images)} testing images of the bundle's manifest ({listed} listed)")
    count = min(max_images, 32)
    return ImageSet(generated_images(count, bundle.input_spec.shape, seed), None,
                    f"{count} generated images (the bundle's testing images are not on disk)")


def representative_images(bundle: Bundle, count: int = 200, seed: int = 0) -> ImageSet:
    """A stratified sample of the bundle's training images for int8 calibration, else generated ones."""
    rows, listed = _manifest_rows(bundle, "training")
    rows = _sample(rows, count, seed)
    keys, images = _decode(rows["path"].tolist(), bundle.input_spec)
    if len(images):
        return ImageSet(images, None, f"{len(images)} training images of the bundle's manifest ({listed} listed)")
    warnings.warn("no training images of the bundle on disk: int8 calibration uses generated images.", stacklevel=2)
    n = min(count, 64)
    return ImageSet(generated_images(n, bundle.input_spec.shape, seed + 1), None, f"{n} generated images (training images not on disk)")


# --- loading exported models ---------------------------------------------------------------------


class Probabilities(BaseEngine):
    """An engine whose output is one probability per image, flattened to (N,) (what export checks compare)."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.name, self.source = engine, engine.name, engine.source
        self._input_shape = engine.input_shape

    def run(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self.engine.run(batch), dtype=np.float32).reshape(-1)


def _exported_engine(path: Path) -> Engine:
    """The engine that runs an exported file (.onnx, .tflite) or SavedModel folder, by what it is."""
    if path.is_dir() and (path / "saved_model.pb").is_file():
        return SavedModelEngine(path)
    if path.is_file():
        with open(path, "rb") as handle:
            head = handle.read(8)
        if path.suffix.lower() == ".tflite" or head[4:8] == b"TFL3":
            return TFLiteEngine(path)
        return OnnxEngine(path)
    raise ExportError(f"{path} is not an exported model (a .onnx or .tflite file, or a SavedModel folder).")


def load_exported(path: str | os.PathLike) -> Probabilities:
    """Load an exported model (.onnx file, .tflite file or SavedModel folder) as uint8 batch -> probabilities (N,).

    An exported one-class feature graph (``<file>.anomaly.json`` and the memory bank beside it) gives the
    bundle's normalised anomaly scores, read like probabilities (threshold 0.5); an exported head.anomaly_feature
    classifier (``<file>.anomaly_feature.json``, the patch graph and the bank beside it) the stacked probability.
    """
    path = Path(path)
    engine = _exported_engine(path)
    if anomaly_sidecar(path).is_file():
        return Probabilities(exported_anomaly_engine(engine, anomaly_sidecar(path)))
    if stacked_sidecar(path).is_file():
        return Probabilities(exported_stacked_engine(engine, stacked_sidecar(path)))
    return Probabilities(engine)


# --- one-class (anomaly) bundles: the feature graph, with the bank beside it ----------------------------


#: Beside an exported one-class feature graph ``<file>``: ``<file>.anomaly.json`` (how its patch features become
#: scores) and the memory bank ``memory_bank.npy``, shared by every export of the bundle in that folder.
ANOMALY_SUFFIX = ".anomaly.json"


def anomaly_sidecar(path: str | os.PathLike) -> Path:
    """Where an export's one-class scoring record lies: ``<file>.anomaly.json`` beside it."""
    path = Path(path)
    return path.with_name(path.name + ANOMALY_SUFFIX)


def _is_anomaly(bundle: Bundle) -> bool:
    return bundle.metadata.get("mode") == "anomaly"


def _anomaly_record(bundle: Bundle, target: Path, bank_sha256: str | None = None) -> dict:
    """What a deployment needs besides the feature graph: the bank file, the raw threshold, the score rule."""
    info = bundle.metadata["anomaly"]
    return {
        "kind": "keeneye one-class feature graph: uint8 images (N, S, S, 3) -> patch features (N, H, W, D)",
        "model": target.name, "bank_file": BANK_FILE, "bank_sha256": bank_sha256,
        "bank_size": info.get("bank_size"), "raw_threshold": info["raw_threshold"], "normalisation": NORMALISATION,
        "threshold": 0.5, "image_score": info.get("image_score"), "score_top_k": info.get("score_top_k", 1),
        "score_neighbours": info.get("score_neighbours", 1), "map_sigma": info.get("map_sigma", 4.0),
        "distance": "Euclidean (L2) distance of each patch to its nearest bank row",
        "class_names": list(bundle.class_names), "positive_class": bundle.positive_class,
        "image_size": bundle.image_size, "bundle": str(bundle.path),
    }


def _anomaly_scorer(bundle: Bundle) -> Callable[[Engine], AnomalyEngine]:
    """Feature engine -> the bundle's scores on it (its bank, raw threshold and score rule)."""
    record = _anomaly_record(bundle, bundle.path / MODEL_FILE)
    bank = PatchBank.load(bundle.path / BANK_FILE)
    return lambda engine: _scoring(engine, bank, record)


def _scoring(engine: Engine, bank: PatchBank, record: dict) -> AnomalyEngine:
    return AnomalyEngine(engine, bank, record["raw_threshold"], record["map_sigma"], neighbours=record["score_neighbours"],
                         top_k=record["score_top_k"])


def _checked_bank(sidecar: Path, record: dict) -> PatchBank:
    """The bank beside an export, refused (ExportError) when it is missing or is not the one exported with it."""
    bank_path = sidecar.parent / record["bank_file"]
    try:
        return PatchBank.load(bank_path, sha256=record["bank_sha256"])
    except (OSError, BankMismatch):
        raise ExportError(f"{bank_path} is missing or is not the memory bank {sidecar.name} was exported with "
                          "(export the bundle again into this folder).") from None


def exported_anomaly_engine(features: Engine, sidecar: str | os.PathLike) -> AnomalyEngine:
    """An exported feature graph's engine + the bank and record beside it -> normalised anomaly scores (N, 1)."""
    sidecar = Path(sidecar)
    record = json.loads(sidecar.read_text())
    return _scoring(features, _checked_bank(sidecar, record), record)


@dataclass
class _Bank:
    """A bundle's memory bank as an export copies it: read once, hashed once."""

    name: str
    data: bytes
    sha256: str

    @classmethod
    def read(cls, path: Path) -> "_Bank":
        data = path.read_bytes()
        return cls(path.name, data, hashlib.sha256(data).hexdigest())

    def place(self, folder: Path) -> str:
        """Copy it into `folder` unless the same bytes are there already (every export in a folder shares it)."""
        beside = folder / self.name
        if not beside.is_file() or beside.stat().st_size != len(self.data) or beside.read_bytes() != self.data:
            write_atomic(beside, self.data)
        return beside.name


def _place_anomaly_parts(bundle: Bundle, target: Path, bank: _Bank) -> tuple[str, dict]:
    """Copy the bank beside the export and write its scoring record; returns the verification record's entry."""
    bank_name = bank.place(target.parent)
    write_atomic(anomaly_sidecar(target), json.dumps(_anomaly_record(bundle, target, bank.sha256), indent=2).encode())
    return "anomaly", {"bank_file": bank_name, "scoring": anomaly_sidecar(target).name}


# --- head.anomaly_feature (stacked) bundles: the classifier, the patch graph, the bank and the stacker -------------


#: Beside an exported stacked classifier ``<file>``: ``<file>.anomaly_feature.json`` (how the two graphs' outputs become
#: the probability), the patch graph ``<stem>.anomaly_features<suffix>`` and the bank ``anomaly_feature_bank.npy``.
STACKED_SUFFIX = ".anomaly_feature.json"


def stacked_sidecar(path: str | os.PathLike) -> Path:
    """Where an exported stacked classifier's record lies: ``<file>.anomaly_feature.json`` beside it."""
    path = Path(path)
    return path.with_name(path.name + STACKED_SUFFIX)


def stacked_patch_path(target: str | os.PathLike) -> Path:
    """Where an exported stacked classifier's patch graph lies: ``model.onnx`` -> ``model.anomaly_features.onnx``."""
    target = Path(target)
    return target.with_name(f"{target.stem}.anomaly_features{target.suffix}")


@dataclass
class _Stacked:
    """What a head.anomaly_feature export needs besides the classifier, read once: the patch graph (Keras, the check's
    reference; ONNX, the bundle's stored verified file or else converted now), the bank (hashed once) and the stacker."""

    info: Any  # bundle.AnomalyFeatureInfo
    patches: Any  # keras.Model
    onnx: bytes
    bank: _Bank
    rows: PatchBank

    def engine(self, classifier: Engine, patches: Engine) -> StackedEngine:
        info = self.info
        return StackedEngine(classifier, patches, self.rows, Stacker(info.coef_logit, info.coef_log_score, info.intercept),
                             top_k=info.score_top_k, neighbours=info.score_neighbours)


def _stacked_parts(bundle: Bundle) -> _Stacked:
    """The stacked bundle's parts for an export; ExportError when its bank is not the one its metadata hashed."""
    import keras

    info = bundle.spec.anomaly_feature
    bank = _Bank.read(bundle.path / info.bank_file)
    recorded = (info.sha256 or {}).get(info.bank_file)
    if recorded is not None and recorded != bank.sha256:
        raise ExportError(f"{bundle.path / info.bank_file} is not the memory bank this bundle was trained with (its sha256 "
                          "differs from metadata.json): restore the bundle or retrain.")
    try:
        patches = keras.saving.load_model(bundle.path / info.model_file, compile=False)
    except Exception as exc:
        raise ExportError(f"{bundle.path / info.model_file}: could not load the patch graph ({type(exc).__name__}: {exc}).") from None
    stored = stored_patch_onnx(bundle)
    onnx = stored.read_bytes() if stored is not None else convert_to_onnx(patches, output_name=PATCH_OUTPUT_NAME)
    return _Stacked(info, patches, onnx, bank, PatchBank(np.load(io.BytesIO(bank.data), allow_pickle=False)))


def _stacked_record(bundle: Bundle, target: Path, stacked: _Stacked) -> dict:
    """Everything a consumer needs to compute the bundle's probability from the exported files (README, Exports)."""
    info, spec = stacked.info, bundle.input_spec
    return {
        "kind": "keeneye stacked model: the classifier's probability p and the one-class raw score s of the patch graph "
                "against the bank, combined by a logistic regression",
        "classifier_model": target.name, "classifier_output": "p, the supervised probability (N, 1)",
        "patch_model": stacked_patch_path(target).name, "patch_output": "patch features (N, H, W, D)",
        "input": {"name": ONNX_INPUT_NAME, "dtype": "uint8", "layout": "NHWC, RGB", "image_size": bundle.image_size,
                  "resize": spec.resize, "same input for both graphs": spec.views == 1,
                  "patch_model_input": "the classifier's input" if spec.views == 1 else
                  f"the first {bundle.image_size} rows of the classifier's input (the image itself; the input stacks "
                  f"{spec.views} views)"},
        "image_preparation": bundle.spec.preprocessing,
        "bank_file": stacked.bank.name, "bank_sha256": stacked.bank.sha256, "bank_size": len(stacked.rows),
        "distance": "Euclidean (L2) distance of each patch (a row of the H*W patches, D values) to its nearest bank row",
        "score_top_k": info.score_top_k, "score_neighbours": info.score_neighbours,
        "raw_score": "s = mean of the score_top_k largest patch distances of the image"
                     + ("" if info.score_neighbours == 1 else ", re-weighted over score_neighbours bank neighbours as PatchCore "
                        "does (keeneye.model.patchcore.reweighted_scores)"),
        "coef_logit": info.coef_logit, "coef_log_score": info.coef_log_score, "intercept": info.intercept,
        "combination": COMBINATION, "clipping": CLIPPING,
        "threshold": bundle.threshold, "decision": "positive when probability >= threshold",
        "class_names": list(bundle.class_names), "positive_class": bundle.positive_class, "bundle": str(bundle.path),
    }


def _place_stacked_parts(bundle: Bundle, target: Path, stacked: _Stacked, patch_partial: Path) -> tuple[str, dict]:
    """Move the checked patch graph beside the classifier, copy the bank, write the record; the verification entry."""
    os.replace(patch_partial, stacked_patch_path(target))
    bank_name = stacked.bank.place(target.parent)
    write_atomic(stacked_sidecar(target), json.dumps(_stacked_record(bundle, target, stacked), indent=2).encode())
    return "anomaly_feature", {"patch_model": stacked_patch_path(target).name, "bank_file": bank_name,
                               "scoring": stacked_sidecar(target).name}


def exported_stacked_engine(classifier: Engine, sidecar: str | os.PathLike) -> StackedEngine:
    """An exported stacked classifier's engine + the patch graph, bank and record beside it -> probabilities (N, 1)."""
    sidecar = Path(sidecar)
    record = json.loads(sidecar.read_text())
    bank = _checked_bank(sidecar, record)
    stacker = Stacker(record["coef_logit"], record["coef_log_score"], record["intercept"])
    return StackedEngine(classifier, _exported_engine(sidecar.parent / record["patch_model"]), bank, stacker,
                         top_k=record["score_top_k"], neighbours=record["score_neighbours"])


# --- converters ----------------------------------------------------------------------------------


_SAVED_MODELS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _saved_model_dir(bundle: Bundle) -> Path:
    """Keras's SavedModel export of the bundle's model, made once per loaded model and process
    (the SavedModel and TFLite exports both start from it; removed when the process ends)."""
    entry = _SAVED_MODELS.get(bundle.model)
    if entry is None or not (Path(entry.name) / "saved_model" / "saved_model.pb").is_file():
        entry = tempfile.TemporaryDirectory(prefix="keeneye-saved-model-")
        bundle.model.export(str(Path(entry.name) / "saved_model"), format="tf_saved_model", verbose=False)
        _SAVED_MODELS[bundle.model] = entry
    return Path(entry.name) / "saved_model"


def _export_saved_model(bundle: Bundle, target: Path) -> None:
    shutil.copytree(_saved_model_dir(bundle), target)


def _export_tflite(bundle: Bundle, target: Path, quantize: str | None, calibration: ImageSet | None) -> None:
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(str(_saved_model_dir(bundle)))
    if quantize:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantize == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if quantize == "int8":
        images = calibration.images

        def representative_dataset():
            for image in images:
                yield [image[None]]

        converter.representative_dataset = representative_dataset
        keep = tflite_float_nodes(tf.lite.TFLiteConverter.from_saved_model(str(_saved_model_dir(bundle))).convert())
        options = tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=keep)  # TFLite's selective quantisation
        debugger = tf.lite.experimental.QuantizationDebugger(converter=converter, debug_dataset=representative_dataset,
                                                             debug_options=options)
        target.write_bytes(debugger.get_nondebug_quantized_model())
        return
    target.write_bytes(converter.convert())


def _bundle_onnx_bytes(bundle: Bundle) -> bytes:
    """The bundle's own model.onnx when it was made from this model.keras, else a fresh conversion."""
    inside = bundle.path / ONNX_FILE
    if is_verified(inside, sha256_of_file(bundle.path / MODEL_FILE)):
        return inside.read_bytes()
    return convert_to_onnx(bundle.model, output_name=PATCH_OUTPUT_NAME if _is_anomaly(bundle) else "probability")


def _export_onnx(bundle: Bundle, target: Path, quantize: str | None, calibration: ImageSet | None) -> None:
    data = _bundle_onnx_bytes(bundle)
    if quantize is None:
        target.write_bytes(data)
        return
    import onnx

    if quantize == "float16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        half = convert_float_to_float16(onnx.load_from_string(data), keep_io_types=True)
        target.write_bytes(half.SerializeToString())
        return
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    images = calibration.images

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"image": images[i : i + 8]} for i in range(0, len(images), 8)])

        def get_next(self):
            return next(self.batches, None)

    model = onnx.load_from_string(data)
    dedupe_opsets(model)  # bundles written by keeneye 0.1.0 before this fix repeat their opsets
    with tempfile.TemporaryDirectory(prefix="keeneye-onnx-int8-") as scratch:
        float_path, prepared = Path(scratch) / "float.onnx", Path(scratch) / "prepared.onnx"
        float_path.write_bytes(model.SerializeToString())
        quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared), str(target), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            nodes_to_exclude=float_nodes(onnx.load(str(prepared))),
        )


#: What an int8 export keeps in float32 in front of the rest (why: float_nodes): Keras layer names (or their
#: stems) of the preprocessing, Conv1 with its BatchNorm and ReLU, and the first depthwise convolution up to its ReLU.
FIRST_FLOAT_LAYERS = ("mobilenet_v2_preprocess", "Conv1", "expanded_conv_depthwise")
LAST_FLOAT_LAYER = "expanded_conv_depthwise_relu"


def float_nodes(model: Any) -> list[str]:
    """The nodes an int8 export keeps in float32: the first two convolutions (MobileNetV2's Conv1 and the
    depthwise convolution after it, up to its ReLU) and the head, named as quantize_static sees them in
    `model` (an onnx.ModelProto after quant_pre_process, which fuses nodes under new names, e.g. the
    head's MatMul + Add).

    The head: a logistic head folds the features' standardisation into its weights, which then span
    orders of magnitude that one 8-bit scale cannot hold. The first convolutions: they see the raw grey
    levels, and 8-bit activations there erase the faint differences that defects on low-contrast surfaces
    consist of. Measured (benchmarks/int8_exports.py, README "Exports"): on a magnetic-tile bundle equal
    decisions 0.80 with the head alone float, 0.96 with these, at 0.49x and 0.60x float32's time, where
    the whole stem up to block_1 kept 0.96 at 0.73x.
    """
    names = [node.name for node in model.graph.node]
    stem_end = next((i + 1 for i, name in enumerate(names) if LAST_FLOAT_LAYER in name), 0)
    return names[:stem_end] + [name for name in names if "head" in name]


def tflite_float_nodes(float_model: bytes) -> list[str]:
    """The op outputs of a float TFLite model that its int8 export keeps in float32: the first two
    convolutions and the head (why: float_nodes, the ONNX counterpart), and a "multi+cov" model's texture
    part. TFLite names each op by its output tensor, which carries the Keras layer names of what it fused.

    Why the texture part here and not in ONNX (measured 2026-12-03 on the 5 magnetic-tile `multi+cov` fold
    bundles, README "Exports"): with it quantised, TFLite int8 exports kept 0.35-0.84 of the decisions, with
    it float 0.87-0.95, like ONNX int8 (0.86-0.96), where keeping it float changed nothing (0.87-0.95).
    """
    import tensorflow as tf

    from keeneye.model.backbone import TEXTURE_LAYERS, TEXTURE_PROJECTION  # imports Keras: not at module load

    layers = FIRST_FLOAT_LAYERS + (TEXTURE_PROJECTION, *TEXTURE_LAYERS)
    names = [detail["name"] for detail in tf.lite.Interpreter(model_content=float_model).get_tensor_details()]
    return [name for name in names if "head" in name or any(layer in name for layer in layers)]


# --- verification --------------------------------------------------------------------------------


def _in_batches(engine: Callable[[np.ndarray], np.ndarray], images: np.ndarray, batch: int = 32) -> np.ndarray:
    """Probabilities (N,) computed `batch` images at a time: one call on hundreds of 224 px images
    would hold gigabytes of activations."""
    outputs = [np.asarray(engine(images[i : i + batch]), dtype=np.float32).reshape(-1) for i in range(0, len(images), batch)]
    return np.concatenate(outputs) if outputs else np.empty(0, np.float32)


def _f1(labels: np.ndarray, probabilities: np.ndarray, threshold: float) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(labels, predict_labels(probabilities, threshold), zero_division=0))


def compare(reference: np.ndarray, candidate: np.ndarray, threshold: float, labels: np.ndarray | None,
            tolerance: Tolerance) -> dict:
    """Numbers saying how far `candidate` is from `reference` (probabilities), and whether that passes."""
    reference = np.asarray(reference, dtype=np.float64).reshape(-1)
    candidate = np.asarray(candidate, dtype=np.float64).reshape(-1)
    difference = np.abs(reference - candidate)
    same = predict_labels(reference, threshold) == predict_labels(candidate, threshold)
    agreement = float(np.mean(same)) if len(reference) else 1.0
    report = {
        "n_images": int(len(reference)),
        "threshold": threshold,
        "max_abs_diff": float(difference.max()) if len(difference) else 0.0,
        "mean_abs_diff": float(difference.mean()) if len(difference) else 0.0,
        "decision_agreement": agreement,
        "decisions_changed": int(np.sum(~same)),
        "f1_keras": None, "f1_exported": None, "f1_change": None,
    }
    if labels is not None and len(labels) and len(np.unique(labels)) == 2:
        report["f1_keras"] = _f1(labels, reference, threshold)
        report["f1_exported"] = _f1(labels, candidate, threshold)
        report["f1_change"] = report["f1_exported"] - report["f1_keras"]
    failures = []
    if tolerance.max_abs_diff is not None and report["max_abs_diff"] > tolerance.max_abs_diff:
        failures.append(f"max probability difference {report['max_abs_diff']:.2e} > {tolerance.max_abs_diff:.0e}")
    if agreement < tolerance.min_agreement:
        failures.append(f"equal decisions {agreement:.1%} < {tolerance.min_agreement:.0%}")
    if tolerance.max_f1_drop is not None and report["f1_change"] is not None and report["f1_change"] < -tolerance.max_f1_drop:
        failures.append(f"test F1 change {report['f1_change']:+.4f} < -{tolerance.max_f1_drop}")
    report["tolerance"] = tolerance.to_dict()
    report["failures"] = failures
    report["passed"] = not failures
    return report


def refusal_advice(bundle: Bundle, fmt: str, quantize: str | None) -> str:
    """What to try after a refused export: the next less lossy form of the same format.

    Why: a refusal is the check working, and the user's next question is what will pass. Measured
    2026-12-03 on the 5 magnetic-tile `multi+cov` fold bundles: int8 ONNX kept 0.86-0.96 of the decisions
    (refused in 4); float16 passed as TFLite in 5 (it stores 16-bit weights and computes in float32 on a
    CPU) and as ONNX (16-bit arithmetic) in 4.
    """
    command = f"keeneye export {bundle.path} --format {fmt}"
    if quantize == "int8":
        return (f"What to try next: float16 ({command} --quantize float16, half the "
                f"float32 size) or float32 ({command}); or, if the measured loss is acceptable for your use, pass a "
                "lower --min-agreement / a larger --max-f1-drop.")
    if quantize == "float16" and fmt == "onnx":
        return (f"Try float32 ({command}), which matches model.keras within 1e-4, or TFLite float16 (keeneye export "
                f"{bundle.path} --format tflite --quantize float16), which stores 16-bit weights but computes in float32.")
    if quantize == "float16":
        return f"Try float32 ({command}), which matches model.keras within 1e-4."
    return ("A float32 export matches model.keras within 1e-4 by design: unless a stricter --max-diff or --min-agreement "
            "was passed, this is a bug, please report it with the verification file.")


def summary_line(report: dict) -> str:
    text = (f"max |Δp| {report['max_abs_diff']:.2e}, equal decisions {report['decision_agreement']:.2%} "
            f"on {report['n_images']} images at threshold {report['threshold']:.4f}")
    if report.get("f1_change") is not None:
        text += f", test F1 {report['f1_keras']:.4f} -> {report['f1_exported']:.4f} ({report['f1_change']:+.4f})"
    return text


# --- output paths --------------------------------------------------------------------------------


def default_name(fmt: str, quantize: str | None) -> str:
    stem = "saved_model" if fmt == "savedmodel" else "model"
    return stem + (f"_{quantize}" if quantize else "") + SUFFIX[fmt]


def _check_writable(folder: Path) -> None:
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".keeneye-write-test-"):
            pass
    except OSError as exc:
        raise ExportError(f"cannot write into the output folder {folder}: {exc.strerror or exc} (read-only? choose another --output).") from None


def resolve_output(bundle: Bundle, fmt: str, quantize: str | None, output: str | os.PathLike | None) -> Path:
    """Where the export goes; the folder must exist (except the bundle's own exports/) and be writable."""
    name = default_name(fmt, quantize)
    if output is None:
        folder = bundle.path / EXPORTS_FOLDER
        try:
            folder.mkdir(exist_ok=True)
        except OSError as exc:
            raise ExportError(
                f"cannot create {folder} ({exc.strerror or exc}); the bundle folder may be read-only: pass --output."
            ) from None
        target = folder / name
    else:
        target = Path(output).expanduser().absolute()
        if fmt != "savedmodel" and target.is_dir():
            target = target / name
    folder = target.parent
    if not folder.exists():
        raise ExportError(f"the output folder {folder} does not exist (create it first, or choose another --output).")
    if not folder.is_dir():
        raise ExportError(f"the output folder {folder} is not a folder.")
    if fmt == "savedmodel" and target.exists() and not (target / "saved_model.pb").is_file() and any(target.iterdir()):
        raise ExportError(f"{target} exists and is not a SavedModel: choose a new --output path (it would be replaced).")
    if fmt != "savedmodel" and target.is_dir():
        raise ExportError(f"{target} is a folder.")
    _check_writable(folder)
    return target


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


# --- the export ----------------------------------------------------------------------------------


def _checked_request(format: str, quantize: str | None) -> tuple[str, str | None]:
    """(format, quantization) normalised, or ExportError naming what is wrong with the request."""
    fmt = str(format).lower()
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format '{format}'; choose one of {', '.join(FORMATS)}.")
    if quantize in ("", "none", "float32"):
        quantize = None
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise ExportError(f"unknown quantization '{quantize}'; choose one of {', '.join(QUANTIZATIONS)}.")
    if quantize not in SUPPORTED_QUANTIZATION[fmt]:
        raise ExportError(f"format '{fmt}' does not support --quantize {quantize} (supported: onnx and tflite).")
    return fmt, quantize


def _convert(bundle: Bundle, fmt: str, quantize: str | None, calibration: ImageSet | None, partial: Path, target: Path,
             label: str) -> None:
    """Write the export to `partial`; a converter's failure becomes an ExportError saying which step failed."""
    try:
        if fmt == "onnx":
            _export_onnx(bundle, partial, quantize, calibration)
        elif fmt == "tflite":
            _export_tflite(bundle, partial, quantize, calibration)
        else:
            _export_saved_model(bundle, partial)
    except OSError as exc:
        raise ExportError(f"could not write the export to {target.parent}: {exc.strerror or exc}") from None
    except ImportError as exc:
        raise ExportError(f"the {fmt} exporter needs a package that is not installed: {exc}") from None
    except KeeneyeError:
        raise
    except Exception as exc:  # a converter's own failure: say which step, without a traceback
        raise ExportError(f"the {label} conversion failed: {type(exc).__name__}: {exc}") from exc


def check_exportable(bundle: Bundle, fmt: str = "onnx", quantize: str | None = None) -> None:
    """A head.anomaly_feature bundle exports as float32 ONNX only: its probability needs two graphs, a bank and the
    stacker, and only that combination is converted and checked here (the patch graph is the bundle's stored ONNX)."""
    if has_anomaly_feature(bundle) and (fmt != "onnx" or quantize is not None):
        asked = fmt + (f" --quantize {quantize}" if quantize else "")
        raise ExportError(f"{bundle.path.name} was trained with head.anomaly_feature: it exports as float32 ONNX only "
                          f"(--format onnx, no --quantize), not as {asked}: the classifier graph with the one-class patch graph, "
                          "the memory bank and the stacker's record beside it. For other formats or a quantized model, "
                          "train with head.anomaly_feature false (the head alone exports in every format).")


def export_bundle(
    run_dir: str | os.PathLike | Bundle,
    format: str = "onnx",
    quantize: str | None = None,
    output: str | os.PathLike | None = None,
    *,
    max_images: int = 256,
    calibration_images: int = 200,
    tolerance: Tolerance | None = None,
    console=None,
) -> ExportResult:
    """Export a bundle's model, verify it against model.keras on held-out images, and put it in place.

    Raises ExportError for a bad request or output folder, ExportVerificationError when the export
    disagrees with model.keras beyond `tolerance` (default `TOLERANCES[quantize]`). A one-class bundle's
    export is its feature graph, checked on the anomaly scores it gives with the bank written beside it;
    a head.anomaly_feature bundle's is its classifier with the patch graph and the bank beside it, checked
    on the stacked probability.
    """
    fmt, quantize = _checked_request(format, quantize)
    bundle = run_dir if isinstance(run_dir, Bundle) else load_bundle(run_dir)
    check_exportable(bundle, fmt, quantize)
    target = resolve_output(bundle, fmt, quantize, output)
    tolerance = tolerance or TOLERANCES[quantize]
    say = console.print if console is not None else (lambda *a, **k: None)

    held_out = held_out_images(bundle, max_images)
    calibration = None
    if quantize == "int8":
        if fmt == "onnx":
            calibration_images = min(calibration_images, max(16, ONNX_CALIBRATION_PIXELS // (bundle.image_size**2 * bundle.input_spec.passes)))
        calibration = representative_images(bundle, calibration_images)
    label = fmt + (f" ({quantize})" if quantize else "")
    stacked = _stacked_parts(bundle) if has_anomaly_feature(bundle) else None
    bank = _Bank.read(bundle.path / BANK_FILE) if _is_anomaly(bundle) else None
    what = (" (the one-class feature graph, with the memory bank beside it)" if bank is not None else
            " (the classifier, with the one-class patch graph, its memory bank and the stacker beside it)" if stacked is not None else "")
    say(f"exporting {bundle.path.name} as {label}{what}; verifying on {held_out.description}", highlight=False)

    partial = target.with_name(f".{target.name}.partial-{uuid.uuid4().hex[:8]}")
    patch_partial = partial.with_name(partial.name + ".patches")
    started = time.perf_counter()
    try:
        _convert(bundle, fmt, quantize, calibration, partial, target, label)
        if stacked is not None:
            patch_partial.write_bytes(stacked.onnx)
        seconds = time.perf_counter() - started
        report = _verify(bundle, partial, held_out, tolerance, stacked, patch_partial)
        record = {
            "format": fmt, "quantize": quantize, "file": target.name, "bundle": str(bundle.path),
            "source": MODEL_FILE, "source_sha256": sha256_of_file(bundle.path / MODEL_FILE),
            "images": held_out.description,
            **report,
            "calibration": calibration.description if calibration is not None else None,
            "size_bytes": _size(partial), "export_s": round(seconds, 3),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": _versions(fmt),
        }
        if not report["passed"]:  # the report goes beside, under another name: an earlier good export stays valid
            failed_path = target.with_name(target.name + ".verification-failed.json")
            write_atomic(failed_path, json.dumps(record, indent=2).encode())
            cpu_note = onnx_int8_cpu_note() if (fmt, quantize) == ("onnx", "int8") else None
            raise ExportVerificationError(
                f"the {label} export disagrees with model.keras beyond tolerance: {'; '.join(report['failures'])} "
                f"({summary_line(report)}). Nothing was written to {target}; details in {failed_path}."
                + (f" Likely cause: {cpu_note}." if cpu_note else "") + " " + refusal_advice(bundle, fmt, quantize)
            )
        place = ((lambda placed: _place_stacked_parts(bundle, placed, stacked, patch_partial)) if stacked is not None
                 else (lambda placed: _place_anomaly_parts(bundle, placed, bank)) if bank is not None else None)
        notes = _put_in_place(partial, target, record, place)
    finally:
        for leftover in (partial, patch_partial):
            if leftover.exists():
                _remove(leftover)
    say(f"exported {target} ({record['size_bytes'] / 1e6:.1f} MB, {seconds:.1f} s)"
        + (f", with {' and '.join(notes)} beside it" if notes else ""), highlight=False)
    say(f"verified: {summary_line(report)}; written to {verification_path(target)}", highlight=False)
    return ExportResult(target, fmt, quantize, record, verification_path(target), seconds, notes)


def _verify(bundle: Bundle, exported: Path, held_out: ImageSet, tolerance: Tolerance, stacked: _Stacked | None = None,
            exported_patches: Path | None = None) -> dict:
    """Compare the exported model with model.keras on the held-out images: probabilities, or for a one-class
    bundle the normalised anomaly scores that each feature graph gives with the bundle's bank, or for a
    head.anomaly_feature bundle the stacked probabilities of the exported graphs and of the Keras ones."""
    if stacked is not None:
        candidate = _in_batches(stacked.engine(_exported_engine(exported), _exported_engine(exported_patches)), held_out.images)
        reference = _in_batches(stacked.engine(KerasEngine(bundle.model), KerasEngine(stacked.patches)), held_out.images)
        return compare(reference, candidate, bundle.threshold, held_out.labels, tolerance)
    wrap = _anomaly_scorer(bundle) if _is_anomaly(bundle) else (lambda engine: engine)
    candidate = _in_batches(wrap(_exported_engine(exported)), held_out.images)
    reference = _in_batches(wrap(KerasEngine(bundle.model)), held_out.images)
    return compare(reference, candidate, bundle.threshold, held_out.labels, tolerance)


def _versions(fmt: str) -> dict:
    import keras
    import tensorflow as tf

    versions = {"tensorflow": tf.__version__, "keras": keras.__version__}
    if fmt == "onnx":
        import onnxruntime
        import tf2onnx

        versions |= {"tf2onnx": tf2onnx.__version__, "onnxruntime": onnxruntime.__version__, "opset": ONNX_OPSET}
    return versions


def _put_in_place(partial: Path, target: Path, record: dict, place: Callable[[Path], tuple[str, dict]] | None) -> list[str]:
    """Move a verified export into place with its verification record; `place(target)` puts a one-class or stacked
    bundle's parts beside it and names them (recorded under its key). Returns the names of the files written beside it."""
    report_path = verification_path(target)
    target.with_name(target.name + ".verification-failed.json").unlink(missing_ok=True)
    report_path.unlink(missing_ok=True)
    anomaly_sidecar(target).unlink(missing_ok=True)
    stacked_sidecar(target).unlink(missing_ok=True)
    if target.exists():
        _remove(target)
    os.replace(partial, target)
    notes: list[str] = []
    if place is not None:
        key, entry = place(target)
        record[key] = entry
        notes = list(entry.values())
    write_atomic(report_path, json.dumps(record, indent=2).encode())
    return notes


# --- the bundle's own model.onnx, written at train time ------------------------------------------


def _check_images(sample_paths: list[str] | None, max_images: int, spec: InputSpec) -> tuple[np.ndarray, str]:
    """(images, their description) for a train-time ONNX check: up to `max_images` testing images, else 8 generated ones."""
    _, images = _decode(list(sample_paths or [])[:max_images], spec)
    if not len(images):
        return generated_images(8, spec.shape, seed=0), "8 generated images"
    return images, f"{len(images)} testing images"


def write_bundle_onnx(folder: str | os.PathLike, model, sample_paths: list[str] | None = None, feature_engine=None,
                      max_images: int = 16, spec: InputSpec | None = None) -> str:
    """Write `model.onnx` (+ its verification record) into a bundle folder being built; never raises.

    `feature_engine` (the FeatureEngine that computed the embeddings) lends its converted backbone,
    so only the head is converted. The ONNX model is checked against `model` on up to `max_images` of `sample_paths` (else
    generated images) and written only if the probabilities agree within PROBABILITY_TOLERANCE.
    Returns a line for the console (rich markup).
    """
    from rich.markup import escape

    folder = Path(folder)
    try:
        images, source = _check_images(sample_paths, max_images, spec or InputSpec(int(model.input_shape[2])))
        feature_onnx = feature_engine.onnx_model() if feature_engine is not None else None

        def joined() -> bytes:
            try:
                return convert_classifier_to_onnx(model, feature_onnx)
            except Exception:
                if feature_onnx is None:
                    raise
                return convert_classifier_to_onnx(model)  # the join failed: convert the whole network

        reference = KerasEngine(model)(images)
        check = convert_and_verify(model, images, convert=joined, reference=reference)
        if not check.passed and feature_onnx is not None:  # the joined graph disagrees: convert the whole network
            check = convert_and_verify(model, images, convert=lambda: convert_classifier_to_onnx(model), reference=reference)
        data, difference, seconds = check.data, check.max_diff, check.seconds
        record = onnx_verification_record(sha256_of_file(folder / MODEL_FILE), difference, len(images), source, seconds)
        if not record["passed"]:
            return (f"[yellow]warning:[/] {ONNX_FILE} not written: it differs from Keras by {difference:.1e} "
                    f"(> {PROBABILITY_TOLERANCE:.0e}); predict will use Keras.")
        write_atomic(folder / ONNX_FILE, data)
        write_atomic(verification_path(folder / ONNX_FILE), json.dumps(record, indent=2).encode())
        return f"{ONNX_FILE} written for ONNX Runtime ({seconds:.1f} s; max difference from Keras {difference:.1e} on {source})"
    except Exception as exc:  # the bundle is complete without it: predict converts on first use
        return escape(f"warning: {ONNX_FILE} not written ({type(exc).__name__}: {exc}); predict will convert model.keras on first use.")


def write_anomaly_feature_onnx(folder: str | os.PathLike, classifier, extractor, bank: PatchBank, stacker: Stacker,
                               top_k: int, neighbours: int, sample_paths: list[str] | None = None,
                               onnx_data: bytes | None = None, max_images: int = 16, spec: InputSpec | None = None) -> str:
    """Write head.anomaly_feature's `anomaly_features.onnx` (+ its verification record) into a bundle being built; never raises.

    Why: without it every predictor of the bundle converted the patch graph at load (seconds, and TensorFlow at
    serve time). It is checked as model.onnx is, on what a user sees: the stacked probability with the ONNX patch
    graph against the one with the Keras graph (the classifier on Keras in both), within PROBABILITY_TOLERANCE on up
    to `max_images` testing images. `onnx_data`: the conversion training already made (FeatureEngine.onnx_model()),
    so nothing is converted twice. Returns a line for the console (rich markup).
    """
    from rich.markup import escape

    folder, name = Path(folder), ANOMALY_FEATURE_ONNX_FILE
    try:
        images, source = _check_images(sample_paths, max_images, spec or InputSpec(int(extractor.input_shape[2])))
        supervised = KerasEngine(classifier)
        check = convert_and_verify(
            extractor, images, convert=lambda: onnx_data or convert_to_onnx(extractor, output_name=PATCH_OUTPUT_NAME),
            wrap=lambda engine: StackedEngine(supervised, engine, bank, stacker, top_k=top_k, neighbours=neighbours))
        record = onnx_verification_record(sha256_of_file(folder / ANOMALY_FEATURE_MODEL_FILE), check.max_diff, len(images),
                                          f"{source} (stacked probabilities)", check.seconds) | {"source": name}
        if not record["passed"]:
            return (f"[yellow]warning:[/] {name} not written: its stacked probabilities differ from Keras by {check.max_diff:.1e} "
                    f"(> {PROBABILITY_TOLERANCE:.0e}); predict will convert the patch graph at each load.")
        write_atomic(folder / name, check.data)
        write_atomic(verification_path(folder / name), json.dumps(record, indent=2).encode())
        return f"{name} written (the patch graph for ONNX Runtime; max stacked-probability difference from Keras {check.max_diff:.1e} on {source})"
    except Exception as exc:  # the bundle is complete without it: predict converts the patch graph at load
        return escape(f"warning: {name} not written ({type(exc).__name__}: {exc}); predict will convert the patch graph at each load.")
