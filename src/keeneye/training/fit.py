"""Training phases that can be interrupted and resumed: the head on cached features, and the loop both phases share.

A phase is ``model.fit`` over a :mod:`keeneye.training.pipeline` dataset (order fixed by seed and
epoch) with one callback, :class:`PhaseCheckpoint`, that does early stopping on the validation
loss, keeps the best weights and, after every finished epoch, writes everything a resumed run
needs into the phase's checkpoint folder:

    <phase folder>/epoch-0007/weights.npz     model weights after epoch 7
                             optimizer.npz   optimizer state (Adam moments, iteration count)
                             state.json      history so far, early-stopping state, best epoch
    <phase folder>/best-0005.npz             the best weights so far (epoch 5)
    <phase folder>/final/                    written once the phase is over: best weights + history

Each epoch folder is written under a temporary name and renamed, so a crash leaves the previous
epoch's checkpoint intact. Random layers (dropout, augmentation) are re-seeded from (seed,
epoch) at the start of every epoch, so nothing random carries over from one epoch to the next
except through the saved weights. Together with the plan-ordered data this makes a run resumed
after epoch k compute what the uninterrupted run computed (bit for bit on CPU with op
determinism; the tests check it).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import keras
import numpy as np
import pandas as pd
from sklearn.utils.class_weight import compute_class_weight

from keeneye.config import HeadConfig, TrainingConfig
from keeneye.model.head import build_head

FINAL = "final"
STATE_FILE = "state.json"


def balanced_class_weight(labels: np.ndarray) -> dict[int, float]:
    """scikit-learn's 'balanced' weights: n_samples / (2 * n_class)."""
    classes = np.unique(labels)
    weights = compute_class_weight("balanced", classes=classes, y=labels)
    return {int(c): float(w) for c, w in zip(classes, weights)}


def sample_weights(labels: np.ndarray, class_weight: str) -> np.ndarray:
    """Per-row weights: the class weight of each row's label ("balanced"), else 1."""
    labels = np.asarray(labels).astype(int)
    if class_weight != "balanced" or len(labels) == 0:
        return np.ones(len(labels), np.float32)
    table = balanced_class_weight(labels)
    return np.array([table[int(v)] for v in labels], np.float32)


def fused_adam(variables: Sequence, learning_rate: float, beta_1: float = 0.9, beta_2: float = 0.999,
               epsilon: float = 1e-7):
    """apply(gradients): keras.optimizers.Adam's update (same defaults), one TensorFlow kernel per variable.

    Why: inside the fold heads' compiled epoch loop (crossval.train_head) Keras' Adam runs about a dozen
    small ops per variable per step, and on a 2-core CPU those tiny ops were about 40% of an epoch of a
    128-unit head. ``ResourceApplyAdam`` computes the same rule (lr * sqrt(1 - b2^t) / (1 - b1^t) *
    m / (sqrt(v) + epsilon)) in one op; the fold-head test checks it against Keras' Adam step for step.
    """
    import tensorflow as tf

    slots = [(tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False), tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False))
             for v in variables]
    step = tf.Variable(0.0, trainable=False)

    def apply(gradients) -> None:
        step.assign_add(1.0)
        for variable, gradient, (m, v) in zip(variables, gradients, slots):
            tf.raw_ops.ResourceApplyAdam(
                var=getattr(variable, "value", variable).handle, m=m.handle, v=v.handle, beta1_power=tf.pow(beta_1, step),
                beta2_power=tf.pow(beta_2, step), lr=learning_rate, beta1=beta_1, beta2=beta_2, epsilon=epsilon, grad=gradient)

    return apply


# ------------------------------------------------------------------------------------------------
# Checkpoint files
# ------------------------------------------------------------------------------------------------


def _save_arrays(path: Path, arrays: Sequence[np.ndarray]) -> None:
    temporary = path.with_name(f".{path.stem}-{uuid.uuid4().hex[:8]}.tmp.npz")
    np.savez(temporary, **{f"a{i:05d}": np.asarray(a) for i, a in enumerate(arrays)})
    os.replace(temporary, path)


