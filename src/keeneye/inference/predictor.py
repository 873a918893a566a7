"""Predict from a model bundle: images or paths in, probabilities and labels out."""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd

from keeneye.bundle import Bundle, load_bundle
from keeneye.data.scan import entry_problem, skip_reason, walk_files
from keeneye.data.video import is_video
from keeneye.model.decision import predict_labels
from keeneye.inference.anomaly import has_anomaly_feature, is_anomaly_bundle, make_anomaly_engine, make_stacked_engine
from keeneye.runtime import choice
from keeneye.runtime.batches import decode_workers, first_column, run_engine

PREDICTION_COLUMNS = ["path", "probability", "label", "error"]
ENGINES = choice.ENGINE_CHOICES  # ("auto", "openvino", "onnx", "keras")


def make_engine(model, engine: str = "auto", bundle: Bundle | None = None, threads: int | None = None):
    """The engine that runs the bundle's model: 'auto' = the fastest CPU engine on the bundle's verified
    model.onnx (OpenVINO, else ONNX Runtime), Keras on GPU or as the fallback; see runtime/choice.py.
    An anomaly bundle (mode "anomaly") gets an AnomalyEngine: the same contract, scores instead of probabilities;
    a bundle trained with head.anomaly_feature a StackedEngine (the classifier's engine + the one-class score)."""
    if is_anomaly_bundle(bundle):
        return make_anomaly_engine(bundle, engine)
    classifier = choice.make_engine(model, engine, bundle=bundle, threads=threads)
    return make_stacked_engine(bundle, classifier, engine, threads) if has_anomaly_feature(bundle) else classifier


def expand_inputs(inputs: Iterable[str | os.PathLike], videos: bool = False) -> tuple[list[str], list[dict]]:
    """Files, folders (recursive) and glob patterns -> (image paths, rows for inputs not used).

    Inside folders and globs, files that are not images by name, broken symbolic links and other
    entries that are not regular files are reported as skipped; a file named explicitly is always tried.
    Video files are kept only with `videos` (callers that stream them, see inference/video.py);
    otherwise they are reported as not predicted.
    """
    paths: list[str] = []
    problems: list[dict] = []

    def add_found(path: Path) -> None:
        reason = skip_reason(path)
        if reason is None:
            paths.append(str(path))
        else:
            problems.append({"path": str(path), "error": f"skipped: {reason}"})

    def keep(found: list[str]) -> list[str]:
        if videos:
            return found
        for path in (p for p in found if is_video(p)):
            problems.append({"path": path, "error": "skipped: a video file (keeneye predict samples its frames)"})
        return [p for p in found if not is_video(p)]

    for item in inputs:
        text = str(item)
        path = Path(text).expanduser()
        if path.is_symlink() and not path.exists():  # named explicitly but broken (a named link to a folder is followed)
            problems.append({"path": text, "error": f"skipped: {entry_problem(path)}"})
            continue
        if path.is_dir():
            files, unusable = walk_files(path)
            for found, reason in unusable:
                problems.append({"path": str(found.absolute()), "error": f"skipped: {reason}"})
            for found in files:
                add_found(found.resolve())
        elif path.is_file():
            paths.append(str(path.resolve()))
        elif glob.has_magic(text):
            matches = [Path(m) for m in sorted(glob.glob(os.path.expanduser(text), recursive=True))]
            unusable = [(m, entry_problem(m)) for m in matches if not m.is_file() and not m.is_dir()]
            files = [m.resolve() for m in matches if m.is_file()]
            if not files and not unusable:
                problems.append({"path": text, "error": "no files match this pattern"})
            for found, reason in unusable:
                problems.append({"path": str(found.absolute()), "error": f"skipped: {reason or 'not a regular file'}"})
            for found in files:
                add_found(found)
        else:
            problems.append({"path": text, "error": "no such file or folder"})
    return keep(paths), problems


