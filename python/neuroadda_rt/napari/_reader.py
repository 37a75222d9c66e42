"""napari readers: EM volumes through :func:`neuroadda_rt.io.open_volume`, and the annotation hand-off.

A reader getter (npe2's ``get_reader``) takes a path (or a list of paths) and returns a reader function, or
None when the path is not for it; the reader returns napari layer-data tuples ``(data, kwargs, layer_type)``.
Nothing here imports napari.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import FormatError, NeuroaddaError
from ..io import open_volume
from ..io.volumes import ome_multiscales
from ..workflow import ANNOTATION_FORMAT

log = logging.getLogger("neuroadda_rt")

LayerData = tuple[Any, dict, str]
#: metadata key under which the annotation layers carry what the writer needs
META_KEY = "neuroadda_rt_annotation"
#: integer dtypes opened as a labels layer (raw EM is uint8/uint16/float; ids are 32/64-bit)
LABEL_DTYPES = ("uint32", "uint64", "int32", "int64")


def _one_path(path) -> str | None:
    if isinstance(path, (list, tuple)):
        return str(path[0]) if len(path) == 1 else None
    return None if path is None else str(path)


# --------------------------------------------------------------------------------------------
# volumes
# --------------------------------------------------------------------------------------------
def get_volume_reader(path) -> Callable[[Any], list[LayerData]] | None:
    """npe2 reader getter: a reader when :func:`~neuroadda_rt.io.open_volume` opens ``path``, else None.

    Only metadata is read here (the format, shape, dtype); a folder holding an annotation hand-off is
    left to :func:`get_annotation_reader`.
    """
    p = _one_path(path)
    if p is None:
        return None
    base = Path(p.split(":")[0]) if not Path(p).exists() and ":" in p else Path(p)
    if base.is_dir() and (base / "tiles.json").is_file():
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            vol = open_volume(p)
    except (NeuroaddaError, OSError, ValueError, ImportError):
        return None
    if vol.ndim not in (2, 3, 4):  # 4-D: channels first (OME-Zarr probabilities, c z y x)
        vol.close()
        return None
    vol.close()
    return read_volume


def _contrast_limits(vol) -> list[float]:
    dt = np.dtype(vol.dtype)
    if dt == np.uint8:
        return [0.0, 255.0]
    mid = np.asarray(vol[vol.shape[0] // 2] if vol.ndim == 3 else vol[...], dtype=np.float64)
    lo, hi = (float(v) for v in np.percentile(mid, [0.5, 99.5])) if mid.size else (0.0, 1.0)
    return [lo, hi if hi > lo else lo + 1.0]


def _lazy(vol):
    """A dask array over a Volume, read plane by plane (napari itself depends on dask; without it, the
    volume is read whole)."""
    try:
        import dask.array as da
    except ImportError:
        return np.asarray(vol)
    chunks = (*([1] * (vol.ndim - 2)), *vol.shape[-2:]) if vol.ndim >= 3 else vol.shape
    return da.from_array(vol, chunks=chunks, asarray=True, fancy=False, lock=True)


def _ome_levels(source) -> list[str] | None:
    """The dataset paths of an OME-Zarr multiscale group with more than one level, else None."""
    ms = ome_multiscales(Path(str(source)))
    paths = [d.get("path") for d in ms[0].get("datasets", [])] if ms else []
    return [str(x) for x in paths] if len(paths) > 1 and all(paths) else None


def volume_layer(source, *, name: str | None = None) -> LayerData:
    """One napari layer-data tuple for a volume: lazy (dask arrays read plane by plane), the voxel size in nm
    as ``scale``, every level of an OME-Zarr multiscale image as napari's multiscale data, a leading fourth
    axis as channels (``channel_axis=0``: OME-Zarr probabilities are c, z, y, x), a labels layer for 32/64-bit
    integer ids and an image layer otherwise."""
    vol = open_volume(source)
    levels = _ome_levels(source) if not isinstance(source, np.ndarray) else None
    data: Any = [_lazy(open_volume(str(source), key=k)) for k in levels] if levels else _lazy(vol)
    label = str(source) if not isinstance(source, np.ndarray) else "array"
    meta = {"path": vol.path, "key": vol.key, "voxel_size_nm": vol.voxel_size_nm, "dtype": str(vol.dtype)}
    kwargs: dict[str, Any] = {"name": name or Path(label.split(":")[0]).name or label, "metadata": meta}
    if levels:
        kwargs["multiscale"] = True
    spatial = vol.voxel_size_nm[-3:] if vol.voxel_size_nm and vol.ndim == 4 else vol.voxel_size_nm
    if spatial:
        kwargs["scale"] = list(spatial)
    if np.dtype(vol.dtype).name in LABEL_DTYPES and vol.ndim <= 3:
        return data, kwargs, "labels"
    if vol.ndim == 4:
        kwargs["channel_axis"] = 0
        kwargs["contrast_limits"] = _contrast_limits(_Plane(vol))
    else:
        kwargs["contrast_limits"] = _contrast_limits(vol)
        kwargs["colormap"] = "gray"
    return data, kwargs, "image"


class _Plane:
    """Channel 0 of a 4-D volume, for the contrast limits."""

    def __init__(self, vol):
        self.vol, self.ndim, self.dtype, self.shape = vol, 3, vol.dtype, vol.shape[1:]

    def __getitem__(self, i):
        return self.vol[0, i]


def read_volume(path) -> list[LayerData]:
    """Read one volume (see :func:`volume_layer`)."""
    return [volume_layer(_one_path(path))]


# --------------------------------------------------------------------------------------------
# the annotation hand-off
# --------------------------------------------------------------------------------------------
def _annotation_dir(path) -> Path | None:
    p = _one_path(path)
    if p is None:
        return None
    p = Path(p)
    folder = p.parent if p.name == "tiles.json" else p
    meta_path = folder / "tiles.json"
    if not meta_path.is_file():
        return None
    try:
        fmt = json.loads(meta_path.read_text(encoding="utf-8")).get("format")
    except (OSError, ValueError):
        return None
    return folder if fmt == ANNOTATION_FORMAT else None


def get_annotation_reader(path) -> Callable[[Any], list[LayerData]] | None:
    """npe2 reader getter: a reader for an annotation hand-off folder (or its ``tiles.json``), else None."""
    return read_annotation_layers if _annotation_dir(path) is not None else None


def _resolve_target(ann: Path, target: str | None):
    """The target volume of a hand-off, or None when it cannot be opened (context is then not shown)."""
    if not target:
        return None
    candidates = [target]
    base, _, key = target.partition(":") if not Path(target).exists() else (target, "", "")
    if not Path(base).is_absolute():
        candidates.append(str((ann.parent / base).resolve()) + (f":{key}" if key else ""))
    for c in candidates:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return open_volume(c)
        except (NeuroaddaError, OSError, ValueError, ImportError):
            continue
    return None


def _context_tile(vol, coords, shape, margin: int) -> np.ndarray:
    """The tile's box grown by ``margin`` on each side of y and x, zero outside the volume."""
    *z, y, x = (int(v) for v in coords)
    h, w = shape
    out = np.zeros((h + 2 * margin, w + 2 * margin), dtype=vol.dtype)
    H, W = vol.shape[-2:]
    y0, x0, y1, x1 = max(0, y - margin), max(0, x - margin), min(H, y + h + margin), min(W, x + w + margin)
    box = (*z, slice(y0, y1), slice(x0, x1))
    out[y0 - (y - margin):y1 - (y - margin), x0 - (x - margin):x1 - (x - margin)] = np.asarray(vol[box])
    return out


