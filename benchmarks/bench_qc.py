"""QC throughput (pytest-benchmark).

* ``qc-update``: ``QCMonitor.update`` end to end (uint8 tiles -> normalise, features, witness,
  artefact scores, window tests) with the int8 encoder beside the fp32 encoder.
* ``qc-fold-descriptor``: the fold ridge descriptor, C++ kernel beside the NumPy code it replaced.
* ``qc-artefact-detectors``: the learned fold / stain network beside the intensity descriptors (its cost
  per tile next to theirs).
* ``qc-window-test``: one drift test of a full window against the reference, ours (reference
  sums and the calibrated threshold computed once; the window adds its own kernel block and its
  k-NN novelty) beside the package's general ``mmd2_test`` with permutations (the old, iid null).

Small by default (tiny model from tests/assets, 64x64 tiles, window 64); ``NEUROADDA_BENCH_FULL=1``
gives the issue's sizes (default UNet, 256x256 tiles, window 256, reference 2048, 500
permutations). Every benchmark checks its result against a float64 NumPy reference.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import neuroadda_rt as nr
from neuroadda_rt import QCMonitor

FULL = os.environ.get("NEUROADDA_BENCH_FULL") == "1"
TILE = 256 if FULL else 64
WINDOW = 256 if FULL else 64
N_REF = 2048 if FULL else 256
N_PERM = 500 if FULL else 200
ASSETS = Path(__file__).resolve().parents[1] / "tests" / "assets" / "tiny_model"

pytest.importorskip("onnxruntime")
# the small default sizes give a reference too short to calibrate the drift threshold; the monitor says so
pytestmark = pytest.mark.filterwarnings("ignore::neuroadda_rt.qc.QCCalibrationWarning")


def _tiles(n, seed):
    from neuroadda_rt.study.synthetic import make_domain

    size = 1024 if FULL else 256
    k = size // TILE
    out, i = [], 0
    while sum(len(o) for o in out) < n:
        img, _ = make_domain(None, (size, size), seed=seed + i)
        out.append(img.reshape(k, TILE, k, TILE).transpose(0, 2, 1, 3).reshape(k * k, TILE, TILE))
        i += 1
    return np.concatenate(out)[:n]


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    d = tmp_path_factory.mktemp("qc_bench")
    if FULL:
        torch = pytest.importorskip("torch")
        from neuroadda_rt.models import UNet

        torch.manual_seed(0)
        fp32 = nr.export_onnx(UNet().eval(), d / "encoder.onnx", part="encoder")
    else:
        if not (ASSETS / "encoder.onnx").is_file():
            pytest.skip(f"tiny model asset missing at {ASSETS}")
        fp32 = ASSETS / "encoder.onnx"
    calib = _tiles(32, 900).astype(np.float32) / 255
    int8 = nr.quantize_int8(fp32, calib, d / "encoder.int8.onnx")
    return {"fp32": fp32, "int8": int8}


@pytest.fixture(scope="module")
def data():
    tiles = _tiles(N_REF + WINDOW, 1000)
    return tiles[:N_REF], tiles[N_REF:]


def _kernel_mean(x, ref, sigma):
    d2 = ((x[:, None, :].astype(np.float64) - ref[None].astype(np.float64)) ** 2).sum(-1)
    return np.exp(-d2 / (2 * sigma**2)).mean(1)


@pytest.mark.benchmark(group="qc-update")
@pytest.mark.parametrize("precision", ["int8", "fp32"])
def test_update_throughput(benchmark, encoders, data, precision):
    ref, batch = data
    fx = nr.FeatureExtractor(encoders[precision], backend="onnxruntime", threads=2)
    mon = QCMonitor(fx, ref, window=WINDOW)
    rep = benchmark(mon.update, batch)
    assert len(rep.windows) == 1 and rep.scores.shape == (WINDOW,)
    feats = fx.features(batch[:8].astype(np.float32)[:, None] / 255)
    # the monitor uses the package's one Gaussian kernel (C++, float32 distances and exp): float32 tolerance
    np.testing.assert_allclose(rep.similarity[:8], _kernel_mean(feats, mon.ref, mon.sigma), rtol=1e-5, atol=1e-9)
    benchmark.extra_info["tiles_per_update"] = WINDOW


@pytest.mark.benchmark(group="qc-window-test")
@pytest.mark.parametrize("impl", ["qc_calibrated_window", "mmd2_test_per_window"])
def test_window_test(benchmark, data, impl):
    rng = np.random.default_rng(0)
    d = 128 if FULL else 16
    ref = rng.normal(size=(N_REF, d)).astype(np.float32)
    win = (rng.normal(size=(WINDOW, d)) + 0.05).astype(np.float32)
    ident = lambda t: win[: len(t)]  # noqa: E731 - the "encoder" returns the window's features
    mon = QCMonitor(ident, ref, window=WINDOW)
    tiles = np.zeros((WINDOW, 8, 8), np.float32)
    expect = float(nr.mmd2(win, ref, sigma=mon.sigma))
    if impl == "qc_calibrated_window":
        def run():
            mon._since_test = 0
            return mon.update(tiles).windows[0].mmd2
    else:
        def run():
            return float(nr.mmd2_test(win, ref, n_permutations=N_PERM, sigma=mon.sigma).mmd2)
    got = benchmark(run)
    assert got == pytest.approx(expect, rel=1e-3, abs=1e-6)


def numpy_line_ridge(t: np.ndarray, n_angles: int = 32, offsets=(2, 4, 8)) -> np.ndarray:
    """The fold descriptor as NumPy computed it before the C++ kernel (the baseline): the same shears, lengths
    and float32 arithmetic, with the running sums one sheared row at a time over the whole batch."""
    import math

    n, h, w = t.shape
    length = min(max(5, min(41, int(0.3 * min(h, w)) | 1)), min(h, w) - 1)
    best = np.full(n, -np.inf, dtype=np.float32)
    for img in (t, t.transpose(0, 2, 1)):
        hh, ww = img.shape[1:]
        pad = hh // 2 + 1
        xp = np.pad(img, ((0, 0), (0, 0), (pad, pad)), mode="reflect" if pad < ww else "edge")
        ys = np.arange(hh) - hh / 2
        cs = np.empty((n, hh + 1, ww), dtype=np.float32)
        cs[:, 0] = 0.0
        for theta in np.linspace(-np.pi / 4, np.pi / 4, n_angles // 2, endpoint=False):
            off = np.round(ys * math.tan(theta)).astype(int) + pad
            for y in range(hh):
                np.add(cs[:, y], xp[:, y, off[y]:off[y] + ww], out=cs[:, y + 1])
            le = max(3, int(round(length * math.cos(theta))))
            run = (cs[:, le:, :] - cs[:, :-le, :]) * np.float32(1 / le)
            for k in offsets:
                if 2 * k < ww:
                    ridge = np.minimum(run[:, :, :-2 * k], run[:, :, 2 * k:]) - run[:, :, k:-k]
                    best = np.maximum(best, ridge.max(axis=(1, 2)))
    return best.astype(np.float64)


@pytest.mark.benchmark(group="qc-fold-descriptor")
@pytest.mark.parametrize("impl", ["cpp_line_ridge", "numpy_baseline"])
def test_fold_descriptor(benchmark, data, impl):
    """The fold ridge on 32 tiles at the resolution image_stats uses (256-px tiles are averaged 2x2 first)."""
    from neuroadda_rt.qc.descriptors import _line_contrast

    tiles = data[1][:32].astype(np.float32) / 255
    if TILE >= 256:
        tiles = 0.25 * (tiles[:, 0::2, 0::2] + tiles[:, 1::2, 0::2] + tiles[:, 0::2, 1::2] + tiles[:, 1::2, 1::2])
    fn = _line_contrast if impl == "cpp_line_ridge" else numpy_line_ridge
    got = benchmark(fn, tiles)
    np.testing.assert_array_equal(got, numpy_line_ridge(tiles))
    benchmark.extra_info["tiles"] = len(tiles)


@pytest.mark.benchmark(group="qc-artefact-detectors")
@pytest.mark.parametrize("impl", ["learned_net", "intensity_descriptors_baseline"])
def test_artefact_detectors(benchmark, data, impl):
    """The learned fold / stain network (ONNX Runtime) beside the intensity descriptors it was added to, on 32
    tiles: what the two detectors add per tile. Checked against float64 references (the network's from its
    safetensors weights, tests/test_qc_artefact_net.py; the descriptors' fold column against the NumPy ridge)."""
    import importlib.util

    from neuroadda_rt.qc.artefact_net import artefact_net_scores
    from neuroadda_rt.qc.descriptors import IMAGE_STATS, image_stats

    tiles = data[1][:32].astype(np.float32) / 255
    if impl == "learned_net":
        got = benchmark(artefact_net_scores, tiles)
        spec = importlib.util.spec_from_file_location(
            "ref_net", Path(__file__).resolve().parents[1] / "tests" / "test_qc_artefact_net.py")
        ref = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(ref)
        np.testing.assert_allclose(got[:4], ref._reference_scores(tiles[:4]), rtol=1e-4, atol=1e-4)
    else:
        got = benchmark(image_stats, tiles)
        small = tiles
        if TILE >= 256:
            small = 0.25 * (tiles[:, 0::2, 0::2] + tiles[:, 1::2, 0::2] + tiles[:, 0::2, 1::2] + tiles[:, 1::2, 1::2])
        np.testing.assert_array_equal(got[:, IMAGE_STATS.index("line_ridge")], numpy_line_ridge(small))
    benchmark.extra_info["tiles"] = len(tiles)
