"""What the runtime runs, and the one place where tiles become a network batch.

:class:`ModelSource` is everything the runtime needs from "a model": the network config, its
intensity rule, its exported ONNX files and, when there are any, its PyTorch weights. It is
built from a :class:`~neuroadda_rt.models.UNet`, an ONNX file from
:func:`~neuroadda_rt.export_onnx`, a model package folder, or any object that provides one
(:class:`ProvidesModelSource`, e.g. :class:`~neuroadda_rt.ModelPackage`), so the runtime never
imports the package layer above it.

The package folder format (``model.json`` + checksummed files) is read and verified here, once:
:func:`neuroadda_rt.load_model` and a folder given to the runtime go through
:func:`read_package`.

Intensity normalisation is applied exactly once per path, to *raw* tiles, by
:func:`network_batch` through :func:`neuroadda_rt.io.normalize_tiles`.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .. import __version__, _cache
from .._digest import arrays_sha256, file_sha256
from ..errors import FormatError, InputValueError, IntegrityError, ShapeError, require
from ..export import OPSET, as_network_input, export_onnx, onnx_metadata
from ..io import normalize_tiles

#: The intensity rule of a model that does not name one (integers by dtype range, floats clipped).
DEFAULT_NORMALIZATION = {"rule": "dtype"}

#: ``model.json`` format tag of a model package folder.
FORMAT = "neuroadda_rt.model/1"
#: The checksummed files of a model package folder (besides ``model.json``).
FILES = ("weights.safetensors", "encoder.onnx", "model.onnx", "reference_features.npy")


# --------------------------------------------------------------------------------------------
# the package folder format
# --------------------------------------------------------------------------------------------
def read_json(path: Path) -> dict[str, Any]:
    """A JSON object file, with :class:`IntegrityError` naming the file when it is missing or broken."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise IntegrityError(f"{path}: missing (not a model package, or an incomplete one)") from exc
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise IntegrityError(f"{path}: unreadable or truncated JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise IntegrityError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    return meta


def _check_meta(path: Path, meta: dict[str, Any]) -> None:
    if meta.get("format") != FORMAT:
        raise FormatError(f"{path}: expected format {FORMAT!r}, got {meta.get('format')!r}")
    required = ("name", "representation", "normalization", "network", "files", "reference_features")
    missing = [k for k in required if k not in meta]
    if missing:
        raise IntegrityError(f"{path}: missing keys {missing}")
    files = meta["files"]
    if not isinstance(files, dict) or any(f not in files for f in FILES):
        raise IntegrityError(f"{path}: expected sha256 entries for {list(FILES)}, got "
                             f"{sorted(files) if isinstance(files, dict) else files!r}")


def read_package(path: str | os.PathLike, *, verify: bool = True) -> tuple[dict[str, Any], np.ndarray]:
    """Read a model package folder: its ``model.json`` and its reference features.

    ``verify`` checks every file's SHA-256 against ``model.json`` (``False`` only checks that the
    files exist). Raises :class:`FormatError` for a folder that is not a package and
    :class:`IntegrityError` naming the file that is missing, truncated or modified.
    """
    root = Path(path)
    if not root.is_dir():
        raise FormatError(f"{root}: expected a model package folder, got "
                          f"{'a file' if root.exists() else 'a missing path'}")
    meta = read_json(root / "model.json")
    _check_meta(root / "model.json", meta)
    for name in FILES:
        f = root / name
        if not f.is_file():
            raise IntegrityError(f"{f}: missing from the package")
        if verify:
            got = file_sha256(f)
            if got != meta["files"][name]:
                raise IntegrityError(f"{f}: checksum mismatch (expected sha256 {meta['files'][name]}, got {got}); "
                                     f"the file is truncated or was modified")
    ref_path = root / "reference_features.npy"
    try:
        ref = np.load(ref_path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise IntegrityError(f"{ref_path}: unreadable ({exc})") from exc
    if ref.ndim != 2 or ref.dtype != np.float32:
        raise IntegrityError(f"{ref_path}: expected a 2-D float32 array, got {ref.dtype} {ref.shape}")
    return meta, ref


# --------------------------------------------------------------------------------------------
# the model as the runtime sees it
# --------------------------------------------------------------------------------------------
@dataclass
class ModelSource:
    """Everything the runtime needs from a model.

    Attributes
    ----------
    config : dict
        The UNet config (``UNet(**config)``).
    normalization : dict, optional
        The intensity rule (:func:`neuroadda_rt.io.intensity_rule`); None means
        :data:`DEFAULT_NORMALIZATION`.
    onnx : dict
        Exported ONNX files by part (``"encoder"``, ``"full"``); missing parts are exported from
        the network on first use.
    pooling : str, optional
        The pooling the model's reference features used (the default of a FeatureExtractor).
    network : UNet, optional
        The PyTorch network in memory.
    weights : path, optional
        A ``.safetensors`` state dict to build the network from when it is needed.
    """

    config: dict[str, Any]
    normalization: dict[str, Any] | None = None
    onnx: dict[str, Path] = field(default_factory=dict)
    pooling: str | None = None
    network: Any = None
    weights: Path | None = None

    @classmethod
    def from_package(cls, root: str | os.PathLike, metadata: dict[str, Any]) -> "ModelSource":
        """The source of a (read, verified) package folder ``root`` with its ``model.json``."""
        root = Path(root)
        return cls(config=dict(metadata["network"]), normalization=dict(metadata["normalization"]),
                   onnx={"encoder": root / "encoder.onnx", "full": root / "model.onnx"},
                   pooling=str(metadata["reference_features"]["pooling"]), weights=root / "weights.safetensors")

    @classmethod
    def from_onnx(cls, path: str | os.PathLike) -> "ModelSource":
        """The source of one ONNX file written by :func:`~neuroadda_rt.export_onnx` (no weights)."""
        p = Path(path)
        meta = onnx_metadata(p)
        part = meta.get("neuroadda_rt.part")
        if part not in ("encoder", "full"):
            raise FormatError(f"{p}: expected an ONNX file written by neuroadda_rt.export_onnx "
                              f"(metadata neuroadda_rt.part), got metadata {meta}")
        return cls(config=json.loads(meta["neuroadda_rt.config"]), onnx={part: p})

    @property
    def dim(self) -> int:
        return int(self.config.get("dim", 2))

    @property
    def in_channels(self) -> int:
        return int(self.config.get("in_channels", 1))

    @property
    def multiple(self) -> int:
        """Spatial sizes are padded to a multiple of this inside the network (``2**(depth-1)``)."""
        return 2 ** (len(self.config["widths"]) - 1)

    @property
    def has_weights(self) -> bool:
        """Whether PyTorch weights exist (without loading them or importing torch)."""
        return self.network is not None or self.weights is not None

    def torch_net(self):
        """The PyTorch network, loaded from :attr:`weights` on first use."""
        if self.network is None and self.weights is not None:
            from ..models import load_unet  # needs torch: only when a torch network is asked for

            self.network = load_unet(self.config, self.weights)
        return self.network

    def onnx_path(self, part: str) -> Path | None:
        """The ONNX file of ``part``, exported from the network when there is none (None without weights)."""
        if part not in self.onnx:
            if not self.has_weights:
                return None
            self.onnx[part] = _exported(self.torch_net(), part)
        return self.onnx[part]


@runtime_checkable
class ProvidesModelSource(Protocol):
    """Anything the runtime can run: it hands over a :class:`ModelSource` (e.g. a ModelPackage)."""

    def model_source(self) -> ModelSource: ...


def as_model_source(model) -> ModelSource:
    """A fresh :class:`ModelSource` for a UNet, a :class:`ProvidesModelSource`, a ModelSource, a
    package folder or an exported ONNX file."""
    if isinstance(model, ModelSource):
        return replace(model, onnx=dict(model.onnx))  # the runtime caches exports on its own copy
    if isinstance(model, ProvidesModelSource):
        return model.model_source()
    if isinstance(model, (str, os.PathLike)):
        p = Path(model)
        if p.is_dir():
            meta, _ = read_package(p)
            return ModelSource.from_package(p, meta)
        if p.is_file() and p.suffix == ".onnx":
            return ModelSource.from_onnx(p)
        raise FormatError(f"{p}: expected a model package folder or an .onnx file, got "
                          f"{'a missing path' if not p.exists() else 'an unsupported file'}")
    from ..models import UNet  # needs torch: only reached for an in-memory network

    if not isinstance(model, UNet):
        raise InputValueError("expected a UNet, a ModelPackage, a package folder or an .onnx path, "
                              f"got {type(model).__name__}")
    return ModelSource(config=model.config, network=model)


# --------------------------------------------------------------------------------------------
# ONNX exports of in-memory networks
# --------------------------------------------------------------------------------------------
_EXPORT_DIR: list[Path] = []


def _net_digest(net, part: str) -> str:
    """Identity of an in-memory network's export: config, part, weights, exporter conventions."""
    state = net.state_dict()
    return arrays_sha256(*(v.detach().cpu().contiguous().numpy() for v in state.values()),
                         header=[net.config, part, list(state), OPSET, __version__])


def _exported(net, part: str) -> Path:
    """ONNX export of an in-memory UNet, memoised per process on (config, weights, part) so that a
    FeatureExtractor and a Predictor of the same network export once. The files live in a private
    folder below ``cache_dir("onnx")``, removed at interpreter exit (weights change with every
    training step: keeping them would grow the cache without bound)."""
    if not _EXPORT_DIR:
        root = _cache.cache_dir("onnx")
        root.mkdir(parents=True, exist_ok=True)
        _EXPORT_DIR.append(Path(tempfile.mkdtemp(prefix="session-", dir=root)))
        atexit.register(shutil.rmtree, _EXPORT_DIR[0], True)
    path = _EXPORT_DIR[0] / f"{_net_digest(net, part)[:24]}-{part}.onnx"
    if not path.is_file():
        export_onnx(net, path, part=part)
    return path


# --------------------------------------------------------------------------------------------
# tiles -> network batch (the one normalisation wrapper)
# --------------------------------------------------------------------------------------------
def network_batch(tiles, source: ModelSource, *, rule: dict | None = None, normalize: bool = True) -> np.ndarray:
    """Raw tiles -> the float32 ``(N, C, *spatial)`` batch of ``source``'s network.

    ``rule`` overrides the source's intensity rule (the Predictor freezes a percentile rule
    over a whole image); ``normalize=False`` feeds floats as given. Checks the network's minimum
    tile size.
    """
    rule = rule or source.normalization or DEFAULT_NORMALIZATION
    x = as_network_input(tiles, dim=source.dim, in_channels=source.in_channels,
                         normalize=(lambda a: normalize_tiles(a, rule)) if normalize else None)
    if min(x.shape[2:]) < source.multiple:
        raise ShapeError(f"expected tiles of at least {source.multiple} pixels per spatial axis (2**(depth-1), "
                         f"for the reflect padding), got {x.shape[2:]}")
    return x


def first_len(arr) -> int:
    """Number of tiles along the first axis, without reading a lazy array."""
    shape = getattr(arr, "shape", None)
    if shape is None:
        shape = np.shape(arr)
    if len(shape) == 0:
        raise ShapeError(f"expected an array of tiles, got a scalar of shape {tuple(shape)}")
    return int(shape[0])


def progress_bar(total: int, enabled: bool, desc: str):
    """A tqdm bar over tiles, or None when not ``enabled``."""
    if not enabled:
        return None
    tqdm = require("tqdm", "runtime")
    return tqdm.tqdm(total=total, desc=desc, unit="tile")
