"""BundleWriter / BundleMetadata (issue #10): one writer owns the bundle's layout and its typed metadata."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pandas as pd
import pytest

from keeneye.bundle import (
    METADATA_FILE, ONNX_FILE, PREPROCESSING, AnomalyFeatureInfo, BackboneInfo, BundleMetadata, BundleWriter, check_metadata,
)
from keeneye.errors import BundleError

SRC = Path(__file__).resolve().parents[1] / "src" / "keeneye"


def full_metadata(**changes) -> BundleMetadata:
    values = dict(
        bundle_format=1, created="2026-12-01T12:00:00+0000", class_names=("good", "defect"), positive_class="defect",
        threshold=0.375, threshold_choice={"threshold": 0.375, "method": "best F1 on validation"},
        input={"image_size": 96, "resize": "squash", "tiles": None, "dtype": "uint8", "channels": "RGB", "shape": [96, 96, 3]},
        preprocessing=PREPROCESSING,
        backbone=BackboneInfo(name="mobilenet_v2", alpha=0.35, features="gap", weights="w.h5", weights_sha256="ab" * 32),
        head={"hidden_units": 0}, training={"kept": "head"}, metrics={"testing": {"n": 4}},
        data=[{"split": "training", "label": "good", "found": 3, "skipped": 0, "dropped": 0, "used": 3}],
        timings={"total_s": 1.5}, versions={"keeneye": "0"},
        anomaly_feature=AnomalyFeatureInfo(layers=["block_6_expand_relu", "block_12_add"], grid="coarsest", feature_dim=128,
                                           score_top_k=10, score_neighbours=1, bank_size=500, coef_logit=1.5,
                                           coef_log_score=2.0, intercept=-3.0, combination="sigmoid(...)"),
    )
    return BundleMetadata(**(values | changes))


def test_metadata_round_trips_in_declared_order(tmp_path: Path) -> None:
    written = full_metadata()
    BundleWriter(tmp_path).write_metadata(written)
    text = (tmp_path / METADATA_FILE).read_text()
    loaded = json.loads(text)
    assert list(loaded) == [name for name in BundleMetadata.model_fields]  # every field given, in schema order
    assert loaded["class_names"] == ["good", "defect"] and loaded["backbone"]["alpha"] == 0.35
    assert check_metadata(loaded, tmp_path) == written


def test_fields_not_given_are_not_written(tmp_path: Path) -> None:
    minimal = BundleMetadata(bundle_format=1, class_names=("a", "b"), positive_class="b", threshold=0.5, input={"image_size": 32})
    BundleWriter(tmp_path).write_metadata(minimal)
    assert json.loads((tmp_path / METADATA_FILE).read_text()) == {
        "bundle_format": 1, "class_names": ["a", "b"], "positive_class": "b", "threshold": 0.5, "input": {"image_size": 32}}


def test_invalid_metadata_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="threshold"):
        BundleWriter(tmp_path).write_metadata({"bundle_format": 1, "class_names": ["a", "b"], "positive_class": "b",
                                               "threshold": 1.5, "input": {"image_size": 32}})
    assert not (tmp_path / METADATA_FILE).exists()
    with pytest.raises(ValueError):
        full_metadata(threshold=float("nan"))


def test_a_staged_bundle_appears_complete_or_not_at_all(tmp_path: Path) -> None:
    with BundleWriter.staged(tmp_path, "run") as bundle:
        bundle.save_table("data_counts.csv", pd.DataFrame({"n": [1, 2]}))
        bundle.write_onnx(b"onnx bytes", {"passed": True})
        assert not (tmp_path / "run").exists()  # still hidden while being written
        bundle.write_metadata(full_metadata())
        final = bundle.publish()
    assert final == tmp_path / "run" and bundle.folder == final
    assert sorted(p.name for p in final.iterdir()) == sorted(
        ["data_counts.csv", METADATA_FILE, ONNX_FILE, ONNX_FILE + ".verification.json"])
    cleaned = []
    with pytest.raises(RuntimeError):
        with BundleWriter.staged(tmp_path, "broken", on_error=lambda: cleaned.append(True)) as bundle:
            bundle.save_table("history.csv", pd.DataFrame({"epoch": [1]}))
            raise RuntimeError("crash while writing")
    assert cleaned == [True]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no "broken", no staging folder left


def test_the_metadata_schema_is_written_only_in_bundle_py() -> None:
    """api.py, export.py and engines.py call the writer; they spell no metadata key of their own."""
    for name in ("api.py", "inference/export.py", "inference/engines.py"):
        strings = {node.value for node in ast.walk(ast.parse((SRC / name).read_text()))
                   if isinstance(node, ast.Constant) and isinstance(node.value, str)}
        assert not strings & {"bundle_format", "weights_sha256", "preprocessing", "inside_model"}, name
