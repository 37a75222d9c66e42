"""The file format of a saved QC monitor: one safetensors file of arrays plus JSON metadata.

Nothing is pickled; the file is written atomically (temporary file, then rename), so a reader
finds either the previous state or the new one. What goes into the arrays and the metadata is
the monitor's business (:meth:`QCMonitor.save <neuroadda_rt.qc.monitor.QCMonitor.save>`); this
module only writes, reads and version-checks them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .. import _atomic
from ..errors import FormatError, require

#: Version of the metadata layout; a file of another version is refused.
STATE_VERSION = 2
_META_KEY = "neuroadda_qc_state"


def write_state(path: str | os.PathLike, arrays: dict[str, np.ndarray], meta: dict) -> Path:
    """Write ``arrays`` and the JSON-serialisable ``meta`` (``version`` added) to ``path`` atomically."""
    st = require("safetensors.numpy", "runtime")
    path = Path(path)
    arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    with _atomic.atomic_path(path) as tmp:
        st.save_file(arrays, str(tmp), metadata={_META_KEY: json.dumps({"version": STATE_VERSION, **meta})})
    return path


def read_state(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """The ``(meta, arrays)`` of a file written by :func:`write_state`.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    FormatError
        The file is truncated, not a QC state, or of another version.
    """
    require("safetensors", "runtime")
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"QC state {path} does not exist")
    try:
        with safe_open(str(path), framework="np") as f:
            meta = json.loads((f.metadata() or {})[_META_KEY])
            arrays = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, KeyError, json.JSONDecodeError, OSError) as exc:
        raise FormatError(f"{path}: not a readable QC state ({exc})") from exc
    if meta.get("version") != STATE_VERSION:
        raise FormatError(f"{path}: expected QC state version {STATE_VERSION}, got {meta.get('version')}")
    return meta, arrays
