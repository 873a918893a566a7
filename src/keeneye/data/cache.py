"""Where keeneye keeps what it can recompute: backbone embeddings, frames sampled from videos.

The embedding cache lives here, in the data layer, so that training (the embedding pass, head
training) and inference (distributed jobs) can both read and write it without importing each other.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import numpy as np

from keeneye.data.preprocess import InputSpec


def default_cache_dir() -> Path:
    """`$KEENEYE_CACHE_DIR`, else `$XDG_CACHE_HOME/keeneye`, else `~/.cache/keeneye`."""
    if os.environ.get("KEENEYE_CACHE_DIR"):
        return Path(os.environ["KEENEYE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "keeneye"


FEATURE_FORMAT_VERSION = 2  # 2: resize rule of decode.resize_square


def backbone_cache_key(backbone: str, alpha: float, image_size: int, weights_sha256: str, features: str = "gap",
                       spec: InputSpec | None = None) -> str:
    """Features are only reusable for the same network, weights, input size, feature mode, resize and tiles.

    The default (gap, squash, no tiles) keeps the key it had before those options existed, so
    earlier caches stay valid; the stored format is unchanged (one vector per content hash).
    """
    key = f"{backbone}-a{alpha}-s{image_size}-w{weights_sha256[:16]}-v{FEATURE_FORMAT_VERSION}"
    if features != "gap":
        key += f"-f{features.replace('+', '_')}"
    if spec is not None and spec.tiles is not None:
        key += f"-t{spec.tiles[0]}x{spec.tiles[1]}o{spec.overlap:g}"
    elif spec is not None and spec.resize != "squash":
        key += f"-r{spec.resize}"
    return key


class EmbeddingCache:
    """Features keyed by image content hash, stored as append-only `.npz` shards in one folder.

    A cache must never be the reason a run fails. Each shard is written whole under a hidden
    temporary name the reader ignores (`.<name>.npz.tmp`), flushed to disk, then renamed into
    place, so a crash or a full disk never leaves a half-written `*.npz`. On read, every shard is
    verified (zip CRCs, array names, shapes, dtypes); a damaged one is skipped, named in
    `self.damaged` and deleted, so its features are recomputed and written to a fresh shard by
    this run, and the next run finds the cache healthy.
    """

    SUFFIX = ".npz"
    TEMPORARY_SUFFIX = ".npz.tmp"
    #: Temporary files older than this were left by a crashed writer (a live one finishes in seconds).
    STALE_TEMPORARY_S = 3600.0

    def __init__(self, root: Path, key: str) -> None:
        self.folder = Path(root) / "embeddings" / key
        self.damaged: list[tuple[Path, str]] = []  # (shard, reason), filled by load()

    def shards(self) -> list[Path]:
        """The complete shards, oldest first (hidden names are temporary files, never read)."""
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.glob(f"*{self.SUFFIX}") if not p.name.startswith(".") and p.is_file())

    def load(self) -> dict[str, np.ndarray]:
        """Every verified shard's features by sha1; damaged shards are reported, removed and skipped."""
        features: dict[str, np.ndarray] = {}
        self.damaged = []
        for shard in self.shards():
            try:
                sha1s, vectors = read_shard(shard)
            except DamagedShard as exc:
                self.damaged.append((shard, exc.reason))
                _remove_quietly(shard)  # recomputed by this run; the next one finds the cache healthy
                continue
            features.update(zip(sha1s, vectors))
        self._remove_stale_temporaries()
        return features

    def fill(self, sha1s: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Copy the cached vector of each hash in `sha1s` into the same row of `out`; True where found.

        Shard by shard, with a vectorised hash lookup: memory stays at `out` plus one shard, and
        no Python object is made per vector (unlike `load`). Damaged shards are handled as in `load`;
        shards of another width than `out` are ignored. Later shards win, as in `load`.
        """
        found = np.zeros(len(sha1s), dtype=bool)
        wanted = np.asarray(sha1s, dtype=str)  # fixed-width unicode: no Python object per hash either
        self.damaged = []
        for shard in self.shards():
            try:
                shard_sha1s, vectors = read_shard_arrays(shard)
            except DamagedShard as exc:
                self.damaged.append((shard, exc.reason))
                _remove_quietly(shard)
                continue
            if vectors.shape[1] != out.shape[1] or not len(shard_sha1s):
                continue
            order = np.argsort(shard_sha1s, kind="stable")
            ordered = shard_sha1s[order]
            at = np.clip(np.searchsorted(ordered, wanted, side="right") - 1, 0, None)  # last of equal hashes
            hit = (ordered[at] == wanted) & (wanted != "")
            out[hit] = vectors[order[at[hit]]]
            found |= hit
        self._remove_stale_temporaries()
        return found

    def add(self, sha1s: list[str], vectors: np.ndarray) -> Path | None:
        """Write one new shard atomically: temporary file, fsync, rename, fsync of the folder."""
        if not sha1s:
            return None
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) != len(sha1s):
            raise ValueError(f"{len(sha1s)} hashes but features of shape {vectors.shape}")
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
        temporary = self.folder / f".{name}{self.TEMPORARY_SUFFIX}"
        final = self.folder / f"{name}{self.SUFFIX}"
        try:
            with open(temporary, "wb") as handle:  # a file object: np.savez adds no suffix of its own
                np.savez(handle, sha1=np.asarray(sha1s, dtype=str), features=vectors)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, final)
        except BaseException:
            _remove_quietly(temporary)
            raise
        _fsync_folder(self.folder)
        return final

    def _remove_stale_temporaries(self) -> None:
        cutoff = time.time() - self.STALE_TEMPORARY_S
        for path in self.folder.glob(f".*{self.TEMPORARY_SUFFIX}") if self.folder.is_dir() else ():
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
            except OSError:
                pass


class DamagedShard(Exception):
    """A cache shard that cannot be trusted; `reason` says why (for the user, with the shard's name)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def read_shard(path: Path) -> tuple[list[str], np.ndarray]:
    """(sha1s, features) of one shard, or DamagedShard (see `read_shard_arrays`)."""
    sha1s, vectors = read_shard_arrays(path)
    return [str(sha1) for sha1 in sha1s], vectors


def read_shard_arrays(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(sha1s as a unicode array, features) of one shard, or DamagedShard: whatever the bytes on disk are.

    np.load reads the zip members through zipfile, which checks each member's CRC-32, so a
    flipped bit anywhere in the data is caught, as well as truncation and a wrong layout.
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = {"sha1", "features"} - set(data.files)
            if missing:
                raise DamagedShard(f"missing arrays: {', '.join(sorted(missing))}")
            sha1s = data["sha1"]
            vectors = data["features"]
    except DamagedShard:
        raise
    except Exception as exc:  # BadZipFile, EOFError, OSError, ValueError, zlib.error, ...: all mean "damaged"
        raise DamagedShard(f"unreadable ({type(exc).__name__}: {exc})") from None
    if sha1s.ndim != 1 or sha1s.dtype.kind != "U":
        raise DamagedShard(f"'sha1' is not a list of strings (dtype {sha1s.dtype}, shape {sha1s.shape})")
    if vectors.ndim != 2 or vectors.dtype != np.float32 or len(vectors) != len(sha1s):
        raise DamagedShard(f"'features' has shape {vectors.shape} and dtype {vectors.dtype} for {len(sha1s)} hashes")
    if not np.isfinite(vectors).all():
        raise DamagedShard("'features' holds NaN or infinite values")
    return sha1s, vectors


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (POSIX); not possible on every platform, where it is skipped."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
