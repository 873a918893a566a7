"""Supervised training as named phases, each a short function with typed inputs and outputs.

    scan ──> Scanned ──> build_backbone ──> Backbone ──> embed ──> Embedded ──> audit ──> Prepared
         ──> open_run_state (resumable) ──> fit_head ──> HeadFit ──> choose_threshold ──> ThresholdChoice
         ──> keep_head | fine_tune ──> Trained ──> (api: evaluate on testing, publish the bundle)

`keeneye.api.train` runs them in this order; the two steps that need the inference side (the
feature engine that embeds, the ONNX copy of the bundle) are handed in from there, so that this
module stays below the API. Nothing here prints: every event goes to the one `Reporter`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from keeneye.bundle import (
    PREPROCESSING, BUNDLE_FORMAT_VERSION, AnomalyFeatureInfo, BackboneInfo, BundleMetadata, PartialRun, default_run_name, library_versions,
)
from keeneye.config import Config, save_config
from keeneye.data.audit import Audit, audit_manifest, inspect_images, mutual_neighbour_pairs, print_summary, settle_leakage
from keeneye.data.manifest import load_data
from keeneye.data.preprocess import InputSpec, auto_grid, median_size
from keeneye.data.scan import SPLITS, ScanResult
from keeneye.data.split import SplitResult, split_with_auto_groups
from keeneye.errors import ConfigError, DataError
from keeneye.evaluation.threshold import ThresholdChoice, choose_configured_threshold
from keeneye.model.anomaly_feature import COMBINATION
from keeneye.terminal import Reporter

Mask = np.ndarray  # bool per manifest row
Probability = Callable[[Mask], np.ndarray]


# --- scan ----------------------------------------------------------------------------------------


@dataclass
class Scanned:
    """The data as found (folder or CSV manifest), the input spec and the backbone's weights."""

    scan: ScanResult
    spec: InputSpec
    weights: Any  # model.backbone.ResolvedWeights

    @property
    def class_names(self) -> tuple[str, str]:
        return self.scan.class_names


def scan(cfg: Config, reporter: Reporter) -> Scanned:
    """Read the data's rows (no pixels yet), find the weights, settle the input spec (tiles)."""
    from keeneye.model.backbone import resolve_weights

    found = load_data(cfg)  # folder or CSV manifest (data.manifest_path), groups from data.group_pattern
    reporter.classes(*found.class_names)
    weights = resolve_weights(cfg.model.weights, cfg.model.alpha, cfg.model.image_size)
    if weights.path is None:
        reporter.warning("model.weights is 'none': the backbone has random weights (for tests only).")
    # model.tiles "auto" reads the image sizes (headers only, no labels) of every image not given as testing
    spec = input_spec_for(cfg, found.manifest.loc[found.manifest["split"] != "testing", "path"].tolist(), reporter)
    return Scanned(found, spec, weights)


def input_spec_for(cfg: Config, paths: Sequence[str], reporter: Any = None) -> InputSpec:
    """The run's InputSpec: model.tiles "auto" becomes a grid from the median size of the training images."""
    reporter = Reporter.of(reporter)
    model = cfg.model
    tiles = None
    if model.tiles != "none" and (cfg.fine_tune.enabled or cfg.augmentation.frozen_views):
        raise ConfigError("model.tiles cannot be combined with fine_tune.enabled or augmentation.frozen_views (yet): "
                          'set model.tiles to "none", or turn those off.')
    if model.views > 1 and (model.tiles != "none" or cfg.fine_tune.enabled or cfg.augmentation.frozen_views):
        raise ConfigError(f"model.views {model.views} cannot be combined with model.tiles, fine_tune.enabled or "
                          "augmentation.frozen_views (yet): set model.views to 1, or turn those off.")
    if model.tiles == "auto":
        size = median_size(paths)
        tiles = auto_grid(*size, model.image_size, model.tile_overlap) if size else None
        shown = "unknown image size" if size is None else f"median image {size[1]:.0f}x{size[0]:.0f} px"
        reporter.print(f"model.tiles auto: {shown} -> {'no tiles' if not tiles or tiles == (1, 1) else f'{tiles[0]}x{tiles[1]} tiles'}")
    elif model.tiles != "none":
        rows, cols = model.tiles.split("x")
        tiles = (int(rows), int(cols))
    return InputSpec(model.image_size, model.resize, tiles, model.tile_overlap, model.reduced_decode, model.views)


# --- backbone and embeddings ----------------------------------------------------------------------


