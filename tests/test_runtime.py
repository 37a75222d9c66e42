"""FeatureExtractor / Predictor: backend parity, pooling against NumPy references, lazy inputs,
explicit-backend errors, auto logging, sliding-window blending against a brute-force reference."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

import neuroadda_rt  # noqa: E402
from neuroadda_rt import FeatureExtractor  # noqa: E402
from neuroadda_rt.errors import BackendUnavailableError, InputValueError, ShapeError  # noqa: E402
from neuroadda_rt.models import UNet  # noqa: E402
from neuroadda_rt.runtime import available_backends  # noqa: E402

from conftest import DEVICES  # noqa: E402


TINY = Path(__file__).resolve().parent / "assets" / "tiny_model"


@pytest.fixture(scope="module")
def pkg():
    return neuroadda_rt.load_model(TINY)  # pre-exported ONNX: no export in most tests


@pytest.fixture(scope="module")
def net(pkg):
    return pkg.unet()


@pytest.fixture(scope="module")
def ort_fx(pkg):
    return {p: FeatureExtractor(pkg, backend="onnxruntime", device="cpu", pooling=p, threads=1)
            for p in ("mean", "max", "mean+std")}


def _ref_features(net, x, pooling):
    with torch.no_grad():
        z = net.encode(torch.from_numpy(x[:, None].astype(np.float32))).double().numpy()
    z = z.reshape(z.shape[0], z.shape[1], -1)
    if pooling == "mean":
        return z.mean(2)
    if pooling == "max":
        return z.max(2)
    return np.concatenate([z.mean(2), z.std(2)], 1)


@pytest.mark.parametrize("pooling", ["mean", "max", "mean+std"])
@pytest.mark.parametrize("shape,batch", [((7, 37, 53), 3), ((4, 64, 64), 16), ((1, 8, 8), 1)])
def test_features_parity_onnxruntime_torch_reference(pkg, net, ort_fx, pooling, shape, batch):
    x = np.random.default_rng(shape[1]).random(shape, dtype=np.float32)
    ref = _ref_features(net, x, pooling)
    f_ort = ort_fx[pooling].features(x, batch_size=batch)
    f_torch = FeatureExtractor(pkg, backend="torch", device="cpu", pooling=pooling).features(x, batch_size=batch)
    assert f_ort.dtype == np.float32 and f_ort.shape == ref.shape == (shape[0], 32 if pooling == "mean+std" else 16)
    assert np.abs(f_ort - ref).max() <= 1e-4
    assert np.abs(f_torch - ref).max() <= 1e-4


def test_shallow_feature_level_package_features_match_the_level_map(net, tmp_path):
    """A package whose network has ``feature_level`` set exports that level; ONNX Runtime and torch features,
    and the stored reference features, are that level's pooled map (reference: the full encoder pass)."""
    from neuroadda_rt.models import unet_from_config

    shallow = unet_from_config({**net.config, "feature_level": 0}).eval()
    shallow.load_state_dict(net.state_dict())
    x = np.random.default_rng(5).random((5, 37, 53), dtype=np.float32)
    with torch.no_grad():
        levels = net._encode_levels(net._pad(torch.from_numpy(x[:, None])))
    z = levels[0].double().numpy().reshape(5, levels[0].shape[1], -1)
    ref = np.concatenate([z.mean(2), z.std(2)], 1)
    pkg = neuroadda_rt.save_model(shallow, tmp_path / "m", reference_tiles=x, pooling="mean+std")
    assert pkg.config["feature_level"] == 0 and pkg.reference_features.shape == ref.shape == (5, 2 * net.config["widths"][0])
    for backend in ("onnxruntime", "torch"):
        fx = FeatureExtractor(pkg, backend=backend, device="cpu")
        assert fx.pooling == "mean+std" and fx.n_features == ref.shape[1]
        assert np.abs(fx.features(x) - ref).max() <= 1e-4
    assert np.abs(pkg.reference_features - ref).max() <= 1e-4


def test_integer_tiles_normalised_by_dtype(ort_fx):
    x8 = np.random.default_rng(3).integers(0, 256, (3, 32, 32), dtype=np.uint8)
    f8 = ort_fx["mean"].features(x8)
    ff = ort_fx["mean"].features(x8.astype(np.float32) / 255)
    assert np.abs(f8 - ff).max() <= 1e-6


