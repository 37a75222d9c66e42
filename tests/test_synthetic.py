"""Synthetic EM domains: determinism, label conventions, physics of the picture, artefact
masks, and domain families whose parameter distances follow the tree."""

from __future__ import annotations

import re

import numpy as np
import pytest

from neuroadda_rt import InputValueError, ShapeError
from neuroadda_rt.study.synthetic import (ARTEFACT_KINDS, PARAMETER_BOUNDS, DomainStyle, apply_artefact, domain_family,
                                    make_domain)

SHAPE = (4, 128, 128)


@pytest.fixture(scope="module")
def vol():
    return make_domain(DomainStyle(), SHAPE, seed=11)


def test_deterministic_bytes_and_seed_dependence(vol):
    img, lab = vol
    img2, lab2 = make_domain(DomainStyle(), SHAPE, seed=11)
    assert img.tobytes() == img2.tobytes() and lab.tobytes() == lab2.tobytes()
    img3, lab3 = make_domain(DomainStyle(), SHAPE, seed=12)
    assert img.tobytes() != img3.tobytes() and lab.tobytes() != lab3.tobytes()
    assert img.dtype == np.uint8 and lab.dtype == np.uint32 and img.shape == lab.shape == SHAPE


def test_label_conventions(vol):
    img, lab = vol
    ids = np.unique(lab)
    assert ids[0] == 0 and np.array_equal(ids, np.arange(ids.size))  # 0 + consecutive ids
    assert 0.03 < (lab == 0).mean() < 0.5
    # membranes and gaps are darker than cytoplasm on average
    assert img[lab == 0].mean() < img[lab > 0].mean() - 10
    # neurites are continuous across z: most interior voxels keep their id in the next slice
    both = (lab[:-1] > 0) & (lab[1:] > 0)
    assert (lab[:-1][both] == lab[1:][both]).mean() > 0.8
    # segments are mostly single connected pieces per slice (learnable, clean instances)
    import cc3d

    for z in range(SHAPE[0]):
        pieces = cc3d.connected_components(lab[z], connectivity=4)
        assert np.bincount(pieces.ravel())[1:].min() >= 12  # no slivers
        assert pieces.max() <= 1.3 * (np.unique(lab[z]).size - 1) + 2


def test_2d_and_style_effects():
    thin, _ = make_domain(DomainStyle(membrane_thickness_px=1.5, ecs_fraction=0.0), (96, 96), seed=3)
    thick, lab_thick = make_domain(DomainStyle(membrane_thickness_px=6.0, ecs_fraction=0.0), (96, 96), seed=3)
    assert thin.shape == (96, 96)
    _, lab_thin = make_domain(DomainStyle(membrane_thickness_px=1.5, ecs_fraction=0.0), (96, 96), seed=3)
    assert (lab_thick == 0).mean() > 1.8 * (lab_thin == 0).mean()
    noisy, _ = make_domain(DomainStyle(photons=5.0, blur_sigma_px=0.0), (96, 96), seed=3)
    clean, _ = make_domain(DomainStyle(photons=1000.0, read_noise=0.0, blur_sigma_px=0.0), (96, 96), seed=3)
    hp = lambda a: np.abs(np.diff(a.astype(float), axis=1)).mean()  # noqa: E731
    assert hp(noisy) > 2 * hp(clean)
    dark, _ = make_domain(DomainStyle(brightness=-0.2), (64, 64), seed=3)
    bright, _ = make_domain(DomainStyle(brightness=0.2), (64, 64), seed=3)
    assert bright.mean() > dark.mean() + 40
    inv, _ = make_domain(DomainStyle(invert=True), (64, 64), seed=3)
    normal, _ = make_domain(DomainStyle(), (64, 64), seed=3)
    _, lab = make_domain(DomainStyle(), (64, 64), seed=3)
    assert inv[lab == 0].mean() > inv[lab > 0].mean() and normal[lab == 0].mean() < normal[lab > 0].mean()


