"""Maximum mean discrepancy (MMD²) between feature sets, its permutation test, and the
pairwise domain matrix -- the source-ranking statistic of NeuroADDA.

All functions take float32 ``(n, d)`` feature arrays and run the fused C++ kernels of
``neuroadda_rt._core`` (CUDA when ``device`` resolves to it) with the GIL released.

Copy policy (all functions)
---------------------------
* float32 arrays of any memory layout (C or Fortran order, sliced, negative strides,
  read-only) are read in place: no copy is made on the Python side.
* Arrays of another real dtype (float64, float16, integers) and array-likes (lists) are
  converted to float32 only while they hold at most ``MAX_IMPLICIT_COPY`` (2**20) elements;
  larger ones raise :class:`~neuroadda_rt.errors.DTypeError` rather than silently doubling
  memory. Convert them yourself with ``np.asarray(x, dtype=np.float32)``.
* The kernels pack the rows into 16-row panels internally: O((n + m) d) float32 extra memory.
* Every function first centres its pooled sample (``x`` and ``y``, or all the sets of
  :func:`mmd2_matrix`) on one centre, the coordinate-wise median of at most 2048 evenly spaced
  pooled rows (robust to outlier rows, unlike a mean), into one float32 copy of each input (one
  O((n + m) d) pass; a common shift leaves every distance unchanged). The float32
  kernels compute ``|a|² + |b|² - 2 a·b``, which cancels when the features share a large offset
  (``x + 1e4``); centred, they keep the precision of the spread itself.
* Values further than ``sqrt(FLT_MAX / (8 d))`` (about 1e18 for d = 16, 3e17 for d = 512) from that
  centre would overflow those float32 squared distances: they raise
  :class:`~neuroadda_rt.errors.InputValueError` naming the input, never a NaN result.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Sequence, Union

import numpy as np

from . import _core
from ._device import resolve_device
from .errors import DTypeError, InputValueError, NeuroaddaError, ShapeError

__all__ = ["mmd2", "median_sigma", "mmd2_test", "mmd2_matrix", "gaussian_kernel_matrix", "MMDTestResult",
           "MAX_IMPLICIT_COPY"]

#: Largest number of elements of a non-float32 input that is converted silently.
MAX_IMPLICIT_COPY = 1 << 20
#: Size of the deterministic subsample used by the median heuristic.
MEDIAN_MAX_POINTS = 2048
#: Most permutations one mmd2_test accepts (its int64 indices take 8 * n bytes per permutation).
MAX_PERMUTATIONS = (1 << 31) - 1
#: Most bandwidths one call accepts (the kernels keep them in a fixed-size block).
MAX_SIGMAS = 16

_BLOCK_XX, _BLOCK_YY, _BLOCK_XY = 1, 2, 4

SigmaArg = Union[None, float, Sequence[float], np.ndarray]


@dataclass(frozen=True)
class MMDTestResult:
    """Result of :func:`mmd2_test`.

    Attributes
    ----------
    mmd2 : float
        Observed MMD² (computed from the same float32 pooled kernel matrix as the null, so it
        can differ from :func:`mmd2` in the last ~7 significant digits).
    p_value : float
        ``(1 + #{null >= mmd2}) / (1 + n_permutations)``; never 0.
    null : numpy.ndarray
        float64 ``(n_permutations,)``: the statistic under each permutation, in draw order.
    sigma : float or tuple of float
        The bandwidth(s) used (the median heuristic's value when ``sigma=None``).
    n_permutations : int
    seed : int or None
    """

    mmd2: float
    p_value: float
    null: np.ndarray = field(repr=False)
    sigma: Union[float, tuple]
    n_permutations: int
    seed: Union[int, None]


class _Kernels:
    """``_core`` with kernel input errors (C++ std::invalid_argument -> ValueError) re-raised as
    :class:`InputValueError`; everything reaching them was validated here first except values
    (NaN / inf), which the kernels detect while packing the rows they read anyway."""

    def __getattr__(self, name):
        fn = getattr(_core, name)

        def call(*args):
            try:
                return fn(*args)
            except ValueError as exc:
                if isinstance(exc, NeuroaddaError):
                    raise
                raise InputValueError(str(exc)) from None

        return call


_kernels = _Kernels()


def _features(a, name: str) -> np.ndarray:
    """Validate one feature array; returns a float32 2-D array (a view when possible)."""
    if not isinstance(a, np.ndarray):
        try:
            a = np.asarray(a)
        except (TypeError, ValueError) as exc:
            raise DTypeError(f"expected a float32 (n, d) array for {name}, got {type(a).__name__}") from exc
    if a.dtype.kind not in "fiu":
        raise DTypeError(f"expected float32 features for {name}, got dtype {a.dtype}")
    if a.ndim != 2:
        raise ShapeError(f"expected a 2-D (n_samples, n_features) array for {name}, got shape {a.shape}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ShapeError(f"expected a non-empty (n_samples, n_features) array for {name}, got shape {a.shape}")
    if a.dtype != np.float32:
        if a.size > MAX_IMPLICIT_COPY:
            raise DTypeError(
                f"expected float32 features for {name}, got {a.dtype} with {a.size} elements; arrays above "
                f"{MAX_IMPLICIT_COPY} elements are not converted silently (that would copy "
                f"{a.size * 4 / 2**20:.0f} MiB): pass np.asarray({name}, dtype=np.float32)")
        a = a.astype(np.float32)
    if a.strides[0] % 4 or a.strides[1] % 4:  # only from exotic np.lib.stride_tricks views
        if a.size > MAX_IMPLICIT_COPY:
            raise DTypeError(f"expected {name} with 4-byte aligned strides, got strides {a.strides}")
        a = np.ascontiguousarray(a)
    _check_finite(a, name)
    return a


def _check_finite(a: np.ndarray, name: str) -> None:
    """NaN / inf check in row blocks of ~2**18 elements (no full-size temporary). The kernels check
    again while packing; checking here first keeps the common bad input away from C++ exceptions."""
    step = max(1, (1 << 18) // a.shape[1])
    for i in range(0, a.shape[0], step):
        if not np.isfinite(a[i:i + step]).all():
            bad = int(a.size - np.count_nonzero(np.isfinite(a)))
            raise InputValueError(f"expected finite features, got {bad} NaN or inf values in {name}")


def _pair(x, y):
    x = _features(x, "x")
    y = _features(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ShapeError(f"expected x and y with the same number of features, got {x.shape[1]} and {y.shape[1]}")
    x, y = _centred([x, y], ["x", "y"])
    return x, y


def _value_bound(d: int) -> float:
    """Largest |value - centre| whose float32 squared distances cannot overflow: they reach
    ``|a|² + |b|² + 2|a||b| <= 4 d M²``, kept below half of float32's largest value."""
    return math.sqrt(float(np.finfo(np.float32).max) / (8.0 * d))


def _centred(arrays: list[np.ndarray], names: list[str]) -> list[np.ndarray]:
    """The one centring step of every function here: each validated float32 array minus one centre of
    all of them stacked, as a float32 copy, in one pass per array. The centre is the coordinate-wise
    median of the evenly spaced subsample of at most 2048 pooled rows that the median heuristic uses
    (a mean would do for the offset, but one outlier row of 1e17 moves a mean so far that every
    other row loses its precision; a median stays inside the bulk, and selecting values is exact,
    so the centre does not depend on the memory layout).

    ``a - mu`` of two nearby float32 values is exact, so the centred rows are the input rows shifted
    by one common vector: distances are unchanged, but the float32 kernels no longer cancel
    ``|a|² + |b|² - 2 a·b`` of a large common offset. Raises InputValueError (naming the input)
    for values too large for float32 squared distances."""
    d = arrays[0].shape[1]
    mu = np.median(_subsample_rows(arrays, MEDIAN_MAX_POINTS).astype(np.float64), axis=0).astype(np.float32)
    bound = _value_bound(d)
    out, spread = [], []
    for a in arrays:
        with np.errstate(over="ignore", invalid="ignore"):
            c = np.subtract(a, mu, dtype=np.float32)
        out.append(c)
        spread.append(max(float(c.max()), -float(c.min())))
    worst = int(np.argmax(spread))
    if not spread[worst] <= bound:  # also catches inf from a subtraction that overflowed float32
        a = arrays[worst]
        raise InputValueError(
            f"expected finite features within {bound:.2g} of the pooled median in {names[worst]} (float32 "
            f"squared distances of {d} features overflow beyond, about 1e18 in magnitude), got a value "
            f"{max(float(a.max()), -float(a.min())):.3g} in magnitude, {spread[worst]:.3g} from the median")
    return out


def _estimator(estimator: str) -> bool:
    if estimator not in ("unbiased", "biased"):
        raise InputValueError(f"expected estimator 'unbiased' or 'biased', got {estimator!r}")
    return estimator == "unbiased"


def _check_sizes(n: int, m: int, unbiased: bool) -> None:
    if unbiased and (n < 2 or m < 2):
        raise ShapeError(f"expected at least 2 samples in x and y for the unbiased estimator, got n={n}, m={m} "
                         "(use estimator='biased' for single samples)")


def _one_sigma(s) -> float:
    if isinstance(s, (bool, np.bool_)) or not isinstance(s, numbers.Real):
        raise InputValueError(f"expected sigma as a positive float, got {s!r}")
    v = float(s)
    if not np.isfinite(v) or v <= 0.0:
        raise InputValueError(f"expected sigma > 0 and finite, got {v}")
    return v


def _sigmas(sigma) -> list[float] | None:
    """None, a positive float, or a non-empty sequence of them -> list of floats (or None)."""
    if sigma is None:
        return None
    if isinstance(sigma, (str, bytes)):
        raise InputValueError(f"expected sigma as a float, a sequence of floats or None, got {sigma!r}")
    if isinstance(sigma, np.ndarray) and sigma.ndim == 0:
        sigma = sigma.item()
    if isinstance(sigma, (np.ndarray, Sequence)):
        values = [_one_sigma(s) for s in np.ravel(np.asarray(sigma, dtype=object))] if len(sigma) else []
        if not 1 <= len(values) <= MAX_SIGMAS:
            raise InputValueError(f"expected 1 to {MAX_SIGMAS} bandwidths, got {len(values)}")
        return values
    return [_one_sigma(sigma)]


def _median_sigma_checked(x: np.ndarray, y: np.ndarray) -> float:
    s = float(_kernels._median_sigma(x, y, MEDIAN_MAX_POINTS))
    if not s > 0.0:
        raise InputValueError(
            "expected a positive median pairwise distance for the median heuristic, got 0 (more than half of "
            "the sampled pairs are identical rows); pass sigma explicitly")
    return s


def _report_sigma(values: list[float], given) -> Union[float, tuple]:
    if given is None or not isinstance(given, (np.ndarray, Sequence)) or (isinstance(given, np.ndarray)
                                                                          and given.ndim == 0):
        return values[0]
    return tuple(values)


def median_sigma(x, y) -> float:
    """The median-heuristic bandwidth used when ``sigma=None``.

    ``sigma = sqrt(median_{i<j} |z_i - z_j|² / 2)`` over the pooled sample ``z = [x; y]``. With
    more than 2048 pooled rows, a deterministic evenly spaced subsample ``z[floor(t N / 2048)]``,
    ``t = 0..2047`` is used (no RNG; it keeps the x/y proportion). For an even number of pairs
    the median is the mean of the two middle values. Always computed on the CPU.

    Parameters
    ----------
    x : array_like, shape (n, d)
    y : array_like, shape (m, d)
        float32 features (copy policy in the module docstring).

    Returns
    -------
    float

    Raises
    ------
    ShapeError, DTypeError, InputValueError
        Bad shapes or dtypes, NaN / inf values, or a zero median (duplicated rows).

    Examples
    --------
    >>> import numpy as np, neuroadda_rt as nr
    >>> x = np.zeros((2, 1), np.float32); y = np.ones((2, 1), np.float32)
    >>> round(nr.median_sigma(x, y), 6)  # pairs: 0, 0, 1, 1, 1, 1 -> median 1
    0.707107
    """
    x, y = _pair(x, y)
    return _median_sigma_checked(x, y)


def mmd2(x, y, *, sigma: SigmaArg = None, estimator: str = "unbiased", device: str = "auto") -> float:
    """Squared maximum mean discrepancy between two feature sets (Gretton et al., JMLR 2012).

    Gaussian kernel ``k(a, b) = exp(-|a - b|² / (2 sigma²))``, averaged over the bandwidths when
    ``sigma`` is a sequence. The kernel matrix is never materialised: fused 16x16 tiles, float32
    distances, float64 sums.

    Parameters
    ----------
    x : array_like, shape (n, d)
    y : array_like, shape (m, d)
        float32 features; see the module docstring for the copy policy.
    sigma : float, sequence of float, or None
        Bandwidth(s) > 0; None uses :func:`median_sigma` (x, y).
    estimator : {"unbiased", "biased"}
        "unbiased": the U-statistic (needs n, m >= 2; can be slightly negative).
        "biased": the V-statistic (includes k(a, a) = 1 terms; always >= 0 up to rounding).
    device : {"auto", "cpu", "cuda"}

    Returns
    -------
    float

    Raises
    ------
    ShapeError
        Not 2-D, empty, different feature dimensions, or fewer than 2 samples for "unbiased".
    DTypeError
        Non-numeric input, or a large non-float32 array (see the copy policy).
    InputValueError
        NaN / inf features, sigma <= 0 or NaN, an unknown estimator.
    BackendUnavailableError
        ``device="cuda"`` without a CUDA build or GPU.

    Examples
    --------
    >>> import numpy as np, neuroadda_rt as nr
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(200, 16)).astype(np.float32)
    >>> y = rng.normal(1.0, size=(300, 16)).astype(np.float32)
    >>> nr.mmd2(x, y, sigma=4.0) > nr.mmd2(x, x[::-1].copy(), sigma=4.0)
    True
    """
    unbiased = _estimator(estimator)
    x, y = _pair(x, y)
    _check_sizes(x.shape[0], y.shape[0], unbiased)
    sigmas = _sigmas(sigma)
    dev = resolve_device(device)
    if sigmas is None:
        sigmas = [_median_sigma_checked(x, y)]
    return float(_kernels._mmd2(x, y, sigmas, unbiased, dev))


def gaussian_kernel_matrix(x, y, *, sigma: SigmaArg) -> np.ndarray:
    """The Gaussian kernel matrix of the package: ``K[i, j] = k(x_i, y_j)``.

    The one definition of the kernel every MMD² here is built from,
    ``k(a, b) = mean_s exp(-|a - b|² / (2 sigma_s²))``, evaluated by the same C++ code as
    :func:`mmd2` (16x16 register tiles, float32 squared distances from norms and dot products,
    clamped at 0, float32 exp). Unlike :func:`mmd2` it materialises the matrix; use it where the
    kernel values themselves are needed (the QC monitor's witness and drift sums). Always
    computed on the CPU.

    Parameters
    ----------
    x : array_like, shape (n, d)
    y : array_like, shape (m, d)
        float32 features (copy policy in the module docstring).
    sigma : float or sequence of float
        Bandwidth(s) > 0 (at most ``MAX_SIGMAS``); the kernel is averaged over them.

    Returns
    -------
    numpy.ndarray
        float32 ``(n, m)``. Entries agree with the float64 formula to about 1e-6 (absolute).

    Raises
    ------
    ShapeError, DTypeError, InputValueError
        As :func:`mmd2`; ``sigma`` is required.

    Examples
    --------
    >>> import numpy as np
    >>> from neuroadda_rt.mmd import gaussian_kernel_matrix
    >>> x = np.zeros((1, 2), np.float32); y = np.array([[0, 0], [1, 1]], np.float32)
    >>> gaussian_kernel_matrix(x, y, sigma=1.0).round(4)  # exp(-0), exp(-2 / 2)
    array([[1.    , 0.3679]], dtype=float32)
    """
    x, y = _pair(x, y)
    sigmas = _sigmas(sigma)
    if sigmas is None:
        raise InputValueError("expected sigma as a positive float or a sequence of them, got None")
    return _kernels._gaussian_kernel(x, y, sigmas)


def _permutation_indices(seed, N: int, n: int, P: int) -> np.ndarray:
    """x-part of each permutation: ``default_rng(seed).permutation(N)[:n]`` per draw, in order."""
    rng = np.random.default_rng(seed)
    out = np.empty((P, n), dtype=np.int64)
    for p in range(P):
        out[p] = rng.permutation(N)[:n]
    return out


def mmd2_test(x, y, *, n_permutations: int = 1000, sigma: SigmaArg = None, seed: Union[int, None] = 0,
              estimator: str = "unbiased", device: str = "auto") -> MMDTestResult:
    """Permutation two-sample test with the MMD² statistic.

    The pooled kernel matrix K of ``z = [x; y]`` (N = n + m rows) is computed once. Each
    permutation draws which pooled rows play x: ``rng = numpy.random.default_rng(seed)`` and,
    for each draw in order, ``rng.permutation(N)[:n]`` (so the null is reproducible with NumPy
    alone). All permutations are evaluated in blocks by one C++ pass per block over K using
    ``s_xx = a'Ka``, ``s_xy = a'K1 - s_xx`` and ``s_yy = 1'K1 - 2 s_xy - s_xx``, no Python loop
    over K. ``p_value = (1 + #{null >= observed}) / (1 + n_permutations)``.

    Parameters
    ----------
    x : array_like, shape (n, d)
    y : array_like, shape (m, d)
        float32 features; see the module docstring for the copy policy.
    n_permutations : int
        Number of permutations, 1 to ``MAX_PERMUTATIONS`` (2**31 - 1).
    sigma : float, sequence of float, or None
        As in :func:`mmd2`; None uses the median heuristic on the pooled sample.
    seed : int or None
        Seed (>= 0) of ``numpy.random.default_rng``; None draws fresh entropy (not reproducible).
    estimator : {"unbiased", "biased"}
    device : {"auto", "cpu", "cuda"}

    Returns
    -------
    MMDTestResult

    Notes
    -----
    Memory: K is float32 N x N (4 N² bytes, 64 MiB for N = 4096) plus ``n_permutations x n``
    int64 indices.

    Examples
    --------
    >>> import numpy as np, neuroadda_rt as nr
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(100, 8)).astype(np.float32)
    >>> y = rng.normal(0.5, size=(100, 8)).astype(np.float32)
    >>> res = nr.mmd2_test(x, y, n_permutations=200, seed=1)
    >>> res.p_value < 0.05, res.null.shape
    (True, (200,))
    """
    unbiased = _estimator(estimator)
    if isinstance(n_permutations, (bool, np.bool_)) or not isinstance(n_permutations, numbers.Integral):
        raise InputValueError(f"expected n_permutations as a positive int, got {n_permutations!r}")
    if not 1 <= n_permutations <= MAX_PERMUTATIONS:
        raise InputValueError(f"expected n_permutations in [1, {MAX_PERMUTATIONS}], got {n_permutations}")
    if seed is not None and (isinstance(seed, (bool, np.bool_)) or not isinstance(seed, numbers.Integral)):
        raise InputValueError(f"expected seed as an int or None, got {seed!r}")
    if seed is not None and seed < 0:
        raise InputValueError(f"expected seed >= 0 (a seed of numpy.random.default_rng) or None, got {seed}")
    x, y = _pair(x, y)
    n, m = x.shape[0], y.shape[0]
    _check_sizes(n, m, unbiased)
    given = sigma
    sigmas = _sigmas(sigma)
    dev = resolve_device(device)
    if sigmas is None:
        sigmas = [_median_sigma_checked(x, y)]
    x_index = _permutation_indices(seed, n + m, n, int(n_permutations))
    observed, null = _kernels._mmd2_permutation(x, y, sigmas, x_index, unbiased, dev)
    null = np.asarray(null, dtype=np.float64)
    p_value = (1.0 + float(np.count_nonzero(null >= observed))) / (1.0 + n_permutations)
    return MMDTestResult(mmd2=float(observed), p_value=p_value, null=null, sigma=_report_sigma(sigmas, given),
                         n_permutations=int(n_permutations), seed=seed)


def mmd2_matrix(features, *, sigma: Union[SigmaArg, str] = None, estimator: str = "unbiased",
                device: str = "auto") -> np.ndarray:
    """Pairwise MMD² between K feature sets (the domain matrix of the atlas).

    Parameters
    ----------
    features : sequence of array_like
        K >= 1 float32 arrays ``(n_k, d)`` with the same d (copy policy in the module docstring).
    sigma : float, sequence of float, None or "pooled"
        A fixed bandwidth (or several): every entry uses it, and each set's within-set kernel sum
        is computed once instead of K - 1 times (all sets are centred on their one pooled centre,
        so entries agree with :func:`mmd2` of the pair to float32 rounding, ~1e-6). None: each
        pair uses its own median heuristic (and is centred on its own centre), so entry (i, j)
        equals ``mmd2(features[i], features[j])`` exactly. "pooled": one median
        heuristic over all sets (evenly spaced subsample of at most 2048 rows of their
        concatenation, gathered without concatenating), which makes entries comparable.
    estimator : {"unbiased", "biased"}
    device : {"auto", "cpu", "cuda"}

    Returns
    -------
    numpy.ndarray
        float64 (K, K), symmetric, with a zero diagonal by definition (a set against itself).

    Examples
    --------
    >>> import numpy as np, neuroadda_rt as nr
    >>> rng = np.random.default_rng(0)
    >>> feats = [rng.normal(mu, size=(64, 4)).astype(np.float32) for mu in (0.0, 0.1, 2.0)]
    >>> D = nr.mmd2_matrix(feats, sigma=2.0)
    >>> D.shape, bool(D[0, 2] > D[0, 1])
    ((3, 3), True)
    """
    unbiased = _estimator(estimator)
    if isinstance(features, np.ndarray) and features.ndim == 2:
        raise ShapeError("expected a sequence of (n_k, d) arrays, got a single 2-D array")
    try:
        if isinstance(features, (str, bytes)):
            raise TypeError
        features = list(features)
    except TypeError:
        raise DTypeError(f"expected features as a sequence (list or tuple) of (n_k, d) float32 arrays, "
                         f"got {type(features).__name__}") from None
    feats = [_features(f, f"features[{k}]") for k, f in enumerate(features)]
    if not feats:
        raise ShapeError("expected at least 1 feature set, got 0")
    d = feats[0].shape[1]
    for k, f in enumerate(feats):
        if f.shape[1] != d:
            raise ShapeError(f"expected every feature set with {d} features, got {f.shape[1]} in features[{k}]")
        _check_sizes(f.shape[0], f.shape[0], unbiased)
    names = [f"features[{k}]" for k in range(len(feats))]
    raw = feats
    if sigma is not None:  # one centring of all the sets; sigma=None centres each pair below
        feats = _centred(feats, names)
    dev = resolve_device(device)
    K = len(feats)
    out = np.zeros((K, K), dtype=np.float64)
    if isinstance(sigma, str) and sigma == "pooled":
        sigmas = [_pooled_median_sigma(feats)]
    else:
        sigmas = _sigmas(sigma)
    if sigmas is None:  # each pair centred on its own centre, exactly as mmd2(features[i], features[j])
        for i in range(K):
            for j in range(i + 1, K):
                a, b = _centred([raw[i], raw[j]], [names[i], names[j]])
                s = _median_sigma_checked(a, b)
                out[i, j] = out[j, i] = _kernels._mmd2(a, b, [s], unbiased, dev)
        return out
    self_sums = [_kernels._mmd_sums(f, f, sigmas, _BLOCK_XX, dev)[0] for f in feats]
    for i in range(K):
        for j in range(i + 1, K):
            kxy = _kernels._mmd_sums(feats[i], feats[j], sigmas, _BLOCK_XY, dev)[2]
            out[i, j] = out[j, i] = _kernels._mmd2_from_sums(self_sums[i], self_sums[j], kxy, float(feats[i].shape[0]),
                                                          float(feats[j].shape[0]), unbiased)
    return out


def _subsample_rows(feats: list[np.ndarray], max_points: int) -> np.ndarray:
    """Rows ``z[floor(t N / s)]``, ``t = 0..s-1``, ``s = min(N, max_points)`` of the concatenation ``z``
    of the sets (N rows), gathered without concatenating."""
    sizes = np.array([f.shape[0] for f in feats], dtype=np.int64)
    N = int(sizes.sum())
    s = min(N, max_points)
    pooled = (np.arange(s, dtype=np.int64) * N) // s
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    which = np.searchsorted(offsets, pooled, side="right") - 1
    return np.stack([feats[k][i - offsets[k]] for k, i in zip(which, pooled)])


def _pooled_median_sigma(feats: list[np.ndarray]) -> float:
    rows = _subsample_rows(feats, MEDIAN_MAX_POINTS)
    s = rows.shape[0]
    if s < 2:
        raise ShapeError(f"expected at least 2 rows over all feature sets for the median heuristic, got {s}")
    return _median_sigma_checked(rows[: s // 2], rows[s // 2:])
