"""``head.anomaly_feature``: the one-class patch score enters the supervised model as one more feature.

Why: on magnetic tile (5 group folds, benchmarks/anomaly_stacking.py) the globally pooled
embeddings missed small local defects that the one-class patch distances saw; a logistic
regression on both raised the test AP in every fold and the F1 in 4 of 5 (README, "Honest validation").

Trained exactly as the probe measured it, from out-of-fold values only:

1. the supervised head's out-of-fold probabilities p come from the cross-validation that chose it
   (training/crossval.py, its K group folds over training + validation);
2. in the same folds, a memory bank (training/anomaly.build_bank: the coreset of good patches) is
   built from the good images of the other folds and the held-out fold is scored: the raw one-class
   score s of an image never comes from a bank holding its own patches or its group's;
3. a standardised logistic regression on [logit p, log s] is fitted on those rows; its threshold is
   keeneye's rule (evaluation/threshold.choose_configured_threshold, the evaluation section) on
   *cross-fitted* stacked probabilities (each fold's from a stacker fitted on the other folds), which
   also give the cross-validated estimate;
4. the published parts: the bank from all good training + validation images, the patch feature graph,
   the stacker as three numbers (model/anomaly_feature.Stacker); model/anomaly_feature.StackedEngine
   computes the probability from them, for the testing split here and in every consumer of the bundle.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from keeneye.config import Config
from keeneye.errors import DataError
from keeneye.evaluation.threshold import ThresholdChoice, choose_configured_threshold
from keeneye.model.anomaly_feature import Stacker, stacking_inputs
from keeneye.model.patchcore import AnomalyEngine, PatchBank, build_patch_extractor, reweighted_scores
from keeneye.runtime.batches import run_engine
from keeneye.runtime.choice import make_feature_engine
from keeneye.training.anomaly import build_bank
from keeneye.training.crossval import fold_scores, rounded_estimate

__all__ = ["AnomalyFeature", "anomaly_feature_problems", "fit_anomaly_feature", "fit_stacker", "oof_raw_scores", "patch_grids"]


@dataclass
class AnomalyFeature:
    """What head.anomaly_feature adds to a bundle, and how it was chosen."""

    extractor: Any  # keras.Model: uint8 images -> patch features (the one-class graph)
    bank: PatchBank
    stacker: Stacker
    choice: ThresholdChoice
    estimate: dict
    settings: dict
    seconds: float
    oof_raw_scores: np.ndarray = field(repr=False, default=None)
    #: the FeatureEngine that computed the patch grids: reused for the testing split and, its ONNX conversion
    #: already checked, for the bundle's stored anomaly_features.onnx (no second conversion)
    features: Any = field(repr=False, default=None)

    def scorer(self) -> AnomalyEngine:
        """Raw one-class scores of prepared batches (``.raw_scores``), as the bundle's StackedEngine computes them."""
        features = self.features if self.features is not None else make_feature_engine(self.extractor)
        return AnomalyEngine(features, self.bank, raw_threshold=1.0,
                             neighbours=self.settings["score_neighbours"], top_k=self.settings["score_top_k"])

    def info(self) -> dict:
        """metadata.json["anomaly_feature"] (bundle.AnomalyFeatureInfo) without the file names."""
        return {**self.settings, "bank_size": len(self.bank), "coef_logit": self.stacker.coef_logit,
                "coef_log_score": self.stacker.coef_log_score, "intercept": self.stacker.intercept,
                "cross_validation": {"threshold_choice": self.choice.to_dict(),
                                     "estimate": rounded_estimate(self.estimate)},
                "seconds": round(self.seconds, 1)}


def anomaly_feature_problems(cfg: Config, tiled: bool) -> list[str]:
    """The settings the stacked score is not made for, each with its reason (empty: it can be tried)."""
    problems = []
    if cfg.training.cv_folds < 2:
        problems.append("training.cv_folds must be at least 2 (the stacker learns from out-of-fold values)")
    if cfg.fine_tune.enabled:
        problems.append("fine_tune.enabled must be false (the out-of-fold values are the frozen head's)")
    if tiled:
        problems.append("model.tiles must be off (the one-class score is computed on the whole image)")
    if cfg.anomaly.standardise or cfg.anomaly.projection != "random":
        problems.append('anomaly.standardise false and anomaly.projection "random" are needed (fitted patch transforms are '
                        'not supported here)')
    return problems


