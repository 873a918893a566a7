"""Faults a user or a disk can cause outside the REST service (issue 9): each one reproduced.

Embedding-cache damage, bundle metadata of the wrong shape, a corrupt model.keras, broken
symbolic links in data and predict inputs, empty class folders, stale staging folders of a
killed publish, undefined specificity, GIF handled by one rule everywhere.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from badfiles import good_jpeg_bytes

from keeneye.data.cache import EmbeddingCache

# --- embedding cache ------------------------------------------------------------------------


def _features_offset(data: bytes) -> int:
    """Offset of the float payload of the 'features' member (after its .npy header)."""
    member = data.index(b"features.npy")
    return data.index(b"\n", data.index(b"{'descr'", member)) + 1


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _flip_feature_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[_features_offset(bytes(data)) + 5] ^= 0x04
    path.write_bytes(bytes(data))


def _garbage(path: Path) -> None:
    path.write_bytes(os.urandom(300))


def _wrong_arrays(path: Path) -> None:
    with open(path, "wb") as handle:
        np.savez(handle, something=np.zeros(3))


@pytest.mark.parametrize("damage", [_truncate, _empty, _flip_feature_bit, _garbage, _wrong_arrays])
def test_damaged_shard_is_skipped_named_removed_and_cache_heals(tmp_path, damage):
    cache = EmbeddingCache(tmp_path, "key")
    good = cache.add(["a", "b"], np.arange(8, dtype=np.float32).reshape(2, 4))
    bad = cache.add(["c"], np.full((1, 4), 7, np.float32))
    damage(bad)

    features = cache.load()  # before the fix: BadZipFile / EOFError / KeyError escaped here

    assert sorted(features) == ["a", "b"]
    np.testing.assert_array_equal(features["b"], [4, 5, 6, 7])
    assert [shard for shard, _ in cache.damaged] == [bad]
    assert cache.damaged[0][1]  # a reason is given
    assert not bad.exists() and good.exists()
    cache.add(["c"], np.full((1, 4), 7, np.float32))  # what a run does with the recomputed features
    healed = EmbeddingCache(tmp_path, "key")
    assert sorted(healed.load()) == ["a", "b", "c"] and healed.damaged == []


def test_embedding_pass_recomputes_a_damaged_shard_and_heals_the_cache(tmp_path):
    """What `train` does with the cache (features.embed_manifest), minus the backbone: the cache
    logic does not depend on which network makes the vectors, so a fixed pixel summary stands in."""
    import hashlib

    import pandas as pd

    from keeneye.training.features import embed_manifest

    rows = []
    for i in range(6):
        path = tmp_path / f"{i}.jpg"
        path.write_bytes(good_jpeg_bytes(seed=i))
        rows.append({"path": str(path), "sha1": hashlib.sha1(path.read_bytes()).hexdigest()})
    manifest = pd.DataFrame(rows)
    calls = []

    def engine(batch):
        calls.append(len(batch))
        return batch.reshape(len(batch), -1)[:, :4].astype(np.float32)

    cache = EmbeddingCache(tmp_path / "cache", "key")
    first = embed_manifest(manifest, engine, 4, 8, cache)
    assert first.n_computed == 6 and len(cache.shards()) == 1
    _truncate(cache.shards()[0])
    second = embed_manifest(manifest, engine, 4, 8, cache)
    assert len(cache.damaged) == 1 and second.n_computed == 6
    np.testing.assert_array_equal(second.features, first.features)
    third = embed_manifest(manifest, engine, 4, 8, cache)
    assert cache.damaged == [] and third.n_cached == 6 and third.n_computed == 0
    assert sum(calls) == 12  # computed twice (first run, after the damage), never a third time


def test_shard_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """A crash (full disk) during the write leaves no *.npz, and no temporary file behind."""
    cache = EmbeddingCache(tmp_path, "key")
    cache.add(["a"], np.ones((1, 4), np.float32))

    def disk_full(handle, **arrays):
        handle.write(b"PK\x03\x04 half a shard")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", disk_full)
    with pytest.raises(OSError):
        cache.add(["b"], np.ones((1, 4), np.float32))
    monkeypatch.undo()
    assert [p.name for p in cache.folder.iterdir()] == [cache.shards()[0].name]
    assert sorted(cache.load()) == ["a"] and cache.damaged == []


def test_reader_ignores_temporary_files_of_a_writer(tmp_path):
    """A writer killed before its rename leaves `.<name>.npz.tmp`: never read, removed once stale."""
    cache = EmbeddingCache(tmp_path, "key")
    cache.add(["a"], np.ones((1, 4), np.float32))
    fresh = cache.folder / ".20260101-000000-abcd.npz.tmp"
    stale = cache.folder / ".20250101-000000-dcba.npz.tmp"
    for path in (fresh, stale):
        path.write_bytes(b"PK\x03\x04 half")
    old = time.time() - 2 * EmbeddingCache.STALE_TEMPORARY_S
    os.utime(stale, (old, old))
    assert sorted(cache.load()) == ["a"] and cache.damaged == []
    assert fresh.exists() and not stale.exists()  # a live writer's file is left alone


# --- bundle metadata and model file ---------------------------------------------------------

GOOD_METADATA = {
    "bundle_format": 1, "class_names": ["good", "defect"], "positive_class": "defect", "threshold": 0.42,
    "input": {"image_size": 96, "dtype": "uint8", "channels": "RGB"}, "metrics": {"testing": {"n": 3}},
}


def _model_archive(path: Path) -> None:
    import zipfile

    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("config.json", json.dumps({"class_name": "Functional", "config": {"layers": []} , "pad": "x" * 2000}))
        archive.writestr("metadata.json", "{}")


def make_fake_bundle(folder: Path, metadata) -> Path:
    """A bundle folder whose model.keras is a well-formed archive (enough for everything before Keras)."""
    folder.mkdir(parents=True)
    _model_archive(folder / "model.keras")
    (folder / "metadata.json").write_text(metadata if isinstance(metadata, str) else json.dumps(metadata))
    return folder


def _without(key: str) -> dict:
    return {k: v for k, v in GOOD_METADATA.items() if k != key}


BAD_METADATA = {
    "empty list": ([], "must be a JSON object"),
    "missing threshold": (_without("threshold"), "threshold: Field required"),
    "missing input": (_without("input"), "input: Field required"),
    "image_size not a number": ({**GOOD_METADATA, "input": {"image_size": "big"}}, "input.image_size"),
    "threshold out of range": ({**GOOD_METADATA, "threshold": 2}, "threshold"),
    "one class": ({**GOOD_METADATA, "class_names": ["defect"]}, "class_names"),
    "positive not a class": ({**GOOD_METADATA, "positive_class": "scratch"}, "positive_class"),
    "old format": ({**GOOD_METADATA, "bundle_format": 0}, "bundle format 0 is not supported"),
    "not json": ("{not json", "unreadable metadata"),
}


@pytest.mark.parametrize("case", list(BAD_METADATA), ids=list(BAD_METADATA))
def test_bad_metadata_is_one_clear_error_on_load(tmp_path, case):
    from keeneye.bundle import load_bundle
    from keeneye.errors import BundleError

    metadata, expected = BAD_METADATA[case]
    folder = make_fake_bundle(tmp_path / "bundle", metadata)
    with pytest.raises(BundleError, match="metadata") as caught:  # before: KeyError / AttributeError / ValueError later on
        load_bundle(folder, load_model=False)
    assert expected in str(caught.value)


def test_good_metadata_loads_typed(tmp_path):
    from keeneye.bundle import load_bundle

    bundle = load_bundle(make_fake_bundle(tmp_path / "bundle", GOOD_METADATA), load_model=False)
    assert bundle.class_names == ("good", "defect") and bundle.threshold == 0.42 and bundle.image_size == 96
    assert bundle.metadata["metrics"] == {"testing": {"n": 3}}  # extra keys are kept


def _truncate_model(folder: Path) -> None:
    model = folder / "model.keras"
    model.write_bytes(model.read_bytes()[:200])


def _flip_model(folder: Path) -> None:
    model = folder / "model.keras"
    data = bytearray(model.read_bytes())
    data[data.index(b"x" * 100) + 50] ^= 0x01
    model.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate_model, _flip_model])
def test_cli_predict_and_serve_name_a_corrupt_model_cleanly(tmp_path, damage):
    """Before: predict said Keras's "File not found"; serve started uvicorn and died with a traceback."""
    from typer.testing import CliRunner

    from keeneye.cli import app

    folder = make_fake_bundle(tmp_path / "bundle", GOOD_METADATA)
    damage(folder)
    image = tmp_path / "a.jpg"
    image.write_bytes(good_jpeg_bytes())
    for args in (["predict", str(folder), str(image)], ["serve", str(folder), "--port", "1"]):
        result = CliRunner().invoke(app, args)
        output = " ".join(result.output.split())
        assert result.exit_code == 2, (args, result.output, result.exception)
        assert "model.keras is corrupt" in output and "Traceback" not in output


