"""The workflow: annotation hand-off and its checked read-back, held-out tile exclusion, and
run_workflow end to end on a small synthetic target with a small package zoo."""

from __future__ import annotations

import json

import numpy as np
import pytest

from neuroadda_rt.errors import FormatError, ShapeError
from neuroadda_rt.selection import TileSelection
from neuroadda_rt.workflow import _exclusion_mask, read_annotation, write_annotation

tifffile = pytest.importorskip("tifffile")


def _selection(coords, size=16, rng=None):
    rng = rng or np.random.default_rng(0)
    coords = np.asarray(coords, dtype=np.int64)
    tiles = rng.integers(0, 255, (len(coords), size, size), dtype=np.uint8)
    return TileSelection(coords=coords, scores=rng.uniform(size=len(coords)), pool_coords=coords,
                         pool_scores=rng.uniform(size=len(coords)), indices=np.arange(len(coords)), tile_size=size,
                         strategy="median", measure="entropy",
                         settings={"model": {"name": "m", "path": "/nowhere/m"}, "target": {"path": "t.tif"}},
                         tiles=tiles)


def _paint(ann, sel, *, dtype=np.uint16):
    labels = []
    for i, name in enumerate(sorted(p.stem for p in (ann / "images").iterdir())):
        lab = (np.arange(sel.tile_size * sel.tile_size).reshape(sel.tile_size, -1) // 40 + i).astype(dtype)
        tifffile.imwrite(ann / "labels" / f"{name}.tif", lab)
        labels.append(lab)
    return labels


def test_annotation_roundtrip(tmp_path):
    sel = _selection([[0, 5, 7], [2, 30, 1], [1, 0, 0]])
    ann = write_annotation(sel, tmp_path / "ann")
    names = sorted(p.name for p in (ann / "images").iterdir())
    assert names == ["tile_000_z0_y5_x7.tif", "tile_001_z2_y30_x1.tif", "tile_002_z1_y0_x0.tif"]
    stack = tifffile.imread(ann / "tiles.tif")
    np.testing.assert_array_equal(stack, sel.tiles)
    csv = (ann / "tiles.csv").read_text().splitlines()
    assert csv[0] == "name,z,y,x,height,width,uncertainty"
    assert csv[2].startswith("tile_001_z2_y30_x1,2,30,1,16,16,")
    meta = json.loads((ann / "tiles.json").read_text())
    assert [t["coords"] for t in meta["tiles"]] == sel.coords.tolist()
    painted = _paint(ann, sel)
    images, labels, meta = read_annotation(ann)
    np.testing.assert_array_equal(images, sel.tiles)
    np.testing.assert_array_equal(labels, np.stack(painted))
    assert labels.dtype == np.uint32


def test_annotation_labels_as_one_stack(tmp_path):
    sel = _selection([[4, 4], [40, 40]])
    ann = write_annotation(sel, tmp_path / "ann")
    lab = np.stack([np.full((16, 16), 3, np.uint8), np.eye(16, dtype=np.uint8)])
    tifffile.imwrite(ann / "labels" / "tiles.tif", lab, photometric="minisblack")
    _, labels, _ = read_annotation(ann)
    np.testing.assert_array_equal(labels, lab)


def test_annotation_mismatches_are_refused(tmp_path):
    sel = _selection([[0, 5, 7], [2, 30, 1]])
    ann = write_annotation(sel, tmp_path / "ann")
    with pytest.raises(FileNotFoundError, match="no label for tile tile_000_z0_y5_x7"):
        read_annotation(ann)
    _paint(ann, sel)
    # a label whose coordinates are not in the selection
    tifffile.imwrite(ann / "labels" / "tile_001_z2_y31_x1.tif", np.zeros((16, 16), np.uint8))
    with pytest.raises(FormatError, match="does not match any selected tile"):
        read_annotation(ann)
    (ann / "labels" / "tile_001_z2_y31_x1.tif").unlink()
    # wrong shape
    tifffile.imwrite(ann / "labels" / "tile_001_z2_y30_x1.tif", np.zeros((16, 15), np.uint8))
    with pytest.raises(ShapeError, match=r"label has shape \(16, 15\), expected \(16, 16\)"):
        read_annotation(ann)
    # non-integer labels
    tifffile.imwrite(ann / "labels" / "tile_001_z2_y30_x1.tif", np.full((16, 16), 0.5, np.float32))
    with pytest.raises(FormatError, match="integer instance labels"):
        read_annotation(ann)
    tifffile.imwrite(ann / "labels" / "tile_001_z2_y30_x1.tif", np.ones((16, 16), np.float32))
    read_annotation(ann)  # integral floats (Fiji's 32-bit) are fine
    # a tile image swapped for another one
    tifffile.imwrite(ann / "images" / "tile_000_z0_y5_x7.tif", sel.tiles[1])
    with pytest.raises(FormatError, match="checksum"):
        read_annotation(ann)
    with pytest.raises(FileNotFoundError, match="annotation folder"):
        read_annotation(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="tiles.json"):
        read_annotation(tmp_path)


def test_exclusion_mask_matches_brute_force():
    size, shape = 8, (2, 40, 50)
    chosen = np.array([[0, 10, 3], [1, 30, 40]])
    mask = _exclusion_mask(shape, chosen, size)
    h = size // 2
    for z in range(shape[0]):
        for y in range(shape[1] - size + 1):
            for x in range(shape[2] - size + 1):
                overlaps = any(z == c[0] and abs(y - c[1]) < size and abs(x - c[2]) < size for c in chosen)
                assert mask[z, y + h, x + h] == (not overlaps), (z, y, x)
