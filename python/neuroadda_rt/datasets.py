"""Data sets described by a small JSON manifest.

A manifest names an image source, an optional label source with its convention, the
biology and imaging (organism, tissue, modality, voxel size) and the train/test split.
Relative paths are relative to a *data root* given by the caller (``--data-root`` on the
CLI, ``data_root=`` here) or the environment variable ``NEUROADDA_DATA``; the data never
enters the repository. A manifest whose paths are all absolute needs no data root. Example (``examples/datasets/isbi2012.json``)::

    {
      "name": "isbi2012",
      "organism": "Drosophila melanogaster", "tissue": "larval ventral nerve cord",
      "modality": "ssTEM", "voxel_size_nm": [50, 4, 4],
      "image": "isbi2012_drosophila_l1_vnc/data/membrane/train/image",
      "labels": "isbi2012_drosophila_l1_vnc/data/membrane/train/label",
      "label_kind": "membrane", "membrane_value": 0,
      "splits": {"train": {"z": [0, 20]}, "test": {"z": [20, 30]}}
    }

Fields
------
``image``, ``labels``
    A path (``file.h5:dataset`` allowed) or ``{"path": ..., "key": ...}``; anything
    :func:`~neuroadda_rt.open_volume` reads. ``labels`` may be null.
``label_kind``
    ``"instances"`` (ids, 0 = boundary/unlabelled), ``"membrane"`` (binary mask: polarity
    by ``membrane_value``, the value meaning membrane, or ``membrane_threshold`` +
    ``membrane_polarity`` ``"bright"``/``"dark"`` for soft masks), ``"semantic"`` (a
    foreground mask, e.g. mitochondria; instances are its connected components) or
    ``"none"``.
``splits``
    ``{name: {"z": [start, stop], "image": ..., "labels": ..., "label_kind": ...}}``; each
    entry may override the top-level sources; ``z`` selects a slab of slices.
``min_fragment_size``
    Membrane → instances: fragments smaller than this are merged into neighbours (default 0).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import FormatError, InputValueError, ShapeError
from .io import Volume, open_volume
from .labels import label_interior, membrane_to_instances, relabel_consecutive

__all__ = ["Dataset", "resolve_data_root", "DATA_ENV"]

DATA_ENV = "NEUROADDA_DATA"
LABEL_KINDS = ("instances", "membrane", "semantic", "none")


def resolve_data_root(data_root=None) -> Path:
    """The data root: the argument, else ``$NEUROADDA_DATA``; a clear error when neither is set
    or the folder is missing."""
    root = data_root if data_root is not None else os.environ.get(DATA_ENV)
    if root is None:
        raise FormatError(f"no data root: pass --data-root / data_root= or set {DATA_ENV}")
    p = Path(root).expanduser()
    if not p.is_dir():
        raise FormatError(f"{p}: data root is not a folder (from {'argument' if data_root is not None else DATA_ENV})")
    return p


def _source_specs(manifest: dict) -> list:
    """Every image/labels source a manifest names (top level and per split), nulls left out."""
    specs = [manifest.get("image"), manifest.get("labels")]
    splits = manifest.get("splits")
    if isinstance(splits, dict):
        for sp in splits.values():
            if isinstance(sp, dict):
                specs += [sp.get("image"), sp.get("labels")]
    return [s for s in specs if s is not None]


def _relative_paths(manifest: dict) -> list[str]:
    """The manifest's source paths that are relative (they need a data root)."""
    return [rel for rel, _ in map(_source, _source_specs(manifest)) if not Path(rel).expanduser().is_absolute()]


def _source(spec) -> tuple[str, str | None]:
    if isinstance(spec, str):
        return spec, None
    if isinstance(spec, dict) and "path" in spec:
        return spec["path"], spec.get("key")
    raise FormatError(f"expected a source path or {{'path': ..., 'key': ...}}, got {spec!r}")