def test_cli_serve_refuses_bad_metadata(tmp_path):
    from typer.testing import CliRunner

    from keeneye.cli import app

    folder = make_fake_bundle(tmp_path / "bundle", {**GOOD_METADATA, "input": {"image_size": "big"}})
    result = CliRunner().invoke(app, ["serve", str(folder), "--port", "1"])
    assert result.exit_code == 2 and "input.image_size" in result.output and "Traceback" not in result.output


def test_serve_refuses_a_bundle_keras_cannot_load(tmp_path):
    """A well-formed archive that is no Keras model: refused before uvicorn starts (one worker)."""
    from keeneye.errors import BundleError
    from keeneye.serving.server import load_predictor
    from keeneye.serving.settings import ServeSettings

    folder = make_fake_bundle(tmp_path / "bundle", GOOD_METADATA)
    with pytest.raises(BundleError, match="could not load the model"):
        load_predictor(folder, ServeSettings(engine="keras"))


# --- scanner: every entry accounted for ------------------------------------------------------


def _tree(root: Path) -> Path:
    for split in ("training", "testing"):
        for label in ("good", "defect"):
            folder = root / split / label
            folder.mkdir(parents=True)
            (folder / "a.jpg").write_bytes(good_jpeg_bytes(seed=hash((split, label)) % 100))
    return root