@dataclass
class Backbone:
    """The frozen feature extractor (tiled when the spec has tiles) and its embedding cache."""

    extractor: Any  # keras.Model: uint8 images -> features
    cache: Any  # training.features.EmbeddingCache, or None (random weights: nothing worth caching)

    @property
    def cache_folder(self) -> Path | None:
        return self.cache.folder if self.cache is not None else None


def build_backbone(cfg: Config, scanned: Scanned, reporter: Reporter | None = None) -> Backbone:
    """The run's frozen extractor (with "multi+cov": its texture projection fitted first) and its embedding cache."""
    from keeneye.model.backbone import build_input_extractor, has_texture_part, texture_fingerprint
    from keeneye.data.cache import EmbeddingCache, backbone_cache_key, default_cache_dir

    spec, weights = scanned.spec, scanned.weights
    # tiles: every tile's features, max-pooled; views: averaged: what the head sees and the bundle computes
    extractor = build_input_extractor(cfg.model.alpha, cfg.model.image_size, weights, cfg.model.features, spec.n_tiles,
                                      spec.views)
    if has_texture_part(extractor):
        fit_texture(cfg, scanned, extractor, Reporter.of(reporter))
    cache = None
    if weights.sha256:
        key = backbone_cache_key(cfg.model.backbone, cfg.model.alpha, cfg.model.image_size, weights.sha256, cfg.model.features, spec,
                                 texture_fingerprint(extractor))
        cache = EmbeddingCache(cfg.cache_dir or default_cache_dir(), key)
    return Backbone(extractor, cache)


def fit_texture(cfg: Config, scanned: Scanned, extractor: Any, reporter: Reporter) -> None:
    """Fit "multi+cov"'s texture projection on a sample of the images not given as testing (no labels read)."""
    from keeneye.model.backbone import TEXTURE_LAYER
    from keeneye.training.texture import MAX_IMAGES, fit_texture_projection

    manifest = scanned.scan.manifest
    paths = manifest.loc[manifest["split"] != "testing", "path"].tolist()
    with reporter.task("fitting the texture projection (model.features multi+cov)", min(MAX_IMAGES, len(paths))) as task:
        used = fit_texture_projection(extractor, paths, scanned.spec, cfg.training.seed, progress=task.advance)
    reporter.print(f"texture projection: principal axes of {TEXTURE_LAYER}'s positions in {used} training images")


@dataclass
class Embedded:
    """Content hashes and sizes (`inspection`) and the embeddings of every manifest row."""

    inspection: Any  # data.audit.inspect_images: (facts, perceptual hashes)
    embeddings: Any  # training.features.EmbeddingResult
    engine_note: str | None


def embed(cfg: Config, scanned: Scanned, backbone: Backbone, engine: Any, reporter: Reporter,
          remote_engine: Any = None) -> Embedded:
    """Hash every image, then embed it (from the cache where it can). Before the split: near-duplicates join groups.

    remote_engine: with training.embed_on "ray", what each Ray actor builds its engine from; the
    same vectors and cache shards as the local pass. Afterwards the cache is consolidated into one
    matrix and the features are memory-mapped (head training reads them mapped).
    """
    from keeneye.data.cache import memory_mapped
    from keeneye.training.embed_ray import embed_manifest_ray
    from keeneye.training.features import embed_manifest

    manifest, spec, cache = scanned.scan.manifest, scanned.spec, backbone.cache
    with reporter.task("hashing images", len(manifest)) as task:
        inspection = inspect_images(manifest["path"].tolist(), progress=task.advance)
    what = "embedding images" + (f" ({spec.passes_note()})" if spec.passes > 1 else "")
    dim = backbone.extractor.output_shape[-1]
    with reporter.task(what, len(manifest)) as task:
        if remote_engine is not None:
            embeddings = embed_manifest_ray(manifest, remote_engine, dim, spec, cache, batch_size=32, actors=cfg.training.ray_actors,
                                            address=cfg.training.ray_address, progress=task.advance)
        else:
            embeddings = embed_manifest(manifest, engine, dim, spec, cache, batch_size=32, progress=task.advance)
    if cache is not None:  # the next run memory-maps one matrix instead of unpacking every shard
        cache.consolidate()
    embeddings.features = memory_mapped(embeddings.features, backbone.cache_folder)
    return Embedded(inspection, embeddings, getattr(engine, "note", None))


# --- audit ----------------------------------------------------------------------------------------


@dataclass
class Prepared:
    """The rows to train on: split, audited, with labels, the per-split masks and what was dropped."""

    manifest: pd.DataFrame
    features: np.ndarray
    splits: SplitResult
    audit: Audit
    y: np.ndarray
    sets: dict[str, Mask]
    ok: Mask
    dropped: pd.DataFrame  # path, split, label, reason
    counted: pd.DataFrame  # the rows counted in data_counts (the manifest and damaged videos)
    skipped: pd.DataFrame  # files skipped by name (not images)
    counts: pd.DataFrame
    run_name: str


