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

__all__ = ["write_tiff", "write_n5", "write_volume", "write_slices", "create_ome_zarr", "write_ome_zarr",
           "ome_zarr_metadata", "OME_NGFF_VERSION"]

#: The OME-NGFF version written (zarr v2 layout, which napari-ome-zarr and neuroglancer both open).
OME_NGFF_VERSION = "0.4"
_AXIS_TYPES = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}

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
        Stored as ``voxel_size_nm`` attribute (HDF5, a keyed zarr array), OME-NGFF scale (a ``.zarr``
        without a key is written as an OME-Zarr image, :func:`write_ome_zarr`), ``resolution`` (N5) or
        ImageJ metadata (TIFF), so that :func:`open_volume` reports it.
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
    elif suf == ".zarr" and key is None and zarr_format == 2 and 2 <= a.ndim <= 5:
        # OME-NGFF, so that napari and neuroglancer read the voxel size and axes (a custom attribute they
        # ignore was written before; open_volume still reads those files)
        write_ome_zarr(path, a, voxel_size_nm=vs, chunks=chunks)
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


# ----------------------------------------------------------------------------- OME-Zarr (OME-NGFF 0.4)
def _ome_axes(axes: str, ndim: int, path) -> str:
    axes = str(axes).lower()
    if len(axes) != ndim or len(set(axes)) != ndim or any(a not in _AXIS_TYPES for a in axes):
        raise ShapeError(f"{path}: expected {ndim} distinct axis names from 'tczyx' (e.g. 'czyx' or 'zyx'), "
                         f"got {axes!r}")
    if sum(_AXIS_TYPES[a] == "space" for a in axes) not in (2, 3):
        raise ShapeError(f"{path}: expected 2 or 3 space axes (z, y, x), got axes {axes!r}")
    return axes


def ome_zarr_metadata(axes: str, voxel_size_nm=None, *, name: str = "image", levels: int = 1,
                      downscale=None) -> dict:
    """The OME-NGFF 0.4 ``multiscales`` attribute of an image with ``levels`` scale levels.

    Parameters
    ----------
    axes : str
        One letter per array axis from ``"tczyx"`` in array order (e.g. ``"czyx"``, ``"zyx"``).
    voxel_size_nm : sequence of float, optional
        Size of a voxel of level 0 along each *space* axis (z, y, x order), in nm; 1 when omitted.
    name : str
        The image's name.
    levels : int
        Number of levels (dataset paths ``"0"``, ``"1"``, ...).
    downscale : sequence of int, optional
        Factor between consecutive levels per space axis (default 2 on y and x, 1 on z).

    Returns
    -------
    dict
        ``{"multiscales": [...]}``: axes with types and ``"nanometer"`` units on space axes, and a
        ``scale`` coordinate transformation per level (1 on time and channel axes).
    """
    space = [a for a in axes if _AXIS_TYPES[a] == "space"]
    vs = [1.0] * len(space) if voxel_size_nm is None else [float(v) for v in voxel_size_nm]
    if len(vs) != len(space) or not all(np.isfinite(v) and v > 0 for v in vs):
        raise ShapeError(f"expected {len(space)} positive voxel sizes (one per space axis {''.join(space)}), got {vs}")
    down = [1 if a == "z" and len(space) == 3 else 2 for a in space] if downscale is None else \
        [int(d) for d in downscale]
    ax = []
    for a in axes:
        e = {"name": a, "type": _AXIS_TYPES[a]}
        if e["type"] == "space":
            e["unit"] = "nanometer"
        ax.append(e)
    datasets = []
    for lvl in range(int(levels)):
        scale, i = [], 0
        for a in axes:
            if _AXIS_TYPES[a] == "space":
                scale.append(vs[i] * down[i] ** lvl)
                i += 1
            else:
                scale.append(1.0)
        datasets.append({"path": str(lvl), "coordinateTransformations": [{"type": "scale", "scale": scale}]})
    return {"multiscales": [{"version": OME_NGFF_VERSION, "name": str(name), "axes": ax, "datasets": datasets}]}


