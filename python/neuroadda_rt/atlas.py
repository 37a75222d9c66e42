"""The domain atlas: where a dataset sits among known EM domains, and how that compares with phylogeny.

An atlas is built from the asymmetric MMD² matrix ``M[s, t]`` between EM domains (NeuroADDA, Sawmya
et al., arXiv 2503.06196, Figure 3):

* from a **zoo** and one target per source domain, ``M[s, t]`` is the MMD² between source ``s``'s
  stored ``reference_features`` and target ``t``'s tiles embedded by ``s``'s own encoder -- exactly the
  quantity :func:`~neuroadda_rt.rank_sources` ranks by, with its permutation p-value;
* from **feature banks** (``{name: (N, d) features}`` in one shared feature space), ``M`` is
  :func:`~neuroadda_rt.mmd2_matrix`, symmetric by construction.

The atlas symmetrises ``D = (M + Mᵀ) / 2`` (clipped at 0, zero diagonal: the unbiased MMD² estimator
can dip below 0 for near-identical domains), clusters it by average linkage (UPGMA, SciPy) and draws the
dendrogram next to the heatmap. :func:`compare_to_phylogeny` correlates the atlas with a species tree
(scikit-bio): the cophenetic correlation between the atlas dendrogram and the tree's patristic
distances, and a Mantel test of ``D`` against them with a permutation p-value.
"""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from scipy.cluster.hierarchy import cophenet, dendrogram, leaves_list, linkage
from scipy.spatial.distance import squareform
from scipy.stats import pearsonr

from . import _atomic
from ._sources import iter_zoo
from .errors import FormatError, InputValueError, ShapeError, require
from .mmd import median_sigma, mmd2_matrix, mmd2_test
from .ranking import rank_sources

__all__ = ["Atlas", "PhylogenyComparison", "domain_atlas", "compare_to_phylogeny", "reference_species_tree",
           "species_aliases"]

_METHODS = ("average", "single", "complete", "weighted")


