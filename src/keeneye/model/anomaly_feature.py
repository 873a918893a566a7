"""The one-class patch score as one more feature of the supervised model (``head.anomaly_feature``).

Why: the supervised head sees globally pooled embeddings, in which a small local defect can
vanish; the one-class patch distances (PatchCore, model/patchcore.py) see it. On magnetic tile in
5 group folds the two together ranked defects clearly better than either alone
(benchmarks/anomaly_stacking.py, README). The combination is a logistic regression on two
numbers, fitted on out-of-fold values (training/anomaly_feature.py):

    probability = sigmoid(a * logit(p) + b * log(s) + c)

with p the supervised head's probability and s the raw one-class score (the mean of the
``top_k`` largest patch distances to a memory bank of good patches). :class:`StackedEngine` runs
both parts on a batch and combines them: the one place where that formula is computed, in
training (the test split's probabilities) and in every consumer of a bundle (Predictor, evaluate,
serve), so they agree by construction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from keeneye.model.patchcore import AnomalyEngine, PatchBank

__all__ = ["CLIPPING", "COMBINATION", "Stacker", "StackedEngine", "stacking_inputs"]

COMBINATION = "sigmoid(coef_logit * logit(p) + coef_log_score * log(s) + intercept); p = supervised probability, s = raw one-class score"
_EPS_P = 1e-7
_EPS_S = 1e-12
#: How stacking_inputs keeps logit(p) and log(s) finite (recorded in exports, so a consumer reproduces them exactly).
CLIPPING = {"probability": [_EPS_P, 1.0 - _EPS_P], "raw_score_min": _EPS_S}


def stacking_inputs(probability: np.ndarray, raw_score: np.ndarray) -> np.ndarray:
    """(N, 2): [logit of the supervised probability, log of the raw one-class score], clipped away from infinities."""
    p = np.clip(np.asarray(probability, np.float64).reshape(-1), _EPS_P, 1.0 - _EPS_P)
    s = np.maximum(np.asarray(raw_score, np.float64).reshape(-1), _EPS_S)
    return np.c_[np.log(p / (1.0 - p)), np.log(s)]


@dataclass(frozen=True)
class Stacker:
    """The fitted combination, as plain numbers (what metadata.json records)."""

    coef_logit: float
    coef_log_score: float
    intercept: float

    def __call__(self, probability: np.ndarray, raw_score: np.ndarray) -> np.ndarray:
        z = stacking_inputs(probability, raw_score) @ np.array([self.coef_logit, self.coef_log_score]) + self.intercept
        return 1.0 / (1.0 + np.exp(-z))

    def score_alone_at(self, threshold: float) -> float:
        """The raw one-class score at which the stacked probability reaches `threshold` while the head is undecided
        (probability 0.5): the score that flags a part on its own, the natural scale of a stacked bundle's
        one-class map (as the raw threshold is a one-class bundle's). Infinite when the score does not raise the
        probability (a stacker fitted to data where it did not help), so no patch is painted as flagging."""
        if self.coef_log_score <= 0:
            return float("inf")
        t = min(max(float(threshold), _EPS_P), 1.0 - _EPS_P)
        return float(np.exp((np.log(t / (1.0 - t)) - self.intercept) / self.coef_log_score))


def first_square(batch: np.ndarray) -> np.ndarray:
    """The image itself out of a prepared batch (N, H, S, 3): with model.views the input is a stack of views whose
    first S rows are the image (data/preprocess.VIEW_SETS); the patch graph scores that one, as in training."""
    return np.ascontiguousarray(batch[:, : batch.shape[2]])


class StackedEngine:
    """Classifier engine + patch feature engine + memory bank + stacker: uint8 batch -> probabilities (N, 1).

    The engine contract of the Predictor (``name``, ``source``, ``__call__``): both parts see the
    same prepared batch (the patch graph its first square: the image itself when the batch stacks views).
    """

    def __init__(self, classifier: Callable[[np.ndarray], np.ndarray], patches: Callable[[np.ndarray], np.ndarray],
                 bank: PatchBank, stacker: Stacker, top_k: int = 1, neighbours: int = 1) -> None:
        self.classifier = classifier
        self.scorer = AnomalyEngine(patches, bank, raw_threshold=1.0, neighbours=neighbours, top_k=top_k)
        self.stacker = stacker
        self.name = getattr(classifier, "name", "keras")
        self.source = f"{getattr(classifier, 'source', 'model.keras')} + one-class score ({self.scorer.source})"

    @property
    def input_shape(self) -> tuple[int, int, int] | None:
        """The classifier engine's input (H, W, C), so the stacked engine stands where a classifier engine stands."""
        return getattr(self.classifier, "input_shape", None)

    def run(self, batch: np.ndarray) -> np.ndarray:
        """The Engine contract (runtime.engines): stacked probabilities (N, 1)."""
        return self(batch)

    def parts(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(supervised probabilities (N,), raw one-class scores (N,)) of a prepared batch."""
        batch = np.ascontiguousarray(batch, dtype=np.uint8)
        return np.asarray(self.classifier(batch), np.float64).reshape(-1), self.scorer.raw_scores(first_square(batch))

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.stacker(*self.parts(batch)).astype(np.float32).reshape(-1, 1)
