"""MMD² and its permutation test vs the usual ways of computing them, each checked.

Groups (ours beside the baselines, same data, same run):
* ``mmd2``: ``neuroadda_rt.mmd2`` vs a NumPy full-kernel-matrix implementation (BLAS matmul for
  the distances, float32 like ours) and vs ``torch.cdist``; all three at one fixed sigma.
* ``mmd2_test``: ``neuroadda_rt.mmd2_test`` with 1000 permutations vs alibi-detect ``MMDDrift``
  (PyTorch backend, same sigma) with 100 permutations.
* ``test_mmd2_peak_memory`` (not timed): the extra resident memory of one ``mmd2`` call.

Full sizes (issue 2): n = m = 4096, d = 512 for mmd2; n = m = 2048, d = 512 for the test. Run with
``NEUROADDA_BENCH_FULL=1 python -m pytest benchmarks/bench_mmd.py --benchmark-only``; the small
default sizes let CI run this file with ``--benchmark-disable`` as a test.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest

import neuroadda_rt as nr

FULL = os.environ.get("NEUROADDA_BENCH_FULL") == "1"
N_MMD, D = (4096, 512) if FULL else (256, 64)
N_TEST = 2048 if FULL else 128
P_OURS, P_ALIBI = (1000, 100) if FULL else (200, 20)
ROUNDS = 3 if FULL else 1


def _run(benchmark, fn, rounds=ROUNDS):
    return benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1 if FULL and rounds > 1 else 0)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N_MMD, D)).astype(np.float32)
    y = (rng.normal(size=(N_MMD, D)) + 0.05).astype(np.float32)
    return x, y, float(np.sqrt(D))


@pytest.fixture(scope="module")
def expected(data):
    """float64 reference (BLAS in float64; the exact direct difference is too slow at full size)."""
    x, y, s = data
    x64, y64 = x.astype(np.float64), y.astype(np.float64)

    def ksum(a, b, same):
        d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
        k = np.exp(-np.maximum(d2, 0.0) / (2.0 * s * s))
        return k.sum() - (np.trace(k) if same else 0.0)

    n, m = len(x), len(y)
    return ksum(x64, x64, True) / (n * (n - 1)) + ksum(y64, y64, True) / (m * (m - 1)) - 2 * ksum(x64, y64, False) / (n * m)


def numpy_mmd2(x, y, sigma):
    """The plain NumPy way: materialise each kernel block (distances by BLAS matmul), float32."""
    def k(a, b):
        d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
        return np.exp(-np.maximum(d2, 0.0) / np.float32(2.0 * sigma * sigma))

    n, m = len(x), len(y)
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    return float((kxx.sum(dtype=np.float64) - np.trace(kxx)) / (n * (n - 1))
                 + (kyy.sum(dtype=np.float64) - np.trace(kyy)) / (m * (m - 1))
                 - 2.0 * kxy.sum(dtype=np.float64) / (n * m))


def torch_mmd2(x, y, sigma):
    import torch

    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    g = -1.0 / (2.0 * sigma * sigma)

    def ksum(a, b, same):
        k = torch.exp(torch.cdist(a, b).square_().mul_(g))
        return k.sum(dtype=torch.float64).item() - (k.diagonal().sum(dtype=torch.float64).item() if same else 0.0)

    n, m = len(x), len(y)
    return ksum(xt, xt, True) / (n * (n - 1)) + ksum(yt, yt, True) / (m * (m - 1)) - 2.0 * ksum(xt, yt, False) / (n * m)


TOL = dict(rtol=1e-3, atol=3e-6)


@pytest.mark.benchmark(group="mmd2")
def test_mmd2_ours(benchmark, data, expected):
    x, y, s = data
    benchmark.extra_info.update(n=N_MMD, d=D)
    got = _run(benchmark, lambda: nr.mmd2(x, y, sigma=s, device="cpu"))
    np.testing.assert_allclose(got, expected, **TOL)


@pytest.mark.benchmark(group="mmd2")
def test_mmd2_numpy_full_kernel_matrix(benchmark, data, expected):
    x, y, s = data
    got = _run(benchmark, lambda: numpy_mmd2(x, y, s))
    np.testing.assert_allclose(got, expected, **TOL)


@pytest.mark.benchmark(group="mmd2")
def test_mmd2_torch_cdist(benchmark, data, expected):
    pytest.importorskip("torch")
    x, y, s = data
    got = _run(benchmark, lambda: torch_mmd2(x, y, s))
    np.testing.assert_allclose(got, expected, **TOL)


_MEMORY_PROBE = r"""
import sys
import numpy as np
import neuroadda_rt as nr

