"""VI / adapted Rand / ContingencyTable against skimage.metrics (gt = image_true, seg = image_test)."""

from __future__ import annotations

import pickle
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from skimage.metrics import adapted_rand_error as sk_are
from skimage.metrics import variation_of_information as sk_vi

import neuroadda_rt as nr
from neuroadda_rt import ContingencyTable
from neuroadda_rt.errors import BackendUnavailableError, DTypeError, InputValueError, ShapeError

TOL = dict(rtol=1e-9, atol=1e-12)
DTYPES = [np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64]


def dense(seg, gt, ignore_gt=(0,)):
    """Relabel to small non-negative ids for skimage (it indexes a sparse matrix by label),
    keeping which gt voxels are ignored."""
    g_u, g_inv = np.unique(gt.ravel(), return_inverse=True)
    s_u, s_inv = np.unique(seg.ravel(), return_inverse=True)
    ig = [int(i) for i, v in enumerate(g_u) if any(v == x for x in ignore_gt)]
    return s_inv.reshape(seg.shape), g_inv.reshape(gt.shape), ig


def reference(seg, gt, ignore_gt=(0,)):
    s, g, ig = dense(seg, gt, ignore_gt)
    split, merge = sk_vi(g, s, ignore_labels=ig)
    return (split, merge), sk_are(g, s, ignore_labels=ig)


def check(seg, gt, ignore_gt=(0,)):
    vi_ref, are_ref = reference(seg, gt, ignore_gt)
    np.testing.assert_allclose(nr.variation_of_information(seg, gt, ignore_gt=ignore_gt), vi_ref, **TOL)
    np.testing.assert_allclose(nr.adapted_rand_error(seg, gt, ignore_gt=ignore_gt), are_ref, **TOL)


