"""open_volume over every format (files written by the tests), laziness, normalisation rules,
atomic writers and the error messages."""

from __future__ import annotations

import gzip
import json
import struct

import numpy as np
import pytest

from neuroadda_rt import FormatError, InputValueError, ShapeError, Volume, normalize_intensity, open_volume
from neuroadda_rt.io import intensity_rule, write_n5, write_slices, write_tiff, write_volume


@pytest.fixture
def vol(rng):
    return rng.integers(0, 65535, size=(6, 17, 23), dtype=np.uint16)


INDEXES = [
    (Ellipsis,),
    (2,),
    (slice(1, 4), slice(None, None, 2)),
    (slice(None, None, -1), 3, slice(5, 1, -2)),
    (-1, Ellipsis, slice(-5, None)),
    (slice(4, 2),),
    (Ellipsis, 7),
]


def _check_all_indexes(v: Volume, ref: np.ndarray):
    assert v.shape == ref.shape and v.dtype == ref.dtype
    for k in INDEXES:
        np.testing.assert_array_equal(v[k], ref[k], err_msg=str(k))
    np.testing.assert_array_equal(np.asarray(v), ref)


@pytest.mark.parametrize("name", ["v.h5:raw", "v.hdf5", "v2.zarr", "v3.zarr", "v.n5", "v.tif", "v.npy"])
def test_roundtrip_formats(tmp_path, vol, name):
    target = str(tmp_path / name)
    kw = {"zarr_format": 3} if name.startswith("v3") else {}
    write_volume(target, vol, voxel_size_nm=(40, 4, 4), chunks=(2, 8, 8) if "tif" not in name and "npy" not in name else None, **kw)
    v = open_volume(target)
    _check_all_indexes(v, vol)
    if not name.endswith(".npy"):
        assert v.voxel_size_nm == pytest.approx((40, 4, 4))
    if name == "v3.zarr":
        assert json.loads((tmp_path / name / "zarr.json").read_text())["zarr_format"] == 3
    if name == "v2.zarr":  # issue 20: an unkeyed .zarr is an OME-Zarr image (NGFF 0.4), level 0 a zarr v2 array
        ms = json.loads((tmp_path / name / ".zattrs").read_text())["multiscales"][0]
        assert [ax["name"] for ax in ms["axes"]] == ["z", "y", "x"]
        assert ms["datasets"][0]["coordinateTransformations"][0]["scale"] == [40, 4, 4]
        assert (tmp_path / name / "0" / ".zarray").exists()


def test_lazy_reads_only_the_box(tmp_path, vol):
    write_volume(tmp_path / "v.h5", vol)
    v = open_volume(str(tmp_path / "v.h5"))
    assert v.voxels_read == 0
    v[1, 2:5, 3:7]
    assert v.voxels_read == 12
    # a folder of slices opens only slice 0 for metadata; slicing one slice reads one file
    write_slices(tmp_path / "s", vol.astype(np.uint8))
    (tmp_path / "s" / "5.png").write_bytes(b"garbage")  # never touched unless sliced
    s = open_volume(tmp_path / "s")
    np.testing.assert_array_equal(s[2], vol[2].astype(np.uint8))
    with pytest.raises(FormatError, match="5.png"):
        s[5]


def test_hdf5_keys_and_errors(tmp_path, vol):
    h5py = pytest.importorskip("h5py")
    p = tmp_path / "two.h5"
    with h5py.File(p, "w") as f:
        f["a/raw"] = vol
        f["b"] = vol[:2]
        f["a/raw"].attrs["resolution"] = [50.0, 5.0, 5.0]
    v = open_volume(f"{p}:a/raw")
    assert v.key == "a/raw" and v.voxel_size_nm == (50, 5, 5)
    np.testing.assert_array_equal(open_volume(p, key="b")[...], vol[:2])
    with pytest.raises(FormatError, match="two.h5.*expected a dataset key"):
        open_volume(p)
    with pytest.raises(FormatError, match=r"two.h5.*no dataset 'nope'.*a/raw"):
        open_volume(p, key="nope")


def test_truncated_files(tmp_path, vol):
    for name in ["t.h5", "t.npy", "t.tif"]:
        p = tmp_path / name
        write_volume(p, vol)
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 3])
        with pytest.raises(FormatError, match=name):
            v = open_volume(p)
            v[...]  # some formats only notice on reading the data


def test_unknown_format_and_missing(tmp_path):
    p = tmp_path / "x.bin"
    p.write_bytes(b"not a volume at all")
    with pytest.raises(FormatError, match="x.bin.*unknown format"):
        open_volume(p)
    with pytest.raises(FormatError, match="nothere.h5.*no such file"):
        open_volume(tmp_path / "nothere.h5")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FormatError, match="empty.*found none"):
        open_volume(tmp_path / "empty")
    with pytest.raises(FormatError, match="cannot write"):
        write_volume(tmp_path / "x.xyz", np.zeros(3))


