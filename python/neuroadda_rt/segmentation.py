"""From network outputs to instance segmentations, and choosing the threshold.

Two representations:

``"boundary"``
    ``probs`` is a boundary probability map (2-D or 3-D, high = membrane). Seeds are the
    connected components of the interior ``probs < threshold`` (or, with
    ``seeds="distance"``, the maxima of its distance transform); a seeded watershed on
    ``probs`` then gives every voxel a segment.
``"affinities"``
    ``probs`` is ``(ndim, *spatial)`` nearest-neighbour affinities in the convention of
    :func:`~neuroadda_rt.labels.instances_to_affinities` (offsets ``-1`` along z, y, x).
    With waterz installed (``pip install 'neuroadda_rt[waterz]'``) the affinities are
    agglomerated by waterz (zwatershed fragments, mean-affinity merging until the merge
    score ``1 - mean affinity`` reaches ``threshold``). Without it, a documented fallback:
    seeds are the connected components of the affinity graph restricted to voxels whose
    mean incident affinity exceeds ``1 - threshold`` and to edges above ``1 - threshold``,
    and a seeded watershed on the derived boundary map (``1 -`` mean incident affinity)
    assigns the remaining voxels.

Both work per 2-D slice (``per_slice=True``, usual for anisotropic ssTEM) or in 3-D (the
default).
A larger threshold always means fewer, larger segments. :func:`tune_threshold` picks it by
variation of information on labelled tiles (never on test data).
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, field

import numpy as np

from .errors import InputValueError, ShapeError, require
from .labels import affinity_offsets, label_interior, relabel_consecutive
from .metrics import variation_of_information

__all__ = ["segment", "tune_threshold", "ThresholdResult", "waterz_available"]

REPRESENTATIONS = ("boundary", "affinities")


def waterz_available() -> bool:
    """Whether waterz imports (the affinity agglomeration backend)."""
    try:
        import waterz  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken build is as good as absent
        return False
    return True


@contextlib.contextmanager
def _quiet_stdout():
    """waterz prints progress from C++ to fd 1; send it to /dev/null for the call."""
    try:
        sys.stdout.flush()
        fd = os.dup(1)
    except (OSError, ValueError):  # no real fd 1 (e.g. some notebooks): just run
        yield
        return
    try:
        with open(os.devnull, "w") as dn:
            os.dup2(dn.fileno(), 1)
            yield
    finally:
        os.dup2(fd, 1)
        os.close(fd)


def _check_probs(p, name="probs"):
    a = np.asarray(p)
    if a.dtype.kind not in "fui":
        raise InputValueError(f"expected a numeric {name} array, got dtype {a.dtype}")
    a = a.astype(np.float32, copy=False)
    if a.size and (not np.isfinite(a).all() or a.min() < 0 or a.max() > 1):
        raise InputValueError(f"expected {name} in [0, 1] without NaN/inf, got range [{np.nanmin(a)}, {np.nanmax(a)}]")
    return a


def _watershed_boundary(bmap, threshold, per_slice, seeds, min_seed_size, seed_distance):
    from scipy import ndimage
    watershed = require("skimage.segmentation", "io").watershed

    def one(b):  # b: 2-D, or 3-D when not per_slice
        interior = b < threshold
        if seeds == "distance":
            dist = ndimage.distance_transform_edt(interior)
            markers_mask = interior & (dist >= max(seed_distance, 1.0))
            # keep for every interior component at least its deepest voxels
            markers = label_interior(markers_mask, per_slice=False) if b.ndim == 3 else label_interior(markers_mask)
        else:
            markers = label_interior(interior, per_slice=False) if b.ndim == 3 else label_interior(interior)
        if min_seed_size > 1 and markers.any():
            fastremap = require("fastremap", "io")
            ids, counts = fastremap.unique(markers, return_counts=True)
            small = ids[(counts < min_seed_size) & (ids != 0)]
            if small.size and small.size < (ids != 0).sum():
                markers = fastremap.mask(markers, small)
        if not markers.any():
            return np.ones(b.shape, np.uint32)  # no interior at all: one segment
        return watershed(b, markers=markers).astype(np.uint32)

    if per_slice and bmap.ndim == 3:
        out = np.zeros(bmap.shape, np.uint64)
        nxt = 0
        for z in range(bmap.shape[0]):
            s = one(bmap[z]).astype(np.uint64)
            out[z] = np.where(s > 0, s + nxt, 0)
            nxt = int(out[z].max())
        return out
    return one(bmap)


def _affinities_to_boundary(affs: np.ndarray) -> np.ndarray:
    """1 - mean affinity over each voxel's incident edges (both directions of each offset)."""
    nd = affs.shape[0]
    acc = np.zeros(affs.shape[1:], np.float32)
    cnt = np.zeros(affs.shape[1:], np.float32)
    for c in range(nd):
        acc += affs[c]
        cnt += 1
        # the edge stored at p (to p - e_c) also touches p - e_c
        lo = [slice(None)] * nd
        hi = [slice(None)] * nd
        lo[c] = slice(None, -1)
        hi[c] = slice(1, None)
        acc[tuple(lo)] += affs[c][tuple(hi)]
        cnt[tuple(lo)] += 1
    return 1.0 - acc / np.maximum(cnt, 1)


