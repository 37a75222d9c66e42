"""The inference runtime: the ONE module that decides where and how networks execute.

:class:`FeatureExtractor` (pooled encoder features) and :class:`Predictor` (sliding-window
probabilities) both go through :func:`_make_runner`, which picks the backend
(ONNX Runtime with the TensorRT / CUDA / CPU execution providers, TensorRT itself, or PyTorch)
and the device. An explicit request that cannot be met raises
:class:`~neuroadda_rt.errors.BackendUnavailableError` listing what is available; ``"auto"``
logs its choice on the ``neuroadda_rt`` logger. Nothing falls back silently.

Every runner receives exactly the same float32 ``(N, C, *spatial)`` batch built by
:func:`_as_network_input`, and every network pads/crops inside its own graph, so all
backends compute the same function (tested to 1e-4).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .errors import BackendUnavailableError, FormatError, InputValueError, ShapeError, require

log = logging.getLogger("neuroadda_rt")

BACKENDS = ("auto", "onnxruntime", "tensorrt", "torch")
POOLINGS = ("mean", "max", "mean+std")
_DEVICES = ("auto", "cpu", "cuda")


# --------------------------------------------------------------------------------------------
# shared pre-processing (every backend sees the same array)
# --------------------------------------------------------------------------------------------
DEFAULT_NORMALIZATION = {"rule": "dtype"}


def _normalize(arr: np.ndarray, rule: dict | None, per_item: bool) -> np.ndarray:
    """Apply a model's intensity rule (:func:`neuroadda_rt.io.normalize_intensity`) -> float32.

    ``per_item``: statistics-based rules (``"percentile"``) see each tile on its own, as in
    training; the ``"dtype"`` and ``"fixed"`` rules are element-wise, so it does not matter.
    """
    rule = rule or DEFAULT_NORMALIZATION
    from .io import normalize_intensity

    if per_item and rule.get("rule") == "percentile" and arr.ndim > 0:
        return np.stack([normalize_intensity(a, rule) for a in arr]) if len(arr) else arr.astype(np.float32)
    return np.asarray(normalize_intensity(arr, rule), dtype=np.float32)


def _as_network_input(tiles, *, dim: int | None, in_channels: int = 1, rule: dict | None = None,
                      normalize: bool = True) -> np.ndarray:
    """Tiles -> contiguous float32 ``(N, C, *spatial)``, normalised by the model's intensity ``rule``
    (default ``{"rule": "dtype"}``: integers divided by their dtype range, floats clipped to [0, 1]).

    With ``normalize=False`` floats are used as given (a copy only when dtype/layout requires it).
    """
    arr = np.asarray(tiles)
    if arr.dtype == bool or arr.dtype.kind not in "uif":
        raise InputValueError(f"expected numeric tiles, got dtype {arr.dtype}")
    if arr.size and arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise InputValueError("expected finite tile values, got NaN or inf")
    if normalize:
        arr = _normalize(arr, rule, per_item=True)
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


def config_feature_level(config: dict) -> int:
    """Encoder level whose map a network config's encoder outputs (``feature_level``, else the bottleneck)."""
    level = config.get("feature_level")
    return len(config["widths"]) - 1 if level is None else int(level)


def _pool(fmap: np.ndarray, pooling: str) -> np.ndarray:
    """(N, C, *spatial) -> (N, C) or (N, 2C) float32, accumulating in float64."""
    flat = fmap.reshape(fmap.shape[0], fmap.shape[1], -1)
    if pooling == "mean":
        out = flat.mean(axis=2, dtype=np.float64)
    elif pooling == "max":
        out = flat.max(axis=2)
    else:
        out = np.concatenate([flat.mean(axis=2, dtype=np.float64), flat.std(axis=2, dtype=np.float64)], axis=1)
    return np.ascontiguousarray(out, dtype=np.float32)


