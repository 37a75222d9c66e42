"""Per-tile uncertainty of Bernoulli probability maps (boundary or affinity predictions).

NeuroADDA picks the tiles to annotate around the median uncertainty of the source model's
predictions on the target volume; :func:`tile_uncertainty` is that reduction, streaming once
through the predictions with a SIMD + OpenMP kernel (or CUDA).
"""

from __future__ import annotations

import numpy as np

from . import _core
from ._device import resolve_device
from .errors import DTypeError, InputValueError, ShapeError

__all__ = ["tile_uncertainty", "MEASURES"]

MEASURES = {"entropy": 0, "margin": 1, "bald": 2, "variance": 3}
_MC_ONLY = ("bald", "variance")


def _spatial_contiguous(a: np.ndarray, first: int) -> bool:
    expect = a.itemsize
    for d in range(a.ndim - 1, first - 1, -1):
        if a.shape[d] != 1 and a.strides[d] != expect:
            return False
        expect *= a.shape[d]
    return True


def _prepare_mask(mask, target_shape: tuple[int, ...]) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.dtype != np.bool_:
        raise DTypeError(f"expected a bool mask (True = voxel counts), got dtype {mask.dtype}")
    if mask.ndim > len(target_shape):
        raise ShapeError(f"expected a mask broadcastable to (N, C, *spatial) = {target_shape}, got shape {mask.shape}")
    try:
        view = np.broadcast_to(mask, target_shape)  # a view: no copy, stride 0 on broadcast axes
    except ValueError:
        raise ShapeError(
            f"expected a mask broadcastable to (N, C, *spatial) = {target_shape}, got shape {mask.shape}"
        ) from None
    if _spatial_contiguous(view, 2):
        return view
    # The spatial block itself is broadcast or strided: materialise only the (N or 1, C or 1)
    # slices the mask really has, at most one bool per probability of a single sample.
    n = target_shape[0] if mask.ndim == len(target_shape) and mask.shape[0] != 1 else 1
    c = target_shape[1] if mask.ndim >= len(target_shape) - 1 and mask.shape[-len(target_shape) + 1] != 1 else 1
    small = np.ascontiguousarray(np.broadcast_to(mask, (n, c, *target_shape[2:])))
    return np.broadcast_to(small, target_shape)