def audit(cfg: Config, scanned: Scanned, backbone: Backbone, embedded: Embedded, reporter: Reporter) -> Prepared:
    """Split (automatic groups from near-duplicates), audit (duplicates, leakage), count; stop on unusable data."""
    found, embeddings = scanned.scan, embedded.embeddings
    # the embedding near-duplicates, once: evidence for the automatic groups and, after the split, for the audit
    neighbours = mutual_neighbour_pairs(embeddings.features, np.asarray(embeddings.ok, dtype=bool), cfg.data.near_duplicate_similarity)
    splits = split_with_auto_groups(cfg, found.manifest, embedded.inspection, embeddings.features, embeddings.ok, neighbours)
    manifest = splits.manifest
    checked = audit_manifest(manifest, found.class_names, found.skipped, cfg.data.near_duplicate_hash_distance,
                             drop_leaked_test=cfg.data.drop_leaked_test, inspection=embedded.inspection, auto_groups=splits.auto_groups)
    checked.report.update(data_source=str(cfg.data.manifest_path or cfg.data_folder_path), split_notes=splits.notes)
    checked.add_unreadable(found.dropped)  # videos that could not be (fully) decoded
    print_summary(checked, reporter, splits.notes)
    if embedded.engine_note:
        reporter.line(f"embedding engine: {embedded.engine_note}")
    if backbone.cache is not None:
        reporter.embedding_cache(backbone.cache.damaged, embeddings.n_cached, embeddings.n_computed, embeddings.seconds, backbone.cache.folder)
    dropped = manifest.loc[embeddings.dropped.index].assign(reason=embeddings.dropped["reason"])[["path", "split", "label", "reason"]]
    dropped, counted = with_video_problems(dropped, manifest, found.dropped, reporter)
    counts = data_counts(counted, found.skipped, dropped)
    reporter.data_counts(counts)
    run_name = cfg.run_name or default_run_name()
    stop_when_too_many_dropped(cfg, run_name, dropped, len(manifest))
    reporter.dropped_files(list(zip(dropped["path"], dropped["reason"])))
    ok = embeddings.ok
    y = (manifest["label"] == found.class_names[1]).to_numpy().astype(int)
    split = manifest["split"].to_numpy()
    sets = {name: (split == name) & ok for name in SPLITS}
    checked.add_embedding_near_duplicates(embeddings.features, ok, cfg.data.near_duplicate_similarity, neighbours)
    sets["testing"] = settle_leakage(checked, sets["testing"], cfg.data.drop_leaked_test, reporter)
    if len(np.unique(y[sets["training"]])) < 2:
        raise DataError("the training split needs readable images of both classes.")
    return Prepared(manifest, embeddings.features, splits, checked, y, sets, ok, dropped, counted, found.skipped, counts, run_name)


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


def with_video_problems(dropped: pd.DataFrame, manifest: pd.DataFrame, problems: pd.DataFrame | None, reporter: Reporter):
    """(dropped + damaged videos, rows to count) so that a video that failed counts as found and dropped."""
    if problems is None or not len(problems):
        return dropped, manifest
    for row in problems.itertuples():
        reporter.warning(f"video {row.path}: {row.reason} (dropped_files.csv)")
    return pd.concat([dropped, problems], ignore_index=True), pd.concat([manifest, problems[["path", "split", "label"]]], ignore_index=True)


def stop_when_too_many_dropped(cfg: Config, run_name: str, dropped: pd.DataFrame, n_images: int) -> None:
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


# --- resumable state ------------------------------------------------------------------------------


def open_run_state(cfg: Config, prepared: Prepared, partial: PartialRun | None, reporter: Reporter) -> PartialRun:
    """From here on training can be resumed: its state lives in <output_dir>/<run_name>.partial (bundle.PartialRun)."""
    from keeneye.training.fit import data_fingerprint

    fingerprint = data_fingerprint(prepared.manifest, prepared.ok)
    if partial is None:
        partial = PartialRun.start(Path(cfg.output_dir), prepared.run_name, fingerprint)
        save_config(cfg.model_copy(update={"run_name": prepared.run_name}), partial.config_path)
        reporter.run_state(partial.folder, Path(cfg.output_dir) / prepared.run_name)
    elif partial.info().get("data_fingerprint") != fingerprint:
        raise DataError(f"the data are not those of the interrupted run in {partial.folder} (files, contents or splits "
                        "changed): start a new run instead of resuming.")
    else:
        reporter.run_state(partial.folder, None)
    return partial


