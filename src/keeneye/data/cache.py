"""Where keeneye keeps what it can recompute: backbone embeddings, frames sampled from videos.

The embedding cache lives here, in the data layer, so that training (the embedding pass, head
training) and inference (distributed jobs) can both read and write it without importing each other.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

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
                       spec: InputSpec | None = None, texture: str | None = None) -> str:
    """Features are only reusable for the same network, weights, input size, feature mode, resize, tiles and views,
    and (texture: model/backbone.texture_fingerprint) the same fitted texture projection of "multi+cov".

    Squash with model.reduced_decode keeps the key it had before that option existed (it was how
    every image was decoded then), so earlier caches stay valid; the full decode, now the default,
    has its own. The stored format is unchanged (one vector per content hash).
    """
    spec = spec or InputSpec(image_size)
    key = f"{backbone}-a{alpha}-s{image_size}-w{weights_sha256[:16]}-v{FEATURE_FORMAT_VERSION}"
    if not spec.reduced_decode and spec.tiles is None and spec.resize == "squash":
        key += "-dfull"  # caches from before model.reduced_decode hold reduced-decode features under the plain key
    if features != "gap":
        key += f"-f{features.replace('+', '_')}"
    if texture:
        key += f"-p{texture}"
    if spec.tiles is not None:
        key += f"-t{spec.tiles[0]}x{spec.tiles[1]}o{spec.overlap:g}"
    elif spec.resize != "squash":
        key += f"-r{spec.resize}"
    if spec.views > 1:
        key += f"-views{spec.views}"
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
        """Every verified vector by sha1, as a dict (a Python object per vector: small caches and tests only;
        training uses `fill` or `matrix`). Damaged files are reported, removed and skipped."""
        features: dict[str, np.ndarray] = {}
        self.damaged = []
        matrix = self.matrix()
        if matrix is not None:
            features.update(zip((key.decode() for key in matrix.keys), matrix.vectors[matrix.rows]))
        for shard in self.shards():
            try:
                sha1s, vectors = read_shard(shard)
            except DamagedShard as exc:
                self._damaged_shard(shard, exc.reason)  # recomputed by this run; the next one finds the cache healthy
                continue
            features.update(zip(sha1s, vectors))
        self._remove_stale_temporaries()
        return features

    def fill(self, sha1s: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Copy the cached vector of each hash in `sha1s` into the same row of `out`; True where found.

        From the consolidated matrix (memory-mapped, looked up through its sorted index, copied in
        chunks), then shard by shard with a vectorised hash lookup: memory stays at `out` plus one
        chunk or shard, and no Python object is made per vector (unlike `load`). Damaged files are
        handled as in `load`; vectors of another width than `out` are ignored; later shards win.
        """
        found = np.zeros(len(sha1s), dtype=bool)
        wanted = np.asarray(sha1s, dtype=str)  # fixed-width unicode: no Python object per hash either
        self.damaged = []
        matrix = self.matrix()
        if matrix is not None and matrix.dim == out.shape[1]:
            found |= matrix.copy_into(wanted, out)
        for shard in self.shards():
            try:
                shard_sha1s, vectors = read_shard_arrays(shard)
            except DamagedShard as exc:
                self._damaged_shard(shard, exc.reason)
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

    def matrix(self) -> "CachedMatrix | None":
        """The consolidated vectors, memory-mapped and verified, or None (none yet, or damaged: then
        reported in `damaged` and removed, so what it held is recomputed and cached again)."""
        pointer = self.folder / CONSOLIDATED
        for _ in range(2):  # a consolidation publishing meanwhile replaces the pointer: open the new one
            try:
                text = pointer.read_text()
            except OSError:
                return None
            try:
                return CachedMatrix.open(self.folder, text)
            except DamagedShard as exc:
                reason = exc.reason
            if _read_quietly(pointer) == text:
                self.damaged.append((pointer, reason))
                _remove_consolidated(self.folder, pointer, text)
                return None
        return None

    def consolidate(self) -> bool:
        """Merge the shards into the consolidated matrix (one sorted index + one float32 .npy), then delete them.

        Readers then memory-map one file instead of unpacking many shards. The new files are written
        whole under fresh names, fsynced, and published by atomically replacing `consolidated.json`
        (which names them and holds their CRC-32s), so a crash leaves the previous state intact. One
        consolidation at a time per folder (a lock file); later shards win over earlier vectors.
        Damaged files met on the way are added to `damaged`. True when something was merged; False
        also when the folder cannot be written (the shards then stay, still read as before).
        """
        if not self.shards():
            return False
        try:
            with _folder_lock(self.folder):
                current = self.matrix()
                shards, sources = self._readable_shards(current.dim if current is not None else None)
                if not shards:
                    return False
                published = _write_consolidated(self.folder, current, sources)
                for shard in shards:
                    _remove_quietly(shard)
                _remove_unreferenced(self.folder, published)
        except OSError:  # no space or no write access: the shards stay as they are (a cache must not fail a run)
            return False
        return True

    def _damaged_shard(self, shard: Path, reason: str) -> None:
        """Report and remove a damaged shard; one that vanished was merged by a concurrent consolidation (not damage)."""
        if shard.exists():
            self.damaged.append((shard, reason))
            _remove_quietly(shard)

    def _readable_shards(self, dim: int | None) -> tuple[list[Path], list[tuple[Path, np.ndarray]]]:
        """The shards to merge (damaged ones reported and removed; other widths left alone) with their hashes.

        Only the hashes are kept: the vectors are read again, one shard at a time, while writing."""
        merged, sources = [], []
        for shard in self.shards():
            try:
                sha1s, vectors = read_shard_arrays(shard)
            except DamagedShard as exc:
                self._damaged_shard(shard, exc.reason)
                continue
            dim = vectors.shape[1] if dim is None else dim
            if vectors.shape[1] == dim:
                merged.append(shard)
                sources.append((shard, _as_bytes(sha1s)))
        return merged, sources

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
        for path in self.folder.glob(".*.tmp") if self.folder.is_dir() else ():  # shards' and consolidations' temporaries
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
            except OSError:
                pass


