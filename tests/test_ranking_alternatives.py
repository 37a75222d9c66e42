"""The ranking alternatives of issue 16 item 2 (``rank_sources(match_voxel_size=, calibration=, pooling=)``) and
``tiles.resize_tiles``, against independent references: scikit-image's ``resize``, float64 NumPy kernels, and
rankings of hand-built sources; typed errors for unusable voxel sizes and options. No encoder runs: the sources
are small in-test ``RankableSource`` objects, so the file takes seconds."""

from __future__ import annotations

import json

import numpy as np
import pytest

import neuroadda_rt as nr
from neuroadda_rt.errors import InputValueError, ShapeError
from neuroadda_rt.ranking import SourceRanking, calibrated_score, rank_sources, standardize, voxel_matched_size
from neuroadda_rt.tiles import extract_tiles, resize_tiles

skimage_transform = pytest.importorskip("skimage.transform")


# --------------------------------------------------------------------------------------------
# resize_tiles
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [13, 40, 64, 150])
def test_resize_tiles_matches_skimage_resize(size):
    rng = np.random.default_rng(size)
    tiles = (rng.random((3, 64, 64)) * 255).astype(np.uint8)
    out = resize_tiles(tiles, size)
    assert out.shape == (3, size, size) and out.dtype == np.float32
    for t, o in zip(tiles, out):
        # skimage: Gaussian pre-filter sigma (factor - 1) / 2 when shrinking, bilinear, pixel centres aligned
        ref = skimage_transform.resize(t.astype(np.float64), (size, size), order=1, mode="edge", anti_aliasing=True,
                                       preserve_range=True)
        np.testing.assert_allclose(o, ref, atol=1e-3)


def test_resize_tiles_without_anti_aliasing_is_plain_bilinear():
    rng = np.random.default_rng(1)
    t = rng.random((48, 48))
    ref = skimage_transform.resize(t, (16, 16), order=1, mode="edge", anti_aliasing=False)
    np.testing.assert_allclose(resize_tiles(t, 16, anti_alias=False), ref, atol=1e-5)
    # anti-aliasing removes a checkerboard at the new pixel size; plain bilinear keeps aliasing it
    board = np.indices((48, 48)).sum(0) % 2 * 255.0
    assert resize_tiles(board, 16).std() < 0.2 * resize_tiles(board, 16, anti_alias=False).std()


def test_resize_tiles_errors():
    with pytest.raises(ShapeError):
        resize_tiles(np.zeros((2, 8, 9)), 4)
    with pytest.raises(ShapeError):
        resize_tiles(np.zeros(8), 4)
    with pytest.raises(InputValueError):
        resize_tiles(np.zeros((8, 8)), 0)


def test_voxel_matched_size():
    assert voxel_matched_size(128, 4.0, 10.0) == 51  # a 10-nm target: 51 px cover 128 px of 4 nm
    assert voxel_matched_size(96, 10.0, 5.0) == 192
    assert voxel_matched_size(128, 5.0, 5.0) == 128
    for bad in [(128, 0.0, 5.0), (128, 4.0, -1.0), (128, float("nan"), 4.0)]:
        with pytest.raises(InputValueError):
            voxel_matched_size(*bad)


# --------------------------------------------------------------------------------------------
# in-test sources
# --------------------------------------------------------------------------------------------
def _describe(tiles) -> np.ndarray:
    """Features a real encoder would not use, but which respond to scale: intensity mean and sd, and the
    mean absolute difference of neighbouring pixels (edge density), as ``mean+std``-like pairs."""
    t = np.asarray(tiles, np.float64)
    grad = np.abs(np.diff(t, axis=-1)).mean(axis=(-2, -1))
    m = t.mean(axis=(-2, -1))
    return np.stack([m, grad, t.std(axis=(-2, -1)), np.abs(np.diff(t, axis=-2)).std(axis=(-2, -1))], 1)


class FakeSource:
    """A RankableSource with a pixel size; records the tiles it embeds."""

    feature_level = 2
    normalization = {"rule": "none"}

    def __init__(self, name, voxel_size_nm, ref, *, tile=32, pooling="mean+std"):
        self.name, self.path, self.sha256 = name, None, f"fake-{name}"
        self.voxel_size_nm, self.reference_features = voxel_size_nm, np.asarray(ref, np.float32)
        self.reference_tile_size, self.pooling = tile, pooling
        self.seen: list[np.ndarray] = []

    def embed(self, tiles, *, backend="auto", device="auto", batch_size=16, progress=False):
        self.seen.append(np.array(tiles))
        return _describe(tiles).astype(np.float32)


