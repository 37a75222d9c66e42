"""Lazy reading of EM volumes in the formats of the field.

:func:`open_volume` returns a :class:`Volume`: an array-like that knows its shape, dtype and
(when the file states it) voxel size in nm, and reads only the bounding box of what is
sliced. Supported: HDF5 (``file.h5:dataset`` or ``key=``), zarr v2 and v3 (including one
level of an OME-Zarr multiscale group), N5 (a small built-in reader: zarr 3 dropped N5),
multi-page TIFF, a folder of TIFF or PNG slices (natural sort), ``.npy`` files and in-memory
NumPy arrays. Neuroglancer precomputed goes through cloud-volume, an optional extra.
Single 2-D image files are decoded by :mod:`neuroadda_rt.io.images` (one colour rule).

Every axis order is NumPy's C order: ``(z, y, x)`` for volumes, ``(y, x)`` for images.
Voxel sizes follow the same order.
"""

from __future__ import annotations

import bz2
import json
import logging
import lzma
import os
import re
import warnings
import zlib
from pathlib import Path

import numpy as np

from ..errors import FormatError, InputValueError, MissingChunksWarning, ShapeError, require
from .images import IMAGE_SUFFIXES, TIFF_SUFFIXES, image_dtype, read_image_2d, read_image_stack

__all__ = ["Volume", "open_volume", "natural_sort_key", "load_npy", "read_npy_header", "ome_multiscales"]

log = logging.getLogger("neuroadda_rt")

H5_SUFFIXES = (".h5", ".hdf5", ".hdf", ".hd5")
# dtypes the N5 spec names, as NumPy type codes (the writer checks against the same table)
N5_DTYPES = {"uint8": "u1", "uint16": "u2", "uint32": "u4", "uint64": "u8", "int8": "i1", "int16": "i2",
             "int32": "i4", "int64": "i8", "float32": "f4", "float64": "f8"}


def natural_sort_key(name: str):
    """Sort key that orders ``"2.png"`` before ``"10.png"``."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", str(name))]


# ----------------------------------------------------------------------------- backends
class _Backend:
    """Reads an axis-aligned box ``[starts, stops)`` with unit step."""

    shape: tuple[int, ...]
    dtype: np.dtype
    voxel_size_nm: tuple[float, ...] | None = None

    def read_box(self, starts, stops) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self):
        pass


class _ArrayBackend(_Backend):
    def __init__(self, arr):
        self.arr = arr
        self.shape = tuple(arr.shape)
        self.dtype = np.dtype(arr.dtype)

    def read_box(self, starts, stops):
        return np.asarray(self.arr[tuple(slice(a, b) for a, b in zip(starts, stops))])


class _ZarrBackend(_ArrayBackend):
    """A zarr array whose chunks were checked against the chunk grid at open, and whose decode
    failures name the chunk (zarr says only e.g. "Zstd decompression error")."""

    def __init__(self, arr, label: str):
        super().__init__(arr)
        self.label = label
        grid = getattr(arr.metadata, "chunk_grid", None)
        self.chunk_shape = tuple(int(c) for c in getattr(grid, "chunk_shape", ())) or None  # stored keys (shards)

    def _chunk_coords(self, starts, stops):
        import itertools
        ranges = [range(a // c, (b + c - 1) // c) for a, b, c in zip(starts, stops, self.chunk_shape)]
        return itertools.product(*ranges)

    def _key(self, coords) -> str:
        rel = self.arr.metadata.encode_chunk_key(tuple(coords))
        return f"{self.arr.path}/{rel}" if self.arr.path else rel

    def first_missing_chunk(self):
        """The first chunk (C order) inside the bounds with no stored object, or None. Lists the
        store's keys under the array once."""
        if self.chunk_shape is None or len(self.chunk_shape) != len(self.shape) or 0 in self.shape:
            return None
        from zarr.core.sync import sync

        async def keys():
            prefix = f"{self.arr.path}/" if self.arr.path else ""
            return {k async for k in self.arr.store.list_prefix(prefix)}

        present = sync(keys())
        for coords in self._chunk_coords((0,) * len(self.shape), self.shape):
            if self._key(coords) not in present:
                return coords
        return None

    def read_box(self, starts, stops):
        try:
            return super().read_box(starts, stops)
        except Exception as exc:  # codec errors are RuntimeError/ValueError/... depending on the codec
            bad = None
            if self.chunk_shape is not None:
                for coords in self._chunk_coords(starts, stops):
                    lo = [i * c for i, c in zip(coords, self.chunk_shape)]
                    hi = [min(l + c, n) for l, c, n in zip(lo, self.chunk_shape, self.shape)]
                    try:
                        super().read_box(lo, hi)
                    except Exception as chunk_exc:
                        bad, exc = tuple(coords), chunk_exc
                        break
            where = f"chunk {bad} (file {self._key(bad)})" if bad is not None else "a chunk"
            raise FormatError(f"{self.label}: {where} cannot be decoded (corrupt or truncated?) while reading the "
                              f"box {list(zip(starts, stops))}: {type(exc).__name__}: {exc}") from exc


