"""Shared fixtures: real ImageNet weights through $KERAS_HOME, an isolated cache, one tiny trained bundle.

A MobileNetV2 with random weights (weights=None) has near-constant pooled features (~1e-12):
fine for plumbing tests, useless wherever numbers matter. Those tests use the real weights at a
small input size (96 px), which is still fast.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("KEENEYE_SHARED", REPO.parent / "shared"))
WEIGHTS_NAME = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
SHARED_WEIGHTS = SHARED / "weights" / WEIGHTS_NAME
CASTING = SHARED / "data" / "casting" / "casting_data"

# Keras reads $KERAS_HOME when it is first imported: set it up before any test imports keras.
# Tests get an isolated home holding only the alpha-1.0 file (from the caller's $KERAS_HOME, as
# .ci/run provides it, else from ../shared), so a user's own Keras cache cannot change outcomes.
_PROVIDED = Path(os.environ.get("KERAS_HOME", "~/.keras")).expanduser() / "models" / WEIGHTS_NAME
_KERAS_HOME = Path(tempfile.mkdtemp(prefix="keeneye-test-keras-home-"))
(_KERAS_HOME / "models").mkdir()
WEIGHTS = next((path for path in (_PROVIDED, SHARED_WEIGHTS) if path.is_file()), SHARED_WEIGHTS)
if WEIGHTS.is_file():
    shutil.copy(WEIGHTS, _KERAS_HOME / "models" / WEIGHTS_NAME)
os.environ["KERAS_HOME"] = str(_KERAS_HOME)
os.environ["KEENEYE_CACHE_DIR"] = tempfile.mkdtemp(prefix="keeneye-test-cache-")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _need(path: Path) -> Path:
    """Missing shared material skips locally but fails in CI, where it must be present."""
    if not path.exists():
        message = f"{path} is missing (../shared beside the checkout)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def imagenet_weights() -> Path:
    """The genuine MobileNetV2 no-top weights file (also available as 'imagenet' via $KERAS_HOME)."""
    return _need(WEIGHTS)


@pytest.fixture(scope="session")
def casting_data() -> Path:
    return _need(CASTING)


def tiny_config(root: Path, data: Path, **sections) -> dict:
    """A fast config: real weights at 96 px, few epochs, no one-class score stacked onto the head.

    Tests about something other than the head's cross-validation pass training {"cv_folds": 0}: one head fit
    instead of 5 folds and a refit. The default (folds) path is trained once, by `tiny_bundle`.
    """
    config = {
        "data_folder_path": str(data),
        "output_dir": str(root / "runs"),
        "positive_class": "defect",
        "model": {"alpha": 1.0, "image_size": 96, "weights": "imagenet"},
        "head": {"dense_units": [32], "dropout": 0.1, "anomaly_feature": False},  # tried by test_anomaly_feature.py
        "training": {"epochs": 40, "batch_size": 16, "validation_fraction": 0.25, "early_stopping_patience": 6, "seed": 0},
    }
    for key, value in sections.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    return config


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """Seeded textured surfaces, good vs defect: 20 training and 12 testing images per class, 96 px."""
    from keeneye.demo import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "data", seed=3, train_per_class=20, test_per_class=12, size=96)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, demo_data, imagenet_weights):
    """One trained bundle shared by the tests that only read it (predict, evaluate, export, serve)."""
    from rich.console import Console

    from keeneye import api
    from keeneye.config import config_from_dict

    root = tmp_path_factory.mktemp("tiny_bundle")
    config = config_from_dict(tiny_config(root, demo_data, run_name="tiny"), base_dir=root)
    return api.train(config, console=Console(quiet=True))


@pytest.fixture()
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A config folder with a two-class data folder; the cwd is elsewhere so relative paths are tested."""
    root = tmp_path / "project"
    (root / "data" / "ok").mkdir(parents=True)
    (root / "data" / "defect").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    return root
