"""Pooled encoder features of tiles: :class:`FeatureExtractor`."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from .. import __version__, _cache
from .._digest import arrays_sha256, file_sha256
from ..errors import InputValueError, ShapeError
from ..export import onnx_metadata, quantize_int8
from .backends import RunnerInfo, make_runner
from .source import (
    DEFAULT_NORMALIZATION,
    POOLINGS,
    ModelSource,
    as_model_source,
    first_len,
    network_batch,
    progress_bar,
)

__all__ = ["POOLINGS", "PRECISIONS", "FeatureExtractor", "config_feature_level"]

PRECISIONS = ("fp32", "int8")
# a few dozen tiles calibrate activation ranges (MinMax); more only costs time
MAX_CALIBRATION_TILES = 64


def config_feature_level(config: dict) -> int:
    """Encoder level whose map a network config's encoder outputs (``feature_level``, else the bottleneck)."""
    level = config.get("feature_level")
    return len(config["widths"]) - 1 if level is None else int(level)


def _int8_encoder_source(source: ModelSource, calibration_tiles) -> ModelSource:
    """``source`` with its encoder replaced by a static int8 copy calibrated on ``calibration_tiles``.

    The quantised file is cached under ``$NEUROADDA_CACHE/int8``, keyed by the fp32 encoder's bytes,
    the intensity rule and the calibration tiles, so a resumed run reuses it instead of quantising
    again. The copy keeps the source's intensity rule, pooling and config (the int8 file records the
    rule, not the pooling).
    """
    fp32 = source.onnx_path("encoder")
    if fp32 is None:
        raise InputValueError("precision='int8' needs an encoder ONNX file or weights to export one; the model has "
                              "neither")
    if onnx_metadata(fp32).get("neuroadda_rt.precision") == "int8":
        raise InputValueError(f"{fp32}: the encoder is already int8; pass precision='fp32' to run it as it is")
    tiles = np.asarray(calibration_tiles)
    if tiles.ndim < 3 or tiles.shape[0] == 0:
        raise InputValueError(f"expected calibration_tiles of shape (N >= 1, [C,] H, W), got {tiles.shape}")
    if tiles.shape[0] > MAX_CALIBRATION_TILES:  # evenly spaced: the reference's sections in order
        tiles = tiles[np.linspace(0, tiles.shape[0] - 1, MAX_CALIBRATION_TILES).round().astype(int)]
    rule = source.normalization or DEFAULT_NORMALIZATION
    key = arrays_sha256(tiles, header=[file_sha256(fp32), rule, "fp32_first_conv", __version__])[:24]
    out = _cache.cache_dir("int8") / f"{key}-encoder.int8.onnx"
    if not out.is_file():
        quantize_int8(fp32, tiles, out, normalization=rule, fp32_first_conv=True)
    # no weights: the int8 file is the only thing that runs (on ONNX Runtime)
    return replace(source, onnx={"encoder": Path(out)}, network=None, weights=None)


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