def tile_uncertainty(probs, *, measure: str = "entropy", mask=None, mc_samples: bool = False,
                     device: str = "auto") -> np.ndarray:
    """Mean uncertainty of each tile of Bernoulli probability maps.

    Every channel is an independent Bernoulli variable (a boundary or an affinity map), so the
    measures are binary: for a probability ``p`` the entropy is
    ``h(p) = -p ln p - (1 - p) ln(1 - p)`` (nats, in ``[0, ln 2]``) and the margin ``1 - |2p - 1|``
    (in ``[0, 1]``). A tile's value is the mean over its channels and included voxels.

    Parameters
    ----------
    probs : ndarray of float32
        ``(N, C, H, W)`` or ``(N, C, D, H, W)`` probabilities in ``[0, 1]``; with
        ``mc_samples=True`` one more leading axis of Monte-Carlo samples: ``(T, N, C, ...)``.
    measure : {"entropy", "margin", "bald", "variance"}
        ``"entropy"`` and ``"margin"`` use the probabilities, or with Monte-Carlo samples the
        predictive mean ``p_bar = mean_t p_t``. ``"bald"`` (needs ``mc_samples=True``) is the
        mutual information ``h(p_bar) - mean_t h(p_t)`` (Houlsby et al. 2011); ``"variance"``
        (needs ``mc_samples=True``) the population variance over the T samples,
        ``mean_t (p_t - p_bar)**2``. Both need T >= 2.
    mask : ndarray of bool, optional
        ``True`` where a voxel counts. Broadcast with NumPy rules against ``(N, C, *spatial)``
        (the sample axis is never masked): e.g. ``(H, W)`` for one mask shared by every tile,
        ``(N, 1, H, W)`` per tile, or ``(N, C, H, W)`` per channel. Excluded voxels are neither
        used nor validated (they may hold NaN padding). A tile with no included voxel gives NaN.
    mc_samples : bool
        Whether axis 0 of ``probs`` holds T Monte-Carlo samples (e.g. dropout passes). A bool:
        anything else (``"no"``, ``1``, None) raises :class:`~neuroadda_rt.errors.DTypeError`.
    device : {"auto", "cpu", "cuda"}
        ``"auto"`` uses the CUDA kernel only when compiled in and a GPU is present. A GPU-resident
        ``probs`` (any object with ``__cuda_array_interface__``: a torch CUDA tensor, a CuPy
        array) is reduced in place on its GPU with ``"auto"`` or ``"cuda"``, on the stream it
        names (torch: the current stream); ``"cpu"`` refuses it.

    Returns
    -------
    ndarray of float64, shape (N,)

    Raises
    ------
    DTypeError
        ``probs`` is not float32 (a float64 array is refused rather than copied) or the mask is
        not bool.
    ShapeError
        Wrong number of dimensions, an empty axis, or a mask that does not broadcast.
    InputValueError
        A probability outside ``[0, 1]`` or NaN at an included voxel (checked inside the
        single pass over the data).
    ValueError
        Unknown ``measure``, or ``"bald"``/``"variance"`` without Monte-Carlo samples.

    Notes
    -----
    Copy policy: ``probs`` is read in place when each ``(t, n, c)`` spatial block is
    C-contiguous (any C-ordered array, and any slicing of the leading axes); other layouts, e.g.
    Fortran order, and unaligned buffers are copied once to C order. Non-native byte order
    (``>f4``) is refused like any other dtype. The mask is read in place (broadcasting is a
    view) unless its spatial part is itself broadcast or strided, in which case only its own
    ``(N or 1, C or 1, *spatial)`` extent is materialised. No temporary of the size of ``probs``
    is created by the reduction. Per element the arithmetic is float32 (a polynomial log,
    absolute error ~1e-7 nats); sums are float64 and independent of the thread count.
    On ``device="cuda"`` a host array is copied to the GPU (the kernel itself is one pass), so
    for host data the CPU kernel is usually as fast; GPU-resident inputs are not copied (only a
    host mask is, once).

    Examples
    --------
    >>> import numpy as np
    >>> from neuroadda_rt import tile_uncertainty
    >>> p = np.full((2, 3, 8, 8), 0.5, dtype=np.float32)
    >>> p[1] = 1.0
    >>> np.round(tile_uncertainty(p), 6)  # ln 2 for a coin flip, 0 for a certain voxel
    array([0.693147, 0.      ])
    >>> tile_uncertainty(p, measure="margin")
    array([1., 0.])
    >>> mc = np.stack([p, 1 - p])  # (T=2, N, C, H, W)
    >>> np.round(tile_uncertainty(mc, measure="bald", mc_samples=True), 6)
    array([0.      , 0.693147])
    """
    if not isinstance(mc_samples, (bool, np.bool_)):
        raise DTypeError(f"expected mc_samples as a bool (True when axis 0 holds Monte-Carlo samples), "
                         f"got {mc_samples!r}")
    mc_samples = bool(mc_samples)
    if not isinstance(measure, str) or measure not in MEASURES:
        raise InputValueError(f"measure must be one of {tuple(MEASURES)}, got {measure!r}")
    if measure in _MC_ONLY and not mc_samples:
        raise InputValueError(f"measure={measure!r} needs Monte-Carlo samples: pass probs as (T, N, C, ...) "
                         f"with mc_samples=True")
    cai = None if isinstance(probs, np.ndarray) else getattr(probs, "__cuda_array_interface__", None)
    if cai is not None:
        return _gpu_resident(probs, cai, measure, mask, mc_samples, device)
    dev = resolve_device(device)
    if not isinstance(probs, np.ndarray):
        probs = np.asarray(probs)
    if probs.dtype != np.float32:
        raise DTypeError(f"expected float32 probabilities, got dtype {probs.dtype} "
                         f"(convert explicitly with probs.astype(np.float32); not copied silently)")
    lead = 3 if mc_samples else 2
    names = "(T, N, C, H, W) or (T, N, C, D, H, W)" if mc_samples else "(N, C, H, W) or (N, C, D, H, W)"
    if probs.ndim not in (lead + 2, lead + 3):
        raise ShapeError(f"expected probs of shape {names}, got {probs.ndim} dims {probs.shape}")
    if probs.size == 0:
        raise ShapeError(f"expected a non-empty probs array, got shape {probs.shape}")
    if mc_samples and measure in _MC_ONLY and probs.shape[0] < 2:
        raise ShapeError(f"expected at least 2 Monte-Carlo samples for {measure!r}, got T = {probs.shape[0]}")
    if not _spatial_contiguous(probs, lead) or any(s % 4 for s in probs.strides) or not probs.flags.aligned:
        probs = np.require(probs, requirements=("C", "A"))
    m = None if mask is None else _prepare_mask(mask, probs.shape[lead - 2:])
    values, bad = _core.tile_uncertainty(probs, mc_samples, m, MEASURES[measure], dev == "cuda")
    if bad >= 0:
        raise InputValueError(f"expected probabilities in [0, 1], got a value outside [0, 1] or NaN in tile {bad}")
    return values


