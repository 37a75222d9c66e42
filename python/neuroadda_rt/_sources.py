"""What ranking and tile selection share: the target volume, its tile sample, and the source models.

:func:`~neuroadda_rt.rank_sources` and :func:`~neuroadda_rt.select_tiles` (and the study runner,
which must compute exactly what they compute) take the same kinds of inputs. This module turns
them into one contract each:

* a *target* (path, array, :class:`~neuroadda_rt.Volume` or :class:`~neuroadda_rt.datasets.Dataset`)
  into a sliceable volume (:func:`as_volume`) and a seeded sample of raw 2-D tiles
  (:func:`sample_target_tiles`);
* a *source* (a :class:`~neuroadda_rt.package.ModelPackage` or its folder) into a
  :class:`PackageSource`: exactly what ranking needs (name, identity, feature level, pooling,
  reference features, intensity rule) and how its encoder embeds raw tiles.

Tiles stay raw here: the runtime applies the model's intensity rule, once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from .datasets import Dataset
from .errors import InputValueError, ShapeError
from .io import Volume, open_volume
from .package import ModelPackage, Zoo, is_synthetic, load_model
from .runtime import FeatureExtractor, config_feature_level
from .tiles import Tiles, sample_tiles

__all__ = ["RankableSource", "PackageSource", "as_source", "as_volume", "iter_zoo", "load_package",
           "sample_target_tiles", "volume_shape", "describe_target", "fit_tile_size", "reference_tile_size",
           "source_facts", "target_facts"]


# --------------------------------------------------------------------------------------------
# targets
# --------------------------------------------------------------------------------------------
def as_volume(target, *, what: str = "target"):
    """A path, array, ``Volume`` or ``Dataset`` as something tiles can be cut from.

    Arrays and volumes are used as they are (no copy); a ``Dataset`` contributes the image of its
    train split; a path (``file.h5:dataset`` included) or a foreign array (h5py, zarr) is opened
    lazily. Whatever the kind, the result must be a non-empty 2-D image or 3-D volume: a 4-D
    array (channels, time) or a scalar (0-D) dataset is refused with :class:`ShapeError`
    (``what`` names the input in the message).
    """
    volume = _as_volume(target, what)
    shape = volume_shape(volume)
    problem = None
    if len(shape) not in (2, 3):
        problem = (f"expected a 2-D image or 3-D volume as {what}, got "
                   + ("a scalar (0-D) dataset" if not shape else f"shape {shape}"))
    elif 0 in shape:
        problem = f"expected a non-empty {what}, got shape {shape}"
    if problem is not None:
        if isinstance(target, (str, os.PathLike)) and isinstance(volume, Volume):
            volume.close()  # we opened it (a path): release the file
        name = getattr(volume, "path", None) or (str(target) if isinstance(target, (str, os.PathLike)) else None)
        raise ShapeError(f"{name}: {problem}" if name else problem)
    return volume


def _as_volume(target, what: str):
    if isinstance(target, (str, os.PathLike)):
        path = str(target)
        base = path if Path(path).exists() else path.split(":")[0]
        if not Path(base).exists():
            raise FileNotFoundError(f"{what} volume not found: {path}")
        return open_volume(path)
    if isinstance(target, np.ndarray):
        return target  # shape checked by as_volume
    if isinstance(target, Dataset):
        return target.image("train")
    if isinstance(target, Volume):
        return target
    if hasattr(target, "__array__") and hasattr(target, "shape"):  # h5py / zarr arrays: read lazily
        return open_volume(target)
    raise InputValueError(f"expected a {what} path, NumPy array, Volume or Dataset, got {type(target).__name__}")


def volume_shape(volume) -> tuple[int, ...]:
    return tuple(int(s) for s in volume.shape)


def sample_target_tiles(volume, n: int, size: int, seed: int) -> Tiles:
    """``n`` seeded random raw 2-D tiles of ``size`` and their corners (rows ``[z,] y, x``)."""
    shape = volume_shape(volume)
    if min(shape[-2:]) < size:
        raise ShapeError(f"expected a target of at least {size}x{size} pixels per slice for tile_size={size}, "
                         f"got shape {shape} (leave the tile size unset to use the model's, fitted to the target)")
    return sample_tiles(volume, int(n), int(size), seed=int(seed))


def fit_tile_size(volume, size: int) -> tuple[int, str | None]:
    """``size``, or for a target whose slices are smaller, the largest multiple of 16 that fits, with a
    message saying so (None when nothing changed). Slices under 16 px are refused (:class:`ShapeError`)."""
    shape = volume_shape(volume)
    side = min(shape[-2:])
    size = int(size)
    if side >= size:
        return size, None
    fit = (side // 16) * 16
    if fit < 16:
        raise ShapeError(f"expected a target of at least 16x16 pixels per slice, got shape {shape}")
    return fit, (f"target slices are {shape[-2]}x{shape[-1]} px, smaller than the {size} px tiles: using {fit} px "
                 f"tiles (features of tiles other than the reference's size are less comparable; pass a smaller "
                 f"tile size to choose it yourself)")


def reference_tile_size(model, default: int = 256) -> int:
    """The tile edge a source model's reference features come from (its ``model.json``), else ``default``."""
    meta = getattr(model, "metadata", None)
    if meta is None and isinstance(model, (str, os.PathLike)) and (Path(model) / "model.json").is_file():
        from .runtime.source import read_json

        meta = read_json(Path(model) / "model.json")
    size = ((meta or {}).get("reference_features") or {}).get("tile_size")
    if size is None:
        size = getattr(model, "reference_tile_size", None)
    return int(size) if size else int(default)