def _load_arrays(path: Path) -> list[np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return [data[key] for key in sorted(data.files)]


def _optimizer_variables(model) -> list:
    return list(model.optimizer.variables)


def _restore_optimizer(model, arrays: list[np.ndarray]) -> None:
    """Build the optimizer's slots for the trainable weights, then load the saved values into them."""
    optimizer = model.optimizer
    with model.distribute_strategy.scope():
        if not optimizer.built:
            optimizer.build(model.trainable_variables)
    variables = _optimizer_variables(model)
    if len(variables) != len(arrays):
        raise RuntimeError(f"checkpoint holds {len(arrays)} optimizer values, the optimizer has {len(variables)}")
    for variable, value in zip(variables, arrays):
        variable.assign(value)


@dataclass
class PhaseState:
    """What survives an interruption: progress, history and the early-stopping bookkeeping."""

    epochs_done: int = 0
    history: list[dict] = field(default_factory=list)
    best: float | None = None
    best_epoch: int = 0  # 1-based; 0: none yet
    wait: int = 0
    stopped: bool = False

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=1, allow_nan=True)

    @classmethod
    def from_json(cls, text: str) -> "PhaseState":
        return cls(**json.loads(text))


def latest_checkpoint(folder: Path | None) -> Path | None:
    """The newest complete epoch folder (its state.json is written last), or None."""
    if folder is None or not folder.is_dir():
        return None
    complete = [p for p in folder.glob("epoch-*") if p.is_dir() and not p.name.endswith(".tmp") and (p / STATE_FILE).is_file()]
    return max(complete, key=lambda p: int(p.name.split("-")[1]), default=None)


def final_result(folder: Path | None) -> tuple[list[np.ndarray], PhaseState] | None:
    """(best weights, state) of a phase that already finished, or None."""
    if folder is None or not (folder / FINAL / STATE_FILE).is_file():
        return None
    return _load_arrays(folder / FINAL / "weights.npz"), PhaseState.from_json((folder / FINAL / STATE_FILE).read_text())


def write_final(folder: Path | None, weights: list[np.ndarray], state: PhaseState) -> None:
    """Mark a phase finished: its result, then its epoch checkpoints are no longer needed."""
    if folder is None:
        return
    temporary = folder / f".{FINAL}-{uuid.uuid4().hex[:8]}.tmp"
    temporary.mkdir(parents=True)
    _save_arrays(temporary / "weights.npz", weights)
    (temporary / STATE_FILE).write_text(state.to_json())
    shutil.rmtree(folder / FINAL, ignore_errors=True)
    os.rename(temporary, folder / FINAL)
    for stale in list(folder.glob("epoch-*")) + list(folder.glob("best-*.npz")):
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------
# The callback
# ------------------------------------------------------------------------------------------------


def seed_state_variables(model) -> list:
    """The state variables of the model's random layers (keras.random.SeedGenerator: [seed, counter])."""
    seen: set[int] = set()
    found = []
    for variable in model.variables:
        if variable.name == "seed_generator_state" and id(variable) not in seen:
            seen.add(id(variable))
            found.append(variable)
    return found


