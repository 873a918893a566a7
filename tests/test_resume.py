"""Interrupted runs: the resumable state in runs/<name>.partial and `keeneye train --resume` (issue #4)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
from rich.console import Console
from typer.testing import CliRunner

from conftest import tiny_config
from keeneye import api
from keeneye.bundle import PartialRun
from keeneye.cli import app
from keeneye.config import config_from_dict
from keeneye.errors import BundleError, DataError

QUIET = Console(quiet=True)


class Crash(RuntimeError):
    pass


class CrashAt(keras.callbacks.Callback):
    """Raise in the given phase ("head" or "fine_tune"): after epoch `epoch` (1-based) ends, or in the
    middle of the epoch after it when `mid_epoch` (the last finished epoch is then `epoch`)."""

    def __init__(self, phase: str, epoch: int, mid_epoch: bool = False) -> None:
        super().__init__()
        self.phase, self.epoch, self.mid_epoch = phase, epoch, mid_epoch
        self._current = 0

    def _in_phase(self) -> bool:
        return (self.model.name == "keeneye_finetune") == (self.phase == "fine_tune")

    def on_epoch_begin(self, epoch, logs=None):
        self._current = epoch

    def on_epoch_end(self, epoch, logs=None):
        if self._in_phase() and not self.mid_epoch and epoch + 1 == self.epoch:
            raise Crash(f"simulated crash after {self.phase} epoch {self.epoch}")

    def on_train_batch_end(self, batch, logs=None):
        if self._in_phase() and self.mid_epoch and self._current == self.epoch and batch == 0:
            raise Crash(f"simulated crash during {self.phase} epoch {self.epoch + 1}")


def _config(root: Path, data: Path, name: str) -> dict:
    # No early stopping in the head (patience 0) and a patience the fine-tuning cannot exhaust: both runs
    # must run every epoch, so "same number of epochs" is a real check of the resumed loop.
    return tiny_config(
        root, data, run_name=name,
        training={"epochs": 6, "early_stopping_patience": 0, "deterministic": True},
        fine_tune={"enabled": True, "method": "images", "unfreeze": 10, "epochs": 4, "patience": 10, "learning_rate": 1e-4,
                   "judge": "validation"},  # one fine-tune to interrupt; fold fine-tunes resume by the same run_phase
    )


def _weights(run: Path) -> list[np.ndarray]:
    return keras.saving.load_model(run / "model.keras", compile=False).get_weights()


@pytest.mark.slow
def test_interrupted_runs_resume_to_the_same_epochs_and_weights(tmp_path, demo_data, imagenet_weights, monkeypatch) -> None:
    import keeneye.training.finetune as finetune

    # Record the fine-tuned weights whichever model train keeps (plain_copy receives the trained copies).
    tuned: list[list[np.ndarray]] = []
    original_plain_copy = finetune.plain_copy

    def recording_plain_copy(cfg, extractor, head):
        tuned.append(extractor.get_weights() + head.get_weights())
        return original_plain_copy(cfg, extractor, head)

    monkeypatch.setattr(finetune, "plain_copy", recording_plain_copy)
    runs = tmp_path / "runs"
    reference = api.train(config_from_dict(_config(tmp_path, demo_data, "reference"), base_dir=tmp_path), console=QUIET)

    # 1. Crash in the middle of head epoch 4: nothing is published, the state is kept.
    config = config_from_dict(_config(tmp_path, demo_data, "crashy"), base_dir=tmp_path)
    with pytest.raises(Crash):
        api.train(config, console=QUIET, callbacks=[CrashAt("head", 3, mid_epoch=True)])
    partial = runs / "crashy.partial"
    assert not (runs / "crashy").exists() and not list(runs.glob(".staging-*"))
    assert (partial / "config.json").is_file() and (partial / "head" / "epoch-0003").is_dir()
    assert not list(partial.rglob("model.keras")) and not list(partial.rglob("metadata.json"))
    saved = json.loads((partial / "config.json").read_text())
    assert saved["run_name"] == "crashy" and saved["fine_tune"]["epochs"] == 4

    # A new run of the same name must not clobber the interrupted one.
    with pytest.raises(BundleError, match="holds an interrupted run named 'crashy'.*--resume"):
        api.train(config, console=QUIET)

    # 2. Resume (Python API); crash again, after fine-tuning epoch 2.
    with pytest.raises(Crash):
        api.train(resume=runs / "crashy", console=QUIET, callbacks=[CrashAt("fine_tune", 2)])
    assert (partial / "head" / "final").is_dir() and (partial / "fine_tune" / "epoch-0002").is_dir()
    assert not (partial / "head" / "epoch-0006").exists(), "a finished phase keeps only its result"

    # Resuming against different data is refused.
    info = json.loads((partial / "run.json").read_text())
    (partial / "run.json").write_text(json.dumps({**info, "data_fingerprint": "0" * 40}))
    with pytest.raises(DataError, match="not those of the interrupted run"):
        api.train(resume=partial, console=QUIET)
    (partial / "run.json").write_text(json.dumps(info))

    # 3. Resume from the command line; it finishes.
    result = CliRunner().invoke(app, ["train", "--resume", str(runs / "crashy")])
    assert result.exit_code == 0, result.output
    assert "resuming the interrupted run" in result.output and "resumed after epoch 2" in result.output
    assert not partial.exists(), "the state is removed once the bundle is published"

    ref_meta = json.loads((reference.run_dir / "metadata.json").read_text())["training"]
    meta = json.loads((runs / "crashy" / "metadata.json").read_text())["training"]
    for phase in ("head", "fine_tune"):
        assert meta["phases"][phase]["epochs_run"] == ref_meta["phases"][phase]["epochs_run"]
        assert meta["phases"][phase]["best_epoch"] == ref_meta["phases"][phase]["best_epoch"]
    assert ref_meta["phases"]["head"]["epochs_run"] == 6 and ref_meta["phases"]["fine_tune"]["epochs_run"] == 4
    assert meta["phases"]["fine_tune"]["resumed_from_epoch"] == 2 and meta["phases"]["head"]["resumed_from_epoch"] == 6
    assert meta["kept"] == ref_meta["kept"]
    ref_history = pd.read_csv(reference.run_dir / "history.csv")
    history = pd.read_csv(runs / "crashy" / "history.csv")
    pd.testing.assert_frame_equal(history, ref_history)
    for a, b in zip(_weights(runs / "crashy"), _weights(reference.run_dir)):
        np.testing.assert_array_equal(a, b)
    assert len(tuned) == 2, "fine-tuning ran to its end twice: in the reference and in the last resume"
    assert len(tuned[0]) == len(tuned[1]) > 200
    for a, b in zip(tuned[0], tuned[1]):
        np.testing.assert_array_equal(a, b)
    ref_metrics = json.loads((reference.run_dir / "metrics.json").read_text())
    metrics = json.loads((runs / "crashy" / "metrics.json").read_text())
    assert metrics["at_threshold"] == ref_metrics["at_threshold"] and metrics["roc_auc"] == ref_metrics["roc_auc"]


def test_resume_errors_are_clear(tmp_path, tiny_bundle) -> None:
    runner = CliRunner()
    missing = runner.invoke(app, ["train", "--resume", str(tmp_path / "runs" / "nothing")])
    assert missing.exit_code == 2 and "no interrupted run to resume" in missing.stderr and "nothing.partial" in missing.stderr
    finished = runner.invoke(app, ["train", "--resume", str(tiny_bundle.run_dir)])
    assert finished.exit_code == 2 and "is a finished run" in finished.stderr
    both = runner.invoke(app, ["train", "--resume", str(tmp_path), "--config", str(tmp_path / "c.json")])
    assert both.exit_code == 2 and "give no --config and no --set" in both.stderr
    neither = runner.invoke(app, ["train"])
    assert neither.exit_code == 2 and "--resume runs/<name>" in neither.stderr
    assert "Traceback" not in missing.output + finished.output + both.output + neither.output


def test_partial_run_folder_is_exclusive_and_found_from_either_name(tmp_path) -> None:
    partial = PartialRun.start(tmp_path, "run1", "abc")
    (partial.folder / "config.json").write_text("{}")
    assert partial.folder == tmp_path / "run1.partial" and partial.name == "run1"
    assert PartialRun.find(tmp_path / "run1").folder == partial.folder
    assert PartialRun.find(tmp_path / "run1.partial").folder == partial.folder
    assert partial.info()["data_fingerprint"] == "abc"
    with pytest.raises(BundleError, match="run1.partial holds an interrupted run"):
        PartialRun.start(tmp_path, "run1", "abc")
    partial.remove()
    assert not partial.folder.exists()
    shutil.rmtree(tmp_path, ignore_errors=True)
