"""Model packages: self-describing, verifiable folders that carry a trained UNet between machines.

A package is a directory::

    model.json               metadata (below) + sha256 of every other file
    weights.safetensors      the PyTorch state dict (safetensors: nothing is unpickled)
    encoder.onnx             export_onnx(part="encoder"): input "input" -> "features"
    model.onnx               export_onnx(part="full"):    input "input" -> "probabilities"
    reference_features.npy   pooled encoder features of a fixed sample of the training tiles,
                             so a target can be ranked against this source without its images

``model.json`` keys: ``format`` (``"neuroadda_rt.model/1"``), ``name``, ``organism``, ``tissue``,
``modality``, ``voxel_size_nm``, ``representation``, ``normalization`` (an
:func:`neuroadda_rt.io.intensity_rule` dict), ``network`` (the UNet config), ``training``
(``data`` description, ``n_samples``, free-form extras), ``metrics``, ``reference_features``
(``pooling``, ``n_tiles``, ``tile_size``, ``seed``), ``onnx`` (opset, I/O names),
``neuroadda_rt_version``, ``files`` (name -> sha256), optional ``extra``, and ``metadata_sha256``
(the SHA-256 of ``model.json``'s own canonical content, every other key, so an edit is detected;
format-1 packages written before it existed load without it, with a logged note).

:func:`load_model` validates ``model.json`` against the package schema
(:class:`~neuroadda_rt.errors.FormatError` naming the field), verifies every checksum and raises
:class:`~neuroadda_rt.errors.IntegrityError` naming the file for a tampered, truncated or missing
one, or for a link leading out of the package (the format is read and verified by
:func:`neuroadda_rt.runtime.source.read_package`, which a package folder given to the runtime
goes through too). :func:`save_model` writes into a temporary folder next to the destination and
renames it into place. A :class:`ModelPackage` hands the runtime a
:class:`~neuroadda_rt.runtime.ModelSource` (:meth:`ModelPackage.model_source`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from . import __version__, _atomic
from ._digest import file_sha256, json_sha256
from .errors import FormatError, InputValueError, IntegrityError, require
from .export import INPUT_NAME, OPSET, OUTPUT_NAMES, export_onnx
from .io import intensity_rule
from .runtime import POOLINGS, FeatureExtractor, ModelSource, Predictor, config_feature_level
from .runtime.source import FILES, FORMAT, METADATA_CHECKSUM, metadata_sha256, read_json, read_package

log = logging.getLogger("neuroadda_rt")

__all__ = ["FILES", "FORMAT", "ModelPackage", "Zoo", "default_zoo", "synthetic_zoo", "load_model", "save_model",
           "is_synthetic"]

#: The bundled real-EM zoo (``neuroadda-rt zoo build --from-datasets``, see README "Model zoo").
_ZOO_DIR = Path(__file__).resolve().parent / "zoo"
#: The bundled synthetic zoo (the demo's and the tests'): sources trained on a synthetic domain family.
_SYNTHETIC_ZOO_DIR = Path(__file__).resolve().parent / "zoo_synthetic"


def is_synthetic(metadata: dict) -> bool:
    """Whether a package's ``model.json`` describes a model trained on synthetic images.

    True when its ``extra`` says ``"synthetic": true`` or names a ``synthetic_family``, or its
    organism or modality says "synthetic" (the synthetic zoo writes all of these).
    """
    extra = metadata.get("extra") or {}
    if isinstance(extra, dict) and (extra.get("synthetic") is True or "synthetic_family" in extra):
        return True
    return any("synthetic" in str(metadata.get(k) or "").lower() for k in ("organism", "modality"))


class ModelPackage:
    """A loaded (verified) model package. Create with :func:`load_model` or :func:`save_model`.

    This is what ranking, selection and training read from a source model; each thing has one
    attribute:

    Attributes
    ----------
    path : pathlib.Path
        The package folder.
    metadata : dict
        The parsed ``model.json`` (every field below comes from it).
    name, organism, tissue, modality, voxel_size_nm
        Descriptive metadata.
    representation : str
        ``"boundary"`` or ``"affinities"``.
    normalization : dict
        The input intensity rule; the runtime applies it to raw tiles.
    config : dict
        The UNet config; ``feature_level`` is the encoder level its features come from.
    pooling : str
        Pooling of :attr:`reference_features` (targets must use the same).
    reference_features : numpy.ndarray
        ``(n_tiles, n_features)`` float32 features of training tiles (read-only).
    sha256 : str
        The package's identity (for caches and reports).
    training, metrics : dict
        Training data description and training/validation metrics.

    Examples
    --------
    >>> import neuroadda_rt                                              # doctest: +SKIP
    >>> pkg = neuroadda_rt.load_model("tests/assets/tiny_model")         # doctest: +SKIP
    >>> pkg.name, pkg.representation, pkg.reference_features.shape      # doctest: +SKIP
    ('tiny', 'boundary', (32, 16))
    """

    def __init__(self, path: Path, metadata: dict[str, Any], reference_features: np.ndarray):
        self.path = Path(path)
        self.metadata = metadata
        self._ref = reference_features
        self._ref.setflags(write=False)

    # -- metadata accessors ------------------------------------------------------------------
    name = property(lambda self: str(self.metadata["name"]), doc="Model name.")
    organism = property(lambda self: self.metadata.get("organism"), doc="Source organism.")
    tissue = property(lambda self: self.metadata.get("tissue"), doc="Source tissue / brain region.")
    modality = property(lambda self: self.metadata.get("modality"), doc="Imaging modality (e.g. 'ssTEM', 'FIB-SEM').")
    voxel_size_nm = property(lambda self: self.metadata.get("voxel_size_nm"), doc="Voxel size in nm (z, y, x).")
    representation = property(lambda self: str(self.metadata["representation"]),
                              doc="'boundary' or 'affinities'.")
    normalization = property(lambda self: dict(self.metadata["normalization"]),
                             doc="Input intensity rule (a neuroadda_rt.io.intensity_rule dict).")
    config = property(lambda self: dict(self.metadata["network"]), doc="UNet config: ``UNet(**config)``.")
    training = property(lambda self: dict(self.metadata.get("training") or {}), doc="Training data description.")
    metrics = property(lambda self: dict(self.metadata.get("metrics") or {}), doc="Training/validation metrics.")
    pooling = property(lambda self: str(self.metadata["reference_features"]["pooling"]),
                       doc="Pooling of the reference features (use the same for targets).")

    @property
    def feature_level(self) -> int:
        """Encoder level of the package's features (the bottleneck unless the config names one)."""
        return config_feature_level(self.metadata["network"])

    @property
    def reference_features(self) -> np.ndarray:
        """``(n_tiles, n_features)`` float32, read-only."""
        return self._ref

    @property
    def sha256(self) -> str:
        """Identity of the package: SHA-256 over its sorted ``files`` checksums (and config)."""
        return json_sha256({"files": self.metadata["files"], "network": self.metadata["network"]})

    @property
    def encoder_onnx(self) -> Path:
        """The exported encoder (``part="encoder"``)."""
        return self.path / "encoder.onnx"

    @property
    def model_onnx(self) -> Path:
        """The exported full network (``part="full"``)."""
        return self.path / "model.onnx"

    def model_source(self) -> ModelSource:
        """What the runtime runs (:class:`~neuroadda_rt.runtime.ModelSource`): config, intensity
        rule, ONNX files, weights and reference pooling of this package."""
        return ModelSource.from_package(self.path, self.metadata)

    def unet(self):
        """A fresh :class:`~neuroadda_rt.models.UNet` with the package's weights, in eval mode."""
        from .models import load_unet  # needs torch: only when the network is asked for

        return load_unet(self.config, self.path / "weights.safetensors")

    def feature_extractor(self, **kwargs) -> FeatureExtractor:
        """:class:`~neuroadda_rt.FeatureExtractor` of this package (pooling defaults to the reference's)."""
        return FeatureExtractor(self, **kwargs)

    def predictor(self, **kwargs) -> Predictor:
        """:class:`~neuroadda_rt.Predictor` of this package."""
        return Predictor(self, **kwargs)

    def save(self, path, *, overwrite: bool = False) -> "ModelPackage":
        """Copy this (verified) package to ``path`` atomically; returns the copy, loaded."""
        dest = Path(path)
        if dest.resolve() == self.path.resolve():
            return self
        tmp = _atomic.temp_dir_beside(dest)
        try:
            for name in ("model.json", *FILES):
                shutil.copy2(self.path / name, tmp / name)
            _atomic.commit_dir(tmp, dest, overwrite=overwrite)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return load_model(dest)

    def summary(self) -> dict[str, Any]:
        """The metadata fields a listing shows."""
        return {k: self.metadata.get(k) for k in ("name", "organism", "tissue", "modality", "voxel_size_nm",
                                                    "representation")} | {"path": str(self.path)}

    def __repr__(self) -> str:
        return (f"ModelPackage(name={self.name!r}, organism={self.organism!r}, modality={self.modality!r}, "
                f"representation={self.representation!r}, path='{self.path}')")


