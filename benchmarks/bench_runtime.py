"""Inference runtime benchmarks: encoder features (PyTorch eager vs ONNX Runtime fp32 vs static
int8) and sliding-window prediction (PyTorch vs ONNX Runtime), each result checked against the
PyTorch reference in the same run.

Sizes: small by default (CI runs ``--benchmark-disable``); the issue's sizes with
``NEUROADDA_BENCH_FULL=1``: batch 16 of 256 x 256 tiles through the default UNet encoder, and a
2048 x 2048 image through the full network. Both libraries use ``NEUROADDA_BENCH_THREADS``
threads (default 2).

    NEUROADDA_BENCH_FULL=1 python -m pytest benchmarks/bench_runtime.py --benchmark-only \
        --benchmark-columns=median,min,rounds -s

The last test prints the speed-ups, the accuracy cost of int8 (relative feature error, MMD²
ranking of a fixed set of synthetic domains with fp32 vs int8 features) and the Predictor
throughput in megapixels per second.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

import neuroadda_rt  # noqa: E402
from neuroadda_rt.models import UNet, batchnorm_statistics_from  # noqa: E402

FULL = os.environ.get("NEUROADDA_BENCH_FULL") == "1"
THREADS = int(os.environ.get("NEUROADDA_BENCH_THREADS", "2"))
BATCH, TILE = (16, 256) if FULL else (4, 64)
IMAGE = 2048 if FULL else 256
ROUNDS = 5 if FULL else 1

RESULTS: dict[str, float] = {}


def _median(benchmark) -> float | None:
    stats = getattr(benchmark, "stats", None)
    if stats is None:
        return None
    return float(stats.stats.median)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    old = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    net = UNet()  # default 2-D UNet, 16-32-64-128
    d = tmp_path_factory.mktemp("bench")
    from neuroadda_rt.study.synthetic import make_domain

    img = make_domain(None, (max(IMAGE, 512), max(IMAGE, 512)), seed=1)[0]
    rng = np.random.default_rng(0)
    ys, xs = rng.integers(0, img.shape[0] - TILE, 2 * BATCH), rng.integers(0, img.shape[1] - TILE, 2 * BATCH)
    tiles = np.stack([img[y:y + TILE, x:x + TILE] for y, x in zip(ys, xs)]).astype(np.float32) / 255
    # untrained weights, BatchNorm statistics from data (so the features vary between tiles)
    batchnorm_statistics_from(net, tiles[:, None])
    enc = neuroadda_rt.export_onnx(net, d / "encoder.onnx", part="encoder")
    full = neuroadda_rt.export_onnx(net, d / "model.onnx", part="full")
    q = neuroadda_rt.quantize_int8(enc, tiles[BATCH:], d / "encoder.int8.onnx")  # calibrate on other tiles
    x = tiles[:BATCH]
    with torch.inference_mode():
        ref = net.encode(torch.from_numpy(x[:, None])).mean(dim=(2, 3)).numpy()
    yield {"net": net, "enc": enc, "full": full, "int8": q, "x": x, "ref": ref, "image": img[:IMAGE, :IMAGE],
           "dir": d}
    torch.set_num_threads(old)


def _fx(path, **kw):
    return neuroadda_rt.FeatureExtractor(path, backend="onnxruntime", device="cpu", threads=THREADS, **kw)


@pytest.mark.benchmark(group="encoder-features")
def test_encoder_torch_eager(benchmark, setup):
    net, x = setup["net"], setup["x"]
    net_cl = net.to(memory_format=torch.channels_last)
    xt = torch.from_numpy(x[:, None]).contiguous(memory_format=torch.channels_last)

    def run():
        with torch.inference_mode():
            return net_cl.encode(xt).mean(dim=(2, 3)).numpy()

    out = benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    np.testing.assert_allclose(out, setup["ref"], rtol=1e-4, atol=1e-5)
    RESULTS["torch_encoder_s"] = _median(benchmark)


@pytest.mark.benchmark(group="encoder-features")
def test_encoder_onnxruntime_fp32(benchmark, setup):
    fx, x = _fx(setup["enc"], normalize=False), setup["x"]
    out = benchmark.pedantic(lambda: fx.features(x, batch_size=BATCH), rounds=ROUNDS, iterations=1,
                             warmup_rounds=1)
    assert np.abs(out - setup["ref"]).max() <= 1e-4
    RESULTS["ort_fp32_encoder_s"] = _median(benchmark)


@pytest.mark.benchmark(group="encoder-features")
def test_encoder_onnxruntime_int8(benchmark, setup):
    fx, x = _fx(setup["int8"], normalize=False), setup["x"]
    out = benchmark.pedantic(lambda: fx.features(x, batch_size=BATCH), rounds=ROUNDS, iterations=1,
                             warmup_rounds=1)
    rel = float(np.linalg.norm(out - setup["ref"]) / np.linalg.norm(setup["ref"]))
    assert rel < 0.1, rel
    RESULTS["int8_rel_feature_error"] = rel
    RESULTS["ort_int8_encoder_s"] = _median(benchmark)


@pytest.mark.benchmark(group="predictor")
@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_predictor(benchmark, setup, backend):
    pred = neuroadda_rt.Predictor(setup["full"] if backend == "onnxruntime" else setup["net"], backend=backend,
                                  device="cpu", threads=THREADS, batch_size=8)
    image = setup["image"]
    out = benchmark.pedantic(lambda: pred.predict(image), rounds=max(1, ROUNDS // 2), iterations=1,
                             warmup_rounds=0)
    assert out.shape == (1, *image.shape) and np.isfinite(out).all()
    # checked against the torch reference on one full window
    with torch.inference_mode():
        win = torch.from_numpy(image[None, None, :256, :256].astype(np.float32) / 255)
        ref = setup["net"](win).numpy()[0]
    one = pred.predict_tiles(image[None, :256, :256])[0]
    assert np.abs(one - ref).max() <= 1e-4
    if "ref_pred" in setup:
        assert np.abs(out - setup["ref_pred"]).max() <= 1e-4
    setup["ref_pred"] = out
    t = _median(benchmark)
    RESULTS[f"{backend}_predict_mpix_s"] = (image.size / 1e6 / t) if t else None


def _mmd2(x, y) -> float:
    return float(neuroadda_rt.mmd2(x, y))


def test_int8_mmd_ranking_and_summary(setup):
    """int8 must not change the top-1 source of an MMD² ranking of synthetic domains."""
    from neuroadda_rt.study.synthetic import domain_family, make_domain

    styles, _ = domain_family(6, seed=0)
    size, n_tiles, tile = (1024, 48, 128) if FULL else (256, 24, 64)
    rng = np.random.default_rng(1)
    # int8 calibration: 4 tiles from each domain of the family, from other images than the ranked
    # tiles (static ranges should cover EM in general, as a microscope-side encoder would see)
    calib = []
    for i, st in enumerate(styles):
        c = make_domain(st, (2 * tile + 8, 2 * tile + 8), seed=200 + i)[0]
        calib += [c[y:y + tile, x:x + tile] for y in (0, tile) for x in (0, tile)]
    calib = np.stack(calib)
    # a trained encoder from the bundled zoo when there is one (a random-init encoder's pooled
    # features vary little between tiles, so it is a weak test of what int8 costs)
    zoo = neuroadda_rt.synthetic_zoo(allow_empty=True)
    if len(zoo):
        pkg = next(iter(zoo))
        enc = pkg.encoder_onnx
        RESULTS["ranking_model"] = pkg.name
    else:
        enc = setup["enc"]
        RESULTS["ranking_model"] = "default UNet, random init (bundled zoo empty)"
    q8 = neuroadda_rt.quantize_int8(enc, calib, setup["dir"] / "ranking.int8.onnx")
    fx32, fx8 = _fx(enc), _fx(q8)
    feats32, feats8 = [], []
    for i, st in enumerate(styles):
        img = make_domain(st, (size, size), seed=100 + i)[0]
        ys, xs = rng.integers(0, size - tile, n_tiles), rng.integers(0, size - tile, n_tiles)
        t = np.stack([img[y:y + tile, x:x + tile] for y, x in zip(ys, xs)])
        feats32.append(fx32.features(t))
        feats8.append(fx8.features(t))
    same_top1, clear, clear_same, taus = 0, 0, 0, []
    from scipy.stats import kendalltau

    for target in range(len(styles)):
        others = [j for j in range(len(styles)) if j != target]
        d32 = np.array([_mmd2(feats32[target], feats32[j]) for j in others])
        d8 = np.array([_mmd2(feats8[target], feats8[j]) for j in others])
        agree = int(np.argmin(d32) == np.argmin(d8))
        same_top1 += agree
        top2 = np.sort(d32)[:2]
        if top2[1] - top2[0] > 0.05 * top2[1]:  # fp32 top-1 ahead by > 5 %: not a near tie
            clear += 1
            clear_same += agree
        taus.append(float(kendalltau(d32, d8).statistic))
    RESULTS["int8_same_top1"] = f"{same_top1}/{len(styles)}"
    RESULTS["int8_same_top1_clear_margin"] = f"{clear_same}/{clear}"
    RESULTS["int8_kendall_tau_mean"] = float(np.mean(taus))
    f32, f8 = np.concatenate(feats32), np.concatenate(feats8)
    RESULTS["int8_rel_feature_error_domains"] = float(np.linalg.norm(f8 - f32) / np.linalg.norm(f32))
    assert clear_same == clear, RESULTS  # int8 never flips a clear top-1 source
    assert np.mean(taus) > 0.6, RESULTS
    r = RESULTS
    if r.get("torch_encoder_s") and r.get("ort_fp32_encoder_s") and r.get("ort_int8_encoder_s"):
        r["speedup_ort_vs_torch"] = r["torch_encoder_s"] / r["ort_fp32_encoder_s"]
        r["speedup_int8_vs_ort"] = r["ort_fp32_encoder_s"] / r["ort_int8_encoder_s"]
        r["tiles_per_s_torch"] = BATCH / r["torch_encoder_s"]
        r["tiles_per_s_ort_fp32"] = BATCH / r["ort_fp32_encoder_s"]
        r["tiles_per_s_ort_int8"] = BATCH / r["ort_int8_encoder_s"]
    r["config"] = f"batch {BATCH} x {TILE}^2, image {IMAGE}^2, threads {THREADS}, full={FULL}"
    print("\nbench_runtime summary:", json.dumps(r, indent=1, default=str))
