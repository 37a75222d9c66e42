"""Where the int8 UNet's time goes on the CPU (issue 18): ONNX Runtime per-operator profile and
alternating timings of one batch of 4 × 256² windows (what ``predict_volume`` runs per call), for

* ``fp32``: the exported model (``export_onnx``);
* ``int8_plain``: static QDQ int8 of that file as quantised before 2026-12-02 (ConvTranspose left as
  is, so it runs fp32 between dequantise / quantise nodes; every Conv int8);
* ``int8``: ``quantize_int8(..., fp32_first_conv=True)`` as ``predict_volume`` now calls it
  (up-convolutions rewritten as 1×1 Conv + depth-to-space and quantised; first conv fp32);
* ``int8_u8u8``: the same with uint8 weights (ONNX Runtime's other x86 kernel family), to see
  whether it beats u8s8 on a CPU without VNNI.

Default UNet (16-32-64-128, BatchNorm statistics from the data), intra-op threads 2, all graph
optimisations, sequential execution.

    python benchmarks/int8_profile.py [--repeats 15] [--json out.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnxruntime import quantization as oq

import neuroadda_rt
from neuroadda_rt.models import UNet, batchnorm_statistics_from
from neuroadda_rt.study.synthetic import make_domain


def _session(path, threads, profile_prefix=None):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = str(profile_prefix)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _plain_int8(src, dst, cal, weight_type=oq.QuantType.QInt8, reduce_range=True):
    """Static QDQ int8 with quantize_int8's settings, without its graph rewrite."""

    class Reader(oq.CalibrationDataReader):
        def __init__(self):
            self._it = iter(range(0, len(cal), 8))

        def get_next(self):
            i = next(self._it, None)
            return None if i is None else {"input": cal[i:i + 8]}

    pre = str(dst) + ".pre.onnx"
    oq.quant_pre_process(str(src), pre, skip_symbolic_shape=True)
    oq.quantize_static(pre, str(dst), Reader(), quant_format=oq.QuantFormat.QDQ,
                       activation_type=oq.QuantType.QUInt8, weight_type=weight_type, per_channel=True,
                       reduce_range=reduce_range, calibrate_method=oq.CalibrationMethod.MinMax,
                       extra_options={"ActivationSymmetric": False,
                                      "WeightSymmetric": weight_type == oq.QuantType.QInt8})
    return dst


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    vol = np.stack([make_domain(None, (512, 512), seed=10 + z)[0] for z in range(4)]).astype(np.uint8)
    net = batchnorm_statistics_from(UNet(), vol[:2, None].astype(np.float32) / 255)
    tiles = np.concatenate([vol[:, i:i + 256, j:j + 256] for i in (0, 256) for j in (0, 256)])  # 16 tiles
    cal, x = tiles[:12], np.ascontiguousarray(tiles[12:, None].astype(np.float32) / 255)
    cal_f = np.ascontiguousarray(cal[:, None].astype(np.float32) / 255)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        fp32 = neuroadda_rt.export_onnx(net, d / "model.onnx", part="full")
        files = {"fp32": fp32, "int8_plain": _plain_int8(fp32, d / "plain.onnx", cal_f),
                 "int8": neuroadda_rt.quantize_int8(fp32, cal, d / "int8.onnx", fp32_first_conv=True)}
        m = __import__("onnx").load(str(fp32))
        neuroadda_rt.export.rewrite_conv_transpose(m)
        __import__("onnx").save(m, str(d / "rewritten.onnx"))
        files["int8_u8u8"] = _plain_int8(d / "rewritten.onnx", d / "u8u8.onnx", cal_f, oq.QuantType.QUInt8, False)
        sessions = {k: _session(v, args.threads) for k, v in files.items()}
        ref = sessions["fp32"].run(None, {"input": x})[0]
        res: dict = {"load_before": os.getloadavg(), "variants": {}}
        for k, s in sessions.items():
            p = s.run(None, {"input": x})[0]
            res["variants"][k] = {"mean_abs_diff": float(np.abs(p - ref).mean()),
                                  "max_abs_diff": float(np.abs(p - ref).max()), "ms": []}
        for i in range(args.repeats):  # alternate, so a load change hits every variant
            order = list(sessions) if i % 2 == 0 else list(reversed(sessions))
            for k in order:
                t0 = time.perf_counter()
                sessions[k].run(None, {"input": x})
                res["variants"][k]["ms"].append((time.perf_counter() - t0) * 1e3)
        base = np.array(res["variants"]["fp32"]["ms"])
        for _k, v in res["variants"].items():
            ms = np.array(v["ms"])
            v["median_ms"] = float(np.median(ms))
            v["min_ms"], v["max_ms"] = float(ms.min()), float(ms.max())
            ratio = base / ms  # per alternating round
            v["fp32_over_this_median"] = float(np.median(ratio))
            v["fp32_over_this_range"] = [float(ratio.min()), float(ratio.max())]
        res["load_after"] = os.getloadavg()
        # per-operator profile (3 runs each, after a warm-up)
        res["profile_ms_per_run"] = {}
        for k in ("fp32", "int8_plain", "int8"):
            s = _session(files[k], args.threads, d / f"prof_{k}")
            s.run(None, {"input": x})
            for _ in range(3):
                s.run(None, {"input": x})
            ev = json.loads(Path(s.end_profiling()).read_text())
            agg = collections.defaultdict(float)
            for e in ev:
                if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                    agg[e["args"]["op_name"]] += e["dur"] / 4e3  # us over 4 runs -> ms per run
            res["profile_ms_per_run"][k] = {op: round(v, 1) for op, v in sorted(agg.items(), key=lambda t: -t[1])
                                            if v >= 0.5}
    for k, v in res["variants"].items():
        v.pop("ms")
    text = json.dumps(res, indent=1)
    if args.json:
        Path(args.json).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
