"""Batch inference on Ray Data: score an archive on every core (and machine) of a Ray cluster.

The pipeline is Ray's standard offline-inference shape: a dataset of paths, `map_batches` on an
actor pool whose callable class loads the bundle once per actor (the same `Predictor`, decode and
engine choice as local predict, so the numbers are the same), results streamed back to the driver.

Exactly once and resume: the driver, not the workers, writes results. Ray retries the batches of an
actor that dies, and only completed batches reach the driver, which appends each one to a part file
beside the output (atomic rename) and finally writes the output with one row per input. A rerun with
the same output reads the parts and the finished output first and scores only what is missing.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pandas as pd

from keeneye.bundle import load_bundle
from keeneye.runtime.choice import bundle_onnx_engine, make_feature_engine
from keeneye.runtime.engines import EngineError, onnxruntime_available
from keeneye.inference.anomaly import has_anomaly_feature, make_stacked_engine
from keeneye.inference.predictor import PREDICTION_COLUMNS, Predictor, expand_inputs
from keeneye.runtime.ray_pool import (
    RayError, connect, cpus_per_actor, gpus_per_actor, map_on_actor_pool, node_cpus, require_ray,
)


class BundleScorer:
    """The per-actor callable: loads the bundle once, then scores batches of paths.

    Reading and decoding happen here too (in the predictor's decode threads), so a cluster needs no
    extra stage and the Arrow blocks that travel hold only paths and results, not pixels. On CPU the
    actor runs ONNX Runtime on the bundle's verified model.onnx (or the cached conversion) without
    loading the Keras model: TensorFlow is not even imported, so an actor starts in about a second.
    `threads` is the CPUs the actor reserved: its ONNX Runtime threads, and one more decode thread
    (the rule of `decode_workers`, for the actor's share of the cores rather than the machine's).
    """

    def __init__(self, run_dir: str, engine: str = "auto", batch_size: int = 32, threads: int | None = None, gpu: bool = False) -> None:
        bundle = load_bundle(run_dir, load_model=False)
        if engine != "keras" and not gpu and onnxruntime_available():
            try:
                onnx = bundle_onnx_engine(bundle, threads=threads)
                if has_anomaly_feature(bundle):  # model.onnx is the supervised part; the stored patch graph is the other
                    onnx = make_stacked_engine(bundle, onnx, "onnx", threads)
            except EngineError:  # no usable ONNX file yet: the full load below converts (and caches) it
                pass
            else:
                self.predictor = Predictor(bundle, engine=onnx, batch_size=batch_size, workers=threads and threads + 1)
                return
        self.predictor = Predictor(load_bundle(run_dir), engine=engine, batch_size=batch_size, threads=threads, workers=threads and threads + 1)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        frame = self.predictor.predict_paths([str(path) for path in batch["path"]])
        return {
            "path": frame["path"].to_numpy(dtype=object),
            "probability": frame["probability"].to_numpy(dtype=np.float64),
            "label": frame["label"].to_numpy(dtype=object),
            "error": frame["error"].to_numpy(dtype=object),
        }


def parts_folder(output: Path) -> Path:
    """Where finished batches wait until the output is written (kept after a crash, for resume)."""
    return output.with_name(output.name + ".parts")


def read_done(output: Path) -> pd.DataFrame:
    """Rows already scored for this output: the finished output file plus any part files."""
    frames = []
    if output.is_file():
        frames.append(read_predictions(output))
    parts = parts_folder(output)
    if parts.is_dir():
        frames.extend(pd.read_parquet(part) for part in sorted(parts.glob("*.parquet")))
    if not frames:
        return pd.DataFrame(columns=PREDICTION_COLUMNS)
    done = pd.concat(frames, ignore_index=True).reindex(columns=PREDICTION_COLUMNS)
    return done.drop_duplicates("path", keep="first")


def read_predictions(path: Path) -> pd.DataFrame:
    """A predictions file written by keeneye (Parquet, or CSV by name)."""
    if path.suffix.lower() == ".csv":
        return pd.read_csv(path, dtype={"path": str, "label": object, "error": object})
    return pd.read_parquet(path)


def write_output(frame: pd.DataFrame, output: Path) -> None:
    """Parquet, or CSV when the name ends in .csv; written to a temporary name, then renamed."""
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.with_name(f".{output.name}.{uuid.uuid4().hex}.tmp")
    if output.suffix.lower() == ".csv":
        frame.to_csv(temporary, index=False)
    else:
        frame.to_parquet(temporary, index=False)
    os.replace(temporary, output)


def _append_part(parts: Path, batch: pd.DataFrame) -> None:
    parts.mkdir(parents=True, exist_ok=True)
    temporary = parts / f".{uuid.uuid4().hex}.tmp"
    batch.to_parquet(temporary, index=False)
    os.replace(temporary, parts / f"{uuid.uuid4().hex}.parquet")


def _score(
    run_dir: str, paths: list[str], actors: int, engine: str, batch_size: int, parts: Path | None,
    progress: Callable[[int], None] | None,
) -> list[pd.DataFrame]:
    """Run the actor pool over `paths`; each finished batch is saved to `parts` as it arrives."""
    ray = require_ray()
    gpus = gpus_per_actor(actors)
    cpus = cpus_per_actor(actors, node_cpus())
    kwargs = {"run_dir": run_dir, "engine": engine, "batch_size": batch_size, "threads": None if gpus else cpus, "gpu": bool(gpus)}
    rows = [{"path": path} for path in paths]
    scored = map_on_actor_pool(BundleScorer, rows, actors, batch_size, kwargs, gpus=gpus, cpus=1 if gpus else cpus, whole_blocks=True)
    results: list[pd.DataFrame] = []
    try:
        for batch in scored:
            batch = batch.reindex(columns=PREDICTION_COLUMNS)
            if parts is not None:
                _append_part(parts, batch)
            results.append(batch)
            if progress:
                progress(len(batch))
    except ray.exceptions.RayError as exc:
        kept = f"; the {sum(map(len, results))} rows scored so far are kept in {parts} and a rerun resumes" if parts else ""
        raise RayError(f"the Ray job failed: {exc}{kept}") from None
    return results


def predict_ray(
    run_dir: str | os.PathLike, inputs: Iterable[str | os.PathLike], output: str | os.PathLike | None = None,
    actors: int = 2, engine: str = "auto", batch_size: int = 32, address: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> pd.DataFrame:
    """Score files, folders or globs on a Ray cluster: one row per input, in input order.

    With `output` (.parquet, or .csv), rows already in it or in its part files are not scored again.
    """
    if actors < 1:
        raise RayError(f"actors must be at least 1 (got {actors}).")
    if output is not None and Path(output).suffix.lower() not in (".parquet", ".csv"):
        raise RayError(f"the output of a Ray job is a .parquet or .csv file (got {output}).")
    require_ray()
    bundle_dir = load_bundle(run_dir, load_model=False).path  # a bad bundle fails here, not in every actor
    paths, problems = expand_inputs(inputs)
    paths = list(dict.fromkeys(paths))  # every input once, even when named twice
    target = Path(output) if output is not None else None
    done = read_done(target) if target is not None else pd.DataFrame(columns=PREDICTION_COLUMNS)
    known = set(done["path"])
    todo = [path for path in paths if path not in known]
    frames = [done]
    if todo:
        connect(address)
        frames += _score(str(Path(bundle_dir).resolve()), todo, actors, engine, batch_size, parts_folder(target) if target else None, progress)
    frame = _in_input_order(frames, paths, problems)
    if target is not None:
        write_output(frame, target)
        _remove_parts(parts_folder(target))
    return frame


def _in_input_order(frames: list[pd.DataFrame], paths: list[str], problems: list[dict]) -> pd.DataFrame:
    """Scored rows for `paths` in their order (each once), then the inputs that were not used."""
    scored = pd.concat([f for f in frames if len(f)], ignore_index=True) if any(len(f) for f in frames) else pd.DataFrame(columns=PREDICTION_COLUMNS)
    scored = scored.reindex(columns=PREDICTION_COLUMNS).drop_duplicates("path", keep="first").set_index("path")
    rows = scored.reindex(pd.Index(paths, name="path")).reset_index()
    lost = rows["probability"].isna() & rows["error"].isna()
    rows.loc[lost, "error"] = "not scored (no result came back from the cluster)"
    extra = pd.DataFrame(problems, columns=["path", "error"]).reindex(columns=PREDICTION_COLUMNS)
    frame = pd.concat([rows, extra], ignore_index=True) if len(extra) else rows
    frame["probability"] = frame["probability"].astype(np.float64)
    frame["label"] = frame["label"].astype(object).where(frame["label"].notna(), None)
    frame["error"] = frame["error"].astype(object).where(frame["error"].notna(), None)
    return frame


def _remove_parts(parts: Path) -> None:
    if parts.is_dir():
        for part in parts.iterdir():
            part.unlink()
        parts.rmdir()


class FeatureEngineFactory:
    """Builds the training embedding engine inside a Ray actor: the frozen backbone, once per actor.

    Picklable (plain settings, no model), so the driver never ships a network: each actor builds the
    same extractor as a local train (weights file checked by sha256 in the cache key) and the same
    FeatureEngine, which converts to ONNX Runtime once (kept in the cache folder, shared by the actors
    of one machine) and checks it against Keras on its first batch, exactly as the local pass does.
    """

    def __init__(self, alpha: float, image_size: int, weights, features: str, n_tiles: int | None,
                 cache_folder: str | None, engine: str = "auto", views: int = 1, texture: tuple | None = None) -> None:
        self.alpha, self.image_size, self.weights, self.features = alpha, image_size, weights, features
        self.n_tiles, self.cache_folder, self.engine, self.views = n_tiles or 1, cache_folder, engine, views
        self.texture = texture  # "multi+cov": the driver's fitted (kernel, bias), so every actor computes its features

    def __call__(self) -> Callable[[np.ndarray], np.ndarray]:
        from keeneye.model.backbone import build_input_extractor, set_texture_projection

        extractor = build_input_extractor(self.alpha, self.image_size, self.weights, self.features, self.n_tiles, self.views)
        if self.texture is not None:
            set_texture_projection(extractor, *self.texture)
        return make_feature_engine(extractor, engine=self.engine, cache_folder=self.cache_folder)
