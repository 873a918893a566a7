"""The one-class training phase (``mode: "anomaly"``): PatchCore from good images only.

    good training images --patch features--> coreset --> memory bank (memory_bank.npy)
    held-out validation images --scores--> threshold (false-alarm quantile, or the F1 rule with defects)
    testing images --scores--> metrics, report; the bundle = feature graph (model.keras, model.onnx) + bank

Labelled defects are never put in the bank: those in validation may choose the threshold
(``anomaly.threshold_rule``), those in testing are evaluated. Scores are normalised to
``s / (s + t)`` so that 0.5 is the threshold and every consumer of a bundle (Predictor,
evaluate, serve) reads them like a classifier's probabilities.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
from rich.console import Console
from rich.markup import escape

from keeneye.bundle import BUNDLE_FORMAT_VERSION, CONFIG_FILE, MODEL_FILE, default_run_name, staged_run, write_metadata
from keeneye.config import Config, save_config
from keeneye.data.decode import load_image, resize_square
from keeneye.data.manifest import load_data
from keeneye.data.split import assign_splits
from keeneye.errors import DataError
from keeneye.evaluation.metrics import format_metrics_table
from keeneye.evaluation.outputs import write_evaluation
from keeneye.evaluation.report import THUMBNAIL_SIDE, write_run_report
from keeneye.evaluation.threshold import choose_threshold
from keeneye.data.files import sha256_of_file, write_atomic
from keeneye.model.backbone import resolve_weights
from keeneye.model.patchcore import (
    BANK_FILE, AnomalyEngine, NORMALISATION, PatchBank, build_patch_extractor, coreset_size, fit_patch_transform, greedy_coreset,
    ivf_lists, normalise_scores, overlay_anomaly_map, raw_patch_model, raw_threshold_from_normalised, set_patch_transform,
)
from keeneye.runtime.batches import iter_batches
from keeneye.runtime.choice import make_feature_engine
from keeneye.runtime.convert import ONNX_FILE, convert_and_verify, convert_to_onnx, generated_images, onnx_verification_record, verification_path

__all__ = ["AnomalyThreshold", "AnomalyTrainResult", "choose_anomaly_threshold", "collect_patches", "train_anomaly"]

PREPROCESSING = {
    "input": "RGB uint8, any size; resized to image_size x image_size (as in supervised mode)",
    "inside_model": "x / 127.5 - 1 (MobileNetV2 preprocess_input), part of model.keras (the patch feature graph)",
    "decision": "positive when the normalised anomaly score s / (s + t) >= 0.5, i.e. raw score s >= raw threshold t",
}


@dataclass
class AnomalyThreshold:
    """The raw-score threshold and how it was chosen (recorded in metadata.json)."""

    raw: float
    method: str  # "false_alarm_rate" | "max_f1_on_validation"
    validation_f1: float | None
    warning: str | None = None
    n_good: int = 0
    n_defect: int = 0

    def to_dict(self) -> dict:
        return {"threshold": 0.5, "raw_threshold": self.raw, "method": f"anomaly_{self.method}",
                "validation_f1": self.validation_f1, "warning": self.warning,
                "validation_good": self.n_good, "validation_defects": self.n_defect}


@dataclass
class AnomalyTrainResult:
    run_dir: Path
    metrics: dict
    threshold: float
    class_names: tuple[str, str]
    counts: pd.DataFrame
    raw_threshold: float
    timings: dict = field(default_factory=dict)


# --- the pieces --------------------------------------------------------------------------------


def collect_patches(
    paths: Sequence[str], features: Callable[[np.ndarray], np.ndarray], image_size: int, batch_size: int = 16,
    progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, dict[int, str]]:
    """All patch features of the readable images, flattened to (n_patches, D); failures by position.

    The array grows by doubling, so memory stays near the bank's raw size (what peak RSS measures).
    """
    rows = None
    filled = 0
    failures: dict[int, str] = {}
    for keys, batch, failed in iter_batches(enumerate(paths), image_size, batch_size):
        failures.update(failed)
        if keys:
            patches = np.asarray(features(batch), dtype=np.float32)
            flat = patches.reshape(-1, patches.shape[-1])
            if rows is None:
                rows = np.empty((max(len(flat), len(flat) // len(keys) * len(paths)), flat.shape[1]), np.float32)
            if filled + len(flat) > len(rows):
                rows = np.concatenate([rows, np.empty_like(rows)])
            rows[filled : filled + len(flat)] = flat
            filled += len(flat)
        if progress:
            progress(len(keys) + len(failed))
    return (rows[:filled] if rows is not None else np.empty((0, 0), np.float32)), failures


def distance_maps_for(
    paths: Sequence[str], engine: AnomalyEngine, image_size: int, batch_size: int = 16,
    progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray | None, np.ndarray, dict[int, str]]:
    """(N, H, W) patch distance maps, raw image scores (N,) (NaN rows for unreadable files), failures by position."""
    maps = None
    scores = np.full(len(paths), np.nan, np.float64)
    failures: dict[int, str] = {}
    for keys, batch, failed in iter_batches(enumerate(paths), image_size, batch_size):
        failures.update(failed)
        if keys:
            found, raw = engine.distances_and_scores(batch)
            if maps is None:
                maps = np.full((len(paths), *found.shape[1:]), np.nan, np.float32)
            maps[keys] = found
            scores[keys] = raw
        if progress:
            progress(len(keys) + len(failed))
    return maps, scores, failures


def choose_anomaly_threshold(
    good_scores: np.ndarray, defect_scores: np.ndarray, rule: str, false_alarm_rate: float, min_per_class: int,
) -> AnomalyThreshold:
    """The raw threshold from held-out scores: a false-alarm quantile of the good ones, or the F1 rule.

    The F1 rule is keeneye's own (evaluation.threshold.choose_threshold), run on ``s / (s + 1)``
    (monotone, in [0, 1)) and mapped back to a raw score. "auto" uses it when validation holds at
    least ``min_per_class`` images of both kinds.
    """
    good = np.asarray(good_scores, dtype=np.float64)
    defects = np.asarray(defect_scores, dtype=np.float64)
    y = np.r_[np.zeros(len(good), int), np.ones(len(defects), int)]
    scores = np.r_[good, defects]
    enough = len(good) >= min_per_class and len(defects) >= min_per_class
    warning = None
    if rule == "max_f1" and not enough:
        warning = (f"threshold_rule max_f1 needs {min_per_class} good and {min_per_class} defective validation images, "
                   f"found {len(good)} and {len(defects)}: the false-alarm-rate rule is used instead.")
    if rule in ("max_f1", "auto") and enough:
        choice = choose_threshold(y, scores / (scores + 1.0), min_per_class=min_per_class)
        raw = max(raw_threshold_from_normalised(choice.threshold), 1e-9)
        return AnomalyThreshold(raw, "max_f1_on_validation", choice.validation_f1, None, len(good), len(defects))
    if not len(good):
        raise DataError('mode "anomaly" needs held-out good images to set the threshold: the validation split has none '
                        "(raise training.validation_fraction, or give a validation split in the manifest).")
    raw = max(float(np.quantile(good, 1.0 - false_alarm_rate)), 1e-9)
    if len(good) * false_alarm_rate < 1 and warning is None:
        warning = (f"only {len(good)} good validation images for a false-alarm rate of {false_alarm_rate}: the threshold "
                   "sits at their highest score region and is uncertain.")
    f1 = None
    if len(defects):
        f1 = choose_threshold(y, normalise_scores(scores, raw), fixed=0.5).validation_f1
    return AnomalyThreshold(raw, "false_alarm_rate", f1, warning, len(good), len(defects))


def build_bank(patches: np.ndarray, share: float, max_size: int, seed: int, method: str = "exact", nprobe: int = 16) -> PatchBank:
    """The memory bank: the greedy k-center coreset of the good training patches, searched by ``method``."""
    count = coreset_size(len(patches), share, max_size)
    if count < len(patches):
        patches = patches[greedy_coreset(patches, count, seed=seed)]
    return PatchBank(patches, method=method, nprobe=nprobe)


# --- the bundle --------------------------------------------------------------------------------


def write_feature_onnx(folder: Path, extractor, features, bank: PatchBank, raw_threshold: float, images: np.ndarray,
                       neighbours: int = 1, top_k: int = 1) -> str:
    """`model.onnx` (the patch feature graph) + its verification record, when its scores agree with Keras.

    The check is on what a user sees, the normalised score (tolerance as for a classifier's
    probability), not on raw features. Never raises: without model.onnx predict converts on first use.
    """
    try:
        data = features.onnx_model() if hasattr(features, "onnx_model") else None
        check = convert_and_verify(extractor, images, convert=lambda: data or convert_to_onnx(extractor, output_name="patches"),
                                   wrap=lambda engine: AnomalyEngine(engine, bank, raw_threshold, neighbours=neighbours, top_k=top_k))
        difference = check.max_diff
        record = onnx_verification_record(
            sha256_of_file(folder / MODEL_FILE), difference, len(images), "testing images (normalised scores)", check.seconds)
        if not record["passed"]:
            return f"[yellow]warning:[/] model.onnx not written: its scores differ from Keras by {difference:.1e}."
        write_atomic(folder / ONNX_FILE, check.data)
        write_atomic(verification_path(folder / ONNX_FILE), json.dumps(record, indent=2).encode())
        return f"model.onnx (patch feature graph) written; max score difference from Keras {difference:.1e}"
    except Exception as exc:  # noqa: BLE001 - the bundle is complete without it
        return escape(f"warning: model.onnx not written ({type(exc).__name__}: {exc}).")


def _counts(manifest: pd.DataFrame, failures: pd.Series, negative: str) -> pd.DataFrame:
    """Per split and class: found, dropped (unreadable), used (bank, threshold or evaluation)."""
    frame = manifest.assign(dropped=manifest.index.isin(failures.index))
    frame["used"] = ~frame["dropped"] & ((frame["split"] != "training") | (frame["label"] == negative))
    counts = frame.groupby(["split", "label"]).agg(found=("path", "size"), dropped=("dropped", "sum"), used=("used", "sum"))
    return counts.astype(int).reset_index()


def _gallery_explainer(engine: AnomalyEngine, size: int):
    """Anomaly-map overlays for the report's mistake gallery."""
    def explain(paths: list[str]) -> list[np.ndarray | None]:
        images = [load_image(p) for p in paths]
        maps, _ = engine.maps(np.stack([resize_square(i, size) for i in images]))
        return [overlay_anomaly_map(resize_square(i, THUMBNAIL_SIDE), m, engine.raw_threshold) for i, m in zip(images, maps)]

    return explain


