"""Source ranking: MMD² and permutation p-values against a float64 NumPy reference on the same
tiles and features, the ordering on a family with known relatives, the feature cache, and the
accepted target / zoo types and errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("torch")

import _workflow_zoo as wz  # noqa: E402

import neuroadda_rt as nr  # noqa: E402
from neuroadda_rt.errors import InputValueError, ShapeError  # noqa: E402
from neuroadda_rt.ranking import SourceRanking, rank_sources  # noqa: E402

N_TILES = 24


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return wz.shared_zoo(tmp_path_factory)


@pytest.fixture(scope="module")
def targets():
    return [wz.volume(s, seed=300 + i)[0] for i, s in enumerate(wz.domains())]


def _mmd2_ref(x, y, sigma):
    """Unbiased MMD² (Gretton et al. 2012, eq. 3) in float64, by brute force."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)

    def k(a, b):
        return np.exp(-((a[:, None] - b[None]) ** 2).sum(-1) / (2 * sigma**2))

    n, m = len(x), len(y)
    kxx, kyy = k(x, x), k(y, y)
    return ((kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
            - 2 * k(x, y).mean())


def test_mmd2_and_p_values_match_reference(zoo, targets, tmp_path):
    target = targets[1]
    r = rank_sources(target, zoo, n_tiles=N_TILES, tile_size=wz.TILE, seed=3, n_permutations=60,
                     cache_dir=tmp_path)
    tiles = nr.sample_tiles(target, N_TILES, wz.TILE, seed=3)
    np.testing.assert_array_equal(r.target_coords, tiles.coords)
    for e in r:
        pkg = nr.load_model(e.path)
        feats = nr.FeatureExtractor(pkg, backend="onnxruntime", pooling=pkg.pooling).features(tiles.tiles)
        # the documented standardisation by the reference's per-channel mean and sd, in float64
        raw = pkg.reference_features.astype(np.float64)
        mu, sd = raw.mean(0), raw.std(0)
        sd = np.maximum(sd, 1e-3 * sd.max())
        ref, feats = (raw - mu) / sd, (feats - mu) / sd
        # median heuristic on the pooled sample, as mmd2_test documents
        z = np.concatenate([ref, feats]).astype(np.float64)
        d2 = ((z[:, None] - z[None]) ** 2).sum(-1)[np.triu_indices(len(z), 1)]
        assert e.sigma == pytest.approx(np.sqrt(np.median(d2) / 2), rel=1e-3)
        assert e.mmd2 == pytest.approx(_mmd2_ref(ref, feats, e.sigma), rel=1e-3, abs=1e-6)
        # permutation p-value with the documented draw order
        rng = np.random.default_rng(3)
        null = []
        for _ in range(60):
            idx = rng.permutation(len(z))
            a = np.zeros(len(z), bool)
            a[idx[: len(ref)]] = True
            null.append(_mmd2_ref(z[a], z[~a], e.sigma))
        p = (1 + np.sum(np.asarray(null) >= e.mmd2 - 1e-9)) / 61
        assert e.p_value == pytest.approx(p, abs=1.5 / 61)
        # the noise level reported beside MMD²: the null's 95th percentile (float32 kernels vs float64 here)
        assert e.null_mmd2_95 == pytest.approx(np.quantile(null, 0.95), rel=1e-3, abs=1e-6)
        assert e.n_reference == len(ref) and e.n_target == N_TILES


def test_each_domain_ranks_its_own_source_first(zoo, targets):
    names = [s.name for s in wz.domains()]
    for name, target in zip(names, targets):
        r = rank_sources(target, zoo, n_tiles=N_TILES, tile_size=wz.TILE, n_permutations=50, cache_dir=False)
        assert r[0].name == name, r
        assert [e.mmd2 for e in r] == sorted(e.mmd2 for e in r)
        assert r.best.name == name and r.best.path == r[0].model.path
        # the far domain differs significantly from the near ones (and vice versa)
        assert {e.name: e.p_value for e in r}["far" if name != "far" else "near_a"] < 0.05


def test_result_exports(zoo, targets, tmp_path):
    r = rank_sources(targets[0], zoo, n_tiles=N_TILES, tile_size=wz.TILE, n_permutations=20, cache_dir=False)
    df = r.to_frame()
    assert list(df["name"]) == r.names and list(df.index) == [1, 2, 3]
    assert {"mmd2", "p_value", "sigma", "path", "sha256"} <= set(df.columns)
    d = json.loads(r.to_json(tmp_path / "r.json"))
    assert [x["name"] for x in d["ranking"]] == r.names and d["settings"]["n_tiles"] == N_TILES
    back = SourceRanking.from_json(tmp_path / "r.json")
    assert back.names == r.names and back[0].mmd2 == r[0].mmd2
    assert back.best.name == r.best.name  # loaded again from its path
    assert "near_a" in repr(r)


def test_zoo_and_target_kinds_agree(zoo, targets, tmp_path):
    tifffile = pytest.importorskip("tifffile")
    kw = dict(n_tiles=N_TILES, tile_size=wz.TILE, n_permutations=0, cache_dir=False)
    ref = rank_sources(targets[0], zoo, **kw)
    assert np.isnan(ref[0].p_value)  # no test asked for
    pkgs = [nr.load_model(p) for p in zoo]
    from_pkgs = rank_sources(targets[0], pkgs, **kw)
    from_zoo = rank_sources(targets[0], nr.Zoo(zoo[0].parent), **kw)
    from_dir = rank_sources(targets[0], str(zoo[0].parent), **kw)
    path = tmp_path / "target.tif"
    tifffile.imwrite(path, targets[0], photometric="minisblack")
    from_path = rank_sources(str(path), zoo, **kw)
    from_volume = rank_sources(nr.open_volume(path), zoo, **kw)
    for other in (from_pkgs, from_zoo, from_dir, from_path, from_volume):
        assert other.names == ref.names
        np.testing.assert_allclose([e.mmd2 for e in other], [e.mmd2 for e in ref], rtol=1e-6)
    # the unbiased statistic alone equals mmd2() on the same features
    pkg = pkgs[0]
    tiles = nr.sample_tiles(targets[0], N_TILES, wz.TILE, seed=0).tiles
    feats = nr.FeatureExtractor(pkg, pooling=pkg.pooling).features(tiles)
    by = {e.name: e for e in ref}
    from neuroadda_rt.ranking import standardize

    assert by[pkg.name].mmd2 == pytest.approx(nr.mmd2(*standardize(pkg.reference_features, feats)), rel=1e-6)


def test_feature_cache(zoo, targets, tmp_path, monkeypatch):
    monkeypatch.setenv("NEUROADDA_CACHE", str(tmp_path / "envcache"))
    kw = dict(n_tiles=N_TILES, tile_size=wz.TILE, n_permutations=20)
    first = rank_sources(targets[2], zoo, **kw)
    files = sorted((tmp_path / "envcache" / "features").rglob("*.npy"))
    assert len(files) == 3 and not any(f.name.endswith(".tmp") for f in files)
    assert not any(e.cached for e in first)

    calls = []
    from neuroadda_rt._sources import PackageSource

    real = PackageSource.embed
    monkeypatch.setattr(PackageSource, "embed", lambda *a, **k: calls.append(1) or real(*a, **k))
    second = rank_sources(targets[2], zoo, **kw)
    assert calls == [] and all(e.cached for e in second)
    assert [(e.name, e.mmd2, e.p_value) for e in second] == [(e.name, e.mmd2, e.p_value) for e in first]
    # another tile sample, another model or a changed target: new keys
    rank_sources(targets[2], zoo, **{**kw, "seed": 1})
    assert len(calls) == 3
    changed = targets[2] ^ 1  # every pixel: the key hashes the sampled tiles' content
    rank_sources(changed, zoo, **{**kw, "seed": 1})
    assert len(calls) == 6
    # a corrupt entry is recomputed, not trusted
    files = sorted((tmp_path / "envcache" / "features").rglob("*.npy"), key=os.path.getmtime)
    files[0].write_bytes(b"garbage")
    rank_sources(targets[2], zoo, **kw)
    rank_sources(changed, zoo, **{**kw, "seed": 1})
    assert len(calls) == 7
    # cache_dir=False never writes
    n = len(list((tmp_path / "envcache").rglob("*.npy")))
    rank_sources(targets[1], zoo, **{**kw, "cache_dir": False})
    assert len(list((tmp_path / "envcache").rglob("*.npy"))) == n


def test_errors(zoo, targets, tmp_path):
    kw = dict(tile_size=wz.TILE, n_permutations=0, cache_dir=False)
    with pytest.raises(FileNotFoundError, match="target volume not found"):
        rank_sources(tmp_path / "missing.h5", zoo, n_tiles=4, **kw)
    with pytest.raises(FileNotFoundError, match="zoo not found"):
        rank_sources(targets[0], tmp_path / "nozoo", n_tiles=4, **kw)
    with pytest.raises(FileNotFoundError, match="model package not found"):
        rank_sources(targets[0], [tmp_path / "nomodel"], n_tiles=4, **kw)
    with pytest.raises(InputValueError, match="at least one source model"):
        rank_sources(targets[0], [], n_tiles=4, **kw)
    with pytest.raises(InputValueError, match="n_tiles >= 2"):
        rank_sources(targets[0], zoo, n_tiles=1, **kw)
    with pytest.raises(ShapeError, match="at least 200x200"):
        rank_sources(targets[0], zoo, n_tiles=4, tile_size=200, n_permutations=0, cache_dir=False)
    with pytest.raises(ShapeError):
        rank_sources(np.zeros(5, np.uint8), zoo, n_tiles=4, **kw)
    with pytest.raises(InputValueError, match="expected a target"):
        rank_sources(object(), zoo, n_tiles=4, **kw)


# --------------------------------------------------------------------------------------------
# issue 19
# --------------------------------------------------------------------------------------------
def test_feature_cache_key_holds_the_intensity_rule(zoo, targets, tmp_path):
    """Two packages with the same weights and another normalization shared cache entries: the
    second got the first's target features."""
    from neuroadda_rt.package import save_model

    base = nr.load_model(zoo[1])
    a = save_model(base, tmp_path / "m" / "dtype_rule", name="dtype_rule", normalization={"rule": "dtype"})
    b = save_model(base, tmp_path / "m" / "pct_rule", name="pct_rule",
                   normalization={"rule": "percentile", "low": 20.0, "high": 80.0})
    # the case of the bug: the same files (weights, encoder, reference features), another rule
    assert a.metadata["files"] == b.metadata["files"] and a.normalization != b.normalization
    kw = dict(n_tiles=N_TILES, tile_size=wz.TILE, n_permutations=0)
    cache = tmp_path / "cache"
    first = rank_sources(targets[0], [a], cache_dir=cache, **kw)[0]
    second = rank_sources(targets[0], [b], cache_dir=cache, **kw)[0]
    assert not second.cached
    # independent reference: b's own features of the same tiles, no cache
    tiles = nr.sample_tiles(targets[0], N_TILES, wz.TILE, seed=0).tiles
    from neuroadda_rt.ranking import standardize

    for pkg, got in ((a, first), (b, second)):
        feats = nr.FeatureExtractor(pkg, pooling=pkg.pooling).features(tiles)
        assert got.mmd2 == pytest.approx(nr.mmd2(*standardize(pkg.reference_features, feats)), rel=1e-5)
    assert second.mmd2 != pytest.approx(first.mmd2, rel=1e-3)
    # each package's entry is reused by that package alone
    assert rank_sources(targets[0], [b], cache_dir=cache, **kw)[0].cached
    assert rank_sources(targets[0], [a], cache_dir=cache, **kw)[0].mmd2 == first.mmd2
    assert len(list((cache / "features").rglob("*.npy"))) == 2


def test_feature_cache_key_changes_with_everything_that_changes_a_feature():
    from dataclasses import dataclass, replace

    from neuroadda_rt.ranking import _cache_key

    @dataclass(frozen=True)
    class Src:
        name: str = "s"
        sha256: str = "0" * 64
        normalization: dict = None
        feature_level: int = 2
        pooling: str = "mean"
        precision: str = "fp32"

    s = Src(normalization={"rule": "dtype"})
    k = _cache_key("c", s, 32)
    variants = [replace(s, normalization={"rule": "fixed", "low": 0.0, "high": 9.0}), replace(s, feature_level=1),
                replace(s, pooling="max"), replace(s, precision="fp16"), replace(s, sha256="1" * 64)]
    keys = {k, _cache_key("c", s, 64), _cache_key("d", s, 32), *(_cache_key("c", v, 32) for v in variants)}
    assert len(keys) == 3 + len(variants)
    assert _cache_key("c", Src(normalization={"rule": "dtype"}), 32) == k  # deterministic


@pytest.mark.parametrize("content", [b"", "forged"])
def test_empty_or_forged_cache_entry_is_recomputed(zoo, targets, tmp_path, content):
    """A 0-byte entry raised EOFError; a header claiming (2**40, 16) asked for 64 TiB."""
    kw = dict(n_tiles=N_TILES, tile_size=wz.TILE, n_permutations=0)
    ref = rank_sources(targets[0], zoo[:1], cache_dir=False, **kw)[0]
    rank_sources(targets[0], zoo[:1], cache_dir=tmp_path, **kw)
    (entry,) = (tmp_path / "features").rglob("*.npy")
    if content == "forged":
        data = np.load(entry)
        h = repr({"descr": "<f4", "fortran_order": False, "shape": (2**40, 16)}).encode("latin1")
        h += b" " * (63 - (10 + len(h)) % 64) + b"\n"
        entry.write_bytes(b"\x93NUMPY\x01\x00" + len(h).to_bytes(2, "little") + h + data.tobytes())
    else:
        entry.write_bytes(b"")
    again = rank_sources(targets[0], zoo[:1], cache_dir=tmp_path, **kw)[0]
    assert not again.cached and again.mmd2 == pytest.approx(ref.mmd2, rel=1e-6)
    assert rank_sources(targets[0], zoo[:1], cache_dir=tmp_path, **kw)[0].cached  # rewritten


def test_targets_that_are_not_2d_or_3d_are_refused(zoo, tmp_path):
    """4-D arrays were ranked as if 3-D; a scalar dataset gave 'min() arg is an empty sequence'."""
    kw = dict(n_tiles=4, tile_size=wz.TILE, n_permutations=0, cache_dir=False)
    four = np.zeros((2, 2, 64, 64), np.uint8)
    np.save(tmp_path / "four.npy", four)
    np.save(tmp_path / "scalar.npy", np.float32(3.0))
    for target in (four, tmp_path / "four.npy", nr.open_volume(tmp_path / "four.npy")):
        with pytest.raises(ShapeError, match=r"expected a 2-D image or 3-D volume as target, got shape \(2, 2, 64, 64\)"):
            rank_sources(target, zoo, **kw)
    for target in (tmp_path / "scalar.npy", nr.open_volume(tmp_path / "scalar.npy")):
        with pytest.raises(ShapeError, match=r"scalar \(0-D\)") as exc:
            rank_sources(target, zoo, **kw)
        assert "scalar.npy" in str(exc.value)
    with pytest.raises(ShapeError, match="non-empty target"):
        rank_sources(nr.open_volume(np.zeros((0, 64, 64), np.uint8)), zoo, **kw)