def _gpu_resident(probs, cai: dict, measure: str, mask, mc_samples: bool, device: str) -> np.ndarray:
    """tile_uncertainty for an array in GPU memory, described by __cuda_array_interface__."""
    if isinstance(device, str) and device.lower() == "cpu":
        raise InputValueError("device='cpu' but probs lives in GPU memory; move it first (e.g. probs.cpu().numpy()) "
                         "or use device='auto'/'cuda'")
    resolve_device("cuda")  # raises BackendUnavailableError (a RuntimeError) with the reason
    if cai.get("typestr") != "<f4":
        raise DTypeError(f"expected float32 probabilities, got typestr {cai.get('typestr')!r}")
    shape = tuple(int(s) for s in cai["shape"])
    lead = 3 if mc_samples else 2
    if len(shape) not in (lead + 2, lead + 3):
        raise ShapeError(f"expected {lead + 2} or {lead + 3} dims, got {len(shape)} dims {shape}")
    if 0 in shape:
        raise ShapeError(f"expected a non-empty probs array, got shape {shape}")
    if mc_samples and measure in _MC_ONLY and shape[0] < 2:
        raise ShapeError(f"expected at least 2 Monte-Carlo samples for {measure!r}, got T = {shape[0]}")
    strides = cai.get("strides")
    if strides is None:  # C-contiguous
        strides, step = [], 4
        for n in reversed(shape):
            strides.append(step)
            step *= n
        strides = strides[::-1]
    ptr = int(cai["data"][0])
    stream = cai.get("stream")
    if stream is None and type(probs).__module__.startswith("torch"):
        import torch  # the producer's current stream, so that the kernel is ordered after it

        stream = torch.cuda.current_stream(probs.device).cuda_stream
    m = None
    if mask is not None:
        if hasattr(mask, "__cuda_array_interface__"):
            raise DTypeError("expected a NumPy bool mask with GPU probs (it is copied once); "
                             "got a GPU array: pass mask.cpu().numpy()")
        m = _prepare_mask(mask, shape[lead - 2:])
    values, bad = _core.tile_uncertainty_cuda_array(ptr, list(shape), [int(s) for s in strides], mc_samples, m,
                                                    MEASURES[measure], int(stream or 0))
    if bad >= 0:
        raise InputValueError(f"expected probabilities in [0, 1], got a value outside [0, 1] or NaN in tile {bad}")
    return values
