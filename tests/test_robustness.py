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

from keeneye.training.features import EmbeddingCache

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