@dataclass
class Dataset:
    """An EM data set from a manifest: lazy images, labels in a known convention, splits.

    Examples
    --------
    >>> ds = Dataset.from_json("examples/datasets/gala_fibsem.json", data_root="../shared/em_data")  # doctest: +SKIP
    >>> img = ds.image("train")          # a lazy Volume                                               # doctest: +SKIP
    >>> lab = ds.labels("train")         # uint32 instances, same shape                                # doctest: +SKIP
    """

    manifest: dict
    data_root: Path | None  # None when every path of the manifest is absolute
    source: str | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    # -- construction
    @classmethod
    def from_json(cls, path, *, data_root=None) -> "Dataset":
        """Read a manifest file; ``data_root`` (or ``$NEUROADDA_DATA``) anchors its relative paths
        (not needed when every path is absolute)."""
        path = Path(path)
        try:
            manifest = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise FormatError(f"{path}: no such manifest") from exc
        except (OSError, ValueError) as exc:
            raise FormatError(f"{path}: not a JSON manifest: {exc}") from exc
        return cls.from_dict(manifest, data_root=data_root, source=str(path))

    @classmethod
    def from_dict(cls, manifest: dict, *, data_root=None, source: str | None = None) -> "Dataset":
        """Build from an already-parsed manifest (validated here)."""
        if not isinstance(manifest, dict):
            raise FormatError(f"{source or '<manifest>'}: expected a JSON object, got {type(manifest).__name__}")
        where = source or manifest.get("name", "<manifest>")
        for k in ("name", "image"):
            if k not in manifest:
                raise FormatError(f"{where}: manifest lacks the required field {k!r}")
        kinds = {manifest.get("label_kind", "none" if manifest.get("labels") is None else "instances")}
        kinds |= {s.get("label_kind") for s in manifest.get("splits", {}).values() if s.get("label_kind")}
        bad = kinds - set(LABEL_KINDS)
        if bad:
            raise FormatError(f"{where}: expected label_kind in {LABEL_KINDS}, got {sorted(bad)}")
        relative = _relative_paths(manifest)
        if not relative:
            # every path is absolute: the root is not needed, so a missing or stale one is no error
            try:
                root = resolve_data_root(data_root)
            except FormatError:
                root = None
        else:
            try:
                root = resolve_data_root(data_root)
            except FormatError as exc:
                raise FormatError(f"{exc}; {where} has relative paths that need it: {relative[:5]}") from exc
        return cls(manifest=manifest, data_root=root, source=source)

    # -- metadata
    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def organism(self) -> str | None:
        return self.manifest.get("organism")

    @property
    def tissue(self) -> str | None:
        return self.manifest.get("tissue")

    @property
    def modality(self) -> str | None:
        return self.manifest.get("modality")

    @property
    def voxel_size_nm(self) -> tuple[float, ...] | None:
        v = self.manifest.get("voxel_size_nm")
        return None if v is None else tuple(float(x) for x in v)

    @property
    def splits(self) -> list[str]:
        return list(self.manifest.get("splits", {"all": {}}))

    def label_kind(self, split: str = "train") -> str:
        s = self._split(split)
        if "label_kind" in s:
            return s["label_kind"]
        labels = s.get("labels", self.manifest.get("labels"))
        return self.manifest.get("label_kind", "none" if labels is None else "instances")

    def __repr__(self) -> str:
        return (f"Dataset({self.name!r}, {self.organism}, {self.tissue}, {self.modality}, "
                f"voxel_size_nm={self.voxel_size_nm}, splits={self.splits})")

    # -- data
    def _split(self, split: str) -> dict:
        splits = self.manifest.get("splits")
        if splits is None:
            if split not in ("all", "train"):
                raise InputValueError(f"{self.name}: no splits in the manifest; expected 'all', got {split!r}")
            return {}
        if split not in splits:
            raise InputValueError(f"{self.name}: expected a split in {list(splits)}, got {split!r}")
        return splits[split]

    def _open(self, spec, split) -> Volume:
        rel, key = _source(spec)
        if Path(rel).expanduser().is_absolute():
            path = Path(rel).expanduser()
        elif self.data_root is None:
            raise FormatError(f"{rel}: a relative path needs a data root (data set {self.name!r}, split {split!r}): "
                              f"pass --data-root / data_root= or set {DATA_ENV}")
        else:
            path = self.data_root / rel
        if not path.exists() and not Path(str(path).split(":")[0]).exists():
            raise FormatError(f"{path}: missing (data set {self.name!r}, split {split!r}; data root {self.data_root})")
        v = open_volume(str(path), key=key, voxel_size_nm=None)
        if v.voxel_size_nm is None and self.voxel_size_nm is not None and len(self.voxel_size_nm) == v.ndim:
            v.voxel_size_nm = self.voxel_size_nm
        if v.voxel_size_nm is None and self.voxel_size_nm is not None and v.ndim == 2 and len(self.voxel_size_nm) == 3:
            v.voxel_size_nm = self.voxel_size_nm[1:]
        z = self._split(split).get("z")
        if z is not None:
            z0, z1 = int(z[0]), int(z[1])
            if v.ndim != 3 or not 0 <= z0 < z1 <= v.shape[0]:
                raise ShapeError(f"{path}: split {split!r} asks for slices [{z0}, {z1}) of a volume of shape {v.shape}")
            v = v.z_slab(z0, z1)
        return v

    def image(self, split: str = "train") -> Volume:
        """The split's image as a lazy :class:`~neuroadda_rt.Volume`."""
        spec = self._split(split).get("image", self.manifest["image"])
        return self._open(spec, split)

    def has_labels(self, split: str = "train") -> bool:
        return self.label_kind(split) != "none"

    def raw_labels(self, split: str = "train") -> Volume:
        """The split's label source as stored (lazy), in its own convention."""
        if not self.has_labels(split):
            raise InputValueError(f"{self.name}: split {split!r} has no labels (label_kind 'none')")
        spec = self._split(split).get("labels", self.manifest.get("labels"))
        if spec is None:
            raise FormatError(f"{self.source or self.name}: label_kind is {self.label_kind(split)!r} but no labels source")
        lab = self._open(spec, split)
        img = self.image(split)
        if lab.shape != img.shape:
            raise ShapeError(f"{lab.path}: labels have shape {lab.shape}, expected the image shape {img.shape} "
                             f"({img.path}, split {split!r})")
        return lab

    def labels(self, split: str = "train") -> np.ndarray:
        """The split's labels as uint32 instances (0 = boundary/unlabelled), same shape as the image.

        ``membrane`` masks become 2-D connected components of the interior per slice (small
        fragments merged, see the manifest's ``min_fragment_size``); ``semantic`` masks
        become connected components of the foreground. A new array (cached per split).
        """
        if split in self._cache:
            return self._cache[split].copy()
        kind = self.label_kind(split)
        raw = np.asarray(self.raw_labels(split))
        if kind == "instances":
            if raw.dtype.kind not in "ui":
                raise FormatError(f"{self.name}: instance labels must be integers, got dtype {raw.dtype}")
            out = relabel_consecutive(raw)
        elif kind == "membrane":
            out = membrane_to_instances(self._membrane_mask(raw), min_size=int(self.manifest.get("min_fragment_size", 0)),
                                        per_slice=True)
        elif kind == "semantic":
            out = label_interior(raw > int(self.manifest.get("foreground_threshold", 0)), per_slice=True)
            out = relabel_consecutive(out)
        else:  # pragma: no cover - has_labels guards it
            raise InputValueError(f"{self.name}: no labels")
        self._cache[split] = out
        return out.copy()

    def membrane(self, split: str = "train") -> np.ndarray:
        """Bool membrane mask (True = membrane) for ``label_kind == "membrane"`` splits."""
        if self.label_kind(split) != "membrane":
            raise InputValueError(f"{self.name}: split {split!r} is not a membrane-mask data set")
        return self._membrane_mask(np.asarray(self.raw_labels(split)))

    def _membrane_mask(self, raw: np.ndarray) -> np.ndarray:
        m = self.manifest
        if raw.dtype == bool:
            memb = raw if m.get("membrane_value", True) in (True, 1) else ~raw
        elif "membrane_value" in m:
            memb = raw == m["membrane_value"]
        else:
            thr = float(m.get("membrane_threshold", 127))
            memb = raw > thr if m.get("membrane_polarity", "bright") == "bright" else raw <= thr
        return memb