def patch_grids(engine: Callable[[np.ndarray], np.ndarray], paths: Sequence[str], spec: Any,
                progress: Callable[[int], None] | None = None) -> np.ndarray:
    """(N, H, W, D) float16 patch features of images prepared as the classifier's (`spec`); float16 halves the memory."""
    out: dict[str, np.ndarray | None] = {"grid": None}

    def keep(keys: list[int], found: np.ndarray) -> None:
        if out["grid"] is None:
            out["grid"] = np.zeros((len(paths), *found.shape[1:]), np.float16)
        out["grid"][keys] = found

    run = run_engine(engine, list(paths), spec, 32, progress=progress, sink=keep)
    if run.failures or out["grid"] is None:
        raise DataError(f"head.anomaly_feature: {len(run.failures)} training image(s) could not be read for the patch "
                        f"features (first: {next(iter(run.failures.items()), ('', 'none read'))}).")
    return out["grid"]


def _raw_scores(grids: np.ndarray, bank_rows: np.ndarray, rows: np.ndarray, cfg: Config) -> tuple[np.ndarray, PatchBank]:
    """Raw one-class scores of `rows`, the bank built from the patches of `bank_rows` as one-class training builds it."""
    a = cfg.anomaly
    bank = build_bank(np.asarray(grids[bank_rows], np.float32).reshape(-1, grids.shape[-1]), a.coreset_share, a.max_bank_size,
                      cfg.training.seed)
    query = np.asarray(grids[rows], np.float32)
    return reweighted_scores(bank, query, *bank.nearest(query), a.score_neighbours, a.score_top_k), bank


def oof_raw_scores(grids: np.ndarray, y: np.ndarray, folds: np.ndarray, cfg: Config,
                   progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Out-of-fold raw scores: each fold's images against a bank of the good images of the other folds only
    (the folds are group folds, so never against their own patches or their group's). `progress(1)` per fold."""
    good = np.asarray(y) == 0
    raw = np.full(len(y), np.nan)
    for k in range(int(np.max(folds)) + 1):
        held = np.asarray(folds) == k
        raw[held] = _raw_scores(grids, np.flatnonzero(good & ~held), np.flatnonzero(held), cfg)[0]
        if progress:
            progress(1)
    return raw


def fit_stacker(x: np.ndarray, y: np.ndarray) -> Stacker:
    """Standardised L2 logistic regression (scikit-learn, C = 1) on the two stacking inputs, folded into three numbers."""
    from sklearn.linear_model import LogisticRegression

    mean, scale = x.mean(axis=0), np.maximum(x.std(axis=0), 1e-12)
    model = LogisticRegression(C=1.0, max_iter=1000).fit((x - mean) / scale, y)
    kernel = model.coef_.ravel() / scale
    return Stacker(float(kernel[0]), float(kernel[1]), float(model.intercept_[0] - mean @ kernel))


def fit_anomaly_feature(cfg: Config, paths: Sequence[str], y: np.ndarray, folds: np.ndarray, oof: np.ndarray, spec: Any,
                        weights_path: Any, task: Any = None) -> AnomalyFeature:
    """Bank, stacker and threshold from the training + validation images (`paths`, labels `y`, the cross-validation's
    `folds` and the chosen head's out-of-fold probabilities `oof`)."""
    started = time.perf_counter()
    a = cfg.anomaly
    extractor = build_patch_extractor(cfg.model.alpha, cfg.model.image_size, weights_path, a.layers,
                                      projection_dim=a.feature_dim, seed=cfg.training.seed, grid=a.grid)
    features = make_feature_engine(extractor)
    grids = patch_grids(features, paths, spec.image_only(), task.advance if task else None)
    y, folds, good = np.asarray(y).astype(int), np.asarray(folds), np.asarray(y) == 0
    n_folds = int(folds.max()) + 1
    if task:  # the coresets take minutes on thousands of images: a line of their own, not a bar stuck at 100%
        task.step(f"one-class banks (coreset of the good patches): {n_folds} out-of-fold banks and the published one",
                  n_folds + 1)
    raw = oof_raw_scores(grids, y, folds, cfg, task.advance if task else None)
    bank = build_bank(np.asarray(grids[good], np.float32).reshape(-1, grids.shape[-1]), a.coreset_share, a.max_bank_size,
                      cfg.training.seed)
    if task:
        task.advance(1)
    x = stacking_inputs(oof, raw)
    cross = np.full(len(y), np.nan)
    for k in range(n_folds):
        held = folds == k
        cross[held] = fit_stacker(x[~held], y[~held])(np.asarray(oof)[held], raw[held])
    choice = choose_configured_threshold(cfg.evaluation, y, cross, source="out_of_fold")
    settings = {"layers": list(a.layers), "grid": a.grid, "feature_dim": a.feature_dim, "score_top_k": a.score_top_k,
                "score_neighbours": a.score_neighbours, "coreset_share": a.coreset_share, "max_bank_size": a.max_bank_size}
    return AnomalyFeature(extractor, bank, fit_stacker(x, y), choice, fold_scores(y, cross, folds, choice.threshold), settings,
                          time.perf_counter() - started, raw, features)