def _prefill(model_path: str | None, images: np.ndarray, margin: int, shape, progress: bool) -> np.ndarray | None:
    """The source model's segmentation of each tile (predicted with its context, cropped to the tile), ids
    unique over the stack; None when the model cannot be loaded."""
    if not model_path or not Path(model_path).is_dir():
        return None
    from ..package import load_model
    from ..runtime import Predictor
    from ..segmentation import segment

    try:
        pkg = load_model(model_path)
        if int(pkg.config["dim"]) != 2:  # the hand-off holds 2-D tiles
            return None
        pred = Predictor(pkg, device="cpu")
    except (NeuroaddaError, OSError, ImportError) as exc:
        log.warning("annotation: source model %s not usable for pre-filled labels (%s)", model_path, exc)
        return None
    h, w = shape
    out = np.zeros(images.shape, np.uint32)
    nxt = 0
    for i, img in enumerate(images):
        probs = np.asarray(pred.predict(img))
        seg = segment(probs[0] if pkg.representation == "boundary" else probs, pkg.representation)
        seg = np.asarray(seg, dtype=np.uint32)[margin:margin + h, margin:margin + w]
        ids, inv = np.unique(seg, return_inverse=True)
        relab = (np.arange(len(ids), dtype=np.uint32) + 1 + nxt)[inv.reshape(seg.shape)]
        out[i, margin:margin + h, margin:margin + w] = relab
        nxt += len(ids)
    return out


