"""variation_of_information vs skimage.metrics on two label volumes with ~1e4 labels each.

Full size (issue 2): two 100 x 512 x 512 uint64 volumes with NEUROADDA_BENCH_FULL=1; small by
default (CI runs it with --benchmark-disable as a test). Peak extra memory is measured as the
rise of the process's peak RSS (VmHWM after resetting it through /proc/self/clear_refs) over
the RSS before the call, so it counts the C++ hash maps too (tracemalloc would not).
Run: NEUROADDA_BENCH_FULL=1 python -m pytest benchmarks/bench_metrics.py --benchmark-only
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from skimage.metrics import variation_of_information as sk_vi

import neuroadda_rt as nr

FULL = os.environ.get("NEUROADDA_BENCH_FULL") == "1"
SHAPE = (100, 512, 512) if FULL else (10, 64, 64)
ID_RANGE = 2**24 if FULL else 2**12


def _grid_labels(shape, block, offset, rng):
    """Box-shaped segments (grid cells) renamed to sparse random uint64 ids."""
    idx = [((np.arange(n) + o) // b) for n, b, o in zip(shape, block, offset)]
    dims = [int(i.max()) + 1 for i in idx]
    cell = (idx[0][:, None, None] * dims[1] + idx[1][None, :, None]) * dims[2] + idx[2][None, None, :]
    # ids below ID_RANGE so that skimage (which indexes a sparse matrix by label) can run; our
    # kernel takes any 64-bit id. 0 may occur too.
    ids = rng.choice(ID_RANGE, size=int(np.prod(dims)), replace=False).astype(np.uint64)
    return ids[cell.astype(np.int64)]


@pytest.fixture(scope="module")
def volumes():
    rng = np.random.default_rng(0)
    if FULL:  # gt 10 x 32 x 32 = 10240 cells, seg 12 x 35 x 35 = 14700 cells
        gt = _grid_labels(SHAPE, (10, 16, 16), (0, 0, 0), rng)
        seg = _grid_labels(SHAPE, (9, 15, 15), (3, 5, 7), rng)
    else:
        gt = _grid_labels(SHAPE, (3, 8, 8), (0, 0, 0), rng)
        seg = _grid_labels(SHAPE, (4, 7, 9), (1, 3, 2), rng)
    gt[gt % 17 == 0] = 0  # some background, ignored by default
    return seg, gt


@pytest.fixture(scope="module")
def expected(volumes):
    seg, gt = volumes
    return tuple(sk_vi(gt, seg, ignore_labels=[0]))


def peak_extra_rss(fn):
    """(result, bytes): peak resident memory of the process during fn above the RSS before it."""
    def field(name):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(name):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(name)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = field("VmRSS:")
    out = fn()
    return out, field("VmHWM:") - before


@pytest.mark.benchmark(group="variation_of_information")
def test_ours_vi(benchmark, volumes, expected):
    seg, gt = volumes
    got, extra = peak_extra_rss(lambda: nr.variation_of_information(seg, gt))
    np.testing.assert_allclose(got, expected, rtol=1e-9)
    benchmark.extra_info.update(shape=str(SHAPE), peak_extra_mb=extra / 2**20, input_mb=gt.nbytes / 2**20,
                                n_labels_gt=int(np.unique(gt[:, ::8, ::8]).size))
    if FULL:
        assert extra < gt.nbytes, f"peak extra memory {extra / 2**20:.1f} MiB >= one input {gt.nbytes / 2**20:.1f} MiB"
    got = benchmark.pedantic(lambda: nr.variation_of_information(seg, gt), rounds=5 if FULL else 1, iterations=1)
    np.testing.assert_allclose(got, expected, rtol=1e-9)


@pytest.mark.benchmark(group="variation_of_information")
def test_skimage_vi(benchmark, volumes, expected):
    seg, gt = volumes
    got, extra = peak_extra_rss(lambda: sk_vi(gt, seg, ignore_labels=[0]))
    benchmark.extra_info.update(peak_extra_mb=extra / 2**20)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    got = benchmark.pedantic(lambda: sk_vi(gt, seg, ignore_labels=[0]), rounds=2 if FULL else 1, iterations=1)
    np.testing.assert_allclose(got, expected, rtol=1e-12)


@pytest.mark.benchmark(group="variation_of_information")
def test_ours_blockwise_table(benchmark, volumes, expected):
    """Slab by slab into one ContingencyTable (the out-of-core path) gives the same score."""
    seg, gt = volumes
    step = max(1, len(seg) // 10)

    def run():
        table = nr.ContingencyTable()
        for z in range(0, len(seg), step):
            table.add(seg[z:z + step], gt[z:z + step])
        return table.variation_of_information()

    got = benchmark.pedantic(run, rounds=3 if FULL else 1, iterations=1)
    assert got == nr.variation_of_information(seg, gt)
    np.testing.assert_allclose(got, expected, rtol=1e-9)