def _affinity_components(affs: np.ndarray, node_mask: np.ndarray, edge_min: float) -> np.ndarray:
    """Connected components of the graph whose nodes are ``node_mask`` voxels and whose edges
    are the nearest-neighbour affinities above ``edge_min`` (uint32, 0 off the mask)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    shape = affs.shape[1:]
    n = int(np.prod(shape))
    ids = np.arange(n, dtype=np.int64).reshape(shape)
    rows, cols = [], []
    for c in range(affs.shape[0]):
        hi = [slice(None)] * len(shape)
        lo = [slice(None)] * len(shape)
        hi[c] = slice(1, None)  # p
        lo[c] = slice(None, -1)  # p - e_c
        keep = (affs[c][tuple(hi)] > edge_min) & node_mask[tuple(hi)] & node_mask[tuple(lo)]
        rows.append(ids[tuple(hi)][keep])
        cols.append(ids[tuple(lo)][keep])
    r = np.concatenate(rows)
    c = np.concatenate(cols)
    g = coo_matrix((np.ones(r.size, np.int8), (r, c)), shape=(n, n))
    _, comp = connected_components(g, directed=False)
    comp = comp.reshape(shape).astype(np.int64) + 1
    comp[~node_mask] = 0
    return relabel_consecutive(comp)


def _fallback_affinities(affs: np.ndarray, threshold: float) -> np.ndarray:
    """Affinity segmentation without waterz: seeds are the connected components of the
    affinity graph restricted to interior voxels (mean incident affinity above
    ``1 - threshold``) and to edges with affinity above ``1 - threshold``; a seeded
    watershed on the derived boundary map (``1 -`` mean incident affinity) fills the rest."""
    watershed = require("skimage.segmentation", "io").watershed

    bmap = _affinities_to_boundary(affs)
    interior = bmap < threshold
    markers = _affinity_components(affs, interior, 1.0 - threshold)
    if not markers.any():
        return np.ones(bmap.shape, np.uint32)
    return watershed(bmap, markers=markers).astype(np.uint32)


def _mws(p: np.ndarray, threshold: float, per_slice: bool) -> np.ndarray:
    """Mutex watershed (mwatershed): edges above ``1 - threshold`` attract, below repel."""
    mws = require("mwatershed", "mws")
    w = p.astype(np.float64) - (1.0 - threshold)
    if p.ndim == 4 and per_slice:
        out = np.zeros(p.shape[1:], np.uint64)
        nxt = 0
        for z in range(p.shape[1]):
            s = relabel_consecutive(np.asarray(mws.agglom(np.ascontiguousarray(w[1:, z]), affinity_offsets(2))))
            out[z] = s.astype(np.uint64) + nxt
            nxt = int(out[z].max())
        return relabel_consecutive(out)
    return relabel_consecutive(np.asarray(mws.agglom(np.ascontiguousarray(w), affinity_offsets(p.ndim - 1))))


def _waterz(affs3: np.ndarray, threshold: float) -> np.ndarray:
    waterz = require("waterz", "waterz")
    a = np.ascontiguousarray(affs3, dtype=np.float32)
    with _quiet_stdout():
        seg = next(iter(waterz.agglomerate(a, [float(threshold)])))
    return np.array(seg, copy=True)


def segment(probs, representation: str, *, threshold: float = 0.5, per_slice: bool | None = None,
            method: str = "auto", seeds: str = "components", min_seed_size: int = 0,
            seed_distance: float = 2.0) -> np.ndarray:
    """Instance segmentation from a boundary map or affinities.

    Parameters
    ----------
    probs : numpy.ndarray
        ``"boundary"``: (h, w) or (z, h, w) probabilities, high = membrane.
        ``"affinities"``: (2, h, w) or (3, z, h, w), the z/y/x affinities to the previous
        voxel. Values in [0, 1]; not modified.
    representation : {"boundary", "affinities"}
    threshold : float
        Boundary: interior is ``probs < threshold``. Affinities: the waterz merge threshold
        (or, in the fallback, the boundary threshold). Larger → fewer, larger segments.
    per_slice : bool, optional
        Segment each z slice on its own (ids stay unique across slices). Default: 3-D.
    method : {"auto", "waterz", "mws", "fallback"}
        Affinities only: ``"auto"`` uses waterz when installed, else the fallback; ``"mws"``
        is the mutex watershed of mwatershed (``pip install 'neuroadda_rt[mws]'``) on the
        nearest-neighbour edges, weights ``affinity - (1 - threshold)``.
    seeds : {"components", "distance"}
        Boundary seeds: interior components, or interior voxels at least
        ``seed_distance`` from the boundary (splits touching cells; fewer false merges).
    min_seed_size : int
        Seeds smaller than this are dropped (their voxels are flooded by neighbours).

    Returns
    -------
    numpy.ndarray
        uint32 instance ids, consecutive from 1 (every voxel is assigned); a new array.

    Examples
    --------
    >>> b = np.zeros((5, 5), np.float32); b[:, 2] = 1
    >>> segment(b, "boundary", threshold=0.5)[0].tolist()
    [1, 1, 1, 2, 2]
    """
    if representation not in REPRESENTATIONS:
        raise InputValueError(f"expected representation in {REPRESENTATIONS}, got {representation!r}")
    if not 0.0 <= float(threshold) <= 1.0:
        raise InputValueError(f"expected threshold in [0, 1], got {threshold}")
    if seeds not in ("components", "distance"):
        raise InputValueError(f"expected seeds 'components' or 'distance', got {seeds!r}")
    p = _check_probs(probs)
    per_slice = bool(per_slice)
    if representation == "boundary":
        if p.ndim not in (2, 3):
            raise ShapeError(f"expected a 2-D or 3-D boundary map, got shape {p.shape}")
        seg = _watershed_boundary(p, float(threshold), per_slice, seeds, int(min_seed_size), float(seed_distance))
        return relabel_consecutive(seg)

    if p.ndim not in (3, 4) or p.shape[0] != p.ndim - 1:
        raise ShapeError(f"expected affinities of shape (2, h, w) or (3, z, h, w), got {p.shape}")
    if method not in ("auto", "waterz", "mws", "fallback"):
        raise InputValueError(f"expected method 'auto', 'waterz', 'mws' or 'fallback', got {method!r}")
    if method == "mws":
        return _mws(p, float(threshold), per_slice)
    use_waterz = method == "waterz" or (method == "auto" and waterz_available())
    if not use_waterz:
        if p.ndim == 4 and per_slice:  # in-plane edges only, ids unique across slices
            out = np.zeros(p.shape[1:], np.uint64)
            nxt = 0
            for z in range(p.shape[1]):
                sz = _fallback_affinities(p[1:, z], float(threshold)).astype(np.uint64)
                out[z] = sz + nxt
                nxt = int(out[z].max())
            return relabel_consecutive(out)
        return relabel_consecutive(_fallback_affinities(p, float(threshold)))
    if p.ndim == 3:  # 2-D: waterz wants (3, z, y, x); no z edges
        a3 = np.concatenate([np.zeros((1, 1, *p.shape[1:]), np.float32), p[:, None]], axis=0)
        return relabel_consecutive(_waterz(a3, threshold)[0])
    if per_slice:
        out = np.zeros(p.shape[1:], np.uint64)
        nxt = 0
        for z in range(p.shape[1]):
            a3 = np.concatenate([np.zeros((1, 1, *p.shape[2:]), np.float32), p[1:, z][:, None]], axis=0)
            s = _waterz(a3, threshold)[0].astype(np.uint64)
            s = relabel_consecutive(s).astype(np.uint64)
            out[z] = np.where(s > 0, s + nxt, 0)
            nxt = int(out[z].max())
        return relabel_consecutive(out)
    return relabel_consecutive(_waterz(p, threshold))


# ----------------------------------------------------------------------------- tuning
def _vi(seg: np.ndarray, gt: np.ndarray, ignore_zero: bool) -> float:
    """Variation of information (split + merge, bits), ignoring ground-truth 0 if asked."""
    return float(sum(variation_of_information(seg, gt, ignore_gt=(0,) if ignore_zero else ())))


@dataclass
class ThresholdResult:
    """The chosen threshold and the VI of every candidate (summed over the tiles)."""

    threshold: float
    vi: float
    scores: dict = field(default_factory=dict)


def tune_threshold(probs, labels, representation: str, thresholds=None, *, ignore_zero: bool = True,
                   **segment_kwargs) -> ThresholdResult:
    """Choose the segmentation threshold that minimises VI on labelled tiles.

    Use it on the annotated/training tiles only, never on the test data.

    Parameters
    ----------
    probs : numpy.ndarray or list of numpy.ndarray
        One prediction (as for :func:`segment`) or a list of tile predictions.
    labels : numpy.ndarray or list of numpy.ndarray
        The matching ground-truth instances (0 = unlabelled/boundary).
    representation : {"boundary", "affinities"}
    thresholds : sequence of float, optional
        Candidates (default ``0.05, 0.10, ..., 0.95``).
    ignore_zero : bool
        Ignore ground-truth label 0 in the VI (membranes are not scored).
    **segment_kwargs
        Passed to :func:`segment` (``per_slice``, ``method``, ``seeds``, ...).

    Returns
    -------
    ThresholdResult
        ``threshold``, its summed ``vi``, and ``scores`` {threshold: summed VI}. Ties go
        to the smaller threshold.

    Examples
    --------
    >>> gt = np.array([[1, 1, 0, 2, 2]] * 4, np.uint32)
    >>> from neuroadda_rt.labels import instances_to_boundary
    >>> b = instances_to_boundary(gt).astype(np.float32)
    >>> tune_threshold(b, gt, "boundary", [0.5]).vi
    0.0
    """
    if isinstance(probs, np.ndarray) and not isinstance(labels, (list, tuple)):
        probs_l, labels_l = [probs], [labels]
    else:
        probs_l, labels_l = list(probs), list(labels)
    if len(probs_l) != len(labels_l) or not probs_l:
        raise ShapeError(f"expected as many label tiles as prediction tiles (>= 1), got {len(labels_l)} and {len(probs_l)}")
    for i, (p, g) in enumerate(zip(probs_l, labels_l)):
        sp = np.shape(p)[1:] if representation == "affinities" else np.shape(p)
        if tuple(sp) != tuple(np.shape(g)):
            raise ShapeError(f"tile {i}: labels have shape {np.shape(g)}, expected the prediction's spatial shape {tuple(sp)}")
    cand = [round(0.05 * k, 2) for k in range(1, 20)] if thresholds is None else [float(t) for t in thresholds]
    if not cand:
        raise InputValueError("expected at least one candidate threshold, got none")
    scores = {}
    for t in cand:
        scores[t] = float(sum(_vi(segment(p, representation, threshold=t, **segment_kwargs), np.asarray(g), ignore_zero)
                              for p, g in zip(probs_l, labels_l)))
    best = min(cand, key=lambda t: (scores[t], t))
    return ThresholdResult(threshold=best, vi=scores[best], scores=scores)
