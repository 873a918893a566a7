"""The Python API: train, evaluate and predict. The CLI only parses arguments and calls these.

    from keeneye import train, evaluate, predict
    result = train("config.json")                  # -> runs/<name>/ (the model bundle)
    evaluate(result.run_dir)                       # metrics on the testing split again
    predict(result.run_dir, ["new_images/"])       # DataFrame: path, probability, label, error
"""

from __future__ import annotations

import json
import os
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

if TYPE_CHECKING:  # pragma: no cover
    import threading
from keeneye.bundle import (
    CONFIG_FILE, DATA_COUNTS_FILE, DROPPED_FILE, EVALUATIONS_DIR, HISTORY_FILE, MANIFEST_FILE, SKIPPED_FILE, TRAINING_CURVES_FILE,
    BundleWriter, PartialRun, library_versions,
)
from keeneye.config import Config, load_config
from keeneye.data.scan import scan_evaluation_folder
from keeneye.data.manifest import run_testing_manifest
from keeneye.evaluation.report import THUMBNAIL_SIDE, write_run_report
from keeneye.errors import ConfigError
from keeneye.evaluation.metrics import format_metrics_table
from keeneye.evaluation.outputs import write_evaluation
from keeneye.evaluation.plots import plot_training_curves
from keeneye.data.decode import load_image
from keeneye.inference.anomaly import has_anomaly_feature, one_class_part_overlays
from keeneye.inference.predictor import Predictor, expand_inputs, with_problem_rows
from keeneye.data.cache import default_cache_dir
from keeneye.data.video import is_video, with_sequences
from keeneye.evaluation.sequence import plot_sequences
from keeneye.inference.video import EventSettings, bundle_video_config, evaluate_sequences
from keeneye.terminal import Reporter, plural
from keeneye.tracking import keep_tensorboard_logs, require_packages, tensorboard_callbacks, track_run
from keeneye.training import phases
from keeneye.training.phases import cv_summary, input_spec_for, training_summary  # noqa: F401 - part of the API (benchmarks use input_spec_for)


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


