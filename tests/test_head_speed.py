"""The head's speed paths learn what the step-by-step paths learn: whole epochs as one compiled call
(the refit's ``fit(steps_per_execution=...)`` and the fold heads' graph loop). Synthetic features: no backbone."""

from __future__ import annotations

import numpy as np

from keeneye.config import HeadConfig, TrainingConfig
from keeneye.training.crossval import HeadCandidate, train_head
from keeneye.training.fit import fit_head


def features(n: int = 150, d: int = 24, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] + 0.3 * rng.normal(size=n) > 0.4).astype(int)
    return x, y


def test_whole_epoch_refit_trains_the_same_weights_and_history_as_per_step_calls() -> None:
    x, y = features()
    training = TrainingConfig(epochs=3, batch_size=16, seed=3, early_stopping_patience=0, learning_rate=0.02)
    head = HeadConfig(dense_units=[8], dropout=0.1)
    empty = x[:0], y[:0]
    stepwise, history_steps = fit_head(x, y, *empty, head, training)
    whole, history_whole = fit_head(x, y, *empty, head, training, whole_epochs=True)
    for a, b in zip(stepwise.get_weights(), whole.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(history_steps["loss"], history_whole["loss"], rtol=1e-5)
    assert len(history_whole) == 3 and history_whole["loss"].iloc[-1] < history_whole["loss"].iloc[0]  # it did learn


def test_fold_head_graph_epochs_visit_every_batch_including_the_short_last_one() -> None:
    # 150 rows, batch 16: 9 full batches and one of 6. A loop that dropped or padded the last batch would
    # leave the head elsewhere than Adam over exactly these batches; compare with a hand-written step loop.
    import keras
    import tensorflow as tf

    from keeneye.model.head import build_head

    x, y = features(seed=1)
    training = TrainingConfig(epochs=2, batch_size=16, seed=0, early_stopping_patience=0)
    candidate = HeadCandidate("linear", (), 0.0, 0.0, "none")
    trained, best, p = train_head(x, y, candidate, training, 2, x[:20], y[:20], seed=5)
    assert best == 2 and p.shape == (20,)

    keras.utils.set_random_seed(5)
    reference = build_head(x.shape[1], (), 0.0, seed=5)
    optimizer = keras.optimizers.Adam(training.learning_rate)
    bce = keras.losses.BinaryCrossentropy()
    rng = np.random.default_rng(5)
    for _ in range(2):
        order = rng.permutation(len(y))
        for start in range(0, len(y), 16):
            index = order[start : start + 16]
            with tf.GradientTape() as tape:
                loss = bce(y[index].reshape(-1, 1).astype(np.float32), reference(x[index], training=True),
                           sample_weight=np.ones(len(index), np.float32))
            optimizer.apply(tape.gradient(loss, reference.trainable_variables), reference.trainable_variables)
    for a, b in zip(trained.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-5)
