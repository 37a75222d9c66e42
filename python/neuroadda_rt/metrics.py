"""Segmentation scores for connectomics: variation of information and adapted Rand error.

Both are computed from a sparse contingency table of (seg, gt) label pairs, counted by a
multithreaded C++ kernel into an open-addressing hash map, so label ids may be anything an
integer dtype holds (up to 2**64 - 1, sparse, unrelabelled). :class:`ContingencyTable` can be
filled block by block and merged across workers; the scores are exactly (bit for bit) those of
a one-shot count, because counts are exact integers and every sum is order independent.

Conventions (identical to ``skimage.metrics`` with ``image_true = gt``, ``image_test = seg``):

* ``split = H(seg | gt)`` (false splits, over-segmentation) and ``merge = H(gt | seg)`` (false
  merges, under-segmentation), in bits for ``base=2``. ``VI = split + merge``.
  ``skimage.metrics.variation_of_information(gt, seg, ignore_labels=ignore_gt)`` returns
  ``[split, merge]``.
* ``ignore_gt`` (default ``(0,)``, the unlabelled background): voxels whose gt label is listed
  are dropped from the table before any score, for seg and gt alike. ``ignore_seg`` (VI only,
  default none) drops voxels by their seg label in the same way.
* Adapted Rand error: with joint counts ``n_ij``, gt sizes ``a_i``, seg sizes ``b_j`` and ``N``
  kept voxels, ``P = sum n_ij**2 - N``, ``A = sum a_i**2 - N``, ``B = sum b_j**2 - N`` and
  ``error = 1 - P / (alpha*A + (1 - alpha)*B)``, ``precision = P / A``, ``recall = P / B``.
  This follows skimage's code, whose "precision" divides by the *gt* pair count (an
  under-segmentation scores precision 1); skimage's docstring describes the opposite, see
  scikit-image issue #6485. A zero denominator gives NaN.
"""

from __future__ import annotations

import math

import numpy as np

from . import _core
from ._device import resolve_device
from .errors import BackendUnavailableError, DTypeError, InputValueError, ShapeError

__all__ = ["ContingencyTable", "variation_of_information", "adapted_rand_error", "block_boxes", "blockwise_table",
           "merge_tables"]

_U64 = 1 << 64


def _labels(x, name: str) -> np.ndarray:
    a = x if isinstance(x, np.ndarray) else np.asarray(x)
    if a.dtype.kind not in "iub":
        raise DTypeError(f"expected an integer (or bool) {name} label array, got dtype {a.dtype} "
                         f"(labels are not converted silently)")
    if not a.dtype.isnative:
        raise DTypeError(f"expected native byte order for {name}, got dtype {a.dtype.str} (e.g. from N5); "
                         f"convert explicitly with .astype({a.dtype.str!r}.replace('>', '<'))")
    if not a.flags.aligned:  # rare (views into byte buffers); reading them in place is undefined in C++
        a = np.require(a, requirements="A")
    return a


def _pair(seg, gt) -> tuple[np.ndarray, np.ndarray]:
    seg, gt = _labels(seg, "seg"), _labels(gt, "gt")
    if seg.shape != gt.shape:
        raise ShapeError(f"expected seg and gt of the same shape, got {seg.shape} and {gt.shape}")
    return seg, gt


def _keys(labels, name: str) -> list[int]:
    """Ignore labels as 64-bit keys (negative ids sign-extended, like signed label dtypes)."""
    if isinstance(labels, (int, np.integer)) and not isinstance(labels, (bool, np.bool_)):
        labels = (labels,)
    if labels is None or isinstance(labels, (str, bytes, bool, np.bool_, float)) or not hasattr(labels, "__iter__"):
        raise DTypeError(f"expected {name} as an int or a sequence of ints (() for none), got {labels!r}")
    out = []
    for v in labels:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            raise DTypeError(f"expected integer labels in {name}, got {v!r}")
        v = int(v)
        if not -(1 << 63) <= v < _U64:
            raise InputValueError(f"expected {name} labels in [-2**63, 2**64), got {v}")
        out.append(v % _U64)
    return out


