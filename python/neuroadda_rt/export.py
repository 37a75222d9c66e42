"""Export a :class:`~neuroadda_rt.models.UNet` to ONNX, quantise it to static int8, and build
TensorRT engines (with an on-disk cache).

Conventions fixed by the project (other tools may rely on them):

* opset :data:`OPSET` (18), one input named :data:`INPUT_NAME` (``"input"``, float32
  ``(N, C, H, W)`` or ``(N, C, D, H, W)``), one output named ``"features"`` (``part="encoder"``:
  bottleneck activations) or ``"probabilities"`` (``part="full"``: sigmoid outputs);
* batch and every spatial axis are dynamic; the reflect padding to a multiple of
  ``2**(depth-1)`` and the crop back are inside the graph;
* BatchNorm is folded into the convolutions (the graph holds no BatchNormalization node);
* the network config and the part are stored in the ONNX metadata (``neuroadda_rt.config``,
  ``neuroadda_rt.part``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from . import _atomic, _cache
from ._digest import bytes_sha256, file_sha256, json_sha256
from .errors import BackendUnavailableError, FormatError, InputValueError, ShapeError, require
from .io import intensity_rule, normalize_tiles

log = logging.getLogger("neuroadda_rt")

#: ONNX opset of every exported file (supported by ONNX Runtime >= 1.14 and TensorRT >= 8.6).
OPSET = 18
#: Name of the single input of every exported graph.
INPUT_NAME = "input"
#: Output name per exported part.
OUTPUT_NAMES = {"encoder": "features", "full": "probabilities"}


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------
#: Hex SHA-256 of a file (kept under its old name; the one implementation is in ``_digest``).
sha256_file = file_sha256


def as_network_input(tiles, *, dim: int | None, in_channels: int = 1, normalize=None) -> np.ndarray:
    """Tiles -> the contiguous float32 ``(N, C, *spatial)`` batch every exported graph takes.

    Parameters
    ----------
    tiles : array-like
        ``(N, *spatial)`` (one channel) or ``(N, C, *spatial)``, numeric and finite. Not modified.
    dim : {2, 3} or None
        Spatial dimensionality of the network; None guesses 2 for 3-D/4-D input, else 3.
    in_channels : int
        Input channels of the network.
    normalize : callable, optional
        Applied to the validated array before reshaping (the caller's intensity rule); without it
        floats are used as given.

    Returns
    -------
    numpy.ndarray
        float32 ``(N, in_channels, *spatial)``, C-contiguous (a copy only when needed).
    """
    arr = np.asarray(tiles)
    if arr.dtype == bool or arr.dtype.kind not in "uif":
        raise InputValueError(f"expected numeric tiles, got dtype {arr.dtype}")
    if arr.size and arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise InputValueError("expected finite tile values, got NaN or inf")
    if normalize is not None:
        arr = normalize(arr)
    if dim is None:
        dim = 2 if arr.ndim in (3, 4) else 3
    if arr.ndim == dim + 1 and in_channels == 1:
        arr = arr[:, None]
    if arr.ndim != dim + 2:
        sp = "D, H, W" if dim == 3 else "H, W"
        raise ShapeError(f"expected tiles of shape (N, {sp}) or (N, C, {sp}), got {arr.shape}")
    if arr.shape[1] != in_channels:
        raise ShapeError(f"expected {in_channels} input channel(s), got {arr.shape[1]} (shape {arr.shape})")
    return np.ascontiguousarray(arr, dtype=np.float32)


@contextlib.contextmanager
def _quiet_export():
    """Silence the exporter's progress prints and its library warnings (they are not ours to fix)."""
    import io
    import sys

    names = ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx", "onnxscript", "onnx_ir")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        old_out = sys.stdout
        sys.stdout = io.StringIO()
        try:
            yield
        finally:
            sys.stdout = old_out
            for lg, lv in zip(loggers, levels):
                lg.setLevel(lv)


# --------------------------------------------------------------------------------------------
# ONNX export
# --------------------------------------------------------------------------------------------
def export_onnx(model, path: str | os.PathLike, part: str = "encoder", *, opset: int = OPSET) -> Path:
    """Export a UNet (or its encoder) to an ONNX file.

    Parameters
    ----------
    model : neuroadda_rt.models.UNet
        The network; it is copied, put in eval mode and its BatchNorms folded into the
        convolutions (``model`` itself is not modified).
    path : str or path-like
        Output file; written atomically (temporary file in the same folder, then rename).
    part : {"encoder", "full"}
        ``"encoder"``: output ``"features"`` = bottleneck activations; ``"full"``: output
        ``"probabilities"`` = sigmoid outputs with the input's spatial shape.
    opset : int
        ONNX opset (default and tested: :data:`OPSET`).

    Returns
    -------
    pathlib.Path
        ``path``.

    Examples
    --------
    >>> from neuroadda_rt.models import UNet
    >>> import neuroadda_rt, tempfile, os
    >>> p = neuroadda_rt.export_onnx(UNet(widths=(4, 8)), os.path.join(tempfile.mkdtemp(), "e.onnx"))
    >>> p.name
    'e.onnx'
    """
    from .models import UNet, _EncoderWrapper, fold_batchnorm

    torch = require("torch", "torch")
    onnx = require("onnx", "runtime")
    if not isinstance(model, UNet):
        raise InputValueError(f"expected a neuroadda_rt.models.UNet, got {type(model).__name__}")
    if part not in OUTPUT_NAMES:
        raise InputValueError(f"expected part 'encoder' or 'full', got {part!r}")
    path = Path(path)
    net = fold_batchnorm(model).cpu().float()
    module = (_EncoderWrapper(net) if part == "encoder" else net).eval()
    m = net.multiple
    # an example whose sizes are not multiples of the padding unit, so no branch specialises
    spatial = (m + 3,) * net.dim if m > 1 else (5,) * net.dim
    example = torch.rand(2, net.config["in_channels"], *spatial)
    dyn = torch.export.Dim.DYNAMIC
    dynamic_shapes = {"x": {0: dyn, **{2 + i: dyn for i in range(net.dim)}}}
    with _quiet_export(), torch.inference_mode(False), torch.no_grad():
        program = torch.onnx.export(module, (example,), None, input_names=[INPUT_NAME],
                                    output_names=[OUTPUT_NAMES[part]], dynamic_shapes=dynamic_shapes,
                                    opset_version=opset, dynamo=True, external_data=False,
                                    optimize=True, verbose=False)
    proto = program.model_proto
    # readable dynamic dimension names for the I/O (the exporter writes sympy expressions)
    axes = ["batch", "channels"] + (["depth"] if net.dim == 3 else []) + ["height", "width"]
    for vi in list(proto.graph.input) + list(proto.graph.output):
        for i, d in enumerate(vi.type.tensor_type.shape.dim):
            if d.HasField("dim_param"):
                d.dim_param = axes[i] if vi.name == INPUT_NAME or part == "full" else f"{axes[i]}_bottleneck"
    meta = {"neuroadda_rt.part": part, "neuroadda_rt.config": json.dumps(net.config, sort_keys=True),
            "neuroadda_rt.multiple": str(m)}
    del proto.metadata_props[:]
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    proto.producer_name = "neuroadda_rt"
    onnx.checker.check_model(proto)
    _atomic.write_bytes(path, proto.SerializeToString())
    return path


def set_onnx_metadata(path: str | os.PathLike, updates: dict[str, str]) -> Path:
    """Add or replace ``neuroadda_rt.*`` metadata entries of an ONNX file (rewritten atomically).

    A package's exported encoder records the package's intensity rule and pooling this way, so that
    the file alone embeds tiles as the package does.
    """
    onnx = require("onnx", "runtime")
    path = Path(path)
    proto = onnx.load(str(path))
    _merge_metadata(proto, updates)
    _atomic.write_bytes(path, proto.SerializeToString())
    return path


def _merge_metadata(proto, updates: dict[str, str]) -> None:
    """Add or replace metadata entries of an ONNX ModelProto in place (other entries kept, in order)."""
    merged = {p.key: p.value for p in proto.metadata_props}
    merged.update({str(k): str(v) for k, v in updates.items()})
    del proto.metadata_props[:]
    for k, v in merged.items():
        e = proto.metadata_props.add()
        e.key, e.value = k, v


def onnx_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``neuroadda_rt.*`` metadata of an ONNX file written by :func:`export_onnx`."""
    onnx = require("onnx", "runtime")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - onnx raises several types for a bad file
        raise FormatError(f"{path}: not a readable ONNX model ({exc})") from exc
    return {p.key: p.value for p in proto.metadata_props}


# --------------------------------------------------------------------------------------------
# static int8 quantisation
# --------------------------------------------------------------------------------------------
def _is_pixel_shuffle_deconv(node, weight: np.ndarray) -> bool:
    """A ConvTranspose whose kernel equals its stride (no padding, dilation, groups or output
    padding): every input voxel writes its own disjoint kernel-sized output patch."""
    from onnx import helper  # noqa: PLC0415

    at = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    dim = weight.ndim - 2
    ks = list(weight.shape[2:])
    auto_pad = at.get("auto_pad", b"NOTSET")
    return (list(at.get("kernel_shape", ks)) == ks and list(at.get("strides", [1] * dim)) == ks
            and int(at.get("group", 1)) == 1 and not any(at.get("pads", [0] * 2 * dim))
            and list(at.get("dilations", [1] * dim)) == [1] * dim and not any(at.get("output_padding", [0] * dim))
            and "output_shape" not in at and auto_pad in (b"NOTSET", "NOTSET", b"VALID", "VALID"))


def _deconv_as_conv(node, weight: np.ndarray, bias: np.ndarray | None, p: str):
    """The nodes and initializers (names prefixed ``p``) of a 1×1 Conv plus channels-last
    depth-to-space computing the kernel == stride ConvTranspose ``node``."""
    from onnx import helper, numpy_helper  # noqa: PLC0415

    cin, cout, *ks = weight.shape
    dim, s = len(ks), int(np.prod(ks))
    bias = np.zeros(cout, weight.dtype) if bias is None else bias
    # conv channel k * cout + o holds W[:, o, k] (k = the flat kernel offset)
    w1 = np.moveaxis(weight, 1, -1).reshape(cin, s * cout).T.reshape(s * cout, cin, *[1] * dim)
    nodes, inits = [], []

    def const(name, value, dtype=np.int64):
        inits.append(numpy_helper.from_array(np.ascontiguousarray(np.asarray(value, dtype)), p + name))
        return p + name

    def op(op_type, inputs, name, **attrs):
        out = node.output[0] if name is None else p + name
        nodes.append(helper.make_node(op_type, inputs, [out], name=p + (name or "_out"), **attrs))
        return out

    y = op("Conv", [node.input[0], const("_W", w1, weight.dtype), const("_B", np.tile(bias, s), weight.dtype)],
           "_conv", kernel_shape=[1] * dim, strides=[1] * dim, pads=[0] * (2 * dim))
    # the sizes come from the conv's input (a 1x1 conv keeps N and S): ONNX Runtime dequantises
    # whatever Shape reads, and the input is the smaller tensor
    shape = op("Shape", [node.input[0]], "_shape")
    n_ = op("Slice", [shape, const("_i0", [0]), const("_i1", [1])], "_n")
    sp = op("Slice", [shape, const("_i2", [2]), const("_iend", [2 + dim])], "_sp")
    up = op("Mul", [sp, const("_k", ks)], "_upsp")
    out_shape = op("Concat", [n_, up, const("_cout", [cout])], "_outshape", axis=0)
    last = op("Transpose", [y], "_last", perm=[0, *range(2, 2 + dim), 1])                  # (N, *S, s*C)
    split = op("Reshape", [last, const("_split_shape", [0] * (1 + dim) + ks + [cout])], "_split")
    inter = op("Transpose", [split], "_inter",                                            # (N, S1, k1, .., C)
               perm=[0, *[a for i in range(dim) for a in (1 + i, 1 + dim + i)], 1 + 2 * dim])
    merged = op("Reshape", [inter, out_shape], "_merged")                                 # (N, S1*k1, .., C)
    op("Transpose", [merged], None, perm=[0, 1 + dim, *range(1, 1 + dim)])
    return nodes, inits


def rewrite_conv_transpose(model):
    """Replace every ConvTranspose whose kernel equals its stride by a 1×1(×1) Conv and a
    depth-to-space rearrangement, which compute the same function.

    ``y[n, o, s·i + k] = b[o] + Σ_c x[n, c, i] · W[c, o, k]`` (stride ``s`` = kernel, ``k`` the
    kernel offset) is a 1×1 convolution to ``C_out · prod(s)`` channels, channel ``k · C_out + o``
    holding ``W[:, o, k]``, whose channels are then moved into space. ONNX Runtime has no int8
    kernel for ConvTranspose, so in a quantised UNet the decoder's up-convolutions ran fp32
    between dequantise / quantise nodes; the 1×1 Conv becomes a QLinearConv. The rearrangement is
    written channels-last (``Transpose`` to ``(N, *S, C)``, ``Reshape`` to ``(N, *S, *k, C_out)``,
    ``Transpose`` interleaving ``S`` and ``k``, ``Reshape``, ``Transpose`` back), so ONNX Runtime
    cancels the first transpose against the NHWC layout of its int8 convolutions and moves
    contiguous runs of ``C_out`` bytes; an NCHW ``DepthToSpace`` (2-D only) was slower (see
    ``docs/method.md``). Other ConvTranspose nodes are left as they are.

    Parameters
    ----------
    model : onnx.ModelProto
        Modified in place; weights and biases must be initializers (as :func:`export_onnx` writes).

    Returns
    -------
    int
        How many nodes were rewritten.
    """
    onnx = require("onnx", "runtime")
    from onnx import numpy_helper  # noqa: PLC0415

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    nodes, added, count = [], [], 0
    taken = {o for n in g.node for o in n.output} | set(inits) | {i.name for i in g.input}
    for node in g.node:
        w_init = inits.get(node.input[1]) if node.op_type == "ConvTranspose" and len(node.input) > 1 else None
        weight = numpy_helper.to_array(w_init) if w_init is not None else None
        if weight is None or not _is_pixel_shuffle_deconv(node, weight):
            nodes.append(node)
            continue
        has_bias = len(node.input) > 2 and node.input[2]
        if has_bias and node.input[2] not in inits:
            nodes.append(node)
            continue
        bias = numpy_helper.to_array(inits[node.input[2]]) if has_bias else None
        prefix = f"{node.name or 'ConvTranspose'}_as_conv{count}"
        while any(t.startswith(prefix) for t in taken):
            prefix += "_"
        count += 1
        more_nodes, more_inits = _deconv_as_conv(node, weight, bias, prefix)
        nodes += more_nodes
        added += more_inits
    if count:
        del g.node[:]
        g.node.extend(nodes)
        used = {i for n in g.node for i in n.input}
        keep = [i for i in g.initializer if i.name in used]
        del g.initializer[:]
        g.initializer.extend(keep + added)
        onnx.checker.check_model(model)
    return count


def _first_conv_and_inputs(model) -> list[str]:
    """Names of the first Conv node and every node before it (the input padding): kept fp32 by
    :func:`quantize_int8` when asked."""
    names = []
    for node in model.graph.node:  # ONNX graphs are topologically sorted
        names.append(node.name)
        if node.op_type == "Conv":
            return names
    return []


def quantize_int8(onnx_path: str | os.PathLike, calibration_tiles, out_path: str | os.PathLike, *,
                  per_channel: bool = True, batch_size: int = 8, reduce_range: bool = True,
                  normalization: str | dict = "dtype", fp32_first_conv: bool = False) -> Path:
    """Static int8 quantisation (QDQ format) of an exported ONNX file for ONNX Runtime on CPU.

    Weights become int8 (per output channel), activations uint8 with ranges calibrated
    (min/max) on ``calibration_tiles``. Dynamic quantisation is deliberately not offered: it
    is about 10x slower for convolutions on CPU.

    Parameters
    ----------
    onnx_path : path-like
        An fp32 model from :func:`export_onnx`.
    calibration_tiles : array-like
        ``(N, H, W)`` / ``(N, C, H, W)`` (2-D) or ``(N, D, H, W)`` / ``(N, C, D, H, W)`` (3-D)
        representative raw tiles, normalised here tile by tile with ``normalization``; a few
        dozen tiles suffice. Read, never modified.
    out_path : path-like
        Output file, written atomically.
    per_channel : bool
        Per-output-channel weight scales (more accurate; default).
    batch_size : int
        Tiles per calibration batch.
    normalization : str or dict
        The model's intensity rule (:func:`neuroadda_rt.io.intensity_rule`; a package's
        ``normalization``). The ONNX file does not record it; default ``"dtype"``.
    reduce_range : bool
        Quantise weights to 7 bits (default). x86 CPUs without VNNI (AVX2, AVX-512 before
        Cascade Lake / Zen 4) compute uint8 x int8 products in 16-bit pairs that saturate with
        full 8-bit weights: on such a CPU the default UNet encoder's features came out 45% off
        (relative L2 error) instead of about 2%. The 7-bit weights run correctly everywhere, so
        a quantised file can move between machines; pass False only for VNNI-only deployments.
    fp32_first_conv : bool
        Keep the network's first convolution and the input padding before it in fp32. With one
        input channel its reduction is only 9 (27 in 3-D) long, too short for the int8 kernels to
        pay off: on the AVX2 VM it took 45 ms int8 against 19 ms fp32 per 4 × 256² windows of the
        default UNet, and keeping it fp32 lowered the mean probability error from 0.0065 to 0.0045.
        :func:`~neuroadda_rt.predict_volume` sets it; the default (False) keeps the encoder files
        of earlier releases unchanged.

    Notes
    -----
    Before quantisation every ConvTranspose whose kernel equals its stride (the UNet's
    up-convolutions) is rewritten as a 1×1 Conv plus a depth-to-space rearrangement
    (:func:`rewrite_conv_transpose`), so it runs as an int8 convolution too; the fp32 file is
    not changed.

    Returns
    -------
    pathlib.Path
        ``out_path``.

    Examples
    --------
    >>> import numpy as np, neuroadda_rt, tempfile, os                    # doctest: +SKIP
    >>> q = neuroadda_rt.quantize_int8("encoder.onnx", np.random.rand(16, 64, 64), "encoder.int8.onnx")  # doctest: +SKIP
    """
    require("onnxruntime", "cpu")
    from onnxruntime import quantization as oq

    onnx_path, out_path = Path(onnx_path), Path(out_path)
    if not onnx_path.is_file():
        raise FormatError(f"{onnx_path}: no such ONNX file")
    meta = onnx_metadata(onnx_path)
    cfg = json.loads(meta.get("neuroadda_rt.config", "{}")) or None
    dim = cfg["dim"] if cfg else None
    rule = intensity_rule(normalization)
    tiles = as_network_input(calibration_tiles, dim=dim, in_channels=cfg["in_channels"] if cfg else 1,
                             normalize=lambda a: normalize_tiles(a, rule))
    if tiles.shape[0] == 0:
        raise InputValueError("expected at least one calibration tile, got 0")

    class _Reader(oq.CalibrationDataReader):
        def __init__(self):
            self._it = iter(range(0, tiles.shape[0], batch_size))

        def get_next(self):
            i = next(self._it, None)
            return None if i is None else {INPUT_NAME: tiles[i:i + batch_size]}

    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".quant-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        q = Path(tmp) / "q.onnx"
        onnx = require("onnx", "runtime")
        src = onnx.load(str(onnx_path))
        rewritten = Path(tmp) / "rewritten.onnx"
        rewrite_conv_transpose(src)  # int8 up-convolutions (ORT has no int8 ConvTranspose)
        onnx.save(src, str(rewritten))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # shape inference + graph cleanup first, as ONNX Runtime recommends for static QDQ
            oq.quant_pre_process(str(rewritten), str(pre), skip_symbolic_shape=True)
            exclude = _first_conv_and_inputs(onnx.load(str(pre))) if fp32_first_conv else []
            oq.quantize_static(str(pre), str(q), _Reader(), quant_format=oq.QuantFormat.QDQ,
                               activation_type=oq.QuantType.QUInt8, weight_type=oq.QuantType.QInt8,
                               per_channel=per_channel, reduce_range=reduce_range,
                               calibrate_method=oq.CalibrationMethod.MinMax, nodes_to_exclude=exclude,
                               extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
        proto = onnx.load(str(q))
        # the rule the ranges were calibrated under: a runtime that opens this file alone applies the same one
        _merge_metadata(proto, {**meta, "neuroadda_rt.precision": "int8",
                                "neuroadda_rt.normalization": json.dumps(rule, sort_keys=True)})
        _atomic.write_bytes(out_path, proto.SerializeToString())
    return out_path


# --------------------------------------------------------------------------------------------
# TensorRT engines with an on-disk cache
# --------------------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    """The package's one cache folder (:func:`neuroadda_rt._cache.cache_dir`): ``$NEUROADDA_CACHE``,
    else the platform's user cache folder."""
    return _cache.cache_dir()