def test_ome_zarr_multiscale_level(tmp_path, vol):
    zarr = pytest.importorskip("zarr")
    for fmt in (2, 3):
        root = zarr.open_group(str(tmp_path / f"ome{fmt}.zarr"), mode="w", zarr_format=fmt)
        root.create_array("s0", data=vol)
        root.create_array("s1", data=vol[:, ::2, ::2])
        root.attrs["multiscales"] = [{
            "version": "0.4",
            "axes": [{"name": a, "type": "space", "unit": "nanometer"} for a in "zyx"],
            "datasets": [
                {"path": "s0", "coordinateTransformations": [{"type": "scale", "scale": [40, 4, 4]}]},
                {"path": "s1", "coordinateTransformations": [{"type": "scale", "scale": [40, 8, 8]}]},
            ],
        }]
        v0 = open_volume(tmp_path / f"ome{fmt}.zarr")
        assert v0.voxel_size_nm == (40, 4, 4)
        v1 = open_volume(tmp_path / f"ome{fmt}.zarr", key="1")
        assert v1.key == "s1" and v1.voxel_size_nm == (40, 8, 8)
        _check_all_indexes(v1, vol[:, ::2, ::2])
        with pytest.raises(FormatError, match="levels"):
            open_volume(tmp_path / f"ome{fmt}.zarr", key="5")


def test_n5_hand_written_block(tmp_path):
    """An N5 dataset written byte by byte from the spec (not by our writer): x-first
    dimensions, big-endian header and data, a gzip block and a missing block."""
    ref = np.arange(2 * 3 * 5, dtype=np.int16).reshape(2, 3, 5) - 7  # (z, y, x)
    root = tmp_path / "hand.n5"
    ds = root / "vol"
    ds.mkdir(parents=True)
    (root / "attributes.json").write_text('{"n5": "2.0.0"}')
    (ds / "attributes.json").write_text(json.dumps({
        "dimensions": [5, 3, 2], "blockSize": [3, 3, 2], "dataType": "int16",
        "compression": {"type": "gzip"}, "resolution": [4, 4, 40]}))
    block = ref[:, :, 0:3]  # block (0,0,0) in x,y,z grid order
    hdr = struct.pack(">HH", 0, 3) + struct.pack(">III", 3, 3, 2)
    (ds / "0" / "0").mkdir(parents=True)
    (ds / "0" / "0" / "0").write_bytes(hdr + gzip.compress(block.astype(">i2").tobytes()))
    v = open_volume(f"{root}:vol")
    assert v.shape == (2, 3, 5) and v.dtype == np.int16 and v.voxel_size_nm == (40, 4, 4)
    expect = ref.copy()
    expect[:, :, 3:] = 0  # block (1,0,0) is missing: fill value
    np.testing.assert_array_equal(v[...], expect)
    np.testing.assert_array_equal(v[1, 1:, 2:4], expect[1, 1:, 2:4])


def test_n5_writer_edge_blocks_and_errors(tmp_path, vol):
    write_n5(tmp_path / "w.n5", vol, key="a/b", block_size=(4, 5, 7), compression="raw")
    _check_all_indexes(open_volume(tmp_path / "w.n5", key="a/b"), vol)
    with pytest.raises(FormatError, match=r"w.n5.*no N5 dataset 'zz'"):
        open_volume(tmp_path / "w.n5", key="zz")
    blk = next(p for p in (tmp_path / "w.n5" / "a" / "b").rglob("*") if p.is_file() and p.name != "attributes.json")
    blk.write_bytes(blk.read_bytes()[:20])
    with pytest.raises(FormatError, match="truncated N5 block"):
        open_volume(tmp_path / "w.n5", key="a/b")[...]


def test_tiff_single_and_multipage(tmp_path, vol):
    write_tiff(tmp_path / "one.tif", vol[0])
    v = open_volume(tmp_path / "one.tif")
    assert v.shape == vol.shape[1:]
    np.testing.assert_array_equal(v[3:9, ::-1], vol[0][3:9, ::-1])
    write_tiff(tmp_path / "stack.tiff", vol, voxel_size_nm=(50, 4, 4))
    _check_all_indexes(open_volume(tmp_path / "stack.tiff"), vol)