def train(
    config: Config | str | os.PathLike | None = None, overrides: Sequence[str] = (), console: Console | Reporter | None = None,
    resume: str | os.PathLike | None = None, callbacks: Sequence = (),
) -> TrainResult:
    """Scan, embed (cached), train the head [then fine-tune], choose the threshold, evaluate, write the bundle.

    console: where progress and results are printed (a rich Console, or a terminal.Reporter).

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
    reporter = Reporter.of(console)
    if cfg.mode == "anomaly":  # one-class PatchCore: its own phase (training/anomaly.py), the same bundle contract
        from keeneye.training.anomaly import train_anomaly

        done = train_anomaly(cfg, reporter.console, versions=library_versions())
        return TrainResult(done.run_dir, done.metrics, done.threshold, done.class_names, done.counts, done.timings)
    # First: MultiWorkerMirroredStrategy must exist before anything else runs on the TensorFlow runtime.
    devices = choose_devices(cfg.training.distribute)
    worker_dir = None
    if not devices.is_chief:  # multi-worker: only the chief writes the bundle, the others work in a temporary folder
        worker_dir = Path(tempfile.mkdtemp(prefix=f"keeneye-worker-{devices.worker_index}-"))
        cfg = cfg.model_copy(update={"output_dir": worker_dir})
    with op_determinism(cfg.training.deterministic):
        result = _train(cfg, reporter, partial, devices, tuple(callbacks))
    if worker_dir is not None:
        shutil.rmtree(worker_dir, ignore_errors=True)
        result.run_dir = None
    else:
        track_run(result.run_dir, cfg, reporter)  # after publishing: a tracking failure is a warning, never a lost bundle
    return result


def _train(cfg: Config, reporter: Reporter, partial: PartialRun | None, devices, callbacks: tuple) -> TrainResult:
    """The supervised phases (training/phases.py) in order, then the evaluation on testing and the bundle."""
    import keras

    from keeneye.inference.engines import make_feature_engine

    started = time.perf_counter()
    keras.utils.set_random_seed(cfg.training.seed)
    scanned = phases.scan(cfg, reporter)
    stack_anomaly_score = phases.use_anomaly_feature(cfg, scanned, reporter)  # before any work is done
    backbone = phases.build_backbone(cfg, scanned, reporter)
    engine = make_feature_engine(backbone.extractor, cache_folder=backbone.cache_folder)
    remote = ray_engine_factory(cfg, scanned, backbone) if cfg.training.embed_on == "ray" else None
    embedded = phases.embed(cfg, scanned, backbone, engine, reporter, remote_engine=remote)
    prepared = phases.audit(cfg, scanned, backbone, embedded, reporter)
    timings = {"scan_and_embeddings_s": time.perf_counter() - started}
    partial = phases.open_run_state(cfg, prepared, partial, reporter)
    reporter.line(f"devices: {devices.description}")
    phase_callbacks = lambda phase: (*callbacks, *tensorboard_callbacks(cfg, partial.folder, phase))  # noqa: E731
    fit = phases.fit_head(cfg, prepared, backbone.extractor, partial, devices, phase_callbacks("head"), reporter)
    timings["head_training_s"] = fit.seconds  # with cross-validation: the folds and the refit
    choice = phases.choose_threshold(cfg, prepared, fit, reporter)
    trained = phases.keep_head(cfg, prepared, backbone.extractor, fit, choice, devices)
    if stack_anomaly_score:
        trained = phases.add_anomaly_feature(cfg, scanned, prepared, fit, trained, reporter)
    if cfg.fine_tune.enabled:
        trained = phases.fine_tune(cfg, prepared, fit, trained, partial, devices, phase_callbacks("fine_tune"), reporter)
        timings["fine_tuning_s"] = trained.fine_tuning_s
    # a fine-tuned model's backbone is not the frozen engine's: write_bundle_onnx then converts the model whole
    feature_engine = None if trained.fine_tuned else engine
    return _publish(cfg, scanned, prepared, fit, trained, feature_engine, partial, timings, started, reporter)


def ray_engine_factory(cfg: Config, scanned: phases.Scanned, backbone: phases.Backbone):
    """What each Ray actor builds its feature engine from (training.embed_on "ray"): picklable, loaded once per actor."""
    from keeneye.inference.distributed import FeatureEngineFactory
    from keeneye.model.backbone import texture_projection

    spec = scanned.spec
    return FeatureEngineFactory(cfg.model.alpha, cfg.model.image_size, scanned.weights, cfg.model.features,
                                spec.n_tiles, str(backbone.cache_folder) if backbone.cache_folder else None, views=spec.views,
                                texture=texture_projection(backbone.extractor))


def _publish(cfg: Config, scanned: phases.Scanned, prepared: phases.Prepared, fit: phases.HeadFit, trained: phases.Trained,
             feature_engine, partial: PartialRun, timings: dict, started: float, reporter: Reporter) -> TrainResult:
    """Evaluate on testing and write the bundle (bundle.BundleWriter): it appears under runs/<name> only complete."""
    from keeneye.inference.export import write_bundle_onnx
    from keeneye.model.head import build_classifier

    phase = time.perf_counter()
    with BundleWriter.staged(Path(cfg.output_dir), prepared.run_name, on_error=partial.remove) as bundle:
        reporter.stale_staging(bundle.cleaned)
        metrics = _evaluate_testing(cfg, scanned, prepared, fit, trained, bundle.folder)
        timings["evaluation_s"] = time.perf_counter() - phase
        classifier = build_classifier(trained.extractor, trained.head)
        bundle.save_model(classifier)
        testing_paths = prepared.manifest.loc[trained.testing, "path"].tolist()
        if trained.anomaly_feature is not None:  # the one-class part of the probability, beside the classifier
            _save_anomaly_feature(bundle, classifier, trained.anomaly_feature, testing_paths, scanned.spec, reporter)
        reporter.print(write_bundle_onnx(bundle.folder, classifier, testing_paths, feature_engine, spec=scanned.spec), highlight=False)
        _write_run_files(cfg, bundle, scanned, prepared, trained, partial)
        timings["total_s"] = time.perf_counter() - started
        _write_train_report(cfg, bundle.folder, scanned, prepared, fit, trained, metrics, classifier, timings, reporter)
        metadata = phases.classifier_metadata(cfg, fit, scanned, trained, metrics, timings)
        if metadata.anomaly_feature is not None:  # the stored files, named and hashed (bundle.AnomalyFeatureInfo)
            metadata.anomaly_feature = metadata.anomaly_feature.model_copy(update=bundle.anomaly_feature_files())
        bundle.write_metadata(metadata)
        final = bundle.publish()
    partial.remove()  # the bundle is published: the resumable state has served its purpose
    reporter.trained(format_metrics_table(metrics), final, trained.estimate or (cv_summary(fit.cv) if fit.cv is not None else None))
    return TrainResult(final, metrics, trained.choice.threshold, scanned.class_names, trained.counts, timings)


def _save_anomaly_feature(bundle: BundleWriter, classifier, feature, testing_paths: list[str], spec, reporter: Reporter) -> None:
    """head.anomaly_feature's parts: the patch graph, the bank, and the patch graph as checked ONNX (no conversion at predict)."""
    from keeneye.inference.export import write_anomaly_feature_onnx

    bundle.save_anomaly_feature(feature.extractor, feature.bank.features)
    onnx = feature.features.onnx_model() if feature.features is not None else None
    reporter.print(write_anomaly_feature_onnx(bundle.folder, classifier, feature.extractor, feature.bank, feature.stacker,
                                              feature.settings["score_top_k"], feature.settings["score_neighbours"],
                                              testing_paths, onnx, spec=spec), highlight=False)