def test_artefacts_masks_and_clean_elsewhere(vol):
    img, lab = vol
    rates = {k: 0.5 for k in ARTEFACT_KINDS}
    a_img, a_lab, masks = make_domain(DomainStyle(), SHAPE, seed=11, artefacts=rates)
    assert set(masks) == set(ARTEFACT_KINDS) and a_lab.tobytes() == lab.tobytes()
    anym = np.zeros(SHAPE, bool)
    for k, m in masks.items():
        assert m.dtype == bool and m.shape == SHAPE
        anym |= m
    assert anym.any()
    np.testing.assert_array_equal(a_img[~anym], img[~anym])  # the clean image does not depend on artefacts
    changed = a_img != img
    assert (changed & ~anym).sum() == 0 and changed.any()
    all_missing = make_domain(DomainStyle(), SHAPE, seed=11, artefacts={"missing_section": 1.0})[2]
    assert all_missing["missing_section"].all()
    none = make_domain(DomainStyle(), SHAPE, seed=11, artefacts={"fold": 0.0})[2]
    assert not none["fold"].any()
    with pytest.raises(InputValueError, match="artefact kinds"):
        make_domain(None, (32, 32), seed=0, artefacts={"scratch": 0.1})
    with pytest.raises(InputValueError, match="rate"):
        make_domain(None, (32, 32), seed=0, artefacts={"fold": 2})


@pytest.mark.parametrize("kind", ARTEFACT_KINDS)
def test_apply_artefact(vol, kind):
    tile = vol[0][0]
    out, m = apply_artefact(tile, kind, seed=4)
    out2, m2 = apply_artefact(tile, kind, seed=4)
    assert out.dtype == np.uint8 and m.dtype == bool and m.shape == tile.shape
    assert np.array_equal(out, out2) and np.array_equal(m, m2)
    assert m.any() and not np.array_equal(out, tile)
    np.testing.assert_array_equal(out[~m], tile[~m])  # untouched outside the mask
    if kind == "missing_section":
        assert out.std() < 8
    if kind == "defocus":
        assert np.abs(np.diff(out.astype(float), axis=1)).mean() < np.abs(np.diff(tile.astype(float), axis=1)).mean()
    f, mf = apply_artefact(tile.astype(np.float32) / 255, kind, seed=4)
    assert f.dtype == np.float32 and 0 <= f.min() and f.max() <= 1
    stack, ms = apply_artefact(vol[0][:2], kind, seed=1)
    assert stack.shape == ms.shape == vol[0][:2].shape


def test_style_validation_and_vector_roundtrip():
    with pytest.raises(InputValueError, match="membrane_thickness_px"):
        DomainStyle(membrane_thickness_px=100.0)
    s = DomainStyle(photons=30.0, gamma=1.3)
    back = DomainStyle.from_vector(s.to_vector(), name=s.name)
    for k in PARAMETER_BOUNDS:
        assert getattr(back, k) == pytest.approx(getattr(s, k), rel=1e-3, abs=1e-3)
    assert DomainStyle.from_dict(s.to_dict()) == s
    with pytest.raises(ShapeError):
        make_domain(s, (2, 3, 4, 5), seed=0)
    with pytest.raises(ShapeError):
        DomainStyle.from_vector(np.zeros(3))


def _patristic(newick: str):
    """Leaf names and path lengths of a Newick tree, read by scikit-bio (independent of the generator)."""
    from neuroadda_rt.study.zoo_build import patristic_table

    table = patristic_table({"newick": newick})
    names = list(table)
    return names, np.array([[table[a][b] for b in names] for a in names])


@pytest.mark.parametrize(("tree", "seed"), [("coalescent", 0), ("coalescent", 11), ("yule", 3), ("yule", 158)])
def test_domain_family_returns_the_patristic_distances_of_its_newick_tree(tree, seed):
    pytest.importorskip("skbio")
    styles, newick, pat = domain_family(9, seed=seed, tree=tree, return_patristic=True)
    assert domain_family(9, seed=seed, tree=tree) == (styles, newick)
    tree_names, ref = _patristic(newick)
    order = [tree_names.index(s.name) for s in styles]
    np.testing.assert_allclose(pat, ref[np.ix_(order, order)], rtol=1e-9, atol=1e-12)


def test_domain_family_tree_and_drift():
    styles, newick = domain_family(10, seed=3)
    styles2, newick2 = domain_family(10, seed=3)
    assert newick == newick2 and styles == styles2
    assert domain_family(10, seed=4)[1] != newick
    names = [s.name for s in styles]
    assert names == [f"syn{i:02d}" for i in range(10)]
    assert sorted(re.findall(r"syn\d\d", newick)) == names and newick.endswith(";")
    tree_names, pat = _patristic(newick)
    assert sorted(tree_names) == names
    order = [tree_names.index(n) for n in names]
    pat = pat[np.ix_(order, order)]
    u = np.stack([s.to_vector() for s in styles])
    sq = ((u[:, None] - u[None]) ** 2).sum(-1)
    iu = np.triu_indices(10, 1)
    r = np.corrcoef(sq[iu], pat[iu])[0, 1]
    assert r > 0.6, r  # Brownian drift: squared distances grow with path length
    one, t1 = domain_family(1, seed=0)
    assert len(one) == 1 and t1 == "syn00;"
    with pytest.raises(InputValueError):
        domain_family(0, seed=0)


def _leaf_distances(styles, newick):
    names = [s.name for s in styles]
    tree_names, pat = _patristic(newick)
    order = [tree_names.index(n) for n in names]
    u = np.stack([s.to_vector() for s in styles])
    return pat[np.ix_(order, order)], ((u[:, None] - u[None]) ** 2).sum(-1), u


@pytest.mark.parametrize("seed", [0, 11, 57])
def test_coalescent_family_is_ultrametric_with_exact_trait_distances(seed):
    """The default generator: a coalescent tree scaled to the given height (every leaf at the same
    depth: the three-point condition holds for every triple), morphology traits only, and orthogonal
    branch drifts, so squared parameter distance = drift² x n_traits x path length for every pair."""
    from itertools import combinations

    from neuroadda_rt.study.synthetic import MORPHOLOGY_TRAITS

    styles, newick = domain_family(8, seed=seed, drift=0.5, height=1.5)
    pat, sq, u = _leaf_distances(styles, newick)
    assert np.isclose(pat.max(), 2 * 1.5, atol=1e-3)  # the root splits the deepest pair
    for a, b, c in combinations(range(8), 3):
        d = sorted([pat[a, b], pat[a, c], pat[b, c]])
        assert abs(d[2] - d[1]) < 2e-3, (a, b, c, d)  # ultrametric (branch lengths rounded to 1e-4)
    iu = np.triu_indices(8, 1)
    np.testing.assert_allclose(sq[iu], 0.25 * len(MORPHOLOGY_TRAITS) * pat[iu], rtol=2e-3)
    keys = list(PARAMETER_BOUNDS)
    still = [i for i, k in enumerate(keys) if k not in MORPHOLOGY_TRAITS]
    assert len(still) == len(keys) - len(MORPHOLOGY_TRAITS) > 0
    assert np.ptp(u[:, still], axis=0).max() < 1e-9  # intensity traits stay at the root's values
    # the same seed gives the same family
    assert domain_family(8, seed=seed, drift=0.5, height=1.5) == (styles, newick)


def test_yule_all_traits_is_the_previous_generator():
    """``tree="yule", traits="all"`` reproduces the generator of 2026-11-24 and earlier (the output
    recorded here was produced by that code), so studies recorded with it can be re-run."""
    styles, newick = domain_family(5, seed=3, tree="yule", traits="all")
    assert newick == "((syn00:0.5388,(syn01:0.4095,syn02:0.226):0.3997):0.6196,(syn03:0.8211,syn04:0.8831):0.3938);"
    assert styles[0].photons == pytest.approx(57.269439041651985, rel=1e-12)
    assert styles[4].cell_diameter_px == pytest.approx(59.64559303959877, rel=1e-12)


@pytest.mark.parametrize("kwargs, match", [({"tree": "upgma"}, "tree in"), ({"traits": "colour"}, "traits in"),
                                           ({"height": 0.0}, "height > 0"), ({"drift": -1.0}, "drift >= 0")])
def test_domain_family_rejects_bad_generator_settings(kwargs, match):
    with pytest.raises(InputValueError, match=match):
        domain_family(4, seed=0, **kwargs)


def test_same_bytes_in_a_fresh_process(vol):
    """No hidden state (hash seeds, thread counts, import order) leaks into the render."""
    import hashlib
    import os
    import subprocess
    import sys

    code = ("import hashlib; from neuroadda_rt.study.synthetic import DomainStyle, make_domain; "
            f"i, l = make_domain(DomainStyle(), {SHAPE}, seed=11); "
            "print(hashlib.sha256(i.tobytes() + l.tobytes()).hexdigest())")
    env = dict(os.environ, PYTHONHASHSEED="123", OMP_NUM_THREADS="2")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == hashlib.sha256(vol[0].tobytes() + vol[1].tobytes()).hexdigest()