@pytest.mark.parametrize("fmt", ["png", "tif"])
def test_slice_folder_natural_sort(tmp_path, vol, fmt):
    tifffile = pytest.importorskip("tifffile")
    from PIL import Image

    stack = (vol >> 8).astype(np.uint8)
    folder = tmp_path / "slices"
    folder.mkdir()
    for i, sl in enumerate(stack):  # names 1, 2, ..., 6 but written as z1, z10-like mixes
        name = folder / f"z{[1, 2, 3, 9, 10, 11][i]}.{fmt}"
        if fmt == "png":
            rgb = np.repeat(sl[..., None], 3, axis=2)  # an RGB file: channel 0 is used
            Image.fromarray(rgb).save(name)
        else:
            tifffile.imwrite(name, sl)
    v = open_volume(folder)
    assert [p.rsplit("/", 1)[-1] for p in v.files][:5] == [f"z{i}.{fmt}" for i in (1, 2, 3, 9, 10)]
    _check_all_indexes(v, stack)
    # a slice of another shape is an error naming the folder
    (folder / f"z12.{fmt}").unlink(missing_ok=True)
    if fmt == "png":
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(folder / "z12.png")
        with pytest.raises(ShapeError, match="slice 6"):
            open_volume(folder)[...]


def test_numpy_array_wrapped_without_copy(vol):
    v = open_volume(vol, voxel_size_nm=(1, 2, 3))
    assert v.path is None and v.voxel_size_nm == (1, 2, 3)
    _check_all_indexes(v, vol)
    with pytest.raises(InputValueError, match="ints, slices"):
        v[[0, 1]]
    with pytest.raises(IndexError):
        v[6]


def test_atomic_write_leaves_no_temp(tmp_path, vol):
    for name in ["a.h5", "a.zarr", "a.n5", "a.tif", "a.npy"]:
        write_volume(tmp_path / name, vol)
        write_volume(tmp_path / name, vol[:2])  # overwrite in place
        assert open_volume(tmp_path / name).shape == (2, 17, 23)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_precomputed_needs_extra():
    try:
        import cloudvolume  # noqa: F401
    except ImportError:
        from neuroadda_rt import MissingExtraError

        with pytest.raises(MissingExtraError, match="neuroglancer"):
            open_volume("precomputed://gs://bucket/volume")
    else:  # pragma: no cover
        pytest.skip("cloud-volume is installed; the missing-extra path cannot be exercised")


# ----------------------------------------------------------------------------- normalisation
def test_normalize_dtype_rule():
    np.testing.assert_allclose(normalize_intensity(np.array([0, 128, 255], np.uint8)), [0, 128 / 255, 1], rtol=1e-6)
    np.testing.assert_allclose(normalize_intensity(np.array([0, 65535], np.uint16)), [0, 1])
    np.testing.assert_allclose(normalize_intensity(np.array([-128, 127], np.int8)), [0, 1])
    out = normalize_intensity(np.array([-0.5, 0.25, 2.0]))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [0, 0.25, 1])


def test_normalize_percentile_rule_matches_float64_reference(rng):
    x = rng.normal(100, 20, size=(32, 32)).astype(np.float32)
    rule = intensity_rule("percentile", low=2, high=98)
    assert json.loads(json.dumps(rule)) == rule  # what a model package stores
    lo, hi = np.percentile(x.astype(np.float64), [2, 98])
    ref = np.clip((x.astype(np.float64) - lo) / (hi - lo), 0, 1)
    got = normalize_intensity(x, rule)
    assert got.dtype == np.float32 and got.min() >= 0 and got.max() <= 1
    np.testing.assert_allclose(got, ref, atol=1e-5)
    # re-applied from the stored dict: identical
    np.testing.assert_array_equal(normalize_intensity(x, json.loads(json.dumps(rule))), got)
    # invariant to an affine change of the microscope's gain/offset
    np.testing.assert_allclose(normalize_intensity(3 * x + 7, rule), got, atol=1e-5)


def test_normalize_fixed_and_bad_rules():
    np.testing.assert_allclose(normalize_intensity(np.array([10, 20, 30, 40]), "fixed", low=20, high=30), [0, 0, 1, 1])
    assert normalize_intensity(np.full((3, 3), 5.0), "percentile").max() == 0  # constant: no NaN
    with pytest.raises(InputValueError, match="rule"):
        normalize_intensity(np.zeros(3), "zscore")
    with pytest.raises(InputValueError, match="low < high"):
        intensity_rule("percentile", low=99, high=1)
    with pytest.raises(InputValueError, match="fixed"):
        intensity_rule("fixed")


