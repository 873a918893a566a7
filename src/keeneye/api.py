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
from keeneye.bundle import BUNDLE_FORMAT_VERSION, CONFIG_FILE, MODEL_FILE, load_bundle, staged_run, default_run_name, write_metadata
from keeneye.config import Config, load_config, save_config
from keeneye.data.scan import SPLITS, scan_evaluation_folder, scan_folder, split_validation
from keeneye.errors import DataError
from keeneye.evaluation.metrics import format_metrics_table
from keeneye.evaluation.outputs import write_evaluation
from keeneye.evaluation.plots import plot_training_curves
from keeneye.evaluation.threshold import choose_threshold
from keeneye.inference.predictor import Predictor, expand_inputs, with_problem_rows

PREPROCESSING = {
    "input": "RGB uint8, any size; resized to image_size x image_size (squashed, cv2.INTER_AREA when shrinking)",
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


def train(config: Config | str | os.PathLike, overrides: Sequence[str] = (), console: Console | None = None) -> TrainResult:
    """Scan, embed (cached), train the head, choose the threshold, evaluate, write the bundle."""
    import keras

    from keeneye.model.backbone import build_feature_extractor, resolve_weights
    from keeneye.model.head import build_classifier
    from keeneye.inference.engines import KerasEngine
    from keeneye.training.features import EmbeddingCache, backbone_cache_key, default_cache_dir, embed_manifest
    from keeneye.training.fit import fit_head

    cfg = config if isinstance(config, Config) else load_config(config, overrides)
    console = console or Console()
    timings: dict[str, float] = {}
    started = time.perf_counter()
    keras.utils.set_random_seed(cfg.training.seed)

    scan = scan_folder(cfg.data_folder_path, cfg.positive_class)
    negative, positive = scan.class_names
    console.print(f"classes: [bold]{escape(positive)}[/] = positive (1), [bold]{escape(negative)}[/] = negative (0)")
    manifest = split_validation(scan.manifest, cfg.training.validation_fraction, cfg.training.seed)

    weights = resolve_weights(cfg.model.weights, cfg.model.alpha, cfg.model.image_size)
    if weights.path is None:
        console.print("[yellow]warning:[/] model.weights is 'none': the backbone has random weights (for tests only).")
    extractor = build_feature_extractor(cfg.model.alpha, cfg.model.image_size, weights)
    cache = None
    if weights.sha256:
        key = backbone_cache_key(cfg.model.backbone, cfg.model.alpha, cfg.model.image_size, weights.sha256)
        cache = EmbeddingCache(cfg.cache_dir or default_cache_dir(), key)
    with _progress(console) as progress:
        task = progress.add_task("embedding images", total=len(manifest))
        embeddings = embed_manifest(
            manifest, KerasEngine(extractor), extractor.output_shape[-1], cfg.model.image_size, cache,
            batch_size=32, progress=lambda n: progress.advance(task, n),
        )
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
    train_y = y[sets["training"]]
    if len(np.unique(train_y)) < 2:
        raise DataError("the training split needs readable images of both classes.")

    phase = time.perf_counter()
    head, history = fit_head(
        embeddings.features[sets["training"]], train_y,
        embeddings.features[sets["validation"]], y[sets["validation"]], cfg.head, cfg.training,
    )
    timings["head_training_s"] = time.perf_counter() - phase
    console.print(f"head trained: {len(history)} epochs, best epoch {history.attrs['best_epoch']} ({history.attrs['monitor']})")

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

    with staged_run(Path(cfg.output_dir), run_name) as run:
        folder = run.staging
        test_rows = manifest[sets["testing"]]
        metrics = write_evaluation(
            folder, test_rows["path"].tolist(), test_rows["label"].tolist(), head_probability(sets["testing"]),
            choice.threshold, scan.class_names, extra={"split": "testing", "threshold_choice": choice.to_dict()},
        )
        timings["evaluation_s"] = time.perf_counter() - phase
        build_classifier(extractor, head).save(folder / MODEL_FILE)
        save_config(cfg, folder / CONFIG_FILE)
        history.to_csv(folder / "history.csv", index=False)
        plot_training_curves(history, folder / "training_curves.png")
        dropped.to_csv(folder / "dropped_files.csv", index=False)
        scan.skipped.to_csv(folder / "skipped_files.csv", index=False)
        manifest.assign(used=ok).to_csv(folder / "manifest.csv", index=False)
        counts.to_csv(folder / "data_counts.csv", index=False)
        timings["total_s"] = time.perf_counter() - started
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
            "training": {"epochs_run": len(history), "best_epoch": history.attrs["best_epoch"]},
            "metrics": {"testing": {k: metrics[k] for k in ("n", "n_positive", "roc_auc", "average_precision")}
                        | {"at_threshold": {k: metrics["at_threshold"][k] for k in ("f1", "precision", "recall", "accuracy")}}},
            "data": counts.to_dict(orient="records"),
            "timings": timings,
            "versions": library_versions(),
        })
        run.publish()
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
    console.print(format_metrics_table(metrics))
    console.print(f"evaluation written to [bold]{escape(str(folder))}[/]")
    return EvaluationResult(folder, metrics, predictions)


def predict(
    run_dir: str | os.PathLike, inputs: Iterable[str | os.PathLike], output: str | os.PathLike | None = None,
    engine: str = "auto", batch_size: int = 32, console: Console | None = None,
) -> pd.DataFrame:
    """Predict files, folders (recursive) or globs; every input gets a row, failures with their reason."""
    console = console or Console(stderr=True)
    predictor = Predictor.from_bundle(run_dir, engine=engine, batch_size=batch_size)
    paths, problems = expand_inputs(inputs)
    console.print(f"predicting {len(paths)} images with {predictor.bundle.path.name} (engine: {predictor.engine_name})")
    with _progress(console) as progress:
        task = progress.add_task("predicting", total=len(paths))
        frame = predictor.predict_paths(paths, progress=lambda n: progress.advance(task, n))
    frame = with_problem_rows(frame, problems)
    failed = frame["error"].notna()
    for row in frame[failed].itertuples():
        console.print(f"[yellow]not predicted:[/] {escape(str(row.path))}: {escape(str(row.error))}", highlight=False, soft_wrap=True)
    if output is not None:
        write_predictions(frame, Path(output))
        console.print(f"{int((~failed).sum())} predicted, {int(failed.sum())} not; written to {output}")
    return frame


def write_predictions(frame: pd.DataFrame, path: Path) -> None:
    """CSV, or JSON (a list of records) when the name ends in .json."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".json":
        records = frame.astype(object).where(frame.notna(), None).to_dict(orient="records")
        path.write_text(json.dumps(records, indent=2))
    else:
        frame.to_csv(path, index=False)
