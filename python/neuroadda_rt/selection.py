"""Source-free tile selection: which few target tiles to annotate (NeuroADDA step 2).

A pool of random target tiles is scored by the *source model alone* (no target labels): each
tile's uncertainty is :func:`~neuroadda_rt.tile_uncertainty` of the source model's probabilities.
NeuroADDA annotates the tiles whose uncertainty is closest to the pool's median: the most
uncertain tiles are mostly artefacts (folds, stains, defocus) and the least uncertain ones teach
the model nothing new.

Strategies
----------
``"median"``
    The n tiles whose uncertainty is closest to the pool median (NeuroADDA's rule).
``"random"``
    n tiles drawn uniformly from the pool (seeded).
``"max"`` / ``"min"``
    The n most / least uncertain tiles.
``"kcenter"``
    Greedy k-center (farthest-point) in the source encoder's feature space, started at the pool
    tile closest to the feature mean: diversity without regard to uncertainty.
``"median-diverse"``
    Greedy k-center restricted to the middle uncertainty band: pool tiles whose uncertainty rank
    lies within ``band`` (default 0.25, i.e. the 37.5th–62.5th percentiles) around the median,
    started at the tile closest to the median. Our extension: median-like difficulty, without
    near-duplicate tiles.

Ties are broken by pool index (the sampling order), so every strategy is deterministic for a seed.
Chosen tiles never overlap each other (a candidate overlapping an already chosen tile is skipped)
unless the pool has too few non-overlapping tiles. In 3-D, tiles that overlap in ``y, x`` count as
overlapping unless they are at least ``min_slice_gap`` slices apart (default 10): tiles a few sections
apart show the same neurites, and an annotator would paint them twice.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import numpy as np

from . import _atomic
from ._sources import (PackageSource, as_volume, describe_target, fit_tile_size, load_package, reference_tile_size,
                       sample_target_tiles)
from .errors import FormatError, InputValueError, require
from .package import ModelPackage
from .runtime import Predictor
from .uncertainty import tile_uncertainty

__all__ = ["select_tiles", "TileSelection", "STRATEGIES", "DEFAULT_BAND"]

STRATEGIES = ("median", "random", "max", "min", "kcenter", "median-diverse")

#: Width of the middle uncertainty band for "median-diverse", as a fraction of the pool.
DEFAULT_BAND = 0.25

#: Slices that must separate two chosen 3-D tiles overlapping in y, x. The same separation as between
#: annotated and test tiles in the evaluation protocol (docs/method.md).
DEFAULT_MIN_SLICE_GAP = 10


@dataclass
class TileSelection(_atomic.JsonRecord):
    """The tiles chosen for annotation and the scores of the pool they were chosen from.

    Attributes
    ----------
    coords : ndarray of int64, shape (n, ndim)
        Top-left corners of the chosen tiles (``y, x`` in 2-D, ``z, y, x`` in 3-D).
    scores : ndarray of float, shape (n,)
        Their uncertainty under the source model.
    pool_coords : ndarray of int64, shape (pool, ndim)
    pool_scores : ndarray of float, shape (pool,)
        The whole pool's coordinates and uncertainties (sampling order).
    indices : ndarray of int64, shape (n,)
        Positions of the chosen tiles in the pool.
    tile_size : int
    strategy, measure : str
    settings : dict
        Every setting used, including the source model and the target description.
    tiles : ndarray, optional
        The chosen raw tiles, (n, tile_size, tile_size), when kept.
    """

    coords: np.ndarray
    scores: np.ndarray
    pool_coords: np.ndarray
    pool_scores: np.ndarray
    indices: np.ndarray
    tile_size: int
    strategy: str
    measure: str
    settings: dict = field(default_factory=dict)
    tiles: np.ndarray | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.coords)

    def to_dict(self) -> dict:
        return {
            "coords": np.asarray(self.coords).tolist(),
            "scores": [float(s) for s in self.scores],
            "indices": np.asarray(self.indices).tolist(),
            "pool_coords": np.asarray(self.pool_coords).tolist(),
            "pool_scores": [float(s) for s in self.pool_scores],
            "tile_size": int(self.tile_size),
            "strategy": self.strategy,
            "measure": self.measure,
            "settings": self.settings,
        }

    @classmethod
    def from_json(cls, text_or_path) -> "TileSelection":
        text = _atomic.read_json_source(text_or_path, "selection")
        try:
            d = json.loads(text)
            return cls(coords=np.asarray(d["coords"], dtype=np.int64),
                       scores=np.asarray(d["scores"], dtype=np.float64),
                       pool_coords=np.asarray(d["pool_coords"], dtype=np.int64),
                       pool_scores=np.asarray(d["pool_scores"], dtype=np.float64),
                       indices=np.asarray(d["indices"], dtype=np.int64), tile_size=int(d["tile_size"]),
                       strategy=str(d["strategy"]), measure=str(d["measure"]), settings=d.get("settings", {}))
        except (ValueError, KeyError, TypeError) as exc:
            raise FormatError(f"expected a selection JSON written by TileSelection.to_json, got: {exc}") from exc


# --------------------------------------------------------------------------------------------
# strategies on precomputed scores / features (pure NumPy)
# --------------------------------------------------------------------------------------------
def _overlaps(a: np.ndarray, b: np.ndarray, size: int, gap: int = 1) -> bool:
    """Whether two tiles of edge ``size`` at corners a and b overlap: in ``y, x``, and in 3-D also
    fewer than ``gap`` slices apart (``gap=1``: the same slice only)."""
    if len(a) == 3 and abs(int(a[0]) - int(b[0])) >= gap:
        return False
    return bool(abs(int(a[-2]) - int(b[-2])) < size and abs(int(a[-1]) - int(b[-1])) < size)


def _take_in_order(order: np.ndarray, n: int, coords: np.ndarray | None, size: int, gap: int = 1) -> np.ndarray:
    """The first n of ``order`` skipping tiles that overlap an already taken one (then fill up)."""
    chosen: list[int] = []
    if coords is not None:
        for i in order:
            if len(chosen) == n:
                break
            if all(not _overlaps(coords[i], coords[j], size, gap) for j in chosen):
                chosen.append(int(i))
    for i in order:  # not enough disjoint tiles: allow overlaps rather than return fewer
        if len(chosen) == n:
            break
        if int(i) not in chosen:
            chosen.append(int(i))
    return np.asarray(chosen, dtype=np.int64)


def _kcenter(features: np.ndarray, n: int, start: int, candidates: np.ndarray,
             coords: np.ndarray | None, size: int, gap: int = 1) -> np.ndarray:
    """Greedy farthest-point selection among ``candidates`` starting at ``start``.

    Each step takes the candidate whose Euclidean distance to its nearest chosen tile is largest
    (ties: lowest pool index); candidates overlapping a chosen tile are excluded while possible.
    """
    f = np.asarray(features, dtype=np.float64)
    cand = np.asarray(candidates, dtype=np.int64)
    chosen = [int(start)]
    dmin = np.linalg.norm(f[cand] - f[start], axis=1)
    while len(chosen) < min(n, len(cand)):
        d = dmin.copy()
        d[np.isin(cand, chosen)] = -np.inf
        if coords is not None:
            blocked = np.array([any(_overlaps(coords[c], coords[j], size, gap) for j in chosen) for c in cand])
            if (~blocked & np.isfinite(d)).any():
                d[blocked] = -np.inf
        # argmax returns the first maximum: ties go to the lowest position in ``cand`` (sorted)
        k = int(np.argmax(d))
        chosen.append(int(cand[k]))
        dmin = np.minimum(dmin, np.linalg.norm(f[cand] - f[cand[k]], axis=1))
    return np.asarray(chosen, dtype=np.int64)


def _choose(strategy: str, scores: np.ndarray, n: int, *, seed: int = 0, features: np.ndarray | None = None,
            coords: np.ndarray | None = None, size: int = 0, band: float = DEFAULT_BAND,
            gap: int = DEFAULT_MIN_SLICE_GAP) -> np.ndarray:
    """Indices into the pool chosen by ``strategy`` (see the module docstring)."""
    s = np.asarray(scores, dtype=np.float64)
    idx = np.arange(len(s))
    if strategy == "median":
        med = float(np.median(s))
        order = np.lexsort((idx, np.abs(s - med)))
        return _take_in_order(order, n, coords, size, gap)
    if strategy == "max":
        return _take_in_order(np.lexsort((idx, -s)), n, coords, size, gap)
    if strategy == "min":
        return _take_in_order(np.lexsort((idx, s)), n, coords, size, gap)
    if strategy == "random":
        order = np.random.default_rng(seed).permutation(len(s))
        return _take_in_order(order, n, coords, size, gap)
    if features is None:
        raise InputValueError(f"strategy {strategy!r} needs encoder features")
    if strategy == "kcenter":
        f = np.asarray(features, dtype=np.float64)
        start = int(np.argmin(np.linalg.norm(f - f.mean(axis=0), axis=1)))
        return _kcenter(f, n, start, idx, coords, size, gap)
    if strategy == "median-diverse":
        med = float(np.median(s))
        order = np.lexsort((idx, np.abs(s - med)))  # by closeness to the median
        width = max(n, int(np.ceil(band * len(s))))
        band_idx = np.sort(order[:width])
        return _kcenter(features, n, int(order[0]), band_idx, coords, size, gap)
    raise InputValueError(f"expected strategy in {STRATEGIES}, got {strategy!r}")


# --------------------------------------------------------------------------------------------
# model glue
# --------------------------------------------------------------------------------------------
def _uncertainty_scores(pkg: ModelPackage, tiles: np.ndarray, *, measure: str, backend: str, device: str,
                        batch_size: int, progress: bool, chunk: int = 64) -> np.ndarray:
    """Uncertainty of every raw tile under the source model, computed chunk by chunk.

    The predictor applies the model's intensity rule (once). Only ``chunk`` tiles' probability
    maps exist at a time (a 2048-tile pool of 256² maps would be 512 MB of float32).
    """
    pred = Predictor(pkg, backend=backend, device=device, batch_size=batch_size)
    scores = np.empty(len(tiles), dtype=np.float64)
    bar = None
    if progress:
        bar = require("tqdm.auto", "runtime").tqdm(total=len(tiles), desc="scoring uncertainty", unit="tile")
    try:
        for i in range(0, len(tiles), chunk):
            probs = np.asarray(pred.predict_tiles(tiles[i:i + chunk]), dtype=np.float32)
            if probs.ndim == 3:
                probs = probs[:, None]
            scores[i:i + len(probs)] = np.asarray(tile_uncertainty(probs, measure=measure), dtype=np.float64)
            if bar is not None:
                bar.update(len(probs))
    finally:
        if bar is not None:
            bar.close()
    return scores


def select_tiles(target, model, n: int, *, strategy: str = "median", pool: int = 2048, tile_size: int | None = None,
                 seed: int = 0, measure: str = "entropy", band: float = DEFAULT_BAND, backend: str = "auto",
                 device: str = "auto", batch_size: int = 16, progress: bool = False,
                 keep_tiles: bool = True, min_slice_gap: int = DEFAULT_MIN_SLICE_GAP) -> TileSelection:
    """Choose ``n`` target tiles to annotate, scored by the source model alone.

    Parameters
    ----------
    target : path, ndarray, Volume or Dataset
        The target volume (raw intensities). Arrays are read, never copied whole or modified.
    model : model package or path
        The source model (usually ``rank_sources(...).best``).
    n : int
        Number of tiles to choose (``1 <= n <= pool``).
    strategy : {"median", "random", "max", "min", "kcenter", "median-diverse"}
        See the module documentation; ``"median"`` is NeuroADDA's rule.
    pool : int
        Number of random candidate tiles scored.
    tile_size : int, optional
        Tile edge in pixels. Default: the model's reference tile size (256 when it records none); a
        target slice smaller than the tile gets the largest multiple of 16 that fits, with a warning.
    seed : int
        Seeds the pool sample and the ``"random"`` strategy.
    measure : str
        Uncertainty measure passed to :func:`~neuroadda_rt.tile_uncertainty`.
    band : float
        Fraction of the pool, centred on the median, that ``"median-diverse"`` chooses from.
    backend, device, batch_size, progress
        Passed to the runtime.
    keep_tiles : bool
        Keep the chosen raw tiles in ``.tiles``.
    min_slice_gap : int
        In 3-D, two chosen tiles that overlap in ``y, x`` must be at least this many slices apart
        (default 10); ``1`` only keeps them off the same slice.

    Returns
    -------
    TileSelection

    Examples
    --------
    >>> import neuroadda_rt as nr
    >>> sel = nr.select_tiles("new_volume.tif", ranking.best, 4)      # doctest: +SKIP
    >>> sel.coords                                                     # doctest: +SKIP
    array([[ 3, 512, 128], ...])
    """
    n, pool, seed = int(n), int(pool), int(seed)
    if strategy not in STRATEGIES:
        raise InputValueError(f"expected strategy in {STRATEGIES}, got {strategy!r}")
    if n < 1:
        raise InputValueError(f"expected n >= 1, got {n}")
    if pool < n:
        raise InputValueError(f"expected pool >= n, got pool={pool} and n={n}")
    if not 0.0 < float(band) <= 1.0:
        raise InputValueError(f"expected 0 < band <= 1, got {band}")
    if isinstance(min_slice_gap, bool) or not isinstance(min_slice_gap, (int, np.integer)) or min_slice_gap < 1:
        raise InputValueError(f"expected min_slice_gap as an integer >= 1, got {min_slice_gap!r}")
    volume = as_volume(target)
    pkg = load_package(model)
    if tile_size is None:
        tile_size, note = fit_tile_size(volume, reference_tile_size(pkg))
        if note:
            logging.getLogger(__name__).warning("%s", note)
    tile_size = int(tile_size)
    tiles, coords = sample_target_tiles(volume, pool, tile_size, seed)

    scores = _uncertainty_scores(pkg, tiles, measure=measure, backend=backend, device=device,
                                 batch_size=batch_size, progress=progress)
    features = None
    if strategy in ("kcenter", "median-diverse"):
        features = PackageSource(pkg).embed(tiles, backend=backend, device=device, batch_size=batch_size,
                                            progress=progress)
    chosen = _choose(strategy, scores, n, seed=seed, features=features, coords=coords, size=tile_size,
                     band=band, gap=int(min_slice_gap))
    gap = int(min_slice_gap)
    picked = coords[chosen]
    # Overlaps are allowed only when the pool has too few disjoint tiles; say how many, never hide them.
    overlapping = sum(_overlaps(picked[i], picked[j], tile_size, gap)
                      for i in range(len(picked)) for j in range(i + 1, len(picked)))
    if overlapping:
        logging.getLogger(__name__).warning(
            "%d pair(s) of chosen tiles overlap (in y, x and fewer than %d slices apart): the pool had too few "
            "disjoint tiles; a larger pool or volume avoids this", overlapping, gap)
    settings = {"n": n, "strategy": strategy, "pool": pool, "tile_size": tile_size, "seed": seed,
                "overlapping_pairs": int(overlapping),
                "measure": measure, "band": float(band) if strategy == "median-diverse" else None,
                "min_slice_gap": int(min_slice_gap),
                "model": {"name": pkg.name, "path": str(pkg.path.resolve())},
                "target": describe_target(target, volume)}
    return TileSelection(coords=coords[chosen], scores=scores[chosen], pool_coords=coords, pool_scores=scores,
                         indices=chosen, tile_size=tile_size, strategy=strategy, measure=measure,
                         settings=settings, tiles=np.asarray(tiles[chosen]) if keep_tiles else None)