# --- head -----------------------------------------------------------------------------------------


@dataclass
class HeadFit:
    """The head that goes into the bundle, its history, and the cross-validation behind it (if any)."""

    head: Any  # keras.Model: features -> probability
    history: pd.DataFrame
    cv: Any  # training.crossval result, or None
    run_cfg: Config  # cfg with the cross-validated head and epochs
    publish: str  # "refit" or "average" (training.cv_publish)
    seconds: float
    features: np.ndarray = field(repr=False, default=None)
    columns: np.ndarray | None = None  # the feature subset head.auto chose (its fold heads are that narrow), else None

    def probability(self, mask: Mask) -> np.ndarray:
        return np.asarray(self.head(self.features[mask], training=False)).reshape(-1)

    def fold_heads(self) -> list:
        """The cross-validation's fold heads of the chosen candidate, each taking the whole embedding."""
        return whole_fold_heads(self.cv, self.columns, self.features.shape[1])


def whole_fold_heads(cv, columns: np.ndarray | None, dim: int) -> list:
    """cv's fold heads of the chosen candidate; trained on a feature subset (`columns`), widened to all `dim` features."""
    if columns is None:
        return list(cv.best.heads)
    from keeneye.model.head import widen_head

    return [widen_head(h, columns, dim) for h in cv.best.heads]


def fit_head(cfg: Config, prepared: Prepared, extractor: Any, partial: PartialRun, devices: Any, callbacks: tuple,
             reporter: Reporter) -> HeadFit:
    """Cross-validate (training.cv_folds, head.auto), then fit the published head (or average the fold heads).

    callbacks: Keras callbacks for the head's `fit` (the caller's, then TensorBoard's), before the progress bar's.
    """
    started = time.perf_counter()
    sets = prepared.sets
    feature_sets = auto_feature_sets(cfg, extractor)
    cv = cross_validate_head(cfg, prepared, reporter, feature_sets)
    run_cfg = cfg if cv is None else cv_config(cfg, cv)  # the chosen head (head.auto) and the refit's epochs
    # head.auto may have chosen a feature subset: the published head trains on its columns only
    columns = feature_sets.get(cv.best.candidate.features) if cv is not None and cv.best.candidate.features else None
    # With cross-validation the head is refit on training + validation, except when fine-tuning is judged on the
    # validation split (fine_tune.judge "validation"): then validation stays unseen, for that comparison.
    whole_pool = cv is not None and not judged_on_validation(cfg)
    pool = sets["training"] | sets["validation"] if whole_pool else sets["training"]
    validation = sets["validation"] if cv is None else np.zeros_like(pool)
    publish = cfg.training.cv_publish if whole_pool else "refit"
    if publish == "average":
        from keeneye.model.head import average_heads

        heads = whole_fold_heads(cv, columns, prepared.features.shape[1])
        head, history = average_heads(heads), fold_history(cv)
        reporter.print(f"head: the mean of the {len(cv.best.heads)} fold heads (training.cv_publish average)")
    else:
        head, history = fit_published_head(run_cfg, extractor, prepared, pool, validation, partial, callbacks, devices, reporter,
                                           columns)
    return HeadFit(head, history, cv, run_cfg, publish, time.perf_counter() - started, prepared.features, columns)


def judged_on_validation(cfg: Config) -> bool:
    """Whether fine-tuning runs and is judged on the validation split (fine_tune.judge "validation")."""
    return cfg.fine_tune.enabled and cfg.fine_tune.judge == "validation"


def auto_feature_sets(cfg: Config, extractor: Any) -> dict[str, np.ndarray]:
    """With head.auto: the feature modes inside the run's embedding (model.features "multi" holds "gap" and
    "gap+gmp" as column subsets), name -> columns, smallest first; else none (the embedding as it is)."""
    if not cfg.head.auto or cfg.model.features == "gap":
        return {}
    from keeneye.model.backbone import feature_subsets

    return feature_subsets(extractor, cfg.model.features)