class _H5Backend(_ArrayBackend):
    def __init__(self, f, ds):
        super().__init__(ds)
        self.file = f
        self.voxel_size_nm = _voxel_size_from_attrs(dict(ds.attrs), len(self.shape))

    def read_box(self, starts, stops):
        try:
            return np.asarray(self.arr[tuple(slice(a, b) for a, b in zip(starts, stops))])
        except OSError as exc:  # a chunk beyond a truncation point
            raise FormatError(f"{self.file.filename}: cannot read {self.arr.name} (truncated or corrupt file?): {exc}") from exc

    def close(self):
        self.file.close()


class _TiffZarrBackend(_Backend):
    """A greyscale TIFF (one page, or one page per z) read through tifffile's zarr interface:
    slicing decodes only the tiles or strips it touches, not whole pages (an 8192² tiled page:
    2 ms for a 256² tile instead of decoding 64 MB). The file stays open while the volume does."""

    def __init__(self, path: Path, ndim: int):
        tifffile = require("tifffile", "io")
        zarr = require("zarr", "io")
        self.path = path
        self._tf = tifffile.TiffFile(str(path))
        try:
            self._store = self._tf.series[0].aszarr()
            arr = zarr.open(self._store, mode="r")
            if isinstance(arr, zarr.Group):  # pyramidal TIFF: level 0
                arr = arr["0"]
        except Exception:
            self._tf.close()
            raise
        self.arr = arr
        self.shape = tuple(int(s) for s in arr.shape)
        self.dtype = np.dtype(arr.dtype).newbyteorder("=")
        if len(self.shape) != ndim:
            self.close()
            raise ShapeError(f"{path}: expected a {ndim}-D TIFF series, got shape {self.shape}")

    def read_box(self, starts, stops):
        try:
            a = np.asarray(self.arr[tuple(slice(a, b) for a, b in zip(starts, stops))])
        except Exception as exc:  # noqa: BLE001 - tifffile raises many types on a cut file
            raise FormatError(f"{self.path}: cannot read the box {list(zip(starts, stops))} (truncated?): "
                              f"{type(exc).__name__}: {exc}") from exc
        return a.astype(self.dtype, copy=False)

    def close(self):
        self._tf.close()

    def __del__(self):  # the handle goes with the volume (no ResourceWarning for an unclosed file)
        tf = getattr(self, "_tf", None)
        if tf is not None:
            try:
                tf.close()
            except Exception:  # noqa: BLE001 - interpreter shutdown
                pass


class _SliceStackBackend(_Backend):
    """A list of 2-D image files (a folder of slices, or the pages of a multi-page TIFF)."""

    def __init__(self, readers, shape2d, dtype, label, files=None):
        self.readers = readers
        self.shape = (len(readers), *shape2d)
        self.dtype = np.dtype(dtype)
        self.label = label
        self.files = files

    def read_box(self, starts, stops):
        out = np.empty(tuple(b - a for a, b in zip(starts, stops)), dtype=self.dtype)
        for i, z in enumerate(range(starts[0], stops[0])):
            img = self.readers[z]()
            if img.shape != self.shape[1:]:
                raise ShapeError(f"{self.label}: slice {z} has shape {img.shape}, expected {self.shape[1:]} like slice 0")
            # never cast silently (a file replaced after opening); byte order alone is no change
            if img.dtype.newbyteorder("=") != self.dtype.newbyteorder("="):
                where = self.files[z] if self.files else f"slice {z}"
                raise FormatError(f"{self.label}: expected every slice with the dtype of slice 0 ({self.dtype}), "
                                  f"got {img.dtype} in {where}")
            out[i] = img[starts[1]:stops[1], starts[2]:stops[2]]
        return out