def create_ome_zarr(path, shape, dtype, *, axes: str = "zyx", voxel_size_nm=None, chunks=None,
                    name: str = "image", fill_value=0, attributes: dict | None = None,
                    overwrite: bool = False):
    """Create an empty single-level OME-Zarr image (OME-NGFF 0.4 on zarr v2) to be filled block by block.

    This is the writer for outputs larger than memory: the caller writes chunk-aligned regions of
    the returned array (writers of different regions never share a chunk when their regions are
    unions of chunks). Every chunk is stored when written, also all-fill ones, so a volume read
    back is complete. :func:`~neuroadda_rt.open_volume` opens it (level ``"0"``), with the voxel size.

    Parameters
    ----------
    path : str or Path
        The ``.zarr`` folder to create.
    shape : tuple of int
        Array shape, in the order of ``axes``.
    dtype : numpy dtype
        E.g. ``float16`` / ``uint8`` probabilities or ``uint64`` labels.
    axes : str
        One letter per axis from ``"tczyx"`` (default ``"zyx"``; ``"czyx"`` for channels first).
    voxel_size_nm : sequence of float, optional
        Per space axis (z, y, x), in nm.
    chunks : tuple of int, optional
        Chunk shape (default: up to 64 along z, 256 along y and x, whole channel axes).
    name : str
        Image name in the metadata.
    fill_value : scalar
        Value of chunks never written.
    attributes : dict, optional
        Extra group attributes (JSON-serialisable), stored beside ``multiscales``.
    overwrite : bool
        Replace an existing ``path``; otherwise an existing ``path`` raises :class:`FormatError`.

    Returns
    -------
    zarr.Array
        Level ``"0"``, opened for writing.

    Examples
    --------
    >>> z = create_ome_zarr("/tmp/p.zarr", (1, 8, 64, 64), "uint8", axes="czyx", voxel_size_nm=(30, 4, 4))  # doctest: +SKIP
    >>> z[:, :8, :32, :32] = 255                                                                          # doctest: +SKIP
    """
    zarr = require("zarr", "io")
    path = Path(path)
    shape = tuple(int(s) for s in shape)
    axes = _ome_axes(axes, len(shape), path)
    if min(shape) < 1:
        raise ShapeError(f"{path}: expected a non-empty shape, got {shape}")
    meta = ome_zarr_metadata(axes, voxel_size_nm, name=name)
    if chunks is None:
        chunks = tuple(s if a in "tc" else min(s, 64 if a == "z" else 256) for a, s in zip(axes, shape))
    chunks = tuple(int(c) for c in chunks)
    if len(chunks) != len(shape) or min(chunks) < 1:
        raise ShapeError(f"{path}: expected {len(shape)} positive chunk sizes, got {chunks}")
    if path.exists():
        if not overwrite:
            raise FormatError(f"{path}: already exists (pass overwrite=True to replace it)")
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    root = zarr.open_group(str(path), mode="w", zarr_format=2)
    arr = root.create_array("0", shape=shape, dtype=np.dtype(dtype), chunks=chunks, fill_value=fill_value,
                            chunk_key_encoding={"name": "v2", "separator": "/"}, config={"write_empty_chunks": True})
    root.attrs.update({**(attributes or {}), **meta})
    return arr


def write_ome_zarr(path, array, *, axes: str | None = None, voxel_size_nm=None, chunks=None,
                   name: str = "image", attributes: dict | None = None, levels: int = 1) -> Path:
    """Write an in-memory array as an OME-Zarr image (OME-NGFF 0.4, zarr v2), atomically.

    Parameters
    ----------
    path : str or Path
        The ``.zarr`` folder (replaced if it exists: written beside, then renamed).
    array : array-like
        2-D to 5-D; not modified.
    axes : str, optional
        Axis letters from ``"tczyx"``; default the last ``array.ndim`` of ``"tczyx"``.
    voxel_size_nm, chunks, name, attributes
        As for :func:`create_ome_zarr`.
    levels : int
        Scale levels: level ``k`` is level 0 subsampled by ``2**k`` along y and x (a stride, which
        keeps label ids and dtypes intact; z is kept for 3-D data, as EM is anisotropic).

    Returns
    -------
    Path
        ``path``.
    """
    path = Path(path)
    a = np.asarray(array)
    if not 2 <= a.ndim <= 5:
        raise ShapeError(f"{path}: expected a 2-D to 5-D array, got shape {a.shape}")
    axes = _ome_axes(axes or "tczyx"[-a.ndim:], a.ndim, path)
    levels = int(levels)
    if levels < 1:
        raise InputValueError(f"expected levels >= 1, got {levels}")
    tmp = _atomic.temp_dir_beside(path)
    try:
        z0 = create_ome_zarr(tmp / "img.zarr", a.shape, a.dtype, axes=axes, voxel_size_nm=voxel_size_nm,
                             chunks=chunks, name=name, attributes=attributes)
        z0[...] = a
        if levels > 1:
            zarr = require("zarr", "io")
            root = zarr.open_group(str(tmp / "img.zarr"), mode="r+")
            step = tuple(2 if ax in "yx" else 1 for ax in axes)
            for lvl in range(1, levels):
                sub = a[tuple(slice(None, None, s ** lvl) for s in step)]
                root.create_array(str(lvl), shape=sub.shape, dtype=a.dtype, chunks=tuple(
                    min(c, s) for c, s in zip(z0.chunks, sub.shape)), chunk_key_encoding={"name": "v2", "separator": "/"},
                    config={"write_empty_chunks": True})[...] = sub
            space = [ax for ax in axes if _AXIS_TYPES[ax] == "space"]
            meta = ome_zarr_metadata(axes, voxel_size_nm, name=name, levels=levels,
                                     downscale=[2 if ax in "yx" else 1 for ax in space])
            root.attrs.update(meta)
        _atomic.commit_dir(tmp / "img.zarr", path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path