def test_lazy_array_read_in_batches(ort_fx):
    x = np.random.default_rng(4).random((10, 24, 24), dtype=np.float32)

    class Lazy:
        """Slices along the first axis only, counting reads (like an h5py dataset)."""

        shape, dtype = x.shape, x.dtype

        def __init__(self):
            self.reads = []

        def __getitem__(self, sl):
            assert isinstance(sl, slice)
            self.reads.append(sl)
            return x[sl]

    lazy = Lazy()
    f = ort_fx["mean"].features(lazy, batch_size=4)
    assert [(s.start, s.stop) for s in lazy.reads] == [(0, 4), (4, 8), (8, 12)]
    np.testing.assert_array_equal(f, ort_fx["mean"].features(x, batch_size=4))


def test_h5py_dataset(ort_fx, tmp_path):
    h5py = pytest.importorskip("h5py")
    x = np.random.default_rng(5).integers(0, 256, (6, 32, 32), dtype=np.uint8)
    with h5py.File(tmp_path / "t.h5", "w") as fh:
        fh["raw"] = x
    with h5py.File(tmp_path / "t.h5", "r") as fh:
        f = ort_fx["mean"].features(fh["raw"], batch_size=4)
    np.testing.assert_allclose(f, ort_fx["mean"].features(x), atol=1e-6)


def test_onnx_file_source_and_progress(net, pkg, capsys):
    p = pkg.encoder_onnx
    fx = FeatureExtractor(p, backend="onnxruntime", device="cpu")
    x = np.random.default_rng(6).random((3, 32, 32), dtype=np.float32)
    np.testing.assert_allclose(fx.features(x), _ref_features(net, x, "mean"), atol=1e-4)
    fx.features(x)
    assert capsys.readouterr().err == ""  # no progress bar by default
    fx.features(x, progress=True)
    assert "features" in capsys.readouterr().err
    with pytest.raises(BackendUnavailableError, match="weights"):
        FeatureExtractor(p, backend="torch", device="cpu")


def test_auto_logs_choice(pkg, caplog):
    with caplog.at_level(logging.INFO, logger="neuroadda_rt"):
        fx = FeatureExtractor(pkg, device="cpu")
    assert fx.backend == "onnxruntime" and fx.device == "cpu"
    assert any("backend=onnxruntime" in r.message and "CPUExecutionProvider" in r.message for r in caplog.records)


def test_explicit_gpu_requests_raise_listing_available(net):
    av = available_backends()
    if "cuda" not in av.get("onnxruntime", []):
        with pytest.raises(BackendUnavailableError, match="available"):
            FeatureExtractor(net, backend="onnxruntime", device="cuda")
    if "tensorrt" not in av:
        with pytest.raises(BackendUnavailableError, match="tensorrt.*available"):
            FeatureExtractor(net, backend="tensorrt")
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailableError):
            FeatureExtractor(net, backend="torch", device="cuda")
    with pytest.raises(InputValueError):
        FeatureExtractor(net, backend="tensorrt", device="cpu")


def test_bad_arguments(net, ort_fx):
    with pytest.raises(InputValueError):
        FeatureExtractor(net, backend="openvino")
    with pytest.raises(InputValueError):
        FeatureExtractor(net, device="tpu")
    with pytest.raises(InputValueError):
        FeatureExtractor(net, pooling="median")
    fx = ort_fx["mean"]
    with pytest.raises(ShapeError):
        fx.features(np.zeros((2, 3, 16, 16), np.float32))  # 3 channels for a 1-channel model
    with pytest.raises(ShapeError):
        fx.features(np.zeros((2, 3, 3), np.float32))  # smaller than 2**(depth-1)
    with pytest.raises(InputValueError):
        fx.features(np.full((1, 16, 16), np.nan, np.float32))
    with pytest.raises(InputValueError):
        fx.features(np.zeros((1, 16, 16), np.float32), batch_size=0)
    with pytest.raises(InputValueError):
        FeatureExtractor(object())


@pytest.mark.parametrize("device", DEVICES)
def test_features_on_device(net, pkg, device):
    x = np.random.default_rng(8).random((5, 40, 33), dtype=np.float32)
    ref = _ref_features(net, x, "mean")
    for backend in ("torch", "onnxruntime"):
        if device == "cuda" and backend == "onnxruntime" and "cuda" not in available_backends().get(backend, []):
            continue
        f = FeatureExtractor(net if backend == "torch" else pkg, backend=backend, device=device).features(
            x, batch_size=2)
        assert np.abs(f - ref).max() <= 1e-4, backend


