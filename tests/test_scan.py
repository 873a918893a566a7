"""Scanning folders into a manifest, the class mapping and the validation split."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from keeneye.data.scan import resolve_class_names, scan_evaluation_folder, scan_folder, skip_reason, split_validation
from keeneye.errors import DataError


def write_images(folder: Path, count: int, prefix: str = "img") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(folder)) + count)
    for index in range(count):
        cv2.imwrite(str(folder / f"{prefix}_{index}.png"), rng.integers(0, 255, (12, 12, 3), dtype=np.uint8))


def make_layout(root: Path, classes=("ok_front", "def_front"), train=6, test=3, split_names=("training", "testing")) -> Path:
    for split, count in zip(split_names, (train, test)):
        for label in classes:
            write_images(root / split / label, count, prefix=label)
    return root


def test_manifest_columns_labels_and_hashes(tmp_path: Path) -> None:
    root = make_layout(tmp_path)
    (root / "training" / "def_front" / "nested" / "deeper").mkdir(parents=True)
    write_images(root / "training" / "def_front" / "nested" / "deeper", 2, prefix="deep")
    result = scan_folder(root)
    manifest = result.manifest
    assert list(manifest.columns) == ["path", "label", "split", "group", "sha1"]
    assert result.class_names == ("ok_front", "def_front")
    counts = manifest.groupby(["split", "label"]).size().to_dict()
    assert counts == {("training", "def_front"): 8, ("training", "ok_front"): 6, ("testing", "def_front"): 3, ("testing", "ok_front"): 3}
    assert manifest["sha1"].str.fullmatch(r"[0-9a-f]{40}").all()
    assert any("deeper" in p for p in manifest["path"])


def test_train_test_aliases(tmp_path: Path) -> None:
    root = make_layout(tmp_path, classes=("flip", "notflip"), split_names=("train", "test"))
    result = scan_folder(root)
    assert result.class_names == ("notflip", "flip")
    assert set(result.manifest["split"]) == {"training", "testing"}


@pytest.mark.parametrize(
    "labels, positive, expected",
    [
        (["MT_Free", "MT_Crack"], None, ("MT_Free", "MT_Crack")),
        (["good", "scratch"], None, ("good", "scratch")),
        (["no_defect", "defect"], None, ("no_defect", "defect")),
        (["cat", "dog"], "cat", ("dog", "cat")),
        (["good", "defect"], "good", ("defect", "good")),
    ],
)
def test_positive_class_resolution(labels, positive, expected) -> None:
    assert resolve_class_names(labels, positive) == expected


def test_ambiguous_positive_class_asks_for_config() -> None:
    with pytest.raises(DataError, match="set positive_class"):
        resolve_class_names(["cat", "dog"], None)
    with pytest.raises(DataError, match="not one of the classes"):
        resolve_class_names(["cat", "dog"], "bird")


def test_wrong_number_of_classes_lists_what_was_found(tmp_path: Path) -> None:
    root = make_layout(tmp_path, classes=("a", "b", "c"))
    with pytest.raises(DataError, match="exactly two class folders, found 3: a, b, c"):
        scan_folder(root)


def test_missing_split_folder_is_explained(tmp_path: Path) -> None:
    write_images(tmp_path / "training" / "good", 2)
    write_images(tmp_path / "training" / "bad", 2)
    (tmp_path / "images").mkdir()
    with pytest.raises(DataError, match=r"training/<class>/ and testing/<class>/.*found: images/, training/"):
        scan_folder(tmp_path)


def test_testing_class_not_in_training(tmp_path: Path) -> None:
    root = make_layout(tmp_path)
    write_images(root / "testing" / "other", 1)
    with pytest.raises(DataError, match="testing/ has class folders not in training/: other"):
        scan_folder(root)


def test_skip_reasons_by_name() -> None:
    assert skip_reason(Path("a/.DS_Store")) == "hidden file"
    assert "extension" in skip_reason(Path("a/notes.txt"))
    assert "mask" in skip_reason(Path("a/x_mask.png"))
    assert "mask" in skip_reason(Path("a/x_label.png"))
    assert skip_reason(Path("a/label_x.png")) is None
    assert skip_reason(Path("a/photo.JPG")) is None


def test_validation_split_is_stratified_seeded_and_only_from_training(tmp_path: Path) -> None:
    root = make_layout(tmp_path, train=20, test=5)
    manifest = scan_folder(root).manifest
    first = split_validation(manifest, 0.25, seed=7)
    again = split_validation(manifest, 0.25, seed=7)
    other = split_validation(manifest, 0.25, seed=8)
    assert first.equals(again)
    assert not first.equals(other)
    validation = first[first["split"] == "validation"]
    assert validation.groupby("label").size().to_dict() == {"def_front": 5, "ok_front": 5}
    assert (first[manifest["split"] == "testing"]["split"] == "testing").all()


def test_evaluation_folder_accepts_bare_class_folders(tmp_path: Path) -> None:
    write_images(tmp_path / "def_front", 2)
    result = scan_evaluation_folder(tmp_path, ("ok_front", "def_front"))
    assert len(result.manifest) == 2
    with pytest.raises(DataError, match="expected class folders named ok_front and/or def_front"):
        write_images(tmp_path / "unknown", 1)
        scan_evaluation_folder(tmp_path, ("ok_front", "def_front"))
