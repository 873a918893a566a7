"""Group-aware, stratified, seeded splits: validation and testing never share a group with training."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from keeneye.data import scan
from keeneye.data.split import _fold_plan, assign_groups, assign_splits, group_holdout, split_units, split_validation
from keeneye.errors import DataError


def grouped_manifest(n_groups: int = 120, seed: int = 0, positive_share: float = 0.3) -> pd.DataFrame:
    """Groups of 1-8 images; most groups are one class, a few mix both (like real tiles)."""
    rng = np.random.default_rng(seed)
    rows = []
    for g in range(n_groups):
        label = "defect" if rng.random() < positive_share else "good"
        for i in range(int(rng.integers(1, 9))):
            row_label = label if rng.random() > 0.05 else ("good" if label == "defect" else "defect")
            rows.append({"path": f"/x/g{g}_{i}.png", "label": row_label, "split": "training", "group": f"g{g}", "sha1": f"{g}-{i}"})
    return pd.DataFrame(rows).astype({"group": object})


def shared_groups(manifest: pd.DataFrame, a: str, b: str) -> set:
    return set(manifest.loc[manifest["split"] == a, "group"]) & set(manifest.loc[manifest["split"] == b, "group"])


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_no_group_is_shared_between_splits_and_labels_stay_stratified(seed: int) -> None:
    manifest = grouped_manifest(seed=seed)
    result = assign_splits(manifest, validation_fraction=0.15, test_fraction=0.2, seed=seed)
    m = result.manifest
    assert result.group_aware
    assert set(m["split"]) == {"training", "validation", "testing"}
    for a, b in (("training", "testing"), ("training", "validation"), ("validation", "testing")):
        assert not shared_groups(m, a, b), (a, b)
    overall = (manifest["label"] == "defect").mean()
    n = len(m)
    assert abs((m["split"] == "testing").sum() / n - 0.2) < 0.05
    assert abs((m["split"] == "validation").sum() / n - 0.8 * 0.15) < 0.05
    for split in ("training", "validation", "testing"):
        share = (m.loc[m["split"] == split, "label"] == "defect").mean()
        assert abs(share - overall) < 0.08, (split, share, overall)
    assert any("whole groups" in note for note in result.notes)


def test_split_is_seeded() -> None:
    manifest = grouped_manifest()
    first = assign_splits(manifest, 0.15, 0.2, seed=3).manifest["split"]
    again = assign_splits(manifest, 0.15, 0.2, seed=3).manifest["split"]
    other = assign_splits(manifest, 0.15, 0.2, seed=4).manifest["split"]
    assert first.equals(again)
    assert not first.equals(other)


def test_given_splits_are_kept_and_only_training_is_carved() -> None:
    manifest = grouped_manifest(60)
    manifest.loc[manifest.index[:40], "split"] = "testing"
    manifest.loc[manifest.index[40:50], "split"] = "validation"
    m = assign_splits(manifest, 0.15, 0.2, seed=0).manifest
    assert (m.loc[manifest.index[:40], "split"] == "testing").all()
    assert (m.loc[manifest.index[40:50], "split"] == "validation").all()
    assert (m.loc[manifest.index[50:], "split"] == "training").all()  # validation given: nothing else moved


def test_without_groups_validation_is_the_plain_stratified_split() -> None:
    rng = np.random.default_rng(0)
    manifest = pd.DataFrame({
        "path": [f"/x/{i}.png" for i in range(100)], "label": rng.choice(["ok", "defect"], 100, p=[0.7, 0.3]),
        "split": ["training"] * 80 + ["testing"] * 20, "group": [None] * 100, "sha1": [str(i) for i in range(100)],
    }).astype({"group": object})
    result = assign_splits(manifest, 0.25, 0.2, seed=5)
    assert not result.group_aware
    assert result.manifest["split"].equals(split_validation(manifest, 0.25, 5)["split"])
    assert scan.split_validation is split_validation  # moved, still importable from scan


def test_testing_is_carved_when_the_manifest_has_none() -> None:
    manifest = pd.DataFrame({
        "path": [f"/x/{i}.png" for i in range(50)], "label": ["a"] * 25 + ["b"] * 25, "split": ["training"] * 50,
        "group": [None] * 50, "sha1": [str(i) for i in range(50)],
    }).astype({"group": object})
    m = assign_splits(manifest, 0.2, 0.2, seed=0).manifest
    counts = m.groupby(["split", "label"]).size()
    assert counts["testing", "a"] == counts["testing", "b"] == 5
    assert counts["validation", "a"] == counts["validation", "b"] == 4
    with pytest.raises(DataError, match="no testing images and data.test_fraction is 0"):
        assign_splits(manifest, 0.2, 0.0, seed=0)


def test_identical_files_stay_together_even_without_groups() -> None:
    rows = []
    for i in range(40):
        sha = f"dup{i // 2}" if i < 20 else f"u{i}"  # ten pairs of byte-identical files, twenty singles
        rows.append({"path": f"/x/{i}.png", "label": "a" if i % 4 < 2 else "b", "split": "training", "group": None, "sha1": sha})
    manifest = pd.DataFrame(rows).astype({"group": object})
    units = split_units(manifest)
    assert units[0] == units[1] and units[2] == units[3] and units[0] != units[2]
    for seed in range(5):
        m = assign_splits(manifest, 0.3, 0.3, seed=seed).manifest
        per_sha = m.groupby("sha1")["split"].nunique()
        assert (per_sha == 1).all(), seed


def test_units_join_groups_through_shared_files() -> None:
    manifest = pd.DataFrame({
        "path": list("abcd"), "label": ["x"] * 4, "split": ["training"] * 4,
        "group": ["g1", "g1", "g2", None], "sha1": ["s1", "s2", "s2", "s3"],
    }).astype({"group": object})
    units = split_units(manifest)
    assert units[0] == units[1] == units[2] != units[3]  # g1 and g2 share the file s2


def test_holdout_never_takes_a_whole_class() -> None:
    labels = np.array(["a"] * 30 + ["b"] * 2)
    units = np.array(list(range(30)) + [30, 30])  # the rare class is one group
    for seed in range(10):
        mask = group_holdout(labels, units, 0.5, seed)
        assert (~mask & (labels == "b")).any()


def test_fold_plan() -> None:
    assert _fold_plan(0.15, 1000) == (3, 20)
    assert _fold_plan(0.2, 1000) == (1, 5)
    assert _fold_plan(0.5, 1000) == (1, 2)
    assert _fold_plan(0.4, 1000) == (2, 5)
    k, n = _fold_plan(0.15, 4)  # few groups: at most 4 folds
    assert n <= 4 and 0 < k < n


def test_group_pattern() -> None:
    manifest = pd.DataFrame({
        "path": ["/d/vid12_003.png", "/d/vid12_004.png", "/d/other.png", "/vid99/x_1.png"],
        "label": ["a"] * 4, "split": ["training"] * 4, "group": [None, "kept", None, None], "sha1": list("wxyz"),
    }).astype({"group": object})
    groups = assign_groups(manifest, r"^(vid\d+)_")["group"].tolist()
    assert groups == ["vid12", "kept", None, None]  # only the file name is matched, never the folder
    assert assign_groups(manifest, r"vid\d+")["group"].tolist() == ["vid12", "kept", None, None]  # whole match
