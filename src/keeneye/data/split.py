"""Training / validation / testing splits that do not leak: group-aware, stratified, seeded.

Images of one physical part (a tile shot six times, frames of one video) are near-copies of each
other; when some land in training and others in testing, the test score measures memory, not
generalisation. So holding out images works on *split units*, not on images:

* a unit is a group (the manifest's ``group`` column, or ``data.group_pattern`` applied to the
  file name) and every row without a group is a unit of its own;
* byte-identical files (same ``sha1``) are always in the same unit, groups or not;
* with automatic groups (``data.auto_groups``), near-duplicates are joined too: perceptual-hash
  neighbours and mutual embedding neighbours (:func:`keeneye.data.audit.near_duplicate_edges`),
  as connected components (scipy.sparse.csgraph). Given groups rule: a link between two images of
  different given groups is ignored (the audit still reports it), so automatic evidence only
  joins ungrouped images to each other or to a group;
* validation (``training.validation_fraction``) and, when the data has no testing rows, testing
  (``data.test_fraction``) are carved from the training rows by whole units, stratified by label
  where possible (:class:`sklearn.model_selection.StratifiedGroupKFold`, seeded);
* when every unit is a single image, this is the plain per-class stratified split
  (:func:`split_validation`, unchanged, so folder runs reproduce earlier runs exactly).

Rows that the manifest already puts in validation or testing are never moved.
"""

from __future__ import annotations

import functools
import re
import warnings
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
import pandas as pd

from keeneye.errors import DataError

__all__ = ["SplitResult", "assign_groups", "assign_splits", "split_units", "split_validation", "group_holdout", "split_with_auto_groups",
           "stratified_group_kfold"]

MAX_FOLDS = 20


def split_validation(manifest: pd.DataFrame, fraction: float, seed: int) -> pd.DataFrame:
    """Move a stratified, seeded share of the training rows to `validation` (never from testing)."""
    manifest = manifest.copy()
    if fraction <= 0:
        return manifest
    rng = np.random.default_rng(seed)
    for label in sorted(manifest["label"].unique()):
        index = manifest.index[(manifest["split"] == "training") & (manifest["label"] == label)].to_numpy()
        n_validation = int(round(len(index) * fraction))
        if len(index) >= 2:
            n_validation = min(max(n_validation, 1), len(index) - 1)
        else:
            n_validation = 0
        chosen = rng.choice(np.sort(index), size=n_validation, replace=False)
        manifest.loc[chosen, "split"] = "validation"
    return manifest


def assign_groups(manifest: pd.DataFrame, pattern: str) -> pd.DataFrame:
    """Fill empty groups from the file name: the pattern's first capture group, else its whole match.

    A name that does not match keeps an empty group (it is a unit of its own).
    """
    regex = re.compile(pattern)
    manifest = manifest.copy()

    def group_of(path: str) -> str | None:
        found = regex.search(Path(path).name)
        if found is None:
            return None
        value = found.group(1) if regex.groups else found.group(0)
        return value or None

    empty = manifest["group"].isna() | (manifest["group"].astype(str) == "")
    manifest.loc[empty, "group"] = [group_of(p) for p in manifest.loc[empty, "path"]]
    manifest["group"] = manifest["group"].astype(object)
    return manifest


def _given_groups(manifest: pd.DataFrame) -> np.ndarray:
    groups = pd.Series([None if pd.isna(g) or str(g) == "" else str(g) for g in manifest["group"]], dtype=object)
    return pd.factorize(groups)[0]


def usable_edges(manifest: pd.DataFrame, edges: pd.DataFrame | None) -> tuple[np.ndarray, np.ndarray, int]:
    """(i, j, n ignored): the near-duplicate links that do not join two different given groups."""
    if edges is None or not len(edges):
        return np.zeros(0, np.int64), np.zeros(0, np.int64), 0
    codes = _given_groups(manifest)
    i, j = edges["i"].to_numpy(np.int64), edges["j"].to_numpy(np.int64)
    crossing = (codes[i] >= 0) & (codes[j] >= 0) & (codes[i] != codes[j])
    return i[~crossing], j[~crossing], int(crossing.sum())