def _score_name(anomaly) -> str:
    name = "largest patch distance" if anomaly.score_top_k == 1 else f"mean of the {anomaly.score_top_k} largest patch distances"
    if anomaly.score_neighbours > 1:
        name += f", re-weighted over {anomaly.score_neighbours} bank neighbours (PatchCore eq. 7)"
    return name


def _metadata(cfg: Config, class_names, weights, threshold: AnomalyThreshold, bank: PatchBank, grid, n_patches: int,
              metrics: dict, counts: pd.DataFrame, timings: dict, versions: dict) -> dict:
    anomaly = cfg.anomaly
    return {
        "bundle_format": BUNDLE_FORMAT_VERSION, "mode": "anomaly", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "class_names": list(class_names), "positive_class": class_names[1], "threshold": 0.5,
        "threshold_choice": threshold.to_dict(),
        "input": {"image_size": cfg.model.image_size, "dtype": "uint8", "channels": "RGB", "reduced_decode": False},
        "preprocessing": PREPROCESSING,
        "backbone": {"name": cfg.model.backbone, "alpha": cfg.model.alpha,
                     "weights": weights.spec if weights.path is None else weights.path.name, "weights_sha256": weights.sha256},
        "anomaly": {"raw_threshold": threshold.raw, "normalisation": NORMALISATION, "image_score": _score_name(anomaly),
                    "score_neighbours": anomaly.score_neighbours, "score_top_k": anomaly.score_top_k,
                    "bank_file": BANK_FILE, "bank_size": len(bank), "feature_dim": bank.dim, "grid": list(grid),
                    "search": bank.method, "nprobe": bank.nprobe,
                    "ivf_lists": ivf_lists(len(bank)) if bank.method == "ivf" else None,
                    "training_patches": n_patches, "coreset_share": anomaly.coreset_share, "max_bank_size": anomaly.max_bank_size,
                    "layers": list(anomaly.layers), "projection": anomaly.projection, "standardise": anomaly.standardise,
                    "threshold_rule": anomaly.threshold_rule,
                    "false_alarm_rate": anomaly.false_alarm_rate, "map_sigma": anomaly.map_sigma},
        "metrics": {"testing": {k: metrics[k] for k in ("n", "n_positive", "roc_auc", "average_precision")}
                    | {"at_threshold": {k: metrics["at_threshold"][k] for k in ("f1", "precision", "recall", "accuracy")}}},
        "data": counts.to_dict(orient="records"), "timings": timings, "versions": versions,
    }