# ----------------------------------------------------------------------------- real data
@pytest.mark.realdata
def test_real_formats(em_data):
    isbi = open_volume(em_data / "isbi2012_drosophila_l1_vnc/data/membrane/train/image")
    assert isbi.shape == (30, 512, 512) and isbi.dtype == np.uint8
    assert [f.rsplit("/", 1)[-1] for f in isbi.files[:3]] == ["0.png", "1.png", "2.png"]
    assert isbi.files[10].endswith("/10.png")
    gala = open_volume(str(em_data / "drosophila_fibsem_gala_example/tests/example-data/train-gt.lzf.h5") + ":stack")
    assert gala.shape == (50, 100, 200) and gala.dtype == np.int32
    assert gala[0, :4, :4].shape == (4, 4) and gala.voxels_read == 16
    raw = open_volume(em_data / "drosophila_l3_vnc_gerhard/stack1/raw")
    assert raw.shape == (20, 1024, 1024)
    epfl = open_volume(em_data / "epfl_hippocampus_mouse_dense/data/epfl_train/slices")  # LA mode PNG
    assert epfl.shape == (27, 768, 1024) and epfl.dtype == np.uint8


def test_volumes_pickle_by_path(tmp_path, vol):
    """Volumes travel to worker processes: file-backed ones reopen by path (no HDF5 handle
    in the pickle), arrays travel as arrays, dataset slabs keep their z range."""
    import pickle

    from neuroadda_rt import Dataset

    write_volume(tmp_path / "p.h5:raw", vol, voxel_size_nm=(40, 4, 4))
    v = open_volume(f"{tmp_path / 'p.h5'}:raw")
    w = pickle.loads(pickle.dumps(v))
    assert w.path == v.path and w.key == "raw" and w.voxel_size_nm == (40, 4, 4)
    np.testing.assert_array_equal(w[2, :3], vol[2, :3])
    a = pickle.loads(pickle.dumps(open_volume(vol[:2])))
    np.testing.assert_array_equal(a[...], vol[:2])
    ds = Dataset.from_dict({"name": "p", "image": "p.h5:raw", "splits": {"test": {"z": [3, 6]}}}, data_root=tmp_path)
    slab = pickle.loads(pickle.dumps(ds.image("test")))
    np.testing.assert_array_equal(slab[...], vol[3:6])


# ----------------------------------------------------------------------------- the one 2-D decoder
def test_read_image_2d_grey_matches_the_libraries(tmp_path, rng):
    from PIL import Image
    import tifffile

    from neuroadda_rt.io import read_image_2d

    g8 = rng.integers(0, 256, (9, 11), dtype=np.uint8)
    g16 = rng.integers(0, 65536, (9, 11), dtype=np.uint16)
    Image.fromarray(g8).save(tmp_path / "g8.png")
    Image.fromarray(g16).save(tmp_path / "g16.png")
    tifffile.imwrite(tmp_path / "g16.tif", g16)
    tifffile.imwrite(tmp_path / "f32.tif", g16.astype(np.float32))
    for name in ("g8.png", "g16.png"):
        with Image.open(tmp_path / name) as im:
            np.testing.assert_array_equal(read_image_2d(tmp_path / name), np.asarray(im))
    for name in ("g16.tif", "f32.tif"):
        ref = tifffile.imread(tmp_path / name)
        out = read_image_2d(tmp_path / name)
        assert out.dtype == ref.dtype
        np.testing.assert_array_equal(out, ref)
    # ImageJ/napari singleton axes are dropped
    tifffile.imwrite(tmp_path / "s.tif", g16[None, None], imagej=True)
    np.testing.assert_array_equal(read_image_2d(tmp_path / "s.tif"), g16)


def test_read_image_2d_colour_rule(tmp_path, rng):
    from PIL import Image
    import tifffile

    from neuroadda_rt.io import read_image_2d

    grey = rng.integers(0, 256, (8, 10), dtype=np.uint8)
    rgb_grey = np.repeat(grey[..., None], 3, axis=2)
    colour = rng.integers(0, 256, (8, 10, 3), dtype=np.uint8)
    Image.fromarray(rgb_grey).save(tmp_path / "rgb_grey.png")
    Image.fromarray(colour).save(tmp_path / "colour.png")
    Image.fromarray(np.dstack([grey, np.full_like(grey, 255)]), mode="LA").save(tmp_path / "la.png")
    tifffile.imwrite(tmp_path / "colour.tif", colour, photometric="rgb")
    tifffile.imwrite(tmp_path / "rgba.tif", np.dstack([colour, np.full_like(grey, 7)]), photometric="rgb",
                     extrasamples=["unassalpha"])
    # grey stored in colour channels is read exactly (the shared data sets)
    np.testing.assert_array_equal(read_image_2d(tmp_path / "rgb_grey.png"), grey)
    np.testing.assert_array_equal(read_image_2d(tmp_path / "la.png"), grey)
    # true colour: ITU-R 601-2 luminance, as Pillow's convert("L"), alpha dropped
    with Image.open(tmp_path / "colour.png") as im:
        luma = np.asarray(im.convert("L")).astype(int)
    for name in ("colour.png", "colour.tif", "rgba.tif"):
        out = read_image_2d(tmp_path / name)
        assert out.dtype == np.uint8 and out.shape == grey.shape
        assert np.abs(out.astype(int) - luma).max() <= 1, name  # Pillow rounds in fixed point
    # a palette image is read through its colours
    Image.fromarray(colour).convert("P").save(tmp_path / "p.png")
    with Image.open(tmp_path / "p.png") as im:
        ref = np.asarray(im.convert("L")).astype(int)
    assert np.abs(read_image_2d(tmp_path / "p.png").astype(int) - ref).max() <= 1