def split_units(manifest: pd.DataFrame, edges: pd.DataFrame | None = None) -> np.ndarray:
    """An integer unit id per row: connected components of 'same group', 'same file content' and `edges`.

    edges: near-duplicate links (row positions `i`, `j`), see :func:`usable_edges`.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(manifest)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    group_codes = _given_groups(manifest)
    sha_codes, _ = pd.factorize(manifest["sha1"].astype(object))
    rows, cols = [], []
    offset = n
    for codes in (group_codes, sha_codes):
        has = codes >= 0
        rows.append(np.flatnonzero(has))
        cols.append(codes[has] + offset)
        offset += int(codes.max()) + 1 if has.any() else 0
    link_i, link_j, _ = usable_edges(manifest, edges)
    r = np.concatenate(rows + [link_i])
    c = np.concatenate(cols + [link_j])
    graph = coo_matrix((np.ones(len(r), dtype=np.int8), (r, c)), shape=(offset, offset))
    _, labels = connected_components(graph, directed=False)
    _, units = np.unique(labels[:n], return_inverse=True)
    return units.astype(np.int64)


def _fold_plan(fraction: float, n_units: int) -> tuple[int, int]:
    """(k, K): hold out k of K folds, k/K as close to `fraction` as K <= min(20, n_units) allows."""
    best = None
    for n_folds in range(2, max(2, min(MAX_FOLDS, n_units)) + 1):
        k = min(max(1, round(fraction * n_folds)), n_folds - 1)
        error = abs(k / n_folds - fraction)
        if best is None or error < best[0] - 1e-12:
            best = (error, k, n_folds)
    _, k, n_folds = best
    frac = Fraction(k, n_folds)
    return frac.numerator, frac.denominator


def stratified_group_kfold(n_splits: int, seed: int):
    """scikit-learn's ``StratifiedGroupKFold(n_splits, shuffle=True, random_state=seed)``: the same folds, faster.

    Why: its greedy search places one group at a time, trying every fold with a dozen small numpy
    calls each (``_find_best_fold``); with thousands of split units (most images are a unit of their
    own) that Python loop took about 25 s per casting train (two splitters: validation and the
    cross-validation folds). The subclass tries all folds in one vectorised step and keeps the same
    choice rule (lowest spread of the class shares, ties by np.isclose to the smaller fold), so the
    folds are identical (tests/test_split_speed.py compares them with scikit-learn's own).
    """
    return _fast_splitter_class()(n_splits=n_splits, shuffle=True, random_state=seed % (2**32))


@functools.cache
def _fast_splitter_class():
    from sklearn.model_selection import StratifiedGroupKFold

    class VectorisedStratifiedGroupKFold(StratifiedGroupKFold):
        def _find_best_fold(self, y_counts_per_fold, y_cnt, group_y_counts):
            n = self.n_splits
            trial = np.repeat(y_counts_per_fold[np.newaxis], n, axis=0)  # trial i: the group added to fold i
            trial[np.arange(n), np.arange(n)] += group_y_counts
            evals = np.mean(np.std(trial / y_cnt.reshape(1, 1, -1), axis=1), axis=1).tolist()
            samples = y_counts_per_fold.sum(axis=1).tolist()
            best, min_eval, min_samples = None, np.inf, np.inf
            for i, (value, size) in enumerate(zip(evals, samples)):  # scikit-learn's rule, in its order
                tie = min_eval != np.inf and abs(value - min_eval) <= 1e-8 + 1e-5 * abs(min_eval)  # np.isclose
                if value < min_eval or (tie and size < min_samples):
                    best, min_eval, min_samples = i, value, size
            return best

    return VectorisedStratifiedGroupKFold


def group_holdout(labels: np.ndarray, units: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask: whole units holding about `fraction` of the rows, stratified by label where possible."""
    labels = np.asarray(labels)
    units = np.asarray(units)
    mask = np.zeros(len(labels), dtype=bool)
    n_units = len(np.unique(units))
    if fraction <= 0 or n_units < 2:
        return mask
    # StratifiedGroupKFold needs at least n_splits rows of every class (tiny sets, or few automatic groups)
    smallest_class = int(np.unique(labels, return_counts=True)[1].min())
    k, n_folds = _fold_plan(fraction, max(2, min(n_units, smallest_class)))
    splitter = stratified_group_kfold(n_folds, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "least populated class has fewer members than n_splits"
        folds = [test for _, test in splitter.split(np.zeros(len(labels)), labels, groups=units)]
    chosen = np.random.default_rng(seed).choice(n_folds, size=k, replace=False)
    for fold in chosen:
        mask[folds[fold]] = True
    # Never take every image of a class that the rest still needs: give back its smallest units.
    for label in np.unique(labels):
        of_label = labels == label
        if of_label.sum() >= 2 and not (of_label & ~mask).any():
            held_units = np.unique(units[of_label & mask])
            sizes = {u: int((units == u).sum()) for u in held_units}
            mask[units == min(sizes, key=sizes.get)] = False
    return mask


@dataclass
class SplitResult:
    """The manifest with every row in training, validation or testing, and what was done."""

    manifest: pd.DataFrame
    group_aware: bool
    notes: list[str] = field(default_factory=list)
    units: np.ndarray | None = None  # the split unit of every row (cross-validation folds use the same)
    auto_groups: dict | None = None  # what the near-duplicate evidence joined (for the audit)


def auto_group_summary(manifest: pd.DataFrame, edges: pd.DataFrame | None, units: np.ndarray) -> dict:
    """How many units the near-duplicate evidence formed (joining units that would otherwise be apart), and the largest."""
    plain = split_units(manifest)
    _, _, ignored = usable_edges(manifest, edges)
    frame = pd.DataFrame({"unit": units, "plain": plain})
    merged = frame.groupby("unit")["plain"].nunique()
    formed = merged[merged > 1].index
    sizes = frame["unit"].value_counts()
    by_kind = {} if edges is None or not len(edges) else {k: int(n) for k, n in edges["kind"].value_counts().items()}
    return {"n_groups": int(len(formed)), "n_images": int(sizes[formed].sum()) if len(formed) else 0,
            "largest": int(sizes[formed].max()) if len(formed) else 0, "links": by_kind, "edges_ignored": ignored}


def _carve(manifest: pd.DataFrame, units: np.ndarray, fraction: float, seed: int, target: str, notes: list[str]) -> bool:
    """Move about `fraction` of the training rows (by unit) to `target`; returns whether it was group-aware."""
    pool = (manifest["split"] == "training").to_numpy()
    blocked = np.zeros_like(pool)
    if target == "validation":  # a unit that reaches into testing never gives images to validation
        blocked = pool & np.isin(units, units[(manifest["split"] == "testing").to_numpy()])
        pool = pool & ~blocked
        if blocked.any():
            notes.append(f"validation: {int(blocked.sum())} training images share a group, near-duplicate or file "
                         "content with testing images; they stay in training, never in validation.")
    pool_units = units[pool]
    grouped = len(np.unique(pool_units)) < int(pool.sum())
    if fraction <= 0 or not pool.any():
        return grouped
    if not grouped and target == "validation" and not blocked.any():  # exactly the earlier behaviour, so folder runs reproduce
        before = manifest["split"].copy()
        manifest["split"] = split_validation(manifest, fraction, seed)["split"]
        index = manifest.index[(before != "validation") & (manifest["split"] == "validation")]
    elif grouped:
        mask = group_holdout(manifest.loc[pool, "label"].to_numpy(), pool_units, fraction, seed)
    else:  # one image per unit: per-class stratified sample, as split_validation does
        rng = np.random.default_rng([seed, 1])
        labels = manifest.loc[pool, "label"].to_numpy()
        mask = np.zeros(int(pool.sum()), dtype=bool)
        for label in sorted(np.unique(labels)):
            where = np.flatnonzero(labels == label)
            n = int(round(len(where) * fraction))
            n = min(max(n, 1), len(where) - 1) if len(where) >= 2 else 0
            mask[rng.choice(where, size=n, replace=False)] = True
    if grouped or target != "validation" or blocked.any():
        index = manifest.index[pool][mask]
        manifest.loc[index, "split"] = target
    held = manifest.loc[index, "label"].value_counts()
    total = manifest.loc[pool, "label"].value_counts()
    shares = ", ".join(f"{label} {int(held.get(label, 0))}/{int(n)}" for label, n in total.sort_index().items())
    how = f"by {len(np.unique(units[manifest.index.get_indexer(index)]))} whole groups" if grouped else "by image"
    notes.append(f"{target}: {len(index)} of {int(pool.sum())} training images held out {how} ({shares}).")
    return grouped


def assign_splits(manifest: pd.DataFrame, validation_fraction: float, test_fraction: float, seed: int,
                  edges: pd.DataFrame | None = None) -> SplitResult:
    """Carve testing (only when there are no testing rows) and validation from the training rows.

    edges: near-duplicate links for automatic groups (:func:`keeneye.data.audit.near_duplicate_edges`).
    """
    manifest = manifest.copy()
    manifest["split"] = manifest["split"].fillna("training")
    notes: list[str] = []
    units = split_units(manifest, edges)
    auto = None
    if edges is not None:
        auto = auto_group_summary(manifest, edges, units)
        notes.append(f"automatic groups: {auto['n_groups']} formed from near-duplicates ({auto['n_images']} images, "
                     f"largest {auto['largest']}).")
    group_aware = False
    if not (manifest["split"] == "testing").any():
        if test_fraction <= 0:
            raise DataError("the data has no testing images and data.test_fraction is 0; give testing rows or set data.test_fraction, e.g. 0.2.")
        group_aware |= _carve(manifest, units, test_fraction, seed, "testing", notes)
    if (manifest["split"] == "validation").any():
        notes.append(f"validation: {int((manifest['split'] == 'validation').sum())} images given by the manifest.")
    else:
        group_aware |= _carve(manifest, units, validation_fraction, seed, "validation", notes)
    return SplitResult(manifest, group_aware, notes, units, auto)


def split_with_auto_groups(cfg, manifest: pd.DataFrame, inspection, features: np.ndarray | None = None,
                           ok: np.ndarray | None = None, neighbours: tuple | None = None):
    """assign_splits with the near-duplicate links of data.auto_groups (hash neighbours, mutual embedding neighbours).

    neighbours: audit.mutual_neighbour_pairs of `features` when the caller computed them already."""
    from keeneye.data.audit import near_duplicate_edges

    edges = None
    if cfg.data.auto_groups:
        readable = inspection[0]["error"].isna().to_numpy()
        edges = near_duplicate_edges(manifest, inspection[1], readable, cfg.data.near_duplicate_hash_distance,
                                     features, ok, cfg.data.near_duplicate_similarity, neighbours=neighbours)
    return assign_splits(manifest, cfg.training.validation_fraction, cfg.data.test_fraction, cfg.training.seed, edges=edges)
