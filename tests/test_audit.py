"""The data audit on generated images: exact and near-duplicates, unreadable files, groups, leakage."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from rich.console import Console
from typer.testing import CliRunner

from keeneye.data.audit import (
    Audit, _brute_force_pairs, _pigeonhole_pairs, audit_manifest, dhash, hamming_pairs, inspect_image, settle_leakage,
)
from keeneye.data.scan import scan_folder
from keeneye.errors import DataError


def texture(seed: int, size: int = 128) -> np.ndarray:
    """A distinct, structured RGB image: smoothed noise blobs plus a few random lines."""
    rng = np.random.default_rng(seed)
    noise = cv2.GaussianBlur(rng.normal(0, 1, (size, size)).astype(np.float32), (0, 0), 6)
    grey = np.clip(128 + 60 * noise / noise.std(), 0, 255).astype(np.uint8)
    image = cv2.cvtColor(grey, cv2.COLOR_GRAY2RGB)
    for _ in range(3):
        p, q = rng.integers(0, size, 2), rng.integers(0, size, 2)
        cv2.line(image, tuple(int(v) for v in p), tuple(int(v) for v in q), tuple(int(c) for c in rng.integers(0, 255, 3)), 3)
    return image


def near_copy(image: np.ndarray) -> np.ndarray:
    """The same picture saved again: scaled down, a little brighter (and re-encoded as JPEG by the caller)."""
    smaller = cv2.resize(image, (112, 112), interpolation=cv2.INTER_AREA)
    return np.clip(smaller.astype(np.int16) + 10, 0, 255).astype(np.uint8)


def save(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    return path


@pytest.fixture()
def leaky(tmp_path: Path) -> Path:
    """A folder dataset with planted problems (see the asserts for what is where)."""
    root = tmp_path / "data"
    for i in range(8):
        save(root / "training" / "good" / f"g{i}.png", texture(i))
        save(root / "training" / "defect" / f"d{i}.png", texture(100 + i))
    for i in range(4):
        save(root / "testing" / "good" / f"tg{i}.png", texture(200 + i))
        save(root / "testing" / "defect" / f"td{i}.png", texture(300 + i))
    shutil.copy(root / "training" / "good" / "g0.png", root / "testing" / "good" / "copy_of_g0.png")  # exact, across
    save(root / "testing" / "defect" / "near_d1.jpg", near_copy(texture(101)))  # near-duplicate, across
    shutil.copy(root / "training" / "good" / "g2.png", root / "training" / "good" / "g2_again.png")  # exact, within
    shutil.copy(root / "training" / "good" / "g3.png", root / "training" / "defect" / "g3_as_defect.png")  # conflicting labels
    data = (root / "training" / "good" / "g4.png").read_bytes()
    (root / "testing" / "good" / "truncated.png").write_bytes(data[: len(data) // 2])  # unreadable
    (root / "training" / "good" / "notes.txt").write_text("not an image")  # skipped by name
    return root


def audited(root: Path, hash_distance: int = 10) -> Audit:
    scan = scan_folder(root, positive_class="defect")
    return audit_manifest(scan.manifest, scan.class_names, scan.skipped, hash_distance=hash_distance)


def names(paths) -> set[str]:
    return {Path(p).name for p in paths}


def test_audit_finds_what_was_planted(leaky: Path) -> None:
    audit = audited(leaky)
    r = audit.report
    json.loads(audit.to_json())  # JSON-serialisable, no NaN
    assert r["n_images"] == 16 + 8 + 5 and r["n_skipped"] == 1
    exact = r["exact_duplicates"]
    assert [names(f["path"] for f in e["files"]) for e in exact["across_splits"]] == [{"g0.png", "copy_of_g0.png"}]
    within = sorted(sorted(names(f["path"] for f in e["files"])) for e in exact["within_split"])
    assert within == [["g2.png", "g2_again.png"], ["g3.png", "g3_as_defect.png"]]
    assert [names(f["path"] for f in e["files"]) for e in exact["conflicting_labels"]] == [{"g3.png", "g3_as_defect.png"}]
    assert exact["testing_images_identical_to_training"] == 1

    pairs = r["near_duplicates"]["hash"]["pairs"]
    assert [(Path(p["a_path"]).name, Path(p["b_path"]).name) for p in pairs] == [("d1.png", "near_d1.jpg")]
    assert pairs[0]["distance"] <= 10

    assert [(Path(u["path"]).name, u["reason"]) for u in r["images"]["unreadable"]] == [("truncated.png", "truncated PNG (no IEND chunk)")]
    assert r["images"]["sizes"]["most_common"] == [{"width": 128, "height": 128, "n": 27}, {"width": 112, "height": 112, "n": 1}]
    assert r["images"]["formats"] == {"PNG": 28, "JPEG": 1}
    assert r["images"]["modes"] == {"RGB": 28}  # the truncated file has no mode: it is unreadable

    leak = r["leakage"]
    assert names(item["path"] for item in leak["leaked"]) == {"copy_of_g0.png", "near_d1.jpg"}
    assert leak["by_kind"] == {"identical": 1, "near-duplicate (hash)": 1}
    assert any(w.startswith("LEAKAGE: 2 of 11 testing images") for w in r["warnings"])
    assert any("carry different labels" in w for w in r["warnings"])
    assert names(audit.manifest.loc[audit.leaked_test_index(), "path"]) == {"copy_of_g0.png", "near_d1.jpg"}


def test_distinct_images_are_not_near_duplicates(leaky: Path) -> None:
    """Every other cross-split pair is far apart: the near-duplicate found above is not luck."""
    scan = scan_folder(leaky, positive_class="defect")
    m = scan.manifest[~scan.manifest["path"].str.endswith(("truncated.png", "copy_of_g0.png", "near_d1.jpg"))]
    hashes = {p: dhash(cv2.cvtColor(cv2.imread(p), cv2.COLOR_BGR2RGB)) for p in m["path"]}
    train = [hashes[p] for p in m.loc[m["split"] == "training", "path"]]
    test = [hashes[p] for p in m.loc[m["split"] == "testing", "path"]]
    _, _, distances = hamming_pairs(np.array(test), np.array(train), 256)
    assert distances.min() > 40  # distinct textures sit near the 128 of random bits; near copies below 10


def test_hash_check_can_be_turned_off(leaky: Path) -> None:
    audit = audited(leaky, hash_distance=-1)
    assert audit.report["near_duplicates"]["hash"]["pairs"] == []
    assert names(item["path"] for item in audit.report["leakage"]["leaked"]) == {"copy_of_g0.png"}


def test_hamming_pairs_large_path_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2**63, (300, 4), dtype=np.uint64)
    b = rng.integers(0, 2**63, (500, 4), dtype=np.uint64)
    for i, j, flips in ((3, 7, 0), (10, 11, 4), (200, 499, 9), (299, 0, 12)):  # plant close pairs
        bits = np.unpackbits(a[i].view(np.uint8))
        bits[rng.choice(256, flips, replace=False)] ^= 1
        b[j] = np.packbits(bits).view(np.uint64)
    for distance in (0, 5, 10):
        brute = set(zip(*[x.tolist() for x in _brute_force_pairs(a, b, distance)]))
        joined = set(zip(*[x.tolist() for x in _pigeonhole_pairs(a, b, distance)]))
        assert brute == joined
    assert {(i, j) for i, j, _ in brute} == {(3, 7), (10, 11), (200, 499)}


def test_inspect_image_reads_headers_and_modes(tmp_path: Path) -> None:
    grey = save(tmp_path / "grey.jpg", cv2.cvtColor(texture(1)[..., 0], cv2.COLOR_GRAY2RGB))  # RGB file, grey content
    assert cv2.imwrite(str(tmp_path / "l.png"), texture(2)[..., 0])
    facts, value = inspect_image(tmp_path / "l.png")
    assert facts == {"format": "PNG", "width": 128, "height": 128, "mode": "grayscale", "error": None} and value.shape == (4,)
    facts, _ = inspect_image(grey)
    assert facts["format"] == "JPEG" and facts["mode"] == "RGB (grey content)"
    (tmp_path / "empty.jpg").write_bytes(b"")
    facts, value = inspect_image(tmp_path / "empty.jpg")
    assert facts["error"] == "empty file (0 bytes)" and value is None


def test_groups_crossing_splits_leak(tmp_path: Path) -> None:
    paths = [save(tmp_path / f"{i}.png", texture(i)) for i in range(6)]
    manifest = pd.DataFrame({
        "path": [str(p) for p in paths], "label": ["a", "b", "a", "b", "a", "b"],
        "split": ["training", "training", "validation", "testing", "testing", "testing"],
        "group": ["t1", "t2", "t1", "t2", "t3", None], "sha1": [str(i) for i in range(6)],
    }).astype({"group": object})
    audit = audit_manifest(manifest, ("a", "b"))
    crossing = {g["group"]: g["splits"] for g in audit.report["groups"]["crossing_splits"]}
    assert crossing == {"t1": {"training": 1, "validation": 1}, "t2": {"training": 1, "testing": 1}}
    assert audit.leaks == {3: ["group: group 't2' is also in training"]}
    assert audit.validation_leaks == {2: ["group: group 't1' is also in training"]}


def test_settle_leakage_drops_only_when_asked(leaky: Path) -> None:
    audit = audited(leaky)
    testing = (audit.manifest["split"] == "testing").to_numpy()
    kept = settle_leakage(audit, testing.copy(), drop=False, console=Console(quiet=True))
    assert (kept == testing).all() and audit.report["leakage"]["dropped_from_evaluation"] is None
    dropped = settle_leakage(audit, testing.copy(), drop=True, console=Console(quiet=True))
    assert testing.sum() - dropped.sum() == 2
    assert names(audit.manifest.loc[testing & ~dropped, "path"]) == {"copy_of_g0.png", "near_d1.jpg"}
    assert audit.report["leakage"]["dropped_from_evaluation"] == 2
    with pytest.raises(DataError, match="every testing image leaked"):
        only_leaked = audit.manifest.index.isin(audit.leaked_test_index())
        settle_leakage(audit, only_leaked, drop=True, console=Console(quiet=True))


def test_embedding_near_duplicates_with_real_weights(leaky: Path, imagenet_weights: Path) -> None:
    """Cosine of centred MobileNetV2 features: the near copy is found, distinct images are not."""
    from keeneye.inference.engines import KerasEngine
    from keeneye.model.backbone import ResolvedWeights, build_feature_extractor
    from keeneye.training.features import embed_manifest

    audit = audited(leaky, hash_distance=-1)  # only the embedding check can find the near copy
    extractor = build_feature_extractor(1.0, 96, ResolvedWeights("file", imagenet_weights, None))
    embeddings = embed_manifest(audit.manifest, KerasEngine(extractor), extractor.output_shape[-1], 96, None)
    audit.add_embedding_near_duplicates(embeddings.features, embeddings.ok, 0.9)
    pairs = audit.report["near_duplicates"]["embedding"]["pairs"]
    found = {(Path(p["a_path"]).name, Path(p["b_path"]).name) for p in pairs}
    assert ("d1.png", "near_d1.jpg") in found
    assert all(name == "near_d1.jpg" for _, name in found), found  # nothing else across splits
    assert names(item["path"] for item in audit.report["leakage"]["leaked"]) == {"copy_of_g0.png", "near_d1.jpg"}


def test_audit_command_writes_json_and_summary(leaky: Path, tmp_path: Path) -> None:
    from keeneye.cli import app

    config = tmp_path / "config.json"
    config.write_text(json.dumps({"data_folder_path": str(leaky), "positive_class": "defect", "training": {"validation_fraction": 0}}))
    out = tmp_path / "audit-out"
    result = CliRunner().invoke(app, ["audit", "--config", str(config), "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "audit.json").read_text())
    assert report["leakage"]["leaked_testing_images"] == 2
    summary = (out / "audit.txt").read_text()
    assert "LEAKAGE: 2 of 11 testing images" in summary and "LEAKAGE" in result.output
    bad = CliRunner().invoke(app, ["audit", "--config", str(tmp_path / "missing.json")])
    assert bad.exit_code == 2 and "config file not found" in bad.output


def test_files_that_are_not_images_keep_the_json_valid(tmp_path: Path) -> None:
    for split in ("training", "testing"):
        for label, seed in (("good", 1), ("defect", 2)):
            save(tmp_path / split / label / "ok.png", texture(seed + (10 if split == "testing" else 0)))
    (tmp_path / "training" / "good" / "empty.png").write_bytes(b"")
    (tmp_path / "training" / "defect" / "text.jpg").write_text("not an image at all")
    audit = audited(tmp_path)
    report = json.loads(audit.to_json())
    assert report["images"]["formats"] == {"PNG": 4, "not an image": 2}
    assert sorted(u["reason"] for u in report["images"]["unreadable"]) == ["empty file (0 bytes)", "not an image (unrecognised format)"]