# --------------------------------------------------------------------------------------------
# what the user gave us
# --------------------------------------------------------------------------------------------
class _Source:
    """A UNet, a model package (object or folder), or an exported ONNX file, normalised."""

    def __init__(self, model_or_path):
        self.net = None
        self.onnx: dict[str, Path] = {}
        self.package = None
        self.normalization: dict | None = None
        if type(model_or_path).__name__ == "ModelPackage":
            self._from_package(model_or_path)
        elif isinstance(model_or_path, (str, os.PathLike)):
            p = Path(model_or_path)
            if p.is_dir():
                from .package import load_model

                self._from_package(load_model(p))
            elif p.is_file() and p.suffix == ".onnx":
                from .export import onnx_metadata

                meta = onnx_metadata(p)
                part = meta.get("neuroadda_rt.part")
                if part not in ("encoder", "full"):
                    raise FormatError(f"{p}: expected an ONNX file written by neuroadda_rt.export_onnx "
                                      f"(metadata neuroadda_rt.part), got metadata {meta}")
                self.config = json.loads(meta["neuroadda_rt.config"])
                self.onnx[part] = p
            else:
                raise FormatError(f"{p}: expected a model package folder or an .onnx file, got "
                                  f"{'a missing path' if not p.exists() else 'an unsupported file'}")
        else:
            from .models import UNet

            if not isinstance(model_or_path, UNet):
                raise InputValueError("expected a UNet, a ModelPackage, a package folder or an .onnx path, "
                                      f"got {type(model_or_path).__name__}")
            self.net = model_or_path
            self.config = model_or_path.config

    def _from_package(self, pkg) -> None:
        self.package = pkg
        self.config = dict(pkg.config)
        self.normalization = pkg.normalization
        self.onnx = {"encoder": pkg.path / "encoder.onnx", "full": pkg.path / "model.onnx"}

    @property
    def dim(self) -> int:
        return int(self.config.get("dim", 2))

    @property
    def in_channels(self) -> int:
        return int(self.config.get("in_channels", 1))

    @property
    def multiple(self) -> int:
        return 2 ** (len(self.config["widths"]) - 1)

    @property
    def has_weights(self) -> bool:
        """Whether PyTorch weights exist (without loading them or importing torch)."""
        return self.net is not None or self.package is not None

    def torch_net(self):
        if self.net is None and self.package is not None:
            self.net = self.package.unet()
        return self.net

    def onnx_path(self, part: str) -> Path | None:
        if part in self.onnx:
            return self.onnx[part]
        if not self.has_weights:
            return None
        self.torch_net()
        self.onnx[part] = _exported(self.net, part)
        return self.onnx[part]


_EXPORTS: dict[str, Path] = {}
_EXPORT_DIR: list[str] = []


def _net_digest(net, part: str) -> str:
    import hashlib

    h = hashlib.sha256(json.dumps([net.config, part], sort_keys=True).encode())
    for k, v in net.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _exported(net, part: str) -> Path:
    """ONNX export of an in-memory UNet, memoised per process on (config, weights, part) so that a
    FeatureExtractor and a Predictor of the same network export once. Files live in a private
    temporary folder removed at interpreter exit."""
    from .export import export_onnx

    key = _net_digest(net, part)
    path = _EXPORTS.get(key)
    if path is not None and path.is_file():
        return path
    if not _EXPORT_DIR:
        _EXPORT_DIR.append(tempfile.mkdtemp(prefix="neuroadda-onnx-"))
        atexit.register(shutil.rmtree, _EXPORT_DIR[0], True)
    path = export_onnx(net, Path(_EXPORT_DIR[0]) / f"{key[:24]}-{part}.onnx", part=part)
    _EXPORTS[key] = path
    return path


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
        from .models import fold_batchnorm

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
        from .export import build_tensorrt_engine

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
    from .export import default_cache_dir

    out, missing = [], []
    for p in requested:
        name = p[0] if isinstance(p, (tuple, list)) else p
        if name not in _ort_providers():
            missing.append(name)
        elif name == "TensorrtExecutionProvider" and not isinstance(p, (tuple, list)):
            cache = default_cache_dir() / "ort-tensorrt"
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