def cross_validate_head(cfg: Config, prepared: Prepared, reporter: Reporter, feature_sets: dict | None = None):
    """K group folds over training + validation (training.cv_folds); None when off or impossible (said why).

    With cv_folds 0 but too few validation images of a class for a threshold, cross-validation
    still runs (5 folds): out-of-fold choices beat a 0.5 default.
    """
    from keeneye.data.cache import memory_mapped
    from keeneye.training.crossval import candidates_for, paired_differences, run_cross_validation

    features, y, sets, units = prepared.features, prepared.y, prepared.sets, prepared.splits.units
    pool = sets["training"] | sets["validation"]
    training = cfg.training
    if training.cv_folds < 2:
        y_val = y[sets["validation"]]
        if cfg.evaluation.threshold != "auto" or min(int(y_val.sum()), int(len(y_val) - y_val.sum())) >= cfg.evaluation.min_validation_per_class:
            return None
        reporter.note(f"validation holds fewer than {cfg.evaluation.min_validation_per_class} images of a class: "
                      "the threshold is chosen on out-of-fold predictions (5 group folds) instead.")
        training = training.model_copy(update={"cv_folds": 5})
    n = len(candidates_for(cfg.head, training, list(feature_sets or {})))
    with reporter.task(f"cross-validating {n} head{'s' if n > 1 else ''}", n) as task:
        pooled = memory_mapped(features, rows=pool)  # mapped like the head's rows: the folds copy it once, into the fit
        cv = run_cross_validation(pooled, y[pool], units[pool], cfg.head, training, cfg.evaluation, progress=task.advance,
                                  feature_sets=feature_sets)
    if cv is None:
        n_pos = len(np.unique(units[pool][y[pool] == 1]))
        reporter.warning(f"only {n_pos} positive group(s) in training and validation: too few for "
                         "cross-validation; the threshold is chosen on the validation split.")
        return None
    if len(cv.results) > 1:
        paired = paired_differences(cv.results)
        reporter.head_candidates([(r.candidate.name, r.ap, r is cv.best,
                                   f"per fold {d.mean:+.3g} +- {d.standard_error:.3g} (paired SE) vs the best")
                                  for r, d in zip(cv.results, paired)], cv.reason)
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


def fold_history(cv) -> pd.DataFrame:
    frame = pd.DataFrame({"epoch": pd.Series(dtype=int)})
    frame.attrs.update(best_epoch=cv.refit_epochs, monitor="out-of-fold loss", resumed_from=0)
    return frame


def fit_published_head(cfg: Config, extractor, prepared: Prepared, rows: Mask, validation: Mask, partial: PartialRun,
                       callbacks: tuple, devices, reporter: Reporter, columns: np.ndarray | None = None):
    """The head that goes into the bundle: fit_head (resumable, callbacks, strategies) on `rows`.

    columns: the feature subset head.auto chose; the head trains on those columns and is widened
    (zero weights elsewhere, model/head.widen_head) to take the whole embedding, exactly.
    """
    head, history = _fit_published(cfg, extractor, prepared, rows, validation, partial, callbacks, devices, reporter, columns)
    if columns is not None:
        from keeneye.model.head import widen_head

        head = widen_head(head, columns, prepared.features.shape[1])
    return head, history


def _fit_published(cfg: Config, extractor, prepared: Prepared, rows: Mask, validation: Mask, partial: PartialRun,
                   callbacks: tuple, devices, reporter: Reporter, columns: np.ndarray | None):
    """fit_published_head's fit, on `columns` of the features when given (the head it returns is that narrow)."""
    from keeneye.data.cache import memory_mapped
    from keeneye.training.fit import fit_head as fit

    features, y = prepared.features, prepared.y
    train_x, train_y = memory_mapped(features, rows=rows), y[rows]  # mapped, copied a chunk at a time: head batches read it
    val_x = memory_mapped(features, rows=validation)
    if cfg.augmentation.frozen_views:  # K augmented copies per training image, embedded now (not cached)
        from keeneye.training.finetune import embed_augmented_views

        views_x, views_y, _ = embed_augmented_views(cfg, extractor, prepared.manifest[rows], train_y, cfg.augmentation.frozen_views)
        train_x, train_y = np.concatenate([train_x, views_x]), np.concatenate([train_y, views_y])
        reporter.print(f"head trains on {len(train_y)} feature rows: the originals + {cfg.augmentation.frozen_views} augmented views each")
    if columns is not None:  # head.auto chose a feature subset: a copy of those columns only
        train_x, val_x = np.asarray(train_x)[:, columns], np.asarray(val_x)[:, columns]
    if cfg.head.kind == "logistic":  # exact fit: no epochs, nothing to resume
        from keeneye.training.fit import fit_logistic_published

        head, history, how = fit_logistic_published(train_x, train_y, val_x, y[validation], cfg.head, cfg.training)
        reporter.line(f"head: logistic regression on standardised features fitted exactly ({how})")
        return head, history
    with reporter.task("training the head", cfg.training.epochs) as task:
        head, history = fit(
            train_x, train_y, val_x, y[validation], cfg.head, cfg.training,
            checkpoint_dir=partial.phase_dir("head"),
            callbacks=(*callbacks, task.keras_callback()),
            strategy=devices.strategy,
            whole_epochs=not callbacks,  # per-step callbacks (the caller's, TensorBoard's) keep per-step calls
        )
    reporter.head_trained(len(history), history.attrs["best_epoch"], history.attrs["monitor"], history.attrs.get("resumed_from", 0))
    return head, history


