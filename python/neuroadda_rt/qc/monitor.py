"""Acquisition-time quality control: drift and artefact monitoring in encoder feature space.

A :class:`QCMonitor` holds a fixed *reference* (early, good tiles of the acquisition, as
tiles or as precomputed encoder features) and compares every new tile with it in the
feature space of a trained encoder, with the kernel of the MMD² test used for source
ranking:

* **Drift** -- the stream is cut into consecutive windows of ``window`` tiles. Each full
  window is tested against the reference with an unbiased MMD² and an exact permutation
  p-value. The reference half of the kernel sums and the permutations are computed once at
  construction; a window then costs O(n·(n + M)·d + n·(n + M)·B) with BLAS (n window tiles,
  M ≤ ``max_reference`` reference features, B permutations). ``drift`` follows a two-rule
  sequential decision whose false-alarm rate per window is at most ``alpha`` (see
  ``docs/method.md``, "Acquisition-time QC").
* **Tile scores** -- the MMD witness function at every new tile,
  ``mean_w k(x, w) - mean_r k(x, r)`` (w: the other tiles of the current window, r: the
  reference); positive where the window has more mass than the reference.
* **Artefact flags** -- conformal outlier tests against the reference's own distribution:
  reference similarity ``mean_r k(x, r)`` (leave-one-out on the reference), model
  uncertainty when a full network is available, and cheap intensity descriptors (brightness,
  contrast, sharpness, darkest / brightest 8×8 block) when the reference was given as tiles.
  The per-detector tail ranks are combined by their minimum, and the combined score is
  calibrated on the reference itself, so the false-positive rate on good tiles is about
  ``artefact_fpr``.

Memory is bounded over an unbounded stream: a ring buffer of one window plus aggregate
counters and the last ``history`` window results. ``update`` is safe to call from several
threads (feature extraction runs outside the lock; the window bookkeeping inside it), and
the state can be saved to one safetensors file (arrays + JSON metadata, written atomically,
nothing pickled) and restored.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .._digest import folder_sha256
from ..errors import DTypeError, FormatError, InputValueError, ShapeError
from ..mmd import gaussian_kernel_matrix, median_sigma
from ..package import ModelPackage
from ..runtime import FeatureExtractor, Predictor
from ..uncertainty import tile_uncertainty
from .descriptors import IMAGE_STATS, IMAGE_TAILS, KIND_OF, TEXTURE, as_tiles, image_stats
from .reading import load_array
from .state import read_state, write_state

__all__ = ["QCMonitor", "QCReport", "WindowResult"]


# ----------------------------------------------------------------------------------------------
# results


@dataclasses.dataclass(frozen=True)
class WindowResult:
    """The drift test of one completed window.

    Attributes
    ----------
    index : int
        0-based window number since the monitor was created.
    n_tiles : int
        Tiles in the window (``window``).
    mmd2 : float
        Unbiased MMD² between the window and the reference (same kernel for every window).
    p_value : float
        Permutation p-value ``(1 + #{null >= mmd2}) / (1 + n_permutations)``.
    drift : bool
        Decision of the sequential rule (see ``docs/method.md``).
    rule : str
        Which rule fired: ``"single"``, ``"persistent"`` or ``""``.
    first_id, last_id : str
        Ids of the first and last tile of the window.
    t_start, t_end : float
        Timestamps of the first and last tile.
    n_flagged : int
        Tiles of the window flagged as artefacts.
    """

    index: int
    n_tiles: int
    mmd2: float
    p_value: float
    drift: bool
    rule: str
    first_id: str
    last_id: str
    t_start: float
    t_end: float
    n_flagged: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class QCReport:
    """What one :meth:`QCMonitor.update` found.

    Attributes
    ----------
    ids : list of str
        Tile ids (given, or running tile numbers).
    timestamp : float
        Time stamp of the update (seconds since the epoch unless given).
    scores : ndarray (N,) float64
        MMD witness function value at each tile (window mass minus reference mass).
    similarity : ndarray (N,) float64
        Reference similarity ``mean_r k(x, r)`` (low = unlike every reference tile).
    uncertainty : ndarray (N,) float64 or None
        Mean binary entropy of the model's prediction, when the monitor has a full network.
    artefact_p : ndarray (N,) float64
        Conformal p-value of the combined artefact score against the reference.
    flags : ndarray (N,) bool
        ``artefact_p <= artefact_fpr``.
    kinds : list of str
        Most likely cause for flagged tiles (``"brightness"``, ``"contrast"``, ``"defocus"``,
        ``"dark_region"``, ``"bright_region"``, ``"feature_outlier"``, ``"uncertainty"``), ``""``
        for unflagged tiles.
    windows : tuple of WindowResult
        Windows completed by this update (often none; several if the update is large).
    """

    ids: list[str]
    timestamp: float
    scores: np.ndarray
    similarity: np.ndarray
    uncertainty: np.ndarray | None
    artefact_p: np.ndarray
    flags: np.ndarray
    kinds: list[str]
    windows: tuple[WindowResult, ...]

    @property
    def drift(self) -> bool:
        """True when any window completed by this update was declared drifted."""
        return any(w.drift for w in self.windows)

    @property
    def mmd2(self) -> float | None:
        """MMD² of the last window completed by this update, or None."""
        return self.windows[-1].mmd2 if self.windows else None

    @property
    def p_value(self) -> float | None:
        """p-value of the last window completed by this update, or None."""
        return self.windows[-1].p_value if self.windows else None

    @property
    def n_flagged(self) -> int:
        return int(self.flags.sum())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary (arrays as lists)."""
        return {
            "ids": list(self.ids), "timestamp": self.timestamp,
            "scores": self.scores.tolist(), "similarity": self.similarity.tolist(),
            "uncertainty": None if self.uncertainty is None else self.uncertainty.tolist(),
            "artefact_p": self.artefact_p.tolist(), "flags": self.flags.tolist(), "kinds": list(self.kinds),
            "windows": [w.to_dict() for w in self.windows], "drift": self.drift,
        }


# ----------------------------------------------------------------------------------------------
# the model


class _Model:
    """Adapter: ``features(tiles) -> (N, d) float32`` and optional ``uncertainty(tiles) -> (N,)``.

    ``model`` may be a model package directory or ONNX file (through
    :class:`~neuroadda_rt.FeatureExtractor`), a loaded ModelPackage, a FeatureExtractor, or a
    callable mapping (N, H, W) float32 tiles to (N, d) features.
    ``uncertainty`` may be None, a model package (path or loaded) / full-network ONNX path or a
    :class:`~neuroadda_rt.Predictor` (probabilities of each tile reduced with
    :func:`~neuroadda_rt.tile_uncertainty`, mean binary entropy), or a callable mapping tiles to
    (N,) uncertainties.
    """

    def __init__(self, model, uncertainty=None, *, backend="auto", batch_size=32):
        self.batch_size = int(batch_size)
        self.fingerprint = ""
        if isinstance(model, ModelPackage):
            # a loaded package: the same fingerprint and extractor as its directory
            self.fingerprint = folder_sha256(model.path, suffixes=(".onnx", ".safetensors", ".json"))[:16]
            model = model.feature_extractor(backend=backend)
        elif isinstance(model, (str, os.PathLike)):
            # the weights' files only: a fingerprint of what computes the features
            self.fingerprint = folder_sha256(model, suffixes=(".onnx", ".safetensors", ".json"))[:16]
            model = FeatureExtractor(model, backend=backend)
        if isinstance(model, FeatureExtractor):
            extractor = model

            def feats(x):
                return extractor.features(x[:, None], batch_size=self.batch_size)
            self._features = feats
        elif callable(model):
            self._features = model
        else:
            raise DTypeError("expected model as a path, a ModelPackage, a FeatureExtractor or a callable, got "
                            f"{type(model).__name__}")
        self._uncertainty = None
        if isinstance(uncertainty, ModelPackage):
            uncertainty = uncertainty.predictor(backend=backend)
        elif isinstance(uncertainty, (str, os.PathLike)):
            uncertainty = Predictor(uncertainty, backend=backend)
        if uncertainty is not None:
            if isinstance(uncertainty, Predictor):
                predictor = uncertainty

                def unc(x):
                    probs = predictor.predict_tiles(x[:, None], batch_size=self.batch_size)
                    return tile_uncertainty(np.ascontiguousarray(probs, dtype=np.float32))
                self._uncertainty = unc
            elif callable(uncertainty):
                self._uncertainty = uncertainty
            else:
                raise DTypeError(f"expected uncertainty as a callable or a Predictor, got {type(uncertainty).__name__}")

    @property
    def has_uncertainty(self) -> bool:
        return self._uncertainty is not None

    def features(self, tiles: np.ndarray) -> np.ndarray:
        f = np.asarray(self._features(tiles), dtype=np.float32)
        if f.ndim != 2 or f.shape[0] != tiles.shape[0]:
            raise ShapeError(f"expected model features of shape ({tiles.shape[0]}, d), got {f.shape}")
        if not np.isfinite(f).all():
            raise InputValueError("expected finite model features, got NaN or inf")
        return f

    def uncertainty(self, tiles: np.ndarray) -> np.ndarray | None:
        if self._uncertainty is None:
            return None
        u = np.asarray(self._uncertainty(tiles), dtype=np.float64).reshape(-1)
        if u.shape[0] != tiles.shape[0]:
            raise ShapeError(f"expected {tiles.shape[0]} uncertainties, got {u.shape[0]}")
        return u


# ----------------------------------------------------------------------------------------------
# helpers (float64 sums of the package kernel; the reference side is fixed after construction)

_BLAS = None


def _single_blas():
    """Context in which BLAS runs on one thread. The QC matrix products are small (a window
    against <= 2048 references); with the encoder already using the cores, a multi-threaded
    BLAS spends its time waiting for them (measured 10-100x slower on a busy 2-core machine).
    Uses threadpoolctl when installed (the ``qc`` extra), else leaves BLAS alone."""
    global _BLAS
    if _BLAS is None:
        try:
            from threadpoolctl import ThreadpoolController

            _BLAS = ThreadpoolController()
        except ImportError:  # pragma: no cover - optional
            _BLAS = False
    if _BLAS is False:
        return contextlib.nullcontext()
    return _BLAS.limit(limits=1, user_api="blas")


def _kernel(a: np.ndarray, b: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
    """The package's Gaussian kernel (:func:`~neuroadda_rt.mmd.gaussian_kernel_matrix`, the
    kernel of every MMD² in the package) as float64, for float64 sums."""
    return gaussian_kernel_matrix(a, b, sigma=sigmas).astype(np.float64)



def _tail_fraction(ref: np.ndarray, x: np.ndarray, tail: int, *, loo: bool) -> np.ndarray:
    """Fraction of ``ref`` at least as extreme as each ``x``.

    ``tail`` -1 = small values are extreme, +1 = large, 0 = two-sided (twice the smaller tail,
    capped at 1). With ``loo`` the values are the reference itself, each compared with the
    others only (leave-one-out), so a reference tile is never compared with itself."""
    srt = np.sort(ref)
    m = len(ref)
    sub = 1 if loo else 0
    low = np.searchsorted(srt, x, side="right") - sub  # #{ref <= x}
    high = m - np.searchsorted(srt, x, side="left") - sub  # #{ref >= x}
    n = m - sub
    if tail < 0:
        return low / n
    if tail > 0:
        return high / n
    return np.minimum(1.0, 2 * np.minimum(low, high) / n)


def _conformal_p(ref_scores: np.ndarray, x: np.ndarray) -> np.ndarray:
    """(1 + #{reference score <= x}) / (M + 1): small scores are extreme; ties count against x."""
    srt = np.sort(ref_scores)
    return (1 + np.searchsorted(srt, x, side="right")) / (len(srt) + 1)


# ----------------------------------------------------------------------------------------------
# the monitor


class QCMonitor:
    """Drift and artefact monitor for a stream of EM tiles.

    Parameters
    ----------
    model : path, ModelPackage, FeatureExtractor or callable
        The encoder: a model package directory or encoder ONNX file (int8 ones included, see
        :func:`~neuroadda_rt.quantize_int8`), a loaded :class:`~neuroadda_rt.ModelPackage`, a
        :class:`~neuroadda_rt.FeatureExtractor`, or a
        callable mapping (N, H, W) float32 tiles in [0, 1] to (N, d) features.
    reference : array-like
        Reference tiles (N, H, W) uint8 / uint16 / float in [0, 1], or precomputed features
        (N, d) float. At least ``2 * window`` reference tiles are recommended (at least 16
        are required). Copied; at most ``max_reference`` are kept (deterministic subsample).
    window : int
        Tiles per drift test.
    alpha : float
        Target false-alarm rate per window of the drift decision.
    n_permutations : int
        Permutations of the drift test (drawn once, reused for every window).
    uncertainty : callable or Predictor, optional
        Full network for the uncertainty detector (see :class:`_Model`); None disables it.
    reference_uncertainty : array-like, optional
        Uncertainties of the reference when ``reference`` is features and ``uncertainty`` is set.
    sigma : float or sequence of float, optional
        Kernel bandwidth(s); default the median heuristic on the reference
        (:func:`~neuroadda_rt.median_sigma`), computed once.
    max_reference : int
        Largest reference kept (bounds memory and the cost per tile).
    artefact_fpr : float
        Target false-positive rate of the artefact flags on good tiles.
    history : int
        Window results kept in memory (older ones are only counted).
    seed : int
        Seed of the reference subsample and the permutations.
    backend : str
        Backend used when ``model`` is a path.
    batch_size : int
        Feature-extraction batch size.

    Examples
    --------
    >>> import numpy as np
    >>> from neuroadda_rt import QCMonitor
    >>> rng = np.random.default_rng(0)
    >>> encoder = lambda t: np.stack([t.mean((1, 2)), t.std((1, 2))], axis=1)  # a toy encoder
    >>> ref = rng.integers(0, 256, size=(256, 32, 32), dtype=np.uint8)
    >>> mon = QCMonitor(encoder, ref, window=64, n_permutations=200)
    >>> rep = mon.update(rng.integers(0, 256, size=(64, 32, 32), dtype=np.uint8))
    >>> len(rep.windows), rep.scores.shape
    (1, (64,))
    """

    def __init__(self, model, reference, *, window: int = 256, alpha: float = 0.01, n_permutations: int = 500,
                 uncertainty=None, reference_uncertainty=None, sigma: float | Sequence[float] | None = None,
                 max_reference: int = 2048, artefact_fpr: float = 0.01, history: int = 4096, seed: int = 0,
                 backend: str = "auto", batch_size: int = 32, _state: dict | None = None):
        if int(window) < 4:
            raise InputValueError(f"expected window >= 4, got {window}")
        if not 0 < float(alpha) < 1:
            raise InputValueError(f"expected 0 < alpha < 1, got {alpha}")
        if int(n_permutations) < 20:
            raise InputValueError(f"expected n_permutations >= 20, got {n_permutations}")
        if not 0 < float(artefact_fpr) < 1:
            raise InputValueError(f"expected 0 < artefact_fpr < 1, got {artefact_fpr}")
        if int(max_reference) < 16:
            raise InputValueError(f"expected max_reference >= 16, got {max_reference}")
        self.window = int(window)
        self.alpha = float(alpha)
        self.n_permutations = int(n_permutations)
        self.artefact_fpr = float(artefact_fpr)
        self.max_reference = int(max_reference)
        self.seed = int(seed)
        self._history_len = int(history)
        self._model = _Model(model, uncertainty, backend=backend, batch_size=batch_size)
        self._lock = threading.Lock()
        self.loaded_extra: dict = {}
        if _state is not None:
            self._restore(_state)
            return
        self._build_reference(reference, reference_uncertainty, sigma)
        self._reset_stream()

    # -- reference ---------------------------------------------------------------------------

    def _build_reference(self, reference, reference_uncertainty, sigma) -> None:
        if isinstance(reference, (str, os.PathLike)):
            reference = load_array(Path(reference))
        ref = np.asarray(reference) if not isinstance(reference, (list, tuple)) else reference
        rng = np.random.default_rng(self.seed)
        ref_stats = ref_unc = None
        self._tile_shape: list[int] | None = None
        if isinstance(ref, np.ndarray) and ref.ndim == 2 and ref.dtype.kind == "f":
            feats = np.array(ref, dtype=np.float32)
            keep = self._subsample(len(feats), rng)
            feats = feats[keep]
            if reference_uncertainty is not None:
                ref_unc = np.asarray(reference_uncertainty, dtype=np.float64).reshape(-1)
                if len(ref_unc) != len(ref):
                    raise ShapeError(f"expected {len(ref)} reference uncertainties, got {len(ref_unc)}")
                ref_unc = ref_unc[keep]
            if not np.isfinite(feats).all():
                raise InputValueError("expected finite reference features, got NaN or inf")
        else:
            tiles = as_tiles(ref, "reference")
            keep = self._subsample(len(tiles), rng)
            tiles = tiles[keep]
            feats = self._model.features(tiles)
            ref_stats = image_stats(tiles)
            self._tile_shape = list(tiles.shape[1:])
            if self._model.has_uncertainty:
                ref_unc = self._model.uncertainty(tiles)
        if len(feats) < 16:
            raise ShapeError(f"expected at least 16 reference tiles, got {len(feats)}")
        self.ref = feats
        self.dim = feats.shape[1]
        m = len(feats)
        self.sigmas = self._choose_sigma(feats, sigma, rng)
        # permutations, drawn once: perm b puts the pseudo-window at `positions[b]` among the
        # n window slots (0..n-1) followed by the m reference slots.
        n, b = self.window, self.n_permutations
        self._positions = np.stack([rng.choice(n + m, size=n, replace=False) for _ in range(b)]).astype(np.int32)
        self._derive_permutation_matrices()
        # reference kernel sums, once: row sums (leave-one-out similarity), total, and the
        # reference-reference part of every permutation's quadratic form.
        rowsum = np.zeros(m)
        kx = np.zeros((m, b))
        for s in range(0, m, 512):  # one-off: BLAS may use every thread here
            blk = _kernel(feats[s:s + 512], feats, self.sigmas)
            idx = np.arange(s, min(s + 512, m))
            blk[idx - s, idx] = 0.0
            rowsum[s:s + 512] = blk.sum(axis=1)
            kx[s:s + 512] = blk @ self._xr
        self._ref_rowsum = rowsum
        self._ref_total = float(rowsum.sum())
        self._perm_rr = np.einsum("jb,jb->b", self._xr, kx)  # x_R' K_RR0 x_R
        self._perm_rr_row = self._xr.T @ rowsum  # x_R' K_RR0 1
        ref_sim = rowsum / (m - 1)  # leave-one-out reference similarity
        # artefact detectors: reference values (leave-one-out where the value depends on the reference)
        self._det_names = ["similarity"]
        self._det_ref = [ref_sim]
        self._det_tail = [-1]
        if ref_unc is not None:
            self._det_names.append("uncertainty")
            self._det_ref.append(ref_unc)
            self._det_tail.append(1)
        if ref_stats is not None:
            for j, name in enumerate(IMAGE_STATS):
                self._det_names.append(name)
                self._det_ref.append(ref_stats[:, j].copy())
                self._det_tail.append(IMAGE_TAILS[name])
            self._ref_texture = float(np.median(ref_stats[:, TEXTURE]))
        else:
            self._ref_texture = 0.0
        self._calibrate_combined()

    def _subsample(self, n: int, rng) -> np.ndarray:
        if n <= self.max_reference:
            return np.arange(n)
        return np.sort(rng.choice(n, size=self.max_reference, replace=False))

    def _choose_sigma(self, feats, sigma, rng) -> np.ndarray:
        if sigma is not None:
            s = np.atleast_1d(np.asarray(sigma, dtype=np.float64))
            if s.ndim != 1 or not np.all(np.isfinite(s)) or np.any(s <= 0):
                raise InputValueError(f"expected positive finite sigma(s), got {sigma!r}")
            return s
        half = len(feats) // 2
        perm = rng.permutation(len(feats))
        # the package's median heuristic, on a random half/half split
        return np.array([float(median_sigma(feats[perm[:half]], feats[perm[half:]]))])

    def _derive_permutation_matrices(self) -> None:
        n, b = self.window, self.n_permutations
        m = len(self.ref)
        ind = np.zeros((b, n + m), dtype=np.float64)
        np.put_along_axis(ind, self._positions.astype(np.int64), 1.0, axis=1)
        self._xw = np.ascontiguousarray(ind[:, :n].T)  # (n, B)
        self._xr = np.ascontiguousarray(ind[:, n:].T)  # (m, B)

    def _calibrate_combined(self) -> None:
        m = len(self.ref)
        self._robust = self._robust_scales()
        values = dict(zip(self._det_names, self._det_ref))
        self._combined_ref = self._combined_score(values, loo=True)[0]
        assert self._combined_ref.shape == (m,)

    def _robust_scales(self) -> np.ndarray:
        """(lowest, median, highest) reference value per detector: a tile's excess beyond the
        reference range, relative to the half-range on that side, names its likely cause."""
        return np.array([np.quantile(r, [0.0, 0.5, 1.0]) for r in self._det_ref])

    def _reset_stream(self) -> None:
        n, b = self.window, self.n_permutations
        self._ring_f = np.zeros((n, self.dim), dtype=np.float32)
        self._ring_p = np.zeros((n, b))  # K_xR x_R per tile
        self._ring_s = np.zeros(n)  # reference similarity
        self._ring_flag = np.zeros(n, dtype=bool)
        self._ring_id: list[str] = [""] * n
        self._ring_t = np.zeros(n)
        self._ring_pos = 0  # next slot
        self._ring_fill = 0
        self._since_test = 0
        self.n_tiles = 0
        self.n_windows = 0
        self.n_drift_windows = 0
        self.n_flagged = 0
        self.flag_counts: dict[str, int] = {}
        self._prev_p = 1.0
        self._windows: deque[WindowResult] = deque(maxlen=self._history_len)

    # -- public API -------------------------------------------------------------------------

    @property
    def sigma(self) -> float | list[float]:
        """Kernel bandwidth(s) in feature units."""
        return float(self.sigmas[0]) if len(self.sigmas) == 1 else self.sigmas.tolist()

    @property
    def detectors(self) -> list[str]:
        """Names of the artefact detectors in use."""
        return list(self._det_names)

    @property
    def windows(self) -> list[WindowResult]:
        """The last ``history`` window results (a copy)."""
        with self._lock:
            return list(self._windows)

    def summary(self) -> dict[str, Any]:
        """Aggregate counters over the whole stream."""
        with self._lock:
            return {"n_tiles": self.n_tiles, "n_windows": self.n_windows, "n_drift_windows": self.n_drift_windows,
                    "n_flagged": self.n_flagged, "flag_counts": dict(self.flag_counts),
                    "sigma": self.sigma, "reference_size": len(self.ref), "detectors": self.detectors}

    def update(self, tiles, *, ids: Sequence[Any] | None = None, timestamp: float | None = None) -> QCReport:
        """Score new tiles, and test every window they complete.

        Parameters
        ----------
        tiles : array-like
            (N, H, W) or (H, W) uint8 / uint16 / float in [0, 1] (copied), or a list of 2-D
            tiles of one shape.
        ids : sequence, optional
            One id per tile (stored as ``str``); default the running tile number.
        timestamp : float, optional
            Acquisition time of these tiles; default ``time.time()``.

        Returns
        -------
        QCReport
        """
        x = as_tiles(tiles)
        n_new = x.shape[0]
        if self._tile_shape is not None and list(x.shape[1:]) != self._tile_shape:
            # the intensity descriptors are calibrated at the reference's tile size
            raise ShapeError(f"expected tiles of shape {tuple(self._tile_shape)} (the reference's), "
                             f"got {tuple(x.shape[1:])}")
        if ids is not None:
            ids = [str(i) for i in ids]
            if len(ids) != n_new:
                raise ShapeError(f"expected {n_new} ids, got {len(ids)}")
        ts = time.time() if timestamp is None else float(timestamp)
        # heavy, lock-free part: the reference is immutable after construction
        feats = self._model.features(x)
        if feats.shape[1] != self.dim:
            raise ShapeError(f"expected features of dimension {self.dim} (the reference's), got {feats.shape[1]}")
        unc = self._model.uncertainty(x) if "uncertainty" in self._det_names else None
        stats = image_stats(x) if "mean" in self._det_names else None
        with _single_blas():
            k_ref = _kernel(feats, self.ref, self.sigmas)
            sim = k_ref.mean(axis=1)
            p_rows = k_ref @ self._xr
        del k_ref
        artefact_p, kinds = self._artefacts(sim, unc, stats)
        flags = artefact_p <= self.artefact_fpr
        with self._lock, _single_blas():
            if ids is None:
                ids = [str(self.n_tiles + i) for i in range(n_new)]
            done: list[WindowResult] = []
            for i in range(n_new):
                slot = self._ring_pos
                self._ring_f[slot] = feats[i]
                self._ring_p[slot] = p_rows[i]
                self._ring_s[slot] = sim[i]
                self._ring_flag[slot] = flags[i]
                self._ring_id[slot] = ids[i]
                self._ring_t[slot] = ts
                self._ring_pos = (slot + 1) % self.window
                self._ring_fill = min(self._ring_fill + 1, self.window)
                self._since_test += 1
                self.n_tiles += 1
                if self._since_test == self.window:
                    done.append(self._test_window())
                    self._since_test = 0
            # witness against the window as it stands after this update (each tile's own
            # kernel value excluded)
            fill = self._ring_fill
            k_win = _kernel(feats, self._ring_f[:fill], self.sigmas).sum(axis=1)
            in_ring = np.arange(n_new) >= n_new - min(n_new, fill)
            others = np.where(in_ring, fill - 1, fill)
            win_mean = np.where(others > 0, (k_win - in_ring) / np.maximum(others, 1), 0.0)
            scores = win_mean - sim
            self.n_flagged += int(flags.sum())
            for k in kinds:
                if k:
                    self.flag_counts[k] = self.flag_counts.get(k, 0) + 1
        return QCReport(ids=list(ids), timestamp=ts, scores=scores, similarity=sim, uncertainty=unc,
                        artefact_p=artefact_p, flags=flags, kinds=kinds, windows=tuple(done))

    # -- internals --------------------------------------------------------------------------

    def _combined_score(self, values: dict, *, loo: bool) -> tuple[np.ndarray, np.ndarray]:
        """Combined artefact score (small = extreme) and every detector's excess beyond the
        reference range.

        The score is the smallest tail fraction over the detectors; ties (typically tiles beyond
        the whole reference on some detector, fraction 0) are broken by the excess, by less than
        half a fraction step, so the order between different fractions is unchanged."""
        m = len(self.ref)
        fr = np.stack([_tail_fraction(r, values[name], t, loo=loo)
                       for name, r, t in zip(self._det_names, self._det_ref, self._det_tail)])
        ex = []
        for name, (lo, med, hi), t in zip(self._det_names, self._robust, self._det_tail):
            v = values[name]
            low = (lo - v) / max(med - lo, 1e-12)
            high = (v - hi) / max(hi - med, 1e-12)
            ex.append(low if t < 0 else high if t > 0 else np.maximum(low, high))
        ex = np.stack(ex)
        best = fr.min(axis=0)
        ex_at = np.where(fr <= best[None], ex, -np.inf).max(axis=0)
        tie = 1.0 - np.exp(-np.maximum(ex_at, 0.0))  # in [0, 1), increasing with the excess
        return best - 0.4 / m * tie, np.where(fr <= best[None], ex, -np.inf)

    def _artefacts(self, sim, unc, stats) -> tuple[np.ndarray, list[str]]:
        values = {"similarity": sim, "uncertainty": unc}
        if stats is not None:
            values.update({name: stats[:, j] for j, name in enumerate(IMAGE_STATS)})
        score, ex = self._combined_score(values, loo=False)
        # conformal p-value of the combined score against the reference's own (leave-one-out) scores
        p = _conformal_p(self._combined_ref, score)
        kinds = [""] * len(p)
        flagged = np.flatnonzero(p <= self.artefact_fpr)
        if len(flagged):
            names = self._name_causes(ex[:, flagged], None if stats is None else stats[flagged])
            for i, k in zip(flagged, names):
                kinds[i] = k
        return p, kinds

    def _name_causes(self, ex: np.ndarray, stats) -> list[str]:
        """Likely cause per tile among the detectors at its most extreme tail fraction (finite
        ``ex``): a global change first (brightness; defocus when the median block texture fell
        below half the reference's), then the largest excess beyond the reference range relative
        to that side's half-range (fold vs stain vs bright region vs feature outlier ...)."""
        names = self._det_names
        out = []
        for i in range(ex.shape[1]):
            cand = {names[j]: ex[j, i] for j in range(len(names)) if np.isfinite(ex[j, i])}
            if "mean" in cand and cand["mean"] > 0:
                out.append(KIND_OF["mean"])
            elif ("sharpness" in cand and stats is not None and self._ref_texture > 0
                  and stats[i, TEXTURE] < 0.5 * self._ref_texture):
                out.append(KIND_OF["sharpness"])
            else:
                cand.pop("sharpness", None) if len(cand) > 1 else None
                out.append(KIND_OF[max(cand, key=cand.get)])
        return out

    def _test_window(self) -> WindowResult:
        """Unbiased MMD² of the ring (exactly one window) against the reference, with the
        permutation null. Caller holds the lock."""
        n, m = self.window, len(self.ref)
        # ring slot order does not matter for the statistic, but the permutation matrices index
        # window slots; any fixed slot order is a valid relabelling.
        kww = _kernel(self._ring_f, self._ring_f, self.sigmas)
        np.fill_diagonal(kww, 0.0)
        ref_sum = self._ring_s * m  # K_WR 1
        ww_row = kww.sum(axis=1)
        total = float(ww_row.sum() + 2 * ref_sum.sum() + self._ref_total)

        def stat(a, rs):
            xy = rs - a
            yy = total - 2 * rs + a
            return a / (n * (n - 1)) + yy / (m * (m - 1)) - 2 * xy / (n * m)

        a_obs = float(ww_row.sum())
        mmd2 = float(stat(a_obs, a_obs + ref_sum.sum()))
        xw = self._xw
        a_perm = (np.einsum("ib,ib->b", xw, kww @ xw) + 2 * np.einsum("ib,ib->b", xw, self._ring_p)
                  + self._perm_rr)
        rs_perm = xw.T @ (ww_row + ref_sum) + self._ring_p.sum(axis=0) + self._perm_rr_row
        null = stat(a_perm, rs_perm)
        # tolerate rounding: a permutation equal to the observed labelling must count as >=
        p = float((1 + np.count_nonzero(null >= mmd2 - 1e-12 * max(1.0, abs(mmd2)))) / (1 + self.n_permutations))
        drift, rule = self._decide(p)
        order = np.roll(np.arange(n), -self._ring_pos)  # oldest first
        res = WindowResult(index=self.n_windows, n_tiles=n, mmd2=mmd2, p_value=p, drift=drift, rule=rule,
                           first_id=self._ring_id[order[0]], last_id=self._ring_id[order[-1]],
                           t_start=float(self._ring_t[order[0]]), t_end=float(self._ring_t[order[-1]]),
                           n_flagged=int(self._ring_flag.sum()))
        self.n_windows += 1
        self.n_drift_windows += int(drift)
        self._windows.append(res)
        return res

    def _decide(self, p: float) -> tuple[bool, str]:
        """Two rules, alpha split between them (union bound): a window alone at alpha/2, or two
        consecutive windows each at sqrt(alpha/2) (probability alpha/2 for independent null
        windows). Per-window false-alarm rate <= alpha."""
        single = p <= self.alpha / 2
        lvl = math.sqrt(self.alpha / 2)
        persistent = p <= lvl and self._prev_p <= lvl
        self._prev_p = p
        if single:
            return True, "single"
        if persistent:
            return True, "persistent"
        return False, ""

    # -- state -------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike, *, extra: dict | None = None) -> Path:
        """Write the monitor's state (reference, calibration, window, counters, history) to one
        safetensors file, atomically (temporary file, then rename). The model is not saved.

        Parameters
        ----------
        path : path-like
            File to write.
        extra : dict, optional
            JSON-serialisable data stored with the state (given back as ``loaded_extra``).

        Returns
        -------
        pathlib.Path
            The path written.
        """
        with self._lock:
            arrays = {
                "ref": self.ref, "sigmas": self.sigmas, "positions": self._positions,
                "ref_rowsum": self._ref_rowsum, "perm_rr": self._perm_rr, "perm_rr_row": self._perm_rr_row,
                "combined_ref": self._combined_ref,
                "ring_f": self._ring_f, "ring_p": self._ring_p, "ring_s": self._ring_s,
                "ring_flag": self._ring_flag.astype(np.uint8), "ring_t": self._ring_t,
            }
            for name, r in zip(self._det_names, self._det_ref):
                arrays[f"det_{name}"] = np.asarray(r, dtype=np.float64)
            meta = {
                "window": self.window, "alpha": self.alpha,
                "n_permutations": self.n_permutations, "artefact_fpr": self.artefact_fpr,
                "max_reference": self.max_reference, "seed": self.seed, "history": self._history_len,
                "ref_total": self._ref_total, "detectors": self._det_names, "tails": self._det_tail,
                "ref_texture": self._ref_texture, "tile_shape": self._tile_shape,
                "ring_id": self._ring_id, "ring_pos": self._ring_pos, "ring_fill": self._ring_fill,
                "since_test": self._since_test, "n_tiles": self.n_tiles, "n_windows": self.n_windows,
                "n_drift_windows": self.n_drift_windows, "n_flagged": self.n_flagged,
                "flag_counts": self.flag_counts, "prev_p": self._prev_p,
                "windows": [w.to_dict() for w in self._windows], "model": self._model.fingerprint,
                "extra": extra or {},
            }
            return write_state(path, arrays, meta)

    @classmethod
    def load(cls, path: str | os.PathLike, model, *, uncertainty=None, backend: str = "auto",
             batch_size: int = 32) -> "QCMonitor":
        """Restore a monitor saved with :meth:`save`; ``model`` must be the encoder it was built with.

        Raises
        ------
        FormatError
            The file is missing, truncated or not a QC state.
        """
        meta, arrays = read_state(path)
        mon = cls(model, None, window=meta["window"], alpha=meta["alpha"], n_permutations=meta["n_permutations"],
                  uncertainty=uncertainty, max_reference=meta["max_reference"], artefact_fpr=meta["artefact_fpr"],
                  history=meta["history"], seed=meta["seed"], backend=backend, batch_size=batch_size,
                  _state={"meta": meta, "arrays": arrays, "path": str(path)})
        return mon

    def _restore(self, state: dict) -> None:
        meta, a = state["meta"], state["arrays"]
        fp = self._model.fingerprint
        if fp and meta.get("model") and fp != meta["model"]:
            raise FormatError(f"{state['path']}: saved with model {meta['model']}, got model {fp}")
        try:
            self.ref = a["ref"].astype(np.float32)
            self.dim = self.ref.shape[1]
            self.sigmas = a["sigmas"].astype(np.float64)
            self._positions = a["positions"].astype(np.int32)
            self._derive_permutation_matrices()
            self._ref_rowsum = a["ref_rowsum"]
            self._ref_total = float(meta["ref_total"])
            self._perm_rr, self._perm_rr_row = a["perm_rr"], a["perm_rr_row"]
            self._combined_ref = a["combined_ref"]
            self._det_names = list(meta["detectors"])
            self._det_tail = [int(t) for t in meta["tails"]]
            self._det_ref = [a[f"det_{name}"] for name in self._det_names]
            self._ref_texture = float(meta["ref_texture"])
            self._tile_shape = meta["tile_shape"]
            self._robust = self._robust_scales()
            if "uncertainty" in self._det_names and not self._model.has_uncertainty:
                raise FormatError(f"{state['path']}: the saved monitor uses an uncertainty model; pass uncertainty=")
            self._reset_stream()
            self._ring_f[:] = a["ring_f"]
            self._ring_p[:] = a["ring_p"]
            self._ring_s[:] = a["ring_s"]
            self._ring_flag[:] = a["ring_flag"].astype(bool)
            self._ring_t[:] = a["ring_t"]
            self._ring_id = list(meta["ring_id"])
            for key in ("ring_pos", "ring_fill", "since_test", "n_tiles", "n_windows", "n_drift_windows",
                        "n_flagged"):
                setattr(self, f"_{key}" if key.startswith(("ring", "since")) else key, int(meta[key]))
            self.flag_counts = {str(k): int(v) for k, v in meta["flag_counts"].items()}
            self._prev_p = float(meta["prev_p"])
            self._windows.extend(WindowResult(**w) for w in meta["windows"])
            self.loaded_extra = dict(meta.get("extra") or {})
        except (KeyError, ValueError, TypeError) as exc:
            raise FormatError(f"{state['path']}: inconsistent QC state ({exc!r})") from exc