def _make_runner(source: _Source, part: str, *, backend: str, device: str, ort_providers: list[str] | None = None,
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


def _trt_profile(source: _Source, profile: dict | None) -> dict[str, tuple[int, ...]]:
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


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    tqdm = require("tqdm", "runtime")
    return tqdm.tqdm(total=total, desc=desc, unit="tile")


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------
class FeatureExtractor:
    """Pooled encoder (bottleneck) features of tiles, on the best or the requested backend.

    Parameters
    ----------
    model_or_path : UNet, ModelPackage, str or path-like
        A network, a loaded package, a package folder, or an encoder ONNX file from
        :func:`~neuroadda_rt.export_onnx`.
    backend : {"auto", "onnxruntime", "tensorrt", "torch"}
        ``"auto"`` prefers ONNX Runtime (CUDA provider if ``onnxruntime-gpu`` is installed, else
        CPU) and logs its choice; TensorRT is used only when asked for (engine builds take minutes,
        then are cached).
    device : {"auto", "cpu", "cuda"}
        ``"cuda"`` raises :class:`~neuroadda_rt.errors.BackendUnavailableError` when the chosen
        backend cannot use a GPU.
    pooling : {"mean", "max", "mean+std"}, optional
        Per-channel pooling over the encoder's feature map (the bottleneck, or the network's
        ``feature_level``); ``"mean+std"`` gives ``2 * C`` features. Default: a package's
        reference-feature pooling, else ``"mean"``.
    ort_providers : list, optional
        Explicit ONNX Runtime providers (names or ``(name, options)`` pairs), e.g.
        ``["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]``; a bare
        ``"TensorrtExecutionProvider"`` gets an engine cache under ``$NEUROADDA_CACHE/ort-tensorrt``
        and ``fp16``. The device follows the providers.
    trt_profile : dict, optional
        TensorRT optimisation profile ``{"min": shape, "opt": shape, "max": shape}``.
    fp16 : bool
        TensorRT fp16 engine (``backend="tensorrt"`` or the ONNX Runtime TensorRT provider).
    cache_dir : path-like, optional
        TensorRT engine cache (default ``$NEUROADDA_CACHE/tensorrt``).
    threads : int, optional
        ONNX Runtime intra-op threads (default: the cores this process may use).
    normalize : bool
        Apply the model's intensity rule (a package's ``normalization``; ``{"rule": "dtype"}``
        otherwise) to every tile, as in training. ``False`` feeds floats as given.

    Examples
    --------
    >>> import numpy as np
    >>> from neuroadda_rt import FeatureExtractor
    >>> from neuroadda_rt.models import UNet
    >>> fx = FeatureExtractor(UNet(widths=(4, 8, 16)), backend="torch", device="cpu")
    >>> fx.features(np.random.rand(3, 32, 32).astype(np.float32)).shape
    (3, 16)
    """

    def __init__(self, model_or_path, *, backend: str = "auto", device: str = "auto", pooling: str | None = None,
                 ort_providers: list[str] | None = None, trt_profile: dict | None = None, fp16: bool = False,
                 cache_dir=None, threads: int | None = None, normalize: bool = True):
        if pooling is not None and pooling not in POOLINGS:
            raise InputValueError(f"expected pooling in {POOLINGS}, got {pooling!r}")
        self.normalize = bool(normalize)
        self._source = _Source(model_or_path)
        if pooling is None:  # a package's features are comparable with its reference features
            pkg = self._source.package
            pooling = pkg.pooling if pkg is not None else "mean"
        self.pooling = pooling
        self._runner = _make_runner(self._source, "encoder", backend=backend, device=device,
                                    ort_providers=ort_providers, trt_profile=trt_profile, fp16=fp16,
                                    cache_dir=cache_dir, threads=threads, who="FeatureExtractor")

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

    @property
    def n_features(self) -> int:
        """Feature dimension: channels of the feature level (the bottleneck by default), doubled for ``"mean+std"``."""
        cfg = self._source.config
        c = int(cfg["widths"][config_feature_level(cfg)])
        return 2 * c if self.pooling == "mean+std" else c

    def bottleneck(self, tiles) -> np.ndarray:
        """Raw bottleneck activations ``(N, C, *spatial / 2**(depth-1))`` of an in-memory batch."""
        x = _as_network_input(tiles, dim=self._source.dim, in_channels=self._source.in_channels,
                              rule=self._source.normalization, normalize=self.normalize)
        self._check_size(x)
        return self._runner(x)

    def _check_size(self, x: np.ndarray) -> None:
        m = self._source.multiple
        if min(x.shape[2:]) < m:
            raise ShapeError(f"expected tiles of at least {m} pixels per spatial axis (2**(depth-1), for the "
                             f"reflect padding), got {x.shape[2:]}")

    def features(self, tiles, batch_size: int = 16, *, progress: bool = False) -> np.ndarray:
        """Pooled encoder features of every tile.

        Parameters
        ----------
        tiles : array-like
            ``(N, H, W)`` / ``(N, C, H, W)`` for a 2-D model, ``(N, D, H, W)`` / ``(N, C, D, H, W)``
            for a 3-D one: a NumPy array, an h5py/zarr dataset or any lazy array that slices along
            the first axis (read ``batch_size`` tiles at a time, never all at once), normalised by
            the model's intensity rule. Never modified.
        batch_size : int
            Tiles per network call.
        progress : bool
            Show a tqdm progress bar.

        Returns
        -------
        numpy.ndarray
            ``(N, n_features)`` float32.
        """
        if int(batch_size) < 1:
            raise InputValueError(f"expected batch_size >= 1, got {batch_size}")
        batch_size = int(batch_size)
        n = _first_len(tiles)
        out = np.empty((n, self.n_features), dtype=np.float32)
        bar = _progress(n, progress, "features")
        try:
            for i in range(0, n, batch_size):
                fmap = self.bottleneck(tiles[i:i + batch_size])
                out[i:i + fmap.shape[0]] = _pool(fmap, self.pooling)
                if bar is not None:
                    bar.update(fmap.shape[0])
        finally:
            if bar is not None:
                bar.close()
        return out

    __call__ = features

    def __repr__(self) -> str:
        return (f"FeatureExtractor(backend={self.backend!r}, device={self.device!r}, pooling={self.pooling!r}, "
                f"providers={self.providers})")


def _first_len(arr) -> int:
    shape = getattr(arr, "shape", None)
    if shape is None:
        arr = np.asarray(arr)
        shape = arr.shape
    if len(shape) == 0:
        raise ShapeError(f"expected an array of tiles, got a scalar of shape {tuple(shape)}")
    return int(shape[0])


# --------------------------------------------------------------------------------------------
# sliding-window prediction
# --------------------------------------------------------------------------------------------
def _window_starts(length: int, tile: int, step: int) -> list[int]:
    """Start offsets covering ``[0, length)`` with windows of ``tile`` (the last flush with the end)."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile + 1, step))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


def blend_weights(shape: tuple[int, ...], kind: str = "cosine") -> np.ndarray:
    """Separable smooth window weights: ``"cosine"`` (Hann, offset by half a pixel so the edge
    weight stays positive), ``"gaussian"`` (sigma = size / 8, as nnU-Net), or ``"constant"``.

    Examples
    --------
    >>> from neuroadda_rt.runtime import blend_weights
    >>> w = blend_weights((4,))
    >>> bool(w[0] > 0 and w[1] > w[0])
    True
    """
    w = np.ones(shape, dtype=np.float64)
    for ax, n in enumerate(shape):
        t = np.arange(n, dtype=np.float64)
        if kind == "cosine":
            v = 0.5 - 0.5 * np.cos(2 * np.pi * (t + 0.5) / n)
        elif kind == "gaussian":
            v = np.exp(-0.5 * ((t - (n - 1) / 2) / max(n / 8, 1e-6)) ** 2)
        elif kind == "constant":
            v = np.ones(n)
        else:
            raise InputValueError(f"expected blend 'cosine', 'gaussian' or 'constant', got {kind!r}")
        v = np.maximum(v / v.max(), 1e-3)  # never zero: every pixel keeps a defined average
        w *= v.reshape([-1 if i == ax else 1 for i in range(len(shape))])
    return w.astype(np.float32)


def _as_probabilities(out: np.ndarray) -> np.ndarray:
    """float32 probabilities clipped in place to [0, 1]: a float32 sigmoid (ONNX Runtime) and the
    window blending can round to 1 + 1 ulp, which downstream range checks rightly refuse."""
    out = out.astype(np.float32, copy=False)
    np.clip(out, 0.0, 1.0, out=out)
    return out


class Predictor:
    """Probabilities for a whole 2-D image or 3-D volume by overlapping, smoothly blended windows.

    Parameters
    ----------
    model_or_path : UNet, ModelPackage, str or path-like
        A network, a loaded package, a package folder, or a full-model ONNX file
        (``part="full"``) from :func:`~neuroadda_rt.export_onnx`.
    backend, device, ort_providers, trt_profile, fp16, cache_dir, threads
        As for :class:`FeatureExtractor` (the same decision code).
    tile : int or tuple of int, optional
        Window size per spatial axis (default 256 in 2-D, ``(32, 128, 128)`` in 3-D). Axes
        shorter than the window use a window of their full length.
    overlap : float
        Fraction of the window shared with its neighbour, in ``[0, 1)`` (default 0.25).
    batch_size : int
        Windows per network call.
    blend : {"cosine", "gaussian", "constant"}
        Weights of the weighted average where windows overlap (see :func:`blend_weights`).
    normalize : bool
        Apply the model's intensity rule. Statistics-based rules (``"percentile"``) are computed on
        the whole 2-D image, on each slice when a 2-D model runs over a volume, or on the whole
        volume for a 3-D model, then applied to every window identically.

    Examples
    --------
    >>> import numpy as np
    >>> from neuroadda_rt import Predictor
    >>> from neuroadda_rt.models import UNet
    >>> pr = Predictor(UNet(widths=(4, 8)), backend="torch", device="cpu", tile=32)
    >>> pr.predict(np.random.rand(50, 70).astype(np.float32)).shape
    (1, 50, 70)
    """

    def __init__(self, model_or_path, *, backend: str = "auto", device: str = "auto", tile=None,
                 overlap: float = 0.25, batch_size: int = 8, blend: str = "cosine",
                 ort_providers: list[str] | None = None, trt_profile: dict | None = None, fp16: bool = False,
                 cache_dir=None, threads: int | None = None, normalize: bool = True):
        if not 0.0 <= float(overlap) < 1.0:
            raise InputValueError(f"expected 0 <= overlap < 1, got {overlap}")
        if int(batch_size) < 1:
            raise InputValueError(f"expected batch_size >= 1, got {batch_size}")
        blend_weights((2,), blend)  # validates the name
        self._source = _Source(model_or_path)
        dim = self._source.dim
        if tile is None:
            tile = (256, 256) if dim == 2 else (32, 128, 128)
        tile = (int(tile),) * dim if np.isscalar(tile) else tuple(int(t) for t in tile)
        if len(tile) != dim or min(tile) < self._source.multiple:
            raise InputValueError(f"expected {dim} window sizes >= {self._source.multiple} (2**(depth-1)), "
                                  f"got {tile}")
        self.tile, self.overlap, self.batch_size, self.blend = tile, float(overlap), int(batch_size), blend
        self.normalize = bool(normalize)
        self._runner = _make_runner(self._source, "full", backend=backend, device=device,
                                    ort_providers=ort_providers, trt_profile=trt_profile, fp16=fp16,
                                    cache_dir=cache_dir, threads=threads, who="Predictor")
        self._weights: dict[tuple[int, ...], np.ndarray] = {}

    backend = FeatureExtractor.backend
    device = FeatureExtractor.device
    providers = FeatureExtractor.providers

    @property
    def out_channels(self) -> int:
        """1 for boundary models, 2 (2-D) or 3 (3-D) for affinity models."""
        # same rule as models.HEAD_CHANNELS, without importing torch
        return 1 if self._source.config.get("head", "boundary") == "boundary" else self._source.dim

    def predict_tiles(self, tiles, batch_size: int | None = None) -> np.ndarray:
        """Network outputs for a batch of tiles, ``(N, C_out, *spatial)`` float32 (no blending).

        ``tiles`` as for :meth:`FeatureExtractor.features` (read in batches, never modified).
        """
        bs = int(batch_size or self.batch_size)
        n = _first_len(tiles)
        outs = []
        for i in range(0, n, bs):
            x = _as_network_input(tiles[i:i + bs], dim=self._source.dim, in_channels=self._source.in_channels,
                                  rule=self._source.normalization, normalize=self.normalize)
            if min(x.shape[2:]) < self._source.multiple:
                raise ShapeError(f"expected tiles of at least {self._source.multiple} pixels per axis, "
                                 f"got {x.shape[2:]}")
            outs.append(self._runner(x))
        if not outs:
            return np.empty((0, self.out_channels), np.float32)
        return _as_probabilities(np.concatenate(outs))

    def predict(self, image, *, progress: bool = False) -> np.ndarray:
        """Blended probabilities for a whole image or volume.

        Parameters
        ----------
        image : array-like
            2-D model: ``(H, W)`` image or ``(D, H, W)`` volume (predicted slice by slice);
            3-D model: ``(D, H, W)`` volume. Models with several input channels take a leading
            channel axis. NumPy arrays, h5py/zarr datasets or lazy volumes: only the windows
            (or slices) are read. Never modified.
        progress : bool
            Show a tqdm progress bar over windows.

        Returns
        -------
        numpy.ndarray
            ``(C_out, *spatial)`` float32 probabilities, spatial shape equal to the input's.
        """
        shape = tuple(int(s) for s in getattr(image, "shape", np.shape(image)))
        c_in, dim = self._source.in_channels, self._source.dim
        spatial = shape[1:] if c_in > 1 else shape
        if c_in > 1 and (len(shape) < 1 or shape[0] != c_in):
            raise ShapeError(f"expected a leading axis of {c_in} channels, got shape {shape}")
        if len(spatial) not in ((2, 3) if dim == 2 else (3,)):
            raise ShapeError(f"expected a {'2-D image or 3-D volume' if dim == 2 else '3-D volume'} for a "
                             f"{dim}-D model, got spatial shape {spatial}")
        if min(spatial) < 1:
            raise ShapeError(f"expected a non-empty image, got shape {shape}")
        out = np.empty((self.out_channels, *spatial), dtype=np.float32)
        if dim == 2 and len(spatial) == 3:
            per_slice = self._n_windows(spatial[1:])
            bar = _progress(per_slice * spatial[0], progress, "predict")
            try:
                for z in range(spatial[0]):
                    sl = np.asarray(image[:, z] if c_in > 1 else image[z])
                    out[:, z] = self._predict_array(sl if c_in > 1 else sl, spatial[1:], bar)
            finally:
                if bar is not None:
                    bar.close()
            return _as_probabilities(out)
        bar = _progress(self._n_windows(spatial), progress, "predict")
        try:
            out[...] = self._predict_array(image, spatial, bar)
        finally:
            if bar is not None:
                bar.close()
        return _as_probabilities(out)

    # -- internals -------------------------------------------------------------------------
    def _steps(self, spatial) -> list[list[int]]:
        tiles = [min(t, s) for t, s in zip(self.tile, spatial)]
        return [_window_starts(s, t, max(1, int(round(t * (1 - self.overlap))))) for s, t in zip(spatial, tiles)]

    def _n_windows(self, spatial) -> int:
        return int(np.prod([len(s) for s in self._steps(spatial)]))

    def _rule_for(self, image, c_in: int) -> dict | None:
        rule = self._source.normalization or DEFAULT_NORMALIZATION
        if not self.normalize or rule.get("rule") != "percentile":
            return rule
        a = np.asarray(image)
        lo, hi = (float(v) for v in np.percentile(a, [rule["low"], rule["high"]]))
        return {"rule": "fixed", "low": lo, "high": hi} if hi > lo else {"rule": "fixed", "low": lo, "high": lo + 1}

    def _predict_array(self, image, spatial, bar) -> np.ndarray:
        c_in, m = self._source.in_channels, self._source.multiple
        # axes shorter than 2**(depth-1) cannot be reflect-padded inside the graph: pad here
        # (symmetric, any amount) and crop back
        if min(spatial) < m:
            a = np.asarray(image)
            pads = [(0, max(0, m - s)) for s in spatial]
            a = np.pad(a, ([(0, 0)] if c_in > 1 else []) + pads, mode="symmetric")
            big = self._predict_array(a, tuple(s + p[1] for s, p in zip(spatial, pads)), bar)
            return big[(slice(None),) + tuple(slice(0, s) for s in spatial)]
        rule = self._rule_for(image, c_in)
        starts = self._steps(spatial)
        win = tuple(min(t, s) for t, s in zip(self.tile, spatial))
        w = self._weights.get(win)
        if w is None:
            w = self._weights[win] = blend_weights(win, self.blend)
        acc = np.zeros((self.out_channels, *spatial), dtype=np.float32)
        wsum = np.zeros(spatial, dtype=np.float32)
        import itertools

        corners = list(itertools.product(*starts))
        for i in range(0, len(corners), self.batch_size):
            chunk = corners[i:i + self.batch_size]
            sls = [tuple(slice(c, c + t) for c, t in zip(corner, win)) for corner in chunk]
            batch = np.stack([np.asarray(image[((slice(None),) if c_in > 1 else ()) + s]) for s in sls])
            x = _as_network_input(batch, dim=self._source.dim, in_channels=c_in, rule=rule,
                                  normalize=self.normalize)
            probs = self._runner(x)
            for s, p in zip(sls, probs):
                acc[(slice(None),) + s] += p * w
                wsum[s] += w
            if bar is not None:
                bar.update(len(chunk))
        acc /= wsum
        return acc
