"""The embedding cache read for training without a Python object per vector (issue 16, part 3)."""

from __future__ import annotations

import gc
import hashlib
import os
import sys
import tracemalloc

import numpy as np
import pytest

from keeneye.data.cache import EmbeddingCache


def _hashes(start: int, stop: int) -> list[str]:
    return [hashlib.sha1(str(i).encode()).hexdigest() for i in range(start, stop)]


def test_fill_matches_load_with_duplicates_gaps_and_other_widths(tmp_path):
    cache = EmbeddingCache(tmp_path, "key")
    rng = np.random.default_rng(0)
    first, second = _hashes(0, 50), _hashes(40, 80)
    cache.add(first, rng.normal(size=(50, 6)).astype(np.float32))
    cache.add(second + [second[0]], rng.normal(size=(41, 6)).astype(np.float32))  # overlap + a duplicate inside
    cache.add(_hashes(0, 10), rng.normal(size=(10, 3)).astype(np.float32))  # another width: ignored by fill
    wanted = np.array(_hashes(30, 90) + [""], dtype=object)  # 80..89 are not cached, "" has no hash
    out = np.full((len(wanted), 6), np.nan, dtype=np.float32)
    found = cache.fill(wanted, out)
    loaded = cache.load()
    for row, sha1 in enumerate(wanted):
        vector = loaded.get(sha1)
        if vector is not None and vector.shape == (6,):
            assert found[row]
            np.testing.assert_array_equal(out[row], vector)  # later shards and later rows win, as in load
        else:
            assert not found[row] and np.isnan(out[row]).all()
    assert found.sum() == 50


def test_200000_cached_vectors_fill_a_matrix_without_a_python_object_each(tmp_path):
    n, dim = 200_000, 4
    cache = EmbeddingCache(tmp_path, "key")
    hashes = _hashes(0, n)
    vectors = np.arange(n * dim, dtype=np.float32).reshape(n, dim)
    cache.add(hashes, vectors)
    wanted = np.array(hashes[::-1], dtype=str)
    out = np.empty((n, dim), dtype=np.float32)
    blocks = sys.getallocatedblocks()
    found = cache.fill(wanted, out)
    grown_by_fill = sys.getallocatedblocks() - blocks
    assert found.all()
    np.testing.assert_array_equal(out, vectors[::-1])
    del found
    blocks = sys.getallocatedblocks()
    loaded = cache.load()
    grown_by_load = sys.getallocatedblocks() - blocks
    assert len(loaded) == n
    assert grown_by_load > n  # the dict reader: Python objects per vector (the measure can see them)
    assert grown_by_fill < 1000  # the matrix reader: a constant number


def _expected(cache: EmbeddingCache) -> dict[str, np.ndarray]:
    return {sha1: vector for sha1, vector in cache.load().items()}


def test_consolidation_keeps_every_vector_later_wins_and_deletes_the_shards(tmp_path):
    cache = EmbeddingCache(tmp_path, "key")
    rng = np.random.default_rng(1)
    cache.add(_hashes(0, 50), rng.normal(size=(50, 6)).astype(np.float32))
    cache.add(_hashes(40, 80) + [_hashes(40, 41)[0]], rng.normal(size=(41, 6)).astype(np.float32))
    expected = _expected(cache)
    assert cache.consolidate() and cache.shards() == []
    matrix = cache.matrix()
    assert len(matrix) == len(expected) == 80 and isinstance(matrix.vectors, np.memmap)
    cache.add(_hashes(70, 90), rng.normal(size=(20, 6)).astype(np.float32))  # newer than the matrix: wins
    expected.update(_expected(EmbeddingCache(tmp_path, "key")))
    for step in ("matrix + shard", "consolidated twice"):
        wanted = np.array(_hashes(0, 95) + [""], dtype=object)
        out = np.full((len(wanted), 6), np.nan, dtype=np.float32)
        found = EmbeddingCache(tmp_path, "key").fill(wanted, out)
        assert found.sum() == 90, step
        for row, sha1 in enumerate(wanted[:90]):
            np.testing.assert_array_equal(out[row], expected[sha1], err_msg=step)
        assert np.isnan(out[~found]).all()
        assert cache.consolidate() or step == "consolidated twice"
    assert sorted(p.name.split("-")[0] for p in cache.folder.glob("*.npy")) == ["keys", "matrix", "rows"]  # old generation gone


