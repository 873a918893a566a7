"""The vectorised StratifiedGroupKFold (data/split.stratified_group_kfold) gives scikit-learn's folds exactly,
and is the splitter the validation carve and the cross-validation folds use."""

from __future__ import annotations

import time
import warnings

import numpy as np
import pytest
from sklearn.model_selection import StratifiedGroupKFold

from keeneye.data.split import stratified_group_kfold


def folds(splitter, y: np.ndarray, groups: np.ndarray) -> list[list[int]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return [sorted(map(int, held)) for _, held in splitter.split(np.zeros(len(y)), y, groups=groups)]


@pytest.mark.parametrize("case", range(12))
def test_same_folds_as_scikit_learn(case: int) -> None:
    # many small groups and a few large ones, two or three classes, 2-10 folds, ties between folds included
    rng = np.random.default_rng(case)
    n, k, classes = int(rng.integers(30, 160)), int(rng.integers(2, 11)), int(rng.integers(2, 4))
    y = rng.integers(0, classes, n)
    groups = rng.integers(0, int(rng.integers(k, n + 1)), n)
    if case % 4 == 0:  # most rows a group of their own, as in a folder of distinct images
        groups = np.where(rng.random(n) < 0.8, np.arange(n) + n, groups)
    seed = int(rng.integers(0, 2**31))
    try:
        expected = folds(StratifiedGroupKFold(k, shuffle=True, random_state=seed), y, groups)
    except ValueError:  # more folds than groups or class members: scikit-learn refuses, so must the subclass
        with pytest.raises(ValueError):
            folds(stratified_group_kfold(k, seed), y, groups)
        return
    assert folds(stratified_group_kfold(k, seed), y, groups) == expected


def test_a_thousand_units_split_in_a_fraction_of_scikit_learns_time() -> None:
    rng = np.random.default_rng(0)
    y = (rng.random(1200) < 0.4).astype(int)
    groups = np.arange(1200) // np.where(rng.random(1200) < 0.1, 3, 1)  # mostly single images, some triples
    started = time.perf_counter()
    fast = folds(stratified_group_kfold(5, 1), y, groups)
    fast_s = time.perf_counter() - started
    started = time.perf_counter()
    slow = folds(StratifiedGroupKFold(5, shuffle=True, random_state=1), y, groups)
    slow_s = time.perf_counter() - started
    assert fast == slow
    assert fast_s < slow_s / 2, (fast_s, slow_s)