class _N5Backend(_Backend):
    """Minimal N5 reader (spec: github.com/saalfeldlab/n5): block files at ``i/j/k`` in
    N5 (x-first) axis order, a big-endian header, raw/gzip/zstd/bzip2/xz payloads.
    Missing blocks read as the fill value 0."""

    def __init__(self, path: Path, attrs: dict):
        self.path = path
        try:
            dims = [int(d) for d in attrs["dimensions"]]
            block = [int(b) for b in attrs["blockSize"]]
            dtype = N5_DTYPES[attrs["dataType"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise FormatError(f"{path}: not an N5 dataset (attributes.json lacks dimensions/blockSize/dataType or "
                              f"has an unsupported dataType): {exc}") from exc
        self.n5_dims = dims
        self.n5_block = block
        self.shape = tuple(reversed(dims))
        self.block = tuple(reversed(block))
        self.dtype = np.dtype(dtype)
        self.be_dtype = np.dtype(">" + dtype)
        comp = attrs.get("compression", {"type": attrs.get("compressionType", "raw")})
        self.compression = comp.get("type", "raw") if isinstance(comp, dict) else str(comp)
        if self.compression not in ("raw", "gzip", "zstd", "bzip2", "xz"):
            raise FormatError(f"{path}: N5 compression {self.compression!r} is not supported by the built-in reader "
                              "(expected raw, gzip, zstd, bzip2 or xz)")
        res = attrs.get("resolution") or (attrs.get("pixelResolution") or {}).get("dimensions")
        if res is not None and len(res) == len(dims):
            unit = str((attrs.get("pixelResolution") or {}).get("unit", attrs.get("unit", "nm")))
            self.voxel_size_nm = tuple(float(r) * _unit_to_nm(unit) for r in reversed(res))

    def _decompress(self, raw: bytes, f: Path) -> bytes:
        if self.compression == "raw":
            return raw
        try:
            if self.compression == "gzip":
                return zlib.decompress(raw, 15 + 32)  # gzip or zlib header, as N5 writers differ
            if self.compression == "bzip2":
                return bz2.decompress(raw)
            if self.compression == "xz":
                return lzma.decompress(raw)
            numcodecs = require("numcodecs", "io")
            return bytes(numcodecs.Zstd().decode(raw))
        except Exception as exc:  # any codec failure means a corrupt block
            raise FormatError(f"{f}: cannot decompress N5 block ({self.compression}): {exc}") from exc

    def _read_block(self, idx_c) -> np.ndarray | None:
        f = self.path.joinpath(*[str(i) for i in reversed(idx_c)])
        if not f.exists():
            return None
        buf = f.read_bytes()
        if len(buf) < 4:
            raise FormatError(f"{f}: truncated N5 block header")
        mode, nd = np.frombuffer(buf[:4], dtype=">u2")
        hdr = 4 + 4 * int(nd) + (4 if mode == 1 else 0)
        if mode not in (0, 1) or nd != len(self.shape) or len(buf) < hdr:
            raise FormatError(f"{f}: bad N5 block header (mode {mode}, ndim {nd}, expected ndim {len(self.shape)})")
        bshape = tuple(int(s) for s in reversed(np.frombuffer(buf[4:4 + 4 * int(nd)], dtype=">u4")))
        data = self._decompress(buf[hdr:], f)
        n = int(np.prod(bshape))
        if len(data) < n * self.dtype.itemsize:
            raise FormatError(f"{f}: truncated N5 block: expected {n * self.dtype.itemsize} bytes, got {len(data)}")
        return np.frombuffer(data[: n * self.dtype.itemsize], dtype=self.be_dtype).reshape(bshape).astype(self.dtype)

    def read_box(self, starts, stops):
        out = np.zeros(tuple(b - a for a, b in zip(starts, stops)), dtype=self.dtype)
        if out.size == 0:
            return out
        ranges = [range(a // bs, (b - 1) // bs + 1) for a, b, bs in zip(starts, stops, self.block)]
        for idx in np.ndindex(*[len(r) for r in ranges]):
            bidx = [r[i] for r, i in zip(ranges, idx)]
            blk = self._read_block(bidx)
            if blk is None:
                continue
            b0 = [i * bs for i, bs in zip(bidx, self.block)]
            src, dst = [], []
            for a, b, o, n in zip(starts, stops, b0, blk.shape):
                lo, hi = max(a, o), min(b, o + n)
                src.append(slice(lo - o, hi - o))
                dst.append(slice(lo - a, hi - a))
            out[tuple(dst)] = blk[tuple(src)]
        return out


class _CloudVolumeBackend(_Backend):
    def __init__(self, url):
        cv = require("cloudvolume", "neuroglancer")
        vol = cv.CloudVolume(url, mip=0, progress=False, fill_missing=True)
        self.vol = vol
        # cloud-volume is (x, y, z, c); present (z, y, x) like everything else.
        self.shape = tuple(int(s) for s in reversed(vol.shape[:3]))
        self.dtype = np.dtype(vol.dtype)
        self.voxel_size_nm = tuple(float(r) for r in reversed(vol.resolution))

    def read_box(self, starts, stops):
        s = list(reversed(starts))
        e = list(reversed(stops))
        a = np.asarray(self.vol[s[0]:e[0], s[1]:e[1], s[2]:e[2]])[..., 0]
        return np.ascontiguousarray(a.transpose(2, 1, 0))


# ----------------------------------------------------------------------------- metadata helpers
def _unit_to_nm(unit: str) -> float:
    u = unit.lower().strip()
    return {"nm": 1.0, "nanometer": 1.0, "nanometers": 1.0, "um": 1e3, "µm": 1e3, "micrometer": 1e3,
            "micron": 1e3, "micrometers": 1e3, "microns": 1e3, "mm": 1e6, "millimeter": 1e6, "angstrom": 0.1,
            "pm": 1e-3}.get(u, 1.0)


def _voxel_size_from_attrs(attrs: dict, ndim: int) -> tuple[float, ...] | None:
    """Voxel size from the common HDF5/zarr conventions: ``voxel_size``/``resolution`` in nm
    (zyx), ``element_size_um`` (zyx, micrometres)."""
    for key, scale in (("voxel_size_nm", 1.0), ("voxel_size", 1.0), ("resolution", 1.0), ("element_size_um", 1e3)):
        if key in attrs:
            try:
                v = [float(x) * scale for x in np.atleast_1d(attrs[key])]
            except (TypeError, ValueError):
                continue
            if len(v) == ndim:
                return tuple(v)
    return None


# ----------------------------------------------------------------------------- Volume
class Volume:
    """A lazily read EM volume (or 2-D image).

    Slicing with ints, slices (any step) and ``...`` reads only the bounding box of the
    selection and returns a new NumPy array (a copy; the file is never modified).
    ``np.asarray(volume)`` reads everything.

    Attributes
    ----------
    shape, dtype, ndim : the array's geometry, in C order (``z, y, x``).
    voxel_size_nm : tuple of float or None
        Voxel size per axis in nm when the file states it.
    path : str or None
        The file (or folder) it was opened from; ``None`` for in-memory arrays.
    key : str or None
        The dataset inside the container (HDF5 dataset, zarr array path, N5 dataset).
    voxels_read : int
        How many voxels have been read so far (for checking laziness).
    files : list of str or None
        The slice files, in order, of a volume opened from a folder of slices.

    Examples
    --------
    >>> import numpy as np
    >>> v = open_volume(np.zeros((4, 8, 8), np.uint8))
    >>> v.shape, v[1, :2, :3].shape
    ((4, 8, 8), (2, 3))
    """

    def __init__(self, backend: _Backend, *, path=None, key=None, voxel_size_nm=None):
        self._b = backend
        self.shape = tuple(int(s) for s in backend.shape)
        self.dtype = np.dtype(backend.dtype)
        self.path = None if path is None else str(path)
        self.key = key
        vs = voxel_size_nm if voxel_size_nm is not None else backend.voxel_size_nm
        if vs is not None:
            vs = tuple(float(x) for x in np.atleast_1d(vs))
            if len(vs) != len(self.shape):
                raise ShapeError(f"{self._name()}: expected {len(self.shape)} voxel sizes, got {len(vs)}")
        self.voxel_size_nm = vs
        self.voxels_read = 0
        self.files: list[str] | None = None
        self._reopen: tuple[str, str | None] | None = None  # (path, key) that open_volume can reopen
        self._allow_missing_chunks = False  # what open_volume was told; travels with a pickle

    # -- array protocol
    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        where = self.path or "<array>"
        if self.key:
            where += f":{self.key}"
        return f"Volume({where}, shape={self.shape}, dtype={self.dtype}, voxel_size_nm={self.voxel_size_nm})"

    def _name(self) -> str:
        return (self.path or "<array>") + (f":{self.key}" if self.key else "")

    def __array__(self, dtype=None, copy=None):
        a = self[...]
        return a if dtype is None else a.astype(dtype, copy=False)

    def read(self) -> np.ndarray:
        """Read the whole volume into memory (a new array)."""
        return self[...]

    def __getitem__(self, key) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        n_ell = sum(k is Ellipsis for k in key)
        if n_ell > 1:
            raise InputValueError(f"{self._name()}: expected at most one Ellipsis in the index, got {n_ell}")
        if n_ell == 0:
            key = key + (Ellipsis,)
        i = next(j for j, k in enumerate(key) if k is Ellipsis)
        n_fill = self.ndim - (len(key) - 1)
        if n_fill < 0:
            raise ShapeError(f"{self._name()}: too many indices: expected at most {self.ndim}, got {len(key) - 1}")
        key = key[:i] + (slice(None),) * n_fill + key[i + 1:]
        starts, stops, post = [], [], []
        for ax, (k, n) in enumerate(zip(key, self.shape)):
            if isinstance(k, (int, np.integer)):
                k = int(k)
                if not -n <= k < n:
                    raise IndexError(f"{self._name()}: index {k} out of range for axis {ax} of size {n}")
                k %= n
                starts.append(k)
                stops.append(k + 1)
                post.append(0)
            elif isinstance(k, slice):
                r = range(*k.indices(n))
                if len(r) == 0:
                    starts.append(0)
                    stops.append(0)
                    post.append(slice(0, 0))
                    continue
                lo, hi = min(r[0], r[-1]), max(r[0], r[-1]) + 1
                starts.append(lo)
                stops.append(hi)
                step = r.step
                post.append(slice(r[0] - lo, None if step < 0 and r[-1] == lo else r[-1] - lo + (1 if step > 0 else -1), step))
            else:
                raise InputValueError(
                    f"{self._name()}: expected ints, slices or Ellipsis as index, got {type(k).__name__} "
                    "(read a box first, then index the NumPy array)")
        if any(b <= a for a, b in zip(starts, stops)):
            box = np.empty(tuple(max(0, b - a) for a, b in zip(starts, stops)), dtype=self.dtype)
        else:
            box = self._b.read_box(starts, stops)
            self.voxels_read += int(box.size)
        return np.ascontiguousarray(box[tuple(post)])

    def __reduce__(self):
        # Pickling (e.g. to DataLoader workers or dask) reopens the file by path rather than
        # shipping an open HDF5 handle; in-memory arrays travel as arrays.
        if self._reopen is not None:
            return (_reopen_volume, (*self._reopen, self.voxel_size_nm, self._allow_missing_chunks))
        if isinstance(self._b, _ArrayBackend) and isinstance(self._b.arr, np.ndarray):
            return (_array_volume, (self._b.arr, self.voxel_size_nm))
        if isinstance(self._b, _ZSlab):
            return (_slab_volume, (self._b.vol, self._b.z0, self._b.z0 + self.shape[0], self.voxel_size_nm))
        raise TypeError(f"{self._name()}: this Volume cannot be pickled")

    def z_slab(self, z0: int, z1: int) -> "Volume":
        """Slices ``[z0, z1)`` of a 3-D volume as a new lazy :class:`Volume` (nothing is read).

        Examples
        --------
        >>> open_volume(np.zeros((4, 8, 8), np.uint8)).z_slab(1, 3).shape
        (2, 8, 8)
        """
        if self.ndim != 3 or not 0 <= z0 < z1 <= self.shape[0]:
            raise ShapeError(f"{self._name()}: expected 0 <= z0 < z1 <= {self.shape[0]} on a 3-D volume, got "
                             f"[{z0}, {z1}) of shape {self.shape}")
        return Volume(_ZSlab(self, z0, z1), path=self.path, key=self.key, voxel_size_nm=self.voxel_size_nm)

    def close(self):
        """Release the file handle (HDF5); slicing afterwards is an error for HDF5 volumes."""
        self._b.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _reopen_volume(path, key, voxel_size_nm, allow_missing_chunks=False):
    return open_volume(path, key=key, voxel_size_nm=voxel_size_nm, allow_missing_chunks=allow_missing_chunks)


def _array_volume(arr, voxel_size_nm):
    return Volume(_ArrayBackend(arr), voxel_size_nm=voxel_size_nm)


def _slab_volume(vol, z0, z1, voxel_size_nm):
    v = vol.z_slab(z0, z1)
    v.voxel_size_nm = voxel_size_nm
    return v


class _ZSlab(_Backend):
    """Slices [z0, z1) of a 3-D volume (lazy)."""

    def __init__(self, vol: Volume, z0: int, z1: int):
        self.vol = vol
        self.z0 = z0
        self.shape = (z1 - z0, *vol.shape[1:])
        self.dtype = vol.dtype
        self.voxel_size_nm = vol.voxel_size_nm

    def read_box(self, starts, stops):
        return self.vol[(slice(starts[0] + self.z0, stops[0] + self.z0),
                         *(slice(a, b) for a, b in zip(starts[1:], stops[1:])))]


# ----------------------------------------------------------------------------- open_volume
def split_key(path: str) -> tuple[str, str | None]:
    """``file.h5:dataset`` / ``vol.n5:raw/s0`` / ``vol.zarr:0`` → (file, key)."""
    m = re.match(r"^(.*?\.(?:h5|hdf5|hdf|hd5|n5|zarr))[:](.+)$", path, flags=re.IGNORECASE)
    if m and not os.path.exists(path):
        return m.group(1), m.group(2).lstrip("/")
    return path, None


def _h5_datasets(f, h5py) -> list[str]:
    names = []
    f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
    return names


def _open_h5(path: Path, key):
    h5py = require("h5py", "io")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise FormatError(f"{path}: cannot open as HDF5 (truncated or not HDF5?): {exc}") from exc
    names = _h5_datasets(f, h5py)
    if key is None:
        if len(names) != 1:
            f.close()
            raise FormatError(f"{path}: expected a dataset key (file.h5:dataset or key=) because the file holds "
                              f"{len(names)} datasets: {names[:20]}")
        key = names[0]
    if key not in f or not isinstance(f[key], h5py.Dataset):
        f.close()
        raise FormatError(f"{path}: no dataset {key!r}; available: {names[:20]}")
    ds = f[key]
    try:  # touch the first chunk so that a truncated file fails here, not at first use
        if ds.size:
            ds[(0,) * ds.ndim]
    except OSError as exc:
        f.close()
        raise FormatError(f"{path}: dataset {key!r} is unreadable (truncated file?): {exc}") from exc
    return Volume(_H5Backend(f, ds), path=path, key=key)


def ome_multiscales(path) -> list | None:
    """The OME-NGFF ``multiscales`` list of a zarr group folder (v2 ``.zattrs`` or v3 ``zarr.json``
    attributes, NGFF 0.4 or 0.5 layout), read from its metadata file alone; None when it is not one."""
    p = Path(path)
    for name in (".zattrs", "zarr.json"):
        f = p / name
        if f.is_file():
            try:
                attrs = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return None
            attrs = attrs.get("attributes", attrs)
            ms = (attrs.get("ome") or attrs).get("multiscales")
            if ms:
                return ms
    return None


def _ome_level(group, key, path):
    """Pick a multiscale level of an OME-Zarr group; returns (array, voxel size nm, key)."""
    ms = group.attrs.get("multiscales")
    if not ms:
        return None
    m = ms[0]
    dsets = m.get("datasets", [])
    level = 0 if key is None else key
    if isinstance(level, str) and level.isdigit() and not any(d["path"] == level for d in dsets):
        level = int(level)
    if isinstance(level, int):
        if not 0 <= level < len(dsets):
            raise FormatError(f"{path}: OME-Zarr has {len(dsets)} levels, got level {level}")
        d = dsets[level]
    else:
        hits = [d for d in dsets if d["path"] == level]
        if not hits:
            return None
        d = hits[0]
    arr = group[d["path"]]
    scale = None
    for t in d.get("coordinateTransformations", []):
        if t.get("type") == "scale":
            scale = t["scale"]
    units = [a.get("unit", "nm") if isinstance(a, dict) else "nm" for a in m.get("axes", [])]
    vs = None
    if scale is not None:
        if len(units) != len(scale):
            units = ["nm"] * len(scale)
        vs = [float(s) * _unit_to_nm(u) for s, u in zip(scale, units)]
        vs = tuple(vs[-arr.ndim:])
    return arr, vs, d["path"]


def _open_zarr(path: Path, key, allow_missing_chunks: bool = False):
    zarr = require("zarr", "io")
    try:
        node = zarr.open(str(path), mode="r")
    except Exception as exc:  # zarr raises several types for unreadable stores
        raise FormatError(f"{path}: cannot open as zarr: {exc}") from exc
    vs = None
    if isinstance(node, zarr.Array):
        arr = node
        if key:
            raise FormatError(f"{path}: is a zarr array, got a key {key!r}")
    else:
        ome = _ome_level(node, key, path)
        if ome is not None:
            arr, vs, key = ome
        else:
            if key is None:
                names = [n for n, _ in node.arrays()]
                if len(names) != 1:
                    raise FormatError(f"{path}: expected a key (vol.zarr:array or key=): the group holds arrays {names[:20]}")
                key = names[0]
            try:
                arr = node[key]
            except KeyError as exc:
                names = [n for n, _ in node.arrays()]
                raise FormatError(f"{path}: no array {key!r}; available: {names[:20]}") from exc
            if not isinstance(arr, zarr.Array):
                raise FormatError(f"{path}: {key!r} is a group, not an array")
    label = f"{path} (array {arr.path or '/'!r})"
    b = _ZarrBackend(arr, label)
    if not allow_missing_chunks:
        try:
            missing = b.first_missing_chunk()
        except Exception as exc:  # a store that cannot be listed (e.g. plain HTTP): nothing to compare against
            log.info("%s: stored chunks not listable, missing chunks not checked (%s)", label, exc)
            missing = None
        if missing is not None:
            # The zarr spec reads a missing chunk as the fill value, and writers skip all-fill chunks, so a
            # missing chunk is legal; but it is also what a deleted or unwritten chunk looks like.
            fill = getattr(arr.fill_value, "item", lambda: arr.fill_value)()
            warnings.warn(MissingChunksWarning(
                f"{label}: chunk {tuple(missing)} (file {b._key(missing)}) is missing inside the volume's bounds "
                f"{arr.shape}; zarr reads it as the fill value ({fill!r}). If the volume should be complete, a chunk "
                f"was lost; pass allow_missing_chunks=True when a partial volume is intended"), stacklevel=3)
    b.voxel_size_nm = vs or _voxel_size_from_attrs(dict(arr.attrs), arr.ndim)
    return Volume(b, path=path, key=key)


def _is_n5(path: Path) -> bool:
    if path.suffix.lower() == ".n5":
        return True
    a = path / "attributes.json"
    if a.is_file():
        try:
            return "n5" in json.loads(a.read_text()) or "dataType" in json.loads(a.read_text())
        except (OSError, ValueError):
            return False
    return False


def _open_n5(path: Path, key):
    if not (path / "attributes.json").is_file():
        raise FormatError(f"{path}: not an N5 container (no attributes.json)")

    def datasets():
        return sorted(str(p.parent.relative_to(path)) for p in path.rglob("attributes.json")
                      if '"dataType"' in p.read_text())

    ds_path = path / key if key else path
    attr_file = ds_path / "attributes.json"
    attrs = None
    if attr_file.is_file():
        try:
            attrs = json.loads(attr_file.read_text())
        except (OSError, ValueError) as exc:
            raise FormatError(f"{attr_file}: unreadable N5 attributes: {exc}") from exc
    if attrs is None or "dataType" not in attrs:
        found = datasets()
        if key is None and len(found) == 1:
            return _open_n5(path, found[0])
        raise FormatError(f"{path}: no N5 dataset {key!r} (a group or missing); available: {found[:20]}")
    return Volume(_N5Backend(ds_path, attrs), path=path, key=key)


def _open_tiff(path: Path):
    tifffile = require("tifffile", "io")
    try:
        with tifffile.TiffFile(str(path)) as tf:
            series = tf.series[0]
            shape, dtype, axes, n_pages = tuple(series.shape), series.dtype, series.axes, len(series.pages)
            grey_shape = tuple(n for n, a in zip(shape, axes) if a != "S")
            vs = _tiff_voxel_size(tf.imagej_metadata or {}, series.pages[0], grey_shape)
    except (OSError, ValueError, IndexError, tifffile.TiffFileError) as exc:
        raise FormatError(f"{path}: cannot read TIFF (truncated or not a TIFF?): {exc}") from exc
    if "S" in axes:  # colour samples: the one colour rule, read eagerly
        stack = read_image_stack(path)
        return Volume(_ArrayBackend(stack[0] if stack.shape[0] == 1 else stack), path=path, voxel_size_nm=vs)
    if len(shape) in (2, 3) and (len(shape) == 2 or n_pages == shape[0]):
        try:  # tiles and strips decoded on demand
            return Volume(_TiffZarrBackend(path, len(shape)), path=path, voxel_size_nm=vs)
        except (ImportError, ShapeError, ValueError, KeyError, TypeError, NotImplementedError) as exc:
            log.info("%s: no zarr view of the TIFF (%s); pages are decoded whole", path, exc)
    if len(shape) == 2:
        b = _Wrap2D(_SliceStackBackend([lambda: read_image_2d(path)], shape, dtype, str(path)))
        return Volume(b, path=path, voxel_size_nm=vs)
    if len(shape) == 3 and n_pages == shape[0]:
        def page_reader(i):
            def read():
                with tifffile.TiffFile(str(path)) as t:
                    try:
                        return t.series[0].pages[i].asarray()
                    except Exception as exc:  # tifffile raises various errors on a cut file
                        raise FormatError(f"{path}: cannot read page {i} (truncated?): {exc}") from exc
            return read
        b = _SliceStackBackend([page_reader(i) for i in range(shape[0])], shape[1:], dtype, str(path))
        return Volume(b, path=path, voxel_size_nm=vs)
    try:  # unusual layouts (4-D hyperstacks): read eagerly
        arr = tifffile.imread(str(path))
    except Exception as exc:  # noqa: BLE001 - tifffile raises many types on corrupt files
        raise FormatError(f"{path}: cannot read TIFF data (truncated?): {exc}") from exc
    return Volume(_ArrayBackend(arr), path=path)


def _tiff_voxel_size(ij: dict, page0, shape) -> tuple[float, ...] | None:
    """ImageJ metadata: ``XResolution`` (pixels per unit) and ``spacing`` (z), in ``unit``."""
    unit = ij.get("unit", "")
    try:
        xr = page0.tags["XResolution"].value
    except KeyError:
        return None
    if not (unit and xr and xr[0]):
        return None
    scale = _unit_to_nm("um" if unit in ("micron", "\\u00B5m") else unit)
    px = xr[1] / xr[0] * scale
    if len(shape) == 2:
        return (px, px)
    if len(shape) == 3 and "spacing" in ij:
        return (float(ij["spacing"]) * scale, px, px)
    return None


class _Wrap2D(_Backend):
    """A one-slice stack shown as a 2-D image."""

    def __init__(self, b):
        self.b = b
        self.shape = b.shape[1:]
        self.dtype = b.dtype

    def read_box(self, starts, stops):
        return self.b.read_box([0, *starts], [1, *stops])[0]


def _open_folder(path: Path, pattern: str | None):
    files = [p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if pattern:
        files = [p for p in files if p.match(pattern)]
    if not files:
        raise FormatError(f"{path}: expected a folder of .tif/.png slices, found none"
                          + (f" matching {pattern!r}" if pattern else ""))
    suffixes = {p.suffix.lower().replace("tiff", "tif") for p in files}
    if len(suffixes) > 1:
        raise FormatError(f"{path}: expected one image type per folder, got {sorted(suffixes)} (pass key='*.png')")
    files.sort(key=lambda p: natural_sort_key(p.name))
    first = read_image_2d(files[0])
    # one dtype per folder: casting to slice 0's would wrap (uint16 1000 -> 232) or truncate
    # (float 0.75 -> 0). Only the headers are read here (a file whose header does not tell, or
    # is unreadable, is checked, and named, when it is sliced: read_box checks every decoded slice).
    for f in files[1:]:
        dt = image_dtype(f, decode=False)
        if dt is not None and dt != first.dtype:
            raise FormatError(f"{path}: expected every slice with the dtype of slice 0 ({files[0].name}: "
                              f"{first.dtype}), got {dt} in {f.name}; convert the slices to one dtype")
    readers = [(lambda p=p: read_image_2d(p)) for p in files]
    b = _SliceStackBackend(readers, first.shape, first.dtype, str(path), files=[str(p) for p in files])
    v = Volume(b, path=path, key=pattern)
    v.files = [str(p) for p in files]
    return v


def open_volume(source, *, key: str | None = None, voxel_size_nm=None,
                allow_missing_chunks: bool = False) -> Volume:
    """Open an EM volume (or 2-D image) lazily.

    Parameters
    ----------
    source : str, Path, numpy.ndarray or Volume
        A file or folder: ``.h5``/``.hdf5`` (``file.h5:dataset`` selects a dataset),
        ``.zarr`` (v2 or v3; an OME-Zarr group opens level ``key`` or 0), ``.n5``
        (``vol.n5:dataset``), ``.tif``/``.tiff`` (one page or many), ``.png``, ``.npy``
        (memory-mapped), a folder of TIFF or PNG slices (naturally sorted), or
        ``precomputed://...`` (needs the ``neuroglancer`` extra). Arrays are wrapped
        without copying.
    key : str, optional
        The dataset inside a container, an OME-Zarr level (``"0"``), or a glob selecting the
        files of a slice folder (``"*.png"``).
    voxel_size_nm : sequence of float, optional
        Overrides the voxel size stated in the file.
    allow_missing_chunks : bool, default False
        zarr only. By default a zarr array with a chunk missing inside its bounds raises a
        :class:`~neuroadda_rt.errors.MissingChunksWarning` naming the first such chunk (zarr reads
        it as the fill value, usually zeros: legal by the spec, and also what a lost chunk looks
        like); ``True`` silences it for a volume that is partial on purpose. Checked once at open
        by listing the array's stored keys; inner chunks of a sharded array are not checked.

    Returns
    -------
    Volume
        Lazy; nothing but metadata is read until it is sliced.

    Raises
    ------
    FormatError
        Unknown format, missing dataset key, truncated or unreadable file (the message names it),
        a zarr chunk missing inside the bounds, or (when sliced) a chunk that fails to decode
        (the message names the chunk and its file).

    Examples
    --------
    >>> v = open_volume("train-image.h5:stack")            # doctest: +SKIP
    >>> tile = v[10, 0:64, 0:64]                           # doctest: +SKIP
    """
    if isinstance(source, Volume):
        return source
    if isinstance(source, np.ndarray) or (hasattr(source, "__array__") and hasattr(source, "shape")
                                          and not isinstance(source, (str, os.PathLike))):
        arr = source if isinstance(source, np.ndarray) else np.asarray(source)
        return Volume(_ArrayBackend(arr), voxel_size_nm=voxel_size_nm)
    s = str(source)
    if s.startswith(("precomputed://", "gs://", "s3://")):
        v = Volume(_CloudVolumeBackend(s), path=s, voxel_size_nm=voxel_size_nm)
        v._reopen = (s, None)
        return v
    if key is None:
        s, key = split_key(s)
    path = Path(s)
    if not path.exists():
        raise FormatError(f"{path}: no such file or folder")
    suf = path.suffix.lower()
    if path.is_file() and suf in H5_SUFFIXES:
        v = _open_h5(path, key)
    elif suf == ".npy":
        v = Volume(_ArrayBackend(_load_npy(path)), path=path)
    elif path.is_file() and suf in TIFF_SUFFIXES:
        v = _open_tiff(path)
    elif path.is_file() and suf in (".png", ".jpg", ".jpeg"):
        img = read_image_2d(path)
        v = Volume(_ArrayBackend(img), path=path)
    elif path.is_dir() and _is_n5(path):
        v = _open_n5(path, key)
    elif path.is_dir() and (suf == ".zarr" or (path / ".zarray").exists() or (path / ".zgroup").exists()
                            or (path / "zarr.json").exists()):
        v = _open_zarr(path, key, allow_missing_chunks)
    elif path.is_dir() and (path / "info").is_file():
        v = Volume(_CloudVolumeBackend("precomputed://file://" + str(path.resolve())), path=path)
    elif path.is_dir():
        v = _open_folder(path, key)
    elif path.is_file() and path.stat().st_size > 0:
        with open(path, "rb") as f:
            magic = f.read(8)
        if magic.startswith(b"\x89HDF"):
            v = _open_h5(path, key)
        elif magic.startswith(b"\x93NUMPY"):
            v = Volume(_ArrayBackend(_load_npy(path)), path=path)
        else:
            raise FormatError(f"{path}: unknown format (expected .h5, .zarr, .n5, .tif, .png, .npy or a folder of slices)")
    else:
        raise FormatError(f"{path}: unknown format or empty file")
    if voxel_size_nm is not None:
        v.voxel_size_nm = tuple(float(x) for x in voxel_size_nm)
        if len(v.voxel_size_nm) != v.ndim:
            raise ShapeError(f"{path}: expected {v.ndim} voxel sizes, got {len(v.voxel_size_nm)}")
    v._reopen = (str(path), key)
    v._allow_missing_chunks = bool(allow_missing_chunks)
    return v


def read_npy_header(path) -> tuple[tuple[int, ...], np.dtype, bool, int]:
    """The header of a ``.npy`` file, checked against the file's size before anything is allocated.

    Returns ``(shape, dtype, fortran_order, data_offset)``. Reads only the header (NumPy's own
    parser, which never evaluates code).

    Raises
    ------
    FormatError
        Not a ``.npy`` file, an unreadable header, an object dtype, or a header that claims more
        data (``prod(shape) * itemsize`` bytes) than the file holds after its header: the file
        is named, with both sizes.
    """
    path = Path(path)
    fmt = np.lib.format
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            version = fmt.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = fmt.read_array_header_1_0(f)
            elif version in ((2, 0), (3, 0)):
                shape, fortran, dtype = fmt.read_array_header_2_0(f)
            else:  # pragma: no cover - read_magic accepts only the versions above today
                raise ValueError(f"unsupported .npy format version {version}")
            offset = f.tell()
    except (ValueError, OSError, EOFError, SyntaxError) as exc:
        raise FormatError(f"{path}: cannot read the .npy header (truncated or not NumPy?): {exc}") from exc
    dtype = np.dtype(dtype)
    if dtype.hasobject:
        raise FormatError(f"{path}: expected a numeric .npy array, got dtype {dtype} (object arrays need pickle, "
                          "which is never loaded)")
    n = 1
    for d in shape:  # Python ints: no overflow, however large the claim
        n *= int(d)
    need = n * dtype.itemsize
    have = size - offset
    if need > have:
        raise FormatError(f"{path}: the .npy header claims shape {tuple(shape)} of {dtype} ({need} bytes of data) "
                          f"but the file holds {have} bytes after its header (truncated or corrupt file)")
    return tuple(int(d) for d in shape), dtype, bool(fortran), int(offset)


def load_npy(path, *, mmap_mode: str | None = None) -> np.ndarray:
    """``np.load`` of a ``.npy`` file whose header was first checked against the file size
    (:func:`read_npy_header`), so that a forged shape is refused before any allocation.

    Raises :class:`FormatError` naming the file for a truncated, corrupt or non-NumPy file.
    """
    path = Path(path)
    read_npy_header(path)
    try:
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise FormatError(f"{path}: cannot read .npy (truncated or not NumPy?): {exc}") from exc


def _load_npy(path: Path):
    return load_npy(path, mmap_mode="r")


