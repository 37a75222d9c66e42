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
    lab = np.stack([np.tri(16, dtype=np.uint8) + 3, np.eye(16, dtype=np.uint8)])
    tifffile.imwrite(ann / "labels" / "tiles.tif", lab, photometric="minisblack")
    _, labels, _ = read_annotation(ann)
    np.testing.assert_array_equal(labels, lab)


def test_annotation_mismatches_are_refused(tmp_path):
    sel = _selection([[0, 5, 7], [2, 30, 1]])
    ann = write_annotation(sel, tmp_path / "ann")
    # Issue 19/15: every missing tile is named, not just the first
    with pytest.raises(FileNotFoundError, match=r"no label for tiles tile_000_z0_y5_x7, tile_001_z2_y30_x1 in .*"
                                                r"\(2 of 2 missing"):
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
    with pytest.raises(FormatError, match="integer label ids"):
        read_annotation(ann)
    # Issue 19/15: an all-ones float label (a mask saved as 32-bit) was accepted as an annotation
    tifffile.imwrite(ann / "labels" / "tile_001_z2_y30_x1.tif", np.ones((16, 16), np.float32))
    with pytest.raises(FormatError, match=r"tile_001_z2_y30_x1.tif: one value \(1\) everywhere: nothing was painted"):
        read_annotation(ann)
    tifffile.imwrite(ann / "labels" / "tile_001_z2_y30_x1.tif", np.tri(16, dtype=np.float32) * 2)
    read_annotation(ann)  # integral floats (Fiji's 32-bit) are fine
    # Issue 19/15: several problems are reported in one run, each naming its file
    tifffile.imwrite(ann / "labels" / "tile_001_z2_y30_x1.tif", np.zeros((16, 15), np.uint8))
    tifffile.imwrite(ann / "labels" / "tile_000_z0_y5_x7.tif", np.zeros((16, 16), np.uint8))
    with pytest.raises(FormatError, match="2 problems") as info:
        read_annotation(ann)
    assert "tile_000_z0_y5_x7.tif: one value (0)" in str(info.value)
    assert "tile_001_z2_y30_x1.tif: label has shape (16, 15)" in str(info.value)
    _paint(ann, sel)
    # a tile image swapped for another one
    tifffile.imwrite(ann / "images" / "tile_000_z0_y5_x7.tif", sel.tiles[1])
    with pytest.raises(FormatError, match="checksum"):
        read_annotation(ann)
    with pytest.raises(FileNotFoundError, match="annotation folder"):
        read_annotation(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="tiles.json"):
        read_annotation(tmp_path)


def test_annotation_readme_names_real_files_and_folder(tmp_path):
    # Issue 19/15: README.txt showed a file-name pattern that matched no file and a literal "{this folder}".
    sel = _selection([[0, 5, 7], [2, 30, 1]])
    ann = write_annotation(sel, tmp_path / "my ann")
    text = (ann / "README.txt").read_text()
    first = sorted(p.stem for p in (ann / "images").iterdir())[0]
    assert f"images/{first}.tif -> labels/{first}.tif" in text
    assert "{" not in text and "}" not in text
    assert f"finetune '{ann.resolve()}' --labels '{ann.resolve() / 'labels'}'" in text


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


# --------------------------------------------------------------------------------------------
# run_workflow end to end (small zoo, tiny training)
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("torch")
    import _workflow_zoo as wz

    return wz.shared_zoo(tmp_path_factory)


@pytest.fixture(scope="module")
def target():
    import _workflow_zoo as wz

    return wz.volume(wz.domains()[1], seed=700, shape=(2, 128, 128))


KW = dict(n=3, tile_size=32, n_tiles=16, pool=24, n_permutations=20)


def test_run_workflow_without_labels_writes_the_hand_off(zoo, target, tmp_path):
    from neuroadda_rt.workflow import run_workflow

    img, _ = target
    res = run_workflow(img, zoo, out_dir=tmp_path / "run", cache_dir=tmp_path / "cache", **KW)
    assert res.status == "awaiting_labels" and res.finetuned is None
    assert res.ranking[0].name == "near_b"
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["status"] == "awaiting_labels" and run["best"]["name"] == "near_b"
    ann = tmp_path / "run" / "annotation"
    assert len(list((ann / "images").iterdir())) == 3 and (ann / "labels").is_dir()
    for t in json.loads((ann / "tiles.json").read_text())["tiles"]:
        z, y, x = t["coords"]
        np.testing.assert_array_equal(tifffile.imread(ann / "images" / f"{t['name']}.tif"), img[z, y:y + 32, x:x + 32])
    assert "waiting for labels" in res.report.read_text()
    # deterministic for a seed (and the second ranking comes from the feature cache)
    again = run_workflow(img, zoo, out_dir=tmp_path / "run2", cache_dir=tmp_path / "cache", report=False, **KW)
    np.testing.assert_array_equal(again.selection.coords, res.selection.coords)
    assert all(e.cached for e in again.ranking)