# --- the phase ---------------------------------------------------------------------------------


def _progress(console: Console):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=console, transient=True, disable=console.quiet)


def _good_training_rows(manifest: pd.DataFrame, negative: str) -> pd.DataFrame:
    rows = manifest[(manifest["split"] == "training") & (manifest["label"] == negative)]
    if not len(rows):
        raise DataError(
            f'mode "anomaly" learns from good images only, and the training split has no images of the good '
            f"(negative) class '{negative}'. Put good images in the training folder of '{negative}' (or label them "
            f"'{negative}' in the manifest), or set positive_class so that the good class is the negative one."
        )
    return rows


#: Good images whose raw patches fit the feature transform (standardisation, PCA): a bounded sample, so the
#: wide unreduced features of the whole good set never have to be held in memory at once.
TRANSFORM_FIT_IMAGES = 256
TRANSFORM_FIT_PATCHES = 50_000


def fit_feature_transform(cfg: Config, extractor, paths: Sequence[str]) -> None:
    """Fit the extractor's last 1x1 convolution (anomaly.standardise, anomaly.projection) on a seeded sample of good images."""
    rng = np.random.default_rng(cfg.training.seed)
    chosen = [paths[i] for i in sorted(rng.choice(len(paths), min(len(paths), TRANSFORM_FIT_IMAGES), replace=False))]
    raw = raw_patch_model(extractor)
    parts = []
    for keys, batch, _ in iter_batches(enumerate(chosen), cfg.model.image_size, 16):
        if keys:
            found = np.asarray(raw(batch, training=False), dtype=np.float32)
            parts.append(found.reshape(-1, found.shape[-1]))
    if not parts:
        return  # nothing readable: the bank phase reports it
    patches = np.concatenate(parts)
    patches = patches[rng.choice(len(patches), min(len(patches), TRANSFORM_FIT_PATCHES), replace=False)]
    a = cfg.anomaly
    set_patch_transform(extractor, *fit_patch_transform(patches, a.feature_dim, a.projection, a.standardise, cfg.training.seed))


