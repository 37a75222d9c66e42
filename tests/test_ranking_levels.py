"""benchmarks/ranking_levels.py (issue 16 item 2, ``docs/results.md`` §5.6): its scores against an independent
recomputation (scipy's Spearman over hand-pooled ranks), the decision rule on fabricated rankings, the filter of the
transfer runs, and, on real data, that a level copy of a shipped package reproduces the package's reference
features (which checks the redrawn training tiles)."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
from scipy.stats import rankdata, spearmanr

from _benchmarks import load_benchmark

rl = load_benchmark("ranking_levels")

SOURCES = ("a", "b", "c")


def _fabricate(rng):
    """3 targets x 3 sources, VI rising a -> b -> c by a margin much larger than the tile noise; a variant that
    orders the sources a, b, c on every target and seed (``L3/mean``), the default reversed, the rest in between."""
    tile_vi = {4: {t: {s: 0.3 + 0.4 * i + rng.normal(0, 0.02, (3, 32)) for i, s in enumerate(SOURCES)}
                   for t in ("t1", "t2", "t3")}}
    good, bad, mid = list(SOURCES), list(SOURCES[::-1]), ["b", "a", "c"]
    rank = {v: {t: {str(s): {"order": good if v == "L3/mean" else bad if v == rl.DEFAULT else mid}
                    for s in rl.SEEDS} for t in tile_vi[4]} for v in rl.VARIANTS}
    return tile_vi, rank


def test_pooled_rho_and_regret_match_an_independent_recomputation(rng):
    tile_vi, rank = _fabricate(rng)
    s = rl.summarize(rank, tile_vi, rl.SEEDS)["by_n"][4]
    for v, order in (("L3/mean", list(SOURCES)), (rl.DEFAULT, list(SOURCES[::-1])), ("L0/all", ["b", "a", "c"])):
        xs, ys, regrets = [], [], []
        for d in tile_vi[4].values():
            mean = {k: a.mean() for k, a in d.items()}
            xs += [order.index(k) + 1 for k in SOURCES]
            ys += list(rankdata([mean[k] for k in SOURCES]))
            regrets.append(mean[order[0]] - min(mean.values()))
        assert s["variants"][v]["pooled_rho"] == pytest.approx(spearmanr(xs, ys).statistic)
        assert s["variants"][v]["mean_regret"] == pytest.approx(np.mean(regrets))
    assert s["variants"]["L3/mean"]["pooled_rho"] == pytest.approx(1.0)
    assert s["variants"][rl.DEFAULT]["pooled_rho"] == pytest.approx(-1.0)


def test_rule_adopts_a_variant_only_beyond_the_bootstrap_spread(rng):
    tile_vi, rank = _fabricate(rng)
    out = rl.summarize(rank, tile_vi, rl.SEEDS)
    assert out["new_default"] == "L3/mean"  # better than the reversed default in every resample
    assert out["by_n"][4]["variants"]["L3/mean"]["bootstrap"]["delta_vs_default_p5_p95"][0] > 0
    # sources that do not differ: no variant beats the default beyond the resampling noise
    flat = {4: {t: {k: 0.5 + rng.normal(0, 0.2, (3, 32)) for k in SOURCES} for t in tile_vi[4]}}
    out = rl.summarize(rank, flat, rl.SEEDS)
    assert out["new_default"] is None and out["qualifies"] == []


def test_transfer_rows_are_filtered_by_settings_and_seeds(tmp_path, rng):
    defaults = argparse.Namespace(steps=rl.FT_STEPS, n_test=rl.N_TEST, pool=rl.POOL)
    (tmp_path / "runs").mkdir()
    truth = {}

    def row(target, init, n, seed, *, kind="source", rid=None):
        r = {"target": target, "init": init, "n": n, "seed": seed, "init_kind": kind}
        r["run_id"] = rid or rl.run_id(r, defaults)
        r["tile_vi"] = truth.setdefault((target, init, n, seed, r["run_id"]), rng.random(32).tolist())
        (tmp_path / "runs" / f"{r['run_id']}.json").write_text(json.dumps(r))

    for seed in range(3):
        for s in SOURCES:
            row("t1", s, 4, seed)
        row("t1", "scratch", 4, seed, kind="scratch", rid=f"t1__scratch__n4__s{seed}__x")
    row("t1", "a", 4, 0, rid="t1__a__n4__s0__otherset")  # another setting: left out
    for s in SOURCES:  # t2 at n = 4: source c lacks seed 1, so the target is left out
        for seed in (0, 1) if s != "c" else (0,):
            row("t2", s, 4, seed)
    got = rl.transfer_tile_vi(tmp_path)
    assert set(got) == {4} and set(got[4]) == {"t1"} and set(got[4]["t1"]) == set(SOURCES)
    for s in SOURCES:
        want = np.stack([truth[next(k for k in truth if k[:4] == ("t1", s, 4, seed) and "otherset" not in k[4])]
                         for seed in range(3)])
        np.testing.assert_array_equal(got[4]["t1"][s], want)


@pytest.mark.realdata
def test_level_copy_reproduces_the_shipped_reference_features(tmp_path, em_data):
    import neuroadda_rt as nr

    pkg = next(p for p in nr.default_zoo() if p.name == "gala_fibsem")
    tiles = rl.reference_tiles_of(pkg, em_data)
    copy = rl.level_package(pkg, pkg.feature_level, tmp_path / "copy", lambda: tiles)
    np.testing.assert_allclose(copy.reference_features, pkg.reference_features, rtol=1e-5, atol=1e-5)
    assert copy.metadata["reference_features"]["copied_from"] == pkg.sha256
    deeper = rl.level_package(pkg, pkg.feature_level + 1, tmp_path / "deeper", lambda: tiles)
    assert deeper.feature_level == pkg.feature_level + 1
    width = pkg.config["widths"][pkg.feature_level + 1]
    assert deeper.reference_features.shape == (pkg.reference_features.shape[0], 2 * width)

    def no_tiles():
        raise AssertionError("an existing copy of the same package was rebuilt")

    # a second call reuses the copy of the same package without drawing tiles
    assert rl.level_package(pkg, pkg.feature_level + 1, tmp_path / "deeper", no_tiles).sha256 == deeper.sha256


def test_vectorised_bootstrap_equals_the_plain_loop(rng):
    """The bootstrap's ρ against a loop over resamples with the proxy's ``pooled_rho`` (same random draws)."""
    tile_vi, rank = _fabricate(rng)
    per_target = {t: {k: a + rng.normal(0, 0.5, a.shape) for k, a in d.items()} for t, d in tile_vi[4].items()}
    rank["L1/all"] = {t: {str(s): {"order": list(rng.permutation(SOURCES))} for s in rl.SEEDS} for t in per_target}
    got = rl._bootstrap_rho(rank, per_target, rl.SEEDS, n_boot=40)
    draws = np.random.default_rng(0)
    for b in range(40):
        vi_b = {}
        for t in sorted(per_target):
            si, ti = draws.integers(0, 3, 3), draws.integers(0, 32, 32)
            vi_b[t] = {k: float(a[np.ix_(si, ti)].mean()) for k, a in per_target[t].items()}
        for v in rank:
            want = np.mean([rl.pooled_rho({t: rank[v][t][str(s)]["order"] for t in vi_b}, vi_b) for s in rl.SEEDS])
            assert got[v][b] == pytest.approx(want, abs=1e-12)
