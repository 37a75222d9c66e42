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

import dataclasses
import json
import math
import os
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import _atomic
from .errors import DTypeError, FormatError, InputValueError, ShapeError, require

__all__ = ["QCMonitor", "QCReport", "WindowResult"]

_STATE_VERSION = 1
#: Intensity descriptors computed per tile (all on the [0, 1] normalised image), their
#: artefact tail (-1 low, +1 high, 0 both) and the likely cause they name.
_IMAGE_STATS = ("mean", "std", "sharpness", "line_ridge", "flat", "block_max")
_IMAGE_TAILS = {"mean": 0, "std": 0, "sharpness": -1, "line_ridge": 1, "flat": -1, "block_max": 1}
_KIND_OF = {"mean": "brightness", "std": "contrast", "sharpness": "defocus", "line_ridge": "fold", "flat": "stain",
            "block_max": "bright_region", "similarity": "feature_outlier", "uncertainty": "uncertainty"}


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
# tiles, models and descriptors


def _as_tiles(tiles, name: str = "tiles") -> np.ndarray:
    """(N, H, W) float32 in [0, 1]. uint8 / uint16 use the dtype range (the package's
    normalisation rule for integer EM data); floats must already be in [0, 1]. Copies."""
    if isinstance(tiles, (list, tuple)):
        if not tiles:
            raise ShapeError(f"expected at least one tile in {name}, got an empty list")
        shapes = {np.shape(t) for t in tiles}
        if len(shapes) != 1:
            raise ShapeError(f"expected {name} of one shape, got shapes {sorted(shapes)}")
        tiles = np.stack([np.asarray(t) for t in tiles])
    arr = np.asarray(tiles)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim == 4 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 3:
        raise ShapeError(f"expected {name} as (N, H, W), (H, W) or (N, 1, H, W), got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] < 8 or arr.shape[2] < 8:
        raise ShapeError(f"expected at least one tile of at least 8x8 pixels in {name}, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) * np.float32(1 / 255)
    if arr.dtype == np.uint16:
        return arr.astype(np.float32) * np.float32(1 / 65535)
    if arr.dtype in (np.float32, np.float64):
        out = arr.astype(np.float32)
        if not np.isfinite(out).all():
            raise InputValueError(f"expected finite float {name} in [0, 1], got NaN or inf")
        if out.min() < 0 or out.max() > 1:
            raise InputValueError(f"expected float {name} in [0, 1], got range [{out.min():.4g}, {out.max():.4g}]")
        return out
    raise DTypeError(f"expected {name} of dtype uint8, uint16, float32 or float64, got {arr.dtype}")


def image_stats(tiles: np.ndarray, *, chunk: int = 32) -> np.ndarray:
    """Cheap intensity descriptors per tile, columns in the order of ``_IMAGE_STATS``.

    Computed on the tile averaged over 2×2 pixels (tiles of 256 pixels or more; smaller
    tiles at full resolution), which keeps the cost at about 3 ms of CPU per 256×256 tile:

    * ``mean``, ``std``: brightness and contrast;
    * ``sharpness``: mean absolute 4-neighbour Laplacian over the standard deviation (defocus
      lowers it whatever the contrast);
    * ``line_ridge``: strongest straight dark ridge (a segment a third of the tile long, 32
      orientations, darker than both parallel neighbours): folds are long thin dark lines,
      membranes are shorter and dark areas have no bright sides;
    * ``flat``: smallest standard deviation of 4×4 blocks: stains and other deposits are dark
      *and* smooth, tissue always carries texture and shot noise;
    * ``block_max``: brightest 4×4 block mean (debris, bright deposits, beam damage);
    * a last column, ``texture`` (median 4×4-block standard deviation), is not a detector: it
      tells a global blur (every block smooth) from a local deposit when naming the cause.

    Tiles are processed ``chunk`` at a time to stay in cache.
    """
    t = np.asarray(tiles, dtype=np.float32)
    if t.shape[0] > chunk:
        return np.concatenate([image_stats(t[i:i + chunk], chunk=chunk) for i in range(0, t.shape[0], chunk)])
    n, h, w = t.shape
    if min(h, w) >= 256:
        h, w = h // 2 * 2, w // 2 * 2
        t = (t[:, 0:h:2, 0:w:2] + t[:, 1:h:2, 0:w:2] + t[:, 0:h:2, 1:w:2] + t[:, 1:h:2, 1:w:2]) * np.float32(0.25)
        n, h, w = t.shape
    mean = t.mean(axis=(1, 2), dtype=np.float64)
    std = t.std(axis=(1, 2), dtype=np.float64)
    lap = 4 * t[:, 1:-1, 1:-1]
    lap -= t[:, :-2, 1:-1]
    lap -= t[:, 2:, 1:-1]
    lap -= t[:, 1:-1, :-2]
    lap -= t[:, 1:-1, 2:]
    sharp = np.abs(lap, out=lap).mean(axis=(1, 2), dtype=np.float64) / (std + 1e-6)
    h4, w4 = h // 4, w // 4
    c = t[:, :h4 * 4, :w4 * 4]
    # 4x4 block moments by two contiguous reductions (a 5-d reshape-reduce is several times slower)
    s1 = c.reshape(n, h4 * 4, w4, 4).sum(-1).reshape(n, h4, 4, w4).sum(2) * np.float32(1 / 16)
    s2 = (c * c).reshape(n, h4 * 4, w4, 4).sum(-1).reshape(n, h4, 4, w4).sum(2) * np.float32(1 / 16)
    bstd = np.sqrt(np.maximum(s2 - s1 * s1, 0)).reshape(n, -1)
    flat = bstd.min(axis=1).astype(np.float64)
    texture = np.median(bstd, axis=1).astype(np.float64)
    bmax = s1.max(axis=(1, 2)).astype(np.float64)
    return np.stack([mean, std, sharp, _line_contrast(t), flat, bmax, texture], axis=1)


def _line_contrast(t: np.ndarray, n_angles: int = 32, offsets=(2, 4, 8)) -> np.ndarray:
    """Strongest straight dark ridge: over straight segments (0.3 of the tile long) at every
    position and ``n_angles`` orientations, the mean of the segment subtracted from the darker of
    its two parallel neighbours ``k`` pixels away (k in ``offsets``). A fold is a long thin dark line
    with brighter tissue on both sides; dark areas (vesicle clusters) have dark neighbours and
    membrane segments are shorter. A direction within 45 degrees of the column axis becomes that
    axis by shifting each row (shear); cumulative sums along it give every segment's mean at once,
    O(pixels) per angle; the transposed tile covers the other directions."""
    n, h, w = t.shape
    length = min(max(5, min(41, int(0.3 * min(h, w)) | 1)), min(h, w) - 1)
    best = np.full(n, -np.inf, dtype=np.float32)
    for img in (t, t.transpose(0, 2, 1)):
        hh, ww = img.shape[1:]
        pad = hh // 2 + 1
        xp = np.pad(img, ((0, 0), (0, 0), (pad, pad)), mode="reflect" if pad < ww else "edge")
        ys = np.arange(hh) - hh / 2
        cs = np.empty((n, hh + 1, ww), dtype=np.float32)
        cs[:, 0] = 0.0
        for theta in np.linspace(-np.pi / 4, np.pi / 4, n_angles // 2, endpoint=False):
            off = np.round(ys * math.tan(theta)).astype(int) + pad
            # cumulative sums down the sheared rows, one row at a time (faster than a strided
            # cumsum and needs no sheared copy)
            for y in range(hh):
                np.add(cs[:, y], xp[:, y, off[y]:off[y] + ww], out=cs[:, y + 1])
            le = max(3, int(round(length * math.cos(theta))))
            run = (cs[:, le:, :] - cs[:, :-le, :]) * np.float32(1 / le)  # segment means
            for k in offsets:
                if 2 * k >= ww:
                    continue
                ridge = np.minimum(run[:, :, :-2 * k], run[:, :, 2 * k:]) - run[:, :, k:-k]
                best = np.maximum(best, ridge.max(axis=(1, 2)))
    return best.astype(np.float64)


class _Model:
    """Adapter: ``features(tiles) -> (N, d) float32`` and optional ``uncertainty(tiles) -> (N,)``.

    ``model`` may be a model package directory or ONNX file (through
    :class:`~neuroadda_rt.FeatureExtractor`), an object with ``.features(tiles)`` (a
    FeatureExtractor), or a callable mapping (N, H, W) float32 tiles to (N, d) features.
    ``uncertainty`` may be None, a model package / full-network ONNX path or a
    :class:`~neuroadda_rt.Predictor` (probabilities of each tile reduced with
    :func:`~neuroadda_rt.tile_uncertainty`, mean binary entropy), or a callable mapping tiles to
    (N,) uncertainties.
    """

    def __init__(self, model, uncertainty=None, *, backend="auto", batch_size=32):
        self.batch_size = int(batch_size)
        self.fingerprint = ""
        if isinstance(model, (str, os.PathLike)):
            from . import runtime

            self.fingerprint = _file_fingerprint(Path(model))
            model = runtime.FeatureExtractor(model, backend=backend)
        if hasattr(model, "features"):
            extractor = model

            def feats(x):
                return extractor.features(x[:, None], batch_size=self.batch_size)
            self._features = feats
        elif callable(model):
            self._features = model
        else:
            raise DTypeError(f"expected model as a path, a FeatureExtractor or a callable, got {type(model).__name__}")
        self._uncertainty = None
        if isinstance(uncertainty, (str, os.PathLike)):
            from . import runtime

            uncertainty = runtime.Predictor(uncertainty, backend=backend)
        if uncertainty is not None:
            if hasattr(uncertainty, "predict_tiles"):
                predictor = uncertainty

                def unc(x):
                    from .uncertainty import tile_uncertainty

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


def _file_fingerprint(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for p in files:
        if p.suffix in (".onnx", ".safetensors", ".json"):
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# kernel helpers (float64; the reference side is fixed after construction)

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
        import contextlib

        return contextlib.nullcontext()
    return _BLAS.limit(limits=1, user_api="blas")



def _sqdist(a: np.ndarray, b: np.ndarray, b_sq: np.ndarray | None = None) -> np.ndarray:
    a = a.astype(np.float64, copy=False)
    b = b.astype(np.float64, copy=False)
    a_sq = np.einsum("ij,ij->i", a, a)
    if b_sq is None:
        b_sq = np.einsum("ij,ij->i", b, b)
    d = a_sq[:, None] + b_sq[None, :] - 2.0 * (a @ b.T)
    return np.maximum(d, 0.0, out=d)


def _kernel(d2: np.ndarray, gammas: np.ndarray) -> np.ndarray:
    """Gaussian kernel averaged over bandwidths; gammas = 1 / (2 sigma²)."""
    if len(gammas) == 1:
        return np.exp(-gammas[0] * d2)
    out = np.zeros_like(d2)
    for g in gammas:
        out += np.exp(-g * d2)
    out /= len(gammas)
    return out


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
    model : path, FeatureExtractor or callable
        The encoder: a model package directory or encoder ONNX file (int8 ones included, see
        :func:`~neuroadda_rt.quantize_int8`), a :class:`~neuroadda_rt.FeatureExtractor`, or a
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
            reference = _load_array(Path(reference))
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
            tiles = _as_tiles(ref, "reference")
            keep = self._subsample(len(tiles), rng)
            tiles = tiles[keep]
            feats = self._features_batched(tiles)
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
        self._gammas = 1.0 / (2.0 * self.sigmas**2)
        self._ref_sq = np.einsum("ij,ij->i", feats.astype(np.float64), feats.astype(np.float64))
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
            blk = _kernel(_sqdist(feats[s:s + 512], feats, self._ref_sq), self._gammas)
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
            for j, name in enumerate(_IMAGE_STATS):
                self._det_names.append(name)
                self._det_ref.append(ref_stats[:, j].copy())
                self._det_tail.append(_IMAGE_TAILS[name])
            self._ref_texture = float(np.median(ref_stats[:, len(_IMAGE_STATS)]))
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
        from .mmd import median_sigma  # the package kernel (C++), on a random half/half split

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

    def _features_batched(self, tiles: np.ndarray) -> np.ndarray:
        return self._model.features(tiles)

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
        x = _as_tiles(tiles)
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
            k_ref = _kernel(_sqdist(feats, self.ref, self._ref_sq), self._gammas)
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
            k_win = _kernel(_sqdist(feats, self._ring_f[:fill]), self._gammas).sum(axis=1)
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
            values.update({name: stats[:, j] for j, name in enumerate(_IMAGE_STATS)})
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
                out.append(_KIND_OF["mean"])
            elif ("sharpness" in cand and stats is not None and self._ref_texture > 0
                  and stats[i, len(_IMAGE_STATS)] < 0.5 * self._ref_texture):
                out.append(_KIND_OF["sharpness"])
            else:
                cand.pop("sharpness", None) if len(cand) > 1 else None
                out.append(_KIND_OF[max(cand, key=cand.get)])
        return out

    def _test_window(self) -> WindowResult:
        """Unbiased MMD² of the ring (exactly one window) against the reference, with the
        permutation null. Caller holds the lock."""
        n, m = self.window, len(self.ref)
        # ring slot order does not matter for the statistic, but the permutation matrices index
        # window slots; any fixed slot order is a valid relabelling.
        kww = _kernel(_sqdist(self._ring_f, self._ring_f), self._gammas)
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
        st = require("safetensors.numpy", "runtime")
        path = Path(path)
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
                "version": _STATE_VERSION, "window": self.window, "alpha": self.alpha,
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
            arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
            with _atomic.atomic_path(path) as tmp:
                st.save_file(arrays, str(tmp), metadata={"neuroadda_qc_state": json.dumps(meta)})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, model, *, uncertainty=None, backend: str = "auto",
             batch_size: int = 32) -> "QCMonitor":
        """Restore a monitor saved with :meth:`save`; ``model`` must be the encoder it was built with.

        Raises
        ------
        FormatError
            The file is missing, truncated or not a QC state.
        """
        require("safetensors", "runtime")
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"QC state {path} does not exist")
        try:
            with safe_open(str(path), framework="np") as f:
                meta = json.loads((f.metadata() or {})["neuroadda_qc_state"])
                arrays = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, KeyError, json.JSONDecodeError, OSError) as exc:
            raise FormatError(f"{path}: not a readable QC state ({exc})") from exc
        if meta.get("version") != _STATE_VERSION:
            raise FormatError(f"{path}: expected QC state version {_STATE_VERSION}, got {meta.get('version')}")
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
            self._gammas = 1.0 / (2.0 * self.sigmas**2)
            self._ref_sq = np.einsum("ij,ij->i", self.ref.astype(np.float64), self.ref.astype(np.float64))
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


def _load_array(path: Path) -> np.ndarray:
    """Reference from a file: ``.npy`` (tiles or features, never pickled objects), or an image
    file / folder of images (tiles)."""
    if path.suffix == ".npy":
        try:
            return np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise FormatError(f"{path}: not a plain .npy array ({exc})") from exc
    from .qc_service import read_tiles  # images, folders of images

    return read_tiles(path)