def test_run_workflow_with_oracle_labels(zoo, target, tmp_path):
    import neuroadda_rt as nr
    from neuroadda_rt.workflow import _label_tiles, run_workflow

    img, lab = target
    train = {"steps": 2, "batch_size": 2, "patch_size": 32}
    res = run_workflow(img, zoo, labels=lab, out_dir=tmp_path / "run", train=train, n_test=3, cache_dir=False, **KW)
    assert res.status == "complete"
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    for key in ("finetuned", "scratch", "source"):
        o = run["evaluation"][key]["overall"]
        assert o["vi_total"] == pytest.approx(o["vi_split"] + o["vi_merge"])
        assert len(run["evaluation"][key]["per_image"]) == 3
    assert run["vi_reduction"] == pytest.approx(1 - run["evaluation"]["finetuned"]["overall"]["vi_total"]
                                                / run["evaluation"]["scratch"]["overall"]["vi_total"])
    assert len(run["training"]["finetuned"]["loss"]) == 2 and len(run["training"]["scratch"]["loss"]) == 2
    ft, sc = nr.load_model(tmp_path / "run" / "models" / "finetuned"), nr.load_model(tmp_path / "run/models/scratch")
    assert ft.metadata["training"]["mode"] == "finetune" and sc.metadata["training"]["mode"] == "scratch"
    assert ft.metadata["training"]["source_model"]["name"] == "near_b"
    # the same annotated tiles for both, and held-out tiles that overlap none of them
    np.testing.assert_array_equal(np.load(tmp_path / "run" / "annotation" / "label_tiles.npy"),
                                  np.stack([lab[z, y:y + 32, x:x + 32] for z, y, x in res.selection.coords]))
    for tz, ty, tx in run["test"]["coords"]:
        for z, y, x in res.selection.coords:
            assert not (tz == z and abs(ty - y) < 32 and abs(tx - x) < 32)
    text = res.report.read_text()
    for fig in ("fig-ranking", "fig-uncertainty", "fig-chosen", "fig-uncertain", "fig-training", "fig-vi"):
        assert f'id="{fig}"' in text
    # painted labels read back from the annotation folder must match this selection
    ann = tmp_path / "run" / "annotation"
    for t in json.loads((ann / "tiles.json").read_text())["tiles"]:
        z, y, x = t["coords"]
        tifffile.imwrite(ann / "labels" / f"{t['name']}.tif", lab[z, y:y + 32, x:x + 32])
    got, vol = _label_tiles(ann / "labels", img, res.selection)
    assert vol is None
    np.testing.assert_array_equal(got, np.load(ann / "label_tiles.npy"))
    other = res.selection
    other.coords = other.coords + np.array([0, 1, 0])
    with pytest.raises(FormatError, match="do not match this selection"):
        _label_tiles(ann / "labels", img, other)
    with pytest.raises(ShapeError, match="labels of the target's shape"):
        _label_tiles(lab[:1], img, res.selection)


def test_annotation_uint64_ids_are_kept(tmp_path):
    """Painted ids >= 2**32 were truncated to uint32 on reading, so ids 1 and 2**32 + 1 merged."""
    sel = _selection([[0, 5, 7], [2, 30, 1]])
    ann = write_annotation(sel, tmp_path / "ann")
    big = np.uint64(2**32)
    painted = []
    for i, name in enumerate(sorted(p.stem for p in (ann / "images").iterdir())):
        lab = np.ones((16, 16), np.uint64)
        lab[:8] = big + 1 + i   # 2**32 + 1 (and + 2): distinct from 1 (and 2) only above 32 bits
        lab[:, :4] = 2**64 - 1  # the largest id
        lab[12:, 12:] = 0
        tifffile.imwrite(ann / "labels" / f"{name}.tif", lab)
        painted.append(lab)
    _, labels, _ = read_annotation(ann)
    assert labels.dtype == np.uint64
    np.testing.assert_array_equal(labels, np.stack(painted))
    # one tile with large ids and one within 32 bits: the stack keeps both exactly
    small = np.arange(256, dtype=np.uint32).reshape(16, 16)
    tifffile.imwrite(ann / "labels" / f"{sorted(p.stem for p in (ann / 'images').iterdir())[1]}.tif", small)
    _, labels, _ = read_annotation(ann)
    assert labels.dtype == np.uint64
    np.testing.assert_array_equal(labels[0], painted[0])
    np.testing.assert_array_equal(labels[1], small)
    # the same in one tiles.tif stack
    for p in (ann / "labels").iterdir():
        p.unlink()
    tifffile.imwrite(ann / "labels" / "tiles.tif", np.stack(painted), photometric="minisblack")
    _, labels, _ = read_annotation(ann)
    assert labels.dtype == np.uint64
    np.testing.assert_array_equal(labels, np.stack(painted))
