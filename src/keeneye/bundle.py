"""The model bundle: one folder that every consumer (predict, evaluate, serve, export) starts from.

`model.keras` takes raw RGB uint8 images and returns the positive-class probability; it loads
with plain `keras.saving.load_model` (no custom objects, no keeneye import). `metadata.json`
says how to read its output. A bundle is built in a hidden staging folder and renamed into
place only when complete, so a crash never leaves a half-written bundle under a run's name and
an earlier run is never overwritten.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
import uuid
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from keeneye.config import ViewCount, save_config
from keeneye.data import preprocess
from keeneye.data.files import sha256_of_file, write_atomic
from keeneye.data.manifest import MANIFEST_FILE  # noqa: F401  (defined in the data layer, which reads run folders too)
from keeneye.errors import BundleError

# The bundle's folder layout: every name a bundle's files have is here (BundleWriter writes them).
MODEL_FILE = "model.keras"
METADATA_FILE = "metadata.json"
CONFIG_FILE = "config.json"
ONNX_FILE = "model.onnx"
VERIFICATION_SUFFIX = ".verification.json"
HISTORY_FILE = "history.csv"
TRAINING_CURVES_FILE = "training_curves.png"
DROPPED_FILE = "dropped_files.csv"
SKIPPED_FILE = "skipped_files.csv"
DATA_COUNTS_FILE = "data_counts.csv"
EVALUATIONS_DIR = "evaluations"
#: head.anomaly_feature: the one-class patch feature graph and its memory bank, beside model.keras.
ANOMALY_FEATURE_MODEL_FILE = "anomaly_features.keras"
ANOMALY_FEATURE_BANK_FILE = "anomaly_feature_bank.npy"
#: The patch graph converted to ONNX at train time and checked then (record: <file>.verification.json), as model.onnx is.
ANOMALY_FEATURE_ONNX_FILE = "anomaly_features.onnx"
BUNDLE_FORMAT_VERSION = 1

#: How probabilities are made and read: recorded in every supervised bundle's metadata.
PREPROCESSING = {
    "input": "RGB uint8, any size; resized to image_size x image_size by input.resize (squash, pad = letterbox, crop = centre; "
             "cv2.INTER_AREA when a side shrinks by more than 1.5x, else cv2.INTER_LINEAR), or with input.tiles cut at native "
             "scale into rows x cols overlapping square tiles, each resized so, stacked vertically; with input.views > 1 the resized "
             "image and its mirror images / quarter turns stacked vertically (keeneye.data.preprocess)",
    "inside_model": "x / 127.5 - 1 (MobileNetV2 preprocess_input), part of model.keras",
    "decision": "positive when probability >= threshold",
}


class TilesSpec(BaseModel):
    """The tile grid of a tiled bundle (data/preprocess.py): rows x cols square tiles, least overlap."""

    rows: int = Field(..., ge=1, le=99, strict=True)
    cols: int = Field(..., ge=1, le=99, strict=True)
    overlap: float = Field(0.25, ge=0.0, le=0.75, allow_inf_nan=False)


class InputSpec(BaseModel):
    """What model.keras takes: RGB uint8 images of `image_size` pixels, made by `resize` or cut into `tiles`."""

    model_config = ConfigDict(extra="allow")

    image_size: int = Field(..., ge=16, le=4096, strict=True, description="Side of the square input, in pixels.")
    resize: Literal["squash", "pad", "crop"] = Field("squash", description="How a non-square image becomes square.")
    tiles: Optional[TilesSpec] = Field(None, description="Tile grid (model.tiles), or null: the whole image.")
    views: ViewCount = Field(1, description="Views stacked per image (model.views: the image first, then its "
                                       "mirrors and turns in keeneye.data.preprocess.VIEW_SETS order); 1 before model.views.")


class BackboneInfo(BaseModel):
    """Which feature extractor a bundle was built on, and which weights (by content hash)."""

    model_config = ConfigDict(extra="allow")

    name: str
    alpha: Union[float, int]
    features: Optional[str] = Field(None, description="Pooling of the feature maps (model.features); absent in one-class bundles.")
    weights: str = Field(..., description="The weights file's name (or the preset named in model.weights).")
    weights_sha256: Optional[str] = None


class AnomalyFeatureInfo(BaseModel):
    """head.anomaly_feature: how the one-class score enters the probability (model/anomaly_feature.py).

    probability = sigmoid(coef_logit * logit(p) + coef_log_score * log(s) + intercept), p = model.keras's output,
    s = the raw one-class score of anomaly_features.keras's patches against anomaly_feature_bank.npy.
    """

    model_config = ConfigDict(extra="allow")

    model_file: str = Field(ANOMALY_FEATURE_MODEL_FILE, description="The patch feature graph (uint8 images -> patch features).")
    bank_file: str = Field(ANOMALY_FEATURE_BANK_FILE, description="The memory bank of good patches (float32, bank_size x feature_dim).")
    layers: list[str]
    grid: str
    feature_dim: int = Field(..., ge=1)
    score_top_k: int = Field(..., ge=1, description="Raw score: the mean of this many largest patch distances.")
    score_neighbours: int = Field(..., ge=1, description="PatchCore's re-weighting over this many bank neighbours (1: none).")
    bank_size: int = Field(..., ge=1)
    coef_logit: float = Field(..., allow_inf_nan=False)
    coef_log_score: float = Field(..., allow_inf_nan=False)
    intercept: float = Field(..., allow_inf_nan=False)
    combination: str = Field(..., description="The formula, in words.")
    onnx_file: Optional[str] = Field(
        None, description="model_file converted to ONNX at train time and checked on the stacked probability (its record: "
                          "<onnx_file>.verification.json); absent in bundles written before it was stored, whose predictor "
                          "converts model_file at every load.")
    sha256: Optional[dict[str, str]] = Field(
        None, description="sha256 of model_file, onnx_file and bank_file, by file name (absent in older bundles).")


class BundleMetadata(BaseModel):
    """metadata.json, typed: written once by `BundleWriter.write_metadata`, read once by `load_bundle`.

    The first five fields are what every consumer relies on (checked when a bundle loads); the
    others record how the bundle was made (informative, not required: hand-built and older bundles
    may lack them). Keys not declared here (a one-class bundle's `mode` and `anomaly`) are kept.
    """

    model_config = ConfigDict(extra="allow")

    bundle_format: int = Field(..., strict=True, description=f"Layout version of the bundle ({BUNDLE_FORMAT_VERSION}).")
    created: Optional[str] = Field(None, description="When the bundle was written (local time, ISO 8601).")
    class_names: tuple[str, str] = Field(..., description="(negative, positive) class names.")
    positive_class: str
    threshold: float = Field(..., ge=0.0, le=1.0, allow_inf_nan=False, description="Positive when probability >= threshold.")
    threshold_choice: Optional[dict[str, Any]] = Field(None, description="How the threshold was chosen (evaluation.threshold.ThresholdChoice).")
    input: InputSpec
    preprocessing: Optional[dict[str, str]] = Field(None, description="How images become the model's input (PREPROCESSING).")
    backbone: Optional[BackboneInfo] = None
    head: Optional[dict[str, Any]] = Field(None, description="The head's configuration (config.HeadConfig).")
    training: Optional[dict[str, Any]] = Field(None, description="Phases, epochs, kept model, devices, cross-validation.")
    metrics: Optional[dict[str, Any]] = Field(None, description="Test scores (the full set is in metrics.json).")
    data: Optional[list[dict[str, Any]]] = Field(None, description="Files found, skipped, dropped and used per split and class.")
    timings: Optional[dict[str, Any]] = Field(None, description="Seconds per phase.")
    versions: Optional[dict[str, Any]] = Field(None, description="keeneye's and its libraries' versions.")
    anomaly_feature: Optional[AnomalyFeatureInfo] = Field(
        None, description="head.anomaly_feature: the one-class score stacked onto the head's probability; absent otherwise.")

    def to_json(self) -> str:
        """The file's text: the fields that were given, in declaration order (NaN refused)."""
        return json.dumps(self.model_dump(mode="json", exclude_unset=True), indent=2, allow_nan=False)

    @field_validator("bundle_format")
    @classmethod
    def _supported(cls, value: int) -> int:
        if value != BUNDLE_FORMAT_VERSION:
            raise ValueError(f"bundle format {value} is not supported (expected {BUNDLE_FORMAT_VERSION})")
        return value

    @field_validator("class_names")
    @classmethod
    def _distinct(cls, value: tuple[str, str]) -> tuple[str, str]:
        if not value[0] or not value[1] or value[0] == value[1]:
            raise ValueError(f"must be two distinct non-empty names, got {list(value)}")
        return value

    @model_validator(mode="after")
    def _positive_is_a_class(self) -> "BundleMetadata":
        if self.positive_class != self.class_names[1]:
            raise ValueError(f"positive_class {self.positive_class!r} must be the second of class_names {list(self.class_names)}")
        return self


def check_metadata(metadata: Any, where: str | os.PathLike) -> BundleMetadata:
    """The typed metadata, or one BundleError listing every problem (never a KeyError later on)."""
    if not isinstance(metadata, dict):
        raise BundleError(f"{where}: metadata must be a JSON object, got {type(metadata).__name__}.")
    try:
        return BundleMetadata.model_validate(metadata)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            key = ".".join(str(part) for part in error["loc"]) or "metadata"
            problems.append(f"{key}: {error['msg']}" + (f" (got {error['input']!r})" if error["type"] != "missing" and key != "metadata" else ""))
        raise BundleError(f"{where}: invalid bundle metadata: " + "; ".join(problems) + ".") from None


@dataclass
class Bundle:
    path: Path
    model: Any  # keras.Model; None when loaded without it (load_model=False): see keras_model()
    metadata: dict

    def keras_model(self) -> Any:
        """model.keras, loaded now if the bundle was loaded without it (an ONNX engine needs no TensorFlow)."""
        if self.model is None:
            self.model = _load_keras_model(self.path / MODEL_FILE)
        return self.model

    @cached_property
    def spec(self) -> BundleMetadata:
        """The validated view of `metadata` (checked once; also for bundles built by hand)."""
        return check_metadata(self.metadata, self.path / METADATA_FILE)

    @property
    def class_names(self) -> tuple[str, str]:
        return self.spec.class_names

    @property
    def positive_class(self) -> str:
        return self.spec.positive_class

    @property
    def threshold(self) -> float:
        return self.spec.threshold

    @property
    def image_size(self) -> int:
        return self.spec.input.image_size

    @property
    def input_spec(self) -> preprocess.InputSpec:
        """How images become the model's input (resize rule, tiles), as in training (checked by `spec` first)."""
        return preprocess.InputSpec.from_dict(self.spec.input.model_dump())


def unique_run_folder(output_dir: Path, name: str) -> Path:
    """`output_dir/name`, or `name-2`, `name-3`, ... if taken: runs are never overwritten."""
    candidate = output_dir / name
    suffix = 2
    while candidate.exists():
        candidate = output_dir / f"{name}-{suffix}"
        suffix += 1
    return candidate


STAGING_PREFIX = ".staging-"
STAGING_OWNER = ".keeneye-staging.json"
#: A staging folder whose owner cannot be checked (another host, an older keeneye) is only
#: removed when it has not changed for this long: no publish takes a week.
STALE_STAGING_S = 7 * 24 * 3600.0


class StagedRun:
    """A hidden staging folder that becomes `output_dir/<name>` on `publish()`.

    It records its owner (host, pid) so that a later run can remove the staging folder of a
    publish that was killed (`clean_stale_staging`), and never one that is still being written.
    """

    def __init__(self, output_dir: Path, name: str) -> None:
        self.output_dir = Path(output_dir)
        self.name = name
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.cleaned = clean_stale_staging(self.output_dir)
        self.staging = self.output_dir / f"{STAGING_PREFIX}{name}-{uuid.uuid4().hex[:8]}"
        self.staging.mkdir()
        owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        (self.staging / STAGING_OWNER).write_text(json.dumps(owner))
        self.final: Path | None = None

    def publish(self) -> Path:
        (self.staging / STAGING_OWNER).unlink(missing_ok=True)  # not part of the bundle
        for _ in range(100):
            target = unique_run_folder(self.output_dir, self.name)
            try:
                os.rename(self.staging, target)  # atomic; fails if a non-empty target appeared meanwhile
            except OSError:
                continue
            self.final = target
            return target
        raise BundleError(f"could not publish run folder under {self.output_dir}")

    def discard(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's) or cannot tell: treat as alive
    return True


def staging_is_stale(folder: Path, now: float | None = None) -> bool:
    """True for the staging folder of a publish that cannot finish any more.

    Its owner on this host has exited (pid gone), or, when the owner cannot be checked, it has not
    changed for STALE_STAGING_S. A live writer's folder is never stale.
    """
    now = time.time() if now is None else now
    try:
        owner = json.loads((folder / STAGING_OWNER).read_text())
        if owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int):
            return owner["pid"] != os.getpid() and not _pid_alive(owner["pid"])
    except (OSError, ValueError, AttributeError):
        pass
    try:
        return now - folder.stat().st_mtime > STALE_STAGING_S
    except OSError:
        return False


def clean_stale_staging(output_dir: Path) -> list[Path]:
    """Remove the `.staging-*` folders left by killed publishes in `output_dir`; returns what was removed."""
    removed = []
    for folder in sorted(Path(output_dir).glob(f"{STAGING_PREFIX}*")):
        if folder.is_dir() and not folder.is_symlink() and staging_is_stale(folder):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


@contextmanager
def staged_run(output_dir: Path, name: str, on_error: Callable[[], None] | None = None) -> Iterator[StagedRun]:
    """Write into `run.staging`; published on success, removed on any error (then `on_error` runs too)."""
    run = StagedRun(output_dir, name)
    try:
        yield run
    except BaseException:
        run.discard()
        if on_error is not None:
            on_error()
        raise
    if run.final is None:
        run.publish()


PARTIAL_SUFFIX = ".partial"
PARTIAL_INFO = "run.json"


class PartialRun:
    """`output_dir/<name>.partial/`: the resumable state of a run whose bundle is not published yet.

    A bundle only ever appears at `output_dir/<name>` complete (built in a hidden staging folder and
    renamed, see :class:`StagedRun`); an interrupted run cannot leave anything there. What it leaves
    is this folder, created when training starts and removed once the bundle is published (or when
    writing the bundle fails: resuming covers training, not a broken bundle write):

        <name>.partial/config.json    the resolved config (run_name filled in): what --resume trains with
                       run.json       run name, fingerprint of the data rows, when it started
                       head/          checkpoints of the head phase   (keeneye.training.fit.run_phase)
                       fine_tune/     checkpoints of the fine-tuning phase

    `keeneye train --resume runs/<name>` (or `.../<name>.partial`) reloads the config, re-scans and
    re-embeds (from the embedding cache), checks the data rows are the same, skips finished phases
    and continues the unfinished one from its last finished epoch. It holds no model.keras and no
    metadata.json, so no tool mistakes it for a bundle.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    @property
    def name(self) -> str:
        return self.folder.name[: -len(PARTIAL_SUFFIX)]

    @property
    def config_path(self) -> Path:
        return self.folder / CONFIG_FILE

    def phase_dir(self, phase: str) -> Path:
        return self.folder / phase

    @staticmethod
    def folder_for(output_dir: Path, name: str) -> Path:
        return Path(output_dir) / f"{name}{PARTIAL_SUFFIX}"

    @classmethod
    def start(cls, output_dir: Path, name: str, data_fingerprint: str) -> "PartialRun":
        folder = cls.folder_for(output_dir, name)
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        try:
            folder.mkdir()
        except FileExistsError:
            raise BundleError(
                f"{folder} holds an interrupted run named {name!r} (or one still running): continue it with "
                f"`keeneye train --resume {Path(output_dir) / name}`, "
                "or delete that folder, or choose another run_name."
            ) from None
        info = {"run_name": name, "data_fingerprint": data_fingerprint, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        temporary = folder / f".{PARTIAL_INFO}.tmp"
        temporary.write_text(json.dumps(info, indent=2))
        os.replace(temporary, folder / PARTIAL_INFO)
        return cls(folder)

    @classmethod
    def find(cls, path: str | os.PathLike) -> "PartialRun":
        """The partial run for `runs/<name>` or `runs/<name>.partial`; a clear error when there is none."""
        given = Path(path).expanduser().resolve()
        folder = given if given.name.endswith(PARTIAL_SUFFIX) else given.with_name(given.name + PARTIAL_SUFFIX)
        if (folder / CONFIG_FILE).is_file() and (folder / PARTIAL_INFO).is_file():
            return cls(folder)
        if (given / METADATA_FILE).is_file():
            raise BundleError(f"{given} is a finished run (it has {METADATA_FILE}); there is nothing to resume.")
        raise BundleError(
            f"no interrupted run to resume at {given}: expected {folder} with {CONFIG_FILE} and {PARTIAL_INFO} "
            "(left by a train that stopped before publishing its bundle)."
        )

    def info(self) -> dict:
        return json.loads((self.folder / PARTIAL_INFO).read_text())

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def library_versions() -> dict:
    """keeneye's and its libraries' versions, for metadata.json."""
    import platform

    import cv2
    import keras
    import numpy as np
    import sklearn
    import tensorflow as tf

    import keeneye

    return {
        "keeneye": keeneye.__version__, "python": platform.python_version(), "tensorflow": tf.__version__,
        "keras": keras.__version__, "numpy": np.__version__, "opencv": cv2.__version__, "scikit-learn": sklearn.__version__,
    }


def default_run_name(prefix: str = "train") -> str:
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"


class BundleWriter:
    """The one writer of a bundle: its folder layout (the file names above) and metadata.json.

        with BundleWriter.staged(output_dir, run_name) as bundle:   # a hidden staging folder
            bundle.save_model(classifier)
            bundle.save_table(DROPPED_FILE, dropped)
            ...
            bundle.write_metadata(BundleMetadata(...))              # last: marks the bundle complete
            final = bundle.publish()                                # renamed into place, complete

    `BundleWriter(folder)` writes into an existing folder (an export adding model.onnx to a bundle).
    """

    def __init__(self, folder: Path, run: StagedRun | None = None) -> None:
        self.folder = Path(folder)
        self.run = run

    @classmethod
    @contextmanager
    def staged(cls, output_dir: Path, name: str, on_error: Callable[[], None] | None = None) -> Iterator["BundleWriter"]:
        """A writer into a staging folder: published on success (if not yet), removed on any error (`on_error` runs too)."""
        with staged_run(output_dir, name, on_error=on_error) as run:
            yield cls(run.staging, run)

    @property
    def cleaned(self) -> list[Path]:
        """Staging folders of killed publishes removed when this one started."""
        return self.run.cleaned if self.run is not None else []

    def file(self, name: str) -> Path:
        return self.folder / name

    def save_model(self, model: Any) -> Path:
        """model.keras (a keras.Model that takes raw RGB uint8 images)."""
        model.save(self.folder / MODEL_FILE)
        return self.folder / MODEL_FILE

    def save_config(self, cfg: Any) -> Path:
        """config.json: the run's resolved config (a config.Config)."""
        save_config(cfg, self.folder / CONFIG_FILE)
        return self.folder / CONFIG_FILE

    def save_table(self, name: str, frame: Any) -> Path:
        """A CSV table of the bundle (history, manifest, dropped and skipped files, data counts)."""
        frame.to_csv(self.folder / name, index=False)
        return self.folder / name

    def save_anomaly_feature(self, extractor: Any, bank_features: Any) -> None:
        """head.anomaly_feature's parts: the patch feature graph (a keras.Model) and the memory bank (M, D) float32."""
        import numpy as np

        extractor.save(self.folder / ANOMALY_FEATURE_MODEL_FILE)
        np.save(self.folder / ANOMALY_FEATURE_BANK_FILE, np.asarray(bank_features, np.float32), allow_pickle=False)

    def anomaly_feature_files(self) -> dict:
        """AnomalyFeatureInfo's file fields: the stored ONNX patch graph (when it was written) and each file's sha256,
        so a consumer can tell a stored file from a replaced one without reconverting or reloading anything."""
        names = [ANOMALY_FEATURE_MODEL_FILE, ANOMALY_FEATURE_ONNX_FILE, ANOMALY_FEATURE_BANK_FILE]
        hashes = {name: sha256_of_file(self.folder / name) for name in names if (self.folder / name).is_file()}
        return {"onnx_file": ANOMALY_FEATURE_ONNX_FILE if ANOMALY_FEATURE_ONNX_FILE in hashes else None, "sha256": hashes}

    def write_onnx(self, data: bytes, record: dict) -> Path:
        """model.onnx and its verification record (model.onnx.verification.json), each written atomically."""
        write_atomic(self.folder / ONNX_FILE, data)
        write_atomic(self.folder / (ONNX_FILE + VERIFICATION_SUFFIX), json.dumps(record, indent=2).encode())
        return self.folder / ONNX_FILE

    def write_metadata(self, metadata: BundleMetadata | dict) -> Path:
        """metadata.json, checked against the schema load_bundle applies. Written last: its presence marks a complete bundle."""
        if isinstance(metadata, BundleMetadata):
            text = metadata.to_json()
        else:  # a plain dict (one-class bundles): checked, written as given
            check_metadata(metadata, self.folder / METADATA_FILE)
            text = json.dumps(metadata, indent=2, allow_nan=False)
        write_atomic(self.folder / METADATA_FILE, text.encode())
        return self.folder / METADATA_FILE

    def publish(self) -> Path:
        """Rename the staging folder into place (`output_dir/<name>`, or `<name>-2`, ... if taken)."""
        if self.run is None:
            raise BundleError(f"{self.folder} is not a staged bundle: nothing to publish.")
        self.folder = self.run.publish()
        return self.folder


def write_metadata(folder: Path, metadata: BundleMetadata | dict) -> None:
    """metadata.json into `folder` (see BundleWriter.write_metadata; kept for the one-class trainer)."""
    BundleWriter(folder).write_metadata(metadata)


def load_bundle(path: str | os.PathLike, load_model: bool = True) -> Bundle:
    """Load a bundle folder; a clear error if it is missing or incomplete."""
    folder = Path(path).expanduser().resolve()
    if not folder.is_dir():
        raise BundleError(f"model bundle {folder} does not exist (expected a run folder such as runs/<name>).")
    metadata_path = folder / METADATA_FILE
    model_path = folder / MODEL_FILE
    if not metadata_path.is_file() or not model_path.is_file():
        missing = [p.name for p in (model_path, metadata_path) if not p.is_file()]
        raise BundleError(f"{folder} is not a complete keeneye bundle: missing {', '.join(missing)}.")
    try:
        metadata = json.loads(metadata_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BundleError(f"{metadata_path}: unreadable metadata ({exc}).") from None
    check_metadata(metadata, metadata_path)
    check_model_file(model_path)
    return Bundle(folder, _load_keras_model(model_path) if load_model else None, metadata)


def _load_keras_model(model_path: Path) -> Any:
    import keras

    try:
        return keras.saving.load_model(model_path, compile=False)
    except Exception as exc:
        raise BundleError(f"{model_path}: could not load the model ({type(exc).__name__}: {exc}).") from None


def check_model_file(model_path: Path) -> None:
    """A `.keras` file is a zip archive: a damaged one is named as such, before Keras says "File not found".

    Reads the archive's index and CRC-checks every member (a few ms for a MobileNetV2 bundle).
    """
    try:
        with zipfile.ZipFile(model_path) as archive:
            bad_member = archive.testzip()
            names = set(archive.namelist())
    except (OSError, zipfile.BadZipFile, EOFError, ValueError) as exc:
        raise BundleError(f"{model_path} is corrupt: not a readable Keras archive ({exc}); retrain or restore the bundle.") from None
    if bad_member is not None:
        raise BundleError(f"{model_path} is corrupt: member {bad_member} fails its checksum; retrain or restore the bundle.")
    if "config.json" not in names:
        raise BundleError(f"{model_path} is corrupt: not a Keras archive (no config.json inside); retrain or restore the bundle.")