def kib(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])

n, d = int(sys.argv[1]), int(sys.argv[2])
rng = np.random.default_rng(0)
x = rng.normal(size=(n, d)).astype(np.float32)
y = (rng.normal(size=(n, d)) + 0.05).astype(np.float32)
nr.mmd2(x[:64], y[:64], sigma=float(np.sqrt(d)))  # load everything, start the OpenMP pool
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the RSS high-water mark to the current RSS
before = kib("VmRSS")
value = nr.mmd2(x, y, sigma=float(np.sqrt(d)))
print(value, (kib("VmHWM") - before) / 1024)
"""


def test_mmd2_peak_memory(data, expected):
    """Peak RSS growth of one mmd2 call, measured in a fresh interpreter (so that no freed, still
    resident heap is reused) with glibc's mmap threshold at 64 KiB (large buffers are fresh pages)."""
    import subprocess
    import sys

    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux /proc/self/clear_refs to reset the RSS high-water mark")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(N_MMD), str(D)], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    value, extra_mib = float(out[0]), float(out[1])
    np.testing.assert_allclose(value, expected, **TOL)
    # packed panels: (n + m) rounded up to 16 rows x d x 4 bytes, plus O(#panels) partial sums
    panels_mib = ((N_MMD + 15) // 16 * 16 * 2) * D * 4 / 2**20
    print(f"\nmmd2 n=m={N_MMD} d={D}: peak extra RSS {extra_mib:.1f} MiB (packed panels {panels_mib:.1f} MiB)")
    assert extra_mib < 64


# ---- permutation test ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def test_data():
    rng = np.random.default_rng(1)
    shift = 0.05 if FULL else 0.5
    x = rng.normal(size=(N_TEST, D)).astype(np.float32)
    y = (rng.normal(size=(N_TEST, D)) + shift).astype(np.float32)
    return x, y, nr.median_sigma(x, y)


@pytest.mark.benchmark(group="mmd2_test")
def test_mmd2_test_ours_1000_permutations(benchmark, test_data):
    x, y, s = test_data
    benchmark.extra_info.update(n=N_TEST, d=D, permutations=P_OURS)
    res = _run(benchmark, lambda: nr.mmd2_test(x, y, n_permutations=P_OURS, sigma=s, seed=0, device="cpu"))
    np.testing.assert_allclose(res.mmd2, nr.mmd2(x, y, sigma=s), rtol=1e-4, atol=1e-6)
    assert res.p_value == 1 / (P_OURS + 1)  # clearly shifted: no permutation reaches the observed value
    assert res.null.shape == (P_OURS,) and np.all(res.null < res.mmd2)


@pytest.mark.benchmark(group="mmd2_test")
def test_mmd2_test_alibi_detect_100_permutations(benchmark, test_data):
    x, y, s = test_data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            from alibi_detect.cd import MMDDrift
        except ImportError as exc:
            pytest.skip(f"alibi-detect is not installed (it pins numpy<2: pip install --no-deps alibi-detect, see README): {exc}")

    def run():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cd = MMDDrift(x, backend="pytorch", p_val=0.05, sigma=np.array([s], dtype=np.float32),
                          configure_kernel_from_x_ref=False, n_permutations=P_ALIBI, device="cpu")
            return cd.predict(y)

    benchmark.extra_info.update(n=N_TEST, d=D, permutations=P_ALIBI)
    out = _run(benchmark, run, rounds=1)
    # same kernel, same unbiased estimator: alibi's distance is our MMD²
    np.testing.assert_allclose(out["data"]["distance"], nr.mmd2(x, y, sigma=s), rtol=1e-3, atol=1e-6)
    assert out["data"]["p_val"] <= 0.05 and out["data"]["is_drift"] == 1
