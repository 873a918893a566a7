"""Cross-validated choices on cached embeddings: the threshold, the head, and the published model.

Why: a validation split carved from a few hundred images holds a handful of defects, and when it
is carved image by image its images have near-copies in training. Early stopping and the threshold
are then tuned on images the head has already seen, and the threshold swings with each seed
(magnetic-tile: validation F1 0.93, test F1 0.61). With the backbone frozen, the embeddings are
cached and a head trains in seconds, so keeneye can afford what scikit-learn's
``TunedThresholdClassifierCV`` does: treat everything it chooses as a cross-validated parameter.

* **Folds**: K group folds over training + validation together (``StratifiedGroupKFold``, seeded,
  stratified by label), on the split units of :mod:`keeneye.data.split` (given groups, identical
  files and, with ``data.auto_groups``, near-duplicates): no group is in two folds. K shrinks to
  the number of positive (or negative) units when there are fewer.
* **Per fold**: a head trains on the other K-1 folds and early-stops on the held-out fold's loss;
  its probabilities for the held-out fold are that fold's *out-of-fold* (OOF) probabilities.
  Every training and validation image gets one, from a head that never saw it nor its group.
  The early stop is a choice made on the scored fold; scoring every fold at the refit's epoch count
  instead gave a lower threshold and a worse test F1 on magnetic-tile (benchmarks/oof_epochs.py, README).
* **Candidates** (``head.auto``): a small fixed set, ordered from simplest to richest
  (:data:`AUTO_CANDIDATES`). The one with the highest pooled OOF average precision wins, unless a
  simpler one is within one *paired* standard error of it (:func:`paired_differences`): a
  difference smaller than its own noise is no evidence, and the simpler head is the safer bet
  (Breiman's one-standard-error rule, on the per-fold differences). A candidate names its feature set
  (``features``; None = the run's embeddings): with a "multi" or "gap+gmp" embedding the smaller
  modes are column subsets of it (model/backbone.feature_subsets), and the logistic head on each
  enters first (:func:`candidates_for`); a chosen subset is published by model/head.widen_head.
* **Exact logistic head** (``head.kind`` "logistic", and the first ``head.auto`` candidate):
  standardised features + L2 logistic regression fitted to convergence by lbfgs
  (:func:`keeneye.training.fit.logistic_path`), for every C of ``head.logistic_c`` in every fold;
  the C with the highest pooled OOF AP is that candidate's, and its OOF probabilities compete with
  the others. No epochs and no early stopping: nothing in it depends on the seed or on when a
  held-out loss stopped falling, and on wide features (``model.features`` "multi", 3712 values)
  it ranked magnetic-tile defects better than the Adam-trained heads (README).
* **Threshold**: chosen on the OOF probabilities of the chosen candidate
  (:func:`keeneye.evaluation.threshold.choose_configured_threshold`, ``source="out_of_fold"``).
* **Estimate**: F1 and AP of each fold at that threshold, reported as mean +- sd: what the test
  score should be, printed before it.
* **Published head**: ``training.cv_publish`` "refit" trains one head on all rows for the median
  of the folds' best epoch counts; "average" publishes the mean of the K fold heads. Measured on
  the magnetic-tile folds (benchmarks/magnetic_tile.py, see README): see the README for the numbers
  behind the default.

The fold heads use a plain training loop (:func:`train_head`) rather than ``model.fit``: on a
small CPU, Keras' per-epoch overhead dominated (about 4x slower for these tiny heads), and K x
candidates heads are trained per run. Same architecture (:func:`keeneye.model.head.build_head`),
loss, optimiser, learning rate, batch size and class weights as the published head.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Sequence

import numpy as np

from keeneye.config import EvaluationConfig, HeadConfig, TrainingConfig
from keeneye.evaluation.threshold import ThresholdChoice, choose_configured_threshold
from keeneye.model.head import build_head
from keeneye.training.fit import LOGISTIC_C_GRID, fused_adam, logistic_head, logistic_path, sample_weights

__all__ = [
    "AUTO_CANDIDATES", "CandidateResult", "CrossValidation", "HeadCandidate", "PairedDifference", "best_index",
    "candidates_for", "cross_validate", "cross_validate_logistic",
    "fold_scores", "gain_verdict", "group_folds", "paired_difference", "paired_differences", "rounded_estimate",
    "select_candidate", "train_head",
]


@dataclass(frozen=True)
class HeadCandidate:
    """One head to cross-validate: plain data, like a scikit-learn estimator's parameters."""

    name: str
    dense_units: tuple[int, ...]
    dropout: float
    l2: float
    class_weight: str  # "none" | "balanced"
    features: str | None = None  # a named feature set of the run; None: the run's embeddings
    kind: str = "dense"  # "dense": build_head trained by Adam; "logistic": exact L2 logistic regression
    logistic_c: tuple[float, ...] = ()  # kind "logistic": the C grid (one value: pinned)

    def head_config(self, auto: bool = False) -> HeadConfig:
        if self.kind == "logistic":
            return HeadConfig(kind="logistic", logistic_c=list(self.logistic_c), dense_units=[], dropout=0.0, l2=0.0, auto=auto)
        return HeadConfig(dense_units=list(self.dense_units), dropout=self.dropout, l2=self.l2, auto=auto)

    def to_dict(self) -> dict:
        return asdict(self) | {"dense_units": list(self.dense_units), "logistic_c": list(self.logistic_c)}


