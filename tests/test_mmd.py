"""MMD², median heuristic, permutation test and domain matrix against independent float64
references (scipy cdist / pdist + NumPy) and brute-force permutation loops."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from scipy.spatial.distance import cdist, pdist

import neuroadda_rt as nr
from neuroadda_rt import _core
from neuroadda_rt.errors import BackendUnavailableError, DTypeError, InputValueError, ShapeError

from conftest import DEVICES

# float32 distances and exp: absolute error of a kernel mean ~1e-7; MMD² is a difference of
# such means, so compare absolutely (plus a relative term for large values).
ATOL = 2e-6
RTOL = 1e-4


def ref_kernel(a, b, sigmas):
    d2 = cdist(np.asarray(a, np.float64), np.asarray(b, np.float64), "sqeuclidean")
    return np.mean([np.exp(-d2 / (2.0 * s * s)) for s in sigmas], axis=0)


def ref_mmd2(x, y, sigmas, estimator="unbiased"):
    n, m = len(x), len(y)
    kxx, kyy, kxy = ref_kernel(x, x, sigmas), ref_kernel(y, y, sigmas), ref_kernel(x, y, sigmas)
    if estimator == "biased":
        return kxx.mean() + kyy.mean() - 2.0 * kxy.mean()
    return ((kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
            - 2.0 * kxy.mean())


def ref_median_sigma(x, y, max_points=2048):
    z = np.concatenate([x, y]).astype(np.float64)
    N = len(z)
    s = min(N, max_points)
    idx = (np.arange(s) * N) // s
    return float(np.sqrt(np.median(pdist(z[idx], "sqeuclidean")) / 2.0))


def make_pair(n, m, d, shift=0.3, seed=0):
    rng = np.random.default_rng(seed + 1000 * d + n + 7 * m)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = (rng.normal(size=(m, d)) * 1.1 + shift).astype(np.float32)
    return x, y


SIZES = [(2, 2, 1), (3, 5, 2), (17, 16, 3), (31, 33, 7), (16, 48, 5), (65, 64, 16), (129, 100, 33),
         (40, 50, 512), (300, 257, 64), (1, 1, 1), (1, 7, 3), (9, 1, 300)]


# every valid (estimator, size, sigma) combination: the unbiased estimator needs n, m >= 2 (its
# error is tested below) and the median of one pooled pair is not exercised here
CASES = [(e, n, m, d, k) for e in ("unbiased", "biased") for (n, m, d) in SIZES
         for k in ("float", "sequence", "median")
         if not (e == "unbiased" and min(n, m) < 2) and not (k == "median" and n + m < 3)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("estimator,n,m,d,sigma_kind", CASES)
def test_mmd2_matches_float64_reference(device, estimator, n, m, d, sigma_kind):
    x, y = make_pair(n, m, d)
    if sigma_kind == "median":
        sigma, sigmas = None, [ref_median_sigma(x, y)]
    elif sigma_kind == "float":
        sigma = float(np.sqrt(d)) * 0.9
        sigmas = [sigma]
    else:
        sigma = [0.5 * np.sqrt(d), np.sqrt(d), 3.0 * np.sqrt(d)]
        sigmas = sigma
    got = nr.mmd2(x, y, sigma=sigma, estimator=estimator, device=device)
    want = ref_mmd2(x, y, sigmas, estimator)
    assert isinstance(got, float)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_mmd2_larger_and_many_bandwidths():
    x, y = make_pair(257, 300, 128, shift=0.05)
    sig = list(np.geomspace(2.0, 64.0, 16))
    np.testing.assert_allclose(nr.mmd2(x, y, sigma=sig, device="cpu"), ref_mmd2(x, y, sig), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(nr.mmd2(x, y, sigma=np.array(sig[:3])), ref_mmd2(x, y, sig[:3]), rtol=RTOL,
                               atol=ATOL)


def test_mmd2_identical_sets_biased_is_zero_and_tiny_sigma():
    x, _ = make_pair(50, 50, 8)
    assert abs(nr.mmd2(x, x, sigma=3.0, estimator="biased")) < 1e-6
    # far below the distances every off-diagonal kernel value underflows: only diagonal terms remain
    x2, y2 = make_pair(20, 30, 8, shift=5.0)
    np.testing.assert_allclose(nr.mmd2(x2, y2, sigma=1e-3, estimator="biased"), 1 / 20 + 1 / 30, rtol=1e-6)
    np.testing.assert_allclose(nr.mmd2(x2, y2, sigma=1e-3), 0.0, atol=1e-12)


@pytest.mark.parametrize("n,m,d", [(1, 1, 1), (2, 3, 4), (50, 70, 9), (1500, 1000, 4), (3000, 200, 2)])
def test_median_sigma_matches_reference(n, m, d):
    x, y = make_pair(n, m, d)
    np.testing.assert_allclose(nr.median_sigma(x, y), ref_median_sigma(x, y), rtol=1e-5)


def test_median_sigma_zero_is_an_error():
    x = np.zeros((10, 3), np.float32)
    with pytest.raises(InputValueError, match="expected a positive median"):
        nr.median_sigma(x, x)
    with pytest.raises(InputValueError, match="pass sigma explicitly"):
        nr.mmd2(x, x)


def test_exp_matches_numpy():
    v = np.concatenate([-np.geomspace(1e-8, 87.0, 4000), [0.0, -1.0, -0.5]]).astype(np.float32)
    got = np.array([_core._exp_nonpositive(float(t)) for t in v])
    want = np.exp(v.astype(np.float64))
    assert np.max(np.abs(got - want) / want) < 3e-7


@pytest.mark.parametrize("n,m,d,sigmas", [(1, 1, 1, [1.0]), (17, 33, 5, [0.7]), (40, 300, 64, [2.0, 5.0, 9.0]),
                                         (129, 16, 3, [1e-3])])
def test_gaussian_kernel_matrix_matches_float64(n, m, d, sigmas):
    """The kernel matrix entry point is the MMD kernel: against the float64 formula, and its sums
    give mmd2 itself."""
    x, y = make_pair(n, m, d)
    got = nr.mmd.gaussian_kernel_matrix(x, y, sigma=sigmas)
    assert got.dtype == np.float32 and got.shape == (n, m)
    np.testing.assert_allclose(got, ref_kernel(x, y, sigmas), rtol=0, atol=2e-6)
    if n >= 2 and m >= 2:
        kxx = nr.mmd.gaussian_kernel_matrix(x, x, sigma=sigmas).astype(np.float64)
        kyy = nr.mmd.gaussian_kernel_matrix(y, y, sigma=sigmas).astype(np.float64)
        u = ((kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
             - 2 * got.astype(np.float64).mean())
        np.testing.assert_allclose(u, nr.mmd2(x, y, sigma=sigmas), rtol=1e-4, atol=1e-6)


def test_gaussian_kernel_matrix_layouts_and_errors():
    x, y = make_pair(20, 30, 6)
    want = nr.mmd.gaussian_kernel_matrix(x, y, sigma=2.0)
    np.testing.assert_array_equal(nr.mmd.gaussian_kernel_matrix(np.asfortranarray(x), y[:, :], sigma=2.0), want)
    with pytest.raises(InputValueError, match="sigma"):
        nr.mmd.gaussian_kernel_matrix(x, y, sigma=None)
    with pytest.raises(ShapeError):
        nr.mmd.gaussian_kernel_matrix(x, y[:, :3], sigma=1.0)
    bad = x.copy()
    bad[3, 2] = np.nan
    with pytest.raises(InputValueError, match="finite"):
        nr.mmd.gaussian_kernel_matrix(bad, y, sigma=1.0)


# ---- layouts and copy policy -----------------------------------------------------------------

def test_layouts_give_identical_results():
    x, y = make_pair(70, 45, 20)
    want = nr.mmd2(x, y, sigma=4.0)
    xf = np.asfortranarray(x)
    yro = y.copy()
    yro.flags.writeable = False
    big = np.zeros((140, 40), np.float32)
    big[::2, 1::2] = x
    variants = [(xf, y), (x, yro), (big[::2, 1::2], y), (x[::-1].copy()[::-1], y[:, :]), (xf, np.asfortranarray(yro))]
    for a, b in variants:
        assert nr.mmd2(a, b, sigma=4.0) == want
    # order of rows does not matter mathematically; reversed rows agree to rounding
    np.testing.assert_allclose(nr.mmd2(x[::-1], y, sigma=4.0), want, rtol=1e-6, atol=1e-7)


def test_small_non_float32_inputs_are_converted():
    x, y = make_pair(30, 20, 6)
    want = nr.mmd2(x, y, sigma=2.0)
    assert nr.mmd2(x.astype(np.float64), y, sigma=2.0) == want
    assert nr.mmd2(x.tolist(), y, sigma=2.0) == want
    xi = np.arange(60, dtype=np.int32).reshape(30, 2)
    np.testing.assert_allclose(nr.mmd2(xi, xi[::-1] + 1, sigma=10.0),
                               ref_mmd2(xi, xi[::-1] + 1, [10.0]), rtol=RTOL, atol=ATOL)


def test_large_non_float32_inputs_are_refused():
    big = np.zeros((nr.mmd.MAX_IMPLICIT_COPY // 64 + 1, 64), np.float64)
    with pytest.raises(DTypeError, match="expected float32 features for x, got float64"):
        nr.mmd2(big, big.astype(np.float32))


@pytest.mark.parametrize("bad", [np.ones((3, 2), np.complex64), np.array([["a", "b"], ["c", "d"]]),
                                 np.ones((3, 2), bool), object()])
def test_bad_dtypes(bad):
    with pytest.raises(DTypeError, match="expected"):
        nr.mmd2(bad, np.ones((3, 2), np.float32), sigma=1.0)


# ---- validation ------------------------------------------------------------------------------

@pytest.mark.parametrize("x,y,match", [
    (np.ones(5, np.float32), np.ones((5, 1), np.float32), "expected a 2-D"),
    (np.ones((2, 2, 2), np.float32), np.ones((5, 2), np.float32), "expected a 2-D"),
    (np.ones((0, 3), np.float32), np.ones((5, 3), np.float32), "non-empty"),
    (np.ones((4, 0), np.float32), np.ones((5, 0), np.float32), "non-empty"),
    (np.ones((4, 3), np.float32), np.ones((5, 4), np.float32), "same number of features, got 3 and 4"),
    (np.ones((1, 3), np.float32), np.ones((5, 3), np.float32), "at least 2 samples"),
])
def test_shape_errors(x, y, match):
    with pytest.raises(ShapeError, match=match):
        nr.mmd2(x, y, sigma=1.0)


@pytest.mark.parametrize("where", ["x", "y"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("sigma", [1.0, None])
def test_non_finite_features(where, value, sigma):
    x, y = make_pair(20, 21, 4)
    (x if where == "x" else y)[5, 2] = value
    with pytest.raises(InputValueError, match=f"expected finite features, got 1 NaN or inf values in {where}"):
        nr.mmd2(x, y, sigma=sigma)
    with pytest.raises(InputValueError, match="expected finite"):
        nr.mmd2_test(x, y, sigma=sigma, n_permutations=3)


@pytest.mark.parametrize("sigma", [0.0, -1.0, np.nan, np.inf, [], [1.0, 0.0], [1.0, np.nan], "1", True,
                                   list(np.ones(17)), [[1.0, "a"]]])
def test_bad_sigma(sigma):
    x, y = make_pair(5, 5, 2)
    with pytest.raises(InputValueError, match="expected"):
        nr.mmd2(x, y, sigma=sigma)


def test_bad_estimator_and_device():
    x, y = make_pair(5, 5, 2)
    with pytest.raises(InputValueError, match="expected estimator"):
        nr.mmd2(x, y, estimator="V")
    with pytest.raises(ValueError, match="device"):
        nr.mmd2(x, y, device="tpu")
    if not nr.cuda_available():
        with pytest.raises(BackendUnavailableError, match="cuda"):
            nr.mmd2(x, y, device="cuda")
        with pytest.raises(RuntimeError):
            nr.mmd2_test(x, y, device="cuda")


def test_every_error_is_a_builtin_too():
    assert issubclass(ShapeError, ValueError) and issubclass(InputValueError, ValueError)
    assert issubclass(DTypeError, TypeError)


# ---- the GIL is released -----------------------------------------------------------------------

def test_concurrent_calls_match_serial():
    pairs = [make_pair(150 + 13 * k, 170 - 7 * k, 24, seed=k) for k in range(6)]
    serial = [nr.mmd2(x, y) for x, y in pairs]
    serial_t = [nr.mmd2_test(x, y, n_permutations=20, seed=k).null for k, (x, y) in enumerate(pairs)]
    results = [None] * len(pairs)
    nulls = [None] * len(pairs)
    errors = []

    def work(k):
        try:
            for _ in range(3):
                results[k] = nr.mmd2(*pairs[k])
                nulls[k] = nr.mmd2_test(*pairs[k], n_permutations=20, seed=k).null
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(pairs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results == serial  # fixed reduction order: bit-identical under concurrency
    for a, b in zip(nulls, serial_t):
        np.testing.assert_array_equal(a, b)


def test_python_runs_while_a_kernel_runs():
    # With the GIL held for the whole call the main thread is stopped from the moment the worker
    # enters C++ until it returns, so it stamps nothing in the first half of the call (it can only
    # run just before the call, and after it returned but before the worker stamps t1). Grow the
    # problem until one call lasts >= 0.15 s on this machine so the window is wide whatever the
    # core count.
    n = 1024
    while True:
        x, y = make_pair(n, n, 256)
        t = time.perf_counter()
        nr.mmd2(x, y, sigma=20.0, device="cpu")
        if time.perf_counter() - t >= 0.15 or n >= 16384:
            break
        n *= 2
    span = {}

    def work():  # the private kernel directly: no Python between the stamps and the C++ call
        span["t0"] = time.perf_counter()
        span["value"] = _core._mmd2(x, y, [20.0], True, "cpu")
        span["t1"] = time.perf_counter()

    stamps = []
    t = threading.Thread(target=work)
    t.start()
    while t.is_alive():
        stamps.append(time.perf_counter())
    t.join()
    t0, t1 = span["t0"], span["t1"]
    inside = [s for s in stamps if t0 + 0.025 < s < (t0 + t1) / 2]  # 0.025 s: a few 5 ms GIL switch intervals
    assert len(inside) >= 3, (t1 - t0, len(stamps))


# ---- permutation test ----------------------------------------------------------------------------

def brute_force_null(x, y, sigmas, P, seed, estimator="unbiased"):
    z = np.concatenate([x, y]).astype(np.float64)
    n = len(x)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(P):
        perm = rng.permutation(len(z))
        out.append(ref_mmd2(z[perm[:n]], z[perm[n:]], sigmas, estimator))
    return np.array(out)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("estimator", ["unbiased", "biased"])
@pytest.mark.parametrize("n,m,d,sigma", [(12, 9, 3, 1.5), (2, 3, 1, 0.7), (40, 33, 17, [2.0, 5.0]), (70, 65, 512, None)])
def test_permutation_null_matches_brute_force(device, estimator, n, m, d, sigma):
    x, y = make_pair(n, m, d, shift=0.2)
    sigmas = [ref_median_sigma(x, y)] if sigma is None else ([sigma] if np.isscalar(sigma) else sigma)
    res = nr.mmd2_test(x, y, n_permutations=37, sigma=sigma, seed=11, estimator=estimator, device=device)
    want = brute_force_null(x, y, sigmas, 37, 11, estimator)
    np.testing.assert_allclose(res.null, want, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(res.mmd2, ref_mmd2(x, y, sigmas, estimator), rtol=RTOL, atol=ATOL)
    assert res.p_value == (1 + np.count_nonzero(res.null >= res.mmd2)) / 38
    assert res.n_permutations == 37 and res.seed == 11 and res.null.dtype == np.float64
    if sigma is None or np.isscalar(sigma):
        np.testing.assert_allclose(res.sigma, sigmas[0], rtol=1e-5)
    else:
        assert res.sigma == tuple(sigma)


def test_permutation_test_is_deterministic_and_sensible():
    x, y = make_pair(60, 50, 8, shift=0.0)
    a = nr.mmd2_test(x, y, n_permutations=200, seed=3)
    b = nr.mmd2_test(x, y, n_permutations=200, seed=3)
    c = nr.mmd2_test(x, y, n_permutations=200, seed=4)
    np.testing.assert_array_equal(a.null, b.null)
    assert a.p_value == b.p_value and not np.array_equal(a.null, c.null)
    assert nr.mmd2_test(x, y, n_permutations=5, seed=None).null.shape == (5,)
    # same distribution: not rejected; far apart: the smallest possible p-value
    assert a.p_value > 0.01
    x2, y2 = make_pair(60, 50, 8, shift=2.0)
    assert nr.mmd2_test(x2, y2, n_permutations=99, seed=0).p_value == 1 / 100
    np.testing.assert_allclose(a.mmd2, nr.mmd2(x, y), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kw,err", [({"n_permutations": 0}, InputValueError), ({"n_permutations": -3}, InputValueError),
                                    ({"n_permutations": 2.5}, InputValueError), ({"n_permutations": True}, InputValueError),
                                    ({"seed": "a"}, InputValueError), ({"seed": 1.5}, InputValueError),
                                    ({"estimator": "x"}, InputValueError), ({"sigma": -1.0}, InputValueError),
                                    ({"seed": -1}, InputValueError), ({"n_permutations": 2**63}, InputValueError)])
def test_permutation_test_errors(kw, err):
    x, y = make_pair(5, 6, 2)
    with pytest.raises(err, match="expected"):
        nr.mmd2_test(x, y, **kw)


def test_permutation_unbiased_needs_two_samples():
    x, y = make_pair(1, 6, 2)
    with pytest.raises(ShapeError, match="at least 2 samples"):
        nr.mmd2_test(x, y)
    assert nr.mmd2_test(x, y, estimator="biased", n_permutations=10).null.shape == (10,)


def test_kernels_reject_bad_input_themselves():
    # the C++ checks behind the Python validation (pybind11 turns them into ValueError)
    x, y = make_pair(3, 3, 2)
    xn = x.copy()
    xn[1, 1] = np.nan
    with pytest.raises(ValueError, match="expected finite features, got 1 NaN or inf values in x"):
        _core._mmd2(xn, y, [1.0], True, "cpu")
    with pytest.raises(ValueError, match="expected sigma > 0"):
        _core._mmd_sums(x, y, [-1.0], 7, "cpu")
    with pytest.raises(ValueError, match=r"expected permutation indices in \[0, 6\)"):
        _core._mmd2_permutation(x, y, [1.0], np.array([[0, 1, 6]], np.int64), True, "cpu")
    with pytest.raises(ValueError, match="distinct"):
        _core._mmd2_permutation(x, y, [1.0], np.array([[0, 1, 1]], np.int64), True, "cpu")


# ---- domain matrix -------------------------------------------------------------------------------

def feature_sets(d=12):
    rng = np.random.default_rng(5)
    sizes = [20, 33, 17, 64, 2]
    return [(rng.normal(size=(s, d)) + 0.2 * k).astype(np.float32) for k, s in enumerate(sizes)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("estimator", ["unbiased", "biased"])
@pytest.mark.parametrize("sigma", [3.0, [1.0, 4.0], None])
def test_mmd2_matrix_matches_pairwise_calls(device, estimator, sigma):
    feats = feature_sets()
    D = nr.mmd2_matrix(feats, sigma=sigma, estimator=estimator, device=device)
    K = len(feats)
    assert D.shape == (K, K) and D.dtype == np.float64
    np.testing.assert_array_equal(D, D.T)
    np.testing.assert_array_equal(np.diag(D), 0.0)
    for i in range(K):
        for j in range(i + 1, K):
            pair = nr.mmd2(feats[i], feats[j], sigma=sigma, estimator=estimator, device=device)
            # sigma=None centres each pair like mmd2 (exact); a fixed sigma centres all sets on one
            # pooled mean, which moves the float32 distances by rounding only
            tol = dict(rtol=1e-9, atol=1e-12) if sigma is None else dict(rtol=RTOL, atol=ATOL)
            np.testing.assert_allclose(D[i, j], pair, **tol)
            sig = [ref_median_sigma(feats[i], feats[j])] if sigma is None else np.atleast_1d(sigma)
            np.testing.assert_allclose(D[i, j], ref_mmd2(feats[i], feats[j], sig, estimator), rtol=RTOL, atol=ATOL)


def test_mmd2_matrix_pooled_sigma():
    feats = feature_sets()
    s = ref_median_sigma(np.concatenate(feats[:1]), np.concatenate(feats[1:]))
    D = nr.mmd2_matrix(feats, sigma="pooled")
    np.testing.assert_allclose(D[0, 3], ref_mmd2(feats[0], feats[3], [s]), rtol=RTOL, atol=ATOL)
    assert nr.mmd2_matrix(feats[:1], sigma=1.0).shape == (1, 1)


def test_mmd2_matrix_errors():
    feats = feature_sets()
    with pytest.raises(ShapeError, match="at least 1 feature set"):
        nr.mmd2_matrix([])
    with pytest.raises(ShapeError, match="got 5 in features"):
        nr.mmd2_matrix([feats[0], feats[1][:, :5]])
    with pytest.raises(ShapeError, match="sequence"):
        nr.mmd2_matrix(feats[0])
    for bad in (None, 3.0, "abc"):
        with pytest.raises(DTypeError, match="expected features as a sequence .* got"):
            nr.mmd2_matrix(bad)
    with pytest.raises(ShapeError, match="at least 2 samples"):
        nr.mmd2_matrix([feats[0], feats[0][:1]])


# ---- large offsets and magnitudes (issue 19, item 4) -------------------------------------------

def offset_pair():
    rng = np.random.default_rng(11)
    x = rng.normal(size=(150, 16)).astype(np.float32)
    y = rng.normal(0.4, size=(120, 16)).astype(np.float32)
    return x, y


@pytest.mark.parametrize("offset", [1e4, -3e5])
def test_large_common_offset_keeps_precision(offset):
    x, y = offset_pair()
    xs, ys = x + np.float32(offset), y + np.float32(offset)  # float32 data sharing a large offset
    # references: float64 distances (cdist subtracts first) of the very same float32 arrays
    want = ref_mmd2(xs, ys, [2.0])
    assert want > 0.01
    np.testing.assert_allclose(nr.mmd2(xs, ys, sigma=2.0), want, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(nr.median_sigma(xs, ys), ref_median_sigma(xs, ys), rtol=1e-5)
    np.testing.assert_allclose(nr.mmd.gaussian_kernel_matrix(xs, ys, sigma=2.0), ref_kernel(xs, ys, [2.0]),
                               atol=1e-5)
    D = nr.mmd2_matrix([xs, ys, xs[::2]], sigma=2.0)
    np.testing.assert_allclose(D[0, 1], want, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(D[1, 2], ref_mmd2(ys, xs[::2], [2.0]), rtol=RTOL, atol=ATOL)
    res = nr.mmd2_test(xs, ys, sigma=2.0, n_permutations=200, seed=0)
    np.testing.assert_allclose(res.mmd2, want, rtol=RTOL, atol=ATOL)
    # the null equals brute-force float64 MMD² of the same permutations of the pooled rows
    z = np.concatenate([xs, ys])
    idx = np.random.default_rng(0)
    for p in range(5):
        perm = idx.permutation(len(z))
        ref_null = ref_mmd2(z[perm[:len(xs)]], z[perm[len(xs):]], [2.0])
        np.testing.assert_allclose(res.null[p], ref_null, rtol=RTOL, atol=ATOL)
    assert res.p_value == 1 / 201
    if abs(offset) <= 1e4:  # the same test without the offset (data differ by the shift's rounding, 5e-4)
        plain = nr.mmd2_test(x, y, sigma=2.0, n_permutations=200, seed=0)
        np.testing.assert_allclose(res.null, plain.null, atol=2e-4)
        np.testing.assert_allclose(res.mmd2, plain.mmd2, atol=2e-4)
        assert res.p_value == plain.p_value


@pytest.mark.parametrize("where", ["x", "y"])
def test_values_overflowing_float32_distances_are_refused(where):
    x, y = offset_pair()
    (x if where == "x" else y)[3, 2] = 3e38
    for call in (lambda: nr.mmd2(x, y, sigma=1.0), lambda: nr.median_sigma(x, y),
                 lambda: nr.mmd2_test(x, y, sigma=1.0, n_permutations=5),
                 lambda: nr.mmd.gaussian_kernel_matrix(x, y, sigma=1.0)):
        with pytest.raises(InputValueError,
                           match=rf"expected finite features within .* in {where} .*got a value 3e\+38"):
            call()
    with pytest.raises(InputValueError, match=r"in features\[1\]" if where == "y" else r"in features\[0\]"):
        nr.mmd2_matrix([x, y], sigma=1.0)
    # opposite huge values whose difference overflows float32 itself
    with pytest.raises(InputValueError, match="expected finite features within"):
        nr.mmd2(np.full((3, 2), -3e38, np.float32), np.full((3, 2), 3e38, np.float32), sigma=1.0)


def test_large_but_representable_values_give_finite_results():
    x, y = offset_pair()
    x[3, 2] = 1e17  # below the bound for d = 16: its distances are huge but finite in float32
    got = nr.mmd2(x, y, sigma=2.0)
    assert np.isfinite(got)
    np.testing.assert_allclose(got, ref_mmd2(x, y, [2.0]), rtol=RTOL, atol=ATOL)
