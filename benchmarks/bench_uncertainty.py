"""tile_uncertainty vs the equivalent NumPy expression and vs a NumPy copy (bandwidth floor).

Full size (issue 2): probs (256, 3, 256, 256) float32 with NEUROADDA_BENCH_FULL=1; small by
default so that CI can run it with --benchmark-disable as a test.
Run: NEUROADDA_BENCH_FULL=1 python -m pytest benchmarks/bench_uncertainty.py --benchmark-only
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import neuroadda_rt as nr

FULL = os.environ.get("NEUROADDA_BENCH_FULL") == "1"
SHAPE = (256, 3, 256, 256) if FULL else (8, 3, 64, 64)
ROUNDS = 5 if FULL else 1


@pytest.fixture(scope="module")
def probs():
    rng = np.random.default_rng(0)
    return rng.random(SHAPE, dtype=np.float32)


def numpy_entropy(p):
    """The equivalent NumPy expression, in float32 like the kernel (0 log 0 = 0 via the clamp)."""
    tiny = np.finfo(np.float32).tiny
    q = 1 - p
    h = -(p * np.log(np.maximum(p, tiny)) + q * np.log(np.maximum(q, tiny)))
    return h.reshape(p.shape[0], -1).mean(axis=1, dtype=np.float64)


@pytest.fixture(scope="module")
def expected(probs):
    return numpy_entropy(probs)


def _run(benchmark, fn):
    return benchmark.pedantic(fn, rounds=ROUNDS, iterations=1, warmup_rounds=1 if FULL else 0)


@pytest.mark.benchmark(group="tile_uncertainty")
def test_ours_entropy(benchmark, probs, expected):
    benchmark.extra_info["shape"] = str(SHAPE)
    got = _run(benchmark, lambda: nr.tile_uncertainty(probs, device="cpu"))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=2e-6)


@pytest.mark.benchmark(group="tile_uncertainty")
def test_numpy_expression_entropy(benchmark, probs, expected):
    got = _run(benchmark, lambda: numpy_entropy(probs))
    np.testing.assert_allclose(got, expected, rtol=1e-12)


@pytest.mark.benchmark(group="tile_uncertainty")
def test_numpy_copy_floor(benchmark, probs):
    out = _run(benchmark, lambda: probs.copy())
    assert out.shape == probs.shape and out[0, 0, 0, 0] == probs[0, 0, 0, 0]


@pytest.mark.benchmark(group="tile_uncertainty_margin")
def test_ours_margin(benchmark, probs):
    got = _run(benchmark, lambda: nr.tile_uncertainty(probs, measure="margin", device="cpu"))
    ref = (1 - np.abs(2 * probs[:4].astype(np.float64) - 1)).reshape(min(4, len(probs)), -1).mean(1)
    np.testing.assert_allclose(got[:4], ref, rtol=1e-5, atol=2e-6)
