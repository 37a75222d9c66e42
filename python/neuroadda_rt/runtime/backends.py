"""Where and how networks execute: one runner per backend, and THE backend decision.

:func:`make_runner` is the only place that picks the backend (ONNX Runtime with the TensorRT /
CUDA / CPU execution providers, TensorRT itself, or PyTorch) and the device, for
:class:`~neuroadda_rt.FeatureExtractor` and :class:`~neuroadda_rt.Predictor` alike. An explicit
request that cannot be met raises :class:`~neuroadda_rt.errors.BackendUnavailableError` listing
what is available; ``"auto"`` logs its choice on the ``neuroadda_rt`` logger. Nothing falls
back silently.

Every runner takes the same float32 ``(N, C, *spatial)`` batch
(:func:`~neuroadda_rt.runtime.source.network_batch`) and returns a float32 array; every
network pads/crops inside its own graph, so all backends compute the same function (tested to
1e-4). A new backend is a runner class here plus a branch in :func:`make_runner`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from .. import _cache
from ..errors import BackendUnavailableError, InputValueError, ShapeError, require
from ..export import build_tensorrt_engine
from .source import ModelSource

log = logging.getLogger("neuroadda_rt")

BACKENDS = ("auto", "onnxruntime", "tensorrt", "torch")
_DEVICES = ("auto", "cpu", "cuda")


# --------------------------------------------------------------------------------------------
# runners: one per backend, same contract: float32 (N, C, *spatial) -> float32 ndarray
# --------------------------------------------------------------------------------------------
def _cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


class _OrtRunner:
    backend = "onnxruntime"

    def __init__(self, path: Path, providers: list[str], device: str, threads: int | None = None):
        ort = require("onnxruntime", "cpu")
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = int(threads or _cores())
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), sess_options=so, providers=providers)
        self.providers = self.session.get_providers()
        self.device = device
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.device == "cuda":
            # IO binding: the output stays on the GPU until the single copy back
            b = self.session.io_binding()
            b.bind_cpu_input(self.input_name, x)
            b.bind_output(self.output_name, "cuda")
            self.session.run_with_iobinding(b)
            return b.copy_outputs_to_cpu()[0]
        return self.session.run([self.output_name], {self.input_name: x})[0]


class _TorchRunner:
    backend = "torch"
    providers: list[str] = []

    def __init__(self, net, part: str, device: str):
        from ..models import fold_batchnorm  # needs torch, as this runner does

        torch = require("torch", "torch")
        self.torch = torch
        self.device = device
        self.net = fold_batchnorm(net).to(device)
        self.fn = self.net.encode if part == "encoder" else self.net.forward
        self.memory_format = torch.channels_last if net.dim == 2 else torch.channels_last_3d
        self.net = self.net.to(memory_format=self.memory_format)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        torch = self.torch
        if self.device != "cuda":
            with torch.inference_mode():
                return self.fn(torch.from_numpy(x).contiguous(memory_format=self.memory_format)).numpy()
        # cuDNN would run fp32 convolutions in TF32 (10-bit mantissa, ~1e-3 error): keep them IEEE
        # fp32 so every backend gives the same features (parity <= 1e-4), restoring the flag after
        cudnn = torch.backends.cudnn
        old = cudnn.allow_tf32
        try:
            cudnn.allow_tf32 = False
            with torch.inference_mode():
                t = torch.from_numpy(x).to(self.device).contiguous(memory_format=self.memory_format)
                return self.fn(t).float().cpu().numpy()
        finally:
            cudnn.allow_tf32 = old


class _TensorRTRunner:
    backend = "tensorrt"

    def __init__(self, onnx_path: Path, profile: dict[str, tuple[int, ...]], fp16: bool,
                 cache_dir: str | os.PathLike | None):
        trt = require("tensorrt", "tensorrt")
        torch = require("torch", "torch")  # CUDA buffers and the stream come from torch
        self.torch, self.trt = torch, trt
        data = build_tensorrt_engine(onnx_path, min_shape=profile["min"], opt_shape=profile["opt"],
                                     max_shape=profile["max"], fp16=fp16, cache_dir=cache_dir)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self._logger)
        self.engine = self.runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise BackendUnavailableError("TensorRT could not deserialise the engine (version mismatch?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        self.profile = profile
        self.stream = torch.cuda.Stream()
        self.providers = [f"TensorRT {trt.__version__}{' fp16' if fp16 else ''}"]
        self.device = "cuda"

    def __call__(self, x: np.ndarray) -> np.ndarray:
        torch = self.torch
        lo, hi = self.profile["min"], self.profile["max"]
        if len(x.shape) != len(lo) or any(not (a <= s <= b) for a, s, b in zip(lo, x.shape, hi)):
            raise ShapeError(f"expected an input shape between {tuple(lo)} and {tuple(hi)} (the TensorRT "
                             f"optimisation profile; pass trt_profile= to widen it), got {x.shape}")
        if not self.context.set_input_shape(self.input_name, tuple(int(s) for s in x.shape)):
            raise ShapeError(f"TensorRT rejected input shape {x.shape}")
        out_shape = tuple(int(s) for s in self.context.get_tensor_shape(self.output_name))
        # a private stream: enqueueV3 on the legacy default stream forces extra synchronisation
        with torch.cuda.stream(self.stream):
            xin = torch.from_numpy(x).to("cuda", non_blocking=True)
            out = torch.empty(out_shape, dtype=torch.float32, device="cuda")
            self.context.set_tensor_address(self.input_name, int(xin.data_ptr()))
            self.context.set_tensor_address(self.output_name, int(out.data_ptr()))
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise BackendUnavailableError("TensorRT execute_async_v3 failed (see its log)")
            host = out.to("cpu", non_blocking=False)
        self.stream.synchronize()
        return host.numpy()


# --------------------------------------------------------------------------------------------
# the decision
# --------------------------------------------------------------------------------------------
_GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


def _explicit_providers(requested, fp16: bool) -> list:
    """Check user-named ONNX Runtime providers (names or ``(name, options)``); give the TensorRT
    provider an engine cache and the fp16 choice unless options were passed."""
    out, missing = [], []
    for p in requested:
        name = p[0] if isinstance(p, (tuple, list)) else p
        if name not in _ort_providers():
            missing.append(name)
        elif name == "TensorrtExecutionProvider" and not isinstance(p, (tuple, list)):
            cache = _cache.cache_dir("ort-tensorrt")
            cache.mkdir(parents=True, exist_ok=True)
            out.append((name, {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
                               "trt_fp16_enable": bool(fp16)}))
        else:
            out.append(tuple(p) if isinstance(p, (tuple, list)) else p)
    if missing:
        raise BackendUnavailableError(f"ONNX Runtime providers {missing} are not available; "
                                      f"available: {_ort_providers()}")
    return out


def _ort_providers() -> list[str]:
    try:
        import onnxruntime as ort
    except ImportError:
        return []
    return list(ort.get_available_providers())


def _torch_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def _tensorrt_version() -> str | None:
    try:
        import tensorrt as trt
    except ImportError:
        return None
    return str(trt.__version__)


def available_backends() -> dict[str, list[str]]:
    """What can run here: backend -> the devices (or providers) it can use.

    Examples
    --------
    >>> from neuroadda_rt.runtime import available_backends
    >>> "cpu" in available_backends().get("onnxruntime", ["cpu"])
    True
    """
    out: dict[str, list[str]] = {}
    prov = _ort_providers()
    if prov:
        out["onnxruntime"] = ["cpu"] + (["cuda"] if "CUDAExecutionProvider" in prov else []) + \
            (["tensorrt-ep"] if "TensorrtExecutionProvider" in prov else [])
    try:
        import torch  # noqa: F401  (only whether it imports)

        out["torch"] = ["cpu"] + (["cuda"] if _torch_cuda() else [])
    except ImportError:
        pass
    if _tensorrt_version() is not None and _torch_cuda():
        out["tensorrt"] = ["cuda"]
    return out


def _describe_available() -> str:
    av = available_backends()
    return ", ".join(f"{b} ({'/'.join(d)})" for b, d in av.items()) or "nothing (install neuroadda_rt[cpu] or [gpu])"


def make_runner(source: ModelSource, part: str, *, backend: str, device: str, ort_providers: list[str] | None = None,
                 trt_profile: dict | None = None, fp16: bool = False, cache_dir=None, threads: int | None = None,
                 who: str = "runtime"):
    """Decide backend + device once and build the runner. The only place that does so."""
    if backend not in BACKENDS:
        raise InputValueError(f"expected backend in {BACKENDS}, got {backend!r}")
    if not isinstance(device, str) or device.lower() not in _DEVICES:
        raise InputValueError(f"expected device in {_DEVICES}, got {device!r}")
    device = device.lower()
    av = available_backends()
    has_onnx = part in source.onnx or source.has_weights
    has_net = source.has_weights

    if device == "cuda" and not any("cuda" in d for d in av.values()):
        raise BackendUnavailableError(f"device='cuda' requested but no backend can use a GPU here; "
                                      f"available: {_describe_available()}")
    if backend == "tensorrt" and device == "cpu":
        raise InputValueError("backend='tensorrt' runs on the GPU only; got device='cpu'")

    chosen, reason = backend, "requested"
    if backend == "auto":
        gpu_ok = device in ("auto", "cuda")
        if gpu_ok and "cuda" in av.get("onnxruntime", []) and has_onnx:
            chosen, device, reason = "onnxruntime", "cuda", "ONNX Runtime with CUDA available"
        elif gpu_ok and "cuda" in av.get("torch", []) and has_net:
            chosen, device, reason = "torch", "cuda", "PyTorch CUDA available (no onnxruntime-gpu)"
        elif device == "cuda":
            raise BackendUnavailableError(f"device='cuda' requested but no GPU backend can run this model "
                                          f"(ONNX only needs onnxruntime-gpu); available: {_describe_available()}")
        elif "onnxruntime" in av and has_onnx:
            chosen, device, reason = "onnxruntime", "cpu", "ONNX Runtime on CPU (fastest CPU path)"
        elif "torch" in av and has_net:
            chosen, device, reason = "torch", "cpu", "onnxruntime not installed"
        else:
            raise BackendUnavailableError(f"no backend can run this model; available: {_describe_available()}")

    if chosen == "onnxruntime":
        if "onnxruntime" not in av:
            raise BackendUnavailableError(f"backend='onnxruntime' requested but onnxruntime is not installed "
                                          f"(pip install 'neuroadda_rt[cpu]' or '[gpu]'); available: "
                                          f"{_describe_available()}")
        if device == "auto":
            device = "cuda" if "cuda" in av["onnxruntime"] else "cpu"
        if device == "cuda" and "cuda" not in av["onnxruntime"]:
            raise BackendUnavailableError(f"backend='onnxruntime' on device='cuda' needs onnxruntime-gpu "
                                          f"(CUDAExecutionProvider); providers here: {_ort_providers()}; "
                                          f"available: {_describe_available()}")
        path = source.onnx_path(part)
        if path is None:
            raise BackendUnavailableError(f"no ONNX file for part {part!r} and no network to export it from")
        if ort_providers is not None:
            providers = _explicit_providers(ort_providers, fp16)
            names = [p[0] if isinstance(p, tuple) else p for p in providers]
            gpu = any(n in _GPU_PROVIDERS for n in names)
            if device == "cuda" and not gpu:
                raise InputValueError(f"device='cuda' but ort_providers {names} holds no GPU provider")
            device = "cuda" if gpu else "cpu"
        elif device == "cuda":
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        runner = _OrtRunner(path, providers, device, threads)
        if device == "cuda" and "CUDAExecutionProvider" not in runner.providers and \
                "TensorrtExecutionProvider" not in runner.providers:
            raise BackendUnavailableError(f"ONNX Runtime could not start a GPU provider (session providers "
                                          f"{runner.providers}); check CUDA/cuDNN libraries")
    elif chosen == "torch":
        if "torch" not in av:
            raise BackendUnavailableError(f"backend='torch' requested but PyTorch is not installed; available: "
                                          f"{_describe_available()}")
        if not has_net:
            raise BackendUnavailableError("backend='torch' needs the network weights (a UNet or a model package), "
                                          "got an ONNX file only")
        if device == "auto":
            device = "cuda" if "cuda" in av["torch"] else "cpu"
        if device == "cuda" and "cuda" not in av["torch"]:
            raise BackendUnavailableError(f"backend='torch' on device='cuda' but torch.cuda.is_available() is "
                                          f"False; available: {_describe_available()}")
        runner = _TorchRunner(source.torch_net(), part, device)
    else:  # tensorrt
        if "tensorrt" not in av:
            why = "the tensorrt package is not installed" if _tensorrt_version() is None else "no CUDA GPU is visible"
            raise BackendUnavailableError(f"backend='tensorrt' requested but {why}; available: "
                                          f"{_describe_available()}")
        path = source.onnx_path(part)
        if path is None:
            raise BackendUnavailableError(f"no ONNX file for part {part!r} to build a TensorRT engine from")
        device = "cuda"
        runner = _TensorRTRunner(path, _trt_profile(source, trt_profile), fp16, cache_dir)
    log.info("%s (%s): backend=%s device=%s providers=%s (%s)", who, part, runner.backend, device,
             runner.providers, reason)
    return runner


def _trt_profile(source: ModelSource, profile: dict | None) -> dict[str, tuple[int, ...]]:
    c, m = source.in_channels, source.multiple
    if profile is None:
        if source.dim == 2:
            profile = {"min": (1, c, m, m), "opt": (16, c, 256, 256), "max": (64, c, 1024, 1024)}
        else:
            profile = {"min": (1, c, m, m, m), "opt": (2, c, 32, 128, 128), "max": (8, c, 64, 256, 256)}
    try:
        return {k: tuple(int(v) for v in profile[k]) for k in ("min", "opt", "max")}
    except (KeyError, TypeError) as exc:
        raise InputValueError(f"expected trt_profile={{'min': shape, 'opt': shape, 'max': shape}}, got {profile}") \
            from exc


class RunnerInfo:
    """What runs a model: ``backend``, ``device`` and ``providers`` of the runner in ``self._runner``."""

    _runner: _OrtRunner | _TorchRunner | _TensorRTRunner

    @property
    def backend(self) -> str:
        """The backend in use: ``"onnxruntime"``, ``"tensorrt"`` or ``"torch"``."""
        return self._runner.backend

    @property
    def device(self) -> str:
        """``"cpu"`` or ``"cuda"``."""
        return self._runner.device

    @property
    def providers(self) -> list[str]:
        """ONNX Runtime session providers (or the TensorRT version); empty for torch."""
        return list(self._runner.providers)