CONSOLIDATED = "consolidated.json"
#: Rows copied out of a memory-mapped matrix at a time: bounds the temporary copy, not the result.
COPY_CHUNK_ROWS = 16384


def memory_mapped(array: np.ndarray, folder: Path | None = None, rows: np.ndarray | None = None) -> np.ndarray:
    """`array` (or its `rows`: a boolean mask or row numbers) copied to an unlinked temporary .npy and mapped read-only.

    Its pages become file-backed: the kernel may drop and re-read them under memory pressure, where an
    in-memory matrix would have to stay resident (or be swapped). Rows are copied a chunk at a time, so
    taking a subset of a mapped matrix never holds the subset in memory. `folder`: where the file goes
    (default: beside `array` when it is itself mapped, else the system's temporary folder). On POSIX the
    file is gone from the folder at once and its space is freed with the mapping; elsewhere it stays as
    a temporary (`.*.tmp`) that the cache's stale-temporary sweep removes later.
    """
    index = np.arange(len(array)) if rows is None else np.asarray(rows)
    index = np.flatnonzero(index) if index.dtype == bool else index
    filename = getattr(array, "filename", None)
    folder = folder if folder is not None else (Path(filename).parent if filename else None)
    try:
        if folder is not None:
            Path(folder).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".features-", suffix=".npy.tmp", delete=False) as handle:
            try:
                np.lib.format.write_array_header_1_0(handle, {"descr": np.lib.format.dtype_to_descr(array.dtype),
                                                              "fortran_order": False, "shape": (len(index), *array.shape[1:])})
                for start in range(0, len(index), COPY_CHUNK_ROWS):
                    handle.write(np.ascontiguousarray(array[index[start : start + COPY_CHUNK_ROWS]]).tobytes())
                handle.flush()
                return np.load(handle.name, mmap_mode="r")
            finally:
                _remove_quietly(Path(handle.name))
    except OSError:  # no space or no write access: the same values, in memory (a scratch file must not fail a run)
        return np.asarray(array) if rows is None else np.asarray(array[index])