class Predictor:
    """Runs a bundle's model on images; `threshold` and labels come from the bundle's metadata.

    A sample is predicted positive when its probability is >= the threshold (everywhere in keeneye).
    """

    def __init__(
        self, bundle: Bundle, engine: str | Callable[[np.ndarray], np.ndarray] = "auto", batch_size: int = 32,
        workers: int | None = None, threads: int | None = None,
    ) -> None:
        """`engine`: a name (see ENGINES), or an engine already made (e.g. ONNX Runtime for a bundle
        loaded without its Keras model, so TensorFlow is never imported)."""
        self.bundle = bundle
        self.engine = make_engine(bundle.model, engine, bundle=bundle, threads=threads) if isinstance(engine, str) else engine
        self.batch_size = batch_size
        self.workers = workers or decode_workers()
        self.input_spec = bundle.input_spec  # resize rule and tiles, exactly as in training

    @classmethod
    def from_bundle(
        cls, path: str | os.PathLike, engine: str = "auto", batch_size: int = 32, threads: int | None = None
    ) -> "Predictor":
        """`threads`: ONNX Runtime threads (default: the physical cores; 1 per actor on a Ray pool).

        An ONNX engine (auto on a CPU, onnx, openvino) on the bundle's verified model.onnx (or the copy
        converted earlier) starts without model.keras: TensorFlow is not imported, which was most of a
        `keeneye predict` command's start (bundle.keras_model() loads it later if something needs it).
        When that engine cannot start so, the Keras model is loaded and the usual choice runs, with
        its conversion and fallbacks (runtime/choice.py).
        """
        if engine != "keras":
            try:
                return cls(load_bundle(path, load_model=False), engine=engine, batch_size=batch_size, threads=threads)
            except choice.EngineError:
                pass  # no verified ONNX model yet, or no ONNX engine here: the Keras model is needed
        return cls(load_bundle(path), engine=engine, batch_size=batch_size, threads=threads)

    @property
    def engine_name(self) -> str:
        return self.engine.name

    def label_for(self, probabilities: np.ndarray) -> np.ndarray:
        return np.asarray(self.bundle.class_names, dtype=object)[predict_labels(probabilities, self.bundle.threshold)]

    def predict_images(self, images: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
        """Probabilities for RGB uint8 images of any size (resized or tiled as in training).

        An array already of the model's input shape (`input_spec.shape`) is taken as prepared.
        """
        spec = self.input_spec
        batch = np.stack([spec.prepare(image) for image in images]) if len(images) else spec.empty_batch()
        outputs = [self.engine(batch[i : i + self.batch_size]) for i in range(0, len(batch), self.batch_size)]
        return np.concatenate(outputs).reshape(-1) if outputs else np.empty(0, np.float32)

    def predict_bytes(self, data: bytes) -> float:
        """Probability for one encoded image (raises DecodeError if it cannot be decoded)."""
        return float(self.predict_images([self.input_spec.from_bytes(data)])[0])

    def predict_paths(self, paths: Sequence[str], progress: Callable[[int], None] | None = None) -> pd.DataFrame:
        """One row per path, in order: probability and label, or the reason it failed."""
        run = run_engine(self.engine, list(paths), self.input_spec, self.batch_size, self.workers, progress)
        probabilities = np.full(len(paths), np.nan) if run.outputs is None else first_column(run.outputs).astype(np.float64)
        errors: list[str | None] = [run.failures.get(key) for key in range(len(paths))]
        ok = ~np.isnan(probabilities)
        labels = np.where(ok, self.label_for(np.nan_to_num(probabilities)), None)
        return pd.DataFrame(
            {"path": list(paths), "probability": probabilities, "label": labels, "error": errors},
            columns=PREDICTION_COLUMNS,
        )

    def predict(self, inputs: Iterable[str | os.PathLike], progress: Callable[[int], None] | None = None) -> pd.DataFrame:
        """Files, folders or globs -> one row per file found (errors included, never silently dropped)."""
        paths, problems = expand_inputs(inputs)
        return with_problem_rows(self.predict_paths(paths, progress), problems)


def with_problem_rows(frame: pd.DataFrame, problems: list[dict]) -> pd.DataFrame:
    """Append the inputs that were not predicted (from `expand_inputs`) as rows with their reason."""
    if not problems:
        return frame
    extra = pd.DataFrame(problems).reindex(columns=PREDICTION_COLUMNS)
    return pd.concat([frame, extra], ignore_index=True) if len(frame) else extra