# Simplest first: ties (within one standard error) go to the earlier one. The exact logistic head
# is the simplest (one linear layer, fitted to convergence, its one strength chosen by the folds).
AUTO_CANDIDATES: tuple[HeadCandidate, ...] = (
    HeadCandidate("logistic-balanced", (), 0.0, 0.0, "balanced", kind="logistic", logistic_c=LOGISTIC_C_GRID),
    HeadCandidate("linear", (), 0.0, 1e-4, "none"),
    HeadCandidate("linear-balanced", (), 0.0, 1e-4, "balanced"),
    HeadCandidate("mlp128", (128,), 0.2, 0.0, "none"),
    HeadCandidate("mlp128-balanced", (128,), 0.2, 0.0, "balanced"),
    HeadCandidate("mlp256-regularised", (256,), 0.5, 1e-4, "none"),
    HeadCandidate("mlp256-regularised-balanced", (256,), 0.5, 1e-4, "balanced"),
)


def candidates_for(head: HeadConfig, training: TrainingConfig, feature_sets: Sequence[str] = ()) -> list[HeadCandidate]:
    """The configured head alone, or with ``head.auto`` the fixed candidate set.

    feature_sets: with ``head.auto``, the named column subsets of the run's embedding to compare
    (model/backbone.feature_subsets, smallest first, the last = all columns). The smaller sets
    enter with the exact logistic candidate only, placed first (fewer features: simpler, so the
    one-standard-error rule prefers them): it is deterministic and seconds per set, while the
    Adam-trained heads would multiply the cross-validation time, and on the wide sets they did not
    rank better (README).
    """
    if head.auto:
        *subsets, _ = feature_sets or [None]
        logistic = AUTO_CANDIDATES[0]
        return [replace(logistic, name=f"{logistic.name}@{s}", features=s) for s in subsets] + list(AUTO_CANDIDATES)
    if head.kind == "logistic":
        return [HeadCandidate("configured", (), 0.0, 0.0, training.class_weight, kind="logistic",
                              logistic_c=tuple(head.logistic_c))]
    return [HeadCandidate("configured", tuple(head.dense_units), head.dropout, head.l2, training.class_weight)]


