"""``FeatureExtractor(precision="int8")``: the encoder quantised on calibration tiles, checked against
float64 features computed by hand from the fp32 network, and the rules around it (intensity rule and
pooling kept, cached quantisation, clear errors)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from neuroadda_rt import FeatureExtractor
from neuroadda_rt.errors import InputValueError
from neuroadda_rt.models import UNet


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NEUROADDA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def net():
    torch.manual_seed(0)
    return UNet(widths=(4, 8, 16), feature_level=1).eval()


def _textured(rng, n, size=32):
    """Smooth random tiles in [0, 1] (structure at several scales, like EM texture)."""
    from scipy.ndimage import gaussian_filter

    x = rng.random((n, size, size))
    x = np.stack([gaussian_filter(t, 1.5) for t in x])
    x -= x.min(axis=(1, 2), keepdims=True)
    return (x / x.max(axis=(1, 2), keepdims=True)).astype(np.float32)


def _reference_features(net, tiles):
    """mean+std pooled level-1 activations in float64, straight from the PyTorch network."""
    with torch.no_grad():
        fmap = net.encode(torch.from_numpy(tiles[:, None].astype(np.float32))).double().numpy()
    flat = fmap.reshape(fmap.shape[0], fmap.shape[1], -1)
    return np.concatenate([flat.mean(axis=2), flat.std(axis=2)], axis=1)


def test_int8_features_agree_with_float64_reference(net, cache):
    rng = np.random.default_rng(0)
    cal, test = _textured(rng, 32), _textured(rng, 16)
    fx = FeatureExtractor(net, precision="int8", calibration_tiles=cal, pooling="mean+std")
    assert fx.backend == "onnxruntime" and fx.device == "cpu" and fx.precision == "int8"
    got = fx.features(test).astype(np.float64)
    want = _reference_features(net, test)
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert rel < 0.05, rel
    # and it is quantised: not bit-equal to the fp32 path
    fp32 = FeatureExtractor(net, backend="onnxruntime", pooling="mean+std").features(test).astype(np.float64)
    assert np.linalg.norm(fp32 - want) / np.linalg.norm(want) < 1e-4
    assert not np.allclose(got, fp32, rtol=0, atol=1e-6)
    # one quantised file in the cache, reused by a second extractor on the same tiles
    files = sorted((cache / "int8").glob("*.onnx"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    again = FeatureExtractor(net, precision="int8", calibration_tiles=cal, pooling="mean+std")
    np.testing.assert_array_equal(again.features(test), fx.features(test))
    assert sorted((cache / "int8").glob("*.onnx")) == files and files[0].stat().st_mtime_ns == mtime
    # other calibration tiles: another file
    FeatureExtractor(net, precision="int8", calibration_tiles=cal[:16])
    assert len(list((cache / "int8").glob("*.onnx"))) == 2


def test_int8_keeps_the_package_intensity_rule_and_pooling(tmp_path, cache):
    from neuroadda_rt import save_model

    torch.manual_seed(1)
    net = UNet(widths=(4, 8, 16), feature_level=1).eval()
    rng = np.random.default_rng(1)
    cal = _textured(rng, 24)
    norm = {"rule": "percentile", "low": 1.0, "high": 99.0}
    fx0 = FeatureExtractor(net, pooling="mean+std", normalize=False)
    pkg = save_model(net, tmp_path / "pkg", reference_features=fx0.features(cal), normalization=norm,
                     pooling="mean+std", modality="ssTEM")
    fx = FeatureExtractor(pkg, precision="int8", calibration_tiles=cal)
    assert fx.pooling == "mean+std" and fx.n_features == 16
    test = _textured(rng, 8)
    # the percentile rule makes features blind to a linear intensity change; the plain dtype rule would not be
    raw = fx.features(test)
    np.testing.assert_allclose(fx.features(test * 0.5 + 0.25), raw, rtol=0, atol=2e-3 * np.abs(raw).max())
    # the int8 features follow the fp32 features of the same package
    fp32 = FeatureExtractor(pkg, backend="onnxruntime").features(test)
    assert np.linalg.norm(raw - fp32) / np.linalg.norm(fp32) < 0.05


def test_int8_errors_say_what_was_expected(net, cache, tmp_path):
    cal = _textured(np.random.default_rng(2), 8)
    with pytest.raises(InputValueError, match="needs calibration_tiles"):
        FeatureExtractor(net, precision="int8")
    with pytest.raises(InputValueError, match="expected precision in"):
        FeatureExtractor(net, precision="fp16", calibration_tiles=cal)
    with pytest.raises(InputValueError, match="ONNX Runtime's CPU provider"):
        FeatureExtractor(net, precision="int8", calibration_tiles=cal, backend="torch")
    with pytest.raises(InputValueError, match="ONNX Runtime's CPU provider"):
        FeatureExtractor(net, precision="int8", calibration_tiles=cal, device="cuda")
    with pytest.raises(InputValueError, match="calibration_tiles of shape"):
        FeatureExtractor(net, precision="int8", calibration_tiles=np.zeros((0, 32, 32), np.float32))
    # an int8 file is not quantised twice
    fx = FeatureExtractor(net, precision="int8", calibration_tiles=cal)
    q = next((cache / "int8").glob("*.onnx"))
    with pytest.raises(InputValueError, match="already int8"):
        FeatureExtractor(q, precision="int8", calibration_tiles=cal)
    assert FeatureExtractor(q).features(cal).shape == fx.features(cal).shape


def test_exported_package_encoder_files_embed_as_the_package_does(tmp_path, cache, capsys):
    """`export --format onnx|int8 --part encoder`: the file alone carries the package's intensity rule and
    pooling, so `qc watch --model FILE` / `FeatureExtractor(FILE)` embed tiles as the package does (an int8 file
    used to fall back to the dtype rule and mean pooling)."""
    tifffile = pytest.importorskip("tifffile")
    from neuroadda_rt import save_model
    from neuroadda_rt.cli import main

    torch.manual_seed(2)
    net = UNet(widths=(4, 8, 16), feature_level=1).eval()
    rng = np.random.default_rng(3)
    cal = _textured(rng, 24)
    norm = {"rule": "percentile", "low": 1.0, "high": 99.0}
    ref = FeatureExtractor(net, pooling="mean+std", normalize=False).features(cal)
    pkg = save_model(net, tmp_path / "pkg", reference_features=ref, normalization=norm, pooling="mean+std",
                     modality="ssTEM")
    vol = (_textured(rng, 6, size=64) * 200 + 20).astype(np.uint8)
    tifffile.imwrite(tmp_path / "vol.tif", vol)
    for fmt in ("onnx", "int8"):
        out = tmp_path / f"enc.{fmt}.onnx"
        extra = ["--calibration", str(tmp_path / "vol.tif"), "--tile-size", "32"] if fmt == "int8" else []
        assert main(["export", str(pkg.path), "--format", fmt, "--part", "encoder", "--out", str(out), *extra]) == 0
        capsys.readouterr()
        fx = FeatureExtractor(out)
        assert fx.pooling == "mean+std" and fx._source.normalization == norm
        test = vol[:, :32, :32]
        got, want = fx.features(test), FeatureExtractor(pkg, backend="onnxruntime").features(test)
        rel = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert rel < (1e-5 if fmt == "onnx" else 0.05), (fmt, rel)
        # percentile rule: a linear change of the raw intensities leaves the features (nearly) unchanged
        brighter = (test.astype(np.float32) * 0.5 + 60).astype(np.uint8)
        assert np.linalg.norm(fx.features(brighter) - got) / np.linalg.norm(got) < 0.05


@pytest.mark.parametrize(("key", "value", "match"), [
    ("neuroadda_rt.normalization", "{not json", "expected JSON"),
    ("neuroadda_rt.normalization", "[1, 2]", "expected a dict"),
    ("neuroadda_rt.pooling", "median", "expected the metadata neuroadda_rt.pooling"),
])
def test_bad_recorded_rule_or_pooling_is_a_format_error(net, tmp_path, key, value, match):
    from neuroadda_rt.errors import FormatError
    from neuroadda_rt.export import export_onnx, set_onnx_metadata

    path = export_onnx(net, tmp_path / "enc.onnx", part="encoder")
    set_onnx_metadata(path, {key: value})
    with pytest.raises(FormatError, match=match):
        FeatureExtractor(path)
