"""Whole-volume deployment benchmarks (issue 18), each beside its baseline in one run, results checked.

* Throughput: :func:`predict_volume` (ONNX Runtime fp32 and int8, in process; fp32 on a local Dask
  cluster of 1 and of 2 workers) against a PyTorch eager sliding-window baseline written here
  (same network, same windows, overlap and cosine blending; channels-last, inference mode).
  Every output is compared with the baseline's.
* Memory: peak RSS (``VmHWM``; ``resource.getrusage`` is printed too, but Linux carries its
  ``ru_maxrss`` over ``execve`` from the parent) of ``predict_volume`` in a fresh subprocess on a 1 GB
  and an 8 GB zarr volume created lazily (metadata only; unwritten chunks read as the fill
  value), computing the same first blocks of each (``max_blocks``): what could grow with the
  volume (the plan, the weight sums, the output metadata) is all there is between the two.
* TIFF tiles: a 256² box from a tiled TIFF page through ``open_volume`` against decoding the page.

Sizes: small by default (CI runs ``--benchmark-disable``); with ``NEUROADDA_BENCH_FULL=1`` a
(4, 1024, 1024) synthetic EM volume, the default UNet (16-32-64-128), 256² windows with 25%
overlap, 2 threads, and an 8192² TIFF page.

    NEUROADDA_BENCH_FULL=1 python -m pytest benchmarks/bench_deploy.py -s --benchmark-columns=min,median,rounds
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pytest.importorskip("zarr")

import neuroadda_rt  # noqa: E402
from neuroadda_rt.deploy import predict_volume  # noqa: E402
from neuroadda_rt.models import UNet, batchnorm_statistics_from  # noqa: E402
from neuroadda_rt.tiles import blend_weights, window_starts  # noqa: E402

FULL = os.environ.get("NEUROADDA_BENCH_FULL") == "1"
THREADS = int(os.environ.get("NEUROADDA_BENCH_THREADS", "2"))
SHAPE = (4, 1024, 1024) if FULL else (2, 192, 192)
TILE = 256 if FULL else 64
OVERLAP = 0.25
BLOCK = (1, 1024, 1024) if FULL else (1, 96, 192)
ROUNDS = 2 if FULL else 1
PAIRS = int(os.environ.get("NEUROADDA_BENCH_PAIRS", "5" if FULL else "1"))
RESULTS: dict = {"_load0": os.getloadavg()[0]}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    old = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    from neuroadda_rt.study.synthetic import make_domain

    vol = np.stack([make_domain(None, SHAPE[1:], seed=10 + z)[0] for z in range(SHAPE[0])]).astype(np.uint8)
    net = UNet() if FULL else UNet(widths=(8, 16, 32))
    # untrained weights, BatchNorm statistics from the data (outputs vary)
    batchnorm_statistics_from(net, vol[:1, None, :TILE * 2, :TILE * 2].astype(np.float32) / 255)
    d = tmp_path_factory.mktemp("deploy")
    onnx = neuroadda_rt.export_onnx(net, d / "model.onnx", part="full")
    yield {"net": net, "vol": vol, "onnx": onnx, "dir": d}
    torch.set_num_threads(old)


def torch_sliding_window(net, vol: np.ndarray, tile: int, overlap: float, batch: int = 1) -> np.ndarray:
    """The baseline: PyTorch eager over the same windows as the Predictor grid, cosine-blended,
    ``batch`` windows per call (1 is MONAI's ``sliding_window_inference`` default)."""
    step = max(1, int(round(tile * (1 - overlap))))
    w = torch.from_numpy(blend_weights((tile, tile), "cosine"))
    out = np.empty((1, *vol.shape), np.float32)
    ys, xs = window_starts(vol.shape[1], tile, step), window_starts(vol.shape[2], tile, step)
    corners = [(y, x) for y in ys for x in xs]
    with torch.inference_mode():
        for z in range(vol.shape[0]):
            img = torch.from_numpy(vol[z].astype(np.float32) / 255)
            acc = torch.zeros(vol.shape[1:])
            wsum = torch.zeros(vol.shape[1:])
            for i in range(0, len(corners), batch):
                cs = corners[i:i + batch]
                t = torch.stack([img[y:y + tile, x:x + tile] for y, x in cs])[:, None]
                p = net(t.contiguous(memory_format=torch.channels_last))[:, 0]
                for (y, x), pi in zip(cs, p):
                    acc[y:y + tile, x:x + tile] += pi * w
                    wsum[y:y + tile, x:x + tile] += w
            out[0, z] = (acc / wsum).clamp_(0, 1).numpy()
    return out


def _reference(setup) -> np.ndarray:
    """The one-shot prediction every result is checked against: the baseline's output when it ran first,
    else the Predictor's torch pass (equal to the baseline within 1e-4, as test_baseline_torch_eager checks),
    so each benchmark also runs alone (``-k``)."""
    if "ref" not in setup:
        setup["ref"] = neuroadda_rt.Predictor(setup["net"], backend="torch", tile=TILE,
                                              overlap=OVERLAP).predict(setup["vol"])
    return setup["ref"]


def _voxels_per_s(benchmark) -> float | None:
    stats = getattr(benchmark, "stats", None)
    return None if stats is None else float(np.prod(SHAPE)) / float(stats.stats.min)


def test_baseline_torch_eager(benchmark, setup):
    net = neuroadda_rt.models.fold_batchnorm(setup["net"]).to(memory_format=torch.channels_last)
    out = benchmark.pedantic(lambda: torch_sliding_window(net, setup["vol"], TILE, OVERLAP), rounds=ROUNDS,
                             iterations=1)
    setup["ref"] = out
    RESULTS["torch_eager"] = _voxels_per_s(benchmark)
    ours = neuroadda_rt.Predictor(setup["net"], backend="torch", tile=TILE, overlap=OVERLAP).predict(setup["vol"])
    assert np.abs(out - ours).max() < 1e-4  # the baseline computes what the Predictor does


def test_baseline_torch_eager_batched(benchmark, setup):
    """The same baseline with 4 windows per call, as predict_volume batches them."""
    net = neuroadda_rt.models.fold_batchnorm(setup["net"]).to(memory_format=torch.channels_last)
    out = benchmark.pedantic(lambda: torch_sliding_window(net, setup["vol"], TILE, OVERLAP, batch=4),
                             rounds=ROUNDS, iterations=1)
    assert np.abs(out - _reference(setup)).max() < 1e-4
    RESULTS["torch_eager_batch4"] = _voxels_per_s(benchmark)


def _run(setup, name, **kw):
    out = setup["dir"] / f"{name}-{time.monotonic_ns()}.zarr"
    r = predict_volume(setup["onnx"], setup["vol"], out, block_shape=BLOCK, halo=TILE, overlap=OVERLAP,
                       dtype="float32", progress=False, **kw)
    return r, out


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_predict_volume_in_process(benchmark, setup, precision):
    """End to end (the benchmark's time) includes int8 calibration and quantisation; the throughput
    compared with the baseline is over the block phase (reading, inference, blending, writing)."""
    res = benchmark.pedantic(lambda: _run(setup, precision, precision=precision, scheduler="synchronous",
                                          threads=THREADS), rounds=ROUNDS, iterations=1)
    r, out = res
    got = neuroadda_rt.open_volume(out)[...]
    err = np.abs(got - _reference(setup))
    if precision == "fp32":
        assert err.max() < 1e-3, err.max()
    else:
        assert err.mean() < 0.05, err.mean()
        RESULTS["int8_mean_abs_err"] = float(err.mean())
    assert r.blocks_computed == r.n_blocks
    RESULTS[f"ort_{precision}"] = r.voxels_per_s
    RESULTS[f"ort_{precision}_end_to_end"] = _voxels_per_s(benchmark)


def test_int8_vs_fp32_interleaved(setup):
    """int8 against fp32, run alternately (the machine is shared: a load change then hits both),
    ``PAIRS`` pairs; block-phase throughput (quantisation, done once per run, is outside it), median
    and range of the per-pair ratios. The int8 output is checked against fp32's: probabilities, and
    the VI between the segmentations of the two (``segment``, boundary map, threshold 0.5)."""
    from neuroadda_rt.metrics import variation_of_information
    from neuroadda_rt.segmentation import segment

    vps: dict[str, list[float]] = {"fp32": [], "int8": []}
    outs = {}
    for i in range(PAIRS):
        for precision in (("fp32", "int8") if i % 2 == 0 else ("int8", "fp32")):
            r, out = _run(setup, f"pair{i}-{precision}", precision=precision, scheduler="synchronous",
                          threads=THREADS)
            assert r.blocks_computed == r.n_blocks
            vps[precision].append(r.voxels_per_s)
            outs[precision] = out
    ratios = np.array(vps["int8"]) / np.array(vps["fp32"])
    p32 = neuroadda_rt.open_volume(outs["fp32"])[...][0]
    p8 = neuroadda_rt.open_volume(outs["int8"])[...][0]
    err = np.abs(p8 - p32)
    s32, s8 = segment(p32, "boundary"), segment(p8, "boundary")
    split, merge = variation_of_information(s8, s32, ignore_gt=())
    assert err.mean() < 0.05, err.mean()
    RESULTS["interleaved"] = {
        "pairs": PAIRS, "fp32_mvox_s": [round(v / 1e6, 4) for v in vps["fp32"]],
        "int8_mvox_s": [round(v / 1e6, 4) for v in vps["int8"]],
        "fp32_median": float(np.median(vps["fp32"])), "int8_median": float(np.median(vps["int8"])),
        "ratio_median": float(np.median(ratios)), "ratio_min": float(ratios.min()), "ratio_max": float(ratios.max()),
        "int8_mean_abs_err": float(err.mean()), "int8_max_abs_err": float(err.max()),
        "boundary_voxels_flipped_at_0.5": float(((p8 > 0.5) != (p32 > 0.5)).mean()),
        "vi_int8_vs_fp32_segmentation": float(split + merge), "segments_fp32": int(len(np.unique(s32))),
        "loadavg_before_after": [RESULTS.get("_load0"), os.getloadavg()[0]]}


@pytest.mark.parametrize("workers", [1, 2])
def test_predict_volume_dask_workers(benchmark, setup, workers):
    """Blocks on a Dask cluster of 1 or 2 single-threaded worker processes (started and warmed up
    outside the timing: a first run loads the model on every worker), ONNX Runtime with
    ``THREADS // workers`` threads per worker, passed by address as ``scheduler=``."""
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                                  silence_logs=40) as cluster:
        kw = dict(scheduler=cluster.scheduler_address, threads=max(1, THREADS // workers))
        _run(setup, f"warm{workers}", **kw)
        res = benchmark.pedantic(lambda: _run(setup, f"w{workers}", **kw), rounds=ROUNDS, iterations=1)
    r, out = res
    assert np.abs(neuroadda_rt.open_volume(out)[...] - _reference(setup)).max() < 1e-3
    RESULTS[f"dask_{workers}w"] = r.voxels_per_s


_MEM_SCRIPT = r"""
import json, resource, sys, warnings
import numpy as np, zarr
from neuroadda_rt import open_volume
from neuroadda_rt.deploy import predict_volume
path, shape, model, out, block, tile, n = sys.argv[1:8]
shape, block = tuple(json.loads(shape)), tuple(json.loads(block))
zarr.create_array(path, shape=shape, dtype="uint8", chunks=(1, 512, 512), fill_value=128, zarr_format=2)
vol = open_volume(path, allow_missing_chunks=True)
r = predict_volume(model, vol, out, block_shape=block, halo=int(tile), scheduler="synchronous", threads=1,
                   progress=False, max_blocks=int(n))
hwm = [int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")]
print(json.dumps({"peak_rss_mb": hwm[0] / 1024 if hwm else None,
                  "getrusage_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "blocks": r.blocks_computed, "n_blocks": r.n_blocks}))
"""


def test_memory_independent_of_volume_size(setup, tmp_path):
    shapes = {"1GB": (16, 8192, 8192), "8GB": (128, 8192, 8192)}  # uint8: 1.07 and 8.6 GB
    block = BLOCK if FULL else (1, 512, 512)
    n = 4 if FULL else 2
    res = {}
    for name, shape in shapes.items():
        p = subprocess.run([sys.executable, "-c", _MEM_SCRIPT, str(tmp_path / f"{name}.zarr"), json.dumps(shape),
                            str(setup["onnx"]), str(tmp_path / f"{name}-out.zarr"), json.dumps(block), str(TILE),
                            str(n)], capture_output=True, text=True, check=True)
        res[name] = json.loads(p.stdout.strip().splitlines()[-1])
        assert res[name]["blocks"] == n
    # VmHWM, the peak of this process image: Linux carries getrusage's ru_maxrss over execve, so in a
    # child of a large process (pytest holding the volumes) it reports the parent's peak (both equal)
    a, b = res["1GB"]["peak_rss_mb"] or res["1GB"]["getrusage_maxrss_mb"], \
        res["8GB"]["peak_rss_mb"] or res["8GB"]["getrusage_maxrss_mb"]
    RESULTS["rss_1GB_mb"], RESULTS["rss_8GB_mb"] = a, b
    RESULTS["getrusage_maxrss_mb"] = [v["getrusage_maxrss_mb"] for v in res.values()]
    RESULTS["rss_blocks"] = {k: v["n_blocks"] for k, v in res.items()}
    assert abs(b - a) / a < 0.2, res


def test_tiff_tile_read(benchmark, tmp_path):
    tifffile = pytest.importorskip("tifffile")
    n = 8192 if FULL else 2048
    a = (np.random.default_rng(0).random((n, n)) * 255).astype(np.uint8)
    path = tmp_path / "page.tif"
    tifffile.imwrite(path, a, tile=(256, 256), compression="zlib")
    v = neuroadda_rt.open_volume(path)
    y, x = n // 2 + 17, n // 3 + 5
    t0 = time.perf_counter()
    base = tifffile.imread(path)[y:y + 256, x:x + 256]  # the baseline: decode the page, then slice
    RESULTS["tiff_page_decode_ms"] = (time.perf_counter() - t0) * 1e3
    got = benchmark.pedantic(lambda: v[y:y + 256, x:x + 256], rounds=5, iterations=1)
    assert np.array_equal(got, base)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        RESULTS["tiff_tile_ms"] = float(stats.stats.min) * 1e3


def test_summary():
    r = RESULTS
    if r.get("torch_eager") and r.get("ort_fp32"):
        r["fp32_vs_torch"] = r["ort_fp32"] / r["torch_eager"]
    if r.get("torch_eager_batch4") and r.get("ort_fp32"):
        r["fp32_vs_torch_batch4"] = r["ort_fp32"] / r["torch_eager_batch4"]
    if r.get("ort_int8") and r.get("ort_fp32"):
        r["int8_vs_fp32"] = r["ort_int8"] / r["ort_fp32"]
    if r.get("dask_1w") and r.get("dask_2w"):
        r["dask_2w_vs_1w"] = r["dask_2w"] / r["dask_1w"]
    r["config"] = f"volume {SHAPE}, windows {TILE} overlap {OVERLAP}, block {BLOCK}, threads {THREADS}, full={FULL}"
    print("\nbench_deploy:", json.dumps(r, indent=1, default=str))