def _stripes(period: float, shape=(4, 200, 200), seed=0) -> np.ndarray:
    """Membrane-like stripes of a given period in pixels, with noise."""
    rng = np.random.default_rng(seed)
    x = np.arange(shape[-1])
    img = 128 + 80 * np.sin(2 * np.pi * x / period)[None, None, :] + rng.normal(0, 5, shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _reference(period: float, tile=32, n=40, seed=1) -> np.ndarray:
    vol = _stripes(period, (n, 64, 64), seed)
    return _describe(vol[:, :tile, :tile])


def test_match_voxel_size_cuts_the_same_field_of_view_and_resizes():
    target = _stripes(10.0)  # 10 px stripes at 8 nm: 80 nm
    src = FakeSource("s4", [40.0, 4.0, 4.0], _reference(20.0))  # 4 nm source: the same 80 nm are 20 px
    r = rank_sources(target, [src], n_tiles=6, seed=2, n_permutations=0, cache_dir=False, match_voxel_size=True,
                     target_voxel_size_nm=(8.0, 8.0))
    e = r[0]
    assert (e.cut_size, e.tile_size) == (16, 32)  # 32 px of 4 nm = 16 px of 8 nm
    coords = nr.sample_tiles(target, 6, 16, seed=2).coords
    cut = extract_tiles(target, coords, 16)
    ref = np.stack([skimage_transform.resize(t.astype(np.float64), (32, 32), order=1, mode="edge",
                                             anti_aliasing=True, preserve_range=True) for t in cut])
    np.testing.assert_allclose(src.seen[-1], ref, atol=1e-3)
    np.testing.assert_array_equal(r.target_coords, coords)
    assert r.settings["match_voxel_size"] and r.settings["cut_sizes"] == {"s4": 16}
    assert not any("pixel size" in w for w in e.warnings)  # resampled: the scale warning does not apply


def test_match_voxel_size_orders_sources_by_physical_scale():
    # the target's stripes are 80 nm apart (10 px at 8 nm); one source saw 80-nm stripes at 4 nm (20 px), the
    # other 40-nm stripes at 8 nm (5 px). Unresampled, the 4-nm source sees 10-px stripes and looks far; resampled
    # it sees its own 20-px stripes.
    target = _stripes(10.0)
    near = FakeSource("same_scale_4nm", [4.0, 4.0], _reference(20.0))
    far = FakeSource("other_scale_8nm", [8.0, 8.0], _reference(5.0))
    kw = dict(n_tiles=40, seed=0, n_permutations=0, cache_dir=False, target_voxel_size_nm=(8.0, 8.0))
    matched = rank_sources(target, [near, far], match_voxel_size=True, **kw)
    assert matched.names == ["same_scale_4nm", "other_scale_8nm"]
    plain = rank_sources(target, [near, far], **kw)
    assert {e.name: e.mmd2 for e in matched}["same_scale_4nm"] < {e.name: e.mmd2 for e in plain}["same_scale_4nm"]


def test_match_voxel_size_fits_a_small_target_and_skips_unknown_sources():
    target = _stripes(10.0, shape=(3, 40, 40))
    big = FakeSource("needs_64px", [16.0, 16.0], _reference(10.0))  # 32 px at 16 nm = 64 px at 8 nm: too big
    unknown = FakeSource("no_voxel", None, _reference(10.0))
    r = rank_sources(target, [big, unknown], n_tiles=5, n_permutations=0, cache_dir=False, match_voxel_size=True,
                     target_voxel_size_nm=(8.0, 8.0))
    by = {e.name: e for e in r}
    assert (by["needs_64px"].cut_size, by["needs_64px"].tile_size) == (40, 20)
    assert any("field of view" in w for w in by["needs_64px"].warnings)
    assert (by["no_voxel"].cut_size, by["no_voxel"].tile_size) == (32, 32)
    assert any("not resampled" in w for w in by["no_voxel"].warnings)


@pytest.mark.parametrize("voxel", [(-1.0, 4.0, 4.0), (4.0,), (4.0, 0.0), ("a", "b"), (1, 2, 3, 4), (np.nan, 4.0)])
def test_bad_target_voxel_sizes_are_typed_errors(voxel):
    src = FakeSource("s", [4.0, 4.0], _reference(10.0))
    with pytest.raises(InputValueError, match="voxel_size"):
        rank_sources(_stripes(10.0), [src], n_tiles=4, n_permutations=0, cache_dir=False,
                     target_voxel_size_nm=voxel)


def test_match_voxel_size_needs_the_targets_voxel_size():
    src = FakeSource("s", [4.0, 4.0], _reference(10.0))
    with pytest.raises(InputValueError, match="voxel size"):
        rank_sources(_stripes(10.0), [src], n_tiles=4, n_permutations=0, cache_dir=False, match_voxel_size=True)
    # a Volume that records its voxel size needs nothing more
    vol = nr.open_volume(_stripes(10.0), voxel_size_nm=(40.0, 8.0, 8.0))
    assert rank_sources(vol, [src], n_tiles=4, n_permutations=0, cache_dir=False,
                        match_voxel_size=True)[0].cut_size == 16


# --------------------------------------------------------------------------------------------
# calibrations and pooled-statistic subsets
# --------------------------------------------------------------------------------------------
def _k(a, b, sigma):
    return np.exp(-((a[:, None] - b[None]) ** 2).sum(-1) / (2 * sigma**2))


def test_calibrations_match_float64_numpy():
    target = _stripes(10.0)
    srcs = [FakeSource("a", [8.0, 8.0], _reference(10.0, seed=3)), FakeSource("b", [8.0, 8.0], _reference(7.0))]
    kw = dict(n_tiles=30, seed=4, n_permutations=50, cache_dir=False)
    raw = rank_sources(target, srcs, **kw)
    z = rank_sources(target, srcs, calibration="null_z", **kw)
    rel = rank_sources(target, srcs, calibration="relative", **kw)
    tiles = nr.sample_tiles(target, 30, 32, seed=4).tiles
    for src in srcs:
        e_raw, e_z, e_rel = (next(e for e in r if e.name == src.name) for r in (raw, z, rel))
        assert e_raw.score == e_raw.mmd2 and e_z.mmd2 == e_raw.mmd2 and e_rel.mmd2 == e_raw.mmd2
        # the default pooling compares the per-channel means: the first half of mean+std columns
        ref, feats = standardize(src.reference_features[:, :2], _describe(tiles)[:, :2])
        x, y = ref.astype(np.float64), feats.astype(np.float64)
        s = e_raw.sigma
        kxx, kyy, kxy = _k(x, x, s), _k(y, y, s), _k(x, y, s)
        wx = (kxx.sum() - np.trace(kxx)) / (len(x) * (len(x) - 1))
        wy = (kyy.sum() - np.trace(kyy)) / (len(y) * (len(y) - 1))
        mmd = wx + wy - 2 * kxy.mean()
        assert e_raw.mmd2 == pytest.approx(mmd, rel=1e-3, abs=1e-6)
        assert e_rel.score == pytest.approx(mmd / (wx + wy), rel=1e-3, abs=1e-6)
        # z against the permutation null of mmd2_test (same seed, same draws), recomputed in float64
        null = np.asarray(nr.mmd2_test(ref, feats, n_permutations=50, seed=4).null, dtype=np.float64)
        assert e_z.score == pytest.approx((e_raw.mmd2 - null.mean()) / null.std(ddof=1), rel=1e-3)
    # each ranking is sorted by its own score
    for r in (raw, z, rel):
        assert [e.score for e in r] == sorted(e.score for e in r)


def test_calibrated_score_errors():
    with pytest.raises(InputValueError):
        calibrated_score(0.1, "null_z", null=np.array([0.0]))
    with pytest.raises(InputValueError):
        calibrated_score(0.1, "relative")
    with pytest.raises(InputValueError):
        calibrated_score(0.1, "bogus")
    src = FakeSource("s", [4.0, 4.0], _reference(10.0))
    with pytest.raises(InputValueError, match="n_permutations"):
        rank_sources(_stripes(10.0), [src], n_tiles=4, n_permutations=0, cache_dir=False, calibration="null_z")
    with pytest.raises(InputValueError, match="calibration"):
        rank_sources(_stripes(10.0), [src], n_tiles=4, cache_dir=False, calibration="zscore")


def test_pooling_subset_equals_a_source_with_only_those_columns():
    target = _stripes(10.0)
    full = FakeSource("full", [8.0, 8.0], _reference(12.0))
    for part, cols in (("mean", slice(0, 2)), ("std", slice(2, 4)), ("auto", slice(0, 2)), ("all", slice(0, 4))):
        sub = FakeSource("full", [8.0, 8.0], full.reference_features[:, cols], pooling=part if part == "mean" else "max")
        sub.embed = lambda tiles, c=cols, **kw: _describe(tiles)[:, c].astype(np.float32)
        a = rank_sources(target, [full], n_tiles=20, seed=1, n_permutations=20, cache_dir=False, pooling=part)[0]
        b = rank_sources(target, [sub], n_tiles=20, seed=1, n_permutations=20, cache_dir=False)[0]
        assert a.mmd2 == pytest.approx(b.mmd2, rel=1e-6, abs=1e-9) and a.p_value == b.p_value
    # a package pooled otherwise: "auto" and "mean" (for a mean-pooled one) use all of its columns
    only_mean = FakeSource("m", [8.0, 8.0], _reference(12.0)[:, :2], pooling="mean")
    only_mean.embed = lambda tiles, **kw: _describe(tiles)[:, :2].astype(np.float32)
    a = rank_sources(target, [only_mean], n_tiles=20, seed=1, n_permutations=0, cache_dir=False)
    assert a[0].mmd2 == rank_sources(target, [only_mean], n_tiles=20, seed=1, n_permutations=0, cache_dir=False,
                                     pooling="mean")[0].mmd2
    assert a.settings["compared"] == {"m": "mean"}
    assert rank_sources(target, [full], n_tiles=4, n_permutations=0, cache_dir=False).settings["compared"] == \
        {"full": "mean of mean+std"}
    with pytest.raises(InputValueError, match="mean\\+std"):
        rank_sources(target, [only_mean], n_tiles=4, cache_dir=False, pooling="std")
    with pytest.raises(InputValueError, match="pooling"):
        rank_sources(target, [full], n_tiles=4, cache_dir=False, pooling="max")


def test_scores_survive_json_and_old_rankings_sort_by_mmd2(tmp_path):
    srcs = [FakeSource("a", [8.0, 8.0], _reference(10.0, seed=3)), FakeSource("b", [8.0, 8.0], _reference(7.0))]
    r = rank_sources(_stripes(10.0), srcs, n_tiles=20, n_permutations=20, cache_dir=False, calibration="null_z")
    back = SourceRanking.from_json(r.to_json())
    assert back.names == r.names and [e.score for e in back] == [e.score for e in r]
    d = r.to_dict()
    for row in d["ranking"]:
        row.pop("score")
        row.pop("cut_size")
    old = SourceRanking.from_json(json.dumps(d))
    assert [e.mmd2 for e in old] == sorted(e.mmd2 for e in old)


# --------------------------------------------------------------------------------------------
# the rank command
# --------------------------------------------------------------------------------------------
def test_rank_cli_options(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from neuroadda_rt.cli import main

    pkg = nr.synthetic_zoo().root / "syn01"
    src_nm = float(np.mean(nr.load_model(pkg).metadata["voxel_size_nm"][-2:]))
    np.save(tmp_path / "t.npy", _stripes(10.0, shape=(2, 272, 272)))
    base = ["rank", str(tmp_path / "t.npy"), "--zoo", str(pkg), "--no-cache", "--no-progress", "--n-tiles", "4",
            "--permutations", "5"]
    capsys.readouterr()
    assert main(base + ["--match-voxel-size"]) == 2  # a .npy records no voxel size
    err = capsys.readouterr().err.strip()
    assert "voxel size" in err and len(err.splitlines()) == 1 and "Traceback" not in err
    capsys.readouterr()
    assert main(base + ["--match-voxel-size", "--voxel-size", f"{src_nm / 2:g},{src_nm / 2:g}", "--calibration",
                        "null_z", "--pooling", "all", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    row = out["ranking"][0]
    size = nr.load_model(pkg).metadata["reference_features"]["tile_size"]
    assert (row["cut_size"], row["tile_size"]) == (2 * size, size)  # half the target pixel: twice the tile
    assert out["settings"]["calibration"] == "null_z" and out["settings"]["pooling"] == "all"
    assert row["score"] != row["mmd2"]