# --- threshold ------------------------------------------------------------------------------------


def choose_threshold(cfg: Config, prepared: Prepared, fit: HeadFit, reporter: Reporter) -> ThresholdChoice:
    """The decision threshold, learned on validation (or out of fold); never on the testing split."""
    if fit.cv is not None:
        choice = fit.cv.choice
    else:
        validation = prepared.sets["validation"]
        choice = choose_configured_threshold(cfg.evaluation, prepared.y[validation], fit.probability(validation))
    reporter.threshold(choice.threshold, choice.method, choice.validation_f1, fit.cv is not None, choice.warning)
    return choice


# --- the model to publish -------------------------------------------------------------------------


@dataclass
class Trained:
    """The model that goes into the bundle (head only, or fine-tuned) and what the bundle says about it."""

    extractor: Any
    head: Any
    choice: ThresholdChoice
    probability: Probability
    history: pd.DataFrame
    testing: Mask  # the testing rows to evaluate on
    ok: Mask  # rows used (decoded fine in every pass)
    dropped: pd.DataFrame
    counts: pd.DataFrame
    info: dict  # metadata.json "training"
    fine_tuned: bool = False
    fine_tuning_s: float | None = None
    anomaly_feature: Any = None  # training.anomaly_feature.AnomalyFeature with head.anomaly_feature, else None
    estimate: str | None = None  # the published model's cross-validated estimate when it is not the head's (cv_summary)


def keep_head(cfg: Config, prepared: Prepared, extractor: Any, fit: HeadFit, choice: ThresholdChoice, devices: Any) -> Trained:
    """The frozen backbone and the head: the model to publish when fine-tuning is off (or fine-tuning's baseline)."""
    from keeneye.training.finetune import phase_summary

    info = {"epochs_run": len(fit.history), "best_epoch": fit.history.attrs["best_epoch"], "kept": "head",
            "devices": devices.description, "deterministic": cfg.training.deterministic, "published": fit.publish,
            "phases": {"head": phase_summary(fit.history, choice.validation_f1, choice.threshold, fit.seconds)}}
    if fit.cv is not None:
        info["cross_validation"] = fit.cv.to_dict()
    return Trained(extractor, fit.head, choice, fit.probability, fit.history, prepared.sets["testing"], prepared.ok,
                   prepared.dropped, prepared.counts, info)


def use_anomaly_feature(cfg: Config, scanned: Scanned, reporter: Reporter) -> bool:
    """Whether to try the one-class score as a feature (head.anomaly_feature), decided before any work is done.

    Pinned true, a setting it is not made for (no cross-validation, fine-tuning, tiles) is a config error;
    "auto" (the default) then publishes the head alone and says why, so the default works with every setting.
    """
    from keeneye.training.anomaly_feature import anomaly_feature_problems

    if not cfg.head.anomaly_feature:
        return False
    problems = anomaly_feature_problems(cfg, tiled=scanned.spec.tiles is not None)
    if problems and cfg.head.anomaly_feature is True:
        raise ConfigError("head.anomaly_feature: " + "; ".join(problems) + ".")
    if problems:
        reporter.line('head.anomaly_feature "auto": the one-class score is not tried: ' + "; ".join(problems) + ".")
    return not problems