@pytest.mark.cuda
def test_tensorrt_features_parity(net, tmp_path):
    pytest.importorskip("tensorrt")
    x = np.random.default_rng(9).random((6, 37, 53), dtype=np.float32)
    fx = FeatureExtractor(net, backend="tensorrt", cache_dir=tmp_path,
                          trt_profile={"min": (1, 1, 8, 8), "opt": (4, 1, 64, 64), "max": (8, 1, 128, 128)})
    assert np.abs(fx.features(x, batch_size=4) - _ref_features(net, x, "mean")).max() <= 1e-4
    with pytest.raises(ShapeError, match="profile"):
        fx.features(np.zeros((1, 256, 256), np.float32))


# ------------------------------------------------------------------------------------------
# Predictor
# ------------------------------------------------------------------------------------------
def _brute_force_blend(net, image, tile, overlap):
    """Independent reference: explicit loops, Hann weights (floored at 1e-3), float64 sums."""
    H, W = image.shape
    th, tw = min(tile, H), min(tile, W)

    def starts(n, t):
        step = max(1, int(round(t * (1 - overlap))))
        s, out = 0, []
        while s + t <= n:
            out.append(s)
            s += step
        if out[-1] != n - t:
            out.append(n - t)
        return out

    def hann(n):
        v = np.array([0.5 - 0.5 * np.cos(2 * np.pi * (i + 0.5) / n) for i in range(n)])
        return np.maximum(v / v.max(), 1e-3)

    w = np.outer(hann(th), hann(tw))
    acc = np.zeros((net.out_channels, H, W))
    wsum = np.zeros((H, W))
    for y in starts(H, th):
        for x in starts(W, tw):
            with torch.no_grad():
                p = net(torch.from_numpy(image[None, None, y:y + th, x:x + tw].copy())).double().numpy()[0]
            acc[:, y:y + th, x:x + tw] += p * w
            wsum[y:y + th, x:x + tw] += w
    return acc / wsum


@pytest.fixture(scope="module")
def ort_pred(pkg):
    return neuroadda_rt.Predictor(pkg, backend="onnxruntime", device="cpu", tile=32, overlap=0.25, batch_size=3,
                                  threads=1)


@pytest.mark.parametrize("shape", [(70, 53), (32, 32), (45, 100)])
def test_predict_matches_brute_force_blending(net, ort_pred, shape):
    img = np.random.default_rng(shape[1]).random(shape, dtype=np.float32)
    ref = _brute_force_blend(net, img, 32, 0.25)
    p_ort = ort_pred.predict(img)
    p_torch = neuroadda_rt.Predictor(net, backend="torch", device="cpu", tile=32, overlap=0.25).predict(img)
    assert p_ort.shape == ref.shape == (1, *shape) and p_ort.dtype == np.float32
    assert np.abs(p_ort - ref).max() <= 1e-4
    assert np.abs(p_torch - ref).max() <= 1e-4


def test_predict_single_window_is_whole_image(net):
    img = np.random.default_rng(1).random((37, 53), dtype=np.float32)
    p = neuroadda_rt.Predictor(TINY, backend="onnxruntime", device="cpu", tile=64).predict(img)
    with torch.no_grad():
        ref = net(torch.from_numpy(img)[None, None]).numpy()[0]
    assert np.abs(p - ref).max() <= 1e-4


def test_predict_volume_slice_by_slice_and_lazy(net, ort_pred):
    vol = np.random.default_rng(2).integers(0, 256, (3, 40, 36), dtype=np.uint8)

    class Lazy:
        shape, dtype = vol.shape, vol.dtype
        reads = 0

        def __getitem__(self, key):
            Lazy.reads += 1
            return vol[key]

    p = ort_pred.predict(Lazy())
    assert p.shape == (1, 3, 40, 36) and Lazy.reads == 3
    for z in range(3):
        np.testing.assert_allclose(p[:, z], ort_pred.predict(vol[z]), atol=1e-6)
    np.testing.assert_allclose(p[:, 1], ort_pred.predict(vol[1].astype(np.float32) / 255), atol=1e-5)