# --------------------------------------------------------------------------------------------
# loading and verification
# --------------------------------------------------------------------------------------------
def load_model(path: str | os.PathLike, *, verify: bool = True) -> ModelPackage:
    """Load a model package, verifying the SHA-256 of every file.

    Parameters
    ----------
    path : str or path-like
        The package folder.
    verify : bool
        Check every file's checksum (default). ``False`` only skips the hashing (the files are
        still required to exist); use it for fast listings, never for inference.

    Returns
    -------
    ModelPackage

    Raises
    ------
    IntegrityError
        A file is missing, truncated or modified; the message names it.
    FormatError
        Not a package of a known format.

    Examples
    --------
    >>> import neuroadda_rt                                          # doctest: +SKIP
    >>> pkg = neuroadda_rt.load_model("tests/assets/tiny_model")     # doctest: +SKIP
    """
    meta, ref = read_package(path, verify=verify)
    return ModelPackage(Path(path), meta, ref)


# --------------------------------------------------------------------------------------------
# saving
# --------------------------------------------------------------------------------------------
def save_model(model, path: str | os.PathLike, *, name: str | None = None, organism: str | None = None,
               tissue: str | None = None, modality: str | None = None, voxel_size_nm=None,
               normalization: dict | None = None, training: dict | None = None, metrics: dict | None = None,
               reference_features: np.ndarray | None = None, reference_tiles=None, pooling: str = "mean",
               reference_info: dict | None = None, extra: dict | None = None, overwrite: bool = False) -> ModelPackage:
    """Write a model package atomically (temporary folder next to ``path``, then rename).

    Parameters
    ----------
    model : UNet or ModelPackage
        The network (its ``config`` and weights are stored). A ``ModelPackage`` is re-saved with
        its metadata, each field overridable by the keywords below.
    path : str or path-like
        Destination folder; must not exist unless ``overwrite``.
    name, organism, tissue, modality : str
        Descriptive metadata (``name`` defaults to the folder name).
    voxel_size_nm : sequence of float, optional
        ``(z, y, x)`` or ``(y, x)`` in nm.
    normalization : dict, optional
        Input intensity rule (:func:`neuroadda_rt.io.intensity_rule`); default ``{"rule": "dtype"}``.
    training : dict, optional
        Training data description: ``{"data": str, "n_samples": int, ...}``.
    metrics : dict, optional
        Training / validation metrics (JSON-able).
    reference_features : array, optional
        ``(n, d)`` float32 pooled encoder features of a fixed sample of training tiles.
    reference_tiles : array-like, optional
        Training tiles to compute them from (with the exported encoder on ONNX Runtime, the same
        path targets take); one of ``reference_features`` / ``reference_tiles`` is required.
    pooling : {"mean", "max", "mean+std"}
        Pooling of the reference features, recorded for the targets.
    reference_info : dict, optional
        How the reference tiles were drawn (e.g. ``{"tile_size": 256, "seed": 0}``).
    extra : dict, optional
        Any further JSON-able metadata, stored under ``"extra"``.
    overwrite : bool
        Replace an existing package at ``path``.

    Returns
    -------
    ModelPackage
        The written package, loaded and verified.

    Examples
    --------
    >>> import numpy as np, neuroadda_rt, tempfile, os                   # doctest: +SKIP
    >>> from neuroadda_rt.models import UNet                             # doctest: +SKIP
    >>> pkg = neuroadda_rt.save_model(UNet(widths=(4, 8)), os.path.join(tempfile.mkdtemp(), "m"),
    ...     organism="mouse", modality="ssTEM", voxel_size_nm=(40, 4, 4),
    ...     reference_tiles=np.random.rand(8, 64, 64))                    # doctest: +SKIP
    """
    from .models import UNet  # needs torch, as saving a network does

    st = require("safetensors.torch", "runtime")
    dest = Path(path)
    _atomic.recover_dir(dest)  # a previous overwrite killed between its renames: its old copy comes back first
    base: dict[str, Any] = {}
    if isinstance(model, ModelPackage):
        base = json.loads(json.dumps(model.metadata))
        if reference_features is None and reference_tiles is None:
            reference_features = model.reference_features
            pooling = model.pooling
            reference_info = reference_info or {k: v for k, v in base["reference_features"].items()
                                                if k not in ("pooling", "n_tiles", "n_features")}
        net = model.unet()
    elif isinstance(model, UNet):
        net = model
    else:
        raise InputValueError(f"expected a UNet or a ModelPackage, got {type(model).__name__}")
    if pooling not in POOLINGS:
        raise InputValueError(f"expected pooling in {POOLINGS}, got {pooling!r}")
    if dest.exists() and not overwrite:
        raise FileExistsError(f"{dest}: already exists (pass overwrite=True to replace it)")
    if normalization is None:
        normalization = base.get("normalization") or {"rule": "dtype"}
    normalization = intensity_rule(normalization)
    if voxel_size_nm is not None:
        voxel_size_nm = [float(v) for v in voxel_size_nm]
        if len(voxel_size_nm) not in (2, 3) or min(voxel_size_nm) <= 0:
            raise InputValueError(f"expected 2 or 3 positive voxel sizes in nm, got {voxel_size_nm}")

    net = net.eval()
    width = net.config["widths"][net.feature_level] * (2 if pooling == "mean+std" else 1)

    def check_ref(ref: np.ndarray) -> np.ndarray:
        ref = np.ascontiguousarray(ref, dtype=np.float32)
        if ref.ndim != 2 or ref.shape[0] < 1 or ref.shape[1] != width:
            raise InputValueError(f"expected reference_features of shape (n >= 1, {width}) for pooling "
                                  f"{pooling!r}, got {ref.shape}")
        if not np.isfinite(ref).all():
            raise InputValueError("expected finite reference_features, got NaN or inf")
        return ref

    if reference_features is not None:
        reference_features = check_ref(reference_features)  # fail before any export
    elif reference_tiles is None:
        raise InputValueError("expected reference_features or reference_tiles (the source-free "
                              "reference for ranking), got neither")
    tmp = _atomic.temp_dir_beside(dest)
    try:
        if isinstance(model, ModelPackage):
            # same weights: the verified files are reused byte for byte (no re-export)
            for f in ("weights.safetensors", "encoder.onnx", "model.onnx"):
                shutil.copyfile(model.path / f, tmp / f)
        else:
            state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
            st.save_file(state, str(tmp / "weights.safetensors"), metadata={"config": json.dumps(net.config)})
            export_onnx(net, tmp / "encoder.onnx", part="encoder")
            export_onnx(net, tmp / "model.onnx", part="full")
        if reference_features is None:
            # the exported encoder on ONNX Runtime with the package's intensity rule: the path targets take
            source = ModelSource(config=net.config, normalization=normalization,
                                 onnx={"encoder": tmp / "encoder.onnx"})
            fx = FeatureExtractor(source, backend="onnxruntime", device="cpu", pooling=pooling)
            reference_features = fx.features(reference_tiles)
        ref = check_ref(reference_features)
        np.save(tmp / "reference_features.npy", ref, allow_pickle=False)

        def pick(key, value, default=None):
            return value if value is not None else base.get(key, default)

        meta: dict[str, Any] = {
            "format": FORMAT,
            "name": pick("name", name, dest.name),
            "organism": pick("organism", organism),
            "tissue": pick("tissue", tissue),
            "modality": pick("modality", modality),
            "voxel_size_nm": pick("voxel_size_nm", voxel_size_nm),
            "representation": net.config["head"],
            "normalization": normalization,
            "network": net.config,
            "training": pick("training", training, {}),
            "metrics": pick("metrics", metrics, {}),
            "reference_features": {"file": "reference_features.npy", "pooling": pooling, "n_tiles": int(ref.shape[0]),
                                   "n_features": int(ref.shape[1]), **(reference_info or {})},
            "onnx": {"opset": OPSET, "input": INPUT_NAME, "outputs": OUTPUT_NAMES,
                     "files": {"encoder": "encoder.onnx", "full": "model.onnx"}},
            "neuroadda_rt_version": __version__,
            "files": {f: file_sha256(tmp / f) for f in FILES},
        }
        if extra is not None or "extra" in base:
            meta["extra"] = pick("extra", extra)
        meta = json.loads(json.dumps(meta, allow_nan=False))  # the checksum is of what a reader parses
        meta[METADATA_CHECKSUM] = metadata_sha256(meta)
        text = json.dumps(meta, indent=2, sort_keys=True, allow_nan=False)
        (tmp / "model.json").write_text(text + "\n", encoding="utf-8")
        _atomic.commit_dir(tmp, dest, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load_model(dest)


# --------------------------------------------------------------------------------------------
# zoo
# --------------------------------------------------------------------------------------------
class Zoo:
    """A folder of model packages (one per sub-folder holding a ``model.json``; hidden and temporary
    folders, such as a save in progress, are skipped).

    Parameters
    ----------
    root : str or path-like
        The zoo folder.

    Notes
    -----
    Filtering reads only the ``model.json`` files; iterating yields packages loaded with
    :func:`load_model` (every checksum verified), each with its ``.path``.

    Examples
    --------
    >>> import neuroadda_rt                                           # doctest: +SKIP
    >>> zoo = neuroadda_rt.Zoo("models/").filter(modality="ssTEM")    # doctest: +SKIP
    >>> [pkg.name for pkg in zoo]                                     # doctest: +SKIP
    """

    def __init__(self, root: str | os.PathLike, *, _paths: list[Path] | None = None):
        self.root = Path(root)
        if _paths is None:
            if not self.root.is_dir():
                raise FormatError(f"{self.root}: expected a zoo folder of model packages, got "
                                  f"{'a file' if self.root.exists() else 'a missing path'}")
            # a replacement interrupted between its two renames left a package aside: put it back
            for old in self.root.glob(".*.old.*"):
                if old.is_dir():
                    _atomic.recover_dir(self.root / old.name[1:old.name.rindex(".old.")])
            # hidden and temporary folders (a save in progress, an old copy being replaced) are not packages
            _paths = sorted(p.parent for p in self.root.glob("*/model.json")
                            if not _atomic.is_temporary_name(p.parent.name))
        self._paths = list(_paths)

    @property
    def paths(self) -> list[Path]:
        """Package folders, sorted."""
        return list(self._paths)

    def _meta(self, p: Path) -> dict[str, Any]:
        return read_json(p / "model.json")

    def summaries(self) -> list[dict[str, Any]]:
        """name/organism/tissue/modality/voxel size/representation/path per package, plus ``synthetic``,
        the reference ``tile_size`` and the held-out scores of its model card when it has one
        (``held_out_vi``, ``held_out_adapted_rand``); no verification."""
        out = []
        for p in self._paths:
            m = self._meta(p)
            held = (m.get("metrics") or {}).get("held_out") or {}
            out.append({k: m.get(k) for k in ("name", "organism", "tissue", "modality", "voxel_size_nm",
                                              "representation")}
                       | {"synthetic": is_synthetic(m),
                          "tile_size": (m.get("reference_features") or {}).get("tile_size"),
                          "held_out_vi": held.get("vi_total"), "held_out_adapted_rand": held.get("adapted_rand_error"),
                          "path": str(p)})
        return out

    @property
    def names(self) -> list[str]:
        return [s["name"] for s in self.summaries()]

    def filter(self, *, organism: str | None = None, modality: str | None = None,
               representation: str | None = None, tissue: str | None = None, name: str | None = None) -> "Zoo":
        """A sub-zoo of the packages matching every given field (case-insensitive equality)."""
        want = {k: v for k, v in dict(organism=organism, modality=modality, representation=representation,
                                       tissue=tissue, name=name).items() if v is not None}

        def ok(p: Path) -> bool:
            m = self._meta(p)
            return all(str(m.get(k) or "").lower() == str(v).lower() for k, v in want.items())

        return Zoo(self.root, _paths=[p for p in self._paths if ok(p)])

    def verify(self) -> dict[str, str | None]:
        """Package folder name -> None if it verifies, else the error message."""
        out: dict[str, str | None] = {}
        for p in self._paths:
            try:
                load_model(p)
                out[p.name] = None
            except (IntegrityError, FormatError) as exc:
                out[p.name] = str(exc)
        return out

    def __getitem__(self, name: str) -> ModelPackage:
        for p in self._paths:
            if p.name == name or self._meta(p).get("name") == name:
                return load_model(p)
        raise KeyError(f"no model named {name!r} in {self.root} (have {self.names})")

    def __iter__(self) -> Iterator[ModelPackage]:
        for p in self._paths:
            yield load_model(p)

    def __len__(self) -> int:
        return len(self._paths)

    def __repr__(self) -> str:
        return f"Zoo(root='{self.root}', n={len(self)})"


def _bundled(root: Path, allow_empty: bool, build: str) -> Zoo:
    if not root.is_dir():
        if allow_empty:
            return Zoo(root, _paths=[])
        raise FormatError(f"the bundled zoo folder {root} is missing; build it with `{build}`")
    zoo = Zoo(root)
    if len(zoo) == 0 and not allow_empty:
        raise FormatError(f"the bundled zoo {root} holds no model package yet; build it with `{build}` "
                          f"(or pass a Zoo of your own models)")
    return zoo


def default_zoo(*, allow_empty: bool = False) -> Zoo:
    """The real-EM zoo bundled with the package (``neuroadda_rt/zoo/``).

    One small UNet per labelled public EM data set (ISBI 2012 and Gerhard L3 ssTEM of the
    *Drosophila* larval VNC, gala FIB-SEM of fly neuropil, EPFL mouse hippocampus FIB-SEM), built by
    ``neuroadda-rt zoo build OUT --from-datasets examples/datasets/{...}.json``; each package's
    ``model.json`` is its model card (data, licence, citation, recipe, held-out VI). For the demo's
    zoo trained on synthetic images, see :func:`synthetic_zoo`.

    Parameters
    ----------
    allow_empty : bool
        Return an empty :class:`Zoo` instead of raising when no package is bundled.

    Raises
    ------
    FormatError
        When the bundled zoo holds no model package (and ``allow_empty`` is False).

    Examples
    --------
    >>> import neuroadda_rt
    >>> isinstance(neuroadda_rt.default_zoo(allow_empty=True), neuroadda_rt.Zoo)
    True
    """
    return _bundled(_ZOO_DIR, allow_empty, "neuroadda-rt zoo build OUT --from-datasets MANIFEST.json ...")


def synthetic_zoo(*, allow_empty: bool = False) -> Zoo:
    """The synthetic zoo bundled with the package (``neuroadda_rt/zoo_synthetic/``): sources trained on
    a synthetic domain family (its ``family.json``), for the demo and the tests. Rankings with it warn
    that its sources are synthetic; use :func:`default_zoo` on real data.

    Parameters
    ----------
    allow_empty : bool
        Return an empty :class:`Zoo` instead of raising when no package is bundled.

    Examples
    --------
    >>> import neuroadda_rt
    >>> isinstance(neuroadda_rt.synthetic_zoo(allow_empty=True), neuroadda_rt.Zoo)
    True
    """
    return _bundled(_SYNTHETIC_ZOO_DIR, allow_empty, "neuroadda-rt zoo build OUT")
