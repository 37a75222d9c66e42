"""The one intensity normalisation of the package.

Intensities are brought to float32 in [0, 1] by :func:`normalize_intensity` under a named
rule whose JSON-serialisable description (:func:`intensity_rule`) is stored in model packages
and re-applied at inference. Every path (training, ranking, selection, inference) calls it
exactly once.
"""

from __future__ import annotations

import numpy as np

from ..errors import DTypeError, InputValueError

__all__ = ["intensity_rule", "normalize_intensity", "normalize_tiles", "freeze_rule"]

_RULES = ("dtype", "percentile", "fixed")


def intensity_rule(rule: str | dict = "dtype", *, low: float | None = None, high: float | None = None,
                   dtype=None) -> dict:
    """The JSON-serialisable description of an intensity rule (what a model package stores).

    Rules
    -----
    ``"dtype"``
        Divide by the dtype's range: uint8 → ``x/255``, uint16 → ``x/65535``, other integers
        map ``[iinfo.min, iinfo.max]`` to [0, 1]; floats are taken to be in [0, 1] already and
        clipped. Deterministic, no statistics.
    ``"percentile"``
        Per input (each volume or tile it is applied to), map the ``low``-th percentile
        (default 1) to 0 and the ``high``-th (default 99) to 1, clipping outside. Robust to
        contrast/brightness changes between microscopes.
    ``"fixed"``
        Map the fixed values ``low`` → 0 and ``high`` → 1, clipping outside (e.g. the
        training set's percentiles frozen).

    Examples
    --------
    >>> intensity_rule("percentile")
    {'rule': 'percentile', 'low': 1.0, 'high': 99.0}
    """
    if isinstance(rule, dict):
        d = dict(rule)
        name = d.get("rule")
        if name not in _RULES:
            raise InputValueError(f"expected an intensity rule in {_RULES}, got {name!r}")
        return intensity_rule(name, low=d.get("low"), high=d.get("high"))
    if rule == "dtype":
        return {"rule": "dtype"}
    if rule == "percentile":
        lo = 1.0 if low is None else float(low)
        hi = 99.0 if high is None else float(high)
        if not 0.0 <= lo < hi <= 100.0:
            raise InputValueError(f"expected 0 <= low < high <= 100 percentiles, got low={lo}, high={hi}")
        return {"rule": "percentile", "low": lo, "high": hi}
    if rule == "fixed":
        if low is None or high is None or not float(low) < float(high):
            raise InputValueError(f"expected fixed low < high values, got low={low}, high={high}")
        return {"rule": "fixed", "low": float(low), "high": float(high)}
    raise InputValueError(f"expected an intensity rule in {_RULES}, got {rule!r}")


def freeze_rule(rule: str | dict, image) -> dict:
    """The ``"fixed"`` rule that normalises ``image`` exactly as ``rule`` does.

    A ``"percentile"`` rule becomes the image's own percentiles, so that pieces of one image (the
    windows of a sliding-window prediction) are normalised identically; other rules come back
    unchanged. A constant image gives a unit-wide range (every value maps to 0, as in
    :func:`normalize_intensity`).
    """
    r = intensity_rule(rule)
    if r["rule"] != "percentile":
        return r
    a = np.asarray(image)
    if a.size == 0:
        return {"rule": "fixed", "low": 0.0, "high": 1.0}
    lo, hi = (float(v) for v in np.percentile(a, [r["low"], r["high"]]))
    return {"rule": "fixed", "low": lo, "high": hi if hi > lo else lo + 1.0}


def normalize_intensity(image, rule: str | dict = "dtype", *, low: float | None = None,
                        high: float | None = None) -> np.ndarray:
    """Bring intensities to float32 in [0, 1] under a documented rule.

    Parameters
    ----------
    image : array-like or Volume
        Any numeric array (a :class:`Volume` is read whole). Never modified; the result is a
        new float32 array.
    rule : {"dtype", "percentile", "fixed"} or dict
        See :func:`intensity_rule`; a dict is a stored rule description (from a model
        package) and is applied identically.
    low, high : float, optional
        Percentiles for ``"percentile"`` (default 1 and 99) or values for ``"fixed"``.

    Returns
    -------
    numpy.ndarray
        float32, same shape, values in [0, 1].

    Examples
    --------
    >>> import numpy as np
    >>> normalize_intensity(np.array([0, 51, 255], np.uint8)).tolist()
    [0.0, 0.20000000298023224, 1.0]
    >>> r = intensity_rule("percentile", low=0, high=100)
    >>> normalize_intensity(np.array([10., 20., 30.]), r).tolist()
    [0.0, 0.5, 1.0]
    """
    r = intensity_rule(rule, low=low, high=high)
    a = np.asarray(image)
    if a.dtype.kind not in "uifb":
        raise DTypeError(f"expected a numeric image, got dtype {a.dtype}")
    if r["rule"] == "dtype":
        if a.dtype.kind == "b":
            return a.astype(np.float32)
        if a.dtype.kind in "ui":
            info = np.iinfo(a.dtype)
            lo, hi = float(info.min), float(info.max)
        else:
            return np.clip(a.astype(np.float32), 0.0, 1.0)
    elif r["rule"] == "percentile":
        if a.size == 0:
            return a.astype(np.float32)
        frozen = freeze_rule(r, a)
        lo, hi = frozen["low"], frozen["high"]
    else:
        lo, hi = r["low"], r["high"]
    out = a.astype(np.float32)
    if hi <= lo:  # a constant image: all zeros rather than NaN
        return np.zeros_like(out)
    out -= np.float32(lo)
    out /= np.float32(hi - lo)
    np.clip(out, 0.0, 1.0, out=out)
    return out


def normalize_tiles(tiles, rule: str | dict = "dtype") -> np.ndarray:
    """Apply ``rule`` to each tile of a batch on its own -> float32, same shape.

    A statistics-based rule (``"percentile"``) sees each tile alone, as training does; the
    ``"dtype"`` and ``"fixed"`` rules are element-wise, so the whole batch goes in one call.
    """
    r = intensity_rule(rule)
    a = np.asarray(tiles)
    if r["rule"] == "percentile" and a.ndim > 0:
        return np.stack([normalize_intensity(t, r) for t in a]) if len(a) else a.astype(np.float32)
    return normalize_intensity(a, r)
