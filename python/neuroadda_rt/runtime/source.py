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
import logging
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .. import __version__, _atomic, _cache
from .._digest import arrays_sha256, file_sha256, json_sha256
from ..errors import FormatError, InputValueError, IntegrityError, ShapeError, require
from ..export import OPSET, as_network_input, export_onnx, onnx_metadata
from ..io import intensity_rule, load_npy, normalize_tiles
from ..segmentation import REPRESENTATIONS

log = logging.getLogger("neuroadda_rt")

#: The intensity rule of a model that does not name one (integers by dtype range, floats clipped).
DEFAULT_NORMALIZATION = {"rule": "dtype"}

#: ``model.json`` format tag of a model package folder.
FORMAT = "neuroadda_rt.model/1"
#: The checksummed files of a model package folder (besides ``model.json``).
FILES = ("weights.safetensors", "encoder.onnx", "model.onnx", "reference_features.npy")
#: Poolings of encoder features (a package records the one of its reference features).
POOLINGS = ("mean", "max", "mean+std")
#: The ``model.json`` key holding the SHA-256 of its own canonical content (every other key).
METADATA_CHECKSUM = "metadata_sha256"

# bounds of what is parsed from a model.json (a real one is a few kB, nested 4 levels deep)
_MAX_JSON_BYTES = 4 * 1024 * 1024
_MAX_JSON_DEPTH = 64
# bounds of a network config a package may declare
_MAX_WIDTH = 16384
_MAX_DEPTH = 16
_MAX_IN_CHANNELS = 1024
_NETWORK_KEYS = ("dim", "in_channels", "widths", "head", "feature_level", "depth")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)


