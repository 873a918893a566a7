"""The embedding cache read for training without a Python object per vector (issue 16, part 3)."""

from __future__ import annotations

import hashlib
import sys

import numpy as np

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