def _fit_bank(cfg: Config, rows: pd.DataFrame, features, console: Console) -> tuple[PatchBank, int, pd.Series, float]:
    """(bank, number of good training patches, unreadable files, seconds the coreset selection took)."""
    with _progress(console) as progress:
        task = progress.add_task("patch features of good images", total=len(rows))
        patches, failed = collect_patches(rows["path"].tolist(), features, cfg.model.image_size,
                                          progress=lambda n: progress.advance(task, n))
    failures = pd.Series({rows.index[k]: reason for k, reason in failed.items()}, dtype=object)
    if not len(patches):
        raise DataError(f"none of the {len(rows)} good training images could be read; see the reasons in dropped_files.csv.")
    started = time.perf_counter()
    bank = build_bank(patches, cfg.anomaly.coreset_share, cfg.anomaly.max_bank_size, cfg.training.seed, cfg.anomaly.search,
                      cfg.anomaly.nprobe)
    seconds = time.perf_counter() - started
    console.print(f"memory bank: {len(bank)} of {len(patches)} good patches ({len(bank) / len(patches):.1%}, greedy coreset "
                  f"in {seconds:.1f} s), {bank.dim} dimensions")
    return bank, len(patches), failures, seconds


def _score_held_out(cfg: Config, manifest: pd.DataFrame, engine: AnomalyEngine, console: Console):
    rows = manifest[manifest["split"].isin(["validation", "testing"])]
    with _progress(console) as progress:
        task = progress.add_task("scoring validation and testing images", total=len(rows))
        maps, raw, failed = distance_maps_for(rows["path"].tolist(), engine, cfg.model.image_size,
                                              progress=lambda n: progress.advance(task, n))
    scores = pd.Series(raw, index=rows.index, dtype=np.float64)
    failures = pd.Series({rows.index[k]: reason for k, reason in failed.items()}, dtype=object)
    scores[failures.index] = np.nan
    return scores, failures, (maps.shape[1:] if maps is not None else (0, 0))