def _gpu_name(device_id: int = 0) -> str:
    torch = require("torch", "torch")
    if not torch.cuda.is_available():
        raise BackendUnavailableError("TensorRT needs a CUDA GPU, but torch.cuda.is_available() is False")
    return torch.cuda.get_device_name(device_id)


def tensorrt_cache_key(onnx_sha256: str, gpu_name: str, trt_version: str, precision: str,
                       profile: dict[str, list[list[int]]]) -> str:
    """The cache key of a TensorRT engine: SHA-256 over (ONNX sha256, GPU, TensorRT version,
    precision, optimisation profile)."""
    return json_sha256({"onnx": onnx_sha256, "gpu": gpu_name, "trt": trt_version, "precision": precision,
                        "profile": profile})


def build_tensorrt_engine(onnx_path: str | os.PathLike, *, min_shape: Iterable[int], opt_shape: Iterable[int],
                          max_shape: Iterable[int], fp16: bool = False, cache_dir: str | os.PathLike | None = None,
                          workspace_bytes: int = 2 << 30) -> bytes:
    """Build (or load from the disk cache) a serialised TensorRT engine for an ONNX file.

    Parameters
    ----------
    onnx_path : path-like
        An ONNX file from :func:`export_onnx`.
    min_shape, opt_shape, max_shape : sequence of int
        The optimisation profile of the input ``"input"`` (full shapes, batch first).
    fp16 : bool
        Allow fp16 kernels (``precision="fp16"`` in the cache key).
    cache_dir : path-like, optional
        Engine cache folder (default ``cache_dir("tensorrt")``: ``$NEUROADDA_CACHE/tensorrt``).
    workspace_bytes : int
        Builder workspace memory pool limit.

    Returns
    -------
    bytes
        The serialised engine (``tensorrt.Runtime.deserialize_cuda_engine`` input).

    Notes
    -----
    The cache key is (ONNX sha256, GPU name, TensorRT version, precision, profile); a hit is
    verified against the SHA-256 recorded next to the engine. A miss or a stale/corrupt entry
    rebuilds and logs why and how long the build took.
    """
    trt = require("tensorrt", "tensorrt")
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise FormatError(f"{onnx_path}: no such ONNX file")
    profile = {"min": [int(v) for v in min_shape], "opt": [int(v) for v in opt_shape],
               "max": [int(v) for v in max_shape]}
    if not (len(profile["min"]) == len(profile["opt"]) == len(profile["max"])):
        raise ShapeError(f"expected min/opt/max shapes of equal rank, got {profile}")
    if any(not (a <= b <= c) for a, b, c in zip(profile["min"], profile["opt"], profile["max"])):
        raise ShapeError(f"expected min <= opt <= max in every axis, got {profile}")
    precision = "fp16" if fp16 else "fp32"
    gpu = _gpu_name()
    key = tensorrt_cache_key(file_sha256(onnx_path), gpu, trt.__version__, precision, profile)
    cache = Path(cache_dir) if cache_dir is not None else _cache.cache_dir("tensorrt")
    engine_path, meta_path = cache / f"{key}.engine", cache / f"{key}.json"
    reason = "no cached engine"
    if engine_path.is_file() and meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
            data = engine_path.read_bytes()
            if bytes_sha256(data) == meta.get("engine_sha256"):
                log.info("TensorRT engine cache hit: %s", engine_path)
                return data
            reason = "cached engine failed its checksum"
        except (OSError, ValueError) as exc:
            reason = f"cached engine unreadable ({exc})"
    log.warning("Building TensorRT engine for %s (%s, %s, profile %s) on %s: %s; this takes a while",
                onnx_path.name, precision, f"TensorRT {trt.__version__}", profile, gpu, reason)
    t0 = time.perf_counter()
    data = _build_engine(trt, onnx_path, profile, fp16, workspace_bytes)
    dt = time.perf_counter() - t0
    log.warning("Built TensorRT engine in %.1f s; cached at %s", dt, engine_path)
    _atomic.write_bytes(engine_path, data)
    _atomic.write_bytes(meta_path, json.dumps({
        "onnx": str(onnx_path), "gpu": gpu, "tensorrt": trt.__version__, "precision": precision,
        "profile": profile, "engine_sha256": bytes_sha256(data), "build_seconds": dt,
    }, indent=2).encode())
    return data