def test_read_image_2d_labels_are_never_mixed(tmp_path, rng):
    from PIL import Image
    import tifffile

    from neuroadda_rt.io import read_image_2d, read_image_stack

    ids = rng.integers(0, 200, (8, 10), dtype=np.uint8)
    # a palette PNG: the index is the id, whatever colours the palette shows
    Image.fromarray(ids).save(tmp_path / "grey.png")
    im = Image.new("P", (10, 8))
    im.putdata(ids.ravel().tolist())
    im.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tolist())
    im.save(tmp_path / "palette.png")
    for name in ("grey.png", "palette.png"):
        out = read_image_2d(tmp_path / name, kind="labels")
        assert out.dtype == np.uint32
        np.testing.assert_array_equal(out, ids)
    Image.fromarray(np.repeat(ids[..., None], 3, axis=2)).save(tmp_path / "rgb_grey.png")
    np.testing.assert_array_equal(read_image_2d(tmp_path / "rgb_grey.png", kind="labels"), ids)
    Image.fromarray(rng.integers(0, 256, (8, 10, 3), dtype=np.uint8)).save(tmp_path / "coded.png")
    with pytest.raises(FormatError, match="colour-coded"):
        read_image_2d(tmp_path / "coded.png", kind="labels")
    Image.fromarray(ids).save(tmp_path / "l.jpg")
    with pytest.raises(FormatError, match="lossy"):
        read_image_2d(tmp_path / "l.jpg", kind="labels")
    tifffile.imwrite(tmp_path / "f.tif", np.array([[0.5, 1.0]], np.float32))
    with pytest.raises(FormatError, match="non-integer"):
        read_image_2d(tmp_path / "f.tif", kind="labels")
    tifffile.imwrite(tmp_path / "neg.tif", np.array([[-1, 2]], np.int16))
    with pytest.raises(FormatError, match="non-negative"):
        read_image_2d(tmp_path / "neg.tif", kind="labels")
    # a stack of label pages; a 2-D read of it is refused
    stack = rng.integers(0, 70000, (3, 8, 10)).astype(np.uint32)
    tifffile.imwrite(tmp_path / "stack.tif", stack, photometric="minisblack")
    np.testing.assert_array_equal(read_image_stack(tmp_path / "stack.tif", kind="labels"), stack)
    with pytest.raises(ShapeError, match="stack of 3 pages"):
        read_image_2d(tmp_path / "stack.tif", kind="labels")
    with pytest.raises(InputValueError):
        read_image_2d(tmp_path / "grey.png", kind="mask")
    (tmp_path / "cut.png").write_bytes((tmp_path / "grey.png").read_bytes()[:40])
    with pytest.raises(FormatError, match="cut.png"):
        read_image_2d(tmp_path / "cut.png")


