"""Source ranking: which pretrained model transfers best to a new EM volume (NeuroADDA step 1).

For every source model in a zoo, a common sample of target tiles is embedded by *that source's own
encoder* and compared with the source's stored ``reference_features`` (encoder features of its own
training tiles) by the squared maximum mean discrepancy (MMD², Gaussian kernel) with a permutation
p-value. Sources are sorted by ascending MMD²: the source whose feature distribution is closest to the
target's is the most transferable (Sawmya et al., arXiv 2503.06196). No source images are needed.

Target features are the expensive part, so they are cached on disk under a key of (content hash of
the sampled target tiles and the volume's shape/dtype, tile coordinates and size, the model's
sha256, the pooling); a repeated call for the same target and zoo does not run any encoder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from . import _atomic
from .errors import FormatError, InputValueError, ShapeError

log = logging.getLogger("neuroadda_rt")

__all__ = ["rank_sources", "SourceRanking", "RankedSource", "default_cache_dir", "standardize"]

#: Version of the cache-key recipe; bump when what goes into a feature changes.
_CACHE_VERSION = 1


# --------------------------------------------------------------------------------------------
# helpers shared with selection.py and workflow.py
# --------------------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    """Where target features are cached: ``$NEUROADDA_CACHE`` or ``~/.cache/neuroadda_rt``."""
    env = os.environ.get("NEUROADDA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "neuroadda_rt"


def _as_volume(target):
    """Turn a path, array, ``Volume`` or ``Dataset`` into something ``sample_tiles`` can slice.

    Arrays are used as they are (no copy). A ``Dataset`` contributes its image volume.
    """
    if isinstance(target, (str, os.PathLike)):
        path = str(target)
        base = path.split(":")[0] if not Path(path).exists() else path
        if not Path(base).exists():
            raise FileNotFoundError(f"target volume not found: {path}")
        from .io import open_volume

        return open_volume(path)
    if isinstance(target, np.ndarray):
        if target.ndim not in (2, 3):
            raise ShapeError(f"expected a 2-D image or 3-D volume as target, got shape {target.shape}")
        if target.size == 0:
            raise ShapeError(f"expected a non-empty target, got shape {target.shape}")
        return target
    # a Dataset contributes the image volume of its train split
    if type(target).__name__ == "Dataset" and callable(getattr(target, "image", None)):
        return target.image("train")
    if hasattr(target, "shape") and hasattr(target, "__getitem__"):
        return target  # a lazy Volume or any array-like
    raise InputValueError(
        f"expected a target path, NumPy array, Volume or Dataset, got {type(target).__name__}")


def _volume_shape(volume) -> tuple[int, ...]:
    return tuple(int(s) for s in volume.shape)


def _sample(volume, n: int, size: int, seed: int):
    """``n`` deterministic random 2-D tiles of ``size`` with their coordinates (rows ``[z,] y, x``)."""
    from .tiles import sample_tiles

    shape = _volume_shape(volume)
    if min(shape[-2:]) < size:
        raise ShapeError(f"expected a target of at least {size}x{size} pixels per slice for tile_size={size}, "
                         f"got shape {shape}")
    out = sample_tiles(volume, int(n), int(size), seed=int(seed))
    tiles, coords = _split_tiles(out)
    return tiles, coords


def _split_tiles(out):
    """Accept ``sample_tiles``' result either as a (tiles, coords) pair or an object with attributes."""
    if isinstance(out, tuple) and len(out) == 2:
        tiles, coords = out
    else:
        tiles, coords = out.tiles, out.coords
    tiles = np.asarray(tiles)
    coords = np.asarray(coords, dtype=np.int64)
    if tiles.ndim == 4 and tiles.shape[1] == 1:
        tiles = tiles[:, 0]
    return tiles, coords


def _crop(volume, coords: np.ndarray, size: int) -> np.ndarray:
    """Crop 2-D tiles of ``size`` at ``coords`` (rows ``y, x`` for 2-D or ``z, y, x`` for 3-D)."""
    shape = _volume_shape(volume)
    coords = np.asarray(coords, dtype=np.int64).reshape(len(coords), -1)
    if coords.shape[1] != len(shape):
        raise ShapeError(f"expected coordinates with {len(shape)} columns for a volume of shape {shape}, "
                         f"got {coords.shape[1]}")
    out = []
    for c in coords:
        *z, y, x = (int(v) for v in c)
        if y < 0 or x < 0 or y + size > shape[-2] or x + size > shape[-1] or any(
                zz < 0 or zz >= shape[0] for zz in z):
            raise InputValueError(f"tile at {tuple(int(v) for v in c)} of size {size} lies outside the "
                                  f"volume of shape {shape}")
        sl = (*z, slice(y, y + size), slice(x, x + size))
        out.append(np.asarray(volume[sl]))
    return np.stack(out) if out else np.zeros((0, size, size))