def add_anomaly_feature(cfg: Config, scanned: Scanned, prepared: Prepared, fit: HeadFit, trained: Trained,
                        reporter: Reporter) -> Trained:
    """head.anomaly_feature: the one-class score stacked onto the head's probability (training/anomaly_feature.py).

    The stacked model replaces the head's probability and threshold; the test split is scored by the same
    formula predict uses (model/anomaly_feature.Stacker), from the head's probability and the patch scores.
    """
    from dataclasses import replace

    from keeneye.runtime.batches import run_engine
    from keeneye.training.anomaly_feature import fit_anomaly_feature

    if fit.cv is None:
        say = reporter.warning if cfg.head.anomaly_feature is True else reporter.line
        say("head.anomaly_feature needs the cross-validation, which could not run: the head's probability "
            "is published without the one-class score.")
        return trained
    pool = prepared.sets["training"] | prepared.sets["validation"]
    paths = prepared.manifest.loc[pool, "path"].tolist()
    with reporter.task("one-class patch scores (head.anomaly_feature)", len(paths)) as task:
        feature = fit_anomaly_feature(cfg, paths, prepared.y[pool], fit.cv.folds, fit.cv.best.oof, scanned.spec,
                                      scanned.weights.path, task)
    scorer = feature.scorer()

    def probability(mask: Mask) -> np.ndarray:
        raw = run_engine(scorer.raw_scores, prepared.manifest.loc[mask, "path"].tolist(), scanned.spec.image_only(), 32).outputs
        return feature.stacker(trained.probability(mask), raw).astype(np.float32)

    e, choice = feature.estimate, feature.choice
    verdict = anomaly_feature_verdict(feature.estimate["average_precision"], fit.cv.best.fold_ap)
    if not verdict["kept"] and cfg.head.anomaly_feature == "auto":
        reporter.line(f"head.anomaly_feature: not kept, the head alone is published: {verdict['reason']}")
        return replace(trained, info=trained.info | {"anomaly_feature_dropped": verdict})
    reporter.line(f"head.anomaly_feature: {'kept' if verdict['kept'] else 'kept (pinned by true)'}: {verdict['reason']}")
    reporter.line(f"head.anomaly_feature: probability = sigmoid({feature.stacker.coef_logit:.3f} logit(p) + "
                  f"{feature.stacker.coef_log_score:.3f} log(s) + {feature.stacker.intercept:.3f}); cross-validated "
                  f"F1 {e['f1_mean']:.4f} +- {e['f1_sd']:.4f}, AP {e['average_precision_mean']:.4f} +- {e['average_precision_sd']:.4f}")
    reporter.threshold(choice.threshold, choice.method, choice.validation_f1, True, choice.warning)
    info = trained.info | {"anomaly_feature": feature.info() | {"verdict": verdict}}
    return replace(trained, choice=choice, probability=probability, info=info, anomaly_feature=feature)


def anomaly_feature_verdict(stacked_fold_ap: Sequence[float], head_fold_ap: Sequence[float]) -> dict:
    """Keep the stacked model only when cross-validation says the one-class score helps (issue 13 part 5).

    The stacked model must beat the head by more than one paired standard error over the same group folds
    (crossval.gain_verdict); a tie keeps the simpler head, which needs no second backbone pass and no
    nearest-neighbour search per image.
    """
    from keeneye.training.crossval import gain_verdict

    return gain_verdict(stacked_fold_ap, head_fold_ap, "the stacked model", "the head", "the simpler head")


def fine_tune(cfg: Config, prepared: Prepared, fit: HeadFit, baseline: Trained, partial: PartialRun, devices: Any,
              callbacks: tuple, reporter: Reporter) -> Trained:
    """Fine-tune the top of the backbone, then keep whichever model held-out data prefers (training/finetune.py):
    across the cross-validation folds (fine_tune.judge "folds", with cross-validation) or on the validation split.

    callbacks: Keras callbacks for fine-tuning's `fit` (the caller's, then TensorBoard's), before the progress bar's.
    """
    from keeneye.training.finetune import fine_tune_and_choose, fine_tune_folds_and_choose

    manifest, sets, cv = prepared.manifest, dict(prepared.sets), fit.cv
    ft = cfg.fine_tune
    if cv is None and ft.judge == "folds":
        reporter.line('fine_tune.judge "folds" needs the cross-validation, which did not run: the validation split judges.')
    if cv is not None and ft.judge == "folds":
        k = int(cv.folds.max()) + 1
        reporter.line(f'fine_tune.judge "folds": {k} fold fine-tunes, then one on all training + validation images if '
                      f"the folds keep it (about {k + 1} times one fine-tune)")
        with reporter.task("fine-tuning", (k + 1) * ft.epochs) as task:
            tuned = fine_tune_folds_and_choose(
                fit.run_cfg, baseline.extractor, fit.head, fit.fold_heads(), cv, manifest,
                prepared.y, sets, fit.history, fit.probability, fit.seconds, devices, partial.phase_dir("fine_tune"), callbacks,
                reporter, task=task)
    else:
        reference = None
        if cv is not None:  # honest comparison: the frozen head's out-of-fold probabilities, the folds' AP spread
            frozen_oof = np.full(len(manifest), np.nan, np.float32)
            frozen_oof[sets["training"] | sets["validation"]] = cv.best.oof
            reference = (frozen_oof, cv.estimate["average_precision_sd"], cv.choice)
        with reporter.task("fine-tuning", ft.epochs) as task:
            tuned = fine_tune_and_choose(
                fit.run_cfg, baseline.extractor, fit.head, manifest, prepared.y, sets, fit.history, fit.probability, fit.seconds,
                devices, partial.phase_dir("fine_tune"), (*callbacks, task.keras_callback()), reporter,
                frozen_reference=reference, task=task,
            )
    info = baseline.info | {"kept": tuned.kept, "kept_reason": tuned.reason, "phases": tuned.phases}
    dropped, ok, counts = baseline.dropped, baseline.ok, baseline.counts
    if len(tuned.dropped):  # files that failed to decode while fine-tuning: reported like the embedding pass's
        late = manifest.loc[tuned.dropped.index].assign(reason=tuned.dropped["reason"])[["path", "split", "label", "reason"]]
        dropped = pd.concat([dropped, late])
        ok = ok & ~manifest.index.isin(late.index)
        counts = data_counts(prepared.counted, prepared.skipped, dropped)
        reporter.dropped_files(list(zip(late["path"], late["reason"])), when="while fine-tuning")
    return Trained(tuned.extractor, tuned.head, tuned.choice, tuned.probability, tuned.history, tuned.testing, ok, dropped,
                   counts, info, fine_tuned=tuned.kept == "fine_tune", fine_tuning_s=tuned.phases["fine_tune"]["seconds"],
                   estimate=tuned.estimate)