def test_open_volume_rgb_tiff_uses_the_colour_rule(tmp_path, rng):
    import tifffile

    from neuroadda_rt.io import read_image_2d

    colour = rng.integers(0, 256, (8, 10, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "c.tif", colour, photometric="rgb")
    v = open_volume(tmp_path / "c.tif")
    assert v.shape == (8, 10)
    np.testing.assert_array_equal(np.asarray(v), read_image_2d(tmp_path / "c.tif"))


def test_normalize_tiles_applies_a_percentile_rule_tile_by_tile(rng):
    from neuroadda_rt.io import intensity_rule, normalize_tiles

    tiles = rng.integers(0, 4000, size=(5, 16, 16)).astype(np.uint16)
    tiles[2] *= 3  # a brighter tile: per-tile percentiles differ from the batch's
    rule = intensity_rule("percentile", low=2, high=98)
    got = normalize_tiles(tiles, rule)
    for t, g in zip(tiles, got):
        lo, hi = np.percentile(t.astype(np.float64), [2, 98])
        np.testing.assert_allclose(g, np.clip((t - lo) / (hi - lo), 0, 1), atol=1e-6)
    # an element-wise rule is the same on the batch and on each tile
    np.testing.assert_array_equal(normalize_tiles(tiles, "dtype"), tiles.astype(np.float32) / 65535)


def test_freeze_rule_normalises_pieces_like_the_whole(rng):
    from neuroadda_rt.io import freeze_rule, intensity_rule, normalize_intensity

    img = rng.normal(100, 20, size=(64, 64))
    rule = intensity_rule("percentile", low=1, high=99)
    frozen = freeze_rule(rule, img)
    assert frozen["rule"] == "fixed"
    np.testing.assert_allclose(normalize_intensity(img, frozen), normalize_intensity(img, rule), atol=1e-6)
    lo, hi = np.percentile(img, [1, 99])
    piece = img[:16, :16]  # a window is normalised with the whole image's range, not its own
    np.testing.assert_allclose(normalize_intensity(piece, frozen), np.clip((piece - lo) / (hi - lo), 0, 1), atol=1e-6)
    assert freeze_rule("dtype", img) == {"rule": "dtype"}
    np.testing.assert_array_equal(normalize_intensity(np.full((4, 4), 7.0), freeze_rule(rule, np.full((4, 4), 7.0))), 0)


# ----------------------------------------------------------------------------- issue 19
@pytest.mark.parametrize("odd", [np.array([[1000, 7], [65535, 0]], np.uint16),
                                 np.array([[0.75, 0.25], [1.0, 0.0]], np.float32)])
def test_slice_folder_with_mixed_dtypes_is_refused(tmp_path, odd):
    """Slice 0's dtype used to win silently: uint16 1000 became 232 and float 0.75 became 0."""
    tifffile = pytest.importorskip("tifffile")
    folder = tmp_path / "slices"
    folder.mkdir()
    base = np.array([[10, 20], [30, 40]], np.uint8)
    for i in range(4):
        tifffile.imwrite(folder / f"s{i}.tif", odd if i == 2 else base)
    with pytest.raises(FormatError) as exc:
        open_volume(folder)
    msg = str(exc.value)
    assert "s2.tif" in msg and "s3.tif" not in msg  # the first file that differs
    assert "uint8" in msg and str(odd.dtype) in msg and "s0.tif" in msg
    # one dtype throughout still reads, exactly
    tifffile.imwrite(folder / "s2.tif", base)
    np.testing.assert_array_equal(open_volume(folder)[...], np.stack([base] * 4))


def test_slice_folder_dtype_changed_after_opening_is_refused_on_read(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    folder = tmp_path / "slices"
    folder.mkdir()
    for i in range(3):
        tifffile.imwrite(folder / f"s{i}.tif", np.full((4, 4), i, np.uint8))
    v = open_volume(folder)
    tifffile.imwrite(folder / "s1.tif", np.full((4, 4), 1000, np.uint16))
    np.testing.assert_array_equal(v[0], np.zeros((4, 4), np.uint8))
    with pytest.raises(FormatError, match=r"uint16 in .*s1\.tif"):
        v[...]


def test_image_dtype_agrees_with_the_decoder(tmp_path, rng):
    tifffile = pytest.importorskip("tifffile")
    from PIL import Image

    from neuroadda_rt.io import image_dtype, read_image_2d

    files = []
    for dt in (np.uint8, np.uint16, np.int16, np.float32, np.float64):
        p = tmp_path / f"a_{np.dtype(dt).name}.tif"
        tifffile.imwrite(p, rng.integers(0, 100, (5, 6)).astype(dt))
        files.append(p)
    tifffile.imwrite(tmp_path / "rgb.tif", rng.integers(0, 255, (5, 6, 3), dtype=np.uint8), photometric="rgb")
    files.append(tmp_path / "rgb.tif")
    for mode, arr in (("L", rng.integers(0, 255, (5, 6), dtype=np.uint8)),
                      ("I;16", rng.integers(0, 65535, (5, 6), dtype=np.uint16)),
                      ("RGB", rng.integers(0, 255, (5, 6, 3), dtype=np.uint8))):
        p = tmp_path / f"p_{mode.replace(';', '')}.png"
        Image.fromarray(arr).save(p)
        files.append(p)
    p = tmp_path / "pal.png"
    Image.fromarray(rng.integers(0, 4, (5, 6), dtype=np.uint8)).convert("P").save(p)
    files.append(p)
    for f in files:
        assert image_dtype(f) == read_image_2d(f).dtype, f


def _npy_with_header(path, shape, dtype="<f4", payload=b""):
    header = {"descr": dtype, "fortran_order": False, "shape": tuple(shape)}
    with open(path, "wb") as f:
        f.write(b"\x93NUMPY\x01\x00")
        h = repr(header).encode("latin1")
        pad = 64 - (10 + len(h) + 1) % 64
        h = h + b" " * pad + b"\n"
        f.write(struct.pack("<H", len(h)))
        f.write(h)
        f.write(payload)


@pytest.mark.parametrize("shape", [(2**40, 16), (1 << 28, 8), (3, 5)])
def test_npy_header_larger_than_the_file_is_refused_before_allocating(tmp_path, shape):
    """A header claiming (2**40, 16) float32 asked for 64 TiB; a smaller claim reserved 8 GiB."""
    import tracemalloc

    from neuroadda_rt.io import load_npy

    path = tmp_path / "forged.npy"
    _npy_with_header(path, shape, payload=b"\0" * 32)  # 8 float32: less than any claim above
    tracemalloc.start()
    try:
        for read in (lambda: open_volume(path), lambda: load_npy(path), lambda: load_npy(path, mmap_mode="r")):
            with pytest.raises(FormatError) as exc:
                read()
            assert "forged.npy" in str(exc.value) and str(tuple(shape)) in str(exc.value)
            assert "32 bytes" in str(exc.value)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20  # nothing close to the claim was allocated
    # an honest file of the same layout still loads
    ok = tmp_path / "ok.npy"
    np.save(ok, np.arange(8, dtype=np.float32).reshape(2, 4))
    np.testing.assert_array_equal(load_npy(ok), np.arange(8, dtype=np.float32).reshape(2, 4))
    np.testing.assert_array_equal(open_volume(ok)[...], np.arange(8, dtype=np.float32).reshape(2, 4))


@pytest.mark.parametrize("fmt", [2, 3])
def test_zarr_missing_chunk_inside_the_bounds_is_reported(tmp_path, vol, fmt):
    # zarr fills a missing chunk with its fill value (zeros): a deleted chunk file silently
    # changed a ranking. The reader must warn, naming the array and the first missing chunk,
    # unless the caller says a partial volume is legitimate (the zarr spec allows it).
    zarr = pytest.importorskip("zarr")
    path = tmp_path / f"m{fmt}.zarr"
    root = zarr.open_group(str(path), mode="w", zarr_format=fmt)
    z = root.create_array("raw", shape=vol.shape, dtype=vol.dtype, chunks=(2, 8, 8))
    z[:] = vol
    chunk_file = path / "raw" / ("1.2.0" if fmt == 2 else "c/1/2/0")
    assert chunk_file.is_file()
    chunk_file.unlink()
    from neuroadda_rt.errors import MissingChunksWarning

    with pytest.warns(MissingChunksWarning, match=r"raw.*\(1, 2, 0\).*missing inside.*allow_missing_chunks") as rec:
        open_volume(f"{path}:raw")
    assert str(path) in str(rec[0].message)
    v = open_volume(f"{path}:raw", allow_missing_chunks=True)  # no warning: pytest turns warnings into errors
    ref = vol.copy()
    ref[2:4, 16:17, 0:8] = 0
    np.testing.assert_array_equal(v[:], ref)
    # the choice survives pickling (workers reopen by path)
    import pickle
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(v))[:], ref)
    # a complete array opens as before
    z2 = zarr.create_array(str(tmp_path / "full.zarr"), shape=vol.shape, dtype=vol.dtype, chunks=(4, 8, 8),
                           zarr_format=fmt)
    z2[:] = vol
    np.testing.assert_array_equal(open_volume(tmp_path / "full.zarr")[:], vol)