def test_predict_3d_affinities():
    torch.manual_seed(5)
    net3 = UNet(dim=3, widths=(3, 6), head="affinities").eval()
    vol = np.random.default_rng(3).random((9, 20, 17), dtype=np.float32)
    whole = neuroadda_rt.Predictor(net3, backend="onnxruntime", device="cpu", tile=(16, 32, 32)).predict(vol)
    with torch.no_grad():
        ref = net3(torch.from_numpy(vol)[None, None]).numpy()[0]
    assert whole.shape == (3, 9, 20, 17)
    assert np.abs(whole - ref).max() <= 1e-4
    windows = neuroadda_rt.Predictor(net3, backend="torch", device="cpu", tile=(4, 8, 8), overlap=0.5).predict(vol)
    assert windows.shape == whole.shape and 0 <= windows.min() and windows.max() <= 1


def test_predict_tiny_and_tiles(net, ort_pred):
    img = np.random.default_rng(4).random((3, 50), dtype=np.float32)  # 3 < 2**(depth-1) = 4
    p = ort_pred.predict(img)
    assert p.shape == (1, 3, 50) and np.isfinite(p).all()
    tiles = np.random.default_rng(5).random((4, 24, 24), dtype=np.float32)
    pt = ort_pred.predict_tiles(tiles)
    with torch.no_grad():
        ref = net(torch.from_numpy(tiles)[:, None]).numpy()
    assert pt.shape == (4, 1, 24, 24) and np.abs(pt - ref).max() <= 1e-4


def test_predict_bad_arguments(net, ort_pred):
    with pytest.raises(InputValueError):
        neuroadda_rt.Predictor(net, backend="torch", overlap=1.0)
    with pytest.raises(InputValueError):
        neuroadda_rt.Predictor(net, backend="torch", tile=2)
    with pytest.raises(InputValueError):
        neuroadda_rt.Predictor(net, backend="torch", blend="triangle")
    with pytest.raises(ShapeError):
        ort_pred.predict(np.zeros(10, np.float32))
    with pytest.raises(ShapeError):
        ort_pred.predict(np.zeros((0, 10), np.float32))


def test_explicit_ort_providers(pkg):
    fx = FeatureExtractor(pkg, backend="onnxruntime", ort_providers=["CPUExecutionProvider"])
    assert fx.device == "cpu" and fx.providers == ["CPUExecutionProvider"]
    with pytest.raises(BackendUnavailableError, match="not available"):
        FeatureExtractor(pkg, backend="onnxruntime", ort_providers=["NoSuchExecutionProvider"])
    # device="cuda" with CPU-only providers is a contradiction (or, without any GPU, unavailable)
    with pytest.raises((InputValueError, BackendUnavailableError)):
        FeatureExtractor(pkg, backend="onnxruntime", device="cuda", ort_providers=["CPUExecutionProvider"])


def test_empty_batch(ort_fx):
    out = ort_fx["mean"].features(np.zeros((0, 16, 16), np.float32))
    assert out.shape == (0, 16) and out.dtype == np.float32