def _evaluate_testing(cfg: Config, scanned: phases.Scanned, prepared: phases.Prepared, fit: phases.HeadFit,
                      trained: phases.Trained, folder: Path) -> dict:
    """metrics.json (and plots) of the kept model on the testing split, at the chosen threshold."""
    from keeneye.data.audit import leakage_summary

    rows = prepared.manifest[trained.testing]
    probability = trained.probability(trained.testing)
    choice, class_names = trained.choice, scanned.class_names
    return write_evaluation(
        folder, rows["path"].tolist(), rows["label"].tolist(), probability, choice.threshold, class_names,
        extra={"split": "testing", "threshold_choice": choice.to_dict(), "leakage": leakage_summary(prepared.audit),
               **_sequence_evaluation(rows, probability, class_names, choice.threshold, cfg.video, folder)}
        | ({"cross_validation": fit.cv.to_dict()} if fit.cv is not None else {})
        | ({"anomaly_feature": trained.anomaly_feature.info()} if trained.anomaly_feature is not None else {})
        | phases.fine_tune_metrics(trained.info),
    )


def _write_run_files(cfg: Config, bundle: BundleWriter, scanned: phases.Scanned, prepared: phases.Prepared,
                     trained: phases.Trained, partial: PartialRun) -> None:
    """The run's record beside the model: config, history and curves, the rows used and dropped, the audit."""
    bundle.save_config(cfg)
    bundle.save_table(HISTORY_FILE, trained.history)
    plot_training_curves(trained.history, bundle.file(TRAINING_CURVES_FILE))
    bundle.save_table(DROPPED_FILE, trained.dropped)
    bundle.save_table(SKIPPED_FILE, scanned.scan.skipped)
    bundle.save_table(MANIFEST_FILE, prepared.manifest.assign(used=trained.ok, evaluated=trained.testing))
    prepared.audit.write(bundle.folder)
    bundle.save_table(DATA_COUNTS_FILE, trained.counts)
    keep_tensorboard_logs(partial.folder, bundle.folder)


def _write_train_report(cfg: Config, folder: Path, scanned: phases.Scanned, prepared: phases.Prepared, fit: phases.HeadFit,
                        trained: phases.Trained, metrics: dict, classifier, timings: dict, reporter: Reporter) -> None:
    """report.html of the run: summary lines, metrics, audit, config."""
    spec, cv, choice, run_name = scanned.spec, fit.cv, trained.choice, prepared.run_name
    shape = f"{spec.tiles[0]}x{spec.tiles[1]} tiles" if spec.tiles else f"resize {spec.resize}"
    write_run_report(
        folder, title=f"keeneye run {run_name}", metrics=metrics, class_names=scanned.class_names, threshold=choice.threshold,
        audit=prepared.audit.report, config=cfg.model_dump(mode="json"), model=classifier, spec=spec, console=reporter,
        one_class=None if trained.anomaly_feature is None else one_class_drawer(
            trained.anomaly_feature.scorer, trained.anomaly_feature.stacker, spec, choice.threshold),
        summary=[("run", run_name), ("data", prepared.audit.report["data_source"]),
                 ("backbone", f"{cfg.model.backbone} alpha {cfg.model.alpha} at {cfg.model.image_size} px, "
                              f"features {cfg.model.features}, " + shape),
                 ("threshold", f"{choice.threshold:.4f} ({choice.method})"),
                 ("training", training_summary(trained.info)),
                 *([("cross-validation", cv_summary(cv))] if cv is not None else []),
                 *([("head candidates", "; ".join(f"{r.candidate.name} AP {r.ap:.4f}" for r in cv.results) + f" -> {cv.reason}")]
                   if cv is not None and len(cv.results) > 1 else []),
                 ("split", " ".join(prepared.splits.notes) or "as given"), ("total time", f"{timings['total_s']:.1f} s")],
    )


