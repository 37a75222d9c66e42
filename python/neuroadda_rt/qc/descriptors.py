"""Per-tile intensity descriptors of the QC artefact detectors, and the tile input rule.

The descriptors are cheap (about 1.5 ms per 256×256 tile on two cores) and computed on the [0, 1]
normalised tile: brightness, contrast, sharpness, the strongest straight dark ridge (folds), the
smoothest block (stains) and the brightest block (debris), plus a texture column that names the
cause of a flag but is not itself a detector.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from .. import _core
from ..errors import DTypeError, InputValueError, ShapeError

__all__ = ["image_stats"]

#: Intensity descriptors computed per tile (all on the [0, 1] normalised image), their
#: artefact tail (-1 low, +1 high, 0 both) and the likely cause they name.
IMAGE_STATS = ("mean", "std", "sharpness", "line_ridge", "flat", "block_max", "dark_fraction", "saturated_fraction",
               "black_lines", "flat_area")
IMAGE_TAILS = {"mean": 0, "std": 0, "sharpness": -1, "line_ridge": 1, "flat": -1, "block_max": 1,
               "dark_fraction": 1, "saturated_fraction": 1, "black_lines": 1, "flat_area": 1}
KIND_OF = {"mean": "brightness", "std": "contrast", "sharpness": "defocus", "line_ridge": "fold", "flat": "stain",
           "block_max": "bright_region", "dark_fraction": "black_region", "saturated_fraction": "saturation",
           "black_lines": "black_region", "flat_area": "stain",
           "similarity": "feature_outlier", "uncertainty": "uncertainty", "fold_net": "fold", "stain_net": "stain"}
#: Intensities at or below this (of 1) are "black" (padding bands, lost sections, black stripes) and at or
#: above ``SATURATED`` saturated: 5 and 250 of 255.
BLACK, SATURATED = 5 / 255, 250 / 255
#: Smallest robust scale per detector (in its own units): a descriptor that barely varies over the
#: reference (no black pixel in any clean tile: MAD 0) must not turn one stray pixel into a flag. Each is
#: a change a microscopist would not call an artefact: 2% of the intensity range in brightness or block
#: intensity, 1% in contrast, 5% of the tile's pixels black or saturated, ...
SCALE_FLOOR = {"mean": 0.02, "std": 0.01, "sharpness": 0.05, "line_ridge": 0.01, "flat": 0.005, "block_max": 0.02,
               "dark_fraction": 0.05, "saturated_fraction": 0.05, "black_lines": 0.01, "flat_area": 0.02,
               "similarity": 1e-3, "uncertainty": 1e-3,
               "fold_net": 0.1, "stain_net": 0.1}  # the learned detectors' logits (qc.artefact_net)
#: Column of :func:`image_stats` holding the median 4×4-block standard deviation.
TEXTURE = len(IMAGE_STATS)
#: A 4×4 block counts towards ``flat_area`` when its standard deviation is below this fraction of the
#: tile's median block standard deviation: a deposit lying on the section replaces the tissue's texture
#: *and its shot noise* by a smooth film, whatever the tile's contrast.
FLAT_RATIO = 0.3


def as_tiles(tiles, name: str = "tiles") -> np.ndarray:
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
    """Cheap intensity descriptors per tile, columns in the order of ``IMAGE_STATS``.

    Computed on the tile averaged over 2×2 pixels (tiles of 256 pixels or more; smaller
    tiles at full resolution), which keeps the cost at about 1.5 ms per 256×256 tile (two cores):

    * ``mean``, ``std``: brightness and contrast;
    * ``sharpness``: mean absolute 4-neighbour Laplacian over the standard deviation (defocus
      lowers it whatever the contrast);
    * ``line_ridge``: strongest straight dark ridge (a segment a third of the tile long, 32
      orientations, darker than both parallel neighbours): folds are long thin dark lines,
      membranes are shorter and dark areas have no bright sides;
    * ``flat``: smallest standard deviation of 4×4 blocks: stains and other deposits are dark
      *and* smooth, tissue always carries texture and shot noise;
    * ``block_max``: brightest 4×4 block mean (debris, bright deposits, beam damage);
    * ``dark_fraction``: fraction of pixels at most 5/255 (black padding bands, lost sections, stripes);
    * ``saturated_fraction``: fraction of pixels at least 250/255 (detector saturation, charging);
    * ``black_lines``: fraction of whole rows or whole columns that are black (the larger): padding
      stripes a few pixels wide at a section's edge, which tissue never has;
    * ``flat_area``: fraction of the tile's 4×4 blocks that are smooth relative to the tile's own
      texture (standard deviation below ``FLAT_RATIO`` times the median block standard deviation),
      counting only blocks without a black or saturated pixel: a stain covers an *area* with a smooth
      film (``flat`` sees only its smoothest block), and the ratio does not move with the section's
      brightness or contrast; clipped blocks are flat because the detector's range ends, which
      ``dark_fraction`` / ``saturated_fraction`` measure;
    * a last column, ``texture`` (median 4×4-block standard deviation), is not a detector: it
      tells a global blur (every block smooth) from a local deposit when naming the cause.

    Tiles are processed ``chunk`` at a time to stay in cache.
    """
    t = np.asarray(tiles, dtype=np.float32)
    if t.shape[0] > chunk:
        return np.concatenate([image_stats(t[i:i + chunk], chunk=chunk) for i in range(0, t.shape[0], chunk)])
    n, h, w = t.shape
    # black / saturated pixels at full resolution (averaging would blur a band's edge into the tissue)
    dark = (t <= np.float32(BLACK)).mean(axis=(1, 2), dtype=np.float64)
    sat = (t >= np.float32(SATURATED)).mean(axis=(1, 2), dtype=np.float64)
    black = t <= np.float32(BLACK)
    lines = np.maximum(black.all(axis=2).mean(axis=1), black.all(axis=1).mean(axis=1)).astype(np.float64)
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
    # blocks holding a black or saturated pixel (at the resolution the blocks are taken at)
    clipped = (c <= np.float32(BLACK)) | (c >= np.float32(SATURATED))
    clipped = clipped.reshape(n, h4 * 4, w4, 4).any(-1).reshape(n, h4, 4, w4).any(2).reshape(n, -1)
    open_std = np.where(clipped, np.nan, bstd)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a tile with every block clipped: all-NaN row
        ref_std = np.nanmedian(open_std, axis=1) if clipped.any() else np.median(bstd, axis=1)
    ref_std = np.nan_to_num(ref_std, nan=0.0)  # every block clipped: no open block is flat
    area = ((bstd < np.float32(FLAT_RATIO) * ref_std[:, None].astype(np.float32)) & ~clipped).mean(axis=1)
    return np.stack([mean, std, sharp, _line_contrast(t), flat, bmax, dark, sat, lines, area.astype(np.float64),
                     texture], axis=1)


def _line_contrast(t: np.ndarray, n_angles: int = 32, offsets=(2, 4, 8)) -> np.ndarray:
    """Strongest straight dark ridge: over straight segments (0.3 of the tile long) at every
    position and ``n_angles`` orientations, the mean of the segment subtracted from the darker of
    its two parallel neighbours ``k`` pixels away (k in ``offsets``). A fold is a long thin dark line
    with brighter tissue on both sides; dark areas (vesicle clusters) have dark neighbours and
    membrane segments are shorter. A direction within 45 degrees of the column axis becomes that
    axis by shifting each row (shear); running sums along it give every segment's mean at once,
    O(pixels) per angle; the transposed tile covers the other directions. The geometry (shears,
    lengths, reflect padding) is set here; the sums run in ``_core._line_ridge`` (C++, tiles in
    parallel)."""
    n, h, w = t.shape
    length = min(max(5, min(41, int(0.3 * min(h, w)) | 1)), min(h, w) - 1)
    best = np.full(n, -np.inf, dtype=np.float32)
    thetas = np.linspace(-np.pi / 4, np.pi / 4, n_angles // 2, endpoint=False)
    for img in (t, t.transpose(0, 2, 1)):
        hh, ww = img.shape[1:]
        ks = np.array([k for k in offsets if 2 * k < ww], dtype=np.int32)
        if not len(ks):
            continue
        pad = hh // 2 + 1
        xp = np.pad(img, ((0, 0), (0, 0), (pad, pad)), mode="reflect" if pad < ww else "edge")
        ys = np.arange(hh) - hh / 2
        shears = np.stack([np.round(ys * math.tan(th)).astype(np.int32) + pad for th in thetas])
        lengths = np.array([max(3, int(round(length * math.cos(th)))) for th in thetas], dtype=np.int32)
        ridge = _core._line_ridge(np.ascontiguousarray(xp, dtype=np.float32), ww, np.ascontiguousarray(shears),
                                  lengths, ks)
        best = np.maximum(best, ridge)
    return best.astype(np.float64)
