"""Label conversions against brute-force references (BFS connected components, explicit
neighbour loops)."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest

from neuroadda_rt import DTypeError, ShapeError
from neuroadda_rt.labels import (instances_to_affinities, instances_to_boundary, label_interior,
                                 membrane_to_instances, relabel_consecutive)


def bfs_components(fg: np.ndarray) -> np.ndarray:
    """Reference 4-connected (2-D) / 6-connected (3-D) components by breadth-first search."""
    out = np.zeros(fg.shape, np.int64)
    nxt = 0
    steps = [tuple(s * (i == j) for j in range(fg.ndim)) for i in range(fg.ndim) for s in (-1, 1)]
    for start in zip(*np.nonzero(fg)):
        if out[start]:
            continue
        nxt += 1
        out[start] = nxt
        q = deque([start])
        while q:
            p = q.popleft()
            for s in steps:
                n = tuple(a + b for a, b in zip(p, s))
                if all(0 <= c < m for c, m in zip(n, fg.shape)) and fg[n] and not out[n]:
                    out[n] = nxt
                    q.append(n)
    return out


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to renaming of ids (0 must map to 0)."""
    if not np.array_equal(a == 0, b == 0):
        return False
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return len(np.unique(pairs[0])) == pairs.shape[1] == len(np.unique(pairs[1]))


@pytest.mark.parametrize("shape", [(31, 29), (4, 13, 17)])
def test_label_interior_matches_bfs(rng, shape):
    fg = rng.random(shape) > 0.45
    got = label_interior(fg, per_slice=False)
    assert got.dtype == np.uint32
    assert same_partition(got, bfs_components(fg))
    if len(shape) == 3:
        per = label_interior(fg, per_slice=True)
        ref = np.zeros(shape, np.int64)
        off = 0
        for z in range(shape[0]):
            r = bfs_components(fg[z])
            ref[z] = np.where(r > 0, r + off, 0)
            off = ref[z].max()
        assert same_partition(per, ref)


def test_membrane_to_instances_polarities(rng):
    memb = rng.random((3, 20, 20)) > 0.6
    ref = np.zeros(memb.shape, np.int64)
    off = 0
    for z in range(3):
        r = bfs_components(~memb[z])
        ref[z] = np.where(r > 0, r + off, 0)
        off = ref[z].max()
    as_bool = membrane_to_instances(memb)
    isbi = membrane_to_instances(np.where(memb, 0, 255).astype(np.uint8), membrane_value=0)
    bright = membrane_to_instances(np.where(memb, 255, 0).astype(np.uint8))
    for got in (as_bool, isbi, bright):
        assert got.dtype == np.uint32 and same_partition(got, ref)
        assert np.array_equal(np.unique(got), np.arange(got.max() + 1))  # consecutive


def test_small_fragments_merge_into_nearest_neighbour():
    memb = np.zeros((9, 12), bool)
    memb[:, 5] = True          # wall between two big cells
    memb[3:6, 7:10] = True     # a ring enclosing a 1-pixel fragment at (4, 8)
    memb[4, 8] = False
    lab = membrane_to_instances(memb, min_size=2)
    assert lab[4, 8] == lab[0, 11] != lab[0, 0]   # fragment joined the right-hand cell
    assert lab.max() == 2 and (lab[memb] == 0).all()
    assert membrane_to_instances(memb).max() == 3


def test_boundary_against_loops(rng):
    lab = rng.integers(0, 4, size=(3, 7, 8)).astype(np.uint32)
    for per_slice in (False, True):
        ref = np.zeros(lab.shape, bool)
        for p in np.ndindex(*lab.shape):
            if lab[p] == 0:
                ref[p] = True
            for ax in range(3):
                if per_slice and ax == 0:
                    continue
                for s in (-1, 1):
                    q = list(p)
                    q[ax] += s
                    if 0 <= q[ax] < lab.shape[ax] and lab[tuple(q)] != lab[p]:
                        ref[p] = True
        np.testing.assert_array_equal(instances_to_boundary(lab, per_slice=per_slice), ref)
    wide = instances_to_boundary(np.array([[1, 1, 1, 1, 2, 2, 2, 2]], np.uint8), width=2)
    assert wide.astype(int).tolist() == [[0, 0, 1, 1, 1, 1, 0, 0]]


def test_affinities_against_loops(rng):
    lab = rng.integers(0, 3, size=(3, 6, 5)).astype(np.int32)
    offs = [(-1, 0, 0), (0, -1, 0), (0, 0, -1), (0, 2, -3)]
    aff = instances_to_affinities(lab, offs)
    assert aff.shape == (4, 3, 6, 5) and aff.dtype == np.float32
    for c, o in enumerate(offs):
        for p in np.ndindex(*lab.shape):
            q = tuple(a + b for a, b in zip(p, o))
            inside = all(0 <= x < n for x, n in zip(q, lab.shape))
            want = float(inside and lab[p] == lab[q] and lab[p] != 0)
            assert aff[(c, *p)] == want, (c, p)
    assert instances_to_affinities(lab[0]).shape == (2, 6, 5)


def test_relabel_and_errors():
    a = np.array([[5, 5, 0], [9, 2, 2]], np.int64)
    r = relabel_consecutive(a)
    assert r.dtype == np.uint32 and same_partition(r, a) and r.max() == 3
    assert a[0, 0] == 5  # input untouched
    with pytest.raises(DTypeError):
        relabel_consecutive(np.zeros(3, np.float32))
    with pytest.raises(ShapeError):
        instances_to_affinities(np.zeros(3, np.uint8))