def one_class_drawer(make_scorer, stacker, spec, threshold: float):
    """paths -> the one-class part's maps of a head.anomaly_feature model, report-thumbnail sized (the mistake gallery).

    The scorer is made when the gallery is drawn, inside the report's guard: a failure there costs pictures, not the run.
    """
    def draw(paths: list[str]) -> list[np.ndarray]:
        return one_class_part_overlays(make_scorer(), stacker, spec, threshold, [load_image(p) for p in paths],
                                       max_side=THUMBNAIL_SIDE)

    return draw


def passes_note(predictor: Predictor) -> str:
    """', 1x3 = 3 tiles each: 3x the backbone passes' for a tiled bundle (or views for a views one), else ''."""
    spec = predictor.input_spec
    return f", {spec.passes_note()}" if spec.passes > 1 else ""


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
    console: Console | Reporter | None = None,
) -> EvaluationResult:
    """Evaluate a bundle on its own testing split, or on another folder (`DIR/testing/<class>/` or `DIR/<class>/`)."""
    reporter = Reporter.of(console)
    predictor = Predictor.from_bundle(run_dir, engine=engine)
    bundle = predictor.bundle
    scan = run_testing_manifest(bundle.path, bundle.class_names) if data is None else None
    if scan is not None:  # the run's own testing split, exactly the rows train evaluated (manifest.csv)
        data = bundle.path / MANIFEST_FILE
    else:
        if data is None:
            cfg = load_config(bundle.path / CONFIG_FILE)
            data = cfg.data_folder_path
        scan = scan_evaluation_folder(data, bundle.class_names)
        video, patterns = bundle_video_config(bundle.path)
        scan = with_sequences(scan, video.fps, default_cache_dir(), patterns.get("frame_pattern"), patterns.get("group_pattern"))
    reporter.print(f"evaluating {escape(bundle.path.name)} on {plural(len(scan.manifest), 'image')} from {escape(str(data))} (engine: {predictor.engine_name}{passes_note(predictor)})", highlight=False)
    with reporter.task("predicting", len(scan.manifest)) as task:
        predictions = predictor.predict_paths(scan.manifest["path"].tolist(), progress=task.advance)
    predictions["true_label"] = scan.manifest["label"].to_numpy()
    ok = predictions["error"].isna().to_numpy()
    folder = bundle.path / EVALUATIONS_DIR / time.strftime("%Y%m%d-%H%M%S")
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
    dropped.to_csv(folder / DROPPED_FILE, index=False)
    scan.skipped.to_csv(folder / SKIPPED_FILE, index=False)
    if (~ok).any():
        reporter.warning(f"{plural(int((~ok).sum()), 'unreadable image')} left out (dropped_files.csv).")
    write_run_report(
        folder, title=f"keeneye evaluation of {bundle.path.name}", metrics=metrics, class_names=bundle.class_names,
        threshold=bundle.threshold, model=bundle.keras_model(), spec=bundle.input_spec, console=reporter,  # Grad-CAM of the mistakes (loaded now
        # if an ONNX engine predicted), and for a head.anomaly_feature bundle the one-class part's maps
        one_class=one_class_drawer(lambda: predictor.engine.scorer, predictor.engine.stacker, bundle.input_spec, bundle.threshold)
        if has_anomaly_feature(bundle) else None,
        summary=[("model bundle", str(bundle.path)), ("data", str(data)), ("engine", predictor.engine_name)],
    )
    reporter.print(format_metrics_table(metrics))
    reporter.print(f"evaluation written to [bold]{escape(str(folder))}[/]")
    return EvaluationResult(folder, metrics, predictions)


