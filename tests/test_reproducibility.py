"""One seed, one result: splits, initialisation, shuffling, augmentation and dropout all follow training.seed (issue #4)."""

from __future__ import annotations

import json

import keras
import numpy as np
import pandas as pd

import pytest
from rich.console import Console

from conftest import tiny_config
from keeneye import api
from keeneye.config import HeadConfig, TrainingConfig, config_from_dict

QUIET = Console(quiet=True)


@pytest.mark.slow
def test_two_runs_with_one_seed_give_identical_metrics_and_weights(tmp_path, demo_data, imagenet_weights) -> None:
    """With fine-tuning (augmentation, dropout, shuffling, oversampling) and op determinism off: the CPU default."""
    results = []
    for name in ("first", "second"):
        config = tiny_config(tmp_path, demo_data, run_name=name, training={"epochs": 6, "oversample": True},
                             fine_tune={"enabled": True, "method": "images", "unfreeze": 8, "epochs": 2, "learning_rate": 1e-4,
                                       "judge": "validation"})
        results.append(api.train(config_from_dict(config, base_dir=tmp_path), console=QUIET))
    first, second = results
    assert first.metrics == second.metrics
    assert first.threshold == second.threshold
    for a, b in zip(*(keras.saving.load_model(r.run_dir / "model.keras", compile=False).get_weights() for r in results)):
        np.testing.assert_array_equal(a, b)
    pd.testing.assert_frame_equal(pd.read_csv(first.run_dir / "history.csv"), pd.read_csv(second.run_dir / "history.csv"))
    split = [pd.read_csv(r.run_dir / "manifest.csv")["split"].tolist() for r in results]
    assert split[0] == split[1]


def _head_run(seed: int, **training) -> list[np.ndarray]:
    from keeneye.training.fit import fit_head

    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 12)).astype("float32")
    y = (x[:, 0] > 0.3).astype(int)
    head, _ = fit_head(x[:90], y[:90], x[90:], y[90:], HeadConfig(dense_units=[8], dropout=0.3),
                       TrainingConfig(epochs=4, batch_size=16, seed=seed, **training))
    return head.get_weights()


def test_the_seed_decides_and_nothing_else() -> None:
    same = [_head_run(5), _head_run(5)]
    assert all(np.array_equal(a, b) for a, b in zip(*same))
    other = _head_run(6)
    assert not all(np.array_equal(a, b) for a, b in zip(same[0], other))


def test_deterministic_turns_on_op_determinism_only_for_the_run(tmp_path, demo_data, imagenet_weights) -> None:
    from tensorflow.python.framework import config as tf_config

    seen = []

    class Probe(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            seen.append(tf_config.is_op_determinism_enabled())

    assert not tf_config.is_op_determinism_enabled()
    config = tiny_config(tmp_path, demo_data, run_name="det", training={"epochs": 2, "deterministic": True, "cv_folds": 0})
    result = api.train(config_from_dict(config, base_dir=tmp_path), console=QUIET, callbacks=[Probe()])
    assert seen == [True]
    assert not tf_config.is_op_determinism_enabled(), "restored after the run"
    assert json.loads((result.run_dir / "metadata.json").read_text())["training"]["deterministic"] is True
