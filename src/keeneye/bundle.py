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
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from keeneye.data.preprocess import InputSpec
from keeneye.errors import BundleError

MODEL_FILE = "model.keras"
METADATA_FILE = "metadata.json"
CONFIG_FILE = "config.json"
BUNDLE_FORMAT_VERSION = 1


@dataclass
class Bundle:
    path: Path
    model: Any  # keras.Model
    metadata: dict

    @property
    def class_names(self) -> tuple[str, str]:
        negative, positive = self.metadata["class_names"]
        return negative, positive

    @property
    def positive_class(self) -> str:
        return self.metadata["positive_class"]

    @property
    def threshold(self) -> float:
        return float(self.metadata["threshold"])

    @property
    def image_size(self) -> int:
        return int(self.metadata["input"]["image_size"])

    @property
    def input_spec(self) -> InputSpec:
        """How images become the model's input (resize rule, tiles), as in training."""
        return InputSpec.from_dict(self.metadata["input"])


def unique_run_folder(output_dir: Path, name: str) -> Path:
    """`output_dir/name`, or `name-2`, `name-3`, ... if taken: runs are never overwritten."""
    candidate = output_dir / name
    suffix = 2
    while candidate.exists():
        candidate = output_dir / f"{name}-{suffix}"
        suffix += 1
    return candidate


class StagedRun:
    """A hidden staging folder that becomes `output_dir/<name>` on `publish()`."""

    def __init__(self, output_dir: Path, name: str) -> None:
        self.output_dir = Path(output_dir)
        self.name = name
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.staging = self.output_dir / f".staging-{name}-{uuid.uuid4().hex[:8]}"
        self.staging.mkdir()
        self.final: Path | None = None

    def publish(self) -> Path:
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


def default_run_name(prefix: str = "train") -> str:
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"


def write_metadata(folder: Path, metadata: dict) -> None:
    """Written last: its presence marks a complete bundle."""
    temporary = folder / f".{METADATA_FILE}.tmp"
    temporary.write_text(json.dumps(metadata, indent=2, allow_nan=False))
    os.replace(temporary, folder / METADATA_FILE)


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
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"{metadata_path}: unreadable metadata ({exc}).") from None
    if metadata.get("bundle_format") != BUNDLE_FORMAT_VERSION:
        raise BundleError(f"{folder}: bundle format {metadata.get('bundle_format')!r} is not supported (expected {BUNDLE_FORMAT_VERSION}).")
    model = None
    if load_model:
        import keras

        try:
            model = keras.saving.load_model(model_path, compile=False)
        except Exception as exc:
            raise BundleError(f"{model_path}: could not load the model ({type(exc).__name__}: {exc}).") from None
    return Bundle(folder, model, metadata)