def read_annotation_layers(path, *, margin: int | None = None, prefill: bool = True) -> list[LayerData]:
    """The annotation hand-off as napari layers, ready to proofread.

    Parameters
    ----------
    path : path
        The hand-off folder (or its ``tiles.json``).
    margin : int, optional
        Context shown around each tile, in pixels (default half the tile size). Context comes from the
        target volume named in ``tiles.json``; when it cannot be opened, or no longer holds the tile
        (checked against the tile images), the tiles are shown without context.
    prefill : bool
        Pre-fill the labels with the source model's segmentation when no labels were painted yet.

    Returns
    -------
    list of (data, kwargs, layer_type)
        An image ``(n, h + 2m, w + 2m)`` of the tiles in context (one plane per tile), a labels layer of
        the same shape (painted labels from ``labels/`` if present, else the source model's segmentation,
        inside the tile box only), and a shapes layer outlining each tile box. The labels layer's
        metadata carries what :func:`~neuroadda_rt.napari._writer.write_annotation_labels` needs.
    """
    from ..io import read_image_2d

    ann = _annotation_dir(path)
    if ann is None:
        raise FormatError(f"{path}: expected an annotation folder written by `neuroadda-rt select` (with tiles.json)")
    meta = json.loads((ann / "tiles.json").read_text(encoding="utf-8"))
    entries = meta["tiles"]
    images = [read_image_2d(ann / "images" / f"{e['name']}.tif") for e in entries]
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
        raise FormatError(f"{ann}: expected tiles of one shape, got {sorted(shapes)}")
    h, w = shapes.pop()
    m = int(meta.get("tile_size", max(h, w)) // 2 if margin is None else margin)
    vol = _resolve_target(ann, meta.get("target")) if m > 0 else None
    ctx = None
    if vol is not None:
        ctx = np.stack([_context_tile(vol, e["coords"], (h, w), m) for e in entries])
        if any(not np.array_equal(c[m:m + h, m:m + w], im) for c, im in zip(ctx, images)):
            log.warning("annotation %s: the target volume %s no longer holds the selected tiles; showing the tiles "
                        "without context", ann, meta.get("target"))
            ctx = None
        vol.close()
    if ctx is None:
        m = 0
        ctx = np.stack(images)
    labels = np.zeros(ctx.shape, np.uint32)
    painted = [ann / "labels" / f"{e['name']}.tif" for e in entries]
    source = "empty"
    if all(p.is_file() for p in painted):
        for i, p in enumerate(painted):
            lab = read_image_2d(p, kind="labels")
            if lab.shape == (h, w):
                labels[i, m:m + h, m:m + w] = lab
        source = "painted"
    elif prefill:
        model_path = ((meta.get("selection") or {}).get("settings") or {}).get("model", {}).get("path")
        pre = _prefill(model_path, ctx, m, (h, w), progress=False)
        if pre is not None:
            labels, source = pre, "source model"
    names = [e["name"] for e in entries]
    info = {"folder": str(ann.resolve()), "names": names, "margin": m, "tile_shape": [h, w],
            "labels_from": source, "coords": [e["coords"] for e in entries]}
    boxes = [np.array([[i, m, m], [i, m, m + w], [i, m + h, m + w], [i, m + h, m]], dtype=float)
             for i in range(len(entries))]
    cl = [0.0, 255.0] if ctx.dtype == np.uint8 else [float(np.percentile(ctx, 0.5)), float(np.percentile(ctx, 99.5))]
    if cl[1] <= cl[0]:
        cl[1] = cl[0] + 1.0
    title = ann.name
    return [
        (ctx, {"name": f"{title}: tiles in context", "colormap": "gray", "contrast_limits": cl,
               "metadata": {META_KEY: info}}, "image"),
        (labels, {"name": f"{title}: labels ({source})", "metadata": {META_KEY: info}, "opacity": 0.5}, "labels"),
        (boxes, {"name": f"{title}: tiles to annotate", "shape_type": "rectangle", "edge_color": "yellow",
                 "face_color": "transparent", "edge_width": 2, "metadata": {META_KEY: info},
                 "properties": {"tile": names}}, "shapes"),
    ]