def group_folds(labels: np.ndarray, units: np.ndarray, n_folds: int, seed: int) -> np.ndarray | None:
    """A fold id (0..K-1) per row; whole units per fold, stratified by label; None when K < 2 is all that fits."""
    import warnings

    from keeneye.data.split import stratified_group_kfold

    labels = np.asarray(labels).astype(int)
    units = np.asarray(units)
    k = min(n_folds, *(len(np.unique(units[labels == c])) for c in (0, 1)))
    if k < 2:
        return None
    splitter = stratified_group_kfold(k, seed)  # scikit-learn's folds, its greedy search vectorised
    fold = np.full(len(labels), -1, dtype=np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for index, (_, held) in enumerate(splitter.split(np.zeros(len(labels)), labels, groups=units)):
            fold[held] = index
    return fold


def train_head(
    x: np.ndarray, y: np.ndarray, candidate: HeadCandidate, training: TrainingConfig, epochs: int,
    x_eval: np.ndarray | None = None, y_eval: np.ndarray | None = None, seed: int = 0,
):
    """Train one head; with held-out rows, early-stop on their loss and keep the best epoch
    (``training.early_stopping_patience`` 0: no early stopping, every epoch runs and the last counts).

    Returns (head, best epoch (1-based), held-out probabilities at the best epoch or None).
    """
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    head = build_head(x.shape[1], candidate.dense_units, candidate.dropout, seed=seed, l2=candidate.l2)
    optimizer = fused_adam(head.trainable_variables, training.learning_rate)  # Keras' Adam rule, fewer ops per step
    bce = keras.losses.BinaryCrossentropy()
    features = tf.constant(np.asarray(x, np.float32))
    targets = tf.constant(np.asarray(y, np.float32).reshape(-1, 1))
    weights = tf.constant(sample_weights(y, candidate.class_weight))

    size = training.batch_size

    @tf.function
    def run_epoch(order):
        # The whole epoch is one graph (the loop becomes a tf.while_loop): same batches in the same
        # order as a Python loop of steps, without a Python dispatch per step, which dominated for
        # these tiny heads (5 casting folds, loaded 2-core machine: 189 -> 127 s, identical best epochs and OOF AP).
        n = tf.shape(order)[0]
        for start in tf.range(0, n, size):
            index = order[start : tf.minimum(start + size, n)]
            with tf.GradientTape() as tape:
                p = head(tf.gather(features, index), training=True)
                loss = bce(tf.gather(targets, index), p, sample_weight=tf.gather(weights, index))
                loss = loss + tf.add_n(head.losses) if head.losses else loss
            optimizer(tape.gradient(loss, head.trainable_variables))

    rng = np.random.default_rng(seed)
    best = (np.inf, 0, None, None)  # loss, epoch, weights, probabilities
    wait = 0
    for epoch in range(1, epochs + 1):
        run_epoch(tf.constant(rng.permutation(len(y))))
        if x_eval is None:
            continue
        p = np.asarray(head(x_eval, training=False)).reshape(-1)
        loss = float(bce(np.asarray(y_eval, np.float32).reshape(-1, 1), p.reshape(-1, 1)))
        if training.early_stopping_patience == 0:  # early stopping off: every epoch runs, the last one counts
            best = (loss, epoch, None, p)
        elif loss < best[0]:
            best, wait = (loss, epoch, head.get_weights(), p), 0
        else:
            wait += 1
            if 0 < training.early_stopping_patience <= wait:
                break
    if x_eval is None:
        return head, epochs, None
    if best[2] is not None:
        head.set_weights(best[2])
    return head, best[1], best[3]


@dataclass
class CandidateResult:
    """One candidate cross-validated: its out-of-fold probabilities and fold scores."""

    candidate: HeadCandidate
    labels: np.ndarray
    oof: np.ndarray
    best_epochs: list[int]
    fold_ap: list[float]
    heads: list = field(default_factory=list, repr=False)
    c_scores: dict = field(default_factory=dict)  # kind "logistic": pooled OOF AP of every C of the grid

    @property
    def ap(self) -> float:
        """Average precision of the pooled out-of-fold probabilities: the selection score."""
        from sklearn.metrics import average_precision_score

        return float(average_precision_score(self.labels, self.oof))

    def summary(self) -> dict:
        return {**self.candidate.to_dict(), "oof_average_precision": round(self.ap, 4),
                "fold_average_precision_mean": round(float(np.mean(self.fold_ap)), 4),
                "fold_average_precision_sd": round(float(np.std(self.fold_ap, ddof=1)) if len(self.fold_ap) > 1 else 0.0, 4),
                "fold_average_precision": [round(a, 4) for a in self.fold_ap],
                "best_epochs": self.best_epochs} | (
                    {"logistic_c_oof_average_precision": {f"{c:g}": round(ap, 4) for c, ap in self.c_scores.items()}}
                    if self.c_scores else {})


def cross_validate(
    x: np.ndarray, y: np.ndarray, folds: np.ndarray, candidate: HeadCandidate, training: TrainingConfig,
) -> CandidateResult:
    """Train the candidate in every fold; out-of-fold probabilities for every row."""
    from sklearn.metrics import average_precision_score

    if candidate.kind == "logistic":
        return cross_validate_logistic(x, y, folds, candidate, training.seed)
    oof = np.full(len(y), np.nan, np.float32)
    best_epochs, fold_ap, heads = [], [], []
    for k in range(int(folds.max()) + 1):
        held = folds == k
        head, best, p = train_head(x[~held], y[~held], candidate, training, training.epochs, x[held], y[held],
                                   seed=training.seed + k)
        oof[held] = p
        best_epochs.append(int(best))
        fold_ap.append(float(average_precision_score(y[held], p)) if len(np.unique(y[held])) == 2 else float("nan"))
        heads.append(head)
    return CandidateResult(candidate, np.asarray(y), oof, best_epochs, fold_ap, heads)


def cross_validate_logistic(x: np.ndarray, y: np.ndarray, folds: np.ndarray, candidate: HeadCandidate,
                            seed: int = 0) -> CandidateResult:
    """The exact logistic head in every fold, for every C of its grid; the C with the highest pooled
    out-of-fold AP is kept (ties: the smaller C, the stronger regularisation), with its OOF probabilities.

    The returned candidate carries that C alone (``logistic_c=(C,)``), so the refit uses it; the fold
    heads are the Keras transplants of the fold models (for ``training.cv_publish`` "average").
    """
    from sklearn.metrics import average_precision_score

    y = np.asarray(y).astype(int)
    grid = sorted(candidate.logistic_c or LOGISTIC_C_GRID)
    n_folds = int(folds.max()) + 1
    paths = []  # per fold: one fitted model per C
    for k in range(n_folds):
        held = folds == k
        paths.append(logistic_path(x[~held], y[~held], grid, candidate.class_weight, seed))
    best, scores = None, {}  # best: (ap, c, oof, models)
    for i, c in enumerate(grid):
        oof = np.full(len(y), np.nan, np.float32)
        for k in range(n_folds):
            oof[folds == k] = paths[k][i].predict_proba(np.asarray(x[folds == k], np.float64))[:, 1]
        scores[c] = float(average_precision_score(y, oof))
        if best is None or scores[c] > best[0] + 1e-9:
            best = (scores[c], c, oof, [path[i] for path in paths])
    _, c, oof, models = best
    fold_ap = [float(average_precision_score(y[folds == k], oof[folds == k])) if len(np.unique(y[folds == k])) == 2
               else float("nan") for k in range(n_folds)]
    chosen = replace(candidate, logistic_c=(c,))
    return CandidateResult(chosen, y, oof, [], fold_ap, [logistic_head(m) for m in models], c_scores=scores)


@dataclass(frozen=True)
class PairedDifference:
    """A candidate's fold APs minus the best candidate's on the same folds, and the paired one-SE verdict."""

    fold_difference: list[float]
    mean: float
    standard_error: float

    @property
    def within_one_se(self) -> bool:
        return self.mean >= -self.standard_error

    def to_dict(self) -> dict:
        # 6 decimals: on an easy set (casting: every AP above 0.999) the differences live in the 4th-5th decimal
        return {"fold_ap_difference": [round(d, 6) for d in self.fold_difference], "mean_difference": round(self.mean, 6),
                "standard_error": round(self.standard_error, 6), "within_one_se": self.within_one_se}


def best_index(results: Sequence[CandidateResult]) -> int:
    """The candidate with the highest pooled out-of-fold AP (the first of equals: the simpler)."""
    return int(np.argmax([r.ap for r in results]))


def paired_differences(results: Sequence[CandidateResult]) -> list[PairedDifference]:
    """Per candidate: AP on each fold minus the best candidate's AP on that same fold, their mean and SE.

    Why paired: every candidate is scored on the same K folds, and folds differ in difficulty far
    more than candidates do (magnetic-tile: fold APs 0.7-0.9 for every head). The fold-to-fold sd of
    the winner's AP measures that difficulty, so an unpaired one-SE band is wider than any
    difference between candidates and the rule always fell back to the simplest (fewest features),
    test F1 0.710 against 0.720 pinned (README). The per-fold difference cancels the difficulty a
    fold shares across candidates; its spread is what is left: how much the candidates really
    disagree. Standard error = sd(differences, ddof=1) / sqrt(K), the paired analogue of Breiman's
    sd / sqrt(K). The K differences are not independent (the training parts of two folds share
    (K-2)/(K-1) of their rows), so this SE is somewhat optimistic; Nadeau and Bengio's correction
    would widen it about 1.5x at K=5. Kept plain: the rule is a tie-break toward simpler heads, not a
    significance test, and the plain form is the one the unpaired rule used, so only the pairing
    changed. The mean of the per-fold differences (not the pooled-AP difference) is compared, so
    the difference and its SE come from the same numbers. Folds where either AP is undefined (one
    class) are left out; with fewer than two usable folds the SE is 0 (only a tie or better is within).
    """
    best = results[best_index(results)].fold_ap
    return [paired_difference(r.fold_ap, best) for r in results]


def paired_difference(fold_ap: Sequence[float], reference_fold_ap: Sequence[float]) -> PairedDifference:
    """Per-fold AP differences from a reference scored on the same folds, their mean and paired SE (see above)."""
    d = np.asarray(fold_ap, float) - np.asarray(reference_fold_ap, float)
    d = d[np.isfinite(d)]
    se = float(np.std(d, ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0
    return PairedDifference([float(v) for v in d], float(np.mean(d)) if len(d) else 0.0, se)


def rounded_estimate(estimate: dict) -> dict:
    """A fold_scores estimate for the JSON files: every number to 4 decimals."""
    return {k: (round(v, 4) if isinstance(v, float) else [round(x, 4) for x in v]) for k, v in estimate.items()}


def gain_verdict(fold_ap: Sequence[float], reference_fold_ap: Sequence[float], model: str, reference: str,
                 simpler: str) -> dict:
    """Keep a costlier `model` over its `reference` only when it beats it by more than one paired standard error.

    Both per-fold APs come from the same group folds, so the paired difference cancels each fold's
    difficulty (:func:`paired_difference`); a tie, or a single fold (no spread, no evidence), keeps the
    simpler reference. Used for head.anomaly_feature "auto" and fine_tune.judge "folds".
    """
    paired = paired_difference(fold_ap, reference_fold_ap)
    d, mean, se = paired.fold_difference, paired.mean, paired.standard_error
    kept = len(d) > 1 and mean > se
    reason = (f"out-of-fold AP of {model} minus {reference}'s, paired over {len(d)} folds: {mean:+.3g} "
              f"(paired standard error {se:.3g}); " + ("more than one standard error better" if kept else
                                                       f"not more than one standard error better, so {simpler}"))
    return {"kept": kept, "ap_differences": [round(float(v), 6) for v in d], "mean": round(mean, 6), "se": round(se, 6),
            "reason": reason}


def select_candidate(results: Sequence[CandidateResult]) -> tuple[int, str]:
    """(index, why): the highest OOF AP, or the simplest candidate within one paired standard error of it."""
    if len(results) == 1:
        return 0, "the configured head"
    best = best_index(results)
    paired = paired_differences(results)
    chosen = next(i for i, p in enumerate(paired) if p.within_one_se)
    if chosen == best:
        return best, f"highest out-of-fold AP ({results[best].ap:.4f})"
    p = paired[chosen]
    return chosen, (f"out-of-fold AP {results[chosen].ap:.4f}; per fold {p.mean:+.3g} on average against the best "
                    f"({results[best].candidate.name}, {results[best].ap:.4f}), within one paired standard error "
                    f"({p.standard_error:.3g}), and simpler")


def fold_scores(y: np.ndarray, oof: np.ndarray, folds: np.ndarray, threshold: float) -> dict:
    """F1 at `threshold` and AP of each fold's out-of-fold probabilities, with mean and sd: the CV estimate."""
    from sklearn.metrics import average_precision_score, f1_score

    from keeneye.evaluation.metrics import predict_labels

    f1, ap = [], []
    for k in range(int(folds.max()) + 1):
        held = folds == k
        f1.append(float(f1_score(y[held], predict_labels(oof[held], threshold), labels=[0, 1], zero_division=0)))
        ap.append(float(average_precision_score(y[held], oof[held])) if len(np.unique(y[held])) == 2 else float("nan"))
    sd = lambda v: float(np.nanstd(v, ddof=1)) if len(v) > 1 else 0.0  # noqa: E731
    return {"f1": f1, "f1_mean": float(np.mean(f1)), "f1_sd": sd(f1),
            "average_precision": ap, "average_precision_mean": float(np.nanmean(ap)), "average_precision_sd": sd(ap)}


@dataclass
class CrossValidation:
    """Everything the cross-validation decided, and what goes into metrics.json."""

    folds: np.ndarray
    results: list[CandidateResult]
    chosen: int
    reason: str
    choice: ThresholdChoice
    estimate: dict

    @property
    def best(self) -> CandidateResult:
        return self.results[self.chosen]

    @property
    def refit_epochs(self) -> int:
        if not self.best.best_epochs:  # the exact logistic head has no epochs
            return 1
        return max(1, int(round(float(np.median(self.best.best_epochs)))))

    def to_dict(self) -> dict:
        return {
            "folds": int(self.folds.max()) + 1,
            "chosen": self.best.candidate.name,
            "reason": self.reason,
            "candidates": [r.summary() | {"paired_vs_best": p.to_dict()}
                           for r, p in zip(self.results, paired_differences(self.results))],
            "threshold_choice": self.choice.to_dict(),
            "estimate": rounded_estimate(self.estimate),
            "refit_epochs": self.refit_epochs,
        }


def run_cross_validation(
    x: np.ndarray, y: np.ndarray, units: np.ndarray, head: HeadConfig, training: TrainingConfig,
    evaluation: EvaluationConfig, progress=None, feature_sets: dict[str, np.ndarray] | None = None,
) -> CrossValidation | None:
    """Folds, candidates, the chosen head and the OOF threshold; None when fewer than two folds fit.

    feature_sets: name -> column indices of `x` (smallest first, the last all columns); a candidate
    with ``features`` set trains on those columns only (its fold heads are that narrow).
    """
    folds = group_folds(y, units, training.cv_folds, training.seed)
    if folds is None:
        return None
    feature_sets = feature_sets or {}
    results = []
    for candidate in candidates_for(head, training, list(feature_sets)):
        columns = feature_sets.get(candidate.features) if candidate.features else None
        results.append(cross_validate(x if columns is None else np.asarray(x)[:, columns], y, folds, candidate, training))
        if progress:
            progress(1)
    chosen, reason = select_candidate(results)
    choice = choose_configured_threshold(evaluation, y, results[chosen].oof, source="out_of_fold")
    return CrossValidation(folds, results, chosen, reason, choice, fold_scores(y, results[chosen].oof, folds, choice.threshold))
