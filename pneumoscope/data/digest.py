"""File digests: one function (SHA-256 unless asked otherwise), and a cached variant for duplicate detection."""
from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

CHUNK_SIZE = 1 << 20


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes, read in chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_SIZE):
            h.update(chunk)
    return h.hexdigest()


@lru_cache(maxsize=65536)
def _cached(path: Path, mtime_ns: int, size: int) -> str:
    return file_digest(path)


def cached_digest(path: str | Path) -> str:
    """SHA-256 of a file, cached per path, size and modification time (duplicate checks, the decode cache)."""
    st = Path(path).stat()
    return _cached(Path(path), st.st_mtime_ns, st.st_size)