def _build_engine(trt, onnx_path: Path, profile: dict[str, Any], fp16: bool, workspace_bytes: int) -> bytes:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # TensorRT 10: networks are always explicit-batch; the creation flag is 0 (flag deprecated).
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise FormatError(f"{onnx_path}: TensorRT could not parse the ONNX model: {errs}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    if fp16:
        # TensorRT 10 "weak typing": let the builder pick fp16 kernels. TensorRT 11 removed the
        # flag (precision must then be in the ONNX graph itself), so say so instead of ignoring it.
        flag = getattr(trt.BuilderFlag, "FP16", None)
        if flag is None:
            raise BackendUnavailableError(f"fp16=True needs TensorRT 10.x (BuilderFlag.FP16); TensorRT "
                                          f"{trt.__version__} only builds strongly typed networks. Use fp16=False "
                                          f"or install 'tensorrt>=10,<11'")
        config.set_flag(flag)
    opt = builder.create_optimization_profile()
    inp = network.get_input(0)
    opt.set_shape(inp.name, tuple(profile["min"]), tuple(profile["opt"]), tuple(profile["max"]))
    config.add_optimization_profile(opt)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendUnavailableError(f"TensorRT failed to build an engine for {onnx_path} (see its log above)")
    return bytes(serialized)