@dataclass(frozen=True)
class CachedMatrix:
    """The consolidated cache, memory-mapped: `keys` (sorted content hashes, bytes), `rows` (the matrix row of
    each key) and `vectors` (float32, one row per key). Nothing is read until used, and nothing is made
    per vector: a lookup is one vectorised binary search, a copy touches only the rows asked for."""

    keys: np.ndarray
    rows: np.ndarray
    vectors: np.ndarray

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def __len__(self) -> int:
        return len(self.keys)

    @classmethod
    def open(cls, folder: Path, pointer_text: str) -> "CachedMatrix":
        """Open the files the pointer names, after checking their CRC-32s (streamed: memory stays flat) and shapes."""
        try:
            meta = json.loads(pointer_text)
            files = {name: folder / meta["files"][name] for name in ("keys", "rows", "matrix")}
            for name, path in files.items():
                if _crc32_file(path) != meta["crc32"][name]:
                    raise DamagedShard(f"{path.name} does not match its CRC-32")
            keys, rows, vectors = (np.load(files[name], mmap_mode="r", allow_pickle=False) for name in ("keys", "rows", "matrix"))
        except DamagedShard:
            raise
        except Exception as exc:  # missing file, bad JSON, bad .npy header: all mean "damaged"
            raise DamagedShard(f"unreadable ({type(exc).__name__}: {exc})") from None
        if keys.ndim != 1 or keys.dtype.kind != "S" or rows.shape != keys.shape or rows.dtype != np.int64:
            raise DamagedShard(f"index of shape {keys.shape}/{rows.shape} and dtypes {keys.dtype}/{rows.dtype}")
        if vectors.dtype != np.float32 or vectors.shape != (len(keys), meta["dim"]):
            raise DamagedShard(f"matrix of shape {vectors.shape} and dtype {vectors.dtype} for {len(keys)} hashes")
        return cls(keys, rows, vectors)

    def lookup(self, sha1s: np.ndarray) -> np.ndarray:
        """The matrix row of each hash (int64), -1 where it is not cached."""
        wanted = np.asarray(sha1s, dtype=str)
        if not len(self.keys):
            return np.full(len(wanted), -1, dtype=np.int64)
        valid = (wanted != "") & (np.char.str_len(wanted) <= self.keys.dtype.itemsize)
        encoded = _as_bytes(wanted, self.keys.dtype)
        at = np.searchsorted(self.keys, encoded)
        np.minimum(at, len(self.keys) - 1, out=at)
        valid &= self.keys[at] == encoded
        del encoded
        rows = np.asarray(self.rows[at], dtype=np.int64)
        rows[~valid] = -1
        return rows

    def copy_into(self, sha1s: np.ndarray, out: np.ndarray) -> np.ndarray:
        """`out[i] = vector of sha1s[i]` where cached, in chunks; True where found."""
        rows = self.lookup(sha1s)
        targets = np.flatnonzero(rows >= 0)
        for start in range(0, len(targets), COPY_CHUNK_ROWS):
            chunk = targets[start : start + COPY_CHUNK_ROWS]
            out[chunk] = self.vectors[rows[chunk]]
        return rows >= 0


def _as_bytes(keys: np.ndarray, dtype: np.dtype | None = None) -> np.ndarray:
    """Unicode hashes as a fixed-width bytes array (no Python object per hash; hex hashes are ASCII)."""
    dtype = dtype or np.dtype(f"S{max(1, keys.dtype.itemsize // 4)}")
    try:
        return keys.astype(dtype)
    except UnicodeEncodeError:  # not a hex digest: slower, but exact
        return np.char.encode(keys, "utf-8").astype(dtype)


def _write_consolidated(folder: Path, current: CachedMatrix | None, sources: list[tuple[Path, np.ndarray]]) -> dict:
    """Write keys/rows/matrix of `current` + `sources` (later wins) under fresh names; publish; the pointer's content."""
    key_parts = [] if current is None else [_keys_by_row(current)]
    key_parts += [keys for _, keys in sources]
    all_keys = np.concatenate(key_parts)
    unique, first_from_end = np.unique(all_keys[::-1], return_index=True)  # sorted; the last copy of each key
    last = len(all_keys) - 1 - first_from_end
    kept = np.sort(last)  # positions written, in source order
    new_row = np.full(len(all_keys), -1, dtype=np.int64)
    new_row[kept] = np.arange(len(kept))
    dim = current.dim if current is not None else read_shard_arrays(sources[0][0])[1].shape[1]
    generation = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
    names = {"keys": f"keys-{generation}.npy", "rows": f"rows-{generation}.npy", "matrix": f"matrix-{generation}.npy"}
    _write_durably(folder / names["keys"], lambda handle: np.save(handle, unique))
    _write_durably(folder / names["rows"], lambda handle: np.save(handle, new_row[last]))
    _write_durably(folder / names["matrix"], lambda handle: _write_matrix(handle, current, sources, kept, dim))
    meta = {"format": 1, "dim": int(dim), "files": names, "crc32": {name: _crc32_file(folder / file) for name, file in names.items()}}
    _write_durably(folder / CONSOLIDATED, lambda handle: handle.write(json.dumps(meta, indent=1).encode()))
    _fsync_folder(folder)
    return meta


