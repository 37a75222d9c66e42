"""tile_uncertainty against float64 NumPy references (scipy.special.xlogy for 0 log 0)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import DEVICES
from scipy.special import xlogy

import neuroadda_rt as nr
from neuroadda_rt.errors import DTypeError, InputValueError, ShapeError

# float32 per element (polynomial log, ~1 ulp) and float64 across elements.
TOL = dict(rtol=1e-5, atol=2e-6)


def _h(p):
    return -(xlogy(p, p) + xlogy(1 - p, 1 - p))


def ref(probs, measure, mask=None, mc=False):
    """Float64 NumPy reference with an explicit (N, C, *S) weight array."""
    p = probs.astype(np.float64)
    if mc:
        mean = p.mean(axis=0)
        per = {"entropy": lambda: _h(mean), "margin": lambda: 1 - np.abs(2 * mean - 1),
               "bald": lambda: _h(mean) - _h(p).mean(axis=0), "variance": lambda: p.var(axis=0)}[measure]()
    else:
        per = _h(p) if measure == "entropy" else 1 - np.abs(2 * p - 1)
    w = np.ones(per.shape) if mask is None else np.broadcast_to(mask, per.shape).astype(np.float64)
    per = np.where(w > 0, per, 0.0)
    n = per.shape[0]
    with np.errstate(invalid="ignore"):
        return per.reshape(n, -1).sum(1) / w.reshape(n, -1).sum(1)


def rand_probs(rng, shape, edges=True):
    p = rng.random(shape, dtype=np.float32)
    if edges:  # exact 0 and 1, and values next to them
        flat = p.reshape(-1)
        k = max(1, flat.size // 50)
        flat[:k] = 0.0
        flat[k:2 * k] = 1.0
        flat[2 * k:3 * k] = np.float32(1e-7)
        flat[3 * k:4 * k] = np.float32(1 - 6e-8)
        rng.shuffle(flat)
    return p


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("measure", ["entropy", "margin"])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (3, 2, 7, 5), (2, 3, 5, 6, 7), (2, 1, 181, 182), (5, 3, 17, 1, 33)])
def test_single_matches_numpy(rng, device, measure, shape):
    p = rand_probs(rng, shape)
    np.testing.assert_allclose(nr.tile_uncertainty(p, measure=measure, device=device), ref(p, measure), **TOL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("measure", ["entropy", "margin", "bald", "variance"])
@pytest.mark.parametrize("shape", [(2, 3, 2, 9, 11), (5, 2, 1, 4, 3, 7), (3, 1, 2, 181, 182)])
def test_mc_matches_numpy(rng, device, measure, shape):
    p = rand_probs(rng, shape)
    got = nr.tile_uncertainty(p, measure=measure, mc_samples=True, device=device)
    np.testing.assert_allclose(got, ref(p, measure, mc=True), **TOL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mc", [False, True])
@pytest.mark.parametrize("mask_shape", ["S", "N1S", "NCS", "1C1W", "W", "strided"])
def test_masks(rng, device, mc, mask_shape):
    n, c, h, w = 4, 3, 13, 10
    p = rand_probs(rng, ((3,) if mc else ()) + (n, c, h, w))
    shapes = {"S": (h, w), "N1S": (n, 1, h, w), "NCS": (n, c, h, w), "1C1W": (1, c, 1, w), "W": (w,)}
    if mask_shape == "strided":
        mask = (rng.random((n, 1, h, 2 * w)) > 0.3)[..., ::2]
    else:
        mask = rng.random(shapes[mask_shape]) > 0.3
    for measure in (["entropy", "margin", "bald", "variance"] if mc else ["entropy", "margin"]):
        got = nr.tile_uncertainty(p, measure=measure, mask=mask, mc_samples=mc, device=device)
        np.testing.assert_allclose(got, ref(p, measure, mask=mask, mc=mc), **TOL)


@pytest.mark.parametrize("device", DEVICES)
def test_masked_out_values_are_neither_used_nor_validated(rng, device):
    p = rng.random((3, 2, 6, 6), dtype=np.float32)
    mask = np.ones((3, 1, 6, 6), bool)
    mask[0, :, :2] = False
    mask[2] = False  # a tile with nothing left -> NaN
    p[0, :, :2] = np.nan
    p[0, 1, 0, 0] = 7.0
    got = nr.tile_uncertainty(p, mask=mask, device=device)
    assert np.isnan(got[2])
    np.testing.assert_allclose(got[:2], ref(np.nan_to_num(p), "entropy", mask=mask)[:2], **TOL)


@pytest.mark.parametrize("device", DEVICES)
def test_known_values(device):
    p = np.full((3, 2, 4, 4), 0.5, np.float32)
    p[1], p[2] = 0.0, 1.0
    np.testing.assert_allclose(nr.tile_uncertainty(p, device=device), [np.log(2), 0, 0], atol=1e-7)
    np.testing.assert_array_equal(nr.tile_uncertainty(p, measure="margin", device=device), [1, 0, 0])
    mc = np.stack([np.zeros_like(p), np.ones_like(p)])  # two confident samples that disagree
    np.testing.assert_allclose(nr.tile_uncertainty(mc, measure="bald", mc_samples=True, device=device),
                               [np.log(2)] * 3, atol=1e-7)
    np.testing.assert_allclose(nr.tile_uncertainty(mc, measure="variance", mc_samples=True, device=device),
                               [0.25] * 3, atol=1e-7)


def test_layouts_without_and_with_copy(rng):
    base = rand_probs(rng, (4, 6, 9, 8))
    expected = ref(base, "entropy")
    # Slicing leading axes keeps spatial blocks contiguous: read in place.
    np.testing.assert_allclose(nr.tile_uncertainty(base[::2, 1::2]), ref(base[::2, 1::2], "entropy"), **TOL)
    # Fortran order and strided spatial axes are copied once (documented).
    np.testing.assert_allclose(nr.tile_uncertainty(np.asfortranarray(base)), expected, **TOL)
    np.testing.assert_allclose(nr.tile_uncertainty(base[..., ::2]), ref(base[..., ::2], "entropy"), **TOL)
    raw = np.zeros(base.nbytes + 1, np.uint8)
    raw[1:] = base.reshape(-1).view(np.uint8)
    unaligned = np.frombuffer(raw.data, dtype=np.float32, offset=1).reshape(base.shape)
    assert not unaligned.flags.aligned
    np.testing.assert_allclose(nr.tile_uncertainty(unaligned), expected, **TOL)
    with pytest.raises(DTypeError, match="float32"):
        nr.tile_uncertainty(base.astype(">f4"))
    ro = base.copy()
    ro.setflags(write=False)
    np.testing.assert_allclose(nr.tile_uncertainty(ro), expected, **TOL)


def test_result_is_independent_of_chunking_and_repeatable(rng):
    p = rand_probs(rng, (3, 2, 300, 301))
    a = nr.tile_uncertainty(p)
    b = nr.tile_uncertainty(p.copy())
    np.testing.assert_array_equal(a, b)
    # Each tile depends only on its own data.
    np.testing.assert_array_equal(nr.tile_uncertainty(p[1:2]), a[1:2])


@pytest.mark.parametrize("bad", [np.nan, -1e-6, 1.0000001, np.inf])
def test_invalid_probabilities(rng, bad):
    p = rng.random((4, 2, 5, 5), dtype=np.float32)
    p[2, 1, 3, 4] = bad
    with pytest.raises(InputValueError, match="tile 2"):
        nr.tile_uncertainty(p)
    mc = np.stack([p, p])
    with pytest.raises(InputValueError, match="tile 2"):
        nr.tile_uncertainty(mc, measure="variance", mc_samples=True)


def test_argument_errors(rng):
    p = rng.random((2, 2, 4, 4), dtype=np.float32)
    with pytest.raises(DTypeError, match="float32"):
        nr.tile_uncertainty(p.astype(np.float64))
    with pytest.raises(ShapeError, match="dims"):
        nr.tile_uncertainty(p[0])
    with pytest.raises(ShapeError, match="dims"):
        nr.tile_uncertainty(p[None, None, None])
    with pytest.raises(ShapeError, match="non-empty"):
        nr.tile_uncertainty(p[:0])
    with pytest.raises(ValueError, match="measure"):
        nr.tile_uncertainty(p, measure="mutual")
    with pytest.raises(ValueError, match="mc_samples"):
        nr.tile_uncertainty(p, measure="bald")
    with pytest.raises(ShapeError, match="2 Monte-Carlo"):
        nr.tile_uncertainty(p[None], measure="variance", mc_samples=True)
    with pytest.raises(DTypeError, match="bool"):
        nr.tile_uncertainty(p, mask=np.ones((4, 4), np.uint8))
    with pytest.raises(ShapeError, match="broadcastable"):
        nr.tile_uncertainty(p, mask=np.ones((3, 4), bool))
    with pytest.raises(ShapeError, match="broadcastable"):
        nr.tile_uncertainty(p, mask=np.ones((1, 2, 2, 4, 4), bool))
    with pytest.raises(ValueError, match="device"):
        nr.tile_uncertainty(p, device="tpu")


def test_gil_released_threads_match_serial(rng):
    arrays = [rand_probs(rng, (8, 3, 64, 64)) for _ in range(6)]
    serial = [nr.tile_uncertainty(a, measure=m) for a in arrays for m in ("entropy", "margin")]
    seen = set()

    def work(args):
        seen.add(threading.get_ident())
        a, m = args
        return nr.tile_uncertainty(a, measure=m)

    with ThreadPoolExecutor(4) as ex:
        threaded = list(ex.map(work, [(a, m) for a in arrays for m in ("entropy", "margin")] * 3))
    for i, got in enumerate(threaded):
        np.testing.assert_array_equal(got, serial[i % len(serial)])


def test_shared_log_matches_libm():
    x = np.concatenate([np.geomspace(1.2e-38, 1, 2000), np.linspace(0.01, 1, 2000)]).astype(np.float32)
    got = np.array([nr._core._fast_logf(float(v)) for v in x])
    np.testing.assert_allclose(got, np.log(x.astype(np.float64)), rtol=3e-7, atol=2e-7)
    assert nr._core._fast_logf(1.0) == 0.0
    assert nr._core._binary_entropy_f(0.0) == 0.0 and nr._core._binary_entropy_f(1.0) == 0.0


class _FakeGpuArray:
    """Something that claims to live in GPU memory (a host pointer, never dereferenced here)."""

    def __init__(self, a):
        self._a = a
        self.__cuda_array_interface__ = {"shape": a.shape, "typestr": a.dtype.str, "strides": None,
                                         "data": (a.ctypes.data, True), "version": 3}


def test_gpu_resident_input_is_refused_on_cpu_or_without_cuda(rng):
    fake = _FakeGpuArray(rng.random((2, 1, 4, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="GPU memory"):
        nr.tile_uncertainty(fake, device="cpu")
    if not nr.cuda_available():
        with pytest.raises(RuntimeError):  # BackendUnavailableError says why
            nr.tile_uncertainty(fake)


@pytest.mark.cuda
@pytest.mark.parametrize("mc", [False, True])
def test_torch_cuda_tensor_in_place(rng, mc):
    torch = pytest.importorskip("torch")
    p = rand_probs(rng, ((3,) if mc else ()) + (4, 3, 33, 35))
    mask = rng.random((4, 1, 33, 35)) > 0.4
    t = torch.from_numpy(p).cuda()
    for measure in (["entropy", "margin", "bald", "variance"] if mc else ["entropy", "margin"]):
        got = nr.tile_uncertainty(t, measure=measure, mask=mask, mc_samples=mc)
        np.testing.assert_allclose(got, ref(p, measure, mask=mask, mc=mc), **TOL)
    sliced = t[:, :, 1:] if mc else t[::2, 1:]  # leading-axis slices keep spatial blocks contiguous
    np.testing.assert_allclose(nr.tile_uncertainty(sliced, mc_samples=mc),
                               ref(sliced.cpu().numpy(), "entropy", mc=mc), **TOL)
    bad = t.clone()
    bad.view(-1)[bad.numel() // 2] = float("nan")
    with pytest.raises(InputValueError):
        nr.tile_uncertainty(bad, mc_samples=mc)
    with pytest.raises(DTypeError):
        nr.tile_uncertainty(t.double(), mc_samples=mc)


@pytest.mark.parametrize("bad", ["no", "False", 1, 0, None, [True]])
def test_mc_samples_must_be_a_bool(bad):
    # issue 19: mc_samples="no" was truthy and silently read axis 0 as Monte-Carlo samples
    p = np.full((2, 2, 2, 4, 4), 0.5, dtype=np.float32)
    with pytest.raises(DTypeError, match=r"expected mc_samples as a bool .*got " + repr(bad).replace("[", r"\[")
                       .replace("]", r"\]")):
        nr.tile_uncertainty(p, mc_samples=bad)
    assert nr.tile_uncertainty(p, mc_samples=np.bool_(True)).shape == (2,)


@pytest.mark.parametrize("kwargs, match", [({"measure": "nope"}, "measure must be one of"),
                                           ({"measure": "variance"}, "needs Monte-Carlo samples"),
                                           ({"device": "gpu"}, "device must be one of")])
def test_bad_measure_or_device_is_a_typed_error(kwargs, match):
    # Issue 19 audit: plain ValueError before; the package's InputValueError (still a ValueError) now
    from neuroadda_rt.errors import InputValueError

    with pytest.raises(InputValueError, match=match):
        nr.tile_uncertainty(np.full((2, 1, 4, 4), 0.5, np.float32), **kwargs)
