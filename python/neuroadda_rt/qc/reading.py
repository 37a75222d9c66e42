"""Tiles from files: what the QC monitor reads a reference from and what the watcher feeds it.

Images decode through the package's one 2-D decoder (:mod:`neuroadda_rt.io.images`), so a file
gives the same array here as everywhere else; ``.npy`` files are read without unpickling.
"""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path
from typing import Iterable

import numpy as np

from ..errors import FormatError, ShapeError
from ..io import load_npy, natural_sort_key
from ..io.images import read_image_stack

__all__ = ["read_tiles", "split_tiles", "DEFAULT_PATTERNS"]

DEFAULT_PATTERNS = ("*.tif", "*.tiff", "*.png", "*.jpg", "*.jpeg", "*.npy")
# partial downloads, editor backups and lock files are never images yet
_IGNORED_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", "~", ".lock")


def read_tiles(path: str | os.PathLike, *, tile_size: int | None = None) -> np.ndarray:
    """Decode an image file (or a folder of them) into tiles.

    Parameters
    ----------
    path : path-like
        ``.npy`` (never unpickled), ``.tif`` / ``.tiff`` (every page), ``.png`` / ``.jpg``, or a
        folder of such files (natural order). Colour images become their luminance (the rule of
        :func:`neuroadda_rt.io.images.read_image_2d`).
    tile_size : int, optional
        Cut every image into non-overlapping ``tile_size`` squares (the remainder at the right
        and bottom edges is dropped); default: every 2-D image is one tile.

    Returns
    -------
    numpy.ndarray
        ``(N, H, W)`` in the file's dtype (a new array).

    Raises
    ------
    FormatError
        The file is truncated, not an image, or holds no 2-D/3-D array.

    Examples
    --------
    >>> import numpy as np, tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "t.npy"); np.save(p, np.zeros((2, 64, 64), np.uint8))
    >>> read_tiles(p, tile_size=32).shape
    (8, 32, 32)
    """
    return read_sections(path, tile_size=tile_size)[0]


def read_sections(path: str | os.PathLike, *, tile_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Tiles of a file or folder with the section each comes from: a folder's files (natural order) or a
    stack's pages are the sections, in acquisition order (what :class:`QCMonitor` calibrates its drift
    threshold on).

    Returns
    -------
    tiles : numpy.ndarray
        ``(N, H, W)``, as :func:`read_tiles`.
    sections : numpy.ndarray
        ``(N,)`` int, 0-based section number of each tile.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted((p for p in path.iterdir() if matches(p.name, DEFAULT_PATTERNS)),
                       key=lambda p: natural_sort_key(p.name))
        if not files:
            raise FormatError(f"{path}: no image files ({', '.join(DEFAULT_PATTERNS)})")
        parts = [read_sections(p, tile_size=tile_size)[0] for p in files]
        return np.concatenate(parts), np.repeat(np.arange(len(parts)), [len(p) for p in parts])
    arr = load_npy(path) if path.suffix.lower() == ".npy" else read_image_stack(path)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.dtype.kind not in "uif":
        raise FormatError(f"{path}: expected a 2-D image or a stack of them, got shape {arr.shape} {arr.dtype}")
    tiles = split_tiles(arr, tile_size) if tile_size else arr
    return tiles, np.repeat(np.arange(arr.shape[0]), len(tiles) // arr.shape[0])


def split_tiles(stack: np.ndarray, tile_size: int) -> np.ndarray:
    """(N, H, W) -> (N * (H // t) * (W // t), t, t): non-overlapping tiles, row-major per image."""
    t = int(tile_size)
    n, h, w = stack.shape
    if t < 4 or t > min(h, w):
        raise ShapeError(f"expected 4 <= tile_size <= {min(h, w)} (the image size), got {t}")
    gh, gw = h // t, w // t
    out = stack[:, :gh * t, :gw * t].reshape(n, gh, t, gw, t).transpose(0, 1, 3, 2, 4)
    return np.ascontiguousarray(out.reshape(n * gh * gw, t, t))


def load_array(path: Path) -> np.ndarray:
    """Reference from a file: ``.npy`` (tiles or features), or an image file / folder of images (tiles)."""
    return load_npy(path) if path.suffix == ".npy" else read_tiles(path)


def matches(name: str, patterns: Iterable[str]) -> bool:
    """Whether a file name is one of ``patterns`` (case-insensitive) and not hidden or partial."""
    if name.startswith(".") or name.endswith(_IGNORED_SUFFIXES):
        return False
    low = name.lower()
    return any(fnmatch.fnmatch(low, p.lower()) for p in patterns)
