"""The QC fold descriptor (``line_ridge``): the C++ kernel against a float64 brute force written from its
definition, its behaviour on a planted fold, and its boundary (typed errors, never a crash)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from neuroadda_rt import _core
from neuroadda_rt.qc.descriptors import _line_contrast, image_stats


def _reflect(c: int, n: int, pad: int) -> int:
    """Column ``c`` (may be outside [0, n)) read with NumPy's 'reflect' padding (edge when pad >= n)."""
    if pad >= n:
        return min(max(c, 0), n - 1)
    return -c if c < 0 else 2 * (n - 1) - c if c >= n else c


def brute_line_ridge(tile: np.ndarray, n_angles: int = 32, offsets=(2, 4, 8)) -> float:
    """Definition, float64, one segment at a time: a straight segment of rows r..r+len-1 whose row y is shifted
    by round((y - h/2) tan θ) columns; its ridge contrast is min(mean at x-k, mean at x+k) - mean at x."""
    h, w = tile.shape
    length = min(max(5, min(41, int(0.3 * min(h, w)) | 1)), min(h, w) - 1)
    best = -math.inf
    for img in (tile.astype(np.float64), tile.T.astype(np.float64)):
        hh, ww = img.shape
        pad = hh // 2 + 1
        for theta in np.linspace(-np.pi / 4, np.pi / 4, n_angles // 2, endpoint=False):
            shift = [int(np.round((y - hh / 2) * math.tan(theta))) for y in range(hh)]
            le = max(3, int(round(length * math.cos(theta))))
            for r in range(hh - le + 1):
                means = [np.mean([img[y, _reflect(shift[y] + x, ww, pad)] for y in range(r, r + le)])
                         for x in range(ww)]
                for k in offsets:
                    for x in range(k, ww - k):
                        if 2 * k < ww:
                            best = max(best, min(means[x - k], means[x + k]) - means[x])
    return best


@pytest.mark.parametrize("shape", [(17, 23), (24, 11), (9, 9), (6, 40)])
def test_line_ridge_matches_the_float64_definition(shape):
    rng = np.random.default_rng(sum(shape))
    tiles = rng.random((3, *shape), dtype=np.float32)
    got = _line_contrast(tiles, n_angles=8)
    want = [brute_line_ridge(t, n_angles=8) for t in tiles]
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)


def test_line_ridge_of_a_tile_does_not_depend_on_its_batch():
    rng = np.random.default_rng(3)
    tiles = rng.random((7, 64, 48), dtype=np.float32)
    batch = _line_contrast(tiles)
    alone = np.concatenate([_line_contrast(t[None]) for t in tiles])
    np.testing.assert_array_equal(batch, alone)


def test_a_planted_fold_raises_line_ridge_and_a_dark_blob_does_not():
    rng = np.random.default_rng(5)
    clean = (0.5 + 0.05 * rng.standard_normal((128, 128))).clip(0, 1).astype(np.float32)
    fold = clean.copy()
    rr, cc = np.mgrid[:128, :128]
    fold[np.abs(rr - 0.4 * cc - 30) < 1.5] *= 0.3  # a long thin dark line, brighter tissue on both sides
    blob = clean.copy()
    blob[40:80, 40:80] *= 0.3  # a dark area: dark neighbours, no ridge
    clean_v, fold_v, blob_v = image_stats(np.stack([clean, fold, blob]))[:, 3]
    assert fold_v > clean_v + 0.15
    assert blob_v < clean_v + 0.05


def _args(n=2, h=10, wp=30, w=20, angles=2):
    return (np.zeros((n, h, wp), np.float32), w, np.full((angles, h), 5, np.int32), np.full(angles, 3, np.int32),
            np.array([2], np.int32))


@pytest.mark.parametrize(("index", "value", "match"), [
    (0, np.zeros((2, 10, 30), np.float64), "expected float32 tiles"),
    (0, np.zeros((2, 30, 10), np.float32)[:, ::3], "C-contiguous"),
    (0, np.zeros((10, 30), np.float32), "3-d tiles"),
    (1, 31, "1 <= w <= padded width"),
    (2, np.full((2, 10), 11, np.int32), "shear offsets in"),
    (2, np.full((2, 10), -1, np.int32), "shear offsets in"),
    (2, np.full((2, 9), 5, np.int32), "shape \\(angles, 10\\)"),
    (2, np.full((2, 10), 5, np.int64), "expected int32 shear offsets"),
    (3, np.array([3, 11], np.int32), "segment lengths in"),
    (3, np.array([3], np.int32), "2 segment lengths"),
    (4, np.array([10], np.int32), "ridge offsets"),
    (4, np.array([0], np.int32), "ridge offsets"),
    (4, np.array([], np.int32), "at least one angle and one offset"),
])
def test_line_ridge_kernel_refuses_bad_input_with_a_typed_error(index, value, match):
    args = list(_args())
    args[index] = value
    with pytest.raises(ValueError, match=match):
        _core._line_ridge(*args)


def test_line_ridge_kernel_of_no_tiles_is_empty():
    args = list(_args(n=0))
    assert _core._line_ridge(*args).shape == (0,)