def training_summary(info: dict) -> str:
    """One line for the report: the phases, their validation F1 and which model was kept."""
    parts = []
    for name, phase in info["phases"].items():
        f1 = phase.get("validation_f1")
        if phase.get("judge") == "folds":
            v = phase["verdict"]
            parts.append(f"fine-tuning in {phase['folds']} group folds (out-of-fold F1 {'n/a' if f1 is None else f'{f1:.4f}'}, "
                         f"AP {v['mean']:+.4f} +- "
                         f"{v['se']:.4f} vs frozen)" + (f", then {phase['epochs_run']} epochs on all rows" if phase["epochs_run"] else ""))
            continue
        parts.append(f"{'head' if name == 'head' else 'fine-tuning'} {phase['epochs_run']} epochs (best {phase['best_epoch']}, "
                     f"validation F1 {'n/a' if f1 is None else f'{f1:.4f}'})")
    kept = "" if len(info["phases"]) == 1 else f"; kept: {'fine-tuned' if info['kept'] == 'fine_tune' else 'head only'}"
    return ", ".join(parts) + kept


def fine_tune_metrics(info: dict) -> dict:
    """metrics.json's "fine_tune" section when fine-tuning was judged across the folds (fine_tune.judge "folds"), else {}."""
    phase = info.get("phases", {}).get("fine_tune", {})
    if phase.get("judge") != "folds":
        return {}
    return {"fine_tune": {"kept": info["kept"] == "fine_tune", "cross_validation": {
        key: phase[key] for key in ("folds", "estimate", "threshold_choice", "verdict", "fold_best_epochs")}}}


# --- what the bundle says ---------------------------------------------------------------------------


def classifier_metadata(cfg: Config, fit: HeadFit, scanned: Scanned, trained: Trained, metrics: dict, timings: dict) -> BundleMetadata:
    """metadata.json of a supervised bundle, typed (bundle.BundleMetadata)."""
    negative, positive = scanned.class_names
    spec, weights, choice = scanned.spec, scanned.weights, trained.choice
    return BundleMetadata(
        bundle_format=BUNDLE_FORMAT_VERSION,
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        class_names=(negative, positive),
        positive_class=positive,
        threshold=choice.threshold,
        threshold_choice=choice.to_dict(),
        input=spec.to_dict() | {"dtype": "uint8", "channels": "RGB", "shape": list(spec.shape)},
        preprocessing=PREPROCESSING,
        backbone=BackboneInfo(name=cfg.model.backbone, alpha=cfg.model.alpha, features=cfg.model.features,
                              weights=weights.spec if weights.path is None else weights.path.name, weights_sha256=weights.sha256),
        head=fit.run_cfg.head.model_dump(),
        training=trained.info,
        metrics={"testing": {k: metrics[k] for k in ("n", "n_positive", "roc_auc", "average_precision")}
                 | {"at_threshold": {k: metrics["at_threshold"][k] for k in ("f1", "precision", "recall", "accuracy")}}},
        data=trained.counts.to_dict(orient="records"),
        timings=timings,
        versions=library_versions(),
        **({"anomaly_feature": AnomalyFeatureInfo(**trained.anomaly_feature.info(), combination=COMBINATION)}
           if trained.anomaly_feature is not None else {}),
    )