def _exact_sum(count: np.ndarray) -> int:
    """Exact sum of uint64 counts as a Python int (vectorised; a plain uint64 sum wraps at 2**64)."""
    c = count.ravel()
    low = int(np.sum(c & np.uint64(0xFFFFFFFF), dtype=np.uint64))  # < 2**32 per term: exact below 2**32 terms
    high = int(np.sum(c >> np.uint64(32), dtype=np.uint64))
    return (high << 32) + low


def _cpu_only(device: str, what: str) -> None:
    if isinstance(device, str) and device.lower() == "auto":
        return
    if resolve_device(device) == "cuda":
        raise BackendUnavailableError(f"{what} has no CUDA kernel (a hash-based CPU kernel); "
                                      f"use device='cpu' or 'auto'")


class ContingencyTable:
    """Sparse (seg, gt) label-pair counts that can be filled block by block and merged.

    Fill it with :meth:`add` on aligned blocks of two segmentations (e.g. chunks of volumes
    larger than memory, or blocks on different workers, then :meth:`merge` or pickle the
    tables); the scores equal those of a one-shot count exactly. Memory is proportional to the
    number of distinct label pairs (48 to 96 bytes each), never to the number of voxels.
    Thread safe: several threads may :meth:`add` to one table at once (the GIL is released).

    Examples
    --------
    >>> import numpy as np
    >>> from neuroadda_rt import ContingencyTable
    >>> gt = np.array([[1, 1, 2, 2], [1, 1, 2, 2]], dtype=np.uint64)
    >>> seg = np.array([[5, 5, 5, 7], [5, 5, 5, 7]], dtype=np.int32)
    >>> table = ContingencyTable()
    >>> table.add(seg[:1], gt[:1]).add(seg[1:], gt[1:])  # block by block
    ContingencyTable(pairs=3, voxels=8)
    >>> split, merge = table.variation_of_information()
    >>> round(split, 6), round(merge, 6)
    (0.5, 0.688722)
    """

    def __init__(self):
        self._table = _core.ContingencyTable()

    def add(self, seg, gt) -> "ContingencyTable":
        """Count the voxels of two aligned label blocks of the same shape; returns ``self``.

        Copy policy: NumPy arrays of any integer or bool dtype (the two may differ), any
        memory order and any strides are read in place, never copied; other array-likes are
        converted with ``np.asarray``; unaligned arrays are copied, non-native byte order is refused
        (:class:`~neuroadda_rt.errors.DTypeError`). Labels are keyed by their value as a 64-bit word, so a
        negative id in a signed dtype equals ``2**64`` minus its magnitude in ``uint64``.
        """
        seg, gt = _pair(seg, gt)
        if seg.size:  # an empty block adds nothing (fully valid for block-wise filling)
            self._table.add(seg, gt)
        return self

    def merge(self, other: "ContingencyTable") -> "ContingencyTable":
        """Add the counts of another table (e.g. from another worker); returns ``self``."""
        if not isinstance(other, ContingencyTable):
            raise TypeError(f"expected a ContingencyTable, got {type(other).__name__}")
        if self.total + other.total >= _U64:
            raise InputValueError(f"expected tables whose voxel counts sum to less than 2**64, got "
                                  f"{self.total} + {other.total}")
        self._table.merge(other._table)
        return self

    @property
    def n_pairs(self) -> int:
        """Number of distinct (seg, gt) label pairs."""
        return self._table.n_pairs

    @property
    def total(self) -> int:
        """Number of voxels counted (before ignore labels)."""
        return self._table.total

    @property
    def memory_bytes(self) -> int:
        """Bytes held by the hash map."""
        return self._table.memory_bytes

    def entries(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The non-zero entries as three uint64 arrays ``(seg, gt, count)``, in no fixed order."""
        return self._table.entries()

    def variation_of_information(self, *, ignore_seg=(), ignore_gt=(0,), base: float = 2) -> tuple[float, float]:
        """``(split, merge) = (H(seg|gt), H(gt|seg))`` in units of ``log(base)``; see the module notes.

        Raises
        ------
        InputValueError
            When no voxel is left after the ignore labels.
        """
        base = _real(base, "base")
        if not (base > 0 and base != 1 and math.isfinite(base)):
            raise InputValueError(f"expected a log base > 0 and != 1, got {base}")
        split, merge, n = self._table.variation_of_information(_keys(ignore_seg, "ignore_seg"),
                                                               _keys(ignore_gt, "ignore_gt"))
        if n == 0:
            raise InputValueError("expected at least one voxel outside the ignore labels, got none")
        scale = math.log(base)
        return split / scale, merge / scale

    def adapted_rand_error(self, *, ignore_gt=(0,), alpha: float = 0.5) -> tuple[float, float, float]:
        """``(error, precision, recall)`` with skimage's conventions; see the module notes."""
        alpha = _real(alpha, "alpha")
        if not 0.0 <= alpha <= 1.0:
            raise InputValueError(f"expected alpha in [0, 1], got {alpha}")
        error, precision, recall, n = self._table.adapted_rand_error(_keys(ignore_gt, "ignore_gt"), alpha)
        if n == 0:
            raise InputValueError("expected at least one voxel outside the ignore labels, got none")
        return error, precision, recall

    def __getstate__(self):
        return {"entries": self.entries()}

    def __setstate__(self, state):
        self._table = _core.ContingencyTable()
        seg, gt, count = (np.ascontiguousarray(a, dtype=np.uint64) for a in state["entries"])
        total = _exact_sum(count)
        if total >= _U64:  # the C++ table counts voxels in uint64: a larger total would wrap
            raise InputValueError(f"expected a pickled ContingencyTable whose counts sum to less than 2**64, "
                                  f"got a sum of {total} (a corrupt or forged state)")
        self._table.add_entries(seg, gt, count)

    def __repr__(self) -> str:
        return f"ContingencyTable(pairs={self.n_pairs}, voxels={self.total})"


def _real(value, name: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise InputValueError(f"expected {name} as a real number, got {value!r}") from None


def _table(seg, gt) -> ContingencyTable:
    seg, gt = _pair(seg, gt)
    if seg.size == 0:
        raise ShapeError(f"expected non-empty label arrays, got shape {seg.shape}")
    return ContingencyTable().add(seg, gt)


def variation_of_information(seg, gt, *, ignore_seg=(), ignore_gt=(0,), base: float = 2,
                             device: str = "auto") -> tuple[float, float]:
    """Variation of information split into its two conditional entropies.

    Parameters
    ----------
    seg, gt : ndarray of int
        Segmentation and ground truth, same shape, any number of dimensions, any integer
        dtype up to uint64 (the two may differ) with arbitrary, sparse ids.
    ignore_seg : sequence of int
        Voxels whose seg label is listed are left out (default: none).
    ignore_gt : sequence of int
        Voxels whose gt label is listed are left out (default: 0, the unlabelled background).
    base : float
        Logarithm base: 2 gives bits (skimage's unit), ``math.e`` nats.
    device : {"auto", "cpu"}
        CPU kernel only; ``"cuda"`` raises :class:`~neuroadda_rt.errors.BackendUnavailableError`.

    Returns
    -------
    split, merge : float
        ``H(seg | gt)`` (false splits) and ``H(gt | seg)`` (false merges); ``VI = split + merge``.
        Equal to ``skimage.metrics.variation_of_information(gt, seg, ignore_labels=ignore_gt)``.

    Raises
    ------
    DTypeError
        Non-integer labels. ShapeError: different shapes or empty arrays. InputValueError: no
        voxel left after the ignore labels.

    Notes
    -----
    Copy policy: NumPy arrays are read in place whatever their memory order or strides; the
    extra memory is the hash table (proportional to the number of distinct label pairs).
    Multithreaded with OpenMP; the GIL is released during the count.

    Examples
    --------
    >>> import numpy as np
    >>> from neuroadda_rt import variation_of_information
    >>> gt = np.array([1, 1, 2, 2])
    >>> variation_of_information(np.array([1, 2, 3, 4]), gt)  # over-segmented: 1 bit of split
    (1.0, 0.0)
    >>> variation_of_information(np.array([7, 7, 7, 7]), gt)  # merged: 1 bit of merge
    (0.0, 1.0)
    """
    _cpu_only(device, "variation_of_information")
    return _table(seg, gt).variation_of_information(ignore_seg=ignore_seg, ignore_gt=ignore_gt, base=base)


def adapted_rand_error(seg, gt, *, ignore_gt=(0,), alpha: float = 0.5,
                       device: str = "auto") -> tuple[float, float, float]:
    """Adapted Rand error of the SNEMI3D challenge (Arganda-Carreras et al. 2015).

    Parameters
    ----------
    seg, gt : ndarray of int
        As in :func:`variation_of_information`.
    ignore_gt : sequence of int
        Voxels whose gt label is listed are left out (default: 0).
    alpha : float
        Weight of the gt pair term in the error; 0.5 weighs both equally.
    device : {"auto", "cpu"}
        CPU kernel only.

    Returns
    -------
    error, precision, recall : float
        Equal to ``skimage.metrics.adapted_rand_error(gt, seg, ignore_labels=ignore_gt)``;
        note skimage's naming (module notes): ``precision`` = pairs together in both / pairs
        together in gt, ``recall`` = pairs together in both / pairs together in seg.

    Notes
    -----
    Copy policy and threading as :func:`variation_of_information`. Pair counts are exact
    128-bit integers.

    Examples
    --------
    >>> import numpy as np
    >>> from neuroadda_rt import adapted_rand_error
    >>> gt = np.array([1, 1, 2, 2])
    >>> adapted_rand_error(gt * 10, gt)  # identical up to renaming
    (0.0, 1.0, 1.0)
    """
    _cpu_only(device, "adapted_rand_error")
    return _table(seg, gt).adapted_rand_error(ignore_gt=ignore_gt, alpha=alpha)


# ----------------------------------------------------------------------------- blockwise
def block_boxes(shape, block_shape) -> list[tuple[slice, ...]]:
    """The boxes (tuples of slices) of a grid of ``block_shape`` blocks covering ``shape``, in C order;
    the last block on an axis is shorter when the shape is not a multiple.

    Examples
    --------
    >>> [tuple((s.start, s.stop) for s in b) for b in block_boxes((5,), (2,))]
    [((0, 2),), ((2, 4),), ((4, 5),)]
    """
    shape = tuple(int(s) for s in shape)
    bs = tuple(int(b) for b in block_shape)
    if len(bs) != len(shape) or min(bs, default=1) < 1:
        raise ShapeError(f"expected {len(shape)} positive block sizes for shape {shape}, got {bs}")
    axes = [[slice(a, min(a + b, n)) for a in range(0, n, b)] for n, b in zip(shape, bs)]
    out: list[tuple[slice, ...]] = [()]
    for ax in axes:
        out = [o + (s,) for o in out for s in ax]
    return out


def blockwise_table(seg, gt, *, block_shape=None, boxes=None) -> ContingencyTable:
    """A :class:`ContingencyTable` of two aligned label volumes filled block by block.

    ``seg`` and ``gt`` are anything sliceable with a ``shape`` (NumPy arrays, lazy
    :class:`~neuroadda_rt.Volume` objects, zarr or h5py datasets): only one block of each is in
    memory at a time. The scores of the table equal those of a one-shot count bit for bit (counts
    are exact integers; the module notes). ``block_shape`` defaults to 64 along the first axis and
    512 along the others; ``boxes`` (from :func:`block_boxes`) restricts the table to some blocks,
    e.g. one worker's share, to :func:`merge_tables` afterwards.
    """
    shape = tuple(int(s) for s in seg.shape)
    if shape != tuple(int(s) for s in gt.shape):
        raise ShapeError(f"expected seg and gt of the same shape, got {shape} and {tuple(gt.shape)}")
    if boxes is None:
        if block_shape is None:
            block_shape = tuple(64 if i == 0 else 512 for i in range(len(shape)))
        boxes = block_boxes(shape, block_shape)
    t = ContingencyTable()
    for box in boxes:
        t.add(np.asarray(seg[box]), np.asarray(gt[box]))
    return t


def merge_tables(tables) -> ContingencyTable:
    """One table holding the counts of all ``tables`` (e.g. from Dask workers); none is modified."""
    out = ContingencyTable()
    for t in tables:
        out.merge(t)
    return out
