"""Where keeneye keeps what it can recompute: backbone embeddings, frames sampled from videos."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """`$KEENEYE_CACHE_DIR`, else `$XDG_CACHE_HOME/keeneye`, else `~/.cache/keeneye`."""
    if os.environ.get("KEENEYE_CACHE_DIR"):
        return Path(os.environ["KEENEYE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "keeneye"