@pytest.mark.cuda
def test_onnxruntime_gpu_providers(pkg, tmp_path, monkeypatch):
    """CUDA and TensorRT execution providers of onnxruntime-gpu (skipped without them)."""
    prov = available_backends().get("onnxruntime", [])
    if "cuda" not in prov:
        pytest.skip("onnxruntime-gpu (CUDAExecutionProvider) is not installed")
    x = np.random.default_rng(10).random((5, 37, 53), dtype=np.float32)
    ref = FeatureExtractor(pkg, backend="onnxruntime", device="cpu").features(x)
    fx = FeatureExtractor(pkg, backend="onnxruntime", device="cuda")
    assert fx.device == "cuda" and "CUDAExecutionProvider" in fx.providers
    assert np.abs(fx.features(x, batch_size=2) - ref).max() <= 1e-4
    if "tensorrt-ep" in prov:
        monkeypatch.setenv("NEUROADDA_CACHE", str(tmp_path))
        ft = FeatureExtractor(pkg, backend="onnxruntime", ort_providers=[
            "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
        assert np.abs(ft.features(x, batch_size=2) - ref).max() <= 1e-3


@pytest.mark.parametrize("device", DEVICES)
def test_predict_on_device(pkg, ort_pred, device):
    img = np.random.default_rng(11).integers(0, 256, (70, 90), dtype=np.uint8)
    p = neuroadda_rt.Predictor(pkg, backend="torch", device=device, tile=32, overlap=0.25, batch_size=3)
    assert p.device == device
    assert np.abs(p.predict(img) - ort_pred.predict(img)).max() <= 1e-4


def test_onnxruntime_path_needs_no_torch():
    """A package runs on ONNX Runtime in an environment without PyTorch (torch import blocked)."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np, neuroadda_rt as nr\n"
        f"pkg = nr.load_model({str(TINY)!r})\n"
        "fx = nr.FeatureExtractor(pkg, device='cpu')\n"
        "assert fx.backend == 'onnxruntime', fx.backend\n"
        "f = fx.features(np.zeros((2, 32, 32), np.uint8))\n"
        "p = nr.Predictor(pkg, device='cpu', tile=32).predict(np.zeros((40, 50), np.uint8))\n"
        "assert f.shape == (2, 16) and p.shape == (1, 40, 50)\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_probabilities_rounding_past_one_are_clipped(pkg, monkeypatch):
    # A float32 sigmoid can return 1 + 1 ulp; segment() rightly refuses values above 1, so the
    # Predictor must hand out probabilities within [0, 1] whatever the runner rounds to.
    pred = neuroadda_rt.Predictor(pkg, backend="onnxruntime", device="cpu", tile=32, overlap=0.25, threads=1)
    over = np.nextafter(np.float32(1), np.float32(2))
    monkeypatch.setattr(pred, "_runner", lambda x: np.full((x.shape[0], 1, *x.shape[2:]), over, np.float32))
    tiles = pred.predict_tiles(np.zeros((2, 24, 24), np.float32))
    image = pred.predict(np.zeros((40, 50), np.float32))
    assert tiles.max() == 1.0 and image.max() == 1.0
    seg = neuroadda_rt.segment(image[0], "boundary", threshold=0.5)
    assert seg.shape == (40, 50)


# --------------------------------------------------------------------------------------------
# issue 19 item 5: an encoder whose output width is not the package's feature width
# --------------------------------------------------------------------------------------------
def _package_with_encoder(tmp_path, encoder_widths):
    """A copy of the tiny package whose encoder.onnx is another network's, checksums updated (the
    tamper a checksum cannot catch: the files are consistent with model.json, not with each other)."""
    import json
    import shutil

    from neuroadda_rt._digest import file_sha256
    from neuroadda_rt.export import export_onnx

    dst = tmp_path / "wrong_encoder"
    shutil.copytree(TINY, dst)
    torch.manual_seed(0)
    export_onnx(UNet(widths=encoder_widths).eval(), dst / "encoder.onnx", part="encoder")
    meta = json.loads((dst / "model.json").read_text())
    meta["files"]["encoder.onnx"] = file_sha256(dst / "encoder.onnx")
    (dst / "model.json").write_text(json.dumps(meta))
    return dst


@pytest.mark.parametrize("widths", [(4, 8, 1), (4, 8, 32)])
def test_encoder_of_the_wrong_width_is_refused_not_broadcast(tmp_path, widths):
    bad = _package_with_encoder(tmp_path, widths)
    pkg = neuroadda_rt.load_model(bad)
    assert pkg.reference_features.shape == (32, 16)
    x = np.random.default_rng(0).random((5, 32, 32), dtype=np.float32)
    with pytest.raises(ShapeError, match=rf"16 channels.*reference features have 16 columns.* {widths[-1]};"):
        FeatureExtractor(pkg, backend="onnxruntime", device="cpu", threads=1).features(x)
    with pytest.raises(ShapeError, match=rf"16 channels.* {widths[-1]};"):
        FeatureExtractor(str(bad), backend="onnxruntime", device="cpu", threads=1).features(x)


@pytest.mark.parametrize("out_shape", [(5, 1, 2, 2), (5, 16), (4, 16, 2, 2)])
def test_runner_output_of_the_wrong_shape_is_refused_not_broadcast(pkg, out_shape):
    """Even a runner whose output shape is only known when it runs (no static ONNX shape)."""
    fx = FeatureExtractor(pkg, backend="onnxruntime", device="cpu", threads=1)
    fx._runner = lambda batch: np.ones(out_shape, np.float32)
    with pytest.raises(ShapeError, match="encoder output"):
        fx.features(np.random.default_rng(0).random((5, 32, 32), dtype=np.float32))
