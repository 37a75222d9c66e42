"""Acquisition-time quality control: drift and artefact monitoring in encoder feature space.

A :class:`QCMonitor` holds a fixed *reference* (the first, good sections of the acquisition, in
acquisition order, as tiles or as precomputed encoder features) and compares every new tile with it
in the feature space of a trained encoder, with the kernel of the MMD² test used for source ranking:

* **Drift** -- the stream is cut into consecutive windows of ``window`` tiles; each full window's
  statistic (by default its *novelty*: the mean log distance of its tiles to their k-th nearest
  reference tile; or its unbiased MMD² against the reference) is compared with a threshold
  *calibrated on the reference's own consecutive windows*: every run of ``window`` consecutive
  reference tiles is scored against the reference without its sections and one section on each
  side, and the window alarms when its statistic exceeds the mean of those scores by
  ``sqrt(1/alpha - 1)`` standard deviations (Cantelli's one-sided bound, which needs no
  distributional assumption); a reference too short for that is calibrated on shorter runs
  (conservative, and said so). Consecutive sections are not exchangeable with a
  random reference sample, so a permutation null (the old test) alarms on every clean stream; this
  null is made of the same kind of windows the stream delivers. See ``docs/method.md``.
* **Tile scores** -- the MMD witness function at every new tile,
  ``mean_w k(x, w) - mean_r k(x, r)`` (w: the other tiles of the current window, r: the
  reference); positive where the window has more mass than the reference.
* **Artefact flags** -- robust per-detector cuts calibrated on the reference's clean tiles: each
  detector's value (reference similarity, model uncertainty when a full network is given, and cheap
  intensity descriptors and a small learned fold / stain network when the reference was given as
  tiles) becomes a robust z-score ``(value - median) / max(1.4826 MAD, floor)`` in its artefact
  tail, and a tile is flagged when some z-score exceeds the Bonferroni Gaussian cut
  ``Phi^-1(1 - artefact_fpr / D)``, the largest z-score of that detector over the reference (so no
  clean reference tile would be flagged) and the reference's exponential tail extrapolated to
  ``artefact_fpr / D``. The *severity* (largest z-score over its cut) orders flags, and a likely
  cause is named from the detectors that exceed their cut.

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
import warnings
from collections import deque
from pathlib import Path
from statistics import NormalDist
from typing import Any, Sequence

import numpy as np
from scipy.special import erfc

from .._digest import folder_sha256
from ..errors import DTypeError, FormatError, InputValueError, ShapeError
from ..mmd import gaussian_kernel_matrix, median_sigma
from ..package import ModelPackage
from ..runtime import FeatureExtractor, Predictor
from ..uncertainty import tile_uncertainty
from .artefact_net import MIN_SIZE as NET_MIN_SIZE
from .artefact_net import NET_DETECTORS, artefact_net_scores
from .descriptors import IMAGE_STATS, IMAGE_TAILS, KIND_OF, SCALE_FLOOR, TEXTURE, as_tiles, image_stats
from .reading import load_array
from .state import read_state, write_state

__all__ = ["QCMonitor", "QCReport", "WindowResult", "QCCalibrationWarning"]

#: Fewest reference windows (runs of ``window`` consecutive tiles, half a window apart) the drift
#: threshold is calibrated on; below it the mean and standard deviation of the null are too uncertain
#: and windows are not tested (the monitor says so).
MIN_CALIBRATION_WINDOWS = 8
#: Window statistics: ``"novelty"`` (mean log distance of the window's tiles to their k-th nearest reference
#: tile), ``"mmd2"`` (unbiased MMD² against the reference), ``"both"`` (either, each at alpha / 2).
STATISTICS = ("novelty", "mmd2", "both")


class QCCalibrationWarning(UserWarning):
    """The reference is too small for the requested alpha / artefact_fpr; the message says what is
    missing and what the monitor does instead."""


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
        Cantelli's upper bound on the probability that a clean window scores at least this high,
        ``1 / (1 + z²)`` for ``z = (statistic - mean) / sd`` of the calibration windows (1 when z <= 0;
        with ``statistic="both"`` twice the smaller of the two); NaN when the monitor could not be
        calibrated.
    drift : bool
        The statistic in use reached its calibrated threshold (``p_value <= alpha``).
    rule : str
        Which statistic fired (``"novelty"``, ``"mmd2"``, ``"mmd2+novelty"``), ``"uncalibrated"`` when the
        window was not tested, else ``""``.
    first_id, last_id : str
        Ids of the first and last tile of the window.
    t_start, t_end : float
        Timestamps of the first and last tile.
    n_flagged : int
        Tiles of the window flagged as artefacts.
    threshold : float
        The calibrated MMD² alarm threshold (NaN when MMD² is not the statistic or uncalibrated).
    novelty : float
        Mean over the window's tiles of the log distance to their ``n_neighbors``-th nearest
        reference tile (in feature units).
    novelty_threshold : float
        The calibrated novelty alarm threshold (NaN when not used or uncalibrated).
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
    threshold: float = float("nan")
    novelty: float = float("nan")
    novelty_threshold: float = float("nan")

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
        Nominal p-value of the tile's severity: ``min(1, D * Phi(-severity * c))`` with ``c`` the
        Bonferroni Gaussian cut of D detectors; ``<= artefact_fpr`` exactly when flagged.
    flags : ndarray (N,) bool
        ``severity > 1``: some detector beyond its calibrated cut.
    kinds : list of str
        Most likely cause for flagged tiles (``"black_region"``, ``"saturation"``, ``"defocus"``,
        ``"fold"``, ``"stain"``, ``"brightness"``, ``"contrast"``, ``"bright_region"``,
        ``"feature_outlier"``, ``"uncertainty"``), ``""`` for unflagged tiles.
    windows : tuple of WindowResult
        Windows completed by this update (often none; several if the update is large).
    severity : ndarray (N,) float64
        Largest robust z-score over its detector's cut (> 1 flagged; orders the gallery).
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
    severity: np.ndarray | None = None

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
            "severity": None if self.severity is None else self.severity.tolist(),
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
            _refuse_full_network(Path(model))
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


def _refuse_full_network(path: Path) -> None:
    """An ONNX file given as the encoder but holding the full network (its output at the input's
    resolution) is refused with what to do, instead of the runtime's 'no backend can run this model'."""
    if not (path.is_file() and path.suffix.lower() == ".onnx"):
        return
    from ..export import onnx_metadata

    import onnx

    part = onnx_metadata(path).get("neuroadda_rt.part")
    graph = onnx.load(str(path), load_external_data=False).graph
    dims = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in (graph.input[0],
                                                                                         graph.output[0])]
    channels = dims[1][1] if len(dims[1]) > 1 else None
    if part is None and len(dims[0]) == len(dims[1]) >= 4 and dims[0][2:] == dims[1][2:]:
        part = "full"  # a foreign ONNX whose output has the input's spatial axes
    if part == "full":
        what = f"{channels} channels" if isinstance(channels, int) and channels else "a probability map"
        raise InputValueError(
            f"{path}: this ONNX is the full network (output {what} at full resolution), but QC needs the "
            f"encoder's features; export the encoder with `neuroadda-rt export MODEL --part encoder` (or pass the "
            f"model package folder)")


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