def predict(
    run_dir: str | os.PathLike, inputs: Iterable[str | os.PathLike], output: str | os.PathLike | None = None,
    engine: str = "auto", batch_size: int = 32, console: Console | Reporter | None = None,
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
    reporter = Reporter.of(console, stderr=True)
    predictor = Predictor.from_bundle(run_dir, engine=engine, batch_size=batch_size)
    paths, problems = expand_inputs(inputs, videos=True)
    videos = [p for p in paths if is_video(p)]
    paths = [p for p in paths if not is_video(p)]
    what = plural(len(paths), "image") + (f" and {plural(len(videos), 'video')}" if videos else "")
    reporter.print(f"predicting {what} with {predictor.bundle.path.name} (engine: {predictor.engine_name}{passes_note(predictor)})")
    with reporter.task("predicting", len(paths)) as task:
        frame = predictor.predict_paths(paths, progress=task.advance)
    if videos:
        frame = _predict_videos(predictor, videos, frame, fps, smoothing_frames, reporter, events or _events_path(output))
    frame = with_problem_rows(frame, problems)
    if maps is not None:
        frame = _with_anomaly_maps(predictor, frame, Path(maps))
    failed = frame["error"].notna()
    reporter.not_predicted(list(zip(frame.loc[failed, "path"], frame.loc[failed, "error"])))
    if output is not None:
        write_predictions(frame, Path(output))
        reporter.print(f"{int((~failed).sum())} predicted, {int(failed.sum())} not; written to {output}")
    return frame


def predict_ray(
    run_dir: str | os.PathLike, inputs: Iterable[str | os.PathLike], output: str | os.PathLike | None = None,
    actors: int = 2, address: str | None = None, engine: str = "auto", batch_size: int = 32, console: Console | Reporter | None = None,
) -> pd.DataFrame:
    """Predict on a Ray cluster (`address`, $RAY_ADDRESS, or a local Ray): an actor pool, each
    actor holding the bundle once. `output` is Parquet (CSV by name); a rerun with it resumes."""
    from keeneye.inference import distributed  # here, not at the top: Ray is an optional extra

    reporter = Reporter.of(console, stderr=True)
    reporter.print(f"predicting on Ray with {actors} actors ({escape(Path(run_dir).name)}, engine: {engine})")
    with reporter.task("predicting", None) as task:
        frame = distributed.predict_ray(
            run_dir, inputs, output=output, actors=actors, engine=engine, batch_size=batch_size, address=address,
            progress=task.advance,
        )
    failed = frame["error"].notna()
    reporter.not_predicted(list(zip(frame.loc[failed, "path"], frame.loc[failed, "error"])))
    where = f"; written to {output}" if output is not None else ""
    reporter.print(f"{int((~failed).sum())} predicted, {int(failed.sum())} not{where}")
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
                    reporter: Reporter, events_path: Path | None) -> pd.DataFrame:
    """Stream each video through the predictor; frame rows appended to `frame`, verdicts printed and written."""
    from keeneye.inference.video import FRAME_COLUMNS, predict_video

    video_cfg, _ = bundle_video_config(predictor.bundle.path)
    fps = video_cfg.fps if fps is None else fps
    settings = EventSettings.from_config(video_cfg, predictor.bundle.threshold, smoothing_frames)
    positive = predictor.bundle.positive_class
    parts, summaries = [frame.reindex(columns=FRAME_COLUMNS)], []
    for path in videos:
        with reporter.task(f"{Path(path).name}", None) as task:
            result = predict_video(predictor, path, fps, settings, progress=task.advance)
        parts.append(result.frames)
        if result.error:
            parts.append(pd.DataFrame([{"path": path, "error": result.error}], columns=FRAME_COLUMNS))
        summary = result.summary(positive)
        summaries.append(summary)
        spans = ", ".join(f"{e['start']:.2f}-{e['end']:.2f} s" for e in summary["events"])
        reporter.print(f"{escape(path)}: {summary['verdict']}{f' ({spans})' if spans else ''}; {summary['frames']} frames"
                      + (f"; [yellow]{escape(result.error)}[/]" if result.error else ""), highlight=False, soft_wrap=True)
    out = pd.concat([p for p in parts if len(p)], ignore_index=True) if any(len(p) for p in parts) else parts[0]
    out.attrs["videos"] = summaries
    if events_path is not None:
        events_path.parent.mkdir(parents=True, exist_ok=True)
        events_path.write_text(json.dumps({"positive_class": positive, "fps": fps, "settings": {
            "enter_threshold": settings.enter, "exit_threshold": settings.exit, "smoothing_frames": settings.smoothing_frames,
            "min_event_frames": settings.min_event_frames}, "videos": summaries}, indent=2))
        reporter.print(f"events and verdicts written to {escape(str(events_path))}", highlight=False)
    return out


def write_predictions(frame: pd.DataFrame, path: Path) -> None:
    """CSV, or JSON (a list of records) when the name ends in .json."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".json":
        records = frame.astype(object).where(frame.notna(), None).to_dict(orient="records")
        path.write_text(json.dumps(records, indent=2))
    else:
        frame.to_csv(path, index=False)
