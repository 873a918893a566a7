"""Fine-tuning: after the head, train the top of MobileNetV2 and the head together, on images.

Recipe (Keras's transfer-learning guide, and what holds up on small inspection sets):

* the top ``fine_tune.unfreeze`` layers of MobileNetV2 (a count from the top, or a layer name to
  unfreeze from) become trainable; every **BatchNormalization layer stays frozen**
  (``trainable = False``, which in Keras 3 also means inference mode: moving statistics, never
  batch statistics) and the backbone is called with ``training=False``: a small batch of
  near-identical parts would otherwise wreck the ImageNet statistics in one epoch;
* a much lower learning rate (``fine_tune.learning_rate``, default 3e-5), Adam;
* online augmentation (:mod:`keeneye.training.augment`), inside the training model only;
* early stopping on the held-out loss, best weights kept, resumable per epoch
  (:func:`keeneye.training.fit.run_phase`);
* judged against the frozen head across the cross-validation folds (:class:`FoldFineTuner`,
  ``fine_tune.judge: "folds"``) or on the validation split (:func:`fine_tune_and_choose`);
* images streamed from disk by :class:`keeneye.training.pipeline.ImagePipeline`.

Training happens on a **copy** of the feature extractor and head built inside the distribution
strategy's scope (and under ``mixed_float16`` when asked for on a GPU). The frozen-phase model is
left untouched, so train can still choose it; the chosen weights are then put into plain float32
models with exactly the bundle's architecture (uint8 image -> ``feature_extractor`` -> ``head``),
so ``model.keras`` keeps its contract and never contains an augmentation layer.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import keras
import numpy as np
import pandas as pd

from keeneye.config import Config
from keeneye.errors import ConfigError
from keeneye.data.preprocess import InputSpec
from keeneye.model.backbone import ResolvedWeights, build_feature_extractor
from keeneye.model.head import build_classifier, build_head
from keeneye.runtime.batches import first_column, run_engine
from keeneye.runtime.engines import KerasEngine
from keeneye.terminal import Task
from keeneye.training.augment import build_augmenter
from keeneye.training.cached_top import learning_rate, view_of
from keeneye.training.distribute import Devices, dtype_policy
from keeneye.training.fit import run_phase, sample_weights, seed_state_variables
from keeneye.training.pipeline import DecodeFailures, EpochPlan, ImagePipeline

FINE_TUNE_STREAM = 1  # EpochPlan random stream of this phase (the head uses 0)


def find_backbone(extractor: keras.Model) -> keras.Model:
    """The MobileNetV2 functional model inside a keeneye feature extractor."""
    for layer in extractor.layers:
        if isinstance(layer, keras.Model):
            return layer
    raise ValueError(f"{extractor.name} holds no nested backbone model")


def unfreeze_top(base: keras.Model, unfreeze: int | str) -> list[str]:
    """Make ``base.layers`` from the top down trainable, except BatchNormalization; returns their names.

    `unfreeze`: a number of layers counted from the top (the input layer counts, as in
    ``base.layers``), or the name of the first layer to unfreeze. Everything below stays frozen.
    """
    layers = base.layers
    start = first_unfrozen(base, unfreeze)
    base.trainable = True
    unfrozen = []
    for index, layer in enumerate(layers):
        layer.trainable = index >= start and not isinstance(layer, keras.layers.BatchNormalization)
        if layer.trainable:
            unfrozen.append(layer.name)
    return unfrozen


def first_unfrozen(base: keras.Model, unfreeze: int | str) -> int:
    """Index in ``base.layers`` of the lowest layer `unfreeze` (a count from the top or a layer name) makes trainable."""
    layers = base.layers
    names = [layer.name for layer in layers]
    if isinstance(unfreeze, str):
        if unfreeze not in names:
            raise ConfigError(
                f"fine_tune.unfreeze: {unfreeze!r} is not a layer of {base.name}; its layers from the top are "
                f"{', '.join(reversed(names[-12:]))}, ..."
            )
        start = names.index(unfreeze)
    else:
        if not 1 <= unfreeze <= len(layers):
            raise ConfigError(f"fine_tune.unfreeze: {unfreeze} layers asked for; {base.name} has {len(layers)}.")
        start = len(layers) - unfreeze
    return start


def build_finetune_model(extractor: keras.Model, head: keras.Model, augmenter: keras.Model | None) -> keras.Model:
    """uint8 image -> [augmenter] -> extractor -> head: the training graph (never saved)."""
    image = keras.Input(extractor.input_shape[1:], dtype="uint8", name="image")
    x = augmenter(image) if augmenter is not None else image
    return keras.Model(image, head(extractor(x)), name="keeneye_finetune")


def plain_copy(cfg: Config, extractor: keras.Model, head: keras.Model | None) -> tuple[keras.Model, keras.Model | None]:
    """Float32 extractor and head with the bundle's architecture, holding the given models' weights (head None: none)."""
    new_extractor = build_feature_extractor(cfg.model.alpha, cfg.model.image_size, ResolvedWeights("none", None, None),
                                            cfg.model.features)
    new_extractor.set_weights(extractor.get_weights())
    if head is None:
        return new_extractor, None
    new_head = build_head(new_extractor.output_shape[-1], cfg.head.dense_units, cfg.head.dropout, seed=cfg.training.seed, l2=cfg.head.l2)
    new_head.set_weights(head.get_weights())
    return new_extractor, new_head


def predict_paths(classifier: keras.Model, paths: Sequence[str], image_size: int | InputSpec, batch_size: int = 32,
                  workers: int | None = None, progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, dict[int, str]]:
    """Probabilities for image files (NaN where a file fails to decode) and {position: reason} of the failures.

    runtime's batch loop, as the embedding pass and predict (same decoder, bounded prefetch).
    """
    run = run_engine(KerasEngine(classifier, source="fine-tuned model"), list(paths), image_size, batch_size, workers, progress)
    return (np.full(len(paths), np.nan, np.float32) if run.outputs is None else first_column(run.outputs)), run.failures


@dataclass
class FineTuneResult:
    extractor: keras.Model  # float32, bundle architecture, fine-tuned weights (best epoch)
    head: keras.Model
    history: pd.DataFrame  # attrs: best_epoch, monitor, resumed_from
    unfrozen: list[str]  # backbone layers that were trained
    dropped: pd.DataFrame  # manifest index -> reason, files that failed to decode while fine-tuning
    policy: str = "float32"
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    # cached_top only: the training-time model's probabilities of the validation rows that decoded (in order)
    validation_probabilities: np.ndarray | None = None


def fine_tune(
    cfg: Config,
    extractor: keras.Model,
    head: keras.Model,
    train_rows: pd.DataFrame,
    train_labels: np.ndarray,
    val_rows: pd.DataFrame,
    val_labels: np.ndarray,
    devices: Devices,
    policy: str = "float32",
    checkpoint_dir: Path | None = None,
    callbacks: Sequence = (),
    verbose: int = 0,
    task: Task | None = None,
) -> FineTuneResult:
    """Fine-tune copies of `extractor` and `head` (left unchanged) on the training images; see the module doc.

    `train_rows` / `val_rows`: manifest rows (index = manifest index, column `path`) that were used
    (decoded) in the embedding pass; labels 0/1 aligned with them.
    """
    import tensorflow as tf

    if cfg.fine_tune.method == "cached_top":
        return fine_tune_cached_top(cfg, extractor, head, train_rows, train_labels, val_rows, val_labels, devices, policy,
                                    checkpoint_dir, callbacks, verbose, task)
    started = time.perf_counter()
    ft, training = cfg.fine_tune, cfg.training
    size = cfg.model.image_size
    keras.utils.set_random_seed(training.seed)
    with dtype_policy(policy), devices.strategy.scope():
        ext_copy = build_feature_extractor(cfg.model.alpha, size, ResolvedWeights("none", None, None), cfg.model.features)
        ext_copy.set_weights(extractor.get_weights())
        head_copy = build_head(ext_copy.output_shape[-1], cfg.head.dense_units, cfg.head.dropout, seed=training.seed, l2=cfg.head.l2)
        head_copy.set_weights(head.get_weights())
        unfrozen = unfreeze_top(find_backbone(ext_copy), ft.unfreeze)
        augmenter = build_augmenter(cfg.augmentation, size, seed=training.seed + 1000) if ft.augment else None
        model = build_finetune_model(ext_copy, head_copy, augmenter)
        steps = EpochPlan(train_labels, training.batch_size, training.seed, oversample=training.oversample).steps_per_epoch
        model.compile(
            optimizer=keras.optimizers.Adam(learning_rate(ft.learning_rate, ft.schedule, steps, ft.epochs)),
            loss="binary_crossentropy",
            metrics=[keras.metrics.BinaryAccuracy(name="accuracy"), keras.metrics.AUC(name="auc")],
        )
    train_failures, val_failures = DecodeFailures(), DecodeFailures()
    batch_size = training.batch_size
    plan = EpochPlan(train_labels, batch_size, training.seed, shuffle=True, oversample=training.oversample, stream=FINE_TUNE_STREAM)
    weights = sample_weights(train_labels, training.class_weight)
    has_validation = len(val_labels) > 0
    spec = InputSpec(size, cfg.model.resize, reduced_decode=cfg.model.reduced_decode)  # model.resize as in the embeddings (tiles are not fine-tuned)
    with ImagePipeline(train_rows["path"].tolist(), train_labels, spec, weights, failures=train_failures) as train_pipe, \
            ImagePipeline(val_rows["path"].tolist(), val_labels, spec, failures=val_failures) as val_pipe:
        validation = None
        if has_validation:
            val_plan = EpochPlan(val_labels, batch_size, training.seed, shuffle=False)
            validation = val_pipe.dataset(val_plan, [0]).apply(tf.data.experimental.assert_cardinality(val_plan.steps_per_epoch))
        outcome = run_phase(
            model, lambda first: train_pipe.dataset(plan, range(first, ft.epochs)), plan.steps_per_epoch, ft.epochs,
            validation, "val_loss" if has_validation else "loss", ft.patience, checkpoint_dir, callbacks, verbose,
        )
    final_extractor, final_head = plain_copy(cfg, ext_copy, head_copy)
    dropped = pd.concat([train_failures.frame(train_rows.index), val_failures.frame(val_rows.index)])
    # The training graph, its optimizer state and traced functions hold a few hundred MB in reference cycles:
    # free them now, before the bundle is written (converting to ONNX needs ~0.7 GB for a moment at 224 px).
    history = outcome.history
    del model, ext_copy, head_copy, augmenter, outcome, validation
    gc.collect()
    return FineTuneResult(
        final_extractor, final_head, history, unfrozen, dropped, policy, time.perf_counter() - started,
    )


def cached_top_parts(cfg: Config, extractor: keras.Model, head: keras.Model | None):
    """(extractor copy, head copy, unfrozen layer names, bottom, top) for cached_top: training the top trains the copy."""
    from keeneye.training.cached_top import split_backbone

    ft = cfg.fine_tune
    ext_copy, head_copy = plain_copy(cfg, extractor, head)
    base = find_backbone(ext_copy)
    unfrozen = unfreeze_top(base, ft.unfreeze)
    bottom, top = split_backbone(ext_copy, base.layers[first_unfrozen(base, ft.unfreeze)].name)
    return ext_copy, head_copy, unfrozen, bottom, top


def fine_tune_cached_top(
    cfg: Config, extractor: keras.Model, head: keras.Model, train_rows: pd.DataFrame, train_labels: np.ndarray,
    val_rows: pd.DataFrame, val_labels: np.ndarray, devices: Devices, policy: str = "float32",
    checkpoint_dir: Path | None = None, callbacks: Sequence = (), verbose: int = 0, task: Task | None = None,
) -> FineTuneResult:
    """fine_tune with ``method: cached_top`` (:mod:`keeneye.training.cached_top`): the frozen bottom runs once per image
    and view, the epochs train the top blocks + head on the cached activations. float32 on one device (the top is small).

    task: the phase's progress line; the pass of the bottom over the images (minutes to an hour on a CPU) counts on it.
    """
    from keeneye.training.cached_top import cache_views, dropped_frame

    started = time.perf_counter()
    ft = cfg.fine_tune
    bottom = cached_top_parts(cfg, extractor, None)[3]
    spec = InputSpec(cfg.model.image_size, cfg.model.resize, reduced_decode=cfg.model.reduced_decode)
    advance = None
    if task is not None:
        task.step(f"fine-tuning: frozen bottom over {len(train_rows)} training images x {ft.views} views and "
                  f"{len(val_rows)} validation images", len(train_rows) + len(val_rows))
        advance = task.advance
    train_acts, train_failed = cache_views(bottom, train_rows["path"].tolist(), spec, ft.views, cfg.training.batch_size, advance)
    val_acts, val_failed = cache_views(bottom, val_rows["path"].tolist(), spec, 1, cfg.training.batch_size, advance)
    train_ok = np.setdiff1d(np.arange(len(train_rows)), list(train_failed))
    val_ok = np.setdiff1d(np.arange(len(val_rows)), list(val_failed))
    result, validation_p = fit_cached_top(cfg, extractor, head, train_acts, train_ok, np.asarray(train_labels)[train_ok],
                                          view_of(val_acts, 0, val_ok), np.asarray(val_labels)[val_ok], checkpoint_dir, callbacks,
                                          verbose)
    del train_acts, val_acts, bottom
    result.dropped = pd.concat([dropped_frame(train_rows.index, train_failed), dropped_frame(val_rows.index, val_failed)])
    result.seconds = time.perf_counter() - started
    result.validation_probabilities = validation_p
    return result


def fit_cached_top(cfg: Config, extractor: keras.Model, head: keras.Model, activations: Sequence[np.ndarray], train_at: np.ndarray,
                   train_labels: np.ndarray, held_acts: Sequence[np.ndarray], held_labels: np.ndarray, checkpoint_dir: Path | None,
                   callbacks: Sequence = (), verbose: int = 0) -> tuple[FineTuneResult, np.ndarray]:
    """Train the top + head of copies of `extractor` and `head` on cached views (cache_views' arrays, columns `train_at`),
    early-stopping on `held_acts` (the top's inputs of the held rows, view 0; none: a fixed number of epochs); the result
    and the held rows' probabilities."""
    from keeneye.training.cached_top import model_inputs, train_top

    started = time.perf_counter()
    keras.utils.set_random_seed(cfg.training.seed)
    ext_copy, head_copy, unfrozen, _, top = cached_top_parts(cfg, extractor, head)
    model, outcome = train_top(cfg, top, head_copy, (activations, train_labels), (held_acts, held_labels), checkpoint_dir,
                               callbacks, verbose, positions=train_at)
    held_p = (np.asarray(model.predict(model_inputs(held_acts), batch_size=cfg.training.batch_size, verbose=0))[:, 0]
              if len(held_labels) else np.empty(0, np.float32))
    final_extractor, final_head = plain_copy(cfg, ext_copy, head_copy)
    history = outcome.history
    # the training graph and its optimizer state hold a few hundred MB in reference cycles: free them before the next fit
    del model, outcome, top, ext_copy, head_copy
    gc.collect()
    empty = pd.DataFrame({"reason": pd.Series(dtype=object)})
    return FineTuneResult(final_extractor, final_head, history, unfrozen, empty, "float32", time.perf_counter() - started), held_p


def embed_augmented_views(
    cfg: Config, extractor: keras.Model, rows: pd.DataFrame, labels: np.ndarray, views: int, batch_size: int = 32,
) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """`views` augmented copies of each row's image through the frozen extractor: (features, labels, failures).

    Not cached: a view is a random draw, not a function of the file. Reproducible for a seed: the
    augmenter's random state is set from (seed, view) before each pass over the rows.
    """
    augmenter = build_augmenter(cfg.augmentation, cfg.model.image_size, seed=cfg.training.seed + 2000)
    dim = extractor.output_shape[-1]
    if augmenter is None or views == 0 or len(rows) == 0:
        return np.empty((0, dim), np.float32), np.empty(0, int), pd.DataFrame({"reason": pd.Series(dtype=object)})
    seeds = [(v, int(np.asarray(v.numpy())[0])) for v in seed_state_variables(augmenter)]
    paths = rows["path"].tolist()
    features = np.full((views, len(rows), dim), np.nan, np.float32)
    failures: dict[int, str] = {}
    spec = InputSpec(cfg.model.image_size, cfg.model.resize, reduced_decode=cfg.model.reduced_decode)

    def augmented_features(batch: np.ndarray) -> np.ndarray:
        return np.asarray(extractor.predict_on_batch(np.asarray(augmenter(batch, training=True))))

    for view in range(views):
        for variable, first in seeds:
            variable.assign(np.array([first, view << 20], dtype=variable.dtype))
        view_features = features[view]  # a view of the array: the sink writes into `features`
        run = run_engine(augmented_features, paths, spec, batch_size, sink=lambda keys, out: view_features.__setitem__(keys, out))
        failures.update(run.failures)
    ok = ~np.isnan(features[0]).any(axis=1)
    stacked = features[:, ok].reshape(-1, dim)
    dropped = pd.DataFrame({"reason": pd.Series({rows.index[k]: r for k, r in sorted(failures.items())}, dtype=object)})
    return stacked, np.tile(np.asarray(labels)[ok], views), dropped


def compare_phases(y_val: np.ndarray, p_head: np.ndarray, head_f1: float | None, p_fine: np.ndarray,
                   fine_f1: float | None) -> tuple[str, str]:
    """("head" or "fine_tune", why): the higher validation F1 (each at its own threshold) wins.

    F1 differences smaller than half of what one misclassified validation image changes (one false
    positive moves F1 by about 1 / (2 x positives)) are ties: they only say that the same number of
    mistakes is split differently between false positives and negatives. A tie goes to the lower
    validation log-loss, then to the head (the simpler model).
    """
    from sklearn.metrics import log_loss

    if head_f1 is None or fine_f1 is None or len(y_val) == 0:
        return "fine_tune", "no validation F1 to compare (too few validation images): the fine-tuned model is kept"
    tolerance = 0.25 / max(1, int(np.sum(y_val)))
    if abs(fine_f1 - head_f1) > tolerance:
        kept = "fine_tune" if fine_f1 > head_f1 else "head"
        return kept, f"higher validation F1 ({max(fine_f1, head_f1):.4f} vs {min(fine_f1, head_f1):.4f})"
    eps = 1e-7
    loss_head = log_loss(y_val, np.clip(p_head, eps, 1 - eps), labels=[0, 1])
    loss_fine = log_loss(y_val, np.clip(p_fine, eps, 1 - eps), labels=[0, 1])
    tie = f"validation F1 tied ({fine_f1:.4f} vs {head_f1:.4f}, within {tolerance:.1e})"
    if loss_fine < loss_head:
        return "fine_tune", f"{tie}; lower validation log-loss ({loss_fine:.4f} vs {loss_head:.4f})"
    return "head", f"{tie}; validation log-loss not lower after fine-tuning ({loss_fine:.4f} vs {loss_head:.4f})"


def judge_fine_tuning(y_val: np.ndarray, p_frozen: np.ndarray, p_fine: np.ndarray, margin: float) -> tuple[str, str]:
    """("head" or "fine_tune", why): fine-tuning is kept only when it beats the frozen head by more than the fold spread.

    Both are scored by average precision on the validation images (threshold-free, so neither
    score is flattered by a threshold tuned on the same images); the frozen head's probabilities
    there are its out-of-fold ones (heads that never saw those images). `margin` is the spread
    (sd) of the frozen head's AP across the cross-validation folds: a smaller gain is within what
    a different draw of images would change, and a tie keeps the simpler, frozen model.
    """
    from sklearn.metrics import average_precision_score

    y_val = np.asarray(y_val).astype(int)
    if len(np.unique(y_val)) < 2:
        return "head", "validation holds one class only, so fine-tuning cannot show a gain: the simpler frozen model is kept"
    frozen = float(average_precision_score(y_val, p_frozen))
    fine = float(average_precision_score(y_val, p_fine))
    gain = fine - frozen
    if gain > margin:
        return "fine_tune", (f"validation AP {fine:.4f} fine-tuned vs {frozen:.4f} frozen (out-of-fold): a gain of {gain:.4f}, "
                             f"more than the fold spread {margin:.4f}")
    return "head", (f"validation AP {fine:.4f} fine-tuned vs {frozen:.4f} frozen (out-of-fold): a gain of {gain:.4f} is not "
                    f"more than the fold spread {margin:.4f}, so the simpler frozen model is kept")


def phase_summary(history: pd.DataFrame, validation_f1: float | None, threshold: float, seconds: float) -> dict:
    """One phase for metadata.json: epochs, best epoch, validation F1 at its own threshold, time."""
    return {
        "epochs_run": int(len(history)), "best_epoch": int(history.attrs.get("best_epoch", len(history))),
        "resumed_from_epoch": int(history.attrs.get("resumed_from", 0)),
        "validation_f1": None if validation_f1 is None else float(validation_f1), "threshold": float(threshold),
        "seconds": round(float(seconds), 1),
    }


@dataclass
class PhaseChoice:
    """The outcome of fine-tuning and the comparison with the head-only model."""

    kept: str  # "head" or "fine_tune"
    reason: str
    extractor: keras.Model  # the kept model's parts (the frozen ones when kept == "head")
    head: keras.Model
    choice: object  # ThresholdChoice of the kept model
    probability: Callable[[np.ndarray], np.ndarray]  # manifest-row mask -> probabilities (kept model)
    testing: np.ndarray  # manifest-row mask of the testing rows to evaluate (files that failed are out)
    history: pd.DataFrame  # both phases, column `phase`
    dropped: pd.DataFrame  # manifest index -> reason: files that failed to decode while fine-tuning
    phases: dict
    policy: str
    estimate: str | None = None  # fine_tune.judge "folds", fine-tuned model kept: its cross-validated estimate


def score_rows(classifier: keras.Model, manifest: pd.DataFrame, mask: np.ndarray, spec: InputSpec,
               probabilities: np.ndarray) -> tuple[np.ndarray, pd.DataFrame]:
    """Fill `probabilities` for the manifest rows of `mask` with the classifier's; returns the mask without the files
    that failed to decode, and those (manifest index -> reason)."""
    positions = np.flatnonzero(mask)
    p, failed = predict_paths(classifier, manifest["path"].to_numpy()[positions].tolist(), spec)
    probabilities[positions] = p
    mask = mask.copy()
    mask[positions[list(failed)]] = False
    return mask, pd.DataFrame({"reason": pd.Series({manifest.index[positions[k]]: r for k, r in failed.items()}, dtype=object)})


def fine_tune_settings(ft, policy: str) -> dict:
    """The fine_tune settings a run used, for metadata.json's fine_tune phase (views only where cached_top uses them)."""
    return ({"unfreeze": ft.unfreeze, "learning_rate": ft.learning_rate, "augment": ft.augment, "precision": policy,
             "method": ft.method, "schedule": ft.schedule}
            | ({"views": ft.views} if ft.method == "cached_top" else {}))


def both_phases(head_history: pd.DataFrame, fine_history: pd.DataFrame) -> pd.DataFrame:
    """The head's epochs then the fine-tuning's, numbered on, with a `phase` column (history.csv)."""
    history = pd.concat([
        head_history.assign(phase="head"),
        fine_history.assign(phase="fine_tune", epoch=fine_history["epoch"] + len(head_history)),
    ], ignore_index=True)
    history.attrs.update(best_epoch=head_history.attrs["best_epoch"], monitor=head_history.attrs.get("monitor"))
    return history


def fine_tune_line(unfreeze: int | str, result: FineTuneResult) -> str:
    """One console line about a fine-tuning run."""
    what = f"{unfreeze} layers" if isinstance(unfreeze, int) else f"from {unfreeze}"
    if result.validation_probabilities is not None:
        what += ", top trained on cached activations"
    resumed = result.history.attrs.get("resumed_from", 0)
    return (f"fine-tuned ({what}: {len(result.unfrozen)} layers trained, BatchNorm frozen, {result.policy}): "
            f"{len(result.history)} epochs, best epoch {result.history.attrs['best_epoch']}"
            + (f", resumed after epoch {resumed}" if resumed else "") + f" ({result.seconds:.0f} s)")


def fine_tune_and_choose(
    cfg: Config, extractor: keras.Model, head: keras.Model, manifest: pd.DataFrame, y: np.ndarray, sets: dict,
    head_history: pd.DataFrame, head_probability: Callable[[np.ndarray], np.ndarray], head_seconds: float,
    devices: Devices, checkpoint_dir: Path | None, callbacks: Sequence = (), console=None,
    frozen_reference: tuple[np.ndarray, float, object] | None = None, task: Task | None = None,
) -> PhaseChoice:
    """Fine-tune, then keep the model (head only, or fine-tuned) with the better validation score.

    frozen_reference: (the frozen head's out-of-fold probabilities per manifest row, the folds' AP
    spread, its threshold choice) from cross-validation: then :func:`judge_fine_tuning` decides,
    else the validation F1s (:func:`compare_phases`).
    """
    from keeneye.evaluation.threshold import choose_configured_threshold
    from keeneye.training.distribute import mixed_precision_policy

    say = console.print if console is not None else (lambda *a, **k: None)
    policy, note = mixed_precision_policy(cfg.training.mixed_precision, devices)
    if note:
        say(f"[yellow]note:[/] {note}")
    ft = cfg.fine_tune
    result = fine_tune(cfg, extractor, head, manifest[sets["training"]], y[sets["training"]],
                       manifest[sets["validation"]], y[sets["validation"]], devices, policy, checkpoint_dir, callbacks,
                       task=task)
    say(fine_tune_line(ft.unfreeze, result), highlight=False)

    size = InputSpec(cfg.model.image_size, cfg.model.resize, reduced_decode=cfg.model.reduced_decode)
    classifier = build_classifier(result.extractor, result.head)
    probabilities = np.full(len(manifest), np.nan, np.float32)
    dropped = [result.dropped]

    def predict_rows(mask: np.ndarray) -> np.ndarray:
        scored, failed = score_rows(classifier, manifest, mask, size, probabilities)
        dropped.append(failed)
        return scored

    validation = predict_rows(sets["validation"])
    y_val = y[validation]
    head_p, fine_p = head_probability(validation), probabilities[validation]
    fine_choice = choose_configured_threshold(cfg.evaluation, y_val, fine_p)
    if frozen_reference is not None:
        oof, margin, head_choice = frozen_reference
        kept, reason = judge_fine_tuning(y_val, oof[validation], fine_p, margin)
    else:
        head_choice = choose_configured_threshold(cfg.evaluation, y_val, head_p)
        kept, reason = compare_phases(y_val, head_p, head_choice.validation_f1, fine_p, fine_choice.validation_f1)
    show = lambda f: "n/a" if f is None else f"{f:.4f}"  # noqa: E731
    say(f"validation F1: head only {show(head_choice.validation_f1)} (threshold {head_choice.threshold:.4f}), "
        f"fine-tuned {show(fine_choice.validation_f1)} (threshold {fine_choice.threshold:.4f}) -> keeping the "
        f"[bold]{'fine-tuned' if kept == 'fine_tune' else 'head-only'}[/] model: {reason}", highlight=False)

    testing = sets["testing"]
    if kept == "fine_tune":
        testing = predict_rows(testing)
    history = both_phases(head_history, result.history)
    phases = {
        "head": phase_summary(head_history, head_choice.validation_f1, head_choice.threshold, head_seconds),
        "fine_tune": phase_summary(result.history, fine_choice.validation_f1, fine_choice.threshold, result.seconds)
        | fine_tune_settings(ft, policy) | {"layers_trained": len(result.unfrozen), "judge": "validation"},
    }
    frames = [f for f in dropped if len(f)]
    all_dropped = pd.concat(frames) if frames else pd.DataFrame({"reason": pd.Series(dtype=object)})
    all_dropped = all_dropped[~all_dropped.index.duplicated()]
    if kept == "fine_tune":
        return PhaseChoice(kept, reason, result.extractor, result.head, fine_choice, lambda mask: probabilities[mask],
                           testing, history, all_dropped, phases, policy)
    return PhaseChoice(kept, reason, extractor, head, head_choice, head_probability, testing, history, all_dropped, phases, policy)


# --- fine_tune.judge "folds": fine-tuning cross-validated like the head --------------------------------------------


@dataclass
class FoldFineTunes:
    """Fine-tunes of the cross-validation folds: what the judge and the refit need."""

    oof: np.ndarray  # per row: the probability of the fine-tune whose fold held it out (NaN: failed to decode)
    best_epochs: list[int]  # per fold: the epoch early stopping kept
    seconds: float

    @property
    def refit_epochs(self) -> int:
        """The published fine-tune's epoch count: the median of the folds' best epochs (no rows are left to stop on)."""
        return max(1, int(round(float(np.median(self.best_epochs)))))


class FoldFineTuner:
    """Fine-tuning cross-validated over the head's group folds, then refit on every row (``fine_tune.judge: "folds"``).

    Why: a validation split holds the defects of a few parts; the model that early stopping chose on it
    was then judged on it, and on magnetic-tile deep fine-tunes that won there lost on every test fold
    (README). Each fold's fine-tune starts from that fold's frozen head (which never saw the fold), so the
    fine-tuned and the frozen out-of-fold probabilities cover the same rows and pair fold by fold.

    `rows`/`labels`: training + validation (manifest rows, column `path`), in the order of `folds`.
    With cached_top the frozen bottom runs once over all rows (and views) and every fine-tune trains on it.
    """

    def __init__(self, cfg: Config, extractor: keras.Model, rows: pd.DataFrame, labels: np.ndarray, devices: Devices,
                 policy: str = "float32", checkpoint_dir: Path | None = None, callbacks: Sequence = (),
                 task: Task | None = None) -> None:
        self.cfg, self.extractor, self.rows, self.labels = cfg, extractor, rows, np.asarray(labels)
        self.devices, self.policy, self.checkpoint_dir, self.callbacks, self.task = devices, policy, checkpoint_dir, callbacks, task
        self.spec = InputSpec(cfg.model.image_size, cfg.model.resize, reduced_decode=cfg.model.reduced_decode)
        self.dropped: list[pd.DataFrame] = []
        self.activations, self.decoded = None, np.ones(len(rows), bool)
        if cfg.fine_tune.method == "cached_top":
            self._cache_bottom()

    def _cache_bottom(self) -> None:
        from keeneye.training.cached_top import cache_views, dropped_frame

        views = self.cfg.fine_tune.views
        bottom = cached_top_parts(self.cfg, self.extractor, None)[3]
        advance = None
        if self.task is not None:
            self.task.step(f"fine-tuning: frozen bottom over {len(self.rows)} training + validation images x {views} views",
                           len(self.rows))
            advance = self.task.advance
        self.activations, failed = cache_views(bottom, self.rows["path"].tolist(), self.spec, views,
                                               self.cfg.training.batch_size, advance)
        self.decoded[list(failed)] = False
        self.dropped.append(dropped_frame(self.rows.index, failed))

    def cross_validate(self, fold_heads: Sequence[keras.Model], folds: np.ndarray) -> FoldFineTunes:
        """One fine-tune per fold from its frozen head, early-stopping on the held-out fold, which it then scores."""
        started = time.perf_counter()
        oof = np.full(len(self.labels), np.nan, np.float32)
        best_epochs = []
        for k, head in enumerate(fold_heads):
            held = folds == k
            label = f"fine-tuning fold {k + 1}/{len(fold_heads)}"
            result, oof[held] = self._fine_tune(self.cfg, head, ~held, held, f"fold_{k}", label)
            best_epochs.append(int(result.history.attrs.get("best_epoch", len(result.history))))
        return FoldFineTunes(oof, best_epochs, time.perf_counter() - started)

    def refit(self, head: keras.Model, epochs: int) -> FineTuneResult:
        """The fine-tune to publish: from the published frozen head, on every row, for `epochs` (no early stopping)."""
        cfg = self.cfg.model_copy(update={"fine_tune": self.cfg.fine_tune.model_copy(update={"epochs": epochs, "patience": 0})})
        every, none = np.ones(len(self.labels), bool), np.zeros(len(self.labels), bool)
        return self._fine_tune(cfg, head, every, none, "refit", "fine-tuning on all rows")[0]

    def _fine_tune(self, cfg: Config, head: keras.Model, train: np.ndarray, held: np.ndarray, name: str,
                   label: str) -> tuple[FineTuneResult, np.ndarray]:
        """Fine-tune copies of the extractor and `head` on the `train` rows, early-stopping on the `held` ones (if any);
        the result and the held rows' probabilities (NaN where a file failed)."""
        folder = None if self.checkpoint_dir is None else self.checkpoint_dir / name
        callbacks = (*self.callbacks, self.task.keras_callback(label)) if self.task is not None else self.callbacks
        if self.activations is None:  # method images: the ordinary fine-tune, then its probabilities of the held rows
            rows, y = self.rows, self.labels
            result = fine_tune(cfg, self.extractor, head, rows[train], y[train], rows[held], y[held], self.devices,
                               self.policy, folder, callbacks)
            p = np.full(len(rows), np.nan, np.float32)
            _, failed = score_rows(build_classifier(result.extractor, result.head), rows, held, self.spec, p)
            self.dropped += [result.dropped, failed]
            return result, p[held]
        return self._fine_tune_cached(cfg, head, train, held, folder, callbacks)

    def _fine_tune_cached(self, cfg: Config, head: keras.Model, train: np.ndarray, held: np.ndarray, folder: Path | None,
                          callbacks: Sequence) -> tuple[FineTuneResult, np.ndarray]:
        train_at, held_at = np.flatnonzero(train & self.decoded), np.flatnonzero(held & self.decoded)
        result, held_p = fit_cached_top(cfg, self.extractor, head, self.activations, train_at, self.labels[train_at],
                                        view_of(self.activations, 0, held_at), self.labels[held_at], folder, callbacks)
        p = np.full(int(held.sum()), np.nan, np.float32)
        p[self.decoded[held]] = held_p
        return result, p

    def dropped_files(self) -> pd.DataFrame:
        """manifest index -> reason for the files that failed to decode while fine-tuning (each once)."""
        frames = [f for f in self.dropped if len(f)]
        if not frames:
            return pd.DataFrame({"reason": pd.Series(dtype=object)})
        found = pd.concat(frames)
        return found[~found.index.duplicated()]


def fine_tune_folds_and_choose(
    cfg: Config, extractor: keras.Model, head: keras.Model, fold_heads: Sequence[keras.Model], cv, manifest: pd.DataFrame,
    y: np.ndarray, sets: dict, head_history: pd.DataFrame, head_probability: Callable[[np.ndarray], np.ndarray],
    head_seconds: float, devices: Devices, checkpoint_dir: Path | None, callbacks: Sequence = (), console=None,
    task: Task | None = None,
) -> PhaseChoice:
    """fine_tune.judge "folds": fine-tune in every fold of `cv` (crossval.CrossValidation, over training + validation),
    keep fine-tuning only when its out-of-fold AP beats the frozen head's by more than one paired standard error
    (crossval.gain_verdict), and then publish a fine-tune of `head` (the frozen head refit on every row) on every row
    for the median of the folds' best epochs, at the threshold chosen on the fine-tuned out-of-fold probabilities.
    """
    from keeneye.evaluation.threshold import choose_configured_threshold
    from keeneye.training.crossval import fold_scores, gain_verdict, rounded_estimate
    from keeneye.training.distribute import mixed_precision_policy

    started = time.perf_counter()
    say = console.print if console is not None else (lambda *a, **k: None)
    policy, note = mixed_precision_policy(cfg.training.mixed_precision, devices)
    if note:
        say(f"[yellow]note:[/] {note}")
    ft = cfg.fine_tune
    pool = sets["training"] | sets["validation"]
    tuner = FoldFineTuner(cfg, extractor, manifest[pool], y[pool], devices, policy, checkpoint_dir, callbacks, task)
    tuned = tuner.cross_validate(fold_heads, cv.folds)
    scored = np.isfinite(tuned.oof)  # rows whose files decoded: both models are judged on the same rows
    y_pool, folds = y[pool][scored], cv.folds[scored]
    fine_choice = choose_configured_threshold(cfg.evaluation, y_pool, tuned.oof[scored], source="out_of_fold")
    fine_scores = fold_scores(y_pool, tuned.oof[scored], folds, fine_choice.threshold)
    frozen_scores = fold_scores(y_pool, cv.best.oof[scored], folds, cv.choice.threshold)
    verdict = gain_verdict(fine_scores["average_precision"], frozen_scores["average_precision"], "the fine-tuned model",
                           "the frozen head", "the simpler frozen model")
    kept = "fine_tune" if verdict["kept"] else "head"
    estimate = (f"F1 {fine_scores['f1_mean']:.4f} +- {fine_scores['f1_sd']:.4f}, AP {fine_scores['average_precision_mean']:.4f} "
                f"+- {fine_scores['average_precision_sd']:.4f} over {len(fold_heads)} group folds (fine-tuned, threshold "
                f"{fine_choice.threshold:.4f})")
    say(f"fine-tuned in {len(fold_heads)} group folds (best epochs {tuned.best_epochs}, {tuned.seconds:.0f} s): cross-validated "
        f"{estimate}; frozen head AP {frozen_scores['average_precision_mean']:.4f} -> keeping the "
        f"[bold]{'fine-tuned' if kept == 'fine_tune' else 'head-only'}[/] model: {verdict['reason']}", highlight=False)
    folds_record = {"judge": "folds", "folds": len(fold_heads), "fold_best_epochs": tuned.best_epochs, "verdict": verdict,
                    "estimate": rounded_estimate(fine_scores),
                    "threshold_choice": fine_choice.to_dict(), "folds_seconds": round(tuned.seconds, 1)}
    settings = fine_tune_settings(ft, policy)
    head_phase = phase_summary(head_history, cv.choice.validation_f1, cv.choice.threshold, head_seconds)
    if kept == "head":
        history = head_history.assign(phase="head")
        history.attrs.update(head_history.attrs)
        phases = {"head": head_phase, "fine_tune": {"epochs_run": 0, "best_epoch": 0, "validation_f1": fine_choice.validation_f1,
                                                    "threshold": fine_choice.threshold,
                                                    "seconds": round(time.perf_counter() - started, 1)}
                  | folds_record | settings}
        return PhaseChoice("head", verdict["reason"], extractor, head, cv.choice, head_probability, sets["testing"], history,
                           tuner.dropped_files(), phases, policy)

    result = tuner.refit(head, tuned.refit_epochs)
    say(fine_tune_line(ft.unfreeze, result) + f", on all {int(pool.sum())} training + validation images", highlight=False)
    probabilities = np.full(len(manifest), np.nan, np.float32)
    testing, failed = score_rows(build_classifier(result.extractor, result.head), manifest, sets["testing"], tuner.spec,
                                 probabilities)
    dropped = pd.concat([tuner.dropped_files(), failed])
    seconds = time.perf_counter() - started  # the pass of the bottom, the fold fine-tunes, the refit, the test images
    phases = {"head": head_phase,
              "fine_tune": phase_summary(result.history, fine_choice.validation_f1, fine_choice.threshold, seconds)
              | folds_record | settings | {"layers_trained": len(result.unfrozen)}}
    return PhaseChoice("fine_tune", verdict["reason"], result.extractor, result.head, fine_choice, lambda mask: probabilities[mask],
                       testing, both_phases(head_history, result.history), dropped[~dropped.index.duplicated()], phases, policy,
                       estimate=estimate)