class PhaseCheckpoint(keras.callbacks.Callback):
    """Early stopping on `monitor` with the best weights kept, per-epoch reseeding and per-epoch checkpoints."""

    def __init__(self, folder: Path | None, monitor: str, patience: int, state: PhaseState,
                 best_weights: list[np.ndarray] | None) -> None:
        super().__init__()
        self.folder = folder
        self.monitor = monitor
        self.patience = patience
        self.state = state
        self.best_weights = best_weights
        self._seeds: list[tuple[object, int]] = []

    def on_train_begin(self, logs=None) -> None:
        self._seeds = [(v, int(np.asarray(v.numpy())[0])) for v in seed_state_variables(self.model)]

    def on_epoch_begin(self, epoch: int, logs=None) -> None:
        # Random layers draw from (layer seed, epoch): an epoch's randomness does not depend on
        # how many epochs ran in this process before it (resume), nor on the previous epochs' draws.
        for variable, first in self._seeds:
            variable.assign(np.array([first, epoch << 20], dtype=variable.dtype))

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        logs = dict(logs or {})
        row = {"epoch": epoch + 1, **{k: float(v) for k, v in logs.items()}}
        state = self.state
        state.history.append(row)
        state.epochs_done = epoch + 1
        value = row.get(self.monitor)
        improved = value is not None and np.isfinite(value) and (state.best is None or value < state.best)
        if improved:
            state.best, state.best_epoch, state.wait = float(value), epoch + 1, 0
            if self.patience > 0:
                self.best_weights = self.model.get_weights()
        else:
            state.wait += 1
        if self.patience > 0 and state.wait >= self.patience:
            state.stopped = True
            self.model.stop_training = True
        self._write(epoch + 1, improved)

    def _write(self, epoch: int, improved: bool) -> None:
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        if improved and self.patience > 0:
            _save_arrays(self.folder / f"best-{epoch:04d}.npz", self.best_weights)
        temporary = self.folder / f"epoch-{epoch:04d}.{uuid.uuid4().hex[:8]}.tmp"
        temporary.mkdir()
        _save_arrays(temporary / "weights.npz", self.model.get_weights())
        _save_arrays(temporary / "optimizer.npz", [np.asarray(v.numpy()) for v in _optimizer_variables(self.model)])
        (temporary / STATE_FILE).write_text(self.state.to_json())
        final = self.folder / f"epoch-{epoch:04d}"
        shutil.rmtree(final, ignore_errors=True)
        os.rename(temporary, final)
        for old in self.folder.glob("epoch-*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
        for old in self.folder.glob("best-*.npz"):
            if old.name != f"best-{self.state.best_epoch:04d}.npz":
                old.unlink(missing_ok=True)

    def on_train_end(self, logs=None) -> None:
        if self.patience > 0 and self.best_weights is not None:
            self.model.set_weights(self.best_weights)



@dataclass
class PhaseOutcome:
    history: pd.DataFrame  # epoch, loss, ..., val_loss, ...; attrs: best_epoch, monitor, resumed_from
    weights: list[np.ndarray]  # the weights the phase ends with (the best epoch's with early stopping)


def run_phase(
    model, train_dataset_for, steps_per_epoch: int, epochs: int, validation, monitor: str, patience: int,
    folder: Path | None, callbacks: Sequence = (), verbose: int = 0,
) -> PhaseOutcome:
    """fit `model` (compiled) for up to `epochs`, resuming from `folder` when it holds a checkpoint.

    `train_dataset_for(first_epoch)` returns the dataset for epochs first_epoch .. epochs-1.
    """
    finished = final_result(folder)
    if finished is not None:  # the phase ended before the interruption: reuse its result
        weights, state = finished
        model.set_weights(weights)
        return PhaseOutcome(_history(state, monitor, resumed_from=state.epochs_done), weights)

    state, best_weights, resumed_from = PhaseState(), None, 0
    checkpoint = latest_checkpoint(folder)
    if checkpoint is not None:
        state = PhaseState.from_json((checkpoint / STATE_FILE).read_text())
        model.set_weights(_load_arrays(checkpoint / "weights.npz"))
        _restore_optimizer(model, _load_arrays(checkpoint / "optimizer.npz"))
        best_file = folder / f"best-{state.best_epoch:04d}.npz"
        best_weights = _load_arrays(best_file) if best_file.is_file() else None
        resumed_from = state.epochs_done
    keeper = PhaseCheckpoint(folder, monitor, patience, state, best_weights)
    if state.stopped or state.epochs_done >= epochs:
        keeper.set_model(model)
        keeper.on_train_end()
    else:
        with _multi_worker_fit(model):
            model.fit(
                train_dataset_for(state.epochs_done), steps_per_epoch=steps_per_epoch, epochs=epochs,
                initial_epoch=state.epochs_done, validation_data=validation, callbacks=[keeper, *callbacks], shuffle=False,
                verbose=verbose,
            )
    weights = model.get_weights()
    write_final(folder, weights, state)
    return PhaseOutcome(_history(state, monitor, resumed_from), weights)


@contextlib.contextmanager
def _multi_worker_fit(model):
    """Work around Keras 3 + MultiWorkerMirroredStrategy (keras-team/keras#20585): fit() first pulls one
    distributed batch and reduces it eagerly to build the model symbolically, which the collective strategy
    cannot do; and it reduces the logged scalars with a "MEAN" along axis 0, which fails too. Under that
    strategy only: build here from shapes, let fit() take the strategy from the scope rather than from the
    model (the same strategy; fit then skips that symbolic build), and give every logged value an axis of
    length 1 (the logs are then the mean over the replicas)."""
    import tensorflow as tf

    strategy = model.distribute_strategy
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        yield
        return
    shape = (1, *model.input_shape[1:])
    sample = (np.zeros(shape, model.input.dtype), np.zeros((1,), np.float32), np.ones((1,), np.float32))
    # fit() reduces the logged scalars with strategy.reduce("MEAN", value, axis=0), which needs an axis:
    # give each log value one (the reduce then averages the replicas' values into a scalar).
    for name in ("train_step", "test_step"):
        setattr(model, name, _with_batch_axis(getattr(model, name)))
    with strategy.scope():
        model._symbolic_build(data_batch=sample)
        saved, model._distribute_strategy = model._distribute_strategy, None
        try:
            yield
        finally:
            model._distribute_strategy = saved


def _with_batch_axis(step):
    import tensorflow as tf

    def step_with_axis(data):
        return {name: tf.reshape(value, [1]) for name, value in step(data).items()}

    return step_with_axis


def _history(state: PhaseState, monitor: str, resumed_from: int) -> pd.DataFrame:
    frame = pd.DataFrame(state.history)
    if frame.empty:
        frame = pd.DataFrame({"epoch": pd.Series(dtype=int)})
    frame["epoch"] = frame["epoch"].astype(int)
    frame.attrs["best_epoch"] = state.best_epoch if state.best_epoch else len(frame)
    frame.attrs["monitor"] = monitor
    frame.attrs["resumed_from"] = resumed_from
    return frame


# ------------------------------------------------------------------------------------------------
# The head on cached features
# ------------------------------------------------------------------------------------------------


def fit_head(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    val_features: np.ndarray,
    val_labels: np.ndarray,
    head_config: HeadConfig,
    training_config: TrainingConfig,
    verbose: int = 0,
    checkpoint_dir: Path | None = None,
    callbacks: Sequence = (),
    strategy=None,
    whole_epochs: bool = False,
):
    """Returns (head model with the best weights restored, history DataFrame with an `epoch` column).

    whole_epochs: run each epoch as one compiled call; callbacks then see one batch end per epoch
    (its last step), so it is for callers whose callbacks only count progress.

    Binary cross-entropy, Adam, early stopping on the validation loss (training loss without
    validation rows). ``training.class_weight`` weights the samples; ``training.oversample`` draws
    extra minority rows each epoch. With `checkpoint_dir` the phase can be resumed (see module doc).
    The returned head is always created outside `strategy` (plain variables, ready to be saved);
    under a strategy a copy is trained inside its scope and its weights copied back.
    """
    import keras
    import tensorflow as tf

    from keeneye.training.pipeline import EpochPlan, feature_dataset

    seed = training_config.seed
    keras.utils.set_random_seed(seed)
    dim = train_features.shape[1]
    head = build_head(dim, head_config.dense_units, head_config.dropout, seed=seed, l2=head_config.l2)
    strategy = strategy or tf.distribute.get_strategy()
    distributed = strategy is not tf.distribute.get_strategy()
    plan = EpochPlan(train_labels, training_config.batch_size, seed, shuffle=True, oversample=training_config.oversample)
    with strategy.scope():
        trained = build_head(dim, head_config.dense_units, head_config.dropout, seed=seed, l2=head_config.l2) if distributed else head
        if distributed:
            trained.set_weights(head.get_weights())
        trained.compile(
            optimizer=keras.optimizers.Adam(training_config.learning_rate),
            loss="binary_crossentropy",
            metrics=[keras.metrics.BinaryAccuracy(name="accuracy"), keras.metrics.AUC(name="auc")],
            # whole_epochs: one compiled call per epoch instead of per step: the same batches and updates
            # without Keras' per-step dispatch, most of a tiny head's time on a small CPU (casting refit,
            # loaded machine: 44 -> 35 s, same weights). Not under a strategy (the multi-worker workaround
            # below wraps single steps).
            steps_per_execution=plan.steps_per_epoch if whole_epochs and not distributed else 1,
        )
    has_validation = len(val_labels) > 0
    monitor = "val_loss" if has_validation else "loss"
    weights = sample_weights(train_labels, training_config.class_weight)
    validation = None
    if has_validation:
        val_plan = EpochPlan(val_labels, max(training_config.batch_size, 256), seed, shuffle=False)
        validation = feature_dataset(val_features, val_labels, None, val_plan, [0])
        validation = validation.apply(tf.data.experimental.assert_cardinality(val_plan.steps_per_epoch))
    outcome = run_phase(
        trained,
        lambda first: feature_dataset(train_features, train_labels, weights, plan, range(first, training_config.epochs)),
        plan.steps_per_epoch, training_config.epochs, validation, monitor, training_config.early_stopping_patience,
        checkpoint_dir, callbacks, verbose,
    )
    if distributed:
        head.set_weights(outcome.weights)
    return head, outcome.history


def data_fingerprint(manifest: pd.DataFrame, used: np.ndarray) -> str:
    """sha1 of the rows a run trains and evaluates on (path, content hash, label, split, used):
    a resumed run must see the same data as the run it continues."""
    import hashlib

    digest = hashlib.sha1()
    columns = manifest[["path", "sha1", "label", "split"]].astype(str).to_numpy()
    for row, ok in zip(columns, np.asarray(used)):
        digest.update(("\x1f".join(row) + ("\x1f1" if ok else "\x1f0") + "\n").encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------
# The exact linear head: standardised features + L2 logistic regression (head.fit "logistic")
# ------------------------------------------------------------------------------------------------


#: The regularisation strengths (C, inverse L2 penalty on standardised features) head.auto and
#: head.kind "logistic" choose from by cross-validation: on magnetic-tile the folds chose 1e-3..1e-2.
LOGISTIC_C_GRID: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


def fit_logistic(x: np.ndarray, y: np.ndarray, c: float, class_weight: str = "balanced", seed: int = 0):
    """StandardScaler + L2 LogisticRegression (lbfgs) fitted to convergence: deterministic, no epochs.

    Why: on a few hundred images, a linear model fitted exactly, with its one regularisation
    strength chosen by cross-validation, ranks magnetic-tile defects better than a dense head
    trained by Adam with early stopping (benchmarks/magnetic_tile.py, README). Returns the fitted
    scikit-learn pipeline; :func:`logistic_head` turns it into the Keras head.
    """
    return logistic_path(x, y, [c], class_weight, seed)[0]


def logistic_path(x: np.ndarray, y: np.ndarray, grid: Sequence[float], class_weight: str = "balanced", seed: int = 0) -> list:
    """fit_logistic for every C of `grid` (ascending), each fit warm-started from the previous C's solution.

    The scaler is fitted once; the optimum is unique (strictly convex), so warm starts change
    only the time (several times fewer lbfgs iterations along the path), not the result beyond
    the solver's tolerance.
    """
    import copy
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    x = np.asarray(x, np.float64)
    y = np.asarray(y).astype(int)
    scaler = StandardScaler().fit(x)
    z = scaler.transform(x)
    logistic = LogisticRegression(class_weight="balanced" if class_weight == "balanced" else None, max_iter=5000,
                                  tol=1e-6, warm_start=True, random_state=seed)
    fitted = []
    # One BLAS thread: these are small problems, and on a shared 2-core machine the threads' overhead made
    # the fits about 5x slower (measured side by side on the magnetic-tile embeddings, machine loaded).
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore", ConvergenceWarning)
        for c in sorted(float(v) for v in grid):
            logistic.set_params(C=c).fit(z, y)
            fitted.append(Pipeline([("standardise", scaler), ("logistic", copy.deepcopy(logistic))]))
    return fitted


def logistic_head(model) -> keras.Model:
    """The fitted scaler + logistic regression as the plain Keras head (Dense(1, sigmoid)), same probabilities."""
    from keeneye.model.head import linear_head

    scaler, logistic = model[0], model[-1]
    return linear_head(logistic.coef_.reshape(-1), float(logistic.intercept_[0]), scaler.mean_, scaler.scale_)


def fit_logistic_head(x: np.ndarray, y: np.ndarray, c: float, class_weight: str = "balanced", seed: int = 0) -> keras.Model:
    """fit_logistic, as the Keras head that goes into the bundle."""
    return logistic_head(fit_logistic(x, y, c, class_weight, seed))


def choose_logistic_c(x: np.ndarray, y: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, grid: Sequence[float],
                      class_weight: str = "balanced", seed: int = 0) -> tuple[float, str]:
    """(C, how) without cross-validation: the one value given; else the best validation AP (ties: smaller C);
    else, with no validation images of both classes, the middle of the grid."""
    from sklearn.metrics import average_precision_score

    grid = sorted(float(c) for c in grid)
    if len(grid) == 1:
        return grid[0], "pinned (head.logistic_c)"
    if len(y_val) == 0 or len(np.unique(y_val)) < 2:
        return grid[len(grid) // 2], "middle of head.logistic_c (no validation images of both classes to choose by)"
    scores = [average_precision_score(y_val, m.predict_proba(np.asarray(x_val, np.float64))[:, 1])
              for m in logistic_path(x, y, grid, class_weight, seed)]
    best = int(np.argmax(scores))
    return grid[best], f"highest validation AP ({scores[best]:.4f})"


def fit_logistic_published(x: np.ndarray, y: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, head_config: HeadConfig,
                           training_config: TrainingConfig) -> tuple[keras.Model, pd.DataFrame, str]:
    """head.kind "logistic": the head that goes into the bundle, a history in fit_head's shape (one
    "epoch": the exact fit), and how C was chosen. With cross-validation head.logistic_c holds the
    folds' choice alone."""
    c, how = choose_logistic_c(x, y, x_val, y_val, head_config.logistic_c, training_config.class_weight, training_config.seed)
    model = fit_logistic(x, y, c, training_config.class_weight, training_config.seed)
    history = pd.DataFrame({"epoch": [1], "loss": [_log_loss(model, x, y, training_config.class_weight)]})
    history.attrs.update(best_epoch=1, monitor="exact fit (lbfgs)", resumed_from=0)
    return logistic_head(model), history, f"C {c:g}, {how}"


def _log_loss(model, x: np.ndarray, y: np.ndarray, class_weight: str) -> float:
    from sklearn.metrics import log_loss

    p = model.predict_proba(np.asarray(x, np.float64))[:, 1]
    return float(log_loss(np.asarray(y).astype(int), p, sample_weight=sample_weights(y, class_weight), labels=[0, 1]))
