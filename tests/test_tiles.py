"""sample_tiles / grid_tiles / stitch_tiles: determinism, coordinates, masks, coverage."""

from __future__ import annotations

import numpy as np
import pytest

from neuroadda_rt import InputValueError, ShapeError, grid_tiles, open_volume, sample_tiles
from neuroadda_rt.io import write_volume
from neuroadda_rt.tiles import extract_tiles, stitch_tiles


@pytest.fixture
def vol(rng):
    return rng.integers(0, 255, size=(5, 40, 50), dtype=np.uint8)


def test_tiles_match_their_coordinates_2d_and_3d(vol):
    t2 = sample_tiles(vol, 7, (8, 9), seed=3)
    assert t2.tiles.shape == (7, 8, 9) and t2.coords.shape == (7, 3)
    for tile, (z, y, x) in zip(t2.tiles, t2.coords):
        np.testing.assert_array_equal(tile, vol[z, y:y + 8, x:x + 9])
    t3 = sample_tiles(vol, 4, (2, 10, 10), seed=3)
    assert t3.tiles.shape == (4, 2, 10, 10)
    for tile, (z, y, x) in zip(t3.tiles, t3.coords):
        np.testing.assert_array_equal(tile, vol[z:z + 2, y:y + 10, x:x + 10])
    img = sample_tiles(vol[0], 3, 16, seed=0)
    assert img.coords.shape == (3, 2)


def test_deterministic_and_seed_dependent(vol, tmp_path):
    a = sample_tiles(vol, 10, 8, seed=1)
    b = sample_tiles(vol, 10, 8, seed=1)
    c = sample_tiles(vol, 10, 8, seed=2)
    np.testing.assert_array_equal(a.coords, b.coords)
    np.testing.assert_array_equal(a.tiles, b.tiles)
    assert not np.array_equal(a.coords, c.coords)
    # same tiles from a file-backed lazy volume, which reads only the tiles
    write_volume(tmp_path / "v.h5", vol)
    v = open_volume(tmp_path / "v.h5")
    d = sample_tiles(v, 10, 8, seed=1)
    np.testing.assert_array_equal(d.tiles, a.tiles)
    assert v.voxels_read == 10 * 8 * 8


def test_all_positions_reachable(vol):
    t = sample_tiles(vol[0], 4000, (36, 45), seed=0)
    assert t.coords[:, 0].max() == 40 - 36 and t.coords[:, 1].max() == 50 - 45
    assert t.coords.min() == 0


def test_mask_selects_tile_centres(vol):
    mask = np.zeros(vol.shape, bool)
    mask[2, 20, 30] = True
    t = sample_tiles(vol, 5, (6, 8), seed=0, mask=mask)
    assert (t.coords == [2, 20 - 3, 30 - 4]).all()
    mask2d = np.zeros(vol.shape[1:], bool)
    mask2d[10:12, 10:12] = True
    t = sample_tiles(vol, 50, 4, seed=0, mask=mask2d)
    centres = t.coords[:, 1:] + 2
    assert ((centres >= 10) & (centres < 12)).all()
    with pytest.raises(InputValueError, match="empty mask"):
        sample_tiles(vol, 2, 4, seed=0, mask=np.zeros(vol.shape, bool))
    with pytest.raises(ShapeError, match="mask has shape"):
        sample_tiles(vol, 2, 4, seed=0, mask=np.ones((3, 3), bool))


def test_bad_sizes(vol):
    with pytest.raises(ShapeError, match="does not fit"):
        sample_tiles(vol, 1, 64, seed=0)
    with pytest.raises(ShapeError):
        sample_tiles(vol[0], 1, (2, 4, 4), seed=0)


@pytest.mark.parametrize("shape,size,overlap", [((100, 100), 64, 16), ((37, 50), (16, 20), (4, 5)),
                                                ((5, 40, 50), 16, 8), ((6, 40, 50), (4, 16, 16), (1, 4, 4))])
def test_grid_covers_with_overlap(shape, size, overlap):
    g = grid_tiles(shape, size, overlap=overlap)
    tsize = (size,) * 2 if np.isscalar(size) else size
    full = (1,) * (len(shape) - len(tsize)) + tuple(tsize)
    cover = np.zeros(shape, int)
    for c in g:
        assert all(0 <= ci and ci + f <= s for ci, f, s in zip(c, full, shape))
        cover[tuple(slice(ci, ci + f) for ci, f in zip(c, full))] += 1
    assert cover.min() >= 1
    ov = (overlap,) * len(tsize) if np.isscalar(overlap) else overlap
    for ax in range(len(tsize)):  # neighbours along each tiled axis share at least the overlap
        a = len(shape) - len(tsize) + ax
        starts = np.unique(g[:, a])
        if len(starts) > 1:
            assert (np.diff(starts) <= tsize[ax] - ov[ax]).all()


def test_stitch_reconstructs_identity(rng):
    x = rng.random((3, 30, 41)).astype(np.float32)
    g = grid_tiles(x.shape, 16, overlap=6)
    tiles = extract_tiles(x, g, 16)
    for w in ("cosine", "flat"):
        np.testing.assert_allclose(stitch_tiles(tiles, g, x.shape, window=w), x, rtol=1e-5, atol=1e-6)
    with pytest.raises(InputValueError):
        grid_tiles(x.shape, 16, overlap=16)
