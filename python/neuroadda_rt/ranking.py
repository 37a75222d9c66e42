"""Source ranking: which pretrained model transfers best to a new EM volume (NeuroADDA step 1).

For every source model in a zoo, a common sample of target tiles is embedded by *that source's own
encoder* and compared with the source's stored ``reference_features`` (encoder features of its own
training tiles) by the squared maximum mean discrepancy (MMD², Gaussian kernel) with a permutation
p-value. Sources are sorted by ascending MMD²: the source whose feature distribution is closest to the
target's is the most transferable (Sawmya et al., arXiv 2503.06196). No source images are needed.

Options measured on real EM (``docs/results.md`` §5.3, ``docs/method.md``): which pooled statistics enter
the MMD² (``pooling``; by default the per-channel means of ``mean+std`` features), target tiles resampled
to each source's pixel size (``match_voxel_size``), and a calibration of the score (``calibration``).

Target features are the expensive part, so they are cached on disk under a key of everything that
changes a feature: the content hash of the sampled target tiles and the volume's shape/dtype, tile
coordinates and size, the model's sha256 (its files and network config), its intensity rule
(``normalization``), feature level, pooling, and the precision the encoder runs at; a repeated call
for the same target and zoo does not run any encoder, and two packages with the same weights but
another intensity rule never share an entry.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from . import _atomic
from ._cache import cache_dir as _cache_root
from ._digest import arrays_sha256, json_sha256
from ._sources import (PackageSource, RankableSource, as_source, as_volume, describe_target, fit_tile_size,
                       iter_zoo, load_package, sample_target_tiles, source_facts, target_facts, volume_shape)
from .errors import FormatError, InputValueError, ShapeError, require
from .io import load_npy
from .mmd import gaussian_kernel_matrix, median_sigma, mmd2, mmd2_test
from .tiles import resize_tiles

log = logging.getLogger("neuroadda_rt")

__all__ = ["rank_sources", "SourceRanking", "RankedSource", "default_cache_dir", "standardize", "ranking_warnings",
           "tile_size_of", "CALIBRATIONS", "POOLING_PARTS", "calibrated_score", "voxel_matched_size"]

#: How a source's MMD² becomes the score the ranking sorts by (:func:`calibrated_score`).
CALIBRATIONS = ("none", "null_z", "relative")

#: The pooled statistics a ranking may compare (``rank_sources(pooling=)``): ``"auto"`` (the default: the
#: per-channel means of ``mean+std`` features, a package's own features otherwise), ``"all"`` (every column
#: of the package's features), ``"mean"`` or ``"std"`` (those columns of ``mean+std`` features).
POOLING_PARTS = ("auto", "all", "mean", "std")

#: Version of the cache-key recipe; bump when what goes into a feature changes.
#: 2: the key holds the intensity rule, feature level and precision (v1 entries were shared by
#: packages that differ only in their normalization, and are never read again).
_CACHE_VERSION = 2

#: Precision of the encoder a ranking source runs when it does not say: ``PackageSource.embed``
#: runs the fp32 encoder on every backend (no fp16 engine, no int8 encoder).
_DEFAULT_PRECISION = "fp32"

#: Where target features are cached (the package's one cache directory; ``$NEUROADDA_CACHE`` wins).
default_cache_dir = _cache_root

# --------------------------------------------------------------------------------------------
# disk cache (atomic writes)
# --------------------------------------------------------------------------------------------
def _cache_key(content: str, src: RankableSource, size: int) -> str:
    """The feature-cache key: everything that changes a target feature (see the module docstring)."""
    try:
        normalization = json.loads(json.dumps(src.normalization, sort_keys=True, default=str))
    except (TypeError, ValueError) as exc:
        raise FormatError(f"model {src.name!r}: expected a JSON-serialisable intensity rule (normalization), "
                          f"got {src.normalization!r} ({exc})") from exc
    return json_sha256({"v": _CACHE_VERSION, "content": content, "model": src.sha256,
                        "normalization": normalization, "feature_level": int(src.feature_level),
                        "pooling": str(src.pooling), "tile_size": int(size),
                        "precision": str(getattr(src, "precision", _DEFAULT_PRECISION))})


def _cached_features(cache_dir: Path | None, key: str, n_rows: int, compute) -> tuple[np.ndarray, bool]:
    """Load features for ``key`` or compute and store them. Returns (features, was_cached)."""
    if cache_dir is None:
        return compute(), False
    path = Path(cache_dir) / "features" / key[:2] / f"{key}.npy"
    if path.exists():
        try:
            arr = load_npy(path)  # the header is checked against the file size before allocating
            if arr.ndim == 2 and arr.shape[0] == n_rows and np.isfinite(arr).all():
                log.info("target features from cache %s", path)
                return arr.astype(np.float32, copy=False), True
            log.warning("ignoring a cache entry with unexpected shape %s: %s", arr.shape, path)
        except (OSError, ValueError, EOFError, FormatError) as exc:  # empty, truncated or corrupt: recompute
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
    tile_size : int or None
        Edge of the target tiles this source embedded (its reference tile size unless overridden).
    self_mmd2 : float or None
        MMD² between two random halves of the source's own reference features (same kernel). The
        estimator is unbiased, so for a source's own data it is zero plus noise (either sign): a target
        MMD² near it is as close as the source's data is to itself; its size is not a scale.
    null_mmd2_95 : float or None
        The noise level of this ranking's MMD²: the 95th percentile of its permutation null, i.e. the
        MMD² that two samples of one distribution, of these sizes, exceed 1 time in 20 (None without
        permutations). Sources whose MMD² differ by less than it are not told apart by this sample.
    synthetic : bool
        The source was trained on synthetic images.
    modality, voxel_size_nm
        The source's imaging modality and voxel size, from its package.
    warnings : list of str
        What to keep in mind about this source's score (synthetic source, other modality, other
        pixel size, other tile size).
    score : float or None
        What the ranking sorts by: ``mmd2`` itself (``calibration="none"``) or its calibrated value
        (:func:`calibrated_score`). None in rankings written before calibrations (``mmd2`` is used).
    cut_size : int or None
        Edge in *target* pixels of the tiles cut for this source; differs from ``tile_size`` when the
        tiles were resampled to the source's pixel size (``match_voxel_size``).
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
    tile_size: int | None = None
    self_mmd2: float | None = None
    null_mmd2_95: float | None = None
    synthetic: bool = False
    modality: str | None = None
    voxel_size_nm: list | None = None
    warnings: list = field(default_factory=list)
    score: float | None = None
    cut_size: int | None = None
    model: Any = field(default=None, repr=False, compare=False)

    @property
    def sort_key(self) -> tuple:
        """``(score, name)``, or ``(mmd2, name)`` for entries without a score."""
        return (self.mmd2 if self.score is None else self.score, self.name)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("model", None)
        return d


class SourceRanking(_atomic.JsonRecord):
    """Source models sorted by ascending MMD² to the target (most transferable first).

    Attributes
    ----------
    entries : list of RankedSource
        Sorted ascending by score (MMD², or its calibration); ties broken by name.
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
        self.entries = sorted(entries, key=lambda e: e.sort_key)
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
        n_warn = len(self.warnings)
        return f"SourceRanking([{rows}{more}]" + (f", {n_warn} warning(s): see .warnings)" if n_warn else ")")

    @property
    def best(self):
        """The most transferable source as a loaded model package (loaded from ``path`` if needed)."""
        if not self.entries:
            raise InputValueError("the ranking is empty")
        top = self.entries[0]
        if top.model is None:
            if top.path is None:
                raise InputValueError(f"the top source {top.name!r} has neither a loaded model nor a path")
            top.model = load_package(top.path)
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

    @classmethod
    def from_json(cls, text_or_path) -> "SourceRanking":
        """Rebuild a ranking from :meth:`to_json` output (text or a file path)."""
        text = _atomic.read_json_source(text_or_path, "ranking")
        try:
            d = json.loads(text)
            known = set(RankedSource.__dataclass_fields__) - {"model"}
            entries = [RankedSource(**{k: v for k, v in r.items() if k in known}) for r in d["ranking"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise FormatError(f"expected a ranking JSON written by SourceRanking.to_json, got: {exc}") from exc
        return cls(entries, d.get("settings"), d.get("target_coords"))

    @property
    def warnings(self) -> list[str]:
        """Warnings about the whole ranking (e.g. every p-value at the permutation floor), then the
        sources' own, one line per warning prefixed with the names of the sources it applies to."""
        return ranking_warnings(self.to_dict())

    def to_frame(self):
        """A pandas DataFrame, one row per source, in rank order (needs the ``report`` extra).

        The ``warnings`` column holds each source's warnings joined by "; "; ``frame.attrs["warnings"]``
        holds every warning of the ranking (:attr:`warnings`)."""
        pd = require("pandas", "report")
        rows = []
        for i, e in enumerate(self.entries):
            d = dict(rank=i + 1, **e.to_dict())
            d["warnings"] = "; ".join(e.warnings)
            rows.append(d)
        frame = pd.DataFrame(rows).set_index("rank")
        frame.attrs["warnings"] = self.warnings
        return frame

    @property
    def best_tile_size(self) -> int | None:
        """The tile edge the top source was ranked with (what ``select`` and ``report`` default to)."""
        return tile_size_of(self.to_dict())


def ranking_warnings(ranking: dict) -> list[str]:
    """The warnings of a ranking's dict (``ranking.json``): the ranking's own (``settings.warnings``),
    then one line per source warning, prefixed with the names of every source it applies to."""
    out = [str(w) for w in ((ranking.get("settings") or {}).get("warnings") or [])]
    names: dict[str, list[str]] = {}
    for r in ranking.get("ranking") or []:
        for w in r.get("warnings") or []:
            names.setdefault(str(w), []).append(str(r.get("name")))
    return out + [f"{', '.join(n)}: {w}" for w, n in names.items()]


def tile_size_of(ranking: dict) -> int | None:
    """The tile edge of the top source of a ranking's dict (``ranking.json``): its entry's
    ``tile_size``, else the settings' ``tile_size`` (rankings written before per-source sizes)."""
    rows = ranking.get("ranking") or []
    if rows and rows[0].get("tile_size"):
        return int(rows[0]["tile_size"])
    size = (ranking.get("settings") or {}).get("tile_size")
    return int(size) if isinstance(size, (int, float)) and not isinstance(size, bool) else None


#: A source's in-plane pixel size may differ from the target's by this factor before the ranking warns.
VOXEL_RATIO_WARN = 1.5


def _in_plane(voxel) -> float | None:
    """Mean in-plane (y, x) pixel size in nm of a ``(z, y, x)`` or ``(y, x)`` voxel size, or None."""
    try:
        v = [float(x) for x in voxel]
    except (TypeError, ValueError):
        return None
    if len(v) not in (2, 3) or min(v) <= 0:
        return None
    return float(np.mean(v[-2:]))


def _norm_modality(m) -> str:
    return "".join(ch for ch in str(m or "").lower() if ch.isalnum())


def source_warnings(facts: dict, target: dict, *, tile_size: int | None, ref_tile_size: int | None,
                    resampled: bool = False) -> list[str]:
    """What to keep in mind about one source's score: synthetic training data, another modality than
    the target's (when known), an in-plane pixel size more than :data:`VOXEL_RATIO_WARN` times
    different (not when ``resampled``: the tiles were resampled to the source's pixel size), target tiles of
    another size than the reference's."""
    out = []
    if facts.get("synthetic"):
        out.append("trained on synthetic images, not real EM: its rank says how close the target is to a "
                   "synthetic domain")
    tm, sm = target.get("modality"), facts.get("modality")
    if tm and sm and _norm_modality(tm) != _norm_modality(sm) and not facts.get("synthetic"):
        out.append(f"modality {sm} differs from the target's {tm}")
    a, b = _in_plane(facts.get("voxel_size_nm")), _in_plane(target.get("voxel_size_nm"))
    if a and b and max(a / b, b / a) > VOXEL_RATIO_WARN and not resampled:
        out.append(f"in-plane pixel size {a:g} nm differs from the target's {b:g} nm by {max(a / b, b / a):.1f}x "
                   f"(> {VOXEL_RATIO_WARN}x): features see structures at another scale")
    if ref_tile_size is not None and tile_size is not None and ref_tile_size != tile_size:
        out.append(f"target tiles of {tile_size} px, reference tiles of {ref_tile_size} px: pooled features "
                   f"depend on the tile size")
    return out


def floor_warning(entries: Sequence[RankedSource], n_permutations: int) -> str | None:
    """A warning when every p-value sits at the permutation floor ``1 / (n_permutations + 1)``."""
    if n_permutations <= 0 or not entries:
        return None
    floor = 1.0 / (n_permutations + 1)
    if not all(np.isfinite(e.p_value) and e.p_value <= floor * (1 + 1e-9) for e in entries):
        return None
    scale = ", ".join(f"{e.name} {e.mmd2:.3g} vs {e.null_mmd2_95:.3g}" for e in entries
                      if e.null_mmd2_95 is not None)
    return (f"every p-value is at the permutation floor 1/({n_permutations}+1) = {floor:.3g}: every source's "
            f"features differ detectably from the target's, so the p-values do not order the sources; compare "
            f"the MMD² values with each other and with each source's noise level (the 95th percentile of its "
            f"permutation null: the MMD² two samples of one distribution reach 1 time in 20"
            + (f"; {scale}" if scale else "") + ")")


# --------------------------------------------------------------------------------------------
# the ranking
# --------------------------------------------------------------------------------------------
def voxel_matched_size(tile_size: int, source_nm: float, target_nm: float) -> int:
    """The edge in target pixels that covers the same field of view as ``tile_size`` source pixels:
    ``round(tile_size * source_nm / target_nm)`` (at least 1)."""
    if not (np.isfinite(source_nm) and np.isfinite(target_nm) and source_nm > 0 and target_nm > 0):
        raise InputValueError(f"expected positive finite pixel sizes in nm, got source {source_nm!r} and target "
                              f"{target_nm!r}")
    return max(1, int(round(int(tile_size) * float(source_nm) / float(target_nm))))


def calibrated_score(stat: float, calibration: str, *, null: np.ndarray | None = None, ref: np.ndarray | None = None,
                     feats: np.ndarray | None = None, sigma=None) -> float:
    """A source's MMD² as the score a ranking sorts by, so that scores of different encoders compare.

    Parameters
    ----------
    stat : float
        The unbiased MMD² of the source's reference features and the target's features.
    calibration : {"none", "null_z", "relative"}
        ``"none"``: ``stat`` itself. ``"null_z"``: ``(stat - mean(null)) / sd(null)`` over the
        permutation null of :func:`~neuroadda_rt.mmd2_test` (MMD² in units of its own sampling noise
        under this encoder's kernel; needs ``null`` with >= 2 values). ``"relative"``: ``stat`` divided
        by the within-sample kernel similarity ``mean_{i!=j} k(x_i, x_j) + mean_{i!=j} k(y_i, y_j)`` of
        the two (standardised) feature sets with the test's bandwidth (needs ``ref``, ``feats`` and
        ``sigma``): the share of the samples' own similarity that is lost between them, 0 for one
        distribution and 1 when no reference tile resembles any target tile.

    Returns
    -------
    float
    """
    if calibration == "none":
        return float(stat)
    if calibration == "null_z":
        null = None if null is None else np.asarray(null, dtype=np.float64)
        if null is None or null.size < 2:
            raise InputValueError("calibration 'null_z' needs the permutation null: expected n_permutations >= 2, "
                                  f"got {0 if null is None else null.size} permutations")
        sd = float(null.std(ddof=1))
        return float((stat - null.mean()) / max(sd, 1e-300))
    if calibration == "relative":
        if ref is None or feats is None or sigma is None:
            raise InputValueError("calibration 'relative' needs both feature sets and the kernel bandwidth")
        within = 0.0
        for a in (ref, feats):
            k = np.asarray(gaussian_kernel_matrix(a, a, sigma=sigma), dtype=np.float64)
            n = len(a)
            within += (k.sum() - np.trace(k)) / (n * (n - 1))
        return float(stat / within) if within > 0 else float("inf")
    raise InputValueError(f"expected calibration in {CALIBRATIONS}, got {calibration!r}")


def _check_voxel_size(given) -> None:
    """A target voxel size given explicitly must be 2 or 3 positive finite numbers (nm)."""
    if given is not None:
        try:
            v = [float(x) for x in given]
        except (TypeError, ValueError):
            raise InputValueError(f"expected target_voxel_size_nm as 2 or 3 numbers in nm ((z,) y, x), got {given!r}") \
                from None
        if len(v) not in (2, 3) or not all(np.isfinite(x) and x > 0 for x in v):
            raise InputValueError(f"expected target_voxel_size_nm as 2 or 3 positive finite numbers in nm "
                                  f"((z,) y, x), got {given!r}")


def rank_sources(target, zoo, *, n_tiles: int = 256, tile_size: int | None = None, seed: int = 0,
                 n_permutations: int = 200, cache_dir: str | os.PathLike | None | bool = None,
                 progress: bool = False, backend: str = "auto", device: str = "auto",
                 batch_size: int = 16, target_modality: str | None = None,
                 target_voxel_size_nm=None, match_voxel_size: bool = False, calibration: str = "none",
                 pooling: str = "auto") -> SourceRanking:
    """Rank source models by MMD² between their reference features and the target's features.

    Parameters
    ----------
    target : path, ndarray, Volume or Dataset
        The new EM volume (2-D image or 3-D stack, raw intensities). Arrays are read, not copied
        or modified; only the sampled tiles are materialised.
    zoo : Zoo, path, or sequence of packages / package paths / RankableSource
        The candidate source models (a :class:`~neuroadda_rt._sources.RankableSource` says what
        ranking needs from one; packages are wrapped in ``PackageSource``).
    n_tiles : int
        Number of random target tiles embedded by every source (the same tiles for all).
    tile_size : int, optional
        Tile edge in pixels. Default: each source's reference tile size (the tiles its reference
        features come from), so each is compared on its own terms; sources of one size share one
        tile sample. A target slice smaller than that default tile gets the largest multiple of 16
        that fits, with a warning in the ranking's warnings (a size given explicitly is used as given).
        With ``match_voxel_size`` it is the edge the *encoder* sees, in the source's pixels.
    seed : int
        Seeds the tile sample and the permutations; the result is deterministic for a seed.
    n_permutations : int
        Permutations for each MMD² p-value (0 skips the test and reports p = nan).
    cache_dir : path, None or False
        Feature cache root; None uses the package's cache directory (:func:`default_cache_dir`:
        ``$NEUROADDA_CACHE``, else the platform's user cache folder), False disables caching.
    progress : bool
        Show a progress bar over the sources (and the encoder batches).
    backend, device, batch_size
        Passed to :class:`~neuroadda_rt.FeatureExtractor`, which applies each model's intensity
        rule to the raw tiles (once).
    target_modality, target_voxel_size_nm : optional
        The target's imaging modality and voxel size (nm, ``(z, y, x)`` or ``(y, x)``), for the
        warnings and ``match_voxel_size``; default: what the target says (a Dataset's manifest, a
        Volume's voxel size). A voxel size that is not 2 or 3 positive numbers is an
        :class:`~neuroadda_rt.InputValueError`.
    match_voxel_size : bool
        Resample the target tiles to each source's in-plane pixel size before embedding: a tile of
        ``tile_size * source_nm / target_nm`` target pixels is cut (the same field of view as the
        source's tiles) and resized to the tile size (anti-aliased Gaussian pre-filter when shrinking,
        bilinear; :func:`~neuroadda_rt.tiles.resize_tiles`). Needs the target's voxel size
        (:class:`~neuroadda_rt.InputValueError` when unknown); a source whose package records none
        is embedded unresampled, with a warning. A cut larger than the target's slices is shrunk to
        fit (and its resized edge with it), with a warning.
    calibration : {"none", "null_z", "relative"}
        What the ranking sorts by (:func:`calibrated_score`): MMD² itself, its z-score against the
        permutation null, or MMD² relative to the samples' own kernel similarity. ``mmd2`` is
        always reported; ``score`` holds the sorted value.
    pooling : {"auto", "all", "mean", "std"}
        Which pooled statistics enter the MMD² (columns of the package's reference features and of the
        target's, so nothing is re-embedded): ``"all"``, every column; ``"mean"`` or ``"std"``, only
        the per-channel means or standard deviations of a package pooled by ``"mean+std"`` (``"mean"``
        also accepts a ``"mean"``-pooled package). ``"auto"`` (default): ``"mean"`` for ``mean+std``
        packages, ``"all"`` otherwise -- the choice measured on real EM in ``docs/results.md`` §5.3
        (the within-tile spread statistics follow contrast, noise and texture more than content).

    Returns
    -------
    SourceRanking
        Sorted ascending by score; ``.best`` is the most transferable source. Each entry carries
        its ``warnings`` (synthetic source; modality other than the target's; in-plane pixel size
        more than 1.5x different, unless resampled) and ``null_mmd2_95``, the 95th percentile of its
        permutation null (the noise level its MMD² is read against); ``settings["warnings"]`` says
        when every p-value sits at the permutation floor. :attr:`SourceRanking.warnings` lists them all.

    Examples
    --------
    >>> import neuroadda_rt as nr
    >>> ranking = nr.rank_sources("new_volume.h5:raw", nr.default_zoo(), n_tiles=64)  # doctest: +SKIP
    >>> print(ranking.to_frame()[["name", "mmd2", "p_value"]])                       # doctest: +SKIP
    """
    n_tiles, seed, n_permutations = int(n_tiles), int(seed), int(n_permutations)
    if tile_size is not None:
        tile_size = int(tile_size)
        if tile_size < 1:
            raise InputValueError(f"expected tile_size >= 1, got {tile_size}")
    if n_tiles < 2:
        raise InputValueError(f"expected n_tiles >= 2 (MMD² needs two samples), got {n_tiles}")
    if n_permutations < 0:
        raise InputValueError(f"expected n_permutations >= 0, got {n_permutations}")
    if calibration not in CALIBRATIONS:
        raise InputValueError(f"expected calibration in {CALIBRATIONS}, got {calibration!r}")
    if calibration == "null_z" and n_permutations < 2:
        raise InputValueError(f"calibration 'null_z' is a z-score against the permutation null: expected "
                              f"n_permutations >= 2, got {n_permutations}")
    if pooling not in POOLING_PARTS:
        raise InputValueError(f"expected pooling in {POOLING_PARTS}, got {pooling!r}")
    volume = as_volume(target)
    sources = [as_source(m) for m in iter_zoo(zoo)]
    if pooling in ("mean", "std"):
        ok = ("mean+std", "mean") if pooling == "mean" else ("mean+std",)
        bad = [s.name for s in sources if s.pooling not in ok]
        if bad:
            raise InputValueError(f"pooling={pooling!r} takes columns of 'mean+std' reference features; expected "
                                  f"every source pooled by {' or '.join(repr(o) for o in ok)}, got other poolings "
                                  f"for {bad}")
    if cache_dir is None:
        cache: Path | None = default_cache_dir()
    elif cache_dir is False:
        cache = None
    else:
        cache = Path(cache_dir)

    _check_voxel_size(target_voxel_size_nm)
    tfacts = target_facts(target, volume, modality=target_modality, voxel_size_nm=target_voxel_size_nm)
    target_nm = _in_plane(tfacts.get("voxel_size_nm") or ())
    if match_voxel_size and target_nm is None:
        raise InputValueError("match_voxel_size=True resamples the target to each source's pixel size: expected the "
                              "target's voxel size (target_voxel_size_nm=, `rank --voxel-size`, a Dataset manifest or "
                              f"a file that records it), got {tfacts.get('voxel_size_nm')!r}")
    notes: list[str] = []
    sizes: dict[str, int] = {}
    cuts: dict[str, int] = {}
    own_notes: dict[str, list[str]] = {}
    resampled: set[str] = set()
    side = min(volume_shape(volume)[-2:])
    for src in sources:
        own_notes[src.name] = []
        if tile_size is not None:  # asked for: used as given (a target too small for it is an error)
            size = tile_size
        else:
            size, note = fit_tile_size(volume, src.reference_tile_size or 256)
            if note and note not in notes:
                notes.append(note)
        cut = size
        src_nm = _in_plane(source_facts(src).get("voxel_size_nm") or ()) if match_voxel_size else None
        if match_voxel_size and src_nm is None:
            own_notes[src.name].append("no voxel size in its package: the target tiles were not resampled to it")
        elif src_nm is not None:
            resampled.add(src.name)
            cut = voxel_matched_size(size, src_nm, target_nm)
            if cut > side:  # the field of view does not fit: the largest that does, at the source's pixel size
                cut, size = side, voxel_matched_size(side, target_nm, src_nm)
                own_notes[src.name].append(
                    f"its field of view at {src_nm:g} nm needs more than the target's {side} px: {cut} px target "
                    f"tiles resampled to {size} px")
            if cut < 4 or size < 4:
                raise ShapeError(f"model {src.name!r}: resampling {cut} px target tiles to {size} px at its pixel "
                                 f"size {src_nm:g} nm (target {target_nm:g} nm) leaves too few pixels")
        sizes[src.name], cuts[src.name] = size, cut
    samples: dict[tuple[int, int], tuple] = {}
    for cut, size in sorted({(cuts[k], sizes[k]) for k in sizes}):
        tiles, coords = sample_target_tiles(volume, n_tiles, cut, seed)
        if cut != size:
            tiles = resize_tiles(tiles, size)
        # the key hashes the sampled (resampled) tiles' content, so a changed target is never served stale
        # features; the cut size tells apart two resamplings of the same tiles
        header = [list(volume_shape(volume)), str(tiles.dtype), size] + ([cut, "resize_tiles/1"] if cut != size else [])
        content = arrays_sha256(coords, tiles, header=header)
        samples[(cut, size)] = (tiles, coords, content)

    entries = []
    it: Iterable[RankableSource] = sources
    bar = None
    if progress:
        bar = require("tqdm.auto", "runtime").tqdm(sources, desc="ranking sources", unit="model")
        it = bar
    for src in it:
        if bar is not None:
            bar.set_postfix_str(src.name)
        size, cut = sizes[src.name], cuts[src.name]
        tiles, _, content = samples[(cut, size)]
        entry = _rank_one(src, tiles, seed=seed, n_permutations=n_permutations, cache=cache, content=content,
                          tile_size=size, backend=backend, device=device, batch_size=batch_size,
                          calibration=calibration, pooling=pooling)
        facts = source_facts(src)
        entry.tile_size, entry.cut_size, entry.synthetic = size, cut, bool(facts.get("synthetic"))
        entry.modality, entry.voxel_size_nm = facts.get("modality"), facts.get("voxel_size_nm")
        entry.warnings = source_warnings(facts, tfacts, tile_size=size, ref_tile_size=src.reference_tile_size,
                                         resampled=src.name in resampled) + own_notes[src.name]
        entries.append(entry)
    floor = floor_warning(entries, n_permutations)
    # in the result (SourceRanking.warnings, to_frame, ranking.json, the report), logged once in brief
    warnings = notes + ([floor] if floor else [])
    n_warn = len(warnings) + sum(len(e.warnings) for e in entries)
    if n_warn:
        log.info("the ranking carries %d warning(s): see SourceRanking.warnings", n_warn)
    distinct = sorted(set(sizes.values()))
    best = min(entries, key=lambda e: e.sort_key).name if entries else None
    coords = samples[(cuts[best], sizes[best])][1] if best is not None else None
    settings = {"n_tiles": n_tiles, "tile_size": distinct[0] if len(distinct) == 1 else None,
                "tile_sizes": sizes, "seed": seed, "n_permutations": n_permutations,
                "p_value_floor": (1.0 / (n_permutations + 1)) if n_permutations > 0 else None,
                "warnings": warnings, "target_modality": tfacts.get("modality"),
                "target_voxel_size_nm": tfacts.get("voxel_size_nm"),
                "kernel": "gaussian on features standardised by the source's reference mean/sd, median-heuristic "
                          "bandwidth on the pooled sample (mmd2_test default)",
                "pooling": pooling,
                "compared": {s.name: _compared(s.pooling, pooling) for s in sources},
                "feature_level": sorted({s.feature_level for s in sources}),
                "match_voxel_size": bool(match_voxel_size), "cut_sizes": cuts, "calibration": calibration,
                "target": describe_target(target, volume),
                "cache_dir": None if cache is None else str(cache)}
    return SourceRanking(entries, settings, coords)


def _compared(package_pooling: str, pooling: str) -> str:
    """What a source's MMD² compares: its package pooling, or which part of its ``mean+std`` features."""
    if pooling == "all" or package_pooling != "mean+std":
        return package_pooling
    return ("mean" if pooling == "auto" else pooling) + " of mean+std"


def _pooling_columns(src: RankableSource, pooling: str, n_columns: int) -> slice:
    """The columns ``pooling`` keeps (of ``mean+std`` features the per-channel means come first)."""
    if pooling == "all" or src.pooling != "mean+std":
        return slice(None)
    if n_columns % 2:
        raise ShapeError(f"model {src.name!r}: expected an even number of 'mean+std' feature columns, got {n_columns}")
    half = n_columns // 2
    return slice(half, n_columns) if pooling == "std" else slice(0, half)


def _rank_one(src: RankableSource, tiles: np.ndarray, *, seed: int, n_permutations: int, cache: Path | None,
              content: str, tile_size: int, backend: str, device: str, batch_size: int, calibration: str = "none",
              pooling: str = "all") -> RankedSource:
    """One source's MMD² (and p-value, and score) between its reference features and the target tiles' features."""
    ref = src.reference_features
    # a tile size other than the reference's is one of the entry's warnings (source_warnings)
    key = _cache_key(content, src, tile_size)
    feats, was_cached = _cached_features(
        cache, key, len(tiles),
        lambda: src.embed(tiles, backend=backend, device=device, batch_size=batch_size))
    if feats.shape[1] != ref.shape[1]:
        raise ShapeError(f"model {src.name!r}: expected target features with {ref.shape[1]} columns like its "
                         f"reference_features, got {feats.shape[1]}")
    cols = _pooling_columns(src, pooling, ref.shape[1])
    ref, feats = standardize(ref[:, cols], feats[:, cols])
    null = None
    if n_permutations > 0:
        res = mmd2_test(ref, feats, n_permutations=n_permutations, seed=seed)
        stat, p, sigma, null = float(res.mmd2), float(res.p_value), _as_sigma(res.sigma), res.null
    else:  # no test asked for (e.g. the atlas): the statistic alone
        stat, p, sigma = float(mmd2(ref, feats)), float("nan"), None
    score = calibrated_score(stat, calibration, null=null, ref=ref, feats=feats,
                             sigma=sigma if sigma is not None or calibration != "relative" else
                             median_sigma(ref, feats))
    model = src.package if isinstance(src, PackageSource) else None
    return RankedSource(name=src.name, path=src.path, mmd2=stat, p_value=p, sigma=sigma, n_reference=len(ref),
                        n_target=len(feats), sha256=src.sha256, cached=was_cached, model=model,
                        self_mmd2=_self_mmd2(ref, seed, sigma), score=score,
                        null_mmd2_95=None if null is None or not len(null) else float(np.quantile(null, 0.95)))


def _self_mmd2(ref: np.ndarray, seed: int, sigma) -> float | None:
    """MMD² between two random halves of a source's (standardised) reference features, with the kernel
    bandwidth of its ranking: the distance at which a sample is as close as the source is to itself."""
    if len(ref) < 4:
        return None
    perm = np.random.default_rng(seed).permutation(len(ref))
    half = len(ref) // 2
    a, b = ref[perm[:half]], ref[perm[half:2 * half]]
    return float(mmd2(a, b, sigma=sigma))


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


def _as_sigma(sigma) -> float | list[float]:
    return float(sigma) if np.ndim(sigma) == 0 else [float(v) for v in sigma]