def supervised_only_settings(cfg: Config) -> list[str]:
    """The model settings a user changed that only the supervised mode reads ("model.views 8", ...): said, not ignored."""
    defaults = type(cfg.model)()
    names = ("features", "resize", "tiles", "views")
    return [f"model.{name} {getattr(cfg.model, name)!r}" for name in names if getattr(cfg.model, name) != getattr(defaults, name)]


def train_anomaly(cfg: Config, console: Console | None = None, versions: dict | None = None) -> AnomalyTrainResult:
    """Fit a PatchCore bundle from the good training images; evaluate on testing; publish `runs/<name>/`."""
    console = console or Console()
    started, timings = time.perf_counter(), {}
    scan = load_data(cfg)
    negative, positive = scan.class_names
    console.print(f"one-class mode: learning '{escape(negative)}' (good) only; '{escape(positive)}' = anomaly (positive)")
    unused = supervised_only_settings(cfg)
    if unused:
        console.print(f"[yellow]warning:[/] one-class mode does not use {', '.join(unused)} (supervised settings; it squashes each "
                      "image to model.image_size and scores the anomaly section's patch features).")
    manifest = assign_splits(scan.manifest, cfg.training.validation_fraction, cfg.data.test_fraction, cfg.training.seed).manifest
    good_rows = _good_training_rows(manifest, negative)
    weights = resolve_weights(cfg.model.weights, cfg.model.alpha, cfg.model.image_size)
    anomaly = cfg.anomaly
    fitted = anomaly.standardise or anomaly.projection == "pca"
    extractor = build_patch_extractor(cfg.model.alpha, cfg.model.image_size, weights.path, anomaly.layers,
                                      projection_dim=anomaly.feature_dim, seed=cfg.training.seed, grid=anomaly.grid, fitted=fitted)
    if fitted:
        fit_feature_transform(cfg, extractor, good_rows["path"].tolist())
    features = make_feature_engine(extractor)
    bank, n_patches, train_failures, timings["coreset_s"] = _fit_bank(cfg, good_rows, features, console)
    timings["bank_s"] = time.perf_counter() - started
    engine = AnomalyEngine(features, bank, raw_threshold=1.0, map_sigma=anomaly.map_sigma, neighbours=anomaly.score_neighbours,
                           top_k=anomaly.score_top_k)
    scores, failures, grid = _score_held_out(cfg, manifest, engine, console)
    ok = scores.notna()
    is_positive = manifest.loc[scores.index, "label"] == positive
    validation = (manifest.loc[scores.index, "split"] == "validation") & ok
    threshold = choose_anomaly_threshold(scores[validation & ~is_positive], scores[validation & is_positive], anomaly.threshold_rule,
                                         anomaly.false_alarm_rate, cfg.evaluation.min_validation_per_class)
    engine.raw_threshold = threshold.raw
    if threshold.warning:
        console.print(f"[yellow]warning:[/] {escape(threshold.warning)}")
    f1 = "n/a" if threshold.validation_f1 is None else f"{threshold.validation_f1:.4f}"
    console.print(f"threshold: raw score {threshold.raw:.4f} ({threshold.method}); validation F1 {f1}")
    failures = pd.concat([train_failures, failures])
    testing = scores.index[(manifest.loc[scores.index, "split"] == "testing") & ok]
    result = _publish(cfg, scan, manifest, extractor, features, engine, threshold, scores, testing, failures,
                      (weights, grid, n_patches, timings, started, versions or {}), console)
    console.print(format_metrics_table(result.metrics))
    console.print(f"model bundle: [bold]{escape(str(result.run_dir))}[/]")
    return result