def _keys_by_row(matrix: CachedMatrix) -> np.ndarray:
    keys = np.empty(len(matrix), dtype=matrix.keys.dtype)
    keys[matrix.rows] = matrix.keys
    return keys


def _write_matrix(handle, current: CachedMatrix | None, sources: list[tuple[Path, np.ndarray]], kept: np.ndarray, dim: int) -> None:
    """The .npy header, then the kept rows of each source in order, one block or shard in memory at a time."""
    np.lib.format.write_array_header_1_0(handle, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
                                                  "fortran_order": False, "shape": (len(kept), int(dim))})
    offset = 0
    for block in _source_blocks(current, sources):
        local = kept[np.searchsorted(kept, offset) : np.searchsorted(kept, offset + len(block))] - offset
        handle.write(np.ascontiguousarray(block[local], dtype=np.float32).tobytes())
        offset += len(block)


def _source_blocks(current: CachedMatrix | None, sources: list[tuple[Path, np.ndarray]]) -> Iterator[np.ndarray]:
    """The vectors of every source in order: the current matrix in blocks read from its file (plain reads, so
    its pages are not mapped into this process), then each shard whole."""
    if current is not None:
        n, dim = current.vectors.shape
        with open(current.vectors.filename, "rb") as handle:
            for start in range(0, n, COPY_CHUNK_ROWS):
                count = min(COPY_CHUNK_ROWS, n - start)
                handle.seek(current.vectors.offset + start * dim * 4)
                yield np.fromfile(handle, dtype=np.float32, count=count * dim).reshape(count, dim)
    for shard, _ in sources:
        yield read_shard_arrays(shard)[1]


def _write_durably(path: Path, write) -> None:
    """`write(handle)` into a hidden temporary file, fsync, rename into place."""
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(temporary, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        _remove_quietly(temporary)
        raise


def _crc32_file(path: Path, chunk: int = 1 << 22) -> int:
    """CRC-32 of a file read in chunks into one buffer (the page cache holds the file, not this process)."""
    buffer = bytearray(chunk)
    view = memoryview(buffer)
    crc = 0
    with open(path, "rb", buffering=0) as handle:
        while True:
            n = handle.readinto(buffer)
            if not n:
                return crc
            crc = zlib.crc32(view[:n], crc)


def _remove_consolidated(folder: Path, pointer: Path, text: str) -> None:
    """Drop a damaged consolidation: its pointer and the files it names (all recomputable)."""
    _remove_quietly(pointer)
    try:
        names = json.loads(text)["files"].values()
    except Exception:  # an unreadable pointer: its files are removed by the next consolidation
        return
    for name in names:
        if isinstance(name, str) and "/" not in name and "\\" not in name:
            _remove_quietly(folder / name)


def _read_quietly(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _remove_unreferenced(folder: Path, meta: dict) -> None:
    """Earlier generations (and ones a crashed consolidation left) once `meta` is published."""
    keep = set(meta["files"].values())
    for pattern in ("keys-*.npy", "rows-*.npy", "matrix-*.npy"):
        for path in folder.glob(pattern):
            if path.name not in keep:
                _remove_quietly(path)


@contextlib.contextmanager
def _folder_lock(folder: Path):
    """An exclusive lock on the cache folder (POSIX flock; elsewhere no lock, and a race only costs recomputation)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".consolidate.lock", "a") as handle:
        try:
            import fcntl
        except ImportError:
            yield
            return
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


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