def _or_none(x: float) -> float | None:
    """NaN (a threshold not in use) as None, so that summaries compare and serialise plainly."""
    return None if math.isnan(x) else float(x)


def _mmd2_from_sums(a_ww: float, a_rr: float, a_wr: float, n: int, m: int) -> float:
    """Unbiased MMD² from the off-diagonal kernel sums of the two samples and their cross sum."""
    return a_ww / (n * (n - 1)) + a_rr / (m * (m - 1)) - 2 * a_wr / (n * m)


#: Share of the reference's largest z-scores (at least ``TAIL_MIN`` of them) the exponential tail of an
#: artefact detector is fitted to.
TAIL_SHARE, TAIL_MIN = 0.1, 10


def _tail_cut(z: np.ndarray, p: float) -> float:
    """The value a clean tile exceeds with probability ``p``, from an exponential tail fitted to the
    reference's largest z-scores (peaks over a threshold: u = the value below the top ``TAIL_SHARE``,
    scale = the mean excess over u, the exponential's maximum-likelihood estimate). The reference's
    maximum alone is exceeded by an exchangeable clean tile with probability 1/(M+1) per detector,
    whatever ``p`` is asked for (2% of tiles over 10 detectors at M = 480); the tail extends the
    reference's own tail to ``p``. -inf when ``p`` is not beyond the fitted share (the other cuts apply)."""
    zs = np.sort(np.asarray(z, dtype=np.float64))
    m = len(zs)
    k = min(max(TAIL_MIN, round(TAIL_SHARE * m)), m - 1)
    if k < 1 or p >= k / m:
        return -math.inf
    u = zs[m - k - 1]
    scale = float(np.mean(zs[m - k:] - u))
    return float(u + scale * math.log(k / m / p))


