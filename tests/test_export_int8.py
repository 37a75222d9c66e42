"""int8 export of the full UNet: the ConvTranspose -> 1x1 Conv + depth-to-space rewrite against a
float64 brute-force transposed convolution, and the quantised network against fp32."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import neuroadda_rt  # noqa: E402
from neuroadda_rt.export import INPUT_NAME, rewrite_conv_transpose  # noqa: E402
from neuroadda_rt.models import UNet, batchnorm_statistics_from  # noqa: E402


def _session(model_or_path, level=None, optimized=None):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    if level is not None:
        so.graph_optimization_level = level
    if optimized is not None:
        so.optimized_model_filepath = str(optimized)
    src = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) else str(model_or_path)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def _deconv_model(weight, bias, **attrs):
    """One ConvTranspose with dynamic batch and spatial sizes, weights as initializers."""
    dim = weight.ndim - 2
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", weight.shape[0], *[f"s{i}" for i in range(dim)]])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", weight.shape[1], *[f"o{i}" for i in range(dim)]])
    inputs = ["x", "w"] + (["b"] if bias is not None else [])
    inits = [numpy_helper.from_array(weight.astype(np.float32), "w")]
    if bias is not None:
        inits.append(numpy_helper.from_array(bias.astype(np.float32), "b"))
    node = helper.make_node("ConvTranspose", inputs, ["y"], name="up", **attrs)
    graph = helper.make_graph([node], "g", [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _brute_deconv(x, weight, bias, stride):
    """float64 transposed convolution, one input voxel at a time (no padding, dilation 1)."""
    x, weight = x.astype(np.float64), weight.astype(np.float64)
    n, _, *sp = x.shape
    cout, ks = weight.shape[1], weight.shape[2:]
    out_sp = [(s - 1) * st + k for s, st, k in zip(sp, stride, ks)]
    out = np.zeros((n, cout, *out_sp))
    for b in range(n):
        for idx in itertools.product(*map(range, sp)):
            patch = np.tensordot(x[(b, slice(None), *idx)], weight, axes=(0, 0))  # (cout, *ks)
            box = tuple(slice(i * st, i * st + k) for i, st, k in zip(idx, stride, ks))
            out[(b, slice(None), *box)] += patch
    if bias is not None:
        out += bias.astype(np.float64).reshape(1, -1, *[1] * len(sp))
    return out


@pytest.mark.parametrize("cin, cout, ks, with_bias, x_shape", [
    (3, 5, (2, 2), True, (2, 7, 9)),        # the UNet's 2-D up-convolution
    (4, 2, (2, 3), True, (1, 5, 4)),        # anisotropic kernel == stride
    (2, 3, (2, 2, 2), True, (2, 3, 4, 5)),  # 3-D
    (3, 4, (3, 3), False, (1, 4, 6)),       # no bias, stride 3
])
def test_rewrite_matches_brute_force_deconv(cin, cout, ks, with_bias, x_shape):
    rng = np.random.default_rng(sum(ks) + cin)
    weight = rng.standard_normal((cin, cout, *ks))
    bias = rng.standard_normal(cout) if with_bias else None
    model = _deconv_model(weight, bias, kernel_shape=list(ks), strides=list(ks))
    assert rewrite_conv_transpose(model) == 1
    ops = [n.op_type for n in model.graph.node]
    assert "ConvTranspose" not in ops and ops.count("Conv") == 1
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    assert list(helper.get_attribute_value(next(a for a in conv.attribute if a.name == "kernel_shape"))) == [1] * len(ks)
    x = rng.standard_normal((x_shape[0], cin, *x_shape[1:])).astype(np.float32)
    ref = _brute_deconv(x, weight, bias, ks)
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        got = _session(model, level).run(None, {"x": x})[0]
        assert got.shape == ref.shape
        assert np.abs(got - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())
    # the batch and spatial sizes stay dynamic
    x2 = rng.standard_normal((1, cin, *[s + 1 for s in x_shape[1:]])).astype(np.float32)
    assert np.abs(_session(model).run(None, {"x": x2})[0] - _brute_deconv(x2, weight, bias, ks)).max() < 1e-4 * 10


@pytest.mark.parametrize("attrs", [
    {"kernel_shape": [3, 3], "strides": [2, 2]},                          # kernel != stride: overlap
    {"kernel_shape": [2, 2], "strides": [2, 2], "pads": [1, 1, 1, 1]},    # padding crops the output
    {"kernel_shape": [2, 2], "strides": [2, 2], "output_padding": [1, 1]},
])
def test_rewrite_leaves_other_deconvs_alone(attrs):
    rng = np.random.default_rng(3)
    weight = rng.standard_normal((2, 3, *attrs["kernel_shape"]))
    model = _deconv_model(weight, rng.standard_normal(3), **attrs)
    before = model.SerializeToString()
    assert rewrite_conv_transpose(model) == 0
    assert model.SerializeToString() == before


@pytest.fixture(scope="module")
def unet_files(tmp_path_factory):
    from neuroadda_rt.study.synthetic import make_domain

    d = tmp_path_factory.mktemp("int8")
    imgs = np.stack([make_domain(None, (96, 96), seed=20 + i)[0] for i in range(10)]).astype(np.uint8)
    torch.manual_seed(0)
    # BatchNorm statistics from data: outputs vary across the image
    net = batchnorm_statistics_from(UNet(widths=(8, 16, 32)), imgs[:6, None].astype(np.float32) / 255)
    fp32 = neuroadda_rt.export_onnx(net, d / "model.onnx", part="full")
    q = neuroadda_rt.quantize_int8(fp32, imgs[:6, :64, :64], d / "model.int8.onnx", fp32_first_conv=True)
    return {"net": net, "fp32": fp32, "int8": q, "imgs": imgs, "dir": d}


def test_rewritten_unet_equals_fp32_graph(unet_files):
    model = onnx.load(str(unet_files["fp32"]))
    n_up = sum(n.op_type == "ConvTranspose" for n in model.graph.node)
    assert n_up == 2 and rewrite_conv_transpose(model) == n_up
    x = unet_files["imgs"][6:, None, :61, :75].astype(np.float32) / 255  # odd sizes: padded inside
    ref = _session(unet_files["fp32"]).run(None, {INPUT_NAME: x})[0]
    got = _session(model).run(None, {INPUT_NAME: x})[0]
    assert np.abs(got - ref).max() < 1e-5


def test_int8_unet_runs_int8_convolutions_and_agrees_with_fp32(unet_files):
    opt = unet_files["dir"] / "optimized.onnx"
    s8 = _session(unet_files["int8"], ort.GraphOptimizationLevel.ORT_ENABLE_ALL, optimized=opt)
    ops = [n.op_type for n in onnx.load(str(opt)).graph.node]
    # every convolution but the first (kept fp32) runs as QLinearConv, up-convolutions included
    n_conv = sum(isinstance(m, torch.nn.Conv2d) for m in unet_files["net"].modules())
    n_up = sum(isinstance(m, torch.nn.ConvTranspose2d) for m in unet_files["net"].modules())
    assert "ConvTranspose" not in ops
    assert ops.count("QLinearConv") == n_conv - 1 + n_up
    x = unet_files["imgs"][6:, None].astype(np.float32) / 255  # tiles not used for calibration
    p32 = _session(unet_files["fp32"]).run(None, {INPUT_NAME: x})[0]
    p8 = s8.run(None, {INPUT_NAME: x})[0]
    err = np.abs(p8 - p32)
    assert p32.std() > 0.05  # the comparison is not between two constant maps
    assert err.mean() < 0.02 and err.max() < 0.2, (err.mean(), err.max())
    # the same boundaries at 0.5, up to the voxels close to the threshold
    assert ((p8 > 0.5) != (p32 > 0.5)).mean() < 0.02
