"""Data-layer benchmarks: synthetic generation, lazy tile sampling vs direct h5py slicing,
and affinity segmentation (waterz vs the fallback). Each asserts its result against a
reference, so with ``--benchmark-disable`` they double as tests.

Default sizes are small; ``NEUROADDA_BENCH_FULL=1`` runs the issue's sizes
(a 32x512x512 synthetic stack, 32x512x512 h5 tiles); the gala volume is always whole.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from neuroadda_rt import open_volume, sample_tiles, segment
from neuroadda_rt.io import write_volume
from neuroadda_rt.labels import instances_to_affinities
from neuroadda_rt.segmentation import waterz_available
from neuroadda_rt.study.synthetic import DomainStyle, make_domain

FULL = os.environ.get("NEUROADDA_BENCH_FULL") == "1"
SYN_SHAPE = (32, 512, 512) if FULL else (4, 128, 128)


@pytest.mark.benchmark(group="synthetic")
def test_bench_make_domain(benchmark):
    img, lab = benchmark.pedantic(make_domain, args=(DomainStyle(), SYN_SHAPE), kwargs={"seed": 0},
                                  rounds=1 if FULL else 3, iterations=1)
    assert img.shape == SYN_SHAPE and img.dtype == np.uint8 and lab.dtype == np.uint32
    assert img.tobytes() == make_domain(DomainStyle(), SYN_SHAPE, seed=0)[0].tobytes()


@pytest.fixture(scope="module")
def h5vol(tmp_path_factory):
    shape = (32, 512, 512) if FULL else (8, 128, 128)
    img = np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8)
    p = tmp_path_factory.mktemp("bench") / "v.h5"
    write_volume(p, img, chunks=(1, 64, 64))
    return p, img


@pytest.mark.benchmark(group="tiles-h5")
def test_bench_sample_tiles_lazy(benchmark, h5vol):
    p, img = h5vol
    v = open_volume(p)
    t = benchmark(sample_tiles, v, 64, 64, seed=0)
    for tile, (z, y, x) in zip(t.tiles[:8], t.coords[:8]):
        np.testing.assert_array_equal(tile, img[z, y:y + 64, x:x + 64])


@pytest.mark.benchmark(group="tiles-h5")
def test_bench_h5py_direct_baseline(benchmark, h5vol):
    import h5py

    p, img = h5vol
    coords = sample_tiles(img, 64, 64, seed=0).coords

    def read():
        with h5py.File(p, "r") as f:
            d = f["data"]
            return np.stack([d[z, y:y + 64, x:x + 64] for z, y, x in coords])

    tiles = benchmark(read)
    np.testing.assert_array_equal(tiles, sample_tiles(img, 64, 64, seed=0).tiles)


@pytest.fixture
def gt(em_data):
    p = em_data / "drosophila_fibsem_gala_example/tests/example-data/train-gt.lzf.h5"
    if not p.exists():
        pytest.skip(f"real EM data not found at {p}")
    return open_volume(str(p) + ":stack")[...]  # whole (a z crop would cut neurites in two)


@pytest.mark.realdata
@pytest.mark.benchmark(group="segment-affinities")
@pytest.mark.parametrize("method", ["fallback", pytest.param(
    "waterz", marks=pytest.mark.skipif(not waterz_available(), reason="waterz not installed"))])
def test_bench_segment_affinities(benchmark, gt, method):
    from neuroadda_rt import variation_of_information

    aff = instances_to_affinities(gt)
    seg = benchmark.pedantic(segment, args=(aff, "affinities"), kwargs={"threshold": 0.5, "method": method},
                             rounds=3, iterations=1)
    split, merge = variation_of_information(seg, gt)
    assert split + merge < 0.05
