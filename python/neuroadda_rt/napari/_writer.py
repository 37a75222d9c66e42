"""napari writer: proofread labels back into the annotation hand-off, where ``neuroadda-rt finetune`` reads them.

Nothing here imports napari.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
import numpy as np

from .. import _atomic
from ..errors import DTypeError, FormatError, InputValueError, ShapeError, require
from ..workflow import ANNOTATION_FORMAT, read_annotation
from ._reader import META_KEY


def _annotation_and_labels_dir(path, info: dict) -> tuple[Path, Path]:
    """(hand-off folder, labels folder) for the path the user saved to: the hand-off folder itself, its
    ``labels/`` folder, or (an empty path) the folder the layer was read from."""
    p = Path(str(path)) if path else None
    candidates = []
    if p is not None:
        candidates += [(p, p / "labels"), (p.parent, p)] if p.name == "labels" else [(p, p / "labels")]
    if info.get("folder"):
        f = Path(info["folder"])
        candidates.append((f, f / "labels"))
    for ann, lab in candidates:
        mp = ann / "tiles.json"
        if mp.is_file():
            try:
                if json.loads(mp.read_text(encoding="utf-8")).get("format") == ANNOTATION_FORMAT:
                    return ann, lab
            except (OSError, ValueError):
                continue
    raise FormatError(f"{path}: expected an annotation hand-off folder (holding tiles.json, written by "
                      f"`neuroadda-rt select`) or its labels/ folder to save the labels into")


def write_annotation_labels(path, data, meta: dict | None = None) -> list[str]:
    """Save a labels layer into an annotation hand-off: one integer TIFF per tile in ``labels/``, named like
    its image, the tile box only (the context around it is not saved).

    Parameters
    ----------
    path : str
        The hand-off folder or its ``labels/`` folder.
    data : array-like
        ``(n, h + 2m, w + 2m)`` labels as read by
        :func:`~neuroadda_rt.napari._reader.read_annotation_layers` (its metadata gives the margin ``m``),
        or ``(n, h, w)`` labels of the tiles alone (``tiles.tif``'s shape). Non-negative integer ids,
        0 = membrane/background.
    meta : dict, optional
        The layer's attributes (napari passes them); ``meta["metadata"]["neuroadda_rt_annotation"]``.

    Returns
    -------
    list of str
        The files written (after checking that :func:`neuroadda_rt.workflow.read_annotation`, what
        ``finetune`` calls, accepts them).

    Raises
    ------
    FormatError, ShapeError, DTypeError
        Not a hand-off folder, a stack whose shape does not match the tiles, or labels that are not
        non-negative integers; nothing is written then.
    """
    tifffile = require("tifffile", "io")
    info = dict(((meta or {}).get("metadata") or {}).get(META_KEY) or {})
    ann, lab_dir = _annotation_and_labels_dir(path, info)
    entries = json.loads((ann / "tiles.json").read_text(encoding="utf-8"))["tiles"]
    names = [e["name"] for e in entries]
    h, w = (int(v) for v in entries[0]["shape"][-2:])
    a = np.asarray(data)
    if a.ndim == 2:
        a = a[None]
    if a.dtype.kind == "f":
        if not np.all(np.isfinite(a)) or np.any(a != np.round(a)):
            raise DTypeError(f"{ann}: expected integer label ids, got non-integer {a.dtype} values")
        a = a.astype(np.int64)
    if a.dtype.kind not in "uib":
        raise DTypeError(f"{ann}: expected integer label ids, got dtype {a.dtype}")
    if a.size and a.min() < 0:
        raise InputValueError(f"{ann}: expected non-negative label ids (0 = membrane), got minimum {int(a.min())}")
    if a.shape[0] != len(names):
        raise ShapeError(f"{ann}: expected a stack of {len(names)} label planes (one per tile), got shape {a.shape}")
    m = int(info.get("margin", (a.shape[1] - h) // 2))
    if a.shape[1:] != (h + 2 * m, w + 2 * m):
        raise ShapeError(f"{ann}: expected labels of shape ({len(names)}, {h + 2 * m}, {w + 2 * m}) (tiles of {h}x{w} "
                         f"with a margin of {m}), got {a.shape}")
    crop = a[:, m:m + h, m:m + w]
    big = crop.size and int(crop.max()) >= 2**32
    crop = crop.astype(np.uint64 if big else np.uint32)  # what read_annotation returns
    lab_dir.mkdir(parents=True, exist_ok=True)
    # written beside, checked with what finetune reads (read_annotation), then moved in: refused labels leave
    # labels/ as it was
    tmp = _atomic.temp_dir_beside(lab_dir)
    try:
        for name, tile in zip(names, crop):
            tifffile.imwrite(tmp / f"{name}.tif", np.ascontiguousarray(tile), photometric="minisblack")
        read_annotation(ann, tmp)
        written = []
        for name in names:
            os.replace(tmp / f"{name}.tif", lab_dir / f"{name}.tif")
            written.append(str(lab_dir / f"{name}.tif"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return written
