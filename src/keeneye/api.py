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
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

import keeneye
from keeneye.bundle import BUNDLE_FORMAT_VERSION, CONFIG_FILE, MODEL_FILE, PartialRun, load_bundle, staged_run, default_run_name, write_metadata
from keeneye.config import Config, load_config, save_config
from keeneye.data.scan import SPLITS, scan_evaluation_folder, scan_folder, split_validation
from keeneye.data.audit import audit_manifest, leakage_summary, print_summary as print_audit_summary, settle_leakage
from keeneye.data.manifest import load_data, run_testing_manifest
from keeneye.data.split import assign_splits
from keeneye.evaluation.report import write_run_report
from keeneye.errors import ConfigError, DataError
from keeneye.evaluation.metrics import format_metrics_table
from keeneye.evaluation.outputs import write_evaluation
from keeneye.evaluation.plots import plot_training_curves
from keeneye.evaluation.threshold import choose_threshold
from keeneye.inference.predictor import Predictor, expand_inputs, with_problem_rows

PREPROCESSING = {
    "input": "RGB uint8, any size; resized to image_size x image_size (squashed; cv2.INTER_AREA when a side shrinks by more than 1.5x, else cv2.INTER_LINEAR)",
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


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=console, transient=True, disable=console.quiet,
    )


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
    if cfg.mode == "anomaly":  # one-class PatchCore: its own phase (training/anomaly.py), the same bundle contract
        from keeneye.training.anomaly import train_anomaly

        done = train_anomaly(cfg, console or Console(), versions=library_versions())
        return TrainResult(done.run_dir, done.metrics, done.threshold, done.class_names, done.counts, done.timings)
    # First: MultiWorkerMirroredStrategy must exist before anything else runs on the TensorFlow runtime.
    devices = choose_devices(cfg.training.distribute)
    worker_dir = None
    if not devices.is_chief:  # multi-worker: only the chief writes the bundle, the others work in a temporary folder
        worker_dir = Path(tempfile.mkdtemp(prefix=f"keeneye-worker-{devices.worker_index}-"))
        cfg = cfg.model_copy(update={"output_dir": worker_dir})
    with op_determinism(cfg.training.deterministic):
        result = _train(cfg, console or Console(), partial, devices, tuple(callbacks))
    if worker_dir is not None:
        shutil.rmtree(worker_dir, ignore_errors=True)
        result.run_dir = None
    return result


def training_summary(info: dict) -> str:
    """One line for the report: the phases, their validation F1 and which model was kept."""
    parts = []
    for name, phase in info["phases"].items():
        f1 = phase.get("validation_f1")
        parts.append(f"{'head' if name == 'head' else 'fine-tuning'} {phase['epochs_run']} epochs (best {phase['best_epoch']}, "
                     f"validation F1 {'n/a' if f1 is None else f'{f1:.4f}'})")
    kept = "" if len(info["phases"]) == 1 else f"; kept: {'fine-tuned' if info['kept'] == 'fine_tune' else 'head only'}"
    return ", ".join(parts) + kept