def test_a_damaged_matrix_is_reported_removed_and_recomputed(tmp_path):
    cache = EmbeddingCache(tmp_path, "key")
    cache.add(_hashes(0, 20), np.ones((20, 4), np.float32))
    cache.consolidate()
    matrix_file = next(cache.folder.glob("matrix-*.npy"))
    data = bytearray(matrix_file.read_bytes())
    data[-3] ^= 0x10  # one flipped bit in the vectors
    matrix_file.write_bytes(bytes(data))
    out = np.zeros((20, 4), np.float32)
    found = cache.fill(np.array(_hashes(0, 20)), out)
    assert not found.any()
    assert len(cache.damaged) == 1 and "CRC-32" in cache.damaged[0][1]
    assert not list(cache.folder.glob("*.npy")) and not (cache.folder / "consolidated.json").exists()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads RSS from /proc (Linux)")
def test_200000_vectors_load_for_head_training_memory_mapped_without_an_object_each(tmp_path):
    """The consolidated cache opened and indexed for head training: no Python object per vector, RSS far below the matrix."""
    n, dim = 200_000, 128  # a 102 MB matrix
    cache = EmbeddingCache(tmp_path, "key")
    hashes = np.array(_hashes(0, n))
    for part in range(4):  # four runs' shards
        rows = slice(part * n // 4, (part + 1) * n // 4)
        cache.add(list(hashes[rows]), np.broadcast_to(np.arange(rows.start, rows.stop, dtype=np.float32)[:, None], (n // 4, dim)))
    cache.consolidate()
    wanted = hashes[::-1].copy()  # a manifest's hashes, in its own order
    warm = EmbeddingCache(tmp_path / "warm", "key")  # first use imports and caches a little (numpy's .npy reader)
    warm.add(_hashes(0, 3), np.ones((3, dim), np.float32))
    warm.consolidate()
    warm.matrix().lookup(wanted[:3])
    gc.collect()
    rss, blocks = _rss_bytes(), sys.getallocatedblocks()
    matrix = EmbeddingCache(tmp_path, "key").matrix()  # verified (CRC-32s streamed), mapped
    rows = matrix.lookup(wanted)  # index -> row: what head training gathers its batches by
    grown, objects = _rss_bytes() - rss, sys.getallocatedblocks() - blocks
    tracemalloc.start()
    EmbeddingCache(tmp_path, "key").matrix().lookup(wanted)  # the same again, its allocations traced
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    matrix_bytes = n * dim * 4
    assert isinstance(matrix.vectors, np.memmap) and (rows >= 0).all()
    assert objects < 1000  # Python objects: a constant number, not one (or more) per vector
    assert peak < matrix_bytes / 5  # temporary arrays of hashes and row numbers, far below the vectors
    assert grown < matrix_bytes / 5, f"RSS grew by {grown / 2**20:.0f} MB for a {matrix_bytes / 2**20:.0f} MB matrix"
    np.testing.assert_array_equal(matrix.vectors[rows[:32]][:, 0], np.arange(n - 1, n - 33, -1))  # hash i holds value i


def test_memory_mapped_rows_are_the_rows_mapped_from_an_unlinked_file(tmp_path):
    from keeneye.data.cache import memory_mapped

    features = np.random.default_rng(2).normal(size=(50_000, 5)).astype(np.float32)
    mapped = memory_mapped(features, tmp_path)
    mask = np.arange(len(features)) % 3 != 0
    subset = memory_mapped(mapped, rows=mask)  # as head training gets its training rows: chunk by chunk, mapped
    assert isinstance(mapped, np.memmap) and isinstance(subset, np.memmap)
    np.testing.assert_array_equal(mapped, features)
    np.testing.assert_array_equal(subset, features[mask])
    np.testing.assert_array_equal(memory_mapped(mapped, rows=np.array([7, 3])), features[[7, 3]])
    assert list(tmp_path.iterdir()) == []  # unlinked at once: nothing left behind
    assert np.shares_memory(np.asarray(subset, np.float32), subset)  # what feature_dataset reads is the mapping itself


def test_without_a_writable_folder_memory_mapped_keeps_the_values_in_memory(tmp_path):
    from keeneye.data.cache import memory_mapped

    features = np.arange(12, dtype=np.float32).reshape(4, 3)
    (tmp_path / "a-file").write_text("not a folder")
    kept = memory_mapped(features, tmp_path / "a-file", rows=np.array([True, False, True, True]))
    assert not isinstance(kept, np.memmap)
    np.testing.assert_array_equal(kept, features[[0, 2, 3]])