def source_facts(src) -> dict:
    """What the ranking warnings need from a source: ``synthetic``, ``modality``, ``voxel_size_nm``."""
    meta = getattr(getattr(src, "package", None), "metadata", None) or getattr(src, "metadata", None) or {}
    return {"synthetic": bool(getattr(src, "synthetic", False)) or is_synthetic(meta),
            "modality": meta.get("modality") or getattr(src, "modality", None),
            "voxel_size_nm": meta.get("voxel_size_nm") or getattr(src, "voxel_size_nm", None)}


def target_facts(target, volume, *, modality=None, voxel_size_nm=None) -> dict:
    """The target's modality and voxel size: given, else from a Dataset's manifest or a Volume's header."""
    if modality is None and isinstance(target, Dataset):
        modality = target.modality
    if voxel_size_nm is None:
        if isinstance(target, Dataset):
            voxel_size_nm = target.voxel_size_nm
        else:
            voxel_size_nm = getattr(volume, "voxel_size_nm", None)
    return {"modality": modality, "voxel_size_nm": None if voxel_size_nm is None else
            [float(v) for v in voxel_size_nm]}


def describe_target(target, volume) -> dict:
    """The target as recorded in a ranking's or selection's settings."""
    d: dict = {"shape": list(volume_shape(volume)), "dtype": str(volume.dtype)}
    if isinstance(target, (str, os.PathLike)):
        d["path"] = str(target)
    elif isinstance(target, np.ndarray):
        d["source"] = "array"
    else:
        d["source"] = type(target).__name__
    return d


# --------------------------------------------------------------------------------------------
# sources
# --------------------------------------------------------------------------------------------
@runtime_checkable
class RankableSource(Protocol):
    """What ranking needs from a source model (a :class:`PackageSource`, or a study's own)."""

    name: str
    path: str | None
    sha256: str
    feature_level: int
    pooling: str
    reference_features: np.ndarray
    reference_tile_size: int | None
    normalization: dict

    def embed(self, tiles: np.ndarray, *, backend: str, device: str, batch_size: int,
              progress: bool = False) -> np.ndarray:
        """``(n, d)`` float32 pooled encoder features of raw tiles (the intensity rule applied once)."""
        ...


@dataclass(frozen=True)
class PackageSource:
    """A :class:`~neuroadda_rt.package.ModelPackage` as a ranking source."""

    package: ModelPackage

    @property
    def name(self) -> str:
        return self.package.name

    @property
    def path(self) -> str:
        # absolute, so that a ranking.json / tiles.json still points at the model from elsewhere
        return str(self.package.path.resolve())

    @property
    def sha256(self) -> str:
        return self.package.sha256

    @property
    def feature_level(self) -> int:
        return config_feature_level(self.package.config)

    @property
    def pooling(self) -> str:
        return self.package.pooling

    @property
    def reference_features(self) -> np.ndarray:
        return np.asarray(self.package.reference_features, dtype=np.float32)

    @property
    def reference_tile_size(self) -> int | None:
        size = self.package.metadata["reference_features"].get("tile_size")
        return None if size is None else int(size)

    @property
    def normalization(self) -> dict:
        return self.package.normalization

    def embed(self, tiles: np.ndarray, *, backend: str = "auto", device: str = "auto", batch_size: int = 16,
              progress: bool = False) -> np.ndarray:
        fx = FeatureExtractor(self.package, backend=backend, device=device, pooling=self.pooling)
        return np.asarray(fx.features(tiles, batch_size=batch_size, progress=progress), dtype=np.float32)


def load_package(item) -> ModelPackage:
    """A loaded model package from a package or its folder."""
    if isinstance(item, ModelPackage):
        return item
    if isinstance(item, (str, os.PathLike)):
        if not Path(item).exists():
            raise FileNotFoundError(f"model package not found: {item}")
        return load_model(item)
    raise InputValueError(f"expected a ModelPackage or a model package folder, got {type(item).__name__}")


def as_source(item) -> RankableSource:
    """A ranking source from a :class:`RankableSource`, a package or a package folder."""
    if isinstance(item, (ModelPackage, str, os.PathLike)):
        return PackageSource(load_package(item))
    if isinstance(item, RankableSource):
        return item
    raise InputValueError(f"expected a model package, its folder or a RankableSource, got {type(item).__name__}")


def iter_zoo(zoo) -> list:
    """The zoo's entries as a list: a :class:`~neuroadda_rt.Zoo`, a zoo folder, one package folder,
    or a sequence of packages / package folders / sources (loaded packages for paths)."""
    if zoo is None:
        raise InputValueError("expected a Zoo, a zoo directory or a list of model packages, got None")
    if isinstance(zoo, (str, os.PathLike)):
        p = Path(zoo)
        if not p.exists():
            raise FileNotFoundError(f"zoo not found: {zoo}")
        zoo = [p] if (p / "model.json").exists() else Zoo(p)
    models = [load_package(m) if isinstance(m, (str, os.PathLike)) else m for m in zoo]
    if not models:
        raise InputValueError(f"expected at least one source model in the zoo, got none ({zoo!r})")
    return models