class FeatureExtractor(RunnerInfo):
    """Pooled encoder (bottleneck) features of tiles, on the best or the requested backend.

    Callers pass *raw* tiles (as read from the volume): the extractor applies the model's
    intensity rule itself, exactly once. Normalising beforehand would apply it twice.

    Parameters
    ----------
    model_or_path : UNet, ModelPackage, ModelSource, str or path-like
        A network, a loaded package (or anything with a ``model_source()`` method), a package
        folder, or an encoder ONNX file from :func:`~neuroadda_rt.export_onnx`.
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
        otherwise) to every raw tile, as in training. ``False`` feeds floats as given.
    precision : {"fp32", "int8"}
        ``"int8"`` quantises the encoder statically (QDQ, weights per channel, first convolution
        kept fp32, as :func:`~neuroadda_rt.predict_volume` does) and runs it on ONNX Runtime's
        CPU provider, keeping the model's intensity rule and pooling. Faster where the CPU has
        fast int8 convolutions (VNNI) and the network is wide: the default UNet's encoder ran
        about 1.4x faster on an AVX2 CPU, a bundled package's 8-64-channel encoder 1.3x slower
        (measure before choosing). Features move by a few per cent, so int8 features are compared with int8 features
        (a :class:`~neuroadda_rt.QCMonitor` embeds its reference and its stream with the same
        extractor), not with a package's fp32 reference features.
    calibration_tiles : array-like, optional
        Raw tiles that calibrate the int8 activation ranges (required for ``"int8"``): tiles of
        the data the extractor will see, e.g. a QC reference. At most
        :data:`MAX_CALIBRATION_TILES`, evenly spaced, are used.

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
                 cache_dir=None, threads: int | None = None, normalize: bool = True, precision: str = "fp32",
                 calibration_tiles=None):
        if pooling is not None and pooling not in POOLINGS:
            raise InputValueError(f"expected pooling in {POOLINGS}, got {pooling!r}")
        if precision not in PRECISIONS:
            raise InputValueError(f"expected precision in {PRECISIONS}, got {precision!r}")
        self.normalize = bool(normalize)
        self.precision = precision
        self._source = as_model_source(model_or_path)
        if precision == "int8":
            if backend not in ("auto", "onnxruntime") or str(device).lower() == "cuda" or ort_providers:
                raise InputValueError(f"precision='int8' runs on ONNX Runtime's CPU provider (static QDQ), got "
                                      f"backend={backend!r}, device={device!r}"
                                      + (f", ort_providers={ort_providers!r}" if ort_providers else ""))
            if calibration_tiles is None:
                raise InputValueError("precision='int8' needs calibration_tiles: raw tiles of the data to embed "
                                      "(e.g. the QC reference), got None")
            self._source = _int8_encoder_source(self._source, calibration_tiles)
            backend, device = "onnxruntime", "cpu"
        # a package's features are comparable with its reference features
        self.pooling = pooling or self._source.pooling or "mean"
        self._runner = make_runner(self._source, "encoder", backend=backend, device=device,
                                   ort_providers=ort_providers, trt_profile=trt_profile, fp16=fp16,
                                   cache_dir=cache_dir, threads=threads, who="FeatureExtractor")
        # an encoder whose (static) output width is not the config's is refused before any tile runs
        session = getattr(self._runner, "session", None)
        if session is not None:
            shape = session.get_outputs()[0].shape
            if len(shape) >= 2 and isinstance(shape[1], int):
                self._check_width(int(shape[1]), "its ONNX output declares")

    @property
    def _channels(self) -> int:
        """Channels of the encoder's feature map that the config (and a package's reference features) expect."""
        cfg = self._source.config
        return int(cfg["widths"][config_feature_level(cfg)])

    def _check_width(self, got: int, how: str) -> None:
        want = self._channels
        if got != want:
            ref = self._source.reference_width
            ref_note = f" (the package's reference features have {ref} columns)" if ref is not None else ""
            raise ShapeError(f"expected an encoder output of {want} channels, the width of the model's "
                             f"features{ref_note}, but {how} {got}; the encoder does not match the model")

    @property
    def n_features(self) -> int:
        """Feature dimension: channels of the feature level (the bottleneck by default), doubled for ``"mean+std"``."""
        c = self._channels
        return 2 * c if self.pooling == "mean+std" else c

    def bottleneck(self, tiles) -> np.ndarray:
        """Raw encoder activations ``(N, C, *spatial / 2**level)`` of an in-memory batch of raw tiles."""
        x = network_batch(tiles, self._source, normalize=self.normalize)
        fmap = np.asarray(self._runner(x))
        # never broadcast a (k, 1) output into k x n_features: a wrong encoder is an error, not features
        if fmap.ndim != x.ndim or fmap.shape[0] != x.shape[0]:
            raise ShapeError(f"expected an encoder output of shape ({x.shape[0]}, {self._channels}, "
                             f"*spatial) for an input batch of shape {x.shape}, got {fmap.shape}; "
                             f"the encoder does not match the model")
        self._check_width(int(fmap.shape[1]), "it returned")
        return fmap

    def features(self, tiles, batch_size: int = 16, *, progress: bool = False) -> np.ndarray:
        """Pooled encoder features of every tile.

        Parameters
        ----------
        tiles : array-like
            Raw tiles: ``(N, H, W)`` / ``(N, C, H, W)`` for a 2-D model, ``(N, D, H, W)`` /
            ``(N, C, D, H, W)`` for a 3-D one: a NumPy array, an h5py/zarr dataset or any lazy
            array that slices along the first axis (read ``batch_size`` tiles at a time, never
            all at once), normalised here by the model's intensity rule. Never modified.
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
        n = first_len(tiles)
        out = np.empty((n, self.n_features), dtype=np.float32)
        bar = progress_bar(n, progress, "features")
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