def test_zarr_corrupt_chunk_names_the_file_and_chunk(tmp_path, vol):
    zarr = pytest.importorskip("zarr")
    path = tmp_path / "c.zarr"
    z = zarr.create_array(str(path), shape=vol.shape, dtype=vol.dtype, chunks=(2, 8, 8), zarr_format=3,
                          compressors=zarr.codecs.ZstdCodec())
    z[:] = vol
    (path / "c/1/0/2").write_bytes(b"not zstd" * 8)
    v = open_volume(path)
    np.testing.assert_array_equal(v[0:2], vol[0:2])  # chunks that decode still read
    for box in [(Ellipsis,), (slice(2, 4), slice(0, 8), slice(16, 23))]:
        with pytest.raises(FormatError, match=r"c\.zarr.*chunk \(1, 0, 2\).*c/1/0/2.*decode"):
            v[box]


def test_written_zarr_volumes_keep_their_all_fill_chunks(tmp_path):
    # zarr 3 skips chunks that are all fill value unless told otherwise; our writer stores them, so a volume
    # we wrote is complete and opens without a missing-chunk warning (pytest makes that warning an error).
    from neuroadda_rt.io import write_volume

    a = np.zeros((4, 16, 16), np.uint8)
    a[0, :8, :8] = 7
    write_volume(tmp_path / "w.zarr", a, chunks=(2, 8, 8))
    n_chunks = sum(1 for p in (tmp_path / "w.zarr").rglob("*") if p.is_file() and p.name not in ("zarr.json", ".zarray", ".zattrs", ".zgroup"))
    assert n_chunks == 2 * 2 * 2
    np.testing.assert_array_equal(open_volume(tmp_path / "w.zarr")[:], a)