def test_broken_links_and_special_files_are_skipped_with_a_reason(tmp_path):
    from keeneye.data.scan import scan_folder

    root = _tree(tmp_path / "data")
    good = root / "training" / "good"
    (good / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (good / "loop").symlink_to(root / "training")
    os.mkfifo(good / "pipe.jpg")
    (root / "training" / "stray.jpg").symlink_to(tmp_path / "nowhere.jpg")
    scan = scan_folder(root, positive_class="defect")
    reasons = dict(zip(scan.skipped["path"].map(lambda p: Path(p).name), scan.skipped["reason"]))
    assert reasons["gone.jpg"].startswith("broken symbolic link") and "nowhere.jpg" in reasons["gone.jpg"]
    assert reasons["loop"] == "symbolic link to a folder (not followed)"
    assert reasons["pipe.jpg"] == "not a regular file (named pipe)"
    assert reasons["stray.jpg"].startswith("broken symbolic link")
    assert len(scan.manifest) == 4  # the real images


def test_predict_inputs_report_broken_links(tmp_path):
    from keeneye.inference.predictor import expand_inputs

    folder = tmp_path / "inbox"
    folder.mkdir()
    (folder / "ok.jpg").write_bytes(good_jpeg_bytes())
    (folder / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    named = tmp_path / "named.jpg"
    named.symlink_to(tmp_path / "missing.jpg")
    paths, problems = expand_inputs([folder, named, str(folder / "*.jpg")])
    errors = {Path(p["path"]).name: p["error"] for p in problems}
    assert [Path(p).name for p in paths] == ["ok.jpg", "ok.jpg"]
    assert errors["gone.jpg"].startswith("skipped: broken symbolic link")
    assert errors["named.jpg"].startswith("skipped: broken symbolic link")
    assert sum("gone.jpg" in p["path"] for p in problems) == 2  # from the folder and from the glob


def test_empty_class_folder_is_named_before_embedding(tmp_path):
    from keeneye.data.scan import scan_folder
    from keeneye.errors import DataError

    root = _tree(tmp_path / "data")
    (root / "training" / "defect" / "a.jpg").unlink()
    (root / "training" / "defect" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"class folder .*training/defect holds no images: 1 files, none usable"):
        scan_folder(root, positive_class="defect")


def test_gif_is_one_rule_for_scan_predict_and_serve(tmp_path):
    import io

    from PIL import Image

    from keeneye.data.decode import decode_image_bytes
    from keeneye.data.scan import scan_folder, skip_reason
    from keeneye.serving.settings import ServeSettings

    buffer = io.BytesIO()
    Image.fromarray(np.full((20, 20, 3), 90, np.uint8)).save(buffer, "GIF")
    root = _tree(tmp_path / "data")
    (root / "training" / "good" / "b.gif").write_bytes(buffer.getvalue())
    assert skip_reason(Path("x/b.gif")) is None
    assert "b.gif" in {Path(p).name for p in scan_folder(root, positive_class="defect").manifest["path"]}
    assert "GIF" in ServeSettings().allowed_formats
    assert decode_image_bytes(buffer.getvalue(), 8).shape == (8, 8, 3)


# --- staging folders of killed publishes -----------------------------------------------------


def test_stale_staging_of_a_killed_publish_is_removed_live_ones_kept(tmp_path):
    import socket
    import subprocess
    import sys

    from keeneye.bundle import STAGING_OWNER, STALE_STAGING_S, StagedRun

    runs = tmp_path / "runs"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    killed = runs / ".staging-old-1234abcd"
    foreign = runs / ".staging-other-host-5678abcd"
    ancient = runs / ".staging-ancient-9999abcd"
    live = runs / ".staging-live-0000abcd"
    for folder, pid, host in ((killed, int(dead.stdout), socket.gethostname()), (foreign, 1, "elsewhere"),
                              (live, os.getpid(), socket.gethostname())):
        folder.mkdir(parents=True)
        (folder / STAGING_OWNER).write_text(json.dumps({"host": host, "pid": pid}))
    ancient.mkdir()
    old = time.time() - 2 * STALE_STAGING_S
    os.utime(ancient, (old, old))
    run = StagedRun(runs, "new")
    assert sorted(run.cleaned) == sorted([killed, ancient])
    assert foreign.exists() and live.exists() and not killed.exists()
    final = run.publish()
    assert not (final / STAGING_OWNER).exists()


# --- metrics --------------------------------------------------------------------------------


def test_specificity_is_na_without_negatives():
    from keeneye.evaluation.metrics import binary_metrics, format_metrics_table

    metrics = binary_metrics([1, 1, 1], [0.9, 0.2, 0.7], 0.5, ("good", "defect"))
    assert metrics["at_threshold"]["specificity"] is None
    line = next(line for line in format_metrics_table(metrics).splitlines() if line.startswith("specificity"))
    assert line.split()[1:] == ["n/a", "n/a"]
    both = binary_metrics([0, 1, 0], [0.9, 0.2, 0.1], 0.5, ("good", "defect"))
    assert both["at_threshold"]["specificity"] == pytest.approx(0.5)
