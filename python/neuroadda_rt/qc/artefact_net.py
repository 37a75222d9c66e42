"""The QC monitor's learned fold / stain detector.

A small fully convolutional network (six 3×3 convolutions, 8-32 channels, about 4.4 M multiply-adds per
64-px tile) scores every location of a tile for a fold and for a stain; a tile's score per kind is the
maximum over locations, so any tile of at least ``MIN_SIZE`` pixels works. It was trained on development EM
sets only, with simulated folds and stains (``tools/train_qc_artefact_net.py``; its record,
``data/qc_artefact_net.json``, gives the data, recipe and validation numbers). The monitor treats the two
scores like its other detectors: robust z-scores against the reference, cut calibrated on the reference.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from ..errors import ShapeError

__all__ = ["NET_DETECTORS", "MIN_SIZE", "artefact_net_scores", "artefact_net_path"]

#: Detector names of the network's two outputs, in its output order.
NET_DETECTORS = ("fold_net", "stain_net")
#: Smallest tile side the network takes (three stride-2 stages need 16 px to leave 2 locations).
MIN_SIZE = 16

_lock = threading.Lock()
_runner = None

def artefact_net_path() -> Path:
    """The bundled ONNX file."""
    return Path(__file__).resolve().parents[1] / "data" / "qc_artefact_net.onnx"


def _get_runner():
    """The package's ONNX Runtime runner on the CPU (``runtime.backends._OrtRunner``), built once per process."""
    global _runner
    with _lock:
        if _runner is None:
            from ..runtime.backends import _OrtRunner

            _runner = _OrtRunner(artefact_net_path(), ["CPUExecutionProvider"], "cpu")
        return _runner


def artefact_net_scores(tiles: np.ndarray, *, chunk: int = 256) -> np.ndarray:
    """Fold and stain logits per tile.

    Parameters
    ----------
    tiles : ndarray (N, H, W) float32 in [0, 1]
        H and W at least ``MIN_SIZE``.
    chunk : int
        Tiles per ONNX Runtime call.

    Returns
    -------
    ndarray (N, 2) float64
        Columns in the order of ``NET_DETECTORS``: the largest per-location logit of each kind.

    Raises
    ------
    ShapeError
        Not (N, H, W), or a side below ``MIN_SIZE``.
    """
    t = np.asarray(tiles, dtype=np.float32)
    if t.ndim != 3 or min(t.shape[1:]) < MIN_SIZE:
        raise ShapeError(f"expected (N, H, W) tiles of at least {MIN_SIZE} px, got shape {t.shape}")
    run = _get_runner()
    out = [run(np.ascontiguousarray(t[i:i + chunk, None])) for i in range(0, len(t), chunk)]
    return np.concatenate(out).astype(np.float64) if out else np.zeros((0, 2))