def blobs(rng, shape, n_labels, dtype, noise=0.1):
    """Spatially coherent labels (like a segmentation) with some random voxels."""
    coarse = rng.integers(0, n_labels, size=tuple(-(-s // 4) for s in shape))
    lab = coarse
    for ax in range(len(shape)):
        lab = np.repeat(lab, 4, axis=ax)
    lab = lab[tuple(slice(0, s) for s in shape)]
    flip = rng.random(shape) < noise
    lab = np.where(flip, rng.integers(0, n_labels, size=shape), lab)
    return lab.astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES + [np.bool_])
def test_random_labels_all_dtypes_direct_skimage(rng, dtype):
    hi = 2 if dtype == np.bool_ else 30
    gt = rng.integers(0, hi, size=(9, 17, 13)).astype(dtype)
    seg = rng.integers(0, hi, size=(9, 17, 13)).astype(dtype)
    gi, si = gt.astype(np.int64), seg.astype(np.int64)
    np.testing.assert_allclose(nr.variation_of_information(seg, gt), sk_vi(gi, si, ignore_labels=[0]), **TOL)
    np.testing.assert_allclose(nr.adapted_rand_error(seg, gt), sk_are(gi, si), **TOL)


@pytest.mark.parametrize("shape", [(5,), (7,), (31, 29), (6, 11, 13), (2, 3, 4, 5, 6)])
def test_structured_labels_shapes(rng, shape):
    gt = blobs(rng, shape, 12, np.uint32)
    seg = blobs(rng, shape, 20, np.int64)
    if np.any(gt != 0):
        check(seg, gt)
    check(seg, gt, ignore_gt=())


def test_mixed_dtypes(rng):
    gt = blobs(rng, (20, 21), 50, np.uint16)
    for dt in DTYPES:
        seg = blobs(rng, (20, 21), 40, dt)
        check(seg, gt)
        check(gt, seg)


def test_ids_near_2_to_64(rng):
    top = np.uint64(2**64 - 1)
    gt = top - rng.integers(0, 40, size=(15, 16, 17)).astype(np.uint64)
    seg = top - rng.integers(0, 25, size=(15, 16, 17)).astype(np.uint64)
    check(seg, gt, ignore_gt=())
    check(seg, gt, ignore_gt=(2**64 - 1, 2**64 - 3))
    # sparse ids spread over the whole 64-bit range
    ids = rng.integers(0, 2**64 - 1, size=50, dtype=np.uint64, endpoint=True)
    gt2 = ids[rng.integers(0, 50, size=(40, 40))]
    seg2 = ids[rng.integers(0, 30, size=(40, 40))]
    check(seg2, gt2, ignore_gt=(int(ids[0]),))


def test_negative_labels_are_sign_extended(rng):
    gt = rng.integers(-5, 5, size=(30, 30)).astype(np.int16)
    seg = rng.integers(-3, 3, size=(30, 30)).astype(np.int64)
    check(seg, gt, ignore_gt=(-1,))
    # -1 in a signed dtype is the same label as 2**64 - 1 in uint64
    a = nr.variation_of_information(seg, gt.astype(np.int64).view(np.uint64), ignore_gt=(2**64 - 1,))
    b = nr.variation_of_information(seg, gt, ignore_gt=(-1,))
    assert a == b


def test_ignore_labels(rng):
    gt = blobs(rng, (25, 26), 8, np.int32)
    seg = blobs(rng, (25, 26), 8, np.int32)
    for ig in [(), (0,), (0, 3), (1, 2, 5, 99)]:
        check(seg, gt, ignore_gt=ig)
    # ignore_seg drops voxels by their seg label: equal to removing them before scoring
    keep = (seg != 2) & (seg != 4) & (gt != 0)
    (split, merge), _ = reference(seg[keep], gt[keep], ignore_gt=())
    np.testing.assert_allclose(nr.variation_of_information(seg, gt, ignore_seg=(2, 4)), (split, merge), **TOL)
    np.testing.assert_allclose(nr.variation_of_information(seg, gt, ignore_seg=[np.int64(2), 4]), (split, merge))


def test_all_one_label_cases(rng):
    gt = blobs(rng, (16, 16), 6, np.uint8) + 1
    one = np.full_like(gt, 7)
    check(one, gt)  # everything merged: split 0
    check(gt, one)  # everything split: merge 0
    check(one, one)
    assert nr.variation_of_information(one, one) == (0.0, 0.0)
    assert nr.adapted_rand_error(one, one) == (0.0, 1.0, 1.0)
    vi = nr.variation_of_information(one, gt)
    assert vi[0] == 0.0 and vi[1] > 0
    with pytest.raises(InputValueError, match="ignore"):
        nr.variation_of_information(gt, np.zeros_like(gt))  # every gt voxel is background
    with pytest.raises(InputValueError, match="ignore"):
        nr.adapted_rand_error(gt, np.zeros_like(gt))


def test_singletons_give_nan_rand_terms():
    seg = np.arange(1, 10)
    err, prec, rec = nr.adapted_rand_error(seg, seg)
    assert np.isnan(err) and np.isnan(prec) and np.isnan(rec)


def test_base_and_units(rng):
    gt = blobs(rng, (20, 20), 10, np.int32)
    seg = blobs(rng, (20, 20), 10, np.int32)
    bits = np.array(nr.variation_of_information(seg, gt))
    np.testing.assert_allclose(nr.variation_of_information(seg, gt, base=np.e), bits * np.log(2), rtol=1e-12)
    np.testing.assert_allclose(nr.variation_of_information(seg, gt, base=10), bits * np.log10(2), rtol=1e-12)
    with pytest.raises(ValueError, match="base"):
        nr.variation_of_information(seg, gt, base=1)


def test_memory_orders_and_strides(rng):
    gt = blobs(rng, (12, 14, 16), 30, np.uint64)
    seg = blobs(rng, (12, 14, 16), 30, np.int32)
    expected = nr.variation_of_information(seg, gt), nr.adapted_rand_error(seg, gt)
    views = [
        (np.asfortranarray(seg), gt),  # F vs C: iterated by strides, no copy
        (np.asfortranarray(seg), np.asfortranarray(gt)),
        (seg.transpose(2, 0, 1), gt.transpose(2, 0, 1)),
        (seg[::-1, :, ::-1], gt[::-1, :, ::-1]),
    ]
    for s, g in views:
        assert nr.variation_of_information(s, g) == expected[0]
        assert nr.adapted_rand_error(s, g) == expected[1]
    s, g = seg[::2, 1::3, ::-2], gt[::2, 1::3, ::-2]
    check(s, g)
    check(np.broadcast_to(seg[:1], seg.shape), gt)  # zero strides


def test_blockwise_merged_and_pickled_equal_one_shot(rng):
    gt = blobs(rng, (24, 30, 28), 300, np.uint64)
    seg = blobs(rng, (24, 30, 28), 200, np.int32)
    one = ContingencyTable().add(seg, gt)
    blocks = [(slice(z, z + 7), slice(y, y + 11), slice(None)) for z in range(0, 24, 7) for y in range(0, 30, 11)]
    rng.shuffle(blocks)
    t = ContingencyTable()
    for b in blocks:
        t.add(seg[b], gt[b])
    workers = [ContingencyTable() for _ in range(3)]
    for i, b in enumerate(blocks):
        workers[i % 3].add(seg[b], gt[b])
    merged = ContingencyTable()
    for w in reversed(workers):
        merged.merge(pickle.loads(pickle.dumps(w)))
    t.add(seg[:0], gt[:0])  # empty block: no-op
    for other in (t, merged):
        assert other.total == one.total == seg.size and other.n_pairs == one.n_pairs
        for kw in [{}, {"ignore_gt": ()}, {"ignore_seg": (3,), "ignore_gt": (0, 5)}]:
            assert other.variation_of_information(**kw) == one.variation_of_information(**kw)
        assert other.adapted_rand_error() == one.adapted_rand_error()
        assert other.adapted_rand_error(ignore_gt=(), alpha=0.3) == one.adapted_rand_error(ignore_gt=(), alpha=0.3)
    np.testing.assert_allclose(one.variation_of_information(), reference(seg, gt)[0], **TOL)
    # merging a table into itself doubles every count: proportions, hence VI, unchanged
    doubled = pickle.loads(pickle.dumps(one)).merge(one)
    doubled.merge(doubled)
    assert doubled.total == 4 * one.total
    np.testing.assert_allclose(doubled.variation_of_information(), one.variation_of_information(), rtol=1e-12)


def test_entries_round_trip(rng):
    gt = blobs(rng, (10, 10), 5, np.int8)
    seg = blobs(rng, (10, 10), 5, np.int8)
    s, g, n = ContingencyTable().add(seg, gt).entries()
    assert n.sum() == 100 and s.dtype == np.uint64
    brute = {}
    for a, b in zip(seg.ravel().astype(np.int64), gt.ravel().astype(np.int64)):
        key = (int(a) % 2**64, int(b) % 2**64)
        brute[key] = brute.get(key, 0) + 1
    assert dict(zip(zip(s.tolist(), g.tolist()), n.tolist())) == brute


def test_large_volume_multithreaded_count(rng):
    # > 1 M voxels so the count runs on several OpenMP threads, with per-thread maps merged.
    gt = blobs(rng, (40, 160, 170), 500, np.uint32, noise=0.02)
    seg = blobs(rng, (40, 160, 170), 700, np.uint64, noise=0.02)
    t = ContingencyTable().add(seg, gt)
    serial = ContingencyTable()
    for z in range(40):
        serial.add(seg[z], gt[z])  # 27 k voxels per block: single-threaded path
    assert t.variation_of_information() == serial.variation_of_information()
    assert t.adapted_rand_error() == serial.adapted_rand_error()
    np.testing.assert_allclose(t.variation_of_information(), reference(seg, gt)[0], **TOL)


def test_gil_released_threads_match_serial(rng):
    pairs = [(blobs(rng, (30, 40, 40), 60, np.int64), blobs(rng, (30, 40, 40), 40, np.uint16)) for _ in range(4)]
    serial = [(nr.variation_of_information(s, g), nr.adapted_rand_error(s, g)) for s, g in pairs]
    with ThreadPoolExecutor(4) as ex:
        threaded = list(ex.map(lambda p: (nr.variation_of_information(*p), nr.adapted_rand_error(*p)), pairs * 3))
    assert threaded == serial * 3
    # concurrent adds into one shared table (it locks its own state)
    seg, gt = pairs[0]
    shared = ContingencyTable()
    with ThreadPoolExecutor(4) as ex:
        list(ex.map(lambda z: shared.add(seg[z], gt[z]), range(30)))
    assert shared.variation_of_information() == serial[0][0]


def test_errors(rng):
    a = rng.integers(0, 5, size=(4, 5))
    with pytest.raises(ShapeError, match="same shape"):
        nr.variation_of_information(a, a[:3])
    with pytest.raises(ShapeError, match="same shape"):
        ContingencyTable().add(a, a.T)
    with pytest.raises(ShapeError, match="non-empty"):
        nr.variation_of_information(a[:0], a[:0])
    with pytest.raises(DTypeError, match="integer"):
        nr.variation_of_information(a.astype(np.float32), a)
    with pytest.raises(DTypeError, match="integer"):
        nr.adapted_rand_error(a, a.astype(np.float64))
    with pytest.raises(DTypeError, match="integer"):
        nr.variation_of_information(a, a, ignore_gt=(0.5,))
    with pytest.raises(DTypeError, match="byte order"):
        nr.variation_of_information(a.astype(">u8"), a)
    with pytest.raises(InputValueError, match="2\\*\\*64"):
        nr.variation_of_information(a, a, ignore_gt=(2**64,))
    with pytest.raises(ValueError, match="alpha"):
        nr.adapted_rand_error(a, a, alpha=2)
    with pytest.raises(TypeError, match="ContingencyTable"):
        ContingencyTable().merge("table")
    with pytest.raises(BackendUnavailableError):  # CPU-only kernel: an explicit cuda request is refused
        nr.variation_of_information(a, a, device="cuda")
    with pytest.raises(ValueError, match="device"):
        nr.adapted_rand_error(a, a, device="gpu")


def test_zero_d_bool_and_unaligned():
    assert nr.variation_of_information(np.array(3), np.array(4)) == (0.0, 0.0)
    b = np.array([True, True, False, False, True])
    check(b, ~b, ignore_gt=())
    raw = np.zeros(8 * 60 + 1, np.uint8)
    un = np.frombuffer(raw.data, dtype=np.uint64, count=60, offset=1)  # misaligned view
    assert not un.flags.aligned
    lab = np.arange(60, dtype=np.uint64) // 7
    raw[1:] = lab.view(np.uint8)
    assert nr.variation_of_information(un, lab, ignore_gt=()) == (0.0, 0.0)


def test_single_voxel():
    one = np.array([3], dtype=np.uint8)
    assert nr.variation_of_information(one, one) == (0.0, 0.0)
    assert all(np.isnan(nr.adapted_rand_error(one, one)))  # no pair of voxels: 0 / 0


# ---- issue 19: a forged pickle state, ignore labels of the wrong type ---------------------------

class _Forged:
    """Pickles as a ContingencyTable with the given state (what a tampered pickle file holds)."""

    def __init__(self, counts):
        n = len(counts)
        self.state = {"entries": (np.arange(n, dtype=np.uint64), np.zeros(n, np.uint64),
                                  np.asarray(counts, dtype=np.uint64))}

    def __reduce__(self):
        return object.__new__, (ContingencyTable,), self.state


@pytest.mark.parametrize("counts", [[2**63, 2**63], [2**64 - 1, 1], [2**62] * 4 + [5], [2**64 - 1] * 3])
def test_unpickled_counts_summing_to_2_64_are_refused(counts):
    assert sum(counts) >= 2**64  # independent reference: Python's exact integers
    blob = pickle.dumps(_Forged(counts))
    with pytest.raises(InputValueError, match=r"sum to less than 2\*\*64, got a sum of " + str(sum(counts))):
        pickle.loads(blob)


def test_unpickled_counts_just_below_2_64_are_kept():
    t = pickle.loads(pickle.dumps(_Forged([2**63, 2**63 - 1])))  # sum 2**64 - 1: still representable
    assert isinstance(t, ContingencyTable) and t.total == 2**64 - 1 and t.n_pairs == 2


def test_merge_overflowing_2_64_is_refused():
    t = pickle.loads(pickle.dumps(_Forged([2**63])))
    with pytest.raises(InputValueError, match="2\\*\\*64"):
        t.merge(pickle.loads(pickle.dumps(t)))
    assert t.total == 2**63


@pytest.mark.parametrize("bad", [None, "0", 1.0, True])
def test_ignore_labels_of_the_wrong_type(bad):
    a = np.array([[1, 1, 2], [2, 3, 3]])
    for call in (lambda: nr.adapted_rand_error(a, a, ignore_gt=bad),
                 lambda: nr.variation_of_information(a, a, ignore_gt=bad),
                 lambda: nr.variation_of_information(a, a, ignore_seg=bad)):
        with pytest.raises(DTypeError, match=r"expected ignore_(gt|seg) as an int or a sequence of ints .* got"):
            call()


@pytest.mark.parametrize("kwargs", [{"base": "e"}, {"base": 1}, {"base": None}])
def test_bad_vi_base_is_a_typed_error(kwargs):
    # Issue 19 audit: these were plain ValueError / float() errors, not the package's typed errors
    from neuroadda_rt.errors import InputValueError

    seg = np.array([[1, 2], [2, 1]])
    with pytest.raises(InputValueError, match="base"):
        nr.variation_of_information(seg, seg, **kwargs)


@pytest.mark.parametrize("alpha", ["a", -0.1, float("nan")])
def test_bad_rand_alpha_is_a_typed_error(alpha):
    from neuroadda_rt.errors import InputValueError

    seg = np.array([[1, 2], [2, 1]])
    with pytest.raises(InputValueError, match="alpha"):
        nr.adapted_rand_error(seg, seg, alpha=alpha)
