"""Fine-tuning judged across the cross-validation folds (fine_tune.judge "folds", issue #12 part 4).

Why it exists: a validation split holds the defects of a few parts, and on magnetic-tile the single-split rule
kept deep fine-tunes that then lost on every test fold. Each fold's fine-tune starts from that fold's frozen head
and is scored on the fold it never saw; fine-tuning is kept only when it beats the frozen head by more than one
paired standard error, and the published model is a refit on every row.

Cheap: 96 px demo images, cached_top with 2 views, real ImageNet weights (the fine-tune must learn something).
"""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest

from conftest import tiny_config
from keeneye.config import config_from_dict


def _uninformative_cv(y: np.ndarray, heads: list, n_folds: int = 2):
    """A CrossValidation whose frozen heads say 0.5 for everything (AP = the share of positives in each fold)."""
    from keeneye.evaluation.threshold import choose_threshold
    from keeneye.training.crossval import CandidateResult, CrossValidation, HeadCandidate, fold_scores, group_folds

    folds = group_folds(y, np.arange(len(y)), n_folds, seed=0)
    oof = np.full(len(y), 0.5, np.float32)
    candidate = HeadCandidate("logistic by Adam", (), 0.0, 0.0, "none")
    choice = choose_threshold(y, oof, source="out_of_fold")
    scores = fold_scores(y, oof, folds, choice.threshold)
    result = CandidateResult(candidate, y, oof, [1] * n_folds, scores["average_precision"], heads)
    return CrossValidation(folds, [result], 0, "pinned", choice, scores)


@pytest.mark.slow
def test_fold_fine_tunes_that_beat_the_frozen_heads_are_kept_refit_on_every_row_and_published(
        tmp_path, demo_data, imagenet_weights) -> None:
    """Frozen heads that know nothing (all weights zero) against fine-tunes of the top and the head from them: the
    folds' paired AP gain is far above its standard error, so the fine-tuned model is kept; it is refit on all rows for
    the median of the folds' best epochs, its threshold comes from the fine-tuned out-of-fold probabilities, and the
    test probabilities are the published graph's."""
    from sklearn.metrics import roc_auc_score

    from keeneye.model.backbone import build_feature_extractor, resolve_weights
    from keeneye.model.head import build_classifier, build_head
    from keeneye.training.distribute import choose_devices
    from keeneye.training.finetune import fine_tune_folds_and_choose, predict_paths

    cfg = config_from_dict(tiny_config(tmp_path, demo_data, head={"dense_units": [], "dropout": 0.0}, fine_tune={
        "enabled": True, "method": "cached_top", "unfreeze": "block_16_expand", "views": 2, "epochs": 3, "patience": 0,
        "learning_rate": 1e-3}), base_dir=tmp_path)
    extractor = build_feature_extractor(1.0, 96, resolve_weights(str(imagenet_weights), 1.0, 96), cfg.model.features)
    before = [np.array(w) for w in extractor.get_weights()]

    def zero_head():
        head = build_head(extractor.output_shape[-1], [], 0.0, seed=0)
        head.set_weights([np.zeros_like(w) for w in head.get_weights()])
        return head

    paths = {split: sorted(str(p) for p in (demo_data / split).rglob("*.png")) for split in ("training", "testing")}
    broken = tmp_path / "defect" / "broken.png"  # decodes nowhere: it must be reported, never silently left out
    broken.parent.mkdir()
    broken.write_bytes(Path(paths["training"][0]).read_bytes()[:40])
    paths["training"].append(str(broken))
    manifest = pd.DataFrame({"path": paths["training"] + paths["testing"]})
    y = np.array([int("/defect/" in p) for p in manifest["path"]])
    training = np.arange(len(manifest)) < len(paths["training"])
    sets = {"training": training, "validation": np.zeros_like(training), "testing": ~training}
    cv = _uninformative_cv(y[training], [zero_head(), zero_head()])
    head_history = pd.DataFrame({"epoch": pd.Series(dtype=int)})
    head_history.attrs.update(best_epoch=1)

    chosen = fine_tune_folds_and_choose(cfg, extractor, zero_head(), cv.best.heads, cv, manifest, y, sets, head_history,
                                        lambda mask: np.full(int(mask.sum()), 0.5, np.float32), 1.0, choose_devices("off"),
                                        checkpoint_dir=None)

    phase = chosen.phases["fine_tune"]
    assert chosen.kept == "fine_tune", chosen.reason
    assert phase["judge"] == "folds" and phase["verdict"]["mean"] > phase["verdict"]["se"]
    assert len(phase["fold_best_epochs"]) == 2
    assert phase["epochs_run"] == max(1, int(round(float(np.median(phase["fold_best_epochs"]))))), "refit for the folds' median"
    assert chosen.choice.method == "max_f1_out_of_fold" and chosen.estimate and "fine-tuned" in chosen.estimate
    assert all(np.array_equal(a, b) for a, b in zip(extractor.get_weights(), before)), "the frozen extractor must not change"
    test_p = chosen.probability(chosen.testing)
    published, failed = predict_paths(build_classifier(chosen.extractor, chosen.head), paths["testing"], 96)
    assert not failed
    np.testing.assert_allclose(test_p, published, atol=1e-4)
    assert roc_auc_score(y[~training], test_p) > 0.8, "the refit learned from every row"
    assert chosen.dropped["reason"].to_dict() == {len(paths["training"]) - 1: "truncated PNG (no IEND chunk)"}