# --------------------------------------------------------------------------------------------
# the atlas
# --------------------------------------------------------------------------------------------
@dataclass
class Atlas(_atomic.JsonRecord):
    """Pairwise MMD² between EM domains, its symmetrised distance and an average-linkage tree.

    Attributes
    ----------
    names : list of str
        Domain names, the row/column order of every matrix.
    mmd2 : ndarray, (k, k) float64
        ``M[s, t]``: MMD² of target ``t`` against source ``s`` (asymmetric for a zoo).
    p_values : ndarray, (k, k) float64 or None
        Permutation p-values of ``M`` (NaN where not computed), None when no test was run.
    distance : ndarray, (k, k) float64
        ``D = max((M + Mᵀ) / 2, 0)`` with a zero diagonal.
    linkage : ndarray, (k - 1, 4) float64
        SciPy linkage matrix of ``D`` (``method``, default average linkage).
    method : str
        The linkage method.
    settings : dict
        How the atlas was made (mode, tiles, seeds, ...).

    Examples
    --------
    >>> import numpy as np, neuroadda_rt as nr
    >>> rng = np.random.default_rng(0)
    >>> banks = {f"d{i}": rng.normal(i // 2, 1, size=(64, 8)).astype(np.float32) for i in range(4)}
    >>> atlas = nr.domain_atlas(banks)
    >>> atlas.names
    ['d0', 'd1', 'd2', 'd3']
    >>> atlas.leaves_order()[:2] in (['d0', 'd1'], ['d1', 'd0'], ['d2', 'd3'], ['d3', 'd2'])
    True
    """

    names: list[str]
    mmd2: np.ndarray
    p_values: np.ndarray | None = None
    method: str = "average"
    settings: dict = field(default_factory=dict)
    distance: np.ndarray = field(init=False, repr=False)
    linkage: np.ndarray = field(init=False, repr=False)

    def __post_init__(self):
        self.names = [str(n) for n in self.names]
        k = len(self.names)
        if k < 2:
            raise InputValueError(f"expected at least 2 domains for an atlas, got {k}")
        if len(set(self.names)) != k:
            raise InputValueError(f"expected unique domain names, got {self.names}")
        m = np.array(self.mmd2, dtype=np.float64)  # a copy: the atlas owns its matrices
        if m.shape != (k, k):
            raise ShapeError(f"expected a ({k}, {k}) MMD² matrix for {k} names, got shape {m.shape}")
        if not np.isfinite(m).all():
            raise InputValueError("expected a finite MMD² matrix, got NaN or inf entries")
        self.mmd2 = m
        if self.p_values is not None:
            p = np.array(self.p_values, dtype=np.float64)
            if p.shape != (k, k):
                raise ShapeError(f"expected a ({k}, {k}) p-value matrix, got shape {p.shape}")
            self.p_values = p
        if self.method not in _METHODS:
            raise InputValueError(f"expected a linkage method among {_METHODS}, got {self.method!r}")
        self.distance = symmetrised_distance(m)
        # optimal_ordering only flips subtrees (same clusters, same cophenetic distances) so that
        # neighbouring leaves are similar: the heatmap reads better.
        self.linkage = linkage(squareform(self.distance, checks=False), method=self.method,
                               optimal_ordering=k > 2)

    # -- derived quantities ---------------------------------------------------------------------
    @property
    def cophenetic(self) -> np.ndarray:
        """(k, k) cophenetic distances of the dendrogram (merge height of each pair)."""
        return squareform(cophenet(self.linkage))

    @property
    def cophenetic_correlation(self) -> float:
        """Pearson correlation between ``distance`` and the dendrogram's cophenetic distances:
        how faithfully the tree summarises the atlas (1 = an exact ultrametric)."""
        return _pearson(_upper(self.distance), _upper(self.cophenetic))

    def leaves_order(self) -> list[str]:
        """Domain names in dendrogram leaf order (the heatmap's row order)."""
        return [self.names[i] for i in leaves_list(self.linkage)]

    def nearest(self, name: str) -> str:
        """The domain closest to ``name`` by the symmetrised distance."""
        i = self._index(name)
        d = self.distance[i].copy()
        d[i] = np.inf
        return self.names[int(np.argmin(d))]

    def _index(self, name: str) -> int:
        try:
            return self.names.index(str(name))
        except ValueError:
            raise InputValueError(f"expected a domain name among {self.names}, got {name!r}") from None

    # -- export -----------------------------------------------------------------------------------
    def to_frame(self):
        """A tidy pandas DataFrame: one row per (source, target) pair with ``mmd2``, ``p_value``,
        ``distance`` and ``cophenetic`` (needs the ``report`` extra)."""
        pd = require("pandas", "report")
        rows = []
        coph = self.cophenetic
        for i, s in enumerate(self.names):
            for j, t in enumerate(self.names):
                rows.append({"source": s, "target": t, "mmd2": self.mmd2[i, j],
                             "p_value": np.nan if self.p_values is None else self.p_values[i, j],
                             "distance": self.distance[i, j], "cophenetic": coph[i, j]})
        return pd.DataFrame(rows)

    def to_dict(self) -> dict:
        return {
            "names": list(self.names),
            "mmd2": self.mmd2.tolist(),
            "p_values": None if self.p_values is None else [[_nan_to_none(v) for v in row]
                                                            for row in self.p_values.tolist()],
            "distance": self.distance.tolist(),
            "linkage": self.linkage.tolist(),
            "method": self.method,
            "leaves_order": self.leaves_order(),
            "cophenetic_correlation": self.cophenetic_correlation,
            "settings": self.settings,
        }

    @classmethod
    def from_json(cls, text_or_path) -> "Atlas":
        """Rebuild an atlas from :meth:`to_json` output (JSON text or a file path)."""
        text = _atomic.read_json_source(text_or_path, "atlas")
        try:
            d = json.loads(text)
            p = d.get("p_values")
            if p is not None:
                p = np.array([[np.nan if v is None else v for v in row] for row in p], dtype=np.float64)
            return cls(d["names"], np.asarray(d["mmd2"], dtype=np.float64), p, d.get("method", "average"),
                       d.get("settings") or {})
        except (ValueError, KeyError, TypeError) as exc:
            raise FormatError(f"expected an atlas JSON written by Atlas.to_json, got: {exc}") from exc

    # -- figure -----------------------------------------------------------------------------------
    def plot(self, path: str | os.PathLike | None = None, *, title: str | None = None,
             annotate: bool | None = None, dpi: int = 150):
        """Draw the dendrogram next to the heatmap of ``distance`` (rows in leaf order).

        Parameters
        ----------
        path : path, optional
            Where to save the figure (format from the suffix: .png, .svg, .pdf); written atomically.
        title : str, optional
            Figure title.
        annotate : bool, optional
            Print values in the cells (default: when there are at most 12 domains).
        dpi : int
            Resolution of raster output.

        Returns
        -------
        matplotlib.figure.Figure
        """
        require("matplotlib", "report")
        from matplotlib.figure import Figure

        k = len(self.names)
        order = leaves_list(self.linkage)
        d = self.distance[np.ix_(order, order)]
        labels = [self.names[i] for i in order]
        annotate = k <= 12 if annotate is None else bool(annotate)
        # Fixed axes positions (inches) so that dendrogram leaves line up with heatmap rows exactly.
        cell = 0.45 if k <= 20 else max(0.12, 9.0 / k)
        lab = 0.075 * max(len(s) for s in labels) + 0.2
        dendro_w, heat, cbar_w = 2.0, max(3.0, cell * k), 0.2
        left, gap, top = 0.3, 0.05, 0.55
        bottom = 0.62 * lab + 0.5
        width = left + dendro_w + gap + heat + lab + 0.25 + cbar_w + 0.9
        height = bottom + heat + top
        fig = Figure(figsize=(width, height))
        fx, fy = 1.0 / width, 1.0 / height
        ax_d = fig.add_axes([left * fx, bottom * fy, dendro_w * fx, heat * fy])
        ax_h = fig.add_axes([(left + dendro_w + gap) * fx, bottom * fy, heat * fx, heat * fy])
        ax_c = fig.add_axes([(left + dendro_w + gap + heat + lab + 0.25) * fx, bottom * fy, cbar_w * fx,
                             heat * fy])
        # SciPy puts leaf i at y = 10 i + 5; with ylim (10 k, 0) leaf i sits on heatmap row i.
        dendrogram(self.linkage, orientation="left", no_labels=True, ax=ax_d, color_threshold=0,
                   above_threshold_color="0.2")
        ax_d.set_ylim(10 * k, 0)
        ax_d.set_xlabel("average-linkage height" if self.method == "average" else f"{self.method} linkage")
        for side in ("top", "right", "left"):
            ax_d.spines[side].set_visible(False)
        ax_d.set_yticks([])
        im = ax_h.imshow(d, cmap="viridis_r", aspect="auto", interpolation="nearest")
        ax_h.set_xticks(range(k), labels, rotation=60, ha="right", rotation_mode="anchor")
        ax_h.set_yticks(range(k), labels)
        ax_h.yaxis.tick_right()
        if annotate:
            vmax = float(d.max()) if d.size else 1.0
            for i in range(k):
                for j in range(k):
                    ax_h.text(j, i, f"{d[i, j]:.2g}", ha="center", va="center", fontsize=7,
                              color="white" if d[i, j] > 0.5 * vmax else "black")
        fig.colorbar(im, cax=ax_c, label="(MMD²[s,t] + MMD²[t,s]) / 2")
        fig.suptitle(title or f"Domain atlas ({k} domains, {self.method} linkage)")
        if path is not None:
            _atomic.save_figure(fig, path, dpi=dpi)
        return fig


