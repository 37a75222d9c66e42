"""Tiles: deterministic random sampling for feature extraction and training, and grid tiling
with overlap (plus blending back) for inference.

Coordinates are the start corner of each tile in the volume's C order (``z, y, x`` or
``y, x``); a 2-D tile taken from a 3-D volume has a 3-D coordinate whose z is its slice.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .errors import InputValueError, ShapeError
from .io import Volume, open_volume

__all__ = ["Tiles", "sample_tiles", "grid_tiles", "extract_tiles", "stitch_tiles", "window_starts", "blend_weights",
           "BLEND_WINDOWS", "resize_tiles"]

#: Window shapes for blending overlapping tiles (:func:`blend_weights`).
BLEND_WINDOWS = ("cosine", "gaussian", "constant")


class Tiles(NamedTuple):
    """Tiles and where they came from.

    Attributes
    ----------
    tiles : numpy.ndarray
        ``(n, *size)`` in the volume's dtype.
    coords : numpy.ndarray
        ``(n, volume.ndim)`` int64 start corners.
    """

    tiles: np.ndarray
    coords: np.ndarray


def _tile_size(size, vol_ndim: int) -> tuple[int, ...]:
    t = (int(size),) * 2 if np.isscalar(size) else tuple(int(s) for s in size)
    if len(t) not in (2, 3) or len(t) > vol_ndim:
        raise ShapeError(f"expected a 2-D tile size (or 3-D for a 3-D volume), got {t} for a {vol_ndim}-D volume")
    if min(t) < 1:
        raise InputValueError(f"expected positive tile sizes, got {t}")
    return t


def _full_size(t: tuple[int, ...], ndim: int) -> tuple[int, ...]:
    """Tile extent per volume axis (1 on the axes a 2-D tile does not span)."""
    return (1,) * (ndim - len(t)) + t


def sample_tiles(volume, n: int, size, *, seed, mask=None) -> Tiles:
    """Draw ``n`` random tiles (2-D) or patches (3-D), reproducibly.

    Parameters
    ----------
    volume : Volume, array-like or path
        2-D image or 3-D volume (opened with :func:`~neuroadda_rt.open_volume` if a path).
        Only the tiles are read.
    n : int
        Number of tiles.
    size : int or tuple
        ``s`` or ``(h, w)`` for 2-D tiles (from random z slices of a 3-D volume), or
        ``(d, h, w)`` for 3-D patches.
    seed : int or numpy.random.Generator
        Same seed, same tiles (positions are drawn with NumPy's PCG64).
    mask : array-like of bool, optional
        Same shape as the volume (or ``(h, w)`` for a 3-D volume, applied to every slice).
        A tile is eligible when the voxel at its centre is in the mask.

    Returns
    -------
    Tiles
        ``tiles`` (n, *size) copies, ``coords`` (n, ndim) start corners. Positions are drawn
        with replacement.

    Raises
    ------
    ShapeError
        Tile larger than the volume; mask shape differs from the volume.
    InputValueError
        The mask leaves no eligible position (an empty mask); the message names the volume.

    Examples
    --------
    >>> import numpy as np
    >>> t = sample_tiles(np.zeros((4, 64, 64), np.uint8), 3, 32, seed=0)
    >>> t.tiles.shape, t.coords.shape
    ((3, 32, 32), (3, 3))
    """
    vol = volume if isinstance(volume, Volume) else open_volume(volume)
    name = vol.path or "<array>"
    t = _tile_size(size, vol.ndim)
    full = _full_size(t, vol.ndim)
    n = int(n)
    if n < 0:
        raise InputValueError(f"expected n >= 0 tiles, got {n}")
    if any(f > s for f, s in zip(full, vol.shape)):
        raise ShapeError(f"{name}: tile size {t} does not fit in the volume of shape {vol.shape}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    span = [s - f + 1 for s, f in zip(vol.shape, full)]
    if mask is None:
        coords = np.stack([rng.integers(0, s, size=n) for s in span], axis=1) if n else np.zeros((0, vol.ndim), np.int64)
    else:
        m = np.asarray(mask).astype(bool, copy=False)
        if m.shape != vol.shape:
            if vol.ndim == 3 and m.shape == vol.shape[1:]:
                m = np.broadcast_to(m, vol.shape)
            else:
                raise ShapeError(f"{name}: mask has shape {m.shape}, expected the volume shape {vol.shape}")
        # centre of a tile starting at c is c + f//2: the eligible starts are the mask shifted back.
        centre = tuple(slice(f // 2, f // 2 + s) for f, s in zip(full, span))
        eligible = np.flatnonzero(m[centre])
        if eligible.size == 0:
            raise InputValueError(f"{name}: the mask leaves no position for a {t} tile (empty mask?)")
        pick = eligible[rng.integers(0, eligible.size, size=n)]
        coords = np.stack(np.unravel_index(pick, span), axis=1) if n else np.zeros((0, vol.ndim), np.int64)
    coords = coords.astype(np.int64)
    return Tiles(extract_tiles(vol, coords, t), coords)


def extract_tiles(volume, coords, size) -> np.ndarray:
    """Read the tiles of ``size`` starting at ``coords`` (n, ndim) into a new ``(n, *size)`` array."""
    vol = volume if isinstance(volume, Volume) else open_volume(volume)
    t = _tile_size(size, vol.ndim)
    full = _full_size(t, vol.ndim)
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, vol.ndim)
    out = np.empty((len(coords), *t), dtype=vol.dtype)
    for i, c in enumerate(coords):
        if any(ci < 0 or ci + f > s for ci, f, s in zip(c, full, vol.shape)):
            raise ShapeError(f"{vol.path or '<array>'}: tile at {tuple(c)} of size {t} leaves the volume {vol.shape}")
        out[i] = vol[tuple(slice(ci, ci + f) for ci, f in zip(c, full))].reshape(t)
    return out


def resize_tiles(tiles, size: int, *, anti_alias: bool = True) -> np.ndarray:
    """Square 2-D tiles resampled to ``size`` x ``size`` pixels (e.g. to another pixel size).

    Bilinear interpolation with pixel centres aligned (output pixel ``i`` samples input position
    ``(i + 0.5) * c / size - 0.5`` for an input edge ``c``), edges extended by the nearest pixel. When
    shrinking and ``anti_alias``, each tile is first blurred with a Gaussian of sigma
    ``(c / size - 1) / 2`` input pixels (scikit-image's ``resize`` rule), so that detail finer than the
    new pixel does not alias into the features; enlarging needs no pre-filter.

    Parameters
    ----------
    tiles : array-like, (n, c, c) or (c, c)
        Square tiles of any real dtype.
    size : int
        The output edge in pixels (>= 1).
    anti_alias : bool
        Gaussian pre-filter when ``size < c``.

    Returns
    -------
    numpy.ndarray
        New float32 array of shape ``(n, size, size)`` (``(size, size)`` for one tile); the input is
        returned as float32 when ``size == c``.

    Examples
    --------
    >>> resize_tiles(np.ones((2, 8, 8), np.uint8), 4).shape
    (2, 4, 4)
    """
    from scipy import ndimage

    arr = np.asarray(tiles)
    single = arr.ndim == 2
    if single:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[1] != arr.shape[2] or arr.shape[1] < 1:
        raise ShapeError(f"expected square 2-D tiles (n, c, c) or one (c, c) tile, got shape {np.shape(tiles)}")
    size, c = int(size), int(arr.shape[1])
    if size < 1:
        raise InputValueError(f"expected a tile size >= 1, got {size}")
    out = np.empty((len(arr), size, size), dtype=np.float32)
    src = (np.arange(size, dtype=np.float64) + 0.5) * (c / size) - 0.5
    grid = np.stack(np.meshgrid(src, src, indexing="ij"))
    sigma = (c / size - 1.0) / 2.0 if anti_alias else 0.0
    for i, t in enumerate(arr):
        t = np.asarray(t, dtype=np.float32)
        if size == c:
            out[i] = t
            continue
        if sigma > 0:
            t = ndimage.gaussian_filter(t, sigma, mode="nearest")
        out[i] = ndimage.map_coordinates(t, grid, order=1, mode="nearest")
    return out[0] if single else out


def window_starts(length: int, tile: int, step: int) -> list[int]:
    """Start offsets covering ``[0, length)`` with windows of ``tile`` every ``step`` (the last one
    flush with the end, so the windows cover everything; ``[0]`` when the window is not shorter).

    Examples
    --------
    >>> window_starts(100, 64, 48)
    [0, 36]
    """
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile + 1, step))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


def blend_weights(shape: tuple[int, ...], kind: str = "cosine") -> np.ndarray:
    """Separable window weights for blending overlapping tiles (the one definition, used by
    :func:`stitch_tiles` and :class:`~neuroadda_rt.Predictor`).

    ``"cosine"``: Hann, offset by half a pixel; ``"gaussian"``: sigma = size / 8, as nnU-Net;
    ``"constant"``: uniform. Each axis profile is scaled to a peak of 1 and floored at 1e-3, so
    the interior keeps the exact window shape and no pixel gets zero weight (every pixel covered
    by a tile keeps a defined weighted average).

    Examples
    --------
    >>> w = blend_weights((4,))
    >>> bool(w[0] > 0 and w[1] > w[0])
    True
    """
    w = np.ones(shape, dtype=np.float64)
    for ax, n in enumerate(shape):
        t = np.arange(n, dtype=np.float64)
        if kind == "cosine":
            v = 0.5 - 0.5 * np.cos(2 * np.pi * (t + 0.5) / n)
        elif kind == "gaussian":
            v = np.exp(-0.5 * ((t - (n - 1) / 2) / max(n / 8, 1e-6)) ** 2)
        elif kind == "constant":
            v = np.ones(n)
        else:
            raise InputValueError(f"expected a blend window in {BLEND_WINDOWS}, got {kind!r}")
        v = np.maximum(v / v.max(), 1e-3)
        w *= v.reshape([-1 if i == ax else 1 for i in range(len(shape))])
    return w.astype(np.float32)


def grid_tiles(shape, size, *, overlap=0) -> np.ndarray:
    """Start corners of a grid of tiles covering ``shape`` with at least ``overlap`` voxels
    shared between neighbours (the last tile on each axis is flush with the end).

    Parameters
    ----------
    shape : tuple of int
        Volume shape (2-D or 3-D), or a Volume/array (its shape is used).
    size : int or tuple
        Tile size; 2-D sizes on a 3-D shape tile every slice.
    overlap : int or tuple
        Overlap per tiled axis; must be smaller than the tile.

    Returns
    -------
    numpy.ndarray
        ``(n, len(shape))`` int64 start corners. A tile larger than the volume along an
        axis starts at 0 there (the caller pads).

    Examples
    --------
    >>> grid_tiles((100, 100), 64, overlap=16).tolist()
    [[0, 0], [0, 36], [36, 0], [36, 36]]
    """
    if hasattr(shape, "shape"):
        shape = shape.shape
    shape = tuple(int(s) for s in shape)
    t = _tile_size(size, len(shape))
    full = _full_size(t, len(shape))
    ov = (int(overlap),) * len(t) if np.isscalar(overlap) else tuple(int(o) for o in overlap)
    if len(ov) != len(t):
        raise ShapeError(f"expected overlap of length {len(t)}, got {ov}")
    ov = (0,) * (len(shape) - len(t)) + ov
    if any(o < 0 or (o >= f and f > 1) for o, f in zip(ov, full)):
        raise InputValueError(f"expected 0 <= overlap < tile size, got overlap {ov[-len(t):]} for tile {t}")
    axes = [window_starts(n, f, max(1, f - o)) for n, f, o in zip(shape, full, ov)]
    grid = np.array(np.meshgrid(*axes, indexing="ij")).reshape(len(shape), -1).T
    return grid.astype(np.int64)


def stitch_tiles(tiles, coords, shape, *, window: str = "cosine") -> np.ndarray:
    """Blend predicted tiles back into a float32 volume of ``shape`` (weighted mean).

    ``window`` is a :func:`blend_weights` kind: ``"cosine"`` (default) weights tile centres over
    borders (fewer seams, as tile edges see less context), ``"gaussian"`` likewise, and
    ``"flat"`` (or ``"constant"``) averages uniformly. Tiles are not modified.
    """
    tiles = np.asarray(tiles)
    coords = np.asarray(coords, dtype=np.int64)
    shape = tuple(int(s) for s in shape)
    t = tiles.shape[1:]
    full = _full_size(t, len(shape))
    w = blend_weights(t, "constant" if window == "flat" else window)
    acc = np.zeros(shape, np.float32)
    wsum = np.zeros(shape, np.float32)
    for tile, c in zip(tiles, coords):
        sl = tuple(slice(ci, ci + f) for ci, f in zip(c, full))
        acc[sl] += (tile.astype(np.float32) * w).reshape(acc[sl].shape)
        wsum[sl] += w.reshape(wsum[sl].shape)
    np.divide(acc, wsum, out=acc, where=wsum > 0)
    return acc