def _train(cfg: Config, console: Console, partial, devices, callbacks: tuple) -> TrainResult:
    import keras

    from keeneye.model.backbone import build_feature_extractor, resolve_weights
    from keeneye.model.head import build_classifier
    from keeneye.inference.engines import make_feature_engine
    from keeneye.inference.export import write_bundle_onnx
    from keeneye.training.features import EmbeddingCache, backbone_cache_key, default_cache_dir, embed_manifest
    from keeneye.training.fit import data_fingerprint, fit_head

    timings: dict[str, float] = {}
    started = time.perf_counter()
    keras.utils.set_random_seed(cfg.training.seed)

    scan = load_data(cfg)  # folder or CSV manifest (data.manifest_path), groups from data.group_pattern
    negative, positive = scan.class_names
    console.print(f"classes: [bold]{escape(positive)}[/] = positive (1), [bold]{escape(negative)}[/] = negative (0)")
    splits = assign_splits(scan.manifest, cfg.training.validation_fraction, cfg.data.test_fraction, cfg.training.seed)
    manifest = splits.manifest
    with _progress(console) as progress:
        task = progress.add_task("auditing images", total=len(manifest))
        audit = audit_manifest(manifest, scan.class_names, scan.skipped, cfg.data.near_duplicate_hash_distance,
                               progress=lambda n: progress.advance(task, n), drop_leaked_test=cfg.data.drop_leaked_test)
    audit.report.update(data_source=str(cfg.data.manifest_path or cfg.data_folder_path), split_notes=splits.notes)
    print_audit_summary(audit, console, splits.notes)

    weights = resolve_weights(cfg.model.weights, cfg.model.alpha, cfg.model.image_size)
    if weights.path is None:
        console.print("[yellow]warning:[/] model.weights is 'none': the backbone has random weights (for tests only).")
    extractor = build_feature_extractor(cfg.model.alpha, cfg.model.image_size, weights)
    cache = None
    if weights.sha256:
        key = backbone_cache_key(cfg.model.backbone, cfg.model.alpha, cfg.model.image_size, weights.sha256)
        cache = EmbeddingCache(cfg.cache_dir or default_cache_dir(), key)
    feature_engine = make_feature_engine(extractor, cache_folder=cache.folder if cache is not None else None)
    with _progress(console) as progress:
        task = progress.add_task("embedding images", total=len(manifest))
        embeddings = embed_manifest(
            manifest, feature_engine, extractor.output_shape[-1], cfg.model.image_size, cache,
            batch_size=32, progress=lambda n: progress.advance(task, n),
        )
    if feature_engine.note:
        console.print(f"embedding engine: {escape(feature_engine.note)}", highlight=False)
    timings["scan_and_embeddings_s"] = time.perf_counter() - started
    if cache is not None:
        verb = "reused" if embeddings.n_cached else "empty, filled"
        console.print(
            f"embedding cache {verb}: {embeddings.n_cached} reused, {embeddings.n_computed} computed "
            f"in {embeddings.seconds:.1f} s ({cache.folder})"
        )

    dropped = manifest.loc[embeddings.dropped.index].assign(reason=embeddings.dropped["reason"])
    dropped = dropped[["path", "split", "label", "reason"]]
    counts = data_counts(manifest, scan.skipped, dropped)
    _print_counts(console, counts)
    run_name = cfg.run_name or default_run_name()
    if len(manifest) and len(dropped) / len(manifest) > cfg.max_dropped_fraction:
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        report = Path(cfg.output_dir) / f"{run_name}-dropped_files.csv"
        dropped.to_csv(report, index=False)
        raise DataError(
            f"{len(dropped)} of {len(manifest)} images ({len(dropped) / len(manifest):.1%}) could not be read, "
            f"more than max_dropped_fraction={cfg.max_dropped_fraction}; the list with reasons is in {report}."
        )
    if len(dropped):
        console.print(f"[yellow]warning:[/] {len(dropped)} unreadable images dropped (listed in dropped_files.csv).")

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
    train_x = embeddings.features[sets["training"]]
    if cfg.augmentation.frozen_views:  # K augmented copies per training image, embedded now (not cached)
        from keeneye.training.finetune import embed_augmented_views

        views_x, views_y, _ = embed_augmented_views(cfg, extractor, manifest[sets["training"]], train_y, cfg.augmentation.frozen_views)
        train_x, train_y = np.concatenate([train_x, views_x]), np.concatenate([train_y, views_y])
        console.print(f"head trains on {len(train_y)} feature rows: the originals + {cfg.augmentation.frozen_views} augmented views each")
    head, history = fit_head(
        train_x, train_y, embeddings.features[sets["validation"]], y[sets["validation"]], cfg.head, cfg.training,
        checkpoint_dir=partial.phase_dir("head"), callbacks=callbacks, strategy=devices.strategy,
    )
    timings["head_training_s"] = time.perf_counter() - phase
    resumed = history.attrs.get("resumed_from", 0)
    console.print(f"head trained: {len(history)} epochs, best epoch {history.attrs['best_epoch']} ({history.attrs['monitor']})"
                  + (f", resumed after epoch {resumed}" if resumed else ""))

    phase = time.perf_counter()
    head_probability = lambda mask: np.asarray(head(embeddings.features[mask], training=False)).reshape(-1)  # noqa: E731
    fixed = None if cfg.evaluation.threshold == "auto" else float(cfg.evaluation.threshold)
    choice = choose_threshold(
        y[sets["validation"]], head_probability(sets["validation"]),
        min_per_class=cfg.evaluation.min_validation_per_class, fixed=fixed,
    )
    if choice.warning:
        console.print(f"[yellow]warning:[/] {escape(choice.warning)}")
    console.print(f"threshold: {choice.threshold:.4f} ({choice.method})")
    console.print(f"validation F1 after head training: {'n/a' if choice.validation_f1 is None else f'{choice.validation_f1:.4f}'}")
    from keeneye.training.finetune import phase_summary

    training_info = {"epochs_run": len(history), "best_epoch": history.attrs["best_epoch"], "kept": "head",
                     "devices": devices.description, "deterministic": cfg.training.deterministic,
                     "phases": {"head": phase_summary(history, choice.validation_f1, choice.threshold, timings["head_training_s"])}}
    if cfg.fine_tune.enabled:
        from keeneye.training.finetune import fine_tune_and_choose

        tuned = fine_tune_and_choose(cfg, extractor, head, manifest, y, sets, history, head_probability, timings["head_training_s"],
                                     devices, partial.phase_dir("fine_tune"), callbacks, console)
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
            counts = data_counts(manifest, scan.skipped, dropped)
            console.print(f"[yellow]warning:[/] {len(late)} images failed to decode while fine-tuning (dropped_files.csv):")
            for row in late.itertuples():
                console.print(f"  {escape(str(row.path))}: {escape(str(row.reason))}", highlight=False, soft_wrap=True)
        phase = time.perf_counter()

    with staged_run(Path(cfg.output_dir), run_name, on_error=partial.remove) as run:
        folder = run.staging
        test_rows = manifest[sets["testing"]]
        metrics = write_evaluation(
            folder, test_rows["path"].tolist(), test_rows["label"].tolist(), head_probability(sets["testing"]),
            choice.threshold, scan.class_names,
            extra={"split": "testing", "threshold_choice": choice.to_dict(), "leakage": leakage_summary(audit)},
        )
        timings["evaluation_s"] = time.perf_counter() - phase
        classifier = build_classifier(extractor, head)
        classifier.save(folder / MODEL_FILE)
        console.print(write_bundle_onnx(folder, classifier, test_rows["path"].tolist(), feature_engine), highlight=False)
        save_config(cfg, folder / CONFIG_FILE)
        history.to_csv(folder / "history.csv", index=False)
        plot_training_curves(history, folder / "training_curves.png")
        dropped.to_csv(folder / "dropped_files.csv", index=False)
        scan.skipped.to_csv(folder / "skipped_files.csv", index=False)
        manifest.assign(used=ok, evaluated=sets["testing"]).to_csv(folder / "manifest.csv", index=False)
        audit.write(folder)
        counts.to_csv(folder / "data_counts.csv", index=False)
        timings["total_s"] = time.perf_counter() - started
        write_run_report(
            folder, title=f"keeneye run {run_name}", metrics=metrics, class_names=scan.class_names, threshold=choice.threshold,
            audit=audit.report, config=cfg.model_dump(mode="json"), model=classifier, console=console,
            summary=[("run", run_name), ("data", audit.report["data_source"]),
                     ("backbone", f"{cfg.model.backbone} alpha {cfg.model.alpha} at {cfg.model.image_size} px"),
                     ("threshold", f"{choice.threshold:.4f} ({choice.method})"),
                     ("training", training_summary(training_info)),
                     ("split", " ".join(splits.notes) or "as given"), ("total time", f"{timings['total_s']:.1f} s")],
        )
        write_metadata(folder, {
            "bundle_format": BUNDLE_FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "class_names": [negative, positive],
            "positive_class": positive,
            "threshold": choice.threshold,
            "threshold_choice": choice.to_dict(),
            "input": {"image_size": cfg.model.image_size, "dtype": "uint8", "channels": "RGB"},
            "preprocessing": PREPROCESSING,
            "backbone": {"name": cfg.model.backbone, "alpha": cfg.model.alpha, "weights": weights.spec if weights.path is None else weights.path.name,
                         "weights_sha256": weights.sha256},
            "head": cfg.head.model_dump(),
            "training": training_info,
            "metrics": {"testing": {k: metrics[k] for k in ("n", "n_positive", "roc_auc", "average_precision")}
                        | {"at_threshold": {k: metrics["at_threshold"][k] for k in ("f1", "precision", "recall", "accuracy")}}},
            "data": counts.to_dict(orient="records"),
            "timings": timings,
            "versions": library_versions(),
        })
        run.publish()
    partial.remove()  # the bundle is published: the resumable state has served its purpose
    console.print(format_metrics_table(metrics))
    console.print(f"model bundle: [bold]{escape(str(run.final))}[/]")
    return TrainResult(run.final, metrics, choice.threshold, scan.class_names, counts, timings)


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
    console.print(f"evaluating {escape(bundle.path.name)} on {len(scan.manifest)} images from {escape(str(data))} (engine: {predictor.engine_name})", highlight=False)
    with _progress(console) as progress:
        task = progress.add_task("predicting", total=len(scan.manifest))
        predictions = predictor.predict_paths(scan.manifest["path"].tolist(), progress=lambda n: progress.advance(task, n))
    predictions["true_label"] = scan.manifest["label"].to_numpy()
    ok = predictions["error"].isna().to_numpy()
    folder = bundle.path / "evaluations" / time.strftime("%Y%m%d-%H%M%S")
    while folder.exists():
        folder = folder.with_name(folder.name + "-1")
    dropped = scan.manifest.loc[~ok, ["path", "split", "label"]].assign(reason=predictions.loc[~ok, "error"].to_numpy())
    metrics = write_evaluation(
        folder, predictions.loc[ok, "path"].tolist(), predictions.loc[ok, "true_label"].tolist(),
        predictions.loc[ok, "probability"].to_numpy(), bundle.threshold, bundle.class_names,
        extra={"data": str(Path(data).resolve()), "dropped": int((~ok).sum()), "skipped": int(len(scan.skipped))},
    )
    dropped.to_csv(folder / "dropped_files.csv", index=False)
    scan.skipped.to_csv(folder / "skipped_files.csv", index=False)
    if (~ok).any():
        console.print(f"[yellow]warning:[/] {(~ok).sum()} unreadable images left out (dropped_files.csv).")
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
    engine: str = "auto", batch_size: int = 32, console: Console | None = None, maps: str | os.PathLike | None = None,
) -> pd.DataFrame:
    """Predict files, folders (recursive) or globs; every input gets a row, failures with their reason.

    maps: a folder for anomaly-map overlays (PNG, one per image; one-class bundles only), listed in the
        `anomaly_map` column.
    """
    console = console or Console(stderr=True)
    predictor = Predictor.from_bundle(run_dir, engine=engine, batch_size=batch_size)
    paths, problems = expand_inputs(inputs)
    console.print(f"predicting {len(paths)} images with {predictor.bundle.path.name} (engine: {predictor.engine_name})")
    with _progress(console) as progress:
        task = progress.add_task("predicting", total=len(paths))
        frame = predictor.predict_paths(paths, progress=lambda n: progress.advance(task, n))
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


def write_predictions(frame: pd.DataFrame, path: Path) -> None:
    """CSV, or JSON (a list of records) when the name ends in .json."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".json":
        records = frame.astype(object).where(frame.notna(), None).to_dict(orient="records")
        path.write_text(json.dumps(records, indent=2))
    else:
        frame.to_csv(path, index=False)