def symmetrised_distance(m: np.ndarray) -> np.ndarray:
    """``max((M + Mᵀ) / 2, 0)`` with a zero diagonal, as float64 (a new array).

    Clipping at 0 is needed because the unbiased MMD² estimate is negative for near-identical
    distributions, and linkage needs a non-negative dissimilarity.
    """
    m = np.asarray(m, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ShapeError(f"expected a square matrix, got shape {m.shape}")
    d = np.maximum(0.5 * (m + m.T), 0.0)
    np.fill_diagonal(d, 0.0)
    return d


# --------------------------------------------------------------------------------------------
# building an atlas
# --------------------------------------------------------------------------------------------
def domain_atlas(sources, targets: Mapping[str, Any] | None = None, *, method: str = "average",
                 n_tiles: int = 256, tile_size: int = 256, seed: int = 0, n_permutations: int = 0,
                 sigma: float | None = None, cache_dir=None, progress: bool = False,
                 backend: str = "auto", device: str = "auto") -> Atlas:
    """Build a domain atlas from a zoo (with target data) or from feature banks.

    Parameters
    ----------
    sources : Zoo, sequence of model packages / paths, or mapping name -> (N, d) array
        * a **mapping of feature banks** (every bank in one shared feature space, e.g. embedded by
          one encoder): ``M = mmd2_matrix(banks)``; ``targets`` must be None.
        * a **zoo**: ``targets`` maps every source model's name to that domain's target data
          (path, array, Volume or Dataset); column ``t`` of ``M`` is
          :func:`~neuroadda_rt.rank_sources` of target ``t`` against the whole zoo.
    targets : mapping name -> target, optional
        Target data per domain, keyed by the model names of the zoo (zoo mode only).
    method : {"average", "single", "complete", "weighted"}
        Linkage method; the paper's atlas uses average linkage (UPGMA).
    n_tiles, tile_size, seed, cache_dir, progress, backend, device
        Passed to :func:`~neuroadda_rt.rank_sources` (zoo mode).
    n_permutations : int
        Permutations for the MMD² p-values (0: no test, ``p_values`` is None). In feature-bank mode
        every ordered pair is tested with :func:`~neuroadda_rt.mmd2_test`.
    sigma : float, optional
        Gaussian bandwidth for feature-bank mode (default: ``mmd2_matrix``'s own choice, one
        bandwidth shared by every pair so that the entries are comparable).

    Returns
    -------
    Atlas

    Notes
    -----
    Feature banks are read, not modified; they are converted to C-contiguous float32 (a copy only
    when they are not already).

    Examples
    --------
    >>> import numpy as np, neuroadda_rt as nr
    >>> rng = np.random.default_rng(1)
    >>> banks = {"a": rng.normal(0, 1, (50, 4)), "b": rng.normal(0.1, 1, (50, 4)), "c": rng.normal(3, 1, (50, 4))}
    >>> nr.domain_atlas(banks).nearest("a")
    'b'
    >>> atlas = nr.domain_atlas(zoo, {"fly": "fly.h5:raw", "mouse": "mouse.h5:raw"})  # doctest: +SKIP
    >>> atlas.plot("atlas.png")                                                        # doctest: +SKIP
    """
    if isinstance(sources, Mapping) and targets is None:
        return _atlas_from_banks(sources, method=method, n_permutations=int(n_permutations), sigma=sigma,
                                 seed=int(seed))
    if isinstance(sources, Mapping):
        raise InputValueError("expected either feature banks (a mapping, with targets=None) or a zoo with "
                              "targets, got a mapping together with targets")
    if targets is None or not isinstance(targets, Mapping):
        raise InputValueError("expected targets={model name: target data} when building an atlas from a zoo, "
                              f"got {type(targets).__name__}")
    return _atlas_from_zoo(sources, targets, method=method, n_tiles=n_tiles, tile_size=tile_size, seed=seed,
                           n_permutations=n_permutations, cache_dir=cache_dir, progress=progress,
                           backend=backend, device=device)


def _check_banks(banks: Mapping[str, Any]) -> tuple[list[str], list[np.ndarray]]:
    names, arrays = [], []
    d = None
    for name, x in banks.items():
        a = np.asarray(x)
        if a.ndim != 2:
            raise ShapeError(f"expected feature bank {name!r} of shape (N, d), got shape {a.shape}")
        if a.shape[0] < 2:
            raise ShapeError(f"expected at least 2 feature rows in bank {name!r}, got {a.shape[0]}")
        if d is None:
            d = a.shape[1]
        elif a.shape[1] != d:
            raise ShapeError(f"expected every feature bank to have {d} columns, got {a.shape[1]} for {name!r}")
        if not np.issubdtype(a.dtype, np.number) or np.issubdtype(a.dtype, np.complexfloating):
            raise InputValueError(f"expected real numeric features in bank {name!r}, got dtype {a.dtype}")
        a = np.ascontiguousarray(a, dtype=np.float32)
        if not np.isfinite(a).all():
            raise InputValueError(f"expected finite features in bank {name!r}, got NaN or inf")
        names.append(str(name))
        arrays.append(a)
    if len(names) < 2:
        raise InputValueError(f"expected at least 2 feature banks, got {len(names)}")
    return names, arrays


def _atlas_from_banks(banks, *, method, n_permutations, sigma, seed) -> Atlas:
    names, arrays = _check_banks(banks)
    if n_permutations < 0:
        raise InputValueError(f"expected n_permutations >= 0, got {n_permutations}")
    if sigma is None:
        # One bandwidth for every pair (median heuristic on the pooled banks) so entries compare.
        sigma = _pooled_sigma(arrays, seed)
    m = np.asarray(mmd2_matrix(arrays, sigma=float(sigma)), dtype=np.float64)
    p = None
    if n_permutations > 0:
        k = len(arrays)
        p = np.full((k, k), np.nan)
        for i in range(k):
            for j in range(i + 1, k):
                res = mmd2_test(arrays[i], arrays[j], sigma=float(sigma), n_permutations=n_permutations,
                                     seed=seed)
                p[i, j] = p[j, i] = float(res.p_value)
    settings = {"mode": "feature_banks", "sigma": float(sigma), "n_permutations": n_permutations, "seed": seed,
                "n_rows": {n: int(a.shape[0]) for n, a in zip(names, arrays)}, "n_features": int(arrays[0].shape[1])}
    return Atlas(names, m, p, method, settings)


def _pooled_sigma(arrays: Sequence[np.ndarray], seed: int = 0, max_rows: int = 2048) -> float:
    """Median-heuristic bandwidth of the pooled banks: an evenly spaced subsample of at most
    ``max_rows`` rows of their concatenation (deterministic, bounded cost), as ``mmd2_matrix``'s
    ``sigma="pooled"`` does; returned so that the p-value tests use the very same bandwidth."""
    pooled = np.concatenate(arrays, axis=0)
    s = min(len(pooled), max_rows)
    pooled = pooled[(np.arange(s) * len(pooled)) // s]
    return float(median_sigma(pooled[: s // 2], pooled[s // 2:]))


def _atlas_from_zoo(zoo, targets, *, method, n_tiles, tile_size, seed, n_permutations, cache_dir, progress,
                    backend, device) -> Atlas:
    models = iter_zoo(zoo)
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise InputValueError(f"expected source models with unique names, got {names}")
    missing = [n for n in names if n not in targets]
    extra = [str(t) for t in targets if str(t) not in names]
    if missing or extra:
        raise InputValueError(
            f"expected one target per source model (keys {names}), got missing {missing} and unknown {extra}; "
            "for domains without a source model, embed them with one encoder and pass feature banks instead")
    k = len(names)
    m = np.zeros((k, k))
    p = np.full((k, k), np.nan)
    for j, t in enumerate(names):
        ranking = rank_sources(targets[t], models, n_tiles=n_tiles, tile_size=tile_size, seed=seed,
                               n_permutations=n_permutations, cache_dir=cache_dir, progress=progress,
                               backend=backend, device=device)
        by_name = {e.name: e for e in ranking}
        for i, s in enumerate(names):
            m[i, j] = by_name[s].mmd2
            p[i, j] = by_name[s].p_value
    settings = {"mode": "zoo", "n_tiles": int(n_tiles), "tile_size": int(tile_size), "seed": int(seed),
                "n_permutations": int(n_permutations),
                "models": {n: getattr(mdl, "path", None) and str(mdl.path) for n, mdl in zip(names, models)}}
    return Atlas(names, m, p if n_permutations > 0 else None, method, settings)


# --------------------------------------------------------------------------------------------
# phylogeny
# --------------------------------------------------------------------------------------------
@dataclass
class PhylogenyComparison(_atomic.JsonRecord):
    """How well an atlas matches a species tree.

    Attributes
    ----------
    cophenetic_correlation : float
        Pearson correlation between the atlas dendrogram's cophenetic distances and the tree's
        patristic distances (over the k(k-1)/2 domain pairs).
    mantel_r, mantel_p : float
        Mantel correlation between the atlas distance ``D`` and the patristic distances, and its
        one-sided permutation p-value (alternative: positive association).
    n_permutations : int
        Permutations of the Mantel test.
    method : str
        Correlation used by the Mantel test ("pearson" or "spearman").
    names, tips : list of str
        Atlas domain names and the tree tip each one was mapped to.
    patristic : ndarray, (k, k)
        Tree path lengths between the domains' tips (0 for two domains of one species).
    """

    cophenetic_correlation: float
    mantel_r: float
    mantel_p: float
    n_permutations: int
    method: str
    names: list[str]
    tips: list[str]
    patristic: np.ndarray = field(repr=False)

    def to_dict(self) -> dict:
        return {"cophenetic_correlation": self.cophenetic_correlation, "mantel_r": self.mantel_r,
                "mantel_p": self.mantel_p, "n_permutations": self.n_permutations, "method": self.method,
                "names": list(self.names), "tips": list(self.tips), "patristic": self.patristic.tolist()}


def reference_species_tree():
    """The shipped divergence-time tree (TimeTree 5, Kumar et al. 2022; branch lengths in Myr) as a
    scikit-bio ``TreeNode`` whose tips are binomials with underscores (``"Mus_musculus"``).

    See ``neuroadda_rt/data/species_tree.md`` for the divergence times and their sources.
    """
    text = resources.files("neuroadda_rt").joinpath("data", "species_tree.nwk").read_text(encoding="utf-8")
    return _read_newick(text)


def species_aliases() -> dict[str, str]:
    """Common and scientific names (lower case) -> tip of the reference tree."""
    meta = json.loads(resources.files("neuroadda_rt").joinpath("data", "species_tree.json")
                      .read_text(encoding="utf-8"))
    aliases = {k.lower(): v for k, v in meta["aliases"].items()}
    for tip in meta["tips"]:
        aliases[tip.lower()] = tip
        aliases[tip.replace("_", " ").lower()] = tip
    return aliases


def _read_newick(text: str):
    skbio = require("skbio", "atlas")
    text = text.strip()
    if not text.endswith(";"):
        raise FormatError(f"expected a Newick tree ending with ';', got {text[:60]!r}")
    try:
        # Keep underscores in tip names: they are part of domain names such as "domain_0".
        return skbio.TreeNode.read(io.StringIO(text), format="newick", convert_underscores=False)
    except Exception as exc:  # scikit-bio raises its own NewickFormatError
        raise FormatError(f"expected a valid Newick tree, got {text[:60]!r}: {exc}") from exc


def _as_tree(tree):
    """A scikit-bio TreeNode from a TreeNode, a Newick string or a path to a Newick file."""
    skbio = require("skbio", "atlas")
    if isinstance(tree, skbio.TreeNode):
        return tree
    if isinstance(tree, os.PathLike) or (isinstance(tree, str) and not tree.strip().endswith(";")):
        p = Path(tree)
        if not p.exists():
            raise FileNotFoundError(f"tree file not found (and not a Newick string ending with ';'): {tree}")
        return _read_newick(p.read_text(encoding="utf-8"))
    if isinstance(tree, str):
        return _read_newick(tree)
    raise InputValueError(f"expected a Newick string, a Newick file or a skbio TreeNode, got {type(tree).__name__}")


def _patristic(tree, tips: Sequence[str]) -> np.ndarray:
    """Path lengths between ``tips`` (duplicates allowed) in ``tree``; every branch needs a length."""
    by_name = {t.name: t for t in tree.tips()}
    unknown = sorted({t for t in tips if t not in by_name})
    if unknown:
        raise InputValueError(f"expected tree tips for every domain, got no tip named {unknown}; "
                              f"tips are {sorted(by_name)}")
    for node in tree.traverse(include_self=False):
        if node.length is None:
            raise InputValueError(f"expected a branch length on every branch of the tree, got none above "
                                  f"{node.name or 'an internal node'!r}")
    uniq = sorted(set(tips))
    sub = tree.shear(uniq) if len(uniq) < len(by_name) else tree
    cophenet = getattr(sub, "cophenet", None) or sub.tip_tip_distances
    dm = cophenet()
    index = {n: i for i, n in enumerate(dm.ids)}
    idx = np.array([index[t] for t in tips])
    return np.asarray(dm.data, dtype=np.float64)[np.ix_(idx, idx)]


def _map_species(names: list[str], species, tree_tips: set[str], what: str = "the reference tree") -> list[str]:
    """Map each atlas name to a reference-tree tip from a species list or a name -> species dict."""
    if isinstance(species, Mapping):
        missing = [n for n in names if n not in species]
        if missing:
            raise InputValueError(f"expected a species for every atlas domain, got none for {missing}")
        seq = [species[n] for n in names]
    else:
        seq = list(species)
        if len(seq) != len(names):
            raise InputValueError(f"expected one species per atlas domain ({len(names)}: {names}), got {len(seq)}")
    aliases = species_aliases()
    tips = []
    for n, s in zip(names, seq):
        key = str(s).strip()
        tip = key if key in tree_tips else aliases.get(key.lower())
        if tip is None:
            raise InputValueError(f"expected a species (tip) of {what} for domain {n!r}, got {s!r}; "
                                  f"known: {sorted(tree_tips)} (or common names such as 'fly', 'mouse')")
        tips.append(tip)
    return tips


def compare_to_phylogeny(atlas: Atlas, tree=None, *, species=None, n_permutations: int = 999,
                         method: str = "pearson", seed: int = 0) -> PhylogenyComparison:
    """Compare an atlas with a species tree: cophenetic correlation and a Mantel test.

    Parameters
    ----------
    atlas : Atlas
        From :func:`domain_atlas`.
    tree : Newick string, path to a Newick file, skbio.TreeNode, or sequence/mapping of species
        A tree with branch lengths whose tips are the atlas names (or the values of ``species``).
        A list of species (one per atlas domain, in ``atlas.names`` order) or a mapping
        ``{domain: species}`` uses the shipped reference tree (:func:`reference_species_tree`);
        common names ("fly", "mouse", "zebra finch", ...) are accepted.
    species : sequence or mapping, optional
        With a tree given: the tip for each atlas domain, when tips are not the domain names.
    n_permutations : int
        Permutations of the Mantel test (at least 1).
    method : {"pearson", "spearman"}
        Correlation of the Mantel test.
    seed : int
        Seeds the permutations.

    Returns
    -------
    PhylogenyComparison

    Notes
    -----
    The Mantel p-value is one-sided (a positive association is what phylogenetic structure
    predicts) and counts the observed statistic among the permutations, ``(#{r* >= r} + 1) /
    (n_permutations + 1)``. With k domains there are only k! distinct permutations, so p cannot fall
    below about 1/k!: at least 5 domains are needed for p < 0.05 to be attainable.

    Examples
    --------
    >>> import numpy as np, neuroadda_rt as nr
    >>> rng = np.random.default_rng(0)
    >>> means = {"human": 0.0, "mouse": 0.3, "finch": 1.0, "zfish": 1.5, "fly": 3.0, "worm": 3.2}
    >>> banks = {k: rng.normal(v, 1, (80, 4)) for k, v in means.items()}
    >>> cmp = nr.compare_to_phylogeny(nr.domain_atlas(banks),
    ...                               ["human", "mouse", "zebra finch", "zebrafish", "fly", "worm"])
    >>> round(cmp.cophenetic_correlation, 2), round(cmp.mantel_r, 2), cmp.mantel_p < 0.05
    (0.79, 0.74, True)
    """
    if not isinstance(atlas, Atlas):
        raise InputValueError(f"expected an Atlas from domain_atlas, got {type(atlas).__name__}")
    if method not in ("pearson", "spearman"):
        raise InputValueError(f"expected method 'pearson' or 'spearman', got {method!r}")
    n_permutations = int(n_permutations)
    if n_permutations < 1:
        raise InputValueError(f"expected n_permutations >= 1, got {n_permutations}")
    skbio = require("skbio", "atlas")
    if tree is None and species is None:
        raise InputValueError("expected a tree (Newick string/file) or a list of species")
    is_species_list = tree is not None and not isinstance(tree, (str, os.PathLike, skbio.TreeNode))
    if tree is None or is_species_list:
        species = tree if is_species_list else species
        t = reference_species_tree()
        tips = _map_species(atlas.names, species, {x.name for x in t.tips()})
    else:
        t = _as_tree(tree)
        tip_names = {x.name for x in t.tips()}
        tips = list(atlas.names) if species is None else _map_species(atlas.names, species, tip_names,
                                                                           "the given tree")
    patristic = _patristic(t, tips)
    if len(atlas.names) < 3:
        raise InputValueError(f"expected at least 3 domains for a Mantel test, got {len(atlas.names)}")
    coph = _pearson(_upper(atlas.cophenetic), _upper(patristic))
    mantel = require("skbio.stats.distance", "atlas").mantel

    # Plain arrays (no IDs): skbio then uses them in the given order; both are symmetric and hollow.
    r, p, _ = mantel(atlas.distance, patristic, method=method, permutations=n_permutations,
                     alternative="greater", seed=seed)
    return PhylogenyComparison(cophenetic_correlation=coph, mantel_r=float(r), mantel_p=float(p),
                               n_permutations=n_permutations, method=method, names=list(atlas.names),
                               tips=tips, patristic=patristic)


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------
def _upper(a: np.ndarray) -> np.ndarray:
    i, j = np.triu_indices(a.shape[0], k=1)
    return np.asarray(a, dtype=np.float64)[i, j]


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    """SciPy's Pearson r; NaN where it is undefined (one pair, or a constant side: two domains,
    or an ultrametric of equal heights), which SciPy refuses or warns about."""
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(pearsonr(x, y).statistic)


def _nan_to_none(v):
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else v

