"""Label conventions and conversions.

The real sets come as dense instances (0 = boundary/unlabelled) or as binary membrane
masks with either polarity. Everything here returns new arrays (inputs are never modified)
and uses connected-components-3d and fastremap for the heavy lifting.

- :func:`membrane_to_instances`: membrane mask → instances (connected components of the
  interior, per 2-D slice by default; fragments below ``min_size`` merged into the
  neighbouring segment they are closest to; membranes stay 0).
- :func:`instances_to_boundary`: instances → bool boundary target.
- :func:`instances_to_affinities`: instances → float32 nearest-neighbour affinities.
- :func:`relabel_consecutive`: ids → 1..n (0 kept), uint32.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .errors import DTypeError, InputValueError, ShapeError, require

__all__ = [
    "membrane_to_instances",
    "instances_to_boundary",
    "instances_to_affinities",
    "affinity_offsets",
    "relabel_consecutive",
    "label_interior",
]


def relabel_consecutive(labels, *, keep_zero: bool = True) -> np.ndarray:
    """Renumber ids to ``1..n`` in order of first appearance (0 stays 0 when ``keep_zero``).

    Returns a new uint32 array (uint64 if there are more than 2**32-1 segments).

    Examples
    --------
    >>> relabel_consecutive(np.array([0, 7, 7, 3])).tolist()
    [0, 1, 1, 2]
    """
    fastremap = require("fastremap", "io")
    a = np.asarray(labels)
    if a.dtype.kind not in "ui":
        raise DTypeError(f"expected integer labels, got dtype {a.dtype}")
    if a.dtype.kind == "i" and a.size and a.min() < 0:
        raise InputValueError(f"expected non-negative labels, got minimum {a.min()}")
    out, _ = fastremap.renumber(np.array(a, copy=True, order="C"), preserve_zero=keep_zero, in_place=True)
    if out.size and int(out.max()) < 2**32:
        return out.astype(np.uint32, copy=False)
    return out.astype(np.uint64, copy=False)


def label_interior(interior, *, per_slice: bool = True, connectivity: int | None = None) -> np.ndarray:
    """Connected components of a bool foreground (uint32; 0 = background), unique ids over the
    whole volume. ``per_slice=True`` labels each 2-D slice of a 3-D array separately
    (4-connectivity by default); otherwise 3-D (6-connectivity)."""
    cc3d = require("cc3d", "io")
    m = np.ascontiguousarray(np.asarray(interior, dtype=bool))
    if m.ndim == 2:
        return cc3d.connected_components(m, connectivity=connectivity or 4).astype(np.uint32, copy=False)
    if m.ndim != 3:
        raise ShapeError(f"expected a 2-D or 3-D mask, got shape {m.shape}")
    if not per_slice:
        return cc3d.connected_components(m, connectivity=connectivity or 6).astype(np.uint32, copy=False)
    out = np.zeros(m.shape, np.uint32)
    nxt = 0
    for z in range(m.shape[0]):
        lab = cc3d.connected_components(m[z], connectivity=connectivity or 4).astype(np.uint32, copy=False)
        k = int(lab.max())
        out[z] = np.where(lab > 0, lab + nxt, 0)
        nxt += k
    return out


def membrane_to_instances(mask, *, membrane_value=None, min_size: int = 0, per_slice: bool = True,
                          connectivity: int | None = None) -> np.ndarray:
    """Instances from a binary membrane mask.

    Parameters
    ----------
    mask : array-like
        2-D or 3-D. Bool (True = membrane), or an image where ``membrane_value`` marks the
        membrane (e.g. ``0`` for ISBI 2012, where 255 = interior). Other numeric masks:
        nonzero = membrane unless ``membrane_value`` is given.
    membrane_value : scalar, optional
        The value that means membrane (polarity). Ignored for bool masks.
    min_size : int
        Fragments with fewer voxels (per slice when ``per_slice``) are merged into the
        nearest large segment (by Euclidean distance, so across the membrane that cut them
        off); if every fragment is small they are kept.
    per_slice : bool
        Components per 2-D slice (the convention of the 2-D data sets) or in 3-D.
    connectivity : int, optional
        cc3d connectivity (default 4 in 2-D, 6 in 3-D).

    Returns
    -------
    numpy.ndarray
        uint32 instances, consecutive ids, 0 on the membrane. A new array.

    Examples
    --------
    >>> m = np.array([[255, 0, 255], [255, 0, 255]], np.uint8)
    >>> membrane_to_instances(m, membrane_value=0).tolist()
    [[1, 0, 2], [1, 0, 2]]
    """
    a = np.asarray(mask)
    if a.ndim not in (2, 3):
        raise ShapeError(f"expected a 2-D or 3-D membrane mask, got shape {a.shape}")
    if a.dtype == bool:
        memb = a
    elif membrane_value is not None:
        memb = a == membrane_value
    else:
        memb = a != 0
    lab = label_interior(~memb, per_slice=per_slice, connectivity=connectivity)
    if min_size > 0 and lab.any():
        fastremap = require("fastremap", "io")
        slices = [lab[z] for z in range(lab.shape[0])] if (per_slice and lab.ndim == 3) else [lab]
        for sl in slices:  # views: edits land in lab
            ids, counts = fastremap.unique(sl, return_counts=True)
            small = ids[(counts < min_size) & (ids != 0)]
            if small.size == 0 or small.size == (ids != 0).sum():
                continue
            is_small = np.isin(sl, small)
            big = (sl != 0) & ~is_small
            # nearest big-segment voxel for every voxel; only small fragments take it
            idx = ndimage.distance_transform_edt(~big, return_distances=False, return_indices=True)
            sl[is_small] = sl[tuple(i[is_small] for i in idx)]
    return relabel_consecutive(lab)


def instances_to_boundary(labels, *, per_slice: bool = False, width: int = 1,
                          zero_is_boundary: bool = True) -> np.ndarray:
    """Boundary target from instances: True where a voxel's neighbour has another id.

    Parameters
    ----------
    labels : array-like of int
        2-D or 3-D instances.
    per_slice : bool
        For 3-D labels, only in-plane neighbours (default False: z neighbours too).
    width : int
        Dilate the boundary by ``width - 1`` voxels (in-plane when ``per_slice``).
    zero_is_boundary : bool
        Label 0 (membrane/unlabelled) counts as boundary.

    Returns
    -------
    numpy.ndarray
        bool, same shape; a new array.

    Examples
    --------
    >>> instances_to_boundary(np.array([[1, 1, 2, 2]])).astype(int).tolist()
    [[0, 1, 1, 0]]
    """
    a = np.asarray(labels)
    if a.dtype.kind not in "ui":
        raise DTypeError(f"expected integer labels, got dtype {a.dtype}")
    if a.ndim not in (2, 3):
        raise ShapeError(f"expected 2-D or 3-D labels, got shape {a.shape}")
    axes = range(a.ndim) if not (per_slice and a.ndim == 3) else (1, 2)
    b = np.zeros(a.shape, bool)
    for ax in axes:
        lo = [slice(None)] * a.ndim
        hi = [slice(None)] * a.ndim
        lo[ax] = slice(None, -1)
        hi[ax] = slice(1, None)
        d = a[tuple(lo)] != a[tuple(hi)]
        b[tuple(lo)] |= d
        b[tuple(hi)] |= d
    if zero_is_boundary:
        b |= a == 0
    if width > 1:
        st = ndimage.generate_binary_structure(a.ndim, 1)
        if per_slice and a.ndim == 3:
            st[0] = st[2] = False
        b = ndimage.binary_dilation(b, st, iterations=width - 1)
    return b


def affinity_offsets(ndim: int) -> list[tuple[int, ...]]:
    """Nearest-neighbour offsets, z first: ``[(-1,0,0),(0,-1,0),(0,0,-1)]`` in 3-D,
    ``[(-1,0),(0,-1)]`` in 2-D (the waterz/zwatershed convention)."""
    if ndim not in (2, 3):
        raise ShapeError(f"expected ndim 2 or 3, got {ndim}")
    return [tuple(-1 if i == j else 0 for i in range(ndim)) for j in range(ndim)]


def instances_to_affinities(labels, offsets=None) -> np.ndarray:
    """Affinity targets: ``aff[c, p] = 1`` when ``labels[p] == labels[p + offsets[c]] != 0``.

    Parameters
    ----------
    labels : array-like of int
        2-D or 3-D instances (0 = boundary: no affinity to anything).
    offsets : list of tuple, optional
        Default :func:`affinity_offsets` (negative nearest neighbours). Voxels whose
        partner falls outside the volume get 0.

    Returns
    -------
    numpy.ndarray
        float32 ``(len(offsets), *labels.shape)``; a new array.

    Examples
    --------
    >>> instances_to_affinities(np.array([[1, 1, 2]]))[1].tolist()
    [[0.0, 1.0, 0.0]]
    """
    a = np.asarray(labels)
    if a.dtype.kind not in "ui":
        raise DTypeError(f"expected integer labels, got dtype {a.dtype}")
    if a.ndim not in (2, 3):
        raise ShapeError(f"expected 2-D or 3-D labels, got shape {a.shape}")
    offsets = affinity_offsets(a.ndim) if offsets is None else [tuple(int(o) for o in off) for off in offsets]
    out = np.zeros((len(offsets), *a.shape), np.float32)
    for c, off in enumerate(offsets):
        if len(off) != a.ndim:
            raise ShapeError(f"expected offsets of length {a.ndim}, got {off}")
        dst, src = [], []
        for o, n in zip(off, a.shape):
            if abs(o) >= n:
                break
            dst.append(slice(max(0, -o), n - max(0, o)))
            src.append(slice(max(0, o), n - max(0, -o)))
        else:
            p = a[tuple(dst)]
            q = a[tuple(src)]
            out[(c, *dst)] = ((p == q) & (p != 0)).astype(np.float32)
    return out
