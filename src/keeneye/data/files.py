"""File helpers every layer uses: content hashing of model files, atomic writes."""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MB chunks (model files and videos are large): the one file hash of keeneye.

    sha256 for model files; sha1 where it keys existing caches (image contents, videos), so old caches stay valid.
    """
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_of_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file (model files, weights)."""
    return file_digest(path, "sha256")


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary name in the same folder, then rename: readers never see half a file."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        temporary.write_bytes(data)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