def _content_hash(volume, tiles: np.ndarray, coords: np.ndarray, size: int) -> str:
    h = hashlib.sha256()
    h.update(repr((_volume_shape(volume), str(np.asarray(tiles).dtype), int(size))).encode())
    h.update(np.ascontiguousarray(coords, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(tiles).tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# model-package glue
# --------------------------------------------------------------------------------------------
def _load_package(item):
    """A loaded model package from a package object or a path."""
    if isinstance(item, (str, os.PathLike)):
        from .package import load_model

        if not Path(item).exists():
            raise FileNotFoundError(f"model package not found: {item}")
        return load_model(item)
    return item


def _iter_zoo(zoo) -> list:
    if zoo is None:
        raise InputValueError("expected a Zoo, a zoo directory or a list of model packages, got None")
    if isinstance(zoo, (str, os.PathLike)):
        p = Path(zoo)
        if not p.exists():
            raise FileNotFoundError(f"zoo not found: {zoo}")
        if (p / "model.json").exists():
            return [_load_package(p)]
        from .package import Zoo

        zoo = Zoo(p)
    models = [_load_package(m) for m in zoo]
    if not models:
        raise InputValueError(f"expected at least one source model in the zoo, got none ({zoo!r})")
    return models


def _meta(pkg) -> dict:
    for attr in ("meta", "metadata", "manifest", "info"):
        m = getattr(pkg, attr, None)
        if isinstance(m, dict):
            return m
    return {}


def _pkg_name(pkg) -> str:
    name = getattr(pkg, "name", None) or _meta(pkg).get("name")
    if name:
        return str(name)
    p = getattr(pkg, "path", None)
    return Path(p).name if p is not None else "model"


def _pkg_path(pkg) -> str | None:
    # absolute, so that a ranking.json / tiles.json still points at the model from another directory
    p = getattr(pkg, "path", None)
    return str(Path(p).resolve()) if p is not None else None


def _pkg_sha(pkg) -> str:
    """A digest identifying the package's network (its encoder and weights)."""
    for attr in ("sha256", "digest"):
        v = getattr(pkg, attr, None)
        if isinstance(v, str) and v:
            return v
    files = _meta(pkg).get("sha256") or _meta(pkg).get("files")
    if isinstance(files, dict) and files:
        return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    p = _pkg_path(pkg)
    if p and (Path(p) / "encoder.onnx").exists():
        h = hashlib.sha256()
        with open(Path(p) / "encoder.onnx", "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()
    raise InputValueError(f"cannot identify model {_pkg_name(pkg)!r}: it has no sha256 and no path")


def _pkg_pooling(pkg) -> str:
    m = _meta(pkg)
    for key in ("pooling", "feature_pooling"):
        if isinstance(m.get(key), str):
            return m[key]
    rf = m.get("reference_features")
    if isinstance(rf, dict) and isinstance(rf.get("pooling"), str):
        return rf["pooling"]
    return str(getattr(pkg, "pooling", None) or "mean")


def _pkg_feature_level(pkg) -> int | None:
    """Encoder level of the package's features (None when its network config is unknown)."""
    from .runtime import config_feature_level

    cfg = _meta(pkg).get("network") or getattr(pkg, "config", None)
    if not isinstance(cfg, dict) or "widths" not in cfg:
        return None
    return config_feature_level(cfg)


def _reference_features(pkg) -> np.ndarray:
    ref = getattr(pkg, "reference_features", None)
    if callable(ref):
        ref = ref()
    if ref is None:
        raise FormatError(f"model {_pkg_name(pkg)!r} has no reference_features")
    return np.asarray(ref, dtype=np.float32)


def _pkg_rule(pkg):
    m = _meta(pkg)
    return getattr(pkg, "normalization", None) or m.get("normalization") or m.get("input_normalization")


def _normalize(pkg, tiles: np.ndarray) -> np.ndarray:
    """Tiles as the runtime should see them.

    Integer tiles are normalised by the runtime with the package's rule; a per-input rule
    ("percentile") is applied here to each tile separately instead, so that a tile's features do
    not depend on which other tiles share its batch.
    """
    rule = _pkg_rule(pkg)
    name = rule.get("rule", rule.get("mode")) if isinstance(rule, dict) else rule
    if name == "percentile" and np.asarray(tiles).dtype.kind in "ui":
        from .io import normalize_intensity

        return np.stack([normalize_intensity(t, rule) for t in tiles]).astype(np.float32, copy=False)
    return tiles


def _embed(pkg, tiles: np.ndarray, *, pooling: str, backend: str = "auto", device: str = "auto",
           batch_size: int = 16, progress: bool = False) -> np.ndarray:
    from .runtime import FeatureExtractor

    x = _normalize(pkg, tiles)
    fx = FeatureExtractor(pkg, backend=backend, device=device, pooling=pooling)
    return np.asarray(fx.features(x, batch_size=batch_size, progress=progress), dtype=np.float32)


# --------------------------------------------------------------------------------------------
# disk cache (atomic writes)
# --------------------------------------------------------------------------------------------
def _cache_key(content: str, model_sha: str, pooling: str, size: int) -> str:
    raw = json.dumps({"v": _CACHE_VERSION, "content": content, "model": model_sha, "pooling": pooling,
                      "tile_size": int(size)}, sort_keys=True)
    return hashlib.sha256(raw.encode()).hexdigest()


def _cached_features(cache_dir: Path | None, key: str, n_rows: int, compute) -> tuple[np.ndarray, bool]:
    """Load features for ``key`` or compute and store them. Returns (features, was_cached)."""
    if cache_dir is None:
        return compute(), False
    path = Path(cache_dir) / "features" / key[:2] / f"{key}.npy"
    if path.exists():
        try:
            arr = np.load(path, allow_pickle=False)
            if arr.ndim == 2 and arr.shape[0] == n_rows and np.isfinite(arr).all():
                log.info("target features from cache %s", path)
                return arr.astype(np.float32, copy=False), True
            log.warning("ignoring a cache entry with unexpected shape %s: %s", arr.shape, path)
        except (OSError, ValueError) as exc:  # truncated or corrupt: recompute
            log.warning("ignoring an unreadable cache entry %s (%s)", path, exc)
    arr = compute()
    try:
        _atomic.save_npy(path, np.ascontiguousarray(arr, dtype=np.float32))
    except OSError as exc:  # a read-only cache must not stop the ranking
        log.warning("could not write the feature cache %s (%s)", path, exc)
    return arr, False


# --------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------
@dataclass
class RankedSource:
    """One source model's score against the target.

    Attributes
    ----------
    name, path : str
        The package's name and directory (``path`` is None for in-memory packages).
    mmd2 : float
        Unbiased MMD² between the source's reference features and the target features.
    p_value : float
        Permutation p-value of the MMD² two-sample test (small: distributions differ).
    sigma : float or None
        Gaussian kernel bandwidth used.
    n_reference, n_target : int
        Sample sizes of the two feature sets.
    sha256 : str
        Identity of the model used (the feature-cache key).
    cached : bool
        Whether the target features came from the disk cache.
    """

    name: str
    path: str | None
    mmd2: float
    p_value: float
    sigma: float | list | None = None
    n_reference: int = 0
    n_target: int = 0
    sha256: str = ""
    cached: bool = False
    model: Any = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("model", None)
        return d


class SourceRanking:
    """Source models sorted by ascending MMD² to the target (most transferable first).

    Attributes
    ----------
    entries : list of RankedSource
        Sorted ascending by MMD²; ties broken by name.
    settings : dict
        Every setting used (n_tiles, tile_size, seed, n_permutations, pooling, target description).
    target_coords : ndarray
        The coordinates of the target tiles embedded by every source.

    Examples
    --------
    >>> ranking = rank_sources(volume, zoo)          # doctest: +SKIP
    >>> ranking.best.path, ranking[0].mmd2            # doctest: +SKIP
    >>> ranking.to_frame()                            # doctest: +SKIP
    """

    def __init__(self, entries: Sequence[RankedSource], settings: dict | None = None,
                 target_coords: np.ndarray | None = None):
        self.entries = sorted(entries, key=lambda e: (e.mmd2, e.name))
        self.settings = dict(settings or {})
        self.target_coords = None if target_coords is None else np.asarray(target_coords, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self):
        return iter(self.entries)

    def __getitem__(self, i):
        return self.entries[i]

    def __repr__(self) -> str:
        rows = ", ".join(f"{e.name}: {e.mmd2:.4g} (p={e.p_value:.3g})" for e in self.entries[:5])
        more = "" if len(self.entries) <= 5 else f", ... {len(self.entries) - 5} more"
        return f"SourceRanking([{rows}{more}])"

    @property
    def best(self):
        """The most transferable source as a loaded model package (loaded from ``path`` if needed)."""
        if not self.entries:
            raise InputValueError("the ranking is empty")
        top = self.entries[0]
        if top.model is None:
            if top.path is None:
                raise InputValueError(f"the top source {top.name!r} has neither a loaded model nor a path")
            top.model = _load_package(top.path)
        return top.model

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    def to_dict(self) -> dict:
        return {
            "ranking": [dict(rank=i + 1, **e.to_dict()) for i, e in enumerate(self.entries)],
            "settings": self.settings,
            "target_coords": None if self.target_coords is None else self.target_coords.tolist(),
        }

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """The ranking as JSON text; also written atomically to ``path`` when given."""
        text = _atomic.dumps_json(self.to_dict())
        if path is not None:
            _atomic.write_text(path, text)
        return text

    @classmethod
    def from_json(cls, text_or_path) -> "SourceRanking":
        """Rebuild a ranking from :meth:`to_json` output (text or a file path)."""
        text = _atomic.read_json_source(text_or_path, "ranking")
        try:
            d = json.loads(text)
            entries = [RankedSource(**{k: v for k, v in r.items() if k != "rank"}) for r in d["ranking"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise FormatError(f"expected a ranking JSON written by SourceRanking.to_json, got: {exc}") from exc
        return cls(entries, d.get("settings"), d.get("target_coords"))

    def to_frame(self):
        """A pandas DataFrame, one row per source, in rank order (needs the ``report`` extra)."""
        from .errors import require

        pd = require("pandas", "report")
        rows = [dict(rank=i + 1, **e.to_dict()) for i, e in enumerate(self.entries)]
        return pd.DataFrame(rows).set_index("rank")


def _describe_target(target, volume) -> dict:
    d: dict[str, Any] = {"shape": list(_volume_shape(volume)), "dtype": str(getattr(volume, "dtype", "?"))}
    if isinstance(target, (str, os.PathLike)):
        d["path"] = str(target)
    elif isinstance(target, np.ndarray):
        d["source"] = "array"
    else:
        d["source"] = type(target).__name__
    return d


# --------------------------------------------------------------------------------------------
# the ranking
# --------------------------------------------------------------------------------------------
def rank_sources(target, zoo, *, n_tiles: int = 256, tile_size: int = 256, seed: int = 0,
                 n_permutations: int = 200, cache_dir: str | os.PathLike | None | bool = None,
                 progress: bool = False, backend: str = "auto", device: str = "auto",
                 batch_size: int = 16) -> SourceRanking:
    """Rank source models by MMD² between their reference features and the target's features.

    Parameters
    ----------
    target : path, ndarray, Volume or Dataset
        The new EM volume (2-D image or 3-D stack, raw intensities). Arrays are read, not copied
        or modified; only the sampled tiles are materialised.
    zoo : Zoo, path, or sequence of packages / package paths
        The candidate source models.
    n_tiles : int
        Number of random target tiles embedded by every source (the same tiles for all).
    tile_size : int
        Tile edge in pixels.
    seed : int
        Seeds the tile sample and the permutations; the result is deterministic for a seed.
    n_permutations : int
        Permutations for each MMD² p-value (0 skips the test and reports p = nan).
    cache_dir : path, None or False
        Feature cache root; None uses :func:`default_cache_dir` (``$NEUROADDA_CACHE`` or
        ``~/.cache/neuroadda_rt``), False disables caching.
    progress : bool
        Show a progress bar over the sources (and the encoder batches).
    backend, device, batch_size
        Passed to :class:`~neuroadda_rt.FeatureExtractor`.

    Returns
    -------
    SourceRanking
        Sorted ascending by MMD²; ``.best`` is the most transferable source.

    Examples
    --------
    >>> import neuroadda_rt as nr
    >>> ranking = nr.rank_sources("new_volume.h5:raw", nr.default_zoo(), n_tiles=64)  # doctest: +SKIP
    >>> print(ranking.to_frame()[["name", "mmd2", "p_value"]])                       # doctest: +SKIP
    """
    n_tiles, tile_size, seed, n_permutations = int(n_tiles), int(tile_size), int(seed), int(n_permutations)
    if n_tiles < 2:
        raise InputValueError(f"expected n_tiles >= 2 (MMD² needs two samples), got {n_tiles}")
    if tile_size < 1:
        raise InputValueError(f"expected tile_size >= 1, got {tile_size}")
    if n_permutations < 0:
        raise InputValueError(f"expected n_permutations >= 0, got {n_permutations}")
    volume = _as_volume(target)
    models = _iter_zoo(zoo)
    if cache_dir is None:
        cache: Path | None = default_cache_dir()
    elif cache_dir is False:
        cache = None
    else:
        cache = Path(cache_dir)

    tiles, coords = _sample(volume, n_tiles, tile_size, seed)
    content = _content_hash(volume, tiles, coords, tile_size)

    from .mmd import mmd2, mmd2_test

    entries = []
    it: Iterable = models
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(models, desc="ranking sources", unit="model")
        it = bar
    for pkg in it:
        name = _pkg_name(pkg)
        if bar is not None:
            bar.set_postfix_str(name)
        sha = _pkg_sha(pkg)
        pooling = _pkg_pooling(pkg)
        ref = _reference_features(pkg)
        ref_size = (_meta(pkg).get("reference_features") or {}).get("tile_size")
        if ref_size is not None and int(ref_size) != tile_size:
            log.warning("model %r: its reference features come from %s px tiles but the target is embedded in "
                        "%d px tiles; mean-pooled features depend on the tile size, so rank with tile_size=%s",
                        name, ref_size, tile_size, ref_size)
        key = _cache_key(content, sha, pooling, tile_size)
        feats, was_cached = _cached_features(
            cache, key, len(tiles),
            lambda pkg=pkg, pooling=pooling: _embed(pkg, tiles, pooling=pooling, backend=backend,
                                                    device=device, batch_size=batch_size))
        if feats.shape[1] != ref.shape[1]:
            raise ShapeError(f"model {name!r}: expected target features with {ref.shape[1]} columns like its "
                             f"reference_features, got {feats.shape[1]}")
        ref, feats = standardize(ref, feats)
        if n_permutations > 0:
            res = mmd2_test(ref, feats, n_permutations=n_permutations, seed=seed)
            stat = float(_field(res, ("mmd2", "statistic", "value")))
            p = float(_field(res, ("p_value", "pvalue")))
            sigma = _field(res, ("sigma", "bandwidth"), None)
        else:  # no test asked for (e.g. the atlas): the statistic alone
            stat, p, sigma = float(mmd2(ref, feats)), float("nan"), None
        entries.append(RankedSource(name=name, path=_pkg_path(pkg), mmd2=stat, p_value=p,
                                    sigma=_as_sigma(sigma), n_reference=len(ref),
                                    n_target=len(feats), sha256=sha, cached=was_cached, model=pkg))
    settings = {"n_tiles": n_tiles, "tile_size": tile_size, "seed": seed, "n_permutations": n_permutations,
                "kernel": "gaussian on features standardised by the source's reference mean/sd, median-heuristic "
                          "bandwidth on the pooled sample (mmd2_test default)",
                "pooling": sorted({_pkg_pooling(m) for m in models}),
                "feature_level": sorted({lv for lv in (_pkg_feature_level(m) for m in models) if lv is not None}),
                "target": _describe_target(target, volume),
                "cache_dir": None if cache is None else str(cache)}
    return SourceRanking(entries, settings, coords)


def standardize(ref: np.ndarray, feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both feature sets in the source's standardised coordinates: ``(x - mean_ref) / sd_ref`` per channel.

    The Gaussian kernel then weighs every channel by the source's own spread of it (a diagonal
    Mahalanobis kernel) instead of letting high-variance channels dominate; the statistics come from
    the reference features alone, so the ranking stays source-free. Channels the reference never
    varies get the floor ``1e-3 * max(sd_ref)``. Centring also keeps the float32
    ``|a|² + |b|² - 2 a·b`` distances of the MMD kernels accurate. New float32 arrays; inputs unchanged.
    """
    r = np.asarray(ref, dtype=np.float64)
    mu, sd = r.mean(axis=0), r.std(axis=0)
    sd = np.maximum(sd, max(1e-3 * float(sd.max(initial=0.0)), 1e-12))
    return (((r - mu) / sd).astype(np.float32),
            ((np.asarray(feats, dtype=np.float64) - mu) / sd).astype(np.float32))


def _as_sigma(sigma):
    if sigma is None:
        return None
    if np.ndim(sigma) == 0:
        return float(sigma)
    return [float(v) for v in sigma]


def _field(obj, names, default=...):
    for n in names:
        if isinstance(obj, dict) and n in obj:
            return obj[n]
        if hasattr(obj, n):
            return getattr(obj, n)
    if isinstance(obj, tuple) and default is ...:
        return obj[0] if names[0] in ("mmd2",) else obj[1]
    if default is ...:
        raise AttributeError(f"result has none of {names}")
    return default