def _order_groups(groups, m: int) -> np.ndarray:
    """Section labels -> 0, 1, 2, ... in order of first appearance (the acquisition order)."""
    g = np.asarray(groups).reshape(-1)
    if len(g) != m:
        raise ShapeError(f"expected one reference group per reference tile ({m}), got {len(g)}")
    _, first, inv = np.unique(g, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[inv.reshape(-1)]


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
        (N, d) float, **in acquisition order** (the first sections of the acquisition). Copied; at
        most ``max_reference`` are kept (deterministic subsample, order kept). The drift threshold
        needs at least ``MIN_CALIBRATION_WINDOWS`` runs of ``window`` consecutive tiles (about
        ``(MIN_CALIBRATION_WINDOWS / 2 + 3) * window`` tiles); with fewer it is calibrated on the
        longest shorter run (>= 4 tiles) that gives enough, a conservative threshold, and warns
        (``calibration_note``); when no run length gives enough it warns and does not test drift
        (``drift_note``).
    window : int
        Tiles per drift test.
    alpha : float
        False-alarm rate per window the drift threshold is set for (Cantelli's bound on the
        reference's own windows; the rate measured on real streams is in ``docs/results.md``).
    uncertainty : callable or Predictor, optional
        Full network for the uncertainty detector (see :class:`_Model`); None disables it.
    reference_uncertainty : array-like, optional
        Uncertainties of the reference when ``reference`` is features and ``uncertainty`` is set.
    reference_groups : array-like, optional
        The section (file, z) of each reference tile. Calibration windows leave their own sections
        and one on each side out of the reference they are compared with. Default: each run of
        ``window`` consecutive tiles is a section.
    sigma : float or sequence of float, optional
        Kernel bandwidth(s); default the median heuristic on the reference
        (:func:`~neuroadda_rt.median_sigma`), computed once.
    max_reference : int
        Largest reference kept (bounds memory and the cost per tile).
    artefact_fpr : float
        Target false-positive rate of the artefact flags on good tiles (the Bonferroni level of the
        Gaussian cut; the rate measured on real tiles is in ``docs/results.md``).
    history : int
        Window results kept in memory (older ones are only counted).
    seed : int
        Seed of the reference subsample and of the bandwidth's half/half split.
    statistic : {"novelty", "mmd2", "both"}
        Window statistic the alarm uses: ``"novelty"`` (default), the mean over the window's tiles of
        the log distance to their ``n_neighbors``-th nearest reference tile: high when the tiles look
        like nothing in the reference (focus, contrast, noise, another sample), insensitive to which
        reference-like content the window holds; ``"mmd2"``, the unbiased MMD² against the whole
        reference (also sensitive to the window's content mix); ``"both"``, either at alpha / 2. Both
        statistics are always computed and reported.
    n_neighbors : int
        k of the novelty statistic.
    backend : str
        Backend used when ``model`` is a path.
    batch_size : int
        Feature-extraction batch size.
    artefact_net : bool
        Add the learned fold / stain detectors (``fold_net``, ``stain_net``: a small bundled network,
        :mod:`neuroadda_rt.qc.artefact_net`) when the reference is given as tiles of at least 16 px;
        calibrated on the reference like every other detector.

    Examples
    --------
    >>> import numpy as np
    >>> from neuroadda_rt import QCMonitor
    >>> rng = np.random.default_rng(0)
    >>> encoder = lambda t: np.stack([t.mean((1, 2)), t.std((1, 2))], axis=1)  # a toy encoder
    >>> ref = rng.integers(0, 256, size=(512, 32, 32), dtype=np.uint8)
    >>> mon = QCMonitor(encoder, ref, window=64)
    >>> rep = mon.update(rng.integers(0, 256, size=(64, 32, 32), dtype=np.uint8))
    >>> len(rep.windows), rep.scores.shape
    (1, (64,))
    """

    def __init__(self, model, reference, *, window: int = 256, alpha: float = 0.01,
                 uncertainty=None, reference_uncertainty=None, reference_groups=None,
                 sigma: float | Sequence[float] | None = None, max_reference: int = 2048,
                 artefact_fpr: float = 0.01, history: int = 4096, seed: int = 0, statistic: str = "novelty",
                 n_neighbors: int = 5, backend: str = "auto", batch_size: int = 32, artefact_net: bool = True,
                 _state: dict | None = None):
        if int(window) < 4:
            raise InputValueError(f"expected window >= 4, got {window}")
        if not 0 < float(alpha) < 1:
            raise InputValueError(f"expected 0 < alpha < 1, got {alpha}")
        if not 0 < float(artefact_fpr) < 1:
            raise InputValueError(f"expected 0 < artefact_fpr < 1, got {artefact_fpr}")
        if int(max_reference) < 16:
            raise InputValueError(f"expected max_reference >= 16, got {max_reference}")
        if statistic not in STATISTICS:
            raise InputValueError(f"expected statistic in {STATISTICS}, got {statistic!r}")
        if not 1 <= int(n_neighbors) < int(window):
            raise InputValueError(f"expected 1 <= n_neighbors < window ({window}), got {n_neighbors}")
        self.statistic = statistic
        self.n_neighbors = int(n_neighbors)
        self.window = int(window)
        self.alpha = float(alpha)
        self.artefact_fpr = float(artefact_fpr)
        self.max_reference = int(max_reference)
        self.seed = int(seed)
        self._history_len = int(history)
        self._use_net = bool(artefact_net)
        self._model = _Model(model, uncertainty, backend=backend, batch_size=batch_size)
        self._lock = threading.Lock()
        self.loaded_extra: dict = {}
        if _state is not None:
            self._restore(_state)
            return
        self._build_reference(reference, reference_uncertainty, reference_groups, sigma)
        self._reset_stream()

    # -- reference ---------------------------------------------------------------------------

    def _build_reference(self, reference, reference_uncertainty, reference_groups, sigma) -> None:
        if isinstance(reference, (str, os.PathLike)):
            reference = load_array(Path(reference))
        ref = np.asarray(reference) if not isinstance(reference, (list, tuple)) else reference
        rng = np.random.default_rng(self.seed)
        ref_stats = ref_unc = ref_net = None
        self._tile_shape: list[int] | None = None
        self.examples = np.zeros((0, 1, 1), np.uint8)
        n_given = len(ref)
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
            n_given = len(tiles)
            keep = self._subsample(len(tiles), rng)
            tiles = tiles[keep]
            feats = self._model.features(tiles)
            ref_stats = image_stats(tiles)
            if self._use_net and min(tiles.shape[1:]) >= NET_MIN_SIZE:
                ref_net = artefact_net_scores(tiles)
            self._tile_shape = list(tiles.shape[1:])
            if self._model.has_uncertainty:
                ref_unc = self._model.uncertainty(tiles)
            pick = np.unique(np.linspace(0, len(tiles) - 1, min(8, len(tiles))).round().astype(int))
            self.examples = np.rint(tiles[pick] * 255).astype(np.uint8)  # shown beside flags in the report
        if len(feats) < 16:
            raise ShapeError(f"expected at least 16 reference tiles, got {len(feats)}")
        m = len(feats)
        if reference_groups is None:
            groups = np.arange(n_given) // self.window
        else:
            groups = _order_groups(reference_groups, n_given)
        self._groups = np.asarray(groups, dtype=np.int64)[keep]
        self.ref = feats
        self.dim = feats.shape[1]
        self.sigmas = self._choose_sigma(feats, sigma, rng)
        # the reference kernel, once: row sums (leave-one-out similarity), total, and the drift calibration
        kmat = np.empty((m, m))
        for s in range(0, m, 512):  # one-off: BLAS may use every thread here
            kmat[s:s + 512] = _kernel(feats[s:s + 512], feats, self.sigmas)
        np.fill_diagonal(kmat, 0.0)
        rowsum = kmat.sum(axis=1)
        self._ref_total = float(rowsum.sum())
        self._ref_sq = (feats.astype(np.float64) ** 2).sum(axis=1)
        self._calibrate_drift(kmat, self._sqdist(feats))
        del kmat
        ref_sim = rowsum / (m - 1)  # leave-one-out reference similarity
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
        if ref_net is not None:
            for j, name in enumerate(NET_DETECTORS):
                self._det_names.append(name)
                self._det_ref.append(ref_net[:, j].copy())
                self._det_tail.append(1)
        self._calibrate_artefacts()
        self._warn_calibration()

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

    def _sqdist(self, feats: np.ndarray) -> np.ndarray:
        """Squared Euclidean distances of features to every reference tile, float64."""
        f = feats.astype(np.float64)
        return np.maximum((f * f).sum(axis=1)[:, None] + self._ref_sq[None] - 2 * f @ self.ref.astype(np.float64).T,
                          0.0)

    def _novelty(self, d2: np.ndarray) -> np.ndarray:
        """Log distance of each row's tile to its ``n_neighbors``-th nearest column tile."""
        kth = np.partition(d2, self.n_neighbors - 1, axis=1)[:, self.n_neighbors - 1]
        return 0.5 * np.log(np.maximum(kth, 1e-24))

    def _calibration_runs(self, n: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Runs of ``n`` consecutive reference tiles (starting every ``n // 2``), each with the reference
        tiles outside its sections and one section on each side; runs leaving fewer than ``n`` are skipped."""
        m, g = len(self.ref), self._groups
        runs = []
        for s in range(0, m - n + 1, max(1, n // 2)):
            blk = np.arange(s, s + n)
            lo, hi = g[blk].min() - 1, g[blk].max() + 1
            rest = np.flatnonzero((g < lo) | (g > hi))
            if len(rest) >= n:
                runs.append((blk, rest))
        return runs

    def _calibrate_drift(self, kmat: np.ndarray, dmat: np.ndarray) -> None:
        """Both window statistics of every run of ``window`` consecutive reference tiles (starting
        every half window) against the reference without the run's sections and one section on each
        side: windows of consecutive sections, scored against sections they do not touch, as the
        stream's are. When the reference gives fewer than ``MIN_CALIBRATION_WINDOWS`` such runs, the
        longest shorter run length (>= 4) that gives enough is used instead: a conservative null,
        since a full window averages more tiles than the shorter run (``docs/method.md``)."""
        runs = self._calibration_runs(self.window)
        self._full_calibration_windows = len(runs)
        self.calibration_length = self.window
        if len(runs) < MIN_CALIBRATION_WINDOWS:
            for length in range(self.window - 1, 3, -1):
                shorter = self._calibration_runs(length)
                if len(shorter) >= MIN_CALIBRATION_WINDOWS:
                    runs, self.calibration_length = shorter, length
                    break
        vals, nov = [], []
        for blk, rest in runs:
            a_ww = kmat[np.ix_(blk, blk)].sum()
            a_rr = kmat[np.ix_(rest, rest)].sum()
            a_wr = kmat[np.ix_(blk, rest)].sum()
            vals.append(_mmd2_from_sums(a_ww, a_rr, a_wr, len(blk), len(rest)))
            nov.append(float(self._novelty(dmat[np.ix_(blk, rest)]).mean()))
        self._cal = np.asarray(vals, dtype=np.float64)
        self._cal_nov = np.asarray(nov, dtype=np.float64)
        self._set_threshold()

    def _set_threshold(self) -> None:
        b = len(self._cal)
        nan = float("nan")
        self._cal_mean = self._cal_sd = self.threshold = nan
        self._nov_mean = self._nov_sd = self.novelty_threshold = nan
        self.calibration_note = ""
        if b >= MIN_CALIBRATION_WINDOWS:
            level = self.alpha / 2 if self.statistic == "both" else self.alpha  # Bonferroni over two statistics
            k = math.sqrt(1 / level - 1)  # Cantelli: P(X - mean >= k sd) <= 1 / (1 + k²) = level
            if self.statistic in ("mmd2", "both"):
                self._cal_mean = float(self._cal.mean())
                self._cal_sd = max(float(self._cal.std(ddof=1)), 1e-12)
                self.threshold = self._cal_mean + k * self._cal_sd
            if self.statistic in ("novelty", "both"):
                self._nov_mean = float(self._cal_nov.mean())
                self._nov_sd = max(float(self._cal_nov.std(ddof=1)), 1e-12)
                self.novelty_threshold = self._nov_mean + k * self._nov_sd
            self.drift_note = ""
            if self.calibration_length < self.window:
                self.calibration_note = (
                    f"the reference ({len(self.ref)} tiles, {len(np.unique(self._groups))} sections) gives "
                    f"{self._full_calibration_windows} calibration windows of {self.window} consecutive tiles "
                    f"with a section on each side left out, fewer than the {MIN_CALIBRATION_WINDOWS} needed; the "
                    f"drift threshold is calibrated on {b} runs of {self.calibration_length} consecutive tiles "
                    f"instead, which is conservative (a window of {self.window} averages more tiles): small "
                    f"drifts may be missed; give more reference sections for a full-size calibration")
        else:
            self.drift_note = (
                f"drift is not tested: the reference ({len(self.ref)} tiles, {len(np.unique(self._groups))} "
                f"sections) gives {b} calibration windows of {self.window} consecutive tiles with a section "
                f"on each side left out, and fewer than {MIN_CALIBRATION_WINDOWS} of any shorter run down to 4 "
                f"tiles (the smallest p-value their ranks could give is 1/{b + 1} = {1 / (b + 1):.3g}, alpha is "
                f"{self.alpha:g}); give more reference sections or a smaller window")

    def _calibrate_artefacts(self) -> None:
        """Robust centre and scale per detector, its cut (the largest of the Bonferroni Gaussian cut,
        the reference's own largest z-score and the reference's tail extrapolated to artefact_fpr / D)."""
        d = len(self._det_names)
        self._gauss_cut = NormalDist().inv_cdf(1 - self.artefact_fpr / d)
        centre, scale = [], []
        for name, r in zip(self._det_names, self._det_ref):
            med = float(np.median(r))
            mad = 1.4826 * float(np.median(np.abs(r - med)))
            centre.append(med)
            scale.append(max(mad, SCALE_FLOOR.get(name, 1e-6)))
        self._centre, self._scale = np.array(centre), np.array(scale)
        z_ref = self._zscores(dict(zip(self._det_names, self._det_ref)))
        tail = np.array([_tail_cut(z, self.artefact_fpr / d) for z in z_ref])
        self._cut = np.maximum(np.maximum(self._gauss_cut, z_ref.max(axis=1)), tail)

    def _warn_calibration(self) -> None:
        m = len(self.ref)
        if self.drift_note:
            warnings.warn(self.drift_note, QCCalibrationWarning, stacklevel=3)
        if self.calibration_note:
            warnings.warn(self.calibration_note, QCCalibrationWarning, stacklevel=3)
        if m + 1 < 1 / self.artefact_fpr:
            warnings.warn(
                f"the reference has {m} tiles: the smallest p-value its ranks can give is 1/{m + 1} = "
                f"{1 / (m + 1):.3g}, above artefact_fpr = {self.artefact_fpr:g}; artefact flags rest on the "
                f"robust Gaussian cut and the reference's largest values, and their false-positive rate "
                f"is not checked against {self.artefact_fpr:g} by the reference itself", QCCalibrationWarning,
                stacklevel=3)

    def _reset_stream(self) -> None:
        n = self.window
        self._ring_f = np.zeros((n, self.dim), dtype=np.float32)
        self._ring_s = np.zeros(n)  # reference similarity
        self._ring_n = np.zeros(n)  # novelty (log k-th nearest reference distance)
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
    def calibration(self) -> dict[str, Any]:
        """The drift calibration: windows used, their mean and sd, the threshold, and why not (if not)."""
        return {"n_windows": int(len(self._cal)), "statistic": self.statistic, "mean": self._cal_mean,
                "sd": self._cal_sd, "threshold": self.threshold, "novelty_mean": self._nov_mean,
                "novelty_sd": self._nov_sd, "novelty_threshold": self.novelty_threshold, "alpha": self.alpha,
                "note": self.drift_note, "calibration_length": self.calibration_length,
                "calibration_note": self.calibration_note,
                "artefact_cuts": dict(zip(self._det_names, self._cut.tolist()))}

    @property
    def windows(self) -> list[WindowResult]:
        """The last ``history`` window results (a copy)."""
        with self._lock:
            return list(self._windows)

    def summary(self) -> dict[str, Any]:
        """Aggregate counters over the whole stream."""
        with self._lock:
            return {"n_tiles": self.n_tiles, "n_windows": self.n_windows, "window_fill": self._since_test,
                    "n_drift_windows": self.n_drift_windows,
                    "n_flagged": self.n_flagged, "flag_counts": dict(self.flag_counts),
                    "sigma": self.sigma, "reference_size": len(self.ref), "detectors": self.detectors,
                    "statistic": self.statistic, "threshold": _or_none(self.threshold),
                    "novelty_threshold": _or_none(self.novelty_threshold), "drift_note": self.drift_note,
                    "calibration_length": self.calibration_length, "calibration_note": self.calibration_note}

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
        net = artefact_net_scores(x) if NET_DETECTORS[0] in self._det_names else None
        with _single_blas():
            sim = _kernel(feats, self.ref, self.sigmas).mean(axis=1)
            nov = self._novelty(self._sqdist(feats))
        severity, artefact_p, kinds = self._artefacts(sim, unc, stats, net)
        flags = severity > 1.0
        with self._lock, _single_blas():
            if ids is None:
                ids = [str(self.n_tiles + i) for i in range(n_new)]
            done: list[WindowResult] = []
            for i in range(n_new):
                slot = self._ring_pos
                self._ring_f[slot] = feats[i]
                self._ring_s[slot] = sim[i]
                self._ring_n[slot] = nov[i]
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
                        artefact_p=artefact_p, flags=flags, kinds=kinds, windows=tuple(done), severity=severity)

    # -- internals --------------------------------------------------------------------------

    def _zscores(self, values: dict) -> np.ndarray:
        """(D, N) robust z-scores, each in its detector's artefact tail (two-sided: the absolute value)."""
        z = []
        for j, (name, tail) in enumerate(zip(self._det_names, self._det_tail)):
            v = (np.asarray(values[name], dtype=np.float64) - self._centre[j]) / self._scale[j]
            z.append(v if tail > 0 else -v if tail < 0 else np.abs(v))
        return np.stack(z)

    def _artefacts(self, sim, unc, stats, net=None) -> tuple[np.ndarray, np.ndarray, list[str]]:
        values = {"similarity": sim, "uncertainty": unc}
        if stats is not None:
            values.update({name: stats[:, j] for j, name in enumerate(IMAGE_STATS)})
        if net is not None:
            values.update({name: net[:, j] for j, name in enumerate(NET_DETECTORS)})
        rel = self._zscores(values) / self._cut[:, None]
        severity = rel.max(axis=0)
        d = len(self._det_names)
        # nominal p-value of the severity: Bonferroni over D detectors of the Gaussian tail at the cut's scale
        p = np.minimum(1.0, d * 0.5 * erfc(severity * self._gauss_cut / math.sqrt(2)))
        kinds = [""] * len(severity)
        for i in np.flatnonzero(severity > 1.0):
            kinds[i] = self._name_cause(rel[:, i], None if stats is None else stats[i])
        return severity, p, kinds

    def _name_cause(self, rel: np.ndarray, stats) -> str:
        """Likely cause of one flagged tile from the detectors beyond their cut (``rel`` > 1): black
        pixels first (padding bands, stripes, lost sections), then saturation, then a global blur
        (sharpness beyond its cut with the median block texture below half the reference's), else the
        detector furthest beyond its cut (fold, stain, brightness, contrast, ...); the smoothest block
        (``flat``) does not name a stain when brightness or contrast moved and ``flat_area`` did not."""
        over = {name: r for name, r in zip(self._det_names, rel) if r > 1.0}
        for name in ("dark_fraction", "black_lines", "saturated_fraction"):
            if name in over:
                return KIND_OF[name]
        if ("sharpness" in over and stats is not None and self._ref_texture > 0
                and stats[TEXTURE] < 0.5 * self._ref_texture):
            return KIND_OF["sharpness"]
        if len(over) > 1:
            over.pop("sharpness", None)  # a local artefact also lowers the sharpness ratio
        if ("flat" in over and "flat_area" in self._det_names and "flat_area" not in over
                and ("mean" in over or "std" in over)):
            # a global gain / offset lowers every block's standard deviation (``flat`` is absolute); a
            # stain leaves a smooth area relative to the tile's texture, which ``flat_area`` did not see
            over.pop("flat")
        return KIND_OF[max(over, key=over.get)]

    def _test_window(self) -> WindowResult:
        """Unbiased MMD² of the ring (exactly one window) against the reference, compared with the
        calibrated threshold. Caller holds the lock."""
        n, m = self.window, len(self.ref)
        kww = _kernel(self._ring_f, self._ring_f, self.sigmas)
        np.fill_diagonal(kww, 0.0)
        mmd2 = float(_mmd2_from_sums(float(kww.sum()), self._ref_total, float(self._ring_s.sum()) * m, n, m))
        novelty = float(self._ring_n.mean())
        if self.drift_note:
            p, drift, rule = float("nan"), False, "uncalibrated"
        else:
            ps, fired = [], []
            for name, x, mu, sd, thr in (("mmd2", mmd2, self._cal_mean, self._cal_sd, self.threshold),
                                         ("novelty", novelty, self._nov_mean, self._nov_sd, self.novelty_threshold)):
                if math.isnan(thr):
                    continue
                z = (x - mu) / sd
                ps.append(1.0 if z <= 0 else 1.0 / (1.0 + z * z))  # Cantelli
                if x >= thr:
                    fired.append(name)
            p = min(1.0, len(ps) * min(ps))  # Bonferroni over the statistics in use
            drift = bool(fired)
            rule = "+".join(fired)
        order = np.roll(np.arange(n), -self._ring_pos)  # oldest first
        res = WindowResult(index=self.n_windows, n_tiles=n, mmd2=mmd2, p_value=p, drift=drift, rule=rule,
                           first_id=self._ring_id[order[0]], last_id=self._ring_id[order[-1]],
                           t_start=float(self._ring_t[order[0]]), t_end=float(self._ring_t[order[-1]]),
                           n_flagged=int(self._ring_flag.sum()), threshold=float(self.threshold),
                           novelty=novelty, novelty_threshold=float(self.novelty_threshold))
        self.n_windows += 1
        self.n_drift_windows += int(drift)
        self._windows.append(res)
        return res

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
                "ref": self.ref, "sigmas": self.sigmas, "groups": self._groups, "calibration": self._cal,
                "calibration_novelty": self._cal_nov, "ring_n": self._ring_n,
                "examples": self.examples,
                "ring_f": self._ring_f, "ring_s": self._ring_s,
                "ring_flag": self._ring_flag.astype(np.uint8), "ring_t": self._ring_t,
            }
            for name, r in zip(self._det_names, self._det_ref):
                arrays[f"det_{name}"] = np.asarray(r, dtype=np.float64)
            meta = {
                "window": self.window, "alpha": self.alpha, "artefact_fpr": self.artefact_fpr,
                "statistic": self.statistic, "n_neighbors": self.n_neighbors,
                "max_reference": self.max_reference, "seed": self.seed, "history": self._history_len,
                "ref_total": self._ref_total, "detectors": self._det_names, "tails": self._det_tail,
                "ref_texture": self._ref_texture, "tile_shape": self._tile_shape,
                "ring_id": self._ring_id, "ring_pos": self._ring_pos, "ring_fill": self._ring_fill,
                "since_test": self._since_test, "n_tiles": self.n_tiles, "n_windows": self.n_windows,
                "n_drift_windows": self.n_drift_windows, "n_flagged": self.n_flagged,
                "flag_counts": self.flag_counts, "calibration_length": self.calibration_length,
                "full_calibration_windows": self._full_calibration_windows,
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
        try:
            kw = {k: meta[k] for k in ("window", "alpha", "max_reference", "artefact_fpr", "history", "seed",
                                       "statistic", "n_neighbors")}
        except KeyError as exc:
            raise FormatError(f"{path}: inconsistent QC state (missing {exc})") from exc
        return cls(model, None, uncertainty=uncertainty, backend=backend, batch_size=batch_size,
                   _state={"meta": meta, "arrays": arrays, "path": str(path)}, **kw)

    def _restore(self, state: dict) -> None:
        meta, a = state["meta"], state["arrays"]
        fp = self._model.fingerprint
        if fp and meta.get("model") and fp != meta["model"]:
            raise FormatError(f"{state['path']}: saved with model {meta['model']}, got model {fp}")
        try:
            self.ref = a["ref"].astype(np.float32)
            self.dim = self.ref.shape[1]
            self.sigmas = a["sigmas"].astype(np.float64)
            self._groups = a["groups"].astype(np.int64)
            self._cal = a["calibration"].astype(np.float64)
            self._cal_nov = a["calibration_novelty"].astype(np.float64)
            # states written before sub-window calibration existed were calibrated at full size
            self.calibration_length = int(meta.get("calibration_length", self.window))
            self._full_calibration_windows = int(meta.get("full_calibration_windows", len(self._cal)))
            self._ref_sq = (self.ref.astype(np.float64) ** 2).sum(axis=1)
            self.examples = a["examples"].astype(np.uint8)
            self._set_threshold()
            self._ref_total = float(meta["ref_total"])
            self._det_names = list(meta["detectors"])
            self._det_tail = [int(t) for t in meta["tails"]]
            self._det_ref = [a[f"det_{name}"] for name in self._det_names]
            self._ref_texture = float(meta["ref_texture"])
            self._tile_shape = meta["tile_shape"]
            self._calibrate_artefacts()
            if "uncertainty" in self._det_names and not self._model.has_uncertainty:
                raise FormatError(f"{state['path']}: the saved monitor uses an uncertainty model; pass uncertainty=")
            self._reset_stream()
            self._ring_f[:] = a["ring_f"]
            self._ring_s[:] = a["ring_s"]
            self._ring_n[:] = a["ring_n"]
            self._ring_flag[:] = a["ring_flag"].astype(bool)
            self._ring_t[:] = a["ring_t"]
            self._ring_id = list(meta["ring_id"])
            for key in ("ring_pos", "ring_fill", "since_test", "n_tiles", "n_windows", "n_drift_windows",
                        "n_flagged"):
                setattr(self, f"_{key}" if key.startswith(("ring", "since")) else key, int(meta[key]))
            self.flag_counts = {str(k): int(v) for k, v in meta["flag_counts"].items()}
            self._windows.extend(WindowResult(**w) for w in meta["windows"])
            self.loaded_extra = dict(meta.get("extra") or {})
        except (KeyError, ValueError, TypeError) as exc:
            raise FormatError(f"{state['path']}: inconsistent QC state ({exc!r})") from exc