def test_tiff_tiles_are_decoded_on_demand(tmp_path):
    """A tile read from a tiled TIFF decodes only the tiles it touches: with one far-away tile
    overwritten by garbage, every other box still reads exactly, and the bad tile fails by name."""
    tifffile = pytest.importorskip("tifffile")
    rng = np.random.default_rng(0)
    a = rng.integers(0, 60000, (512, 640), dtype=np.uint16)
    path = tmp_path / "tiled.tif"
    tifffile.imwrite(path, a, tile=(128, 128), compression="zlib")
    with tifffile.TiffFile(path) as tf:
        off, n = tf.pages[0].dataoffsets[-1], tf.pages[0].databytecounts[-1]  # the last tile (y 384+, x 512+)
    raw = bytearray(path.read_bytes())
    raw[off:off + n] = b"\x00" * n
    path.write_bytes(bytes(raw))
    v = open_volume(path)
    assert v.shape == a.shape and v.dtype == a.dtype
    assert np.array_equal(v[100:356, 200:456], a[100:356, 200:456])
    assert np.array_equal(v[384:, :512], a[384:, :512])
    with pytest.raises(FormatError, match="tiled.tif"):
        v[400:410, 600:610]
    # multi-page: one page per z, boxes across pages
    st = rng.integers(0, 255, (4, 96, 80), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "stack.tif", st, tile=(32, 32), photometric="minisblack")
    s = open_volume(tmp_path / "stack.tif")
    assert s.shape == st.shape and np.array_equal(s[1:4, 10:70, 33:79], st[1:4, 10:70, 33:79])


def test_ome_zarr_writer(tmp_path):
    """OME-NGFF 0.4 metadata (axes, units, scale per level) that open_volume reads back, a stride
    pyramid, and zarr files with the old `voxel_size_nm` attribute still read."""
    pytest.importorskip("zarr")
    from neuroadda_rt.io.writers import create_ome_zarr, write_ome_zarr
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2**40, (3, 16, 20), dtype=np.uint64)
    write_ome_zarr(tmp_path / "l.zarr", a, voxel_size_nm=(30, 4, 5), levels=2, chunks=(2, 8, 8))
    meta = json.loads((tmp_path / "l.zarr" / ".zattrs").read_text())["multiscales"][0]
    assert meta["version"] == "0.4" and [ax["name"] for ax in meta["axes"]] == ["z", "y", "x"]
    assert all(ax == {"name": n, "type": "space", "unit": "nanometer"} for ax, n in zip(meta["axes"], "zyx"))
    assert [d["coordinateTransformations"][0]["scale"] for d in meta["datasets"]] == [[30, 4, 5], [30, 8, 10]]
    v0, v1 = open_volume(tmp_path / "l.zarr"), open_volume(tmp_path / "l.zarr", key="1")
    assert v0.voxel_size_nm == (30, 4, 5) and np.array_equal(v0[...], a)
    assert v1.voxel_size_nm == (30, 8, 10) and np.array_equal(v1[...], a[:, ::2, ::2])
    z = create_ome_zarr(tmp_path / "p.zarr", (2, 3, 16, 16), "float16", axes="czyx", voxel_size_nm=(40, 8, 8),
                        chunks=(2, 1, 8, 8))
    z[:, 1, 8:, :8] = 0.5
    v = open_volume(tmp_path / "p.zarr", allow_missing_chunks=True)  # the rest is unwritten, on purpose
    assert v.shape == (2, 3, 16, 16) and v.voxel_size_nm == (1.0, 40, 8, 8) and v[0, 1, 9, 1] == np.float16(0.5)
    with pytest.raises(FormatError, match="already exists"):
        create_ome_zarr(tmp_path / "p.zarr", (2, 2), "uint8", axes="yx")
    with pytest.raises(ShapeError, match="axis names"):
        create_ome_zarr(tmp_path / "q.zarr", (2, 2, 2), "uint8", axes="cyy")
    import zarr  # a file as write_volume wrote it before issue 20: the old attribute, no OME metadata

    old = zarr.create_array(str(tmp_path / "old.zarr"), shape=a.shape, dtype=a.dtype, zarr_format=2)
    old[...] = a
    old.attrs["voxel_size_nm"] = [30, 4, 5]
    assert open_volume(tmp_path / "old.zarr").voxel_size_nm == (30, 4, 5)
    assert np.array_equal(open_volume(tmp_path / "old.zarr")[...], a)
