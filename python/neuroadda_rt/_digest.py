"""The one place that computes SHA-256 digests (files, folders, arrays, JSON-able objects).

Every cache key, package checksum and resume fingerprint in the package goes through these
functions, so that two parts of the code can never disagree on how a thing is hashed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np

__all__ = ["file_sha256", "folder_sha256", "bytes_sha256", "json_sha256", "arrays_sha256"]

_CHUNK = 1 << 20


def _update_file(h, path: Path) -> None:
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            h.update(chunk)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    _update_file(h, Path(path))
    return h.hexdigest()


def folder_sha256(path: str | os.PathLike, *, suffixes: Iterable[str] | None = None,
                  exclude: Iterable[str] = ()) -> str:
    """Hex SHA-256 over the relative names and bytes of the files below ``path`` (sorted).

    ``suffixes`` keeps only files with those endings; ``exclude`` drops files by name. A file
    path is hashed as a one-file folder (its name and bytes).
    """
    root = Path(path)
    keep = None if suffixes is None else tuple(suffixes)
    skip = set(exclude)
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    h = hashlib.sha256()
    for f in files:
        if (keep is not None and f.suffix not in keep) or f.name in skip:
            continue
        h.update(str(f.relative_to(root) if root.is_dir() else f.name).encode())
        _update_file(h, f)
    return h.hexdigest()


def bytes_sha256(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def json_sha256(obj: Any) -> str:
    """Hex SHA-256 of ``obj`` as canonical JSON (sorted keys; non-JSON values through ``str``)."""
    return bytes_sha256(json.dumps(obj, sort_keys=True, default=str).encode())


def arrays_sha256(*arrays: np.ndarray, header: Any = None) -> str:
    """Hex SHA-256 of arrays' shapes, dtypes and C-order bytes, after an optional JSON-able header."""
    h = hashlib.sha256()
    if header is not None:
        h.update(json.dumps(header, sort_keys=True, default=str).encode())
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(repr((a.shape, a.dtype.str)).encode())
        h.update(a.tobytes())
    return h.hexdigest()
