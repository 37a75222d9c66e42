"""ONNX export: parity with PyTorch at several batch and tile sizes (odd ones too), I/O names,
opset, BatchNorm folding, atomic writes, static int8 quantisation, TensorRT cache key."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import neuroadda_rt  # noqa: E402
from neuroadda_rt.errors import FormatError, InputValueError  # noqa: E402
from neuroadda_rt.export import INPUT_NAME, OPSET, onnx_metadata, tensorrt_cache_key  # noqa: E402
from neuroadda_rt.models import UNet  # noqa: E402


def _net(dim=2, head="boundary", widths=(4, 8, 16), seed=0):
    torch.manual_seed(seed)
    net = UNet(dim=dim, widths=widths, head=head)
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():  # non-trivial BatchNorm statistics so folding is exercised
        if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return net.eval()


def _session(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("onnx")
    out = {}
    for dim, head in [(2, "boundary"), (3, "affinities")]:
        net = _net(dim=dim, head=head, widths=(4, 8, 16) if dim == 2 else (3, 6))
        out[dim] = (net, neuroadda_rt.export_onnx(net, d / f"enc{dim}.onnx", part="encoder"),
                    neuroadda_rt.export_onnx(net, d / f"full{dim}.onnx", part="full"))
    return out


@pytest.mark.parametrize("shape", [(1, 1, 37, 53), (3, 1, 64, 64), (5, 1, 17, 8), (2, 1, 40, 41)])
def test_parity_2d(exported, shape):
    net, enc, full = exported[2]
    x = np.random.default_rng(sum(shape)).random(shape, dtype=np.float32)
    with torch.no_grad():
        ref_z = net.encode(torch.from_numpy(x)).numpy()
        ref_p = net(torch.from_numpy(x)).numpy()
    z = _session(enc).run(None, {INPUT_NAME: x})[0]
    p = _session(full).run(None, {INPUT_NAME: x})[0]
    assert z.shape == ref_z.shape and p.shape == ref_p.shape == (shape[0], 1, *shape[2:])
    assert np.abs(z - ref_z).max() <= 1e-4
    assert np.abs(p - ref_p).max() <= 1e-4


@pytest.mark.parametrize("shape", [(1, 1, 5, 9, 7), (2, 1, 8, 8, 8)])
def test_parity_3d(exported, shape):
    net, enc, full = exported[3]
    x = np.random.default_rng(1).random(shape, dtype=np.float32)
    with torch.no_grad():
        ref_z = net.encode(torch.from_numpy(x)).numpy()
        ref_p = net(torch.from_numpy(x)).numpy()
    z = _session(enc).run(None, {INPUT_NAME: x})[0]
    p = _session(full).run(None, {INPUT_NAME: x})[0]
    assert p.shape == (shape[0], 3, *shape[2:])
    assert np.abs(z - ref_z).max() <= 1e-4
    assert np.abs(p - ref_p).max() <= 1e-4


def test_graph_conventions(exported):
    net, enc, full = exported[2]
    for path, out_name in [(enc, "features"), (full, "probabilities")]:
        m = onnx.load(str(path))
        assert [o.version for o in m.opset_import if o.domain in ("", "ai.onnx")] == [OPSET]
        assert [i.name for i in m.graph.input] == [INPUT_NAME]
        assert [o.name for o in m.graph.output] == [out_name]
        dims = m.graph.input[0].type.tensor_type.shape.dim
        assert [d.dim_param for d in dims] == ["batch", "", "height", "width"]
        ops = {n.op_type for n in m.graph.node}
        assert "BatchNormalization" not in ops and "Conv" in ops and "Pad" in ops
        assert not list(path.parent.glob(path.name + ".data"))  # weights inside the file
    meta = onnx_metadata(enc)
    assert meta["neuroadda_rt.part"] == "encoder"
    assert json.loads(meta["neuroadda_rt.config"]) == net.config


def test_export_atomic_and_bad_args(tmp_path):
    net = _net(widths=(2, 4))
    p = neuroadda_rt.export_onnx(net, tmp_path / "sub" / "e.onnx")
    assert p.is_file() and [f.name for f in p.parent.iterdir()] == ["e.onnx"]  # no temp leftovers
    with pytest.raises(InputValueError):
        neuroadda_rt.export_onnx(net, tmp_path / "x.onnx", part="decoder")
    with pytest.raises(InputValueError):
        neuroadda_rt.export_onnx(object(), tmp_path / "x.onnx")
    (tmp_path / "bad.onnx").write_bytes(b"not onnx")
    with pytest.raises(FormatError):
        onnx_metadata(tmp_path / "bad.onnx")


def test_quantize_int8_static_qdq(exported, tmp_path):
    net, enc, _ = exported[2]
    rng = np.random.default_rng(7)
    calib = rng.random((16, 32, 32), dtype=np.float32)
    q = neuroadda_rt.quantize_int8(enc, calib, tmp_path / "enc.int8.onnx")
    m = onnx.load(str(q))
    ops = [n.op_type for n in m.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops  # QDQ format, static scales
    assert "DynamicQuantizeLinear" not in ops and "ConvInteger" not in ops
    assert onnx_metadata(q)["neuroadda_rt.precision"] == "int8"
    x = rng.random((4, 1, 37, 53), dtype=np.float32)
    z32 = _session(enc).run(None, {INPUT_NAME: x})[0]
    z8 = _session(q).run(None, {INPUT_NAME: x})[0]
    assert z8.shape == z32.shape
    rel = np.linalg.norm(z8 - z32) / np.linalg.norm(z32)
    assert rel < 0.1, rel
    with pytest.raises(FormatError):
        neuroadda_rt.quantize_int8(tmp_path / "missing.onnx", calib, tmp_path / "q.onnx")
    with pytest.raises(InputValueError):
        neuroadda_rt.quantize_int8(enc, calib[:0], tmp_path / "q.onnx")


def test_tensorrt_cache_key_covers_every_field():
    base = dict(onnx_sha256="a" * 64, gpu_name="NVIDIA H100", trt_version="10.3.0", precision="fp32",
                profile={"min": [1, 1, 8, 8], "opt": [16, 1, 256, 256], "max": [64, 1, 1024, 1024]})
    k0 = tensorrt_cache_key(**base)
    assert k0 == tensorrt_cache_key(**dict(base))
    for field, value in [("onnx_sha256", "b" * 64), ("gpu_name", "NVIDIA A100"), ("trt_version", "10.4.0"),
                         ("precision", "fp16"), ("profile", {**base["profile"], "max": [32, 1, 1024, 1024]})]:
        assert tensorrt_cache_key(**{**base, field: value}) != k0, field


@pytest.mark.cuda
def test_tensorrt_engine_build_cache_and_parity(exported, tmp_path, caplog):
    pytest.importorskip("tensorrt")
    from neuroadda_rt.export import build_tensorrt_engine

    net, enc, full = exported[2]
    prof = dict(min_shape=(1, 1, 8, 8), opt_shape=(4, 1, 64, 64), max_shape=(8, 1, 128, 128))
    with caplog.at_level("INFO", logger="neuroadda_rt"):
        e1 = build_tensorrt_engine(full, cache_dir=tmp_path, **prof)
    assert any("Built TensorRT engine in" in r.message for r in caplog.records)
    caplog.clear()
    with caplog.at_level("INFO", logger="neuroadda_rt"):
        e2 = build_tensorrt_engine(full, cache_dir=tmp_path, **prof)
    assert e1 == e2 and any("cache hit" in r.message for r in caplog.records)
    # a corrupted cache entry is rebuilt, with a log line saying why
    eng = next(tmp_path.glob("*.engine"))
    eng.write_bytes(eng.read_bytes()[:100])
    caplog.clear()
    with caplog.at_level("INFO", logger="neuroadda_rt"):
        build_tensorrt_engine(full, cache_dir=tmp_path, **prof)
    assert any("checksum" in r.message for r in caplog.records)
    fx = neuroadda_rt.Predictor(full, backend="tensorrt", tile=64, cache_dir=tmp_path,
                                trt_profile={"min": prof["min_shape"], "opt": prof["opt_shape"],
                                             "max": prof["max_shape"]})
    x = np.random.default_rng(0).random((100, 90), dtype=np.float32)
    ref = neuroadda_rt.Predictor(net, backend="torch", device="cpu", tile=64).predict(x)
    assert np.abs(fx.predict(x) - ref).max() <= 1e-4