def _publish(cfg: Config, scan, manifest, extractor, features, engine: AnomalyEngine, threshold: AnomalyThreshold,
             scores: pd.Series, testing: pd.Index, failures: pd.Series, extra: tuple, console: Console) -> AnomalyTrainResult:
    """Write the bundle (feature graph, bank, ONNX, evaluation, report, metadata) and publish it."""
    weights, grid, n_patches, timings, started, versions = extra
    negative, positive = scan.class_names
    run_name = cfg.run_name or default_run_name()
    counts = _counts(manifest, failures, negative)
    with staged_run(Path(cfg.output_dir), run_name) as run:
        folder = run.staging
        test_rows = manifest.loc[testing]
        normalised = normalise_scores(scores[testing].to_numpy(), threshold.raw)
        metrics = write_evaluation(folder, test_rows["path"].tolist(), test_rows["label"].tolist(), normalised, 0.5,
                                   scan.class_names, extra={"split": "testing", "mode": "anomaly",
                                                            "threshold_choice": threshold.to_dict()})
        extractor.save(folder / MODEL_FILE)
        engine.bank.save(folder / BANK_FILE)
        images = np.stack([resize_square(load_image(p), cfg.model.image_size) for p in test_rows["path"].tolist()[:8]]) \
            if len(test_rows) else generated_images(4, cfg.model.image_size)
        console.print(write_feature_onnx(folder, extractor, features, engine.bank, threshold.raw, images, engine.neighbours, engine.top_k),
                      highlight=False)
        save_config(cfg, folder / CONFIG_FILE)
        failures.rename("reason").rename_axis("row").reset_index().to_csv(folder / "dropped_files.csv", index=False)
        used = ~manifest.index.isin(failures.index)
        manifest.assign(used=used, evaluated=manifest.index.isin(testing)).to_csv(folder / "manifest.csv", index=False)
        counts.to_csv(folder / "data_counts.csv", index=False)
        timings["total_s"] = time.perf_counter() - started
        write_run_report(
            folder, title=f"keeneye one-class run {run_name}", metrics=metrics, class_names=scan.class_names, threshold=0.5,
            config=cfg.model_dump(mode="json"), console=console, explainer=_gallery_explainer(engine, cfg.model.image_size),
            summary=[("run", run_name), ("mode", "anomaly (PatchCore, good images only)"),
                     ("memory bank", f"{len(engine.bank)} of {n_patches} good patches, {engine.bank.dim} dimensions"),
                     ("threshold", f"raw {threshold.raw:.4f} ({threshold.method}); scores normalised s / (s + t)"),
                     ("total time", f"{timings['total_s']:.1f} s")],
        )
        write_metadata(folder, _metadata(cfg, scan.class_names, weights, threshold, engine.bank, grid, n_patches, metrics,
                                         counts, timings, versions))
        run.publish()
    return AnomalyTrainResult(run.final, metrics, 0.5, scan.class_names, counts, threshold.raw, timings)
