"""The Python API: train, evaluate and predict. The CLI only parses arguments and calls these.

    from keeneye import train, evaluate, predict
    result = train("config.json")                  # -> runs/<name>/ (the model bundle)
    evaluate(result.run_dir)                       # metrics on the testing split again
    predict(result.run_dir, ["new_images/"])       # DataFrame: path, probability, label, error
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

import numpy as np
import pandas as pd
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import keeneye

if TYPE_CHECKING:  # pragma: no cover
    import threading
from keeneye.bundle import BUNDLE_FORMAT_VERSION, CONFIG_FILE, MODEL_FILE, PartialRun, staged_run, default_run_name, write_metadata
from keeneye.config import Config, load_config, save_config
from keeneye.data.preprocess import InputSpec, auto_grid, median_size
from keeneye.data.scan import SPLITS, scan_evaluation_folder
from keeneye.data.audit import (
    audit_manifest, inspect_images, leakage_summary, print_summary as print_audit_summary, settle_leakage,
)
from keeneye.data.manifest import load_data, run_testing_manifest
from keeneye.data.split import split_with_auto_groups
from keeneye.evaluation.report import write_run_report
from keeneye.errors import ConfigError, DataError
from keeneye.evaluation.metrics import format_metrics_table
from keeneye.evaluation.outputs import write_evaluation
from keeneye.evaluation.plots import plot_training_curves
from keeneye.evaluation.threshold import choose_threshold
from keeneye.inference.predictor import Predictor, expand_inputs, with_problem_rows
from keeneye.data.cache import default_cache_dir
from keeneye.data.video import is_video, with_sequences
from keeneye.evaluation.sequence import plot_sequences
from keeneye.inference.video import EventSettings, bundle_video_config, evaluate_sequences
from keeneye.terminal import keras_progress, plural, progress_bar
from keeneye.tracking import keep_tensorboard_logs, require_packages, tensorboard_callbacks, track_run

PREPROCESSING = {
    "input": "RGB uint8, any size; resized to image_size x image_size by input.resize (squash, pad = letterbox, crop = centre; "
             "cv2.INTER_AREA when a side shrinks by more than 1.5x, else cv2.INTER_LINEAR), or with input.tiles cut at native "
             "scale into rows x cols overlapping square tiles, each resized so, stacked vertically (keeneye.data.preprocess)",
    "inside_model": "x / 127.5 - 1 (MobileNetV2 preprocess_input), part of model.keras",
    "decision": "positive when probability >= threshold",
}


@dataclass
class TrainResult:
    run_dir: Path
    metrics: dict
    threshold: float
    class_names: tuple[str, str]
    counts: pd.DataFrame
    timings: dict = field(default_factory=dict)


@dataclass
class EvaluationResult:
    folder: Path
    metrics: dict
    predictions: pd.DataFrame


def _progress(console: Console):
    """One bar per long phase on a terminal; a plain line at least every 10 s in a log file."""
    return progress_bar(console)


def data_counts(manifest: pd.DataFrame, skipped: pd.DataFrame, dropped: pd.DataFrame) -> pd.DataFrame:
    """found = skipped + dropped + used, per split and class: every file on disk is in one column."""
    keys = ["split", "label"]
    candidates = manifest.groupby(keys).size().rename("candidates")
    skipped_n = skipped.fillna({"label": "(none)"}).groupby(keys).size().rename("skipped")
    dropped_n = dropped.groupby(keys).size().rename("dropped") if len(dropped) else pd.Series(dtype=int, name="dropped")
    counts = pd.concat([candidates, skipped_n, dropped_n], axis=1).fillna(0).astype(int)
    counts["used"] = counts["candidates"] - counts["dropped"]
    counts["found"] = counts["candidates"] + counts["skipped"]
    counts = counts.rename_axis(keys).reset_index()
    order = {split: i for i, split in enumerate(SPLITS)}
    counts = counts.sort_values(["split", "label"], key=lambda s: s.map(order) if s.name == "split" else s)
    return counts[["split", "label", "found", "skipped", "dropped", "used"]].reset_index(drop=True)


def _print_counts(console: Console, counts: pd.DataFrame) -> None:
    table = Table(title="Data", show_edge=False)
    for column in counts.columns:
        table.add_column(column, justify="left" if column in ("split", "label") else "right")
    for row in counts.itertuples(index=False):
        table.add_row(*[str(v) for v in row])
    total = counts[["found", "skipped", "dropped", "used"]].sum()
    table.add_row("total", "", *[str(int(total[c])) for c in ("found", "skipped", "dropped", "used")], style="bold")
    console.print(table)


def library_versions() -> dict:
    import cv2
    import keras
    import sklearn
    import tensorflow as tf

    return {
        "keeneye": keeneye.__version__, "python": platform.python_version(), "tensorflow": tf.__version__,
        "keras": keras.__version__, "numpy": np.__version__, "opencv": cv2.__version__, "scikit-learn": sklearn.__version__,
    }


def train(
    config: Config | str | os.PathLike | None = None, overrides: Sequence[str] = (), console: Console | None = None,
    resume: str | os.PathLike | None = None, callbacks: Sequence = (),
) -> TrainResult:
    """Scan, embed (cached), train the head [then fine-tune], choose the threshold, evaluate, write the bundle.

    resume: `runs/<name>` (or `runs/<name>.partial`) of a run that stopped before publishing its bundle:
        continue it, with the config saved in it, from its last finished epoch (see bundle.PartialRun).
    callbacks: extra Keras callbacks for both training phases (they run after keeneye's checkpointing).
    """
    from keeneye.training.distribute import choose_devices, op_determinism

    partial = None
    if resume is not None:
        if config is not None or overrides:
            raise ConfigError("--resume continues a run with the config saved in it: give no config and no --set.")
        partial = PartialRun.find(resume)
        config = partial.config_path
    elif config is None:
        raise ConfigError("train needs a config file (or a run to resume).")
    cfg = config if isinstance(config, Config) else load_config(config, overrides)
    require_packages(cfg)  # tracking's packages: fail now rather than after training
    console = console or Console()
    if cfg.mode == "anomaly":  # one-class PatchCore: its own phase (training/anomaly.py), the same bundle contract
        from keeneye.training.anomaly import train_anomaly

        done = train_anomaly(cfg, console, versions=library_versions())
        return TrainResult(done.run_dir, done.metrics, done.threshold, done.class_names, done.counts, done.timings)
    # First: MultiWorkerMirroredStrategy must exist before anything else runs on the TensorFlow runtime.
    devices = choose_devices(cfg.training.distribute)
    worker_dir = None
    if not devices.is_chief:  # multi-worker: only the chief writes the bundle, the others work in a temporary folder
        worker_dir = Path(tempfile.mkdtemp(prefix=f"keeneye-worker-{devices.worker_index}-"))
        cfg = cfg.model_copy(update={"output_dir": worker_dir})
    with op_determinism(cfg.training.deterministic):
        result = _train(cfg, console, partial, devices, tuple(callbacks))
    if worker_dir is not None:
        shutil.rmtree(worker_dir, ignore_errors=True)
        result.run_dir = None
    else:
        track_run(result.run_dir, cfg, console)  # after publishing: a tracking failure is a warning, never a lost bundle
    return result


def input_spec_for(cfg: Config, paths: Sequence[str], console: Console) -> InputSpec:
    """The run's InputSpec: model.tiles "auto" becomes a grid from the median size of the training images."""

    model = cfg.model
    tiles = None
    if model.tiles != "none" and (cfg.fine_tune.enabled or cfg.augmentation.frozen_views):
        raise ConfigError("model.tiles cannot be combined with fine_tune.enabled or augmentation.frozen_views (yet): "
                          'set model.tiles to "none", or turn those off.')
    if model.tiles == "auto":
        size = median_size(paths)
        tiles = auto_grid(*size, model.image_size, model.tile_overlap) if size else None
        shown = "unknown image size" if size is None else f"median image {size[1]:.0f}x{size[0]:.0f} px"
        console.print(f"model.tiles auto: {shown} -> {'no tiles' if not tiles or tiles == (1, 1) else f'{tiles[0]}x{tiles[1]} tiles'}")
    elif model.tiles != "none":
        rows, cols = model.tiles.split("x")
        tiles = (int(rows), int(cols))
    return InputSpec(model.image_size, model.resize, tiles, model.tile_overlap)


def training_summary(info: dict) -> str:
    """One line for the report: the phases, their validation F1 and which model was kept."""
    parts = []
    for name, phase in info["phases"].items():
        f1 = phase.get("validation_f1")
        parts.append(f"{'head' if name == 'head' else 'fine-tuning'} {phase['epochs_run']} epochs (best {phase['best_epoch']}, "
                     f"validation F1 {'n/a' if f1 is None else f'{f1:.4f}'})")
    kept = "" if len(info["phases"]) == 1 else f"; kept: {'fine-tuned' if info['kept'] == 'fine_tune' else 'head only'}"
    return ", ".join(parts) + kept


def _cross_validate_head(cfg: Config, features: np.ndarray, y: np.ndarray, sets: dict, units: np.ndarray, console: Console):
    """K group folds over training + validation (training.cv_folds); None when off or impossible (said why).

    With cv_folds 0 but too few validation images of a class for a threshold, cross-validation
    still runs (5 folds): out-of-fold choices beat a 0.5 default.
    """
    from keeneye.training.crossval import AUTO_CANDIDATES, run_cross_validation

    pool = sets["training"] | sets["validation"]
    training = cfg.training
    if training.cv_folds < 2:
        y_val = y[sets["validation"]]
        if cfg.evaluation.threshold != "auto" or min(int(y_val.sum()), int(len(y_val) - y_val.sum())) >= cfg.evaluation.min_validation_per_class:
            return None
        console.print(f"[yellow]note:[/] validation holds fewer than {cfg.evaluation.min_validation_per_class} images of a class: "
                      "the threshold is chosen on out-of-fold predictions (5 group folds) instead.")
        training = training.model_copy(update={"cv_folds": 5})
    with _progress(console) as progress:
        n = len(AUTO_CANDIDATES) if cfg.head.auto else 1
        task = progress.add_task(f"cross-validating {n} head{'s' if n > 1 else ''}", total=n)
        cv = run_cross_validation(features[pool], y[pool], units[pool], cfg.head, training, cfg.evaluation,
                                  progress=lambda k: progress.advance(task, k))
    if cv is None:
        n_pos = len(np.unique(units[pool][y[pool] == 1]))
        console.print(f"[yellow]warning:[/] only {n_pos} positive group(s) in training and validation: too few for "
                      "cross-validation; the threshold is chosen on the validation split.")
        return None
    for result in cv.results if len(cv.results) > 1 else []:
        mark = "->" if result is cv.best else "  "
        console.print(f"  {mark} {result.candidate.name:28s} out-of-fold AP {result.ap:.4f}", highlight=False)
    if len(cv.results) > 1:
        console.print(f"head chosen: {cv.best.candidate.name} ({escape(cv.reason)})", highlight=False)
    return cv


def cv_config(cfg: Config, cv) -> Config:
    """The run's config with the cross-validated head and the refit's epoch count (no early stopping: no rows left)."""
    candidate = cv.best.candidate
    return cfg.model_copy(update={
        "head": candidate.head_config(auto=cfg.head.auto),
        "training": cfg.training.model_copy(update={"class_weight": candidate.class_weight, "epochs": cv.refit_epochs,
                                                    "early_stopping_patience": 0}),
    })


def cv_summary(cv) -> str:
    """One line: the cross-validated F1 and AP with their spread over the folds."""
    e = cv.estimate
    return (f"F1 {e['f1_mean']:.4f} +- {e['f1_sd']:.4f}, AP {e['average_precision_mean']:.4f} +- {e['average_precision_sd']:.4f} "
            f"over {int(cv.folds.max()) + 1} group folds (head {cv.best.candidate.name}, threshold {cv.choice.threshold:.4f})")


def _fold_history(cv) -> pd.DataFrame:
    frame = pd.DataFrame({"epoch": pd.Series(dtype=int)})
    frame.attrs.update(best_epoch=cv.refit_epochs, monitor="out-of-fold loss", resumed_from=0)
    return frame


def _fit_published_head(cfg: Config, extractor, manifest: pd.DataFrame, features: np.ndarray, y: np.ndarray, rows: np.ndarray,
                        validation: np.ndarray, partial, callbacks: tuple, devices, console: Console):
    """The head that goes into the bundle: fit_head (resumable, callbacks, strategies) on `rows`."""
    from keeneye.training.fit import fit_head

    train_x, train_y = features[rows], y[rows]
    if cfg.augmentation.frozen_views:  # K augmented copies per training image, embedded now (not cached)
        from keeneye.training.finetune import embed_augmented_views

        views_x, views_y, _ = embed_augmented_views(cfg, extractor, manifest[rows], train_y, cfg.augmentation.frozen_views)
        train_x, train_y = np.concatenate([train_x, views_x]), np.concatenate([train_y, views_y])
        console.print(f"head trains on {len(train_y)} feature rows: the originals + {cfg.augmentation.frozen_views} augmented views each")
    if cfg.head.kind == "logistic":  # exact fit: no epochs, nothing to resume
        from keeneye.training.fit import fit_logistic_published

        head, history, how = fit_logistic_published(train_x, train_y, features[validation], y[validation], cfg.head, cfg.training)
        console.print(f"head: logistic regression on standardised features fitted exactly ({how})", highlight=False)
        return head, history
    with _progress(console) as progress:
        task = progress.add_task("training the head", total=cfg.training.epochs)
        head, history = fit_head(
            train_x, train_y, features[validation], y[validation], cfg.head, cfg.training,
            checkpoint_dir=partial.phase_dir("head"),
            callbacks=(*callbacks, *tensorboard_callbacks(cfg, partial.folder, "head"), keras_progress(progress, task, "training the head")),
            strategy=devices.strategy,
        )
    resumed = history.attrs.get("resumed_from", 0)
    console.print(f"head trained: {plural(len(history), 'epoch')}, best epoch {history.attrs['best_epoch']} ({history.attrs['monitor']})"
                  + (f", resumed after epoch {resumed}" if resumed else ""))
    return head, history


def _train(cfg: Config, console: Console, partial, devices, callbacks: tuple) -> TrainResult:
    import keras

    from keeneye.model.backbone import build_feature_extractor, build_tiled_extractor, resolve_weights
    from keeneye.model.head import build_classifier
    from keeneye.inference.engines import make_feature_engine
    from keeneye.inference.export import write_bundle_onnx
    from keeneye.training.features import EmbeddingCache, backbone_cache_key, default_cache_dir, embed_manifest
    from keeneye.training.fit import data_fingerprint

    timings: dict[str, float] = {}
    started = time.perf_counter()
    keras.utils.set_random_seed(cfg.training.seed)

    scan = load_data(cfg)  # folder or CSV manifest (data.manifest_path), groups from data.group_pattern
    negative, positive = scan.class_names
    console.print(f"classes: [bold]{escape(positive)}[/] = positive (1), [bold]{escape(negative)}[/] = negative (0)")
    weights = resolve_weights(cfg.model.weights, cfg.model.alpha, cfg.model.image_size)
    if weights.path is None:
        console.print("[yellow]warning:[/] model.weights is 'none': the backbone has random weights (for tests only).")
    # model.tiles "auto" reads the image sizes (headers only, no labels) of every image not given as testing
    spec = input_spec_for(cfg, scan.manifest.loc[scan.manifest["split"] != "testing", "path"].tolist(), console)
    extractor = build_feature_extractor(cfg.model.alpha, cfg.model.image_size, weights, cfg.model.features)
    if spec.tiles is not None:  # the features of every tile, max-pooled: what the head sees and the bundle computes
        extractor = build_tiled_extractor(extractor, spec.n_tiles)
    cache = None
    if weights.sha256:
        key = backbone_cache_key(cfg.model.backbone, cfg.model.alpha, cfg.model.image_size, weights.sha256, cfg.model.features, spec)
        cache = EmbeddingCache(cfg.cache_dir or default_cache_dir(), key)
    feature_engine = make_feature_engine(extractor, cache_folder=cache.folder if cache is not None else None)
    # Hashes and embeddings come before the split: near-duplicates join automatic groups (data.auto_groups).
    with _progress(console) as progress:
        task = progress.add_task("hashing images", total=len(scan.manifest))
        inspection = inspect_images(scan.manifest["path"].tolist(), progress=lambda n: progress.advance(task, n))
    with _progress(console) as progress:
        what = "embedding images" if spec.tiles is None else (
            f"embedding images ({spec.tiles[0]}x{spec.tiles[1]} = {spec.n_tiles} tiles each: {spec.n_tiles}x the backbone passes)")
        task = progress.add_task(what, total=len(scan.manifest))
        embeddings = embed_manifest(
            scan.manifest, feature_engine, extractor.output_shape[-1], spec, cache,
            batch_size=32, progress=lambda n: progress.advance(task, n),
        )
    splits = split_with_auto_groups(cfg, scan.manifest, inspection, embeddings.features, embeddings.ok)
    manifest = splits.manifest
    audit = audit_manifest(manifest, scan.class_names, scan.skipped, cfg.data.near_duplicate_hash_distance,
                           drop_leaked_test=cfg.data.drop_leaked_test, inspection=inspection, auto_groups=splits.auto_groups)
    audit.report.update(data_source=str(cfg.data.manifest_path or cfg.data_folder_path), split_notes=splits.notes)
    audit.add_unreadable(scan.dropped)  # videos that could not be (fully) decoded
    print_audit_summary(audit, console, splits.notes)
    if feature_engine.note:
        console.print(f"embedding engine: {escape(feature_engine.note)}", highlight=False)
    timings["scan_and_embeddings_s"] = time.perf_counter() - started
    if cache is not None:
        _report_cache(console, cache, embeddings)

    dropped = manifest.loc[embeddings.dropped.index].assign(reason=embeddings.dropped["reason"])
    dropped = dropped[["path", "split", "label", "reason"]]
    dropped, counted = _with_video_problems(dropped, manifest, scan.dropped, console)
    counts = data_counts(counted, scan.skipped, dropped)
    _print_counts(console, counts)
    run_name = cfg.run_name or default_run_name()
    _stop_when_too_many_dropped(cfg, run_name, dropped, len(manifest))
    if len(dropped):
        console.print(f"[yellow]warning:[/] {plural(len(dropped), 'unreadable image')} dropped (listed in dropped_files.csv).")

    ok = embeddings.ok
    y = (manifest["label"] == positive).to_numpy().astype(int)
    split = manifest["split"].to_numpy()
    sets = {name: (split == name) & ok for name in SPLITS}
    audit.add_embedding_near_duplicates(embeddings.features, ok, cfg.data.near_duplicate_similarity)
    sets["testing"] = settle_leakage(audit, sets["testing"], cfg.data.drop_leaked_test, console)
    train_y = y[sets["training"]]
    if len(np.unique(train_y)) < 2:
        raise DataError("the training split needs readable images of both classes.")

    # Training can be resumed from here on: its state lives in <output_dir>/<run_name>.partial (bundle.PartialRun).
    fingerprint = data_fingerprint(manifest, ok)
    if partial is None:
        partial = PartialRun.start(Path(cfg.output_dir), run_name, fingerprint)
        save_config(cfg.model_copy(update={"run_name": run_name}), partial.config_path)
        console.print(f"run state: {escape(str(partial.folder))} (if interrupted: keeneye train --resume "
                      f"{escape(str(Path(cfg.output_dir) / run_name))})", highlight=False)
    elif partial.info().get("data_fingerprint") != fingerprint:
        raise DataError(f"the data are not those of the interrupted run in {partial.folder} (files, contents or splits "
                        "changed): start a new run instead of resuming.")
    else:
        console.print(f"resuming the interrupted run in {escape(str(partial.folder))}", highlight=False)
    console.print(f"devices: {escape(devices.description)}", highlight=False)

    phase = time.perf_counter()
    cv = _cross_validate_head(cfg, embeddings.features, y, sets, splits.units, console)
    run_cfg = cfg if cv is None else cv_config(cfg, cv)  # the chosen head (head.auto) and the refit's epochs
    # With cross-validation the head is refit on training + validation, except when fine-tuning: then validation
    # stays unseen, for the honest comparison of the fine-tuned model with the frozen one.
    pool = sets["training"] | sets["validation"] if cv is not None and not cfg.fine_tune.enabled else sets["training"]
    validation = sets["validation"] if cv is None else np.zeros_like(pool)
    publish = cfg.training.cv_publish if cv is not None and not cfg.fine_tune.enabled else "refit"
    if publish == "average":
        from keeneye.model.head import average_heads

        head, history = average_heads(cv.best.heads), _fold_history(cv)
        console.print(f"head: the mean of the {len(cv.best.heads)} fold heads (training.cv_publish average)")
    else:
        head, history = _fit_published_head(run_cfg, extractor, manifest, embeddings.features, y, pool, validation,
                                            partial, callbacks, devices, console)
    timings["head_training_s"] = time.perf_counter() - phase  # with cross-validation: the folds and the refit
    phase = time.perf_counter()
    head_probability = lambda mask: np.asarray(head(embeddings.features[mask], training=False)).reshape(-1)  # noqa: E731
    if cv is not None:
        choice = cv.choice
    else:
        fixed = None if cfg.evaluation.threshold == "auto" else float(cfg.evaluation.threshold)
        choice = choose_threshold(
            y[sets["validation"]], head_probability(sets["validation"]), min_per_class=cfg.evaluation.min_validation_per_class,
            fixed=fixed, objective=cfg.evaluation.threshold_objective, target=cfg.evaluation.objective_target,
        )
    if choice.warning:
        console.print(f"[yellow]warning:[/] {escape(choice.warning)}")
    console.print(f"threshold: {choice.threshold:.4f} ({choice.method})")
    where = "" if cv is None else " (out-of-fold, over training + validation)"
    console.print(f"validation F1 after head training: {'n/a' if choice.validation_f1 is None else f'{choice.validation_f1:.4f}'}{where}")
    from keeneye.training.finetune import phase_summary

    training_info = {"epochs_run": len(history), "best_epoch": history.attrs["best_epoch"], "kept": "head",
                     "devices": devices.description, "deterministic": cfg.training.deterministic, "published": publish,
                     "phases": {"head": phase_summary(history, choice.validation_f1, choice.threshold, timings["head_training_s"])}}
    if cv is not None:
        training_info["cross_validation"] = cv.to_dict()
    if cfg.fine_tune.enabled:
        from keeneye.training.finetune import fine_tune_and_choose

        reference = None
        if cv is not None:  # honest comparison: the frozen head's out-of-fold probabilities, the folds' AP spread
            frozen_oof = np.full(len(manifest), np.nan, np.float32)
            frozen_oof[sets["training"] | sets["validation"]] = cv.best.oof
            reference = (frozen_oof, cv.estimate["average_precision_sd"], cv.choice)
        with _progress(console) as progress:
            task = progress.add_task("fine-tuning", total=cfg.fine_tune.epochs)
            tuned = fine_tune_and_choose(
                run_cfg, extractor, head, manifest, y, sets, history, head_probability, timings["head_training_s"], devices,
                partial.phase_dir("fine_tune"),
                (*callbacks, *tensorboard_callbacks(cfg, partial.folder, "fine_tune"), keras_progress(progress, task, "fine-tuning")),
                console, frozen_reference=reference,
            )
        timings["fine_tuning_s"] = tuned.phases["fine_tune"]["seconds"]
        extractor, head, choice, head_probability, history = tuned.extractor, tuned.head, tuned.choice, tuned.probability, tuned.history
        sets["testing"] = tuned.testing
        training_info.update(kept=tuned.kept, kept_reason=tuned.reason, phases=tuned.phases)
        if tuned.kept == "fine_tune":
            feature_engine = None  # its ONNX backbone is the frozen one: write_bundle_onnx converts the fine-tuned model whole
        if len(tuned.dropped):  # files that failed to decode while fine-tuning: reported like the embedding pass's
            late = manifest.loc[tuned.dropped.index].assign(reason=tuned.dropped["reason"])[["path", "split", "label", "reason"]]
            dropped = pd.concat([dropped, late])
            ok = ok & ~manifest.index.isin(late.index)
            counts = data_counts(counted, scan.skipped, dropped)
            console.print(f"[yellow]warning:[/] {plural(len(late), 'image')} failed to decode while fine-tuning (dropped_files.csv):")
            for row in late.itertuples():
                console.print(f"  {escape(str(row.path))}: {escape(str(row.reason))}", highlight=False, soft_wrap=True)
        phase = time.perf_counter()

    with staged_run(Path(cfg.output_dir), run_name, on_error=partial.remove) as run:
        for stale in run.cleaned:
            console.print(f"removed {escape(str(stale))}: staging folder of a publish that was killed", highlight=False)
        folder = run.staging
        test_rows = manifest[sets["testing"]]
        test_probability = head_probability(sets["testing"])
        metrics = write_evaluation(
            folder, test_rows["path"].tolist(), test_rows["label"].tolist(), test_probability,
            choice.threshold, scan.class_names,
            extra={"split": "testing", "threshold_choice": choice.to_dict(), "leakage": leakage_summary(audit),
                   **_sequence_evaluation(test_rows, test_probability, scan.class_names, choice.threshold, cfg.video, folder)}
            | ({"cross_validation": cv.to_dict()} if cv is not None else {}),
        )
        timings["evaluation_s"] = time.perf_counter() - phase
        classifier = build_classifier(extractor, head)
        classifier.save(folder / MODEL_FILE)
        console.print(write_bundle_onnx(folder, classifier, test_rows["path"].tolist(), feature_engine, spec=spec), highlight=False)
        save_config(cfg, folder / CONFIG_FILE)
        history.to_csv(folder / "history.csv", index=False)
        plot_training_curves(history, folder / "training_curves.png")
        dropped.to_csv(folder / "dropped_files.csv", index=False)
        scan.skipped.to_csv(folder / "skipped_files.csv", index=False)
        manifest.assign(used=ok, evaluated=sets["testing"]).to_csv(folder / "manifest.csv", index=False)
        audit.write(folder)
        counts.to_csv(folder / "data_counts.csv", index=False)
        keep_tensorboard_logs(partial.folder, folder)
        timings["total_s"] = time.perf_counter() - started
        write_run_report(
            folder, title=f"keeneye run {run_name}", metrics=metrics, class_names=scan.class_names, threshold=choice.threshold,
            audit=audit.report, config=cfg.model_dump(mode="json"), model=classifier, console=console,
            summary=[("run", run_name), ("data", audit.report["data_source"]),
                     ("backbone", f"{cfg.model.backbone} alpha {cfg.model.alpha} at {cfg.model.image_size} px, "
                                  f"features {cfg.model.features}, " + (f"{spec.tiles[0]}x{spec.tiles[1]} tiles" if spec.tiles else f"resize {spec.resize}")),
                     ("threshold", f"{choice.threshold:.4f} ({choice.method})"),
                     ("training", training_summary(training_info)),
                     *([("cross-validation", cv_summary(cv))] if cv is not None else []),
                     *([("head candidates", "; ".join(f"{r.candidate.name} AP {r.ap:.4f}" for r in cv.results) + f" -> {cv.reason}")]
                       if cv is not None and len(cv.results) > 1 else []),
                     ("split", " ".join(splits.notes) or "as given"), ("total time", f"{timings['total_s']:.1f} s")],
        )
        write_metadata(folder, _bundle_metadata(cfg, run_cfg, scan.class_names, choice, spec, weights, training_info, metrics, counts, timings))
        run.publish()
    partial.remove()  # the bundle is published: the resumable state has served its purpose
    if cv is not None:
        console.print(f"cross-validated estimate (before the test score below): {cv_summary(cv)}", highlight=False)
    console.print(format_metrics_table(metrics))
    console.print(f"model bundle: [bold]{escape(str(run.final))}[/]")
    return TrainResult(run.final, metrics, choice.threshold, scan.class_names, counts, timings)


def _report_cache(console: Console, cache, embeddings) -> None:
    """Damaged shards by name (skipped, removed, recomputed), then how much the cache saved."""
    for shard, reason in cache.damaged:
        console.print(f"[yellow]warning:[/] embedding cache shard {escape(str(shard))} was damaged ({escape(reason)}): "
                      "skipped and removed; its features were recomputed.", highlight=False, soft_wrap=True)
    verb = "reused" if embeddings.n_cached else "empty, filled"
    console.print(
        f"embedding cache {verb}: {embeddings.n_cached} reused, {embeddings.n_computed} computed "
        f"in {embeddings.seconds:.1f} s ({cache.folder})"
    )


def _stop_when_too_many_dropped(cfg: Config, run_name: str, dropped: pd.DataFrame, n_images: int) -> None:
    """A run on mostly unreadable data would be meaningless: stop, leaving the list with reasons beside the runs."""
    if not n_images or len(dropped) / n_images <= cfg.max_dropped_fraction:
        return
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    report = Path(cfg.output_dir) / f"{run_name}-dropped_files.csv"
    dropped.to_csv(report, index=False)
    raise DataError(
        f"{len(dropped)} of {n_images} images ({len(dropped) / n_images:.1%}) could not be read, "
        f"more than max_dropped_fraction={cfg.max_dropped_fraction}; the list with reasons is in {report}."
    )


def _bundle_metadata(cfg: Config, run_cfg: Config, class_names, choice, spec: InputSpec, weights, training_info: dict,
                     metrics: dict, counts: pd.DataFrame, timings: dict) -> dict:
    """metadata.json of a supervised bundle (checked against bundle.BundleMetadata when written)."""
    negative, positive = class_names
    return {
        "bundle_format": BUNDLE_FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "class_names": [negative, positive],
        "positive_class": positive,
        "threshold": choice.threshold,
        "threshold_choice": choice.to_dict(),
        "input": spec.to_dict() | {"dtype": "uint8", "channels": "RGB", "shape": list(spec.shape)},
        "preprocessing": PREPROCESSING,
        "backbone": {"name": cfg.model.backbone, "alpha": cfg.model.alpha, "features": cfg.model.features,
                     "weights": weights.spec if weights.path is None else weights.path.name, "weights_sha256": weights.sha256},
        "head": run_cfg.head.model_dump(),
        "training": training_info,
        "metrics": {"testing": {k: metrics[k] for k in ("n", "n_positive", "roc_auc", "average_precision")}
                    | {"at_threshold": {k: metrics["at_threshold"][k] for k in ("f1", "precision", "recall", "accuracy")}}},
        "data": counts.to_dict(orient="records"),
        "timings": timings,
        "versions": library_versions(),
    }


def tiles_note(predictor: Predictor) -> str:
    """', 3 tiles per image: 3x the backbone passes' for a tiled bundle, else ''."""
    n = predictor.input_spec.n_tiles
    return f", {n} tiles per image: {n}x the backbone passes" if n > 1 else ""


def _with_video_problems(dropped: pd.DataFrame, manifest: pd.DataFrame, problems: pd.DataFrame | None, console: Console):
    """(dropped + damaged videos, rows to count) so that a video that failed counts as found and dropped."""
    if problems is None or not len(problems):
        return dropped, manifest
    for row in problems.itertuples():
        console.print(f"[yellow]warning:[/] video {escape(str(row.path))}: {escape(str(row.reason))} (dropped_files.csv)", highlight=False, soft_wrap=True)
    return pd.concat([dropped, problems], ignore_index=True), pd.concat([manifest, problems[["path", "split", "label"]]], ignore_index=True)


def _sequence_evaluation(rows: pd.DataFrame, probabilities: np.ndarray, class_names: tuple[str, str], threshold: float,
                         video, folder: Path) -> dict:
    """{"sequences": frame F1, event precision/recall, per-video accuracy} when the rows hold videos or frame
    folders (and sequences.png, probability over time per video, in `folder`); {} otherwise."""
    settings = EventSettings.from_config(video, threshold)
    metrics, sequences = evaluate_sequences(rows, probabilities, class_names[1], threshold, settings)
    if metrics is None:
        return {}
    folder.mkdir(parents=True, exist_ok=True)
    plot_sequences(sequences, settings.enter, folder / "sequences.png")
    return {"sequences": metrics}


def evaluate(
    run_dir: str | os.PathLike, data: str | os.PathLike | None = None, engine: str = "auto",
    console: Console | None = None,
) -> EvaluationResult:
    """Evaluate a bundle on its own testing split, or on another folder (`DIR/testing/<class>/` or `DIR/<class>/`)."""
    console = console or Console()
    predictor = Predictor.from_bundle(run_dir, engine=engine)
    bundle = predictor.bundle
    scan = run_testing_manifest(bundle.path, bundle.class_names) if data is None else None
    if scan is not None:  # the run's own testing split, exactly the rows train evaluated (manifest.csv)
        data = bundle.path / "manifest.csv"
    else:
        if data is None:
            cfg = load_config(bundle.path / CONFIG_FILE)
            data = cfg.data_folder_path
        scan = scan_evaluation_folder(data, bundle.class_names)
        video, patterns = bundle_video_config(bundle.path)
        scan = with_sequences(scan, video.fps, default_cache_dir(), patterns.get("frame_pattern"), patterns.get("group_pattern"))
    console.print(f"evaluating {escape(bundle.path.name)} on {plural(len(scan.manifest), 'image')} from {escape(str(data))} (engine: {predictor.engine_name}{tiles_note(predictor)})", highlight=False)
    with _progress(console) as progress:
        task = progress.add_task("predicting", total=len(scan.manifest))
        predictions = predictor.predict_paths(scan.manifest["path"].tolist(), progress=lambda n: progress.advance(task, n))
    predictions["true_label"] = scan.manifest["label"].to_numpy()
    ok = predictions["error"].isna().to_numpy()
    folder = bundle.path / "evaluations" / time.strftime("%Y%m%d-%H%M%S")
    while folder.exists():
        folder = folder.with_name(folder.name + "-1")
    dropped = scan.manifest.loc[~ok, ["path", "split", "label"]].assign(reason=predictions.loc[~ok, "error"].to_numpy())
    if scan.dropped is not None and len(scan.dropped):  # videos that could not be (fully) decoded
        dropped = pd.concat([dropped, scan.dropped], ignore_index=True)
    sequences = _sequence_evaluation(scan.manifest[ok], predictions.loc[ok, "probability"].to_numpy(), bundle.class_names,
                                     bundle.threshold, bundle_video_config(bundle.path)[0], folder)
    metrics = write_evaluation(
        folder, predictions.loc[ok, "path"].tolist(), predictions.loc[ok, "true_label"].tolist(),
        predictions.loc[ok, "probability"].to_numpy(), bundle.threshold, bundle.class_names,
        extra={"data": str(Path(data).resolve()), "dropped": int(len(dropped)), "skipped": int(len(scan.skipped)), **sequences},
    )
    dropped.to_csv(folder / "dropped_files.csv", index=False)
    scan.skipped.to_csv(folder / "skipped_files.csv", index=False)
    if (~ok).any():
        console.print(f"[yellow]warning:[/] {plural(int((~ok).sum()), 'unreadable image')} left out (dropped_files.csv).")
    write_run_report(
        folder, title=f"keeneye evaluation of {bundle.path.name}", metrics=metrics, class_names=bundle.class_names,
        threshold=bundle.threshold, model=getattr(bundle, "model", None), console=console,
        summary=[("model bundle", str(bundle.path)), ("data", str(data)), ("engine", predictor.engine_name)],
    )
    console.print(format_metrics_table(metrics))
    console.print(f"evaluation written to [bold]{escape(str(folder))}[/]")
    return EvaluationResult(folder, metrics, predictions)


def predict(
    run_dir: str | os.PathLike, inputs: Iterable[str | os.PathLike], output: str | os.PathLike | None = None,
    engine: str = "auto", batch_size: int = 32, console: Console | None = None,
    events: str | os.PathLike | None = None, fps: float | None = None, smoothing_frames: int | None = None,
    maps: str | os.PathLike | None = None,
) -> pd.DataFrame:
    """Predict files, folders (recursive) or globs; every input gets a row, failures with their reason.

    Videos get one row per sampled frame (columns frame and time added) and their events and verdicts
    go to `events` (JSON; default: beside `output` as <name>.events.json), also in `frame.attrs["videos"]`.
    fps and smoothing_frames override the bundle's `video` settings.
    maps: a folder for anomaly-map overlays (PNG, one per image; one-class bundles only), listed in the
        `anomaly_map` column.
    """
    console = console or Console(stderr=True)
    predictor = Predictor.from_bundle(run_dir, engine=engine, batch_size=batch_size)
    paths, problems = expand_inputs(inputs, videos=True)
    videos = [p for p in paths if is_video(p)]
    paths = [p for p in paths if not is_video(p)]
    what = plural(len(paths), "image") + (f" and {plural(len(videos), 'video')}" if videos else "")
    console.print(f"predicting {what} with {predictor.bundle.path.name} (engine: {predictor.engine_name}{tiles_note(predictor)})")
    with _progress(console) as progress:
        task = progress.add_task("predicting", total=len(paths))
        frame = predictor.predict_paths(paths, progress=lambda n: progress.advance(task, n))
    if videos:
        frame = _predict_videos(predictor, videos, frame, fps, smoothing_frames, console, events or _events_path(output))
    frame = with_problem_rows(frame, problems)
    if maps is not None:
        frame = _with_anomaly_maps(predictor, frame, Path(maps))
    failed = frame["error"].notna()
    for row in frame[failed].itertuples():
        console.print(f"[yellow]not predicted:[/] {escape(str(row.path))}: {escape(str(row.error))}", highlight=False, soft_wrap=True)
    if output is not None:
        write_predictions(frame, Path(output))
        console.print(f"{int((~failed).sum())} predicted, {int(failed.sum())} not; written to {output}")
    return frame


def predict_ray(
    run_dir: str | os.PathLike, inputs: Iterable[str | os.PathLike], output: str | os.PathLike | None = None,
    actors: int = 2, address: str | None = None, engine: str = "auto", batch_size: int = 32, console: Console | None = None,
) -> pd.DataFrame:
    """Predict on a Ray cluster (`address`, $RAY_ADDRESS, or a local Ray): an actor pool, each
    actor holding the bundle once. `output` is Parquet (CSV by name); a rerun with it resumes."""
    from keeneye.inference import distributed  # here, not at the top: Ray is an optional extra

    console = console or Console(stderr=True)
    console.print(f"predicting on Ray with {actors} actors ({escape(Path(run_dir).name)}, engine: {engine})")
    with _progress(console) as progress:
        task = progress.add_task("predicting", total=None)
        frame = distributed.predict_ray(
            run_dir, inputs, output=output, actors=actors, engine=engine, batch_size=batch_size, address=address,
            progress=lambda n: progress.advance(task, n),
        )
    failed = frame["error"].notna()
    for row in frame[failed].itertuples():
        console.print(f"[yellow]not predicted:[/] {escape(str(row.path))}: {escape(str(row.error))}", highlight=False, soft_wrap=True)
    where = f"; written to {output}" if output is not None else ""
    console.print(f"{int((~failed).sum())} predicted, {int(failed.sum())} not{where}")
    return frame


def _with_anomaly_maps(predictor: Predictor, frame: pd.DataFrame, folder: Path) -> pd.DataFrame:
    """Write an anomaly-map overlay per predicted image into `folder`; their paths in column `anomaly_map`."""
    import cv2

    from keeneye.explain import overlay_file_name, explain_anomaly_images
    from keeneye.inference.anomaly import is_anomaly_bundle

    if not is_anomaly_bundle(predictor.bundle):
        raise ConfigError("--maps needs a one-class bundle (trained with mode \"anomaly\"); use `keeneye explain` for Grad-CAM.")
    folder.mkdir(parents=True, exist_ok=True)
    ok = frame["error"].isna()
    written, used = {}, set()
    for item in explain_anomaly_images(predictor.engine, frame.loc[ok, "path"].tolist(), predictor.bundle.class_names, predictor.bundle.image_size):
        if item.overlay is not None:
            target = folder / overlay_file_name(item.path, used, "anomaly")
            cv2.imwrite(str(target), cv2.cvtColor(item.overlay, cv2.COLOR_RGB2BGR))
            written[item.path] = str(target)
    return frame.assign(anomaly_map=frame["path"].map(written))


def watch(
    run_dir: str | os.PathLike, source: str | int, frames: bool = False, fps: float | None = None, engine: str = "auto",
    smoothing_frames: int | None = None, stop: "threading.Event | None" = None,
) -> Iterator[dict]:
    """Records from a live source (camera index, video file or stream URL), frame by frame: one per event,
    one per frame with `frames`, and a final 'end' record. Setting `stop` ends the stream cleanly."""
    from keeneye.inference.video import watch_records

    predictor = Predictor.from_bundle(run_dir, engine=engine, batch_size=8)
    video_cfg, _ = bundle_video_config(predictor.bundle.path)
    settings = EventSettings.from_config(video_cfg, predictor.bundle.threshold, smoothing_frames)
    return watch_records(predictor, source, video_cfg.fps if fps is None else fps, settings, frames=frames, stop=stop)


def _events_path(output: str | os.PathLike | None) -> Path | None:
    return None if output is None else Path(output).with_suffix(".events.json")


def _predict_videos(predictor: Predictor, videos: list[str], frame: pd.DataFrame, fps: float | None, smoothing_frames: int | None,
                    console: Console, events_path: Path | None) -> pd.DataFrame:
    """Stream each video through the predictor; frame rows appended to `frame`, verdicts printed and written."""
    from keeneye.inference.video import FRAME_COLUMNS, predict_video

    video_cfg, _ = bundle_video_config(predictor.bundle.path)
    fps = video_cfg.fps if fps is None else fps
    settings = EventSettings.from_config(video_cfg, predictor.bundle.threshold, smoothing_frames)
    positive = predictor.bundle.positive_class
    parts, summaries = [frame.reindex(columns=FRAME_COLUMNS)], []
    for path in videos:
        with _progress(console) as progress:
            task = progress.add_task(f"{Path(path).name}", total=None)
            result = predict_video(predictor, path, fps, settings, progress=lambda n: progress.advance(task, n))
        parts.append(result.frames)
        if result.error:
            parts.append(pd.DataFrame([{"path": path, "error": result.error}], columns=FRAME_COLUMNS))
        summary = result.summary(positive)
        summaries.append(summary)
        spans = ", ".join(f"{e['start']:.2f}-{e['end']:.2f} s" for e in summary["events"])
        console.print(f"{escape(path)}: {summary['verdict']}{f' ({spans})' if spans else ''}; {summary['frames']} frames"
                      + (f"; [yellow]{escape(result.error)}[/]" if result.error else ""), highlight=False, soft_wrap=True)
    out = pd.concat([p for p in parts if len(p)], ignore_index=True) if any(len(p) for p in parts) else parts[0]
    out.attrs["videos"] = summaries
    if events_path is not None:
        events_path.parent.mkdir(parents=True, exist_ok=True)
        events_path.write_text(json.dumps({"positive_class": positive, "fps": fps, "settings": {
            "enter_threshold": settings.enter, "exit_threshold": settings.exit, "smoothing_frames": settings.smoothing_frames,
            "min_event_frames": settings.min_event_frames}, "videos": summaries}, indent=2))
        console.print(f"events and verdicts written to {escape(str(events_path))}", highlight=False)
    return out


def write_predictions(frame: pd.DataFrame, path: Path) -> None:
    """CSV, or JSON (a list of records) when the name ends in .json."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".json":
        records = frame.astype(object).where(frame.notna(), None).to_dict(orient="records")
        path.write_text(json.dumps(records, indent=2))
    else:
        frame.to_csv(path, index=False)
