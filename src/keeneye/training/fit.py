"""Train the head on cached features: binary cross-entropy, Adam, early stopping on validation loss."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.utils.class_weight import compute_class_weight

from keeneye.config import HeadConfig, TrainingConfig
from keeneye.model.head import build_head


def balanced_class_weight(labels: np.ndarray) -> dict[int, float]:
    """scikit-learn's 'balanced' weights: n_samples / (2 * n_class)."""
    classes = np.unique(labels)
    weights = compute_class_weight("balanced", classes=classes, y=labels)
    return {int(c): float(w) for c, w in zip(classes, weights)}


def fit_head(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    val_features: np.ndarray,
    val_labels: np.ndarray,
    head_config: HeadConfig,
    training_config: TrainingConfig,
    verbose: int = 0,
):
    """Returns (head model with the best weights restored, history DataFrame with an `epoch` column)."""
    import keras

    keras.utils.set_random_seed(training_config.seed)
    head = build_head(train_features.shape[1], head_config.dense_units, head_config.dropout, seed=training_config.seed)
    head.compile(
        optimizer=keras.optimizers.Adam(training_config.learning_rate),
        loss="binary_crossentropy",
        metrics=[keras.metrics.BinaryAccuracy(name="accuracy"), keras.metrics.AUC(name="auc")],
    )
    has_validation = len(val_labels) > 0 and len(np.unique(val_labels)) > 0
    monitor = "val_loss" if has_validation else "loss"
    callbacks = []
    if training_config.early_stopping_patience > 0:  # 0 disables early stopping (documented in the config)
        callbacks.append(
            keras.callbacks.EarlyStopping(
                monitor=monitor, patience=training_config.early_stopping_patience, restore_best_weights=True
            )
        )
    class_weight = balanced_class_weight(train_labels) if training_config.class_weight == "balanced" else None
    history = head.fit(
        train_features,
        train_labels.astype("float32"),
        validation_data=(val_features, val_labels.astype("float32")) if has_validation else None,
        epochs=training_config.epochs,
        batch_size=training_config.batch_size,
        class_weight=class_weight,
        callbacks=callbacks,
        shuffle=True,
        verbose=verbose,
    )
    frame = pd.DataFrame(history.history)
    frame.insert(0, "epoch", np.arange(1, len(frame) + 1))
    best_epoch = int(frame[monitor].idxmin()) + 1 if callbacks else len(frame)
    frame.attrs["best_epoch"] = best_epoch
    frame.attrs["monitor"] = monitor
    return head, frame