# --------------------------------------------------------------------------------------------
# the package folder format
# --------------------------------------------------------------------------------------------
def _json_depth(text: str) -> int:
    """Deepest nesting of ``[`` / ``{`` in JSON text (strings skipped), without recursion."""
    bare = _STRING.sub("", text)
    depth = deepest = 0
    for m in re.finditer(r"[\[\]{}]", bare):
        depth += 1 if m.group() in "[{" else -1
        if depth > deepest:
            deepest = depth
            if deepest > _MAX_JSON_DEPTH:
                break  # deep enough to refuse: no need to scan the rest
    return deepest


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object file, with :class:`IntegrityError` naming the file when it is missing or broken.

    Its size (at most 4 MiB) and nesting depth (at most 64 levels) are bounded before it is
    parsed: beyond them it raises :class:`FormatError`, never ``RecursionError`` or ``MemoryError``.
    """
    try:
        with open(path, "rb") as fh:
            data = fh.read(_MAX_JSON_BYTES + 1)
    except FileNotFoundError as exc:
        raise IntegrityError(f"{path}: missing (not a model package, or an incomplete one)") from exc
    except OSError as exc:
        raise IntegrityError(f"{path}: unreadable ({exc})") from exc
    if len(data) > _MAX_JSON_BYTES:
        raise FormatError(f"{path}: expected a JSON file of at most {_MAX_JSON_BYTES} bytes, got a larger one "
                          f"({os.path.getsize(path)} bytes)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise IntegrityError(f"{path}: unreadable or truncated JSON ({exc})") from exc
    depth = _json_depth(text)
    if depth > _MAX_JSON_DEPTH:
        raise FormatError(f"{path}: expected JSON nested at most {_MAX_JSON_DEPTH} levels deep, got {depth}")
    try:
        meta = json.loads(text)
    except RecursionError as exc:  # pragma: no cover - the depth bound above comes first
        raise FormatError(f"{path}: JSON nested too deeply to parse") from exc
    except ValueError as exc:
        raise IntegrityError(f"{path}: unreadable or truncated JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise IntegrityError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    return meta


def metadata_sha256(meta: dict[str, Any]) -> str:
    """SHA-256 of a ``model.json``'s canonical content: every key but :data:`METADATA_CHECKSUM`,
    as JSON with sorted keys (so indentation and key order do not matter, any value does)."""
    return json_sha256({k: v for k, v in meta.items() if k != METADATA_CHECKSUM})


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _check_network(path: Path, net: Any) -> None:
    def bad(field: str, want: str, got) -> FormatError:
        return FormatError(f"{path}: field network.{field}: expected {want}, got {got!r}")

    if not isinstance(net, dict):
        raise FormatError(f"{path}: field 'network': expected a UNet config object, got {type(net).__name__}")
    unknown = sorted(set(net) - set(_NETWORK_KEYS))
    if unknown:
        raise FormatError(f"{path}: field 'network': expected keys among {list(_NETWORK_KEYS)}, got unknown {unknown}")
    if "widths" not in net:
        raise bad("widths", "a non-empty list of positive integers", None)
    w = net["widths"]
    if not isinstance(w, list) or not 1 <= len(w) <= _MAX_DEPTH or \
            not all(_is_int(v) and 1 <= v <= _MAX_WIDTH for v in w):
        raise bad("widths", f"a list of 1 to {_MAX_DEPTH} integers in [1, {_MAX_WIDTH}]", w)
    if not _is_int(net.get("dim", 2)) or net.get("dim", 2) not in (2, 3):
        raise bad("dim", "2 or 3", net.get("dim"))
    c = net.get("in_channels", 1)
    if not _is_int(c) or not 1 <= c <= _MAX_IN_CHANNELS:
        raise bad("in_channels", f"an integer in [1, {_MAX_IN_CHANNELS}]", c)
    if net.get("head", "boundary") not in REPRESENTATIONS:
        raise bad("head", f"one of {REPRESENTATIONS}", net.get("head"))
    d = net.get("depth")
    if d is not None and (not _is_int(d) or d != len(w)):
        raise bad("depth", f"len(widths) = {len(w)}", d)
    lvl = net.get("feature_level")
    if lvl is not None and (not _is_int(lvl) or not -len(w) <= lvl < len(w)):
        raise bad("feature_level", f"null or an integer in [{-len(w)}, {len(w) - 1}]", lvl)


def _check_meta(path: Path, meta: dict[str, Any]) -> None:
    """Validate a parsed ``model.json`` against the package schema: :class:`FormatError` naming the
    field for a wrong type or value, :class:`IntegrityError` for missing keys or checksums and for
    content that does not match its own checksum (:data:`METADATA_CHECKSUM`)."""
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
    for f in FILES:
        if not isinstance(files[f], str) or not _SHA256.fullmatch(files[f]):
            raise FormatError(f"{path}: field files.{f}: expected a hex SHA-256 (64 characters), got {files[f]!r}")

    name = meta["name"]
    if not isinstance(name, str) or not name.strip():
        raise FormatError(f"{path}: field 'name': expected a non-empty string, got {name!r}")
    for key in ("organism", "tissue", "modality"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            raise FormatError(f"{path}: field {key!r}: expected a string or null, got {meta[key]!r}")
    vs = meta.get("voxel_size_nm")
    if vs is not None and (not isinstance(vs, list) or len(vs) not in (2, 3) or
                           not all(_is_num(v) and v > 0 for v in vs)):
        raise FormatError(f"{path}: field 'voxel_size_nm': expected null or 2 or 3 positive numbers, got {vs!r}")
    rep = meta["representation"]
    if rep not in REPRESENTATIONS:
        raise FormatError(f"{path}: field 'representation': expected one of {REPRESENTATIONS}, got {rep!r}")
    norm = meta["normalization"]
    try:
        if not isinstance(norm, dict):
            raise InputValueError(f"expected an object, got {type(norm).__name__}")
        rule = intensity_rule(norm)
    except (InputValueError, TypeError, ValueError) as exc:
        raise FormatError(f"{path}: field 'normalization': expected an intensity rule "
                          f"(neuroadda_rt.io.intensity_rule), got {norm!r} ({exc})") from exc
    if rule != norm:
        raise FormatError(f"{path}: field 'normalization': expected the canonical rule {rule!r}, got {norm!r}")
    _check_network(path, meta["network"])
    if meta["network"].get("head", "boundary") != rep:
        raise FormatError(f"{path}: field 'representation': expected the network's head "
                          f"{meta['network'].get('head', 'boundary')!r}, got {rep!r}")
    ref = meta["reference_features"]
    if not isinstance(ref, dict):
        raise FormatError(f"{path}: field 'reference_features': expected an object, got {ref!r}")
    if ref.get("pooling") not in POOLINGS:
        raise FormatError(f"{path}: field reference_features.pooling: expected one of {POOLINGS}, "
                          f"got {ref.get('pooling')!r}")
    for key in ("n_tiles", "n_features"):
        if key in ref and (not _is_int(ref[key]) or ref[key] < 1):
            raise FormatError(f"{path}: field reference_features.{key}: expected a positive integer, got {ref[key]!r}")
    for key in ("training", "metrics", "onnx"):
        if meta.get(key) is not None and not isinstance(meta[key], dict):
            raise FormatError(f"{path}: field {key!r}: expected an object, got {type(meta[key]).__name__}")

    # model.json itself: the checksum of its canonical content (written by save_model)
    want = meta.get(METADATA_CHECKSUM)
    if want is None:
        # format 1 packages written before the checksum existed (the bundled zoo, test assets)
        log.info("%s: no %s (a package written before model.json was checksummed); its other files are "
                 "verified, model.json itself is not", path, METADATA_CHECKSUM)
    else:
        got = metadata_sha256(meta)
        if want != got:
            raise IntegrityError(f"{path}: checksum mismatch of model.json itself (expected {METADATA_CHECKSUM} "
                                 f"{want!r}, got {got}); model.json was modified")


def _reference_width(meta: dict[str, Any]) -> int:
    """Columns of the reference features that the config and pooling imply."""
    net = meta["network"]
    lvl = net.get("feature_level")
    c = int(net["widths"][len(net["widths"]) - 1 if lvl is None else int(lvl)])
    return 2 * c if meta["reference_features"]["pooling"] == "mean+std" else c


def _inside(root: Path, f: Path) -> None:
    """Refuse a package file that is a link (or below a link) leaving the package folder."""
    if f.is_symlink() or f.resolve() != root.resolve() / f.name:
        target = f.resolve()
        if not target.is_relative_to(root.resolve()):
            raise IntegrityError(f"{f}: a symbolic link to {os.readlink(f) if f.is_symlink() else target}, "
                                 f"outside the package {root}; a package must hold its own files")


def read_package(path: str | os.PathLike, *, verify: bool = True) -> tuple[dict[str, Any], np.ndarray]:
    """Read a model package folder: its ``model.json`` and its reference features.

    ``verify`` checks every file's SHA-256 against ``model.json`` (``False`` only checks that the
    files exist). Raises :class:`FormatError` for a folder that is not a package and
    :class:`IntegrityError` naming the file that is missing, truncated or modified.
    """
    root = Path(path)
    if not root.exists():
        _atomic.recover_dir(root)  # a save_model(overwrite=True) killed between its two renames
    if not root.is_dir():
        raise FormatError(f"{root}: expected a model package folder, got "
                          f"{'a file' if root.exists() else 'a missing path'}")
    _inside(root, root / "model.json")
    meta = read_json(root / "model.json")
    _check_meta(root / "model.json", meta)
    for name in FILES:
        f = root / name
        _inside(root, f)
        if not f.is_file():
            raise IntegrityError(f"{f}: missing from the package")
        if verify:
            got = file_sha256(f)
            if got != meta["files"][name]:
                raise IntegrityError(f"{f}: checksum mismatch (expected sha256 {meta['files'][name]}, got {got}); "
                                     f"the file is truncated or was modified")
    ref_path = root / "reference_features.npy"
    try:
        ref = load_npy(ref_path)  # header checked against the file size before anything is allocated
    except FormatError as exc:
        raise IntegrityError(f"{ref_path}: unreadable ({exc})") from exc
    if ref.ndim != 2 or ref.dtype != np.float32:
        raise IntegrityError(f"{ref_path}: expected a 2-D float32 array, got {ref.dtype} {ref.shape}")
    width = _reference_width(meta)
    if ref.shape[1] != width or ref.shape[0] < 1:
        raise FormatError(f"{ref_path}: expected (n >= 1, {width}) reference features (encoder width "
                          f"{width} for pooling {meta['reference_features']['pooling']!r}), got {ref.shape}")
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
    reference_width : int, optional
        Columns of a package's reference features (named when an encoder's output width differs).
    """

    config: dict[str, Any]
    normalization: dict[str, Any] | None = None
    onnx: dict[str, Path] = field(default_factory=dict)
    pooling: str | None = None
    network: Any = None
    weights: Path | None = None
    reference_width: int | None = None

    @classmethod
    def from_package(cls, root: str | os.PathLike, metadata: dict[str, Any]) -> "ModelSource":
        """The source of a (read, verified) package folder ``root`` with its ``model.json``."""
        root = Path(root)
        return cls(config=dict(metadata["network"]), normalization=dict(metadata["normalization"]),
                   onnx={"encoder": root / "encoder.onnx", "full": root / "model.onnx"},
                   pooling=str(metadata["reference_features"]["pooling"]), weights=root / "weights.safetensors",
                   reference_width=metadata["reference_features"].get("n_features"))

    @classmethod
    def from_onnx(cls, path: str | os.PathLike) -> "ModelSource":
        """The source of one ONNX file written by :func:`~neuroadda_rt.export_onnx` (no weights)."""
        p = Path(path)
        meta = onnx_metadata(p)
        part = meta.get("neuroadda_rt.part")
        if part not in ("encoder", "full"):
            raise FormatError(f"{p}: expected an ONNX file written by neuroadda_rt.export_onnx "
                              f"(metadata neuroadda_rt.part), got metadata {meta}")
        # a package's exported encoder (and any int8 file) records the intensity rule and pooling it was made for
        norm, pooling = meta.get("neuroadda_rt.normalization"), meta.get("neuroadda_rt.pooling")
        try:
            normalization = json.loads(norm) if norm else None
        except json.JSONDecodeError as exc:
            raise FormatError(f"{p}: expected JSON in the metadata neuroadda_rt.normalization, got {norm!r}") from exc
        if normalization is not None and not isinstance(normalization, dict):
            raise FormatError(f"{p}: expected a dict in the metadata neuroadda_rt.normalization, got {norm!r}")
        if pooling is not None and pooling not in POOLINGS:
            raise FormatError(f"{p}: expected the metadata neuroadda_rt.pooling in {POOLINGS}, got {pooling!r}")
        return cls(config=json.loads(meta["neuroadda_rt.config"]), onnx={part: p},
                   normalization=normalization, pooling=pooling)

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
