"""Writers: every file or folder is written to a temporary path beside the target, then renamed.

A crash never leaves a half-written volume under the target's name, and :func:`open_volume`
reads back what these write (shape, dtype, voxel size).
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from .. import _atomic
from ..errors import DTypeError, FormatError, InputValueError, ShapeError, require
from .images import TIFF_SUFFIXES
from .volumes import H5_SUFFIXES, N5_DTYPES, split_key

__all__ = ["write_tiff", "write_n5", "write_volume", "write_slices"]

def write_tiff(path, array, *, voxel_size_nm=None) -> Path:
    """Write a 2-D image or a 3-D stack (one page per z) to a TIFF file, atomically.

    The array is not modified. ``voxel_size_nm`` (zyx or yx) is stored as ImageJ metadata.

    Examples
    --------
    >>> write_tiff("/tmp/stack.tif", np.zeros((3, 8, 8), np.uint8))   # doctest: +SKIP
    """
    tifffile = require("tifffile", "io")
    path = Path(path)
    a = np.asarray(array)
    if a.ndim not in (2, 3):
        raise ShapeError(f"{path}: expected a 2-D or 3-D array, got shape {a.shape}")
    kw: dict[str, Any] = {}
    if voxel_size_nm is not None and a.dtype in (np.uint8, np.uint16, np.float32):
        vs = [float(v) / 1e3 for v in voxel_size_nm]
        kw = {"imagej": True, "resolution": (1.0 / vs[-1], 1.0 / vs[-2]),
              "metadata": {"unit": "um", **({"spacing": vs[0]} if a.ndim == 3 else {})}}
    with _atomic.atomic_path(path) as tmp, open(tmp, "wb") as f:
        tifffile.imwrite(f, a, **kw)
    return path


def write_n5(path, array, *, key: str = "data", block_size=None, compression: str = "gzip",
             voxel_size_nm=None) -> Path:
    """Write an array as an N5 dataset ``path/key`` (raw or gzip blocks), atomically.

    Enough of the N5 spec to interoperate with the reader in :mod:`.volumes` and with z5py/n5-java for
    these two compressions.
    """
    path = Path(path)
    a = np.ascontiguousarray(np.asarray(array))
    if a.dtype.name not in N5_DTYPES:
        raise DTypeError(f"{path}: expected a numeric dtype N5 supports, got {a.dtype}")
    if compression not in ("raw", "gzip"):
        raise InputValueError(f"expected compression 'raw' or 'gzip', got {compression!r}")
    block = tuple(block_size or tuple(min(s, 64) for s in a.shape))
    tmp = _atomic.temp_dir_beside(path)
    try:
        if path.exists():
            shutil.copytree(path, tmp, dirs_exist_ok=True)
        (tmp / "attributes.json").write_text(json.dumps({"n5": "2.0.0"}))
        ds = tmp / key
        ds.mkdir(parents=True, exist_ok=True)
        attrs = {"dimensions": list(reversed(a.shape)), "blockSize": list(reversed(block)),
                 "dataType": a.dtype.name, "compression": {"type": compression}}
        if voxel_size_nm is not None:
            attrs["resolution"] = [float(v) for v in reversed(voxel_size_nm)]
            attrs["pixelResolution"] = {"dimensions": attrs["resolution"], "unit": "nm"}
        (ds / "attributes.json").write_text(json.dumps(attrs))
        grid = [range(0, s, b) for s, b in zip(a.shape, block)]
        for origin in np.ndindex(*[len(g) for g in grid]):
            o = [g[i] for g, i in zip(grid, origin)]
            blk = a[tuple(slice(x, x + b) for x, b in zip(o, block))]
            hdr = np.array([0, a.ndim], ">u2").tobytes() + np.array(list(reversed(blk.shape)), ">u4").tobytes()
            payload = blk.astype(blk.dtype.newbyteorder(">")).tobytes()
            if compression == "gzip":
                payload = gzip.compress(payload, compresslevel=4, mtime=0)
            f = ds.joinpath(*[str(x // b) for x, b in zip(reversed(o), reversed(block))])
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_bytes(hdr + payload)
        _atomic.commit_dir(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def write_volume(path, array, *, key: str | None = None, voxel_size_nm=None, chunks=None,
                 zarr_format: int = 2) -> Path:
    """Write an array to ``.h5``/``.zarr``/``.n5``/``.tif``/``.npy``, atomically (temp then rename).

    Parameters
    ----------
    path : str or Path
        Target; the suffix picks the format. ``file.h5:dataset`` names the HDF5 dataset.
    array : array-like
        Written as is (dtype kept); not modified.
    key : str, optional
        Dataset name in a container (default ``"data"``).
    voxel_size_nm : sequence of float, optional
        Stored as ``voxel_size_nm`` attribute (HDF5/zarr), ``resolution`` (N5) or ImageJ
        metadata (TIFF), so that :func:`open_volume` reports it.
    chunks : tuple of int, optional
        Chunk shape for HDF5/zarr/N5.
    zarr_format : {2, 3}
        zarr store version.

    Returns
    -------
    Path
        The written file or folder.

    Examples
    --------
    >>> write_volume("/tmp/v.h5:raw", np.zeros((2, 4, 4), np.uint8))   # doctest: +SKIP
    """
    s, k2 = split_key(str(path))
    key = key or k2
    path = Path(s)
    a = np.asarray(array)
    suf = path.suffix.lower()
    vs = None if voxel_size_nm is None else [float(v) for v in voxel_size_nm]
    if vs is not None and len(vs) != a.ndim:
        raise ShapeError(f"{path}: expected {a.ndim} voxel sizes, got {len(vs)}")
    if suf in H5_SUFFIXES:
        h5py = require("h5py", "io")
        with _atomic.atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
            ds = f.create_dataset(key or "data", data=a, chunks=chunks if chunks else (True if a.size > 1 else None))
            if vs is not None:
                ds.attrs["voxel_size_nm"] = vs
    elif suf == ".zarr":
        zarr = require("zarr", "io")
        tmp = _atomic.temp_dir_beside(path)
        try:
            if key:
                root = zarr.open_group(str(tmp), mode="w", zarr_format=zarr_format)
                z = root.create_array(key, shape=a.shape, dtype=a.dtype, chunks=chunks or "auto",
                                      config={"write_empty_chunks": True})
            else:
                z = zarr.create_array(str(tmp), shape=a.shape, dtype=a.dtype, chunks=chunks or "auto",
                                      zarr_format=zarr_format, overwrite=True,
                                      config={"write_empty_chunks": True})
            z[...] = a
            if vs is not None:
                z.attrs["voxel_size_nm"] = vs
            _atomic.commit_dir(tmp, path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    elif suf == ".n5":
        write_n5(path, a, key=key or "data", block_size=chunks, voxel_size_nm=vs)
    elif suf in TIFF_SUFFIXES:
        write_tiff(path, a, voxel_size_nm=vs)
    elif suf == ".npy":
        _atomic.save_npy(path, a)
    else:
        raise FormatError(f"{path}: cannot write format {suf!r} (expected .h5, .zarr, .n5, .tif or .npy)")
    return path


def write_slices(folder, array, *, fmt: str = "png") -> Path:
    """Write a 3-D uint8/uint16 stack as a folder of numbered 2-D slices (``0.png`` ...), atomically."""
    folder = Path(folder)
    a = np.asarray(array)
    if a.ndim != 3:
        raise ShapeError(f"{folder}: expected a 3-D stack, got shape {a.shape}")
    tmp = _atomic.temp_dir_beside(folder)
    try:
        for i, sl in enumerate(a):
            if fmt == "png":
                Image = require("PIL.Image", "io")
                Image.fromarray(sl).save(tmp / f"{i}.png")
            elif fmt in ("tif", "tiff"):
                require("tifffile", "io").imwrite(tmp / f"{i}.tif", sl)
            else:
                raise InputValueError(f"expected fmt 'png' or 'tif', got {fmt!r}")
        _atomic.commit_dir(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder
