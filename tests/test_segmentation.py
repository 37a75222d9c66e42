"""segment / tune_threshold: exactness on ground-truth-derived maps, 2-D and 3-D, the waterz
and fallback affinity paths, and VI near 0 on the real labelled sets."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.metrics import variation_of_information

from neuroadda_rt import InputValueError, ShapeError, segment, tune_threshold
from neuroadda_rt.labels import instances_to_affinities, instances_to_boundary
from neuroadda_rt.segmentation import waterz_available
from neuroadda_rt.study.synthetic import make_domain

def _has(mod):
    try:
        __import__(mod)
    except ImportError:
        return False
    return True


METHODS = ["fallback",
           pytest.param("waterz", marks=pytest.mark.skipif(not waterz_available(), reason="waterz not installed")),
           pytest.param("mws", marks=pytest.mark.skipif(not _has("mwatershed"), reason="mwatershed not installed"))]


def vi(gt, seg):
    return float(np.sum(variation_of_information(gt, seg, ignore_labels=(0,))))


@pytest.fixture(scope="module")
def synth():
    _, lab = make_domain(None, (4, 128, 128), seed=6)
    return lab


def test_boundary_2d_and_per_slice(synth):
    b = instances_to_boundary(synth, per_slice=True).astype(np.float32)
    s2 = segment(b[0], "boundary", threshold=0.5)
    assert s2.dtype == np.uint32 and s2.min() == 1
    assert vi(synth[0], s2) < 0.05
    s3 = segment(b, "boundary", threshold=0.5, per_slice=True)
    # unique ids per slice
    assert len(set(np.unique(s3[0])) & set(np.unique(s3[1]))) == 0
    for z in range(4):
        assert vi(synth[z], s3[z]) < 0.05


@pytest.mark.parametrize("method", METHODS)
def test_affinities_3d_and_2d(synth, method):
    aff = instances_to_affinities(synth)
    s = segment(aff, "affinities", threshold=0.5, method=method)
    assert s.shape == synth.shape and vi(synth, s) < 0.1
    aff2 = instances_to_affinities(synth[1])
    assert vi(synth[1], segment(aff2, "affinities", threshold=0.5, method=method)) < 0.05
    sp = segment(aff, "affinities", threshold=0.5, method=method, per_slice=True)
    assert all(vi(synth[z], sp[z]) < 0.05 for z in range(4))


def test_threshold_direction_and_distance_seeds():
    # two discs touching through a thin neck: low threshold keeps them apart
    yy, xx = np.mgrid[0:40, 0:60]
    b = np.ones((40, 60), np.float32)
    b[(yy - 20) ** 2 + (xx - 18) ** 2 < 100] = 0.1
    b[(yy - 20) ** 2 + (xx - 42) ** 2 < 100] = 0.1
    b[19:21, 18:42] = 0.45
    assert segment(b, "boundary", threshold=0.3).max() == 2
    assert segment(b, "boundary", threshold=0.5).max() == 1
    assert segment(b, "boundary", threshold=0.5, seeds="distance", seed_distance=3).max() == 2


def test_tune_threshold_picks_minimum_vi(synth, rng):
    b = instances_to_boundary(synth, per_slice=True).astype(np.float32)
    noisy = np.clip(b * 0.7 + rng.random(b.shape).astype(np.float32) * 0.3, 0, 1)
    tiles = [noisy[z] for z in range(2)]
    labs = [synth[z] for z in range(2)]
    res = tune_threshold(tiles, labs, "boundary", [0.1, 0.3, 0.5, 0.8, 0.95])
    ref = {t: sum(vi(l, segment(p, "boundary", threshold=t)) for p, l in zip(tiles, labs)) for t in res.scores}
    assert res.scores == pytest.approx(ref)
    assert res.threshold == min(ref, key=lambda t: (ref[t], t)) and res.vi == pytest.approx(min(ref.values()))
    with pytest.raises(ShapeError, match="labels have shape"):
        tune_threshold(tiles, [synth[0][:5]] * 2, "boundary", [0.5])


def test_bad_inputs():
    with pytest.raises(InputValueError, match="representation"):
        segment(np.zeros((4, 4)), "mask")
    with pytest.raises(InputValueError, match=r"\[0, 1\]"):
        segment(np.full((4, 4), 2.0), "boundary")
    with pytest.raises(ShapeError, match="affinities of shape"):
        segment(np.zeros((3, 4, 4)), "affinities")
    assert segment(np.ones((4, 4), np.float32), "boundary").max() == 1  # no interior: one segment


@pytest.mark.realdata
@pytest.mark.parametrize("method", METHODS)
def test_vi_near_zero_gala_fibsem(em_data, method):
    from neuroadda_rt import open_volume

    gt = open_volume(str(em_data / "drosophila_fibsem_gala_example/tests/example-data/train-gt.lzf.h5:stack"))[...]
    assert vi(gt, segment(instances_to_affinities(gt), "affinities", threshold=0.5, method=method)) < 0.05
    if method == "fallback":
        assert vi(gt, segment(instances_to_boundary(gt).astype(np.float32), "boundary", threshold=0.5)) < 0.1


@pytest.mark.realdata
def test_vi_near_zero_isbi2012(em_data):
    from neuroadda_rt.datasets import Dataset

    ds = Dataset.from_json(__import__("pathlib").Path(__file__).parents[1] / "examples/datasets/isbi2012.json",
                           data_root=em_data)
    gt = ds.labels("test")[:2]
    memb = ds.membrane("test")[:2].astype(np.float32)
    seg = segment(memb, "boundary", threshold=0.5, per_slice=True)
    assert all(vi(gt[z], seg[z]) < 0.05 for z in range(2))
    aff = instances_to_affinities(gt[0])
    assert vi(gt[0], segment(aff, "affinities", threshold=0.5)) < 0.05