class Crash(Exception):
    pass


class CrashInSecondFold(keras.callbacks.Callback):
    """Raises after the first epoch of the second fold fine-tune (cached_top's training model)."""

    fits = 0

    def on_train_begin(self, logs=None):
        if self.model.name == "keeneye_cached_top":
            self.fits += 1

    def on_epoch_end(self, epoch, logs=None):
        if self.model.name == "keeneye_cached_top" and self.fits == 2 and epoch == 0:
            raise Crash("after epoch 1 of fold 2")


@pytest.mark.slow  # two trains with 3 fold fine-tunes each and a resume (~110 s quiet)
def test_train_judges_fine_tuning_across_the_folds_records_it_and_resumes(tmp_path, demo_data, imagenet_weights) -> None:
    """keeneye train with fine-tuning and cross-validation: the default judge fine-tunes in every fold, says what it
    decided and why, and records it in metrics.json, metadata.json and the report. Nothing is held back for a
    single-split judge: the frozen head is published from all training + validation rows as cross-validation
    publishes it (training.cv_publish "average" is honoured; the validation judge forces a refit on training only).
    Interrupted in the second fold, the run resumes there (the first fold's result is reused) and ends as an
    uninterrupted run does."""
    from rich.console import Console

    from keeneye import api

    def config(name: str):
        return config_from_dict(tiny_config(
            tmp_path, demo_data, run_name=name, training={"epochs": 8, "cv_folds": 3, "cv_publish": "average"},
            fine_tune={"enabled": True, "method": "cached_top", "unfreeze": "block_16_expand", "views": 2, "epochs": 2,
                       "patience": 0}), base_dir=tmp_path)

    with pytest.raises(Crash):
        api.train(config("crashy"), console=Console(quiet=True), callbacks=[CrashInSecondFold()])
    state = tmp_path / "runs" / "crashy.partial" / "fine_tune"
    assert (state / "fold_0" / "final").is_dir() and (state / "fold_1" / "epoch-0001").is_dir()
    console = Console(record=True, width=250)
    result = api.train(resume=tmp_path / "runs" / "crashy", console=console)
    text = console.export_text()
    assert 'fine_tune.judge "folds": 3 fold fine-tunes' in text and "fine-tuned in 3 group folds" in text
    assert "training + validation images x 2 views" in text  # one pass of the bottom, for every fold
    record = result.metrics["fine_tune"]
    verdict = record["cross_validation"]["verdict"]
    assert record["kept"] == verdict["kept"] and len(verdict["ap_differences"]) == 3
    assert verdict["reason"] in text.replace("\n", "")
    metadata = json.loads((result.run_dir / "metadata.json").read_text())["training"]
    assert metadata["kept"] == ("fine_tune" if verdict["kept"] else "head")
    assert metadata["phases"]["fine_tune"]["judge"] == "folds"
    assert metadata["published"] == "average"
    assert "fine-tuning in 3 group folds" in (result.run_dir / "report.html").read_text()

    reference = api.train(config("reference"), console=Console(quiet=True))
    assert reference.metrics["fine_tune"] == record
    assert reference.metrics["at_threshold"] == result.metrics["at_threshold"]
